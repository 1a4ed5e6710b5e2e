/*
 * kvf-bench connector: the connector against the memory ceiling, and the engine's time to first
 * token with kvfabric against a full recompute, in one run.
 *
 *   1. memcpy ceiling: 16 MiB copied from a random place of a 256 MiB pool;
 *   2. gather and scatter of 256 randomly placed 64 KiB pages of that pool (16 MiB), through the
 *      connector's page map, which is what every save and load does;
 *   3. a cached prefix loaded with layerwise overlap, without it (the whole load first), and the
 *      engine's compute alone: overlap efficiency = max(compute, transfer) / overlapped time;
 *   4. TTFT of kvf-engine at 2K and 8K tokens with 0%, 50% and 90% of the prompt cached in a local
 *      kvf-store, against a full recompute without kvfabric; logits are checked bit for bit.
 * --quick runs part 4 on ref-tiny instead of ref-100m (a ref-100m 8K recompute alone takes about
 * 35 s on two cores) and says so. Every figure is real: measured here, now.
 */
#include "bench.h"
#include "bench_util.h"
#include "engine.h"

#include "kvf/kvf.h"

#include "pagemap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct opts {
    int quick, json;
    const char *model;
    const char *store_bin;
    const char *plot;
} opts;

static uint64_t rng = 0x2545F4914F6CDD1Dull;

static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* ------------------------------------------------------------------------------------------ */
/* Page moves */

typedef struct pages_res {
    double memcpy_gbps, gather_gbps, scatter_gbps;
} pages_res;

static pages_res page_moves(double secs)
{
    /* One layer of a bf16 layout with 64 KiB pages: 32 tokens x 8 heads x 128 x 2 bytes. */
    kvf_layout l;
    kvf_layout_preset("llama-3.1-8b", &l);
    l.layers = 1;
    l.page_tokens = 32;
    l.chunk_tokens = 256;
    const uint32_t pool_pages = 2048; /* per plane: 2 x 128 MiB */
    const size_t page = 64 * 1024;
    kvf_kv_layer reg = {.k_base = malloc(pool_pages * page),
                        .v_base = malloc(pool_pages * page),
                        .page_stride = page,
                        .num_pages = pool_pages,
                        .kind = KVF_MEM_HOST};
    memset(reg.k_base, 1, pool_pages * page);
    memset(reg.v_base, 2, pool_pages * page);
    kvf__pagemap pm = {0};
    char err[200];
    kvf__pagemap_init(&pm, &l, &reg, 1, err, sizeof err);
    const size_t chunks = 16; /* 16 chunks x 16 pages (8 K + 8 V) = 256 pages = 16 MiB */
    uint8_t *dst = malloc(chunks * pm.seg_bytes);
    memset(dst, 3, chunks * pm.seg_bytes);
    uint32_t ids[16 * 8];
    pages_res r = {0};
    for (int what = 0; what < 3; what++) {
        uint64_t bytes = 0;
        double t0 = bench_now();
        int iters = 0;
        while (bench_now() < t0 + secs || iters < 3) {
            if (what == 0) {
                size_t off = (rnd() % (pool_pages - 256)) * page;
                memcpy(dst, (uint8_t *)reg.k_base + off, chunks * pm.seg_bytes);
            } else {
                for (size_t i = 0; i < chunks * 8; i++)
                    ids[i] = (uint32_t)(rnd() % pool_pages);
                for (size_t c = 0; c < chunks; c++) {
                    if (what == 1)
                        kvf__pagemap_gather(&pm, 0, dst + c * pm.seg_bytes, ids + c * 8);
                    else
                        kvf__pagemap_scatter(&pm, 0, dst + c * pm.seg_bytes, ids + c * 8);
                }
            }
            bytes += chunks * pm.seg_bytes;
            iters++;
        }
        double gbps = (double)bytes / (bench_now() - t0) / 1e9;
        if (what == 0)
            r.memcpy_gbps = gbps;
        else if (what == 1)
            r.gather_gbps = gbps;
        else
            r.scatter_gbps = gbps;
    }
    kvf__pagemap_free(&pm);
    free(reg.k_base);
    free(reg.v_base);
    free(dst);
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* Engine runs */

static void make_prompt(uint32_t *t, size_t n, uint32_t vocab)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t z = i * 0x9E3779B97F4A7C15ull + 12345;
        z ^= z >> 31;
        z *= 0xbf58476d1ce4e5b9ull;
        t[i] = (uint32_t)((z ^ (z >> 29)) % vocab);
    }
}

/* What the engine runs share: the model, the local kvf-store, the connector the engines load and
 * save through, and a client that clears and evicts chunks between runs. */
typedef struct env {
    const char *model;
    kvfe_model m;
    bench_proc store;
    kvf_connector *cn;
    kvf_client *cl;
} env;

/* Starts the local kvf-store (3 GiB; bin NULL: the one beside this binary) and opens the
 * connector and the client to it. Returns 0, or -1 with the reason on stderr and no store left
 * running. */
static int env_open(env *ev, const char *bin)
{
    kvf_keyspace ks;
    kvf_keyspace_init(&ks, &ev->m.layout, NULL, 0);
    kvf_client_opts clo = {.ns = ks.seed};
    if (bench_store_client_open("connector", &ev->store, bin, "3G", NULL, "127.0.0.1", &clo,
                                &ev->cl) != 0)
        return -1;
    char addr[64], err[256];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", ev->store.port);
    const char *nodes[1] = {addr};
    kvf_connector_opts co = {
        .nodes = nodes, .n_nodes = 1, .layout = ev->m.layout, .deadline_ms = 30000};
    if (kvf_connector_open(&ev->cn, &co, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench connector: %s\n", err);
        goto out_close_client;
    }
    return 0;
out_close_client:
    kvf_client_close(&ev->cl);
    bench_stop(&ev->store);
    return -1;
}

static void env_close(env *ev)
{
    kvf_client_close(&ev->cl);
    kvf_connector_close(&ev->cn);
    bench_stop(&ev->store);
}

static kvfe_engine *engine_new(env *ev, int with_cn, int no_overlap, uint32_t max_tokens)
{
    kvfe_opts o = {.model = ev->model,
                   .seed = 42,
                   .max_tokens = max_tokens,
                   .cn = with_cn ? ev->cn : NULL,
                   .save = 1,
                   .page_shuffle = 11,
                   .no_overlap = no_overlap};
    kvfe_engine *e = NULL;
    char err[256];
    if (kvfe_open(&e, &o, err, sizeof err) != 0)
        fprintf(stderr, "kvf-bench connector: %s\n", err);
    return e;
}

/* Evicts the chunks of t[0..n) from index `from` on, so that exactly `from` chunks stay cached. */
static void keep_chunks(env *ev, const uint32_t *t, size_t n, size_t from)
{
    kvf_keyspace ks;
    kvf_keyspace_init(&ks, &ev->m.layout, NULL, 0);
    size_t nc = n / ev->m.layout.chunk_tokens, nk;
    kvf_key *k = malloc(nc * sizeof *k);
    int *st = malloc(nc * sizeof *st);
    kvf_keys_compute(&ks, t, n, k, nc, &nk, NULL);
    if (nk > from)
        kvf_client_evict(ev->cl, nk - from, k + from, st, 10000);
    free(k);
    free(st);
}

typedef struct ttft_row {
    size_t n;
    double full_s, t0_s, t50_s, t90_s;
    size_t loaded50, loaded90;
    int identical;
} ttft_row;

static double prefill(kvfe_engine *e, const uint32_t *t, size_t n, float *logits, size_t *loaded,
                      kvfe_result *out)
{
    kvfe_result r;
    kvfe_prefill(e, t, n, &r);
    if (logits)
        memcpy(logits, r.logits, sizeof(float) * 512);
    if (loaded)
        *loaded = r.loaded_tokens;
    if (out)
        *out = r;
    double s = r.seconds;
    kvfe_flush(e); /* the save is off the critical path; wait for it before the next run */
    return s;
}

static ttft_row ttft(env *ev, size_t n)
{
    ttft_row row = {.n = n, .identical = 1};
    uint32_t *t = malloc(n * sizeof *t);
    make_prompt(t, n, ev->m.vocab);
    size_t C = ev->m.layout.chunk_tokens, nc = n / C;
    float ref[512], got[512];
    kvf_client_clear(ev->cl, NULL, 10000);
    kvfe_engine *plain = engine_new(ev, 0, 0, (uint32_t)n + 8);
    bench_progress("connector", "%s, %zu tokens: full recompute without kvfabric", ev->model, n);
    row.full_s = prefill(plain, t, n, ref, NULL, NULL);
    kvfe_close(&plain);
    kvfe_engine *e = engine_new(ev, 1, 0, (uint32_t)n + 8);
    bench_progress("connector", "%s, %zu tokens: 0%% cached (saves every chunk)", ev->model, n);
    row.t0_s = prefill(e, t, n, got, NULL, NULL);
    row.identical &= !memcmp(ref, got, sizeof ref);
    keep_chunks(ev, t, n, nc / 2);
    bench_progress("connector", "%s, %zu tokens: 50%% cached", ev->model, n);
    row.t50_s = prefill(e, t, n, got, &row.loaded50, NULL);
    row.identical &= !memcmp(ref, got, sizeof ref);
    keep_chunks(ev, t, n, nc * 9 / 10);
    bench_progress("connector", "%s, %zu tokens: 90%% cached", ev->model, n);
    row.t90_s = prefill(e, t, n, got, &row.loaded90, NULL);
    row.identical &= !memcmp(ref, got, sizeof ref);
    kvfe_close(&e);
    free(t);
    return row;
}

typedef struct overlap_res {
    double overlapped_s, serial_s, transfer_s, compute_s, efficiency;
    size_t tokens, cached;
} overlap_res;

/* The 90%-cached prompt three ways: layerwise overlap; the whole load first (its wait is the
 * transfer time, its compute the compute time). */
static overlap_res overlap(env *ev, size_t n)
{
    overlap_res o = {.tokens = n};
    uint32_t *t = malloc(n * sizeof *t);
    make_prompt(t, n, ev->m.vocab);
    size_t nc = n / ev->m.layout.chunk_tokens;
    kvfe_engine *warm = engine_new(ev, 1, 0, (uint32_t)n + 8);
    prefill(warm, t, n, NULL, NULL, NULL);
    kvfe_close(&warm);
    kvfe_engine *ov = engine_new(ev, 1, 0, (uint32_t)n + 8);
    kvfe_engine *se = engine_new(ev, 1, 1, (uint32_t)n + 8);
    double best_ov = 1e9, best_se = 1e9, tr = 1e9, co = 1e9;
    for (int rep = 0; rep < 3; rep++) {
        kvfe_result r;
        keep_chunks(ev, t, n, nc * 9 / 10);
        double s = prefill(ov, t, n, NULL, &o.cached, &r);
        if (s < best_ov)
            best_ov = s;
        keep_chunks(ev, t, n, nc * 9 / 10);
        s = prefill(se, t, n, NULL, NULL, &r);
        if (s < best_se) {
            best_se = s;
            tr = r.wait_seconds;
            co = r.compute_seconds;
        }
    }
    o.overlapped_s = best_ov;
    o.serial_s = best_se;
    o.transfer_s = tr;
    o.compute_s = co;
    o.efficiency = (tr > co ? tr : co) / best_ov;
    kvfe_close(&ov);
    kvfe_close(&se);
    free(t);
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* Options and reporting */

static void usage(void)
{
    fprintf(stderr, "usage: kvf-bench connector [--quick] [--json] [--model ref-tiny|ref-100m] "
                    "[--store-bin PATH] [--plot FILE.png]\n");
}

/* Reads the options into o; the model follows --quick unless named. Returns 0, or -1 with the
 * usage on stderr. */
static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){.model = NULL};
    const bench_opt table[] = {
        {"--quick", BENCH_OPT_FLAG, .flag = &o->quick},
        {"--json", BENCH_OPT_FLAG, .flag = &o->json},
        {"--model", BENCH_OPT_STR, .str = &o->model},
        {"--store-bin", BENCH_OPT_STR, .str = &o->store_bin},
        {"--plot", BENCH_OPT_STR, .str = &o->plot},
    };
    const char *unknown;
    if (bench_opts_parse("connector", table, sizeof table / sizeof table[0], argc, argv,
                         &unknown) != 0) {
        usage();
        return -1;
    }
    if (!o->model)
        o->model = o->quick ? "ref-tiny" : "ref-100m";
    return 0;
}

static void print_report(const opts *o, const pages_res *pr, const overlap_res *ov,
                         const ttft_row rows[2])
{
    printf("kvf-bench connector: real, %ld cores%s\n", sysconf(_SC_NPROCESSORS_ONLN),
           o->quick ? ", quick (TTFT on ref-tiny)" : "");
    printf("  %-44s %7.2f GB/s\n", "memcpy ceiling, 16 MiB", pr->memcpy_gbps);
    printf("  %-44s %7.2f GB/s   %.2f x memcpy\n", "gather, 256 random 64 KiB pages",
           pr->gather_gbps, pr->gather_gbps / pr->memcpy_gbps);
    printf("  %-44s %7.2f GB/s   %.2f x memcpy\n", "scatter, 256 random 64 KiB pages",
           pr->scatter_gbps, pr->scatter_gbps / pr->memcpy_gbps);
    printf("  %s, %zu tokens, %zu cached:\n", o->model, ov->tokens, ov->cached);
    printf("    %-42s %7.1f ms\n", "prefill with layerwise overlap", ov->overlapped_s * 1e3);
    printf("    %-42s %7.1f ms (transfer %.1f ms + compute %.1f ms)\n",
           "prefill with the whole load first", ov->serial_s * 1e3, ov->transfer_s * 1e3,
           ov->compute_s * 1e3);
    printf("    %-42s %7.2f\n", "overlap efficiency", ov->efficiency);
    printf("  TTFT of kvf-engine %s (speedup against a full recompute):\n", o->model);
    printf("    %-8s %12s %12s %12s %12s %10s\n", "tokens", "recompute", "0% cached", "50% cached",
           "90% cached", "identical");
    for (int i = 0; i < 2; i++)
        printf("    %-8zu %10.0f ms %6.0f (%4.2fx) %6.0f (%4.2fx) %6.0f (%4.2fx) %10s\n", rows[i].n,
               rows[i].full_s * 1e3, rows[i].t0_s * 1e3, rows[i].full_s / rows[i].t0_s,
               rows[i].t50_s * 1e3, rows[i].full_s / rows[i].t50_s, rows[i].t90_s * 1e3,
               rows[i].full_s / rows[i].t90_s, rows[i].identical ? "yes" : "NO");
}

/* The TTFT bars of both prompt sizes to png; says so on stdout once written. */
static void plot_ttft(const char *png, const char *model, const ttft_row rows[2])
{
    const char *labels[] = {"recompute 2K", "50% cached 2K", "90% cached 2K",
                            "recompute 8K", "50% cached 8K", "90% cached 8K"};
    double vals[] = {rows[0].full_s * 1e3, rows[0].t50_s * 1e3, rows[0].t90_s * 1e3,
                     rows[1].full_s * 1e3, rows[1].t50_s * 1e3, rows[1].t90_s * 1e3};
    int groups[] = {0, 1, 1, 0, 1, 1};
    char title[160];
    snprintf(title, sizeof title,
             "kvf-engine %s time to first token, real (recompute grey, kvfabric blue)", model);
    if (bench_plot_bars(png, title, "TTFT (ms)", labels, vals, groups, 6) == 0)
        printf("  plot: %s\n", png);
}

static void add_figures(json_t *res, const pages_res *pr, const overlap_res *ov,
                        const ttft_row rows[2], const kvf_connector_stats *cs)
{
    bench_json_real(res, "memcpy_gbps", pr->memcpy_gbps);
    bench_json_real(res, "gather_gbps", pr->gather_gbps);
    bench_json_real(res, "scatter_gbps", pr->scatter_gbps);
    bench_json_real(res, "gather_vs_memcpy", pr->gather_gbps / pr->memcpy_gbps);
    bench_json_real(res, "scatter_vs_memcpy", pr->scatter_gbps / pr->memcpy_gbps);
    bench_json_real(res, "overlap_prefill_ms", ov->overlapped_s * 1e3);
    bench_json_real(res, "serial_prefill_ms", ov->serial_s * 1e3);
    bench_json_real(res, "transfer_ms", ov->transfer_s * 1e3);
    bench_json_real(res, "compute_ms", ov->compute_s * 1e3);
    bench_json_real(res, "overlap_efficiency", ov->efficiency);
    const char *sz[2] = {"2k", "8k"};
    for (int i = 0; i < 2; i++) {
        char k[64];
        snprintf(k, sizeof k, "ttft_full_ms_%s", sz[i]);
        bench_json_real(res, k, rows[i].full_s * 1e3);
        snprintf(k, sizeof k, "ttft_0pct_ms_%s", sz[i]);
        bench_json_real(res, k, rows[i].t0_s * 1e3);
        snprintf(k, sizeof k, "ttft_50pct_ms_%s", sz[i]);
        bench_json_real(res, k, rows[i].t50_s * 1e3);
        snprintf(k, sizeof k, "ttft_90pct_ms_%s", sz[i]);
        bench_json_real(res, k, rows[i].t90_s * 1e3);
        snprintf(k, sizeof k, "ttft_speedup_0pct_%s", sz[i]);
        bench_json_real(res, k, rows[i].full_s / rows[i].t0_s);
        snprintf(k, sizeof k, "ttft_speedup_50pct_%s", sz[i]);
        bench_json_real(res, k, rows[i].full_s / rows[i].t50_s);
        snprintf(k, sizeof k, "ttft_speedup_90pct_%s", sz[i]);
        bench_json_real(res, k, rows[i].full_s / rows[i].t90_s);
        snprintf(k, sizeof k, "logits_identical_%s", sz[i]);
        json_object_set_new(res, k, json_boolean(rows[i].identical));
    }
    json_object_set_new(res, "connector_batches", json_integer((json_int_t)cs->batches));
    json_object_set_new(res, "connector_load_bytes", json_integer((json_int_t)cs->load_bytes));
    json_object_set_new(res, "connector_save_bytes", json_integer((json_int_t)cs->save_bytes));
}

/* ------------------------------------------------------------------------------------------ */

int bench_connector_main(int argc, char **argv)
{
    opts o;
    if (parse(argc, argv, &o) != 0)
        return 2;
    env ev = {.model = o.model};
    if (kvfe_model_preset(o.model, &ev.m) != 0) {
        fprintf(stderr, "kvf-bench connector: unknown model %s\n", o.model);
        return 2;
    }
    int rc = 1;
    json_t *res = bench_result_new("connector");
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "quick", json_boolean(o.quick));
    json_object_set_new(res, "ttft_model", json_string(o.model));
    json_object_set_new(res, "transport", json_string("tcp"));

    bench_progress("connector", "memcpy, gather and scatter of 256 random 64 KiB pages");
    pages_res pr = page_moves(o.quick ? 1.0 : 3.0);
    if (env_open(&ev, o.store_bin) != 0)
        goto out_decref_res;
    overlap_res ov = overlap(&ev, 2048);
    ttft_row rows[2] = {ttft(&ev, 2048), ttft(&ev, 8192)};
    kvf_connector_stats cs;
    kvf_connector_stats_get(ev.cn, &cs);
    env_close(&ev);

    print_report(&o, &pr, &ov, rows);
    if (o.plot)
        plot_ttft(o.plot, o.model, rows);
    add_figures(res, &pr, &ov, rows, &cs);
    bench_emit(res, o.json);
    rc = rows[0].identical && rows[1].identical ? 0 : 1;
out_decref_res:
    json_decref(res);
    return rc;
}
