/*
 * What the files of the connector share; not a public interface (that is include/kvf/connector.h).
 *
 * The files, each using only the ones below it:
 *   xfer.c       loads, saves, their per-layer waits and cancel, the storage client's callbacks,
 *                and when a layer or a transfer is done;
 *   connector.c  the handle: open, close, registration, lookup, stats, the transport choice and
 *                the feasibility gate;
 *   workers.c    the worker pool (page tasks: scatter for loads, gather and hash for saves) and
 *                the staging regions;
 *   pagemap.c    the page map, the only code that reads or writes the engine's host KV memory
 *                and that names its CUDA pages (the copier of cuda/ moves those).
 * The pool reports each finished task through the transfer's task_end, set by xfer.c, and the
 * storage client reports through the callbacks xfer.c gives it: nothing calls up.
 *
 * Threads: the engine's thread calls the API and waits; the storage client's I/O thread reports
 * transfer progress (a layer of every chunk verified, a batch done); a pool of worker threads does
 * the page copies. The I/O thread never copies engine memory: it only queues work.
 *
 * Load: one layer-streamed GET of every chunk into a staging region (object format, one buffer
 * per chunk); as layer l of every chunk arrives, workers scatter its segments into the engine's
 * pages and layer l is marked ready. Save: as the engine finishes layer l, workers gather that
 * layer's pages of every chunk into staging and hash it; after the last layer the headers are
 * sealed and the batch is put (two-phase: chunks already stored are not sent again).
 *
 * Lock order: connector lock (kvf_connector.mu: task queue, staging regions, stats, transfers in
 * flight), then a transfer's lock (kvf_xfer.mu). The client's callbacks take them in that order
 * too; nothing here holds either across I/O.
 */
#ifndef KVF_CONNECTOR_INT_H
#define KVF_CONNECTOR_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "kvf/connector.h"
#include "kvf/client.h"

#include "pagemap.h"

/* Staging regions kept for reuse: a load, a save and the previous request's save still being
 * stored (workers.c). */
#define KVF__STAGE_SLOTS 3
/* Prefetch memory kept for the next prefetch once its own is done (workers.c): at most this many
 * mappings, of at most KVF__PF_KEEP_BYTES together. */
#define KVF__PF_KEEP       4
#define KVF__PF_KEEP_BYTES ((size_t)1 << 30)

/* kvf_xfer.region of a load from a prefetch's memory: not the connector's to release. */
#define KVF__STAGE_BORROWED (-2)

/* A save's staging (kvf_xfer.stage_state). */
enum { KVF__STAGE_NONE = 0, KVF__STAGE_ACQUIRING = 1, KVF__STAGE_HELD = 2 };

/* A staging region: one mapping reused by one transfer at a time; mem NULL while the slot is
 * unused. */
typedef struct kvf__region {
    uint8_t *mem;
    size_t cap;
    int busy;
    int cu_reg; /* registered with CUDA (page-locked for the copy engine) */
} kvf__region;

/* A storage node's arena view registered with CUDA, so that in-place loads DMA from it
 * (docs/cuda.md); reg < 0: registration failed, copies from it go through the driver's own
 * staging. */
#define KVF__CU_VIEWS 32
typedef struct kvf__cuview {
    const void *base;
    size_t len;
    int reg;
    const kvf_client *owner; /* whose view it is: unregistered before that client closes */
} kvf__cuview;

struct kvf__task; /* a queued page task */

/* A storage client of the connector and what holds it (stores.c). */
typedef struct kvf__clref {
    kvf_client *cl; /* NULL once closed */
    int refs;     /* under the connector lock: 1 while it is the current one, plus one per transfer,
                   * prefetch or call that runs on it */
    char **nodes; /* the set it was opened on, sorted (NULL: the nodes the engine gave) */
    size_t n_nodes;
    struct kvf__clref *next; /* among the retired ones */
} kvf__clref;

struct kvf_connector {
    /* Set at open (connector.c). */
    kvf_layout l;
    kvf_keyspace ks;
    /* The storage clients (stores.c), under mu: the one new transfers start on, and the earlier
     * ones, closed by the refresher once nothing holds them. */
    kvf__clref *cur, *retired;
    /* What a client is opened with, kept for the refresher: the scheduler list (NULL: the nodes
     * were given), the credential file, the transport asked for, connections per node, and how
     * often to ask the scheduler (ms; <= 0: never). */
    char *sched, *credential;
    const char *transport_req;
    int conns_per_node, refresh_ms;
    pthread_t st_th;
    pthread_cond_t st_cv; /* under mu: stop, a retired client's last hold dropped, or etcd told
                             of a store */
    /* With the nodes from etcd (kvf_connector_opts.etcd): the watch of the stores' prefix and,
     * under mu, the stores it told of, by node number (ascending), and whether that changed since
     * the refresher last looked. */
    struct kvf__watcher *st_watch;
    struct kvf__estore *estores;
    size_t n_estores;
    int estores_changed;
    int st_started, st_stop, st_cv_ready;
    int st_closed;      /* under mu: the clients were closed (connector close) */
    uint64_t obj_bytes; /* raw object size of a chunk */
    uint64_t seg_bytes; /* one layer of one chunk; fixed at open (the workers size scratch by it) */
    kvf_caps local, remote;  /* the engine's capability record (its mem_kinds from registration)
                              * and the storage node's */
    char transport_why[240]; /* why the transfers use TCP (kvf_connector_transport) */
    uint32_t hdr_len;
    int deadline_ms;
    int workers_given;  /* kvf_connector_opts.workers */
    int trust_local;    /* kvf_connector_opts.trust_local_store */
    int save_whole;     /* kvf_connector_opts.save_whole */
    int save_parts_shm; /* kvf_connector_opts.save_parts_shm: 1, -1, or 0 (by I/O threads) */
    /* segment bytes of in-place loads hashed by the workers (kvf_connector_stats) */
    atomic_uint_fast64_t in_place_hashed;
    /* Set by registration, under mu and with no transfer in flight (connector.c). */
    kvf__pagemap pm;
    int registered;
    /* The connector lock, and what it guards. */
    pthread_mutex_t mu;
    pthread_cond_t cv;         /* a task was queued, or the pool is closing */
    struct kvf__task *qh, *qt; /* the task queue (workers.c) */
    pthread_t *th;             /* the workers, started at open (workers.c) */
    int nworkers;
    int closing;  /* no new transfer; the workers exit once the queue is empty */
    int inflight; /* transfers not yet freed */
    int closed;   /* close has run; the last transfer freed releases the connector */
    kvf__region regions[KVF__STAGE_SLOTS]; /* staging (workers.c) */
    kvf__region pf_kept[KVF__PF_KEEP];     /* prefetch memory kept for reuse (workers.c) */
    kvf_connector_stats st;
    char last_err[240]; /* the last failure of a page task (kvf_connector_error) */
    /* CUDA registrations: arena views registered for in-place loads (workers.c), under cu_mu
     * (taken alone) */
    pthread_mutex_t cu_mu;
    kvf__cuview views[KVF__CU_VIEWS];
    int n_views;
    /* Held shared by a transfer releasing its lease, exclusive by close while it closes the
     * clients: a lease's release never runs into its client's close (taken alone). */
    pthread_rwlock_t lease_rw;
    /* The streams of CUDA pages' copies, one for loads and one for saves, on the registered
     * device (made by registration; every worker's copiers share them: concurrent streams of
     * host-to-device copies measured slower than one, docs/cuda.md). */
    void *cu_stream[2];
    int cu_stream_dev;
    /* Metrics (kvf_connector_set_metrics): series in the engine's registry, or NULL. Set with no
     * transfer in flight; observed lock-free. [0]: loads, [1]: saves. */
    struct kvf__series *m_layer[2]; /* a layer's time: load start -> layer in; done -> read */
    struct kvf__series *m_wait[2];  /* the engine blocked: wait_layer; wait_pages */
    struct kvf__series *m_xfer[2];  /* a whole transfer, start to done */
};

struct kvf_xfer {
    /* Set when the transfer is made (xfer.c). */
    kvf_connector *cn;
    kvf__clref *cr; /* the storage client it runs on, held until it is freed */
    int is_save;
    size_t n_chunks;    /* chunks moved */
    size_t first_chunk; /* save: index of the first saved chunk among the sequence's chunks */
    kvf_key *keys;
    uint32_t *nodes;    /* load: per moved chunk, the node a plan names for it, or NULL */
    uint32_t *page_ids; /* pages of the moved chunks only */
    uint8_t *stage;     /* a save's is set by its first gather task (stage_state) */
    int region;         /* index of the staging region held, -1 for a private buffer, or
                         * KVF__STAGE_BORROWED: a prefetch's memory (pf) */
    kvf_prefetch *pf;   /* the prefetch whose memory a load reads, held until destroy */
    int stage_cu_reg;   /* a private buffer registered with CUDA */
    /* How the pool reports that one of this transfer's tasks ended (workers.c calls it with no
     * lock held; the transfer may be freed as soon as it returns): `failed` chunks of layer
     * `layer` failed their scatter (or, for a save, could not be gathered: no staging), or the
     * task was `skipped` because the transfer was cancelled.
     * Set when the transfer is made, so that the pool never calls up into xfer.c. */
    void (*task_end)(kvf_xfer *x, uint32_t layer, int failed, int skipped);
    /* The client batch's arrays, and what the client and the workers write. */
    void **bufs;
    uint64_t *caps, *lens;
    int *status;
    atomic_uint *verified; /* load: layers verified per chunk, written by the I/O thread */
    uint64_t *seg_xxh;     /* save: [chunk][layer] checksums of the gathered segments */
    kvf_op *op;            /* the client's op, once the batch is submitted */
    /* A load straight from a storage node's arena on this host (docs/shm.md): the objects stay
     * in the node's read-only view under lease, and the workers scatter from there (srcs[c],
     * verified and checked against the lease) with no staging copy. NULL: the client's get. */
    kvf_lease *lease;
    const void **srcs;
    /* Load: per chunk, 1 + the first layer whose scatter failed (0: none), written by the
     * workers; such a chunk is not loaded whatever arrived. */
    atomic_uint *bad;
    /* Save of CUDA pages: per layer, the event the engine recorded on its stream when it
     * reported the layer done (xfer.c); the workers' copies wait for it. */
    void **cu_ev;
    /* The transfer's lock, and what it guards. */
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* a layer's state was decided, the transfer is done or cancelled, a
                            * task ended, or a save's staging was acquired */
    int *layer_state;      /* 1 pending, 0 ready, < 0 failed with that code */
    uint32_t *layer_tasks; /* tasks not yet finished per layer */
    int *layer_failed;     /* load: a chunk of this layer failed in its scatter; save: the
                            * failure that kept its gather from running */
    uint32_t layers_done;  /* save: layers gathered */
    int paced;             /* save: a layer was reported after one was gathered (the engine
                            * produces them over time: a put in parts overlaps it) */
    uint64_t t_start;      /* when the transfer was made (kvf__now_ns) */
    uint64_t *layer_t;     /* save: when each layer was reported done */
    int pending_tasks;
    int stage_state;   /* save: a KVF__STAGE_* state, or < 0: staging failed with that code */
    int transfer_done; /* the client op completed (or none is needed) */
    int done;          /* transfer_done and no task pending */
    int result;
    int cancelled;
    int submitting; /* a save's batch between the decision to put it and its op set (x->op) */
    int saying;     /* workers telling a put in parts more (parts_say), outside x->mu: the op
                     * and x must outlive them (kvf_xfer_free waits) */
    /* save: its put in parts (kvf_client_put_parts), started by its first gathered layer: 0 not
     * yet, 1 being started (submitting too), 2 running (x->op), -1 none (the batch is put whole
     * once every layer is gathered) */
    int parts;
    size_t loaded_tokens;
};

/* ------------------------------------------------------------------------------------------ */
/* prefetch.c: prefetches */

/* A prefetch: the chunks of a prefix fetched in groups into memory of its own. */
struct kvf_prefetch {
    kvf_connector *cn;
    kvf__clref *cr; /* the storage client its groups run on, held until it is freed */
    size_t n_chunks, group, n_groups; /* chunks, and per group (the last may have fewer) */
    kvf_key *keys;
    uint8_t *mem; /* n_chunks objects of cn->obj_bytes, chunk c at c * obj_bytes */
    size_t mem_len;
    int cu_reg;
    void **bufs;
    uint64_t *caps, *lens;
    int *status;
    /* kvf_connector_prefetch_from: each chunk's named node (a plan's source) where it is not the
     * chunk's own, else KVF_NODE_ANY; NULL where no source named one */
    uint32_t *nodes;
    uint64_t
        t0_ns; /* when it started (CLOCK_MONOTONIC): a retry gets what is left of the deadline */
    struct kvf__pgroup *groups;
    pthread_mutex_t mu;
    pthread_cond_t cv; /* a group arrived */
    size_t groups_done;
    /* Holds: the caller's, one per group in flight and one per load reading mem; the last one
     * dropped frees the prefetch (on the storage client's thread, when a group is the last). */
    int refs;
};

/* A load's chunk c failed at layer: it is not loaded (workers.c). */
void kvf__chunk_failed(kvf_xfer *x, size_t c, uint32_t layer);

/* A load's hold on a prefetch's memory (kvf_connector_load_prefetched), dropped by xfer_destroy. */
void kvf__prefetch_hold(kvf_prefetch *p);
void kvf__prefetch_drop(kvf_prefetch *p);

/* ------------------------------------------------------------------------------------------ */
/* connector.c: the handle */

/* Asks the classifier whether action a is real between the engine's capability record and the
 * storage node's. Returns 0, KVF_EINFEASIBLE, or KVF_EINVAL for an action it does not know. */
int kvf__connector_gate(kvf_connector *cn, kvf_action_id a);
/* Releases a closed connector that no transfer holds any more: called by close, or by the last
 * transfer freed after it. */
void kvf__connector_free(kvf_connector *cn);

/* ------------------------------------------------------------------------------------------ */
/* workers.c: the worker pool and the staging regions */

/* Maps two staging regions at `bytes` each (0: regions are mapped by the first transfers that need
 * them). A region that cannot be mapped now is mapped on demand. */
void kvf__stage_init(kvf_connector *cn, size_t bytes);
/* Gives x a staging buffer of n bytes: a free region of the pool (the smallest that holds n, else
 * one grown to it), else a private mapping, so that transfers in flight together never wait for
 * each other's staging. Takes cn->mu, and maps without it. 0 or KVF_ENOMEM. */
int kvf__stage_acquire(kvf_connector *cn, kvf_xfer *x, size_t n);
/* Gives back x's staging buffer of n bytes (none held: nothing). Called with cn->mu held. */
void kvf__stage_release_locked(kvf_connector *cn, kvf_xfer *x, size_t n);
/* Memory of at least n bytes for a prefetch (page-locked where allowed, registered with CUDA
 * when the pages are CUDA memory: *cu_reg), *cap its size: one that an earlier prefetch gave
 * back where one is large enough (the smallest such), else a new mapping; NULL when out of
 * memory. Give it back with kvf__stage_put_private(), the connector still open or closing (not
 * yet freed). */
uint8_t *kvf__stage_get_private(kvf_connector *cn, size_t n, size_t *cap, int *cu_reg);
/* Keeps mem (cap bytes) for the next prefetch where there is room (KVF__PF_KEEP,
 * KVF__PF_KEEP_BYTES), else unmaps it; NULL: nothing. */
void kvf__stage_put_private(kvf_connector *cn, uint8_t *mem, size_t cap, int cu_reg);
/* Unmaps every region; no transfer may hold one. */
void kvf__stage_fini(kvf_connector *cn);

/* Starts cn->nworkers workers. Returns 0, or KVF_ENOMEM or KVF_EAGAIN with one line in err and
 * no worker left running. */
int kvf__pool_start(kvf_connector *cn, char *err, size_t errlen);
/* Queues layer `layer` of every chunk of x, in at most one task per worker, and counts the tasks
 * in x's pending_tasks and layer_tasks. Returns 0, or KVF_ENOMEM with nothing queued. Called with
 * cn->mu held; takes x->mu. */
int kvf__pool_enqueue_locked(kvf_connector *cn, kvf_xfer *x, uint32_t layer);
/* Adds workers up to n in all (CUDA pages: their in-place loads hash every segment while the
 * copy engine reads it). Best effort: 0, or KVF_ENOMEM with the pool as it was. */
int kvf__pool_grow(kvf_connector *cn, int n);
/* Has the workers finish the tasks already queued and exit, and joins them. */
void kvf__pool_stop(kvf_connector *cn);
/* Lets go of the CUDA registrations of arena views (after the pool stopped). */
void kvf__cuda_views_release(kvf_connector *cn);
/* Unregisters the arena views of client cl (before cl is closed, which unmaps them). */
void kvf__cuda_views_release_of(kvf_connector *cn, const kvf_client *cl);

/* stores.c: the storage clients. A record of cl opened on nodes (sorted here; owned from now on;
 * NULL where given by the engine), held once as the current one; NULL when out of memory. */
kvf__clref *kvf__clref_new(kvf_client *cl, char **nodes, size_t n);
/* The current client, held (NULL once the connector closed its clients); drop it when done. */
kvf__clref *kvf__clref_hold(kvf_connector *cn);
void kvf__clref_drop(kvf_connector *cn, kvf__clref *r);
void kvf__clref_drop_locked(kvf_connector *cn, kvf__clref *r);
void kvf__nodes_free(char **nodes, size_t n);
/* Starts the refresher where the nodes come from the scheduler or etcd. 0 or KVF_ENOMEM. */
int kvf__stores_start(kvf_connector *cn, char *err, size_t errlen);
/* Starts the watch of the stores registered in etcd (o->etcd, o->cluster) and waits for its first
 * listing (the connector's deadline at most): their addresses into *nodes and *n, in node order.
 * cn->mu must be initialized. 0, or KVF_ECONNREFUSED (etcd did not answer, or lists no store),
 * KVF_EINVAL, KVF_ENOMEM with one line in err. */
int kvf__stores_etcd_open(kvf_connector *cn, const kvf_connector_opts *o, char ***nodes, size_t *n,
                          char *err, size_t errlen);
/* Stops the refresher; no transfer starts on a client after. */
void kvf__stores_stop(kvf_connector *cn);
/* kvf__stores_stop, then closes every client (transfers in flight on them fail), once the
 * workers stopped. */
void kvf__stores_close(kvf_connector *cn);
/* Frees the records (connector free). */
void kvf__stores_free(kvf_connector *cn);

/* connector.c: GET /v1/stores of each scheduler replica in the list until one answers (nodes:
 * strings the caller frees with kvf__nodes_free). And a client on the n nodes given, opened as
 * the connector's first was. */
int kvf__nodes_from_sched(const char *list, char ***nodes, size_t *n, int timeout_ms, char *err,
                          size_t errlen);
int kvf__client_open_on(kvf_connector *cn, const char *const *nodes, size_t n, kvf_client **out,
                        char *err, size_t errlen);

/* prefetch.c: for each of n chunks (keys; chunk c starts at token (first_chunk + c) *
 * chunk_tokens), the node of cl that the run of src covering its first token names, where that is
 * not the chunk's own node, else KVF_NODE_ANY: *nodes (malloc'd), NULL when no chunk is named.
 * *named counts the chunks named, *unknown the runs naming a node cl does not use. 0 or
 * KVF_ENOMEM. */
int kvf__plan_nodes(const kvf_connector *cn, kvf_client *cl, const kvf_key *keys, size_t n,
                    size_t first_chunk, const kvf_source *src, size_t n_src, uint32_t **nodes,
                    uint64_t *named, uint64_t *unknown);

#endif
