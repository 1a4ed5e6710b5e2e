/*
 * kvf-bench e2e's parts: the records of what each request saw in each run, the state every run
 * starts from (e2e_state.c: the warm-up, the stores and the engines' pages put back as the
 * warm-up left them, which engine computed each chunk), and the reports (e2e_report.c: each run's
 * figures, their spread over the repetitions per mode, the ratios and the verdict, records.csv
 * and records.json, the plots). e2e_bench.c drives them.
 */
#ifndef KVF_BENCH_E2E_H
#define KVF_BENCH_E2E_H

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "kvf/client.h"
#include "kvf/layout.h"
#include "router.h"

/* Which engine computed each chunk first, from the driver's own records, to count cross-engine
 * reuse: a prefix loaded by one engine that another engine computed. */
typedef struct e2e_owners {
    pthread_mutex_t mu;
    uint64_t *key; /* the chunk key folded to 64 bits, low bit set; 0: empty */
    const kvfe_router_engine **eng;
    size_t mask, used;
    uint32_t chunk_tokens;
    uint64_t *saved_key; /* the table as the warm-up left it (e2e_owners_save) */
    const kvfe_router_engine **saved_eng;
    size_t saved_used;
} e2e_owners;

/* A request and, per run, what happened to it: the route keeps what kvf-sched and the engines
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

/* One pass of the measured requests in one mode. */
typedef struct e2e_run {
    const char *mode; /* "kvf" or "baseline" */
    int rep;          /* its repetition, from 1 */
    e2e_owners *own;  /* NULL: cross-engine reuse is not counted */
    e2e_rec *r;
    size_t n;
    kvfe_router *rt; /* borrowed */
    kvfe_pick pick;  /* how a baseline request's engine is chosen */
    double slo_s;
    double t0;
    double loadavg; /* the host's 1-minute load average when the run started; -1: unknown */
    atomic_size_t next_taken, n_done;
    pthread_mutex_t mu; /* transport, transport_why */
    int concurrency;
    char transport[16], transport_why[240]; /* as the engines report them */
    double shm_bytes, net_bytes; /* the engines' storage clients' bytes, by way (under mu) */
} e2e_run;

typedef struct e2e_summary {
    double ttft_p50, ttft_p90, ttft_p99, itl_mean, itl_p99, e2e_p50, rps, device_hit, store_hit;
    double wall_s, slo_attainment, cross_hit;
    size_t cross_requests;
    size_t done, failed, rejected, colocated, mismatches;
    size_t prefetched, prefetch_missed; /* requests whose prefix was fetched while they waited,
                                         * and of those, cut short by the plan's deadline */
    uint64_t load_bytes, save_bytes;
} e2e_summary;

/* ------------------------------------------------------------------------------------------ */
/* e2e_state.c */

/* Sets up an empty table for chunks of chunk_tokens. Returns 0 or -1 (no memory). */
int e2e_owners_init(e2e_owners *o, uint32_t chunk_tokens);
void e2e_owners_free(e2e_owners *o);
/* Records that e computed chunks [0, saved / chunk) of q (those not recorded yet), and returns how
 * many of the n_loaded tokens q loaded were computed by another engine. o may be NULL (0). */
size_t e2e_owners_note(e2e_owners *o, const e2e_rec *q, const kvfe_router_engine *e,
                       size_t n_loaded, size_t saved);

/* The warm-up runs on at most this many engines (the first listed that are not decode-only). */
#define E2E_MAX_WARM 32

/* What every run starts from: the stores hold exactly the chunks the warm-up left there, every
 * engine's pages are reset, and each warm-up engine holds the last prompt of its share of the
 * warm-up (an engine's own cache holds its last sequence only, so that is all a full warm-up
 * leaves in it). Everything borrowed is borrowed for the e2e_start's life. */
typedef struct e2e_start {
    kvfe_router *rt;     /* borrowed */
    kvf_client *cl;      /* to the stores; NULL where the cluster has none */
    e2e_rec *warm;       /* borrowed: the warm-up's requests */
    size_t n_warm;       /* 0: no warm-up, the stores start empty */
    const e2e_rec *meas; /* borrowed: the measured requests */
    size_t n_meas;
    e2e_owners *own; /* borrowed */
    kvf_key *wkeys;  /* the warm-up's chunk keys (sorted, no repeats); after it, those stored */
    kvf_key *extra;  /* the keys no run may start with: the measured requests' beyond wkeys */
    size_t n_wkeys, n_extra;
    size_t warm_held; /* how many keys the stores held after the warm-up (n_wkeys then) */
    const kvfe_router_engine *eng[E2E_MAX_WARM]; /* the warm-up's engines: those not decode-only */
    int k;
} e2e_start;

/* Opens a client to the stores (an array of "HOST:PORT", may be empty) in L's key namespace and
 * lists the keys and engines of the warm-up. Returns 0, or -1 with the reason in err. */
int e2e_start_open(e2e_start *s, json_t *stores, const kvf_layout *L, kvfe_router *rt,
                   e2e_rec *warm, size_t n_warm, const e2e_rec *meas, size_t n_meas,
                   e2e_owners *own, char *err, size_t errlen);
/* Once, before the first run: clears the model's chunks from the stores, resets the engines, and
 * runs the whole warm-up with kvfabric (every request prefilled on the warm-up engines, which save
 * its chunks). Returns 0, or -1 when a step failed (said on stderr). */
int e2e_start_warm(e2e_start *s);
/* Before each run: puts the stores, the engines' pages and the owners table back as
 * e2e_start_warm() left them; the warm-up engines' last prompts are prefilled again with reuse
 * (kvfabric's run: loaded from the stores; the baseline's: from the engine's own pages only, that
 * is computed). Says on stderr what the stores hold. Returns 0, or -1 when a step failed or the
 * stores no longer hold the warm-up's chunks (evicted for room). */
int e2e_start_restore(e2e_start *s, kvfe_reuse reuse);
/* Frees what e2e_start_open() took, also after it failed, or on an e2e_start all zero. */
void e2e_start_close(e2e_start *s);

/* ------------------------------------------------------------------------------------------ */
/* e2e_report.c */

/* The figures of one e2e_run over its completed requests (failed and rejected ones are counted). */
void e2e_summarize(const e2e_run *R, e2e_summary *s);
/* What the report is about: the runs in the order they ran, with their summaries. */
typedef struct e2e_report {
    const e2e_run *runs;
    const e2e_summary *sm;
    int n_runs, reps;
    size_t n_requests, n_engines;
    const char *model, *where, *baseline_routing;
    int from_records; /* judged again from records (e2e_reread): no bytes or load averages */
} e2e_report;
/* The summary of mode over its repetitions, as a JSON object: every figure's median, its value
 * in each repetition (KEY_rounds) and its spread (KEY_p10, KEY_p90), and the counts summed over
 * the repetitions; every figure labelled real. NULL when no run is of mode. Caller owns the
 * result. */
json_t *e2e_mode_json(const e2e_report *rp, const char *mode);
/* {"kvf": e2e_mode_json(kvf), "baseline": ...}, the modes that ran. Caller owns the result. */
json_t *e2e_summaries_json(const e2e_report *rp);
/* Adds to res the ratios with kvfabric over the baseline, repetition by repetition (each
 * repetition's kvf run over its baseline run) with their spread, and the targets each meets, and
 * prints the table of both modes and the verdict. Without both modes it prints the table only. */
void e2e_report_ratios(const e2e_report *rp, json_t *res);
/* Compares the generated tokens of every run request by request: a request is compared when at
 * least two runs served it (each n long), and differs when one of them generated other tokens
 * than the first that served it. */
void e2e_compare_tokens(const e2e_run *runs, int n_runs, size_t n, size_t *compared,
                        size_t *differ);
/* The most repetitions a run of kvf-bench e2e makes, and its records may hold. */
#define MAX_REPETITIONS 50
/* e2e_reread.c: kvf-bench e2e --report DIR: the records of a run (DIR/records.json) summarized
 * and judged again, printed (and emitted as JSON with json_out). slo_ms > 0 overrides the SLO of
 * DIR/summary.json. Returns the exit status: 0; 1 when the records cannot be read, a request
 * failed or the runs' tokens differ; 3 when require_targets and a target is not met. */
int e2e_reread(const char *dir, double slo_ms, int require_targets, int json_out);
/* dir/records.csv and dir/records.json: one record per request and run. */
void e2e_write_records(const char *dir, const e2e_run *runs, int n_runs);
/* dir/ttft_cdf.png (each mode's repetitions pooled) and dir/throughput.png (bins of bin_s,
 * averaged over each mode's repetitions) with gnuplot. 0, or -1 when gnuplot is missing or
 * failed. */
int e2e_plot(const char *dir, const e2e_run *runs, int n_runs, double bin_s, const char *setup);

#endif
