/*
 * kvf-engine: runs the reference engine on a prompt, with or without kvfabric.
 *
 *   kvf-engine --model ref-tiny|ref-100m [--store HOST:PORT[,...]] [--prompt N] [--prefix-seed S]
 *              [--seed S] [--gen G] [--no-save] [--json]
 *
 * The prompt is N deterministic tokens from --prefix-seed (so two runs with one seed share their
 * prompt); --gen G decodes G tokens greedily after the prefill. Prints the time to first token,
 * how much of the prompt came from the store, and the generated tokens.
 */
#include "engine.h"
#include "serve.h"

#include "kvf/kvf.h"

#include "args.h"
#include "bytes.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t prompt_token(uint64_t seed, size_t i, uint32_t vocab)
{
    uint64_t s = seed * 0x100000001b3ull + i;
    return (uint32_t)(kvf__splitmix64(&s) % vocab);
}

/* Times prefills from scratch at several lengths and a run of decode steps, fits the scheduler's
 * cost model (t = n / rate + attn * n^2 / 2) by least squares and writes it as a kvf-sched
 * calibration file. */
static int calibrate(const char *model, const char *out)
{
    kvfe_model m;
    if (kvfe_model_preset(model, &m) != 0) {
        fprintf(stderr, "kvf-engine: unknown model %s\n", model);
        return 2;
    }
    static const size_t lens[] = {256, 512, 1024, 2048, 4096};
    enum { N_LENS = sizeof lens / sizeof lens[0] };
    kvfe_opts eo = {.model = model, .seed = 1, .max_tokens = 4096 + 64};
    kvfe_engine *e;
    char err[256];
    if (kvfe_open(&e, &eo, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: %s\n", err);
        return 1;
    }
    uint32_t *t = malloc(4096 * sizeof *t);
    for (size_t i = 0; i < 4096; i++)
        t[i] = prompt_token(11, i, m.vocab);
    double secs[N_LENS];
    kvfe_result r;
    for (size_t k = 0; k < N_LENS; k++) {
        secs[k] = 1e9;
        for (int rep = 0; rep < 2; rep++) {
            kvfe_prefill(e, t, lens[k], &r);
            secs[k] = r.seconds < secs[k] ? r.seconds : secs[k];
        }
    }
    kvfe_prefill(e, t, 1024, &r);
    double dec = 0;
    uint32_t tok = r.next_token;
    for (int g = 0; g < 32; g++) {
        kvfe_decode(e, tok, &r);
        tok = r.next_token;
        dec += r.seconds;
    }
    kvfe_close(&e);
    free(t);
    /* Least squares for t = a n + b n^2. */
    double s11 = 0, s12 = 0, s22 = 0, y1 = 0, y2 = 0;
    for (size_t k = 0; k < N_LENS; k++) {
        double n = (double)lens[k], n2 = n * n;
        s11 += n * n, s12 += n * n2, s22 += n2 * n2, y1 += n * secs[k], y2 += n2 * secs[k];
    }
    double det = s11 * s22 - s12 * s12;
    double a = (y1 * s22 - y2 * s12) / det, b = (s11 * y2 - s12 * y1) / det;
    if (a <= 0) { /* all quadratic: fall back to the linear fit through the shortest */
        a = secs[0] / (double)lens[0];
        b = b > 0 ? b : 0;
    }
    FILE *f = fopen(out, "w");
    if (!f) {
        fprintf(stderr, "kvf-engine: cannot write %s\n", out);
        return 1;
    }
    fprintf(f,
            "{\"prefill_tokens_per_s\": %.3f, \"prefill_attn_s_per_tok2\": %.6e,\n"
            " \"kv_bytes_per_token\": %llu, \"tpot_base_s\": %.6f}\n",
            1.0 / a, 2.0 * b > 0 ? 2.0 * b : 0.0,
            (unsigned long long)kvf_layout_bytes_per_token(&m.layout), dec / 32);
    fclose(f);
    printf("kvf-engine: calibrated %s on this host (real): prefill of 256..4096 tokens took "
           "%.4f %.4f %.4f %.4f %.4f s: %.0f tokens/s + %.3g s/token^2 attention; %.2f ms per "
           "decode step; written to %s\n",
           model, secs[0], secs[1], secs[2], secs[3], secs[4], 1.0 / a, 2.0 * b, dec / 32 * 1e3,
           out);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* One prompt */

#define PROCEED (-1) /* a step's answer when the program goes on; otherwise its exit status */

typedef struct prompt_opts {
    const char *model, *store;
    long prompt, gen;
    uint64_t seed, pseed;
    int json, save;
} prompt_opts;

/* What the prefill of the prompt and the decode after it gave. */
typedef struct prompt_result {
    double ttft, decode_s;
    size_t loaded;
    int load_error, save_rc;
    uint32_t *out; /* the generated tokens; owned */
} prompt_result;

static const char *const models[] = {"ref-tiny", "ref-100m", NULL};

static int parse_prompt_opts(int argc, char **argv, prompt_opts *o)
{
    *o = (prompt_opts){
        .model = "ref-tiny", .prompt = 200, .gen = 8, .seed = 1, .pseed = 7, .save = 1};
    const kvf__arg args[] = {
        KVF__OPT("model", KVF__ARG_CHOICE, &o->model, "PRESET", "the reference model", "ref-tiny",
                 .choices = models),
        KVF__OPT("store", KVF__ARG_STR, &o->store, "HOST:PORT[,...]",
                 "the storage nodes to load the prompt's cached prefix from and save the rest to "
                 "(without it, no kvfabric)",
                 NULL),
        KVF__OPT("prompt", KVF__ARG_LONG, &o->prompt, "N", "the prompt's tokens", "200", .lo = 1,
                 .hi = 65535),
        KVF__OPT("prefix-seed", KVF__ARG_U64, &o->pseed, "S",
                 "the prompt's tokens come from this seed: two runs with one seed share their "
                 "prompt",
                 "7"),
        KVF__OPT("seed", KVF__ARG_U64, &o->seed, "S", "the model's weights' seed", "1"),
        KVF__OPT("gen", KVF__ARG_LONG, &o->gen, "G", "tokens decoded greedily after the prefill",
                 "8", .lo = 0, .hi = 65534),
        KVF__OPT("no-save", KVF__ARG_UNSET, &o->save, NULL,
                 "do not save the prompt's chunks to --store", NULL),
        KVF__OPT("json", KVF__ARG_FLAG, &o->json, NULL, "print one JSON object", NULL),
    };
    const kvf__args_spec spec = {
        .prog = "kvf-engine",
        .synopsis = "[OPTIONS]   (or --serve ..., --calibrate FILE: see below)",
        .summary = "The reference engine (a small Llama-shaped model on the CPU) with kvfabric. "
                   "One prompt: prefill it, loading what --store holds and saving the rest, "
                   "decode --gen tokens greedily, print the time to first token and the tokens.",
        .epilog = "Other modes: kvf-engine --serve --help (kvf-engine's HTTP API, for kvf-sched "
                  "and kvf cluster); kvf-engine --calibrate FILE [--model PRESET] (measure this "
                  "host's prefill and write kvf-sched's cost file; --calibrate --help).\n"
                  "exit status: 0 done, 1 a failure (said on stderr), 2 a usage error",
        .args = args,
        .n = sizeof args / sizeof args[0],
        .max_positional = 0,
    };
    int rc = kvf__args_parse(&spec, argc, argv, NULL);
    return rc == KVF__ARGS_GO_ON ? PROCEED : rc;
}

static int calibrate_main(int argc, char **argv)
{
    const char *model = "ref-tiny", *out = NULL;
    const kvf__arg args[] = {
        KVF__OPT("calibrate", KVF__ARG_STR, &out, "FILE", "where the cost file goes", NULL),
        KVF__OPT("model", KVF__ARG_CHOICE, &model, "PRESET", "the reference model", "ref-tiny",
                 .choices = models),
    };
    const kvf__args_spec spec = {
        .prog = "kvf-engine --calibrate",
        .synopsis = "FILE [--model PRESET]",
        .summary = "Times prefills of 256 to 4096 tokens and decode steps on this host, fits "
                   "kvf-sched's cost model and writes it to FILE (kvf-sched --cost).",
        .epilog = "exit status: 0 written, 1 a failure, 2 a usage error",
        .args = args,
        .n = sizeof args / sizeof args[0],
        .max_positional = 0,
    };
    int rc = kvf__args_parse(&spec, argc, argv, NULL);
    if (rc != KVF__ARGS_GO_ON)
        return rc;
    if (!out) {
        fprintf(stderr, "kvf-engine --calibrate: needs the file to write (see --help)\n");
        return 2;
    }
    return calibrate(model, out);
}

/* A connector to the stores of store (HOST:PORT[,...]); *nodes_buf holds their names and must
 * outlive the connector (caller frees). Returns 0 or -1 with the reason on stderr. */
static int open_connector(const char *store, const kvf_layout *L, char **nodes_buf,
                          kvf_connector **cn)
{
    char err[256], *nodes[64];
    size_t n_nodes = 0;
    *nodes_buf = strdup(store);
    for (char *s = NULL, *t = *nodes_buf ? strtok_r(*nodes_buf, ",", &s) : NULL; t && n_nodes < 64;
         t = strtok_r(NULL, ",", &s))
        nodes[n_nodes++] = t;
    kvf_connector_opts co = {.nodes = (const char *const *)nodes, .n_nodes = n_nodes, .layout = *L};
    if (kvf_connector_open(cn, &co, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: %s\n", err);
        return -1;
    }
    return 0;
}

/* Prefills the prompt and decodes greedily until gen tokens are out. Returns 0 or the prefill's
 * KVF_E* code. */
static int run_prompt(kvfe_engine *e, const prompt_opts *o, uint32_t vocab, prompt_result *res)
{
    uint32_t *tokens = malloc((size_t)o->prompt * sizeof *tokens);
    for (long i = 0; i < o->prompt; i++)
        tokens[i] = prompt_token(o->pseed, (size_t)i, vocab);
    kvfe_result r;
    int rc = kvfe_prefill(e, tokens, (size_t)o->prompt, &r);
    free(tokens);
    if (rc)
        return rc;
    res->ttft = r.seconds;
    res->loaded = r.loaded_tokens;
    res->load_error = r.load_error;
    res->out = calloc((size_t)o->gen + 1, sizeof *res->out);
    res->out[0] = r.next_token;
    for (long g = 1; g < o->gen; g++) {
        kvfe_result d;
        kvfe_decode(e, res->out[g - 1], &d);
        res->out[g] = d.next_token;
        res->decode_s += d.seconds;
    }
    res->save_rc = kvfe_flush(e);
    return 0;
}

static void print_result(const prompt_opts *o, const prompt_result *r)
{
    if (o->json) {
        printf("{\"model\":\"%s\",\"prompt_tokens\":%ld,\"loaded_tokens\":%zu,\"ttft_s\":%.6f,"
               "\"decode_s\":%.6f,\"load_error\":\"%s\",\"save\":\"%s\",\"label\":\"real\","
               "\"tokens\":[",
               o->model, o->prompt, r->loaded, r->ttft, r->decode_s, kvf_err_name(r->load_error),
               kvf_err_name(r->save_rc));
        for (long g = 0; g < o->gen; g++)
            printf("%s%u", g ? "," : "", r->out[g]);
        printf("]}\n");
        return;
    }
    printf("kvf-engine %s: prompt %ld tokens, %zu loaded from kvfabric, TTFT %.1f ms%s%s\n",
           o->model, o->prompt, r->loaded, r->ttft * 1e3, r->load_error ? ", load failed: " : "",
           r->load_error ? kvf_strerror(r->load_error) : "");
    printf("generated:");
    for (long g = 0; g < o->gen; g++)
        printf(" %u", r->out[g]);
    printf("\n");
}

/* Runs the engine on one prompt, with the stores of --store when given. */
static int prompt_main(int argc, char **argv)
{
    prompt_opts o;
    kvfe_model m;
    int rc = parse_prompt_opts(argc, argv, &o);
    if (rc != PROCEED)
        return rc;
    if (kvfe_model_preset(o.model, &m) != 0) {
        fprintf(stderr, "kvf-engine: unknown model %s\n", o.model);
        return 2;
    }
    if (o.prompt < 1 || o.gen < 0 || o.prompt + o.gen + 1 > 65536) {
        fprintf(stderr, "kvf-engine: --prompt must be >= 1 and prompt + gen <= 65535\n");
        return 2;
    }
    char err[256], *nodes = NULL;
    kvf_connector *cn = NULL;
    kvfe_engine *e;
    prompt_result r = {0};
    rc = 1;
    if (o.store && open_connector(o.store, &m.layout, &nodes, &cn) != 0)
        goto out_free_nodes;
    kvfe_opts eo = {.model = o.model,
                    .seed = o.seed,
                    .max_tokens = (uint32_t)(o.prompt + o.gen + 1),
                    .cn = cn,
                    .save = o.save,
                    .page_shuffle = 99};
    if (kvfe_open(&e, &eo, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: %s\n", err);
        goto out_close_connector;
    }
    int prc = run_prompt(e, &o, m.vocab, &r);
    if (prc)
        fprintf(stderr, "kvf-engine: prefill: %s\n", kvf_strerror(prc));
    else
        print_result(&o, &r);
    rc = prc ? 1 : 0;
    free(r.out);
    kvfe_close(&e);
out_close_connector:
    kvf_connector_close(&cn);
out_free_nodes:
    free(nodes);
    return rc;
}

int main(int argc, char **argv)
{
    /* The mode is an option of its own; each mode reads its options with its own table. */
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--serve"))
            return kvfe_serve_main(argc, argv);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--calibrate") || !strncmp(argv[i], "--calibrate=", 12))
            return calibrate_main(argc, argv);
    return prompt_main(argc, argv);
}
