/*
 * The disk tier's promotions (tier_int.h): a work's keys read from disk into freshly reserved
 * DRAM entries, committed, marked on disk and held for their requests' callers.
 */
#include "tier_int.h"

#include "kvf/error.h"

#include "clock.h"

#include <stdlib.h>
#include <unistd.h>

/* How long (ms) in all a promotion's work waits for reservations that others hold; past that, a
 * key refused is given up at once. */
#define RESERVE_WAIT_MS 200

/* Reads the m keys reserved (at[k]: the key, eid[k] its entry, dst[k] its bytes, cap[k] the
 * object's length) and commits each that checked, or aborts its entry. */
static void promote_round(device *v, uint32_t m, const item *const *at, const uint32_t *eid,
                          const kvf_key *keys, void **dst, const uint64_t *cap, uint64_t *got,
                          int *st)
{
    kvf__tier *t = v->t;
    kvf_cache *c = t->o.cache;
    uint64_t t0 = kvf__now_ns();
    int rc = m ? kvf__disk_get_many(v->d, at[0]->req->ns, m, keys, dst, cap, got, st) : 0;
    double secs = (double)(kvf__now_ns() - t0) / 1e9;
    uint64_t promoted = 0, bytes = 0, misses = 0, failed = 0, not_kept = 0;
    for (uint32_t k = 0; k < m; k++) {
        kvf__tier_req *r = at[k]->req;
        uint32_t i = at[k]->i;
        int s = rc ? rc : st[k];
        kvf__cache_lock(c);
        if (s == 0 && got[k] == cap[k] && kvf__cache_commit_locked(c, eid[k], TIER_OWNER) == 0) {
            kvf__cache_mark_on_disk_locked(c, eid[k]);
            kvf__cache_hold_locked(c, eid[k]);
            r->eids[i] = eid[k];
            r->st[i] = 0;
            if (r->keep) /* cold (read back fewer times than promote_reads): served, let go */
                r->keep[i] = t->o.promote_reads <= 1 ||
                             kvf__disk_note_read(v->d, r->ns, &r->keys[i]) >= t->o.promote_reads;
        } else {
            kvf__cache_abort_locked(c, eid[k], TIER_OWNER);
            r->st[i] = s == 0 || s == KVF_EOVERFLOW ? KVF_ENOENT : s;
        }
        kvf__cache_unlock(c);
        if (r->st[i] == 0) {
            promoted++;
            bytes += cap[k];
            not_kept += r->keep && !r->keep[i];
            __atomic_fetch_add(&r->bytes, cap[k], __ATOMIC_RELAXED);
        } else if (r->st[i] == KVF_ENOENT) {
            misses++;
        } else {
            failed++;
        }
    }
    pthread_mutex_lock(&t->mu);
    t->st.read_seconds += secs;
    t->st.promoted += promoted;
    t->st.promoted_bytes += bytes;
    t->st.served_not_kept += not_kept;
    t->st.promote_misses += misses;
    t->st.promote_failed += failed;
    pthread_mutex_unlock(&t->mu);
}

/* Reads the keys it[0..n) (of one namespace: one request's, or several's merged while they
 * waited), each into a DRAM entry reserved for it (charged to its request's tenant), committed
 * and marked on disk, and holds a reference on each for its request's caller. The reads go to
 * the engine at once (kvf__disk_get_many): objects demoted together are read back in one I/O. */
void kvf__tier_promote(device *v, const item *it, uint32_t n)
{
    kvf__tier *t = v->t;
    kvf_cache *c = t->o.cache;
    const item **at = malloc((n ? n : 1) * sizeof *at);
    uint32_t *eid = malloc((n ? n : 1) * sizeof *eid);
    kvf_key *keys = malloc((n ? n : 1) * sizeof *keys);
    void **dst = malloc((n ? n : 1) * sizeof *dst);
    uint64_t *cap = malloc((n ? n : 1) * sizeof *cap), *got = malloc((n ? n : 1) * sizeof *got);
    int *st = malloc((n ? n : 1) * sizeof *st);
    if (!at || !eid || !keys || !dst || !cap || !got || !st) {
        for (uint32_t k = 0; k < n; k++)
            it[k].req->st[it[k].i] = KVF_ENOMEM;
        goto out;
    }
    /* Rounds: an entry reserved for each key the device holds, until a reservation is refused
     * for want of room or of the tenant's reservations (quota_reservations) while some are held;
     * those are read and committed, which frees their reservations, and the next round goes on
     * from the refused key. A refusal with none held is that key's answer. */
    unsigned waited = 0;
    for (uint32_t k = 0; k < n && !atomic_load(&t->stop);) {
        uint32_t m = 0;
        while (k < n && !atomic_load(&t->stop)) {
            kvf__tier_req *r = it[k].req;
            uint32_t i = it[k].i;
            uint64_t len = 0;
            if (!kvf__disk_contains(v->d, r->ns, &r->keys[i], &len)) {
                r->st[i] = KVF_ENOENT;
                k++;
                continue;
            }
            uint8_t *p;
            kvf__cache_lock(c);
            int rc = kvf__cache_reserve_locked(c, r->ns, &r->keys[i], len, TIER_OWNER, r->tenant,
                                               KVF_CACHE_VIA_WIRE, 1, &eid[m], &p);
            kvf__cache_unlock(c);
            if (rc == KVF_EQUOTA || rc == KVF_ENOSPC) {
                if (m)
                    break; /* asked again once these are committed */
                if (waited < RESERVE_WAIT_MS) {
                    /* the room or the tenant's reservations are held by others (the device's
                     * other readers, her PUTs) for the length of a copy: wait for them, for
                     * RESERVE_WAIT_MS in all over the work (then every refusal is final) */
                    usleep(1000);
                    waited++;
                    continue;
                }
            }
            k++;
            if (rc) {
                r->st[i] = rc;
                continue;
            }
            at[m] = &it[k - 1], keys[m] = r->keys[i], dst[m] = p, cap[m] = len;
            m++;
        }
        promote_round(v, m, at, eid, keys, dst, cap, got, st);
    }
out:
    free(at), free(eid), free(keys), free(dst), free(cap), free(got), free(st);
}
