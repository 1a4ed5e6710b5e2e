/*
 * kvf-bench sched's simulated cluster: a discrete-event simulation that drives the real prefix
 * index and placement policies (docs/scheduler.md, "Trace replay"). Every figure it gives is
 * simulated.
 *
 * N instances, each with a waiting queue served one prefill at a time in the order of a queue
 * discipline (kvf_sched_queue_pick_by, whatever the placement policy) and a KV cache of
 * dev_blocks 512-token blocks (LRU), publishing stored and removed blocks to the index as an
 * engine's KV events would, and reporting its load as kvf-engine --serve does; and a shared
 * kvfabric store of store_blocks blocks (LRU) that every prefill saves to and loads from,
 * publishing its chunk events as kvf-store does. Prefill time follows the cost model (linear and
 * quadratic terms over the uncached tokens); a store load overlaps the prefill layer by layer, so
 * it costs max(prefill, load); decode runs where the prefill ran, its time per token growing with
 * the instance's active decodes. Each trace
 * hash id becomes 512 deterministic token ids, so shared ids mean shared prefixes, and the index
 * hashes the tokens itself as it would an engine's.
 *
 * Nothing in it reads a clock or a random source: a run's figures are a function of its inputs.
 */
#include "sched_sim.h"

#include "bench_util.h"
#include "trace.h"

#include "kvf/kvf.h"
#include "scheduler.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK BENCH_TRACE_BLOCK

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
    int *queue; /* waiting requests, oldest first: queue[qh..qt) */
    size_t qh, qt, qcap;
    uint64_t picks;
    double busy_until;
    int running;           /* request index or -1 */
    double queued_raw_tok; /* the waiting requests' prompt tokens */
    uint32_t active_decodes;
    double *decode_ends; /* end times of its decodes; a handful, so an array */
    size_t n_dec, cap_dec;
} inst_state;

/* The queue discipline's view of an instance's oldest waiting requests (q_pick's scratch). */
typedef struct pick_scratch {
    size_t *tokens, *cached;
    double *work, *waited;
    size_t cap;
} pick_scratch;

typedef struct sim {
    kvf_sched *s;
    kvf_sched_cost cost;
    kvf_queue queue;
    sched_req *r;
    size_t n;
    inst_state *in;
    int ni;
    lru store;
    uint32_t *tok; /* the prompt being placed or published, tokcap of room */
    size_t tokcap;
    kvf_key *keys;
    size_t keycap;
    double slo;
    pick_scratch pk;
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

/* Touches id (inserting it); returns the id evicted to make room, or UINT64_MAX. A set of no
 * room holds nothing. */
static uint64_t lru_touch(lru *l, uint64_t id)
{
    if (l->cap == 0)
        return UINT64_MAX;
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
/* The trace */

int sched_replays_load(const char *path, size_t max, size_t windows, const sched_replay *tmpl,
                       sched_replay **rps, sched_req **reqs, char *err, size_t errlen)
{
    bench_trace_rec *t;
    size_t n;
    if (bench_trace_load(path, 0, max, &t, &n, err, errlen) != 0)
        return -1;
    if (windows < 1 || windows > n) {
        snprintf(err, errlen, "%s: %zu requests cannot make %zu windows", path, n, windows);
        bench_trace_free(t, n);
        return -1;
    }
    sched_req *r = calloc(n, sizeof *r);
    sched_replay *w = calloc(windows, sizeof *w);
    if (!r || !w) {
        snprintf(err, errlen, "out of memory");
        bench_trace_free(t, n);
        free(r);
        free(w);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        r[i].arrival = t[i].arrival;
        r[i].in_len = t[i].in_len;
        r[i].out_len = t[i].out_len;
        r[i].n_ids = t[i].n_ids;
        r[i].ids = t[i].ids; /* moved */
    }
    free(t);
    for (size_t k = 0; k < windows; k++) {
        size_t from = n * k / windows, to = n * (k + 1) / windows;
        w[k] = *tmpl;
        w[k].r = r + from;
        w[k].n = to - from;
        double t0 = r[from].arrival;
        for (size_t i = from; i < to; i++)
            r[i].arrival -= t0;
    }
    *rps = w;
    *reqs = r;
    return 0;
}

void sched_replays_free(sched_replay *rps, sched_req *reqs, size_t n_reqs)
{
    for (size_t i = 0; i < n_reqs; i++)
        free(reqs[i].ids);
    free(reqs);
    free(rps);
}

double sched_replay_rps(const sched_replay *rp)
{
    double lo = INFINITY, hi = -INFINITY;
    for (size_t i = 0; i < rp->n; i++) {
        lo = rp->r[i].arrival < lo ? rp->r[i].arrival : lo;
        hi = rp->r[i].arrival > hi ? rp->r[i].arrival : hi;
    }
    return rp->n > 1 && hi > lo ? (double)rp->n / (hi - lo) : 0;
}

static double prefill_time(const kvf_sched_cost *c, double n, double cached);

double sched_replay_work_floor(const sched_replay *rp, double scale)
{
    size_t ids = 0;
    for (size_t i = 0; i < rp->n; i++)
        ids += rp->r[i].n_ids;
    lru seen;
    memset(&seen, 0, sizeof seen);
    if (ids >= UINT32_MAX || lru_init(&seen, (uint32_t)ids + 1) != 0) {
        lru_free(&seen);
        return -1;
    }
    /* in arrival order (the trace's); the prefix of blocks some earlier request computed */
    double work = 0;
    for (size_t i = 0; i < rp->n; i++) {
        const sched_req *q = &rp->r[i];
        size_t b = 0;
        while (b < q->n_ids && (b + 1) * BLOCK <= q->in_len && lru_find(&seen, q->ids[b]) >= 0)
            b++;
        double cached = (double)(b * BLOCK < q->in_len ? b * BLOCK : q->in_len - 1);
        work += prefill_time(&rp->cost, q->in_len, cached);
        for (size_t k = 0; k < q->n_ids; k++)
            lru_touch(&seen, q->ids[k]);
    }
    lru_free(&seen);
    double rps = sched_replay_rps(rp), span = rps > 0 ? (double)rp->n / rps / scale : 0;
    return span > 0 && rp->ninst > 0 ? work / ((double)rp->ninst * span) : 0;
}

/* The store's chunk key of a trace block: what a prompt's place() request names (tokens_of). */
static kvf_key chunk_key(uint64_t id)
{
    return (kvf_key){.lo = id, .hi = 0x5707E};
}

/* Token ids and chunk keys of a request into S->tok and S->keys: block i of 512 tokens derives
 * from hash id i alone. Returns 0, or -1 out of memory. */
static int tokens_of(sim *S, const sched_req *q)
{
    size_t n = q->in_len, nk = q->n_ids;
    if (n > S->tokcap) {
        uint32_t *t = realloc(S->tok, n * sizeof *t);
        if (!t)
            return -1;
        S->tok = t;
        S->tokcap = n;
    }
    if (nk > S->keycap) {
        kvf_key *k = realloc(S->keys, nk * sizeof *k);
        if (!k)
            return -1;
        S->keys = k;
        S->keycap = nk;
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t id = q->ids[i / BLOCK < q->n_ids ? i / BLOCK : q->n_ids - 1];
        S->tok[i] = bench_trace_token(id, i % BLOCK, 100000);
    }
    for (size_t i = 0; i < nk; i++)
        S->keys[i] = chunk_key(q->ids[i]);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* An instance's work */

static double prefill_time(const kvf_sched_cost *c, double n, double cached)
{
    if (cached > n)
        cached = n;
    return (n - cached) / c->prefill_tokens_per_s +
           c->prefill_attn_s_per_tok2 * (n * n - cached * cached) / 2.0;
}

/* An instance reports what a serving engine reports to kvf-sched (kvf-engine --serve's load
 * report, POST /v1/instances/ID/load): its queued prompt tokens (the waiting requests', plus the
 * running request's share still to do), its active decodes and its used blocks. The scheduler's
 * cost model turns the tokens into seconds itself. kvf_instance_load's cache-aware seconds are
 * left out, as an engine that reports tokens only (vLLM) gives them: kvf-engine reports them
 * (queued_prefill_s), and with them reported as it does (each request priced on arrival, its
 * decode counted from arrival) the replay's rows moved by a few hundredths (docs/scheduler.md,
 * "The lower bound"). */
static void report_load(sim *S, inst_state *I, double now)
{
    double raw_left = 0;
    if (I->running >= 0 && I->busy_until > now) {
        sched_req *q = &S->r[I->running];
        double total = I->busy_until - q->start;
        raw_left = total > 0 ? q->in_len * (I->busy_until - now) / total : 0;
    }
    kvf_instance_load L = {.queued_prefill_tokens = I->queued_raw_tok + raw_left,
                           .active_decodes = I->active_decodes,
                           .used_blocks = I->cache.used};
    kvf_sched_instance_load(S->s, I->idx, &L);
}

/* Returns 0, or -1 out of memory. */
static int q_push(inst_state *I, int r)
{
    if (I->qt == I->qcap) {
        size_t live = I->qt - I->qh;
        if (I->qh > I->qcap / 2) {
            memmove(I->queue, I->queue + I->qh, live * sizeof *I->queue);
        } else {
            size_t cap = I->qcap ? I->qcap * 2 : 64;
            int *q = realloc(I->queue, cap * sizeof *q);
            if (!q)
                return -1;
            I->queue = q;
            I->qcap = cap;
            memmove(I->queue, I->queue + I->qh, live * sizeof *I->queue);
        }
        I->qh = 0;
        I->qt = live;
    }
    I->queue[I->qt++] = r;
    return 0;
}

/* What a prefill of q on I would find cached, as the instance itself knows it: its own cache's
 * prefix (*dev_out) or the store's, whichever is longer, short of the whole prompt (its last
 * token is always computed). The instance's cache is what it published to the index, so the
 * index's match would give the same prefix. */
static size_t cached_tokens(const sim *S, const inst_state *I, const sched_req *q, size_t *dev_out)
{
    size_t dev = 0, sh = 0;
    while (dev < q->n_ids && (dev + 1) * BLOCK <= q->in_len &&
           lru_find(&I->cache, q->ids[dev]) >= 0)
        dev++;
    while (sh < q->n_ids && (sh + 1) * BLOCK <= q->in_len && lru_find(&S->store, q->ids[sh]) >= 0)
        sh++;
    size_t cached = dev > sh ? dev * BLOCK : sh * BLOCK;
    if (cached >= q->in_len)
        cached = q->in_len - 1;
    if (dev_out)
        *dev_out = dev * BLOCK;
    return cached;
}

/* Room for n entries in each array of the pick's scratch. Returns 0, or -1 out of memory. */
static int scratch_reserve(pick_scratch *p, size_t n)
{
    if (n <= p->cap)
        return 0;
    size_t *t = realloc(p->tokens, n * sizeof *t);
    if (t)
        p->tokens = t;
    size_t *c = realloc(p->cached, n * sizeof *c);
    if (c)
        p->cached = c;
    double *w = realloc(p->work, n * sizeof *w);
    if (w)
        p->work = w;
    double *a = realloc(p->waited, n * sizeof *a);
    if (a)
        p->waited = a;
    if (!t || !c || !w || !a)
        return -1;
    p->cap = n;
    return 0;
}

/* The waiting request I runs next at now, taken off its queue, by the simulation's queue
 * discipline over the oldest klpm_k; -1 when none waits. Out of memory for the discipline's view,
 * the oldest. */
static int q_pick(sim *S, inst_state *I, double now)
{
    size_t waiting = I->qt - I->qh;
    if (!waiting)
        return -1;
    uint32_t k = S->cost.klpm_k;
    unsigned reads = kvf_queue_reads(S->queue);
    kvf_queue_view v = {.n = waiting < k ? waiting : k};
    if (v.n > 1 && reads && scratch_reserve(&S->pk, v.n) == 0) {
        for (size_t j = 0; j < v.n; j++) {
            const sched_req *q = &S->r[I->queue[I->qh + j]];
            S->pk.tokens[j] = q->in_len;
            S->pk.waited[j] = now - q->arr_s;
            if (reads & (KVF_QUEUE_READS_CACHED | KVF_QUEUE_READS_WORK)) {
                S->pk.cached[j] = cached_tokens(S, I, q, NULL);
                S->pk.work[j] = prefill_time(&S->cost, q->in_len, (double)S->pk.cached[j]);
            }
        }
        v.tokens = S->pk.tokens;
        v.cached = S->pk.cached;
        v.work_s = S->pk.work;
        v.waited_s = S->pk.waited;
    } else {
        v.n = 1;
    }
    size_t best = I->qh + kvf_sched_queue_pick_by(S->queue, k, &v, I->picks++);
    int r = I->queue[best];
    memmove(I->queue + best, I->queue + best + 1, (I->qt - best - 1) * sizeof *I->queue);
    I->qt--;
    return r;
}

static void start_next(sim *S, inst_state *I, double now)
{
    int r = q_pick(S, I, now);
    if (r < 0) {
        I->running = -1;
        return;
    }
    sched_req *q = &S->r[r];
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
    I->queued_raw_tok -= q->in_len;
}

/* The decode of q starts on I at now: its time per token grows with the sequences decoding there.
 * Returns 0, or -1 out of memory. */
static int start_decode(sim *S, inst_state *I, sched_req *q, double now)
{
    size_t live = 0;
    for (size_t i = 0; i < I->n_dec; i++)
        if (I->decode_ends[i] > now)
            I->decode_ends[live++] = I->decode_ends[i];
    I->n_dec = live;
    q->tpot = S->cost.tpot_base_s + S->cost.tpot_per_seq_s * (double)I->n_dec;
    if (I->n_dec == I->cap_dec) {
        size_t cap = I->cap_dec ? I->cap_dec * 2 : 64;
        double *d = realloc(I->decode_ends, cap * sizeof *d);
        if (!d)
            return -1;
        I->decode_ends = d;
        I->cap_dec = cap;
    }
    I->decode_ends[I->n_dec++] = now + q->tpot * q->out_len;
    I->active_decodes = (uint32_t)I->n_dec;
    return 0;
}

/* The store saves a block: it publishes what it evicts to make room and the block itself when it
 * is new, as kvf-store's chunk events tell kvf-sched, so that the cost model sees what the store
 * holds. A store of no blocks (--store-blocks 0) admits nothing and publishes nothing. */
static void save_chunk(sim *S, uint64_t id)
{
    int held = lru_find(&S->store, id) >= 0;
    uint64_t ev = lru_touch(&S->store, id);
    if (ev != UINT64_MAX) {
        kvf_key k = chunk_key(ev);
        kvf_sched_store_chunks(S->s, 0, &k, 1, 0, 0);
    }
    if (!held && S->store.cap > 0) {
        kvf_key k = chunk_key(id);
        kvf_sched_store_chunks(S->s, 0, &k, 1, 1, 0);
    }
}

/* A prefill finished: the instance caches the blocks (publishing events), the store saves the
 * chunks, decode starts, and the next waiting request runs. Returns 0, or -1 out of memory. */
static int finish(sim *S, inst_state *I, double now)
{
    sched_req *q = &S->r[I->running];
    q->ttft = now - q->arr_s;
    q->done = 1;
    size_t full = q->in_len / BLOCK;
    if (full > q->n_ids)
        full = q->n_ids;
    if (full) {
        if (tokens_of(S, q) != 0)
            return -1;
        /* The blocks take their room first and are published after the removals that made it, as
         * an engine's events come: a block of this prompt that the room evicted (the cache held
         * it but not the block before it) is stored again, not left removed in the index. */
        for (size_t b = 0; b < full; b++) {
            uint64_t ev = lru_touch(&I->cache, q->ids[b]);
            if (ev != UINT64_MAX)
                kvf_sched_block_removed(S->s, I->idx, &ev, 1);
            save_chunk(S, q->ids[b]);
        }
        kvf_sched_block_stored(S->s, I->idx, q->ids, full, 0, 0, S->tok, full * BLOCK, BLOCK,
                               KVF_TIER_DEVICE);
    }
    if (start_decode(S, I, q, now) != 0)
        return -1;
    start_next(S, I, now);
    report_load(S, I, now);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* A run */

static void sim_close(sim *S)
{
    for (int i = 0; S->in && i < S->ni; i++) {
        lru_free(&S->in[i].cache);
        free(S->in[i].queue);
        free(S->in[i].decode_ends);
    }
    free(S->in);
    free(S->pk.tokens);
    free(S->pk.cached);
    free(S->pk.work);
    free(S->pk.waited);
    lru_free(&S->store);
    free(S->tok);
    free(S->keys);
    kvf_sched_destroy(&S->s);
}

/* A fresh simulated cluster for rp under policy pol and discipline q: a scheduler with rp->ninst
 * instances, their device caches and the store, all empty, and every request not yet seen.
 * Returns 0, or -1 (nothing left to close) where it cannot be made. */
static int sim_open(sim *S, sched_replay *rp, kvf_policy pol, kvf_queue q)
{
    memset(S, 0, sizeof *S);
    S->cost = rp->cost;
    S->queue = q;
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
    if (!S->in || lru_init(&S->store, rp->store_blocks) != 0)
        goto out_close;
    for (int i = 0; i < rp->ninst; i++) {
        kvf_instance_info info;
        memset(&info, 0, sizeof info);
        snprintf(info.id, sizeof info.id, "sim-%d", i);
        info.role = KVF_ROLE_BOTH;
        info.block_tokens = BLOCK;
        info.capacity_blocks = rp->dev_blocks;
        S->in[i].running = -1;
        if (kvf_sched_instance_add(S->s, &info, &S->in[i].idx) != 0 ||
            lru_init(&S->in[i].cache, rp->dev_blocks) != 0)
            goto out_close;
    }
    for (size_t i = 0; i < rp->n; i++) {
        rp->r[i].done = rp->r[i].rejected = 0;
        rp->r[i].ttft = 0;
    }
    return 0;

out_close: /* sim_close() takes a partly made cluster */
    sim_close(S);
    return -1;
}

/* Request ri arrives at now: the scheduler places it, or rejects it, and it joins the waiting
 * queue of the instance it was placed on. Returns 0, or -1 out of memory. */
static int arrive(sim *S, size_t ri, double now)
{
    sched_req *q = &S->r[ri];
    q->arr_s = now;
    if (tokens_of(S, q) != 0)
        return -1;
    /* The lower bound: the longest prefix any instance (or the store) holds now, on an idle
     * instance: no queue, the rest prefilled, the load overlapped as it is for a real run. */
    size_t best = 0, best_dev = 0;
    for (int i = 0; i < S->ni; i++) {
        size_t dev, c = cached_tokens(S, &S->in[i], q, &dev);
        if (c > best || (c == best && dev > best_dev))
            best = c, best_dev = dev;
    }
    double bpf = prefill_time(&S->cost, q->in_len, (double)best);
    double bld = best > best_dev ? (double)(best - best_dev) * S->cost.kv_bytes_per_token /
                                       S->cost.load_bytes_per_s
                                 : 0;
    q->bound = bpf > bld ? bpf : bld;
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
        return 0;
    }
    inst_state *I = &S->in[res.prefill];
    q->inst = res.prefill;
    if (q_push(I, (int)ri) != 0)
        return -1;
    I->queued_raw_tok += q->in_len;
    if (I->running < 0)
        start_next(S, I, now);
    report_load(S, I, now);
    return 0;
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
 * the next arrival or the earliest prefill end (the end first on a tie), until neither is left.
 * Returns 0, or -1 out of memory. */
static int simulate(sim *S, double scale)
{
    size_t next = 0;
    for (;;) {
        double ta = next < S->n ? S->r[next].arrival / scale : INFINITY;
        double tf;
        int fi = first_to_finish(S, &tf);
        if (ta == INFINITY && fi < 0)
            return 0;
        int rc = fi >= 0 && tf <= ta ? finish(S, &S->in[fi], tf) : arrive(S, next++, ta);
        if (rc != 0)
            return -1;
    }
}

/* The figures of a finished simulation into out, but policy, queue and scale. Returns 0, or -1
 * out of memory. */
static int collect(const sim *S, sched_result *out)
{
    size_t n = S->n, k = 0, ok = 0;
    double *tt = malloc((n ? n : 1) * sizeof *tt), *bb = malloc((n ? n : 1) * sizeof *bb);
    if (!tt || !bb) {
        free(tt), free(bb);
        return -1;
    }
    double tpot = 0, dev_tok = 0, st_tok = 0, in_tok = 0, last = 0;
    for (size_t i = 0; i < n; i++) {
        const sched_req *q = &S->r[i];
        in_tok += q->in_len;
        out->rejected += (size_t)q->rejected;
        if (q->rejected || !q->done)
            continue;
        bb[k] = q->bound;
        tt[k++] = q->ttft;
        ok += S->slo <= 0 || q->ttft <= S->slo;
        tpot += q->tpot;
        dev_tok += (double)q->dev_hit;
        st_tok += (double)q->store_hit;
        last = q->arr_s + q->ttft > last ? q->arr_s + q->ttft : last;
    }
    out->completed = k;
    out->ttft_p50 = bench_quantile(tt, k, 0.5);
    out->ttft_p90 = bench_quantile(tt, k, 0.9);
    out->ttft_p99 = bench_quantile(tt, k, 0.99);
    out->bound_p50 = bench_quantile(bb, k, 0.5);
    out->bound_p90 = bench_quantile(bb, k, 0.9);
    out->bound_p99 = bench_quantile(bb, k, 0.99);
    out->vs_bound_p50 = out->bound_p50 > 0 ? out->ttft_p50 / out->bound_p50 : 0;
    out->vs_bound_p90 = out->bound_p90 > 0 ? out->ttft_p90 / out->bound_p90 : 0;
    out->vs_bound_p99 = out->bound_p99 > 0 ? out->ttft_p99 / out->bound_p99 : 0;
    out->tpot_mean = k ? tpot / (double)k : 0;
    out->slo_attain = n ? (double)ok / (double)n : 0;
    out->throughput = last > 0 ? (double)k / last : 0;
    out->dev_hit_rate = in_tok > 0 ? dev_tok / in_tok : 0;
    out->store_hit_rate = in_tok > 0 ? st_tok / in_tok : 0;
    free(tt), free(bb);
    return 0;
}

int sched_sim_run(sched_replay *rp, kvf_policy pol, kvf_queue q, double scale, sched_result *out)
{
    sim S;
    if (sim_open(&S, rp, pol, q) != 0)
        return -1;
    sched_result r = {
        .policy = pol, .queue = q, .scale = scale, .offered_rps = sched_replay_rps(rp) * scale};
    int rc = simulate(&S, scale) == 0 && collect(&S, &r) == 0 ? 0 : -1;
    sim_close(&S);
    if (rc == 0)
        *out = r;
    return rc;
}
