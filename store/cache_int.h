/*
 * The cache's insides (cache.c), shared with its eviction policies (cache_policy.c): the entry
 * array, the queues, the cache itself and the policies' ops table. Nothing outside the cache
 * includes this.
 */
#ifndef KVF_STORE_CACHE_INT_H
#define KVF_STORE_CACHE_INT_H

#include "cache.h"

#include "arena.h"

#include <assert.h>
#include <pthread.h>

enum { ST_FREE = 0, ST_RESERVED, ST_READY, ST_GONE };
enum { Q_NONE = 0, Q_MAIN, Q_SMALL };

#define NONE KVF_CACHE_NONE

typedef struct entry {
    kvf_key key;
    uint64_t ns;
    uint64_t off; /* arena offset of the data */
    uint64_t len;
    uint64_t owner;       /* reservations: the connection that made it */
    uint64_t deadline_ns; /* reserved: expiry; ready: end of the pin lease */
    /* reserved through the wire and written in parts (WRITE, then SEAL): where the parts began
     * (0: none written) and where the next must begin; every byte of [wstart, len) was written
     * once, in order, when wpos == len */
    uint64_t wpos;
    uint32_t wstart;
    uint32_t wseq;     /* which reservation of this entry's slot the parts belong to */
    uint32_t wfirst_s; /* when its first part came (the cache's clock, in seconds) */
    uint32_t refs;     /* readers (ready) or the writer's hold (reserved) */
    uint32_t pins;
    uint32_t prev, next; /* policy queue links; next also links the free list */
    uint8_t state;
    uint8_t queue;
    uint8_t freq;
    uint8_t via;     /* reserved: KVF_CACHE_VIA_*, how its bytes are written */
    uint16_t tenant; /* whose bytes these are, for quotas (0: nobody's) */
    uint8_t hits;    /* reads since it became ready (saturating), for the disk's admission */
    uint8_t on_disk; /* the disk tier holds the same bytes: its eviction demotes nothing */
    uint8_t wt;      /* a write-through to the disk tier is queued: its eviction demotes nothing */
    uint8_t rep;     /* its replica on another node (replicate.c): 0 none, 1 queued, 2 made */
} entry;

/* A tenant's use of the arena and its quotas (kvf_cache_tenant_stats; 0: no quota): bytes and
 * entries count every block the tenant's entries hold, reserved, ready, or gone but still read. */
typedef kvf_cache_tenant_stats tenant_acct;

typedef struct queue {
    uint32_t head, tail;
    uint64_t count, bytes;
} queue;

typedef struct evict_ops evict_ops;

struct kvf_cache {
    pthread_mutex_t mu;
    void (*on_change)(void *ctx, int admitted, int disk, const kvf_key *key, uint32_t tenant);
    void *on_change_ctx;
    kvf_cache_evict_hook on_evict; /* kvf__cache_set_evict_hook */
    void *on_evict_ctx;
    kvf_cache_evict_hook on_hot; /* kvf__cache_set_write_through_hook */
    void *on_hot_ctx;
    uint32_t hot_hits;           /* reads that make an entry hot (0: none) */
    uint32_t wseq;               /* the last reservation written in parts (entry.wseq) */
    kvf_cache_evict_hook on_rep; /* kvf__cache_set_replicate_hook */
    void *on_rep_ctx;
    uint32_t rep_hits; /* reads after which an entry is replicated (0: never) */
    int hot_pinned;    /* a pin makes it hot */
    int (*disk_holds)(void *ctx, uint64_t ns, const kvf_key *key); /* kvf__cache_set_disk_check */
    void *disk_holds_ctx;
    pthread_t holder;
    int held;
    const evict_ops *policy;
    const kvf_clock *clock;
    uint64_t reserve_ns;
    uint8_t *mem;
    uint64_t mem_size;
    int mem_fd;    /* the arena's memfd (shared arenas), else -1 */
    int mem_ro_ok; /* the memfd is sealed against writable mappings: a read-only view is safe */
    kvf_arena *arena;
    entry *e;
    uint32_t n_entries;
    uint32_t free_head;
    uint32_t *table; /* eid + 1, 0 = empty */
    uint64_t mask;
    queue q_main, q_small;
    uint64_t *ghost;
    uint64_t ghost_mask;
    uint32_t sweep;
    tenant_acct *tenants; /* KVF_CACHE_MAX_TENANTS */
    kvf_cache_stats st;
};

struct evict_ops {
    const char *name;
    void (*insert)(kvf_cache *c, uint32_t i);
    void (*touch)(kvf_cache *c, uint32_t i);
    void (*unlink)(kvf_cache *c, uint32_t i);
    int (*victim)(kvf_cache *c, uint32_t *out);
};

static inline void assert_locked(const kvf_cache *c)
{
    assert(c->held && pthread_equal(c->holder, pthread_self()));
    (void)c;
}

static inline uint64_t now(const kvf_cache *c)
{
    return kvf__clock_now(c->clock);
}

/* The policies (cache_policy.c). */
extern const evict_ops kvf__cache_lru_ops, kvf__cache_s3fifo_ops;
/* The queue entry x is on (it must be on one). */
queue *kvf__cache_q_of(kvf_cache *c, const entry *x);
/* Whether ready entry x may be evicted at time t (not pinned under a live lease, not read). */
int kvf__cache_evictable(const kvf_cache *c, const entry *x, uint64_t t);

#endif
