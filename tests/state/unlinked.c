/*
 * unlinked: scratch files that have no name. Three of them, each appended
 * to with write() every step:
 *   - a file created in OUTDIR and unlink()ed at once;
 *   - an O_TMPFILE file in OUTDIR (never had a name), opened with
 *     O_NOFOLLOW as Python's tempfile.TemporaryFile does;
 *   - the fd of a tmpfile() (in $TMPDIR or /tmp), dup()ed, the FILE closed.
 * The first is also open a second time, read-only, through
 * /proc/self/fd/<fd> (as a Fortran unit reconnected to a scratch file's fd
 * is): a reader with its own offset that must reach the same file after a
 * restart, reading back each line as it is written.
 * At finish each one's whole contents are read back with pread from 0 and
 * written, in order, to unlinked.<rank>.out. A restart must bring back the
 * contents as of the checkpoint (no name to re-open them by), keep them
 * nameless (st_nlink 0, no file left behind in OUTDIR) and the offsets.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "unlinked"
#define NSCRATCH 3

struct unlinked_state {
    int32_t fd[NSCRATCH];
    int32_t pad;
    int64_t bytes[NSCRATCH];
    int32_t reader;
    int32_t pad2;
};

static const char *const kind[NSCRATCH] = {"unlinked at once", "O_TMPFILE", "tmpfile()"};

static void add_line(struct state_buf *b, const struct ctx *c, uint64_t iter, int k) {
    state_buf_printf(b, "scratch %d rank %d step %03" PRIu64 " %016" PRIx64 "\n", k, c->rank, iter,
                     state_mix(iter, (uint64_t)(c->rank * NSCRATCH + k)));
}

static void check(const struct ctx *c, const struct unlinked_state *st, const char *when) {
    for (int k = 0; k < NSCRATCH; k++) {
        char what[128];
        snprintf(what, sizeof what, "%s, the %s scratch file", when, kind[k]);
        state_expect_fd(c, SHAPE, st->fd[k], O_RDWR, 0, k == 0, what);
        state_expect_offset(c, SHAPE, st->fd[k], st->bytes[k], what);
        state_expect_size(c, SHAPE, st->fd[k], st->bytes[k], what);
        struct stat sb;
        if (fstat(st->fd[k], &sb) != 0) FAIL_ERRNO(c, "%s: fstat", what);
        if (!S_ISREG(sb.st_mode)) FAIL(c, "%s: not a regular file (mode %o)", what, sb.st_mode);
        if (sb.st_nlink != 0) FAIL(c, "%s: has %ju names, expected none", what, (uintmax_t)sb.st_nlink);
    }
    char what[128];
    snprintf(what, sizeof what, "%s, the second open of the %s scratch file", when, kind[0]);
    state_expect_fd(c, SHAPE, st->reader, O_RDONLY, 0, 0, what);
    state_expect_offset(c, SHAPE, st->reader, 0, what);
    struct stat first, second;
    if (fstat(st->fd[0], &first) != 0 || fstat(st->reader, &second) != 0) FAIL_ERRNO(c, "%s: fstat", what);
    if (first.st_dev != second.st_dev || first.st_ino != second.st_ino)
        FAIL(c, "%s: not the same file as fd %d", what, st->fd[0]);
}

static void unlinked_setup(const struct ctx *c, void *slice) {
    struct unlinked_state *st = slice;
    char path[PATH_MAX];

    state_path(c, path, "unlinked.%d.scratch", c->rank);
    st->fd[0] = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (st->fd[0] < 0) FAIL_ERRNO(c, "open %s", path);
    if (unlink(path) != 0) FAIL_ERRNO(c, "unlink %s", path);
    char again[64];
    snprintf(again, sizeof again, "/proc/self/fd/%d", st->fd[0]);
    st->reader = open(again, O_RDONLY);
    if (st->reader < 0) FAIL_ERRNO(c, "open %s", again);

    st->fd[1] = open(c->dir, O_TMPFILE | O_RDWR | O_NOFOLLOW, 0600);
    if (st->fd[1] < 0) {
        /* A file system without O_TMPFILE: the same, with a short-lived name. */
        if (errno != EOPNOTSUPP && errno != EISDIR) FAIL_ERRNO(c, "open(%s, O_TMPFILE)", c->dir);
        state_path(c, path, "unlinked.%d.tmpfile", c->rank);
        st->fd[1] = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, 0600);
        if (st->fd[1] < 0 || unlink(path) != 0) FAIL_ERRNO(c, "open and unlink %s", path);
    }

    FILE *f = tmpfile();
    if (!f) FAIL_ERRNO(c, "tmpfile()");
    st->fd[2] = dup(fileno(f));
    if (st->fd[2] < 0) FAIL_ERRNO(c, "dup(fileno(tmpfile()))");
    fclose(f);
}

static void unlinked_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t unlinked_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct unlinked_state *st = slice;
    check(c, st, "before a step");
    uint64_t sum = 0;
    for (int k = 0; k < NSCRATCH; k++) {
        struct state_buf line = {0};
        add_line(&line, c, iter, k);
        state_write_all(c, SHAPE, st->fd[k], line.data, line.len, kind[k]);
        if (k == 0) {
            char back[256];
            if (line.len > sizeof back) FAIL(c, "a line of %zu bytes", line.len);
            ssize_t got = pread(st->reader, back, line.len, st->bytes[k]);
            if (got != (ssize_t)line.len || memcmp(back, line.data, line.len) != 0)
                FAIL(c, "the second open of the %s scratch file does not read step %" PRIu64 "'s line back",
                     kind[k], iter);
        }
        st->bytes[k] += (int64_t)line.len;
        sum = state_mix(sum, line.len);
        state_buf_free(&line);
    }
    return sum;
}

static void unlinked_finish(const struct ctx *c, void *slice) {
    struct unlinked_state *st = slice;
    check(c, st, "at finish");
    struct state_buf out = {0}, want = {0};
    for (int k = 0; k < NSCRATCH; k++) {
        size_t len = 0;
        char *got = state_slurp_fd(c, SHAPE, st->fd[k], &len, kind[k]);
        state_buf_printf(&out, "== %s: %zu bytes\n", kind[k], len);
        state_buf_add(&out, got, len);
        struct state_buf lines = {0};
        for (uint64_t iter = 0; iter < c->iters; iter++) add_line(&lines, c, iter, k);
        state_buf_printf(&want, "== %s: %zu bytes\n", kind[k], lines.len);
        state_buf_add(&want, lines.data, lines.len);
        state_buf_free(&lines);
        free(got);
        if (close(st->fd[k]) != 0) FAIL_ERRNO(c, "close the %s scratch file", kind[k]);
    }
    if (close(st->reader) != 0) FAIL_ERRNO(c, "close the second open of the %s scratch file", kind[0]);
    char name[64];
    snprintf(name, sizeof name, "unlinked.%d.out", c->rank);
    state_write_output(c, SHAPE, name, out.data, out.len);
    state_expect_bytes(c, SHAPE, "the scratch files' contents", out.data, out.len, want.data, want.len);
    state_buf_free(&out);
    state_buf_free(&want);
}

const struct shape shape_unlinked = {SHAPE, sizeof(struct unlinked_state), unlinked_setup,
                                     unlinked_reattach, unlinked_step, unlinked_finish};
