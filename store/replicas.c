/* kvf-store's replication of hot entries, from its options (replicas.h). */
#include "replicas.h"

#include "kvf/error.h"

#include "member.h"

#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_NODES 1024 /* etcd's node numbers kept (kvf-sched's limit is lower) */

struct kvf__store_replicas {
    kvf__replicator *rep;
    kvf__watcher *watch;
    pthread_mutex_t mu; /* the watcher's thread and close */
    const char *const *statics;
    size_t n_statics;
    char (*members)[KVF_REP_ADDR]; /* by node number; "" none */
    const kvf_log *log;
};

/* The peers now: --peer's, then the registered nodes'. Called with r->mu held. */
static void publish_locked(kvf__store_replicas *r)
{
    const char *list[KVF_REP_MAX_PEERS];
    size_t n = 0;
    for (size_t i = 0; i < r->n_statics && n < KVF_REP_MAX_PEERS; i++)
        list[n++] = r->statics[i];
    for (size_t i = 0; r->members && i < MAX_NODES && n < KVF_REP_MAX_PEERS; i++)
        if (r->members[i][0])
            list[n++] = r->members[i];
    kvf__replicator_set_peers(r->rep, list, n);
}

/* A store's registration (key /kvfabric/CLUSTER/stores/NODE, record {"addr", ...}) came or went:
 * the watcher's thread. This node's own is among them; the replicator leaves it out. */
static void on_store(void *ud, int put, const char *key, const char *value)
{
    kvf__store_replicas *r = ud;
    long node = kvf__member_key_number(key, MAX_NODES);
    if (node < 0)
        return;
    char addr[KVF_REP_ADDR] = "";
    if (put) {
        if (!kvf__member_record_addr(value, addr, sizeof addr)) {
            kvf_warn(r->log, "etcd: %s: a store record without an address; not a peer", key);
            return;
        }
    }
    pthread_mutex_lock(&r->mu);
    snprintf(r->members[node], KVF_REP_ADDR, "%s", addr);
    publish_locked(r);
    pthread_mutex_unlock(&r->mu);
}

int kvf__store_replicas_open(const kvf__store_replicas_cfg *c, kvf_server *srv, kvf_cache *cache,
                             kvf__store_replicas **out)
{
    *out = NULL;
    if (!c->hits)
        return 0;
    if (!strcmp(c->host, "0.0.0.0") || !strcmp(c->host, "::") || !strcmp(c->host, "*")) {
        fprintf(stderr,
                "kvf-store: --replicate-hits with --listen on %s needs --advertise HOST: "
                "the address clients name this node by decides where its replicas go\n",
                c->host);
        return 1;
    }
    if (c->auth && !c->credential) {
        fprintf(stderr, "kvf-store: --replicate-hits with --auth: the peers authenticate "
                        "clients as this node does; give --copy-credential (an admin's "
                        "credential) for the copies\n");
        return 1;
    }
    if (!c->n_peers && !c->etcd) {
        fprintf(stderr, "kvf-store: --replicate-hits needs the other nodes: --peer HOST:PORT for "
                        "each, or --etcd\n");
        return 1;
    }
    kvf__store_replicas *r = calloc(1, sizeof *r);
    if (!r || (c->etcd && !(r->members = calloc(MAX_NODES, sizeof *r->members)))) {
        free(r);
        fprintf(stderr, "kvf-store: out of memory\n");
        return 1;
    }
    pthread_mutex_init(&r->mu, NULL);
    r->statics = c->peers;
    r->n_statics = c->n_peers;
    r->log = c->log;
    char self[KVF_REP_ADDR + 8], err[300] = "";
    int v6 = strchr(c->host, ':') != NULL;
    snprintf(self, sizeof self, "%s%s%s:%u", v6 ? "[" : "", c->host, v6 ? "]" : "",
             (unsigned)c->port);
    kvf__replicate_opts ro = {.cache = cache,
                              .self = self,
                              .peers = c->peers,
                              .n_peers = c->n_peers,
                              .hits = c->hits,
                              .copies = c->copies,
                              .credential = c->credential,
                              .log = c->log};
    if (kvf__replicator_open(&r->rep, &ro, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-store: %s\n", err);
        kvf__store_replicas_close(&r, srv);
        return 1;
    }
    if (c->etcd) {
        char prefix[300];
        snprintf(prefix, sizeof prefix, "/kvfabric/%s/stores/", c->cluster);
        if (kvf__watcher_start(&r->watch, c->etcd, prefix, on_store, r, c->log, err, sizeof err)) {
            fprintf(stderr, "kvf-store: --etcd: watching the stores: %s\n", err);
            kvf__store_replicas_close(&r, srv);
            return 1;
        }
    }
    kvf__server_set_replicator(srv, r->rep);
    kvf_info(c->log,
             "replication: an entry read %u times is copied to the next %u node(s) of its key "
             "(this node is %s; %zu --peer node(s)%s)",
             c->hits, c->copies ? c->copies : 1, self, c->n_peers,
             c->etcd ? " and the stores registered in etcd" : "");
    *out = r;
    return 0;
}

void kvf__store_replicas_close(kvf__store_replicas **rp, kvf_server *srv)
{
    kvf__store_replicas *r = rp ? *rp : NULL;
    if (!r)
        return;
    *rp = NULL;
    kvf__watcher_stop(&r->watch); /* no peer change after this */
    if (srv)
        kvf__server_set_replicator(srv, NULL);
    kvf__replicator_close(&r->rep);
    pthread_mutex_destroy(&r->mu);
    free(r->members);
    free(r);
}
