/* Rank 0 waits; rank 1 passes a few safe points and then leaves as
 * argv[1] says: "exit" calls exit(7) (as a rank that finds bad input
 * does, or Fortran's STOP 7), "abort" calls MPI_Abort(MPI_COMM_WORLD, 7).
 * The launcher then kills rank 0. `cryo run` must name how the job's first
 * rank left. "vanish": every rank finalizes MPI and leaves with _exit(0),
 * without cryo_finalize, as a node failure ends ranks under a launcher that
 * still ends well: the job must not count as finished. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cryo.h"

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rc = cryo_init_mpi(MPI_COMM_WORLD);
    if (rc != CRYO_OK) {
        fprintf(stderr, "cryo_init_mpi: %s\n", cryo_strerror(rc));
        return 1;
    }
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (argc > 1 && strcmp(argv[1], "vanish") == 0) {
        for (int step = 0; step < 5; step++) {
            cryo_checkpoint_point();
            usleep(20000);
        }
        MPI_Finalize();
        _exit(0);
    }
    if (rank == 0) {
        /* Long after rank 1 has left, if the launcher has not killed it. */
        sleep(5);
        _exit(0);
    }
    for (int step = 0; step < 5; step++) {
        cryo_checkpoint_point();
        usleep(20000);
    }
    if (argc > 1 && strcmp(argv[1], "abort") == 0)
        MPI_Abort(MPI_COMM_WORLD, 7);
    exit(7);
}
