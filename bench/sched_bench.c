/*
 * kvf-bench sched: placement policies and queue disciplines compared on a trace replay at cluster
 * scale through the real prefix index and placement code (sched_sim.c, every figure simulated),
 * and the real place() latency on this machine (--decision-latency).
 *
 *   kvf-bench sched --trace FILE [--instances N] [--policy P[,P...]] [--queue Q[,Q...]]
 *                   [--rates X[,X...] | --time-scale X | --find-rate] [--windows W]
 *                   [--slo-ttft S] [--cost FILE] [--device-blocks B] [--store-blocks B]
 *                   [--max-requests M] [--json]
 *   kvf-bench sched --decision-latency [--quick] [--json]
 *
 * Placement and queue order are separate axes: every policy runs under every discipline, at every
 * rate (multiples of the trace's own arrival rate: 0.5, 1, 2 and 4 unless told), and kvf_cost is
 * compared with each other policy under the same discipline, so that what placement gains is not
 * credited with what the queue order gains. With --windows W the trace is cut into W consecutive
 * parts replayed on their own, and each comparison is reported as the median of the parts with
 * their 10th-90th percentile spread.
 */
#include "bench.h"
#include "bench_util.h"
#include "sched_sim.h"

#include "kvf/kvf.h"
#include "scheduler.h"

#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_RATES 16

/* Where kvf_cost's p90 or p99 TTFT is within this factor of another policy's, neither wins. */
#define EVEN_WITHIN 1.02

/* ------------------------------------------------------------------------------------------ */
/* Decision latency: place() with 1M indexed blocks over 256 instances. */

#define DL_INSTANCES 256
#define DL_BT        16   /* tokens per block */
#define DL_PREFIXES  2000 /* 2,000 prefixes of 512 blocks (8K tokens) */
#define DL_BLOCKS    512

static void prefix_tokens(uint32_t *t, int p)
{
    for (int i = 0; i < DL_BLOCKS * DL_BT; i++)
        t[i] = (uint32_t)(p * 7919 + i * 31) % 50000;
}

/* A scheduler of DL_INSTANCES instances whose index holds DL_PREFIXES prefixes, each held by 1-4
 * instances, whole or in part: about 1M blocks. Returns 0, or -1 out of memory. */
static int latency_index(kvf_sched **out, uint32_t *t)
{
    uint64_t *h = malloc((size_t)DL_BLOCKS * sizeof *h);
    *out = h ? bench_sched_uniform(DL_INSTANCES, DL_BT, 100000) : NULL;
    if (!*out) {
        free(h);
        return -1;
    }
    uint64_t rng = 7;
    for (int p = 0; p < DL_PREFIXES; p++) {
        prefix_tokens(t, p);
        int holders = 1 + p % 4;
        for (int k = 0; k < holders; k++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            int inst = (int)((rng >> 33) % DL_INSTANCES);
            int nb = DL_BLOCKS / (k + 1);
            for (int i = 0; i < nb; i++)
                h[i] = ((uint64_t)p << 20) ^ ((uint64_t)inst << 40) ^ (uint64_t)i;
            kvf_sched_block_stored(*out, inst, h, (size_t)nb, 0, 0, t, (size_t)nb * DL_BT, DL_BT,
                                   KVF_TIER_DEVICE);
        }
    }
    free(h);
    return 0;
}

/* Times `calls` place() calls of 8,192-token requests, call `from` onwards, into lat (us). */
static void time_places(kvf_sched *s, uint32_t *t, int from, int calls, double *lat)
{
    for (int c = 0; c < calls; c++) {
        int it = from + c;
        prefix_tokens(t, (int)((uint64_t)it * 2654435761u % DL_PREFIXES));
        kvf_instance_load L = {.queued_prefill_tokens = (double)(it % 5000)};
        kvf_sched_instance_load(s, it % DL_INSTANCES, &L);
        kvf_place_req rq = {.tokens = t, .n_tokens = DL_BLOCKS * DL_BT, .output_tokens = 256};
        kvf_place_res rs;
        double t0 = bench_now();
        kvf_sched_place(s, &rq, &rs);
        lat[c] = (bench_now() - t0) * 1e6;
    }
}

/* place()'s p50 and p99 in each of several rounds, reported as the median of the rounds with
 * their spread: a shared machine's preemptions land in some rounds and not others. */
static int decision_latency(json_t *res, int quick)
{
    const int rounds = quick ? 5 : 11, calls = quick ? 400 : 1000;
    uint32_t *t = malloc((size_t)DL_BLOCKS * DL_BT * sizeof *t);
    double *lat = malloc((size_t)calls * sizeof *lat);
    double p50[11], p99[11];
    kvf_sched *s = NULL;
    int rc = -1;
    if (!t || !lat || latency_index(&s, t) != 0)
        goto out_free;
    for (int r = 0; r < rounds; r++) {
        time_places(s, t, r * calls, calls, lat);
        p50[r] = bench_quantile(lat, (size_t)calls, 0.5);
        p99[r] = bench_quantile(lat, (size_t)calls, 0.99);
    }
    kvf_index_stats st;
    kvf_sched_index_stats(s, &st);
    printf("kvf-bench sched --decision-latency: real (place() on this machine)\n");
    printf("  index: %" PRIu64 " blocks, %" PRIu64 " holdings, %d instances, %.0f MiB\n", st.blocks,
           st.holdings, DL_INSTANCES, (double)st.bytes / 1048576.0);
    json_object_set_new(res, "decision_label", json_string("real"));
    json_object_set_new(res, "index_blocks", json_integer((json_int_t)st.blocks));
    json_object_set_new(res, "index_instances", json_integer(DL_INSTANCES));
    json_object_set_new(res, "decision_rounds", json_integer(rounds));
    json_object_set_new(res, "decision_calls_per_round", json_integer(calls));
    bench_spread a = bench_json_rounds(res, "place_p50_us", p50, (size_t)rounds);
    bench_spread b = bench_json_rounds(res, "place_p99_us", p99, (size_t)rounds);
    printf("  place() of an 8192-token request, %d rounds of %d calls: p50 %.1f us (rounds "
           "%.1f-%.1f), p99 %.1f us (rounds %.1f-%.1f), median and 10th-90th percentile\n",
           rounds, calls, a.median, a.p10, a.p90, b.median, b.p10, b.p90);
    rc = 0;
out_free:
    kvf_sched_destroy(&s);
    free(lat);
    free(t);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Options */

typedef struct opts {
    const char *trace, *cost_file, *policies, *queues, *rates;
    int instances, json, find_rate, decision_latency, ingest, relay, quick, shards;
    double time_scale, slo;
    long max_requests, device_blocks, store_blocks, windows;
} opts;

/* Reads the options into o. Returns 0, or -1 with the usage on stderr. */
static int parse(int argc, char **argv, opts *o)
{
    *o = (opts){.policies = "round_robin,least_loaded,longest_prefix,dynamo_cost,kvf_cost",
                .queues = "fifo,work,sjf,lpm",
                .rates = "0.5,1,2,4",
                .instances = 16,
                .slo = 10.0,
                .device_blocks = 1800,
                .store_blocks = 400000,
                .windows = 1};
    const kvf__arg args[] = {
        KVF__OPT("trace", KVF__ARG_STR, &o->trace, "FILE",
                 "the request trace to replay (JSON lines: timestamp, input and output lengths, "
                 "hash_ids)",
                 NULL),
        KVF__OPT("instances", KVF__ARG_INT, &o->instances, "N", "the simulated engines", "16",
                 .lo = 1, .hi = 4096),
        KVF__OPT("policy", KVF__ARG_STR, &o->policies, "P[,P...]",
                 "placement policies to compare: round_robin, least_loaded, longest_prefix, "
                 "dynamo_cost, kvf_cost",
                 "all five"),
        KVF__OPT("queue", KVF__ARG_STR, &o->queues, "Q[,Q...]",
                 "the engines' queue orders to compare: fifo, work, sjf, lpm, hrrn", "all five"),
        KVF__OPT("rates", KVF__ARG_STR, &o->rates, "X[,X...]",
                 "arrival rates, as multiples of the trace's own", "0.5,1,2,4"),
        KVF__OPT("time-scale", KVF__ARG_REAL, &o->time_scale, "X",
                 "one arrival rate: the trace's times multiplied by X (instead of --rates)", NULL,
                 .lo = 1e-6, .hi = 1e6),
        KVF__OPT("find-rate", KVF__ARG_FLAG, &o->find_rate, NULL,
                 "search the highest rate at which every policy meets --slo-ttft", NULL),
        KVF__OPT("windows", KVF__ARG_LONG, &o->windows, "W",
                 "replay the trace in W windows and report each", "1", .lo = 1, .hi = 1000),
        KVF__OPT("slo-ttft", KVF__ARG_REAL, &o->slo, "S", "the TTFT objective, seconds", "10",
                 .lo = 0, .hi = 1e6),
        KVF__OPT("cost", KVF__ARG_STR, &o->cost_file, "FILE",
                 "the cost model's constants (kvf-engine --calibrate)", "the built-in ones"),
        KVF__OPT("max-requests", KVF__ARG_LONG, &o->max_requests, "M",
                 "replay the first M requests (0: all)", "0", .lo = 0, .hi = 1e9),
        KVF__OPT("device-blocks", KVF__ARG_LONG, &o->device_blocks, "B",
                 "each engine's KV capacity in blocks", "1800", .lo = 1, .hi = 4294967295.0),
        KVF__OPT("store-blocks", KVF__ARG_LONG, &o->store_blocks, "B",
                 "the stores' capacity in blocks", "400000", .lo = 0, .hi = 4294967295.0),
        KVF__OPT("decision-latency", KVF__ARG_FLAG, &o->decision_latency, NULL,
                 "instead: place()'s latency on a loaded index (real)", NULL),
        KVF__OPT("ingest", KVF__ARG_FLAG, &o->ingest, NULL,
                 "instead: the rate of event ingest into the index (real)", NULL),
        KVF__OPT("relay", KVF__ARG_FLAG, &o->relay, NULL,
                 "instead: kvf-relay's rate, relaying an engine's stream by shard, against "
                 "decoding it alone (real)",
                 NULL),
        KVF__OPT("shards", KVF__ARG_INT, &o->shards, "N",
                 "with --ingest: also the index split N ways by prefix, a thread per shard, "
                 "against one shard in the same run; with --relay: the relay's shards (4) (real)",
                 "0: not measured", .lo = 0, .hi = 64),
        KVF__OPT("quick", KVF__ARG_FLAG, &o->quick, NULL,
                 "shorter --decision-latency and --ingest runs (CI)", NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "one JSON object on stdout", NULL),
    };
    int rc = bench_args("sched",
                        "--trace FILE [OPTIONS] | --decision-latency [--quick] | --ingest "
                        "[--shards N] [--quick] | --relay [--shards N] [--quick]",
                        "Trace replay through the scheduler's policies on simulated engines "
                        "(simulated); place() latency and event ingest (real). "
                        "docs/benchmarks.md.",
                        NULL, args, sizeof args / sizeof args[0], argc, argv);
    return rc;
}

/* The comma-separated names of list parsed by parse_one into out (at most max of them), their
 * number in *n. Returns 0, or -1 with the name not known on stderr. */
static int parse_names(const char *what, const char *list, int (*parse_one)(const char *, int *),
                       int *out, int max, int *n)
{
    int rc = 0;
    *n = 0;
    char *dup = strdup(list);
    if (!dup)
        return -1;
    for (char *sv = NULL, *t = strtok_r(dup, ",", &sv); t; t = strtok_r(NULL, ",", &sv)) {
        if (*n == max || parse_one(t, &out[*n]) != 0) {
            fprintf(stderr, "kvf-bench sched: unknown %s \"%s\" (or too many)\n", what, t);
            rc = -1;
            break;
        }
        (*n)++;
    }
    free(dup);
    return rc;
}

static int policy_one(const char *name, int *out)
{
    kvf_policy p;
    int rc = kvf_policy_parse(name, &p);
    *out = (int)p;
    return rc;
}

static int queue_one(const char *name, int *out)
{
    kvf_queue q;
    int rc = kvf_queue_parse(name, &q);
    *out = (int)q;
    return rc;
}

/* The rates of list (comma-separated positive multiples of the trace's rate) into rates, *n of
 * them. Returns 0, or -1 with the reason on stderr. */
static int parse_rates(const char *list, double rates[MAX_RATES], int *n)
{
    const char *p = list;
    for (*n = 0; *p; (*n)++) {
        char *end;
        double x = strtod(p, &end);
        if (*n == MAX_RATES || end == p || !(x > 0) || !isfinite(x) ||
            (*end != ',' && *end != '\0')) {
            fprintf(stderr,
                    "kvf-bench sched: --rates: \"%s\" is not a list of at most %d positive "
                    "numbers\n",
                    list, MAX_RATES);
            return -1;
        }
        rates[*n] = x;
        p = end + (*end == ',');
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The comparison */

/* Every run of one invocation: for each window, rate, discipline and policy, in that order. */
typedef struct grid {
    sched_replay *rp; /* windows of them */
    int nw, nr, nq, np;
    double rates[MAX_RATES];
    int queues[KVF_QUEUE_COUNT_];
    int pols[KVF_POLICY_COUNT_];
    sched_result *res;
} grid;

static sched_result *cell(const grid *g, int w, int r, int q, int p)
{
    return &g->res[((w * g->nr + r) * g->nq + q) * g->np + p];
}

/* The rate multiple at which round robin in arrival order attains the SLO for half the requests
 * of rp: bisection on the scale. 0 with *scale, or -1 when a replay could not run. */
static int find_rate(sched_replay *rp, double *scale)
{
    double lo = 0.05, hi = 64;
    sched_result r;
    for (int it = 0; it < 14; it++) {
        double mid = sqrt(lo * hi);
        if (sched_sim_run(rp, KVF_POLICY_ROUND_ROBIN, KVF_QUEUE_FIFO, mid, &r) != 0)
            return -1;
        bench_progress("sched", "round_robin, fifo at %.3fx the trace rate: %.1f%% within SLO", mid,
                       r.slo_attain * 100);
        if (r.slo_attain > 0.5)
            lo = mid;
        else
            hi = mid;
        if (hi / lo < 1.03)
            break;
    }
    *scale = sqrt(lo * hi);
    return 0;
}

static void print_header(const grid *g, int w)
{
    const sched_replay *rp = &g->rp[w];
    printf("kvf-bench sched: SIMULATED replay through the real index and policies\n");
    if (g->nw > 1)
        printf("  window %d of %d: ", w + 1, g->nw);
    else
        printf("  ");
    printf("%zu requests at %.2f req/s (the trace's own rate), %d instances, SLO TTFT %.1f s, "
           "device cache %u blocks, store %u blocks, queue window %u\n",
           rp->n, sched_replay_rps(rp), rp->ninst, rp->slo, rp->dev_blocks, rp->store_blocks,
           rp->cost.klpm_k);
    printf("  the least share of the instances' time any placement needs (every block computed "
           "once, loads free):");
    for (int r = 0; r < g->nr; r++)
        printf(" %.2f at %.3gx", sched_replay_work_floor(rp, g->rates[r]), g->rates[r]);
    printf("; near 1, requests queue whatever the placement\n");
    printf("  %-15s %-5s %5s %7s %8s %8s %8s %7s %7s %7s %7s %6s %11s\n", "policy", "queue", "rate",
           "req/s", "ttft p50", "p90", "p99", "in SLO", "done/s", "dev hit", "store", "reject",
           "/bound p50 p90");
}

static void print_result(const sched_result *r)
{
    printf("  %-15s %-5s %4.2gx %7.2f %8.2f %8.2f %8.2f %6.1f%% %7.2f %6.1f%% %6.1f%% %6zu "
           "%5.2f %5.2f\n",
           kvf_policy_name(r->policy), kvf_queue_name(r->queue), r->scale, r->offered_rps,
           r->ttft_p50, r->ttft_p90, r->ttft_p99, r->slo_attain * 100, r->throughput,
           r->dev_hit_rate * 100, r->store_hit_rate * 100, r->rejected, r->vs_bound_p50,
           r->vs_bound_p90);
}

/* r as JSON; work_floor: sched_replay_work_floor() at r's rate. */
static json_t *result_json(const sched_result *r, double work_floor, int window, int windows)
{
    json_t *o = json_pack("{s:s,s:s,s:s,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:f,s:I,s:I}", "policy",
                          kvf_policy_name(r->policy), "queue", kvf_queue_name(r->queue), "label",
                          "simulated", "rate", r->scale, "offered_rps", r->offered_rps,
                          "ttft_p50_s", r->ttft_p50, "ttft_p90_s", r->ttft_p90, "ttft_p99_s",
                          r->ttft_p99, "slo_attainment", r->slo_attain, "throughput_rps",
                          r->throughput, "tpot_ms", r->tpot_mean * 1e3, "device_hit_rate",
                          r->dev_hit_rate, "store_hit_rate", r->store_hit_rate, "rejected",
                          (json_int_t)r->rejected, "completed", (json_int_t)r->completed);
    json_t *b = json_pack("{s:f,s:f,s:f,s:f,s:f,s:f,s:s}", "ttft_p50_s", r->bound_p50, "ttft_p90_s",
                          r->bound_p90, "ttft_p99_s", r->bound_p99, "ttft_p50_ratio",
                          r->vs_bound_p50, "ttft_p90_ratio", r->vs_bound_p90, "ttft_p99_ratio",
                          r->vs_bound_p99, "label", "simulated");
    json_object_set_new(b, "work_floor", json_real(work_floor));
    json_object_set_new(o, "lower_bound", b);
    if (windows > 1)
        json_object_set_new(o, "window", json_integer(window));
    return o;
}

/* Runs every cell of g, printing each window's table and putting every result into arr. Returns
 * 0, or -1 when a replay could not run. */
static int run_grid(grid *g, json_t *arr)
{
    for (int w = 0; w < g->nw; w++) {
        print_header(g, w);
        for (int r = 0; r < g->nr; r++)
            for (int q = 0; q < g->nq; q++)
                for (int p = 0; p < g->np; p++) {
                    sched_result *c = cell(g, w, r, q, p);
                    if (sched_sim_run(&g->rp[w], (kvf_policy)g->pols[p], (kvf_queue)g->queues[q],
                                      g->rates[r], c) != 0)
                        return -1;
                    print_result(c);
                    json_array_append_new(
                        arr,
                        result_json(c, sched_replay_work_floor(&g->rp[w], g->rates[r]), w, g->nw));
                }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The summary */

static double ratio(double num, double den)
{
    return den > 0 ? num / den : 1.0;
}

/* kvf_cost's verdict from the other policy's TTFT over kvf_cost's. */
enum { WINS, LOSES, EVEN, VERDICTS };
static const char *const verdict_name[VERDICTS] = {"wins", "loses", "even"};

static int verdict(double r)
{
    return r >= EVEN_WITHIN ? WINS : r <= 1 / EVEN_WITHIN ? LOSES : EVEN;
}

/* The TTFT quantiles a comparison judges. */
enum { Q50, Q90, Q99, QUANTILES };
static const char *const quantile_name[QUANTILES] = {"p50", "p90", "p99"};

static double ttft_of(const sched_result *r, int k)
{
    return k == Q50 ? r->ttft_p50 : k == Q90 ? r->ttft_p90 : r->ttft_p99;
}

/* What one comparison gives per window: figures of run a over run b's (TTFT quantile ratios, SLO
 * attainment difference b - a, throughput b / a), runs of the same rate. */
typedef struct versus {
    double *ttft[QUANTILES], *slo, *thr; /* nw each */
} versus;

/* A comparison at every rate: each quantile's median ratio over the windows, with its spread. */
typedef struct row {
    bench_spread q[QUANTILES][MAX_RATES];
} row;

static int index_of(const int *v, int n, int x)
{
    for (int i = 0; i < n; i++)
        if (v[i] == x)
            return i;
    return -1;
}

/* Run (queue qa, policy pa) over run (qb, pb) at every rate into out, and an entry per rate into
 * arr: a copy of ids with the rate, each figure of versus as the median of the windows with its
 * spread (bench_json_rounds: pXX_ratio, slo_attainment_diff, throughput_ratio), and with
 * verdicts kvf_cost's verdict on each quantile (b being kvf_cost). */
static void compare_rates(const grid *g, int qa, int pa, int qb, int pb, const json_t *ids,
                          int verdicts, versus *v, json_t *arr, row *out)
{
    size_t nw = (size_t)g->nw;
    char key[32];
    for (int r = 0; r < g->nr; r++) {
        for (int w = 0; w < g->nw; w++) {
            const sched_result *a = cell(g, w, r, qa, pa), *b = cell(g, w, r, qb, pb);
            for (int k = 0; k < QUANTILES; k++)
                v->ttft[k][w] = ratio(ttft_of(a, k), ttft_of(b, k));
            v->slo[w] = b->slo_attain - a->slo_attain;
            v->thr[w] = ratio(b->throughput, a->throughput);
        }
        json_t *o = json_deep_copy(ids);
        bench_json_real(o, "rate", g->rates[r]);
        for (int k = 0; k < QUANTILES; k++) {
            snprintf(key, sizeof key, "%s_ratio", quantile_name[k]);
            out->q[k][r] = bench_json_rounds(o, key, v->ttft[k], nw);
            if (verdicts)
                json_object_set_new(o, quantile_name[k],
                                    json_string(verdict_name[verdict(out->q[k][r].median)]));
        }
        bench_json_rounds(o, "slo_attainment_diff", v->slo, nw);
        bench_json_rounds(o, "throughput_ratio", v->thr, nw);
        json_array_append_new(arr, o);
    }
}

/* A comparison row's lead: its names, to the width of the table. */
static void print_lead(const char *a, const char *b, const char *c)
{
    char lead[64];
    snprintf(lead, sizeof lead, "%s %s %s", a, b, c);
    printf("  %-30s", lead);
}

static void print_rates_header(const grid *g)
{
    print_lead("", "", "");
    for (int k = 0; k < QUANTILES; k++) {
        printf(k ? "     " : "    ");
        for (int r = 0; r < g->nr; r++)
            printf(" %4.3gx", g->rates[r]);
    }
    printf("\n");
}

/* A comparison row: each quantile's median ratio at each rate, and with several windows a line
 * of their 10th-90th percentile spreads. */
static void print_row(const grid *g, const char *a, const char *b, const char *c, const row *rw)
{
    print_lead(a, b, c);
    for (int k = 0; k < QUANTILES; k++) {
        printf("%s%s", k ? "  " : " ", quantile_name[k]);
        for (int r = 0; r < g->nr; r++)
            printf(" %5.2f", rw->q[k][r].median);
    }
    printf("\n");
    if (g->nw < 2)
        return;
    print_lead("", "", "(windows p10-p90)");
    for (int k = 0; k < QUANTILES; k++) {
        printf("%s%s", k ? "  " : " ", quantile_name[k]);
        for (int r = 0; r < g->nr; r++)
            printf(" %.2f-%.2f", rw->q[k][r].p10, rw->q[k][r].p90);
    }
    printf("\n");
}

/* Prints "  WHAT wins at 1x, 2x; loses at 4x; even at 0.5x" from the medians in s (one a rate),
 * naming only the verdicts some rate has. */
static void print_verdicts(const grid *g, const char *what, const bench_spread *s)
{
    printf("  %s", what);
    const char *sep = "";
    for (int v = 0; v < VERDICTS; v++) {
        int any = 0;
        for (int r = 0; r < g->nr; r++) {
            if (verdict(s[r].median) != v)
                continue;
            if (!any)
                printf("%s %s at", sep, verdict_name[v]);
            printf("%s %.3gx", any ? "," : "", g->rates[r]);
            any = 1;
        }
        sep = any ? ";" : sep;
    }
}

/* Counts of kvf_cost's verdicts on each quantile, over every discipline, other policy and rate:
 * into res as kvf_cost_p50 (p90, p99): {wins, losses, even}, and printed. */
static void tally(const int n[QUANTILES][VERDICTS], json_t *res)
{
    char key[32];
    printf("  kvf_cost's verdicts over every discipline, policy and rate:");
    for (int k = 0; k < QUANTILES; k++) {
        snprintf(key, sizeof key, "kvf_cost_%s", quantile_name[k]);
        json_object_set_new(res, key,
                            json_pack("{s:i,s:i,s:i}", "wins", n[k][WINS], "losses", n[k][LOSES],
                                      "even", n[k][EVEN]));
        printf("%s %s %d wins, %d losses, %d even", k ? ";" : "", quantile_name[k], n[k][WINS],
               n[k][LOSES], n[k][EVEN]);
    }
    printf("\n");
}

/* kvf_cost against every other policy under the same discipline, printed and into res. */
static void summarize_kvf_cost(const grid *g, versus *v, json_t *res)
{
    int ik = index_of(g->pols, g->np, KVF_POLICY_KVF_COST);
    if (ik < 0 || g->np < 2)
        return;
    printf("kvf_cost against each policy under the same queue discipline (simulated): the other's "
           "TTFT over kvf_cost's (> 1: kvf_cost lower by that factor; within %.2fx: even), median "
           "of %d window%s\n",
           EVEN_WITHIN, g->nw, g->nw > 1 ? "s" : "");
    print_rates_header(g);
    json_t *arr = json_array();
    int n[QUANTILES][VERDICTS] = {{0}};
    for (int q = 0; q < g->nq; q++)
        for (int p = 0; p < g->np; p++) {
            if (p == ik)
                continue;
            const char *qn = kvf_queue_name((kvf_queue)g->queues[q]),
                       *pn = kvf_policy_name((kvf_policy)g->pols[p]);
            json_t *ids = json_pack("{s:s,s:s}", "queue", qn, "against", pn);
            row rw;
            compare_rates(g, q, p, q, ik, ids, 1, v, arr, &rw);
            json_decref(ids);
            print_row(g, qn, "vs", pn, &rw);
            printf("  ");
            for (int k = 0; k < QUANTILES; k++) {
                print_verdicts(g, quantile_name[k], rw.q[k]);
                for (int r = 0; r < g->nr; r++)
                    n[k][verdict(rw.q[k][r].median)]++;
            }
            printf("\n");
        }
    json_object_set_new(res, "kvf_cost_vs", arr);
    tally(n, res);
}

/* Each discipline against arrival order under each policy, printed and into res: what the queue
 * order does, apart from placement. */
static void summarize_queues(const grid *g, versus *v, json_t *res)
{
    int iq = index_of(g->queues, g->nq, KVF_QUEUE_FIFO);
    if (iq < 0 || g->nq < 2)
        return;
    printf("Each queue discipline against arrival order under the same policy (simulated): fifo's "
           "TTFT over the discipline's (> 1: the discipline lower)\n");
    print_rates_header(g);
    json_t *arr = json_array();
    for (int p = 0; p < g->np; p++)
        for (int q = 0; q < g->nq; q++) {
            if (q == iq)
                continue;
            const char *qn = kvf_queue_name((kvf_queue)g->queues[q]),
                       *pn = kvf_policy_name((kvf_policy)g->pols[p]);
            json_t *ids = json_pack("{s:s,s:s}", "policy", pn, "queue", qn);
            row rw;
            compare_rates(g, iq, p, q, p, ids, 0, v, arr, &rw);
            json_decref(ids);
            print_row(g, pn, qn, "vs fifo", &rw);
        }
    json_object_set_new(res, "queue_vs_fifo", arr);
}

/* ------------------------------------------------------------------------------------------ */
/* The command */

/* The grid of o: its policies, disciplines and rates, and its trace cut into windows with the
 * cost model (--cost, else the defaults). Returns 0, or -1 with the reason on stderr. Caller
 * frees with grid_free(). */
static int grid_open(const opts *o, grid *g, sched_req **reqs, size_t *n_reqs)
{
    memset(g, 0, sizeof *g);
    if (parse_names("policy", o->policies, policy_one, g->pols, KVF_POLICY_COUNT_, &g->np) != 0 ||
        parse_names("queue discipline", o->queues, queue_one, g->queues, KVF_QUEUE_COUNT_,
                    &g->nq) != 0 ||
        parse_rates(o->rates, g->rates, &g->nr) != 0)
        return -1;
    if (o->time_scale > 0) {
        g->rates[0] = o->time_scale;
        g->nr = 1;
    }
    sched_replay tmpl = {.ninst = o->instances,
                         .slo = o->slo,
                         .dev_blocks = (uint32_t)o->device_blocks,
                         .store_blocks = (uint32_t)o->store_blocks};
    kvf_sched_cost_defaults(&tmpl.cost);
    char err[256];
    if (o->cost_file && kvf_sched_cost_load(o->cost_file, &tmpl.cost, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench sched: %s\n", err);
        return -1;
    }
    if (sched_replays_load(o->trace, (size_t)o->max_requests, (size_t)o->windows, &tmpl, &g->rp,
                           reqs, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-bench sched: %s\n", err);
        return -1;
    }
    *n_reqs = 0;
    g->nw = (int)o->windows;
    for (int w = 0; w < g->nw; w++)
        *n_reqs += g->rp[w].n;
    return 0;
}

/* The invocation's inputs into res. */
static void inputs_json(const opts *o, const grid *g, size_t n_reqs, json_t *res)
{
    json_t *pols = json_array(), *queues = json_array(), *rates = json_array();
    for (int p = 0; p < g->np; p++)
        json_array_append_new(pols, json_string(kvf_policy_name((kvf_policy)g->pols[p])));
    for (int q = 0; q < g->nq; q++)
        json_array_append_new(queues, json_string(kvf_queue_name((kvf_queue)g->queues[q])));
    for (int r = 0; r < g->nr; r++)
        json_array_append_new(rates, json_real(g->rates[r]));
    json_object_set_new(res, "label", json_string("simulated"));
    json_object_set_new(res, "trace", json_string(o->trace));
    json_object_set_new(res, "requests", json_integer((json_int_t)n_reqs));
    json_object_set_new(res, "windows", json_integer(g->nw));
    json_object_set_new(res, "instances", json_integer(o->instances));
    json_object_set_new(res, "policies", pols);
    json_object_set_new(res, "queues", queues);
    json_object_set_new(res, "queue_window", json_integer(g->rp[0].cost.klpm_k));
    json_object_set_new(res, "rates", rates);
    json_object_set_new(res, "rate_found", json_boolean(o->find_rate));
    bench_json_real(res, "slo_ttft_s", o->slo);
    double *rps = malloc((size_t)g->nw * sizeof *rps);
    if (!rps)
        return;
    for (int w = 0; w < g->nw; w++)
        rps[w] = sched_replay_rps(&g->rp[w]);
    bench_json_rounds(res, "trace_rps", rps, (size_t)g->nw);
    free(rps);
}

/* Runs the grid and its comparisons into res. Returns 0, or -1 when a replay could not run. */
static int compare(grid *g, json_t *res)
{
    size_t cells = (size_t)g->nw * (size_t)g->nr * (size_t)g->nq * (size_t)g->np;
    double *vals = malloc(5 * (size_t)g->nw * sizeof *vals);
    g->res = calloc(cells, sizeof *g->res);
    json_t *arr = json_array();
    int rc = -1;
    if (!vals || !g->res || run_grid(g, arr) != 0)
        goto out_free;
    json_object_set_new(res, "results", arr);
    arr = NULL;
    versus v = {{vals, vals + g->nw, vals + 2 * g->nw}, vals + 3 * g->nw, vals + 4 * g->nw};
    summarize_kvf_cost(g, &v, res);
    summarize_queues(g, &v, res);
    rc = 0;
out_free:
    json_decref(arr);
    free(vals);
    return rc;
}

int bench_sched_main(int argc, char **argv)
{
    opts o;
    int p = parse(argc, argv, &o);
    if (p != 0)
        return p > 0 ? 0 : 2;
    int rc = 2;
    json_t *res = bench_result_new("sched");
    if (o.ingest) {
        rc = bench_sched_ingest(res, o.quick, o.shards) ? 1 : 0;
        bench_emit(res, o.json);
        goto out_decref_res;
    }
    if (o.relay) {
        rc = bench_sched_relay(res, o.quick, o.shards) ? 1 : 0;
        bench_emit(res, o.json);
        goto out_decref_res;
    }
    if (o.decision_latency) {
        rc = decision_latency(res, o.quick) ? 1 : 0;
        bench_emit(res, o.json);
        goto out_decref_res;
    }
    if (!o.trace || o.instances < 1 || o.instances > KVF_SCHED_MAX_INSTANCES || o.windows < 1 ||
        o.time_scale < 0) {
        fprintf(stderr,
                "kvf-bench sched: --trace FILE is required; --instances 1..%d; "
                "--windows and --time-scale positive\n",
                KVF_SCHED_MAX_INSTANCES);
        goto out_decref_res;
    }
    grid g;
    sched_req *reqs = NULL;
    size_t n_reqs = 0;
    if (grid_open(&o, &g, &reqs, &n_reqs) != 0)
        goto out_free_grid;
    bench_progress("sched",
                   "%zu requests in %d window(s), %d instances, SLO TTFT %.1f s "
                   "(simulated)",
                   n_reqs, g.nw, o.instances, o.slo);
    if (o.find_rate) {
        if (find_rate(&g.rp[0], &g.rates[0]) != 0)
            goto out_oom;
        g.nr = 1;
    }
    inputs_json(&o, &g, n_reqs, res);
    if (compare(&g, res) != 0)
        goto out_oom;
    bench_emit(res, o.json);
    rc = 0;
    goto out_free_grid;
out_oom:
    fprintf(stderr, "kvf-bench sched: the simulation could not run: out of memory\n");
    rc = 1;
out_free_grid:
    free(g.res);
    sched_replays_free(g.rp, reqs, n_reqs);
out_decref_res:
    json_decref(res);
    return rc;
}
