/*
 * kvf/client.h - the storage client: batched, asynchronous operations against one or many
 * kvf-store nodes over TCP, with object bytes over RDMA where both sides have it (docs/rdma.md).
 *
 * A client connects to a list of nodes and places each key on one of them by rendezvous hashing
 * (highest random weight: a node joining or leaving moves only the keys it gains or held). It
 * opens several connections per node and stripes large batches across them. An I/O thread (or
 * several: io_threads) drives the connections; operations are submitted from any thread and
 * complete through a callback (run on an I/O thread) or kvf_op_wait().
 *
 * Every operation has a deadline. A node that is down, slower than the deadline, or that returns
 * an object whose checksum does not verify makes the keys it holds fail with a per-key status
 * (KVF_ECONNREFUSED, KVF_ETIMEDOUT, KVF_ECHECKSUM ...), which a cache treats as a miss; the bytes
 * of such a key in the caller's buffer are unspecified and must not be used. A failed submission
 * never runs its callback.
 */
#ifndef KVF_CLIENT_H
#define KVF_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/export.h"
#include "kvf/layout.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvf_client kvf_client;
typedef struct kvf_op kvf_op;

/* Most nodes one client talks to. */
#define KVF_CLIENT_MAX_NODES 256

typedef struct kvf_client_opts {
    const char *const *nodes; /* input: "host:port" of each node; borrowed during open */
    size_t n_nodes;           /* input: 1..KVF_CLIENT_MAX_NODES */
    uint64_t ns;              /* input: namespace of every key (kvf_keyspace.seed); nonzero */
    int conns_per_node;       /* input: connections per node for striping; 0: 4, or one per I/O
                               * thread where there are more */
    int connect_timeout_ms;   /* input: 0: 1000 */
    int deadline_ms;          /* input: default deadline of an operation; 0: 5000 */
    uint64_t stripe_bytes;    /* input: smallest stripe worth its own connection; 0: 4 MiB */
    /* input: data path of gets and puts: "auto" (NULL): shared memory for the nodes on this host
     * that serve it (the others' keys over TCP), else RDMA where this host has a device and every
     * node serves it, else TCP; "tcp"; "shm+tcp": shared memory where it can, TCP otherwise,
     * never RDMA; "shm" or "rdma" (open fails where it is not possible).
     * With shared memory, control requests to those nodes travel over their Unix sockets too;
     * otherwise over TCP. kvf_client_transport() says what was chosen and why. */
    const char *transport;
    /* input: I/O threads that large gets and puts (two stripes' worth of bytes or more) are
     * split across, each with its share of conns_per_node (at most that many threads); 0: auto,
     * a quarter of the cores this process may use, 1 to 8 (on two cores one measured fastest,
     * on sixteen four moved 4x what one did). */
    int io_threads;
    /* input: path of a credential file (`kvf auth new`) to authenticate with, on nodes that
     * require it; NULL: $KVF_CREDENTIAL where set, else none; "": none. Read at open, not kept. */
    const char *credential;
    /* input: shared memory: the lease asked for each get's objects (0: 2000 ms, doubled up to
     * 16 s after each get or kvf_client_lease whose reader outlasted it; a key whose copy outlasts
     * it is asked again over TCP, once), and each worker's staging region per node (0: 64
     * MiB; objects larger go over TCP where a staging region is needed). */
    uint32_t shm_lease_ms;
    uint64_t shm_staging_bytes;
} kvf_client_opts;

/* Opens a client and connects to every node (a node that does not answer is retried later and
 * fails its keys meanwhile). err gets one line on failure. Caller owns the result; free with
 * kvf_client_close(). Returns 0, KVF_EINVAL (bad options or address), or KVF_ENOMEM. */
KVF_API int kvf_client_open(kvf_client **out, const kvf_client_opts *opts, char *err,
                            size_t errlen);
/* Fails every operation still in flight with KVF_ECANCELED (running their callbacks), stops the
 * I/O thread and frees the client. A get or put asked once the close has begun (by one of those
 * callbacks, say) fails with KVF_ECLOSED. Accepts NULL and clears *c. */
KVF_API void kvf_client_close(kvf_client **c);

/* Rerouting (off at open): while a node is marked down (a request it did not answer in time, a
 * connection it refused; for a backoff of 0.2 s doubling to 5 s, after which a request probes
 * it), each of its keys goes to the next node in that key's rendezvous order, as if the node had
 * left: puts land there and gets look there (a replica of a hot chunk, or what was put
 * meanwhile), instead of failing at once (KVF_EHOSTUNREACH, KVF_ECONNREFUSED). Chunks are
 * immutable under their key, so a key read elsewhere is a miss at worst. The connector turns it
 * on for its engines; without it a dead node's keys fail, as tools expect. */
KVF_API void kvf_client_set_reroute(kvf_client *c, int on);
/* The node index a key is placed on (with rerouting: now). */
KVF_API size_t kvf_client_node_of(const kvf_client *c, const kvf_key *key);
KVF_API size_t kvf_client_node_count(const kvf_client *c);
/* The index of the node whose address is addr ("host:port", as the client was given it or as a
 * store advertises it: "localhost" and "127.0.0.1" are the same host; a "tcp://" prefix is
 * ignored), or -1 where the client has no such node. */
KVF_API int kvf_client_node_index(const kvf_client *c, const char *addr);

/* Completion callback: runs once on the client's I/O thread when every key of op has a status.
 * status is 0 when the operation ran (per-key results say what happened to each key), or the
 * error that ended it as a whole. It must not block; it may call kvf_op_free(). */
typedef void (*kvf_op_cb)(kvf_op *op, int status, void *ud);
/* Layer callback of a streamed get: layer l of every key that hit is in its buffer and verified. */
typedef void (*kvf_layer_cb)(kvf_op *op, uint32_t layer, void *ud);

/* Flags of kvf_client_get_async. */
#define KVF_GET_STREAM 0x1u /* ask for layer-major streaming and call layer_cb per layer */

/* Arguments of the batched operations. Arrays are borrowed and, with the buffers, must stay valid
 * and unchanged until the operation completes. */
typedef struct kvf_batch {
    size_t n;                /* input: number of keys */
    const kvf_key *keys;     /* input: n keys */
    const void *const *objs; /* put input: n objects (kvf object format) */
    const uint64_t *lens;    /* put input: their lengths */
    void *const *bufs;       /* get input: n destination buffers */
    const uint64_t *caps;    /* get input: their capacities */
    uint64_t *out_lens;      /* get output: bytes written to each buffer (may be NULL) */
    int *status;             /* output: per-key status (required) */
    uint32_t flags;          /* get input: KVF_GET_* */
    int deadline_ms;         /* input: 0 for the client's default */
    kvf_op_cb cb;            /* input: completion callback, or NULL to use kvf_op_wait() */
    kvf_layer_cb layer_cb;   /* input: streamed get, per layer (may be NULL) */
    void *ud;                /* input: passed to the callbacks */
    /* get input (may be NULL): per key, the node to ask (its index in the client's list,
     * kvf_client_node_index()), as a plan names the nearest holder of a replicated chunk, or
     * KVF_NODE_ANY for the key's own node (kvf_client_node_of). A named node that is out of
     * range or marked down is passed over for the key's own. A key the named node lacks is a
     * miss of a plain get: the caller asks again without a name (kvf_connector_prefetch_from
     * does). A streamed get asks its own node itself, in the same get, before it reports any
     * layer (a miss, or the named node failing before its first layer: counters' named_reasked),
     * over TCP and shared memory; over RDMA it is the get's miss. */
    const uint32_t *nodes;
} kvf_batch;

/* A key of kvf_batch.nodes asked of its own node. */
#define KVF_NODE_ANY UINT32_MAX

/* Puts objects. Per-key status: 0 stored, KVF_EEXIST already there (not sent again: the client
 * first admits the batch and sends only what the node reserved), KVF_ENOSPC node full of pinned
 * or referenced data, KVF_ECHECKSUM/KVF_EPROTO object rejected, or a transport error. The client
 * sends the caller's object buffers without copying them. */
KVF_API int kvf_client_put_async(kvf_client *c, const kvf_batch *b, kvf_op **op);
/* Gets objects into the caller's buffers and verifies them. Per-key status: 0 (out_lens set),
 * KVF_ENOENT miss, KVF_E2BIG buffer too small, KVF_ECHECKSUM, KVF_ELAYOUT, or a transport error. */
KVF_API int kvf_client_get_async(kvf_client *c, const kvf_batch *b, kvf_op **op);
/* Both write *op before the operation reaches the I/O thread and never touch it afterwards (unless
 * submission fails, when *op is reset to NULL): the completion callback may run, and free the
 * memory that *op lives in, before the call returns. */

/* A put whose objects are still being written while it runs (docs/protocol.md, "Objects written
 * in parts"): a save that overlaps the work producing its bytes (the connector's, layer by layer,
 * beside the forward pass). Every object of b has the same length, and its first head_len bytes
 * (its header, with the checksums of what follows) are final last. The keys are admitted at once
 * (KVF_EEXIST for those the node has); bytes [head_len, upto) of every object go to the nodes as
 * kvf_op_put_ready() says they are final, in order, and with kvf_op_put_seal() the rest and the
 * heads, after which each node verifies and commits each object as a put's COMMIT would:
 * nothing is visible before. kvf_op_put_abort() gives the reservations back instead (per-key
 * KVF_ECANCELED). Until the op completes, the objects' bytes already said final must not change.
 * Per-key statuses as kvf_client_put_async's; an op neither sealed nor aborted by its deadline
 * fails with KVF_ETIMEDOUT, without counting against its nodes' health. Returns KVF_EINVAL for
 * objects of differing lengths or a head not shorter than them, and KVF_ENOTSUP where the
 * client's puts go over RDMA or a node has not said (in its HELLO) that it takes parts: the
 * caller then puts the objects whole. A batch of at least two keys and two stripe_bytes runs on
 * every I/O thread of the client (split by bytes as a whole put is, what the caller says reaching
 * every share), a smaller one on one of them (in turn), over their connections: TCP, or a node's
 * Unix socket where the client reaches that node over shared memory (the parts' bytes then travel
 * inline on the socket, not through a staging region; kvf_op_transport says "tcp" for both). */
KVF_API int kvf_client_put_parts(kvf_client *c, const kvf_batch *b, uint64_t head_len, kvf_op **op);
/* Bytes [head_len, upto) of every object of a put in parts are final (calls with less than before
 * change nothing). 0 (also, doing nothing, once the op has completed: its nodes had or refused
 * every key, or failed, or its client closed), or KVF_EINVAL for an op that is no put in parts or
 * was sealed or aborted. */
KVF_API int kvf_op_put_ready(kvf_op *op, uint64_t upto);
/* Every byte of every object, heads included, is final: the rest is sent and the objects sealed. */
KVF_API int kvf_op_put_seal(kvf_op *op);
/* Nothing more is sent; the nodes drop the reservations. Harmless after a seal or abort. */
KVF_API int kvf_op_put_abort(kvf_op *op);

/* Waits for op to complete and returns its status. */
KVF_API int kvf_op_wait(kvf_op *op);
/* Frees a completed op. Accepts NULL and clears *op. Freeing an op still in flight is an error
 * that is refused (the op stays valid) with KVF_EBUSY. */
KVF_API int kvf_op_free(kvf_op **op);

/* Synchronous forms: submit, wait, free. Return the operation's status; per-key results in
 * b->status. */
KVF_API int kvf_client_put(kvf_client *c, const kvf_batch *b);
KVF_API int kvf_client_get(kvf_client *c, const kvf_batch *b);

/* Which of n keys node (its index, kvf_client_node_index) holds, wherever their own node is: one
 * round trip (a plan's named holder, say). present[i] gets 1 or 0 (0 also when the node is
 * unreachable). KVF_EINVAL for a node out of range. */
KVF_API int kvf_client_exists_on(kvf_client *c, size_t node, size_t n, const kvf_key *keys,
                                 uint8_t *present, int deadline_ms);
/* Which of n keys exist, one round trip per node. present[i] gets 1 or 0 (0 also when the node is
 * unreachable). */
KVF_API int kvf_client_exists(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present,
                              int deadline_ms);
/* As kvf_client_exists, and which tier holds each: on_disk[i] 1 where only the node's disk tier
 * does (docs/store.md, "The disk tier"; a load from there runs at the disk's rate), 0 where its
 * DRAM does (or nothing). Needs nodes that know the tiers flag (KVF_EPROTO from older ones). */
KVF_API int kvf_client_exists_tiers(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present,
                                    uint8_t *on_disk, int deadline_ms);
/* The number of leading keys of a prefix chain that are stored (on whichever node each lives). */
KVF_API int kvf_client_lookup_prefix(kvf_client *c, size_t n, const kvf_key *keys, size_t *hits,
                                     int deadline_ms);
/* The same, and why the run ends: *why is 0 where it ends at a key its node does not hold (or at
 * n), else the KVF_E* status of the node that could not say (down, refused, timed out): a
 * caller waiting for that key to land knows it will not. */
KVF_API int kvf_client_lookup_prefix_why(kvf_client *c, size_t n, const kvf_key *keys, size_t *hits,
                                         int *why, int deadline_ms);
/* Evict, pin (with a lease) and unpin: per-key status as the nodes answer. */
KVF_API int kvf_client_evict(kvf_client *c, size_t n, const kvf_key *keys, int *status,
                             int deadline_ms);
KVF_API int kvf_client_pin(kvf_client *c, size_t n, const kvf_key *keys, uint32_t lease_ms,
                           int *status, int deadline_ms);
KVF_API int kvf_client_unpin(kvf_client *c, size_t n, const kvf_key *keys, int *status,
                             int deadline_ms);
/* Recompresses stored objects with a codec ("none", "lz4", "shuffle-lz4") on their nodes. */
KVF_API int kvf_client_compress(kvf_client *c, size_t n, const kvf_key *keys, const char *codec,
                                int *status, int deadline_ms);
/* Clears the client's namespace on every node; *removed (may be NULL) gets the total. */
KVF_API int kvf_client_clear(kvf_client *c, uint64_t *removed, int deadline_ms);
/* Asks node node_idx to push the given keys to the node at addr ("host:port"); per-key status. */
KVF_API int kvf_client_copy(kvf_client *c, size_t node_idx, const char *addr, size_t n,
                            const kvf_key *keys, int *status, int deadline_ms);
/* A node's statistics as a JSON object text. Caller owns *json; free with free(). */
KVF_API int kvf_client_stats(kvf_client *c, size_t node_idx, char **json, int deadline_ms);

/* The client's data path, "shm", "rdma" or "tcp"; why (may be NULL) gets the reason it was
 * chosen (for shm, which nodes use it and why the others do not). */
KVF_API const char *kvf_client_transport(const kvf_client *c, char *why, size_t len);
/* The I/O threads (engines) the client runs its connections on: io_threads as opened, bounded by
 * conns_per_node. A get, put or put in parts large enough is split across them. */
KVF_API int kvf_client_io_threads(const kvf_client *c);
/* The read-only view of node node_idx's arena that the shared-memory path mapped: *base and *len,
 * for engines that copy or DMA from it themselves (register it with a GPU driver, say). Borrowed;
 * valid (mapped) until kvf_client_close(). Bytes in it are an object's only while a lease holds
 * it. A node restarted since is a new arena: ask again for its view.
 * KVF_ENOTSUP where the node's arena is not mapped (not on this host, or a tenant's staged
 * access). */
KVF_API int kvf_client_shm_view(const kvf_client *c, size_t node_idx, const void **base,
                                size_t *len);
/* Leased objects in place: for engines that copy (or DMA) chunks from the read-only view
 * themselves, straight into their pages. Every key must live on a node whose arena this client
 * maps (kvf_client_shm_view), else KVF_ENOTSUP and nothing is leased (use kvf_client_get). On
 * success each key has a status (0, KVF_ENOENT, KVF_EHOSTUNREACH ...) and, for a hit, objs[i]
 * and lens[i]: the object's bytes in the view, stored as kvf_obj_verify() checks them. They are
 * the object's only while the lease holds: read them, then check kvf_lease_valid(); bytes read
 * before a true answer are exactly what the node stored (verify their checksums as with any
 * get), and after a false one they may be another object's. lease_ms: 0 for the client's
 * default (shm_lease_ms). Caller owns *out; free with kvf_lease_release(). */
typedef struct kvf_lease kvf_lease;
KVF_API int kvf_client_lease(kvf_client *c, size_t n, const kvf_key *keys, uint32_t lease_ms,
                             const void **objs, uint64_t *lens, int *status, kvf_lease **out);
/* 1 while every object of l is still leased (with a margin), else 0; 0 once its client closed
 * (the close unmaps the view: nothing of it may be read after). */
KVF_API int kvf_lease_valid(const kvf_lease *l);
/* Lets the objects go (the nodes may then reuse their blocks). Accepts NULL and clears *l. A
 * lease may be released after its client closed (it then frees only itself), but not while
 * kvf_client_close() runs on another thread. */
KVF_API void kvf_lease_release(kvf_lease **l);
/* How an operation's bytes moved: "shm", "rdma", "tcp", or "shm+tcp" (some keys each way).
 * "tcp" is the protocol's requests on a stream socket: TCP, or the Unix socket of a node on this
 * host (a put in parts, and keys a shared-memory client sends its engines' way). */
KVF_API const char *kvf_op_transport(const kvf_op *op);

/* Transfer counters of the client since it opened. */
typedef struct kvf_client_counters {
    uint64_t bytes_sent, bytes_received;
    uint64_t requests, failed_keys, reconnects;
    /* shared memory: the bytes of those above that it moved, keys whose lease ended during their
     * copy (asked again over TCP), and keys that went over TCP because their node's socket was
     * unreachable */
    uint64_t shm_bytes_sent, shm_bytes_received, shm_lease_expired, shm_fallback_keys;
    /* hot keys read from a holder on this host rather than their first node, which is not (a
     * replica: docs/store.md), and of those the ones it did not have, asked of the first node */
    uint64_t near_keys, near_misses;
    /* keys of streamed gets over TCP that the node kvf_batch.nodes named did not give (a miss,
     * or the node failing before any layer came), asked again of their own node in the same get */
    uint64_t named_reasked;
} kvf_client_counters;
KVF_API void kvf_client_counters_get(kvf_client *c, kvf_client_counters *out);

#ifdef __cplusplus
}
#endif
#endif
