"""cryo for mpi4py programs: checkpoint/restart through libcryo_rank.

Call :func:`init_mpi` once after MPI is initialised (importing
``mpi4py.MPI`` does it), keep the program's state in :func:`region` arrays,
call :func:`checkpoint_point` where the state is consistent (the same
number of times on every rank), and :func:`finalize` before MPI ends. On a
restart, :func:`init_mpi` puts the rank's files back and :func:`region`
hands back the arrays' contents at the checkpoint. At each checkpoint the
package flushes Python's open files (:func:`flush_python_files`), so that
what ``print`` and ``file.write`` buffered is in the files it records, and
records the size of every file opened for appending since :func:`init_mpi`,
open or closed; a restart cuts those back to that size (see ``_appended``),
so a log reopened with ``"a"`` at each step does not get the steps after the
checkpoint twice. A restarted rank that opens a log it held at the checkpoint
again with ``"w"`` before its first :func:`checkpoint_point` gets that file
as it was at the checkpoint, not emptied (see ``_reopen``).
"""

import ctypes
import gc
import io
import itertools
import math
import os
import sys

import numpy as np

from . import _appended, _reopen
from ._lib import ENV_RANK_LIB, FLUSH_HOOK, LIBRARIES, Error, load, mpi_flavour

__all__ = [
    "ABORTED",
    "CHECKPOINTED",
    "CONTINUE",
    "ENV_RANK_LIB",
    "Error",
    "LIBRARIES",
    "checkpoint_point",
    "finalize",
    "flush_python_files",
    "init_mpi",
    "mpi_flavour",
    "prefetch_status",
    "region",
    "restored_epoch",
]

#: :func:`checkpoint_point`: no checkpoint was pending.
CONTINUE = 0
#: :func:`checkpoint_point`: the rank was checkpointed and resumed.
CHECKPOINTED = 1
#: :func:`checkpoint_point`: the agent abandoned the checkpoint.
ABORTED = 2

_lib = None
# The files opened for appending (see _appended), once init_mpi has run.
_appended_files = None
#: The restarted set-up's window (``_reopen``), until the first safe point.
_reopen_window = None


def flush_python_files():
    """Flushes ``sys.stdout``, ``sys.stderr`` and every open Python file
    object that writes (``open()``, ``os.fdopen``, ``io`` streams): what
    Python buffers is not in the files until flushed, and a restart brings
    files back as they were on disk at the checkpoint. :func:`init_mpi`
    registers it with the runtime, which calls it at each checkpoint before
    recording the rank's files. Errors (a closed pipe) are left to the next
    write to raise."""
    tracked = gc.get_objects()
    # Picked by type with C-level loops: about 90 ms per million objects
    # the garbage collector tracks, where isinstance on each took 220 ms.
    kinds = {kind for kind in set(map(type, tracked)) if _is_io(kind)}
    streams = [sys.stdout, sys.stderr]
    streams += itertools.compress(tracked, map(kinds.__contains__, map(type, tracked)))
    del tracked
    for stream in streams:
        try:
            if stream is not None and not stream.closed and stream.writable():
                stream.flush()
        except Exception:  # noqa: BLE001: the program's next write reports it
            pass


def _is_io(kind):
    try:
        return issubclass(kind, io.IOBase)
    except Exception:  # noqa: BLE001: a type whose metaclass refuses the check
        return False


def _flush_hook(_arg):
    try:
        flush_python_files()
        if _appended_files is not None:
            left_out = _appended_files.record()
            if left_out:
                print(
                    f"cryo: warning: {len(left_out)} files opened for appending are not "
                    f"recorded at this checkpoint (the table is full), such as {left_out[0]}: "
                    "a restart leaves what was appended to them after it",
                    file=sys.stderr,
                )
    except BaseException:  # noqa: BLE001: nothing may unwind into C
        pass


# Kept for the life of the process: the runtime holds its address.
_FLUSH_HOOK = FLUSH_HOOK(_flush_hook)


def _runtime():
    if _lib is None:
        raise Error("cryo is not initialised: call cryo.init_mpi(comm) first", 2)
    return _lib


def _check(code):
    """Raises :class:`Error` with the library's message for a failed call."""
    if code != 0:
        raise Error(_lib.cryo_strerror(code).decode(errors="replace"), code)


def init_mpi(comm=None):
    """Registers this rank with its node's cryo agent and attaches cryo's
    quiesce protocol to duplicates of ``comm`` (an ``mpi4py.MPI.Comm``,
    default ``COMM_WORLD``). Loads the libcryo_rank of mpi4py's MPI first
    (see :data:`ENV_RANK_LIB`). On a restart, the rank's files are back
    when it returns."""
    global _lib, _appended_files, _reopen_window
    from mpi4py import MPI

    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"cryo.init_mpi needs an mpi4py communicator, not {type(comm).__name__}")
    if _lib is not None:
        raise Error("cryo is already initialised in this process", 3)
    lib = load(MPI.Get_library_version())
    size = MPI._sizeof(comm)
    handle = MPI._handleof(comm)
    try:
        raw = handle.to_bytes(size, sys.byteorder, signed=handle < 0)
    except OverflowError:
        raise Error(f"mpi4py's handle {handle:#x} does not fit its size of {size} bytes") from None
    buffer = ctypes.create_string_buffer(raw, size)
    _lib = lib
    try:
        _check(lib.cryo_init_mpi_handle(buffer, size))
    except Error:
        _lib = None
        raise
    _check(lib.cryo_at_checkpoint(_FLUSH_HOOK, None))
    table = region(_appended.REGION, _appended.REGION_BYTES, np.uint8)
    appended = _appended.install(
        table,
        lambda path: lib.cryo_note_appended(os.fsencode(path)),
        lambda path, written: lib.cryo_note_node_file(os.fsencode(path), int(written)),
        lambda old, new: lib.cryo_note_renamed(os.fsencode(old), os.fsencode(new)),
    )
    if restored_epoch():
        for line in appended.cut_back(comm):
            print(line, file=sys.stderr)
        _reopen_window = _reopen.Window(lib.cryo_reopen_restored)
    _appended_files = appended


def region(name, shape, dtype=np.float64):
    """A NumPy array of ``shape`` and ``dtype`` over the region ``name``: at
    a fixed address, zero on a fresh start, its contents at the checkpoint
    on a restart. The array stays valid for the life of the process."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"a region name is a non-empty string without NUL, not {name!r}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise ValueError(f"a region's shape is non-negative integers, not {shape!r}")
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise ValueError(f"a region holds plain data, not {dtype} (Python objects)")
    count = math.prod(int(d) for d in shape)
    nbytes = count * dtype.itemsize
    lib = _runtime()
    if nbytes >= 1 << (8 * ctypes.sizeof(ctypes.c_size_t) - 1):
        # ctypes would pass the size cut down to 64 bits: a small region.
        raise Error(f"region {name!r} of {nbytes} bytes is larger than any address space", 5)
    address = ctypes.c_void_p()
    _check(lib.cryo_region(name.encode(), nbytes, ctypes.byref(address)))
    memory = (ctypes.c_char * nbytes).from_address(address.value)
    return np.frombuffer(memory, dtype=dtype, count=count).reshape(shape)


def checkpoint_point():
    """The safe point: call it where the rank's state is consistent, the
    same number of times on every rank. Returns :data:`CONTINUE`,
    :data:`CHECKPOINTED` or :data:`ABORTED`. A restarted rank runs the
    program again and carries on from the loop counter in its region, so
    count the step before the safe point (``state[0] += 1`` first), or the
    restart runs the checkpoint's step twice."""
    global _reopen_window
    if _reopen_window is not None:
        _reopen_window.close()
        _reopen_window = None
    code = _runtime().cryo_checkpoint_point()
    if code < 0:
        _check(-code)
    return code


def prefetch_status():
    """Where this rank's prefetch of its chunks stands, as a line of text:
    on a restart, libcryo_rank reads the rank's chunks from the store as
    soon as it is loaded ("none" when it did not)."""
    lib = _runtime()
    buf = ctypes.create_string_buffer(256)
    lib.cryo_prefetch_status(buf, len(buf))
    return buf.value.decode(errors="replace")


def restored_epoch():
    """The epoch this process restarted from, or 0 on a fresh start."""
    return int(_runtime().cryo_restored_epoch())


def finalize():
    """Leaves cryo (collective over the communicator given to
    :func:`init_mpi`); call it before MPI ends. Regions stay mapped."""
    global _reopen_window
    if _reopen_window is not None:
        _reopen_window.close()
        _reopen_window = None
    _check(_runtime().cryo_finalize())
