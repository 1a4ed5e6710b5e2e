/*
 * libFuzzer target for a whole storage node: three in-process servers (A, and B, A's only COPY
 * peer, and C, which authenticates tenants with byte and reservation quotas) on loopback, driven
 * through real sockets by a script the fuzzer writes. Each input is a sequence of steps on up to
 * four connections (two to A, two to C; the second of each over the node's Unix socket, where
 * shared memory is served: SHM_MAP hands out descriptors the fuzzer's reads drop, SHM_PUT and
 * SHM_GET take fuzzed staging offsets): well-formed frames of any opcode with fuzzed fields and
 * bodies (HELLO, AUTH, PUT, ADMIT/COMMIT, GET, COPY to B ...), raw bytes, a proper HELLO and AUTH
 * as one of C's tenants or its admin, reads of what was answered, half-closes and closes, in any
 * order. After the input every connection is closed and
 * the target waits until A has let go of each of them, COPYs included. A crash, a sanitizer
 * report, or a node that stops answering a HELLO on a fresh connection is a bug.
 */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvf/kvf.h"

#include "auth.h"
#include "bytes.h"
#include "cache.h"
#include "log.h"
#include "server.h"
#include "server_int.h"
#include "tcp.h"
#include "tenants.h"
#include "unixsock.h"
#include "wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CONNS     4
#define MAX_STEPS 48
#define MAX_BODY  8192

typedef struct node {
    kvf_cache *cache;
    kvf_server *srv;
    pthread_t th;
    char addr[64];
    char shm[64]; /* its Unix socket ("": none) */
} node;

static node g_a, g_b, g_c;
/* C's tenants: two tenants (the first with small quotas) and an admin, their credentials here. */
#define N_CREDS 3
static kvf_credential g_creds[N_CREDS];
static kvf__tenants *g_tenants;
/* The node's own complaints about bad frames are expected here by the million: errors only. */
static const kvf_log g_log = {.level = KVF_LOG_ERROR, .name = "fuzz_store"};

static void *run_node(void *p)
{
    kvf__server_run(((node *)p)->srv);
    return NULL;
}

static void node_start(node *n, const char *peer, kvf__tenants *tenants, const char *shm)
{
    char err[256];
    kvf_cache_opts co = {
        .memory = 8u << 20, .max_entries = 1024, .reserve_ms = 200, .shared = shm != NULL};
    if (shm)
        snprintf(n->shm, sizeof n->shm, "@kvf-fuzz-%s-%d", shm, (int)getpid());
    const char *peers[1] = {peer};
    if (kvf__cache_open(&n->cache, &co, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_store: cache: %s\n", err);
        abort();
    }
    kvf_server_opts so = {.threads = 2,
                          .max_request = 1u << 20,
                          .verify_puts = 1,
                          .rdma = "off",
                          .copy_peers = peer ? peers : NULL,
                          .n_copy_peers = peer ? 1 : 0,
                          .copy_workers = 1,
                          .copy_queue = 2,
                          .tenants = tenants,
                          .shm = shm ? n->shm : NULL,
                          .shm_staging_max = 1u << 20,
                          .shm_staging_total = 64u << 20,
                          .shm_copiers = 1,
                          .cache = n->cache,
                          .log = &g_log};
    if (kvf__server_open(&n->srv, &so, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_store: server: %s\n", err);
        abort();
    }
    if (tenants)
        kvf__tenants_apply_quotas(tenants, n->cache);
    snprintf(n->addr, sizeof n->addr, "127.0.0.1:%u", kvf__server_port(n->srv));
    if (pthread_create(&n->th, NULL, run_node, n) != 0)
        abort();
}

static void setup(void)
{
    static int done;
    if (done)
        return;
    done = 1;
    node_start(&g_b, NULL, NULL, NULL);
    node_start(&g_a, g_b.addr, NULL, "a");
    char dir[] = "/tmp/kvf-fuzz-store-XXXXXX", path[64], err[300];
    if (!mkdtemp(dir))
        abort();
    snprintf(path, sizeof path, "%s/tenants", dir);
    FILE *f = fopen(path, "w");
    const char *names[N_CREDS] = {"t1", "t2", "ad"};
    for (int i = 0; f && i < N_CREDS; i++) {
        kvf_tenant_key k = {.role = i == 2 ? KVF_ROLE_ADMIN : KVF_ROLE_TENANT,
                            .max_bytes = i == 0 ? 256u << 10 : 0,
                            .max_reserved = i == 0 ? 4 : 0};
        snprintf(k.name, sizeof k.name, "%s", names[i]);
        char line[512];
        if (kvf__cred_new(&g_creds[i], names[i], k.pk) != 0)
            abort();
        kvf__tenant_key_format(&k, line, sizeof line);
        fputs(line, f);
    }
    if (!f || fclose(f) != 0 || kvf__tenants_open(&g_tenants, path, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_store: tenants: %s\n", err);
        abort();
    }
    unlink(path);
    rmdir(dir);
    node_start(&g_c, NULL, g_tenants, "c");
}

/* The fuzzer's bytes, read in order; zeros once they run out. */
typedef struct script {
    const uint8_t *p;
    size_t n, at;
} script;

static uint8_t take8(script *s)
{
    return s->at < s->n ? s->p[s->at++] : 0;
}

static uint32_t take16(script *s)
{
    return (uint32_t)take8(s) | (uint32_t)take8(s) << 8;
}

static void take(script *s, uint8_t *out, size_t len)
{
    size_t have = s->at < s->n ? s->n - s->at : 0;
    size_t k = len < have ? len : have;
    memcpy(out, s->p + s->at, k);
    memset(out + k, 0, len - k);
    s->at += k;
}

/* Connections 0 and 1 go to A, 2 and 3 to C; 1 and 3 over the node's Unix socket. */
static int conn_fd(int *fds, int c)
{
    if (fds[c] >= 0)
        return fds[c];
    char host[64], err[128];
    uint16_t port;
    const node *n = c < 2 ? &g_a : &g_c;
    if (c % 2 == 1) {
        if (kvf__unix_connect_nb(n->shm, &fds[c], err, sizeof err) != 0)
            fds[c] = -1;
        return fds[c];
    }
    if (kvf__addr_parse(n->addr, host, sizeof host, &port) != 0 ||
        kvf__tcp_connect(host, port, 1000, &fds[c], err, sizeof err) != 0)
        fds[c] = -1;
    return fds[c];
}

/* Sends what the socket takes now: a node that stops reading (its replies unread) never blocks
 * the fuzzer. */
static void send_some(int fd, const uint8_t *b, size_t n)
{
    size_t off = 0;
    for (int tries = 0; off < n && tries < 50; tries++) {
        ssize_t w = send(fd, b + off, n - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            return;
        struct pollfd pf = {.fd = fd, .events = POLLOUT | POLLIN};
        poll(&pf, 1, 1);
        char sink[4096];
        while (recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0) /* replies out of the way */
            ;
    }
}

/* Reads what has come back within ms. */
static void drain(int fd, int ms)
{
    static char sink[65536];
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    while (poll(&pf, 1, ms) > 0 && recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0)
        ms = 0;
}

/* A frame with a valid header whose opcode, flags, item count and body come from the script. */
static void framed(script *s, int fd, uint8_t *body)
{
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = (uint16_t)(1 + take8(s) % KVF_OP_SEAL),
                      .flags = take8(s) & (KVF_WF_KNOWN & ~KVF_WF_REPLY),
                      .request_id = take16(s),
                      .item_count = take16(s) % 300};
    uint32_t len = take16(s) % MAX_BODY;
    take(s, body, len);
    switch (take8(s) % 5) { /* shapes the node's checks expect, more often than chance */
    case 0:
        if (h.opcode == KVF_OP_COPY && len >= 16) { /* to the peer, or a near miss of it */
            size_t alen = strlen(g_b.addr) - (take8(s) % 2);
            uint32_t need = 16 + (uint32_t)((alen + 7) & ~7u) + 16 * h.item_count;
            if (need <= MAX_BODY) {
                kvf__put_u32(body + 8, (uint32_t)alen);
                kvf__put_u32(body + 12, 1 + take8(s) * 4u);
                memset(body + 16, 0, (alen + 7) & ~7u);
                memcpy(body + 16, g_b.addr, alen);
                len = len > need ? len : need;
            }
        }
        break;
    case 1: /* a body as long as the item count says for 16-byte keys after a namespace */
        if (8 + 16 * (uint32_t)h.item_count <= MAX_BODY)
            len = 8 + 16 * (uint32_t)h.item_count;
        break;
    case 2: /* shared memory's shapes: SHM_MAP's 16 bytes, SHM_PUT's and SHM_GET's 32-byte items
             * whose staging offsets and lengths land inside a small region, or just outside */
        if (h.opcode == KVF_OP_SHM_MAP) {
            h.item_count = 0;
            len = 16;
            kvf__put_u64(body, (uint64_t)take16(s) << 4);
            kvf__put_u32(body + 8, take8(s) & 1);
            kvf__put_u32(body + 12, 0);
        } else if ((h.opcode == KVF_OP_SHM_PUT || h.opcode == KVF_OP_SHM_GET) &&
                   8 + 32 * (uint32_t)h.item_count <= MAX_BODY) {
            len = 8 + 32 * (uint32_t)h.item_count;
            for (uint32_t i = 0; i < h.item_count; i++) {
                kvf__put_u64(body + 8 + 32 * i + 16, (uint64_t)take16(s) << 4);
                kvf__put_u64(body + 8 + 32 * i + 24, (uint64_t)take16(s) << 2);
            }
        }
        break;
    case 3: /* WRITE's and SEAL's 32-byte rows: small offsets and lengths that sum to the data */
        if ((h.opcode == KVF_OP_WRITE || h.opcode == KVF_OP_SEAL) &&
            8 + 32 * (uint32_t)h.item_count <= MAX_BODY) {
            uint32_t at = 8 + 32 * (uint32_t)h.item_count, data = 0;
            for (uint32_t i = 0; i < h.item_count; i++) {
                uint32_t part = (take8(s) % 64u) + (h.opcode == KVF_OP_WRITE);
                if (at + data + part > MAX_BODY)
                    part = 0;
                kvf__put_u64(body + 8 + 32 * i + 16, (uint64_t)take16(s) % 4096u);
                kvf__put_u64(body + 8 + 32 * i + 24, part);
                data += part;
            }
            len = at + data;
        }
        break;
    default:
        break;
    }
    h.payload_len = len;
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    kvf__wire_hdr_encode(hdr, &h);
    send_some(fd, hdr, sizeof hdr);
    send_some(fd, body, len);
}

static void hello(script *s, int fd)
{
    uint8_t b[KVF_WIRE_HEADER_LEN + 24];
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION, .opcode = KVF_OP_HELLO, .payload_len = 24};
    kvf__wire_hdr_encode(b, &h);
    kvf__put_u32(b + KVF_WIRE_HEADER_LEN, 1);
    kvf__put_u32(b + KVF_WIRE_HEADER_LEN + 4, 1);
    kvf__put_u64(b + KVF_WIRE_HEADER_LEN + 8, take8(s) % 3); /* a few namespaces, or none */
    kvf__put_u64(b + KVF_WIRE_HEADER_LEN + 16, KVF_CAP_ALL | (take8(s) % 2 ? KVF_CAP_SHM : 0));
    send_some(fd, b, sizeof b);
}

/* Reads n bytes of fd into p, waiting at most ms for each piece. Returns how many arrived (n, or
 * fewer at EOF, an error or the wait's end). */
static size_t recv_within(int fd, void *p, size_t n, int ms)
{
    size_t got = 0;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    while (got < n && poll(&pf, 1, ms) > 0) {
        ssize_t k = recv(fd, (uint8_t *)p + got, n - got, 0);
        if (k <= 0)
            break;
        got += (size_t)k;
    }
    return got;
}

/* Reads replies of fd (bounded in time) until the one to request id, whose payload (at most cap
 * bytes) goes to out. Returns its payload length, or -1. */
static long reply_to(int fd, uint64_t id, uint8_t *out, size_t cap)
{
    for (int frames = 0; frames < 64; frames++) {
        uint8_t h[KVF_WIRE_HEADER_LEN];
        if (recv_within(fd, h, sizeof h, 200) < sizeof h)
            return -1;
        uint64_t len = kvf__get_u64(h + 32);
        uint64_t rid = kvf__get_u64(h + 16);
        static uint8_t sink[65536];
        uint8_t *dst = rid == id && len <= cap ? out : NULL;
        for (uint64_t left = len; left > 0;) {
            size_t want = left < sizeof sink ? (size_t)left : sizeof sink;
            size_t k = recv_within(fd, dst ? dst + (len - left) : sink, want, 200);
            if (k < want)
                return -1;
            left -= k;
        }
        if (rid == id)
            return dst ? (long)len : -1;
    }
    return -1;
}

/* A proper HELLO, then AUTH as one of C's credentials, as a client would. */
static void authenticate(script *s, int fd)
{
    static uint64_t next_id = 1ull << 40;
    uint64_t id = next_id++;
    uint8_t b[KVF_WIRE_HEADER_LEN + KVF_AUTH_REQ_LEN] = {0}, rep[256];
    kvf_wire_hdr h = {
        .version = KVF_WIRE_VERSION, .opcode = KVF_OP_HELLO, .request_id = id, .payload_len = 24};
    kvf__wire_hdr_encode(b, &h);
    kvf__put_u32(b + KVF_WIRE_HEADER_LEN, 1);
    kvf__put_u32(b + KVF_WIRE_HEADER_LEN + 4, 1);
    kvf__put_u64(b + KVF_WIRE_HEADER_LEN + 8, take8(s) % 3);
    send_some(fd, b, KVF_WIRE_HEADER_LEN + 24);
    if (reply_to(fd, id, rep, sizeof rep) != KVF_HELLO_REPLY_AUTH_LEN)
        return;
    const kvf_credential *c = &g_creds[take8(s) % N_CREDS];
    memset(b, 0, sizeof b);
    h = (kvf_wire_hdr){.version = KVF_WIRE_VERSION,
                       .opcode = KVF_OP_AUTH,
                       .request_id = id + (1ull << 20),
                       .payload_len = KVF_AUTH_REQ_LEN};
    kvf__wire_hdr_encode(b, &h);
    kvf__put_u32(b + KVF_WIRE_HEADER_LEN, (uint32_t)strlen(c->tenant));
    memcpy(b + KVF_WIRE_HEADER_LEN + 8, c->tenant, strlen(c->tenant));
    kvf__auth_sign(c, rep + KVF_HELLO_REPLY_LEN, kvf__get_u64(rep + 32),
                   b + KVF_WIRE_HEADER_LEN + 8 + 64);
    if (take8(s) % 8 == 0) /* now and then a signature one bit off */
        b[KVF_WIRE_HEADER_LEN + 8 + 64 + take8(s) % 64] ^= 1;
    send_some(fd, b, sizeof b);
}

/* Waits until A and C hold no connection (bounded): the next input starts from idle nodes. */
static void settle(void)
{
    for (int i = 0;
         i < 2000 && (atomic_load(&g_a.srv->n_conns) > 0 || atomic_load(&g_c.srv->n_conns) > 0);
         i++)
        usleep(500);
}

/* A fresh connection must still get a HELLO answered: the node is alive and serving. */
static void check_alive(void)
{
    int fds[1] = {-1};
    int fd = conn_fd(fds, 0);
    if (fd < 0)
        __builtin_trap();
    script none = {0};
    hello(&none, fd);
    uint8_t r[KVF_WIRE_HEADER_LEN];
    size_t got = recv_within(fd, r, sizeof r, 5000);
    close(fd);
    if (got < sizeof r)
        __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static uint8_t body[MAX_BODY];
    static unsigned long inputs;
    setup();
    script s = {.p = data, .n = size};
    int fds[CONNS] = {-1, -1, -1, -1};
    for (int step = 0; step < MAX_STEPS && s.at < s.n; step++) {
        uint8_t op = take8(&s);
        int c = op >> 6;
        int fd = conn_fd(fds, c);
        if (fd < 0)
            break;
        switch (op & 7) {
        case 0:
        case 1:
        case 2:
            framed(&s, fd, body);
            break;
        case 3: {
            uint32_t len = take16(&s) % MAX_BODY;
            take(&s, body, len);
            send_some(fd, body, len);
            break;
        }
        case 4:
            if (op & 8)
                authenticate(&s, fd);
            else
                hello(&s, fd);
            break;
        case 5:
            drain(fd, 1 + take8(&s) % 8);
            break;
        case 6:
            shutdown(fd, SHUT_WR);
            break;
        default:
            close(fd);
            fds[c] = -1;
            break;
        }
    }
    for (int c = 0; c < CONNS; c++)
        if (fds[c] >= 0)
            close(fds[c]);
    settle();
    if (++inputs % 64 == 0)
        check_alive();
    return 0;
}
