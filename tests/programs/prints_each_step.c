/*
 * prints_each_step.c: an MPI program whose only output is one line per rank
 * and step on stdout, "rank R step S acc A", where A sums an allreduce over
 * the steps so far: a restart that ran a step twice or lost one prints a
 * line an uninterrupted run never prints.
 *
 * Usage: prints_each_step STEPS STEP_MS [MODE]
 *
 * With MODE ("w" or "a"), each rank first sends its stdout to the file
 * out.<rank> with freopen in that mode, before cryo_init, as codes that keep
 * one log per rank do: a restart runs that freopen again (emptying the file
 * with "w") and must give the file back as it was at the checkpoint.
 *
 * With MODE "fopen" or "open", each rank writes out.<rank> instead, opened
 * after cryo_init at every start with fopen(name, "w") or open(name,
 * O_WRONLY | O_CREAT | O_TRUNC): a port that does not keep the fd in a
 * region. With MODE "freopen" it sends stdout there with freopen(name, "w",
 * stdout) after cryo_init (where a port adds cryo_init: right after
 * MPI_Init). A restart's open must continue the file held at the
 * checkpoint, not empty it.
 */
#include <fcntl.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cryo.h"

struct state {
    uint64_t step;
    double acc;
};

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    if (argc < 3) {
        fprintf(stderr, "usage: prints_each_step STEPS STEP_MS\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    const char *mode = argc > 3 ? argv[3] : "";
    int opens_after_init =
        !strcmp(mode, "fopen") || !strcmp(mode, "open") || !strcmp(mode, "freopen");
    if (argc > 3 && !opens_after_init) {
        int me;
        MPI_Comm_rank(MPI_COMM_WORLD, &me);
        char name[64];
        snprintf(name, sizeof name, "out.%d", me);
        if (!freopen(name, argv[3], stdout)) {
            perror(name);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    int rc = cryo_init_mpi(MPI_COMM_WORLD);
    if (rc != CRYO_OK) {
        fprintf(stderr, "prints_each_step: cryo_init_mpi: %s\n", cryo_strerror(rc));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    struct state *st;
    rc = cryo_region("state", sizeof *st, (void **)&st);
    if (rc != CRYO_OK) {
        fprintf(stderr, "prints_each_step: cryo_region: %s\n", cryo_strerror(rc));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    FILE *out = stdout;
    if (opens_after_init) {
        char name[64];
        snprintf(name, sizeof name, "out.%d", rank);
        if (!strcmp(mode, "fopen")) {
            out = fopen(name, "w");
        } else if (!strcmp(mode, "freopen")) {
            out = freopen(name, "w", stdout);
        } else {
            int fd = open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            out = fd < 0 ? NULL : fdopen(fd, "w");
        }
        if (!out) {
            perror(name);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    uint64_t steps = strtoull(argv[1], NULL, 10);
    long step_ms = atol(argv[2]);
    while (st->step < steps) {
        struct timespec pause = {step_ms / 1000, (step_ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
        double mine = (double)(st->step + (uint64_t)rank), sum = 0;
        MPI_Allreduce(&mine, &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        st->acc += sum;
        fprintf(out, "rank %d step %llu acc %.1f\n", rank, (unsigned long long)st->step, st->acc);
        fflush(out);
        st->step++;
        cryo_checkpoint_point();
    }
    cryo_finalize();
    MPI_Finalize();
    return 0;
}
