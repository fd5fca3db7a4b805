/*
 * dirfd: a directory fd, open(OUTDIR/dirfd.<rank>, O_DIRECTORY|O_RDONLY),
 * through which everything in that directory is reached with openat():
 *   - a log opened once at setup with openat(dirfd, "log", O_APPEND...)
 *     and appended to every step (an fd whose path only /proc knows);
 *   - every step creates step.NNN (O_CREAT|O_TRUNC, written whole, closed)
 *     and rewrites "latest"; it first reads step.<previous> back through
 *     the dirfd and checks it.
 * Whole-file rewrites are what a restart can replay safely (the steps run
 * after the checkpoint write the same bytes again); appending to a file
 * closed between steps could never be rolled back by restoring fds, so this
 * shape does not. A restart must give back a directory fd to the same
 * directory (same inode); at finish the directory must hold exactly the
 * expected entries.
 * Outputs: dirfd.<rank>/log, dirfd.<rank>/step.NNN, dirfd.<rank>/latest.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "dirfd"

struct dirfd_state {
    int32_t dfd, log_fd;
    uint64_t dir_ino;
    int64_t log_bytes;
    uint64_t val; /* the value in the newest step file */
};

static void step_contents(struct state_buf *b, const struct ctx *c, uint64_t iter, uint64_t val) {
    state_buf_printf(b, "dirfd rank %d step %03" PRIu64 " val %016" PRIx64 "\n", c->rank, iter, val);
}

static void log_line(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "log rank %d step %03" PRIu64 "\n", c->rank, iter);
}

static void check(const struct ctx *c, const struct dirfd_state *st, const char *when) {
    char what[128];
    snprintf(what, sizeof what, "%s, the directory fd", when);
    state_expect_fd(c, SHAPE, st->dfd, O_RDONLY, O_DIRECTORY, 1, what);
    struct stat sb;
    if (fstat(st->dfd, &sb) != 0) FAIL_ERRNO(c, "%s: fstat", what);
    if (!S_ISDIR(sb.st_mode)) FAIL(c, "%s: not a directory (mode %o)", what, sb.st_mode);
    if (sb.st_ino != st->dir_ino)
        FAIL(c, "%s: inode %ju, not dirfd.%d (%ju)", what, (uintmax_t)sb.st_ino, c->rank,
             (uintmax_t)st->dir_ino);
    snprintf(what, sizeof what, "%s, the log opened with openat", when);
    state_expect_fd(c, SHAPE, st->log_fd, O_WRONLY, O_APPEND, 0, what);
    state_expect_offset(c, SHAPE, st->log_fd, st->log_bytes, what);
    state_expect_size(c, SHAPE, st->log_fd, st->log_bytes, what);
}

/* Creates or replaces dir/name with exactly b, through the dirfd. */
static void put(const struct ctx *c, const struct dirfd_state *st, const char *name, const struct state_buf *b) {
    int fd = openat(st->dfd, name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) FAIL_ERRNO(c, "openat(dirfd, %s)", name);
    state_write_all(c, SHAPE, fd, b->data, b->len, name);
    if (close(fd) != 0) FAIL_ERRNO(c, "close %s", name);
}

static void dirfd_setup(const struct ctx *c, void *slice) {
    struct dirfd_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "dirfd.%d", c->rank);
    if (mkdir(path, 0755) != 0 && errno != EEXIST) FAIL_ERRNO(c, "mkdir %s", path);
    st->dfd = open(path, O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    if (st->dfd < 0) FAIL_ERRNO(c, "open %s", path);
    struct stat sb;
    if (fstat(st->dfd, &sb) != 0) FAIL_ERRNO(c, "fstat %s", path);
    st->dir_ino = sb.st_ino;
    st->log_fd = openat(st->dfd, "log", O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (st->log_fd < 0) FAIL_ERRNO(c, "openat(dirfd, log)");
    st->val = state_mix(0x646972, (uint64_t)c->rank);
}

static void dirfd_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t dirfd_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct dirfd_state *st = slice;
    check(c, st, "before a step");
    char name[32];
    struct state_buf b = {0};
    if (iter > 0) {
        /* Read the previous step's file back through the dirfd. */
        snprintf(name, sizeof name, "step.%03" PRIu64, iter - 1);
        int fd = openat(st->dfd, name, O_RDONLY | O_CLOEXEC);
        if (fd < 0) FAIL_ERRNO(c, "openat(dirfd, %s) for reading", name);
        size_t len = 0;
        char *got = state_slurp_fd(c, SHAPE, fd, &len, name);
        close(fd);
        step_contents(&b, c, iter - 1, st->val);
        state_expect_bytes(c, SHAPE, name, got, len, b.data, b.len);
        free(got);
        state_buf_free(&b);
    }
    st->val = state_mix(st->val, iter);
    snprintf(name, sizeof name, "step.%03" PRIu64, iter);
    step_contents(&b, c, iter, st->val);
    put(c, st, name, &b);
    state_buf_free(&b);
    state_buf_printf(&b, "latest: step %03" PRIu64 " of rank %d\n", iter, c->rank);
    put(c, st, "latest", &b);
    state_buf_free(&b);
    log_line(&b, c, iter);
    state_write_all(c, SHAPE, st->log_fd, b.data, b.len, "the log");
    st->log_bytes += (int64_t)b.len;
    state_buf_free(&b);
    return st->val;
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void dirfd_finish(const struct ctx *c, void *slice) {
    struct dirfd_state *st = slice;
    check(c, st, "at finish");
    /* The directory holds exactly log, latest and step.000 .. step.<K-1>. */
    int fd = openat(st->dfd, ".", O_DIRECTORY | O_RDONLY | O_CLOEXEC);
    DIR *d = fd < 0 ? NULL : fdopendir(fd);
    if (!d) FAIL_ERRNO(c, "opening dirfd.%d for listing", c->rank);
    size_t n = 0, cap = c->iters + 16;
    char **names = calloc(cap, sizeof *names);
    if (!names) FAIL(c, "calloc");
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (n == cap) FAIL(c, "dirfd.%d has more than %zu entries", c->rank, cap);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, n, sizeof *names, compare_names);
    struct state_buf got = {0}, want = {0};
    for (size_t i = 0; i < n; i++) {
        state_buf_printf(&got, "%s\n", names[i]);
        free(names[i]);
    }
    free(names);
    state_buf_printf(&want, "latest\nlog\n");
    for (uint64_t iter = 0; iter < c->iters; iter++) state_buf_printf(&want, "step.%03" PRIu64 "\n", iter);
    state_expect_bytes(c, SHAPE, "the directory's entries", got.data, got.len, want.data, want.len);
    state_buf_free(&got);
    state_buf_free(&want);

    if (close(st->log_fd) != 0) FAIL_ERRNO(c, "close the log");
    char path[PATH_MAX];
    state_path(c, path, "dirfd.%d/log", c->rank);
    for (uint64_t iter = 0; iter < c->iters; iter++) log_line(&want, c, iter);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
    if (close(st->dfd) != 0) FAIL_ERRNO(c, "close the directory fd");
}

const struct shape shape_dirfd = {SHAPE, sizeof(struct dirfd_state), dirfd_setup, dirfd_reattach,
                                  dirfd_step, dirfd_finish};
