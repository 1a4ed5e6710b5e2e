/*
 * kvf-bench store --transport shm (store_bench.h): the shared-memory transport against its
 * ceilings, in the same run. Per round: a one-thread memcpy of the same bytes from the same
 * source buffers into the same scattered destination buffers (before and after kvfabric's
 * rates), then GET and PUT of 256 x 64 KiB and 4 x 16 MiB over shared memory and GET over TCP
 * loopback from the same store. Ratios are taken within a round (this machine's speed moves
 * within seconds) and their medians reported, with the lookup latency of 128 keys over the
 * node's Unix socket.
 */
#include "store_bench.h"

#include "bench_util.h"

#include "cpus.h"
#include "units.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROUNDS  11
#define LOOKUP_KEYS 128

/* GB/s of one thread copying every object of w into its destination buffer, over secs. */
static double memcpy_rate(workload *w, double secs)
{
    uint64_t bytes = 0;
    double t0 = bench_now(), end = t0 + secs;
    do {
        for (size_t i = 0; i < w->n; i++) {
            memcpy(w->bufs[i], w->objs[i], w->lens[i]);
            bytes += w->lens[i];
        }
    } while (bench_now() < end);
    return (double)bytes / (bench_now() - t0) / 1e9;
}

/* Lookup-prefix latency of 128 stored keys through cl, iters times: p50 and p99 in us; then its
 * floor, the same LOOKUP frame over a raw blocking Unix socket to the store (name) with no
 * library: raw_p50 and raw_p99. */
static int lookup_lat(kvf_client *cl, const char *name, int iters, double *p50, double *p99,
                      double *raw_p50, double *raw_p99)
{
    kvf_key keys[LOOKUP_KEYS];
    int st[LOOKUP_KEYS];
    workload w;
    if (wl_init(&w, LOOKUP_KEYS, 4096) != 0)
        return -1;
    memcpy(keys, w.keys, sizeof keys);
    kvf_batch b = {.n = w.n,
                   .keys = w.keys,
                   .objs = (const void *const *)w.objs,
                   .lens = w.lens,
                   .status = st};
    kvf_client_put(cl, &b);
    double *lat = malloc((size_t)iters * sizeof *lat);
    int n = 0;
    for (int i = 0; lat && i < iters; i++) {
        size_t hits = 0;
        double t0 = bench_now();
        int rc = kvf_client_lookup_prefix(cl, LOOKUP_KEYS, keys, &hits, 2000);
        double us = (bench_now() - t0) * 1e6;
        if (!rc && hits == LOOKUP_KEYS)
            lat[n++] = us;
    }
    *p50 = n ? bench_quantile(lat, (size_t)n, 0.5) : 0;
    *p99 = n ? bench_quantile(lat, (size_t)n, 0.99) : 0;
    *raw_p50 = *raw_p99 = 0;
    if (lat && raw_lookup_rtt(0, name, STORE_NS, keys, iters, lat) == 0) {
        *raw_p50 = bench_quantile(lat, (size_t)iters, 0.5);
        *raw_p99 = bench_quantile(lat, (size_t)iters, 0.99);
    }
    free(lat);
    wl_free(&w);
    return n ? 0 : -1;
}

int bench_store_shm(int quick, int store_threads, const char *memory, const char *bin, int json,
                    json_t *res)
{
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "cores", json_integer(kvf__cores()));
    bench_proc store = {0};
    char extra[96];
    snprintf(extra, sizeof extra, "--threads %d --rdma off --shm auto", store_threads);
    kvf_client *shm = NULL, *tcp = NULL;
    kvf_client_opts so = {.ns = STORE_NS, .deadline_ms = 30000, .transport = "shm"};
    if (bench_store_client_open("store", &store, bin, memory, extra, "127.0.0.1", &so, &shm) != 0)
        return 1;
    char why[400];
    kvf_client_transport(shm, why, sizeof why);
    json_object_set_new(res, "shm_path", json_string(why));
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", store.port);
    const char *node = addr;
    kvf_client_opts to = {
        .ns = STORE_NS, .deadline_ms = 30000, .transport = "tcp", .nodes = &node, .n_nodes = 1};
    char err[300];
    if (kvf_client_open(&tcp, &to, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench store: tcp client: %s\n", err);
        kvf_client_close(&shm);
        bench_stop(&store);
        return 1;
    }
    workload small, large;
    if (wl_init(&small, 256, 64 * 1024) != 0 || wl_init(&large, 4, 16u << 20) != 0) {
        fprintf(stderr, "kvf-bench store: out of memory\n");
        kvf_client_close(&shm), kvf_client_close(&tcp);
        bench_stop(&store);
        return 1;
    }
    int rounds = quick ? 5 : MAX_ROUNDS, errors = 0;
    double secs = quick ? 0.3 : 0.5;
    /* per round: [0] GET 64K, [1] GET 16M, [2] PUT 64K, [3] PUT 16M over shm; [4] [5] GET 64K and
     * 16M over TCP; [6] [7] memcpy 64K and 16M */
    double v[8][MAX_ROUNDS], r_get[MAX_ROUNDS], r_get16[MAX_ROUNDS], r_put[MAX_ROUNDS],
        r_put16[MAX_ROUNDS], r_tcp[MAX_ROUNDS], r_tcp16[MAX_ROUNDS];
    /* Warm-up as the TCP figures': the arena's size in PUTs (every block written once, the
     * staging regions' pages faulted in), then GETs, untimed. */
    bench_progress("store", "shm: warm-up, then %d rounds of %.1f s per figure", rounds, secs);
    uint64_t arena = 0;
    double want = kvf__parse_size(memory, &arena) == 0 ? (double)arena : 1e9, moved = 0;
    for (double t0 = bench_now(); moved < want && bench_now() - t0 < 30;) {
        int e;
        moved += kvf_rate(shm, moved < want / 2 ? &large : &small, 1, 0.25, &e) * 1e9 * 0.25;
    }
    for (int w = 0; w < 2; w++) {
        int e;
        kvf_rate(shm, w ? &small : &large, 0, 0.3, &e);
    }
    for (int r = 0; r < rounds; r++) {
        int e;
        double m0s = memcpy_rate(&small, secs), m0l = memcpy_rate(&large, secs);
        v[0][r] = kvf_rate(shm, &small, 0, secs, &e), errors += e;
        v[1][r] = kvf_rate(shm, &large, 0, secs, &e), errors += e;
        v[2][r] = kvf_rate(shm, &small, 1, secs, &e), errors += e;
        v[3][r] = kvf_rate(shm, &large, 1, secs, &e), errors += e;
        v[4][r] = kvf_rate(tcp, &small, 0, secs, &e), errors += e;
        v[5][r] = kvf_rate(tcp, &large, 0, secs, &e), errors += e;
        v[6][r] = (m0s + memcpy_rate(&small, secs)) / 2;
        v[7][r] = (m0l + memcpy_rate(&large, secs)) / 2;
        r_get[r] = v[0][r] / v[6][r];
        r_get16[r] = v[1][r] / v[7][r];
        r_put[r] = v[2][r] / v[6][r];
        r_put16[r] = v[3][r] / v[7][r];
        r_tcp[r] = v[0][r] / v[4][r];
        r_tcp16[r] = v[1][r] / v[5][r];
        bench_progress("store",
                       "shm round %d/%d: GET 64K %.1f GB/s (memcpy %.1f), 16M %.1f (%.1f); "
                       "PUT 64K %.1f, 16M %.1f; TCP GET 64K %.1f, 16M %.1f",
                       r + 1, rounds, v[0][r], v[6][r], v[1][r], v[7][r], v[2][r], v[3][r], v[4][r],
                       v[5][r]);
    }
    double p50 = 0, p99 = 0, rp50 = 0, rp99 = 0;
    char name[64];
    snprintf(name, sizeof name, "@kvf-store-%d", (int)store.pid); /* --shm auto's name */
    int lrc = lookup_lat(shm, name, quick ? 2000 : 10000, &p50, &p99, &rp50, &rp99);
    kvf_client_counters k;
    kvf_client_counters_get(shm, &k);
    kvf_client_close(&shm);
    kvf_client_close(&tcp);
    bench_stop(&store);
    wl_free(&small);
    wl_free(&large);

    static const char *names[8] = {"shm_get_gbps",     "shm_get_16m_gbps", "shm_put_gbps",
                                   "shm_put_16m_gbps", "tcp_get_gbps",     "tcp_get_16m_gbps",
                                   "memcpy_gbps",      "memcpy_16m_gbps"};
    bench_spread s[8];
    for (int i = 0; i < 8; i++)
        s[i] = bench_json_rounds(res, names[i], v[i], (size_t)rounds);
    bench_spread g = bench_json_rounds(res, "shm_get_vs_memcpy", r_get, (size_t)rounds);
    bench_spread g16 = bench_json_rounds(res, "shm_get_16m_vs_memcpy", r_get16, (size_t)rounds);
    bench_spread p = bench_json_rounds(res, "shm_put_vs_memcpy", r_put, (size_t)rounds);
    bench_spread p16 = bench_json_rounds(res, "shm_put_16m_vs_memcpy", r_put16, (size_t)rounds);
    bench_spread t = bench_json_rounds(res, "shm_get_vs_tcp", r_tcp, (size_t)rounds);
    bench_spread t16 = bench_json_rounds(res, "shm_get_16m_vs_tcp", r_tcp16, (size_t)rounds);
    json_object_set_new(res, "shm_lookup_p50_us", json_real(p50));
    json_object_set_new(res, "shm_lookup_p99_us", json_real(p99));
    json_object_set_new(res, "shm_lookup_raw_p50_us", json_real(rp50));
    json_object_set_new(res, "shm_lookup_raw_p99_us", json_real(rp99));
    json_object_set_new(res, "shm_lease_expired", json_integer((json_int_t)k.shm_lease_expired));
    json_object_set_new(res, "errors", json_integer(errors));
    FILE *out = json ? stderr : stdout; /* with --json, stdout is the JSON alone */
    fprintf(out, "kvf-bench store --transport shm (%d cores, %d rounds, medians [p10..p90]):\n",
            kvf__cores(), rounds);
    fprintf(out, "  path: %s\n", why);
    fprintf(out, "  GET 256 x 64 KiB into scattered pages: %.2f GB/s; memcpy %.2f; TCP %.2f\n",
            s[0].median, s[6].median, s[4].median);
    fprintf(out, "  GET 4 x 16 MiB: %.2f GB/s; memcpy %.2f; TCP %.2f\n", s[1].median, s[7].median,
            s[5].median);
    fprintf(out, "  PUT 256 x 64 KiB: %.2f GB/s; 4 x 16 MiB: %.2f GB/s\n", s[2].median,
            s[3].median);
    fprintf(out, "  shm_get_vs_memcpy %.2f [%.2f..%.2f] (target >= 0.7), 16 MiB %.2f\n", g.median,
            g.p10, g.p90, g16.median);
    fprintf(out, "  shm_get_vs_tcp %.2f [%.2f..%.2f] (target >= 3), 16 MiB %.2f\n", t.median, t.p10,
            t.p90, t16.median);
    fprintf(out, "  shm_put_vs_memcpy %.2f [%.2f..%.2f] (target >= 0.6), 16 MiB %.2f\n", p.median,
            p.p10, p.p90, p16.median);
    fprintf(out,
            "  lookup of 128 keys over the socket: p50 %.1f us, p99 %.1f us (target <= 50)%s; "
            "a raw socket, no library: p50 %.1f us, p99 %.1f us\n",
            p50, p99, lrc ? " (failed)" : "", rp50, rp99);
    fprintf(out, "  keys failed: %d; leases that ended mid-copy: %llu\n", errors,
            (unsigned long long)k.shm_lease_expired);
    return errors || lrc ? 1 : 0;
}
