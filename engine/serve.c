/*
 * kvf-engine's serving mode: the reference engine behind HTTP/JSON, registered with kvf-sched,
 * publishing its KV events, and moving KV through the connector (docs/operations.md).
 *
 *   kvf-engine --serve --id ID --role prefill|decode|both [--listen HOST:PORT]
 *              [--advertise HOST:PORT] [--zone ZONE] [--sched HOST:PORT[,...]]
 *              [--store HOST:PORT[,...]]
 *              [--events HOST:PORT] [--model M] [--seed S] [--max-tokens N] [--log-level L]
 *              [--events-credential FILE --events-tenants FILE] [--tokens FILE]
 *              [--insecure: allow --listen/--events on an address that is not loopback]
 *              [--queue hrrn|work|fifo] [--cost FILE] [--decide: load or recompute per request]
 *              [--prefetch on|off: fetch a waiting request's cached prefix while it waits]
 *              [--prefetch-memory SIZE: what the waiting requests' prefetches may hold (1G)]
 *
 * Requests (POST, JSON bodies; token ids as arrays of integers):
 *   /v1/prefill   {id, tokens}                     prefill with the cached prefix loaded and the
 *                                                  new chunks saved; answers the first token
 *   /v1/decode    {id, tokens, first_token, max_tokens, expect_cached}
 *                                                  the decode half of a disaggregated request:
 *                                                  waits for the prefill's chunks (the handoff),
 *                                                  loads them, checks the first token, decodes
 *   /v1/generate  {id, tokens, max_tokens, reuse}  prefill and decode here (colocated)
 *
 * load_deadline_ms (prefill and generate, optional: kvf-sched's plan gives it): a request that
 * finds the engine busy starts fetching its cached prefix from the stores at once (--prefetch on,
 * the default); at its turn the engine uses what arrived within load_deadline_ms of the request's
 * arrival (waiting for it until then) and computes the rest; the reply's "prefetch" says how much.
 * A request that finds the engine free loads layer by layer during its prefill instead.
 * ticket (optional, kvf-sched's plan gives it): listed in the engine's load reports for a few
 * seconds from the moment the request counts in its queue or its decodes, so that kvf-sched adds
 * a placed request's work to the reported load only until the engine counts it itself.
 * reuse (prefill and generate): true (the default) reuses the engine's pages and the stores and
 * saves to the stores; "engine" reuses the engine's own pages only (an engine with its prefix
 * cache on, without kvfabric: no store is asked, loaded from or saved to); false reuses nothing.
 *   GET /v1/health                                 id, role, queue and connector figures
 *
 * One sequence runs at a time (the reference engine has one); waiting requests are taken by
 * kvf-sched's queue rules (kvf_sched_queue_pick_by over the oldest 128, every 128th pick the
 * oldest: hrrn by default, the highest response ratio (waited + work) / work; --queue work the
 * least uncached work; --queue fifo arrival order), and the queue is reported to kvf-sched
 * as the engine's load. The KV of the last sequence stays in
 * the engine's pages: a prompt that starts with it keeps those chunks (device tier), and the
 * events say so: BlockStored for a new sequence's blocks, BlockRemoved for the blocks it replaced,
 * in vLLM's format (ZeroMQ PUB, [topic, 8-byte big-endian sequence, msgpack [ts, events, 0]]).
 */
#include "serve.h"
#include "serve_int.h"

#include "args.h"

#include "notify.h"

#include "auth.h"
#include "clock.h"
#include "cpus.h"
#include "errf.h"
#include "http.h"
#include "kvf/events.h"
#include "kvf/kvf.h"
#include "member.h"
#include "scheduler.h"
#include "log.h"
#include "tcp.h"
#include "units.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* A request's body at most: its tokens (the engine's capacity, --max-tokens) written however a
 * client writes JSON (an id of ten digits on a line of its own, indented: 24 bytes), and 1 MiB for
 * the rest; 64 MiB at most. Parsed, a body takes about 20 times its size: a limit far past what
 * the capacity admits let a client make the engine parse gigabytes to refuse them. */
#define BODY_PER_TOKEN 24u
#define BODY_BASE      (1u << 20)
#define MAX_BODY       (64u << 20)
#define REPORT_EVERY_S 5.0 /* the longest time between two load reports (heartbeats) */

static atomic_int g_stop;

static void on_signal(int sig)
{
    (void)sig;
    atomic_store(&g_stop, 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Load reports */

void kvfe__srv_mark_dirty_locked(srv *S)
{
    S->report_dirty = 1;
    pthread_cond_signal(&S->report_cv);
}

static int register_with_sched(srv *S, const char *sched, int attempts, char *err, size_t errlen);

/* Sends the load whenever it changes, and at least every REPORT_EVERY_S seconds, to every
 * replica of kvf-sched: it removes an instance it has not heard from within its --instance-ttl
 * (30 s unless set), so an idle engine's unchanged reports are its heartbeat. When a replica
 * answers 404 (it expired or deleted this engine, or restarted), the engine registers with it
 * again and reports at once; one that does not answer is logged once and asked on. The replicas
 * are --sched's and, with --etcd, those registered in the cluster (on_replica). */
static void *reporter_main(void *arg)
{
    srv *S = arg;
    char err[256];
    char list[KVFE_MAX_REPLICAS][160], down[KVFE_MAX_REPLICAS][160];
    int n_down = 0;
    double last = kvfe__srv_now();
    pthread_mutex_lock(&S->mu);
    while (!atomic_load(&S->stop)) {
        if (!S->report_dirty && kvfe__srv_now() - last < REPORT_EVERY_S) {
            kvf__cond_wait_ms(&S->report_cv, &S->mu, 200);
            continue;
        }
        S->report_dirty = 0;
        double queued_s = kvfe__srv_queued_s_locked(S);
        json_t *body =
            json_pack("{s:f,s:f,s:i,s:I}", "queued_prefill_tokens", S->queued_prefill_tokens,
                      "queued_prefill_s", queued_s, "active_decodes", (int)S->active_decodes,
                      "used_blocks", (json_int_t)(S->n_held));
        /* the placed requests these figures count (scheduler/sent.c), the last few seconds';
         * none before the first ticket came (kvf-sched then takes the figures whole) */
        double now = kvfe__srv_now();
        while (S->n_acks && now - S->acks[S->ack_head].at > KVFE_ACK_KEEP_S) {
            S->ack_head = (S->ack_head + 1) % KVFE_ACKS;
            S->n_acks--;
        }
        json_t *tickets = S->ticketed ? json_array() : NULL;
        for (size_t i = 0; tickets && i < S->n_acks; i++)
            json_array_append_new(
                tickets, json_integer((json_int_t)S->acks[(S->ack_head + i) % KVFE_ACKS].ticket));
        if (tickets)
            json_object_set_new(body, "tickets", tickets);
        int n = S->n_scheds; /* the watcher may change the list: a copy of it now */
        memcpy(list, S->scheds, (size_t)n * sizeof list[0]);
        pthread_mutex_unlock(&S->mu);
        last = kvfe__srv_now();
        int again = 0;
        for (int i = 0; i < n; i++) {
            int was_down = 0;
            for (int k = 0; k < n_down && !was_down; k++)
                was_down = !strcmp(down[k], list[i]);
            char url[320];
            snprintf(url, sizeof url, "http://%.159s/v1/instances/%.63s/load", list[i], S->id);
            long status = 0;
            int rc = kvf__http_call_bearer("POST", url, body, kvf__sched_token(), 2000, &status,
                                           NULL, err, sizeof err);
            if (rc == 0 && status == 404) {
                kvf_warn(&S->lg,
                         "kvf-sched %s does not know this engine (expired, deleted, restarted "
                         "or new): registering",
                         list[i]);
                if (register_with_sched(S, list[i], 1, err, sizeof err) != 0)
                    kvf_warn(&S->lg, "registration with kvf-sched %s: %s", list[i], err);
                else
                    again = 1;
            } else if (rc != 0 || status != 200) {
                if (!was_down && n_down < KVFE_MAX_REPLICAS) {
                    kvf_warn(&S->lg, "load report to kvf-sched %s: %s", list[i],
                             status ? "refused" : err);
                    snprintf(down[n_down++], sizeof down[0], "%.159s", list[i]);
                }
                continue;
            }
            if (was_down) {
                kvf_info(&S->lg, "kvf-sched %s answers again", list[i]);
                for (int k = 0; k < n_down; k++)
                    if (!strcmp(down[k], list[i]))
                        memmove(down[k], down[--n_down], sizeof down[0]);
            }
        }
        json_decref(body);
        pthread_mutex_lock(&S->mu);
        S->report_dirty |= again;
    }
    pthread_mutex_unlock(&S->mu);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */

/* This host's CPUs as kvf-sched names shared compute ("cpu@" and the machine's id, else its
 * host name) into name, and how many this process may run on (kvf__cores). 0: unknown. */
static uint32_t host_compute(char *name, size_t len)
{
    char id[80] = "";
    FILE *f = fopen("/etc/machine-id", "r");
    if (f) {
        if (!fgets(id, sizeof id, f))
            id[0] = 0;
        fclose(f);
        id[strcspn(id, "\r\n")] = 0;
    }
    if (!id[0] && gethostname(id, sizeof id - 1) != 0)
        return 0;
    snprintf(name, len, "cpu@%s", id);
    return (uint32_t)kvf__cores();
}

/* This engine's registration record: POST /v1/instances' body, and its record in etcd. */
static json_t *registration(srv *S)
{
    kvf_caps caps;
    char *cj = kvf_caps_builtin("reference", &caps) == 0 ? kvf_caps_to_json(&caps) : NULL;
    json_t *cjo = cj ? json_loads(cj, 0, NULL) : NULL;
    free(cj);
    json_t *body =
        json_pack("{s:s,s:s,s:s,s:s,s:s,s:i,s:I}", "id", S->id, "role", S->role, "endpoint",
                  S->endpoint, "events", S->pub ? kvf_events_endpoint(S->pub) : "", "replay",
                  S->pub ? kvf_events_replay_endpoint(S->pub) : "", "block_tokens",
                  (int)S->m.layout.page_tokens, "capacity_blocks",
                  (json_int_t)(S->max_tokens / S->m.layout.page_tokens));
    if (cjo)
        json_object_set_new(body, "capabilities", cjo);
    if (S->zone[0])
        json_object_set_new(body, "zone", json_string(S->zone));
    /* the shards its events go out in, so that a kvf-sched replica split otherwise says so */
    if (S->pub)
        json_object_set_new(body, "event_shards", json_integer(S->event_shards));
    /* Its compute: this host's CPUs, which the engines started here share. */
    char compute[96];
    uint32_t slots = host_compute(compute, sizeof compute);
    if (slots) {
        json_object_set_new(body, "compute", json_string(compute));
        json_object_set_new(body, "compute_slots", json_integer(slots));
        json_object_set_new(body, "compute_uses", json_integer(kvfe_gemm_threads()));
    }
    return body;
}

static int register_with_sched(srv *S, const char *sched, int attempts, char *err, size_t errlen)
{
    json_t *body = registration(S);
    char url[256];
    snprintf(url, sizeof url, "http://%s/v1/instances", sched);
    long status = 0;
    json_t *reply = NULL;
    int rc = 0;
    for (int attempt = 0; attempt < attempts; attempt++) {
        json_decref(reply);
        reply = NULL;
        rc = kvf__http_call_bearer("POST", url, body, kvf__sched_token(), 2000, &status, &reply,
                                   err, errlen);
        if (rc == 0)
            break;
        usleep(100000); /* the scheduler may still be starting */
    }
    if (rc == 0 && status != 201 && status != 200) {
        json_t *e = json_object_get(reply, "error");
        snprintf(err, errlen, "kvf-sched %s refused the registration (HTTP %ld): %s", sched, status,
                 json_is_string(e) ? json_string_value(e) : "no reason given");
        rc = KVF_EINVAL;
    }
    json_decref(reply);
    json_decref(body);
    return rc;
}

static int split_addr(const char *spec, char *host, size_t hl, uint16_t *port, const char *what)
{
    if (kvf__addr_parse(spec, host, hl, port) != 0) {
        fprintf(stderr, "kvf-engine: %s: expected HOST:PORT, got \"%s\"\n", what, spec);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Starting and stopping */

#define PROCEED (-1) /* a step's answer when the server goes on; otherwise its exit status */

/* kvf-engine --serve's options as given; the strings are argv's. */
typedef struct serve_opts {
    const char *model, *listen, *advertise, *store, *events, *id, *role, *sched, *seed, *max_tokens,
        *level, *queue, *cost, *events_credential, *events_tenants, *tokens, *zone;
    int insecure;         /* --insecure: listen where clients are not loopback (docs/security.md) */
    int decide;           /* --decide: load or recompute per request from live rates */
    const char *prefetch; /* --prefetch on|off */
    const char *prefetch_memory; /* --prefetch-memory SIZE */
    const char *log_format;      /* --log-format text|json */
    const char *etcd, *cluster;  /* --etcd, --cluster: registered in etcd (docs/membership.md) */
    long event_shards;           /* --event-shards N: kvf-sched's index is split N ways */
    long etcd_ttl;
} serve_opts;

static int parse_args(int argc, char **argv, serve_opts *o)
{
    *o = (serve_opts){.model = "ref-tiny",
                      .listen = "127.0.0.1:0",
                      .id = "",
                      .role = "both",
                      .sched = "",
                      .cluster = "default",
                      .etcd_ttl = 5,
                      .seed = "1",
                      .max_tokens = "16384",
                      .level = "info",
                      .queue = "hrrn",
                      .prefetch = "on",
                      .prefetch_memory = "1G"};
    static const char *const roles[] = {"prefill", "decode", "both", NULL};
    static const char *const models[] = {"ref-tiny", "ref-100m", NULL};
    static const char *const queues[] = {"work", "hrrn", "fifo", NULL};
    static const char *const onoff[] = {"on", "off", NULL};
    static const char *const levels[] = {"debug", "info", "warn", "error", NULL};
    static const char *const formats[] = {"text", "json", NULL};
    int serve = 0;
    const kvf__arg args[] = {
        KVF__OPT("serve", KVF__ARG_FLAG, &serve, NULL, "this mode: serve kvf-engine's HTTP API",
                 NULL),
        KVF__OPT("id", KVF__ARG_STR, &o->id, "ID", "this engine's name at kvf-sched (required)",
                 NULL),
        KVF__OPT("role", KVF__ARG_CHOICE, &o->role, "R", "what it serves", "both",
                 .choices = roles),
        KVF__OPT("listen", KVF__ARG_STR, &o->listen, "HOST:PORT", "the HTTP API", "127.0.0.1:0"),
        KVF__OPT("advertise", KVF__ARG_STR, &o->advertise, "HOST:PORT",
                 "the address kvf-sched gives routers", "--listen"),
        KVF__OPT("zone", KVF__ARG_STR, &o->zone, "ZONE",
                 "this engine's zone (a rack, an availability zone), registered with kvf-sched: "
                 "its loads are planned from a replica on its host, then in its zone",
                 NULL),
        KVF__OPT("sched", KVF__ARG_STR, &o->sched, "HOST:PORT[,...]",
                 "register with kvf-sched and report load to it (several replicas: each)", NULL),
        KVF__OPT("store", KVF__ARG_STR, &o->store, "HOST:PORT[,...]",
                 "the storage nodes (without it, those kvf-sched lists)", NULL),
        KVF__OPT("events", KVF__ARG_STR, &o->events, "HOST:PORT",
                 "publish KV events (vLLM's format) for kvf-sched", NULL),
        KVF__OPT("events-credential", KVF__ARG_STR, &o->events_credential, "FILE",
                 "secure --events with CURVE under this credential (docs/security.md)", NULL),
        KVF__OPT("events-tenants", KVF__ARG_STR, &o->events_tenants, "FILE",
                 "the keys that may subscribe to --events", NULL),
        KVF__OPT("event-shards", KVF__ARG_LONG, &o->event_shards, "N",
                 "publish each sequence's events under its shard's topic, for kvf-sched replicas "
                 "run with --shard K/N (docs/scale.md); 1: not sharded",
                 "1", .lo = 1, .hi = KVF_EVENTS_MAX_SHARDS),
        KVF__OPT("model", KVF__ARG_CHOICE, &o->model, "PRESET", "the reference model", "ref-tiny",
                 .choices = models),
        KVF__OPT("max-tokens", KVF__ARG_STR, &o->max_tokens, "N",
                 "KV capacity in tokens, 256..1048576", "16384"),
        KVF__OPT("queue", KVF__ARG_CHOICE, &o->queue, "ORDER",
                 "the queue's order: work, least remaining work first; hrrn, highest response "
                 "ratio (work's order, aged by each request's wait); fifo, arrival",
                 "hrrn", .choices = queues),
        KVF__OPT("cost", KVF__ARG_STR, &o->cost, "FILE",
                 "the calibration the queue's estimates use (kvf-engine --calibrate)", NULL),
        KVF__OPT("decide", KVF__ARG_FLAG, &o->decide, NULL,
                 "choose per request between loading and recomputing, from live rates", NULL),
        KVF__OPT("prefetch", KVF__ARG_CHOICE, &o->prefetch, "on|off",
                 "fetch a waiting request's prefix early", "on", .choices = onoff),
        KVF__OPT("prefetch-memory", KVF__ARG_STR, &o->prefetch_memory, "SIZE",
                 "what the waiting prefetches may hold", "1G"),
        KVF__OPT("tokens", KVF__ARG_STR, &o->tokens, "FILE",
                 "bearer tokens of the HTTP API (\"NAME TOKEN\" lines)", NULL),
        KVF__OPT("seed", KVF__ARG_STR, &o->seed, "S", "the model's weights' seed", "1"),
        KVF__MEMBER_OPTS(&o->etcd, &o->cluster, &o->etcd_ttl,
                         "register under a lease, so that every kvf-sched replica following the "
                         "cluster learns this engine and drops it when it dies"),
        KVF__OPT("insecure", KVF__ARG_FLAG, &o->insecure, NULL,
                 "listen beyond loopback without --tokens (docs/security.md)", NULL),
        KVF__OPT("log-level", KVF__ARG_CHOICE, &o->level, "LEVEL", "what it logs", "info",
                 .choices = levels),
        KVF__OPT("log-format", KVF__ARG_CHOICE, &o->log_format, "FORMAT",
                 "text, or json (one object a line)", "text", .choices = formats),
    };
    const kvf__args_spec spec = {
        .prog = "kvf-engine --serve",
        .synopsis = "--id ID [--role prefill|decode|both] [OPTIONS]",
        .summary = "The reference engine's HTTP API (docs/operations.md, \"The engine's serving "
                   "mode\"): registers with kvf-sched, serves prefill and decode with kvfabric.",
        .epilog = "exit status: 0 stopped by a signal, 1 a failure (said on stderr), 2 a usage "
                  "error",
        .args = args,
        .n = sizeof args / sizeof args[0],
        .max_positional = 0,
    };
    int rc = kvf__args_parse(&spec, argc, argv, NULL);
    return rc == KVF__ARGS_GO_ON ? PROCEED : rc;
}

/* The queue's order and the cost constants its work estimates use (the calibration file kvf
 * cluster writes for kvf-sched, when given). */
static int configure_queue(srv *S, const char *queue, const char *cost)
{
    kvf_sched_cost_defaults(&S->qcost);
    if (cost) {
        char cerr[300];
        if (kvf_sched_cost_load(cost, &S->qcost, cerr, sizeof cerr) != 0) {
            fprintf(stderr, "kvf-engine: --cost: %s\n", cerr);
            return 2;
        }
    }
    if (!strcmp(queue, "fifo")) {
        S->qcost.klpm_k = 0;
        S->queue = KVF_QUEUE_FIFO;
    } else if (!strcmp(queue, "hrrn")) {
        S->queue = S->qcost.klpm_k < 2 ? KVF_QUEUE_FIFO : KVF_QUEUE_HRRN;
    } else if (!strcmp(queue, "work")) {
        S->queue = kvf_sched_cost_queue(&S->qcost); /* the cost file may name lpm or fifo */
    } else {
        fprintf(stderr, "kvf-engine: --queue must be work, hrrn or fifo\n");
        return 2;
    }
    return PROCEED;
}

/* Checks the options and takes the server's identity, capacity, queue rule, model and listening
 * address from them. */
static int configure(srv *S, const serve_opts *o)
{
    if (o->log_format && kvf__log_format_parse(o->log_format, &S->lg.format) != 0) {
        fprintf(stderr, "kvf-engine: --log-format: expected text or json, not \"%s\"\n",
                o->log_format);
        return 2;
    }
    if (kvf__log_level_parse(o->level, &S->lg.level) != 0) {
        fprintf(stderr, "kvf-engine: --log-level %s: expected debug, info, warn or error\n",
                o->level);
        return 2;
    }
    if (!o->id || !kvf__member_zone_valid(o->id)) { /* kvf-sched's rule for an instance id */
        fprintf(stderr, "kvf-engine: --id: 1 to 63 of [A-Za-z0-9._-], got \"%s\"\n",
                o->id ? o->id : "");
        return 2;
    }
    snprintf(S->id, sizeof S->id, "%s", o->id);
    snprintf(S->role, sizeof S->role, "%s", o->role);
    if (o->zone && kvf__member_zone_check("kvf-engine", "--zone", o->zone) != 0)
        return 2;
    snprintf(S->zone, sizeof S->zone, "%s", o->zone ? o->zone : "");
    snprintf(S->sched, sizeof S->sched, "%s", o->sched);
    for (const char *p = S->sched; *p;) {
        size_t k = strcspn(p, ",");
        if (k == 0 || k >= sizeof S->scheds[0] || S->n_scheds == KVFE_MAX_SCHEDS) {
            fprintf(stderr, "kvf-engine: --sched: 1 to %d HOST:PORT, comma-separated, got \"%s\"\n",
                    KVFE_MAX_SCHEDS, o->sched);
            return 2;
        }
        snprintf(S->scheds[S->n_scheds++], sizeof S->scheds[0], "%.*s", (int)k, p);
        p += k + (p[k] == ',');
    }
    S->n_given = S->n_scheds;
    long max_tokens = strtol(o->max_tokens, NULL, 10);
    if (!S->id[0] ||
        (strcmp(S->role, "prefill") && strcmp(S->role, "decode") && strcmp(S->role, "both"))) {
        fprintf(stderr, "kvf-engine --serve: --id and --role prefill|decode|both are required\n");
        return 2;
    }
    if (max_tokens < 256 || max_tokens > 1 << 20) {
        fprintf(stderr, "kvf-engine: --max-tokens must be 256..1048576\n");
        return 2;
    }
    S->max_tokens = (uint32_t)max_tokens;
    if (strcmp(o->prefetch, "on") && strcmp(o->prefetch, "off")) {
        fprintf(stderr, "kvf-engine: --prefetch must be on or off\n");
        return 2;
    }
    S->prefetch = !strcmp(o->prefetch, "on");
    if (kvf__parse_size(o->prefetch_memory, &S->prefetch_max) != 0) {
        fprintf(stderr, "kvf-engine: --prefetch-memory: a size such as 512M or 4G\n");
        return 2;
    }
    int rc = configure_queue(S, o->queue, o->cost);
    if (rc != PROCEED)
        return rc;
    snprintf(S->model, sizeof S->model, "%s", o->model);
    if (kvfe_model_preset(o->model, &S->m) != 0) {
        fprintf(stderr, "kvf-engine: unknown model %s\n", o->model);
        return 2;
    }
    /* With --tokens every request but GETs is authenticated, as kvf-sched's are. */
    if (split_addr(o->listen, S->host, sizeof S->host, &S->port, "--listen") != 0 ||
        kvf__listen_policy("kvf-engine", "--listen", S->host,
                           o->tokens ? KVF_LISTEN_AUTHENTICATED : o->insecure) != 0)
        return 2;
    if (!o->events_credential != !o->events_tenants) {
        fprintf(stderr, "kvf-engine: --events-credential and --events-tenants go together\n");
        return 2;
    }
    if (kvf__listen_policy_addr("kvf-engine", "--events", o->events,
                                o->events_credential ? KVF_LISTEN_AUTHENTICATED : o->insecure) != 0)
        return 2;
    return PROCEED;
}

/* Opens the connector (to the stores given, or to the ones registered in etcd, or to the ones
 * kvf-sched lists; none without any) and the engine over it. Returns 0 or the exit status. */
static int open_engine(srv *S, const serve_opts *o)
{
    char err[512];
    if (o->store || S->sched[0] || o->etcd) {
        char *dup = o->store ? strdup(o->store) : NULL, *nodes[64];
        size_t n_nodes = 0;
        for (char *sv = NULL, *t = dup ? strtok_r(dup, ",", &sv) : NULL; t && n_nodes < 64;
             t = strtok_r(NULL, ",", &sv))
            nodes[n_nodes++] = t;
        kvf_connector_opts co = {.nodes = (const char *const *)nodes,
                                 .n_nodes = n_nodes,
                                 .sched = S->sched[0] ? S->sched : NULL,
                                 .etcd = o->store ? NULL : o->etcd,
                                 .cluster = o->cluster,
                                 .layout = S->m.layout};
        int rc = kvf_connector_open(&S->cn, &co, err, sizeof err);
        free(dup);
        if (rc == KVF_ECONNREFUSED && co.etcd && !co.sched) {
            /* an engine of an etcd cluster that has no store yet serves on, recomputing */
            kvf_warn(&S->lg, "%s: serving without stores", err);
        } else if (rc) {
            fprintf(stderr, "kvf-engine: %s\n", err);
            return 1;
        }
    }
    kvfe_opts eo = {.model = o->model,
                    .seed = strtoull(o->seed, NULL, 10),
                    .max_tokens = S->max_tokens,
                    .cn = S->cn,
                    .save = 1,
                    .page_shuffle = 99,
                    .keep_prefix = 1,
                    .decide = o->decide};
    if (kvfe_open(&S->e, &eo, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: %s\n", err);
        kvf_connector_close(&S->cn);
        return 1;
    }
    return 0;
}

/* The KV events publisher on --events, when given, secured by --events-credential. */
static int open_events(srv *S, const serve_opts *o)
{
    char err[512], host[128], replay[160];
    uint16_t port;
    if (!o->events)
        return 0;
    /* A replay socket beside it (a free port on the same address): kvf-sched asks it for the
     * batches it missed, joining late or after a gap. */
    if (split_addr(o->events, host, sizeof host, &port, "--events") != 0)
        return 2;
    snprintf(replay, sizeof replay, strchr(host, ':') ? "[%s]:0" : "%s:0", host);
    kvf_events_opts eo = {.listen = o->events,
                          .credential = o->events_credential,
                          .tenants = o->events_tenants,
                          .replay = replay,
                          .shards = (uint32_t)o->event_shards};
    if (kvf_events_open(&S->pub, &eo, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: --events %s: %s\n", o->events, err);
        return 1;
    }
    S->event_shards = o->event_shards > 1 ? (uint32_t)o->event_shards : 1;
    return 0;
}

/* Serves HTTP on the listening address, requiring one of tokens (may be NULL: none) of every
 * request but GETs; S->endpoint gets --advertise, or the address bound. */
static int start_http(srv *S, const char *advertise, const kvf__http_tokens *tokens,
                      kvf__httpd **httpd, uint16_t *bound)
{
    char err[512];
    uint64_t body = BODY_BASE + (uint64_t)BODY_PER_TOKEN * S->max_tokens;
    if (kvf__httpd_start(httpd, S->host, S->port, 1, body < MAX_BODY ? (size_t)body : MAX_BODY,
                         kvfe__srv_request, S, bound, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: %s\n", err);
        return 1;
    }
    kvf__httpd_tokens(*httpd, tokens); /* before the ready line: no request can come sooner */
    if (advertise)
        snprintf(S->endpoint, sizeof S->endpoint, "%s", advertise);
    else
        snprintf(S->endpoint, sizeof S->endpoint, "%s:%u", S->host, (unsigned)*bound);
    return 0;
}

/* Tells the waiting requests and the reporter that the server stops. */
static void stop_serving(srv *S)
{
    pthread_mutex_lock(&S->mu);
    atomic_store(&S->stop, 1);
    pthread_cond_broadcast(&S->cv);
    pthread_cond_broadcast(&S->report_cv);
    pthread_mutex_unlock(&S->mu);
}

/* Says the server is ready (the line kvf cluster waits for) and serves until SIGTERM or SIGINT. */
static int serve_until_signal(srv *S, uint16_t bound)
{
    if (kvf__daemon_signals(on_signal, NULL) != 0) {
        fprintf(stderr, "kvf-engine: cannot start the signal thread\n");
        return 1;
    }
    printf("kvf-engine ready listen=%s:%u id=%s role=%s model=%s events=%s cache_layer=%s "
           "pid=%d\n",
           S->host, (unsigned)bound, S->id, S->role, S->model,
           S->pub ? kvf_events_endpoint(S->pub) : "-", S->cn ? "on" : "off", (int)getpid());
    fflush(stdout);
    kvf_info(&S->lg, "serving %s as %s on %s:%u", S->model, S->role, S->host, (unsigned)bound);
    kvf__notify_ready(&S->lg, "serving");
    while (!atomic_load(&g_stop))
        usleep(50000);
    kvf__notify_stopping();
    kvf_info(&S->lg, "stopping");
    return 0;
}

/* Registers /kvfabric/CLUSTER/engines/ID = this engine's registration record under a lease
 * (exclusive: waiting two TTLs for a previous incarnation's lease to lapse). 0, or 1 after
 * saying why. */
static int register_in_etcd(srv *S, const serve_opts *o, kvf__member **m)
{
    if (kvf__member_cluster_check("kvf-engine", o->cluster) != 0)
        return 2;
    json_t *rec = registration(S);
    char *value = rec ? json_dumps(rec, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(rec);
    char key[256], err[600] = "";
    snprintf(key, sizeof key, "/kvfabric/%s/engines/%s", o->cluster, S->id);
    kvf__member_opts mo = {.endpoints = o->etcd,
                           .key = key,
                           .value = value ? value : "{}",
                           .ttl_s = (int)o->etcd_ttl,
                           .exclusive = 1,
                           .wait_ms = 2 * (int)o->etcd_ttl * 1000 + 1000,
                           .log = &S->lg};
    int rc = kvf__member_start(m, &mo, err, sizeof err);
    free(value);
    if (rc) {
        fprintf(stderr, "kvf-engine: --etcd: %s\n", err);
        return 1;
    }
    return 0;
}

/* A kvf-sched replica's registration (/kvfabric/CLUSTER/scheds/ADDR, record {"addr"}) came or
 * went: the watcher's thread. One that comes is reported to from then on (and registered with,
 * when its first report is answered 404); one that goes is no longer, unless --sched named it. */
static void on_replica(void *ud, int put, const char *key, const char *value)
{
    srv *S = ud;
    const char *addr = strrchr(key, '/');
    addr = addr ? addr + 1 : key;
    if (put) {
        json_t *o = json_loads(value, 0, NULL);
        const char *a = json_string_value(json_object_get(o, "addr"));
        int same = a && !strcmp(a, addr);
        json_decref(o);
        if (!same || strlen(addr) >= sizeof S->scheds[0]) {
            kvf_warn(&S->lg, "etcd: %s: not a kvf-sched record; ignored", key);
            return;
        }
    }
    pthread_mutex_lock(&S->mu);
    int at = -1;
    for (int i = 0; i < S->n_scheds && at < 0; i++)
        if (!strcmp(S->scheds[i], addr))
            at = i;
    if (put && at < 0 && S->n_scheds < KVFE_MAX_REPLICAS) {
        snprintf(S->scheds[S->n_scheds++], sizeof S->scheds[0], "%s", addr);
        S->report_dirty = 1;
        pthread_cond_broadcast(&S->report_cv);
        kvf_info(&S->lg, "etcd: kvf-sched %s joined: load reported there too", addr);
    } else if (!put && at >= S->n_given) {
        memmove(S->scheds[at], S->scheds[at + 1],
                (size_t)(S->n_scheds - at - 1) * sizeof S->scheds[0]);
        S->n_scheds--;
        kvf_info(&S->lg, "etcd: kvf-sched %s left", addr);
    }
    pthread_mutex_unlock(&S->mu);
}

/* Follows /kvfabric/CLUSTER/scheds/. 0, or 1 after saying why. */
static int watch_replicas(srv *S, const serve_opts *o, kvf__watcher **w)
{
    char prefix[300], err[600] = "";
    snprintf(prefix, sizeof prefix, "/kvfabric/%s/scheds/", o->cluster);
    if (kvf__watcher_start(w, o->etcd, prefix, on_replica, S, &S->lg, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: --etcd: watching the kvf-sched replicas: %s\n", err);
        return 1;
    }
    return 0;
}

int kvfe_serve_main(int argc, char **argv)
{
    static srv S;
    serve_opts o;
    kvf__httpd *httpd = NULL;
    uint16_t bound = 0;
    pthread_t reporter;
    int have_reporter = 0;
    kvf__http_tokens *tokens = NULL;
    char terr[300];
    S.lg = (kvf_log){.level = KVF_LOG_INFO, .name = "kvf-engine"};
    int rc = parse_args(argc, argv, &o);
    if (rc == PROCEED)
        rc = configure(&S, &o);
    if (rc != PROCEED)
        return rc;
    kvf__daemon_block_signals(); /* before the first thread */
    rc = open_engine(&S, &o);
    if (rc)
        return rc;
    pthread_mutex_init(&S.mu, NULL);
    pthread_cond_init(&S.cv, NULL);
    pthread_cond_init(&S.report_cv, NULL);
    if (kvfe__srv_metrics_open(&S) != 0) {
        fprintf(stderr, "kvf-engine: out of memory\n");
        rc = 1;
        goto out_close_events;
    }
    /* the connector's per-layer timing in the same registry (no transfer runs yet) */
    S.metrics_pub = kvf__metrics_wrap(S.metrics);
    if (S.cn && (!S.metrics_pub || kvf_connector_set_metrics(S.cn, S.metrics_pub) != 0)) {
        fprintf(stderr, "kvf-engine: the connector's metrics: out of memory\n");
        rc = 1;
        goto out_close_events;
    }
    rc = open_events(&S, &o);
    if (rc)
        goto out_close_events;
    if (o.tokens && kvf__http_tokens_load(&tokens, o.tokens, terr, sizeof terr) != 0) {
        fprintf(stderr, "kvf-engine: --tokens: %s\n", terr);
        rc = 2;
        goto out_close_events;
    }
    rc = start_http(&S, o.advertise, tokens, &httpd, &bound);
    if (rc)
        goto out_close_events;
    if (S.sched[0]) {
        /* with every replica: at least one must take it (the others are tried again by the
         * reporter, whose reports they answer with 404 until then) */
        char err[512];
        int took = 0;
        for (int i = 0; i < S.n_scheds; i++) {
            if (register_with_sched(&S, S.scheds[i], 50, err, sizeof err) == 0)
                took++;
            else if (S.n_scheds > 1)
                kvf_warn(&S.lg, "%s", err);
        }
        if (!took) {
            fprintf(stderr, "kvf-engine: %s\n", err);
            rc = 1;
            goto out_stop_http;
        }
    }
    kvf__member *member = NULL;
    kvf__watcher *replicas = NULL;
    if (o.etcd && ((rc = register_in_etcd(&S, &o, &member)) != 0 ||
                   (rc = watch_replicas(&S, &o, &replicas)) != 0))
        goto out_stop_member;
    /* the load reports: to the --sched replicas, and with --etcd to those registered there */
    if (S.sched[0] || o.etcd)
        have_reporter = pthread_create(&reporter, NULL, reporter_main, &S) == 0;
    rc = serve_until_signal(&S, bound);
out_stop_member:
    kvf__watcher_stop(&replicas);
    kvf__member_stop(&member); /* revoked: the replicas remove this engine now */
out_stop_http:
    stop_serving(&S);
    kvf__httpd_stop(&httpd);
    if (have_reporter)
        pthread_join(reporter, NULL);
out_close_events:
    kvf__http_tokens_free(&tokens);
    kvf_events_close(&S.pub);
    kvfe_close(&S.e);
    kvf_connector_close(&S.cn);
    kvf_metrics_free(&S.metrics_pub);
    free(S.held);
    free(S.wait), free(S.pick_cached), free(S.pick_work), free(S.pick_waited);
    kvf__metrics_free(&S.metrics);
    if (!rc)
        kvf_info(&S.lg, "stopped after %llu requests", (unsigned long long)S.requests);
    return rc;
}
