/*
 * kvf-relay: publishes one engine's KV events again by shard (docs/scale.md, "A relay for
 * engines that publish one stream").
 *
 *   kvf-relay --from tcp://HOST:PORT [--from-replay tcp://HOST:PORT] --shards N
 *             [--events HOST:PORT] [--replay HOST:PORT] [--listen HOST:PORT]
 *             [--etcd URL[,...] --register JSON [--cluster NAME] [--advertise HOST]] [OPTIONS]
 *
 * A vLLM engine publishes its KV events as one stream; kvf-sched replicas that hold one shard of
 * the index each (--shard K/N) take only their shard's topic. The relay, one beside each such
 * engine, follows the engine's stream (late join, gaps and restarts through its replay socket)
 * and publishes each event under its shard's topic, each shard numbered on its own, with a replay
 * socket of its own; the engine is registered with the replicas under the relay's endpoints:
 * by whoever starts the relay, or by the relay itself with --etcd (the engine's record, --register,
 * under the relay's lease: every replica following the cluster learns the engine, and drops it
 * when the relay dies, since its events then stop). Its HTTP API answers GET /healthz, GET
 * /v1/relay (what it follows and its counters) and GET /metrics.
 */
#include "relay.h"

#include "kvf/error.h"
#include "kvf/events.h"

#include "args.h"
#include "http.h"
#include "log.h"
#include "member.h"
#include "metrics.h"
#include "record.h"
#include "notify.h"
#include "tcp.h"

#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct relay_cmd {
    const char *from, *from_replay, *events, *replay, *listen;
    const char *credential, *tenants;
    const char *etcd, *cluster, *reg, *advertise; /* --etcd: the engine registered (--register) */
    long etcd_ttl;
    long shards;
    uint64_t replay_batches;
    int insecure;
} relay_cmd;

typedef struct relay_daemon {
    kvf_log lg;
    kvf__relay *r;
    kvf__metrics *metrics;
    relay_cmd cl;
    kvf__member *member; /* with --etcd: the engine's registration */
    char engine_id[64];
    atomic_int stop;
} relay_daemon;

static relay_daemon *g_daemon;

static void on_signal(int sig)
{
    (void)sig;
    if (g_daemon)
        atomic_store(&g_daemon->stop, 1);
}

/* The counters, named as /v1/relay and /metrics say them. */
typedef struct named {
    const char *name, *help;
    uint64_t v;
} named;

static size_t counters(relay_daemon *d, named *out)
{
    kvf__relay_stats st;
    kvf__relay_stats_get(d->r, &st);
    const named f[] = {
        {"batches", "batches received from the engine, live or replayed", st.batches},
        {"replayed", "batches asked of the engine's replay socket", st.replayed},
        {"stored_blocks", "blocks stored, published again", st.stored},
        {"removed_blocks", "blocks removed, published again", st.removed},
        {"cleared", "AllBlocksCleared published", st.cleared},
        {"skipped_events", "events of other kinds, not published", st.skipped},
        {"malformed", "batches or events that did not decode or add up", st.malformed},
        {"gaps", "gaps in the engine's numbering", st.gaps},
        {"missed", "batches those gaps skipped", st.missed},
        {"late_joins", "first contacts that asked the replay socket from the start", st.late_joins},
        {"lost", "gaps the replay socket could not fill (the index cleared)", st.lost},
        {"replay_timeouts", "replay requests not answered", st.replay_timeouts},
        {"replay_retries",
         "replays asked again for what one not answered, or not answered to its end, still owed",
         st.replay_retries},
        {"restarts", "the engine's numbering started again", st.restarts},
        {"sharded_upstream", "batches that came sharded already, dropped", st.sharded_upstream},
        {"publish_errors", "events that could not be published", st.publish_errors},
        {"unknown_parents", "continuations whose parent was never seen",
         kvf__relay_unknown_parents(d->r)},
        {"published", "batches published, over every shard", kvf__relay_published(d->r)},
        {"last_seq", "the engine's last sequence number seen", st.last_seq},
    };
    memcpy(out, f, sizeof f);
    return sizeof f / sizeof f[0];
}

#define MAX_COUNTERS 24

static void metrics_collect(void *ud, kvf__metrics *m)
{
    relay_daemon *d = ud;
    named f[MAX_COUNTERS];
    size_t n = counters(d, f);
    kvf__metric_value v[MAX_COUNTERS];
    for (size_t i = 0; i < n; i++)
        v[i] = (kvf__metric_value){.name = f[i].name,
                                   .help = f[i].help,
                                   .counter = strcmp(f[i].name, "last_seq") != 0,
                                   .v = (double)f[i].v};
    kvf__metrics_set_all(m, v, n);
}

static unsigned route(void *ctx, const char *method, const char *url, json_t *body,
                      kvf__http_reply *out)
{
    (void)body;
    relay_daemon *d = ctx;
    if (strcmp(method, "GET") != 0) {
        out->json = kvf__http_error("%s: the relay's API is read-only (GET)", method);
        return 405;
    }
    if (!strcmp(url, "/healthz")) {
        out->json = json_pack("{s:b}", "ok", 1);
        return out->json ? 200 : 500;
    }
    if (!strcmp(url, "/metrics"))
        return kvf__http_metrics_reply(d->metrics, out);
    if (strcmp(url, "/v1/relay") != 0) {
        out->json = kvf__http_error("%s: not found (GET /v1/relay, /healthz, /metrics)", url);
        return 404;
    }
    named f[MAX_COUNTERS];
    size_t n = counters(d, f);
    json_t *o =
        json_pack("{s:s,s:s,s:s,s:s,s:I}", "from", d->cl.from, "from_replay",
                  d->cl.from_replay ? d->cl.from_replay : "", "events", kvf__relay_endpoint(d->r),
                  "replay", kvf__relay_replay_endpoint(d->r), "shards", (json_int_t)d->cl.shards);
    for (size_t i = 0; o && i < n; i++) /* past 2^63 (a sequence number may be): a real */
        json_object_set_new(o, f[i].name,
                            f[i].v <= (uint64_t)INT64_MAX ? json_integer((json_int_t)f[i].v)
                                                          : json_real((double)f[i].v));
    if (o && d->member) /* the engine it registered in etcd, and whether its lease holds */
        json_object_set_new(o, "etcd",
                            json_pack("{s:s,s:b,s:I}", "engine", d->engine_id, "registered",
                                      kvf__member_registered(d->member), "rejoins",
                                      (json_int_t)kvf__member_rejoins(d->member)));
    out->json = o;
    return o ? 200 : 500;
}

static int parse_args(int argc, char **argv, relay_daemon *d)
{
    relay_cmd *cl = &d->cl;
    const kvf__arg args[] = {
        KVF__OPT("from", KVF__ARG_STR, &cl->from, "tcp://HOST:PORT",
                 "the engine's KV events publisher (vLLM's kv_events_config endpoint)", NULL),
        KVF__OPT("from-replay", KVF__ARG_STR, &cl->from_replay, "tcp://HOST:PORT",
                 "the engine's replay socket: what the relay missed is asked there", NULL),
        KVF__OPT("shards", KVF__ARG_LONG, &cl->shards, "N",
                 "the shards of kvf-sched's index (its replicas' --shard K/N; 1: not sharded, "
                 "the stream published again as it is, under --credential)",
                 NULL, .lo = 1, .hi = KVF_EVENTS_MAX_SHARDS),
        KVF__OPT("events", KVF__ARG_STR, &cl->events, "HOST:PORT",
                 "where the relay publishes (port 0 picks)", "127.0.0.1:0"),
        KVF__OPT("replay", KVF__ARG_STR, &cl->replay, "HOST:PORT",
                 "the relay's replay socket, which the replicas ask (port 0 picks; \"none\": "
                 "none)",
                 "--events' host, port 0"),
        KVF__OPT("replay-batches", KVF__ARG_U64, &cl->replay_batches, "N",
                 "batches the replay socket keeps", "4096", .lo = 1, .hi = 1 << 24),
        KVF__OPT("listen", KVF__ARG_STR, &cl->listen, "HOST:PORT",
                 "the read-only HTTP API (port 0 picks)", "127.0.0.1:7600"),
        KVF__OPT("credential", KVF__ARG_STR, &cl->credential, "FILE",
                 "secure what the relay publishes with CURVE under this credential, as an "
                 "engine's --events-credential (docs/security.md)",
                 NULL),
        KVF__OPT("tenants", KVF__ARG_STR, &cl->tenants, "FILE",
                 "the keys that may subscribe (with --credential)", NULL),
        KVF__OPT("insecure", KVF__ARG_FLAG, &cl->insecure, NULL,
                 "publish beyond loopback without --credential (docs/security.md)", NULL),
        KVF__MEMBER_OPTS(&cl->etcd, &cl->cluster, &cl->etcd_ttl,
                         "register the engine (--register) under the relay's lease, so that every "
                         "kvf-sched replica following the cluster learns it, and drops it when the "
                         "relay dies"),
        KVF__OPT("register", KVF__ARG_STR, &cl->reg, "JSON",
                 "with --etcd: the engine's registration record, as POST /v1/instances takes it "
                 "(id, role, endpoint, block_tokens, capacity_blocks, zone...); the relay adds its "
                 "own events and replay endpoints and its shards",
                 NULL),
        KVF__OPT("advertise", KVF__ARG_STR, &cl->advertise, "HOST",
                 "with --etcd: the host the replicas reach --events and --replay at, where they "
                 "listen on a wildcard address",
                 "--events' host"),
        KVF__OPT("log-level", KVF__ARG_FN, &d->lg, "LEVEL", "debug, info, warn or error", "info",
                 .fn = kvf__args_log_level, .ud = &d->lg),
        KVF__OPT("log-format", KVF__ARG_FN, &d->lg, "FORMAT", "text, or json (one object a line)",
                 "text", .fn = kvf__args_log_format, .ud = &d->lg),
    };
    const kvf__args_spec spec = {
        .prog = "kvf-relay",
        .synopsis = "--from tcp://HOST:PORT --shards N [OPTIONS]",
        .summary = "Publishes one engine's KV events again by shard, for kvf-sched replicas that "
                   "each hold one shard of the index (docs/scale.md).",
        .epilog = "exit status: 0 stopped by a signal, 1 a failure to start, 2 a usage error",
        .args = args,
        .n = sizeof args / sizeof args[0],
        .max_positional = 0,
    };
    int rc = kvf__args_parse(&spec, argc, argv, NULL);
    if (rc != KVF__ARGS_GO_ON)
        return rc;
    if (!cl->from || !cl->shards) {
        fprintf(stderr, "kvf-relay: --from tcp://HOST:PORT and --shards N are required\n");
        return 2;
    }
    if (strncmp(cl->from, "tcp://", 6) != 0 ||
        (cl->from_replay && strncmp(cl->from_replay, "tcp://", 6) != 0)) {
        fprintf(stderr, "kvf-relay: --from and --from-replay are ZeroMQ endpoints, "
                        "tcp://HOST:PORT\n");
        return 2;
    }
    if (!cl->etcd != !cl->reg) {
        fprintf(stderr, "kvf-relay: --etcd and --register go together: the relay registers the "
                        "engine's record in etcd\n");
        return 2;
    }
    if (cl->advertise && !cl->etcd) {
        fprintf(stderr, "kvf-relay: --advertise is what --etcd registers; it needs --etcd\n");
        return 2;
    }
    if (cl->etcd && kvf__member_cluster_check("kvf-relay", cl->cluster) != 0)
        return 2;
    if (!cl->credential != !cl->tenants) {
        fprintf(stderr, "kvf-relay: --credential and --tenants go together\n");
        return 2;
    }
    if (kvf__listen_policy_addr("kvf-relay", "--events", cl->events,
                                cl->credential ? KVF_LISTEN_AUTHENTICATED : cl->insecure) != 0 ||
        kvf__listen_policy_addr("kvf-relay", "--replay",
                                cl->replay && strcmp(cl->replay, "none") ? cl->replay : NULL,
                                cl->credential ? KVF_LISTEN_AUTHENTICATED : cl->insecure) != 0)
        return 2;
    return KVF__ARGS_GO_ON;
}

/* With --etcd: registers /kvfabric/CLUSTER/engines/ID = the engine's record (--register) with the
 * relay's endpoints and shards, checked by kvf-sched's own rules first, under a lease (exclusive:
 * waiting two TTLs for a previous holder's to lapse). 0, or the exit status after saying why. */
static int register_engine(relay_daemon *d)
{
    relay_cmd *cl = &d->cl;
    json_error_t je;
    json_t *rec = json_loads(cl->reg, 0, &je);
    if (!json_is_object(rec)) {
        fprintf(stderr, "kvf-relay: --register: not a JSON object: %s\n",
                rec ? "another JSON value" : je.text);
        json_decref(rec);
        return 2;
    }
    char host[256] = "", ev[300], rp[300] = "";
    uint16_t port;
    if (cl->advertise)
        snprintf(host, sizeof host, "%s", cl->advertise);
    else if (kvf__addr_parse(cl->events, host, sizeof host, &port) != 0)
        host[0] = 0;
    const char *rep = kvf__relay_replay_endpoint(d->r);
    kvf__member_reachable(kvf__relay_endpoint(d->r), host, ev, sizeof ev);
    if (rep[0])
        kvf__member_reachable(rep, host, rp, sizeof rp);
    if (strstr(ev, "tcp://0.0.0.0:") || strstr(ev, "tcp://[::]:") || strstr(ev, "tcp://*:")) {
        fprintf(stderr, "kvf-relay: --etcd with --events on a wildcard address needs --advertise "
                        "HOST: the address the replicas reach the relay at\n");
        json_decref(rec);
        return 2;
    }
    json_object_set_new(rec, "events", json_string(ev));
    json_object_set_new(rec, "replay", json_string(rp));
    json_object_set_new(rec, "event_shards", json_integer(cl->shards));
    kvf_instance_info in;
    char replay[128], err[600] = "";
    uint32_t shards;
    if (kvf__sched_instance_parse(rec, &in, replay, sizeof replay, &shards, err, sizeof err) != 0 ||
        (strchr(in.id, '/') && snprintf(err, sizeof err, "\"id\" may not hold a '/'"))) {
        fprintf(stderr, "kvf-relay: --register: %s\n", err);
        json_decref(rec);
        return 2;
    }
    char *value = json_dumps(rec, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(rec);
    snprintf(d->engine_id, sizeof d->engine_id, "%s", in.id);
    char key[256];
    snprintf(key, sizeof key, "/kvfabric/%s/engines/%s", cl->cluster, in.id);
    kvf__member_opts mo = {.endpoints = cl->etcd,
                           .key = key,
                           .value = value ? value : "{}",
                           .ttl_s = (int)cl->etcd_ttl,
                           .exclusive = 1,
                           .wait_ms = 2 * (int)cl->etcd_ttl * 1000 + 1000,
                           .log = &d->lg};
    int rc = kvf__member_start(&d->member, &mo, err, sizeof err);
    free(value);
    if (rc) {
        fprintf(stderr, "kvf-relay: --etcd: %s\n", err);
        return 1;
    }
    kvf_info(&d->lg, "etcd: engine %s registered at %s (events %s)", in.id, key, ev);
    return 0;
}

/* The relay's HTTP API is read-only (counters), so it may listen anywhere; serves it and relays
 * until a signal. Returns the exit status. */
static int serve(relay_daemon *d)
{
    char host[256], err[512];
    uint16_t port, bound;
    if (kvf__addr_parse(d->cl.listen, host, sizeof host, &port) != 0) {
        fprintf(stderr, "kvf-relay: --listen: expected HOST:PORT, got \"%s\"\n", d->cl.listen);
        return 2;
    }
    kvf__httpd *httpd = NULL;
    if (kvf__httpd_start(&httpd, host, port, 0, 1 << 16, route, d, &bound, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-relay: %s\n", err);
        return 1;
    }
    g_daemon = d;
    if (kvf__daemon_signals(on_signal, NULL) != 0) {
        fprintf(stderr, "kvf-relay: cannot start the signal thread\n");
        kvf__httpd_stop(&httpd);
        return 1;
    }
    printf("kvf-relay ready listen=%s:%u events=%s replay=%s shards=%ld pid=%d\n", host, bound,
           kvf__relay_endpoint(d->r),
           kvf__relay_replay_endpoint(d->r)[0] ? kvf__relay_replay_endpoint(d->r) : "-",
           d->cl.shards, (int)getpid());
    fflush(stdout);
    kvf_info(&d->lg, "relaying %s%s%s in %ld shards on %s", d->cl.from,
             d->cl.from_replay ? " (replay " : "", d->cl.from_replay ? d->cl.from_replay : "",
             d->cl.shards, kvf__relay_endpoint(d->r));
    kvf__notify_ready(&d->lg, "relaying");
    while (!atomic_load(&d->stop))
        kvf__relay_round(d->r, &d->stop);
    kvf__notify_stopping();
    kvf_info(&d->lg, "stopping");
    kvf__httpd_stop(&httpd);      /* first: its handler reads d->member */
    kvf__member_stop(&d->member); /* revoked: the replicas drop the engine at once */
    return 0;
}

int main(int argc, char **argv)
{
    static relay_daemon d;
    d.lg = (kvf_log){.level = KVF_LOG_INFO, .name = "kvf-relay"};
    d.cl = (relay_cmd){.events = "127.0.0.1:0",
                       .listen = "127.0.0.1:7600",
                       .replay_batches = 4096,
                       .cluster = "default",
                       .etcd_ttl = 5};
    int rc = parse_args(argc, argv, &d);
    if (rc != KVF__ARGS_GO_ON)
        return rc;
    kvf__daemon_block_signals(); /* before the first thread */
    char replay[300] = "";
    if (!d.cl.replay) { /* the events' host, any port */
        char h[256];
        uint16_t p;
        if (kvf__addr_parse(d.cl.events, h, sizeof h, &p) == 0)
            snprintf(replay, sizeof replay, "%s:0", h);
    } else if (strcmp(d.cl.replay, "none") != 0) {
        snprintf(replay, sizeof replay, "%s", d.cl.replay);
    }
    kvf__relay_opts o = {.from = d.cl.from,
                         .from_replay = d.cl.from_replay,
                         .out = {.listen = d.cl.events,
                                 .replay = replay[0] ? replay : NULL,
                                 .replay_batches = (size_t)d.cl.replay_batches,
                                 .credential = d.cl.credential,
                                 .tenants = d.cl.tenants,
                                 .shards = (uint32_t)d.cl.shards}};
    char err[512] = "";
    d.metrics = kvf__metrics_new("kvf_relay");
    if (!d.metrics) {
        fprintf(stderr, "kvf-relay: out of memory\n");
        return 1;
    }
    kvf__metrics_on_collect(d.metrics, metrics_collect, &d);
    rc = kvf__relay_open(&d.r, &o, &d.lg, err, sizeof err);
    if (rc) {
        fprintf(stderr, "kvf-relay: %s\n", err[0] ? err : kvf_strerror(rc));
        kvf__relay_close(&d.r);
        kvf__metrics_free(&d.metrics);
        return rc == KVF_EINVAL ? 2 : 1;
    }
    if (d.cl.etcd && (rc = register_engine(&d)) != 0) {
        kvf__relay_close(&d.r);
        kvf__metrics_free(&d.metrics);
        return rc;
    }
    rc = serve(&d);
    kvf__member_stop(&d.member);
    kvf__relay_close(&d.r);
    kvf__metrics_free(&d.metrics);
    if (!rc)
        kvf_info(&d.lg, "stopped");
    return rc;
}
