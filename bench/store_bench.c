/*
 * kvf-bench store: the storage node against the physical ceiling and the peer, in one run.
 *
 *   1. ceiling: raw loopback TCP, 16 MiB blocking writes, one stream and as many as kvfabric uses;
 *   2. kvfabric batched GET and PUT of 256 x 64 KiB objects and of 16 MiB objects (client-side
 *      checksum verification included: it is what an engine gets);
 *   3. Redis (the remote backend LMCache users run most) GET and SET of the same bytes, pipelined,
 *      through hiredis;
 *   4. lookup-prefix latency of 128 keys, p50 and p99;
 *   5. the store's idle RSS against its arena.
 * Every figure is measured here, now: labelled real. Ratios are taken within the run, because
 * absolute rates drift on shared machines: each kvfabric rate is bracketed by the N-stream
 * ceiling measured just before and just after it, and compared with their mean.
 */
#include "bench.h"
#include "bench_util.h"
#include "rdma.h"
#include "proc.h"

#include "kvf/kvf.h"

#include "bytes.h"
#include "kvf/object.h"
#include "tcp.h"
#include "wire.h"

#include <fcntl.h>

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define LAYERS 4

typedef struct opts {
    int quick, json, streams, store_threads;
    int rounds;     /* measurements are taken in rounds (ROUNDS_MAX at most) */
    int io_threads; /* the client's; 0: its default */
    double secs;
    const char *memory;
    const char *store_bin;
    const char *transport;
    const char *rdma_host; /* --transport rdma: the RDMA interface's address */
    const char *plot;
} opts;

#define ROUNDS_MAX 11
#define BENCH_NS   0xbe4c4b17ull /* the namespace of every key the benchmark stores */

/* One round's rates, GB/s. */
typedef struct round_fig {
    double c1, cn;                 /* TCP ceiling, 1 and N streams (cn: mean of cb) */
    double cb[5];                  /* N-stream ceiling before, between and after the kvf rates */
    double kg16, kg64, kp16, kp64; /* kvfabric GET/PUT, 16 MiB and 64 KiB objects, in that order */
    double rg64, rs64, rg16, rs16; /* Redis GET/SET */
} round_fig;

/* ------------------------------------------------------------------------------------------ */
/* Ceiling: raw loopback TCP */

typedef struct ceil_arg {
    int fd;
    double secs;
    uint64_t bytes;
    uint8_t *buf;
    size_t len;
} ceil_arg;

static void *ceil_send(void *p)
{
    ceil_arg *a = p;
    double end = bench_now() + a->secs;
    while (bench_now() < end) {
        size_t off = 0;
        while (off < a->len) {
            ssize_t w = send(a->fd, a->buf + off, a->len - off, MSG_NOSIGNAL);
            if (w <= 0)
                return NULL;
            off += (size_t)w;
        }
    }
    shutdown(a->fd, SHUT_WR);
    return NULL;
}

static void *ceil_recv(void *p)
{
    ceil_arg *a = p;
    for (;;) {
        ssize_t r = recv(a->fd, a->buf, a->len, 0);
        if (r <= 0)
            break;
        a->bytes += (uint64_t)r;
    }
    return NULL;
}

static void sock_bufs(int fd)
{
    int sz = 8 << 20, one = 1;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* GB/s of n concurrent loopback streams of 16 MiB writes. */
static double tcp_ceiling(int n, double secs)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 64) ||
        getsockname(l, (struct sockaddr *)&a, &sl))
        return 0;
    ceil_arg snd[16], rcv[16];
    pthread_t ts[16], tr[16];
    size_t len = 16u << 20;
    for (int i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        sock_bufs(c);
        if (connect(c, (struct sockaddr *)&a, sizeof a) != 0)
            return 0;
        int s = accept(l, NULL, NULL);
        sock_bufs(s);
        snd[i] = (ceil_arg){.fd = c, .secs = secs, .buf = malloc(len), .len = len};
        rcv[i] = (ceil_arg){.fd = s, .buf = malloc(len), .len = len};
        memset(snd[i].buf, i + 1, len);
    }
    double t0 = bench_now();
    for (int i = 0; i < n; i++) {
        pthread_create(&tr[i], NULL, ceil_recv, &rcv[i]);
        pthread_create(&ts[i], NULL, ceil_send, &snd[i]);
    }
    uint64_t total = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(ts[i], NULL);
        pthread_join(tr[i], NULL);
        total += rcv[i].bytes;
        close(snd[i].fd);
        close(rcv[i].fd);
        free(snd[i].buf);
        free(rcv[i].buf);
    }
    double dt = bench_now() - t0;
    close(l);
    return (double)total / dt / 1e9;
}

/* ------------------------------------------------------------------------------------------ */
/* Workloads: n objects of `bytes` each (4 layers), with keys that PUT can renew. */

typedef struct workload {
    size_t n;
    uint64_t payload;   /* bytes of one object's segments */
    uint64_t obj_bytes; /* object size on the wire */
    kvf_key *keys;
    uint8_t **objs;
    uint64_t *lens;
    uint8_t **bufs;
    uint64_t *caps;
    uint64_t *out_lens;
    int *st;
} workload;

/* Key i of a workload's round. The payload size is part of the key: workloads of different
 * sizes never name the same object (a GET of one must not find the other's objects). */
static kvf_key wkey(uint64_t payload, uint64_t round, size_t i)
{
    kvf_key k = {.lo = (round << 20) ^ (uint64_t)i ^ 0x1234567890abcdefull,
                 .hi = round * 0x9E3779B97F4A7C15ull + i + (payload << 32)};
    return k;
}

static void wl_init(workload *w, size_t n, uint64_t payload)
{
    memset(w, 0, sizeof *w);
    w->n = n;
    w->payload = payload;
    uint64_t seg = payload / LAYERS;
    w->keys = calloc(n, sizeof *w->keys);
    w->objs = calloc(n, sizeof *w->objs);
    w->lens = calloc(n, sizeof *w->lens);
    w->bufs = calloc(n, sizeof *w->bufs);
    w->caps = calloc(n, sizeof *w->caps);
    w->out_lens = calloc(n, sizeof *w->out_lens);
    w->st = calloc(n, sizeof *w->st);
    uint8_t *raw = malloc(payload);
    for (uint64_t i = 0; i < payload; i++)
        raw[i] = (uint8_t)(i * 2654435761u >> 13);
    const void *segs[LAYERS];
    for (int l = 0; l < LAYERS; l++)
        segs[l] = raw + (uint64_t)l * seg;
    size_t cap = kvf_obj_raw_size(LAYERS, seg);
    for (size_t i = 0; i < n; i++) {
        w->keys[i] = wkey(w->payload, 0, i);
        w->objs[i] = malloc(cap);
        size_t out;
        kvf_obj_encode(&w->keys[i], 1, 256, LAYERS, segs, seg, KVF_CODEC_NONE, w->objs[i], cap,
                       &out, NULL);
        w->lens[i] = out;
        w->bufs[i] = malloc(cap);
        w->caps[i] = cap;
    }
    w->obj_bytes = w->lens[0];
    free(raw);
}

static void wl_rekey(workload *w, uint64_t round)
{
    for (size_t i = 0; i < w->n; i++) {
        w->keys[i] = wkey(w->payload, round, i);
        kvf_obj_rekey(w->objs[i], &w->keys[i]);
    }
}

static void wl_free(workload *w)
{
    for (size_t i = 0; i < w->n; i++) {
        free(w->objs[i]);
        free(w->bufs[i]);
    }
    free(w->keys);
    free(w->objs);
    free(w->lens);
    free(w->bufs);
    free(w->caps);
    free(w->out_lens);
    free(w->st);
}

/* GB/s of batched kvfabric GETs (verified) or PUTs (fresh keys every round). */
static double kvf_rate(kvf_client *c, workload *w, int put, double secs, int *errors)
{
    static uint64_t round = 1000; /* PUT keys are fresh across calls too */
    uint64_t bytes = 0;
    *errors = 0;
    if (!put) {
        /* The objects a GET reads are stored first, outside the timed part. */
        wl_rekey(w, 0);
        kvf_batch b = {.n = w->n,
                       .keys = w->keys,
                       .objs = (const void *const *)w->objs,
                       .lens = w->lens,
                       .status = w->st};
        kvf_client_put(c, &b);
    }
    double t0 = bench_now(), end = t0 + secs;
    int iters = 0;
    while (bench_now() < end || iters == 0) {
        kvf_batch b = {.n = w->n, .keys = w->keys, .status = w->st};
        int rc;
        if (put) {
            wl_rekey(w, round++);
            b.objs = (const void *const *)w->objs;
            b.lens = w->lens;
            rc = kvf_client_put(c, &b);
        } else {
            b.bufs = (void *const *)w->bufs;
            b.caps = w->caps;
            b.out_lens = w->out_lens;
            rc = kvf_client_get(c, &b);
        }
        for (size_t i = 0; i < w->n; i++) {
            if (rc || w->st[i])
                (*errors)++;
            else
                bytes += w->lens[i];
        }
        iters++;
    }
    return (double)bytes / (bench_now() - t0) / 1e9;
}

/* GB/s of pipelined Redis GETs (copied into the destination, as a connector must) or SETs. */
static double redis_rate(redisContext *rc, workload *w, int set, double secs, int *errors)
{
    uint64_t bytes = 0;
    char key[32];
    *errors = 0;
    if (!set) { /* the values a GET reads are stored first, outside the timed part */
        for (size_t i = 0; i < w->n; i++) {
            int kl = snprintf(key, sizeof key, "kvf:%zu", i);
            redisAppendCommand(rc, "SET %b %b", key, (size_t)kl, w->objs[i], (size_t)w->lens[i]);
        }
        for (size_t i = 0; i < w->n; i++) {
            redisReply *r;
            if (redisGetReply(rc, (void **)&r) != REDIS_OK)
                return 0;
            freeReplyObject(r);
        }
    }
    double t0 = bench_now(), end = t0 + secs;
    int iters = 0;
    while (bench_now() < end || iters == 0) {
        for (size_t i = 0; i < w->n; i++) {
            int kl = snprintf(key, sizeof key, "kvf:%zu", i);
            if (set)
                redisAppendCommand(rc, "SET %b %b", key, (size_t)kl, w->objs[i],
                                   (size_t)w->lens[i]);
            else
                redisAppendCommand(rc, "GET %b", key, (size_t)kl);
        }
        for (size_t i = 0; i < w->n; i++) {
            redisReply *r;
            if (redisGetReply(rc, (void **)&r) != REDIS_OK)
                return 0;
            if (set) {
                if (r->type == REDIS_REPLY_STATUS)
                    bytes += w->lens[i];
                else
                    (*errors)++;
            } else if (r->type == REDIS_REPLY_STRING && r->len <= w->caps[i]) {
                memcpy(w->bufs[i], r->str, r->len);
                bytes += r->len;
            } else {
                (*errors)++;
            }
            freeReplyObject(r);
        }
        iters++;
    }
    return (double)bytes / (bench_now() - t0) / 1e9;
}

/* The latency ceiling: the same LOOKUP frame over one blocking socket, no client library: what
 * the kernel, the loopback and the store's own handling cost. Fills lat (us). */
static int raw_lookup_rtt(uint16_t port, uint64_t ns, const kvf_key *keys, int iters, double *lat)
{
    int fd;
    char err[128];
    if (kvf__tcp_connect("127.0.0.1", port, 2000, &fd, err, sizeof err) != 0)
        return -1;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    uint8_t f[KVF_WIRE_HEADER_LEN + 8 + 16 * 128];
    kvf__put_u64(f + KVF_WIRE_HEADER_LEN, ns);
    for (int i = 0; i < 128; i++)
        kvf__wire_key_put(f + KVF_WIRE_HEADER_LEN + 8 + 16 * i, &keys[i]);
    for (int i = 0; i < iters; i++) {
        kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                          .opcode = KVF_OP_LOOKUP,
                          .request_id = (uint64_t)i + 1,
                          .item_count = 128,
                          .payload_len = 8 + 16 * 128};
        kvf__wire_hdr_encode(f, &h);
        double t = bench_now();
        if (send(fd, f, sizeof f, MSG_NOSIGNAL) != (ssize_t)sizeof f)
            break;
        uint8_t r[KVF_WIRE_HEADER_LEN + 8 + 16];
        size_t got = 0;
        while (got < sizeof r) {
            ssize_t x = recv(fd, r + got, sizeof r - got, 0);
            if (x <= 0) {
                close(fd);
                return -1;
            }
            got += (size_t)x;
        }
        lat[i] = (bench_now() - t) * 1e6;
    }
    close(fd);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

static void row(const char *what, double gbps, double vs_ceiling, double vs_peer)
{
    printf("  %-34s %8.2f GB/s", what, gbps);
    if (vs_ceiling > 0)
        printf("   %5.2f x ceiling", vs_ceiling);
    if (vs_peer > 0)
        printf("   %5.2f x redis", vs_peer);
    printf("\n");
}

static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){.streams = 4, .store_threads = 1, .memory = "1G", .transport = "tcp"};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--quick"))
            o->quick = 1;
        else if (!strcmp(a, "--json"))
            o->json = 1;
        else if (!strcmp(a, "--streams") && v)
            o->streams = atoi(argv[++i]);
        else if (!strcmp(a, "--store-threads") && v)
            o->store_threads = atoi(argv[++i]);
        else if (!strcmp(a, "--memory") && v)
            o->memory = argv[++i];
        else if (!strcmp(a, "--store-bin") && v)
            o->store_bin = argv[++i];
        else if (!strcmp(a, "--plot") && v)
            o->plot = argv[++i];
        else if (!strcmp(a, "--transport") && v)
            o->transport = argv[++i];
        else if (!strcmp(a, "--io-threads") && v)
            o->io_threads = atoi(argv[++i]);
        else if (!strcmp(a, "--rdma-host") && v)
            o->rdma_host = argv[++i];
        else {
            fprintf(stderr,
                    "kvf-bench store: unknown option %s\n"
                    "usage: kvf-bench store [--quick] [--json] [--streams N] "
                    "[--memory SIZE] [--store-threads N] [--store-bin PATH] [--plot FILE.png] "
                    "[--io-threads N] [--transport tcp|rdma] [--rdma-host IP]\n",
                    a);
            return -1;
        }
    }
    if (o->streams < 1 || o->streams > 16) {
        fprintf(stderr, "kvf-bench store: --streams must be 1..16\n");
        return -1;
    }
    /* Many short rounds rather than a few long ones: the machine's speed moves within a second,
     * and a median of more rounds moves less. Odd counts: the median is the middle round. */
    o->secs = o->quick ? 0.4 : 0.5;
    o->rounds = o->quick ? 5 : 11;
    if (!o->store_bin)
        o->store_bin = kvf__proc_find_bin("kvf-store");
    return 0;
}

/* Starts a kvf-store (extra: its flags) and opens a client of the given transport to it at
 * host. 0, or -1 with the reason printed. */
static int kvf_open(const opts *o, const char *host, const char *extra, const char *transport,
                    bench_proc *store, kvf_client **cl)
{
    if (bench_start_store(store, o->store_bin, o->memory, extra) != 0)
        return -1;
    char addr[300];
    snprintf(addr, sizeof addr, "%s:%u", host, store->port);
    const char *nodes[1] = {addr};
    kvf_client_opts co = {.nodes = nodes,
                          .n_nodes = 1,
                          .ns = BENCH_NS,
                          .conns_per_node = o->streams,
                          .deadline_ms = 30000,
                          .transport = transport,
                          .io_threads = o->io_threads};
    char err[256];
    if (kvf_client_open(cl, &co, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench store: %s\n", err);
        bench_stop(store);
        return -1;
    }
    return 0;
}

/* kvfabric's four rates into f (GET and PUT of both workloads); returns the keys that failed.
 * With streams > 0 the N-stream TCP ceiling is measured before the first rate, between each two
 * and after the last (f->cb): the machine's speed moves within a second here, and a rate compared
 * with the ceilings on either side of it sees the same neighbours (f->cn is their mean). */
static int kvf_rates(kvf_client *cl, workload *small, workload *large, double secs, int streams,
                     round_fig *f)
{
    double *rate[4] = {&f->kg16, &f->kg64, &f->kp16, &f->kp64};
    workload *w[4] = {large, small, large, small};
    int errors = 0;
    for (int i = 0; i < 4; i++) {
        if (streams)
            f->cb[i] = tcp_ceiling(streams, secs);
        int e;
        *rate[i] = kvf_rate(cl, w[i], i >= 2, secs, &e);
        errors += e;
    }
    if (streams) {
        f->cb[4] = tcp_ceiling(streams, secs);
        f->cn = 0;
        for (int i = 0; i < 5; i++)
            f->cn += f->cb[i] / 5;
    }
    return errors;
}

/* The ceiling a kvf rate of f is compared with (0..3: GET 16 MiB, GET 64 KiB, PUT 16 MiB, PUT
 * 64 KiB): the mean of the N-stream ceilings measured just before and after it, or the 1-stream
 * ceiling of the round where that was higher. */
static double ceiling_of(const round_fig *f, int i)
{
    double b = (f->cb[i] + f->cb[i + 1]) / 2;
    return b > f->c1 ? b : f->c1;
}

/* --transport rdma on a host with a device: a storage node serving RDMA on the RDMA interface's
 * address, and the same GET and PUT batches with every byte moved by one-sided READs and WRITEs.
 * The ceiling is the fabric's, which perftest measures (ib_read_bw, docs/rdma.md): this program
 * cannot drive it, so the run reports kvfabric's rates and the command to compare them with. */
static int rdma_bench(const opts *o, json_t *res)
{
    if (!o->rdma_host) {
        fprintf(stderr, "kvf-bench store: --transport rdma needs --rdma-host IP, the address of "
                        "the RDMA interface (loopback has no RDMA)\n");
        return 2;
    }
    bench_proc store = {0};
    char extra[400];
    snprintf(extra, sizeof extra, "--threads %d --listen %s:0 --rdma auto", o->store_threads,
             o->rdma_host);
    kvf_client *cl = NULL;
    if (kvf_open(o, o->rdma_host, extra, "rdma", &store, &cl) != 0)
        return 1;
    workload small, large;
    wl_init(&small, 256, 64 * 1024);
    wl_init(&large, 4, 16u << 20);
    bench_progress("store", "kvfabric GET/PUT over RDMA, 256 x 64 KiB and 4 x 16 MiB batches");
    round_fig f = {0};
    int errors = kvf_rates(cl, &small, &large, o->secs, 0, &f);
    double kg64 = f.kg64, kp64 = f.kp64, kg16 = f.kg16, kp16 = f.kp16;
    kvf_client_close(&cl);
    bench_stop(&store);
    wl_free(&small);
    wl_free(&large);
    printf("kvf-bench store: real, RDMA to %s\n", o->rdma_host);
    row("kvf GET 256 x 64 KiB", kg64, 0, 0);
    row("kvf PUT 256 x 64 KiB", kp64, 0, 0);
    row("kvf GET 4 x 16 MiB", kg16, 0, 0);
    row("kvf PUT 4 x 16 MiB", kp16, 0, 0);
    printf("  ceiling: ib_read_bw -s 16777216 --report_gbits against %s (docs/rdma.md)\n",
           o->rdma_host);
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "kvf_get_gbps", json_real(kg64 < kg16 ? kg64 : kg16));
    json_object_set_new(res, "kvf_put_gbps", json_real(kp64 < kp16 ? kp64 : kp16));
    json_object_set_new(res, "kvf_get_64k_gbps", json_real(kg64));
    json_object_set_new(res, "kvf_put_64k_gbps", json_real(kp64));
    json_object_set_new(res, "kvf_get_16m_gbps", json_real(kg16));
    json_object_set_new(res, "kvf_put_16m_gbps", json_real(kp16));
    json_object_set_new(res, "kvf_errors", json_integer(errors));
    json_object_set_new(res, "ceiling", json_string("measure with ib_read_bw (docs/rdma.md)"));
    bench_emit(res, o->json);
    return errors ? 1 : 0;
}

int bench_store_main(int argc, char **argv)
{
    opts o;
    if (parse(argc, argv, &o) != 0)
        return 2;
    json_t *res = json_object();
    json_object_set_new(res, "bench", json_string("store"));
    json_object_set_new(res, "quick", json_boolean(o.quick));
    char why[160] = "";
    if (!strcmp(o.transport, "rdma") && kvf__rdma_available(why, sizeof why)) {
        json_object_set_new(res, "transport", json_string("rdma"));
        int rc = rdma_bench(&o, res);
        json_decref(res);
        return rc;
    }
    if (strcmp(o.transport, "tcp") != 0) {
        /* RDMA needs a device on this host and a build with the RDMA headers: why says which is
         * missing. */
        if (strcmp(o.transport, "rdma") != 0)
            snprintf(why, sizeof why, "unknown transport \"%s\" (tcp or rdma)", o.transport);
        json_object_set_new(res, "transport", json_string(o.transport));
        json_object_set_new(res, "label", json_string("backend_infeasible"));
        json_object_set_new(res, "reason", json_string(why));
        printf("kvf-bench store --transport %s: backend_infeasible: %s\n", o.transport, why);
        bench_emit(res, o.json);
        json_decref(res);
        return 0;
    }
    json_object_set_new(res, "transport", json_string("tcp"));
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "cores", json_integer(sysconf(_SC_NPROCESSORS_ONLN)));

    bench_proc store = {0};
    char extra[64];
    snprintf(extra, sizeof extra, "--threads %d --rdma off", o.store_threads);
    kvf_client *cl = NULL;
    if (kvf_open(&o, "127.0.0.1", extra, "tcp", &store, &cl) != 0) {
        json_decref(res);
        return 1;
    }
    bench_proc redis = {0};
    redisContext *rc = NULL;
    int redis_ok = bench_start_redis(&redis) == 0;
    if (redis_ok) {
        struct timeval tv = {30, 0};
        rc = redisConnectWithTimeout("127.0.0.1", redis.port, tv);
        if (!rc || rc->err) {
            redis_ok = 0;
            bench_stop(&redis);
        }
    } else {
        bench_progress("store", "redis-server not available: peer figures omitted");
    }
    workload small, large;
    wl_init(&small, 256, 64 * 1024);
    wl_init(&large, 4, 16u << 20);

    /* Rounds: the ceiling, kvfabric (each rate between two ceilings) and Redis one after another,
     * again and again. This machine is shared: a figure and the ceilings measured on either side
     * of it see the same neighbours, so the ratios are taken figure by figure, round by round,
     * and their median reported (the rates too). */
    round_fig fig[ROUNDS_MAX];
    int kvf_errors = 0, redis_errors = 0;
    for (int r = 0; r < o.rounds; r++) {
        round_fig *f = &fig[r];
        memset(f, 0, sizeof *f);
        bench_progress("store",
                       "round %d/%d: TCP ceiling (1 and %d streams), kvfabric between "
                       "ceilings, Redis, %.1f s each",
                       r + 1, o.rounds, o.streams, o.secs);
        f->c1 = tcp_ceiling(1, o.secs);
        kvf_errors += kvf_rates(cl, &small, &large, o.secs, o.streams, f);
        int e[4];
        if (redis_ok) {
            f->rs64 = redis_rate(rc, &small, 1, o.secs, &e[0]);
            f->rg64 = redis_rate(rc, &small, 0, o.secs, &e[1]);
            f->rs16 = redis_rate(rc, &large, 1, o.secs, &e[2]);
            f->rg16 = redis_rate(rc, &large, 0, o.secs, &e[3]);
            redis_errors += e[0] + e[1] + e[2] + e[3];
        }
    }
    if (rc)
        redisFree(rc);
    if (redis_ok)
        bench_stop(&redis);

    bench_progress("store", "lookup-prefix of 128 keys");
    workload chain;
    wl_init(&chain, 128, 4 * 1024);
    kvf_batch pb = {.n = 128,
                    .keys = chain.keys,
                    .objs = (const void *const *)chain.objs,
                    .lens = chain.lens,
                    .status = chain.st};
    kvf_client_put(cl, &pb);
    int iters = o.quick ? 1000 : 5000;
    double *lat = malloc((size_t)iters * sizeof *lat);
    size_t hits = 0;
    for (int i = 0; i < iters; i++) {
        double t = bench_now();
        kvf_client_lookup_prefix(cl, 128, chain.keys, &hits, 5000);
        lat[i] = (bench_now() - t) * 1e6;
    }
    double p50 = bench_quantile(lat, (size_t)iters, 0.5),
           p99 = bench_quantile(lat, (size_t)iters, 0.99);
    double raw50 = 0, raw99 = 0;
    if (raw_lookup_rtt(store.port, BENCH_NS, chain.keys, iters, lat) == 0) {
        raw50 = bench_quantile(lat, (size_t)iters, 0.5);
        raw99 = bench_quantile(lat, (size_t)iters, 0.99);
    }
    free(lat);
    wl_free(&chain);
    kvf_client_close(&cl);
    usleep(300000);
    double rss = bench_rss_mib(store.pid);
    bench_stop(&store);
    wl_free(&small);
    wl_free(&large);

    /* Rates: medians over the rounds. Ratios: per round, then the median. Headline figures are
     * the smaller of the two sizes (kvfabric) against the larger (ceiling, Redis). */
    double v[ROUNDS_MAX];
#define MED(out, expr)                                  \
    do {                                                \
        for (int r_ = 0; r_ < o.rounds; r_++) {         \
            const round_fig *f = &fig[r_];              \
            v[r_] = (expr);                             \
        }                                               \
        out = bench_quantile(v, (size_t)o.rounds, 0.5); \
    } while (0)
#define MIN2(a, b) ((a) < (b) ? (a) : (b))
#define MAX2(a, b) ((a) > (b) ? (a) : (b))
    double c1, cn, kg64, kp64, kg16, kp16, rg64, rs64, rg16, rs16;
    MED(c1, f->c1);
    MED(cn, f->cn);
    MED(kg64, f->kg64);
    MED(kp64, f->kp64);
    MED(kg16, f->kg16);
    MED(kp16, f->kp16);
    MED(rg64, f->rg64);
    MED(rs64, f->rs64);
    MED(rg16, f->rg16);
    MED(rs16, f->rs16);
    double ceiling = MAX2(c1, cn);
    double kget = MIN2(kg64, kg16), kput = MIN2(kp64, kp16);
    double rget = MAX2(rg64, rg16), rset = MAX2(rs64, rs16);
    double get_vs_ceiling, put_vs_ceiling, get_vs_1stream, gc16, gc64, pc16, pc64;
    MED(gc16, f->kg16 / ceiling_of(f, 0));
    MED(gc64, f->kg64 / ceiling_of(f, 1));
    MED(pc16, f->kp16 / ceiling_of(f, 2));
    MED(pc64, f->kp64 / ceiling_of(f, 3));
    MED(get_vs_ceiling, MIN2(f->kg16 / ceiling_of(f, 0), f->kg64 / ceiling_of(f, 1)));
    MED(put_vs_ceiling, MIN2(f->kp16 / ceiling_of(f, 2), f->kp64 / ceiling_of(f, 3)));
    MED(get_vs_1stream, MIN2(f->kg64, f->kg16) / f->c1);
    double gvr64 = 0, gvr16 = 0, pvr64 = 0, pvr16 = 0, get_vs_redis = 0, put_vs_redis = 0;
    if (redis_ok) {
        MED(gvr64, f->kg64 / f->rg64);
        MED(gvr16, f->kg16 / f->rg16);
        MED(pvr64, f->kp64 / f->rs64);
        MED(pvr16, f->kp16 / f->rs16);
        MED(get_vs_redis, MIN2(f->kg64 / f->rg64, f->kg16 / f->rg16));
        MED(put_vs_redis, MIN2(f->kp64 / f->rs64, f->kp16 / f->rs16));
    }
    json_t *gr = json_array();
    for (int r = 0; r < o.rounds; r++)
        json_array_append_new(gr, json_real(MIN2(fig[r].kg16 / ceiling_of(&fig[r], 0),
                                                 fig[r].kg64 / ceiling_of(&fig[r], 1))));
    json_object_set_new(res, "get_vs_ceiling_rounds", gr);
    json_object_set_new(res, "rounds", json_integer(o.rounds));
#undef MED
    double arena_mib = 0;
    {
        uint64_t m = 0;
        char u = 0;
        if (sscanf(o.memory, "%" SCNu64 "%c", &m, &u) >= 1)
            arena_mib = (double)m * (u == 'G' || u == 'g'   ? 1024
                                     : u == 'M' || u == 'm' ? 1
                                                            : 1.0 / 1048576);
    }

    printf("kvf-bench store: real, TCP loopback, %ld cores, %d stream(s), median of %d rounds%s\n",
           sysconf(_SC_NPROCESSORS_ONLN), o.streams, o.rounds, o.quick ? ", quick" : "");
    row("TCP ceiling, 1 stream", c1, 0, 0);
    char label[64];
    snprintf(label, sizeof label, "TCP ceiling, %d streams", o.streams);
    row(label, cn, 0, 0);
    row("kvf GET 256 x 64 KiB", kg64, gc64, gvr64);
    row("kvf PUT 256 x 64 KiB", kp64, pc64, pvr64);
    row("kvf GET 4 x 16 MiB", kg16, gc16, gvr16);
    row("kvf PUT 4 x 16 MiB", kp16, pc16, pvr16);
    if (redis_ok) {
        row("redis GET 256 x 64 KiB", rg64, rg64 / ceiling, 0);
        row("redis SET 256 x 64 KiB", rs64, rs64 / ceiling, 0);
        row("redis GET 4 x 16 MiB", rg16, rg16 / ceiling, 0);
        row("redis SET 4 x 16 MiB", rs16, rs16 / ceiling, 0);
    }
    printf("  %-34s p50 %.1f us, p99 %.1f us (%zu hits)\n", "kvf lookup-prefix, 128 keys", p50, p99,
           hits);
    printf("  %-34s p50 %.1f us, p99 %.1f us\n", "raw socket round trip, same frame", raw50, raw99);
    printf("  %-34s %.1f MiB (arena %.0f MiB + %.1f MiB)\n", "kvf-store idle RSS", rss, arena_mib,
           rss - arena_mib);
    if (kvf_errors || redis_errors)
        printf("  errors: kvfabric %d, redis %d keys failed\n", kvf_errors, redis_errors);

    if (o.plot) {
        const char *labels[] = {"TCP ceiling 1 stream", "TCP ceiling N streams", "kvf GET 256x64K",
                                "kvf PUT 256x64K",      "kvf GET 4x16M",         "kvf PUT 4x16M",
                                "redis GET 256x64K",    "redis SET 256x64K",     "redis GET 4x16M",
                                "redis SET 4x16M"};
        double vals[] = {c1, cn, kg64, kp64, kg16, kp16, rg64, rs64, rg16, rs16};
        int groups[] = {0, 0, 1, 1, 1, 1, 2, 2, 2, 2};
        size_t n = redis_ok ? 10 : 6;
        if (bench_plot_bars(
                o.plot,
                "kvf-bench store: loopback TCP, real (ceiling grey, kvfabric blue, Redis red)",
                "GB/s", labels, vals, groups, n) == 0)
            printf("  plot: %s\n", o.plot);
    }

#define NUM(k, v) json_object_set_new(res, k, json_real(v))
    NUM("tcp_ceiling_gbps", ceiling);
    NUM("tcp_ceiling_1stream_gbps", c1);
    NUM("tcp_ceiling_nstream_gbps", cn);
    json_object_set_new(res, "streams", json_integer(o.streams));
    json_object_set_new(res, "store_threads", json_integer(o.store_threads));
    json_object_set_new(res, "io_threads", json_integer(o.io_threads));
    NUM("kvf_get_gbps", kget);
    NUM("kvf_put_gbps", kput);
    NUM("kvf_get_64k_gbps", kg64);
    NUM("kvf_put_64k_gbps", kp64);
    NUM("kvf_get_16m_gbps", kg16);
    NUM("kvf_put_16m_gbps", kp16);
    if (redis_ok) {
        NUM("redis_get_gbps", rget);
        NUM("redis_set_gbps", rset);
        NUM("redis_get_64k_gbps", rg64);
        NUM("redis_set_64k_gbps", rs64);
        NUM("redis_get_16m_gbps", rg16);
        NUM("redis_set_16m_gbps", rs16);
        NUM("get_vs_redis", get_vs_redis);
        NUM("put_vs_redis", put_vs_redis);
    } else {
        json_object_set_new(res, "redis_get_gbps", json_null());
        json_object_set_new(res, "redis_set_gbps", json_null());
        json_object_set_new(res, "get_vs_redis", json_null());
        json_object_set_new(res, "put_vs_redis", json_null());
    }
    NUM("get_vs_ceiling", get_vs_ceiling);
    NUM("get_vs_1stream_ceiling", get_vs_1stream);
    NUM("put_vs_ceiling", put_vs_ceiling);
    NUM("lookup128_p50_us", p50);
    NUM("lookup128_p99_us", p99);
    NUM("lookup128_raw_p50_us", raw50);
    NUM("lookup128_raw_p99_us", raw99);
    NUM("lookup_p50_vs_raw", raw50 > 0 ? p50 / raw50 : 0);
    NUM("store_rss_mib", rss);
    NUM("store_arena_mib", arena_mib);
    json_object_set_new(res, "kvf_errors", json_integer(kvf_errors));
    json_object_set_new(res, "redis_errors", json_integer(redis_errors));
#undef NUM
    bench_emit(res, o.json);
    json_decref(res);
    return kvf_errors ? 1 : 0;
}
