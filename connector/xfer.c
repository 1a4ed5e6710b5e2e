/*
 * The connector's transfers (include/kvf/connector.h): loads and saves of a sequence's chunks,
 * their per-layer waits and cancel, and the storage client's callbacks (on its I/O thread) that
 * report a layer verified or a batch done. A transfer is done when its client op has completed
 * (or none is needed) and the pool has reported its last task through task_end; a layer that
 * never arrived then fails with the transfer's error. The handle is in connector.c, the worker
 * pool and staging in workers.c, the threads and the lock order in connector_int.h.
 */
#include "kvf/connector.h"

#include "kvf/error.h"
#include "kvf/object.h"

#include "clock.h"
#include "cu.h"
#include "connector_int.h"
#include "metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LS_PENDING = 1 }; /* layer state: 1 pending, 0 ready, < 0 failed with that code */

/* ------------------------------------------------------------------------------------------ */
/* Completion bookkeeping */

/* A load's outcome, once its last task ended: chunks that did not arrive whole, or whose scatter
 * failed (the workers marked them bad), are not loaded, and the first of them is the result.
 * x->mu held. */
static void finish_load_locked(kvf_xfer *x)
{
    uint32_t L = x->cn->l.layers;
    size_t lead = 0;
    int first_err = x->result;
    for (size_t c = 0; c < x->n_chunks; c++) {
        int ok =
            x->status[c] == 0 && atomic_load(&x->verified[c]) == L && atomic_load(&x->bad[c]) == 0;
        if (ok && lead == c)
            lead++;
        if (!ok && !first_err)
            first_err = x->status[c] ? x->status[c] : KVF_ECHECKSUM;
    }
    x->result = first_err;
    x->loaded_tokens = (x->first_chunk + lead) * x->cn->l.chunk_tokens;
}

/* Called with x->mu held whenever a task ends or the transfer completes. */
static void maybe_done_locked(kvf_xfer *x)
{
    if (x->done || !x->transfer_done || x->pending_tasks)
        return;
    /* A save ends once every layer was reported (gathered, or refused after a failure), or when
     * it is cancelled: its put in parts may be over before (every chunk stored already, or
     * failed), and the engine's later reports must still find it. */
    if (x->is_save && x->n_chunks && x->layers_done < x->cn->l.layers && !x->cancelled)
        return;
    if (!x->is_save)
        finish_load_locked(x);
    /* Layers that never arrived fail with the transfer's error. */
    uint32_t L = x->cn->l.layers;
    for (uint32_t l = 0; l < L; l++)
        if (x->layer_state[l] == LS_PENDING)
            x->layer_state[l] = x->result ? x->result : KVF_EIO;
    x->done = 1;
    kvf__series *mx = x->cn->m_xfer[x->is_save];
    if (mx && !x->result && !x->cancelled && x->n_chunks)
        kvf__series_observe(mx, (double)(kvf__now_ns() - x->t_start) / 1e9);
    pthread_cond_broadcast(&x->cv);
}

static void on_save_done(kvf_op *op, int status, void *ud);

/* Every layer gathered: writes every chunk's header (the checksums of its segments). */
static void seal_headers(kvf_connector *cn, kvf_xfer *x)
{
    uint32_t L = cn->l.layers;
    for (size_t c = 0; c < x->n_chunks; c++)
        kvf_obj_seal_raw(x->stage + c * cn->obj_bytes, &x->keys[c], cn->ks.layout_fp,
                         cn->l.chunk_tokens, L, cn->pm.seg_bytes, x->seg_xxh + c * L);
}

/* The save's batch: every chunk's object in the staging, whole. */
static kvf_batch save_batch(kvf_connector *cn, kvf_xfer *x)
{
    for (size_t c = 0; c < x->n_chunks; c++) {
        x->bufs[c] = x->stage + c * cn->obj_bytes;
        x->lens[c] = cn->obj_bytes;
    }
    return (kvf_batch){
        .n = x->n_chunks,
        .keys = x->keys,
        .objs = (const void *const *)x->bufs,
        .lens = x->lens,
        .status = x->status,
        .deadline_ms = cn->deadline_ms,
        .cb = on_save_done,
        .ud = x,
    };
}

/* All layers gathered: seal every chunk's header and put the batch. */
static void submit_save(kvf_connector *cn, kvf_xfer *x)
{
    seal_headers(cn, x);
    kvf_batch b = save_batch(cn, x);
    pthread_mutex_lock(&cn->mu);
    cn->st.batches++;
    pthread_mutex_unlock(&cn->mu);
    kvf_op *op = NULL;
    int rc = kvf_client_put_async(x->cr ? x->cr->cl : NULL, &b, &op);
    pthread_mutex_lock(&x->mu);
    x->op = op;
    if (rc) {
        x->result = rc;
        x->transfer_done = 1;
        maybe_done_locked(x);
    }
    /* A cancel or a free waiting for the decision to be carried out goes on now: the put is in
     * flight (x->op, which a cancel no longer withdraws) or failed. */
    x->submitting = 0;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

/* What a save in parts has to say to its op after x changed (x->mu held): the bytes of every
 * object that are final now (the layers gathered from the first on, in order), or that it is to
 * be sealed (every layer gathered) or aborted (a layer failed, or the save was cancelled). */
enum { PARTS_NONE, PARTS_READY, PARTS_SEAL, PARTS_ABORT };
static int parts_due_locked(kvf_xfer *x, uint64_t *upto)
{
    kvf_connector *cn = x->cn;
    if (x->parts != 2)
        return PARTS_NONE;
    if (x->cancelled || x->result)
        return PARTS_ABORT;
    if (x->layers_done == cn->l.layers)
        return PARTS_SEAL;
    uint32_t front = 0;
    while (front < cn->l.layers && x->layer_state[front] == 0)
        front++;
    *upto = cn->hdr_len + (uint64_t)front * cn->pm.seg_bytes;
    return PARTS_READY;
}

/* Says it to op, with no lock held (x->saying counted by the caller under x->mu, so that neither
 * x nor op is freed meanwhile: a cancel and a free may come as soon as the lock is let go). */
static void parts_say(kvf_xfer *x, kvf_op *op, int due, uint64_t upto)
{
    if (due == PARTS_READY)
        kvf_op_put_ready(op, upto);
    else if (due == PARTS_SEAL) {
        seal_headers(x->cn, x);
        kvf_op_put_seal(op);
    } else if (due == PARTS_ABORT)
        kvf_op_put_abort(op);
    pthread_mutex_lock(&x->mu);
    if (--x->saying == 0)
        pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

/* Whether a save through cl goes in parts: over TCP yes; over shared memory as save_parts_shm
 * says (0: where cl's parts spread over two I/O threads or more). */
static int parts_here(const kvf_connector *cn, kvf_client *cl)
{
    if (strcmp(kvf_client_transport(cl, NULL, 0), "shm") != 0)
        return 1;
    return cn->save_parts_shm > 0 || (cn->save_parts_shm == 0 && kvf_client_io_threads(cl) >= 2);
}

/* Starts x's put in parts (x->parts 1, x->submitting set by the caller), with no lock held: its
 * keys are admitted now and its layers follow as they are gathered. Where the storage client
 * cannot (KVF_ENOTSUP: RDMA, a node that takes no parts), fails to, or runs over shared memory
 * where save_parts_shm says whole (kvf_connector_opts), the batch is put whole once every layer
 * is gathered, here if they already are. */
static void start_parts(kvf_connector *cn, kvf_xfer *x)
{
    kvf_batch b = save_batch(cn, x);
    b.deadline_ms = 4 * cn->deadline_ms; /* it runs beside the engine's pass, not after it */
    kvf_op *op = NULL;
    kvf_client *cl = x->cr ? x->cr->cl : NULL;
    int rc = KVF_ENOTSUP;
    if (cl && parts_here(cn, cl))
        rc = kvf_client_put_parts(cl, &b, cn->hdr_len, &op);
    if (rc == 0) {
        pthread_mutex_lock(&cn->mu);
        cn->st.batches++;
        cn->st.saves_in_parts++;
        pthread_mutex_unlock(&cn->mu);
    }
    pthread_mutex_lock(&x->mu);
    x->parts = rc ? -1 : 2;
    x->op = op;
    uint64_t upto = 0;
    int due = parts_due_locked(x, &upto);
    /* Put whole instead: every layer is in already and nothing failed (the decision task_end
     * left to this start). */
    int whole = rc && x->layers_done == cn->l.layers && !x->result && !x->cancelled;
    if (rc && !whole && x->layers_done == cn->l.layers) {
        x->transfer_done = 1; /* failed or cancelled, and no op to wait for */
        if (!x->result)
            x->result = x->cancelled ? KVF_ECANCELED : rc;
        maybe_done_locked(x);
    }
    x->submitting = whole;
    int say = !whole && op;
    x->saying += say;
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
    if (whole)
        submit_save(cn, x);
    else if (say)
        parts_say(x, op, due, upto);
}

/* The pool's report that one of x's tasks ended (x->task_end). When the last task of a layer ends,
 * the layer's state is decided and its waiters woken; when a save's first layer is gathered, its
 * put in parts starts, and as its layers are gathered they are said final to it; when its last
 * one is, the batch is sealed (or put whole). */
static void task_end(kvf_xfer *x, uint32_t layer, int failed, int skipped)
{
    kvf_connector *cn = x->cn;
    int submit = 0, start = 0, due = PARTS_NONE;
    uint64_t upto = 0;
    pthread_mutex_lock(&x->mu);
    if (failed && !x->layer_failed[layer])
        x->layer_failed[layer] = x->is_save ? x->stage_state : KVF_ECHECKSUM;
    if (--x->layer_tasks[layer] == 0 && !skipped) {
        kvf__series *ml = cn->m_layer[x->is_save];
        if (ml && !failed && !x->layer_failed[layer])
            kvf__series_observe(
                ml, (double)(kvf__now_ns() -
                             (x->is_save && x->layer_t[layer] ? x->layer_t[layer] : x->t_start)) /
                        1e9);
        if (x->is_save) {
            x->layer_state[layer] = x->layer_failed[layer];
            if (x->layer_failed[layer] && !x->result)
                x->result = x->layer_failed[layer];
            if (++x->layers_done == cn->l.layers && !x->cancelled && x->parts <= 0) {
                /* A layer that could not be gathered fails the save: nothing is put. */
                submit = !x->result;
                x->transfer_done = x->result != 0;
                x->submitting = submit; /* until submit_save() has set x->op */
            } else if (x->parts == 0 && !x->cancelled && !x->result && x->stage &&
                       !cn->save_whole && x->paced) {
                /* A layer gathered, and the engine reported another after the first was
                 * gathered: it computes them over time, and the put in parts begins. A save
                 * whose layers were all reported before one was gathered (after the pass, at
                 * once) is put whole: nothing is left to overlap, and over shared memory a
                 * whole put (the staging regions, the client's workers side by side) is
                 * faster than parts on one socket. */
                start = 1;
                x->parts = 1;
                x->submitting = 1; /* until start_parts() has set x->op */
            }
            due = parts_due_locked(x, &upto);
        } else {
            /* A chunk that did not arrive makes the layer unusable as a whole. */
            int bad = x->layer_failed[layer];
            for (size_t c = 0; !bad && c < x->n_chunks; c++)
                if (atomic_load(&x->verified[c]) <= layer)
                    bad = x->status[c] ? x->status[c] : KVF_ENOENT;
            x->layer_state[layer] = bad;
        }
        pthread_cond_broadcast(&x->cv);
    }
    /* kvf_xfer_cancel() waits for the last task to end, skipped ones too. */
    if (--x->pending_tasks == 0)
        pthread_cond_broadcast(&x->cv);
    if (x->is_save && x->cancelled && !x->op && !x->transfer_done && !x->pending_tasks &&
        x->parts != 1) {
        x->result = KVF_ECANCELED;
        x->transfer_done = 1;
    }
    maybe_done_locked(x);
    kvf_op *op = x->op;
    int say = !submit && !start && due != PARTS_NONE;
    x->saying += say;
    pthread_mutex_unlock(&x->mu);
    if (submit)
        submit_save(cn, x);
    else if (start)
        start_parts(cn, x);
    else if (say)
        parts_say(x, op, due, upto);
}

/* ------------------------------------------------------------------------------------------ */
/* Client callbacks (on the client's I/O thread) */

static void on_load_layer(kvf_op *op, uint32_t layer, void *ud)
{
    (void)op;
    kvf_xfer *x = ud;
    kvf_connector *cn = x->cn;
    if (layer >= cn->l.layers)
        return;
    for (size_t c = 0; c < x->n_chunks; c++)
        if (x->status[c] == 0)
            atomic_store(&x->verified[c], layer + 1);
    pthread_mutex_lock(&cn->mu);
    int rc = kvf__pool_enqueue_locked(cn, x, layer);
    pthread_mutex_unlock(&cn->mu);
    if (rc) {
        /* No memory for the layer's work, or the connector closed: the layer fails, and no chunk
         * counts as loaded from it on (its pages were never written), the engine recomputes. */
        for (size_t c = 0; c < x->n_chunks; c++)
            kvf__chunk_failed(x, c, layer);
        pthread_mutex_lock(&x->mu);
        x->layer_state[layer] = rc;
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);
    }
}

/* The storage client finished x's batch: record the outcome and complete x once its page work is
 * done too. */
static void transfer_finished(kvf_xfer *x, int result, size_t loaded_tokens)
{
    pthread_mutex_lock(&x->mu);
    if (!x->is_save || !x->result) /* a save in parts keeps the layer failure that aborted it */
        x->result = result;
    x->loaded_tokens = loaded_tokens;
    x->transfer_done = 1;
    maybe_done_locked(x);
    pthread_mutex_unlock(&x->mu);
}

static void on_load_done(kvf_op *op, int status, void *ud)
{
    (void)op;
    kvf_xfer *x = ud;
    kvf_connector *cn = x->cn;
    size_t ok = 0, lead = 0, missed = 0;
    int first_err = status;
    for (size_t c = 0; c < x->n_chunks; c++) {
        if (x->status[c] == 0 && atomic_load(&x->verified[c]) == cn->l.layers) {
            ok++;
            if (lead == c)
                lead++;
        } else {
            missed++;
            if (!first_err)
                first_err = x->status[c] ? x->status[c] : KVF_ECHECKSUM;
        }
    }
    pthread_mutex_lock(&cn->mu);
    cn->st.chunks_loaded += ok;
    cn->st.chunks_missed += missed;
    cn->st.load_bytes += ok * cn->obj_bytes;
    pthread_mutex_unlock(&cn->mu);
    transfer_finished(x, first_err, (x->first_chunk + lead) * cn->l.chunk_tokens);
}

static void on_save_done(kvf_op *op, int status, void *ud)
{
    (void)op;
    kvf_xfer *x = ud;
    kvf_connector *cn = x->cn;
    size_t saved = 0, existing = 0;
    int first_err = status;
    for (size_t c = 0; c < x->n_chunks; c++) {
        if (x->status[c] == 0)
            saved++;
        else if (x->status[c] == KVF_EEXIST)
            existing++;
        else if (!first_err)
            first_err = x->status[c];
    }
    pthread_mutex_lock(&cn->mu);
    cn->st.chunks_saved += saved;
    cn->st.chunks_existing += existing;
    cn->st.save_bytes += saved * cn->obj_bytes;
    pthread_mutex_unlock(&cn->mu);
    transfer_finished(x, first_err, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Transfers */

static void xfer_destroy(kvf_xfer *x)
{
    kvf_connector *cn = x->cn;
    uint32_t layers = cn->l.layers;
    kvf_op_free(&x->op);
    if (x->lease) { /* every task that read through it has ended; never during the clients' close */
        pthread_rwlock_rdlock(&cn->lease_rw);
        kvf_lease_release(&x->lease);
        pthread_rwlock_unlock(&cn->lease_rw);
    }
    free(x->srcs);
    pthread_mutex_lock(&cn->mu);
    kvf__stage_release_locked(cn, x, x->n_chunks * cn->obj_bytes);
    kvf__clref_drop_locked(cn, x->cr);
    int last = --cn->inflight == 0 && cn->closed;
    pthread_mutex_unlock(&cn->mu);
    if (x->pf) /* every task that read its memory has ended */
        kvf__prefetch_drop(x->pf);
    if (last) /* nothing of cn is read below */
        kvf__connector_free(cn);
    free(x->keys);
    free(x->nodes);
    free(x->page_ids);
    free(x->bufs);
    free(x->caps);
    free(x->lens);
    free(x->status);
    free(x->verified);
    free(x->bad);
    free(x->seg_xxh);
    if (x->cu_ev) {
        const kvf__cu *cu = kvf__cuda(NULL, 0);
        for (uint32_t l = 0; cu && l < layers; l++)
            if (x->cu_ev[l])
                cu->EventDestroy(x->cu_ev[l]);
        free(x->cu_ev);
    }
    free(x->layer_state);
    free(x->layer_t);
    free(x->layer_tasks);
    free(x->layer_failed);
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->cv);
    free(x);
}

/* Allocates a transfer of `moved` chunks out of a sequence of `total`, every layer pending; NULL
 * when out of memory. */
static kvf_xfer *xfer_alloc(kvf_connector *cn, size_t total, size_t moved, size_t first_chunk,
                            int is_save)
{
    uint32_t L = cn->l.layers;
    kvf_xfer *x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->cn = cn;
    x->cr = kvf__clref_hold(cn); /* NULL once closed: the transfer then fails to start */
    x->is_save = is_save;
    x->n_chunks = moved;
    x->first_chunk = first_chunk;
    x->region = -1;
    x->task_end = task_end;
    pthread_mutex_init(&x->mu, NULL);
    pthread_cond_init(&x->cv, NULL);
    size_t m = moved ? moved : 1;
    x->keys = calloc(total ? total : 1, sizeof *x->keys);
    x->page_ids = malloc(m * cn->pm.pages_per_chunk * sizeof *x->page_ids);
    x->bufs = calloc(m, sizeof *x->bufs);
    x->caps = calloc(m, sizeof *x->caps);
    x->lens = calloc(m, sizeof *x->lens);
    x->status = calloc(m, sizeof *x->status);
    x->verified = calloc(m, sizeof *x->verified);
    x->bad = is_save ? NULL : calloc(m, sizeof *x->bad);
    x->seg_xxh = is_save ? calloc(m * L, sizeof *x->seg_xxh) : NULL;
    x->layer_state = malloc(L * sizeof *x->layer_state);
    x->layer_tasks = calloc(L, sizeof *x->layer_tasks);
    x->layer_failed = calloc(L, sizeof *x->layer_failed);
    x->layer_t = is_save ? calloc(L, sizeof *x->layer_t) : NULL;
    x->t_start = kvf__now_ns();
    if ((is_save && !x->layer_t) || !x->keys || !x->page_ids || !x->bufs || !x->caps || !x->lens ||
        !x->status || !x->verified || (!is_save && !x->bad) || (is_save && !x->seg_xxh) ||
        !x->layer_state || !x->layer_tasks || !x->layer_failed) {
        /* xfer_destroy counts the transfer out of cn->inflight: count it in first. */
        pthread_mutex_lock(&cn->mu);
        cn->inflight++;
        pthread_mutex_unlock(&cn->mu);
        xfer_destroy(x);
        return NULL;
    }
    for (uint32_t l = 0; l < L; l++)
        x->layer_state[l] = LS_PENDING;
    return x;
}

/* Common checks and allocation of a load or save of tokens[0..n). */
static int xfer_new(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t first_chunk,
                    const uint32_t *page_ids, size_t n_pages, int is_save, kvf_xfer **out)
{
    *out = NULL;
    if (!cn || !tokens || !page_ids)
        return KVF_EINVAL;
    uint32_t C = cn->l.chunk_tokens, P = cn->l.page_tokens;
    if (!cn->registered || n == 0 || n % C != 0 || n_pages != n / P || first_chunk > n / C)
        return KVF_EINVAL;
    for (size_t i = 0; i < n_pages; i++)
        if (page_ids[i] >= cn->pm.num_pages)
            return KVF_ERANGE;
    size_t total = n / C;
    size_t moved = total - first_chunk;
    kvf_xfer *x = xfer_alloc(cn, total, moved, first_chunk, is_save);
    if (!x)
        return KVF_ENOMEM;
    size_t nk;
    kvf_keys_compute(&cn->ks, tokens, n, x->keys, total, &nk, NULL);
    /* Only the moved chunks' keys and pages are kept. */
    memmove(x->keys, x->keys + first_chunk, moved * sizeof *x->keys);
    memcpy(x->page_ids, page_ids + first_chunk * cn->pm.pages_per_chunk,
           moved * cn->pm.pages_per_chunk * sizeof *x->page_ids);
    pthread_mutex_lock(&cn->mu);
    cn->inflight++;
    int rc = cn->closing ? KVF_ECLOSED : 0;
    if (is_save)
        cn->st.saves++;
    else
        cn->st.loads++;
    pthread_mutex_unlock(&cn->mu);
    /* A load needs its staging before the GET; a save's is acquired by its first gather task. */
    if (!rc && !is_save)
        rc = kvf__stage_acquire(cn, x, moved * cn->obj_bytes);
    if (rc) {
        xfer_destroy(x);
        return rc;
    }
    for (size_t c = 0; !is_save && c < moved; c++) {
        x->bufs[c] = x->stage + c * cn->obj_bytes;
        x->caps[c] = cn->obj_bytes;
    }
    *out = x;
    return 0;
}

/* Queues every layer of a load whose chunks are all at hand (in a node's view, or in a
 * prefetch's memory) for the workers. Layers that could not be queued fail with the reason;
 * those queued run and end as usual. Returns 0 or that reason. */
static int queue_every_layer(kvf_connector *cn, kvf_xfer *x)
{
    uint32_t L = cn->l.layers;
    int rc = 0;
    pthread_mutex_lock(&cn->mu);
    for (uint32_t l = 0; l < L && !rc; l++)
        rc = kvf__pool_enqueue_locked(cn, x, l);
    pthread_mutex_unlock(&cn->mu);
    if (rc) {
        /* the first layer not queued: no chunk is loaded from it on */
        uint32_t first = 0;
        pthread_mutex_lock(&x->mu);
        while (first < L && x->layer_tasks[first])
            first++;
        pthread_mutex_unlock(&x->mu);
        for (size_t c = 0; first < L && c < x->n_chunks; c++)
            kvf__chunk_failed(x, c, first);
        pthread_mutex_lock(&x->mu);
        for (uint32_t l = 0; l < L; l++)
            if (x->layer_state[l] == LS_PENDING && x->layer_tasks[l] == 0)
                x->layer_state[l] = rc;
        pthread_cond_broadcast(&x->cv);
        pthread_mutex_unlock(&x->mu);
    }
    return rc;
}

/* A load straight from the arena of storage nodes on this host (docs/shm.md): the chunks are
 * leased where they lie and every layer is queued for the workers at once, which scatter from the
 * node's view (each segment checked there, the lease checked after). Returns 0 once x runs so, or
 * KVF_ENOTSUP (or another error) when the client's get must serve it: a node that is not on this
 * host or whose arena this client does not map (a tenant), a lease that could not be had. */
static int load_direct(kvf_connector *cn, kvf_xfer *x)
{
    x->srcs = calloc(x->n_chunks, sizeof *x->srcs);
    if (!x->srcs)
        return KVF_ENOMEM;
    /* The lease covers the load's deadline: the workers' copies end well within it. */
    uint32_t lease_ms = (uint32_t)cn->deadline_ms + 1000u;
    int rc = kvf_client_lease(x->cr ? x->cr->cl : NULL, x->n_chunks, x->keys, lease_ms, x->srcs,
                              x->lens, x->status, &x->lease);
    int lacking = 0;
    for (size_t c = 0; !rc && x->nodes && c < x->n_chunks; c++)
        lacking |= x->status[c] != 0;
    if (lacking) {
        /* A plan names other holders, and a chunk's own node lacks it: the client's get asks
         * the named node (and the own one again) instead. Nothing was read yet. */
        pthread_rwlock_rdlock(&cn->lease_rw);
        kvf_lease_release(&x->lease);
        pthread_rwlock_unlock(&cn->lease_rw);
        for (size_t c = 0; c < x->n_chunks; c++)
            x->status[c] = 0, x->lens[c] = 0;
        rc = KVF_ENOTSUP;
    }
    if (rc) {
        free(x->srcs);
        x->srcs = NULL;
        return rc;
    }
    uint32_t L = cn->l.layers;
    for (size_t c = 0; c < x->n_chunks; c++)
        if (x->status[c] == 0)
            atomic_store(&x->verified[c], L); /* checked segment by segment by the workers */
    pthread_mutex_lock(&cn->mu);
    cn->st.batches++;
    cn->st.loads_in_place++;
    pthread_mutex_unlock(&cn->mu);
    rc = queue_every_layer(cn, x);
    /* Counted as leased; the outcome (result, loaded tokens) is decided once the workers are
     * done (finish_in_place_locked). */
    size_t ok = 0;
    for (size_t c = 0; c < x->n_chunks; c++)
        ok += x->status[c] == 0;
    pthread_mutex_lock(&cn->mu);
    cn->st.chunks_loaded += ok;
    cn->st.chunks_missed += x->n_chunks - ok;
    cn->st.load_bytes += ok * cn->obj_bytes;
    pthread_mutex_unlock(&cn->mu);
    transfer_finished(x, rc, 0);
    return 0;
}

int kvf_connector_load(kvf_connector *cn, const uint32_t *tokens, size_t n,
                       const uint32_t *page_ids, size_t n_pages, kvf_xfer **out)
{
    return kvf_connector_load_from(cn, tokens, n, 0, page_ids, n_pages, out);
}

static int load_start(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t first_chunk,
                      const kvf_source *src, size_t n_src, const uint32_t *page_ids, size_t n_pages,
                      kvf_xfer **out)
{
    kvf_xfer *x;
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    if (n_src && !src)
        return KVF_EINVAL;
    if (cn && kvf__connector_gate(cn, KVF_ACTION_LAYERWISE_LOAD) != 0)
        return KVF_EINFEASIBLE;
    int rc = xfer_new(cn, tokens, n, first_chunk, page_ids, n_pages, 0, &x);
    if (rc)
        return rc;
    if (x->n_chunks == 0) {
        /* Everything is already in the engine's pages: complete at once. */
        pthread_mutex_lock(&x->mu);
        for (uint32_t l = 0; l < cn->l.layers; l++)
            x->layer_state[l] = 0;
        x->transfer_done = 1;
        maybe_done_locked(x);
        pthread_mutex_unlock(&x->mu);
        *out = x;
        return 0;
    }
    /* Each chunk is asked of the node its plan names, where one does; the client asks its own
     * node for one that the named node does not give, before any layer is reported
     * (kvf_batch.nodes): a source is a hint, never a reason for a miss. Where every node is on
     * this host the load reads their arenas in place, unless a chunk's own node lacks it (then
     * the get asks the named one). */
    uint64_t named = 0, unknown = 0;
    if (n_src && kvf__plan_nodes(cn, x->cr ? x->cr->cl : NULL, x->keys, x->n_chunks, x->first_chunk,
                                 src, n_src, &x->nodes, &named, &unknown) != 0) {
        xfer_destroy(x);
        return KVF_ENOMEM;
    }
    if (load_direct(cn, x) == 0) {
        *out = x;
        return 0;
    }
    kvf_batch b = {
        .n = x->n_chunks,
        .keys = x->keys,
        .bufs = x->bufs,
        .caps = x->caps,
        .out_lens = x->lens,
        .status = x->status,
        .flags = KVF_GET_STREAM,
        .deadline_ms = cn->deadline_ms,
        .cb = on_load_done,
        .layer_cb = on_load_layer,
        .ud = x,
        .nodes = x->nodes,
    };
    pthread_mutex_lock(&cn->mu);
    cn->st.batches++;
    cn->st.load_named += named;
    cn->st.load_sources_unknown += unknown;
    pthread_mutex_unlock(&cn->mu);
    rc = kvf_client_get_async(x->cr ? x->cr->cl : NULL, &b, &x->op);
    if (rc) {
        xfer_destroy(x);
        return rc;
    }
    *out = x;
    return 0;
}

int kvf_connector_load_from(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t first_chunk,
                            const uint32_t *page_ids, size_t n_pages, kvf_xfer **out)
{
    return load_start(cn, tokens, n, first_chunk, NULL, 0, page_ids, n_pages, out);
}

int kvf_connector_load_planned(kvf_connector *cn, const uint32_t *tokens, size_t n,
                               size_t first_chunk, const kvf_source *src, size_t n_src,
                               const uint32_t *page_ids, size_t n_pages, kvf_xfer **out)
{
    return load_start(cn, tokens, n, first_chunk, src, n_src, page_ids, n_pages, out);
}

int kvf_connector_load_prefetched(kvf_connector *cn, kvf_prefetch *p, const uint32_t *tokens,
                                  size_t n, const uint32_t *page_ids, size_t n_pages,
                                  kvf_xfer **out)
{
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    if (!cn || !p || p->cn != cn || !tokens || !page_ids)
        return KVF_EINVAL;
    uint32_t C = cn->l.chunk_tokens, P = cn->l.page_tokens;
    if (!cn->registered || n == 0 || n % C != 0 || n_pages != n / P ||
        n > kvf_prefetch_ready_tokens(p))
        return KVF_EINVAL;
    for (size_t i = 0; i < n_pages; i++)
        if (page_ids[i] >= cn->pm.num_pages)
            return KVF_ERANGE;
    if (kvf__connector_gate(cn, KVF_ACTION_LAYERWISE_LOAD) != 0)
        return KVF_EINFEASIBLE;
    size_t nc = n / C, nk;
    kvf_xfer *x = xfer_alloc(cn, nc, nc, 0, 0);
    if (!x)
        return KVF_ENOMEM;
    /* The prompt's own keys: a prefetch of another prompt is refused. */
    kvf_keys_compute(&cn->ks, tokens, n, x->keys, nc, &nk, NULL);
    int same = nk == nc && !memcmp(x->keys, p->keys, nc * sizeof *x->keys);
    pthread_mutex_lock(&cn->mu);
    cn->inflight++; /* xfer_destroy counts it out */
    int rc = !same ? KVF_EINVAL : cn->closing ? KVF_ECLOSED : 0;
    if (!rc) {
        cn->st.loads++;
        cn->st.chunks_loaded += nc;
        cn->st.load_bytes += nc * cn->obj_bytes;
        cn->st.prefetch_chunks_loaded += nc;
    }
    pthread_mutex_unlock(&cn->mu);
    if (rc) {
        xfer_destroy(x);
        return rc;
    }
    /* The chunks arrived whole and verified: the workers scatter from the prefetch's memory,
     * each segment's header and bounds checked there as for staging. */
    memcpy(x->page_ids, page_ids, n_pages * sizeof *x->page_ids);
    kvf__prefetch_hold(p);
    x->pf = p;
    x->stage = p->mem;
    x->region = KVF__STAGE_BORROWED;
    x->stage_cu_reg = p->cu_reg;
    uint32_t L = cn->l.layers;
    for (size_t c = 0; c < nc; c++) {
        x->bufs[c] = p->bufs[c];
        x->lens[c] = p->lens[c];
        atomic_store(&x->verified[c], L);
    }
    rc = queue_every_layer(cn, x);
    transfer_finished(x, rc, 0); /* the outcome is decided once the workers are done */
    *out = x;
    return 0;
}

int kvf_connector_save(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t first_chunk,
                       const uint32_t *page_ids, size_t n_pages, kvf_xfer **out)
{
    kvf_xfer *x;
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    if (cn && kvf__connector_gate(cn, KVF_ACTION_STORE) != 0)
        return KVF_EINFEASIBLE;
    int rc = xfer_new(cn, tokens, n, first_chunk, page_ids, n_pages, 1, &x);
    if (rc)
        return rc;
    if (x->n_chunks == 0) {
        /* Nothing new to save: complete at once; layer_done calls are accepted and ignored. */
        pthread_mutex_lock(&x->mu);
        x->transfer_done = 1;
        for (uint32_t l = 0; l < cn->l.layers; l++)
            x->layer_state[l] = 0;
        maybe_done_locked(x);
        pthread_mutex_unlock(&x->mu);
    }
    *out = x;
    return 0;
}

/* Records, for a save of CUDA pages, the event after the engine's work on `stream` so far, that
 * the layer's copies wait for. 0 or the error (KVF_EINVAL for a layer reported twice). */
static int record_engine_event(kvf_xfer *x, uint32_t layer, void *stream)
{
    kvf_connector *cn = x->cn;
    const kvf__cu *cu = kvf__cuda(NULL, 0);
    if (!cu)
        return KVF_EIO;
    if (!x->cu_ev && !(x->cu_ev = calloc(cn->l.layers, sizeof *x->cu_ev)))
        return KVF_ENOMEM;
    if (x->cu_ev[layer])
        return KVF_EINVAL;
    char why[200];
    int e = cu->SetDevice(cn->pm.dev);
    if (!e)
        e = cu->EventCreateWithFlags(&x->cu_ev[layer], KVF__CU_EVENT_FLAGS);
    if (!e)
        e = cu->EventRecord(x->cu_ev[layer], stream);
    if (!e)
        return 0;
    int rc = kvf__cu_err(cu, e, "layer_done: recording the engine's event", why, sizeof why);
    (void)cu->GetLastError();
    if (x->cu_ev[layer]) {
        cu->EventDestroy(x->cu_ev[layer]);
        x->cu_ev[layer] = NULL;
    }
    pthread_mutex_lock(&cn->mu);
    snprintf(cn->last_err, sizeof cn->last_err, "layer %u: %s", layer, why);
    pthread_mutex_unlock(&cn->mu);
    return rc == KVF_ENOMEM ? rc : KVF_EIO;
}

int kvf_xfer_layer_done(kvf_xfer *x, uint32_t layer)
{
    return kvf_xfer_layer_done_stream(x, layer, NULL);
}

int kvf_xfer_layer_done_stream(kvf_xfer *x, uint32_t layer, void *stream)
{
    if (!x || !x->is_save || layer >= x->cn->l.layers)
        return KVF_EINVAL;
    kvf_connector *cn = x->cn;
    if (x->n_chunks == 0)
        return 0;
    /* The engine's thread reports layers: the event is recorded here, before the layer is
     * queued (the workers read it once they take the layer's tasks). */
    if (cn->pm.cuda) {
        pthread_mutex_lock(&x->mu);
        int twice = x->layer_state[layer] != LS_PENDING || x->layer_tasks[layer] || x->cancelled;
        pthread_mutex_unlock(&x->mu);
        if (!twice) {
            int rc = record_engine_event(x, layer, stream);
            if (rc)
                return rc;
        }
    }
    pthread_mutex_lock(&cn->mu);
    pthread_mutex_lock(&x->mu);
    int rc = 0, failed_before = 0;
    if (cn->closing)
        rc = KVF_ECLOSED; /* below */
    else if (x->cancelled)
        rc = KVF_ECANCELED;
    else if (x->transfer_done && x->result)
        rc = x->result, failed_before = 1; /* its put in parts failed (a node down, say) */
    else if (x->layer_state[layer] != LS_PENDING || x->layer_tasks[layer])
        rc = KVF_EINVAL; /* reported twice */
    else {
        x->layer_t[layer] = kvf__now_ns();
        x->paced |= x->layers_done > 0;
    }
    pthread_mutex_unlock(&x->mu);
    if (!rc)
        rc = kvf__pool_enqueue_locked(cn, x, layer);
    pthread_mutex_unlock(&cn->mu);
    if (rc == KVF_ECLOSED || failed_before) {
        /* The connector closed: the layer is never gathered, so nothing is put; the save ends
         * failed once its layers are reported (layers gathered before are let go with it). Or
         * its put in parts failed already: the layer is counted and refused with that error. */
        pthread_mutex_lock(&x->mu);
        if (x->layer_state[layer] == LS_PENDING && !x->layer_tasks[layer]) {
            x->layer_state[layer] = rc;
            if (!x->result)
                x->result = rc;
            x->layers_done++;
            if (!x->op && !x->transfer_done)
                x->transfer_done = 1;
            else if (x->op && x->parts == 2)
                kvf_op_put_abort(x->op); /* its op completes at once, the save failed */
            maybe_done_locked(x);
            pthread_cond_broadcast(&x->cv);
        }
        pthread_mutex_unlock(&x->mu);
    }
    return rc;
}

/* Adds the time since t0 that the engine waited on x to its connector's wait counter. */
static void note_wait(kvf_xfer *x, uint64_t t0)
{
    uint64_t dt = kvf__now_ns() - t0;
    if (x->cn->m_wait[x->is_save])
        kvf__series_observe(x->cn->m_wait[x->is_save], (double)dt / 1e9);
    pthread_mutex_lock(&x->cn->mu);
    x->cn->st.wait_ns += dt;
    pthread_mutex_unlock(&x->cn->mu);
}

int kvf_xfer_wait_pages(kvf_xfer *x)
{
    if (!x || !x->is_save)
        return KVF_EINVAL;
    uint64_t t0 = kvf__now_ns();
    /* The engine's thread reports layers and waits here, so every task of a reported layer is
     * counted before this looks. */
    pthread_mutex_lock(&x->mu);
    while (x->pending_tasks)
        pthread_cond_wait(&x->cv, &x->mu);
    int rc = x->cancelled ? KVF_ECANCELED : 0;
    pthread_mutex_unlock(&x->mu);
    note_wait(x, t0);
    return rc;
}

int kvf_xfer_wait_layer(kvf_xfer *x, uint32_t layer)
{
    if (!x || x->is_save || layer >= x->cn->l.layers)
        return KVF_EINVAL;
    uint64_t t0 = kvf__now_ns();
    pthread_mutex_lock(&x->mu);
    while (x->layer_state[layer] == LS_PENDING && !x->cancelled)
        pthread_cond_wait(&x->cv, &x->mu);
    int rc = x->cancelled ? KVF_ECANCELED : x->layer_state[layer];
    pthread_mutex_unlock(&x->mu);
    note_wait(x, t0);
    return rc;
}

int kvf_xfer_wait(kvf_xfer *x)
{
    if (!x)
        return KVF_EINVAL;
    uint64_t t0 = kvf__now_ns();
    pthread_mutex_lock(&x->mu);
    while (!x->done)
        pthread_cond_wait(&x->cv, &x->mu);
    int rc = x->cancelled ? KVF_ECANCELED : x->result;
    pthread_mutex_unlock(&x->mu);
    note_wait(x, t0);
    return rc;
}

size_t kvf_xfer_loaded_tokens(const kvf_xfer *x)
{
    return x && !x->is_save ? x->loaded_tokens : 0;
}

void kvf_xfer_cancel(kvf_xfer *x)
{
    if (!x)
        return;
    pthread_mutex_lock(&x->mu);
    x->cancelled = 1;
    /* Queued tasks are skipped; wait for any in progress, so no page is written after this, and
     * for a put being started (its op set), which is then in flight: a save whose every layer was
     * gathered is not withdrawn, it completes (or fails) as it would have. */
    while (x->pending_tasks || x->submitting)
        pthread_cond_wait(&x->cv, &x->mu);
    if (x->is_save && x->op && x->parts == 2 && x->layers_done < x->cn->l.layers)
        kvf_op_put_abort(x->op); /* nothing once sealed: a sealed put completes as it would */
    if (x->is_save && !x->op && !x->transfer_done) {
        x->result = KVF_ECANCELED;
        x->transfer_done = 1;
    }
    maybe_done_locked(x); /* a save whose put ended before its last layer ends now */
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

void kvf_xfer_free(kvf_xfer **xp)
{
    if (!xp || !*xp)
        return;
    kvf_xfer *x = *xp;
    /* A save with a layer its engine never reported is given up: nothing can report it once the
     * save is freed, and a save ends only once every layer was reported or it is cancelled (an
     * engine that stopped at a layer refused with the save's error, say, and frees it). A save
     * whose every layer was reported is waited for: its batch is being put. */
    pthread_mutex_lock(&x->mu);
    int unreported = 0;
    for (uint32_t l = 0; x->is_save && !x->done && !x->cancelled && l < x->cn->l.layers; l++)
        unreported |= x->layer_state[l] == LS_PENDING && !x->layer_tasks[l];
    pthread_mutex_unlock(&x->mu);
    if (unreported)
        kvf_xfer_cancel(x);
    pthread_mutex_lock(&x->mu);
    while (!x->done || x->submitting || x->saying)
        pthread_cond_wait(&x->cv, &x->mu);
    kvf_op *op = x->op;
    pthread_mutex_unlock(&x->mu);
    /* The client op may still be signalling its own completion: wait for that too. */
    if (op)
        kvf_op_wait(op);
    xfer_destroy(x);
    *xp = NULL;
}
