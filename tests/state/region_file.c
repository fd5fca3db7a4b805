/*
 * region_file: the program keeps a field in a shared file region
 * (cryo_region_file with shared = 1), registered again at every start. Every
 * step read-modify-writes eight of its 1024 counters; before every step the
 * region must hash to the fingerprint kept in the state region. A restart
 * must give the file its contents as of the checkpoint: steps run after the
 * checkpoint already changed the file, and replaying them on those contents
 * would change the counters.
 * Output: region_file.<rank>.out, the file itself.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cryo.h"
#include "state.h"

#define SHAPE "region_file"
#define NWORDS 1024
#define MAPLEN (NWORDS * sizeof(uint64_t))

struct region_file_state {
    uint64_t fingerprint; /* hash of the region's contents */
};

static uint64_t *words;

static uint64_t fingerprint(const uint64_t *w) {
    uint64_t h = 0;
    for (size_t i = 0; i < NWORDS; i++) h = state_mix(h, w[i]);
    return h;
}

static void init_words(uint64_t *w, const struct ctx *c) {
    for (size_t i = 0; i < NWORDS; i++) w[i] = state_mix((uint64_t)c->rank + 7, i);
}

static void update_words(uint64_t *w, const struct ctx *c, uint64_t iter) {
    for (uint64_t j = 0; j < 8; j++) {
        size_t i = (size_t)(state_mix(iter * 8 + j, (uint64_t)c->rank + 7) % NWORDS);
        w[i] = state_mix(w[i], iter * 8 + j);
    }
}

static void attach(const struct ctx *c) {
    char path[PATH_MAX];
    state_path(c, path, "region_file.%d.out", c->rank);
    size_t len = 0;
    int rc = cryo_region_file("region_file", path, 0, MAPLEN, 1, (void **)&words, &len);
    if (rc != CRYO_OK) FAIL(c, "cryo_region_file %s: %s", path, cryo_strerror(rc));
    if (len != MAPLEN) FAIL(c, "cryo_region_file %s: %zu bytes, expected %zu", path, len, (size_t)MAPLEN);
}

static void check(const struct ctx *c, const struct region_file_state *st, const char *when) {
    uint64_t got = fingerprint(words);
    if (got != st->fingerprint)
        FAIL(c, "%s: the shared file region hashes to %016" PRIx64 ", the state region expects %016" PRIx64
             " (its file was not put back to the checkpoint)", when, got, st->fingerprint);
}

static void region_file_setup(const struct ctx *c, void *slice) {
    struct region_file_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "region_file.%d.out", c->rank);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) FAIL_ERRNO(c, "open %s", path);
    if (ftruncate(fd, (off_t)MAPLEN) != 0) FAIL_ERRNO(c, "ftruncate %s", path);
    if (close(fd) != 0) FAIL_ERRNO(c, "close %s", path);
    attach(c);
    init_words(words, c);
    st->fingerprint = fingerprint(words);
}

static void region_file_reattach(const struct ctx *c, void *slice) {
    attach(c);
    check(c, slice, "after the restart");
}

static uint64_t region_file_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct region_file_state *st = slice;
    check(c, st, "before a step");
    update_words(words, c, iter);
    st->fingerprint = fingerprint(words);
    return st->fingerprint;
}

static void region_file_finish(const struct ctx *c, void *slice) {
    struct region_file_state *st = slice;
    check(c, st, "at finish");
    uint64_t *want = malloc(MAPLEN);
    if (!want) FAIL(c, "malloc");
    init_words(want, c);
    for (uint64_t iter = 0; iter < c->iters; iter++) update_words(want, c, iter);
    state_expect_bytes(c, SHAPE, "the region", (const char *)words, MAPLEN, (const char *)want, MAPLEN);
    if (msync(words, MAPLEN, MS_SYNC) != 0) FAIL_ERRNO(c, "msync");
    char path[PATH_MAX];
    state_path(c, path, "region_file.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, (const char *)want, MAPLEN);
    free(want);
}

const struct shape shape_region_file = {SHAPE, sizeof(struct region_file_state), region_file_setup,
                                        region_file_reattach, region_file_step, region_file_finish};
