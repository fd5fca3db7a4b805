#!/usr/bin/env bash
# A job's start under `cryo run` against its launcher alone, measured by
# hyperfine (figures, not pass/fail): the same short MPI job (MPI_Init,
# cryo_init_mpi, a region of STATE bytes per rank filled as an application
# fills its arrays, 20 iterations, the end), command to exit, with warm-up
# runs and a fresh store before each `cryo run`. `cryo-bench start` measures
# the same in-process and prints the ratio against its 1.10x target; this is
# the cross-check with a tool of its own.
# Usage: scripts/bench-start.sh [RANKS] [STATE_BYTES]   (release build)
set -euo pipefail
source "$(dirname "$0")/common.sh"
command -v hyperfine >/dev/null || { echo "hyperfine is missing: bash scripts/install-deps.sh" >&2; exit 1; }
BIN="$ROOT/target/release"
[ -x "$BIN/quiesce-bench" ] && [ -x "$BIN/cryo" ] ||
  cargo build --release -p cryo-heat2d -p cryo-coordinator -p cryo-agent --quiet
ranks="${1:-2}"
state="${2:-$((256 << 20))}"
work="$(mktemp -d /tmp/cryo-bench-start.XXXXXX)"
trap 'pkill -9 -f "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
job=("$BIN/quiesce-bench" --iters 20 --trials 1 --state-bytes "$state")
echo "ranks: $ranks; state per rank: $((state >> 20)) MiB"
hyperfine --warmup 1 --runs 7 --style basic \
  --prepare "rm -rf $work/store $work/scratch" \
  --export-markdown "$work/start.md" \
  -n "mpiexec" "mpiexec -n $ranks ${job[*]}" \
  -n "cryo run" "CRYO_STORE=$work/store $BIN/cryo run --job start -n $ranks --scratch $work/scratch -- ${job[*]}"
cat "$work/start.md"
