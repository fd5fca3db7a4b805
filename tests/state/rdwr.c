/*
 * rdwr: a file opened O_RDWR, written and read back through the file
 * offset. The file is a list of fixed-size records, one per step. Step i
 * seeks back over record i-1, reads it (it must be exactly what step i-1
 * wrote, with "visits 1"), seeks back again, rewrites it with "visits 2",
 * then appends record i; the offset keeps moving forward. A restart that
 * brings back a stale file (record i-1 already rewritten by steps run after
 * the checkpoint), a wrong offset, or a read-only fd fails the read-back
 * check; a lost or repeated record changes the output.
 * Output: rdwr.<rank>.out.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "rdwr"
#define RECLEN 56

struct rdwr_state {
    int32_t fd;
    int32_t pad;
    uint64_t records; /* records in the file */
    uint64_t val;     /* the value of the newest record */
};

static void record(char out[RECLEN + 1], const struct ctx *c, uint64_t iter, unsigned visits, uint64_t val) {
    int n = snprintf(out, RECLEN + 1, "rdwr rank %3d step %06" PRIu64 " visits %u val %016" PRIx64 "\n",
                     c->rank, iter, visits, val);
    if (n != RECLEN) FAIL(c, "a record is %d bytes, not %d", n, RECLEN);
}

static void check(const struct ctx *c, const struct rdwr_state *st, const char *when) {
    state_expect_fd(c, SHAPE, st->fd, O_RDWR, 0, 0, when);
    state_expect_offset(c, SHAPE, st->fd, (off_t)(st->records * RECLEN), when);
    state_expect_size(c, SHAPE, st->fd, (off_t)(st->records * RECLEN), when);
}

static void rdwr_setup(const struct ctx *c, void *slice) {
    struct rdwr_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "rdwr.%d.out", c->rank);
    st->fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
    st->val = state_mix(0x7264, (uint64_t)c->rank);
}

static void rdwr_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t rdwr_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct rdwr_state *st = slice;
    check(c, st, "before a step");
    if (st->records != iter) FAIL(c, "step %" PRIu64 " with %" PRIu64 " records", iter, st->records);
    char want[RECLEN + 1], got[RECLEN + 1];
    if (iter > 0) {
        if (lseek(st->fd, -RECLEN, SEEK_CUR) < 0) FAIL_ERRNO(c, "lseek back over record %" PRIu64, iter - 1);
        state_read_exact(c, SHAPE, st->fd, got, RECLEN, "the previous record");
        got[RECLEN] = '\0';
        record(want, c, iter - 1, 1, st->val);
        char what[128];
        snprintf(what, sizeof what, "record %" PRIu64 " read back in step %" PRIu64, iter - 1, iter);
        state_expect_bytes(c, SHAPE, what, got, RECLEN, want, RECLEN);
        if (lseek(st->fd, -RECLEN, SEEK_CUR) < 0) FAIL_ERRNO(c, "lseek back over record %" PRIu64, iter - 1);
        record(want, c, iter - 1, 2, st->val);
        state_write_all(c, SHAPE, st->fd, want, RECLEN, "the updated record");
    }
    st->val = state_mix(st->val, iter);
    record(want, c, iter, 1, st->val);
    state_write_all(c, SHAPE, st->fd, want, RECLEN, "the new record");
    st->records++;
    return st->val;
}

static void rdwr_finish(const struct ctx *c, void *slice) {
    struct rdwr_state *st = slice;
    check(c, st, "at finish");
    struct state_buf want = {0};
    uint64_t val = state_mix(0x7264, (uint64_t)c->rank);
    for (uint64_t iter = 0; iter < c->iters; iter++) {
        char rec[RECLEN + 1];
        val = state_mix(val, iter);
        record(rec, c, iter, iter + 1 < c->iters ? 2 : 1, val);
        state_buf_add(&want, rec, RECLEN);
    }
    size_t len = 0;
    char *got = state_slurp_fd(c, SHAPE, st->fd, &len, "rdwr.<rank>.out");
    state_expect_bytes(c, SHAPE, "rdwr.<rank>.out", got, len, want.data, want.len);
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close");
    free(got);
    state_buf_free(&want);
}

const struct shape shape_rdwr = {SHAPE, sizeof(struct rdwr_state), rdwr_setup, rdwr_reattach, rdwr_step,
                                 rdwr_finish};
