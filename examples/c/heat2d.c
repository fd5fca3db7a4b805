/*
 * heat2d.c: the C twin of examples/heat2d (Rust). A 2-D Jacobi heat stencil
 * over MPI, checkpointed by cryo. The program owns MPI_Init/MPI_Finalize and
 * hands its communicator to cryo_init_mpi.
 *
 * The N x N grid is split into blocks of rows with one halo row above and
 * below. The initial field is read through a cryo file region; both grids
 * and the loop state live in cryo regions, so a restarted run carries on
 * from the checkpointed iteration. Rank 0 appends the residual of every
 * iteration to a log through a raw fd (re-opened by cryo on restart), and at
 * the end gathers the grid, writes it, recomputes the run serially from the
 * input and checks that both agree bit for bit. Output and log are
 * byte-identical to the Rust version's.
 *
 * Build: mpicc -O2 -I rank/include heat2d.c -L target/release -lcryo_rank
 * Usage: heat2d --n N --iters K --input F --log F --output F [--step-ms MS]
 *        heat2d --make-input F --n N
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cryo.h"

struct meta {
    uint64_t iteration;
    uint64_t current;
    int64_t log_fd;
    uint64_t initialised;
};

static void die_cryo(const char *what, int code) {
    fprintf(stderr, "heat2d: error: %s: %s\n", what, cryo_strerror(code));
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

static void die(const char *what) {
    fprintf(stderr, "heat2d: error: %s: %s\n", what, strerror(errno));
    MPI_Abort(MPI_COMM_WORLD, 1);
    exit(1);
}

static double initial_value(size_t n, size_t row, size_t col) {
    if (col == 0) return 100.0;
    if (col == n - 1 || row == 0 || row == n - 1) return 0.0;
    double x = (double)col / (double)n, y = (double)row / (double)n;
    return 50.0 * exp(-((x - 0.6) * (x - 0.6) + (y - 0.4) * (y - 0.4)) * 40.0);
}

static int make_input(const char *path, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); return 1; }
    for (size_t row = 0; row < n; row++)
        for (size_t col = 0; col < n; col++) {
            double v = initial_value(n, row, col);
            if (fwrite(&v, sizeof v, 1, f) != 1) { perror(path); return 1; }
        }
    return fclose(f) == 0 ? 0 : 1;
}

/* One sweep over rows 1..rows of src (with halos) into dst; returns the
 * largest change. Global boundary rows and columns keep their values. */
static double sweep(const double *src, double *dst, size_t n, size_t rows, size_t first) {
    double residual = 0.0;
    for (size_t local = 1; local <= rows; local++) {
        size_t global = first + local - 1, row = local * n;
        if (global == 0 || global == n - 1) {
            memcpy(dst + row, src + row, n * sizeof(double));
            continue;
        }
        dst[row] = src[row];
        dst[row + n - 1] = src[row + n - 1];
        for (size_t col = 1; col < n - 1; col++) {
            size_t at = row + col;
            double value = 0.25 * (src[at - n] + src[at + n] + src[at - 1] + src[at + 1]);
            double change = fabs(value - src[at]);
            if (change > residual) residual = change;
            dst[at] = value;
        }
    }
    return residual;
}

static void append(int fd, const char *line) {
    size_t len = strlen(line);
    while (len > 0) {
        ssize_t n = write(fd, line, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("appending to the log");
        }
        line += n;
        len -= (size_t)n;
    }
}

/* Rust's {:.17e}: mantissa with 17 decimals, exponent without padding. */
static void format_sci(char *out, size_t cap, double value) {
    char buf[64];
    snprintf(buf, sizeof buf, "%.17e", value);
    char *e = strchr(buf, 'e');
    if (!e) { snprintf(out, cap, "%s", buf); return; }
    *e = '\0';
    int exponent = atoi(e + 1);
    snprintf(out, cap, "%se%d", buf, exponent);
}

int main(int argc, char **argv) {
    size_t n = 256;
    uint64_t iters = 100, step_ms = 0;
    const char *input = NULL, *log_path = NULL, *output = NULL, *make = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--n")) n = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--iters")) iters = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--step-ms")) step_ms = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--input")) input = argv[i + 1];
        else if (!strcmp(argv[i], "--log")) log_path = argv[i + 1];
        else if (!strcmp(argv[i], "--output")) output = argv[i + 1];
        else if (!strcmp(argv[i], "--make-input")) make = argv[i + 1];
        else { fprintf(stderr, "heat2d: unknown option %s\n", argv[i]); return 2; }
    }
    if (n < 4) { fprintf(stderr, "heat2d: --n must be at least 4\n"); return 2; }
    if (make) return make_input(make, n);
    if (!input || !log_path || !output) {
        fprintf(stderr, "usage: heat2d --input F --log F --output F [--n N] [--iters K] [--step-ms MS]\n");
        return 2;
    }

    MPI_Init(&argc, &argv);
    int rank_i, size_i;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_i);
    MPI_Comm_size(MPI_COMM_WORLD, &size_i);
    size_t rank = (size_t)rank_i, size = (size_t)size_i;
    if (size > n - 2) { fprintf(stderr, "heat2d: too many ranks for the grid\n"); MPI_Abort(MPI_COMM_WORLD, 2); }

    int rc = cryo_init_mpi(MPI_COMM_WORLD);
    if (rc != CRYO_OK) die_cryo("cryo_init_mpi", rc);
    uint64_t restored = cryo_restored_epoch();

    size_t first = rank * n / size, rows = (rank + 1) * n / size - first, cells = (rows + 2) * n;
    void *input_map = NULL, *meta_ptr = NULL, *a_ptr = NULL, *b_ptr = NULL;
    size_t input_len = 0;
    if ((rc = cryo_region_file("input", input, 0, 0, 1, &input_map, &input_len)) != CRYO_OK)
        die_cryo("mapping the input", rc);
    if (input_len < n * n * sizeof(double)) { fprintf(stderr, "heat2d: input too small\n"); MPI_Abort(MPI_COMM_WORLD, 1); }
    if ((rc = cryo_region("meta", 4096, &meta_ptr)) != CRYO_OK) die_cryo("meta region", rc);
    if ((rc = cryo_region("grid-a", cells * sizeof(double), &a_ptr)) != CRYO_OK) die_cryo("grid region", rc);
    if ((rc = cryo_region("grid-b", cells * sizeof(double), &b_ptr)) != CRYO_OK) die_cryo("grid region", rc);
    struct meta *meta = meta_ptr;
    double *grid[2] = {a_ptr, b_ptr};

    if (!meta->initialised) {
        if (restored) { fprintf(stderr, "heat2d: restarted, but meta was not restored\n"); MPI_Abort(MPI_COMM_WORLD, 1); }
        memcpy(grid[0] + n, (const double *)input_map + first * n, rows * n * sizeof(double));
        memcpy(grid[1], grid[0], cells * sizeof(double));
        meta->iteration = 0;
        meta->current = 0;
        meta->log_fd = -1;
        if (rank == 0) {
            int fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
            if (fd < 0) die(log_path);
            meta->log_fd = fd;
        }
        meta->initialised = 1;
    } else if (rank == 0) {
        fprintf(stderr, "heat2d: restarted from epoch %llu at iteration %llu\n",
                (unsigned long long)restored, (unsigned long long)meta->iteration);
    }
    int log_fd = (int)meta->log_fd;

    while (meta->iteration < iters) {
        double *src = grid[meta->current], *dst = grid[meta->current ^ 1];
        MPI_Request req;
        if (rank > 0) {
            MPI_Isend(src + n, (int)n, MPI_DOUBLE, rank_i - 1, 0, MPI_COMM_WORLD, &req);
            MPI_Recv(src, (int)n, MPI_DOUBLE, rank_i - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Wait(&req, MPI_STATUS_IGNORE);
        }
        if (rank + 1 < size) {
            MPI_Isend(src + rows * n, (int)n, MPI_DOUBLE, rank_i + 1, 0, MPI_COMM_WORLD, &req);
            MPI_Recv(src + (rows + 1) * n, (int)n, MPI_DOUBLE, rank_i + 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Wait(&req, MPI_STATUS_IGNORE);
        }
        double local = sweep(src, dst, n, rows, first), residual = 0.0;
        MPI_Allreduce(&local, &residual, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        meta->current ^= 1;
        meta->iteration += 1;
        if (rank == 0) {
            char num[96], line[160];
            format_sci(num, sizeof num, residual);
            snprintf(line, sizeof line, "iter %05llu residual %s\n", (unsigned long long)meta->iteration, num);
            append(log_fd, line);
        }
        if (step_ms) {
            struct timespec ts = {(time_t)(step_ms / 1000), (long)(step_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
        rc = cryo_checkpoint_point();
        if (rc < 0) die_cryo("safe point", -rc);
        if (rc == CRYO_CHECKPOINTED && rank == 0)
            fprintf(stderr, "heat2d: checkpointed after iteration %llu\n", (unsigned long long)meta->iteration);
    }

    double *current = grid[meta->current];
    if (rank == 0) {
        double *full = malloc(n * n * sizeof(double));
        if (!full) die("malloc");
        memcpy(full, current + n, rows * n * sizeof(double));
        for (size_t other = 1; other < size; other++) {
            size_t f = other * n / size, r = (other + 1) * n / size - f;
            MPI_Recv(full + f * n, (int)(r * n), MPI_DOUBLE, (int)other, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        }
        FILE *out = fopen(output, "wb");
        if (!out || fwrite(full, sizeof(double), n * n, out) != n * n || fclose(out) != 0) die(output);

        /* Self-check against the serial run from the input. */
        double *a = calloc((n + 2) * n, sizeof(double)), *b = calloc((n + 2) * n, sizeof(double));
        if (!a || !b) die("calloc");
        memcpy(a + n, input_map, n * n * sizeof(double));
        memcpy(b, a, (n + 2) * n * sizeof(double));
        for (uint64_t k = 0; k < iters; k++) {
            sweep(a, b, n, n, 0);
            double *t = a; a = b; b = t;
        }
        size_t mismatches = 0;
        for (size_t i = 0; i < n * n; i++)
            if (memcmp(&a[n + i], &full[i], sizeof(double)) != 0) mismatches++;
        if (mismatches) {
            fprintf(stderr, "heat2d: self-check FAILED: %zu of %zu points differ from the serial run\n", mismatches, n * n);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        printf("heat2d: OK %zux%zu after %llu iterations on %zu ranks\n", n, n, (unsigned long long)iters, size);
        free(a); free(b); free(full);
    } else {
        MPI_Send(current + n, (int)(rows * n), MPI_DOUBLE, 0, 1, MPI_COMM_WORLD);
    }
    if (rank == 0 && restored) {
        char prefetch[160];
        cryo_prefetch_status(prefetch, sizeof prefetch);
        fprintf(stderr, "heat2d: prefetch: %s\n", prefetch);
    }
    cryo_finalize();
    MPI_Finalize();
    return 0;
}
