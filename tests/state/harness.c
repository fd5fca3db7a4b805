/*
 * harness.c: main() and helpers of the state suite (see state.h).
 *
 * One binary runs one shape (built with -DSTATE_SHAPE=name) or every shape
 * together (`all`, built without it). The loop follows examples/c/heat2d.c:
 * the state is advanced before the safe point, so a restart resumes right
 * after the checkpointed step.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cryo.h"
#include "state.h"

/* --- which shapes this binary runs ------------------------------------- */

#define STATE_CAT_(a, b) a##b
#define STATE_CAT(a, b) STATE_CAT_(a, b)
#define STATE_STR_(a) #a
#define STATE_STR(a) STATE_STR_(a)

#ifdef STATE_SHAPE
static const struct shape *const shapes[] = {&STATE_CAT(shape_, STATE_SHAPE)};
static const char program[] = STATE_STR(STATE_SHAPE);
#else
#define STATE_REF_SHAPE(n) &shape_##n,
static const struct shape *const shapes[] = {STATE_SHAPES(STATE_REF_SHAPE)};
static const char program[] = "all";
#endif
#define NSHAPES (sizeof shapes / sizeof shapes[0])

/* --- the state region -------------------------------------------------- */

#define STATE_REGION_LEN 4096
#define STATE_MAGIC UINT64_C(0x6372796f53746174) /* "cryoStat" */
#define SLICE_ALIGN 64

/* The start of the region; the shapes' slices follow, 64-byte aligned. */
struct header {
    uint64_t magic;  /* set once setup is done */
    uint64_t iter;   /* steps completed */
    uint64_t iters;  /* --iters at setup: a restart must agree */
    uint64_t size;   /* world size at setup */
    uint64_t mix;    /* running hash of every step's Allreduce result */
    int32_t pipe_fd[2]; /* STATE_HOLD_PIPE=1: the held pipe (-1: none) */
};

static size_t align_up(size_t n) { return (n + SLICE_ALIGN - 1) / SLICE_ALIGN * SLICE_ALIGN; }

/* --- helpers ----------------------------------------------------------- */

_Noreturn static void vfail(const struct ctx *c, const char *shape, int err, const char *fmt, va_list ap) {
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    fprintf(stderr, "state[%s] rank %d: FAILED: %s%s%s\n", shape, c ? c->rank : -1, msg,
            err ? ": " : "", err ? strerror(err) : "");
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

void state_fail(const struct ctx *c, const char *shape, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfail(c, shape, 0, fmt, ap);
}

void state_fail_errno(const struct ctx *c, const char *shape, const char *fmt, ...) {
    int err = errno;
    va_list ap;
    va_start(ap, fmt);
    vfail(c, shape, err ? err : EIO, fmt, ap);
}

void state_path(const struct ctx *c, char *out, const char *fmt, ...) {
    char name[PATH_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    if (snprintf(out, PATH_MAX, "%s/%s", c->dir, name) >= PATH_MAX)
        state_fail(c, "harness", "path too long: %s/%s", c->dir, name);
}

uint64_t state_mix(uint64_t h, uint64_t v) {
    /* splitmix64's finaliser over h ^ v, plus a rotation so order matters. */
    uint64_t z = ((h << 7) | (h >> 57)) ^ (v + UINT64_C(0x9e3779b97f4a7c15));
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

void state_write_all(const struct ctx *c, const char *shape, int fd, const void *buf, size_t len,
                     const char *what) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) state_fail_errno(c, shape, "write to %s (fd %d)", what, fd);
        if (n == 0) state_fail(c, shape, "write to %s (fd %d) wrote nothing", what, fd);
        p += n;
        len -= (size_t)n;
    }
}

void state_pwrite_all(const struct ctx *c, const char *shape, int fd, const void *buf, size_t len,
                      off_t off, const char *what) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, off);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) state_fail_errno(c, shape, "pwrite to %s (fd %d) at %lld", what, fd, (long long)off);
        if (n == 0) state_fail(c, shape, "pwrite to %s (fd %d) wrote nothing", what, fd);
        p += n;
        off += n;
        len -= (size_t)n;
    }
}

void state_read_exact(const struct ctx *c, const char *shape, int fd, void *buf, size_t len,
                      const char *what) {
    char *p = buf;
    size_t want = len;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) state_fail_errno(c, shape, "read from %s (fd %d)", what, fd);
        if (n == 0)
            state_fail(c, shape, "read from %s (fd %d): end of file after %zu of %zu bytes", what, fd,
                       want - len, want);
        p += n;
        len -= (size_t)n;
    }
}

void state_pread_exact(const struct ctx *c, const char *shape, int fd, void *buf, size_t len,
                       off_t off, const char *what) {
    char *p = buf;
    size_t want = len;
    while (len > 0) {
        ssize_t n = pread(fd, p, len, off);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) state_fail_errno(c, shape, "pread from %s (fd %d) at %lld", what, fd, (long long)off);
        if (n == 0)
            state_fail(c, shape, "pread from %s (fd %d): end of file after %zu of %zu bytes at %lld",
                       what, fd, want - len, want, (long long)(off - (off_t)(want - len)));
        p += n;
        off += n;
        len -= (size_t)n;
    }
}

char *state_slurp_fd(const struct ctx *c, const char *shape, int fd, size_t *len, const char *what) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) state_fail_errno(c, shape, "fstat %s (fd %d)", what, fd);
    size_t n = (size_t)sb.st_size;
    char *buf = malloc(n + 1);
    if (!buf) state_fail(c, shape, "malloc %zu bytes", n + 1);
    state_pread_exact(c, shape, fd, buf, n, 0, what);
    buf[n] = '\0';
    *len = n;
    return buf;
}

char *state_slurp_path(const struct ctx *c, const char *shape, const char *path, size_t *len) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) state_fail_errno(c, shape, "open %s", path);
    char *buf = state_slurp_fd(c, shape, fd, len, path);
    close(fd);
    return buf;
}

void state_write_output(const struct ctx *c, const char *shape, const char *name, const void *buf,
                        size_t len) {
    char path[PATH_MAX];
    state_path(c, path, "%s", name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) state_fail_errno(c, shape, "create %s", path);
    state_write_all(c, shape, fd, buf, len, path);
    if (close(fd) != 0) state_fail_errno(c, shape, "close %s", path);
}

/* Escapes up to 40 bytes of buf from at for a one-line message. */
static void excerpt(char *out, size_t cap, const char *buf, size_t len, size_t at) {
    size_t o = 0;
    for (size_t i = at; i < len && i < at + 40 && o + 5 < cap; i++) {
        unsigned char ch = (unsigned char)buf[i];
        if (ch == '\n') o += (size_t)snprintf(out + o, cap - o, "\\n");
        else if (ch < 32 || ch > 126) o += (size_t)snprintf(out + o, cap - o, "\\x%02x", ch);
        else out[o++] = (char)ch;
    }
    out[o] = '\0';
}

void state_expect_bytes(const struct ctx *c, const char *shape, const char *what, const char *got,
                        size_t got_len, const char *want, size_t want_len) {
    if (got_len == want_len && memcmp(got, want, got_len) == 0) return;
    size_t at = 0;
    while (at < got_len && at < want_len && got[at] == want[at]) at++;
    size_t from = at > 20 ? at - 20 : 0;
    char g[256], w[256];
    excerpt(g, sizeof g, got, got_len, from);
    excerpt(w, sizeof w, want, want_len, from);
    state_fail(c, shape, "%s: %zu bytes, expected %zu; first difference at byte %zu\n"
               "  got      [%zu..]: \"%s\"\n  expected [%zu..]: \"%s\"",
               what, got_len, want_len, at, from, g, from, w);
}

void state_expect_file(const struct ctx *c, const char *shape, const char *path, const char *what,
                       const char *want, size_t want_len) {
    size_t len = 0;
    char *got = state_slurp_path(c, shape, path, &len);
    state_expect_bytes(c, shape, what, got, len, want, want_len);
    free(got);
}

void state_buf_add(struct state_buf *b, const void *data, size_t len) {
    if (b->len + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len + 1) cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p) {
            fprintf(stderr, "state: out of memory\n");
            MPI_Abort(MPI_COMM_WORLD, 1);
            exit(1);
        }
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    b->data[b->len] = '\0';
}

void state_buf_printf(struct state_buf *b, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        fprintf(stderr, "state: state_buf_printf: line too long\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
        exit(1);
    }
    state_buf_add(b, tmp, (size_t)n);
}

void state_buf_free(struct state_buf *b) {
    free(b->data);
    *b = (struct state_buf){0};
}

static const char *access_name(int access) {
    switch (access) {
    case O_RDONLY: return "O_RDONLY";
    case O_WRONLY: return "O_WRONLY";
    case O_RDWR: return "O_RDWR";
    default: return "?";
    }
}

void state_expect_fd(const struct ctx *c, const char *shape, int fd, int access, int must,
                     int cloexec, const char *what) {
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0) state_fail_errno(c, shape, "%s: fd %d is not open", what, fd);
    if ((fl & O_ACCMODE) != access)
        state_fail(c, shape, "%s: fd %d is %s, expected %s", what, fd, access_name(fl & O_ACCMODE),
                   access_name(access));
    if ((fl & must) != must)
        state_fail(c, shape, "%s: fd %d has status flags %#o, missing %#o", what, fd, fl, must & ~fl);
    int fdfl = fcntl(fd, F_GETFD);
    if (fdfl < 0) state_fail_errno(c, shape, "%s: F_GETFD on fd %d", what, fd);
    if (!!(fdfl & FD_CLOEXEC) != !!cloexec)
        state_fail(c, shape, "%s: fd %d close-on-exec is %s, expected %s", what, fd,
                   (fdfl & FD_CLOEXEC) ? "set" : "clear", cloexec ? "set" : "clear");
}

void state_expect_offset(const struct ctx *c, const char *shape, int fd, off_t want, const char *what) {
    off_t at = lseek(fd, 0, SEEK_CUR);
    if (at < 0) state_fail_errno(c, shape, "%s: lseek on fd %d", what, fd);
    if (at != want)
        state_fail(c, shape, "%s: fd %d is at offset %lld, expected %lld", what, fd, (long long)at,
                   (long long)want);
}

void state_expect_size(const struct ctx *c, const char *shape, int fd, off_t want, const char *what) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) state_fail_errno(c, shape, "%s: fstat fd %d", what, fd);
    if (sb.st_size != want)
        state_fail(c, shape, "%s: the file behind fd %d has %lld bytes, expected %lld", what, fd,
                   (long long)sb.st_size, (long long)want);
}

void state_expect_mapped(const struct ctx *c, const char *shape, const void *addr, size_t len,
                         const char *what) {
    /* msync fails with ENOMEM on an address range that is not mapped. */
    if (msync((void *)addr, len, MS_ASYNC) != 0)
        state_fail_errno(c, shape, "%s: %zu bytes at %p are not mapped", what, len, addr);
}

int state_mapping_at(const void *addr, char perms[5], uint64_t *inode) {
    FILE *maps = fopen("/proc/self/maps", "re");
    if (!maps) return 0;
    char line[4096];
    int found = 0;
    while (!found && fgets(line, sizeof line, maps)) {
        unsigned long start, end, offset, major, minor;
        unsigned long long ino;
        char p[5];
        if (sscanf(line, "%lx-%lx %4s %lx %lx:%lx %llu", &start, &end, p, &offset, &major, &minor,
                   &ino) == 7 &&
            start <= (unsigned long)(uintptr_t)addr && (unsigned long)(uintptr_t)addr < end) {
            memcpy(perms, p, 5);
            *inode = ino;
            found = 1;
        }
    }
    fclose(maps);
    return found;
}

/* --- main -------------------------------------------------------------- */

/*
 * STATE_HOLD_PIPE=1: on a fresh start, open a pipe and keep both ends open,
 * unused, for the whole run: something a restart cannot give back, which a
 * checkpoint must name (tests/tests/state_faults.rs). Its fds go in the
 * header and on stderr ("state: rank R holds a pipe: fds A and B
 * (pipe:[INODE])"). After a restart the pipe is gone, but its numbers must
 * stay taken, failing reads and writes with EBADF as a closed fd would, so
 * that no file opened since lands on them and receives what the program
 * meant for the pipe (check_lost_pipe). No output file changes.
 */
static void hold_pipe(const struct ctx *c, struct header *h) {
    h->pipe_fd[0] = h->pipe_fd[1] = -1;
    const char *want = getenv("STATE_HOLD_PIPE");
    if (!want || strcmp(want, "1") != 0) return;
    int fds[2];
    if (pipe(fds) != 0) state_fail_errno(c, "harness", "pipe (STATE_HOLD_PIPE)");
    struct stat sb;
    if (fstat(fds[0], &sb) != 0) state_fail_errno(c, "harness", "fstat the held pipe");
    h->pipe_fd[0] = fds[0];
    h->pipe_fd[1] = fds[1];
    fprintf(stderr, "state: rank %d holds a pipe: fds %d and %d (pipe:[%ju])\n", c->rank, fds[0], fds[1],
            (uintmax_t)sb.st_ino);
    fflush(stderr);
}

static void check_lost_pipe(const struct ctx *c, const struct header *h) {
    if (h->pipe_fd[0] < 0) return;
    int fresh = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fresh < 0) state_fail_errno(c, "harness", "open /dev/null");
    for (int end = 0; end < 2; end++) {
        int fd = h->pipe_fd[end];
        if (fcntl(fd, F_GETFD) < 0)
            state_fail(c, "harness", "after the restart the lost pipe's fd %d is free: a file opened now may take it", fd);
        char byte = 'x';
        errno = 0;
        ssize_t n = end ? write(fd, &byte, 1) : read(fd, &byte, 1);
        if (n != -1 || errno != EBADF)
            state_fail(c, "harness", "after the restart the lost pipe's fd %d %s (%zd, errno %d), expected EBADF", fd,
                       end ? "takes a write" : "gives a read", n, errno);
        if (fresh == fd) state_fail(c, "harness", "a file opened after the restart took the lost pipe's fd %d", fd);
    }
    close(fresh);
}

static void usage(void) {
    fprintf(stderr, "usage: %s --dir OUTDIR --iters K [--step-ms MS]\n", program);
    exit(2);
}

static void sleep_ms(uint64_t ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

int main(int argc, char **argv) {
    const char *dir = NULL;
    uint64_t iters = 0, step_ms = 0;
    for (int i = 1; i < argc; i += 2) {
        if (i + 1 >= argc) usage();
        if (!strcmp(argv[i], "--dir")) dir = argv[i + 1];
        else if (!strcmp(argv[i], "--iters")) iters = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--step-ms")) step_ms = strtoull(argv[i + 1], NULL, 10);
        else usage();
    }
    if (!dir || iters == 0) usage();

    MPI_Init(&argc, &argv);
    struct ctx c = {.dir = dir, .iters = iters};
    MPI_Comm_rank(MPI_COMM_WORLD, &c.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &c.size);

    /* STATE_PRE_INIT_FDS=N: open N more fds before cryo_init, as an MPI
     * library or launcher that opens more of them in one run than in
     * another would (tests/tests/state_faults.rs). Never used, never closed. */
    const char *pre = getenv("STATE_PRE_INIT_FDS");
    for (long n = pre ? strtol(pre, NULL, 10) : 0; n > 0; n--)
        if (open("/dev/null", O_RDONLY) < 0) state_fail_errno(&c, "harness", "open /dev/null (STATE_PRE_INIT_FDS)");

    int rc = cryo_init_mpi(MPI_COMM_WORLD);
    if (rc != CRYO_OK) {
        /* STATE_SLOW_FAILURE=S: a rank other than 0 waits S seconds before
         * it reports a failed cryo_init, as a rank the launcher kills
         * before it gets to print would (tests/tests/state_faults.rs). */
        const char *slow = getenv("STATE_SLOW_FAILURE");
        if (slow && c.rank != 0) sleep((unsigned)strtoul(slow, NULL, 10));
        state_fail(&c, "harness", "cryo_init_mpi: %s", cryo_strerror(rc));
    }
    c.epoch = cryo_restored_epoch();

    void *region = NULL;
    if ((rc = cryo_region("state", STATE_REGION_LEN, &region)) != CRYO_OK)
        state_fail(&c, "harness", "cryo_region(\"state\"): %s", cryo_strerror(rc));
    struct header *h = region;
    void *slice[NSHAPES];
    size_t at = align_up(sizeof *h);
    for (size_t i = 0; i < NSHAPES; i++) {
        slice[i] = (char *)region + at;
        at += align_up(shapes[i]->state_size);
    }
    if (at > STATE_REGION_LEN)
        state_fail(&c, "harness", "the shapes need %zu bytes of state, the region has %d", at,
                   STATE_REGION_LEN);

    if (c.epoch == 0) {
        if (h->magic != 0) state_fail(&c, "harness", "fresh start, but the state region is not zero");
        hold_pipe(&c, h);
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) state_fail_errno(&c, "harness", "mkdir %s", dir);
        h->iters = iters;
        h->size = (uint64_t)c.size;
        for (size_t i = 0; i < NSHAPES; i++) shapes[i]->setup(&c, slice[i]);
        h->magic = STATE_MAGIC;
    } else {
        if (h->magic != STATE_MAGIC)
            state_fail(&c, "harness", "restarted from epoch %" PRIu64 ", but the state region was not restored",
                       c.epoch);
        if (h->iters != iters || h->size != (uint64_t)c.size)
            state_fail(&c, "harness", "restarted with --iters %" PRIu64 " on %d ranks, set up with %" PRIu64
                       " on %" PRIu64, iters, c.size, h->iters, h->size);
        check_lost_pipe(&c, h);
        for (size_t i = 0; i < NSHAPES; i++) shapes[i]->reattach(&c, slice[i]);
        if (c.rank == 0) {
            printf("resumed after step %" PRIu64 " from epoch %" PRIu64 "\n", h->iter, c.epoch);
            fflush(stdout);
        }
    }

    while (h->iter < iters) {
        uint64_t local = (uint64_t)c.rank, sum = 0;
        for (size_t i = 0; i < NSHAPES; i++) local = state_mix(local, shapes[i]->step(&c, slice[i], h->iter));
        MPI_Allreduce(&local, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
        h->mix = state_mix(h->mix, sum);
        h->iter++;
        if (c.rank == 0) {
            printf("step %" PRIu64 "\n", h->iter);
            fflush(stdout);
        }
        rc = cryo_checkpoint_point();
        if (rc < 0) state_fail(&c, "harness", "cryo_checkpoint_point: %s", cryo_strerror(rc));
        if (rc == CRYO_CHECKPOINTED && c.rank == 0) {
            printf("checkpointed after step %" PRIu64 "\n", h->iter);
            fflush(stdout);
        }
        if (step_ms) sleep_ms(step_ms);
    }

    for (size_t i = 0; i < NSHAPES; i++) shapes[i]->finish(&c, slice[i]);

    /* What every rank saw of the whole job: the same on every rank, and the
     * same in every run. */
    char summary[256], name[64];
    int len = snprintf(summary, sizeof summary, "%s: %" PRIu64 " steps on %d ranks, mix %016" PRIx64 "\n",
                       program, h->iter, c.size, h->mix);
    snprintf(name, sizeof name, "summary.%d.out", c.rank);
    state_write_output(&c, "harness", name, summary, (size_t)len);

    MPI_Barrier(MPI_COMM_WORLD);
    if (c.rank == 0) {
        printf("OK\n");
        fflush(stdout);
    }
    cryo_finalize();
    MPI_Finalize();
    return 0;
}
