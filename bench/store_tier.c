/*
 * kvf-bench store --tier disk: kvf-store's disk tier through the daemon, against fio on the same
 * file system in the same run (docs/benchmarks.md, "kvf-bench store --tier disk"). Real, on this
 * machine's file system.
 *
 * Per object size (16 MiB objects read 4 to a GET, 64 KiB objects 256 to a GET):
 *   demotion: 8x the arena is put over TCP; eviction demotes what it pushes out. The demotion
 *     write rate is the bytes the tier wrote over its writers' time in the engine's writes
 *     (STATS' write_seconds); disk_put_vs_fio divides it by fio writing with the object's block
 *     size, io_uring, O_DIRECT, queue depth 1 (the tier's own depth per device). Beside it, the
 *     bytes demoted over the whole put stream (demote_stream_vs_fio: bounded by the puts too) and
 *     the evictions not demoted because the queue was full;
 *   GET from disk: batches of the oldest objects (long out of DRAM) are read back, each a
 *     promotion (the disk read, then the reply from DRAM); disk_get_vs_fio divides the median
 *     batch rate (the GET's own time; every byte is compared after it) by fio reading the tier's
 *     own file (read-only, the same block size, one read in flight; after the GETs), as the
 *     issue asks; disk_get_vs_fio_own_file by fio reading a file it had just written (this
 *     figure's definition before 2026-12-06), and the raw io_uring job on both; each GET's split
 *     (its objects' mean read, the readers' concurrency, the time outside the read, the loop's
 *     wait and run again) from the store's STATS before and after it;
 *   DRAM under disk I/O: GETs of a hot set in DRAM alone, then while another client reads old
 *     objects back from disk as fast as they come (promotions, whose room evicts and so demotes
 *     as much): dram_get_under_disk_io_vs_alone; then, the control, while that other client reads
 *     DRAM at the rate it read the promotions (dram_get_under_dram_reader_vs_alone): the same
 *     second reader without disk I/O; their ratio (dram_get_under_disk_io_vs_under_dram_reader)
 *     is what the tier itself costs the DRAM path, apart from the second reader's bytes. The
 *     three phases run as triplets, three times (shorter with --quick), and each ratio is the
 *     median of its triplets' own (since 2026-12-07; one phase of each before);
 *   warm restart: the store stopped and started again on its disk: the time to its ready line
 *     (warm_restart_s, the index rebuilt from the log), then every object it reports read back
 *     and compared byte for byte (wrong: 0 expected), with the store's own verification failures.
 */
#include "bench.h"
#include "bench_util.h"
#include "store_bench.h"

#include "kvf/error.h"

#include "units.h"

#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TIER_ROUNDS 9
/* The DRAM figures' triplets (alone, under disk I/O, under a DRAM reader). */
#define DRAM_TRIPLETS 3

typedef struct shape {
    const char *name;
    uint64_t payload; /* object bytes (about) */
    size_t batch;     /* keys per request */
} shape;

static const shape shapes[2] = {{"16m", 16u << 20, 4}, {"64k", 64u << 10, 256}};

/* A figure of the store's disk object in STATS; -1 where absent. */
static double disk_stat(kvf_client *c, const char *key)
{
    char *js = NULL;
    double v = -1;
    if (kvf_client_stats(c, 0, &js, 10000) != 0)
        return -1;
    json_t *j = json_loads(js, 0, NULL);
    json_t *x = json_object_get(json_object_get(j, "disk"), key);
    if (json_is_number(x))
        v = json_number_value(x);
    json_decref(j);
    free(js);
    return v;
}

/* Waits (bounded: 120 s) until no demotion is queued. */
static void settle(kvf_client *c)
{
    for (int i = 0; i < 2400 && disk_stat(c, "pending_bytes") > 0; i++)
        usleep(50000);
}

/* Puts batch b of w under round r (keys fresh per round). Returns the batch's failed keys. */
static int put_round(kvf_client *c, workload *w, uint64_t r)
{
    wl_rekey(w, r);
    kvf_batch b = {.n = w->n,
                   .keys = w->keys,
                   .objs = (const void *const *)w->objs,
                   .lens = w->lens,
                   .status = w->st};
    int rc = kvf_client_put(c, &b), bad = 0;
    for (size_t i = 0; i < w->n; i++)
        bad += rc || w->st[i];
    return bad;
}

/* Gets round r's keys. *hit gets the bytes that came back; *wrong counts objects that came back
 * different from what was put (the objects differ only by key: the client verified each);
 * *secs (where given) the GET's own time, without the keys' making or that comparison, which
 * are the benchmark's work (the DRAM figures never compare). */
static int get_round(kvf_client *c, workload *w, uint64_t r, uint64_t *hit, int *wrong,
                     double *secs)
{
    wl_rekey(w, r);
    double t0 = bench_now();
    int rc = wl_get(c, w);
    if (secs)
        *secs = bench_now() - t0;
    *hit = 0;
    for (size_t i = 0; !rc && i < w->n; i++) {
        if (w->st[i] == 0) {
            *hit += w->out_lens[i];
            if (wrong &&
                (w->out_lens[i] != w->lens[i] || memcmp(w->bufs[i], w->objs[i], w->lens[i]) != 0))
                (*wrong)++;
        } else if (wrong && w->st[i] != KVF_ENOENT) {
            (*wrong)++;
        }
    }
    return rc;
}

/* A second client reading in the background, for the DRAM-under-load figures: promotions from
 * disk (promoter), or, the control, DRAM at a given rate (paced_reader). */
typedef struct bg_reader {
    kvf_client *c;
    workload w;
    uint64_t r_lo, r_hi; /* promoter: the rounds it reads back, r_hi exclusive ... */
    uint64_t next;       /* ... from this one on (0: r_lo), and where it stopped, after it */
    uint64_t h_lo, h_hi; /* paced_reader: the rounds it reads (in DRAM) ... */
    double gbps;         /* ... at this rate */
    atomic_int stop;
    _Atomic uint64_t bytes;
} bg_reader;

/* Reads rounds r_lo..r_hi back, round after round, as fast as they come: 8x the arena, so nearly
 * every one is a promotion from disk, whose room in DRAM evicts (and demotes what is not on disk
 * yet). */
static void *promoter(void *p)
{
    bg_reader *a = p;
    uint64_t r = a->next >= a->r_lo && a->next < a->r_hi ? a->next : a->r_lo;
    for (; !atomic_load(&a->stop); r = r + 1 < a->r_hi ? r + 1 : a->r_lo) {
        uint64_t hit = 0;
        get_round(a->c, &a->w, r, &hit, NULL, NULL);
        atomic_fetch_add(&a->bytes, hit);
    }
    a->next = r; /* the next phase reads on from here: a round read back once is not kept */
    return NULL;
}

/* The control of the DRAM-under-disk-I/O figure: the second client reading DRAM (round r) at the
 * rate the promotions were read (gbps), so that what the machine spends on a second reader's
 * bytes (its socket, its copies) is the same without any disk I/O. */
static void *paced_reader(void *p)
{
    bg_reader *a = p;
    double t0 = bench_now();
    for (uint64_t r = a->h_lo; !atomic_load(&a->stop); r = r < a->h_hi ? r + 1 : a->h_lo) {
        uint64_t hit = 0;
        get_round(a->c, &a->w, r, &hit, NULL, NULL);
        uint64_t b = atomic_fetch_add(&a->bytes, hit) + hit;
        double ahead = (double)b / (a->gbps * 1e9) - (bench_now() - t0);
        if (ahead > 0)
            usleep((useconds_t)(ahead < 0.5 ? ahead * 1e6 : 500000));
    }
    return NULL;
}

/* Each GET's time of a DRAM-rate measurement (bounded: the first LAT_MAX), for its quantiles: a
 * batch is as slow as its slowest part, so a second client's load on one of the store's loops
 * shows in the upper quantiles before the median. */
#define LAT_MAX 8192
typedef struct batch_times {
    double s[LAT_MAX];
    size_t n;
    uint64_t short_gets; /* GETs that brought back less than a whole batch (a key missing) */
} batch_times;

/* Moves the values above 0 of v[0..n) to its front, in order; returns how many there are. */
static size_t positive(double *v, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (v[i] > 0)
            v[k++] = v[i];
    return k;
}

/* GB/s of GETs of rounds r_lo..r_hi (in DRAM), one after another, over secs; each GET's time
 * into *lat where given. */
static double dram_rate(kvf_client *c, workload *w, uint64_t r_lo, uint64_t r_hi, double secs,
                        batch_times *lat)
{
    uint64_t bytes = 0, r = r_lo;
    double t0 = bench_now();
    do {
        uint64_t hit = 0;
        double one = 0;
        get_round(c, w, r, &hit, NULL, &one);
        r = r < r_hi ? r + 1 : r_lo;
        bytes += hit;
        if (lat && lat->n < LAT_MAX)
            lat->s[lat->n++] = one;
        if (lat && hit < w->n * w->obj_bytes)
            lat->short_gets++;
    } while (bench_now() - t0 < secs);
    return (double)bytes / (bench_now() - t0) / 1e9;
}

/* The GETs' p50 and p90 in ms as key_p50 / key_p90 (none where no GET was timed). */
static void json_batch_times(json_t *res, const char *key, batch_times *lat)
{
    if (!lat->n)
        return;
    char k[128];
    bench_sort(lat->s, lat->n);
    snprintf(k, sizeof k, "%s_p50", key);
    bench_json_real(res, k, bench_quantile_sorted(lat->s, lat->n, 0.5) * 1e3);
    snprintf(k, sizeof k, "%s_p90", key);
    bench_json_real(res, k, bench_quantile_sorted(lat->s, lat->n, 0.9) * 1e3);
}

static kvf_client *client_to(const bench_proc *p)
{
    char addr[64], err[256];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", p->port);
    const char *nodes[1] = {addr};
    kvf_client_opts co = {
        .nodes = nodes, .n_nodes = 1, .ns = STORE_NS, .transport = "tcp", .deadline_ms = 60000};
    kvf_client *c = NULL;
    if (kvf_client_open(&c, &co, err, sizeof err) != 0)
        fprintf(stderr, "kvf-bench store: %s\n", err);
    return c;
}

/* GB/s of c's GETs of rounds hot_lo..hot_hi (in DRAM) while a's client (open, or NULL: -1)
 * reads in fn on a thread of its own; *during gets that client's GB/s over the same time. */
static double dram_rate_beside(kvf_client *c, workload *w, uint64_t hot_lo, uint64_t hot_hi,
                               double secs, const shape *sh, bg_reader *a, void *(*fn)(void *),
                               double *during, batch_times *lat)
{
    double rate = -1;
    *during = 0;
    if (a->c && wl_init(&a->w, sh->batch, sh->payload) == 0) {
        pthread_t t;
        pthread_create(&t, NULL, fn, a);
        usleep(200000);
        uint64_t b0 = atomic_load(&a->bytes);
        double u0 = bench_now();
        rate = dram_rate(c, w, hot_lo, hot_hi, secs, lat);
        *during = (double)(atomic_load(&a->bytes) - b0) / (bench_now() - u0) / 1e9;
        atomic_store(&a->stop, 1);
        pthread_join(t, NULL);
        wl_free(&a->w);
    }
    kvf_client_close(&a->c);
    return rate;
}

/* A read ceiling measured for the GETs from disk of objects named obj (-1: not measured, nothing
 * set): its rate as <name>_gbps_<obj>, and the GETs' rate got against it as
 * disk_get_vs_<vs>_<obj>. */
static void json_get_ceiling(json_t *res, const char *obj, const char *name, const char *vs,
                             double ceiling, double got)
{
    if (ceiling <= 0)
        return;
    char k[128];
    snprintf(k, sizeof k, "%s_gbps_%s", name, obj);
    bench_json_real(res, k, ceiling);
    snprintf(k, sizeof k, "disk_get_vs_%s_%s", vs, obj);
    bench_json_real(res, k, got / ceiling);
}

/* What bench_store_tier was asked (store_bench.h), for each object size. */
typedef struct tier_opts {
    const char *dir, *bin;
    uint64_t arena;
    int quick, threads, gather_us, nice, hot_mib, have_fio, json;
} tier_opts;

/* One object size through a store of o->arena bytes on a disk file in o->dir. 0, or -1 (said). */
static int tier_shape(const shape *sh, const tier_opts *o, json_t *res)
{
    const char *dir = o->dir, *bin = o->bin;
    uint64_t arena = o->arena;
    int quick = o->quick, have_fio = o->have_fio, json = o->json;
    char extra[4700], file[4200], mem[32], gather[80] = "";
    snprintf(file, sizeof file, "%s/kvf-bench-tier.%d.dat", dir, (int)getpid());
    snprintf(mem, sizeof mem, "%" PRIu64 "M", arena >> 20);
    uint64_t total = 8 * arena;
    if (o->gather_us >= 0)
        snprintf(gather, sizeof gather, " --disk-gather-us %d", o->gather_us);
    if (o->nice > 0)
        snprintf(gather + strlen(gather), sizeof gather - strlen(gather), " --disk-nice %d",
                 o->nice);
    /* --disk-promote 255: an object read back stays in DRAM from its 255th read on, so that the
     * promoter, which may come round its range again over the DRAM triplets where the arena is
     * small and the disk fast, reads from disk every time and keeps nothing (a second read back
     * kept in DRAM under the default 2 evicted the hot set: a quick run with a 256 MiB arena
     * had 49 short GETs) */
    snprintf(extra, sizeof extra,
             "--no-prefault --shm off --threads %d --disk-promote 255 --disk %s:%" PRIu64 "M%s",
             o->threads, file, (total + total / 4 + (256u << 20)) >> 20, gather);
    workload w;
    if (wl_init(&w, sh->batch, sh->payload) != 0) {
        fprintf(stderr, "kvf-bench store: out of memory\n");
        return -1;
    }
    uint64_t per_round = w.n * w.obj_bytes, rounds = total / per_round;
    /* The DRAM readers' set: the last rounds put, hot_mib of them (256 MiB by default, at most a
     * quarter of the arena; one round at least). Before 2026-12-06 (seventh session) it was one
     * round (64 MiB of 16 MiB objects, 16 MiB of 64 KiB ones), which a server's last-level cache
     * may hold: "alone" then read the CPU's cache, and anything beside it that evicted the set
     * cost more than its own bytes. */
    uint64_t hot_bytes = o->hot_mib > 0 ? (uint64_t)o->hot_mib << 20 : 256u << 20;
    /* whatever was asked, at most a quarter of the rounds the arena holds (the rest is room for
     * the promotions and the demotion queue), and so never one the promoter reads */
    uint64_t n_hot = hot_bytes / per_round, hot_max = arena / per_round / 4;
    n_hot = n_hot > hot_max ? hot_max : n_hot;
    n_hot = n_hot < 1 ? 1 : n_hot;
    /* the promoter's rounds, up to r_cold (exclusive): those put before the arena's worth of the
     * last ones (on disk) */
    uint64_t in_dram = arena / per_round + 1;
    uint64_t r_cold = rounds > in_dram + 1 ? rounds - in_dram : 2;
    bench_proc p;
    int rc = -1;
    kvf_client *c = NULL;
    batch_times *lat = NULL; /* the DRAM GETs' times (below) */
    unlink(file);
    if (bench_start_store(&p, bin, mem, extra) != 0)
        goto out;
    if (!(c = client_to(&p)))
        goto out_stop;

    /* demotion */
    bench_progress("store", "disk %s: putting %" PRIu64 " MiB (8x the arena)", sh->name,
                   total >> 20);
    double t0 = bench_now();
    int put_bad = 0;
    for (uint64_t r = 1; r <= rounds; r++)
        put_bad += put_round(c, &w, r);
    settle(c);
    double t_demote = bench_now() - t0;
    int64_t demoted = (int64_t)disk_stat(c, "demoted_bytes");
    int64_t dropped = (int64_t)disk_stat(c, "demote_dropped_full");
    /* large objects written straight from the arena (page-aligned), no copy */
    int64_t direct = (int64_t)disk_stat(c, "written_direct");
    double demote_gbps = (double)demoted / t_demote / 1e9;
    /* the tier's writers' own rate: the demoted bytes over their time in the engine's writes */
    double wsecs = disk_stat(c, "write_seconds");
    double write_gbps = wsecs > 0 ? (double)demoted / wsecs / 1e9 : -1;
    /* the reads in order (the ceiling) and in a random order: a GET's objects lie where
     * their demotions put them, among other requests' and other rounds', so its reads are
     * scattered over the log, and a device's random reads may be slower than its sequential ones */
    double fio_w = have_fio ? bench_fio_rate(dir, "write", sh->payload, total / 2) : -1;
    double fio_rr = have_fio ? bench_fio_rate(dir, "randread", sh->payload, total / 2) : -1;
    double fio_r = have_fio ? bench_fio_rate(dir, "read", sh->payload, total / 2) : -1;
#if KVF_HAVE_URING
    /* the same jobs by kvf-bench itself: the ceiling on hosts without fio, and beside fio's */
    double raw_w = bench_uring_rate(dir, "write", sh->payload, total / 2);
    double raw_rr = bench_uring_rate(dir, "randread", sh->payload, total / 2);
    double raw_r = bench_uring_rate(dir, "read", sh->payload, total / 2);
#else
    double raw_w = -1, raw_r = -1, raw_rr = -1;
#endif

    /* GETs from disk: the oldest rounds, each once */
    double gets[TIER_ROUNDS];
    int ng = 0, wrong = 0;
    /* the promotions' room evicts, and what it evicts is written unless the disk holds it
     * already: the bytes demoted meanwhile say whether the GETs' reads shared the device with
     * writes (the ceilings above are reads alone) */
    double dem0 = disk_stat(c, "demoted_bytes");
    double gwall = 0, got_bytes = 0;
    /* Each counted GET's own split (the STATS asked between GETs, outside their time): its
     * objects' mean read (the reader's time in the device's reads, per object read back), the
     * readers' mean concurrency over the GET, and the GET's time outside that mean read (what a
     * GET adds to its reads: the dispatch to the readers, the reply, the client's checks) */
    double g_read_ms[TIER_ROUNDS], g_conc[TIER_ROUNDS], g_outside_ms[TIER_ROUNDS];
    double g_prom_ms[TIER_ROUNDS], g_lag_ms[TIER_ROUNDS], g_rerun_ms[TIER_ROUNDS];
    double c_rsec = 0, c_reads = 0, c_promoted = 0, c_psec = 0; /* the counted GETs' */
    uint64_t r_got = 0; /* the last round the GETs from disk read (in DRAM for a while after) */
    for (uint64_t r = 1; r <= rounds / 2 && ng < (quick ? 3 : TIER_ROUNDS); r++) {
        r_got = r;
        uint64_t hit = 0;
        double secs = 0;
        double rs_a = disk_stat(c, "read_seconds"), pr_a = disk_stat(c, "promoted"),
               rd_a = disk_stat(c, "promote_reads"), ps_a = disk_stat(c, "promote_seconds"),
               fl_a = disk_stat(c, "finish_lag_seconds"), rr_a = disk_stat(c, "rerun_seconds"),
               pf_a = disk_stat(c, "promotions_finished");
        int bad = get_round(c, &w, r, &hit, &wrong, &secs) != 0;
        double d_rs = disk_stat(c, "read_seconds") - rs_a, d_pr = disk_stat(c, "promoted") - pr_a,
               d_rd = disk_stat(c, "promote_reads") - rd_a,
               d_ps = disk_stat(c, "promote_seconds") - ps_a,
               d_fl = disk_stat(c, "finish_lag_seconds") - fl_a,
               d_rr = disk_stat(c, "rerun_seconds") - rr_a,
               d_pf = disk_stat(c, "promotions_finished") - pf_a;
        got_bytes += (double)hit; /* every round's promotions may evict */
        if (bad || hit < per_round / 2 || secs <= 0)
            continue; /* a batch the tier did not keep (dropped when its queue was full) */
        g_read_ms[ng] = d_rd > 0 ? d_rs / d_rd * 1e3 : -1;
        g_conc[ng] = d_rs / secs;
        g_outside_ms[ng] = d_rd > 0 ? secs * 1e3 - d_rs / d_rd * 1e3 : -1;
        /* per promotion (a request's share of the GET: the tier's time from its submission to
         * its last key, then the loop's wait and its run again) */
        g_prom_ms[ng] = d_pf > 0 ? d_ps / d_pf * 1e3 : -1;
        g_lag_ms[ng] = d_pf > 0 ? d_fl / d_pf * 1e3 : -1;
        g_rerun_ms[ng] = d_pf > 0 ? d_rr / d_pf * 1e3 : -1;
        c_rsec += d_rs, c_reads += d_rd, c_promoted += d_pr, c_psec += d_ps;
        gets[ng++] = (double)hit / secs / 1e9;
        gwall += secs;
    }
    settle(c); /* the demotions the last evictions queued, written */
    double written_during = disk_stat(c, "demoted_bytes") - dem0;
    /* objects a disk read brought back: neighbours in the log read at once (1: one read each) */
    int64_t read_direct = (int64_t)disk_stat(c, "read_direct"); /* into DRAM entries, no copy */
    double per_read = c_reads > 0 ? c_promoted / c_reads : -1;
    /* where a GET from disk's time goes: the readers' time in the device's reads (slot waits and
     * checks included) per read, how many readers were reading on average, and how many
     * promotions (a request's share of a batch) were under way on average */
    double us_per_read = c_reads > 0 ? c_rsec / c_reads * 1e6 : -1;
    double readers_busy = gwall > 0 ? c_rsec / gwall : -1,
           promotions_busy = gwall > 0 ? c_psec / gwall : -1;

    /* The ceiling for those GETs: fio reading the tier's own file (the region the
     * oldest rounds were demoted to first) with the object's size as block size, one read in
     * flight, after the GETs (so that whatever they left in a cache helps fio, not the tier);
     * and the raw job on it too. fio's own fresh file (fio_r above) is kept beside it. */
    /* the region: half the bytes put, or those demoted where fewer (the file is allocated whole,
     * and a region never written would read as zeros without the device) */
    uint64_t region = demoted > 0 && (uint64_t)demoted < total / 2 ? (uint64_t)demoted : total / 2;
    region = region / sh->payload * sh->payload;
    double fio_tf = have_fio ? bench_fio_rate_jobs(file, "read", sh->payload, region, 1, 1, 1) : -1;
    /* and in the tier's own shape (store/disk_int.h, store/tier_int.h): 2 MiB pieces, up to 8 of a
     * large object in flight, four readers; 64 KiB objects one to a read, four readers (the tier
     * also reads neighbours in the log together, up to 4 MiB an I/O: not modelled here). What
     * the device gives that much parallelism: a ceiling above the issue's */
    int big = sh->payload > (2u << 20);
    double fio_ts = have_fio ? bench_fio_rate_jobs(file, "read", big ? 2u << 20 : sh->payload,
                                                   region, big ? 8 : 1, 4, 1)
                             : -1;
#if KVF_HAVE_URING
    double raw_tf = bench_uring_rate_file(file, "read", sh->payload, region);
#else
    double raw_tf = -1;
#endif

    /* DRAM GETs alone, under disk reads and writes, and under a second DRAM reader, in triplets
     * one after another: each ratio is its triplet's own and the figure their median, so that the
     * host's drift over the minute falls on both sides of every ratio (one phase of each, the
     * 16-core host's 16 MiB GETs alone read 10.8, 14.3 and 18.4 GB/s in three runs, and the
     * ratio followed its denominator). */
    uint64_t hot = rounds - n_hot + 1; /* the last rounds put: in DRAM */
    lat = calloc(3, sizeof *lat);      /* alone, under disk I/O, under a DRAM reader */
    dram_rate(c, &w, hot, rounds, 0.3, NULL);
    const int nt = DRAM_TRIPLETS;    /* three, so that the median is one of them */
    double secs = quick ? 0.4 : 1.0; /* a phase */
    double al[DRAM_TRIPLETS], un[DRAM_TRIPLETS], ud[DRAM_TRIPLETS], io[DRAM_TRIPLETS],
        du[DRAM_TRIPLETS], r_ua[DRAM_TRIPLETS], r_da[DRAM_TRIPLETS], r_ud[DRAM_TRIPLETS];
    size_t n_ua = 0, n_da = 0, n_ud = 0;
    double alone_reads = 0;
    /* the promoter starts after the rounds the GETs from disk just read, and each of its phases
     * reads on where the last stopped */
    uint64_t r_lo = r_got + 1 < r_cold ? r_got + 1 : 1, next = r_lo;
    for (int k = 0; k < nt; k++) {
        /* a key of the set that had left DRAM would be promoted and answered whole: the tier's
         * reads while the set is read alone say whether it stayed (0 expected) */
        double before = disk_stat(c, "promote_reads");
        al[k] = dram_rate(c, &w, hot, rounds, secs, lat ? &lat[0] : NULL);
        alone_reads += disk_stat(c, "promote_reads") - before;
        bg_reader la = {.r_lo = r_lo, .r_hi = r_cold, .next = next};
        la.c = client_to(&p);
        un[k] = dram_rate_beside(c, &w, hot, rounds, secs, sh, &la, promoter, &io[k],
                                 lat ? &lat[1] : NULL);
        next = la.next;
        /* the control: the same bytes read by a second client from DRAM, no disk I/O */
        bg_reader pa = {.h_lo = hot, .h_hi = rounds, .gbps = io[k]};
        pa.c = io[k] > 0 ? client_to(&p) : NULL;
        ud[k] = dram_rate_beside(c, &w, hot, rounds, secs, sh, &pa, paced_reader, &du[k],
                                 lat ? &lat[2] : NULL);
        if (al[k] > 0 && un[k] > 0)
            r_ua[n_ua++] = un[k] / al[k];
        if (al[k] > 0 && ud[k] > 0)
            r_da[n_da++] = ud[k] / al[k];
        if (ud[k] > 0 && un[k] > 0)
            r_ud[n_ud++] = un[k] / ud[k];
    }
    /* the rates of the phases that ran (a failed one's -1 is left out) */
    size_t n_al = positive(al, (size_t)nt), n_un = positive(un, (size_t)nt),
           n_io = positive(io, (size_t)nt), n_ud2 = positive(ud, (size_t)nt),
           n_du = positive(du, (size_t)nt);
    double alone = n_al ? bench_spread_of(al, n_al).median : -1,
           under = n_un ? bench_spread_of(un, n_un).median : -1,
           io_gbps = n_io ? bench_spread_of(io, n_io).median : 0,
           under_dram = n_ud2 ? bench_spread_of(ud, n_ud2).median : -1,
           dram_during = n_du ? bench_spread_of(du, n_du).median : 0;
    settle(c);
    int64_t on_disk = (int64_t)disk_stat(c, "entries");
    kvf_client_close(&c);

    /* warm restart */
    bench_stop(&p);
    double r0 = bench_now();
    if (bench_start_store(&p, bin, mem, extra) != 0)
        goto out;
    double warm = bench_now() - r0;
    if (!(c = client_to(&p)))
        goto out_stop;
    int64_t rebuilt = (int64_t)disk_stat(c, "rebuilt_entries");
    int wrong_after = 0;
    uint64_t back = 0;
    for (uint64_t r = 1; r <= rounds; r++) {
        uint64_t hit = 0;
        get_round(c, &w, r, &hit, &wrong_after, NULL);
        back += hit;
    }
    int64_t vfail = (int64_t)disk_stat(c, "verify_failures");

    char k[96];
#define KEY(fmt) (snprintf(k, sizeof k, fmt, sh->name), k)
    bench_json_real(res, KEY("demote_gbps_%s"), demote_gbps);
    json_object_set_new(res, KEY("dram_hot_bytes_%s"),
                        json_integer((json_int_t)(n_hot * per_round)));
    if (per_read > 0) {
        bench_json_real(res, KEY("disk_get_objects_per_read_%s"), per_read);
        bench_json_real(res, KEY("disk_get_read_us_%s"), us_per_read);
        bench_json_real(res, KEY("disk_get_readers_busy_%s"), readers_busy);
        bench_json_real(res, KEY("disk_get_promotions_busy_%s"), promotions_busy);
        bench_json_rounds(res, KEY("disk_get_obj_read_ms_%s"), g_read_ms, (size_t)ng);
        bench_json_rounds(res, KEY("disk_get_read_concurrency_%s"), g_conc, (size_t)ng);
        bench_json_rounds(res, KEY("disk_get_outside_read_ms_%s"), g_outside_ms, (size_t)ng);
        bench_json_rounds(res, KEY("disk_get_promotion_ms_%s"), g_prom_ms, (size_t)ng);
        bench_json_rounds(res, KEY("disk_get_finish_lag_ms_%s"), g_lag_ms, (size_t)ng);
        bench_json_rounds(res, KEY("disk_get_rerun_ms_%s"), g_rerun_ms, (size_t)ng);
    }
    /* bytes demoted while the GETs from disk ran, per byte they read back */
    if (got_bytes > 0)
        bench_json_real(res, KEY("disk_get_demoted_per_byte_read_%s"), written_during / got_bytes);
    bench_json_real(res, KEY("demote_write_gbps_%s"), write_gbps);
    json_object_set_new(res, KEY("demoted_bytes_%s"), json_integer(demoted));
    json_object_set_new(res, KEY("demote_dropped_full_%s"), json_integer(dropped));
    json_object_set_new(res, KEY("demoted_direct_%s"), json_integer(direct));
    json_object_set_new(res, KEY("promoted_direct_%s"), json_integer(read_direct));
    json_object_set_new(res, KEY("put_failures_%s"), json_integer(put_bad));
    bench_spread g = bench_json_rounds(res, KEY("disk_get_gbps_%s"), gets, (size_t)ng);
    /* rates: the median phase of each kind; ratios: the median of the triplets' own, with the
     * triplets' values (_rounds) and spread */
    bench_json_rounds(res, KEY("dram_get_alone_gbps_%s"), al, n_al);
    bench_json_rounds(res, KEY("dram_get_under_disk_io_gbps_%s"), un, n_un);
    bench_json_real(res, KEY("disk_io_during_gbps_%s"), io_gbps);
    double ua =
        n_ua ? bench_json_rounds(res, KEY("dram_get_under_disk_io_vs_alone_%s"), r_ua, n_ua).median
             : -1;
    if (!n_ua)
        bench_json_real(res, KEY("dram_get_under_disk_io_vs_alone_%s"), -1);
    if (n_da) {
        bench_json_real(res, KEY("dram_get_under_dram_reader_gbps_%s"), under_dram);
        bench_json_real(res, KEY("dram_reader_during_gbps_%s"), dram_during);
        bench_json_rounds(res, KEY("dram_get_under_dram_reader_vs_alone_%s"), r_da, n_da);
        /* the disk tier's own cost: below 1 only by what its I/O takes beyond a second reader */
        if (n_ud)
            bench_json_rounds(res, KEY("dram_get_under_disk_io_vs_under_dram_reader_%s"), r_ud,
                              n_ud);
    }
    bench_json_real(res, KEY("warm_restart_s_%s"), warm);
    json_object_set_new(res, KEY("disk_entries_%s"), json_integer(on_disk));
    json_object_set_new(res, KEY("rebuilt_entries_%s"), json_integer(rebuilt));
    json_object_set_new(res, KEY("read_back_bytes_after_restart_%s"), json_integer((int64_t)back));
    json_object_set_new(res, KEY("wrong_%s"), json_integer(wrong + wrong_after));
    json_object_set_new(res, KEY("verify_failures_%s"), json_integer(vfail));
    json_object_set_new(res, KEY("dram_alone_disk_reads_%s"),
                        json_integer((json_int_t)alone_reads));
    if (lat) {
        /* GETs not answered whole (a key the tier could not serve, or gone): 0 expected */
        json_object_set_new(
            res, KEY("dram_get_short_%s"),
            json_integer((json_int_t)(lat[0].short_gets + lat[1].short_gets + lat[2].short_gets)));
        json_batch_times(res, KEY("dram_get_ms_alone_%s"), &lat[0]);
        json_batch_times(res, KEY("dram_get_ms_under_disk_io_%s"), &lat[1]);
        json_batch_times(res, KEY("dram_get_ms_under_dram_reader_%s"), &lat[2]);
    }
    if (fio_w > 0 && fio_r > 0) {
        bench_json_real(res, KEY("fio_write_gbps_%s"), fio_w);
        bench_json_real(res, KEY("fio_read_gbps_%s"), fio_r);
        bench_json_real(res, KEY("disk_put_vs_fio_%s"), write_gbps / fio_w);
        bench_json_real(res, KEY("demote_stream_vs_fio_%s"), demote_gbps / fio_w);
        /* against fio reading a file it had just written: not the ceiling (below) */
        bench_json_real(res, KEY("disk_get_vs_fio_own_file_%s"), g.median / fio_r);
    }
    /* the figure: fio reading the tier's own file */
    json_get_ceiling(res, sh->name, "fio_read_tier_file", "fio", fio_tf, g.median);
    json_get_ceiling(res, sh->name, "fio_read_tier_shape", "fio_tier_shape", fio_ts, g.median);
    json_get_ceiling(res, sh->name, "raw_read_tier_file", "raw_tier_file", raw_tf, g.median);
    json_get_ceiling(res, sh->name, "fio_randread", "fio_randread", fio_rr, g.median);
    json_get_ceiling(res, sh->name, "raw_randread", "raw_randread", raw_rr, g.median);
    if (raw_w > 0 && raw_r > 0) {
        bench_json_real(res, KEY("raw_write_gbps_%s"), raw_w);
        bench_json_real(res, KEY("raw_read_gbps_%s"), raw_r);
        bench_json_real(res, KEY("disk_put_vs_raw_%s"), write_gbps / raw_w);
        bench_json_real(res, KEY("disk_get_vs_raw_%s"), g.median / raw_r);
    }
#undef KEY
    FILE *out = json ? stderr : stdout; /* with --json, stdout is the JSON alone */
    fprintf(out, "%s objects: demotion writes %.2f GB/s", sh->name, write_gbps);
    if (fio_w > 0)
        fprintf(out, " (%.2fx fio's write %.2f)", write_gbps / fio_w, fio_w);
    if (raw_w > 0)
        fprintf(out, " (%.2fx raw io_uring's %.2f)", write_gbps / raw_w, raw_w);
    fprintf(out,
            " (%.2f GB/s of the put stream, %" PRId64 " evictions not demoted: queue full; %" PRId64
            " written straight from the arena)",
            demote_gbps, dropped, direct);
    fprintf(out, ", GET from disk %.2f GB/s", g.median);
    if (fio_tf > 0)
        fprintf(out, " (%.2fx fio's read of the tier's file %.2f)", g.median / fio_tf, fio_tf);
    if (fio_r > 0)
        fprintf(out, " (%.2fx fio's read of its own file %.2f)", g.median / fio_r, fio_r);
    if (fio_ts > 0)
        fprintf(out, " (%.2fx fio's read of the tier's file in the tier's shape %.2f)",
                g.median / fio_ts, fio_ts);
    if (raw_tf > 0)
        fprintf(out, " (%.2fx raw io_uring's of the tier's file %.2f)", g.median / raw_tf, raw_tf);
    if (raw_r > 0)
        fprintf(out, " (%.2fx raw io_uring's %.2f)", g.median / raw_r, raw_r);
    if (raw_rr > 0)
        fprintf(out, " (%.2fx its random reads' %.2f)", g.median / raw_rr, raw_rr);
    fprintf(out,
            "\n  DRAM GET %.2f GB/s alone, %.2f GB/s while %.2f GB/s are promoted (%.2fx, the "
            "median of %d triplets' own); warm restart %.2f s (%" PRId64 " objects), %d wrong, "
            "%" PRId64 " verification failures\n",
            alone, under, io_gbps, ua, nt, warm, rebuilt, wrong + wrong_after, vfail);
    rc = wrong + wrong_after ? -1 : 0;
    if (rc)
        fprintf(stderr, "kvf-bench store: %d object(s) read back wrong\n", wrong + wrong_after);
    kvf_client_close(&c);
out_stop:
    bench_stop(&p);
out:
    unlink(file);
    wl_free(&w);
    free(lat);
    return rc;
}

int bench_store_tier(const char *dir, int quick, const char *memory, const char *bin, int threads,
                     int gather_us, int nice, int hot_mib, int json, json_t *res)
{
    /* the store's loops: two at least, one for each client (the DRAM reader and the promoter) */
    threads = threads < 2 ? 2 : threads;
    json_object_set_new(res, "store_threads", json_integer(threads));
    if (gather_us >= 0)
        json_object_set_new(res, "disk_gather_us", json_integer(gather_us));
    json_object_set_new(res, "disk_nice", json_integer(nice));
    uint64_t arena = 0;
    if (kvf__parse_size(memory, &arena) != 0 || arena < (64u << 20)) {
        fprintf(stderr, "kvf-bench store --tier disk: --memory of 64M at least\n");
        return -1;
    }
    int have_fio = bench_fio_present();
    json_object_set_new(res, "tier", json_string("disk"));
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "dir", json_string(dir));
    json_object_set_new(res, "arena_bytes", json_integer((json_int_t)arena));
    json_object_set_new(res, "what",
                        json_string("kvf-store with --disk on a file in dir, over TCP on "
                                    "loopback; fio with the object's block size, io_uring, "
                                    "O_DIRECT, queue depth 1, in the same run, and the same "
                                    "job by kvf-bench itself (raw_*: io_uring from one "
                                    "aligned buffer)"));
    if (!have_fio)
        json_object_set_new(res, "fio", json_string("not installed: ratios to raw_* only"));
    tier_opts o = {.dir = dir,
                   .bin = bin,
                   .arena = arena,
                   .quick = quick,
                   .threads = threads,
                   .gather_us = gather_us,
                   .nice = nice,
                   .hot_mib = hot_mib,
                   .have_fio = have_fio,
                   .json = json};
    for (int s = 0; s < 2; s++)
        if (tier_shape(&shapes[s], &o, res) != 0)
            return -1;
    return 0;
}
