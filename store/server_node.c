/*
 * The storage node server's requests about the node as a whole: HELLO (versions, limits and
 * capabilities, and the namespace a connection binds), CLEAR (every entry of a namespace, or of
 * all) and STATS (the cache's and the server's counters as one JSON object).
 */
#include "server_int.h"

#include "replicate.h"

#include "metrics.h"

#include "kvf/error.h"

#include "bytes.h"
#include "cache.h"
#include "rdma_serve.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

void kvf__req_hello(conn *c)
{
    kvf_server *s = c->lp->srv;
    const uint8_t *p = c->rbuf;
    uint32_t vmin = kvf__get_u32(p), vmax = kvf__get_u32(p + 4);
    uint64_t ns = kvf__get_u64(p + 8);
    uint64_t caps = kvf__get_u64(p + 16);
    if (vmin > KVF_WIRE_VERSION || vmax < KVF_WIRE_VERSION) {
        kvf__reply_error(c, KVF_EVERSION, 1, "client speaks versions %u..%u, this node speaks %u",
                         vmin, vmax, KVF_WIRE_VERSION);
        return;
    }
    c->ns_bound = ns;
    uint8_t r[KVF_HELLO_REPLY_AUTH_LEN + 24 + 128];
    size_t rlen = KVF_HELLO_REPLY_LEN;
    int rdma = s->rdma && (!s->o.tenants || s->o.rdma_tenants);
    uint64_t served = caps & KVF_CAP_ALL & (rdma ? KVF_CAP_ALL : ~KVF_CAP_RDMA);
    if (s->o.tenants && c->role == KVF_ROLE_NONE) {
        /* A fresh challenge per HELLO: AUTH signs the latest one. */
        kvf__auth_random(c->nonce, sizeof c->nonce);
        c->challenged = 1;
        served |= KVF_CAP_AUTH;
        memcpy(r + KVF_HELLO_REPLY_LEN, c->nonce, sizeof c->nonce);
        rlen = KVF_HELLO_REPLY_AUTH_LEN;
    }
    if ((caps & KVF_CAP_SHM) && s->ufd >= 0) {
        /* Where a client on this host finds the node's shared memory: its boot id says whether
         * it is on this host, the name where to connect. */
        if (rlen == KVF_HELLO_REPLY_LEN)
            memset(r + KVF_HELLO_REPLY_LEN, 0, KVF_AUTH_NONCE_LEN);
        uint8_t *t = r + KVF_HELLO_REPLY_AUTH_LEN;
        size_t nl = strlen(s->shm_name), padded = (nl + 7) & ~(size_t)7;
        memcpy(t, s->boot_id, 16);
        kvf__put_u32(t + 16, (uint32_t)nl);
        kvf__put_u32(t + 20, 0);
        memset(t + 24, 0, padded);
        memcpy(t + 24, s->shm_name, nl);
        rlen = KVF_HELLO_REPLY_AUTH_LEN + 24 + padded;
        served |= KVF_CAP_SHM;
    }
    kvf__put_u32(r, KVF_WIRE_VERSION);
    kvf__put_u32(r + 4, s->o.max_items);
    kvf__put_u64(r + 8, served);
    kvf__put_u64(r + 16, s->o.max_request);
    kvf_cache_stats st;
    kvf__cache_lock(s->o.cache);
    kvf__cache_stats_locked(s->o.cache, &st);
    kvf__cache_unlock(s->o.cache);
    kvf__put_u64(r + 24, st.memory);
    kvf__put_u64(r + 32, s->o.node_id);
    kvf__put_u32(r + 40, rdma ? kvf__rserve_port(s->rdma) : 0);
    kvf__put_u32(r + 44, s->o.holders);
    kvf__reply_copy(c, 0, 0, 0, r, rlen);
}

void kvf__req_clear(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint64_t ns = kvf__get_u64(c->rbuf);
    int all = (c->h.flags & KVF_WF_ALL_NS) != 0;
    if (!all && !kvf__conn_ns_ok(c, ns)) {
        kvf__reply_error(c, KVF_ENAMESPACE, 0,
                         "clear of namespace %016" PRIx64 " on a connection bound to %016" PRIx64,
                         ns, c->ns_bound);
        return;
    }
    if (all && c->ns_bound) {
        kvf__reply_error(c, KVF_EACCES, 0, "a connection bound to a namespace cannot clear all");
        return;
    }
    if (all && c->role != KVF_ROLE_ADMIN) {
        kvf__reply_error(c, KVF_EACCES, 0, "clear of all namespaces is for the admin role");
        return;
    }
    ns = kvf__conn_ns_scope(c, ns);
    kvf__cache_lock(s->o.cache);
    uint64_t removed = kvf__cache_clear_locked(s->o.cache, ns, all);
    kvf__cache_unlock(s->o.cache);
    kvf_info(s->o.log, "cleared %" PRIu64 " entries (%s)", removed,
             all ? "all namespaces" : "one namespace");
    if (kvf__sdisk_clear(c, ns, all, removed))
        return; /* answered once the disk tier cleared too */
    uint8_t r[8];
    kvf__put_u64(r, removed);
    kvf__reply_copy(c, 0, 0, 0, r, 8);
}

/* The cache's figures st and the server's counters, as members of o. */
static void stats_figures(json_t *o, kvf_server *s, const kvf_cache_stats *st)
{
#define SET(k, v) json_object_set_new(o, k, json_integer((json_int_t)(v)))
    SET("node_id", s->o.node_id);
    SET("memory", st->memory);
    SET("used", st->used);
    SET("free", st->free);
    SET("free_blocks", st->free_blocks);
    SET("entries", st->entries);
    SET("max_entries", st->max_entries);
    SET("ready_bytes", st->ready_bytes);
    SET("reserved", st->reserved);
    SET("pinned", st->pinned);
    SET("referenced", st->referenced);
    SET("hits", st->hits);
    SET("misses", st->misses);
    SET("puts", st->puts);
    SET("duplicates", st->duplicates);
    SET("evictions", st->evictions);
    SET("removed", st->removed);
    SET("rejected_full", st->rejected_full);
    SET("expired_pins", st->expired_pins);
    SET("expired_reservations", st->expired_reservations);
    SET("cleared", st->cleared);
    SET("connections", atomic_load(&s->n_conns));
    SET("accepted", atomic_load(&s->n_accepted));
    SET("connections_shed", atomic_load(&s->n_shed));
    SET("bytes_in", atomic_load(&s->bytes_in));
    SET("bytes_out", atomic_load(&s->bytes_out));
    SET("reply_heap_bytes", atomic_load(&s->out_heap)); /* queued replies' copies (OUT_HEAP_*) */
    SET("protocol_errors", atomic_load(&s->proto_errors));
    SET("threads", s->nloops);
    SET("max_request", s->o.max_request);
#undef SET
    json_object_set_new(o, "policy", json_string(st->policy));
    json_object_set_new(o, "transport", json_string(s->rdma ? "tcp+rdma" : "tcp"));
}

/* The shared-memory side's figures as a new object; NULL when out of memory. */
static json_t *stats_shm(kvf_server *s)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    json_object_set_new(o, "served", json_boolean(s->ufd >= 0));
    json_object_set_new(o, "socket", json_string(s->shm_name));
    json_object_set_new(o, "arena_mappable", json_boolean(s->arena_fd >= 0));
#define SSET(k, v) json_object_set_new(o, k, json_integer((json_int_t)(v)))
    SSET("accepted", atomic_load(&s->shm_accepted));
    SSET("maps", atomic_load(&s->shm_maps));
    SSET("staging_bytes", atomic_load(&s->shm_staging_bytes));
    SSET("put_bytes", atomic_load(&s->shm_put_bytes));
    SSET("staged_get_bytes", atomic_load(&s->shm_get_bytes));
#undef SSET
    return o;
}

/* The RDMA side's figures (or why it is not served) as a new object; NULL when out of memory. */
static json_t *stats_rdma(kvf_server *s)
{
    json_t *rd = json_object();
    if (!rd)
        return NULL;
    uint64_t open = 0, accepted = 0;
    if (s->rdma)
        kvf__rserve_counts(s->rdma, &open, &accepted);
    json_object_set_new(rd, "served", json_boolean(s->rdma != NULL));
    if (!s->rdma)
        json_object_set_new(rd, "why_not", json_string(s->rdma_why));
    json_object_set_new(rd, "port", json_integer(s->rdma ? kvf__rserve_port(s->rdma) : 0));
#define RSET(k, v) json_object_set_new(rd, k, json_integer((json_int_t)(v)))
    RSET("connections", open);
    RSET("accepted", accepted);
    RSET("leases", atomic_load(&s->rdma_leased));
    RSET("released", atomic_load(&s->rdma_released));
    RSET("expired", atomic_load(&s->rdma_expired));
    RSET("leases_open", atomic_load(&s->rdma_leases_open));
    RSET("reserved", atomic_load(&s->rdma_reserved));
    RSET("committed", atomic_load(&s->rdma_committed));
#undef RSET
    return rd;
}

/* STATS of a tenant: its own use of the node and its quotas, nothing of others'. */
static json_t *stats_tenant(conn *c)
{
    kvf_server *s = c->lp->srv;
    kvf_cache_tenant_stats ts;
    kvf__cache_lock(s->o.cache);
    kvf__cache_tenant_stats_locked(s->o.cache, c->who.index, &ts);
    kvf__cache_unlock(s->o.cache);
    json_t *o = json_object();
    if (!o)
        return NULL;
#define SET(k, v) json_object_set_new(o, k, json_integer((json_int_t)(v)))
    SET("node_id", s->o.node_id);
    SET("bytes", ts.bytes);
    SET("entries", ts.entries);
    SET("reserved", ts.reserved);
    SET("quota_bytes", ts.max_bytes);
    SET("quota_reservations", ts.max_reserved);
    SET("quota_evictions", ts.quota_evictions);
    SET("quota_rejected", ts.quota_rejected);
#undef SET
    json_object_set_new(o, "tenant", json_string(c->who.name));
    json_object_set_new(o, "role", json_string(kvf__auth_role_name(c->role)));
    return o;
}

/* The authentication figures (or that there is none) as a new object; NULL when out of memory. */
static json_t *stats_auth(kvf_server *s)
{
    json_t *a = json_object();
    if (!a)
        return NULL;
    size_t keys = 0, names = 0;
    if (s->o.tenants)
        kvf__tenants_count(s->o.tenants, &keys, &names);
    json_object_set_new(a, "required", json_boolean(s->o.tenants != NULL));
#define ASET(k, v) json_object_set_new(a, k, json_integer((json_int_t)(v)))
    ASET("keys", keys);
    ASET("tenants", names);
    ASET("ok", atomic_load(&s->auth_ok));
    ASET("failed", atomic_load(&s->auth_failed));
    ASET("refused", atomic_load(&s->auth_refused));
    ASET("timeouts", atomic_load(&s->auth_timeouts));
#undef ASET
    return a;
}

/* Answers c's STATS with o (NULL: out of memory) as compact JSON, and drops o. */
static void reply_json(conn *c, json_t *o)
{
    char *text = o ? json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(o);
    if (!text) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    kvf__reply_copy(c, 0, 0, 0, text, strlen(text));
    free(text);
}

void kvf__server_set_replicator(kvf_server *s, struct kvf__replicator *r)
{
    s->rep = r;
}

/* STATS' "replication" object, or NULL without replication. */
static json_t *stats_replication(kvf_server *s)
{
    if (!s->rep)
        return NULL;
    kvf__replicate_stats r;
    kvf__replicator_stats(s->rep, &r);
    return json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I,s:I}", "hits", (json_int_t)r.hits, "copies",
                     (json_int_t)r.copies, "peers", (json_int_t)r.peers, "peers_down",
                     (json_int_t)r.peers_down, "queued", (json_int_t)r.queued, "made",
                     (json_int_t)r.made, "failed", (json_int_t)r.failed, "skipped_full",
                     (json_int_t)r.full, "skipped_no_peer", (json_int_t)r.no_peer);
}

/* STATS of the node: the cache's and the server's counters, RDMA's and authentication's, and
 * the requests served per opcode. NULL when out of memory. */
static json_t *stats_node(kvf_server *s)
{
    kvf_cache_stats st;
    kvf__cache_lock(s->o.cache);
    kvf__cache_stats_locked(s->o.cache, &st);
    kvf__cache_unlock(s->o.cache);
    json_t *o = json_object();
    json_t *req = json_object();
    if (!o || !req) {
        json_decref(o);
        json_decref(req);
        return NULL;
    }
    stats_figures(o, s, &st);
    json_t *rd = stats_rdma(s);
    if (rd)
        json_object_set_new(o, "rdma", rd);
    json_t *au = stats_auth(s);
    if (au)
        json_object_set_new(o, "auth", au);
    json_t *sh = stats_shm(s);
    if (sh)
        json_object_set_new(o, "shm", sh);
    json_t *dk = kvf__sdisk_stats_json(s);
    if (dk)
        json_object_set_new(o, "disk", dk);
    json_t *rp = stats_replication(s);
    if (rp)
        json_object_set_new(o, "replication", rp);
    for (unsigned op = 1; op < 32; op++) {
        const char *name = kvf__wire_opcode_name(op);
        if (name)
            json_object_set_new(req, name, json_integer((json_int_t)atomic_load(&s->reqs[op])));
    }
    json_object_set_new(o, "requests", req);
    return o;
}

void kvf__req_stats(conn *c)
{
    reply_json(c, c->role == KVF_ROLE_ADMIN ? stats_node(c->lp->srv) : stats_tenant(c));
}

void kvf__server_metrics(void *ud, kvf__metrics *m)
{
    kvf_server *s = ud;
    kvf_cache_stats st;
    kvf__cache_lock(s->o.cache);
    kvf__cache_stats_locked(s->o.cache, &st);
    kvf__cache_unlock(s->o.cache);
    const kvf__metric_value f[] = {
        {"arena_bytes", "Size of the DRAM arena.", 0, (double)st.memory},
        {"arena_used_bytes", "Arena bytes held by entries.", 0, (double)st.used},
        {"arena_free_bytes", "Arena bytes free.", 0, (double)st.free},
        {"arena_free_blocks", "Free blocks of the arena (its fragmentation).", 0,
         (double)st.free_blocks},
        {"entries", "Entries in the index.", 0, (double)st.entries},
        {"max_entries", "Capacity of the index.", 0, (double)st.max_entries},
        {"ready_bytes", "Bytes of entries that can be read.", 0, (double)st.ready_bytes},
        {"reserved_bytes", "Bytes reserved for puts in progress.", 0, (double)st.reserved},
        {"pinned_entries", "Entries pinned against eviction.", 0, (double)st.pinned},
        {"referenced_entries", "Entries being read (never evicted while read).", 0,
         (double)st.referenced},
        {"connections", "Client connections open.", 0, (double)atomic_load(&s->n_conns)},
        {"event_loop_threads", "Event-loop threads serving clients.", 0, (double)s->nloops},
        {"hits_total", "Gets and lookups of entries present.", 1, (double)st.hits},
        {"misses_total", "Gets and lookups of entries absent.", 1, (double)st.misses},
        {"puts_total", "Entries stored.", 1, (double)st.puts},
        {"duplicates_total", "Puts of entries already present.", 1, (double)st.duplicates},
        {"evictions_total", "Entries evicted for room.", 1, (double)st.evictions},
        {"removed_total", "Entries removed on request.", 1, (double)st.removed},
        {"rejected_full_total", "Puts refused: full of pinned, referenced or reserved data.", 1,
         (double)st.rejected_full},
        {"expired_pins_total", "Pins whose lease ran out.", 1, (double)st.expired_pins},
        {"expired_reservations_total", "Reservations abandoned by their writers.", 1,
         (double)st.expired_reservations},
        {"cleared_total", "Entries removed by CLEAR.", 1, (double)st.cleared},
        {"connections_accepted_total", "Client connections accepted.", 1,
         (double)atomic_load(&s->n_accepted)},
        {"connections_shed_total", "Connections closed at the descriptor limit.", 1,
         (double)atomic_load(&s->n_shed)},
        {"received_bytes_total", "Bytes received from clients over TCP.", 1,
         (double)atomic_load(&s->bytes_in)},
        {"sent_bytes_total", "Bytes sent to clients over TCP.", 1,
         (double)atomic_load(&s->bytes_out)},
        {"protocol_errors_total", "Malformed or refused frames.", 1,
         (double)atomic_load(&s->proto_errors)},
    };
    kvf__metrics_set_all(m, f, sizeof f / sizeof f[0]);
    kvf__sdisk_metrics(s, m);
    if (s->rep) {
        kvf__replicate_stats r;
        kvf__replicator_stats(s->rep, &r);
        const kvf__metric_value rv[] = {
            {"replica_peers", "Storage nodes hot entries may be copied to.", 0, (double)r.peers},
            {"replica_peers_down", "Of those, the ones left out after a failed copy.", 0,
             (double)r.peers_down},
            {"replicas_queued_total", "Hot entries queued for a copy on another node.", 1,
             (double)r.queued},
            {"replicas_made_total", "Copies stored on (or found on) the next node.", 1,
             (double)r.made},
            {"replicas_failed_total", "Copies that did not store (asked again at a later read).", 1,
             (double)r.failed},
            {"replicas_skipped_total", "Hot entries not queued: the queue full or no live peer.", 1,
             (double)(r.full + r.no_peer)},
        };
        kvf__metrics_set_all(m, rv, sizeof rv / sizeof rv[0]);
    }
    kvf__metric *req = kvf__metric_counter(
        m, "requests_total",
        "Requests served, by operation, transport (tcp, or unix: the node's Unix socket of "
        "clients on this host) and result (ok, or error: answered with an error).",
        "op,transport,result");
    static const char *const transports[2] = {"tcp", "unix"};
    for (unsigned op = 1; op < 32; op++) {
        const char *name = kvf__wire_opcode_name(op);
        for (int t = 0; name && t < 2; t++) {
            uint64_t n = atomic_load(&s->reqs_by[t][op]), e = atomic_load(&s->errs_by[t][op]);
            if (!n && !e && t == 1)
                continue; /* no Unix-socket series for operations never seen there */
            kvf__series_set(kvf__metric_series(req, (const char *[]){name, transports[t], "ok"}),
                            (double)(n > e ? n - e : 0));
            kvf__series_set(kvf__metric_series(req, (const char *[]){name, transports[t], "error"}),
                            (double)e);
        }
    }
}

int kvf__server_metrics_bind(kvf_server *s, kvf__metrics *m)
{
    kvf__metric *f = kvf__metric_histogram(
        m, "op_seconds",
        "A request's time on the node, by operation: from its header read to its handler's end "
        "(a get's reply queued; a put's table read, its data still to come).",
        "op", kvf__metrics_latency_buckets, kvf__metrics_latency_nbuckets);
    if (!f)
        return -1;
    for (unsigned op = 1; op < 32; op++) {
        const char *name = kvf__wire_opcode_name(op);
        if (name && !(s->m_op[op] = kvf__metric_series(f, (const char *[]){name})))
            return -1;
    }
    return 0;
}
