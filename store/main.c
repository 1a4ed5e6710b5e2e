/*
 * kvf-store: the kvfabric storage node daemon.
 *
 *   kvf-store [--listen HOST:PORT] [--memory SIZE] [--threads N|auto] [--evict lru|s3fifo]
 *             [--max-request SIZE] [--max-entries N] [--log-level L] [--no-verify]
 *             [--poller epoll|poll] [--lock-memory] [--rdma off|auto|HOST:PORT]
 *             [--peer HOST:PORT]... [--copy-workers N] [--copy-queue N] [--insecure]
 *             [--auth TENANTS] [--auth-timeout MS] [--copy-credential FILE]
 *             [--events-credential FILE] [--shm auto|off|NAME] [--shm-hugepages]
 *             [--shm-staging-max SIZE]
 *
 * Prints one ready line ("kvf-store ready listen=127.0.0.1:7400 memory=... pid=...") on stdout
 * once it accepts connections; SIGTERM and SIGINT stop it cleanly; SIGHUP reads --auth's tenants
 * file again.
 */
#include "kvf/kvf.h"

#include "args.h"
#include "cache.h"
#include "cpus.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "register.h"
#include "replicas.h"
#include "publish.h"
#include "server.h"
#include "tcp.h"
#include "tier.h"
#include "units.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* For the signal thread: the server while it runs; g_lock keeps it from being closed under a
 * callback. */
static kvf_server *g_server;
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_signal(int sig)
{
    (void)sig;
    pthread_mutex_lock(&g_lock);
    if (g_server)
        kvf__server_stop(g_server);
    pthread_mutex_unlock(&g_lock);
}

static void on_hup(int sig)
{
    (void)sig;
    pthread_mutex_lock(&g_lock);
    if (g_server)
        kvf__server_reload_tenants(g_server);
    pthread_mutex_unlock(&g_lock);
}

static void set_server(kvf_server *s)
{
    pthread_mutex_lock(&g_lock);
    g_server = s;
    pthread_mutex_unlock(&g_lock);
}

#define STORE_MAX_PEERS   256
#define STORE_MAX_ENTRIES (1l << 26) /* the index's limit (store/cache.c) */

/* The daemon's settings: the command line's, over the defaults of store_cfg_default(). */
typedef struct store_cfg {
    const char *listen;
    char host[256]; /* --listen, split */
    uint16_t port;
    uint64_t memory, max_request;
    long threads, max_entries, node;
    const char *evict, *poller, *events, *rdma, *auth, *copy_credential, *events_credential;
    const char *metrics;         /* --metrics HOST:PORT: /metrics over HTTP */
    const char *events_snapshot; /* --events-snapshot HOST:PORT or off; NULL: --events's host */
    const char *etcd, *cluster, *advertise; /* membership (docs/membership.md) */
    const char *zone;                       /* --zone: registered, for the nearest replica */
    long etcd_ttl;
    const char *shm;
    char shm_auto[64];
    uint64_t shm_staging_max;
    int verify, lock_memory, prefault, insecure, rdma_tenants, shm_hugepages;
    const char *peers[STORE_MAX_PEERS]; /* --peer */
    size_t n_peers;
    long copy_workers, copy_queue, auth_timeout_ms, copy_max_deadline_ms;
    /* the disk tier: --disk PATH:SIZE (repeated), its admission and queue */
    const char *disk_paths[KVF_TIER_MAX_DEVICES];
    char disk_path_buf[KVF_TIER_MAX_DEVICES][4096];
    uint64_t disk_sizes[KVF_TIER_MAX_DEVICES];
    int n_disks;
    long disk_admit;
    long disk_promote; /* --disk-promote */
    long disk_gather;  /* --disk-gather-us */
    long disk_nice;    /* --disk-nice */
    long wt_hits;      /* --disk-write-through */
    long rep_hits;     /* --replicate-hits */
    long replicas;     /* --replicas */
    int wt_pinned;
    uint64_t disk_queue;
    kvf_log lg;
} store_cfg;

static store_cfg store_cfg_default(void)
{
    return (store_cfg){
        .listen = "127.0.0.1:7400",
        .memory = 1ull << 30,
        .max_request = 256ull << 20,
        .threads = 0, /* auto */
        .evict = "lru",
        .rdma = "auto",
        .shm = "auto",
        .verify = 1,
        .prefault = 1,
        .disk_queue = 256ull << 20,
        .disk_promote = 2,
        .replicas = 2,
        .cluster = "default",
        .etcd_ttl = 5,
        .lg = {.level = KVF_LOG_INFO, .name = "kvf-store"},
    };
}

static int parse_threads(void *ud, const char *v, char *err, size_t errlen)
{
    store_cfg *cfg = ud;
    char *end = NULL;
    cfg->threads = strcmp(v, "auto") ? strtol(v, &end, 10) : 0;
    if (strcmp(v, "auto") && (end == v || *end || cfg->threads < 1 || cfg->threads > 64)) {
        snprintf(err, errlen, "%s is not auto or in 1..64", v);
        return -1;
    }
    return 0;
}

static int parse_peer(void *ud, const char *v, char *err, size_t errlen)
{
    store_cfg *cfg = ud;
    char host[256];
    uint16_t port;
    if (kvf__addr_parse(v, host, sizeof host, &port) != 0 || port == 0) {
        snprintf(err, errlen, "expected HOST:PORT, got \"%s\"", v);
        return -1;
    }
    if (cfg->n_peers == STORE_MAX_PEERS) {
        snprintf(err, errlen, "at most %d peers", STORE_MAX_PEERS);
        return -1;
    }
    cfg->peers[cfg->n_peers++] = v;
    return 0;
}

/* --disk-write-through: "off", or a comma-separated list of "pinned" and "hits:N" (N 1..255). */
static int parse_write_through(void *ud, const char *v, char *err, size_t errlen)
{
    store_cfg *cfg = ud;
    cfg->wt_pinned = 0;
    cfg->wt_hits = 0;
    if (!strcmp(v, "off"))
        return 0;
    char buf[128];
    if (strlen(v) >= sizeof buf || !*v) {
        snprintf(err, errlen, "\"%.60s\": off, pinned, hits:N or pinned,hits:N", v);
        return -1;
    }
    snprintf(buf, sizeof buf, "%s", v);
    char *save = NULL;
    for (char *w = strtok_r(buf, ",", &save); w; w = strtok_r(NULL, ",", &save)) {
        char *end = NULL;
        if (!strcmp(w, "pinned")) {
            cfg->wt_pinned = 1;
        } else if (!strncmp(w, "hits:", 5) && (cfg->wt_hits = strtol(w + 5, &end, 10)) >= 1 &&
                   cfg->wt_hits <= 255 && end && !*end && end != w + 5) {
            /* taken */
        } else {
            snprintf(err, errlen, "\"%.60s\": each part is pinned or hits:N (N 1..255)", w);
            return -1;
        }
    }
    return 0;
}

/* --disk PATH:SIZE, or PATH alone for a block device (all of it). The size is what follows the
 * last colon, where that parses as a size. */
static int parse_disk(void *ud, const char *v, char *err, size_t errlen)
{
    store_cfg *cfg = ud;
    if (cfg->n_disks == KVF_TIER_MAX_DEVICES) {
        snprintf(err, errlen, "at most %d disks", KVF_TIER_MAX_DEVICES);
        return -1;
    }
    const char *colon = strrchr(v, ':');
    uint64_t size = 0;
    size_t plen = strlen(v);
    if (colon) {
        if (kvf__parse_size(colon + 1, &size) != 0 || size == 0) {
            snprintf(err, errlen, "expected PATH:SIZE (SIZE like 64G), got \"%s\"", v);
            return -1;
        }
        plen = (size_t)(colon - v);
    }
    if (plen == 0 || plen >= sizeof cfg->disk_path_buf[0]) {
        snprintf(err, errlen, "expected PATH:SIZE, got \"%s\"", v);
        return -1;
    }
    for (int i = 0; i < cfg->n_disks; i++)
        if (strlen(cfg->disk_paths[i]) == plen && !strncmp(cfg->disk_paths[i], v, plen)) {
            snprintf(err, errlen, "%.*s is named twice", (int)plen, v);
            return -1;
        }
    memcpy(cfg->disk_path_buf[cfg->n_disks], v, plen);
    cfg->disk_path_buf[cfg->n_disks][plen] = '\0';
    cfg->disk_paths[cfg->n_disks] = cfg->disk_path_buf[cfg->n_disks];
    cfg->disk_sizes[cfg->n_disks++] = size;
    return 0;
}

/* Sizes against what this host has and what the index holds, said as sizes. Returns 0, or 2
 * after saying what is wrong. */
static int check_memory(const store_cfg *cfg)
{
    char m[32], h[32];
    kvf__fmt_size(cfg->memory, m, sizeof m);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    uint64_t host = pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0;
    if (cfg->memory < (1u << 20)) {
        fprintf(stderr, "kvf-store: --memory %s is below the minimum of 1 MiB\n", m);
        return 2;
    }
    if (host && cfg->memory > host && cfg->prefault) {
        fprintf(stderr,
                "kvf-store: --memory %s is more than this host's memory (%s): the arena's pages "
                "are touched at start (--no-prefault leaves them to the first writes)\n",
                m, kvf__fmt_size(host, h, sizeof h));
        return 2;
    }
    uint64_t entries = cfg->max_entries ? (uint64_t)cfg->max_entries : cfg->memory / (16u << 10);
    if (!cfg->max_entries && entries > (uint64_t)STORE_MAX_ENTRIES) {
        fprintf(stderr,
                "kvf-store: --memory %s means %" PRIu64 " index entries at one per 16 KiB, above "
                "the index's limit of %ld (1 TiB at that size): give --max-entries (up to %ld) for "
                "an arena of larger chunks\n",
                m, entries, STORE_MAX_ENTRIES, STORE_MAX_ENTRIES);
        return 2;
    }
    return 0;
}

/* Reads the command line into cfg. Returns -1 to go on and serve, or the exit status to stop
 * with: 0 after --help, 2 for bad usage (said on stderr). */
static int parse_args(int argc, char **argv, store_cfg *cfg)
{
    static const char *const evicts[] = {"lru", "s3fifo", NULL};
    static const char *const pollers[] = {"epoll", "poll", NULL};
    const kvf__arg args[] = {
        KVF__OPT("listen", KVF__ARG_STR, &cfg->listen, "HOST:PORT",
                 "the address to serve (port 0 picks one)", "127.0.0.1:7400"),
        KVF__OPT("memory", KVF__ARG_SIZE, &cfg->memory, "SIZE", "the arena's size: 512M, 4G, ...",
                 "1G"),
        KVF__OPT("threads", KVF__ARG_FN, cfg, "N|auto", "event-loop threads, 1..64",
                 "auto: a quarter of the cores, 1 to 8", .fn = parse_threads, .ud = cfg),
        KVF__OPT("evict", KVF__ARG_CHOICE, &cfg->evict, "POLICY", "the eviction policy", "lru",
                 .choices = evicts),
        KVF__OPT("max-request", KVF__ARG_SIZE, &cfg->max_request, "SIZE",
                 "the largest put request, at least 4K", "256M", .lo = 4096, .hi = 1e18),
        KVF__OPT("max-entries", KVF__ARG_LONG, &cfg->max_entries, "N", "the index's capacity",
                 "memory / 16 KiB", .lo = 1024, .hi = (double)STORE_MAX_ENTRIES),
        KVF__OPT("log-level", KVF__ARG_FN, &cfg->lg, "LEVEL", "debug, info, warn or error", "info",
                 .fn = kvf__args_log_level, .ud = &cfg->lg),
        KVF__OPT("log-format", KVF__ARG_FN, &cfg->lg, "FORMAT", "text, or json (one object a line)",
                 "text", .fn = kvf__args_log_format, .ud = &cfg->lg),
        KVF__OPT("no-verify", KVF__ARG_UNSET, &cfg->verify, NULL,
                 "do not verify the objects' checksums on put", NULL),
        KVF__OPT("poller", KVF__ARG_CHOICE, &cfg->poller, "NAME", "the event loop's poller",
                 "the best available", .choices = pollers),
        KVF__OPT("lock-memory", KVF__ARG_FLAG, &cfg->lock_memory, NULL, "mlock the arena", NULL),
        KVF__OPT("no-prefault", KVF__ARG_UNSET, &cfg->prefault, NULL,
                 "do not touch the arena's pages at start", NULL),
        KVF__OPT("events", KVF__ARG_STR, &cfg->events, "HOST:PORT",
                 "publish chunk events for kvf-sched (ZeroMQ PUB; port 0 picks)", NULL),
        KVF__OPT("events-snapshot", KVF__ARG_STR, &cfg->events_snapshot, "HOST:PORT|off",
                 "answer snapshot requests (everything held now, both tiers) on this address, so "
                 "that a kvf-sched that subscribes late learns what the node holds",
                 "--events's host, a free port"),
        KVF__MEMBER_OPTS(&cfg->etcd, &cfg->cluster, &cfg->etcd_ttl,
                         "register under a lease, so that kvf-sched finds this node and drops it "
                         "when it dies"),
        KVF__OPT("advertise", KVF__ARG_STR, &cfg->advertise, "HOST",
                 "the host others reach this node at: registered in etcd, and this node's name in "
                 "its keys' rendezvous order (--replicate-hits)",
                 "--listen's host"),
        KVF__OPT("zone", KVF__ARG_STR, &cfg->zone, "ZONE",
                 "this node's zone (a rack, an availability zone), registered with --etcd: "
                 "kvf-sched plans a load from a replica on the engine's host, then in its zone",
                 NULL),
        KVF__OPT("replicate-hits", KVF__ARG_LONG, &cfg->rep_hits, "N",
                 "copy an entry read N times to the nodes that come next in its key's rendezvous "
                 "order (the --peer nodes, and with --etcd the registered stores; clients that "
                 "find this node down look there); 0: off",
                 "0", .lo = 0, .hi = 255),
        KVF__OPT("replicas", KVF__ARG_LONG, &cfg->replicas, "K",
                 "holders of each hot entry with --replicate-hits, this node included: K - 1 "
                 "copies, so that its hits survive K - 1 of them down",
                 "2", .lo = 2, .hi = 8),
        KVF__OPT("metrics", KVF__ARG_STR, &cfg->metrics, "HOST:PORT",
                 "serve GET /metrics (Prometheus text) over HTTP on this address (port 0 picks; "
                 "beyond loopback only with --insecure)",
                 NULL),
        KVF__OPT("node", KVF__ARG_LONG, &cfg->node, "N",
                 "this store's number in kvf-sched's --store-events", "0", .lo = 0, .hi = 255),
        KVF__OPT("auth", KVF__ARG_STR, &cfg->auth, "TENANTS",
                 "require every client to authenticate as a tenant of this file (kvf auth new); "
                 "SIGHUP reads it again. Allows --listen on any address",
                 NULL),
        KVF__OPT("auth-timeout", KVF__ARG_LONG, &cfg->auth_timeout_ms, "MS",
                 "with --auth, a connection not authenticated by then is closed", "10000", .lo = 1,
                 .hi = 3600000),
        KVF__OPT("copy-credential", KVF__ARG_STR, &cfg->copy_credential, "FILE",
                 "the credential COPY presents to --peer nodes (an admin's)", NULL),
        KVF__OPT("events-credential", KVF__ARG_STR, &cfg->events_credential, "FILE",
                 "secure --events with CURVE under this credential's key: subscribers prove a "
                 "key of --auth's tenants, an admin sees every tenant's events, a tenant only its "
                 "own",
                 NULL),
        KVF__OPT("insecure", KVF__ARG_FLAG, &cfg->insecure, NULL,
                 "allow --listen without --auth, and --events and --metrics, on an address that "
                 "is not loopback: only on a private network of trusted hosts (docs/security.md)",
                 NULL),
        KVF__OPT("peer", KVF__ARG_FN, cfg, "HOST:PORT",
                 "a storage node COPY may push to (repeat for each; without any, COPY is "
                 "refused)",
                 NULL, .fn = parse_peer, .ud = cfg),
        KVF__OPT("copy-workers", KVF__ARG_LONG, &cfg->copy_workers, "N", "threads that run COPYs",
                 "2", .lo = 1, .hi = 1024),
        KVF__OPT("copy-max-deadline", KVF__ARG_LONG, &cfg->copy_max_deadline_ms, "MS",
                 "the longest a COPY may take, whatever it asks", "30000", .lo = 1,
                 .hi = KVF_COPY_MAX_DEADLINE_MS),
        KVF__OPT("copy-queue", KVF__ARG_LONG, &cfg->copy_queue, "N",
                 "COPYs that may wait for a worker; more are refused as busy", "16", .lo = 1,
                 .hi = 1024),
        KVF__OPT("rdma", KVF__ARG_STR, &cfg->rdma, "off|auto|HOST:PORT",
                 "serve RDMA descriptors over rdma_cm: auto where this host has a device, on the "
                 "listen address and a free port",
                 "auto"),
        KVF__OPT("rdma-tenants", KVF__ARG_FLAG, &cfg->rdma_tenants, NULL,
                 "with --auth, serve RDMA to tenants too: one key covers the whole arena, so "
                 "tenants are not isolated on it",
                 NULL),
        KVF__OPT("shm", KVF__ARG_STR, &cfg->shm, "auto|off|NAME",
                 "shared memory for clients on this host over a Unix socket: a path, or @NAME "
                 "(abstract); auto: @kvf-store-PID. The arena is then a sealed memfd "
                 "(docs/shm.md)",
                 "auto"),
        KVF__OPT("shm-hugepages", KVF__ARG_FLAG, &cfg->shm_hugepages, NULL,
                 "the shared arena on huge pages (hugetlbfs must have them)", NULL),
        KVF__OPT("shm-staging-max", KVF__ARG_SIZE, &cfg->shm_staging_max, "SIZE",
                 "the largest staging region of one connection, at least 4K", "256M", .lo = 4096,
                 .hi = 1e18),
        KVF__OPT("disk", KVF__ARG_FN, cfg, "PATH:SIZE",
                 "a disk tier under the arena on this file (made and sized) or block device "
                 "(PATH alone: all of it), written and read with io_uring and O_DIRECT; what it "
                 "holds is served again after a restart. Repeat for each device (docs/store.md)",
                 NULL, .fn = parse_disk, .ud = cfg),
        KVF__OPT("disk-write-through", KVF__ARG_FN, cfg, "off|pinned|hits:N|pinned,hits:N",
                 "also write a copy to disk, while it stays in DRAM, of an entry when it is "
                 "pinned or read N times: hot prefixes survive a restart and their eviction "
                 "writes nothing",
                 "off", .fn = parse_write_through, .ud = cfg),
        KVF__OPT("disk-promote", KVF__ARG_LONG, &cfg->disk_promote, "N",
                 "an object read back from disk stays in DRAM from its Nth read on (since the "
                 "store started); before, it is served and let go, making no room in DRAM for a "
                 "one-off read (1: every read back stays)",
                 "2", .lo = 1, .hi = 255),
        KVF__OPT("disk-gather-us", KVF__ARG_LONG, &cfg->disk_gather, "US",
                 "a read from disk starts no sooner than this after it arrived, so that reads "
                 "arriving with it (a client's batch, split over its connections) are merged with "
                 "it and objects side by side on disk are read together (0: at once)",
                 "0", .lo = 0, .hi = 100000),
        KVF__OPT("disk-nice", KVF__ARG_LONG, &cfg->disk_nice, "N",
                 "the niceness of the disk tier's threads: above 0, the event loops, which serve "
                 "DRAM hits, win the CPU from the disk's copies and checksums where cores are few "
                 "(the tier's own rates are then lower)",
                 "0", .lo = 0, .hi = 19),
        KVF__OPT("disk-admit", KVF__ARG_LONG, &cfg->disk_admit, "N",
                 "demote an evicted entry to disk only if it was read at least N times", "0",
                 .lo = 0, .hi = 255),
        KVF__OPT(
            "disk-queue", KVF__ARG_SIZE, &cfg->disk_queue, "SIZE",
            "arena bytes that evicted entries waiting to be written may hold (at most a quarter "
            "of --memory); beyond, "
            "evictions are not demoted",
            "256M", .lo = 1 << 20, .hi = 1e18),
    };
    const kvf__args_spec spec = {
        .prog = "kvf-store",
        .synopsis = "[OPTIONS]",
        .summary = "The kvfabric storage node: KV chunks in a DRAM arena, served over TCP, shared "
                   "memory and RDMA (docs/store.md). Prints one ready line on stdout once it "
                   "accepts connections; SIGTERM and SIGINT stop it, SIGHUP reads --auth's "
                   "tenants file again.",
        .epilog = "exit status: 0 stopped by a signal, 1 a failure to start or serve, 2 a usage "
                  "error",
        .args = args,
        .n = sizeof args / sizeof args[0],
        .max_positional = 0,
    };
    int rc = kvf__args_parse(&spec, argc, argv, NULL);
    if (rc != KVF__ARGS_GO_ON)
        return rc;
    if (cfg->threads == 0)
        cfg->threads = kvf__auto_threads();
    if (check_memory(cfg) != 0)
        return 2;
    if (!strcmp(cfg->shm, "off")) {
        cfg->shm = NULL;
    } else if (!strcmp(cfg->shm, "auto")) {
        snprintf(cfg->shm_auto, sizeof cfg->shm_auto, "@kvf-store-%d", (int)getpid());
        cfg->shm = cfg->shm_auto;
    }
    if (kvf__addr_parse(cfg->listen, cfg->host, sizeof cfg->host, &cfg->port) != 0) {
        fprintf(stderr, "kvf-store: --listen: expected HOST:PORT, got \"%s\"\n", cfg->listen);
        return 2;
    }
    if (kvf__listen_policy("kvf-store", "--listen", cfg->host,
                           cfg->auth ? KVF_LISTEN_AUTHENTICATED : cfg->insecure) != 0)
        return 2;
    if (cfg->events_credential && !cfg->auth) {
        fprintf(stderr, "kvf-store: --events-credential needs --auth: its tenants are who may "
                        "subscribe\n");
        return 2;
    }
    if (kvf__listen_policy_addr("kvf-store", "--events", cfg->events,
                                cfg->events_credential ? KVF_LISTEN_AUTHENTICATED
                                                       : cfg->insecure) != 0)
        return 2;
    if (cfg->events_snapshot && strcmp(cfg->events_snapshot, "off") != 0 &&
        (!cfg->events ||
         kvf__listen_policy_addr("kvf-store", "--events-snapshot", cfg->events_snapshot,
                                 cfg->events_credential ? KVF_LISTEN_AUTHENTICATED
                                                        : cfg->insecure) != 0)) {
        if (!cfg->events)
            fprintf(stderr, "kvf-store: --events-snapshot needs --events\n");
        return 2;
    }
    if (cfg->zone && kvf__member_zone_check("kvf-store", "--zone", cfg->zone) != 0)
        return 2;
    if (cfg->etcd) {
        const char *h = cfg->advertise ? cfg->advertise : cfg->host;
        if (kvf__member_cluster_check("kvf-store", cfg->cluster) != 0)
            return 2;
        if (!strcmp(h, "0.0.0.0") || !strcmp(h, "::") || !h[0]) {
            fprintf(stderr,
                    "kvf-store: --etcd with --listen on %s needs --advertise HOST: the "
                    "address others reach this node at\n",
                    cfg->host);
            return 2;
        }
    } else if (cfg->zone) {
        fprintf(stderr, "kvf-store: --zone is what --etcd registers (without etcd, kvf-sched's "
                        "--store-zones names the zones); it needs --etcd\n");
        return 2;
    } else if (cfg->advertise && !cfg->rep_hits) {
        fprintf(stderr, "kvf-store: --advertise is what --etcd registers and what "
                        "--replicate-hits names this node by; it needs one of them\n");
        return 2;
    }
    /* The counters say how busy the node is and how full; beyond loopback only where the
     * operator says the network is private (a scraper on another host: --insecure). */
    if (kvf__listen_policy_addr("kvf-store", "--metrics", cfg->metrics, cfg->insecure) != 0)
        return 2;
    return -1;
}

static int events_allow(void *ud, const uint8_t pk[32], char *name, size_t namelen, int *admin)
{
    return kvf__tenants_curve_allow(ud, pk, name, namelen, admin);
}

/* Opens the chunk-event publisher that --events asks for (none without it), secured where
 * --events-credential asks; *endpoint gets its bound address. Returns 0, or the exit status: 2
 * for a bad address, 1 when it cannot open. */
static int open_events(const store_cfg *cfg, kvf__tenants *tenants, kvf__pub **pub, char *endpoint,
                       size_t eplen)
{
    if (!cfg->events)
        return 0;
    char host[256], err[300] = "";
    uint16_t port;
    if (kvf__addr_parse(cfg->events, host, sizeof host, &port) != 0) {
        fprintf(stderr, "kvf-store: --events: expected HOST:PORT, got \"%s\"\n", cfg->events);
        return 2;
    }
    kvf__zsec sec = {.allow = events_allow, .ud = tenants, .tenant_prefix = "kvf-store/t/"};
    if (cfg->events_credential) {
        kvf_credential c;
        uint8_t pk[32];
        int rc = kvf__cred_load(cfg->events_credential, &c, err, sizeof err);
        if (!rc)
            rc = kvf__auth_curve_pair(&c, pk, sec.secret);
        kvf__auth_wipe(&c, sizeof c);
        if (rc) {
            fprintf(stderr, "kvf-store: --events-credential: %s\n", err[0] ? err : "bad key");
            return 1;
        }
    }
    int rc = kvf__pub_open(pub, host, port, (int)cfg->node, tenants,
                           cfg->events_credential ? &sec : NULL, endpoint, eplen, err, sizeof err);
    kvf__auth_wipe(sec.secret, sizeof sec.secret);
    if (rc) {
        fprintf(stderr, "kvf-store: %s\n", err);
        return 1;
    }
    return 0;
}

/* What a snapshot lists: the DRAM tier's readable entries, then the disk tier's objects. */
typedef struct holdings_src {
    kvf_cache *cache;
    kvf__tier *tier;
    void (*add)(void *ud, int disk, const kvf_key *key, uint32_t tenant);
    void *ud;
} holdings_src;

static void add_dram(void *ud, const kvf_key *key, uint32_t tenant)
{
    holdings_src *h = ud;
    h->add(h->ud, 0, key, tenant);
}

static void add_disk(void *ud, uint64_t ns, const kvf_key *key)
{
    (void)ns;
    holdings_src *h = ud;
    h->add(h->ud, 1, key, 0); /* the disk keeps no tenant: nobody's, as its announcement */
}

static void list_holdings(void *ctx,
                          void (*add)(void *ud, int disk, const kvf_key *key, uint32_t tenant),
                          void *ud)
{
    holdings_src h = *(holdings_src *)ctx;
    h.add = add, h.ud = ud;
    kvf__cache_lock(h.cache);
    kvf__cache_each_locked(h.cache, add_dram, &h);
    kvf__cache_unlock(h.cache);
    if (h.tier)
        kvf__tier_each(h.tier, add_disk, &h);
}

/* Opens the snapshot socket beside the events (--events-snapshot; by default on --events's host,
 * a free port). *endpoint gets its address, "-" when off. Returns 0, or the exit status. */
static int open_snapshots(const store_cfg *cfg, kvf__pub *pub, holdings_src *src, char *endpoint,
                          size_t eplen)
{
    snprintf(endpoint, eplen, "-");
    if (!pub || (cfg->events_snapshot && !strcmp(cfg->events_snapshot, "off")))
        return 0;
    char host[256], err[300] = "";
    uint16_t port = 0;
    const char *addr = cfg->events_snapshot ? cfg->events_snapshot : cfg->events;
    if (kvf__addr_parse(addr, host, sizeof host, &port) != 0) {
        fprintf(stderr, "kvf-store: --events-snapshot: expected HOST:PORT, got \"%s\"\n", addr);
        return 2;
    }
    if (!cfg->events_snapshot)
        port = 0;
    if (kvf__pub_snapshots(pub, host, port, list_holdings, src, endpoint, eplen, err, sizeof err) !=
        0) {
        fprintf(stderr, "kvf-store: %s\n", err);
        return 1;
    }
    return 0;
}

/* Opens the cache, its changes noted to pub (may be NULL). Returns 0, or 1 after saying why. */
static int open_cache(const store_cfg *cfg, kvf__pub *pub, kvf_cache **cache)
{
    char err[256] = "";
    kvf_cache_opts co = {
        .on_change = pub ? kvf__pub_note : NULL,
        .on_change_ctx = pub,
        .memory = cfg->memory,
        .max_entries = (uint32_t)cfg->max_entries,
        .evict = cfg->evict,
        .prefault = cfg->prefault,
        .lock_memory = cfg->lock_memory,
        .shared = cfg->shm != NULL,
        .hugepages = cfg->shm_hugepages,
    };
    if (kvf__cache_open(cache, &co, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-store: %s\n", err);
        return 1;
    }
    return 0;
}

/* Reads --auth's tenants file (none without it). Returns 0, or 1 after saying why. */
static int open_tenants(const store_cfg *cfg, kvf__tenants **t)
{
    char err[300] = "";
    if (!cfg->auth)
        return 0;
    if (kvf__tenants_open(t, cfg->auth, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-store: --auth: %s\n", err);
        return 1;
    }
    size_t keys, names;
    kvf__tenants_count(*t, &keys, &names);
    kvf_info(&cfg->lg, "authentication required: %zu key(s) of %zu tenant(s) from %s", keys, names,
             cfg->auth);
    return 0;
}

/* A test's I/O faults, from $KVF_DISK_FAULT="read|write|any:N[@D]": counted from the moment the
 * tier is open (its format and rebuild are not), the Nth such I/O of a device (of device D alone,
 * its index in --disk order, where given) and every later one fail with EIO, as a dying device's
 * would (test_store_disk; docs/store.md). */
typedef struct disk_fault {
    int kind; /* 0 read, 1 write, 2 any */
    long after;
    int dev; /* -1: every device */
    atomic_long seen[KVF_TIER_MAX_DEVICES];
    atomic_int armed;
} disk_fault;

static int disk_fault_fn(void *ud, int dev, int is_write, uint64_t off, uint64_t len)
{
    disk_fault *f = ud;
    (void)off, (void)len;
    if (!atomic_load(&f->armed) || (f->kind != 2 && f->kind != is_write) ||
        (f->dev >= 0 && f->dev != dev) || dev < 0 || dev >= KVF_TIER_MAX_DEVICES)
        return 0;
    return atomic_fetch_add(&f->seen[dev], 1) + 1 >= f->after ? -EIO : 0;
}

static disk_fault *disk_fault_from_env(const kvf_log *lg)
{
    static disk_fault f;
    const char *v = getenv("KVF_DISK_FAULT");
    char kind[8];
    long n;
    int dev = -1;
    if (!v || sscanf(v, "%7[a-z]:%ld@%d", kind, &n, &dev) < 2 || n < 1)
        return NULL;
    f.kind = !strcmp(kind, "read") ? 0 : !strcmp(kind, "write") ? 1 : 2;
    f.after = n;
    f.dev = dev;
    kvf_warn(lg, "KVF_DISK_FAULT=%s: the disk tier's I/O fails from then on (a test's fault)", v);
    return &f;
}

static uint64_t tier_rate(void *tier)
{
    return kvf__tier_read_rate(tier);
}

/* Opens the disk tier that --disk asks for (none without it) under cache. Returns 0, or 1 after
 * saying why. */
static int open_tier(const store_cfg *cfg, kvf_cache *cache, kvf__pub *pub, kvf__tier **tier)
{
    if (!cfg->n_disks && (cfg->wt_hits || cfg->wt_pinned)) {
        fprintf(stderr, "kvf-store: --disk-write-through needs a disk tier (--disk)\n");
        return 1;
    }
    if (!cfg->n_disks)
        return 0;
    char err[512] = "";
    kvf__tier_opts to = {
        .n = cfg->n_disks,
        .admit_hits = (uint32_t)cfg->disk_admit,
        .write_through_hits = (uint32_t)cfg->wt_hits,
        .promote_reads = (uint32_t)cfg->disk_promote,
        .gather_us = (uint32_t)cfg->disk_gather,
        .nice = (int)cfg->disk_nice,
        .write_through_pinned = cfg->wt_pinned,
        .queue_bytes = cfg->disk_queue,
        .cache = cache,
        .log = &cfg->lg,
        .on_change = pub ? kvf__pub_note : NULL,
        .on_change_ctx = pub,
    };
    disk_fault *fault = disk_fault_from_env(&cfg->lg);
    if (fault) {
        to.fault = disk_fault_fn;
        to.fault_ud = fault;
    }
    for (int i = 0; i < cfg->n_disks; i++) {
        to.paths[i] = cfg->disk_paths[i];
        to.sizes[i] = cfg->disk_sizes[i];
    }
    if (kvf__tier_open(tier, &to, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-store: --disk: %s\n", err);
        return 1;
    }
    if (fault)
        atomic_store(&fault->armed, 1);
    if (pub) /* its reads' measured rate to kvf-sched's cost model (StoreRates events) */
        kvf__pub_set_rates(pub, tier_rate, *tier);
    for (int i = 0; i < cfg->n_disks; i++) {
        const char *why = kvf__tier_device_note(*tier, i);
        if (why[0])
            kvf_warn(&cfg->lg, "disk tier %s: formatted anew, what it held is dropped: %s",
                     cfg->disk_paths[i], why);
    }
    kvf__tier_stats ts;
    kvf__tier_stats_get(*tier, &ts);
    char b[32];
    kvf_info(&cfg->lg,
             "disk tier: %d device(s), %s; %" PRIu64 " object(s) found on it (%.2f s to rebuild)",
             ts.devices, kvf__fmt_size(ts.bytes, b, sizeof b), ts.entries, ts.rebuild_seconds);
    return 0;
}

/* Binds the server over cache. Returns 0, or 1 after saying why. */
static int open_server(const store_cfg *cfg, kvf_cache *cache, kvf__tenants *tenants,
                       kvf__tier *tier, kvf_server **srv)
{
    char err[256] = "";
    kvf_server_opts so = {
        .host = cfg->host,
        .port = cfg->port,
        .threads = (int)cfg->threads,
        .max_request = cfg->max_request,
        .verify_puts = cfg->verify,
        .poller = cfg->poller,
        .node_id = (uint64_t)getpid(),
        .holders = cfg->rep_hits > 0 ? (uint32_t)cfg->replicas : 0,
        .rdma = cfg->rdma,
        .copy_peers = cfg->peers,
        .n_copy_peers = cfg->n_peers,
        .copy_workers = (int)cfg->copy_workers,
        .copy_queue = (int)cfg->copy_queue,
        .copy_max_deadline_ms = (uint32_t)cfg->copy_max_deadline_ms,
        .rdma_tenants = cfg->rdma_tenants,
        .tenants = tenants,
        .auth_timeout_ms = (uint32_t)cfg->auth_timeout_ms,
        .copy_credential = cfg->copy_credential,
        .shm = cfg->shm,
        .shm_staging_max = cfg->shm_staging_max,
        .shm_copiers = -1,
        .cache = cache,
        .tier = tier,
        .log = &cfg->lg,
    };
    if (kvf__server_open(srv, &so, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-store: %s\n", err);
        return 1;
    }
    return 0;
}

/* GET /metrics on the side port; nothing else. */
static unsigned metrics_route(void *ctx, const char *method, const char *url, json_t *body,
                              kvf__http_reply *out)
{
    (void)body;
    if (strcmp(method, "GET") || strcmp(url, "/metrics")) {
        out->json = kvf__http_error("%s %s: this port serves GET /metrics only", method, url);
        return strcmp(url, "/metrics") ? 404 : 405;
    }
    return kvf__http_metrics_reply(ctx, out);
}

/* With --metrics: the registry over srv's figures and its HTTP side port; *bound gets the port.
 * Returns 0, or 1 after saying why. */
static int open_metrics(const store_cfg *cfg, kvf_server *srv, kvf__metrics **m, kvf__httpd **h,
                        uint16_t *bound)
{
    char host[256], err[256];
    uint16_t port;
    if (!cfg->metrics)
        return 0;
    if (kvf__addr_parse(cfg->metrics, host, sizeof host, &port) != 0) {
        fprintf(stderr, "kvf-store: --metrics: expected HOST:PORT, got \"%s\"\n", cfg->metrics);
        return 1;
    }
    if (!(*m = kvf__metrics_new("kvf_store"))) {
        fprintf(stderr, "kvf-store: out of memory\n");
        return 1;
    }
    kvf__metrics_on_collect(*m, kvf__server_metrics, srv);
    if (kvf__server_metrics_bind(srv, *m) != 0) {
        fprintf(stderr, "kvf-store: out of memory\n");
        return 1;
    }
    if (kvf__httpd_start(h, host, port, 0, 4096, metrics_route, *m, bound, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-store: --metrics %s: %s\n", cfg->metrics, err);
        return 1;
    }
    return 0;
}

/* Prints the ready line on stdout (scripts and tests wait for it) and logs what is served. */
static void announce(const store_cfg *cfg, kvf_server *srv, kvf_cache *cache, const char *ev_ep,
                     const char *snap_ep, uint16_t metrics_port)
{
    kvf_cache_stats st;
    kvf__cache_lock(cache);
    kvf__cache_stats_locked(cache, &st);
    kvf__cache_unlock(cache);
    const char *rdma_why;
    uint16_t rdma_port = kvf__server_rdma_port(srv, &rdma_why);
    char rdma_text[16] = "off";
    if (rdma_port)
        snprintf(rdma_text, sizeof rdma_text, "%u", rdma_port);
    printf("kvf-store ready listen=%s:%u memory=%" PRIu64 " max_entries=%" PRIu64
           " evict=%s threads=%ld events=%s snapshot=%s node=%ld rdma=%s auth=%s shm=%s pid=%d",
           cfg->host, kvf__server_port(srv), st.memory, st.max_entries, st.policy, cfg->threads,
           ev_ep, snap_ep, cfg->node, rdma_text, cfg->auth ? "on" : "off",
           cfg->shm ? cfg->shm : "off", (int)getpid());
    if (metrics_port) {
        char mh[256];
        uint16_t mp;
        kvf__addr_parse(cfg->metrics, mh, sizeof mh, &mp);
        printf(" metrics=%s:%u", mh, metrics_port);
    }
    printf("\n");
    if (!rdma_port)
        kvf_info(&cfg->lg, "rdma off: %s", rdma_why);
    fflush(stdout);
    kvf_info(&cfg->lg, "serving %s:%u with %" PRIu64 " MiB, %s eviction, %ld thread(s)", cfg->host,
             kvf__server_port(srv), st.memory >> 20, st.policy, cfg->threads);
}

int main(int argc, char **argv)
{
    store_cfg cfg = store_cfg_default();
    int status = parse_args(argc, argv, &cfg);
    if (status >= 0)
        return status;
    kvf__daemon_block_signals(); /* before the first thread */
    char ev_ep[160] = "-", snap_ep[160] = "-";
    kvf__pub *pub = NULL;
    kvf_cache *cache = NULL;
    kvf__tenants *tenants = NULL;
    kvf_server *srv = NULL;
    kvf__tier *tier = NULL;
    kvf__store_replicas *replicas = NULL;
    if ((status = open_tenants(&cfg, &tenants)))
        goto out_close_pub;
    if ((status = open_events(&cfg, tenants, &pub, ev_ep, sizeof ev_ep)))
        goto out_close_pub;
    if ((status = open_cache(&cfg, pub, &cache)))
        goto out_close_pub;
    if (tenants)
        kvf__tenants_apply_quotas(tenants, cache);
    if ((status = open_tier(&cfg, cache, pub, &tier)))
        goto out_close_cache;
    holdings_src held = {.cache = cache, .tier = tier};
    if ((status = open_snapshots(&cfg, pub, &held, snap_ep, sizeof snap_ep)))
        goto out_close_tier;
    if ((status = open_server(&cfg, cache, tenants, tier, &srv)))
        goto out_close_tier;
    kvf__metrics *metrics = NULL;
    kvf__httpd *mhttp = NULL;
    uint16_t mport = 0;
    if ((status = open_metrics(&cfg, srv, &metrics, &mhttp, &mport)))
        goto out_close_server;
    set_server(srv);
    if (kvf__daemon_signals(on_signal, on_hup) != 0) {
        fprintf(stderr, "kvf-store: cannot start the signal thread\n");
        status = 1;
        goto out_close_metrics;
    }
    kvf__member *member = NULL;
    if (cfg.etcd) {
        kvf__store_reg reg = {.etcd = cfg.etcd,
                              .cluster = cfg.cluster,
                              .advertise = cfg.advertise ? cfg.advertise : cfg.host,
                              .ttl_s = (int)cfg.etcd_ttl,
                              .node = (int)cfg.node,
                              .port = kvf__server_port(srv),
                              .rdma_port = kvf__server_rdma_port(srv, &(const char *){NULL}),
                              .events = ev_ep,
                              .snapshot = snap_ep,
                              .zone = cfg.zone,
                              .log = &cfg.lg};
        if ((status = kvf__store_register(&reg, &member)))
            goto out_close_metrics;
    }
    kvf__store_replicas_cfg rcfg = {.hits = (uint32_t)cfg.rep_hits,
                                    .copies = (uint32_t)cfg.replicas - 1,
                                    .host = cfg.advertise ? cfg.advertise : cfg.host,
                                    .port = kvf__server_port(srv),
                                    .peers = cfg.peers,
                                    .n_peers = cfg.n_peers,
                                    .etcd = cfg.etcd,
                                    .cluster = cfg.cluster,
                                    .credential = cfg.copy_credential,
                                    .auth = cfg.auth != NULL,
                                    .log = &cfg.lg};
    if ((status = kvf__store_replicas_open(&rcfg, srv, cache, &replicas)))
        goto out_close_member;
    announce(&cfg, srv, cache, ev_ep, snap_ep, mport);
    kvf__notify_ready(&cfg.lg, "serving");

    kvf__server_run(srv);
out_close_member:
    kvf__member_stop(&member); /* revoked: kvf-sched drops this node now, not a TTL later */
    kvf__notify_stopping();
    kvf_info(&cfg.lg, "stopping");
out_close_metrics:
    set_server(NULL);
out_close_server:
    kvf__httpd_stop(&mhttp); /* before the server its figures come from */
    kvf__metrics_free(&metrics);
    kvf__store_replicas_close(&replicas, srv); /* its queued entries' references: before both */
    kvf__server_close(&srv);
out_close_tier:
    kvf__pub_stop_snapshots(pub); /* nothing lists the tiers once they close */
    if (pub)
        kvf__pub_set_rates(pub, NULL, NULL); /* the tier is not asked its rate once closed */
    kvf__tier_close(&tier); /* writes the demotions still queued; before the cache */
out_close_cache:
    kvf__cache_close(&cache);
out_close_pub:
    kvf__pub_close(&pub);
    kvf__tenants_close(&tenants);
    if (!status)
        kvf_info(&cfg.lg, "stopped");
    return status;
}
