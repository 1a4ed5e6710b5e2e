/*
 * kvf-bench store --sources (store_bench.h): prefetches that follow a plan's sources against
 * prefetches from each chunk's own node, in the same rounds (docs/scheduler.md, "The nearest
 * replica"). Two stores speak TCP only, as stores of other hosts would: A, reached through a link
 * of --link-gbps shared by its connections (bench/ratelink.c: a store in another zone), and B,
 * reached directly over loopback (a store in the engine's zone). The prompts' chunks are saved to
 * their own nodes (about half to A) and every one also to B (a replica, as a hot prefix has).
 * Each round prefetches every prompt three ways, through one connector on both stores:
 *
 * - own: kvf_connector_prefetch, each chunk from its own node (half over the slow link): the
 *   peer, what a connector without the plan does;
 * - named: kvf_connector_prefetch_from with the plan's sources naming B for every chunk;
 * - stale: a second set of prompts saved to their own nodes only, the sources still naming B:
 *   each chunk whose own node is A misses on B and is asked of A after (the cost of a plan whose
 *   source has lost the chunk), against the same prompts fetched as own.
 *
 * The same three ways for layerwise loads into the engine's pages, what an engine that finds
 * itself free does (one streamed GET: kvf_connector_load against kvf_connector_load_planned, a
 * stale plan's chunks asked of their own node in the same GET).
 *
 * Every prefetch and load must bring every chunk (a miss is an error). Ratios: own / named (the
 * gain of the zone-local replica at this link's rate) and stale / own (a stale plan's cost). Real
 * on this host; the link is a rate limit on loopback, not a network between zones.
 */
#include "store_bench.h"

#include "bench_util.h"
#include "ratelink.h"

#include "cpus.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROUNDS 11
#define PROMPTS    4
#define TOKENS     2048 /* a prompt's tokens: 8 chunks of 256 */

static void layout_of(kvf_layout *l)
{
    *l = (kvf_layout){0};
    snprintf(l->model_id, sizeof l->model_id, "bench-sources");
    l->layers = 8;
    l->kv_heads = 8;
    l->head_dim = 128;
    l->dtype = KVF_DTYPE_F16;
    l->kind = KVF_KV_SEPARATE;
    l->page_tokens = 16;
    l->chunk_tokens = 256;
    l->tp_size = 1;
}

typedef struct pages {
    uint8_t *mem[8][2];
    kvf_kv_layer lay[8];
} pages;

static int pages_init(pages *p, const kvf_layout *l, size_t n_pages)
{
    size_t page = (size_t)l->page_tokens * l->kv_heads * l->head_dim * 2;
    for (uint32_t i = 0; i < l->layers; i++) {
        for (int k = 0; k < 2; k++) {
            p->mem[i][k] = malloc(n_pages * page);
            if (!p->mem[i][k])
                return -1;
            for (size_t b = 0; b < n_pages * page; b++)
                p->mem[i][k][b] = (uint8_t)(b * 131 + i * 7 + (size_t)k);
        }
        p->lay[i] = (kvf_kv_layer){p->mem[i][0], p->mem[i][1], page, n_pages, KVF_MEM_HOST};
    }
    return 0;
}

static void pages_free(pages *p, const kvf_layout *l)
{
    for (uint32_t i = 0; i < l->layers; i++)
        free(p->mem[i][0]), free(p->mem[i][1]);
}

static kvf_connector *open_on(const char *const *nodes, size_t n, const kvf_layout *l, pages *p)
{
    kvf_connector_opts o = {.nodes = nodes,
                            .n_nodes = n,
                            .layout = *l,
                            .deadline_ms = 30000,
                            .stores_refresh_ms = -1,
                            .salt = "bench-sources"};
    kvf_connector *cn = NULL;
    char err[400];
    if (kvf_connector_open(&cn, &o, err, sizeof err) != 0 ||
        kvf_connector_register(cn, p->lay, l->layers, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench store --sources: connector: %s\n", err);
        kvf_connector_close(&cn);
        return NULL;
    }
    return cn;
}

static int save(kvf_connector *cn, const uint32_t *t, const uint32_t *ids, const kvf_layout *l)
{
    kvf_xfer *x;
    if (kvf_connector_save(cn, t, TOKENS, 0, ids, TOKENS / l->page_tokens, &x) != 0)
        return -1;
    for (uint32_t i = 0; i < l->layers; i++)
        kvf_xfer_layer_done(x, i);
    int rc = kvf_xfer_wait(x);
    kvf_xfer_free(&x);
    return rc;
}

/* Seconds to take every prompt of set (one after the other), with sources naming src_store for
 * all of it (NULL: none): prefetched into the prefetch's memory, or (load) loaded layer by layer
 * into the pages ids; *short_ counts those that did not bring every chunk. */
static double take_all(kvf_connector *cn, int load, uint32_t (*set)[TOKENS], const char *src_store,
                       const uint32_t *ids, size_t n_ids, int *short_)
{
    double t0 = bench_now();
    for (int i = 0; i < PROMPTS; i++) {
        kvf_source s = {.store = src_store, .from = 0, .tokens = TOKENS};
        size_t n_src = src_store ? 1 : 0, got = 0;
        if (load) {
            kvf_xfer *x = NULL;
            if (kvf_connector_load_planned(cn, set[i], TOKENS, 0, &s, n_src, ids, n_ids, &x) == 0 &&
                kvf_xfer_wait(x) == 0)
                got = kvf_xfer_loaded_tokens(x);
            kvf_xfer_free(&x);
        } else {
            kvf_prefetch *pf = NULL;
            if (kvf_connector_prefetch_from(cn, set[i], TOKENS, &s, n_src, &pf) == 0)
                got = kvf_prefetch_wait(pf, 0);
            kvf_prefetch_free(&pf);
        }
        *short_ += got != TOKENS;
    }
    return bench_now() - t0;
}

/* One way of taking the prompts (prefetches or layerwise loads), its rounds and its figures:
 * JSON keys start with key ("" or "load_"). */
typedef struct way {
    const char *key;
    int load, short_;
    double own[MAX_ROUNDS], named[MAX_ROUNDS], stale[MAX_ROUNDS], own2[MAX_ROUNDS];
    double gain[MAX_ROUNDS], cost[MAX_ROUNDS];
    bench_spread so, sn, ss, g, c;
} way;

/* Round r of way w: each chunk from its own node, from the replica B (named), a stale plan (the
 * cold prompts, B named) and the same cold prompts from their own nodes. */
static void way_round(way *w, int r, kvf_connector *cn, uint32_t (*hot)[TOKENS],
                      uint32_t (*cold)[TOKENS], const char *addr_b, const uint32_t *ids,
                      size_t n_ids)
{
    w->own[r] = take_all(cn, w->load, hot, NULL, ids, n_ids, &w->short_);
    w->named[r] = take_all(cn, w->load, hot, addr_b, ids, n_ids, &w->short_);
    w->stale[r] = take_all(cn, w->load, cold, addr_b, ids, n_ids, &w->short_);
    w->own2[r] = take_all(cn, w->load, cold, NULL, ids, n_ids, &w->short_);
    w->gain[r] = w->own[r] / w->named[r];
    w->cost[r] = w->stale[r] / w->own2[r];
}

static void way_json(way *w, json_t *res, int rounds)
{
    char k[64];
#define ROUNDS(name, v) \
    (snprintf(k, sizeof k, "%s" name, w->key), bench_json_rounds(res, k, v, (size_t)rounds))
    w->so = ROUNDS("own_nodes_s", w->own);
    w->sn = ROUNDS("named_replica_s", w->named);
    w->ss = ROUNDS("stale_plan_s", w->stale);
    ROUNDS("stale_own_nodes_s", w->own2);
    w->g = ROUNDS("own_vs_named", w->gain);
    w->c = ROUNDS("stale_vs_own", w->cost);
#undef ROUNDS
    snprintf(k, sizeof k, "short_%s", w->load ? "loads" : "prefetches");
    json_object_set_new(res, k, json_integer(w->short_));
}

int bench_store_sources(int quick, int store_threads, double link_gbps, const char *bin, int json,
                        json_t *res)
{
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "cores", json_integer(kvf__cores()));
    json_object_set_new(res, "link_gbps", json_real(link_gbps));
    json_object_set_new(res, "what",
                        json_string("prefetches and layerwise loads of 4 prompts of 2048 tokens "
                                    "(64 MiB each), each chunk from its own node (half of them "
                                    "behind a link of link_gbps: another zone) against the "
                                    "plan's sources naming a replica reached directly (the "
                                    "engine's zone), and a stale plan naming the replica for "
                                    "chunks it does not hold"));
    kvf_layout l;
    layout_of(&l);
    pages p = {0};
    bench_proc a = {0}, b = {0};
    bench_link *link = NULL;
    kvf_connector *cn = NULL, *cb = NULL;
    int rc = 1;
    char extra[160], addr_link[64], addr_b[64];
    snprintf(extra, sizeof extra, "--threads %d --rdma off --shm off", store_threads);
    if (pages_init(&p, &l, TOKENS / l.page_tokens) != 0) {
        fprintf(stderr, "kvf-bench store --sources: out of memory\n");
        goto out;
    }
    if (bench_start_store(&a, bin, "1G", extra) != 0 ||
        bench_start_store(&b, bin, "1G", extra) != 0)
        goto out;
    if (bench_link_start(&link, a.port) != 0)
        goto out;
    bench_link_set_rate(link, link_gbps * 1e9 / 8);
    snprintf(addr_link, sizeof addr_link, "127.0.0.1:%u", bench_link_port(link));
    snprintf(addr_b, sizeof addr_b, "127.0.0.1:%u", b.port);
    const char *both[2] = {addr_link, addr_b}, *only_b[1] = {addr_b};
    if (!(cn = open_on(both, 2, &l, &p)) || !(cb = open_on(only_b, 1, &l, &p)))
        goto out;
    static uint32_t hot[PROMPTS][TOKENS], cold[PROMPTS][TOKENS];
    uint32_t ids[TOKENS / 16];
    for (size_t i = 0; i < TOKENS / 16; i++)
        ids[i] = (uint32_t)i;
    bench_progress("store", "sources: saving 2 x %d prompts of %d tokens (%.0f MiB each)", PROMPTS,
                   TOKENS, (double)TOKENS * kvf_layout_bytes_per_token(&l) / (1 << 20));
    bench_link_set_rate(link, 0); /* the saves at loopback speed */
    for (int i = 0; i < PROMPTS; i++) {
        for (int t = 0; t < TOKENS; t++) {
            hot[i][t] = (uint32_t)(i * 100000 + t);
            cold[i][t] = (uint32_t)(7000000 + i * 100000 + t);
        }
        if (save(cn, hot[i], ids, &l) != 0 || save(cb, hot[i], ids, &l) != 0 ||
            save(cn, cold[i], ids, &l) != 0) {
            fprintf(stderr, "kvf-bench store --sources: a save failed\n");
            goto out;
        }
    }
    bench_link_set_rate(link, link_gbps * 1e9 / 8);
    int rounds = quick ? 5 : MAX_ROUNDS;
    static way pre, lay; /* large: off the stack */
    pre = (way){.key = ""};
    lay = (way){.key = "load_", .load = 1};
    size_t n_ids = TOKENS / l.page_tokens;
    kvf_connector_stats s0, s1;
    kvf_connector_stats_get(cn, &s0);
    for (int r = 0; r < rounds; r++) {
        way_round(&pre, r, cn, hot, cold, addr_b, ids, n_ids);
        way_round(&lay, r, cn, hot, cold, addr_b, ids, n_ids);
        bench_progress("store",
                       "sources round %d/%d: prefetch: own nodes %.1f ms, named replica %.1f ms "
                       "(%.2fx); stale plan %.1f ms against %.1f ms (%.2fx); layerwise load: "
                       "%.1f ms, %.1f ms (%.2fx); stale %.1f ms against %.1f ms (%.2fx)",
                       r + 1, rounds, pre.own[r] * 1e3, pre.named[r] * 1e3, pre.gain[r],
                       pre.stale[r] * 1e3, pre.own2[r] * 1e3, pre.cost[r], lay.own[r] * 1e3,
                       lay.named[r] * 1e3, lay.gain[r], lay.stale[r] * 1e3, lay.own2[r] * 1e3,
                       lay.cost[r]);
    }
    kvf_connector_stats_get(cn, &s1);
    way_json(&pre, res, rounds);
    way_json(&lay, res, rounds);
    uint64_t nm = s1.prefetch_named - s0.prefetch_named,
             ms = s1.prefetch_named_missed - s0.prefetch_named_missed;
    uint64_t lnm = s1.load_named - s0.load_named,
             lra = s1.load_named_reasked - s0.load_named_reasked;
    json_object_set_new(res, "chunks_named", json_integer((json_int_t)nm));
    json_object_set_new(res, "chunks_named_missed", json_integer((json_int_t)ms));
    json_object_set_new(res, "load_chunks_named", json_integer((json_int_t)lnm));
    json_object_set_new(res, "load_chunks_reasked", json_integer((json_int_t)lra));
    FILE *o = json ? stderr : stdout; /* with --json, stdout is the JSON alone */
    fprintf(o,
            "kvf-bench store --sources (%d cores, %d rounds, a link of %.1f Gb/s to A, "
            "medians [p10..p90]):\n",
            kvf__cores(), rounds, link_gbps);
    fprintf(o,
            "  4 prompts of 64 MiB, each chunk from its own node: %.1f ms; from the plan's "
            "replica: %.1f ms: %.2fx [%.2f..%.2f]\n",
            pre.so.median * 1e3, pre.sn.median * 1e3, pre.g.median, pre.g.p10, pre.g.p90);
    fprintf(o,
            "  a stale plan (the replica lacks the chunks whose own node is A): %.1f ms, "
            "%.2fx the own nodes' [%.2f..%.2f]\n",
            pre.ss.median * 1e3, pre.c.median, pre.c.p10, pre.c.p90);
    fprintf(o, "  chunks named %llu, not given by the named node %llu; prefetches short %d\n",
            (unsigned long long)nm, (unsigned long long)ms, pre.short_);
    fprintf(o,
            "  layerwise loads (an idle engine's): own nodes %.1f ms; from the plan's replica "
            "%.1f ms: %.2fx [%.2f..%.2f]\n",
            lay.so.median * 1e3, lay.sn.median * 1e3, lay.g.median, lay.g.p10, lay.g.p90);
    fprintf(o,
            "  a stale plan, asked again in the same load: %.1f ms, %.2fx the own nodes' "
            "[%.2f..%.2f]; chunks named %llu, asked again %llu; loads short %d\n",
            lay.ss.median * 1e3, lay.c.median, lay.c.p10, lay.c.p90, (unsigned long long)lnm,
            (unsigned long long)lra, lay.short_);
    rc = pre.short_ || lay.short_ ? 1 : 0;
out:
    kvf_connector_close(&cn);
    kvf_connector_close(&cb);
    bench_link_stop(&link);
    bench_stop(&b);
    bench_stop(&a);
    pages_free(&p, &l);
    return rc;
}
