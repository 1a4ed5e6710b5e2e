/*
 * The connector (include/kvf/connector.h, docs/connector.md). Threads, data path and lock order
 * are described in connector_int.h.
 */
#include "kvf/connector.h"

#include "kvf/error.h"

#include "bytes.h"
#include "hash.h"
#include "clock.h"
#include "http.h"
#include "kvf/object.h"
#include "connector_int.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { LS_PENDING = 1 }; /* layer state: 1 pending, 0 ready, < 0 failed with that code */

/* ------------------------------------------------------------------------------------------ */
/* Completion bookkeeping */

/* Called with x->mu held whenever a task ends or the transfer completes. */
static void maybe_done_locked(kvf_xfer *x)
{
    if (x->done || !x->transfer_done || x->pending_tasks)
        return;
    /* Layers that never arrived fail with the transfer's error. */
    uint32_t L = x->cn->l.layers;
    for (uint32_t l = 0; l < L; l++)
        if (x->layer_state[l] == LS_PENDING)
            x->layer_state[l] = x->result ? x->result : KVF_EIO;
    x->done = 1;
    pthread_cond_broadcast(&x->cv);
}

static void on_save_done(kvf_op *op, int status, void *ud);

/* All layers gathered: seal every chunk's header and put the batch. */
static void submit_save(kvf_connector *cn, kvf_xfer *x)
{
    uint32_t L = cn->l.layers;
    for (size_t c = 0; c < x->n_chunks; c++) {
        uint8_t *obj = x->stage + c * cn->obj_bytes;
        kvf_obj_seal_raw(obj, &x->keys[c], cn->ks.layout_fp, cn->l.chunk_tokens, L,
                         cn->pm.seg_bytes, x->seg_xxh + c * L);
        x->bufs[c] = obj;
        x->lens[c] = cn->obj_bytes;
    }
    kvf_batch b = {
        .n = x->n_chunks,
        .keys = x->keys,
        .objs = (const void *const *)x->bufs,
        .lens = x->lens,
        .status = x->status,
        .deadline_ms = cn->deadline_ms,
        .cb = on_save_done,
        .ud = x,
    };
    pthread_mutex_lock(&cn->mu);
    cn->st.batches++;
    pthread_mutex_unlock(&cn->mu);
    int rc = kvf_client_put_async(cn->cl, &b, &x->op);
    if (rc) {
        pthread_mutex_lock(&x->mu);
        x->result = rc;
        x->transfer_done = 1;
        maybe_done_locked(x);
        pthread_mutex_unlock(&x->mu);
    }
}

/* The pool's report that one of x's tasks ended (x->task_end). When the last task of a layer ends,
 * the layer's state is decided and its waiters woken; when a save's last layer is gathered, the
 * batch is put. */
static void task_end(kvf_xfer *x, uint32_t layer, int failed, int skipped)
{
    kvf_connector *cn = x->cn;
    int submit = 0;
    pthread_mutex_lock(&x->mu);
    if (failed && !x->layer_failed[layer])
        x->layer_failed[layer] = KVF_ECHECKSUM;
    if (--x->layer_tasks[layer] == 0 && !skipped) {
        if (x->is_save) {
            x->layer_state[layer] = 0;
            if (++x->layers_done == cn->l.layers && !x->cancelled)
                submit = 1;
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
    x->pending_tasks--;
    if (x->is_save && x->cancelled && !x->op && !x->transfer_done && !x->pending_tasks) {
        x->result = KVF_ECANCELED;
        x->transfer_done = 1;
    }
    maybe_done_locked(x);
    pthread_mutex_unlock(&x->mu);
    if (submit)
        submit_save(cn, x);
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
    kvf__pool_enqueue_locked(cn, x, layer);
    pthread_mutex_unlock(&cn->mu);
}

/* The storage client finished x's batch: record the outcome and complete x once its page work is
 * done too. */
static void transfer_finished(kvf_xfer *x, int result, size_t loaded_tokens)
{
    pthread_mutex_lock(&x->mu);
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
    transfer_finished(x, first_err, lead * cn->l.chunk_tokens);
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

static void connector_free(kvf_connector *cn);

static void xfer_destroy(kvf_xfer *x)
{
    kvf_connector *cn = x->cn;
    kvf_op_free(&x->op);
    pthread_mutex_lock(&cn->mu);
    kvf__stage_release_locked(cn, x, x->n_chunks * cn->obj_bytes);
    int last = --cn->inflight == 0 && cn->closed;
    pthread_mutex_unlock(&cn->mu);
    if (last)
        connector_free(cn);
    free(x->keys);
    free(x->page_ids);
    free(x->bufs);
    free(x->caps);
    free(x->lens);
    free(x->status);
    free(x->verified);
    free(x->seg_xxh);
    free(x->layer_state);
    free(x->layer_tasks);
    free(x->layer_failed);
    pthread_mutex_destroy(&x->mu);
    pthread_cond_destroy(&x->cv);
    free(x);
}

/* Common checks and allocation of a load or save of tokens[0..n). */
static int xfer_new(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t first_chunk,
                    const uint32_t *page_ids, size_t n_pages, int is_save, kvf_xfer **out)
{
    *out = NULL;
    if (!cn || !tokens || !page_ids || !out)
        return KVF_EINVAL;
    uint32_t C = cn->l.chunk_tokens, P = cn->l.page_tokens;
    if (!cn->registered || n == 0 || n % C != 0 || n_pages != n / P || first_chunk > n / C)
        return KVF_EINVAL;
    for (size_t i = 0; i < n_pages; i++)
        if (page_ids[i] >= cn->pm.num_pages)
            return KVF_ERANGE;
    size_t total = n / C;
    size_t moved = total - first_chunk;
    uint32_t L = cn->l.layers;
    kvf_xfer *x = calloc(1, sizeof *x);
    if (!x)
        return KVF_ENOMEM;
    x->cn = cn;
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
    x->seg_xxh = is_save ? calloc(m * L, sizeof *x->seg_xxh) : NULL;
    x->layer_state = malloc(L * sizeof *x->layer_state);
    x->layer_tasks = calloc(L, sizeof *x->layer_tasks);
    x->layer_failed = calloc(L, sizeof *x->layer_failed);
    if (!x->keys || !x->page_ids || !x->bufs || !x->caps || !x->lens || !x->status ||
        !x->verified || (is_save && !x->seg_xxh) || !x->layer_state || !x->layer_tasks ||
        !x->layer_failed) {
        pthread_mutex_lock(&cn->mu);
        cn->inflight++;
        pthread_mutex_unlock(&cn->mu);
        xfer_destroy(x);
        return KVF_ENOMEM;
    }
    for (uint32_t l = 0; l < L; l++)
        x->layer_state[l] = LS_PENDING;
    size_t nk;
    kvf_keys_compute(&cn->ks, tokens, n, x->keys, total, &nk, NULL);
    /* Only the moved chunks' keys and pages are kept. */
    memmove(x->keys, x->keys + first_chunk, moved * sizeof *x->keys);
    memcpy(x->page_ids, page_ids + first_chunk * cn->pm.pages_per_chunk,
           moved * cn->pm.pages_per_chunk * sizeof *x->page_ids);
    pthread_mutex_lock(&cn->mu);
    cn->inflight++;
    int rc = cn->closing ? KVF_ECLOSED
                         : kvf__stage_acquire_locked(cn, x, moved * cn->obj_bytes, is_save);
    if (is_save)
        cn->st.saves++;
    else
        cn->st.loads++;
    pthread_mutex_unlock(&cn->mu);
    if (rc) {
        xfer_destroy(x);
        return rc;
    }
    for (size_t c = 0; c < moved; c++) {
        x->bufs[c] = x->stage + c * cn->obj_bytes;
        x->caps[c] = cn->obj_bytes;
    }
    *out = x;
    return 0;
}

/* The storage node's record as it is once the node said in its HELLO that it serves RDMA. */
static kvf_caps remote_with_rdma(const kvf_connector *cn)
{
    kvf_caps r = cn->remote;
    r.transports |= KVF_TRANSPORT_RDMA;
    r.rdma_devices = r.rdma_devices > 0 ? r.rdma_devices : 1;
    r.rdma_one_sided = 1;
    return r;
}

/* The client's transport: "tcp" where the classifier does not find one-sided reads real between
 * the engine's record and a storage node that serves RDMA (the engine's side is what fails; the
 * reason is kept), otherwise "auto": the client then uses RDMA where this host has a device and
 * every node serves it, and says why not. */
static const char *choose_transport(kvf_connector *cn)
{
    kvf_verdict v;
    kvf_caps r = remote_with_rdma(cn);
    if (kvf_classify(KVF_ACTION_RDMA_READ, &cn->local, &r, 0, &v) == 0 &&
        v.label != KVF_FEAS_REAL) {
        snprintf(cn->transport_why, sizeof cn->transport_why, "tcp: rdma_read is %s: %s",
                 kvf_feas_label_name(v.label), v.why);
        return "tcp";
    }
    return "auto";
}

const char *kvf_connector_transport(const kvf_connector *cn, char *why, size_t len)
{
    if (why)
        snprintf(why, len, "%s", cn->transport_why);
    return cn->cl ? kvf_client_transport(cn->cl, NULL, 0) : "tcp";
}

/* Asks the classifier; a remote action that is not real here is refused. */
static int gate(kvf_connector *cn, kvf_action_id a)
{
    kvf_verdict v;
    if (kvf_classify(a, &cn->local, &cn->remote, 0, &v) != 0)
        return KVF_EINVAL;
    return v.label == KVF_FEAS_REAL ? 0 : KVF_EINFEASIBLE;
}

int kvf_connector_load(kvf_connector *cn, const uint32_t *tokens, size_t n,
                       const uint32_t *page_ids, size_t n_pages, kvf_xfer **out)
{
    kvf_xfer *x;
    if (cn && gate(cn, KVF_ACTION_LAYERWISE_LOAD) != 0)
        return KVF_EINFEASIBLE;
    int rc = xfer_new(cn, tokens, n, 0, page_ids, n_pages, 0, &x);
    if (rc)
        return rc;
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
    };
    pthread_mutex_lock(&cn->mu);
    cn->st.batches++;
    pthread_mutex_unlock(&cn->mu);
    rc = kvf_client_get_async(cn->cl, &b, &x->op);
    if (rc) {
        xfer_destroy(x);
        return rc;
    }
    *out = x;
    return 0;
}

int kvf_connector_save(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t first_chunk,
                       const uint32_t *page_ids, size_t n_pages, kvf_xfer **out)
{
    kvf_xfer *x;
    if (cn && gate(cn, KVF_ACTION_STORE) != 0)
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

int kvf_xfer_layer_done(kvf_xfer *x, uint32_t layer)
{
    if (!x || !x->is_save || layer >= x->cn->l.layers)
        return KVF_EINVAL;
    kvf_connector *cn = x->cn;
    if (x->n_chunks == 0)
        return 0;
    pthread_mutex_lock(&cn->mu);
    pthread_mutex_lock(&x->mu);
    int rc = 0;
    if (x->cancelled)
        rc = KVF_ECANCELED;
    else if (x->layer_state[layer] != LS_PENDING || x->layer_tasks[layer])
        rc = KVF_EINVAL; /* reported twice */
    pthread_mutex_unlock(&x->mu);
    if (!rc)
        kvf__pool_enqueue_locked(cn, x, layer);
    pthread_mutex_unlock(&cn->mu);
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
    uint64_t dt = kvf__now_ns() - t0;
    pthread_mutex_lock(&x->cn->mu);
    x->cn->st.wait_ns += dt;
    pthread_mutex_unlock(&x->cn->mu);
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
    uint64_t dt = kvf__now_ns() - t0;
    pthread_mutex_lock(&x->cn->mu);
    x->cn->st.wait_ns += dt;
    pthread_mutex_unlock(&x->cn->mu);
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
    /* Queued tasks are skipped; wait for any in progress, so no page is written after this. */
    while (x->pending_tasks)
        pthread_cond_wait(&x->cv, &x->mu);
    if (x->is_save && !x->op && !x->transfer_done) {
        x->result = KVF_ECANCELED;
        x->transfer_done = 1;
        maybe_done_locked(x);
    }
    pthread_cond_broadcast(&x->cv);
    pthread_mutex_unlock(&x->mu);
}

void kvf_xfer_free(kvf_xfer **xp)
{
    if (!xp || !*xp)
        return;
    kvf_xfer *x = *xp;
    pthread_mutex_lock(&x->mu);
    while (!x->done)
        pthread_cond_wait(&x->cv, &x->mu);
    pthread_mutex_unlock(&x->mu);
    /* The client op may still be signalling its own completion: wait for that too. */
    if (x->op)
        kvf_op_wait(x->op);
    xfer_destroy(x);
    *xp = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Connector */

int kvf_connector_lookup(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t *cached)
{
    if (!cn || !cached || (n && !tokens))
        return KVF_EINVAL;
    *cached = 0;
    if (gate(cn, KVF_ACTION_LOOKUP) != 0)
        return KVF_EINFEASIBLE;
    size_t nc = n / cn->l.chunk_tokens;
    if (nc == 0)
        return 0;
    kvf_key *keys = malloc(nc * sizeof *keys);
    if (!keys)
        return KVF_ENOMEM;
    size_t nk, hits = 0;
    kvf_keys_compute(&cn->ks, tokens, n, keys, nc, &nk, NULL);
    int rc = kvf_client_lookup_prefix(cn->cl, nk, keys, &hits, cn->deadline_ms);
    free(keys);
    *cached = hits * cn->l.chunk_tokens;
    return rc;
}

int kvf_connector_register(kvf_connector *cn, const kvf_kv_layer *layers, uint32_t n_layers,
                           char *err, size_t errlen)
{
    if (!cn)
        return KVF_EINVAL;
    /* The memory the engine registers is what its KV lives in: the classifier decides whether
     * this build's transfer path can reach it. */
    if (layers && n_layers) {
        kvf_caps probe = cn->local;
        probe.mem_kinds = 0;
        for (uint32_t i = 0; i < n_layers; i++)
            probe.mem_kinds |= layers[i].kind == KVF_MEM_CUDA      ? KVF_MEMK_CUDA
                               : layers[i].kind == KVF_MEM_UNIFIED ? KVF_MEMK_UNIFIED
                                                                   : KVF_MEMK_HOST;
        kvf_verdict v;
        kvf_classify(KVF_ACTION_STORE, &probe, &cn->remote, 0, &v);
        if (v.label != KVF_FEAS_REAL) {
            snprintf(err, errlen, "register: %s (%s)", v.why, kvf_feas_reason_name(v.reason));
            return KVF_EINFEASIBLE;
        }
        cn->local.mem_kinds = probe.mem_kinds;
    }
    /* Under the connector lock: workers read the page map for tasks they take under it. */
    pthread_mutex_lock(&cn->mu);
    int rc;
    if (cn->inflight > 0) {
        snprintf(err, errlen, "register: transfers are in flight");
        rc = KVF_EBUSY;
    } else {
        rc = kvf__pagemap_init(&cn->pm, &cn->l, layers, n_layers, err, errlen);
        cn->registered = rc == 0;
    }
    pthread_mutex_unlock(&cn->mu);
    return rc;
}

void kvf_connector_stats_get(kvf_connector *cn, kvf_connector_stats *out)
{
    pthread_mutex_lock(&cn->mu);
    *out = cn->st;
    pthread_mutex_unlock(&cn->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* Storage nodes from the scheduler */

/* GET http://sched/v1/stores. Fills nodes (strings the caller frees). */
static int nodes_from_sched(const char *sched, char ***nodes, size_t *n, int timeout_ms, char *err,
                            size_t errlen)
{
    char url[300];
    snprintf(url, sizeof url, "http://%s/v1/stores", sched);
    long status;
    json_t *o = NULL;
    int rc = kvf__http_call("GET", url, NULL, timeout_ms, &status, &o, err, errlen);
    if (rc == 0 && status != 200) {
        snprintf(err, errlen, "connector: scheduler %s: HTTP status %ld", url, status);
        rc = KVF_ECONNREFUSED;
    }
    if (rc) {
        if (rc != KVF_ENOMEM)
            rc = KVF_ECONNREFUSED;
        goto out;
    }
    json_t *arr = o ? json_object_get(o, "stores") : NULL;
    size_t m = json_is_array(arr) ? json_array_size(arr) : 0;
    if (m == 0 || m > KVF_CLIENT_MAX_NODES) {
        snprintf(err, errlen,
                 "connector: scheduler %s lists no storage node (start kvf-sched "
                 "with --stores)",
                 sched);
        rc = KVF_ECONNREFUSED;
        goto out;
    }
    *nodes = calloc(m, sizeof **nodes);
    if (!*nodes) {
        rc = KVF_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < m; i++) {
        json_t *v = json_array_get(arr, i);
        (*nodes)[i] = strdup(json_is_string(v) ? json_string_value(v) : "");
    }
    *n = m;
out:
    json_decref(o);
    return rc;
}

int kvf_connector_open(kvf_connector **out, const kvf_connector_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    if (!o) {
        snprintf(err, errlen, "connector: no options");
        return KVF_EINVAL;
    }
    char lerr[200];
    if (kvf_layout_validate(&o->layout, lerr, sizeof lerr) != 0) {
        snprintf(err, errlen, "connector: layout: %s", lerr);
        return KVF_EINVAL;
    }
    kvf_connector *cn = calloc(1, sizeof *cn);
    if (!cn) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    cn->l = o->layout;
    size_t salt_len = o->salt ? strlen(o->salt) : 0;
    int rc = kvf_keyspace_init(&cn->ks, &cn->l, o->salt, salt_len);
    if (rc) {
        snprintf(err, errlen, "connector: salt longer than %u bytes", KVF_SALT_MAX);
        free(cn);
        return rc;
    }
    cn->hdr_len = kvf_obj_header_len(cn->l.layers);
    cn->obj_bytes = kvf_obj_raw_size(cn->l.layers, kvf_layout_segment_bytes(&cn->l));
    cn->seg_bytes = kvf_layout_segment_bytes(&cn->l);
    if (o->caps)
        cn->local = *o->caps;
    else
        kvf_caps_builtin("reference", &cn->local);
    kvf_caps_builtin("kvf-store", &cn->remote);
    const char *transport = choose_transport(cn);
    cn->deadline_ms = o->deadline_ms > 0 ? o->deadline_ms : 5000;
    cn->nworkers = o->workers > 0 ? o->workers : 2;
    pthread_mutex_init(&cn->mu, NULL);
    pthread_cond_init(&cn->cv, NULL);
    kvf_client_opts co = {
        .nodes = o->nodes,
        .n_nodes = o->n_nodes,
        .ns = cn->ks.seed,
        .conns_per_node = o->conns_per_node,
        .deadline_ms = cn->deadline_ms,
        .transport = transport,
    };
    char **fetched = NULL;
    size_t n_fetched = 0;
    if (o->n_nodes == 0 && o->sched) {
        rc = nodes_from_sched(o->sched, &fetched, &n_fetched, cn->deadline_ms, err, errlen);
        if (rc)
            goto out_free;
        co.nodes = (const char *const *)fetched;
        co.n_nodes = n_fetched;
    }
    rc = kvf_client_open(&cn->cl, &co, err, errlen);
    for (size_t i = 0; i < n_fetched; i++)
        free(fetched[i]);
    free(fetched);
    if (rc)
        goto out_free;
    if (strcmp(transport, "tcp") != 0 &&
        !strcmp(kvf_client_transport(cn->cl, cn->transport_why, sizeof cn->transport_why), "rdma"))
        cn->remote = remote_with_rdma(cn); /* every node said so */
    kvf__stage_init(cn, o->staging_bytes);
    rc = kvf__pool_start(cn, err, errlen);
    if (rc)
        goto out_client;
    *out = cn;
    return 0;

out_client:
    kvf_client_close(&cn->cl);
    kvf__stage_fini(cn);
out_free:
    pthread_mutex_destroy(&cn->mu);
    pthread_cond_destroy(&cn->cv);
    free(cn);
    return rc;
}

static void connector_free(kvf_connector *cn)
{
    kvf__stage_fini(cn);
    kvf__pagemap_free(&cn->pm);
    pthread_mutex_destroy(&cn->mu);
    pthread_cond_destroy(&cn->cv);
    free(cn);
}

void kvf_connector_close(kvf_connector **cnp)
{
    if (!cnp || !*cnp)
        return;
    kvf_connector *cn = *cnp;
    *cnp = NULL;
    /* Closing the client fails every transfer in flight (their callbacks run), and the workers
     * finish the tasks already queued before they exit. */
    kvf_client_close(&cn->cl);
    kvf__pool_stop(cn);
    /* Transfers the engine has not freed yet keep the connector alive until they are. */
    pthread_mutex_lock(&cn->mu);
    cn->closed = 1;
    int last = cn->inflight == 0;
    pthread_mutex_unlock(&cn->mu);
    if (last)
        connector_free(cn);
}
