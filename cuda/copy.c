/*
 * The copier (cuda/include/cucopy.h, docs/cuda.md).
 */
#include "cucopy.h"

#include "cukernel.h"

#include "kvf/error.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEFAULT_KERNEL_BELOW (64u << 10)
#define SLOT_BYTES           (8u << 20)
#define MAX_PAIRS            (1u << 16)
#define KERNEL_THREADS       256u
#define KERNEL_MAX_BLOCKS    1024u
#define CALL_ENTRIES         32u
#define CALL_BYTES           (4u << 20)

static size_t kernel_below = DEFAULT_KERNEL_BELOW;
static pthread_once_t rule_once = PTHREAD_ONCE_INIT;

static void rule_read(void)
{
    const char *s = getenv("KVF_CUDA_KERNEL_BELOW");
    if (s && *s) {
        char *end;
        unsigned long long v = strtoull(s, &end, 10);
        if (*end == 0)
            kernel_below = (size_t)v;
    }
}

int kvf__cucopy_rule(size_t page_bytes)
{
    pthread_once(&rule_once, rule_read); /* read once: the rule is asked per transfer */
    return page_bytes < kernel_below;
}

/* Entries per call: CALL_ENTRIES, or $KVF_CUDA_CALL_ENTRIES (1 to 1024) for measurements. */
static size_t call_entries(void)
{
    const char *s = getenv("KVF_CUDA_CALL_ENTRIES");
    long n = s ? atol(s) : 0;
    return n >= 1 && n <= KVF__CUCOPY_BATCH ? (size_t)n : CALL_ENTRIES;
}

/* Records the first failure; returns the transfer's error. */
static int fail(kvf__cucopy *cc, kvf__cuerr e, const char *what)
{
    if (e && !cc->err) {
        cc->err = kvf__cu_err(cc->cu, e, what, cc->errmsg, sizeof cc->errmsg);
        if (e != KVF__CU_ERR_INJECTED)
            (void)cc->cu->GetLastError();
    }
    return cc->err;
}

int kvf__cucopy_init(kvf__cucopy *cc, const kvf__cu *cu, int dev, kvf__custream shared, char *err,
                     size_t errlen)
{
    memset(cc, 0, sizeof *cc);
    cc->cu = cu;
    cc->dev = dev;
    cc->shared = shared != NULL;
    cc->stream = shared;
    cc->call_entries = call_entries();
    int e = cu->SetDevice(dev);
    if (!e && !shared)
        e = cu->StreamCreateWithFlags(&cc->stream, KVF__CU_STREAM_NON_BLOCKING);
    for (unsigned i = 0; !e && i < KVF__CUCOPY_MARKS; i++)
        e = cu->EventCreateWithFlags(&cc->marks[i], KVF__CU_EVENT_FLAGS);
    for (int i = 0; !e && i < 2; i++)
        e = cu->EventCreateWithFlags(&cc->slot[i].ev, KVF__CU_EVENT_FLAGS);
    /* Whether registered host memory is at the same address for the device (the direct kernel
     * reads and writes it there). */
    int same = 0;
    if (!e && cu->DeviceGetAttribute(&same, KVF__CU_ATTR_HOST_PTR_FOR_REGISTERED, dev) != 0) {
        (void)cu->GetLastError();
        same = 0;
    }
    cc->host_ptr_ok = same == 1;
    if (e) {
        int rc = kvf__cu_err(cu, e, "copier streams and events", err, errlen);
        kvf__cucopy_fini(cc);
        return rc;
    }
    return 0;
}

/* Waits for everything this copier queued: a mark after everything submitted so far on its
 * stream, then a wait for it (on a stream of its own, all of the stream's work; on a shared one,
 * its own marks and slots and what others queued before them). A mark, not a stream
 * synchronization, so that the wait sleeps (KVF__CU_EVENT_FLAGS) where the context would spin. */
static void quiesce(kvf__cucopy *cc)
{
    const kvf__cu *cu = cc->cu;
    if (!cc->stream)
        return;
    kvf__cuevent ev = cc->marks[cc->n_marks % KVF__CUCOPY_MARKS];
    if (cu->EventRecord(ev, cc->stream) == 0)
        (void)cu->EventSynchronize(ev);
    for (int i = 0; i < 2; i++)
        cc->slot[i].pending = 0;
    (void)cu->GetLastError();
}

static void slots_free(kvf__cucopy *cc)
{
    for (int i = 0; i < 2; i++) {
        kvf__cuslot *s = &cc->slot[i];
        if (s->pending)
            (void)cc->cu->EventSynchronize(s->ev);
        s->pending = 0;
        if (s->dbuf)
            cc->cu->Free(s->dbuf);
        if (s->pairs)
            cc->cu->FreeHost(s->pairs);
        s->dbuf = NULL;
        s->pairs = NULL;
    }
    cc->slot_bytes = 0;
}

void kvf__cucopy_fini(kvf__cucopy *cc)
{
    const kvf__cu *cu = cc->cu;
    if (!cu)
        return;
    (void)cu->SetDevice(cc->dev);
    /* On a shared stream, kvf__cucopy_end already waited for this copier's work (and the stream
     * may be gone). */
    if (!cc->shared)
        quiesce(cc);
    slots_free(cc);
    for (unsigned i = 0; i < KVF__CUCOPY_MARKS; i++)
        if (cc->marks[i])
            cu->EventDestroy(cc->marks[i]);
    for (int i = 0; i < 2; i++)
        if (cc->slot[i].ev)
            cu->EventDestroy(cc->slot[i].ev);
    if (cc->stream && !cc->shared)
        cu->StreamDestroy(cc->stream);
    (void)cu->GetLastError();
    memset(cc, 0, sizeof *cc);
}

/* The kernel modes' slots: their run lists and, staged (need > 0), device buffers of at least
 * `need` bytes each. The direct mode allocates no device memory: that is the engine's. */
static int slots_alloc(kvf__cucopy *cc, size_t need)
{
    size_t bytes = need == 0 ? 0 : need > SLOT_BYTES ? need : SLOT_BYTES;
    if (cc->slot[0].pairs && cc->slot_bytes >= bytes)
        return 0;
    if (bytes > cc->slot_bytes)
        slots_free(cc); /* waits for what uses them */
    for (int i = 0; i < 2; i++) {
        kvf__cuslot *s = &cc->slot[i];
        int e = 0;
        if (!s->pairs)
            e = cc->cu->HostAlloc((void **)&s->pairs, (size_t)MAX_PAIRS * 2 * sizeof(uint64_t),
                                  KVF__CU_HOST_ALLOC_PORTABLE | KVF__CU_HOST_ALLOC_MAPPED);
        if (!e && bytes && !s->dbuf)
            e = cc->cu->Malloc(&s->dbuf, bytes);
        if (e) {
            slots_free(cc);
            return fail(cc, e, "staging for the page-copy kernel");
        }
        s->used = s->n_pairs = s->n_groups = 0;
    }
    if (bytes)
        cc->slot_bytes = bytes;
    cc->pair_cap = MAX_PAIRS;
    return 0;
}

int kvf__cucopy_begin(kvf__cucopy *cc, kvf__cudir dir, size_t page_bytes, int use_kernel)
{
    const kvf__cu *cu = cc->cu;
    cc->err = 0;
    cc->errmsg[0] = 0;
    cc->n = 0;
    /* What a failed transfer left on its own stream ends before anything new is queued (on a
     * shared stream, kvf__cucopy_end waited for this copier's work). */
    if (!cc->shared)
        quiesce(cc);
    for (int i = 0; i < 2; i++)
        cc->slot[i].pending = 0;
    cc->n_marks = 0;
    int e = cu->SetDevice(cc->dev);
    if (e)
        return fail(cc, e, "cudaSetDevice");
    if (use_kernel && !cc->kernel) {
        char why[200];
        if (kvf__cu_copy_kernel(cu, cc->dev, &cc->kernel, why, sizeof why) != 0)
            use_kernel = KVF__CUCOPY_ENGINE; /* the copy engine does it */
    }
    if (use_kernel == KVF__CUCOPY_DIRECT && !cc->host_ptr_ok)
        use_kernel = KVF__CUCOPY_STAGED;
    cc->dir = dir;
    cc->page_bytes = page_bytes;
    cc->use_kernel = use_kernel;
    cc->cur = 0;
    for (int i = 0; i < 2; i++)
        cc->slot[i].used = cc->slot[i].n_pairs = cc->slot[i].n_groups = 0;
    return 0;
}

int kvf__cucopy_after(kvf__cucopy *cc, kvf__cuevent ev)
{
    if (cc->err)
        return cc->err;
    return fail(cc, cc->cu->StreamWaitEvent(cc->stream, ev, 0), "cudaStreamWaitEvent");
}

/* Submits n entries of dsts/srcs/sizes on the copy engine, in calls of at most CALL_ENTRIES
 * entries and about CALL_BYTES bytes: measured on an H200 (docs/cuda.md), one call of 256 pages
 * of 64 KiB reaches 0.63 of a contiguous copy and calls of 32 reach 0.92; past 4 MiB a call
 * gains nothing. */
static int submit_one(kvf__cucopy *cc, void *const *dsts, const void *const *srcs,
                      const size_t *sizes, size_t n)
{
    const kvf__cu *cu = cc->cu;
    kvf__cuerr e = kvf__cu_fault();
    if (e)
        return fail(cc, e, "page copy");
    kvf__cucpyattr attr = {.src_access_order = KVF__CU_SRC_ACCESS_ORDER_STREAM};
    size_t idx = 0, fail_idx = 0;
    cc->batch_calls++;
    if (cu->MemcpyBatchAsync13)
        return fail(cc, cu->MemcpyBatchAsync13(dsts, srcs, sizes, n, &attr, &idx, 1, cc->stream),
                    "cudaMemcpyBatchAsync");
    if (cu->MemcpyBatchAsync12)
        return fail(
            cc, cu->MemcpyBatchAsync12(dsts, srcs, sizes, n, &attr, &idx, 1, &fail_idx, cc->stream),
            "cudaMemcpyBatchAsync");
    /* Runtimes before 12.8: one call per run. */
    for (size_t i = 0; i < n && !e; i++)
        e = cu->MemcpyAsync(dsts[i], srcs[i], sizes[i], KVF__CU_MEMCPY_DEFAULT, cc->stream);
    return fail(cc, e, "cudaMemcpyAsync");
}

static int submit_batch(kvf__cucopy *cc, void *const *dsts, const void *const *srcs,
                        const size_t *sizes, size_t n)
{
    size_t at = 0, per = cc->call_entries, cap = per * (CALL_BYTES / CALL_ENTRIES);
    while (at < n && !cc->err) {
        size_t k = 0, bytes = 0;
        while (at + k < n && k < per && (k == 0 || bytes < cap))
            bytes += sizes[at + k++];
        cc->bytes += bytes;
        submit_one(cc, dsts + at, srcs + at, sizes + at, k);
        at += k;
    }
    return cc->err;
}

static int flush_batch(kvf__cucopy *cc)
{
    int rc = submit_batch(cc, cc->dsts, cc->srcs, cc->sizes, cc->n);
    cc->n = 0;
    return rc;
}

/* Submits the current slot: host <-> staging copies of its groups and the kernel, in the order
 * of the direction; the slot's event follows them. */
static int flush_slot(kvf__cucopy *cc)
{
    kvf__cuslot *s = &cc->slot[cc->cur];
    if (s->n_groups == 0 || cc->err)
        return cc->err;
    const kvf__cu *cu = cc->cu;
    void *dsts[KVF__CUCOPY_BATCH];
    const void *srcs[KVF__CUCOPY_BATCH];
    for (size_t g = 0; g < s->n_groups; g++) {
        uint8_t *dev = (uint8_t *)s->dbuf + s->off[g];
        dsts[g] = cc->dir == KVF__CU_H2D ? (void *)dev : s->host[g];
        srcs[g] = cc->dir == KVF__CU_H2D ? (const void *)s->host[g] : dev;
    }
    unsigned n = (unsigned)s->n_pairs;
    unsigned long long bytes = cc->page_bytes;
    void *pairs = s->pairs;
    void *args[] = {&pairs, &n, &bytes};
    kvf__cudim3 grid = {n < KERNEL_MAX_BLOCKS ? n : KERNEL_MAX_BLOCKS, 1, 1};
    kvf__cudim3 block = {KERNEL_THREADS, 1, 1};
    int rc = 0;
    int staged = cc->use_kernel == KVF__CUCOPY_STAGED;
    if (!staged)
        cc->bytes += (uint64_t)n * bytes; /* the kernel itself crosses the bus */
    if (staged && cc->dir == KVF__CU_H2D)
        rc = submit_batch(cc, dsts, srcs, s->len, s->n_groups);
    if (!rc) {
        kvf__cuerr e = kvf__cu_fault();
        if (!e)
            e = cu->LaunchKernel((const void *)cc->kernel, grid, block, args, 0, cc->stream);
        cc->kernels++;
        rc = fail(cc, e, "page-copy kernel launch");
    }
    if (!rc && staged && cc->dir == KVF__CU_D2H)
        rc = submit_batch(cc, dsts, srcs, s->len, s->n_groups);
    if (!rc)
        rc = fail(cc, cu->EventRecord(s->ev, cc->stream), "cudaEventRecord");
    s->pending = rc == 0;
    s->used = s->n_pairs = s->n_groups = 0;
    cc->cur ^= 1;
    return rc;
}

/* The slot to fill next, once its previous submission has completed. */
static kvf__cuslot *slot_ready(kvf__cucopy *cc)
{
    kvf__cuslot *s = &cc->slot[cc->cur];
    if (s->pending) {
        s->pending = 0;
        if (fail(cc, cc->cu->EventSynchronize(s->ev), "page-copy kernel"))
            return NULL;
    }
    return s;
}

/* One copy-engine entry: bytes between host and device memory. */
static int engine_run(kvf__cucopy *cc, void *host, void *dev, size_t bytes)
{
    cc->dsts[cc->n] = cc->dir == KVF__CU_H2D ? dev : host;
    cc->srcs[cc->n] = cc->dir == KVF__CU_H2D ? (const void *)host : (const void *)dev;
    cc->sizes[cc->n] = bytes;
    if (++cc->n == KVF__CUCOPY_BATCH)
        return flush_batch(cc);
    return 0;
}

static int kernel_group(kvf__cucopy *cc, void *host, void *const *dev_pages, size_t n_pages);

int kvf__cucopy_group(kvf__cucopy *cc, void *host, void *const *dev_pages, size_t n_pages)
{
    if (cc->err)
        return cc->err;
    size_t pb = cc->page_bytes;
    /* Pages that follow each other in device memory (an engine's consecutive pages, a staging
     * area) are one run, copied by one copy-engine entry; only runs shorter than the kernel
     * rule's size go to the kernel (a single page stays in the transfer's mode). Measured on an
     * H200 (docs/cuda.md): a load of 32 KiB pages through the kernel ran at a third of its speed
     * alone while the model computed, the kernel waiting for the SMs the forward pass held; the
     * copy engine needs none. */
    size_t i = 0;
    while (i < n_pages) {
        size_t r = 1;
        while (i + r < n_pages && (uint8_t *)dev_pages[i + r] == (uint8_t *)dev_pages[i] + r * pb)
            r++;
        uint8_t *h = (uint8_t *)host + i * pb;
        int rc = !cc->use_kernel || (r > 1 && kvf__cucopy_rule(r * pb) == 0)
                     ? engine_run(cc, h, dev_pages[i], r * pb)
                     : kernel_group(cc, h, dev_pages + i, r);
        if (rc)
            return cc->err;
        i += r;
    }
    return 0;
}

/* Pages through the page-copy kernel (the kernel modes). */
static int kernel_group(kvf__cucopy *cc, void *host, void *const *dev_pages, size_t n_pages)
{
    size_t pb = cc->page_bytes;
    size_t gbytes = n_pages * pb;
    if (slots_alloc(cc, cc->use_kernel == KVF__CUCOPY_STAGED ? gbytes : 0))
        return cc->err;
    if (n_pages > cc->pair_cap) {
        /* A group longer than a run list goes in parts. */
        size_t half = n_pages / 2;
        if (kernel_group(cc, host, dev_pages, half))
            return cc->err;
        return kernel_group(cc, (uint8_t *)host + half * pb, dev_pages + half, n_pages - half);
    }
    kvf__cuslot *s = slot_ready(cc);
    if (!s)
        return cc->err;
    int staged = cc->use_kernel == KVF__CUCOPY_STAGED;
    if ((staged && s->used + gbytes > cc->slot_bytes) || s->n_groups == KVF__CUCOPY_BATCH ||
        s->n_pairs + n_pages > cc->pair_cap) {
        if (flush_slot(cc) || !(s = slot_ready(cc)))
            return cc->err;
    }
    size_t g = s->n_groups++;
    s->host[g] = host;
    s->off[g] = s->used;
    s->len[g] = gbytes;
    /* Staged: the run's bytes go through the device buffer; direct: the kernel reads or writes
     * the host memory itself, mapped at the same address. */
    uint8_t *dev = staged ? (uint8_t *)s->dbuf + s->used : (uint8_t *)host;
    for (size_t i = 0; i < n_pages; i++) {
        uint64_t stage = (uint64_t)(uintptr_t)(dev + i * pb);
        uint64_t page = (uint64_t)(uintptr_t)dev_pages[i];
        s->pairs[2 * s->n_pairs] = cc->dir == KVF__CU_H2D ? stage : page;
        s->pairs[2 * s->n_pairs + 1] = cc->dir == KVF__CU_H2D ? page : stage;
        s->n_pairs++;
    }
    s->used += gbytes;
    return 0;
}

static int flush(kvf__cucopy *cc)
{
    /* Runs may wait in both: a kernel transfer sends a run that the kernel cannot reach through
     * the copy engine. */
    if (flush_batch(cc))
        return cc->err;
    return cc->use_kernel ? flush_slot(cc) : 0;
}

int kvf__cucopy_mark(kvf__cucopy *cc, unsigned *mark)
{
    if (flush(cc))
        return cc->err;
    kvf__cuevent ev = cc->marks[cc->n_marks % KVF__CUCOPY_MARKS];
    if (cc->n_marks >= KVF__CUCOPY_MARKS &&
        fail(cc, cc->cu->EventSynchronize(ev), "cudaEventSynchronize"))
        return cc->err;
    if (fail(cc, cc->cu->EventRecord(ev, cc->stream), "cudaEventRecord"))
        return cc->err;
    *mark = cc->n_marks++;
    return 0;
}

int kvf__cucopy_wait(kvf__cucopy *cc, unsigned mark)
{
    if (cc->err)
        return cc->err;
    if (mark >= cc->n_marks || mark + KVF__CUCOPY_MARKS < cc->n_marks)
        return KVF_EINVAL;
    return fail(cc, cc->cu->EventSynchronize(cc->marks[mark % KVF__CUCOPY_MARKS]), "page copies");
}

int kvf__cucopy_end(kvf__cucopy *cc)
{
    unsigned m;
    if (kvf__cucopy_mark(cc, &m) == 0)
        (void)kvf__cucopy_wait(cc, m);
    if (cc->err)
        quiesce(cc); /* nothing of this transfer still runs after a failure */
    for (int i = 0; i < 2; i++)
        cc->slot[i].pending = 0;
    return cc->err;
}
