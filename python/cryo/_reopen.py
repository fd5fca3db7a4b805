"""A restarted rank's set-up opening its output again with ``open(path,
"w")``: a program that opens its log at every start, instead of keeping the
restored fd, would empty the file the restart has just given back. So from
``init_mpi`` to the first ``checkpoint_point`` of a restarted rank, the
package's ``open`` asks the runtime (``cryo_reopen_restored``) whether the
rank held that file open for writing at the checkpoint, and if so opens the
restored fd instead: the file as it was then, at the offset it had, where
the uninterrupted run went on writing (``os.open`` gives that fd itself).
The runtime does the same for C's ``open`` and ``fopen``
(``rank/src/reopen/``); Python's are its own."""

import builtins
import io
import os


def _write_flags(mode):
    """``open(2)``'s flags for a text or binary ``mode`` that writes with
    truncation ("w", "w+", "wb"…), else None: "a" needs nothing (the
    package cuts such files back), "x" must make a new file, and a read
    keeps its own offset."""
    if not isinstance(mode, str) or "w" not in mode or "x" in mode:
        return None
    access = os.O_RDWR if "+" in mode else os.O_WRONLY
    return access | os.O_CREAT | os.O_TRUNC


class Window:
    """``builtins.open``, ``io.open`` (which ``pathlib`` calls) and
    ``os.open`` wrapped until :meth:`close`."""

    def __init__(self, reopen_restored):
        self.reopen_restored = reopen_restored
        self.original = builtins.open
        self.original_io = io.open
        self.original_os = os.open
        builtins.open = self.open
        io.open = self.open
        os.open = self.os_open

    def open(self, file, mode="r", *args, **kwargs):
        flags = _write_flags(mode)
        if flags is not None and "opener" not in kwargs and isinstance(file, (str, bytes, os.PathLike)):
            fd = self.reopen_restored(os.fsencode(os.fspath(file)), flags)
            if fd >= 0:
                return self.original(fd, mode, *args, **kwargs)
        return self.original(file, mode, *args, **kwargs)

    def os_open(self, path, flags, mode=0o777, *, dir_fd=None):
        """``os.open``: flags as they are, with the close-on-exec that
        ``os.open`` adds (PEP 446)."""
        if (
            dir_fd is None
            and flags & (os.O_WRONLY | os.O_RDWR)
            and isinstance(path, (str, bytes, os.PathLike))
        ):
            fd = self.reopen_restored(os.fsencode(os.fspath(path)), flags | os.O_CLOEXEC)
            if fd >= 0:
                return fd
        return self.original_os(path, flags, mode, dir_fd=dir_fd)

    def close(self):
        """Puts Python's ``open`` back (unless someone wrapped it since)."""
        if builtins.open == self.open:
            builtins.open = self.original
        if io.open == self.open:
            io.open = self.original_io
        if os.open == self.os_open:
            os.open = self.original_os
