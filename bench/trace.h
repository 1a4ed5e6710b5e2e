/*
 * Mooncake-format request traces, shared by kvf-bench sched (simulated replay) and kvf-bench e2e
 * (replay against a running cluster): one JSON object per line with timestamp (ms), input_length,
 * output_length and hash_ids, one id per 512-token block, prefix-chained.
 */
#ifndef KVF_BENCH_TRACE_H
#define KVF_BENCH_TRACE_H

#include <stddef.h>
#include <stdint.h>

#define BENCH_TRACE_BLOCK 512 /* tokens per hash id in the trace */

typedef struct bench_trace_rec {
    double arrival; /* s from the start of the trace */
    uint32_t in_len, out_len;
    uint32_t n_ids;
    uint64_t *ids;
} bench_trace_rec;

/* Reads records skip .. skip+max-1 (max 0: all). A line that does not parse fails the load with
 * its line number in err. Caller frees with bench_trace_free(). */
int bench_trace_load(const char *path, size_t skip, size_t max, bench_trace_rec **out, size_t *n,
                     char *err, size_t errlen);
void bench_trace_free(bench_trace_rec *r, size_t n);

/* Token i (0-based, inside its block) of the block named by hash id: a function of (id, i) only,
 * so equal ids give equal tokens. */
uint32_t bench_trace_token(uint64_t id, size_t i, uint32_t vocab);

#endif
