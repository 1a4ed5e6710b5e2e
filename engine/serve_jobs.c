/*
 * kvf-engine's serving mode, its requests (serve.c has the protocol at its top): each job parsed,
 * queued for the engine by kvf-sched's queue rule (its cached prefix prefetched meanwhile when
 * the engine is busy), run, and answered; and the KV events the running job publishes.
 */
#include "serve_int.h"

#include "errf.h"
#include "kvf/kvf.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    kvf_source *src;         /* the plan's sources (stores point into the request's body) */
    size_t n_src;
    kvf_prefetch *pf;  /* the cached prefix, fetched while the job waits (NULL: none) */
    uint64_t pf_bytes; /* what it holds, counted in srv.prefetch_held */
    uint64_t deadline_ns;
    uint64_t ticket; /* the placement's (kvf-sched's plan), 0: none */
} job;

/* The "reuse" field: absent or true, false, or "engine". Returns 0, or -1 for any other value. */
static int parse_reuse(json_t *ru, reuse_mode *out)
{
    if (json_is_null(ru))
        ru = NULL; /* null: as if absent */
    *out = !ru || json_is_true(ru) ? REUSE_ALL : REUSE_NONE;
    if (json_is_string(ru) && !strcmp(json_string_value(ru), "engine"))
        *out = REUSE_ENGINE;
    return !ru || json_is_boolean(ru) || *out == REUSE_ENGINE ? 0 : -1;
}

/* The most runs a request's "sources" may list (kvf-sched's plans list up to 8). */
#define MAX_SOURCES 64

/* The "sources" field (kvf-sched's plan: where each run of the prompt's cached chunks is taken
 * from): absent, or an array of up to MAX_SOURCES objects with "store" ("host:port"), "from" and
 * "tokens" (token counts; other fields are ignored), or {"more": true} (runs the plan does not
 * list). Returns 0, or 400 with *reply set. The stores point into o. */
static unsigned parse_sources(json_t *o, job *j, kvf__http_reply *reply)
{
    json_t *a = json_object_get(o, "sources");
    if (!a || json_is_null(a))
        return 0;
    if (!json_is_array(a) || json_array_size(a) > MAX_SOURCES) {
        reply->json =
            kvf__http_error("\"sources\" must be an array of at most %d runs", MAX_SOURCES);
        return 400;
    }
    j->src = calloc(json_array_size(a) + 1, sizeof *j->src);
    if (!j->src) {
        reply->json = kvf__http_error("out of memory");
        return 500;
    }
    size_t i;
    json_t *v;
    json_array_foreach(a, i, v)
    {
        if (json_is_object(v) && json_is_true(json_object_get(v, "more")) &&
            !json_object_get(v, "store"))
            continue;
        json_t *st = json_object_get(v, "store"), *fr = json_object_get(v, "from"),
               *tk = json_object_get(v, "tokens");
        const char *sv = json_string_value(st);
        if (!json_is_object(v) || !sv || strlen(sv) > 255 || !json_is_integer(fr) ||
            !json_is_integer(tk) || json_integer_value(fr) < 0 || json_integer_value(tk) < 0 ||
            json_integer_value(fr) > UINT32_MAX || json_integer_value(tk) > UINT32_MAX) {
            reply->json = kvf__http_error("sources[%zu] must be {\"store\": \"host:port\", "
                                          "\"from\": tokens, \"tokens\": tokens} with token "
                                          "counts 0..4294967295, or {\"more\": true}",
                                          i);
            return 400;
        }
        if (!sv[0])
            continue; /* a node whose address the plan did not know */
        j->src[j->n_src++] = (kvf_source){.store = sv,
                                          .from = (size_t)json_integer_value(fr),
                                          .tokens = (size_t)json_integer_value(tk)};
    }
    return 0;
}

/* The tokens [0, end) that j's sources cover without a hole (0 where none starts at 0): what the
 * plan says the stores hold of the prompt, whoever holds it. */
static size_t sources_cover(const job *j)
{
    size_t end = 0;
    for (size_t pass = 0; pass < j->n_src; pass++) {
        int moved = 0;
        for (size_t r = 0; r < j->n_src; r++)
            if (j->src[r].from <= end && j->src[r].from + j->src[r].tokens > end) {
                end = j->src[r].from + j->src[r].tokens;
                moved = 1;
            }
        if (!moved)
            break;
    }
    return end < j->n ? end : j->n;
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
           *dl = json_object_get(o, "load_deadline_ms"), *tk = json_object_get(o, "ticket");
    if (tk && (!json_is_integer(tk) || json_integer_value(tk) < 0 ||
               json_integer_value(tk) > ((json_int_t)1 << 53))) {
        reply->json = kvf__http_error("ticket (kvf-sched's plan) is an integer 0..2^53");
        return 400;
    }
    j->ticket = tk ? (uint64_t)json_integer_value(tk) : 0;
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
    /* the prefill's first token, handed to the decode half: a 32-bit id, as the prompt's */
    if (ft && (json_integer_value(ft) < 0 || json_integer_value(ft) > UINT32_MAX)) {
        reply->json = kvf__http_error("first_token is not a 32-bit token id");
        return 400;
    }
    /* tokens the prefill saved: at most the prompt */
    if (ec && (json_integer_value(ec) < 0 || (uint64_t)json_integer_value(ec) > j->n)) {
        reply->json = kvf__http_error("expect_cached must be 0..%zu (the prompt's tokens)", j->n);
        return 400;
    }
    if (j->n + j->max_tokens + 1 > S->max_tokens) {
        reply->json = kvf__http_error("prompt of %zu tokens + %u to generate exceed this engine's "
                                      "KV capacity of %u tokens (--max-tokens)",
                                      j->n, j->max_tokens, S->max_tokens);
        return 413;
    }
    unsigned sst = parse_sources(o, j, reply);
    if (sst)
        return sst;
    j->tokens = malloc(j->n * sizeof *j->tokens);
    if (!j->tokens) {
        reply->json = kvf__http_error("out of memory");
        return 500; /* handle_job frees j->src */
    }
    for (size_t i = 0; i < j->n; i++) {
        json_t *v = json_array_get(t, i);
        /* Any 32-bit id: the reference engine folds ids into its vocabulary (trace replays and
         * synthetic prompts carry ids from models with larger ones). */
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
    double t0 = kvfe__srv_now();
    *cached = 0;
    if (!S->cn || !j->expect_cached)
        return 0;
    for (int i = 0; i < 400; i++) {
        int why = 0;
        int rc = kvf_connector_lookup_why(S->cn, j->tokens, j->n, cached, &why);
        if (rc == 0 && *cached >= j->expect_cached)
            break;
        /* the run ends at a chunk whose store cannot be reached (down, refused, reset): it will
         * not land; the job recomputes from there now instead of waiting out the bound */
        if (why == KVF_ECONNREFUSED || why == KVF_ECONNRESET || why == KVF_ENOTCONN ||
            why == KVF_EHOSTUNREACH || why == KVF_ENETUNREACH || why == KVF_EPIPE)
            break;
        usleep(i < 20 ? 500 : 5000);
    }
    return kvfe__srv_now() - t0;
}

/* What the engine's storage client counted since `before`: its counters start at 0 in a client
 * opened on a changed set of stores (kvf-sched's list), so a count that went back is the new
 * client's. */
static json_int_t client_since(uint64_t now, uint64_t before)
{
    return (json_int_t)(now >= before ? now - before : now);
}

/* Decodes greedily after first until toks holds max_tokens tokens, appending each step's time to
 * itl; a step that fails ends the sequence there, and so does the request's client going away
 * (*gone set: nobody would read them). Returns the decode time. */
static double decode_rest(srv *S, uint32_t first, uint32_t max_tokens, json_t *toks, json_t *itl,
                          const kvf__http_reply *client, int *gone)
{
    double decode_s = 0;
    uint32_t last = first;
    for (uint32_t g = 1; g < max_tokens; g++) {
        if (kvf__http_client_gone(client)) {
            *gone = 1;
            break;
        }
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

static json_t *run_job(srv *S, const job *j, double queue_s, double handoff_s,
                       const kvf__http_reply *client)
{
    if (kvf__http_client_gone(client)) { /* it left while the job waited: nothing to run */
        pthread_mutex_lock(&S->mu);
        S->abandoned++;
        pthread_mutex_unlock(&S->mu);
        return kvf__http_error("the client went away before the request's turn");
    }
    kvf_connector_stats st0, st1;
    if (S->cn)
        kvf_connector_stats_get(S->cn, &st0);
    int is_prefill = !strcmp(j->kind, "prefill"), is_decode = !strcmp(j->kind, "decode");
    /* A decode loads what its prefill saved and saves nothing itself. */
    int stores = j->reuse == REUSE_ALL && S->cn != NULL;
    int saving = stores && !is_decode;
    kvfe_set_tiers(S->e, j->reuse != REUSE_NONE, stores, saving);
    kvfe_result r;
    /* The plan's sources: where each run of the prompt's cached chunks is nearest */
    const kvf_source *src = stores ? j->src : NULL;
    size_t n_src = stores ? j->n_src : 0;
    int rc = j->pf && stores ? kvfe_prefill_prefetched(S->e, j->tokens, j->n, j->pf, j->deadline_ns,
                                                       src, n_src, &r)
                             : kvfe_prefill_planned(S->e, j->tokens, j->n, src, n_src, &r);
    if (rc)
        return kvf__http_error("prefill: %s", kvf_strerror(rc));
    publish_blocks(S, j->tokens, j->n);
    /* The first token: the prefill's own, or for a decode the one the prefill engine chose
     * (this engine computed it again from the handed-off KV: they must agree). */
    int mismatch = is_decode && j->has_first && r.next_token != j->first_token;
    uint32_t last = is_decode && j->has_first ? j->first_token : r.next_token;
    json_t *toks = json_array(), *itl = json_array();
    json_array_append_new(toks, json_integer(last));
    int gone = 0;
    double decode_s =
        is_prefill ? 0 : decode_rest(S, last, j->max_tokens, toks, itl, client, &gone);
    if (gone) {
        size_t made = json_array_size(toks);
        json_decref(toks);
        json_decref(itl);
        pthread_mutex_lock(&S->mu);
        S->abandoned++;
        pthread_mutex_unlock(&S->mu);
        return kvf__http_error("the client went away: stopped after %zu of %u tokens", made,
                               j->max_tokens);
    }
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
                            json_integer(client_since(st1.shm_bytes, st0.shm_bytes)));
        json_object_set_new(out, "net_bytes",
                            json_integer(client_since(st1.net_bytes, st0.net_bytes)));
        /* chunks its layerwise load asked of the node the plan named, and of those the ones
         * that node did not give (asked of their own node in the same load) */
        json_object_set_new(out, "load_named",
                            json_integer((json_int_t)(st1.load_named - st0.load_named)));
        json_object_set_new(
            out, "load_named_reasked",
            json_integer(client_since(st1.load_named_reasked, st0.load_named_reasked)));
    }
    if (r.choice != KVFE_NO_DECISION) { /* --decide: the choice, its inputs and its outcome */
        static const char *const names[] = {"none", "load", "partial", "recompute"};
        kvfe_rates rt;
        kvfe_rates_get(S->e, &rt);
        json_object_set_new(out, "decision",
                            json_pack("{s:s,s:f,s:f,s:f,s:f,s:f,s:f,s:i,s:s,s:s}", "choice",
                                      names[r.choice], "predicted_s", r.predicted_s,
                                      "predicted_recompute_s", r.predicted_recompute_s, "load_bps",
                                      rt.load_bps, "prefill_s_per_token", rt.s_per_token,
                                      "prefill_base_s", rt.base_s, "prefill_attn_s", rt.attn_s,
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
        /* told once a second at most (a client's first_token is its own to send), counted all */
        pthread_mutex_lock(&S->mu);
        uint64_t n = ++S->first_token_mismatches, quiet;
        int say = kvf__log_due(&S->mismatch_log, kvf__now_ns(), &quiet);
        pthread_mutex_unlock(&S->mu);
        if (say)
            kvf_error(&S->lg,
                      "request: the decode's first token %u differs from the prefill's %u (%" PRIu64
                      " such decodes in all, %" PRIu64 " not logged since the last)",
                      r.next_token, j->first_token, n, quiet);
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
    double now = kvfe__srv_now();
    for (size_t i = 0; i < S->n_wait; i++) {
        S->pick_cached[i] = S->wait[i].cached;
        S->pick_work[i] = S->wait[i].work_s;
        S->pick_waited[i] = now - S->wait[i].since;
    }
    kvf_queue_view v = {.n = S->n_wait,
                        .cached = S->pick_cached,
                        .work_s = S->pick_work,
                        .waited_s = S->pick_waited};
    size_t i = kvf_sched_queue_pick_by(S->queue, S->qcost.klpm_k, &v, S->picks++);
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
        double *pa = realloc(S->pick_waited, cap * sizeof *pa);
        S->wait = w ? w : S->wait;
        S->pick_cached = pc ? pc : S->pick_cached;
        S->pick_work = pw ? pw : S->pick_work;
        S->pick_waited = pa ? pa : S->pick_waited;
        if (!w || !pc || !pw || !pa) {
            pthread_mutex_unlock(&S->mu);
            return KVF_ENOMEM;
        }
        S->cap_wait = cap;
    }
    uint64_t id = ++S->next_id;
    S->wait[S->n_wait++] = (struct waiter){id, cached, work_s, kvfe__srv_now()};
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
    if (kvf_connector_prefetch_from(S->cn, j->tokens, want, j->src, j->n_src, &j->pf) != 0) {
        pthread_mutex_lock(&S->mu);
        S->prefetch_held -= bytes;
        pthread_mutex_unlock(&S->mu);
        return;
    }
    j->pf_bytes = bytes;
    j->deadline_ns =
        j->load_deadline_ms > 0 ? (uint64_t)((t_arrived + j->load_deadline_ms / 1e3) * 1e9) : 0;
}

/* The queue and the connector, mirrored at each scrape. */
static void metrics_collect(void *ud, kvf__metrics *m)
{
    srv *S = ud;
    kvf_connector_stats cs = {0};
    if (S->cn)
        kvf_connector_stats_get(S->cn, &cs);
    pthread_mutex_lock(&S->mu);
    double queued_s = kvfe__srv_queued_s_locked(S);
    const kvf__metric_value f[] = {
        {"queued_prefill_tokens", "Prompt tokens of the requests waiting or running.", 0,
         S->queued_prefill_tokens},
        {"queued_prefill_seconds", "Their predicted prefill work still to do.", 0, queued_s},
        {"waiting_requests", "Requests waiting for the engine.", 0, (double)S->n_wait},
        {"active_decodes", "Requests decoding or waiting to.", 0, (double)S->active_decodes},
        {"held_blocks", "KV blocks in the engine's pages (published as KV events).", 0,
         (double)S->n_held},
        {"busy_seconds_total", "Time the engine ran requests.", 1, S->busy_s},
        {"first_token_mismatches_total", "Decodes whose first token differed from the prefill's.",
         1, (double)S->first_token_mismatches},
        {"load_bytes_total", "KV bytes loaded from the stores.", 1, (double)cs.load_bytes},
        {"save_bytes_total", "KV bytes saved to the stores.", 1, (double)cs.save_bytes},
        {"chunks_loaded_total", "Chunks loaded from the stores.", 1, (double)cs.chunks_loaded},
        {"chunks_saved_total", "Chunks saved to the stores.", 1, (double)cs.chunks_saved},
        {"chunks_missed_total", "Chunks a load found missing or failing their checksums.", 1,
         (double)cs.chunks_missed},
        {"prefetches_total", "Prefixes fetched for requests while they waited.", 1,
         (double)cs.prefetches},
        {"requests_abandoned_total",
         "Requests whose client went away before their answer: not run, or decoding stopped.", 1,
         (double)S->abandoned},
        {"prefetch_named_chunks_total",
         "Prefetched chunks asked of the node the plan named (not their own).", 1,
         (double)cs.prefetch_named},
        {"prefetch_named_missed_total",
         "Of them, chunks the named node did not give (asked of their own node next).", 1,
         (double)cs.prefetch_named_missed},
        {"load_named_chunks_total",
         "Chunks of layerwise loads asked of the node the plan named (not their own).", 1,
         (double)cs.load_named},
        {"load_named_reasked_total",
         "Of them, chunks the named node did not give (asked of their own node in the same load).",
         1, (double)cs.load_named_reasked},
    };
    pthread_mutex_unlock(&S->mu);
    kvf__metrics_set_all(m, f, sizeof f / sizeof f[0]);
}

int kvfe__srv_metrics_open(srv *S)
{
    if (!(S->metrics = kvf__metrics_new("kvf_engine")))
        return -1;
    kvf__metrics_on_collect(S->metrics, metrics_collect, S);
    S->m_requests = kvf__metric_counter(S->metrics, "requests_total",
                                        "Requests answered, by kind and result.", "kind,result");
    S->m_tokens = kvf__metric_counter(S->metrics, "prompt_tokens_total",
                                      "Prompt tokens by where their KV came from: the engine's "
                                      "pages, the stores, or computed here.",
                                      "source");
    S->m_seconds = kvf__metric_histogram(
        S->metrics, "request_phase_seconds",
        "Time of a request's phases: waiting for the engine (queue), for a decode's handoff, "
        "the prefill (loads included), the decode.",
        "phase", kvf__metrics_latency_buckets, kvf__metrics_latency_nbuckets);
    return S->m_requests && S->m_tokens && S->m_seconds ? 0 : -1;
}

/* A finished request into the metrics: its result, its prompt's sources, its phases' times. */
static void metrics_note(srv *S, const char *kind, int ok, json_t *out, double handoff_s)
{
    kvf__series_add(kvf__metric_series(S->m_requests, (const char *[]){kind, ok ? "ok" : "error"}),
                    1);
    if (!ok)
        return;
    double n = json_number_value(json_object_get(out, "prompt_tokens"));
    double dev = json_number_value(json_object_get(out, "device_tokens"));
    double st = json_number_value(json_object_get(out, "loaded_tokens"));
    double rest = n - dev - st > 0 ? n - dev - st : 0;
    kvf__series_add(kvf__metric_series(S->m_tokens, (const char *[]){"engine"}), dev);
    kvf__series_add(kvf__metric_series(S->m_tokens, (const char *[]){"store"}), st);
    kvf__series_add(kvf__metric_series(S->m_tokens, (const char *[]){"computed"}), rest);
    static const char *const phases[] = {"queue", "prefill", "decode"};
    static const char *const fields[] = {"queue_s", "prefill_s", "decode_s"};
    for (int i = 0; i < 3; i++) {
        json_t *v = json_object_get(out, fields[i]);
        if (json_is_number(v))
            kvf__series_observe(kvf__metric_series(S->m_seconds, (const char *[]){phases[i]}),
                                json_number_value(v));
    }
    if (!strcmp(kind, "decode"))
        kvf__series_observe(kvf__metric_series(S->m_seconds, (const char *[]){"handoff"}),
                            handoff_s);
}

static unsigned handle_job(srv *S, const char *kind, json_t *o, kvf__http_reply *reply)
{
    job j = {.kind = kind};
    unsigned st = parse_job(S, o, &j, reply);
    if (st) {
        free(j.src);
        return st;
    }
    int is_prefill = !strcmp(kind, "prefill"), is_decode = !strcmp(kind, "decode");
    /* The job's work for the queue's order: the prefill of what no cache holds (a decode brings
     * its prefix by handoff; others ask the stores, or with the engine's cache only, look at the
     * pages), then the tokens it generates. */
    size_t cached = is_decode ? j.expect_cached : 0;
    double t_arrived = kvfe__srv_now();
    pthread_mutex_lock(&S->mu);
    int busy = S->running != 0 || S->n_wait > 0;
    pthread_mutex_unlock(&S->mu);
    int prefetch = !is_decode && j.reuse == REUSE_ALL && S->cn && S->prefetch && busy;
    if (!is_decode && j.reuse == REUSE_ALL && S->cn && (S->qcost.klpm_k > 1 || prefetch))
        kvf_connector_lookup(S->cn, j.tokens, j.n, &cached);
    else if (!is_decode && j.reuse == REUSE_ENGINE && S->qcost.klpm_k > 1)
        cached = held_prefix(S, j.tokens, j.n);
    if (prefetch) {
        /* The plan's sources may name holders of chunks that the chunks' own nodes, which the
         * lookup asked, no longer have (a replica keeps a hot chunk that its home evicted): the
         * prefetch asks for those too, and uses what arrives. */
        size_t planned = sources_cover(&j);
        start_prefetch(S, &j, planned > cached ? planned : cached, t_arrived);
    }
    cached = cached < j.n ? cached : j.n;
    const kvf_sched_cost *qc = &S->qcost;
    double un = (double)(j.n - cached), nn = (double)j.n, cc = (double)cached;
    double work = un / qc->prefill_tokens_per_s +
                  qc->prefill_attn_s_per_tok2 * (nn * nn - cc * cc) / 2.0 +
                  (is_prefill ? 0 : (double)j.max_tokens * qc->tpot_base_s);
    pthread_mutex_lock(&S->mu);
    if (j.ticket) { /* counted from now on (its prefill or its decode): the next report says so */
        S->ticketed = 1;
        if (S->n_acks == KVFE_ACKS) {
            S->ack_head = (S->ack_head + 1) % KVFE_ACKS;
            S->n_acks--;
        }
        S->acks[(S->ack_head + S->n_acks++) % KVFE_ACKS] =
            (struct kvfe_ack){.ticket = j.ticket, .at = kvfe__srv_now()};
    }
    if (!is_decode)
        S->queued_prefill_tokens += (double)j.n;
    if (!is_prefill)
        S->active_decodes++;
    S->queued_work_s += work;
    kvfe__srv_mark_dirty_locked(S);
    pthread_mutex_unlock(&S->mu);
    size_t landed;
    double handoff_s = is_decode ? await_handoff(S, &j, &landed) : 0;
    double t_queued = kvfe__srv_now();
    int turn = wait_turn(S, cached, work);
    double t_start = kvfe__srv_now();
    pthread_mutex_lock(&S->mu);
    if (!turn) {
        S->running_work_s = work;
        S->running_since = t_start;
    }
    pthread_mutex_unlock(&S->mu);
    json_t *out = turn ? kvf__http_error("engine %s", turn == KVF_ENOMEM ? "out of memory for its "
                                                                           "queue"
                                                                         : "stopping")
                       : run_job(S, &j, t_start - t_queued, handoff_s, reply);
    int ok = json_object_get(out, "error") == NULL;
    metrics_note(S, kind, ok, out, handoff_s);
    pthread_mutex_lock(&S->mu);
    if (!turn)
        S->running = 0;
    dispatch_locked(S);
    S->requests++;
    S->failures += !ok;
    S->busy_s += kvfe__srv_now() - t_start;
    if (!is_decode)
        S->queued_prefill_tokens -= (double)j.n;
    if (!is_prefill)
        S->active_decodes--;
    S->queued_work_s -= work;
    if (S->queued_work_s < 1e-9)
        S->queued_work_s = 0; /* no drift below zero from the sums' rounding */
    if (!turn)
        S->running_work_s = 0;
    kvfe__srv_mark_dirty_locked(S);
    pthread_cond_broadcast(&S->cv);
    pthread_mutex_unlock(&S->mu);
    kvf_prefetch_free(&j.pf);
    if (j.pf_bytes) {
        pthread_mutex_lock(&S->mu);
        S->prefetch_held -= j.pf_bytes;
        pthread_mutex_unlock(&S->mu);
    }
    free(j.tokens);
    free(j.src);
    reply->json = out;
    return ok ? 200 : 500;
}

unsigned kvfe__srv_request(void *ctx, const char *method, const char *url, json_t *body,
                           kvf__http_reply *reply)
{
    srv *S = ctx;
    if (!body && strcmp(method, "GET") != 0) {
        reply->json = kvf__http_error("%s %s: not served", method, url);
        return 405;
    }
    if (!body && !strcmp(url, "/metrics"))
        return kvf__http_metrics_reply(S->metrics, reply);
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
        json_object_set_new(reply->json, "abandoned", json_integer((json_int_t)S->abandoned));
        json_t *c = json_object_get(reply->json, "connector");
        json_object_set_new(c, "prefetches", json_integer((json_int_t)cs.prefetches));
        json_object_set_new(c, "prefetch_chunks", json_integer((json_int_t)cs.prefetch_chunks));
        json_object_set_new(c, "prefetch_named", json_integer((json_int_t)cs.prefetch_named));
        json_object_set_new(c, "prefetch_named_missed",
                            json_integer((json_int_t)cs.prefetch_named_missed));
        json_object_set_new(c, "prefetch_sources_unknown",
                            json_integer((json_int_t)cs.prefetch_sources_unknown));
        json_object_set_new(c, "load_named", json_integer((json_int_t)cs.load_named));
        json_object_set_new(c, "load_named_reasked",
                            json_integer((json_int_t)cs.load_named_reasked));
        json_object_set_new(c, "load_sources_unknown",
                            json_integer((json_int_t)cs.load_sources_unknown));
        json_object_set_new(c, "prefetch_chunks_loaded",
                            json_integer((json_int_t)cs.prefetch_chunks_loaded));
        /* the stores in use, and how often the set changed (kvf-sched's list, asked again) */
        json_object_set_new(c, "stores", json_integer((json_int_t)cs.stores));
        json_object_set_new(c, "store_clients_opened",
                            json_integer((json_int_t)cs.store_clients_opened));
        pthread_mutex_unlock(&S->mu);
        return 200;
    }
    if (!strcmp(url, "/v1/prefill") || !strcmp(url, "/v1/decode") || !strcmp(url, "/v1/generate"))
        return handle_job(S, url + 4, body, reply);
    reply->json = kvf__http_error("POST %s: not served (prefill, decode, generate)", url);
    return 404;
}
