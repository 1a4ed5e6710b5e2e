/*
 * The storage node's network server: event-loop threads serving the wire protocol of
 * docs/protocol.md over TCP against one kvf_cache.
 *
 * Each loop thread owns a poller and the connections it accepted; a connection never moves. Object
 * bytes are received straight into reserved arena blocks and sent straight from referenced ones
 * with scatter-gather writes, so the data path copies nothing in user space. A bad frame gets an
 * error reply naming the problem, then its connection closes; nothing else changes.
 */
#ifndef KVF_STORE_SERVER_H
#define KVF_STORE_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "cache.h"
#include "log.h"
#include "tenants.h"

typedef struct kvf_server kvf_server;

/* The longest a COPY may take to push its objects by default (copy_max_deadline_ms): a request
 * asking for more gets this. */
#define KVF_COPY_MAX_DEADLINE_MS 30000

typedef struct kvf_server_opts {
    const char *host;     /* listen address; NULL: 127.0.0.1 */
    uint16_t port;        /* 0: any free port */
    int threads;          /* event-loop threads; 0: 1 */
    uint64_t max_request; /* largest PUT/COMMIT payload; 0: 256 MiB */
    uint32_t max_items;   /* most items per request; 0: KVF_WIRE_MAX_ITEMS */
    uint32_t holders;     /* holders of each hot entry (--replicas with --replicate-hits), this
                           * node included; 0: no replicas. HELLO says it, so that clients read
                           * a hot entry from its nearest holder */
    int verify_puts;      /* verify object headers and checksums before committing */
    const char *poller;   /* poller back-end; NULL: the best available */
    uint64_t node_id;     /* reported by HELLO and STATS */
    /* RDMA: NULL or "off": none; "auto": on the listen address, any free port, where this host
     * has a device (otherwise none, with the reason logged); "HOST:PORT": there, or fail. */
    const char *rdma;
    /* COPY: the only targets it may push to ("HOST:PORT" as the requests name them; none: COPY is
     * refused), its worker threads (0: 2) and the jobs that may wait for one (0: 16). */
    const char *const *copy_peers;
    size_t n_copy_peers;
    int copy_workers;
    int copy_queue;
    uint32_t copy_max_deadline_ms; /* a COPY's deadline is capped at this; 0: 30 s */
    /* Authentication: the tenants a client must prove to be (AUTH after HELLO) before any other
     * request; NULL: none, every client is trusted as an admin. Borrowed; must outlive the
     * server. copy_credential: the credential COPY's workers present to the peers (NULL: none). */
    kvf__tenants *tenants;
    uint32_t auth_timeout_ms; /* a connection not authenticated by then is closed; 0: 10000 */
    /* With tenants, RDMA (one rkey for the whole arena: no isolation between tenants) is neither
     * advertised nor served to tenants unless this is set; admins may always use it. */
    int rdma_tenants;
    const char *copy_credential;
    /* Shared memory for clients on this host (docs/shm.md): the Unix socket's name (a path, or
     * "@name" in the abstract namespace; NULL: none). The arena is handed out read-only where the
     * cache's arena is shared (kvf_cache_opts.shared) and the client may read every namespace.
     * A connection's staging region is at most shm_staging_max bytes (0: 256 MiB), all of them
     * together at most shm_staging_total (0: a quarter of the arena, at least 4 GiB); a client
     * refused one sends that connection's keys over TCP. */
    const char *shm;
    uint64_t shm_staging_max, shm_staging_total;
    /* Threads that share large SHM_PUTs' copying with the loops (at most 8); -1: one per core
     * beyond the loops'. */
    int shm_copiers;
    kvf_cache *cache; /* borrowed; must outlive the server */
    /* The disk tier under the cache (tier.h), or NULL. Borrowed; must outlive the server. */
    struct kvf__tier *tier;
    const kvf_log *log; /* borrowed; may be NULL */
} kvf_server_opts;

/* Binds the listener. Caller owns the result; free with kvf__server_close(). */
int kvf__server_open(kvf_server **out, const kvf_server_opts *opts, char *err, size_t errlen);
/* The port bound. */
uint16_t kvf__server_port(const kvf_server *s);
/* A collect function of core/metrics.h (ud: the server): the arena, index and connection gauges
 * and the request, hit, eviction and byte counters, mirrored into m. */
struct kvf__metrics;
void kvf__server_metrics(void *ud, struct kvf__metrics *m);
/* Makes the op_seconds{op} histogram in m and has the server observe each request's time into
 * it. Before kvf__server_run. Returns 0 or -1 (out of memory). */
int kvf__server_metrics_bind(kvf_server *s, struct kvf__metrics *m);
/* The RDMA port served (0: none), and why none when none (may be NULL). */
uint16_t kvf__server_rdma_port(const kvf_server *s, const char **why);
/* The replicator of hot entries (replicate.h) STATS and /metrics report (NULL: none). Before
 * kvf__server_run, or after it returned. */
struct kvf__replicator;
void kvf__server_set_replicator(kvf_server *s, struct kvf__replicator *r);
/* Runs the loop threads and returns when kvf__server_stop() was called and they have ended. */
int kvf__server_run(kvf_server *s);
/* Sets every tenant's quotas of t in cache (takes the cache lock): at start and after a reload. */
void kvf__tenants_apply_quotas(kvf__tenants *t, kvf_cache *cache);
/* Asks the first loop to read the tenants file again (and apply its quotas). Safe from any thread
 * and from a signal handler. */
void kvf__server_reload_tenants(kvf_server *s);
/* Asks the loops to stop. Safe from any thread and from a signal handler (it only writes to
 * pipes). */
void kvf__server_stop(kvf_server *s);
/* Closes every connection (dropping their reservations and references) and frees the server. */
void kvf__server_close(kvf_server **s);

#endif
