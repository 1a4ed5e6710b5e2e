/*
 * kvf-engine's serving mode: the reference engine behind HTTP/JSON, registered with kvf-sched,
 * publishing its KV events, and moving KV through the connector (docs/operations.md).
 *
 *   kvf-engine --serve --id ID --role prefill|decode|both [--listen HOST:PORT]
 *              [--advertise HOST:PORT] [--sched HOST:PORT] [--store HOST:PORT[,...]]
 *              [--events HOST:PORT] [--model M] [--seed S] [--max-tokens N] [--log-level L]
 *              [--events-credential FILE --events-tenants FILE] [--tokens FILE]
 *              [--insecure: allow --listen/--events on an address that is not loopback]
 *              [--queue work|fifo] [--cost FILE] [--decide: load or recompute per request]
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
 * reuse (prefill and generate): true (the default) reuses the engine's pages and the stores and
 * saves to the stores; "engine" reuses the engine's own pages only (an engine with its prefix
 * cache on, without kvfabric: no store is asked, loaded from or saved to); false reuses nothing.
 *   GET /v1/health                                 id, role, queue and connector figures
 *
 * One sequence runs at a time (the reference engine has one); waiting requests are taken by
 * kvf-sched's queue rule (kvf_sched_queue_pick: the least uncached work among the oldest, every
 * k-th pick the oldest; --queue fifo keeps arrival order), and the queue is reported to kvf-sched
 * as the engine's load. The KV of the last sequence stays in
 * the engine's pages: a prompt that starts with it keeps those chunks (device tier), and the
 * events say so: BlockStored for a new sequence's blocks, BlockRemoved for the blocks it replaced,
 * in vLLM's format (ZeroMQ PUB, [topic, 8-byte big-endian sequence, msgpack [ts, events, 0]]).
 */
#include "engine.h"
#include "serve.h"

#include "auth.h"
#include "clock.h"
#include "cpus.h"
#include "errf.h"
#include "http.h"
#include "kvf/events.h"
#include "kvf/kvf.h"
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

#define MAX_BODY       (64u << 20)
#define REPORT_EVERY_S 5.0 /* the longest time between two load reports (heartbeats) */

typedef struct srv {
    kvfe_model m;
    kvfe_engine *e;
    kvf_connector *cn;
    kvf_log lg;
    char id[64], role[16], model[32], sched[160], endpoint[160];
    char host[128]; /* --listen's */
    uint16_t port;
    uint32_t max_tokens;
    /* The waiting queue: the engine runs one job at a time, chosen by kvf_sched_queue_pick (the
     * least remaining work among the oldest klpm_k, every klpm_k-th pick the oldest) or in
     * arrival order (--queue fifo). Oldest first. */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct waiter {
        uint64_t id;
        size_t cached;
        double work_s;
    } * wait;
    size_t n_wait, cap_wait;
    size_t *pick_cached; /* kvf_sched_queue_pick's arguments, cap_wait long */
    double *pick_work;
    uint64_t next_id, running; /* the job holding the engine (0: none) */
    uint64_t picks;
    kvf_sched_cost qcost;
    int prefetch; /* fetch a waiting request's cached prefix while it waits (--prefetch) */
    uint64_t prefetch_max, prefetch_held; /* bytes the waiting requests' prefetches may hold
                                           * (--prefetch-memory), and hold now */
    double queued_prefill_tokens;
    /* The same queue in the cost model's seconds (each job's work, as the queue orders it), and
     * the running job's share of it with when it started: reported to kvf-sched, whose
     * placements then price each waiting prompt's attention, which tokens alone do not. */
    double queued_work_s, running_work_s, running_since;
    uint32_t active_decodes;
    uint64_t requests, failures, first_token_mismatches;
    double busy_s;
    /* load reports to kvf-sched, sent by their own thread */
    pthread_cond_t report_cv;
    int report_dirty;
    /* KV events (under the engine's turn: only the running request publishes) */
    kvf_events *pub;
    uint64_t *held; /* engine block hashes of the blocks in the pages */
    size_t n_held;
    atomic_int stop;
} srv;

static atomic_int g_stop;

static void on_signal(int sig)
{
    (void)sig;
    atomic_store(&g_stop, 1);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------------------------------ */
/* Load reports */

static void mark_dirty_locked(srv *S)
{
    S->report_dirty = 1;
    pthread_cond_signal(&S->report_cv);
}

static int register_with_sched(srv *S, char *err, size_t errlen);

/* Sends the load whenever it changes, and at least every REPORT_EVERY_S seconds: kvf-sched
 * removes an instance it has not heard from within its --instance-ttl (30 s unless set), so an
 * idle engine's unchanged reports are its heartbeat. When kvf-sched answers 404 (it expired or
 * deleted this engine, or restarted), the engine registers again and reports at once. */
static void *reporter_main(void *arg)
{
    srv *S = arg;
    char url[256], err[256];
    snprintf(url, sizeof url, "http://%s/v1/instances/%s/load", S->sched, S->id);
    double last = now_s();
    pthread_mutex_lock(&S->mu);
    while (!atomic_load(&S->stop)) {
        if (!S->report_dirty && now_s() - last < REPORT_EVERY_S) {
            kvf__cond_wait_ms(&S->report_cv, &S->mu, 200);
            continue;
        }
        S->report_dirty = 0;
        double done_s = S->running_work_s > 0 ? now_s() - S->running_since : 0;
        done_s = done_s < S->running_work_s ? done_s : S->running_work_s;
        double queued_s = S->queued_work_s - done_s;
        json_t *body =
            json_pack("{s:f,s:f,s:i,s:I}", "queued_prefill_tokens", S->queued_prefill_tokens,
                      "queued_prefill_s", queued_s > 0 ? queued_s : 0, "active_decodes",
                      (int)S->active_decodes, "used_blocks", (json_int_t)(S->n_held));
        pthread_mutex_unlock(&S->mu);
        last = now_s();
        long status = 0;
        int again = 0;
        if (kvf__http_call_bearer("POST", url, body, kvf__sched_token(), 2000, &status, NULL, err,
                                  sizeof err) == 0 &&
            status == 404) {
            kvf_warn(&S->lg, "kvf-sched does not know this engine (expired, deleted or "
                             "restarted): registering again");
            if (register_with_sched(S, err, sizeof err) != 0)
                kvf_warn(&S->lg, "registration with kvf-sched: %s", err);
            else
                again = 1;
        } else if (status != 200) {
            kvf_warn(&S->lg, "load report to kvf-sched: %s", status ? "refused" : err);
        }
        json_decref(body);
        pthread_mutex_lock(&S->mu);
        S->report_dirty |= again;
    }
    pthread_mutex_unlock(&S->mu);
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* KV events */

/* Publishes what the pages hold now that they hold tokens[0..n): the blocks of the previous
 * sequence that differ are removed, the new ones stored. Only the running request calls it. */
static void publish_blocks(srv *S, const uint32_t *tokens, size_t n)
{
    uint32_t P = S->m.layout.page_tokens;
    size_t nb = n / P;
    uint64_t *nh = malloc((nb ? nb : 1) * sizeof *nh);
    if (!nh)
        return;
    kvf_events_hash_blocks(tokens, nb, P, 0, nh);
    size_t common = 0;
    while (common < nb && common < S->n_held && nh[common] == S->held[common])
        common++;
    if (S->pub && (common < S->n_held || common < nb))
        kvf_events_publish(S->pub, S->held + common, S->n_held - common, nh + common, nb - common,
                           common > 0, common ? nh[common - 1] : 0, tokens + common * P, P, "GPU");
    pthread_mutex_lock(&S->mu); /* n_held goes into the load reports */
    free(S->held);
    S->held = nh;
    S->n_held = nb;
    pthread_mutex_unlock(&S->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* Requests */

/* What a request may reuse: the tiers of kvfe_set_tiers(). */
typedef enum reuse_mode { REUSE_NONE, REUSE_ENGINE, REUSE_ALL } reuse_mode;

typedef struct job {
    const char *kind; /* prefill, decode, generate */
    uint32_t *tokens;
    size_t n;
    uint32_t max_tokens, first_token, expect_cached;
    int has_first;
    reuse_mode reuse;
    double load_deadline_ms; /* the plan's (0: none): the prefetch is used as far as it arrived
                              * this long after the request did */
    kvf_prefetch *pf;        /* the cached prefix, fetched while the job waits (NULL: none) */
    uint64_t pf_bytes;       /* what it holds, counted in srv.prefetch_held */
    uint64_t deadline_ns;
} job;

/* The "reuse" field: absent or true, false, or "engine". Returns 0, or -1 for any other value. */
static int parse_reuse(json_t *ru, reuse_mode *out)
{
    *out = !ru || json_is_true(ru) ? REUSE_ALL : REUSE_NONE;
    if (json_is_string(ru) && !strcmp(json_string_value(ru), "engine"))
        *out = REUSE_ENGINE;
    return !ru || json_is_boolean(ru) || *out == REUSE_ENGINE ? 0 : -1;
}

/* Reads the body into a job. Returns 0 or an HTTP status with *reply set. */
static unsigned parse_job(srv *S, json_t *o, job *j, kvf__http_reply *reply)
{
    json_t *t = json_object_get(o, "tokens");
    if (!json_is_array(t) || json_array_size(t) == 0) {
        reply->json = kvf__http_error("\"tokens\" must be a non-empty array of token ids");
        return 400;
    }
    j->n = json_array_size(t);
    json_t *mt = json_object_get(o, "max_tokens"), *ft = json_object_get(o, "first_token"),
           *ec = json_object_get(o, "expect_cached"), *ru = json_object_get(o, "reuse"),
           *dl = json_object_get(o, "load_deadline_ms");
    if ((mt && !json_is_integer(mt)) || (ft && !json_is_integer(ft)) ||
        (ec && !json_is_integer(ec)) || parse_reuse(ru, &j->reuse) != 0 ||
        (dl &&
         (!json_is_number(dl) || !(json_number_value(dl) >= 0) || json_number_value(dl) > 3.6e6))) {
        reply->json = kvf__http_error("max_tokens, first_token and expect_cached are integers, "
                                      "reuse true, false or \"engine\", load_deadline_ms a "
                                      "number of milliseconds 0..3600000");
        return 400;
    }
    j->load_deadline_ms = dl ? json_number_value(dl) : 0;
    j->max_tokens = mt ? (uint32_t)json_integer_value(mt) : 1;
    j->has_first = ft != NULL;
    j->first_token = ft ? (uint32_t)json_integer_value(ft) : 0;
    j->expect_cached = ec ? (uint32_t)json_integer_value(ec) : 0;
    if (mt && (json_integer_value(mt) < 1 || json_integer_value(mt) > 1 << 20)) {
        reply->json = kvf__http_error("max_tokens must be 1..1048576");
        return 400;
    }
    if (j->n + j->max_tokens + 1 > S->max_tokens) {
        reply->json = kvf__http_error("prompt of %zu tokens + %u to generate exceed this engine's "
                                      "KV capacity of %u tokens (--max-tokens)",
                                      j->n, j->max_tokens, S->max_tokens);
        return 413;
    }
    j->tokens = malloc(j->n * sizeof *j->tokens);
    if (!j->tokens) {
        reply->json = kvf__http_error("out of memory");
        return 500;
    }
    for (size_t i = 0; i < j->n; i++) {
        json_t *v = json_array_get(t, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > UINT32_MAX) {
            free(j->tokens);
            j->tokens = NULL;
            reply->json = kvf__http_error("tokens[%zu] is not a 32-bit token id", i);
            return 400;
        }
        j->tokens[i] = (uint32_t)json_integer_value(v);
    }
    return 0;
}

/* The decode half's handoff: the prefill's save may still be landing; wait (bounded) until the
 * stores hold what it announced (the job then loads whatever is there). Called before the job
 * queues for the engine, so that the engine serves others while the chunks land. */
static double await_handoff(srv *S, const job *j, size_t *cached)
{
    double t0 = now_s();
    *cached = 0;
    if (!S->cn || !j->expect_cached)
        return 0;
    for (int i = 0; i < 400; i++) {
        if (kvf_connector_lookup(S->cn, j->tokens, j->n, cached) == 0 &&
            *cached >= j->expect_cached)
            break;
        usleep(i < 20 ? 500 : 5000);
    }
    return now_s() - t0;
}

/* Decodes greedily after first until toks holds max_tokens tokens, appending each step's time to
 * itl; a step that fails ends the sequence there. Returns the decode time. */
static double decode_rest(srv *S, uint32_t first, uint32_t max_tokens, json_t *toks, json_t *itl)
{
    double decode_s = 0;
    uint32_t last = first;
    for (uint32_t g = 1; g < max_tokens; g++) {
        kvfe_result d;
        if (kvfe_decode(S->e, last, &d) != 0)
            break;
        last = d.next_token;
        json_array_append_new(toks, json_integer(last));
        json_array_append_new(itl, json_real(d.seconds));
        decode_s += d.seconds;
    }
    return decode_s;
}

static json_t *run_job(srv *S, const job *j, double queue_s, double handoff_s)
{
    kvf_connector_stats st0, st1;
    if (S->cn)
        kvf_connector_stats_get(S->cn, &st0);
    int is_prefill = !strcmp(j->kind, "prefill"), is_decode = !strcmp(j->kind, "decode");
    /* A decode loads what its prefill saved and saves nothing itself. */
    int stores = j->reuse == REUSE_ALL && S->cn != NULL;
    int saving = stores && !is_decode;
    kvfe_set_tiers(S->e, j->reuse != REUSE_NONE, stores, saving);
    kvfe_result r;
    int rc = j->pf && stores
                 ? kvfe_prefill_prefetched(S->e, j->tokens, j->n, j->pf, j->deadline_ns, &r)
                 : kvfe_prefill(S->e, j->tokens, j->n, &r);
    if (rc)
        return kvf__http_error("prefill: %s", kvf_strerror(rc));
    publish_blocks(S, j->tokens, j->n);
    /* The first token: the prefill's own, or for a decode the one the prefill engine chose
     * (this engine computed it again from the handed-off KV: they must agree). */
    int mismatch = is_decode && j->has_first && r.next_token != j->first_token;
    uint32_t last = is_decode && j->has_first ? j->first_token : r.next_token;
    json_t *toks = json_array(), *itl = json_array();
    json_array_append_new(toks, json_integer(last));
    double decode_s = is_prefill ? 0 : decode_rest(S, last, j->max_tokens, toks, itl);
    if (S->cn)
        kvf_connector_stats_get(S->cn, &st1);
    uint32_t C = S->m.layout.chunk_tokens;
    json_t *out = json_pack(
        "{s:s,s:s,s:o,s:o,s:I,s:I,s:I,s:I,s:f,s:f,s:f,s:f,s:f,s:f,s:s,s:b,s:s}", "engine", S->id,
        "kind", j->kind, "tokens", toks, "itl_s", itl, "prompt_tokens", (json_int_t)j->n,
        "device_tokens", (json_int_t)r.device_tokens, "loaded_tokens", (json_int_t)r.loaded_tokens,
        "saved_tokens", (json_int_t)(saving ? j->n / C * C : 0), "queue_s", queue_s, "prefill_s",
        r.seconds, "compute_s", r.compute_seconds, "wait_s", r.wait_seconds, "decode_s", decode_s,
        "handoff_s", handoff_s, "load_error", kvf_err_name(r.load_error), "first_token_mismatch",
        mismatch, "label", "real");
    if (S->cn) {
        json_object_set_new(out, "load_bytes",
                            json_integer((json_int_t)(st1.load_bytes - st0.load_bytes)));
        /* what the engine's storage client moved meanwhile, by way: other requests running at
         * the same time count too, so sums over a run are what they mean */
        json_object_set_new(out, "shm_bytes",
                            json_integer((json_int_t)(st1.shm_bytes - st0.shm_bytes)));
        json_object_set_new(out, "net_bytes",
                            json_integer((json_int_t)(st1.net_bytes - st0.net_bytes)));
    }
    if (r.choice != KVFE_NO_DECISION) { /* --decide: the choice, its inputs and its outcome */
        static const char *const names[] = {"none", "load", "partial", "recompute"};
        kvfe_rates rt;
        kvfe_rates_get(S->e, &rt);
        json_object_set_new(out, "decision",
                            json_pack("{s:s,s:f,s:f,s:f,s:f,s:i,s:s,s:s}", "choice",
                                      names[r.choice], "predicted_s", r.predicted_s,
                                      "predicted_recompute_s", r.predicted_recompute_s, "load_bps",
                                      rt.load_bps, "prefill_s_per_token", rt.s_per_token,
                                      "cut_at_layer", r.cut_at_layer, "outcome",
                                      r.loaded_tokens       ? "loaded"
                                      : r.cut_at_layer >= 0 ? "cut, recomputed"
                                                            : "recomputed",
                                      "label", "real"));
    }
    if (j->pf && stores) /* fetched while it waited: how much arrived by the deadline */
        json_object_set_new(
            out, "prefetch",
            json_pack("{s:I,s:I,s:b,s:f,s:f,s:s}", "tokens", (json_int_t)r.prefetch_tokens,
                      "ready_tokens", (json_int_t)r.prefetch_ready_tokens, "deadline_missed",
                      r.prefetch_deadline_missed, "deadline_ms", j->load_deadline_ms, "wait_s",
                      r.prefetch_wait_seconds, "label", "real"));
    if (stores) { /* KV moved through kvfabric: say how */
        char why[240];
        json_object_set_new(out, "transport",
                            json_string(kvf_connector_transport(S->cn, why, sizeof why)));
        json_object_set_new(out, "transport_reason", json_string(why));
    }
    if (mismatch) {
        kvf_error(&S->lg, "request: the decode's first token %u differs from the prefill's %u",
                  r.next_token, j->first_token);
        pthread_mutex_lock(&S->mu);
        S->first_token_mismatches++;
        pthread_mutex_unlock(&S->mu);
    }
    return out;
}

/* The prompt tokens whose KV the pages hold now (the last sequence's whole chunks it starts with,
 * as publish_blocks hashed them), at most all but the last chunk's worth the engine computes
 * anyway. An estimate for the queue's order: the pages may hold another sequence by the job's
 * turn. */
static size_t held_prefix(srv *S, const uint32_t *tokens, size_t n)
{
    uint32_t P = S->m.layout.page_tokens, C = S->m.layout.chunk_tokens;
    uint64_t parent = 0;
    size_t b = 0;
    pthread_mutex_lock(&S->mu);
    for (; b < S->n_held && b < n / P; b++) {
        kvf_events_hash_blocks(tokens + b * P, 1, P, parent, &parent);
        if (parent != S->held[b])
            break;
    }
    pthread_mutex_unlock(&S->mu);
    size_t dev = b * P / C * C, max_hit = (n - 1) / C * C;
    return dev < max_hit ? dev : max_hit;
}

/* Hands the engine to the next waiting job if it is free. Lock held. */
static void dispatch_locked(srv *S)
{
    if (S->running || S->n_wait == 0)
        return;
    for (size_t i = 0; i < S->n_wait; i++) {
        S->pick_cached[i] = S->wait[i].cached;
        S->pick_work[i] = S->wait[i].work_s;
    }
    size_t i = kvf_sched_queue_pick(&S->qcost, S->pick_cached, S->pick_work, S->n_wait, S->picks++);
    S->running = S->wait[i].id;
    memmove(&S->wait[i], &S->wait[i + 1], (S->n_wait - i - 1) * sizeof *S->wait);
    S->n_wait--;
    pthread_cond_broadcast(&S->cv);
}

/* Queues a job and waits until it holds the engine. 0, or KVF_ENOMEM / KVF_ECANCELED (stopping). */
static int wait_turn(srv *S, size_t cached, double work_s)
{
    pthread_mutex_lock(&S->mu);
    if (S->n_wait == S->cap_wait) {
        size_t cap = S->cap_wait ? S->cap_wait * 2 : 64;
        struct waiter *w = realloc(S->wait, cap * sizeof *w);
        size_t *pc = realloc(S->pick_cached, cap * sizeof *pc);
        double *pw = realloc(S->pick_work, cap * sizeof *pw);
        S->wait = w ? w : S->wait;
        S->pick_cached = pc ? pc : S->pick_cached;
        S->pick_work = pw ? pw : S->pick_work;
        if (!w || !pc || !pw) {
            pthread_mutex_unlock(&S->mu);
            return KVF_ENOMEM;
        }
        S->cap_wait = cap;
    }
    uint64_t id = ++S->next_id;
    S->wait[S->n_wait++] = (struct waiter){id, cached, work_s};
    dispatch_locked(S);
    while (S->running != id && !atomic_load(&S->stop))
        pthread_cond_wait(&S->cv, &S->mu);
    int rc = S->running == id ? 0 : KVF_ECANCELED;
    pthread_mutex_unlock(&S->mu);
    return rc;
}

/* A job that will wait for the engine (it is busy) starts fetching the stores' prefix now, so
 * that its load happens while it waits: the cached tokens the lookup found, at most all but the
 * chunk holding the last token (which is computed anyway). Its deadline is the plan's, counted
 * from the job's arrival. Best effort: a prefetch that cannot start leaves the job to load at
 * its turn. */
static void start_prefetch(srv *S, job *j, size_t cached, double t_arrived)
{
    uint32_t C = S->m.layout.chunk_tokens;
    size_t max_hit = (j->n - 1) / C * C, want = (cached < max_hit ? cached : max_hit) / C * C;
    if (!want)
        return;
    /* The waiting requests' prefetches share --prefetch-memory: beyond it a request loads at its
     * turn, as on an idle engine. */
    uint64_t bytes = (uint64_t)want * kvf_layout_bytes_per_token(&S->m.layout);
    pthread_mutex_lock(&S->mu);
    int room = S->prefetch_held + bytes <= S->prefetch_max;
    if (room)
        S->prefetch_held += bytes;
    pthread_mutex_unlock(&S->mu);
    if (!room)
        return;
    if (kvf_connector_prefetch(S->cn, j->tokens, want, &j->pf) != 0) {
        pthread_mutex_lock(&S->mu);
        S->prefetch_held -= bytes;
        pthread_mutex_unlock(&S->mu);
        return;
    }
    j->pf_bytes = bytes;
    j->deadline_ns =
        j->load_deadline_ms > 0 ? (uint64_t)((t_arrived + j->load_deadline_ms / 1e3) * 1e9) : 0;
}

static unsigned handle_job(srv *S, const char *kind, json_t *o, kvf__http_reply *reply)
{
    job j = {.kind = kind};
    unsigned st = parse_job(S, o, &j, reply);
    if (st)
        return st;
    int is_prefill = !strcmp(kind, "prefill"), is_decode = !strcmp(kind, "decode");
    /* The job's work for the queue's order: the prefill of what no cache holds (a decode brings
     * its prefix by handoff; others ask the stores, or with the engine's cache only, look at the
     * pages), then the tokens it generates. */
    size_t cached = is_decode ? j.expect_cached : 0;
    double t_arrived = now_s();
    pthread_mutex_lock(&S->mu);
    int busy = S->running != 0 || S->n_wait > 0;
    pthread_mutex_unlock(&S->mu);
    int prefetch = !is_decode && j.reuse == REUSE_ALL && S->cn && S->prefetch && busy;
    if (!is_decode && j.reuse == REUSE_ALL && S->cn && (S->qcost.klpm_k > 1 || prefetch))
        kvf_connector_lookup(S->cn, j.tokens, j.n, &cached);
    else if (!is_decode && j.reuse == REUSE_ENGINE && S->qcost.klpm_k > 1)
        cached = held_prefix(S, j.tokens, j.n);
    if (prefetch)
        start_prefetch(S, &j, cached, t_arrived);
    cached = cached < j.n ? cached : j.n;
    const kvf_sched_cost *qc = &S->qcost;
    double un = (double)(j.n - cached), nn = (double)j.n, cc = (double)cached;
    double work = un / qc->prefill_tokens_per_s +
                  qc->prefill_attn_s_per_tok2 * (nn * nn - cc * cc) / 2.0 +
                  (is_prefill ? 0 : (double)j.max_tokens * qc->tpot_base_s);
    pthread_mutex_lock(&S->mu);
    if (!is_decode)
        S->queued_prefill_tokens += (double)j.n;
    if (!is_prefill)
        S->active_decodes++;
    S->queued_work_s += work;
    mark_dirty_locked(S);
    pthread_mutex_unlock(&S->mu);
    size_t landed;
    double handoff_s = is_decode ? await_handoff(S, &j, &landed) : 0;
    double t_queued = now_s();
    int turn = wait_turn(S, cached, work);
    double t_start = now_s();
    pthread_mutex_lock(&S->mu);
    if (!turn) {
        S->running_work_s = work;
        S->running_since = t_start;
    }
    pthread_mutex_unlock(&S->mu);
    json_t *out = turn ? kvf__http_error("engine %s", turn == KVF_ENOMEM ? "out of memory for its "
                                                                           "queue"
                                                                         : "stopping")
                       : run_job(S, &j, t_start - t_queued, handoff_s);
    int ok = json_object_get(out, "error") == NULL;
    pthread_mutex_lock(&S->mu);
    if (!turn)
        S->running = 0;
    dispatch_locked(S);
    S->requests++;
    S->failures += !ok;
    S->busy_s += now_s() - t_start;
    if (!is_decode)
        S->queued_prefill_tokens -= (double)j.n;
    if (!is_prefill)
        S->active_decodes--;
    S->queued_work_s -= work;
    if (S->queued_work_s < 1e-9)
        S->queued_work_s = 0; /* no drift below zero from the sums' rounding */
    if (!turn)
        S->running_work_s = 0;
    mark_dirty_locked(S);
    pthread_cond_broadcast(&S->cv);
    pthread_mutex_unlock(&S->mu);
    kvf_prefetch_free(&j.pf);
    if (j.pf_bytes) {
        pthread_mutex_lock(&S->mu);
        S->prefetch_held -= j.pf_bytes;
        pthread_mutex_unlock(&S->mu);
    }
    free(j.tokens);
    reply->json = out;
    return ok ? 200 : 500;
}

static unsigned on_request(void *ctx, const char *method, const char *url, json_t *body,
                           kvf__http_reply *reply)
{
    srv *S = ctx;
    if (!body && strcmp(method, "GET") != 0) {
        reply->json = kvf__http_error("%s %s: not served", method, url);
        return 405;
    }
    if (!body) {
        if (strcmp(url, "/v1/health") != 0) {
            reply->json = kvf__http_error("GET %s: not served", url);
            return 404;
        }
        kvf_connector_stats cs = {0};
        if (S->cn)
            kvf_connector_stats_get(S->cn, &cs);
        pthread_mutex_lock(&S->mu);
        reply->json = json_pack(
            "{s:s,s:s,s:s,s:I,s:I,s:I,s:f,s:i,s:I,s:f,s:{s:I,s:I,s:I,s:I,s:I,s:I},s:b}", "id",
            S->id, "role", S->role, "model", S->model, "requests", (json_int_t)S->requests,
            "failures", (json_int_t)S->failures, "first_token_mismatches",
            (json_int_t)S->first_token_mismatches, "queued_prefill_tokens",
            S->queued_prefill_tokens, "active_decodes", (int)S->active_decodes, "waiting",
            (json_int_t)S->n_wait, "busy_s", S->busy_s, "connector", "load_bytes",
            (json_int_t)cs.load_bytes, "save_bytes", (json_int_t)cs.save_bytes, "chunks_loaded",
            (json_int_t)cs.chunks_loaded, "chunks_saved", (json_int_t)cs.chunks_saved,
            "chunks_missed", (json_int_t)cs.chunks_missed, "chunks_existing",
            (json_int_t)cs.chunks_existing, "cache_layer", S->cn != NULL);
        json_object_set_new(reply->json, "running", json_boolean(S->running != 0));
        json_t *c = json_object_get(reply->json, "connector");
        json_object_set_new(c, "prefetches", json_integer((json_int_t)cs.prefetches));
        json_object_set_new(c, "prefetch_chunks", json_integer((json_int_t)cs.prefetch_chunks));
        json_object_set_new(c, "prefetch_chunks_loaded",
                            json_integer((json_int_t)cs.prefetch_chunks_loaded));
        pthread_mutex_unlock(&S->mu);
        return 200;
    }
    if (!strcmp(url, "/v1/prefill") || !strcmp(url, "/v1/decode") || !strcmp(url, "/v1/generate"))
        return handle_job(S, url + 4, body, reply);
    reply->json = kvf__http_error("POST %s: not served (prefill, decode, generate)", url);
    return 404;
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

static int register_with_sched(srv *S, char *err, size_t errlen)
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
    /* Its compute: this host's CPUs, which the engines started here share. */
    char compute[96];
    uint32_t slots = host_compute(compute, sizeof compute);
    if (slots) {
        json_object_set_new(body, "compute", json_string(compute));
        json_object_set_new(body, "compute_slots", json_integer(slots));
        json_object_set_new(body, "compute_uses", json_integer(kvfe_gemm_threads()));
    }
    char url[256];
    snprintf(url, sizeof url, "http://%s/v1/instances", S->sched);
    long status = 0;
    json_t *reply = NULL;
    int rc = 0;
    for (int attempt = 0; attempt < 50; attempt++) {
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
        snprintf(err, errlen, "kvf-sched refused the registration (HTTP %ld): %s", status,
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
        *level, *queue, *cost, *events_credential, *events_tenants, *tokens;
    int insecure;         /* --insecure: listen where clients are not loopback (docs/security.md) */
    int decide;           /* --decide: load or recompute per request from live rates */
    const char *prefetch; /* --prefetch on|off */
    const char *prefetch_memory; /* --prefetch-memory SIZE */
} serve_opts;

static int parse_args(int argc, char **argv, serve_opts *o)
{
    *o = (serve_opts){.model = "ref-tiny",
                      .listen = "127.0.0.1:0",
                      .id = "",
                      .role = "both",
                      .sched = "",
                      .seed = "1",
                      .max_tokens = "16384",
                      .level = "info",
                      .queue = "work",
                      .prefetch = "on",
                      .prefetch_memory = "1G"};
    const struct {
        const char *name;
        const char **value;
    } opts[] = {{"--id", &o->id},
                {"--role", &o->role},
                {"--listen", &o->listen},
                {"--advertise", &o->advertise},
                {"--sched", &o->sched},
                {"--store", &o->store},
                {"--events", &o->events},
                {"--model", &o->model},
                {"--seed", &o->seed},
                {"--max-tokens", &o->max_tokens},
                {"--log-level", &o->level},
                {"--queue", &o->queue},
                {"--prefetch", &o->prefetch},
                {"--prefetch-memory", &o->prefetch_memory},
                {"--cost", &o->cost},
                {"--events-credential", &o->events_credential},
                {"--events-tenants", &o->events_tenants},
                {"--tokens", &o->tokens}};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--serve"))
            continue;
        if (!strcmp(a, "--insecure")) {
            o->insecure = 1;
            continue;
        }
        if (!strcmp(a, "--decide")) {
            o->decide = 1;
            continue;
        }
        if (!v) {
            fprintf(stderr, "kvf-engine: %s needs a value (see the top of docs/operations.md)\n",
                    a);
            return 2;
        }
        i++;
        const char **dst = NULL;
        for (size_t k = 0; k < sizeof opts / sizeof opts[0]; k++)
            if (!strcmp(a, opts[k].name))
                dst = opts[k].value;
        if (!dst) {
            fprintf(stderr, "kvf-engine: unknown option %s\n", a);
            return 2;
        }
        *dst = v;
    }
    return PROCEED;
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
    } else if (strcmp(queue, "work") != 0) {
        fprintf(stderr, "kvf-engine: --queue must be work or fifo\n");
        return 2;
    }
    return PROCEED;
}

/* Checks the options and takes the server's identity, capacity, queue rule, model and listening
 * address from them. */
static int configure(srv *S, const serve_opts *o)
{
    if (kvf__log_level_parse(o->level, &S->lg.level) != 0) {
        fprintf(stderr, "kvf-engine: --log-level %s: expected debug, info, warn or error\n",
                o->level);
        return 2;
    }
    snprintf(S->id, sizeof S->id, "%s", o->id);
    snprintf(S->role, sizeof S->role, "%s", o->role);
    snprintf(S->sched, sizeof S->sched, "%s", o->sched);
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

/* Opens the connector (to the stores given, or to the ones kvf-sched lists; none without either)
 * and the engine over it. Returns 0 or the exit status. */
static int open_engine(srv *S, const serve_opts *o)
{
    char err[512];
    if (o->store || S->sched[0]) {
        char *dup = o->store ? strdup(o->store) : NULL, *nodes[64];
        size_t n_nodes = 0;
        for (char *sv = NULL, *t = dup ? strtok_r(dup, ",", &sv) : NULL; t && n_nodes < 64;
             t = strtok_r(NULL, ",", &sv))
            nodes[n_nodes++] = t;
        kvf_connector_opts co = {.nodes = (const char *const *)nodes,
                                 .n_nodes = n_nodes,
                                 .sched = S->sched[0] ? S->sched : NULL,
                                 .layout = S->m.layout};
        int rc = kvf_connector_open(&S->cn, &co, err, sizeof err);
        free(dup);
        if (rc) {
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
                          .replay = replay};
    if (kvf_events_open(&S->pub, &eo, err, sizeof err) != 0) {
        fprintf(stderr, "kvf-engine: --events %s: %s\n", o->events, err);
        return 1;
    }
    return 0;
}

/* Serves HTTP on the listening address, requiring one of tokens (may be NULL: none) of every
 * request but GETs; S->endpoint gets --advertise, or the address bound. */
static int start_http(srv *S, const char *advertise, const kvf__http_tokens *tokens,
                      kvf__httpd **httpd, uint16_t *bound)
{
    char err[512];
    if (kvf__httpd_start(httpd, S->host, S->port, 1, MAX_BODY, on_request, S, bound, err,
                         sizeof err) != 0) {
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
static void serve_until_signal(srv *S, uint16_t bound)
{
    kvf__daemon_signals(on_signal);
    printf("kvf-engine ready listen=%s:%u id=%s role=%s model=%s events=%s cache_layer=%s "
           "pid=%d\n",
           S->host, (unsigned)bound, S->id, S->role, S->model,
           S->pub ? kvf_events_endpoint(S->pub) : "-", S->cn ? "on" : "off", (int)getpid());
    fflush(stdout);
    kvf_info(&S->lg, "serving %s as %s on %s:%u", S->model, S->role, S->host, (unsigned)bound);
    while (!atomic_load(&g_stop))
        usleep(50000);
    kvf_info(&S->lg, "stopping");
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
    rc = open_engine(&S, &o);
    if (rc)
        return rc;
    pthread_mutex_init(&S.mu, NULL);
    pthread_cond_init(&S.cv, NULL);
    pthread_cond_init(&S.report_cv, NULL);
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
        char err[512];
        if (register_with_sched(&S, err, sizeof err) != 0) {
            fprintf(stderr, "kvf-engine: %s\n", err);
            rc = 1;
            goto out_stop_http;
        }
        have_reporter = pthread_create(&reporter, NULL, reporter_main, &S) == 0;
    }
    serve_until_signal(&S, bound);
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
    free(S.held);
    free(S.wait), free(S.pick_cached), free(S.pick_work);
    if (!rc)
        kvf_info(&S.lg, "stopped after %llu requests", (unsigned long long)S.requests);
    return rc;
}
