/*
 * plain_mpi: an MPI program that never calls cryo_init, as a job started
 * under cryo before it was ported. Usage: plain_mpi SECONDS.
 */
#include <mpi.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int seconds = argc > 1 ? atoi(argv[1]) : 60;
    for (int i = 0; i < seconds; i++) {
        sleep(1);
        MPI_Barrier(MPI_COMM_WORLD);
    }
    MPI_Finalize();
    return 0;
}
