/*
 * kvf-bench replicas: placement throughput of kvf-sched replicas over HTTP (real;
 * docs/membership.md). The trace's prompts are published as KV events by fake engines (one
 * publisher each, with a replay socket), so that every replica indexes the same prefixes; then
 * client threads POST the trace's requests to /v1/place as fast as the replicas answer, spread
 * evenly over 1 replica, then over N, in alternating rounds. The ceiling in the same run: the rate
 * at which one replica answers GET /healthz over the same connections (HTTP alone).
 */
#include "bench.h"
#include "bench_util.h"
#include "trace.h"

#include "kvf/error.h"
#include "kvf/events.h"

#include "http.h"
#include "proc.h"

#include <curl/curl.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_REPLICAS 8
#define MAX_THREADS  256
#define BLOCK        16

typedef struct opts {
    const char *trace;
    long instances, threads, rounds, replicas, requests;
    double seconds;
    int json, arrays;
} opts;

typedef struct replica {
    pid_t pid;
    char addr[64];
} replica;

typedef struct run {
    char **bodies; /* the requests' /v1/place bodies, serialized once */
    size_t n_bodies;
    replica *r;
    int n_r;
    const char *path; /* "/v1/place" or "/healthz" */
    double seconds;
    atomic_int go, stop;
    _Atomic uint64_t done, failed;
    double *lat; /* per thread, its latencies (bounded) */
} run;

typedef struct worker {
    run *R;
    int id;
    size_t n_lat, cap_lat;
    double *lat;
} worker;

static size_t sink(char *p, size_t s, size_t n, void *u)
{
    (void)p, (void)u;
    return s * n;
}

static void *worker_main(void *arg)
{
    worker *w = arg;
    run *R = w->R;
    CURL *cu = curl_easy_init();
    if (!cu)
        return NULL;
    const replica *to = &R->r[w->id % R->n_r];
    char url[128];
    snprintf(url, sizeof url, "http://%s%s", to->addr, R->path);
    struct curl_slist *hdr = curl_slist_append(NULL, "Content-Type: application/json");
    curl_easy_setopt(cu, CURLOPT_URL, url);
    curl_easy_setopt(cu, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(cu, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(cu, CURLOPT_TIMEOUT_MS, 10000L);
    int post = !strcmp(R->path, "/v1/place");
    if (post)
        curl_easy_setopt(cu, CURLOPT_HTTPHEADER, hdr);
    while (!atomic_load(&R->go))
        usleep(1000);
    size_t k = (size_t)w->id * 7919u;
    while (!atomic_load(&R->stop)) {
        if (post)
            curl_easy_setopt(cu, CURLOPT_POSTFIELDS, R->bodies[k++ % R->n_bodies]);
        double t0 = bench_now();
        long st = 0;
        CURLcode cc = curl_easy_perform(cu);
        curl_easy_getinfo(cu, CURLINFO_RESPONSE_CODE, &st);
        if (cc != CURLE_OK || (st != 200 && st != 429)) {
            atomic_fetch_add(&R->failed, 1);
            continue;
        }
        atomic_fetch_add(&R->done, 1);
        if (w->n_lat < w->cap_lat)
            w->lat[w->n_lat++] = bench_now() - t0;
    }
    curl_slist_free_all(hdr);
    curl_easy_cleanup(cu);
    return NULL;
}

/* Drives R for R->seconds with n threads: answers per second; p50 and p99 latency (s). */
static double drive(run *R, int n, double *p50, double *p99)
{
    pthread_t th[MAX_THREADS];
    worker w[MAX_THREADS];
    atomic_store(&R->go, 0);
    atomic_store(&R->stop, 0);
    atomic_store(&R->done, 0);
    atomic_store(&R->failed, 0);
    for (int i = 0; i < n; i++) {
        w[i] = (worker){.R = R, .id = i, .cap_lat = 200000};
        w[i].lat = malloc(w[i].cap_lat * sizeof *w[i].lat);
        pthread_create(&th[i], NULL, worker_main, &w[i]);
    }
    usleep(200000); /* connections made */
    atomic_store(&R->go, 1);
    usleep(300000); /* warm */
    uint64_t d0 = atomic_load(&R->done);
    double t0 = bench_now();
    usleep((useconds_t)(R->seconds * 1e6));
    uint64_t d1 = atomic_load(&R->done);
    double t1 = bench_now();
    atomic_store(&R->stop, 1);
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        total += w[i].n_lat;
    }
    double *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        memcpy(all + k, w[i].lat, w[i].n_lat * sizeof *all);
        k += w[i].n_lat;
        free(w[i].lat);
    }
    *p50 = bench_quantile(all, k, 0.5);
    *p99 = bench_quantile(all, k, 0.99);
    free(all);
    return (double)(d1 - d0) / (t1 - t0);
}

static int start_replica(replica *r)
{
    char *argv[] = {(char *)kvf__proc_find_bin("kvf-sched"),
                    "--listen",
                    "127.0.0.1:0",
                    "--instance-ttl",
                    "0",
                    "--log-level",
                    "warn",
                    NULL};
    char err[512];
    uint16_t port = 0;
    r->pid = kvf__proc_start_daemon(argv, 20000, &port, err, sizeof err);
    if (r->pid < 0) {
        fprintf(stderr, "kvf-bench replicas: kvf-sched: %s\n", err);
        return -1;
    }
    snprintf(r->addr, sizeof r->addr, "127.0.0.1:%u", port);
    return 0;
}

static void stop_replica(replica *r)
{
    bench_proc p = {.pid = r->pid};
    bench_stop(&p);
    r->pid = 0;
}

/* Registers the fake engines with r. */
static int enroll(replica *r, kvf_events **ev, int n_inst)
{
    char err[256], url[128];
    for (int i = 0; i < n_inst; i++) {
        char id[32];
        snprintf(id, sizeof id, "engine%d", i);
        json_t *b = json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:i}", "id", id, "role", "both", "endpoint",
                              "127.0.0.1:9", "events", kvf_events_endpoint(ev[i]), "replay",
                              kvf_events_replay_endpoint(ev[i]), "block_tokens", BLOCK,
                              "capacity_blocks", 1 << 20);
        long st = 0;
        snprintf(url, sizeof url, "http://%s/v1/instances", r->addr);
        int rc = kvf__http_call("POST", url, b, 5000, &st, NULL, err, sizeof err);
        json_decref(b);
        if (rc || (st != 200 && st != 201)) {
            fprintf(stderr, "kvf-bench replicas: registering %s: %s (HTTP %ld)\n", id,
                    rc ? err : "refused", st);
            return -1;
        }
    }
    return 0;
}

/* Waits (bounded: 60 s) until r has indexed `blocks` blocks. */
static int indexed(replica *r, uint64_t blocks)
{
    char err[256], url[128];
    snprintf(url, sizeof url, "http://%s/v1/index/stats", r->addr);
    for (int t = 0; t < 1200; t++) {
        long st = 0;
        json_t *o = NULL;
        if (kvf__http_call("GET", url, NULL, 2000, &st, &o, err, sizeof err) == 0 && st == 200 &&
            (uint64_t)json_integer_value(json_object_get(o, "blocks_stored")) >= blocks) {
            json_decref(o);
            return 0;
        }
        json_decref(o);
        usleep(50000);
    }
    fprintf(stderr, "kvf-bench replicas: %s did not index the %llu blocks in 60 s\n", r->addr,
            (unsigned long long)blocks);
    return -1;
}

static int parse(int argc, char **argv, opts *o)
{
    const kvf__arg args[] = {
        KVF__OPT("trace", KVF__ARG_STR, &o->trace, "FILE", "the request trace (JSONL)", NULL),
        KVF__OPT("requests", KVF__ARG_LONG, &o->requests, "N", "requests of the trace used", "1000",
                 .lo = 1, .hi = 1000000),
        KVF__OPT("instances", KVF__ARG_LONG, &o->instances, "N",
                 "fake engines whose prefixes the replicas index", "16", .lo = 1, .hi = 256),
        KVF__OPT("replicas", KVF__ARG_LONG, &o->replicas, "N", "replicas compared with one", "2",
                 .lo = 2, .hi = MAX_REPLICAS),
        KVF__OPT("threads", KVF__ARG_LONG, &o->threads, "N", "client threads (0: 4 per core)", "0",
                 .lo = 0, .hi = MAX_THREADS),
        KVF__OPT("seconds", KVF__ARG_REAL, &o->seconds, "S", "each measurement's length", "3",
                 .lo = 0.2, .hi = 600),
        KVF__OPT("rounds", KVF__ARG_LONG, &o->rounds, "N",
                 "rounds of 1 and N replicas, alternating", "3", .lo = 1, .hi = 50),
        KVF__OPT("arrays", KVF__ARG_FLAG, &o->arrays, NULL,
                 "send the tokens as JSON arrays of numbers instead of the router's base64", NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
    };
    int rc = bench_args("replicas", "--trace FILE [OPTIONS]",
                        "Placement throughput over HTTP of N kvf-sched replicas against one, on a "
                        "trace's requests (real). docs/membership.md.",
                        NULL, args, sizeof args / sizeof args[0], argc, argv);
    if (rc == 0 && !o->trace) {
        fprintf(stderr, "kvf-bench replicas: --trace FILE is required\n");
        return -1;
    }
    return rc;
}

int bench_replicas_main(int argc, char **argv)
{
    opts o = {.requests = 1000, .instances = 16, .replicas = 2, .seconds = 3, .rounds = 3};
    int prc = parse(argc, argv, &o);
    if (prc)
        return prc > 0 ? 0 : 2;
    signal(SIGPIPE, SIG_IGN);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = o.threads ? (int)o.threads : (int)(cores > 0 ? 4 * cores : 8);
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    char err[512];
    bench_trace_rec *tr = NULL;
    size_t n_tr = 0;
    if (bench_trace_load(o.trace, 0, (size_t)o.requests, &tr, &n_tr, err, sizeof err) != 0 ||
        !n_tr) {
        fprintf(stderr, "kvf-bench replicas: %s\n", n_tr ? err : "an empty trace");
        return 1;
    }
    /* the fake engines, each publishing its share of the prompts before any replica starts
     * (a replica learns them by replay on registration) */
    kvf_events *ev[256] = {0};
    replica reps[MAX_REPLICAS] = {0};
    run R = {.seconds = o.seconds};
    R.bodies = calloc(n_tr, sizeof *R.bodies);
    uint64_t blocks = 0;
    int rc = 1;
    for (long i = 0; i < o.instances; i++) {
        kvf_events_opts eo = {.listen = "127.0.0.1:0", .replay = "127.0.0.1:0"};
        if (kvf_events_open(&ev[i], &eo, err, sizeof err) != 0) {
            fprintf(stderr, "kvf-bench replicas: %s\n", err);
            goto out_stop;
        }
    }
    for (long i = 0; i < o.replicas; i++)
        if (start_replica(&reps[i]) != 0 || enroll(&reps[i], ev, (int)o.instances) != 0)
            goto out_stop;
    usleep(500000); /* the replicas' subscriptions connect */
    for (size_t k = 0; k < n_tr; k++) {
        size_t n = tr[k].in_len, nb = n / BLOCK;
        uint32_t *tok = malloc((n ? n : 1) * sizeof *tok);
        uint64_t *h = malloc((nb ? nb : 1) * sizeof *h);
        for (size_t i = 0; i < n; i++) {
            size_t b = i / BENCH_TRACE_BLOCK;
            tok[i] =
                bench_trace_token(b < tr[k].n_ids ? tr[k].ids[b] : k, i % BENCH_TRACE_BLOCK, 32000);
        }
        /* the tokens as the router sends them (base64 of little-endian ids), or --arrays */
        json_t *arr;
        if (o.arrays) {
            arr = json_array();
            for (size_t i = 0; i < n; i++)
                json_array_append_new(arr, json_integer(tok[i]));
        } else {
            uint8_t *raw = malloc(4 * n + 1);
            size_t cap = sodium_base64_ENCODED_LEN(4 * n, sodium_base64_VARIANT_ORIGINAL);
            char *text = malloc(cap);
            for (size_t i = 0; i < n; i++)
                for (int b = 0; b < 4; b++)
                    raw[4 * i + (size_t)b] = (uint8_t)(tok[i] >> (8 * b));
            sodium_bin2base64(text, cap, raw, 4 * n, sodium_base64_VARIANT_ORIGINAL);
            arr = json_string(text);
            free(raw);
            free(text);
        }
        json_t *body = json_pack("{s:o,s:i}", "tokens", arr, "output_tokens", (int)tr[k].out_len);
        R.bodies[k] = json_dumps(body, JSON_COMPACT);
        json_decref(body);
        if (nb && kvf_events_hash_blocks(tok, nb, BLOCK, 0, h) == 0 &&
            kvf_events_publish(ev[k % (size_t)o.instances], NULL, 0, h, nb, 0, 0, tok, BLOCK,
                               NULL) == 0)
            blocks += nb;
        free(tok);
        free(h);
    }
    R.n_bodies = n_tr;
    for (long i = 0; i < o.replicas; i++)
        if (indexed(&reps[i], blocks) != 0)
            goto out_stop;
    bench_progress("replicas",
                   "%d replicas indexed %llu blocks of %zu requests from %ld fake "
                   "engines; %d client threads, %.1f s a measurement",
                   (int)o.replicas, (unsigned long long)blocks, n_tr, o.instances, threads,
                   o.seconds);
    double one[50], many[50], ratio[50], ceil[50], p50_1 = 0, p99_1 = 0, p50_n = 0, p99_n = 0;
    R.r = reps;
    for (long k = 0; k < o.rounds; k++) {
        R.path = "/healthz";
        R.n_r = 1;
        ceil[k] = drive(&R, threads, &p50_1, &p99_1);
        R.path = "/v1/place";
        one[k] = drive(&R, threads, &p50_1, &p99_1);
        R.n_r = (int)o.replicas;
        many[k] = drive(&R, threads, &p50_n, &p99_n);
        ratio[k] = one[k] > 0 ? many[k] / one[k] : 0;
        bench_progress("replicas",
                       "round %ld: 1 replica %.0f placements/s (p99 %.2f ms), %ld replicas %.0f/s "
                       "(p99 %.2f ms): %.2fx; the HTTP ceiling %.0f/s",
                       k + 1, one[k], p99_1 * 1e3, o.replicas, many[k], p99_n * 1e3, ratio[k],
                       ceil[k]);
    }
    json_t *res = bench_result_new("replicas");
    json_object_set_new(res, "label", json_string("real"));
    json_object_set_new(res, "trace", json_string(o.trace));
    json_object_set_new(res, "requests", json_integer((json_int_t)n_tr));
    json_object_set_new(res, "instances", json_integer(o.instances));
    json_object_set_new(res, "replicas", json_integer(o.replicas));
    json_object_set_new(res, "threads", json_integer(threads));
    json_object_set_new(res, "cores", json_integer(cores));
    json_object_set_new(res, "indexed_blocks", json_integer((json_int_t)blocks));
    json_object_set_new(res, "tokens_as", json_string(o.arrays ? "json_arrays" : "base64"));
    bench_json_rounds(res, "place_per_s_1", one, (size_t)o.rounds);
    bench_json_rounds(res, "place_per_s_n", many, (size_t)o.rounds);
    bench_spread sr = bench_json_rounds(res, "replicas_vs_one", ratio, (size_t)o.rounds);
    bench_json_rounds(res, "healthz_per_s_1", ceil, (size_t)o.rounds);
    bench_json_real(res, "place_p99_ms_1", p99_1 * 1e3);
    bench_json_real(res, "place_p99_ms_n", p99_n * 1e3);
    bench_json_real(res, "place_p50_ms_1", p50_1 * 1e3);
    bench_json_real(res, "place_p50_ms_n", p50_n * 1e3);
    printf("kvf-bench replicas: %ld replicas place %.2fx the requests one does (rounds %.2f-%.2f; "
           "target >= 1.8), on %ld cores with %d client threads\n",
           o.replicas, sr.median, sr.p10, sr.p90, cores, threads);
    bench_emit(res, o.json);
    json_decref(res);
    rc = 0;
out_stop:
    for (long i = 0; i < o.replicas; i++)
        if (reps[i].pid > 0)
            stop_replica(&reps[i]);
    for (long i = 0; i < o.instances; i++)
        kvf_events_close(&ev[i]);
    for (size_t k = 0; k < n_tr && R.bodies; k++)
        free(R.bodies[k]);
    free(R.bodies);
    bench_trace_free(tr, n_tr);
    return rc;
}
