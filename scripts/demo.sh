#!/usr/bin/env bash
# The demo: installs what is missing, builds cryo, then checkpoints a 4-rank
# MPI heat stencil on two (emulated) nodes, kills every process with
# SIGKILL, restarts it on four other nodes, and checks that the result is
# byte-identical to an uninterrupted run. It prints what happens at each step.
set -euo pipefail
source "$(dirname "$0")/common.sh"
bash "$ROOT/scripts/install-deps.sh"
source "$ROOT/scripts/common.sh"
cd "$ROOT"
echo "==> building (release)"
cargo build --release --workspace --quiet
BIN="$ROOT/target/release"
CRYO="$BIN/cryo"
DEMO="$(mktemp -d /tmp/cryo-demo.XXXXXX)"
export CRYO_STORE="$DEMO/store"
kill_all() { pkill -9 -f "$DEMO" 2>/dev/null || true; sleep 0.3; pkill -9 -f "$DEMO" 2>/dev/null || true; }
trap 'kill_all; rm -rf "$DEMO"' EXIT
ARGS=(--n 256 --iters 100 --input "$DEMO/input.bin")

"$BIN/heat2d" --make-input "$DEMO/input.bin" --n 256
echo
echo "==> 1. reference: heat2d on 4 ranks, uninterrupted"
mpiexec -n 4 "$BIN/heat2d" "${ARGS[@]}" --log "$DEMO/reference.log" --output "$DEMO/reference.out"

echo
echo "==> 2. cryo run: the same job under cryo, 4 ranks on emulated nodes a and b"
"$CRYO" run --job heat --nodes a:2,b:2 -n 4 --scratch "$DEMO/scratch" -- \
  "$BIN/heat2d" "${ARGS[@]}" --step-ms 50 --log "$DEMO/run.log" --output "$DEMO/run.out" \
  > "$DEMO/run.stdout" 2> "$DEMO/run.stderr" &
disown
until [ "$(cat "$DEMO/run.log" 2>/dev/null | wc -l)" -ge 50 ]; do sleep 0.1; done
"$CRYO" status heat

echo
echo "==> 3. cryo checkpoint at iteration $(wc -l < "$DEMO/run.log")"
"$CRYO" checkpoint heat

echo
echo "==> 4. kill -9 of every process of the job: cryo, agents, mpiexec, ranks"
kill_all
echo "    the log stopped at iteration $(wc -l < "$DEMO/run.log")"
"$CRYO" ls "$CRYO_STORE"

echo
echo "==> 5. cryo restart on four other nodes (c, d, e, f)"
"$CRYO" restart heat --nodes c:1,d:1,e:1,f:1 --scratch "$DEMO/scratch2"

echo
echo "==> 6. compare with the uninterrupted run"
cmp "$DEMO/reference.out" "$DEMO/run.out" && echo "    final grid: byte-identical"
cmp "$DEMO/reference.log" "$DEMO/run.log" && echo "    residual log: byte-identical"

echo
echo "==> 7. cryo verify re-hashes every chunk of the checkpoint"
"$CRYO" verify "$CRYO_STORE" heat
echo
echo "demo finished"
