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

#include "bytes.h"

/* A holder in the block table is an engine instance (its index, with its tier in bits 24..30) or
 * a storage node (its number, with this bit set). */
#define KVF_SCHED_HOLDER_STORE 0x80000000u
#define KVF_SCHED_HOLDER_WHO   0xffffffu /* the instance index or node number of a holder */

#define KVF_SCHED_INLINE_HOLDERS 4 /* holders kept in a block's entry; more go to the heap */

/* A block's entry in the block table (index.c). */
typedef struct kvf__sched_bent {
    uint64_t h; /* 0: empty slot */
    uint16_t n, cap;
    uint32_t pad;
    union {
        uint32_t inl[KVF_SCHED_INLINE_HOLDERS];
        uint32_t *heap;
    } u;
} kvf__sched_bent;

/* An engine instance as the scheduler knows it. */
typedef struct kvf__sched_inst {
    int live; /* 0: a free slot (never registered, or removed), all zero */
    kvf_instance_info info;
    kvf_caps caps; /* from the registration's capability record, or the reference engine's */
    int can_load;  /* the classifier lets it load store-cached KV */
    kvf_instance_load load;
    uint64_t blocks; /* blocks it holds in the index */
    char host[64];   /* info.host, or its endpoint's host (kvf_sched_host_of) */
} kvf__sched_inst;

/* Zone-priced loads (place.c): the zones whose counts a place() keeps, and the holders of a chunk
 * it looks at. */
#define KVF__NEAR_ZONES   8
#define KVF__NEAR_HOLDERS 8

struct kvf_sched {
    kvf_sched_opts o;
    /* The index (index.c): the block table maps a block hash to its holders, the engine-hash map
     * (instance, engine block hash) to the block hash (its entries are defined there). */
    kvf__sched_bent *bt;
    uint64_t bmask, bcount;
    uint64_t bheap; /* block entries whose holders are on the heap (more than the inline room) */
    struct kvf__sched_ement *et;
    uint64_t emask, ecount;
    kvf__sched_inst *inst; /* by slot, KVF_SCHED_MAX_INSTANCES of room */
    size_t n_inst;         /* slots in use are below it: the last one in use, plus one */
    size_t n_live;         /* instances registered */
    uint32_t rr;           /* round robin's turn */
    kvf_index_stats st;
    kvf_caps store_caps; /* the storage nodes' capability record */
    /* The prefix walk's scratch (match.c), reused by every place(). */
    uint64_t *hashes; /* the request's block hashes, hcap of room */
    size_t hcap;
    uint32_t *sdisk; /* kvf__sched_match_store's disk-only counts, sdcap of room */
    size_t sdcap;
    size_t srun;  /* the last match's run of chunks the stores hold */
    int sdisk_ok; /* sdisk holds that match's counts (0: it could not grow) */
    /* Zone-priced loads (place.c, cost.remote_load_bytes_per_s): the run's holders (up to
     * KVF__NEAR_HOLDERS a chunk, shold_n of each) and, for up to KVF__NEAR_ZONES zones of the
     * instances, how many of the first k chunks no node of that zone holds (srem[z][k]). */
    uint16_t *shold;
    uint8_t *shold_n;
    uint32_t *srem;
    size_t shcap;
    char rzone[KVF__NEAR_ZONES][64];
    int n_rzone;
    int rnear_ok;                          /* shold holds the last match's holders */
    double disk_bps[KVF_SCHED_MAX_STORES]; /* kvf_sched_store_rates, per node (0: none yet) */
    struct kvf__sched_where {
        char addr[160], host[64], zone[64];
    } where[KVF_SCHED_MAX_STORES]; /* kvf_sched_store_where, per node */
    double disk_rate; /* the mean of disk_bps over the nodes that have one (kept by store_rates) */
    int disk_rated;   /* how many nodes have one */
    uint32_t *depth;  /* per instance: its cached prefix, in its own blocks */
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
/* Forgets every block instance idx holds and its engine hashes (a full pass over both tables),
 * before its slot is freed. */
void kvf__sched_index_drop(kvf_sched *s, int idx);
/* The index's hashes of nb consecutive blocks of bt tokens each, chained from parent's hash (0
 * for a prompt's first block), into out. Never 0. */
void kvf__sched_chain_hash(uint64_t parent, uint32_t bt, const uint32_t *tokens, size_t nb,
                           uint64_t *out);
/* Whether any storage node holds the chunk. */
/* The tiers (KVF__STORE_DRAM | KVF__STORE_DISK) in which any node holds the chunk; 0: none. */
#define KVF__STORE_DRAM 1u
#define KVF__STORE_DISK 2u
unsigned kvf__sched_store_holds(kvf_sched *s, const kvf_key *key);
/* The storage nodes that hold the chunk, up to max of them: their holder words (the node in the
 * low bits, its tiers KVF__STORE_* in bits 24..30) into out. Returns how many. */
size_t kvf__sched_store_holders(kvf_sched *s, const kvf_key *key, uint32_t *out, size_t max);
#define KVF__HOLDER_NODE(h)  ((int)((h)&0xffffffu))
#define KVF__HOLDER_TIERS(h) (((h) >> 24) & 0x7fu)

/* Whether slot idx holds a registered instance. */
static inline int kvf__sched_live(const kvf_sched *s, int idx)
{
    return idx >= 0 && (size_t)idx < s->n_inst && s->inst[idx].live;
}

/* ------------------------------------------------------------------------------------------ */
/* Block lookups, inline because the prefix walk (match.c) makes one for every block of every
 * request: as calls into index.c they cost place() a fifth more instructions. */

/* A table slot's hash of a key: never 0, which marks an empty slot. */
static inline uint64_t kvf__sched_mix(uint64_t x)
{
    x = kvf__fmix64(x);
    return x ? x : 1;
}

/* Block h's entry, or NULL when the index has none. Borrowed; valid until the index next
 * changes. */
static inline kvf__sched_bent *kvf__sched_block_find(const kvf_sched *s, uint64_t h)
{
    uint64_t i = kvf__sched_mix(h) & s->bmask;
    for (;;) {
        kvf__sched_bent *e = &s->bt[i];
        if (e->h == h)
            return e;
        if (e->h == 0)
            return NULL;
        i = (i + 1) & s->bmask;
    }
}

/* Block h's home slot in the table, where its lookup starts: what the walk prefetches. The caller
 * writes __builtin_prefetch() itself: GCC 12 drops a prefetch that is the only effect of an
 * inlined function, and the call with it. */
static inline const kvf__sched_bent *kvf__sched_block_slot(const kvf_sched *s, uint64_t h)
{
    return &s->bt[kvf__sched_mix(h) & s->bmask];
}

/* The e->n holders of a block (KVF_SCHED_HOLDER_*). */
static inline uint32_t *kvf__sched_bent_holders(kvf__sched_bent *e)
{
    return e->cap > KVF_SCHED_INLINE_HOLDERS ? e->u.heap : e->u.inl;
}

/* ------------------------------------------------------------------------------------------ */
/* Where things are (where.c) */

/* in->host from its record. */
void kvf__sched_inst_where(kvf__sched_inst *in);
/* res->sources: for the load of res->cached_store tokens after res->cached_device on
 * res->prefill, the nearest node holding each chunk of req, in runs. */
void kvf__sched_sources(kvf_sched *s, const kvf_place_req *req, kvf_place_res *res);

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
/* The leading chunks of keys[0..n) that the stores hold; s->sdisk[k] gets how many of the
 * first k of them only a disk tier holds (k = 0..the run; s->sdisk NULL: not kept, out of
 * memory). */
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
/* The deadline of a planned load of `tokens` from the stores (kvf_place_res.load_deadline_s). */
double kvf__sched_load_deadline_s(const kvf_sched_cost *c, double tokens);
double kvf__sched_handoff_s(const kvf_sched_cost *c, double tokens);

/* What running a request's prefill on one instance would find cached and cost: the cost model's
 * figures, in tokens and seconds. */
typedef struct kvf__sched_est {
    double device; /* prompt tokens held in the instance's own memory */
    double cached; /* the longer of that and what it may load from the stores */
    double load_s; /* loading the stores' part beyond its own */
    double ttft_s; /* queue wait + load + prefill of the rest */
    double disk;   /* of the tokens loaded, those in chunks only a disk tier holds */
    double remote; /* of the others, those in chunks no node of the instance's zone holds */
} kvf__sched_est;

/* What prefilling an n-token prompt would find and cost on an instance with this load that holds
 * `device` of its tokens in its own memory and may load `store` from the stores (0 where it may
 * not load), `disk` of the tokens beyond `device` from chunks that only a disk tier holds, at
 * disk_bps (0: cost.disk_load_bytes_per_s), and `remote` of them from chunks held only outside
 * its zone, at cost.remote_load_bytes_per_s. */
void kvf__sched_estimate(const kvf_sched_cost *c, const kvf_instance_load *load, double n,
                         double device, double store, double disk, double disk_bps, double remote,
                         kvf__sched_est *e);

/* ------------------------------------------------------------------------------------------ */
/* Placement (place.c) and its policies (policy.c) */

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
