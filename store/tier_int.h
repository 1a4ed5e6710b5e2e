/*
 * The disk tier inside (tier.h is its interface): its devices, their queues of work and what the
 * tier's files share. tier.c: devices, their writer and reader threads, demotion, open and
 * close; tier_submit.c: a request made into the devices' works (a device's waiting promotions
 * merged); tier_promote.c: a work's keys read from disk into DRAM entries. The queues and the
 * counters are under the tier's mutex (mu); the cache's lock is never taken under it.
 */
#ifndef KVF_STORE_TIER_INT_H
#define KVF_STORE_TIER_INT_H

#include "tier.h"

#include "disk.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

/* Reader threads per device, and the shares a promotion's keys on a device are split into: the
 * engine reads this many objects at once (its read slots). */
#define READERS 4

#define TIER_OWNER (UINT64_MAX - 7) /* the reservations promotions make */

enum { W_DEMOTE = 100, W_COPY = 101 };

/* A key of a request on a device, and where its record lay when the request came (its offset in
 * the device's log; UINT64_MAX: not indexed), by which a device's queued promotions are dealt. */
typedef struct item {
    kvf__tier_req *req;
    uint64_t off;
    uint32_t i; /* the key's index in req */
} item;

/* One unit of a device worker's work: a demotion, a removal's or a clear's share on this device
 * (req), or keys of promotions to read (items: of one namespace, of one request or of several
 * merged while they waited, in log order). */
typedef struct work {
    struct work *next;
    int kind;
    /* W_DEMOTE: the evicted entry, its bytes held in the arena by a read reference; W_COPY: the
     * same for a hot entry that stays in DRAM (write-through) */
    uint32_t eid, tenant;
    uint64_t ns;
    kvf_key key;
    const uint8_t *data;
    uint64_t len;
    /* a request's share: REMOVE and CLEAR's req; the keys (every kind but CLEAR) */
    kvf__tier_req *req;
    uint64_t t_ns; /* promotions: when queued (merged: the earliest of those it holds) */
    uint32_t nidx;
    item it[];
} work;

typedef struct wqueue {
    work *head, *tail;
} wqueue;

/* A demoted object not yet told as on disk: told once its record is written (and still there). */
typedef struct announce {
    uint64_t ns;
    kvf_key key;
    uint32_t tenant;
} announce;

/* Demotions told at once, at most: beyond, the writer writes its buffer out and tells them. */
#define ANNOUNCE_MAX 4096

typedef struct device {
    kvf__tier *t;
    int i;
    kvf__disk *d;
    const char *path;
    wqueue wq, rq; /* the writer's (demotions, removals, clears) and the reader's (promotions) */
    pthread_cond_t wcv, rcv;
    pthread_t wr, rd[READERS];
    int wr_ok, rd_ok; /* rd_ok: readers started */
    atomic_int down_logged;
    announce *ann; /* the writer's own (ANNOUNCE_MAX) */
    size_t n_ann;
    uint64_t found_at_ns; /* nonzero: what the device held at open is yet to be told, then */
} device;

struct kvf__tier {
    kvf__tier_opts o;
    pthread_mutex_t mu;  /* the queues, pending_bytes, requests and the counters */
    pthread_cond_t idle; /* requests fell to 0 */
    atomic_int stop;     /* closing: workers end once their queues are empty */
    int refuse;          /* quiesced: no request is taken */
    device dev[KVF_TIER_MAX_DEVICES];
    int n;
    uint64_t pending_bytes;
    uint32_t requests;
    kvf__tier_stats st;      /* the tier's own counters; the devices' are summed in at stats_get */
    uint64_t dropped;        /* on_drop's count (atomic: called under the devices' locks) */
    uint64_t rate_acc_bytes; /* promoted bytes of completed requests (the rate's numerator) */
    uint64_t rate_bytes;     /* kvf__tier_read_rate's last look */
    double rate_seconds;
};

static inline void kvf__tier_q_push(wqueue *q, work *w)
{
    w->next = NULL;
    if (q->tail)
        q->tail->next = w;
    else
        q->head = w;
    q->tail = w;
}

static inline work *kvf__tier_q_pop(wqueue *q)
{
    work *w = q->head;
    if (w) {
        q->head = w->next;
        if (!q->head)
            q->tail = NULL;
    }
    return w;
}

static inline int kvf__tier_dev_of(const kvf__tier *t, const kvf_key *key)
{
    uint64_t h = key->lo ^ (key->hi * 0x9E3779B97F4A7C15ull);
    h ^= h >> 31;
    return (int)(h % (uint64_t)t->n);
}

/* Whether v is down (never waits: event loops ask); the first to see it logs it. */
int kvf__tier_dev_down(device *v);

/* Reads the keys it[0..n) of one namespace and one tenant (one request's, or several's merged
 * while they waited) into DRAM (tier_promote.c). */
void kvf__tier_promote(device *v, const item *it, uint32_t n);

#endif
