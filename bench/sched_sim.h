/*
 * kvf-bench sched's simulated cluster (sched_sim.c): a Mooncake-format trace replayed through the
 * real scheduler index and placement policies, each instance serving its waiting queue by a queue
 * discipline, with prefill, store loads and decode timed by the cost model. Every figure a replay
 * gives is simulated, and a function of its inputs alone: the same inputs give the same figures.
 */
#ifndef KVF_BENCH_SCHED_SIM_H
#define KVF_BENCH_SCHED_SIM_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler.h"

/* A request of the trace and what happened to it in the latest run. */
typedef struct sched_req {
    double arrival; /* trace time, s from the start of its window */
    uint32_t in_len, out_len;
    uint32_t n_ids;
    uint64_t *ids; /* one hash id per 512-token block */
    /* the latest run's */
    double arr_s; /* arrival in the simulation (trace time / scale) */
    double start, ttft, tpot;
    double bound; /* TTFT on an idle instance holding the longest prefix cached anywhere at
                     arrival (the scheduler's lower bound) */
    int inst, rejected, done;
    size_t dev_hit, store_hit;
} sched_req;

/* One replay's inputs, shared by every run of it. Runs rewrite the requests' results. */
typedef struct sched_replay {
    sched_req *r; /* borrowed from the loaded trace */
    size_t n;
    int ninst;
    kvf_sched_cost cost;
    double slo; /* TTFT SLO, s (0: none) */
    uint32_t dev_blocks, store_blocks;
} sched_replay;

/* The figures of one run: a placement policy and a queue discipline at a time scale. */
typedef struct sched_result {
    kvf_policy policy;
    kvf_queue queue;
    double scale;       /* arrivals come this many times faster than the trace's */
    double offered_rps; /* the arrival rate that gives */
    double ttft_p50, ttft_p90, ttft_p99, tpot_mean;
    /* the lower bound's percentiles over the same requests, and the policy's over them: how far
     * placement is from the best any placement could do with what was cached (its optimality
     * gap, simulated) */
    double bound_p50, bound_p90, bound_p99;
    double vs_bound_p50, vs_bound_p90, vs_bound_p99;
    double slo_attain;     /* of all requests, rejected ones included */
    double throughput;     /* completed requests per s, to the last first token */
    double dev_hit_rate;   /* prompt tokens found in the prefill instance's own cache */
    double store_hit_rate; /* further prompt tokens loaded from the store */
    size_t rejected, completed;
} sched_result;

/* Reads the trace at path (max requests, 0: all) and cuts it into `windows` consecutive parts of
 * equal length, each a replay of its own whose arrivals start at 0, with the other inputs of tmpl.
 * Returns 0 with *rps (windows of them) and *reqs, or -1 with the reason in err. Caller frees
 * with sched_replays_free(). */
int sched_replays_load(const char *path, size_t max, size_t windows, const sched_replay *tmpl,
                       sched_replay **rps, sched_req **reqs, char *err, size_t errlen);
void sched_replays_free(sched_replay *rps, sched_req *reqs, size_t n_reqs);

/* The trace's own arrival rate: requests per second of the replay's span. */
double sched_replay_rps(const sched_replay *rp);

/* The least share of the instances' time any placement needs at `scale` times the trace's rate:
 * every prompt's prefill with every block computed earlier by any request taken as cached (every
 * block computed once in the whole cluster, every load free), over the instances' time in the
 * span of arrivals. Near or above 1, requests must queue whatever the placement: the lower bound
 * (an idle instance for every request) cannot be approached. -1 out of memory. */
double sched_replay_work_floor(const sched_replay *rp, double scale);

/* Replays rp under placement policy pol, every instance serving its waiting queue by discipline
 * q (window rp->cost.klpm_k), with arrivals scale times faster than the trace's, into out.
 * Returns 0, or -1 (out untouched) where the scheduler or the cluster cannot be made. */
int sched_sim_run(sched_replay *rp, kvf_policy pol, kvf_queue q, double scale, sched_result *out);

#endif
