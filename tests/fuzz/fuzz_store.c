/*
 * libFuzzer target for a whole storage node: two in-process servers (A, and B, A's only COPY
 * peer) on loopback, driven through real sockets by a script the fuzzer writes. Each input is a
 * sequence of steps on up to four connections to A: well-formed frames of any opcode with fuzzed
 * fields and bodies (HELLO, PUT, ADMIT/COMMIT, GET, COPY to B ...), raw bytes, reads of what A
 * answered, half-closes and closes, in any order. After the input every connection is closed and
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

#include "bytes.h"
#include "cache.h"
#include "log.h"
#include "server.h"
#include "server_int.h"
#include "tcp.h"
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
} node;

static node g_a, g_b;
/* The node's own complaints about bad frames are expected here by the million: errors only. */
static const kvf_log g_log = {.level = KVF_LOG_ERROR, .name = "fuzz_store"};

static void *run_node(void *p)
{
    kvf__server_run(((node *)p)->srv);
    return NULL;
}

static void node_start(node *n, const char *peer)
{
    char err[256];
    kvf_cache_opts co = {.memory = 8u << 20, .max_entries = 1024, .reserve_ms = 200};
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
                          .cache = n->cache,
                          .log = &g_log};
    if (kvf__server_open(&n->srv, &so, err, sizeof err) != 0) {
        fprintf(stderr, "fuzz_store: server: %s\n", err);
        abort();
    }
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
    node_start(&g_b, NULL);
    node_start(&g_a, g_b.addr);
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

static int conn_fd(int *fds, int c)
{
    if (fds[c] >= 0)
        return fds[c];
    char host[64], err[128];
    uint16_t port;
    if (kvf__addr_parse(g_a.addr, host, sizeof host, &port) != 0 ||
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
                      .opcode = (uint16_t)(1 + take8(s) % 19),
                      .flags = take8(s) & (KVF_WF_KNOWN & ~KVF_WF_REPLY),
                      .request_id = take16(s),
                      .item_count = take16(s) % 300};
    uint32_t len = take16(s) % MAX_BODY;
    take(s, body, len);
    switch (take8(s) % 4) { /* shapes the node's checks expect, more often than chance */
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
    kvf__put_u64(b + KVF_WIRE_HEADER_LEN + 16, KVF_CAP_ALL);
    send_some(fd, b, sizeof b);
}

/* Waits until A holds no connection (bounded): the next input starts from an idle node. */
static void settle(void)
{
    for (int i = 0; i < 2000 && atomic_load(&g_a.srv->n_conns) > 0; i++)
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
    size_t got = 0;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    while (got < sizeof r && poll(&pf, 1, 5000) > 0) {
        ssize_t k = recv(fd, r + got, sizeof r - got, 0);
        if (k <= 0)
            break;
        got += (size_t)k;
    }
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
