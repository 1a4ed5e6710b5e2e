/*
 * kvf-bench store: the storage node against the physical ceiling and the peer, in one run.
 *
 *   1. ceiling: raw loopback TCP at three write sizes (64 KiB, 1 MiB, 16 MiB) and two stream
 *      counts (one, and as many as kvfabric uses); each round starts by measuring all six, and the
 *      best of them is what every kvfabric rate of the round is compared with;
 *   2. kvfabric batched GET and PUT of 256 x 64 KiB objects and of 4 x 16 MiB objects (client-side
 *      checksum verification included: it is what an engine gets);
 *   3. Redis (the remote backend LMCache users run most) with as many connections as kvfabric
 *      uses, the better of MGET/MSET and pipelined GET/SET for the same batches, values copied
 *      out as a connector must;
 *   4. lookup-prefix latency of 128 keys from 1, 4 and 16 concurrent clients while GETs of
 *      16 MiB objects run, and the same frame's round trip over a raw socket with nothing else
 *      running (the latency floor);
 *   5. the store's idle RSS against its arena.
 * Every figure is measured here, now: labelled real. Ratios are taken within the run, because
 * absolute rates drift on shared machines: each kvfabric rate is bracketed by the best ceiling
 * measured just before and just after it, and compared with their mean; every ratio is reported
 * with its median over the rounds and its spread (10th to 90th percentile of the rounds).
 */
#include "bench.h"
#include "bench_util.h"
#include "rdma.h"
#include "store_bench.h"

#include "kvf/kvf.h"

#include "bytes.h"
#include "cpus.h"
#include "kvf/object.h"
#include "tcp.h"
#include "wire.h"

#include <fcntl.h>

#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct opts {
    int quick, json, streams, store_threads;
    int lookup_only; /* --lookup-only: no rounds of rates, only the lookup latency */
    int auth;        /* --auth: authentication's cost instead (store_auth.c) */
    int rounds;      /* measurements are taken in rounds (ROUNDS_MAX at most) */
    int io_threads;  /* the client's; 0: its default */
    double secs;
    const char *memory;
    const char *store_bin;
    const char *transport;
    const char *rdma_host; /* --transport rdma: the RDMA interface's address */
    const char *plot;
    const char *tier, *disk_dir; /* --tier disk: the disk tier instead (store_tier.c) */
    int disk_gather;             /* --disk-gather-us (-1: the store's default) */
    int disk_nice;               /* --disk-nice */
    int dram_hot_mib;            /* --dram-hot-mib (0: the default) */
    int near;                    /* --near: reads from the nearest holder (store_near.c) */
    int sources;                 /* --sources: prefetches that follow a plan (store_sources.c) */
    double link_gbps;            /* --link-gbps: with --sources, the link to the other zone */
} opts;

#define ROUNDS_MAX 11
#define BENCH_NS   STORE_NS

/* The ceiling's configurations: every write size at one stream, and at kvfabric's stream count
 * with a thread per stream and side or one polling thread per side. */
#define N_WRITES  3
#define N_CEILING (3 * N_WRITES)
static const size_t ceiling_writes[N_WRITES] = {64u << 10, 1u << 20, 16u << 20};

/* One round's rates, GB/s. */
typedef struct round_fig {
    double grid[N_CEILING]; /* the ceiling at each configuration (cfg_streams, cfg_polled) */
    int best;               /* the configuration with the highest */
    double cb[5]; /* the best configuration just before, between and after the kvfabric rates */
    double kg16, kg64, kp16, kp64; /* kvfabric GET/PUT, 16 MiB and 64 KiB objects, in that order */
    double rg64, rs64, rg16, rs16; /* Redis GET/SET */
} round_fig;

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
    *o = (opts){.memory = "1G",
                .transport = "tcp",
                .tier = "dram",
                .disk_dir = ".",
                .disk_gather = -1,
                .link_gbps = 10};
    /* threads and streams: auto, below */
    static const char *const transports[] = {"tcp", "shm", "rdma", NULL};
    static const char *const tiers[] = {"dram", "disk", NULL};
    const kvf__arg args[] = {
        KVF__OPT("quick", KVF__ARG_FLAG, &o->quick, NULL, "5 rounds instead of 11 (CI)", NULL),
        KVF__OPT("near", KVF__ARG_FLAG, &o->near, NULL,
                 "hot keys read from the holder on this host (a replica) against their first "
                 "node over TCP (docs/store.md)",
                 NULL),
        KVF__OPT("sources", KVF__ARG_FLAG, &o->sources, NULL,
                 "prefetches that follow a plan's sources (a replica in the engine's zone) "
                 "against prefetches from each chunk's own node behind a slower link "
                 "(--link-gbps), and a stale plan's cost (docs/scheduler.md)",
                 NULL),
        KVF__OPT("link-gbps", KVF__ARG_REAL, &o->link_gbps, "GBPS",
                 "with --sources, the rate of the link to the other zone's store, Gb/s", "10",
                 .lo = 0.1, .hi = 1000),
        KVF__OPT("lookup-only", KVF__ARG_FLAG, &o->lookup_only, NULL,
                 "only the lookup latency, no rounds of rates", NULL),
        KVF__OPT("auth", KVF__ARG_FLAG, &o->auth, NULL,
                 "the cost of authentication instead: an authenticating store against an open one",
                 NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
        KVF__OPT("streams", KVF__ARG_INT, &o->streams, "N",
                 "connections of the kvfabric client, and streams of the ceiling",
                 "4, or one per "
                 "I/O thread",
                 .lo = 1, .hi = 16),
        KVF__OPT("store-threads", KVF__ARG_INT, &o->store_threads, "N",
                 "the store's event-loop threads", "auto (kvf-store's)", .lo = 1, .hi = 64),
        KVF__OPT("memory", KVF__ARG_STR, &o->memory, "SIZE", "the store's arena", "1G"),
        KVF__OPT("store-bin", KVF__ARG_STR, &o->store_bin, "PATH", "the kvf-store to run",
                 "the one beside kvf-bench"),
        KVF__OPT("plot", KVF__ARG_STR, &o->plot, "FILE.png",
                 "a bar chart of the rates with their spreads (gnuplot)", NULL),
        KVF__OPT("transport", KVF__ARG_CHOICE, &o->transport, "T",
                 "the client's transport to the store", "tcp", .choices = transports),
        KVF__OPT("io-threads", KVF__ARG_INT, &o->io_threads, "N", "the client's I/O threads",
                 "auto", .lo = 1, .hi = 64),
        KVF__OPT("tier", KVF__ARG_CHOICE, &o->tier, "TIER",
                 "dram: the arena (the default figures); disk: the disk tier through the store "
                 "against fio (--disk-dir)",
                 "dram", .choices = tiers),
        KVF__OPT("disk-dir", KVF__ARG_STR, &o->disk_dir, "DIR",
                 "with --tier disk, where the tier's file and fio's go (a file system that takes "
                 "O_DIRECT)",
                 "."),
        KVF__OPT("disk-gather-us", KVF__ARG_INT, &o->disk_gather, "US",
                 "with --tier disk, the store's --disk-gather-us", "the store's default", .lo = 0,
                 .hi = 100000),
        KVF__OPT("disk-nice", KVF__ARG_INT, &o->disk_nice, "N",
                 "with --tier disk, the store's --disk-nice", "0", .lo = 0, .hi = 19),
        KVF__OPT("dram-hot-mib", KVF__ARG_INT, &o->dram_hot_mib, "MIB",
                 "with --tier disk, the DRAM readers' set of objects (whole batches of the last "
                 "ones put; one batch at least)",
                 "256, at most a quarter of the arena", .lo = 0, .hi = 1 << 20),
        KVF__OPT("rdma-host", KVF__ARG_STR, &o->rdma_host, "IP",
                 "with --transport rdma, the RDMA interface's address", NULL),
    };
    int rc = bench_args("store", "[OPTIONS]",
                        "The storage node against the TCP ceiling and Redis, in the same run "
                        "(docs/benchmarks.md).",
                        NULL, args, sizeof args / sizeof args[0], argc, argv);
    if (rc != 0)
        return rc;
    /* auto, as the store and the client take them where not told: a quarter of the cores (1 to 8)
     * for the store's loops and the client's I/O threads, and a connection per I/O thread, 4 at
     * least; the ceiling is measured at that many streams. */
    if (o->store_threads <= 0)
        o->store_threads = kvf__auto_threads();
    if (o->io_threads <= 0)
        o->io_threads = kvf__auto_threads();
    if (o->streams <= 0)
        o->streams = o->io_threads > 4 ? o->io_threads : 4;
    if (o->streams < 1 || o->streams > 16) {
        fprintf(stderr, "kvf-bench store: --streams must be 1..16\n");
        return -1;
    }
    /* Many short rounds rather than a few long ones: the machine's speed moves within a second,
     * and a median of more rounds moves less. Odd counts: the median is the middle round. */
    o->secs = o->quick ? 0.4 : 0.5;
    o->rounds = o->lookup_only ? 1 : o->quick ? 5 : 11;
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

/* The streams and write size of ceiling configuration i. */
static int cfg_streams(const opts *o, int i)
{
    return i < N_WRITES ? 1 : o->streams;
}

static int cfg_polled(int i)
{
    return i >= 2 * N_WRITES;
}

static size_t cfg_write(int i)
{
    return ceiling_writes[i % N_WRITES];
}

/* Every ceiling configuration into f->grid, and the best of them into f->best. */
static void ceiling_grid(const opts *o, double secs, round_fig *f)
{
    f->best = 0;
    for (int i = 0; i < N_CEILING; i++) {
        f->grid[i] = tcp_ceiling(cfg_streams(o, i), cfg_write(i), cfg_polled(i), secs);
        if (f->grid[i] > f->grid[f->best])
            f->best = i;
    }
}

/* kvfabric's four rates into f (GET and PUT of both workloads); returns the keys that failed.
 * With a ceiling (o non-NULL), the round's best configuration is measured before the first rate,
 * between each two and after the last (f->cb): the machine's speed moves within a second here,
 * and a rate compared with the ceilings on either side of it sees the same neighbours. */
static int kvf_rates(const opts *o, kvf_client *cl, workload *small, workload *large, double secs,
                     round_fig *f)
{
    double *rate[4] = {&f->kg16, &f->kg64, &f->kp16, &f->kp64};
    workload *w[4] = {large, small, large, small};
    int errors = 0;
    for (int i = 0; i < 4; i++) {
        if (o)
            f->cb[i] =
                tcp_ceiling(cfg_streams(o, f->best), cfg_write(f->best), cfg_polled(f->best), secs);
        int e;
        *rate[i] = kvf_rate(cl, w[i], i >= 2, secs, &e);
        errors += e;
    }
    if (o)
        f->cb[4] =
            tcp_ceiling(cfg_streams(o, f->best), cfg_write(f->best), cfg_polled(f->best), secs);
    return errors;
}

/* The ceiling a kvf rate of f is compared with (0..3: GET 16 MiB, GET 64 KiB, PUT 16 MiB, PUT
 * 64 KiB): the mean of the best configuration measured just before and after it, or the best of
 * the round's grid where that was higher. */
static double ceiling_of(const round_fig *f, int i)
{
    double b = (f->cb[i] + f->cb[i + 1]) / 2;
    return b > f->grid[f->best] ? b : f->grid[f->best];
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
    snprintf(extra, sizeof extra, "--threads %d --listen %s:0 --rdma auto --insecure",
             o->store_threads, o->rdma_host);
    kvf_client *cl = NULL;
    if (kvf_open(o, o->rdma_host, extra, "rdma", &store, &cl) != 0)
        return 1;
    workload small, large;
    if (wl_init(&small, 256, 64 * 1024) != 0 || wl_init(&large, 4, 16u << 20) != 0) {
        fprintf(stderr, "kvf-bench store: out of memory\n");
        kvf_client_close(&cl);
        bench_stop(&store);
        return 1;
    }
    bench_progress("store", "kvfabric GET/PUT over RDMA, 256 x 64 KiB and 4 x 16 MiB batches");
    round_fig f = {0};
    int errors = kvf_rates(NULL, cl, &small, &large, o->secs, &f);
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

static const int lookup_clients[] = {1, 4, 16};
#define N_LOOKUP (sizeof lookup_clients / sizeof lookup_clients[0])

/* Redis's figures in the order of tcp_run.redis_pipelined_best. */
static const char *const redis_forms[4] = {"get_64k", "set_64k", "get_16m", "set_16m"};

/* What a TCP run measured. */
typedef struct tcp_run {
    round_fig fig[ROUNDS_MAX];
    int redis_ok;                   /* Redis ran: its rates in fig are measured, not zero */
    int kvf_errors, redis_errors;   /* keys that failed */
    int redis_pipelined_best[4];    /* rounds in which Redis's pipelined form beat MGET/MSET, by
                                       redis_forms */
    lookup_result lookup[N_LOOKUP]; /* by lookup_clients: through the client library */
    lookup_result raw[N_LOOKUP];    /* the same, each client a raw socket: the ceiling */
    double idle_p50, idle_p99;      /* us, one raw socket, nothing else running */
    double rss_mib;                 /* the store's, idle after the run */
} tcp_run;

/* Rounds: the ceiling grid, kvfabric (each rate between two ceilings) and Redis (rp; NULL: none)
 * one after another, again and again. This machine is shared: a figure and the ceilings measured
 * on either side of it see the same neighbours, so the ratios are taken figure by figure, round by
 * round, and reported with their median and spread. */
static void measure_rounds(const opts *o, kvf_client *cl, redis_peer *rp, workload *small,
                           workload *large, tcp_run *run)
{
    double grid_secs = o->secs / 2;
    for (int r = 0; r < o->rounds; r++) {
        round_fig *f = &run->fig[r];
        memset(f, 0, sizeof *f);
        bench_progress("store",
                       "round %d/%d: TCP ceiling (%d configurations), kvfabric between "
                       "ceilings, Redis (%d connections), %.1f s each",
                       r + 1, o->rounds, N_CEILING, o->streams, o->secs);
        ceiling_grid(o, grid_secs, f);
        run->kvf_errors += kvf_rates(o, cl, small, large, o->secs, f);
        int e[4], piped[4];
        if (rp) {
            f->rg64 = redis_peer_rate(rp, small, 0, o->secs, &e[0], &piped[0]);
            f->rs64 = redis_peer_rate(rp, small, 1, o->secs, &e[1], &piped[1]);
            f->rg16 = redis_peer_rate(rp, large, 0, o->secs, &e[2], &piped[2]);
            f->rs16 = redis_peer_rate(rp, large, 1, o->secs, &e[3], &piped[3]);
            for (int i = 0; i < 4; i++) {
                run->redis_errors += e[i];
                run->redis_pipelined_best[i] += piped[i];
            }
        }
    }
}

/* Lookup latency with 1, 4 and 16 clients while GETs run, through the library and then over raw
 * sockets under the same load (the ceiling), and one raw socket's round trip of the same frame
 * with nothing else running (the floor; 0 where it fails), into run. */
static void lookup_latency(const opts *o, uint16_t port, tcp_run *run)
{
    double secs = o->quick ? 1.0 : 2.0;
    for (size_t i = 0; i < N_LOOKUP; i++) {
        for (int raw = 0; raw < 2; raw++) {
            bench_progress("store", "lookup-prefix of 128 keys, %d %s, GETs running",
                           lookup_clients[i], raw ? "raw socket(s)" : "client(s)");
            lookup_result *r = raw ? &run->raw[i] : &run->lookup[i];
            if (lookup_under_load(port, lookup_clients[i], raw, secs, r) != 0 || r->errors)
                run->kvf_errors += r->errors ? (int)r->errors : 1;
        }
    }
    workload chain;
    if (wl_init(&chain, 128, 4 * 1024) != 0)
        return;
    int iters = o->quick ? 1000 : 5000;
    double *lat = malloc((size_t)iters * sizeof *lat);
    if (lat && raw_lookup_rtt(port, NULL, BENCH_NS, chain.keys, iters, lat) == 0) {
        run->idle_p50 = bench_quantile(lat, (size_t)iters, 0.5);
        run->idle_p99 = bench_quantile(lat, (size_t)iters, 0.99);
    }
    free(lat);
    wl_free(&chain);
}

#define MIN2(a, b) ((a) < (b) ? (a) : (b))
#define MAX2(a, b) ((a) > (b) ? (a) : (b))

/* Per-round values of the run's figures, in one table: rates (GB/s) and ratios. */
enum {
    F_C1,   /* the best one-stream ceiling of the grid */
    F_CN,   /* the best N-stream ceiling of the grid, a thread per stream and side */
    F_CP,   /* the best N-stream ceiling of the grid, one polling thread per side */
    F_CEIL, /* the best of the grid */
    F_KG64,
    F_KP64,
    F_KG16,
    F_KP16,
    F_RG64,
    F_RS64,
    F_RG16,
    F_RS16,
    F_GC64, /* kvfabric over the ceiling it is compared with */
    F_GC16,
    F_PC64,
    F_PC16,
    F_GC, /* the smaller of the two sizes */
    F_PC,
    F_GR64, /* kvfabric over Redis */
    F_GR16,
    F_PR64,
    F_PR16,
    F_GR,
    F_PR,
    N_FIG
};

static const char *const fig_keys[N_FIG] = {
    [F_C1] = "tcp_ceiling_1stream_gbps",
    [F_CN] = "tcp_ceiling_nstream_gbps",
    [F_CP] = "tcp_ceiling_nstream_polled_gbps",
    [F_CEIL] = "tcp_ceiling_gbps",
    [F_KG64] = "kvf_get_64k_gbps",
    [F_KP64] = "kvf_put_64k_gbps",
    [F_KG16] = "kvf_get_16m_gbps",
    [F_KP16] = "kvf_put_16m_gbps",
    [F_RG64] = "redis_get_64k_gbps",
    [F_RS64] = "redis_set_64k_gbps",
    [F_RG16] = "redis_get_16m_gbps",
    [F_RS16] = "redis_set_16m_gbps",
    [F_GC64] = "get_vs_ceiling_64k",
    [F_GC16] = "get_vs_ceiling_16m",
    [F_PC64] = "put_vs_ceiling_64k",
    [F_PC16] = "put_vs_ceiling_16m",
    [F_GC] = "get_vs_ceiling",
    [F_PC] = "put_vs_ceiling",
    [F_GR64] = "get_vs_redis_64k",
    [F_GR16] = "get_vs_redis_16m",
    [F_PR64] = "put_vs_redis_64k",
    [F_PR16] = "put_vs_redis_16m",
    [F_GR] = "get_vs_redis",
    [F_PR] = "put_vs_redis",
};

/* Round r's figures into v[i][r]. The Redis figures stay 0 where Redis did not run. */
static void round_values(const opts *o, const round_fig *f, int redis, double v[N_FIG])
{
    memset(v, 0, N_FIG * sizeof *v);
    for (int i = 0; i < N_CEILING; i++) {
        int k = i < N_WRITES ? F_C1 : cfg_polled(i) ? F_CP : F_CN;
        v[k] = MAX2(v[k], f->grid[i]);
    }
    v[F_CEIL] = f->grid[f->best];
    v[F_KG16] = f->kg16, v[F_KG64] = f->kg64, v[F_KP16] = f->kp16, v[F_KP64] = f->kp64;
    v[F_GC16] = f->kg16 / ceiling_of(f, 0), v[F_GC64] = f->kg64 / ceiling_of(f, 1);
    v[F_PC16] = f->kp16 / ceiling_of(f, 2), v[F_PC64] = f->kp64 / ceiling_of(f, 3);
    v[F_GC] = MIN2(v[F_GC16], v[F_GC64]);
    v[F_PC] = MIN2(v[F_PC16], v[F_PC64]);
    if (!redis)
        return;
    v[F_RG64] = f->rg64, v[F_RS64] = f->rs64, v[F_RG16] = f->rg16, v[F_RS16] = f->rs16;
    v[F_GR64] = f->kg64 / f->rg64, v[F_GR16] = f->kg16 / f->rg16;
    v[F_PR64] = f->kp64 / f->rs64, v[F_PR16] = f->kp16 / f->rs16;
    v[F_GR] = MIN2(v[F_GR64], v[F_GR16]);
    v[F_PR] = MIN2(v[F_PR64], v[F_PR16]);
}

/* A run's figures: each a median over the rounds with its spread, into res when res is not NULL
 * (with the rounds), and into s. */
static void summarize(const opts *o, const tcp_run *run, json_t *res, bench_spread s[N_FIG])
{
    double v[N_FIG][ROUNDS_MAX], one[N_FIG];
    for (int r = 0; r < o->rounds; r++) {
        round_values(o, &run->fig[r], run->redis_ok, one);
        for (int i = 0; i < N_FIG; i++)
            v[i][r] = one[i];
    }
    for (int i = 0; i < N_FIG; i++) {
        int of_redis = (i >= F_RG64 && i <= F_RS16) || i >= F_GR64;
        if (of_redis && !run->redis_ok) {
            memset(&s[i], 0, sizeof s[i]);
            if (res)
                json_object_set_new(res, fig_keys[i], json_null());
            continue;
        }
        s[i] = res ? bench_json_rounds(res, fig_keys[i], v[i], (size_t)o->rounds)
                   : bench_spread_of(v[i], (size_t)o->rounds);
    }
    /* The headline rates, the smaller object size's (what kvf classify --calibrate reads, as from
     * an RDMA run's JSON). */
    if (res) {
        json_object_set_new(res, "kvf_get_gbps",
                            json_real(MIN2(s[F_KG64].median, s[F_KG16].median)));
        json_object_set_new(res, "kvf_put_gbps",
                            json_real(MIN2(s[F_KP64].median, s[F_KP16].median)));
    }
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

/* One line: a rate, its ratio to the ceiling and to Redis, with their spreads. */
static void rate_row(const char *what, const bench_spread s[N_FIG], int rate, int vs_c, int vs_r)
{
    printf("  %-24s %6.2f GB/s", what, s[rate].median);
    if (vs_c >= 0)
        printf("   %5.2f x ceiling (%.2f-%.2f)", s[vs_c].median, s[vs_c].p10, s[vs_c].p90);
    if (vs_r >= 0 && s[vs_r].median > 0)
        printf("   %5.2f x redis (%.2f-%.2f)", s[vs_r].median, s[vs_r].p10, s[vs_r].p90);
    printf("\n");
}

/* The rates: the ceiling, kvfabric's against it and Redis's, each a median with its spread. */
static void print_rates(const opts *o, const tcp_run *run, const bench_spread s[N_FIG])
{
    printf("  %-24s %6.2f GB/s (best of 64 KiB, 1 MiB and 16 MiB writes; 1 stream %.2f, %d "
           "streams %.2f, %d streams polled by 2 threads %.2f)\n",
           "TCP ceiling", s[F_CEIL].median, s[F_C1].median, o->streams, s[F_CN].median, o->streams,
           s[F_CP].median);
    rate_row("kvf GET 256 x 64 KiB", s, F_KG64, F_GC64, F_GR64);
    rate_row("kvf PUT 256 x 64 KiB", s, F_KP64, F_PC64, F_PR64);
    rate_row("kvf GET 4 x 16 MiB", s, F_KG16, F_GC16, F_GR16);
    rate_row("kvf PUT 4 x 16 MiB", s, F_KP16, F_PC16, F_PR16);
    if (run->redis_ok) {
        static const char *const what[4] = {"redis GET 256 x 64 KiB", "redis SET 256 x 64 KiB",
                                            "redis GET 4 x 16 MiB", "redis SET 4 x 16 MiB"};
        static const int fig[4] = {F_RG64, F_RS64, F_RG16, F_RS16};
        for (int i = 0; i < 4; i++) {
            printf("  %-24s %6.2f GB/s   better of M%s and pipelined %s: pipelined in %d of %d "
                   "rounds\n",
                   what[i], s[fig[i]].median, i % 2 ? "SET" : "GET", i % 2 ? "SETs" : "GETs",
                   run->redis_pipelined_best[i], o->rounds);
        }
    }
}

static void print_tcp(const opts *o, const tcp_run *run, const bench_spread s[N_FIG])
{
    printf("kvf-bench store: real, TCP loopback, %ld cores, %d stream(s), median (p10-p90) of %d "
           "rounds%s\n",
           sysconf(_SC_NPROCESSORS_ONLN), o->streams, o->rounds,
           o->lookup_only ? ", lookup only"
           : o->quick     ? ", quick"
                          : "");
    if (!o->lookup_only)
        print_rates(o, run, s);
    for (size_t i = 0; i < N_LOOKUP; i++) {
        const lookup_result *k = &run->lookup[i], *r = &run->raw[i];
        printf("  lookup 128 keys, %2d client(s), GETs running: p50 %7.1f us, p99 %7.1f us; raw "
               "sockets p50 %7.1f us, p99 %7.1f us (p99 %.2f x raw)\n",
               lookup_clients[i], k->p50, k->p99, r->p50, r->p99, r->p99 > 0 ? k->p99 / r->p99 : 0);
    }
    printf("  %-24s p50 %.1f us, p99 %.1f us (one raw socket, nothing else running)\n",
           "lookup round trip", run->idle_p50, run->idle_p99);
    double arena_mib = size_mib(o->memory);
    printf("  %-24s %.1f MiB (arena %.0f MiB + %.1f MiB)\n", "kvf-store idle RSS", run->rss_mib,
           arena_mib, run->rss_mib - arena_mib);
    if (run->kvf_errors || run->redis_errors)
        printf("  errors: kvfabric %d, redis %d keys failed\n", run->kvf_errors, run->redis_errors);
}

/* The rates as bars to png (Redis's where it ran); says so on stdout once written. */
static void plot_tcp(const char *png, int redis_ok, const bench_spread s[N_FIG])
{
    const char *labels[] = {"TCP ceiling 1 stream", "TCP ceiling N streams", "TCP ceiling N polled",
                            "kvf GET 256x64K",      "kvf PUT 256x64K",       "kvf GET 4x16M",
                            "kvf PUT 4x16M",        "redis GET 256x64K",     "redis SET 256x64K",
                            "redis GET 4x16M",      "redis SET 4x16M"};
    const int idx[] = {F_C1,   F_CN,   F_CP,   F_KG64, F_KP64, F_KG16,
                       F_KP16, F_RG64, F_RS64, F_RG16, F_RS16};
    double vals[11], lo[11], hi[11];
    for (int i = 0; i < 11; i++) {
        vals[i] = s[idx[i]].median;
        lo[i] = s[idx[i]].p10;
        hi[i] = s[idx[i]].p90;
    }
    int groups[] = {0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2};
    char title[200];
    snprintf(title, sizeof title,
             "kvf-bench store: loopback TCP, real, %d cores (ceilings grey, kvfabric blue, "
             "Redis red)",
             kvf__cores());
    bench_bars b = {
        .title = title,
        .ylabel = "GB/s (median of the rounds; whiskers 10th-90th percentile)",
        .note = "Ceilings: raw TCP with kvfabric's socket buffers: 1 stream, N streams (a thread "
                "each), N streams polled by one thread.\\nkvfabric uses N connections, so it can "
                "pass the 1-stream ceiling; on a busy host a median bar can also sit above\\n"
                "another shape's median. The ratios (get_vs_ceiling) compare each rate with the "
                "best ceiling measured just before and after it.",
        .labels = labels,
        .values = vals,
        .lo = lo,
        .hi = hi,
        .groups = groups,
        .n = redis_ok ? 11 : 7,
    };
    if (bench_plot_bars(png, &b) == 0)
        printf("  plot: %s\n", png);
}

static void add_tcp_figures(json_t *res, const opts *o, const tcp_run *run)
{
    json_object_set_new(res, "rounds", json_integer(o->rounds));
    json_object_set_new(res, "streams", json_integer(o->streams));
    json_object_set_new(res, "redis_connections", json_integer(run->redis_ok ? o->streams : 0));
    json_object_set_new(res, "store_threads", json_integer(o->store_threads));
    json_object_set_new(res, "io_threads", json_integer(o->io_threads));
    json_t *w = json_array();
    for (int i = 0; i < N_WRITES; i++)
        json_array_append_new(w, json_integer((json_int_t)ceiling_writes[i]));
    json_object_set_new(res, "ceiling_write_bytes", w);
    char k[64];
    for (size_t i = 0; i < N_LOOKUP; i++) {
        const char *sfx[2] = {"", "raw_"};
        for (int raw = 0; raw < 2; raw++) {
            const lookup_result *r = raw ? &run->raw[i] : &run->lookup[i];
            snprintf(k, sizeof k, "lookup128_%sp50_us_%dclients", sfx[raw], lookup_clients[i]);
            bench_json_real(res, k, r->p50);
            snprintf(k, sizeof k, "lookup128_%sp99_us_%dclients", sfx[raw], lookup_clients[i]);
            bench_json_real(res, k, r->p99);
            snprintf(k, sizeof k, "lookup128_%ssamples_%dclients", sfx[raw], lookup_clients[i]);
            json_object_set_new(res, k, json_integer((json_int_t)r->samples));
        }
        snprintf(k, sizeof k, "lookup128_p99_vs_raw_%dclients", lookup_clients[i]);
        bench_json_real(res, k, run->raw[i].p99 > 0 ? run->lookup[i].p99 / run->raw[i].p99 : 0);
    }
    bench_json_real(res, "lookup128_idle_raw_p50_us", run->idle_p50);
    bench_json_real(res, "lookup128_idle_raw_p99_us", run->idle_p99);
    bench_json_real(res, "store_rss_mib", run->rss_mib);
    bench_json_real(res, "store_arena_mib", size_mib(o->memory));
    json_object_set_new(res, "kvf_errors", json_integer(run->kvf_errors));
    json_object_set_new(res, "redis_errors", json_integer(run->redis_errors));
    if (run->redis_ok) {
        json_object_set_new(
            res, "redis_form",
            json_string("best of MGET/MSET and pipelined GET/SET, per measurement"));
        for (int i = 0; i < 4; i++) {
            snprintf(k, sizeof k, "redis_pipelined_best_rounds_%s", redis_forms[i]);
            json_object_set_new(res, k, json_integer(run->redis_pipelined_best[i]));
        }
    }
}

/* Before the rounds: PUTs of fresh 16 MiB objects until an arena's worth has gone through the
 * store, then as many bytes of GETs, untimed. The first gigabyte a new process moves through the
 * kernel runs at a tenth of the speed of the rest on a virtual machine whose host backs guest
 * memory only when it is first written (measured here: PUT 0.35 GB/s until then, 2.5-3 GB/s after,
 * and the same for a second client process; the first round's GET 4 x 16 MiB after PUTs alone:
 * 0.5 GB/s, the other rounds 4-6); a long-running store is past that, so the rounds measure it
 * past that too. */
static void warm_up(const opts *o, kvf_client *cl, workload *large)
{
    double want = size_mib(o->memory) * 1048576.0;
    bench_progress("store", "warm-up: %.0f MiB of PUTs, then of GETs, untimed", want / 1048576.0);
    for (int get = 0; get < 2; get++) {
        double moved = 0, t0 = bench_now();
        while (moved < want && bench_now() - t0 < 30) {
            int e;
            double secs = 0.25;
            moved += kvf_rate(cl, large, !get, secs, &e) * 1e9 * secs;
        }
    }
}

/* --transport tcp: the rounds of rates on one loopback store and a Redis beside it (where
 * redis-server is installed), the lookup latency and the store's idle RSS, printed and into res.
 * Returns the exit status: 1 where the store does not start or kvfabric failed keys. */
static int tcp_bench(const opts *o, json_t *res)
{
    json_object_set_new(res, "transport", json_string("tcp"));
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "cores", json_integer(kvf__cores()));
    bench_proc store = {0};
    char extra[64];
    snprintf(extra, sizeof extra, "--threads %d --rdma off", o->store_threads);
    kvf_client *cl = NULL;
    if (kvf_open(o, "127.0.0.1", extra, "tcp", &store, &cl) != 0)
        return 1;
    tcp_run run = {0};
    workload small, large;
    if (wl_init(&small, 256, 64 * 1024) != 0 || wl_init(&large, 4, 16u << 20) != 0) {
        fprintf(stderr, "kvf-bench store: out of memory\n");
        kvf_client_close(&cl);
        bench_stop(&store);
        return 1;
    }
    redis_peer *rp = redis_peer_open(o->streams);
    run.redis_ok = rp != NULL;
    if (!o->lookup_only) {
        warm_up(o, cl, &large);
        measure_rounds(o, cl, rp, &small, &large, &run);
    }
    redis_peer_close(&rp);
    kvf_client_close(&cl);
    lookup_latency(o, store.port, &run);
    usleep(300000);
    run.rss_mib = bench_rss_mib(store.pid);
    bench_stop(&store);
    wl_free(&small);
    wl_free(&large);

    bench_spread s[N_FIG] = {0};
    if (!o->lookup_only)
        summarize(o, &run, res, s);
    print_tcp(o, &run, s);
    if (o->plot && !o->lookup_only)
        plot_tcp(o->plot, run.redis_ok, s);
    add_tcp_figures(res, o, &run);
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
    int p = parse(argc, argv, &o);
    if (p != 0)
        return p > 0 ? 0 : 2;
    json_t *res = bench_result_new("store");
    json_object_set_new(res, "quick", json_boolean(o.quick));
    int rc = 0;
    char why[160] = "";
    if (o.sources) {
        rc = bench_store_sources(o.quick, o.store_threads, o.link_gbps, o.store_bin, o.json, res);
        bench_emit(res, o.json);
    } else if (o.near) {
        rc = bench_store_near(o.quick, o.store_threads, o.memory, o.store_bin, o.json, res);
        bench_emit(res, o.json);
    } else if (!strcmp(o.tier, "disk")) {
        rc = bench_store_tier(o.disk_dir, o.quick, o.memory, o.store_bin, o.store_threads,
                              o.disk_gather, o.disk_nice, o.dram_hot_mib, o.json, res);
        bench_emit(res, o.json);
    } else if (!strcmp(o.transport, "rdma") && kvf__rdma_available(why, sizeof why)) {
        json_object_set_new(res, "transport", json_string("rdma"));
        rc = rdma_bench(&o, res);
    } else if (!strcmp(o.transport, "tcp") && o.auth) {
        json_object_set_new(res, "transport", json_string("tcp"));
        json_object_set_new(res, "cores", json_integer(kvf__cores()));
        rc = bench_store_auth(o.streams, o.store_threads, o.memory, o.store_bin, o.quick, res);
        bench_emit(res, o.json);
    } else if (!strcmp(o.transport, "tcp")) {
        rc = tcp_bench(&o, res);
    } else if (!strcmp(o.transport, "shm")) {
        json_object_set_new(res, "transport", json_string("shm"));
        rc = bench_store_shm(o.quick, o.store_threads, o.memory, o.store_bin, o.json, res);
        bench_emit(res, o.json);
    } else {
        /* RDMA needs a device on this host and a build with the RDMA headers: why says which is
         * missing. */
        if (strcmp(o.transport, "rdma") != 0)
            snprintf(why, sizeof why, "unknown transport \"%s\" (tcp, shm or rdma)", o.transport);
        report_infeasible(&o, why, res);
    }
    json_decref(res);
    return rc;
}
