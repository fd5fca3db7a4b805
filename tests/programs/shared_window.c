/*
 * shared_window: an MPI-3 shared-memory window (MPI_Win_allocate_shared on
 * each node's communicator). Each rank registers its own segment with
 * cryo_protect, and every step its node neighbour writes 64 entries of it
 * by plain stores: the owner never writes its segment itself. A checkpoint
 * must save what the neighbours wrote, the incremental ones too.
 *
 * Usage: shared_window STEPS STEP_MS OUT. Rank 0 prints "step N" after each
 * step and writes each rank's weighted sum of its segment to OUT at the end.
 */
#define _GNU_SOURCE
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "cryo.h"

#define N 8192 /* doubles per segment: 64 KiB */

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: shared_window STEPS STEP_MS OUT\n");
        return 2;
    }
    int64_t steps = atoll(argv[1]);
    int step_ms = atoi(argv[2]);
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (cryo_init_mpi(MPI_COMM_WORLD) != CRYO_OK) MPI_Abort(MPI_COMM_WORLD, 1);
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node);
    int node_rank, node_size;
    MPI_Comm_rank(node, &node_rank);
    MPI_Comm_size(node, &node_size);
    double *mine, *right;
    MPI_Win win;
    MPI_Win_allocate_shared(N * sizeof(double), sizeof(double), MPI_INFO_NULL, node, &mine, &win);
    MPI_Aint right_size;
    int unit;
    MPI_Win_shared_query(win, (node_rank + 1) % node_size, &right_size, &unit, &right);
    int64_t *step;
    if (cryo_region("step", sizeof *step, (void **)&step) != CRYO_OK) MPI_Abort(MPI_COMM_WORLD, 1);
    if (cryo_restored_epoch() == 0)
        for (int i = 0; i < N; i++) mine[i] = rank * 1000.0 + i;
    int rc = cryo_protect("segment", mine, N * sizeof(double));
    if (rc != CRYO_OK) {
        fprintf(stderr, "cryo_protect: %s\n", cryo_strerror(rc));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    /* Every segment is back before any neighbour writes into it. */
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Win_lock_all(MPI_MODE_NOCHECK, win);
    while (*step < steps) {
        int64_t s = *step;
        for (int k = 0; k < 64; k++) {
            int i = (int)((s * 131 + k * 97) % N);
            right[i] = right[i] * 0.5 + (double)(s + k);
        }
        MPI_Win_sync(win);
        MPI_Barrier(node);
        MPI_Win_sync(win);
        *step = s + 1;
        if (rank == 0) {
            printf("step %lld\n", (long long)*step);
            fflush(stdout);
        }
        cryo_checkpoint_point();
        usleep((useconds_t)step_ms * 1000);
    }
    MPI_Win_unlock_all(win);
    double sum = 0;
    for (int i = 0; i < N; i++) sum += mine[i] * (i + 1);
    double *sums = malloc(sizeof(double) * (size_t)size);
    MPI_Gather(&sum, 1, MPI_DOUBLE, sums, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        FILE *out = fopen(argv[3], "w");
        if (!out) MPI_Abort(MPI_COMM_WORLD, 1);
        for (int r = 0; r < size; r++) fprintf(out, "rank %d %.17g\n", r, sums[r]);
        fclose(out);
    }
    free(sums);
    cryo_finalize();
    MPI_Win_free(&win);
    MPI_Finalize();
    return 0;
}
