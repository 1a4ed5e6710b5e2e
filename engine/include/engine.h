/*
 * The reference engine: a real decoder-only transformer forward pass in C (token embeddings,
 * RMSNorm, rotary position embeddings, grouped-query attention over a paged KV cache, SwiGLU MLP,
 * tied output embeddings, greedy sampling), with GEMMs through OpenBLAS and weights drawn from a
 * seed (nothing is downloaded). Model shapes come from the layout presets ref-tiny, ref-tiny-32l
 * and ref-100m.
 *
 * It serves one sequence at a time and uses the connector the way a serving engine would: lookup
 * before prefill, a layer-streamed load of the cached prefix with a wait before each layer, compute
 * of the rest, and a save of the new chunks that runs after the first token, off its path. The
 * same prompt gives bit-identical logits however its KV got there: rows are computed in blocks
 * aligned to absolute positions, so every GEMM has the same shape whether a prefix was loaded or
 * recomputed.
 */
#ifndef KVF_ENGINE_H
#define KVF_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/connector.h"
#include "kvf/layout.h"

typedef struct kvfe_model {
    kvf_layout layout; /* the KV layout of the model (a preset) */
    uint32_t vocab, hidden, n_heads, ffn;
    float rope_theta, norm_eps;
} kvfe_model;

/* Fills *m for "ref-tiny", "ref-tiny-32l" (ref-tiny with 32 layers) or "ref-100m". Returns 0 or
 * KVF_ENOENT. */
int kvfe_model_preset(const char *name, kvfe_model *m);

typedef struct kvfe_engine kvfe_engine;

/* Sets how many threads the GEMMs of every engine in this process use (OpenBLAS's setting is
 * process-wide); n <= 0 leaves OpenBLAS's own choice (OPENBLAS_NUM_THREADS, else one per core). */
void kvfe_set_gemm_threads(int n);

typedef struct kvfe_opts {
    const char *model;     /* preset name */
    uint64_t seed;         /* weights */
    uint32_t max_tokens;   /* KV capacity of the sequence (prompt + generated) */
    size_t page_pad;       /* extra bytes between pages (exercises strides); 0 */
    kvf_connector *cn;     /* borrowed; NULL: no KV reuse */
    int save;              /* save new chunks through cn */
    uint64_t page_shuffle; /* nonzero: pages of a sequence are a seeded permutation */
    int no_overlap;        /* wait for the whole load before computing (for comparison) */
    int keep_prefix;       /* reuse the previous sequence's KV for a prompt that starts with it */
} kvfe_opts;

typedef struct kvfe_result {
    uint32_t next_token;    /* greedy choice from the last position */
    const float *logits;    /* vocab values; borrowed, valid until the next call */
    size_t cached_tokens;   /* tokens the lookup found */
    size_t loaded_tokens;   /* tokens whose KV came from the store (0 after a fallback) */
    size_t device_tokens;   /* tokens whose KV was still in the pages (keep_prefix) */
    int load_error;         /* 0, or the failure that forced a recompute */
    double seconds;         /* wall time of the call */
    double compute_seconds; /* time in the forward pass proper */
    double wait_seconds;    /* time waiting for layers to arrive */
} kvfe_result;

/* Caller owns the result; free with kvfe_close(). */
int kvfe_open(kvfe_engine **out, const kvfe_opts *o, char *err, size_t errlen);
/* Waits for the saves in flight, then frees. Accepts NULL and clears *e. */
void kvfe_close(kvfe_engine **e);

/* Starts a new sequence with a prompt of n tokens (1 <= n < max_tokens) and runs its prefill.
 * Returns 0 or a KVF_E* code; a failed load is not an error (it is recomputed and reported in
 * r->load_error). The new chunks' save is started once the first token is computed and is not
 * waited for: the next prefill waits only until it has read its pages (kvf_xfer_wait_pages)
 * before writing any, and kvfe_flush() waits for it to be stored. */
int kvfe_prefill(kvfe_engine *e, const uint32_t *tokens, size_t n, kvfe_result *r);
/* From the next prefill on: reuse the previous sequence's KV still in the pages (device, with
 * keep_prefix), look up and load through the connector (load), save new chunks (save). All on at
 * open; load and save need a connector. */
void kvfe_set_tiers(kvfe_engine *e, int device, int load, int save);
/* kvfe_set_tiers(e, load, load, save): the pages and the stores both, or neither. */
void kvfe_set_reuse(kvfe_engine *e, int load, int save);
/* From the next prefill on: compute layer l once layer l of the load has arrived (layerwise, the
 * default), or wait for the whole load before computing (0, the no_overlap option). */
void kvfe_set_overlap(kvfe_engine *e, int layerwise);
/* From the next prefill on: reuse at most max_tokens leading tokens of the previous sequence's KV
 * still in the pages (the device tier; SIZE_MAX: no limit, what keep_prefix sets at open; 0: none,
 * the default without it). */
void kvfe_set_device_reuse(kvfe_engine *e, size_t max_tokens);
/* Appends one token to the sequence and computes the next. */
int kvfe_decode(kvfe_engine *e, uint32_t token, kvfe_result *r);
/* Waits for the saves still in flight (the last prefill's and the one before it) and frees them.
 * Returns the first failure among them, or 0. */
int kvfe_flush(kvfe_engine *e);

#endif
