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
  log="$(mktemp /tmp/cryo-fuzz.XXXXXX)"
  if ! cargo +nightly fuzz run "$target" "${corpus[@]}" -- -runs="$runs" -max_len=4096 >"$log" 2>&1; then
    # The whole reason, and the input that failed, so it can be replayed
    # with `cargo +nightly fuzz run <target> <file>`.
    grep -v '^#[0-9]' "$log" | tail -n 60
    for crash in artifacts/"$target"/*; do
      [ -f "$crash" ] || continue
      echo "==> fuzz $target: failing input $crash (base64):"
      base64 "$crash"
    done
    echo "==> fuzz $target: FAILED"
    df -h . | tail -n 1
    exit 1
  fi
  tail -n 1 "$log"
  rm -f "$log"
done
