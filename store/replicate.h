/*
 * Replicas of hot entries (docs/store.md, "Replicas of hot chunks"): an entry read
 * --replicate-hits times is copied to the --replicas - 1 other storage nodes that come first after
 * this node in the key's rendezvous order over this node and its peers: the order clients place
 * keys by (client/place.c). A client that finds this node down moves the key to the next live node
 * of that order (kvf_client_set_reroute), and finds a copy there while fewer than --replicas of
 * its holders are down. Not a public interface.
 */
#ifndef KVF_STORE_REPLICATE_H
#define KVF_STORE_REPLICATE_H

#include "cache.h"
#include "log.h"

#include <stddef.h>
#include <stdint.h>

/* Most peers a node replicates to. */
#define KVF_REP_MAX_PEERS 256
/* Other nodes a hot entry is copied to, at most. */
#define KVF_REP_MAX_COPIES 7
/* Longest address "host:port" of a node, as clients name it. */
#define KVF_REP_ADDR 160

typedef struct kvf__replicator kvf__replicator;

typedef struct kvf__replicate_opts {
    kvf_cache *cache;
    const char *self;         /* this node's address as clients name it */
    const char *const *peers; /* the other nodes' (may include self: skipped) */
    size_t n_peers;
    uint32_t hits;          /* reads that make an entry hot: 1..255 */
    uint32_t copies;        /* other nodes each hot entry goes to: 1..KVF_REP_MAX_COPIES; 0: 1 */
    const char *credential; /* what the pushes authenticate with (NULL or "": none) */
    int deadline_ms;        /* of a push; 0: 3000 */
    size_t queue;           /* entries that may wait for the worker; 0: 4096 */
    const kvf_log *log;
} kvf__replicate_opts;

typedef struct kvf__replicate_stats {
    uint32_t hits;    /* reads that make an entry hot */
    uint32_t copies;  /* other nodes each goes to */
    uint64_t queued;  /* entries handed to the worker */
    uint64_t made;    /* copies stored on their peer (or found there) */
    uint64_t failed;  /* copies that did not store (the entry is asked for again at a later
                       * read) */
    uint64_t full;    /* hot entries not queued: the queue was full */
    uint64_t no_peer; /* hot entries with no live peer to go to */
    size_t peers, peers_down;
} kvf__replicate_stats;

/* Starts the worker and installs the cache's replication hook. 0, or a KVF_E* code with one line
 * in err. */
int kvf__replicator_open(kvf__replicator **out, const kvf__replicate_opts *o, char *err,
                         size_t errlen);
/* Replaces the peers (etcd's membership: stores that join and leave); self is skipped. */
void kvf__replicator_set_peers(kvf__replicator *r, const char *const *peers, size_t n);
void kvf__replicator_stats(kvf__replicator *r, kvf__replicate_stats *st);
/* Removes the hook, stops the worker (a push in flight ends within its deadline), drops the
 * references of what was queued. Accepts NULL; clears *r. */
void kvf__replicator_close(kvf__replicator **r);

#endif
