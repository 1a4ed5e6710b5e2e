/*
 * kvf-bench connector --device cuda: KV pages in GPU memory (docs/cuda.md), each figure against
 * the physical ceiling measured in the same round, one contiguous copy between pinned host
 * memory and the device:
 *   1. copies: 256 scattered 64 KiB pages and 1,024 scattered 16 KiB pages, device to pinned
 *      staging and back, through the copier the connector's workers use (the copy engine for
 *      64 KiB pages, the page-copy kernel below); and a sweep of page sizes over both paths, the
 *      measurements behind the rule that picks one;
 *   2. a same-host kvf-store (shared memory) to GPU pages: 1 GiB of KV of a Llama-3.1-8B-shaped
 *      layout (32 layers, 8 KV heads x 128, bf16, 64 KiB pages), saved from device pages and
 *      loaded back into others, every byte compared once;
 *   3. overlap: the same load, layer by layer, while a real matmul per layer runs on the engine's
 *      stream; efficiency = max(compute alone, transfer alone) / both.
 * Real: every figure is measured on this host's GPU. Where no CUDA runtime or device is found the
 * benchmark says so and exits 2.
 */
#include "bench.h"
#include "bench_util.h"

#include "kvf/kvf.h"
#include "kvf/cuda.h"

#include "cu.h"
#include "cucopy.h"
#include "cukernel.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    MAXR = 64,
    POOL = 4096, /* device pages in the copy part's pool */
    SWEEP_BYTES = 16 << 20,
    KV_TOKENS = 8192,
    MM_N = 1024,
};

static const kvf__cu *cu;
static uint64_t rng = 0x2545F4914F6CDD1Dull;

static uint64_t rnd(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ull;
}

#define CK(call)                                                                           \
    do {                                                                                   \
        int e_ = (call);                                                                   \
        if (e_) {                                                                          \
            fprintf(stderr, "kvf-bench connector: %s: %s\n", #call, cu->GetErrorName(e_)); \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* 1. Copies */

/* n distinct random pages of page_bytes out of the pool at dev. */
static void pick(void **pages, size_t n, uint8_t *dev, size_t pool_pages, size_t page_bytes)
{
    uint32_t *ids = malloc(pool_pages * sizeof *ids);
    for (size_t i = 0; i < pool_pages; i++)
        ids[i] = (uint32_t)i;
    for (size_t i = pool_pages - 1; i > 0; i--) {
        size_t j = rnd() % (i + 1);
        uint32_t t = ids[i];
        ids[i] = ids[j];
        ids[j] = t;
    }
    for (size_t i = 0; i < n; i++)
        pages[i] = dev + (size_t)ids[i] * page_bytes;
    free(ids);
}

/* Seconds to move n pages between host (contiguous, in groups of 16 pages: a chunk's segment)
 * and the scattered device pages, through the copier. */
static double copier_s(kvf__cucopy *cc, kvf__cudir dir, uint8_t *host, void **pages, size_t n,
                       size_t pb, int kernel)
{
    double t0 = bench_now();
    int rc = kvf__cucopy_begin(cc, dir, pb, kernel);
    for (size_t g = 0; g < n && !rc; g += 16)
        rc = kvf__cucopy_group(cc, host + g * pb, pages + g, n - g < 16 ? n - g : 16);
    if (!rc)
        rc = kvf__cucopy_end(cc);
    if (rc) {
        fprintf(stderr, "kvf-bench connector: copier: %s\n", cc->errmsg);
        exit(1);
    }
    return bench_now() - t0;
}

/* Seconds of one contiguous copy of n bytes. */
static double contig_s(kvf__custream s, void *dst, const void *src, size_t n)
{
    double t0 = bench_now();
    CK(cu->MemcpyAsync(dst, src, n, KVF__CU_MEMCPY_DEFAULT, s));
    CK(cu->StreamSynchronize(s));
    return bench_now() - t0;
}

typedef struct copies_res {
    int rounds;
    double ceil_d2h[MAXR], ceil_h2d[MAXR];
    double d2h64[MAXR], h2d64[MAXR], d2h16[MAXR], h2d16[MAXR]; /* ratios to the ceiling */
    double d2h16_ce[MAXR], h2d64_k[MAXR];                      /* the other path, same sizes */
    uint64_t kernels64, kernels16;
} copies_res;

/* The mode the connector picks for pages of pb bytes in registered (mapped) host memory. */
static int mode_of(size_t pb)
{
    return kvf__cucopy_rule(pb) ? KVF__CUCOPY_DIRECT : KVF__CUCOPY_ENGINE;
}

static void copies(int rounds, copies_res *r, json_t *sweep)
{
    size_t total = 16 << 20;
    uint8_t *dev64 = NULL, *dev16 = NULL, *host = NULL, *dcontig = NULL;
    CK(cu->Malloc((void **)&dev64, (size_t)POOL * 65536));
    CK(cu->Malloc((void **)&dev16, (size_t)POOL * 16384));
    CK(cu->Malloc((void **)&dcontig, total));
    CK(cu->HostAlloc((void **)&host, total,
                     KVF__CU_HOST_ALLOC_PORTABLE | KVF__CU_HOST_ALLOC_MAPPED));
    memset(host, 7, total);
    kvf__custream s;
    CK(cu->StreamCreateWithFlags(&s, KVF__CU_STREAM_NON_BLOCKING));
    kvf__cucopy cc;
    char err[300];
    if (kvf__cucopy_init(&cc, cu, 0, NULL, err, sizeof err)) {
        fprintf(stderr, "kvf-bench connector: %s\n", err);
        exit(1);
    }
    void **p64 = malloc(256 * sizeof *p64), **p16 = malloc(1024 * sizeof *p16);
    r->rounds = rounds;
    /* One warm-up of each path: streams, the kernel's compilation, staging. */
    pick(p64, 256, dev64, POOL, 65536);
    pick(p16, 1024, dev16, POOL, 16384);
    copier_s(&cc, KVF__CU_D2H, host, p64, 256, 65536, mode_of(65536));
    copier_s(&cc, KVF__CU_D2H, host, p16, 1024, 16384, mode_of(16384));
    copier_s(&cc, KVF__CU_H2D, host, p16, 1024, 16384, KVF__CUCOPY_STAGED);
    uint64_t k0 = cc.kernels;
    for (int i = 0; i < rounds; i++) {
        pick(p64, 256, dev64, POOL, 65536);
        pick(p16, 1024, dev16, POOL, 16384);
        double cd = contig_s(s, host, dcontig, total), ch = contig_s(s, dcontig, host, total);
        r->ceil_d2h[i] = total / cd / 1e9;
        r->ceil_h2d[i] = total / ch / 1e9;
        uint64_t k = cc.kernels;
        r->d2h64[i] = cd / copier_s(&cc, KVF__CU_D2H, host, p64, 256, 65536, mode_of(65536));
        r->h2d64[i] = ch / copier_s(&cc, KVF__CU_H2D, host, p64, 256, 65536, mode_of(65536));
        r->kernels64 += cc.kernels - k;
        k = cc.kernels;
        r->d2h16[i] = cd / copier_s(&cc, KVF__CU_D2H, host, p16, 1024, 16384, mode_of(16384));
        r->h2d16[i] = ch / copier_s(&cc, KVF__CU_H2D, host, p16, 1024, 16384, mode_of(16384));
        r->kernels16 += cc.kernels - k;
        r->d2h16_ce[i] =
            cd / copier_s(&cc, KVF__CU_D2H, host, p16, 1024, 16384, KVF__CUCOPY_ENGINE);
        r->h2d64_k[i] = ch / copier_s(&cc, KVF__CU_H2D, host, p64, 256, 65536, KVF__CUCOPY_DIRECT);
    }
    (void)k0;
    /* The sweep: 16 MiB of pages of each size, both paths, both directions, median of 5. */
    static const size_t sizes[] = {4096, 8192, 16384, 32768, 65536, 131072, 262144};
    for (size_t z = 0; z < sizeof sizes / sizeof sizes[0]; z++) {
        size_t pb = sizes[z], n = SWEEP_BYTES / pb;
        size_t pool = (size_t)POOL * 16384 / pb;
        if (pool < n)
            pool = n;
        uint8_t *dev = pb == 16384 ? dev16 : dev64; /* 256 MiB or 64 MiB: either holds it */
        if (pb > 16384)
            pool = (size_t)POOL * 65536 / pb;
        void **pp = malloc(n * sizeof *pp);
        pick(pp, n, dev, pool, pb);
        double v[6][5];
        for (int k = 0; k < 5; k++) {
            double cd = contig_s(s, host, dcontig, total), ch = contig_s(s, dcontig, host, total);
            for (int m = 0; m < 3; m++) {
                v[m][k] = cd / copier_s(&cc, KVF__CU_D2H, host, pp, n, pb, m);
                v[3 + m][k] = ch / copier_s(&cc, KVF__CU_H2D, host, pp, n, pb, m);
            }
        }
        json_t *row = json_object();
        json_object_set_new(row, "page_bytes", json_integer((json_int_t)pb));
        const char *keys[6] = {"d2h_copy_engine_vs_pinned",   "d2h_kernel_staged_vs_pinned",
                               "d2h_kernel_direct_vs_pinned", "h2d_copy_engine_vs_pinned",
                               "h2d_kernel_staged_vs_pinned", "h2d_kernel_direct_vs_pinned"};
        double med[6];
        for (int k = 0; k < 6; k++) {
            med[k] = bench_spread_of(v[k], 5).median;
            bench_json_real(row, keys[k], med[k]);
        }
        json_object_set_new(row, "rule",
                            json_string(kvf__cucopy_rule(pb) ? "kernel" : "copy_engine"));
        json_array_append_new(sweep, row);
        printf("  %4zu KiB pages, vs pinned: copy engine d2h %.2f h2d %.2f; kernel staged d2h %.2f "
               "h2d %.2f; kernel direct d2h %.2f h2d %.2f; rule: %s\n",
               pb >> 10, med[0], med[3], med[1], med[4], med[2], med[5],
               kvf__cucopy_rule(pb) ? "kernel" : "copy engine");
        free(pp);
    }
    kvf__cucopy_fini(&cc);
    cu->StreamDestroy(s);
    free(p64);
    free(p16);
    cu->FreeHost(host);
    cu->Free(dev64);
    cu->Free(dev16);
    cu->Free(dcontig);
}

/* ------------------------------------------------------------------------------------------ */
/* 2 and 3. A store on this host to GPU pages, and overlap with compute */

typedef struct kvset {
    kvf_kv_layer reg[64];
    uint32_t pages;
} kvset;

static void kv_alloc(kvset *k, const kvf_layout *l, uint32_t pages, size_t page_bytes)
{
    k->pages = pages;
    for (uint32_t i = 0; i < l->layers; i++) {
        void *a, *b;
        CK(cu->Malloc(&a, (size_t)pages * page_bytes));
        CK(cu->Malloc(&b, (size_t)pages * page_bytes));
        CK(cu->Memset(a, (int)(i + 1), (size_t)pages * page_bytes));
        CK(cu->Memset(b, (int)(i + 101), (size_t)pages * page_bytes));
        k->reg[i] = (kvf_kv_layer){a, b, page_bytes, pages, KVF_MEM_CUDA};
    }
}

static void kv_release(kvset *k, const kvf_layout *l)
{
    for (uint32_t i = 0; i < l->layers; i++) {
        cu->Free(k->reg[i].k_base);
        cu->Free(k->reg[i].v_base);
    }
}

static void reg_or_die(kvf_connector *cn, kvset *k, uint32_t layers)
{
    char err[300];
    if (kvf_connector_register(cn, k->reg, layers, err, sizeof err)) {
        fprintf(stderr, "kvf-bench connector: register: %s\n", err);
        exit(1);
    }
}

static const char mm_src[] =
    "extern \"C\" __global__ void mm(const float *a, const float *b, float *c, int n)\n"
    "{\n"
    "    __shared__ float as[32][33], bs[32][33];\n"
    "    int tx = threadIdx.x, ty = threadIdx.y;\n"
    "    int row = blockIdx.y * 32 + ty, col = blockIdx.x * 32 + tx;\n"
    "    float acc = 0.f;\n"
    "    for (int k0 = 0; k0 < n; k0 += 32) {\n"
    "        as[ty][tx] = a[row * n + k0 + tx];\n"
    "        bs[ty][tx] = b[(k0 + ty) * n + col];\n"
    "        __syncthreads();\n"
    "        for (int k = 0; k < 32; k++)\n"
    "            acc += as[ty][k] * bs[k][tx];\n"
    "        __syncthreads();\n"
    "    }\n"
    "    c[row * n + col] = acc;\n"
    "}\n";

typedef struct mm_ctx {
    kvf__cukernel k;
    float *a, *b, *c;
    int n, reps; /* matmuls per layer */
    kvf__custream s;
} mm_ctx;

static void mm_layer(mm_ctx *m)
{
    void *args[] = {&m->a, &m->b, &m->c, &m->n};
    kvf__cudim3 grid = {(unsigned)m->n / 32, (unsigned)m->n / 32, 1}, block = {32, 32, 1};
    for (int r = 0; r < m->reps; r++)
        CK(cu->LaunchKernel((const void *)m->k, grid, block, args, 0, m->s));
}

typedef struct store_res {
    int rounds;
    double ceil[MAXR], load[MAXR], ratio[MAXR];
    double save_pages[MAXR], save_total[MAXR], save_ceil[MAXR]; /* ratio, ms, GB/s */
    double first_load_s, warm_load_s;
    double compute[MAXR], transfer[MAXR], both[MAXR], eff[MAXR];
    double trusted[MAXR];                 /* load vs pinned, trust_local_store */
    double call_ms[MAXR], first_ms[MAXR]; /* the load call (leases), and until layer 0 is in */
    uint64_t kernels, copy_calls, bytes;
    int workers, identical;
    char transport[16];
} store_res;

/* Loads tokens into pages dst of the set registered, layer by layer; with m, runs m's matmuls
 * for each layer as soon as it is in. Seconds from the load's start to the last layer computed. */
static double last_call_s, last_first_s; /* the last load's call, and its layer 0 */

static double load_run(kvf_connector *cn, const uint32_t *t, size_t n, const uint32_t *dst,
                       size_t np, uint32_t layers, mm_ctx *m)
{
    double t0 = bench_now();
    kvf_xfer *x;
    if (kvf_connector_load(cn, t, n, dst, np, &x)) {
        fprintf(stderr, "kvf-bench connector: load refused\n");
        exit(1);
    }
    last_call_s = bench_now() - t0;
    for (uint32_t l = 0; l < layers; l++) {
        int rc = kvf_xfer_wait_layer(x, l);
        if (rc) {
            char e[240];
            fprintf(stderr, "kvf-bench connector: layer %u: %s (%s)\n", l, kvf_strerror(rc),
                    kvf_connector_error(cn, e, sizeof e));
            exit(1);
        }
        if (l == 0)
            last_first_s = bench_now() - t0;
        if (m)
            mm_layer(m);
    }
    if (m)
        CK(cu->StreamSynchronize(m->s));
    double dt = bench_now() - t0;
    if (kvf_xfer_wait(x) != 0 || kvf_xfer_loaded_tokens(x) != n) {
        fprintf(stderr, "kvf-bench connector: load incomplete\n");
        exit(1);
    }
    kvf_xfer_free(&x);
    return dt;
}

static int store_part(int rounds, const char *store_bin, store_res *r)
{
    kvf_layout l = {0};
    snprintf(l.model_id, sizeof l.model_id, "llama-3.1-8b-shape");
    l.layers = 32;
    l.kv_heads = 8;
    l.head_dim = 128;
    l.dtype = KVF_DTYPE_BF16;
    l.kind = KVF_KV_SEPARATE;
    l.page_tokens = 32;
    l.chunk_tokens = 256;
    l.tp_size = 1;
    size_t pb = 32 * 8 * 128 * 2, n = KV_TOKENS, np = n / l.page_tokens;
    size_t kv_bytes = n * kvf_layout_bytes_per_token(&l);
    bench_proc store = {0};
    if (bench_start_store(&store, store_bin, "3G", NULL) != 0)
        return -1;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", store.port);
    const char *nodes[1] = {addr};
    kvf_connector_opts o = {.nodes = nodes, .n_nodes = 1, .layout = l, .deadline_ms = 30000};
    kvf_connector *cn;
    char err[300];
    if (kvf_connector_open(&cn, &o, err, sizeof err)) {
        fprintf(stderr, "kvf-bench connector: %s\n", err);
        bench_stop(&store);
        return -1;
    }
    snprintf(r->transport, sizeof r->transport, "%s", kvf_connector_transport(cn, NULL, 0));
    kvset src, dst;
    kv_alloc(&src, &l, 2 * (uint32_t)np, pb);
    kv_alloc(&dst, &l, 2 * (uint32_t)np, pb);
    uint32_t *t = malloc(n * sizeof *t), *ids_s = malloc(np * 4), *ids_d = malloc(np * 4);
    for (size_t i = 0; i < n; i++)
        t[i] = (uint32_t)(rnd() % 128000);
    for (size_t i = 0; i < np; i++) {
        ids_s[i] = (uint32_t)(2 * i + (rnd() & 1));
        ids_d[i] = (uint32_t)(2 * (np - 1 - i) + (rnd() & 1));
    }
    uint8_t *pinned = NULL, *dcontig = NULL;
    CK(cu->HostAlloc((void **)&pinned, kv_bytes, KVF__CU_HOST_ALLOC_PORTABLE));
    CK(cu->Malloc((void **)&dcontig, kv_bytes));
    memset(pinned, 3, kv_bytes);
    kvf__custream s;
    CK(cu->StreamCreateWithFlags(&s, KVF__CU_STREAM_NON_BLOCKING));

    /* Saves from the source pages: until the pages are in staging (wait_pages), and until stored.
     * The first (it maps and registers staging with the driver) is a warm-up; every save is of a
     * sequence not stored yet, the last of the one the loads read. */
    reg_or_die(cn, &src, l.layers);
    uint32_t *tf = malloc(n * sizeof *tf);
    for (int i = -1; i < rounds; i++) {
        const uint32_t *ts = t;
        if (i + 1 < rounds) {
            for (size_t k = 0; k < n; k++)
                tf[k] = (uint32_t)(rnd() % 128000);
            ts = tf;
        }
        kvf_xfer *x;
        double t0 = bench_now();
        if (kvf_connector_save(cn, ts, n, 0, ids_s, np, &x)) {
            fprintf(stderr, "kvf-bench connector: save refused\n");
            exit(1);
        }
        for (uint32_t k = 0; k < l.layers; k++)
            kvf_xfer_layer_done(x, k);
        kvf_xfer_wait_pages(x);
        double pages_s = bench_now() - t0;
        int rc = kvf_xfer_wait(x);
        double total_s = bench_now() - t0;
        kvf_xfer_free(&x);
        if (rc) {
            fprintf(stderr, "kvf-bench connector: save: %s (%s)\n", kvf_strerror(rc),
                    kvf_connector_error(cn, err, sizeof err));
            exit(1);
        }
        if (i < 0)
            continue;
        double c = contig_s(s, pinned, dcontig, kv_bytes);
        r->save_pages[i] = c / pages_s;
        r->save_total[i] = total_s * 1e3;
        r->save_ceil[i] = kv_bytes / c / 1e9;
    }
    free(tf);

    /* Load into the other pages: the first load registers the arena with the driver. */
    reg_or_die(cn, &dst, l.layers);
    r->first_load_s = load_run(cn, t, n, ids_d, np, l.layers, NULL);
    /* Every byte, once. */
    r->identical = 1;
    uint8_t *a = malloc(pb), *b = malloc(pb);
    for (uint32_t i = 0; i < l.layers && r->identical; i++)
        for (size_t p = 0; p < np && r->identical; p++)
            for (int pl = 0; pl < 2; pl++) {
                const uint8_t *sb = pl ? src.reg[i].v_base : src.reg[i].k_base;
                const uint8_t *db = pl ? dst.reg[i].v_base : dst.reg[i].k_base;
                CK(cu->Memcpy(a, sb + ids_s[p] * pb, pb, KVF__CU_MEMCPY_DEFAULT));
                CK(cu->Memcpy(b, db + ids_d[p] * pb, pb, KVF__CU_MEMCPY_DEFAULT));
                if (memcmp(a, b, pb))
                    r->identical = 0;
            }
    free(a);
    free(b);

    /* The matmul, sized so that the compute per layer is about the transfer per layer. */
    mm_ctx m = {.n = MM_N, .reps = 1, .s = s};
    if (kvf__cu_compile(cu, 0, mm_src, "mm", &m.k, err, sizeof err)) {
        fprintf(stderr, "kvf-bench connector: matmul: %s\n", err);
        exit(1);
    }
    size_t mb = (size_t)MM_N * MM_N * sizeof(float);
    CK(cu->Malloc((void **)&m.a, mb));
    CK(cu->Malloc((void **)&m.b, mb));
    CK(cu->Malloc((void **)&m.c, mb));
    CK(cu->Memset(m.a, 0, mb));
    CK(cu->Memset(m.b, 0, mb));
    mm_layer(&m);
    CK(cu->StreamSynchronize(s));
    double one = bench_now();
    m.reps = 20;
    mm_layer(&m);
    CK(cu->StreamSynchronize(s));
    one = (bench_now() - one) / 20;
    r->warm_load_s = load_run(cn, t, n, ids_d, np, l.layers, NULL);
    double per_layer = r->warm_load_s / l.layers;
    m.reps = (int)(per_layer / one + 0.5);
    if (m.reps < 1)
        m.reps = 1;

    kvf_connector_stats st0, st1;
    kvf_connector_stats_get(cn, &st0);
    r->rounds = rounds;
    for (int i = 0; i < rounds; i++) {
        double c = contig_s(s, dcontig, pinned, kv_bytes);
        r->ceil[i] = kv_bytes / c / 1e9;
        double ld = load_run(cn, t, n, ids_d, np, l.layers, NULL);
        r->call_ms[i] = last_call_s * 1e3;
        r->first_ms[i] = last_first_s * 1e3;
        r->load[i] = kv_bytes / ld / 1e9;
        r->ratio[i] = c / ld;
        double c0 = bench_now();
        for (uint32_t k = 0; k < l.layers; k++)
            mm_layer(&m);
        CK(cu->StreamSynchronize(s));
        r->compute[i] = bench_now() - c0;
        r->transfer[i] = ld;
        r->both[i] = load_run(cn, t, n, ids_d, np, l.layers, &m);
        double mx = r->compute[i] > ld ? r->compute[i] : ld;
        r->eff[i] = mx / r->both[i];
    }
    kvf_connector_stats_get(cn, &st1);
    r->kernels = st1.cuda_kernels - st0.cuda_kernels;
    r->copy_calls = st1.cuda_copy_calls - st0.cuda_copy_calls;
    r->bytes = st1.cuda_bytes - st0.cuda_bytes;
    kvf_connector_close(&cn);
    /* The same loads from a connector that trusts the store on this host (no second hash). */
    o.trust_local_store = 1;
    if (kvf_connector_open(&cn, &o, err, sizeof err) == 0) {
        reg_or_die(cn, &dst, l.layers);
        (void)load_run(cn, t, n, ids_d, np, l.layers, NULL);
        for (int i = 0; i < rounds; i++) {
            double c = contig_s(s, dcontig, pinned, kv_bytes);
            r->trusted[i] = c / load_run(cn, t, n, ids_d, np, l.layers, NULL);
        }
        kvf_connector_close(&cn);
    }
    cu->Free(m.a);
    cu->Free(m.b);
    cu->Free(m.c);
    cu->StreamDestroy(s);
    cu->FreeHost(pinned);
    cu->Free(dcontig);
    kv_release(&src, &l);
    kv_release(&dst, &l);
    free(t);
    free(ids_s);
    free(ids_d);
    bench_stop(&store);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

static void line(const char *what, const double *v, int n, const char *target)
{
    bench_spread s = bench_spread_of(v, (size_t)n);
    printf("  %-46s %.3f [%.3f - %.3f]%s%s\n", what, s.median, s.p10, s.p90, target ? "  " : "",
           target ? target : "");
}

int bench_connector_cuda(int rounds, int json, const char *store_bin, const char *only)
{
    kvf_cuda_info ci;
    if (kvf_cuda_probe(&ci) != 0) {
        fprintf(stderr, "kvf-bench connector --device cuda: no usable CUDA: %s\n", ci.why);
        return 2;
    }
    cu = kvf__cuda(NULL, 0);
    if (rounds <= 0)
        rounds = 9;
    if (rounds > MAXR)
        rounds = MAXR;
    json_t *res = bench_result_new("connector");
    json_object_set_new(res, "device", json_string("cuda"));
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "cuda_runtime_version", json_integer(ci.runtime_version));
    json_object_set_new(res, "cuda_driver_version", json_integer(ci.driver_version));
    json_object_set_new(res, "cuda_cc", json_integer(ci.cc_major * 10 + ci.cc_minor));
    json_object_set_new(res, "cuda_sm_count", json_integer(ci.sm_count));
    json_object_set_new(res, "nvrtc_version", json_integer(ci.nvrtc_version));
    json_object_set_new(res, "rounds", json_integer(rounds));
    printf("kvf-bench connector --device cuda: real; CUDA runtime %d.%d, driver %d.%d, compute "
           "%d.%d, %d SMs, NVRTC %d.%d\n",
           ci.runtime_version / 1000, ci.runtime_version % 1000 / 10, ci.driver_version / 1000,
           ci.driver_version % 1000 / 10, ci.cc_major, ci.cc_minor, ci.sm_count,
           ci.nvrtc_version / 1000, ci.nvrtc_version % 1000 / 10);
    int ok = 1;
    if (!only || !strcmp(only, "pages")) {
        bench_progress("connector", "CUDA page copies against one contiguous pinned copy");
        static copies_res cr;
        json_t *sweep = json_array();
        copies(rounds, &cr, sweep);
        int n = cr.rounds;
        printf("copies, ratio to one contiguous pinned copy (median [p10 - p90] of %d):\n", n);
        line("pinned d2h GB/s (16 MiB)", cr.ceil_d2h, n, NULL);
        line("pinned h2d GB/s (16 MiB)", cr.ceil_h2d, n, NULL);
        line("d2h 256 x 64 KiB scattered (copy engine)", cr.d2h64, n, "target >= 0.95");
        line("h2d 256 x 64 KiB scattered (copy engine)", cr.h2d64, n, "target >= 0.95");
        line("d2h 1024 x 16 KiB scattered (rule's path)", cr.d2h16, n, "target >= 0.85");
        line("h2d 1024 x 16 KiB scattered (rule's path)", cr.h2d16, n, NULL);
        line("d2h 1024 x 16 KiB on the copy engine", cr.d2h16_ce, n, NULL);
        line("h2d 256 x 64 KiB with the kernel", cr.h2d64_k, n, NULL);
        printf("  kernels launched for 64 KiB pages: %llu; for 16 KiB pages: %llu\n",
               (unsigned long long)cr.kernels64, (unsigned long long)cr.kernels16);
        bench_json_rounds(res, "cuda_pinned_d2h_gbps", cr.ceil_d2h, (size_t)n);
        bench_json_rounds(res, "cuda_pinned_h2d_gbps", cr.ceil_h2d, (size_t)n);
        bench_json_rounds(res, "cuda_d2h_vs_pinned", cr.d2h64, (size_t)n);
        bench_json_rounds(res, "cuda_h2d_vs_pinned", cr.h2d64, (size_t)n);
        bench_json_rounds(res, "cuda_d2h_16k_vs_pinned", cr.d2h16, (size_t)n);
        bench_json_rounds(res, "cuda_h2d_16k_vs_pinned", cr.h2d16, (size_t)n);
        bench_json_rounds(res, "cuda_d2h_16k_copy_engine_vs_pinned", cr.d2h16_ce, (size_t)n);
        bench_json_rounds(res, "cuda_h2d_64k_kernel_vs_pinned", cr.h2d64_k, (size_t)n);
        json_object_set_new(res, "cuda_kernels_64k_pages", json_integer((json_int_t)cr.kernels64));
        json_object_set_new(res, "cuda_kernels_16k_pages", json_integer((json_int_t)cr.kernels16));
        json_object_set_new(res, "cuda_page_size_sweep", sweep);
        ok &= cr.kernels64 == 0;
    }
    if (!only || !strcmp(only, "store")) {
        bench_progress("connector", "a same-host store to GPU pages, 1 GiB of KV, and overlap");
        static store_res sr;
        if (store_part(rounds, store_bin, &sr) != 0) {
            json_decref(res);
            return 1;
        }
        int n = sr.rounds;
        printf("store on this host (%s) -> GPU pages, 1 GiB of KV (Llama-3.1-8B shape, 64 KiB "
               "pages):\n",
               sr.transport);
        line("pinned d2h GB/s (1 GiB)", sr.save_ceil, n, NULL);
        line("save: pages in staging, vs pinned d2h", sr.save_pages, n, NULL);
        line("save: stored, ms", sr.save_total, n, NULL);
        printf("  first load (registers the arena with the driver): %.1f ms; bytes identical: "
               "%s\n",
               sr.first_load_s * 1e3, sr.identical ? "yes" : "NO");
        line("pinned h2d GB/s (1 GiB)", sr.ceil, n, NULL);
        line("load GB/s", sr.load, n, NULL);
        line("load vs pinned", sr.ratio, n, "target >= 0.8");
        line("load vs pinned, trusting the store (no hash)", sr.trusted, n, NULL);
        line("load: the call (leases taken), ms", sr.call_ms, n, NULL);
        line("load: layer 0 in, ms", sr.first_ms, n, NULL);
        double ms[4][MAXR];
        for (int i = 0; i < n; i++) {
            ms[0][i] = sr.compute[i] * 1e3;
            ms[1][i] = sr.transfer[i] * 1e3;
            ms[2][i] = sr.both[i] * 1e3;
        }
        line("compute alone ms (32 layers of matmuls)", ms[0], n, NULL);
        line("transfer alone ms", ms[1], n, NULL);
        line("layerwise load + compute ms", ms[2], n, NULL);
        line("overlap efficiency", sr.eff, n, "target >= 0.9");
        printf("  connector: %llu copy-engine submissions, %llu kernels, %.2f GiB moved\n",
               (unsigned long long)sr.copy_calls, (unsigned long long)sr.kernels,
               sr.bytes / 1073741824.0);
        json_object_set_new(res, "transport", json_string(sr.transport));
        bench_json_rounds(res, "cuda_save_pinned_d2h_gbps", sr.save_ceil, (size_t)n);
        bench_json_rounds(res, "cuda_save_pages_vs_pinned", sr.save_pages, (size_t)n);
        bench_json_rounds(res, "cuda_save_stored_ms", sr.save_total, (size_t)n);
        bench_json_real(res, "cuda_first_load_ms", sr.first_load_s * 1e3);
        json_object_set_new(res, "cuda_bytes_identical", json_boolean(sr.identical));
        bench_json_rounds(res, "cuda_store_pinned_h2d_gbps", sr.ceil, (size_t)n);
        bench_json_rounds(res, "cuda_store_get_gbps", sr.load, (size_t)n);
        bench_json_rounds(res, "cuda_store_get_vs_pinned", sr.ratio, (size_t)n);
        bench_json_rounds(res, "cuda_store_get_trusted_vs_pinned", sr.trusted, (size_t)n);
        bench_json_rounds(res, "cuda_store_get_call_ms", sr.call_ms, (size_t)n);
        bench_json_rounds(res, "cuda_store_get_layer0_ms", sr.first_ms, (size_t)n);
        bench_json_rounds(res, "cuda_compute_alone_ms", ms[0], (size_t)n);
        bench_json_rounds(res, "cuda_transfer_alone_ms", ms[1], (size_t)n);
        bench_json_rounds(res, "cuda_overlap_ms", ms[2], (size_t)n);
        bench_json_rounds(res, "cuda_overlap_efficiency", sr.eff, (size_t)n);
        json_object_set_new(res, "cuda_kernels_store_load", json_integer((json_int_t)sr.kernels));
        ok &= sr.identical && sr.kernels == 0;
    }
    bench_emit(res, json);
    json_decref(res);
    return ok ? 0 : 1;
}
