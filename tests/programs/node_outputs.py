"""node_outputs.py ITERS STEP_MS PARAMS: the Python form of node_outputs.c, a
program that keeps its files in the node's scratch and holds none of them open
at a checkpoint. At every step each rank reads PARAMS ("scale N") with
open(...).read(), adds step * scale to its sum, combines the sums, appends a
line to prog.<rank>.log (opened "a" and closed), and every 5 steps saves its
vector with np.save under a temporary name and moves it into place with
os.replace (snap.<rank>.<step>.npy). At its last step it loads every
snapshot with np.load and logs what each holds, so the log tells whether each
was there, whole, after a restart on another node."""

import os
import sys
import time

from mpi4py import MPI
import numpy as np

import cryo


def scale_of(params):
    with open(params) as f:
        word, value = f.read().split()
    assert word == "scale", f"{params} does not say 'scale N'"
    return int(value)


def main(iters, step_ms, params):
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    cryo.init_mpi(comm)
    state = cryo.region("state", 1, np.int64)
    vector = cryo.region("vector", 64, np.float64)
    # A share that is empty on every rank: registered, nothing to save.
    empty = cryo.region("empty", (0, 3), np.float64)
    assert empty.shape == (0, 3)
    log = f"prog.{rank}.log"
    if cryo.restored_epoch() == 0:
        open(log, "w").close()
    while state[0] < iters:
        scale = scale_of(params)
        state[0] += 1
        vector += state[0] * scale + rank
        total = comm.allreduce(float(vector.sum()))
        with open(log, "a") as f:
            f.write(f"step {state[0]} scale {scale} total {total!r}\n")
        if state[0] % 5 == 0:
            name = f"snap.{rank}.{state[0]:04d}.npy"
            with open(f"{name}.tmp", "wb") as f:
                np.save(f, vector)
            os.replace(f"{name}.tmp", name)
        time.sleep(step_ms / 1000)
        cryo.checkpoint_point()
    with open(log, "a") as f:
        for step in range(5, iters + 1, 5):
            name = f"snap.{rank}.{step:04d}.npy"
            f.write(f"read {name}: {np.load(name).sum()!r}\n")
    cryo.finalize()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
