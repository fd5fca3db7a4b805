"""Files a program appends to and closes between checkpoints: a log written
with ``with open(path, "a")`` at each step.

The runtime restores the files a rank holds open at the checkpoint; a file
closed at that moment is not in its view, so the lines appended after the
checkpoint would stay and the restarted run would append them again. So the
package watches opens for appending (an audit hook, installed by
``init_mpi``), records the size of each such file at every checkpoint in a
region of its own, and on a restart cuts each back to that size, collectively,
before the program goes on. Files opened in other modes are not cut back (one
rewritten with ``"w"`` is rewritten by the restarted run too), but the runtime
is told of them (``cryo_note_node_file``): one on a filesystem of the node
(``np.save`` to a local scratch, an input read there) is saved with each
checkpoint that finds it closed, so a restart on another node finds it.
"""

import json
import os
import struct
import sys

#: The region holding the table (a name the package keeps for itself).
REGION = "cryo-python:appended"
#: Its size: room for a few thousand paths.
REGION_BYTES = 256 << 10

_LENGTH = struct.Struct("<Q")


class Appended:
    """The files opened for appending since ``init_mpi``, and their table
    in the region ``table`` (a NumPy ``uint8`` array)."""

    def __init__(self, table, note=None, note_other=None, note_renamed=None):
        self.table = table
        self.paths = {}  # absolute path -> None, in the order first seen
        # Tells the runtime of each open (cryo_note_appended), which then
        # measures the file at checkpoints that find it closed and saves
        # it when it is on a filesystem of the node.
        self.note = note
        # Tells it of each other open, with whether it writes
        # (cryo_note_node_file).
        self.note_other = note_other
        # Tells it of each rename (os.rename, os.replace), before it is
        # made: a file written under a temporary name and renamed into
        # place is saved under its final name (cryo_note_renamed).
        self.note_renamed = note_renamed

    def audit(self, event, args):
        """``sys.addaudithook`` hook: notes opens with ``O_APPEND``, and
        tells the runtime of the others and of renames."""
        if event == "os.rename":
            self._renaming(args)
            return
        if event != "open":
            return
        try:
            path, mode, flags = args
            if isinstance(path, int):
                return
            if not isinstance(flags, int):
                flags = _flags_of(mode)
            path = os.path.abspath(os.fsdecode(path))
            if not flags & os.O_APPEND:
                if self.note_other is not None:
                    self.note_other(path, flags & os.O_ACCMODE != os.O_RDONLY)
                return
            self.paths[path] = None
            if self.note is not None:
                self.note(path)
        except Exception:  # noqa: BLE001: an audit hook must never raise
            pass

    def _renaming(self, args):
        """The ``os.rename`` audit event (``os.rename``, ``os.replace``):
        its paths, relative to their directory fds when given."""
        try:
            src, dst, src_dir_fd, dst_dir_fd = args
            old, new = _absolute(src, src_dir_fd), _absolute(dst, dst_dir_fd)
            if old in self.paths:
                # A log appended to and renamed (rotated): its new name is
                # cut back at a restart too.
                self.paths[new] = None
                if self.note is not None:
                    self.note(new)
            if self.note_renamed is not None:
                self.note_renamed(old, new)
        except Exception:  # noqa: BLE001: an audit hook must never raise
            pass

    def record(self):
        """Writes each file's size into the table (at a checkpoint, after
        the flush). Returns the paths that did not fit."""
        rows = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                continue  # removed since: nothing to cut back
            rows.append([path, st.st_size, st.st_dev, st.st_ino])
        left_out = []
        while True:
            data = json.dumps(rows).encode()
            if _LENGTH.size + len(data) <= len(self.table):
                break
            left_out.append(rows.pop(0)[0])
        self.table[: _LENGTH.size] = memoryview(_LENGTH.pack(len(data)))
        self.table[_LENGTH.size : _LENGTH.size + len(data)] = memoryview(data)
        return left_out

    def saved(self):
        """The table as the checkpoint left it: ``[path, size, dev, ino]``."""
        (length,) = _LENGTH.unpack(bytes(self.table[: _LENGTH.size]))
        if length == 0:
            return []
        if length > len(self.table) - _LENGTH.size:
            raise ValueError(f"the table says {length} bytes, the region holds fewer")
        return json.loads(bytes(self.table[_LENGTH.size : _LENGTH.size + length]))

    def cut_back(self, comm):
        """On a restart: every file back at its size at the checkpoint (the
        largest any rank recorded), cut by the lowest rank that recorded it,
        before any rank goes on. Returns what it did, as lines for stderr."""
        rank = comm.Get_rank()
        try:
            mine = self.saved()
        except ValueError as err:
            mine = []
            said = [f"cryo: the table of appended files is damaged ({err}); none cut back"]
        else:
            said = []
        everyone = comm.allgather(mine)
        # A file is its path and inode: the device number of one file on a
        # shared filesystem differs between hosts (each numbers its mounts),
        # its inode does not.
        sizes = {}
        for who, rows in enumerate(everyone):
            for path, size, _dev, ino in rows:
                key = (path, ino)
                largest, cutter = sizes.get(key, (size, who))
                sizes[key] = (max(largest, size), cutter)
        for (path, ino), (size, cutter) in sizes.items():
            self.paths[path] = None
            if cutter != rank:
                continue
            try:
                st = os.stat(path)
            except OSError:
                said.append(f"cryo: {path}, appended to before the checkpoint, is gone")
                continue
            if st.st_ino != ino:
                # At its size at the checkpoint it was made again from the
                # checkpoint (a file of another node's own filesystem).
                if st.st_size != size:
                    said.append(f"cryo: {path} is another file than at the checkpoint; left as it is")
            elif st.st_size < size:
                said.append(
                    f"cryo: {path} is {st.st_size} bytes, shorter than its {size} at the "
                    "checkpoint; left as it is"
                )
            elif st.st_size > size:
                try:
                    os.truncate(path, size)
                except OSError as err:
                    said.append(f"cryo: cannot cut {path} back to its {size} bytes: {err}")
        comm.Barrier()
        return said


def _absolute(path, dir_fd):
    """``path`` (relative to the directory fd ``dir_fd``, or to the working
    directory when it is -1 or None) as an absolute path."""
    path = os.fsdecode(path)
    if dir_fd is None or dir_fd < 0 or os.path.isabs(path):
        return os.path.abspath(path)
    return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)


def _flags_of(mode):
    """The ``os.open`` flags that matter here of an ``open`` mode."""
    mode = mode if isinstance(mode, str) else "r"
    if "a" in mode:
        return os.O_APPEND | os.O_WRONLY
    if "w" in mode or "x" in mode or "+" in mode:
        return os.O_WRONLY
    return os.O_RDONLY


def install(table, note=None, note_other=None, note_renamed=None):
    """Starts watching opens for appending, telling ``note`` of each,
    ``note_other`` of every other open (path, whether it writes) and
    ``note_renamed`` of every rename (old path, new path). Audit hooks
    cannot be removed, so one is installed per process."""
    appended = Appended(table, note, note_other, note_renamed)
    sys.addaudithook(appended.audit)
    return appended
