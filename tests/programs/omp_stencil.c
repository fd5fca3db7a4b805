/*
 * omp_stencil.c: a hybrid MPI + OpenMP program, as many HPC codes are: each
 * rank's 1-D grid lives in a cryo region and is updated by an OpenMP team,
 * the ranks' sums are combined with MPI_Allreduce, and each rank logs one
 * line per step through stdio. The per-thread sums are added in thread
 * order, so the output is deterministic for a given OMP_NUM_THREADS.
 *
 * Usage: omp_stencil STEPS STEP_MS [INPUT [TABLE [NODE_LOG]]] ("-": none)
 * Writes omp-RANK.log in the cwd, appending (O_APPEND), then moves into
 * steps/ (a chdir at its first start only, as a code that makes its own
 * run directory does) and writes the same sums to steps/closed-RANK.log,
 * opened by its relative name, appended to and closed at every step, and
 * logs that file's size through a directory fd on steps/. It also makes
 * steps/out/ (mode 0750) and holds it open, empty, until its last step,
 * when it writes out/done-RANK through that fd, as codes that keep an
 * output directory for their results do. With INPUT, each
 * rank holds that file open for reading from its first start on, as codes
 * that keep an input or a mesh open do, and logs its size and the sum of
 * its first bytes at each step.
 * With TABLE, each rank maps that file (shared, read-only) and closes it,
 * as codes that map a lookup table do, and logs the sum of its bytes.
 * With NODE_LOG, each rank appends "rank R step S" to that file at each
 * step, opening it (O_APPEND) and closing it again: every rank of a node
 * writes one log when the path is on the node's own filesystem.
 */
#include <errno.h>
#include <fcntl.h>
#include <mpi.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cryo.h"

#define CELLS (1 << 21)
#define MAX_THREADS 256

struct state {
    uint64_t step;
    int log_fd;
    int input_fd;
    int dir_fd;
    int out_fd;
    const unsigned char *table;
    size_t table_len;
    double a[CELLS];
    double b[CELLS];
};

static void die(const char *what, int rc) {
    fprintf(stderr, "omp_stencil: %s: %s\n", what, cryo_strerror(rc));
    MPI_Abort(MPI_COMM_WORLD, 1);
}

/* The second log, opened by name at every step and closed again. */
static FILE *open_closed_log(int rank, const char *mode) {
    char name[64];
    snprintf(name, sizeof name, "closed-%d.log", rank);
    FILE *log = fopen(name, mode);
    if (!log) {
        perror(name);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    return log;
}

int main(int argc, char **argv) {
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
    if (argc < 3) {
        fprintf(stderr, "usage: omp_stencil STEPS STEP_MS [INPUT]\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int rc = cryo_init_mpi(MPI_COMM_WORLD);
    if (rc != CRYO_OK) die("cryo_init_mpi", rc);
    int rank;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    uint64_t steps = strtoull(argv[1], NULL, 10);
    long step_ms = strtol(argv[2], NULL, 10);
    struct state *st;
    if ((rc = cryo_region("state", sizeof *st, (void **)&st)) != CRYO_OK) die("cryo_region", rc);
    if (cryo_restored_epoch() == 0) {
        char name[64];
        snprintf(name, sizeof name, "omp-%d.log", rank);
        st->log_fd = open(name, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
        if (st->log_fd < 0) {
            perror(name);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        st->input_fd = -1;
        if (argc > 3 && strcmp(argv[3], "-") != 0 && (st->input_fd = open(argv[3], O_RDONLY)) < 0) {
            perror(argv[3]);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        st->table = NULL;
        if (argc > 4 && strcmp(argv[4], "-") != 0) {
            int fd = open(argv[4], O_RDONLY);
            struct stat meta;
            if (fd < 0 || fstat(fd, &meta) != 0) {
                perror(argv[4]);
                MPI_Abort(MPI_COMM_WORLD, 1);
            }
            st->table_len = (size_t)meta.st_size;
            st->table = mmap(NULL, st->table_len, PROT_READ, MAP_SHARED, fd, 0);
            if (st->table == MAP_FAILED) {
                perror("mmap");
                MPI_Abort(MPI_COMM_WORLD, 1);
            }
            close(fd);
        }
        /* A restart must bring the rank back here. */
        if ((mkdir("steps", 0755) != 0 && errno != EEXIST) || chdir("steps") != 0) {
            perror("steps");
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        /* Held open, as codes that openat() in their run directory do. */
        if ((st->dir_fd = open(".", O_RDONLY | O_DIRECTORY)) < 0) {
            perror("open steps");
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        /* Empty until the end: nothing in it is saved. */
        if ((mkdir("out", 0750) != 0 && errno != EEXIST) ||
            (st->out_fd = open("out", O_RDONLY | O_DIRECTORY)) < 0) {
            perror("out");
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        fclose(open_closed_log(rank, "w"));
#pragma omp parallel for schedule(static)
        for (int i = 0; i < CELLS; i++) st->a[i] = (double)((i * 7 + rank) % 1000) / 1000.0;
        st->step = 0;
    }
    FILE *log = fdopen(st->log_fd, "w");
    if (!log) {
        perror("fdopen");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    while (st->step < steps) {
        double part[MAX_THREADS] = {0};
#pragma omp parallel
        {
            double mine = 0;
#pragma omp for schedule(static)
            for (int i = 1; i < CELLS - 1; i++) {
                st->b[i] = 0.25 * st->a[i - 1] + 0.5 * st->a[i] + 0.25 * st->a[i + 1];
                mine += st->b[i];
            }
            part[omp_get_thread_num() % MAX_THREADS] += mine;
        }
#pragma omp parallel for schedule(static)
        for (int i = 1; i < CELLS - 1; i++) st->a[i] = st->b[i];
        double local = 0, global;
        for (int t = 0; t < MAX_THREADS; t++) local += part[t];
        MPI_Allreduce(&local, &global, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        st->step++;
        /* A second log opened, appended to and closed at every step. */
        FILE *each = open_closed_log(rank, "a");
        fprintf(each, "step %llu sum %.17g\n", (unsigned long long)st->step, global);
        fclose(each);
        char name[64];
        struct stat sb;
        snprintf(name, sizeof name, "closed-%d.log", rank);
        if (fstatat(st->dir_fd, name, &sb, 0) != 0) {
            perror("fstatat");
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        if (argc > 5) {
            int node_log = open(argv[5], O_WRONLY | O_CREAT | O_APPEND, 0644);
            if (node_log < 0 ||
                dprintf(node_log, "rank %d step %llu\n", rank, (unsigned long long)st->step) < 0 ||
                close(node_log) != 0) {
                perror(argv[5]);
                MPI_Abort(MPI_COMM_WORLD, 1);
            }
        }
        fprintf(log, "step %llu sum %.17g closed %lld threads %d", (unsigned long long)st->step,
                global, (long long)sb.st_size, omp_get_max_threads());
        if (st->input_fd >= 0) {
            unsigned char head[256];
            ssize_t got = pread(st->input_fd, head, sizeof head, 0);
            unsigned long long sum = 0;
            for (ssize_t i = 0; i < got; i++) sum += head[i];
            fprintf(log, " input %lld head %llu", (long long)lseek(st->input_fd, 0, SEEK_END), sum);
        }
        if (st->table) {
            unsigned long long sum = 0;
            for (size_t i = 0; i < st->table_len; i++) sum += st->table[i];
            fprintf(log, " table %llu", sum);
        }
        fputc('\n', log);
        struct timespec pause = {step_ms / 1000, (step_ms % 1000) * 1000000L};
        nanosleep(&pause, NULL);
        cryo_checkpoint_point();
    }
    fclose(log);
    char done[64];
    snprintf(done, sizeof done, "done-%d", rank);
    int done_fd = openat(st->out_fd, done, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (done_fd < 0 || write(done_fd, "done\n", 5) != 5 || close(done_fd) != 0) {
        perror(done);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    if ((rc = cryo_finalize()) != CRYO_OK) die("cryo_finalize", rc);
    MPI_Finalize();
    return 0;
}
