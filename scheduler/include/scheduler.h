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
    double disk_load_bytes_per_s;   /* a store's disk tier -> engine, until the stores publish
                                     * their measured rate (StoreRates events) */
    double kv_bytes_per_token;      /* of the model served */
    double tpot_base_s;             /* decode time per output token, one active sequence */
    double tpot_per_seq_s;          /* added per other active sequence */
    double disagg_threshold_tokens; /* prefill on the decode instance below this suffix */
    double handoff_bytes_per_s;     /* prefill -> decode KV handoff */
    double reject_factor;   /* reject when the best estimate exceeds SLO x this (0: never) */
    uint32_t klpm_k;        /* window k of the waiting-queue disciplines (kvf_queue); every k-th
                             * pick is the oldest (< 2: arrival order) */
    uint32_t queue_by_work; /* the discipline kvf_sched_queue_pick applies: 1 (default) work, 0
                             * lpm */
    double load_deadline_base_s;     /* a planned load's deadline: this base ... */
    double load_deadline_s_per_ktok; /* ... plus this per thousand tokens loaded (0: twice the
                                      * load time of a thousand tokens at load_bytes_per_s) */
    uint32_t decode_overflow; /* 1 (default): a decode instance also prefills a long suffix when
                               * the prefill instances' queues cost more than the whole prefill
                               * there; 0: long suffixes go to prefill instances only */
    double remote_load_bytes_per_s; /* store in another zone -> engine (0, the default: as
                                     * load_bytes_per_s). Priced for instances with a zone: a
                                     * chunk counts as remote when no node holding it is in the
                                     * instance's zone (docs/scheduler.md, "The nearest
                                     * replica") */
} kvf_sched_cost;

void kvf_sched_cost_defaults(kvf_sched_cost *c);

/* Waiting-queue disciplines: which of an instance's waiting requests runs next. The discipline is
 * an axis of its own, independent of placement: any placement policy can be combined with any
 * discipline, and the engine that owns the queue applies it (the reference engine and the trace
 * replay call kvf_sched_queue_pick_by). Every discipline but fifo looks only at the oldest k
 * waiting requests and gives every k-th pick to the oldest, so that no request waits behind more
 * than k requests that came after it; k < 2 makes every discipline arrival order.
 *
 *   fifo  arrival order
 *   work  the least uncached prefill work, in the cost model's seconds (cache-aware shortest job)
 *   sjf   the fewest prompt tokens, cached or not (shortest job first, blind to the cache)
 *   lpm   the longest cached prefix (k-LPM, after SGLang's longest-prefix-match order)
 *   hrrn  the highest response ratio, (waited + work) / work: work's order among requests that
 *         came together, but a request's priority grows with its wait in units of its own work,
 *         so a long prompt is not overtaken without end by the slightly shorter ones that come
 *         after it (highest response ratio next, Brinch Hansen 1971) */
#define KVF_QUEUE_MAP(XX) \
    XX(FIFO, "fifo")      \
    XX(WORK, "work")      \
    XX(SJF, "sjf")        \
    XX(LPM, "lpm")        \
    XX(HRRN, "hrrn")

typedef enum kvf_queue {
#define KVF_QUEUE_ENUM_(e, name) KVF_QUEUE_##e,
    KVF_QUEUE_MAP(KVF_QUEUE_ENUM_)
#undef KVF_QUEUE_ENUM_
        KVF_QUEUE_COUNT_
} kvf_queue;

const char *kvf_queue_name(kvf_queue q);
int kvf_queue_parse(const char *name, kvf_queue *out);

/* What a discipline reads of each waiting request (kvf_queue_reads), so that a caller computes
 * only that: a cached prefix costs a match against the index or the engine's cache. */
#define KVF_QUEUE_READS_TOKENS 1u /* kvf_queue_view.tokens */
#define KVF_QUEUE_READS_CACHED 2u /* kvf_queue_view.cached */
#define KVF_QUEUE_READS_WORK   4u /* kvf_queue_view.work_s */
#define KVF_QUEUE_READS_WAITED 8u /* kvf_queue_view.waited_s */

/* The KVF_QUEUE_READS_* flags of discipline q (0 for fifo, and for a number outside kvf_queue). */
unsigned kvf_queue_reads(kvf_queue q);

/* An instance's n waiting requests, oldest first, as a discipline reads them. Each array has n
 * entries, or is NULL where the discipline does not read it (kvf_queue_reads). Borrowed for the
 * call. */
typedef struct kvf_queue_view {
    size_t n;
    const size_t *tokens;   /* prompt tokens */
    const size_t *cached;   /* cached prompt tokens (device or store, whichever is longer) */
    const double *work_s;   /* prefill work left after the cached prefix, in seconds */
    const double *waited_s; /* seconds each has waited so far */
} kvf_queue_view;

/* Which waiting request of v runs next under discipline q with window k; pick counts the
 * instance's picks (every k-th takes the oldest). Equal keys go to the oldest. Returns an index
 * < v->n (0 for v->n = 0, and for a number outside kvf_queue). */
size_t kvf_sched_queue_pick_by(kvf_queue q, uint32_t k, const kvf_queue_view *v, uint64_t pick);

/* The discipline the cost constants name: fifo when klpm_k < 2, else work (queue_by_work 1) or
 * lpm (queue_by_work 0). */
kvf_queue kvf_sched_cost_queue(const kvf_sched_cost *c);

/* kvf_sched_queue_pick_by() under the discipline and window the cost constants name
 * (kvf_sched_cost_queue, klpm_k), for callers that know each waiting request's cached tokens and
 * uncached work: the n waiting requests oldest first. Returns an index < n (0 for n = 0). */
size_t kvf_sched_queue_pick(const kvf_sched_cost *c, const size_t *cached, const double *work_s,
                            size_t n, uint64_t pick);
/* Reads a calibration file: a JSON object with any of the fields above. */
int kvf_sched_cost_load(const char *path, kvf_sched_cost *c, char *err, size_t errlen);

typedef struct kvf_sched_opts {
    kvf_policy policy;
    kvf_sched_cost cost;
    uint32_t store_chunk_tokens; /* chunk size of the stores' keys (0: 256) */
    size_t expected_blocks;      /* index capacity hint (0: 1M) */
    /* The cluster has no storage node: no plan loads from, saves to or hands over through a
     * store (a handoff between two instances is then labelled backend_infeasible). */
    int no_stores;
} kvf_sched_opts;

/* Caller owns the result; free with kvf_sched_destroy(). */
int kvf_sched_new(kvf_sched **out, const kvf_sched_opts *o);
void kvf_sched_destroy(kvf_sched **s);
void kvf_sched_set_policy(kvf_sched *s, kvf_policy p);

/* Instances. An id is any string up to 63 bytes; re-registering updates (the daemon refuses a
 * conflicting one before it gets here). Each instance has a slot, its index: a new id takes the
 * lowest free slot, and a removed instance's slot is free for the next. */
typedef struct kvf_instance_info {
    char id[64];
    kvf_role role;
    uint32_t block_tokens;    /* the engine's KV block size (vLLM block_size) */
    uint64_t capacity_blocks; /* KV memory, in blocks */
    char endpoint[128];       /* where requests go */
    char events[128];         /* ZeroMQ PUB endpoint of its KV events (may be empty) */
    char capabilities[512];   /* capability record (JSON), passed through */
    /* The compute it runs on, where engines share it: instances naming the same `compute` (a
     * host's CPUs, or one GPU of a host) share its `compute_slots` (cores, or 1 for a GPU), each
     * using `compute_uses` of them while it works. Empty: its own, shared with nobody. */
    char compute[96];
    uint32_t compute_slots, compute_uses;
    /* Where it runs, for the nearest replica of what it loads (kvf_place_res.sources): its host
     * ("": the endpoint's host) and zone (an operator's label: a rack, an availability zone; "":
     * none). */
    char host[64];
    char zone[64];
} kvf_instance_info;

/* Registers or updates info->id; *idx (may be NULL) gets its slot. 0, KVF_EINVAL (a bad field
 * or capability record) or KVF_ENOSPC (KVF_SCHED_MAX_INSTANCES registered). */
int kvf_sched_instance_add(kvf_sched *s, const kvf_instance_info *info, int *idx);
/* Removes the instance in slot idx: its holdings leave the index, placement no longer sees it,
 * and its slot is free. 0, or KVF_ENOENT for a slot that holds none. */
int kvf_sched_instance_remove(kvf_sched *s, int idx);
/* The slot of the instance named id, or -1. */
int kvf_sched_instance_find(const kvf_sched *s, const char *id);
/* The instances registered. */
size_t kvf_sched_instance_count(const kvf_sched *s);
/* Every instance's slot is below this bound; some below it may be free. */
size_t kvf_sched_instance_slots(const kvf_sched *s);
/* The instance in slot idx, or NULL for a free slot or one out of range. */
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
/* The last load reported by instance idx (zeros before any): 0, or KVF_ENOENT for a free slot. */
int kvf_sched_instance_load_get(const kvf_sched *s, int idx, kvf_instance_load *load);

/* KV events, after decoding. Engine block hashes are opaque. */
int kvf_sched_block_stored(kvf_sched *s, int idx, const uint64_t *engine_hashes, size_t n_blocks,
                           int has_parent, uint64_t engine_parent, const uint32_t *tokens,
                           size_t n_tokens, uint32_t block_tokens, kvf_tier tier);
int kvf_sched_block_removed(kvf_sched *s, int idx, const uint64_t *engine_hashes, size_t n_blocks);
int kvf_sched_all_cleared(kvf_sched *s, int idx);
/* Store events: a node admitted or evicted chunks (kvfabric chunk keys) in its DRAM tier (disk
 * 0) or its disk tier (1); a chunk is held while either tier holds it, and loads at the disk's
 * rate where only the disk does. Nodes are numbered by the caller
 * (0..KVF_SCHED_MAX_STORES-1). */
int kvf_sched_store_chunks(kvf_sched *s, int node, const kvf_key *keys, size_t n, int admitted,
                           int disk);
/* Where storage node `node` is: its data address (HOST:PORT, as the connectors reach it; its
 * host is compared with the instances') and zone ("": none). NULL or "" addr forgets the node's
 * place (it left). 0 or KVF_EINVAL (a node out of range, or a string too long). */
int kvf_sched_store_where(kvf_sched *s, int node, const char *addr, const char *zone);
/* Node's data address as kvf_sched_store_where() set it ("" where unknown). */
const char *kvf_sched_store_addr(const kvf_sched *s, int node);
/* The host part of an address or endpoint ("[SCHEME://]HOST[:PORT][/PATH]", HOST possibly an
 * [IPv6] literal) into out; every loopback name (localhost, 127.x.y.z, ::1) as "127.0.0.1", so
 * that processes on one machine are on one host whichever name they give. */
void kvf_sched_host_of(const char *addr, char *out, size_t n);
/* Whether any storage node exists now (kvf_sched_opts.no_stores, changed as nodes come and go
 * through etcd). */
void kvf_sched_set_no_stores(kvf_sched *s, int no_stores);
/* Forgets every chunk node holds, on both tiers (before a snapshot of it is applied). */
int kvf_sched_store_cleared(kvf_sched *s, int node);
/* A node's measured rate of reads from its disk tier (StoreRates events; bytes per second, > 0):
 * the cost model loads chunks held on disk only at the mean of the nodes' rates (each averaged
 * with its previous one), or at cost.disk_load_bytes_per_s before any is known, never faster
 * than load_bytes_per_s. */
int kvf_sched_store_rates(kvf_sched *s, int node, double disk_read_bytes_per_s);

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

/* How near a storage node is to the instance that loads from it: on its host (shared memory),
 * in its zone, or elsewhere. */
typedef enum kvf_near {
    KVF_NEAR_HOST = 0,
    KVF_NEAR_ZONE = 1,
    KVF_NEAR_REMOTE = 2,
} kvf_near;
const char *kvf_near_name(kvf_near n);

/* One run of a planned load's chunks that one storage node serves: the nearest live node holding
 * each chunk (in DRAM before on disk only at the same nearness, then the lowest node). */
typedef struct kvf_store_source {
    int node;
    kvf_near near;
    int disk_only; /* the node holds every chunk of the run on its disk tier only */
    size_t from;   /* the run's first token in the prompt */
    size_t tokens;
} kvf_store_source;

#define KVF_PLAN_MAX_SOURCES 8

typedef struct kvf_place_res {
    int prefill; /* instance index, or -1 when rejected */
    int decode;
    size_t cached_device; /* tokens held by the prefill instance itself */
    size_t cached_store;  /* further tokens loadable from the stores */
    double expected_ttft_s;
    double queue_s, prefill_s, load_s;
    int rejected;
    int colocated; /* prefill runs on the decode instance (conditional disaggregation) */
    /* With store tokens to load: how long after the prefill instance receives the request its
     * load may take (base + per-ktok term of the cost constants); the engine starts fetching on
     * arrival, uses what arrived by then and computes the rest. 0: no load planned. */
    double load_deadline_s;
    kvf_action actions[4];
    int n_actions;
    /* Where the load's cached_store tokens come from, in prompt order: n_sources runs (at most
     * KVF_PLAN_MAX_SOURCES; sources_truncated: more runs than that, the rest not listed). */
    kvf_store_source sources[KVF_PLAN_MAX_SOURCES];
    int n_sources;
    int sources_truncated;
} kvf_place_res;

/* Places a request. Returns 0 (res->rejected says whether it was refused), or KVF_ENOENT when no
 * instance can serve. */
int kvf_sched_place(kvf_sched *s, const kvf_place_req *req, kvf_place_res *res);

/* Who holds the request's prefix, changing nothing (no load accounting, no policy turn):
 * device[i] gets the leading tokens instance slot i holds (0 for a free slot; n_slots of room,
 * KVF_SCHED_MAX_INSTANCES covers every slot), *store the leading tokens the stores hold (whole
 * chunks; 0 without chunk keys or stores). 0 or KVF_EINVAL. */
int kvf_sched_lookup(kvf_sched *s, const kvf_place_req *req, size_t *device, size_t n_slots,
                     size_t *store);

/* The longest cached prefix of the request on one instance, in tokens. */
size_t kvf_sched_match(kvf_sched *s, int idx, const uint32_t *tokens, size_t n);

typedef struct kvf_index_stats {
    uint64_t blocks;           /* distinct (block hash) entries */
    uint64_t holdings;         /* (block, holder) pairs */
    uint64_t events;           /* events applied */
    uint64_t unknown_removals; /* removals of blocks never stored */
    uint64_t bytes;            /* memory held by the index */
    /* (chunk, storage node) pairs the stores' events say are held in each tier (a chunk in both
     * tiers of a node counts in both) */
    uint64_t store_dram_chunks, store_disk_chunks;
} kvf_index_stats;
void kvf_sched_index_stats(const kvf_sched *s, kvf_index_stats *st);

#ifdef __cplusplus
}
#endif
#endif
