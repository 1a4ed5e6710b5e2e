/*
 * A connector whose storage nodes come from kvf-sched (connector/stores.c) while the set changes
 * under it: a fake kvf-sched of this test answers GET /v1/stores with a list that a thread flips
 * between one and two real kvf-store daemons every few milliseconds, and the connector asks every
 * 10 ms. Meanwhile saves, loads and prefetches run without a pause: every page loaded must hold
 * the bytes saved (a chunk looked for on a store it was not saved to is a miss, never other
 * bytes), nothing may fail but as a miss, and the clients the connector opened on each change
 * must all be closed by the end. Also run under ASan and TSan (tests/run.sh): the holds that keep
 * a client open for its transfers are what this exercises.
 */
#define _GNU_SOURCE /* sched_getaffinity, as core/cpus.c counts the cores */
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
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvf/connector.h"
#include "kvf/error.h"

#include "harness.h"

/* ------------------------------------------------------------------------------------------ */
/* A fake kvf-sched: GET /v1/stores answers body[] (one HTTP/1.0 reply per connection). */

typedef struct fake_sched {
    int fd;
    uint16_t port;
    pthread_t th;
    atomic_int stop;
    pthread_mutex_t mu;
    char body[512];
    atomic_int served;
} fake_sched;

static void *sched_main(void *arg)
{
    fake_sched *f = arg;
    while (!atomic_load(&f->stop)) {
        int c = accept(f->fd, NULL, NULL);
        if (c < 0)
            continue;
        char req[2048];
        size_t got = 0;
        while (got < sizeof req - 1 && !strstr(req, "\r\n\r\n")) {
            ssize_t r = read(c, req + got, sizeof req - 1 - got);
            if (r <= 0)
                break;
            got += (size_t)r;
            req[got] = 0;
        }
        char reply[1024];
        pthread_mutex_lock(&f->mu);
        int n = snprintf(reply, sizeof reply,
                         "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                         "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                         strlen(f->body), f->body);
        pthread_mutex_unlock(&f->mu);
        ssize_t w = write(c, reply, (size_t)n);
        (void)w;
        close(c);
        atomic_fetch_add(&f->served, 1);
    }
    return NULL;
}

static void sched_set(fake_sched *f, const char *a, const char *b)
{
    pthread_mutex_lock(&f->mu);
    if (b)
        snprintf(f->body, sizeof f->body, "{\"stores\": [\"%s\", \"%s\"]}", a, b);
    else
        snprintf(f->body, sizeof f->body, "{\"stores\": [\"%s\"]}", a);
    pthread_mutex_unlock(&f->mu);
}

static void sched_start(fake_sched *f)
{
    memset(f, 0, sizeof *f);
    pthread_mutex_init(&f->mu, NULL);
    f->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(f->fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(f->fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(listen(f->fd, 64), 0);
    socklen_t sl = sizeof sa;
    assert_int_equal(getsockname(f->fd, (struct sockaddr *)&sa, &sl), 0);
    f->port = ntohs(sa.sin_port);
    /* accept() wakes every 100 ms to see stop */
    struct timeval tv = {.tv_sec = 0, .tv_usec = 100000};
    setsockopt(f->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    assert_int_equal(pthread_create(&f->th, NULL, sched_main, f), 0);
}

static void sched_stop(fake_sched *f)
{
    atomic_store(&f->stop, 1);
    pthread_join(f->th, NULL);
    close(f->fd);
    pthread_mutex_destroy(&f->mu);
}

/* Flips the list between {a} and {a, b} every few milliseconds until stop. */
typedef struct flipper {
    fake_sched *f;
    const char *a, *b;
    atomic_int stop;
    int flips;
} flipper;

static void *flip_main(void *arg)
{
    flipper *fl = arg;
    for (int i = 0; !atomic_load(&fl->stop) && i < 2000; i++) {
        sched_set(fl->f, fl->a, i % 2 ? NULL : fl->b);
        fl->flips++;
        struct timespec ts = {0, 25 * 1000000L};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */

#define LAYERS 4
#define PAGES  64

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* The tests' layout: LAYERS layers of 2 heads of 32 f32, pages of 16 tokens, chunks of 32. */
static kvf_layout test_layout(const char *model_id)
{
    kvf_layout l = {0};
    snprintf(l.model_id, sizeof l.model_id, "%s", model_id);
    l.layers = LAYERS;
    l.kv_heads = 2;
    l.head_dim = 32;
    l.dtype = KVF_DTYPE_F32;
    l.kind = KVF_KV_SEPARATE;
    l.page_tokens = 16;
    l.chunk_tokens = 32;
    l.tp_size = 1;
    char err[400];
    assert_int_equal(kvf_layout_validate(&l, err, sizeof err), 0);
    return l;
}

/* PAGES pages per plane of every layer: src random, dst for loads; returns one page's bytes (one
 * plane: its tokens' heads). */
static size_t pages_make(const kvf_layout *l, uint8_t *src[LAYERS][2], uint8_t *dst[LAYERS][2],
                         kvf_kv_layer rs[LAYERS], kvf_kv_layer rd[LAYERS])
{
    size_t page =
        (size_t)l->page_tokens * l->kv_heads * l->head_dim * kvf_layout_dtype_size(l->dtype);
    for (int i = 0; i < LAYERS; i++) {
        for (int p = 0; p < 2; p++) {
            src[i][p] = malloc(PAGES * page);
            dst[i][p] = malloc(PAGES * page);
            assert_non_null(src[i][p]);
            assert_non_null(dst[i][p]);
            for (size_t k = 0; k < PAGES * page; k++)
                src[i][p][k] = (uint8_t)rnd();
        }
        rs[i] = (kvf_kv_layer){src[i][0], src[i][1], page, PAGES, KVF_MEM_HOST};
        rd[i] = (kvf_kv_layer){dst[i][0], dst[i][1], page, PAGES, KVF_MEM_HOST};
    }
    return page;
}

static void pages_free(uint8_t *src[LAYERS][2], uint8_t *dst[LAYERS][2])
{
    for (int i = 0; i < LAYERS; i++)
        for (int p = 0; p < 2; p++)
            free(src[i][p]), free(dst[i][p]);
}

static void test_stores_change_under_transfers(void **state)
{
    (void)state;
    daemon_t a, b;
    daemon_start(&a, "64M", "--threads 1");
    daemon_start(&b, "64M", "--threads 1");
    fake_sched fs;
    sched_start(&fs);
    sched_set(&fs, a.addr, NULL);
    char sched_addr[64];
    snprintf(sched_addr, sizeof sched_addr, "127.0.0.1:%u", fs.port);

    kvf_layout l = test_layout("stores-churn");
    char err[400];
    kvf_connector_opts o = {.sched = sched_addr,
                            .layout = l,
                            .deadline_ms = 3000,
                            .stores_refresh_ms = 10,
                            .salt = "stores-churn"};
    kvf_connector *cn;
    assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), 0);

    uint8_t *src[LAYERS][2], *dst[LAYERS][2];
    kvf_kv_layer rs[LAYERS], rd[LAYERS];
    size_t page = pages_make(&l, src, dst, rs, rd);
    flipper fl = {.f = &fs, .a = a.addr, .b = b.addr};
    pthread_t fth;
    assert_int_equal(pthread_create(&fth, NULL, flip_main, &fl), 0);

    const size_t n = 8 * 32, np = n / 16; /* 8 chunks, 16 pages */
    uint32_t ids[16];
    size_t loaded_tokens = 0, rounds = 0;
    uint64_t t_end = (uint64_t)time(NULL) + 3;
    for (int r = 0; r < 400 && (uint64_t)time(NULL) < t_end; r++, rounds++) {
        uint32_t t[8 * 32];
        for (size_t i = 0; i < n; i++)
            t[i] = (uint32_t)(r * 1000 + i);
        for (size_t i = 0; i < np; i++)
            ids[i] = (uint32_t)((r * 16 + i) % PAGES);
        /* save */
        for (int k = 0;
             k < 200 && kvf_connector_register(cn, rs, LAYERS, err, sizeof err) == KVF_EBUSY; k++)
            nanosleep(&(struct timespec){0, 5 * 1000000L}, NULL);
        assert_int_equal(kvf_connector_register(cn, rs, LAYERS, err, sizeof err), 0);
        kvf_xfer *x;
        assert_int_equal(kvf_connector_save(cn, t, n, 0, ids, np, &x), 0);
        for (uint32_t i = 0; i < LAYERS; i++)
            assert_int_equal(kvf_xfer_layer_done(x, i), 0);
        int rc = kvf_xfer_wait(x);
        assert_true(rc == 0 || rc == KVF_EHOSTUNREACH || rc == KVF_ETIMEDOUT);
        kvf_xfer_free(&x);
        /* a prefetch, freed whatever arrived */
        kvf_prefetch *pf = NULL;
        if (kvf_connector_prefetch(cn, t, n, &pf) == 0) {
            kvf_prefetch_wait(pf, 0);
            kvf_prefetch_free(&pf);
        }
        /* load: what arrives is what was saved (the prefetch's last group may still be counted
         * in flight for a moment: registration waits for none) */
        for (int k = 0;
             k < 200 && kvf_connector_register(cn, rd, LAYERS, err, sizeof err) == KVF_EBUSY; k++)
            nanosleep(&(struct timespec){0, 5 * 1000000L}, NULL);
        assert_int_equal(kvf_connector_register(cn, rd, LAYERS, err, sizeof err), 0);
        for (int i = 0; i < LAYERS; i++)
            for (int p = 0; p < 2; p++)
                memset(dst[i][p], 0, PAGES * page);
        assert_int_equal(kvf_connector_load(cn, t, n, ids, np, &x), 0);
        (void)kvf_xfer_wait(x); /* a miss where the chunk's store changed since the save */
        size_t got = kvf_xfer_loaded_tokens(x);
        kvf_xfer_free(&x);
        loaded_tokens += got;
        for (size_t pg = 0; pg < got / 16; pg++)
            for (int i = 0; i < LAYERS; i++)
                for (int p = 0; p < 2; p++)
                    assert_memory_equal(dst[i][p] + ids[pg] * page, src[i][p] + ids[pg] * page,
                                        page);
    }
    atomic_store(&fl.stop, 1);
    pthread_join(fth, NULL);
    kvf_connector_stats st;
    kvf_connector_stats_get(cn, &st);
    printf("stores churn: %zu rounds, %d flips, %" PRIu64 " clients opened, %" PRIu64
           " closed, %zu tokens loaded of %zu\n",
           rounds, fl.flips, st.store_clients_opened, st.store_clients_closed, loaded_tokens,
           rounds * n);
    assert_true(rounds >= 5);
    assert_true(st.store_clients_opened >= 3); /* the set changed under the transfers */
    assert_true(loaded_tokens > 0);
    /* nothing holds the old clients now: the refresher closes them all */
    for (int i = 0; i < 200; i++) {
        kvf_connector_stats_get(cn, &st);
        if (st.store_clients_closed == st.store_clients_opened)
            break;
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(st.store_clients_closed, st.store_clients_opened);
    kvf_connector_close(&cn);
    sched_stop(&fs);
    pages_free(src, dst);
    daemon_stop(&a);
    daemon_stop(&b);
}

/* A save cancelled at once after its last layer was reported, many times: the cancel comes while
 * the batch's put is being started (the workers gathered the last layer and decided to put it) or
 * after. Such a save is not withdrawn: it completes or fails as it would have, and freeing it
 * waits for that. Before the put's start was waited for, a cancel in that gap completed the
 * transfer and its free released the batch's memory under the put (the sanitizer builds' find).
 * Every save is whole or absent: a load gives all of its bytes or a miss. */
static void cancel_rounds(const char *store_flags, int save_whole)
{
    daemon_t a;
    daemon_start(&a, "64M", store_flags);
    kvf_layout l = test_layout("cancel-late");
    char err[400];
    const char *nodes[] = {a.addr};
    kvf_connector_opts o = {.nodes = nodes,
                            .n_nodes = 1,
                            .layout = l,
                            .deadline_ms = 3000,
                            .salt = "cancel-late",
                            .save_whole = save_whole,
                            .save_parts_shm = 1};
    kvf_connector *cn;
    assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), 0);
    uint8_t *src[LAYERS][2], *dst[LAYERS][2];
    kvf_kv_layer rs[LAYERS], rd[LAYERS];
    size_t page = pages_make(&l, src, dst, rs, rd);
    const size_t n = 4 * 32, np = n / 16; /* 4 chunks, 8 pages */
    uint32_t ids[8];
    for (size_t i = 0; i < np; i++)
        ids[i] = (uint32_t)i;
    int rounds = 0, whole = 0, absent = 0;
    uint64_t t_end = (uint64_t)time(NULL) + 4;
    for (int r = 0; r < 300 && (uint64_t)time(NULL) < t_end; r++, rounds++) {
        uint32_t t[4 * 32];
        for (size_t i = 0; i < n; i++)
            t[i] = (uint32_t)(r * 1000 + i + 7);
        assert_int_equal(kvf_connector_register(cn, rs, LAYERS, err, sizeof err), 0);
        kvf_xfer *x;
        assert_int_equal(kvf_connector_save(cn, t, n, 0, ids, np, &x), 0);
        for (uint32_t i = 0; i < LAYERS; i++) {
            assert_int_equal(kvf_xfer_layer_done(x, i), 0);
            if (i == 0 && !save_whole)
                usleep(1000); /* the first layer gathered before the rest are reported: parts */
        }
        if (r % 3) { /* now, or after the workers had a moment */
            if (r % 3 == 2)
                sched_yield();
            kvf_xfer_cancel(x);
        }
        int rc = kvf_xfer_wait(x);
        assert_true(rc == 0 || rc == KVF_ECANCELED);
        kvf_xfer_free(&x);
        assert_int_equal(kvf_connector_register(cn, rd, LAYERS, err, sizeof err), 0);
        for (int i = 0; i < LAYERS; i++)
            for (int p = 0; p < 2; p++)
                memset(dst[i][p], 0, np * page);
        assert_int_equal(kvf_connector_load(cn, t, n, ids, np, &x), 0);
        (void)kvf_xfer_wait(x);
        size_t got = kvf_xfer_loaded_tokens(x);
        kvf_xfer_free(&x);
        assert_true(got == 0 || got == n);
        if (rc == 0)
            assert_int_equal(got, n); /* a save that completed is there */
        whole += got == n;
        absent += got == 0;
        for (size_t pg = 0; pg < got / 16; pg++)
            for (int i = 0; i < LAYERS; i++)
                for (int p = 0; p < 2; p++)
                    assert_memory_equal(dst[i][p] + ids[pg] * page, src[i][p] + ids[pg] * page,
                                        page);
    }
    printf("cancel after the last layer (%s, put %s): %d rounds, %d whole, %d absent\n",
           store_flags, save_whole ? "whole" : "in parts", rounds, whole, absent);
    assert_true(rounds >= 20);
    kvf_connector_stats st;
    kvf_connector_stats_get(cn, &st);
    if (!save_whole) /* the put of each began with its first layer gathered */
        assert_true(st.saves_in_parts > 0);
    else
        assert_int_equal(st.saves_in_parts, 0);
    kvf_connector_close(&cn);
    pages_free(src, dst);
    daemon_stop(&a);
}

static void test_cancel_after_the_last_layer(void **state)
{
    (void)state;
    cancel_rounds("--threads 1", 1);           /* shared memory: through staging, whole */
    cancel_rounds("--threads 1", 0);           /* in parts over the node's Unix socket */
    cancel_rounds("--threads 1 --shm off", 0); /* in parts over TCP */
}

/* Loads tokens t into the dst pages and returns the tokens loaded, every page of them compared
 * with src byte for byte. */
static size_t load_and_check(kvf_connector *cn, const uint32_t *t, size_t n, const uint32_t *ids,
                             size_t np, uint8_t *src[LAYERS][2], uint8_t *dst[LAYERS][2],
                             kvf_kv_layer rd[LAYERS], size_t page)
{
    char err[400];
    assert_int_equal(kvf_connector_register(cn, rd, LAYERS, err, sizeof err), 0);
    for (int i = 0; i < LAYERS; i++)
        for (int p = 0; p < 2; p++)
            memset(dst[i][p], 0, PAGES * page);
    kvf_xfer *x;
    assert_int_equal(kvf_connector_load(cn, t, n, ids, np, &x), 0);
    (void)kvf_xfer_wait(x);
    size_t got = kvf_xfer_loaded_tokens(x);
    kvf_xfer_free(&x);
    for (size_t pg = 0; pg < got / 16; pg++)
        for (int i = 0; i < LAYERS; i++)
            for (int p = 0; p < 2; p++)
                assert_memory_equal(dst[i][p] + ids[pg] * page, src[i][p] + ids[pg] * page, page);
    return got;
}

/* A save beside a pass: its layers reported one by one, a few milliseconds apart, and put in
 * parts as they are gathered; loaded back whole, byte for byte. One cancelled after two layers is
 * absent and gives its reservations back (the same save again is whole). With save_whole the same
 * bytes are put whole. Over TCP (store_flags "--shm off") and to a node reached over shared
 * memory (""), whose parts go over its Unix socket. */
static void in_parts_beside_a_pass(const char *store_flags)
{
    daemon_t a;
    daemon_start(&a, "64M", store_flags);
    kvf_layout l = test_layout("in-parts");
    uint8_t *src[LAYERS][2], *dst[LAYERS][2];
    kvf_kv_layer rs[LAYERS], rd[LAYERS];
    size_t page = pages_make(&l, src, dst, rs, rd);
    const size_t n = PAGES * 16, np = PAGES; /* 32 chunks */
    uint32_t ids[PAGES], t[PAGES * 16];
    for (size_t i = 0; i < np; i++)
        ids[i] = (uint32_t)(np - 1 - i); /* pages out of order */
    for (int whole = 0; whole < 2; whole++) {
        char err[400];
        const char *nodes[] = {a.addr};
        kvf_connector_opts o = {.nodes = nodes,
                                .n_nodes = 1,
                                .layout = l,
                                .deadline_ms = 3000,
                                .salt = whole ? "in-parts-whole" : "in-parts",
                                .save_whole = whole,
                                .save_parts_shm = 1};
        kvf_connector *cn;
        assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), 0);
        assert_string_equal(kvf_connector_transport(cn, NULL, 0), *store_flags ? "tcp" : "shm");
        for (int round = 0; round < 3; round++) {
            for (size_t i = 0; i < n; i++)
                t[i] = (uint32_t)(round * 100000 + i + 3);
            assert_int_equal(kvf_connector_register(cn, rs, LAYERS, err, sizeof err), 0);
            kvf_xfer *x;
            assert_int_equal(kvf_connector_save(cn, t, n, 0, ids, np, &x), 0);
            int cancel = round == 1;
            for (uint32_t i = 0; i < LAYERS; i++) {
                if (cancel && i == 2) {
                    kvf_xfer_cancel(x);
                    break;
                }
                assert_int_equal(kvf_xfer_layer_done(x, i), 0);
                /* an engine computing its layers over time: the next is reported once the
                 * first is gathered (which is what puts the save in parts; a host slower to
                 * gather than the pass's 5 ms steps would otherwise see every layer at once) */
                if (i == 0)
                    assert_int_equal(kvf_xfer_wait_pages(x), 0);
                usleep(5000);
            }
            int rc = kvf_xfer_wait(x);
            kvf_xfer_free(&x);
            assert_int_equal(rc, cancel ? KVF_ECANCELED : 0);
            size_t got = load_and_check(cn, t, n, ids, np, src, dst, rd, page);
            assert_int_equal(got, cancel ? 0 : n);
            if (cancel) { /* the same save again: its keys were given back */
                assert_int_equal(kvf_connector_register(cn, rs, LAYERS, err, sizeof err), 0);
                assert_int_equal(kvf_connector_save(cn, t, n, 0, ids, np, &x), 0);
                for (uint32_t i = 0; i < LAYERS; i++)
                    assert_int_equal(kvf_xfer_layer_done(x, i), 0);
                assert_int_equal(kvf_xfer_wait(x), 0);
                kvf_xfer_free(&x);
                assert_int_equal(load_and_check(cn, t, n, ids, np, src, dst, rd, page), n);
            }
        }
        kvf_connector_stats st;
        kvf_connector_stats_get(cn, &st);
        printf("%s: saves %" PRIu64 ", in parts %" PRIu64 ", chunks saved %" PRIu64 "\n",
               *store_flags ? "tcp" : "shm", st.saves, st.saves_in_parts, st.chunks_saved);
        /* rounds 0 and 2 in parts (a layer reported after the first was gathered); the
         * cancelled one where its second layer was gathered before the cancel; the same save
         * again, its layers reported at once, where one was gathered between two reports */
        if (whole)
            assert_int_equal(st.saves_in_parts, 0);
        else
            assert_true(st.saves_in_parts >= 2 && st.saves_in_parts <= 4);
        assert_int_equal(st.chunks_saved, 3 * (n / 32));
        kvf_connector_close(&cn);
    }
    pages_free(src, dst);
    daemon_stop(&a);
}

static void test_save_in_parts_beside_a_pass(void **state)
{
    (void)state;
    in_parts_beside_a_pass("--shm off");
    in_parts_beside_a_pass("");
}

/* One node and a connector of it, with an engine's pages and a save's tokens (t[i] = i * mul +
 * add) over pages 0..PAGES-1, for the tests below. */
typedef struct one_node {
    daemon_t a;
    kvf_layout l;
    uint8_t *src[LAYERS][2], *dst[LAYERS][2];
    kvf_kv_layer rs[LAYERS], rd[LAYERS];
    size_t page, n, np;
    uint32_t ids[PAGES], t[PAGES * 16];
    kvf_connector *cn;
} one_node;

/* f's connector asks save_parts_shm (kvf_connector_opts) */
static void one_node_open_parts(one_node *f, const char *store_flags, const char *name,
                                uint32_t mul, uint32_t add, int parts_shm)
{
    daemon_start(&f->a, "64M", store_flags);
    f->l = test_layout(name);
    f->page = pages_make(&f->l, f->src, f->dst, f->rs, f->rd);
    f->n = PAGES * 16, f->np = PAGES;
    for (size_t i = 0; i < f->np; i++)
        f->ids[i] = (uint32_t)i;
    for (size_t i = 0; i < f->n; i++)
        f->t[i] = (uint32_t)(i * mul + add);
    char err[400];
    const char *nodes[] = {f->a.addr};
    kvf_connector_opts o = {.nodes = nodes,
                            .n_nodes = 1,
                            .layout = f->l,
                            .deadline_ms = 3000,
                            .salt = name,
                            .save_parts_shm = parts_shm};
    assert_int_equal(kvf_connector_open(&f->cn, &o, err, sizeof err), 0);
    usleep(100000); /* the node's HELLO is in: a save may go in parts */
    assert_int_equal(kvf_connector_register(f->cn, f->rs, LAYERS, err, sizeof err), 0);
}

static void one_node_open(one_node *f, const char *store_flags, const char *name, uint32_t mul,
                          uint32_t add)
{
    one_node_open_parts(f, store_flags, name, mul, add, 0);
}

static void one_node_close(one_node *f)
{
    kvf_connector_close(&f->cn);
    pages_free(f->src, f->dst);
}

static size_t one_node_load(one_node *f)
{
    return load_and_check(f->cn, f->t, f->n, f->ids, f->np, f->src, f->dst, f->rd, f->page);
}

static void one_node_register_src(one_node *f)
{
    char err[400];
    assert_int_equal(kvf_connector_register(f->cn, f->rs, LAYERS, err, sizeof err), 0);
}

/* Whether this process has the cores for a storage client of two I/O threads or more (a
 * quarter of the cores each, the client's default): 8 or more. */
static int many_cores(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        return CPU_COUNT(&set) >= 8;
    return sysconf(_SC_NPROCESSORS_ONLN) >= 8;
}

/* Over shared memory a save is put in parts (over the node's Unix socket) or whole (through the
 * staging regions) as save_parts_shm says: -1 whole, 1 parts, 0 (the default) parts where the
 * storage client runs two I/O threads or more (kvf_client_io_threads), its layers coming over
 * time as they may. */
static void save_over_shm(int parts_shm, int in_parts)
{
    static one_node f;
    one_node_open_parts(&f, "", "shm-whole", 11, 5 + (uint32_t)(parts_shm + 1), parts_shm);
    assert_string_equal(kvf_connector_transport(f.cn, NULL, 0), "shm");
    /* Two saves, each of its own tokens: a layer gathered before the next is reported (300 ms
     * after the first: a pass), so each goes in parts where it may; the first may still go whole
     * where the node's HELLO (which says it takes parts) came after its first layer. */
    enum { SAVES = 2 };
    for (int k = 0; k < SAVES; k++) {
        for (size_t i = 0; i < f.n; i++)
            f.t[i] += 1000000u;
        kvf_xfer *x;
        assert_int_equal(kvf_connector_save(f.cn, f.t, f.n, 0, f.ids, f.np, &x), 0);
        for (uint32_t i = 0; i < LAYERS; i++) {
            assert_int_equal(kvf_xfer_layer_done(x, i), 0);
            usleep(i == 0 ? 300000 : 5000);
        }
        assert_int_equal(kvf_xfer_wait(x), 0);
        kvf_xfer_free(&x);
        assert_int_equal(one_node_load(&f), f.n);
    }
    kvf_connector_stats st;
    kvf_connector_stats_get(f.cn, &st);
    assert_int_equal(st.saves, SAVES);
    if (in_parts)
        assert_true(st.saves_in_parts >= SAVES - 1);
    else
        assert_int_equal(st.saves_in_parts, 0);
    if (!in_parts)
        assert_true(st.shm_bytes > 0); /* the staging regions carried it */
    one_node_close(&f);
    daemon_stop(&f.a);
}

static void test_save_over_shm_whole_or_parts(void **state)
{
    (void)state;
    save_over_shm(-1, 0);
    save_over_shm(1, 1);
    save_over_shm(0, many_cores());
}

/* A save of f's tokens, its first layer reported (gathered and sent in parts meanwhile), and then
 * its node killed. */
static kvf_xfer *save_then_kill(one_node *f)
{
    kvf_xfer *x;
    assert_int_equal(kvf_connector_save(f->cn, f->t, f->n, 0, f->ids, f->np, &x), 0);
    assert_int_equal(kvf_xfer_layer_done(x, 0), 0);
    usleep(50000);
    daemon_kill(&f->a);
    return x;
}

/* The node dies while a save is put in parts beside a pass: the layers reported after are taken or
 * refused with the save's error, the save fails (no hang: well within its deadline), and freeing
 * it is safe. */
static void test_save_in_parts_node_dies(void **state)
{
    (void)state;
    static one_node f;
    one_node_open(&f, "--shm off", "in-parts-dies", 3, 1);
    kvf_xfer *x = save_then_kill(&f);
    usleep(50000);
    for (uint32_t i = 1; i < LAYERS; i++) {
        int rc = kvf_xfer_layer_done(x, i);
        assert_true(rc == 0 || rc < 0);
        usleep(5000);
    }
    double t0 = (double)time(NULL);
    int rc = kvf_xfer_wait(x);
    assert_true(rc != 0);
    assert_true((double)time(NULL) - t0 < 10);
    kvf_xfer_free(&x);
    kvf_connector_stats st;
    kvf_connector_stats_get(f.cn, &st);
    assert_int_equal(st.saves_in_parts, 1);
    assert_int_equal(st.chunks_saved, 0);
    one_node_close(&f);
}

/* An engine that stops reporting a save's layers (at a layer refused with the save's error, its
 * node gone; or for a reason of its own) and frees it without a cancel: the free gives the save
 * up and returns (it used to wait for layers nothing could report any more). */
static void test_free_an_unfinished_save(void **state)
{
    (void)state;
    static one_node f;
    one_node_open(&f, "--shm off", "free-unfinished", 5, 2);
    /* two layers reported, then freed: nothing of it is stored, its keys are given back */
    kvf_xfer *x;
    assert_int_equal(kvf_connector_save(f.cn, f.t, f.n, 0, f.ids, f.np, &x), 0);
    assert_int_equal(kvf_xfer_layer_done(x, 0), 0);
    assert_int_equal(kvf_xfer_layer_done(x, 1), 0);
    time_t t0 = time(NULL);
    kvf_xfer_free(&x);
    assert_true(time(NULL) - t0 < 3);
    assert_int_equal(one_node_load(&f), 0);
    one_node_register_src(&f);
    assert_int_equal(kvf_connector_save(f.cn, f.t, f.n, 0, f.ids, f.np, &x), 0); /* whole now */
    for (uint32_t i = 0; i < LAYERS; i++)
        assert_int_equal(kvf_xfer_layer_done(x, i), 0);
    assert_int_equal(kvf_xfer_wait(x), 0);
    kvf_xfer_free(&x);
    assert_int_equal(one_node_load(&f), f.n);
    /* the node dies mid-save; the engine stops at the first layer refused and frees the save */
    one_node_register_src(&f);
    for (size_t i = 0; i < f.n; i++)
        f.t[i] = (uint32_t)(i * 7 + 1);
    x = save_then_kill(&f);
    int refused = 0;
    for (uint32_t i = 1; i < LAYERS && !refused; i++) {
        refused = kvf_xfer_layer_done(x, i) != 0;
        usleep(20000);
    }
    t0 = time(NULL);
    kvf_xfer_free(&x);
    assert_true(time(NULL) - t0 < 5);
    printf("free of an unfinished save: the node's death refused a layer: %s\n",
           refused ? "yes" : "no (every layer taken)");
    one_node_close(&f);
}

int main(void)
{
    harness_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_stores_change_under_transfers, teardown_daemons),
        cmocka_unit_test_teardown(test_cancel_after_the_last_layer, teardown_daemons),
        cmocka_unit_test_teardown(test_save_in_parts_beside_a_pass, teardown_daemons),
        cmocka_unit_test_teardown(test_save_over_shm_whole_or_parts, teardown_daemons),
        cmocka_unit_test_teardown(test_save_in_parts_node_dies, teardown_daemons),
        cmocka_unit_test_teardown(test_free_an_unfinished_save, teardown_daemons),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
