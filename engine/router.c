/*
 * The router (engine/include/router.h): kvf-sched's placement turned into calls to kvf-engine
 * servers (docs/operations.md, "The disaggregated flow").
 *
 * The router keeps the list of engines kvf-sched gave at open, read-only afterwards, and one
 * counter per engine of its calls in flight there; the counters are atomics, so calls from many
 * threads share them without a lock. The chunk keys of the last prompt sent to each engine (for
 * kvfe_router_pick's prefix rule) are under the router's one lock, held only to copy or compare
 * them. HTTP connections are kept per calling thread by the HTTP client
 * (transport/include/http.h).
 */
#include "router.h"

#include "http.h"
#include "kvf/events.h"
#include "kvf/kvf.h"

#include <jansson.h>
#include <sodium.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* kvf-sched's instance list and an engine's health answer at once: they do no work. */
#define QUICK_TIMEOUT_MS 5000

/* The chunk keys of the last prompt sent to an engine, each folded to 64 bits. */
typedef struct sent_prefix {
    uint64_t *key;
    size_t n, cap;
} sent_prefix;

#define MAX_SCHEDS 16

struct kvfe_router {
    /* kvf-sched's replicas: placements go to the one that answered last; one that gives no
     * answer is passed over for the next, within the same request */
    char sched[MAX_SCHEDS][160];
    int n_sched;
    atomic_int cur;
    /* A sharded index (kvf-sched --shard K/N): each replica's shard (-1: not known yet, it did
     * not answer when asked), the number of shards (1: not sharded) and the engines' block size,
     * with which a prompt's first block, and so its shard, is hashed. */
    atomic_int shard_of[MAX_SCHEDS];
    atomic_uint shards;
    uint32_t block_tokens;
    /* when the shards were last asked for (now_s()), asked again every RELEARN_S while a replica's
     * is not known (it did not answer) */
    _Atomic double learnt_at;
    kvfe_router_engine *eng;
    atomic_int *outstanding; /* calls in flight per engine, indexed as eng */
    size_t n_eng;
    pthread_mutex_t mu; /* sent */
    sent_prefix *sent;  /* indexed as eng */
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* o's number k, or dflt where o has none (absent, null or not a number). */
static double numor(json_t *o, const char *k, double dflt)
{
    json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : dflt;
}

static double num(json_t *o, const char *k)
{
    return numor(o, k, 0);
}

/* The code for an HTTP error status of kvf-sched or an engine: the request was refused as bad
 * (4xx), too large (413), or failed there (anything else). */
static int status_code(long status)
{
    if (status == 413)
        return KVF_E2BIG;
    return status >= 400 && status < 500 ? KVF_EINVAL : KVF_EIO;
}

/* POSTs body to addr's path. on_first (NULL: none): a streamed reply's first line, as it comes
 * (kvf__http_call_stream). */
static int post(const char *addr, const char *path, json_t *body, kvf__http_first_fn on_first,
                void *arg, long *status, json_t **reply, char *err, size_t errlen)
{
    char url[256];
    snprintf(url, sizeof url, "http://%s%s", addr, path);
    /* kvf-sched's token where this process has one ($KVF_SCHED_TOKEN): the engines ignore it. */
    return kvf__http_call_stream("POST", url, body, kvf__sched_token(), KVFE_ROUTER_TIMEOUT_MS,
                                 on_first, arg, status, reply, err, errlen);
}

/* ------------------------------------------------------------------------------------------ */
/* Opening: kvf-sched's instances */

static void copy_str(char *dst, size_t len, json_t *o, const char *k)
{
    const char *s = json_string_value(json_object_get(o, k));
    snprintf(dst, len, "%s", s ? s : "");
}

/* Fills r's engine table from GET /v1/instances of the first replica that answers. */
static int list_engines(kvfe_router *r, char *err, size_t errlen)
{
    char url[256];
    long st = 0;
    json_t *o = NULL;
    int rc = KVF_ECONNREFUSED, at = 0;
    for (at = 0; at < r->n_sched; at++) {
        snprintf(url, sizeof url, "http://%s/v1/instances", r->sched[at]);
        if ((rc = kvf__http_call("GET", url, NULL, QUICK_TIMEOUT_MS, &st, &o, err, errlen)) == 0)
            break;
    }
    if (at == r->n_sched)
        at = 0;
    atomic_store(&r->cur, at);
    if (!rc && st != 200) {
        snprintf(err, errlen, "%s: HTTP %ld", url, st);
        rc = status_code(st);
    }
    json_t *arr = json_object_get(o, "instances");
    size_t n = json_array_size(arr);
    if (!rc && n == 0) {
        snprintf(err, errlen, "kvf-sched at %s has no engine registered", r->sched[at]);
        rc = KVF_ENOENT;
    }
    if (rc)
        goto out_decref;
    r->eng = calloc(n, sizeof *r->eng);
    r->outstanding = calloc(n, sizeof *r->outstanding);
    r->sent = calloc(n, sizeof *r->sent);
    if (!r->eng || !r->outstanding || !r->sent) {
        snprintf(err, errlen, "out of memory for %zu engines", n);
        rc = KVF_ENOMEM;
        goto out_decref;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        json_int_t bt = json_integer_value(json_object_get(v, "block_tokens"));
        if (!r->block_tokens && bt > 0 && bt <= 65536)
            r->block_tokens = (uint32_t)bt;
        copy_str(r->eng[i].id, sizeof r->eng[i].id, v, "id");
        copy_str(r->eng[i].role, sizeof r->eng[i].role, v, "role");
        copy_str(r->eng[i].endpoint, sizeof r->eng[i].endpoint, v, "endpoint");
        atomic_init(&r->outstanding[i], 0);
    }
    r->n_eng = n;
out_decref:
    json_decref(o);
    return rc;
}

/* A replica whose shard is not known is asked again at most this often, from a placement, with
 * a short answer time: a placement that asks waits that much at most. */
#define RELEARN_S          30.0
#define RELEARN_TIMEOUT_MS 300

/* Each replica's shard not known yet, from its GET /v1/index/stats ("shard", "shards");
 * r->shards the largest count heard (1 where every replica holds the whole index). Called at
 * open, and again from placements while a replica's shard is not known. */
static void learn_shards(kvfe_router *r, int timeout_ms)
{
    atomic_store(&r->learnt_at, now_s());
    for (int i = 0; i < r->n_sched; i++) {
        if (atomic_load(&r->shard_of[i]) >= 0)
            continue;
        char url[256], err[256];
        long st = 0;
        json_t *o = NULL;
        snprintf(url, sizeof url, "http://%s/v1/index/stats", r->sched[i]);
        if (kvf__http_call("GET", url, NULL, timeout_ms, &st, &o, err, sizeof err) == 0 &&
            st == 200) {
            json_int_t k = json_integer_value(json_object_get(o, "shard"));
            json_int_t n = json_integer_value(json_object_get(o, "shards"));
            if (n >= 1 && n <= KVF_EVENTS_MAX_SHARDS && k >= 0 && k < n) {
                unsigned was = atomic_load(&r->shards);
                while ((unsigned)n > was &&
                       !atomic_compare_exchange_weak(&r->shards, &was, (unsigned)n)) {
                }
                atomic_store(&r->shard_of[i], (int)k);
            }
        }
        json_decref(o);
    }
}

/* Whether a replica's shard is still not known and the last try is RELEARN_S old. */
static int shards_to_learn(kvfe_router *r)
{
    if (now_s() - atomic_load(&r->learnt_at) < RELEARN_S)
        return 0;
    for (int i = 0; i < r->n_sched; i++)
        if (atomic_load(&r->shard_of[i]) < 0)
            return 1;
    return 0;
}

int kvfe_router_open(kvfe_router **out, const char *sched, char *err, size_t errlen)
{
    *out = NULL;
    kvfe_router *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    for (const char *p = sched; *p && r->n_sched < MAX_SCHEDS;) {
        size_t k = strcspn(p, ",");
        if (k && k < sizeof r->sched[0])
            snprintf(r->sched[r->n_sched++], sizeof r->sched[0], "%.*s", (int)k, p);
        p += k + (p[k] == ',');
    }
    pthread_mutex_init(&r->mu, NULL);
    if (!r->n_sched) {
        snprintf(err, errlen, "kvf-sched: expected HOST:PORT[,...] (up to %d replicas), got \"%s\"",
                 MAX_SCHEDS, sched);
        kvfe_router_close(&r);
        return KVF_EINVAL;
    }
    int rc = list_engines(r, err, errlen);
    if (rc) {
        kvfe_router_close(&r);
        return rc;
    }
    atomic_init(&r->shards, 1);
    for (int i = 0; i < MAX_SCHEDS; i++)
        atomic_init(&r->shard_of[i], -1);
    learn_shards(r, QUICK_TIMEOUT_MS);
    *out = r;
    return 0;
}

void kvfe_router_close(kvfe_router **rp)
{
    if (!rp || !*rp)
        return;
    kvfe_router *r = *rp;
    for (size_t i = 0; r->sent && i < r->n_eng; i++)
        free(r->sent[i].key);
    free(r->sent);
    free(r->eng);
    free(r->outstanding);
    pthread_mutex_destroy(&r->mu);
    free(r);
    *rp = NULL;
}

size_t kvfe_router_engine_count(const kvfe_router *r)
{
    return r->n_eng;
}

const kvfe_router_engine *kvfe_router_engine_at(const kvfe_router *r, size_t i)
{
    return &r->eng[i];
}

void kvfe_router_kv_bytes(kvfe_router *r, uint64_t *load, uint64_t *save)
{
    *load = *save = 0;
    for (size_t i = 0; i < r->n_eng; i++) {
        char url[256], err[256];
        snprintf(url, sizeof url, "http://%s/v1/health", r->eng[i].endpoint);
        long st;
        json_t *o = NULL;
        if (kvf__http_call("GET", url, NULL, QUICK_TIMEOUT_MS, &st, &o, err, sizeof err) == 0 &&
            o) {
            json_t *c = json_object_get(o, "connector");
            *load += (uint64_t)json_integer_value(json_object_get(c, "load_bytes"));
            *save += (uint64_t)json_integer_value(json_object_get(c, "save_bytes"));
        }
        json_decref(o);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Calls to engines */

static json_t *tokens_json(const uint32_t *t, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_integer(t[i]));
    return a;
}

/* The tokens as kvf-sched's compact form: base64 of their little-endian 32-bit ids (one JSON
 * string for kvf-sched to parse instead of n numbers). NULL without memory. */
static json_t *tokens_b64(const uint32_t *t, size_t n)
{
    uint8_t *raw = malloc(4 * n + 1);
    size_t cap = sodium_base64_ENCODED_LEN(4 * n, sodium_base64_VARIANT_ORIGINAL);
    char *text = malloc(cap);
    json_t *out = NULL;
    if (raw && text) {
        for (size_t i = 0; i < n; i++)
            raw[4 * i] = (uint8_t)t[i], raw[4 * i + 1] = (uint8_t)(t[i] >> 8),
                    raw[4 * i + 2] = (uint8_t)(t[i] >> 16), raw[4 * i + 3] = (uint8_t)(t[i] >> 24);
        sodium_bin2base64(text, cap, raw, 4 * n, sodium_base64_VARIANT_ORIGINAL);
        out = json_string(text);
    }
    free(raw);
    free(text);
    return out;
}

static atomic_int *outstanding_of(kvfe_router *r, const kvfe_router_engine *e)
{
    return &r->outstanding[e - r->eng];
}

/* The engine with the fewest calls of this router in flight; the first listed on a tie. */
static size_t least_outstanding(kvfe_router *r)
{
    size_t best = 0;
    for (size_t i = 1; i < r->n_eng; i++)
        if (atomic_load(&r->outstanding[i]) < atomic_load(&r->outstanding[best]))
            best = i;
    return best;
}

static uint64_t fold(const kvf_key *k)
{
    return k->lo ^ k->hi; /* keys are hashes already */
}

/* Remembers q's chunk keys as the prefix engine i was sent last; on no memory, that it holds
 * none. */
static void note_sent(kvfe_router *r, size_t i, const kvfe_route *q)
{
    sent_prefix *p = &r->sent[i];
    pthread_mutex_lock(&r->mu);
    if (q->n_keys > p->cap) {
        uint64_t *k = realloc(p->key, q->n_keys * sizeof *k);
        p->key = k ? k : p->key;
        p->cap = k ? q->n_keys : p->cap;
    }
    p->n = q->n_keys <= p->cap ? q->n_keys : 0;
    for (size_t c = 0; c < p->n; c++)
        p->key[c] = fold(&q->keys[c]);
    pthread_mutex_unlock(&r->mu);
}

/* The number of q's leading chunk keys that engine i was sent last. Lock held. */
static size_t sent_match_locked(const kvfe_router *r, size_t i, const kvfe_route *q)
{
    const sent_prefix *p = &r->sent[i];
    size_t c = 0;
    while (c < p->n && c < q->n_keys && p->key[c] == fold(&q->keys[c]))
        c++;
    return c;
}

const kvfe_router_engine *kvfe_router_pick(kvfe_router *r, const kvfe_route *q, kvfe_pick how)
{
    size_t least = least_outstanding(r), best = least, best_match = 0;
    if (how != KVFE_PICK_PREFIX || q->n_keys == 0)
        return &r->eng[least];
    pthread_mutex_lock(&r->mu);
    for (size_t i = 0; i < r->n_eng; i++) {
        size_t m = sent_match_locked(r, i, q);
        int fewer = atomic_load(&r->outstanding[i]) < atomic_load(&r->outstanding[best]);
        if (m > best_match || (m == best_match && m > 0 && fewer)) {
            best = i;
            best_match = m;
        }
    }
    pthread_mutex_unlock(&r->mu);
    int holds_half = best_match > 0 && best_match * 2 >= q->n_keys;
    int balanced =
        atomic_load(&r->outstanding[best]) <= atomic_load(&r->outstanding[least]) + KVFE_PICK_SLACK;
    return &r->eng[holds_half && balanced ? best : least];
}

/* Sends body (taken: it is released here) to engine e, counting the call as outstanding there
 * while it runs. Returns 0 with *rep set (caller owns it), or a KVF_E* code with q->err set and
 * *rep NULL. */
/* A streamed reply's first token came: its time is the request's first token's. */
static void first_token_came(void *arg, json_t *line)
{
    (void)line;
    kvfe_route *q = arg;
    q->first_token_at = now_s();
    q->first_token_streamed = 1;
}

/* Sends body (consumed) to e's path and takes its reply. stream: the body asks the engine to
 * send the first token the moment its pass gives it (a streamed reply), which sets
 * q->first_token_at; an engine that does not stream answers whole. */
static int call_engine(kvfe_router *r, const kvfe_router_engine *e, const char *path, json_t *body,
                       json_t **rep, kvfe_route *q, int stream)
{
    long st;
    atomic_int *out = outstanding_of(r, e);
    note_sent(r, (size_t)(e - r->eng), q);
    atomic_fetch_add(out, 1);
    if (stream && body)
        json_object_set_new(body, "stream", json_true());
    int rc = post(e->endpoint, path, body, stream ? first_token_came : NULL, q, &st, rep, q->err,
                  sizeof q->err);
    atomic_fetch_sub(out, 1);
    json_decref(body);
    if (!rc && st != 200) {
        json_t *m = json_object_get(*rep, "error");
        snprintf(q->err, sizeof q->err, "%s: HTTP %ld: %s", e->id, st,
                 json_is_string(m) ? json_string_value(m) : "");
        rc = status_code(st);
    }
    if (rc) {
        json_decref(*rep);
        *rep = NULL;
    }
    return rc;
}

/* Takes the prefill's figures from its reply (a prefill's or a generate's). */
static void take_prefill(kvfe_route *q, const kvfe_router_engine *pe, const kvfe_router_engine *de,
                         json_t *rep)
{
    const char *tr = json_string_value(json_object_get(rep, "transport"));
    const char *why = json_string_value(json_object_get(rep, "transport_reason"));
    q->prefill = pe;
    q->decode = de;
    q->device_tokens = (size_t)num(rep, "device_tokens");
    q->loaded_tokens = (size_t)num(rep, "loaded_tokens");
    q->saved_tokens = (size_t)num(rep, "saved_tokens");
    q->queue_s = num(rep, "queue_s");
    q->prefill_s = num(rep, "prefill_s");
    q->compute_s = num(rep, "compute_s");
    q->load_wait_s = num(rep, "wait_s");
    q->gpu_turn_s = num(json_object_get(rep, "gpu_turn"), "wait_s");
    q->gpu_yielded_s = num(json_object_get(rep, "gpu_turn"), "yielded_s");
    q->gpu_beside = json_is_true(json_object_get(json_object_get(rep, "gpu_turn"), "beside"));
    json_t *pc = json_object_get(rep, "pass_clock");
    q->pass_thread_cpu_s = numor(pc, "thread_cpu_s", -1);
    q->pass_process_cpu_s = numor(pc, "process_cpu_s", -1);
    q->pass_gpu_s = numor(pc, "gpu_s", -1);
    q->save_s = num(rep, "save_s");
    q->shm_bytes = num(rep, "shm_bytes");
    q->net_bytes = num(rep, "net_bytes");
    json_t *pf = json_object_get(rep, "prefetch");
    q->prefetch_tokens = (size_t)num(pf, "tokens");
    q->prefetch_ready_tokens = (size_t)num(pf, "ready_tokens");
    q->prefetch_deadline_missed = json_is_true(json_object_get(pf, "deadline_missed"));
    snprintf(q->transport, sizeof q->transport, "%s", tr ? tr : "");
    snprintf(q->transport_reason, sizeof q->transport_reason, "%s", why ? why : "");
}

/* Takes the generated tokens and the decode's figures from its reply (a decode's or a
 * generate's). Returns 0 or KVF_ENOMEM. */
static int take_decode(kvfe_route *q, json_t *rep)
{
    json_t *toks = json_object_get(rep, "tokens"), *itl = json_object_get(rep, "itl_s");
    size_t nt = json_array_size(toks), ni = json_array_size(itl);
    q->generated = malloc((nt ? nt : 1) * sizeof *q->generated);
    q->itl_s = malloc((ni ? ni : 1) * sizeof *q->itl_s);
    if (!q->generated || !q->itl_s) {
        kvfe_route_release(q);
        snprintf(q->err, sizeof q->err, "out of memory for a reply of %zu tokens", nt);
        return KVF_ENOMEM;
    }
    for (size_t i = 0; i < nt; i++)
        q->generated[i] = (uint32_t)json_integer_value(json_array_get(toks, i));
    for (size_t i = 0; i < ni; i++)
        q->itl_s[i] = json_number_value(json_array_get(itl, i));
    q->n_generated = nt;
    q->n_itl = ni;
    q->decode_s = num(rep, "decode_s");
    if (q->decode != q->prefill) {
        q->shm_bytes += num(rep, "shm_bytes");
        q->net_bytes += num(rep, "net_bytes");
    }
    q->first_token_mismatch = json_is_true(json_object_get(rep, "first_token_mismatch"));
    return 0;
}

/* Clears q's outputs; a route that still holds generated tokens leaks them (release it first). */
static void clear_outputs(kvfe_route *q)
{
    size_t from = offsetof(kvfe_route, rejected);
    memset((char *)q + from, 0, sizeof *q - from);
    q->pass_thread_cpu_s = q->pass_process_cpu_s = q->pass_gpu_s = -1; /* not given */
}

/* Tells the caller that the prefill's outputs are in. */
static void prefilled(kvfe_route *q)
{
    if (q->on_prefill)
        q->on_prefill(q, q->arg);
}

/* The "reuse" field of a request for reuse. */
static json_t *reuse_json(kvfe_reuse reuse)
{
    return reuse == KVFE_REUSE_ENGINE ? json_string("engine")
                                      : json_boolean(reuse == KVFE_REUSE_ALL);
}

/* Adds the plan's load deadline, sources (where its load takes each run of chunks from; NULL:
 * none) and ticket, if any, to the body of q's prefill or generate. Returns body. */
static json_t *with_plan(json_t *body, const kvfe_route *q, json_t *sources)
{
    if (body && q->load_deadline_ms > 0)
        json_object_set_new(body, "load_deadline_ms", json_real(q->load_deadline_ms));
    if (body && q->ticket)
        json_object_set_new(body, "ticket", json_integer((json_int_t)q->ticket));
    if (body && json_array_size(sources))
        json_object_set(body, "sources", sources);
    return body;
}

/* The sources of a plan's load_from_store action (a new reference), or NULL. */
static json_t *plan_sources(json_t *pl)
{
    size_t i;
    json_t *a;
    json_array_foreach(json_object_get(pl, "actions"), i, a)
    {
        const char *k = json_string_value(json_object_get(a, "action"));
        json_t *src = json_object_get(a, "sources");
        if (k && !strcmp(k, "load_from_store") && json_is_array(src))
            return json_incref(src);
    }
    return NULL;
}

/* Sends q whole to e (/v1/generate) and takes the reply, which brings the first token with the
 * others. */
static int generate_on(kvfe_router *r, const kvfe_router_engine *e, kvfe_reuse reuse, json_t *toks,
                       json_t *sources, kvfe_route *q)
{
    json_t *body = json_pack("{s:O,s:i,s:o}", "tokens", toks, "max_tokens", (int)q->max_tokens,
                             "reuse", reuse_json(reuse));
    with_plan(body, q, sources);
    json_t *rep = NULL;
    int rc = call_engine(r, e, "/v1/generate", body, &rep, q, 1);
    if (rc)
        return rc;
    q->done_at = now_s();
    if (!q->first_token_streamed)
        q->first_token_at = q->done_at;
    take_prefill(q, e, e, rep);
    rc = take_decode(q, rep);
    json_decref(rep);
    if (!rc)
        prefilled(q);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Serving */

/* Asks kvf-sched where to run q. Returns 0 with *pe and *de set, and *sources (the plan's load
 * sources, a reference of the caller's, or NULL), or a KVF_E* code. */
static int place(kvfe_router *r, json_t *toks, kvfe_route *q, const kvfe_router_engine **pe,
                 const kvfe_router_engine **de, json_t **sources)
{
    *sources = NULL;
    json_t *keys = json_array();
    for (size_t k = 0; k < q->n_keys; k++) {
        char hex[33];
        json_array_append_new(keys, json_string(kvf_key_to_hex(&q->keys[k], hex)));
    }
    json_t *b64 = tokens_b64(q->tokens, q->n);
    json_t *body = b64 ? json_pack("{s:o,s:o,s:i}", "tokens", b64, "chunk_keys", keys,
                                   "output_tokens", (int)q->max_tokens)
                       : json_pack("{s:O,s:o,s:i}", "tokens", toks, "chunk_keys", keys,
                                   "output_tokens", (int)q->max_tokens);
    if (q->slo_ttft_ms > 0)
        json_object_set_new(body, "slo_ttft_ms", json_real(q->slo_ttft_ms));
    long st;
    json_t *pl = NULL;
    double t0 = now_s();
    int rc = KVF_ECONNREFUSED, first = atomic_load(&r->cur);
    /* Sharded: the replicas of the shard that holds the prompt's prefix are asked first (only
     * they know where it is cached); the others place it without that, where none answers. */
    int order[MAX_SCHEDS], n_order = 0, shard = -1;
    if (shards_to_learn(r))
        learn_shards(r, RELEARN_TIMEOUT_MS);
    unsigned shards = atomic_load(&r->shards);
    if (shards > 1 && r->block_tokens && q->n >= r->block_tokens) {
        uint64_t h;
        kvf_events_hash_blocks(q->tokens, 1, r->block_tokens, 0, &h);
        shard = (int)kvf_events_shard_of(h, shards);
    }
    for (int pass = 0; pass < 2; pass++)
        for (int t = 0; t < r->n_sched; t++) {
            int at = (first + t) % r->n_sched;
            if ((shard < 0 || atomic_load(&r->shard_of[at]) == shard) == (pass == 0))
                order[n_order++] = at;
        }
    for (int t = 0; t < n_order; t++) {
        int at = order[t];
        rc = post(r->sched[at], "/v1/place", body, NULL, NULL, &st, &pl, q->err, sizeof q->err);
        if (rc == KVF_ENOMEM)
            break;
        if (rc == 0) { /* an answer: this replica is asked first from now on */
            atomic_store(&r->cur, at);
            break;
        }
        json_decref(pl); /* no answer (refused, timed out): the next replica */
        pl = NULL;
    }
    q->place_s = now_s() - t0;
    json_decref(body);
    if (!rc && st == 429) {
        q->rejected = 1;
        rc = KVF_EAGAIN;
    } else if (!rc && st != 200) {
        snprintf(q->err, sizeof q->err, "kvf-sched: HTTP %ld", st);
        rc = status_code(st);
    }
    if (rc)
        goto out_decref;
    *pe = NULL;
    *de = NULL;
    const char *pid = json_string_value(json_object_get(pl, "prefill"));
    const char *did = json_string_value(json_object_get(pl, "decode"));
    for (size_t i = 0; i < r->n_eng; i++) {
        *pe = pid && !strcmp(r->eng[i].id, pid) ? &r->eng[i] : *pe;
        *de = did && !strcmp(r->eng[i].id, did) ? &r->eng[i] : *de;
    }
    q->colocated = json_is_true(json_object_get(pl, "colocated"));
    q->load_deadline_ms = num(pl, "load_deadline_ms");
    json_t *tk = json_object_get(pl, "ticket");
    q->ticket = json_is_integer(tk) && json_integer_value(tk) > 0 &&
                        json_integer_value(tk) <= ((json_int_t)1 << 53)
                    ? (uint64_t)json_integer_value(tk)
                    : 0;
    *sources = plan_sources(pl);
    if (!*pe || !*de) {
        snprintf(q->err, sizeof q->err,
                 "kvf-sched placed the request on an engine the router does not know");
        rc = KVF_ENOENT;
        json_decref(*sources);
        *sources = NULL;
    }
out_decref:
    json_decref(pl);
    return rc;
}

/* Prefills on pe, then hands the request over to de: the decode engine is told the first token
 * and how many tokens the prefill saves, and waits for them in the stores. */
static int prefill_then_decode(kvfe_router *r, const kvfe_router_engine *pe,
                               const kvfe_router_engine *de, json_t *toks, json_t *sources,
                               kvfe_route *q)
{
    json_t *rep = NULL;
    int rc = call_engine(r, pe, "/v1/prefill",
                         with_plan(json_pack("{s:O}", "tokens", toks), q, sources), &rep, q, 1);
    if (rc)
        return rc;
    if (!q->first_token_streamed)
        q->first_token_at = now_s();
    take_prefill(q, pe, de, rep);
    json_int_t first_token = json_integer_value(json_array_get(json_object_get(rep, "tokens"), 0));
    json_decref(rep);
    prefilled(q);
    json_t *body =
        json_pack("{s:O,s:I,s:i,s:I}", "tokens", toks, "first_token", first_token, "max_tokens",
                  (int)q->max_tokens, "expect_cached", (json_int_t)q->saved_tokens);
    if (body && q->ticket) /* kvf-sched keeps the decode it placed here until this is listed */
        json_object_set_new(body, "ticket", json_integer((json_int_t)q->ticket));
    rep = NULL;
    rc = call_engine(r, de, "/v1/decode", body, &rep, q, 0);
    if (rc)
        return rc;
    q->done_at = now_s();
    q->handoff_s = num(rep, "handoff_s");
    q->decode_queue_s = num(rep, "queue_s");
    rc = take_decode(q, rep);
    json_decref(rep);
    return rc;
}

int kvfe_router_serve(kvfe_router *r, kvfe_route *q)
{
    clear_outputs(q);
    json_t *toks = tokens_json(q->tokens, q->n);
    const kvfe_router_engine *pe, *de;
    json_t *sources = NULL;
    int rc = place(r, toks, q, &pe, &de, &sources);
    if (rc)
        goto out_decref;
    if (q->colocated)
        rc = generate_on(r, de, KVFE_REUSE_ALL, toks, sources, q);
    else
        rc = prefill_then_decode(r, pe, de, toks, sources, q);
out_decref:
    json_decref(sources);
    json_decref(toks);
    return rc;
}

int kvfe_router_generate(kvfe_router *r, const kvfe_router_engine *e, kvfe_reuse reuse,
                         kvfe_route *q)
{
    clear_outputs(q);
    json_t *toks = tokens_json(q->tokens, q->n);
    int rc = generate_on(r, e ? e : kvfe_router_pick(r, q, KVFE_PICK_LEAST_LOADED), reuse, toks,
                         NULL, q);
    json_decref(toks);
    return rc;
}

int kvfe_router_prefill(kvfe_router *r, const kvfe_router_engine *e, kvfe_reuse reuse,
                        kvfe_route *q)
{
    clear_outputs(q);
    json_t *rep = NULL;
    int rc = call_engine(
        r, e, "/v1/prefill",
        json_pack("{s:o,s:o}", "tokens", tokens_json(q->tokens, q->n), "reuse", reuse_json(reuse)),
        &rep, q, 1);
    if (rc)
        return rc;
    if (!q->first_token_streamed)
        q->first_token_at = now_s();
    take_prefill(q, e, e, rep);
    json_decref(rep);
    prefilled(q);
    return 0;
}

void kvfe_route_release(kvfe_route *q)
{
    if (!q)
        return;
    free(q->generated);
    free(q->itl_s);
    q->generated = NULL;
    q->itl_s = NULL;
    q->n_generated = q->n_itl = 0;
}
