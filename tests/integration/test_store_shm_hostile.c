/*
 * A hostile client against a real kvf-store (docs/security.md, "Shared memory on the store's
 * host"), mostly local over shared memory: requests that would make the node copy, lease, build
 * or queue without bound, and staging pages kept after the connection ends. Each case failed
 * before its mend.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

#define STAGING (1u << 20)

/* SHM_MAP on r: a staging region of stg bytes (0: none) and, with arena, the arena's view.
 * Returns the staging region's descriptor (-1: none); the arena's is closed. */
static int shm_map(raw *r, uint64_t stg, int arena)
{
    uint8_t req[16], *rep;
    size_t rlen;
    kvf__put_u64(req, stg);
    kvf__put_u32(req + 8, arena ? KVF_SHM_MAP_ARENA : 0);
    kvf__put_u32(req + 12, 0);
    int fds[4], nfd = 4;
    assert_int_equal(kvf__sync_call_test(r->fd, ++r->id, KVF_OP_SHM_MAP, 0, req, sizeof req, &rep,
                                         &rlen, fds, &nfd),
                     0);
    free(rep);
    assert_int_equal(nfd, (stg ? 1 : 0) + (arena ? 1 : 0));
    if (arena)
        close(fds[nfd - 1]);
    return stg ? fds[0] : -1;
}

/* n SHM_GET items of key i, each at offset off + k * step of the staging region with room cap.
 * Returns the reply (n x 16 bytes: status, 0, length); the caller frees it. */
static uint8_t *shm_get_items(raw *r, uint64_t i, uint32_t n, uint64_t off, uint64_t step,
                              uint64_t cap)
{
    size_t plen = 8 + 32 * (size_t)n;
    uint8_t *req = malloc(plen), *rep;
    size_t rlen;
    kvf__put_u64(req, NS);
    kvf_key k = key_of(i);
    for (uint32_t j = 0; j < n; j++) {
        uint8_t *it = req + 8 + 32 * (size_t)j;
        kvf__wire_key_put(it, &k);
        kvf__put_u64(it + 16, off + step * j);
        kvf__put_u64(it + 24, cap);
    }
    assert_int_equal(
        kvf__sync_call_test(r->fd, ++r->id, KVF_OP_SHM_GET, n, req, plen, &rep, &rlen, NULL, NULL),
        0);
    assert_int_equal(rlen, 16 * (size_t)n);
    free(req);
    return rep;
}

/* The node's STATS figure `name` now (-1: absent). */
static long long stat_now(kvf_client *c, const char *name)
{
    char key[64], *json = NULL;
    snprintf(key, sizeof key, "\"%s\":", name);
    assert_int_equal(kvf_client_stats(c, 0, &json, 2000), 0);
    const char *p = strstr(json, key);
    long long v = p ? atoll(p + strlen(key)) : -1;
    free(json);
    return v;
}

static void put_one(kvf_client *c, uint64_t i, const uint8_t *obj, uint64_t len)
{
    kvf_key k = key_of(i);
    int st = -1;
    const void *objs[1] = {obj};
    kvf_batch b = {.n = 1, .keys = &k, .objs = objs, .lens = &len, .status = &st};
    assert_int_equal(kvf_client_put(c, &b), 0);
    assert_int_equal(st, 0);
}

/* A node of 16 MiB with key i's object of version v (returned, *len its length), a client of it
 * in *c, and a raw local client in *r. */
static uint8_t *node_with_object(daemon_t *d, kvf_client **c, raw *r, uint64_t i, uint8_t v,
                                 uint64_t *len)
{
    daemon_start(d, "16M", "--threads 1");
    *c = client_open_opts(d, (kvf_client_opts){0});
    uint8_t *obj = make_obj(i, v, SEG, len);
    put_one(*c, i, obj, *len);
    *r = raw_open(d);
    return obj;
}

/* One SHM_GET moves at most its staging region's worth: 40 items that all name one object over
 * the whole region (each would be a copy on the node's loop) get it 15 times, then E2BIG. */
static void test_shm_get_moves_at_most_its_region(void **state)
{
    (void)state;
    daemon_t d;
    kvf_client *c;
    raw r;
    uint64_t len;
    uint8_t *obj = node_with_object(&d, &c, &r, 7, 1, &len);
    int stg = shm_map(&r, STAGING, 0);
    uint32_t n = 40, fit = (uint32_t)(STAGING / len);
    uint8_t *rep = shm_get_items(&r, 7, n, 0, 0, STAGING);
    for (uint32_t j = 0; j < n; j++) {
        int st = (int32_t)kvf__get_u32(rep + 16 * (size_t)j);
        print_message("item %u: %d\n", j, st);
        assert_int_equal(st, j < fit ? 0 : KVF_E2BIG);
    }
    free(rep);
    /* items in distinct places, as a client lays them out, all fit */
    rep = shm_get_items(&r, 7, fit, 0, len, len);
    for (uint32_t j = 0; j < fit; j++)
        assert_int_equal((int32_t)kvf__get_u32(rep + 16 * (size_t)j), 0);
    free(rep);
    close(stg), close(r.fd);
    free(obj);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* A staging region's pages go when its connection does, though the client keeps its descriptor
 * and mapping: it then reads zeros, and the node holds nothing for it. */
static void test_shm_staging_pages_go_with_the_connection(void **state)
{
    (void)state;
    daemon_t d;
    kvf_client *c;
    raw r;
    uint64_t len;
    uint8_t *obj = node_with_object(&d, &c, &r, 9, 2, &len);
    long long base = stat_now(c, "staging_bytes"); /* the client's own region */
    int stg = shm_map(&r, STAGING, 0);
    assert_int_equal(stat_now(c, "staging_bytes"), base + STAGING);
    uint8_t *view = mmap(NULL, STAGING, PROT_READ, MAP_SHARED, stg, 0);
    assert_true(view != MAP_FAILED);
    uint8_t *rep = shm_get_items(&r, 9, 1, 4096, 0, len);
    assert_int_equal((int32_t)kvf__get_u32(rep), 0);
    free(rep);
    assert_memory_equal(view + 4096, obj, len);
    close(r.fd);
    int zero = 0;
    for (int t = 0; t < 500 && !zero; t++) {
        usleep(20000);
        zero = 1;
        for (uint64_t b = 0; b < len && zero; b++)
            zero = view[4096 + b] == 0;
    }
    assert_true(zero);
    assert_int_equal(stat_settles(c, "staging_bytes", base), base);
    munmap(view, STAGING);
    close(stg);
    free(obj);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* RDMA_GET leases (here on the arena's view, as an engine on the node's host takes them) are
 * bounded per connection: past RDMA_LEASES_PER_CONN held, EBUSY until one is released; all go
 * with the connection. */
static void test_rdma_leases_are_bounded(void **state)
{
    (void)state;
    daemon_t d;
    kvf_client *c;
    raw r;
    uint64_t len;
    uint8_t *obj = node_with_object(&d, &c, &r, 3, 1, &len);
    free(obj);
    (void)shm_map(&r, 0, 1);
    uint8_t get[32], *rep;
    size_t rlen;
    kvf__put_u64(get, NS);
    kvf__put_u32(get + 8, 60000);
    kvf__put_u32(get + 12, 0);
    kvf_key k = key_of(3);
    kvf__wire_key_put(get + 16, &k);
    uint64_t first = 0;
    int refused = 0, held = 0;
    char err[300];
    for (int i = 0; i < 4200 && !refused; i++) {
        int rc = kvf__sync_call(r.fd, ++r.id, KVF_OP_RDMA_GET, 1, get, sizeof get, &rep, &rlen,
                                NULL, NULL, kvf__now_ns() + 5000000000ull, err, sizeof err);
        if (rc == KVF_EBUSY) {
            print_message("RDMA_GET %d: %s\n", i, err);
            refused = 1;
            break;
        }
        assert_int_equal(rc, 0);
        assert_int_equal((int32_t)kvf__get_u32(rep + 16), 0);
        first = first ? first : kvf__get_u64(rep);
        held++;
        free(rep);
    }
    assert_true(refused);
    assert_int_equal(held, 4096);
    assert_int_equal(stat_settles(c, "leases_open", 4096), 4096);
    /* one released: one more may be taken */
    uint8_t rel[16];
    kvf__put_u64(rel, NS);
    kvf__put_u64(rel + 8, first);
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_RDMA_RELEASE, 0, rel, sizeof rel,
                                         &rep, &rlen, NULL, NULL),
                     0);
    assert_int_equal(kvf__get_u64(rep), 1);
    free(rep);
    assert_int_equal(kvf__sync_call_test(r.fd, ++r.id, KVF_OP_RDMA_GET, 1, get, sizeof get, &rep,
                                         &rlen, NULL, NULL),
                     0);
    free(rep);
    close(r.fd);
    assert_int_equal(stat_settles(c, "leases_open", 0), 0);
    assert_int_equal(stat_settles(c, "referenced", 0), 0);
    kvf_client_close(&c);
    daemon_stop(&d);
}

static long rss_kib(pid_t pid)
{
    char p[64], line[256];
    snprintf(p, sizeof p, "/proc/%d/status", (int)pid);
    FILE *f = fopen(p, "r");
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            v = atol(line + 6);
    if (f)
        fclose(f);
    return v;
}

/* Puts key i's object of `layers` zero segments of seg bytes each (many layers, tiny: a large
 * header) through c. */
static void put_many_layers(kvf_client *c, uint64_t i, uint32_t layers, size_t seg)
{
    uint8_t *segs = calloc(layers, seg);
    const void **sp = malloc(layers * sizeof *sp);
    for (uint32_t l = 0; l < layers; l++)
        sp[l] = segs + (size_t)l * seg;
    size_t cap = kvf_obj_raw_size(layers, seg), olen;
    uint8_t *obj = malloc(cap);
    kvf_key k = key_of(i);
    assert_int_equal(
        kvf_obj_encode(&k, 9, 16, layers, sp, seg, KVF_CODEC_NONE, obj, cap, &olen, NULL), 0);
    put_one(c, i, obj, olen);
    free(obj), free(sp), free(segs);
}

/* Replies copied to the heap are bounded per connection: a client that pipelines RDMA_GETs of an
 * object with 1,024 layers (a reply of about 16 MiB each: descriptors and headers) and never
 * reads a reply is no longer read once 64 MiB of its replies wait, and each reply stops at 16 MiB
 * (E2BIG for the keys past it). The node answers others all along. */
static void test_rdma_get_replies_are_bounded(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "64M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    enum { MANY = 1024, TINY = 64 };
    put_many_layers(c, 5, MANY, TINY);
    kvf_key k = key_of(5);
    raw r = raw_open(&d);
    (void)shm_map(&r, 0, 1);
    uint32_t hl = kvf_obj_header_len(MANY), n = 800;
    uint32_t fit = (uint32_t)(((16ull << 20) - 16 - 24ull * n) / hl);
    size_t plen = 16 + 16 * (size_t)n;
    uint8_t *get = malloc(plen), *rep;
    size_t rlen;
    kvf__put_u64(get, NS);
    kvf__put_u32(get + 8, 60000);
    kvf__put_u32(get + 12, 0);
    for (uint32_t j = 0; j < n; j++)
        kvf__wire_key_put(get + 16 + 16 * (size_t)j, &k);
    assert_int_equal(
        kvf__sync_call_test(r.fd, ++r.id, KVF_OP_RDMA_GET, n, get, plen, &rep, &rlen, NULL, NULL),
        0);
    for (uint32_t j = 0; j < n; j++)
        assert_int_equal((int32_t)kvf__get_u32(rep + 16 + 24 * (size_t)j), j < fit ? 0 : KVF_E2BIG);
    free(rep);
    long before = rss_kib(d.pid);
    char err[300];
    int sent = 0;
    for (int i = 0; i < 60; i++, sent++)
        if (kvf__sync_send(r.fd, ++r.id, KVF_OP_RDMA_GET, n, get, plen,
                           kvf__now_ns() + 300000000ull, err, sizeof err) != 0)
            break;
    usleep(500000);
    /* the node still answers another client at once, and holds one connection's share: 64 MiB
     * and the reply that passed it (the node's own figure: RSS moves with the build, a
     * sanitizer's shadow memory included) */
    long long heap = stat_now(c, "reply_heap_bytes");
    long after = rss_kib(d.pid);
    print_message("%d requests sent unread; replies queued on the heap %lld bytes; node RSS %ld "
                  "-> %ld KiB\n",
                  sent, heap, before, after);
    assert_true(sent >= 8);
    assert_true(heap > 0 && heap <= (64ll << 20) + 2 * (17ll << 20));
    close(r.fd);
    free(get);
    assert_int_equal(stat_settles(c, "leases_open", 0), 0);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* A streamed GET's frames point into every hit once per layer: naming an object of 4,096 layers
 * over and over, a request of a few KiB had the node build a gigabyte of scatter lists. Past 32
 * MiB of them the hits are E2BIG (here 511 of 2,000: the first frame's table says so), and the
 * node answers others at once. (The client library asks in smaller requests: a raw one here.) */
static void test_stream_get_is_bounded(void **state)
{
    (void)state;
    daemon_t d;
    daemon_start(&d, "16M", "--threads 1");
    kvf_client *c = client_open_opts(&d, (kvf_client_opts){0});
    enum { MANY = 4096, N = 2000 };
    put_many_layers(c, 11, MANY, 1);
    kvf_key k = key_of(11);
    raw r = raw_open(&d);
    size_t plen = 8 + 16 * (size_t)N;
    uint8_t *req = malloc(KVF_WIRE_HEADER_LEN + plen);
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = KVF_OP_GET,
                      .flags = KVF_WF_STREAM,
                      .request_id = ++r.id,
                      .item_count = N,
                      .payload_len = plen};
    kvf__wire_hdr_encode(req, &h);
    kvf__put_u64(req + KVF_WIRE_HEADER_LEN, NS);
    for (int i = 0; i < N; i++)
        kvf__wire_key_put(req + KVF_WIRE_HEADER_LEN + 8 + 16 * (size_t)i, &k);
    uint64_t dl = kvf__now_ns() + 20000000000ull;
    assert_int_equal(kvf__sock_write_all(r.fd, req, KVF_WIRE_HEADER_LEN + plen, dl), 0);
    free(req);
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    assert_int_equal(kvf__sock_read_all(r.fd, hdr, sizeof hdr, NULL, NULL, dl), 0);
    assert_int_equal(kvf__get_u32(hdr + 24), N); /* the table's rows */
    uint8_t *table = malloc(16 * (size_t)N);
    assert_int_equal(kvf__sock_read_all(r.fd, table, 16 * (size_t)N, NULL, NULL, dl), 0);
    int fit = (int)((32ull << 20) / ((MANY + 1) * 16ull)), hits = 0;
    for (int i = 0; i < N; i++) {
        int st = (int32_t)kvf__get_u32(table + 16 * (size_t)i);
        assert_int_equal(st, i < fit ? 0 : KVF_E2BIG);
        hits += st == 0;
    }
    free(table);
    print_message("%d of %d hits, the rest E2BIG\n", hits, N);
    close(r.fd);
    assert_true(stat_now(c, "connections") >= 1);
    kvf_client_close(&c);
    daemon_stop(&d);
}

int main(void)
{
    harness_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_shm_get_moves_at_most_its_region, teardown_daemons),
        cmocka_unit_test_teardown(test_shm_staging_pages_go_with_the_connection, teardown_daemons),
        cmocka_unit_test_teardown(test_rdma_leases_are_bounded, teardown_daemons),
        cmocka_unit_test_teardown(test_rdma_get_replies_are_bounded, teardown_daemons),
        cmocka_unit_test_teardown(test_stream_get_is_bounded, teardown_daemons),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
