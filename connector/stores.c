/*
 * The connector's storage clients (connector_int.h, docs/connector.md "Stores that join and
 * leave"): the one every new transfer, prefetch and lookup runs on, held by each of them until it
 * ends; and, where the nodes come from kvf-sched, a thread that asks kvf-sched for them again every
 * stores_refresh_ms (or, where they come from etcd, looks again whenever the watch of the stores'
 * registrations tells of a change). When the set of live stores changed (one joined, or one left:
 * its lease in etcd lapsed and kvf-sched dropped it), the thread opens a client on the new set,
 * makes it the current one, and closes the old one once the last transfer that holds it has been
 * freed. So a store that joins a running cluster takes its share of the keys (rendezvous hashing
 * moves only the keys it now ranks first), and a transfer never sees its client change under it.
 */
#include "kvf/connector.h"

#include "kvf/error.h"

#include "clock.h"
#include "connector_int.h"
#include "member.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void kvf__nodes_free(char **nodes, size_t n)
{
    for (size_t i = 0; nodes && i < n; i++)
        free(nodes[i]);
    free(nodes);
}

kvf__clref *kvf__clref_new(kvf_client *cl, char **nodes, size_t n)
{
    kvf__clref *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->cl = cl;
    r->refs = 1; /* the connector's, while it is the current one */
    r->nodes = nodes;
    r->n_nodes = n;
    if (nodes)
        qsort(nodes, n, sizeof *nodes, by_name);
    return r;
}

kvf__clref *kvf__clref_hold(kvf_connector *cn)
{
    pthread_mutex_lock(&cn->mu);
    kvf__clref *r = cn->st_closed ? NULL : cn->cur;
    if (r)
        r->refs++;
    pthread_mutex_unlock(&cn->mu);
    return r;
}

void kvf__clref_drop_locked(kvf_connector *cn, kvf__clref *r)
{
    if (r && --r->refs == 0 && r != cn->cur)
        pthread_cond_signal(&cn->st_cv); /* the refresher closes it */
}

void kvf__clref_drop(kvf_connector *cn, kvf__clref *r)
{
    if (!r)
        return;
    pthread_mutex_lock(&cn->mu);
    kvf__clref_drop_locked(cn, r);
    pthread_mutex_unlock(&cn->mu);
}

/* Whether the node list `nodes` (n, unsorted) is the set r was opened on. */
static int same_set(const kvf__clref *r, char **nodes, size_t n)
{
    if (n != r->n_nodes)
        return 0;
    qsort(nodes, n, sizeof *nodes, by_name);
    for (size_t i = 0; i < n; i++)
        if (strcmp(nodes[i], r->nodes[i]) != 0)
            return 0;
    return 1;
}

/* Closes and frees the retired clients that nothing holds any more (their CUDA registrations
 * first: they are of arena views the close unmaps). Only the refresher changes the retired list
 * while the connector is open. Called and returns with cn->mu held. */
static void reap_locked(kvf_connector *cn)
{
    kvf__clref **pp = &cn->retired;
    while (*pp) {
        kvf__clref *r = *pp;
        if (r->refs > 0) {
            pp = &r->next;
            continue;
        }
        *pp = r->next; /* nothing holds it: nobody will look at it again */
        pthread_mutex_unlock(&cn->mu);
        kvf__cuda_views_release_of(cn, r->cl);
        kvf_client_close(&r->cl);
        kvf__nodes_free(r->nodes, r->n_nodes);
        free(r);
        pthread_mutex_lock(&cn->mu);
        cn->st.store_clients_closed++;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The stores registered in etcd */

/* A store etcd told of: its node number (the key's last part) and data address. */
struct kvf__estore {
    long node;
    char addr[160];
};

/* The watch's report of /kvfabric/CLUSTER/stores/NODE: its record ({"addr": ..., ...}) put, or
 * the key gone (the store stopped, or its lease lapsed). The watcher's thread. */
static void on_etcd_store(void *ud, int put, const char *key, const char *value)
{
    kvf_connector *cn = ud;
    long node = kvf__member_key_number(key, 1L << 20);
    if (node < 0)
        return; /* not a store's key */
    char addr[160] = "";
    if (put)
        kvf__member_record_addr(value, addr, sizeof addr);
    pthread_mutex_lock(&cn->mu);
    size_t at = 0;
    while (at < cn->n_estores && cn->estores[at].node < node)
        at++;
    int have = at < cn->n_estores && cn->estores[at].node == node;
    if (addr[0] && have) {
        snprintf(cn->estores[at].addr, sizeof cn->estores[at].addr, "%s", addr);
    } else if (addr[0] && cn->n_estores < KVF_CLIENT_MAX_NODES) {
        memmove(cn->estores + at + 1, cn->estores + at, (cn->n_estores - at) * sizeof *cn->estores);
        cn->estores[at].node = node;
        snprintf(cn->estores[at].addr, sizeof cn->estores[at].addr, "%s", addr);
        cn->n_estores++;
    } else if (!addr[0] && have) { /* gone, or a record without an address: not usable */
        memmove(cn->estores + at, cn->estores + at + 1,
                (cn->n_estores - at - 1) * sizeof *cn->estores);
        cn->n_estores--;
    }
    cn->estores_changed = 1;
    if (cn->st_cv_ready)
        pthread_cond_broadcast(&cn->st_cv);
    pthread_mutex_unlock(&cn->mu);
}

/* The stores etcd told of, in node order, into *nodes and *n. Takes cn->mu. 0, or
 * KVF_ECONNREFUSED (none) or KVF_ENOMEM with the reason in err. */
static int nodes_from_etcd(kvf_connector *cn, char ***nodes, size_t *n, char *err, size_t errlen)
{
    pthread_mutex_lock(&cn->mu);
    cn->estores_changed = 0;
    size_t k = cn->n_estores;
    char **out = k ? calloc(k, sizeof *out) : NULL;
    int rc = !k ? KVF_ECONNREFUSED : !out ? KVF_ENOMEM : 0;
    for (size_t i = 0; !rc && i < k; i++)
        if (!(out[i] = strdup(cn->estores[i].addr)))
            rc = KVF_ENOMEM;
    pthread_mutex_unlock(&cn->mu);
    if (rc) {
        kvf__nodes_free(out, k);
        snprintf(err, errlen, "connector: %s",
                 rc == KVF_ENOMEM ? "out of memory" : "no store is registered in etcd");
        return rc;
    }
    *nodes = out;
    *n = k;
    return 0;
}

int kvf__stores_etcd_open(kvf_connector *cn, const kvf_connector_opts *o, char ***nodes, size_t *n,
                          char *err, size_t errlen)
{
    const char *cluster = o->cluster ? o->cluster : "default";
    if (!kvf__member_cluster_valid(cluster)) {
        snprintf(err, errlen, "connector: cluster \"%.80s\": 1 to 64 of A-Z a-z 0-9 . _ -",
                 cluster);
        return KVF_EINVAL;
    }
    if (!(cn->estores = calloc(KVF_CLIENT_MAX_NODES, sizeof *cn->estores))) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    char prefix[128];
    snprintf(prefix, sizeof prefix, "/kvfabric/%s/stores/", cluster);
    int rc =
        kvf__watcher_start(&cn->st_watch, o->etcd, prefix, on_etcd_store, cn, NULL, err, errlen);
    if (rc)
        return rc;
    /* the first listing, within the connector's deadline */
    uint64_t until = kvf__now_ns() + (uint64_t)cn->deadline_ms * 1000000u;
    while (!kvf__watcher_synced(cn->st_watch) && kvf__now_ns() < until) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (!kvf__watcher_synced(cn->st_watch)) {
        snprintf(err, errlen, "connector: etcd at %.200s did not answer within %d ms", o->etcd,
                 cn->deadline_ms);
        return KVF_ECONNREFUSED;
    }
    rc = nodes_from_etcd(cn, nodes, n, err, errlen);
    if (rc == KVF_ECONNREFUSED)
        snprintf(err, errlen, "connector: no store is registered in etcd under %s", prefix);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* The refresher */

/* Asks kvf-sched (or the table etcd keeps up to date) for the stores; where the set changed,
 * opens a client on it and makes it the current one. Called and returns with cn->mu held. */
static void refresh_locked(kvf_connector *cn)
{
    pthread_mutex_unlock(&cn->mu);
    char **nodes = NULL, err[300] = "";
    size_t n = 0;
    kvf__clref *cur = kvf__clref_hold(cn), *fresh = NULL;
    /* a short answer time: the connector's close waits for this call */
    int t_ms = cn->deadline_ms < 1000 ? cn->deadline_ms : 1000;
    int rc = !cur           ? KVF_ECLOSED
             : cn->st_watch ? nodes_from_etcd(cn, &nodes, &n, err, sizeof err)
                            : kvf__nodes_from_sched(cn->sched, &nodes, &n, t_ms, err, sizeof err);
    if (rc == 0 && !same_set(cur, nodes, n)) {
        kvf_client *cl = NULL;
        rc = kvf__client_open_on(cn, (const char *const *)nodes, n, &cl, err, sizeof err);
        if (rc == 0 && !(fresh = kvf__clref_new(cl, nodes, n))) {
            kvf_client_close(&cl);
            rc = KVF_ENOMEM;
        }
        if (rc == 0)
            nodes = NULL; /* fresh owns them */
    }
    kvf__nodes_free(nodes, n);
    pthread_mutex_lock(&cn->mu);
    if (rc && rc != KVF_ECLOSED) {
        cn->st.store_refresh_failures++;
        snprintf(cn->last_err, sizeof cn->last_err, "stores: %.200s", err);
    }
    if (fresh && cn->cur == cur && !cn->st_stop) {
        /* from now on transfers start on fresh; cur's go on until they end */
        cn->cur = fresh;
        cur->next = cn->retired;
        cn->retired = cur;
        cur->refs--; /* the connector's own hold: cur is no longer the current one */
        cn->st.store_clients_opened++;
        fresh = NULL;
    }
    kvf__clref_drop_locked(cn, cur);
    if (fresh) { /* the connector closed meanwhile */
        pthread_mutex_unlock(&cn->mu);
        kvf_client_close(&fresh->cl);
        kvf__nodes_free(fresh->nodes, fresh->n_nodes);
        free(fresh);
        pthread_mutex_lock(&cn->mu);
    }
}

static void *refresher(void *arg)
{
    kvf_connector *cn = arg;
    uint64_t next = kvf__now_ns() + (uint64_t)cn->refresh_ms * 1000000ull;
    pthread_mutex_lock(&cn->mu);
    while (!cn->st_stop) {
        reap_locked(cn);
        uint64_t now = kvf__now_ns();
        if (now >= next || cn->estores_changed) {
            refresh_locked(cn);
            next = kvf__now_ns() + (uint64_t)cn->refresh_ms * 1000000ull;
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t wait = next - now, ns = (uint64_t)ts.tv_nsec + wait % 1000000000ull;
        ts.tv_sec += (time_t)(wait / 1000000000ull + ns / 1000000000ull);
        ts.tv_nsec = (long)(ns % 1000000000ull);
        pthread_cond_timedwait(&cn->st_cv, &cn->mu, &ts);
    }
    pthread_mutex_unlock(&cn->mu);
    return NULL;
}

int kvf__stores_start(kvf_connector *cn, char *err, size_t errlen)
{
    pthread_cond_init(&cn->st_cv, NULL);
    pthread_mutex_lock(&cn->mu); /* etcd's watch, already running, signals it once ready */
    cn->st_cv_ready = 1;
    pthread_mutex_unlock(&cn->mu);
    if ((!cn->sched && !cn->st_watch) || cn->refresh_ms <= 0)
        return 0;
    int e = pthread_create(&cn->st_th, NULL, refresher, cn);
    if (e) {
        snprintf(err, errlen, "connector: the stores' refresher: %s", strerror(e));
        return KVF_ENOMEM;
    }
    cn->st_started = 1;
    return 0;
}

void kvf__stores_stop(kvf_connector *cn)
{
    pthread_mutex_lock(&cn->mu);
    cn->st_stop = 1;
    cn->st_closed = 1; /* no new holds: calls after close find no client */
    if (cn->st_cv_ready)
        pthread_cond_broadcast(&cn->st_cv);
    pthread_mutex_unlock(&cn->mu);
    if (cn->st_started)
        pthread_join(cn->st_th, NULL);
    cn->st_started = 0;
    kvf__watcher_stop(&cn->st_watch); /* its reports take mu: not held here */
}

void kvf__stores_close(kvf_connector *cn)
{
    kvf__stores_stop(cn);
    /* Called once the workers stopped: nothing reads a view any more. Closing the clients fails
     * every transfer in flight on them (their callbacks run, and find no worker to queue for); a
     * lease a transfer still holds is cut loose from its client. The records stay until the
     * connector is freed, since transfers not yet freed still name them. */
    pthread_mutex_lock(&cn->mu);
    kvf__clref *cur = cn->cur, *retired = cn->retired;
    pthread_mutex_unlock(&cn->mu);
    /* exclusive of any transfer releasing its lease (xfer_destroy): a release runs before the
     * close or after it, when the lease is cut loose from its client */
    pthread_rwlock_wrlock(&cn->lease_rw);
    if (cur)
        kvf_client_close(&cur->cl);
    for (kvf__clref *r = retired; r; r = r->next)
        kvf_client_close(&r->cl);
    pthread_rwlock_unlock(&cn->lease_rw);
}

void kvf__stores_free(kvf_connector *cn)
{
    kvf__clref *all[2] = {cn->cur, cn->retired};
    cn->cur = cn->retired = NULL;
    for (int i = 0; i < 2; i++)
        for (kvf__clref *r = all[i], *next; r; r = next) {
            next = i ? r->next : NULL;
            kvf_client_close(&r->cl);
            kvf__nodes_free(r->nodes, r->n_nodes);
            free(r);
        }
    kvf__watcher_stop(&cn->st_watch);
    free(cn->estores);
    if (cn->st_cv_ready)
        pthread_cond_destroy(&cn->st_cv);
    free(cn->sched);
    free(cn->credential);
}
