/*
 * kvf-sched: the cache-aware scheduler daemon (docs/scheduler.md).
 *
 *   kvf-sched [--listen HOST:PORT] [--policy P] [--cost FILE] [--config FILE]
 *             [--stores HOST:PORT[,...]] [--store-zones ZONE[,...]]
 *             [--store-events ENDPOINT[,...]]
 *             [--store-snapshots ENDPOINT[,...]] [--chunk-tokens N] [--index-blocks N]
 *             [--instance-ttl SECONDS] [--placement-ack-s SECONDS] [--log-level L]
 *
 * Startup: the command line, the cost model's calibration file, the cluster file's instances and
 * the stores' event publishers; then the HTTP server (http_api.c) and the events thread
 * (subscriber.c) until SIGTERM or SIGINT. The daemon's state and its lock are in daemon.h.
 */
#include "daemon.h"

#include "kvf/events.h"
#include "kvf/kvf.h"

#include "args.h"
#include "auth.h"
#include "jsonkeys.h"
#include "member.h"
#include "notify.h"
#include "tcp.h"

#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_BODY      (16u << 20) /* the largest request body the HTTP server accepts */
#define DEFAULT_TTL_S 30.0        /* --instance-ttl: 6 of the reference engine's heartbeats */
#define MAX_TTL_S     86400.0
/* --placement-ack-s: how long a placement's work is kept beside its engine's load reports until
 * one lists its ticket (sent.c); engines list what they took in for ACK_KEEP_S (5 s) */
#define DEFAULT_ACK_S 1.0
#define MAX_ACK_S     5.0

/* The command line's settings that are not the daemon's state. */
typedef struct cmdline {
    long chunk_tokens; /* the stores' chunk size, for store matches */
    long index_blocks; /* the blocks the index's tables are sized for at start */
    const char *listen, *policy, *cost, *config, *store_events, *store_snapshots, *tokens;
    const char *store_zones; /* --store-zones: the --stores' zones, in the same order */
    const char *events_credential, *events_server_key; /* CURVE for every event subscription */
    int insecure; /* --insecure: listen where clients are not loopback (docs/security.md) */
    const char *etcd, *cluster, *advertise; /* membership on etcd (members.c) */
    long etcd_ttl;
    long http_threads; /* --http-threads; 0: min(cores, 4) */
} cmdline;

static kvf__sched_daemon *g_daemon;

static void on_signal(int sig)
{
    (void)sig;
    if (g_daemon)
        atomic_store(&g_daemon->stop, 1);
}

/* Seconds from 0 (meaning zero_is) to max into *ud as nanoseconds. */
static int parse_ns(uint64_t *ud, const char *v, double max, const char *zero_is, char *err,
                    size_t errlen)
{
    char *end;
    double s = strtod(v, &end);
    if (end == v || *end || !(s >= 0 && s <= max)) {
        snprintf(err, errlen, "%s: seconds from 0 (%s) to %.0f", v, zero_is, max);
        return -1;
    }
    *ud = (uint64_t)llround(s * 1e9);
    return 0;
}

static int parse_ttl(void *ud, const char *v, char *err, size_t errlen)
{
    return parse_ns(ud, v, MAX_TTL_S, "never", err, errlen);
}

static int parse_ack_window(void *ud, const char *v, char *err, size_t errlen)
{
    return parse_ns(ud, v, MAX_ACK_S, "no placement kept", err, errlen);
}

/* --shard K/N: 0 <= K < N <= KVF_EVENTS_MAX_SHARDS. */
static int parse_shard(void *ud, const char *v, char *err, size_t errlen)
{
    kvf__sched_daemon *d = ud;
    unsigned k, n;
    char tail;
    if (sscanf(v, "%u/%u%c", &k, &n, &tail) != 2 || n < 1 || n > KVF_EVENTS_MAX_SHARDS || k >= n) {
        snprintf(err, errlen, "%s: expected K/N, 0 <= K < N <= %u", v, KVF_EVENTS_MAX_SHARDS);
        return -1;
    }
    d->shard = k;
    d->shards = n;
    return 0;
}

static int parse_stores(void *ud, const char *v, char *err, size_t errlen)
{
    kvf__sched_daemon *d = ud;
    if (strlen(v) >= sizeof d->stores) {
        snprintf(err, errlen, "list too long");
        return -1;
    }
    /* every entry a HOST:PORT: an empty one (",,") would shift the node numbers after it */
    int i = 0;
    for (const char *p = v;; i++) {
        size_t len = strcspn(p, ",");
        char one[300], host[256];
        uint16_t port;
        if (len == 0 || len >= sizeof one) {
            snprintf(err, errlen, "entry %d is %s (a comma-separated list of HOST:PORT)", i,
                     len ? "too long" : "empty");
            return -1;
        }
        memcpy(one, p, len);
        one[len] = 0;
        if (kvf__addr_parse(one, host, sizeof host, &port) != 0 || port == 0) {
            snprintf(err, errlen, "entry %d (\"%s\") is not HOST:PORT", i, one);
            return -1;
        }
        if (!p[len])
            break;
        p += len + 1;
    }
    snprintf(d->stores, sizeof d->stores, "%s", v);
    return 0;
}

/* Reads the command line into *cl, and --stores, --instance-ttl and --log-level into d. Returns -1
 * to go on, or the status to exit with: 0 after --help or --version, 2 for a bad option. */
static int parse_args(int argc, char **argv, cmdline *cl, kvf__sched_daemon *d)
{
    static const char *const policies[] = {"round_robin", "least_loaded", "longest_prefix",
                                           "dynamo_cost", "kvf_cost",     NULL};
    const kvf__arg args[] = {
        KVF__OPT("listen", KVF__ARG_STR, &cl->listen, "HOST:PORT", "the HTTP API (port 0 picks)",
                 "127.0.0.1:7500"),
        KVF__OPT("policy", KVF__ARG_CHOICE, &cl->policy, "P", "how requests are placed", "kvf_cost",
                 .choices = policies),
        KVF__OPT("cost", KVF__ARG_STR, &cl->cost, "FILE",
                 "the cost model's constants (kvf-engine --calibrate)", NULL),
        KVF__OPT("config", KVF__ARG_STR, &cl->config, "FILE",
                 "instances known from the start (never expire): a cluster file, or "
                 "{\"instances\": [...]}",
                 NULL),
        KVF__OPT("stores", KVF__ARG_FN, d, "HOST:PORT[,...]",
                 "the storage nodes the connectors are told, in --node order (the i-th is node "
                 "i: a plan names a load's source by it)",
                 NULL, .fn = parse_stores, .ud = d),
        KVF__OPT("store-zones", KVF__ARG_STR, &cl->store_zones, "ZONE[,...]",
                 "each --stores node's zone (a rack, an availability zone), in the same order: "
                 "a load takes a chunk from a replica on the engine's host, then in its zone",
                 NULL),
        KVF__OPT("store-events", KVF__ARG_STR, &cl->store_events, "EP[,...]",
                 "each store's --events address, in --node order", NULL),
        KVF__OPT("store-snapshots", KVF__ARG_STR, &cl->store_snapshots, "EP[,...]",
                 "each store's snapshot address (its ready line's snapshot=), in the same order: "
                 "what a store holds is learnt whole at first contact and after lost events",
                 NULL),
        KVF__OPT("shard", KVF__ARG_FN, d, "K/N",
                 "hold shard K of an index split N ways by prefix (engines publishing with "
                 "kvf_events_opts.shards N): only that shard's events are received, and "
                 "placements of its prefixes come here (docs/scale.md)",
                 "0/1", .fn = parse_shard, .ud = d),
        KVF__OPT("chunk-tokens", KVF__ARG_LONG, &cl->chunk_tokens, "N", "tokens per stored chunk",
                 "256", .lo = 1, .hi = 65536),
        KVF__OPT("index-blocks", KVF__ARG_LONG, &cl->index_blocks, "N",
                 "KV blocks the prefix index is sized for at start (its tables, 192 bytes a block "
                 "at 1M, are zeroed then; it grows past N as needed)",
                 "1048576", .lo = 1024, .hi = 1L << 30),
        KVF__OPT("instance-ttl", KVF__ARG_FN, &d->ttl_ns, "SECONDS",
                 "forget an engine silent this long; 0 never", "30", .fn = parse_ttl,
                 .ud = &d->ttl_ns),
        KVF__OPT("placement-ack-s", KVF__ARG_FN, &d->sent_window_ns, "SECONDS",
                 "until an engine's load report lists a placed request's ticket (it took the "
                 "request in), add the request's work to the engine's reported load, for at most "
                 "this long; 0: every report replaces the load",
                 "1", .fn = parse_ack_window, .ud = &d->sent_window_ns),
        KVF__OPT("tokens", KVF__ARG_STR, &cl->tokens, "FILE",
                 "\"NAME TOKEN\" lines: every request but GETs needs \"Authorization: Bearer "
                 "TOKEN\"",
                 NULL),
        KVF__OPT("events-credential", KVF__ARG_STR, &cl->events_credential, "FILE",
                 "subscribe to events over CURVE with this key", NULL),
        KVF__OPT("events-server-key", KVF__ARG_STR, &cl->events_server_key, "HEX",
                 "the publishers' X25519 public key (with --events-credential)", NULL),
        KVF__MEMBER_OPTS(&cl->etcd, &cl->cluster, &cl->etcd_ttl,
                         "learn the storage nodes and engines from their registrations instead "
                         "of --stores and --store-events, and register this replica"),
        KVF__OPT("advertise", KVF__ARG_STR, &cl->advertise, "HOST",
                 "the host engines reach this replica at, registered in etcd", "--listen's host"),
        KVF__OPT("http-threads", KVF__ARG_LONG, &cl->http_threads, "N",
                 "threads serving the HTTP API (placements run concurrently outside the index's "
                 "lock; 1: one thread)",
                 "this host's cores, at most 4", .lo = 0, .hi = 256),
        KVF__OPT("insecure", KVF__ARG_FLAG, &cl->insecure, NULL,
                 "allow --listen beyond loopback without --tokens (docs/security.md)", NULL),
        KVF__OPT("log-level", KVF__ARG_FN, &d->lg, "LEVEL", "debug, info, warn or error", "info",
                 .fn = kvf__args_log_level, .ud = &d->lg),
        KVF__OPT("log-format", KVF__ARG_FN, &d->lg, "FORMAT", "text, or json (one object a line)",
                 "text", .fn = kvf__args_log_format, .ud = &d->lg),
    };
    const kvf__args_spec spec = {
        .prog = "kvf-sched",
        .synopsis = "[OPTIONS]",
        .summary = "The cache-aware scheduler: learns which engine and store holds which prefix "
                   "from their events and places requests (docs/scheduler.md).",
        .epilog = "exit status: 0 stopped by a signal, 1 a failure to start or serve, 2 a usage "
                  "error (a bad option, or a --config file that is refused)",
        .args = args,
        .n = sizeof args / sizeof args[0],
        .max_positional = 0,
    };
    return kvf__args_parse(&spec, argc, argv, NULL);
}

/* The scheduler's options and the address to listen on, from the command line's settings.
 * Returns 0, or 2 with the reason printed. */
static int scheduler_opts(const cmdline *cl, kvf_sched_opts *so, char *host, size_t hostlen,
                          uint16_t *port)
{
    if (cl->chunk_tokens < 1 || cl->chunk_tokens > 65536) {
        fprintf(stderr, "kvf-sched: --chunk-tokens must be 1..65536\n");
        return 2;
    }
    *so = (kvf_sched_opts){.store_chunk_tokens = (uint32_t)cl->chunk_tokens,
                           .expected_blocks = (size_t)cl->index_blocks};
    if (kvf_policy_parse(cl->policy, &so->policy) != 0) {
        fprintf(stderr, "kvf-sched: unknown policy \"%s\"\n", cl->policy);
        return 2;
    }
    kvf_sched_cost_defaults(&so->cost);
    char err[256];
    if (cl->cost && kvf_sched_cost_load(cl->cost, &so->cost, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-sched: %s\n", err);
        return 2;
    }
    if (kvf__addr_parse(cl->listen, host, hostlen, port) != 0) {
        fprintf(stderr, "kvf-sched: --listen: expected HOST:PORT\n");
        return 2;
    }
    /* With tokens every request that changes anything is authenticated: any address will do. */
    return kvf__listen_policy("kvf-sched", "--listen", host,
                              cl->tokens ? KVF_LISTEN_AUTHENTICATED : cl->insecure);
}

/* Registers the instances of a cluster file ({"instances": [{"id", "role", "endpoint", "events",
 * "replay", "block_tokens", "event_shards"}, ...]}) and asks for their events. Unknown keys and
 * roles are errors (with the file and the instance named). They never expire (the operator's, and
 * engines such as vLLM report no load to kvf-sched). Called before the events thread starts.
 * Returns 0, or -1 with the reason in err. */
static int load_config(kvf__sched_daemon *d, const char *path, char *err, size_t errlen)
{
    json_error_t je;
    json_t *o = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!o) {
        snprintf(err, errlen, "%s: line %d: %s", path, je.line, je.text);
        return -1;
    }
    static const char *const top_keys[] = {"instances", NULL};
    static const char *const instance_keys[] = {"id",     "role",         "endpoint",     "events",
                                                "replay", "block_tokens", "event_shards", NULL};
    json_t *ins = json_object_get(o, "instances");
    if (kvf__json_keys_check(o, top_keys, path, err, errlen) != 0) {
        json_decref(o);
        return -1;
    }
    if (ins && !json_is_array(ins)) {
        snprintf(err, errlen, "%s: \"instances\" must be an array", path);
        json_decref(o);
        return -1;
    }
    size_t i;
    json_t *v;
    int rc = 0;
    json_array_foreach(ins, i, v)
    {
        kvf_instance_info in;
        memset(&in, 0, sizeof in);
        char role[16] = "both", where[300], replay[128] = "";
        snprintf(where, sizeof where, "%s: instances[%zu]", path, i);
        if (kvf__json_keys_check(v, instance_keys, where, err, errlen) != 0) {
            rc = -1;
            break;
        }
        char e2[200] = "";
        if (kvf__sched_json_str(v, "id", in.id, sizeof in.id, 1, e2, sizeof e2) ||
            kvf__sched_json_str(v, "role", role, sizeof role, 0, e2, sizeof e2) ||
            kvf__sched_json_str(v, "endpoint", in.endpoint, sizeof in.endpoint, 0, e2, sizeof e2) ||
            kvf__sched_json_str(v, "events", in.events, sizeof in.events, 0, e2, sizeof e2) ||
            kvf__sched_json_str(v, "replay", replay, sizeof replay, 0, e2, sizeof e2)) {
            snprintf(err, errlen, "%s: %s", where, e2);
            rc = -1;
            break;
        }
        if (strcmp(role, "prefill") && strcmp(role, "decode") && strcmp(role, "both")) {
            snprintf(err, errlen, "%s: \"role\" must be prefill, decode or both, not \"%s\"", where,
                     role);
            rc = -1;
            break;
        }
        in.role = !strcmp(role, "prefill")  ? KVF_ROLE_PREFILL
                  : !strcmp(role, "decode") ? KVF_ROLE_DECODE
                                            : KVF_ROLE_BOTH;
        json_t *bt = json_object_get(v, "block_tokens");
        in.block_tokens = json_is_integer(bt) ? (uint32_t)json_integer_value(bt) : 16;
        if (bt && (!json_is_integer(bt) || json_integer_value(bt) < 1 ||
                   json_integer_value(bt) > 65536)) {
            snprintf(err, errlen, "%s: \"block_tokens\" must be an integer in 1..65536", where);
            rc = -1;
            break;
        }
        json_t *es = json_object_get(v, "event_shards"); /* 0: the record does not say */
        if (es && (!json_is_integer(es) || json_integer_value(es) < 0 ||
                   json_integer_value(es) > KVF_EVENTS_MAX_SHARDS)) {
            snprintf(err, errlen, "%s: \"event_shards\" must be an integer in 0..%d", where,
                     KVF_EVENTS_MAX_SHARDS);
            rc = -1;
            break;
        }
        uint32_t shards = es ? (uint32_t)json_integer_value(es) : 0;
        char why[256] = "";
        int idx, fresh;
        if (kvf__sched_register_locked(d, &in, replay, shards, 1, &idx, &fresh, why, sizeof why) !=
            0) {
            snprintf(err, errlen, "%s: invalid%s%s", where, why[0] ? ": " : "", why);
            rc = -1;
            break;
        }
    }
    json_decref(o);
    return rc;
}

/* Asks for the events of the storage nodes in list (comma-separated endpoints), numbered in the
 * list's order. Called before the events thread starts. */
/* The n-th comma-separated field of list (empty where list has fewer), into out. */
static void nth_field(const char *list, int n, char *out, size_t len)
{
    out[0] = 0;
    for (int i = 0; list && i < n; i++) {
        list = strchr(list, ',');
        if (list)
            list++;
    }
    if (!list)
        return;
    size_t k = strcspn(list, ",");
    snprintf(out, len, "%.*s", (int)(k < len ? k : len - 1), list);
}

static int count_fields(const char *list)
{
    int n = 1;
    for (const char *c = list; *c; c++)
        n += *c == ',';
    return n;
}

/* Subscribes to each store's events (numbered in order), asking its snapshot socket where
 * --store-snapshots names one. 0, or 2 after saying why. */
static int subscribe_stores(kvf__sched_daemon *d, const char *events, const char *snaps)
{
    int n = count_fields(events);
    if (snaps && count_fields(snaps) != n) {
        fprintf(stderr,
                "kvf-sched: --store-snapshots names %d endpoint(s), --store-events %d: "
                "one for each store, in the same order\n",
                count_fields(snaps), n);
        return 2;
    }
    if (n > KVF_SCHED_MAX_STORES) {
        fprintf(stderr, "kvf-sched: --store-events: at most %d stores\n", KVF_SCHED_MAX_STORES);
        return 2;
    }
    for (int node = 0; node < n; node++) {
        char ep[128], snap[128];
        nth_field(events, node, ep, sizeof ep);
        nth_field(snaps, node, snap, sizeof snap);
        if (!ep[0]) {
            fprintf(stderr, "kvf-sched: --store-events: store %d has no endpoint\n", node);
            return 2;
        }
        kvf_event_source src = {.instance = -1, .store = node};
        kvf__sched_subscribe_locked(d, &src, ep, snap);
    }
    return 0;
}

/* Says the daemon is ready (the line its launchers wait for) and waits for SIGTERM or SIGINT. */
static int wait_for_signal(kvf__sched_daemon *d, const char *host, uint16_t bound,
                           kvf_policy policy)
{
    g_daemon = d;
    if (kvf__daemon_signals(on_signal, NULL) != 0) {
        fprintf(stderr, "kvf-sched: cannot start the signal thread\n");
        atomic_store(&d->stop, 1);
        return 1;
    }
    printf("kvf-sched ready listen=%s:%u policy=%s pid=%d\n", host, bound, kvf_policy_name(policy),
           (int)getpid());
    fflush(stdout);
    kvf_info(&d->lg, "serving HTTP on %s:%u, policy %s", host, bound, kvf_policy_name(policy));
    kvf__notify_ready(&d->lg, "serving");
    while (!atomic_load(&d->stop))
        usleep(50000);
    kvf__notify_stopping();
    kvf_info(&d->lg, "stopping");
    return 0;
}

/* Every subscription over CURVE, where --events-credential and --events-server-key ask for it.
 * 0, or 2 after saying why. */
static int events_curve(kvf__sched_daemon *d, const cmdline *cl)
{
    if (!cl->events_credential && !cl->events_server_key)
        return 0;
    char err[300] = "";
    uint8_t server[32], pk[32], sk[32];
    size_t n = 0;
    kvf_credential c;
    int rc = !cl->events_credential || !cl->events_server_key ||
             sodium_hex2bin(server, sizeof server, cl->events_server_key,
                            strlen(cl->events_server_key), NULL, &n, NULL) != 0 ||
             n != sizeof server;
    if (rc) {
        fprintf(stderr, "kvf-sched: --events-credential FILE and --events-server-key (64 hex "
                        "digits) go together\n");
        return 2;
    }
    if (kvf__cred_load(cl->events_credential, &c, err, sizeof err) != 0 ||
        kvf__auth_curve_pair(&c, pk, sk) != 0) {
        fprintf(stderr, "kvf-sched: --events-credential: %s\n", err[0] ? err : "no CURVE key");
        kvf__auth_wipe(&c, sizeof c);
        return 2;
    }
    kvf__zsubs_curve(d->zs, server, pk, sk);
    kvf_info(&d->lg, "KV events over CURVE as tenant %s", c.tenant);
    kvf__auth_wipe(&c, sizeof c);
    kvf__auth_wipe(sk, sizeof sk);
    return 0;
}

/* Serves HTTP and the events until a signal, then stops them: HTTP first, then the events thread,
 * then its sockets. Returns the exit status: 0, or 1 when either could not start. */
static int serve(kvf__sched_daemon *d, const cmdline *cl, const char *host, uint16_t port,
                 kvf_policy policy, const kvf__http_tokens *tokens)
{
    int rc = 1;
    char err[1024];
    uint16_t bound;
    if (kvf__zsubs_open(&d->zs) != 0) {
        fprintf(stderr, "kvf-sched: out of memory\n");
        goto out;
    }
    if ((rc = events_curve(d, cl)) != 0)
        goto out_close_zsubs;
    rc = 1;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    long threads = cl->http_threads ? cl->http_threads : cores < 1 ? 1 : cores > 4 ? 4 : cores;
    /* 1: one polling thread (kvf__httpd's 1 is one thread per connection) */
    if (kvf__httpd_start(&d->httpd, host, port, threads <= 1 ? 0 : (int)threads, MAX_BODY,
                         kvf__sched_http_route, d, &bound, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-sched: %s\n", err);
        goto out_close_zsubs;
    }
    kvf__httpd_tokens(d->httpd, tokens); /* before the ready line: no request can come sooner */
    if (kvf__kve_decoder_new(&d->dec) != 0) {
        fprintf(stderr, "kvf-sched: out of memory\n");
        goto out_close_zsubs;
    }
    pthread_t ev;
    pthread_create(&ev, NULL, kvf__sched_events_main, d);
    if (cl->etcd) {
        kvf__sched_etcd eo = {.etcd = cl->etcd,
                              .cluster = cl->cluster,
                              .advertise = cl->advertise ? cl->advertise : host,
                              .ttl_s = (int)cl->etcd_ttl,
                              .port = bound};
        if (kvf__sched_etcd_start(d, &eo) != 0) {
            atomic_store(&d->stop, 1);
            kvf__httpd_stop(&d->httpd);
            pthread_join(ev, NULL);
            kvf__sched_etcd_stop(d);
            rc = 1;
            goto out_close_zsubs;
        }
    }
    rc = wait_for_signal(d, host, bound, policy);
    kvf__sched_etcd_stop(d); /* revoked first: engines and routers stop asking this replica */
    kvf__httpd_stop(&d->httpd);
    pthread_join(ev, NULL);
out_close_zsubs:
    kvf__kve_decoder_free(&d->dec);
    kvf__zsubs_close(&d->zs);
out:
    return rc;
}

/* Tells the index where each --stores node is (node i: the i-th address), with its zone from
 * zones (--store-zones, the same count; NULL: none). 0, or the exit status 2 after saying why. */
static int place_stores(kvf__sched_daemon *d, const char *zones)
{
    char addrs[sizeof d->stores], zs[4096] = "";
    snprintf(addrs, sizeof addrs, "%s", d->stores);
    if (zones && strlen(zones) >= sizeof zs) {
        fprintf(stderr, "kvf-sched: --store-zones: list too long\n");
        return 2;
    }
    snprintf(zs, sizeof zs, "%s", zones ? zones : "");
    char *sa = NULL, *sz = NULL, *a = strtok_r(addrs, ",", &sa),
         *z = zones ? strtok_r(zs, ",", &sz) : NULL;
    int node = 0;
    for (; a; a = strtok_r(NULL, ",", &sa), node++) {
        if (zones && !z) {
            fprintf(stderr, "kvf-sched: --store-zones names fewer zones than --stores nodes\n");
            return 2;
        }
        if (z && kvf__member_zone_check("kvf-sched", "--store-zones", z) != 0)
            return 2;
        if (kvf_sched_store_where(d->s, node, a, z) != 0) {
            fprintf(stderr, "kvf-sched: --stores: node %d (\"%s\") is out of range or too long\n",
                    node, a);
            return 2;
        }
        z = zones ? strtok_r(NULL, ",", &sz) : NULL;
    }
    if (z) {
        fprintf(stderr, "kvf-sched: --store-zones names more zones than --stores nodes\n");
        return 2;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static kvf__sched_daemon d;
    d.lg = (kvf_log){.level = KVF_LOG_INFO, .name = "kvf-sched"};
    d.ttl_ns = (uint64_t)(DEFAULT_TTL_S * 1e9);
    d.sent_window_ns = (uint64_t)(DEFAULT_ACK_S * 1e9);
    cmdline cl = {.chunk_tokens = 256,
                  .index_blocks = 1L << 20,
                  .listen = "127.0.0.1:7500",
                  .policy = "kvf_cost",
                  .cluster = "default",
                  .etcd_ttl = 5};
    int rc = parse_args(argc, argv, &cl, &d);
    if (rc >= 0)
        return rc;
    kvf__daemon_block_signals(); /* before the first thread */
    kvf_sched_opts so;
    char host[256], err[1024];
    uint16_t port;
    if ((rc = scheduler_opts(&cl, &so, host, sizeof host, &port)) != 0)
        return rc;
    /* Without --stores and --store-events there is no storage node to plan for. */
    so.no_stores = !d.stores[0] && !cl.store_events; /* with --etcd: until a store joins */
    if (kvf_sched_new(&d.s, &so) != 0) {
        fprintf(stderr, "kvf-sched: out of memory\n");
        return 1;
    }
    pthread_mutex_init(&d.mu, NULL);
    kvf__sched_sent_init(&d);
    if (kvf__sched_metrics_open(&d) != 0) {
        fprintf(stderr, "kvf-sched: out of memory\n");
        return 1;
    }
    if (cl.config && load_config(&d, cl.config, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-sched: %s\n", err);
        return 2;
    }
    if (cl.etcd && (cl.store_events || d.stores[0])) {
        fprintf(stderr, "kvf-sched: --etcd learns the stores from their registrations: not with "
                        "--stores or --store-events\n");
        return 2;
    }
    if (!cl.etcd && cl.advertise) {
        fprintf(stderr, "kvf-sched: --advertise is what --etcd registers; it needs --etcd\n");
        return 2;
    }
    if (cl.etcd) {
        if (kvf__member_cluster_check("kvf-sched", cl.cluster) != 0)
            return 2;
        const char *h = cl.advertise ? cl.advertise : host;
        if (!strcmp(h, "0.0.0.0") || !strcmp(h, "::")) {
            fprintf(stderr, "kvf-sched: --etcd with --listen on %s needs --advertise HOST\n", h);
            return 2;
        }
    }
    if (cl.store_zones && !d.stores[0]) {
        fprintf(stderr, "kvf-sched: --store-zones needs --stores\n");
        return 2;
    }
    if (d.stores[0] && (rc = place_stores(&d, cl.store_zones)) != 0)
        return rc;
    if (cl.store_snapshots && !cl.store_events) {
        fprintf(stderr, "kvf-sched: --store-snapshots needs --store-events\n");
        return 2;
    }
    if (cl.store_events && (rc = subscribe_stores(&d, cl.store_events, cl.store_snapshots)) != 0)
        return rc;
    kvf__http_tokens *tokens = NULL;
    if (cl.tokens && kvf__http_tokens_load(&tokens, cl.tokens, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-sched: --tokens: %s\n", err);
        return 2;
    }
    if (tokens)
        kvf_info(&d.lg, "%zu token(s) from %s: every request but GETs is authenticated",
                 kvf__http_tokens_count(tokens), cl.tokens);
    rc = serve(&d, &cl, host, port, so.policy, tokens);
    kvf__http_tokens_free(&tokens);
    if (rc != 0)
        return rc;
    kvf_sched_destroy(&d.s);
    kvf__metrics_free(&d.metrics);
    pthread_mutex_destroy(&d.mu);
    kvf_info(&d.lg, "stopped");
    return 0;
}
