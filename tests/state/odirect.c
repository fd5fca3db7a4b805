/*
 * odirect: a file written through O_DIRECT, as codes that bypass the page
 * cache for their own block I/O do: 16 blocks of 4 KiB, each a text header
 * (counter and running sum) padded to the block; every step reads one block
 * into an aligned buffer, checks it against the state region's copy,
 * updates it and writes it back in place, and the fd's offset moves by
 * a sequential write of the step's number in a 4 KiB journal block past
 * the table. O_DIRECT takes only aligned buffers, offsets and lengths, so a
 * restart that writes the saved contents back through the fd itself fails
 * with EINVAL; one that brings back a stale block fails the read-back check.
 * Output: odirect.<rank>.out.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "odirect"
#define NBLOCKS 16
#define BLOCK 4096
#define TABLE ((off_t)NBLOCKS * BLOCK)

struct odirect_state {
    int32_t fd;
    uint32_t count[NBLOCKS];
    uint32_t pad;
    uint64_t entries; /* journal blocks written */
    uint64_t sum[NBLOCKS];
};

static void *aligned_block(const struct ctx *c) {
    void *buf = NULL;
    if (posix_memalign(&buf, BLOCK, BLOCK) != 0) FAIL(c, "posix_memalign");
    return buf;
}

static void block_text(char *out, const struct ctx *c, int b, uint32_t count, uint64_t sum) {
    memset(out, '.', BLOCK);
    int n = snprintf(out, 80, "block %02d rank %3d count %04" PRIu32 " sum %016" PRIx64 "\n", b, c->rank,
                     count, sum);
    out[n] = '.';
    out[BLOCK - 1] = '\n';
}

static void journal_text(char *out, uint64_t iter) {
    memset(out, ' ', BLOCK);
    int n = snprintf(out, 40, "journal step %04" PRIu64, iter);
    out[n] = ' ';
    out[BLOCK - 1] = '\n';
}

static int block_of(const struct ctx *c, uint64_t iter) { return (int)((iter * 5 + (uint64_t)c->rank) % NBLOCKS); }

static void check(const struct ctx *c, const struct odirect_state *st, const char *when) {
    state_expect_fd(c, SHAPE, st->fd, O_RDWR, O_DIRECT, 1, when);
    state_expect_offset(c, SHAPE, st->fd, TABLE + (off_t)(st->entries * BLOCK), when);
    state_expect_size(c, SHAPE, st->fd, TABLE + (off_t)(st->entries * BLOCK), when);
}

static void odirect_setup(const struct ctx *c, void *slice) {
    struct odirect_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "odirect.%d.out", c->rank);
    st->fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s with O_DIRECT", path);
    char *buf = aligned_block(c);
    for (int b = 0; b < NBLOCKS; b++) {
        st->sum[b] = state_mix((uint64_t)c->rank, (uint64_t)b);
        block_text(buf, c, b, 0, st->sum[b]);
        state_write_all(c, SHAPE, st->fd, buf, BLOCK, "a block");
    }
    free(buf);
}

static void odirect_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t odirect_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct odirect_state *st = slice;
    check(c, st, "before a step");
    int b = block_of(c, iter);
    char *got = aligned_block(c), *want = aligned_block(c), what[96];
    state_pread_exact(c, SHAPE, st->fd, got, BLOCK, (off_t)b * BLOCK, "a block");
    block_text(want, c, b, st->count[b], st->sum[b]);
    snprintf(what, sizeof what, "block %d read back in step %" PRIu64, b, iter);
    state_expect_bytes(c, SHAPE, what, got, BLOCK, want, BLOCK);
    st->count[b]++;
    st->sum[b] = state_mix(st->sum[b], iter);
    block_text(want, c, b, st->count[b], st->sum[b]);
    state_pwrite_all(c, SHAPE, st->fd, want, BLOCK, (off_t)b * BLOCK, "a block");
    journal_text(want, iter);
    state_write_all(c, SHAPE, st->fd, want, BLOCK, "the journal");
    st->entries++;
    free(got);
    free(want);
    return st->sum[b];
}

static void odirect_finish(const struct ctx *c, void *slice) {
    struct odirect_state *st = slice;
    check(c, st, "at finish");
    uint32_t count[NBLOCKS] = {0};
    uint64_t sum[NBLOCKS];
    for (int b = 0; b < NBLOCKS; b++) sum[b] = state_mix((uint64_t)c->rank, (uint64_t)b);
    struct state_buf journal = {0}, want = {0};
    char *block = aligned_block(c);
    for (uint64_t iter = 0; iter < c->iters; iter++) {
        int b = block_of(c, iter);
        count[b]++, sum[b] = state_mix(sum[b], iter);
        journal_text(block, iter);
        state_buf_add(&journal, block, BLOCK);
    }
    for (int b = 0; b < NBLOCKS; b++) {
        block_text(block, c, b, count[b], sum[b]);
        state_buf_add(&want, block, BLOCK);
    }
    state_buf_add(&want, journal.data, journal.len);
    /* Read back by path: an O_DIRECT fd takes only aligned buffers. */
    char path[PATH_MAX];
    state_path(c, path, "odirect.%d.out", c->rank);
    size_t len = 0;
    char *got = state_slurp_path(c, SHAPE, path, &len);
    state_expect_bytes(c, SHAPE, "odirect.<rank>.out", got, len, want.data, want.len);
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close");
    free(got);
    free(block);
    state_buf_free(&journal);
    state_buf_free(&want);
}

const struct shape shape_odirect = {SHAPE, sizeof(struct odirect_state), odirect_setup, odirect_reattach,
                                    odirect_step, odirect_finish};
