/*
 * kvf-bench e2e's records of what each request saw in each run, and their reports (e2e_report.c):
 * the e2e_summary figures, records.csv and records.json, the plots.
 */
#ifndef KVF_BENCH_E2E_H
#define KVF_BENCH_E2E_H

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"
#include "router.h"

typedef struct e2e_owners e2e_owners;

/* A request and, per mode, what happened to it: the route keeps what kvf-sched and the engines
 * said, the rest is what the driver measured. */
typedef struct e2e_rec {
    double arrival;   /* s from the start of the e2e_run */
    uint32_t *tokens; /* the prompt; rt.tokens borrows it */
    kvf_key *keys;    /* its chunk keys; rt.keys borrows them */
    kvfe_route rt;    /* the request (n, n_keys, max_tokens) and what serving it gave */
    int failed;
    char err[160];
    double ttft, e2e, finish, itl_sum, itl_max;
    uint32_t itl_n, n_generated;
    uint64_t tokens_hash;
    size_t cross_tokens; /* loaded tokens that another engine computed */
} e2e_rec;

typedef struct e2e_run {
    const char *mode; /* "kvf" or "baseline" */
    e2e_owners *own;
    e2e_rec *r;
    size_t n;
    kvfe_router *rt; /* borrowed */
    double slo_s;
    double t0;
    atomic_size_t next_taken, n_done;
    pthread_mutex_t mu; /* transport, transport_why */
    int concurrency;
    char transport[16], transport_why[240]; /* as the engines report them */
} e2e_run;

typedef struct e2e_summary {
    double ttft_p50, ttft_p90, ttft_p99, itl_mean, itl_p99, e2e_p50, rps, device_hit, store_hit;
    double wall_s, slo_attainment, cross_hit;
    size_t cross_requests;
    size_t done, failed, rejected, colocated, mismatches;
    uint64_t load_bytes, save_bytes;
} e2e_summary;

/* The figures of one e2e_run over its completed requests (failed and rejected ones are counted). */
void e2e_summarize(const e2e_run *R, e2e_summary *s);
/* One run's summary as a JSON object, every figure labelled real. Caller owns the result. */
json_t *e2e_summary_json(const e2e_summary *s, const e2e_run *R);
/* dir/records.csv and dir/records.json: one record per request and run. */
void e2e_write_records(const char *dir, e2e_run *runs, int n_runs);
/* dir/ttft_cdf.png and dir/throughput.png (bins of bin_s) with gnuplot. 0, or -1 when gnuplot
 * is missing or failed. */
int e2e_plot(const char *dir, e2e_run *runs, int n_runs, double bin_s);

#endif
