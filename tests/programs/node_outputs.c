/*
 * node_outputs.c: a code that keeps its files in the node's scratch and
 * holds none of them open at a checkpoint, as many do.
 *
 * Usage: node_outputs STEPS STEP_MS PARAMS
 *
 * At every step each rank reads PARAMS (a control file staged beside it:
 * "scale N"), opening it with fopen(.., "r") and closing it again; adds
 * step * scale to its sum and combines the sums with MPI_Allreduce; writes
 * latest-RANK.dat from the start with open(O_TRUNC), write and close(2);
 * and every 5 steps writes snap-RANK.tmp with fopen(.., "w") and fclose
 * and renames it snap-RANK-STEP.dat. It logs each step to prog-RANK.log
 * (held open, O_APPEND). At its last step it reads back every snapshot
 * and latest-RANK.dat and logs what they hold, so the log tells whether
 * each was there, whole, after a restart on another node.
 */
#include <fcntl.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cryo.h"

struct state {
    uint64_t step;
    double sum;
    int log_fd;
};

static void fail(const char *what) {
    perror(what);
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static long read_scale(const char *params) {
    FILE *in = fopen(params, "r");
    long scale = 0;
    if (!in) fail(params);
    if (fscanf(in, "scale %ld", &scale) != 1) {
        fprintf(stderr, "node_outputs: %s does not say \"scale N\"\n", params);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    fclose(in);
    return scale;
}

/* The first line of a file, without its newline. */
static void first_line(const char *name, char *out, size_t len) {
    FILE *in = fopen(name, "r");
    if (!in) fail(name);
    if (!fgets(out, (int)len, in)) out[0] = 0;
    out[strcspn(out, "\n")] = 0;
    fclose(in);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    if (argc != 4) {
        fprintf(stderr, "usage: node_outputs STEPS STEP_MS PARAMS\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int rc = cryo_init_mpi(MPI_COMM_WORLD);
    if (rc != CRYO_OK) {
        fprintf(stderr, "cryo_init_mpi: %s\n", cryo_strerror(rc));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    uint64_t steps = strtoull(argv[1], NULL, 10);
    long step_ms = strtol(argv[2], NULL, 10);
    struct state *st;
    if ((rc = cryo_region("state", sizeof *st, (void **)&st)) != CRYO_OK) {
        fprintf(stderr, "cryo_region: %s\n", cryo_strerror(rc));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    char name[64];
    if (cryo_restored_epoch() == 0) {
        snprintf(name, sizeof name, "prog-%d.log", rank);
        st->log_fd = open(name, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
        if (st->log_fd < 0) fail(name);
    }
    while (st->step < steps) {
        long scale = read_scale(argv[3]);
        st->step++;
        double mine = st->sum + (double)(st->step * (uint64_t)scale) + rank, total;
        MPI_Allreduce(&mine, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        st->sum = total;

        snprintf(name, sizeof name, "latest-%d.dat", rank);
        int latest = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (latest < 0 || dprintf(latest, "step %llu sum %.17g\n", (unsigned long long)st->step,
                                  st->sum) < 0 || close(latest) != 0)
            fail(name);
        if (st->step % 5 == 0) {
            /* Written under a temporary name, then renamed into place. */
            char temporary[64];
            snprintf(temporary, sizeof temporary, "snap-%d.tmp", rank);
            snprintf(name, sizeof name, "snap-%d-%04llu.dat", rank,
                     (unsigned long long)st->step);
            FILE *snap = fopen(temporary, "w");
            if (!snap) fail(temporary);
            fprintf(snap, "snapshot of step %llu sum %.17g\n", (unsigned long long)st->step,
                    st->sum);
            if (fclose(snap) != 0 || rename(temporary, name) != 0) fail(name);
        }
        dprintf(st->log_fd, "step %llu scale %ld sum %.17g\n", (unsigned long long)st->step,
                scale, st->sum);
        struct timespec pause = {step_ms / 1000, (step_ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
        cryo_checkpoint_point();
    }
    char line[256];
    for (uint64_t step = 5; step <= steps; step += 5) {
        snprintf(name, sizeof name, "snap-%d-%04llu.dat", rank, (unsigned long long)step);
        first_line(name, line, sizeof line);
        dprintf(st->log_fd, "read %s: %s\n", name, line);
    }
    snprintf(name, sizeof name, "latest-%d.dat", rank);
    first_line(name, line, sizeof line);
    dprintf(st->log_fd, "read %s: %s\n", name, line);
    close(st->log_fd);
    cryo_finalize();
    MPI_Finalize();
    return 0;
}
