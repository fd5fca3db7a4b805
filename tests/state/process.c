/*
 * process: what a rank changes of its process after cryo_init, on its first
 * run only (a code that sets these up once, where a restart does not come
 * again): an environment variable it reads every step, a handler for
 * SIGUSR2 and SIGURG ignored, SIGWINCH blocked, and a lower soft limit on
 * open files. Before every step all of them must be as set, after a restart
 * too.
 * Output: process.<rank>.out, a line per step with what it found.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "state.h"

#define SHAPE "process"

struct process_state {
    int32_t fd;
    uint64_t nofile; /* the soft limit it set */
};

static void on_usr2(int signal) { (void)signal; }

static void check(const struct ctx *c, const struct process_state *st, const char *when) {
    const char *scale = getenv("STATE_PROCESS_SCALE");
    if (!scale || strcmp(scale, "7") != 0)
        FAIL(c, "%s: STATE_PROCESS_SCALE is %s, set to 7 after cryo_init", when, scale ? scale : "unset");
    struct sigaction usr2, urg;
    if (sigaction(SIGUSR2, NULL, &usr2) != 0 || sigaction(SIGURG, NULL, &urg) != 0) FAIL_ERRNO(c, "sigaction");
    if (usr2.sa_handler != on_usr2) FAIL(c, "%s: SIGUSR2 has lost the handler set after cryo_init", when);
    if (urg.sa_handler != SIG_IGN) FAIL(c, "%s: SIGURG is no longer ignored", when);
    sigset_t blocked;
    if (sigprocmask(SIG_BLOCK, NULL, &blocked) != 0) FAIL_ERRNO(c, "sigprocmask");
    if (sigismember(&blocked, SIGWINCH) != 1) FAIL(c, "%s: SIGWINCH is no longer blocked", when);
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) != 0) FAIL_ERRNO(c, "getrlimit");
    if ((uint64_t)nofile.rlim_cur != st->nofile)
        FAIL(c, "%s: the soft limit on open files is %" PRIu64 ", set to %" PRIu64 " after cryo_init", when,
             (uint64_t)nofile.rlim_cur, st->nofile);
}

static void process_setup(const struct ctx *c, void *slice) {
    struct process_state *st = slice;
    char path[PATH_MAX];
    state_path(c, path, "process.%d.out", c->rank);
    st->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (st->fd < 0) FAIL_ERRNO(c, "open %s", path);
    if (setenv("STATE_PROCESS_SCALE", "7", 1) != 0) FAIL_ERRNO(c, "setenv");
    struct sigaction usr2;
    memset(&usr2, 0, sizeof usr2);
    usr2.sa_handler = on_usr2;
    sigaddset(&usr2.sa_mask, SIGTERM);
    usr2.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR2, &usr2, NULL) != 0) FAIL_ERRNO(c, "sigaction SIGUSR2");
    if (signal(SIGURG, SIG_IGN) == SIG_ERR) FAIL_ERRNO(c, "signal SIGURG");
    sigset_t winch;
    sigemptyset(&winch);
    sigaddset(&winch, SIGWINCH);
    if (sigprocmask(SIG_BLOCK, &winch, NULL) != 0) FAIL_ERRNO(c, "sigprocmask");
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) != 0) FAIL_ERRNO(c, "getrlimit");
    nofile.rlim_cur = nofile.rlim_cur > 300 ? nofile.rlim_cur - 37 : nofile.rlim_cur;
    if (setrlimit(RLIMIT_NOFILE, &nofile) != 0) FAIL_ERRNO(c, "setrlimit");
    st->nofile = (uint64_t)nofile.rlim_cur;
}

static void process_reattach(const struct ctx *c, void *slice) { check(c, slice, "after the restart"); }

static uint64_t process_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct process_state *st = slice;
    check(c, st, "before a step");
    /* The handler runs: a SIGUSR2 to itself is taken, not fatal. */
    if (raise(SIGUSR2) != 0) FAIL_ERRNO(c, "raise SIGUSR2");
    char line[128];
    int n = snprintf(line, sizeof line, "step %" PRIu64 " scale %s nofile %" PRIu64 "\n", iter,
                     getenv("STATE_PROCESS_SCALE"), st->nofile);
    if (write(st->fd, line, (size_t)n) != n) FAIL_ERRNO(c, "write");
    return state_mix(iter, st->nofile);
}

static void process_finish(const struct ctx *c, void *slice) {
    struct process_state *st = slice;
    check(c, st, "at finish");
    if (close(st->fd) != 0) FAIL_ERRNO(c, "close");
}

const struct shape shape_process = {SHAPE, sizeof(struct process_state), process_setup, process_reattach,
                                    process_step, process_finish};
