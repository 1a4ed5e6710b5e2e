/*
 * The shared-memory data path's insides (docs/shm.md). Not a public interface. shm_conn.c makes
 * and keeps the connections to a node's Unix socket and the views of its arena; shm_path.c runs
 * gets and puts on worker threads; shm_ctl.c serves the caller's own thread (EXISTS, leases for
 * engines) and finds the nodes on this host at open. Calls go from shm_path.c and shm_ctl.c down
 * to shm_conn.c, never back.
 *
 * Locks: the path's `mu` guards the workers' queues and stop, `vmu` the nodes' view lists, `cmu`
 * the counters, ctl_mu[node] a node's control connection; each is taken alone. A worker's
 * connections belong to its thread.
 */
#ifndef KVF_CLIENT_SHM_INT_H
#define KVF_CLIENT_SHM_INT_H

#include "client_int.h"

#include <sys/types.h>

#define STAGING_BYTES      (64ull << 20)
#define LEASE_MS           2000u
#define LEASE_MARGIN_NS    2000000ull
#define LEASE_GROWN_MAX_MS 16000u
#define MAX_KEYS           4096u
#define RETRY_NS           (200ull * 1000000u)
#define PROBE_NS           (200ull * 1000000u) /* a node on this host answers HELLO in well under 1 ms */
#define SPLIT_MIN_BYTES    (1ull << 20)
#define PUT_ROUND          (4ull << 20)
#define RELEASES_MAX       16
#define SHM_MAX_WORKERS    16 /* copying is memory-bound well before this many */
#define ALIGN              64u
#define MOVED              UINT32_MAX /* a sub's key handed to another sub */

/* A read-only view of one store process's arena, and the store's address of its base. A node
 * restarted is another arena (another memfd): each connection uses the view of the store it is
 * connected to, found by the descriptor's identity. A view is held by the connections that use
 * it and by the leases taken on them; one that is not the node's newest goes once the last lets
 * it go (a dead store's memory is not kept alive by its clients). */
typedef struct sview {
    struct sview *next;
    const uint8_t *map;
    uint64_t base, len;
    dev_t dev;
    ino_t ino;
    int refs;   /* under the path's vmu */
    int pinned; /* handed out by kvf_client_shm_view: mapped until the client closes */
} sview;

typedef struct sconn {
    int fd; /* -1: not connected */
    uint8_t *stg;
    uint64_t stg_len;
    uint64_t next_id;
    uint64_t retry_at;
    int gone; /* the last attempt found no socket to connect to: its keys go over TCP */
    int last_rc;
    /* RDMA_RELEASEs sent and not yet answered (their ids): the replies are read before the
     * connection's next request, off the get's critical path */
    uint64_t rel[RELEASES_MAX];
    int n_rel;
    const sview *view; /* the arena of the store this connection reaches (NULL: none), held */
    struct kvf__shm_path *p;
    size_t node;
    /* how many times it was closed: the node drops a connection's leases when it closes, so a
     * lease taken on it holds only while this has not moved (kvf_lease_valid) */
    atomic_uint_fast64_t epoch;
    char err[240];
} sconn;

typedef struct snode {
    int on;       /* served over shared memory */
    int has_view; /* the arena is handed to this client (else its gets are staged) */
    sview *views; /* newest first, under the path's vmu */
} snode;

typedef struct sub sub;
typedef struct agg agg;
/* A part of an op: a worker's share, or the keys that go over TCP as a child op. */
struct sub {
    agg *a;
    sub *next; /* the workers' queue */
    int tcp;
    kvf__part p; /* its keys; p.op: the TCP child */
    /* a share's keys' nodes, chosen once at submission: with rerouting a key's node can change
     * while the share runs (a node marked down or up meanwhile), and a key looked up again by
     * node could fall between two nodes and never be asked */
    uint32_t *node;
    /* 1 where node[i] is a holder on this host nearer than the key's first node, which is not: a
     * key it does not have (or cannot serve) is asked of the first node over TCP (in node's
     * block, after it) */
    uint8_t *near;
    /* a TCP sub asking again keys of a streamed get whose lease ended mid-copy
     * (kvf__shm_retry_tail): per key, the object read whole into a buffer of
     * its own (got, the part's buffer), the engine's buffer and where the layers not delivered
     * yet start in it */
    struct sub_tail {
        uint8_t *dst, *got;
        uint64_t from;
    } * tail;
};

struct agg {
    kvf_op *parent;
    const kvf_batch *pb;
    struct kvf__shm_path *p;
    pthread_mutex_t mu;
    int left, result, used_shm, used_tcp;
    uint32_t fired, max_layers;
    int n, cap;
    sub **subs;
};

/* What one node's leases hold: the hits' positions in k, their headers, where each lies in the
 * view, and when the lease may have ended. */
typedef struct leased {
    size_t node;
    uint64_t id, until_ns, epoch; /* epoch: of the connection it was taken on */
    uint32_t asked_ms;            /* the lease asked for */
    size_t n;
    uint32_t *pos;
    kvf_obj_info *info;
    const uint8_t **src;
    uint64_t *segoff; /* streamed: where each hit's next segment starts */
} leased;

static inline uint64_t kvf__shm_align(uint64_t x)
{
    return (x + ALIGN - 1) & ~(uint64_t)(ALIGN - 1);
}

typedef struct worker {
    struct kvf__shm_path *p;
    int idx;
    pthread_t th;
    int started;
    sconn *cn;         /* one per node */
    sub *qh, *qt;      /* its shares to run, under the path's mu */
    pthread_cond_t cv; /* signalled when one is queued or the path stops */
} worker;

struct kvf__shm_path {
    kvf_client *c;
    size_t n;
    snode *nodes;
    /* Control requests on the caller's own thread (kvf__shm_exists): one connection per node,
     * taken by whoever gets its lock first; the others use the engines. */
    sconn *ctl;
    pthread_mutex_t *ctl_mu;
    int W;
    worker *w;
    /* the lease asked for gets: shm_lease_ms where the caller set it, else the default, doubled
     * (up to LEASE_GROWN_MAX_MS) after each get of which a lease ran out mid-copy */
    _Atomic uint32_t lease_ms;
    int lease_set;
    uint64_t staging;
    pthread_mutex_t mu; /* guards the workers' queues and stop */
    int stop;
    pthread_mutex_t vmu; /* guards the nodes' view lists */
    /* The leases not released yet (kvf_client_lease), which the path's close lets go of: a lease
     * released after its client closed then touches nothing of the client's. */
    pthread_mutex_t lmu;
    struct kvf_lease *leases;
    pthread_mutex_t cmu;
    kvf_client_counters cnt;
};

/* shm_ctl.c: the leases still held when the path closes are cut loose from it (their views go
 * with the path's): releasing one later frees it and nothing else. */
void kvf__shm_leases_orphan(struct kvf__shm_path *p);

/* shm_conn.c: connections and views */

/* Adds to the path's counters (under cmu). */
void kvf__shm_count(struct kvf__shm_path *p, uint64_t reqs, uint64_t in, uint64_t out,
                    uint64_t failed, uint64_t expired, uint64_t reconnects, uint64_t fallback);
/* Closes s: its view let go, its epoch moved. */
void kvf__shm_conn_close(sconn *s);
/* Reads the replies of s's releases in flight. 0, or the error (s is then closed). */
int kvf__shm_drain_releases(sconn *s);
/* Node's socket name into name where it is on this host and serves one: 1, else 0. */
int kvf__shm_node_name(kvf_client *c, size_t node, char *name, size_t len);
/* Lets one hold of a view go: one nobody holds that is not the node's newest is unmapped. */
void kvf__shm_view_put(struct kvf__shm_path *p, size_t node, const sview *cv);
/* Connects s to node's socket: HELLO (and AUTH), SHM_MAP of a staging region of `staging` bytes
 * (and, where want_view, the arena, whose view becomes s->view; where need_view, a connection not
 * handed it fails). 0, or the error with the reason in s->err. */
int kvf__shm_conn_open(struct kvf__shm_path *p, size_t node, sconn *s, int want_view, int need_view,
                       uint64_t staging, uint64_t deadline_ns);
/* Worker w's connection to node, made (again) where needed. 0 or the error (the connection stays
 * closed until RETRY_NS have passed). */
int kvf__shm_conn_of(worker *w, size_t node, uint64_t deadline_ns, sconn **out);
/* As kvf__shm_conn_of, with the replies of its releases in flight read first (a connection that
 * fails to give them is made again), so that the next reply read is the next request's. */
int kvf__shm_conn_clear(worker *w, size_t node, uint64_t deadline_ns, sconn **out);
/* Whether w may send node its keys now: 0 once connected; KVF_EHOSTUNREACH while the node is down
 * (probed once its backoff has passed). */
int kvf__shm_node_ready(worker *w, size_t node, uint64_t deadline_ns);

/* shm_path.c: a share's keys and the op they belong to */

/* Sub k delivered `layers` layers of every key it still has a hit for; its keys' statuses go to
 * the parent first. */
void kvf__shm_sub_layers(sub *k, uint32_t layers);
/* Keys xs of share k (n of them, a streamed get's hits) whose lease ended while layer `layer` was
 * copied: asked again over TCP (a nearer holder's keys of their first node),
 * whole, into buffers of their own; where that object is the one whose earlier layers were
 * delivered (the same header, every segment's checksum in it), its layers from `layer` on are
 * copied into the engine's buffer, else the key is a miss. The sub holds the op's later layers
 * back until then. The keys leave k (k's status for them is set, and not reported). */
void kvf__shm_retry_tail(sub *k, const leased *l, const size_t *hs, size_t n, uint32_t layer);
/* A lease of was ms (the default) ran out before a copy ended: this host copies slower than it
 * allows (a loaded machine, a sanitizer build); the client's later gets and leases ask twice as
 * long, up to LEASE_GROWN_MAX_MS. */
void kvf__shm_lease_grow(struct kvf__shm_path *p, uint32_t was);
/* Fails the n keys at pos with rc, or (fb non-NULL) hands them to the TCP fallback list. */
void kvf__shm_keys_fail(sub *k, const uint32_t *pos, size_t n, int rc, uint32_t *fb, size_t *n_fb);

/* shm_get.c: gets */

/* RDMA_GET for the n keys at pos (all on node) on w's connection: the hits' headers into their
 * buffers, their bytes located in the connection's view, into *l. 0, or the error that fails
 * every key. */
int kvf__shm_lease_node(worker *w, sub *k, size_t node, const uint32_t *pos, size_t n,
                        uint64_t deadline_ns, int stream, uint32_t *layers, leased *l);
/* Releases l without waiting for the answer. */
void kvf__shm_release(worker *w, leased *l, uint64_t deadline_ns);
/* Copies and verifies the nl leases' hits (layer by layer for a stream); returns the bytes. A
 * plain get's hits on their first node whose lease ended mid-copy are misses listed in again (room
 * for the share's keys) for the caller to ask over TCP. */
uint64_t kvf__shm_copy_leased(sub *k, leased *ls, size_t nl, int stream, uint32_t L,
                              uint64_t *expired, uint64_t *failed, uint32_t *again,
                              size_t *n_again);
/* Staged get of the n keys at pos (on node) through w's staging region. */
void kvf__shm_get_staged(worker *w, sub *k, size_t node, const uint32_t *pos, size_t n,
                         uint64_t deadline_ns, int stream, uint32_t *layers, uint32_t *fb,
                         size_t *n_fb);

#endif
