/*
 * kvf/connector.h - the library an inference engine links to reuse KV cache across requests and
 * nodes.
 *
 * The engine registers its paged KV memory (the connector never allocates engine KV). Before a
 * prefill it asks how many leading tokens are cached (lookup), starts an asynchronous load of
 * them into its own pages, and runs its forward pass layer by layer, waiting only for the layer it
 * is about to compute (wait_layer): layer 0 can run while later layers are still on the wire.
 * After computing a layer it tells the connector (layer_done), which gathers that layer's pages
 * into staging while the engine computes the next one; when the last layer is in, the chunks are
 * sent to the storage nodes in large batches.
 *
 * Pages are moved in whole-chunk batches (a chunk is chunk_tokens tokens, all layers), never page
 * by page. Worker threads do the gather and scatter copies and the I/O; the engine's thread only
 * waits. A store that is down, slower than the deadline, or that returns a bad checksum makes its
 * chunks a miss: wait_layer reports the failure and the engine recomputes. The engine never
 * receives a wrong byte and never waits past the deadline.
 *
 * Layout of one page in a layer's K (or V) plane: [page_tokens][heads_per_rank][head_dim], as in
 * vLLM's FlashAttention backend; a latent (MLA) layout has one plane.
 */
#ifndef KVF_CONNECTOR_H
#define KVF_CONNECTOR_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/export.h"
#include "kvf/feasibility.h"
#include "kvf/layout.h"
#include "kvf/metrics.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvf_connector kvf_connector;
typedef struct kvf_xfer kvf_xfer;

typedef enum kvf_mem_kind {
    KVF_MEM_HOST = 0,    /* ordinary host memory */
    KVF_MEM_UNIFIED = 1, /* unified memory (Apple Silicon, CUDA managed): host-addressable */
    KVF_MEM_CUDA = 2,    /* CUDA device memory: needs the CUDA runtime on this host (kvf/cuda.h) */
} kvf_mem_kind;

/* One layer's KV planes in the engine's memory. */
typedef struct kvf_kv_layer {
    void *k_base;       /* input: page 0 of the K plane (the latent plane for MLA) */
    void *v_base;       /* input: page 0 of the V plane; NULL for a latent layout */
    size_t page_stride; /* input: bytes from one page to the next, at least the page size */
    uint32_t num_pages; /* input: pages in each plane */
    kvf_mem_kind kind;  /* input */
} kvf_kv_layer;

typedef struct kvf_connector_opts {
    const char *const *nodes; /* input: storage nodes "host:port"; borrowed during open */
    size_t n_nodes;           /* input: 0 to ask the scheduler for them */
    const char *sched;        /* input: kvf-sched's HTTP address "host:port", used when n_nodes
                               * is 0: the storage nodes come from its GET /v1/stores; several
                               * replicas comma-separated: the first that answers */
    kvf_layout layout;        /* input: the engine's KV layout (validated) */
    const char *salt;         /* input: tenant salt of the key namespace (may be NULL); with a
                               * credential, the credential's salt comes first */
    const char *credential;   /* input: credential file for storage nodes that authenticate
                               * (kvf_client_opts.credential: NULL reads $KVF_CREDENTIAL) */
    size_t staging_bytes;     /* input: initial size of two of the staging regions; 0: sized by the
                               * first transfers, 32 MiB and up */
    int workers;              /* input: gather/scatter worker threads; 0: 2, or a quarter of the
                               * cores where more (1 to 8); with CUDA pages registered, half the
                               * cores (2 to 8) */
    int deadline_ms;          /* input: deadline of every transfer; 0: 5000 */
    int conns_per_node;       /* input: connections per storage node; 0: 4 */
    const kvf_caps *caps;     /* input: the engine's capability record (NULL: the reference
                               * engine's); every remote action is classified against it and the
                               * storage node's, and an infeasible one is refused with
                               * KVF_EINFEASIBLE */
    int trust_local_store;    /* input: 1: segments loaded in place from a storage node on this
                               * host (docs/shm.md) are not hashed again: the node verified them
                               * when they were stored and no client can write its arena; 0 (the
                               * default): every segment is hashed before its chunk is reported
                               * loaded (docs/cuda.md: what it costs). Only for nodes that verify
                               * what is put (the default): with a node run --no-verify nothing
                               * would check those bytes */
    int stores_refresh_ms;    /* input: with the nodes from the scheduler (n_nodes 0), how often
                               * to ask it for them again: a store that joins is used from then
                               * on, one that left (its lease in etcd lapsed) is dropped, and
                               * transfers in flight finish on the nodes they started on. 0:
                               * every 2000 ms; < 0: never (the nodes of open, for good) */
    const char *etcd;         /* input: with n_nodes 0, etcd's members ("http://HOST:PORT,..."):
                               * the storage nodes are the ones registered under
                               * /kvfabric/CLUSTER/stores/ (docs/membership.md), followed by a
                               * watch of their own: a store whose lease lapses is dropped, one
                               * that registers is used, each as etcd tells it (sched unused) */
    const char *cluster;      /* input: the cluster's name in etcd (NULL: "default") */
    int save_whole;           /* input: 1: a save's chunks are put once every layer is gathered;
                               * 0 (the default): where the storage client runs over TCP, a
                               * save whose layers come over time (a layer reported after one
                               * was gathered) is put in parts (kvf_client_put_parts), each
                               * layer sent as the layers before it are in, and only the last
                               * layers and the headers are left once the pass ends
                               * (docs/connector.md) */
    int save_parts_shm;       /* input: over shared memory, a save in parts too (over the
                               * node's Unix socket) or whole through the staging regions:
                               * 1 parts, -1 whole, 0 (the default) parts where the storage
                               * client runs two I/O threads or more (its parts then spread over
                               * them), else whole: on a 16-core host parts left 19 ms of a 1 GiB
                               * save after the pass against 71 ms whole; on a 2-core machine,
                               * one I/O thread, parts had tails of 0.2-1.4 s where whole had
                               * none (docs/connector.md) */
} kvf_connector_opts;

/* Opens a connector, with the storage nodes given or, failing those, the ones registered in etcd
 * or the ones the scheduler lists. err gets one line on failure. Caller owns the result; free with
 * kvf_connector_close(). Returns 0, KVF_EINVAL (bad layout or options), KVF_ECONNREFUSED (the
 * scheduler or etcd did not answer, or lists no node), KVF_ENOMEM. */
KVF_API int kvf_connector_open(kvf_connector **out, const kvf_connector_opts *opts, char *err,
                               size_t errlen);
/* Lets the workers finish the page work already queued, then fails every transfer still in flight
 * (KVF_ECANCELED; a save's layer reported after the close: KVF_ECLOSED, the save failed) and
 * clears *cn. Transfers not yet freed may still be waited on and must still be freed with
 * kvf_xfer_free(); the last one freed releases the connector's memory. Accepts NULL. */
KVF_API void kvf_connector_close(kvf_connector **cn);

/* Records the connector's timing into the engine's metrics registry (kvf/metrics.h), as
 * histograms named there with the registry's prefix:
 *   connector_layer_seconds{op="load"}   a load: from its start until a layer was in the pages
 *   connector_layer_seconds{op="save"}   a save: from a layer reported done until it was read
 *   connector_wait_seconds{op}           the engine blocked: kvf_xfer_wait_layer (load),
 *                                        kvf_xfer_wait_pages (save)
 *   connector_transfer_seconds{op}       a whole transfer that moved chunks, start to done
 * m is borrowed: it must outlive the connector, or be replaced first (NULL: no metrics). Call with
 * no transfer in flight. Returns 0, KVF_EINVAL (cn NULL), KVF_EBUSY (transfers in flight),
 * KVF_ENOMEM. */
KVF_API int kvf_connector_set_metrics(kvf_connector *cn, kvf_metrics *m);

/* Registers the engine's KV memory: one entry per layer of the layout. Borrowed: the memory must
 * stay valid until close or the next registration. Returns 0, KVF_EINVAL (layer count, a NULL
 * base, a stride below the page size, V plane given for a latent layout or missing otherwise;
 * for KVF_MEM_CUDA: a plane that is not device memory, layers on different devices or mixed with
 * host memory), KVF_EINFEASIBLE (memory this host's transfer path cannot reach, e.g. CUDA device
 * memory where no CUDA runtime or device is found; err has the classifier's reason and the
 * loader's), or KVF_EBUSY (transfers in flight). CUDA pages are read and written only by the
 * copy engine or the connector's page-copy kernel, on streams of the connector's own. */
KVF_API int kvf_connector_register(kvf_connector *cn, const kvf_kv_layer *layers, uint32_t n_layers,
                                   char *err, size_t errlen);

/* The number of leading tokens of tokens[0..n) that are cached, a multiple of chunk_tokens. One
 * round trip per storage node. Nodes that do not answer count as misses. */
KVF_API int kvf_connector_lookup(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                 size_t *cached);
/* The same, and why the cached run ends (kvf_client_lookup_prefix_why): 0 at a chunk not held,
 * else the status of the node that could not answer for the next chunk. */
KVF_API int kvf_connector_lookup_why(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                     size_t *cached, int *why);
struct kvf_source;
/* As kvf_connector_lookup, a chunk counting as cached where its own node holds it or the node a
 * plan's run names for it does (src: n_src runs, as for kvf_connector_load_planned): what a
 * planned load can bring. One round trip per node the chunks live on, and one per named node
 * asked (only for chunks their own node lacks). KVF_EINVAL also for src NULL with n_src > 0. */
KVF_API int kvf_connector_lookup_planned(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                         const struct kvf_source *src, size_t n_src,
                                         size_t *cached);

/* Starts loading the KV of tokens[0..n) into the engine's pages. n must be a multiple of
 * chunk_tokens; page_ids lists the engine page of every page_tokens tokens (n / page_tokens
 * entries, each < num_pages). Returns 0 and *x, or KVF_EINVAL / KVF_ERANGE (page ids), KVF_ECLOSED,
 * KVF_ENOMEM, or KVF_EINFEASIBLE when the engine's record rules a layerwise load out (no paged
 * layout or no per-layer hook). Caller owns *x; free with kvf_xfer_free() once it completed.
 * tokens and page_ids are copied. */
KVF_API int kvf_connector_load(kvf_connector *cn, const uint32_t *tokens, size_t n,
                               const uint32_t *page_ids, size_t n_pages, kvf_xfer **x);
/* As kvf_connector_load, for the chunks first_chunk.. of tokens[0..n) only: the chunks before it
 * are already in the engine's pages (a prefix the engine shares on its own) and are neither moved
 * nor touched. page_ids covers all of tokens[0..n), as for a save; loaded_tokens counts from the
 * sequence's start (first_chunk * chunk_tokens when nothing arrived). */
KVF_API int kvf_connector_load_from(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                    size_t first_chunk, const uint32_t *page_ids, size_t n_pages,
                                    kvf_xfer **x);
/* Where a plan takes a run of a prompt's chunks from (kvf-sched's `sources`, docs/scheduler.md,
 * "The nearest replica"): the storage node's data address ("host:port") and the run's tokens
 * [from, from + tokens) of the prompt. */
typedef struct kvf_source {
    const char *store;
    size_t from, tokens;
} kvf_source;
/* As kvf_connector_load_from, each chunk asked first of the node that the run of src holding its
 * first token names (n_src runs; the first that holds it counts; load_named), unless every node
 * is on this host (the load then reads their arenas in place, the nearest copy already). A chunk
 * that no run covers, or whose run names a node this connector does not use
 * (load_sources_unknown), is asked of its own node; one that its named node lacks, or that the
 * named node fails before its first layer came, is asked of its own node in the same get before
 * any layer is reported (load_named_reasked): the layers wait for it, and a source is never the
 * reason for a miss. KVF_EINVAL also for src NULL with n_src > 0. */
KVF_API int kvf_connector_load_planned(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                       size_t first_chunk, const kvf_source *src, size_t n_src,
                                       const uint32_t *page_ids, size_t n_pages, kvf_xfer **x);
/* Starts saving the KV of chunks first_chunk.. of tokens[0..n) (n a multiple of chunk_tokens, the
 * chunks before first_chunk being already cached) from the engine's pages, layer by layer as the
 * engine reports them done. page_ids covers all of tokens[0..n). Same errors as load. */
KVF_API int kvf_connector_save(kvf_connector *cn, const uint32_t *tokens, size_t n,
                               size_t first_chunk, const uint32_t *page_ids, size_t n_pages,
                               kvf_xfer **x);

/* Prefetch (docs/connector.md, "Prefetch with deadlines"): while a request waits for its turn,
 * the chunks of its cached prefix are fetched into memory of the prefetch's own, in groups of
 * chunks in the prompt's order, without touching the engine's pages (which another request may
 * be using). At the request's turn the engine waits for them until a deadline, loads the leading
 * chunks that have arrived into its pages (kvf_connector_load_prefetched: a scatter from memory,
 * layer by layer as for a load) and computes the rest. */
typedef struct kvf_prefetch kvf_prefetch;

/* Starts fetching the chunks of tokens[0..n) (n a multiple of chunk_tokens, at least one chunk).
 * Returns 0 and *p, or KVF_EINVAL, KVF_ECLOSED, KVF_ENOMEM, or KVF_EINFEASIBLE (the engine's
 * record rules a load out). Caller owns *p: free with kvf_prefetch_free(). tokens are copied. */
KVF_API int kvf_connector_prefetch(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                   kvf_prefetch **p);
/* As kvf_connector_prefetch, each chunk asked first of the node that the run holding its first
 * token names (src: n_src runs; the first that holds it counts). A chunk that no run covers, or
 * whose run names a node this connector does not use (counted in prefetch_sources_unknown), is
 * asked of its own node; one that its named node lacks or cannot give is asked of its own node
 * right after (prefetch_named_missed), in the same prefetch: a source is a hint, never a reason
 * for a miss. KVF_EINVAL also for src NULL with n_src > 0. */
KVF_API int kvf_connector_prefetch_from(kvf_connector *cn, const uint32_t *tokens, size_t n,
                                        const kvf_source *src, size_t n_src, kvf_prefetch **p);
/* The leading tokens whose chunks have all arrived, whole and verified, so far. Does not wait. */
KVF_API size_t kvf_prefetch_ready_tokens(kvf_prefetch *p);
/* Waits until every chunk has arrived (or failed) or until deadline_ns (CLOCK_MONOTONIC
 * nanoseconds; 0: no deadline but the connector's transfer deadline), then returns
 * kvf_prefetch_ready_tokens(). Chunks still on their way go on arriving; they are not used by a
 * load that started before. */
KVF_API size_t kvf_prefetch_wait(kvf_prefetch *p, uint64_t deadline_ns);
/* The tokens p was started for (its chunks' worth). */
KVF_API size_t kvf_prefetch_tokens(const kvf_prefetch *p);
/* Starts loading the KV of tokens[0..n) (n a multiple of chunk_tokens, at most
 * kvf_prefetch_ready_tokens()) into the engine's pages from p's memory, as kvf_connector_load
 * does from the storage nodes (page_ids: n / page_tokens entries; every segment checked before it
 * is scattered); the transfer keeps p's memory alive until it is freed. The chunk keys of tokens
 * must be those p fetched: another prompt's prefetch is refused, never loaded. Same returns as
 * kvf_connector_load, and KVF_EINVAL when n exceeds what has arrived or the keys differ. */
KVF_API int kvf_connector_load_prefetched(kvf_connector *cn, kvf_prefetch *p,
                                          const uint32_t *tokens, size_t n,
                                          const uint32_t *page_ids, size_t n_pages, kvf_xfer **x);
/* Gives up the caller's hold: chunks still on their way are dropped when they arrive, and the
 * memory goes once no transfer reads it. Never waits. Accepts NULL and clears *p. */
KVF_API void kvf_prefetch_free(kvf_prefetch **p);

/* Load: waits until layer l of every chunk is in the engine's pages (for CUDA pages: the copies
 * to the device have completed). Returns 0, or the failure
 * that makes this layer unusable (KVF_ENOENT: a chunk is no longer stored; KVF_ECHECKSUM;
 * KVF_ETIMEDOUT; KVF_ECONNREFUSED; KVF_ECANCELED): the engine must recompute. */
KVF_API int kvf_xfer_wait_layer(kvf_xfer *x, uint32_t layer);
/* Save: the engine finished writing layer l of the pages being saved; the connector may gather it
 * now. Layers may be reported in any order, each once. Returns 0, KVF_EINVAL (a load, a layer out
 * of range or reported twice), KVF_ECANCELED, KVF_ENOMEM (the layer was not taken: the save
 * cannot complete; cancel it), or the error that ended the save already (its put in parts
 * failed before the last layer: the save is done, kvf_xfer_wait returns the same). */
KVF_API int kvf_xfer_layer_done(kvf_xfer *x, uint32_t layer);
/* Save of CUDA pages: as kvf_xfer_layer_done, and the connector's copies of the layer wait for
 * the work queued on `stream` (a cudaStream_t; NULL: the legacy default stream) so far: the
 * engine reports a layer as soon as it has queued its kernels, without synchronizing. An event
 * is recorded on the stream at this call. kvf_xfer_layer_done is this with the default stream.
 * For host pages the stream is ignored. Same returns as kvf_xfer_layer_done, and KVF_EIO (the
 * event could not be recorded: kvf_connector_error says why). */
KVF_API int kvf_xfer_layer_done_stream(kvf_xfer *x, uint32_t layer, void *stream);
/* Save: waits until the connector has read every page of the layers reported done so far (they
 * are gathered into its staging); from then on the engine may overwrite those pages, while the
 * chunks are still being stored. Returns 0, KVF_ECANCELED (cancelled: the pages are not read any
 * more either) or KVF_EINVAL (a load). */
KVF_API int kvf_xfer_wait_pages(kvf_xfer *x);
/* Waits for the whole transfer. A load returns 0 when every chunk arrived; a save returns 0 when
 * its batch was stored (per-chunk refusals such as KVF_EEXIST are counted in the stats, not
 * errors). */
KVF_API int kvf_xfer_wait(kvf_xfer *x);
/* Tokens of a completed load that arrived in a leading run of whole chunks, all layers verified:
 * an engine that saw a failure may keep these and recompute the rest. */
KVF_API size_t kvf_xfer_loaded_tokens(const kvf_xfer *x);
/* Stops a transfer: pending work is dropped, and once this returns no worker writes into the
 * engine's pages for it. Waits return KVF_ECANCELED afterwards, except for a save whose every
 * layer was gathered before the cancel: its batch was put (or is being put) and is not withdrawn;
 * its wait returns the put's outcome. */
KVF_API void kvf_xfer_cancel(kvf_xfer *x);
/* Frees a transfer, waiting for it to finish first (cancel it to make that quick). A save with a
 * layer not reported yet is cancelled first (nothing could report it after the free). Accepts
 * NULL and clears *x. */
KVF_API void kvf_xfer_free(kvf_xfer **x);

typedef struct kvf_connector_stats {
    uint64_t loads, saves;           /* transfers started */
    uint64_t loads_in_place;         /* of the loads, those scattered straight from a storage
                                      * node's arena on this host (docs/shm.md) */
    uint64_t load_bytes, save_bytes; /* object bytes moved */
    uint64_t batches;                /* storage-client batches (one per transfer) */
    uint64_t chunks_loaded, chunks_saved, chunks_missed, chunks_existing;
    uint64_t gather_ns, scatter_ns; /* worker time copying pages */
    uint64_t wait_ns;               /* engine time blocked in wait_layer / wait */
    /* bytes its storage client moved (requests and replies), over shared memory and over the
     * network (TCP or RDMA, kvf_connector_transport) */
    uint64_t shm_bytes, net_bytes;
    /* CUDA pages (docs/cuda.md): bytes moved between host and device, copy-engine submissions
     * (cudaMemcpyBatchAsync calls), and page-copy kernels launched (small pages only) */
    uint64_t cuda_bytes, cuda_copy_calls, cuda_kernels;
    /* prefetches (kvf_connector_prefetch): started, chunks that arrived whole, and chunks loaded
     * from them into the engine's pages */
    uint64_t prefetches, prefetch_chunks, prefetch_chunks_loaded;
    /* segment bytes of in-place loads that the connector hashed before reporting them loaded:
     * 0 with trust_local_store (the node verified them when stored) */
    uint64_t in_place_hashed_bytes;
    /* storage nodes taken from kvf-sched (stores_refresh_ms): the nodes in use now, clients
     * opened on a changed set after the first, old ones closed once nothing held them, and
     * refreshes that failed (kvf_connector_error says why) */
    uint64_t stores, store_clients_opened, store_clients_closed, store_refresh_failures;
    /* kvf_connector_prefetch_from: chunks asked of a node a plan named (not their own), those of
     * them it did not give (asked of their own node next), and runs naming a node the connector
     * does not use */
    uint64_t prefetch_named, prefetch_named_missed, prefetch_sources_unknown;
    /* kvf_connector_load_planned: chunks asked of a node a plan named (not their own), those of
     * them that node did not give (asked of their own node in the same get: the storage client's
     * count, named_reasked), and runs naming a node the connector does not use */
    uint64_t load_named, load_named_reasked, load_sources_unknown;
    /* prefetches whose memory was one an earlier prefetch gave back (not mapped anew) */
    uint64_t prefetch_memory_reused;
    /* saves put in parts as their layers were gathered (the rest were put whole) */
    uint64_t saves_in_parts;
} kvf_connector_stats;
KVF_API void kvf_connector_stats_get(kvf_connector *cn, kvf_connector_stats *out);

/* The last failure of a page copy (a CUDA error by name, a segment that failed its checks), as
 * one line into buf; "" when none. Returns buf. */
KVF_API const char *kvf_connector_error(kvf_connector *cn, char *buf, size_t len);

/* The transport this connector's transfers use ("shm", "tcp" or "rdma"), decided at open: shared
 * memory with storage nodes on this host that serve it (docs/shm.md), TCP with the others, RDMA
 * only where the feasibility classifier finds one-sided RDMA real between the engine's record and
 * the storage node's, this host has a device and every storage node serves it. why gets the
 * reasons for the choice (may be NULL). */
KVF_API const char *kvf_connector_transport(const kvf_connector *cn, char *why, size_t len);

#ifdef __cplusplus
}
#endif
#endif
