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

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--serve"))
            return kvfe_serve_main(argc, argv);
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--calibrate")) {
            const char *model = "ref-tiny";
            for (int k = 1; k + 1 < argc; k++)
                if (!strcmp(argv[k], "--model"))
                    model = argv[k + 1];
            return calibrate(model, argv[i + 1]);
        }
    const char *model = "ref-tiny", *store = NULL;
    long prompt = 200, gen = 8;
    uint64_t seed = 1, pseed = 7;
    int json = 0, save = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!strcmp(a, "--no-save")) {
            save = 0;
        } else if (v && !strcmp(a, "--model")) {
            model = argv[++i];
        } else if (v && !strcmp(a, "--store")) {
            store = argv[++i];
        } else if (v && !strcmp(a, "--prompt")) {
            prompt = strtol(argv[++i], NULL, 10);
        } else if (v && !strcmp(a, "--gen")) {
            gen = strtol(argv[++i], NULL, 10);
        } else if (v && !strcmp(a, "--seed")) {
            seed = strtoull(argv[++i], NULL, 10);
        } else if (v && !strcmp(a, "--prefix-seed")) {
            pseed = strtoull(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: kvf-engine --model ref-tiny|ref-100m [--store HOST:PORT] "
                            "[--prompt N] [--prefix-seed S] [--seed S] [--gen G] [--no-save] "
                            "[--json]\n");
            return 2;
        }
    }
    kvfe_model m;
    if (kvfe_model_preset(model, &m) != 0) {
        fprintf(stderr, "kvf-engine: unknown model %s\n", model);
        return 2;
    }
    if (prompt < 1 || gen < 0 || prompt + gen + 1 > 65536) {
        fprintf(stderr, "kvf-engine: --prompt must be >= 1 and prompt + gen <= 65535\n");
        return 2;
    }
    char err[256];
    kvf_connector *cn = NULL;
    char *nodes[64];
    size_t n_nodes = 0;
    char *dup = store ? strdup(store) : NULL;
    if (dup) {
        for (char *s = NULL, *t = strtok_r(dup, ",", &s); t && n_nodes < 64;
             t = strtok_r(NULL, ",", &s))
            nodes[n_nodes++] = t;
        kvf_connector_opts co = {
            .nodes = (const char *const *)nodes, .n_nodes = n_nodes, .layout = m.layout};
        if (kvf_connector_open(&cn, &co, err, sizeof err) != 0) {
            fprintf(stderr, "kvf-engine: %s\n", err);
            return 1;
        }
    }
    kvfe_opts eo = {.model = model,
                    .seed = seed,
                    .max_tokens = (uint32_t)(prompt + gen + 1),
                    .cn = cn,
                    .save = save,
                    .page_shuffle = 99};
    kvfe_engine *e;
    if (kvfe_open(&e, &eo, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: %s\n", err);
        kvf_connector_close(&cn);
        return 1;
    }
    uint32_t *tokens = malloc((size_t)prompt * sizeof *tokens);
    for (long i = 0; i < prompt; i++)
        tokens[i] = prompt_token(pseed, (size_t)i, m.vocab);
    kvfe_result r;
    int rc = kvfe_prefill(e, tokens, (size_t)prompt, &r);
    if (rc) {
        fprintf(stderr, "kvf-engine: prefill: %s\n", kvf_strerror(rc));
        return 1;
    }
    double ttft = r.seconds;
    size_t loaded = r.loaded_tokens;
    int load_error = r.load_error;
    uint32_t *out = calloc((size_t)gen + 1, sizeof *out);
    out[0] = r.next_token;
    double decode_s = 0;
    for (long g = 1; g < gen; g++) {
        kvfe_result d;
        kvfe_decode(e, out[g - 1], &d);
        out[g] = d.next_token;
        decode_s += d.seconds;
    }
    int save_rc = kvfe_flush(e);
    if (json) {
        printf("{\"model\":\"%s\",\"prompt_tokens\":%ld,\"loaded_tokens\":%zu,\"ttft_s\":%.6f,"
               "\"decode_s\":%.6f,\"load_error\":\"%s\",\"save\":\"%s\",\"label\":\"real\","
               "\"tokens\":[",
               model, prompt, loaded, ttft, decode_s, kvf_err_name(load_error),
               kvf_err_name(save_rc));
        for (long g = 0; g < gen; g++)
            printf("%s%u", g ? "," : "", out[g]);
        printf("]}\n");
    } else {
        printf("kvf-engine %s: prompt %ld tokens, %zu loaded from kvfabric, TTFT %.1f ms%s%s\n",
               model, prompt, loaded, ttft * 1e3, load_error ? ", load failed: " : "",
               load_error ? kvf_strerror(load_error) : "");
        printf("generated:");
        for (long g = 0; g < gen; g++)
            printf(" %u", out[g]);
        printf("\n");
    }
    free(out);
    free(tokens);
    kvfe_close(&e);
    kvf_connector_close(&cn);
    free(dup);
    return 0;
}
