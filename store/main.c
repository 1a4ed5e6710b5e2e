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

#include "cache.h"
#include "cpus.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "notify.h"
#include "publish.h"
#include "server.h"
#include "tcp.h"
#include "units.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static kvf_server *g_server; /* for the signal handler only */

static void on_signal(int sig)
{
    (void)sig;
    if (g_server)
        kvf__server_stop(g_server);
}

static void on_hup(int sig)
{
    (void)sig;
    if (g_server)
        kvf__server_reload_tenants(g_server);
}

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kvf-store [options]       (--help, --version)\n"
        "  --listen HOST:PORT    address to serve (default 127.0.0.1:7400; port 0 picks one)\n"
        "  --memory SIZE         arena size, e.g. 512M, 4G (default 1G)\n"
        "  --threads N|auto      event-loop threads (default auto: a quarter of the cores,\n"
        "                        1 to 8)\n"
        "  --evict lru|s3fifo    eviction policy (default lru)\n"
        "  --max-request SIZE    largest put request (default 256M)\n"
        "  --max-entries N       index capacity, 1024 to 67108864 (default memory / 16 KiB)\n"
        "  --log-level L         debug, info, warn, error (default info)\n"
        "  --log-format F        text or json (one object a line; default text)\n"
        "  --no-verify           do not verify object checksums on put\n"
        "  --poller NAME         epoll or poll (default: best available)\n"
        "  --lock-memory         mlock the arena\n"
        "  --no-prefault         do not touch the arena's pages at start\n"
        "  --events HOST:PORT    publish chunk events for kvf-sched (ZeroMQ PUB; port 0 picks)\n"
        "  --metrics HOST:PORT   serve GET /metrics (Prometheus text) over HTTP on this address\n"
        "                        (port 0 picks; beyond loopback only with --insecure)\n"
        "  --node N              this store's number in kvf-sched's --store-events (default 0)\n"
        "  --auth TENANTS        require every client to authenticate as a tenant of this\n"
        "                        file (kvf auth new); SIGHUP reads it again. Allows --listen\n"
        "                        on any address\n"
        "  --auth-timeout MS     with --auth, a connection not authenticated by then is\n"
        "                        closed (default 10000)\n"
        "  --copy-credential F   the credential COPY presents to --peer nodes (an admin's)\n"
        "  --events-credential F secure --events with CURVE under this credential's key:\n"
        "                        subscribers prove a key of --auth's tenants, an admin sees\n"
        "                        every tenant's events, a tenant only its own\n"
        "  --insecure            allow --listen without --auth, and --events, on an address\n"
        "                        that is not loopback: only on a private network of trusted\n"
        "                        hosts (docs/security.md)\n"
        "  --peer HOST:PORT      a storage node COPY may push to (repeat for each; without\n"
        "                        any, COPY is refused)\n"
        "  --copy-workers N      threads that run COPYs (default 2)\n"
        "  --copy-max-deadline MS  the longest a COPY may take, whatever it asks (default\n"
        "                        and at most 30000)\n"
        "  --copy-queue N        COPYs that may wait for a worker; more are refused as busy\n"
        "                        (default 16)\n"
        "  --rdma off|auto|HOST:PORT\n"
        "                        serve RDMA descriptors over rdma_cm: auto (default) where this\n"
        "                        host has a device, on the listen address and a free port\n"
        "  --rdma-tenants        with --auth, serve RDMA to tenants too: one key covers the\n"
        "                        whole arena, so tenants are not isolated on it\n"
        "  --shm auto|off|NAME   shared memory for clients on this host over a Unix socket:\n"
        "                        a path, or @NAME (abstract); auto (default): @kvf-store-PID.\n"
        "                        The arena is then a sealed memfd (docs/shm.md)\n"
        "  --shm-hugepages       the shared arena on huge pages (hugetlbfs must have them)\n"
        "  --shm-staging-max SIZE  largest staging region of one connection (default 256M)\n"
        "exit status: 0 stopped by a signal, 1 a failure to start or serve, 2 a usage error\n");
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
    const char *metrics; /* --metrics HOST:PORT: /metrics over HTTP */
    const char *shm;
    char shm_auto[64];
    uint64_t shm_staging_max;
    int verify, lock_memory, prefault, insecure, rdma_tenants, shm_hugepages;
    const char *peers[STORE_MAX_PEERS]; /* --peer */
    size_t n_peers;
    long copy_workers, copy_queue, auth_timeout_ms, copy_max_deadline_ms;
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
        .lg = {.level = KVF_LOG_INFO, .name = "kvf-store"},
    };
}

/* The value v of option a, a whole number in lo..hi, into *out. Returns 0, or 2 (the exit status
 * of bad usage) after saying what is wrong. */
static int parse_count(const char *a, const char *v, long lo, long hi, long *out)
{
    char *end = NULL;
    long n = strtol(v, &end, 10);
    if (end == v || *end || n < lo || n > hi) {
        fprintf(stderr, "kvf-store: %s: %s is not a number in %ld..%ld\n", a, v, lo, hi);
        return 2;
    }
    *out = n;
    return 0;
}

/* Sets the option a that takes the value v. Returns 0, or 2 (the exit status of bad usage) after
 * saying what is wrong. */
static int parse_value(store_cfg *cfg, const char *a, const char *v)
{
    if (!strcmp(a, "--listen")) {
        cfg->listen = v;
    } else if (!strcmp(a, "--memory")) {
        if (kvf__parse_size(v, &cfg->memory) != 0) {
            fprintf(stderr, "kvf-store: --memory: cannot parse size \"%s\"\n", v);
            return 2;
        }
    } else if (!strcmp(a, "--max-request")) {
        if (kvf__parse_size(v, &cfg->max_request) != 0 || cfg->max_request < 4096) {
            fprintf(stderr, "kvf-store: --max-request: bad size \"%s\" (at least 4K)\n", v);
            return 2;
        }
    } else if (!strcmp(a, "--threads")) {
        char *end = NULL;
        cfg->threads = strcmp(v, "auto") ? strtol(v, &end, 10) : 0;
        if (strcmp(v, "auto") && (end == v || *end || cfg->threads < 1 || cfg->threads > 64)) {
            fprintf(stderr, "kvf-store: --threads: %s is not auto or in 1..64\n", v);
            return 2;
        }
    } else if (!strcmp(a, "--max-entries")) {
        return parse_count(a, v, 1024, STORE_MAX_ENTRIES, &cfg->max_entries);
    } else if (!strcmp(a, "--evict")) {
        cfg->evict = v;
    } else if (!strcmp(a, "--events")) {
        cfg->events = v;
    } else if (!strcmp(a, "--metrics")) {
        cfg->metrics = v;
    } else if (!strcmp(a, "--auth")) {
        cfg->auth = v;
    } else if (!strcmp(a, "--copy-max-deadline")) {
        return parse_count(a, v, 1, KVF_COPY_MAX_DEADLINE_MS, &cfg->copy_max_deadline_ms);
    } else if (!strcmp(a, "--auth-timeout")) {
        return parse_count(a, v, 1, 3600000, &cfg->auth_timeout_ms);
    } else if (!strcmp(a, "--copy-credential")) {
        cfg->copy_credential = v;
    } else if (!strcmp(a, "--events-credential")) {
        cfg->events_credential = v;
    } else if (!strcmp(a, "--rdma")) {
        cfg->rdma = v;
    } else if (!strcmp(a, "--shm")) {
        cfg->shm = v;
    } else if (!strcmp(a, "--shm-staging-max")) {
        if (kvf__parse_size(v, &cfg->shm_staging_max) != 0 || cfg->shm_staging_max < 4096) {
            fprintf(stderr,
                    "kvf-store: --shm-staging-max: expected a size of 4K or more, got "
                    "\"%s\"\n",
                    v);
            return 2;
        }
    } else if (!strcmp(a, "--node")) {
        cfg->node = strtol(v, NULL, 10);
        if (cfg->node < 0 || cfg->node > 255) {
            fprintf(stderr, "kvf-store: --node: %s is not in 0..255\n", v);
            return 2;
        }
    } else if (!strcmp(a, "--peer")) {
        char host[256];
        uint16_t port;
        if (kvf__addr_parse(v, host, sizeof host, &port) != 0 || port == 0) {
            fprintf(stderr, "kvf-store: --peer: expected HOST:PORT, got \"%s\"\n", v);
            return 2;
        }
        if (cfg->n_peers == STORE_MAX_PEERS) {
            fprintf(stderr, "kvf-store: --peer: at most %d peers\n", STORE_MAX_PEERS);
            return 2;
        }
        cfg->peers[cfg->n_peers++] = v;
    } else if (!strcmp(a, "--copy-workers")) {
        return parse_count(a, v, 1, 1024, &cfg->copy_workers);
    } else if (!strcmp(a, "--copy-queue")) {
        return parse_count(a, v, 1, 1024, &cfg->copy_queue);
    } else if (!strcmp(a, "--poller")) {
        cfg->poller = v;
    } else if (!strcmp(a, "--log-format")) {
        if (kvf__log_format_parse(v, &cfg->lg.format) != 0) {
            fprintf(stderr, "kvf-store: --log-format: expected text or json\n");
            return 2;
        }
    } else if (!strcmp(a, "--log-level")) {
        if (kvf__log_level_parse(v, &cfg->lg.level) != 0) {
            fprintf(stderr, "kvf-store: --log-level: expected debug, info, warn or error\n");
            return 2;
        }
    } else {
        fprintf(stderr, "kvf-store: unknown option %s (see --help)\n", a);
        return 2;
    }
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
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--version")) {
            printf("kvf-store (kvfabric) %s\n", KVF_VERSION_STRING);
            return 0;
        } else if (!strcmp(a, "--no-verify")) {
            cfg->verify = 0;
        } else if (!strcmp(a, "--rdma-tenants")) {
            cfg->rdma_tenants = 1;
        } else if (!strcmp(a, "--shm-hugepages")) {
            cfg->shm_hugepages = 1;
        } else if (!strcmp(a, "--lock-memory")) {
            cfg->lock_memory = 1;
        } else if (!strcmp(a, "--no-prefault")) {
            cfg->prefault = 0;
        } else if (!strcmp(a, "--insecure")) {
            cfg->insecure = 1;
        } else if (!v) {
            fprintf(stderr, "kvf-store: %s needs a value (see --help)\n", a);
            return 2;
        } else if (parse_value(cfg, a, v) != 0) {
            return 2;
        } else {
            i++;
        }
    }
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

/* Binds the server over cache. Returns 0, or 1 after saying why. */
static int open_server(const store_cfg *cfg, kvf_cache *cache, kvf__tenants *tenants,
                       kvf_server **srv)
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
    if (kvf__httpd_start(h, host, port, 0, 4096, metrics_route, *m, bound, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-store: --metrics %s: %s\n", cfg->metrics, err);
        return 1;
    }
    return 0;
}

/* Prints the ready line on stdout (scripts and tests wait for it) and logs what is served. */
static void announce(const store_cfg *cfg, kvf_server *srv, kvf_cache *cache, const char *ev_ep,
                     uint16_t metrics_port)
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
           " evict=%s threads=%ld events=%s node=%ld rdma=%s auth=%s shm=%s pid=%d",
           cfg->host, kvf__server_port(srv), st.memory, st.max_entries, st.policy, cfg->threads,
           ev_ep, cfg->node, rdma_text, cfg->auth ? "on" : "off", cfg->shm ? cfg->shm : "off",
           (int)getpid());
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
    char ev_ep[160] = "-";
    kvf__pub *pub = NULL;
    kvf_cache *cache = NULL;
    kvf__tenants *tenants = NULL;
    kvf_server *srv = NULL;
    if ((status = open_tenants(&cfg, &tenants)))
        goto out_close_pub;
    if ((status = open_events(&cfg, tenants, &pub, ev_ep, sizeof ev_ep)))
        goto out_close_pub;
    if ((status = open_cache(&cfg, pub, &cache)))
        goto out_close_pub;
    if (tenants)
        kvf__tenants_apply_quotas(tenants, cache);
    if ((status = open_server(&cfg, cache, tenants, &srv)))
        goto out_close_cache;
    kvf__metrics *metrics = NULL;
    kvf__httpd *mhttp = NULL;
    uint16_t mport = 0;
    if ((status = open_metrics(&cfg, srv, &metrics, &mhttp, &mport)))
        goto out_close_server;
    g_server = srv;
    kvf__daemon_signals(on_signal);
    signal(SIGHUP, on_hup);
    announce(&cfg, srv, cache, ev_ep, mport);
    kvf__notify_ready(&cfg.lg, "serving");

    kvf__server_run(srv);
    kvf__notify_stopping();
    kvf_info(&cfg.lg, "stopping");
    g_server = NULL;
out_close_server:
    kvf__httpd_stop(&mhttp); /* before the server its figures come from */
    kvf__metrics_free(&metrics);
    kvf__server_close(&srv);
out_close_cache:
    kvf__cache_close(&cache);
out_close_pub:
    kvf__pub_close(&pub);
    kvf__tenants_close(&tenants);
    if (!status)
        kvf_info(&cfg.lg, "stopped");
    return status;
}
