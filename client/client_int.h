/*
 * The storage client's insides (include/kvf/client.h is its contract). Not a public interface.
 *
 * An op is one user call. A client owns one or more I/O engines (kvf__io): each is a thread with
 * a poller, a submission queue and its share of the connections to every node. An op runs on one
 * engine, which splits it into requests, one per (node, stripe), each carried by one of its
 * connections; a large get or put is first split into one child op per engine (tcp_path.c). The
 * data path of gets and puts is chosen once, at open, and called through an ops table
 * (kvf__path_ops): TCP on the engines, or RDMA (rdma_path.c), whose control requests travel on
 * the engines too.
 *
 * The files depend on each other in one direction, from the top down:
 *   client.c    open, close, put and get, counters (the public calls)
 *   ctrl.c      the control calls (exists, lookup, evict, pin, stats, copy ...)
 *   shm_path.c  shared memory for nodes on this host (others' keys through tcp_path.c), with
 *               shm_get.c (its gets), shm_ctl.c (the caller's thread: EXISTS, leases, discovery)
 *               and shm_conn.c (connections and arena views): shm_int.h says how
 *   tcp_path.c  rdma_path.c   the other data paths behind kvf__path_ops
 *   shm_sync.c  blocking exchanges on one socket (shm_path.c's connections, open's probes)
 *   io.c        an I/O engine: its thread, connecting, deadlines, submission, raw requests
 *   reply.c     reading replies into the caller's buffers, verifying as they land
 *   conn.c      a connection's queues and its send side; the node's health
 *   frame.c     building request frames; splitting an op into requests
 *   op.c        the op lifecycle and completion; place.c  where a key lives
 *   part.c      a part of an op's batch run as an op of its own (tcp_path.c, shm_path.c)
 *
 * Locks: an engine's `mu` guards its submission queue and stop flag, its `cmu` its counters; an
 * op's `mu` its completion. Each is taken alone (none is held while another is taken). Everything
 * else of an engine (connections, requests, active ops) belongs to its I/O thread.
 */
#ifndef KVF_CLIENT_INT_H
#define KVF_CLIENT_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "kvf/client.h"
#include "kvf/object.h"

#include "auth.h"
#include "hash.h"
#include "poller.h"
#include "tcp.h"
#include "unixsock.h"
#include "wire.h"

/* Largest reply payload of a raw control request (an RDMA_GET answers with object headers). */
#define KVF_CLIENT_RAW_MAX (256ull << 20)
/* I/O engines of one client, at most. */
#define KVF_CLIENT_MAX_IO 8
/* Connections to one node, at most (shared among the engines). */
#define KVF_CLIENT_MAX_CONNS 16
/* kvf-store --replicas takes 2..8 */
#define KVF_CLIENT_MAX_HOLDERS 8
/* A put's request payload when the node has not said its limit yet: a quarter of a store's
 * default --max-request. */
#define KVF__REQ_BYTES_DEFAULT  (64ull << 20)
#define KVF_CLIENT_MAX_ERR_TEXT 4096u
/* An engine's buffer for reply bytes that are read and dropped. */
#define KVF_CLIENT_SCRATCH (1u << 20)

enum { KVF__OPK_PUT, KVF__OPK_GET, KVF__OPK_CTRL };

typedef struct kvf__io kvf__io;
typedef struct kvf__req kvf__req;
typedef struct kvf__conn kvf__conn;
typedef struct kvf__node kvf__node;

struct kvf_op {
    kvf_client *cl;
    kvf__io *io; /* the engine it runs on (NULL on the RDMA path) */
    struct kvf_op *next_active, *prev_active;
    int kind;
    uint32_t opcode;
    kvf_batch b;
    uint64_t deadline_ns;
    int pending;    /* requests not yet finished */
    int completing; /* all requests finished; signalled at the end of the I/O iteration */
    struct kvf_op *next_completed;
    int target; /* control ops: -1 by placement, -2 every node, else one node */
    int done;
    int result;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    const char *transport; /* "tcp" or "rdma": how its bytes moved */
    /* raw control requests (kvf__io_raw): the payload sent, the reply payload received */
    int raw;
    const uint8_t *raw_req;
    size_t raw_len;
    uint32_t raw_count;
    uint8_t *raw_rep;
    size_t raw_rep_len;
    int conn; /* control ops: the node's connection to use; -1: the next in turn */
    /* control extras */
    uint32_t lease_ms, codec;
    uint8_t *present;
    uint8_t *on_disk; /* EXISTS with KVF_WF_TIERS: 1 where only the node's disk tier holds it */
    uint64_t removed;
    char *json;
    char addr[KVF_WIRE_MAX_ADDR + 1];
    /* streamed get */
    uint32_t layers; /* layer count once a header arrived */
    uint32_t layers_fired;
    kvf__req **reqs; /* every request of the op, for the layer frontier */
    int n_reqs;
    /* a put written in parts (kvf_client_put_parts): every object obj_len bytes, its first
     * head_len written last; the points the caller said final, in order (under mu), the last
     * the end of what may be sent (bytes [head_len, bounds[n_bounds - 1]) of each; a WRITE ends
     * at the first point past where it begins, so that the node can check a segment against the
     * part that carried it); parts_state says whether the caller sealed (1) or aborted (2) it */
    int parts;
    uint64_t head_len, obj_len;
    atomic_int parts_state;
    uint64_t *bounds;
    uint32_t n_bounds, cap_bounds;
    /* a put in parts split across the engines (kvf__split_submit): what the caller says of it
     * goes to every child (kvf__split_say); split is the children's aggregate while any child
     * runs, NULL once the last ended (both under mu) */
    int parts_split;
    void *split;
};

/* One request: the keys of one op that one connection carries, and its reply's reading state. */
struct kvf__req {
    kvf__req *next;
    kvf_op *op;
    kvf__conn *cn;
    uint32_t opcode;
    uint32_t flags;
    uint64_t id;
    uint32_t n;
    uint32_t *idx; /* op item indices */
    uint8_t *buf;  /* header + payload built for sending */
    struct iovec *iov;
    int iovcnt, first;
    int sending; /* some bytes written */
    int finished;
    int phase;            /* put: 0 admit, 1 commit, 2 written in parts (WRITE, then SEAL) */
    uint32_t *commit_map; /* commit, write, seal: request item -> index into idx */
    uint32_t n_commit;
    /* written in parts: bytes [head_len, wpos) of its objects are at the node, its WRITE in
     * flight carries [wpos, wnext); parked: nothing to send until the caller says more */
    uint64_t wpos, wnext;
    int parked;
    /* reply state */
    uint8_t *rtab;
    uint64_t rtab_len;
    uint32_t item;  /* GET: current item */
    uint32_t layer; /* stream: frames seen after the first */
    uint32_t layers_delivered;
    uint8_t *moved;     /* stream: items asked again of their own node (kvf__req_reask_named) */
    uint64_t *segoff;   /* stream: running offset in each item's buffer */
    kvf_obj_info *info; /* stream: parsed headers */
    kvf_obj_info cur;   /* plain GET: the current item's header */
    uint32_t cur_seg;
    uint64_t cur_off, cur_len;
    uint64_t seg_start; /* plain GET: where the current segment starts in the object */
    int cur_state;      /* plain GET: 0 header pending, 1 in segments, 2 failed */
};

enum { KVF__CS_DOWN, KVF__CS_UP };

/* One TCP connection of an engine to a node. */
struct kvf__conn {
    kvf__io *io;
    kvf__node *nd;
    int idx;
    int fd;
    int state;
    uint64_t retry_at;
    uint64_t backoff;
    kvf__req *sq_head, *sq_tail; /* to send */
    /* Authenticating (a client with a credential): only HELLO and AUTH are written until AUTH is
     * answered; the rest waits in sq. The node's challenge and id come with HELLO's reply. */
    int gated;
    int auth_due; /* HELLO's challenge arrived: the engine answers it with an AUTH */
    uint8_t nonce[KVF_AUTH_NONCE_LEN];
    uint64_t node_id;
    kvf__req *fl_head, *fl_tail; /* in flight */
    uint32_t events;
    /* reply reader: the next rleft bytes go to rdst (NULL: discarded), then on_read runs */
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    kvf_wire_hdr h;
    kvf__req *rreq;
    uint8_t *rdst;
    uint64_t rleft;
    int (*on_read)(kvf__conn *cn);
    int hashing; /* hash bytes as they arrive into rdst (segment checksums) */
    /* Called with each run of bytes as it lands in rdst (plain GET objects): parses and hashes
     * while the bytes are in cache, without splitting the reads. */
    void (*on_bytes)(kvf__conn *cn, size_t n);
    XXH3_state_t *xs; /* allocated once per connection */
    kvf_lowat lowat;  /* receive low-water mark of fd */
    char errtext[KVF_CLIENT_MAX_ERR_TEXT];
};

/* A storage node, as every engine of the client sees it. */
struct kvf__node {
    char host[256];
    uint16_t port;
    char addr[280];
    uint64_t seed;
    /* what HELLO said: capabilities, the RDMA port (0: none), and the largest request payload it
     * takes (0: not heard yet; puts are cut below KVF__REQ_BYTES_DEFAULT then) */
    atomic_uint_fast64_t caps;
    atomic_uint rdma_port;
    atomic_uint_fast64_t max_request;
    /* holders of each of its hot keys (HELLO; 0: it keeps no replicas): a key of this node that
     * is hot is also on the next holders - 1 nodes of its rendezvous order (shm_path.c reads it
     * from the nearest) */
    atomic_uint holders;
    atomic_int hello_seen; /* a HELLO of it was read: holders is its word, 0 included */
    /* Health, shared by the engines (io.c): a request sent and not answered within its deadline
     * marks the node down until down_until (ns; 0: up), for a backoff that doubles while it stays
     * down; requests meanwhile fail at once (KVF_EHOSTUNREACH). Then one engine probes it with a
     * HELLO of a short deadline on a fresh connection (probing), and its answer brings it up. */
    atomic_uint_fast64_t down_until;
    atomic_uint_fast64_t down_backoff;
    atomic_int probing;
    /* Shared memory (shm_path.c): the node's Unix socket where it is on this host and serves one
     * (shm_name empty: none), refreshed by every HELLO; under the client's shm_mu. */
    char shm_name[128];
    int shm_local; /* the name is of this host (same boot id) */
};

/* An I/O engine: a thread that owns its connections (conns per node) and drives them. */
struct kvf__io {
    kvf_client *cl;
    int conns;             /* connections per node */
    int prober;            /* the client's first engine: it probes the nodes marked down (io.c) */
    uint64_t next_scan_ns; /* the prober's next look at them */
    kvf__conn *cn;         /* n_nodes x conns, node by node */
    atomic_int *rr;        /* per node: the next connection to stripe onto */
    kvf_poller *poller;
    int wake[2];
    pthread_t th;
    int started;
    int stop;
    pthread_mutex_t mu; /* guards the submission queue and stop */
    kvf__req *subq_head, *subq_tail;
    kvf_op *active;
    kvf_op *completed;     /* completed on this iteration: signalled at its end */
    atomic_int parts_kick; /* a put in parts of this engine has more to send (io.c) */
    uint8_t *scratch;      /* where discarded reply bytes go */
    pthread_mutex_t cmu;   /* counters */
    kvf_client_counters counters;
};

/* A part of an op's batch, run as an op of its own: the TCP path's child per I/O engine, the
 * shared-memory path's worker shares and the keys it sends over TCP. Its arrays hold copies of
 * some of the parent's keys with their buffers or objects; idx says which parent key each is. */
typedef struct kvf__part {
    uint32_t *idx; /* parent index of each key */
    kvf_batch b;   /* b.n keys in the arrays below (kvf__part_batch points it at them) */
    kvf_key *keys;
    const void **objs; /* a put's objects and lengths ... */
    uint64_t *lens;
    void **bufs; /* ... or a get's buffers, capacities and lengths received */
    uint64_t *caps, *out_lens;
    uint32_t *nodes; /* a get's: each key's named node (kvf_batch.nodes), KVF_NODE_ANY where none */
    int *st;         /* each key's status */
    uint32_t layers; /* layers delivered */
    int done;
    kvf_op *op; /* the part's own op, where it runs as one */
} kvf__part;

/* Room for n keys of a get or a put, none added yet. 0 or KVF_ENOMEM (kvf__part_free then frees
 * what was allocated). */
int kvf__part_alloc(kvf__part *p, size_t n, int get);
/* Appends the parent batch's key i (room was allocated for it). */
void kvf__part_add(kvf__part *p, const kvf_batch *pb, uint32_t i);
/* Points p->b at p's arrays, with pb's flags and deadline, cb, layer_cb (only where pb has a
 * layer callback) and ud. */
void kvf__part_batch(kvf__part *p, const kvf_batch *pb, kvf_op_cb cb, kvf_layer_cb layer_cb,
                     void *ud);
/* The node to send key i of b to: the node b->nodes names for it, for a get (kind), where it is
 * in range and not marked down, else kvf_client_node_of(). */
size_t kvf__key_node(const kvf_client *c, const kvf_batch *b, int get, size_t i);
/* Frees p's arrays (not its op). */
void kvf__part_free(kvf__part *p);

/* A data path: how the gets and puts of a client move. Chosen at open. */
typedef struct kvf__path_ops {
    const char *name; /* "tcp" or "rdma", as kvf_client_transport() reports */
    /* Runs a validated get or put; completes op once, by kvf__op_finish() or the engines.
     * Returns 0, or an error with op untouched (the caller frees it). */
    int (*submit)(kvf_client *c, kvf_op *op);
    /* Finishes what is in progress and fails what is queued with KVF_ECANCELED. */
    void (*close)(kvf_client *c);
} kvf__path_ops;

struct kvf_client {
    kvf_client_opts o;   /* o.nodes and o.credential are not kept */
    kvf_credential cred; /* what AUTH presents, where has_cred */
    int has_cred;
    kvf__node *nodes;
    size_t n_nodes;
    atomic_int reroute; /* kvf_client_set_reroute: a down node's keys go to their next node */
    kvf__io *io[KVF_CLIENT_MAX_IO];
    int n_io;
    atomic_uint_fast64_t next_id; /* request ids */
    const kvf__path_ops *path;
    struct kvf__rdma_path *rdma; /* the RDMA path's state, when it is the path */
    struct kvf__shm_path *shm;   /* the shared-memory path's state, when it is the path */
    /* Shared memory: this host's boot id (zero: unknown), whether the engines connect to nodes
     * on this host over their Unix sockets, and the lock of the nodes' shm_name. */
    uint8_t boot_id[16];
    int shm_engines;
    pthread_mutex_t shm_mu;
    char transport_why[400];
    /* Close: set first, then close waits until no submission is under way (submitting 0): a get
     * or put asked after, a completion callback's among them, fails with KVF_ECLOSED instead of
     * reaching a data path or an engine being closed. */
    atomic_int closing, submitting;
    atomic_uint parts_rr; /* the engine the next put in parts runs on */
};

/* ------------------------------------------------------------------------------------------ */
/* op.c: ops, requests and their accounting */

kvf_op *kvf__op_new(kvf_client *c, kvf__io *io, int kind, uint32_t opcode, const kvf_batch *b);
void kvf__op_destroy(kvf_op *op);
/* Makes op a put in parts of objects obj_len bytes each, the first head_len of each written
 * last (kvf_client_put_parts). 0 or KVF_ENOMEM. */
int kvf__op_parts_init(kvf_op *op, uint64_t head_len, uint64_t obj_len);
/* Marks op done with result and runs its callback or wakes its waiter. The callback may free op:
 * nothing of it is used after. */
void kvf__op_finish(kvf_op *op, int result);
/* 0, or KVF_EINVAL for a batch that cannot be sent as a get or put. */
int kvf__op_validate(const kvf_batch *b, int kind);
/* conn.c: the node did not answer a request (or a probe) in time: down for a backoff that
 * doubles while it stays down, its probe over; or it answered a HELLO: up again, its backoff
 * forgotten. */
void kvf__node_mark_down(kvf__node *nd);
void kvf__node_mark_up(kvf__node *nd);
/* Whether key goes elsewhere than its home node now (rerouting on, its home node marked down or
 * being probed): a request that failed there may be asked again and land on the next node. */
int kvf__client_rerouted(const kvf_client *c, const kvf_key *key);

/* Puts leave 1 ("reserved") on keys whose commit never ran: they become KVF_ETIMEDOUT. */
void kvf__op_put_fixup(const kvf_batch *b);
void kvf__req_free(kvf__req *r);
/* Marks a request finished (its items carry their statuses); the last one completes its op,
 * which the engine signals at the end of its iteration (kvf__io_flush_completed). */
void kvf__req_finish(kvf__req *r);
/* Fails every item of r that has no final status yet, then finishes it. */
void kvf__req_fail(kvf__req *r, int status);
/* io.c: the keys of streamed GET r that the node named for them (kvf_batch.nodes) did not give
 * (a miss, or the node failing) asked again of their own node, in requests of r's op, while no
 * layer of the op has been reported: r, unfinished with no layer delivered, holds the op's layer
 * front at 0 until the new requests are in it. Their items in r are marked moved; r reports
 * nothing more of them. why: the status r fails with (0: r's reply said which keys it lacks); a
 * cancellation or close asks nothing. Nothing either where r is no such get, the engine is
 * stopping, or its op has less than KVF__REASK_MIN_NS left. */
#define KVF__REASK_MIN_NS 20000000ull
void kvf__req_reask_named(kvf__req *r, int why);
/* A request of a put in parts whose last reply is in (ADMIT's or a WRITE's), or that was parked:
 * sends what its op's caller made final since (a WRITE), or its SEAL (heads, or the drop of its
 * reservations after an abort), or parks it until the caller says more. On the engine's thread. */
void kvf__req_parts_next(kvf__req *r);
/* The layer frontier of a streamed get: reports the layers every unfinished request delivered. */
void kvf__op_stream_progress(kvf_op *op);
/* Signals the ops that completed on this iteration of the engine's thread. */
void kvf__io_flush_completed(kvf__io *io);
void kvf__io_count(kvf__io *io, uint64_t requests, uint64_t sent, uint64_t received,
                   uint64_t failed, uint64_t reconnects);

/* ------------------------------------------------------------------------------------------ */
/* frame.c: requests and their frames */

kvf__req *kvf__req_new(kvf_op *op, kvf__conn *cn, uint32_t opcode, uint32_t n);
/* Builds r's frame: header plus payload in r->buf, plus object iovecs for COMMIT. */
int kvf__req_build(kvf_client *c, kvf__req *r);
/* Splits op's keys into requests on io's connections: by node, and for puts and gets by stripes
 * of about stripe_bytes over the node's connections. Control ops use one connection per node. */
int kvf__op_split(kvf__io *io, kvf_op *op);

/* ------------------------------------------------------------------------------------------ */
/* conn.c: a connection's queues and its send side */

void kvf__cn_set_events(kvf__conn *cn);
void kvf__req_push(kvf__req **head, kvf__req **tail, kvf__req *r);
/* Takes r off the in-flight list (or the send queue); nothing when it is not there. */
void kvf__cn_unflight(kvf__conn *cn, kvf__req *r);
int kvf__cn_unqueue(kvf__conn *cn, kvf__req *r);
/* Writes what the send queue holds, as far as the socket takes it. 0 or the socket's error. */
int kvf__cn_write(kvf__conn *cn);

/* ------------------------------------------------------------------------------------------ */
/* reply.c: reading replies */

/* The next bytes on cn are a frame header. */
void kvf__rd_next_frame(kvf__conn *cn);
/* Reads what the socket has and runs the read steps. Returns 0 or the error that breaks the
 * connection. */
int kvf__cn_read(kvf__conn *cn);

/* ------------------------------------------------------------------------------------------ */
/* io.c: I/O engines */

/* Opens an engine with conns connections per node and connects them (a node that refuses is
 * retried on demand), then starts its thread. */
int kvf__io_open(kvf_client *c, int conns, kvf__io **out, char *err, size_t errlen);
/* Stops the thread, failing whatever is left with KVF_ECANCELED, and frees. Accepts NULL. */
void kvf__io_close(kvf__io **io);
/* Splits op into requests and hands them to the engine's thread. An empty op completes at once
 * on the caller's thread. Returns 0 or an error with op untouched. */
int kvf__io_submit(kvf__io *io, kvf_op *op);
/* The caller of a put in parts on io said more: its parked requests go on (kvf__req_parts_next). */
void kvf__io_kick_parts(kvf__io *io);
/* Sends one control request with the given payload to node `node` over TCP, on its connection
 * `conn` (-1: the next in turn; requests about a reservation must use the connection that made
 * it), and waits for its reply. Returns 0 with the reply payload (caller frees *reply), or the
 * error the node answered or the transport met. */
int kvf__io_raw(kvf__io *io, size_t node, int conn, uint32_t opcode, uint32_t count,
                const void *payload, size_t plen, uint8_t **reply, size_t *rlen, int deadline_ms);

/* ------------------------------------------------------------------------------------------ */
/* The data paths */

extern const kvf__path_ops kvf__path_tcp;
/* tcp_path.c, for puts in parts on any path whose engines carry them: whether a batch (of a get
 * or put: kind) keeps more than one engine busy, and op's split into one child per engine (op
 * completes when the last child does; 0, or KVF_ENOMEM with nothing submitted). kvf__split_say
 * tells every running child of a split put in parts what the caller said of it (kvf_op_put_ready,
 * _seal, _abort: state 0, 1, 2); called with the parent's mu held and its split set. */
int kvf__split_worth(const kvf_client *c, const kvf_batch *b, int kind);
int kvf__split_submit(kvf_client *c, kvf_op *op);
void kvf__split_say(void *split, uint64_t upto, int state);
extern const kvf__path_ops kvf__path_rdma;
extern const kvf__path_ops kvf__path_shm;
/* Opens the shared-memory path (shm_path.c) for the nodes on this host that serve it (found by
 * kvf__shm_discover at open): c->shm is set and the path runs their keys, the others' going over
 * TCP. Otherwise returns the reason's code with why saying it. */
int kvf__path_shm_open(kvf_client *c, char *why, size_t whylen);
/* Before the engines connect: asks every node whose address is on this host, over TCP with a
 * short deadline, whether it serves shared memory on this host (same boot id), and records its
 * socket in the node (kvf__node_shm). Never fails: a node that cannot say is left to TCP, with
 * the reason in why. */
void kvf__shm_discover(kvf_client *c, char *why, size_t whylen);
/* EXISTS of n keys on the caller's thread, over the control connections of their nodes (all on
 * this host, up, and not in use by another thread): returns 1 with *rc (0: present filled), or 0
 * when the engines must serve the request. */
int kvf__shm_exists(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present, int deadline_ms,
                    int *rc);
/* The shared-memory path's counters, added to out. */
void kvf__shm_counters(kvf_client *c, kvf_client_counters *out);

/* shm_sync.c: blocking exchanges on one socket, for the shared-memory path and the probes. */
typedef struct kvf__hello {
    uint64_t caps, node_id;
    uint32_t holders;
    int role;
    uint8_t nonce[KVF_AUTH_NONCE_LEN];
    char shm_name[128];
    uint8_t boot_id[16];
} kvf__hello;
/* Sends one request (id, opcode, count, payload) and reads its reply: 0 with the payload (caller
 * frees *reply; it is NUL-terminated past rlen), or the error the node answered (its text in err)
 * or the transport met. Descriptors that come with the reply go to fds (*n_fds: room in, count
 * out; none on failure). */
int kvf__sync_call(int fd, uint64_t id, uint32_t opcode, uint32_t count, const void *payload,
                   size_t plen, uint8_t **reply, size_t *rlen, int *fds, int *n_fds,
                   uint64_t deadline_ns, char *err, size_t errlen);
/* The two halves of kvf__sync_call, for a caller that keeps one request in flight while it
 * prepares the next: the replies come in the order the requests went. */
int kvf__sync_send(int fd, uint64_t id, uint32_t opcode, uint32_t count, const void *payload,
                   size_t plen, uint64_t deadline_ns, char *err, size_t errlen);
int kvf__sync_recv(int fd, uint64_t id, uint32_t opcode, uint8_t **reply, size_t *rlen, int *fds,
                   int *n_fds, uint64_t deadline_ns, char *err, size_t errlen);
/* HELLO (asking for shared memory), then AUTH where the node asks for it and c has a
 * credential. 0 with what the node said, or the error with the reason in err. */
int kvf__sync_hello(int fd, const kvf_client *c, uint64_t *id, kvf__hello *out,
                    uint64_t deadline_ns, char *err, size_t errlen);
/* The shared-memory tail of a HELLO reply (KVF_CAP_SHM): 1 with the socket's name and the node's
 * boot id, or 0 where there is none or it is malformed. */
int kvf__hello_shm_parse(const uint8_t *rep, size_t rlen, uint64_t caps, char *name, size_t namelen,
                         uint8_t boot_id[16]);
/* Opens the RDMA path when this host has a device and every node offers RDMA (asked within
 * probe_ms) and accepts a connection: c->rdma is set. Otherwise returns the reason's code with
 * why saying what was missing (the client then uses TCP). */
int kvf__path_rdma_open(kvf_client *c, int probe_ms, char *why, size_t whylen);

/* The counters of engine i alone: 0, or KVF_EINVAL past the last. For tests. */
int kvf__client_io_counters(kvf_client *c, int i, kvf_client_counters *out);

#endif
