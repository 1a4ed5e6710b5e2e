/*
 * What the files of the scheduler core share (docs/scheduler.md). Not a public interface: the
 * daemon, the engine, the replay and the tests use scheduler.h.
 */
#ifndef KVF_SCHED_INT_H
#define KVF_SCHED_INT_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler.h"

#include "kvf/feasibility.h"

/* A holder in the block table is an engine instance (its index, with its tier in bits 24..30) or
 * a storage node (its number, with this bit set). */
#define KVF_SCHED_HOLDER_STORE 0x80000000u
#define KVF_SCHED_HOLDER_WHO   0xffffffu /* the instance index or node number of a holder */

/* An engine instance as the scheduler knows it. */
typedef struct kvf__sched_inst {
    kvf_instance_info info;
    kvf_caps caps; /* from the registration's capability record, or the reference engine's */
    int can_load;  /* the classifier lets it load store-cached KV */
    kvf_instance_load load;
    uint64_t blocks; /* blocks it holds in the index */
} kvf__sched_inst;

struct kvf_sched {
    kvf_sched_opts o;
    /* The index (index.c): the block table maps a block hash to its holders, the engine-hash map
     * (instance, engine block hash) to the block hash. Entries are defined there. */
    struct kvf__sched_bent *bt;
    uint64_t bmask, bcount;
    struct kvf__sched_ement *et;
    uint64_t emask, ecount;
    kvf__sched_inst *inst; /* registered in order, KVF_SCHED_MAX_INSTANCES of room */
    size_t n_inst;
    uint32_t rr; /* round robin's turn */
    kvf_index_stats st;
    kvf_caps store_caps; /* the storage nodes' capability record */
    /* The prefix walk's scratch (match.c), reused by every place(). */
    uint64_t *hashes; /* the request's block hashes, hcap of room */
    size_t hcap;
    uint32_t *depth;     /* per instance: its cached prefix, in its own blocks */
    int *alive, *alive2; /* instances holding every block so far; the next step's */
    uint32_t *stamp;     /* per instance: the walk step that last saw it hold the block */
    uint32_t step;
};

/* ------------------------------------------------------------------------------------------ */
/* The index (index.c) */

/* Allocates the index's two tables for about expected_blocks blocks (0: 1M); they grow by
 * doubling. 0 or KVF_ENOMEM (the caller closes what was allocated). */
int kvf__sched_index_open(kvf_sched *s, size_t expected_blocks);
/* Frees the tables and every holder list. Accepts tables never opened. */
void kvf__sched_index_close(kvf_sched *s);
/* The index's hash of a block: XXH3-64 of its tokens, seeded with the parent's hash and the block
 * size, so the hash depends on the whole prefix. Never 0. */
uint64_t kvf__sched_block_hash(uint64_t parent, uint32_t block_tokens, const uint32_t *tokens);
/* The holders of block h, *n of them, or NULL when the index has no entry for it. Borrowed; valid
 * until the index next changes. */
const uint32_t *kvf__sched_holders(kvf_sched *s, uint64_t h, uint16_t *n);
/* Starts fetching block h's table slot into the cache, for a lookup soon after. */
void kvf__sched_prefetch(const kvf_sched *s, uint64_t h);
/* Whether any storage node holds the chunk. */
int kvf__sched_store_holds(kvf_sched *s, const kvf_key *key);

/* ------------------------------------------------------------------------------------------ */
/* Matching (match.c) */

/* Allocates the walk's scratch for KVF_SCHED_MAX_INSTANCES instances: 0 or KVF_ENOMEM (the
 * caller closes what was allocated). */
int kvf__sched_walk_open(kvf_sched *s);
/* Frees the scratch. Accepts a partly opened one. */
void kvf__sched_walk_close(kvf_sched *s);
/* Sets s->depth[i] to the cached prefix, in its own blocks, of every instance i: one walk per
 * distinct block size among the instances (the first 8 sizes). */
void kvf__sched_match_sizes(kvf_sched *s, const uint32_t *tokens, size_t n);
/* The number of leading chunks of the request that some storage node holds. */
size_t kvf__sched_match_store(kvf_sched *s, const kvf_key *keys, size_t n);

/* ------------------------------------------------------------------------------------------ */
/* The cost model's estimates (cost.c), in seconds. */

/* Prefill of an n-token prompt whose first `cached` tokens need no compute: the uncached tokens
 * at the linear rate plus the quadratic attention term over them. */
double kvf__sched_prefill_s(const kvf_sched_cost *c, double n, double cached);
/* Expected wait behind an instance's queue: its cache-aware estimate when it reported one, else
 * its raw queued tokens at the prefill rate (an upper bound: cache hits only shorten it). */
double kvf__sched_queue_s(const kvf_sched_cost *c, const kvf_instance_load *load);
/* Loading `tokens` tokens of KV from the stores. */
double kvf__sched_load_s(const kvf_sched_cost *c, double tokens);
/* Handing `tokens` tokens of KV from the prefill instance to the decode instance. */
double kvf__sched_handoff_s(const kvf_sched_cost *c, double tokens);

/* ------------------------------------------------------------------------------------------ */
/* Placement (place.c) and its policies (policy.c) */

/* What running a request's prefill on one instance would find cached and cost: the cost model's
 * figures, in tokens and seconds. */
typedef struct kvf__sched_est {
    double device; /* prompt tokens held in the instance's own memory */
    double cached; /* the longer of that and what it may load from the stores */
    double load_s; /* loading the stores' part beyond its own */
    double ttft_s; /* queue wait + load + prefill of the rest */
} kvf__sched_est;

/* A prefill candidate as a policy sees it. */
typedef struct kvf__sched_cand {
    const kvf__sched_inst *in;
    kvf__sched_est est;
    double prompt;  /* the request's tokens */
    size_t ordinal; /* its rank among the prefill instances, in registration order */
    size_t count;   /* the number of prefill instances */
} kvf__sched_cand;

/* A placement policy: the score it gives a prefill candidate (the lowest wins, the first of
 * equal scores), and what it notes once it has chosen (may be NULL). */
typedef struct kvf__sched_policy {
    double (*score)(const kvf_sched *s, const kvf__sched_cand *c);
    void (*placed)(kvf_sched *s);
} kvf__sched_policy;

/* The policy p names; kvf_cost's for a number outside kvf_policy. */
const kvf__sched_policy *kvf__sched_policy_of(kvf_policy p);

#endif
