/*
 * A streamed get whose batch names a node for its keys (kvf_batch.nodes, a plan's nearest
 * holder) over TCP: a key the named node lacks, or cannot give before its first layer, is asked
 * of its own node in the same get, and no layer is reported before every key's has arrived.
 * Three real kvf-store daemons on loopback (--shm off), a client of all three with two I/O
 * engines (so that a batch is split across engines too):
 *
 * - every key named to a node other than its own, which lacks it: every key arrives, bytes as
 *   put, each layer reported once, in order, and only when that layer of every key is in its
 *   buffer; named_reasked counts them all;
 * - keys held by the named node only: they come from it, none asked again; without the names
 *   those whose own node is another are misses (the names are what finds them);
 * - keys held nowhere: misses after their own node was asked, the get completes at once;
 * - the named node stopped: every key arrives from its own node;
 * - a plain get keeps the named node's miss (its caller asks again).
 */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvf/client.h"
#include "kvf/error.h"
#include "kvf/object.h"

#include "harness.h"

#define LAYERS 6
#define SEG    (24 * 1024)
#define KEYS   24

static const uint64_t NS = 0x57e4a3ed00000001ull;

static kvf_key key_at(uint64_t i)
{
    return (kvf_key){.lo = 0xC2B2AE3D27D4EB4Full * (i + 1), .hi = i + 0x5151};
}

/* Byte b of layer l of key i's object. */
static uint8_t byte_at(uint64_t i, uint32_t l, size_t b)
{
    return (uint8_t)((i * 131u + l * 29u + b * 7u + (b >> 9)) & 0xff);
}

static uint8_t *object_of(uint64_t i, uint64_t *len)
{
    uint8_t *raw = malloc((size_t)SEG * LAYERS);
    assert_non_null(raw);
    const void *segs[LAYERS];
    for (uint32_t l = 0; l < LAYERS; l++) {
        for (size_t b = 0; b < SEG; b++)
            raw[l * (size_t)SEG + b] = byte_at(i, l, b);
        segs[l] = raw + l * (size_t)SEG;
    }
    size_t cap = kvf_obj_raw_size(LAYERS, SEG), out = 0;
    uint8_t *obj = malloc(cap);
    assert_non_null(obj);
    kvf_key k = key_at(i);
    assert_int_equal(
        kvf_obj_encode(&k, 11, 16, LAYERS, segs, SEG, KVF_CODEC_NONE, obj, cap, &out, NULL), 0);
    free(raw);
    *len = out;
    return obj;
}

static kvf_client *open_client(const char *const *addrs, size_t n)
{
    kvf_client_opts o = {.nodes = addrs,
                         .n_nodes = n,
                         .ns = NS,
                         .deadline_ms = 4000,
                         .conns_per_node = 2,
                         .io_threads = 2,
                         .stripe_bytes = 64 * 1024};
    kvf_client *c = NULL;
    char err[300];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client: %s", err);
    return c;
}

/* Puts keys ids[0..n) through c (each on its own node among c's). */
static void put_keys(kvf_client *c, const uint64_t *ids, size_t n)
{
    kvf_key keys[KEYS];
    uint8_t *objs[KEYS];
    uint64_t lens[KEYS];
    int st[KEYS];
    for (size_t i = 0; i < n; i++) {
        keys[i] = key_at(ids[i]);
        objs[i] = object_of(ids[i], &lens[i]);
    }
    kvf_batch b = {
        .n = n, .keys = keys, .objs = (const void *const *)objs, .lens = lens, .status = st};
    assert_int_equal(kvf_client_put(c, &b), 0);
    for (size_t i = 0; i < n; i++) {
        assert_true(st[i] == 0 || st[i] == KVF_EEXIST);
        free(objs[i]);
    }
}

/* What the layer callback saw: the layers in the order reported, and whether each was, for every
 * key that ended a hit, already whole in its buffer when reported. */
typedef struct watch {
    size_t n;
    const uint64_t *ids;
    uint8_t **bufs;
    uint32_t seen[LAYERS + 4];
    int n_seen;
    int early; /* a layer reported before some key's bytes of it were there */
} watch;

/* Whether layer l of key i is whole in buf (an object of codec none: segments in layer order). */
static int layer_there(const uint8_t *buf, uint64_t i, uint32_t l)
{
    kvf_obj_info info;
    if (kvf_obj_parse(buf, kvf_obj_raw_size(LAYERS, SEG), &info) != 0 || info.layers != LAYERS)
        return 0;
    const uint8_t *p = buf + info.header_len;
    for (uint32_t k = 0; k < l; k++)
        p += kvf_obj_seg_at(&info, k).stored_len;
    if (kvf_obj_seg_at(&info, l).stored_len != SEG)
        return 0;
    for (size_t b = 0; b < SEG; b++)
        if (p[b] != byte_at(i, l, b))
            return 0;
    return 1;
}

static void on_layer(kvf_op *op, uint32_t l, void *ud)
{
    (void)op;
    watch *w = ud;
    if (w->n_seen < LAYERS + 4)
        w->seen[w->n_seen++] = l;
    for (size_t k = 0; k < w->n; k++)
        if (!layer_there(w->bufs[k], w->ids[k], l))
            w->early = 1;
}

/* Gets ids[0..n) (streamed when stream), naming node named[k] for key k where named is not NULL,
 * and checks every hit byte for byte. Returns the hits; st gets each key's status. */
static size_t get_keys(kvf_client *c, const uint64_t *ids, size_t n, const uint32_t *named,
                       int stream, int *st, watch *w)
{
    kvf_key keys[KEYS];
    uint8_t *bufs[KEYS];
    uint64_t caps[KEYS], lens[KEYS];
    for (size_t i = 0; i < n; i++) {
        keys[i] = key_at(ids[i]);
        caps[i] = kvf_obj_raw_size(LAYERS, SEG);
        bufs[i] = calloc(1, caps[i]);
        assert_non_null(bufs[i]);
        lens[i] = 0;
    }
    *w = (watch){.n = n, .ids = ids, .bufs = bufs};
    kvf_batch b = {.n = n,
                   .keys = keys,
                   .bufs = (void *const *)bufs,
                   .caps = caps,
                   .out_lens = lens,
                   .status = st,
                   .flags = stream ? KVF_GET_STREAM : 0,
                   .layer_cb = stream ? on_layer : NULL,
                   .ud = w,
                   .nodes = named};
    kvf_client_get(c, &b);
    size_t hits = 0;
    for (size_t i = 0; i < n; i++) {
        if (st[i] == 0) {
            hits++;
            kvf_obj_info info;
            assert_int_equal(kvf_obj_verify(bufs[i], lens[i], &info), 0);
            assert_true(kvf_key_eq(&info.key, &keys[i]));
            for (uint32_t l = 0; l < LAYERS; l++)
                assert_true(layer_there(bufs[i], ids[i], l));
        }
        free(bufs[i]);
    }
    /* the watch's buffers are gone: only its record of the callbacks is read from now */
    w->bufs = NULL;
    return hits;
}

static uint64_t reasked(kvf_client *c)
{
    kvf_client_counters k;
    kvf_client_counters_get(c, &k);
    return k.named_reasked;
}

/* The layers were reported once each, in order, every one of them. */
static void assert_layers_in_order(const watch *w)
{
    assert_int_equal(w->n_seen, LAYERS);
    for (int i = 0; i < w->n_seen; i++)
        assert_int_equal(w->seen[i], (uint32_t)i);
    assert_false(w->early);
}

static void test_stream_named(void **state)
{
    (void)state;
    daemon_t d[3];
    for (int i = 0; i < 3; i++)
        daemon_start(&d[i], "64M", "--threads 1 --shm off");
    const char *all[3] = {d[0].addr, d[1].addr, d[2].addr}, *only_b[1] = {d[1].addr};
    kvf_client *c = open_client(all, 3), *cb = open_client(only_b, 1);

    uint64_t ids[KEYS], ids_b[KEYS], ids_none[KEYS];
    uint32_t other[KEYS], to_b[KEYS], to_c[KEYS];
    int st[KEYS];
    watch w;
    size_t own_b = 0;
    for (size_t i = 0; i < KEYS; i++) {
        ids[i] = 100 + i;
        ids_b[i] = 5000 + i;
        ids_none[i] = 90000 + i;
        kvf_key k = key_at(ids[i]), kb = key_at(ids_b[i]);
        other[i] = (uint32_t)((kvf_client_node_of(c, &k) + 1) % 3);
        to_b[i] = 1;
        own_b += kvf_client_node_of(c, &kb) == 1;
    }
    put_keys(c, ids, KEYS);    /* each on its own node */
    put_keys(cb, ids_b, KEYS); /* all on b */

    /* 1. Named elsewhere: each named node lacks its keys; their own nodes give them. */
    uint64_t r0 = reasked(c);
    assert_int_equal(get_keys(c, ids, KEYS, other, 1, st, &w), KEYS);
    assert_layers_in_order(&w);
    printf("named elsewhere: %d of %d keys arrive, %" PRIu64 " asked again of their own node\n",
           KEYS, KEYS, reasked(c) - r0);
    assert_int_equal(reasked(c) - r0, KEYS);

    /* 2. On b only: with b named every key comes from b, none asked again ... */
    r0 = reasked(c);
    assert_int_equal(get_keys(c, ids_b, KEYS, to_b, 1, st, &w), KEYS);
    assert_layers_in_order(&w);
    assert_int_equal(reasked(c) - r0, 0);
    /* ... and without the names only those whose own node is b are found. */
    size_t found = get_keys(c, ids_b, KEYS, NULL, 1, st, &w);
    printf("on b only: %zu of %d found without names (own node b: %zu), %d with b named\n", found,
           KEYS, own_b, KEYS);
    assert_int_equal(found, own_b);

    /* b alone asked whether it holds them (kvf_client_exists_on): all of them, wherever their
     * own node is; a node out of range is refused */
    kvf_key kb[KEYS];
    uint8_t present[KEYS];
    for (size_t i = 0; i < KEYS; i++)
        kb[i] = key_at(ids_b[i]);
    assert_int_equal(kvf_client_exists_on(c, 1, KEYS, kb, present, 2000), 0);
    for (size_t i = 0; i < KEYS; i++)
        assert_int_equal(present[i], 1);
    assert_int_equal(kvf_client_exists_on(c, 0, KEYS, kb, present, 2000), 0);
    for (size_t i = 0; i < KEYS; i++)
        assert_int_equal(present[i], 0);
    assert_int_equal(kvf_client_exists_on(c, 3, KEYS, kb, present, 2000), KVF_EINVAL);

    /* 3. Held nowhere: misses, after their own node was asked too. */
    r0 = reasked(c);
    assert_int_equal(get_keys(c, ids_none, KEYS, to_b, 1, st, &w), 0);
    for (size_t i = 0; i < KEYS; i++)
        assert_int_equal(st[i], KVF_ENOENT);
    assert_true(reasked(c) - r0 > 0);

    /* 4. A plain get keeps the named node's miss: its caller asks again. */
    r0 = reasked(c);
    assert_int_equal(get_keys(c, ids, KEYS, other, 0, st, &w), 0);
    assert_int_equal(reasked(c) - r0, 0);

    /* 5. The named node stopped: the keys whose own node lives come from it. */
    size_t live = 0;
    uint64_t ids_live[KEYS];
    for (size_t i = 0; i < KEYS; i++) {
        kvf_key k = key_at(ids[i]);
        if (kvf_client_node_of(c, &k) != 2) {
            ids_live[live] = ids[i];
            to_c[live++] = 2;
        }
    }
    daemon_stop(&d[2]);
    assert_true(live > 0);
    assert_int_equal(get_keys(c, ids_live, live, to_c, 1, st, &w), live);
    assert_layers_in_order(&w);
    printf("named node stopped: %zu of %zu keys arrive from their own node\n", live, live);

    kvf_client_close(&c);
    kvf_client_close(&cb);
    daemon_stop(&d[0]);
    daemon_stop(&d[1]);
}

int main(void)
{
    harness_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_stream_named, teardown_daemons),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
