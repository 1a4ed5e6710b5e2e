/*
 * A storage node's chunk events for kvf-sched (docs/scheduler.md, "KV events"): ZeroMQ PUB with
 * vLLM's framing ([topic, 8-byte big-endian sequence, msgpack [ts, events, 0]]) and kvfabric's
 * events ["ChunksAdmitted", node, [16-byte keys]] and ["ChunksEvicted", node, keys], in the order
 * the cache made the changes. A thread of its own sends a batch every 20 ms; the cache only
 * appends to a buffer.
 */
#ifndef KVF_STORE_PUBLISH_H
#define KVF_STORE_PUBLISH_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"

#include "pubsub.h"
#include "tenants.h"

typedef struct kvf__pub kvf__pub;

/* Binds a PUB socket on host:port (0: a free port) and starts the sender. node is this store's
 * number in kvf-sched's --store-events list. *endpoint gets the bound "tcp://HOST:PORT". With
 * tenants (borrowed, may be NULL), a tenant's changes go under the topic "kvf-store/t/NAME/" and
 * nobody's under "kvf-store"; with sec (may be NULL), the socket is secured (pubsub.h: CURVE, and
 * a subscriber that is not an admin gets its own tenant's topic only). */
int kvf__pub_open(kvf__pub **out, const char *host, uint16_t port, int node, kvf__tenants *tenants,
                  const kvf__zsec *sec, char *endpoint, size_t eplen, char *err, size_t errlen);
/* Notes a change of the DRAM tier (disk 0) or of the disk tier (1) (thread-safe; the cache's and
 * the tier's on_change hook). Beyond 1M pending changes they are dropped and the sequence skips
 * one, so the subscriber sees a gap. */
void kvf__pub_note(void *pub, int admitted, int disk, const kvf_key *key, uint32_t tenant);
/* Publishes the node's measured rate of reads from its disk tier every 2 s (a StoreRates event:
 * kvf-sched's cost model loads disk-only chunks at it), as fn returns it; 0: nothing to say
 * (no reads since). fn is called from the sender thread, under the publisher's lock: after
 * kvf__pub_set_rates(p, NULL, NULL) returns, it is not called again. */
void kvf__pub_set_rates(kvf__pub *p, uint64_t (*fn)(void *ctx), void *ctx);
/* Lists what the node holds: add() for each object, disk 0 for the DRAM tier and 1 for the disk
 * tier's, with the tenant it is charged to (0: nobody). */
typedef void (*kvf__pub_list_fn)(
    void *ctx, void (*add)(void *ud, int disk, const kvf_key *key, uint32_t tenant), void *ud);
/* Answers snapshot requests on a ROUTER bound on host:port (0: a free port; *endpoint gets its
 * address; secured as the publisher is): list()'s holdings as ChunksAdmitted batches, numbered
 * with the last sequence number sent (pubsub.h, kvf__zpub_snapshots), so that a kvf-sched that
 * subscribed late, or lost batches, learns what the node holds. list is called on the socket's
 * thread until kvf__pub_stop_snapshots(). 0, or a KVF_E* code with one line in err. */
int kvf__pub_snapshots(kvf__pub *p, const char *host, uint16_t port, kvf__pub_list_fn list,
                       void *ctx, char *endpoint, size_t eplen, char *err, size_t errlen);
/* list() is not called again once this returns (before what it reads is closed); a request
 * answered after it gets no snapshot and asks again. Accepts NULL. */
void kvf__pub_stop_snapshots(kvf__pub *p);
/* Sends what is pending, stops the sender and frees. Accepts NULL; clears *p. */
void kvf__pub_close(kvf__pub **p);

#endif
