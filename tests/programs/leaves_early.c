/* Rank 0 waits; rank 1 passes a few safe points and then leaves as
 * argv[1] says: "exit" calls exit(7) (as a rank that finds bad input
 * does, or Fortran's STOP 7), "abort" calls MPI_Abort(MPI_COMM_WORLD, 7).
 * The launcher then kills rank 0. `cryo run` must name how the job's first
 * rank left. "vanish": every rank finalizes MPI and leaves with _exit(0),
 * without cryo_finalize, as a node failure ends ranks under a launcher that
 * still ends well: the job must not count as finished. "helper": every
 * rank starts a helper in a session of its own (a shell that sleeps,
 * named after the working directory), as a daemon that outlives it, and
 * finishes. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/syscall.h>
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
    if (argc > 1 && strcmp(argv[1], "helper") == 0) {
        char cwd[2048], name[2100];
        if (!getcwd(cwd, sizeof cwd))
            return 1;
        snprintf(name, sizeof name, "%s/helper-%d", cwd, rank);
        pid_t helper = fork();
        if (helper == 0) { /* a daemon: its own session, none of the rank's fds */
            setsid();
            int null = open("/dev/null", O_RDWR);
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
            syscall(SYS_close_range, 3, ~0U, 0);
            execl("/bin/sh", "sh", "-c", "sleep 600; :", name, (char *)NULL);
            _exit(127);
        }
        if (helper < 0)
            return 1;
        for (int step = 0; step < 5; step++) {
            cryo_checkpoint_point();
            usleep(20000);
        }
        cryo_finalize();
        MPI_Finalize();
        return 0;
    }
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
