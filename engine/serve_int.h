/*
 * What kvf-engine's serving mode shares between its files: the server's state. serve.c starts
 * the server, registers it with kvf-sched and reports its load; serve_jobs.c answers its HTTP
 * requests (the jobs, their queue and prefetches, the KV events they publish).
 */
#ifndef KVF_ENGINE_SERVE_INT_H
#define KVF_ENGINE_SERVE_INT_H

#include "engine.h"
#include "clock.h"
#include "http.h"
#include "kvf/events.h"
#include "kvf/kvf.h"
#include "log.h"
#include "metrics.h"
#include "scheduler.h"

#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define KVFE_MAX_SCHEDS   16 /* given with --sched (replicas of every shard) */
#define KVFE_MAX_REPLICAS 32 /* with those learnt from etcd */

#define KVFE_ACKS       1024 /* kvf-sched reads up to 1024 */
#define KVFE_ACK_KEEP_S 5.0

typedef struct srv {
    kvfe_model m;
    kvfe_engine *e;
    kvf_connector *cn;
    kvf_log lg;
    char id[64], role[16], model[32], endpoint[160];
    char zone[64]; /* --zone: registered, for the nearest replica of what it loads */
    /* kvf-sched's replicas: --sched A[,B...] (the first n_given), then, with --etcd, those
     * registered in the cluster (a watcher adds and removes them, under mu): load reported to
     * each, registered with each that does not know this engine */
    char sched[640];
    char scheds[KVFE_MAX_REPLICAS][160];
    int n_scheds, n_given;
    char host[128]; /* --listen's */
    uint16_t port;
    uint32_t max_tokens;
    /* The waiting queue: the engine runs one job at a time, chosen by the discipline `queue`
     * (kvf_sched_queue_pick_by over the oldest klpm_k, every klpm_k-th pick the oldest: --queue
     * work, the least remaining work; hrrn, the highest response ratio; fifo, arrival order).
     * Oldest first. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct waiter {
        uint64_t id;
        size_t cached;
        double work_s;
        double since; /* when it began to wait (kvfe__srv_now) */
    } * wait;
    size_t n_wait, cap_wait;
    size_t *pick_cached; /* the discipline's view (kvf_queue_view), cap_wait long */
    double *pick_work, *pick_waited;
    kvf_queue queue;
    uint64_t next_id, running; /* the job holding the engine (0: none) */
    uint64_t picks;
    kvf_sched_cost qcost;
    int prefetch; /* fetch a waiting request's cached prefix while it waits (--prefetch) */
    uint64_t prefetch_max, prefetch_held; /* bytes the waiting requests' prefetches may hold
                                           * (--prefetch-memory), and hold now */
    double queued_prefill_tokens;
    /* The same queue in the cost model's seconds (each job's work, as the queue orders it), and
     * the running job's share of it with when it started: reported to kvf-sched, whose
     * placements then price each waiting prompt's attention, which tokens alone do not. */
    double queued_work_s, running_work_s, running_since;
    uint32_t active_decodes;
    uint64_t requests, failures, first_token_mismatches;
    kvf__log_quiet mismatch_log; /* first-token mismatches: logged at most once a second */
    uint64_t abandoned; /* requests whose client went away before their answer: cut short */
    double busy_s;
    /* GET /metrics (core/metrics.h): requests by kind and result, prompt tokens by where they
     * came from, the phases' latencies; the queue and the connector mirrored at each scrape. */
    kvf__metrics *metrics;
    kvf_metrics *metrics_pub; /* a handle on metrics for the connector (kvf/metrics.h) */
    kvf__metric *m_requests, *m_tokens, *m_seconds;
    /* load reports to kvf-sched, sent by their own thread */
    pthread_cond_t report_cv;
    int report_dirty;
    /* The tickets of kvf-sched's placements this engine took in (its plan's "ticket"), newest
     * last, at most KVFE_ACKS: each report lists those of the last KVFE_ACK_KEEP_S, so that
     * kvf-sched knows which placed requests its figures already count (scheduler/sent.c). */
    struct kvfe_ack {
        uint64_t ticket;
        double at; /* when it was counted in the queue (kvfe__srv_now) */
    } acks[KVFE_ACKS];
    size_t ack_head, n_acks;
    int ticketed; /* a request came with a ticket: the reports list them from then on (before,
                   * none: kvf-sched then takes each report's figures whole, as its clients pass
                   * no tickets on) */
    /* KV events (under the engine's turn: only the running request publishes) */
    kvf_events *pub;
    uint32_t event_shards; /* the shards pub publishes in (1: none) */
    uint64_t *held;        /* engine block hashes of the blocks in the pages */
    size_t n_held;
    atomic_int stop;
} srv;

/* Seconds on CLOCK_MONOTONIC (the clock of every deadline here). */
static inline double kvfe__srv_now(void)
{
    return (double)kvf__now_ns() * 1e-9;
}

/* The queue's predicted prefill work still to do, in seconds: every job's work less what the
 * running one has done (at most its work). S->mu held. */
static inline double kvfe__srv_queued_s_locked(const srv *S)
{
    double done = S->running_work_s > 0 ? kvfe__srv_now() - S->running_since : 0;
    done = done < S->running_work_s ? done : S->running_work_s;
    return S->queued_work_s - done > 0 ? S->queued_work_s - done : 0;
}

/* serve.c: the load changed; the reporter sends it to kvf-sched. S->mu held. */
void kvfe__srv_mark_dirty_locked(srv *S);

/* serve_jobs.c: makes S->metrics and its families. Returns 0 or -1 (out of memory). */
int kvfe__srv_metrics_open(srv *S);

/* serve_jobs.c: answers one HTTP request (the server's route: GET /v1/health, GET /metrics,
 * POST /v1/prefill, /v1/decode and /v1/generate). */
unsigned kvfe__srv_request(void *ctx, const char *method, const char *url, json_t *body,
                           kvf__http_reply *reply);

#endif
