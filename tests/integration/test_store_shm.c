/*
 * Integration tests of the shared-memory transport (docs/shm.md): real kvf-store daemons with
 * their Unix sockets, clients through the public API, and raw local clients that try what a
 * malicious process on the same host would.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <dirent.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kvf/kvf.h"
#include "kvf/object.h"

#include "harness.h"
#include "shm_util.h"

#include "bytes.h"
#include "client_int.h"
#include "clock.h"
#include "unixsock.h"
#include "wire.h"

/* Whether buf (len bytes) is key i's object of some version (stored raw or recompressed), its
 * version in *v: every segment decodes to exactly what that version's writer wrote. */
static int is_obj(const uint8_t *buf, uint64_t len, uint64_t i, size_t seg, uint8_t *v)
{
    kvf_obj_info in;
    if (kvf_obj_verify(buf, len, &in) != 0 || in.layers != LAYERS)
        return 0;
    kvf_key k = key_of(i);
    if (!kvf_key_eq(&in.key, &k))
        return 0;
    uint8_t *plain = malloc(seg * LAYERS), *scratch = malloc(seg * 2 + 64);
    uint64_t off = in.header_len;
    int ok = 1;
    for (uint32_t l = 0; l < LAYERS && ok; l++) {
        kvf_obj_seg sg = kvf_obj_seg_at(&in, l);
        ok = sg.raw_len == seg &&
             kvf_obj_decode_seg(in.codec, &sg, buf + off, plain + (size_t)l * seg, scratch) == 0;
        off += sg.stored_len;
    }
    if (ok) {
        *v = plain[8];
        for (uint32_t l = 0; l < LAYERS && ok; l++) {
            const uint8_t *p = plain + (size_t)l * seg;
            ok = kvf__get_u64(p) == i && p[8] == *v;
            for (size_t b = 9; b < seg && ok; b++)
                ok = p[b] == (uint8_t)(i * 31 + (uint64_t)l * 7 + b + *v);
        }
    }
    free(plain), free(scratch);
    return ok;
}

static void put_keys(kvf_client *c, uint64_t from, size_t n, uint8_t v, size_t seg, int *st)
{
    kvf_key *keys = malloc(n * sizeof *keys);
    uint8_t **objs = malloc(n * sizeof *objs);
    uint64_t *lens = malloc(n * sizeof *lens);
    for (size_t i = 0; i < n; i++) {
        keys[i] = key_of(from + i);
        objs[i] = make_obj(from + i, v, seg, &lens[i]);
    }
    kvf_batch b = {
        .n = n, .keys = keys, .objs = (const void *const *)objs, .lens = lens, .status = st};
    assert_int_equal(kvf_client_put(c, &b), 0);
    for (size_t i = 0; i < n; i++)
        free(objs[i]);
    free(keys), free(objs), free(lens);
}

static atomic_uint layers_seen;

static void on_layer(kvf_op *op, uint32_t l, void *ud)
{
    (void)op, (void)ud;
    /* Layers arrive in order, each once. */
    assert_int_equal(l, atomic_fetch_add(&layers_seen, 1));
}

/* Gets keys [from, from + n): statuses in st; returns the hits, each checked byte for byte (a
 * wrong byte fails the test). wrong (may be NULL) counts hits that were not exactly an object. */
static size_t get_keys_counted(kvf_client *c, uint64_t from, size_t n, size_t seg, uint32_t flags,
                               int *st, const char **transport, atomic_ullong *wrong);
/* As get_keys_counted, for the keys of ids (from + i where ids is NULL). */
static size_t get_ids(kvf_client *c, const uint64_t *ids, uint64_t from, size_t n, size_t seg,
                      uint32_t flags, int *st, const char **transport, atomic_ullong *wrong);

static size_t get_keys(kvf_client *c, uint64_t from, size_t n, size_t seg, uint32_t flags, int *st,
                       const char **transport)
{
    return get_keys_counted(c, from, n, seg, flags, st, transport, NULL);
}

/* As get_keys; with wrong, safe off the test's thread: what would fail the test is counted. */
static size_t get_keys_counted(kvf_client *c, uint64_t from, size_t n, size_t seg, uint32_t flags,
                               int *st, const char **transport, atomic_ullong *wrong)
{
    return get_ids(c, NULL, from, n, seg, flags, st, transport, wrong);
}

/* A streamed get whose layer 0, once reported, the engine holds past the lease's end: its
 * callback sleeps, saves each hit's layer 0 and overwrites it in the engine's buffer. */
struct late_layer {
    unsigned sleep_ms;
    void **bufs;
    const uint64_t *caps;
    const int *st;
    size_t n;
    uint8_t **saved;     /* each hit's layer 0 as delivered (NULL for a miss) */
    uint64_t *off, *len; /* where layer 0 lies in the object */
};

enum { POISON = 0xEE };

static void on_layer_late(kvf_op *op, uint32_t l, void *ud)
{
    on_layer(op, l, NULL);
    struct late_layer *t = ud;
    if (l != 0)
        return;
    usleep(t->sleep_ms * 1000u);
    for (size_t i = 0; i < t->n; i++) {
        kvf_obj_info in;
        if (t->st[i] || kvf_obj_parse(t->bufs[i], t->caps[i], &in) != 0)
            continue;
        t->off[i] = in.header_len;
        t->len[i] = kvf_obj_seg_at(&in, 0).stored_len;
        t->saved[i] = malloc(t->len[i]);
        memcpy(t->saved[i], (uint8_t *)t->bufs[i] + t->off[i], t->len[i]);
        memset((uint8_t *)t->bufs[i] + t->off[i], POISON, t->len[i]);
    }
}

/* Layer 0 of hit i, as late's callback left it: it must still be POISON (the get never wrote it
 * again once reported); it is then put back as it was delivered. */
static void late_layer_check(struct late_layer *late, size_t i, uint8_t *buf, uint64_t id)
{
    if (!late->saved[i])
        fail_msg("key %llu: a hit whose layer 0 was never reported", (unsigned long long)id);
    uint8_t *l0 = buf + late->off[i];
    for (uint64_t j = 0; j < late->len[i]; j++)
        if (l0[j] != POISON)
            fail_msg("key %llu: layer 0 written again after it was reported (byte %llu)",
                     (unsigned long long)id, (unsigned long long)j);
    memcpy(l0, late->saved[i], late->len[i]);
}

static size_t get_ids_late(kvf_client *c, const uint64_t *ids, uint64_t from, size_t n, size_t seg,
                           uint32_t flags, int *st, const char **transport, atomic_ullong *wrong,
                           struct late_layer *late);

static size_t get_ids(kvf_client *c, const uint64_t *ids, uint64_t from, size_t n, size_t seg,
                      uint32_t flags, int *st, const char **transport, atomic_ullong *wrong)
{
    return get_ids_late(c, ids, from, n, seg, flags, st, transport, wrong, NULL);
}

/* As get_ids; with late (a streamed get), its layer 0 is held past the lease through
 * on_layer_late, and each hit's layer 0 checked never written again. */
static size_t get_ids_late(kvf_client *c, const uint64_t *ids, uint64_t from, size_t n, size_t seg,
                           uint32_t flags, int *st, const char **transport, atomic_ullong *wrong,
                           struct late_layer *late)
{
    kvf_key *keys = malloc(n * sizeof *keys);
    void **bufs = malloc(n * sizeof *bufs);
    uint64_t *caps = malloc(n * sizeof *caps), *lens = calloc(n, sizeof *lens);
    size_t cap = kvf_obj_raw_size(LAYERS, seg);
    for (size_t i = 0; i < n; i++) {
        keys[i] = key_of(ids ? ids[i] : from + i);
        bufs[i] = malloc(cap);
        caps[i] = cap;
    }
    atomic_store(&layers_seen, 0);
    kvf_batch b = {.n = n,
                   .keys = keys,
                   .bufs = bufs,
                   .caps = caps,
                   .out_lens = lens,
                   .status = st,
                   .flags = flags,
                   .layer_cb = (flags & KVF_GET_STREAM) ? on_layer : NULL};
    kvf_op *op;
    b.layer_cb = wrong ? NULL : b.layer_cb;
    if (late) {
        *late = (struct late_layer){.sleep_ms = late->sleep_ms,
                                    .bufs = bufs,
                                    .caps = caps,
                                    .st = st,
                                    .n = n,
                                    .saved = calloc(n, sizeof *late->saved),
                                    .off = calloc(n, sizeof *late->off),
                                    .len = calloc(n, sizeof *late->len)};
        b.layer_cb = on_layer_late;
        b.ud = late;
    }
    int rc = kvf_client_get_async(c, &b, &op);
    if (!rc)
        rc = kvf_op_wait(op);
    if (rc && wrong)
        atomic_fetch_add(wrong, 1);
    else
        assert_int_equal(rc, 0);
    if (transport)
        *transport = kvf_op_transport(op);
    kvf_op_free(&op);
    size_t hits = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t v;
        if (st[i] == 0) {
            uint64_t id = ids ? ids[i] : from + i;
            if (late)
                late_layer_check(late, i, bufs[i], id);
            if (!is_obj(bufs[i], lens[i], id, seg, &v)) {
                if (!wrong)
                    fail_msg("key %llu: a hit whose bytes are not its object",
                             (unsigned long long)id);
                atomic_fetch_add(wrong, 1);
            }
            hits++;
        }
        free(bufs[i]);
    }
    for (size_t i = 0; late && i < n; i++)
        free(late->saved[i]);
    if (late)
        free(late->saved), free(late->off), free(late->len);
    free(keys), free(bufs), free(caps), free(lens);
    return hits;
}

/* ------------------------------------------------------------------------------------------ */

/* Put, get and streamed get over shared memory, chosen by the client itself; the bytes moved are
 * counted as shared memory's; the arena's read-only view is there for an engine to use. */
static void test_shm_round_trip(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "64M", "--threads 1");
    /* a lease as long as a sanitizer build needs: under TSan here the 300-key get took 3.5 s
     * (its shadow memory's page faults), and a key whose lease ends goes over TCP */
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){.shm_lease_ms = 30000});
    char why[400];
    assert_string_equal(kvf_client_transport(c, why, sizeof why), "shm");
    print_message("transport: %s\n", why);
    assert_non_null(strstr(why, "arena mapped"));
    int st[300];
    put_keys(c, 0, 300, 1, SEG, st);
    for (int i = 0; i < 300; i++)
        assert_int_equal(st[i], 0);
    const char *tr = NULL;
    assert_int_equal(get_keys(c, 0, 300, SEG, 0, st, &tr), 300);
    assert_string_equal(tr, "shm");
    assert_int_equal(get_keys(c, 100, 150, SEG, KVF_GET_STREAM, st, NULL), 150);
    assert_int_equal(atomic_load(&layers_seen), LAYERS);
    /* Misses are per key; a second put of the same keys says EEXIST. */
    assert_int_equal(get_keys(c, 290, 20, SEG, 0, st, NULL), 10);
    for (int i = 10; i < 20; i++)
        assert_int_equal(st[i], KVF_ENOENT);
    put_keys(c, 0, 10, 1, SEG, st);
    for (int i = 0; i < 10; i++)
        assert_int_equal(st[i], KVF_EEXIST);
    kvf_client_counters k;
    kvf_client_counters_get(c, &k);
    uint64_t obj = kvf_obj_raw_size(LAYERS, SEG);
    assert_true(k.shm_bytes_sent >= 300 * obj);
    assert_true(k.shm_bytes_received >= 450 * obj);
    const void *base;
    size_t len;
    assert_int_equal(kvf_client_shm_view(c, 0, &base, &len), 0);
    assert_true(base != NULL && len >= (64u << 20) - 4096);
    /* Control requests go over the socket too, and a TCP client sees the same objects. */
    size_t hits = 99;
    kvf_key keys[4] = {key_of(0), key_of(1), key_of(2), key_of(5000)};
    assert_int_equal(kvf_client_lookup_prefix(c, 4, keys, &hits, 2000), 0);
    assert_int_equal(hits, 3);
    kvf_client *t = client_open_opts(&d, (kvf_client_opts){.transport = "tcp"});
    assert_string_equal(kvf_client_transport(t, NULL, 0), "tcp");
    assert_int_equal(get_keys(t, 0, 300, SEG, 0, st, &tr), 300);
    assert_string_equal(tr, "tcp");
    kvf_client_close(&t);
    /* Objects larger than a staging region go over TCP, and say so. */
    kvf_client *s =
        client_open_opts(&d, (kvf_client_opts){.shm_staging_bytes = 32768, .shm_lease_ms = 30000});
    put_keys(s, 1000, 4, 2, SEG, st);
    for (int i = 0; i < 4; i++)
        assert_int_equal(st[i], 0);
    assert_int_equal(get_keys(s, 1000, 4, SEG, 0, st, &tr), 4);
    assert_string_equal(tr, "shm"); /* the arena is mapped: gets need no staging */
    kvf_client_close(&s);
    char *json = NULL;
    assert_int_equal(kvf_client_stats(c, 0, &json, 2000), 0);
    assert_non_null(strstr(json, "\"shm\":{"));
    free(json);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* What a streamed get's layer callback sees: the keys that missed already say so (their status is
 * not 0) when the first layer is reported, so that an engine never takes one of them for a hit
 * (a regression: statuses reached the caller only at the op's end, after every layer). */
typedef struct layer_check {
    const int *st;
    size_t from, n;
    atomic_int bad, calls;
} layer_check;

static void check_layer(kvf_op *op, uint32_t l, void *ud)
{
    (void)op, (void)l;
    layer_check *lc = ud;
    atomic_fetch_add(&lc->calls, 1);
    for (size_t i = lc->from; i < lc->n; i++)
        if (lc->st[i] == 0)
            atomic_fetch_add(&lc->bad, 1);
}

static void test_shm_stream_reports_misses_first(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "32M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    enum { N = 64, HITS = 40 };
    int st[N];
    put_keys(c, 0, HITS, 1, SEG, st);
    kvf_key keys[N];
    void *bufs[N];
    uint64_t caps[N], lens[N];
    for (int i = 0; i < N; i++) {
        keys[i] = key_of((uint64_t)i);
        caps[i] = kvf_obj_raw_size(LAYERS, SEG);
        bufs[i] = malloc(caps[i]);
        st[i] = 0;
    }
    layer_check lc = {.st = st, .from = HITS, .n = N};
    kvf_batch b = {.n = N,
                   .keys = keys,
                   .bufs = bufs,
                   .caps = caps,
                   .out_lens = lens,
                   .status = st,
                   .flags = KVF_GET_STREAM,
                   .layer_cb = check_layer,
                   .ud = &lc};
    assert_int_equal(kvf_client_get(c, &b), 0);
    assert_int_equal(atomic_load(&lc.calls), LAYERS);
    assert_int_equal(atomic_load(&lc.bad), 0);
    for (int i = 0; i < N; i++) {
        assert_int_equal(st[i], i < HITS ? 0 : KVF_ENOENT);
        free(bufs[i]);
    }
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* A node without shared memory: auto falls back to TCP and says why; "shm" fails the open. */
static void test_shm_fallback_reasons(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "16M", "--shm off");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    char why[400];
    assert_string_equal(kvf_client_transport(c, why, sizeof why), "tcp");
    print_message("transport: %s\n", why);
    assert_non_null(strstr(why, "serves no shared memory"));
    int st[8];
    put_keys(c, 0, 8, 1, SEG, st);
    assert_int_equal(get_keys(c, 0, 8, SEG, 0, st, NULL), 8);
    kvf_client_close(&c);
    const char *nodes[1] = {d.addr};
    kvf_client_opts o = {.nodes = nodes, .n_nodes = 1, .ns = NS, .transport = "shm"};
    char err[400];
    assert_int_not_equal(kvf_client_open(&c, &o, err, sizeof err), 0);
    print_message("open with shm: %s\n", err);
    assert_null(c);
    daemon_stop(&d);
}

/* Readers against a node whose objects are evicted, re-put, recompressed and pinned under them:
 * every hit is exactly its object, misses are counted, nothing else. */
typedef struct churn {
    daemon_t *d;
    atomic_int stop;
    atomic_ullong hits, misses, wrong;
} churn;

#define CHURN_KEYS 64

static void *churn_reader(void *arg)
{
    churn *ch = arg;
    const char *nodes[1] = {ch->d->addr};
    kvf_client_opts o = {.nodes = nodes, .n_nodes = 1, .ns = NS, .deadline_ms = 5000};
    kvf_client *c = NULL;
    char err[300];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0) {
        atomic_fetch_add(&ch->wrong, 1);
        return NULL;
    }
    int st[CHURN_KEYS];
    for (int r = 0; r < 2000 && !atomic_load(&ch->stop); r++) {
        size_t h = get_keys_counted(c, 0, CHURN_KEYS, SEG, (r & 1) ? KVF_GET_STREAM : 0, st, NULL,
                                    &ch->wrong);
        atomic_fetch_add(&ch->hits, h);
        atomic_fetch_add(&ch->misses, CHURN_KEYS - h);
    }
    kvf_client_close(&c);
    return NULL;
}

static void test_shm_churn_never_wrong(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "8M", "--threads 1");
    churn ch = {.d = &d};
    kvf_client *w = client_open_opts(&d, (kvf_client_opts){0});
    int st[CHURN_KEYS];
    put_keys(w, 0, CHURN_KEYS, 0, SEG, st);
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, churn_reader, &ch), 0);
    uint64_t t0 = kvf__now_ns();
    kvf_key keys[CHURN_KEYS];
    for (int i = 0; i < CHURN_KEYS; i++)
        keys[i] = key_of((uint64_t)i);
    for (uint8_t v = 1; kvf__now_ns() - t0 < 3000000000ull; v++) {
        kvf_client_evict(w, CHURN_KEYS / 2, keys + (v & 1) * (CHURN_KEYS / 2), st, 2000);
        put_keys(w, 0, CHURN_KEYS, v, SEG, st);
        kvf_client_compress(w, 8, keys + (v % 8) * 8, (v & 2) ? "lz4" : "none", st, 2000);
        kvf_client_pin(w, 4, keys, 50, st, 2000);
        put_keys(w, 5000 + (uint64_t)v * 40, 40, v, SEG, st); /* pressure: evictions */
    }
    atomic_store(&ch.stop, 1);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    print_message(
        "readers: %llu hits, %llu misses, %llu wrong\n", (unsigned long long)atomic_load(&ch.hits),
        (unsigned long long)atomic_load(&ch.misses), (unsigned long long)atomic_load(&ch.wrong));
    assert_int_equal(atomic_load(&ch.wrong), 0);
    assert_true(atomic_load(&ch.hits) > 0);
    kvf_client_close(&w);
    daemon_stop(&d);
}

/* A lease that runs out before the copy is over never makes the copy data: the key is asked again
 * over TCP in the same op (a plain get, and a streamed one whose layer 0 was reported before the
 * lease ended, and is never written again); the node lets the references go at the lease's end. */
static void test_shm_lease_end_asks_again_over_tcp(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "64M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){.shm_lease_ms = 1});
    int st[16];
    put_keys(c, 0, 16, 3, 256 * 1024, st);
    for (int i = 0; i < 16; i++)
        assert_int_equal(st[i], 0);
    kvf_client_counters k0, k;
    kvf_client_counters_get(c, &k0);
    const char *tr = NULL;
    assert_int_equal(get_keys(c, 0, 16, 256 * 1024, 0, st, &tr), 16);
    kvf_client_counters_get(c, &k);
    assert_int_equal(k.shm_lease_expired - k0.shm_lease_expired, 16);
    assert_string_equal(tr, "shm+tcp");
    assert_true(k.bytes_received - k0.bytes_received >= 16 * 256 * 1024);
    /* A streamed get: every layer in order, each key's bytes its object's. */
    assert_int_equal(get_keys(c, 0, 16, 256 * 1024, KVF_GET_STREAM, st, NULL), 16);
    assert_int_equal(atomic_load(&layers_seen), LAYERS);
    kvf_client_counters_get(c, &k0);
    assert_int_equal(k0.shm_lease_expired - k.shm_lease_expired, 16);
    kvf_client_close(&c);
    /* A lease that holds through layer 0 and ends while the engine holds it: layers 1 and later
     * come over TCP, layer 0 as delivered (get_ids_late checks it was never written again). */
    c = client_open_opts(&d, (kvf_client_opts){.shm_lease_ms = 200});
    struct late_layer late = {.sleep_ms = 600};
    assert_int_equal(
        get_ids_late(c, NULL, 0, 16, 256 * 1024, KVF_GET_STREAM, st, NULL, NULL, &late), 16);
    assert_int_equal(atomic_load(&layers_seen), LAYERS);
    kvf_client_counters_get(c, &k);
    assert_true(k.shm_lease_expired > 0);
    kvf_client_close(&c);
    /* With a lease that holds, the same keys come over shared memory alone. */
    c = client_open_opts(&d, (kvf_client_opts){.shm_lease_ms = 30000});
    assert_int_equal(get_keys(c, 0, 16, 256 * 1024, KVF_GET_STREAM, st, &tr), 16);
    assert_string_equal(tr, "shm");
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* The default lease grows where this host copies slower than it allows: a streamed get whose
 * engine holds layer 0 for 2.5 s outlasts the 2 s default (its later layers come over TCP); each
 * later get asks twice the lease, up to 16 s, so within three more gets (4, 8, 16 s) the same hold
 * outlasts nothing and leases stop ending. How many gets that takes is the host's speed (a slow
 * host under a sanitizer may still outlast 4 s: hold plus copy), so the test bounds it and checks
 * that once none end, none end again. A lease the caller set stays as set: every get outlasts it.
 */
static void test_shm_default_lease_grows(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "64M", "--threads 1");
    int st[16];
    kvf_client_counters k0, k;
    for (int set = 0; set < 2; set++) {
        /* a deadline well beyond the 2.5 s hold: under TSan on 2 cores a get that held layer 0
         * and then asked the ended leases' keys again over TCP once outran the default 5 s, one
         * key failing (15 of 16) where only leases are what this test judges */
        kvf_client *c = client_open_opts(
            &d, (kvf_client_opts){.shm_lease_ms = set ? 2000 : 0, .deadline_ms = 30000});
        if (!set) {
            put_keys(c, 0, 16, 3, 256 * 1024, st);
            for (int i = 0; i < 16; i++)
                assert_int_equal(st[i], 0);
        }
        int rounds = set ? 2 : 5, quiet = 0;
        for (int round = 0; round < rounds; round++) {
            kvf_client_counters_get(c, &k0);
            struct late_layer late = {.sleep_ms = 2500};
            size_t hits =
                get_ids_late(c, NULL, 0, 16, 256 * 1024, KVF_GET_STREAM, st, NULL, NULL, &late);
            for (int i = 0; hits != 16 && i < 16; i++)
                print_message("key %d: %s\n", i, kvf_strerror(st[i]));
            assert_int_equal(hits, 16);
            assert_int_equal(atomic_load(&layers_seen), LAYERS);
            kvf_client_counters_get(c, &k);
            uint64_t expired = k.shm_lease_expired - k0.shm_lease_expired;
            print_message("%s lease, get %d: %llu lease(s) ended mid-copy\n",
                          set ? "a set" : "the default", round, (unsigned long long)expired);
            /* the hold stalls the worker that reports layer 0: its share's keys outlast the
             * lease (another worker's share may be copied whole meanwhile) */
            assert_true(expired <= 16);
            if (round == 0 || set)
                assert_true(expired > 0);
            else if (expired)
                assert_int_equal(quiet, 0); /* a lease that held keeps holding */
            else if (++quiet == 2)
                break;
        }
        if (!set)
            assert_int_equal(quiet, 2); /* 16 s outlasts a 2.5 s hold on any host */
        kvf_client_close(&c);
    }
    daemon_stop(&d);
}

/* Leases for engines that read the view themselves: the objects are where the lease says, intact,
 * while it holds; a lease too short to cover a read says so; a client without a view is told to
 * use get; releasing lets the node free the blocks. */
static void test_shm_leases_in_place(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "32M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    int st[20];
    put_keys(c, 0, 16, 4, SEG, st);
    kvf_key keys[20];
    const void *objs[20];
    uint64_t lens[20];
    for (int i = 0; i < 20; i++)
        keys[i] = key_of((uint64_t)i);
    kvf_lease *l = NULL;
    assert_int_equal(kvf_client_lease(c, 20, keys, 0, objs, lens, st, &l), 0);
    assert_non_null(l);
    uint8_t *copy = malloc(kvf_obj_raw_size(LAYERS, SEG));
    for (int i = 0; i < 20; i++) {
        if (i >= 16) {
            assert_int_equal(st[i], KVF_ENOENT);
            assert_null(objs[i]);
            continue;
        }
        assert_int_equal(st[i], 0);
        memcpy(copy, objs[i], lens[i]);
        assert_true(kvf_lease_valid(l));
        uint8_t v;
        assert_true(is_obj(copy, lens[i], (uint64_t)i, SEG, &v));
        assert_int_equal(v, 4);
    }
    /* Evicted while leased: gone for readers, its bytes in place until the release. */
    assert_int_equal(kvf_client_evict(c, 1, keys, st, 2000), 0);
    uint8_t v;
    memcpy(copy, objs[0], lens[0]);
    assert_true(kvf_lease_valid(l) && is_obj(copy, lens[0], 0, SEG, &v));
    kvf_lease_release(&l);
    assert_null(l);
    kvf_lease_release(&l); /* NULL is accepted */
    /* A lease shorter than the margin is never valid: a reader then treats its bytes as a miss. */
    assert_int_equal(kvf_client_lease(c, 4, keys + 1, 1, objs, lens, st, &l), 0);
    assert_false(kvf_lease_valid(l));
    kvf_lease_release(&l);
    assert_int_equal(stat_settles(c, "referenced", 0), 0);
    /* Over TCP there is no view: the caller is told to use get. */
    kvf_client *t = client_open_opts(&d, (kvf_client_opts){.transport = "tcp"});
    assert_int_equal(kvf_client_lease(t, 4, keys, 0, objs, lens, st, &l), KVF_ENOTSUP);
    assert_null(l);
    kvf_client_close(&t);
    /* The default lease (2 s), outlasted by its reader, grows: the client's next lease holds
     * twice as long. */
    kvf_client *g = client_open_opts(&d, (kvf_client_opts){0});
    for (int round = 0; round < 2; round++) {
        assert_int_equal(kvf_client_lease(g, 4, keys + 1, 0, objs, lens, st, &l), 0);
        usleep(2100 * 1000);
        assert_int_equal(kvf_lease_valid(l), round);
        kvf_lease_release(&l);
    }
    kvf_client_close(&g);
    free(copy);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* A store restarted on the same port listens under a new socket name: the client's keys go over
 * TCP until a HELLO says the new name, then over shared memory again; nothing fails for good and
 * no byte is wrong. */
static void test_shm_store_restart_reconnects(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "32M", "--threads 1");
    kvf_client *c =
        client_open_opts(&d, (kvf_client_opts){.deadline_ms = 2000, .shm_lease_ms = 30000});
    int st[8];
    put_keys(c, 0, 8, 1, SEG, st);
    const char *tr = NULL;
    assert_int_equal(get_keys(c, 0, 8, SEG, 0, st, &tr), 8);
    assert_string_equal(tr, "shm");
    uint16_t port = d.port;
    daemon_stop(&d);
    char listen[64];
    snprintf(listen, sizeof listen, "--threads 1 --listen 127.0.0.1:%u", port);
    daemon_start(&d, "32M", listen);
    size_t hits = 0;
    int fell_back = 0;
    for (int i = 0; i < 40 && !(hits == 8 && !strcmp(tr, "shm")); i++) {
        usleep(50000);
        put_keys(c, 0, 8, 2, SEG, st); /* the new store has nothing: put again */
        int pst0 = st[0];
        hits = get_keys(c, 0, 8, SEG, 0, st, &tr);
        fell_back |= strcmp(tr, "shm") != 0;
        print_message("round %d: put %s, get %zu hits over %s (%s)\n", i, kvf_err_name(pst0), hits,
                      tr, kvf_err_name(st[0]));
    }
    kvf_client_counters k;
    kvf_client_counters_get(c, &k);
    print_message("after the restart: %zu hits over %s; %llu keys sent over TCP meanwhile\n", hits,
                  tr, (unsigned long long)k.shm_fallback_keys);
    assert_int_equal(hits, 8);
    assert_string_equal(tr, "shm");
    assert_true(fell_back || k.shm_fallback_keys > 0 || k.reconnects > 0);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* ------------------------------------------------------------------------------------------ */
/* Raw local clients (shm_util.h) */

/* A local client handed the arena cannot write it: not through the view, not by making it
 * writable, not by mapping the descriptor again writable, not by reopening it writable through
 * /proc, and not by resizing it. Its staging region is its own, and resizing that is refused
 * too. */
static void test_shm_malicious_client_cannot_write(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "16M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    int st[8];
    put_keys(c, 0, 8, 7, SEG, st);
    raw r = raw_open(&d);
    uint8_t req[16], *rep;
    size_t rlen;
    kvf__put_u64(req, 1 << 20);
    kvf__put_u32(req + 8, KVF_SHM_MAP_ARENA);
    kvf__put_u32(req + 12, 0);
    int fds[4], nfd = 4;
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_SHM_MAP, 0, req, sizeof req, &rep,
                                         &rlen, fds, &nfd),
                     0);
    assert_int_equal(nfd, 2);
    uint64_t alen = kvf__get_u64(rep + 8);
    free(rep);
    int stg = fds[0], arena = fds[1];
    /* Writable mappings of the arena, every way. */
    errno = 0;
    assert_true(mmap(NULL, alen, PROT_READ | PROT_WRITE, MAP_SHARED, arena, 0) == MAP_FAILED);
    void *view = mmap(NULL, alen, PROT_READ, MAP_SHARED, arena, 0);
    assert_true(view != MAP_FAILED);
    assert_int_not_equal(mprotect(view, 4096, PROT_READ | PROT_WRITE), 0);
    char p[64];
    snprintf(p, sizeof p, "/proc/self/fd/%d", arena);
    int rw = open(p, O_RDWR);
    if (rw >= 0) {
        /* Reopened writable (memfds allow it): still no writable mapping, no write, no resize. */
        assert_true(mmap(NULL, alen, PROT_READ | PROT_WRITE, MAP_SHARED, rw, 0) == MAP_FAILED);
        uint8_t junk[64] = {0};
        assert_true(pwrite(rw, junk, sizeof junk, 4096) < 0);
        assert_int_not_equal(ftruncate(rw, 4096), 0);
        close(rw);
    }
    assert_int_not_equal(ftruncate(arena, 4096), 0);
    /* A private writable mapping changes the client's own copy only. */
    uint8_t *priv = mmap(NULL, alen, PROT_READ | PROT_WRITE, MAP_PRIVATE, arena, 0);
    if (priv != MAP_FAILED) {
        memset(priv, 0xEE, alen);
        munmap(priv, alen);
    }
    /* The staging region cannot be shrunk under the node's copies. */
    assert_int_not_equal(ftruncate(stg, 0), 0);
    /* A put whose staging bytes are not a verified object, or lie outside the region, is
     * refused and leaves nothing visible. */
    uint8_t *stgmap = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, stg, 0);
    assert_true(stgmap != MAP_FAILED);
    uint64_t olen;
    uint8_t *obj = make_obj(100, 1, SEG, &olen);
    memcpy(stgmap, obj, olen);
    stgmap[olen - 1] ^= 1; /* one flipped bit */
    uint8_t put[8 + 64];
    kvf__put_u64(put, NS);
    kvf_key k100 = key_of(100);
    kvf__wire_key_put(put + 8, &k100);
    kvf__put_u64(put + 24, 0);
    kvf__put_u64(put + 32, olen);
    kvf_key k101 = key_of(101);
    kvf__wire_key_put(put + 40, &k101);
    kvf__put_u64(put + 56, (1 << 20) - 10);
    kvf__put_u64(put + 64, olen);
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_SHM_PUT, 2, put, sizeof put, &rep,
                                         &rlen, NULL, NULL),
                     0);
    assert_int_equal((int32_t)kvf__get_u32(rep), KVF_ECHECKSUM);
    assert_int_equal((int32_t)kvf__get_u32(rep + 4), KVF_ERANGE);
    free(rep);
    free(obj);
    assert_int_equal(get_keys(c, 100, 2, SEG, 0, st, NULL), 0);
    /* Every object the client put is as it was. */
    assert_int_equal(get_keys(c, 0, 8, SEG, 0, st, NULL), 8);
    munmap(view, alen);
    munmap(stgmap, 1 << 20);
    close(stg), close(arena), close(r.fd);
    kvf_client_close(&c);
    daemon_stop(&d);
}

static int fd_count(pid_t pid)
{
    char p[64];
    snprintf(p, sizeof p, "/proc/%d/fd", (int)pid);
    DIR *dir = opendir(p);
    if (!dir)
        return -1;
    int n = 0;
    while (readdir(dir))
        n++;
    closedir(dir);
    return n;
}

/* Descriptors a client sends the node are never taken (the node reads without ancillary data);
 * SHM_MAP anywhere but the Unix socket is refused; a lease a client never releases ends, and
 * the node frees the object's memory. */
static void test_shm_forged_fds_and_unreleased_leases(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "16M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    int st[8];
    put_keys(c, 0, 8, 5, SEG, st);
    raw r = raw_open(&d);
    int before = fd_count(d.pid);
    int devnull = open("/dev/null", O_RDONLY);
    for (int i = 0; i < 50; i++) {
        uint8_t f[KVF_WIRE_HEADER_LEN];
        kvf_wire_hdr h = {
            .version = KVF_WIRE_VERSION, .opcode = KVF_OP_STATS, .request_id = 900 + i};
        kvf__wire_hdr_encode(f, &h);
        int pass[2] = {devnull, r.fd};
        assert_int_equal(kvf__unix_send_fds(r.fd, f, sizeof f, pass, 2), 0);
        uint8_t hdr[KVF_WIRE_HEADER_LEN];
        assert_int_equal(
            kvf__sock_read_all(r.fd, hdr, sizeof hdr, NULL, NULL, kvf__now_ns() + 5000000000ull),
            0);
        uint64_t plen = kvf__get_u64(hdr + 32);
        uint8_t *p = malloc(plen);
        assert_int_equal(
            kvf__sock_read_all(r.fd, p, plen, NULL, NULL, kvf__now_ns() + 5000000000ull), 0);
        free(p);
    }
    close(devnull);
    int after = fd_count(d.pid);
    print_message("node descriptors: %d before 50 forged messages, %d after\n", before, after);
    assert_true(after <= before + 1);
    r.id = 2000;
    /* SHM_MAP over TCP is refused. */
    int t = harness_raw_connect(d.port);
    uint8_t hello[24];
    kvf__put_u32(hello, KVF_WIRE_VERSION);
    kvf__put_u32(hello + 4, KVF_WIRE_VERSION);
    kvf__put_u64(hello + 8, NS);
    kvf__put_u64(hello + 16, KVF_CAP_ALL);
    uint8_t *rep;
    size_t rlen;
    assert_int_equal(
        kvf__sync_call_test(t, 1, KVF_OP_HELLO, 0, hello, sizeof hello, &rep, &rlen, NULL, NULL),
        0);
    free(rep);
    uint8_t map[16] = {0};
    kvf__put_u32(map + 8, KVF_SHM_MAP_ARENA);
    assert_int_equal(
        kvf__sync_call_test(t, 2, KVF_OP_SHM_MAP, 0, map, sizeof map, &rep, &rlen, NULL, NULL),
        KVF_ENOTSUP);
    close(t);
    /* Leases without the arena are refused; with it, a lease never released ends on its own. */
    uint8_t get[16 + 16];
    kvf__put_u64(get, NS);
    kvf__put_u32(get + 8, 200);
    kvf__put_u32(get + 12, 0);
    kvf_key k0 = key_of(0);
    kvf__wire_key_put(get + 16, &k0);
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_RDMA_GET, 1, get, sizeof get, &rep,
                                         &rlen, NULL, NULL),
                     KVF_ENOTSUP);
    kvf__put_u64(map, 0);
    int fds[4], nfd = 4;
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_SHM_MAP, 0, map, sizeof map, &rep,
                                         &rlen, fds, &nfd),
                     0);
    free(rep);
    assert_int_equal(nfd, 1);
    close(fds[0]);
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_RDMA_GET, 1, get, sizeof get, &rep,
                                         &rlen, NULL, NULL),
                     0);
    assert_int_equal((int32_t)kvf__get_u32(rep + 16), 0);
    free(rep);
    /* Evicted while leased: gone for readers at once, its block kept until the lease ends. */
    assert_int_equal(kvf_client_evict(c, 1, &k0, st, 2000), 0);
    assert_int_equal(st[0], 0);
    assert_int_equal(stat_settles(c, "referenced", 0), 0);
    close(r.fd);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* A client that dies holding a reservation leaves no visible object and frees the space. */
static void test_shm_dead_client_frees_reservations(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "16M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    raw r = raw_open(&d);
    uint8_t admit[8 + 24];
    kvf__put_u64(admit, NS);
    kvf_key k = key_of(42);
    kvf__wire_key_put(admit + 8, &k);
    kvf__put_u64(admit + 24, 1 << 20);
    uint8_t *rep;
    size_t rlen;
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_ADMIT, 1, admit, sizeof admit, &rep,
                                         &rlen, NULL, NULL),
                     0);
    assert_int_equal((int32_t)kvf__get_u32(rep), 0);
    free(rep);
    char *json = NULL;
    assert_int_equal(kvf_client_stats(c, 0, &json, 2000), 0);
    assert_non_null(strstr(json, "\"reserved\":1,"));
    free(json);
    close(r.fd); /* dies */
    assert_int_equal(stat_settles(c, "reserved", 0), 0);
    int st[1];
    assert_int_equal(get_keys(c, 42, 1, SEG, 0, st, NULL), 0);
    assert_int_equal(st[0], KVF_ENOENT);
    kvf_client_close(&c);
    daemon_stop(&d);
}

static kvf_client *client_open_two(const daemon_t *a, const daemon_t *b, const char *transport)
{
    return harness_client_two(a, b, NS, NULL, transport);
}

/* As client_open_opts, of nodes a and b in that order. */
static kvf_client *client_open_two_opts(const daemon_t *a, const daemon_t *b, kvf_client_opts o)
{
    const char *nodes[2] = {a->addr, b->addr};
    o.nodes = nodes;
    o.n_nodes = 2;
    o.ns = NS;
    o.deadline_ms = 5000;
    kvf_client *c = NULL;
    char err[400];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client open: %s", err);
    return c;
}

/* A hot key is read from its nearest holder. Node A serves shared memory; node B does not (a
 * node of another host, as this client sees it) and copies the entries read twice to the next
 * node of their key's order, A (--replicate-hits 2 --replicas 2, which B's HELLO says). Of B's
 * keys, the hot ones then come from A over shared memory; the cold ones miss on A and are asked
 * of B over TCP: every key is a hit with its own bytes, plain and streamed, and the counters say
 * which went where. */
/* What c's counters moved by since k0 (printed under `what`): keys asked of a nearer holder, of
 * them those missed there (asked again of their first node), shared-memory leases that ended
 * before their copy was checked, and bytes received over shared memory. */
static kvf_client_counters near_moved(kvf_client *c, const kvf_client_counters *k0,
                                      const char *what)
{
    kvf_client_counters k1, d = {0};
    kvf_client_counters_get(c, &k1);
    d.near_keys = k1.near_keys - k0->near_keys;
    d.near_misses = k1.near_misses - k0->near_misses;
    d.shm_lease_expired = k1.shm_lease_expired - k0->shm_lease_expired;
    d.shm_bytes_received = k1.shm_bytes_received - k0->shm_bytes_received;
    print_message("%s: %llu keys asked of the nearer holder, %llu missed or asked again there, "
                  "%llu leases ended, %llu bytes over shared memory\n",
                  what, (unsigned long long)d.near_keys, (unsigned long long)d.near_misses,
                  (unsigned long long)d.shm_lease_expired,
                  (unsigned long long)d.shm_bytes_received);
    return d;
}

/* The probe at open (kvf__shm_discover) records what the node takes, as the engines' HELLO replies
 * do: a save in parts asks both (kvf_client_put_parts), and over shared memory the engines' own
 * replies may still be unread when the connector first saves. The node's word is wiped here, as
 * before any reply is read; the probe alone must restore it. */
static void test_shm_probe_says_what_the_node_takes(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "16M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    char why[400];
    assert_string_equal(kvf_client_transport(c, why, sizeof why), "shm");
    kvf__node *N = &c->nodes[0];
    uint64_t heard = atomic_load(&N->caps);
    assert_true(heard & KVF_CAP_PARTS);
    assert_true(heard & KVF_CAP_SHM);

    enum { LEN = 8192, HEAD = 256 };
    static uint8_t obj[LEN];
    kvf_key k = {.hi = 0x5eed, .lo = 77};
    const void *objs[1] = {obj};
    uint64_t lens[1] = {LEN};
    int st[1] = {-1};
    kvf_batch b = {.n = 1, .keys = &k, .objs = objs, .lens = lens, .status = st};
    kvf_op *op = NULL;
    atomic_store(&N->hello_seen, 0);
    atomic_store(&N->caps, 0);
    assert_int_equal(kvf_client_put_parts(c, &b, HEAD, &op), KVF_ENOTSUP); /* not heard yet */
    assert_null(op);

    why[0] = 0;
    kvf__shm_discover(c, why, sizeof why);
    print_message("probe again: %s\n", why[0] ? why : "(the node is on this host)");
    assert_int_equal(atomic_load(&N->hello_seen), 1);
    assert_int_equal(atomic_load(&N->caps), heard);
    assert_int_equal(kvf_client_put_parts(c, &b, HEAD, &op), 0);
    assert_non_null(op);
    assert_int_equal(kvf_op_put_abort(op), 0);
    kvf_op_wait(op);
    assert_int_equal(st[0], KVF_ECANCELED);
    assert_int_equal(kvf_op_free(&op), 0);
    kvf_client_close(&c);
    daemon_stop(&d);
}

static void test_shm_hot_keys_from_nearest_holder(void **state)
{
    (void)state;
    daemon_t a, b;
    daemon_start(&a, "64M", NULL);
    char extra[200];
    snprintf(extra, sizeof extra, "--shm off --replicate-hits 2 --replicas 2 --peer %s", a.addr);
    daemon_start(&b, "64M", extra);
    kvf_client *c = client_open_two(&a, &b, "auto");
    kvf_client *tcp = client_open_two(&a, &b, "tcp");
    char why[400];
    assert_string_equal(kvf_client_transport(c, why, sizeof why), "shm");
    /* 36 keys whose first node is B: 12 made hot (read twice from B over TCP), 24 left cold (12
     * for the one-key gets, 12 for the batches: a key read twice is hot, whoever reads it). */
    enum { N = 24, HOT = 12, ALL = 36 };
    uint64_t ids[ALL];
    size_t n = 0;
    for (uint64_t i = 1000; n < ALL && i < 100000; i++) {
        kvf_key k = key_of(i);
        if (kvf_client_node_of(c, &k) == 1)
            ids[n++] = i;
    }
    assert_int_equal(n, ALL);
    int st[ALL];
    for (size_t i = 0; i < ALL; i++) {
        put_keys(c, ids[i], 1, 3, SEG, st);
        assert_int_equal(st[0], 0);
    }
    for (int round = 0; round < 2; round++)
        for (size_t i = 0; i < HOT; i++)
            assert_int_equal(get_keys(tcp, ids[i], 1, SEG, 0, st, NULL), 1);
    /* A has the hot ones once B's replicator pushed them (5 s at most). */
    kvf_key hot[HOT];
    for (size_t i = 0; i < HOT; i++)
        hot[i] = key_of(ids[i]);
    assert_int_equal(harness_wait_present(&a, NS, NULL, hot, HOT, 5000), HOT);
    for (int stream = 0; stream < 2; stream++) {
        kvf_client_counters k0;
        kvf_client_counters_get(c, &k0);
        size_t hits = 0;
        for (size_t i = 0; i < N; i++) /* one key a get: each key's own path */
            hits += get_keys(c, ids[i], 1, SEG, stream ? KVF_GET_STREAM : 0, st, NULL);
        assert_int_equal(hits, N);
        kvf_client_counters d = near_moved(c, &k0, stream ? "streamed" : "plain");
        assert_int_equal(d.near_keys, N);
        assert_int_equal(d.near_misses, N - HOT);
        assert_true(d.shm_bytes_received >= HOT * (uint64_t)kvf_obj_raw_size(LAYERS, SEG) / 2);
    }
    /* The hot ones and 12 cold ones not read yet in one batch, mixed, plain and streamed: the
     * same. */
    uint64_t mix[N];
    for (size_t i = 0; i < N; i++)
        mix[i] = ids[i < HOT ? i : i + (ALL - N)];
    for (int stream = 0; stream < 2; stream++) {
        kvf_client_counters k0;
        kvf_client_counters_get(c, &k0);
        assert_int_equal(get_ids(c, mix, 0, N, SEG, stream ? KVF_GET_STREAM : 0, st, NULL, NULL),
                         N);
        kvf_client_counters d = near_moved(c, &k0, stream ? "streamed, mixed" : "plain, mixed");
        assert_int_equal(d.near_keys, N);
        assert_int_equal(d.near_misses, N - HOT);
    }
    /* A lease that ends between layers: 400 ms leases, and an engine that holds layer 0 for
     * 600 ms once it is reported (and overwrites it). Layer 1's copy then finds the lease over:
     * the hot keys are asked again of B, and only layers 1 and later are spliced in; layer 0,
     * already the engine's, is never written again. */
    kvf_client_close(&c);
    c = client_open_two_opts(&a, &b, (kvf_client_opts){.shm_lease_ms = 400});
    /* B's HELLO (its K) is heard on the client's first request to it */
    assert_int_equal(get_keys(c, ids[ALL - 1], 1, SEG, 0, st, NULL), 1);
    {
        kvf_client_counters k0;
        kvf_client_counters_get(c, &k0);
        struct late_layer late = {.sleep_ms = 600};
        assert_int_equal(get_ids_late(c, ids, 0, HOT, SEG, KVF_GET_STREAM, st, NULL, NULL, &late),
                         HOT);
        assert_int_equal(atomic_load(&layers_seen), LAYERS);
        kvf_client_counters d = near_moved(c, &k0, "streamed, lease ended after layer 0");
        assert_int_equal(d.near_keys, HOT);
        assert_int_equal(d.near_misses, HOT);
        assert_int_equal(d.shm_lease_expired, HOT);
    }
    /* Leases of the nearer holder that end before the copy is over (1 ms): every hot key is asked
     * again of its first node and is a hit with its own bytes, plain and streamed, every layer
     * reported once, in order. */
    kvf_client_close(&c);
    c = client_open_two_opts(&a, &b, (kvf_client_opts){.shm_lease_ms = 1});
    /* B's HELLO (its K) is heard on the client's first request to it */
    assert_int_equal(get_keys(c, ids[ALL - 1], 1, SEG, 0, st, NULL), 1);
    for (int stream = 0; stream < 2; stream++) {
        kvf_client_counters k0;
        kvf_client_counters_get(c, &k0);
        assert_int_equal(get_ids(c, ids, 0, HOT, SEG, stream ? KVF_GET_STREAM : 0, st, NULL, NULL),
                         HOT);
        if (stream)
            assert_int_equal(atomic_load(&layers_seen), LAYERS);
        kvf_client_counters d =
            near_moved(c, &k0, stream ? "streamed, 1 ms leases" : "plain, 1 ms leases");
        assert_int_equal(d.near_keys, HOT);
        assert_int_equal(d.near_misses, HOT);
        assert_int_equal(d.shm_lease_expired, HOT);
    }
    /* With B gone, a key asked again finds nobody: a miss, never the op's failure, and never
     * bytes (get_ids fails the test on an op that fails and on a hit with other bytes). */
    daemon_stop(&b);
    for (int stream = 0; stream < 2; stream++) {
        size_t hits = get_ids(c, ids, 0, HOT, SEG, stream ? KVF_GET_STREAM : 0, st, NULL, NULL);
        print_message("%s, 1 ms leases, B gone: %zu of %d hits\n", stream ? "streamed" : "plain",
                      hits, HOT);
        assert_int_equal(hits, 0);
    }
    kvf_client_close(&tcp);
    kvf_client_close(&c);
    daemon_stop(&a);
}

int main(void)
{
    harness_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_shm_round_trip, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_fallback_reasons, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_stream_reports_misses_first, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_churn_never_wrong, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_lease_end_asks_again_over_tcp, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_default_lease_grows, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_leases_in_place, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_store_restart_reconnects, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_malicious_client_cannot_write, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_forged_fds_and_unreleased_leases, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_dead_client_frees_reservations, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_hot_keys_from_nearest_holder, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_probe_says_what_the_node_takes, teardown_daemons),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
