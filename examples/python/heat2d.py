#!/usr/bin/env python3
"""heat2d.py: the Python twin of examples/c/heat2d.c (mpi4py + NumPy).

A 2-D Jacobi heat stencil over MPI, checkpointed by cryo. The N x N grid is
split into blocks of rows with one halo row above and below. Both grids and
the loop state live in cryo regions, so a restarted run carries on from the
checkpointed iteration. Rank 0 appends the residual of every iteration to
a log through a buffered Python file over an fd that cryo re-opens on
restart (the package flushes Python's buffers at each checkpoint, so no
line written before it is lost), and at the end
gathers the grid, writes it, recomputes the run serially from the input and
checks that both agree bit for bit. Every value is computed with the same
floating-point operations in the same order as the C and Rust versions, so
the log and the grid are byte-identical to theirs.

Usage: heat2d.py --n N --iters K --input F --log F --output F [--step-ms MS]
       heat2d.py --make-input F --n N
"""

import math
import os
import sys
import time

import numpy as np

import cryo

# The meta region: the loop state (the C version's struct meta).
ITERATION, CURRENT, LOG_FD, INITIALISED = range(4)


def initial_value(n, row, col):
    if col == 0:
        return 100.0
    if col == n - 1 or row == 0 or row == n - 1:
        return 0.0
    x, y = col / n, row / n
    return 50.0 * math.exp(-((x - 0.6) * (x - 0.6) + (y - 0.4) * (y - 0.4)) * 40.0)


def make_input(path, n):
    field = np.array(
        [initial_value(n, row, col) for row in range(n) for col in range(n)], dtype=np.float64
    )
    field.tofile(path)


def sweep(src, dst, n, rows, first):
    """One sweep over local rows 1..rows of src (with halos) into dst;
    returns the largest change. Global boundary rows and columns keep
    their values."""
    lo, hi = 1, rows
    if first == 0:
        dst[1] = src[1]
        lo = 2
    if first + rows - 1 == n - 1:
        dst[rows] = src[rows]
        hi = rows - 1
    if lo > hi:
        return 0.0
    inner = slice(lo, hi + 1)
    dst[inner, 0] = src[inner, 0]
    dst[inner, n - 1] = src[inner, n - 1]
    # (up + down) + left) + right, then * 0.25: the C loop's order.
    value = 0.25 * (
        ((src[lo - 1 : hi, 1 : n - 1] + src[lo + 1 : hi + 2, 1 : n - 1]) + src[inner, 0 : n - 2])
        + src[inner, 2:n]
    )
    residual = max(0.0, float(np.max(np.abs(value - src[inner, 1 : n - 1]))))
    dst[inner, 1 : n - 1] = value
    return residual


def format_sci(value):
    """Rust's {:.17e}: mantissa with 17 decimals, exponent without padding."""
    text = "%.17e" % value
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if e else text


def parse(argv):
    options = {"n": 256, "iters": 100, "step-ms": 0}
    if len(argv) % 2:
        raise SystemExit(f"heat2d: option {argv[-1]} has no value")
    for key, value in zip(argv[::2], argv[1::2]):
        name = key[2:] if key.startswith("--") else None
        if name in ("n", "iters", "step-ms"):
            try:
                options[name] = int(value)
            except ValueError:
                raise SystemExit(f"heat2d: {key} needs a number, not {value!r}") from None
        elif name in ("input", "log", "output", "make-input"):
            options[name] = value
        else:
            print(f"heat2d: unknown option {key}", file=sys.stderr)
            raise SystemExit(2)
    return options


def main(argv):
    opts = parse(argv)
    n, iters, step_ms = opts["n"], opts["iters"], opts["step-ms"]
    if n < 4:
        print("heat2d: --n must be at least 4", file=sys.stderr)
        return 2
    if "make-input" in opts:
        make_input(opts["make-input"], n)
        return 0
    if not all(k in opts for k in ("input", "log", "output")):
        print(
            "usage: heat2d.py --input F --log F --output F [--n N] [--iters K] [--step-ms MS]",
            file=sys.stderr,
        )
        return 2

    from mpi4py import MPI  # initialises MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()

    def die(what):
        print(f"heat2d: error: {what}", file=sys.stderr, flush=True)
        comm.Abort(1)

    if size > n - 2:
        die("too many ranks for the grid")
    try:
        cryo.init_mpi(comm)
    except cryo.Error as err:
        die(f"cryo.init_mpi: {err}")
    restored = cryo.restored_epoch()

    first = rank * n // size
    rows = (rank + 1) * n // size - first
    meta = cryo.region("meta", 4, np.int64)
    grids = [
        cryo.region("grid-a", (rows + 2, n), np.float64),
        cryo.region("grid-b", (rows + 2, n), np.float64),
    ]

    if not meta[INITIALISED]:
        if restored:
            die("restarted, but meta was not restored")
        field = np.fromfile(opts["input"], dtype=np.float64, count=n * n)
        if field.size < n * n:
            die("input too small")
        grids[0][1 : rows + 1] = field.reshape(n, n)[first : first + rows]
        grids[1][:] = grids[0]
        meta[:] = 0
        meta[LOG_FD] = -1
        if rank == 0:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
            meta[LOG_FD] = os.open(opts["log"], flags, 0o644)
        meta[INITIALISED] = 1
    elif rank == 0:
        print(
            f"heat2d: restarted from epoch {restored} at iteration {meta[ITERATION]}",
            file=sys.stderr,
        )
    # Buffered, as Python programs write: the lines reach the file when the
    # buffer fills (a small one, so that progress shows as the run goes), at
    # each checkpoint, and at the end. Whatever its size, the latest lines
    # are in it at a checkpoint.
    log = os.fdopen(int(meta[LOG_FD]), "wb", buffering=1024, closefd=False) if rank == 0 else None

    local = np.zeros(1)
    residual = np.zeros(1)
    while meta[ITERATION] < iters:
        src, dst = grids[meta[CURRENT]], grids[meta[CURRENT] ^ 1]
        if rank > 0:
            request = comm.Isend([src[1], MPI.DOUBLE], dest=rank - 1, tag=0)
            comm.Recv([src[0], MPI.DOUBLE], source=rank - 1, tag=0)
            request.Wait()
        if rank + 1 < size:
            request = comm.Isend([src[rows], MPI.DOUBLE], dest=rank + 1, tag=0)
            comm.Recv([src[rows + 1], MPI.DOUBLE], source=rank + 1, tag=0)
            request.Wait()
        local[0] = sweep(src, dst, n, rows, first)
        comm.Allreduce(local, residual, op=MPI.MAX)
        meta[CURRENT] ^= 1
        meta[ITERATION] += 1
        if rank == 0:
            log.write(f"iter {meta[ITERATION]:05d} residual {format_sci(residual[0])}\n".encode())
        if step_ms:
            time.sleep(step_ms / 1000)
        if cryo.checkpoint_point() == cryo.CHECKPOINTED and rank == 0:
            print(f"heat2d: checkpointed after iteration {meta[ITERATION]}", file=sys.stderr)

    current = grids[meta[CURRENT]]
    if rank == 0:
        log.flush()
        full = np.empty((n, n))
        full[:rows] = current[1 : rows + 1]
        for other in range(1, size):
            f = other * n // size
            r = (other + 1) * n // size - f
            comm.Recv([full[f : f + r], MPI.DOUBLE], source=other, tag=1)
        try:
            full.tofile(opts["output"])
        except OSError as err:
            die(f"{opts['output']}: {err}")

        # Self-check against the serial run from the input.
        a = np.zeros((n + 2, n))
        a[1 : n + 1] = np.fromfile(opts["input"], dtype=np.float64, count=n * n).reshape(n, n)
        b = a.copy()
        for _ in range(iters):
            sweep(a, b, n, n, 0)
            a, b = b, a
        mismatches = int(np.count_nonzero(a[1 : n + 1].view(np.uint64) != full.view(np.uint64)))
        if mismatches:
            die(
                f"self-check FAILED: {mismatches} of {n * n} points differ from the serial run"
            )
        print(f"heat2d: OK {n}x{n} after {iters} iterations on {size} ranks", flush=True)
    else:
        comm.Send([current[1 : rows + 1], MPI.DOUBLE], dest=0, tag=1)
    if rank == 0 and cryo.restored_epoch():
        print(f"heat2d: prefetch: {cryo.prefetch_status()}", file=sys.stderr)
    cryo.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
