/* Finishes its work, says goodbye to cryo (cryo_finalize), then hangs
 * where MPI_Finalize would: what MPICH over UCX's TCP transport sometimes
 * does. `cryo run --finalize-timeout` must stop its launcher. */
#include <mpi.h>
#include <stdio.h>
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
    MPI_Barrier(MPI_COMM_WORLD);
    printf("rank %d done\n", rank);
    fflush(stdout);
    cryo_finalize();
    for (;;) pause();
}
