/*
 * kvf/feasibility.h - the backend-feasibility classifier.
 *
 * Every remote KV action is checked against what the backend on each side can really do: its
 * platform, transports, memory kinds, engine and engine features, store tiers and codecs (a
 * capability record per side). classify() labels an action `real` (it runs here),
 * `backend_infeasible` (it cannot run on this backend; the reason names the missing capability)
 * or `simulated` (only when the caller allows evaluation by the cost model; nothing executes).
 * The optimality gap Gap(s) = Score(a*_A, s) - Score(a*_F, s) measures what a backend's limits
 * cost: the best action over all actions minus the best over the `real` ones.
 */
#ifndef KVF_FEASIBILITY_H
#define KVF_FEASIBILITY_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/export.h"

#ifdef __cplusplus
extern "C" {
#endif

/* XX(enum suffix, name). */
#define KVF_ACTION_MAP(XX)                     \
    XX(STORE, "store")                         \
    XX(RETRIEVE, "retrieve")                   \
    XX(LOOKUP, "lookup")                       \
    XX(MOVE, "move")                           \
    XX(PREFETCH, "prefetch")                   \
    XX(EVICT, "evict")                         \
    XX(PIN, "pin")                             \
    XX(UNPIN, "unpin")                         \
    XX(CLEAR, "clear")                         \
    XX(COMPRESS, "compress")                   \
    XX(DECOMPRESS, "decompress")               \
    XX(RDMA_READ, "rdma_read")                 \
    XX(RDMA_WRITE, "rdma_write")               \
    XX(LAYERWISE_LOAD, "layerwise_load")       \
    XX(PD_HANDOFF_DIRECT, "pd_handoff_direct") \
    XX(PD_HANDOFF_STORE, "pd_handoff_store")   \
    XX(KV_QUANTIZATION, "kv_quantization")     \
    XX(TRIM, "trim")

typedef enum kvf_action_id {
#define KVF_ACTION_ENUM_(e, name) KVF_ACTION_##e,
    KVF_ACTION_MAP(KVF_ACTION_ENUM_)
#undef KVF_ACTION_ENUM_
        KVF_ACTION_COUNT_
} kvf_action_id;

KVF_API const char *kvf_action_name(kvf_action_id a);
KVF_API int kvf_action_parse(const char *name, kvf_action_id *out);

/* Memory kinds and transports, as bit sets. */
#define KVF_MEMK_HOST      0x1u
#define KVF_MEMK_UNIFIED   0x2u
#define KVF_MEMK_CUDA      0x4u
#define KVF_TRANSPORT_TCP  0x1u
#define KVF_TRANSPORT_RDMA 0x2u

/* A backend's capabilities: what a probe measured, or what a public API offers. */
typedef struct kvf_caps {
    char name[64];     /* record name, e.g. "mlx-lm" */
    char platform[16]; /* "linux" or "macos" */
    int apple_silicon;
    uint32_t transports;     /* KVF_TRANSPORT_* that work */
    int rdma_devices;        /* RDMA devices that opened */
    int rdma_one_sided;      /* one-sided READ/WRITE verified */
    uint32_t mem_kinds;      /* KVF_MEMK_* the KV lives in */
    uint32_t xfer_mem_kinds; /* memory kinds this side's transfer path can read and write */
    char engine[32];         /* "reference", "hf-transformers", "vllm", "mlx-lm", "llama.cpp",
                                "store", or "" */
    char engine_version[32];
    int paged;              /* paged KV layout */
    int layerwise_hooks;    /* per-layer wait/save hooks in the forward pass */
    int async_load;         /* loads can run while the engine computes */
    int external_connector; /* an API through which an external KV store plugs in */
    uint32_t quant_bits;    /* bit set of supported KV quantization widths (bit b: b bits) */
    uint32_t quant_groups;  /* bit set of group sizes: 1 = 32, 2 = 64, 4 = 128 */
    int trim;               /* can drop a suffix of a sequence's cache */
    int partial_evict;      /* can remove arbitrary blocks (may fail: see trim_can_fail) */
    int trim_can_fail;
    int rotating_cache;      /* sliding-window / rotating cache */
    int rotating_with_quant; /* the rotating cache can be quantized */
    int store_tiers;         /* bit set: 1 DRAM, 2 disk */
    int codecs;              /* bit set: 1 lz4, 2 shuffle-lz4 */
} kvf_caps;

typedef enum kvf_feas_label {
    KVF_FEAS_REAL = 0,
    KVF_FEAS_BACKEND_INFEASIBLE = 1,
    KVF_FEAS_SIMULATED = 2,
} kvf_feas_label;

KVF_API const char *kvf_feas_label_name(kvf_feas_label l);

/* Why an action is not real: which capability is missing, and on which side. */
#define KVF_FEAS_REASON_MAP(XX)                         \
    XX(NONE, "none")                                    \
    XX(NO_COMMON_TRANSPORT, "no_common_transport")      \
    XX(MEMORY_KIND, "memory_kind")                      \
    XX(NO_RDMA_DEVICE, "no_rdma_device")                \
    XX(NO_ONE_SIDED, "no_one_sided_rdma")               \
    XX(NO_LAYERWISE_HOOK, "no_layerwise_hook")          \
    XX(NO_PAGED_LAYOUT, "no_paged_layout")              \
    XX(NO_EXTERNAL_CONNECTOR, "no_external_connector")  \
    XX(NO_ASYNC_LOAD, "no_async_load")                  \
    XX(NO_QUANTIZATION, "no_kv_quantization")           \
    XX(QUANT_WITH_ROTATING, "quantized_rotating_cache") \
    XX(NO_TRIM, "no_trim")                              \
    XX(NO_CODEC, "no_codec")                            \
    XX(NO_STORE, "no_store")

typedef enum kvf_feas_reason {
#define KVF_FEAS_REASON_ENUM_(e, name) KVF_FEAS_##e,
    KVF_FEAS_REASON_MAP(KVF_FEAS_REASON_ENUM_)
#undef KVF_FEAS_REASON_ENUM_
} kvf_feas_reason;

KVF_API const char *kvf_feas_reason_name(kvf_feas_reason r);

typedef struct kvf_verdict {
    kvf_feas_label label;
    kvf_feas_reason reason;
    char why[200]; /* one sentence naming the missing capability and the side */
} kvf_verdict;

/* Classifies action a from local towards remote. With allow_simulated, an infeasible action is
 * labelled `simulated` (the reason still says why it cannot run). Returns 0 or KVF_EINVAL. */
KVF_API int kvf_classify(kvf_action_id a, const kvf_caps *local, const kvf_caps *remote,
                         int allow_simulated, kvf_verdict *out);

/* Built-in records from the engines' public APIs (docs/feasibility.md cites each field):
 * "mlx-lm", "vllm", "llama.cpp", "reference", and "kvf-store" (a storage node). Returns 0 or
 * KVF_ENOENT. */
KVF_API int kvf_caps_builtin(const char *name, kvf_caps *out);
KVF_API const char *kvf_caps_builtin_name(size_t i);
/* JSON records: a built-in name as "base" plus any fields, or every field. */
KVF_API int kvf_caps_from_json(const char *text, size_t len, kvf_caps *out, char *err,
                               size_t errlen);
KVF_API int kvf_caps_load(const char *path, kvf_caps *out, char *err, size_t errlen);
/* Caller owns the result; free with free(). NULL on failure. */
KVF_API char *kvf_caps_to_json(const kvf_caps *c);

/* The state an action is scored in, and the scoring constants (bandwidths, compute rate). */
typedef struct kvf_gap_state {
    double prompt_tokens, cached_tokens; /* request and its cached prefix */
    double kv_bytes_per_token;
    double prefill_tokens_per_s;
    double tcp_bytes_per_s, rdma_bytes_per_s;
    double memory_pressure; /* 0..1: how much memory scarcity costs */
} kvf_gap_state;

KVF_API void kvf_gap_state_defaults(kvf_gap_state *s);

typedef struct kvf_gap {
    kvf_action_id best_all, best_feasible;
    double score_all, score_feasible, gap; /* seconds of TTFT saved, net of costs */
    int have_feasible;
} kvf_gap;

/* Score(a, s): expected TTFT saved by action a minus its transfer and memory-pressure costs, in
 * seconds. Actions that do not move KV (lookup, pin ...) score 0. */
KVF_API double kvf_action_score(kvf_action_id a, const kvf_gap_state *s);
/* Gap over every action, under local/remote capabilities. */
KVF_API int kvf_optimality_gap(const kvf_caps *local, const kvf_caps *remote,
                               const kvf_gap_state *s, kvf_gap *out);

#ifdef __cplusplus
}
#endif
#endif
