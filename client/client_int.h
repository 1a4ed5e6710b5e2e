/*
 * What the client's RDMA data path (client_rdma.c) and the rest of the client (client.c) share.
 * Not a public interface.
 */
#ifndef KVF_STORE_CLIENT_PRIV_H
#define KVF_STORE_CLIENT_PRIV_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/client.h"

/* Largest reply payload of a raw control request (an RDMA_GET answers with object headers). */
#define KVF_CLIENT_RAW_MAX (256ull << 20)

/* Sends one control request with the given payload to node `node` over TCP, on its connection
 * `conn` (-1: the next in turn; requests about a reservation must use the connection that made
 * it), and waits for its reply. Returns 0 with the reply payload (caller frees *reply), or the
 * error the node answered or the transport met. */
int kvf__client_raw(kvf_client *c, size_t node, int conn, uint32_t opcode, uint32_t count,
                    const void *payload, size_t plen, uint8_t **reply, size_t *rlen,
                    int deadline_ms);
/* Node i's host and what its HELLO said (RDMA port, capabilities); zeros before the reply. */
void kvf__client_node(const kvf_client *c, size_t i, const char **host, uint16_t *rdma_port,
                      uint64_t *caps);
uint64_t kvf__client_ns(const kvf_client *c);
void kvf__client_count(kvf_client *c, uint64_t requests, uint64_t sent, uint64_t received,
                       uint64_t failed, uint64_t reconnects);

const kvf_batch *kvf__op_batch(const kvf_op *op);
int kvf__op_is_get(const kvf_op *op);
uint64_t kvf__op_deadline_ns(const kvf_op *op);
/* Completes an op handed to the RDMA path: runs its callback or wakes its waiter. */
void kvf__op_finish(kvf_op *op, int result);

/* I/O threads: a client opens this many shards at most (client_shards.c). */
#define KVF_CLIENT_MAX_SHARDS 8

/* Splits the get (get 1) or put in parent's batch into one child op per shard (shards[0..n)),
 * by bytes, and completes parent when the last child completes. 0 or KVF_ENOMEM (nothing
 * submitted). */
int kvf__shards_submit(kvf_client *const *shards, int n_shards, kvf_op *parent, int get);
/* kvf_client_get_async (get 1) or kvf_client_put_async on c's own I/O thread and connections,
 * never split across shards: how a shard takes its share of a split op. */
int kvf__client_submit_own(kvf_client *c, const kvf_batch *b, kvf_op **op, int get);
/* The counters of shard i alone (0 is the client itself): 0, or KVF_EINVAL past the last. */
int kvf__client_shard_counters(kvf_client *c, int i, kvf_client_counters *out);

/* The RDMA data path: a worker thread that runs gets and puts with descriptors over TCP and
 * one-sided transfers over RDMA. */
typedef struct kvf__crdma kvf__crdma;
/* Opens it when this host has a device and every node offers RDMA (asked within probe_ms) and
 * accepts a connection; otherwise *out stays NULL and why says what was missing (the client then
 * uses TCP). */
int kvf__crdma_open(kvf_client *c, int probe_ms, kvf__crdma **out, char *why, size_t whylen);
int kvf__crdma_submit(kvf__crdma *r, kvf_op *op);
/* Finishes the op in progress, fails queued ones with KVF_ECANCELED, closes the connections. */
void kvf__crdma_close(kvf__crdma **r);

#endif
