/*
 * kvf-sched's membership on etcd (daemon.h, docs/membership.md): the storage nodes are learnt
 * from their registrations instead of --stores and --store-events, and this replica registers
 * itself so that engines and routers can find every replica.
 */
#include "daemon.h"

#include "kvf/error.h"

#include "member.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* d->stores rebuilt from the registered nodes, in node order; whether any is. Called with d->mu
 * held. */
static int rebuild_stores_locked(kvf__sched_daemon *d)
{
    size_t off = 0;
    int n = 0;
    d->stores[0] = 0;
    for (int i = 0; i < KVF_SCHED_MAX_STORES; i++) {
        if (!d->store_rec[i][0])
            continue;
        json_t *o = json_loads(d->store_rec[i], 0, NULL);
        const char *addr = json_string_value(json_object_get(o, "addr"));
        int w =
            addr ? snprintf(d->stores + off, sizeof d->stores - off, "%s%s", off ? "," : "", addr)
                 : 0;
        if (w > 0 && (size_t)w < sizeof d->stores - off)
            off += (size_t)w;
        json_decref(o);
        n++;
    }
    return n;
}

/* A store's registration changed: key /kvfabric/CLUSTER/stores/NODE, value its record (put), or
 * gone (its lease lapsed: it died or was cut off; or revoked: it stopped). The watcher's thread. */
static void on_store(void *ud, int put, const char *key, const char *value)
{
    kvf__sched_daemon *d = ud;
    long node = kvf__member_key_number(key, KVF_SCHED_MAX_STORES);
    if (node < 0) {
        kvf_warn(&d->lg, "etcd: %s: not a store's key (/stores/0 to /stores/%d); ignored", key,
                 KVF_SCHED_MAX_STORES - 1);
        return;
    }
    char events[128] = "", snap[128] = "", addr[160] = "", zone[64] = "";
    if (put) {
        json_t *o = json_loads(value, 0, NULL);
        const char *ev = json_string_value(json_object_get(o, "events"));
        const char *sn = json_string_value(json_object_get(o, "snapshot"));
        const char *ad = json_string_value(json_object_get(o, "addr"));
        json_t *nv = json_object_get(o, "node"), *zv = json_object_get(o, "zone");
        const char *zn = json_string_value(zv);
        int ok = ev && sn && ad && json_is_integer(nv) && json_integer_value(nv) == node &&
                 strlen(ev) < sizeof events && strlen(sn) < sizeof snap &&
                 strlen(ad) < sizeof addr && strlen(value) < sizeof d->store_rec[0] &&
                 (!zv || kvf__member_zone_valid(zn)); /* its zone: optional */
        if (ok) {
            snprintf(events, sizeof events, "%s", strcmp(ev, "-") ? ev : "");
            snprintf(snap, sizeof snap, "%s", strcmp(sn, "-") ? sn : "");
            snprintf(addr, sizeof addr, "%s", ad);
            snprintf(zone, sizeof zone, "%s", zn ? zn : "");
        }
        json_decref(o);
        if (!ok) {
            kvf_warn(&d->lg, "etcd: %s: a malformed store record; ignored: %.200s", key, value);
            return;
        }
    }
    pthread_mutex_lock(&d->mu);
    char *rec = d->store_rec[node];
    if (put && !strcmp(rec, value)) {
        pthread_mutex_unlock(&d->mu);
        return;
    }
    int was = rec[0] != 0;
    if (was) { /* gone, or replaced (a restart): what it held is learnt again, if at all */
        kvf__sched_unsubscribe_store_locked(d, (int)node);
        kvf_sched_store_cleared(d->s, (int)node);
    }
    kvf_sched_store_where(d->s, (int)node, put ? addr : NULL, zone);
    if (put) {
        snprintf(rec, sizeof d->store_rec[0], "%s", value);
        kvf_event_source src = {.instance = -1, .store = (int)node};
        if (events[0])
            kvf__sched_subscribe_locked(d, &src, events, snap);
        d->store_joins++;
    } else {
        rec[0] = 0;
        d->store_leaves++;
    }
    int n = rebuild_stores_locked(d);
    kvf_sched_set_no_stores(d->s, n == 0);
    pthread_mutex_unlock(&d->mu);
    if (put)
        kvf_info(&d->lg, "etcd: store %ld %s at %s (events %s)", node,
                 was ? "registered again" : "joined", addr, events[0] ? events : "none");
    else
        kvf_warn(&d->lg,
                 "etcd: store %ld left (its lease lapsed or was revoked): placement no "
                 "longer uses it",
                 node);
}

/* An engine's registration changed: key /kvfabric/CLUSTER/engines/ID, value its registration
 * record (POST /v1/instances' body), or gone (its lease lapsed or was revoked). A record makes
 * the instance (or, where the engine registered over HTTP already with the same record, keeps
 * it) and pins it: its lease, not --instance-ttl, says when it is gone; its key going removes it
 * at once. The watcher's thread. */
static void on_engine(void *ud, int put, const char *key, const char *value)
{
    kvf__sched_daemon *d = ud;
    const char *id = strrchr(key, '/');
    id = id ? id + 1 : key;
    char err[256] = "", replay[128] = "";
    uint32_t event_shards = 0;
    kvf_instance_info in;
    if (put) {
        json_t *o = json_loads(value, 0, NULL);
        int bad =
            !json_is_object(o) || kvf__sched_instance_parse(o, &in, replay, sizeof replay,
                                                            &event_shards, err, sizeof err) != 0;
        json_decref(o);
        if (!bad && strcmp(in.id, id) != 0)
            bad = 1, snprintf(err, sizeof err, "its record names \"%s\"", in.id);
        if (bad) {
            kvf_warn(&d->lg, "etcd: %s: a malformed engine record (%s); ignored", key, err);
            return;
        }
    }
    pthread_mutex_lock(&d->mu);
    int idx = kvf_sched_instance_find(d->s, id), rc = 0, fresh = 0, had = idx >= 0;
    if (put) {
        rc = kvf__sched_register_locked(d, &in, replay, event_shards, 1, &idx, &fresh, err,
                                        sizeof err);
        if (rc == KVF_EEXIST && had) { /* another record under its id: the engine restarted */
            kvf__sched_remove_locked(d, idx);
            rc = kvf__sched_register_locked(d, &in, replay, event_shards, 1, &idx, &fresh, err,
                                            sizeof err);
        }
        if (rc == 0) {
            d->reg[idx].pinned = 1;
            d->engine_joins += fresh;
        }
    } else if (had) {
        kvf__sched_remove_locked(d, idx);
        d->engine_leaves++;
    }
    pthread_mutex_unlock(&d->mu);
    if (put && rc)
        kvf_warn(&d->lg, "etcd: engine %s: %s", id, err[0] ? err : kvf_strerror(rc));
    else if (put && fresh)
        kvf_info(&d->lg, "etcd: engine %s joined", id);
    else if (!put && had)
        kvf_warn(&d->lg, "etcd: engine %s left (its lease lapsed or was revoked): removed", id);
}

int kvf__sched_etcd_start(kvf__sched_daemon *d, const kvf__sched_etcd *o)
{
    char prefix[300], key[600], err[600] = "";
    char(*rec0)[512] = calloc(KVF_SCHED_MAX_STORES, sizeof *rec0);
    if (!rec0) {
        fprintf(stderr, "kvf-sched: out of memory\n");
        return 1;
    }
    /* the HTTP thread already serves: what it reads is set under the lock */
    pthread_mutex_lock(&d->mu);
    d->store_rec = rec0;
    pthread_mutex_unlock(&d->mu);
    snprintf(prefix, sizeof prefix, "/kvfabric/%s/stores/", o->cluster);
    kvf__watcher *w = NULL;
    if (kvf__watcher_start(&w, o->etcd, prefix, on_store, d, &d->lg, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-sched: --etcd: %s\n", err);
        return 1;
    }
    pthread_mutex_lock(&d->mu);
    d->store_watch = w;
    pthread_mutex_unlock(&d->mu);
    snprintf(prefix, sizeof prefix, "/kvfabric/%s/engines/", o->cluster);
    kvf__watcher *we = NULL;
    if (kvf__watcher_start(&we, o->etcd, prefix, on_engine, d, &d->lg, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-sched: --etcd: %s\n", err);
        return 1;
    }
    pthread_mutex_lock(&d->mu);
    d->engine_watch = we;
    pthread_mutex_unlock(&d->mu);
    int v6 = strchr(o->advertise, ':') != NULL;
    char addr[300];
    snprintf(addr, sizeof addr, "%s%s%s:%u", v6 ? "[" : "", o->advertise, v6 ? "]" : "",
             (unsigned)o->port);
    snprintf(key, sizeof key, "/kvfabric/%s/scheds/%s", o->cluster, addr);
    json_t *rec = json_pack("{s:s,s:i,s:i,s:i}", "addr", addr, "pid", (int)getpid(), "shard",
                            (int)d->shard, "shards", d->shards > 1 ? (int)d->shards : 1);
    char *value = rec ? json_dumps(rec, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(rec);
    kvf__member_opts mo = {.endpoints = o->etcd,
                           .key = key,
                           .value = value ? value : "{}",
                           .ttl_s = o->ttl_s,
                           .log = &d->lg};
    int rc = kvf__member_start(&d->self, &mo, err, sizeof err);
    free(value);
    if (rc) {
        fprintf(stderr, "kvf-sched: --etcd: %s\n", err);
        return 1; /* the caller stops the watcher */
    }
    /* the stores' first listing, before the ready line (bounded: 5 s; later it comes anyway) */
    for (int i = 0; i < 100 && !kvf__watcher_synced(w); i++)
        usleep(50000);
    if (!kvf__watcher_synced(w))
        kvf_warn(&d->lg, "etcd: the stores are not listed yet; placement starts without them");
    return 0;
}

int kvf__sched_etcd_synced_locked(kvf__sched_daemon *d)
{
    return !d->store_rec || kvf__watcher_synced(d->store_watch);
}

void kvf__sched_etcd_stop(kvf__sched_daemon *d)
{
    kvf__member_stop(&d->self);
    pthread_mutex_lock(&d->mu);
    kvf__watcher *w = d->store_watch, *we = d->engine_watch;
    d->store_watch = d->engine_watch = NULL;
    pthread_mutex_unlock(&d->mu);
    kvf__watcher_stop(&w); /* their threads, which take the lock, end here */
    kvf__watcher_stop(&we);
    pthread_mutex_lock(&d->mu);
    free(d->store_rec);
    d->store_rec = NULL;
    pthread_mutex_unlock(&d->mu);
}
