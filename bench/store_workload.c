/*
 * kvf-bench store's workloads and kvfabric's side of the measurements (store_bench.h): batched
 * GET and PUT rates, and lookup latency from concurrent clients while GETs run.
 */
#include "store_bench.h"

#include "bench_util.h"

#include "bytes.h"
#include "tcp.h"
#include "unixsock.h"
#include "wire.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define LOOKUP_KEYS    128
#define MAX_LOOKUPERS  64
#define LOOKUP_SAMPLES 200000 /* per client, at most */

/* Key i of a workload's round. The payload size is part of the key: workloads of different
 * sizes never name the same object (a GET of one must not find the other's objects). */
static kvf_key wkey(uint64_t payload, uint64_t round, size_t i)
{
    kvf_key k = {.lo = (round << 20) ^ (uint64_t)i ^ 0x1234567890abcdefull,
                 .hi = round * 0x9E3779B97F4A7C15ull + i + (payload << 32)};
    return k;
}

static int wl_arrays(workload *w, size_t n)
{
    w->keys = calloc(n, sizeof *w->keys);
    w->objs = calloc(n, sizeof *w->objs);
    w->lens = calloc(n, sizeof *w->lens);
    w->bufs = calloc(n, sizeof *w->bufs);
    w->caps = calloc(n, sizeof *w->caps);
    w->out_lens = calloc(n, sizeof *w->out_lens);
    w->st = calloc(n, sizeof *w->st);
    return w->keys && w->objs && w->lens && w->bufs && w->caps && w->out_lens && w->st ? 0 : -1;
}

int wl_init(workload *w, size_t n, uint64_t payload)
{
    memset(w, 0, sizeof *w);
    w->n = n;
    w->payload = payload;
    uint64_t seg = payload / STORE_LAYERS;
    uint8_t *raw = malloc(payload);
    if (!raw || wl_arrays(w, n) != 0)
        goto out_free;
    for (uint64_t i = 0; i < payload; i++)
        raw[i] = (uint8_t)(i * 2654435761u >> 13);
    const void *segs[STORE_LAYERS];
    for (int l = 0; l < STORE_LAYERS; l++)
        segs[l] = raw + (uint64_t)l * seg;
    size_t cap = kvf_obj_raw_size(STORE_LAYERS, seg);
    for (size_t i = 0; i < n; i++) {
        w->keys[i] = wkey(w->payload, 0, i);
        w->objs[i] = malloc(cap);
        w->bufs[i] = malloc(cap);
        if (!w->objs[i] || !w->bufs[i])
            goto out_free;
        /* The destination touched once, as an engine's KV pages are before any load: the first
         * GET round otherwise pays the page faults of fresh memory (0.2 of the ceiling here). */
        memset(w->bufs[i], 0, cap);
        size_t out;
        kvf_obj_encode(&w->keys[i], 1, 256, STORE_LAYERS, segs, seg, KVF_CODEC_NONE, w->objs[i],
                       cap, &out, NULL);
        w->lens[i] = out;
        w->caps[i] = cap;
    }
    w->obj_bytes = w->lens[0];
    free(raw);
    return 0;

out_free:
    free(raw);
    wl_free(w);
    return -1;
}

void wl_rekey(workload *w, uint64_t round)
{
    for (size_t i = 0; i < w->n; i++) {
        w->keys[i] = wkey(w->payload, round, i);
        kvf_obj_rekey(w->objs[i], &w->keys[i]);
    }
}

void wl_free(workload *w)
{
    for (size_t i = 0; w->objs && i < w->n; i++)
        free(w->objs[i]);
    for (size_t i = 0; w->bufs && i < w->n; i++)
        free(w->bufs[i]);
    free(w->keys);
    free(w->objs);
    free(w->lens);
    free(w->bufs);
    free(w->caps);
    free(w->out_lens);
    free(w->st);
    memset(w, 0, sizeof *w);
}

int wl_get(kvf_client *c, workload *w)
{
    kvf_batch b = {.n = w->n,
                   .keys = w->keys,
                   .bufs = (void *const *)w->bufs,
                   .caps = w->caps,
                   .out_lens = w->out_lens,
                   .status = w->st};
    return kvf_client_get(c, &b);
}

/* The objects a GET reads are stored first, outside the timed part. */
static void store_for_get(kvf_client *c, workload *w)
{
    wl_rekey(w, 0);
    kvf_batch b = {.n = w->n,
                   .keys = w->keys,
                   .objs = (const void *const *)w->objs,
                   .lens = w->lens,
                   .status = w->st};
    kvf_client_put(c, &b);
}

double kvf_rate(kvf_client *c, workload *w, int put, double secs, int *errors)
{
    if (!put)
        store_for_get(c, w);
    return wl_rate(c, w, put, secs, errors);
}

double wl_rate(kvf_client *c, workload *w, int put, double secs, int *errors)
{
    static _Atomic uint64_t round = 1000; /* PUT keys are fresh across calls too */
    uint64_t bytes = 0;
    *errors = 0;
    double t0 = bench_now(), end = t0 + secs;
    int iters = 0;
    while (bench_now() < end || iters == 0) {
        int rc;
        if (put) {
            wl_rekey(w, atomic_fetch_add(&round, 1));
            kvf_batch b = {.n = w->n,
                           .keys = w->keys,
                           .objs = (const void *const *)w->objs,
                           .lens = w->lens,
                           .status = w->st};
            rc = kvf_client_put(c, &b);
        } else {
            rc = wl_get(c, w);
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

/* ------------------------------------------------------------------------------------------ */
/* Lookup latency under load */

/* The latency ceiling: the same LOOKUP frame over a blocking socket of its own, no client
 * library, no I/O thread: what the kernel, the loopback and the store's handling cost. */
typedef struct raw_lookup {
    int fd;
    uint64_t id;
    uint8_t frame[KVF_WIRE_HEADER_LEN + 8 + 16 * LOOKUP_KEYS];
} raw_lookup;

static int raw_open(raw_lookup *r, uint16_t port, const char *unix_name, uint64_t ns,
                    const kvf_key *keys)
{
    char err[128];
    if (unix_name ? kvf__unix_connect(unix_name, &r->fd, err, sizeof err) != 0
                  : kvf__tcp_connect("127.0.0.1", port, 2000, &r->fd, err, sizeof err) != 0)
        return -1;
    fcntl(r->fd, F_SETFL, fcntl(r->fd, F_GETFL) & ~O_NONBLOCK);
    kvf__put_u64(r->frame + KVF_WIRE_HEADER_LEN, ns);
    for (int i = 0; i < LOOKUP_KEYS; i++)
        kvf__wire_key_put(r->frame + KVF_WIRE_HEADER_LEN + 8 + 16 * i, &keys[i]);
    r->id = 0;
    return 0;
}

/* One LOOKUP and its reply; the leading hits into *hits. 0, or -1 where the socket fails or the
 * reply is not the one asked for. */
static int raw_one(raw_lookup *r, size_t *hits)
{
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = KVF_OP_LOOKUP,
                      .request_id = ++r->id,
                      .item_count = LOOKUP_KEYS,
                      .payload_len = 8 + 16 * LOOKUP_KEYS};
    kvf__wire_hdr_encode(r->frame, &h);
    if (send(r->fd, r->frame, sizeof r->frame, MSG_NOSIGNAL) != (ssize_t)sizeof r->frame)
        return -1;
    uint8_t rep[KVF_WIRE_HEADER_LEN + 8 + 16];
    size_t got = 0;
    while (got < sizeof rep) {
        ssize_t x = recv(r->fd, rep + got, sizeof rep - got, 0);
        if (x <= 0)
            return -1;
        got += (size_t)x;
    }
    kvf_wire_hdr rh;
    kvf_wire_limits lim = {.max_request = 1u << 20, .max_items = LOOKUP_KEYS, .expect_reply = 1};
    if (kvf__wire_hdr_decode(rep, &lim, &rh, NULL, 0) != 0 || rh.request_id != r->id ||
        rh.status != 0)
        return -1;
    *hits = kvf__get_u32(rep + KVF_WIRE_HEADER_LEN);
    return 0;
}

int raw_lookup_rtt(uint16_t port, const char *unix_name, uint64_t ns, const kvf_key *keys,
                   int iters, double *lat)
{
    raw_lookup r;
    if (raw_open(&r, port, unix_name, ns, keys) != 0)
        return -1;
    size_t hits;
    for (int i = 0; i < iters; i++) {
        double t = bench_now();
        if (raw_one(&r, &hits) != 0) {
            close(r.fd);
            return -1;
        }
        lat[i] = (bench_now() - t) * 1e6;
    }
    close(r.fd);
    return 0;
}

typedef struct lookuper {
    kvf_client *c;
    raw_lookup *raw; /* instead of c, for the ceiling */
    const kvf_key *keys;
    double secs;
    double *lat; /* us, LOOKUP_SAMPLES at most */
    size_t n, hits, errors;
    size_t want; /* the leading hits a right answer has: every key of the chain */
    pthread_t th;
    int started;
} lookuper;

typedef struct loader {
    kvf_client *c;
    workload *w;
    atomic_int stop;
    pthread_t th;
    int started;
} loader;

static void *lookuper_main(void *arg)
{
    lookuper *l = arg;
    double end = bench_now() + l->secs;
    while (bench_now() < end && l->n < LOOKUP_SAMPLES) {
        double t = bench_now();
        int rc = l->raw ? raw_one(l->raw, &l->hits)
                        : kvf_client_lookup_prefix(l->c, LOOKUP_KEYS, l->keys, &l->hits, 5000);
        if (rc != 0 || l->hits != l->want) {
            l->errors++;
            if (l->raw)
                break;
            continue;
        }
        l->lat[l->n++] = (bench_now() - t) * 1e6;
    }
    return NULL;
}

static void *loader_main(void *arg)
{
    loader *g = arg;
    while (!atomic_load(&g->stop)) {
        kvf_batch b = {.n = g->w->n,
                       .keys = g->w->keys,
                       .bufs = (void *const *)g->w->bufs,
                       .caps = g->w->caps,
                       .out_lens = g->w->out_lens,
                       .status = g->w->st};
        kvf_client_get(g->c, &b);
    }
    return NULL;
}

static kvf_client *one_client(const char *node, int conns)
{
    const char *nodes[1] = {node};
    kvf_client_opts co = {.nodes = nodes,
                          .n_nodes = 1,
                          .ns = STORE_NS,
                          .conns_per_node = conns,
                          .deadline_ms = 30000,
                          .transport = "tcp"}; /* these figures are TCP's */
    kvf_client *c = NULL;
    char err[200];
    if (kvf_client_open(&c, &co, err, sizeof err) != 0)
        bench_progress("store", "client: %s", err);
    return c;
}

/* The chain of 128 small objects that the lookups find, stored through c. */
static int store_chain(kvf_client *c, workload *chain)
{
    if (wl_init(chain, LOOKUP_KEYS, 4 * 1024) != 0)
        return -1;
    kvf_batch b = {.n = LOOKUP_KEYS,
                   .keys = chain->keys,
                   .objs = (const void *const *)chain->objs,
                   .lens = chain->lens,
                   .status = chain->st};
    return kvf_client_put(c, &b) == 0 ? 0 : -1;
}

/* Joins what started, merges the latencies into r, closes the clients. */
static void finish_lookups(lookuper *ls, int clients, loader *g, lookup_result *r)
{
    size_t total = 0;
    for (int i = 0; i < clients; i++) {
        if (ls[i].started)
            pthread_join(ls[i].th, NULL);
        total += ls[i].n;
    }
    atomic_store(&g->stop, 1);
    if (g->started)
        pthread_join(g->th, NULL);
    double *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; all && i < clients; i++) {
        memcpy(all + k, ls[i].lat, ls[i].n * sizeof *all);
        k += ls[i].n;
        r->errors += ls[i].errors;
    }
    r->samples = k;
    r->p50 = all && k ? bench_quantile(all, k, 0.5) : 0;
    r->p99 = all && k ? bench_quantile(all, k, 0.99) : 0;
    free(all);
    for (int i = 0; i < clients; i++) {
        kvf_client_close(&ls[i].c);
        if (ls[i].raw && ls[i].raw->fd >= 0)
            close(ls[i].raw->fd);
        free(ls[i].raw);
        free(ls[i].lat);
    }
    kvf_client_close(&g->c);
}

/* Lookuper i: a client of its own with one connection, or (raw) a socket of its own. */
static int lookuper_open(lookuper *l, const char *node, uint16_t port, int raw,
                         const workload *chain, double secs)
{
    *l = (lookuper){.keys = chain->keys,
                    .secs = secs,
                    .want = chain->n,
                    .lat = malloc(LOOKUP_SAMPLES * sizeof(double))};
    if (raw) {
        l->raw = malloc(sizeof *l->raw);
        if (l->raw && raw_open(l->raw, port, NULL, STORE_NS, chain->keys) != 0) {
            free(l->raw);
            l->raw = NULL;
        }
    } else {
        l->c = one_client(node, 1);
    }
    return l->lat && (l->c || l->raw) ? 0 : -1;
}

int lookup_under_load(uint16_t port, int clients, int raw, double secs, lookup_result *r)
{
    *r = (lookup_result){0};
    if (clients < 1 || clients > MAX_LOOKUPERS)
        return -1;
    char node[64];
    snprintf(node, sizeof node, "127.0.0.1:%u", (unsigned)port);
    lookuper ls[MAX_LOOKUPERS] = {0};
    loader g = {.c = one_client(node, 4)};
    workload chain = {0}, large = {0};
    int rc = -1;
    if (!g.c || store_chain(g.c, &chain) != 0 || wl_init(&large, 4, 16u << 20) != 0)
        goto out;
    store_for_get(g.c, &large);
    g.w = &large;
    for (int i = 0; i < clients; i++)
        if (lookuper_open(&ls[i], node, port, raw, &chain, secs) != 0)
            goto out;
    g.started = pthread_create(&g.th, NULL, loader_main, &g) == 0;
    for (int i = 0; i < clients; i++)
        ls[i].started = pthread_create(&ls[i].th, NULL, lookuper_main, &ls[i]) == 0;
    rc = g.started ? 0 : -1;
out:
    finish_lookups(ls, clients, &g, r);
    wl_free(&chain);
    wl_free(&large);
    return rc;
}
