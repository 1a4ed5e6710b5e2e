/*
 * Unit tests of the connector module: page-map gather/scatter round trips over odd shapes
 * (partial pages never exist: a chunk is whole pages, but odd page sizes, strides with padding,
 * scattered page ids, many layers, latent layouts), registration checks, and argument checks of
 * the transfer calls. Transfers against a real store are in tests/integration/test_engine.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "kvf/events.h"
#include "kvf/kvf.h"

#include "kvevents.h"
#include "pagemap.h"
#include "pubsub.h"
#include "rdma.h"

static uint64_t rng = 0x1234567;

static uint32_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}

typedef struct cache {
    kvf_kv_layer *reg;
    uint32_t layers;
} cache;

static cache cache_new(const kvf_layout *l, uint32_t pages, size_t pad, int fill)
{
    cache c = {.layers = l->layers};
    uint32_t planes = l->kind == KVF_KV_LATENT ? 1 : 2;
    size_t page_bytes = kvf_layout_bytes_per_token_layer(l) / planes * l->page_tokens;
    c.reg = calloc(l->layers, sizeof *c.reg);
    for (uint32_t i = 0; i < l->layers; i++) {
        size_t stride = page_bytes + pad;
        uint8_t *k = malloc(stride * pages), *v = planes == 2 ? malloc(stride * pages) : NULL;
        for (size_t b = 0; b < stride * pages; b++) {
            k[b] = fill ? (uint8_t)rnd() : 0;
            if (v)
                v[b] = fill ? (uint8_t)rnd() : 0;
        }
        c.reg[i] = (kvf_kv_layer){.k_base = k,
                                  .v_base = v,
                                  .page_stride = stride,
                                  .num_pages = pages,
                                  .kind = KVF_MEM_HOST};
    }
    return c;
}

static void cache_free(cache *c)
{
    for (uint32_t i = 0; i < c->layers; i++) {
        free(c->reg[i].k_base);
        free(c->reg[i].v_base);
    }
    free(c->reg);
}

/* Gathers chunks from scattered pages of one cache and scatters them into other pages of a second
 * cache; every page row must arrive, and padding between pages must stay untouched. */
static void round_trip(kvf_layout l, size_t pad)
{
    char err[200];
    assert_int_equal(kvf_layout_validate(&l, err, sizeof err), 0);
    uint32_t pages = 64;
    cache a = cache_new(&l, pages, pad, 1), b = cache_new(&l, pages, pad, 0);
    kvf__pagemap pa = {0}, pb = {0};
    assert_int_equal(kvf__pagemap_init(&pa, &l, a.reg, l.layers, err, sizeof err), 0);
    assert_int_equal(kvf__pagemap_init(&pb, &l, b.reg, l.layers, err, sizeof err), 0);
    assert_int_equal(pa.seg_bytes, kvf_layout_segment_bytes(&l));
    uint32_t ppc = pa.pages_per_chunk;
    uint32_t *src = malloc(ppc * sizeof *src), *dst = malloc(ppc * sizeof *dst);
    uint8_t *seg = malloc(pa.seg_bytes);
    /* Distinct random pages on both sides. */
    uint32_t perm[64];
    for (uint32_t i = 0; i < pages; i++)
        perm[i] = i;
    for (uint32_t i = pages - 1; i > 0; i--) {
        uint32_t j = rnd() % (i + 1), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (uint32_t p = 0; p < ppc; p++) {
        src[p] = perm[p];
        dst[p] = perm[pages - 1 - p];
    }
    for (uint32_t layer = 0; layer < l.layers; layer++) {
        kvf__pagemap_gather(&pa, layer, seg, src);
        kvf__pagemap_scatter(&pb, layer, seg, dst);
    }
    uint32_t planes = l.kind == KVF_KV_LATENT ? 1 : 2;
    for (uint32_t layer = 0; layer < l.layers; layer++) {
        for (uint32_t pl = 0; pl < planes; pl++) {
            uint8_t *ab = pl ? a.reg[layer].v_base : a.reg[layer].k_base;
            uint8_t *bb = pl ? b.reg[layer].v_base : b.reg[layer].k_base;
            size_t stride = a.reg[layer].page_stride;
            for (uint32_t p = 0; p < ppc; p++) {
                assert_memory_equal(bb + dst[p] * stride, ab + src[p] * stride, pa.page_bytes);
                /* padding after the page row stays as it was (zero) */
                for (size_t q = pa.page_bytes; q < stride; q++)
                    assert_int_equal(bb[dst[p] * stride + q], 0);
            }
            /* Pages that were not part of the chunk stay untouched. */
            for (uint32_t p = ppc; p < pages - ppc; p++)
                for (size_t q = 0; q < stride; q++)
                    assert_int_equal(bb[perm[p] * stride + q], 0);
        }
    }
    /* The segment is K rows of every token, then V: token t of K starts at t * row bytes. */
    kvf__pagemap_gather(&pa, 0, seg, src);
    size_t row = kvf_layout_bytes_per_token_layer(&l) / planes;
    uint32_t t = l.chunk_tokens - 1;
    assert_memory_equal(seg + (size_t)t * row,
                        (uint8_t *)a.reg[0].k_base + src[t / l.page_tokens] * a.reg[0].page_stride +
                            (t % l.page_tokens) * row,
                        row);
    free(src);
    free(dst);
    free(seg);
    kvf__pagemap_free(&pa);
    kvf__pagemap_free(&pb);
    cache_free(&a);
    cache_free(&b);
}

static void test_connector_pagemap_round_trips(void **state)
{
    (void)state;
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    round_trip(l, 0);
    round_trip(l, 40);
    /* Odd shapes: 3-token pages, 3 heads of 5 f16 values, 12-token chunks, 37 layers. */
    l.page_tokens = 3;
    l.chunk_tokens = 12;
    l.kv_heads = 3;
    l.head_dim = 5;
    l.dtype = KVF_DTYPE_F16;
    l.layers = 37;
    round_trip(l, 7);
    /* Latent (MLA) layout: one plane. */
    assert_int_equal(kvf_layout_preset("deepseek-v3", &l), 0);
    l.layers = 3;
    l.chunk_tokens = 32;
    round_trip(l, 0);
    /* Tensor-parallel slice: 8 heads over 4 ranks, 2 per rank. */
    assert_int_equal(kvf_layout_preset("llama-3.1-8b", &l), 0);
    l.layers = 2;
    l.chunk_tokens = 32;
    l.tp_size = 4;
    l.tp_rank = 2;
    round_trip(l, 0);
}

static void test_connector_register_rejects_bad_memory(void **state)
{
    (void)state;
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    cache c = cache_new(&l, 8, 0, 0);
    kvf__pagemap pm = {0};
    char err[200];
    assert_int_equal(kvf__pagemap_init(&pm, &l, c.reg, l.layers - 1, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "layers given"));
    c.reg[1].page_stride -= 1;
    assert_int_equal(kvf__pagemap_init(&pm, &l, c.reg, l.layers, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "stride"));
    c.reg[1].page_stride += 1;
    void *v = c.reg[2].v_base;
    c.reg[2].v_base = NULL;
    assert_int_equal(kvf__pagemap_init(&pm, &l, c.reg, l.layers, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "no V plane"));
    c.reg[2].v_base = v;
    /* Host and CUDA layers mixed; all CUDA on host memory (no runtime here: not supported; with
     * one: not device memory). */
    c.reg[3].kind = KVF_MEM_CUDA;
    assert_int_equal(kvf__pagemap_init(&pm, &l, c.reg, l.layers, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "every layer must be in CUDA device memory or none"));
    for (uint32_t i = 0; i < l.layers; i++)
        c.reg[i].kind = KVF_MEM_CUDA;
    int rc = kvf__pagemap_init(&pm, &l, c.reg, l.layers, err, sizeof err);
    assert_true(rc == KVF_ENOTSUP || rc == KVF_EINVAL);
    assert_non_null(strstr(err, "CUDA"));
    for (uint32_t i = 0; i < l.layers; i++)
        c.reg[i].kind = KVF_MEM_HOST;
    c.reg[0].num_pages = 0;
    assert_int_equal(kvf__pagemap_init(&pm, &l, c.reg, l.layers, err, sizeof err), KVF_EINVAL);
    c.reg[0].num_pages = 8;
    assert_int_equal(kvf__pagemap_init(&pm, &l, c.reg, l.layers, err, sizeof err), 0);
    kvf__pagemap_free(&pm);
    /* A latent layout must not be given a V plane. */
    kvf_layout lat;
    assert_int_equal(kvf_layout_preset("deepseek-v3", &lat), 0);
    lat.layers = 4;
    assert_int_equal(kvf__pagemap_init(&pm, &lat, c.reg, 4, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "latent"));
    cache_free(&c);
}

/* The transport is chosen at open and says why: the reference engine's record has no RDMA, so
 * the classifier rules one-sided reads out on the engine's side; with an engine record that has
 * RDMA, the client tries and reports what it lacked. */
static void test_connector_transport_says_why(void **state)
{
    (void)state;
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    const char *nodes[1] = {"127.0.0.1:1"};
    kvf_connector_opts o = {.nodes = nodes, .n_nodes = 1, .layout = l};
    kvf_connector *cn;
    char err[200], why[240];
    assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), 0);
    assert_string_equal(kvf_connector_transport(cn, why, sizeof why), "tcp");
    assert_non_null(strstr(why, "rdma_read is backend_infeasible"));
    kvf_connector_close(&cn);
    kvf_caps rich;
    assert_int_equal(kvf_caps_builtin("vllm", &rich), 0);
    rich.transports |= KVF_TRANSPORT_RDMA;
    rich.rdma_devices = 1;
    rich.rdma_one_sided = 1;
    rich.mem_kinds = KVF_MEMK_HOST; /* KV staged in host memory, which the transfer path reaches */
    o.caps = &rich;
    assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), 0);
    /* The engine's side allows RDMA: the client decides, and says what was missing here (no
     * device on this host, or a node that does not answer). */
    assert_string_equal(kvf_connector_transport(cn, why, sizeof why), "tcp");
    char dev[160];
    const char *want = kvf__rdma_available(dev, sizeof dev) ? "did not answer" : dev;
    if (!strstr(why, want))
        fail_msg("why: \"%s\", expected it to say \"%s\"", why, want);
    kvf_connector_close(&cn);
}

/* Argument checks need no store: the client connects lazily and a refused node is not an error
 * at open. */
static void test_connector_transfer_arguments(void **state)
{
    (void)state;
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    const char *nodes[1] = {"127.0.0.1:1"};
    kvf_connector_opts o = {.nodes = nodes, .n_nodes = 1, .layout = l, .deadline_ms = 300};
    kvf_connector *cn;
    char err[200];
    assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), 0);
    uint32_t tokens[256] = {0}, pages[16];
    for (int i = 0; i < 16; i++)
        pages[i] = (uint32_t)i;
    kvf_xfer *x = NULL, *x2 = NULL;
    /* Not registered yet. */
    assert_int_equal(kvf_connector_load(cn, tokens, 128, pages, 8, &x), KVF_EINVAL);
    cache c = cache_new(&l, 8, 0, 0);
    assert_int_equal(kvf_connector_register(cn, c.reg, l.layers, err, sizeof err), 0);
    /* No place for the transfer: refused before anything starts (a valid request crashed when
     * it wrote the transfer through the NULL pointer). */
    assert_int_equal(kvf_connector_load(cn, tokens, 128, pages, 8, NULL), KVF_EINVAL);
    assert_int_equal(kvf_connector_save(cn, tokens, 128, 0, pages, 8, NULL), KVF_EINVAL);
    /* Token count not a multiple of the chunk; page count that disagrees; page out of range. */
    assert_int_equal(kvf_connector_load(cn, tokens, 100, pages, 8, &x), KVF_EINVAL);
    assert_int_equal(kvf_connector_load(cn, tokens, 128, pages, 7, &x), KVF_EINVAL);
    pages[3] = 8;
    assert_int_equal(kvf_connector_load(cn, tokens, 128, pages, 8, &x), KVF_ERANGE);
    pages[3] = 3;
    assert_int_equal(kvf_connector_save(cn, tokens, 128, 3, pages, 8, &x), KVF_EINVAL);
    /* CUDA device memory: where no CUDA runtime is found, the classifier rules it out with its
     * reason and the loader's; with one, host memory called CUDA memory is refused. */
    c.reg[1].kind = KVF_MEM_CUDA;
    kvf_cuda_info ci;
    int rc0 = kvf_connector_register(cn, c.reg, l.layers, err, sizeof err);
    if (kvf_cuda_probe(&ci) != 0) {
        assert_int_equal(rc0, KVF_EINFEASIBLE);
        assert_non_null(strstr(err, "CUDA device memory"));
    } else {
        assert_int_equal(rc0, KVF_EINVAL);
    }
    c.reg[1].kind = KVF_MEM_HOST;
    assert_int_equal(kvf_connector_register(cn, c.reg, l.layers, err, sizeof err), 0);
    /* A load from a node that refuses: every layer fails, bounded by the deadline. */
    assert_int_equal(kvf_connector_load(cn, tokens, 128, pages, 8, &x), 0);
    int rc = kvf_xfer_wait_layer(x, 0);
    assert_true(rc == KVF_ECONNREFUSED || rc == KVF_ECONNRESET || rc == KVF_ETIMEDOUT);
    assert_int_not_equal(kvf_xfer_wait(x), 0);
    assert_int_equal(kvf_xfer_loaded_tokens(x), 0);
    assert_int_equal(kvf_xfer_layer_done(x, 0), KVF_EINVAL); /* not a save */
    assert_int_equal(kvf_xfer_wait_pages(x), KVF_EINVAL);    /* nor here */
    kvf_xfer_free(&x);
    assert_null(x);
    size_t cached = 99;
    kvf_connector_lookup(cn, tokens, 256, &cached);
    assert_int_equal(cached, 0);
    /* A save whose layers are reported twice, then cancelled. Its pages are read (gathered into
     * staging) whether or not the node answers. */
    assert_int_equal(kvf_connector_save(cn, tokens, 128, 0, pages, 8, &x), 0);
    assert_int_equal(kvf_xfer_wait_pages(x), 0);
    assert_int_equal(kvf_xfer_layer_done(x, 0), 0);
    assert_int_equal(kvf_xfer_layer_done(x, 0), KVF_EINVAL);
    assert_int_equal(kvf_xfer_layer_done(x, 9), KVF_EINVAL);
    assert_int_equal(kvf_xfer_wait_pages(x), 0);
    kvf_xfer_cancel(x);
    assert_int_equal(kvf_xfer_wait_pages(x), KVF_ECANCELED);
    assert_int_equal(kvf_xfer_wait(x), KVF_ECANCELED);
    /* Closing with a transfer not yet freed: the transfer stays usable until freed. */
    kvf_connector_close(&cn);
    assert_null(cn);
    /* An engine whose record has no per-layer hook (mlx-lm) cannot load layerwise: refused by
     * the classifier before anything moves; a save is still fine. */
    kvf_caps mlx;
    assert_int_equal(kvf_caps_builtin("mlx-lm", &mlx), 0);
    kvf_connector_opts om = o;
    om.caps = &mlx;
    kvf_connector *cm;
    assert_int_equal(kvf_connector_open(&cm, &om, err, sizeof err), 0);
    c.reg[0].kind = c.reg[1].kind = c.reg[2].kind = c.reg[3].kind = KVF_MEM_UNIFIED;
    assert_int_equal(kvf_connector_register(cm, c.reg, l.layers, err, sizeof err), 0);
    assert_int_equal(kvf_connector_load(cm, tokens, 128, pages, 8, &x2), KVF_EINFEASIBLE);
    assert_int_equal(kvf_connector_save(cm, tokens, 128, 0, pages, 8, &x2), 0);
    kvf_xfer_cancel(x2);
    kvf_xfer_free(&x2);
    kvf_connector_close(&cm);
    /* A closed connector is a cleared handle: every call refuses it. */
    assert_int_equal(kvf_connector_load(cn, tokens, 128, pages, 8, &x2), KVF_EINVAL);
    assert_int_equal(kvf_connector_save(cn, tokens, 128, 0, pages, 8, &x2), KVF_EINVAL);
    assert_int_equal(kvf_connector_lookup(cn, tokens, 128, &cached), KVF_EINVAL);
    kvf_xfer_free(&x);
    cache_free(&c);
}

/* What one batch of the engine events publisher decoded to. */
typedef struct seen {
    int stored, removed;
    uint64_t hashes[8], parent;
    int has_parent;
    uint32_t tokens[8 * 4], block_size;
    size_t n_hashes, n_tokens;
} seen;

static int on_event(void *ud, const kvf_kve *ev, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    seen *s = ud;
    if (ev->type == KVF_KVE_BLOCK_REMOVED) {
        s->removed += (int)ev->n_hashes;
        return 0;
    }
    assert_int_equal(ev->type, KVF_KVE_BLOCK_STORED);
    assert_true(ev->n_hashes <= 8 && ev->n_tokens <= 32);
    s->stored += (int)ev->n_hashes;
    s->n_hashes = ev->n_hashes;
    memcpy(s->hashes, ev->hashes, ev->n_hashes * sizeof *ev->hashes);
    s->n_tokens = ev->n_tokens;
    memcpy(s->tokens, ev->tokens, ev->n_tokens * sizeof *ev->tokens);
    s->has_parent = ev->has_parent, s->parent = ev->parent, s->block_size = ev->block_size;
    return 0;
}

/* The engine events publisher: block hashes chain (the chain from a parent equals the whole
 * sequence's), batches arrive in vLLM's format with consecutive sequence numbers, and bad
 * arguments and addresses are refused with a reason. */
static void test_connector_events_publish(void **state)
{
    (void)state;
    uint32_t tokens[32];
    for (int i = 0; i < 32; i++)
        tokens[i] = 1000u + (uint32_t)i * 7u;
    uint64_t h[8], tail[4];
    assert_int_equal(kvf_events_hash_blocks(tokens, 8, 4, 0, h), 0);
    assert_int_equal(kvf_events_hash_blocks(tokens + 16, 4, 4, h[3], tail), 0);
    assert_memory_equal(tail, h + 4, sizeof tail);
    assert_true(h[0] != h[1]);
    assert_int_equal(kvf_events_hash_blocks(tokens, 1, 0, 0, h), KVF_EINVAL);

    kvf_events *ev = NULL;
    char err[300] = "";
    kvf_events_opts bad = {.listen = "no-port"};
    assert_int_equal(kvf_events_open(&ev, &bad, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "HOST:PORT"));
    kvf_events_opts noten = {.listen = "127.0.0.1:0", .credential = "/nonexistent.cred"};
    assert_int_equal(kvf_events_open(&ev, &noten, err, sizeof err), KVF_EINVAL);
    assert_null(ev);

    kvf_events_opts o = {.listen = "127.0.0.1:0"};
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    assert_non_null(strstr(kvf_events_endpoint(ev), "tcp://127.0.0.1:"));
    assert_string_equal(kvf_events_topic(ev), "kv-events");
    kvf__zsubs *zs = NULL;
    int idx;
    assert_int_equal(kvf__zsubs_open(&zs), 0);
    assert_int_equal(kvf__zsubs_add(zs, kvf_events_endpoint(ev), NULL, &idx, err, sizeof err), 0);
    assert_int_equal(kvf_events_publish(ev, NULL, 1, NULL, 0, 0, 0, NULL, 4, NULL), KVF_EINVAL);
    assert_int_equal(kvf_events_publish(ev, NULL, 0, NULL, 0, 0, 0, NULL, 4, NULL), 0);
    assert_int_equal(kvf_events_sequence(ev), 0); /* nothing to say: no batch */

    /* A slow joiner misses the first batches: publish until one arrives (bounded). */
    seen s = {0};
    uint64_t seq = 0;
    for (int t = 0; t < 100 && !s.stored; t++) {
        assert_int_equal(kvf_events_publish(ev, h, 2, h + 2, 2, 1, h[1], tokens + 8, 4, "GPU"), 0);
        uint8_t ready[KVF_ZSUBS_MAX];
        if (kvf__zsubs_poll(zs, 20, ready) <= 0 || !ready[idx])
            continue;
        kvf__zmsg m;
        assert_int_equal(kvf__zsubs_recv(zs, idx, &m), 0);
        assert_int_equal(m.seq_len, 8);
        seq = kvf__kve_seq_get(m.seq);
        assert_int_equal(kvf__kve_decode(m.payload, m.len, on_event, &s, NULL, err, sizeof err), 0);
    }
    assert_int_equal(s.stored, 2);
    assert_int_equal(s.removed, 2);
    assert_int_equal(s.n_hashes, 2);
    assert_memory_equal(s.hashes, h + 2, 2 * sizeof *h);
    assert_true(s.has_parent);
    assert_true(s.parent == h[1]);
    assert_int_equal(s.block_size, 4);
    assert_int_equal(s.n_tokens, 8);
    assert_memory_equal(s.tokens, tokens + 8, 8 * sizeof *tokens);
    assert_true(seq >= 1 && seq <= kvf_events_sequence(ev));
    kvf__zsubs_close(&zs);
    kvf_events_close(&ev);
    kvf_events_close(&ev); /* twice: a no-op */

    /* A replay socket keeps the last batches (here 3): asked from 3, it answers 3 and 4 (1 and 2
     * fell out of the window), then the end; asked from 1, it starts at 2. */
    kvf_events_opts ro = {.listen = "127.0.0.1:0", .replay = "127.0.0.1:0", .replay_batches = 3};
    assert_int_equal(kvf_events_open(&ev, &ro, err, sizeof err), 0);
    assert_non_null(strstr(kvf_events_replay_endpoint(ev), "tcp://127.0.0.1:"));
    for (int b = 0; b < 4; b++)
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h + b, 1, b > 0, b ? h[b - 1] : 0,
                                            tokens + 4 * b, 4, "GPU"),
                         0);
    assert_int_equal(kvf__zsubs_open(&zs), 0);
    assert_int_equal(kvf__zsubs_add(zs, kvf_events_endpoint(ev), kvf_events_replay_endpoint(ev),
                                    &idx, err, sizeof err),
                     0);
    const uint64_t asks[2] = {3, 1}, firsts[2] = {3, 2};
    for (int q = 0; q < 2; q++) {
        int rc = KVF_EAGAIN;
        for (int t = 0; t < 100 && rc == KVF_EAGAIN; t++) { /* the DEALER connects */
            rc = kvf__zsubs_replay_ask(zs, idx, asks[q]);
            if (rc == KVF_EAGAIN)
                usleep(10000);
        }
        assert_int_equal(rc, 0);
        uint64_t want = firsts[q];
        for (;;) {
            kvf__zmsg m;
            assert_int_equal(kvf__zsubs_replay_recv(zs, idx, 2000, &m), 0);
            if (m.len == 0)
                break; /* the end */
            assert_int_equal(kvf__kve_seq_get(m.seq), want);
            seen r = {0};
            assert_int_equal(kvf__kve_decode(m.payload, m.len, on_event, &r, NULL, err, sizeof err),
                             0);
            assert_true(r.hashes[0] == h[want - 1]);
            want++;
        }
        assert_int_equal(want, 5);
    }
    kvf__zsubs_close(&zs);
    kvf_events_close(&ev);
    kvf_events_opts badr = {.listen = "127.0.0.1:0", .replay = "nowhere"};
    assert_int_equal(kvf_events_open(&ev, &badr, err, sizeof err), KVF_EINVAL);
    assert_null(ev);
}

/* What a sharded test batch held: every hash stored and removed, and the stored ones' parents. */
typedef struct shard_seen {
    uint64_t stored[64], removed[64], parent[64];
    int has_parent[64];
    size_t n_stored, n_removed, n_cleared;
} shard_seen;

static int on_shard_event(void *ud, const kvf_kve *ev, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    shard_seen *s = ud;
    s->n_cleared += ev->type == KVF_KVE_ALL_CLEARED;
    for (size_t i = 0; i < ev->n_hashes; i++) {
        if (ev->type == KVF_KVE_BLOCK_REMOVED) {
            assert_true(s->n_removed < 64);
            s->removed[s->n_removed++] = ev->hashes[i];
        } else {
            assert_true(s->n_stored < 64);
            s->parent[s->n_stored] = ev->parent;
            s->has_parent[s->n_stored] = ev->has_parent;
            s->stored[s->n_stored++] = ev->hashes[i];
        }
    }
    return 0;
}

/* Subscribes zs to ev's batches under topic (a prefix) and asks ev's replay socket for them from
 * number 1, once its DEALER connected. Returns the subscription's number. */
static int replay_from_1(kvf__zsubs *zs, kvf_events *ev, const char *topic)
{
    char err[300];
    int idx;
    assert_int_equal(kvf__zsubs_add_topic(zs, kvf_events_endpoint(ev),
                                          kvf_events_replay_endpoint(ev), topic, &idx, err,
                                          sizeof err),
                     0);
    int rc = KVF_EAGAIN;
    for (int t = 0; t < 100 && rc == KVF_EAGAIN; t++) { /* the DEALER connects */
        rc = kvf__zsubs_replay_ask(zs, idx, 1);
        if (rc == KVF_EAGAIN)
            usleep(10000);
    }
    assert_int_equal(rc, 0);
    return idx;
}

/* Receives a replay's answers on subscription idx until its end: their numbers must run 1, 2,
 * ...; each batch decoded into sn where given. Returns how many came. */
static uint64_t replay_drain(kvf__zsubs *zs, int idx, shard_seen *sn)
{
    char err[300];
    uint64_t got = 0;
    for (;;) {
        kvf__zmsg m;
        assert_int_equal(kvf__zsubs_replay_recv(zs, idx, 2000, &m), 0);
        if (m.len == 0)
            return got;
        assert_int_equal(kvf__kve_seq_get(m.seq), ++got); /* this shard's own numbers */
        if (sn)
            assert_int_equal(
                kvf__kve_decode(m.payload, m.len, on_shard_event, sn, NULL, err, sizeof err), 0);
    }
}

/* A sharded publisher (kvf_events_opts.shards): each sequence's batches, its continuations and
 * its removals go under its first block's shard's topic only, numbered 1, 2, ... per shard (asked
 * of the replay socket by topic); a removal call of blocks of several shards makes one batch in
 * each; a subscription to one shard's topic receives that shard's batches only. */
static void test_connector_events_sharded(void **state)
{
    (void)state;
    enum { SEQS = 24, SHARDS = 4 };
    char err[300] = "";
    kvf_events *ev = NULL;
    kvf_events_opts big = {.listen = "127.0.0.1:0", .shards = KVF_EVENTS_MAX_SHARDS + 1};
    assert_int_equal(kvf_events_open(&ev, &big, err, sizeof err), KVF_EINVAL);
    assert_null(ev);
    assert_int_equal(kvf_events_shard_of(12345, 1), 0);
    int spread[SHARDS] = {0};
    for (uint64_t i = 0; i < 4000; i++)
        spread[kvf_events_shard_of(i * 0x9e3779b97f4a7c15ull, SHARDS)]++;
    for (int k = 0; k < SHARDS; k++)
        assert_true(spread[k] > 800);

    kvf_events_opts o = {.listen = "127.0.0.1:0", .replay = "127.0.0.1:0", .shards = SHARDS};
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    uint32_t tok[SEQS][12];
    uint64_t h[SEQS][3];
    uint32_t shard[SEQS];
    int per_shard[SHARDS] = {0};
    for (int j = 0; j < SEQS; j++) {
        for (int i = 0; i < 12; i++)
            tok[j][i] = 50u + (uint32_t)j * 100u + (uint32_t)i;
        assert_int_equal(kvf_events_hash_blocks(tok[j], 3, 4, 0, h[j]), 0);
        shard[j] = kvf_events_shard_of(h[j][0], SHARDS);
        per_shard[shard[j]]++;
        /* two blocks, then the third as a continuation (its shard is the first block's) */
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[j], 2, 0, 0, tok[j], 4, "GPU"), 0);
        assert_int_equal(
            kvf_events_publish(ev, NULL, 0, h[j] + 2, 1, 1, h[j][1], tok[j] + 8, 4, "GPU"), 0);
    }
    /* every third block removed in one call */
    uint64_t third[SEQS];
    for (int j = 0; j < SEQS; j++)
        third[j] = h[j][2];
    assert_int_equal(kvf_events_publish(ev, third, SEQS, NULL, 0, 0, 0, NULL, 4, NULL), 0);
    int touched = 0;
    for (int k = 0; k < SHARDS; k++)
        touched += per_shard[k] > 0;
    assert_int_equal(kvf_events_sequence(ev), 2 * SEQS + touched);

    kvf__zsubs *zs = NULL;
    assert_int_equal(kvf__zsubs_open(&zs), 0);
    for (uint32_t k = 0; k < SHARDS; k++) {
        char topic[64];
        snprintf(topic, sizeof topic, "%s%u/", KVF_EVENTS_SHARD_TOPIC, k);
        int idx = replay_from_1(zs, ev, topic);
        shard_seen sn = {0};
        assert_int_equal(replay_drain(zs, idx, &sn),
                         (uint64_t)(2 * per_shard[k] + (per_shard[k] > 0)));
        assert_int_equal(sn.n_stored, (size_t)(3 * per_shard[k]));
        assert_int_equal(sn.n_removed, (size_t)per_shard[k]);
        for (size_t i = 0; i < sn.n_stored; i++) {
            int found = 0;
            for (int j = 0; j < SEQS && !found; j++)
                for (int b = 0; b < 3; b++)
                    if (h[j][b] == sn.stored[i]) {
                        assert_int_equal(shard[j], k);
                        assert_int_equal(sn.has_parent[i], b == 2);
                        found = 1;
                    }
            assert_true(found);
        }
        for (size_t i = 0; i < sn.n_removed; i++) {
            int found = 0;
            for (int j = 0; j < SEQS; j++)
                if (third[j] == sn.removed[i]) {
                    assert_int_equal(shard[j], k);
                    found = 1;
                }
            assert_true(found);
        }
        kvf__zsubs_drop(zs, idx);
    }
    /* A replay request names a prefix, as a subscription does: shard 1's topic without its
     * slash ("kv-events/s/1", which a secured publisher's "kv-events/s/1/t/TENANT/" starts with
     * the same way) answers shard 1's batches. */
    {
        char topic[64];
        snprintf(topic, sizeof topic, "%s1", KVF_EVENTS_SHARD_TOPIC);
        int idx = replay_from_1(zs, ev, topic);
        assert_int_equal(replay_drain(zs, idx, NULL),
                         (uint64_t)(2 * per_shard[1] + (per_shard[1] > 0)));
        kvf__zsubs_drop(zs, idx);
    }

    /* Live: a subscription to shard 0's topic receives shard 0's batches and no other's. */
    int idx;
    char topic0[64];
    snprintf(topic0, sizeof topic0, "%s0/", KVF_EVENTS_SHARD_TOPIC);
    assert_int_equal(
        kvf__zsubs_add_topic(zs, kvf_events_endpoint(ev), NULL, topic0, &idx, err, sizeof err), 0);
    int got = 0;
    for (int t = 0; t < 200 && got < 3; t++) {
        uint32_t tk[4] = {7u + (uint32_t)t, 8, 9, 10};
        uint64_t hh;
        assert_int_equal(kvf_events_hash_blocks(tk, 1, 4, 0, &hh), 0);
        assert_int_equal(kvf_events_publish(ev, NULL, 0, &hh, 1, 0, 0, tk, 4, "GPU"), 0);
        uint8_t ready[KVF_ZSUBS_MAX];
        while (kvf__zsubs_poll(zs, t % 4 == 0 ? 10 : 0, ready) > 0 && ready[idx]) {
            kvf__zmsg m;
            assert_int_equal(kvf__zsubs_recv(zs, idx, &m), 0);
            assert_non_null(m.topic);
            assert_int_equal(m.topic_len, strlen(topic0));
            assert_memory_equal(m.topic, topic0, m.topic_len);
            shard_seen sn = {0};
            assert_int_equal(
                kvf__kve_decode(m.payload, m.len, on_shard_event, &sn, NULL, err, sizeof err), 0);
            assert_int_equal(sn.n_stored, 1);
            assert_int_equal(kvf_events_shard_of(sn.stored[0], SHARDS), 0);
            got++;
        }
    }
    assert_true(got >= 1);
    kvf__zsubs_close(&zs);
    kvf_events_close(&ev);
}

/* A sharded publisher remembers its blocks' shards up to shard_roots_max: one that stores past it
 * (removals missed upstream, or never sent) tells every shard AllBlocksCleared once and starts
 * again, instead of growing without bound. */
static void test_connector_events_sharded_roots_bounded(void **state)
{
    (void)state;
    enum { SHARDS = 4, MAXR = 40, SEQS = 60 };
    char err[300] = "";
    kvf_events *ev = NULL;
    kvf_events_opts o = {.listen = "127.0.0.1:0",
                         .replay = "127.0.0.1:0",
                         .shards = SHARDS,
                         .shard_roots_max = MAXR};
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    for (uint32_t j = 0; j < SEQS; j++) {
        uint32_t tok[4] = {900u + j, 1, 2, 3};
        uint64_t h;
        assert_int_equal(kvf_events_hash_blocks(tok, 1, 4, 0, &h), 0);
        assert_int_equal(kvf_events_publish(ev, NULL, 0, &h, 1, 0, 0, tok, 4, "GPU"), 0);
    }
    kvf__zsubs *zs = NULL;
    assert_int_equal(kvf__zsubs_open(&zs), 0);
    size_t stored = 0;
    for (uint32_t k = 0; k < SHARDS; k++) {
        char topic[64];
        snprintf(topic, sizeof topic, "%s%u/", KVF_EVENTS_SHARD_TOPIC, k);
        int idx = replay_from_1(zs, ev, topic);
        shard_seen sn = {0};
        (void)replay_drain(zs, idx, &sn);
        assert_int_equal(sn.n_cleared, 1); /* once, at the 41st block */
        stored += sn.n_stored;
        kvf__zsubs_drop(zs, idx);
    }
    assert_int_equal(stored, SEQS);
    kvf__zsubs_close(&zs);
    kvf_events_close(&ev);
}

/* This process's resident memory in KiB (the second field of /proc/self/statm, in pages). */
static long self_rss_kib(void)
{
    long pages = -1;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f && fscanf(f, "%*d %ld", &pages) != 1)
        pages = -1;
    if (f)
        fclose(f);
    return pages < 0 ? -1 : pages * (sysconf(_SC_PAGESIZE) / 1024);
}

/* A replay socket answers each request with its whole window: 20 requests of a 64 MiB window
 * from a requester that reads none of the answers queue the ring's batches by reference, not 20
 * copies of them (1.3 GB before). */
static void test_connector_replays_share_the_window(void **state)
{
    (void)state;
    enum { BATCHES = 64, REQUESTS = 20 };
    const size_t len = 1u << 20;
    char err[300], ep[160], rep_ep[160];
    kvf__zpub *p = NULL;
    assert_int_equal(kvf__zpub_open(&p, "127.0.0.1", 0, 0, ep, sizeof ep, err, sizeof err), 0);
    /* room for 4,096 batches (a peer's queue holds as many messages), 64 of 1 MiB kept */
    assert_int_equal(kvf__zpub_replay(p, "127.0.0.1", 0, 4096, (size_t)BATCHES * len, rep_ep,
                                      sizeof rep_ep, err, sizeof err),
                     0);
    uint8_t *payload = malloc(len);
    for (uint64_t s = 1; s <= BATCHES; s++) {
        memset(payload, (int)s, len);
        assert_int_equal(kvf__zpub_send(p, "kv-events", s, payload, len), 0);
    }
    free(payload);
    long before = self_rss_kib();
    void *ctx = zmq_ctx_new(), *d = zmq_socket(ctx, ZMQ_DEALER);
    int one = 1, zero = 0, small = 4096;
    zmq_setsockopt(d, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(d, ZMQ_RCVHWM, &one, sizeof one); /* this side keeps next to nothing */
    zmq_setsockopt(d, ZMQ_RCVBUF, &small, sizeof small);
    assert_int_equal(zmq_connect(d, rep_ep), 0);
    uint8_t from[8] = {0, 0, 0, 0, 0, 0, 0, 1};
    for (int i = 0; i < REQUESTS; i++) {
        assert_int_equal(zmq_send(d, "", 0, ZMQ_SNDMORE), 0);
        assert_int_equal(zmq_send(d, from, 8, 0), 8);
    }
    long after = before;
    for (int t = 0; t < 20; t++) { /* 2 s: the answers are queued by then */
        usleep(100000);
        long now = self_rss_kib();
        after = now > after ? now : after;
    }
    print_message("RSS %ld -> %ld KiB with %d unread answers of a %d MiB window\n", before, after,
                  REQUESTS, BATCHES);
    assert_true(after - before < 300 * 1024);
    zmq_close(d);
    zmq_ctx_term(ctx);
    kvf__zpub_close(&p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_connector_pagemap_round_trips),
        cmocka_unit_test(test_connector_register_rejects_bad_memory),
        cmocka_unit_test(test_connector_transfer_arguments),
        cmocka_unit_test(test_connector_transport_says_why),
        cmocka_unit_test(test_connector_events_publish),
        cmocka_unit_test(test_connector_events_sharded),
        cmocka_unit_test(test_connector_events_sharded_roots_bounded),
        cmocka_unit_test(test_connector_replays_share_the_window),
    };
    return cmocka_run_group_tests_name("connector", tests, NULL, NULL);
}
