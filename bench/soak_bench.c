/*
 * kvf-bench soak: a storage node under put/get/evict churn while the host is driven toward a
 * memory-pressure target.
 *
 *   1. rest: churn with no ballast, to measure the store's latency at this host's own pressure;
 *   2. pressure: this process maps and touches anonymous "ballast" in 64 MiB pieces until
 *      kvf_telemetry_pressure() reaches the target (or --ballast-max, or a floor of free memory,
 *      stops it), releasing pieces when it overshoots;
 *   3. throughout: batched PUTs of fresh objects, batched GETs of recent ones, explicit evictions;
 *      every object read back is checked against the XXH3 of the bytes that were put, and an
 *      object that was evicted must never come back. Once a second: telemetry, the store's RSS
 *      and put/get latency go into a timeline.
 * With --auth the store requires credentials: the churn is one tenant, and a second tenant (the
 * rival, soak_rival.c) puts, reads and evicts its own objects under the churn's very keys and
 * namespace throughout; neither may ever read the other's bytes.
 * Fails (exit 1) on a wrong byte, a resurrected object, a transport error, or store RSS that grows
 * more than --rss-slack (64 MiB) over its idle RSS (arena included) or --rss-growth (32 MiB) after
 * the first second, when a leak under churn would show as steady growth. The ratio it reports is
 * GET p99 under pressure over GET p99 at rest, both measured in this run.
 */
#include "bench.h"
#include "bench_util.h"
#include "soak_rival.h"

#include "kvf/kvf.h"

#include "bytes.h"
#include "kvf/object.h"
#include "units.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xxhash.h>

#define LAYERS        4
#define BALLAST_PIECE (64ull << 20)
#define MAX_PIECES    4096
#define MAX_SAMPLES   4096
#define MAX_LAT       65536

typedef struct opts {
    double duration, target;
    uint64_t memory, object, ballast_max, floor, rss_slack, rss_growth;
    int batch, json;
    int auth; /* --auth: the store authenticates; a rival tenant works under the same keys */
    const char *memory_arg;
    const char *store_bin;
    const char *png;
} opts;

typedef struct slot {
    uint64_t id;   /* UINT64_MAX: empty */
    uint64_t hash; /* XXH3 of the object put */
    int evicted;
} slot;

typedef struct sample {
    double t, avail_mib, psi_some, psi_full, pressure, ballast_mib, store_rss_mib;
    double put_p50, put_p99, get_p50, get_p99, put_gbps, get_gbps;
    uint64_t hits, misses;
    int phase; /* 0 rest, 1 pressure */
} sample;

typedef struct ballast {
    void *piece[MAX_PIECES];
    int n; /* owned by the ballast thread */
    const opts *o;
    _Atomic int active, stop;
    _Atomic uint64_t bytes; /* read by the sampler */
    pthread_t th;
} ballast;

/* The options' limits, and the arena's size read from --memory. Returns 0, or -1 with the limit
 * that o breaks on stderr. */
static int check(opts *o)
{
    const char *why = NULL;
    if (kvf__parse_size(o->memory_arg, &o->memory) != 0 || o->memory < (16u << 20))
        why = "--memory must be a size of at least 16M";
    else if (!(o->duration >= 2 && o->duration <= 86400))
        why = "--duration must be 2..86400 seconds";
    else if (!(o->target > 0 && o->target <= 0.95))
        why = "--target-pressure must be in (0, 0.95]";
    else if (o->object < 4096 || o->object > (64u << 20) || o->object % LAYERS)
        why = "--object must be 4K..64M and a multiple of 4";
    else if (o->batch < 1 || o->batch > 256)
        why = "--batch must be 1..256";
    else if (o->object * (uint64_t)o->batch * 4 > o->memory)
        why = "--memory must hold at least four batches";
    else if (o->ballast_max / BALLAST_PIECE > MAX_PIECES)
        why = "--ballast-max is at most 256G";
    if (why) {
        fprintf(stderr, "kvf-bench soak: %s\n", why);
        return -1;
    }
    return 0;
}

/* Reads and checks the options. Returns 0; 1 after --help (the usage on stdout); or -1 with the
 * reason on stderr. */
static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){.duration = 30,
                .target = 0.5,
                .memory_arg = "256M",
                .object = 1u << 20,
                .batch = 16,
                .ballast_max = 8ull << 30,
                .floor = 1ull << 30,
                .rss_slack = 64ull << 20,
                .rss_growth = 32ull << 20};
    const kvf__arg args[] = {
        KVF__OPT("duration", KVF__ARG_REAL, &o->duration, "S",
                 "seconds in all, a fifth of them at rest", "30", .lo = 2, .hi = 86400),
        KVF__OPT("target-pressure", KVF__ARG_REAL, &o->target, "P",
                 "the memory pressure (kvf_telemetry_pressure) to reach, 0 < P <= 0.95", "0.5",
                 .lo = 1e-9, .hi = 0.95),
        KVF__OPT("memory", KVF__ARG_STR, &o->memory_arg, "SIZE", "the store's arena, at least 16M",
                 "256M"),
        KVF__OPT("object", KVF__ARG_SIZE, &o->object, "SIZE",
                 "bytes of one object, 4K..64M, a multiple of 4", "1M"),
        KVF__OPT("batch", KVF__ARG_INT, &o->batch, "N", "objects per request", "16", .lo = 1,
                 .hi = 256),
        KVF__OPT("ballast-max", KVF__ARG_SIZE, &o->ballast_max, "SIZE",
                 "the most ballast memory to map", "8G"),
        KVF__OPT("floor", KVF__ARG_SIZE, &o->floor, "SIZE",
                 "MemAvailable is never pushed below this", "1G"),
        KVF__OPT("rss-slack", KVF__ARG_SIZE, &o->rss_slack, "SIZE",
                 "the most the store's RSS may grow over its idle RSS", "64M"),
        KVF__OPT("rss-growth", KVF__ARG_SIZE, &o->rss_growth, "SIZE",
                 "the most it may grow after the first second", "32M"),
        KVF__OPT("auth", KVF__ARG_FLAG, &o->auth, NULL,
                 "the store authenticates (--auth); a second tenant puts, reads and evicts under "
                 "the same keys meanwhile",
                 NULL),
        KVF__OPT("png", KVF__ARG_STR, &o->png, "FILE", "a plot of the run (gnuplot)", NULL),
        KVF__OPT("store-bin", KVF__ARG_STR, &o->store_bin, "PATH", "the kvf-store to run",
                 "the one beside kvf-bench"),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
    };
    int rc = bench_args("soak", "[OPTIONS]",
                        "A store under memory pressure from ballast: every object it reports "
                        "present read back and verified, its latency and RSS watched "
                        "(docs/benchmarks.md).",
                        NULL, args, sizeof args / sizeof args[0], argc, argv);
    return rc == 0 ? check(o) : rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Ballast */

static uint64_t ballast_bytes(ballast *b)
{
    return atomic_load(&b->bytes);
}

/* Moves the ballast toward the target: adds or drops up to 1 GiB a step. One byte of every 4 KiB
 * page of a piece is written, so the pieces are resident (not the shared zero page) at the cost of
 * the page faults alone; transparent huge pages, where the kernel allows them, need one fault per
 * 2 MiB. Writing every byte instead took seconds a piece under ThreadSanitizer on a loaded host,
 * whose memset instruments each word. */
static void ballast_step(ballast *b, const kvf_telemetry *t)
{
    const opts *o = b->o;
    double p = kvf_telemetry_pressure(t);
    uint64_t base =
        t->have_cgroup && t->cgroup_limit < t->mem_total ? t->cgroup_limit : t->mem_total;
    uint64_t have = (uint64_t)b->n * BALLAST_PIECE;
    if (p < o->target) {
        uint64_t want = (uint64_t)((o->target - p) * (double)base);
        uint64_t room = t->mem_available > o->floor ? t->mem_available - o->floor : 0;
        uint64_t left = o->ballast_max > have ? o->ballast_max - have : 0;
        want = want < room ? want : room;
        want = want < left ? want : left;
        want = want < (1ull << 30) ? want : (1ull << 30);
        for (uint64_t k = 0; k < want / BALLAST_PIECE && b->n < MAX_PIECES; k++) {
            void *m = mmap(NULL, BALLAST_PIECE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                           -1, 0);
            if (m == MAP_FAILED)
                break;
            madvise(m, BALLAST_PIECE, MADV_HUGEPAGE);
            for (uint64_t off = 0; off < BALLAST_PIECE; off += 4096)
                ((volatile uint8_t *)m)[off] = 0xa5;
            b->piece[b->n++] = m;
            atomic_store(&b->bytes, (uint64_t)b->n * BALLAST_PIECE);
        }
    } else if (p > o->target + 0.03) {
        uint64_t drop = (uint64_t)((p - o->target) * (double)base);
        for (uint64_t k = 0; k < drop / BALLAST_PIECE + 1 && b->n > 0; k++)
            munmap(b->piece[--b->n], BALLAST_PIECE);
    }
    atomic_store(&b->bytes, (uint64_t)b->n * BALLAST_PIECE);
}

/* The ballast thread: steps every 100 ms while active, so the churn never waits on page faults. */
static void *ballast_main(void *arg)
{
    ballast *b = arg;
    while (!atomic_load(&b->stop)) {
        kvf_telemetry t;
        if (atomic_load(&b->active) && kvf_telemetry_read(&t) == 0)
            ballast_step(b, &t);
        usleep(100 * 1000);
    }
    while (b->n > 0)
        munmap(b->piece[--b->n], BALLAST_PIECE);
    atomic_store(&b->bytes, 0);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Objects: the payload of object id is a window of a random buffer chosen by id, so every object
 * differs and none costs more than a copy to make. */

static kvf_key soak_key(uint64_t id)
{
    kvf_key k = {.lo = kvf__fmix64(id ^ 0x50a4c0ffeeull), .hi = id};
    return k;
}

static void make_object(uint64_t id, const uint8_t *base, uint64_t seg, uint8_t *dst, size_t cap,
                        uint64_t *len)
{
    kvf_key k = soak_key(id);
    uint64_t off = (kvf__fmix64(id) % (seg * LAYERS)) & ~63ull;
    const void *segs[LAYERS];
    for (int l = 0; l < LAYERS; l++)
        segs[l] = base + off + (uint64_t)l * seg;
    size_t out = 0;
    kvf_obj_encode(&k, 1, 512, LAYERS, segs, seg, KVF_CODEC_NONE, dst, cap, &out, NULL);
    *len = out;
}

static double pct(double *v, size_t n, double q)
{
    return n ? bench_quantile(v, n, q) : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Plot */

static int plot(const char *png, const sample *s, int n, double target)
{
    char dat[] = "/tmp/kvf-bench-soak-XXXXXX";
    int fd = mkstemp(dat);
    if (fd < 0)
        return -1;
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < n; i++)
        fprintf(f, "%.2f %.4f %.4f %.3f %.3f %.3f %.1f\n", s[i].t, s[i].pressure,
                s[i].psi_some / 100.0, s[i].ballast_mib / 1024.0, s[i].get_p99, s[i].put_p99,
                s[i].store_rss_mib);
    fclose(f);
    FILE *g = popen("gnuplot", "w");
    if (!g) {
        unlink(dat);
        return -1;
    }
    fprintf(g,
            "set terminal pngcairo size 1000,720 font 'sans,10'\n"
            "set output '%s'\n"
            "set multiplot layout 2,1 title 'kvf-bench soak: store under put/get/evict churn "
            "while the host is pushed to pressure %.2f'\n"
            "set grid\n"
            "set key top left\n"
            "set ylabel 'pressure (0..1)'\n"
            "set yrange [0:1]\n"
            "set y2label 'ballast (GiB)'\n"
            "set y2tics\n"
            "set ytics nomirror\n"
            "plot '%s' using 1:2 with lines lw 2 title 'kvf pressure', "
            "'' using 1:3 with lines title 'PSI some avg10 / 100', "
            "%.3f with lines dt 2 lc rgb '#888888' title 'target', "
            "'' using 1:4 axes x1y2 with steps lc rgb '#2ca02c' title 'ballast GiB'\n"
            "unset y2label\n"
            "unset y2tics\n"
            "set ytics mirror\n"
            "set yrange [0:*]\n"
            "set xlabel 'seconds'\n"
            "set ylabel 'p99 latency of a batch (ms)'\n"
            "plot '%s' using 1:5 with linespoints pt 7 ps 0.5 title 'GET p99', "
            "'' using 1:6 with linespoints pt 5 ps 0.5 title 'PUT p99'\n"
            "unset multiplot\n",
            png, target, dat, target, dat);
    int rc = pclose(g);
    unlink(dat);
    if (rc != 0) {
        fprintf(stderr, "kvf-bench soak: gnuplot failed; is gnuplot installed?\n");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

typedef struct churn {
    const opts *o;
    kvf_client *cl;
    uint8_t *base;
    uint64_t seg, window, next_id;
    slot *ring;
    size_t cap;
    uint8_t **objs, **bufs;
    uint64_t *lens, *caps, *out_lens;
    kvf_key *keys;
    int *st;
    uint64_t rng;
    atomic_uint_fast64_t pub_next; /* next_id, for the rival's thread */
    soak_rival_totals rival;       /* --auth */
    /* totals */
    uint64_t verified, verified_bytes, mismatches, resurrected, errors, misses, evicted, puts;
    /* this second */
    double put_lat[MAX_LAT], get_lat[MAX_LAT];
    size_t n_put, n_get;
    uint64_t put_bytes, get_bytes, sec_hits, sec_misses;
} churn;

static uint64_t rnd(churn *c)
{
    c->rng = c->rng * 6364136223846793005ull + 1442695040888963407ull;
    return kvf__fmix64(c->rng);
}

static slot *slot_of(churn *c, uint64_t id)
{
    return &c->ring[id % c->window];
}

/* Runs a batched put or get and records its latency in this second's samples. */
static int timed(churn *c, const kvf_batch *req, int put)
{
    double t0 = bench_now();
    int rc = put ? kvf_client_put(c->cl, req) : kvf_client_get(c->cl, req);
    double ms = (bench_now() - t0) * 1e3;
    double *lat = put ? c->put_lat : c->get_lat;
    size_t *n = put ? &c->n_put : &c->n_get;
    if (*n < MAX_LAT)
        lat[(*n)++] = ms;
    return rc;
}

static void churn_put(churn *c)
{
    int b = c->o->batch;
    for (int i = 0; i < b; i++) {
        uint64_t id = c->next_id + (uint64_t)i;
        c->keys[i] = soak_key(id);
        make_object(id, c->base, c->seg, c->objs[i], c->cap, &c->lens[i]);
    }
    kvf_batch req = {.n = (size_t)b,
                     .keys = c->keys,
                     .objs = (const void *const *)c->objs,
                     .lens = c->lens,
                     .status = c->st};
    int rc = timed(c, &req, 1);
    for (int i = 0; i < b; i++) {
        uint64_t id = c->next_id + (uint64_t)i;
        slot *s = slot_of(c, id);
        if (rc == 0 && c->st[i] == 0) {
            *s = (slot){.id = id, .hash = XXH3_64bits(c->objs[i], c->lens[i])};
            c->put_bytes += c->lens[i];
            c->puts++;
        } else {
            *s = (slot){.id = UINT64_MAX};
            if (c->st[i] != KVF_ENOSPC)
                c->errors++;
        }
    }
    c->next_id += (uint64_t)b;
    atomic_store(&c->pub_next, c->next_id);
}

/* n ids among the recent window that the ring still describes. */
static int pick(churn *c, uint64_t *ids, int n)
{
    uint64_t lo = c->next_id > c->window ? c->next_id - c->window : 0;
    int k = 0;
    if (c->next_id == lo)
        return 0;
    for (int tries = 0; tries < 4 * n && k < n; tries++) {
        uint64_t id = lo + rnd(c) % (c->next_id - lo);
        slot *s = slot_of(c, id);
        if (s->id != id)
            continue;
        int dup = 0;
        for (int j = 0; j < k; j++)
            dup |= ids[j] == id;
        if (!dup)
            ids[k++] = id;
    }
    return k;
}

static void churn_get(churn *c)
{
    uint64_t ids[256];
    int n = pick(c, ids, c->o->batch);
    if (n == 0)
        return;
    for (int i = 0; i < n; i++)
        c->keys[i] = soak_key(ids[i]);
    kvf_batch req = {.n = (size_t)n,
                     .keys = c->keys,
                     .bufs = (void *const *)c->bufs,
                     .caps = c->caps,
                     .out_lens = c->out_lens,
                     .status = c->st};
    int rc = timed(c, &req, 0);
    for (int i = 0; i < n; i++) {
        slot *s = slot_of(c, ids[i]);
        if (rc != 0) {
            c->errors++;
        } else if (c->st[i] == 0) {
            if (s->evicted)
                c->resurrected++;
            else if (XXH3_64bits(c->bufs[i], c->out_lens[i]) != s->hash)
                c->mismatches++;
            else {
                c->verified++;
                c->verified_bytes += c->out_lens[i];
                c->get_bytes += c->out_lens[i];
                c->sec_hits++;
            }
        } else if (c->st[i] == KVF_ENOENT) {
            c->misses++;
            c->sec_misses++;
            s->id = UINT64_MAX; /* gone (evicted by the store): stop asking */
        } else {
            c->errors++;
        }
    }
}

static void churn_evict(churn *c)
{
    uint64_t ids[256];
    int n = pick(c, ids, c->o->batch / 4 + 1);
    for (int i = 0; i < n; i++)
        c->keys[i] = soak_key(ids[i]);
    if (n == 0 || kvf_client_evict(c->cl, (size_t)n, c->keys, c->st, 0) != 0) {
        c->errors += n > 0;
        return;
    }
    for (int i = 0; i < n; i++)
        if (c->st[i] == 0 || c->st[i] == KVF_ENOENT) {
            slot_of(c, ids[i])->evicted = 1;
            c->evicted += c->st[i] == 0;
        }
}

static int churn_init(churn *c, const opts *o, kvf_client *cl)
{
    memset(c, 0, sizeof *c);
    c->o = o;
    c->cl = cl;
    c->seg = o->object / LAYERS;
    c->cap = kvf_obj_raw_size(LAYERS, c->seg);
    c->window = 2 * (o->memory / o->object) + (uint64_t)o->batch;
    c->rng = 0x5eed;
    c->base = malloc(2 * o->object);
    c->ring = malloc(c->window * sizeof *c->ring);
    int b = o->batch;
    c->objs = calloc((size_t)b, sizeof *c->objs);
    c->bufs = calloc((size_t)b, sizeof *c->bufs);
    c->lens = calloc((size_t)b, sizeof *c->lens);
    c->caps = calloc((size_t)b, sizeof *c->caps);
    c->out_lens = calloc((size_t)b, sizeof *c->out_lens);
    c->keys = calloc((size_t)b, sizeof *c->keys);
    c->st = calloc((size_t)b, sizeof *c->st);
    if (!c->base || !c->ring || !c->objs || !c->bufs || !c->lens || !c->caps || !c->out_lens ||
        !c->keys || !c->st)
        return -1;
    for (uint64_t i = 0; i < 2 * o->object; i++)
        c->base[i] = (uint8_t)(rnd(c) >> 56);
    for (uint64_t i = 0; i < c->window; i++)
        c->ring[i] = (slot){.id = UINT64_MAX};
    for (int i = 0; i < b; i++) {
        c->objs[i] = malloc(c->cap);
        c->bufs[i] = malloc(c->cap);
        c->caps[i] = c->cap;
        if (!c->objs[i] || !c->bufs[i])
            return -1;
    }
    return 0;
}

static void churn_free(churn *c)
{
    for (int i = 0; c->o && c->objs && i < c->o->batch; i++) {
        free(c->objs[i]);
        free(c->bufs[i]);
    }
    free(c->base);
    free(c->ring);
    free(c->objs);
    free(c->bufs);
    free(c->lens);
    free(c->caps);
    free(c->out_lens);
    free(c->keys);
    free(c->st);
}

static void take_sample(churn *c, sample *s, double t, double dt, ballast *b,
                        const kvf_telemetry *tel, pid_t store, int phase)
{
    *s = (sample){.t = t,
                  .avail_mib = (double)tel->mem_available / 1048576.0,
                  .psi_some = tel->psi_some_avg10,
                  .psi_full = tel->psi_full_avg10,
                  .pressure = kvf_telemetry_pressure(tel),
                  .ballast_mib = (double)ballast_bytes(b) / 1048576.0,
                  .store_rss_mib = bench_rss_mib(store),
                  .put_p50 = pct(c->put_lat, c->n_put, 0.5),
                  .put_p99 = pct(c->put_lat, c->n_put, 0.99),
                  .get_p50 = pct(c->get_lat, c->n_get, 0.5),
                  .get_p99 = pct(c->get_lat, c->n_get, 0.99),
                  .put_gbps = (double)c->put_bytes / dt / 1e9,
                  .get_gbps = (double)c->get_bytes / dt / 1e9,
                  .hits = c->sec_hits,
                  .misses = c->sec_misses,
                  .phase = phase};
    c->n_put = c->n_get = 0;
    c->put_bytes = c->get_bytes = c->sec_hits = c->sec_misses = 0;
}

static json_t *sample_json(const sample *s)
{
    return json_pack("{s:f, s:s, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, "
                     "s:I, s:I}",
                     "t", s->t, "phase", s->phase ? "pressure" : "rest", "mem_available_mib",
                     s->avail_mib, "psi_some_avg10", s->psi_some, "psi_full_avg10", s->psi_full,
                     "pressure", s->pressure, "ballast_mib", s->ballast_mib, "store_rss_mib",
                     s->store_rss_mib, "put_p50_ms", s->put_p50, "put_p99_ms", s->put_p99,
                     "get_p50_ms", s->get_p50, "get_p99_ms", s->get_p99, "put_gbps", s->put_gbps,
                     "get_gbps", s->get_gbps, "hits", (json_int_t)s->hits, "misses",
                     (json_int_t)s->misses);
}

/* The median over samples of one phase of a per-second figure. */
static double phase_median(const sample *s, int n, int phase, size_t field_off)
{
    double v[MAX_SAMPLES];
    size_t k = 0;
    for (int i = 0; i < n; i++)
        if (s[i].phase == phase)
            v[k++] = *(const double *)((const char *)&s[i] + field_off);
    return pct(v, k, 0.5);
}

/* The plan on stderr (tel: the host as it is before the soak) and the timeline's header. */
static void announce(const opts *o, const kvf_telemetry *tel)
{
    double rest = o->duration / 5;
    bench_progress("soak",
                   "store arena %s, %" PRIu64 " KiB objects in batches of %d; %.0f s at rest, "
                   "then %.0f s at pressure %.2f (now %.2f)",
                   o->memory_arg, o->object >> 10, o->batch, rest, o->duration - rest, o->target,
                   kvf_telemetry_pressure(tel));
    printf("  %6s %6s %9s %7s %8s %9s %9s %8s %8s %8s %8s %6s %6s\n", "t(s)", "phase", "avail MiB",
           "PSI%", "pressure", "ballast", "store RSS", "put p99", "get p99", "put GB/s", "get GB/s",
           "hits", "misses");
}

/* The soak itself: churn for o->duration seconds, the first fifth at rest and the rest with the
 * ballast thread pushing toward the target, with a sample taken (and printed as a row) once a
 * second. tel holds the telemetry read last. Returns the samples taken; *reached_at is when the
 * pressure first came within 0.02 of the target, or -1. */
static int churn_phases(churn *c, ballast *bal, kvf_telemetry *tel, pid_t store, sample *samples,
                        double *reached_at)
{
    const opts *o = c->o;
    double rest = o->duration / 5;
    int ns = 0, iter = 0;
    double t0 = bench_now(), last = t0;
    *reached_at = -1;
    while (bench_now() - t0 < o->duration && ns < MAX_SAMPLES) {
        churn_put(c);
        churn_get(c);
        if (++iter % 4 == 0)
            churn_evict(c);
        double now = bench_now();
        if (now - last < 1.0)
            continue;
        int phase = last - t0 >= rest; /* a sample belongs to the phase its second began in */
        kvf_telemetry_read(tel);
        take_sample(c, &samples[ns], now - t0, now - last, bal, tel, store, phase);
        const sample *s = &samples[ns++];
        if (phase && *reached_at < 0 && s->pressure >= o->target - 0.02)
            *reached_at = s->t;
        printf("  %6.1f %6s %9.0f %7.2f %8.3f %7.0fM %8.0fM %6.1fms %6.1fms %8.2f %8.2f %6" PRIu64
               " %6" PRIu64 "\n",
               s->t, phase ? "press" : "rest", s->avail_mib, s->psi_some, s->pressure,
               s->ballast_mib, s->store_rss_mib, s->put_p99, s->get_p99, s->put_gbps, s->get_gbps,
               s->hits, s->misses);
        fflush(stdout);
        if (now - t0 >= rest)
            atomic_store(&bal->active, 1);
        last = bench_now();
    }
    return ns;
}

/* What the run comes to, from its samples and the churn's totals. */
typedef struct summary {
    double rss_idle, rss_first, rss_max, arena_mib; /* MiB */
    double ballast_max_mib, pressure_max, reached_at;
    double get_rest, get_press, put_rest, put_press; /* medians of the per-second p99s, ms */
    int rss_bounded, ok;
} summary;

static void summarize(const opts *o, const churn *c, const sample *s, int ns, double rss_idle,
                      double reached_at, summary *sum)
{
    *sum = (summary){.rss_idle = rss_idle,
                     .rss_first = ns ? s[0].store_rss_mib : -1,
                     .arena_mib = (double)o->memory / 1048576.0,
                     .reached_at = reached_at};
    for (int i = 0; i < ns; i++) {
        sum->rss_max = s[i].store_rss_mib > sum->rss_max ? s[i].store_rss_mib : sum->rss_max;
        if (s[i].ballast_mib > sum->ballast_max_mib)
            sum->ballast_max_mib = s[i].ballast_mib;
        if (s[i].pressure > sum->pressure_max)
            sum->pressure_max = s[i].pressure;
    }
    /* RSS: the arena is preallocated and touched, so churn must not grow the store much beyond its
     * idle RSS; a leak under churn shows as steady growth after the first second. */
    sum->rss_bounded = ns > 0 && rss_idle > 0 &&
                       sum->rss_max - rss_idle <= (double)o->rss_slack / 1048576.0 &&
                       sum->rss_max - sum->rss_first <= (double)o->rss_growth / 1048576.0;
    sum->get_rest = phase_median(s, ns, 0, offsetof(sample, get_p99));
    sum->get_press = phase_median(s, ns, 1, offsetof(sample, get_p99));
    sum->put_rest = phase_median(s, ns, 0, offsetof(sample, put_p99));
    sum->put_press = phase_median(s, ns, 1, offsetof(sample, put_p99));
    sum->ok = c->mismatches == 0 && c->resurrected == 0 && c->errors == 0 && sum->rss_bounded &&
              c->verified > 0 && c->rival.mismatches == 0 && c->rival.errors == 0 &&
              (!o->auth || c->rival.verified > 0);
}

static void print_summary(const opts *o, const churn *c, const summary *sum)
{
    printf("\n  verified %" PRIu64 " objects (%.2f GiB) read back: %" PRIu64 " wrong, %" PRIu64
           " resurrected after evict; %" PRIu64 " misses (evicted by the store), %" PRIu64
           " explicit evictions, %" PRIu64 " errors\n",
           c->verified, (double)c->verified_bytes / (1u << 30), c->mismatches, c->resurrected,
           c->misses, c->evicted, c->errors);
    if (o->auth)
        printf("  authenticated; the rival tenant, under the same keys: %" PRIu64 " puts, %" PRIu64
               " of its own objects verified, %" PRIu64 " wrong, %" PRIu64 " evictions, %" PRIu64
               " errors\n",
               c->rival.puts, c->rival.verified, c->rival.mismatches, c->rival.evictions,
               c->rival.errors);
    printf("  store RSS %.0f MiB idle, %.0f MiB after 1 s, %.0f MiB max (arena %.0f MiB): %s\n",
           sum->rss_idle, sum->rss_first, sum->rss_max, sum->arena_mib,
           sum->rss_bounded ? "bounded" : "NOT bounded");
    printf("  pressure target %.2f: %s (max %.3f, ballast up to %.0f MiB)\n", o->target,
           sum->reached_at >= 0 ? "reached" : "not reached", sum->pressure_max,
           sum->ballast_max_mib);
    printf("  GET p99 median %.2f ms at rest, %.2f ms under pressure (%.2f x); PUT p99 %.2f / "
           "%.2f ms\n",
           sum->get_rest, sum->get_press, sum->get_rest > 0 ? sum->get_press / sum->get_rest : 0,
           sum->put_rest, sum->put_press);
}

/* The JSON result: the options, the timeline and the summary. Caller owns it (json_decref()). */
static json_t *result_json(const opts *o, const churn *c, const sample *s, int ns,
                           const summary *sum)
{
    json_t *res = bench_result_new("soak");
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "config",
                        json_pack("{s:f, s:f, s:s, s:I, s:i, s:I, s:I, s:I, s:I}", "duration_s",
                                  o->duration, "target_pressure", o->target, "memory",
                                  o->memory_arg, "object_bytes", (json_int_t)o->object, "batch",
                                  o->batch, "ballast_max_bytes", (json_int_t)o->ballast_max,
                                  "floor_bytes", (json_int_t)o->floor, "rss_slack_bytes",
                                  (json_int_t)o->rss_slack, "rss_growth_bytes",
                                  (json_int_t)o->rss_growth));
    json_object_set_new(
        res, "auth",
        o->auth
            ? json_pack("{s:b, s:I, s:I, s:I, s:I, s:I}", "on", 1, "rival_puts",
                        (json_int_t)c->rival.puts, "rival_verified", (json_int_t)c->rival.verified,
                        "rival_mismatches", (json_int_t)c->rival.mismatches, "rival_evictions",
                        (json_int_t)c->rival.evictions, "rival_errors", (json_int_t)c->rival.errors)
            : json_pack("{s:b}", "on", 0));
    json_t *tl = json_array();
    for (int i = 0; i < ns; i++)
        json_array_append_new(tl, sample_json(&s[i]));
    json_object_set_new(res, "timeline", tl);
    json_object_set_new(
        res, "summary",
        json_pack(
            "{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:f, s:f, s:f, s:b, s:b, s:f, s:f, "
            "s:f, s:f, s:f, s:f, s:b}",
            "puts", (json_int_t)c->puts, "verified", (json_int_t)c->verified, "verified_bytes",
            (json_int_t)c->verified_bytes, "checksum_mismatches", (json_int_t)c->mismatches,
            "resurrected", (json_int_t)c->resurrected, "errors", (json_int_t)c->errors, "misses",
            (json_int_t)c->misses, "explicit_evictions", (json_int_t)c->evicted,
            "store_rss_idle_mib", sum->rss_idle, "store_rss_first_mib", sum->rss_first,
            "store_rss_max_mib", sum->rss_max, "arena_mib", sum->arena_mib, "rss_bounded",
            sum->rss_bounded, "target_reached", sum->reached_at >= 0, "reached_at_s",
            sum->reached_at, "pressure_max", sum->pressure_max, "ballast_max_mib",
            sum->ballast_max_mib, "get_p99_rest_ms", sum->get_rest, "get_p99_pressure_ms",
            sum->get_press, "get_p99_pressure_vs_rest",
            sum->get_rest > 0 ? sum->get_press / sum->get_rest : 0.0, "ok", sum->ok));
    return res;
}

/* Prints the summary, plots the timeline where asked and emits the JSON result. Returns whether
 * the soak passed: sum->ok, and a JSON result that could be built. */
static int report(const opts *o, const churn *c, const sample *s, int ns, const summary *sum)
{
    int ok = sum->ok;
    print_summary(o, c, sum);
    json_t *res = result_json(o, c, s, ns, sum);
    if (!json_object_get(res, "summary") || !json_object_get(res, "config")) {
        fprintf(stderr, "kvf-bench soak: internal error: cannot build the JSON result\n");
        ok = 0;
    }
    if (o->png && plot(o->png, s, ns, o->target) == 0) {
        bench_progress("soak", "plot written to %s", o->png);
        json_object_set_new(res, "png", json_string(o->png));
    }
    bench_emit(res, o->json);
    json_decref(res);
    return ok;
}

int bench_soak_main(int argc, char **argv)
{
    opts o;
    int prc = parse(argc, argv, &o);
    if (prc != 0)
        return prc > 0 ? 0 : 2;
    kvf_telemetry tel;
    if (kvf_telemetry_read(&tel) != 0) {
        fprintf(stderr, "kvf-bench soak: cannot read this host's memory telemetry\n");
        return 1;
    }
    bench_proc store = {0};
    kvf_client *cl = NULL;
    kvf_client_opts co = {.ns = 0x50a4ull, .conns_per_node = 2, .deadline_ms = 30000};
    char dir[] = "/tmp/kvf-soak-auth-XXXXXX", tenants[128], cred[128], rival_cred[128],
         extra[200] = "";
    const char *names[2] = {"soak", "rival"};
    if (o.auth) {
        if (!mkdtemp(dir) || bench_auth_make(dir, names, 2, tenants, sizeof tenants) != 0)
            return 1;
        snprintf(cred, sizeof cred, "%s/soak.cred", dir);
        snprintf(rival_cred, sizeof rival_cred, "%s/rival.cred", dir);
        snprintf(extra, sizeof extra, "--auth %s", tenants);
        co.credential = cred;
    }
    if (bench_store_client_open("soak", &store, o.store_bin, o.memory_arg, extra, "127.0.0.1", &co,
                                &cl) != 0) {
        if (o.auth)
            bench_auth_remove(dir, names, 2);
        return 1;
    }
    soak_rival *rival = NULL;
    /* The store's RSS before any churn: its arena (touched at start) plus its runtime, and under
     * a sanitizer that runtime's shadow memory. Growth beyond it is what the soak bounds. */
    double rss_idle = bench_rss_mib(store.pid);
    int ok = 0;
    churn *c = calloc(1, sizeof *c);
    sample *samples = calloc(MAX_SAMPLES, sizeof *samples);
    ballast *bal = calloc(1, sizeof *bal);
    if (!c || !samples || !bal || churn_init(c, &o, cl) != 0) {
        fprintf(stderr, "kvf-bench soak: out of memory\n");
        goto out_free_churn;
    }
    bal->o = &o;
    if (pthread_create(&bal->th, NULL, ballast_main, bal) != 0) {
        fprintf(stderr, "kvf-bench soak: cannot start the ballast thread\n");
        goto out_free_churn;
    }
    char node[64];
    snprintf(node, sizeof node, "127.0.0.1:%u", store.port);
    soak_rival_opts ro = {.node = node,
                          .credential = rival_cred,
                          .ns = co.ns,
                          .key_of = soak_key,
                          .next_id = &c->pub_next,
                          .window = c->window,
                          .object_bytes = o.object,
                          .layers = LAYERS,
                          .batch = o.batch / 4 + 1};
    if (o.auth && soak_rival_start(&rival, &ro) != 0) {
        atomic_store(&bal->stop, 1);
        pthread_join(bal->th, NULL);
        goto out_free_churn;
    }
    announce(&o, &tel);
    double reached_at;
    int ns = churn_phases(c, bal, &tel, store.pid, samples, &reached_at);
    soak_rival_stop(&rival, &c->rival);
    atomic_store(&bal->stop, 1);
    pthread_join(bal->th, NULL);
    summary sum;
    summarize(&o, c, samples, ns, rss_idle, reached_at, &sum);
    ok = report(&o, c, samples, ns, &sum);
out_free_churn:
    if (c)
        churn_free(c);
    free(c);
    free(samples);
    free(bal);
    kvf_client_close(&cl);
    bench_stop(&store);
    if (o.auth)
        bench_auth_remove(dir, names, 2);
    if (!ok)
        fprintf(stderr, "kvf-bench soak: FAILED (see the summary above)\n");
    return ok ? 0 : 1;
}
