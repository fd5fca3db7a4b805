"""held_log.py DIR ITERS STEP_MS: opens its log the way many Python programs
do, with open(path, "w") (or pathlib's Path.open, or os.open with O_TRUNC)
at every start after cryo.init_mpi, and holds it for the whole run, writing one line per step. On a restart that open must
continue the file held at the checkpoint, not empty it. Used by
tests/tests/python.rs: after a checkpoint, a kill and a restart, every line
is in each rank's log exactly once."""

import os
import pathlib
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
    path = os.path.join(folder, f"held.{rank}.log")
    # Rank 0 through the builtin, rank 1 through pathlib (io.open), the
    # others through os.open.
    if rank == 0:
        log = open(path, "w")
    elif rank == 1:
        log = pathlib.Path(path).open("w")
    else:
        log = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "w")
    while state[0] < iters:
        state[0] += 1
        log.write(f"rank {rank} step {state[0]:04d}\n")
        log.flush()
        comm.allreduce(int(state[0]))
        time.sleep(step_ms / 1000)
        cryo.checkpoint_point()
    log.close()
    cryo.finalize()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
