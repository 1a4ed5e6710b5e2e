/*
 * Integration tests of kvf-store's authentication (docs/security.md): real daemons on loopback
 * with a tenants file, clients with credentials made the way `kvf auth new` makes them. They pin
 * findings 9 and 10 of the hardening work: before it, any client could read, evict, overwrite or
 * clear any tenant's chunks, read every counter and COPY anywhere; a tenant could fill the arena
 * and evict everyone else.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kvf/events.h"
#include "kvf/kvf.h"
#include "kvf/object.h"

#include "harness.h"

#include "auth.h"
#include "bytes.h"
#include "kvevents.h"
#include "pubsub.h"
#include "tcp.h"
#include "wire.h"

#define LAYERS 2
#define SEG    8192

static const uint64_t NS = 0x7e57a7e57a7e57a7ull;

static char dir[256];

/* The test's tenants file and credentials, in a fresh directory: alice and bob are tenants (alice
 * with a byte quota of about 12 objects), carol may hold 2 reservations at once, ops is the admin;
 * forged.cred names alice but holds bob's secret key; stranger.cred is in no tenants file. */
static void make_tenants(void)
{
    snprintf(dir, sizeof dir, "/tmp/kvf-auth-test.%d", (int)getpid());
    mkdir(dir, 0700);
    const struct {
        const char *name;
        int role;
        uint64_t bytes;
        uint32_t resv;
    } ts[] = {{"alice", KVF_ROLE_TENANT, 12 * (LAYERS * SEG + 256), 0},
              {"bob", KVF_ROLE_TENANT, 0, 0},
              {"carol", KVF_ROLE_TENANT, 0, 2},
              {"ops", KVF_ROLE_ADMIN, 0, 0}};
    char path[320], line[512], err[300];
    snprintf(path, sizeof path, "%s/tenants", dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    kvf_credential bob;
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        kvf_credential c;
        kvf_tenant_key k = {
            .role = ts[i].role, .max_bytes = ts[i].bytes, .max_reserved = ts[i].resv};
        snprintf(k.name, sizeof k.name, "%s", ts[i].name);
        assert_int_equal(kvf__cred_new(&c, ts[i].name, k.pk), 0);
        kvf__tenant_key_format(&k, line, sizeof line);
        fputs(line, f);
        char cp[320];
        snprintf(cp, sizeof cp, "%s/%s.cred", dir, ts[i].name);
        unlink(cp);
        assert_int_equal(kvf__cred_write(cp, &c, err, sizeof err), 0);
        if (!strcmp(ts[i].name, "bob"))
            bob = c;
    }
    fclose(f);
    chmod(path, 0600);
    /* stranger.cred: a key no tenants file knows. */
    kvf_credential stranger;
    uint8_t spk[KVF_AUTH_PK_LEN];
    snprintf(path, sizeof path, "%s/stranger.cred", dir);
    unlink(path);
    assert_int_equal(kvf__cred_new(&stranger, "stranger", spk), 0);
    assert_int_equal(kvf__cred_write(path, &stranger, err, sizeof err), 0);
    snprintf(bob.tenant, sizeof bob.tenant, "alice");
    snprintf(path, sizeof path, "%s/forged.cred", dir);
    unlink(path);
    assert_int_equal(kvf__cred_write(path, &bob, err, sizeof err), 0);
}

static void cleanup_tenants(void)
{
    const char *files[] = {"tenants",  "alice.cred",  "bob.cred",     "carol.cred",
                           "ops.cred", "forged.cred", "stranger.cred"};
    char p[320];
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        unlink(p);
    }
    rmdir(dir);
}

static void start_auth_store(daemon_t *d, const char *memory)
{
    char extra[512];
    snprintf(extra, sizeof extra, "--auth %s/tenants", dir);
    daemon_start(d, memory, extra);
}

/* A client of d as who ("alice", ... ; NULL: no credential). */
static kvf_client *client_over(const daemon_t *d, const char *who, const char *transport)
{
    char cred[320] = "";
    if (who)
        snprintf(cred, sizeof cred, "%s/%s.cred", dir, who);
    const char *nodes[1] = {d->addr};
    kvf_client_opts o = {.nodes = nodes,
                         .n_nodes = 1,
                         .ns = NS,
                         .conns_per_node = 2,
                         .deadline_ms = 5000,
                         .credential = cred,
                         .transport = transport};
    kvf_client *c = NULL;
    char err[300];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client open: %s", err);
    return c;
}

static kvf_client *client_as(const daemon_t *d, const char *who)
{
    return client_over(d, who, NULL);
}

static kvf_key key_of(uint64_t i)
{
    return (kvf_key){.lo = i * 0x9E3779B97F4A7C15ull + 777, .hi = i ^ 0x5a5a};
}

/* The object of key i written by `tag`: every byte of its segments says who wrote it. */
static uint8_t *make_obj(uint64_t i, uint8_t tag, uint64_t *len)
{
    static uint8_t seg[LAYERS][SEG];
    const void *segs[LAYERS];
    for (int l = 0; l < LAYERS; l++) {
        memset(seg[l], tag, SEG);
        kvf__put_u64(seg[l], i);
        segs[l] = seg[l];
    }
    size_t cap = kvf_obj_raw_size(LAYERS, SEG), out;
    uint8_t *obj = malloc(cap);
    kvf_key k = key_of(i);
    assert_int_equal(
        kvf_obj_encode(&k, 7, 64, LAYERS, segs, SEG, KVF_CODEC_NONE, obj, cap, &out, NULL), 0);
    *len = out;
    return obj;
}

/* Puts keys [from, from + n) written by tag; st gets each key's status. */
static void put_range(kvf_client *c, uint64_t from, size_t n, uint8_t tag, int *st)
{
    kvf_key keys[64];
    uint8_t *objs[64];
    uint64_t lens[64];
    assert_true(n <= 64);
    for (size_t i = 0; i < n; i++) {
        keys[i] = key_of(from + i);
        objs[i] = make_obj(from + i, tag, &lens[i]);
    }
    kvf_batch b = {
        .n = n, .keys = keys, .objs = (const void *const *)objs, .lens = lens, .status = st};
    assert_int_equal(kvf_client_put(c, &b), 0);
    for (size_t i = 0; i < n; i++)
        free(objs[i]);
}

/* Gets keys [from, from + n): each key's status in st, and for hits the writer's tag in tags. */
static void get_range(kvf_client *c, uint64_t from, size_t n, int *st, uint8_t *tags)
{
    kvf_key keys[64];
    void *bufs[64];
    uint64_t caps[64], lens[64];
    size_t cap = kvf_obj_raw_size(LAYERS, SEG);
    for (size_t i = 0; i < n; i++) {
        keys[i] = key_of(from + i);
        bufs[i] = malloc(cap);
        caps[i] = cap;
    }
    kvf_batch b = {
        .n = n, .keys = keys, .bufs = bufs, .caps = caps, .out_lens = lens, .status = st};
    assert_int_equal(kvf_client_get(c, &b), 0);
    for (size_t i = 0; i < n; i++) {
        tags[i] = 0;
        if (st[i] == 0) {
            kvf_obj_info info;
            assert_int_equal(kvf_obj_verify(bufs[i], lens[i], &info), 0);
            const uint8_t *seg0 = (const uint8_t *)bufs[i] + info.header_len;
            assert_int_equal(kvf__get_u64(seg0), from + i);
            tags[i] = seg0[100];
        }
        free(bufs[i]);
    }
}

/* The value of "name": in a STATS JSON object (-1: absent). */
static long long stat_of(const char *json, const char *name)
{
    char pat[80];
    snprintf(pat, sizeof pat, "\"%s\":", name);
    const char *p = strstr(json, pat);
    return p ? strtoll(p + strlen(pat), NULL, 10) : -1;
}

/* Reads one reply of fd into h and its whole payload into p (cap bytes). Returns its status. */
static int raw_reply(int fd, kvf_wire_hdr *h, uint8_t *p, size_t cap)
{
    size_t got = 0;
    int status = harness_raw_reply(fd, h, p, cap, &got);
    assert_int_equal(got, h->payload_len);
    return status;
}

/* A blocking connection to d whose reads wait 5 s at most. */
static int raw_open(const daemon_t *d)
{
    return harness_raw_connect(d->port);
}

/* HELLO on fd: the reply's payload into rep (256 bytes), of want bytes (with the challenge or
 * without). */
static void raw_hello_len(int fd, uint8_t *rep, uint64_t want)
{
    uint8_t req[KVF_WIRE_HEADER_LEN + 24] = {0};
    kvf_wire_hdr h = {.opcode = KVF_OP_HELLO, .request_id = 1, .payload_len = 24}, rh;
    kvf__wire_hdr_encode(req, &h);
    kvf__put_u32(req + 40, 1);
    kvf__put_u32(req + 44, 1);
    assert_int_equal(send(fd, req, sizeof req, MSG_NOSIGNAL), (ssize_t)sizeof req);
    assert_int_equal(raw_reply(fd, &rh, rep, 256), 0);
    assert_int_equal(rh.payload_len, want);
}

static void raw_hello(int fd, uint8_t *rep)
{
    raw_hello_len(fd, rep, KVF_HELLO_REPLY_AUTH_LEN);
}

/* AUTH on fd as who's credential, signing hello_rep's challenge; name_len (0: the name's own) is
 * what the frame claims. Returns the reply's status and flags. */
static int raw_auth(int fd, const char *who, const uint8_t *hello_rep, uint32_t name_len,
                    uint32_t *flags)
{
    kvf_credential c;
    char path[320], err[300];
    snprintf(path, sizeof path, "%s/%s.cred", dir, who);
    assert_int_equal(kvf__cred_load(path, &c, err, sizeof err), 0);
    uint8_t req[KVF_WIRE_HEADER_LEN + KVF_AUTH_REQ_LEN] = {0}, rep[256];
    kvf_wire_hdr h = {.opcode = KVF_OP_AUTH, .request_id = 2, .payload_len = KVF_AUTH_REQ_LEN}, rh;
    kvf__wire_hdr_encode(req, &h);
    kvf__put_u32(req + 40, name_len ? name_len : (uint32_t)strlen(c.tenant));
    memcpy(req + 48, c.tenant, strlen(c.tenant));
    assert_int_equal(kvf__auth_sign(&c, hello_rep + KVF_HELLO_REPLY_LEN,
                                    kvf__get_u64(hello_rep + 32), req + 48 + 64),
                     0);
    assert_int_equal(send(fd, req, sizeof req, MSG_NOSIGNAL), (ssize_t)sizeof req);
    int st = raw_reply(fd, &rh, rep, sizeof rep);
    if (flags)
        *flags = rh.flags;
    return st;
}

/* On a raw connection: HELLO, AUTH as who, then CLEAR with the every-namespace flag. Returns
 * CLEAR's status. */
static int raw_clear_all(const daemon_t *d, const char *who)
{
    int fd = raw_open(d);
    uint8_t req[KVF_WIRE_HEADER_LEN + 8] = {0}, rep[256];
    kvf_wire_hdr h, rh;
    raw_hello(fd, rep);
    assert_int_equal(raw_auth(fd, who, rep, 0, NULL), 0);
    h = (kvf_wire_hdr){
        .opcode = KVF_OP_CLEAR, .flags = KVF_WF_ALL_NS, .request_id = 3, .payload_len = 8};
    kvf__wire_hdr_encode(req, &h);
    assert_int_equal(send(fd, req, KVF_WIRE_HEADER_LEN + 8, MSG_NOSIGNAL), 48);
    int status = raw_reply(fd, &rh, rep, sizeof rep);
    close(fd);
    return status;
}

/* ------------------------------------------------------------------------------------------ */

/* Finding 10: an unauthenticated client can do nothing but HELLO. HELLO's reply carries the
 * challenge; any other request closes the connection with KVF_EACCES; the client library without
 * a credential gets KVF_EACCES for every key. A node with --auth may listen beyond loopback. */
static void test_auth_unauthenticated_gets_only_hello(void **state)
{
    (void)state;
    /* With --auth, a non-loopback address passes the listen policy: this one stops at the
     * missing tenants file instead. */
    char out[2048];
    char *const argv[] = {(char *)harness_store_bin(), "--listen", "0.0.0.0:0", "--auth",
                          "/nonexistent/tenants",      NULL};
    assert_int_equal(harness_run(argv, out, sizeof out), 1);
    assert_non_null(strstr(out, "/nonexistent/tenants"));
    assert_null(strstr(out, "refusing"));

    daemon_t d;
    start_auth_store(&d, "64M");

    int fd = raw_open(&d);
    uint8_t req[KVF_WIRE_HEADER_LEN + 24] = {0};
    kvf_wire_hdr h = {.opcode = KVF_OP_HELLO, .request_id = 1, .payload_len = 24};
    kvf__wire_hdr_encode(req, &h);
    kvf__put_u32(req + 40, 1);
    kvf__put_u32(req + 44, 1);
    kvf__put_u64(req + 48, NS);
    /* HELLO, then a GET pipelined behind it without AUTH. */
    uint8_t get[KVF_WIRE_HEADER_LEN + 24] = {0};
    kvf_wire_hdr gh = {.opcode = KVF_OP_GET, .request_id = 2, .item_count = 1, .payload_len = 24};
    kvf__wire_hdr_encode(get, &gh);
    kvf__put_u64(get + 40, NS);
    assert_int_equal(send(fd, req, sizeof req, MSG_NOSIGNAL), (ssize_t)sizeof req);
    assert_int_equal(send(fd, get, sizeof get, MSG_NOSIGNAL), (ssize_t)sizeof get);
    uint8_t rep[KVF_WIRE_HEADER_LEN + 512];
    size_t got = 0;
    for (int i = 0; i < 100; i++) { /* until the peer closes, 5 s per read at most */
        ssize_t r = recv(fd, rep + got, sizeof rep - got, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    kvf_wire_limits lim = {.max_request = 1 << 20, .expect_reply = 1};
    kvf_wire_hdr r1, r2;
    assert_true(got >= 2 * KVF_WIRE_HEADER_LEN + KVF_HELLO_REPLY_AUTH_LEN);
    assert_int_equal(kvf__wire_hdr_decode(rep, &lim, &r1, NULL, 0), 0);
    assert_int_equal(r1.status, 0);
    assert_int_equal(r1.payload_len, KVF_HELLO_REPLY_AUTH_LEN);
    assert_true(kvf__get_u64(rep + KVF_WIRE_HEADER_LEN + 8) & KVF_CAP_AUTH);
    const uint8_t *second = rep + KVF_WIRE_HEADER_LEN + r1.payload_len;
    assert_int_equal(kvf__wire_hdr_decode(second, &lim, &r2, NULL, 0), 0);
    assert_int_equal(r2.status, KVF_EACCES);
    assert_true(r2.flags & KVF_WF_FATAL);

    kvf_client *c = client_as(&d, NULL);
    int st[4];
    put_range(c, 0, 4, 0xaa, st);
    for (int i = 0; i < 4; i++)
        assert_int_equal(st[i], KVF_EACCES);
    uint64_t removed = 0;
    assert_int_equal(kvf_client_clear(c, &removed, 2000), KVF_EACCES);
    kvf_client_close(&c);
    daemon_stop(&d);
}

/* Finding 9: bob computes alice's keys and namespace (the same tokens), evicts them and puts
 * forged objects with valid checksums under them. His requests only ever reach his own
 * namespace: alice still reads her own bytes. A credential that names alice with bob's key is
 * refused. */
static void test_auth_tenants_are_isolated(void **state)
{
    (void)state;
    daemon_t d;
    start_auth_store(&d, "64M");
    kvf_client *alice = client_as(&d, "alice"), *bob = client_as(&d, "bob");
    /* Tenants on the store's host use shared memory, staged: never the arena itself, nor a
     * leased view of it (a regression: a tenant's open asked for the arena, was refused, and fell
     * back to TCP altogether). */
    char why[400];
    assert_string_equal(kvf_client_transport(alice, why, sizeof why), "shm");
    assert_non_null(strstr(why, "0 with the arena mapped read-only, 1 staged"));
    const void *view;
    size_t vlen;
    assert_int_equal(kvf_client_shm_view(alice, 0, &view, &vlen), KVF_ENOTSUP);
    int st[8];
    uint8_t tags[8];
    put_range(alice, 0, 8, 0xa1, st);
    for (int i = 0; i < 8; i++)
        assert_int_equal(st[i], 0);

    kvf_key keys[8];
    uint8_t present[8];
    size_t hits = 99;
    for (int i = 0; i < 8; i++)
        keys[i] = key_of((uint64_t)i);
    assert_int_equal(kvf_client_exists(bob, 8, keys, present, 2000), 0);
    for (int i = 0; i < 8; i++)
        assert_int_equal(present[i], 0);
    assert_int_equal(kvf_client_lookup_prefix(bob, 8, keys, &hits, 2000), 0);
    assert_int_equal(hits, 0);
    assert_int_equal(kvf_client_evict(bob, 8, keys, st, 2000), 0);
    for (int i = 0; i < 8; i++)
        assert_int_equal(st[i], KVF_ENOENT);
    put_range(bob, 0, 8, 0xb0, st); /* stored, in bob's own namespace */
    for (int i = 0; i < 8; i++)
        assert_int_equal(st[i], 0);
    get_range(bob, 0, 8, st, tags);
    for (int i = 0; i < 8; i++)
        assert_int_equal(tags[i], 0xb0);
    get_range(alice, 0, 8, st, tags);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(st[i], 0);
        assert_int_equal(tags[i], 0xa1);
    }

    kvf_client *forged = client_as(&d, "forged");
    get_range(forged, 0, 8, st, tags);
    for (int i = 0; i < 8; i++)
        assert_int_equal(st[i], KVF_EACCES);
    kvf_client_close(&forged);

    kvf_client *ops = client_as(&d, "ops");
    char *json = NULL;
    assert_int_equal(kvf_client_stats(ops, 0, &json, 2000), 0);
    assert_true(stat_of(json, "failed") >= 1);
    assert_true(stat_of(json, "ok") >= 3);
    free(json);
    kvf_client_close(&ops);
    kvf_client_close(&alice);
    kvf_client_close(&bob);
    daemon_stop(&d);
}

/* The AUTH exchange's rules: AUTH before HELLO, a signature over another connection's challenge
 * (a replay), a name length that does not match, and a second AUTH are each refused and close the
 * connection; a connection that does not authenticate in time is closed; a tenants file that does
 * not parse stops the node at start with its line named, and at SIGHUP leaves the old keys in
 * place; a malformed or world-readable credential fails the client's open. */
static void test_auth_protocol_rules(void **state)
{
    (void)state;
    daemon_t d;
    start_auth_store(&d, "64M");
    uint8_t rep[256], rep2[256];
    uint32_t flags = 0;

    int fd = raw_open(&d); /* AUTH with no challenge yet */
    memset(rep, 0, sizeof rep);
    kvf__put_u64(rep + 32, 1);
    assert_int_equal(raw_auth(fd, "alice", rep, 0, &flags), KVF_EPROTO);
    assert_true(flags & KVF_WF_FATAL);
    close(fd);

    int a = raw_open(&d), b = raw_open(&d); /* b replays a signature over a's challenge */
    raw_hello(a, rep);
    raw_hello(b, rep2);
    assert_int_equal(raw_auth(b, "alice", rep, 0, &flags), KVF_EACCES);
    assert_true(flags & KVF_WF_FATAL);
    close(b);
    assert_int_equal(raw_auth(a, "alice", rep, 0, NULL), 0); /* where it belongs, it works */
    raw_hello_len(a, rep2, KVF_HELLO_REPLY_LEN); /* a HELLO after AUTH: no new challenge */
    assert_int_equal(raw_auth(a, "alice", rep, 0, &flags), KVF_EPROTO); /* nor a second AUTH */
    close(a);

    for (uint32_t bad_len = 1; bad_len <= 64; bad_len += 63) { /* "a" of "alice", and 64 */
        fd = raw_open(&d);
        raw_hello(fd, rep);
        assert_int_equal(raw_auth(fd, "alice", rep, bad_len, &flags), KVF_EACCES);
        close(fd);
    }

    /* A connection that never authenticates is closed at the node's deadline (300 ms here),
     * whether it sent nothing or a HELLO. */
    daemon_t quick;
    char extra[400];
    snprintf(extra, sizeof extra, "--auth %s/tenants --auth-timeout 300", dir);
    daemon_start(&quick, "16M", extra);
    int idle = raw_open(&quick), hello_only = raw_open(&quick);
    raw_hello(hello_only, rep);
    char byte;
    double t0 = (double)time(NULL);
    assert_int_equal(recv(idle, &byte, 1, 0), 0);
    assert_int_equal(recv(hello_only, &byte, 1, 0), 0);
    assert_true((double)time(NULL) - t0 <= 3);
    close(idle);
    close(hello_only);
    daemon_stop(&quick);

    /* SIGHUP with a tenants file that does not parse: the old keys stay. */
    char path[320], keep[340], out[2048];
    snprintf(path, sizeof path, "%s/tenants", dir);
    snprintf(keep, sizeof keep, "%s.keep", path);
    assert_int_equal(rename(path, keep), 0);
    FILE *f = fopen(path, "w");
    fputs("alice tenant not-a-key\n", f);
    fclose(f);
    kill(d.pid, SIGHUP);
    usleep(300000);
    kvf_client *alice = client_as(&d, "alice");
    int st[2];
    put_range(alice, 0, 2, 0xa1, st);
    assert_int_equal(st[0], 0);
    kvf_client_close(&alice);
    char *const argv[] = {(char *)harness_store_bin(), "--auth", path, NULL};
    assert_int_equal(harness_run(argv, out, sizeof out), 1); /* at start: refused, line named */
    assert_non_null(strstr(out, ":1:"));
    assert_int_equal(rename(keep, path), 0);

    /* A credential that does not parse, and one readable by others. */
    char cred[320];
    snprintf(cred, sizeof cred, "%s/broken.cred", dir);
    f = fopen(cred, "w");
    fputs("tenant=alice\nsecret=00\n", f);
    fclose(f);
    chmod(cred, 0600);
    const char *nodes[1] = {d.addr};
    kvf_client_opts o = {.nodes = nodes, .n_nodes = 1, .ns = NS, .credential = cred};
    kvf_client *c = NULL;
    char err[300];
    assert_int_equal(kvf_client_open(&c, &o, err, sizeof err), KVF_EINVAL);
    snprintf(cred, sizeof cred, "%s/alice.cred", dir);
    chmod(cred, 0644);
    assert_int_equal(kvf_client_open(&c, &o, err, sizeof err), KVF_EACCES);
    assert_non_null(strstr(err, "chmod 600"));
    chmod(cred, 0600);
    snprintf(cred, sizeof cred, "%s/broken.cred", dir);
    unlink(cred);
    daemon_stop(&d);
}

/* Finding 10: CLEAR of every namespace, COPY and the node's counters are the admin's. A tenant's
 * STATS shows its own use only. */
static void test_auth_admin_role(void **state)
{
    (void)state;
    daemon_t d;
    start_auth_store(&d, "64M");
    kvf_client *bob = client_as(&d, "bob"), *ops = client_as(&d, "ops");
    int st[4];
    put_range(bob, 0, 4, 0xb0, st);

    /* CLEAR of every namespace (a flag no client call sends) over a raw connection. */
    assert_int_equal(raw_clear_all(&d, "bob"), KVF_EACCES);
    assert_int_equal(raw_clear_all(&d, "ops"), 0);
    put_range(bob, 0, 4, 0xb0, st);

    kvf_key k = key_of(0);
    int cst = 0;
    assert_int_equal(kvf_client_copy(bob, 0, "127.0.0.1:1", 1, &k, &cst, 2000), 0);
    assert_int_equal(cst, KVF_EACCES);

    char *json = NULL;
    assert_int_equal(kvf_client_stats(bob, 0, &json, 2000), 0);
    assert_non_null(strstr(json, "\"tenant\":\"bob\""));
    assert_int_equal(stat_of(json, "entries"), 4);
    assert_int_equal(stat_of(json, "hits"), -1); /* nothing of the node's */
    free(json);
    assert_int_equal(kvf_client_stats(ops, 0, &json, 2000), 0);
    assert_true(stat_of(json, "hits") >= 0);
    assert_non_null(strstr(json, "\"required\":true"));
    free(json);

    uint64_t removed = 0;
    assert_int_equal(kvf_client_clear(bob, &removed, 2000), 0);
    assert_int_equal(removed, 4);
    kvf_client_close(&bob);
    kvf_client_close(&ops);
    daemon_stop(&d);
}

/* Per-tenant quotas: alice, over her byte quota, evicts only her own oldest entries, never bob's,
 * though the arena has room; carol may hold 2 reservations at once, the third is KVF_EQUOTA. */
static void test_auth_quotas_bound_each_tenant(void **state)
{
    (void)state;
    daemon_t d;
    start_auth_store(&d, "64M");
    kvf_client *alice = client_as(&d, "alice"), *bob = client_as(&d, "bob"),
               /* Over TCP: an ADMIT holds its reservations until their COMMIT (shared memory
                * holds one at a time, for the length of a copy). */
                                                    *carol = client_over(&d, "carol", "tcp");
    int st[40];
    uint8_t tags[40];
    put_range(bob, 1000, 10, 0xb0, st);
    for (int b = 0; b < 4; b++) {
        put_range(alice, (uint64_t)b * 10, 10, 0xa1, st);
        for (int i = 0; i < 10; i++)
            assert_int_equal(st[i], 0);
    }
    get_range(bob, 1000, 10, st, tags);
    for (int i = 0; i < 10; i++)
        assert_int_equal(st[i], 0);
    get_range(alice, 0, 40, st, tags);
    int alive = 0;
    for (int i = 0; i < 40; i++)
        alive += st[i] == 0;
    assert_true(alive >= 10 && alive <= 12);
    for (int i = 30; i < 40; i++) /* the newest stay */
        assert_int_equal(st[i], 0);
    char *json = NULL;
    assert_int_equal(kvf_client_stats(alice, 0, &json, 2000), 0);
    assert_true(stat_of(json, "bytes") <= stat_of(json, "quota_bytes"));
    assert_true(stat_of(json, "quota_evictions") >= 28);
    free(json);

    put_range(carol, 2000, 3, 0xc0, st);
    int ok = 0, quota = 0;
    for (int i = 0; i < 3; i++) {
        ok += st[i] == 0;
        quota += st[i] == KVF_EQUOTA;
    }
    assert_int_equal(ok, 2);
    assert_int_equal(quota, 1);
    kvf_client_close(&alice);
    kvf_client_close(&bob);
    kvf_client_close(&carol);
    daemon_stop(&d);
}

/* A tenant's promotions from the disk tier keep within her reservations: carol may hold 2 at once,
 * and a GET of 64 objects that only the disk holds must bring every one back (a promotion that
 * reserved its whole batch first got KVF_EQUOTA for all but 2 of them). */
static void test_auth_disk_promotions_keep_the_reservation_quota(void **state)
{
    (void)state;
    daemon_t d;
    char extra[700];
    snprintf(extra, sizeof extra, "--auth %s/tenants --disk %s/disk.dat:96M", dir, dir);
    daemon_start(&d, "8M", extra);
    kvf_client *carol = client_over(&d, "carol", "auto");
    int st[64];
    enum { N = 1200 };                    /* about 20 MB of objects through an 8 MiB arena */
    for (uint64_t i = 0; i < N; i += 2) { /* two at a time: her reservations */
        put_range(carol, 5000 + i, 2, 0xc5, st);
        assert_true(st[0] == 0 && st[1] == 0);
    }
    /* the oldest, evicted and demoted: wait (bounded) for 64 that only the disk holds */
    kvf_key keys[64];
    size_t n = 0;
    for (int t = 0; t < 100 && n < 64; t++) {
        usleep(50000);
        n = 0;
        for (uint64_t i = 0; i < N && n < 64; i += 64) {
            kvf_key k[64];
            uint8_t present[64], on_disk[64];
            for (int j = 0; j < 64; j++)
                k[j] = key_of(5000 + i + (uint64_t)j);
            assert_int_equal(kvf_client_exists_tiers(carol, 64, k, present, on_disk, 2000), 0);
            for (int j = 0; j < 64 && n < 64; j++)
                if (present[j] && on_disk[j])
                    keys[n++] = k[j];
        }
    }
    if (n < 64) {
        char *json = NULL;
        kvf_client_stats(carol, 0, &json, 2000);
        print_message("stats: %s\n", json ? json : "-");
        free(json);
    }
    assert_int_equal(n, 64);
    void *bufs[64];
    uint64_t caps[64], lens[64];
    for (int i = 0; i < 64; i++) {
        caps[i] = kvf_obj_raw_size(LAYERS, SEG);
        bufs[i] = malloc(caps[i]);
    }
    kvf_batch b = {
        .n = 64, .keys = keys, .bufs = bufs, .caps = caps, .out_lens = lens, .status = st};
    assert_int_equal(kvf_client_get(carol, &b), 0);
    int hits = 0;
    for (int i = 0; i < 64; i++) {
        kvf_obj_info info;
        if (st[i] == 0) {
            assert_int_equal(kvf_obj_verify(bufs[i], lens[i], &info), 0);
            assert_true(kvf_key_eq(&info.key, &keys[i]));
            hits++;
        } else {
            print_message("key %d: %s\n", i, kvf_strerror(st[i]));
        }
        free(bufs[i]);
    }
    assert_int_equal(hits, 64);
    kvf_client_close(&carol);
    daemon_stop(&d);
}

/* A client of nodes a and b (in that order) as who, over transport. */
static kvf_client *client_two(const daemon_t *a, const daemon_t *b, const char *who,
                              const char *transport)
{
    char cred[320];
    snprintf(cred, sizeof cred, "%s/%s.cred", dir, who);
    return harness_client_two(a, b, NS, cred, transport);
}

/* A tenant's gets are staged (his client is never handed the arena) and still come from the
 * holder on his host: node B (as a store of another host: no shared memory) copies what is read
 * twice to node A (this host's). Of 24 keys of bob's whose first node is B, the 12 hot ones are
 * read from A over shared memory, the 12 cold ones miss there and come from B over TCP, every
 * object his byte for byte. */
static void test_auth_tenant_reads_hot_keys_from_the_nearest_holder(void **state)
{
    (void)state;
    daemon_t a, b;
    start_auth_store(&a, "64M");
    char extra[700];
    snprintf(extra, sizeof extra,
             "--auth %s/tenants --shm off --replicate-hits 2 --replicas 2 --peer %s "
             "--copy-credential %s/ops.cred",
             dir, a.addr, dir);
    daemon_start(&b, "64M", extra);
    kvf_client *c = client_two(&a, &b, "bob", "auto");
    kvf_client *tcp = client_two(&a, &b, "bob", "tcp");
    char why[400];
    assert_string_equal(kvf_client_transport(c, why, sizeof why), "shm");
    enum { N = 24, HOT = 12 };
    uint64_t ids[N];
    size_t n = 0;
    for (uint64_t i = 7000; n < N && i < 100000; i++) {
        kvf_key k = key_of(i);
        if (kvf_client_node_of(c, &k) == 1)
            ids[n++] = i;
    }
    assert_int_equal(n, N);
    int st[N];
    uint8_t tags[N];
    for (size_t i = 0; i < N; i++) {
        put_range(c, ids[i], 1, 0xb1, st);
        assert_int_equal(st[0], 0);
    }
    for (int round = 0; round < 2; round++)
        for (size_t i = 0; i < HOT; i++) {
            get_range(tcp, ids[i], 1, st, tags);
            assert_int_equal(st[0], 0);
        }
    /* A has the hot ones once B's replicator pushed them (5 s at most) */
    kvf_key hot[HOT];
    for (size_t i = 0; i < HOT; i++)
        hot[i] = key_of(ids[i]);
    char cred[320];
    snprintf(cred, sizeof cred, "%s/bob.cred", dir);
    assert_int_equal(harness_wait_present(&a, NS, cred, hot, HOT, 5000), HOT);
    kvf_client_counters k0, k1;
    kvf_client_counters_get(c, &k0);
    for (size_t i = 0; i < N; i++) { /* one key a get */
        get_range(c, ids[i], 1, st, tags);
        assert_int_equal(st[0], 0);
        assert_int_equal(tags[0], 0xb1);
    }
    kvf_client_counters_get(c, &k1);
    print_message("%llu keys asked of the nearer holder, %llu missed there; %llu bytes over "
                  "shared memory\n",
                  (unsigned long long)(k1.near_keys - k0.near_keys),
                  (unsigned long long)(k1.near_misses - k0.near_misses),
                  (unsigned long long)(k1.shm_bytes_received - k0.shm_bytes_received));
    assert_int_equal(k1.near_keys - k0.near_keys, N);
    assert_int_equal(k1.near_misses - k0.near_misses, N - HOT);
    assert_true(k1.shm_bytes_received - k0.shm_bytes_received >=
                HOT * (uint64_t)kvf_obj_raw_size(LAYERS, SEG) / 2);
    kvf_client_close(&tcp);
    kvf_client_close(&c);
    daemon_stop(&b);
    daemon_stop(&a);
}

/* Rotation and revocation: SIGHUP reads the tenants file again; a removed key authenticates no
 * new connection, the connections it opened are closed, and the tenants that stay are served as
 * before. */
static void test_auth_reload_revokes(void **state)
{
    (void)state;
    daemon_t d;
    start_auth_store(&d, "64M");
    kvf_client *bob = client_as(&d, "bob");
    int st[2];
    put_range(bob, 0, 2, 0xb0, st);
    assert_int_equal(st[0], 0);
    kvf_client_close(&bob);
    /* A connection bob authenticated before the revocation: the node closes it. */
    uint8_t rep[256];
    int open_fd = raw_open(&d);
    raw_hello(open_fd, rep);
    assert_int_equal(raw_auth(open_fd, "bob", rep, 0, NULL), 0);

    char path[320], tmp[340];
    snprintf(path, sizeof path, "%s/tenants", dir);
    snprintf(tmp, sizeof tmp, "%s.new", path);
    FILE *in = fopen(path, "r"), *out = fopen(tmp, "w");
    char line[512];
    while (fgets(line, sizeof line, in))
        if (strncmp(line, "bob ", 4) != 0)
            fputs(line, out);
    fclose(in);
    fclose(out);
    chmod(tmp, 0600);
    assert_int_equal(rename(tmp, path), 0);
    kill(d.pid, SIGHUP);

    int refused = 0;
    for (int tries = 0; tries < 40 && !refused; tries++) { /* 2 s at most */
        bob = client_as(&d, "bob");
        uint8_t tags[2];
        get_range(bob, 0, 2, st, tags);
        refused = st[0] == KVF_EACCES;
        kvf_client_close(&bob);
        if (!refused)
            usleep(50000);
    }
    assert_true(refused);
    char byte;
    assert_int_equal(recv(open_fd, &byte, 1, 0), 0); /* EOF within the read timeout (5 s) */
    close(open_fd);
    kvf_client *alice = client_as(&d, "alice");
    put_range(alice, 0, 2, 0xa1, st);
    assert_int_equal(st[0], 0);
    kvf_client_close(&alice);
    daemon_stop(&d);
    cleanup_tenants();
    make_tenants();
}

/* A loopback port free now (bound, read back, released). */
static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &sl), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* A subscriber of endpoint (and of its replay socket, when not NULL) as who (NULL: without
 * CURVE), of the topics that start with topic (NULL: all), knowing the publisher's key; *idx
 * gets its number. */
static kvf__zsubs *subscriber_of(const char *endpoint, const char *replay, const char *who,
                                 const uint8_t server[32], const char *topic, int *idx)
{
    kvf__zsubs *zs = NULL;
    assert_int_equal(kvf__zsubs_open(&zs), 0);
    if (who) {
        char path[320], err[300];
        snprintf(path, sizeof path, "%s/%s.cred", dir, who);
        kvf_credential c;
        uint8_t pk[32], sk[32];
        assert_int_equal(kvf__cred_load(path, &c, err, sizeof err), 0);
        assert_int_equal(kvf__auth_curve_pair(&c, pk, sk), 0);
        kvf__zsubs_curve(zs, server, pk, sk);
    }
    char err[300];
    assert_int_equal(kvf__zsubs_add_topic(zs, endpoint, replay, topic, idx, err, sizeof err), 0);
    return zs;
}

static kvf__zsubs *subscriber(const char *endpoint, const char *who, const uint8_t server[32])
{
    int idx;
    return subscriber_of(endpoint, NULL, who, server, NULL, &idx);
}

/* KV events over CURVE: a subscriber proves a key of the tenants file; a tenant receives its own
 * tenant's chunk events only, the admin every tenant's; an unknown key and a subscriber without
 * CURVE receive nothing. */
static void test_auth_events_curve_per_tenant(void **state)
{
    (void)state;
    char extra[640], ep[64], path[320], err[300];
    uint16_t port = free_port();
    snprintf(ep, sizeof ep, "tcp://127.0.0.1:%u", port);
    snprintf(extra, sizeof extra,
             "--auth %s/tenants --events 127.0.0.1:%u --events-credential %s/ops.cred", dir, port,
             dir);
    daemon_t d;
    daemon_start(&d, "64M", extra);
    kvf_credential ops;
    uint8_t server[32], sk[32];
    snprintf(path, sizeof path, "%s/ops.cred", dir);
    assert_int_equal(kvf__cred_load(path, &ops, err, sizeof err), 0);
    assert_int_equal(kvf__auth_curve_pair(&ops, server, sk), 0);

    kvf__zsubs *as_bob = subscriber(ep, "bob", server), *as_ops = subscriber(ep, "ops", server),
               *as_stranger = subscriber(ep, "stranger", server),
               *plain = subscriber(ep, NULL, NULL);
    usleep(300000); /* the handshakes and subscriptions */
    kvf_client *alice = client_as(&d, "alice"), *bob = client_as(&d, "bob");
    int st[4];
    put_range(alice, 0, 4, 0xa1, st);
    put_range(bob, 100, 4, 0xb0, st);
    kvf_client_close(&alice);
    kvf_client_close(&bob);

    int n_bob = 0, n_ops = 0, n_other = 0;
    kvf__zsubs *subs[4] = {as_bob, as_ops, as_stranger, plain};
    for (int k = 0; k < 4; k++) {
        uint8_t ready[KVF_ZSUBS_MAX];
        for (int t = 0; t < 30; t++) { /* 1.5 s at most */
            if (kvf__zsubs_poll(subs[k], 50, ready) <= 0)
                continue;
            kvf__zmsg m;
            while (kvf__zsubs_recv(subs[k], 0, &m) == 0) {
                assert_int_equal(m.frames, 3);
                if (k == 0)
                    n_bob++;
                else if (k == 1)
                    n_ops++;
                else
                    n_other++;
            }
        }
    }
    assert_true(n_bob >= 1);
    assert_true(n_ops >= 2);    /* alice's and bob's, in batches of one tenant each */
    assert_true(n_bob < n_ops); /* not alice's */
    assert_int_equal(n_other, 0);
    for (int k = 0; k < 4; k++)
        kvf__zsubs_close(&subs[k]);
    memset(&ops, 0, sizeof ops);
    daemon_stop(&d);
}

/* How many batches a replay from 1 gives `who` (NULL: without CURVE) from an engine's secured
 * events publisher, of the topics that start with topic (NULL: all), or -1 when its replay socket
 * does not answer at all (the handshake refused). Their numbers must run 1, 2, ... */
static int replay_as(const kvf_events *ev, const char *who, const uint8_t server[32],
                     const char *topic)
{
    int idx, n = -1;
    kvf__zsubs *zs = subscriber_of(kvf_events_endpoint(ev), kvf_events_replay_endpoint(ev), who,
                                   server, topic, &idx);
    int rc = KVF_EAGAIN;
    for (int t = 0; t < 50 && rc == KVF_EAGAIN; t++) {
        rc = kvf__zsubs_replay_ask(zs, idx, 1);
        if (rc == KVF_EAGAIN)
            usleep(10000);
    }
    kvf__zmsg m;
    while (rc == 0 && kvf__zsubs_replay_recv(zs, idx, 700, &m) == 0) {
        n = n < 0 ? 0 : n;
        if (m.len == 0)
            break;
        assert_int_equal(kvf__kve_seq_get(m.seq), (uint64_t)++n);
    }
    kvf__zsubs_close(&zs);
    return n;
}

/* alice's engine's secured events publisher, with a replay socket and `shards` (0: not
 * sharded); the publisher's credential's path (the admin's, ops) into cred. */
static kvf_events *alices_events(uint32_t shards, char *cred, size_t credlen)
{
    char tenants[320], mine[320], err[300];
    snprintf(cred, credlen, "%s/ops.cred", dir);
    snprintf(tenants, sizeof tenants, "%s/tenants", dir);
    snprintf(mine, sizeof mine, "%s/alice.cred", dir);
    kvf_events_opts o = {.listen = "127.0.0.1:0",
                         .credential = cred,
                         .tenants = tenants,
                         .tenant_credential = mine,
                         .replay = "127.0.0.1:0",
                         .shards = shards};
    kvf_events *ev = NULL;
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    return ev;
}

/* An engine's KV events over CURVE with a replay socket: the replay is secured as the stream is.
 * The engine's tenant and the admin get its batches back; another tenant gets none of them (the
 * end only); a key no tenants file knows, and a subscriber without CURVE, get no answer. */
static void test_auth_events_replay_per_tenant(void **state)
{
    (void)state;
    char cred[320], err[300];
    kvf_events *ev = alices_events(0, cred, sizeof cred);
    assert_string_equal(kvf_events_topic(ev), "kv-events/t/alice/");
    uint32_t toks[48];
    uint64_t h[3];
    for (int i = 0; i < 48; i++)
        toks[i] = (uint32_t)(7 * i + 1);
    assert_int_equal(kvf_events_hash_blocks(toks, 3, 16, 0, h), 0);
    for (int b = 0; b < 3; b++)
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h + b, 1, b > 0, b ? h[b - 1] : 0,
                                            toks + 16 * b, 16, "GPU"),
                         0);
    kvf_credential ops;
    uint8_t server[32], sk[32];
    assert_int_equal(kvf__cred_load(cred, &ops, err, sizeof err), 0);
    assert_int_equal(kvf__auth_curve_pair(&ops, server, sk), 0);
    assert_int_equal(replay_as(ev, "alice", server, NULL), 3);
    assert_int_equal(replay_as(ev, "ops", server, NULL), 3);
    assert_int_equal(replay_as(ev, "bob", server, NULL), 0);
    assert_true(replay_as(ev, "stranger", server, NULL) < 0);
    assert_true(replay_as(ev, NULL, NULL, NULL) < 0);
    memset(&ops, 0, sizeof ops);
    kvf_events_close(&ev);
}

/* A secured and sharded publisher (kvf_events_opts.shards 2, alice's engine): an admin asking
 * by its shard's topic prefix ("kv-events/s/K/", which the tenant's "t/alice/" follows) gets each
 * shard's batches back, numbered from 1; the tenant herself gets none of the sharded batches (her
 * subscription names her own topic), nor does another tenant. */
static void test_auth_events_replay_sharded(void **state)
{
    (void)state;
    char cred[320], err[300];
    kvf_events *ev = alices_events(2, cred, sizeof cred);
    int per[2] = {0, 0};
    for (int j = 0; j < 8; j++) {
        uint32_t toks[32];
        uint64_t h[2];
        for (int i = 0; i < 32; i++)
            toks[i] = (uint32_t)(100 * j + i + 1);
        assert_int_equal(kvf_events_hash_blocks(toks, 2, 16, 0, h), 0);
        per[kvf_events_shard_of(h[0], 2)]++;
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h, 2, 0, 0, toks, 16, "GPU"), 0);
    }
    kvf_credential ops;
    uint8_t server[32], sk[32];
    assert_int_equal(kvf__cred_load(cred, &ops, err, sizeof err), 0);
    assert_int_equal(kvf__auth_curve_pair(&ops, server, sk), 0);
    for (int k = 0; k < 2; k++) {
        char topic[64];
        snprintf(topic, sizeof topic, "%s%d/", KVF_EVENTS_SHARD_TOPIC, k);
        assert_int_equal(replay_as(ev, "ops", server, topic), per[k]);
        assert_int_equal(replay_as(ev, "alice", server, topic), 0);
    }
    assert_int_equal(replay_as(ev, "bob", server, NULL), 0);
    memset(&ops, 0, sizeof ops);
    kvf_events_close(&ev);
}

int main(void)
{
    harness_init();
    make_tenants();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_auth_unauthenticated_gets_only_hello, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_tenants_are_isolated, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_protocol_rules, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_admin_role, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_quotas_bound_each_tenant, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_tenant_reads_hot_keys_from_the_nearest_holder,
                                  teardown_daemons),
        cmocka_unit_test_teardown(test_auth_disk_promotions_keep_the_reservation_quota,
                                  teardown_daemons),
        cmocka_unit_test_teardown(test_auth_reload_revokes, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_events_curve_per_tenant, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_events_replay_per_tenant, teardown_daemons),
        cmocka_unit_test_teardown(test_auth_events_replay_sharded, teardown_daemons),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    cleanup_tenants();
    return rc;
}
