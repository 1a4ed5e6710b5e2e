/*
 * Prefetches (include/kvf/connector.h, docs/connector.md "Prefetch with deadlines"): the chunks
 * of a request's cached prefix fetched from the storage nodes while the request waits for its
 * turn, into memory of the prefetch's own, so that at its turn the engine scatters what arrived
 * by its deadline (kvf_connector_load_prefetched, in xfer.c) and computes the rest.
 *
 * The chunks are fetched in groups, each a GET of its own, all submitted at once: a group's
 * objects are whole and verified when its GET completes, so that what has arrived by a deadline
 * is known chunk by chunk (a single streamed GET reports layers of every chunk, which a deadline
 * could cut anywhere). A prefetch is held by its caller, by each group still in flight and by
 * each load reading its memory; the last hold dropped frees it, on the storage client's thread
 * when that is a group's completion (never the connector with it: a connector is only freed once
 * its client is closed, and then no completion runs any more).
 */
#include "kvf/connector.h"

#include "kvf/error.h"

#include "clock.h"
#include "connector_int.h"

#include <stdlib.h>
#include <string.h>

/* At most this many groups: enough for a deadline to cut a long prefix finely, few enough that
 * each GET is a large batch. */
#define MAX_GROUPS 8

struct kvf__pgroup {
    kvf_prefetch *p;
    size_t first, n; /* chunks [first, first + n) */
    int done;
};

/* Frees p's memory and p itself (whatever of them was allocated). */
static void prefetch_release(kvf_prefetch *p)
{
    kvf__stage_unmap_private(p->mem, p->mem_len, p->cu_reg);
    free(p->keys);
    free(p->bufs);
    free(p->caps);
    free(p->lens);
    free(p->status);
    free(p->groups);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}

static void prefetch_destroy(kvf_prefetch *p)
{
    kvf_connector *cn = p->cn;
    kvf__clref *cr = p->cr;
    prefetch_release(p);
    /* Counted as a transfer in flight, so that a closed connector outlives it. */
    pthread_mutex_lock(&cn->mu);
    kvf__clref_drop_locked(cn, cr);
    int last = --cn->inflight == 0 && cn->closed;
    pthread_mutex_unlock(&cn->mu);
    if (last)
        kvf__connector_free(cn);
}

void kvf__prefetch_hold(kvf_prefetch *p)
{
    pthread_mutex_lock(&p->mu);
    p->refs++;
    pthread_mutex_unlock(&p->mu);
}

void kvf__prefetch_drop(kvf_prefetch *p)
{
    pthread_mutex_lock(&p->mu);
    int last = --p->refs == 0;
    pthread_mutex_unlock(&p->mu);
    if (last)
        prefetch_destroy(p);
}

/* A group's GET completed (on the storage client's I/O thread): its chunks' statuses are final. */
static void on_group_done(kvf_op *op, int status, void *ud)
{
    (void)status; /* per chunk in p->status */
    struct kvf__pgroup *g = ud;
    kvf_prefetch *p = g->p;
    kvf_connector *cn = p->cn;
    size_t ok = 0;
    for (size_t c = g->first; c < g->first + g->n; c++)
        ok += p->status[c] == 0;
    kvf_op_free(&op); /* allowed inside its own callback */
    pthread_mutex_lock(&cn->mu);
    cn->st.prefetch_chunks += ok;
    pthread_mutex_unlock(&cn->mu);
    pthread_mutex_lock(&p->mu);
    g->done = 1;
    p->groups_done++;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    kvf__prefetch_drop(p);
}

static kvf_prefetch *prefetch_alloc(kvf_connector *cn, size_t n_chunks)
{
    kvf_prefetch *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->cn = cn;
    p->n_chunks = n_chunks;
    p->n_groups = n_chunks < MAX_GROUPS ? n_chunks : MAX_GROUPS;
    p->group = (n_chunks + p->n_groups - 1) / p->n_groups;
    p->n_groups = (n_chunks + p->group - 1) / p->group;
    p->refs = 1;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->keys = calloc(n_chunks, sizeof *p->keys);
    p->bufs = calloc(n_chunks, sizeof *p->bufs);
    p->caps = calloc(n_chunks, sizeof *p->caps);
    p->lens = calloc(n_chunks, sizeof *p->lens);
    p->status = calloc(n_chunks, sizeof *p->status);
    p->groups = calloc(p->n_groups, sizeof *p->groups);
    if (n_chunks <= SIZE_MAX / cn->obj_bytes) {
        p->mem_len = n_chunks * cn->obj_bytes;
        p->mem = kvf__stage_map_private(cn, p->mem_len, &p->cu_reg);
    }
    if (!p->keys || !p->bufs || !p->caps || !p->lens || !p->status || !p->groups || !p->mem) {
        prefetch_release(p);
        return NULL;
    }
    for (size_t c = 0; c < n_chunks; c++) {
        p->bufs[c] = p->mem + c * cn->obj_bytes;
        p->caps[c] = cn->obj_bytes;
        p->status[c] = KVF_EAGAIN; /* not arrived */
    }
    return p;
}

int kvf_connector_prefetch(kvf_connector *cn, const uint32_t *tokens, size_t n, kvf_prefetch **out)
{
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    if (!cn || !tokens || n == 0 || n % cn->l.chunk_tokens != 0)
        return KVF_EINVAL;
    if (kvf__connector_gate(cn, KVF_ACTION_LAYERWISE_LOAD) != 0)
        return KVF_EINFEASIBLE;
    pthread_mutex_lock(&cn->mu);
    int rc = cn->closing || cn->closed ? KVF_ECLOSED : 0;
    if (!rc) {
        cn->inflight++;
        cn->st.prefetches++;
    }
    pthread_mutex_unlock(&cn->mu);
    if (rc)
        return rc;
    size_t nc = n / cn->l.chunk_tokens, nk;
    kvf_prefetch *p = prefetch_alloc(cn, nc);
    if (!p) {
        pthread_mutex_lock(&cn->mu);
        cn->inflight--;
        pthread_mutex_unlock(&cn->mu);
        return KVF_ENOMEM;
    }
    p->cr = kvf__clref_hold(cn); /* NULL once closed: every group then fails to start */
    kvf_keys_compute(&cn->ks, tokens, n, p->keys, nc, &nk, NULL);
    for (size_t g = 0; g < p->n_groups; g++) {
        struct kvf__pgroup *gr = &p->groups[g];
        gr->p = p;
        gr->first = g * p->group;
        gr->n = nc - gr->first < p->group ? nc - gr->first : p->group;
        kvf_batch b = {
            .n = gr->n,
            .keys = p->keys + gr->first,
            .bufs = p->bufs + gr->first,
            .caps = p->caps + gr->first,
            .out_lens = p->lens + gr->first,
            .status = p->status + gr->first,
            .deadline_ms = cn->deadline_ms,
            .cb = on_group_done,
            .ud = gr,
        };
        kvf__prefetch_hold(p); /* the group's, dropped by its completion */
        kvf_op *op;
        rc = kvf_client_get_async(p->cr ? p->cr->cl : NULL, &b, &op);
        if (rc) {
            /* Not sent: its chunks failed with the reason, and the group is done. */
            for (size_t c = gr->first; c < gr->first + gr->n; c++)
                p->status[c] = rc;
            pthread_mutex_lock(&p->mu);
            gr->done = 1;
            p->groups_done++;
            p->refs--; /* the caller's hold remains */
            pthread_mutex_unlock(&p->mu);
        }
    }
    pthread_mutex_lock(&cn->mu);
    cn->st.batches += p->n_groups;
    pthread_mutex_unlock(&cn->mu);
    *out = p;
    return 0;
}

/* The leading chunks whose group is done and that arrived. p->mu held. */
static size_t ready_chunks_locked(const kvf_prefetch *p)
{
    size_t lead = 0;
    for (size_t g = 0; g < p->n_groups && p->groups[g].done; g++) {
        const struct kvf__pgroup *gr = &p->groups[g];
        for (size_t c = gr->first; c < gr->first + gr->n; c++) {
            if (p->status[c] != 0)
                return lead;
            lead++;
        }
    }
    return lead;
}

size_t kvf_prefetch_ready_tokens(kvf_prefetch *p)
{
    if (!p)
        return 0;
    pthread_mutex_lock(&p->mu);
    size_t lead = ready_chunks_locked(p);
    pthread_mutex_unlock(&p->mu);
    return lead * p->cn->l.chunk_tokens;
}

size_t kvf_prefetch_tokens(const kvf_prefetch *p)
{
    return p ? p->n_chunks * p->cn->l.chunk_tokens : 0;
}

size_t kvf_prefetch_wait(kvf_prefetch *p, uint64_t deadline_ns)
{
    if (!p)
        return 0;
    /* Without a deadline of the caller's, the transfers' own bounds the wait. */
    uint64_t limit = kvf__now_ns() + ((uint64_t)p->cn->deadline_ms + 1000u) * 1000000u;
    if (!deadline_ns || deadline_ns > limit)
        deadline_ns = limit;
    pthread_mutex_lock(&p->mu);
    while (p->groups_done < p->n_groups) {
        uint64_t now = kvf__now_ns();
        if (now >= deadline_ns)
            break;
        uint64_t left_ms = (deadline_ns - now + 999999u) / 1000000u;
        kvf__cond_wait_ms(&p->cv, &p->mu, left_ms > 1000 ? 1000 : (int)left_ms);
    }
    size_t lead = ready_chunks_locked(p);
    pthread_mutex_unlock(&p->mu);
    return lead * p->cn->l.chunk_tokens;
}

void kvf_prefetch_free(kvf_prefetch **pp)
{
    if (!pp || !*pp)
        return;
    kvf_prefetch *p = *pp;
    *pp = NULL;
    kvf__prefetch_drop(p);
}
