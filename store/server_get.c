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

/* What a streamed GET took for its n keys: each key's status, and for each hit its reference,
 * object bytes and parsed header; every hit has the same number of layers. */
typedef struct stream_hits {
    uint32_t n, layers, hits;
    uint32_t *eids;
    const uint8_t **ptrs;
    kvf_obj_info *infos;
    int32_t *st;
} stream_hits;

/* The frames' scatter lists of one streamed GET at most (an entry per hit and layer): a request of
 * a few KiB naming an object of 4,096 layers many times over would have the loop build gigabytes
 * of them. Hits past it are KVF_E2BIG (126-layer objects: 16,000 hits fit). */
#define STREAM_IOV_MAX_BYTES (32ull << 20)

/* Takes a read reference on each key's object. A miss keeps its status; an object whose header
 * does not parse, or whose layer count differs from the first hit's, is let go with KVF_ELAYOUT;
 * one past STREAM_IOV_MAX_BYTES with KVF_E2BIG.
 */
static void stream_acquire(conn *c, stream_hits *g)
{
    kvf_server *s = c->lp->srv;
    const uint8_t *keys = c->rbuf + 8;
    uint64_t iov_bytes = 0;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < g->n; i++) {
        kvf_key key = kvf__wire_key_get(keys + 16 * (size_t)i);
        uint64_t len;
        g->st[i] = kvf__cache_acquire_locked(s->o.cache, kvf__get_u64(c->rbuf), &key, &g->eids[i],
                                             &g->ptrs[i], &len);
        if (g->st[i])
            continue;
        /* Stored objects were verified when they were put; the parse re-checks the header. */
        if (kvf_obj_parse(g->ptrs[i], len, &g->infos[i]) != 0 ||
            (g->layers && g->infos[i].layers != g->layers)) {
            kvf__cache_release_locked(s->o.cache, g->eids[i]);
            g->st[i] = KVF_ELAYOUT;
            continue;
        }
        uint64_t cost = ((uint64_t)g->infos[i].layers + 1) * sizeof(struct iovec);
        if (iov_bytes + cost > STREAM_IOV_MAX_BYTES) {
            kvf__cache_release_locked(s->o.cache, g->eids[i]);
            g->st[i] = KVF_E2BIG;
            continue;
        }
        iov_bytes += cost;
        g->layers = g->infos[i].layers;
        g->hits++;
    }
    kvf__cache_unlock(s->o.cache);
}

/* The first frame: the table of every key's status, header length and stored length, then every
 * hit's object header. Returns NULL when out of memory. */
static out_msg *stream_first(conn *c, const stream_hits *g)
{
    uint32_t n = g->n;
    out_msg *first = kvf__msg_new((int)g->hits + 1, 0, KVF_WIRE_HEADER_LEN + 16 * (size_t)n);
    if (!first)
        return NULL;
    uint8_t *table = first->buf + KVF_WIRE_HEADER_LEN;
    uint64_t hdr_bytes = 0;
    int k = 1;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *row = table + 16 * (size_t)i;
        kvf__put_u32(row, (uint32_t)g->st[i]);
        kvf__put_u32(row + 4, g->st[i] ? 0 : g->infos[i].header_len);
        kvf__put_u64(row + 8, g->st[i] ? 0 : g->infos[i].stored_bytes);
        if (g->st[i])
            continue;
        first->iov[k].iov_base = (void *)g->ptrs[i];
        first->iov[k].iov_len = g->infos[i].header_len;
        hdr_bytes += g->infos[i].header_len;
        k++;
    }
    kvf__reply_hdr(first->buf, &c->h, 0, g->hits ? KVF_WF_MORE : 0, n,
                   16 * (uint64_t)n + hdr_bytes);
    first->iov[0].iov_base = first->buf;
    first->iov[0].iov_len = KVF_WIRE_HEADER_LEN + 16 * (size_t)n;
    first->iovcnt = k;
    return first;
}

/* The frame of layer l: its number, then that layer's segment of every hit, which starts at
 * segoff[i] in hit i's object (advanced past it here). The last layer's frame carries every hit's
 * reference. Returns NULL when out of memory. */
static out_msg *stream_layer(conn *c, const stream_hits *g, uint32_t l, uint64_t *segoff)
{
    int last = l + 1 == g->layers;
    out_msg *m = kvf__msg_new((int)g->hits + 1, last ? g->hits : 0, KVF_WIRE_HEADER_LEN + 8);
    if (!m)
        return NULL;
    uint64_t bytes = 8;
    int kk = 1;
    for (uint32_t i = 0; i < g->n; i++) {
        if (g->st[i])
            continue;
        kvf_obj_seg sg = kvf_obj_seg_at(&g->infos[i], l);
        m->iov[kk].iov_base = (void *)(g->ptrs[i] + segoff[i]);
        m->iov[kk].iov_len = sg.stored_len;
        segoff[i] += sg.stored_len;
        bytes += sg.stored_len;
        kk++;
        if (last)
            m->refs[m->nrefs++] = g->eids[i];
    }
    kvf__reply_hdr(m->buf, &c->h, 0, last ? 0 : KVF_WF_MORE, g->hits, bytes);
    kvf__put_u32(m->buf + KVF_WIRE_HEADER_LEN, l);
    kvf__put_u32(m->buf + KVF_WIRE_HEADER_LEN + 4, 0);
    m->iov[0].iov_base = m->buf;
    m->iov[0].iov_len = KVF_WIRE_HEADER_LEN + 8;
    m->iovcnt = kk;
    return m;
}

/* Builds every layer's frame into lm before any is queued, so a failure leaves nothing
 * half-queued. Returns 0, or KVF_ENOMEM with no frame left in lm. */
static int stream_layers(conn *c, const stream_hits *g, out_msg **lm)
{
    int rc = 0;
    uint64_t *segoff = calloc(g->n, sizeof *segoff);
    if (!segoff)
        return KVF_ENOMEM;
    for (uint32_t i = 0; i < g->n; i++)
        if (!g->st[i])
            segoff[i] = g->infos[i].header_len;
    for (uint32_t l = 0; l < g->layers; l++) {
        lm[l] = stream_layer(c, g, l, segoff);
        if (!lm[l]) {
            for (uint32_t j = 0; j < l; j++)
                free(lm[j]);
            rc = KVF_ENOMEM;
            break;
        }
    }
    free(segoff);
    return rc;
}

/* Layer-major streamed GET: a first frame with the table and every hit's object header, then one
 * frame per layer with that layer's segment of every hit. References ride on the last frame. */
static void get_stream(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint32_t n = c->h.item_count;
    stream_hits g = {
        .n = n,
        .eids = malloc((size_t)n * sizeof *g.eids),
        .ptrs = malloc((size_t)n * sizeof *g.ptrs),
        .infos = malloc((size_t)n * sizeof *g.infos),
        .st = malloc((size_t)n * sizeof *g.st),
    };
    out_msg *first = NULL, **lm = NULL;
    if (!g.eids || !g.ptrs || !g.infos || !g.st)
        goto out_nomem;
    stream_acquire(c, &g);
    first = stream_first(c, &g);
    if (!first)
        goto out_release;
    lm = calloc(g.layers ? g.layers : 1, sizeof *lm);
    if (!lm || stream_layers(c, &g, lm) != 0)
        goto out_free_first;
    kvf__conn_queue(c, first);
    for (uint32_t l = 0; l < g.layers; l++)
        kvf__conn_queue(c, lm[l]);
    goto out_free;

out_free_first:
    free(first);
out_release:
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++)
        if (!g.st[i])
            kvf__cache_release_locked(s->o.cache, g.eids[i]);
    kvf__cache_unlock(s->o.cache);
out_nomem:
    kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory for a streamed reply of %" PRIu32 " items",
                     n);
out_free:
    free(lm);
    free(g.eids);
    free(g.ptrs);
    free(g.infos);
    free(g.st);
}

void kvf__req_get(conn *c)
{
    if (c->h.flags & KVF_WF_STREAM)
        get_stream(c);
    else
        get_plain(c);
}
