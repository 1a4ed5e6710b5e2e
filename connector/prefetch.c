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
    int retried; /* its chunks that their named node did not give were asked of their own */
};

/* A group's chunks asked again of their own node: their keys, buffers and results, and which
 * chunk each is. */
typedef struct retry {
    struct kvf__pgroup *g;
    size_t n;
    size_t *chunk;
    kvf_key *keys;
    void **bufs;
    uint64_t *caps, *lens;
    int *status;
} retry;

static void retry_free(retry *r)
{
    if (!r)
        return;
    free(r->chunk), free(r->keys), free(r->bufs), free(r->caps), free(r->lens), free(r->status);
    free(r);
}

/* Frees p's memory and p itself (whatever of them was allocated). */
static void prefetch_release(kvf_prefetch *p)
{
    kvf__stage_put_private(p->cn, p->mem, p->mem_len, p->cu_reg);
    free(p->keys);
    free(p->bufs);
    free(p->caps);
    free(p->lens);
    free(p->status);
    free(p->nodes);
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

static void on_group_done(kvf_op *op, int status, void *ud);

/* The retry of a group completed: its chunks' results join the group's, which is done. */
static void on_retry_done(kvf_op *op, int status, void *ud)
{
    retry *r = ud;
    kvf_prefetch *p = r->g->p;
    for (size_t i = 0; i < r->n; i++) {
        p->status[r->chunk[i]] = r->status[i];
        p->lens[r->chunk[i]] = r->lens[i];
    }
    struct kvf__pgroup *g = r->g;
    retry_free(r);
    on_group_done(op, status, g);
}

/* The chunks of group g that the node named for them did not give, asked of their own node in a
 * GET of their own (on_retry_done completes the group). Returns 1 when one was sent, 0 when
 * there is nothing to ask (the group is done as it is). */
static int retry_named(struct kvf__pgroup *g)
{
    kvf_prefetch *p = g->p;
    kvf_connector *cn = p->cn;
    g->retried = 1;
    size_t m = 0;
    for (size_t c = g->first; c < g->first + g->n; c++)
        m += p->nodes[c] != KVF_NODE_ANY && p->status[c] != 0;
    if (!m)
        return 0;
    pthread_mutex_lock(&cn->mu);
    cn->st.prefetch_named_missed += m;
    int going = cn->closing || cn->closed || cn->st_closed;
    pthread_mutex_unlock(&cn->mu);
    /* The retry gets what is left of the prefetch's deadline, not one of its own: a caller that
     * waits for the prefetch waits the transfers' deadline at most. */
    uint64_t spent_ms = (kvf__now_ns() - p->t0_ns) / 1000000u;
    if (going || spent_ms + 1 >= (uint64_t)cn->deadline_ms)
        return 0;
    m = 0;
    for (size_t c = g->first; c < g->first + g->n; c++)
        m +=
            p->nodes[c] != KVF_NODE_ANY && p->status[c] != 0 && kvf_err_ask_elsewhere(p->status[c]);
    if (!m)
        return 0;
    retry *r = calloc(1, sizeof *r);
    if (r) {
        r->g = g;
        r->chunk = malloc(m * sizeof *r->chunk);
        r->keys = malloc(m * sizeof *r->keys);
        r->bufs = malloc(m * sizeof *r->bufs);
        r->caps = malloc(m * sizeof *r->caps);
        r->lens = calloc(m, sizeof *r->lens);
        r->status = calloc(m, sizeof *r->status);
    }
    if (!r || !r->chunk || !r->keys || !r->bufs || !r->caps || !r->lens || !r->status) {
        retry_free(r);
        return 0; /* the named node's misses stand */
    }
    for (size_t c = g->first; c < g->first + g->n; c++) {
        if (p->nodes[c] == KVF_NODE_ANY || p->status[c] == 0 ||
            !kvf_err_ask_elsewhere(p->status[c]))
            continue;
        r->chunk[r->n] = c;
        r->keys[r->n] = p->keys[c];
        r->bufs[r->n] = p->bufs[c];
        r->caps[r->n] = p->caps[c];
        r->n++;
    }
    kvf_batch b = {
        .n = r->n,
        .keys = r->keys,
        .bufs = r->bufs,
        .caps = r->caps,
        .out_lens = r->lens,
        .status = r->status,
        .deadline_ms = (int)((uint64_t)cn->deadline_ms - spent_ms),
        .cb = on_retry_done,
        .ud = r,
    };
    kvf_op *op;
    if (kvf_client_get_async(p->cr ? p->cr->cl : NULL, &b, &op) != 0) {
        retry_free(r);
        return 0;
    }
    return 1;
}

/* A group's GET completed (on the storage client's I/O thread): its chunks' statuses are final,
 * once those its named node did not give were asked of their own node. */
static void on_group_done(kvf_op *op, int status, void *ud)
{
    (void)status; /* per chunk in p->status */
    struct kvf__pgroup *g = ud;
    kvf_prefetch *p = g->p;
    kvf_connector *cn = p->cn;
    kvf_op_free(&op); /* allowed inside its own callback */
    if (p->nodes && !g->retried && retry_named(g))
        return; /* on_retry_done comes back here */
    size_t ok = 0;
    for (size_t c = g->first; c < g->first + g->n; c++)
        ok += p->status[c] == 0;
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
        p->mem = kvf__stage_get_private(cn, n_chunks * cn->obj_bytes, &p->mem_len, &p->cu_reg);
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

int kvf__plan_nodes(const kvf_connector *cn, kvf_client *cl, const kvf_key *keys, size_t n,
                    size_t first_chunk, const kvf_source *src, size_t n_src, uint32_t **nodes,
                    uint64_t *named, uint64_t *unknown)
{
    *nodes = NULL;
    *named = *unknown = 0;
    if (!cl || !n_src || !n)
        return 0;
    int *idx = malloc(n_src * sizeof *idx);
    uint32_t *nd = malloc(n * sizeof *nd);
    if (!idx || !nd) {
        free(idx);
        free(nd);
        return KVF_ENOMEM;
    }
    for (size_t r = 0; r < n_src; r++) {
        idx[r] = src[r].store ? kvf_client_node_index(cl, src[r].store) : -1;
        *unknown += idx[r] < 0 && src[r].tokens;
    }
    size_t ct = cn->l.chunk_tokens;
    for (size_t c = 0; c < n; c++) {
        nd[c] = KVF_NODE_ANY;
        size_t t = (first_chunk + c) * ct;
        for (size_t r = 0; r < n_src; r++) {
            if (t < src[r].from || t - src[r].from >= src[r].tokens)
                continue;
            if (idx[r] >= 0 && (size_t)idx[r] != kvf_client_node_of(cl, &keys[c])) {
                nd[c] = (uint32_t)idx[r];
                (*named)++;
            }
            break;
        }
    }
    free(idx);
    if (*named)
        *nodes = nd;
    else
        free(nd);
    return 0;
}

/* Names, for each chunk of p that a run of src covers (by its first token), the run's node where
 * it is not the chunk's own. */
static int name_nodes(kvf_prefetch *p, const kvf_source *src, size_t n_src)
{
    kvf_connector *cn = p->cn;
    uint64_t named, unknown;
    int rc = kvf__plan_nodes(cn, p->cr ? p->cr->cl : NULL, p->keys, p->n_chunks, 0, src, n_src,
                             &p->nodes, &named, &unknown);
    if (rc)
        return rc;
    pthread_mutex_lock(&cn->mu);
    cn->st.prefetch_named += named;
    cn->st.prefetch_sources_unknown += unknown;
    pthread_mutex_unlock(&cn->mu);
    return 0;
}

int kvf_connector_prefetch(kvf_connector *cn, const uint32_t *tokens, size_t n, kvf_prefetch **out)
{
    return kvf_connector_prefetch_from(cn, tokens, n, NULL, 0, out);
}

int kvf_connector_prefetch_from(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                const kvf_source *src, size_t n_src, kvf_prefetch **out)
{
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    if (!cn || !tokens || n == 0 || n % cn->l.chunk_tokens != 0 || (n_src && !src))
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
    p->t0_ns = kvf__now_ns();
    kvf_keys_compute(&cn->ks, tokens, n, p->keys, nc, &nk, NULL);
    if (name_nodes(p, src, n_src) != 0) {
        kvf__prefetch_drop(p); /* the caller's hold, the only one: frees it */
        return KVF_ENOMEM;
    }
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
            .nodes = p->nodes ? p->nodes + gr->first : NULL,
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
