/*
 * kvf-bench connector: the connector's data path against its ceilings, and the engine's time to
 * first token with kvfabric against the same engine without it, in one run. Each measurement is
 * repeated over rounds, the two sides of every ratio are measured next to each other in each round
 * (in alternating order), and every figure is reported as its median, its rounds and their spread.
 * Every figure is real: measured here, now.
 *
 *   1. Page moves: 256 random 64 KiB pages (16 MiB) of a 256 MiB pool, gathered into staging and
 *      scattered back through the connector's page map, against the ceiling: the same pages
 *      copied one by one with memcpy on one thread. The caches are swept before every copy, so
 *      that source and destination are cold for both; each side's round is its best of three.
 *   2. Overlap: ref-tiny-32l (32 layers), a 2K-token prompt with 1792 tokens cached in a local
 *      kvf-store behind a rate-limited link, whose rate is set so that loading the prefix takes
 *      as long as computing the rest. Four runs a round, caches swept before each: compute (the
 *      prefill with the prefix's KV already in the engine's pages), transfer (the load alone, into
 *      other pages in random order), serial (the whole load, then the compute) and overlapped
 *      (layer l computed as soon as it arrived). overlap_hidden = (serial - overlapped) /
 *      min(compute, transfer): the share of the hideable time that was hidden.
 *   3. TTFT of kvf-engine at 2K and 8K tokens: without kvfabric, and with it at 0% (saving every
 *      chunk), 50% and 90% of the prompt cached in a local kvf-store; logits compared bit for bit.
 *      save_overhead_0pct = TTFT with kvfabric at 0% / TTFT without.
 * --quick runs part 3 on ref-tiny instead of ref-100m (a ref-100m 8K recompute alone takes about
 * 48 s on two cores) and says so. The engine's GEMMs run on one thread unless --gemm-threads says
 * otherwise: it stands in for a GPU engine, whose compute leaves the host's cores to the data
 * path, and on two cores a second GEMM thread would share its core with the store, the link and
 * the connector's threads (the cluster launcher runs kvf-engine with one for the same reason).
 */
#include "bench.h"
#include "bench_util.h"
#include "cpus.h"
#include "engine.h"
#include "ratelink.h"

#include "kvf/kvf.h"

#include "pagemap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum {
    MAX_ROUNDS = 64,
    POOL_PAGES = 2048,  /* per plane: 2 x 128 MiB */
    PAGE_BYTES = 65536, /* 32 tokens x 8 heads x 128 x 2 bytes */
    MOVE_CHUNKS = 16,   /* 16 chunks x 8 pages x 2 planes = 256 pages, 16 MiB */
    OVERLAP_TOKENS = 2048,
    PAGE_ROUNDS = 15, /* a round of page moves takes about 0.5 s */
    PAGE_TRIES = 3,
};

#define OVERLAP_MODEL "ref-tiny-32l"
#define SWEEP_BYTES   ((size_t)256 << 20)

typedef struct opts {
    int quick, json, gemm_threads;
    int rounds, ttft_rounds; /* of the overlap part and of the TTFT part */
    int rounds_given;        /* --rounds, 0 when not given */
    const char *model;
    const char *store_bin;
    const char *plot;
    const char *only;   /* NULL, "pages", "overlap" or "ttft"; with --device cuda, "pages" or
                         * "store" */
    const char *device; /* NULL or "host", or "cuda" (connector_cuda.c) */
    double link_mbps;   /* 0: calibrated */
} opts;

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Fills ids with n distinct pages out of pages, in random order. */
static void random_pages(uint32_t *ids, size_t n, uint32_t pages)
{
    uint32_t *all = malloc(pages * sizeof *all);
    for (uint32_t i = 0; i < pages; i++)
        all[i] = i;
    for (size_t i = 0; i < n; i++) {
        size_t j = i + rnd() % (pages - i);
        uint32_t t = all[i];
        all[i] = all[j];
        all[j] = t;
        ids[i] = all[i];
    }
    free(all);
}

/* Evicts what the caches hold by reading a buffer larger than any last-level cache; buf holds
 * SWEEP_BYTES, written once beforehand so that no read faults. */
static void sweep(const uint8_t *buf)
{
    static volatile uint64_t sink;
    uint64_t s = 0;
    for (size_t i = 0; i < SWEEP_BYTES; i += 64)
        s += buf[i];
    sink += s;
}

static int want(const opts *o, const char *part)
{
    return !o->only || !strcmp(o->only, part);
}

/* ------------------------------------------------------------------------------------------ */
/* 1. Page moves */

typedef struct pages_res {
    int rounds;
    /* GB/s per round */
    double gather[MAX_ROUNDS], gather_ceil[MAX_ROUNDS];
    double scatter[MAX_ROUNDS], scatter_ceil[MAX_ROUNDS];
    /* page map / ceiling, per round */
    double gather_ratio[MAX_ROUNDS], scatter_ratio[MAX_ROUNDS];
} pages_res;

typedef struct pool {
    kvf_kv_layer reg;
    kvf__pagemap pm;
    uint8_t *stage;
    const uint8_t *sweep;
    uint32_t ids[MOVE_CHUNKS * 8];
} pool;

/* The ceiling: the pages the page map moves for the chunks of p->ids, in its order, each with one
 * memcpy, on this thread. */
static void ceiling_move(const pool *p, int gather)
{
    uint32_t ppc = p->pm.pages_per_chunk;
    size_t i = 0;
    for (size_t c = 0; c < MOVE_CHUNKS; c++) {
        for (int pl = 0; pl < 2; pl++) {
            uint8_t *base = pl ? p->reg.v_base : p->reg.k_base;
            for (uint32_t k = 0; k < ppc; k++, i++) {
                uint8_t *eng = base + (size_t)p->ids[c * ppc + k] * PAGE_BYTES;
                uint8_t *st = p->stage + i * PAGE_BYTES;
                if (gather)
                    memcpy(st, eng, PAGE_BYTES);
                else
                    memcpy(eng, st, PAGE_BYTES);
            }
        }
    }
}

/* The same pages through the connector's page map. */
static void map_move(const pool *p, int gather)
{
    uint32_t ppc = p->pm.pages_per_chunk;
    for (size_t c = 0; c < MOVE_CHUNKS; c++) {
        uint8_t *seg = p->stage + c * p->pm.seg_bytes;
        if (gather)
            kvf__pagemap_gather(&p->pm, 0, seg, p->ids + c * ppc);
        else
            kvf__pagemap_scatter(&p->pm, 0, seg, p->ids + c * ppc);
    }
}

/* GB/s of one cold move. */
static double timed_move(const pool *p, int ceiling, int gather)
{
    sweep(p->sweep);
    double t0 = bench_now();
    if (ceiling)
        ceiling_move(p, gather);
    else
        map_move(p, gather);
    return (double)MOVE_CHUNKS * (double)p->pm.seg_bytes / (bench_now() - t0) / 1e9;
}

/* Every round draws new pages and moves them four ways: gather and scatter, each through the
 * page map and as the ceiling, the two in alternating order; r's arrays start zeroed. */
static void page_moves(int rounds, const uint8_t *sweep_buf, pages_res *r)
{
    /* One layer of a bf16 layout with 64 KiB pages. */
    kvf_layout l;
    kvf_layout_preset("llama-3.1-8b", &l);
    l.layers = 1;
    l.page_tokens = 32;
    l.chunk_tokens = 256;
    pool p = {.sweep = sweep_buf};
    p.reg = (kvf_kv_layer){.k_base = malloc((size_t)POOL_PAGES * PAGE_BYTES),
                           .v_base = malloc((size_t)POOL_PAGES * PAGE_BYTES),
                           .page_stride = PAGE_BYTES,
                           .num_pages = POOL_PAGES,
                           .kind = KVF_MEM_HOST};
    memset(p.reg.k_base, 1, (size_t)POOL_PAGES * PAGE_BYTES);
    memset(p.reg.v_base, 2, (size_t)POOL_PAGES * PAGE_BYTES);
    char err[200];
    kvf__pagemap_init(&p.pm, &l, &p.reg, 1, err, sizeof err);
    p.stage = malloc(MOVE_CHUNKS * p.pm.seg_bytes);
    memset(p.stage, 3, MOVE_CHUNKS * p.pm.seg_bytes);
    r->rounds = rounds;
    for (int i = 0; i < rounds; i++) {
        random_pages(p.ids, MOVE_CHUNKS * 8, POOL_PAGES);
        /* The best of a few tries of each, the two sides taking turns: a copy of a few
         * milliseconds that another process preempts says nothing about either. */
        for (int k = 0; k < 2 * PAGE_TRIES; k++) {
            int ceiling = (i + k) % 2;
            double g = timed_move(&p, ceiling, 1), s = timed_move(&p, ceiling, 0);
            double *gb = ceiling ? &r->gather_ceil[i] : &r->gather[i];
            double *sb = ceiling ? &r->scatter_ceil[i] : &r->scatter[i];
            *gb = g > *gb ? g : *gb;
            *sb = s > *sb ? s : *sb;
        }
        r->gather_ratio[i] = r->gather[i] / r->gather_ceil[i];
        r->scatter_ratio[i] = r->scatter[i] / r->scatter_ceil[i];
    }
    kvf__pagemap_free(&p.pm);
    free(p.reg.k_base);
    free(p.reg.v_base);
    free(p.stage);
}

/* ------------------------------------------------------------------------------------------ */
/* Shared by the engine runs */

static void make_prompt(uint32_t *t, size_t n, uint32_t vocab)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t z = i * 0x9E3779B97F4A7C15ull + 12345;
        z ^= z >> 31;
        z *= 0xbf58476d1ce4e5b9ull;
        t[i] = (uint32_t)((z ^ (z >> 29)) % vocab);
    }
}

/* The transport the connectors of this run used, as the first one said. */
static char used_transport[16];

/* A connector to addr for layout, or NULL with the reason on stderr. */
static kvf_connector *connector_to(const char *addr, const kvf_layout *layout)
{
    const char *nodes[1] = {addr};
    kvf_connector_opts co = {.nodes = nodes, .n_nodes = 1, .layout = *layout, .deadline_ms = 60000};
    kvf_connector *cn = NULL;
    char err[256];
    if (kvf_connector_open(&cn, &co, err, sizeof err) != 0)
        fprintf(stderr, "kvf-bench connector: %s\n", err);
    else if (!used_transport[0])
        snprintf(used_transport, sizeof used_transport, "%s", kvf_connector_transport(cn, NULL, 0));
    return cn;
}

/* A client to addr in layout's key namespace, or NULL with the reason on stderr. */
static kvf_client *client_to(const char *addr, const kvf_layout *layout)
{
    kvf_keyspace ks;
    kvf_keyspace_init(&ks, layout, NULL, 0);
    const char *nodes[1] = {addr};
    kvf_client_opts co = {.nodes = nodes, .n_nodes = 1, .ns = ks.seed};
    kvf_client *cl = NULL;
    char err[256];
    if (kvf_client_open(&cl, &co, err, sizeof err) != 0)
        fprintf(stderr, "kvf-bench connector: %s\n", err);
    return cl;
}

static kvfe_engine *engine_new(const char *model, kvf_connector *cn, uint32_t max_tokens)
{
    kvfe_opts o = {.model = model,
                   .seed = 42,
                   .max_tokens = max_tokens,
                   .cn = cn,
                   .save = 1,
                   .page_shuffle = 11};
    kvfe_engine *e = NULL;
    char err[256];
    if (kvfe_open(&e, &o, err, sizeof err) != 0)
        fprintf(stderr, "kvf-bench connector: %s\n", err);
    return e;
}

/* Evicts the chunks of t[0..n) from index `from` on, so that exactly `from` chunks stay cached. */
static void keep_chunks(kvf_client *cl, const kvf_layout *layout, const uint32_t *t, size_t n,
                        size_t from)
{
    kvf_keyspace ks;
    kvf_keyspace_init(&ks, layout, NULL, 0);
    size_t nc = n / layout->chunk_tokens, nk;
    kvf_key *k = malloc(nc * sizeof *k);
    int *st = malloc(nc * sizeof *st);
    kvf_keys_compute(&ks, t, n, k, nc, &nk, NULL);
    if (nk > from)
        kvf_client_evict(cl, nk - from, k + from, st, 10000);
    free(k);
    free(st);
}

/* ------------------------------------------------------------------------------------------ */
/* 2. Overlap */

typedef enum run_kind { RUN_COMPUTE, RUN_TRANSFER, RUN_SERIAL, RUN_OVERLAPPED } run_kind;

typedef struct overlap_res {
    int rounds, ok, identical;
    size_t tokens, cached;
    double link_mbps;    /* the link's rate, MB/s */
    uint64_t load_bytes; /* bytes of the prefix's chunks */
    /* seconds per round */
    double compute[MAX_ROUNDS], transfer[MAX_ROUNDS], serial[MAX_ROUNDS], overlapped[MAX_ROUNDS];
    double hidden[MAX_ROUNDS];
} overlap_res;

/* What the overlap runs share: the engine and its connector through the link, a second connector
 * through it with pages of its own for the load alone, and the prompt's reference logits. */
typedef struct ov_ctx {
    kvfe_model m;
    bench_link *link;
    kvf_connector *cn, *cn_alone;
    kvf_client *cl;
    kvfe_engine *e;
    kvf_kv_layer *alone; /* the pages the load alone goes to */
    uint32_t *alone_ids;
    uint32_t t[OVERLAP_TOKENS];
    float ref[512]; /* the prompt's logits from scratch (the model's vocab is 512) */
    size_t cached;
    const uint8_t *sweep;
} ov_ctx;

/* One run of kind k, caches swept first. Returns its seconds, or -1 when it did not do what it
 * was meant to (a load that failed, or a prefix not reused); clears *same when the logits differ
 * from the reference's. */
static double ov_run(ov_ctx *c, run_kind k, int *same)
{
    uint32_t P = c->m.layout.page_tokens;
    sweep(c->sweep);
    if (k == RUN_TRANSFER) {
        kvf_xfer *x = NULL;
        double t0 = bench_now();
        int rc = kvf_connector_load(c->cn_alone, c->t, c->cached, c->alone_ids, c->cached / P, &x);
        rc = rc ? rc : kvf_xfer_wait(x);
        double s = bench_now() - t0;
        kvf_xfer_free(&x);
        return rc ? -1 : s;
    }
    kvfe_set_device_reuse(c->e, k == RUN_COMPUTE ? c->cached : 0);
    kvfe_set_overlap(c->e, k != RUN_SERIAL);
    kvfe_result r;
    if (kvfe_prefill(c->e, c->t, OVERLAP_TOKENS, &r) != 0)
        return -1;
    *same &= !memcmp(r.logits, c->ref, sizeof(float) * c->m.vocab);
    size_t reused = k == RUN_COMPUTE ? r.device_tokens : r.loaded_tokens;
    return reused == c->cached ? r.seconds : -1;
}

/* Registers pages of c->cn_alone: four times the prefix's pages per plane, so that its pages in
 * random order spread over a pool as an engine's do. */
static int ov_alone_pages(ov_ctx *c)
{
    const kvf_layout *l = &c->m.layout;
    uint32_t pages = (uint32_t)(4 * c->cached / l->page_tokens);
    size_t page = kvf_layout_bytes_per_token_layer(l) / 2 * l->page_tokens;
    c->alone = calloc(l->layers, sizeof *c->alone);
    c->alone_ids = malloc(c->cached / l->page_tokens * sizeof *c->alone_ids);
    if (!c->alone || !c->alone_ids)
        return -1;
    for (uint32_t i = 0; i < l->layers; i++) {
        c->alone[i] = (kvf_kv_layer){.k_base = calloc(pages, page),
                                     .v_base = calloc(pages, page),
                                     .page_stride = page,
                                     .num_pages = pages,
                                     .kind = KVF_MEM_HOST};
        if (!c->alone[i].k_base || !c->alone[i].v_base)
            return -1;
    }
    random_pages(c->alone_ids, c->cached / l->page_tokens, pages);
    char err[200];
    if (kvf_connector_register(c->cn_alone, c->alone, l->layers, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench connector: %s\n", err);
        return -1;
    }
    return 0;
}

static void ov_close(ov_ctx *c)
{
    kvfe_close(&c->e);
    kvf_connector_close(&c->cn);
    kvf_connector_close(&c->cn_alone);
    kvf_client_close(&c->cl);
    bench_link_stop(&c->link);
    for (uint32_t i = 0; c->alone && i < c->m.layout.layers; i++) {
        free(c->alone[i].k_base);
        free(c->alone[i].v_base);
    }
    free(c->alone);
    free(c->alone_ids);
}

/* Starts the link to the store, the connectors, the client and the engine; prefills the prompt
 * once from scratch (its logits are the reference) and leaves only the cached prefix in the store.
 * Returns 0, or -1 with the reason on stderr. */
static int ov_open(ov_ctx *c, uint16_t store_port)
{
    kvfe_model_preset(OVERLAP_MODEL, &c->m);
    const kvf_layout *l = &c->m.layout;
    size_t nc = OVERLAP_TOKENS / l->chunk_tokens;
    c->cached = nc * 9 / 10 * l->chunk_tokens;
    make_prompt(c->t, OVERLAP_TOKENS, c->m.vocab);
    if (bench_link_start(&c->link, store_port) != 0)
        return -1;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", bench_link_port(c->link));
    c->cn = connector_to(addr, l);
    c->cn_alone = connector_to(addr, l);
    c->cl = client_to(addr, l);
    if (!c->cn || !c->cn_alone || !c->cl || ov_alone_pages(c) != 0)
        return -1;
    c->e = engine_new(OVERLAP_MODEL, c->cn, OVERLAP_TOKENS + 8);
    if (!c->e)
        return -1;
    kvfe_result r;
    kvfe_prefill(c->e, c->t, OVERLAP_TOKENS, &r);
    memcpy(c->ref, r.logits, sizeof(float) * c->m.vocab);
    if (kvfe_flush(c->e) != 0) {
        fprintf(stderr, "kvf-bench connector: the overlap prompt's save failed\n");
        return -1;
    }
    keep_chunks(c->cl, l, c->t, OVERLAP_TOKENS, c->cached / l->chunk_tokens);
    kvfe_set_reuse(c->e, 1, 0); /* the runs load; none saves */
    return 0;
}

/* Sets the link's rate so that the load alone takes about as long as the compute alone. */
static void ov_calibrate(ov_ctx *c, overlap_res *o)
{
    int same = 1;
    double best = 1e9;
    for (int i = 0; i < 3; i++) {
        double s = ov_run(c, RUN_COMPUTE, &same);
        best = s > 0 && s < best ? s : best;
    }
    const kvf_layout *l = &c->m.layout;
    uint64_t seg = kvf_layout_segment_bytes(l);
    o->load_bytes = c->cached / l->chunk_tokens * kvf_obj_raw_size(l->layers, seg);
    if (o->link_mbps <= 0)
        o->link_mbps = (double)o->load_bytes / best / 1e6;
    bench_link_set_rate(c->link, o->link_mbps * 1e6);
}

/* The four runs in every round, in an order that rotates from round to round. */
static void overlap(const opts *op, uint16_t store_port, const uint8_t *sweep_buf, overlap_res *o)
{
    ov_ctx c = {.sweep = sweep_buf};
    *o = (overlap_res){.rounds = op->rounds, .tokens = OVERLAP_TOKENS, .link_mbps = op->link_mbps};
    if (ov_open(&c, store_port) != 0)
        goto out_close;
    o->cached = c.cached;
    ov_calibrate(&c, o);
    o->ok = o->identical = 1;
    for (int i = 0; i < op->rounds; i++) {
        bench_progress("connector", "overlap round %d of %d", i + 1, op->rounds);
        double s[4];
        for (int k = 0; k < 4; k++) {
            run_kind kind = (run_kind)((i + k) % 4);
            s[kind] = ov_run(&c, kind, &o->identical);
            o->ok &= s[kind] > 0;
        }
        o->compute[i] = s[RUN_COMPUTE];
        o->transfer[i] = s[RUN_TRANSFER];
        o->serial[i] = s[RUN_SERIAL];
        o->overlapped[i] = s[RUN_OVERLAPPED];
        double hideable = s[RUN_COMPUTE] < s[RUN_TRANSFER] ? s[RUN_COMPUTE] : s[RUN_TRANSFER];
        o->hidden[i] = (s[RUN_SERIAL] - s[RUN_OVERLAPPED]) / hideable;
    }
out_close:
    ov_close(&c);
}

/* ------------------------------------------------------------------------------------------ */
/* 3. Time to first token */

typedef struct ttft_row {
    size_t n;
    int rounds, identical;
    size_t loaded50, loaded90;
    float *ref; /* the logits without kvfabric (vocab values) */
    /* seconds per round: without kvfabric, with it at 0%, 50% and 90% cached, and the time the
     * 0% run's save took to complete after its first token */
    double full[MAX_ROUNDS], t0[MAX_ROUNDS], t50[MAX_ROUNDS], t90[MAX_ROUNDS];
    double save_tail[MAX_ROUNDS];
    /* the engine thread's CPU seconds in the prefill without kvfabric and at 0% cached: where the
     * GEMMs run on that thread (--gemm-threads 1), the work on the first token's path, which
     * other processes' load does not stretch */
    double full_cpu[MAX_ROUNDS], t0_cpu[MAX_ROUNDS];
} ttft_row;

typedef struct ttft_ctx {
    const char *model;
    kvfe_model m;
    kvf_connector *cn;
    kvf_client *cl;
    kvfe_engine *e;
} ttft_ctx;

static double thread_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* One prefill of row's prompt; *cpu gets the engine thread's CPU seconds in it, *tail the time
 * its save took to complete after the first token (both may be NULL). Without reuse its logits
 * are the row's reference; with reuse, *same is cleared when they differ from it. Returns the
 * TTFT. */
static double ttft_run(ttft_ctx *c, const uint32_t *t, ttft_row *row, int reuse, int *same,
                       size_t *loaded, double *cpu, double *tail)
{
    kvfe_set_reuse(c->e, reuse, reuse);
    kvfe_result r;
    double c0 = thread_cpu_s();
    kvfe_prefill(c->e, t, row->n, &r);
    if (cpu)
        *cpu = thread_cpu_s() - c0;
    if (!reuse)
        memcpy(row->ref, r.logits, sizeof(float) * c->m.vocab);
    else
        *same &= !memcmp(row->ref, r.logits, sizeof(float) * c->m.vocab);
    if (loaded)
        *loaded = r.loaded_tokens;
    double t0 = bench_now();
    kvfe_flush(c->e); /* the next run must not find this one's save in flight */
    if (tail)
        *tail = bench_now() - t0;
    return r.seconds;
}

/* One round at n tokens: without kvfabric and with it at 0% (in alternating order), then 50% and
 * 90% cached. */
static void ttft_round(ttft_ctx *c, const uint32_t *t, ttft_row *row, int i)
{
    size_t nc = row->n / c->m.layout.chunk_tokens;
    int same = 1;
    kvf_client_clear(c->cl, NULL, 10000);
    bench_progress("connector", "%s, %zu tokens, round %d: without kvfabric and 0%% cached",
                   c->model, row->n, i + 1);
    /* The reference logits of round 0 come first; every later round's are the same bits. */
    for (int k = 0; k < 2; k++) {
        if (k == i % 2)
            row->full[i] = ttft_run(c, t, row, 0, &same, NULL, &row->full_cpu[i], NULL);
        else
            row->t0[i] = ttft_run(c, t, row, 1, &same, NULL, &row->t0_cpu[i], &row->save_tail[i]);
    }
    keep_chunks(c->cl, &c->m.layout, t, row->n, nc / 2);
    bench_progress("connector", "%s, %zu tokens, round %d: 50%% and 90%% cached", c->model, row->n,
                   i + 1);
    row->t50[i] = ttft_run(c, t, row, 1, &same, &row->loaded50, NULL, NULL);
    keep_chunks(c->cl, &c->m.layout, t, row->n, nc * 9 / 10);
    row->t90[i] = ttft_run(c, t, row, 1, &same, &row->loaded90, NULL, NULL);
    row->identical &= same;
}

/* Rounds of both prompt sizes on one engine, reuse switched per run; *cs gets the connector's
 * statistics over them. Returns 0, or -1 with the reason on stderr. */
static int ttft(const opts *o, const char *store_addr, ttft_row rows[2], kvf_connector_stats *cs)
{
    ttft_ctx c = {.model = o->model};
    const size_t sizes[2] = {2048, 8192};
    int rc = -1;
    kvfe_model_preset(o->model, &c.m);
    uint32_t *t = malloc(8192 * sizeof *t);
    for (int k = 0; k < 2; k++)
        rows[k] = (ttft_row){.n = sizes[k],
                             .rounds = o->ttft_rounds,
                             .identical = 1,
                             .ref = malloc(c.m.vocab * sizeof(float))};
    c.cn = connector_to(store_addr, &c.m.layout);
    c.cl = client_to(store_addr, &c.m.layout);
    c.e = c.cn ? engine_new(o->model, c.cn, 8192 + 8) : NULL;
    if (!t || !rows[0].ref || !rows[1].ref || !c.cl || !c.e)
        goto out_close;
    make_prompt(t, 8192, c.m.vocab);
    for (int i = 0; i < o->ttft_rounds; i++)
        for (int k = 0; k < 2; k++)
            ttft_round(&c, t, &rows[k], i);
    kvf_connector_stats_get(c.cn, cs);
    rc = 0;
out_close:
    for (int k = 0; k < 2; k++) {
        free(rows[k].ref);
        rows[k].rounds = rc ? 0 : rows[k].rounds;
    }
    free(t);
    kvfe_close(&c.e);
    kvf_client_close(&c.cl);
    kvf_connector_close(&c.cn);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Options and reporting */

/* Reads the options into o; the model and the TTFT rounds follow --quick unless given. Returns 0,
 * or -1 with the usage on stderr. */
static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){.gemm_threads = 1};
    static const char *const models[] = {"ref-tiny", "ref-100m", NULL};
    static const char *const onlys[] = {"pages", "overlap", "ttft", "store", NULL};
    static const char *const devices[] = {"host", "cuda", NULL};
    const kvf__arg args[] = {
        KVF__OPT("quick", KVF__ARG_FLAG, &o->quick, NULL, "the small model and fewer rounds (CI)",
                 NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
        KVF__OPT("rounds", KVF__ARG_INT, &o->rounds, "N",
                 "rounds of the overlap and TTFT parts (with --device cuda, of every part)",
                 "7 and 3; 5 TTFT rounds with --quick; 9 with --device cuda", .lo = 0,
                 .hi = MAX_ROUNDS),
        KVF__OPT("gemm-threads", KVF__ARG_INT, &o->gemm_threads, "N",
                 "GEMM threads of the engine (0: OpenBLAS's own choice)",
                 "1: the other core is the data path's", .lo = 0, .hi = 1024),
        KVF__OPT("model", KVF__ARG_CHOICE, &o->model, "PRESET", "the reference model",
                 "ref-100m; ref-tiny with --quick", .choices = models),
        KVF__OPT("only", KVF__ARG_CHOICE, &o->only, "PART",
                 "one part: pages, overlap or ttft (host); pages or store (--device cuda)",
                 "every part", .choices = onlys),
        KVF__OPT("link-mbps", KVF__ARG_REAL, &o->link_mbps, "R",
                 "rate of the link to the store in the overlap part, MB/s",
                 "set so that the load takes as long as the compute", .lo = 0, .hi = 1e9),
        KVF__OPT("store-bin", KVF__ARG_STR, &o->store_bin, "PATH", "the kvf-store to run",
                 "the one beside kvf-bench"),
        KVF__OPT("plot", KVF__ARG_STR, &o->plot, "FILE.png", "a plot of TTFT by prompt length",
                 NULL),
        KVF__OPT("device", KVF__ARG_CHOICE, &o->device, "D",
                 "where the KV pages are: host memory, or GPU memory (docs/cuda.md: page copies, "
                 "a same-host store to GPU pages, overlap with compute)",
                 "host", .choices = devices),
    };
    int rc = bench_args("connector", "[OPTIONS]",
                        "The connector: page copies, a load overlapping the forward pass layer by "
                        "layer, and TTFT with kvfabric against recomputing, with the reference "
                        "engine (docs/benchmarks.md).",
                        NULL, args, sizeof args / sizeof args[0], argc, argv);
    if (rc != 0)
        return rc;
    if (o->rounds < 0 || o->rounds > MAX_ROUNDS ||
        (o->device && strcmp(o->device, "host") && strcmp(o->device, "cuda")) ||
        (o->device && !strcmp(o->device, "cuda") && o->only && !want(o, "pages") &&
         !want(o, "store")) ||
        (o->only && (!o->device || strcmp(o->device, "cuda")) && !want(o, "pages") &&
         !want(o, "overlap") && !want(o, "ttft"))) {
        fprintf(stderr,
                "kvf-bench connector: --only %s is not a part of --device %s (see "
                "--help)\n",
                o->only ? o->only : "-", o->device ? o->device : "host");
        return -1;
    }
    if (!o->model)
        o->model = o->quick ? "ref-tiny" : "ref-100m";
    o->rounds_given = o->rounds;
    o->ttft_rounds = o->rounds ? o->rounds : o->quick ? 5 : 3;
    if (!o->rounds)
        o->rounds = 7;
    return 0;
}

/* "median [p10 - p90]" of n values times scale. */
static const char *spread_str(char *buf, size_t len, const double *v, int n, double scale,
                              const char *fmt)
{
    bench_spread s = bench_spread_of(v, (size_t)n);
    char f[64];
    snprintf(f, sizeof f, "%s [%s - %s]", fmt, fmt, fmt);
    snprintf(buf, len, f, s.median * scale, s.p10 * scale, s.p90 * scale);
    return buf;
}

static void ratios(double *out, const double *a, const double *b, int n)
{
    for (int i = 0; i < n; i++)
        out[i] = a[i] / b[i];
}

static void print_pages(const pages_res *pr)
{
    char b[128];
    int n = pr->rounds;
    printf("  page moves, 256 random 64 KiB pages, cold, median [p10 - p90] of %d rounds:\n", n);
    printf("    %-40s %s GB/s\n", "gather, ceiling (memcpy, 1 thread)",
           spread_str(b, sizeof b, pr->gather_ceil, n, 1, "%.2f"));
    printf("    %-40s %s GB/s\n", "gather, page map",
           spread_str(b, sizeof b, pr->gather, n, 1, "%.2f"));
    printf("    %-40s %s\n", "gather_vs_ceiling",
           spread_str(b, sizeof b, pr->gather_ratio, n, 1, "%.3f"));
    printf("    %-40s %s GB/s\n", "scatter, ceiling (memcpy, 1 thread)",
           spread_str(b, sizeof b, pr->scatter_ceil, n, 1, "%.2f"));
    printf("    %-40s %s GB/s\n", "scatter, page map",
           spread_str(b, sizeof b, pr->scatter, n, 1, "%.2f"));
    printf("    %-40s %s\n", "scatter_vs_ceiling",
           spread_str(b, sizeof b, pr->scatter_ratio, n, 1, "%.3f"));
}

static void print_overlap(const overlap_res *ov)
{
    char b[128];
    int n = ov->rounds;
    printf("  overlap, %s, %zu tokens, %zu cached, link %.1f MB/s (%.1f MiB to load), %d rounds:\n",
           OVERLAP_MODEL, ov->tokens, ov->cached, ov->link_mbps, ov->load_bytes / 1048576.0, n);
    printf("    %-40s %s ms\n", "compute alone (KV in place)",
           spread_str(b, sizeof b, ov->compute, n, 1e3, "%.1f"));
    printf("    %-40s %s ms\n", "transfer alone (the load)",
           spread_str(b, sizeof b, ov->transfer, n, 1e3, "%.1f"));
    printf("    %-40s %s ms\n", "serial (whole load, then compute)",
           spread_str(b, sizeof b, ov->serial, n, 1e3, "%.1f"));
    printf("    %-40s %s ms\n", "overlapped (layerwise)",
           spread_str(b, sizeof b, ov->overlapped, n, 1e3, "%.1f"));
    printf("    %-40s %s%s\n", "overlap_hidden", spread_str(b, sizeof b, ov->hidden, n, 1, "%.3f"),
           ov->ok && ov->identical ? "" : "   (a run failed or its logits differed)");
}

static void print_ttft(const char *model, const ttft_row rows[2])
{
    char b[4][96];
    int n = rows[0].rounds;
    printf("  TTFT of kvf-engine %s, ms, median [p10 - p90] of %d rounds:\n", model, n);
    if (n == 0)
        return;
    for (int k = 0; k < 2; k++) {
        const ttft_row *r = &rows[k];
        double ov[MAX_ROUNDS], ovc[MAX_ROUNDS], s50[MAX_ROUNDS], s90[MAX_ROUNDS];
        ratios(ov, r->t0, r->full, n);
        ratios(ovc, r->t0_cpu, r->full_cpu, n);
        ratios(s50, r->full, r->t50, n);
        ratios(s90, r->full, r->t90, n);
        printf("    %zu tokens, logits identical: %s\n", r->n, r->identical ? "yes" : "NO");
        printf("      %-38s %s\n", "without kvfabric",
               spread_str(b[0], 96, r->full, n, 1e3, "%.0f"));
        printf("      %-38s %s, save_overhead_0pct %s\n", "0% cached, saving every chunk",
               spread_str(b[0], 96, r->t0, n, 1e3, "%.0f"), spread_str(b[1], 96, ov, n, 1, "%.3f"));
        printf("      %-38s %s (engine thread's CPU time)\n", "  save_overhead_0pct_cpu",
               spread_str(b[0], 96, ovc, n, 1, "%.3f"));
        printf("      %-38s %s ms after the first token\n", "  its save complete",
               spread_str(b[0], 96, r->save_tail, n, 1e3, "%.0f"));
        printf("      %-38s %s, speedup %s\n", "50% cached",
               spread_str(b[2], 96, r->t50, n, 1e3, "%.0f"),
               spread_str(b[3], 96, s50, n, 1, "%.2f"));
        printf("      %-38s %s, speedup %s\n", "90% cached",
               spread_str(b[2], 96, r->t90, n, 1e3, "%.0f"),
               spread_str(b[3], 96, s90, n, 1, "%.2f"));
    }
}

/* The TTFT bars (medians) of both prompt sizes to png; says so on stdout once written. */
static void plot_ttft(const char *png, const char *model, const ttft_row rows[2])
{
    const char *labels[] = {"recompute 2K", "50% cached 2K", "90% cached 2K",
                            "recompute 8K", "50% cached 8K", "90% cached 8K"};
    double vals[6], lo[6], hi[6];
    for (int k = 0; k < 2; k++) {
        int n = rows[k].rounds;
        const double *v[3] = {rows[k].full, rows[k].t50, rows[k].t90};
        for (int c = 0; c < 3; c++) {
            bench_spread sp = bench_spread_of(v[c], (size_t)n);
            vals[3 * k + c] = sp.median * 1e3;
            lo[3 * k + c] = sp.p10 * 1e3;
            hi[3 * k + c] = sp.p90 * 1e3;
        }
    }
    int groups[] = {0, 1, 1, 0, 1, 1};
    char title[200];
    snprintf(title, sizeof title,
             "kvf-engine %s time to first token, real, %d cores (recompute grey, kvfabric blue)",
             model, kvf__cores());
    bench_bars b = {.title = title,
                    .ylabel = "TTFT (ms, log scale; whiskers 10th-90th percentile)",
                    .labels = labels,
                    .values = vals,
                    .lo = lo,
                    .hi = hi,
                    .groups = groups,
                    .n = 6,
                    .logy = 1};
    if (bench_plot_bars(png, &b) == 0)
        printf("  plot: %s\n", png);
}

static void json_pages(json_t *res, const pages_res *pr)
{
    size_t n = (size_t)pr->rounds;
    bench_json_rounds(res, "gather_ceiling_gbps", pr->gather_ceil, n);
    bench_json_rounds(res, "gather_gbps", pr->gather, n);
    bench_json_rounds(res, "gather_vs_ceiling", pr->gather_ratio, n);
    bench_json_rounds(res, "scatter_ceiling_gbps", pr->scatter_ceil, n);
    bench_json_rounds(res, "scatter_gbps", pr->scatter, n);
    bench_json_rounds(res, "scatter_vs_ceiling", pr->scatter_ratio, n);
}

static void json_ms(json_t *res, const char *key, const double *s, int n)
{
    double ms[MAX_ROUNDS];
    for (int i = 0; i < n; i++)
        ms[i] = s[i] * 1e3;
    bench_json_rounds(res, key, ms, (size_t)n);
}

static void json_overlap(json_t *res, const overlap_res *ov)
{
    int n = ov->rounds;
    json_object_set_new(res, "overlap_model", json_string(OVERLAP_MODEL));
    json_object_set_new(res, "overlap_tokens", json_integer((json_int_t)ov->tokens));
    json_object_set_new(res, "overlap_cached_tokens", json_integer((json_int_t)ov->cached));
    json_object_set_new(res, "overlap_load_bytes", json_integer((json_int_t)ov->load_bytes));
    bench_json_real(res, "overlap_link_mbps", ov->link_mbps);
    json_ms(res, "compute_alone_ms", ov->compute, n);
    json_ms(res, "transfer_alone_ms", ov->transfer, n);
    json_ms(res, "serial_prefill_ms", ov->serial, n);
    json_ms(res, "overlap_prefill_ms", ov->overlapped, n);
    bench_json_rounds(res, "overlap_hidden", ov->hidden, (size_t)n);
    json_object_set_new(res, "overlap_logits_identical", json_boolean(ov->ok && ov->identical));
}

static void json_ttft(json_t *res, const ttft_row rows[2], const kvf_connector_stats *cs)
{
    json_object_set_new(res, "connector_batches", json_integer((json_int_t)cs->batches));
    json_object_set_new(res, "connector_load_bytes", json_integer((json_int_t)cs->load_bytes));
    json_object_set_new(res, "connector_save_bytes", json_integer((json_int_t)cs->save_bytes));
    const char *sz[2] = {"2k", "8k"};
    for (int k = 0; k < 2; k++) {
        const ttft_row *r = &rows[k];
        int n = r->rounds;
        double v[MAX_ROUNDS];
        char key[64];
#define ROUNDS_KEY(fmt) (snprintf(key, sizeof key, fmt, sz[k]), key)
        json_ms(res, ROUNDS_KEY("ttft_full_ms_%s"), r->full, n);
        json_ms(res, ROUNDS_KEY("ttft_0pct_ms_%s"), r->t0, n);
        json_ms(res, ROUNDS_KEY("ttft_50pct_ms_%s"), r->t50, n);
        json_ms(res, ROUNDS_KEY("ttft_90pct_ms_%s"), r->t90, n);
        json_ms(res, ROUNDS_KEY("save_after_first_token_ms_%s"), r->save_tail, n);
        ratios(v, r->t0, r->full, n);
        bench_json_rounds(res, ROUNDS_KEY("save_overhead_0pct_%s"), v, (size_t)n);
        ratios(v, r->t0_cpu, r->full_cpu, n);
        bench_json_rounds(res, ROUNDS_KEY("save_overhead_0pct_cpu_%s"), v, (size_t)n);
        ratios(v, r->full, r->t50, n);
        bench_json_rounds(res, ROUNDS_KEY("ttft_speedup_50pct_%s"), v, (size_t)n);
        ratios(v, r->full, r->t90, n);
        bench_json_rounds(res, ROUNDS_KEY("ttft_speedup_90pct_%s"), v, (size_t)n);
        json_object_set_new(res, ROUNDS_KEY("logits_identical_%s"), json_boolean(r->identical));
#undef ROUNDS_KEY
    }
}

/* ------------------------------------------------------------------------------------------ */

int bench_connector_main(int argc, char **argv)
{
    opts o;
    int p = parse(argc, argv, &o);
    if (p != 0)
        return p > 0 ? 0 : 2;
    if (o.device && !strcmp(o.device, "cuda"))
        return bench_connector_cuda(o.rounds_given, o.json, o.store_bin, o.only);
    kvfe_model m;
    if (kvfe_model_preset(o.model, &m) != 0) {
        fprintf(stderr, "kvf-bench connector: unknown model %s\n", o.model);
        return 2;
    }
    int rc = 1, ok = 1;
    bench_proc store = {0};
    pages_res pr = {0};
    overlap_res ov = {0};
    ttft_row rows[2] = {{0}};
    uint8_t *sweep_buf = malloc(SWEEP_BYTES);
    json_t *res = bench_result_new("connector");
    if (!sweep_buf)
        goto out_decref_res;
    memset(sweep_buf, 5, SWEEP_BYTES);
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "quick", json_boolean(o.quick));
    json_object_set_new(res, "rounds_overlap", json_integer(o.rounds));
    json_object_set_new(res, "rounds_ttft", json_integer(o.ttft_rounds));
    json_object_set_new(res, "gemm_threads", json_integer(o.gemm_threads));
    kvfe_set_gemm_threads(o.gemm_threads);
    double load[3];
    if (getloadavg(load, 3) == 3)
        bench_json_real(res, "loadavg_1min", load[0]);
    printf("kvf-bench connector: real, %ld cores, load average %.2f%s\n",
           sysconf(_SC_NPROCESSORS_ONLN), load[0], o.quick ? ", quick (TTFT on ref-tiny)" : "");
    if (want(&o, "pages")) {
        bench_progress("connector", "page moves against the single-thread ceiling");
        page_moves(PAGE_ROUNDS, sweep_buf, &pr);
        json_object_set_new(res, "rounds_pages", json_integer(PAGE_ROUNDS));
        print_pages(&pr);
        json_pages(res, &pr);
    }
    if ((want(&o, "overlap") || want(&o, "ttft")) &&
        bench_start_store(&store, o.store_bin, "3G", NULL) != 0)
        goto out_free_sweep;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", store.port);
    if (want(&o, "overlap")) {
        overlap(&o, store.port, sweep_buf, &ov);
        print_overlap(&ov);
        json_overlap(res, &ov);
        ok &= ov.ok && ov.identical;
    }
    if (want(&o, "ttft")) {
        json_object_set_new(res, "ttft_model", json_string(o.model));
        kvf_connector_stats cs = {0};
        ok &= ttft(&o, addr, rows, &cs) == 0;
        print_ttft(o.model, rows);
        json_ttft(res, rows, &cs);
        ok &= rows[0].identical && rows[1].identical;
        if (o.plot)
            plot_ttft(o.plot, o.model, rows);
    }
    bench_stop(&store);
    json_object_set_new(res, "transport",
                        json_string(used_transport[0] ? used_transport : "none (no connector)"));
    bench_emit(res, o.json);
    rc = ok ? 0 : 1;
out_free_sweep:
    free(sweep_buf);
out_decref_res:
    json_decref(res);
    return rc;
}
