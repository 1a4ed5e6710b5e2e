/*
 * kvf-bench disk: the disk tier's storage engine (store/disk.c) alone, against fio on the same
 * file system in the same run (docs/benchmarks.md, "kvf-bench disk"). Real, on this machine.
 *
 * For 16 MiB and 64 KiB objects (the chunk sizes of issue #22's targets): the engine puts
 * --total bytes of them from page-aligned memory and flushes (demotion's path from the arena),
 * then gets them all back one by one, then again in batches of a store GET's keys (4 and 256)
 * into page-aligned buffers (promotion's path), with every checksum verified; fio writes and
 * reads a file of the same size with the block size of the object, io_uring, O_DIRECT, queue
 * depth 1 (the engine's). Rates in GB/s, the median of the rounds with their spread;
 * engine_put_vs_fio and engine_get_vs_fio are the ratios, round by round (each round runs the
 * engine and fio back to back), their median and spread. kvf-bench store --tier disk measures
 * the same through kvf-store (the targets' figures).
 */
#include "bench.h"
#include "bench_util.h"

#include "kvf/error.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#if KVF_HAVE_URING
#include "disk.h"
#include "units.h"

#define MAX_ROUNDS 9

typedef struct opts {
    const char *dir;
    uint64_t total;
    int rounds, json, quick;
} opts;

static void fill(uint64_t i, uint8_t *b, uint64_t len)
{
    uint64_t s = i * 0x9E3779B97F4A7C15ull + 3;
    for (uint64_t k = 0; k + 8 <= len; k += 8) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        memcpy(b + k, &s, 8);
    }
}

/* Gets of the n objects of len in batches of batch (kvf__disk_get_many, as kvf-store's
 * promotions read a GET's keys) into page-aligned buffers (as its arena's entries): a run of
 * small records in one read, a large paged record straight into its buffer. 0 or an error. */
static int get_batches(kvf__disk *d, uint64_t n, uint64_t len, uint32_t batch, uint8_t *r)
{
    enum { MAXB = 256 };
    kvf_key keys[MAXB];
    void *bufs[MAXB];
    uint64_t caps[MAXB], lens[MAXB];
    int st[MAXB], rc = 0;
    for (uint64_t i = 0; i < n && !rc; i += batch) {
        uint32_t m = (uint32_t)(n - i < batch ? n - i : batch);
        for (uint32_t j = 0; j < m; j++) {
            keys[j] = (kvf_key){.lo = i + j + 1, .hi = len};
            bufs[j] = r + (uint64_t)j * len, caps[j] = len;
        }
        rc = kvf__disk_get_many(d, 1, m, keys, bufs, caps, lens, st);
        for (uint32_t j = 0; j < m && !rc; j++) {
            uint64_t first;
            memcpy(&first, bufs[j], sizeof first);
            rc = st[j] ? st[j] : lens[j] != len || first != i + j ? KVF_ECHECKSUM : 0;
        }
    }
    return rc;
}

/* The engine: put n objects of len from page-aligned memory (as kvf-store demotes from its
 * arena), flush; then get them all one by one, then again in batches of batch. Rates in GB/s of
 * object bytes; -1 on a failure (said). */
static int engine_round(const opts *o, uint64_t len, uint32_t batch, double *put_gbps,
                        double *get_gbps, double *batch_gbps)
{
    char path[4200], err[300];
    snprintf(path, sizeof path, "%s/kvf-bench-disk.%d.dat", o->dir, (int)getpid());
    uint64_t n = o->total / len;
    kvf__disk_opts dop = {.path = path, .size = (2 * n + 8) * (len + 8192) + (64ull << 20)};
    kvf__disk *d = NULL;
    int rc = kvf__disk_open(&d, &dop, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvf-bench disk: %s\n", err);
        unlink(path);
        return -1;
    }
    uint8_t *b = NULL, *r = NULL;
    if (posix_memalign((void **)&b, 4096, len) || posix_memalign((void **)&r, 4096, len * batch)) {
        fprintf(stderr, "kvf-bench disk: out of memory\n");
        kvf__disk_close(&d);
        unlink(path);
        free(b);
        return -1;
    }
    fill(7, b, len);
    double t0 = bench_now();
    for (uint64_t i = 0; i < n && !rc; i++) {
        kvf_key k = {.lo = i + 1, .hi = len};
        memcpy(b, &i, sizeof i); /* each object its own bytes */
        rc = kvf__disk_put(d, 1, &k, b, len);
    }
    if (!rc)
        rc = kvf__disk_flush(d);
    double t1 = bench_now();
    for (uint64_t i = 0; i < n && !rc; i++) {
        kvf_key k = {.lo = i + 1, .hi = len};
        uint64_t got = 0;
        rc = kvf__disk_get(d, 1, &k, r, len, &got);
        uint64_t first;
        memcpy(&first, r, sizeof first);
        if (!rc && (got != len || first != i))
            rc = KVF_ECHECKSUM;
    }
    double t2 = bench_now();
    if (!rc)
        rc = get_batches(d, n, len, batch, r);
    double t3 = bench_now();
    kvf__disk_close(&d);
    unlink(path);
    free(b);
    free(r);
    if (rc) {
        fprintf(stderr, "kvf-bench disk: the engine failed: %s\n", kvf_err_name(rc));
        return -1;
    }
    *put_gbps = (double)(n * len) / (t1 - t0) / 1e9;
    *get_gbps = (double)(n * len) / (t2 - t1) / 1e9;
    *batch_gbps = (double)(n * len) / (t3 - t2) / 1e9;
    return 0;
}

static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){.dir = ".", .total = 512ull << 20, .rounds = 3};
    const kvf__arg args[] = {
        KVF__OPT("dir", KVF__ARG_STR, &o->dir, "DIR",
                 "where the files go: a file system that takes O_DIRECT (not tmpfs)", "."),
        KVF__OPT("total", KVF__ARG_SIZE, &o->total, "SIZE", "bytes written and read per shape",
                 "512M; 128M with --quick", .lo = 16 << 20, .hi = 1e13),
        KVF__OPT("rounds", KVF__ARG_INT, &o->rounds, "N", "rounds (the median is reported)", "3",
                 .lo = 1, .hi = MAX_ROUNDS),
        KVF__OPT("quick", KVF__ARG_FLAG, &o->quick, NULL, "smaller and fewer (CI)", NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
    };
    int rc = bench_args("disk", "[OPTIONS]",
                        "The disk tier's storage engine alone (put and flush, get with every "
                        "checksum verified) against fio on the same file system with the same "
                        "block size and queue depth, in the same run (docs/benchmarks.md).",
                        NULL, args, sizeof args / sizeof args[0], argc, argv);
    if (rc == 0 && o->quick) {
        o->total = o->total == 512ull << 20 ? 128ull << 20 : o->total;
        o->rounds = 1;
    }
    return rc;
}

int bench_disk_main(int argc, char **argv)
{
    opts o;
    int p = parse(argc, argv, &o);
    if (p != 0)
        return p > 0 ? 0 : 2;
    json_t *res = bench_result_new("disk");
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "what",
                        json_string("the disk tier's engine alone, not through "
                                    "kvf-store; fio with the same block size, "
                                    "io_uring, O_DIRECT, queue depth 1; raw_*: the same job "
                                    "by kvf-bench itself (io_uring from one aligned buffer)"));
    json_object_set_new(res, "total_bytes", json_integer((json_int_t)o.total));
    int have_fio = bench_fio_present();
    if (!have_fio)
        json_object_set_new(res, "fio", json_string("not installed: ratios to raw_* only"));
    static const struct {
        uint64_t len;
        uint32_t batch; /* kvf-bench store --tier disk's keys per GET */
        const char *name;
    } shapes[] = {{16u << 20, 4, "16m"}, {64u << 10, 256, "64k"}};
    int rc = 0;
    for (size_t s = 0; s < 2 && !rc; s++) {
        double put[MAX_ROUNDS], get[MAX_ROUNDS], gb[MAX_ROUNDS], fw[MAX_ROUNDS], fr[MAX_ROUNDS];
        double rw[MAX_ROUNDS], rr[MAX_ROUNDS];
        for (int r = 0; r < o.rounds && !rc; r++) {
            if (engine_round(&o, shapes[s].len, shapes[s].batch, &put[r], &get[r], &gb[r]) != 0) {
                rc = 1;
                break;
            }
            fw[r] = have_fio ? bench_fio_rate(o.dir, "write", shapes[s].len, o.total) : -1;
            fr[r] = have_fio ? bench_fio_rate(o.dir, "read", shapes[s].len, o.total) : -1;
            rw[r] = bench_uring_rate(o.dir, "write", shapes[s].len, o.total);
            rr[r] = bench_uring_rate(o.dir, "read", shapes[s].len, o.total);
            bench_progress("disk",
                           "%s round %d: engine put %.2f get %.2f (in batches %.2f) GB/s; fio "
                           "write %.2f read %.2f GB/s; raw write %.2f read %.2f GB/s",
                           shapes[s].name, r + 1, put[r], get[r], gb[r], fw[r], fr[r], rw[r],
                           rr[r]);
        }
        if (rc)
            break;
        char k[64];
        snprintf(k, sizeof k, "engine_put_gbps_%s", shapes[s].name);
        bench_spread ep = bench_json_rounds(res, k, put, (size_t)o.rounds);
        snprintf(k, sizeof k, "engine_get_gbps_%s", shapes[s].name);
        bench_spread eg = bench_json_rounds(res, k, get, (size_t)o.rounds);
        snprintf(k, sizeof k, "engine_get_batched_gbps_%s", shapes[s].name);
        bench_json_rounds(res, k, gb, (size_t)o.rounds);
        int raw_ok = 1, fio_ok = have_fio;
        for (int r = 0; r < o.rounds; r++) {
            raw_ok = raw_ok && rw[r] > 0 && rr[r] > 0;
            fio_ok = fio_ok && fw[r] > 0 && fr[r] > 0;
        }
        if (raw_ok) {
            double xp[MAX_ROUNDS], xg[MAX_ROUNDS], xb[MAX_ROUNDS];
            for (int r = 0; r < o.rounds; r++)
                xp[r] = put[r] / rw[r], xg[r] = get[r] / rr[r], xb[r] = gb[r] / rr[r];
            snprintf(k, sizeof k, "raw_write_gbps_%s", shapes[s].name);
            bench_json_rounds(res, k, rw, (size_t)o.rounds);
            snprintf(k, sizeof k, "raw_read_gbps_%s", shapes[s].name);
            bench_json_rounds(res, k, rr, (size_t)o.rounds);
            snprintf(k, sizeof k, "engine_put_vs_raw_%s", shapes[s].name);
            bench_spread xpr = bench_json_rounds(res, k, xp, (size_t)o.rounds);
            snprintf(k, sizeof k, "engine_get_vs_raw_%s", shapes[s].name);
            bench_spread xgr = bench_json_rounds(res, k, xg, (size_t)o.rounds);
            snprintf(k, sizeof k, "engine_get_batched_vs_raw_%s", shapes[s].name);
            bench_json_rounds(res, k, xb, (size_t)o.rounds);
            if (!o.json)
                printf("%s objects: engine put %.2fx raw io_uring's write, get %.2fx its read\n",
                       shapes[s].name, xpr.median, xgr.median);
        }
        if (fio_ok) {
            snprintf(k, sizeof k, "fio_write_gbps_%s", shapes[s].name);
            bench_spread w = bench_json_rounds(res, k, fw, (size_t)o.rounds);
            snprintf(k, sizeof k, "fio_read_gbps_%s", shapes[s].name);
            bench_spread rd = bench_json_rounds(res, k, fr, (size_t)o.rounds);
            /* the ratios round by round (the engine and fio of a round run back to back: the
             * disk's mood of the moment is in both), then their median */
            double rp[MAX_ROUNDS], rg[MAX_ROUNDS];
            for (int r = 0; r < o.rounds; r++) {
                rp[r] = put[r] / fw[r];
                rg[r] = get[r] / fr[r];
            }
            snprintf(k, sizeof k, "engine_put_vs_fio_%s", shapes[s].name);
            bench_spread pr = bench_json_rounds(res, k, rp, (size_t)o.rounds);
            snprintf(k, sizeof k, "engine_get_vs_fio_%s", shapes[s].name);
            bench_spread gr = bench_json_rounds(res, k, rg, (size_t)o.rounds);
            if (!o.json)
                printf("%s objects: engine put %.2f GB/s (%.2fx fio's write %.2f), get %.2f "
                       "GB/s (%.2fx fio's read %.2f)\n",
                       shapes[s].name, ep.median, pr.median, w.median, eg.median, gr.median,
                       rd.median);
        } else if (!o.json) {
            printf("%s objects: engine put %.2f GB/s, get %.2f GB/s (no fio)\n", shapes[s].name,
                   ep.median, eg.median);
        }
    }
    bench_emit(res, o.json);
    json_decref(res);
    return rc;
}

#else

int bench_disk_main(int argc, char **argv)
{
    (void)argc, (void)argv;
    fprintf(stderr, "kvf-bench disk: built without liburing: the disk tier is not here\n");
    return 1;
}

#endif
