/*
 * kvf-bench store --near (store_bench.h): hot keys read from their nearest holder against their
 * first node, in the same run. Node A serves shared memory on this host; node B does not (as a
 * store of another host would not) and copies every entry read twice to the next node of its
 * key's order, A (--replicate-hits 2 --replicas 2). The objects are given keys whose first node
 * is B, made hot, and then read in rounds by two clients of both nodes: one that may use shared
 * memory (it reads them from A, the holder on its host: docs/store.md "Reads from the nearest
 * holder") and one that speaks TCP only (it reads them from B, their first node). Here B is on
 * loopback: a real remote node is further, so the ratio is a floor of what a remote store costs.
 */
#include "store_bench.h"

#include "bench_util.h"

#include "cpus.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_ROUNDS 11

/* Gives w's objects keys whose first node in c is node, stores them through c, reads them twice
 * (hot), and waits (20 s at most) until holder has every one. 0, or -1 (said). */
static int make_hot(kvf_client *c, kvf_client *holder, workload *w, size_t node, uint64_t salt)
{
    for (size_t i = 0; i < w->n; i++) {
        kvf_key k = {.lo = salt ^ (i * 0x9E3779B97F4A7C15ull), .hi = 0};
        while (kvf_client_node_of(c, &k) != node)
            k.hi++;
        w->keys[i] = k;
        kvf_obj_rekey(w->objs[i], &k);
    }
    kvf_batch b = {.n = w->n,
                   .keys = w->keys,
                   .objs = (const void *const *)w->objs,
                   .lens = w->lens,
                   .status = w->st};
    if (kvf_client_put(c, &b) != 0)
        return -1;
    int e;
    for (int r = 0; r < 2; r++)
        wl_rate(c, w, 0, 0, &e);
    uint8_t *present = malloc(w->n);
    size_t have = 0;
    for (int t = 0; present && t < 200 && have < w->n; t++) {
        usleep(100000);
        have = 0;
        if (kvf_client_exists(holder, w->n, w->keys, present, 5000) == 0)
            for (size_t i = 0; i < w->n; i++)
                have += present[i];
    }
    free(present);
    if (have < w->n) {
        fprintf(stderr, "kvf-bench store --near: %zu of %zu hot objects replicated\n", have, w->n);
        return -1;
    }
    return 0;
}

int bench_store_near(int quick, int store_threads, const char *memory, const char *bin, int json,
                     json_t *res)
{
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "cores", json_integer(kvf__cores()));
    json_object_set_new(res, "what",
                        json_string("hot keys whose first node (B, TCP only, on loopback) keeps "
                                    "a replica on a node of this host (A, shared memory): read "
                                    "by a client that uses the nearest holder, against one that "
                                    "reads the first node over TCP, in the same rounds"));
    bench_proc a = {0}, b = {0};
    char extra[200], addr_a[64], addr_b[64];
    snprintf(extra, sizeof extra, "--threads %d --rdma off --shm auto", store_threads);
    if (bench_start_store(&a, bin, memory, extra) != 0)
        return 1;
    snprintf(addr_a, sizeof addr_a, "127.0.0.1:%u", a.port);
    snprintf(extra, sizeof extra,
             "--threads %d --rdma off --shm off --replicate-hits 2 --replicas 2 --peer %s",
             store_threads, addr_a);
    if (bench_start_store(&b, bin, memory, extra) != 0) {
        bench_stop(&a);
        return 1;
    }
    snprintf(addr_b, sizeof addr_b, "127.0.0.1:%u", b.port);
    const char *nodes[2] = {addr_a, addr_b};
    kvf_client *near = NULL, *tcp = NULL, *only_a = NULL;
    kvf_client_opts o = {
        .ns = STORE_NS, .deadline_ms = 30000, .nodes = nodes, .n_nodes = 2, .transport = "auto"};
    kvf_client_opts ot = o, oa = o;
    ot.transport = "tcp";
    oa.transport = "tcp", oa.n_nodes = 1;
    char err[400];
    workload small = {0}, large = {0};
    int rc = 1;
    if (kvf_client_open(&near, &o, err, sizeof err) != 0 ||
        kvf_client_open(&tcp, &ot, err, sizeof err) != 0 ||
        kvf_client_open(&only_a, &oa, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench store --near: client: %s\n", err);
        goto out;
    }
    kvf_client_transport(near, err, sizeof err);
    json_object_set_new(res, "near_path", json_string(err));
    if (wl_init(&small, 256, 64 * 1024) != 0 || wl_init(&large, 4, 16u << 20) != 0) {
        fprintf(stderr, "kvf-bench store --near: out of memory\n");
        goto out;
    }
    bench_progress("store", "near: making 256 x 64 KiB and 4 x 16 MiB hot on B, copied to A");
    if (make_hot(tcp, only_a, &small, 1, 0x51) != 0 || make_hot(tcp, only_a, &large, 1, 0x52) != 0)
        goto out;
    int rounds = quick ? 5 : MAX_ROUNDS, errors = 0;
    double secs = quick ? 0.3 : 0.5;
    double v[4][MAX_ROUNDS], r64[MAX_ROUNDS], r16[MAX_ROUNDS];
    kvf_client_counters k0, k1;
    kvf_client_counters_get(near, &k0);
    for (int r = 0; r < rounds; r++) {
        int e;
        v[0][r] = wl_rate(near, &small, 0, secs, &e), errors += e;
        v[1][r] = wl_rate(near, &large, 0, secs, &e), errors += e;
        v[2][r] = wl_rate(tcp, &small, 0, secs, &e), errors += e;
        v[3][r] = wl_rate(tcp, &large, 0, secs, &e), errors += e;
        r64[r] = v[0][r] / v[2][r];
        r16[r] = v[1][r] / v[3][r];
        bench_progress("store",
                       "near round %d/%d: GET 64K %.2f GB/s from the near holder, %.2f from the "
                       "first node; 16M %.2f, %.2f",
                       r + 1, rounds, v[0][r], v[2][r], v[1][r], v[3][r]);
    }
    kvf_client_counters_get(near, &k1);
    static const char *names[4] = {"near_get_gbps", "near_get_16m_gbps", "first_node_get_gbps",
                                   "first_node_get_16m_gbps"};
    bench_spread s[4];
    for (int i = 0; i < 4; i++)
        s[i] = bench_json_rounds(res, names[i], v[i], (size_t)rounds);
    bench_spread g = bench_json_rounds(res, "near_vs_first_node", r64, (size_t)rounds);
    bench_spread g16 = bench_json_rounds(res, "near_vs_first_node_16m", r16, (size_t)rounds);
    json_object_set_new(res, "near_keys", json_integer((json_int_t)(k1.near_keys - k0.near_keys)));
    json_object_set_new(res, "near_misses",
                        json_integer((json_int_t)(k1.near_misses - k0.near_misses)));
    json_object_set_new(res, "errors", json_integer(errors));
    FILE *out = json ? stderr : stdout; /* with --json, stdout is the JSON alone */
    fprintf(out, "kvf-bench store --near (%d cores, %d rounds, medians [p10..p90]):\n",
            kvf__cores(), rounds);
    fprintf(out,
            "  GET 256 x 64 KiB hot: %.2f GB/s from the holder on this host, %.2f from the first "
            "node over TCP: %.2fx [%.2f..%.2f]\n",
            s[0].median, s[2].median, g.median, g.p10, g.p90);
    fprintf(out, "  GET 4 x 16 MiB hot: %.2f GB/s, %.2f: %.2fx [%.2f..%.2f]\n", s[1].median,
            s[3].median, g16.median, g16.p10, g16.p90);
    fprintf(out, "  keys asked of the near holder %llu, missed there %llu; keys failed %d\n",
            (unsigned long long)(k1.near_keys - k0.near_keys),
            (unsigned long long)(k1.near_misses - k0.near_misses), errors);
    rc = errors ? 1 : 0;
out:
    wl_free(&small);
    wl_free(&large);
    kvf_client_close(&near);
    kvf_client_close(&tcp);
    kvf_client_close(&only_a);
    bench_stop(&b);
    bench_stop(&a);
    return rc;
}
