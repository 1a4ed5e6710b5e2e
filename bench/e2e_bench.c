/*
 * kvf-bench e2e: replays a Mooncake-format trace against a running cluster (kvf cluster up) twice,
 * with kvfabric and without it, and reports what each request saw. Every figure is measured on
 * real processes and labelled real.
 *
 * Options: usage() below, and docs/operations.md.
 *
 * Each trace hash id becomes B deterministic token ids (B = 512 is the trace's own block; less
 * scales every request down by 512/B, keeping which requests share which prefix), so shared ids
 * mean shared prefixes. Request i is sent at its trace time divided by --time-scale.
 *
 * kvf mode: the engine module's router (engine/include/router.h) asks kvf-sched for a placement,
 * sends the prompt to the prefill engine (which loads the cached prefix, computes the rest and
 * saves the new chunks) and then to the decode engine (which takes the KV over from the stores
 * and decodes); a placement that runs the prefill on the decode instance is sent there whole.
 * TTFT is the time from the request's arrival to the first token in the driver's hands.
 * baseline: the cache layer off: every prompt goes whole to the engine with the fewest requests
 * outstanding, which prefills from scratch and decodes (colocated). Its TTFT is the arrival to the
 * reply less the decode time the engine reports.
 *
 * Output in --out: records.csv and records.json (one record per request and mode), summary.json,
 * ttft_cdf.png and throughput.png (gnuplot). Generated tokens are compared request by request.
 */
#include "bench.h"
#include "bench_util.h"
#include "engine.h"
#include "e2e.h"
#include "router.h"
#include "trace.h"

#include "kvf/client.h"
#include "kvf/kvf.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

/* Which engine computed each chunk first, from the driver's own records, to count cross-engine
 * reuse: a prefix loaded by one engine that another engine computed. */
struct e2e_owners {
    pthread_mutex_t mu;
    uint64_t *key; /* the chunk key folded to 64 bits, low bit set; 0: empty */
    const kvfe_router_engine **eng;
    size_t mask, used;
    uint32_t chunk_tokens;
};

/* ------------------------------------------------------------------------------------------ */
/* One request */

static size_t owner_slot(const e2e_owners *o, uint64_t h)
{
    size_t i = (size_t)h & o->mask;
    while (o->key[i] && o->key[i] != h)
        i = (i + 1) & o->mask;
    return i;
}

/* Records that e computed chunks [0, saved / chunk) of q (those not recorded yet), and returns how
 * many of the n_loaded tokens q loaded were computed by another engine. */
static size_t note_chunks(e2e_owners *o, const e2e_rec *q, const kvfe_router_engine *e,
                          size_t n_loaded, size_t saved)
{
    if (!o)
        return 0;
    size_t cross = 0;
    pthread_mutex_lock(&o->mu);
    for (size_t c = 0; c < q->rt.n_keys; c++) {
        uint64_t h = (q->keys[c].lo ^ q->keys[c].hi) | 1; /* keys are hashes already */
        size_t i = owner_slot(o, h);
        if (c < n_loaded / o->chunk_tokens && o->key[i] && o->eng[i] != e)
            cross += o->chunk_tokens;
        if (c < saved / o->chunk_tokens && !o->key[i] && o->used < o->mask / 2) {
            o->key[i] = h;
            o->eng[i] = e;
            o->used++;
        }
    }
    pthread_mutex_unlock(&o->mu);
    return cross;
}

/* A request of a run, as its route's on_prefill sees it. */
typedef struct routed {
    e2e_run *R;
    e2e_rec *q;
    int baseline; /* the e2e_run without kvfabric */
} routed;

/* Notes the chunks the prefill engine computed as soon as it answers, so that they count for the
 * requests prefilled while this one decodes, and the transport its KV moved by. */
static void take_prefill(const kvfe_route *rt, void *arg)
{
    routed *s = arg;
    e2e_run *R = s->R;
    e2e_rec *q = s->q;
    if (!s->baseline && !rt->colocated)
        q->ttft = rt->first_token_at - R->t0 - q->arrival;
    q->cross_tokens = note_chunks(R->own, q, rt->prefill, rt->loaded_tokens, rt->saved_tokens);
    pthread_mutex_lock(&R->mu);
    if (rt->transport[0] && !R->transport[0]) {
        snprintf(R->transport, sizeof R->transport, "%s", rt->transport);
        snprintf(R->transport_why, sizeof R->transport_why, "%s", rt->transport_reason);
    }
    pthread_mutex_unlock(&R->mu);
}

/* Takes the generated tokens and the decode's figures of a request served. A request sent whole
 * has its first token only with the reply: TTFT is the reply's time less the decode time the
 * engine reports. */
static void take_reply(const routed *s)
{
    e2e_rec *q = s->q;
    const kvfe_route *rt = &q->rt;
    q->n_generated = (uint32_t)rt->n_generated;
    q->tokens_hash = XXH64(rt->generated, rt->n_generated * sizeof *rt->generated, 0);
    for (size_t i = 0; i < rt->n_itl; i++) {
        double v = rt->itl_s[i];
        q->itl_sum += v;
        q->itl_max = v > q->itl_max ? v : q->itl_max;
        q->itl_n++;
    }
    double t = rt->done_at - s->R->t0;
    q->e2e = t - q->arrival;
    q->finish = t;
    if (s->baseline || rt->colocated)
        q->ttft = q->e2e - rt->decode_s;
}

/* kvf: placed by kvf-sched, prefilled, handed off and decoded; baseline: sent whole to the engine
 * with the fewest requests outstanding, without the cache layer. */
static void serve_request(e2e_run *R, e2e_rec *q)
{
    int baseline = !strcmp(R->mode, "baseline");
    routed s = {.R = R, .q = q, .baseline = baseline};
    q->rt.slo_ttft_ms = R->slo_s > 0 ? R->slo_s * 1e3 : 0;
    q->rt.on_prefill = take_prefill;
    q->rt.arg = &s;
    int rc =
        baseline ? kvfe_router_generate(R->rt, NULL, 0, &q->rt) : kvfe_router_serve(R->rt, &q->rt);
    if (!rc)
        take_reply(&s);
    else if (!q->rt.rejected) {
        q->failed = 1;
        snprintf(q->err, sizeof q->err, "%.150s", q->rt.err);
    }
    kvfe_route_release(&q->rt);
    atomic_fetch_add(&R->n_done, 1);
}

/* A worker of a run: it takes the next request in arrival order, waits for its arrival and
 * serves it, so that requests go out in order, none early, at most --concurrency at once. */
static void *worker_main(void *arg)
{
    e2e_run *R = arg;
    for (size_t i; (i = atomic_fetch_add(&R->next_taken, 1)) < R->n;) {
        double at = R->t0 + R->r[i].arrival;
        struct timespec ts = {.tv_sec = (time_t)at,
                              .tv_nsec = (long)((at - (double)(time_t)at) * 1e9)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
        serve_request(R, &R->r[i]);
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Setup */

/* Clears kvfabric's chunks of this model from the stores, so a e2e_run starts cold. */
static int clear_stores(json_t *stores, const kvf_layout *L, char *err, size_t errlen)
{
    const char *nodes[64];
    size_t nn = 0;
    for (size_t i = 0; i < json_array_size(stores) && nn < 64; i++)
        nodes[nn++] = json_string_value(json_array_get(stores, i));
    if (!nn)
        return 0;
    kvf_keyspace ks;
    kvf_keyspace_init(&ks, L, NULL, 0);
    kvf_client_opts co = {.nodes = nodes, .n_nodes = nn, .ns = ks.seed};
    kvf_client *cl;
    if (kvf_client_open(&cl, &co, err, errlen) != 0)
        return -1;
    uint64_t removed = 0;
    int rc = kvf_client_clear(cl, &removed, 10000);
    kvf_client_close(&cl);
    if (rc)
        snprintf(err, errlen, "clearing the stores: %s", kvf_strerror(rc));
    return rc ? -1 : 0;
}

/* A trace record as a request: its prompt tokens (block tokens per hash id, cut at max_in), its
 * output length (scaled the same way, at most max_out) and its chunk keys. Returns whether the
 * prompt was cut. */
static int build_request(const bench_trace_rec *tr, long block, long max_in, long max_out,
                         const kvfe_model *m, const kvf_keyspace *ks, e2e_rec *q)
{
    size_t want = ((size_t)tr->in_len * (size_t)block + BENCH_TRACE_BLOCK - 1) / BENCH_TRACE_BLOCK;
    size_t n = want < (size_t)max_in ? want : (size_t)max_in;
    n = n ? n : 1;
    size_t o = ((size_t)tr->out_len * (size_t)block + BENCH_TRACE_BLOCK - 1) / BENCH_TRACE_BLOCK;
    uint32_t out = (uint32_t)(o < 1 ? 1 : o > (size_t)max_out ? (size_t)max_out : o);
    q->tokens = malloc(n * sizeof *q->tokens);
    for (size_t t = 0; t < n; t++) {
        size_t b = t / (size_t)block;
        uint64_t id = tr->ids[b < tr->n_ids ? b : tr->n_ids - 1];
        q->tokens[t] = bench_trace_token(id, t % (size_t)block, m->vocab);
    }
    size_t nk = n / m->layout.chunk_tokens, n_keys;
    q->keys = malloc((nk ? nk : 1) * sizeof *q->keys);
    kvf_keys_compute(ks, q->tokens, n, q->keys, nk, &n_keys, NULL);
    q->rt = (kvfe_route){
        .tokens = q->tokens, .n = n, .keys = q->keys, .n_keys = n_keys, .max_tokens = out};
    return want > n;
}

/* Warm-up: the requests before the measured window are prefilled (not measured) on the prefill
 * engines, so the stores hold what a running deployment's would. One thread per engine, for the
 * first MAX_WARM prefill engines: thread t of k prefills requests t, t + k, t + 2k, ... */
#define MAX_WARM 64

typedef struct warm {
    kvfe_router *rt;
    e2e_rec *r;
    size_t n;
    e2e_owners *own;
    const kvfe_router_engine *eng[MAX_WARM];
    int k;
    atomic_int next_thread;
    atomic_size_t done;
    atomic_int failed;
} warm;

static void *warm_main(void *arg)
{
    warm *w = arg;
    int t = atomic_fetch_add(&w->next_thread, 1);
    for (size_t i = (size_t)t; i < w->n; i += (size_t)w->k) {
        kvfe_route *q = &w->r[i].rt;
        if (kvfe_router_prefill(w->rt, w->eng[t], q) != 0)
            atomic_fetch_add(&w->failed, 1);
        else
            note_chunks(w->own, &w->r[i], w->eng[t], 0, q->saved_tokens);
        kvfe_route_release(q);
        atomic_fetch_add(&w->done, 1);
    }
    return NULL;
}

static int warm_up(e2e_rec *r, size_t n, kvfe_router *rt, e2e_owners *own)
{
    pthread_t th[MAX_WARM];
    warm w = {.rt = rt, .r = r, .n = n, .own = own};
    for (size_t i = 0; i < kvfe_router_engine_count(rt) && w.k < MAX_WARM; i++)
        if (strcmp(kvfe_router_engine_at(rt, i)->role, "decode") != 0)
            w.eng[w.k++] = kvfe_router_engine_at(rt, i);
    for (int i = 0; i < w.k; i++)
        pthread_create(&th[i], NULL, warm_main, &w);
    double t0 = bench_now(), last = t0;
    while (atomic_load(&w.done) < n) {
        usleep(100000);
        if (bench_now() - last >= 5) {
            last = bench_now();
            bench_progress("e2e", "warm-up: %zu/%zu prefilled (%.0f s)", atomic_load(&w.done), n,
                           last - t0);
        }
    }
    for (int i = 0; i < w.k; i++)
        pthread_join(th[i], NULL);
    bench_progress("e2e", "warm-up: %zu requests prefilled into the stores in %.1f s, %d failed", n,
                   bench_now() - t0, atomic_load(&w.failed));
    return atomic_load(&w.failed) ? -1 : 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: kvf-bench e2e --config CLUSTER.json | --state STATE.json [--trace FILE]\n"
            "                     [--start N] [--warmup W] [--max-requests N] [--time-scale X]\n"
            "                     [--block-tokens B] [--max-input T] [--max-output T]\n"
            "                     [--slo-ttft-ms M] [--concurrency C] [--modes kvf,baseline]\n"
            "                     [--out DIR] [--json]\n");
}

/* Replays the run's requests at their arrival times, with a progress line every 5 s. */
static void run_mode(e2e_run *R, const char *tag)
{
    pthread_t th[256];
    pthread_mutex_init(&R->mu, NULL);
    R->t0 = bench_now();
    for (int i = 0; i < R->concurrency; i++)
        pthread_create(&th[i], NULL, worker_main, R);
    for (double last = R->t0; atomic_load(&R->n_done) < R->n; usleep(50000)) {
        if (bench_now() - last < 5)
            continue;
        last = bench_now();
        double t = last - R->t0;
        size_t arrived = 0, d = atomic_load(&R->n_done);
        while (arrived < R->n && R->r[arrived].arrival <= t)
            arrived++;
        bench_progress("e2e", "%s: %.0f s, %zu/%zu arrived, %zu done, %zu in flight", tag, t,
                       arrived, R->n, d, arrived - d);
    }
    for (int i = 0; i < R->concurrency; i++)
        pthread_join(th[i], NULL);
    pthread_mutex_destroy(&R->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* The command */

#define PROCEED (-1) /* a step's answer when the command goes on; otherwise its exit status */

typedef struct opts {
    const char *config, *state, *trace, *modes, *out_dir;
    long start, warmup, max_req, block, max_in, max_out, conc;
    double scale, slo_ms;
    int json;
} opts;

/* The options that take a value: where each goes in opts, read as a string (s), an integer (l)
 * or a number (d). */
static const struct {
    const char *name;
    char kind;
    size_t at;
} options[] = {{"--config", 's', offsetof(opts, config)},
               {"--state", 's', offsetof(opts, state)},
               {"--trace", 's', offsetof(opts, trace)},
               {"--modes", 's', offsetof(opts, modes)},
               {"--out", 's', offsetof(opts, out_dir)},
               {"--start", 'l', offsetof(opts, start)},
               {"--warmup", 'l', offsetof(opts, warmup)},
               {"--max-requests", 'l', offsetof(opts, max_req)},
               {"--block-tokens", 'l', offsetof(opts, block)},
               {"--max-input", 'l', offsetof(opts, max_in)},
               {"--max-output", 'l', offsetof(opts, max_out)},
               {"--concurrency", 'l', offsetof(opts, conc)},
               {"--time-scale", 'd', offsetof(opts, scale)},
               {"--slo-ttft-ms", 'd', offsetof(opts, slo_ms)}};

/* Everything one kvf-bench e2e holds; bench_e2e_main() releases what was acquired. */
typedef struct e2e {
    opts o;
    char state_path[600], od[620];
    const char *out_dir; /* o.out_dir, or od */
    json_t *st;          /* the cluster's state file */
    const char *model;   /* in st */
    kvfe_model m;
    char sched[160];
    kvfe_router *rt;
    e2e_rec *base, *warm_r; /* the measured requests and the warm-up's */
    size_t n, n_warm, truncated;
    double span; /* s of arrivals */
    e2e_owners own;
    e2e_run runs[2];
    int n_runs;
    e2e_summary sm[2];
} e2e;

/* Sets option a to v. Returns whether a takes a value; *end is where a number stopped. */
static int set_opt(opts *o, const char *a, const char *v, char **end)
{
    for (size_t k = 0; k < sizeof options / sizeof options[0]; k++) {
        char *p = (char *)o + options[k].at;
        if (strcmp(a, options[k].name) != 0)
            continue;
        if (options[k].kind == 's')
            *(const char **)p = v;
        else if (options[k].kind == 'l')
            *(long *)p = strtol(v, end, 10);
        else
            *(double *)p = strtod(v, end);
        return 1;
    }
    return 0;
}

static int parse_opts(int argc, char **argv, opts *o)
{
    *o = (opts){.trace = "data/traces/conversation_head1600.jsonl",
                .modes = "kvf,baseline",
                .max_req = 200,
                .block = 64,
                .max_in = 4096,
                .max_out = 64,
                .conc = 64,
                .scale = 1};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--json")) {
            o->json = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !v) {
            usage();
            return strcmp(a, "--help") ? 2 : 0;
        }
        i++;
        if (!set_opt(o, a, v, &end)) {
            fprintf(stderr, "kvf-bench e2e: unknown option %s\n", a);
            usage();
            return 2;
        }
        if (end && *end) {
            fprintf(stderr, "kvf-bench e2e: %s: \"%s\" is not a number\n", a, v);
            return 2;
        }
    }
    if (o->warmup > o->start)
        o->warmup = o->start; /* the requests before --start, as many as there are */
    if (o->start < 0 || o->warmup < 0 || o->max_req < 1 || o->block < 1 || o->block > 4096 ||
        o->max_in < 64 || o->max_out < 1 || o->conc < 1 || o->conc > 256 || !(o->scale > 0) ||
        o->slo_ms < 0) {
        fprintf(stderr, "kvf-bench e2e: --max-requests >= 1, --block-tokens 1..4096, "
                        "--max-input >= 64, --max-output >= 1, --concurrency 1..256, "
                        "--time-scale > 0\n");
        return 2;
    }
    return PROCEED;
}

/* Reads the cluster's state file (written by kvf cluster up: --state, or the one in the e2e_run
 * folder of --config, build/cluster/NAME/ when it names none) for the model and kvf-sched, opens
 * the router over kvf-sched's engines and makes the output folder (beside the state file unless
 * --out names one). */
static int open_cluster(e2e *E)
{
    json_t *c = E->o.state || !E->o.config ? NULL : json_load_file(E->o.config, 0, NULL);
    const char *rd = json_string_value(json_object_get(c, "run_dir"));
    const char *nm = json_string_value(json_object_get(c, "name"));
    if (E->o.state)
        snprintf(E->state_path, sizeof E->state_path, "%s", E->o.state);
    else if (rd)
        snprintf(E->state_path, sizeof E->state_path, "%s/state.json", rd);
    else
        snprintf(E->state_path, sizeof E->state_path, "build/cluster/%s/state.json",
                 nm ? nm : "local");
    json_decref(c);
    if (!E->o.state && !E->o.config) {
        usage();
        return 2;
    }
    json_error_t je;
    E->st = json_load_file(E->state_path, 0, &je);
    if (!E->st) {
        fprintf(stderr, "kvf-bench e2e: %s: %s (is the cluster up? kvf cluster up --config ...)\n",
                E->state_path, je.text);
        return 1;
    }
    E->model = json_string_value(json_object_get(E->st, "model"));
    if (!E->model || kvfe_model_preset(E->model, &E->m) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s names no model this driver knows\n", E->state_path);
        return 1;
    }
    char err[512];
    snprintf(E->sched, sizeof E->sched, "%s", json_string_value(json_object_get(E->st, "sched")));
    if (kvfe_router_open(&E->rt, E->sched, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s\n", err);
        return 1;
    }
    char *slash = strrchr(E->state_path, '/');
    snprintf(E->od, sizeof E->od, "%.*s/e2e", slash ? (int)(slash - E->state_path) : 1,
             slash ? E->state_path : ".");
    E->out_dir = E->o.out_dir ? E->o.out_dir : E->od;
    mkdir(E->out_dir, 0755);
    return PROCEED;
}

/* Reads max trace records from skip on as requests; *out holds at least one (caller frees with
 * free_requests()). Returns the number of prompts cut at --max-input, or -1 (said on stderr). */
static long load_requests(const e2e *E, size_t skip, size_t max, e2e_rec **out, size_t *n)
{
    const opts *o = &E->o;
    bench_trace_rec *tr;
    char err[512];
    if (bench_trace_load(o->trace, skip, max, &tr, n, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s\n", err);
        return -1;
    }
    kvf_keyspace ks;
    kvf_keyspace_init(&ks, &E->m.layout, NULL, 0);
    long cut = 0;
    *out = calloc(*n ? *n : 1, sizeof **out);
    for (size_t i = 0; *out && i < *n; i++) {
        cut += build_request(&tr[i], o->block, o->max_in, o->max_out, &E->m, &ks, &(*out)[i]);
        (*out)[i].arrival = (tr[i].arrival - tr[0].arrival) / o->scale;
    }
    bench_trace_free(tr, *n);
    if (!*out)
        fprintf(stderr, "kvf-bench e2e: out of memory for %zu requests\n", *n);
    return *out ? cut : -1;
}

static void free_requests(e2e_rec *r, size_t n)
{
    for (size_t i = 0; r && i < n; i++) {
        free(r[i].tokens);
        free(r[i].keys);
    }
    free(r);
}

/* The measured requests (--start, --max-requests) and the warm-up's (the --warmup before them). */
static int load_workload(e2e *E)
{
    const opts *o = &E->o;
    long cut = load_requests(E, (size_t)o->start, (size_t)o->max_req, &E->base, &E->n);
    if (cut >= 0 && E->n == 0)
        fprintf(stderr, "kvf-bench e2e: %s has no request from %ld on\n", o->trace, o->start);
    if (cut < 0 || E->n == 0)
        return 1;
    if (o->warmup > 0 && load_requests(E, (size_t)(o->start - o->warmup), (size_t)o->warmup,
                                       &E->warm_r, &E->n_warm) < 0)
        return 1;
    E->truncated = (size_t)cut;
    E->span = E->base[E->n - 1].arrival;
    bench_progress("e2e",
                   "%zu requests of %s from #%ld, %ld tokens per trace block, %.0f s of arrivals "
                   "(time scale %.2f), %zu prompts cut to %ld tokens; %zu engines via kvf-sched %s",
                   E->n, o->trace, o->start, o->block, E->span, o->scale, E->truncated, o->max_in,
                   kvfe_router_engine_count(E->rt), E->sched);
    return PROCEED;
}

/* One e2e_run per mode of --modes (kvf, baseline), each with its own records of the same requests.
 * Who computed which chunk is kept for the cross-engine reuse figure (warm-up and kvf run). */
static int init_runs(e2e *E)
{
    E->own.mask = (1u << 20) - 1;
    E->own.chunk_tokens = E->m.layout.chunk_tokens;
    E->own.key = calloc(E->own.mask + 1, sizeof *E->own.key);
    E->own.eng = calloc(E->own.mask + 1, sizeof *E->own.eng);
    char mbuf[64];
    snprintf(mbuf, sizeof mbuf, "%s", E->o.modes);
    for (char *sv = NULL, *t = strtok_r(mbuf, ",", &sv); t && E->n_runs < 2;
         t = strtok_r(NULL, ",", &sv)) {
        if (strcmp(t, "kvf") && strcmp(t, "baseline")) {
            fprintf(stderr, "kvf-bench e2e: --modes takes kvf and baseline\n");
            return 2;
        }
        e2e_run *R = &E->runs[E->n_runs++];
        R->mode = strcmp(t, "kvf") ? "baseline" : "kvf";
        R->n = E->n;
        R->r = calloc(E->n, sizeof *R->r);
        if (R->r) /* the requests, with nothing happened yet */
            memcpy(R->r, E->base, E->n * sizeof *R->r);
        R->rt = E->rt;
        R->own = strcmp(R->mode, "kvf") ? NULL : &E->own;
        R->slo_s = E->o.slo_ms / 1e3;
        R->concurrency = (int)E->o.conc;
        if (!R->r || !E->own.key || !E->own.eng) {
            fprintf(stderr, "kvf-bench e2e: out of memory for the %s run\n", R->mode);
            return 1;
        }
    }
    return PROCEED;
}

/* Runs each mode and summarizes it; the kvf e2e_run starts from cleared stores and the warm-up. */
static int run_all(e2e *E)
{
    char err[512];
    for (int k = 0; k < E->n_runs; k++) {
        e2e_run *R = &E->runs[k];
        if (!strcmp(R->mode, "kvf")) {
            if (clear_stores(json_object_get(E->st, "stores"), &E->m.layout, err, sizeof err) != 0)
                bench_progress("e2e", "warning: %s", err);
            if (E->n_warm && warm_up(E->warm_r, E->n_warm, E->rt, &E->own) != 0)
                bench_progress("e2e", "warning: some warm-up requests failed");
        }
        uint64_t l0, s0, l1, s1;
        kvfe_router_kv_bytes(E->rt, &l0, &s0);
        bench_progress("e2e", "run %d/%d: %s", k + 1, E->n_runs,
                       strcmp(R->mode, "kvf") ? "without kvfabric (colocated, every prefill from "
                                                "scratch)"
                                              : "with kvfabric (placed by kvf-sched, "
                                                "disaggregated, prefix cache in the stores)");
        run_mode(R, R->mode);
        kvfe_router_kv_bytes(E->rt, &l1, &s1);
        e2e_summarize(R, &E->sm[k]);
        E->sm[k].load_bytes = l1 - l0;
        E->sm[k].save_bytes = s1 - s0;
    }
    return PROCEED;
}

/* Says why the first three failed requests of each e2e_run failed, and compares the generated
 * tokens of the two runs request by request, where both served it. */
static void check_runs(const e2e *E, size_t *compared, size_t *differ)
{
    *compared = *differ = 0;
    for (int k = 0; k < E->n_runs; k++) {
        int shown = 0;
        for (size_t i = 0; i < E->n && shown < 3; i++)
            if (E->runs[k].r[i].failed) {
                fprintf(stderr, "kvf-bench e2e: %s: request %zu failed: %s\n", E->runs[k].mode, i,
                        E->runs[k].r[i].err);
                shown++;
            }
    }
    for (size_t i = 0; E->n_runs == 2 && i < E->n; i++) {
        const e2e_rec *a = &E->runs[0].r[i], *b = &E->runs[1].r[i];
        if (a->failed || b->failed || a->rt.rejected || b->rt.rejected)
            continue;
        (*compared)++;
        *differ += a->tokens_hash != b->tokens_hash || a->n_generated != b->n_generated;
    }
}

static void print_table(const e2e *E)
{
    const e2e_summary *sm = E->sm;
    printf("\nkvf-bench e2e: %zu requests, %zu engines, model %s, %s, all figures real\n", E->n,
           kvfe_router_engine_count(E->rt), E->model,
           json_is_true(json_object_get(E->st, "netns")) ? "network namespaces" : "loopback");
    printf("%-10s %9s %9s %9s %9s %9s %8s %8s %8s %9s %9s %6s\n", "mode", "TTFT p50", "p90", "p99",
           "ITL mean", "ITL p99", "req/s", "hit dev", "hit str", "MB in", "MB out", "failed");
    for (int k = 0; k < E->n_runs; k++)
        printf(
            "%-10s %8.3fs %8.3fs %8.3fs %7.2fms %7.2fms %8.2f %7.1f%% %7.1f%% %8.1fM %8.1fM %6zu\n",
            E->runs[k].mode, sm[k].ttft_p50, sm[k].ttft_p90, sm[k].ttft_p99, sm[k].itl_mean * 1e3,
            sm[k].itl_p99 * 1e3, sm[k].rps, sm[k].device_hit * 100, sm[k].store_hit * 100,
            (double)sm[k].load_bytes / 1e6, (double)sm[k].save_bytes / 1e6,
            sm[k].failed + sm[k].rejected);
    for (int k = 0; k < E->n_runs; k++)
        if (!strcmp(E->runs[k].mode, "kvf"))
            printf("cross-engine reuse: %zu requests loaded a prefix another engine computed "
                   "(%.1f%% of all prompt tokens)\ntransport of every transfer: %s (%s)\n",
                   sm[k].cross_requests, sm[k].cross_hit * 100,
                   E->runs[k].transport[0] ? E->runs[k].transport : "none",
                   E->runs[k].transport_why);
}

/* The result object; with both runs, it also prints TTFT p50 with kvfabric over without against
 * the target of 0.5. */
static json_t *result_json(const e2e *E, size_t compared, size_t differ)
{
    json_t *summaries = json_object();
    for (int k = 0; k < E->n_runs; k++)
        json_object_set_new(summaries, E->runs[k].mode, e2e_summary_json(&E->sm[k], &E->runs[k]));
    json_t *res = json_pack(
        "{s:s,s:o,s:i,s:I,s:I,s:I,s:I,s:f,s:I,s:I,s:s,s:s}", "bench", "e2e", "summary", summaries,
        "engines", (int)kvfe_router_engine_count(E->rt), "requests", (json_int_t)E->n, "start",
        (json_int_t)E->o.start, "warmup", (json_int_t)E->n_warm, "block_tokens",
        (json_int_t)E->o.block, "time_scale", E->o.scale, "tokens_compared", (json_int_t)compared,
        "tokens_differ", (json_int_t)differ, "out", E->out_dir, "label", "real");
    if (E->n_runs != 2)
        return res;
    const e2e_summary *kv = !strcmp(E->runs[0].mode, "kvf") ? &E->sm[0] : &E->sm[1];
    const e2e_summary *bl = kv == &E->sm[0] ? &E->sm[1] : &E->sm[0];
    double ratio = bl->ttft_p50 > 0 ? kv->ttft_p50 / bl->ttft_p50 : 0;
    json_object_set_new(res, "ttft_p50_ratio", json_real(ratio));
    json_object_set_new(res, "ttft_p50_target_met", json_boolean(ratio > 0 && ratio <= 0.5));
    printf("TTFT p50 with kvfabric / without: %.3f (target <= 0.5: %s); generated tokens "
           "identical in %zu of %zu requests compared\n",
           ratio, ratio > 0 && ratio <= 0.5 ? "met" : "NOT met", compared - differ, compared);
    return res;
}

/* Writes the records, plots, table and summary. Returns the exit status: 1 when a request failed,
 * a first token differed between prefill and decode, or the runs generated different tokens. */
static int report(e2e *E)
{
    size_t compared, differ;
    check_runs(E, &compared, &differ);
    e2e_write_records(E->out_dir, E->runs, E->n_runs);
    double bin = E->span / 20 > 1 ? E->span / 20 : 1;
    int plotted = e2e_plot(E->out_dir, E->runs, E->n_runs, bin) == 0;
    print_table(E);
    json_t *res = result_json(E, compared, differ);
    printf("records: %s/records.csv, %s/records.json; plots: %s\n", E->out_dir, E->out_dir,
           plotted ? "ttft_cdf.png, throughput.png" : "not drawn (gnuplot missing or failed)");
    char sp[700];
    snprintf(sp, sizeof sp, "%s/summary.json", E->out_dir);
    json_dump_file(res, sp, JSON_INDENT(2));
    bench_emit(res, E->o.json);
    json_decref(res);
    size_t failed = differ;
    for (int k = 0; k < E->n_runs; k++)
        failed += E->sm[k].failed + E->sm[k].mismatches;
    return failed ? 1 : 0;
}

int bench_e2e_main(int argc, char **argv)
{
    static int (*const steps[])(e2e *) = {open_cluster, load_workload, init_runs, run_all, report};
    e2e *E = calloc(1, sizeof *E);
    if (!E) {
        fprintf(stderr, "kvf-bench e2e: out of memory\n");
        return 1;
    }
    pthread_mutex_init(&E->own.mu, NULL);
    int rc = parse_opts(argc, argv, &E->o);
    for (size_t i = 0; rc == PROCEED && i < sizeof steps / sizeof steps[0]; i++)
        rc = steps[i](E);
    for (int k = 0; k < E->n_runs; k++)
        free(E->runs[k].r);
    free_requests(E->base, E->n);
    free_requests(E->warm_r, E->n_warm);
    free(E->own.key);
    free(E->own.eng);
    pthread_mutex_destroy(&E->own.mu);
    kvfe_router_close(&E->rt);
    json_decref(E->st);
    free(E);
    return rc;
}
