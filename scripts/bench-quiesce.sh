#!/usr/bin/env bash
# MPI quiesce benchmark (figures, not pass/fail), oversubscribed on this
# machine: for 2, 4, 8 and 16 ranks,
#  - the safe point's cost with nothing pending, against a 1 ms iteration
#    (interleaved trials with and without it, minimum of each side);
#  - under `cryo run` on two emulated nodes, three checkpoints: quiesce
#    latency (request to the last rank parked), the longest rank pause, and
#    the time a plain memcpy of the same state takes in the same run.
# Usage: scripts/bench-quiesce.sh [RANKS...]   (build with --release first)
set -euo pipefail
source "$(dirname "$0")/common.sh"
BIN="$ROOT/target/release"
[ -x "$BIN/quiesce-bench" ] || cargo build --release -p cryo-heat2d -p cryo-coordinator -p cryo-agent --quiet
ranks=("${@:-2 4 8 16}")
work="$(mktemp -d /tmp/cryo-bench-quiesce.XXXXXX)"
trap 'pkill -9 -f "$work" 2>/dev/null || true; rm -rf "$work"' EXIT
state=$((32 << 20))
echo "state per rank: $((state >> 20)) MiB; iteration: 1 ms of work"
for n in ${ranks[*]}; do
  mpiexec -n "$n" "$BIN/quiesce-bench" --iters 200 --trials 15 --state-bytes 4096
  half=$(( n / 2 )); rest=$(( n - half ))
  CRYO_STORE="$work/store" "$BIN/cryo" run --job "q$n" --nodes "a:$half,b:$rest" -n "$n" \
    --scratch "$work/scratch-$n" -- "$BIN/quiesce-bench" --iters 10 --run-secs 30 \
    --state-bytes "$state" > "$work/run-$n.out" 2> "$work/run-$n.err" &
  run=$!
  until CRYO_STORE="$work/store" "$BIN/cryo" status "q$n" 2>/dev/null | grep -q "no checkpoint in progress"; do sleep 0.2; done
  sleep 1
  for i in 1 2 3; do
    CRYO_STORE="$work/store" "$BIN/cryo" checkpoint "q$n" | sed "s/^/ranks $n: /"
  done
  CRYO_STORE="$work/store" "$BIN/cryo" preempt "q$n" > /dev/null || true
  wait "$run" || true
done
python3 - "$state" <<'PY'
import sys, time
n = int(sys.argv[1]); a = bytearray(n); b = bytearray(n)
b[:] = a  # fault the pages in first
t = time.perf_counter(); b[:] = a; dt = time.perf_counter() - t
print(f"memcpy of one rank's state ({n >> 20} MiB, warm): {dt*1000:.1f} ms")
PY
