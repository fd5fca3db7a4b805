/*
 * renamed: a file opened at path A and written, then renamed to B at setup;
 * the fd goes on writing every step. A restart must re-open the file by its
 * name at the checkpoint (B, same inode), not create A again.
 * Output: renamed.<rank>.out (B); renamed.<rank>.A must not exist.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "renamed"

struct renamed_state {
    int32_t fd;
    int32_t pad;
    int64_t bytes;
};

static void header(struct state_buf *b, const struct ctx *c) {
    state_buf_printf(b, "renamed rank %d: written at renamed.%d.A, then renamed to renamed.%d.out\n", c->rank,
                     c->rank, c->rank);
}

static void add_line(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "renamed rank %d step %03" PRIu64 " %016" PRIx64 "\n", c->rank, iter,
                     state_mix(0x72656e, iter + 1000 * (uint64_t)c->rank));
}

static void check(const struct ctx *c, const struct renamed_state *st, const char *when) {
    state_expect_fd(c, SHAPE, st->fd, O_WRONLY, 0, 1, when);
    state_expect_offset(c, SHAPE, st->fd, st->bytes, when);
    state_expect_size(c, SHAPE, st->fd, st->bytes, when);
    char a[PATH_MAX], b[PATH_MAX];
    state_path(c, a, "renamed.%d.A", c->rank);
    state_path(c, b, "renamed.%d.out", c->rank);
    struct stat sa, sb;
    if (stat(a, &sa) == 0) FAIL(c, "%s: %s exists again", when, a);
    if (errno != ENOENT) FAIL_ERRNO(c, "%s: stat %s", when, a);
    if (stat(b, &sb) != 0) FAIL_ERRNO(c, "%s: stat %s", when, b);
    if (fstat(st->fd, &sa) != 0) FAIL_ERRNO(c, "%s: fstat", when);
    if (sa.st_ino != sb.st_ino || sa.st_dev != sb.st_dev)
        FAIL(c, "%s: the fd is inode %ju, %s is %ju", when, (uintmax_t)sa.st_ino, b, (uintmax_t)sb.st_ino);
}

static void renamed_setup(const struct ctx *c, void *slice) {
    struct renamed_state *st = slice;
    char a[PATH_MAX], b[PATH_MAX];
    state_path(c, a, "renamed.%d.A", c->rank);
    state_path(c, b, "renamed.%d.out", c->rank);
    st->fd = open(a, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", a);
    struct state_buf h = {0};
    header(&h, c);
    state_write_all(c, SHAPE, st->fd, h.data, h.len, a);
    st->bytes = (int64_t)h.len;
    state_buf_free(&h);
    if (rename(a, b) != 0) FAIL_ERRNO(c, "rename %s to %s", a, b);
}

static void renamed_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t renamed_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct renamed_state *st = slice;
    check(c, st, "before a step");
    struct state_buf line = {0};
    add_line(&line, c, iter);
    state_write_all(c, SHAPE, st->fd, line.data, line.len, "the renamed file");
    st->bytes += (int64_t)line.len;
    uint64_t sum = state_mix(iter, line.len);
    state_buf_free(&line);
    return sum;
}

static void renamed_finish(const struct ctx *c, void *slice) {
    struct renamed_state *st = slice;
    check(c, st, "at finish");
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close");
    struct state_buf want = {0};
    header(&want, c);
    for (uint64_t iter = 0; iter < c->iters; iter++) add_line(&want, c, iter);
    char path[PATH_MAX];
    state_path(c, path, "renamed.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
}

const struct shape shape_renamed = {SHAPE, sizeof(struct renamed_state), renamed_setup, renamed_reattach,
                                    renamed_step, renamed_finish};
