/*
 * devnull: character devices. /dev/null opened O_WRONLY (every step writes
 * to it; the write must return the full length) and /dev/zero opened
 * O_RDONLY (every step reads from it; the bytes must be zeros). After a
 * restart both fds must be the same devices again (st_rdev 1:3 and 1:5),
 * with the same access modes.
 * Output: devnull.<rank>.out, the counts kept in the state region.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "devnull"

struct devnull_state {
    int32_t null_fd, zero_fd;
    uint64_t null_writes, null_bytes, zero_reads, zero_bytes;
};

static void expect_device(const struct ctx *c, int fd, unsigned minor_no, const char *what) {
    struct stat sb;
    if (fstat(fd, &sb) != 0) FAIL_ERRNO(c, "%s: fstat fd %d", what, fd);
    if (!S_ISCHR(sb.st_mode) || major(sb.st_rdev) != 1 || minor(sb.st_rdev) != minor_no)
        FAIL(c, "%s: fd %d is not character device 1:%u (mode %o, rdev %u:%u)", what, fd, minor_no,
             sb.st_mode, major(sb.st_rdev), minor(sb.st_rdev));
}

static void check(const struct ctx *c, const struct devnull_state *st, const char *when) {
    char what[128];
    snprintf(what, sizeof what, "%s, /dev/null", when);
    state_expect_fd(c, SHAPE, st->null_fd, O_WRONLY, 0, 0, what);
    expect_device(c, st->null_fd, 3, what);
    snprintf(what, sizeof what, "%s, /dev/zero", when);
    state_expect_fd(c, SHAPE, st->zero_fd, O_RDONLY, 0, 1, what);
    expect_device(c, st->zero_fd, 5, what);
}

static void devnull_setup(const struct ctx *c, void *slice) {
    struct devnull_state *st = slice;
    st->null_fd = open("/dev/null", O_WRONLY);
    if (st->null_fd < 0) FAIL_ERRNO(c, "open /dev/null");
    st->zero_fd = open("/dev/zero", O_RDONLY | O_CLOEXEC);
    if (st->zero_fd < 0) FAIL_ERRNO(c, "open /dev/zero");
}

static void devnull_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t devnull_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct devnull_state *st = slice;
    check(c, st, "before a step");
    char buf[512];
    size_t len = 64 + (size_t)(iter % 7) * 50;
    memset(buf, 'x', sizeof buf);
    ssize_t n = write(st->null_fd, buf, len);
    if (n != (ssize_t)len) FAIL_ERRNO(c, "write %zu bytes to /dev/null returned %zd", len, n);
    st->null_writes++;
    st->null_bytes += len;
    len = 32 + (size_t)(iter % 5) * 60;
    n = read(st->zero_fd, buf, len);
    if (n != (ssize_t)len) FAIL_ERRNO(c, "read %zu bytes from /dev/zero returned %zd", len, n);
    for (size_t i = 0; i < len; i++)
        if (buf[i] != 0) FAIL(c, "byte %zu read from /dev/zero is %#x", i, (unsigned char)buf[i]);
    st->zero_reads++;
    st->zero_bytes += len;
    return state_mix(st->null_bytes, st->zero_bytes);
}

static void devnull_finish(const struct ctx *c, void *slice) {
    struct devnull_state *st = slice;
    check(c, st, "at finish");
    if (st->null_writes != c->iters || st->zero_reads != c->iters)
        FAIL(c, "%" PRIu64 " writes and %" PRIu64 " reads in %" PRIu64 " steps", st->null_writes,
             st->zero_reads, c->iters);
    struct state_buf out = {0};
    state_buf_printf(&out, "rank %d: %" PRIu64 " writes, %" PRIu64 " bytes to /dev/null; %" PRIu64
                     " reads, %" PRIu64 " zero bytes from /dev/zero\n",
                     c->rank, st->null_writes, st->null_bytes, st->zero_reads, st->zero_bytes);
    char name[64];
    snprintf(name, sizeof name, "devnull.%d.out", c->rank);
    state_write_output(c, SHAPE, name, out.data, out.len);
    if (close(st->null_fd) != 0 || close(st->zero_fd) != 0) FAIL_ERRNO(c, "close");
    state_buf_free(&out);
}

const struct shape shape_devnull = {SHAPE, sizeof(struct devnull_state), devnull_setup, devnull_reattach,
                                    devnull_step, devnull_finish};
