/*
 * The storage node server's requests about keys of a namespace: EXISTS and LOOKUP (which keys
 * are stored), and EVICT, PIN, UNPIN and ADMIT (one status per key). Each holds the cache lock
 * once for its whole batch and moves no object bytes. Keys on the disk tier count as stored;
 * EVICT removes them from disk too (server_disk.c).
 */
#include "server_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "cache.h"

#include <stdlib.h>

/* EXISTS and LOOKUP: a bitmap, and for LOOKUP first the count of leading hits and how many of
 * them only the disk tier holds; with KVF_WF_TIERS a second bitmap after the first: the keys held
 * on disk only. */
static void exists(conn *c, int lookup)
{
    kvf_server *s = c->lp->srv;
    uint32_t n = c->h.item_count;
    size_t bm = (n + 7) / 8;
    size_t off = lookup ? 8 : 0;
    int tiers = (c->h.flags & KVF_WF_TIERS) != 0;
    uint8_t *r = calloc(1, off + bm * (tiers ? 2 : 1));
    if (!r) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    uint64_t ns = kvf__get_u64(c->rbuf);
    uint32_t leading = 0, leading_disk = 0;
    int run = 1;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        kvf_key key = kvf__wire_key_get(c->rbuf + 8 + 16 * (size_t)i);
        if (kvf__cache_contains_locked(s->o.cache, ns, &key))
            r[off + i / 8] |= (uint8_t)(1u << (i % 8));
    }
    kvf__cache_unlock(s->o.cache);
    /* then the disk tier's index, outside the cache's lock (it never waits on I/O either) */
    for (uint32_t i = 0; i < n; i++) {
        int hit = r[off + i / 8] >> (i % 8) & 1, disk = 0;
        if (!hit && s->o.tier) {
            kvf_key key = kvf__wire_key_get(c->rbuf + 8 + 16 * (size_t)i);
            if ((hit = disk = kvf__sdisk_has(s, ns, &key)) != 0) {
                r[off + i / 8] |= (uint8_t)(1u << (i % 8));
                if (tiers)
                    r[off + bm + i / 8] |= (uint8_t)(1u << (i % 8));
            }
        }
        run = run && hit;
        leading += (uint32_t)run;
        leading_disk += (uint32_t)(run && disk);
    }
    if (lookup) {
        kvf__put_u32(r, leading);
        kvf__put_u32(r + 4, leading_disk);
    }
    kvf__reply_copy(c, 0, 0, n, r, off + bm * (tiers ? 2 : 1));
    free(r);
}

void kvf__req_exists(conn *c)
{
    exists(c, 0);
}

void kvf__req_lookup(conn *c)
{
    exists(c, 1);
}

void kvf__req_per_key(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    int32_t *st = malloc((size_t)n * 4);
    if (!st) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    uint32_t lease_ms = 0;
    const uint8_t *p = c->rbuf + 8;
    size_t stride = 16;
    if (c->h.opcode == KVF_OP_PIN) {
        lease_ms = kvf__get_u32(c->rbuf + 8);
        p = c->rbuf + 16;
    } else if (c->h.opcode == KVF_OP_ADMIT) {
        stride = 24;
    }
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        kvf_key key = kvf__wire_key_get(p + stride * i);
        switch (c->h.opcode) {
        case KVF_OP_EVICT:
            st[i] = kvf__cache_remove_locked(s->o.cache, ns, &key);
            break;
        case KVF_OP_PIN:
            st[i] = kvf__cache_pin_locked(s->o.cache, ns, &key, lease_ms);
            break;
        case KVF_OP_UNPIN:
            st[i] = kvf__cache_unpin_locked(s->o.cache, ns, &key);
            break;
        case KVF_OP_ADMIT: {
            uint64_t len = kvf__get_u64(p + stride * i + 16);
            uint32_t eid;
            uint8_t *dst;
            st[i] = len > s->o.max_request
                        ? KVF_E2BIG
                        : kvf__cache_reserve_locked(s->o.cache, ns, &key, len, c->id,
                                                    kvf__conn_tenant(c), KVF_CACHE_VIA_WIRE, 0,
                                                    &eid, &dst);
            break;
        }
        default:
            st[i] = KVF_EPROTO;
        }
    }
    kvf__cache_unlock(s->o.cache);
    if (c->h.opcode == KVF_OP_EVICT && kvf__sdisk_evict(c, ns, p, st, n))
        return; /* answered once the disk tier removed its copies too */
    kvf__reply_statuses(c, st, n);
}
