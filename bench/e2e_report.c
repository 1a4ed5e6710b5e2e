/* kvf-bench e2e's reports (e2e.h). */
#include "e2e.h"
#include "bench_util.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Summary */

void e2e_summarize(const e2e_run *R, e2e_summary *s)
{
    memset(s, 0, sizeof *s);
    double *tt = malloc((R->n + 1) * sizeof *tt), *e2 = malloc((R->n + 1) * sizeof *e2);
    double *it = malloc((R->n + 1) * sizeof *it);
    size_t k = 0, ki = 0;
    double prompt = 0, dev = 0, st = 0, cross = 0, last = 0, itl_sum = 0, itl_n = 0;
    size_t met = 0;
    for (size_t i = 0; i < R->n; i++) {
        const e2e_rec *q = &R->r[i];
        s->failed += q->failed;
        s->rejected += q->rt.rejected;
        if (q->failed || q->rt.rejected)
            continue;
        s->colocated += q->rt.colocated;
        s->mismatches += q->rt.first_token_mismatch;
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

json_t *e2e_summary_json(const e2e_summary *s, const e2e_run *R)
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

void e2e_write_records(const char *dir, e2e_run *runs, int n_runs)
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
            const e2e_rec *q = &runs[m].r[i];
            const kvfe_route *rt = &q->rt;
            const char *pe = rt->prefill ? rt->prefill->id : "",
                       *de = rt->decode ? rt->decode->id : "";
            double itl = q->itl_n ? q->itl_sum / q->itl_n : 0;
            if (f)
                fprintf(f,
                        "%s,%zu,%.6f,%zu,%u,%s,%s,%d,%zu,%zu,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%u,"
                        "%016" PRIx64 ",%d,\"%s\"\n",
                        runs[m].mode, i, q->arrival, rt->n, rt->max_tokens, pe, de, rt->colocated,
                        rt->device_tokens, rt->loaded_tokens, q->ttft, rt->queue_s, rt->prefill_s,
                        q->e2e, itl, rt->handoff_s, q->n_generated, q->tokens_hash, rt->rejected,
                        q->err);
            char hash[20];
            snprintf(hash, sizeof hash, "%016" PRIx64, q->tokens_hash);
            json_array_append_new(
                all, json_pack("{s:s,s:I,s:f,s:I,s:i,s:s,s:s,s:b,s:I,s:I,s:f,s:f,s:f,s:f,s:i,"
                               "s:s,s:b,s:s,s:s}",
                               "mode", runs[m].mode, "request", (json_int_t)i, "arrival_s",
                               q->arrival, "prompt_tokens", (json_int_t)rt->n, "output_tokens",
                               (int)rt->max_tokens, "prefill", pe, "decode", de, "colocated",
                               rt->colocated, "device_tokens", (json_int_t)rt->device_tokens,
                               "store_tokens", (json_int_t)rt->loaded_tokens, "ttft_s", q->ttft,
                               "e2e_s", q->e2e, "itl_mean_s", itl, "handoff_s", rt->handoff_s,
                               "generated", (int)q->n_generated, "tokens_xxh64", hash, "rejected",
                               rt->rejected, "error", q->err, "label", "real"));
        }
    }
    if (f)
        fclose(f);
    snprintf(path, sizeof path, "%s/records.json", dir);
    json_dump_file(all, path, JSON_INDENT(1));
    json_decref(all);
}

int e2e_plot(const char *dir, e2e_run *runs, int n_runs, double bin_s)
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
            if (!runs[m].r[i].failed && !runs[m].r[i].rt.rejected)
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
            if (!runs[m].r[i].failed && !runs[m].r[i].rt.rejected)
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
