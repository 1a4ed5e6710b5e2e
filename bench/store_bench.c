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
    const bench_opt table[] = {
        {"--quick", BENCH_OPT_FLAG, .flag = &o->quick},
        {"--json", BENCH_OPT_FLAG, .flag = &o->json},
        {"--streams", BENCH_OPT_INT, .i = &o->streams},
        {"--store-threads", BENCH_OPT_INT, .i = &o->store_threads},
        {"--memory", BENCH_OPT_STR, .str = &o->memory},
        {"--store-bin", BENCH_OPT_STR, .str = &o->store_bin},
        {"--plot", BENCH_OPT_STR, .str = &o->plot},
        {"--transport", BENCH_OPT_STR, .str = &o->transport},
        {"--io-threads", BENCH_OPT_INT, .i = &o->io_threads},
        {"--rdma-host", BENCH_OPT_STR, .str = &o->rdma_host},
    };
    const char *unknown;
    if (bench_opts_parse("store", table, sizeof table / sizeof table[0], argc, argv, &unknown) !=
        0) {
        fprintf(stderr,
                "kvf-bench store: unknown option %s\n"
                "usage: kvf-bench store [--quick] [--json] [--streams N] "
                "[--memory SIZE] [--store-threads N] [--store-bin PATH] [--plot FILE.png] "
                "[--io-threads N] [--transport tcp|rdma] [--rdma-host IP]\n",
                unknown);
        return -1;
    }
    if (o->streams < 1 || o->streams > 16) {
        fprintf(stderr, "kvf-bench store: --streams must be 1..16\n");
        return -1;
    }
    /* Many short rounds rather than a few long ones: the machine's speed moves within a second,
     * and a median of more rounds moves less. Odd counts: the median is the middle round. */
    o->secs = o->quick ? 0.4 : 0.5;
    o->rounds = o->quick ? 5 : 11;
    return 0;
}

/* Starts a kvf-store (extra: its flags) and opens a client of the given transport to it at
 * host. 0, or -1 with the reason printed. */
static int kvf_open(const opts *o, const char *host, const char *extra, const char *transport,
                    bench_proc *store, kvf_client **cl)
{
    kvf_client_opts co = {.ns = BENCH_NS,
                          .conns_per_node = o->streams,
                          .deadline_ms = 30000,
                          .transport = transport,
                          .io_threads = o->io_threads};
    return bench_store_client_open("store", store, o->store_bin, o->memory, extra, host, &co, cl);
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

/* ------------------------------------------------------------------------------------------ */
/* TCP: the rounds, the lookup latency and the idle RSS, then their summary */

/* Starts redis-server and connects to it. Returns the connection, or NULL (and no redis-server
 * left running) where redis-server is missing or does not answer. */
static redisContext *redis_open(bench_proc *redis)
{
    if (bench_start_redis(redis) != 0) {
        bench_progress("store", "redis-server not available: peer figures omitted");
        return NULL;
    }
    struct timeval tv = {30, 0};
    redisContext *rc = redisConnectWithTimeout("127.0.0.1", redis->port, tv);
    if (!rc || rc->err) {
        if (rc)
            redisFree(rc);
        bench_stop(redis);
        return NULL;
    }
    return rc;
}

/* What a TCP run measured. */
typedef struct tcp_run {
    round_fig fig[ROUNDS_MAX];
    int redis_ok;                 /* Redis ran: its rates in fig are measured, not zero */
    int kvf_errors, redis_errors; /* keys that failed */
    double lookup_p50, lookup_p99, raw_p50, raw_p99; /* us */
    size_t lookup_hits;
    double rss_mib; /* the store's, idle after the run */
} tcp_run;

/* Rounds: the ceiling, kvfabric (each rate between two ceilings) and Redis (rc; NULL: none) one
 * after another, again and again. This machine is shared: a figure and the ceilings measured on
 * either side of it see the same neighbours, so the ratios are taken figure by figure, round by
 * round, and their median reported (the rates too). */
static void measure_rounds(const opts *o, kvf_client *cl, redisContext *rc, workload *small,
                           workload *large, tcp_run *run)
{
    for (int r = 0; r < o->rounds; r++) {
        round_fig *f = &run->fig[r];
        memset(f, 0, sizeof *f);
        bench_progress("store",
                       "round %d/%d: TCP ceiling (1 and %d streams), kvfabric between "
                       "ceilings, Redis, %.1f s each",
                       r + 1, o->rounds, o->streams, o->secs);
        f->c1 = tcp_ceiling(1, o->secs);
        run->kvf_errors += kvf_rates(cl, small, large, o->secs, o->streams, f);
        int e[4];
        if (rc) {
            f->rs64 = redis_rate(rc, small, 1, o->secs, &e[0]);
            f->rg64 = redis_rate(rc, small, 0, o->secs, &e[1]);
            f->rs16 = redis_rate(rc, large, 1, o->secs, &e[2]);
            f->rg16 = redis_rate(rc, large, 0, o->secs, &e[3]);
            run->redis_errors += e[0] + e[1] + e[2] + e[3];
        }
    }
}

/* Latency of lookup-prefix of 128 stored keys through the client, and of the same frame over a
 * raw socket to the store at port (the ceiling; 0 where it fails), into run. */
static void lookup_latency(const opts *o, kvf_client *cl, uint16_t port, tcp_run *run)
{
    bench_progress("store", "lookup-prefix of 128 keys");
    workload chain;
    wl_init(&chain, 128, 4 * 1024);
    kvf_batch pb = {.n = 128,
                    .keys = chain.keys,
                    .objs = (const void *const *)chain.objs,
                    .lens = chain.lens,
                    .status = chain.st};
    kvf_client_put(cl, &pb);
    int iters = o->quick ? 1000 : 5000;
    double *lat = malloc((size_t)iters * sizeof *lat);
    for (int i = 0; i < iters; i++) {
        double t = bench_now();
        kvf_client_lookup_prefix(cl, 128, chain.keys, &run->lookup_hits, 5000);
        lat[i] = (bench_now() - t) * 1e6;
    }
    run->lookup_p50 = bench_quantile(lat, (size_t)iters, 0.5);
    run->lookup_p99 = bench_quantile(lat, (size_t)iters, 0.99);
    if (raw_lookup_rtt(port, BENCH_NS, chain.keys, iters, lat) == 0) {
        run->raw_p50 = bench_quantile(lat, (size_t)iters, 0.5);
        run->raw_p99 = bench_quantile(lat, (size_t)iters, 0.99);
    }
    free(lat);
    wl_free(&chain);
}

#define MIN2(a, b) ((a) < (b) ? (a) : (b))
#define MAX2(a, b) ((a) > (b) ? (a) : (b))

/* A run's figures: rates are medians over the rounds (GB/s); ratios are taken per round, then
 * the median. Headline figures are the smaller of the two sizes (kvfabric) against the larger
 * (ceiling, Redis). Ratios to Redis are 0 where Redis did not run. */
typedef struct summary {
    double c1, cn, kg64, kp64, kg16, kp16, rg64, rs64, rg16, rs16;
    double ceiling, kget, kput, rget, rset;
    double gc16, gc64, pc16, pc64; /* each kvfabric rate over the ceiling it is compared with */
    double get_vs_ceiling, put_vs_ceiling, get_vs_1stream;
    double gvr64, gvr16, pvr64, pvr16, get_vs_redis, put_vs_redis;
} summary;

static void summarize(const tcp_run *run, int rounds, summary *s)
{
    double v[ROUNDS_MAX];
#define MED(out, expr)                                \
    do {                                              \
        for (int r_ = 0; r_ < rounds; r_++) {         \
            const round_fig *f = &run->fig[r_];       \
            v[r_] = (expr);                           \
        }                                             \
        out = bench_quantile(v, (size_t)rounds, 0.5); \
    } while (0)
    memset(s, 0, sizeof *s);
    MED(s->c1, f->c1);
    MED(s->cn, f->cn);
    MED(s->kg64, f->kg64);
    MED(s->kp64, f->kp64);
    MED(s->kg16, f->kg16);
    MED(s->kp16, f->kp16);
    MED(s->rg64, f->rg64);
    MED(s->rs64, f->rs64);
    MED(s->rg16, f->rg16);
    MED(s->rs16, f->rs16);
    s->ceiling = MAX2(s->c1, s->cn);
    s->kget = MIN2(s->kg64, s->kg16), s->kput = MIN2(s->kp64, s->kp16);
    s->rget = MAX2(s->rg64, s->rg16), s->rset = MAX2(s->rs64, s->rs16);
    MED(s->gc16, f->kg16 / ceiling_of(f, 0));
    MED(s->gc64, f->kg64 / ceiling_of(f, 1));
    MED(s->pc16, f->kp16 / ceiling_of(f, 2));
    MED(s->pc64, f->kp64 / ceiling_of(f, 3));
    MED(s->get_vs_ceiling, MIN2(f->kg16 / ceiling_of(f, 0), f->kg64 / ceiling_of(f, 1)));
    MED(s->put_vs_ceiling, MIN2(f->kp16 / ceiling_of(f, 2), f->kp64 / ceiling_of(f, 3)));
    MED(s->get_vs_1stream, MIN2(f->kg64, f->kg16) / f->c1);
    if (run->redis_ok) {
        MED(s->gvr64, f->kg64 / f->rg64);
        MED(s->gvr16, f->kg16 / f->rg16);
        MED(s->pvr64, f->kp64 / f->rs64);
        MED(s->pvr16, f->kp16 / f->rs16);
        MED(s->get_vs_redis, MIN2(f->kg64 / f->rg64, f->kg16 / f->rg16));
        MED(s->put_vs_redis, MIN2(f->kp64 / f->rs64, f->kp16 / f->rs16));
    }
#undef MED
}

/* MiB of a size such as --memory's ("1G", "512M", or bytes); 0 where it does not read as one. */
static double size_mib(const char *size)
{
    uint64_t m = 0;
    char u = 0;
    if (sscanf(size, "%" SCNu64 "%c", &m, &u) < 1)
        return 0;
    return (double)m * (u == 'G' || u == 'g' ? 1024 : u == 'M' || u == 'm' ? 1 : 1.0 / 1048576);
}

static void print_tcp(const opts *o, const tcp_run *run, const summary *s)
{
    printf("kvf-bench store: real, TCP loopback, %ld cores, %d stream(s), median of %d rounds%s\n",
           sysconf(_SC_NPROCESSORS_ONLN), o->streams, o->rounds, o->quick ? ", quick" : "");
    row("TCP ceiling, 1 stream", s->c1, 0, 0);
    char label[64];
    snprintf(label, sizeof label, "TCP ceiling, %d streams", o->streams);
    row(label, s->cn, 0, 0);
    row("kvf GET 256 x 64 KiB", s->kg64, s->gc64, s->gvr64);
    row("kvf PUT 256 x 64 KiB", s->kp64, s->pc64, s->pvr64);
    row("kvf GET 4 x 16 MiB", s->kg16, s->gc16, s->gvr16);
    row("kvf PUT 4 x 16 MiB", s->kp16, s->pc16, s->pvr16);
    if (run->redis_ok) {
        row("redis GET 256 x 64 KiB", s->rg64, s->rg64 / s->ceiling, 0);
        row("redis SET 256 x 64 KiB", s->rs64, s->rs64 / s->ceiling, 0);
        row("redis GET 4 x 16 MiB", s->rg16, s->rg16 / s->ceiling, 0);
        row("redis SET 4 x 16 MiB", s->rs16, s->rs16 / s->ceiling, 0);
    }
    printf("  %-34s p50 %.1f us, p99 %.1f us (%zu hits)\n", "kvf lookup-prefix, 128 keys",
           run->lookup_p50, run->lookup_p99, run->lookup_hits);
    printf("  %-34s p50 %.1f us, p99 %.1f us\n", "raw socket round trip, same frame", run->raw_p50,
           run->raw_p99);
    double arena_mib = size_mib(o->memory);
    printf("  %-34s %.1f MiB (arena %.0f MiB + %.1f MiB)\n", "kvf-store idle RSS", run->rss_mib,
           arena_mib, run->rss_mib - arena_mib);
    if (run->kvf_errors || run->redis_errors)
        printf("  errors: kvfabric %d, redis %d keys failed\n", run->kvf_errors, run->redis_errors);
}

/* The rates as bars to png (Redis's where it ran); says so on stdout once written. */
static void plot_tcp(const char *png, int redis_ok, const summary *s)
{
    const char *labels[] = {"TCP ceiling 1 stream", "TCP ceiling N streams", "kvf GET 256x64K",
                            "kvf PUT 256x64K",      "kvf GET 4x16M",         "kvf PUT 4x16M",
                            "redis GET 256x64K",    "redis SET 256x64K",     "redis GET 4x16M",
                            "redis SET 4x16M"};
    double vals[] = {s->c1,   s->cn,   s->kg64, s->kp64, s->kg16,
                     s->kp16, s->rg64, s->rs64, s->rg16, s->rs16};
    int groups[] = {0, 0, 1, 1, 1, 1, 2, 2, 2, 2};
    size_t n = redis_ok ? 10 : 6;
    if (bench_plot_bars(
            png, "kvf-bench store: loopback TCP, real (ceiling grey, kvfabric blue, Redis red)",
            "GB/s", labels, vals, groups, n) == 0)
        printf("  plot: %s\n", png);
}

static void add_tcp_figures(json_t *res, const opts *o, const tcp_run *run, const summary *s)
{
    json_t *gr = json_array();
    for (int r = 0; r < o->rounds; r++) {
        const round_fig *f = &run->fig[r];
        json_array_append_new(
            gr, json_real(MIN2(f->kg16 / ceiling_of(f, 0), f->kg64 / ceiling_of(f, 1))));
    }
    json_object_set_new(res, "get_vs_ceiling_rounds", gr);
    json_object_set_new(res, "rounds", json_integer(o->rounds));
    bench_json_real(res, "tcp_ceiling_gbps", s->ceiling);
    bench_json_real(res, "tcp_ceiling_1stream_gbps", s->c1);
    bench_json_real(res, "tcp_ceiling_nstream_gbps", s->cn);
    json_object_set_new(res, "streams", json_integer(o->streams));
    json_object_set_new(res, "store_threads", json_integer(o->store_threads));
    json_object_set_new(res, "io_threads", json_integer(o->io_threads));
    bench_json_real(res, "kvf_get_gbps", s->kget);
    bench_json_real(res, "kvf_put_gbps", s->kput);
    bench_json_real(res, "kvf_get_64k_gbps", s->kg64);
    bench_json_real(res, "kvf_put_64k_gbps", s->kp64);
    bench_json_real(res, "kvf_get_16m_gbps", s->kg16);
    bench_json_real(res, "kvf_put_16m_gbps", s->kp16);
    if (run->redis_ok) {
        bench_json_real(res, "redis_get_gbps", s->rget);
        bench_json_real(res, "redis_set_gbps", s->rset);
        bench_json_real(res, "redis_get_64k_gbps", s->rg64);
        bench_json_real(res, "redis_set_64k_gbps", s->rs64);
        bench_json_real(res, "redis_get_16m_gbps", s->rg16);
        bench_json_real(res, "redis_set_16m_gbps", s->rs16);
        bench_json_real(res, "get_vs_redis", s->get_vs_redis);
        bench_json_real(res, "put_vs_redis", s->put_vs_redis);
    } else {
        json_object_set_new(res, "redis_get_gbps", json_null());
        json_object_set_new(res, "redis_set_gbps", json_null());
        json_object_set_new(res, "get_vs_redis", json_null());
        json_object_set_new(res, "put_vs_redis", json_null());
    }
    bench_json_real(res, "get_vs_ceiling", s->get_vs_ceiling);
    bench_json_real(res, "get_vs_1stream_ceiling", s->get_vs_1stream);
    bench_json_real(res, "put_vs_ceiling", s->put_vs_ceiling);
    bench_json_real(res, "lookup128_p50_us", run->lookup_p50);
    bench_json_real(res, "lookup128_p99_us", run->lookup_p99);
    bench_json_real(res, "lookup128_raw_p50_us", run->raw_p50);
    bench_json_real(res, "lookup128_raw_p99_us", run->raw_p99);
    bench_json_real(res, "lookup_p50_vs_raw",
                    run->raw_p50 > 0 ? run->lookup_p50 / run->raw_p50 : 0);
    bench_json_real(res, "store_rss_mib", run->rss_mib);
    bench_json_real(res, "store_arena_mib", size_mib(o->memory));
    json_object_set_new(res, "kvf_errors", json_integer(run->kvf_errors));
    json_object_set_new(res, "redis_errors", json_integer(run->redis_errors));
}

/* --transport tcp: the rounds of rates on one loopback store and a Redis beside it (where
 * redis-server is installed), the lookup latency and the store's idle RSS, printed and into res.
 * Returns the exit status: 1 where the store does not start or kvfabric failed keys. */
static int tcp_bench(const opts *o, json_t *res)
{
    json_object_set_new(res, "transport", json_string("tcp"));
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "cores", json_integer(sysconf(_SC_NPROCESSORS_ONLN)));
    bench_proc store = {0};
    char extra[64];
    snprintf(extra, sizeof extra, "--threads %d --rdma off", o->store_threads);
    kvf_client *cl = NULL;
    if (kvf_open(o, "127.0.0.1", extra, "tcp", &store, &cl) != 0)
        return 1;
    tcp_run run = {0};
    bench_proc redis = {0};
    redisContext *rc = redis_open(&redis);
    run.redis_ok = rc != NULL;
    workload small, large;
    wl_init(&small, 256, 64 * 1024);
    wl_init(&large, 4, 16u << 20);
    measure_rounds(o, cl, rc, &small, &large, &run);
    if (rc) {
        redisFree(rc);
        bench_stop(&redis);
    }
    lookup_latency(o, cl, store.port, &run);
    kvf_client_close(&cl);
    usleep(300000);
    run.rss_mib = bench_rss_mib(store.pid);
    bench_stop(&store);
    wl_free(&small);
    wl_free(&large);

    summary s;
    summarize(&run, o->rounds, &s);
    print_tcp(o, &run, &s);
    if (o->plot)
        plot_tcp(o->plot, run.redis_ok, &s);
    add_tcp_figures(res, o, &run, &s);
    bench_emit(res, o->json);
    return run.kvf_errors ? 1 : 0;
}

/* A transport that this host cannot run (why says what it lacks) or that does not exist, reported
 * as backend_infeasible, which is a result and not a failure. */
static void report_infeasible(const opts *o, const char *why, json_t *res)
{
    json_object_set_new(res, "transport", json_string(o->transport));
    json_object_set_new(res, "label", json_string("backend_infeasible"));
    json_object_set_new(res, "reason", json_string(why));
    printf("kvf-bench store --transport %s: backend_infeasible: %s\n", o->transport, why);
    bench_emit(res, o->json);
}

int bench_store_main(int argc, char **argv)
{
    opts o;
    if (parse(argc, argv, &o) != 0)
        return 2;
    json_t *res = bench_result_new("store");
    json_object_set_new(res, "quick", json_boolean(o.quick));
    int rc = 0;
    char why[160] = "";
    if (!strcmp(o.transport, "rdma") && kvf__rdma_available(why, sizeof why)) {
        json_object_set_new(res, "transport", json_string("rdma"));
        rc = rdma_bench(&o, res);
    } else if (!strcmp(o.transport, "tcp")) {
        rc = tcp_bench(&o, res);
    } else {
        /* RDMA needs a device on this host and a build with the RDMA headers: why says which is
         * missing. */
        if (strcmp(o.transport, "rdma") != 0)
            snprintf(why, sizeof why, "unknown transport \"%s\" (tcp or rdma)", o.transport);
        report_infeasible(&o, why, res);
    }
    json_decref(res);
    return rc;
}
