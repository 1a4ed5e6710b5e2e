/*
 * kvf-store: the kvfabric storage node daemon.
 *
 *   kvf-store [--listen HOST:PORT] [--memory SIZE] [--threads N] [--evict lru|s3fifo]
 *             [--max-request SIZE] [--max-entries N] [--log-level L] [--no-verify]
 *             [--poller epoll|poll] [--lock-memory] [--rdma off|auto|HOST:PORT]
 *
 * Prints one ready line ("kvf-store ready listen=127.0.0.1:7400 memory=... pid=...") on stdout
 * once it accepts connections; SIGTERM and SIGINT stop it cleanly.
 */
#include "kvf/kvf.h"

#include "cache.h"
#include "log.h"
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

static void usage(FILE *f)
{
    fprintf(
        f,
        "usage: kvf-store [options]\n"
        "  --listen HOST:PORT    address to serve (default 127.0.0.1:7400; port 0 picks one)\n"
        "  --memory SIZE         arena size, e.g. 512M, 4G (default 1G)\n"
        "  --threads N           event-loop threads (default 1)\n"
        "  --evict lru|s3fifo    eviction policy (default lru)\n"
        "  --max-request SIZE    largest put request (default 256M)\n"
        "  --max-entries N       index capacity (default memory / 16 KiB)\n"
        "  --log-level L         debug, info, warn, error (default info)\n"
        "  --no-verify           do not verify object checksums on put\n"
        "  --poller NAME         epoll or poll (default: best available)\n"
        "  --lock-memory         mlock the arena\n"
        "  --no-prefault         do not touch the arena's pages at start\n"
        "  --events HOST:PORT    publish chunk events for kvf-sched (ZeroMQ PUB; port 0 picks)\n"
        "  --node N              this store's number in kvf-sched's --store-events (default 0)\n"
        "  --rdma off|auto|HOST:PORT\n"
        "                        serve RDMA descriptors over rdma_cm: auto (default) where this\n"
        "                        host has a device, on the listen address and a free port\n");
}

int main(int argc, char **argv)
{
    const char *listen = "127.0.0.1:7400";
    uint64_t memory = 1ull << 30, max_request = 256ull << 20;
    long threads = 1, max_entries = 0;
    const char *evict = "lru", *poller = NULL, *events = NULL, *rdma = "auto";
    long node = 0;
    int verify = 1, lock_memory = 0, prefault = 1;
    kvf_log lg = {.level = KVF_LOG_INFO, .name = "kvf-store"};

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = 1;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--no-verify")) {
            verify = 0;
            takes = 0;
        } else if (!strcmp(a, "--lock-memory")) {
            lock_memory = 1;
            takes = 0;
        } else if (!strcmp(a, "--no-prefault")) {
            prefault = 0;
            takes = 0;
        } else if (!v) {
            fprintf(stderr, "kvf-store: %s needs a value (see --help)\n", a);
            return 2;
        } else if (!strcmp(a, "--listen")) {
            listen = v;
        } else if (!strcmp(a, "--memory")) {
            if (kvf__parse_size(v, &memory) != 0) {
                fprintf(stderr, "kvf-store: --memory: cannot parse size \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--max-request")) {
            if (kvf__parse_size(v, &max_request) != 0 || max_request < 4096) {
                fprintf(stderr, "kvf-store: --max-request: bad size \"%s\" (at least 4K)\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--threads")) {
            threads = strtol(v, NULL, 10);
            if (threads < 1 || threads > 64) {
                fprintf(stderr, "kvf-store: --threads: %s is not in 1..64\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--max-entries")) {
            max_entries = strtol(v, NULL, 10);
            if (max_entries < 1) {
                fprintf(stderr, "kvf-store: --max-entries: bad value \"%s\"\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--evict")) {
            evict = v;
        } else if (!strcmp(a, "--events")) {
            events = v;
        } else if (!strcmp(a, "--rdma")) {
            rdma = v;
        } else if (!strcmp(a, "--node")) {
            node = strtol(v, NULL, 10);
            if (node < 0 || node > 255) {
                fprintf(stderr, "kvf-store: --node: %s is not in 0..255\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--poller")) {
            poller = v;
        } else if (!strcmp(a, "--log-level")) {
            if (kvf__log_level_parse(v, &lg.level) != 0) {
                fprintf(stderr, "kvf-store: --log-level: expected debug, info, warn or error\n");
                return 2;
            }
        } else {
            fprintf(stderr, "kvf-store: unknown option %s (see --help)\n", a);
            return 2;
        }
        i += takes;
    }

    char host[256];
    uint16_t port;
    if (kvf__addr_parse(listen, host, sizeof host, &port) != 0) {
        fprintf(stderr, "kvf-store: --listen: expected HOST:PORT, got \"%s\"\n", listen);
        return 2;
    }

    char err[256] = "", ev_ep[160] = "-";
    kvf__pub *pub = NULL;
    if (events) {
        char eh[256];
        uint16_t ep;
        if (kvf__addr_parse(events, eh, sizeof eh, &ep) != 0) {
            fprintf(stderr, "kvf-store: --events: expected HOST:PORT, got \"%s\"\n", events);
            return 2;
        }
        if (kvf__pub_open(&pub, eh, ep, (int)node, ev_ep, sizeof ev_ep, err, sizeof err) != 0) {
            fprintf(stderr, "kvf-store: %s\n", err);
            return 1;
        }
    }
    kvf_cache_opts co = {
        .on_change = pub ? kvf__pub_note : NULL,
        .on_change_ctx = pub,
        .memory = memory,
        .max_entries = (uint32_t)max_entries,
        .evict = evict,
        .prefault = prefault,
        .lock_memory = lock_memory,
    };
    kvf_cache *cache = NULL;
    int rc = kvf__cache_open(&cache, &co, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvf-store: %s\n", err);
        return 1;
    }
    kvf_server_opts so = {
        .host = host,
        .port = port,
        .threads = (int)threads,
        .max_request = max_request,
        .verify_puts = verify,
        .poller = poller,
        .node_id = (uint64_t)getpid(),
        .rdma = rdma,
        .cache = cache,
        .log = &lg,
    };
    kvf_server *srv = NULL;
    rc = kvf__server_open(&srv, &so, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvf-store: %s\n", err);
        kvf__cache_close(&cache);
        return 1;
    }
    g_server = srv;
    kvf__daemon_signals(on_signal);

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
           " evict=%s threads=%ld events=%s node=%ld rdma=%s pid=%d\n",
           host, kvf__server_port(srv), st.memory, st.max_entries, st.policy, threads, ev_ep, node,
           rdma_text, (int)getpid());
    if (!rdma_port)
        kvf_info(&lg, "rdma off: %s", rdma_why);
    fflush(stdout);
    kvf_info(&lg, "serving %s:%u with %" PRIu64 " MiB, %s eviction, %ld thread(s)", host,
             kvf__server_port(srv), st.memory >> 20, st.policy, threads);

    kvf__server_run(srv);
    kvf_info(&lg, "stopping");
    g_server = NULL;
    kvf__server_close(&srv);
    kvf__cache_close(&cache);
    kvf__pub_close(&pub);
    kvf_info(&lg, "stopped");
    return 0;
}
