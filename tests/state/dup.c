/*
 * dup: an fd, its dup() and a dup2() to a high number (200) share one open
 * file description, so one file offset. Every step writes one line through
 * each of the three, in a rotating order; the lines land one after the
 * other only if the three still share the offset after a restart (fds
 * re-opened separately would overwrite each other's lines). Before every
 * step all three must be at the offset the state region expects.
 *
 * The first fd is close-on-exec (O_CLOEXEC); dup() and dup2() clear the
 * flag on theirs: a restart must bring back each fd's own flag.
 * Output: dup.<rank>.out, also checked line by line at finish.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "dup"
#define HIGH_FD 200

struct dup_state {
    int32_t fd[3];   /* the original, its dup(), its dup2() to HIGH_FD */
    int32_t pad;
    int64_t bytes;   /* written so far: where the shared offset must be */
};

static const char *const via[3] = {"open", "dup", "dup2"};

/* The line step `iter` writes through fd[which]. */
static void add_line(struct state_buf *b, const struct ctx *c, uint64_t iter, int which) {
    state_buf_printf(b, "dup rank %d step %03" PRIu64 " via %-4s %016" PRIx64 "\n", c->rank, iter,
                     via[which], state_mix((uint64_t)c->rank, iter * 3 + (uint64_t)which));
}

/* Which fd writes k-th (k = 0, 1, 2) in step iter. */
static int order(uint64_t iter, int k) { return (int)((iter + (uint64_t)k) % 3); }

static void check(const struct ctx *c, const struct dup_state *st, const char *when) {
    for (int i = 0; i < 3; i++) {
        char what[128];
        snprintf(what, sizeof what, "%s, the %s fd", when, via[i]);
        state_expect_fd(c, SHAPE, st->fd[i], O_WRONLY, 0, i == 0, what);
        state_expect_offset(c, SHAPE, st->fd[i], st->bytes, what);
    }
    state_expect_size(c, SHAPE, st->fd[0], st->bytes, when);
}

static void dup_setup(const struct ctx *c, void *slice) {
    struct dup_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "dup.%d.out", c->rank);
    st->fd[0] = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (st->fd[0] < 0) FAIL_ERRNO(c, "open %s", path);
    st->fd[1] = dup(st->fd[0]);
    if (st->fd[1] < 0) FAIL_ERRNO(c, "dup(%d)", st->fd[0]);
    st->fd[2] = dup2(st->fd[0], HIGH_FD);
    if (st->fd[2] != HIGH_FD) FAIL_ERRNO(c, "dup2(%d, %d)", st->fd[0], HIGH_FD);
    st->bytes = 0;
}

static void dup_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t dup_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct dup_state *st = slice;
    check(c, st, "before a step");
    uint64_t sum = 0;
    for (int k = 0; k < 3; k++) {
        int which = order(iter, k);
        struct state_buf line = {0};
        add_line(&line, c, iter, which);
        state_write_all(c, SHAPE, st->fd[which], line.data, line.len, via[which]);
        st->bytes += (int64_t)line.len;
        sum = state_mix(sum, (uint64_t)line.len * 3 + (uint64_t)which);
        state_buf_free(&line);
    }
    return sum;
}

static void dup_finish(const struct ctx *c, void *slice) {
    struct dup_state *st = slice;
    check(c, st, "at finish");
    for (int i = 0; i < 3; i++)
        if (close(st->fd[i]) != 0) FAIL_ERRNO(c, "close the %s fd %d", via[i], st->fd[i]);
    struct state_buf want = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++)
        for (int k = 0; k < 3; k++) add_line(&want, c, iter, order(iter, k));
    char path[PATH_MAX];
    state_path(c, path, "dup.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
}

const struct shape shape_dup = {SHAPE, sizeof(struct dup_state), dup_setup, dup_reattach, dup_step,
                                dup_finish};
