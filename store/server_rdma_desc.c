/*
 * The RDMA descriptor requests on the storage node's server (docs/protocol.md, docs/rdma.md):
 * object bytes move by the client's one-sided READs and WRITEs against the arena that
 * rdma_serve.c registered; these requests hand out where they are and make written ones visible.
 *
 * RDMA_GET hands out read references under a lease, held until RDMA_RELEASE, the lease's end (the
 * loops' tick) or the connection's; RDMA_RESERVE hands out reservations owned by the connection,
 * made visible by RDMA_COMMIT once verified where they lie.
 */
#include "server_int.h"

#include "kvf/error.h"
#include "kvf/object.h"

#include "bytes.h"
#include "cache.h"
#include "clock.h"
#include "rdma_serve.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#define RDMA_LEASE_DEFAULT_MS 10000u
#define RDMA_LEASE_MAX_MS     60000u
/* One reply's bytes at most (descriptors and headers: a few KiB per key for models' objects); a
 * key past it is KVF_E2BIG. The reply is a copy on the heap, made of a request a few thousand
 * times smaller than itself where objects have many layers: kept small. */
#define RDMA_GET_MAX_REPLY (16ull << 20)
/* Leases held at once by one connection and by the node: each a list entry walked by the loops'
 * ticks (expiry) and by RDMA_RELEASE, and references that keep objects in the arena. A request
 * past either limit is refused (KVF_EBUSY) until leases are released or end. */
#define RDMA_LEASES_PER_CONN 4096u
#define RDMA_LEASES_MAX      65536u

/* Whether this node serves RDMA (or, for RDMA_GET, c mapped the arena over shared memory: the
 * descriptors then point into its read-only view); if not, c gets the reason as an error reply. */
static int rdma_served(conn *c)
{
    kvf_server *s = c->lp->srv;
    if (s->rdma || (c->shm_arena && c->h.opcode == KVF_OP_RDMA_GET))
        return 1;
    kvf__reply_error(c, KVF_ENOTSUP, 0, "this node serves no RDMA: %s", s->rdma_why);
    return 0;
}

/* What an RDMA_GET took for its n keys: each key's status, and for each hit its object's
 * address, length and header length; the lease l holds the hits' references. */
typedef struct rget {
    uint32_t n;
    rlease *l;
    const uint8_t **ptr;
    uint64_t *len;
    int32_t *st;
    uint32_t *hlen;
} rget;

/* Takes a read reference on each key's object into g->l, while the reply stays within
 * RDMA_GET_MAX_REPLY (KVF_E2BIG beyond); an object whose header cannot be read is let go with
 * KVF_EPROTO. Returns the reply's length. */
static uint64_t rget_acquire(conn *c, rget *g)
{
    kvf_server *s = c->lp->srv;
    uint64_t ns = kvf__get_u64(c->rbuf);
    const uint8_t *keys = c->rbuf + 16;
    uint64_t total = 16 + 24 * (uint64_t)g->n;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < g->n; i++) {
        kvf_key key = kvf__wire_key_get(keys + 16 * (size_t)i);
        uint32_t eid;
        g->st[i] = kvf__cache_acquire_locked(s->o.cache, ns, &key, &eid, &g->ptr[i], &g->len[i]);
        if (g->st[i])
            continue;
        /* Stored objects were verified when they came in; the header length is read from it. */
        uint32_t layers = g->len[i] >= 40 ? kvf__get_u32(g->ptr[i] + 36) : 0;
        g->hlen[i] = kvf_obj_header_len(layers);
        if (layers == 0 || g->hlen[i] > g->len[i] || total + g->hlen[i] > RDMA_GET_MAX_REPLY) {
            kvf__cache_release_locked(s->o.cache, eid);
            g->st[i] = layers == 0 || g->hlen[i] > g->len[i] ? KVF_EPROTO : KVF_E2BIG;
            continue;
        }
        g->l->eids[g->l->n++] = eid;
        total += g->hlen[i];
    }
    kvf__cache_unlock(s->o.cache);
    return total;
}

/* Writes the reply into r: the lease's id (0: nothing leased), the arena's rkey and the lease's
 * length, one descriptor per key, then every hit's object header. */
static void rget_encode(kvf_server *s, const rget *g, uint32_t lease_ms, uint8_t *r)
{
    kvf__put_u64(r, g->l->n ? g->l->id : 0);
    kvf__put_u32(r + 8, s->rdma ? kvf__rserve_rkey(s->rdma) : 0);
    kvf__put_u32(r + 12, lease_ms);
    uint8_t *h = r + 16 + 24 * (size_t)g->n;
    for (uint32_t i = 0; i < g->n; i++) {
        uint8_t *e = r + 16 + 24 * (size_t)i;
        kvf__put_u32(e, (uint32_t)g->st[i]);
        kvf__put_u32(e + 4, g->st[i] ? 0 : g->hlen[i]);
        kvf__put_u64(e + 8, g->st[i] ? 0 : (uint64_t)(uintptr_t)g->ptr[i]);
        kvf__put_u64(e + 16, g->st[i] ? 0 : g->len[i]);
        if (g->st[i])
            continue;
        memcpy(h, g->ptr[i], g->hlen[i]);
        h += g->hlen[i];
    }
}

/* RDMA_GET: a read reference on every hit under one lease, and each hit's address, length and
 * object header; the client READs the segments itself and verifies them against the header. */
void kvf__req_rdma_get(conn *c)
{
    kvf_server *s = c->lp->srv;
    if (!rdma_served(c))
        return;
    uint32_t n = c->h.item_count;
    uint32_t lease_ms = kvf__get_u32(c->rbuf + 8);
    if (c->n_leases >= RDMA_LEASES_PER_CONN ||
        atomic_load(&s->rdma_leases_open) >= RDMA_LEASES_MAX) {
        kvf__reply_error(c, KVF_EBUSY, 0,
                         "too many RDMA leases held (%" PRIu32 " on this connection, at most %u; "
                         "%u on the node): release some (RDMA_RELEASE) or wait for them to end",
                         c->n_leases, RDMA_LEASES_PER_CONN, RDMA_LEASES_MAX);
        return;
    }
    lease_ms = lease_ms ? lease_ms : RDMA_LEASE_DEFAULT_MS;
    lease_ms = lease_ms < RDMA_LEASE_MAX_MS ? lease_ms : RDMA_LEASE_MAX_MS;
    rget g = {
        .n = n,
        .l = malloc(sizeof *g.l + (size_t)n * 4),
        .ptr = malloc((size_t)(n ? n : 1) * sizeof *g.ptr),
        .len = malloc((size_t)(n ? n : 1) * sizeof *g.len),
        .st = malloc((size_t)(n ? n : 1) * sizeof *g.st),
        .hlen = malloc((size_t)(n ? n : 1) * sizeof *g.hlen),
    };
    out_msg *m = NULL;
    if (!g.l || !g.ptr || !g.len || !g.st || !g.hlen) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory for %" PRIu32 " descriptors", n);
        goto out_free;
    }
    g.l->n = 0;
    uint64_t total = rget_acquire(c, &g);
    m = kvf__msg_new(1, 0, KVF_WIRE_HEADER_LEN + total); /* the reply, encoded in place */
    if (!m) {
        kvf__cache_lock(s->o.cache);
        for (uint32_t i = 0; i < g.l->n; i++)
            kvf__cache_release_locked(s->o.cache, g.l->eids[i]);
        kvf__cache_unlock(s->o.cache);
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory for a reply of %" PRIu64 " bytes", total);
        goto out_free;
    }
    g.l->id = atomic_fetch_add(&s->next_lease, 1) + 1;
    g.l->expires_ns = kvf__now_ns() + (uint64_t)lease_ms * 1000000u;
    kvf__reply_hdr(m->buf, &c->h, 0, 0, n, total);
    rget_encode(s, &g, lease_ms, m->buf + KVF_WIRE_HEADER_LEN);
    if (g.l->n) {
        g.l->next = c->leases;
        c->leases = g.l;
        g.l = NULL;
        c->n_leases++;
        atomic_fetch_add(&s->rdma_leased, 1);
        atomic_fetch_add(&s->rdma_leases_open, 1);
    }
    m->iov[0].iov_base = m->buf;
    m->iov[0].iov_len = KVF_WIRE_HEADER_LEN + total;
    m->iovcnt = 1;
    kvf__conn_queue(c, m);
out_free:
    free(g.l), free(g.ptr), free(g.len), free(g.st), free(g.hlen);
}

/* RDMA_RELEASE: the client read what it wanted; the references go. */
void kvf__req_rdma_release(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint64_t id = kvf__get_u64(c->rbuf + 8), released = 0;
    kvf__cache_lock(s->o.cache);
    for (rlease **pp = &c->leases; *pp; pp = &(*pp)->next) {
        rlease *l = *pp;
        if (l->id != id)
            continue;
        for (uint32_t i = 0; i < l->n; i++)
            kvf__cache_release_locked(s->o.cache, l->eids[i]);
        released = l->n;
        *pp = l->next;
        free(l);
        c->n_leases--;
        atomic_fetch_add(&s->rdma_released, 1);
        atomic_fetch_sub(&s->rdma_leases_open, 1);
        break;
    }
    kvf__cache_unlock(s->o.cache);
    uint8_t r[8];
    kvf__put_u64(r, released);
    kvf__reply_copy(c, 0, 0, 0, r, 8);
}

/* RDMA_RESERVE: as ADMIT, answering where each reserved block is; the client WRITEs the objects
 * there and sends RDMA_COMMIT. A reservation belongs to this connection and lives 30 s. */
void kvf__req_rdma_reserve(conn *c)
{
    kvf_server *s = c->lp->srv;
    if (!rdma_served(c))
        return;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    size_t rlen = 8 + 16 * (size_t)n;
    uint8_t *r = malloc(rlen);
    if (!r) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    kvf__put_u32(r, kvf__rserve_rkey(s->rdma));
    kvf__put_u32(r + 4, 0);
    uint64_t reserved = 0;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *it = c->rbuf + 8 + 24 * (size_t)i;
        kvf_key key = kvf__wire_key_get(it);
        uint64_t len = kvf__get_u64(it + 16);
        uint32_t eid;
        uint8_t *dst = NULL;
        int rc =
            len == 0 ? KVF_EINVAL
            : len > s->o.max_request
                ? KVF_E2BIG
                : kvf__cache_reserve_locked(s->o.cache, ns, &key, len, c->id, kvf__conn_tenant(c),
                                            KVF_CACHE_VIA_RDMA, 0, &eid, &dst);
        /* The block may hold an earlier object's bytes: with its header cleared, it verifies
         * only once the client has written a header of its own, whose checksums the old
         * segments cannot match unless the writer knew them. */
        if (rc == 0)
            memset(dst, 0, len < 64 ? len : 64);
        kvf__put_u32(r + 8 + 16 * (size_t)i, (uint32_t)rc);
        kvf__put_u32(r + 12 + 16 * (size_t)i, 0);
        kvf__put_u64(r + 16 + 16 * (size_t)i, rc ? 0 : (uint64_t)(uintptr_t)dst);
        reserved += rc == 0;
    }
    kvf__cache_unlock(s->o.cache);
    atomic_fetch_add(&s->rdma_reserved, reserved);
    kvf__reply_copy(c, 0, 0, n, r, rlen);
    free(r);
}

/* RDMA_COMMIT: each reserved object the client wrote is verified where it lies (header, key,
 * every segment's checksum: one-sided writes are not trusted), then made visible; one that fails
 * (a write that never landed, or landed in part) is dropped with its reservation. */
void kvf__req_rdma_commit(conn *c)
{
    kvf_server *s = c->lp->srv;
    if (!rdma_served(c))
        return;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    int32_t *st = malloc((size_t)(n ? n : 1) * 4);
    if (!st) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    uint64_t committed = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *it = c->rbuf + 8 + 24 * (size_t)i;
        kvf_key key = kvf__wire_key_get(it);
        uint64_t len = kvf__get_u64(it + 16);
        uint32_t eid;
        uint8_t *dst;
        kvf__cache_lock(s->o.cache);
        int rc = kvf__cache_claim_locked(s->o.cache, ns, &key, len, c->id, KVF_CACHE_VIA_RDMA, &eid,
                                         &dst);
        kvf__cache_unlock(s->o.cache);
        if (rc) {
            st[i] = rc;
            continue;
        }
        kvf_obj_info info;
        rc = kvf_obj_verify(dst, len, &info);
        if (!rc && !kvf_key_eq(&key, &info.key))
            rc = KVF_EPROTO;
        kvf__cache_lock(s->o.cache);
        if (rc)
            kvf__cache_abort_locked(s->o.cache, eid, c->id);
        else
            rc = kvf__cache_commit_locked(s->o.cache, eid, c->id);
        kvf__cache_unlock(s->o.cache);
        st[i] = rc;
        committed += rc == 0;
    }
    atomic_fetch_add(&s->rdma_committed, committed);
    kvf__reply_statuses(c, st, n);
}
