/*
 * PUT and COMMIT on the storage node's server. The frame reader (server_frame.c) reads the item
 * table; kvf__req_put_begin() then reserves a block per item (PUT) or claims the block an ADMIT
 * reserved (COMMIT), the reader receives each item's bytes straight into its block (or discards
 * them where the item was refused), kvf__req_put_item_done() verifies and commits each item as its
 * last byte lands, and kvf__req_put_finish() answers one status per item.
 *
 * WRITE and SEAL (docs/protocol.md, "Objects written in parts") are read the same way: a WRITE's
 * item is a part of an ADMIT reservation, received where it goes in the block and committed by
 * nothing; a SEAL's is the object's head, after which the whole object is verified and committed
 * as a COMMIT's would be (a SEAL of length 0 drops the reservation instead).
 */
#include "server_int.h"

#include "kvf/error.h"
#include "kvf/object.h"

#include "bytes.h"
#include "cache.h"
#include "hash.h"
#include "objcopy.h"

#include <inttypes.h>
#include <stdlib.h>

/* A part of an object this connection wrote, and its checksum (conn.prec). */
typedef struct part_rec {
    uint32_t eid, wseq;
    uint64_t off, len, xxh;
    int used; /* by a SEAL: dropped at its finish */
} part_rec;

void kvf__req_part_bytes(conn *c, put_item *it, const uint8_t *p, size_t n, int first)
{
    if (first) {
        if (!c->pxs)
            c->pxs = XXH3_createState();
        it->hashed = c->pxs && XXH3_64bits_reset(c->pxs) == XXH_OK;
    }
    if (it->hashed)
        kvf__xxh3_update(c->pxs, p, n);
}

/* A WRITE's part is in: its checksum is kept for the SEAL. The records of reservations that end
 * in no SEAL (dropped, expired) are never used: once KVF__PART_RECS are kept, all are forgotten
 * (segments whose record is gone are hashed at their SEAL). */
static void record_part(conn *c, const put_item *it)
{
    if (!it->hashed)
        return;
    if (c->n_prec >= KVF__PART_RECS)
        c->n_prec = 0;
    if (c->n_prec == c->cap_prec) {
        uint32_t cap = c->cap_prec ? 2 * c->cap_prec : 64;
        part_rec *p = realloc(c->prec, (size_t)cap * sizeof *p);
        if (!p)
            return; /* hashed again at the SEAL */
        c->prec = p;
        c->cap_prec = cap;
    }
    c->prec[c->n_prec++] = (part_rec){.eid = it->eid,
                                      .wseq = it->wseq,
                                      .off = it->offset,
                                      .len = it->len,
                                      .xxh = XXH3_64bits_digest(c->pxs),
                                      .used = 0};
}

static int rec_cmp(const void *a, const void *b)
{
    const part_rec *x = a, *y = b;
    if (x->eid != y->eid)
        return x->eid < y->eid ? -1 : 1;
    if (x->wseq != y->wseq)
        return x->wseq < y->wseq ? -1 : 1;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* This reservation's records, in offset order (c->prec sorted at the SEAL's begin): the one a
 * segment asks for is at or past the cursor, as segments come in order. */
typedef struct rec_walk {
    const conn *c;
    uint32_t eid, wseq;
    size_t r;
} rec_walk;

static int rec_of(const rec_walk *w, size_t r)
{
    return r < w->c->n_prec && w->c->prec[r].eid == w->eid && w->c->prec[r].wseq == w->wseq;
}

/* kvf__obj_verify_known's known(): the checksum of the part that covered exactly [off, off+len). */
static int rec_known(void *ud, uint64_t off, uint64_t len, uint64_t *xxh)
{
    rec_walk *w = ud;
    while (rec_of(w, w->r) && w->c->prec[w->r].off < off)
        w->r++;
    if (!rec_of(w, w->r) || w->c->prec[w->r].off != off || w->c->prec[w->r].len != len)
        return 0;
    *xxh = w->c->prec[w->r].xxh;
    return 1;
}

/* Verifies a sealed object at it->dst as kvf_obj_verify() does, each segment's checksum taken
 * from the part that covered exactly that segment where one did (hashed as it landed). The
 * parts' records are marked used (the SEAL's finish drops them). */
static int verify_sealed(conn *c, put_item *it, kvf_obj_info *info)
{
    part_rec want = {.eid = it->eid, .wseq = it->wseq, .off = 0};
    size_t lo = 0, hi = c->n_prec; /* the first record of this reservation's */
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (rec_cmp(&c->prec[mid], &want) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    rec_walk w = {.c = c, .eid = it->eid, .wseq = it->wseq, .r = lo};
    int rc = kvf__obj_verify_known(it->dst, it->obj_len, info, rec_known, &w);
    for (size_t k = lo; rec_of(&w, k); k++)
        c->prec[k].used = 1;
    return rc;
}

/* Drops the records a SEAL used. */
static void compact_parts(conn *c)
{
    uint32_t m = 0;
    for (uint32_t i = 0; i < c->n_prec; i++)
        if (!c->prec[i].used)
            c->prec[m++] = c->prec[i];
    c->n_prec = m;
}

/* Grows c's item array to n items, keeping it across requests. */
static int ensure_items(conn *c, uint32_t n)
{
    if (c->icap >= n)
        return 0;
    put_item *p = realloc(c->items, (size_t)n * sizeof *p);
    if (!p)
        return KVF_ENOMEM;
    c->items = p;
    c->icap = n;
    return 0;
}

void kvf__req_put_begin(conn *c)
{
    kvf_server *s = c->lp->srv;
    char msg[200];
    int rc = kvf__wire_put_table_check(&c->h, c->rbuf, msg, sizeof msg);
    if (rc) {
        kvf__reply_error(c, rc, 1, "%s", msg);
        return;
    }
    uint32_t n = c->h.item_count;
    if (ensure_items(c, n) != 0) {
        kvf__reply_error(c, KVF_ENOMEM, 1, "out of memory for %" PRIu32 " items", n);
        return;
    }
    uint64_t ns = kvf__get_u64(c->rbuf);
    c->req_err = kvf__conn_ns_ok(c, ns) ? 0 : KVF_ENAMESPACE;
    ns = kvf__conn_ns_scope(c, ns);
    size_t row_len = kvf__wire_data_row(c->h.opcode);
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *row = c->rbuf + 8 + row_len * i;
        kvf_key key = kvf__wire_key_get(row);
        put_item *it = &c->items[i];
        it->len = kvf__get_u64(row + row_len - 8);
        it->obj_len = it->len;
        it->dst = NULL;
        it->held = 0;
        uint64_t offset = row_len == 32 ? kvf__get_u64(row + 16) : 0;
        if (c->req_err) {
            it->status = c->req_err;
        } else if (c->h.opcode == KVF_OP_WRITE) {
            it->offset = offset;
            it->hashed = 0;
            it->status = kvf__cache_part_begin_locked(s->o.cache, ns, &key, c->id, offset, it->len,
                                                      &it->eid, &it->dst, &it->wseq);
        } else if (c->h.opcode == KVF_OP_SEAL) {
            it->status = kvf__cache_seal_begin_locked(s->o.cache, ns, &key, c->id, offset, it->len,
                                                      &it->eid, &it->dst, &it->obj_len, &it->wseq);
            if (it->status == 0 && it->eid == UINT32_MAX) {
                it->dst = NULL; /* dropped, as asked: nothing to write */
                continue;
            }
        } else if (c->h.opcode == KVF_OP_PUT) {
            it->status =
                kvf__cache_reserve_locked(s->o.cache, ns, &key, it->len, c->id, kvf__conn_tenant(c),
                                          KVF_CACHE_VIA_WIRE, 1, &it->eid, &it->dst);
        } else {
            it->status = kvf__cache_claim_locked(s->o.cache, ns, &key, it->len, c->id,
                                                 KVF_CACHE_VIA_WIRE, &it->eid, &it->dst);
        }
        if (it->status == 0)
            it->held = 1;
        else
            it->dst = NULL;
    }
    kvf__cache_unlock(s->o.cache);
    if (c->h.opcode == KVF_OP_SEAL && c->n_prec) /* for verify_sealed()'s lookups */
        qsort(c->prec, c->n_prec, sizeof *c->prec, rec_cmp);
    c->n_items = n;
    c->cur = 0;
    c->cur_got = 0;
    c->rstate = R_DATA;
}

void kvf__req_put_item_done(conn *c, put_item *it)
{
    kvf_server *s = c->lp->srv;
    if (!it->held)
        return;
    if (c->h.opcode == KVF_OP_WRITE) {
        record_part(c, it);
        kvf__cache_lock(s->o.cache);
        kvf__cache_part_end_locked(s->o.cache, it->eid, c->id);
        kvf__cache_unlock(s->o.cache);
        it->held = 0;
        it->status = 0;
        return;
    }
    int rc = 0;
    if (s->o.verify_puts) {
        kvf_obj_info info;
        rc = c->h.opcode == KVF_OP_SEAL ? verify_sealed(c, it, &info)
                                        : kvf_obj_verify(it->dst, it->obj_len, &info);
        if (!rc) {
            size_t row_len = kvf__wire_data_row(c->h.opcode);
            kvf_key key = kvf__wire_key_get(c->rbuf + 8 + row_len * (size_t)(it - c->items));
            if (!kvf_key_eq(&key, &info.key))
                rc = KVF_EPROTO;
        }
    }
    kvf__cache_lock(s->o.cache);
    if (rc)
        kvf__cache_abort_locked(s->o.cache, it->eid, c->id);
    else
        rc = kvf__cache_commit_locked(s->o.cache, it->eid, c->id);
    kvf__cache_unlock(s->o.cache);
    it->held = 0;
    it->status = rc;
}

void kvf__req_put_finish(conn *c)
{
    uint32_t n = c->n_items;
    if (c->h.opcode == KVF_OP_SEAL)
        compact_parts(c);
    c->rstate = R_HDR;
    c->hdr_got = 0;
    c->n_items = 0;
    if (c->req_err) {
        kvf__reply_error(c, c->req_err, 0,
                         "namespace of the request differs from the one bound by hello (%016" PRIx64
                         ")",
                         c->ns_bound);
        return;
    }
    int32_t *st = malloc(4 * (size_t)n);
    if (!st) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    for (uint32_t i = 0; i < n; i++)
        st[i] = c->items[i].status;
    kvf__reply_statuses(c, st, n);
}
