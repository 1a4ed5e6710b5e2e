/*
 * A prefetch that takes a plan's sources (kvf_connector_prefetch_from): each run of chunks is
 * asked first of the storage node the plan names, a hot chunk's replica, and of the chunk's own
 * node where that one lacks it. Two real kvf-store daemons on loopback, over TCP (--shm off) and
 * over shared memory:
 *
 * - chunks saved to their own nodes, the plan naming the other node for all of them: every chunk
 *   arrives (asked of its own node after the named one's miss), bytes as saved;
 * - chunks stored on node b only: without sources those whose own node is a are misses; with
 *   sources naming b every chunk arrives, from b, and none is asked again;
 * - a source naming a node the connector does not use is counted and passed over; bad arguments
 *   are refused;
 * - the connector closed while a prefetch waits on a named node that does not answer: no crash,
 *   nothing asked of a client being closed;
 * - layerwise loads with the same sources (kvf_connector_load_planned): over TCP each chunk
 *   from its named node, those it lacks from their own node in the same get, bytes as saved;
 *   chunks on b only load whole with b named and fail without; runs matched by the chunks'
 *   tokens in the whole prompt from a first chunk on.
 */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <signal.h>

#include "kvf/client.h"
#include "kvf/connector.h"
#include "kvf/error.h"

#include "harness.h"

#define LAYERS 4
#define PAGES  64
#define CHUNKS 16
#define CT     32 /* chunk tokens */
#define PT     16 /* page tokens */
#define N      (CHUNKS * CT)
#define NP     (N / PT)

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

typedef struct pages {
    size_t page;
    uint8_t *src[LAYERS][2], *dst[LAYERS][2];
    kvf_kv_layer rs[LAYERS], rd[LAYERS];
} pages;

static void pages_init(pages *p, const kvf_layout *l)
{
    p->page = (size_t)l->page_tokens * l->kv_heads * l->head_dim * kvf_layout_dtype_size(l->dtype);
    for (int i = 0; i < LAYERS; i++) {
        for (int k = 0; k < 2; k++) {
            p->src[i][k] = malloc(PAGES * p->page);
            p->dst[i][k] = calloc(PAGES, p->page);
            assert_non_null(p->src[i][k]);
            assert_non_null(p->dst[i][k]);
            for (size_t b = 0; b < PAGES * p->page; b++)
                p->src[i][k][b] = (uint8_t)rnd();
        }
        p->rs[i] = (kvf_kv_layer){p->src[i][0], p->src[i][1], p->page, PAGES, KVF_MEM_HOST};
        p->rd[i] = (kvf_kv_layer){p->dst[i][0], p->dst[i][1], p->page, PAGES, KVF_MEM_HOST};
    }
}

static void pages_free(pages *p)
{
    for (int i = 0; i < LAYERS; i++)
        for (int k = 0; k < 2; k++)
            free(p->src[i][k]), free(p->dst[i][k]);
}

/* The test's KV layout: 4 layers, 2 KV heads of 32 f32, pages of 16 tokens, chunks of 32. */
static void layout_init(kvf_layout *l)
{
    *l = (kvf_layout){0};
    snprintf(l->model_id, sizeof l->model_id, "plan-sources");
    l->layers = LAYERS;
    l->kv_heads = 2;
    l->head_dim = 32;
    l->dtype = KVF_DTYPE_F32;
    l->kind = KVF_KV_SEPARATE;
    l->page_tokens = PT;
    l->chunk_tokens = CT;
    l->tp_size = 1;
    char err[400];
    assert_int_equal(kvf_layout_validate(l, err, sizeof err), 0);
}

static kvf_connector *open_on(const char *const *nodes, size_t n, const kvf_layout *l,
                              const pages *p)
{
    kvf_connector_opts o = {.nodes = nodes,
                            .n_nodes = n,
                            .layout = *l,
                            .deadline_ms = 3000,
                            .stores_refresh_ms = -1,
                            .salt = "plan-sources"};
    kvf_connector *cn;
    char err[400];
    int rc = kvf_connector_open(&cn, &o, err, sizeof err);
    if (rc)
        fail_msg("connector: %s", err);
    assert_int_equal(kvf_connector_register(cn, p->rs, LAYERS, err, sizeof err), 0);
    return cn;
}

static void save(kvf_connector *cn, const uint32_t *t, const uint32_t *ids)
{
    kvf_xfer *x;
    assert_int_equal(kvf_connector_save(cn, t, N, 0, ids, NP, &x), 0);
    for (uint32_t i = 0; i < LAYERS; i++)
        assert_int_equal(kvf_xfer_layer_done(x, i), 0);
    assert_int_equal(kvf_xfer_wait(x), 0);
    kvf_xfer_free(&x);
}

/* Prefetches t with sources src (n_src; 0: kvf_connector_prefetch) and returns the tokens that
 * arrived; with check, loads them into the destination pages (registered) and compares them with
 * the saved ones. */
static size_t fetch(kvf_connector *cn, pages *p, const uint32_t *t, const uint32_t *ids,
                    const kvf_source *src, size_t n_src, int check)
{
    kvf_prefetch *pf = NULL;
    int rc = n_src ? kvf_connector_prefetch_from(cn, t, N, src, n_src, &pf)
                   : kvf_connector_prefetch(cn, t, N, &pf);
    assert_int_equal(rc, 0);
    size_t ready = kvf_prefetch_wait(pf, 0);
    if (check && ready) {
        for (int i = 0; i < LAYERS; i++)
            for (int k = 0; k < 2; k++)
                memset(p->dst[i][k], 0, PAGES * p->page);
        kvf_xfer *x;
        assert_int_equal(kvf_connector_load_prefetched(cn, pf, t, ready, ids, ready / PT, &x), 0);
        assert_int_equal(kvf_xfer_wait(x), 0);
        assert_int_equal(kvf_xfer_loaded_tokens(x), ready);
        kvf_xfer_free(&x);
        for (size_t pg = 0; pg < ready / PT; pg++)
            for (int i = 0; i < LAYERS; i++)
                for (int k = 0; k < 2; k++)
                    assert_memory_equal(p->dst[i][k] + ids[pg] * p->page,
                                        p->src[i][k] + ids[pg] * p->page, p->page);
    }
    kvf_prefetch_free(&pf);
    return ready;
}

/* Loads t layer by layer with sources src (n_src; 0: kvf_connector_load_from) from chunk
 * first_chunk into the destination pages (registered); returns the tokens loaded (0 when the load
 * failed) after comparing every loaded page with the saved one. */
static size_t load(kvf_connector *cn, pages *p, const uint32_t *t, const uint32_t *ids,
                   size_t first_chunk, const kvf_source *src, size_t n_src)
{
    for (int i = 0; i < LAYERS; i++)
        for (int k = 0; k < 2; k++)
            memset(p->dst[i][k], 0, PAGES * p->page);
    kvf_xfer *x;
    int rc = n_src ? kvf_connector_load_planned(cn, t, N, first_chunk, src, n_src, ids, NP, &x)
                   : kvf_connector_load_from(cn, t, N, first_chunk, ids, NP, &x);
    assert_int_equal(rc, 0);
    size_t got = kvf_xfer_wait(x) == 0 ? kvf_xfer_loaded_tokens(x) : 0;
    kvf_xfer_free(&x);
    for (size_t pg = first_chunk * CT / PT; pg < got / PT; pg++)
        for (int i = 0; i < LAYERS; i++)
            for (int k = 0; k < 2; k++)
                assert_memory_equal(p->dst[i][k] + ids[pg] * p->page,
                                    p->src[i][k] + ids[pg] * p->page, p->page);
    return got;
}

/* Layerwise loads that take the plan's sources (kvf_connector_load_planned), on the connector of
 * run_case: t1 each chunk on its own node, t2 every chunk on b only. Over TCP the chunks a plan
 * names go to the named node, and those it lacks to their own node in the same get; over shared
 * memory the load reads the arenas of this host in place (sources are not needed there). */
static void run_loads(kvf_connector *cn, pages *p, const daemon_t *a, const daemon_t *b,
                      const uint32_t *t1, const uint32_t *t2, const uint32_t *ids, int over_shm)
{
    const char *how = over_shm ? "shm" : "tcp";
    kvf_connector_stats s0, s1;
    kvf_source all_b = {.store = b->addr, .from = 0, .tokens = N};
    /* 1. t1 with b named for every chunk: those whose own node is a are asked of a after b's
     * miss, in the same get. */
    kvf_connector_stats_get(cn, &s0);
    assert_int_equal(load(cn, p, t1, ids, 0, &all_b, 1), N);
    kvf_connector_stats_get(cn, &s1);
    uint64_t named = s1.load_named - s0.load_named;
    uint64_t reasked = s1.load_named_reasked - s0.load_named_reasked;
    printf("%s: load of t1, all named b: %" PRIu64 " of %d chunks named, %" PRIu64
           " asked again of their own node\n",
           how, named, CHUNKS, reasked);
    if (over_shm) {
        assert_int_equal(named, 0); /* read in place from the arenas of this host */
    } else {
        assert_true(named >= 1 && named < CHUNKS);
        assert_int_equal(reasked, named);
    }
    /* 2. t2 is on b only: its own nodes' lookup ends at the first chunk of a, and a load from
     * the chunks' own nodes fails (a chunk of a is missing in every layer) ... */
    size_t own = 0, planned = 0;
    assert_int_equal(kvf_connector_lookup(cn, t2, N, &own), 0);
    assert_true(own < N);
    assert_int_equal(load(cn, p, t2, ids, 0, NULL, 0), 0);
    /* ... with b named, the planned lookup finds it all and the load brings it whole, from b
     * (over shared memory too: the chunks' own arenas lack some, so the get asks b), nothing
     * asked again. */
    assert_int_equal(kvf_connector_lookup_planned(cn, t2, N, &all_b, 1, &planned), 0);
    assert_int_equal(planned, N);
    kvf_connector_stats_get(cn, &s0);
    assert_int_equal(load(cn, p, t2, ids, 0, &all_b, 1), N);
    kvf_connector_stats_get(cn, &s1);
    printf("%s: t2 (on b only): own nodes' lookup %zu tokens, planned %zu, loaded %d (%" PRIu64
           " chunks named)\n",
           how, own, planned, N, s1.load_named - s0.load_named);
    assert_true(s1.load_named - s0.load_named >= 1);
    assert_int_equal(s1.load_named_reasked, s0.load_named_reasked);
    /* a plan naming a node that lacks what the own nodes lack finds no more than they do */
    kvf_source all_a = {.store = a->addr, .from = 0, .tokens = N};
    assert_int_equal(kvf_connector_lookup_planned(cn, t2, N, &all_a, 1, &planned), 0);
    assert_int_equal(planned, own);
    assert_int_equal(kvf_connector_lookup_planned(cn, t2, N, NULL, 1, &planned), KVF_EINVAL);
    if (over_shm)
        return;
    /* 3. From chunk 4 on, b named for tokens from chunk 4: the runs are matched by the chunks'
     * tokens in the whole prompt. */
    kvf_source tail_b = {.store = b->addr, .from = 4 * CT, .tokens = N - 4 * CT};
    assert_int_equal(load(cn, p, t2, ids, 4, &tail_b, 1), N);
    /* 4. Runs: a node the connector does not use is counted and passed over; a first half named
     * a, the rest b (t1: every chunk found, named where the run is not its own node). */
    kvf_source mix[3] = {{.store = "127.0.0.1:1", .from = 0, .tokens = 64},
                         {.store = a->addr, .from = 0, .tokens = N / 2},
                         {.store = b->addr, .from = N / 2, .tokens = 10 * N}};
    kvf_connector_stats_get(cn, &s0);
    assert_int_equal(load(cn, p, t1, ids, 0, mix, 3), N);
    kvf_connector_stats_get(cn, &s1);
    assert_int_equal(s1.load_sources_unknown - s0.load_sources_unknown, 1);
    /* 5. Bad arguments. */
    kvf_xfer *x = NULL;
    assert_int_equal(kvf_connector_load_planned(cn, t1, N, 0, NULL, 1, ids, NP, &x), KVF_EINVAL);
    assert_null(x);
}

static void run_case(const char *extra, int over_shm)
{
    daemon_t a, b;
    daemon_start(&a, "64M", extra);
    daemon_start(&b, "64M", extra);
    kvf_layout l;
    layout_init(&l);
    pages p;
    pages_init(&p, &l);
    const char *ab[2] = {a.addr, b.addr}, *bo[1] = {b.addr};
    kvf_connector *cn = open_on(ab, 2, &l, &p), *cb = open_on(bo, 1, &l, &p);

    uint32_t t1[N], t2[N], ids[NP];
    for (size_t i = 0; i < N; i++) {
        t1[i] = (uint32_t)(1000 + i);
        t2[i] = (uint32_t)(900000 + i);
    }
    for (size_t i = 0; i < NP; i++)
        ids[i] = (uint32_t)((i * 7 + 3) % PAGES);
    save(cn, t1, ids); /* each chunk on its own node */
    save(cb, t2, ids); /* every chunk on b only */
    /* from now on cn loads into the destination pages (no transfer is in flight) */
    char err[400];
    assert_int_equal(kvf_connector_register(cn, p.rd, LAYERS, err, sizeof err), 0);

    kvf_connector_stats s0, s1;
    /* 1. The plan names b for every chunk of t1: those whose own node is a are not on b. */
    kvf_source all_b = {.store = b.addr, .from = 0, .tokens = N};
    kvf_connector_stats_get(cn, &s0);
    assert_int_equal(fetch(cn, &p, t1, ids, &all_b, 1, 1), N);
    kvf_connector_stats_get(cn, &s1);
    uint64_t named_a = s1.prefetch_named - s0.prefetch_named; /* t1's chunks whose node is a */
    uint64_t missed = s1.prefetch_named_missed - s0.prefetch_named_missed;
    printf("%s: t1, all named b: %" PRIu64 " of %d chunks named (their node is a), %" PRIu64
           " asked again of a\n",
           over_shm ? "shm" : "tcp", named_a, CHUNKS, missed);
    assert_true(named_a >= 1 && named_a < CHUNKS); /* 2^-15 odds of all on one node */
    /* Over TCP the connector asks them again; over shared memory the client does, in the same
     * get (a nearer holder's miss, docs/store.md), so the connector sees none. */
    assert_int_equal(missed, over_shm ? 0 : named_a);
    assert_int_equal(s1.prefetch_sources_unknown, s0.prefetch_sources_unknown);

    /* 2. t2 is on b only: without sources the chunks whose node is a are misses ... */
    kvf_connector_stats_get(cn, &s0);
    fetch(cn, &p, t2, ids, NULL, 0, 0);
    kvf_connector_stats_get(cn, &s1);
    uint64_t arrived = s1.prefetch_chunks - s0.prefetch_chunks;
    assert_true(arrived < CHUNKS);
    /* ... and with b named, every chunk comes, from b, none asked again. */
    kvf_connector_stats_get(cn, &s0);
    assert_int_equal(fetch(cn, &p, t2, ids, &all_b, 1, 1), N);
    kvf_connector_stats_get(cn, &s1);
    printf("%s: t2 (on b only): %" PRIu64 " of %d chunks without sources, all %d named b (%" PRIu64
           " named, %" PRIu64 " missed)\n",
           over_shm ? "shm" : "tcp", arrived, CHUNKS, CHUNKS, s1.prefetch_named - s0.prefetch_named,
           s1.prefetch_named_missed - s0.prefetch_named_missed);
    assert_int_equal(s1.prefetch_named - s0.prefetch_named, CHUNKS - arrived);
    assert_int_equal(s1.prefetch_named_missed, s0.prefetch_named_missed);
    assert_int_equal(s1.prefetch_chunks - s0.prefetch_chunks, CHUNKS);

    /* 3. Runs: a for the first half, b for the rest; one naming a node the connector does not
     * use, passed over; a run past the prompt's end, harmless. */
    kvf_source mix[3] = {{.store = "127.0.0.1:1", .from = 0, .tokens = 64},
                         {.store = a.addr, .from = 0, .tokens = N / 2},
                         {.store = b.addr, .from = N / 2, .tokens = 10 * N}};
    kvf_connector_stats_get(cn, &s0);
    assert_int_equal(fetch(cn, &p, t1, ids, mix, 3, 1), N);
    kvf_connector_stats_get(cn, &s1);
    assert_int_equal(s1.prefetch_sources_unknown - s0.prefetch_sources_unknown, 1);

    /* 4. Bad arguments. */
    kvf_prefetch *pf = NULL;
    assert_int_equal(kvf_connector_prefetch_from(cn, t1, N, NULL, 1, &pf), KVF_EINVAL);
    assert_null(pf);
    kvf_source nul = {.store = NULL, .from = 0, .tokens = N};
    kvf_connector_stats_get(cn, &s0);
    assert_int_equal(fetch(cn, &p, t1, ids, &nul, 1, 0), N);
    kvf_connector_stats_get(cn, &s1);
    assert_int_equal(s1.prefetch_named, s0.prefetch_named);

    /* Every prefetch after the first took the memory an earlier one gave back (their bytes were
     * checked above all the same). */
    kvf_connector_stats_get(cn, &s1);
    assert_true(s1.prefetch_memory_reused >= s1.prefetches - 2);

    run_loads(cn, &p, &a, &b, t1, t2, ids, over_shm);

    kvf_connector_close(&cn);
    kvf_connector_close(&cb);
    pages_free(&p);
    daemon_stop(&a);
    daemon_stop(&b);
}

/* The connector closed while a prefetch waits on a named node that does not answer (stopped):
 * the close cancels the groups, and nothing is asked again of a client being closed; the prefetch
 * then ends with what it had (nothing from b) and is freed after the connector. */
static void run_close(const char *extra_a, const char *extra_b)
{
    daemon_t a, b;
    daemon_start(&a, "64M", extra_a);
    daemon_start(&b, "64M", extra_b);
    kvf_layout l;
    layout_init(&l);
    pages p;
    pages_init(&p, &l);
    const char *ab[2] = {a.addr, b.addr};
    kvf_connector *cn = open_on(ab, 2, &l, &p);
    uint32_t t[N], ids[NP];
    for (size_t i = 0; i < N; i++)
        t[i] = (uint32_t)(5000 + i);
    for (size_t i = 0; i < NP; i++)
        ids[i] = (uint32_t)((i * 5 + 1) % PAGES);
    save(cn, t, ids);
    assert_int_equal(kill(b.pid, SIGSTOP), 0);
    kvf_source all_b = {.store = b.addr, .from = 0, .tokens = N};
    kvf_prefetch *pf = NULL;
    assert_int_equal(kvf_connector_prefetch_from(cn, t, N, &all_b, 1, &pf), 0);
    nanosleep(&(struct timespec){0, 200 * 1000000L}, NULL);
    kvf_connector_close(&cn);
    size_t ready = kvf_prefetch_wait(pf, 0);
    assert_true(ready < N); /* the chunks named b never came */
    kvf_prefetch_free(&pf);
    assert_int_equal(kill(b.pid, SIGCONT), 0);
    pages_free(&p);
    daemon_stop(&a);
    daemon_stop(&b);
}

static void test_close_under_named_prefetch_tcp(void **state)
{
    (void)state;
    run_close("--threads 1 --shm off", "--threads 1 --shm off");
}

static void test_close_under_named_prefetch_shm(void **state)
{
    (void)state;
    run_close("--threads 1", "--threads 1 --shm off");
}

/* A node is found by its address however the loopback host is spelt; another loopback address,
 * another port or no address at all is no node. */
static void test_node_index(void **state)
{
    (void)state;
    daemon_t a, b;
    daemon_start(&a, "16M", "--threads 1 --shm off");
    daemon_start(&b, "16M", "--threads 1 --shm off");
    char na[64], nb[64], q[80];
    snprintf(na, sizeof na, "localhost:%u", a.port);
    snprintf(nb, sizeof nb, "127.0.0.1:%u", b.port);
    const char *nodes[2] = {na, nb};
    kvf_client_opts o = {.nodes = nodes, .n_nodes = 2, .ns = 7};
    kvf_client *c;
    char err[300];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client: %s", err);
    snprintf(q, sizeof q, "127.0.0.1:%u", a.port);
    assert_int_equal(kvf_client_node_index(c, q), 0);
    snprintf(q, sizeof q, "tcp://[::1]:%u", a.port);
    assert_int_equal(kvf_client_node_index(c, q), 0);
    snprintf(q, sizeof q, "LOCALHOST:%u", b.port);
    assert_int_equal(kvf_client_node_index(c, q), 1);
    snprintf(q, sizeof q, "127.0.0.2:%u", b.port);
    assert_int_equal(kvf_client_node_index(c, q), -1);
    snprintf(q, sizeof q, "127.0.0.1:%u", (unsigned)(b.port ^ 1));
    if ((uint16_t)(b.port ^ 1) != a.port)
        assert_int_equal(kvf_client_node_index(c, q), -1);
    assert_int_equal(kvf_client_node_index(c, "no port"), -1);
    assert_int_equal(kvf_client_node_index(c, NULL), -1);
    assert_int_equal(kvf_client_node_index(NULL, q), -1);
    kvf_client_close(&c);
    daemon_stop(&a);
    daemon_stop(&b);
}

static void test_sources_tcp(void **state)
{
    (void)state;
    run_case("--threads 1 --shm off", 0);
}

static void test_sources_shm(void **state)
{
    (void)state;
    run_case("--threads 1", 1);
}

int main(void)
{
    harness_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_node_index, teardown_daemons),
        cmocka_unit_test_teardown(test_sources_tcp, teardown_daemons),
        cmocka_unit_test_teardown(test_sources_shm, teardown_daemons),
        cmocka_unit_test_teardown(test_close_under_named_prefetch_tcp, teardown_daemons),
        cmocka_unit_test_teardown(test_close_under_named_prefetch_shm, teardown_daemons),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
