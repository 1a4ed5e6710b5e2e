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

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t prompt_token(uint64_t seed, size_t i, uint32_t vocab)
{
    uint64_t z = seed * 0x100000001b3ull + i + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)((z ^ (z >> 31)) % vocab);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--serve"))
            return kvfe_serve_main(argc, argv);
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
