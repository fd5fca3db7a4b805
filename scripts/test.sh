#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs formatting and
# lint checks, unit and integration tests, and the fuzz smoke run.
set -euo pipefail
source "$(dirname "$0")/common.sh"
bash "$ROOT/scripts/install-deps.sh"
source "$ROOT/scripts/common.sh"
cd "$ROOT"

echo "==> cargo fmt --check"
cargo fmt --all -- --check 2>/dev/null
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "==> cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/cryo-test.log
bash "$ROOT/scripts/fuzz-smoke.sh"
