/*
 * pio: a file used only through pread/pwrite at computed offsets; its file
 * offset never moves from 0. The head of the file is 16 fixed-size slots,
 * each with a counter and a running sum; every step read-modify-writes two
 * slots (checking each against the copy in the state region first) and
 * then pwrites a journal entry past the slots, growing the file. A restart
 * that brings back a stale file (slots already updated by steps run after
 * the checkpoint) fails the read-back check; a lost or repeated update
 * changes a counter and a sum.
 * Output: pio.<rank>.out.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "pio"
#define NSLOTS 16
#define SLOTLEN 49
#define JLEN 30
#define JOURNAL ((off_t)NSLOTS * SLOTLEN)

struct pio_state {
    int32_t fd;
    uint32_t count[NSLOTS];
    uint32_t pad;
    uint64_t entries; /* journal entries written */
    uint64_t sum[NSLOTS];
};

static void slot_text(char out[SLOTLEN + 1], const struct ctx *c, int slot, uint32_t count, uint64_t sum) {
    int n = snprintf(out, SLOTLEN + 1, "slot %02d rank %3d count %04" PRIu32 " sum %016" PRIx64 "\n", slot,
                     c->rank, count, sum);
    if (n != SLOTLEN) FAIL(c, "a slot is %d bytes, not %d", n, SLOTLEN);
}

static void journal_text(char out[JLEN + 1], const struct ctx *c, uint64_t iter, int a, int b) {
    int n = snprintf(out, JLEN + 1, "journal step %04" PRIu64 " slots %02d %02d\n", iter, a, b);
    if (n != JLEN) FAIL(c, "a journal entry is %d bytes, not %d", n, JLEN);
}

static void slots_of(const struct ctx *c, uint64_t iter, int *a, int *b) {
    *a = (int)((iter * 7 + (uint64_t)c->rank) % NSLOTS);
    *b = (int)((iter * 3 + 5) % NSLOTS);
}

static void check(const struct ctx *c, const struct pio_state *st, const char *when) {
    state_expect_fd(c, SHAPE, st->fd, O_RDWR, 0, 1, when);
    state_expect_offset(c, SHAPE, st->fd, 0, when);
    state_expect_size(c, SHAPE, st->fd, JOURNAL + (off_t)(st->entries * JLEN), when);
}

static void pio_setup(const struct ctx *c, void *slice) {
    struct pio_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "pio.%d.out", c->rank);
    st->fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
    for (int s = 0; s < NSLOTS; s++) {
        char text[SLOTLEN + 1];
        st->sum[s] = state_mix((uint64_t)c->rank, (uint64_t)s);
        slot_text(text, c, s, 0, st->sum[s]);
        state_pwrite_all(c, SHAPE, st->fd, text, SLOTLEN, (off_t)s * SLOTLEN, "a slot");
    }
}

static void pio_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

/* Read-modify-write of one slot. */
static void update(const struct ctx *c, struct pio_state *st, int s, uint64_t iter) {
    char got[SLOTLEN + 1], want[SLOTLEN + 1], what[128];
    state_pread_exact(c, SHAPE, st->fd, got, SLOTLEN, (off_t)s * SLOTLEN, "a slot");
    slot_text(want, c, s, st->count[s], st->sum[s]);
    snprintf(what, sizeof what, "slot %d read back in step %" PRIu64, s, iter);
    state_expect_bytes(c, SHAPE, what, got, SLOTLEN, want, SLOTLEN);
    st->count[s]++;
    st->sum[s] = state_mix(st->sum[s], iter);
    slot_text(want, c, s, st->count[s], st->sum[s]);
    state_pwrite_all(c, SHAPE, st->fd, want, SLOTLEN, (off_t)s * SLOTLEN, "a slot");
}

static uint64_t pio_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct pio_state *st = slice;
    check(c, st, "before a step");
    int a, b;
    slots_of(c, iter, &a, &b);
    update(c, st, a, iter);
    update(c, st, b, iter);
    char entry[JLEN + 1];
    journal_text(entry, c, iter, a, b);
    state_pwrite_all(c, SHAPE, st->fd, entry, JLEN, JOURNAL + (off_t)(st->entries * JLEN), "the journal");
    st->entries++;
    return state_mix(st->sum[a], st->sum[b]);
}

static void pio_finish(const struct ctx *c, void *slice) {
    struct pio_state *st = slice;
    check(c, st, "at finish");
    /* Replay the whole run from scratch and compare. */
    uint32_t count[NSLOTS] = {0};
    uint64_t sum[NSLOTS];
    for (int s = 0; s < NSLOTS; s++) sum[s] = state_mix((uint64_t)c->rank, (uint64_t)s);
    struct state_buf journal = {0}, want = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++) {
        int a, b;
        slots_of(c, iter, &a, &b);
        count[a]++, sum[a] = state_mix(sum[a], iter);
        count[b]++, sum[b] = state_mix(sum[b], iter);
        char entry[JLEN + 1];
        journal_text(entry, c, iter, a, b);
        state_buf_add(&journal, entry, JLEN);
    }
    for (int s = 0; s < NSLOTS; s++) {
        char text[SLOTLEN + 1];
        slot_text(text, c, s, count[s], sum[s]);
        state_buf_add(&want, text, SLOTLEN);
    }
    state_buf_add(&want, journal.data, journal.len);
    size_t len = 0;
    char *got = state_slurp_fd(c, SHAPE, st->fd, &len, "pio.<rank>.out");
    state_expect_bytes(c, SHAPE, "pio.<rank>.out", got, len, want.data, want.len);
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close");
    free(got);
    state_buf_free(&journal);
    state_buf_free(&want);
}

const struct shape shape_pio = {SHAPE, sizeof(struct pio_state), pio_setup, pio_reattach, pio_step,
                                pio_finish};
