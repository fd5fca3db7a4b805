/*
 * append: an O_APPEND log written with write(). After every write the
 * program seeks the fd back to 0: with O_APPEND the next write still goes
 * to the end, so a restart that loses O_APPEND overwrites the head of the
 * log. Lines vary in length, so a lost, repeated or overwritten line shifts
 * everything after it.
 * Output: append.<rank>.out, also checked at finish.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "append"

struct append_state {
    int32_t fd;
    int32_t pad;
    int64_t bytes; /* the log's length */
};

static void add_line(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "append rank %d step %03" PRIu64 " ", c->rank, iter);
    /* 1 to 7 words: lines of different lengths. */
    uint64_t words = 1 + state_mix(iter, (uint64_t)c->rank) % 7;
    for (uint64_t w = 0; w < words; w++) state_buf_printf(b, "w%" PRIu64, w);
    state_buf_printf(b, "\n");
}

static void check(const struct ctx *c, const struct append_state *st, const char *when) {
    /* Opened with O_CLOEXEC; the offset was left at 0 by the last step. */
    state_expect_fd(c, SHAPE, st->fd, O_WRONLY, O_APPEND, 1, when);
    state_expect_offset(c, SHAPE, st->fd, 0, when);
    state_expect_size(c, SHAPE, st->fd, st->bytes, when);
}

static void append_setup(const struct ctx *c, void *slice) {
    struct append_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "append.%d.out", c->rank);
    st->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
}

static void append_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t append_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct append_state *st = slice;
    check(c, st, "before a step");
    struct state_buf line = {0};
    add_line(&line, c, iter);
    state_write_all(c, SHAPE, st->fd, line.data, line.len, "the O_APPEND log");
    st->bytes += (int64_t)line.len;
    /* O_APPEND moved the offset to the end. */
    state_expect_offset(c, SHAPE, st->fd, st->bytes, "after an O_APPEND write");
    if (lseek(st->fd, 0, SEEK_SET) != 0) FAIL_ERRNO(c, "lseek the log to 0");
    uint64_t sum = state_mix(iter, line.len);
    state_buf_free(&line);
    return sum;
}

static void append_finish(const struct ctx *c, void *slice) {
    struct append_state *st = slice;
    check(c, st, "at finish");
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close the log");
    struct state_buf want = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++) add_line(&want, c, iter);
    char path[PATH_MAX];
    state_path(c, path, "append.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
}

const struct shape shape_append = {SHAPE, sizeof(struct append_state), append_setup, append_reattach,
                                   append_step, append_finish};
