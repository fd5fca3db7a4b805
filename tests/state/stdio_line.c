/*
 * stdio_line: a FILE from fdopen(fd, "a") of an O_APPEND fd, line buffered
 * (setvbuf _IOLBF, 64 KiB). Every step finishes the line the previous step
 * began and begins a new one without its newline, so at every checkpoint a
 * partial line sits in the stdio buffer (line buffering flushes only at a
 * newline). After a restart the program fdopen()s the restored fd and
 * calls setvbuf again; the file must by then hold every byte written
 * through the FILE before the checkpoint, partial line included.
 * Output: stdio_line.<rank>.out.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "stdio_line"
#define BUFSIZE (1 << 16)

struct stdio_line_state {
    int32_t fd;
    int32_t pad;
    int64_t bytes; /* written through the FILE */
};

/* Heap state: gone after a restart, rebuilt by reattach. */
static FILE *stream;

static void open_stream(const struct ctx *c, int fd) {
    stream = fdopen(fd, "a");
    if (!stream) FAIL_ERRNO(c, "fdopen(%d, \"a\")", fd);
    if (setvbuf(stream, NULL, _IOLBF, BUFSIZE) != 0) FAIL(c, "setvbuf _IOLBF");
}

/* What step iter writes: the end of line iter-1, then the start of line iter. */
static void add_step(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    if (iter > 0) state_buf_printf(b, "tail %03" PRIu64 " %08" PRIx64 "\n", iter - 1, state_mix(iter, 7) >> 32);
    state_buf_printf(b, "stdio_line rank %d step %03" PRIu64 " head %08" PRIx64 " ... ", c->rank, iter,
                     state_mix((uint64_t)c->rank, iter) >> 32);
}

static void add_end(struct state_buf *b, const struct ctx *c) {
    state_buf_printf(b, "end of rank %d\n", c->rank);
}

static void check(const struct ctx *c, const struct stdio_line_state *st, const char *when) {
    state_expect_fd(c, SHAPE, st->fd, O_WRONLY, O_APPEND, 0, when);
}

static void stdio_line_setup(const struct ctx *c, void *slice) {
    struct stdio_line_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "stdio_line.%d.out", c->rank);
    st->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
    open_stream(c, st->fd);
}

static void stdio_line_reattach(const struct ctx *c, void *slice) {
    struct stdio_line_state *st = slice;
    check(c, st, "after the restart");
    /* The partial line in the old process's buffer must be in the file. */
    state_expect_size(c, SHAPE, st->fd, st->bytes,
                      "after the restart, the lines written through the line buffer before the checkpoint");
    open_stream(c, st->fd);
}

static uint64_t stdio_line_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct stdio_line_state *st = slice;
    check(c, st, "before a step");
    struct state_buf b = {0};
    add_step(&b, c, iter);
    if (fputs(b.data, stream) == EOF) FAIL_ERRNO(c, "fputs");
    st->bytes += (int64_t)b.len;
    uint64_t sum = state_mix(iter, b.len);
    state_buf_free(&b);
    return sum;
}

static void stdio_line_finish(const struct ctx *c, void *slice) {
    struct stdio_line_state *st = slice;
    check(c, st, "at finish");
    struct state_buf want = {0};
    add_end(&want, c);
    if (fputs(want.data, stream) == EOF) FAIL_ERRNO(c, "fputs");
    st->bytes += (int64_t)want.len;
    state_buf_free(&want);
    if (fclose(stream) != 0) FAIL_ERRNO(c, "fclose");
    stream = NULL;
    for (uint64_t iter = 0; iter < c->iters; iter++) add_step(&want, c, iter);
    add_end(&want, c);
    char path[PATH_MAX];
    state_path(c, path, "stdio_line.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
}

const struct shape shape_stdio_line = {SHAPE, sizeof(struct stdio_line_state), stdio_line_setup,
                                       stdio_line_reattach, stdio_line_step, stdio_line_finish};
