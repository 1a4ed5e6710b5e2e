/* kvf-bench e2e's reports (e2e.h). */
#include "e2e.h"
#include "bench_util.h"
#include "bytes.h"

#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* One run */

void e2e_summarize(const e2e_run *R, e2e_summary *s)
{
    memset(s, 0, sizeof *s);
    double *tt = malloc((R->n + 1) * sizeof *tt), *e2 = malloc((R->n + 1) * sizeof *e2);
    double *it = malloc((R->n + 1) * sizeof *it);
    size_t k = 0, ki = 0;
    double prompt = 0, dev = 0, st = 0, cross = 0, last = 0, itl_sum = 0, itl_n = 0;
    size_t met = 0;
    for (size_t i = 0; tt && e2 && it && i < R->n; i++) {
        const e2e_rec *q = &R->r[i];
        s->failed += q->failed;
        s->rejected += q->rt.rejected;
        if (q->failed || q->rt.rejected)
            continue;
        s->colocated += q->rt.colocated;
        s->mismatches += q->rt.first_token_mismatch;
        s->prefetched += q->rt.prefetch_tokens > 0;
        s->prefetch_missed += q->rt.prefetch_deadline_missed;
        tt[k] = q->ttft;
        e2[k++] = q->e2e;
        met += R->slo_s <= 0 || q->ttft <= R->slo_s;
        prompt += (double)q->rt.n;
        dev += (double)q->rt.device_tokens;
        st += (double)q->rt.loaded_tokens;
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

/* ------------------------------------------------------------------------------------------ */
/* Over the repetitions */

/* The figures reported per mode with their spread: the key in summary.MODE, the key of kvfabric's
 * over the baseline's (NULL: none), the table's words, where the figure is in e2e_summary, and
 * its unit in the table. */
static const struct figure {
    const char *key, *ratio, *label;
    size_t at;
    double scale;
    const char *unit;
} figures[] = {
    {"ttft_p50_s", "ttft_p50_ratio", "TTFT p50", offsetof(e2e_summary, ttft_p50), 1, "s"},
    {"ttft_p90_s", "ttft_p90_ratio", "TTFT p90", offsetof(e2e_summary, ttft_p90), 1, "s"},
    {"ttft_p99_s", "ttft_p99_ratio", "TTFT p99", offsetof(e2e_summary, ttft_p99), 1, "s"},
    {"itl_mean_s", "itl_mean_ratio", "ITL mean", offsetof(e2e_summary, itl_mean), 1e3, "ms"},
    {"itl_p99_s", "itl_p99_ratio", "ITL p99", offsetof(e2e_summary, itl_p99), 1e3, "ms"},
    {"e2e_p50_s", "e2e_p50_ratio", "end to end p50", offsetof(e2e_summary, e2e_p50), 1, "s"},
    {"requests_per_s", "requests_per_s_ratio", "throughput", offsetof(e2e_summary, rps), 1,
     "req/s"},
    {"slo_attainment", "slo_attainment_ratio", "SLO attainment",
     offsetof(e2e_summary, slo_attainment), 100, "%"},
    {"hit_rate_device", NULL, "hit: engine pages", offsetof(e2e_summary, device_hit), 100, "%"},
    {"hit_rate_store", NULL, "hit: stores", offsetof(e2e_summary, store_hit), 100, "%"},
    {"hit_rate_cross_engine", NULL, "hit: another's", offsetof(e2e_summary, cross_hit), 100, "%"},
};
#define N_FIGURES (sizeof figures / sizeof figures[0])

/* The targets the verdict judges, on the median of the ratios: at most or at least bound.
 * Throughput is judged even within 2%: replaying a trace open-loop, its arrivals set both modes'
 * throughput when both keep up, and the ratio is then 1 within the run's noise (the last request's
 * finish), which a bound of exactly 1 would judge at random. */
static const struct target {
    const char *ratio, *label;
    int at_most;
    double bound;
} targets[] = {{"ttft_p50_ratio", "TTFT p50", 1, 0.5},
               {"ttft_p90_ratio", "TTFT p90", 1, 1.0},
               {"ttft_p99_ratio", "TTFT p99", 1, 1.0},
               {"requests_per_s_ratio", "throughput", 0, 0.98}};
#define N_TARGETS (sizeof targets / sizeof targets[0])

static double figure_of(const e2e_summary *s, const struct figure *f)
{
    return *(const double *)((const char *)s + f->at);
}

/* Figure f of each run of mode, in the order they ran, into v (n_runs long). Returns the count. */
static size_t mode_values(const e2e_report *rp, const char *mode, const struct figure *f, double *v)
{
    size_t n = 0;
    for (int k = 0; k < rp->n_runs; k++)
        if (!strcmp(rp->runs[k].mode, mode))
            v[n++] = figure_of(&rp->sm[k], f);
    return n;
}

/* The counts of mode's runs, summed, and the transport its engines reported, into o. */
static void add_totals(const e2e_report *rp, const char *mode, json_t *o)
{
    e2e_summary t = {0};
    const e2e_run *tr = NULL;
    double shm = 0, net = 0;
    for (int k = 0; k < rp->n_runs; k++) {
        const e2e_summary *s = &rp->sm[k];
        if (strcmp(rp->runs[k].mode, mode) != 0)
            continue;
        t.done += s->done, t.failed += s->failed, t.rejected += s->rejected;
        t.colocated += s->colocated, t.mismatches += s->mismatches;
        t.load_bytes += s->load_bytes, t.save_bytes += s->save_bytes;
        t.cross_requests += s->cross_requests;
        t.prefetched += s->prefetched, t.prefetch_missed += s->prefetch_missed;
        shm += rp->runs[k].shm_bytes, net += rp->runs[k].net_bytes;
        tr = !tr || (!tr->transport[0] && rp->runs[k].transport[0]) ? &rp->runs[k] : tr;
    }
    json_t *c =
        json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "completed", (json_int_t)t.done, "failed",
                  (json_int_t)t.failed, "rejected", (json_int_t)t.rejected, "colocated",
                  (json_int_t)t.colocated, "first_token_mismatches", (json_int_t)t.mismatches,
                  "bytes_loaded", (json_int_t)t.load_bytes, "bytes_saved", (json_int_t)t.save_bytes,
                  "cross_engine_requests", (json_int_t)t.cross_requests);
    json_object_set_new(c, "prefetched_requests", json_integer((json_int_t)t.prefetched));
    json_object_set_new(c, "prefetch_deadlines_missed",
                        json_integer((json_int_t)t.prefetch_missed));
    json_object_update(o, c);
    json_decref(c);
    json_object_set_new(
        o, "transport",
        json_string(tr && tr->transport[0] ? tr->transport : "none (no store used)"));
    if (tr && tr->transport_why[0])
        json_object_set_new(o, "transport_reason", json_string(tr->transport_why));
    /* Every byte the engines' storage clients moved, by way: shared memory with stores on their
     * host, the network (TCP, or RDMA where the transport says so) with the others. */
    json_object_set_new(o, "bytes_by_transport",
                        json_pack("{s:I,s:I}", "shm", (json_int_t)shm, "network", (json_int_t)net));
}

json_t *e2e_mode_json(const e2e_report *rp, const char *mode)
{
    double *v = malloc((size_t)rp->n_runs * sizeof *v);
    size_t n = 0;
    json_t *o = v ? json_object() : NULL;
    for (size_t f = 0; o && f < N_FIGURES; f++) {
        n = mode_values(rp, mode, &figures[f], v);
        if (n)
            bench_json_rounds(o, figures[f].key, v, n);
    }
    if (o && n) {
        size_t m = 0;
        for (int k = 0; k < rp->n_runs; k++)
            if (!strcmp(rp->runs[k].mode, mode))
                v[m++] = rp->runs[k].loadavg;
        bench_json_rounds(o, "loadavg_1m", v, m);
        json_object_set_new(o, "mode", json_string(mode));
        json_object_set_new(o, "repetitions", json_integer((json_int_t)n));
        json_object_set_new(o, "label", json_string("real"));
        add_totals(rp, mode, o);
        if (!strcmp(mode, "baseline")) {
            json_object_set_new(o, "reuse", json_string("engine"));
            json_object_set_new(o, "routing", json_string(rp->baseline_routing));
        }
    }
    if (o && !n) {
        json_decref(o);
        o = NULL;
    }
    free(v);
    return o;
}

json_t *e2e_summaries_json(const e2e_report *rp)
{
    json_t *summaries = json_object();
    static const char *const modes[] = {"kvf", "baseline"};
    for (int m = 0; m < 2; m++) {
        json_t *o = e2e_mode_json(rp, modes[m]);
        if (o)
            json_object_set_new(summaries, modes[m], o);
    }
    return summaries;
}

/* kvfabric's figure f over the baseline's, repetition by repetition, into v. Returns the count
 * (repetitions where the baseline's figure is 0 give none). */
static size_t ratio_values(const e2e_report *rp, const struct figure *f, double *v)
{
    size_t n = 0;
    for (int a = 0; a < rp->n_runs; a++) {
        if (strcmp(rp->runs[a].mode, "kvf") != 0)
            continue;
        for (int b = 0; b < rp->n_runs; b++) {
            double base = figure_of(&rp->sm[b], f);
            if (!strcmp(rp->runs[b].mode, "baseline") && rp->runs[b].rep == rp->runs[a].rep &&
                base > 0)
                v[n++] = figure_of(&rp->sm[a], f) / base;
        }
    }
    return n;
}

/* "0.408 [0.39, 0.431]": a median and its spread, times scale. */
static void cell(char *buf, size_t len, bench_spread s, double scale)
{
    snprintf(buf, len, "%.4g [%.3g, %.3g]", s.median * scale, s.p10 * scale, s.p90 * scale);
}

static void print_table(const e2e_report *rp, double *v)
{
    printf("\nkvf-bench e2e: %zu requests, %d repetitions per mode run alternately, %zu engines, "
           "model %s, %s, all figures real\n",
           rp->n_requests, rp->reps, rp->n_engines, rp->model, rp->where);
    printf("median over the repetitions [10th, 90th percentile]; baseline: the same engines with "
           "their own prefix cache, no store, routed by %s\n",
           rp->baseline_routing);
    printf("%-22s %-28s %-28s %s\n", "", "with kvfabric", "baseline", "kvfabric / baseline");
    for (size_t f = 0; f < N_FIGURES; f++) {
        char c[3][64] = {"-", "-", "-"}, label[40];
        const char *modes[2] = {"kvf", "baseline"};
        for (int m = 0; m < 2; m++) {
            size_t n = mode_values(rp, modes[m], &figures[f], v);
            if (n)
                cell(c[m], sizeof c[m], bench_spread_of(v, n), figures[f].scale);
        }
        size_t n = figures[f].ratio ? ratio_values(rp, &figures[f], v) : 0;
        if (n)
            cell(c[2], sizeof c[2], bench_spread_of(v, n), 1);
        snprintf(label, sizeof label, "%s (%s)", figures[f].label, figures[f].unit);
        printf("%-22s %-28s %-28s %s\n", label, c[0], c[1], c[2]);
    }
    for (int k = 0; k < rp->n_runs; k++) {
        const e2e_summary *s = &rp->sm[k];
        const e2e_run *R = &rp->runs[k];
        if (rp->from_records) {
            printf("%s #%d: %zu done, %zu failed, %zu rejected, %zu colocated; %zu requests loaded "
                   "a prefix another engine computed\n",
                   R->mode, R->rep, s->done, s->failed, s->rejected, s->colocated,
                   s->cross_requests);
            continue;
        }
        printf("%s #%d: %zu done, %zu failed, %zu rejected, %zu colocated; %.1f MB loaded from "
               "and %.1f MB saved to the stores (%s; %.1f MB over shared memory, %.1f MB over "
               "the network); %zu requests loaded a prefix another engine computed; %zu "
               "prefetched while waiting (%zu cut by the deadline); load average %.2f\n",
               R->mode, R->rep, s->done, s->failed, s->rejected, s->colocated,
               (double)s->load_bytes / 1e6, (double)s->save_bytes / 1e6,
               R->transport[0] ? R->transport : "none", R->shm_bytes / 1e6, R->net_bytes / 1e6,
               s->cross_requests, s->prefetched, s->prefetch_missed, R->loadavg);
    }
}

/* Judges target t on the n ratios v: the median, and in how many repetitions it held. */
static json_t *judge(const struct target *t, const double *v, size_t n, int *met, char *line,
                     size_t len)
{
    bench_spread s = bench_spread_of(v, n);
    size_t held = 0;
    for (size_t i = 0; i < n; i++)
        held += t->at_most ? v[i] <= t->bound : v[i] >= t->bound;
    *met = n > 0 && (t->at_most ? s.median <= t->bound : s.median >= t->bound);
    snprintf(line, len, "%s %.3f %s %.2f %s (%zu of %zu repetitions)", t->label, s.median,
             t->at_most ? "<=" : ">=", t->bound, *met ? "met" : "NOT met", held, n);
    char tg[16];
    snprintf(tg, sizeof tg, "%s %.2f", t->at_most ? "<=" : ">=", t->bound);
    return json_pack("{s:s,s:f,s:f,s:f,s:b,s:I,s:I}", "target", tg, "median", s.median, "p10",
                     s.p10, "p90", s.p90, "met", *met, "met_in_repetitions", (json_int_t)held,
                     "repetitions", (json_int_t)n);
}

/* The completed requests' TTFTs of every run of mode, repetitions pooled, into a new array (*n
 * long; NULL when none or out of memory). */
static double *mode_ttfts(const e2e_report *rp, const char *mode, size_t *n)
{
    size_t cap = 0;
    *n = 0;
    for (int k = 0; k < rp->n_runs; k++)
        cap += strcmp(rp->runs[k].mode, mode) ? 0 : rp->runs[k].n;
    double *v = cap ? malloc(cap * sizeof *v) : NULL;
    for (int k = 0; v && k < rp->n_runs; k++) {
        const e2e_run *R = &rp->runs[k];
        for (size_t i = 0; !strcmp(R->mode, mode) && i < R->n; i++)
            if (!R->r[i].failed && !R->r[i].rt.rejected)
                v[(*n)++] = R->r[i].ttft;
    }
    if (v && !*n)
        free(v), v = NULL;
    return v;
}

/* Appends the percentiles listed (ascending) to out as ranges: "p1-p12, p14". */
static void ranges_of(const int *ps, int n, char *out, size_t len)
{
    size_t used = 0;
    out[0] = '\0';
    for (int i = 0; i < n && used < len; i++) {
        int j = i;
        while (j + 1 < n && ps[j + 1] == ps[j] + 1)
            j++;
        int w = j == i
                    ? snprintf(out + used, len - used, "%sp%d", used ? ", " : "", ps[i])
                    : snprintf(out + used, len - used, "%sp%d-p%d", used ? ", " : "", ps[i], ps[j]);
        used += w > 0 ? (size_t)w : 0;
        i = j;
    }
}

/* Resamples of the requests, for the noise of each percentile's ratio. */
#define RESAMPLES 1000

/* v's values drawn n times with replacement into out, sorted. */
static void resample(const double *v, size_t n, double *out, uint64_t *seed)
{
    for (size_t i = 0; i < n; i++)
        out[i] = v[kvf__splitmix64(seed) % n];
    bench_sort(out, n);
}

/* For each percentile of ps (kvfabric slower there), whether that holds beyond the requests'
 * sampling noise: in at least 95% of RESAMPLES resamples of both modes' requests (a bootstrap,
 * seeded: every report of the same records says the same) kvfabric's TTFT at that percentile is
 * still above the baseline's. beyond[i] 1 where it holds; -1 where memory ran out. */
static int beyond_noise(const double *k, size_t nk, const double *b, size_t nb, const int *ps,
                        int n, int *beyond)
{
    double *rk = malloc(nk * sizeof *rk), *rb = malloc(nb * sizeof *rb);
    int *above = calloc((size_t)(n ? n : 1), sizeof *above);
    if (!rk || !rb || !above) {
        free(rk), free(rb), free(above);
        return -1;
    }
    uint64_t seed = 0x6b76662d65326521ull;
    for (int r = 0; r < RESAMPLES && n; r++) {
        resample(k, nk, rk, &seed);
        resample(b, nb, rb, &seed);
        for (int i = 0; i < n; i++) {
            double q = ps[i] / 100.0;
            above[i] += bench_quantile_sorted(rk, nk, q) > bench_quantile_sorted(rb, nb, q);
        }
    }
    for (int i = 0; i < n; i++)
        beyond[i] = above[i] * 100 >= 95 * RESAMPLES;
    free(rk), free(rb), free(above);
    return 0;
}

/* Beyond the three percentiles the verdict judges: kvfabric's TTFT over the baseline's at every
 * percentile from 1 to 99 (repetitions pooled, as the CDF plot draws them), printed as the
 * ranges where kvfabric is slower, with the worst, and of those the ones beyond the requests'
 * sampling noise (beyond_noise: a bootstrap of the requests, each percentile tested on its own, so
 * that among many a few can pass by chance; the runs' own variation, larger on a shared GPU, is
 * not in it); in res as ttft_by_percentile. Not judged: it says where the
 * curves cross (short prompts time-sharing a GPU with other engines, docs/python.md), which p50,
 * p90 and p99 alone do not. */
static void percentile_line(const e2e_report *rp, json_t *res)
{
    size_t nk, nb;
    double *k = mode_ttfts(rp, "kvf", &nk), *b = mode_ttfts(rp, "baseline", &nb);
    json_t *ratios = json_array(), *slower = json_array(), *beyond_j = json_array();
    if (!k || !b || !ratios || !slower || !beyond_j) {
        free(k), free(b), json_decref(ratios), json_decref(slower), json_decref(beyond_j);
        return;
    }
    int ps[99] = {0}, beyond[99] = {0}, bps[99] = {0}, n_slower = 0, n_beyond = 0, worst_p = 0;
    double worst = 0;
    bench_sort(k, nk);
    bench_sort(b, nb);
    for (int p = 1; p < 100; p++) {
        double q = p / 100.0;
        double kv = bench_quantile_sorted(k, nk, q), bv = bench_quantile_sorted(b, nb, q);
        double r = bv > 0 ? kv / bv : 0;
        json_array_append_new(ratios, json_real(r));
        if (r > 1.0) {
            json_array_append_new(slower, json_integer(p));
            ps[n_slower++] = p;
            if (r > worst)
                worst = r, worst_p = p;
        }
    }
    int noise_ok = beyond_noise(k, nk, b, nb, ps, n_slower, beyond) == 0;
    for (int i = 0; noise_ok && i < n_slower; i++)
        if (beyond[i]) {
            bps[n_beyond++] = ps[i];
            json_array_append_new(beyond_j, json_integer(ps[i]));
        }
    char ranges[400], branges[400];
    ranges_of(ps, n_slower, ranges, sizeof ranges);
    ranges_of(bps, n_beyond, branges, sizeof branges);
    if (n_slower) {
        printf("TTFT percentile by percentile (p1 to p99, repetitions pooled): kvfabric slower at "
               "%s (%d of 99; worst %.2fx at p%d), not slower at the others",
               ranges, n_slower, worst, worst_p);
        if (!noise_ok)
            printf("\n");
        else if (n_beyond)
            printf("; beyond the requests' sampling noise (each percentile on its own: slower in "
                   "95%% or more of %d resamples of them) at %s\n",
                   RESAMPLES, branges);
        else
            printf("; within the requests' sampling noise at all of them (each on its own: slower "
                   "in under 95%% of %d resamples of them)\n",
                   RESAMPLES);
    } else
        printf("TTFT percentile by percentile (p1 to p99, repetitions pooled): kvfabric not "
               "slower at any\n");
    json_t *o = json_pack("{s:o,s:o,s:s,s:f,s:i,s:s}", "ratios", ratios, "slower_at", slower,
                          "slower_ranges", ranges, "worst_ratio", n_slower ? worst : 0.0,
                          "worst_at", worst_p, "label", "real");
    if (noise_ok) {
        json_object_set_new(o, "beyond_noise_at", beyond_j);
        json_object_set_new(o, "beyond_noise_ranges", json_string(branges));
        json_object_set_new(o, "resamples", json_integer(RESAMPLES));
    } else
        json_decref(beyond_j);
    json_object_set_new(res, "ttft_by_percentile", o);
    free(k);
    free(b);
}

void e2e_report_ratios(const e2e_report *rp, json_t *res)
{
    double *v = malloc((size_t)rp->n_runs * sizeof *v);
    if (!v)
        return;
    print_table(rp, v);
    if (ratio_values(rp, &figures[0], v) == 0) { /* not both modes */
        free(v);
        return;
    }
    for (size_t f = 0; f < N_FIGURES; f++) {
        size_t n = figures[f].ratio ? ratio_values(rp, &figures[f], v) : 0;
        if (n)
            bench_json_rounds(res, figures[f].ratio, v, n);
    }
    json_t *tj = json_object();
    int all = 1;
    printf("verdict (kvfabric / baseline, median of the repetitions):");
    for (size_t t = 0; t < N_TARGETS; t++) {
        const struct figure *f = NULL;
        for (size_t i = 0; i < N_FIGURES; i++)
            f = figures[i].ratio && !strcmp(figures[i].ratio, targets[t].ratio) ? &figures[i] : f;
        size_t n = ratio_values(rp, f, v);
        char line[160];
        int met;
        json_object_set_new(tj, targets[t].ratio,
                            judge(&targets[t], v, n, &met, line, sizeof line));
        printf("%s %s", t ? ";" : "", line);
        all &= met;
        if (t == 0)
            json_object_set_new(res, "ttft_p50_target_met", json_boolean(met));
    }
    printf("\nall targets met: %s\n", all ? "yes" : "NO");
    percentile_line(rp, res);
    json_object_set_new(res, "targets", tj);
    json_object_set_new(res, "targets_met", json_boolean(all));
    free(v);
}

/* ------------------------------------------------------------------------------------------ */
/* Output */

/* The columns of records.csv, in order: keys of the record's JSON object. */
static const char *const columns[] = {"mode",
                                      "repetition",
                                      "request",
                                      "arrival_s",
                                      "prompt_tokens",
                                      "output_tokens",
                                      "prefill",
                                      "decode",
                                      "colocated",
                                      "device_tokens",
                                      "store_tokens",
                                      "ttft_s",
                                      "place_s",
                                      "engine_queue_s",
                                      "engine_prefill_s",
                                      "engine_compute_s",
                                      "engine_load_wait_s",
                                      "e2e_s",
                                      "itl_mean_s",
                                      "handoff_s",
                                      "decode_queue_s",
                                      "generated",
                                      "tokens_xxh64",
                                      "rejected",
                                      "error"};

/* Request i of run R as a JSON object, every figure labelled real. Caller owns the result. */
static json_t *record_json(const e2e_run *R, size_t i)
{
    const e2e_rec *q = &R->r[i];
    const kvfe_route *rt = &q->rt;
    char hash[20];
    snprintf(hash, sizeof hash, "%016" PRIx64, q->tokens_hash);
    json_t *o = json_pack(
        "{s:s,s:i,s:I,s:f,s:I,s:i,s:s,s:s,s:b,s:I,s:I,s:f,s:f,s:f,s:f,s:f,s:f}", "mode", R->mode,
        "repetition", R->rep, "request", (json_int_t)i, "arrival_s", q->arrival, "prompt_tokens",
        (json_int_t)rt->n, "output_tokens", (int)rt->max_tokens, "prefill",
        rt->prefill ? rt->prefill->id : "", "decode", rt->decode ? rt->decode->id : "", "colocated",
        rt->colocated, "device_tokens", (json_int_t)rt->device_tokens, "store_tokens",
        (json_int_t)rt->loaded_tokens, "ttft_s", q->ttft, "place_s", rt->place_s, "engine_queue_s",
        rt->queue_s, "engine_prefill_s", rt->prefill_s, "engine_compute_s", rt->compute_s,
        "engine_load_wait_s", rt->load_wait_s);
    json_t *more = json_pack(
        "{s:f,s:f,s:f,s:f,s:i,s:s,s:b,s:s,s:s,s:f,s:f,s:I,s:I,s:b}", "e2e_s", q->e2e, "itl_mean_s",
        q->itl_n ? q->itl_sum / q->itl_n : 0, "handoff_s", rt->handoff_s, "decode_queue_s",
        rt->decode_queue_s, "generated", (int)q->n_generated, "tokens_xxh64", hash, "rejected",
        rt->rejected, "error", q->err, "label", "real", "finish_s", q->finish, "itl_max_s",
        q->itl_max, "itl_steps", (json_int_t)q->itl_n, "cross_tokens", (json_int_t)q->cross_tokens,
        "first_token_mismatch", rt->first_token_mismatch);
    json_object_set_new(more, "prefetch_tokens", json_integer((json_int_t)rt->prefetch_tokens));
    json_object_set_new(more, "engine_gpu_turn_s", json_real(rt->gpu_turn_s));
    json_object_set_new(more, "engine_gpu_yielded_s", json_real(rt->gpu_yielded_s));
    json_object_set_new(more, "engine_gpu_beside", json_boolean(rt->gpu_beside));
    json_object_set_new(more, "engine_save_s", json_real(rt->save_s));
    if (rt->pass_thread_cpu_s >= 0) /* engines that say where their pass's time went */
        json_object_set_new(
            more, "engine_pass_clock",
            json_pack("{s:f,s:f,s:o}", "thread_cpu_s", rt->pass_thread_cpu_s, "process_cpu_s",
                      rt->pass_process_cpu_s, "gpu_s",
                      rt->pass_gpu_s >= 0 ? json_real(rt->pass_gpu_s) : json_null()));
    json_object_set_new(more, "ttft_streamed", json_boolean(rt->first_token_streamed));
    json_object_set_new(more, "prefetch_ready_tokens",
                        json_integer((json_int_t)rt->prefetch_ready_tokens));
    json_object_set_new(more, "prefetch_deadline_missed",
                        json_boolean(rt->prefetch_deadline_missed));
    json_object_update(o, more);
    json_decref(more);
    return o;
}

void e2e_compare_tokens(const e2e_run *runs, int n_runs, size_t n, size_t *compared, size_t *differ)
{
    *compared = *differ = 0;
    for (size_t i = 0; i < n; i++) {
        const e2e_rec *first = NULL;
        int served = 0, differs = 0;
        for (int k = 0; k < n_runs; k++) {
            const e2e_rec *q = &runs[k].r[i];
            if (q->failed || q->rt.rejected)
                continue;
            first = first ? first : q;
            differs |= q->tokens_hash != first->tokens_hash || q->n_generated != first->n_generated;
            served++;
        }
        *compared += served >= 2;
        *differ += served >= 2 && differs;
    }
}

/* One CSV line of the record o, in the order of columns. */
static void write_csv_line(FILE *f, json_t *o)
{
    for (size_t c = 0; c < sizeof columns / sizeof columns[0]; c++) {
        json_t *v = json_object_get(o, columns[c]);
        fputs(c ? "," : "", f);
        if (json_is_string(v) && !strcmp(columns[c], "error")) {
            fputc('"', f); /* quoted, its quotes doubled: the error's text is free */
            for (const char *p = json_string_value(v); *p; p++) {
                if (*p == '"')
                    fputc('"', f);
                fputc(*p, f);
            }
            fputc('"', f);
        } else if (json_is_string(v))
            fputs(json_string_value(v), f);
        else if (json_is_integer(v))
            fprintf(f, "%lld", (long long)json_integer_value(v));
        else if (json_is_real(v))
            fprintf(f, "%.6f", json_real_value(v));
        else
            fputs(json_is_true(v) ? "1" : "0", f);
    }
    fputs("\n", f);
}

void e2e_write_records(const char *dir, const e2e_run *runs, int n_runs)
{
    char path[700];
    snprintf(path, sizeof path, "%s/records.csv", dir);
    FILE *f = fopen(path, "w");
    json_t *all = json_array();
    for (size_t c = 0; f && c < sizeof columns / sizeof columns[0]; c++)
        fprintf(f, "%s%s", c ? "," : "", columns[c]);
    if (f)
        fputs("\n", f);
    for (int m = 0; m < n_runs; m++) {
        for (size_t i = 0; i < runs[m].n; i++) {
            json_t *o = record_json(&runs[m], i);
            if (f && o)
                write_csv_line(f, o);
            json_array_append_new(all, o);
        }
    }
    if (f)
        fclose(f);
    snprintf(path, sizeof path, "%s/records.json", dir);
    json_dump_file(all, path, JSON_INDENT(1));
    json_decref(all);
}

/* The words a plot gives each mode (inside gnuplot's single quotes: no apostrophe). */
static const char *mode_title(const char *mode)
{
    return strcmp(mode, "kvf") ? "baseline (engine prefix caches, no store)"
                               : "with kvfabric (disaggregated, cached)";
}

/* The CDF of the TTFT of mode's runs, pooled, into dat, and its p50, p90 and p99 (over the
 * requests that were served) into pct; returns the number of runs pooled. */
static int write_cdf(const char *dat, const e2e_run *runs, int n_runs, const char *mode,
                     double pct[3])
{
    size_t total = 0, k = 0;
    int reps = 0;
    for (int m = 0; m < n_runs; m++)
        total += strcmp(runs[m].mode, mode) ? 0 : runs[m].n;
    double *v = malloc((total + 1) * sizeof *v);
    for (int m = 0; v && m < n_runs; m++) {
        if (strcmp(runs[m].mode, mode) != 0)
            continue;
        reps++;
        for (size_t i = 0; i < runs[m].n; i++)
            if (!runs[m].r[i].failed && !runs[m].r[i].rt.rejected)
                v[k++] = runs[m].r[i].ttft;
    }
    FILE *f = v ? fopen(dat, "w") : NULL;
    static const double q[3] = {0.5, 0.9, 0.99};
    for (int i = 0; i < 3; i++)
        pct[i] = k ? bench_quantile(v, k, q[i]) : 0; /* sorts */
    for (size_t i = 0; f && i < k; i++)
        fprintf(f, "%.6f %.6f\n", v[i], (double)(i + 1) / (double)total);
    if (f)
        fclose(f);
    free(v);
    return reps;
}

/* Completed requests per second of mode's runs, in bins of bin_s, averaged over its runs. */
static void write_throughput(const char *dat, const e2e_run *runs, int n_runs, const char *mode,
                             double bin_s)
{
    double end = 0;
    int reps = 0;
    for (int m = 0; m < n_runs; m++)
        for (size_t i = 0; !strcmp(runs[m].mode, mode) && i < runs[m].n; i++)
            end = runs[m].r[i].finish > end ? runs[m].r[i].finish : end;
    size_t nb = (size_t)(end / bin_s) + 1;
    double *b = calloc(nb, sizeof *b);
    for (int m = 0; b && m < n_runs; m++) {
        if (strcmp(runs[m].mode, mode) != 0)
            continue;
        reps++;
        for (size_t i = 0; i < runs[m].n; i++)
            if (!runs[m].r[i].failed && !runs[m].r[i].rt.rejected)
                b[(size_t)(runs[m].r[i].finish / bin_s)] += 1;
    }
    FILE *f = b ? fopen(dat, "w") : NULL;
    for (size_t i = 0; f && i < nb; i++)
        fprintf(f, "%.3f %.4f\n", ((double)i + 0.5) * bin_s, b[i] / bin_s / (reps ? reps : 1));
    if (f)
        fclose(f);
    free(b);
}

int e2e_plot(const char *dir, const e2e_run *runs, int n_runs, double bin_s, const char *setup)
{
    static const char *const modes[] = {"kvf", "baseline"};
    static const char *const colors[] = {"#9400d3", "#009e73"};
    char dat[2][700], png[700];
    double pct[2][3] = {{0}};
    int have[2] = {0, 0}, reps = 0;
    for (int m = 0; m < 2; m++) {
        snprintf(dat[m], sizeof dat[m], "%s/ttft_%s.dat", dir, modes[m]);
        have[m] = write_cdf(dat[m], runs, n_runs, modes[m], pct[m]);
        reps = have[m] > reps ? have[m] : reps;
    }
    FILE *g = popen("gnuplot", "w");
    if (!g)
        return -1;
    fprintf(g, "set terminal pngcairo size 900,520 font 'sans,10'\nset grid\nset key bottom "
               "right\n");
    snprintf(png, sizeof png, "%s/ttft_cdf.png", dir);
    /* The setup in the title, the SLO as a line, each mode's p50, p90 and p99 marked: the figure
     * reads without the table beside it. */
    fprintf(g,
            "set output '%s'\nset title \"Time to first token, CDF (real; %zu requests, %d "
            "repetition(s) pooled%s%s)\" noenhanced\nset xlabel 'TTFT (s), log scale'\n"
            "set ylabel 'fraction of requests'\nset logscale x\nset yrange [0:1.02]\n",
            png, runs[0].n, reps, setup && *setup ? "; " : "", setup ? setup : "");
    if (runs[0].slo_s > 0)
        fprintf(g,
                "set arrow from %g, graph 0 to %g, graph 1 nohead dt 2 lw 1.5 lc rgb '#555555'\n"
                "set label 'SLO %g s' at %g, graph 0.35 offset 0.5,0 tc rgb '#555555'\n",
                runs[0].slo_s, runs[0].slo_s, runs[0].slo_s, runs[0].slo_s);
    static const char *const pname[3] = {"p50", "p90", "p99"};
    static const double pq[3] = {0.5, 0.9, 0.99};
    for (int m = 0; m < 2; m++)
        for (int i = 0; have[m] && i < 3; i++)
            fprintf(g,
                    "set label '%s %.3g s' at %g,%g point pt 7 ps 1.3 lc rgb '%s' offset 0.7,%s "
                    "tc rgb '%s' font 'sans,9'\n",
                    pname[i], pct[m][i], pct[m][i], pq[i], colors[m], m ? "-0.6" : "0.6",
                    colors[m]);
    fprintf(g, "plot ");
    for (int m = 0, drawn = 0; m < 2; m++)
        if (have[m])
            fprintf(g, "%s'%s' using 1:2 with steps lw 2 lc rgb '%s' title '%s'",
                    drawn++ ? ", " : "", dat[m], colors[m], mode_title(modes[m]));
    fprintf(g, "\nunset logscale x\nunset arrow\nunset label\nset autoscale y\n");
    snprintf(png, sizeof png, "%s/throughput.png", dir);
    fprintf(g,
            "set output '%s'\nset title \"Completed requests per second (real; %.0f s bins, "
            "mean of the repetitions%s%s)\" noenhanced\nset xlabel 'time since the first "
            "arrival (s)'\nset ylabel 'requests / s'\nset key top right\nplot ",
            png, bin_s, setup && *setup ? "; " : "", setup ? setup : "");
    for (int m = 0, drawn = 0; m < 2; m++) {
        int present = 0;
        for (int k = 0; k < n_runs; k++)
            present |= !strcmp(runs[k].mode, modes[m]);
        if (!present)
            continue;
        snprintf(dat[m], sizeof dat[m], "%s/throughput_%s.dat", dir, modes[m]);
        write_throughput(dat[m], runs, n_runs, modes[m], bin_s);
        fprintf(g, "%s'%s' using 1:2 with linespoints lw 2 lc rgb '%s' title '%s'",
                drawn++ ? ", " : "", dat[m], colors[m], mode_title(modes[m]));
    }
    fprintf(g, "\n");
    return pclose(g) == 0 ? 0 : -1;
}
