/*
 * The RDMA data path (kvf__path_rdma; docs/rdma.md).
 *
 * One worker thread runs gets and puts in submission order. For each node of a batch:
 *   get: RDMA_GET over TCP leases the hits and answers (address, length, header) for each; the
 *        worker copies the headers, READs the segments in one batched transfer (layer-major for a
 *        streamed get, so layers land and are reported in order), verifies every segment's
 *        checksum against the header, and releases the lease once the op is complete;
 *   put: RDMA_RESERVE reserves blocks and answers their addresses; the worker WRITEs the objects
 *        and sends RDMA_COMMIT, on which the node verifies each object before it becomes visible.
 * A transfer error makes the keys it touched misses, and the connection is rebuilt on the next
 * use. Nothing read is handed out unverified: a lease that ended before the READ completed (its
 * block reused) shows as a checksum mismatch, and the key is a miss.
 */
#include "client_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "hash.h"
#include "clock.h"
#include "errf.h"
#include "kvf/object.h"
#include "rdma.h"
#include "wire.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RETRY_NS (1000ull * 1000000u) /* a node whose RDMA connect failed is retried after */

typedef struct rnode {
    const char *host;
    uint16_t port;
    kvf__rdma_conn *rc;
    uint64_t retry_at;
    char err[200];
} rnode;

typedef struct qent {
    struct qent *next;
    kvf_op *op;
} qent;

struct kvf__rdma_path {
    kvf_client *c;
    size_t n;
    rnode *nodes;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
    qent *head, *tail;
};

/* One node's share of a get. */
typedef struct gshare {
    size_t node;
    uint32_t n;
    uint32_t *idx; /* batch indices */
} gshare;

static int left_ms(const kvf_op *op)
{
    uint64_t t = kvf__now_ns(), d = op->deadline_ns;
    return d > t ? (int)((d - t) / 1000000u) + 1 : 1;
}

/* The node's RDMA connection, made (again) if needed. 0 or the connect error. */
static int conn_get(rnode *nd, int timeout_ms, uint64_t *reconnects)
{
    if (nd->rc && !kvf__rdma_broken(nd->rc))
        return 0;
    kvf__rdma_close(&nd->rc);
    uint64_t t = kvf__now_ns();
    if (t < nd->retry_at)
        return KVF_ECONNREFUSED;
    kvf__rdma_opts o = {.timeout_ms = timeout_ms < 2000 ? timeout_ms : 2000};
    int rc = kvf__rdma_connect(nd->host, nd->port, &o, &nd->rc, nd->err, sizeof nd->err);
    if (rc) {
        nd->retry_at = t + RETRY_NS;
        return rc;
    }
    (*reconnects)++;
    return 0;
}

static void fail_keys(const kvf_batch *b, const uint32_t *idx, uint32_t n, int st, uint64_t *failed)
{
    for (uint32_t i = 0; i < n; i++) {
        b->status[idx[i]] = st;
        (*failed)++;
    }
}

/* A streamed get's layer reports: the ops of layer l end at ends[l]; each layer that lands is
 * verified in every hit and then reported. */
typedef struct layer_track {
    kvf_op *op;
    const kvf_batch *b;
    const uint32_t *hit; /* batch index of each hit */
    kvf_obj_info *info;
    const uint32_t *seg_off; /* hit h's segment l starts at seg_off[h * L + l] */
    uint32_t n_hits, L;
    const size_t *ends;
    uint32_t next; /* next layer to verify */
    int report;    /* call layer_cb (the last share of the op) */
    uint32_t *fired;
} layer_track;

static void verify_layer(layer_track *t, uint32_t l)
{
    for (uint32_t h = 0; h < t->n_hits; h++) {
        int *st = &t->b->status[t->hit[h]];
        if (*st)
            continue;
        kvf_obj_seg sg = kvf_obj_seg_at(&t->info[h], l);
        const uint8_t *p = (const uint8_t *)t->b->bufs[t->hit[h]] + t->seg_off[h * t->L + l];
        if (kvf__xxh3(p, sg.stored_len) != sg.stored_xxh)
            *st = KVF_ECHECKSUM;
    }
}

static void on_progress(void *ctx, size_t done)
{
    layer_track *t = ctx;
    while (t->next < t->L && done >= t->ends[t->next]) {
        verify_layer(t, t->next);
        if (t->report && t->b->layer_cb && *t->fired == t->next) {
            t->b->layer_cb(t->op, t->next, t->b->ud);
            (*t->fired)++;
        }
        t->next++;
    }
}

/* One node's hits under a read lease: each one's batch index, parsed header and remote address. */
typedef struct hits {
    uint32_t n;
    uint32_t *idx;
    kvf_obj_info *info;
    uint64_t *addr;
    uint32_t rkey;
} hits;

static void hits_free(hits *h)
{
    free(h->idx), free(h->info), free(h->addr);
}

/* Reads an RDMA_GET reply: per key (status, header length, address, length), then the headers.
 * Each hit's header goes into its buffer and is checked against the key (and, streamed, against
 * the layer count of the op's other hits); misses and refusals get their status. Returns 0, or
 * KVF_EPROTO for a reply that cannot be trusted, or KVF_ENOMEM. */
static int read_leases(const kvf_op *op, const gshare *g, const uint8_t *rep, size_t rlen,
                       uint32_t *layers, hits *h, uint64_t cnt[5])
{
    const kvf_batch *b = &op->b;
    int stream = (b->flags & KVF_GET_STREAM) != 0;
    h->rkey = kvf__get_u32(rep + 8);
    h->idx = calloc(g->n ? g->n : 1, sizeof *h->idx);
    h->info = calloc(g->n ? g->n : 1, sizeof *h->info);
    h->addr = calloc(g->n ? g->n : 1, sizeof *h->addr);
    if (!h->idx || !h->info || !h->addr)
        return KVF_ENOMEM;
    size_t off = 16 + 24 * (size_t)g->n;
    for (uint32_t i = 0; i < g->n; i++) {
        const uint8_t *e = rep + 16 + 24 * (size_t)i;
        uint32_t k = g->idx[i];
        int st = (int)(int32_t)kvf__get_u32(e);
        uint32_t hl = kvf__get_u32(e + 4);
        uint64_t a = kvf__get_u64(e + 8), len = kvf__get_u64(e + 16);
        if (!kvf_err_is_known(st))
            return KVF_EPROTO;
        b->status[k] = st;
        if (st) {
            cnt[3]++;
            continue;
        }
        if (hl > rlen - off || hl > len)
            return KVF_EPROTO;
        const uint8_t *hdr = rep + off;
        off += hl;
        if (len > b->caps[k]) {
            b->status[k] = KVF_E2BIG;
            continue;
        }
        memcpy(b->bufs[k], hdr, hl);
        kvf_obj_info *in = &h->info[h->n];
        if (kvf_obj_parse(b->bufs[k], hl, in) != 0 || in->header_len != hl ||
            hl + in->stored_bytes != len || !kvf_key_eq(&in->key, &b->keys[k])) {
            b->status[k] = KVF_EPROTO;
            continue;
        }
        if (stream && *layers && in->layers != *layers) {
            b->status[k] = KVF_ELAYOUT;
            continue;
        }
        if (stream && !*layers)
            *layers = in->layers;
        if (b->out_lens)
            b->out_lens[k] = len;
        h->addr[h->n] = a;
        h->idx[h->n++] = k;
    }
    return 0;
}

/* Asks node g->node for read leases on g's keys. *lease gets the lease to release (also when the
 * reply was then found wrong). Returns 0, or an error that fails every key of the share. */
static int lease_share(struct kvf__rdma_path *r, kvf_op *op, const gshare *g, uint32_t *layers,
                       uint64_t *lease, hits *h, uint64_t cnt[5])
{
    const kvf_batch *b = &op->b;
    size_t plen = 16 + 16 * (size_t)g->n;
    uint8_t *req = malloc(plen), *rep = NULL;
    size_t rlen = 0;
    if (!req)
        return KVF_ENOMEM;
    kvf__put_u64(req, r->c->o.ns);
    /* The lease outlives the op's deadline: the op ends first, then releases it. */
    kvf__put_u32(req + 8, (uint32_t)left_ms(op) * 2 + 1000);
    kvf__put_u32(req + 12, 0);
    for (uint32_t i = 0; i < g->n; i++)
        kvf__wire_key_put(req + 16 + 16 * (size_t)i, &b->keys[g->idx[i]]);
    int rc = kvf__io_raw(r->c->io[0], g->node, 0, KVF_OP_RDMA_GET, g->n, req, plen, &rep, &rlen,
                         left_ms(op));
    free(req);
    cnt[0]++;
    if (!rc && rlen < 16 + 24 * (size_t)g->n)
        rc = KVF_EPROTO;
    if (!rc) {
        *lease = kvf__get_u64(rep);
        rc = read_leases(op, g, rep, rlen, layers, h, cnt);
    }
    free(rep);
    return rc;
}

/* The READs of a share's hits: one per hit for a plain get (its segments, contiguous after the
 * header); one per segment, layer by layer across the hits, for a streamed one of L layers, the
 * reads of layers 0..l ending at ends[l]. */
typedef struct reads {
    kvf__rdma_op *ops;
    uint32_t *op_hit;  /* the hit each read is for */
    uint32_t *seg_off; /* hit h's segment l starts at seg_off[h * L + l] */
    size_t *ends;
    size_t n;
} reads;

static void reads_free(reads *rd)
{
    free(rd->ops), free(rd->op_hit), free(rd->seg_off), free(rd->ends);
}

static int plan_reads(const kvf_batch *b, const hits *h, int stream, uint32_t L, reads *rd)
{
    size_t n_ops = stream ? (size_t)h->n * L : h->n;
    rd->ops = calloc(n_ops ? n_ops : 1, sizeof *rd->ops);
    rd->op_hit = calloc(n_ops ? n_ops : 1, sizeof *rd->op_hit);
    rd->seg_off = calloc((size_t)(h->n ? h->n : 1) * (L ? L : 1), sizeof *rd->seg_off);
    rd->ends = calloc(L ? L : 1, sizeof *rd->ends);
    if (!rd->ops || !rd->op_hit || !rd->seg_off || !rd->ends)
        return KVF_ENOMEM;
    rd->n = n_ops;
    for (uint32_t x = 0; !stream && x < h->n; x++) {
        uint32_t hl = h->info[x].header_len;
        rd->ops[x] = (kvf__rdma_op){.local = (uint8_t *)b->bufs[h->idx[x]] + hl,
                                    .remote = h->addr[x] + hl,
                                    .rkey = h->rkey,
                                    .len = (uint32_t)h->info[x].stored_bytes};
        rd->op_hit[x] = x;
    }
    for (uint32_t x = 0; stream && x < h->n; x++) {
        uint32_t o = h->info[x].header_len;
        for (uint32_t l = 0; l < L; l++) {
            rd->seg_off[x * L + l] = o;
            o += kvf_obj_seg_at(&h->info[x], l).stored_len;
        }
    }
    size_t j = 0;
    for (uint32_t l = 0; stream && l < L; l++) {
        for (uint32_t x = 0; x < h->n; x++, j++) {
            uint32_t so = rd->seg_off[x * L + l];
            rd->ops[j] = (kvf__rdma_op){.local = (uint8_t *)b->bufs[h->idx[x]] + so,
                                        .remote = h->addr[x] + so,
                                        .rkey = h->rkey,
                                        .len = kvf_obj_seg_at(&h->info[x], l).stored_len};
            rd->op_hit[j] = x;
        }
        rd->ends[l] = j;
    }
    return 0;
}

/* One node's share of a get: leases, then one batched transfer of READs, then verification (a
 * streamed get's layers as they land, reported when `last` is the op's last share). The lease to
 * release goes to *lease. */
static void get_share(struct kvf__rdma_path *r, kvf_op *op, const gshare *g, int last,
                      uint32_t *layers, uint32_t *fired, uint64_t *lease, uint64_t cnt[5])
{
    const kvf_batch *b = &op->b;
    rnode *nd = &r->nodes[g->node];
    int stream = (b->flags & KVF_GET_STREAM) != 0;
    hits h = {0};
    reads rd = {0};
    int rc = conn_get(nd, left_ms(op), &cnt[4]);
    if (!rc)
        rc = lease_share(r, op, g, layers, lease, &h, cnt);
    if (rc) {
        fail_keys(b, g->idx, g->n, rc, &cnt[3]);
        goto out;
    }
    uint32_t L = stream ? *layers : 0;
    if (plan_reads(b, &h, stream, L, &rd) != 0) {
        fail_keys(b, h.idx, h.n, KVF_ENOMEM, &cnt[3]);
        goto out;
    }
    layer_track t = {.op = op,
                     .b = b,
                     .hit = h.idx,
                     .info = h.info,
                     .seg_off = rd.seg_off,
                     .n_hits = h.n,
                     .L = L,
                     .ends = rd.ends,
                     .report = last,
                     .fired = fired};
    if (rd.n)
        kvf__rdma_transfer_progress(nd->rc, 0, rd.ops, rd.n, left_ms(op),
                                    stream ? on_progress : NULL, &t);
    for (size_t i = 0; i < rd.n; i++) {
        int *st = &b->status[h.idx[rd.op_hit[i]]];
        if (rd.ops[i].status && *st == 0) {
            *st = rd.ops[i].status; /* a miss; the connection is rebuilt on next use */
            cnt[3]++;
        }
        if (!rd.ops[i].status)
            cnt[2] += rd.ops[i].len;
    }
    /* A plain get is verified whole; a streamed one layer by layer as it landed (any layer a
     * failed transfer never reported is already failed above). */
    for (uint32_t x = 0; !stream && x < h.n; x++) {
        int *st = &b->status[h.idx[x]];
        if (*st == 0 &&
            kvf_obj_verify(b->bufs[h.idx[x]], h.info[x].header_len + h.info[x].stored_bytes,
                           &h.info[x]) != 0) {
            *st = KVF_ECHECKSUM;
            cnt[3]++;
        }
    }
out:
    reads_free(&rd);
    hits_free(&h);
}

static void release(struct kvf__rdma_path *r, size_t node, uint64_t lease)
{
    uint8_t req[16], *rep = NULL;
    size_t rlen;
    kvf__put_u64(req, r->c->o.ns);
    kvf__put_u64(req + 8, lease);
    kvf__io_raw(r->c->io[0], node, 0, KVF_OP_RDMA_RELEASE, 0, req, sizeof req, &rep, &rlen, 2000);
    free(rep);
}

/* The keys of one share at most: an RDMA_GET's reply (descriptors and object headers) stops at
 * 16 MiB on the node, which 1,024 objects of up to 680 layers fit (docs/protocol.md). */
#define SHARE_KEYS_MAX 1024u

/* Splits a batch by node (a get's keys by kvf_batch.nodes where it names one): shares for each
 * node with keys, in node order, SHARE_KEYS_MAX keys at most each. */
static gshare *split(struct kvf__rdma_path *r, const kvf_batch *b, int get, size_t *n_shares)
{
    /* at most one share per node, and one more per SHARE_KEYS_MAX keys */
    gshare *g = calloc(r->n + b->n / SHARE_KEYS_MAX + 1, sizeof *g);
    uint32_t *idx = malloc((b->n ? b->n : 1) * sizeof *idx);
    size_t *node_of = malloc((b->n ? b->n : 1) * sizeof *node_of);
    if (!g || !idx || !node_of) {
        free(g), free(idx), free(node_of);
        return NULL;
    }
    for (size_t i = 0; i < b->n; i++) {
        node_of[i] = kvf__key_node(r->c, b, get, i);
        g[node_of[i]].n++;
    }
    uint32_t at = 0;
    for (size_t k = 0; k < r->n; k++) {
        g[k].node = k;
        g[k].idx = idx + at;
        at += g[k].n;
        g[k].n = 0;
    }
    for (size_t i = 0; i < b->n; i++) {
        gshare *s = &g[node_of[i]];
        s->idx[s->n++] = (uint32_t)i;
    }
    free(node_of);
    size_t m = 0;
    for (size_t k = 0; k < r->n; k++)
        if (g[k].n)
            g[m++] = g[k];
    /* each node's keys in runs of SHARE_KEYS_MAX, from the last share back (in place) */
    size_t total = 0;
    for (size_t k = 0; k < m; k++)
        total += (g[k].n + SHARE_KEYS_MAX - 1) / SHARE_KEYS_MAX;
    for (size_t k = m, at_end = total; k-- > 0;) {
        gshare whole = g[k];
        size_t runs = (whole.n + SHARE_KEYS_MAX - 1) / SHARE_KEYS_MAX;
        at_end -= runs;
        for (size_t j = 0; j < runs; j++) {
            uint32_t from = (uint32_t)j * SHARE_KEYS_MAX;
            g[at_end + j] =
                (gshare){.node = whole.node,
                         .idx = whole.idx + from,
                         .n = whole.n - from < SHARE_KEYS_MAX ? whole.n - from : SHARE_KEYS_MAX};
        }
    }
    m = total;
    *n_shares = m;
    if (m == 0)
        g[0].idx = idx; /* kept for freeing */
    return g;
}

static void free_shares(gshare *g)
{
    if (g)
        free(g[0].idx); /* the first share's indices start the one array of all */
    free(g);
}

/* One node's share of a put. */
static void put_share(struct kvf__rdma_path *r, kvf_op *op, const gshare *g, uint64_t cnt[5])
{
    const kvf_batch *b = &op->b;
    rnode *nd = &r->nodes[g->node];
    int rc = conn_get(nd, left_ms(op), &cnt[4]);
    if (rc) {
        fail_keys(b, g->idx, g->n, rc, &cnt[3]);
        return;
    }
    size_t plen = 8 + 24 * (size_t)g->n;
    uint8_t *req = malloc(plen), *rep = NULL;
    kvf__rdma_op *ops = calloc(g->n, sizeof *ops);
    uint32_t *which = calloc(g->n, sizeof *which);
    size_t rlen = 0;
    if (!req || !ops || !which) {
        fail_keys(b, g->idx, g->n, KVF_ENOMEM, &cnt[3]);
        goto out;
    }
    kvf__put_u64(req, r->c->o.ns);
    for (uint32_t i = 0; i < g->n; i++) {
        kvf__wire_key_put(req + 8 + 24 * (size_t)i, &b->keys[g->idx[i]]);
        kvf__put_u64(req + 8 + 24 * (size_t)i + 16, b->lens[g->idx[i]]);
    }
    rc = kvf__io_raw(r->c->io[0], g->node, 0, KVF_OP_RDMA_RESERVE, g->n, req, plen, &rep, &rlen,
                     left_ms(op));
    cnt[0]++;
    if (rc || rlen != 8 + 16 * (size_t)g->n) {
        fail_keys(b, g->idx, g->n, rc ? rc : KVF_EPROTO, &cnt[3]);
        goto out;
    }
    uint32_t rkey = kvf__get_u32(rep), n_ops = 0;
    for (uint32_t i = 0; i < g->n; i++) {
        uint32_t k = g->idx[i];
        int st = (int)(int32_t)kvf__get_u32(rep + 8 + 16 * (size_t)i);
        b->status[k] = kvf_err_is_known(st) ? st : KVF_EPROTO;
        if (st) {
            cnt[3] += st != KVF_EEXIST;
            continue;
        }
        if (b->lens[k] > UINT32_MAX) {
            b->status[k] = KVF_E2BIG;
            continue;
        }
        ops[n_ops] = (kvf__rdma_op){.local = (void *)b->objs[k],
                                    .remote = kvf__get_u64(rep + 16 + 16 * (size_t)i),
                                    .rkey = rkey,
                                    .len = (uint32_t)b->lens[k]};
        which[n_ops++] = k;
    }
    if (n_ops)
        kvf__rdma_transfer(nd->rc, 1, ops, n_ops, left_ms(op));
    /* Commit every reserved key, written or not: the node verifies each and drops what did not
     * land whole, with its reservation. */
    for (uint32_t i = 0; i < n_ops; i++) {
        kvf__wire_key_put(req + 8 + 24 * (size_t)i, &b->keys[which[i]]);
        kvf__put_u64(req + 8 + 24 * (size_t)i + 16, b->lens[which[i]]);
        cnt[1] += ops[i].status ? 0 : ops[i].len;
    }
    free(rep);
    rep = NULL;
    if (!n_ops)
        goto out;
    rc = kvf__io_raw(r->c->io[0], g->node, 0, KVF_OP_RDMA_COMMIT, n_ops, req,
                     8 + 24 * (size_t)n_ops, &rep, &rlen, left_ms(op));
    cnt[0]++;
    for (uint32_t i = 0; i < n_ops; i++) {
        int st = rc                  ? rc
                 : rlen != 4 * n_ops ? KVF_EPROTO
                                     : (int)(int32_t)kvf__get_u32(rep + 4 * (size_t)i);
        /* A write that failed reports the transfer's error, not the verification's. */
        b->status[which[i]] = ops[i].status ? ops[i].status : st;
        cnt[3] += b->status[which[i]] != 0;
    }
out:
    free(req), free(rep), free(ops), free(which);
}

/* Runs a get or a put node by node; a get's leases are released once the op completed, off its
 * critical path. */
static int run(struct kvf__rdma_path *r, kvf_op *op)
{
    const kvf_batch *b = &op->b;
    int get = op->kind == KVF__OPK_GET;
    size_t m;
    gshare *g = split(r, b, get, &m);
    uint64_t *leases = g ? calloc(m ? m : 1, sizeof *leases) : NULL;
    if (!leases) {
        free_shares(g);
        return KVF_ENOMEM;
    }
    uint64_t cnt[5] = {0}; /* requests, sent, received, failed, reconnects */
    uint32_t layers = 0, fired = 0;
    for (size_t k = 0; k < m; k++) {
        if (get)
            get_share(r, op, &g[k], k + 1 == m, &layers, &fired, &leases[k], cnt);
        else
            put_share(r, op, &g[k], cnt);
    }
    /* Layers not reported yet (earlier shares, or the last share had no hit): all landed. */
    while (get && b->layer_cb && (b->flags & KVF_GET_STREAM) && fired < layers)
        b->layer_cb(op, fired++, b->ud);
    kvf__io_count(r->c->io[0], cnt[0], cnt[1], cnt[2], cnt[3], cnt[4]);
    kvf__op_finish(op, 0);
    for (size_t k = 0; k < m; k++)
        if (leases[k])
            release(r, g[k].node, leases[k]);
    free(leases);
    free_shares(g);
    return 0;
}

static void *worker(void *arg)
{
    struct kvf__rdma_path *r = arg;
    for (;;) {
        pthread_mutex_lock(&r->mu);
        while (!r->head && !r->stop)
            pthread_cond_wait(&r->cv, &r->mu);
        qent *q = r->head;
        if (q) {
            r->head = q->next;
            if (!r->head)
                r->tail = NULL;
        }
        int stop = r->stop;
        pthread_mutex_unlock(&r->mu);
        if (!q && stop)
            break;
        kvf_op *op = q->op;
        free(q);
        if (stop) {
            const kvf_batch *b = &op->b;
            for (size_t i = 0; i < b->n; i++)
                b->status[i] = KVF_ECANCELED;
            kvf__op_finish(op, KVF_ECANCELED);
            continue;
        }
        int rc = run(r, op);
        if (rc)
            kvf__op_finish(op, rc);
    }
    return NULL;
}

static int rdma_submit(kvf_client *c, kvf_op *op)
{
    struct kvf__rdma_path *r = c->rdma;
    const kvf_batch *b = &op->b;
    for (size_t i = 0; i < b->n; i++)
        b->status[i] = 0;
    qent *q = malloc(sizeof *q);
    if (!q)
        return KVF_ENOMEM;
    q->op = op;
    q->next = NULL;
    pthread_mutex_lock(&r->mu);
    if (r->stop) {
        pthread_mutex_unlock(&r->mu);
        free(q);
        return KVF_ECLOSED;
    }
    if (r->tail)
        r->tail->next = q;
    else
        r->head = q;
    r->tail = q;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    return 0;
}

static void rdma_free(struct kvf__rdma_path *r)
{
    for (size_t i = 0; i < r->n; i++)
        kvf__rdma_close(&r->nodes[i].rc);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r->nodes);
    free(r);
}

/* A round trip to each node: its HELLO (capabilities, RDMA port) has been read by then. */
static int ask_nodes(kvf_client *c, int probe_ms, char *why, size_t whylen)
{
    for (size_t i = 0; i < c->n_nodes; i++) {
        uint8_t *rep = NULL;
        size_t rlen;
        int rc = kvf__io_raw(c->io[0], i, 0, KVF_OP_STATS, 0, NULL, 0, &rep, &rlen, probe_ms);
        free(rep);
        if (rc)
            return kvf__errf(why, whylen, rc, "node %zu did not answer: %s", i, kvf_strerror(rc));
    }
    return 0;
}

/* Connects to every node's RDMA port. 0, or the first node's failure with the reason in why. */
static int connect_nodes(struct kvf__rdma_path *r, char *why, size_t whylen)
{
    for (size_t i = 0; i < r->n; i++) {
        kvf__node *N = &r->c->nodes[i];
        rnode *nd = &r->nodes[i];
        nd->host = N->host;
        nd->port = (uint16_t)atomic_load(&N->rdma_port);
        if (!(atomic_load(&N->caps) & KVF_CAP_RDMA) || !nd->port)
            return kvf__errf(why, whylen, KVF_ENOTSUP, "node %s serves no RDMA", nd->host);
        kvf__rdma_opts o = {0};
        int rc = kvf__rdma_connect(nd->host, nd->port, &o, &nd->rc, nd->err, sizeof nd->err);
        if (rc)
            return kvf__errf(why, whylen, rc, "node %s: %s", nd->host, nd->err);
    }
    return 0;
}

int kvf__path_rdma_open(kvf_client *c, int probe_ms, char *why, size_t whylen)
{
    if (!kvf__rdma_available(why, whylen))
        return kvf__rdma_built() ? KVF_ENODEV : KVF_ENOTSUP;
    int rc = ask_nodes(c, probe_ms, why, whylen);
    if (rc)
        return rc;
    struct kvf__rdma_path *r = calloc(1, sizeof *r);
    if (!r || !(r->nodes = calloc(c->n_nodes, sizeof *r->nodes))) {
        free(r);
        return kvf__errf(why, whylen, KVF_ENOMEM, "out of memory");
    }
    r->c = c;
    r->n = c->n_nodes;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    rc = connect_nodes(r, why, whylen);
    if (!rc && pthread_create(&r->th, NULL, worker, r) != 0)
        rc = kvf__errf(why, whylen, KVF_EAGAIN, "cannot start the RDMA worker");
    if (rc) {
        rdma_free(r);
        return rc;
    }
    snprintf(why, whylen, "every node serves RDMA and this host has a device");
    c->rdma = r;
    return 0;
}

/* Finishes the op in progress, fails queued ones with KVF_ECANCELED, closes the connections. */
static void rdma_close(kvf_client *c)
{
    struct kvf__rdma_path *r = c->rdma;
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->th, NULL);
    rdma_free(r);
    c->rdma = NULL;
}

const kvf__path_ops kvf__path_rdma = {
    .name = "rdma",
    .submit = rdma_submit,
    .close = rdma_close,
};
