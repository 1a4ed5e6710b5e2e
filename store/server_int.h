/*
 * The storage node server's private header: the state its files share (loops, connections, queued
 * replies, RDMA leases) and the functions they call across files. Only the server's own files
 * include it; store/server.h is the interface for everyone else.
 *
 * Threads: N event loops, each with its own poller, wake pipe and connections. All loops watch the
 * listening socket (nonblocking accept: a loop that loses the race gets EAGAIN), but a loop whose
 * accept fails (the descriptor limit) stops watching it for a back-off period. COPY requests run
 * on a short-lived worker thread that pushes the objects with the client library and hands its
 * reply back to the loop through the loop's inbox.
 *
 * Lock order: loop inbox lock, then the cache lock. No function holds the cache lock while doing
 * I/O or copying object bytes.
 */
#ifndef KVF_STORE_SERVER_INT_H
#define KVF_STORE_SERVER_INT_H

#include "server.h"

#include "auth.h"
#include "poller.h"
#include "rdma_serve.h"
#include "tenants.h"
#include "wire.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>

#define OUT_HIGH_WATER (512ull << 20) /* stop reading a connection whose replies pile up */
/* Replies copied to the heap (statuses, descriptors, headers; not the arena's bytes that GET
 * replies point into): a connection is not read while its own queued copies pass
 * OUT_HEAP_HIGH_WATER, nor while it has replies queued and the node's pass OUT_HEAP_BUDGET. A
 * client that does not read its replies so holds little of the node's memory, and one whose queue
 * is empty is always read. */
#define OUT_HEAP_HIGH_WATER (64ull << 20)
#define OUT_HEAP_BUDGET     (1ull << 30)
#define SCRATCH_BYTES       (1u << 20) /* a loop's sink for the bytes of refused PUT items */

/* Where a connection's next bytes go (server_frame.c). */
enum { R_HDR, R_BODY, R_DATA };

/* One reply frame (or several) queued on a connection: iovecs into buf and into the arena, and
 * the read references that keep those arena bytes in place until the last of them is written. */
typedef struct out_msg {
    struct out_msg *next;
    struct iovec *iov;
    int iovcnt, first;
    uint32_t *refs;
    uint32_t nrefs;
    uint8_t *buf;
    size_t heap; /* the message's allocation: counted in the node's out_heap while queued */
} out_msg;

typedef struct put_item {
    uint8_t *dst; /* NULL: discard this item's bytes */
    uint64_t len;
    uint64_t offset;  /* a WRITE's: where in its object the part goes */
    uint32_t wseq;    /* a WRITE's or SEAL's: its reservation's (kvf__cache_part_begin_locked) */
    uint8_t hashed;   /* a WRITE's bytes were hashed as they landed (pxs) */
    uint64_t obj_len; /* the whole object's (a SEAL writes its head only) */
    uint32_t eid;
    int32_t status;
    uint8_t held;
} put_item;

typedef struct loop loop;
typedef struct kvf__copy_pool kvf__copy_pool;
typedef struct kvf__copiers kvf__copiers;
#define KVF_SHM_COPIERS_MAX 8

/* Read references an RDMA_GET handed out as descriptors: held until RDMA_RELEASE, the lease's
 * end, or the connection's. */
typedef struct rlease {
    struct rlease *next;
    uint64_t id;
    uint64_t expires_ns;
    uint32_t n;
    uint32_t eids[];
} rlease;

typedef struct conn {
    struct conn *next, *prev;
    loop *lp;
    int fd;
    uint64_t id;
    uint64_t ns_bound;
    uint64_t t_hdr; /* when the request's header was read (kvf__now_ns), for op_seconds */
    int counted;    /* the request in progress was counted (its header decoded) */
    int rstate;
    uint8_t hdr[KVF_WIRE_HEADER_LEN];
    size_t hdr_got;
    kvf_wire_hdr h;
    uint8_t *rbuf;
    size_t rcap;
    uint64_t rgot, rneed;
    put_item *items;
    uint32_t icap, n_items, cur;
    uint64_t cur_got;
    /* Parts this connection wrote (WRITE), each hashed as it landed: a SEAL checks a segment
     * that one part covers exactly against the part's checksum instead of reading it again
     * (server_put.c). At most KVF__PART_RECS, then all forgotten (hashed at the SEAL). */
    struct part_rec *prec;
    uint32_t n_prec, cap_prec;
    struct XXH3_state_s *pxs; /* the part being received */
    int req_err;
    out_msg *oh, *ot;
    uint64_t out_bytes;
    uint64_t out_heap; /* of out_bytes, those copied to the heap (out_msg.heap) */
    int closing;
    uint32_t events;
    int pending_jobs;  /* COPY jobs and disk tier requests not yet answered */
    int disk_rerun;    /* the request is being run again after its disk tier promotions */
    rlease *leases;    /* RDMA_GET descriptors still leased ... */
    uint32_t n_leases; /* ... so many (RDMA_LEASES_PER_CONN at most) */
    int dead;          /* destroyed: freed at the end of its loop's iteration (kvf__loop_reap) */
    struct conn *next_dead;
    /* Authentication (server_auth.c): the role decides what the connection may do; a tenant's
     * namespaces are scoped by who.scope. Where the node authenticates nobody, every connection
     * is an admin. challenged: HELLO sent nonce, which AUTH must sign. */
    int role;
    kvf__tenant_id who;
    uint64_t accepted_ns;
    int challenged;
    uint8_t nonce[KVF_AUTH_NONCE_LEN];
    /* A connection from the node's Unix socket (server_shm.c): its staging region (none: NULL)
     * and whether it was handed the arena read-only (it may then ask for RDMA_GET's leased
     * descriptors). */
    int is_unix;
    int shm_arena;
    uint8_t *stg_map;
    uint64_t stg_len;
} conn;

/* An entry of a loop's inbox: a COPY worker's reply for a connection, or a connection accepted by
 * another loop. */
typedef struct kvf__sdisk_job kvf__sdisk_job;
typedef struct deferred {
    struct deferred *next;
    uint64_t conn_id;
    out_msg *msg;
    kvf__sdisk_job *disk; /* a request back from the disk tier, to finish (server_disk.c) */
    int fd;               /* >= 0: a connection accepted by another loop, handed to this one */
    int is_unix;          /* that connection came from the Unix socket */
} deferred;

struct loop {
    kvf_server *srv;
    int idx;
    kvf_poller *poller;
    int wake[2];
    pthread_t th;
    conn *conns;
    conn *dead; /* destroyed during this iteration, still named by its events */
    pthread_mutex_t inbox_mu;
    deferred *inbox;
    uint8_t *scratch;
    uint64_t last_tick;
    /* Accepting paused by trouble (server_loop.c): the listener is out of this loop's poller until
     * accept_resume_ns, or until a connection closes (n_closed moves past closed_seen). */
    uint64_t accept_resume_ns; /* 0: the listener is watched */
    unsigned tenants_gen;      /* the tenants file's generation its connections were checked at */
    uint64_t accept_backoff_ns;
    uint64_t closed_seen;
};

struct kvf_server {
    kvf_server_opts o;
    struct kvf__replicator *rep; /* kvf__server_set_replicator */
    char host[256];
    int lfd;
    uint16_t port;
    /* Shared memory (server_shm.c): the Unix listener (-1: none), its name, this host's boot id,
     * the arena's read-only descriptor handed out (-1: none) and the counters. */
    int ufd;
    char shm_name[128];
    uint8_t boot_id[16];
    int arena_fd;
    kvf__copiers *copiers; /* SHM_PUT's helper threads (NULL: none) */
    atomic_uint_fast64_t shm_staging_bytes, shm_maps, shm_put_bytes, shm_get_bytes, shm_accepted;
    loop *loops;
    int nloops;
    atomic_int stopping;
    atomic_uint_fast64_t next_conn_id;
    kvf__copy_pool *copy;  /* COPY's workers and queue (server_copy.c) */
    atomic_uint next_loop; /* the loop the next accepted connection goes to */
    /* A descriptor kept free (/dev/null) for shedding connections at the descriptor limit; -1:
     * none now. A loop takes it with atomic_exchange, so only one closes it at a time. */
    atomic_int reserve_fd;
    /* An accept episode (server_loop.c): accept failing for other reasons than a connection's
     * own, logged when it starts, at most once a second while it lasts, and when it is over (an
     * accept succeeded and none failed for a second). Under acc_mu but the two atomics. */
    pthread_mutex_t acc_mu;
    atomic_int acc_trouble;         /* an episode is in progress (acc_since_ns != 0) */
    atomic_uint_fast64_t acc_ok_ns; /* the last accept that succeeded during it */
    uint64_t acc_since_ns, acc_fail_ns, acc_logged_ns, acc_shed, acc_shed_logged;
    /* counters */
    atomic_uint_fast64_t n_conns, n_accepted, n_closed, n_shed, bytes_in, bytes_out, proto_errors;
    atomic_uint_fast64_t auth_ok, auth_failed, auth_refused; /* refused: a request before AUTH */
    /* promotions' time on the loops (server_disk.c): from the tier's done to the loop taking the
     * request up again, and the request's run again (its reply queued), over `disk_finished` */
    atomic_uint_fast64_t disk_finished, disk_finish_lag_ns, disk_rerun_ns;
    atomic_uint_fast64_t auth_timeouts; /* closed for not authenticating in time */
    atomic_int reload_tenants;          /* asked by kvf__server_reload_tenants, done by loop 0 */
    atomic_uint_fast64_t reqs[32];
    /* by transport (0 TCP, 1 the Unix socket) and opcode: requests, and those answered with an
     * error (kvf__reply_error), for requests_total{op,transport,result} */
    atomic_uint_fast64_t reqs_by[2][32], errs_by[2][32];
    struct kvf__series *m_op[32]; /* op_seconds{op} (kvf__server_metrics_bind), or NULL */
    /* RDMA: the listener (NULL: none, for the reason in rdma_why) and its counters */
    kvf__rserve *rdma;
    char rdma_why[200];
    atomic_uint_fast64_t next_lease, rdma_leased, rdma_released, rdma_expired, rdma_reserved,
        rdma_committed;
    atomic_uint_fast64_t rdma_leases_open; /* leases held now, on every connection */
    atomic_uint_fast64_t out_heap;         /* bytes of queued replies copied to the heap */
};

/* server_conn.c: a connection's life on its loop. */

/* Makes fd one of lp's connections (is_unix: from the Unix socket), watched for reading. On
 * failure fd is closed. */
void kvf__conn_adopt(loop *lp, int fd, int is_unix);
/* Closes c and releases everything it holds: the reservations of a PUT in progress and those its
 * ADMITs made, its RDMA leases, and its queued replies with their read references. c itself is
 * marked dead and freed by kvf__loop_reap() at the end of the loop's iteration, because events of
 * the same poll batch may still name it: whoever holds a conn from an event checks c->dead. */
void kvf__conn_destroy(conn *c);
/* Frees the connections of lp destroyed since the last call. */
void kvf__loop_reap(loop *lp);
/* Releases the references of every lease of c that ended by t. Cache lock held. */
void kvf__conn_leases_expire_locked(conn *c, uint64_t t);
/* Whether a data request's namespace is allowed: nonzero, and the one bound by HELLO if any. */
int kvf__conn_ns_ok(const conn *c, uint64_t ns);
/* The namespace the node keeps c's namespace ns under: ns itself for an admin, the tenant's
 * scoped one for a tenant (server_auth.c). */
uint64_t kvf__conn_ns_scope(const conn *c, uint64_t ns);
/* The cache's tenant number of c's reservations (0: an admin's, counted against nobody). */
uint32_t kvf__conn_tenant(const conn *c);
/* Drops the read references m holds (taking the cache lock); m itself stays the caller's. */
void kvf__msg_release_refs(kvf_server *s, out_msg *m);

/* server_reply.c: reply frames and the output queue. */

/* A message with room for niov iovecs, nrefs references and buflen bytes of its own, all zeroed
 * but the buffer. Caller owns the result; free with free() after kvf__msg_release_refs(). */
out_msg *kvf__msg_new(int niov, uint32_t nrefs, size_t buflen);
/* Encodes the header of a reply to req into out. */
void kvf__reply_hdr(uint8_t *out, const kvf_wire_hdr *req, int status, uint32_t flags,
                    uint32_t count, uint64_t payload_len);
/* Appends m to c's output queue. Takes ownership of m. */
void kvf__conn_queue(conn *c, out_msg *m);
/* m, queued on c, leaves its queue (written, or c closing): its heap bytes are no longer c's. */
void kvf__msg_unqueued(conn *c, const out_msg *m);
/* Whether c's requests are read now (OUT_HIGH_WATER, OUT_HEAP_HIGH_WATER, OUT_HEAP_BUDGET). */
int kvf__conn_may_read(const conn *c);
/* Writes what the socket takes, then closes c if it is closing and has nothing left to send or
 * wait for. Returns -1 when the connection was destroyed, else 0. */
int kvf__conn_flush(conn *c);
/* Queues a reply to c's current request with a copy of payload. Returns 0 or KVF_ENOMEM. */
int kvf__reply_copy(conn *c, int status, uint32_t flags, uint32_t count, const void *payload,
                    size_t len);
/* An error reply carries one line of text naming the problem. A fatal one closes the connection
 * once it is written, and stops reading from it now. */
void kvf__reply_error(conn *c, int status, int fatal, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Replies with one i32 status per key. Takes ownership of st (encoded in place, then freed). */
void kvf__reply_statuses(conn *c, int32_t *st, uint32_t n);

/* server_inbox.c: handing a loop work from other threads. Safe from any thread. */

/* Wakes lp's poll. */
void kvf__inbox_wake(loop *lp);
/* Puts d in lp's inbox and wakes lp. Takes ownership of d. */
void kvf__inbox_push(loop *lp, deferred *d);
/* Takes everything in lp's inbox, newest first. Caller owns the list. */
deferred *kvf__inbox_take(loop *lp);
/* Hands lp a reply m (NULL: none could be built) for its connection conn_id, which may have
 * closed meanwhile, in the inbox entry d, taken when the work began so that posting never fails.
 * Takes ownership of m and d. */
void kvf__inbox_post(loop *lp, uint64_t conn_id, out_msg *m, deferred *d);

/* Request handlers, one per row of the frame reader's opcode table (server_frame.c). Each serves
 * the request whose header is c->h and whose payload (for PUT and COMMIT, the item table) is in
 * c->rbuf, checked by the reader, and queues its reply or an error reply; a COPY's reply comes
 * later through the inbox, a PUT's once its bytes are in. */

/* server_get.c: GET, plain or layer-major streamed (KVF_WF_STREAM). */
void kvf__req_get(conn *c);

/* server_keys.c: which keys are stored, and per-key changes. */
/* EXISTS: a bitmap of the keys stored. */
void kvf__req_exists(conn *c);
/* LOOKUP: the count of leading hits, then the bitmap of EXISTS. */
void kvf__req_lookup(conn *c);
/* EVICT, PIN, UNPIN and ADMIT: one status per key. */
void kvf__req_per_key(conn *c);

/* server_auth.c: authentication. */
/* AUTH: checks the tenant's signature over the challenge of this connection's HELLO and binds c
 * to that tenant. A failure is fatal. */
void kvf__req_auth(conn *c);
/* Whether c may send a request of opcode now: HELLO and AUTH always, anything else once
 * authenticated. A refusal answers a fatal KVF_EACCES (the body is not read). */
int kvf__auth_gate(conn *c, uint16_t opcode);
/* Loop 0: reloads the tenants file if it was asked to. */
void kvf__auth_reload_if_asked(kvf_server *s);
/* Closes lp's connections that did not authenticate within the node's AUTH deadline, and after a
 * reload those whose key is no longer in the tenants file. On lp's thread, without the cache
 * lock; every tick. */
void kvf__auth_sweep(loop *lp, uint64_t now_ns);

/* server_node.c: the node as a whole. */
/* HELLO: checks the client's versions, binds c to its namespace and answers the node's limits,
 * capabilities and RDMA port. Not bound by a namespace. */
void kvf__req_hello(conn *c);
/* CLEAR: removes every entry of the namespace named, or of all (KVF_WF_ALL_NS, refused on a
 * connection bound to a namespace), pinned ones included. */
void kvf__req_clear(conn *c);
/* STATS: for an admin, the cache's and the server's counters as one JSON object; for a tenant, its
 * own use of the node and its quotas. */
void kvf__req_stats(conn *c);

/* server_copy.c: COPY, run by a worker thread that posts its reply to the loop's inbox. */
void kvf__req_copy(conn *c);
/* Whether a COPY's payload (its length checked) names a target this node may push to: an
 * address that parses and is one of its --peer nodes. The disk tier's gate reads nothing back
 * for a COPY that is refused anyway. */
int kvf__copy_target_ok(const kvf_server *s, const uint8_t *payload);
/* COPY's worker pool, made with the server (its threads start with the first COPY): 0, or
 * KVF_EINVAL (a peer that is not HOST:PORT, said in err) or KVF_ENOMEM. */
int kvf__copy_pool_open(kvf_server *s, char *err, size_t errlen);
/* Stops the pool: jobs still queued are dropped (their references released), the running ones
 * end within their deadline (at most KVF_COPY_MAX_DEADLINE_MS) and every worker is joined. Before
 * the connections and loops are freed: a worker posts to its loop's inbox. */
void kvf__copy_pool_close(kvf_server *s);

/* server_disk.c: the disk tier under the requests (tier.h). */
/* Before GET, SHM_GET, RDMA_GET and PIN run: where keys of c's request miss DRAM but lie on
 * disk, hands their promotion to the tier and returns 1: handler runs c's request again, on its
 * loop, once they are in DRAM. 0: run it now (no tier, nothing on disk, or the tier busy). */
int kvf__sdisk_gate(conn *c, void (*handler)(conn *c));
/* EVICT's disk half: the DRAM statuses st of the n keys (16 bytes each at keys) are merged with
 * their removal from disk, answered later: 1 (st taken), or 0 (no tier: answer st now). */
int kvf__sdisk_evict(conn *c, uint64_t ns, const uint8_t *keys, int32_t *st, uint32_t n);
/* CLEAR's disk half, answered later with dram_cleared plus the disk's count: 1, or 0 (no tier:
 * answer now). */
int kvf__sdisk_clear(conn *c, uint64_t ns, int all, uint64_t dram_cleared);
/* Whether the disk tier holds (ns, key) (no tier: 0). Never waits on I/O. */
int kvf__sdisk_has(kvf_server *s, uint64_t ns, const kvf_key *key);
/* Finishes a request back from the tier on its loop, for c (NULL: the connection is gone, only
 * what the request holds is let go), and frees j. */
void kvf__sdisk_finish(conn *c, kvf__sdisk_job *j);
/* STATS's "disk" object (NULL: no tier, or out of memory), and the tier's metrics. */
struct json_t *kvf__sdisk_stats_json(kvf_server *s);
struct kvf__metrics;
void kvf__sdisk_metrics(kvf_server *s, struct kvf__metrics *m);

/* server_recode.c: COMPRESS and DECOMPRESS, re-encoding each object on the loop thread. */
void kvf__req_recode(conn *c);

/* server_rdma_desc.c: the RDMA descriptor requests. Each answers KVF_ENOTSUP where the node
 * serves no RDMA, but RDMA_RELEASE and RDMA_COMMIT, which only finish what was handed out. */
void kvf__req_rdma_get(conn *c);
void kvf__req_rdma_release(conn *c);
void kvf__req_rdma_reserve(conn *c);
void kvf__req_rdma_commit(conn *c);

/* server_shm.c: shared memory, on Unix-socket connections only. */
/* SHM_MAP: a staging region of the size asked for (and the arena read-only where granted),
 * passed with SCM_RIGHTS on the reply. */
void kvf__req_shm_map(conn *c);
/* SHM_PUT: each object copied from the staging region, verified in its block, committed. */
void kvf__req_shm_put(conn *c);
/* SHM_GET: each object copied into the staging region under a read reference. */
void kvf__req_shm_get(conn *c);
/* The copiers: up to n threads (0: none) that share large SHM_PUTs' copying with their loops;
 * 0 or KVF_ENOMEM. Closed (joined) after the loops. */
int kvf__copiers_open(kvf_server *s, int n);
void kvf__copiers_close(kvf_server *s);
/* Whether c may be handed the arena read-only (and so leased descriptors into it). */
int kvf__shm_arena_granted(const conn *c);
/* Unmaps c's staging region. */
void kvf__shm_conn_free(conn *c);

/* server_put.c: PUT and COMMIT, whose object bytes the frame reader receives between these. */
/* Checks the item table and reserves (PUT) or claims (COMMIT) a block per item, then sets the
 * reader to receive the items' bytes. A bad table gets a fatal error reply. */
void kvf__req_put_begin(conn *c);
/* The last byte of it landed: verifies it (where the server verifies puts) and commits it, or
 * drops its reservation. */
void kvf__req_put_item_done(conn *c, put_item *it);
/* Every item's bytes arrived: answers one status per item (or, for a request of another
 * namespace than the one bound, one error) and sets the reader to the next header. */
void kvf__req_put_finish(conn *c);
/* n bytes of WRITE item it just landed at p (first: its first ones): hashed while in cache. */
void kvf__req_part_bytes(conn *c, put_item *it, const uint8_t *p, size_t n, int first);
#define KVF__PART_RECS 65536u

/* server_frame.c: the frame reader. */
/* Reads and handles c's frames until its socket is drained, a budget of bytes is spent or its
 * replies pile up, then flushes c. Returns -1 when the connection was destroyed, else 0. */
int kvf__frame_on_readable(conn *c);

#endif
