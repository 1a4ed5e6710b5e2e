/*
 * kvf-bench e2e --report DIR: the summary and the verdict again, from the records a run wrote
 * (DIR/records.json) instead of from a cluster. The same code judges them (e2e_summarize,
 * e2e_report_ratios), so records edited on purpose, or those of a run on another machine, are
 * judged exactly as a live run's. DIR/summary.json, where present, gives what the records do not
 * (the engines, the baseline's routing, the SLO); nothing in DIR is written.
 */
#include "e2e.h"
#include "bench_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RUNS            (2 * MAX_REPETITIONS)
#define MAX_RECORD_REQUESTS 1000000

typedef struct reread {
    e2e_run runs[MAX_RUNS];
    e2e_summary sm[MAX_RUNS];
    int n_runs;
    size_t n; /* requests per run */
    char err[400];
} reread;

/* The number at key of record o (an integer or a real), or def when absent and optional. Returns
 * 0, or -1 with the reason in R->err. */
static int num(reread *R, json_t *o, size_t i, const char *key, int required, double def, double *v)
{
    json_t *x = json_object_get(o, key);
    if (!x && !required) {
        *v = def;
        return 0;
    }
    if (!json_is_number(x) || json_number_value(x) < 0) {
        snprintf(R->err, sizeof R->err, "record %zu: \"%s\" %s", i, key,
                 x ? "is not a non-negative number" : "is missing");
        return -1;
    }
    *v = json_number_value(x);
    return 0;
}

static int flag(reread *R, json_t *o, size_t i, const char *key, int *v)
{
    json_t *x = json_object_get(o, key);
    if (!x) {
        *v = 0;
        return 0;
    }
    if (!json_is_boolean(x)) {
        snprintf(R->err, sizeof R->err, "record %zu: \"%s\" is not true or false", i, key);
        return -1;
    }
    *v = json_is_true(x);
    return 0;
}

/* The run of mode and repetition rep, made on first sight. NULL after saying why in R->err. */
static e2e_run *run_of(reread *R, const char *mode, int rep, size_t i)
{
    for (int k = 0; k < R->n_runs; k++)
        if (!strcmp(R->runs[k].mode, mode) && R->runs[k].rep == rep)
            return &R->runs[k];
    if (R->n_runs == MAX_RUNS) {
        snprintf(R->err, sizeof R->err, "record %zu: more than %d runs", i, MAX_RUNS);
        return NULL;
    }
    e2e_run *run = &R->runs[R->n_runs++];
    run->mode = strcmp(mode, "kvf") ? "baseline" : "kvf";
    run->rep = rep;
    run->loadavg = -1;
    run->r = calloc(R->n, sizeof *run->r);
    run->n = R->n;
    if (!run->r) {
        snprintf(R->err, sizeof R->err, "out of memory");
        return NULL;
    }
    return run;
}

/* Record i (object o) into its run. Returns 0, or -1 with the reason in R->err. */
static int take_record(reread *R, json_t *o, size_t i)
{
    const char *mode = json_string_value(json_object_get(o, "mode"));
    json_t *rj = json_object_get(o, "repetition"), *qj = json_object_get(o, "request");
    if (!json_is_object(o) || !mode || (strcmp(mode, "kvf") && strcmp(mode, "baseline")) ||
        !json_is_integer(rj) || json_integer_value(rj) < 1 ||
        json_integer_value(rj) > MAX_REPETITIONS || !json_is_integer(qj) ||
        json_integer_value(qj) < 0 || (size_t)json_integer_value(qj) >= R->n) {
        snprintf(R->err, sizeof R->err,
                 "record %zu: needs \"mode\" (kvf or baseline), \"repetition\" (1..%d) and "
                 "\"request\" (0..%zu)",
                 i, MAX_REPETITIONS, R->n - 1);
        return -1;
    }
    e2e_run *run = run_of(R, mode, (int)json_integer_value(rj), i);
    if (!run)
        return -1;
    e2e_rec *q = &run->r[json_integer_value(qj)];
    if (q->tokens_hash || q->rt.n) { /* a record's prompt is never empty: seen */
        snprintf(R->err, sizeof R->err,
                 "record %zu: %s #%d has request %" JSON_INTEGER_FORMAT " twice", i, run->mode,
                 run->rep, json_integer_value(qj));
        return -1;
    }
    double prompt, dev, st, gen, itl_mean, itl_n, cross, finish, pft;
    const char *hash = json_string_value(json_object_get(o, "tokens_xxh64"));
    const char *err = json_string_value(json_object_get(o, "error"));
    if (num(R, o, i, "arrival_s", 1, 0, &q->arrival) || num(R, o, i, "ttft_s", 1, 0, &q->ttft) ||
        num(R, o, i, "e2e_s", 1, 0, &q->e2e) || num(R, o, i, "prompt_tokens", 1, 0, &prompt) ||
        num(R, o, i, "device_tokens", 1, 0, &dev) || num(R, o, i, "store_tokens", 1, 0, &st) ||
        num(R, o, i, "generated", 1, 0, &gen) || num(R, o, i, "itl_mean_s", 0, 0, &itl_mean) ||
        num(R, o, i, "itl_steps", 0, gen > 1 ? gen - 1 : 0, &itl_n) ||
        num(R, o, i, "itl_max_s", 0, itl_mean, &q->itl_max) ||
        num(R, o, i, "cross_tokens", 0, 0, &cross) ||
        num(R, o, i, "finish_s", 0, q->arrival + q->e2e, &finish) ||
        flag(R, o, i, "colocated", &q->rt.colocated) ||
        flag(R, o, i, "rejected", &q->rt.rejected) ||
        flag(R, o, i, "first_token_mismatch", &q->rt.first_token_mismatch) ||
        flag(R, o, i, "prefetch_deadline_missed", &q->rt.prefetch_deadline_missed) ||
        num(R, o, i, "prefetch_tokens", 0, 0, &pft))
        return -1;
    q->rt.prefetch_tokens = (size_t)pft;
    if (prompt < 1 || !hash || strlen(hash) != 16 || strspn(hash, "0123456789abcdef") != 16) {
        snprintf(R->err, sizeof R->err,
                 "record %zu: \"prompt_tokens\" must be at least 1 and \"tokens_xxh64\" 16 hex "
                 "digits",
                 i);
        return -1;
    }
    q->rt.n = (size_t)prompt;
    q->rt.device_tokens = (size_t)dev;
    q->rt.loaded_tokens = (size_t)st;
    q->n_generated = (uint32_t)gen;
    q->itl_n = (uint32_t)itl_n;
    q->itl_sum = itl_mean * itl_n;
    q->cross_tokens = (size_t)cross;
    q->finish = finish;
    q->tokens_hash = strtoull(hash, NULL, 16);
    q->failed = err && *err;
    snprintf(q->err, sizeof q->err, "%.150s", err ? err : "");
    return 0;
}

/* The requests per run: one more than the largest request index. 0 after saying why. */
static size_t requests_of(reread *R, json_t *all)
{
    size_t n = 0, i;
    json_t *o;
    json_array_foreach(all, i, o)
    {
        json_t *qj = json_object_get(o, "request");
        if (json_is_integer(qj) && json_integer_value(qj) >= 0 &&
            json_integer_value(qj) < MAX_RECORD_REQUESTS && (size_t)json_integer_value(qj) >= n)
            n = (size_t)json_integer_value(qj) + 1;
    }
    if (!n)
        snprintf(R->err, sizeof R->err, "no record has a \"request\" index below %d",
                 MAX_RECORD_REQUESTS);
    return n;
}

/* Every run holds every request, and both modes ran the same repetitions. */
static int complete(reread *R)
{
    for (int k = 0; k < R->n_runs; k++)
        for (size_t i = 0; i < R->n; i++)
            if (!R->runs[k].r[i].rt.n) {
                snprintf(R->err, sizeof R->err, "%s #%d has no record of request %zu",
                         R->runs[k].mode, R->runs[k].rep, i);
                return -1;
            }
    return 0;
}

/* Runs in the order a live run makes them: kvf #1, baseline #1, kvf #2, ... */
static int run_order(const void *a, const void *b)
{
    const e2e_run *x = a, *y = b;
    if (x->rep != y->rep)
        return x->rep - y->rep;
    return strcmp(y->mode, x->mode); /* "kvf" before "baseline" */
}

int e2e_reread(const char *dir, double slo_ms, int require_targets, int json_out)
{
    char path[700];
    snprintf(path, sizeof path, "%s/records.json", dir);
    json_error_t je;
    json_t *all = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!json_is_array(all) || !json_array_size(all)) {
        fprintf(stderr, "kvf-bench e2e --report: %s: %s\n", path,
                all ? "expected a non-empty array of records" : je.text);
        json_decref(all);
        return 1;
    }
    snprintf(path, sizeof path, "%s/summary.json", dir);
    json_t *meta = json_load_file(path, 0, NULL);
    if (slo_ms <= 0 && json_is_number(json_object_get(meta, "slo_ttft_ms")))
        slo_ms = json_number_value(json_object_get(meta, "slo_ttft_ms"));
    reread *R = calloc(1, sizeof *R);
    int rc = R ? 0 : -1;
    if (R && !(R->n = requests_of(R, all)))
        rc = -1;
    size_t i;
    json_t *o;
    json_array_foreach(all, i, o)
    {
        if (rc == 0)
            rc = take_record(R, o, i);
    }
    if (rc == 0)
        rc = complete(R);
    if (rc != 0) {
        fprintf(stderr, "kvf-bench e2e --report: %s/records.json: %s\n", dir,
                R ? R->err : "out of memory");
        rc = 1;
        goto out;
    }
    qsort(R->runs, (size_t)R->n_runs, sizeof R->runs[0], run_order);
    int reps = 0;
    for (int k = 0; k < R->n_runs; k++) {
        R->runs[k].slo_s = slo_ms / 1e3;
        e2e_summarize(&R->runs[k], &R->sm[k]);
        reps = R->runs[k].rep > reps ? R->runs[k].rep : reps;
    }
    size_t compared, differ;
    e2e_compare_tokens(R->runs, R->n_runs, R->n, &compared, &differ);
    const char *routing = json_string_value(json_object_get(meta, "baseline_routing"));
    const char *model = json_string_value(json_object_get(meta, "model"));
    json_t *eng = json_object_get(meta, "engines");
    e2e_report rp = {.runs = R->runs,
                     .sm = R->sm,
                     .n_runs = R->n_runs,
                     .reps = reps,
                     .n_requests = R->n,
                     .n_engines = json_is_integer(eng) ? (size_t)json_integer_value(eng) : 0,
                     .model = model ? model : "(not recorded)",
                     .where = dir,
                     .baseline_routing = routing ? routing : "(unknown)",
                     .from_records = 1};
    /* The plots again, from the records (a run made where gnuplot was missing gets them here). */
    double span = 0;
    for (int k = 0; k < R->n_runs; k++)
        for (size_t q = 0; q < R->runs[k].n; q++)
            span = R->runs[k].r[q].finish > span ? R->runs[k].r[q].finish : span;
    char setup[300];
    snprintf(setup, sizeof setup, "%zu engines of %s, judged again from its records", rp.n_engines,
             rp.model);
    int plotted = e2e_plot(dir, R->runs, R->n_runs, span / 20 > 1 ? span / 20 : 1, setup) == 0;
    json_t *summaries = e2e_summaries_json(&rp);
    json_t *res = json_pack("{s:s,s:s,s:o,s:I,s:I,s:I,s:I,s:s}", "bench", "e2e", "report_of", dir,
                            "summary", summaries, "requests", (json_int_t)R->n, "repetitions",
                            (json_int_t)reps, "tokens_compared", (json_int_t)compared,
                            "tokens_differ", (json_int_t)differ, "label", "real");
    if (slo_ms > 0)
        json_object_set_new(res, "slo_ttft_ms", json_real(slo_ms));
    e2e_report_ratios(&rp, res);
    printf("generated tokens identical in every run in %zu of %zu requests compared\n",
           compared - differ, compared);
    printf("plots: %s\n", plotted ? "ttft_cdf.png, throughput.png (drawn again from the records)"
                                  : "not drawn (gnuplot missing or failed)");
    size_t failed = differ;
    for (int k = 0; k < R->n_runs; k++)
        failed += R->sm[k].failed + R->sm[k].mismatches;
    int met = json_is_true(json_object_get(res, "targets_met"));
    rc = failed ? 1 : require_targets && !met ? 3 : 0;
    json_object_set_new(res, "exit_status", json_integer(rc));
    bench_emit(res, json_out);
    json_decref(res);
out:
    for (int k = 0; R && k < R->n_runs; k++)
        free(R->runs[k].r);
    free(R);
    json_decref(meta);
    json_decref(all);
    return rc;
}
