/*
 * map_private: the program writes an input file at setup, mmap()s it itself
 * (MAP_PRIVATE, read-write, plain mmap after cryo_init) and closes the fd.
 * Every step read-modify-writes eight of its 1024 words in the private copy;
 * before every step the whole mapping must hash to the fingerprint kept in
 * the state region. A restart must put the mapping back at the same address
 * with its private contents as of the checkpoint (re-mapping the pristine
 * file would lose every update), and the input file must never change.
 * Outputs: map_private.<rank>.in (the input, checked unchanged at finish)
 * and map_private.<rank>.out (the private mapping's contents).
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

#define SHAPE "map_private"
#define NWORDS 1024
#define MAPLEN (NWORDS * sizeof(uint64_t))

struct map_private_state {
    uint64_t addr;        /* the mapping */
    uint64_t fingerprint; /* hash of the mapping's contents */
};

static uint64_t fingerprint(const uint64_t *w) {
    uint64_t h = 0;
    for (size_t i = 0; i < NWORDS; i++) h = state_mix(h, w[i]);
    return h;
}

static void input_words(uint64_t *w, const struct ctx *c) {
    for (size_t i = 0; i < NWORDS; i++) w[i] = state_mix(0x707276 + (uint64_t)c->rank, i);
}

static void update_words(uint64_t *w, const struct ctx *c, uint64_t iter) {
    for (uint64_t j = 0; j < 8; j++) {
        size_t i = (size_t)(state_mix((uint64_t)c->rank, iter * 8 + j) % NWORDS);
        w[i] = state_mix(w[i], iter + j);
    }
}

static void check(const struct ctx *c, const struct map_private_state *st, const char *when) {
    const uint64_t *w = (const uint64_t *)(uintptr_t)st->addr;
    state_expect_mapped(c, SHAPE, w, MAPLEN, when);
    char perms[5];
    uint64_t ino = 0;
    if (!state_mapping_at(w, perms, &ino)) FAIL(c, "%s: no mapping at %p in /proc/self/maps", when, (void *)w);
    if (strncmp(perms, "rw", 2) != 0 || perms[3] != 'p')
        FAIL(c, "%s: the mapping at %p is %s, expected rw-p", when, (void *)w, perms);
    uint64_t got = fingerprint(w);
    if (got != st->fingerprint)
        FAIL(c, "%s: the mapping's contents hash to %016" PRIx64 ", the state region expects %016" PRIx64
             " (lost or stale updates)", when, got, st->fingerprint);
}

static void map_private_setup(const struct ctx *c, void *slice) {
    struct map_private_state *st = slice;
    uint64_t words[NWORDS];
    input_words(words, c);
    char name[64], path[PATH_MAX];
    snprintf(name, sizeof name, "map_private.%d.in", c->rank);
    state_write_output(c, SHAPE, name, words, MAPLEN);
    state_path(c, path, "%s", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) FAIL_ERRNO(c, "open %s", path);
    void *p = mmap(NULL, MAPLEN, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) FAIL_ERRNO(c, "mmap %s", path);
    if (close(fd) != 0) FAIL_ERRNO(c, "close %s", path);
    st->addr = (uint64_t)(uintptr_t)p;
    st->fingerprint = fingerprint(p);
}

static void map_private_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t map_private_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct map_private_state *st = slice;
    check(c, st, "before a step");
    uint64_t *w = (uint64_t *)(uintptr_t)st->addr;
    update_words(w, c, iter);
    st->fingerprint = fingerprint(w);
    return st->fingerprint;
}

static void map_private_finish(const struct ctx *c, void *slice) {
    struct map_private_state *st = slice;
    check(c, st, "at finish");
    uint64_t *w = (uint64_t *)(uintptr_t)st->addr;
    uint64_t *want = malloc(MAPLEN);
    if (!want) FAIL(c, "malloc");

    /* The input file is as setup wrote it. */
    char path[PATH_MAX];
    state_path(c, path, "map_private.%d.in", c->rank);
    input_words(want, c);
    state_expect_file(c, SHAPE, path, "the input file (MAP_PRIVATE writes must not reach it)",
                      (const char *)want, MAPLEN);

    for (uint64_t iter = 0; iter < c->iters; iter++) update_words(want, c, iter);
    state_expect_bytes(c, SHAPE, "the private mapping", (const char *)w, MAPLEN, (const char *)want, MAPLEN);
    char name[64];
    snprintf(name, sizeof name, "map_private.%d.out", c->rank);
    state_write_output(c, SHAPE, name, w, MAPLEN);
    if (munmap(w, MAPLEN) != 0) FAIL_ERRNO(c, "munmap");
    free(want);
}

const struct shape shape_map_private = {SHAPE, sizeof(struct map_private_state), map_private_setup,
                                        map_private_reattach, map_private_step, map_private_finish};
