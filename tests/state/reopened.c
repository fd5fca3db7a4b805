/*
 * reopened: logs that the program opens, appends to and closes at every
 * step, so that no fd is open at a checkpoint: its own log with
 * fopen(path, "a"), another of its own with open(O_APPEND), write and
 * close alone, and a log all ranks share, reached through open(O_APPEND)
 * and fdopen, which the ranks append to in turn. A restart
 * must cut both back to their size at the checkpoint, or the steps it runs
 * again log their lines twice. Lines vary in length, so a lost or repeated
 * line shifts everything after it.
 * Output: reopened.<rank>.out, reopened.raw.<rank>.out and
 * reopened.shared.out, also checked at
 * finish; after a restart each log is checked against its recorded size.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "reopened"

struct reopened_state {
    int64_t own_bytes;    /* this rank's log, as of the last step */
    int64_t raw_bytes;    /* its log written with write(2) */
    int64_t shared_bytes; /* the shared log */
};

static void own_line(struct state_buf *b, const struct ctx *c, uint64_t iter) {
    state_buf_printf(b, "reopened rank %d step %03" PRIu64 " ", c->rank, iter);
    uint64_t words = 1 + state_mix(iter, (uint64_t)c->rank + 7) % 5;
    for (uint64_t w = 0; w < words; w++) state_buf_printf(b, "v%" PRIu64, w);
    state_buf_printf(b, "\n");
}

static void shared_line(struct state_buf *b, int rank, uint64_t iter) {
    state_buf_printf(b, "shared step %03" PRIu64 " from rank %d", iter, rank);
    for (uint64_t w = 0; w < state_mix(iter, (uint64_t)rank) % 4; w++) state_buf_printf(b, " s%" PRIu64, w);
    state_buf_printf(b, "\n");
}

static int64_t size_of(const struct ctx *c, const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) FAIL_ERRNO(c, "stat %s", path);
    return (int64_t)st.st_size;
}

static void reopened_setup(const struct ctx *c, void *slice) {
    (void)slice;
    char path[PATH_MAX];
    state_path(c, path, "reopened.%d.out", c->rank);
    FILE *f = fopen(path, "w");
    if (!f) FAIL_ERRNO(c, "create %s", path);
    if (fclose(f) != 0) FAIL_ERRNO(c, "fclose %s", path);
    state_path(c, path, "reopened.raw.%d.out", c->rank);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || close(fd) != 0) FAIL_ERRNO(c, "create %s", path);
    if (c->rank == 0) {
        state_path(c, path, "reopened.shared.out");
        f = fopen(path, "w");
        if (!f) FAIL_ERRNO(c, "create %s", path);
        if (fclose(f) != 0) FAIL_ERRNO(c, "fclose %s", path);
    }
    MPI_Barrier(MPI_COMM_WORLD);
}

static void reopened_reattach(const struct ctx *c, void *slice) {
    struct reopened_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "reopened.%d.out", c->rank);
    int64_t own = size_of(c, path);
    if (own != st->own_bytes)
        FAIL(c, "after the restart its own log is %" PRId64 " bytes, %" PRId64 " at the checkpoint", own,
             st->own_bytes);
    state_path(c, path, "reopened.raw.%d.out", c->rank);
    int64_t raw = size_of(c, path);
    if (raw != st->raw_bytes)
        FAIL(c, "after the restart the log it writes with write(2) is %" PRId64 " bytes, %" PRId64
             " at the checkpoint", raw, st->raw_bytes);
    state_path(c, path, "reopened.shared.out");
    int64_t shared = size_of(c, path);
    if (shared != st->shared_bytes)
        FAIL(c, "after the restart the shared log is %" PRId64 " bytes, %" PRId64 " at the checkpoint", shared,
             st->shared_bytes);
    /* No rank appends to the shared log before every rank has looked. */
    MPI_Barrier(MPI_COMM_WORLD);
}

static uint64_t reopened_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct reopened_state *st = slice;
    char path[PATH_MAX];
    struct state_buf line = {0};
    own_line(&line, c, iter);
    state_path(c, path, "reopened.%d.out", c->rank);
    FILE *f = fopen(path, "a");
    if (!f) FAIL_ERRNO(c, "fopen %s for appending", path);
    if (fwrite(line.data, 1, line.len, f) != line.len) FAIL_ERRNO(c, "fwrite %s", path);
    if (fclose(f) != 0) FAIL_ERRNO(c, "fclose %s", path);
    st->own_bytes += (int64_t)line.len;
    uint64_t sum = state_mix(iter, line.len);

    /* The same line, through open(O_APPEND), write(2) and close(2) alone. */
    state_path(c, path, "reopened.raw.%d.out", c->rank);
    int fd = open(path, O_WRONLY | O_APPEND);
    if (fd < 0) FAIL_ERRNO(c, "open %s with O_APPEND", path);
    state_write_all(c, SHAPE, fd, line.data, line.len, "the log written with write(2)");
    if (close(fd) != 0) FAIL_ERRNO(c, "close %s", path);
    st->raw_bytes += (int64_t)line.len;
    state_buf_free(&line);

    /* The ranks take turns, so the shared log is the same in every run. */
    state_path(c, path, "reopened.shared.out");
    for (int r = 0; r < c->size; r++) {
        if (r == c->rank) {
            struct state_buf mine = {0};
            shared_line(&mine, r, iter);
            int fd = open(path, O_WRONLY | O_APPEND);
            if (fd < 0) FAIL_ERRNO(c, "open %s with O_APPEND", path);
            FILE *s = fdopen(fd, "a");
            if (!s) FAIL_ERRNO(c, "fdopen %s", path);
            if (fputs(mine.data, s) == EOF) FAIL_ERRNO(c, "fputs %s", path);
            if (fclose(s) != 0) FAIL_ERRNO(c, "fclose %s", path);
            state_buf_free(&mine);
        }
        MPI_Barrier(MPI_COMM_WORLD);
    }
    st->shared_bytes = size_of(c, path);
    return state_mix(sum, (uint64_t)st->shared_bytes);
}

static void reopened_finish(const struct ctx *c, void *slice) {
    (void)slice;
    struct state_buf want = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++) own_line(&want, c, iter);
    char path[PATH_MAX];
    state_path(c, path, "reopened.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_path(c, path, "reopened.raw.%d.out", c->rank);
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
    struct state_buf shared = {0};
    for (uint64_t iter = 0; iter < c->iters; iter++)
        for (int r = 0; r < c->size; r++) shared_line(&shared, r, iter);
    state_path(c, path, "reopened.shared.out");
    state_expect_file(c, SHAPE, path, path, shared.data, shared.len);
    state_buf_free(&shared);
}

const struct shape shape_reopened = {SHAPE, sizeof(struct reopened_state), reopened_setup, reopened_reattach,
                                     reopened_step, reopened_finish};
