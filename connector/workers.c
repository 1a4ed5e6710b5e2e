/*
 * The connector's worker pool and its staging regions.
 *
 * Workers take page tasks (one layer of a range of a transfer's chunks) from the connector's
 * queue: a load's task checks and decodes each chunk's segment in staging and scatters it into
 * the engine's pages, a save's task gathers the pages into staging and hashes the segment. The
 * copies themselves are the page map's (pagemap.c); the outcome of every task is reported through
 * the transfer's task_end, which decides what it means for the transfer.
 *
 * Staging is a pool of KVF__STAGE_SLOTS regions, mapped when first needed, grown on demand and
 * reused across transfers, so that a load, a save and the previous request's save still being
 * stored each find one without mapping (and faulting in) memory on the engine's thread; a
 * transfer that finds every slot busy gets a private mapping.
 */
#include "kvf/connector.h"

#include "kvf/error.h"
#include "kvf/object.h"

#include "clock.h"
#include "hash.h"
#include "connector_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define DEFAULT_STAGING (32u << 20)

typedef struct kvf__task {
    struct kvf__task *next;
    kvf_xfer *x;
    uint32_t layer;
    size_t from, to; /* chunk range [from, to) of the transfer */
} task;

/* ------------------------------------------------------------------------------------------ */
/* Staging */

static void *map_pinned(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    /* Locked where the memlock limit allows: staging must not be paged out under a transfer.
     * Beyond the limit it still works, unlocked. */
    (void)mlock(p, n);
    return p;
}

void kvf__stage_init(kvf_connector *cn, size_t bytes)
{
    if (!bytes)
        return;
    for (int i = 0; i < 2; i++) {
        cn->regions[i].mem = map_pinned(bytes);
        cn->regions[i].cap = cn->regions[i].mem ? bytes : 0;
    }
}

/* The free region to give a transfer of n bytes: the smallest that holds n, else the largest
 * (to be grown), else an unused slot; NULL when every slot is busy. */
static kvf__region *pick_region(kvf_connector *cn, size_t n)
{
    kvf__region *fit = NULL, *big = NULL, *unused = NULL;
    for (int i = 0; i < KVF__STAGE_SLOTS; i++) {
        kvf__region *r = &cn->regions[i];
        if (r->busy)
            continue;
        if (!r->mem) {
            unused = unused ? unused : r;
            continue;
        }
        if (r->cap >= n && (!fit || r->cap < fit->cap))
            fit = r;
        if (!big || r->cap > big->cap)
            big = r;
    }
    return fit ? fit : big ? big : unused;
}

int kvf__stage_acquire(kvf_connector *cn, kvf_xfer *x, size_t n)
{
    pthread_mutex_lock(&cn->mu);
    kvf__region *r = pick_region(cn, n);
    if (r)
        r->busy = 1;
    pthread_mutex_unlock(&cn->mu);
    if (!r) {
        x->stage = map_pinned(n ? n : 1);
        x->region = -1;
        return x->stage ? 0 : KVF_ENOMEM;
    }
    /* A busy region is its holder's alone (pick_region reads no other field of it): it is grown
     * without the connector lock, as mapping and faulting in memory take long. */
    if (r->cap < n) {
        size_t cap = r->cap ? r->cap : DEFAULT_STAGING;
        while (cap < n)
            cap *= 2;
        void *p = map_pinned(cap);
        if (!p) {
            pthread_mutex_lock(&cn->mu);
            r->busy = 0;
            pthread_mutex_unlock(&cn->mu);
            return KVF_ENOMEM;
        }
        if (r->mem)
            munmap(r->mem, r->cap);
        r->mem = p;
        r->cap = cap;
    }
    x->stage = r->mem;
    x->region = (int)(r - cn->regions);
    return 0;
}

void kvf__stage_release_locked(kvf_connector *cn, kvf_xfer *x, size_t n)
{
    if (!x->stage)
        return;
    if (x->region >= 0)
        cn->regions[x->region].busy = 0;
    else
        munmap(x->stage, n ? n : 1);
    x->stage = NULL;
}

void kvf__stage_fini(kvf_connector *cn)
{
    for (int i = 0; i < KVF__STAGE_SLOTS; i++)
        if (cn->regions[i].mem)
            munmap(cn->regions[i].mem, cn->regions[i].cap);
}

/* ------------------------------------------------------------------------------------------ */
/* The task queue */

int kvf__pool_enqueue_locked(kvf_connector *cn, kvf_xfer *x, uint32_t layer)
{
    size_t n = x->n_chunks;
    size_t parts = (size_t)cn->nworkers < n ? (size_t)cn->nworkers : n;
    if (parts == 0)
        parts = 1;
    /* Every task is allocated before any is queued: a layer is queued whole or not at all. */
    task *head = NULL, *last = NULL;
    for (size_t p = 0; p < parts; p++) {
        task *t = malloc(sizeof *t);
        if (!t) {
            while (head) {
                task *next = head->next;
                free(head);
                head = next;
            }
            return KVF_ENOMEM;
        }
        *t = (task){.x = x, .layer = layer, .from = n * p / parts, .to = n * (p + 1) / parts};
        if (last)
            last->next = t;
        else
            head = t;
        last = t;
    }
    pthread_mutex_lock(&x->mu);
    x->pending_tasks += (int)parts;
    x->layer_tasks[layer] += (uint32_t)parts;
    pthread_mutex_unlock(&x->mu);
    if (cn->qt)
        cn->qt->next = head;
    else
        cn->qh = head;
    cn->qt = last;
    pthread_cond_broadcast(&cn->cv);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Workers */

/* An in-place load's chunk c failed at layer: it is not loaded (the transfer's outcome is decided
 * from the layers verified, once its tasks end). */
static void chunk_failed(kvf_xfer *x, size_t c, uint32_t layer)
{
    if (!x->lease)
        return;
    unsigned v = atomic_load(&x->verified[c]);
    while (v > layer && !atomic_compare_exchange_weak(&x->verified[c], &v, layer)) {
    }
}

/* Scatters layer `layer` of chunks [from, to) of a load into the engine's pages. Returns the
 * number of chunks that failed. */
static int do_scatter(kvf_connector *cn, kvf_xfer *x, uint32_t layer, size_t from, size_t to,
                      uint8_t *scratch, uint8_t *scratch2)
{
    int failed = 0;
    uint32_t ppc = cn->pm.pages_per_chunk;
    for (size_t c = from; c < to; c++) {
        if (atomic_load(&x->verified[c]) <= layer) {
            failed++;
            continue;
        }
        /* Straight from the node's view under lease (x->lens[c] bytes, checked to lie in the
         * view), or from staging where the client put it (at most obj_bytes). Nothing is read
         * past either, whatever the header says: a block reused after its lease ended may hold
         * anything. */
        const uint8_t *obj = x->lease ? x->srcs[c] : x->stage + c * cn->obj_bytes;
        uint64_t limit = x->lease ? x->lens[c] : cn->obj_bytes;
        kvf_obj_info info;
        int rc = limit >= cn->hdr_len ? kvf_obj_parse(obj, cn->hdr_len, &info) : KVF_EPROTO;
        if (rc || info.layers != cn->l.layers || info.layout_fp != cn->ks.layout_fp ||
            info.tokens != cn->l.chunk_tokens || info.header_len + info.stored_bytes > limit ||
            (x->lease && !kvf_key_eq(&info.key, &x->keys[c]))) {
            failed++;
            chunk_failed(x, c, layer);
            continue;
        }
        uint64_t off = info.header_len;
        for (uint32_t k = 0; k < layer; k++)
            off += kvf_obj_seg_at(&info, k).stored_len;
        kvf_obj_seg sg = kvf_obj_seg_at(&info, layer);
        if (sg.raw_len != cn->pm.seg_bytes || off + sg.stored_len > limit) {
            failed++;
            chunk_failed(x, c, layer);
            continue;
        }
        const uint8_t *seg = obj + off;
        if (sg.stored_len != sg.raw_len) {
            /* Compressed: decode (verifying both checksums) before touching engine pages. */
            if (kvf_obj_decode_seg(info.codec, &sg, seg, scratch, scratch2) != 0) {
                failed++;
                chunk_failed(x, c, layer);
                continue;
            }
            seg = scratch;
        } else if (x->lease && kvf__xxh3(seg, sg.stored_len) != sg.stored_xxh) {
            /* From the view, the segment is checked where it lies; the lease, checked after the
             * scatter, says it did not change since. */
            failed++;
            chunk_failed(x, c, layer);
            continue;
        }
        kvf__pagemap_scatter(&cn->pm, layer, seg, x->page_ids + c * ppc);
        if (x->lease && !kvf_lease_valid(x->lease)) {
            /* The lease may have ended while the bytes were read: they may be another object's.
             * The engine recomputes what this layer would have given. */
            failed++;
            chunk_failed(x, c, layer);
            continue;
        }
    }
    return failed;
}

/* A save's staging is acquired by the first of its gather tasks, on a worker, so that mapping
 * (and faulting in) a region is never the engine thread's cost; its other tasks wait for it.
 * Returns 0, or the failure to acquire it. */
static int save_stage(kvf_connector *cn, kvf_xfer *x)
{
    pthread_mutex_lock(&x->mu);
    while (x->stage_state == KVF__STAGE_ACQUIRING)
        pthread_cond_wait(&x->cv, &x->mu);
    int mine = x->stage_state == KVF__STAGE_NONE;
    int rc = x->stage_state < 0 ? x->stage_state : 0;
    if (mine)
        x->stage_state = KVF__STAGE_ACQUIRING;
    pthread_mutex_unlock(&x->mu);
    if (!mine)
        return rc;
    rc = kvf__stage_acquire(cn, x, x->n_chunks * cn->obj_bytes);
    pthread_mutex_lock(&x->mu);
    x->stage_state = rc ? rc : KVF__STAGE_HELD;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
    return rc;
}

static void do_gather(kvf_connector *cn, kvf_xfer *x, uint32_t layer, size_t from, size_t to)
{
    uint32_t ppc = cn->pm.pages_per_chunk;
    uint32_t L = cn->l.layers;
    for (size_t c = from; c < to; c++) {
        uint8_t *seg = x->stage + c * cn->obj_bytes + cn->hdr_len + layer * cn->pm.seg_bytes;
        kvf__pagemap_gather(&cn->pm, layer, seg, x->page_ids + c * ppc);
        x->seg_xxh[c * L + layer] = kvf__xxh3(seg, cn->pm.seg_bytes);
    }
}

static void *worker_main(void *arg)
{
    kvf_connector *cn = arg;
    uint8_t *scratch = malloc(cn->seg_bytes), *scratch2 = malloc(cn->seg_bytes);
    for (;;) {
        pthread_mutex_lock(&cn->mu);
        while (!cn->qh && !cn->closing)
            pthread_cond_wait(&cn->cv, &cn->mu);
        if (!cn->qh) {
            pthread_mutex_unlock(&cn->mu);
            break;
        }
        task *t = cn->qh;
        cn->qh = t->next;
        if (!cn->qh)
            cn->qt = NULL;
        pthread_mutex_unlock(&cn->mu);

        kvf_xfer *x = t->x;
        pthread_mutex_lock(&x->mu);
        int skip = x->cancelled;
        pthread_mutex_unlock(&x->mu);
        int failed = 0;
        uint64_t t0 = kvf__now_ns();
        if (!skip) {
            if (x->is_save && save_stage(cn, x) != 0)
                failed = (int)(t->to - t->from);
            else if (x->is_save)
                do_gather(cn, x, t->layer, t->from, t->to);
            else if (!scratch || !scratch2)
                failed = (int)(t->to - t->from);
            else
                failed = do_scatter(cn, x, t->layer, t->from, t->to, scratch, scratch2);
        }
        uint64_t dt = kvf__now_ns() - t0;
        pthread_mutex_lock(&cn->mu);
        if (x->is_save)
            cn->st.gather_ns += dt;
        else
            cn->st.scatter_ns += dt;
        pthread_mutex_unlock(&cn->mu);

        uint32_t layer = t->layer;
        free(t);
        /* The transfer may be freed as soon as this returns: x is not touched after it. */
        x->task_end(x, layer, failed, skip);
    }
    free(scratch);
    free(scratch2);
    return NULL;
}

int kvf__pool_start(kvf_connector *cn, char *err, size_t errlen)
{
    int rc;
    cn->th = calloc((size_t)cn->nworkers, sizeof *cn->th);
    if (!cn->th) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    for (int i = 0; i < cn->nworkers; i++) {
        if (pthread_create(&cn->th[i], NULL, worker_main, cn) != 0) {
            cn->nworkers = i;
            rc = KVF_EAGAIN;
            snprintf(err, errlen, "cannot start worker threads");
            goto out_stop_workers;
        }
    }
    return 0;

out_stop_workers:
    kvf__pool_stop(cn);
    return rc;
}

void kvf__pool_stop(kvf_connector *cn)
{
    pthread_mutex_lock(&cn->mu);
    cn->closing = 1;
    pthread_cond_broadcast(&cn->cv);
    pthread_mutex_unlock(&cn->mu);
    for (int i = 0; i < cn->nworkers; i++)
        pthread_join(cn->th[i], NULL);
    free(cn->th);
    cn->th = NULL;
}
