"""append_log.py DIR ITERS STEP_MS: logs the way many Python programs do,
reopening each log with "a" at every step and closing it again, so that at
a checkpoint no log is open. Each rank appends one line per step to its own
log, DIR/append.<rank>.log, and to one log all ranks share, DIR/shared.log.
Used by tests/tests/python.rs: after a checkpoint, a kill and a restart,
every line is in each log exactly once."""

import os
import sys
import time

from mpi4py import MPI
import numpy as np

import cryo


def main(folder, iters, step_ms):
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    cryo.init_mpi(comm)
    state = cryo.region("state", 1, np.int64)
    own = os.path.join(folder, f"append.{rank}.log")
    shared = os.path.join(folder, "shared.log")
    if cryo.restored_epoch() == 0:
        open(own, "w").close()
        if rank == 0:
            open(shared, "w").close()
        comm.Barrier()
    else:
        print(f"rank {rank}: resumed after step {state[0]}", file=sys.stderr, flush=True)
    while state[0] < iters:
        state[0] += 1
        with open(own, "a") as log:
            log.write(f"rank {rank} step {state[0]:04d}\n")
        with open(shared, "a") as log:
            log.write(f"shared rank {rank} step {state[0]:04d}\n")
        comm.allreduce(int(state[0]))
        time.sleep(step_ms / 1000)
        if cryo.checkpoint_point() == cryo.CHECKPOINTED:
            print(f"rank {rank}: checkpointed after step {state[0]}", file=sys.stderr, flush=True)
    cryo.finalize()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
