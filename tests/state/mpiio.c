/*
 * mpiio: a file shared by every rank through MPI-IO, opened once after
 * cryo_init as a real code opens its output at start, and kept open. Its
 * MPI_File handle lives outside the regions (it is the MPI library's), so a
 * restarted run opens the file again, as its start-up code would, and must
 * find it as it was at the checkpoint: every step each rank writes a
 * 64-byte record at its own offset past the header (MPI_File_write_at_all)
 * and rank 0 rewrites the header in place with the step count
 * (MPI_File_write_at). A restart that leaves the records of the steps run
 * after the checkpoint, or their header, fails the size and header checks
 * right after it; a lost or repeated record changes the file.
 * Output: mpiio.out, also checked at finish by rank 0.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "state.h"

#define SHAPE "mpiio"
#define RECORD 64

struct mpiio_state {
    uint64_t steps; /* steps whose records are in the file */
};

/* The MPI library's handle: opened again by every run. */
static MPI_File file = MPI_FILE_NULL;

static void record_text(char out[RECORD + 1], uint64_t iter, int rank) {
    memset(out, ' ', RECORD);
    int n = snprintf(out, RECORD + 1, "step %04" PRIu64 " rank %3d value %016" PRIx64, iter, rank,
                     state_mix(iter, (uint64_t)rank));
    out[n] = ' ';
    out[RECORD - 1] = '\n';
    out[RECORD] = 0;
}

static void header_text(char out[RECORD + 1], uint64_t steps) {
    memset(out, ' ', RECORD);
    int n = snprintf(out, RECORD + 1, "mpiio header: %06" PRIu64 " steps", steps);
    out[n] = ' ';
    out[RECORD - 1] = '\n';
    out[RECORD] = 0;
}

static void open_file(const struct ctx *c, int amode) {
    char path[PATH_MAX];
    state_path(c, path, "mpiio.out");
    int rc = MPI_File_open(MPI_COMM_WORLD, path, amode, MPI_INFO_NULL, &file);
    if (rc != MPI_SUCCESS) FAIL(c, "MPI_File_open %s failed (%d)", path, rc);
}

static MPI_Offset expected_size(const struct ctx *c, uint64_t steps) {
    return (MPI_Offset)(RECORD + steps * (uint64_t)c->size * RECORD);
}

static void mpiio_setup(const struct ctx *c, void *slice) {
    (void)slice;
    open_file(c, MPI_MODE_CREATE | MPI_MODE_RDWR);
}

static void mpiio_reattach(const struct ctx *c, void *slice) {
    struct mpiio_state *st = slice;
    open_file(c, MPI_MODE_RDWR);
    MPI_Offset size = 0;
    if (MPI_File_get_size(file, &size) != MPI_SUCCESS) FAIL(c, "MPI_File_get_size failed");
    if (size != expected_size(c, st->steps))
        FAIL(c, "after the restart the file is %lld bytes, %lld at the checkpoint", (long long)size,
             (long long)expected_size(c, st->steps));
    char got[RECORD + 1] = {0}, want[RECORD + 1];
    if (MPI_File_read_at(file, 0, got, RECORD, MPI_CHAR, MPI_STATUS_IGNORE) != MPI_SUCCESS)
        FAIL(c, "MPI_File_read_at of the header failed");
    header_text(want, st->steps);
    if (memcmp(got, want, RECORD) != 0) FAIL(c, "after the restart the header reads \"%.40s\"", got);
    /* Nobody writes before every rank has looked. */
    MPI_Barrier(MPI_COMM_WORLD);
}

static uint64_t mpiio_step(const struct ctx *c, void *slice, uint64_t iter) {
    struct mpiio_state *st = slice;
    char rec[RECORD + 1];
    record_text(rec, iter, c->rank);
    MPI_Offset at = RECORD + (MPI_Offset)((iter * (uint64_t)c->size + (uint64_t)c->rank) * RECORD);
    if (MPI_File_write_at_all(file, at, rec, RECORD, MPI_CHAR, MPI_STATUS_IGNORE) != MPI_SUCCESS)
        FAIL(c, "MPI_File_write_at_all failed");
    if (c->rank == 0) {
        char head[RECORD + 1];
        header_text(head, iter + 1);
        if (MPI_File_write_at(file, 0, head, RECORD, MPI_CHAR, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            FAIL(c, "MPI_File_write_at of the header failed");
    }
    /* The step's bytes are in the file before the safe point. */
    if (MPI_File_sync(file) != MPI_SUCCESS) FAIL(c, "MPI_File_sync failed");
    MPI_Barrier(MPI_COMM_WORLD);
    st->steps = iter + 1;
    return state_mix(iter, (uint64_t)at);
}

static void mpiio_finish(const struct ctx *c, void *slice) {
    (void)slice;
    if (MPI_File_close(&file) != MPI_SUCCESS) FAIL(c, "MPI_File_close failed");
    if (c->rank != 0) return;
    struct state_buf want = {0};
    char line[RECORD + 1];
    header_text(line, c->iters);
    state_buf_add(&want, line, RECORD);
    for (uint64_t iter = 0; iter < c->iters; iter++)
        for (int r = 0; r < c->size; r++) {
            record_text(line, iter, r);
            state_buf_add(&want, line, RECORD);
        }
    char path[PATH_MAX];
    state_path(c, path, "mpiio.out");
    state_expect_file(c, SHAPE, path, path, want.data, want.len);
    state_buf_free(&want);
}

const struct shape shape_mpiio = {SHAPE, sizeof(struct mpiio_state), mpiio_setup, mpiio_reattach, mpiio_step,
                                  mpiio_finish};
