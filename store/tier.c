/*
 * The storage node's disk tier (tier.h, tier_int.h): its devices, their writer and reader
 * threads, demotion, the requests' completion, open and close. Requests are made into work in
 * tier_submit.c, and promotions read in tier_promote.c.
 */
#include "tier_int.h"

#include "kvf/error.h"

#include "clock.h"

#include <pthread.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define QUEUE_BYTES_DEFAULT  (256ull << 20)
#define MAX_REQUESTS_DEFAULT 256
#define GATHER_US_MAX        100000 /* gather_us at most (a close waits for it) */

/* A test's fault hook (kvf__tier_opts.fault), told the device. */
static int dev_fault(void *ud, int is_write, uint64_t off, uint64_t len)
{
    device *v = ud;
    return v->t->o.fault(v->t->o.fault_ud, v->i, is_write, off, len);
}

/* Whether v is down (never waits: event loops ask); the first to see it logs it. */
int kvf__tier_dev_down(device *v)
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
    device *v = &t->dev[kvf__tier_dev_of(t, key)];
    uint64_t *full =
        kind == W_COPY ? &t->st.write_through_dropped_full : &t->st.demote_dropped_full;
    if (atomic_load(&t->stop) || kvf__tier_dev_down(v)) {
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
            kvf__tier_q_push(&v->wq, w);
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
    return kvf__disk_contains(t->dev[kvf__tier_dev_of(t, key)].d, ns, key, &len);
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

static void run_request(device *v, work *w)
{
    kvf__tier *t = v->t;
    if (w->kind == KVF_TIER_PROMOTE) {
        kvf__tier_promote(v, w->it, w->nidx);
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
    int rc = kvf__tier_dev_down(v) ? KVF_EIO : kvf__disk_put(v->d, w->ns, &w->key, w->data, w->len);
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
        kvf__tier_dev_down(v);
}

/* The calling thread's niceness (--disk-nice): on Linux a thread's own (its id's). Raising it
 * needs no privilege; a failure leaves the thread as it was. */
static void set_nice(const kvf__tier *t)
{
    if (t->o.nice > 0)
        (void)setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), t->o.nice);
}

/* Demotions, removals and clears, in order; the buffered writes are written whenever the queue
 * runs dry (or ANNOUNCE_MAX demotions wait to be told), so that a demoted object is found on disk
 * soon after it left DRAM, and then told as on disk. At close, what is queued is still done. */
static void *writer_main(void *arg)
{
    device *v = arg;
    kvf__tier *t = v->t;
    int dirty = 0;
    set_nice(t);
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
        work *w = kvf__tier_q_pop(&v->wq);
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
                uint64_t t0 = kvf__now_ns();
                kvf__disk_flush(v->d); /* the writes still in flight: the writer's time too */
                double secs = (double)(kvf__now_ns() - t0) / 1e9;
                tell_demoted(v);
                pthread_mutex_lock(&t->mu);
                t->st.write_seconds += secs;
                pthread_mutex_unlock(&t->mu);
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
    set_nice(t);
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
        kvf__tier_q_pop(&v->rq);
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

int kvf__tier_contains(kvf__tier *t, uint64_t ns, const kvf_key *key, uint64_t *len)
{
    return kvf__disk_contains(t->dev[kvf__tier_dev_of(t, key)].d, ns, key, len);
}

void kvf__tier_each(kvf__tier *t, void (*fn)(void *ud, uint64_t ns, const kvf_key *key), void *ud)
{
    for (int i = 0; i < t->n; i++)
        if (!kvf__tier_dev_down(&t->dev[i]))
            kvf__disk_each(t->dev[i].d, fn, ud);
}

int kvf__tier_up(kvf__tier *t)
{
    for (int i = 0; i < t->n; i++)
        if (!kvf__tier_dev_down(&t->dev[i]))
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

const char *kvf__tier_device_note(kvf__tier *t, int i)
{
    return i >= 0 && i < t->n && t->dev[i].d ? kvf__disk_note(t->dev[i].d) : "";
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
        st->written_direct += kvf__disk_direct_puts(t->dev[i].d);
        st->read_direct += kvf__disk_direct_gets(t->dev[i].d);
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
    if (t->o.nice < 0 || t->o.nice > 19)
        t->o.nice = t->o.nice < 0 ? 0 : 19;
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
