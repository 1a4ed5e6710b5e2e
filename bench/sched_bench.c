/*
 * kvf-bench sched: trace replay at cluster scale through the real prefix index and placement code,
 * with a prefill/decode/transfer cost model. Every figure it prints is simulated and labelled so.
 *
 *   kvf-bench sched --trace FILE --instances N --policy P[,P...] [--time-scale X | --find-rate]
 *                   [--slo-ttft S] [--cost FILE] [--device-blocks B] [--store-blocks B]
 *                   [--max-requests M] [--json] [--decision-latency]
 *
 * The trace is Mooncake's format: one JSON object per line with timestamp (ms), input_length,
 * output_length and hash_ids (one id per 512-token block, prefix-chained). Each id becomes 512
 * deterministic token ids, so shared ids mean shared prefixes, and the index hashes the tokens
 * itself as it would an engine's.
 *
 * The simulated cluster: N instances, each with a prefill queue served one request at a time and a
 * KV cache of --device-blocks 512-token blocks (LRU), publishing stored and removed blocks to the
 * index as an engine's KV events would; and a shared kvfabric store of --store-blocks blocks
 * (LRU) that every prefill saves to and loads from. Prefill time follows the cost model (linear
 * and quadratic terms over the uncached tokens); a store load overlaps the prefill layer by layer,
 * so it costs max(prefill, load); decode time per token grows with the instance's active decodes.
 * Under kvf_cost the queues are ordered k-LPM (the longest cached prefix among the oldest k
 * requests first, every k-th pick the oldest, so no request starves).
 */
#include "bench.h"
#include "bench_util.h"
#include "trace.h"

#include "kvf/kvf.h"
#include "scheduler.h"

#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK BENCH_TRACE_BLOCK

typedef struct req {
    double arrival; /* trace time, s */
    double arr_s;   /* arrival in the simulation (trace time / scale) */
    uint32_t in_len, out_len;
    uint32_t n_ids;
    uint64_t *ids;
    /* results */
    double start, ttft, tpot;
    double est_s; /* the scheduler's prefill estimate at placement */
    int inst, rejected, done;
    size_t dev_hit, store_hit;
} req;

typedef struct lru_node {
    uint64_t id;
    int32_t prev, next;
} lru_node;

/* An LRU set of block ids with a hash index: the device caches and the store. */
typedef struct lru {
    lru_node *n;
    uint64_t *keys; /* open addressing: id + 1, 0 empty */
    int32_t *slot;
    uint64_t mask;
    uint32_t cap, used;
    int32_t head, tail, free_head;
} lru;

typedef struct inst_state {
    int idx;
    lru cache;
    int *queue;
    size_t qh, qt, qcap;
    uint32_t picks;
    double busy_until;
    int running;           /* request index or -1 */
    double queued_est_s;   /* estimated prefill seconds of the queued requests */
    double queued_raw_tok; /* their prompt tokens */
    uint32_t active_decodes;
    double *decode_ends; /* min-heap would be nicer; a small array suffices */
    size_t n_dec, cap_dec;
} inst_state;

typedef struct sim {
    kvf_sched *s;
    kvf_sched_cost cost;
    kvf_policy policy;
    req *r;
    size_t n;
    inst_state *in;
    int ni;
    lru store;
    uint32_t *tok;
    size_t tokcap;
    kvf_key *keys;
    size_t keycap;
    double slo;
    size_t *pick_cached; /* q_pick's scratch */
    double *pick_work;
    size_t pick_cap;
} sim;

/* ------------------------------------------------------------------------------------------ */
/* LRU */

static int lru_init(lru *l, uint32_t cap)
{
    memset(l, 0, sizeof *l);
    l->cap = cap;
    uint64_t t = 16;
    while (t < (uint64_t)cap * 2)
        t <<= 1;
    l->mask = t - 1;
    l->n = malloc((size_t)cap * sizeof *l->n);
    l->keys = calloc(t, sizeof *l->keys);
    l->slot = malloc(t * sizeof *l->slot);
    if (!l->n || !l->keys || !l->slot)
        return -1;
    l->head = l->tail = -1;
    for (uint32_t i = 0; i < cap; i++)
        l->n[i].next = i + 1 < cap ? (int32_t)i + 1 : -1;
    l->free_head = cap ? 0 : -1;
    return 0;
}

static void lru_free(lru *l)
{
    free(l->n);
    free(l->keys);
    free(l->slot);
}

static uint64_t hmix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static int64_t lru_find(const lru *l, uint64_t id)
{
    uint64_t i = hmix(id) & l->mask;
    while (l->keys[i]) {
        if (l->keys[i] == id + 1)
            return (int64_t)i;
        i = (i + 1) & l->mask;
    }
    return -1;
}

static void unlink_node(lru *l, int32_t k)
{
    lru_node *x = &l->n[k];
    if (x->prev >= 0)
        l->n[x->prev].next = x->next;
    else
        l->head = x->next;
    if (x->next >= 0)
        l->n[x->next].prev = x->prev;
    else
        l->tail = x->prev;
}

static void push_front(lru *l, int32_t k)
{
    l->n[k].prev = -1;
    l->n[k].next = l->head;
    if (l->head >= 0)
        l->n[l->head].prev = k;
    l->head = k;
    if (l->tail < 0)
        l->tail = k;
}

static void table_del(lru *l, uint64_t i)
{
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & l->mask;
        if (!l->keys[j])
            break;
        uint64_t home = hmix(l->keys[j] - 1) & l->mask;
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            l->keys[i] = l->keys[j];
            l->slot[i] = l->slot[j];
            i = j;
        }
    }
    l->keys[i] = 0;
}

/* Touches id (inserting it); returns the id evicted to make room, or UINT64_MAX. */
static uint64_t lru_touch(lru *l, uint64_t id)
{
    int64_t t = lru_find(l, id);
    if (t >= 0) {
        int32_t k = l->slot[t];
        unlink_node(l, k);
        push_front(l, k);
        return UINT64_MAX;
    }
    uint64_t evicted = UINT64_MAX;
    int32_t k;
    if (l->free_head >= 0) {
        k = l->free_head;
        l->free_head = l->n[k].next;
        l->used++;
    } else {
        k = l->tail;
        evicted = l->n[k].id;
        unlink_node(l, k);
        table_del(l, (uint64_t)lru_find(l, evicted));
    }
    l->n[k].id = id;
    push_front(l, k);
    uint64_t i = hmix(id) & l->mask;
    while (l->keys[i])
        i = (i + 1) & l->mask;
    l->keys[i] = id + 1;
    l->slot[i] = k;
    return evicted;
}

/* ------------------------------------------------------------------------------------------ */
/* Trace */

static int load_trace(const char *path, size_t max, req **out, size_t *n, char *err, size_t errlen)
{
    bench_trace_rec *t;
    if (bench_trace_load(path, 0, max, &t, n, err, errlen) != 0)
        return -1;
    req *r = calloc(*n ? *n : 1, sizeof *r);
    if (!r) {
        bench_trace_free(t, *n);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < *n; i++) {
        r[i].arrival = t[i].arrival;
        r[i].in_len = t[i].in_len;
        r[i].out_len = t[i].out_len;
        r[i].n_ids = t[i].n_ids;
        r[i].ids = t[i].ids; /* moved */
    }
    free(t);
    *out = r;
    return 0;
}

/* Token ids of a request: block i of 512 tokens derives from hash id i alone. */
static void tokens_of(sim *S, const req *q)
{
    size_t n = q->in_len;
    if (n > S->tokcap) {
        S->tok = realloc(S->tok, n * sizeof *S->tok);
        S->tokcap = n;
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t id = q->ids[i / BLOCK < q->n_ids ? i / BLOCK : q->n_ids - 1];
        S->tok[i] = bench_trace_token(id, i % BLOCK, 100000);
    }
    size_t nk = q->n_ids;
    if (nk > S->keycap) {
        S->keys = realloc(S->keys, nk * sizeof *S->keys);
        S->keycap = nk;
    }
    for (size_t i = 0; i < nk; i++) {
        S->keys[i].lo = q->ids[i];
        S->keys[i].hi = 0x5707E;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Simulation */

static double prefill_time(const kvf_sched_cost *c, double n, double cached)
{
    if (cached > n)
        cached = n;
    return (n - cached) / c->prefill_tokens_per_s +
           c->prefill_attn_s_per_tok2 * (n * n - cached * cached) / 2.0;
}

/* An instance reports its outstanding prefill work two ways: raw prompt tokens (queued, plus the
 * running request's share still to do), which is what a serving engine reports and what
 * least_loaded and dynamo_cost use; and in expected seconds with cache hits counted, which only a
 * cache-aware scheduler knows (it placed the requests) and kvf_cost uses. */
static void report_load(sim *S, inst_state *I, double now)
{
    double left = I->running >= 0 && I->busy_until > now ? I->busy_until - now : 0;
    double raw_left = 0;
    if (I->running >= 0 && I->busy_until > now) {
        req *q = &S->r[I->running];
        double total = I->busy_until - q->start;
        raw_left = total > 0 ? q->in_len * left / total : 0;
    }
    kvf_instance_load L = {.queued_prefill_tokens = I->queued_raw_tok + raw_left,
                           .queued_prefill_s = I->queued_est_s + left,
                           .active_decodes = I->active_decodes,
                           .used_blocks = I->cache.used};
    kvf_sched_instance_load(S->s, I->idx, &L);
}

static void q_push(inst_state *I, int r)
{
    if (I->qt == I->qcap) {
        size_t live = I->qt - I->qh;
        if (I->qh > I->qcap / 2) {
            memmove(I->queue, I->queue + I->qh, live * sizeof *I->queue);
        } else {
            I->qcap = I->qcap ? I->qcap * 2 : 64;
            I->queue = realloc(I->queue, I->qcap * sizeof *I->queue);
            memmove(I->queue, I->queue + I->qh, live * sizeof *I->queue);
        }
        I->qh = 0;
        I->qt = live;
    }
    I->queue[I->qt++] = r;
}

/* Picks the next request of an instance's queue: FIFO, or k-LPM under kvf_cost. */
/* What a prefill of q on I would find cached: its own cache's prefix (*dev) or the store's,
 * whichever is longer, short of the whole prompt (its last token is always computed). */
static size_t cached_tokens(sim *S, inst_state *I, req *q, size_t *dev_out)
{
    tokens_of(S, q);
    size_t dev = kvf_sched_match(S->s, I->idx, S->tok, q->in_len);
    size_t sh = 0;
    while (sh < q->n_ids && (sh + 1) * BLOCK <= q->in_len && lru_find(&S->store, q->ids[sh]) >= 0)
        sh++;
    size_t cached = dev > sh * BLOCK ? dev : sh * BLOCK;
    if (cached >= q->in_len)
        cached = q->in_len - 1;
    if (dev_out)
        *dev_out = dev;
    return cached;
}

/* The waiting request an instance runs next: FIFO, except under kvf_cost, which orders the oldest
 * klpm_k by the scheduler's rule (kvf_sched_queue_pick) on what each would find cached. */
static int q_pick(sim *S, inst_state *I)
{
    if (I->qh == I->qt)
        return -1;
    size_t k = S->policy == KVF_POLICY_KVF_COST ? S->cost.klpm_k : 0;
    size_t best = I->qh;
    if (k > 1) {
        size_t n = I->qt - I->qh < k ? I->qt - I->qh : k;
        if (n > S->pick_cap) {
            S->pick_cap = n;
            S->pick_cached = realloc(S->pick_cached, n * sizeof *S->pick_cached);
            S->pick_work = realloc(S->pick_work, n * sizeof *S->pick_work);
        }
        for (size_t j = 0; j < n; j++) {
            req *q = &S->r[I->queue[I->qh + j]];
            size_t cached = cached_tokens(S, I, q, NULL);
            S->pick_cached[j] = cached;
            S->pick_work[j] = prefill_time(&S->cost, q->in_len, (double)cached);
        }
        best += kvf_sched_queue_pick(&S->cost, S->pick_cached, S->pick_work, n, I->picks++);
    }
    int r = I->queue[best];
    memmove(I->queue + best, I->queue + best + 1, (I->qt - best - 1) * sizeof *I->queue);
    I->qt--;
    return r;
}

static void start_next(sim *S, inst_state *I, double now)
{
    int r = q_pick(S, I);
    if (r < 0) {
        I->running = -1;
        return;
    }
    req *q = &S->r[r];
    size_t dev;
    size_t cached = cached_tokens(S, I, q, &dev);
    double pf = prefill_time(&S->cost, q->in_len, (double)cached);
    double ld = cached > dev
                    ? (double)(cached - dev) * S->cost.kv_bytes_per_token / S->cost.load_bytes_per_s
                    : 0;
    double service = pf > ld ? pf : ld; /* the load overlaps the prefill layer by layer */
    q->start = now;
    q->dev_hit = dev < cached ? dev : cached;
    q->store_hit = cached > dev ? cached - dev : 0;
    I->running = r;
    I->busy_until = now + service;
    I->queued_est_s -= q->est_s;
    I->queued_raw_tok -= q->in_len;
}

/* A prefill finished: the instance caches the blocks (publishing events), the store saves the
 * chunks, and decode starts. */
static void finish(sim *S, inst_state *I, double now)
{
    req *q = &S->r[I->running];
    q->ttft = now - q->arr_s;
    q->done = 1;
    size_t full = q->in_len / BLOCK;
    if (full > q->n_ids)
        full = q->n_ids;
    if (full) {
        tokens_of(S, q);
        /* The blocks take their room first and are published after the removals that made it, as
         * an engine's events come: a block of this prompt that the room evicted (the cache held
         * it but not the block before it) is stored again, not left removed in the index. */
        for (size_t b = 0; b < full; b++) {
            uint64_t ev = lru_touch(&I->cache, q->ids[b]);
            if (ev != UINT64_MAX)
                kvf_sched_block_removed(S->s, I->idx, &ev, 1);
            lru_touch(&S->store, q->ids[b]);
        }
        kvf_sched_block_stored(S->s, I->idx, q->ids, full, 0, 0, S->tok, full * BLOCK, BLOCK,
                               KVF_TIER_DEVICE);
    }
    /* Decode: per-token time grows with the sequences decoding on this instance. */
    size_t live = 0;
    for (size_t i = 0; i < I->n_dec; i++)
        if (I->decode_ends[i] > now)
            I->decode_ends[live++] = I->decode_ends[i];
    I->n_dec = live;
    q->tpot = S->cost.tpot_base_s + S->cost.tpot_per_seq_s * (double)I->n_dec;
    if (I->n_dec == I->cap_dec) {
        I->cap_dec = I->cap_dec ? I->cap_dec * 2 : 64;
        I->decode_ends = realloc(I->decode_ends, I->cap_dec * sizeof *I->decode_ends);
    }
    I->decode_ends[I->n_dec++] = now + q->tpot * q->out_len;
    I->active_decodes = (uint32_t)I->n_dec;
    start_next(S, I, now);
    report_load(S, I, now);
}

typedef struct result {
    kvf_policy policy;
    double scale;
    double ttft_p50, ttft_p90, ttft_p99, tpot_mean, slo_attain, throughput;
    double dev_hit_rate, store_hit_rate;
    size_t rejected, completed;
    double wall_s;
} result;

/* One replay's inputs, shared by every policy and time scale it runs at. The requests' result
 * fields are rewritten by each run. */
typedef struct replay {
    req *r;
    size_t n;
    int ninst;
    kvf_sched_cost cost;
    double slo;
    uint32_t dev_blocks, store_blocks;
} replay;

/* A fresh simulated cluster for rp under policy pol: a scheduler with rp->ninst instances, their
 * device caches and the store, all empty, and every request not yet seen. Returns 0, or -1 where
 * the scheduler cannot be made. */
static int sim_open(sim *S, replay *rp, kvf_policy pol)
{
    memset(S, 0, sizeof *S);
    S->policy = pol;
    S->cost = rp->cost;
    S->r = rp->r;
    S->n = rp->n;
    S->ni = rp->ninst;
    S->slo = rp->slo;
    kvf_sched_opts so = {.policy = pol,
                         .cost = rp->cost,
                         .store_chunk_tokens = BLOCK,
                         .expected_blocks = (size_t)rp->dev_blocks * (size_t)rp->ninst / 2 + 1024};
    if (kvf_sched_new(&S->s, &so) != 0)
        return -1;
    S->in = calloc((size_t)rp->ninst, sizeof *S->in);
    if (!S->in) {
        kvf_sched_destroy(&S->s);
        return -1;
    }
    lru_init(&S->store, rp->store_blocks);
    for (int i = 0; i < rp->ninst; i++) {
        kvf_instance_info info;
        memset(&info, 0, sizeof info);
        snprintf(info.id, sizeof info.id, "sim-%d", i);
        info.role = KVF_ROLE_BOTH;
        info.block_tokens = BLOCK;
        info.capacity_blocks = rp->dev_blocks;
        kvf_sched_instance_add(S->s, &info, &S->in[i].idx);
        lru_init(&S->in[i].cache, rp->dev_blocks);
        S->in[i].running = -1;
    }
    for (size_t i = 0; i < rp->n; i++) {
        rp->r[i].done = rp->r[i].rejected = 0;
        rp->r[i].ttft = 0;
    }
    return 0;
}

static void sim_close(sim *S)
{
    for (int i = 0; i < S->ni; i++) {
        lru_free(&S->in[i].cache);
        free(S->in[i].queue);
        free(S->in[i].decode_ends);
    }
    free(S->in);
    free(S->pick_cached);
    free(S->pick_work);
    lru_free(&S->store);
    free(S->tok);
    free(S->keys);
    kvf_sched_destroy(&S->s);
}

/* Request ri arrives at now: the scheduler places it, or rejects it, and it joins the prefill
 * queue of the instance it was placed on. */
static void arrive(sim *S, size_t ri, double now)
{
    req *q = &S->r[ri];
    q->arr_s = now;
    tokens_of(S, q);
    size_t nk = q->in_len / BLOCK < q->n_ids ? q->in_len / BLOCK : q->n_ids;
    kvf_place_req pr = {.tokens = S->tok,
                        .n_tokens = q->in_len,
                        .chunk_keys = S->keys,
                        .n_chunks = nk,
                        .output_tokens = q->out_len,
                        .slo_ttft_s = S->slo};
    kvf_place_res res;
    if (kvf_sched_place(S->s, &pr, &res) != 0 || res.rejected) {
        q->rejected = 1;
        return;
    }
    inst_state *I = &S->in[res.prefill];
    q->inst = res.prefill;
    q_push(I, (int)ri);
    q->est_s = res.prefill_s;
    I->queued_est_s += q->est_s;
    I->queued_raw_tok += q->in_len;
    if (I->running < 0)
        start_next(S, I, now);
    report_load(S, I, now);
}

/* The instance whose running prefill ends first, with that time in *t; -1 when none runs. */
static int first_to_finish(const sim *S, double *t)
{
    int fi = -1;
    *t = INFINITY;
    for (int i = 0; i < S->ni; i++)
        if (S->in[i].running >= 0 && S->in[i].busy_until < *t) {
            *t = S->in[i].busy_until;
            fi = i;
        }
    return fi;
}

/* The event loop, with arrivals scale times faster than the trace's: the next event is either
 * the next arrival or the earliest prefill end, until neither is left. */
static void simulate(sim *S, double scale)
{
    size_t next = 0;
    for (;;) {
        double ta = next < S->n ? S->r[next].arrival / scale : INFINITY;
        double tf;
        int fi = first_to_finish(S, &tf);
        if (ta == INFINITY && fi < 0)
            break;
        if (fi >= 0 && tf <= ta) {
            finish(S, &S->in[fi], tf);
            continue;
        }
        arrive(S, next++, ta);
    }
}

/* The figures of a finished simulation into out (all but wall_s). */
static void collect(const sim *S, kvf_policy pol, double scale, result *out)
{
    const req *reqs = S->r;
    size_t n = S->n;
    double *tt = malloc(n * sizeof *tt);
    size_t k = 0, ok = 0;
    double tpot = 0, dev_tok = 0, st_tok = 0, in_tok = 0, last = 0;
    for (size_t i = 0; i < n; i++) {
        const req *q = &reqs[i];
        in_tok += q->in_len;
        if (q->rejected || !q->done)
            continue;
        double arr = q->arr_s, t = q->ttft;
        tt[k++] = t;
        ok += S->slo <= 0 || t <= S->slo;
        tpot += q->tpot;
        dev_tok += (double)q->dev_hit;
        st_tok += (double)q->store_hit;
        if (arr + t > last)
            last = arr + t;
    }
    memset(out, 0, sizeof *out);
    out->policy = pol;
    out->scale = scale;
    out->completed = k;
    for (size_t i = 0; i < n; i++)
        out->rejected += reqs[i].rejected;
    out->ttft_p50 = bench_quantile(tt, k, 0.5);
    out->ttft_p90 = bench_quantile(tt, k, 0.9);
    out->ttft_p99 = bench_quantile(tt, k, 0.99);
    out->tpot_mean = k ? tpot / (double)k : 0;
    out->slo_attain = n ? (double)ok / (double)n : 0;
    out->throughput = last > 0 ? (double)k / last : 0;
    out->dev_hit_rate = in_tok > 0 ? dev_tok / in_tok : 0;
    out->store_hit_rate = in_tok > 0 ? st_tok / in_tok : 0;
    free(tt);
}

/* Replays rp under policy pol with arrivals scale times faster than the trace's, into out.
 * Returns 0, or -1 (out untouched) where the scheduler cannot be made. */
static int run(replay *rp, kvf_policy pol, double scale, result *out)
{
    double t0 = bench_now();
    sim S;
    if (sim_open(&S, rp, pol) != 0)
        return -1;
    simulate(&S, scale);
    collect(&S, pol, scale, out);
    sim_close(&S);
    out->wall_s = bench_now() - t0;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Decision latency: place() with 1M indexed blocks over 256 instances. */

static int decision_latency(json_t *res, int quick)
{
    kvf_sched_opts so = {.policy = KVF_POLICY_KVF_COST, .expected_blocks = 1u << 21};
    kvf_sched_cost_defaults(&so.cost);
    kvf_sched *s;
    if (kvf_sched_new(&s, &so) != 0)
        return -1;
    const int ninst = 256, bt = 16;
    for (int i = 0; i < ninst; i++) {
        kvf_instance_info info;
        memset(&info, 0, sizeof info);
        snprintf(info.id, sizeof info.id, "inst-%d", i);
        info.role = KVF_ROLE_BOTH;
        info.block_tokens = bt;
        info.capacity_blocks = 100000;
        kvf_sched_instance_add(s, &info, NULL);
    }
    /* 1M blocks: 2,000 prefixes of 512 blocks (8K tokens), each held by 1-4 instances, whole or
     * in part. */
    const int prefixes = 2000, blocks = 512;
    uint32_t *t = malloc((size_t)blocks * bt * sizeof *t);
    uint64_t *h = malloc((size_t)blocks * sizeof *h);
    uint64_t rng = 7;
    size_t total = 0;
    for (int p = 0; p < prefixes; p++) {
        for (int i = 0; i < blocks * bt; i++)
            t[i] = (uint32_t)(p * 7919 + i * 31) % 50000;
        int holders = 1 + (int)(p % 4);
        for (int k = 0; k < holders; k++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            int inst = (int)((rng >> 33) % ninst);
            int nb = blocks / (k + 1);
            for (int i = 0; i < nb; i++)
                h[i] = ((uint64_t)p << 20) ^ ((uint64_t)inst << 40) ^ (uint64_t)i;
            kvf_sched_block_stored(s, inst, h, (size_t)nb, 0, 0, t, (size_t)nb * bt, bt,
                                   KVF_TIER_DEVICE);
        }
        total += blocks;
    }
    kvf_index_stats st;
    kvf_sched_index_stats(s, &st);
    int iters = quick ? 2000 : 10000;
    double *lat = malloc((size_t)iters * sizeof *lat);
    for (int it = 0; it < iters; it++) {
        int p = (int)((uint64_t)it * 2654435761u % prefixes);
        for (int i = 0; i < blocks * bt; i++)
            t[i] = (uint32_t)(p * 7919 + i * 31) % 50000;
        kvf_instance_load L = {.queued_prefill_tokens = (double)(it % 5000)};
        kvf_sched_instance_load(s, it % ninst, &L);
        kvf_place_req rq = {.tokens = t, .n_tokens = (size_t)blocks * bt, .output_tokens = 256};
        kvf_place_res rs;
        double t0 = bench_now();
        kvf_sched_place(s, &rq, &rs);
        lat[it] = (bench_now() - t0) * 1e6;
    }
    double p50 = bench_quantile(lat, (size_t)iters, 0.5),
           p99 = bench_quantile(lat, (size_t)iters, 0.99);
    printf("kvf-bench sched --decision-latency: real (place() on this machine)\n");
    printf("  index: %" PRIu64 " blocks, %" PRIu64 " holdings, %d instances, %.0f MiB\n", st.blocks,
           st.holdings, ninst, (double)st.bytes / 1048576.0);
    printf("  place() of an 8192-token request: p50 %.1f us, p99 %.1f us (%d calls)\n", p50, p99,
           iters);
    json_object_set_new(res, "decision_label", json_string("real"));
    json_object_set_new(res, "index_blocks", json_integer((json_int_t)st.blocks));
    json_object_set_new(res, "index_instances", json_integer(ninst));
    json_object_set_new(res, "place_p50_us", json_real(p50));
    json_object_set_new(res, "place_p99_us", json_real(p99));
    free(lat);
    free(t);
    free(h);
    kvf_sched_destroy(&s);
    (void)total;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Options and reporting */

typedef struct opts {
    const char *trace, *cost_file, *policies;
    int instances, json, find_rate, decision_latency, quick;
    double time_scale, slo;
    long max_requests, device_blocks, store_blocks;
} opts;

/* Reads the options into o. Returns 0, or -1 with the usage on stderr. */
static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){.policies = "round_robin,least_loaded,longest_prefix,dynamo_cost,kvf_cost",
                .instances = 16,
                .time_scale = 1.0,
                .slo = 10.0,
                .device_blocks = 1800,
                .store_blocks = 400000};
    const bench_opt table[] = {
        {"--json", BENCH_OPT_FLAG, .flag = &o->json},
        {"--quick", BENCH_OPT_FLAG, .flag = &o->quick},
        {"--find-rate", BENCH_OPT_FLAG, .flag = &o->find_rate},
        {"--decision-latency", BENCH_OPT_FLAG, .flag = &o->decision_latency},
        {"--trace", BENCH_OPT_STR, .str = &o->trace},
        {"--instances", BENCH_OPT_INT, .i = &o->instances},
        {"--policy", BENCH_OPT_STR, .str = &o->policies},
        {"--time-scale", BENCH_OPT_REAL, .d = &o->time_scale},
        {"--slo-ttft", BENCH_OPT_REAL, .d = &o->slo},
        {"--cost", BENCH_OPT_STR, .str = &o->cost_file},
        {"--max-requests", BENCH_OPT_LONG, .l = &o->max_requests},
        {"--device-blocks", BENCH_OPT_LONG, .l = &o->device_blocks},
        {"--store-blocks", BENCH_OPT_LONG, .l = &o->store_blocks},
    };
    const char *unknown;
    if (bench_opts_parse("sched", table, sizeof table / sizeof table[0], argc, argv, &unknown) !=
        0) {
        fprintf(stderr,
                "usage: kvf-bench sched --trace FILE [--instances N] [--policy P[,P...]]\n"
                "       [--time-scale X | --find-rate] [--slo-ttft S] [--cost FILE]\n"
                "       [--device-blocks B] [--store-blocks B] [--max-requests M] [--json]\n"
                "       kvf-bench sched --decision-latency [--quick] [--json]\n");
        return -1;
    }
    return 0;
}

/* The policies named in list (comma-separated) into pols, *np of them. Returns 0, or -1 with the
 * name not known on stderr. */
static int parse_policies(const char *list, kvf_policy pols[KVF_POLICY_COUNT_], int *np)
{
    int rc = 0;
    *np = 0;
    char *dup = strdup(list);
    for (char *sv = NULL, *t = strtok_r(dup, ",", &sv); t; t = strtok_r(NULL, ",", &sv)) {
        if (*np == KVF_POLICY_COUNT_ || kvf_policy_parse(t, &pols[*np]) != 0) {
            fprintf(stderr, "kvf-bench sched: unknown policy \"%s\"\n", t);
            rc = -1;
            break;
        }
        (*np)++;
    }
    free(dup);
    return rc;
}

/* The replay's inputs from o: the cost model (--cost, else the defaults) and the trace. Returns
 * 0, or -1 with the reason on stderr. Caller frees the requests with replay_free(). */
static int replay_load(const opts *o, replay *rp)
{
    *rp = (replay){.ninst = o->instances,
                   .slo = o->slo,
                   .dev_blocks = (uint32_t)o->device_blocks,
                   .store_blocks = (uint32_t)o->store_blocks};
    kvf_sched_cost_defaults(&rp->cost);
    char err[256];
    if (o->cost_file && kvf_sched_cost_load(o->cost_file, &rp->cost, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench sched: %s\n", err);
        return -1;
    }
    if (load_trace(o->trace, (size_t)o->max_requests, &rp->r, &rp->n, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench sched: %s\n", err);
        return -1;
    }
    return 0;
}

static void replay_free(replay *rp)
{
    for (size_t i = 0; i < rp->n; i++)
        free(rp->r[i].ids);
    free(rp->r);
}

/* The time scale at which round robin attains 50% of the SLO: bisection on the scale (arrivals
 * come scale times faster). 0 with *scale, or -1 when a replay could not run. */
static int find_rate(replay *rp, double *scale)
{
    double lo = 0.05, hi = 64;
    result r;
    for (int it = 0; it < 14; it++) {
        double mid = sqrt(lo * hi);
        if (run(rp, KVF_POLICY_ROUND_ROBIN, mid, &r) != 0)
            return -1;
        bench_progress("sched", "round_robin at %.3fx the trace rate: %.1f%% within SLO", mid,
                       r.slo_attain * 100);
        if (r.slo_attain > 0.5)
            lo = mid;
        else
            hi = mid;
        if (hi / lo < 1.03)
            break;
    }
    *scale = sqrt(lo * hi);
    return 0;
}

static void print_result(const result *r)
{
    printf("  %-15s %7.2f %8.2f %8.2f %8.2f %8.1f %6.1f%% %6.1f%% %7.1f%% %7.2f %6zu\n",
           kvf_policy_name(r->policy), r->scale, r->ttft_p50, r->ttft_p90, r->ttft_p99,
           r->tpot_mean * 1e3, r->dev_hit_rate * 100, r->store_hit_rate * 100, r->slo_attain * 100,
           r->throughput, r->rejected);
}

static json_t *result_json(const result *r)
{
    return json_pack("{s:s,s:s,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:I,s:I}", "policy",
                     kvf_policy_name(r->policy), "label", "simulated", "time_scale", r->scale,
                     "ttft_p50_s", r->ttft_p50, "ttft_p90_s", r->ttft_p90, "ttft_p99_s",
                     r->ttft_p99, "tpot_ms", r->tpot_mean * 1e3, "device_hit_rate", r->dev_hit_rate,
                     "store_hit_rate", r->store_hit_rate, "slo_attainment", r->slo_attain,
                     "throughput_rps", r->throughput, "rejected", (json_int_t)r->rejected,
                     "completed", (json_int_t)r->completed);
}

/* kvf_cost against round robin and least loaded, where they ran: whether it has the best SLO
 * attainment and how much lower its p90 TTFT is, printed and into res. */
static void compare_kvf_cost(json_t *res, const kvf_policy *pols, const result *rs, int np)
{
    int irr = -1, ill = -1, ikv = -1;
    for (int p = 0; p < np; p++) {
        if (pols[p] == KVF_POLICY_ROUND_ROBIN)
            irr = p;
        if (pols[p] == KVF_POLICY_LEAST_LOADED)
            ill = p;
        if (pols[p] == KVF_POLICY_KVF_COST)
            ikv = p;
    }
    if (ikv < 0)
        return;
    int best = 1;
    for (int p = 0; p < np; p++)
        best &= rs[p].slo_attain <= rs[ikv].slo_attain;
    json_object_set_new(res, "kvf_cost_best_slo", json_boolean(best));
    if (irr >= 0)
        bench_json_real(res, "p90_rr_over_kvf", rs[irr].ttft_p90 / rs[ikv].ttft_p90);
    if (ill >= 0)
        bench_json_real(res, "p90_ll_over_kvf", rs[ill].ttft_p90 / rs[ikv].ttft_p90);
    printf("  kvf_cost: best SLO attainment: %s", best ? "yes" : "no");
    if (irr >= 0)
        printf("; p90 TTFT %.2fx lower than round_robin", rs[irr].ttft_p90 / rs[ikv].ttft_p90);
    if (ill >= 0)
        printf(", %.2fx lower than least_loaded", rs[ill].ttft_p90 / rs[ikv].ttft_p90);
    printf("\n");
}

/* Replays rp under each of the np policies at one time scale, with the table printed and the
 * figures in res. 0, or -1 when a replay could not run. */
static int replay_policies(const opts *o, replay *rp, const kvf_policy *pols, int np, double scale,
                           json_t *res)
{
    printf("kvf-bench sched: SIMULATED replay of %s through the real index and policies\n",
           o->trace);
    printf("  %zu requests, %d instances, time scale %.3f, SLO TTFT %.1f s, device cache %u "
           "blocks, store %u blocks\n",
           rp->n, rp->ninst, scale, rp->slo, rp->dev_blocks, rp->store_blocks);
    printf("  %-15s %7s %8s %8s %8s %8s %7s %7s %8s %7s %6s\n", "policy", "scale", "ttft p50",
           "p90", "p99", "tpot ms", "dev hit", "store", "in SLO", "req/s", "reject");
    json_t *arr = json_array();
    result rs[KVF_POLICY_COUNT_];
    for (int p = 0; p < np; p++) {
        if (run(rp, pols[p], scale, &rs[p]) != 0) {
            json_decref(arr);
            return -1;
        }
        print_result(&rs[p]);
        json_array_append_new(arr, result_json(&rs[p]));
    }
    json_object_set_new(res, "label", json_string("simulated"));
    json_object_set_new(res, "trace", json_string(o->trace));
    json_object_set_new(res, "requests", json_integer((json_int_t)rp->n));
    json_object_set_new(res, "instances", json_integer(rp->ninst));
    bench_json_real(res, "time_scale", scale);
    bench_json_real(res, "slo_ttft_s", rp->slo);
    json_object_set_new(res, "policies", arr);
    compare_kvf_cost(res, pols, rs, np);
    return 0;
}

int bench_sched_main(int argc, char **argv)
{
    opts o;
    if (parse(argc, argv, &o) != 0)
        return 2;
    int rc = 2;
    json_t *res = bench_result_new("sched");
    if (o.decision_latency) {
        rc = decision_latency(res, o.quick) ? 1 : 0;
        bench_emit(res, o.json);
        goto out_decref_res;
    }
    if (!o.trace || o.instances < 1 || o.instances > KVF_SCHED_MAX_INSTANCES || o.time_scale <= 0) {
        fprintf(stderr, "kvf-bench sched: --trace FILE is required; --instances 1..%d\n",
                KVF_SCHED_MAX_INSTANCES);
        goto out_decref_res;
    }
    replay rp;
    if (replay_load(&o, &rp) != 0)
        goto out_decref_res;
    kvf_policy pols[KVF_POLICY_COUNT_];
    int np;
    if (parse_policies(o.policies, pols, &np) != 0)
        goto out_free_replay;
    bench_progress("sched", "%zu requests, %d instances, SLO TTFT %.1f s (simulated)", rp.n,
                   rp.ninst, rp.slo);
    double scale = o.time_scale;
    if ((o.find_rate && find_rate(&rp, &scale) != 0) ||
        replay_policies(&o, &rp, pols, np, scale, res) != 0) {
        fprintf(stderr, "kvf-bench sched: the simulation could not start: out of memory\n");
        rc = 1;
        goto out_free_replay;
    }
    bench_emit(res, o.json);
    rc = 0;
out_free_replay:
    replay_free(&rp);
out_decref_res:
    json_decref(res);
    return rc;
}
