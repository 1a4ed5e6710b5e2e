/*
 * The disk tier's requests made into work (tier_int.h, kvf__tier_submit): a request's keys
 * device by device, a promotion's in the order their records lie in the log and dealt to the
 * device's readers, merged with the promotions like it that wait there.
 */
#include "tier_int.h"

#include "kvf/error.h"

#include "clock.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    for (work *w = kvf__tier_q_pop(&v->rq); w; w = kvf__tier_q_pop(&v->rq)) {
        if (!same_kind(w, r)) {
            kvf__tier_q_push(&rest, w);
            continue;
        }
        if (!placed) /* where the first of them waited: none waits longer for it */
            for (int k = 0; k < np; k++) {
                ws[k]->t_ns = t0;
                kvf__tier_q_push(&rest, ws[k]);
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
        count[kvf__tier_dev_of(t, &r->keys[i])]++;
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
            int d = kvf__tier_dev_of(t, &r->keys[i]);
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
        if ((r->kind != KVF_TIER_CLEAR && !count[d]) || kvf__tier_dev_down(&t->dev[d]))
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
                kvf__tier_q_push(promote ? &v->rq : &v->wq, ws[j]);
            pthread_cond_broadcast(promote ? &v->rcv : &v->wcv);
        }
        k = e;
    }
    pthread_mutex_unlock(&t->mu);
    free(its);
    return 0;
}
