/*
 * The placement policies (docs/scheduler.md, "Placement"): how each ranks the instances that can
 * run a request's prefill. place.c estimates every candidate once and asks the policy in force
 * for a score; the lowest wins.
 *
 *   round_robin     the next prefill instance in turn
 *   least_loaded    the fewest queued prompt tokens, as the engines report them
 *   longest_prefix  the longest prefix in the instance's own memory, ties to the less loaded
 *   dynamo_cost     NVIDIA Dynamo's KV-router cost: prompt blocks its cache does not cover, plus
 *                   its active blocks, plus its queued blocks
 *   kvf_cost        the cost model's expected time to first token: queue wait + load of what the
 *                   stores hold beyond its own cache + prefill of the rest
 */
#include "sched_int.h"

static double score_round_robin(const kvf_sched *s, const kvf__sched_cand *c)
{
    /* How many turns away it is: 0 for the instance whose turn it is. */
    return (double)((c->ordinal + c->count - s->rr % c->count) % c->count);
}

static void round_robin_placed(kvf_sched *s)
{
    s->rr++;
}

static double score_least_loaded(const kvf_sched *s, const kvf__sched_cand *c)
{
    (void)s;
    return c->in->load.queued_prefill_tokens;
}

static double score_longest_prefix(const kvf_sched *s, const kvf__sched_cand *c)
{
    (void)s;
    /* A token of prefix outweighs any queue, so the queue only breaks ties. */
    return -c->est.device * 1e9 + c->in->load.queued_prefill_tokens;
}

static double score_dynamo_cost(const kvf_sched *s, const kvf__sched_cand *c)
{
    (void)s;
    /* Dynamo's KV router: overlap-weighted prefill blocks plus active blocks. */
    double bt = c->in->info.block_tokens;
    return (c->prompt - c->est.device) / bt + (double)c->in->load.used_blocks +
           c->in->load.queued_prefill_tokens / bt;
}

static double score_kvf_cost(const kvf_sched *s, const kvf__sched_cand *c)
{
    (void)s;
    return c->est.ttft_s;
}

static const kvf__sched_policy policies[KVF_POLICY_COUNT_] = {
    [KVF_POLICY_ROUND_ROBIN] = {.score = score_round_robin, .placed = round_robin_placed},
    [KVF_POLICY_LEAST_LOADED] = {.score = score_least_loaded},
    [KVF_POLICY_LONGEST_PREFIX] = {.score = score_longest_prefix},
    [KVF_POLICY_DYNAMO_COST] = {.score = score_dynamo_cost},
    [KVF_POLICY_KVF_COST] = {.score = score_kvf_cost},
};

const kvf__sched_policy *kvf__sched_policy_of(kvf_policy p)
{
    return &policies[(unsigned)p < KVF_POLICY_COUNT_ ? p : KVF_POLICY_KVF_COST];
}
