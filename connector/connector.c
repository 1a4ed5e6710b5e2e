/*
 * The connector's handle (include/kvf/connector.h, docs/connector.md): open and close, the
 * engine's KV registration, lookup and stats, and what every remote action is held against: the
 * transport the storage client uses and the feasibility gate. Transfers are in xfer.c, the worker
 * pool and staging in workers.c, the threads and the lock order in connector_int.h.
 */
#include "kvf/connector.h"

#include "kvf/client.h"
#include "kvf/error.h"
#include "kvf/object.h"

#include "auth.h"
#include "cpus.h"
#include "cu.h"
#include "http.h"
#include "connector_int.h"
#include "metrics.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Transport and feasibility */

/* The storage node's record as it is once the node said in its HELLO that it serves RDMA. */
static kvf_caps remote_with_rdma(const kvf_connector *cn)
{
    kvf_caps r = cn->remote;
    r.transports |= KVF_TRANSPORT_RDMA;
    r.rdma_devices = r.rdma_devices > 0 ? r.rdma_devices : 1;
    r.rdma_one_sided = 1;
    return r;
}

/* The client's transport: "shm+tcp" (shared memory with the nodes on this host, TCP with the
 * others) where the classifier does not find one-sided reads real between the engine's record
 * and a storage node that serves RDMA (the engine's side is what fails; the reason is kept),
 * otherwise "auto": the client then also uses RDMA where this host has a device and every node
 * serves it, and says why not. */
static const char *choose_transport(kvf_connector *cn)
{
    kvf_verdict v;
    kvf_caps r = remote_with_rdma(cn);
    if (kvf_classify(KVF_ACTION_RDMA_READ, &cn->local, &r, 0, &v) == 0 &&
        v.label != KVF_FEAS_REAL) {
        snprintf(cn->transport_why, sizeof cn->transport_why, "rdma_read is %s: %s",
                 kvf_feas_label_name(v.label), v.why);
        return "shm+tcp";
    }
    return "auto";
}

const char *kvf_connector_transport(const kvf_connector *cn, char *why, size_t len)
{
    if (why)
        snprintf(why, len, "%s", cn->transport_why);
    kvf__clref *r = kvf__clref_hold((kvf_connector *)cn);
    const char *t = r && r->cl ? kvf_client_transport(r->cl, NULL, 0) : "tcp"; /* static */
    kvf__clref_drop((kvf_connector *)cn, r);
    return t;
}

int kvf__connector_gate(kvf_connector *cn, kvf_action_id a)
{
    kvf_verdict v;
    if (kvf_classify(a, &cn->local, &cn->remote, 0, &v) != 0)
        return KVF_EINVAL;
    return v.label == KVF_FEAS_REAL ? 0 : KVF_EINFEASIBLE;
}

/* ------------------------------------------------------------------------------------------ */
/* Lookup, registration, stats */

static void cu_streams_free(kvf_connector *cn)
{
    const kvf__cu *cu = kvf__cuda(NULL, 0);
    for (int i = 0; i < 2; i++) {
        if (cn->cu_stream[i] && cu) {
            (void)cu->StreamSynchronize(cn->cu_stream[i]);
            cu->StreamDestroy(cn->cu_stream[i]);
        }
        cn->cu_stream[i] = NULL;
    }
}

int kvf_connector_lookup(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t *cached)
{
    int why;
    return kvf_connector_lookup_why(cn, tokens, n, cached, &why);
}

int kvf_connector_lookup_planned(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                 const kvf_source *src, size_t n_src, size_t *cached)
{
    if (!cn || !cached || (n && !tokens) || (n_src && !src))
        return KVF_EINVAL;
    if (!n_src)
        return kvf_connector_lookup(cn, tokens, n, cached);
    *cached = 0;
    if (kvf__connector_gate(cn, KVF_ACTION_LOOKUP) != 0)
        return KVF_EINFEASIBLE;
    size_t nc = n / cn->l.chunk_tokens;
    if (nc == 0)
        return 0;
    kvf_key *keys = malloc(nc * sizeof *keys), *sub = malloc(nc * sizeof *sub);
    uint8_t *own = malloc(nc), *got = malloc(nc);
    size_t *at = malloc(nc * sizeof *at);
    uint32_t *nodes = NULL;
    kvf__clref *r = kvf__clref_hold(cn);
    kvf_client *cl = r ? r->cl : NULL;
    int rc = keys && sub && own && got && at ? 0 : KVF_ENOMEM;
    size_t nk = 0;
    if (!rc) {
        kvf_keys_compute(&cn->ks, tokens, n, keys, nc, &nk, NULL);
        rc = kvf_client_exists(cl, nk, keys, own, cn->deadline_ms);
    }
    uint64_t named = 0, unknown = 0;
    if (!rc)
        rc = kvf__plan_nodes(cn, cl, keys, nk, 0, src, n_src, &nodes, &named, &unknown);
    /* Each named node asked once, for the chunks it is named for that their own node lacks. */
    for (size_t node = 0; !rc && nodes && node < kvf_client_node_count(cl); node++) {
        size_t m = 0;
        for (size_t k = 0; k < nk; k++)
            if (nodes[k] == node && !own[k]) {
                at[m] = k;
                sub[m++] = keys[k];
            }
        if (!m || kvf_client_exists_on(cl, node, m, sub, got, cn->deadline_ms) != 0)
            continue; /* not asked, or not answering: those chunks count as missing */
        for (size_t i = 0; i < m; i++)
            own[at[i]] |= got[i];
    }
    size_t hits = 0;
    while (!rc && hits < nk && own[hits])
        hits++;
    kvf__clref_drop(cn, r);
    free(nodes), free(keys), free(sub), free(own), free(got), free(at);
    *cached = hits * cn->l.chunk_tokens;
    return rc;
}

int kvf_connector_lookup_why(kvf_connector *cn, const uint32_t *tokens, size_t n, size_t *cached,
                             int *why)
{
    if (!cn || !cached || !why || (n && !tokens))
        return KVF_EINVAL;
    *cached = 0;
    *why = 0;
    if (kvf__connector_gate(cn, KVF_ACTION_LOOKUP) != 0)
        return KVF_EINFEASIBLE;
    size_t nc = n / cn->l.chunk_tokens;
    if (nc == 0)
        return 0;
    kvf_key *keys = malloc(nc * sizeof *keys);
    if (!keys)
        return KVF_ENOMEM;
    size_t nk, hits = 0;
    kvf_keys_compute(&cn->ks, tokens, n, keys, nc, &nk, NULL);
    kvf__clref *r = kvf__clref_hold(cn);
    int rc = kvf_client_lookup_prefix_why(r ? r->cl : NULL, nk, keys, &hits, why, cn->deadline_ms);
    kvf__clref_drop(cn, r);
    free(keys);
    *cached = hits * cn->l.chunk_tokens;
    return rc;
}

/* The load and save streams on the registered device (kept across registrations on it). */
static int cu_streams(kvf_connector *cn, char *err, size_t errlen)
{
    const kvf__cu *cu = kvf__cuda(NULL, 0);
    if (cn->cu_stream[0] && cn->cu_stream_dev == cn->pm.dev)
        return 0;
    cu_streams_free(cn);
    int e = cu->SetDevice(cn->pm.dev);
    for (int i = 0; i < 2 && !e; i++)
        e = cu->StreamCreateWithFlags(&cn->cu_stream[i], KVF__CU_STREAM_NON_BLOCKING);
    if (e) {
        int rc = kvf__cu_err(cu, e, "register: the connector's streams", err, errlen);
        cu_streams_free(cn);
        cn->registered = 0;
        return rc;
    }
    cn->cu_stream_dev = cn->pm.dev;
    return 0;
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
        /* This side's transfer path reaches CUDA memory where the runtime loads and a device is
         * there (cuda/: what kvf probe reports). */
        char cuda_why[300] = "";
        if ((probe.mem_kinds & KVF_MEMK_CUDA) && kvf__cuda(cuda_why, sizeof cuda_why))
            probe.xfer_mem_kinds |= KVF_MEMK_CUDA;
        kvf_verdict v;
        kvf_classify(KVF_ACTION_STORE, &probe, &cn->remote, 0, &v);
        if (v.label != KVF_FEAS_REAL) {
            snprintf(err, errlen, "register: %s (%s)%s%s", v.why, kvf_feas_reason_name(v.reason),
                     cuda_why[0] ? ": " : "", cuda_why);
            return KVF_EINFEASIBLE;
        }
        cn->local.xfer_mem_kinds = probe.xfer_mem_kinds;
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
    int grow = rc == 0 && cn->pm.cuda && cn->workers_given <= 0;
    if (rc == 0 && cn->pm.cuda)
        rc = cu_streams(cn, err, errlen);
    pthread_mutex_unlock(&cn->mu);
    if (grow) {
        /* CUDA pages leave the CPU to the data path: half the cores (2 to 8) check segments while
         * the copy engine moves them (docs/cuda.md). */
        int half = kvf__cores() / 2;
        (void)kvf__pool_grow(cn, half < 2 ? 2 : half > 8 ? 8 : half);
    }
    return rc;
}

const char *kvf_connector_error(kvf_connector *cn, char *buf, size_t len)
{
    if (!buf || !len)
        return buf;
    buf[0] = 0;
    if (!cn)
        return buf;
    pthread_mutex_lock(&cn->mu);
    snprintf(buf, len, "%s", cn->last_err);
    pthread_mutex_unlock(&cn->mu);
    return buf;
}

void kvf_connector_stats_get(kvf_connector *cn, kvf_connector_stats *out)
{
    pthread_mutex_lock(&cn->mu);
    *out = cn->st;
    pthread_mutex_unlock(&cn->mu);
    out->in_place_hashed_bytes = atomic_load(&cn->in_place_hashed);
    /* the bytes of the current client (a client opened on a changed set of nodes starts at 0) */
    kvf__clref *r = kvf__clref_hold(cn);
    if (r && r->cl) {
        kvf_client_counters k;
        kvf_client_counters_get(r->cl, &k);
        out->shm_bytes = k.shm_bytes_sent + k.shm_bytes_received;
        out->net_bytes = k.bytes_sent + k.bytes_received - out->shm_bytes;
        out->load_named_reasked = k.named_reasked; /* only loads stream (prefetches do not) */
        out->stores = kvf_client_node_count(r->cl);
    }
    kvf__clref_drop(cn, r);
}

/* ------------------------------------------------------------------------------------------ */
/* Open and close */

static int nodes_from_one(const char *sched, char ***nodes, size_t *n, int timeout_ms, char *err,
                          size_t errlen);

int kvf__nodes_from_sched(const char *list, char ***nodes, size_t *n, int timeout_ms, char *err,
                          size_t errlen)
{
    int rc = KVF_ECONNREFUSED;
    for (const char *p = list; *p;) {
        size_t k = strcspn(p, ",");
        char one[256];
        snprintf(one, sizeof one, "%.*s", (int)(k < sizeof one ? k : sizeof one - 1), p);
        if (one[0] && (rc = nodes_from_one(one, nodes, n, timeout_ms, err, errlen)) == 0)
            return 0;
        if (rc == KVF_ENOMEM)
            return rc;
        p += k + (p[k] == ',');
    }
    return rc;
}

/* GET http://sched/v1/stores. Fills nodes (strings the caller frees). */
static int nodes_from_one(const char *sched, char ***nodes, size_t *n, int timeout_ms, char *err,
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

int kvf__client_open_on(kvf_connector *cn, const char *const *nodes, size_t n, kvf_client **out,
                        char *err, size_t errlen)
{
    kvf_client_opts co = {
        .nodes = nodes,
        .n_nodes = n,
        .ns = cn->ks.seed,
        .conns_per_node = cn->conns_per_node,
        .deadline_ms = cn->deadline_ms,
        .transport = cn->transport_req,
        .credential = cn->credential,
    };
    int rc = kvf_client_open(out, &co, err, errlen);
    if (!rc) /* a store that dies costs its keys' misses, not failures (kvf/client.h) */
        kvf_client_set_reroute(*out, 1);
    return rc;
}

/* Opens cn's first storage client, on the nodes given or, with none, on the ones the scheduler
 * lists; cn->remote gains RDMA when every node serves it and the client uses it. */
static int open_client(kvf_connector *cn, const kvf_connector_opts *o, char *err, size_t errlen)
{
    int rc;
    char **fetched = NULL;
    size_t n_fetched = 0;
    const char *const *nodes = o->nodes;
    size_t n = o->n_nodes;
    if (o->n_nodes == 0 && (o->sched || o->etcd)) {
        rc = o->etcd ? kvf__stores_etcd_open(cn, o, &fetched, &n_fetched, err, errlen)
                     : kvf__nodes_from_sched(o->sched, &fetched, &n_fetched, cn->deadline_ms, err,
                                             errlen);
        if (rc)
            return rc;
        nodes = (const char *const *)fetched;
        n = n_fetched;
    }
    kvf_client *cl = NULL;
    rc = kvf__client_open_on(cn, nodes, n, &cl, err, errlen);
    if (!rc && !(cn->cur = kvf__clref_new(cl, fetched, n_fetched)))
        rc = KVF_ENOMEM;
    if (rc) {
        kvf_client_close(&cl);
        kvf__nodes_free(fetched, n_fetched);
        return rc;
    }
    char why[400], rdma_why[sizeof cn->transport_why];
    snprintf(rdma_why, sizeof rdma_why, "%s", cn->transport_why);
    const char *used = kvf_client_transport(cl, why, sizeof why);
    if (strcmp(cn->transport_req, "auto") == 0 && !strcmp(used, "rdma"))
        cn->remote = remote_with_rdma(cn); /* every node said so */
    if (snprintf(cn->transport_why, sizeof cn->transport_why, "%s%s%s", why,
                 rdma_why[0] ? "; " : "", rdma_why) < 0)
        cn->transport_why[0] = 0;
    return 0;
}

/* The key space: the tenant salt is the credential's (docs/keys.md), where there is one, followed
 * by o->salt; so two tenants' keys never collide, and nobody without the credential can work
 * out a tenant's keys from its tokens. */
static int keyspace_open(kvf_connector *cn, const kvf_connector_opts *o, char *err, size_t errlen)
{
    uint8_t salt[KVF_SALT_MAX];
    size_t n = 0;
    char why[300];
    int rc = kvf__auth_key_salt(o->credential, o->salt, o->salt ? strlen(o->salt) : 0, salt,
                                sizeof salt, &n, why, sizeof why);
    if (rc) {
        snprintf(err, errlen, "connector: %s", why);
        return rc;
    }
    return kvf_keyspace_init(&cn->ks, &cn->l, (const char *)salt, n);
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
    int rc = keyspace_open(cn, o, err, errlen);
    if (rc) {
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
    cn->transport_req = choose_transport(cn);
    cn->deadline_ms = o->deadline_ms > 0 ? o->deadline_ms : 5000;
    cn->conns_per_node = o->conns_per_node;
    cn->refresh_ms = o->stores_refresh_ms == 0 ? 2000 : o->stores_refresh_ms;
    if ((o->n_nodes == 0 && o->sched && !o->etcd && !(cn->sched = strdup(o->sched))) ||
        (o->credential && !(cn->credential = strdup(o->credential)))) {
        free(cn->sched);
        free(cn);
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    int autow = kvf__auto_threads();
    cn->nworkers = o->workers > 0 ? o->workers : autow > 2 ? autow : 2;
    cn->workers_given = o->workers;
    cn->trust_local = o->trust_local_store != 0;
    cn->save_whole = o->save_whole != 0;
    cn->save_parts_shm = o->save_parts_shm;
    pthread_mutex_init(&cn->mu, NULL);
    pthread_mutex_init(&cn->cu_mu, NULL);
    pthread_rwlock_init(&cn->lease_rw, NULL);
    pthread_cond_init(&cn->cv, NULL);
    rc = open_client(cn, o, err, errlen);
    if (rc)
        goto out_free;
    kvf__stage_init(cn, o->staging_bytes);
    rc = kvf__pool_start(cn, err, errlen);
    if (!rc && (rc = kvf__stores_start(cn, err, errlen)) != 0)
        kvf__pool_stop(cn);
    if (rc)
        goto out_client;
    *out = cn;
    return 0;

out_client:
    kvf__stage_fini(cn);
out_free:
    kvf__stores_free(cn);
    pthread_mutex_destroy(&cn->mu);
    pthread_mutex_destroy(&cn->cu_mu);
    pthread_rwlock_destroy(&cn->lease_rw);
    pthread_cond_destroy(&cn->cv);
    free(cn);
    return rc;
}

void kvf__connector_free(kvf_connector *cn)
{
    kvf__stores_free(cn);
    cu_streams_free(cn);
    kvf__stage_fini(cn);
    kvf__pagemap_free(&cn->pm);
    pthread_mutex_destroy(&cn->mu);
    pthread_mutex_destroy(&cn->cu_mu);
    pthread_rwlock_destroy(&cn->lease_rw);
    pthread_cond_destroy(&cn->cv);
    free(cn);
}

void kvf_connector_close(kvf_connector **cnp)
{
    if (!cnp || !*cnp)
        return;
    kvf_connector *cn = *cnp;
    *cnp = NULL;
    /* The workers first: they finish the tasks already queued (a load in place reads the
     * stores' arena views, which the clients' close unmaps) and exit, and no task is queued after.
     * Then closing the clients fails every transfer in flight (their callbacks run). */
    kvf__stores_stop(cn);
    kvf__pool_stop(cn);
    kvf__cuda_views_release(cn);
    kvf__stores_close(cn);
    /* Transfers the engine has not freed yet keep the connector alive until they are. */
    pthread_mutex_lock(&cn->mu);
    cn->closed = 1;
    int last = cn->inflight == 0;
    pthread_mutex_unlock(&cn->mu);
    if (last)
        kvf__connector_free(cn);
}

int kvf_connector_set_metrics(kvf_connector *cn, kvf_metrics *m)
{
    if (!cn)
        return KVF_EINVAL;
    kvf__metrics *r = kvf__metrics_registry(m);
    kvf__series *layer[2] = {NULL, NULL}, *wait[2] = {NULL, NULL}, *xfer[2] = {NULL, NULL};
    if (r) {
        kvf__metric *fl = kvf__metric_histogram(
            r, "connector_layer_seconds",
            "Per layer: a load, from its start until the layer was in the engine's pages; a "
            "save, from the layer reported done until it was read.",
            "op", kvf__metrics_latency_buckets, kvf__metrics_latency_nbuckets);
        kvf__metric *fw = kvf__metric_histogram(
            r, "connector_wait_seconds",
            "Time the engine blocked on a transfer: waiting for a loaded layer, or for a save's "
            "pages to be read.",
            "op", kvf__metrics_latency_buckets, kvf__metrics_latency_nbuckets);
        kvf__metric *fx = kvf__metric_histogram(
            r, "connector_transfer_seconds", "Whole transfers that moved chunks, start to done.",
            "op", kvf__metrics_latency_buckets, kvf__metrics_latency_nbuckets);
        static const char *const ops[2] = {"load", "save"};
        for (int i = 0; i < 2; i++) {
            const char *v[] = {ops[i]};
            layer[i] = fl ? kvf__metric_series(fl, v) : NULL;
            wait[i] = fw ? kvf__metric_series(fw, v) : NULL;
            xfer[i] = fx ? kvf__metric_series(fx, v) : NULL;
            if (!layer[i] || !wait[i] || !xfer[i])
                return KVF_ENOMEM;
        }
    }
    pthread_mutex_lock(&cn->mu);
    int busy = cn->inflight > 0;
    if (!busy)
        for (int i = 0; i < 2; i++) {
            cn->m_layer[i] = layer[i];
            cn->m_wait[i] = wait[i];
            cn->m_xfer[i] = xfer[i];
        }
    pthread_mutex_unlock(&cn->mu);
    return busy ? KVF_EBUSY : 0;
}
