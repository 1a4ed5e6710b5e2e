/*
 * Requests and their frames (docs/protocol.md): an op's keys split into requests over an engine's
 * connections, and each request's header and payload built for sending. A COMMIT's objects are
 * sent from the caller's buffers through iovecs, never copied.
 */
#include "client_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "clock.h"

#include <stdlib.h>
#include <string.h>

kvf__req *kvf__req_new(kvf_op *op, kvf__conn *cn, uint32_t opcode, uint32_t n)
{
    kvf__req *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->idx = calloc(n ? n : 1, sizeof *r->idx);
    if (!r->idx) {
        free(r);
        return NULL;
    }
    r->op = op;
    r->cn = cn;
    r->opcode = opcode;
    return r;
}

static void put_hdr(uint8_t *p, uint32_t opcode, uint32_t flags, uint64_t id, uint32_t n,
                    uint64_t payload)
{
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = (uint16_t)opcode,
                      .flags = flags,
                      .request_id = id,
                      .item_count = n,
                      .payload_len = payload};
    kvf__wire_hdr_encode(p, &h);
}

/* A raw control request: the payload is the caller's, whole. */
static int build_raw(kvf__req *r)
{
    kvf_op *op = r->op;
    r->buf = malloc(KVF_WIRE_HEADER_LEN + op->raw_len);
    r->iov = calloc(1, sizeof *r->iov);
    if (!r->buf || !r->iov)
        return KVF_ENOMEM;
    if (op->raw_len)
        memcpy(r->buf + KVF_WIRE_HEADER_LEN, op->raw_req, op->raw_len);
    put_hdr(r->buf, r->opcode, 0, r->id, op->raw_count, op->raw_len);
    r->flags = 0;
    r->iov[0] = (struct iovec){r->buf, KVF_WIRE_HEADER_LEN + op->raw_len};
    r->iovcnt = 1;
    return 0;
}

/* The payload that r's opcode carries in r->buf (a COMMIT's objects follow in iovecs). */
static size_t payload_len(const kvf__req *r)
{
    size_t n = r->n;
    switch (r->opcode) {
    case KVF_OP_COMMIT:
        return kvf__wire_put_table_len(r->n_commit);
    case KVF_OP_WRITE:
    case KVF_OP_SEAL:
        return kvf__wire_data_table_len(r->opcode, r->n_commit);
    case KVF_OP_ADMIT:
        return 8 + 24 * n;
    case KVF_OP_PIN:
    case KVF_OP_COMPRESS:
        return 16 + 16 * n;
    case KVF_OP_COPY:
        return 16 + ((strlen(r->op->addr) + 7) & ~(size_t)7) + 16 * n;
    case KVF_OP_CLEAR:
        return 8;
    case KVF_OP_STATS:
        return 0;
    case KVF_OP_HELLO:
        return 24;
    case KVF_OP_AUTH:
        return KVF_AUTH_REQ_LEN;
    default:
        return 8 + 16 * n;
    }
}

/* COMMIT: the table of what was reserved, then the objects from the caller's buffers. Returns
 * the objects' bytes. */
static uint64_t fill_commit(kvf__req *r, uint8_t *p, uint64_t ns)
{
    const kvf_batch *b = &r->op->b;
    uint64_t data = 0;
    kvf__put_u64(p, ns);
    for (uint32_t i = 0; i < r->n_commit; i++) {
        uint32_t k = r->idx[r->commit_map[i]];
        kvf__wire_key_put(p + 8 + 24 * (size_t)i, &b->keys[k]);
        kvf__put_u64(p + 8 + 24 * (size_t)i + 16, b->lens[k]);
        r->iov[1 + i].iov_base = (void *)b->objs[k];
        r->iov[1 + i].iov_len = b->lens[k];
        data += b->lens[k];
    }
    return data;
}

/* WRITE: bytes [wpos, wnext) of each object still reserved; SEAL: their heads, or nothing (the
 * reservations dropped) after the caller aborted. Returns the bytes that follow the table. */
static uint64_t fill_parts(kvf__req *r, uint8_t *p, uint64_t ns)
{
    const kvf_op *op = r->op;
    const kvf_batch *b = &op->b;
    int drop = r->opcode == KVF_OP_SEAL && atomic_load(&op->parts_state) == 2;
    uint64_t off = r->opcode == KVF_OP_WRITE ? r->wpos : 0;
    uint64_t len = r->opcode == KVF_OP_WRITE ? r->wnext - r->wpos : drop ? 0 : op->head_len;
    kvf__put_u64(p, ns);
    for (uint32_t i = 0; i < r->n_commit; i++) {
        uint32_t k = r->idx[r->commit_map[i]];
        uint8_t *row = p + 8 + 32 * (size_t)i;
        kvf__wire_key_put(row, &b->keys[k]);
        kvf__put_u64(row + 16, off);
        kvf__put_u64(row + 24, len);
        r->iov[1 + i].iov_base = (uint8_t *)b->objs[k] + off;
        r->iov[1 + i].iov_len = len;
    }
    return len * r->n_commit;
}

/* Requests that carry a namespace and keys (with a lease, codec or address before them, or each
 * key's length after it for ADMIT). */
static void fill_keys(kvf__req *r, uint8_t *p, uint64_t ns)
{
    kvf_op *op = r->op;
    kvf__put_u64(p, ns);
    uint8_t *keys = p + 8;
    size_t stride = 16;
    if (r->opcode == KVF_OP_PIN || r->opcode == KVF_OP_COMPRESS) {
        kvf__put_u32(p + 8, r->opcode == KVF_OP_PIN ? op->lease_ms : op->codec);
        keys = p + 16;
    } else if (r->opcode == KVF_OP_COPY) {
        uint32_t alen = (uint32_t)strlen(op->addr);
        kvf__put_u32(p + 8, alen);
        uint64_t t = kvf__now_ns();
        uint64_t left = op->deadline_ns > t ? op->deadline_ns - t : 1;
        kvf__put_u32(p + 12, (uint32_t)(left / 1000000u) + 1);
        memcpy(p + 16, op->addr, alen);
        keys = p + 16 + ((alen + 7) & ~7u);
    } else if (r->opcode == KVF_OP_ADMIT) {
        stride = 24;
    }
    for (uint32_t i = 0; i < r->n; i++) {
        uint32_t k = r->idx[i];
        kvf__wire_key_put(keys + stride * i, &op->b.keys[k]);
        if (r->opcode == KVF_OP_ADMIT)
            kvf__put_u64(keys + stride * i + 16, op->b.lens[k]);
    }
}

int kvf__req_build(kvf_client *c, kvf__req *r)
{
    kvf_op *op = r->op;
    uint64_t ns = c->o.ns;
    r->id = atomic_fetch_add(&c->next_id, 1) + 1;
    free(r->buf);
    free(r->iov);
    r->buf = NULL;
    r->iov = NULL;
    r->first = 0;
    r->sending = 0;
    if (op->raw)
        return build_raw(r);
    size_t plen = payload_len(r);
    r->buf = calloc(1, KVF_WIRE_HEADER_LEN + plen);
    int data_op =
        r->opcode == KVF_OP_COMMIT || r->opcode == KVF_OP_WRITE || r->opcode == KVF_OP_SEAL;
    int niov = 1 + (data_op ? (int)r->n_commit : 0);
    r->iov = calloc((size_t)niov, sizeof *r->iov);
    if (!r->buf || !r->iov)
        return KVF_ENOMEM;
    uint8_t *p = r->buf + KVF_WIRE_HEADER_LEN;
    uint64_t data = 0;
    uint32_t count = r->n, flags = 0;
    switch (r->opcode) {
    case KVF_OP_HELLO:
        kvf__put_u32(p, KVF_WIRE_VERSION);
        kvf__put_u32(p + 4, KVF_WIRE_VERSION);
        kvf__put_u64(p + 8, ns);
        kvf__put_u64(p + 16, KVF_CAP_ALL | (c->shm_engines ? KVF_CAP_SHM : 0));
        count = 0;
        break;
    case KVF_OP_STATS:
        count = 0;
        break;
    case KVF_OP_AUTH: {
        size_t name_len = strlen(c->cred.tenant);
        kvf__put_u32(p, (uint32_t)name_len);
        memcpy(p + 8, c->cred.tenant, name_len);
        int rc = kvf__auth_sign(&c->cred, r->cn->nonce, r->cn->node_id, p + 8 + 64);
        if (rc)
            return rc;
        count = 0;
        break;
    }
    case KVF_OP_CLEAR:
        kvf__put_u64(p, ns);
        count = 0;
        break;
    case KVF_OP_COMMIT:
        data = fill_commit(r, p, ns);
        count = r->n_commit;
        break;
    case KVF_OP_WRITE:
    case KVF_OP_SEAL:
        data = fill_parts(r, p, ns);
        count = r->n_commit;
        break;
    default:
        fill_keys(r, p, ns);
        if (r->opcode == KVF_OP_GET && (op->b.flags & KVF_GET_STREAM))
            flags |= KVF_WF_STREAM;
        if ((r->opcode == KVF_OP_EXISTS || r->opcode == KVF_OP_LOOKUP) && op->on_disk)
            flags |= KVF_WF_TIERS;
    }
    put_hdr(r->buf, r->opcode, flags, r->id, count, plen + data);
    r->flags = flags;
    r->iov[0].iov_base = r->buf;
    r->iov[0].iov_len = KVF_WIRE_HEADER_LEN + plen;
    r->iovcnt = data ? niov : 1; /* a SEAL that drops carries no bytes */
    return 0;
}

/* The bytes a key weighs in striping: a put's object, a get's buffer; nothing for control. */
static uint64_t weight(const kvf_op *op, size_t i)
{
    return op->kind == KVF__OPK_PUT ? op->b.lens[i] : op->kind == KVF__OPK_GET ? op->b.caps[i] : 0;
}

/* Requests one op may send one node at most (a put of 4096 x 64 MiB). */
#define KVF__MAX_STRIPES 4096

/* The most payload bytes one put request to node nd may carry: half the node's limit (an object
 * more than the even share may land in a request), or a safe default before its HELLO. */
static uint64_t req_cap(const kvf__io *io, size_t nd)
{
    uint64_t m = atomic_load(&io->cl->nodes[nd].max_request);
    return m ? m / 2 : KVF__REQ_BYTES_DEFAULT;
}

/* How many requests a node's share of `keys` keys and `bytes` bytes is cut into: one per
 * stripe_bytes, at most one per connection, and one per key at most; control ops take one. A put
 * takes as many more as keep every request within the node's limit on a request's size: those
 * share the connections. */
static int stripes_of(const kvf__io *io, const kvf_op *op, size_t nd, uint64_t bytes, size_t keys)
{
    if (op->kind == KVF__OPK_CTRL)
        return 1;
    int stripes = io->conns <= 1 ? 1 : (int)(bytes / io->cl->o.stripe_bytes);
    if (stripes < 1)
        stripes = 1;
    if (stripes > io->conns)
        stripes = io->conns;
    if (op->kind == KVF__OPK_PUT) {
        uint64_t cap = req_cap(io, nd);
        uint64_t need = (bytes + cap - 1) / cap;
        if (need > (uint64_t)stripes)
            stripes = need > KVF__MAX_STRIPES ? KVF__MAX_STRIPES : (int)need;
    }
    if ((size_t)stripes > keys)
        stripes = (int)keys;
    return stripes < 1 ? 1 : stripes;
}

/* Node nd's share of op: its `count` keys in requests on consecutive connections of the node. */
static int split_node(kvf__io *io, kvf_op *op, size_t nd, const size_t *node_of, size_t count,
                      uint64_t bytes, int stripes)
{
    size_t n = op->b.n;
    kvf__req **rq = calloc((size_t)stripes, sizeof *rq);
    if (!rq)
        return KVF_ENOMEM;
    int base = op->conn >= 0 ? op->conn : atomic_fetch_add(&io->rr[nd], stripes);
    for (int s = 0; s < stripes; s++) {
        kvf__conn *cn =
            &io->cn[nd * (size_t)io->conns + (unsigned)(base + s) % (unsigned)io->conns];
        if (!(rq[s] = kvf__req_new(op, cn, op->opcode, (uint32_t)count))) {
            free(rq);
            return KVF_ENOMEM;
        }
        op->reqs[op->n_reqs++] = rq[s];
    }
    /* Stripe s takes the keys whose cumulative bytes fall in its s-th share, so equal objects
     * spread evenly; there are never more stripes than keys. */
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        if (node_of[i] != nd)
            continue;
        int s = bytes ? (int)((acc * (uint64_t)stripes) / bytes) : 0;
        if (s >= stripes)
            s = stripes - 1;
        rq[s]->idx[rq[s]->n++] = (uint32_t)i;
        acc += weight(op, i);
    }
    /* A stripe left empty (uneven sizes) is dropped: a request carries at least one key. */
    int kept = 0;
    for (int k = 0; k < stripes; k++) {
        if (rq[k]->n == 0 && count > 0) {
            op->n_reqs--;
            kvf__req_free(rq[k]);
            continue;
        }
        rq[kept++] = rq[k];
    }
    for (int k = 0; k < kept; k++)
        op->reqs[op->n_reqs - kept + k] = rq[k];
    int rc = 0;
    for (int k = 0; k < kept && !rc; k++)
        rc = kvf__req_build(io->cl, rq[k]);
    free(rq);
    return rc;
}

int kvf__op_split(kvf__io *io, kvf_op *op)
{
    kvf_client *c = io->cl;
    size_t n = op->b.n;
    size_t *node_of = malloc((n ? n : 1) * sizeof *node_of);
    size_t *count = calloc(c->n_nodes, sizeof *count);
    uint64_t *bytes = calloc(c->n_nodes, sizeof *bytes);
    int *stripes = calloc(c->n_nodes, sizeof *stripes);
    int rc = KVF_ENOMEM;
    if (!node_of || !count || !bytes || !stripes)
        goto out_free;
    for (size_t i = 0; i < n; i++) {
        node_of[i] = op->target >= 0 ? (size_t)op->target
                                     : kvf__key_node(c, &op->b, op->kind == KVF__OPK_GET, i);
        count[node_of[i]]++;
        bytes[node_of[i]] += weight(op, i);
    }
    size_t total = 0;
    for (size_t nd = 0; nd < c->n_nodes; nd++) {
        int chosen = op->target == -2 || op->target == (int)nd;
        if (count[nd] || (n == 0 && chosen))
            stripes[nd] = stripes_of(io, op, nd, bytes[nd], count[nd]);
        total += (size_t)stripes[nd];
    }
    op->reqs = calloc(total ? total : 1, sizeof *op->reqs);
    if (!op->reqs)
        goto out_free;
    rc = 0;
    for (size_t nd = 0; nd < c->n_nodes && !rc; nd++)
        if (stripes[nd])
            rc = split_node(io, op, nd, node_of, count[nd], bytes[nd], stripes[nd]);
    op->pending = op->n_reqs;
out_free:
    free(node_of);
    free(count);
    free(bytes);
    free(stripes);
    return rc;
}
