/*
 * kvf-store's replication of hot entries (replicate.h), set up from its options: this node's
 * address, its --peer nodes and, with --etcd, the storage nodes registered in the cluster
 * (watched: a node that joins is a peer from then on, one whose lease lapses no longer is).
 */
#ifndef KVF_STORE_REPLICAS_H
#define KVF_STORE_REPLICAS_H

#include "log.h"
#include "replicate.h"
#include "server.h"

#include <stddef.h>
#include <stdint.h>

typedef struct kvf__store_replicas kvf__store_replicas;

typedef struct kvf__store_replicas_cfg {
    uint32_t hits;            /* --replicate-hits (0: off: nothing is started) */
    uint32_t copies;          /* --replicas - 1 (0: 1) */
    const char *host;         /* --advertise, else --listen's host */
    uint16_t port;            /* the bound port */
    const char *const *peers; /* --peer */
    size_t n_peers;
    const char *etcd, *cluster; /* --etcd, --cluster (NULL: no membership) */
    const char *credential;     /* --copy-credential */
    int auth;                   /* --auth given: the peers are taken to require it too */
    const kvf_log *log;
} kvf__store_replicas_cfg;

/* Starts replication (nothing with hits 0) and hands the replicator to srv for STATS and
 * /metrics. 0 with *out (NULL when off), or the exit status 1 after saying why on stderr. */
int kvf__store_replicas_open(const kvf__store_replicas_cfg *c, kvf_server *srv, kvf_cache *cache,
                             kvf__store_replicas **out);
/* Stops the watcher and the replicator; before the server and the cache close. Accepts NULL. */
void kvf__store_replicas_close(kvf__store_replicas **r, kvf_server *srv);

#endif
