/*
 * GET on the storage node's server (docs/protocol.md): object bytes are sent straight from the
 * arena. The reply's iovecs point at the objects, and the message holds a read reference on each
 * until its last byte is written, so an object evicted or overwritten meanwhile stays readable.
 */
#include "server_int.h"

#include "kvf/error.h"
#include "kvf/object.h"

#include "bytes.h"
#include "cache.h"

#include <inttypes.h>
#include <stdlib.h>

static void get_plain(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint32_t n = c->h.item_count;
    const uint8_t *keys = c->rbuf + 8;
    out_msg *m = kvf__msg_new((int)n + 1, n, KVF_WIRE_HEADER_LEN + 16 * (size_t)n);
    if (!m) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory for a reply of %" PRIu32 " items", n);
        return;
    }
    uint8_t *table = m->buf + KVF_WIRE_HEADER_LEN;
    uint64_t data = 0;
    int k = 1;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        kvf_key key = kvf__wire_key_get(keys + 16 * (size_t)i);
        uint32_t eid;
        const uint8_t *p;
        uint64_t len;
        int rc = kvf__cache_acquire_locked(s->o.cache, kvf__get_u64(c->rbuf), &key, &eid, &p, &len);
        kvf__put_u32(table + 16 * (size_t)i, (uint32_t)rc);
        kvf__put_u32(table + 16 * (size_t)i + 4, 0);
        kvf__put_u64(table + 16 * (size_t)i + 8, rc ? 0 : len);
        if (rc)
            continue;
        m->iov[k].iov_base = (void *)p;
        m->iov[k].iov_len = len;
        k++;
        m->refs[m->nrefs++] = eid;
        data += len;
    }
    kvf__cache_unlock(s->o.cache);
    kvf__reply_hdr(m->buf, &c->h, 0, 0, n, 16 * (uint64_t)n + data);
    m->iov[0].iov_base = m->buf;
    m->iov[0].iov_len = KVF_WIRE_HEADER_LEN + 16 * (size_t)n;
    m->iovcnt = k;
    kvf__conn_queue(c, m);
}

/* Layer-major streamed GET: a first frame with the table and every hit's object header, then one
 * frame per layer with that layer's segment of every hit. References ride on the last frame. */
static void get_stream(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint32_t n = c->h.item_count;
    const uint8_t *keys = c->rbuf + 8;
    uint32_t *eids = malloc((size_t)n * sizeof *eids);
    const uint8_t **ptrs = malloc((size_t)n * sizeof *ptrs);
    kvf_obj_info *infos = malloc((size_t)n * sizeof *infos);
    int32_t *st = malloc((size_t)n * sizeof *st);
    out_msg *first = NULL;
    if (!eids || !ptrs || !infos || !st)
        goto out_nomem;
    uint32_t layers = 0, hits = 0;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        kvf_key key = kvf__wire_key_get(keys + 16 * (size_t)i);
        uint64_t len;
        st[i] = kvf__cache_acquire_locked(s->o.cache, kvf__get_u64(c->rbuf), &key, &eids[i],
                                          &ptrs[i], &len);
        if (st[i])
            continue;
        /* Stored objects were verified when they were put; the parse re-checks the header. */
        if (kvf_obj_parse(ptrs[i], len, &infos[i]) != 0 || (layers && infos[i].layers != layers)) {
            kvf__cache_release_locked(s->o.cache, eids[i]);
            st[i] = KVF_ELAYOUT;
            continue;
        }
        layers = infos[i].layers;
        hits++;
    }
    kvf__cache_unlock(s->o.cache);

    first = kvf__msg_new((int)hits + 1, 0, KVF_WIRE_HEADER_LEN + 16 * (size_t)n);
    if (!first)
        goto out_release;
    uint8_t *table = first->buf + KVF_WIRE_HEADER_LEN;
    uint64_t hdr_bytes = 0;
    int k = 1;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *row = table + 16 * (size_t)i;
        kvf__put_u32(row, (uint32_t)st[i]);
        kvf__put_u32(row + 4, st[i] ? 0 : infos[i].header_len);
        kvf__put_u64(row + 8, st[i] ? 0 : infos[i].stored_bytes);
        if (st[i])
            continue;
        first->iov[k].iov_base = (void *)ptrs[i];
        first->iov[k].iov_len = infos[i].header_len;
        hdr_bytes += infos[i].header_len;
        k++;
    }
    kvf__reply_hdr(first->buf, &c->h, 0, hits ? KVF_WF_MORE : 0, n, 16 * (uint64_t)n + hdr_bytes);
    first->iov[0].iov_base = first->buf;
    first->iov[0].iov_len = KVF_WIRE_HEADER_LEN + 16 * (size_t)n;
    first->iovcnt = k;

    /* Build every layer frame before queueing any, so a failure leaves nothing half-queued. */
    out_msg **lm = calloc(layers ? layers : 1, sizeof *lm);
    if (!lm)
        goto out_first;
    uint64_t *segoff = calloc(n, sizeof *segoff);
    if (!segoff) {
        free(lm);
        goto out_first;
    }
    for (uint32_t i = 0; i < n; i++)
        if (!st[i])
            segoff[i] = infos[i].header_len;
    for (uint32_t l = 0; l < layers; l++) {
        int last = l + 1 == layers;
        lm[l] = kvf__msg_new((int)hits + 1, last ? hits : 0, KVF_WIRE_HEADER_LEN + 8);
        if (!lm[l]) {
            for (uint32_t j = 0; j < l; j++)
                free(lm[j]);
            free(lm);
            free(segoff);
            goto out_first;
        }
        out_msg *m = lm[l];
        uint64_t bytes = 8;
        int kk = 1;
        for (uint32_t i = 0; i < n; i++) {
            if (st[i])
                continue;
            kvf_obj_seg sg = kvf_obj_seg_at(&infos[i], l);
            m->iov[kk].iov_base = (void *)(ptrs[i] + segoff[i]);
            m->iov[kk].iov_len = sg.stored_len;
            segoff[i] += sg.stored_len;
            bytes += sg.stored_len;
            kk++;
            if (last)
                m->refs[m->nrefs++] = eids[i];
        }
        kvf__reply_hdr(m->buf, &c->h, 0, last ? 0 : KVF_WF_MORE, hits, bytes);
        kvf__put_u32(m->buf + KVF_WIRE_HEADER_LEN, l);
        kvf__put_u32(m->buf + KVF_WIRE_HEADER_LEN + 4, 0);
        m->iov[0].iov_base = m->buf;
        m->iov[0].iov_len = KVF_WIRE_HEADER_LEN + 8;
        m->iovcnt = kk;
    }
    kvf__conn_queue(c, first);
    for (uint32_t l = 0; l < layers; l++)
        kvf__conn_queue(c, lm[l]);
    free(lm);
    free(segoff);
    free(eids);
    free(ptrs);
    free(infos);
    free(st);
    return;

out_first:
    free(first);
out_release:
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++)
        if (!st[i])
            kvf__cache_release_locked(s->o.cache, eids[i]);
    kvf__cache_unlock(s->o.cache);
out_nomem:
    free(eids);
    free(ptrs);
    free(infos);
    free(st);
    kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory for a streamed reply of %" PRIu32 " items",
                     n);
}

void kvf__req_get(conn *c)
{
    if (c->h.flags & KVF_WF_STREAM)
        get_stream(c);
    else
        get_plain(c);
}
