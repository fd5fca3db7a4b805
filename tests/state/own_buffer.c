/*
 * own_buffer: a log the program buffers itself, as loggers and C++ streams
 * do: lines collect in a 64 KiB heap buffer that only reaches the file
 * (with write()) when full, which the whole run never fills. The program
 * registers a hook with cryo_at_checkpoint that writes the buffer out; at
 * a checkpoint every line written so far sits in the buffer, in heap memory
 * a restart does not bring back. After a restart the program registers the
 * hook again (a new process); the file must then hold every line written
 * before the checkpoint, and the fd must be at its end.
 * Output: own_buffer.<rank>.out, checked at finish.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cryo.h"
#include "state.h"

#define SHAPE "own_buffer"
#define BUFSIZE (1 << 16)

struct own_buffer_state {
    int32_t fd;
    int32_t pad;
    int64_t bytes; /* in the file: what the hook and finish wrote */
};

/* Heap state: empty after a restart, since the hook emptied it into the
 * file at the checkpoint. */
static char pending[BUFSIZE];
static size_t pending_len;
static const struct ctx *hook_ctx;

/* The checkpoint hook: the buffered lines go to the file. */
static void flush_pending(void *arg) {
    struct own_buffer_state *st = arg;
    state_write_all(hook_ctx, SHAPE, st->fd, pending, pending_len, "the buffered lines");
    st->bytes += (int64_t)pending_len;
    pending_len = 0;
}

static void register_hook(const struct ctx *c, struct own_buffer_state *st) {
    hook_ctx = c;
    int rc = cryo_at_checkpoint(flush_pending, st);
    if (rc != CRYO_OK) FAIL(c, "cryo_at_checkpoint: %s", cryo_strerror(rc));
}

static void add_line(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "own_buffer rank %d step %03" PRIu64 " %" PRIx64 "\n", c->rank, iter,
                     state_mix(iter, (uint64_t)c->rank + 7));
}

static void own_buffer_setup(const struct ctx *c, void *slice) {
    struct own_buffer_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "own_buffer.%d.out", c->rank);
    st->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
    register_hook(c, st);
}

static void own_buffer_reattach(const struct ctx *c, void *slice) {
    struct own_buffer_state *st = slice;
    state_expect_fd(c, SHAPE, st->fd, O_WRONLY, 0, 1, "after the restart");
    state_expect_size(c, SHAPE, st->fd, st->bytes,
                      "after the restart, the lines the program buffered before the checkpoint");
    state_expect_offset(c, SHAPE, st->fd, st->bytes, "after the restart");
    register_hook(c, st);
}

static uint64_t own_buffer_step(const struct ctx *c, void *slice, uint64_t iter) {
    (void)slice;
    struct state_buf b = {0};
    add_line(&b, c, iter);
    if (pending_len + b.len > BUFSIZE) FAIL(c, "the run outgrew the buffer");
    memcpy(pending + pending_len, b.data, b.len);
    pending_len += b.len;
    uint64_t sum = state_mix(iter, b.len);
    state_buf_free(&b);
    return sum;
}

static void own_buffer_finish(const struct ctx *c, void *slice) {
    struct own_buffer_state *st = slice;
    flush_pending(st);
    state_expect_size(c, SHAPE, st->fd, st->bytes, "at finish");
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close the log");
    struct state_buf want = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++) add_line(&want, c, iter);
    char path[PATH_MAX];
    state_path(c, path, "own_buffer.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
}

const struct shape shape_own_buffer = {SHAPE, sizeof(struct own_buffer_state), own_buffer_setup,
                                       own_buffer_reattach, own_buffer_step, own_buffer_finish};
