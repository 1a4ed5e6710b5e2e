/*
 * kvf-bench save: a prefill's save beside its forward pass, put in parts as its layers are
 * gathered (kvf_client_put_parts) against the same save put whole once its last layer is in
 * (kvf_connector_opts.save_whole), over TCP to a kvf-store on loopback, in alternating rounds.
 *
 * The pass is simulated: layer l is reported done pass_ms / layers after layer l - 1, the engine's
 * thread sleeping meanwhile, as a GPU's pass leaves the host's cores to the data path. What is
 * real is everything the save does: the connector's gathers from the engine's pages (host memory
 * here), the checksums, the storage client's requests and the node's receiving, verifying and
 * committing. The figure is the save's tail: from the last layer reported to the save complete
 * (every chunk committed on the node), the time a disaggregated prefill waits before it can hand
 * its KV over; its ceiling is 0. Each round saves new tokens, and every round's chunks are then
 * read back and compared with the engine's pages byte for byte.
 */
#include "bench.h"
#include "bench_util.h"

#include "kvf/kvf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_ROUNDS 64

typedef struct opts {
    int tokens, rounds, pass_ms, layers, quick, json;
    const char *store_bin, *transport;
} opts;

static int parse(int argc, char **argv, opts *o)
{
    const kvf__arg args[] = {
        KVF__OPT("tokens", KVF__ARG_INT, &o->tokens, "N",
                 "the prompt's tokens saved per round (a multiple of 256)",
                 "2048; 1024 with --quick", .lo = 256, .hi = 65536),
        KVF__OPT("layers", KVF__ARG_INT, &o->layers, "N",
                 "layers of the model shape (8 KV heads of 128, bf16)", "32", .lo = 2, .hi = 128),
        KVF__OPT("pass-ms", KVF__ARG_INT, &o->pass_ms, "MS",
                 "the simulated forward pass, its layers evenly spaced", "150", .lo = 0,
                 .hi = 60000),
        KVF__OPT("rounds", KVF__ARG_INT, &o->rounds, "N",
                 "rounds of each way, alternating (medians reported)", "9; 3 with --quick", .lo = 1,
                 .hi = MAX_ROUNDS),
        KVF__OPT("transport", KVF__ARG_STR, &o->transport, "T",
                 "tcp (the store serves no shared memory) or shm (it does: whole saves go through "
                 "staging regions, parts over its Unix socket)",
                 "tcp"),
        KVF__OPT("store-bin", KVF__ARG_STR, &o->store_bin, "PATH", "kvf-store to run",
                 "the one beside kvf-bench"),
        KVF__OPT("quick", KVF__ARG_FLAG, &o->quick, NULL, "smaller and fewer (CI)", NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
    };
    int rc = bench_args("save", "[OPTIONS]",
                        "A prefill's save beside its (simulated) forward pass, to a store on this "
                        "host: put in parts as its layers are gathered against put whole after the "
                        "last one, alternating rounds; the save's tail after the pass "
                        "(docs/benchmarks.md).",
                        NULL, args, sizeof args / sizeof args[0], argc, argv);
    if (rc == 0 && o->quick) {
        o->tokens = o->tokens == 2048 ? 1024 : o->tokens;
        o->rounds = o->rounds == 9 ? 3 : o->rounds;
    }
    if (rc == 0 && strcmp(o->transport, "tcp") != 0 && strcmp(o->transport, "shm") != 0) {
        fprintf(stderr, "kvf-bench save: --transport must be tcp or shm, not \"%s\"\n",
                o->transport);
        return -1;
    }
    if (rc == 0 && o->tokens % 256) {
        fprintf(stderr, "kvf-bench save: --tokens must be a multiple of 256\n");
        return -1;
    }
    return rc;
}

static kvf_layout shape(int layers)
{
    kvf_layout l = {0};
    snprintf(l.model_id, sizeof l.model_id, "bench-save-%dl", layers);
    l.layers = (uint32_t)layers;
    l.kv_heads = 8;
    l.head_dim = 128;
    l.dtype = KVF_DTYPE_BF16;
    l.kind = KVF_KV_SEPARATE;
    l.page_tokens = 16;
    l.chunk_tokens = 256;
    l.tp_size = 1;
    return l;
}

static void sleep_s(double s)
{
    if (s <= 0)
        return;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

typedef struct pages {
    size_t page, n_pages;
    uint8_t **k, **v, **kd, **vd; /* per layer: the engine's pages, and a load's */
    kvf_kv_layer *src, *dst;
} pages;

static int pages_make(pages *p, const kvf_layout *l, size_t n_pages)
{
    p->page = (size_t)l->page_tokens * l->kv_heads * l->head_dim * 2;
    p->n_pages = n_pages;
    size_t L = l->layers, bytes = n_pages * p->page;
    p->k = calloc(L, sizeof *p->k);
    p->v = calloc(L, sizeof *p->v);
    p->kd = calloc(L, sizeof *p->kd);
    p->vd = calloc(L, sizeof *p->vd);
    p->src = calloc(L, sizeof *p->src);
    p->dst = calloc(L, sizeof *p->dst);
    if (!p->k || !p->v || !p->kd || !p->vd || !p->src || !p->dst)
        return -1;
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < L; i++) {
        p->k[i] = malloc(bytes);
        p->v[i] = malloc(bytes);
        p->kd[i] = malloc(bytes);
        p->vd[i] = malloc(bytes);
        if (!p->k[i] || !p->v[i] || !p->kd[i] || !p->vd[i])
            return -1;
        for (size_t j = 0; j < bytes; j += 8) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            memcpy(p->k[i] + j, &x, 8);
            uint64_t y = x * 0xbf58476d1ce4e5b9ull;
            memcpy(p->v[i] + j, &y, 8);
        }
        p->src[i] = (kvf_kv_layer){p->k[i], p->v[i], p->page, n_pages, KVF_MEM_HOST};
        p->dst[i] = (kvf_kv_layer){p->kd[i], p->vd[i], p->page, n_pages, KVF_MEM_HOST};
    }
    return 0;
}

static void pages_free(pages *p, size_t L)
{
    for (size_t i = 0; p->k && i < L; i++) {
        free(p->k[i]);
        free(p->v[i]);
        free(p->kd[i]);
        free(p->vd[i]);
    }
    free(p->k);
    free(p->v);
    free(p->kd);
    free(p->vd);
    free(p->src);
    free(p->dst);
}

/* One save beside a simulated pass: the tail (s) after the last layer, or -1 on failure. Then
 * every chunk is loaded back and compared (*wrong counts pages that differ). */
static double one_save(kvf_connector *cn, const opts *o, pages *pg, const uint32_t *tokens,
                       const uint32_t *ids, size_t *wrong)
{
    char err[300];
    size_t n = (size_t)o->tokens, np = n / 16;
    if (kvf_connector_register(cn, pg->src, (size_t)o->layers, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench save: register: %s\n", err);
        return -1;
    }
    kvf_xfer *x;
    if (kvf_connector_save(cn, tokens, n, 0, ids, np, &x) != 0)
        return -1;
    double step = o->pass_ms / 1000.0 / o->layers;
    for (int l = 0; l < o->layers; l++) {
        sleep_s(step);
        if (kvf_xfer_layer_done(x, (uint32_t)l) != 0)
            return -1;
    }
    double t_last = bench_now();
    int rc = kvf_xfer_wait(x);
    double tail = bench_now() - t_last;
    kvf_xfer_free(&x);
    if (rc) {
        fprintf(stderr, "kvf-bench save: the save failed: %s\n", kvf_strerror(rc));
        return -1;
    }
    /* read back outside the figure */
    if (kvf_connector_register(cn, pg->dst, (size_t)o->layers, err, sizeof err) != 0 ||
        kvf_connector_load(cn, tokens, n, ids, np, &x) != 0)
        return -1;
    (void)kvf_xfer_wait(x);
    size_t got = kvf_xfer_loaded_tokens(x);
    kvf_xfer_free(&x);
    if (got != n) {
        fprintf(stderr, "kvf-bench save: %zu of %zu tokens came back\n", got, n);
        return -1;
    }
    for (int l = 0; l < o->layers; l++)
        for (size_t i = 0; i < np; i++) {
            size_t off = (size_t)ids[i] * pg->page;
            *wrong += memcmp(pg->k[l] + off, pg->kd[l] + off, pg->page) != 0;
            *wrong += memcmp(pg->v[l] + off, pg->vd[l] + off, pg->page) != 0;
        }
    return tail;
}

int bench_save_main(int argc, char **argv)
{
    opts o = {.tokens = 2048, .rounds = 9, .pass_ms = 150, .layers = 32, .transport = "tcp"};
    int prc = parse(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    kvf_layout l = shape(o.layers);
    char err[300];
    if (kvf_layout_validate(&l, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench save: %s\n", err);
        return 2;
    }
    size_t np = (size_t)o.tokens / 16;
    pages pg = {0};
    if (pages_make(&pg, &l, np) != 0) {
        fprintf(stderr, "kvf-bench save: out of memory\n");
        pages_free(&pg, (size_t)o.layers);
        return 1;
    }
    uint64_t save_bytes = (uint64_t)np * pg.page * 2 * (uint64_t)o.layers;
    char mem[32];
    /* room for three saves: the warm-up rounds cycle through all of it (a node's arena is
     * touched once, at first use) */
    snprintf(mem, sizeof mem, "%lluM", (unsigned long long)(3 * save_bytes >> 20) + 64);
    bench_proc st = {0};
    /* tcp: a store on this host would otherwise be reached over shared memory */
    int shm = strcmp(o.transport, "shm") == 0;
    if (bench_start_store(&st, o.store_bin, mem, shm ? "" : "--shm off") != 0) {
        pages_free(&pg, (size_t)o.layers);
        return 1;
    }
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", st.port);
    const char *nodes[] = {addr};
    kvf_connector *cn[2] = {NULL, NULL}; /* 0: in parts, 1: whole */
    int rc = 0;
    for (int w = 0; w < 2 && !rc; w++) {
        kvf_connector_opts co = {.nodes = nodes,
                                 .n_nodes = 1,
                                 .layout = l,
                                 .deadline_ms = 20000,
                                 .salt = w ? "bench-save-whole" : "bench-save-parts",
                                 .save_whole = w,
                                 .save_parts_shm = 1};
        if (kvf_connector_open(&cn[w], &co, err, sizeof err) != 0) {
            fprintf(stderr, "kvf-bench save: connector: %s\n", err);
            rc = 1;
        }
    }
    uint32_t *tokens = malloc((size_t)o.tokens * sizeof *tokens);
    uint32_t *ids = malloc(np * sizeof *ids);
    double tails[2][MAX_ROUNDS];
    size_t wrong = 0;
    int done = 0;
    if (!tokens || !ids)
        rc = 1;
    for (size_t i = 0; !rc && i < np; i++)
        ids[i] = (uint32_t)((i * 7919u) % np); /* the engine's pages in no order */
    bench_progress("save", "%d tokens, %d layers (%.1f MiB a save), a pass of %d ms, %d rounds",
                   o.tokens, o.layers, (double)save_bytes / 1048576.0, o.pass_ms, o.rounds);
    enum { WARM = 2 }; /* rounds of both ways not counted */
    for (int r = 1 - WARM; !rc && r < o.rounds + 1; r++) {
        for (int k = 0; k < 2 && !rc; k++) {
            int w = (r + WARM + k) % 2; /* alternating which goes first */
            for (int i = 0; i < o.tokens; i++)
                tokens[i] = (uint32_t)((r + WARM) * 1000003 + w * 500009 + i);
            double t = one_save(cn[w], &o, &pg, tokens, ids, &wrong);
            if (t < 0)
                rc = 1;
            else if (r > 0)
                tails[w][r - 1] = t;
        }
        if (!rc && r > 0) {
            done = r;
            bench_progress("save", "round %d: tail %.1f ms in parts, %.1f ms whole", r,
                           tails[0][r - 1] * 1e3, tails[1][r - 1] * 1e3);
        }
    }
    kvf_connector_stats cs[2] = {{0}};
    for (int w = 0; w < 2; w++)
        if (cn[w])
            kvf_connector_stats_get(cn[w], &cs[w]);
    /* With no pass every layer is reported at once and the connector puts the save whole
     * (nothing to overlap): the "in parts" rounds are then whole too. */
    if (!rc && ((o.pass_ms > 0 && cs[0].saves_in_parts == 0) || cs[1].saves_in_parts != 0)) {
        fprintf(stderr,
                "kvf-bench save: the saves did not go the ways asked (%llu in parts, %llu)\n",
                (unsigned long long)cs[0].saves_in_parts, (unsigned long long)cs[1].saves_in_parts);
        rc = 1;
    }
    if (!rc && wrong) {
        fprintf(stderr, "kvf-bench save: %zu pages came back wrong\n", wrong);
        rc = 1;
    }
    if (!rc) {
        double ratio[MAX_ROUNDS];
        for (int i = 0; i < done; i++)
            ratio[i] = tails[1][i] > 0 ? tails[0][i] / tails[1][i] : 0;
        json_t *res = bench_result_new("save");
        json_object_set_new(res, "label", json_string("real"));
        json_object_set_new(res, "pass", json_string("simulated (a sleep per layer)"));
        json_object_set_new(res, "transport",
                            json_string(shm ? "shm (whole: staging regions; parts: the node's Unix "
                                              "socket)"
                                            : "tcp (loopback)"));
        bench_json_real(res, "tokens", o.tokens);
        bench_json_real(res, "layers", o.layers);
        bench_json_real(res, "save_mib", (double)save_bytes / 1048576.0);
        bench_json_real(res, "pass_ms", o.pass_ms);
        for (int w = 0; w < 2; w++) /* in ms */
            for (int i = 0; i < done; i++)
                tails[w][i] *= 1e3;
        bench_spread a = bench_json_rounds(res, "save_tail_parts_ms", tails[0], (size_t)done);
        bench_spread b = bench_json_rounds(res, "save_tail_whole_ms", tails[1], (size_t)done);
        bench_spread q = bench_json_rounds(res, "tail_parts_vs_whole", ratio, (size_t)done);
        /* a prefill's time from its pass's start to its KV stored, with the pass's length */
        bench_json_real(res, "request_parts_vs_whole",
                        (o.pass_ms + a.median) / (o.pass_ms + b.median));
        bench_json_real(res, "pages_wrong", (double)wrong);
        bench_json_real(res, "saves_in_parts", (double)cs[0].saves_in_parts);
        bench_json_real(res, "saves_whole", (double)cs[1].saves);
        if (!o.json)
            printf("save beside a %d ms pass, %d tokens x %d layers (%.0f MiB), %s, %d rounds:\n"
                   "  tail after the last layer: in parts %.1f ms, whole %.1f ms; ratio %.2f "
                   "(p10-p90 %.2f-%.2f)\n"
                   "  pages compared: 0 wrong\n",
                   o.pass_ms, o.tokens, o.layers, (double)save_bytes / 1048576.0,
                   shm ? "shared memory" : "TCP", done, a.median, b.median, q.median, q.p10, q.p90);
        bench_emit(res, o.json);
        json_decref(res);
    }
    for (int w = 0; w < 2; w++)
        kvf_connector_close(&cn[w]);
    free(tokens);
    free(ids);
    bench_stop(&st);
    pages_free(&pg, (size_t)o.layers);
    return rc;
}
