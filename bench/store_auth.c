/*
 * kvf-bench store --auth: what authentication costs a storage node's clients, in one run. Two
 * stores side by side on loopback, the same but for --auth (a tenants file made for the run, one
 * tenant), each with a client (the second with the tenant's credential). In rounds that alternate
 * which store goes first, both GET the same batches (4 x 16 MiB and 256 x 64 KiB); the figures are
 * the medians of each round's ratio of the authenticated store's rate to the open one's, so a
 * machine that speeds up or slows down between rounds moves both alike. Authentication is checked
 * once per connection (HELLO, AUTH, then a namespace rewrite per request), so the target is a
 * ratio within 5% of 1. The connection's set-up is measured too: a fresh client's first request,
 * with and without the extra round trip and the Ed25519 signature and check.
 */
#include "bench.h"
#include "bench_util.h"
#include "store_bench.h"

#include "kvf/kvf.h"

#include "auth.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define AUTH_NS 0xa17be4c4ull

/* A client of the store at 127.0.0.1:port with credential ("": none). NULL after saying why. */
static kvf_client *client_of(uint16_t port, const char *cred, int streams)
{
    char addr[64], err[300];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", port);
    const char *nodes[1] = {addr};
    kvf_client_opts co = {.nodes = nodes,
                          .n_nodes = 1,
                          .ns = AUTH_NS,
                          .conns_per_node = streams,
                          .deadline_ms = 30000,
                          .credential = cred,
                          .transport = "tcp"}; /* authentication's cost on TCP, open or not */
    kvf_client *c = NULL;
    if (kvf_client_open(&c, &co, err, sizeof err) != 0)
        fprintf(stderr, "kvf-bench store: %s\n", err);
    return c;
}

/* Microseconds from opening a client of the store to the answer of its first request (an EXISTS
 * of one key: HELLO, and AUTH where asked, go first on the connection). -1 on failure. */
static double connect_us(uint16_t port, const char *cred)
{
    double t0 = bench_now();
    kvf_client *c = client_of(port, cred, 1);
    kvf_key k = {.lo = 1, .hi = 2};
    uint8_t present = 0;
    int rc = c ? kvf_client_exists(c, 1, &k, &present, 5000) : -1;
    double us = (bench_now() - t0) * 1e6;
    kvf_client_close(&c);
    return rc == 0 ? us : -1;
}

/* Stores w's objects through c, then GETs them once, untimed. */
static int fill(kvf_client *c, workload *w)
{
    int e1 = 0, e2 = 0;
    kvf_rate(c, w, 1, 0.05, &e1);
    kvf_rate(c, w, 0, 0.05, &e2);
    return e1 + e2;
}

int bench_store_auth(int streams, int threads, const char *memory, const char *bin, int quick,
                     json_t *res)
{
    char dir[] = "/tmp/kvf-bench-auth-XXXXXX", tenants[128], cred[128], extra[300];
    const char *names[1] = {"bench"};
    if (!mkdtemp(dir))
        return 1;
    snprintf(cred, sizeof cred, "%s/bench.cred", dir);
    if (bench_auth_make(dir, names, 1, tenants, sizeof tenants) != 0) {
        bench_auth_remove(dir, names, 1);
        return 1;
    }
    bench_proc open_store = {0}, auth_store = {0};
    kvf_client *co = NULL, *ca = NULL;
    workload small, large;
    int rc = 1, errors = 0;
    int small_ok = wl_init(&small, 256, 64 * 1024) == 0;
    int large_ok = wl_init(&large, 4, 16u << 20) == 0;
    snprintf(extra, sizeof extra, "--threads %d --rdma off", threads);
    if (!small_ok || !large_ok || bench_start_store(&open_store, bin, memory, extra) != 0)
        goto out;
    snprintf(extra, sizeof extra, "--threads %d --rdma off --auth %s", threads, tenants);
    if (bench_start_store(&auth_store, bin, memory, extra) != 0)
        goto out;
    co = client_of(open_store.port, "", streams);
    ca = client_of(auth_store.port, cred, streams);
    if (!co || !ca)
        goto out;
    bench_progress("store", "authentication: warm-up of both stores, untimed");
    for (int i = 0; i < 4; i++)
        errors += fill(co, &large) + fill(ca, &large) + fill(co, &small) + fill(ca, &small);

    int rounds = quick ? 5 : 11;
    double secs = quick ? 0.3 : 0.5;
    double r16[11], r64[11], a16[11], o16[11], a64[11], o64[11];
    for (int r = 0; r < rounds; r++) {
        bench_progress("store", "authentication: round %d of %d", r + 1, rounds);
        int e = 0;
        kvf_client *first = r % 2 ? ca : co, *second = r % 2 ? co : ca;
        double f16 = kvf_rate(first, &large, 0, secs, &e);
        double s16 = kvf_rate(second, &large, 0, secs, &e);
        double f64 = kvf_rate(first, &small, 0, secs, &e);
        double s64 = kvf_rate(second, &small, 0, secs, &e);
        errors += e;
        a16[r] = r % 2 ? f16 : s16;
        o16[r] = r % 2 ? s16 : f16;
        a64[r] = r % 2 ? f64 : s64;
        o64[r] = r % 2 ? s64 : f64;
        r16[r] = o16[r] > 0 ? a16[r] / o16[r] : 0;
        r64[r] = o64[r] > 0 ? a64[r] / o64[r] : 0;
    }
    double cu_open[21], cu_auth[21];
    int nc = 21;
    for (int i = 0; i < nc; i++) {
        cu_open[i] = connect_us(open_store.port, "");
        cu_auth[i] = connect_us(auth_store.port, cred);
    }
    json_t *a = json_object();
    json_object_set_new(a, "label", json_string("real"));
    bench_spread s16 = bench_json_rounds(a, "get_16m_auth_vs_open", r16, (size_t)rounds);
    bench_spread s64 = bench_json_rounds(a, "get_64k_auth_vs_open", r64, (size_t)rounds);
    bench_spread g16a = bench_json_rounds(a, "get_16m_auth_gbps", a16, (size_t)rounds);
    bench_spread g16o = bench_json_rounds(a, "get_16m_open_gbps", o16, (size_t)rounds);
    bench_spread g64a = bench_json_rounds(a, "get_64k_auth_gbps", a64, (size_t)rounds);
    bench_spread g64o = bench_json_rounds(a, "get_64k_open_gbps", o64, (size_t)rounds);
    bench_spread cua = bench_json_rounds(a, "connect_auth_us", cu_auth, (size_t)nc);
    bench_spread cuo = bench_json_rounds(a, "connect_open_us", cu_open, (size_t)nc);
    json_object_set_new(a, "target", json_string(">= 0.95"));
    json_object_set_new(a, "met", json_boolean(s16.median >= 0.95 && s64.median >= 0.95));
    json_object_set_new(a, "errors", json_integer(errors));
    json_object_set_new(res, "auth", a);
    printf("authentication (kvf-store --auth vs none, same run, %d rounds, GET)\n", rounds);
    printf("  %-18s %8s %8s %8s   %s\n", "batch", "auth", "open", "ratio", "p10-p90 of the ratio");
    printf("  %-18s %7.2fG %7.2fG %8.3f   %.3f-%.3f\n", "4 x 16 MiB", g16a.median, g16o.median,
           s16.median, s16.p10, s16.p90);
    printf("  %-18s %7.2fG %7.2fG %8.3f   %.3f-%.3f\n", "256 x 64 KiB", g64a.median, g64o.median,
           s64.median, s64.p10, s64.p90);
    printf("  first request of a fresh client: %.0f us with AUTH, %.0f us without (median of %d)\n",
           cua.median, cuo.median, nc);
    printf("  target: GET within 5%% of authentication off: %s\n",
           s16.median >= 0.95 && s64.median >= 0.95 ? "met" : "NOT met");
    rc = errors ? 1 : 0;
out:
    kvf_client_close(&co);
    kvf_client_close(&ca);
    bench_stop(&open_store);
    bench_stop(&auth_store);
    if (small_ok)
        wl_free(&small);
    if (large_ok)
        wl_free(&large);
    bench_auth_remove(dir, names, 1);
    return rc;
}
