/*
 * The storage node's disk tier (tier.h): devices, their workers, demotion and requests.
 */
#include "tier.h"

#include "kvf/error.h"

#include "clock.h"
#include "disk.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define QUEUE_BYTES_DEFAULT  (256ull << 20)
#define MAX_REQUESTS_DEFAULT 256
#define TIER_OWNER           (UINT64_MAX - 7) /* the reservations promotions make */
#define GATHER_US_MAX        100000           /* gather_us at most (a close waits for it) */

enum { W_DEMOTE = 100, W_COPY = 101 };

/* Reader threads per device, and the shares a promotion's keys on a device are split into: the
 * engine reads this many objects at once (its read slots). */
#define READERS 4

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

static void q_push(wqueue *q, work *w)
{
    w->next = NULL;
    if (q->tail)
        q->tail->next = w;
    else
        q->head = w;
    q->tail = w;
}

static work *q_pop(wqueue *q)
{
    work *w = q->head;
    if (w) {
        q->head = w->next;
        if (!q->head)
            q->tail = NULL;
    }
    return w;
}

static int dev_of(const kvf__tier *t, const kvf_key *key)
{
    uint64_t h = key->lo ^ (key->hi * 0x9E3779B97F4A7C15ull);
    h ^= h >> 31;
    return (int)(h % (uint64_t)t->n);
}

/* A test's fault hook (kvf__tier_opts.fault), told the device. */
static int dev_fault(void *ud, int is_write, uint64_t off, uint64_t len)
{
    device *v = ud;
    return v->t->o.fault(v->t->o.fault_ud, v->i, is_write, off, len);
}

/* Whether v is down (never waits: event loops ask); the first to see it logs it. */
static int dev_down(device *v)
{
    int down = kvf__disk_down(v->d);
    if (down && !atomic_exchange(&v->down_logged, 1))
        kvf_error(v->t->o.log, "disk tier %s is down (%s): DRAM goes on alone", v->path,
                  strerror(down));
    return down != 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Demotion: the cache's eviction hook (under the cache's lock) */

/* Queues entry eid's bytes for its device's writer (kind W_DEMOTE or W_COPY), within the queue's
 * bytes. Returns 1 if queued (the cache then takes the read reference). Under the cache's lock. */
static int queue_write(kvf__tier *t, int kind, uint32_t eid, uint64_t ns, const kvf_key *key,
                       const uint8_t *data, uint64_t len, uint32_t hits, uint32_t tenant)
{
    int taken = 0;
    pthread_mutex_lock(&t->mu);
    device *v = &t->dev[dev_of(t, key)];
    uint64_t *full =
        kind == W_COPY ? &t->st.write_through_dropped_full : &t->st.demote_dropped_full;
    if (atomic_load(&t->stop) || dev_down(v)) {
        /* closing, or the device is down: nothing more is queued */
    } else if (kind == W_DEMOTE && hits < t->o.admit_hits) {
        t->st.demote_skipped_cold++;
    } else if (t->pending_bytes + len > t->o.queue_bytes) {
        (*full)++;
    } else {
        work *w = malloc(sizeof *w);
        if (w) {
            *w = (work){.kind = kind,
                        .eid = eid,
                        .tenant = tenant,
                        .ns = ns,
                        .key = *key,
                        .data = data,
                        .len = len};
            q_push(&v->wq, w);
            t->pending_bytes += len;
            pthread_cond_signal(&v->wcv);
            taken = 1;
        } else {
            t->st.demote_failed++;
        }
    }
    pthread_mutex_unlock(&t->mu);
    return taken;
}

static int on_evict(void *ctx, uint32_t eid, uint64_t ns, const kvf_key *key, const uint8_t *data,
                    uint64_t len, uint32_t hits, uint32_t tenant)
{
    return queue_write(ctx, W_DEMOTE, eid, ns, key, data, len, hits, tenant);
}

/* Whether the disk still holds (ns, key): the cache asks before it trusts an entry's on-disk mark
 * (the log may have reused the extent, or a read dropped it). Never waits on I/O. */
static int disk_holds(void *ctx, uint64_t ns, const kvf_key *key)
{
    kvf__tier *t = ctx;
    uint64_t len;
    return kvf__disk_contains(t->dev[dev_of(t, key)].d, ns, key, &len);
}

/* An object found on a device at open: told as held on disk (nobody's: the disk keeps no tenant).
 */
static void announce_found(void *ud, uint64_t ns, const kvf_key *key)
{
    (void)ns;
    kvf__tier *t = ud;
    __atomic_fetch_add(&t->st.announced, 1, __ATOMIC_RELAXED);
    t->o.on_change(t->o.on_change_ctx, 1, 1, key, 0);
}

/* How long after open the writer tells what its device held: subscribers that were connected to
 * the node before it restarted take that long (ZeroMQ reconnects every 100 ms) to be there. */
#define FOUND_DELAY_NS (1000ull * 1000 * 1000)

/* Write-through: the cache's hook for an entry pinned or read often (--disk-write-through). */
static int on_hot(void *ctx, uint32_t eid, uint64_t ns, const kvf_key *key, const uint8_t *data,
                  uint64_t len, uint32_t hits, uint32_t tenant)
{
    return queue_write(ctx, W_COPY, eid, ns, key, data, len, hits, tenant);
}

/* ------------------------------------------------------------------------------------------ */
/* Requests */

/* n of r's units are done (a promotion's keys, a removal's or a clear's shares: r->remaining);
 * the last calls done(). */
static void req_done_n(kvf__tier *t, kvf__tier_req *r, int n)
{
    if (atomic_fetch_sub(&r->remaining, n) != n)
        return;
    pthread_mutex_lock(&t->mu);
    if (r->kind == KVF_TIER_PROMOTE) {
        /* the read rate's sample: a whole request, its bytes and its time together */
        t->st.promote_seconds += (double)(kvf__now_ns() - r->t0_ns) / 1e9;
        t->rate_acc_bytes += __atomic_load_n(&r->bytes, __ATOMIC_RELAXED);
    }
    pthread_mutex_unlock(&t->mu);
    r->done(r);
    pthread_mutex_lock(&t->mu);
    if (--t->requests == 0)
        pthread_cond_broadcast(&t->idle);
    pthread_mutex_unlock(&t->mu);
}

/* A work is done: its request's share (REMOVE, CLEAR), or each of its keys (promotions: the
 * requests' in turn, a run of one request's told at once). */
static void work_done(kvf__tier *t, work *w)
{
    if (w->kind != KVF_TIER_PROMOTE) {
        req_done_n(t, w->req, 1);
        return;
    }
    for (uint32_t k = 0; k < w->nidx;) {
        uint32_t e = k + 1;
        while (e < w->nidx && w->it[e].req == w->it[k].req)
            e++;
        req_done_n(t, w->it[k].req, (int)(e - k));
        k = e;
    }
}

/* Tells the demotions written since the last time (the buffer was just written out) that are
 * still on disk: the disk tier now holds them. Writer thread only. */
static void tell_demoted(device *v)
{
    kvf__tier *t = v->t;
    for (size_t i = 0; i < v->n_ann && t->o.on_change; i++) {
        uint64_t len;
        if (kvf__disk_contains(v->d, v->ann[i].ns, &v->ann[i].key, &len))
            t->o.on_change(t->o.on_change_ctx, 1, 1, &v->ann[i].key, v->ann[i].tenant);
    }
    v->n_ann = 0;
}

/* An object the device's log dropped (extent reused, namespace cleared, a read that did not
 * verify): the disk tier no longer holds it. Its tenant is not known here: told as nobody's. */
static void on_drop(void *ud, uint64_t ns, const kvf_key *key)
{
    (void)ns;
    device *v = ud;
    __atomic_fetch_add(&v->t->dropped, 1, __ATOMIC_RELAXED);
    if (v->t->o.on_change)
        v->t->o.on_change(v->t->o.on_change_ctx, 0, 1, key, 0);
}

/* How long (ms) in all a promotion's work waits for reservations that others hold; past that, a
 * key refused is given up at once. */
#define RESERVE_WAIT_MS 200

static void promote_round(device *v, uint32_t m, const item *const *at, const uint32_t *eid,
                          const kvf_key *keys, void **dst, const uint64_t *cap, uint64_t *got,
                          int *st);

/* Reads the keys it[0..n) (of one namespace: one request's, or several's merged while they
 * waited), each into a DRAM entry reserved for it (charged to its request's tenant), committed
 * and marked on disk, and holds a reference on each for its request's caller. The reads go to
 * the engine at once (kvf__disk_get_many): objects demoted together are read back in one I/O. */
static void promote_many(device *v, const item *it, uint32_t n)
{
    kvf__tier *t = v->t;
    kvf_cache *c = t->o.cache;
    const item **at = malloc((n ? n : 1) * sizeof *at);
    uint32_t *eid = malloc((n ? n : 1) * sizeof *eid);
    kvf_key *keys = malloc((n ? n : 1) * sizeof *keys);
    void **dst = malloc((n ? n : 1) * sizeof *dst);
    uint64_t *cap = malloc((n ? n : 1) * sizeof *cap), *got = malloc((n ? n : 1) * sizeof *got);
    int *st = malloc((n ? n : 1) * sizeof *st);
    if (!at || !eid || !keys || !dst || !cap || !got || !st) {
        for (uint32_t k = 0; k < n; k++)
            it[k].req->st[it[k].i] = KVF_ENOMEM;
        goto out;
    }
    /* Rounds: an entry reserved for each key the device holds, until a reservation is refused
     * for want of room or of the tenant's reservations (quota_reservations) while some are held;
     * those are read and committed, which frees their reservations, and the next round goes on
     * from the refused key. A refusal with none held is that key's answer. */
    unsigned waited = 0;
    for (uint32_t k = 0; k < n && !atomic_load(&t->stop);) {
        uint32_t m = 0;
        while (k < n && !atomic_load(&t->stop)) {
            kvf__tier_req *r = it[k].req;
            uint32_t i = it[k].i;
            uint64_t len = 0;
            if (!kvf__disk_contains(v->d, r->ns, &r->keys[i], &len)) {
                r->st[i] = KVF_ENOENT;
                k++;
                continue;
            }
            uint8_t *p;
            kvf__cache_lock(c);
            int rc = kvf__cache_reserve_locked(c, r->ns, &r->keys[i], len, TIER_OWNER, r->tenant,
                                               KVF_CACHE_VIA_WIRE, 1, &eid[m], &p);
            kvf__cache_unlock(c);
            if (rc == KVF_EQUOTA || rc == KVF_ENOSPC) {
                if (m)
                    break; /* asked again once these are committed */
                if (waited < RESERVE_WAIT_MS) {
                    /* the room or the tenant's reservations are held by others (the device's
                     * other readers, her PUTs) for the length of a copy: wait for them, for
                     * RESERVE_WAIT_MS in all over the work (then every refusal is final) */
                    usleep(1000);
                    waited++;
                    continue;
                }
            }
            k++;
            if (rc) {
                r->st[i] = rc;
                continue;
            }
            at[m] = &it[k - 1], keys[m] = r->keys[i], dst[m] = p, cap[m] = len;
            m++;
        }
        promote_round(v, m, at, eid, keys, dst, cap, got, st);
    }
out:
    free(at), free(eid), free(keys), free(dst), free(cap), free(got), free(st);
}

/* Reads the m keys reserved (at[k]: the key, eid[k] its entry, dst[k] its bytes, cap[k] the
 * object's length) and commits each that checked, or aborts its entry. */
static void promote_round(device *v, uint32_t m, const item *const *at, const uint32_t *eid,
                          const kvf_key *keys, void **dst, const uint64_t *cap, uint64_t *got,
                          int *st)
{
    kvf__tier *t = v->t;
    kvf_cache *c = t->o.cache;
    uint64_t t0 = kvf__now_ns();
    int rc = m ? kvf__disk_get_many(v->d, at[0]->req->ns, m, keys, dst, cap, got, st) : 0;
    double secs = (double)(kvf__now_ns() - t0) / 1e9;
    uint64_t promoted = 0, bytes = 0, misses = 0, failed = 0, not_kept = 0;
    for (uint32_t k = 0; k < m; k++) {
        kvf__tier_req *r = at[k]->req;
        uint32_t i = at[k]->i;
        int s = rc ? rc : st[k];
        kvf__cache_lock(c);
        if (s == 0 && got[k] == cap[k] && kvf__cache_commit_locked(c, eid[k], TIER_OWNER) == 0) {
            kvf__cache_mark_on_disk_locked(c, eid[k]);
            kvf__cache_hold_locked(c, eid[k]);
            r->eids[i] = eid[k];
            r->st[i] = 0;
            if (r->keep) /* cold (read back fewer times than promote_reads): served, let go */
                r->keep[i] = t->o.promote_reads <= 1 ||
                             kvf__disk_note_read(v->d, r->ns, &r->keys[i]) >= t->o.promote_reads;
        } else {
            kvf__cache_abort_locked(c, eid[k], TIER_OWNER);
            r->st[i] = s == 0 || s == KVF_EOVERFLOW ? KVF_ENOENT : s;
        }
        kvf__cache_unlock(c);
        if (r->st[i] == 0) {
            promoted++;
            bytes += cap[k];
            not_kept += r->keep && !r->keep[i];
            __atomic_fetch_add(&r->bytes, cap[k], __ATOMIC_RELAXED);
        } else if (r->st[i] == KVF_ENOENT) {
            misses++;
        } else {
            failed++;
        }
    }
    pthread_mutex_lock(&t->mu);
    t->st.read_seconds += secs;
    t->st.promoted += promoted;
    t->st.promoted_bytes += bytes;
    t->st.served_not_kept += not_kept;
    t->st.promote_misses += misses;
    t->st.promote_failed += failed;
    pthread_mutex_unlock(&t->mu);
}

static void run_request(device *v, work *w)
{
    kvf__tier *t = v->t;
    if (w->kind == KVF_TIER_PROMOTE) {
        promote_many(v, w->it, w->nidx);
        return;
    }
    kvf__tier_req *r = w->req;
    /* removals and clears follow the demotions queued before them: those are written (and told)
     * first */
    kvf__disk_flush(v->d);
    tell_demoted(v);
    if (r->kind == KVF_TIER_REMOVE) {
        for (uint32_t k = 0; k < w->nidx; k++) {
            uint32_t i = w->it[k].i;
            if (kvf__disk_remove(v->d, r->ns, &r->keys[i]) == 0) {
                r->st[i] = 0;
                if (t->o.on_change)
                    t->o.on_change(t->o.on_change_ctx, 0, 1, &r->keys[i], r->tenant);
                pthread_mutex_lock(&t->mu);
                t->st.removed++;
                pthread_mutex_unlock(&t->mu);
            }
        }
    } else {
        int64_t n = kvf__disk_clear(v->d, r->all_ns ? 0 : r->ns);
        if (n > 0) {
            __atomic_fetch_add(&r->cleared, n, __ATOMIC_RELAXED);
            pthread_mutex_lock(&t->mu);
            t->st.cleared += (uint64_t)n;
            pthread_mutex_unlock(&t->mu);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Workers */

/* Writes a demotion's or a write-through's bytes to v, drops the cache's reference, and notes the
 * object to be told as on disk once its record is out. */
static void write_out(device *v, work *w)
{
    kvf__tier *t = v->t;
    uint64_t t0 = kvf__now_ns();
    int rc = dev_down(v) ? KVF_EIO : kvf__disk_put(v->d, w->ns, &w->key, w->data, w->len);
    double secs = (double)(kvf__now_ns() - t0) / 1e9;
    kvf__cache_lock(t->o.cache);
    if (w->kind == W_COPY) /* the entry, if still there, is on disk now */
        kvf__cache_write_through_done_locked(t->o.cache, w->eid, rc == 0);
    kvf__cache_release_locked(t->o.cache, w->eid);
    kvf__cache_unlock(t->o.cache);
    pthread_mutex_lock(&t->mu);
    t->pending_bytes -= w->len;
    t->st.write_seconds += secs;
    if (rc == 0) {
        if (w->kind == W_COPY) {
            t->st.written_through++;
            t->st.written_through_bytes += w->len;
        } else {
            t->st.demoted++;
            t->st.demoted_bytes += w->len;
        }
        if (v->ann && v->n_ann < ANNOUNCE_MAX)
            v->ann[v->n_ann++] = (announce){.ns = w->ns, .key = w->key, .tenant = w->tenant};
    } else {
        t->st.demote_failed++;
    }
    pthread_mutex_unlock(&t->mu);
    if (rc)
        dev_down(v);
}

/* Demotions, removals and clears, in order; the buffered writes are written whenever the queue
 * runs dry (or ANNOUNCE_MAX demotions wait to be told), so that a demoted object is found on disk
 * soon after it left DRAM, and then told as on disk. At close, what is queued is still done. */
static void *writer_main(void *arg)
{
    device *v = arg;
    kvf__tier *t = v->t;
    int dirty = 0;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        if (v->found_at_ns && kvf__now_ns() >= v->found_at_ns) {
            /* what the device held at open, told once (the changes made since are told as they
             * happen: a held object told twice is still held) */
            v->found_at_ns = 0;
            pthread_mutex_unlock(&t->mu);
            kvf__disk_flush(v->d);
            tell_demoted(v);
            kvf__disk_each(v->d, announce_found, t);
            pthread_mutex_lock(&t->mu);
            continue;
        }
        work *w = q_pop(&v->wq);
        if (!w) {
            if (dirty) {
                pthread_mutex_unlock(&t->mu);
                uint64_t t0 = kvf__now_ns();
                kvf__disk_flush(v->d);
                double secs = (double)(kvf__now_ns() - t0) / 1e9;
                tell_demoted(v);
                dirty = 0;
                pthread_mutex_lock(&t->mu);
                t->st.write_seconds += secs;
                continue;
            }
            if (atomic_load(&t->stop))
                break;
            if (v->found_at_ns)
                kvf__cond_wait_ms(&v->wcv, &t->mu, 100);
            else
                pthread_cond_wait(&v->wcv, &t->mu);
            continue;
        }
        pthread_mutex_unlock(&t->mu);
        if (w->kind == W_DEMOTE || w->kind == W_COPY) {
            write_out(v, w);
            dirty = 1;
            if (v->n_ann >= ANNOUNCE_MAX) {
                kvf__disk_flush(v->d);
                tell_demoted(v);
            }
        } else {
            run_request(v, w);
            work_done(t, w);
        }
        free(w);
        pthread_mutex_lock(&t->mu);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static void *reader_main(void *arg)
{
    device *v = arg;
    kvf__tier *t = v->t;
    uint64_t gather_ns = (uint64_t)t->o.gather_us * 1000u;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        work *w = v->rq.head;
        if (!w) {
            if (atomic_load(&t->stop))
                break;
            pthread_cond_wait(&v->rcv, &t->mu);
            continue;
        }
        uint64_t now = gather_ns ? kvf__now_ns() : 0;
        if (gather_ns && !atomic_load(&t->stop) && now < w->t_ns + gather_ns) {
            /* young: the requests that came with it are given until then to arrive and be
             * merged with it (merge_waiting) */
            uint64_t due = w->t_ns + gather_ns;
            struct timespec ts = {.tv_sec = (time_t)(due / 1000000000u),
                                  .tv_nsec = (long)(due % 1000000000u)};
            pthread_cond_timedwait(&v->rcv, &t->mu, &ts); /* rcv waits on the monotonic clock */
            continue;
        }
        q_pop(&v->rq);
        pthread_mutex_unlock(&t->mu);
        run_request(v, w); /* once stopping, promotes nothing: its keys stay misses */
        work_done(t, w);
        free(w);
        pthread_mutex_lock(&t->mu);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* The interface */

/* Items in the order their records lie in the log (keys not indexed last; equals by request and
 * index, so that a request's keys keep their order among them). */
static int by_off(const void *a, const void *b)
{
    const item *x = a, *y = b;
    if (x->off != y->off)
        return x->off < y->off ? -1 : 1;
    if (x->req != y->req)
        return (uintptr_t)x->req < (uintptr_t)y->req ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

/* The most keys a device's waiting promotions are merged into (merge_waiting): past that, a new
 * request's keys queue on their own, so that a long queue is never sorted again at each request. */
#define MERGE_KEYS 4096

/* Deals the n items its (in log order) into np works of consecutive runs of them, ws[0..np), of
 * kind for req. 0, or KVF_ENOMEM (none made). */
static int deal(const item *its, uint32_t n, int np, int kind, kvf__tier_req *req, work **ws)
{
    for (int k = 0; k < np; k++) {
        uint32_t lo = (uint32_t)((uint64_t)n * (uint64_t)k / (uint64_t)np);
        uint32_t hi = (uint32_t)((uint64_t)n * (uint64_t)(k + 1) / (uint64_t)np);
        ws[k] = calloc(1, sizeof(work) + (size_t)(hi - lo) * sizeof(item));
        if (!ws[k]) {
            while (k-- > 0)
                free(ws[k]);
            return KVF_ENOMEM;
        }
        ws[k]->kind = kind;
        ws[k]->req = req;
        ws[k]->nidx = hi - lo;
        if (hi > lo)
            memcpy(ws[k]->it, its + lo, (size_t)(hi - lo) * sizeof(item));
    }
    return 0;
}

/* Whether a waiting work's keys may be read with r's: one namespace (the engine reads one at a
 * time) and one tenant (a work's reservations wait for room as one, RESERVE_WAIT_MS in all: a
 * tenant over her quota must not spend another's wait). */
static int same_kind(const work *w, const kvf__tier_req *r)
{
    return w->nidx && w->it[0].req->ns == r->ns && w->it[0].req->tenant == r->tenant;
}

/* Merges the sorted runs of a[0..n) (run k from starts[k] to the next one's start, or n), two by
 * two, into one in log order (tmp: room for n items). */
static void merge_runs(item *a, item *tmp, uint32_t n, uint32_t *starts, int nr)
{
    while (nr > 1) {
        int out = 0;
        for (int k = 0; k < nr; k += 2) {
            uint32_t lo = starts[k], mid = k + 1 < nr ? starts[k + 1] : n,
                     hi = k + 2 < nr ? starts[k + 2] : n;
            uint32_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                tmp[o++] = by_off(&a[j], &a[i]) < 0 ? a[j++] : a[i++];
            while (i < mid)
                tmp[o++] = a[i++];
            while (j < hi)
                tmp[o++] = a[j++];
            starts[out++] = lo;
        }
        memcpy(a, tmp, (size_t)n * sizeof *a);
        nr = out;
    }
}

/* Under t->mu: the promotions like r's (same_kind) waiting in v's readers' queue and r's n keys its
 * on v (in log order), dealt together in log order into up to READERS works, in the queue where
 * the first of them waited. Keys of requests that came together (a client's batch, striped over
 * connections and so over the event loops) lie interleaved in the log when they were demoted
 * together; dealt apart, each reader's keys would be one record in several and read one I/O each,
 * and merged, runs of them are read at once (kvf__disk_get_many). Counts (r->remaining) are the
 * keys', so they do not change. Each work's keys are in log order already: they are merged as
 * sorted runs, in time linear in the keys for each doubling of the works (this holds the tier's
 * lock, which evictions wait for). 1 if merged; 0 if nothing like r waits, or past MERGE_KEYS, or
 * out of memory: the caller queues its own works. */
static int merge_waiting(device *v, const kvf__tier_req *r, const item *its, uint32_t n)
{
    uint32_t total = n;
    int waiting = 0;
    for (work *w = v->rq.head; w; w = w->next)
        if (same_kind(w, r)) {
            total += w->nidx;
            waiting++;
        }
    if (!waiting || total > MERGE_KEYS)
        return 0;
    item *all = malloc((size_t)total * 2 * sizeof *all);
    uint32_t *starts = malloc((size_t)(waiting + 1) * sizeof *starts);
    if (!all || !starts) {
        free(all), free(starts);
        return 0;
    }
    uint64_t t0 = kvf__now_ns();
    memcpy(all, its, (size_t)n * sizeof *all);
    uint32_t m = n;
    int nr = 0;
    starts[nr++] = 0;
    for (work *w = v->rq.head; w; w = w->next)
        if (same_kind(w, r)) {
            starts[nr++] = m;
            memcpy(all + m, w->it, (size_t)w->nidx * sizeof *all);
            m += w->nidx;
            if (w->t_ns < t0)
                t0 = w->t_ns;
        }
    merge_runs(all, all + total, total, starts, nr);
    free(starts);
    work *ws[READERS];
    int np = total < READERS ? (int)total : READERS;
    int rc = deal(all, total, np, KVF_TIER_PROMOTE, NULL, ws);
    free(all);
    if (rc)
        return 0;
    wqueue rest = {0};
    int placed = 0;
    for (work *w = q_pop(&v->rq); w; w = q_pop(&v->rq)) {
        if (!same_kind(w, r)) {
            q_push(&rest, w);
            continue;
        }
        if (!placed) /* where the first of them waited: none waits longer for it */
            for (int k = 0; k < np; k++) {
                ws[k]->t_ns = t0;
                q_push(&rest, ws[k]);
            }
        placed = 1;
        free(w); /* its keys are in ws */
    }
    v->rq = rest;
    return 1;
}

int kvf__tier_submit(kvf__tier *t, kvf__tier_req *r)
{
    enum { MAXW = KVF_TIER_MAX_DEVICES * READERS };
    int promote = r->kind == KVF_TIER_PROMOTE;
    uint32_t count[KVF_TIER_MAX_DEVICES] = {0}, first[KVF_TIER_MAX_DEVICES + 1] = {0};
    for (uint32_t i = 0; i < r->n; i++)
        count[dev_of(t, &r->keys[i])]++;
    for (int d = 0; d < t->n; d++)
        first[d + 1] = first[d] + count[d];
    /* the keys device by device; a promotion's in the order their records lie in its log: each
     * reader's run of them lies side by side there even when the demotions that wrote them
     * interleaved the request's keys (a store of several event loops evicts a batch's keys in the
     * order its loops inserted them), and is read at once (kvf__disk_get_many) */
    item *its = NULL;
    if (r->kind != KVF_TIER_CLEAR && r->n) {
        its = malloc((size_t)r->n * sizeof *its);
        if (!its)
            return KVF_ENOMEM;
        uint32_t at[KVF_TIER_MAX_DEVICES];
        memcpy(at, first, sizeof at);
        for (uint32_t i = 0; i < r->n; i++) {
            int d = dev_of(t, &r->keys[i]);
            its[at[d]++] =
                (item){.req = r,
                       .off = promote ? kvf__disk_offset(t->dev[d].d, r->ns, &r->keys[i]) : 0,
                       .i = i};
        }
        for (int d = 0; promote && d < t->n; d++)
            qsort(its + first[d], count[d], sizeof *its, by_off);
    }
    /* a device's share: one work (removals, clears: its writer's), or for promotions up to READERS
     * works of its keys in consecutive runs of their order in the log, one per reader (dealt
     * round, no reader would have two neighbours). r->remaining counts a promotion's keys (a
     * work may carry several requests' keys: merge_waiting), other requests' works. */
    work *ws[MAXW] = {0};
    int devs[MAXW];
    int nw = 0, units = 0;
    for (int d = 0; d < t->n; d++) {
        if ((r->kind != KVF_TIER_CLEAR && !count[d]) || dev_down(&t->dev[d]))
            continue;
        int np = promote && count[d] > 1 ? (int)(count[d] < READERS ? count[d] : READERS) : 1;
        if (deal(its ? its + first[d] : NULL, its ? count[d] : 0, np, r->kind, r, ws + nw) != 0) {
            for (int j = 0; j < nw; j++)
                free(ws[j]);
            free(its);
            return KVF_ENOMEM;
        }
        for (int k = 0; k < np; k++)
            devs[nw++] = d;
        units += promote ? (int)count[d] : np;
    }
    if (nw == 0) {
        free(its);
        return KVF_EIO;
    }
    r->cleared = 0;
    r->t0_ns = kvf__now_ns();
    for (int k = 0; k < nw; k++)
        ws[k]->t_ns = r->t0_ns;
    atomic_store(&r->remaining, units);
    pthread_mutex_lock(&t->mu);
    if (atomic_load(&t->stop) || t->refuse || t->requests >= t->o.max_requests) {
        pthread_mutex_unlock(&t->mu);
        for (int k = 0; k < nw; k++)
            free(ws[k]);
        free(its);
        return KVF_EBUSY;
    }
    t->requests++;
    for (int k = 0; k < nw;) {
        int d = devs[k], e = k;
        while (e < nw && devs[e] == d)
            e++;
        device *v = &t->dev[d];
        if (promote && merge_waiting(v, r, its + first[d], count[d])) {
            for (int j = k; j < e; j++) { /* merged: their keys are in the merged works */
                free(ws[j]);
                ws[j] = NULL;
            }
            pthread_cond_broadcast(&v->rcv);
        } else {
            for (int j = k; j < e; j++)
                q_push(promote ? &v->rq : &v->wq, ws[j]);
            pthread_cond_broadcast(promote ? &v->rcv : &v->wcv);
        }
        k = e;
    }
    pthread_mutex_unlock(&t->mu);
    free(its);
    return 0;
}

int kvf__tier_contains(kvf__tier *t, uint64_t ns, const kvf_key *key, uint64_t *len)
{
    return kvf__disk_contains(t->dev[dev_of(t, key)].d, ns, key, len);
}

void kvf__tier_each(kvf__tier *t, void (*fn)(void *ud, uint64_t ns, const kvf_key *key), void *ud)
{
    for (int i = 0; i < t->n; i++)
        if (!dev_down(&t->dev[i]))
            kvf__disk_each(t->dev[i].d, fn, ud);
}

int kvf__tier_up(kvf__tier *t)
{
    for (int i = 0; i < t->n; i++)
        if (!dev_down(&t->dev[i]))
            return 1;
    return 0;
}

int kvf__tier_device(kvf__tier *t, int i, const char **path, int *down, uint64_t *entries,
                     uint64_t *bytes)
{
    if (i < 0 || i >= t->n)
        return -1;
    *path = t->dev[i].path;
    *down = kvf__disk_down(t->dev[i].d);
    uint64_t vf;
    kvf__disk_usage(t->dev[i].d, entries, bytes, &vf);
    return 0;
}

uint64_t kvf__tier_read_rate(kvf__tier *t)
{
    pthread_mutex_lock(&t->mu);
    uint64_t bytes = t->rate_acc_bytes - t->rate_bytes;
    double secs = t->st.promote_seconds - t->rate_seconds;
    t->rate_bytes = t->rate_acc_bytes;
    t->rate_seconds = t->st.promote_seconds;
    pthread_mutex_unlock(&t->mu);
    return bytes && secs > 0 ? (uint64_t)((double)bytes / secs) : 0;
}

void kvf__tier_stats_get(kvf__tier *t, kvf__tier_stats *st)
{
    pthread_mutex_lock(&t->mu);
    *st = t->st; /* the tier's counters, and the devices' figures taken at open */
    st->pending_bytes = t->pending_bytes;
    pthread_mutex_unlock(&t->mu);
    st->dropped = __atomic_load_n(&t->dropped, __ATOMIC_RELAXED);
    st->devices = t->n;
    for (int i = 0; i < t->n; i++) {
        uint64_t e, b, v;
        kvf__disk_usage(t->dev[i].d, &e, &b, &v); /* never waits on I/O: STATS comes from loops */
        st->devices_down += kvf__disk_down(t->dev[i].d) != 0;
        st->entries += e;
        st->entry_bytes += b;
        st->verify_failures += v;
        st->promote_reads += kvf__disk_get_reads(t->dev[i].d);
    }
}

int kvf__tier_open(kvf__tier **out, const kvf__tier_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    if (o->n < 1 || o->n > KVF_TIER_MAX_DEVICES || !o->cache) {
        snprintf(err, errlen, "disk tier: 1 to %d devices", KVF_TIER_MAX_DEVICES);
        return KVF_EINVAL;
    }
    kvf__tier *t = calloc(1, sizeof *t);
    if (!t)
        return KVF_ENOMEM;
    t->o = *o;
    if (!t->o.queue_bytes)
        t->o.queue_bytes = QUEUE_BYTES_DEFAULT;
    /* the blocks held for demotion cannot be evicted: at most a quarter of the arena, so that
     * room can always be made from the rest */
    uint64_t arena = kvf__cache_mem_size(o->cache);
    if (t->o.queue_bytes > arena / 4)
        t->o.queue_bytes = arena / 4;
    if (!t->o.max_requests)
        t->o.max_requests = MAX_REQUESTS_DEFAULT;
    if (t->o.gather_us > GATHER_US_MAX)
        t->o.gather_us = GATHER_US_MAX;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->idle, NULL);
    int rc = 0;
    for (int i = 0; i < o->n; i++) {
        device *v = &t->dev[i];
        v->t = t;
        v->i = i;
        v->path = o->paths[i];
        pthread_cond_init(&v->wcv, NULL);
        pthread_condattr_t ca; /* the readers' gathering waits until a time of kvf__now_ns's */
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&v->rcv, &ca);
        pthread_condattr_destroy(&ca);
        t->n = i + 1;
        /* extents of 64 MiB, smaller (to 1 MiB) on a small device: 16 of them at least, so that
         * the log's reuse of its oldest extent drops a sixteenth of what the tier holds */
        uint64_t eb = o->extent_bytes;
        if (!eb)
            for (eb = 64u << 20;
                 eb > (1u << 20) && o->sizes[i] && o->sizes[i] < (1u << 20) + 16 * eb;)
                eb /= 2;
        kvf__disk_opts dopt = {.path = o->paths[i],
                               .size = o->sizes[i],
                               .extent_bytes = eb,
                               .queue_depth = o->queue_depth,
                               .fault = o->fault ? dev_fault : NULL,
                               .fault_ud = v};
        if ((rc = kvf__disk_open(&v->d, &dopt, err, errlen)) != 0)
            goto fail;
        v->ann = malloc(ANNOUNCE_MAX * sizeof *v->ann);
        if (!v->ann) {
            snprintf(err, errlen, "disk tier %s: out of memory", v->path);
            rc = KVF_ENOMEM;
            goto fail;
        }
        kvf__disk_set_drop_hook(v->d, on_drop, v);
        if (o->on_change)
            v->found_at_ns = kvf__now_ns() + FOUND_DELAY_NS;
        kvf__disk_stats ds;
        kvf__disk_stats_get(v->d, &ds);
        t->st.bytes += ds.bytes;
        t->st.rebuilt_entries += ds.rebuilt_entries;
        t->st.rebuild_seconds += ds.rebuild_seconds; /* the devices open one after another */
        v->wr_ok = pthread_create(&v->wr, NULL, writer_main, v) == 0;
        while (v->wr_ok && v->rd_ok < READERS &&
               pthread_create(&v->rd[v->rd_ok], NULL, reader_main, v) == 0)
            v->rd_ok++;
        if (v->rd_ok < READERS) {
            snprintf(err, errlen, "disk tier %s: cannot start its threads", v->path);
            rc = KVF_ENOMEM;
            goto fail;
        }
    }
    kvf__cache_set_disk_check(o->cache, disk_holds, t);
    kvf__cache_set_evict_hook(o->cache, on_evict, t);
    if (o->write_through_hits || o->write_through_pinned)
        kvf__cache_set_write_through_hook(o->cache, on_hot, t, o->write_through_hits,
                                          o->write_through_pinned);
    *out = t;
    return 0;
fail:
    kvf__tier_close(&t);
    return rc;
}

void kvf__tier_quiesce(kvf__tier *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    t->refuse = 1;
    while (t->requests)
        pthread_cond_wait(&t->idle, &t->mu);
    pthread_mutex_unlock(&t->mu);
}

void kvf__tier_close(kvf__tier **pt)
{
    kvf__tier *t = *pt;
    if (!t)
        return;
    kvf__cache_set_evict_hook(t->o.cache, NULL, NULL); /* no demotion is queued after this */
    kvf__cache_set_disk_check(t->o.cache, NULL, NULL);
    kvf__cache_set_write_through_hook(t->o.cache, NULL, NULL, 0, 0);
    kvf__tier_quiesce(t);
    pthread_mutex_lock(&t->mu);
    atomic_store(&t->stop, 1);
    for (int i = 0; i < t->n; i++) {
        pthread_cond_broadcast(&t->dev[i].wcv);
        pthread_cond_broadcast(&t->dev[i].rcv);
    }
    pthread_mutex_unlock(&t->mu);
    for (int i = 0; i < t->n; i++) {
        device *v = &t->dev[i];
        if (v->wr_ok)
            pthread_join(v->wr, NULL);
        for (int k = 0; k < v->rd_ok; k++)
            pthread_join(v->rd[k], NULL);
        kvf__disk_close(&v->d);
        free(v->ann);
        v->ann = NULL;
        pthread_cond_destroy(&v->wcv);
        pthread_cond_destroy(&v->rcv);
    }
    pthread_cond_destroy(&t->idle);
    pthread_mutex_destroy(&t->mu);
    free(t);
    *pt = NULL;
}
