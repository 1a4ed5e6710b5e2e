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
#include "cucopy.h"
#include "hash.h"
#include "connector_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define DEFAULT_STAGING (32u << 20)
/* CUDA copies are submitted (and, for saves, hashed) in steps of this many bytes, so that the
 * copy engine starts on the first while the next are checked or queued. */
#define CUDA_STEP (2u << 20)

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

/* Page-locks a staging mapping for the copy engine where the pages are CUDA memory. Where the
 * driver refuses, copies still work (through its own staging), slower. */
static int cu_register(kvf_connector *cn, void *p, size_t n)
{
    const kvf__cu *cu = cn->pm.cuda ? kvf__cuda(NULL, 0) : NULL;
    if (!cu || !p)
        return 0;
    int e = cu->HostRegister(p, n, KVF__CU_HOST_REGISTER_PORTABLE | KVF__CU_HOST_REGISTER_MAPPED);
    if (e)
        (void)cu->GetLastError();
    return e == 0;
}

static void cu_unregister(void *p)
{
    const kvf__cu *cu = kvf__cuda(NULL, 0);
    if (cu && cu->HostUnregister(p) != 0)
        (void)cu->GetLastError();
}

static void stage_unmap(void *p, size_t n, int cu_reg)
{
    if (cu_reg)
        cu_unregister(p);
    munmap(p, n);
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
        x->stage_cu_reg = cu_register(cn, x->stage, n ? n : 1);
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
            stage_unmap(r->mem, r->cap, r->cu_reg);
        r->mem = p;
        r->cap = cap;
        r->cu_reg = 0;
    }
    if (cn->pm.cuda && !r->cu_reg)
        r->cu_reg = cu_register(cn, r->mem, r->cap);
    x->stage = r->mem;
    x->region = (int)(r - cn->regions);
    return 0;
}

/* Prefetch memory is kept for the next prefetch rather than unmapped: mapping, locking and
 * faulting in a prefix's worth of memory (64 MiB: tens of milliseconds) cost more than fetching
 * it from a store on the same host, once per prefetch. */
uint8_t *kvf__stage_get_private(kvf_connector *cn, size_t n, size_t *cap, int *cu_reg)
{
    n = n ? n : 1;
    pthread_mutex_lock(&cn->mu);
    kvf__region *fit = NULL;
    for (int i = 0; i < KVF__PF_KEEP; i++) {
        kvf__region *r = &cn->pf_kept[i];
        if (r->mem && r->cap >= n && (!fit || r->cap < fit->cap))
            fit = r;
    }
    if (fit) {
        uint8_t *p = fit->mem;
        *cap = fit->cap;
        *cu_reg = fit->cu_reg;
        *fit = (kvf__region){0};
        cn->st.prefetch_memory_reused++;
        pthread_mutex_unlock(&cn->mu);
        if (!*cu_reg) /* the pages are CUDA memory now, say: registered as a new one would be */
            *cu_reg = cu_register(cn, p, *cap);
        return p;
    }
    pthread_mutex_unlock(&cn->mu);
    uint8_t *p = map_pinned(n);
    *cap = p ? n : 0;
    *cu_reg = p ? cu_register(cn, p, n) : 0;
    return p;
}

void kvf__stage_put_private(kvf_connector *cn, uint8_t *mem, size_t cap, int cu_reg)
{
    if (!mem)
        return;
    pthread_mutex_lock(&cn->mu);
    size_t kept = 0;
    kvf__region *slot = NULL;
    for (int i = 0; i < KVF__PF_KEEP; i++) {
        kept += cn->pf_kept[i].cap;
        if (!cn->pf_kept[i].mem && !slot)
            slot = &cn->pf_kept[i];
    }
    if (slot && kept + cap <= KVF__PF_KEEP_BYTES && !cn->closed) {
        *slot = (kvf__region){.mem = mem, .cap = cap, .cu_reg = cu_reg};
        mem = NULL;
    }
    pthread_mutex_unlock(&cn->mu);
    if (mem)
        stage_unmap(mem, cap, cu_reg);
}

void kvf__stage_release_locked(kvf_connector *cn, kvf_xfer *x, size_t n)
{
    if (!x->stage)
        return;
    if (x->region == KVF__STAGE_BORROWED)
        ; /* the prefetch's: xfer_destroy drops its hold */
    else if (x->region >= 0)
        cn->regions[x->region].busy = 0;
    else
        stage_unmap(x->stage, n ? n : 1, x->stage_cu_reg);
    x->stage = NULL;
}

void kvf__stage_fini(kvf_connector *cn)
{
    for (int i = 0; i < KVF__STAGE_SLOTS; i++)
        if (cn->regions[i].mem)
            stage_unmap(cn->regions[i].mem, cn->regions[i].cap, cn->regions[i].cu_reg);
    for (int i = 0; i < KVF__PF_KEEP; i++)
        if (cn->pf_kept[i].mem)
            stage_unmap(cn->pf_kept[i].mem, cn->pf_kept[i].cap, cn->pf_kept[i].cu_reg);
}

/* ------------------------------------------------------------------------------------------ */
/* The task queue */

int kvf__pool_enqueue_locked(kvf_connector *cn, kvf_xfer *x, uint32_t layer)
{
    /* Once the pool stops, no task is queued: none would run, and its transfer would wait for it
     * for good. */
    if (cn->closing)
        return KVF_ECLOSED;
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

/* A load's chunk c failed at layer: it is not loaded (the transfer's outcome is decided from the
 * layers verified and these marks, once its tasks end). */
void kvf__chunk_failed(kvf_xfer *x, size_t c, uint32_t layer)
{
    unsigned v = atomic_load(&x->bad[c]);
    while ((v == 0 || v > layer + 1) && !atomic_compare_exchange_weak(&x->bad[c], &v, layer + 1)) {
    }
}

/* Records why a task failed: the transfer's layer error (unless one is set) and the connector's
 * last error line. */
static void task_failed(kvf_connector *cn, kvf_xfer *x, uint32_t layer, int rc, const char *why)
{
    pthread_mutex_lock(&cn->mu);
    snprintf(cn->last_err, sizeof cn->last_err, "layer %u: %s", layer, why);
    pthread_mutex_unlock(&cn->mu);
    pthread_mutex_lock(&x->mu);
    if (!x->layer_failed[layer])
        x->layer_failed[layer] = rc;
    pthread_mutex_unlock(&x->mu);
}

/* Layer `layer` of load chunk c, checked: where it lies (staging or the node's view) or, when
 * stored compressed, decoded into scratch. NULL when it cannot be used (the chunk is then marked
 * failed). A raw segment in a node's view is hashed here, unless check_later is given: then
 * *check_later is set to 1 and *later to the checksum that the caller must find in the segment
 * before it reports the chunk loaded. */
static const uint8_t *segment_of(kvf_connector *cn, kvf_xfer *x, size_t c, uint32_t layer,
                                 uint8_t *scratch, uint8_t *scratch2, uint64_t *later,
                                 int *check_later)
{
    if (check_later)
        *check_later = 0;
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
        kvf__chunk_failed(x, c, layer);
        return NULL;
    }
    uint64_t off = info.header_len;
    for (uint32_t k = 0; k < layer; k++)
        off += kvf_obj_seg_at(&info, k).stored_len;
    kvf_obj_seg sg = kvf_obj_seg_at(&info, layer);
    if (sg.raw_len != cn->pm.seg_bytes || off + sg.stored_len > limit) {
        kvf__chunk_failed(x, c, layer);
        return NULL;
    }
    const uint8_t *seg = obj + off;
    if (sg.stored_len != sg.raw_len) {
        /* Compressed: decode (verifying both checksums) before touching engine pages. */
        if (kvf_obj_decode_seg(info.codec, &sg, seg, scratch, scratch2) != 0) {
            kvf__chunk_failed(x, c, layer);
            return NULL;
        }
        seg = scratch;
    } else if (x->lease && cn->trust_local) {
        /* kvf_connector_opts.trust_local_store: the node hashed the segment when it was stored
         * and no client can write its arena; the lease, checked after the copy, says the block
         * still holds this object. */
    } else if (x->lease && check_later) {
        *later = sg.stored_xxh;
        *check_later = 1;
    } else if (x->lease) {
        /* From the view, the segment is checked where it lies; the lease, checked after the
         * scatter, says it did not change since. */
        atomic_fetch_add(&cn->in_place_hashed, sg.stored_len);
        if (kvf__xxh3(seg, sg.stored_len) != sg.stored_xxh) {
            kvf__chunk_failed(x, c, layer);
            return NULL;
        }
    }
    return seg;
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
        const uint8_t *seg = segment_of(cn, x, c, layer, scratch, scratch2, NULL, NULL);
        if (!seg) {
            failed++;
            continue;
        }
        kvf__pagemap_scatter(&cn->pm, layer, seg, x->page_ids + c * ppc);
        if (x->lease && !kvf_lease_valid(x->lease)) {
            /* The lease may have ended while the bytes were read: they may be another object's.
             * The engine recomputes what this layer would have given. */
            failed++;
            kvf__chunk_failed(x, c, layer);
            continue;
        }
    }
    return failed;
}

/* ------------------------------------------------------------------------------------------ */
/* CUDA pages (docs/cuda.md): the worker's copier moves them, on a stream of its own */

/* Registers the arena view of client cl that holds p with CUDA, once, so that the copy engine
 * reads it directly (read-only: the view is mapped so). Where that fails, copies from it still
 * work. */
static int cu_view_ready(kvf_connector *cn, const kvf_client *cl, const void *p)
{
    const uint8_t *b = p;
    int reg = 0;
    pthread_mutex_lock(&cn->cu_mu);
    for (int i = 0; i < cn->n_views; i++) {
        const uint8_t *v = cn->views[i].base;
        if (b >= v && b < v + cn->views[i].len) {
            reg = cn->views[i].reg;
            pthread_mutex_unlock(&cn->cu_mu);
            return reg > 0;
        }
    }
    const void *base;
    size_t len;
    for (size_t node = 0; cn->n_views < KVF__CU_VIEWS; node++) {
        int rc = kvf_client_shm_view(cl, node, &base, &len);
        if (rc == KVF_EINVAL)
            break;
        if (rc || b < (const uint8_t *)base || b >= (const uint8_t *)base + len)
            continue;
        const kvf__cu *cu = kvf__cuda(NULL, 0);
        int e = cu->HostRegister((void *)base, len,
                                 KVF__CU_HOST_REGISTER_PORTABLE | KVF__CU_HOST_REGISTER_MAPPED |
                                     KVF__CU_HOST_REGISTER_READ_ONLY);
        if (e && e != KVF__CU_ERR_HOST_MEMORY_ALREADY_REGISTERED)
            (void)cu->GetLastError();
        reg = e == 0 ? 1 : -1;
        cn->views[cn->n_views++] = (kvf__cuview){base, len, reg, cl};
        break;
    }
    pthread_mutex_unlock(&cn->cu_mu);
    return reg > 0;
}

/* How a transfer of this connector's pages moves: the copy engine for large pages, the kernel
 * for small ones, reading and writing host memory directly where it is registered (mapped). */
static int cu_mode(const kvf_connector *cn, int host_mapped)
{
    if (!kvf__cucopy_rule(cn->pm.page_bytes))
        return KVF__CUCOPY_ENGINE;
    return host_mapped ? KVF__CUCOPY_DIRECT : KVF__CUCOPY_STAGED;
}

/* Whether x's staging is registered with CUDA. */
static int stage_mapped(const kvf_connector *cn, const kvf_xfer *x)
{
    return x->region >= 0 ? cn->regions[x->region].cu_reg : x->stage_cu_reg;
}

void kvf__cuda_views_release_of(kvf_connector *cn, const kvf_client *cl)
{
    pthread_mutex_lock(&cn->cu_mu);
    int kept = 0;
    for (int i = 0; i < cn->n_views; i++) {
        if (cn->views[i].owner != cl)
            cn->views[kept++] = cn->views[i];
        else if (cn->views[i].reg > 0)
            cu_unregister((void *)cn->views[i].base);
    }
    cn->n_views = kept;
    pthread_mutex_unlock(&cn->cu_mu);
}

void kvf__cuda_views_release(kvf_connector *cn)
{
    pthread_mutex_lock(&cn->cu_mu);
    for (int i = 0; i < cn->n_views; i++)
        if (cn->views[i].reg > 0)
            cu_unregister((void *)cn->views[i].base);
    cn->n_views = 0;
    pthread_mutex_unlock(&cn->cu_mu);
}

/* The worker's copier for loads (dir 0) or saves (1), made on first use and remade when the
 * connector's streams change (a registration on another device). */
static kvf__cucopy *worker_copier(kvf_connector *cn, kvf__cucopy *cc, int *ready, int dir,
                                  char *err, size_t errlen)
{
    cc += dir;
    if (ready[dir] && cc->stream == cn->cu_stream[dir] && cc->dev == cn->pm.dev)
        return cc;
    if (ready[dir])
        kvf__cucopy_fini(cc);
    ready[dir] = 0;
    const kvf__cu *cu = kvf__cuda(err, errlen);
    if (!cu || kvf__cucopy_init(cc, cu, cn->pm.dev, cn->cu_stream[dir], err, errlen) != 0)
        return NULL;
    ready[dir] = 1;
    return cc;
}

static void cu_count(kvf_connector *cn, const kvf__cucopy *cc, uint64_t bytes0, uint64_t calls0,
                     uint64_t kernels0)
{
    pthread_mutex_lock(&cn->mu);
    cn->st.cuda_bytes += cc->bytes - bytes0;
    cn->st.cuda_copy_calls += cc->batch_calls - calls0;
    cn->st.cuda_kernels += cc->kernels - kernels0;
    pthread_mutex_unlock(&cn->mu);
}

/* Load: layer `layer` of chunks [from, to) to the device pages. Each segment is checked first (as
 * for host pages) and then queued; the copies run while the next segments are checked. A chunk
 * counts as scattered only once every copy of the task completed (and, read from a node's view,
 * the lease still holds). Returns the number of chunks that failed. */
static int do_scatter_cuda(kvf_connector *cn, kvf_xfer *x, uint32_t layer, size_t from, size_t to,
                           uint8_t *scratch, uint8_t *scratch2, kvf__cucopy *cc)
{
    const kvf__pagemap *pm = &cn->pm;
    uint32_t ppc = pm->pages_per_chunk, np = pm->planes * ppc;
    size_t n = to - from;
    void **pages = malloc(np * sizeof *pages);
    uint8_t *queued = calloc(n, 1);
    /* Segments read in place are hashed while their copies run (below): those checksums. */
    const uint8_t **segs = calloc(n, sizeof *segs);
    uint64_t *want = calloc(n, sizeof *want);
    if (!pages || !queued || !segs || !want) {
        free(pages);
        free(queued);
        free(segs);
        free(want);
        for (size_t c = from; c < to; c++)
            kvf__chunk_failed(x, c, layer);
        return (int)n;
    }
    int failed = 0;
    uint64_t b0 = cc->bytes, k0 = cc->kernels, c0 = cc->batch_calls;
    /* Every source must be registered for the kernel to read it in place. */
    int mapped = 1;
    for (size_t c = from; c < to && mapped; c++)
        mapped = x->lease ? (x->status[c] != 0 ||
                             cu_view_ready(cn, x->cr ? x->cr->cl : NULL, x->srcs[c]))
                          : stage_mapped(cn, x);
    int rc = kvf__cucopy_begin(cc, KVF__CU_H2D, pm->page_bytes, cu_mode(cn, mapped));
    uint64_t step = 0;
    for (size_t c = from; c < to && !rc; c++) {
        if (atomic_load(&x->verified[c]) <= layer) {
            failed++;
            continue;
        }
        int later = 0;
        const uint8_t *seg =
            segment_of(cn, x, c, layer, scratch, scratch2, &want[c - from], &later);
        if (!seg) {
            failed++;
            continue;
        }
        if (later)
            segs[c - from] = seg;
        kvf__pagemap_pages(pm, layer, x->page_ids + c * ppc, pages);
        if (seg == scratch && cc->use_kernel == KVF__CUCOPY_DIRECT) {
            /* Decoded into scratch, which is not registered: the copy engine takes it. */
            int mode = cc->use_kernel;
            cc->use_kernel = KVF__CUCOPY_ENGINE;
            rc = kvf__cucopy_group(cc, (void *)seg, pages, np);
            unsigned m;
            if (!rc)
                rc = kvf__cucopy_mark(cc, &m);
            cc->use_kernel = mode;
        } else {
            rc = kvf__cucopy_group(cc, (void *)seg, pages, np);
        }
        queued[c - from] = 1;
        step += pm->seg_bytes;
        unsigned m;
        if (!rc && seg == scratch) {
            /* Decoded into scratch, which the next chunk reuses: this copy completes first. */
            rc = kvf__cucopy_mark(cc, &m);
            if (!rc)
                rc = kvf__cucopy_wait(cc, m);
            step = 0;
        } else if (!rc && step >= CUDA_STEP) {
            rc = kvf__cucopy_mark(cc, &m);
            step = 0;
        }
    }
    /* The segments read in place are checked while the copy engine (or the kernel) reads them:
     * a chunk whose segment does not match fails, and its layer with it, so the bytes it left in
     * the engine's pages are never reported loaded. */
    for (size_t c = from; c < to && !rc; c++) {
        const uint8_t *seg = segs[c - from];
        if (seg)
            atomic_fetch_add(&cn->in_place_hashed, pm->seg_bytes);
        if (seg && kvf__xxh3(seg, pm->seg_bytes) != want[c - from]) {
            failed++;
            queued[c - from] = 0;
            kvf__chunk_failed(x, c, layer);
        }
    }
    if (!rc)
        rc = kvf__cucopy_end(cc);
    else
        (void)kvf__cucopy_end(cc);
    int lease_lost = !rc && x->lease && !kvf_lease_valid(x->lease);
    if (rc || lease_lost) {
        /* Nothing of a failed task is reported loaded: its queued chunks fail too. */
        for (size_t c = from; c < to; c++) {
            if (queued[c - from]) {
                failed++;
                kvf__chunk_failed(x, c, layer);
            }
        }
        if (rc)
            task_failed(cn, x, layer, rc, cc->errmsg);
        /* Chunks never reached fail as well. */
    }
    if (rc) {
        for (size_t c = from; c < to; c++) {
            if (!queued[c - from] && atomic_load(&x->bad[c]) == 0 &&
                atomic_load(&x->verified[c]) > layer) {
                failed++;
                kvf__chunk_failed(x, c, layer);
            }
        }
    }
    cu_count(cn, cc, b0, c0, k0);
    free(pages);
    free(queued);
    free(segs);
    free(want);
    return failed;
}

/* Save: layer `layer` of chunks [from, to) from the device pages into staging, after the work the
 * engine queued before it reported the layer; each step of segments is hashed as soon as its
 * copies completed, while the next steps are still on the copy engine. Returns 0 or the error. */
static int do_gather_cuda(kvf_connector *cn, kvf_xfer *x, uint32_t layer, size_t from, size_t to,
                          kvf__cucopy *cc)
{
    const kvf__pagemap *pm = &cn->pm;
    uint32_t ppc = pm->pages_per_chunk, np = pm->planes * ppc, L = cn->l.layers;
    void **pages = malloc(np * sizeof *pages);
    if (!pages) {
        task_failed(cn, x, layer, KVF_ENOMEM, "out of memory");
        return KVF_ENOMEM;
    }
    uint64_t b0 = cc->bytes, k0 = cc->kernels, c0 = cc->batch_calls;
    int rc = kvf__cucopy_begin(cc, KVF__CU_D2H, pm->page_bytes, cu_mode(cn, stage_mapped(cn, x)));
    if (!rc && x->cu_ev && x->cu_ev[layer])
        rc = kvf__cucopy_after(cc, x->cu_ev[layer]);
    /* Steps of at least CUDA_STEP bytes, and few enough that every mark stays live. */
    size_t per = CUDA_STEP / pm->seg_bytes + 1;
    size_t steps_max = KVF__CUCOPY_MARKS / 2;
    if ((to - from + per - 1) / per > steps_max)
        per = (to - from + steps_max - 1) / steps_max;
    size_t done = from; /* chunks hashed */
    unsigned marks[KVF__CUCOPY_MARKS];
    size_t ends[KVF__CUCOPY_MARKS];
    unsigned n_marks = 0;
    for (size_t c = from; c < to && !rc; c++) {
        uint8_t *seg = x->stage + c * cn->obj_bytes + cn->hdr_len + layer * pm->seg_bytes;
        kvf__pagemap_pages(pm, layer, x->page_ids + c * ppc, pages);
        rc = kvf__cucopy_group(cc, seg, pages, np);
        if (!rc && ((c - from + 1) % per == 0 || c + 1 == to)) {
            rc = kvf__cucopy_mark(cc, &marks[n_marks]);
            ends[n_marks++] = c + 1;
        }
    }
    for (unsigned i = 0; i < n_marks && !rc; i++) {
        rc = kvf__cucopy_wait(cc, marks[i]);
        for (; !rc && done < ends[i]; done++) {
            uint8_t *seg = x->stage + done * cn->obj_bytes + cn->hdr_len + layer * pm->seg_bytes;
            x->seg_xxh[done * L + layer] = kvf__xxh3(seg, pm->seg_bytes);
        }
    }
    if (rc)
        (void)kvf__cucopy_end(cc);
    else
        rc = kvf__cucopy_end(cc);
    if (rc)
        task_failed(cn, x, layer, rc, cc->errmsg);
    cu_count(cn, cc, b0, c0, k0);
    free(pages);
    return rc;
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
    kvf__cucopy cc[2]; /* loads, saves */
    int cc_ready[2] = {0, 0};
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
        kvf__cucopy *cp = NULL;
        char why[240];
        if (!skip && cn->pm.cuda &&
            !(cp = worker_copier(cn, cc, cc_ready, x->is_save, why, sizeof why))) {
            /* No copier (no stream on the device): the task fails, the engine recomputes. */
            failed = (int)(t->to - t->from);
            task_failed(cn, x, t->layer, KVF_EIO, why);
            for (size_t c = t->from; !x->is_save && c < t->to; c++)
                kvf__chunk_failed(x, c, t->layer);
        } else if (!skip) {
            if (x->is_save && save_stage(cn, x) != 0)
                failed = (int)(t->to - t->from);
            else if (x->is_save && cp)
                failed = do_gather_cuda(cn, x, t->layer, t->from, t->to, cp) ? 1 : 0;
            else if (x->is_save)
                do_gather(cn, x, t->layer, t->from, t->to);
            else if (!scratch || !scratch2)
                failed = (int)(t->to - t->from);
            else if (cp)
                failed = do_scatter_cuda(cn, x, t->layer, t->from, t->to, scratch, scratch2, cp);
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
    for (int i = 0; i < 2; i++)
        if (cc_ready[i])
            kvf__cucopy_fini(&cc[i]);
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

int kvf__pool_grow(kvf_connector *cn, int n)
{
    if (n <= cn->nworkers)
        return 0;
    pthread_t *th = realloc(cn->th, (size_t)n * sizeof *th);
    if (!th)
        return KVF_ENOMEM;
    cn->th = th;
    /* Under the connector lock: the queue splits layers by nworkers. */
    pthread_mutex_lock(&cn->mu);
    while (cn->nworkers < n && pthread_create(&cn->th[cn->nworkers], NULL, worker_main, cn) == 0)
        cn->nworkers++;
    pthread_mutex_unlock(&cn->mu);
    return 0;
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
