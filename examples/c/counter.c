/*
 * counter.c: the C twin of cryo-counter (examples/src/bin/counter.rs).
 *
 * Each step reads the input through a shared file mapping, updates one
 * 256 KiB block of the state region (whose first page holds the step and
 * the log's fd number), keeps running sums in a protected buffer, appends
 * one line to the log through a raw fd and reaches a safe point. At the end
 * it writes the final state to a file and prints a hash of it.
 *
 * Build: cc -O2 -I rank/include counter.c -L target/debug -lcryo_rank
 * Usage: counter --steps N --log PATH --input PATH --state-mb N --final PATH
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cryo.h"

#define MAGIC 0x3130307643544e43ULL /* "CNTCv001" little-endian */
#define HEADER 4096
#define BLOCK (256 * 1024)

static void die(const char *what, int code) {
    fprintf(stderr, "c-counter: error: %s: %s\n", what, cryo_strerror(code));
    exit(2);
}

static void write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("c-counter: writing the log");
            exit(2);
        }
        buf += n;
        len -= (size_t)n;
    }
}

static uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

int main(int argc, char **argv) {
    uint64_t steps = 100, state_mb = 8, step_ms = 0;
    const char *log_path = NULL, *input_path = NULL, *final_path = NULL;
    const char *env_ms = getenv("CRYO_EXAMPLE_STEP_MS");
    if (env_ms) step_ms = strtoull(env_ms, NULL, 10);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--steps")) steps = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--state-mb")) state_mb = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--step-ms")) step_ms = strtoull(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--log")) log_path = argv[i + 1];
        else if (!strcmp(argv[i], "--input")) input_path = argv[i + 1];
        else if (!strcmp(argv[i], "--final")) final_path = argv[i + 1];
        else { fprintf(stderr, "c-counter: unknown option %s\n", argv[i]); return 2; }
    }
    if (!log_path || !input_path || !final_path) {
        fprintf(stderr, "usage: %s --log PATH --input PATH --final PATH [--steps N] [--state-mb N]\n", argv[0]);
        return 2;
    }

    int rc = cryo_init();
    if (rc != CRYO_OK) die("cryo_init", rc);

    size_t data_len = (size_t)state_mb << 20;
    void *state_ptr = NULL, *input_ptr = NULL;
    size_t input_len = 0;
    if ((rc = cryo_region("state", HEADER + data_len, &state_ptr)) != CRYO_OK) die("cryo_region state", rc);
    if ((rc = cryo_region_file("input", input_path, 0, 0, 1, &input_ptr, &input_len)) != CRYO_OK)
        die("cryo_region_file input", rc);
    static uint64_t meta[4];
    if ((rc = cryo_protect("meta", meta, sizeof meta)) != CRYO_OK) die("cryo_protect meta", rc);
    /* An empty share (a rank that owns no particles): nothing to save, but
     * registered like any other buffer, on every run. */
    if ((rc = cryo_protect("empty", NULL, 0)) != CRYO_OK) die("cryo_protect empty", rc);
    void *nothing = NULL;
    if ((rc = cryo_region("nothing", 0, &nothing)) != CRYO_OK) die("cryo_region nothing", rc);
    if (!nothing) die("cryo_region nothing: NULL", CRYO_ERR_REGION);

    uint64_t *header = state_ptr;
    uint64_t *data = (uint64_t *)((char *)state_ptr + HEADER);
    const unsigned char *input = input_ptr;
    size_t nwords = data_len / 8;
    int log_fd;
    uint64_t epoch = cryo_restored_epoch();
    if (epoch == 0) {
        log_fd = open(log_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
        if (log_fd < 0) { perror("c-counter: opening the log"); return 2; }
        for (size_t i = 0; i < nwords; i++) data[i] = (uint64_t)i * 0x9e3779b97f4a7c15ULL;
        header[0] = MAGIC;
        header[1] = 0;
        header[2] = (uint64_t)log_fd;
    } else {
        if (header[0] != MAGIC) { fprintf(stderr, "c-counter: restored state has no header\n"); return 2; }
        fprintf(stderr, "c-counter: restarted from epoch %" PRIu64 " at step %" PRIu64 "\n", epoch, header[1]);
        log_fd = (int)header[2];
    }

    size_t block_words = BLOCK / 8;
    size_t nblocks = nwords / block_words ? nwords / block_words : 1;
    while (header[1] < steps) {
        uint64_t step = header[1];
        size_t block = (size_t)(step % nblocks);
        size_t lo = block * block_words, hi = lo + block_words < nwords ? lo + block_words : nwords;
        uint64_t sum = 0;
        for (size_t i = lo; i < hi; i++) {
            uint64_t byte = input[((size_t)step * 31 + (i - lo)) % input_len];
            data[i] = rotl(data[i], 5) ^ byte ^ step;
            sum += data[i];
        }
        meta[0] += sum;
        meta[1] = step;
        char line[160];
        int n = snprintf(line, sizeof line, "c step %" PRIu64 " block %zu sum %016" PRIx64 " total %016" PRIx64 "\n",
                         step, block, sum, meta[0]);
        write_all(log_fd, line, (size_t)n);
        header[1] = step + 1;
        rc = cryo_checkpoint_point();
        if (rc < 0) die("cryo_checkpoint_point", rc);
        if (rc == CRYO_CHECKPOINTED) fprintf(stderr, "c-counter: checkpointed after step %" PRIu64 "\n", step);
        if (step_ms) {
            struct timespec ts = {(time_t)(step_ms / 1000), (long)(step_ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
        }
    }

    FILE *out = fopen(final_path, "wb");
    if (!out) { perror("c-counter: opening the final file"); return 2; }
    fwrite(state_ptr, 1, HEADER + data_len, out);
    fwrite(meta, 1, sizeof meta, out);
    fclose(out);
    uint64_t hash = 0xcbf29ce484222325ULL;
    const unsigned char *bytes = state_ptr;
    for (size_t i = 0; i < HEADER + data_len; i++) { hash ^= bytes[i]; hash *= 0x100000001b3ULL; }
    printf("final %016" PRIx64 "\n", hash);
    cryo_finalize();
    return 0;
}
