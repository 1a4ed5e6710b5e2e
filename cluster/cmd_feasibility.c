/*
 * kvf estimate and kvf classify:
 *
 *   kvf estimate --model M --tokens N [--batch B] [--memory SIZE]   KV memory a workload needs
 *   kvf classify --local L --remote R [--calibration BENCH.json]... [--state S.json]
 *                [--live-pressure]   every remote action's feasibility label, reason and score,
 *                                    and the optimality gap (L, R: a built-in record name or a
 *                                    capability record JSON file)
 *
 * classify's scores come from the cost model's constants (kvf_gap_state), applied in this order,
 * each overriding the one before: the defaults, each --calibration file in turn, --state, and
 * --live-pressure.
 */
#include "cmd_feasibility.h"

#include "cli_common.h"

#include "kvf/kvf.h"
#include "units.h"

#include <inttypes.h>
#include <jansson.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CALIBRATIONS 4

enum {
    OPT_TOKENS = KVF__CLI_OPT_OWN,
    OPT_BATCH,
    OPT_MEMORY,
    OPT_LOCAL,
    OPT_REMOTE,
    OPT_STATE,
    OPT_CALIBRATION,
    OPT_LIVE_PRESSURE,
};

/* ------------------------------------------------------------------------------------------ */
/* estimate */

typedef struct estimate_args {
    const char *model;
    uint64_t tokens, batch, memory;
    int json;
} estimate_args;

static const struct option estimate_opts[] = {
    {"model", required_argument, NULL, KVF__CLI_OPT_MODEL},
    {"tokens", required_argument, NULL, OPT_TOKENS},
    {"batch", required_argument, NULL, OPT_BATCH},
    {"memory", required_argument, NULL, OPT_MEMORY},
    KVF__CLI_OPTS_JSON,
    KVF__CLI_OPTS_HELP,
    KVF__CLI_OPTS_END,
};

static const char estimate_usage[] =
    "usage: kvf estimate --model M --tokens N [--batch B] [--memory SIZE] [--json]\n"
    "Prints the KV memory a workload needs and, with --memory, how much of it fits.\n"
    "  --model PRESET|FILE.json         layout (default ref-tiny)\n"
    "  --tokens N                       tokens of one sequence\n"
    "  --batch B                        sequences held at once (default 1)\n"
    "  --memory SIZE                    a budget, e.g. 64G\n" KVF__CLI_HELP_JSON
    "exit status: 0 done, 2 a usage error\n";

static int parse_estimate(int argc, char **argv, estimate_args *a)
{
    const char *v;
    int c;
    while ((c = kvf__cli_next_opt(argc, argv, estimate_opts, &v)) != 0) {
        int rc = 0;
        switch (c) {
        case 'h':
            fputs(estimate_usage, stdout);
            return 0;
        case KVF__CLI_OPT_JSON:
            a->json = 1;
            break;
        case KVF__CLI_OPT_MODEL:
            a->model = v;
            break;
        case OPT_TOKENS:
            rc = kvf__cli_parse_u64("--tokens", v, &a->tokens);
            break;
        case OPT_BATCH:
            rc = kvf__cli_parse_u64("--batch", v, &a->batch);
            break;
        case OPT_MEMORY:
            if (kvf__parse_size(v, &a->memory) != 0) {
                fprintf(stderr, "kvf: --memory: cannot parse size \"%s\"\n", v);
                rc = 2;
            }
            break;
        default:
            return kvf__cli_opt_error(c, v);
        }
        if (rc)
            return rc;
    }
    return KVF__CLI_RUN;
}

static void print_estimate_json(const estimate_args *a, const kvf_layout *l, uint64_t batch,
                                const kvf_estimate *e)
{
    printf("{\"model\":\"%s\",\"tokens\":%" PRIu64 ",\"batch\":%" PRIu64
           ",\"bytes_per_token\":%" PRIu64 ",\"bytes_per_chunk\":%" PRIu64
           ",\"chunk_tokens\":%u,\"bytes_per_sequence\":%" PRIu64 ",\"bytes_total\":%" PRIu64
           ",\"memory\":%" PRIu64 ",\"tokens_fit\":%" PRIu64 ",\"sequences_fit\":%" PRIu64
           ",\"label\":\"real\"}\n",
           l->model_id, a->tokens, batch, e->bytes_per_token, e->bytes_per_chunk, l->chunk_tokens,
           e->bytes_per_sequence, e->bytes_total, a->memory, e->tokens_fit, e->sequences_fit);
}

static void print_estimate_text(const estimate_args *a, const kvf_layout *l, uint64_t batch,
                                const kvf_estimate *e)
{
    printf("%s (%u layers, %u KV heads x %u, %s, %s, TP %u of %u)\n", l->model_id, l->layers,
           l->kv_heads, l->head_dim, kvf_dtype_name(l->dtype),
           l->kind == KVF_KV_LATENT ? "latent" : "K+V", l->tp_rank, l->tp_size);
    printf("  KV per token     %" PRIu64 " bytes (%.1f KiB)\n", e->bytes_per_token,
           (double)e->bytes_per_token / 1024);
    printf("  KV per chunk     %" PRIu64 " bytes (%u tokens, %.1f MiB)\n", e->bytes_per_chunk,
           l->chunk_tokens, (double)e->bytes_per_chunk / 1048576);
    printf("  one sequence     %" PRIu64 " tokens: %.2f GiB, %" PRIu64 " full chunks\n", a->tokens,
           (double)e->bytes_per_sequence / 1073741824.0, e->chunks_per_sequence);
    printf("  batch of %-7" PRIu64 " %.2f GiB\n", batch, (double)e->bytes_total / 1073741824.0);
    if (a->memory)
        printf("  in %.1f GiB      %" PRIu64 " tokens, %" PRIu64 " sequences of %" PRIu64
               " tokens\n",
               (double)a->memory / 1073741824.0, e->tokens_fit, e->sequences_fit, a->tokens);
}

int kvf__cli_estimate(int argc, char **argv)
{
    estimate_args a = {.model = "ref-tiny"};
    int rc = parse_estimate(argc, argv, &a);
    if (rc != KVF__CLI_RUN)
        return rc;
    kvf_layout l;
    char err[256];
    if (kvf_layout_resolve(a.model, &l, err, sizeof err) != 0) {
        fprintf(stderr, "kvf: --model: %s\n", err);
        return 2;
    }
    if (a.tokens == 0) {
        fprintf(stderr, "kvf: estimate needs --tokens N\n");
        return 2;
    }
    uint64_t batch = a.batch ? a.batch : 1;
    kvf_estimate e;
    if (kvf_layout_estimate(&l, a.tokens, batch, a.memory, &e) != 0) {
        fprintf(stderr, "kvf: estimate: the numbers overflow 64 bits\n");
        return 2;
    }
    if (a.json)
        print_estimate_json(&a, &l, batch, &e);
    else
        print_estimate_text(&a, &l, batch, &e);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* classify */

typedef struct classify_args {
    const char *local, *remote, *state;
    const char *calib[MAX_CALIBRATIONS];
    int n_calib;
    int live_pressure;
    int json;
} classify_args;

static const struct option classify_opts[] = {
    {"local", required_argument, NULL, OPT_LOCAL},
    {"remote", required_argument, NULL, OPT_REMOTE},
    {"state", required_argument, NULL, OPT_STATE},
    {"calibration", required_argument, NULL, OPT_CALIBRATION},
    {"live-pressure", no_argument, NULL, OPT_LIVE_PRESSURE},
    KVF__CLI_OPTS_JSON,
    KVF__CLI_OPTS_HELP,
    KVF__CLI_OPTS_END,
};

static const char classify_usage[] =
    "usage: kvf classify --local L --remote R [--calibration BENCH.json]... [--state S.json]\n"
    "                    [--live-pressure] [--json]\n"
    "Labels every remote action between two hosts feasible or not, with the reason and its\n"
    "score (seconds saved, simulated by the cost model), and prints the optimality gap.\n"
    "  --local L, --remote R            capability records: a built-in name (mlx-lm vllm\n"
    "                                   llama.cpp reference kvf-store) or a JSON file\n"
    "  --calibration BENCH.json         the cost model's constants from a kvf-bench store or\n"
    "                                   connector --json result (repeatable, at most 4)\n"
    "  --state S.json                   constants by name, over the calibration\n"
    "  --live-pressure                  memory pressure from this host's telemetry, over "
    "all\n" KVF__CLI_HELP_JSON
    "exit status: 0 done, 2 a usage error or a file that cannot be used\n";

static int parse_classify(int argc, char **argv, classify_args *a)
{
    const char *v;
    int c;
    while ((c = kvf__cli_next_opt(argc, argv, classify_opts, &v)) != 0) {
        switch (c) {
        case 'h':
            fputs(classify_usage, stdout);
            return 0;
        case KVF__CLI_OPT_JSON:
            a->json = 1;
            break;
        case OPT_LOCAL:
            a->local = v;
            break;
        case OPT_REMOTE:
            a->remote = v;
            break;
        case OPT_STATE:
            a->state = v;
            break;
        case OPT_CALIBRATION:
            if (a->n_calib == MAX_CALIBRATIONS) {
                fprintf(stderr, "kvf: at most %d --calibration files\n", MAX_CALIBRATIONS);
                return 2;
            }
            a->calib[a->n_calib++] = v;
            break;
        case OPT_LIVE_PRESSURE:
            a->live_pressure = 1;
            break;
        default:
            return kvf__cli_opt_error(c, v);
        }
    }
    return KVF__CLI_RUN;
}
/* Applies a kvf-bench --json result to the gap's constants: a store run gives the TCP bandwidth
 * (kvf_get_gbps, what an engine's load gets), a connector run the model's KV bytes per token and
 * its effective prefill rate (8192 tokens over ttft_full_ms_8k, attention included). Returns 0, or
 * -1 with a message in err. */
static int apply_calibration(const char *path, kvf_gap_state *st, char *err, size_t errlen)
{
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (!o || !json_is_object(o)) {
        snprintf(err, errlen, "%s: %s", path, o ? "expected a JSON object" : je.text);
        json_decref(o);
        return -1;
    }
    const char *bench = json_string_value(json_object_get(o, "bench"));
    const char *label = json_string_value(json_object_get(o, "label"));
    int rc = -1;
    if (!bench || !label || strcmp(label, "real") != 0) {
        snprintf(err, errlen, "%s: not a kvf-bench result labelled real", path);
    } else if (!strcmp(bench, "store")) {
        double g = json_number_value(json_object_get(o, "kvf_get_gbps"));
        if (!(g > 0))
            snprintf(err, errlen, "%s: no positive kvf_get_gbps", path);
        else {
            st->tcp_bytes_per_s = g * 1e9;
            rc = 0;
        }
    } else if (!strcmp(bench, "connector")) {
        double ms = json_number_value(json_object_get(o, "ttft_full_ms_8k"));
        const char *model = json_string_value(json_object_get(o, "ttft_model"));
        kvf_layout l;
        char inner[200];
        if (!(ms > 0) || !model)
            snprintf(err, errlen, "%s: needs ttft_full_ms_8k and ttft_model", path);
        else if (kvf_layout_resolve(model, &l, inner, sizeof inner) != 0)
            snprintf(err, errlen, "%s: ttft_model: %s", path, inner);
        else {
            st->prefill_tokens_per_s = 8192.0 / (ms / 1e3);
            st->kv_bytes_per_token = (double)kvf_layout_bytes_per_token(&l);
            rc = 0;
        }
    } else {
        snprintf(err, errlen,
                 "%s: a kvf-bench %s result has no constants for the gap (store or "
                 "connector)",
                 path, bench);
    }
    json_decref(o);
    return rc;
}

/* Sets the constants a --state file names (a JSON object of numbers by kvf_gap_state's field
 * names). Returns 0, or 2 after printing what is wrong with the file. */
static int apply_state_file(const char *path, kvf_gap_state *st)
{
    static const struct {
        const char *k;
        size_t off;
    } f[] = {{"prompt_tokens", offsetof(kvf_gap_state, prompt_tokens)},
             {"cached_tokens", offsetof(kvf_gap_state, cached_tokens)},
             {"kv_bytes_per_token", offsetof(kvf_gap_state, kv_bytes_per_token)},
             {"prefill_tokens_per_s", offsetof(kvf_gap_state, prefill_tokens_per_s)},
             {"tcp_bytes_per_s", offsetof(kvf_gap_state, tcp_bytes_per_s)},
             {"rdma_bytes_per_s", offsetof(kvf_gap_state, rdma_bytes_per_s)},
             {"memory_pressure", offsetof(kvf_gap_state, memory_pressure)}};
    json_error_t je;
    json_t *o = json_load_file(path, 0, &je);
    if (!o || !json_is_object(o)) {
        fprintf(stderr, "kvf: --state: %s: %s\n", path, o ? "expected an object" : je.text);
        json_decref(o);
        return 2;
    }
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v)
    {
        size_t i;
        for (i = 0; i < sizeof f / sizeof f[0]; i++)
            if (!strcmp(k, f[i].k))
                break;
        if (i == sizeof f / sizeof f[0] || !json_is_number(v)) {
            fprintf(stderr, "kvf: --state: %s: unknown key or not a number\n", k);
            json_decref(o);
            return 2;
        }
        *(double *)((char *)st + f[i].off) = json_number_value(v);
    }
    json_decref(o);
    return 0;
}

/* The cost model's constants: the defaults, then each calibration, the state file and the live
 * pressure over them in that order. Returns 0, or 2 after printing why one cannot be used. */
static int load_gap_state(const classify_args *a, kvf_gap_state *st)
{
    char err[256];
    kvf_gap_state_defaults(st);
    for (int i = 0; i < a->n_calib; i++)
        if (apply_calibration(a->calib[i], st, err, sizeof err) != 0) {
            fprintf(stderr, "kvf: --calibration: %s\n", err);
            return 2;
        }
    if (a->state && apply_state_file(a->state, st) != 0)
        return 2;
    if (a->live_pressure) {
        kvf_telemetry t;
        if (kvf_telemetry_read(&t) != 0) {
            fprintf(stderr, "kvf: --live-pressure: cannot read this host's telemetry\n");
            return 2;
        }
        st->memory_pressure = kvf_telemetry_pressure(&t);
    }
    return 0;
}

/* Classifies and scores every action; prints a table row for each, or, with --json, returns
 * them as an array (NULL otherwise). */
static json_t *classify_actions(const classify_args *a, const kvf_caps *l, const kvf_caps *r,
                                const kvf_gap_state *st)
{
    json_t *arr = a->json ? json_array() : NULL;
    if (!a->json)
        printf("%-20s %-19s %-26s %9s  %s\n", "action", "label", "reason", "score s", "why");
    for (int i = 0; i < KVF_ACTION_COUNT_; i++) {
        kvf_action_id id = (kvf_action_id)i;
        kvf_verdict v;
        kvf_classify(id, l, r, 0, &v);
        double sc = kvf_action_score(id, st);
        if (a->json)
            json_array_append_new(
                arr, json_pack("{s:s,s:s,s:s,s:f,s:s}", "action", kvf_action_name(id), "label",
                               kvf_feas_label_name(v.label), "reason",
                               kvf_feas_reason_name(v.reason), "score_s", sc, "why", v.why));
        else
            printf("%-20s %-19s %-26s %9.3f  %s\n", kvf_action_name(id),
                   kvf_feas_label_name(v.label), kvf_feas_reason_name(v.reason), sc, v.why);
    }
    return arr;
}

/* Prints the whole result as one JSON object; takes ownership of actions. */
static void print_gap_json(const kvf_caps *l, const kvf_caps *r, const kvf_gap_state *st,
                           const kvf_gap *g, json_t *actions)
{
    json_t *o = json_pack(
        "{s:s,s:s,s:o,s:s,s:s,s:f,s:f,s:f,s:s}", "local", l->name, "remote", r->name, "actions",
        actions, "best_action", kvf_action_name(g->best_all), "best_feasible_action",
        g->have_feasible ? kvf_action_name(g->best_feasible) : "none", "score_best_s", g->score_all,
        "score_best_feasible_s", g->score_feasible, "gap_s", g->gap, "score_label", "simulated");
    json_object_set_new(o, "state",
                        json_pack("{s:f,s:f,s:f,s:f,s:f,s:f,s:f}", "prompt_tokens",
                                  st->prompt_tokens, "cached_tokens", st->cached_tokens,
                                  "kv_bytes_per_token", st->kv_bytes_per_token,
                                  "prefill_tokens_per_s", st->prefill_tokens_per_s,
                                  "tcp_bytes_per_s", st->tcp_bytes_per_s, "rdma_bytes_per_s",
                                  st->rdma_bytes_per_s, "memory_pressure", st->memory_pressure));
    char *t = json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS);
    printf("%s\n", t);
    free(t);
    json_decref(o);
}

static void print_gap_text(const kvf_gap_state *st, const kvf_gap *g)
{
    printf("state: %.0f-token prompt, %.0f cached, %.0f B/token, prefill %.0f tok/s, TCP %.2f "
           "GB/s, RDMA %.1f GB/s, pressure %.2f\n",
           st->prompt_tokens, st->cached_tokens, st->kv_bytes_per_token, st->prefill_tokens_per_s,
           st->tcp_bytes_per_s / 1e9, st->rdma_bytes_per_s / 1e9, st->memory_pressure);
    printf("best action %s (%.3f s saved); best real action %s (%.3f s); gap %.3f s "
           "(scores simulated by the cost model)\n",
           kvf_action_name(g->best_all), g->score_all,
           g->have_feasible ? kvf_action_name(g->best_feasible) : "none", g->score_feasible,
           g->gap);
}

int kvf__cli_classify(int argc, char **argv)
{
    classify_args a = {0};
    int rc = parse_classify(argc, argv, &a);
    if (rc != KVF__CLI_RUN)
        return rc;
    if (!a.local || !a.remote) {
        fprintf(stderr, "kvf: classify needs --local and --remote (built-in: mlx-lm vllm "
                        "llama.cpp reference kvf-store, or a JSON file)\n");
        return 2;
    }
    kvf_caps l, r;
    char err[256];
    if (kvf_caps_load(a.local, &l, err, sizeof err) != 0 ||
        kvf_caps_load(a.remote, &r, err, sizeof err) != 0) {
        fprintf(stderr, "kvf: %s\n", err);
        return 2;
    }
    kvf_gap_state st;
    if (load_gap_state(&a, &st) != 0)
        return 2;
    kvf_gap g;
    kvf_optimality_gap(&l, &r, &st, &g);
    json_t *actions = classify_actions(&a, &l, &r, &st);
    if (a.json)
        print_gap_json(&l, &r, &st, &g, actions);
    else
        print_gap_text(&st, &g);
    return 0;
}
