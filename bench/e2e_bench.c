/*
 * kvf-bench e2e: replays a Mooncake-format trace against a running cluster (kvf cluster up) with
 * kvfabric and with a fair baseline, alternately (kvf, baseline, kvf, baseline, ...) for
 * --repetitions, every run from the same state, and reports what each request saw, every figure
 * with its spread over the repetitions, and kvfabric's over the baseline's, repetition by
 * repetition. Every figure is measured on real processes and labelled real.
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
 * baseline: the same engines with their own prefix cache on (the KV of an engine's last sequence
 * stays in its pages and a prompt that starts with it reuses it) and no store: every prompt goes
 * whole to one engine, chosen by the prefix each engine was last sent (--baseline-route prefix)
 * or by load (least-loaded), which prefills and decodes it (colocated). Its TTFT is the arrival to
 * the reply less the decode time the engine reports.
 *
 * Every run starts from the state the warm-up left (e2e_state.c): the stores hold exactly the
 * warm-up's chunks, the engines' pages are reset and the warm-up engines hold the last prompt of
 * their share, prefilled again in the run's own mode.
 *
 * Output in --out: records.csv and records.json (one record per request and run), summary.json,
 * ttft_cdf.png and throughput.png (gnuplot). Generated tokens are compared request by request
 * across every run.
 */
#include "bench.h"
#include "bench_util.h"
#include "e2e.h"
#include "engine.h"
#include "auth.h"
#include "http.h"
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

/* ------------------------------------------------------------------------------------------ */
/* One request */

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
    if (rt->first_token_streamed || (!s->baseline && !rt->colocated))
        q->ttft = rt->first_token_at - R->t0 - q->arrival;
    q->cross_tokens = e2e_owners_note(R->own, q, rt->prefill, rt->loaded_tokens, rt->saved_tokens);
    pthread_mutex_lock(&R->mu);
    if (rt->transport[0] && !R->transport[0]) {
        snprintf(R->transport, sizeof R->transport, "%s", rt->transport);
        snprintf(R->transport_why, sizeof R->transport_why, "%s", rt->transport_reason);
    }
    pthread_mutex_unlock(&R->mu);
}

/* Takes the generated tokens and the decode's figures of a request served. TTFT is when the
 * first token arrived: streamed by the engine the moment its pass gave it (both modes, where the
 * engine streams), or with the prefill's reply. A request sent whole to an engine that does not
 * stream has its first token only with the reply: TTFT is then the reply's time less the decode
 * time the engine reports. */
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
    pthread_mutex_lock(&s->R->mu);
    s->R->shm_bytes += rt->shm_bytes;
    s->R->net_bytes += rt->net_bytes;
    pthread_mutex_unlock(&s->R->mu);
    double t = rt->done_at - s->R->t0;
    q->e2e = t - q->arrival;
    q->finish = t;
    if ((s->baseline || rt->colocated) && !rt->first_token_streamed)
        q->ttft = q->e2e - rt->decode_s;
}

/* kvf: placed by kvf-sched, prefilled, handed off and decoded; baseline: sent whole to the engine
 * the run's rule picks, which reuses its own pages only. */
static void serve_request(e2e_run *R, e2e_rec *q)
{
    int baseline = !strcmp(R->mode, "baseline");
    routed s = {.R = R, .q = q, .baseline = baseline};
    q->rt.slo_ttft_ms = R->slo_s > 0 ? R->slo_s * 1e3 : 0;
    q->rt.on_prefill = take_prefill;
    q->rt.arg = &s;
    int rc = baseline ? kvfe_router_generate(R->rt, kvfe_router_pick(R->rt, &q->rt, R->pick),
                                             KVFE_REUSE_ENGINE, &q->rt)
                      : kvfe_router_serve(R->rt, &q->rt);
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

/* Replays the run's requests at their arrival times, with a progress line every 5 s. */
static void run_mode(e2e_run *R, const char *tag)
{
    pthread_t th[256];
    double load[1];
    R->loadavg = getloadavg(load, 1) == 1 ? load[0] : -1;
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

/* The repetitions of each mode when --repetitions is not given: README command 1 (cluster/demo.sh)
 * runs them within about 5 minutes on a 2-core machine. */
#define DEFAULT_REPETITIONS 3

typedef struct opts {
    const char *config, *state, *trace, *modes, *out_dir, *route, *report;
    long start, warmup, max_req, block, max_in, max_out, conc, reps;
    double scale, slo_ms;
    int json, require_targets;
} opts;

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
    e2e_start start; /* what every run starts from; all zero until opened */
    e2e_run *runs;   /* in the order they run: kvf, baseline, kvf, baseline, ... */
    e2e_summary *sm;
    int n_runs;
    kvfe_pick pick; /* the baseline's rule */
} e2e;

/* The model's KV layout and vocabulary: a reference engine's preset, or, for engines of the
 * Python package, the file the cluster's calibration wrote (layout_file in the state: {"layout":
 * {...}, "vocab": N}). Only the layout and the vocabulary are used here. Returns 0 or 1 after
 * saying why. */
static int model_of_state(e2e *E)
{
    const char *lf = json_string_value(json_object_get(E->st, "layout_file"));
    if (E->model && !lf && kvfe_model_preset(E->model, &E->m) == 0)
        return 0;
    if (!lf) {
        fprintf(stderr, "kvf-bench e2e: %s names no model this driver knows\n", E->state_path);
        return 1;
    }
    json_error_t je;
    json_t *o = json_load_file(lf, 0, &je), *l = json_object_get(o, "layout"),
           *v = json_object_get(o, "vocab");
    char *text = json_is_object(l) ? json_dumps(l, JSON_COMPACT) : NULL;
    char err[300] = "no \"layout\" object";
    int rc = !text || !json_is_integer(v) || json_integer_value(v) < 2 ||
             json_integer_value(v) > UINT32_MAX ||
             kvf_layout_from_json(text, strlen(text), &E->m.layout, err, sizeof err) != 0;
    if (rc)
        fprintf(stderr, "kvf-bench e2e: %s: %s\n", lf,
                o ? (text && !json_is_integer(v) ? "no \"vocab\" integer" : err) : je.text);
    else
        E->m.vocab = (uint32_t)json_integer_value(v);
    free(text);
    json_decref(o);
    return rc;
}

static int parse_opts(int argc, char **argv, opts *o)
{
    *o = (opts){.trace = "data/traces/conversation_head1600.jsonl",
                .modes = "kvf,baseline",
                .route = "prefix",
                .reps = DEFAULT_REPETITIONS,
                .max_req = 200,
                .block = 64,
                .max_in = 4096,
                .max_out = 64,
                .conc = 64,
                .scale = 1};
    static const char *const routes[] = {"prefix", "least-loaded", NULL};
    const kvf__arg args[] = {
        KVF__OPT("config", KVF__ARG_STR, &o->config, "CLUSTER.json",
                 "the cluster, started by kvf cluster up --config (its state file is found "
                 "there)",
                 NULL),
        KVF__OPT("state", KVF__ARG_STR, &o->state, "STATE.json",
                 "the cluster's state file, instead of --config", NULL),
        KVF__OPT("trace", KVF__ARG_STR, &o->trace, "FILE", "the request trace to replay",
                 "data/traces/conversation_head1600.jsonl"),
        KVF__OPT("start", KVF__ARG_LONG, &o->start, "N",
                 "the trace's request to start at (the ones before are the warm-up's)", "0",
                 .lo = 0, .hi = 1e9),
        KVF__OPT("warmup", KVF__ARG_LONG, &o->warmup, "W",
                 "requests before --start sent first, unmeasured, to fill the caches", "0", .lo = 0,
                 .hi = 1e9),
        KVF__OPT("max-requests", KVF__ARG_LONG, &o->max_req, "N", "the requests measured", "200",
                 .lo = 1, .hi = 1e9),
        KVF__OPT("time-scale", KVF__ARG_REAL, &o->scale, "X",
                 "the trace's arrival times multiplied by X (below 1: faster)", "1", .lo = 1e-9,
                 .hi = 1e9),
        KVF__OPT("block-tokens", KVF__ARG_LONG, &o->block, "B", "tokens per hash id of the trace",
                 "64", .lo = 1, .hi = 4096),
        KVF__OPT("max-input", KVF__ARG_LONG, &o->max_in, "T", "prompts cut to T tokens", "4096",
                 .lo = 64, .hi = 1 << 20),
        KVF__OPT("max-output", KVF__ARG_LONG, &o->max_out, "T", "outputs cut to T tokens", "64",
                 .lo = 1, .hi = 1 << 20),
        KVF__OPT("slo-ttft-ms", KVF__ARG_REAL, &o->slo_ms, "M",
                 "the TTFT objective in milliseconds (SLO attainment; the CDF's line)", "none",
                 .lo = 0, .hi = 1e9),
        KVF__OPT("concurrency", KVF__ARG_LONG, &o->conc, "C", "requests in flight at most", "64",
                 .lo = 1, .hi = 256),
        KVF__OPT("modes", KVF__ARG_STR, &o->modes, "M[,M]",
                 "kvf (with kvfabric), baseline (the same engines without it), or both",
                 "kvf,baseline"),
        KVF__OPT("repetitions", KVF__ARG_LONG, &o->reps, "N",
                 "runs of each mode; the figures are medians of them", "3", .lo = 1,
                 .hi = MAX_REPETITIONS),
        KVF__OPT("baseline-route", KVF__ARG_CHOICE, &o->route, "R",
                 "how the baseline places: by prefix (each engine's own cache) or least loaded",
                 "prefix", .choices = routes),
        KVF__OPT("out", KVF__ARG_STR, &o->out_dir, "DIR", "where the records, summary and plots go",
                 "beside the state file"),
        KVF__OPT("report", KVF__ARG_STR, &o->report, "DIR",
                 "judge the records a run wrote in DIR again and redraw its plots, without a "
                 "cluster",
                 NULL),
        KVF__OPT("require-targets", KVF__ARG_FLAG, &o->require_targets, NULL,
                 "exit 3 when a target of the verdict is not met or not judged", NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
    };
    int rc = bench_args("e2e",
                        "--config CLUSTER.json | --state STATE.json [OPTIONS]\n       kvf-bench "
                        "e2e --report DIR [--slo-ttft-ms M] [--require-targets] [--json]",
                        "Replays a request trace against a running cluster, with kvfabric and "
                        "without, and reports TTFT, inter-token latency, throughput, hit rates "
                        "and SLO attainment with a verdict (docs/benchmarks.md).",
                        "exit status: 0 done; 1 a request failed, a first token or the generated "
                        "tokens differed, or the cluster or the records could not be read; 2 bad "
                        "usage; 3 (with --require-targets) a target of the verdict not met or not "
                        "judged.",
                        args, sizeof args / sizeof args[0], argc, argv);
    if (rc != 0)
        return rc > 0 ? 0 : 2;
    if (o->warmup > o->start)
        o->warmup = o->start; /* the requests before --start, as many as there are */
    if (o->start < 0 || o->warmup < 0 || o->max_req < 1 || o->block < 1 || o->block > 4096 ||
        o->max_in < 64 || o->max_out < 1 || o->conc < 1 || o->conc > 256 || !(o->scale > 0) ||
        o->slo_ms < 0 || o->reps < 1 || o->reps > MAX_REPETITIONS ||
        (strcmp(o->route, "prefix") && strcmp(o->route, "least-loaded"))) {
        fprintf(stderr,
                "kvf-bench e2e: --max-requests >= 1, --block-tokens 1..4096, "
                "--max-input >= 64, --max-output >= 1, --concurrency 1..256, "
                "--time-scale > 0, --repetitions 1..%d, --baseline-route prefix or "
                "least-loaded\n",
                MAX_REPETITIONS);
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
        fprintf(stderr, "kvf-bench e2e: needs --config CLUSTER.json, --state STATE.json or "
                        "--report DIR (see --help)\n");
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
    if (model_of_state(E) != 0)
        return 1;
    char err[512], tokens[600];
    snprintf(E->sched, sizeof E->sched, "%s", json_string_value(json_object_get(E->st, "sched")));
    /* The launcher's token for kvf-sched lies beside the state file. */
    char *dir = strrchr(E->state_path, '/');
    snprintf(tokens, sizeof tokens, "%.*s/sched.tokens", dir ? (int)(dir - E->state_path) : 1,
             dir ? E->state_path : ".");
    kvf__sched_token_from_file(tokens);
    /* And its credential for the stores: the chunk keys depend on the tenant's salt. */
    snprintf(tokens, sizeof tokens, "%.*s", dir ? (int)(dir - E->state_path) : 1,
             dir ? E->state_path : ".");
    kvf__auth_cred_from_dir(tokens);
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
    if (bench_keyspace(&ks, &E->m.layout, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s\n", err);
        bench_trace_free(tr, *n);
        return -1;
    }
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

/* The modes of --modes in their order (kvf, baseline): 1 or 2, in modes; 0 after saying why. */
static int parse_modes(const char *list, const char *modes[2])
{
    char mbuf[64];
    int n = 0;
    snprintf(mbuf, sizeof mbuf, "%s", list);
    for (char *sv = NULL, *t = strtok_r(mbuf, ",", &sv); t; t = strtok_r(NULL, ",", &sv)) {
        const char *m = !strcmp(t, "kvf") ? "kvf" : !strcmp(t, "baseline") ? "baseline" : NULL;
        if (!m || n == 2 || (n == 1 && !strcmp(modes[0], m))) {
            fprintf(stderr, "kvf-bench e2e: --modes takes kvf and baseline, each once\n");
            return 0;
        }
        modes[n++] = m;
    }
    if (!n)
        fprintf(stderr, "kvf-bench e2e: --modes names no mode\n");
    return n;
}

/* The runs: each mode of --modes once per repetition, alternately (kvf, baseline, kvf, ...), each
 * with its own records of the same requests, and what every run starts from. */
static int init_runs(e2e *E)
{
    const char *modes[2];
    int n_modes = parse_modes(E->o.modes, modes);
    if (!n_modes)
        return 2;
    E->own.chunk_tokens = E->m.layout.chunk_tokens;
    E->pick = strcmp(E->o.route, "prefix") ? KVFE_PICK_LEAST_LOADED : KVFE_PICK_PREFIX;
    E->n_runs = n_modes * (int)E->o.reps;
    E->runs = calloc((size_t)E->n_runs, sizeof *E->runs);
    E->sm = calloc((size_t)E->n_runs, sizeof *E->sm);
    for (int k = 0; E->runs && E->sm && k < E->n_runs; k++) {
        e2e_run *R = &E->runs[k];
        R->mode = modes[k % n_modes];
        R->rep = k / n_modes + 1;
        R->n = E->n;
        R->r = calloc(E->n, sizeof *R->r);
        if (!R->r)
            break;
        memcpy(R->r, E->base, E->n * sizeof *R->r); /* the requests, with nothing happened yet */
        R->rt = E->rt;
        R->pick = E->pick;
        R->own = strcmp(R->mode, "kvf") ? NULL : &E->own;
        R->slo_s = E->o.slo_ms / 1e3;
        R->concurrency = (int)E->o.conc;
    }
    for (int k = 0; k < E->n_runs; k++)
        if (!E->runs || !E->sm || !E->runs[k].r) {
            fprintf(stderr, "kvf-bench e2e: out of memory for %d runs\n", E->n_runs);
            return 1;
        }
    char err[512];
    if (e2e_start_open(&E->start, json_object_get(E->st, "stores"), &E->m.layout, E->rt, E->warm_r,
                       E->n_warm, E->base, E->n, &E->own, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s\n", err);
        return 1;
    }
    return PROCEED;
}

/* The warm-up once, then every run in turn from the state the warm-up left, each summarized. */
static int run_all(e2e *E)
{
    if (e2e_start_warm(&E->start) != 0)
        return 1;
    for (int k = 0; k < E->n_runs; k++) {
        e2e_run *R = &E->runs[k];
        int kvf = !strcmp(R->mode, "kvf");
        if (e2e_start_restore(&E->start, kvf ? KVFE_REUSE_ALL : KVFE_REUSE_ENGINE) != 0)
            return 1;
        uint64_t l0, s0, l1, s1;
        kvfe_router_kv_bytes(E->rt, &l0, &s0);
        bench_progress("e2e", "run %d/%d (repetition %d of %ld): %s", k + 1, E->n_runs, R->rep,
                       E->o.reps,
                       kvf ? "with kvfabric (placed by kvf-sched, disaggregated, prefix cache in "
                             "the stores)"
                           : "baseline (colocated, each engine's own prefix cache, no store)");
        char tag[32];
        snprintf(tag, sizeof tag, "%s #%d", R->mode, R->rep);
        run_mode(R, tag);
        kvfe_router_kv_bytes(E->rt, &l1, &s1);
        e2e_summarize(R, &E->sm[k]);
        E->sm[k].load_bytes = l1 - l0;
        E->sm[k].save_bytes = s1 - s0;
    }
    return PROCEED;
}

/* Says why the first three failed requests of each run failed, and compares the generated tokens
 * of every run request by request (e2e_compare_tokens). */
static void check_runs(const e2e *E, size_t *compared, size_t *differ)
{
    for (int k = 0; k < E->n_runs; k++) {
        int shown = 0;
        for (size_t i = 0; i < E->n && shown < 3; i++)
            if (E->runs[k].r[i].failed) {
                fprintf(stderr, "kvf-bench e2e: %s #%d: request %zu failed: %s\n", E->runs[k].mode,
                        E->runs[k].rep, i, E->runs[k].r[i].err);
                shown++;
            }
    }
    e2e_compare_tokens(E->runs, E->n_runs, E->n, compared, differ);
}

/* The result object: each mode's summary over its repetitions, the ratios and the verdict (which
 * e2e_report_ratios() prints with the table). */
static json_t *result_json(const e2e *E, size_t compared, size_t differ)
{
    /* the cluster's engines reach a shared GPU through MPS (kvf cluster's "gpu_share"): said in
     * the table's first line and the summary, so that a run's results say how it ran */
    const char *gpu_share = json_string_value(json_object_get(E->st, "gpu_share"));
    int mps = gpu_share && !strcmp(gpu_share, "mps");
    char where[96];
    snprintf(where, sizeof where, "%s%s",
             json_is_true(json_object_get(E->st, "netns")) ? "network namespaces" : "loopback",
             mps ? ", the engines' GPU shared through MPS" : "");
    e2e_report rp = {.runs = E->runs,
                     .sm = E->sm,
                     .n_runs = E->n_runs,
                     .reps = (int)E->o.reps,
                     .n_requests = E->n,
                     .n_engines = kvfe_router_engine_count(E->rt),
                     .model = E->model,
                     .where = where,
                     .baseline_routing = E->o.route};
    json_t *summaries = e2e_summaries_json(&rp);
    json_t *res = json_pack(
        "{s:s,s:o,s:i,s:I,s:I,s:I,s:I,s:I,s:f,s:I,s:I,s:s,s:s,s:s,s:s}", "bench", "e2e", "summary",
        summaries, "engines", (int)rp.n_engines, "requests", (json_int_t)E->n, "repetitions",
        (json_int_t)E->o.reps, "start", (json_int_t)E->o.start, "warmup", (json_int_t)E->n_warm,
        "block_tokens", (json_int_t)E->o.block, "time_scale", E->o.scale, "tokens_compared",
        (json_int_t)compared, "tokens_differ", (json_int_t)differ, "baseline_reuse", "engine",
        "baseline_routing", E->o.route, "out", E->out_dir, "label", "real");
    if (E->o.slo_ms > 0)
        json_object_set_new(res, "slo_ttft_ms", json_real(E->o.slo_ms));
    if (E->model)
        json_object_set_new(res, "model", json_string(E->model));
    if (gpu_share) /* "timeslice" or "mps"; absent in states of launchers before it */
        json_object_set_new(res, "gpu_share", json_string(gpu_share));
    e2e_report_ratios(&rp, res);
    printf("generated tokens identical in every run in %zu of %zu requests compared\n",
           compared - differ, compared);
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
    char setup[300];
    snprintf(setup, sizeof setup, "%zu engines of %s, %s", kvfe_router_engine_count(E->rt),
             E->model,
             json_is_true(json_object_get(E->st, "netns")) ? "network namespaces" : "loopback");
    int plotted = e2e_plot(E->out_dir, E->runs, E->n_runs, bin, setup) == 0;
    json_t *res = result_json(E, compared, differ);
    printf("records: %s/records.csv, %s/records.json; plots: %s\n", E->out_dir, E->out_dir,
           plotted ? "ttft_cdf.png, throughput.png" : "not drawn (gnuplot missing or failed)");
    char sp[700];
    snprintf(sp, sizeof sp, "%s/summary.json", E->out_dir);
    json_dump_file(res, sp, JSON_INDENT(2));
    bench_emit(res, E->o.json);
    size_t failed = differ;
    for (int k = 0; k < E->n_runs; k++)
        failed += E->sm[k].failed + E->sm[k].mismatches;
    int met = json_is_true(json_object_get(res, "targets_met"));
    json_decref(res);
    return failed ? 1 : E->o.require_targets && !met ? 3 : 0;
}

int bench_e2e_main(int argc, char **argv)
{
    static int (*const steps[])(e2e *) = {open_cluster, load_workload, init_runs, run_all, report};
    e2e *E = calloc(1, sizeof *E);
    if (!E || e2e_owners_init(&E->own, 0) != 0) {
        fprintf(stderr, "kvf-bench e2e: out of memory\n");
        if (E)
            e2e_owners_free(&E->own);
        free(E);
        return 1;
    }
    int rc = parse_opts(argc, argv, &E->o);
    if (rc == PROCEED && E->o.report)
        rc = e2e_reread(E->o.report, E->o.slo_ms, E->o.require_targets, E->o.json);
    for (size_t i = 0; rc == PROCEED && i < sizeof steps / sizeof steps[0]; i++)
        rc = steps[i](E);
    e2e_start_close(&E->start);
    for (int k = 0; E->runs && k < E->n_runs; k++)
        free(E->runs[k].r);
    free(E->runs);
    free(E->sm);
    free_requests(E->base, E->n);
    free_requests(E->warm_r, E->n_warm);
    e2e_owners_free(&E->own);
    kvfe_router_close(&E->rt);
    json_decref(E->st);
    free(E);
    return rc;
}
