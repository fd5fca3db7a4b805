#!/usr/bin/env bash
# Runs each cargo-fuzz target for a fixed number of iterations when a
# nightly toolchain and cargo-fuzz are available; says so loudly when not.
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$ROOT/fuzz"
runs="${CRYO_FUZZ_RUNS:-50000}"
if ! rustup toolchain list 2>/dev/null | grep -q nightly; then
  echo "==> fuzz: SKIPPED (no nightly toolchain; cargo-fuzz needs one)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "==> fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
for target in $(cargo +nightly fuzz list); do
  echo "==> fuzz $target ($runs runs)"
  # Seed inputs kept in the repository (fuzz/seeds/<target>) start the run
  # from valid files, so the checks behind the first parse are reached.
  corpus=(corpus/"$target")
  mkdir -p "corpus/$target"
  [ -d "seeds/$target" ] && corpus+=("seeds/$target")
  cargo +nightly fuzz run "$target" "${corpus[@]}" -- -runs="$runs" -max_len=4096 2>&1 | tail -n 2
done
