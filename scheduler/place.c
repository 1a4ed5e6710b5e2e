/*
 * Placement (docs/scheduler.md, "Placement"): which instance prefills a request and which decodes
 * it, and the plan of actions between them.
 *
 * Policies: round robin, least loaded, longest prefix, Dynamo's KV-router cost (prefill blocks
 * after overlap, weighted, plus active blocks), and kvfabric's cost model: expected queue wait +
 * load of store-cached tokens at the measured bandwidth + prefill of the rest (linear and
 * quadratic terms).
 */
#include "sched_int.h"

#include "kvf/error.h"
#include "kvf/feasibility.h"

#include <math.h>
#include <string.h>

/* The plan's labels share the classifier's numbering. */
_Static_assert((int)KVF_LABEL_REAL == (int)KVF_FEAS_REAL &&
                   (int)KVF_LABEL_BACKEND_INFEASIBLE == (int)KVF_FEAS_BACKEND_INFEASIBLE &&
                   (int)KVF_LABEL_SIMULATED == (int)KVF_FEAS_SIMULATED,
               "plan labels and feasibility labels must agree");

static kvf_label label_of(kvf_action_id a, const kvf_caps *l, const kvf_caps *r)
{
    kvf_verdict v;
    kvf_classify(a, l, r, 0, &v);
    return (kvf_label)v.label;
}

int kvf_sched_place(kvf_sched *s, const kvf_place_req *req, kvf_place_res *res)
{
    memset(res, 0, sizeof *res);
    res->prefill = res->decode = -1;
    if (!req->tokens && req->n_tokens)
        return KVF_EINVAL;
    const kvf_sched_cost *c = &s->o.cost;
    kvf__sched_match_sizes(s, req->tokens, req->n_tokens);
    size_t store_tokens =
        req->chunk_keys
            ? kvf__sched_match_store(s, req->chunk_keys, req->n_chunks) * s->o.store_chunk_tokens
            : 0;
    if (store_tokens > req->n_tokens)
        store_tokens = req->n_tokens;

    double n = (double)req->n_tokens;
    int best = -1;
    double best_score = INFINITY, best_ttft = INFINITY;
    size_t ncand = 0, k = 0;
    for (size_t i = 0; i < s->n_inst; i++)
        ncand += (s->inst[i].info.role & KVF_ROLE_PREFILL) != 0;
    for (size_t i = 0; i < s->n_inst; i++) {
        kvf__sched_inst *in = &s->inst[i];
        if (!(in->info.role & KVF_ROLE_PREFILL))
            continue;
        size_t ordinal = k++;
        double dev = (double)s->depth[i] * in->info.block_tokens;
        /* Store-cached tokens count only where the classifier lets the instance load them. */
        double st = in->can_load ? (double)store_tokens : 0;
        double cached = dev > st ? dev : st;
        double load_s = dev >= cached ? 0 : kvf__sched_load_s(c, cached - dev);
        double ttft =
            kvf__sched_queue_s(c, &in->load) + load_s + kvf__sched_prefill_s(c, n, cached);
        double score;
        switch (s->o.policy) {
        case KVF_POLICY_ROUND_ROBIN:
            score = (double)((ordinal + ncand - s->rr % ncand) % ncand);
            break;
        case KVF_POLICY_LEAST_LOADED:
            score = in->load.queued_prefill_tokens;
            break;
        case KVF_POLICY_LONGEST_PREFIX:
            score = -dev * 1e9 + in->load.queued_prefill_tokens;
            break;
        case KVF_POLICY_DYNAMO_COST: {
            /* Dynamo's KV router: overlap-weighted prefill blocks plus active blocks. */
            double bt = in->info.block_tokens;
            score =
                (n - dev) / bt + (double)in->load.used_blocks + in->load.queued_prefill_tokens / bt;
            break;
        }
        case KVF_POLICY_KVF_COST:
        default:
            score = ttft;
        }
        if (score < best_score) {
            best_score = score;
            best = (int)i;
            best_ttft = ttft;
        }
    }
    if (best < 0)
        return KVF_ENOENT;
    if (s->o.policy == KVF_POLICY_ROUND_ROBIN)
        s->rr++;

    /* Decode: the most KV headroom, then the fewest active sequences. */
    int dec = -1;
    double dscore = INFINITY;
    double need = n + req->output_tokens;
    for (size_t i = 0; i < s->n_inst; i++) {
        kvf__sched_inst *in = &s->inst[i];
        if (!(in->info.role & KVF_ROLE_DECODE))
            continue;
        double free_tokens = ((double)in->info.capacity_blocks - (double)in->load.used_blocks) *
                             in->info.block_tokens;
        double sc = (free_tokens >= need ? 0 : 1e12) - free_tokens + in->load.active_decodes * 1e3;
        if (sc >= dscore)
            continue;
        /* Another instance decodes only if the KV can be handed to it. Asked only of a candidate
         * that would win: the classifier writes a sentence per call, and a place() over hundreds
         * of instances must not pay for hundreds of them. */
        if ((int)i != best &&
            label_of(KVF_ACTION_PD_HANDOFF_STORE, &s->inst[best].caps, &in->caps) != KVF_LABEL_REAL)
            continue;
        dscore = sc;
        dec = (int)i;
    }
    kvf__sched_inst *p = &s->inst[best];
    double dev = (double)s->depth[best] * p->info.block_tokens;
    double pst = p->can_load ? (double)store_tokens : 0;
    double cached = dev > pst ? dev : pst;
    /* Conditional disaggregation: a short uncached suffix is cheaper to prefill where it will
     * decode than to hand off, and every engine can prefill (a decode-only instance takes only
     * these short ones). "Short" is judged on the decode instance itself, with what it can
     * reach: its own cache and, if its record allows the load, the stores. */
    if (dec >= 0 && dec != best) {
        kvf__sched_inst *d = &s->inst[dec];
        double ddev = (double)s->depth[dec] * d->info.block_tokens;
        double dst = d->can_load ? (double)store_tokens : 0;
        double dc = ddev > dst ? ddev : dst;
        if (n - dc < c->disagg_threshold_tokens) {
            double dl = ddev >= dc ? 0 : kvf__sched_load_s(c, dc - ddev);
            best = dec;
            p = d;
            dev = ddev;
            cached = dc;
            best_ttft = kvf__sched_queue_s(c, &d->load) + dl + kvf__sched_prefill_s(c, n, dc);
        }
    }
    res->prefill = best;
    res->decode = dec >= 0 ? dec : best;
    res->colocated = res->prefill == res->decode;
    res->cached_device = (size_t)dev;
    res->cached_store = cached > dev ? (size_t)(cached - dev) : 0;
    res->queue_s = kvf__sched_queue_s(c, &p->load);
    res->load_s = kvf__sched_load_s(c, (double)res->cached_store);
    res->prefill_s = kvf__sched_prefill_s(c, n, cached);
    res->expected_ttft_s = best_ttft;
    if (req->slo_ttft_s > 0 && c->reject_factor > 0 &&
        best_ttft > req->slo_ttft_s * c->reject_factor) {
        res->rejected = 1;
        return 0;
    }
    /* Until the engines report again, count what was just sent to them, so that a burst of
     * requests spreads instead of piling onto the instance that looked idlest. The next load
     * report replaces these figures with the engine's own. */
    p->load.queued_prefill_tokens += n;
    if (p->load.queued_prefill_s > 0)
        p->load.queued_prefill_s += res->prefill_s;
    s->inst[res->decode].load.active_decodes++;
    /* The plan, each action labelled by the classifier against the instances' records and the
     * storage node's. */
    const kvf_caps *pc = &s->inst[best].caps, *dc = &s->inst[res->decode].caps;
    if (res->cached_store)
        res->actions[res->n_actions++] = (kvf_action){
            KVF_ACT_LOAD_FROM_STORE, best, res->cached_store, res->load_s,
            label_of(pc->layerwise_hooks ? KVF_ACTION_LAYERWISE_LOAD : KVF_ACTION_RETRIEVE, pc,
                     &s->store_caps)};
    res->actions[res->n_actions++] = (kvf_action){
        KVF_ACT_PREFILL, best, req->n_tokens - (size_t)cached, res->prefill_s, KVF_LABEL_REAL};
    res->actions[res->n_actions++] = (kvf_action){KVF_ACT_SAVE_TO_STORE, best, req->n_tokens, 0,
                                                  label_of(KVF_ACTION_STORE, pc, &s->store_caps)};
    if (res->decode != best)
        res->actions[res->n_actions++] =
            (kvf_action){KVF_ACT_HANDOFF, res->decode, req->n_tokens, kvf__sched_handoff_s(c, n),
                         label_of(KVF_ACTION_PD_HANDOFF_STORE, pc, dc)};
    return 0;
}
