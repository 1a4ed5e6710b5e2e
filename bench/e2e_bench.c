/*
 * kvf-bench e2e: replays a Mooncake-format trace against a running cluster (kvf cluster up) twice,
 * with kvfabric and without it, and reports what each request saw. Every figure is measured on
 * real processes and labelled real.
 *
 *   kvf-bench e2e --config CLUSTER.json | --state RUN_DIR/state.json
 *                 [--trace FILE] [--start N] [--max-requests N] [--time-scale X]
 *                 [--block-tokens B] [--max-input T] [--max-output T] [--slo-ttft-ms M]
 *                 [--concurrency C] [--modes kvf,baseline] [--out DIR] [--json]
 *
 * Each trace hash id becomes B deterministic token ids (B = 512 is the trace's own block; less
 * scales every request down by 512/B, keeping which requests share which prefix), so shared ids
 * mean shared prefixes. Request i is sent at its trace time divided by --time-scale.
 *
 * kvf mode: the driver asks kvf-sched for a placement, sends the prompt to the prefill engine
 * (which loads the cached prefix, computes the rest and saves the new chunks) and then to the
 * decode engine (which takes the KV over from the stores and decodes); a placement that runs the
 * prefill on the decode instance is sent there whole. TTFT is the time from the request's arrival
 * to the first token in the driver's hands.
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
#include "trace.h"

#include "http.h"
#include "kvf/client.h"
#include "kvf/kvf.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#define MAX_ENGINES     64
#define HTTP_TIMEOUT_MS 600000

typedef struct engine_ref {
    char id[64], role[16], endpoint[160];
    atomic_int outstanding;
} engine_ref;

typedef struct rec {
    /* the request */
    double arrival; /* s from the start of the run */
    uint32_t *tokens;
    size_t n;
    uint32_t out_tokens;
    kvf_key *keys; /* its chunk keys */
    size_t n_keys;
    /* what happened, per mode */
    int done, failed, rejected, colocated, mismatch;
    char err[160], prefill[64], decode[64];
    double ttft, e2e, finish, handoff, itl_sum, itl_max;
    double queue_s, prefill_s; /* the prefill engine's: waiting for its turn, then prefilling */
    uint32_t itl_n;
    size_t device_tokens, loaded_tokens;
    uint64_t tokens_hash;
    uint32_t n_generated;
    size_t cross_tokens; /* loaded tokens that another engine computed */
} rec;

/* Which engine computed each chunk first, from the driver's own records, to count cross-engine
 * reuse: a prefix loaded by one engine that another engine computed. */
typedef struct owners {
    pthread_mutex_t mu;
    uint64_t *key; /* the chunk key folded to 64 bits, low bit set; 0: empty */
    const engine_ref **eng;
    size_t mask, used;
    uint32_t chunk_tokens;
} owners;

typedef struct run {
    const char *mode; /* "kvf" or "baseline" */
    owners *own;
    rec *r;
    size_t n;
    engine_ref *eng;
    int n_eng;
    char sched[160];
    double slo_s;
    double t0;
    atomic_size_t next_released, next_taken, n_done;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int concurrency;
    char transport[16], transport_why[240]; /* as the engines report them */
} run;

static double now_s(void)
{
    return bench_now();
}

/* ------------------------------------------------------------------------------------------ */
/* One request */

static json_t *tokens_json(const uint32_t *t, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_integer(t[i]));
    return a;
}

static int post(const char *addr, const char *path, json_t *body, long *status, json_t **reply,
                char *err, size_t errlen)
{
    char url[256];
    snprintf(url, sizeof url, "http://%s%s", addr, path);
    return kvf__http_call("POST", url, body, HTTP_TIMEOUT_MS, status, reply, err, errlen);
}

static double num(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : 0;
}

/* Takes the generated tokens and the engine's figures from a reply. */
static void take_reply(rec *q, json_t *rep)
{
    json_t *toks = json_object_get(rep, "tokens"), *itl = json_object_get(rep, "itl_s");
    XXH64_state_t *h = XXH64_createState();
    XXH64_reset(h, 0);
    for (size_t i = 0; i < json_array_size(toks); i++) {
        uint32_t t = (uint32_t)json_integer_value(json_array_get(toks, i));
        XXH64_update(h, &t, sizeof t);
        q->n_generated++;
    }
    q->tokens_hash = XXH64_digest(h);
    XXH64_freeState(h);
    for (size_t i = 0; i < json_array_size(itl); i++) {
        double v = json_number_value(json_array_get(itl, i));
        q->itl_sum += v;
        q->itl_max = v > q->itl_max ? v : q->itl_max;
        q->itl_n++;
    }
    if (json_is_true(json_object_get(rep, "first_token_mismatch")))
        q->mismatch = 1;
}

static const engine_ref *least_outstanding(run *R)
{
    engine_ref *best = &R->eng[0];
    for (int i = 1; i < R->n_eng; i++)
        if (atomic_load(&R->eng[i].outstanding) < atomic_load(&best->outstanding))
            best = &R->eng[i];
    return best;
}

static engine_ref *engine_by_id(run *R, const char *id)
{
    for (int i = 0; i < R->n_eng; i++)
        if (!strcmp(R->eng[i].id, id))
            return &R->eng[i];
    return NULL;
}

/* Sends a request to an engine, counting it as outstanding there. Returns 0 with the reply, or
 * -1 with the reason. */
static int call_engine(engine_ref *e, const char *path, json_t *body, json_t **rep, char *err,
                       size_t errlen)
{
    long st;
    atomic_fetch_add(&e->outstanding, 1);
    int rc = post(e->endpoint, path, body, &st, rep, err, errlen);
    atomic_fetch_sub(&e->outstanding, 1);
    json_decref(body);
    if (!rc && st != 200) {
        json_t *m = json_object_get(*rep, "error");
        snprintf(err, errlen, "%s: HTTP %ld: %s", e->id, st,
                 json_is_string(m) ? json_string_value(m) : "");
        rc = -1;
    }
    if (rc) {
        json_decref(*rep);
        *rep = NULL;
    }
    return rc ? -1 : 0;
}

/* The prefill engine's figures: where the prompt's KV came from and how long it waited. */
static size_t owner_slot(const owners *o, uint64_t h)
{
    size_t i = (size_t)h & o->mask;
    while (o->key[i] && o->key[i] != h)
        i = (i + 1) & o->mask;
    return i;
}

/* Records that e computed chunks [0, saved / chunk) of q (those not recorded yet), and returns how
 * many of the n_loaded tokens q loaded were computed by another engine. */
static size_t note_chunks(owners *o, const rec *q, const engine_ref *e, size_t n_loaded,
                          size_t saved)
{
    if (!o)
        return 0;
    size_t cross = 0;
    pthread_mutex_lock(&o->mu);
    for (size_t c = 0; c < q->n_keys; c++) {
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

static void take_prefill(run *R, rec *q, const engine_ref *pe, const engine_ref *de, json_t *rep)
{
    q->cross_tokens = note_chunks(R->own, q, pe, (size_t)num(rep, "loaded_tokens"),
                                  (size_t)num(rep, "saved_tokens"));
    const char *tr = json_string_value(json_object_get(rep, "transport"));
    const char *why = json_string_value(json_object_get(rep, "transport_reason"));
    pthread_mutex_lock(&R->mu);
    if (tr && !R->transport[0]) {
        snprintf(R->transport, sizeof R->transport, "%s", tr);
        snprintf(R->transport_why, sizeof R->transport_why, "%s", why ? why : "");
    }
    pthread_mutex_unlock(&R->mu);
    snprintf(q->prefill, sizeof q->prefill, "%s", pe->id);
    snprintf(q->decode, sizeof q->decode, "%s", de->id);
    q->device_tokens = (size_t)num(rep, "device_tokens");
    q->loaded_tokens = (size_t)num(rep, "loaded_tokens");
    q->queue_s = num(rep, "queue_s");
    q->prefill_s = num(rep, "prefill_s");
}

/* Sends the whole request to one engine (colocated). Its first token is known only with the
 * reply: TTFT is the reply's time less the decode time the engine reports. */
static int generate(run *R, rec *q, engine_ref *e, int reuse, char *err, size_t errlen)
{
    json_t *body = json_pack("{s:o,s:i,s:b}", "tokens", tokens_json(q->tokens, q->n), "max_tokens",
                             (int)q->out_tokens, "reuse", reuse);
    json_t *rep = NULL;
    if (call_engine(e, "/v1/generate", body, &rep, err, errlen) != 0)
        return -1;
    double t = now_s() - R->t0;
    take_prefill(R, q, e, e, rep);
    take_reply(q, rep);
    q->e2e = t - q->arrival;
    q->ttft = q->e2e - num(rep, "decode_s");
    q->finish = t;
    json_decref(rep);
    return 0;
}

static void serve_request(run *R, rec *q)
{
    char err[256] = "";
    int rc = 0;
    if (!strcmp(R->mode, "baseline")) {
        rc = generate(R, q, (engine_ref *)least_outstanding(R), 0, err, sizeof err);
        goto out;
    }
    /* kvf: place, prefill, hand off, decode */
    json_t *keys = json_array();
    for (size_t k = 0; k < q->n_keys; k++) {
        char hex[33];
        json_array_append_new(keys, json_string(kvf_key_to_hex(&q->keys[k], hex)));
    }
    json_t *body = json_pack("{s:o,s:o,s:i}", "tokens", tokens_json(q->tokens, q->n), "chunk_keys",
                             keys, "output_tokens", (int)q->out_tokens);
    if (R->slo_s > 0)
        json_object_set_new(body, "slo_ttft_ms", json_real(R->slo_s * 1e3));
    long st;
    json_t *pl = NULL;
    rc = post(R->sched, "/v1/place", body, &st, &pl, err, sizeof err);
    json_decref(body);
    if (!rc && st == 429) {
        q->rejected = 1;
        json_decref(pl);
        goto out;
    }
    if (!rc && st != 200) {
        snprintf(err, sizeof err, "kvf-sched: HTTP %ld", st);
        rc = -1;
    }
    engine_ref *pe = rc ? NULL : engine_by_id(R, json_string_value(json_object_get(pl, "prefill")));
    engine_ref *de = rc ? NULL : engine_by_id(R, json_string_value(json_object_get(pl, "decode")));
    q->colocated = !rc && json_is_true(json_object_get(pl, "colocated"));
    json_decref(pl);
    if (!rc && (!pe || !de)) {
        snprintf(err, sizeof err,
                 "kvf-sched placed the request on an engine the driver does "
                 "not know");
        rc = -1;
    }
    if (rc)
        goto out;
    if (q->colocated) {
        rc = generate(R, q, de, 1, err, sizeof err);
        goto out;
    }
    json_t *rep = NULL;
    rc = call_engine(pe, "/v1/prefill", json_pack("{s:o}", "tokens", tokens_json(q->tokens, q->n)),
                     &rep, err, sizeof err);
    if (rc)
        goto out;
    q->ttft = now_s() - R->t0 - q->arrival;
    take_prefill(R, q, pe, de, rep);
    json_int_t first_token = json_integer_value(json_array_get(json_object_get(rep, "tokens"), 0));
    json_int_t saved = (json_int_t)num(rep, "saved_tokens");
    json_decref(rep);
    body = json_pack("{s:o,s:I,s:i,s:I}", "tokens", tokens_json(q->tokens, q->n), "first_token",
                     first_token, "max_tokens", (int)q->out_tokens, "expect_cached", saved);
    rep = NULL;
    rc = call_engine(de, "/v1/decode", body, &rep, err, sizeof err);
    if (!rc) {
        q->handoff = num(rep, "handoff_s");
        take_reply(q, rep);
        double t = now_s() - R->t0;
        q->e2e = t - q->arrival;
        q->finish = t;
    }
    json_decref(rep);
out:
    if (rc) {
        q->failed = 1;
        snprintf(q->err, sizeof q->err, "%.150s", err);
    }
    q->done = 1;
    atomic_fetch_add(&R->n_done, 1);
}

static void *worker_main(void *arg)
{
    run *R = arg;
    for (;;) {
        pthread_mutex_lock(&R->mu);
        while (atomic_load(&R->next_taken) >= atomic_load(&R->next_released) &&
               atomic_load(&R->next_taken) < R->n)
            pthread_cond_wait(&R->cv, &R->mu);
        size_t i = atomic_load(&R->next_taken);
        if (i >= R->n) {
            pthread_mutex_unlock(&R->mu);
            return NULL;
        }
        atomic_store(&R->next_taken, i + 1);
        pthread_mutex_unlock(&R->mu);
        serve_request(R, &R->r[i]);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Summary */

typedef struct summary {
    double ttft_p50, ttft_p90, ttft_p99, itl_mean, itl_p99, e2e_p50, rps, device_hit, store_hit;
    double wall_s, slo_attainment, cross_hit;
    size_t cross_requests;
    size_t done, failed, rejected, colocated, mismatches;
    uint64_t load_bytes, save_bytes;
} summary;

static void summarize(const run *R, summary *s)
{
    memset(s, 0, sizeof *s);
    double *tt = malloc((R->n + 1) * sizeof *tt), *e2 = malloc((R->n + 1) * sizeof *e2);
    double *it = malloc((R->n + 1) * sizeof *it);
    size_t k = 0, ki = 0;
    double prompt = 0, dev = 0, st = 0, cross = 0, last = 0, itl_sum = 0, itl_n = 0;
    size_t met = 0;
    for (size_t i = 0; i < R->n; i++) {
        const rec *q = &R->r[i];
        s->failed += q->failed;
        s->rejected += q->rejected;
        if (q->failed || q->rejected)
            continue;
        s->colocated += q->colocated;
        s->mismatches += q->mismatch;
        tt[k] = q->ttft;
        e2[k++] = q->e2e;
        met += R->slo_s <= 0 || q->ttft <= R->slo_s;
        prompt += (double)q->n;
        dev += (double)q->device_tokens;
        st += (double)q->loaded_tokens;
        cross += (double)q->cross_tokens;
        s->cross_requests += q->cross_tokens > 0;
        last = q->finish > last ? q->finish : last;
        if (q->itl_n) {
            it[ki++] = q->itl_max;
            itl_sum += q->itl_sum;
            itl_n += q->itl_n;
        }
    }
    s->done = k;
    if (k) {
        s->ttft_p50 = bench_quantile(tt, k, 0.5);
        s->ttft_p90 = bench_quantile(tt, k, 0.9);
        s->ttft_p99 = bench_quantile(tt, k, 0.99);
        s->e2e_p50 = bench_quantile(e2, k, 0.5);
        s->device_hit = dev / prompt;
        s->store_hit = st / prompt;
        s->cross_hit = cross / prompt;
        s->slo_attainment = (double)met / (double)R->n;
    }
    s->itl_mean = itl_n ? itl_sum / itl_n : 0;
    s->itl_p99 = ki ? bench_quantile(it, ki, 0.99) : 0;
    s->wall_s = last;
    s->rps = last > 0 ? (double)k / last : 0;
    free(tt);
    free(e2);
    free(it);
}

/* Connector byte counters summed over the engines (GET /v1/health). */
static void engine_bytes(run *R, uint64_t *load, uint64_t *save)
{
    *load = *save = 0;
    for (int i = 0; i < R->n_eng; i++) {
        char url[256], err[256];
        snprintf(url, sizeof url, "http://%s/v1/health", R->eng[i].endpoint);
        long st;
        json_t *o = NULL;
        if (kvf__http_call("GET", url, NULL, 5000, &st, &o, err, sizeof err) == 0 && o) {
            json_t *c = json_object_get(o, "connector");
            *load += (uint64_t)json_integer_value(json_object_get(c, "load_bytes"));
            *save += (uint64_t)json_integer_value(json_object_get(c, "save_bytes"));
        }
        json_decref(o);
    }
}

static json_t *summary_json(const summary *s, const run *R)
{
    const char *mode = R->mode;
    json_t *o = json_pack(
        "{s:s,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:I,s:I,s:I,s:I,s:I,s:I,s:I,"
        "s:s,s:s}",
        "mode", mode, "ttft_p50_s", s->ttft_p50, "ttft_p90_s", s->ttft_p90, "ttft_p99_s",
        s->ttft_p99, "itl_mean_s", s->itl_mean, "itl_p99_s", s->itl_p99, "e2e_p50_s", s->e2e_p50,
        "requests_per_s", s->rps, "hit_rate_device", s->device_hit, "hit_rate_store", s->store_hit,
        "slo_attainment", s->slo_attainment, "completed", (json_int_t)s->done, "failed",
        (json_int_t)s->failed, "rejected", (json_int_t)s->rejected, "colocated",
        (json_int_t)s->colocated, "first_token_mismatches", (json_int_t)s->mismatches,
        "bytes_loaded", (json_int_t)s->load_bytes, "bytes_saved", (json_int_t)s->save_bytes,
        "transport", R->transport[0] ? R->transport : "none (cache layer off)", "label", "real");
    if (R->transport_why[0])
        json_object_set_new(o, "transport_reason", json_string(R->transport_why));
    json_object_set_new(o, "hit_rate_cross_engine", json_real(s->cross_hit));
    json_object_set_new(o, "cross_engine_requests", json_integer((json_int_t)s->cross_requests));
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* Output */

static void write_records(const char *dir, run *runs, int n_runs)
{
    char path[700];
    snprintf(path, sizeof path, "%s/records.csv", dir);
    FILE *f = fopen(path, "w");
    json_t *all = json_array();
    if (f)
        fprintf(f, "mode,request,arrival_s,prompt_tokens,output_tokens,prefill,decode,colocated,"
                   "device_tokens,store_tokens,ttft_s,engine_queue_s,engine_prefill_s,e2e_s,"
                   "itl_mean_s,handoff_s,"
                   "generated,tokens_xxh64,rejected,error\n");
    for (int m = 0; m < n_runs; m++) {
        for (size_t i = 0; i < runs[m].n; i++) {
            const rec *q = &runs[m].r[i];
            double itl = q->itl_n ? q->itl_sum / q->itl_n : 0;
            if (f)
                fprintf(f,
                        "%s,%zu,%.6f,%zu,%u,%s,%s,%d,%zu,%zu,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%u,"
                        "%016" PRIx64 ",%d,\"%s\"\n",
                        runs[m].mode, i, q->arrival, q->n, q->out_tokens, q->prefill, q->decode,
                        q->colocated, q->device_tokens, q->loaded_tokens, q->ttft, q->queue_s,
                        q->prefill_s, q->e2e, itl, q->handoff, q->n_generated, q->tokens_hash,
                        q->rejected, q->err);
            char hash[20];
            snprintf(hash, sizeof hash, "%016" PRIx64, q->tokens_hash);
            json_array_append_new(
                all,
                json_pack("{s:s,s:I,s:f,s:I,s:i,s:s,s:s,s:b,s:I,s:I,s:f,s:f,s:f,s:f,s:i,"
                          "s:s,s:b,s:s,s:s}",
                          "mode", runs[m].mode, "request", (json_int_t)i, "arrival_s", q->arrival,
                          "prompt_tokens", (json_int_t)q->n, "output_tokens", (int)q->out_tokens,
                          "prefill", q->prefill, "decode", q->decode, "colocated", q->colocated,
                          "device_tokens", (json_int_t)q->device_tokens, "store_tokens",
                          (json_int_t)q->loaded_tokens, "ttft_s", q->ttft, "e2e_s", q->e2e,
                          "itl_mean_s", itl, "handoff_s", q->handoff, "generated",
                          (int)q->n_generated, "tokens_xxh64", hash, "rejected", q->rejected,
                          "error", q->err, "label", "real"));
        }
    }
    if (f)
        fclose(f);
    snprintf(path, sizeof path, "%s/records.json", dir);
    json_dump_file(all, path, JSON_INDENT(1));
    json_decref(all);
}

static int plot(const char *dir, run *runs, int n_runs, double bin_s)
{
    char dat[700], png[700];
    FILE *g = popen("gnuplot", "w");
    if (!g)
        return -1;
    fprintf(g, "set terminal pngcairo size 900,520 font 'sans,10'\nset grid\nset key bottom "
               "right\n");
    /* TTFT CDF */
    snprintf(png, sizeof png, "%s/ttft_cdf.png", dir);
    fprintf(g,
            "set output '%s'\nset title 'Time to first token, CDF (real, %zu requests)'\n"
            "set xlabel 'TTFT (s)'\nset ylabel 'fraction of requests'\nset logscale x\n"
            "plot ",
            png, runs[0].n);
    for (int m = 0; m < n_runs; m++) {
        snprintf(dat, sizeof dat, "%s/ttft_%s.dat", dir, runs[m].mode);
        FILE *f = fopen(dat, "w");
        double *v = malloc((runs[m].n + 1) * sizeof *v);
        size_t k = 0;
        for (size_t i = 0; i < runs[m].n; i++)
            if (!runs[m].r[i].failed && !runs[m].r[i].rejected)
                v[k++] = runs[m].r[i].ttft;
        bench_quantile(v, k, 0.5); /* sorts */
        for (size_t i = 0; f && i < k; i++)
            fprintf(f, "%.6f %.6f\n", v[i], (double)(i + 1) / (double)runs[m].n);
        if (f)
            fclose(f);
        free(v);
        fprintf(g, "%s'%s' using 1:2 with steps lw 2 title '%s'", m ? ", " : "", dat,
                strcmp(runs[m].mode, "kvf") ? "without kvfabric (colocated, recompute)"
                                            : "with kvfabric (disaggregated, cached)");
    }
    fprintf(g, "\nunset logscale x\n");
    /* throughput over time */
    snprintf(png, sizeof png, "%s/throughput.png", dir);
    fprintf(g,
            "set output '%s'\nset title 'Completed requests per second (real, %.0f s bins)'\n"
            "set xlabel 'time since the first arrival (s)'\nset ylabel 'requests / s'\n"
            "set key top right\nplot ",
            png, bin_s);
    for (int m = 0; m < n_runs; m++) {
        double end = 0;
        for (size_t i = 0; i < runs[m].n; i++)
            end = runs[m].r[i].finish > end ? runs[m].r[i].finish : end;
        size_t nb = (size_t)(end / bin_s) + 1;
        double *b = calloc(nb, sizeof *b);
        for (size_t i = 0; b && i < runs[m].n; i++)
            if (!runs[m].r[i].failed && !runs[m].r[i].rejected)
                b[(size_t)(runs[m].r[i].finish / bin_s)] += 1;
        snprintf(dat, sizeof dat, "%s/throughput_%s.dat", dir, runs[m].mode);
        FILE *f = fopen(dat, "w");
        for (size_t i = 0; f && b && i < nb; i++)
            fprintf(f, "%.3f %.4f\n", ((double)i + 0.5) * bin_s, b[i] / bin_s);
        if (f)
            fclose(f);
        free(b);
        fprintf(g, "%s'%s' using 1:2 with linespoints lw 2 title '%s'", m ? ", " : "", dat,
                strcmp(runs[m].mode, "kvf") ? "without kvfabric" : "with kvfabric");
    }
    fprintf(g, "\n");
    return pclose(g) == 0 ? 0 : -1;
}

/* ------------------------------------------------------------------------------------------ */
/* Setup */

static int discover(const char *sched, engine_ref *eng, int *n, char *err, size_t errlen)
{
    char url[256];
    snprintf(url, sizeof url, "http://%s/v1/instances", sched);
    long st;
    json_t *o = NULL;
    int rc = kvf__http_call("GET", url, NULL, 5000, &st, &o, err, errlen);
    if (rc || st != 200) {
        if (!rc)
            snprintf(err, errlen, "%s: HTTP %ld", url, st);
        json_decref(o);
        return -1;
    }
    json_t *arr = json_object_get(o, "instances");
    *n = 0;
    for (size_t i = 0; i < json_array_size(arr) && *n < MAX_ENGINES; i++) {
        json_t *v = json_array_get(arr, i);
        engine_ref *e = &eng[(*n)++];
        snprintf(e->id, sizeof e->id, "%s", json_string_value(json_object_get(v, "id")));
        snprintf(e->role, sizeof e->role, "%s", json_string_value(json_object_get(v, "role")));
        snprintf(e->endpoint, sizeof e->endpoint, "%s",
                 json_string_value(json_object_get(v, "endpoint")));
        atomic_store(&e->outstanding, 0);
    }
    json_decref(o);
    if (*n == 0) {
        snprintf(err, errlen, "kvf-sched at %s has no engine registered", sched);
        return -1;
    }
    return 0;
}

/* Clears kvfabric's chunks of this model from the stores, so a run starts cold. */
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
                         const kvfe_model *m, const kvf_keyspace *ks, rec *q)
{
    size_t want = ((size_t)tr->in_len * (size_t)block + BENCH_TRACE_BLOCK - 1) / BENCH_TRACE_BLOCK;
    q->n = want < (size_t)max_in ? want : (size_t)max_in;
    q->n = q->n ? q->n : 1;
    size_t o = ((size_t)tr->out_len * (size_t)block + BENCH_TRACE_BLOCK - 1) / BENCH_TRACE_BLOCK;
    q->out_tokens = (uint32_t)(o < 1 ? 1 : o > (size_t)max_out ? (size_t)max_out : o);
    q->tokens = malloc(q->n * sizeof *q->tokens);
    for (size_t t = 0; t < q->n; t++) {
        size_t b = t / (size_t)block;
        uint64_t id = tr->ids[b < tr->n_ids ? b : tr->n_ids - 1];
        q->tokens[t] = bench_trace_token(id, t % (size_t)block, m->vocab);
    }
    size_t nk = q->n / m->layout.chunk_tokens;
    q->keys = malloc((nk ? nk : 1) * sizeof *q->keys);
    kvf_keys_compute(ks, q->tokens, q->n, q->keys, nk, &q->n_keys, NULL);
    return want > q->n;
}

/* Warm-up: the requests before the measured window are prefilled (not measured) on the prefill
 * engines, so the stores hold what a running deployment's would. One thread per engine. */
typedef struct warm {
    rec *r;
    size_t n;
    engine_ref *e;
    int stride, first;
    atomic_size_t *done;
    atomic_int *failed;
    owners *own;
} warm;

static void *warm_main(void *arg)
{
    warm *w = arg;
    for (size_t i = (size_t)w->first; i < w->n; i += (size_t)w->stride) {
        json_t *body = json_pack("{s:o}", "tokens", tokens_json(w->r[i].tokens, w->r[i].n));
        long st;
        char err[256];
        json_t *rep = NULL;
        if (post(w->e->endpoint, "/v1/prefill", body, &st, &rep, err, sizeof err) != 0 || st != 200)
            atomic_fetch_add(w->failed, 1);
        else
            note_chunks(w->own, &w->r[i], w->e, 0, (size_t)num(rep, "saved_tokens"));
        json_decref(rep);
        json_decref(body);
        atomic_fetch_add(w->done, 1);
    }
    return NULL;
}

static int warm_up(rec *r, size_t n, engine_ref *eng, int n_eng, owners *own)
{
    pthread_t th[MAX_ENGINES];
    warm w[MAX_ENGINES];
    atomic_size_t done = 0;
    atomic_int failed = 0;
    int k = 0;
    for (int i = 0; i < n_eng; i++)
        if (strcmp(eng[i].role, "decode") != 0)
            w[k++] =
                (warm){.r = r, .n = n, .e = &eng[i], .done = &done, .failed = &failed, .own = own};
    for (int i = 0; i < k; i++) {
        w[i].stride = k;
        w[i].first = i;
        pthread_create(&th[i], NULL, warm_main, &w[i]);
    }
    double t0 = bench_now(), last = t0;
    while (atomic_load(&done) < n) {
        usleep(100000);
        if (bench_now() - last >= 5) {
            last = bench_now();
            bench_progress("e2e", "warm-up: %zu/%zu prefilled (%.0f s)", atomic_load(&done), n,
                           last - t0);
        }
    }
    for (int i = 0; i < k; i++)
        pthread_join(th[i], NULL);
    bench_progress("e2e", "warm-up: %zu requests prefilled into the stores in %.1f s, %d failed", n,
                   bench_now() - t0, atomic_load(&failed));
    return atomic_load(&failed) ? -1 : 0;
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

static int run_mode(run *R, const char *tag)
{
    pthread_t th[256];
    int nth = R->concurrency;
    pthread_mutex_init(&R->mu, NULL);
    pthread_cond_init(&R->cv, NULL);
    for (int i = 0; i < nth; i++)
        pthread_create(&th[i], NULL, worker_main, R);
    R->t0 = now_s();
    double last_progress = R->t0;
    size_t released = 0;
    while (atomic_load(&R->n_done) < R->n) {
        double t = now_s() - R->t0;
        size_t before = released;
        while (released < R->n && R->r[released].arrival <= t)
            released++;
        if (released != before) {
            pthread_mutex_lock(&R->mu);
            atomic_store(&R->next_released, released);
            pthread_cond_broadcast(&R->cv);
            pthread_mutex_unlock(&R->mu);
        }
        if (now_s() - last_progress >= 5) {
            last_progress = now_s();
            size_t d = atomic_load(&R->n_done);
            bench_progress("e2e", "%s: %.0f s, %zu/%zu arrived, %zu done, %zu in flight", tag, t,
                           released, R->n, d, released - d);
        }
        double next = released < R->n ? R->r[released].arrival - (now_s() - R->t0) : 0.05;
        usleep((useconds_t)(next < 0.0005 ? 500 : next > 0.05 ? 50000 : next * 1e6));
    }
    for (int i = 0; i < nth; i++)
        pthread_join(th[i], NULL);
    pthread_mutex_destroy(&R->mu);
    pthread_cond_destroy(&R->cv);
    return 0;
}

int bench_e2e_main(int argc, char **argv)
{
    const char *config = NULL, *state = NULL, *modes = "kvf,baseline", *out_dir = NULL;
    const char *trace = "data/traces/conversation_head1600.jsonl";
    long start = 0, warmup = 0, max_req = 200, block = 64, max_in = 4096, max_out = 64, conc = 64;
    double scale = 1, slo_ms = 0;
    int json = 0;
    const struct {
        const char *name;
        const char **v;
    } sopt[] = {{"--config", &config},
                {"--state", &state},
                {"--trace", &trace},
                {"--modes", &modes},
                {"--out", &out_dir}};
    const struct {
        const char *name;
        long *v;
    } lopt[] = {{"--start", &start},        {"--warmup", &warmup},    {"--max-requests", &max_req},
                {"--block-tokens", &block}, {"--max-input", &max_in}, {"--max-output", &max_out},
                {"--concurrency", &conc}};
    const struct {
        const char *name;
        double *v;
    } dopt[] = {{"--time-scale", &scale}, {"--slo-ttft-ms", &slo_ms}};
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        char *end = NULL;
        if (!strcmp(a, "--json")) {
            json = 1;
            continue;
        }
        if (!strcmp(a, "--help")) {
            usage();
            return 0;
        }
        if (!v) {
            usage();
            return 2;
        }
        i++;
        int known = 0;
        for (size_t k = 0; k < sizeof sopt / sizeof sopt[0]; k++)
            if (!strcmp(a, sopt[k].name))
                *sopt[k].v = v, known = 1;
        for (size_t k = 0; k < sizeof lopt / sizeof lopt[0]; k++)
            if (!strcmp(a, lopt[k].name))
                *lopt[k].v = strtol(v, &end, 10), known = 1;
        for (size_t k = 0; k < sizeof dopt / sizeof dopt[0]; k++)
            if (!strcmp(a, dopt[k].name))
                *dopt[k].v = strtod(v, &end), known = 1;
        if (!known) {
            fprintf(stderr, "kvf-bench e2e: unknown option %s\n", a);
            usage();
            return 2;
        }
        if (end && *end) {
            fprintf(stderr, "kvf-bench e2e: %s: \"%s\" is not a number\n", a, v);
            return 2;
        }
    }
    if (warmup > start)
        warmup = start; /* the requests before --start, as many as there are */
    if (start < 0 || warmup < 0 || max_req < 1 || block < 1 || block > 4096 || max_in < 64 ||
        max_out < 1 || conc < 1 || conc > 256 || !(scale > 0) || slo_ms < 0) {
        fprintf(stderr, "kvf-bench e2e: --max-requests >= 1, --block-tokens 1..4096, "
                        "--max-input >= 64, --max-output >= 1, --concurrency 1..256, "
                        "--time-scale > 0\n");
        return 2;
    }
    /* The cluster: its state file (written by kvf cluster up). */
    char state_path[600];
    if (state)
        snprintf(state_path, sizeof state_path, "%s", state);
    else if (config) {
        json_t *c = json_load_file(config, 0, NULL);
        const char *rd = c ? json_string_value(json_object_get(c, "run_dir")) : NULL;
        const char *nm = c ? json_string_value(json_object_get(c, "name")) : NULL;
        if (rd)
            snprintf(state_path, sizeof state_path, "%s/state.json", rd);
        else
            snprintf(state_path, sizeof state_path, "build/cluster/%s/state.json",
                     nm ? nm : "local");
        json_decref(c);
    } else {
        usage();
        return 2;
    }
    json_error_t je;
    json_t *st = json_load_file(state_path, 0, &je);
    if (!st) {
        fprintf(stderr, "kvf-bench e2e: %s: %s (is the cluster up? kvf cluster up --config ...)\n",
                state_path, je.text);
        return 1;
    }
    const char *model = json_string_value(json_object_get(st, "model"));
    kvfe_model m;
    if (!model || kvfe_model_preset(model, &m) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s names no model this driver knows\n", state_path);
        json_decref(st);
        return 1;
    }
    char sched[160], err[512];
    snprintf(sched, sizeof sched, "%s", json_string_value(json_object_get(st, "sched")));
    engine_ref eng[MAX_ENGINES];
    int n_eng;
    if (discover(sched, eng, &n_eng, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s\n", err);
        json_decref(st);
        return 1;
    }
    if (!out_dir) {
        static char od[620];
        char *slash = strrchr(state_path, '/');
        snprintf(od, sizeof od, "%.*s/e2e", slash ? (int)(slash - state_path) : 1,
                 slash ? state_path : ".");
        out_dir = od;
    }
    mkdir(out_dir, 0755);
    /* The requests. */
    bench_trace_rec *tr;
    size_t n;
    if (bench_trace_load(trace, (size_t)start, (size_t)max_req, &tr, &n, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench e2e: %s\n", err);
        json_decref(st);
        return 1;
    }
    if (n == 0) {
        fprintf(stderr, "kvf-bench e2e: %s has no request from %ld on\n", trace, start);
        json_decref(st);
        return 1;
    }
    rec *base = calloc(n, sizeof *base);
    kvf_keyspace ks;
    kvf_keyspace_init(&ks, &m.layout, NULL, 0);
    size_t truncated = 0;
    double t_first = tr[0].arrival;
    for (size_t i = 0; i < n; i++) {
        truncated += build_request(&tr[i], block, max_in, max_out, &m, &ks, &base[i]);
        base[i].arrival = (tr[i].arrival - t_first) / scale;
    }
    bench_trace_free(tr, n);
    /* The warm-up requests: the ones before the window. */
    size_t n_warm = 0;
    rec *warm_r = NULL;
    if (warmup > 0) {
        if (bench_trace_load(trace, (size_t)(start - warmup), (size_t)warmup, &tr, &n_warm, err,
                             sizeof err) != 0) {
            fprintf(stderr, "kvf-bench e2e: %s\n", err);
            return 1;
        }
        warm_r = calloc(n_warm ? n_warm : 1, sizeof *warm_r);
        for (size_t i = 0; i < n_warm; i++)
            build_request(&tr[i], block, max_in, max_out, &m, &ks, &warm_r[i]);
        bench_trace_free(tr, n_warm);
    }
    double span = base[n - 1].arrival;
    bench_progress("e2e",
                   "%zu requests of %s from #%ld, %ld tokens per trace block, %.0f s of arrivals "
                   "(time scale %.2f), %zu prompts cut to %ld tokens; %d engines via kvf-sched %s",
                   n, trace, start, block, span, scale, truncated, max_in, n_eng, sched);
    /* Who computed which chunk, for the cross-engine reuse figure (warm-up and kvf run). */
    owners own = {.mask = (1u << 20) - 1, .chunk_tokens = m.layout.chunk_tokens};
    pthread_mutex_init(&own.mu, NULL);
    own.key = calloc(own.mask + 1, sizeof *own.key);
    own.eng = calloc(own.mask + 1, sizeof *own.eng);
    /* The runs. */
    run runs[2];
    int n_runs = 0;
    char mbuf[64];
    snprintf(mbuf, sizeof mbuf, "%s", modes);
    for (char *sv = NULL, *t = strtok_r(mbuf, ",", &sv); t && n_runs < 2;
         t = strtok_r(NULL, ",", &sv)) {
        if (strcmp(t, "kvf") && strcmp(t, "baseline")) {
            fprintf(stderr, "kvf-bench e2e: --modes takes kvf and baseline\n");
            return 2;
        }
        run *R = &runs[n_runs++];
        memset(R, 0, sizeof *R);
        R->mode = strcmp(t, "kvf") ? "baseline" : "kvf";
        R->n = n;
        R->r = calloc(n, sizeof *R->r);
        for (size_t i = 0; i < n; i++) {
            R->r[i].arrival = base[i].arrival;
            R->r[i].tokens = base[i].tokens;
            R->r[i].n = base[i].n;
            R->r[i].out_tokens = base[i].out_tokens;
            R->r[i].keys = base[i].keys;
            R->r[i].n_keys = base[i].n_keys;
        }
        R->eng = eng;
        R->own = strcmp(R->mode, "kvf") ? NULL : &own;
        R->n_eng = n_eng;
        snprintf(R->sched, sizeof R->sched, "%s", sched);
        R->slo_s = slo_ms / 1e3;
        R->concurrency = (int)conc;
    }
    json_t *summaries = json_object();
    summary sm[2];
    for (int k = 0; k < n_runs; k++) {
        run *R = &runs[k];
        if (!strcmp(R->mode, "kvf")) {
            if (clear_stores(json_object_get(st, "stores"), &m.layout, err, sizeof err) != 0)
                bench_progress("e2e", "warning: %s", err);
            if (n_warm && warm_up(warm_r, n_warm, eng, n_eng, &own) != 0)
                bench_progress("e2e", "warning: some warm-up requests failed");
        }
        uint64_t l0, s0, l1, s1;
        engine_bytes(R, &l0, &s0);
        bench_progress("e2e", "run %d/%d: %s", k + 1, n_runs,
                       strcmp(R->mode, "kvf") ? "without kvfabric (colocated, every prefill from "
                                                "scratch)"
                                              : "with kvfabric (placed by kvf-sched, "
                                                "disaggregated, prefix cache in the stores)");
        run_mode(R, R->mode);
        engine_bytes(R, &l1, &s1);
        summarize(R, &sm[k]);
        sm[k].load_bytes = l1 - l0;
        sm[k].save_bytes = s1 - s0;
        json_object_set_new(summaries, R->mode, summary_json(&sm[k], R));
    }
    for (int k = 0; k < n_runs; k++) {
        int shown = 0;
        for (size_t i = 0; i < n && shown < 3; i++)
            if (runs[k].r[i].failed) {
                fprintf(stderr, "kvf-bench e2e: %s: request %zu failed: %s\n", runs[k].mode, i,
                        runs[k].r[i].err);
                shown++;
            }
    }
    /* Tokens compared request by request. */
    size_t compared = 0, differ = 0;
    if (n_runs == 2) {
        for (size_t i = 0; i < n; i++) {
            const rec *a = &runs[0].r[i], *b = &runs[1].r[i];
            if (a->failed || b->failed || a->rejected || b->rejected)
                continue;
            compared++;
            differ += a->tokens_hash != b->tokens_hash || a->n_generated != b->n_generated;
        }
    }
    write_records(out_dir, runs, n_runs);
    double bin = span / 20 > 1 ? span / 20 : 1;
    int plotted = plot(out_dir, runs, n_runs, bin) == 0;
    /* The table. */
    printf("\nkvf-bench e2e: %zu requests, %d engines, model %s, %s, all figures real\n", n, n_eng,
           model, json_is_true(json_object_get(st, "netns")) ? "network namespaces" : "loopback");
    printf("%-10s %9s %9s %9s %9s %9s %8s %8s %8s %9s %9s %6s\n", "mode", "TTFT p50", "p90", "p99",
           "ITL mean", "ITL p99", "req/s", "hit dev", "hit str", "MB in", "MB out", "failed");
    for (int k = 0; k < n_runs; k++)
        printf(
            "%-10s %8.3fs %8.3fs %8.3fs %7.2fms %7.2fms %8.2f %7.1f%% %7.1f%% %8.1fM %8.1fM %6zu\n",
            runs[k].mode, sm[k].ttft_p50, sm[k].ttft_p90, sm[k].ttft_p99, sm[k].itl_mean * 1e3,
            sm[k].itl_p99 * 1e3, sm[k].rps, sm[k].device_hit * 100, sm[k].store_hit * 100,
            (double)sm[k].load_bytes / 1e6, (double)sm[k].save_bytes / 1e6,
            sm[k].failed + sm[k].rejected);
    for (int k = 0; k < n_runs; k++)
        if (!strcmp(runs[k].mode, "kvf"))
            printf("cross-engine reuse: %zu requests loaded a prefix another engine computed "
                   "(%.1f%% of all prompt tokens)\ntransport of every transfer: %s (%s)\n",
                   sm[k].cross_requests, sm[k].cross_hit * 100,
                   runs[k].transport[0] ? runs[k].transport : "none", runs[k].transport_why);
    json_t *res =
        json_pack("{s:s,s:o,s:i,s:I,s:I,s:I,s:I,s:f,s:I,s:I,s:s,s:s}", "bench", "e2e", "summary",
                  summaries, "engines", n_eng, "requests", (json_int_t)n, "start",
                  (json_int_t)start, "warmup", (json_int_t)n_warm, "block_tokens",
                  (json_int_t)block, "time_scale", scale, "tokens_compared", (json_int_t)compared,
                  "tokens_differ", (json_int_t)differ, "out", out_dir, "label", "real");
    if (n_runs == 2) {
        const summary *kv = !strcmp(runs[0].mode, "kvf") ? &sm[0] : &sm[1];
        const summary *bl = kv == &sm[0] ? &sm[1] : &sm[0];
        double ratio = bl->ttft_p50 > 0 ? kv->ttft_p50 / bl->ttft_p50 : 0;
        json_object_set_new(res, "ttft_p50_ratio", json_real(ratio));
        json_object_set_new(res, "ttft_p50_target_met", json_boolean(ratio > 0 && ratio <= 0.5));
        printf("TTFT p50 with kvfabric / without: %.3f (target <= 0.5: %s); generated tokens "
               "identical in %zu of %zu requests compared\n",
               ratio, ratio > 0 && ratio <= 0.5 ? "met" : "NOT met", compared - differ, compared);
    }
    printf("records: %s/records.csv, %s/records.json; plots: %s\n", out_dir, out_dir,
           plotted ? "ttft_cdf.png, throughput.png" : "not drawn (gnuplot missing or failed)");
    char sp[700];
    snprintf(sp, sizeof sp, "%s/summary.json", out_dir);
    json_dump_file(res, sp, JSON_INDENT(2));
    bench_emit(res, json);
    int failed = 0;
    for (int k = 0; k < n_runs; k++)
        failed += (int)sm[k].failed + (int)sm[k].mismatches;
    failed += (int)differ;
    json_decref(res);
    json_decref(st);
    for (int k = 0; k < n_runs; k++)
        free(runs[k].r);
    for (size_t i = 0; i < n; i++) {
        free(base[i].tokens);
        free(base[i].keys);
    }
    free(base);
    for (size_t i = 0; i < n_warm; i++) {
        free(warm_r[i].tokens);
        free(warm_r[i].keys);
    }
    free(warm_r);
    free(own.key);
    free(own.eng);
    pthread_mutex_destroy(&own.mu);
    return failed ? 1 : 0;
}
