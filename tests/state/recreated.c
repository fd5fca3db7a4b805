/*
 * recreated: a file opened, unlinked, and a NEW file created at the same
 * path (written once at setup, then never opened again). The old fd keeps
 * being written every step. /proc shows the old fd as "PATH (deleted)" while
 * PATH exists: a restart that re-opens by path would write into the new
 * file. The new file must keep exactly what setup wrote (same inode too),
 * and the old one its own contents.
 * Outputs: recreated.<rank>.out (the new file, untouched since setup) and
 * recreated.<rank>.old.out (the old fd's whole contents, read at finish).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "recreated"

struct recreated_state {
    int32_t fd;      /* the old, unlinked file */
    int32_t pad;
    int64_t bytes;   /* its length */
    uint64_t new_ino; /* the new file's inode */
};

static void old_header(struct state_buf *b, const struct ctx *c) {
    state_buf_printf(b, "old file of rank %d, unlinked at setup\n", c->rank);
}

static void new_contents(struct state_buf *b, const struct ctx *c) {
    state_buf_printf(b, "new file of rank %d, created at setup where the old one was; never written again\n",
                     c->rank);
}

static void add_line(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "old file rank %d step %03" PRIu64 " %016" PRIx64 "\n", c->rank, iter,
                     state_mix(0x6f6c64, iter * 131 + (uint64_t)c->rank));
}

static void check(const struct ctx *c, const struct recreated_state *st, const char *when) {
    char what[128];
    snprintf(what, sizeof what, "%s, the old (unlinked) fd", when);
    state_expect_fd(c, SHAPE, st->fd, O_RDWR, 0, 0, what);
    state_expect_offset(c, SHAPE, st->fd, st->bytes, what);
    state_expect_size(c, SHAPE, st->fd, st->bytes, what);
    struct stat sb;
    if (fstat(st->fd, &sb) != 0) FAIL_ERRNO(c, "%s: fstat", what);
    if (sb.st_nlink != 0) FAIL(c, "%s: has %ju names, expected none", what, (uintmax_t)sb.st_nlink);
    if (sb.st_ino == st->new_ino) FAIL(c, "%s: is the new file", what);

    char path[PATH_MAX];
    state_path(c, path, "recreated.%d.out", c->rank);
    snprintf(what, sizeof what, "%s, the new file at the old path", when);
    if (stat(path, &sb) != 0) FAIL_ERRNO(c, "%s: stat %s", what, path);
    if (sb.st_ino != st->new_ino)
        FAIL(c, "%s: %s is inode %ju, not the %ju setup created", what, path, (uintmax_t)sb.st_ino,
             (uintmax_t)st->new_ino);
    struct state_buf want = {0};
    new_contents(&want, c);
    state_expect_file(c, SHAPE, path, what, want.data, want.len);
    state_buf_free(&want);
}

static void recreated_setup(const struct ctx *c, void *slice) {
    struct recreated_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "recreated.%d.out", c->rank);
    st->fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
    struct state_buf b = {0};
    old_header(&b, c);
    state_write_all(c, SHAPE, st->fd, b.data, b.len, "the old file");
    st->bytes = (int64_t)b.len;
    state_buf_free(&b);
    if (unlink(path) != 0) FAIL_ERRNO(c, "unlink %s", path);

    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) FAIL_ERRNO(c, "create the new %s", path);
    new_contents(&b, c);
    state_write_all(c, SHAPE, fd, b.data, b.len, "the new file");
    state_buf_free(&b);
    struct stat sb;
    if (fstat(fd, &sb) != 0) FAIL_ERRNO(c, "fstat the new file");
    st->new_ino = sb.st_ino;
    if (close(fd) != 0) FAIL_ERRNO(c, "close the new file");
}

static void recreated_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t recreated_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct recreated_state *st = slice;
    check(c, st, "before a step");
    struct state_buf line = {0};
    add_line(&line, c, iter);
    state_write_all(c, SHAPE, st->fd, line.data, line.len, "the old file");
    st->bytes += (int64_t)line.len;
    uint64_t sum = state_mix(iter, line.len);
    state_buf_free(&line);
    return sum;
}

static void recreated_finish(const struct ctx *c, void *slice) {
    struct recreated_state *st = slice;
    check(c, st, "at finish");
    size_t len = 0;
    char *got = state_slurp_fd(c, SHAPE, st->fd, &len, "the old file");
    char name[64];
    snprintf(name, sizeof name, "recreated.%d.old.out", c->rank);
    state_write_output(c, SHAPE, name, got, len);
    struct state_buf want = {0};
    old_header(&want, c);
    for (uint64_t iter = 0; iter < c->iters; iter++) add_line(&want, c, iter);
    state_expect_bytes(c, SHAPE, "the old file's contents", got, len, want.data, want.len);
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close the old file");
    free(got);
    state_buf_free(&want);
}

const struct shape shape_recreated = {SHAPE, sizeof(struct recreated_state), recreated_setup,
                                      recreated_reattach, recreated_step, recreated_finish};
