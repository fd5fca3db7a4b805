/*
 * cryo.h: the C API of cryo's rank runtime (libcryo_rank).
 *
 * Link with -lcryo_rank (shared or static; the static library also needs
 * -lpthread -ldl -lm). Every function returns a cryo_status code and never
 * lets a Rust panic unwind into C. cryo_strerror(code) gives the message of
 * the last error of that code on the calling thread.
 *
 * Environment: CRYO_AGENT_SOCKET (the node agent; unset = run alone, no
 * checkpoints), CRYO_JOB, CRYO_RANK (or PMI_RANK, OMPI_COMM_WORLD_RANK,
 * SLURM_PROCID), CRYO_TOKEN, CRYO_REGION_BASE (hex address of the region
 * reservation), CRYO_FILE_POLICY (truncate | keep).
 */
#ifndef CRYO_H
#define CRYO_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cryo_status {
    CRYO_OK = 0,
    CRYO_ERR_INVALID_ARGUMENT = 1,
    CRYO_ERR_NOT_INITIALIZED = 2,
    CRYO_ERR_ALREADY_INITIALIZED = 3,
    CRYO_ERR_AGENT = 4,
    CRYO_ERR_REGION = 5,
    CRYO_ERR_RESTORE = 6,
    CRYO_ERR_CHECKPOINT = 7,
    CRYO_ERR_PANIC = 8,
    CRYO_ERR_CONFIG = 9
} cryo_status;

/* Results of cryo_checkpoint_point (>= 0); errors are negative statuses. */
#define CRYO_CONTINUE 0
#define CRYO_CHECKPOINTED 1
#define CRYO_ABORTED 2

/* Connects to the node agent and registers this rank. Call it early (right
 * after MPI_Init): what is open at this point other than regular files and
 * directories is taken to be the MPI library's or the launcher's. On a
 * restart, before this returns, the rank's files are back at their saved fd
 * numbers, flags and offsets (dups sharing one offset again, unlinked files
 * recreated from their saved contents, directories and /dev/null & co
 * reopened), files written since the checkpoint are set back to their state
 * at it, and the file mappings the program made itself are back at their
 * addresses. Output buffered in FILE streams and Fortran units is flushed at
 * each checkpoint (output buffered elsewhere: see cryo_at_checkpoint);
 * fdopen the restored fd again after a restart. */
int cryo_init(void);

/* For MPI programs (include <mpi.h> before cryo.h): like cryo_init, and
 * attaches cryo's quiesce protocol to two duplicates of comm, so that all
 * ranks checkpoint at the same safe point with no message in flight. The
 * ranks talk only when a checkpoint is requested. The program owns
 * MPI_Init/MPI_Finalize; call cryo_finalize before MPI_Finalize (it is
 * collective over comm), and call cryo_checkpoint_point the same number of
 * times on every rank. MPI_COMM_NULL is refused with
 * CRYO_ERR_INVALID_ARGUMENT.
 *
 * One library per MPI: link -lcryo_rank with MPICH (and MPIs of its ABI),
 * -lcryo_rank_openmpi with Open MPI. cryo_init_mpi passes the address and
 * size of comm, so a program linked with the other flavour gets
 * CRYO_ERR_CONFIG naming the library to link, never a crash. */
#if defined(MPI_VERSION)
int cryo_init_mpi_handle(const void *comm, size_t comm_bytes);
static inline int cryo_init_mpi(MPI_Comm comm) {
    return cryo_init_mpi_handle(&comm, sizeof comm);
}

/* cryo_init_mpi for a Fortran communicator handle (what `use mpi` gives,
 * or MPI_VAL of `use mpi_f08`'s type(MPI_Comm)); the runtime converts it
 * with MPI_Comm_f2c of the MPI it was built for. The Fortran module `cryo`
 * (rank/fortran/cryo.F90) calls this; C programs pass their MPI_Comm to
 * cryo_init_mpi. */
int cryo_init_mpi_f(MPI_Fint comm);
#endif

/* The MPI this library was built for: "mpich" (int handles), "openmpi"
 * (pointer handles), or "none". A static string. */
const char *cryo_mpi_flavour(void);

/* An anonymous region of len bytes at a deterministic address, stored in
 * *out. On a restart, a region of the same name gets its saved contents.
 * len == 0 (a rank whose share is empty) registers the name with nothing
 * to save and stores an aligned pointer, not NULL, that must not be read. */
int cryo_region(const char *name, size_t len, void **out);

/* A region backed by the file path from offset (a multiple of 4096);
 * len == 0 maps the rest of the file. shared != 0: MAP_SHARED; on a restart
 * the file gets back its contents at the checkpoint (unless
 * CRYO_FILE_POLICY=keep) during cryo_init, and is mapped again;
 * shared == 0: MAP_PRIVATE, contents saved.
 * *out_len (if not NULL) receives the length. */
int cryo_region_file(const char *name, const char *path, uint64_t offset, size_t len,
                     int shared, void **out, size_t *out_len);

/* Registers an application-owned buffer; its saved contents are copied back
 * on a restart. ptr must stay valid for the life of the process. len == 0
 * (an empty share; ptr may then be NULL) registers the name with nothing to
 * save; a restart that registers it with another length is refused. */
int cryo_protect(const char *name, void *ptr, size_t len);

/* The safe point: call where the state is consistent. Costs one load when
 * no checkpoint is pending (MPI programs: also a counter, and one MPI_Test
 * every 100 ms). Returns CRYO_CONTINUE, CRYO_CHECKPOINTED or
 * CRYO_ABORTED, or -CRYO_ERR_CHECKPOINT on error. A restarted rank runs
 * main again and carries on from the loop counter in its region, so count
 * the step before the safe point (step; iter++; cryo_checkpoint_point()),
 * or the restart runs the checkpoint's step twice. Before cryo_init and
 * after cryo_finalize it returns CRYO_CONTINUE and takes no checkpoint (the
 * safe point stays one load; a loop that runs on after cryo_finalize is
 * never checkpointed there). */
int cryo_checkpoint_point(void);

/* The epoch this process restarted from, or 0 on a fresh start. */
uint64_t cryo_restored_epoch(void);

/* Where this process's prefetch stands: on a restart under cryo run, the
 * library asks the kernel to read the rank's chunks into the page cache
 * while the launcher and MPI_Init run (CRYO_PREFETCH=0 turns it off).
 * Writes a line such as "epoch 3: asked for 52428800 of 52428800 bytes in
 * 1 ms (2 requests, 0 failed)",
 * or "none", into buf, NUL-terminated and cut to len bytes; returns the
 * length of the whole line, as snprintf does. buf may be NULL if len is 0. */
size_t cryo_prefetch_status(char *buf, size_t len);

/* Registers flush(arg), called at each checkpoint on the thread in
 * cryo_checkpoint_point, before the rank's files are recorded (and before
 * the runtime flushes the FILE streams and Fortran units itself). For
 * output the program buffers on its own: C++ streams (std::ofstream, or
 * std::cout after sync_with_stdio(false)), a logger's buffer. Without it,
 * bytes still buffered at a checkpoint are lost on a restart, since files
 * come back as they were on disk at the checkpoint. Hooks run in the order
 * registered, for the life of the process; arg must stay valid that long,
 * and flush must not throw. May be called before cryo_init. NULL flush:
 * CRYO_ERR_INVALID_ARGUMENT. The Python package registers one that flushes
 * Python's open files. */
typedef void (*cryo_flush_hook)(void *arg);
int cryo_at_checkpoint(cryo_flush_hook flush, void *arg);

/* For language bindings: notes path (absolute) as a file the program
 * appends to and closes through I/O the runtime does not see (fclose,
 * close and Fortran's CLOSE are seen). At each checkpoint that finds it
 * closed it is measured, so a restart cuts back what was appended after the
 * checkpoint, and on a filesystem of the node (tmpfs, a local disk) its
 * contents are saved, so a restart elsewhere makes it again. The Python
 * package calls it for each file opened for appending. */
int cryo_note_appended(const char *path);

/* For language bindings: notes path (absolute) as a file the program reads
 * (written == 0) or writes other than by appending (written != 0) through
 * I/O the runtime does not see. At each checkpoint that finds it closed on
 * a filesystem of the node (tmpfs, a local disk, not the store's), its
 * contents are saved, so a restart on another node makes it again: with its
 * saved bytes when the program wrote it, left as it is where found when it
 * only read it. Not cut back. Paths under /usr, /etc, /proc and the like
 * are ignored. The Python package calls it for each other file opened. */
int cryo_note_node_file(const char *path, int written);

/* For language bindings: the file at from (absolute) is about to be
 * renamed to (absolute) through calls the runtime does not see. A file
 * noted with cryo_note_node_file at from is noted at to as well (a
 * checkpoint forgets the name that is gone), so output written under a
 * temporary name and renamed into place is saved under its final name. The runtime's own rename and
 * renameat do this for C, C++ and Fortran. The Python package calls it for
 * os.rename and os.replace. */
int cryo_note_renamed(const char *from, const char *to);

/* For a restarted rank's set-up that opens a file again in a way the
 * runtime does not see: the fd the restart gave back for path, if the rank
 * held it open for writing at the checkpoint and an open with flags
 * (O_WRONLY or O_RDWR, O_TRUNC, O_APPEND, O_CLOEXEC) is to continue it;
 * -1 otherwise. Each restored fd is given once, and only before the rank's
 * first safe point. The runtime's own open, openat, creat and fopen do
 * this for C and C++ callers (not for a Fortran OPEN: a unit counts its
 * position from zero; open a log with position='append' instead); the
 * Python package calls it from open() until the first checkpoint_point. */
int cryo_reopen_restored(const char *path, int flags);

/* Says goodbye to the agent; regions stay mapped. */
int cryo_finalize(void);

/* The message for a status code (negative codes accepted). */
const char *cryo_strerror(int code);

#ifdef __cplusplus
}
#endif

#endif /* CRYO_H */
