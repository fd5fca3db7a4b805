/*
 * map_shared: the program mmap()s a file itself (MAP_SHARED, read-write,
 * plain mmap after cryo_init, not cryo_region_file) and closes the fd, so
 * only the mapping holds the file. Every step read-modify-writes eight of
 * its 1024 counters; before every step the whole mapping must hash to the
 * fingerprint kept in the state region. A restart must put the mapping back
 * at the same address (the pointer lives in the state region and is not
 * re-mapped), shared and backed by the same file, holding the contents as
 * of the checkpoint: steps run after the checkpoint already changed the
 * file, and replaying them on those contents would change the counters.
 * Output: map_shared.<rank>.out, the file itself (msync'ed at finish).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "map_shared"
#define NWORDS 1024
#define MAPLEN (NWORDS * sizeof(uint64_t))

struct map_shared_state {
    uint64_t addr;        /* the mapping */
    uint64_t ino;         /* the file's inode */
    uint64_t fingerprint; /* hash of the mapping's contents */
};

static uint64_t fingerprint(const uint64_t *w) {
    uint64_t h = 0;
    for (size_t i = 0; i < NWORDS; i++) h = state_mix(h, w[i]);
    return h;
}

static void init_words(uint64_t *w, const struct ctx *c) {
    for (size_t i = 0; i < NWORDS; i++) w[i] = state_mix((uint64_t)c->rank, i);
}

static void update_words(uint64_t *w, const struct ctx *c, uint64_t iter) {
    for (uint64_t j = 0; j < 8; j++) {
        size_t i = (size_t)(state_mix(iter * 8 + j, (uint64_t)c->rank) % NWORDS);
        w[i] = state_mix(w[i], iter * 8 + j);
    }
}

static void check(const struct ctx *c, const struct map_shared_state *st, const char *when) {
    const uint64_t *w = (const uint64_t *)(uintptr_t)st->addr;
    state_expect_mapped(c, SHAPE, w, MAPLEN, when);
    char perms[5];
    uint64_t ino = 0;
    if (!state_mapping_at(w, perms, &ino)) FAIL(c, "%s: no mapping at %p in /proc/self/maps", when, (void *)w);
    if (strcmp(perms, "rw-s") != 0) FAIL(c, "%s: the mapping at %p is %s, expected rw-s", when, (void *)w, perms);
    if (ino != st->ino)
        FAIL(c, "%s: the mapping at %p maps inode %" PRIu64 ", not map_shared.%d.out (%" PRIu64 ")", when,
             (void *)w, ino, c->rank, st->ino);
    uint64_t got = fingerprint(w);
    if (got != st->fingerprint)
        FAIL(c, "%s: the mapping's contents hash to %016" PRIx64 ", the state region expects %016" PRIx64
             " (stale or lost updates)", when, got, st->fingerprint);
}

static void map_shared_setup(const struct ctx *c, void *slice) {
    struct map_shared_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "map_shared.%d.out", c->rank);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) FAIL_ERRNO(c, "open %s", path);
    if (ftruncate(fd, (off_t)MAPLEN) != 0) FAIL_ERRNO(c, "ftruncate %s", path);
    struct stat sb;
    if (fstat(fd, &sb) != 0) FAIL_ERRNO(c, "fstat %s", path);
    void *p = mmap(NULL, MAPLEN, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) FAIL_ERRNO(c, "mmap %s", path);
    if (close(fd) != 0) FAIL_ERRNO(c, "close %s", path);
    init_words(p, c);
    st->addr = (uint64_t)(uintptr_t)p;
    st->ino = sb.st_ino;
    st->fingerprint = fingerprint(p);
}

static void map_shared_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t map_shared_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct map_shared_state *st = slice;
    check(c, st, "before a step");
    uint64_t *w = (uint64_t *)(uintptr_t)st->addr;
    update_words(w, c, iter);
    st->fingerprint = fingerprint(w);
    return st->fingerprint;
}

static void map_shared_finish(const struct ctx *c, void *slice) {
    struct map_shared_state *st = slice;
    check(c, st, "at finish");
    uint64_t *w = (uint64_t *)(uintptr_t)st->addr;
    uint64_t *want = malloc(MAPLEN);
    if (!want) FAIL(c, "malloc");
    init_words(want, c);
    for (uint64_t iter = 0; iter < c->iters; iter++) update_words(want, c, iter);
    state_expect_bytes(c, SHAPE, "the mapping", (const char *)w, MAPLEN, (const char *)want, MAPLEN);
    if (msync(w, MAPLEN, MS_SYNC) != 0) FAIL_ERRNO(c, "msync");
    if (munmap(w, MAPLEN) != 0) FAIL_ERRNO(c, "munmap");
    char path[PATH_MAX];
    state_path(c, path, "map_shared.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, (const char *)want, MAPLEN);
    free(want);
}

const struct shape shape_map_shared = {SHAPE, sizeof(struct map_shared_state), map_shared_setup,
                                       map_shared_reattach, map_shared_step, map_shared_finish};
