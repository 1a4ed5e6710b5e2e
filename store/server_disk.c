/*
 * The storage node server's use of the disk tier (tier.h; docs/store.md "The disk tier"). No event
 * loop waits on a disk: a request that needs one is handed to the tier's workers with the
 * connection's id, and its reply comes back through the loop's inbox (server_inbox.c), as COPY's
 * does; replies are matched to requests by their ids (docs/protocol.md).
 *
 * - GET, SHM_GET, RDMA_GET, PIN and COPY: keys that miss DRAM but lie on disk are promoted
 *   first (read into fresh DRAM entries, held by a reference), then the request is run again on
 *   its loop as it came, and finds them in DRAM (a COPY's worker holds its own references until
 *   the target answered). A tier too busy to take the request (or down) leaves it to DRAM alone:
 *   misses, never a wait.
 * - EXISTS and LOOKUP: a key on disk is stored (the disk's index is in memory).
 * - EVICT and CLEAR: DRAM at once, then the disk through its writer (after the demotions queued
 *   before); the reply counts both.
 */
#include "server_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "cache.h"
#include "clock.h"
#include "metrics.h"
#include "tier.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

/* A request waiting on the tier. */
struct kvf__sdisk_job {
    kvf__tier_req r;
    kvf_server *srv;
    loop *lp;
    uint64_t conn_id;
    kvf_wire_hdr h;
    uint8_t *payload; /* PROMOTE: the request to run again */
    uint64_t plen;
    void (*handler)(conn *c);
    kvf_key *keys;
    int32_t *st;
    uint32_t *eids;
    uint8_t *keep;  /* PROMOTE: which entries stay in DRAM after the request */
    uint32_t *held; /* PROMOTE: the request's DRAM hits, held until it ran again */
    uint32_t n_held;
    uint32_t *idx;         /* EVICT: the request's index of each key asked of the disk */
    int32_t *all_st;       /* EVICT: every key's status (DRAM's, then the disk's merged in) */
    uint64_t dram_cleared; /* CLEAR: DRAM's count */
    uint64_t done_ns;      /* when the tier was done with it */
    deferred *done;
};

/* Drops the references the gate took on a request's DRAM hits. */
static void release_held(kvf_server *s, uint32_t *held, uint32_t n)
{
    if (!n)
        return;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++)
        kvf__cache_release_locked(s->o.cache, held[i]);
    kvf__cache_unlock(s->o.cache);
}

static void job_free(kvf__sdisk_job *j)
{
    if (!j)
        return;
    release_held(j->srv, j->held, j->n_held);
    free(j->held);
    free(j->payload);
    free(j->keys);
    free(j->st);
    free(j->eids);
    free(j->keep);
    free(j->idx);
    free(j->all_st);
    free(j->done);
    free(j);
}

/* A job for up to n keys of c's current request. */
static kvf__sdisk_job *job_new(conn *c, int kind, uint32_t n)
{
    kvf__sdisk_job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    size_t m = n ? n : 1;
    j->keys = malloc(m * sizeof *j->keys);
    j->st = malloc(m * sizeof *j->st);
    j->eids = calloc(m, sizeof *j->eids);
    j->keep = calloc(m, 1);
    j->done = calloc(1, sizeof *j->done);
    if (!j->keys || !j->st || !j->eids || !j->keep || !j->done) {
        job_free(j);
        return NULL;
    }
    j->srv = c->lp->srv;
    j->lp = c->lp;
    j->conn_id = c->id;
    j->h = c->h;
    j->done->fd = -1;
    j->done->disk = j;
    j->r.kind = kind;
    j->r.ud = j;
    j->r.keys = j->keys;
    j->r.st = j->st;
    j->r.eids = j->eids;
    j->r.keep = kind == KVF_TIER_PROMOTE ? j->keep : NULL;
    j->r.tenant = kvf__conn_tenant(c);
    return j;
}

/* The tier is done with j (on a worker): the loop finishes it. */
static void job_done(kvf__tier_req *r)
{
    kvf__sdisk_job *j = r->ud;
    j->done_ns = kvf__now_ns();
    kvf__inbox_post(j->lp, j->conn_id, NULL, j->done);
}

/* Hands j to the tier: 1 (c waits for it), or 0 when the tier did not take it (j freed). */
static int job_submit(conn *c, kvf__sdisk_job *j)
{
    j->r.done = job_done;
    for (uint32_t i = 0; i < j->r.n; i++)
        j->st[i] = KVF_ENOENT;
    if (kvf__tier_submit(c->lp->srv->o.tier, &j->r) != 0) {
        job_free(j);
        return 0;
    }
    c->pending_jobs++;
    return 1;
}

int kvf__sdisk_gate(conn *c, void (*handler)(conn *c))
{
    kvf_server *s = c->lp->srv;
    kvf__tier *t = s->o.tier;
    size_t off, stride;
    switch (c->h.opcode) {
    case KVF_OP_GET:
        off = 8, stride = 16;
        break;
    case KVF_OP_SHM_GET:
        off = 8, stride = 32;
        break;
    case KVF_OP_RDMA_GET:
    case KVF_OP_PIN:
        off = 16, stride = 16;
        break;
    case KVF_OP_COPY: /* ns, addr_len, deadline, the address padded to 8 bytes, the keys (its
                       * length was checked against them before this) */
        if (!kvf__copy_target_ok(s, c->rbuf))
            return 0; /* refused by its handler: nothing to read back for it */
        off = 16 + (((size_t)kvf__get_u32(c->rbuf + 8) + 7) & ~(size_t)7), stride = 16;
        break;
    default:
        return 0;
    }
    if (!t || c->disk_rerun || !kvf__tier_up(t))
        return 0;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    uint8_t *miss = calloc(n ? n : 1, 1);
    if (!miss)
        return 0;
    uint32_t misses = 0;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        kvf_key key = kvf__wire_key_get(c->rbuf + off + stride * i);
        if (!kvf__cache_contains_locked(s->o.cache, ns, &key)) {
            miss[i] = 1;
            misses++;
        }
    }
    kvf__cache_unlock(s->o.cache);
    kvf__sdisk_job *j = misses ? job_new(c, KVF_TIER_PROMOTE, misses) : NULL;
    if (j) {
        for (uint32_t i = 0; i < n; i++) {
            kvf_key key = kvf__wire_key_get(c->rbuf + off + stride * i);
            if (miss[i] && kvf__tier_contains(t, ns, &key, NULL))
                j->keys[j->r.n++] = key;
        }
    }
    /* The DRAM hits are held while the misses are promoted: the promotions' room must not be
     * made by evicting the request's own hits, which the rerun (it asks no disk) would miss. (A
     * request served from DRAM alone, the common case, takes no reference here.) */
    if (j && j->r.n && (j->held = malloc((n ? n : 1) * sizeof *j->held)) != NULL) {
        kvf__cache_lock(s->o.cache);
        for (uint32_t i = 0; i < n; i++) {
            kvf_key key = kvf__wire_key_get(c->rbuf + off + stride * i);
            if (!miss[i] &&
                kvf__cache_hold_key_locked(s->o.cache, ns, &key, &j->held[j->n_held]) == 0)
                j->n_held++;
        }
        kvf__cache_unlock(s->o.cache);
    }
    free(miss);
    if (!j)
        return 0;
    j->r.ns = ns;
    j->handler = handler;
    j->plen = c->h.payload_len;
    j->payload = j->r.n ? malloc(j->plen ? j->plen : 1) : NULL;
    if (!j->payload) {
        job_free(j);
        return 0;
    }
    memcpy(j->payload, c->rbuf, j->plen);
    return job_submit(c, j);
}

int kvf__sdisk_evict(conn *c, uint64_t ns, const uint8_t *keys, int32_t *st, uint32_t n)
{
    kvf__tier *t = c->lp->srv->o.tier;
    if (!t || !kvf__tier_up(t))
        return 0;
    kvf__sdisk_job *j = job_new(c, KVF_TIER_REMOVE, n);
    if (!j)
        return 0;
    j->idx = malloc((n ? n : 1) * sizeof *j->idx);
    if (!j->idx) {
        job_free(j);
        return 0;
    }
    /* a pinned or busy key stays on both tiers */
    for (uint32_t i = 0; i < n; i++)
        if (st[i] == 0 || st[i] == KVF_ENOENT) {
            j->idx[j->r.n] = i;
            j->keys[j->r.n++] = kvf__wire_key_get(keys + 16 * (size_t)i);
        }
    if (j->r.n == 0) {
        job_free(j);
        return 0;
    }
    j->r.ns = ns;
    if (!job_submit(c, j))
        return 0;   /* st is still the caller's */
    j->all_st = st; /* the loop finishes j only after this returns */
    return 1;
}

int kvf__sdisk_clear(conn *c, uint64_t ns, int all, uint64_t dram_cleared)
{
    kvf__tier *t = c->lp->srv->o.tier;
    if (!t || !kvf__tier_up(t))
        return 0;
    kvf__sdisk_job *j = job_new(c, KVF_TIER_CLEAR, 0);
    if (!j)
        return 0;
    j->r.ns = ns;
    j->r.all_ns = all;
    j->dram_cleared = dram_cleared;
    return job_submit(c, j);
}

/* A promoted request, run again on its loop as it came; then the promotions' references go. */
static void finish_promote(conn *c, kvf__sdisk_job *j)
{
    kvf_server *s = j->srv;
    if (c) {
        kvf_wire_hdr h0 = c->h;
        uint8_t *rb0 = c->rbuf;
        size_t rcap0 = c->rcap;
        c->h = j->h;
        c->rbuf = j->payload;
        c->rcap = j->plen;
        c->disk_rerun = 1;
        j->handler(c);
        c->disk_rerun = 0;
        c->h = h0;
        c->rbuf = rb0;
        c->rcap = rcap0;
    }
    /* the request's DRAM hits: its rerun took references of its own */
    release_held(s, j->held, j->n_held);
    j->n_held = 0;
    /* a cold object was served from disk through a DRAM entry that now leaves (the rerun's read
     * was its one hit; its reply's own references keep the bytes until sent) */
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < j->r.n; i++) {
        if (j->st[i] != 0)
            continue;
        if (!j->keep[i])
            kvf__cache_unpromote_locked(s->o.cache, j->eids[i], 1);
        kvf__cache_release_locked(s->o.cache, j->eids[i]);
    }
    kvf__cache_unlock(s->o.cache);
}

void kvf__sdisk_finish(conn *c, kvf__sdisk_job *j)
{
    kvf_wire_hdr h0;
    if (c)
        h0 = c->h;
    switch (j->r.kind) {
    case KVF_TIER_PROMOTE: {
        uint64_t t0 = kvf__now_ns();
        finish_promote(c, j);
        kvf_server *s = j->srv;
        atomic_fetch_add(&s->disk_finished, 1);
        atomic_fetch_add(&s->disk_finish_lag_ns, t0 > j->done_ns ? t0 - j->done_ns : 0);
        atomic_fetch_add(&s->disk_rerun_ns, kvf__now_ns() - t0);
        break;
    }
    case KVF_TIER_REMOVE:
        if (c) {
            for (uint32_t k = 0; k < j->r.n; k++)
                if (j->st[k] == 0)
                    j->all_st[j->idx[k]] = 0;
            c->h = j->h;
            kvf__reply_statuses(c, j->all_st, j->h.item_count);
            j->all_st = NULL; /* the reply took it */
        }
        break;
    case KVF_TIER_CLEAR:
        if (c) {
            uint8_t r[8];
            kvf__put_u64(r, j->dram_cleared + (uint64_t)j->r.cleared);
            c->h = j->h;
            kvf__reply_copy(c, 0, 0, 0, r, 8);
        }
        break;
    }
    if (c)
        c->h = h0;
    j->done = NULL; /* the inbox entry is the loop's to free */
    job_free(j);
}

int kvf__sdisk_has(kvf_server *s, uint64_t ns, const kvf_key *key)
{
    return s->o.tier && kvf__tier_contains(s->o.tier, ns, key, NULL);
}

json_t *kvf__sdisk_stats_json(kvf_server *s)
{
    kvf__tier *t = s->o.tier;
    if (!t)
        return NULL;
    kvf__tier_stats ts;
    kvf__tier_stats_get(t, &ts);
    json_t *o = json_object();
    json_t *devs = json_array();
    if (!o || !devs) {
        json_decref(o);
        json_decref(devs);
        return NULL;
    }
#define DSET(k, v) json_object_set_new(o, k, json_integer((json_int_t)(v)))
    DSET("devices", ts.devices);
    DSET("devices_down", ts.devices_down);
    DSET("bytes", ts.bytes);
    DSET("entries", ts.entries);
    DSET("entry_bytes", ts.entry_bytes);
    DSET("demoted", ts.demoted);
    DSET("demoted_bytes", ts.demoted_bytes);
    DSET("demote_skipped_cold", ts.demote_skipped_cold);
    DSET("demote_dropped_full", ts.demote_dropped_full);
    DSET("demote_failed", ts.demote_failed);
    DSET("written_through", ts.written_through);
    DSET("written_through_bytes", ts.written_through_bytes);
    DSET("write_through_dropped_full", ts.write_through_dropped_full);
    DSET("pending_bytes", ts.pending_bytes);
    DSET("promoted", ts.promoted);
    DSET("promoted_bytes", ts.promoted_bytes);
    DSET("promote_misses", ts.promote_misses);
    DSET("promote_failed", ts.promote_failed);
    DSET("promote_reads", ts.promote_reads);
    DSET("written_direct", ts.written_direct);
    DSET("read_direct", ts.read_direct);
    DSET("served_not_kept", ts.served_not_kept);
    DSET("removed", ts.removed);
    DSET("cleared", ts.cleared);
    DSET("verify_failures", ts.verify_failures);
    DSET("dropped", ts.dropped);
    DSET("announced", ts.announced);
    DSET("rebuilt_entries", ts.rebuilt_entries);
#undef DSET
    json_object_set_new(o, "rebuild_seconds", json_real(ts.rebuild_seconds));
    json_object_set_new(o, "promote_seconds", json_real(ts.promote_seconds));
    json_object_set_new(o, "read_seconds", json_real(ts.read_seconds));
    json_object_set_new(o, "write_seconds", json_real(ts.write_seconds));
    /* the promotions' time on the loops: waiting for the loop after the tier, then run again */
    json_object_set_new(o, "promotions_finished",
                        json_integer((json_int_t)atomic_load(&s->disk_finished)));
    json_object_set_new(o, "finish_lag_seconds",
                        json_real((double)atomic_load(&s->disk_finish_lag_ns) / 1e9));
    json_object_set_new(o, "rerun_seconds",
                        json_real((double)atomic_load(&s->disk_rerun_ns) / 1e9));
    const char *path;
    int down;
    uint64_t de, db;
    for (int i = 0; kvf__tier_device(t, i, &path, &down, &de, &db) == 0; i++) {
        json_t *d = json_object();
        if (!d)
            break;
        json_object_set_new(d, "path", json_string(path));
        json_object_set_new(d, "down", json_string(down ? strerror(down) : ""));
        json_object_set_new(d, "entries", json_integer((json_int_t)de));
        json_object_set_new(d, "entry_bytes", json_integer((json_int_t)db));
        json_array_append_new(devs, d);
    }
    json_object_set_new(o, "device_list", devs);
    return o;
}

void kvf__sdisk_metrics(kvf_server *s, kvf__metrics *m)
{
    if (!s->o.tier)
        return;
    kvf__tier_stats ts;
    kvf__tier_stats_get(s->o.tier, &ts);
    const kvf__metric_value f[] = {
        {"disk_bytes", "Size of the disk tier (every device).", 0, (double)ts.bytes},
        {"disk_entries", "Objects on the disk tier.", 0, (double)ts.entries},
        {"disk_entry_bytes", "Bytes of the objects on the disk tier.", 0, (double)ts.entry_bytes},
        {"disk_devices_down", "Disk tier devices down (an I/O error took them out).", 0,
         (double)ts.devices_down},
        {"disk_pending_bytes", "Arena bytes held by evicted entries waiting to be written.", 0,
         (double)ts.pending_bytes},
        {"disk_demoted_total", "Evicted entries written to the disk tier.", 1, (double)ts.demoted},
        {"disk_demoted_bytes_total", "Bytes of evicted entries written to the disk tier.", 1,
         (double)ts.demoted_bytes},
        {"disk_demote_skipped_cold_total", "Evicted entries not demoted: read too few times.", 1,
         (double)ts.demote_skipped_cold},
        {"disk_demote_dropped_full_total",
         "Evicted entries not demoted: the demotion queue was full.", 1,
         (double)ts.demote_dropped_full},
        {"disk_demote_failed_total", "Demotions that failed (an I/O error, no memory).", 1,
         (double)ts.demote_failed},
        {"disk_written_through_total",
         "Objects copied to the disk tier while staying in DRAM (pinned or hot).", 1,
         (double)ts.written_through},
        {"disk_written_through_bytes_total", "Bytes copied to the disk tier by write-through.", 1,
         (double)ts.written_through_bytes},
        {"disk_promoted_total", "Objects read from the disk tier back into the arena.", 1,
         (double)ts.promoted},
        {"disk_promoted_bytes_total", "Bytes read from the disk tier back into the arena.", 1,
         (double)ts.promoted_bytes},
        {"disk_promote_misses_total",
         "Promotions that found nothing (gone meanwhile, or failed verification).", 1,
         (double)ts.promote_misses},
        {"disk_promote_reads_total",
         "Reads issued for promotions (neighbours in the log read at once count once).", 1,
         (double)ts.promote_reads},
        {"disk_verify_failures_total", "Objects on disk whose checksums did not check (dropped).",
         1, (double)ts.verify_failures},
        {"disk_dropped_total",
         "Objects that left the disk tier otherwise than by EVICT (extent reused, CLEAR, failed "
         "verification).",
         1, (double)ts.dropped},
        {"disk_removed_total", "Objects removed from the disk tier by EVICT.", 1,
         (double)ts.removed},
        {"disk_cleared_total", "Objects removed from the disk tier by CLEAR.", 1,
         (double)ts.cleared},
        {"disk_read_seconds_total", "Time the disk tier's workers spent reading.", 1,
         ts.read_seconds},
        {"disk_write_seconds_total", "Time the disk tier's workers spent writing.", 1,
         ts.write_seconds},
        {"disk_promote_seconds_total",
         "Promotions' time in the tier, from a request's submission to its last key read.", 1,
         ts.promote_seconds},
        {"disk_promotions_finished_total", "Promoted requests run again on their loops.", 1,
         (double)atomic_load(&s->disk_finished)},
        {"disk_finish_lag_seconds_total",
         "Promoted requests' wait for their loop after the tier was done with them.", 1,
         (double)atomic_load(&s->disk_finish_lag_ns) / 1e9},
        {"disk_rerun_seconds_total", "Promoted requests' runs again on their loops.", 1,
         (double)atomic_load(&s->disk_rerun_ns) / 1e9},
        {"disk_rebuilt_entries", "Objects found on the disk tier at start.", 0,
         (double)ts.rebuilt_entries},
        {"disk_rebuild_seconds", "Time to rebuild the disk tier's index at start.", 0,
         ts.rebuild_seconds},
    };
    kvf__metrics_set_all(m, f, sizeof f / sizeof f[0]);
}
