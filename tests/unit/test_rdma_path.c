/*
 * The RDMA data path end to end, in one process, over a fake fabric (no machine here has an RDMA
 * device): a real storage node (cache, server, RDMA listener) and real clients talk TCP on
 * loopback for control, while the verbs and rdma_cm calls are wrapped at link time by a fake that
 * connects queue pairs in process and carries out READs and WRITEs with memcpy, checking every
 * lkey and rkey against the registrations. The tests check what the issue asks of the data path:
 * gets by descriptors under a lease, puts by reservation, WRITE and commit with nothing visible
 * before the commit, layer-by-layer completion of streamed gets, checksums catching bytes
 * overwritten after a lease ended, completion errors turning into misses and a rebuilt
 * connection, and the fall back to TCP where a node does not serve RDMA.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kvf/client.h"
#include "kvf/error.h"

#include "cache.h"
#include "client_int.h"
#include "kvf/object.h"
#include "server.h"
#include "tenants.h"
#include "wire.h"

#include "fake_fabric.h"

#include <fcntl.h>
#include <infiniband/verbs.h>
#include <jansson.h>
#include <netinet/in.h>
#include <pthread.h>
#include <rdma/rdma_cma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* A storage node in this process */

#define NS     0x5eedull
#define LAYERS 6
#define SEG    4096u

typedef struct node {
    kvf_cache *cache;
    kvf_server *srv;
    pthread_t th;
    char addr[64];
} node;

static void *srv_main(void *arg)
{
    kvf__server_run(arg);
    return NULL;
}

static void node_start(node *n, const char *rdma)
{
    char err[256];
    kvf_cache_opts co = {.memory = 64u << 20};
    assert_int_equal(kvf__cache_open(&n->cache, &co, err, sizeof err), 0);
    kvf_server_opts so = {.host = "127.0.0.1", .verify_puts = 1, .rdma = rdma, .cache = n->cache};
    int rc = kvf__server_open(&n->srv, &so, err, sizeof err);
    if (rc)
        fail_msg("server: %s", err);
    snprintf(n->addr, sizeof n->addr, "127.0.0.1:%u", kvf__server_port(n->srv));
    assert_int_equal(pthread_create(&n->th, NULL, srv_main, n->srv), 0);
}

static void node_stop(node *n)
{
    kvf__server_stop(n->srv);
    pthread_join(n->th, NULL);
    kvf__server_close(&n->srv);
    kvf__cache_close(&n->cache);
}

static kvf_client *client_ns(const node *n, const char *transport, uint64_t ns)
{
    const char *nodes[1] = {n->addr};
    kvf_client_opts o = {
        .nodes = nodes,
        .n_nodes = 1,
        .ns = ns,
        .conns_per_node = 2,
        .transport = transport,
        /* One engine with both connections, whatever the cores: tests name connection 1 of the
         * first engine (with auto I/O threads on 16 cores each engine had one). */
        .io_threads = 1};
    kvf_client *c = NULL;
    char err[256];
    int rc = kvf_client_open(&c, &o, err, sizeof err);
    if (rc)
        fail_msg("client (%s): %s", transport, err);
    return c;
}

static kvf_client *client(const node *n, const char *transport)
{
    return client_ns(n, transport, NS);
}

/* The node's statistics, one integer by path "a" or "a.b". */
static long stat_of(kvf_client *c, const char *k1, const char *k2)
{
    char *text = NULL;
    assert_int_equal(kvf_client_stats(c, 0, &text, 2000), 0);
    json_t *o = json_loads(text, 0, NULL);
    free(text);
    assert_non_null(o);
    json_t *v = json_object_get(o, k1);
    if (k2)
        v = json_object_get(v, k2);
    assert_non_null(v);
    long r = (long)json_integer_value(v);
    json_decref(o);
    return r;
}

/* n objects of LAYERS x SEG bytes, contents from their index. */
typedef struct objs {
    size_t n;
    kvf_key *keys;
    void **obj;
    const void **cobj;
    uint64_t *len;
    void **buf;
    uint64_t *cap, *out;
    int *st;
} objs;

static void objs_make(objs *o, size_t n, uint32_t salt)
{
    o->n = n;
    o->keys = calloc(n, sizeof *o->keys);
    o->obj = calloc(n, sizeof *o->obj);
    o->cobj = calloc(n, sizeof *o->cobj);
    o->len = calloc(n, sizeof *o->len);
    o->buf = calloc(n, sizeof *o->buf);
    o->cap = calloc(n, sizeof *o->cap);
    o->out = calloc(n, sizeof *o->out);
    o->st = calloc(n, sizeof *o->st);
    uint8_t *seg = malloc((size_t)LAYERS * SEG);
    for (size_t i = 0; i < n; i++) {
        o->keys[i] = (kvf_key){.lo = 0x1000 + i + ((uint64_t)salt << 32), .hi = 0xabc + salt};
        for (size_t b = 0; b < (size_t)LAYERS * SEG; b++)
            seg[b] = (uint8_t)(b * 7 + i * 13 + salt);
        const void *segs[LAYERS];
        for (int l = 0; l < LAYERS; l++)
            segs[l] = seg + (size_t)l * SEG;
        size_t cap = kvf_obj_raw_size(LAYERS, SEG), got;
        o->obj[i] = malloc(cap);
        assert_int_equal(kvf_obj_encode(&o->keys[i], 1, 16, LAYERS, segs, SEG, KVF_CODEC_NONE,
                                        o->obj[i], cap, &got, NULL),
                         0);
        o->cobj[i] = o->obj[i];
        o->len[i] = got;
        o->buf[i] = calloc(1, cap);
        o->cap[i] = cap;
    }
    free(seg);
}

static void objs_free(objs *o)
{
    for (size_t i = 0; i < o->n; i++)
        free(o->obj[i]), free(o->buf[i]);
    free(o->keys), free(o->obj), free(o->cobj), free(o->len), free(o->buf), free(o->cap);
    free(o->out), free(o->st);
}

static int do_put(kvf_client *c, objs *o, const char **transport)
{
    kvf_batch b = {.n = o->n, .keys = o->keys, .objs = o->cobj, .lens = o->len, .status = o->st};
    kvf_op *op;
    assert_int_equal(kvf_client_put_async(c, &b, &op), 0);
    int rc = kvf_op_wait(op);
    if (transport)
        *transport = kvf_op_transport(op);
    kvf_op_free(&op);
    return rc;
}

static int do_get(kvf_client *c, objs *o, uint32_t flags, kvf_layer_cb cb, void *ud)
{
    for (size_t i = 0; i < o->n; i++)
        memset(o->buf[i], 0, o->cap[i]);
    kvf_batch b = {.n = o->n,
                   .keys = o->keys,
                   .bufs = o->buf,
                   .caps = o->cap,
                   .out_lens = o->out,
                   .status = o->st,
                   .flags = flags,
                   .layer_cb = cb,
                   .ud = ud};
    return kvf_client_get(c, &b);
}

/* A node serving RDMA, an RDMA client, and n objects put through it. */
static void stored(node *n, kvf_client **c, objs *o, size_t count, uint32_t salt)
{
    fabric_reset();
    node_start(n, "127.0.0.1:0");
    *c = client(n, "rdma");
    objs_make(o, count, salt);
    assert_int_equal(do_put(*c, o, NULL), 0);
    for (size_t i = 0; i < count; i++)
        assert_int_equal(o->st[i], 0);
}

static void finish(node *n, kvf_client **c, objs *o)
{
    kvf_client_close(c);
    objs_free(o);
    node_stop(n);
}

/* ------------------------------------------------------------------------------------------ */
/* Tests */

/* Puts by reservation, WRITE and commit; gets by descriptor and READ; the bytes are right, they
 * moved over the fabric, a TCP client reads the same, and every lease was released. */
static void test_put_get(void **state)
{
    (void)state;
    fabric_reset();
    node n;
    node_start(&n, "127.0.0.1:0");
    kvf_client *c = client(&n, "rdma");
    char why[240];
    assert_string_equal(kvf_client_transport(c, why, sizeof why), "rdma");
    objs o;
    objs_make(&o, 40, 1);
    const char *tr = NULL;
    assert_int_equal(do_put(c, &o, &tr), 0);
    assert_string_equal(tr, "rdma");
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], 0);
    assert_int_equal(F.writes, 40);
    /* Put again: every key is there already, nothing is written. */
    assert_int_equal(do_put(c, &o, NULL), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], KVF_EEXIST);
    assert_int_equal(F.writes, 40);

    assert_int_equal(do_get(c, &o, 0, NULL, NULL), 0);
    for (size_t i = 0; i < o.n; i++) {
        assert_int_equal(o.st[i], 0);
        assert_int_equal(o.out[i], o.len[i]);
        assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
    }
    assert_int_equal(F.reads, 40); /* one READ per object: its segments, after the header */
    kvf_client_counters cc;
    kvf_client_counters_get(c, &cc);
    assert_true(cc.bytes_received >= 40 * (uint64_t)LAYERS * SEG);

    kvf_client *t = client(&n, "tcp");
    assert_string_equal(kvf_client_transport(t, NULL, 0), "tcp");
    assert_int_equal(do_get(t, &o, 0, NULL, NULL), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
    assert_int_equal(stat_of(t, "rdma", "committed"), 40);
    /* Leases are released right after the op completes: poll briefly for the release. */
    for (int i = 0; i < 100 && stat_of(t, "referenced", NULL) != 0; i++)
        usleep(10000);
    assert_int_equal(stat_of(t, "referenced", NULL), 0);
    assert_int_equal(stat_of(t, "rdma", "released"), 1);
    /* The RDMA client goes: the node sees its disconnect and closes its side. */
    assert_int_equal(stat_of(t, "rdma", "connections"), 1);
    kvf_client_close(&c);
    for (int i = 0; i < 100 && stat_of(t, "rdma", "connections") != 0; i++)
        usleep(10000);
    assert_int_equal(stat_of(t, "rdma", "connections"), 0);
    assert_int_equal(stat_of(t, "rdma", "accepted"), 1);
    kvf_client_close(&t);
    objs_free(&o);
    node_stop(&n);
}

/* A streamed get READs layer by layer across the batch and reports each layer once it landed and
 * verified, in order. */
typedef struct layer_seen {
    objs *o;
    uint32_t next;
    int bad;
} layer_seen;

static void on_layer(kvf_op *op, uint32_t l, void *ud)
{
    (void)op;
    layer_seen *s = ud;
    if (l != s->next++)
        s->bad = 1;
    /* Layer l of every object is in place now. */
    uint32_t h = kvf_obj_header_len(LAYERS);
    for (size_t i = 0; i < s->o->n; i++)
        if (memcmp((uint8_t *)s->o->buf[i] + h + (size_t)l * SEG,
                   (uint8_t *)s->o->obj[i] + h + (size_t)l * SEG, SEG) != 0)
            s->bad = 1;
}

static long g_order_bad, g_last_l;
static void check_layer_major(int opcode, void *local, uint32_t len, long index)
{
    (void)opcode, (void)local, (void)len;
    /* 10 objects: requests 0..9 are layer 0, 10..19 layer 1, ... */
    long l = index / 10;
    if (l < g_last_l)
        g_order_bad = 1;
    g_last_l = l;
}

static void test_stream_layers(void **state)
{
    (void)state;
    node n;
    kvf_client *c;
    objs o;
    stored(&n, &c, &o, 10, 2);
    fabric_reset();
    g_order_bad = 0;
    g_last_l = 0;
    F.after = check_layer_major;
    layer_seen s = {.o = &o};
    assert_int_equal(do_get(c, &o, KVF_GET_STREAM, on_layer, &s), 0);
    assert_int_equal(s.next, LAYERS);
    assert_false(s.bad);
    assert_false(g_order_bad);
    assert_int_equal(F.reads, 10 * LAYERS);
    for (size_t i = 0; i < o.n; i++) {
        assert_int_equal(o.st[i], 0);
        assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
    }
    finish(&n, &c, &o);
}

/* Bytes overwritten after a lease ended (the block reused under the READ) fail the checksum: the
 * key is a miss, never a wrong byte; the others are fine. */
static void overwrite_third(int opcode, void *local, uint32_t len, long index)
{
    if (opcode == IBV_WR_RDMA_READ && index == 3)
        memset((uint8_t *)local + len / 2, 0x5a, 64);
}

static void test_overwritten_is_miss(void **state)
{
    (void)state;
    node n;
    kvf_client *c;
    objs o;
    stored(&n, &c, &o, 8, 3);
    for (int stream = 0; stream < 2; stream++) {
        fabric_reset();
        F.after = overwrite_third;
        assert_int_equal(do_get(c, &o, stream ? KVF_GET_STREAM : 0, NULL, NULL), 0);
        for (size_t i = 0; i < o.n; i++) {
            /* READ 3 is object 3 whole (plain) or object 3's layer 0 (streamed: layer-major) */
            if (i == 3) {
                assert_int_equal(o.st[i], KVF_ECHECKSUM);
                continue;
            }
            assert_int_equal(o.st[i], 0);
            assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
        }
    }
    finish(&n, &c, &o);
}

/* A lease the client never releases ends on the node: the references go. */
static void test_lease_expires(void **state)
{
    (void)state;
    node n;
    kvf_client *c;
    objs o;
    stored(&n, &c, &o, 4, 4);
    uint8_t req[16 + 16 * 4], *rep = NULL;
    size_t rlen;
    memset(req, 0, sizeof req);
    memcpy(req, &(uint64_t){NS}, 8); /* little-endian host */
    uint32_t lease_ms = 150;
    memcpy(req + 8, &lease_ms, 4);
    for (int i = 0; i < 4; i++)
        kvf__wire_key_put(req + 16 + 16 * i, &o.keys[i]);
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, -1, KVF_OP_RDMA_GET, 4, req, sizeof req, &rep, &rlen, 2000), 0);
    assert_true(rlen > 16 + 24 * 4);
    free(rep);
    assert_int_equal(stat_of(c, "referenced", NULL), 4);
    for (int i = 0; i < 100 && stat_of(c, "referenced", NULL) != 0; i++)
        usleep(20000);
    assert_int_equal(stat_of(c, "referenced", NULL), 0);
    assert_int_equal(stat_of(c, "rdma", "expired"), 1);
    /* Releasing a lease that is gone releases nothing and breaks nothing. */
    uint8_t rel[16] = {0};
    memcpy(rel, &(uint64_t){NS}, 8);
    rel[8] = 1;
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, -1, KVF_OP_RDMA_RELEASE, 0, rel, sizeof rel, &rep, &rlen, 2000),
        0);
    assert_int_equal(rlen, 8);
    assert_int_equal(rep[0], 0);
    free(rep);
    finish(&n, &c, &o);
}

/* A completion error (remote access) fails the requests from it on: those keys are misses, the
 * ones before it stand; the connection is rebuilt and the next get succeeds whole. */
static enum ibv_wc_status fail_fifth(int opcode, void *local, uint64_t remote, uint32_t len,
                                     long index)
{
    (void)opcode, (void)local, (void)remote, (void)len;
    return index == 5 ? IBV_WC_REM_ACCESS_ERR : IBV_WC_SUCCESS;
}

static void test_completion_error(void **state)
{
    (void)state;
    node n;
    kvf_client *c;
    objs o;
    stored(&n, &c, &o, 12, 5);
    fabric_reset();
    F.hook = fail_fifth;
    long connects = F.connects;
    assert_int_equal(do_get(c, &o, 0, NULL, NULL), 0);
    for (size_t i = 0; i < o.n; i++) {
        if (i < 5) {
            assert_int_equal(o.st[i], 0);
            assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
        } else {
            assert_int_equal(o.st[i], KVF_EACCES);
        }
    }
    F.hook = NULL;
    assert_int_equal(do_get(c, &o, 0, NULL, NULL), 0);
    for (size_t i = 0; i < o.n; i++) {
        assert_int_equal(o.st[i], 0);
        assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
    }
    assert_int_equal(F.connects, connects + 1);
    finish(&n, &c, &o);
}

/* Nothing written is visible before its commit; a write that fails leaves nothing behind. */
static kvf_client *g_observer;
static objs *g_put;
static long g_visible_early;
static enum ibv_wc_status observe_write(int opcode, void *local, uint64_t remote, uint32_t len,
                                        long index)
{
    (void)local, (void)remote, (void)len;
    if (opcode != IBV_WR_RDMA_WRITE)
        return IBV_WC_SUCCESS;
    uint8_t present = 1;
    /* The fabric lock is held: the observer's TCP client does not touch the fabric. */
    assert_int_equal(kvf_client_exists(g_observer, 1, &g_put->keys[index], &present, 2000), 0);
    g_visible_early += present;
    return index == 2 ? IBV_WC_RETRY_EXC_ERR : IBV_WC_SUCCESS;
}

static void test_put_commit(void **state)
{
    (void)state;
    fabric_reset();
    node n;
    node_start(&n, "127.0.0.1:0");
    kvf_client *c = client(&n, "rdma");
    g_observer = client(&n, "tcp");
    objs o;
    objs_make(&o, 6, 6);
    g_put = &o;
    g_visible_early = 0;
    F.hook = observe_write;
    assert_int_equal(do_put(c, &o, NULL), 0);
    F.hook = NULL;
    assert_int_equal(g_visible_early, 0);
    uint8_t present[6];
    assert_int_equal(kvf_client_exists(g_observer, 6, o.keys, present, 2000), 0);
    for (int i = 0; i < 6; i++) {
        /* the failed request and every one after it fail with its error */
        assert_int_equal(o.st[i], i < 2 ? 0 : KVF_ETIMEDOUT);
        assert_int_equal(present[i], i < 2);
    }
    /* No reservation lingers: the failed keys go in on the next put, over a new connection. */
    assert_int_equal(do_put(c, &o, NULL), 0);
    for (int i = 0; i < 6; i++)
        assert_int_equal(o.st[i], i < 2 ? KVF_EEXIST : 0);
    assert_int_equal(do_get(g_observer, &o, 0, NULL, NULL), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
    assert_int_equal(stat_of(g_observer, "reserved", NULL), 0);
    kvf_client_close(&g_observer);
    finish(&n, &c, &o);
}

/* Descriptor requests that make no sense get per-key errors and change nothing: a commit of a
 * key never reserved, or with another length than reserved; a reservation of 0 bytes or over the
 * node's limit; a reservation on another connection. Stored data stays exact. */
static uint8_t *table_ns(uint64_t ns, const kvf_key *keys, const uint64_t *lens, size_t n,
                         size_t *len)
{
    *len = 8 + 24 * n;
    uint8_t *p = calloc(1, *len);
    memcpy(p, &ns, 8); /* little-endian host */
    for (size_t i = 0; i < n; i++) {
        kvf__wire_key_put(p + 8 + 24 * i, &keys[i]);
        memcpy(p + 8 + 24 * i + 16, &lens[i], 8);
    }
    return p;
}

static uint8_t *table(const kvf_key *keys, const uint64_t *lens, size_t n, size_t *len)
{
    return table_ns(NS, keys, lens, n, len);
}

static int32_t status_at(const uint8_t *rep, size_t off)
{
    int32_t v;
    memcpy(&v, rep + off, 4);
    return v;
}

static void test_bad_descriptors(void **state)
{
    (void)state;
    node n;
    kvf_client *c;
    objs o;
    stored(&n, &c, &o, 2, 8);
    kvf_key fresh[3] = {{.lo = 77, .hi = 1}, {.lo = 78, .hi = 1}, {.lo = 79, .hi = 1}};
    uint64_t lens[3] = {0, (uint64_t)1 << 40, 4096};
    size_t plen, rlen;
    uint8_t *req = table(fresh, lens, 3, &plen), *rep = NULL;
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, 0, KVF_OP_RDMA_RESERVE, 3, req, plen, &rep, &rlen, 2000), 0);
    assert_int_equal(rlen, 8 + 16 * 3);
    assert_int_equal(status_at(rep, 8), KVF_EINVAL);     /* 0 bytes */
    assert_int_equal(status_at(rep, 8 + 16), KVF_E2BIG); /* over the limit */
    assert_int_equal(status_at(rep, 8 + 32), 0);         /* reserved */
    free(rep), free(req);
    /* Commit: a key never reserved, the reserved one with another length, then on another
     * connection (the reservation is not its). */
    uint64_t clen[2] = {4096, 8192};
    kvf_key ck[2] = {fresh[0], fresh[2]};
    req = table(ck, clen, 2, &plen);
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, 0, KVF_OP_RDMA_COMMIT, 2, req, plen, &rep, &rlen, 2000), 0);
    assert_int_equal(status_at(rep, 0), KVF_ENOENT);
    assert_int_equal(status_at(rep, 4), KVF_EINVAL);
    free(rep), free(req);
    req = table(&fresh[2], &lens[2], 1, &plen);
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, 1, KVF_OP_RDMA_COMMIT, 1, req, plen, &rep, &rlen, 2000), 0);
    assert_int_equal(status_at(rep, 0), KVF_ENOENT);
    free(rep);
    /* The right connection and length, but nothing was written there: verification refuses it
     * and the reservation goes. */
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, 0, KVF_OP_RDMA_COMMIT, 1, req, plen, &rep, &rlen, 2000), 0);
    int32_t st = status_at(rep, 0);
    assert_true(st == KVF_EPROTO || st == KVF_ECHECKSUM);
    free(rep), free(req);
    assert_int_equal(stat_of(c, "reserved", NULL), 0);
    uint8_t present[3];
    assert_int_equal(kvf_client_exists(c, 3, fresh, present, 2000), 0);
    assert_int_equal(present[0] + present[1] + present[2], 0);
    assert_int_equal(do_get(c, &o, 0, NULL, NULL), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
    finish(&n, &c, &o);
}

/* One request of a raw table (ns, key, len) on connection 0 of c; the first reply status. */
static int32_t raw_one(kvf_client *c, uint32_t opcode, uint64_t ns, const kvf_key *k, uint64_t len)
{
    size_t plen, rlen;
    uint8_t *req = table_ns(ns, k, &len, 1, &plen), *rep = NULL;
    assert_int_equal(kvf__io_raw(c->io[0], 0, 0, opcode, 1, req, plen, &rep, &rlen, 2000), 0);
    int32_t st = status_at(rep, opcode == KVF_OP_RDMA_RESERVE ? 8 : 0);
    free(req), free(rep);
    return st;
}

/* Regression: tenant A stored K and evicted it; tenant B reserved K at the same length, wrote
 * nothing and committed: the arena block still held A's bytes, they verified, and B's GET returned
 * A's object. A reservation is committed only the way it was made (ADMIT's by COMMIT with its
 * bytes, RDMA_RESERVE's by RDMA_COMMIT) and an RDMA block's header is cleared when it is
 * reserved, so an unwritten block never verifies. */
static void test_stale_block_never_visible(void **state)
{
    (void)state;
    node n;
    kvf_client *a;
    objs o;
    stored(&n, &a, &o, 1, 21);
    const uint64_t ns_b = NS + 1;
    kvf_client *b = client_ns(&n, "rdma", ns_b);
    int st;
    assert_int_equal(kvf_client_evict(a, 1, &o.keys[0], &st, 2000), 0);
    assert_int_equal(st, 0);
    /* ADMIT over TCP, then RDMA_COMMIT: not the way it was made. */
    assert_int_equal(raw_one(b, KVF_OP_ADMIT, ns_b, &o.keys[0], o.len[0]), 0);
    assert_int_equal(raw_one(b, KVF_OP_RDMA_COMMIT, ns_b, &o.keys[0], o.len[0]), KVF_ENOENT);
    kvf_client_close(&b); /* its connection's reservation goes with it */
    b = client_ns(&n, "rdma", ns_b);
    /* RDMA_RESERVE, no WRITE, RDMA_COMMIT: the block's header was cleared. */
    assert_int_equal(raw_one(b, KVF_OP_RDMA_RESERVE, ns_b, &o.keys[0], o.len[0]), 0);
    int32_t c = raw_one(b, KVF_OP_RDMA_COMMIT, ns_b, &o.keys[0], o.len[0]);
    assert_true(c == KVF_EPROTO || c == KVF_ECHECKSUM);
    objs ob = o;
    assert_int_not_equal(do_get(b, &ob, 0, NULL, NULL), -1);
    assert_int_not_equal(ob.st[0], 0);
    kvf_client_close(&b);
    finish(&n, &a, &o);
}

/* A node that serves no RDMA: "auto" uses TCP and says why, "rdma" refuses to open; the
 * descriptor requests get a clear, non-fatal error. */
static void test_fallback(void **state)
{
    (void)state;
    fabric_reset();
    node n;
    node_start(&n, "off");
    kvf_client *c = client(&n, "auto");
    char why[240];
    assert_string_equal(kvf_client_transport(c, why, sizeof why), "tcp");
    assert_non_null(strstr(why, "serves no RDMA"));
    objs o;
    objs_make(&o, 3, 7);
    const char *tr;
    assert_int_equal(do_put(c, &o, &tr), 0);
    assert_string_equal(tr, "tcp");
    assert_int_equal(F.writes, 0);
    uint8_t req[16 + 16] = {0}, *rep = NULL;
    size_t rlen;
    memcpy(req, &(uint64_t){NS}, 8);
    kvf__wire_key_put(req + 16, &o.keys[0]);
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, -1, KVF_OP_RDMA_GET, 1, req, sizeof req, &rep, &rlen, 2000),
        KVF_ENOTSUP);
    /* Regression: RDMA_COMMIT answered 0 on a node without RDMA. */
    size_t plen;
    uint8_t *creq = table(&o.keys[0], &o.len[0], 1, &plen);
    assert_int_equal(
        kvf__io_raw(c->io[0], 0, 0, KVF_OP_RDMA_COMMIT, 1, creq, plen, &rep, &rlen, 2000),
        KVF_ENOTSUP);
    free(creq);
    assert_int_equal(do_get(c, &o, 0, NULL, NULL), 0); /* the connection still serves */
    assert_memory_equal(o.buf[0], o.obj[0], o.len[0]);
    kvf_client_close(&c);
    const char *nodes[1] = {n.addr};
    kvf_client_opts co = {.nodes = nodes, .n_nodes = 1, .ns = NS, .transport = "rdma"};
    char err[256];
    assert_int_equal(kvf_client_open(&c, &co, err, sizeof err), KVF_ENOTSUP);
    assert_non_null(strstr(err, "serves no RDMA"));
    co.transport = "carrier-pigeon";
    assert_int_equal(kvf_client_open(&c, &co, err, sizeof err), KVF_EINVAL);
    objs_free(&o);
    node_stop(&n);
}

/* With tenants (--auth), RDMA's one key for the whole arena would let one tenant read or write
 * another's blocks: a node neither advertises nor serves it to tenants unless told
 * (--rdma-tenants). A tenant's client then runs on TCP, with the reason, and a descriptor request
 * is refused; with the flag it runs on RDMA, its namespaces scoped as on TCP. */
static void test_tenants_and_rdma(void **state)
{
    (void)state;
    char dir[] = "/tmp/kvf-rdma-auth-XXXXXX", tpath[128], cpath[128], err[300], line[512];
    assert_non_null(mkdtemp(dir));
    snprintf(tpath, sizeof tpath, "%s/tenants", dir);
    snprintf(cpath, sizeof cpath, "%s/t.cred", dir);
    kvf_credential cred;
    kvf_tenant_key k = {.role = KVF_ROLE_TENANT};
    snprintf(k.name, sizeof k.name, "t");
    assert_int_equal(kvf__cred_new(&cred, "t", k.pk), 0);
    assert_int_equal(kvf__cred_write(cpath, &cred, err, sizeof err), 0);
    FILE *f = fopen(tpath, "w");
    kvf__tenant_key_format(&k, line, sizeof line);
    fputs(line, f);
    fclose(f);
    kvf__tenants *tenants = NULL;
    assert_int_equal(kvf__tenants_open(&tenants, tpath, err, sizeof err), 0);

    for (int allow = 0; allow < 2; allow++) {
        fabric_reset();
        node n;
        char e2[256];
        kvf_cache_opts co = {.memory = 64u << 20};
        assert_int_equal(kvf__cache_open(&n.cache, &co, e2, sizeof e2), 0);
        kvf_server_opts so = {.host = "127.0.0.1",
                              .verify_puts = 1,
                              .rdma = "127.0.0.1:0",
                              .tenants = tenants,
                              .rdma_tenants = allow,
                              .cache = n.cache};
        assert_int_equal(kvf__server_open(&n.srv, &so, e2, sizeof e2), 0);
        snprintf(n.addr, sizeof n.addr, "127.0.0.1:%u", kvf__server_port(n.srv));
        assert_int_equal(pthread_create(&n.th, NULL, srv_main, n.srv), 0);
        const char *nodes[1] = {n.addr};
        kvf_client_opts o = {
            .nodes = nodes, .n_nodes = 1, .ns = NS, .transport = "auto", .credential = cpath};
        kvf_client *c = NULL;
        assert_int_equal(kvf_client_open(&c, &o, e2, sizeof e2), 0);
        char why[240];
        assert_string_equal(kvf_client_transport(c, why, sizeof why), allow ? "rdma" : "tcp");
        objs ob;
        objs_make(&ob, 4, 3);
        const char *tr = NULL;
        assert_int_equal(do_put(c, &ob, &tr), 0);
        assert_string_equal(tr, allow ? "rdma" : "tcp");
        assert_int_equal(do_get(c, &ob, 0, NULL, NULL), 0);
        for (size_t i = 0; i < ob.n; i++)
            assert_memory_equal(ob.buf[i], ob.obj[i], ob.len[i]);
        if (!allow) {
            uint8_t req[16 + 16] = {0}, *rep = NULL;
            size_t rlen;
            memcpy(req, &(uint64_t){NS}, 8);
            kvf__wire_key_put(req + 16, &ob.keys[0]);
            assert_int_equal(kvf__io_raw(c->io[0], 0, -1, KVF_OP_RDMA_GET, 1, req, sizeof req, &rep,
                                         &rlen, 2000),
                             KVF_EACCES);
            assert_int_equal(F.writes, 0);
        }
        kvf_client_close(&c);
        objs_free(&ob);
        node_stop(&n);
    }
    kvf__tenants_close(&tenants);
    unlink(tpath);
    unlink(cpath);
    rmdir(dir);
}

/* A batch of more keys than one RDMA_GET asks for (1,024): leases asked in runs, each released,
 * every key a hit with its bytes, plain and streamed (each layer reported once, in order). */
static void test_large_batch_in_runs(void **state)
{
    (void)state;
    node n;
    kvf_client *c;
    objs o;
    stored(&n, &c, &o, 2100, 5);
    assert_int_equal(do_get(c, &o, 0, NULL, NULL), 0);
    for (size_t i = 0; i < o.n; i++) {
        assert_int_equal(o.st[i], 0);
        assert_memory_equal(o.buf[i], o.obj[i], o.len[i]);
    }
    layer_seen s = {.o = &o};
    assert_int_equal(do_get(c, &o, KVF_GET_STREAM, on_layer, &s), 0);
    assert_int_equal(s.next, LAYERS);
    assert_false(s.bad);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], 0);
    kvf_client *t = client(&n, "tcp");
    for (int i = 0; i < 100 && stat_of(t, "rdma", "released") != 6; i++)
        usleep(10000);
    assert_int_equal(stat_of(t, "rdma", "released"), 6); /* 3 runs a get */
    kvf_client_close(&t);
    finish(&n, &c, &o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_get),
        cmocka_unit_test(test_stream_layers),
        cmocka_unit_test(test_overwritten_is_miss),
        cmocka_unit_test(test_lease_expires),
        cmocka_unit_test(test_completion_error),
        cmocka_unit_test(test_put_commit),
        cmocka_unit_test(test_bad_descriptors),
        cmocka_unit_test(test_stale_block_never_visible),
        cmocka_unit_test(test_fallback),
        cmocka_unit_test(test_tenants_and_rdma),
        cmocka_unit_test(test_large_batch_in_runs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
