/*
 * state.h: the state suite's shared harness (tests/tests/state.rs).
 *
 * In the spirit of CRIU's zdtm: each "shape" is one way a real program
 * holds open files (a dup'ed fd, an O_APPEND log, an unlinked scratch file,
 * a MAP_SHARED file mapping, a stdio stream with a full buffer...). A shape
 * is four functions and a slice of the state region:
 *
 *   setup     fresh start (cryo_restored_epoch() == 0): open the files and
 *             record what the shape needs (fd numbers, pointers, counters)
 *             in its slice of the state region;
 *   reattach  restart: the fds, mappings and the state region are back;
 *             check them and rebuild what lives outside them (a FILE *);
 *   step      one iteration's I/O, done so that a lost, duplicated or
 *             overwritten write changes the output; returns a checksum of
 *             what it wrote and read, summed over ranks by MPI_Allreduce;
 *   finish    write the final outputs under OUTDIR and self-check.
 *
 * harness.c owns main(): MPI_Init, cryo_init_mpi, the 4096-byte "state"
 * region (a header with the iteration counter, then one slice per shape),
 * the loop with its safe point, and the report on stdout (rank 0):
 * "step N" after every step, "checkpointed after step N" when a checkpoint
 * captured the job, "resumed after step N from epoch E" after a restart,
 * and "OK" at the end. Every file left in OUTDIR is byte-identical between
 * an uninterrupted run and one that was checkpointed, killed and restarted.
 *
 * Build one shape (`prog` = the shape's name):
 *   mpicc -std=c11 -O2 -Wall -Werror -DSTATE_SHAPE=dup -I rank/include \
 *         -I tests/state tests/state/harness.c tests/state/dup.c \
 *         -L target/debug -lcryo_rank -Wl,-rpath,target/debug -o dup
 * Build `all` (every shape in one job): the same without -DSTATE_SHAPE,
 * with every shape's .c file.
 * Usage: prog --dir OUTDIR --iters K --step-ms MS
 */
#ifndef CRYO_STATE_H
#define CRYO_STATE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Every shape, in the order `all` sets them up and steps them. */
#define STATE_SHAPES(X) \
    X(dup)              \
    X(append)           \
    X(rdwr)             \
    X(pio)              \
    X(unlinked)         \
    X(recreated)        \
    X(devnull)          \
    X(dirfd)            \
    X(stdio_full)       \
    X(stdio_line)       \
    X(renamed)          \
    X(map_shared)       \
    X(map_private)      \
    X(stdout_file)      \
    X(own_buffer)       \
    X(reopened)         \
    X(mpiio)            \
    X(odirect)          \
    X(region_file)      \
    X(process)

/* What every shape function gets. */
struct ctx {
    const char *dir;   /* OUTDIR */
    int rank, size;    /* MPI_COMM_WORLD */
    uint64_t iters;    /* --iters */
    uint64_t epoch;    /* cryo_restored_epoch(): 0 on a fresh start */
};

struct shape {
    const char *name;
    size_t state_size; /* bytes of its slice (zeroed before setup) */
    void (*setup)(const struct ctx *, void *st);
    void (*reattach)(const struct ctx *, void *st);
    uint64_t (*step)(const struct ctx *, void *st, uint64_t iter);
    void (*finish)(const struct ctx *, void *st);
};

#define STATE_DECLARE_SHAPE(n) extern const struct shape shape_##n;
STATE_SHAPES(STATE_DECLARE_SHAPE)

/* --- helpers (harness.c); every failure reports and MPI_Aborts --------- */

/* Prints "state[shape] rank R: message" on stderr and aborts the job. */
_Noreturn void state_fail(const struct ctx *c, const char *shape, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same, with ": strerror(errno)" appended. */
_Noreturn void state_fail_errno(const struct ctx *c, const char *shape, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* In a shape's file, after `#define SHAPE "name"`. */
#define FAIL(c, ...) state_fail((c), SHAPE, __VA_ARGS__)
#define FAIL_ERRNO(c, ...) state_fail_errno((c), SHAPE, __VA_ARGS__)

/* OUTDIR/<name formatted>, into out (PATH_MAX bytes). */
void state_path(const struct ctx *c, char *out, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A 64-bit mix, for checksums and deterministic contents. */
uint64_t state_mix(uint64_t h, uint64_t v);

/* write(2)/pwrite(2) all of buf (retrying short writes and EINTR), or fail. */
void state_write_all(const struct ctx *c, const char *shape, int fd, const void *buf, size_t len,
                     const char *what);
void state_pwrite_all(const struct ctx *c, const char *shape, int fd, const void *buf, size_t len,
                      off_t off, const char *what);
/* read(2)/pread(2) exactly len bytes, or fail (an early EOF is a failure). */
void state_read_exact(const struct ctx *c, const char *shape, int fd, void *buf, size_t len,
                      const char *what);
void state_pread_exact(const struct ctx *c, const char *shape, int fd, void *buf, size_t len,
                       off_t off, const char *what);
/* The whole file behind fd (fstat size, pread from 0); malloc'd, *len set. */
char *state_slurp_fd(const struct ctx *c, const char *shape, int fd, size_t *len, const char *what);
/* The whole file at path; malloc'd, *len set. */
char *state_slurp_path(const struct ctx *c, const char *shape, const char *path, size_t *len);
/* Creates (or truncates) OUTDIR/name with exactly buf. */
void state_write_output(const struct ctx *c, const char *shape, const char *name, const void *buf,
                        size_t len);

/* Fails unless got == want, naming the first differing byte and showing
 * both sides around it. */
void state_expect_bytes(const struct ctx *c, const char *shape, const char *what, const char *got,
                        size_t got_len, const char *want, size_t want_len);
/* state_expect_bytes on the whole file at path (`what` names it). */
void state_expect_file(const struct ctx *c, const char *shape, const char *path, const char *what,
                       const char *want, size_t want_len);

/* A growable byte buffer, for building expected contents. */
struct state_buf {
    char *data;
    size_t len, cap;
};
void state_buf_add(struct state_buf *b, const void *data, size_t len);
void state_buf_printf(struct state_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void state_buf_free(struct state_buf *b);

/* Checks that fd is open with access mode `access` (O_RDONLY, O_WRONLY or
 * O_RDWR), that the status flags in `must` (say O_APPEND) are set, and that
 * close-on-exec is `cloexec`. */
void state_expect_fd(const struct ctx *c, const char *shape, int fd, int access, int must,
                     int cloexec, const char *what);
/* Checks fd's file offset. */
void state_expect_offset(const struct ctx *c, const char *shape, int fd, off_t want,
                         const char *what);
/* Checks the size of the file behind fd. */
void state_expect_size(const struct ctx *c, const char *shape, int fd, off_t want, const char *what);
/* Checks that [addr, addr+len) is mapped in this process. */
void state_expect_mapped(const struct ctx *c, const char *shape, const void *addr, size_t len,
                         const char *what);
/* From the /proc/self/maps line of the mapping that holds addr: its
 * permissions ("rw-s") and inode; returns 0 when there is none. */
int state_mapping_at(const void *addr, char perms[5], uint64_t *inode);

#endif /* CRYO_STATE_H */
