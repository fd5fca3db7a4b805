/*
 * shared_log: every rank appends a line per step to one log, shared by
 * all ranks (O_APPEND), through a fully buffered FILE * it never flushes
 * itself, as codes that log through stdio do. Each rank's own
 * cryo_at_checkpoint hook takes its time (rank r: r x 150 ms, as a large
 * buffer to a slow filesystem does), so the ranks' buffers reach the file
 * at different moments of a checkpoint. After a restart the log must hold
 * every rank's every step once. Rank 0 prints "step N" to stdout.
 * Usage: shared_log STEPS STEP_MS
 */
#include <fcntl.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "cryo.h"

struct state {
    int64_t step;
    int64_t log_fd;
};

static void slow_flush(void *arg) {
    int rank = *(int *)arg;
    struct timespec pause = {0, rank * 150 * 1000000L};
    nanosleep(&pause, NULL);
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    if (argc < 3 || cryo_init_mpi(MPI_COMM_WORLD) != CRYO_OK)
        MPI_Abort(MPI_COMM_WORLD, 2);
    static int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    long steps = atol(argv[1]), step_ms = atol(argv[2]);
    struct state *st;
    if (cryo_region("state", sizeof *st, (void **)&st) != CRYO_OK)
        MPI_Abort(MPI_COMM_WORLD, 3);
    if (cryo_restored_epoch() == 0) {
        if (rank == 0)
            close(open("shared.log", O_WRONLY | O_CREAT | O_TRUNC, 0644));
        MPI_Barrier(MPI_COMM_WORLD);
        st->log_fd = open("shared.log", O_WRONLY | O_APPEND);
        if (st->log_fd < 0)
            MPI_Abort(MPI_COMM_WORLD, 4);
    }
    FILE *log = fdopen((int)st->log_fd, "a");
    setvbuf(log, NULL, _IOFBF, 1 << 16);
    cryo_at_checkpoint(slow_flush, &rank);
    while (st->step < steps) {
        struct timespec pause = {step_ms / 1000, (step_ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
        MPI_Barrier(MPI_COMM_WORLD);
        st->step++;
        fprintf(log, "rank %d step %ld\n", rank, (long)st->step);
        if (rank == 0) {
            printf("step %ld\n", (long)st->step);
            fflush(stdout);
        }
        cryo_checkpoint_point();
    }
    fclose(log);
    cryo_finalize();
    MPI_Finalize();
    return 0;
}
