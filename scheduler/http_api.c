/*
 * kvf-sched's HTTP API (docs/scheduler.md, "HTTP API"): its routes and their JSON, served by
 * libmicrohttpd's one polling thread (transport/httpd.c) with jansson bodies.
 *
 *   POST   /v1/instances          register an engine instance (again: a heartbeat)
 *   GET    /v1/instances          list them
 *   DELETE /v1/instances/ID       remove one
 *   GET    /v1/stores             the storage nodes' data addresses (--stores)
 *   POST   /v1/instances/ID/load  an engine's load report
 *   POST /v1/place                place a request
 *   GET  /v1/index/stats          index and event-ingestion counters
 *   GET  /metrics                 Prometheus text format
 *
 * Every route that reads or changes the scheduler holds the daemon's lock (daemon.h) while it
 * does; bad input gets a 4xx reply with {"error": "..."} and changes nothing. Every number a body
 * gives is range-checked (record.c): callers are not authenticated, and one instance reporting a
 * negative or absurd load would win every placement.
 */
#include "daemon.h"
#include "record.h"

#include "kvf/events.h"
#include "kvf/kvf.h"

#include "clock.h"
#include "member.h"

#include <inttypes.h>
#include <jansson.h>
#include <sodium.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned send_json(kvf__http_reply *c, unsigned status, json_t *o)
{
    c->json = o;
    return status;
}

static unsigned send_error(kvf__sched_daemon *d, kvf__http_reply *c, unsigned status,
                           const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static unsigned send_error(kvf__sched_daemon *d, kvf__http_reply *c, unsigned status,
                           const char *fmt, ...)
{
    (void)d;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->json = json_pack("{s:s}", "error", msg);
    return status;
}

static const char *role_name(kvf_role r)
{
    return r == KVF_ROLE_PREFILL ? "prefill" : r == KVF_ROLE_DECODE ? "decode" : "both";
}

/* What to do about an id that is taken, for the 409 and 503 replies. */
static const char *expiry_advice(const kvf__sched_daemon *d, char *buf, size_t n)
{
    if (d->ttl_ns)
        snprintf(buf, n, "instances expire %.15g s after their last load report or registration",
                 (double)d->ttl_ns / 1e9);
    else
        snprintf(buf, n, "instances do not expire (--instance-ttl 0)");
    return buf;
}

/* Whether the caller (the token that authenticated the request; NULL without --tokens) may act
 * on instance idx: the token that registered it may, and anyone may act on an instance no token
 * registered. Under d->mu. */
static int owner_ok_locked(const kvf__sched_daemon *d, int idx, const char *caller)
{
    const char *owner = d->reg[idx].owner;
    return !caller || !owner[0] || !strcmp(owner, caller);
}

static unsigned post_instance(kvf__sched_daemon *d, kvf__http_reply *c, json_t *o)
{
    kvf_instance_info in;
    char err[256] = "", replay[128] = "";
    uint32_t event_shards;
    if (kvf__sched_instance_parse(o, &in, replay, sizeof replay, &event_shards, err, sizeof err) !=
        0)
        return send_error(d, c, 400, "%s", err);
    int idx = -1, fresh = 0, pinned = 0;
    char advice[128], owner[64] = "";
    pthread_mutex_lock(&d->mu);
    int had = kvf_sched_instance_find(d->s, in.id);
    if (had >= 0 && !owner_ok_locked(d, had, c->caller)) {
        snprintf(owner, sizeof owner, "%s", d->reg[had].owner);
        pthread_mutex_unlock(&d->mu);
        return send_error(d, c, 403, "instance \"%s\" was registered with token \"%s\", not \"%s\"",
                          in.id, owner, c->caller);
    }
    int rc =
        kvf__sched_register_locked(d, &in, replay, event_shards, 0, &idx, &fresh, err, sizeof err);
    if (rc == 0 && fresh && c->caller)
        snprintf(d->reg[idx].owner, sizeof d->reg[idx].owner, "%s", c->caller);
    size_t registered = kvf_sched_instance_count(d->s);
    if (rc == KVF_EEXIST)
        pinned = d->reg[kvf_sched_instance_find(d->s, in.id)].pinned;
    pthread_mutex_unlock(&d->mu);
    if (rc == KVF_EEXIST)
        return send_error(d, c, 409,
                          "cannot register: %s; DELETE /v1/instances/%s first, or wait for it to "
                          "expire (%s)",
                          err, in.id,
                          pinned ? "it comes from the cluster file and does not expire"
                                 : expiry_advice(d, advice, sizeof advice));
    if (rc == KVF_ENOSPC)
        return send_error(d, c, 503,
                          "cannot register \"%s\": instance table full (%zu of %d); %s, and "
                          "DELETE /v1/instances/ID removes one",
                          in.id, registered, KVF_SCHED_MAX_INSTANCES,
                          expiry_advice(d, advice, sizeof advice));
    if (rc == KVF_E2BIG)
        return send_error(d, c, 503,
                          "cannot register \"%s\": %s; DELETE /v1/instances/ID "
                          "removes one",
                          in.id, err);
    if (rc)
        return send_error(d, c, 400, "cannot register \"%s\": invalid capability record", in.id);
    if (fresh)
        kvf_info(&d->lg, "instance %s registered (%s, %u-token blocks)", in.id, role_name(in.role),
                 in.block_tokens);
    return send_json(c, fresh ? 201 : 200, json_pack("{s:s,s:i}", "id", in.id, "index", idx));
}

/* Removes an instance: from placement, the index and the table, its subscriptions ended. */
static unsigned delete_instance(kvf__sched_daemon *d, kvf__http_reply *c, const char *id)
{
    pthread_mutex_lock(&d->mu);
    int idx = kvf_sched_instance_find(d->s, id);
    int allowed = idx < 0 || owner_ok_locked(d, idx, c->caller);
    if (idx >= 0 && allowed) {
        kvf__sched_remove_locked(d, idx);
        d->deleted++;
    }
    pthread_mutex_unlock(&d->mu);
    if (idx < 0)
        return send_error(d, c, 404, "unknown instance \"%s\"", id);
    if (!allowed)
        return send_error(d, c, 403, "instance \"%s\" was registered with another token", id);
    kvf_info(&d->lg, "instance %s removed (DELETE)", id);
    return send_json(c, 200, json_pack("{s:s,s:b}", "id", id, "deleted", 1));
}

static unsigned get_instances(kvf__sched_daemon *d, kvf__http_reply *c)
{
    json_t *arr = json_array();
    pthread_mutex_lock(&d->mu);
    for (size_t i = 0; i < kvf_sched_instance_slots(d->s); i++) {
        const kvf_instance_info *in = kvf_sched_instance_get(d->s, (int)i);
        kvf_instance_load L = {0};
        if (!in || kvf_sched_instance_load_get(d->s, (int)i, &L) != 0)
            continue;
        /* with its last load report (zeros before one came) */
        json_t *rec = json_pack("{s:s,s:s,s:s,s:s,s:i,s:I,s:{s:f,s:f,s:i,s:I}}", "id", in->id,
                                "role", role_name(in->role), "endpoint", in->endpoint, "events",
                                in->events, "block_tokens", (int)in->block_tokens,
                                "capacity_blocks", (json_int_t)in->capacity_blocks, "load",
                                "queued_prefill_tokens", L.queued_prefill_tokens,
                                "queued_prefill_s", L.queued_prefill_s, "active_decodes",
                                (int)L.active_decodes, "used_blocks", (json_int_t)L.used_blocks);
        if (d->reg[i].event_shards)
            json_object_set_new(rec, "event_shards", json_integer(d->reg[i].event_shards));
        if (in->host[0])
            json_object_set_new(rec, "host", json_string(in->host));
        if (in->zone[0])
            json_object_set_new(rec, "zone", json_string(in->zone));
        json_array_append_new(arr, rec);
    }
    pthread_mutex_unlock(&d->mu);
    return send_json(c, 200, json_pack("{s:o}", "instances", arr));
}

static unsigned post_load(kvf__sched_daemon *d, kvf__http_reply *c, const char *id, json_t *o)
{
    kvf_instance_load L = {0};
    char err[256];
    double q, a, u, qs;
    if (kvf__sched_json_num(o, "queued_prefill_tokens", 0, MAX_QUEUED_TOKENS, 0, 0, &q, err,
                            sizeof err) ||
        kvf__sched_json_num(o, "queued_prefill_s", 0, MAX_QUEUED_SECONDS, 0, 0, &qs, err,
                            sizeof err) ||
        kvf__sched_json_num(o, "active_decodes", 0, MAX_ACTIVE_DECODES, 1, 0, &a, err,
                            sizeof err) ||
        kvf__sched_json_num(o, "used_blocks", 0, MAX_CAPACITY_BLOCKS, 1, 0, &u, err, sizeof err))
        return send_error(d, c, 400, "%s", err);
    L.queued_prefill_tokens = q;
    L.queued_prefill_s = qs;
    L.active_decodes = (uint32_t)a;
    L.used_blocks = (uint64_t)u;
    /* the tickets of the placed requests the engine took in lately (sent.c) */
    uint64_t acks[MAX_LOAD_TICKETS];
    size_t n_acks = 0;
    json_t *tk = json_object_get(o, "tickets");
    if (tk && (!json_is_array(tk) || json_array_size(tk) > MAX_LOAD_TICKETS))
        return send_error(d, c, 400, "\"tickets\" must be an array of at most %d placement tickets",
                          MAX_LOAD_TICKETS);
    for (size_t i = 0; tk && i < json_array_size(tk); i++) {
        json_t *v = json_array_get(tk, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > MAX_TICKET)
            return send_error(d, c, 400,
                              "\"tickets\"[%zu]: a placement's ticket is an integer "
                              "0..2^53",
                              i);
        acks[n_acks++] = (uint64_t)json_integer_value(v);
    }
    kvf__sched_sent_sort(acks, n_acks);
    pthread_mutex_lock(&d->mu);
    int idx = kvf_sched_instance_find(d->s, id);
    int allowed = idx < 0 || owner_ok_locked(d, idx, c->caller);
    if (idx >= 0 && allowed) {
        kvf__sched_sent_apply_locked(d, idx, acks, n_acks, tk != NULL, &L);
        kvf_sched_instance_load(d->s, idx, &L);
        kvf__sched_seen_locked(d, idx);
    }
    pthread_mutex_unlock(&d->mu);
    if (idx < 0)
        return send_error(d, c, 404, "unknown instance \"%s\"", id);
    if (!allowed)
        return send_error(d, c, 403, "instance \"%s\" was registered with another token", id);
    return send_json(c, 200, json_pack("{s:b}", "ok", 1));
}

static const char *action_name(kvf_action_kind k)
{
    switch (k) {
    case KVF_ACT_LOAD_FROM_STORE:
        return "load_from_store";
    case KVF_ACT_PREFILL:
        return "prefill";
    case KVF_ACT_SAVE_TO_STORE:
        return "save_to_store";
    case KVF_ACT_HANDOFF:
        return "handoff_through_store";
    }
    return "?";
}

/* A placement request as its body gives it; the arrays are the caller's to free. */
typedef struct place_body {
    uint32_t *tokens;
    kvf_key *keys;
    kvf_place_req rq;
} place_body;

/* Reads a placement request's body into *b. Returns 0, or the HTTP status to answer (400 for bad
 * input, 500 when out of memory) with the reason in err. */
/* "tokens" as a base64 string of little-endian 32-bit ids (what the router sends: a 16K-token
 * prompt is one JSON string to parse instead of 16K numbers) into b->tokens. 0 or an HTTP
 * status with err. */
static unsigned tokens_b64(const char *s, size_t len, place_body *b, size_t *n, char *err,
                           size_t errlen)
{
    size_t cap = len / 4 * 3 + 3, got = 0;
    uint8_t *raw = malloc(cap ? cap : 1);
    if (!raw) {
        snprintf(err, errlen, "out of memory");
        return 500;
    }
    if (sodium_base642bin(raw, cap, s, len, NULL, &got, NULL, sodium_base64_VARIANT_ORIGINAL) !=
            0 ||
        got == 0 || got % 4) {
        free(raw);
        snprintf(err, errlen,
                 "\"tokens\" as a string must be base64 of little-endian 32-bit token ids "
                 "(a non-empty multiple of 4 bytes)");
        return 400;
    }
    *n = got / 4;
    b->tokens = malloc(*n * sizeof *b->tokens);
    if (!b->tokens) {
        free(raw);
        snprintf(err, errlen, "out of memory");
        return 500;
    }
    for (size_t i = 0; i < *n; i++)
        b->tokens[i] = (uint32_t)raw[4 * i] | (uint32_t)raw[4 * i + 1] << 8 |
                       (uint32_t)raw[4 * i + 2] << 16 | (uint32_t)raw[4 * i + 3] << 24;
    free(raw);
    return 0;
}

static unsigned place_body_read(json_t *o, place_body *b, char *err, size_t errlen)
{
    json_t *toks = json_object_get(o, "tokens");
    size_t n = 0;
    if (json_is_string(toks)) {
        unsigned st =
            tokens_b64(json_string_value(toks), json_string_length(toks), b, &n, err, errlen);
        if (st)
            return st;
    } else if (!json_is_array(toks) || json_array_size(toks) == 0) {
        snprintf(err, errlen,
                 "\"tokens\" must be a non-empty array of token ids (or their "
                 "little-endian 32-bit base64)");
        return 400;
    } else {
        n = json_array_size(toks);
    }
    json_t *ks = json_object_get(o, "chunk_keys");
    if (ks && !json_is_array(ks) && !json_is_null(ks)) {
        snprintf(err, errlen, "\"chunk_keys\" must be an array of chunk keys (32 hex digits each)");
        return 400;
    }
    size_t nk = json_is_array(ks) ? json_array_size(ks) : 0;
    if (!b->tokens)
        b->tokens = malloc(n * sizeof *b->tokens);
    b->keys = nk ? malloc(nk * sizeof *b->keys) : NULL;
    if (!b->tokens || (nk && !b->keys)) {
        snprintf(err, errlen, "out of memory");
        return 500;
    }
    for (size_t i = 0; json_is_array(toks) && i < n; i++) {
        json_t *v = json_array_get(toks, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > UINT32_MAX) {
            snprintf(err, errlen, "tokens[%zu] is not a 32-bit token id", i);
            return 400;
        }
        b->tokens[i] = (uint32_t)json_integer_value(v);
    }
    for (size_t i = 0; i < nk; i++) {
        json_t *v = json_array_get(ks, i);
        if (!json_is_string(v) || kvf_key_from_hex(json_string_value(v), &b->keys[i]) != 0) {
            snprintf(err, errlen, "chunk_keys[%zu] is not 32 hex digits", i);
            return 400;
        }
    }
    double ot, slo;
    if (kvf__sched_json_num(o, "output_tokens", 0, MAX_OUTPUT_TOKENS, 1, 0, &ot, err, errlen) ||
        kvf__sched_json_num(o, "slo_ttft_ms", 0, MAX_SLO_TTFT_MS, 0, 0, &slo, err, errlen))
        return 400;
    b->rq = (kvf_place_req){.tokens = b->tokens,
                            .n_tokens = n,
                            .chunk_keys = b->keys,
                            .n_chunks = nk,
                            .output_tokens = (uint32_t)ot,
                            .slo_ttft_s = slo / 1e3};
    return 0;
}

/* Where a planned load takes its chunks from: per run, the storage node (its number and data
 * address), how near it is to the loading instance, its tier and the tokens. */
static json_t *sources_json(const kvf_sched *s, const kvf_place_res *rs)
{
    json_t *a = json_array();
    for (int i = 0; i < rs->n_sources; i++) {
        const kvf_store_source *x = &rs->sources[i];
        json_array_append_new(a, json_pack("{s:i,s:s,s:s,s:s,s:I,s:I}", "node", x->node, "store",
                                           kvf_sched_store_addr(s, x->node), "near",
                                           kvf_near_name(x->near), "tier",
                                           x->disk_only ? "disk" : "dram", "from",
                                           (json_int_t)x->from, "tokens", (json_int_t)x->tokens));
    }
    if (rs->sources_truncated) /* more runs than a plan lists: the rest as the connector finds */
        json_array_append_new(a, json_pack("{s:b}", "more", 1));
    return a;
}

/* The reply to a placement: the instances by id and endpoint, the cached tokens per tier, the
 * expected TTFT and the plan. The TTFT figure is the cost model's estimate: labelled simulated;
 * the actions' labels say whether each can run here. Called with d->mu held. */
static json_t *plan_json_locked(const kvf_sched *s, const kvf_place_res *rs)
{
    const kvf_instance_info *pi = kvf_sched_instance_get(s, rs->prefill);
    const kvf_instance_info *di = kvf_sched_instance_get(s, rs->decode);
    json_t *acts = json_array();
    for (int i = 0; i < rs->n_actions; i++) {
        const kvf_action *a = &rs->actions[i];
        const kvf_instance_info *ai = kvf_sched_instance_get(s, a->instance);
        json_t *ao = json_pack("{s:s,s:s,s:I,s:f,s:s}", "action", action_name(a->kind), "instance",
                               ai ? ai->id : "", "tokens", (json_int_t)a->tokens, "seconds",
                               a->seconds, "label", kvf_label_name(a->label));
        if (a->kind == KVF_ACT_LOAD_FROM_STORE && rs->n_sources)
            json_object_set_new(ao, "sources", sources_json(s, rs));
        json_array_append_new(acts, ao);
    }
    json_t *o = json_pack(
        "{s:s,s:s,s:s,s:s,s:{s:I,s:I},s:f,s:b,s:b,s:o,s:s}", "prefill", pi ? pi->id : "",
        "prefill_endpoint", pi ? pi->endpoint : "", "decode", di ? di->id : "", "decode_endpoint",
        di ? di->endpoint : "", "cached_tokens", "device", (json_int_t)rs->cached_device, "store",
        (json_int_t)rs->cached_store, "expected_ttft_ms", rs->expected_ttft_s * 1e3, "rejected",
        rs->rejected, "colocated", rs->colocated, "actions", acts, "label", "simulated");
    if (rs->load_deadline_s > 0) /* the planned load's: the engine fetches from arrival */
        json_object_set_new(o, "load_deadline_ms", json_real(rs->load_deadline_s * 1e3));
    return o;
}

_Static_assert(KVF_SCHED_MAX_INSTANCES <= 4096, "post_lookup packs a slot in 12 bits");

static int by_size_desc(const void *a, const void *b)
{
    size_t x = *(const size_t *)a, y = *(const size_t *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Ready to place: at least one instance registered. 503 with the reason otherwise. */
static unsigned get_ready(kvf__sched_daemon *d, kvf__http_reply *c)
{
    pthread_mutex_lock(&d->mu);
    size_t n = kvf_sched_instance_count(d->s);
    int subs = kvf__sched_subscriptions_locked(d);
    pthread_mutex_unlock(&d->mu);
    if (!n)
        return send_json(c, 503,
                         json_pack("{s:s,s:s}", "status", "not ready", "why",
                                   "no engine instance is registered"));
    return send_json(c, 200,
                     json_pack("{s:s,s:I,s:i}", "status", "ready", "instances", (json_int_t)n,
                               "subscriptions", subs));
}

/* Who holds a request's prefix (the body of a placement), changing nothing: every instance
 * holding some of it with its tokens, longest first, and what the stores hold. */
static unsigned post_lookup(kvf__sched_daemon *d, kvf__http_reply *c, json_t *o)
{
    place_body b = {0};
    char err[256];
    unsigned status = place_body_read(o, &b, err, sizeof err);
    size_t *dev = status ? NULL : calloc(KVF_SCHED_MAX_INSTANCES, sizeof *dev);
    if (!status && !dev)
        status = 500, snprintf(err, sizeof err, "out of memory");
    if (status) {
        free(b.tokens), free(b.keys), free(dev);
        return send_error(d, c, status, "%s", err);
    }
    size_t store = 0;
    json_t *arr = json_array();
    pthread_mutex_lock(&d->mu);
    int rc = kvf_sched_lookup(d->s, &b.rq, dev, KVF_SCHED_MAX_INSTANCES, &store);
    /* the holders, longest prefix first: slots packed as (tokens << 12 | slot), sorted */
    size_t n = 0;
    for (size_t i = 0; !rc && i < KVF_SCHED_MAX_INSTANCES; i++)
        if (dev[i])
            dev[n++] = dev[i] << 12 | i;
    qsort(dev, n, sizeof *dev, by_size_desc);
    for (size_t k = 0; k < n; k++) {
        const kvf_instance_info *in = kvf_sched_instance_get(d->s, (int)(dev[k] & 4095));
        if (in)
            json_array_append_new(arr,
                                  json_pack("{s:s,s:s,s:I}", "id", in->id, "endpoint", in->endpoint,
                                            "tokens", (json_int_t)(dev[k] >> 12)));
    }
    pthread_mutex_unlock(&d->mu);
    size_t prompt = b.rq.n_tokens;
    free(b.tokens), free(b.keys), free(dev);
    if (rc) {
        json_decref(arr);
        return send_error(d, c, 400, "lookup: %s", kvf_strerror(rc));
    }
    return send_json(c, 200,
                     json_pack("{s:I,s:o,s:I,s:s}", "prompt_tokens", (json_int_t)prompt,
                               "instances", arr, "store_tokens", (json_int_t)store, "label",
                               "real"));
}

static unsigned post_place(kvf__sched_daemon *d, kvf__http_reply *c, json_t *o)
{
    place_body b = {0};
    char err[256];
    unsigned status = place_body_read(o, &b, err, sizeof err);
    if (status) {
        free(b.tokens);
        free(b.keys);
        return send_error(d, c, status, "%s", err);
    }
    kvf_place_res rs;
    json_t *out = NULL;
    uint64_t t0 = kvf__now_ns();
    pthread_mutex_lock(&d->mu);
    int rc = kvf_sched_place(d->s, &b.rq, &rs);
    kvf__series_observe(d->place_seconds, (double)(kvf__now_ns() - t0) / 1e9);
    d->placements++;
    d->rejections += rc == 0 && rs.rejected;
    if (!rc)
        out = plan_json_locked(d->s, &rs);
    if (!rc && !rs.rejected) { /* what place() added to the instances' loads, kept (sent.c) */
        uint64_t t =
            kvf__sched_sent_note_locked(d, 0, rs.prefill, (double)b.rq.n_tokens,
                                        rs.load_s + rs.prefill_s, rs.decode == rs.prefill, 0);
        if (rs.decode >= 0 && rs.decode != rs.prefill) /* its decode, after the prefill */
            kvf__sched_sent_note_locked(d, t, rs.decode, 0, 0, 1, 2 * rs.expected_ttft_s);
        json_object_set_new(out, "ticket", json_integer((json_int_t)t));
    }
    pthread_mutex_unlock(&d->mu);
    free(b.tokens);
    free(b.keys);
    if (rc == KVF_ENOENT)
        return send_error(d, c, 503,
                          "no instance can serve this request: none live with the prefill role "
                          "holds %zu tokens, or none that decodes holds them and the output",
                          b.rq.n_tokens);
    if (rc)
        return send_error(d, c, 503, "no instance can serve this request: %s", kvf_strerror(rc));
    return send_json(c, rs.rejected ? 429 : 200, out);
}

/* The storage nodes' data addresses, for connectors that are given only the scheduler. */
static unsigned get_stores(kvf__sched_daemon *d, kvf__http_reply *c)
{
    json_t *arr = json_array();
    char buf[sizeof d->stores];
    pthread_mutex_lock(&d->mu); /* etcd's watcher rewrites it as stores come and go */
    snprintf(buf, sizeof buf, "%s", d->stores);
    pthread_mutex_unlock(&d->mu);
    for (char *sv = NULL, *t = strtok_r(buf, ",", &sv); t; t = strtok_r(NULL, ",", &sv))
        json_array_append_new(arr, json_string(t));
    return send_json(c, 200, json_pack("{s:o}", "stores", arr));
}

/* The counters /v1/index/stats and /metrics report, taken at one moment. */
typedef struct stats {
    kvf_index_stats index;
    kvf_ingest_stats ingest;
    uint64_t gaps, missed, restarts, replayed, replay_timeouts, replay_retries, asks_deferred,
        late_joins, resyncs, placements, rejections;
    uint64_t expired, deleted; /* instances */
    uint64_t snapshots, snapshot_failures;
    uint64_t sharded_dropped;
    uint32_t shard, shards;
    int shard_mismatch; /* instances whose records say other shards than this replica's */
    uint64_t store_joins, store_leaves, engine_joins, engine_leaves;
    int etcd, etcd_synced, stores_registered;
    uint64_t requests, errors; /* HTTP requests served, and those answered with an error */
    uint64_t sent_acked, sent_readded, sent_reports_behind, sent_expired; /* sent.c */
    size_t sent_pending;
    size_t instances;
    int subs;
} stats;

static void stats_take(kvf__sched_daemon *d, stats *st)
{
    pthread_mutex_lock(&d->mu);
    kvf_sched_index_stats(d->s, &st->index);
    st->ingest = d->ingest;
    st->gaps = d->seq_gaps;
    st->missed = d->seq_missed;
    st->restarts = d->seq_restarts;
    st->replayed = d->replayed;
    st->replay_timeouts = d->replay_timeouts;
    st->replay_retries = d->replays_owed_retried;
    st->asks_deferred = d->asks_deferred;
    st->late_joins = d->late_joins;
    st->resyncs = d->resyncs;
    st->sharded_dropped = d->sharded_dropped;
    st->shard = d->shard;
    st->shards = d->shards > 1 ? d->shards : 1;
    st->snapshots = d->snapshots;
    st->snapshot_failures = d->snapshot_failures;
    st->store_joins = d->store_joins;
    st->store_leaves = d->store_leaves;
    st->engine_joins = d->engine_joins;
    st->engine_leaves = d->engine_leaves;
    st->etcd = d->store_rec != NULL;
    st->etcd_synced = kvf__sched_etcd_synced_locked(d);
    st->stores_registered = 0;
    for (int i = 0; st->etcd && i < KVF_SCHED_MAX_STORES; i++)
        st->stores_registered += d->store_rec[i][0] != 0;
    st->placements = d->placements;
    st->rejections = d->rejections;
    st->sent_pending = kvf__sched_sent_pending_locked(d); /* first: it drops the expired */
    st->sent_acked = d->sent_acked;
    st->sent_readded = d->sent_readded;
    st->sent_reports_behind = d->sent_reports_behind;
    st->sent_expired = d->sent_expired;
    st->instances = kvf_sched_instance_count(d->s);
    st->expired = d->expired;
    st->deleted = d->deleted;
    st->subs = kvf__sched_subscriptions_locked(d);
    st->shard_mismatch = 0;
    for (size_t i = 0; i < kvf_sched_instance_slots(d->s); i++) {
        uint32_t es = d->reg[i].event_shards;
        const kvf_instance_info *in = kvf_sched_instance_get(d->s, (int)i);
        st->shard_mismatch += in && in->events[0] && es && es != st->shards;
    }
    pthread_mutex_unlock(&d->mu);
    kvf__httpd_counts(d->httpd, &st->requests, &st->errors);
}

/* A counter as a JSON integer: JSON's are signed 64-bit, so a counter beyond INT64_MAX reads as
 * INT64_MAX, never as a negative number. */
static json_int_t counter(uint64_t v)
{
    return v > (uint64_t)INT64_MAX ? (json_int_t)INT64_MAX : (json_int_t)v;
}

static json_t *stats_json(const stats *st)
{
    const kvf_index_stats *x = &st->index;
    const kvf_ingest_stats *in = &st->ingest;
    json_t *o = json_pack(
        "{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:i,s:I,s:I,s:I}",
        "blocks", counter(x->blocks), "holdings", counter(x->holdings), "events",
        counter(x->events), "unknown_removals", counter(x->unknown_removals), "bytes",
        counter(x->bytes), "batches", counter(in->batches), "blocks_stored", counter(in->stored),
        "blocks_removed", counter(in->removed), "chunks", counter(in->chunks), "malformed",
        counter(in->malformed), "unknown_parents", counter(in->unknown_parents), "unknown_types",
        counter(in->unknown_types), "sequence_gaps", counter(st->gaps), "batches_missed",
        counter(st->missed), "sequence_restarts", counter(st->restarts), "batches_replayed",
        counter(st->replayed), "replay_timeouts", counter(st->replay_timeouts), "subscriptions",
        st->subs, "instances", counter(st->instances), "instances_expired", counter(st->expired),
        "instances_deleted", counter(st->deleted));
    json_object_set_new(o, "store_dram_chunks", json_integer(counter(x->store_dram_chunks)));
    json_object_set_new(o, "store_disk_chunks", json_integer(counter(x->store_disk_chunks)));
    json_object_set_new(o, "late_joins", json_integer(counter(st->late_joins)));
    json_object_set_new(o, "replay_retries", json_integer(counter(st->replay_retries)));
    json_object_set_new(o, "replay_asks_deferred", json_integer(counter(st->asks_deferred)));
    json_object_set_new(o, "resyncs", json_integer(counter(st->resyncs)));
    json_object_set_new(o, "shard", json_integer(st->shard));
    json_object_set_new(o, "shards", json_integer(st->shards));
    json_object_set_new(o, "sharded_batches_dropped", json_integer(counter(st->sharded_dropped)));
    json_object_set_new(o, "instances_shard_mismatch", json_integer(st->shard_mismatch));
    json_object_set_new(o, "store_snapshots", json_integer(counter(st->snapshots)));
    if (st->etcd)
        json_object_set_new(
            o, "etcd",
            json_pack("{s:b,s:i,s:I,s:I,s:I,s:I}", "synced", st->etcd_synced, "stores",
                      st->stores_registered, "store_joins", counter(st->store_joins),
                      "store_leaves", counter(st->store_leaves), "engine_joins",
                      counter(st->engine_joins), "engine_leaves", counter(st->engine_leaves)));
    json_object_set_new(o, "store_snapshot_failures", json_integer(counter(st->snapshot_failures)));
    json_object_set_new(o, "placements", json_integer(counter(st->placements)));
    json_object_set_new(o, "rejections", json_integer(counter(st->rejections)));
    json_object_set_new(
        o, "placement_tickets",
        json_pack("{s:I,s:I,s:I,s:I,s:I}", "pending", (json_int_t)st->sent_pending, "acked",
                  counter(st->sent_acked), "readded", counter(st->sent_readded), "reports_behind",
                  counter(st->sent_reports_behind), "expired", counter(st->sent_expired)));
    return o;
}

/* The figures of stats, mirrored into the registry at each scrape (core/metrics.h): gauges for
 * what is, counters for what has happened. */
static void metrics_collect(void *ud, kvf__metrics *m)
{
    kvf__sched_daemon *d = ud;
    stats st;
    stats_take(d, &st);
    const kvf_index_stats *x = &st.index;
    const kvf_ingest_stats *in = &st.ingest;
    const kvf__metric_value f[] = {
        {"index_blocks", "Distinct KV blocks in the prefix index.", 0, (double)x->blocks},
        {"index_holdings", "Block holdings in the index (a block times each holder).", 0,
         (double)x->holdings},
        {"index_bytes", "Memory the prefix index uses.", 0, (double)x->bytes},
        {"store_dram_chunks", "Chunks the storage nodes hold in DRAM (per node).", 0,
         (double)x->store_dram_chunks},
        {"store_disk_chunks", "Chunks the storage nodes hold on their disk tiers (per node).", 0,
         (double)x->store_disk_chunks},
        {"instances", "Registered engine instances.", 0, (double)st.instances},
        {"event_subscriptions", "Event streams subscribed to (engines and stores).", 0,
         (double)st.subs},
        {"index_events_total", "Events applied to the index.", 1, (double)x->events},
        {"index_unknown_removals_total", "Removals of blocks the index did not hold.", 1,
         (double)x->unknown_removals},
        {"event_batches_total", "KV event batches ingested.", 1, (double)in->batches},
        {"blocks_stored_total", "BlockStored events applied.", 1, (double)in->stored},
        {"blocks_removed_total", "BlockRemoved events applied.", 1, (double)in->removed},
        {"store_chunk_events_total", "Chunk events from the storage nodes.", 1, (double)in->chunks},
        {"events_malformed_total", "Events skipped as malformed.", 1, (double)in->malformed},
        {"events_unknown_parents_total", "Stored blocks dropped: their parent was not indexed.", 1,
         (double)in->unknown_parents},
        {"events_unknown_types_total", "Events of a type this version does not know.", 1,
         (double)in->unknown_types},
        {"sequence_gaps_total", "Gaps in publishers' sequence numbers.", 1, (double)st.gaps},
        {"batches_missed_total", "Event batches lost in sequence gaps.", 1, (double)st.missed},
        {"sequence_restarts_total", "Publishers seen to restart their sequence.", 1,
         (double)st.restarts},
        {"batches_replayed_total", "Batches recovered from publishers' replay sockets.", 1,
         (double)st.replayed},
        {"replay_timeouts_total", "Replay requests that timed out.", 1, (double)st.replay_timeouts},
        {"replay_retries_total",
         "Replays asked again for batches one not answered (to its end) still owed.", 1,
         (double)st.replay_retries},
        {"replay_asks_deferred_total",
         "Asks (snapshots to start or under way, first contacts, owed replays) a round of the "
         "events thread left to the next for the time it had spent asking.",
         1, (double)st.asks_deferred},
        {"late_joins_total", "First contacts that replayed a publisher from its start.", 1,
         (double)st.late_joins},
        {"resyncs_total", "Full resyncs after a gap beyond the replay window.", 1,
         (double)st.resyncs},
        {"store_snapshots_total", "Storage nodes' snapshots applied (first contact, lost events).",
         1, (double)st.snapshots},
        {"store_snapshot_failures_total", "Snapshots that did not arrive whole.", 1,
         (double)st.snapshot_failures},
        {"stores_registered", "Storage nodes registered in etcd (0 without --etcd).", 0,
         (double)st.stores_registered},
        {"store_joins_total", "Storage nodes that registered in etcd, or again.", 1,
         (double)st.store_joins},
        {"store_leaves_total", "Storage nodes whose registration went (lease lapsed or revoked).",
         1, (double)st.store_leaves},
        {"instances_expired_total", "Instances removed for silence (--instance-ttl).", 1,
         (double)st.expired},
        {"instances_deleted_total", "Instances removed by DELETE.", 1, (double)st.deleted},
        {"placements_total", "Placement decisions (POST /v1/place).", 1, (double)st.placements},
        {"rejections_total", "Requests rejected early (their SLO could not be met).", 1,
         (double)st.rejections},
        {"placements_pending", "Placements whose engines have not yet listed their tickets.", 0,
         (double)st.sent_pending},
        {"placements_acked_total", "Placements an engine's load report listed as taken in.", 1,
         (double)st.sent_acked},
        {"load_reports_behind_total",
         "Load reports taken before a request placed there arrived: its work was added back.", 1,
         (double)st.sent_reports_behind},
        {"placements_unacked_total", "Placements no load report listed within --placement-ack-s.",
         1, (double)st.sent_expired},
        {"http_requests_total", "HTTP requests served.", 1, (double)st.requests},
        {"http_errors_total", "HTTP requests answered with an error.", 1, (double)st.errors},
    };
    kvf__metrics_set_all(m, f, sizeof f / sizeof f[0]);
}

int kvf__sched_metrics_open(kvf__sched_daemon *d)
{
    d->metrics = kvf__metrics_new("kvf_sched");
    if (!d->metrics)
        return -1;
    kvf__metrics_on_collect(d->metrics, metrics_collect, d);
    d->place_seconds = kvf__metric_series(
        kvf__metric_histogram(d->metrics, "place_seconds",
                              "Time to place one request (POST /v1/place), lock wait included.",
                              NULL, kvf__metrics_latency_buckets, kvf__metrics_latency_nbuckets),
        NULL);
    return d->place_seconds ? 0 : -1;
}

static unsigned get_stats(kvf__sched_daemon *d, kvf__http_reply *c)
{
    stats st;
    stats_take(d, &st);
    return send_json(c, 200, stats_json(&st));
}

unsigned kvf__sched_http_route(void *cls, const char *method, const char *url, json_t *o,
                               kvf__http_reply *c)
{
    kvf__sched_daemon *d = cls;
    /* What has expired goes before anything is read or placed. */
    pthread_mutex_lock(&d->mu);
    kvf__sched_expire_locked(d);
    pthread_mutex_unlock(&d->mu);
    size_t ul = strlen(url);
    if (!strcmp(method, "DELETE")) {
        if (!strncmp(url, "/v1/instances/", 14) && ul > 14 && !strchr(url + 14, '/'))
            return delete_instance(d, c, url + 14);
        return send_error(d, c, strncmp(url, "/v1/", 4) ? 404 : 405, "%s %s: not served", method,
                          url);
    }
    if (!o) { /* a GET */
        if (!strcmp(url, "/metrics"))
            return kvf__http_metrics_reply(d->metrics, c);
        if (!strcmp(url, "/v1/index/stats"))
            return get_stats(d, c);
        if (!strcmp(url, "/v1/instances"))
            return get_instances(d, c);
        if (!strcmp(url, "/v1/stores"))
            return get_stores(d, c);
        if (!strcmp(url, "/healthz")) /* the process serves HTTP */
            return send_json(c, 200, json_pack("{s:s}", "status", "ok"));
        if (!strcmp(url, "/readyz"))
            return get_ready(d, c);
        return send_error(d, c, strncmp(url, "/v1/", 4) ? 404 : 405, "%s %s: not served", method,
                          url);
    }
    if (!strcmp(url, "/v1/instances"))
        return post_instance(d, c, o);
    if (!strcmp(url, "/v1/place"))
        return post_place(d, c, o);
    if (!strcmp(url, "/v1/lookup"))
        return post_lookup(d, c, o);
    if (!strncmp(url, "/v1/instances/", 14) && ul > 19 && !strcmp(url + ul - 5, "/load")) {
        char id[64];
        size_t idl = ul - 14 - 5;
        if (idl >= sizeof id)
            return send_error(d, c, 404, "unknown instance");
        memcpy(id, url + 14, idl);
        id[idl] = '\0';
        return post_load(d, c, id, o);
    }
    return send_error(d, c, 404, "POST %s: not served", url);
}
