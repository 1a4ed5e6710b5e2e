/*
 * Waiting-queue disciplines (docs/scheduler.md, "Queue order"): which of an instance's waiting
 * requests runs next, as a const table of disciplines indexed by kvf_queue. A discipline is a key
 * over the waiting requests (the lowest runs first, the oldest of equal keys); the window and the
 * every-k-th-pick-the-oldest rule around it are the same for all, so that disciplines differ only
 * in what they order by and share one bound on waiting behind later arrivals.
 *
 * The periodic oldest pick follows k-LPM (Dexter et al., "LLM Query Scheduling with Prefix Reuse
 * and Latency Constraints", arXiv 2502.04677, 2025), which takes the oldest request once and then
 * k-1 requests by SGLang's longest-prefix-match order; here the other picks also look only at the
 * oldest k, which bounds what a key costs the caller to compute, and the key is a choice.
 */
#include "scheduler.h"

#include <stddef.h>
#include <stdint.h>

/* A discipline: the KVF_QUEUE_READS_* it reads, and the key of waiting request j (the lowest runs
 * first). key NULL: arrival order. */
typedef struct queue_ops {
    unsigned reads;
    double (*key)(const kvf_queue_view *v, size_t j);
} queue_ops;

static double key_work(const kvf_queue_view *v, size_t j)
{
    return v->work_s[j];
}

static double key_tokens(const kvf_queue_view *v, size_t j)
{
    return (double)v->tokens[j];
}

static double key_longest_prefix(const kvf_queue_view *v, size_t j)
{
    return -(double)v->cached[j];
}

/* The response ratio (waited + work) / work, negated: the highest runs first. Among requests
 * that have waited as long, the least work wins (work's order); a request's ratio grows by one for
 * each of its own work's length that it waits, so a long prompt overtaken by shorter ones rises
 * until it runs. Work below a millisecond counts as a millisecond: a request with nothing left to
 * compute (its whole prefix cached) wins once it has waited a few, without a division by zero. */
static double key_hrrn(const kvf_queue_view *v, size_t j)
{
    double w = v->work_s[j] > 1e-3 ? v->work_s[j] : 1e-3;
    double waited = v->waited_s[j] > 0 ? v->waited_s[j] : 0;
    return -(waited + w) / w;
}

static const queue_ops disciplines[KVF_QUEUE_COUNT_] = {
    [KVF_QUEUE_FIFO] = {.reads = 0, .key = NULL},
    [KVF_QUEUE_WORK] = {.reads = KVF_QUEUE_READS_WORK, .key = key_work},
    [KVF_QUEUE_SJF] = {.reads = KVF_QUEUE_READS_TOKENS, .key = key_tokens},
    [KVF_QUEUE_LPM] = {.reads = KVF_QUEUE_READS_CACHED, .key = key_longest_prefix},
    [KVF_QUEUE_HRRN] = {.reads = KVF_QUEUE_READS_WORK | KVF_QUEUE_READS_WAITED, .key = key_hrrn},
};

unsigned kvf_queue_reads(kvf_queue q)
{
    return (unsigned)q < KVF_QUEUE_COUNT_ ? disciplines[q].reads : 0;
}

size_t kvf_sched_queue_pick_by(kvf_queue q, uint32_t k, const kvf_queue_view *v, uint64_t pick)
{
    if ((unsigned)q >= KVF_QUEUE_COUNT_ || !disciplines[q].key || v->n < 2 || k < 2 ||
        pick % k == k - 1)
        return 0;
    double (*key)(const kvf_queue_view *, size_t) = disciplines[q].key;
    size_t best = 0;
    double best_key = key(v, 0);
    for (size_t j = 1; j < v->n && j < k; j++) {
        double kj = key(v, j);
        if (kj < best_key) {
            best_key = kj;
            best = j;
        }
    }
    return best;
}

kvf_queue kvf_sched_cost_queue(const kvf_sched_cost *c)
{
    if (c->klpm_k < 2)
        return KVF_QUEUE_FIFO;
    return c->queue_by_work ? KVF_QUEUE_WORK : KVF_QUEUE_LPM;
}

size_t kvf_sched_queue_pick(const kvf_sched_cost *c, const size_t *cached, const double *work_s,
                            size_t n, uint64_t pick)
{
    kvf_queue_view v = {.n = n, .cached = cached, .work_s = work_s};
    return kvf_sched_queue_pick_by(kvf_sched_cost_queue(c), c->klpm_k, &v, pick);
}
