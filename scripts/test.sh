#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs formatting and
# lint checks, unit and integration tests, and the fuzz smoke run.
set -euo pipefail
source "$(dirname "$0")/common.sh"
bash "$ROOT/scripts/install-deps.sh"
source "$ROOT/scripts/common.sh"
cd "$ROOT"
# One build from a clean tree: incremental state would only cost disk.
export CARGO_INCREMENTAL=0

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test"
log="$(mktemp /tmp/cryo-test.XXXXXX)"
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
bash "$ROOT/scripts/fuzz-smoke.sh"

# One closing line over every cargo test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;/) p += $(i-1); if ($i ~ /^failed;/) f += $(i-1) } }
     END { printf "\ntests: %d passed, %d failed\n", p, f }' "$log"
