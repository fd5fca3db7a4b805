/*
 * stdio_full: a FILE from fdopen(fd, "r+") with a fully buffered 64 KiB
 * buffer (setvbuf _IOFBF). The whole run writes less than that, so in an
 * uninterrupted run nothing reaches the file before fclose, and at a
 * checkpoint every line written so far sits in the stdio buffer, in heap
 * memory a restart does not bring back. After a restart the program
 * fdopen()s the restored fd (its number is in the state region) and calls
 * setvbuf again; by then the file must hold every byte written through the
 * FILE before the checkpoint, and the fd must be at its end.
 * Output: stdio_full.<rank>.out, read back through the FILE at finish.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "stdio_full"
#define BUFSIZE (1 << 16)

struct stdio_full_state {
    int32_t fd;
    int32_t pad;
    int64_t bytes; /* written through the FILE */
};

/* Heap state: gone after a restart, rebuilt by reattach. */
static FILE *stream;

static void open_stream(const struct ctx *c, int fd) {
    stream = fdopen(fd, "r+");
    if (!stream) FAIL_ERRNO(c, "fdopen(%d, \"r+\")", fd);
    if (setvbuf(stream, NULL, _IOFBF, BUFSIZE) != 0) FAIL(c, "setvbuf _IOFBF");
}

static void add_lines(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "stdio_full rank %d step %03" PRIu64 " a %016" PRIx64 "\n", c->rank, iter,
                     state_mix(iter, (uint64_t)c->rank));
    state_buf_printf(b, "stdio_full rank %d step %03" PRIu64 " b %" PRIu64 "\n", c->rank, iter,
                     state_mix((uint64_t)c->rank, iter) % 100000);
}

static void stdio_full_setup(const struct ctx *c, void *slice) {
    struct stdio_full_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "stdio_full.%d.out", c->rank);
    st->fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
    open_stream(c, st->fd);
}

static void stdio_full_reattach(const struct ctx *c, void *slice) {
    struct stdio_full_state *st = slice;
    state_expect_fd(c, SHAPE, st->fd, O_RDWR, 0, 0, "after the restart");
    /* Whatever sat in the old process's stdio buffer must be in the file. */
    state_expect_size(c, SHAPE, st->fd, st->bytes,
                      "after the restart, the lines written through the full buffer before the checkpoint");
    state_expect_offset(c, SHAPE, st->fd, st->bytes, "after the restart");
    open_stream(c, st->fd);
}

static uint64_t stdio_full_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct stdio_full_state *st = slice;
    struct state_buf b = {0};
    add_lines(&b, c, iter);
    if (fputs(b.data, stream) == EOF) FAIL_ERRNO(c, "fputs");
    st->bytes += (int64_t)b.len;
    uint64_t sum = state_mix(iter, b.len);
    state_buf_free(&b);
    return sum;
}

static void stdio_full_finish(const struct ctx *c, void *slice) {
    struct stdio_full_state *st = slice;
    if (fflush(stream) != 0) FAIL_ERRNO(c, "fflush");
    state_expect_size(c, SHAPE, st->fd, st->bytes, "at finish");
    if (ftello(stream) != st->bytes) FAIL(c, "at finish the stream is at %lld, expected %lld",
                                          (long long)ftello(stream), (long long)st->bytes);
    /* Read it all back through the stream. */
    if (fseeko(stream, 0, SEEK_SET) != 0) FAIL_ERRNO(c, "fseek to 0");
    char *got = malloc((size_t)st->bytes + 1);
    if (!got) FAIL(c, "malloc");
    size_t len = fread(got, 1, (size_t)st->bytes + 1, stream);
    if (ferror(stream)) FAIL_ERRNO(c, "fread");
    struct state_buf want = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++) add_lines(&want, c, iter);
    state_expect_bytes(c, SHAPE, "stdio_full.<rank>.out", got, len, want.data, want.len);
    if (fclose(stream) != 0) FAIL_ERRNO(c, "fclose");
    stream = NULL;
    free(got);
    state_buf_free(&want);
}

const struct shape shape_stdio_full = {SHAPE, sizeof(struct stdio_full_state), stdio_full_setup,
                                       stdio_full_reattach, stdio_full_step, stdio_full_finish};
