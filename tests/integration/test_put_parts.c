/*
 * Puts written in parts (kvf_client_put_parts; WRITE and SEAL, docs/protocol.md "Objects written
 * in parts") against real kvf-store daemons on loopback: objects sent layer by layer while they
 * are still being produced, sealed, then read back byte for byte; aborts, deadlines and bad heads;
 * and hand-made WRITE and SEAL frames that break the rules, which must cost the sender its
 * reservation and never the daemon anything.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvf/kvf.h"
#include "kvf/object.h"

#include "harness.h"

#include "bytes.h"
#include "hash.h"
#include "wire.h"

#define LAYERS 8
#define SEG    (64u << 10)
#define N_OBJ  24

static const uint64_t NS = 0x9a7f5eed0badcafeull;

static kvf_key key_of(uint64_t i, uint64_t salt)
{
    kvf_key k = {.lo = i * 0x9E3779B97F4A7C15ull + salt, .hi = (i << 8) ^ 0x5a5a ^ salt};
    return k;
}

static uint8_t byte_at(uint64_t i, uint32_t l, size_t j)
{
    uint64_t x = (i + 1) * 0x100000001b3ull ^ ((uint64_t)l << 40) ^ j * 0x9E3779B1u;
    x ^= x >> 29;
    return (uint8_t)(x * 0xbf58476d1ce4e5b9ull >> 56);
}

typedef struct objs {
    size_t n;
    uint32_t hdr;
    uint64_t len;
    kvf_key *keys;
    uint8_t **obj;
    const void **ptr;
    uint64_t *lens;
    uint64_t *xxh; /* n x LAYERS */
    int *st;
} objs;

static void objs_make(objs *o, size_t n, uint64_t salt)
{
    o->n = n;
    o->hdr = kvf_obj_header_len(LAYERS);
    o->len = kvf_obj_raw_size(LAYERS, SEG);
    o->keys = calloc(n, sizeof *o->keys);
    o->obj = calloc(n, sizeof *o->obj);
    o->ptr = calloc(n, sizeof *o->ptr);
    o->lens = calloc(n, sizeof *o->lens);
    o->xxh = calloc(n * LAYERS, sizeof *o->xxh);
    o->st = calloc(n, sizeof *o->st);
    assert_true(o->keys && o->obj && o->ptr && o->lens && o->xxh && o->st);
    for (size_t i = 0; i < n; i++) {
        o->keys[i] = key_of(i, salt);
        o->obj[i] = calloc(1, o->len);
        assert_non_null(o->obj[i]);
        o->ptr[i] = o->obj[i];
        o->lens[i] = o->len;
    }
}

/* Layer l of every object is produced: its bytes written, its checksum noted. */
static void objs_layer(objs *o, uint32_t l)
{
    for (size_t i = 0; i < o->n; i++) {
        uint8_t *seg = o->obj[i] + o->hdr + (size_t)l * SEG;
        for (size_t j = 0; j < SEG; j++)
            seg[j] = byte_at(i, l, j);
        o->xxh[i * LAYERS + l] = kvf__xxh3(seg, SEG);
    }
}

/* Every head written, from the checksums. */
static void objs_seal(objs *o)
{
    for (size_t i = 0; i < o->n; i++)
        kvf_obj_seal_raw(o->obj[i], &o->keys[i], 7, 64, LAYERS, SEG, o->xxh + i * LAYERS);
}

/* Objects whose every layer and head are written already. */
static void objs_whole(objs *o, size_t n, uint64_t salt)
{
    objs_make(o, n, salt);
    for (uint32_t l = 0; l < LAYERS; l++)
        objs_layer(o, l);
    objs_seal(o);
}

static void objs_free(objs *o)
{
    for (size_t i = 0; i < o->n; i++)
        free(o->obj[i]);
    free(o->keys);
    free(o->obj);
    free(o->ptr);
    free(o->lens);
    free(o->xxh);
    free(o->st);
}

static kvf_batch objs_batch(objs *o, int deadline_ms)
{
    return (kvf_batch){.n = o->n,
                       .keys = o->keys,
                       .objs = o->ptr,
                       .lens = o->lens,
                       .status = o->st,
                       .deadline_ms = deadline_ms};
}

/* Reads every object of o back: returns how many came whole, each compared byte for byte. */
static size_t objs_read_back(kvf_client *c, objs *o)
{
    uint8_t *mem = malloc(o->n * o->len);
    void **bufs = calloc(o->n, sizeof *bufs);
    uint64_t *caps = calloc(o->n, sizeof *caps), *got = calloc(o->n, sizeof *got);
    int *st = calloc(o->n, sizeof *st);
    assert_true(mem && bufs && caps && got && st);
    for (size_t i = 0; i < o->n; i++) {
        bufs[i] = mem + i * o->len;
        caps[i] = o->len;
    }
    kvf_batch b = {.n = o->n,
                   .keys = o->keys,
                   .bufs = bufs,
                   .caps = caps,
                   .out_lens = got,
                   .status = st,
                   .deadline_ms = 5000};
    assert_int_equal(kvf_client_get(c, &b), 0);
    size_t whole = 0;
    for (size_t i = 0; i < o->n; i++) {
        if (st[i] != 0)
            continue;
        assert_int_equal(got[i], o->len);
        assert_memory_equal(bufs[i], o->obj[i], o->len);
        whole++;
    }
    free(mem);
    free(bufs);
    free(caps);
    free(got);
    free(st);
    return whole;
}

static size_t objs_present(kvf_client *c, objs *o)
{
    uint8_t *present = calloc(o->n, 1);
    assert_int_equal(kvf_client_exists(c, o->n, o->keys, present, 5000), 0);
    size_t k = 0;
    for (size_t i = 0; i < o->n; i++)
        k += present[i];
    free(present);
    return k;
}

/* kvf_client_put_parts, asked again while the nodes' HELLO replies are not in yet (a client puts
 * in parts only on nodes that said they take parts): 2 s at most. */
static int parts_begin(kvf_client *c, const kvf_batch *b, uint64_t head_len, kvf_op **op)
{
    int rc = KVF_ENOTSUP;
    for (int i = 0; i < 200 && rc == KVF_ENOTSUP; i++) {
        rc = kvf_client_put_parts(c, b, head_len, op);
        if (rc == KVF_ENOTSUP)
            usleep(10000);
    }
    return rc;
}

/* Two daemons and a client of both, over transport ("tcp", or "shm": the daemons are on this
 * host, and a put in parts goes over their Unix sockets), with io I/O engines (0: the default).
 * With more than one, a put in parts of enough bytes is split across them, as a whole put is. */
static kvf_client *two_nodes_over(daemon_t *a, daemon_t *b, const char *transport, int io)
{
    daemon_start(a, "64M", "");
    daemon_start(b, "64M", "");
    const char *nodes[2] = {a->addr, b->addr};
    kvf_client_opts o = {.nodes = nodes,
                         .n_nodes = 2,
                         .ns = NS,
                         .deadline_ms = 5000,
                         .transport = transport,
                         .io_threads = io};
    kvf_client *c = NULL;
    char err[400];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client open: %s", err);
    assert_string_equal(kvf_client_transport(c, NULL, 0), transport);
    if (io > 0)
        assert_int_equal(kvf_client_io_threads(c), io); /* 4 connections a node: room for 3 */
    return c;
}

static kvf_client *two_nodes(daemon_t *a, daemon_t *b)
{
    return two_nodes_over(a, b, "tcp", 1);
}

/* The requests of a put of o's keys split across io engines of one connection a node each:
 * each engine's share of the keys (equal objects: equal counts, in order), one request to each
 * node it has keys for. */
static uint64_t split_requests(const kvf_client *c, const objs *o, int io)
{
    uint64_t n = 0;
    for (int s = 0; s < io; s++) {
        int on[2] = {0, 0};
        for (size_t i = o->n * (size_t)s / (size_t)io; i < o->n * (size_t)(s + 1) / (size_t)io; i++)
            on[kvf_client_node_of(c, &o->keys[i]) & 1] = 1;
        n += (uint64_t)(on[0] + on[1]);
    }
    return n;
}

static uint64_t requests_of(kvf_client *c)
{
    kvf_client_counters k;
    kvf_client_counters_get(c, &k);
    return k.requests;
}

/* ------------------------------------------------------------------------------------------ */

/* Layers produced one by one, each said final as it is: nothing is visible before the seal, and
 * every object is whole after it; the same keys again are KVF_EEXIST. Over TCP and over the
 * nodes' Unix sockets (a client that reaches them over shared memory). */
static void round_trip(const char *transport, int io)
{
    daemon_t a, b;
    kvf_client *c = two_nodes_over(&a, &b, transport, io);
    objs o;
    objs_make(&o, N_OBJ, 1);
    kvf_batch bt = objs_batch(&o, 10000);
    kvf_op *op = NULL;
    uint64_t req0 = requests_of(c);
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    /* A put's requests are made (and counted) when it is submitted. One engine: one or more a
     * node, by stripes. Several: each engine's share its own requests, one a node it has keys
     * for (4 connections a node over 3 engines: one each). */
    uint64_t reqs = requests_of(c) - req0;
    print_message("%s io %d: %llu requests\n", transport, io, (unsigned long long)reqs);
    if (io > 1)
        assert_int_equal(reqs, split_requests(c, &o, io));
    else
        assert_true(reqs >= 1 && reqs <= 2 * 4);
    for (uint32_t l = 0; l < LAYERS; l++) {
        objs_layer(&o, l);
        assert_int_equal(kvf_op_put_ready(op, o.hdr + (uint64_t)(l + 1) * SEG), 0);
        usleep(2000);
    }
    assert_int_equal(objs_present(c, &o), 0); /* all sent, nothing sealed */
    objs_seal(&o);
    assert_int_equal(kvf_op_put_seal(op), 0);
    assert_int_equal(kvf_op_put_ready(op, o.len), KVF_EINVAL); /* sealed already */
    assert_int_equal(kvf_op_wait(op), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], 0);
    kvf_op_free(&op);
    assert_int_equal(objs_read_back(c, &o), o.n);

    /* Again: every key is there already. */
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    assert_int_equal(kvf_op_put_seal(op), 0);
    assert_int_equal(kvf_op_wait(op), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], KVF_EEXIST);
    kvf_op_free(&op);
    objs_free(&o);
    kvf_client_close(&c);
    daemon_stop(&a);
    daemon_stop(&b);
}

static void test_parts_round_trip(void **state)
{
    (void)state;
    round_trip("tcp", 1);
    round_trip("shm", 1);
    round_trip("tcp", 3); /* split across three engines */
    round_trip("shm", 3);
}

/* Said final out of order, in jumps and all at once (a save after the pass); sealed without any
 * ready call: the same objects result. */
static void test_parts_jumps_and_seal_alone(void **state)
{
    (void)state;
    daemon_t a, b;
    kvf_client *c = two_nodes(&a, &b);
    objs o;
    objs_make(&o, N_OBJ, 2);
    for (uint32_t l = 0; l < LAYERS; l++)
        objs_layer(&o, l);
    kvf_batch bt = objs_batch(&o, 10000);
    kvf_op *op = NULL;
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    assert_int_equal(kvf_op_put_ready(op, o.hdr + 5 * SEG), 0);
    assert_int_equal(kvf_op_put_ready(op, o.hdr + 2 * SEG), 0);       /* less: nothing changes */
    assert_int_equal(kvf_op_put_ready(op, o.hdr + 5 * SEG + 100), 0); /* mid-segment */
    objs_seal(&o);
    assert_int_equal(kvf_op_put_seal(op), 0);
    assert_int_equal(kvf_op_wait(op), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], 0);
    kvf_op_free(&op);
    assert_int_equal(objs_read_back(c, &o), o.n);
    objs_free(&o);

    /* sealed with no ready call at all */
    objs_whole(&o, N_OBJ, 3);
    bt = objs_batch(&o, 10000);
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    assert_int_equal(kvf_op_put_seal(op), 0);
    assert_int_equal(kvf_op_wait(op), 0);
    kvf_op_free(&op);
    assert_int_equal(objs_read_back(c, &o), o.n);
    objs_free(&o);
    kvf_client_close(&c);
}

/* Aborted mid-way: KVF_ECANCELED per key, nothing visible, and the reservations are given back
 * at once (a whole put of the same keys then succeeds). Left unsealed: KVF_ETIMEDOUT at the
 * deadline, and the nodes stay healthy for the next put. */
static void abort_and_deadline(int io)
{
    daemon_t a, b;
    kvf_client *c = two_nodes_over(&a, &b, "tcp", io);
    objs o;
    objs_make(&o, N_OBJ, 4);
    kvf_batch bt = objs_batch(&o, 10000);
    kvf_op *op = NULL;
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    for (uint32_t l = 0; l < 3; l++) {
        objs_layer(&o, l);
        assert_int_equal(kvf_op_put_ready(op, o.hdr + (uint64_t)(l + 1) * SEG), 0);
    }
    assert_int_equal(kvf_op_put_abort(op), 0);
    assert_int_equal(kvf_op_put_abort(op), 0); /* harmless twice */
    assert_int_equal(kvf_op_put_seal(op), KVF_EINVAL);
    assert_int_equal(kvf_op_wait(op), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], KVF_ECANCELED);
    kvf_op_free(&op);
    assert_int_equal(objs_present(c, &o), 0);
    for (uint32_t l = 3; l < LAYERS; l++)
        objs_layer(&o, l);
    objs_seal(&o);
    assert_int_equal(kvf_client_put(c, &bt), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], 0);
    assert_int_equal(objs_read_back(c, &o), o.n);
    objs_free(&o);

    /* never sealed */
    objs_make(&o, N_OBJ, 5);
    bt = objs_batch(&o, 400);
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    objs_layer(&o, 0);
    assert_int_equal(kvf_op_put_ready(op, o.hdr + SEG), 0);
    assert_int_equal(kvf_op_wait(op), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], KVF_ETIMEDOUT);
    kvf_op_free(&op);
    assert_int_equal(objs_present(c, &o), 0);
    /* the nodes were not marked down: a put right after goes through */
    objs_free(&o);
    objs_whole(&o, N_OBJ, 6);
    bt = objs_batch(&o, 5000);
    assert_int_equal(kvf_client_put(c, &bt), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], 0);
    objs_free(&o);
    kvf_client_close(&c);
    daemon_stop(&a);
    daemon_stop(&b);
}

static void test_parts_abort_and_deadline(void **state)
{
    (void)state;
    abort_and_deadline(1);
    abort_and_deadline(3); /* split across three engines: each child aborted, or timed out */
}

/* The client closed while a put in parts waits on its caller: every key KVF_ECANCELED, the op
 * complete (what the caller says of it after changes nothing), nothing visible to a new client.
 * With one engine and split across three. */
static void closed_mid_way(int io)
{
    daemon_t a, b;
    kvf_client *c = two_nodes_over(&a, &b, "tcp", io);
    objs o;
    objs_make(&o, N_OBJ, 40 + (uint64_t)io);
    kvf_batch bt = objs_batch(&o, 10000);
    kvf_op *op = NULL;
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    for (uint32_t l = 0; l < 3; l++) {
        objs_layer(&o, l);
        assert_int_equal(kvf_op_put_ready(op, o.hdr + (uint64_t)(l + 1) * SEG), 0);
    }
    kvf_client_close(&c);
    assert_int_equal(kvf_op_wait(op), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], KVF_ECANCELED);
    assert_int_equal(kvf_op_put_ready(op, o.len), 0); /* over: nothing to do */
    assert_int_equal(kvf_op_put_seal(op), 0);
    assert_int_equal(kvf_op_free(&op), 0);
    c = harness_client_two(&a, &b, NS, NULL, "tcp");
    assert_int_equal(objs_present(c, &o), 0);
    objs_free(&o);
    kvf_client_close(&c);
    daemon_stop(&a);
    daemon_stop(&b);
}

static void test_parts_client_closed_mid_way(void **state)
{
    (void)state;
    closed_mid_way(1);
    closed_mid_way(3);
}

/* A head whose checksums do not match what was sent (a byte changed after it was said final):
 * that object is refused at the seal (KVF_ECHECKSUM) and never visible; the others are whole.
 * Each layer is said final on its own, so the node checks each segment against the checksum of
 * the part that carried it (hashed as it landed), the mismatch among them.
 * Bad arguments are refused before anything is sent. */
static void test_parts_bad_head_and_arguments(void **state)
{
    (void)state;
    daemon_t a, b;
    kvf_client *c = two_nodes(&a, &b);
    objs o;
    objs_make(&o, N_OBJ, 7);
    kvf_batch bt = objs_batch(&o, 10000);
    kvf_op *op = NULL;
    assert_int_equal(parts_begin(c, &bt, o.hdr, &op), 0);
    for (uint32_t l = 0; l < LAYERS; l++) { /* a part per segment: checked as it landed */
        objs_layer(&o, l);
        assert_int_equal(kvf_op_put_ready(op, o.hdr + (uint64_t)(l + 1) * SEG), 0);
    }
    usleep(50000);
    o.xxh[5 * LAYERS + 3] ^= 1; /* object 5's head will not match its layer 3 */
    objs_seal(&o);
    assert_int_equal(kvf_op_put_seal(op), 0);
    assert_int_equal(kvf_op_wait(op), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(o.st[i], i == 5 ? KVF_ECHECKSUM : 0);
    kvf_op_free(&op);
    assert_int_equal(objs_present(c, &o), o.n - 1);

    /* arguments */
    assert_int_equal(kvf_client_put_parts(c, &bt, 0, &op), KVF_EINVAL);
    assert_int_equal(kvf_client_put_parts(c, &bt, o.len, &op), KVF_EINVAL);
    o.lens[2] = o.len - 8;
    assert_int_equal(kvf_client_put_parts(c, &bt, o.hdr, &op), KVF_EINVAL);
    o.lens[2] = o.len;
    assert_int_equal(kvf_op_put_ready(NULL, 1), KVF_EINVAL);
    objs_free(&o);
    kvf_client_close(&c);
}

/* ------------------------------------------------------------------------------------------ */
/* Hand-made frames */

static uint64_t next_id = 100;

/* Sends a request of opcode with the given payload and returns its status, the per-item statuses
 * in st (n of them) where it is not an error reply. */
static int raw_call(int fd, uint16_t opcode, uint32_t n, const uint8_t *payload, size_t plen,
                    int32_t *st)
{
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = opcode,
                      .request_id = ++next_id,
                      .item_count = n,
                      .payload_len = plen};
    kvf__wire_hdr_encode(hdr, &h);
    harness_raw_send(fd, hdr, sizeof hdr);
    if (plen)
        harness_raw_send(fd, payload, plen);
    kvf_wire_hdr rh;
    uint8_t rep[4096];
    size_t got = 0;
    int status = harness_raw_reply(fd, &rh, rep, sizeof rep, &got);
    if (status == 0 && st)
        for (uint32_t i = 0; i < n && 4 * (size_t)i + 4 <= got; i++)
            st[i] = (int32_t)kvf__get_u32(rep + 4 * (size_t)i);
    return status;
}

static int raw_hello(int fd)
{
    uint8_t p[24] = {0};
    kvf__put_u32(p, KVF_WIRE_VERSION);
    kvf__put_u32(p + 4, KVF_WIRE_VERSION);
    kvf__put_u64(p + 8, NS);
    return raw_call(fd, KVF_OP_HELLO, 0, p, sizeof p, NULL);
}

/* ADMIT of one key of len bytes: its status. */
static int32_t raw_admit(int fd, const kvf_key *k, uint64_t len)
{
    uint8_t p[32];
    kvf__put_u64(p, NS);
    kvf__wire_key_put(p + 8, k);
    kvf__put_u64(p + 24, len);
    int32_t st = -1;
    assert_int_equal(raw_call(fd, KVF_OP_ADMIT, 1, p, sizeof p, &st), 0);
    return st;
}

/* WRITE or SEAL of one item: bytes [off, off + len) of obj to key k. Returns the item's status
 * (or the request's error). */
static int32_t raw_part(int fd, uint16_t opcode, const kvf_key *k, const uint8_t *obj, uint64_t off,
                        uint64_t len)
{
    size_t plen = 8 + 32 + len;
    uint8_t *p = malloc(plen);
    kvf__put_u64(p, NS);
    kvf__wire_key_put(p + 8, k);
    kvf__put_u64(p + 24, off);
    kvf__put_u64(p + 32, len);
    if (len)
        memcpy(p + 40, obj + off, len);
    int32_t st = -1;
    int rc = raw_call(fd, opcode, 1, p, plen, &st);
    free(p);
    return rc ? rc : st;
}

/* The rules of parts, broken one by one on one connection: each costs the reservation (or was
 * refused outright) and the daemon serves on; the rules kept give a whole object. */
static void test_parts_rules_on_the_wire(void **state)
{
    (void)state;
    daemon_t a;
    daemon_start(&a, "64M", "");
    objs o;
    objs_whole(&o, 12, 8);
    uint64_t hdr = o.hdr, len = o.len;
    int fd = harness_raw_connect(a.port);
    assert_int_equal(raw_hello(fd), 0);

    /* no reservation */
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[0], o.obj[0], hdr, SEG), KVF_ENOENT);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[0], o.obj[0], 0, hdr), KVF_ENOENT);
    /* the head first (offset 0) */
    assert_int_equal(raw_admit(fd, &o.keys[1], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[1], o.obj[1], 0, hdr), KVF_EINVAL);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[1], o.obj[1], hdr, SEG), KVF_ENOENT);
    /* a gap */
    assert_int_equal(raw_admit(fd, &o.keys[2], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[2], o.obj[2], hdr, SEG), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[2], o.obj[2], hdr + 2 * SEG, SEG),
                     KVF_EINVAL);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[2], o.obj[2], 0, hdr), KVF_ENOENT);
    /* past the end */
    assert_int_equal(raw_admit(fd, &o.keys[3], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[3], o.obj[3], hdr, len - hdr), 0);
    uint8_t *big = calloc(1, len + SEG);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[3], big, len, SEG), KVF_EINVAL);
    free(big);
    /* sealed before the parts reach the end */
    assert_int_equal(raw_admit(fd, &o.keys[4], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[4], o.obj[4], hdr, 3 * SEG), 0);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[4], o.obj[4], 0, hdr), KVF_EINVAL);
    /* a head of another length than where the parts began */
    assert_int_equal(raw_admit(fd, &o.keys[5], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[5], o.obj[5], hdr, len - hdr), 0);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[5], o.obj[5], 0, hdr - 8), KVF_EINVAL);
    /* a seal at an offset */
    assert_int_equal(raw_admit(fd, &o.keys[6], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[6], o.obj[6], hdr, len - hdr), 0);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[6], o.obj[6], 8, hdr - 8), KVF_EINVAL);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[6], o.obj[6], 0, hdr), KVF_ENOENT);
    /* a seal of no bytes drops the reservation: the key can be admitted again */
    assert_int_equal(raw_admit(fd, &o.keys[7], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[7], o.obj[7], hdr, SEG), 0);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[7], NULL, 0, 0), 0);
    assert_int_equal(raw_admit(fd, &o.keys[7], len), 0);
    /* kept: parts in order (uneven sizes), then the head: visible and whole */
    assert_int_equal(raw_admit(fd, &o.keys[8], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[8], o.obj[8], hdr, 1000), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[8], o.obj[8], hdr + 1000, len - hdr - 1000),
                     0);
    assert_int_equal(raw_part(fd, KVF_OP_SEAL, &o.keys[8], o.obj[8], 0, hdr), 0);
    /* a reservation of another connection is not this one's to write */
    int fd2 = harness_raw_connect(a.port);
    assert_int_equal(raw_hello(fd2), 0);
    assert_int_equal(raw_admit(fd2, &o.keys[9], len), 0);
    assert_int_equal(raw_part(fd, KVF_OP_WRITE, &o.keys[9], o.obj[9], hdr, SEG), KVF_ENOENT);
    close(fd2);

    /* malformed tables are fatal: a WRITE item of no bytes, lengths past the payload */
    uint8_t bad[40 + 8];
    kvf__put_u64(bad, NS);
    kvf__wire_key_put(bad + 8, &o.keys[10]);
    kvf__put_u64(bad + 24, hdr);
    kvf__put_u64(bad + 32, 0);
    int fd3 = harness_raw_connect(a.port);
    assert_int_equal(raw_hello(fd3), 0);
    assert_int_equal(raw_call(fd3, KVF_OP_WRITE, 1, bad, 40 + 8, NULL), KVF_EPROTO);
    close(fd3);
    fd3 = harness_raw_connect(a.port);
    assert_int_equal(raw_hello(fd3), 0);
    kvf__put_u64(bad + 32, 9);
    assert_int_equal(raw_call(fd3, KVF_OP_WRITE, 1, bad, 40 + 8, NULL), KVF_EPROTO);
    close(fd3);
    close(fd);

    /* what is visible: object 8 alone, whole */
    const char *nodes[1] = {a.addr};
    kvf_client_opts co = {
        .nodes = nodes, .n_nodes = 1, .ns = NS, .deadline_ms = 5000, .transport = "tcp"};
    kvf_client *c = NULL;
    char err[300];
    if (kvf_client_open(&c, &co, err, sizeof err) != 0)
        fail_msg("client open: %s", err);
    uint8_t *present = calloc(o.n, 1);
    assert_int_equal(kvf_client_exists(c, o.n, o.keys, present, 5000), 0);
    for (size_t i = 0; i < o.n; i++)
        assert_int_equal(present[i], i == 8);
    free(present);
    objs o8 = o;
    o8.n = 1;
    o8.keys = &o.keys[8];
    o8.obj = &o.obj[8];
    assert_int_equal(objs_read_back(c, &o8), 1);
    kvf_client_close(&c);
    daemon_stop(&a);
    objs_free(&o);
}

int main(void)
{
    harness_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_parts_round_trip, teardown_daemons),
        cmocka_unit_test_teardown(test_parts_jumps_and_seal_alone, teardown_daemons),
        cmocka_unit_test_teardown(test_parts_abort_and_deadline, teardown_daemons),
        cmocka_unit_test_teardown(test_parts_client_closed_mid_way, teardown_daemons),
        cmocka_unit_test_teardown(test_parts_bad_head_and_arguments, teardown_daemons),
        cmocka_unit_test_teardown(test_parts_rules_on_the_wire, teardown_daemons),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
