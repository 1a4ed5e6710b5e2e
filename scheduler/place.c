/*
 * Placement (docs/scheduler.md, "Placement"): which instance prefills a request, which decodes
 * it, and the plan of actions between them, each labelled by the feasibility classifier.
 *
 * In order: match the prompt against the index; estimate every prefill instance and let the
 * policy in force (policy.c) choose among them; choose the decode instance by free KV memory;
 * move a short prefill to the decode instance (conditional disaggregation); reject early when the
 * estimate misses the SLO by too much; count what was sent until the engines report again; write
 * the plan.
 */
#include "sched_int.h"

#include "kvf/error.h"
#include "kvf/feasibility.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
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

/* The request's leading tokens that some storage node holds, in whole chunks, at most the
 * prompt. */
static size_t store_prefix(kvf_sched *s, const kvf_place_req *req)
{
    s->srun = req->chunk_keys ? kvf__sched_match_store(s, req->chunk_keys, req->n_chunks) : 0;
    size_t tokens = s->srun * s->o.store_chunk_tokens;
    return tokens > req->n_tokens ? req->n_tokens : tokens;
}

/* Of the store_tokens an instance holding `device` tokens would load, those in chunks only a disk
 * tier holds. */
static double disk_tokens(const kvf_sched *s, double device, size_t store_tokens)
{
    size_t ct = s->o.store_chunk_tokens;
    if (!s->sdisk_ok || !ct || !store_tokens || device >= (double)store_tokens)
        return 0;
    size_t k0 = (size_t)device / ct;
    if (k0 > s->srun)
        k0 = s->srun;
    return (double)(s->sdisk[s->srun] - s->sdisk[k0]) * (double)ct;
}

/* Whether chunk k of the stored run loads from another zone for an instance of zone z: no node
 * of z holds it (near_prepare's holders), and a DRAM copy does somewhere (a chunk only a disk
 * tier holds is priced at the disk's rate, disk_tokens). */
static int remote_for(const kvf_sched *s, size_t k, const char *z)
{
    if (s->sdisk_ok && s->sdisk[k + 1] != s->sdisk[k])
        return 0;
    for (uint8_t j = 0; j < s->shold_n[k]; j++)
        if (!strcmp(s->where[s->shold[k * KVF__NEAR_HOLDERS + j]].zone, z))
            return 0;
    return 1;
}

/* Zone-priced loads (cost.remote_load_bytes_per_s): once a place(), the holders of each chunk of
 * the stored run, and for each zone of the live instances that may load (up to
 * KVF__NEAR_ZONES) how many of the run's first k chunks no node of that zone holds. Nothing when
 * no remote rate is set, so that placement costs what it did. */
static void near_prepare(kvf_sched *s, const kvf_place_req *req)
{
    s->rnear_ok = 0;
    s->n_rzone = 0;
    size_t run = s->srun;
    if (!(s->o.cost.remote_load_bytes_per_s > 0) || !run || !req->chunk_keys)
        return;
    if (run > s->shcap) {
        uint16_t *h = realloc(s->shold, run * KVF__NEAR_HOLDERS * sizeof *h);
        if (h)
            s->shold = h;
        uint8_t *hn = h ? realloc(s->shold_n, run) : NULL;
        if (hn)
            s->shold_n = hn;
        uint32_t *r = hn ? realloc(s->srem, KVF__NEAR_ZONES * (run + 1) * sizeof *r) : NULL;
        if (!r)
            return; /* priced at load_bytes_per_s, as without zones */
        s->srem = r;
        s->shcap = run;
    }
    uint32_t h[64];
    for (size_t k = 0; k < run; k++) {
        size_t nh = kvf__sched_store_holders(s, &req->chunk_keys[k], h, 64);
        uint8_t m = 0;
        for (size_t j = 0; j < nh && m < KVF__NEAR_HOLDERS; j++)
            if (KVF__HOLDER_NODE(h[j]) < KVF_SCHED_MAX_STORES)
                s->shold[k * KVF__NEAR_HOLDERS + m++] = (uint16_t)KVF__HOLDER_NODE(h[j]);
        s->shold_n[k] = m;
    }
    s->rnear_ok = 1;
    for (size_t i = 0; i < s->n_inst && s->n_rzone < KVF__NEAR_ZONES; i++) {
        const char *z = s->inst[i].info.zone;
        if (!s->inst[i].live || !s->inst[i].can_load || !z[0])
            continue;
        int seen = 0;
        for (int j = 0; j < s->n_rzone && !seen; j++)
            seen = !strcmp(s->rzone[j], z);
        if (seen)
            continue;
        int zi = s->n_rzone++;
        snprintf(s->rzone[zi], sizeof s->rzone[zi], "%s", z);
        uint32_t *cum = s->srem + (size_t)zi * (run + 1);
        cum[0] = 0;
        for (size_t k = 0; k < run; k++)
            cum[k + 1] = cum[k] + (uint32_t)remote_for(s, k, z);
    }
}

/* Of the stored run's chunks from the one holding token `device` on, how many no node of zone z
 * holds: 0 for an instance without a zone (not priced), or when near_prepare had nothing. */
static size_t remote_chunks(const kvf_sched *s, const char *z, double device)
{
    size_t ct = s->o.store_chunk_tokens;
    if (!s->rnear_ok || !z[0] || !ct)
        return 0;
    size_t k0 = (size_t)device / ct;
    if (k0 >= s->srun)
        return 0;
    for (int j = 0; j < s->n_rzone; j++)
        if (!strcmp(s->rzone[j], z)) {
            const uint32_t *cum = s->srem + (size_t)j * (s->srun + 1);
            return cum[s->srun] - cum[k0];
        }
    size_t rem = 0; /* a zone past the ones counted ahead: counted here */
    for (size_t k = k0; k < s->srun; k++)
        rem += (size_t)remote_for(s, k, z);
    return rem;
}

/* What instance i would find and cost prefilling the n-token prompt, after the match (s->depth)
 * and with store_tokens loadable from the stores. */
static void estimate(const kvf_sched *s, int i, double n, size_t store_tokens, kvf__sched_est *e)
{
    const kvf__sched_inst *in = &s->inst[i];
    /* Store-cached tokens count only where the classifier lets the instance load them. */
    double device = (double)s->depth[i] * in->info.block_tokens;
    double store = in->can_load ? (double)store_tokens : 0;
    double remote =
        store ? (double)remote_chunks(s, in->info.zone, device) * (double)s->o.store_chunk_tokens
              : 0;
    kvf__sched_estimate(&s->o.cost, &in->load, n, device, store,
                        store ? disk_tokens(s, device, store_tokens) : 0,
                        s->disk_rated ? s->disk_rate : s->o.cost.disk_load_bytes_per_s, remote, e);
}

/* Whether instance in can ever hold `tokens` tokens of KV: its whole memory, as its record gives
 * it (capacity_blocks; 0: not said, taken as enough). */
static int can_hold(const kvf__sched_inst *in, double tokens)
{
    return !in->info.capacity_blocks ||
           (double)in->info.capacity_blocks * in->info.block_tokens >= tokens;
}

/* The prefill instance the policy chooses among those with the prefill role that can hold the
 * prompt, and its estimate in *best_est; -1 when there is none. */
static int choose_prefill(const kvf_sched *s, const kvf__sched_policy *policy, double n,
                          size_t store_tokens, kvf__sched_est *best_est)
{
    kvf__sched_cand cand = {.prompt = n};
    /* A free slot is all zero: no role, so neither loop takes it. */
    for (size_t i = 0; i < s->n_inst; i++)
        cand.count += (s->inst[i].info.role & KVF_ROLE_PREFILL) != 0;
    int best = -1;
    double best_score = INFINITY;
    for (size_t i = 0; i < s->n_inst; i++) {
        if (!s->inst[i].live || !(s->inst[i].info.role & KVF_ROLE_PREFILL) ||
            !can_hold(&s->inst[i], n))
            continue;
        cand.in = &s->inst[i];
        estimate(s, (int)i, n, store_tokens, &cand.est);
        double score = policy->score(s, &cand);
        cand.ordinal++;
        if (score < best_score) {
            best_score = score;
            best = (int)i;
            *best_est = cand.est;
        }
    }
    return best;
}

/* The decode instance, among those with the decode role whose whole KV memory can hold the
 * request's `need` tokens (prompt and output), best first by:
 * 1. its free KV memory holds them;
 * 2. it only decodes (an instance that only decodes is there to decode);
 * 3. for an instance that only decodes, the fewest sequences decoding, its share of KV memory in
 *    use with the request added breaking ties (it weighs less than one decode): its decodes set
 *    a decoding step's time (an engine that decodes one sequence at a time queues them), while
 *    its memory matters only as it runs short. Weighed first, memory sent a burst's decodes to
 *    the decode engine whose cache held less, a difference larger than any burst (the README
 *    demo: 5-8 of a burst's 6-9 decodes on one of two decode engines). One that does not report
 *    its capacity is taken as half full (neither first nor last at equal decodes);
 * 4. for an instance that also prefills, the most free tokens less 1,000 per active decode:
 *    there the choice places a short prefill (conditional disaggregation, below), and the
 *    emptiest cache evicts the least (decodes first there made longest_prefix's replay 2.5x
 *    slower at p50 on 16 instances at 4x: docs/scheduler.md).
 * An instance other than the prefill instance decodes only if the KV can be handed to it. -1
 * when none can; *too_small set when a decode instance was passed over for its memory. */
typedef struct decode_rank {
    int short_mem; /* its free memory does not hold the request */
    int prefills;  /* it also prefills */
    double value;  /* within the two above, lower is better */
} decode_rank;

static decode_rank rank_decode(const kvf__sched_inst *in, double need)
{
    decode_rank r = {.prefills = (in->info.role & KVF_ROLE_PREFILL) != 0};
    double decodes = in->load.active_decodes;
    if (r.prefills) {
        double free_tokens = ((double)in->info.capacity_blocks - (double)in->load.used_blocks) *
                             in->info.block_tokens;
        r.short_mem = !(free_tokens >= need);
        r.value = -free_tokens / 1e3 + decodes;
        return r;
    }
    r.value = decodes + 0.5; /* memory not reported: taken as half in use */
    if (in->info.capacity_blocks) {
        double cap = (double)in->info.capacity_blocks * in->info.block_tokens;
        double used = (double)in->load.used_blocks * in->info.block_tokens;
        r.short_mem = !(cap - used >= need);
        r.value = decodes + (used + need) / cap;
    }
    return r;
}

static int rank_better(const decode_rank *a, const decode_rank *b)
{
    if (a->short_mem != b->short_mem)
        return a->short_mem < b->short_mem;
    if (a->prefills != b->prefills)
        return a->prefills < b->prefills;
    return a->value < b->value;
}

static int choose_decode(const kvf_sched *s, int prefill, double need, int *too_small)
{
    *too_small = 0;
    /* Without stores there is no handoff: the prefill instance decodes when it can. */
    if (s->o.no_stores && (s->inst[prefill].info.role & KVF_ROLE_DECODE))
        return prefill;
    int dec = -1;
    decode_rank best = {0};
    for (size_t i = 0; i < s->n_inst; i++) {
        const kvf__sched_inst *in = &s->inst[i];
        if (!in->live || !(in->info.role & KVF_ROLE_DECODE))
            continue;
        if (!can_hold(in, need)) {
            *too_small = 1;
            continue;
        }
        decode_rank r = rank_decode(in, need);
        if (dec >= 0 && !rank_better(&r, &best))
            continue;
        /* Asked only of a candidate that would win: the classifier writes a sentence per call,
         * and a place() over hundreds of instances must not pay for hundreds of them. */
        if ((int)i != prefill && label_of(KVF_ACTION_PD_HANDOFF_STORE, &s->inst[prefill].caps,
                                          &in->caps) != KVF_LABEL_REAL)
            continue;
        best = r;
        dec = (int)i;
    }
    return dec;
}

/* Conditional disaggregation: a short uncached suffix is cheaper to prefill where it will decode
 * than to hand off, and every engine can prefill. "Short" is judged on the decode instance itself,
 * with what it can reach: its own cache and, if its record allows the load, the stores. It is
 * cheaper only while the decode instance's own prefill queue does not cost more than the handoff
 * saves: its expected TTFT must be within the handoff's time of the chosen prefill instance's.
 * (Without that check a short suffix went to the decode instance whatever its queue, overriding
 * the policy's choice: in the trace replay, where every instance prefills and decodes, a sixth to
 * a quarter of the requests were placed by decode memory alone.)
 *
 * Overflow (decode_overflow): a long suffix also goes to a decode-only instance (one the policy
 * could not choose; an instance that also prefills was among its candidates) when what it saves
 * there (the chosen prefill instance's expected TTFT and the handoff, less the decode instance's
 * expected TTFT) is at least the whole prefill's work on the decode instance, that is when the
 * prefill instances are queued deeper than the request itself costs. An idle prefill tier never
 * loses a request this way; a saturated one stops holding the long prompts back while the decode
 * instances idle (the README demo's tail: two prefill engines busy 95% of the run, two decode
 * engines 25%). The price is paid by the decode instance's active sequences, whose steps wait for
 * the prefill: it is taken only where the request's wait is cut by more than that prefill lasts.
 * Where the decode instance shares its compute (a host's cores, one GPU) with busy instances,
 * its prefill is priced at the slowdown that sharing brings (compute_slowdown): four engines on
 * two cores are not four engines' capacity.
 * Returns the instance that prefills, with its estimate in *e. */
/* How much slower instance i works once set to work beside the busy instances that share its
 * compute: the slots they use, its own added, over the slots the compute has (at least 1). Four
 * single-threaded engines on two cores run each at half speed; an instance on compute of its
 * own, or with slots to spare, at full speed. */
static double compute_slowdown(const kvf_sched *s, int i)
{
    const kvf_instance_info *me = &s->inst[i].info;
    if (!me->compute[0] || !me->compute_slots)
        return 1.0;
    uint64_t used = me->compute_uses ? me->compute_uses : 1;
    for (size_t k = 0; k < s->n_inst; k++) {
        const kvf__sched_inst *o = &s->inst[k];
        if ((int)k == i || !o->live || strcmp(o->info.compute, me->compute) != 0)
            continue;
        int busy = o->load.queued_prefill_tokens > 0 || o->load.queued_prefill_s > 0 ||
                   o->load.active_decodes > 0;
        used += busy ? (o->info.compute_uses ? o->info.compute_uses : 1) : 0;
    }
    double f = (double)used / (double)me->compute_slots;
    return f > 1.0 ? f : 1.0;
}

static int colocate_on_decode(const kvf_sched *s, int prefill, int decode, double n,
                              size_t store_tokens, double slo_s, kvf__sched_est *e)
{
    if (decode < 0 || decode == prefill)
        return prefill;
    kvf__sched_est d;
    estimate(s, decode, n, store_tokens, &d);
    double saved = e->ttft_s + kvf__sched_handoff_s(&s->o.cost, n) - d.ttft_s;
    double work = d.load_s + kvf__sched_prefill_s(&s->o.cost, n, d.cached);
    int short_suffix = n - d.cached < s->o.cost.disagg_threshold_tokens && saved >= 0;
    /* On shared compute the long prefill runs slower there, and so do its neighbours: priced by
     * the slowdown, it must still save more than it lasts. */
    double f = compute_slowdown(s, decode);
    int decode_only =
        s->o.cost.decode_overflow && !(s->inst[decode].info.role & KVF_ROLE_PREFILL) && work > 0;
    int overflow = decode_only && saved - (f - 1.0) * work >= f * work;
    /* SLO rescue: a request that would miss its TTFT objective through the prefill tier and meets
     * it on the decode instance, its prefill there priced at the slowdown, when that instance has
     * no prefill work queued (its spare time only: the short requests it prefills do not wait
     * behind the rescued one's queue). */
    double there = d.ttft_s + (f - 1.0) * work;
    const kvf_instance_load *dl = &s->inst[decode].load;
    int rescue = decode_only && slo_s > 0 && dl->queued_prefill_s <= 0 &&
                 dl->queued_prefill_tokens <= 0 &&
                 e->ttft_s + kvf__sched_handoff_s(&s->o.cost, n) > slo_s && there <= slo_s;
    if (short_suffix || overflow || rescue) {
        *e = d;
        /* a long prefill there runs at the slowdown (f is 1 on compute of its own) */
        if (overflow || rescue)
            e->ttft_s = there;
        return decode;
    }
    return prefill;
}

/* The result's instances and the cost model's figures, from the prefill instance's estimate. */
static void set_estimates(const kvf_sched *s, double n, int prefill, int decode,
                          const kvf__sched_est *e, kvf_place_res *res)
{
    const kvf_sched_cost *c = &s->o.cost;
    res->prefill = prefill;
    res->decode = decode;
    res->colocated = prefill == decode;
    res->cached_device = (size_t)e->device;
    res->cached_store = e->cached > e->device ? (size_t)(e->cached - e->device) : 0;
    res->queue_s = kvf__sched_queue_s(c, &s->inst[prefill].load);
    res->load_s = e->load_s;
    res->prefill_s = kvf__sched_prefill_s(c, n, e->cached);
    res->expected_ttft_s = e->ttft_s;
    /* twice the predicted load (disk-only chunks at the disk's rate), unless set per 1k tokens */
    res->load_deadline_s = !res->cached_store ? 0
                           : c->load_deadline_s_per_ktok > 0
                               ? kvf__sched_load_deadline_s(c, (double)res->cached_store)
                               : c->load_deadline_base_s + 2.0 * res->load_s;
}

/* Until the engines report again, counts what was just sent to them, so that a burst of requests
 * spreads instead of piling onto the instance that looked idlest. The next load report replaces
 * these figures with the engine's own (kvf-sched adds back those of the placements the report
 * was taken before: scheduler/sent.c). */
static void note_sent(kvf_sched *s, const kvf_place_res *res, double n)
{
    kvf__sched_inst *p = &s->inst[res->prefill];
    /* Both measures: seconds price the request's attention, which tokens alone do not. */
    p->load.queued_prefill_tokens += n;
    p->load.queued_prefill_s += res->load_s + res->prefill_s;
    s->inst[res->decode].load.active_decodes++;
}

static void add_action(kvf_place_res *res, kvf_action_kind kind, int instance, size_t tokens,
                       double seconds, kvf_label label)
{
    res->actions[res->n_actions++] = (kvf_action){
        .kind = kind, .instance = instance, .tokens = tokens, .seconds = seconds, .label = label};
}

/* The plan, each action labelled by the classifier against the instances' records and the
 * storage node's: load what the stores hold beyond the prefill instance's cache, prefill the
 * rest, save the prompt's KV, and hand it to the decode instance when that is another. */
static void write_plan(const kvf_sched *s, const kvf_place_req *req, double n, double cached,
                       kvf_place_res *res)
{
    int p = res->prefill;
    const kvf_caps *pc = &s->inst[p].caps, *dc = &s->inst[res->decode].caps;
    if (s->o.no_stores) { /* nothing to load from, save to or hand over through */
        add_action(res, KVF_ACT_PREFILL, p, req->n_tokens - (size_t)cached, res->prefill_s,
                   KVF_LABEL_REAL);
        if (res->decode != p)
            add_action(res, KVF_ACT_HANDOFF, res->decode, req->n_tokens,
                       kvf__sched_handoff_s(&s->o.cost, n), KVF_LABEL_BACKEND_INFEASIBLE);
        return;
    }
    if (res->cached_store)
        add_action(res, KVF_ACT_LOAD_FROM_STORE, p, res->cached_store, res->load_s,
                   label_of(pc->layerwise_hooks ? KVF_ACTION_LAYERWISE_LOAD : KVF_ACTION_RETRIEVE,
                            pc, &s->store_caps));
    add_action(res, KVF_ACT_PREFILL, p, req->n_tokens - (size_t)cached, res->prefill_s,
               KVF_LABEL_REAL);
    add_action(res, KVF_ACT_SAVE_TO_STORE, p, req->n_tokens, 0,
               label_of(KVF_ACTION_STORE, pc, &s->store_caps));
    if (res->decode != p)
        add_action(res, KVF_ACT_HANDOFF, res->decode, req->n_tokens,
                   kvf__sched_handoff_s(&s->o.cost, n),
                   label_of(KVF_ACTION_PD_HANDOFF_STORE, pc, dc));
}

int kvf_sched_lookup(kvf_sched *s, const kvf_place_req *req, size_t *device, size_t n_slots,
                     size_t *store)
{
    if ((!req->tokens && req->n_tokens) || (n_slots && !device) || !store)
        return KVF_EINVAL;
    kvf__sched_match_sizes(s, req->tokens, req->n_tokens);
    for (size_t i = 0; i < n_slots; i++) {
        const kvf__sched_inst *in = i < s->n_inst ? &s->inst[i] : NULL;
        size_t t = in && in->live ? (size_t)s->depth[i] * in->info.block_tokens : 0;
        device[i] = t < req->n_tokens ? t : req->n_tokens;
    }
    *store = s->o.no_stores ? 0 : store_prefix(s, req);
    return 0;
}

int kvf_sched_place(kvf_sched *s, const kvf_place_req *req, kvf_place_res *res)
{
    memset(res, 0, sizeof *res);
    res->prefill = res->decode = -1;
    if (!req->tokens && req->n_tokens)
        return KVF_EINVAL;
    const kvf_sched_cost *c = &s->o.cost;
    const kvf__sched_policy *policy = kvf__sched_policy_of(s->o.policy);
    double n = (double)req->n_tokens;
    kvf__sched_match_sizes(s, req->tokens, req->n_tokens);
    size_t store_tokens = s->o.no_stores ? 0 : store_prefix(s, req);
    if (store_tokens)
        near_prepare(s, req);
    else
        s->rnear_ok = 0;
    kvf__sched_est e = {0};
    int prefill = choose_prefill(s, policy, n, store_tokens, &e);
    if (prefill < 0)
        return KVF_ENOENT;
    if (policy->placed)
        policy->placed(s);
    int too_small;
    int decode = choose_decode(s, prefill, n + req->output_tokens, &too_small);
    if (decode < 0 && (too_small || !can_hold(&s->inst[prefill], n + req->output_tokens)))
        return KVF_ENOENT; /* no instance that decodes can hold the prompt and its output */
    prefill = colocate_on_decode(s, prefill, decode, n, store_tokens, req->slo_ttft_s, &e);
    set_estimates(s, n, prefill, decode >= 0 ? decode : prefill, &e, res);
    if (req->slo_ttft_s > 0 && c->reject_factor > 0 &&
        e.ttft_s > req->slo_ttft_s * c->reject_factor) {
        res->rejected = 1;
        return 0;
    }
    note_sent(s, res, n);
    if (!s->o.no_stores)
        kvf__sched_sources(s, req, res);
    write_plan(s, req, n, e.cached, res);
    return 0;
}
