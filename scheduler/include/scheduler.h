/*
 * scheduler.h - the cache-aware scheduler's core: the global prefix index and placement.
 *
 * The index knows which engine instance holds which KV blocks in its own memory (from the
 * engines' KV events) and which storage node holds which chunks (from store events). Engine block
 * hashes are opaque ids, used only to follow parents and removals; the index hashes token ids
 * itself (XXH3-64 chained over blocks of each engine's block size), so two engines that hold the
 * same tokens match the same request. place() matches a request's tokens against every holder,
 * estimates each candidate's time to first token, and returns a plan whose every action carries
 * a feasibility label.
 *
 * This is the interface of the static library kvf_sched_core, not part of libkvf and not
 * installed: the daemon kvf-sched serves it over HTTP/JSON and feeds the index from ZeroMQ, the
 * reference engine orders its waiting queue with its cost model, and kvf-bench sched replays
 * traces through the same code. Not thread-safe: the daemon serialises access.
 */
#ifndef KVF_SCHED_H
#define KVF_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvf_sched kvf_sched;

#define KVF_SCHED_MAX_INSTANCES 4096
#define KVF_SCHED_MAX_STORES    256

typedef enum kvf_role {
    KVF_ROLE_PREFILL = 1,
    KVF_ROLE_DECODE = 2,
    KVF_ROLE_BOTH = 3,
} kvf_role;

typedef enum kvf_tier {
    KVF_TIER_DEVICE = 1, /* in the engine's own KV memory (GPU) */
    KVF_TIER_HOST = 2,   /* the engine's host offload */
} kvf_tier;

/* Placement policies, compared on the same input. */
#define KVF_POLICY_MAP(XX)               \
    XX(ROUND_ROBIN, "round_robin")       \
    XX(LEAST_LOADED, "least_loaded")     \
    XX(LONGEST_PREFIX, "longest_prefix") \
    XX(DYNAMO_COST, "dynamo_cost")       \
    XX(KVF_COST, "kvf_cost")

typedef enum kvf_policy {
#define KVF_POLICY_ENUM_(e, name) KVF_POLICY_##e,
    KVF_POLICY_MAP(KVF_POLICY_ENUM_)
#undef KVF_POLICY_ENUM_
        KVF_POLICY_COUNT_
} kvf_policy;

const char *kvf_policy_name(kvf_policy p);
int kvf_policy_parse(const char *name, kvf_policy *out);

/* The cost model's constants. Defaults (kvf_sched_cost_defaults) describe llama-3.1-8b on one
 * H200-class GPU with a 100 Gb/s store link; a calibration file overrides them. */
typedef struct kvf_sched_cost {
    double prefill_tokens_per_s;    /* linear prefill throughput of one instance */
    double prefill_attn_s_per_tok2; /* quadratic attention term: seconds per token^2 */
    double load_bytes_per_s;        /* store -> engine bandwidth */
    double kv_bytes_per_token;      /* of the model served */
    double tpot_base_s;             /* decode time per output token, one active sequence */
    double tpot_per_seq_s;          /* added per other active sequence */
    double disagg_threshold_tokens; /* prefill on the decode instance below this suffix */
    double handoff_bytes_per_s;     /* prefill -> decode KV handoff */
    double reject_factor;   /* reject when the best estimate exceeds SLO x this (0: never) */
    uint32_t klpm_k;        /* window of the waiting-queue ordering, and every k-th pick is the
                             * oldest (0: FIFO) */
    uint32_t queue_by_work; /* the ordering's criterion: 1 (default) the least uncached prefill
                             * work, 0 the longest cached prefix (k-LPM) */
} kvf_sched_cost;

void kvf_sched_cost_defaults(kvf_sched_cost *c);

/* The waiting-queue ordering kvf_cost asks of an instance: which of its waiting requests runs
 * next. The n waiting requests are given oldest first, each with its cached prompt tokens (device
 * or store, whichever is longer) and its uncached prefill work in seconds. Among the oldest
 * klpm_k, the one with the least work (queue_by_work) or the longest cached prefix (k-LPM) runs,
 * except that every klpm_k-th pick (pick counts an instance's picks) takes the oldest, so that no
 * request waits behind more than klpm_k others that came after it. Returns an index < n (0 for
 * n = 0). */
size_t kvf_sched_queue_pick(const kvf_sched_cost *c, const size_t *cached, const double *work_s,
                            size_t n, uint64_t pick);
/* Reads a calibration file: a JSON object with any of the fields above. */
int kvf_sched_cost_load(const char *path, kvf_sched_cost *c, char *err, size_t errlen);

typedef struct kvf_sched_opts {
    kvf_policy policy;
    kvf_sched_cost cost;
    uint32_t store_chunk_tokens; /* chunk size of the stores' keys (0: 256) */
    size_t expected_blocks;      /* index capacity hint (0: 1M) */
} kvf_sched_opts;

/* Caller owns the result; free with kvf_sched_destroy(). */
int kvf_sched_new(kvf_sched **out, const kvf_sched_opts *o);
void kvf_sched_destroy(kvf_sched **s);
void kvf_sched_set_policy(kvf_sched *s, kvf_policy p);

/* Instances. An id is any string up to 63 bytes; re-registering updates. */
typedef struct kvf_instance_info {
    char id[64];
    kvf_role role;
    uint32_t block_tokens;    /* the engine's KV block size (vLLM block_size) */
    uint64_t capacity_blocks; /* KV memory, in blocks */
    char endpoint[128];       /* where requests go */
    char events[128];         /* ZeroMQ PUB endpoint of its KV events (may be empty) */
    char capabilities[512];   /* capability record (JSON), passed through */
} kvf_instance_info;

int kvf_sched_instance_add(kvf_sched *s, const kvf_instance_info *info, int *idx);
int kvf_sched_instance_find(const kvf_sched *s, const char *id);
size_t kvf_sched_instance_count(const kvf_sched *s);
const kvf_instance_info *kvf_sched_instance_get(const kvf_sched *s, int idx);

/* Load reports (from the engines or the simulator). */
typedef struct kvf_instance_load {
    double queued_prefill_tokens; /* prompt tokens waiting or still being prefilled (what an
                                   * engine reports about its queue) */
    double queued_prefill_s;      /* the same work in expected seconds, cache hits taken into
                                   * account, when the reporter knows it; 0: unknown */
    uint32_t active_decodes;      /* sequences decoding */
    uint64_t used_blocks;         /* KV blocks in use */
} kvf_instance_load;
int kvf_sched_instance_load(kvf_sched *s, int idx, const kvf_instance_load *load);

/* KV events, after decoding. Engine block hashes are opaque. */
int kvf_sched_block_stored(kvf_sched *s, int idx, const uint64_t *engine_hashes, size_t n_blocks,
                           int has_parent, uint64_t engine_parent, const uint32_t *tokens,
                           size_t n_tokens, uint32_t block_tokens, kvf_tier tier);
int kvf_sched_block_removed(kvf_sched *s, int idx, const uint64_t *engine_hashes, size_t n_blocks);
int kvf_sched_all_cleared(kvf_sched *s, int idx);
/* Store events: a node admitted or evicted chunks (kvfabric chunk keys). Nodes are numbered by
 * the caller (0..KVF_SCHED_MAX_STORES-1). */
int kvf_sched_store_chunks(kvf_sched *s, int node, const kvf_key *keys, size_t n, int admitted);

/* Feasibility label of a planned action (the classifier's, once wired; until then `real` only
 * for what this build can execute). */
typedef enum kvf_label {
    KVF_LABEL_REAL = 0,
    KVF_LABEL_BACKEND_INFEASIBLE = 1,
    KVF_LABEL_SIMULATED = 2,
} kvf_label;
const char *kvf_label_name(kvf_label l);

typedef enum kvf_action_kind {
    KVF_ACT_LOAD_FROM_STORE,
    KVF_ACT_PREFILL,
    KVF_ACT_SAVE_TO_STORE,
    KVF_ACT_HANDOFF,
} kvf_action_kind;

typedef struct kvf_action {
    kvf_action_kind kind;
    int instance; /* where it runs */
    size_t tokens;
    double seconds; /* the cost model's estimate */
    kvf_label label;
} kvf_action;

typedef struct kvf_place_req {
    const uint32_t *tokens; /* prompt token ids */
    size_t n_tokens;
    const kvf_key
        *chunk_keys; /* the prompt's kvfabric chunk keys, for store matches (may be NULL) */
    size_t n_chunks;
    uint32_t output_tokens; /* expected decode length (0: unknown) */
    double slo_ttft_s;      /* 0: none */
} kvf_place_req;

typedef struct kvf_place_res {
    int prefill; /* instance index, or -1 when rejected */
    int decode;
    size_t cached_device; /* tokens held by the prefill instance itself */
    size_t cached_store;  /* further tokens loadable from the stores */
    double expected_ttft_s;
    double queue_s, prefill_s, load_s;
    int rejected;
    int colocated; /* prefill runs on the decode instance (conditional disaggregation) */
    kvf_action actions[4];
    int n_actions;
} kvf_place_res;

/* Places a request. Returns 0 (res->rejected says whether it was refused), or KVF_ENOENT when no
 * instance can serve. */
int kvf_sched_place(kvf_sched *s, const kvf_place_req *req, kvf_place_res *res);

/* The longest cached prefix of the request on one instance, in tokens. */
size_t kvf_sched_match(kvf_sched *s, int idx, const uint32_t *tokens, size_t n);

typedef struct kvf_index_stats {
    uint64_t blocks;           /* distinct (block hash) entries */
    uint64_t holdings;         /* (block, holder) pairs */
    uint64_t events;           /* events applied */
    uint64_t unknown_removals; /* removals of blocks never stored */
    uint64_t bytes;            /* memory held by the index */
} kvf_index_stats;
void kvf_sched_index_stats(const kvf_sched *s, kvf_index_stats *st);

#ifdef __cplusplus
}
#endif
#endif
