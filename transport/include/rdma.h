/*
 * RDMA transport over libibverbs and librdmacm (docs/rdma.md): connection management with
 * rdma_cm, one protection domain and one completion queue per device, memory registration with a
 * cache, and one-sided batched transfers (RDMA READ for gets, RDMA WRITE for puts) posted as
 * work-request chains with selective signalling, never more than the queue depth in flight, and
 * completions polled in batches.
 *
 * Built only where the RDMA development headers are (KVF_HAVE_RDMA); kvf__rdma_available() says
 * so at run time either way. Tested here against mocked verbs (tests/unit/test_rdma.c): no
 * machine of this project has an RDMA device.
 */
#ifndef KVF_TRANSPORT_RDMA_H
#define KVF_TRANSPORT_RDMA_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvf__rdma_conn kvf__rdma_conn;
typedef struct kvf__rdma_listener kvf__rdma_listener;

typedef struct kvf__rdma_opts {
    uint32_t queue_depth;  /* send queue depth: work requests in flight at most; 0: 128 */
    uint32_t signal_every; /* a signalled work request every this many (and the last of every
                            * chain); 0: 16 */
    uint32_t chain_max;    /* work requests per ibv_post_send call at most; 0: 32 */
    int timeout_ms;        /* address and route resolution, connection setup; 0: 2000 */
} kvf__rdma_opts;

/* One transfer of a batch: len bytes between local memory (registered through the cache) and
 * (remote, rkey) on the peer. status is filled by kvf__rdma_transfer. */
typedef struct kvf__rdma_op {
    void *local;
    uint64_t remote;
    uint32_t rkey;
    uint32_t len;
    int status; /* output: 0 or KVF_E* */
} kvf__rdma_op;

/* Whether this build has RDMA and this host has at least one RDMA device. reason (may be NULL)
 * gets what is missing: "this build has no RDMA (libibverbs/librdmacm headers absent)" or "no
 * RDMA device". */
int kvf__rdma_available(char *reason, size_t len);
/* Whether this build has the RDMA transport (the headers were there). */
int kvf__rdma_built(void);

/* Connects to an RDMA listener at host:port (resolve address, resolve route, create the queue
 * pair on the device's PD and CQ, connect). Returns 0, KVF_ENODEV (no RDMA device or route),
 * KVF_ECONNREFUSED, KVF_ETIMEDOUT, KVF_ENOMEM, or KVF_ENOTSUP in a build without RDMA; err gets
 * one line. */
int kvf__rdma_connect(const char *host, uint16_t port, const kvf__rdma_opts *o,
                      kvf__rdma_conn **out, char *err, size_t errlen);
/* Listens with rdma_cm on host:port (0: a free port, written to *bound). */
int kvf__rdma_listen(const char *host, uint16_t port, const kvf__rdma_opts *o,
                     kvf__rdma_listener **out, uint16_t *bound, char *err, size_t errlen);
/* Waits up to timeout_ms for one connection request and accepts it. */
int kvf__rdma_accept(kvf__rdma_listener *l, int timeout_ms, kvf__rdma_conn **out, char *err,
                     size_t errlen);
/* Registers [addr, addr+len) for remote read and write on the listener's device, once, and keeps
 * the device open until the listener closes: the storage node's arena, whose rkey it hands to
 * clients in its descriptors. The listener must be bound to an address an RDMA device owns (not
 * the wildcard). Returns 0 with *rkey, KVF_ENODEV, KVF_ENOMEM or KVF_EIO; err gets one line. */
int kvf__rdma_listener_register(kvf__rdma_listener *l, void *addr, size_t len, uint32_t *rkey,
                                char *err, size_t errlen);
/* Waits up to timeout_ms for one event on the listener and handles it: a connection request is
 * accepted (*accepted), a peer that disconnected names its connection (*gone: the caller closes
 * it). Returns 0 (an event handled, possibly neither), KVF_ETIMEDOUT (none came), or the error of
 * a failed accept. */
int kvf__rdma_listener_poll(kvf__rdma_listener *l, int timeout_ms, kvf__rdma_conn **accepted,
                            kvf__rdma_conn **gone, char *err, size_t errlen);
void kvf__rdma_listener_close(kvf__rdma_listener **l);

/* Registers [addr, addr+len) with the connection's device, once: a range inside one already
 * registered reuses it. remote allows the peer to read and write it (the store's arena); local
 * regions (staging, engine memory) are registered for local access only. Returns 0 with the keys,
 * or KVF_ENOMEM / KVF_EIO. */
int kvf__rdma_register(kvf__rdma_conn *c, void *addr, size_t len, int remote, uint32_t *lkey,
                       uint32_t *rkey);
/* Reads (write == 0) or writes a batch. Every op's status is set; ops after a failed one fail
 * with it. A completion error breaks the connection (kvf__rdma_broken): the caller closes it,
 * connects again and counts the failed ops as misses. Returns 0 or the first failure. */
int kvf__rdma_transfer(kvf__rdma_conn *c, int write, kvf__rdma_op *ops, size_t n, int timeout_ms);
/* The same, calling progress(ctx, done) each time the ops completed in order reach a new count
 * (done ops, all successful): a layer-major batch (layer 0 of every chunk, then layer 1, ...)
 * tells its caller layer by layer that a layer has landed, so the engine computes layer l while
 * later layers are still on the wire. progress runs on the transferring thread while the device
 * is busy: keep it short (set a flag, signal a condition). progress may be NULL. */
int kvf__rdma_transfer_progress(kvf__rdma_conn *c, int write, kvf__rdma_op *ops, size_t n,
                                int timeout_ms, void (*progress)(void *ctx, size_t done),
                                void *ctx);
int kvf__rdma_broken(const kvf__rdma_conn *c);
/* Disconnects and frees in order: queue pair, memory registrations, then the device's CQ and PD
 * when no other connection uses them, the cm id, the event channel. Accepts NULL; clears *c. */
void kvf__rdma_close(kvf__rdma_conn **c);

/* The KVF_E* code of a work completion's status (an enum ibv_wc_status value). */
int kvf__rdma_wc_error(int wc_status);

/* Counters of a connection, for tests and stats. */
typedef struct kvf__rdma_stats {
    uint64_t posts;     /* ibv_post_send calls */
    uint64_t wrs;       /* work requests posted */
    uint64_t signalled; /* of which signalled */
    uint64_t polls;     /* ibv_poll_cq calls */
    uint32_t max_outstanding;
} kvf__rdma_stats;
void kvf__rdma_stats_get(const kvf__rdma_conn *c, kvf__rdma_stats *out);

#endif
