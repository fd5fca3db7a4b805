"""Finding and loading the libcryo_rank flavour that matches mpi4py's MPI.

One build of libcryo_rank serves one MPI (their handles differ: ints in
MPICH, pointers in Open MPI), so the library is chosen by the MPI mpi4py
runs on, and checked: the library says which MPI it was built for
(``cryo_mpi_flavour``), and ``cryo_init_mpi_handle`` refuses a handle of
another size.
"""

import ctypes
import os

#: The library, or the folder holding it (``CRYO_RANK_LIB`` in core/src/env.rs).
ENV_RANK_LIB = "CRYO_RANK_LIB"

#: The library file of each MPI flavour.
LIBRARIES = {
    "mpich": "libcryo_rank.so",
    "openmpi": "libcryo_rank_openmpi.so",
}


#: ``cryo_flush_hook``: ``void (*)(void *arg)``.
FLUSH_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class Error(RuntimeError):
    """A cryo call failed; ``code`` is the ``cryo_status`` (0 for errors
    found before calling the library)."""

    def __init__(self, message, code=0):
        super().__init__(message)
        self.code = code


def mpi_flavour(library_version):
    """The flavour (``mpich`` or ``openmpi``) of an MPI, from
    ``MPI.Get_library_version()``."""
    first = library_version.strip().splitlines()[0] if library_version.strip() else ""
    if first.startswith("Open MPI"):
        return "openmpi"
    if any(name in first for name in ("MPICH", "Intel(R) MPI", "MVAPICH", "CRAY MPICH")):
        return "mpich"
    raise Error(
        f"mpi4py runs on an MPI cryo has no build for ({first!r}); "
        "cryo supports MPICH (libcryo_rank.so) and Open MPI (libcryo_rank_openmpi.so)"
    )


def _candidates(name):
    """Where the library named ``name`` is looked for, in order."""
    configured = os.environ.get(ENV_RANK_LIB)
    if configured:
        # Set: the only place looked at, so a wrong setting is never
        # papered over by another copy.
        return [os.path.join(configured, name) if os.path.isdir(configured) else configured]
    here = os.path.dirname(os.path.abspath(__file__))
    return [os.path.join(here, name), name]


def load(library_version):
    """Loads the libcryo_rank for the MPI described by ``library_version``
    and declares its C API."""
    flavour = mpi_flavour(library_version)
    name = LIBRARIES[flavour]
    tried = []
    for candidate in _candidates(name):
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as err:
            tried.append(f"{candidate}: {err}")
            continue
        _declare(lib, candidate)
        built = lib.cryo_mpi_flavour().decode()
        if built != flavour:
            raise Error(
                f"{candidate} was built for {built}, but mpi4py runs on {flavour} "
                f"({library_version.strip().splitlines()[0]}): use {name}"
            )
        return lib
    raise Error(
        f"cannot load {name} (cryo's runtime for {flavour}, the MPI mpi4py runs on); "
        f"set {ENV_RANK_LIB} to the library or the folder holding it. Tried: "
        + "; ".join(tried)
    )


def _declare(lib, path):
    """Declares the C API of ``rank/include/cryo.h`` on ``lib``."""
    c_int, c_size_t, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
    signatures = {
        "cryo_mpi_flavour": ([], ctypes.c_char_p),
        "cryo_init_mpi_handle": ([c_void_p, c_size_t], c_int),
        "cryo_region": ([ctypes.c_char_p, c_size_t, ctypes.POINTER(c_void_p)], c_int),
        "cryo_checkpoint_point": ([], c_int),
        "cryo_restored_epoch": ([], ctypes.c_uint64),
        "cryo_prefetch_status": ([ctypes.c_char_p, c_size_t], c_size_t),
        "cryo_finalize": ([], c_int),
        "cryo_strerror": ([c_int], ctypes.c_char_p),
        "cryo_at_checkpoint": ([FLUSH_HOOK, c_void_p], c_int),
        "cryo_note_appended": ([ctypes.c_char_p], c_int),
        "cryo_note_node_file": ([ctypes.c_char_p, c_int], c_int),
        "cryo_note_renamed": ([ctypes.c_char_p, ctypes.c_char_p], c_int),
        "cryo_reopen_restored": ([ctypes.c_char_p, c_int], c_int),
    }
    for function, (argtypes, restype) in signatures.items():
        try:
            entry = getattr(lib, function)
        except AttributeError:
            raise Error(
                f"{path} has no {function}: it is not a libcryo_rank with MPI support "
                "of this version"
            ) from None
        entry.argtypes = argtypes
        entry.restype = restype
