/*
 * stdout_file: stdout sent to a file with freopen after cryo_init, as codes
 * do that write one log per rank through printf. Every rank but rank 0
 * (whose stdout carries the harness's report) redirects its stdout and
 * prints a line a step, without flushing: the lines sit in stdout's buffer
 * at a checkpoint. On a restart fd 1 is that file again, at its offset
 * (cryo puts it over the new launcher's stdout), and the fresh process's
 * stdout writes on where the checkpoint left it; nothing is reopened.
 * Output: stdout.<rank>.out for ranks 1 and up, also checked at finish.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "stdout_file"

struct stdout_file_state {
    int32_t active; /* this rank's stdout goes to the file */
    int32_t pad;
    int64_t bytes; /* what it printed so far */
};

static void add_line(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "stdout rank %d step %03" PRIu64 " mix %016" PRIx64 "\n", c->rank, iter,
                     state_mix(iter, (uint64_t)c->rank));
}

static void stdout_file_setup(const struct ctx *c, void *slice) {
    struct stdout_file_state *st = slice;
    if (c->rank == 0) return;
    char path[PATH_MAX];
    state_path(c, path, "stdout.%d.out", c->rank);
    if (!freopen(path, "w", stdout)) FAIL_ERRNO(c, "freopen %s onto stdout", path);
    st->active = 1;
}

static void stdout_file_reattach(const struct ctx *c, void *slice) {
    struct stdout_file_state *st = slice;
    if (!st->active) return;
    /* Everything printed before the checkpoint was flushed into the file. */
    state_expect_fd(c, SHAPE, 1, O_WRONLY, 0, 0, "after the restart");
    state_expect_size(c, SHAPE, 1, st->bytes, "after the restart");
    state_expect_offset(c, SHAPE, 1, st->bytes, "after the restart");
}

static uint64_t stdout_file_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct stdout_file_state *st = slice;
    if (!st->active) return iter;
    struct state_buf line = {0};
    add_line(&line, c, iter);
    if (fwrite(line.data, 1, line.len, stdout) != line.len) FAIL_ERRNO(c, "printing to stdout");
    st->bytes += (int64_t)line.len;
    uint64_t sum = state_mix(iter, line.len);
    state_buf_free(&line);
    return sum;
}

static void stdout_file_finish(const struct ctx *c, void *slice) {
    struct stdout_file_state *st = slice;
    if (!st->active) return;
    if (fflush(stdout) != 0) FAIL_ERRNO(c, "flushing stdout");
    struct state_buf want = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++) add_line(&want, c, iter);
    char path[PATH_MAX];
    state_path(c, path, "stdout.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
}

const struct shape shape_stdout_file = {SHAPE, sizeof(struct stdout_file_state), stdout_file_setup,
                                        stdout_file_reattach, stdout_file_step, stdout_file_finish};
