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
/* The threads a GEMM of the engine runs on (OpenBLAS's). */
int kvfe_gemm_threads(void);
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
    int decide;            /* load or recompute per request from live rates (kvfe_decide) */
} kvfe_opts;

/* What the engine measured, decayed (the newest weighted 0.3): the load bandwidth from the
 * stores (bytes/s) and the prefill's time, t = base_s + s_per_token * n + attn_s * n * (begin +
 * end) / 2 for the n = end - begin positions after begin cached ones (a fixed cost, a per-token
 * and an attention term: kvfe_fit). 0: not measured yet. */
typedef struct kvfe_rates {
    double load_bps, s_per_token;
    double base_s, attn_s;
} kvfe_rates;

/* The prefill's predicted seconds for positions begin..end (kvfe_rates' model). */
double kvfe_rates_compute_s(const kvfe_rates *r, size_t begin, size_t end);

/* The passes the prefill model is fitted to: one decayed mean per prompt-length class (new
 * tokens in [2^(c-1), 2^c)), so that many short passes do not push the long ones' measurements
 * out (docs/python.md, "Measured rates": the same model as kvfabric.rates). */
#define KVFE_FIT_CLASSES 40
typedef struct kvfe_fit {
    struct kvfe_fit_class {
        double x, z, y, when; /* thousands of new tokens, millions of token-positions, seconds */
        uint32_t count;       /* passes, up to 8 (0: none) */
    } c[KVFE_FIT_CLASSES];
    uint64_t outliers; /* passes taken at 3x the prediction (more than that above it) */
} kvfe_fit;

/* A pass of new_tokens positions after begin cached ones that took seconds, at time now (any
 * monotonic clock, in seconds): noted in its class and r's prefill terms fitted again (weighted
 * least squares, non-negative terms, relative error; one class: the per-token rate alone). A
 * pass more than 3x the prediction of a model of two or more classes is taken at 3x. */
void kvfe_fit_note(kvfe_fit *f, kvfe_rates *r, size_t new_tokens, size_t begin, double seconds,
                   double now);
void kvfe_fit_clear(kvfe_fit *f);

/* A prefill's choice between loading the stores' prefix and computing it. */
typedef enum kvfe_choice {
    KVFE_NO_DECISION, /* nothing to choose, or decide off */
    KVFE_LOAD,        /* all the stores hold */
    KVFE_PARTIAL,     /* a prefix of it */
    KVFE_RECOMPUTE,   /* none of it */
} kvfe_choice;

/* Load or recompute, for an n-token prompt of which the engine's pages hold dev tokens and the
 * stores `cached` (whole chunks of chunk_tokens), a load moving tokens from load_from on: the
 * chunk boundary p in (dev, cached] where loading up to p overlapped with computing the rest,
 * max(load, compute), is quickest and beats computing everything after dev by 5%; or dev, to
 * recompute. Everything is loaded before both rates are measured. *choice, *predicted (the
 * chosen plan's seconds) and *recompute (computing after dev) are set (0 where unmeasured). */
size_t kvfe_decide(const kvfe_rates *r, uint64_t bytes_per_token, uint32_t chunk_tokens, size_t dev,
                   size_t cached, size_t n, size_t load_from, kvfe_choice *choice,
                   double *predicted, double *recompute);
/* The engine's rates now; and, for tests and operators, setting them. */
void kvfe_rates_get(const kvfe_engine *e, kvfe_rates *r);
void kvfe_rates_set(kvfe_engine *e, const kvfe_rates *r);

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
    /* With opts.decide: the choice, its predictions, and the layer a load that fell behind its
     * pace was cut at (-1: not cut; then the prompt is computed) */
    kvfe_choice choice;
    double predicted_s, predicted_recompute_s;
    int cut_at_layer;
    /* kvfe_prefill_prefetched: the tokens the prefetch fetched for, those that had arrived by the
     * deadline (loaded unless the pages held as much), whether the deadline cut it short, and the
     * time waited for it at the request's turn */
    size_t prefetch_tokens, prefetch_ready_tokens;
    int prefetch_deadline_missed;
    double prefetch_wait_seconds;
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
/* kvfe_prefill, its load taking each run of chunks from the storage node a plan names (src: n_src
 * runs, kvf-sched's `sources`; kvf_connector_load_planned): a chunk the named node lacks comes
 * from its own node in the same load. The prefix loaded is what the chunks' own nodes or their
 * named nodes hold (kvf_connector_lookup_planned). KVF_EINVAL for src NULL with n_src > 0. */
int kvfe_prefill_planned(kvfe_engine *e, const uint32_t *tokens, size_t n, const kvf_source *src,
                         size_t n_src, kvfe_result *r);
/* kvfe_prefill, with the cached prefix prefetched while the request waited (pf: a
 * kvf_connector_prefetch() of a prefix of tokens through this engine's connector): waits for pf
 * until deadline_ns (CLOCK_MONOTONIC ns; 0: until it completes, within the connector's transfer
 * deadline), loads the leading chunks that arrived from pf's memory and computes the rest. No
 * lookup and no load-or-recompute decision (what arrived costs a copy). What the stores hold by
 * then beyond the prefetch is loaded as kvfe_prefill_planned loads (src, n_src: may be NULL, 0).
 * pf stays the caller's. */
int kvfe_prefill_prefetched(kvfe_engine *e, const uint32_t *tokens, size_t n, kvf_prefetch *pf,
                            uint64_t deadline_ns, const kvf_source *src, size_t n_src,
                            kvfe_result *r);
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
