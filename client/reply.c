/*
 * Reading replies (docs/protocol.md). Replies are read by a chain of read targets: each step names
 * where the next bytes go (a header buffer, a reply table, the caller's object buffer, or nowhere)
 * and what to do once they are in, so object bytes land in the caller's buffer with no copy and
 * are hashed while they are still in cache. A plain GET's object is verified segment by segment
 * as it lands; a streamed GET's layers are verified and reported in order across its requests. An
 * item becomes a hit only once all of it is verified.
 *
 * A put is two-phase: ADMIT asks the node to reserve room for each key and says which keys it
 * already has; COMMIT then sends only the reserved objects, on the same connection (reservations
 * belong to the connection). A put in parts sends WRITEs of what its caller made final and then a
 * SEAL instead of the COMMIT (io.c, kvf__req_parts_next).
 */
#include "client_int.h"

#include "kvf/error.h"

#include "bytes.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bytes hashed as they land are read in pieces of at most this size, so that they are still in
 * the cache when the hash reads them. */
#define HASH_CHUNK (256u << 10)

static int rd_header(kvf__conn *cn);
static int rd_get_start_item(kvf__conn *cn);
static int rd_stream_hdr(kvf__conn *cn);
static int rd_layer_seg(kvf__conn *cn);

static void rd_expect(kvf__conn *cn, void *dst, uint64_t len, int (*fn)(kvf__conn *))
{
    cn->rdst = dst;
    cn->rleft = len;
    cn->on_read = fn;
    cn->hashing = 0;
    cn->on_bytes = NULL;
}

/* As rd_expect, hashing the bytes as they land, while they are still in cache; the handler
 * compares XXH3_64bits_digest(cn->xs) with the expected checksum. */
static void rd_expect_hashed(kvf__conn *cn, void *dst, uint64_t len, int (*fn)(kvf__conn *))
{
    rd_expect(cn, dst, len, fn);
    if (dst) {
        XXH3_64bits_reset(cn->xs);
        cn->hashing = 1;
    }
}

void kvf__rd_next_frame(kvf__conn *cn)
{
    cn->rreq = NULL;
    rd_expect(cn, cn->hdr, KVF_WIRE_HEADER_LEN, rd_header);
}

/* The reply to r is complete: take it off the in-flight list and finish it. */
static void reply_done(kvf__conn *cn, kvf__req *r)
{
    kvf__cn_unflight(cn, r);
    kvf__rd_next_frame(cn);
    kvf__req_finish(r);
}

static int rd_errtext(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    int status = cn->h.status;
    int fatal = (cn->h.flags & KVF_WF_FATAL) != 0;
    kvf__cn_unflight(cn, r);
    kvf__rd_next_frame(cn);
    kvf__req_fail(r, status);
    /* A refused AUTH (or a request the node would not take before one) fails what waits on the
     * connection with the same error: none of it can be served. */
    if (fatal && status == KVF_EACCES)
        return KVF_EACCES;
    return fatal ? KVF_EPROTO : 0;
}

static int rd_hello(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    uint32_t ver = kvf__get_u32(r->rtab);
    if (ver != KVF_WIRE_VERSION)
        return KVF_EVERSION;
    uint64_t caps = kvf__get_u64(r->rtab + 8);
    atomic_store(&cn->nd->caps, caps & ~KVF_CAP_AUTH);
    atomic_store(&cn->nd->rdma_port, kvf__get_u32(r->rtab + 40) & 0xffffu);
    atomic_store(&cn->nd->max_request, kvf__get_u64(r->rtab + 16));
    atomic_store(&cn->nd->holders, kvf__get_u32(r->rtab + 44) <= KVF_CLIENT_MAX_HOLDERS
                                       ? kvf__get_u32(r->rtab + 44)
                                       : KVF_CLIENT_MAX_HOLDERS);
    atomic_store(&cn->nd->hello_seen, 1);
    kvf_client *cl = cn->io->cl;
    char name[128];
    uint8_t boot[16];
    if (cl->shm_engines &&
        kvf__hello_shm_parse(r->rtab, r->rtab_len, caps, name, sizeof name, boot)) {
        /* The node's socket, as it says now (a restarted store may listen under a new name). */
        pthread_mutex_lock(&cl->shm_mu);
        if (!memcmp(boot, cl->boot_id, 16)) {
            snprintf(cn->nd->shm_name, sizeof cn->nd->shm_name, "%s", name);
            cn->nd->shm_local = 1;
        }
        pthread_mutex_unlock(&cl->shm_mu);
    }
    cn->state = KVF__CS_UP;
    cn->backoff = 0;
    kvf__node_mark_up(cn->nd); /* it answers: a probe succeeded, or it never was down */
    int auth = (caps & KVF_CAP_AUTH) != 0;
    if (auth) {
        if (r->rtab_len < KVF_HELLO_REPLY_AUTH_LEN)
            return KVF_EPROTO;
        memcpy(cn->nonce, r->rtab + KVF_HELLO_REPLY_LEN, KVF_AUTH_NONCE_LEN);
        cn->node_id = kvf__get_u64(r->rtab + 32);
    }
    reply_done(cn, r);
    if (auth && !cn->io->cl->has_cred) {
        snprintf(cn->errtext, sizeof cn->errtext,
                 "%s requires authentication: no credential (KVF_CREDENTIAL)", cn->nd->addr);
        return KVF_EACCES;
    }
    if (auth) {
        cn->auth_due = 1; /* the engine sends the AUTH once this read is over */
        return 0;
    }
    /* The node asks for none: what waited goes now. */
    cn->gated = 0;
    return kvf__cn_write(cn);
}

/* AUTH answered: the connection is the tenant's; what waited behind it goes now. */
static int rd_auth(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    uint32_t role = kvf__get_u32(r->rtab);
    if (role != KVF_ROLE_TENANT && role != KVF_ROLE_ADMIN)
        return KVF_EPROTO;
    cn->gated = 0;
    reply_done(cn, r);
    return kvf__cn_write(cn);
}

/* Per-key status replies: ADMIT, COMMIT, EVICT, PIN, UNPIN, COMPRESS, COPY. */
static int rd_statuses(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    kvf_client *c = op->cl;
    int mapped = r->phase > 0;
    uint32_t n = mapped ? r->n_commit : r->n;
    int dropped = r->opcode == KVF_OP_SEAL && atomic_load(&op->parts_state) == 2;
    for (uint32_t i = 0; i < n; i++) {
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 4 * (size_t)i);
        if (!kvf_err_is_known(st))
            return KVF_EPROTO;
        uint32_t k = mapped ? r->idx[r->commit_map[i]] : r->idx[i];
        if (r->opcode == KVF_OP_WRITE && st == 0)
            st = 1; /* written so far, still reserved */
        else if (dropped && st == 0)
            st = KVF_ECANCELED; /* the reservation given back, as the caller asked */
        op->b.status[k] = st;
    }
    if (r->opcode == KVF_OP_WRITE) {
        /* the objects the node refused a part of are done with that error */
        uint32_t m = 0;
        for (uint32_t i = 0; i < r->n_commit; i++)
            if (op->b.status[r->idx[r->commit_map[i]]] == 1)
                r->commit_map[m++] = r->commit_map[i];
        r->n_commit = m;
        r->wpos = r->wnext;
        kvf__cn_unflight(cn, r);
        kvf__rd_next_frame(cn);
        kvf__req_parts_next(r);
        return 0;
    }
    if (r->opcode != KVF_OP_ADMIT) {
        reply_done(cn, r);
        return 0;
    }
    /* Admit answered: commit what was reserved, on this connection. Keys the node already has
     * are done (KVF_EEXIST); keys it refused keep their error. */
    uint32_t m = 0;
    r->commit_map = calloc(r->n ? r->n : 1, sizeof *r->commit_map);
    if (!r->commit_map)
        return KVF_ENOMEM;
    for (uint32_t i = 0; i < r->n; i++) {
        if (op->b.status[r->idx[i]] == 0) {
            op->b.status[r->idx[i]] = 1; /* reserved, not yet committed */
            r->commit_map[m++] = i;
        }
    }
    kvf__cn_unflight(cn, r);
    kvf__rd_next_frame(cn);
    if (m == 0) {
        kvf__req_finish(r);
        return 0;
    }
    r->n_commit = m;
    if (op->parts) {
        /* written in parts: what the caller made final goes now, the rest as it comes */
        r->phase = 2;
        r->wpos = r->wnext = op->head_len;
        kvf__req_parts_next(r);
        return 0;
    }
    r->opcode = KVF_OP_COMMIT;
    r->phase = 1;
    int rc = kvf__req_build(c, r);
    if (rc) {
        kvf__req_fail(r, rc);
        return 0;
    }
    kvf__req_push(&cn->sq_head, &cn->sq_tail, r);
    kvf__cn_set_events(cn);
    return 0;
}

static int rd_bitmap(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    size_t off = r->opcode == KVF_OP_LOOKUP ? 8 : 0, bm = (r->n + 7) / 8;
    for (uint32_t i = 0; i < r->n; i++) {
        int hit = (r->rtab[off + i / 8] >> (i % 8)) & 1;
        op->present[r->idx[i]] = (uint8_t)hit;
        op->b.status[r->idx[i]] = hit ? 0 : KVF_ENOENT;
        if (r->flags & KVF_WF_TIERS)
            op->on_disk[r->idx[i]] = (uint8_t)(hit & (r->rtab[off + bm + i / 8] >> (i % 8)));
    }
    reply_done(cn, r);
    return 0;
}

static int rd_clear(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    r->op->removed += kvf__get_u64(r->rtab);
    reply_done(cn, r);
    return 0;
}

/* Raw control replies (RDMA descriptors): the payload goes to the op whole. */
static int rd_raw(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    free(op->raw_rep);
    op->raw_rep = r->rtab;
    op->raw_rep_len = r->rtab_len;
    r->rtab = NULL;
    reply_done(cn, r);
    return 0;
}

static int rd_stats(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    free(op->json);
    op->json = malloc(r->rtab_len + 1);
    if (!op->json)
        return KVF_ENOMEM;
    memcpy(op->json, r->rtab, r->rtab_len);
    op->json[r->rtab_len] = '\0';
    reply_done(cn, r);
    return 0;
}

/* GET, not streamed: the table, then each hit's object into its buffer: the fixed header, the
 * rest of the header, then each segment, hashed as it arrives and checked against the header. */

static uint64_t item_len(const kvf__req *r, uint32_t i)
{
    return kvf__get_u64(r->rtab + 16 * (size_t)i + 8);
}

static void item_fail(kvf__req *r, int status)
{
    kvf_op *op = r->op;
    op->b.status[r->idx[r->item]] = status;
    kvf__io_count(op->io, 0, 0, 0, 1, 0);
}

static int rd_get_item_end(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    r->item++;
    return rd_get_start_item(cn);
}

/* Consumes the n bytes of the current object that just landed at offset cur_off of its buffer:
 * parses the header once it is complete, then hashes segment by segment and checks each
 * checksum at its end. A failure stops the work; the rest of the object still lands, unused. */
static void get_item_bytes(kvf__conn *cn, size_t n)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t k = r->idx[r->item];
    uint8_t *buf = op->b.bufs[k];
    uint64_t pos = r->cur_off, end = r->cur_off + n;
    r->cur_off = end;
    while (pos < end && r->cur_state != 2) {
        if (r->cur_state == 0) {
            if (end < 64)
                return;
            uint32_t layers = kvf__get_u32(buf + 36);
            uint32_t hlen = kvf_obj_header_len(layers);
            if (layers == 0 || layers > KVF_OBJ_MAX_LAYERS || hlen > r->cur_len) {
                r->cur_state = 2;
                return;
            }
            if (end < hlen)
                return;
            if (kvf_obj_parse(buf, hlen, &r->cur) != 0 ||
                r->cur.header_len + r->cur.stored_bytes != r->cur_len ||
                !kvf_key_eq(&r->cur.key, &op->b.keys[k])) {
                r->cur_state = 2;
                return;
            }
            r->cur_state = 1;
            r->cur_seg = 0;
            r->seg_start = hlen;
            pos = hlen;
            XXH3_64bits_reset(cn->xs);
            continue;
        }
        kvf_obj_seg sg = kvf_obj_seg_at(&r->cur, r->cur_seg);
        uint64_t seg_end = r->seg_start + sg.stored_len;
        uint64_t take = (end < seg_end ? end : seg_end) - pos;
        kvf__xxh3_update(cn->xs, buf + pos, take);
        pos += take;
        if (pos == seg_end) {
            if (XXH3_64bits_digest(cn->xs) != sg.stored_xxh) {
                r->cur_state = 2;
                return;
            }
            r->cur_seg++;
            r->seg_start = seg_end;
            XXH3_64bits_reset(cn->xs);
        }
    }
}

static int rd_get_item_done(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t k = r->idx[r->item];
    if (r->cur_state == 1 && r->cur_seg == r->cur.layers) {
        op->b.status[k] = 0;
        if (op->b.out_lens)
            op->b.out_lens[k] = r->cur_len;
    } else {
        item_fail(r, KVF_ECHECKSUM);
    }
    return rd_get_item_end(cn);
}

static int rd_get_start_item(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    while (r->item < r->n) {
        uint32_t i = r->item;
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        uint64_t len = item_len(r, i);
        uint32_t k = r->idx[i];
        op->b.status[k] = st;
        if (st != 0) {
            r->item++;
            continue;
        }
        r->cur_len = len;
        r->cur_off = 0;
        if (len > op->b.caps[k]) {
            op->b.status[k] = KVF_E2BIG;
            rd_expect(cn, NULL, len, rd_get_item_end);
        } else if (len < 72) {
            item_fail(r, KVF_ECHECKSUM);
            rd_expect(cn, NULL, len, rd_get_item_end);
        } else {
            /* Until its last segment verifies, the item is not a hit. */
            op->b.status[k] = 1;
            r->cur_state = 0;
            rd_expect(cn, op->b.bufs[k], len, rd_get_item_done);
            cn->on_bytes = get_item_bytes;
        }
        return 0;
    }
    reply_done(cn, r);
    return 0;
}

static int rd_get_table(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    uint64_t sum = 0;
    for (uint32_t i = 0; i < r->n; i++) {
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        uint64_t len = kvf__get_u64(r->rtab + 16 * (size_t)i + 8);
        if (!kvf_err_is_known(st) || (st && len) || len > cn->h.payload_len)
            return KVF_EPROTO;
        sum += len;
    }
    if (sum != cn->h.payload_len - 16 * (uint64_t)r->n)
        return KVF_EPROTO;
    r->item = 0;
    return rd_get_start_item(cn);
}

/* Streamed GET. First frame: table (status, header length, stored length) and the headers. */

static int rd_stream_next_hdr(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    while (r->item < r->n) {
        uint32_t i = r->item;
        const uint8_t *row = r->rtab + 16 * (size_t)i;
        int st = (int)(int32_t)kvf__get_u32(row);
        uint32_t hlen = kvf__get_u32(row + 4);
        uint64_t stored = kvf__get_u64(row + 8);
        uint32_t k = r->idx[i];
        op->b.status[k] = st;
        if (st) {
            r->item++;
            continue;
        }
        if (hlen + stored > op->b.caps[k]) {
            op->b.status[k] = KVF_E2BIG;
            rd_expect(cn, NULL, hlen, rd_stream_hdr);
        } else {
            rd_expect(cn, op->b.bufs[k], hlen, rd_stream_hdr);
        }
        return 0;
    }
    /* All headers in. Keys that the node named for them lacks go to their own node now, before
     * any layer of the op is reported: this request holds the op's front at 0 until then. */
    kvf__cn_unflight(cn, r);
    if (!(cn->h.flags & KVF_WF_MORE)) {
        /* A reply without MORE had no hits. */
        kvf__rd_next_frame(cn);
        kvf__req_reask_named(r, 0);
        r->layers_delivered = UINT32_MAX;
        kvf__req_finish(r);
        return 0;
    }
    /* Keep r in flight (at the head) for its layer frames. */
    r->next = cn->fl_head;
    cn->fl_head = r;
    if (!cn->fl_tail)
        cn->fl_tail = r;
    kvf__rd_next_frame(cn);
    kvf__req_reask_named(r, 0);
    return 0;
}

static int rd_stream_hdr(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t i = r->item;
    uint32_t k = r->idx[i];
    uint32_t hlen = kvf__get_u32(r->rtab + 16 * (size_t)i + 4);
    if (op->b.status[k] == 0) {
        int rc = kvf_obj_parse(op->b.bufs[k], hlen, &r->info[i]);
        if (rc == 0 && (r->info[i].header_len != hlen ||
                        r->info[i].stored_bytes != kvf__get_u64(r->rtab + 16 * (size_t)i + 8) ||
                        !kvf_key_eq(&r->info[i].key, &op->b.keys[k])))
            rc = KVF_ECHECKSUM;
        if (rc == 0 && op->layers && r->info[i].layers != op->layers)
            rc = KVF_ELAYOUT;
        op->b.status[k] = rc;
        if (rc) {
            kvf__io_count(op->io, 0, 0, 0, 1, 0);
            return KVF_EPROTO; /* the layer frames' sizes can no longer be trusted */
        }
        op->layers = r->info[i].layers;
        r->segoff[i] = hlen;
    }
    r->item++;
    return rd_stream_next_hdr(cn);
}

static int rd_stream_table(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    for (uint32_t i = 0; i < r->n; i++) {
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        if (!kvf_err_is_known(st))
            return KVF_EPROTO;
    }
    r->info = calloc(r->n, sizeof *r->info);
    r->segoff = calloc(r->n, sizeof *r->segoff);
    if (!r->info || !r->segoff)
        return KVF_ENOMEM;
    r->item = 0;
    return rd_stream_next_hdr(cn);
}

/* Layer frames: an 8-byte prefix naming the layer, then that layer's segment of every hit. */

static int rd_layer_next(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    while (r->item < r->n) {
        uint32_t i = r->item;
        uint32_t k = r->idx[i];
        int st = (int)(int32_t)kvf__get_u32(r->rtab + 16 * (size_t)i);
        if (st) {
            r->item++;
            continue;
        }
        kvf_obj_seg sg = kvf_obj_seg_at(&r->info[i], r->layer);
        if (op->b.status[k] == 0)
            rd_expect_hashed(cn, (uint8_t *)op->b.bufs[k] + r->segoff[i], sg.stored_len,
                             rd_layer_seg);
        else
            rd_expect(cn, NULL, sg.stored_len, rd_layer_seg);
        return 0;
    }
    /* Layer complete. */
    r->layer++;
    r->layers_delivered = r->layer;
    int last = !(cn->h.flags & KVF_WF_MORE);
    if (last) {
        for (uint32_t i = 0; i < r->n; i++) {
            uint32_t k = r->idx[i];
            if (op->b.status[k] == 0 && op->b.out_lens && !(r->moved && r->moved[i]))
                op->b.out_lens[k] = r->segoff[i];
        }
        if (r->layer != op->layers)
            return KVF_EPROTO;
        r->layers_delivered = UINT32_MAX;
        reply_done(cn, r);
        return 0;
    }
    kvf__rd_next_frame(cn);
    kvf__op_stream_progress(op);
    return 0;
}

static int rd_layer_seg(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    kvf_op *op = r->op;
    uint32_t i = r->item;
    uint32_t k = r->idx[i];
    kvf_obj_seg sg = kvf_obj_seg_at(&r->info[i], r->layer);
    if (op->b.status[k] == 0) {
        if (XXH3_64bits_digest(cn->xs) != sg.stored_xxh) {
            op->b.status[k] = KVF_ECHECKSUM;
            kvf__io_count(op->io, 0, 0, 0, 1, 0);
        }
    }
    r->segoff[i] += sg.stored_len;
    r->item++;
    return rd_layer_next(cn);
}

static int rd_layer_prefix(kvf__conn *cn)
{
    kvf__req *r = cn->rreq;
    if (kvf__get_u32((const uint8_t *)cn->errtext) != r->layer)
        return KVF_EPROTO;
    uint64_t want = 8;
    uint32_t hits = 0;
    for (uint32_t i = 0; i < r->n; i++) {
        if (kvf__get_u32(r->rtab + 16 * (size_t)i) == 0) {
            want += kvf_obj_seg_at(&r->info[i], r->layer).stored_len;
            hits++;
        }
    }
    if (want != cn->h.payload_len || hits != cn->h.item_count)
        return KVF_EPROTO;
    r->item = 0;
    return rd_layer_next(cn);
}

static int rd_payload_into_rtab(kvf__conn *cn, kvf__req *r, uint64_t len, int (*fn)(kvf__conn *))
{
    free(r->rtab);
    r->rtab = malloc(len ? len : 1);
    if (!r->rtab)
        return KVF_ENOMEM;
    r->rtab_len = len;
    rd_expect(cn, r->rtab, len, fn);
    if (len == 0)
        return fn(cn);
    return 0;
}

static int rd_header(kvf__conn *cn)
{
    kvf_wire_limits lim = {.max_request = UINT64_MAX >> 1, .expect_reply = 1};
    int rc = kvf__wire_hdr_decode(cn->hdr, &lim, &cn->h, NULL, 0);
    if (rc)
        return KVF_EPROTO;
    kvf__req *r = cn->fl_head;
    while (r && r->id != cn->h.request_id)
        r = r->next;
    if (!r || r->opcode != cn->h.opcode)
        return KVF_EPROTO;
    cn->rreq = r;
    if (cn->h.status < 0) {
        uint64_t len = cn->h.payload_len;
        if (len >= KVF_CLIENT_MAX_ERR_TEXT)
            return KVF_EPROTO;
        cn->errtext[len] = '\0';
        rd_expect(cn, cn->errtext, len, rd_errtext);
        return len == 0 ? rd_errtext(cn) : 0;
    }
    uint64_t plen = cn->h.payload_len;
    uint32_t n = r->phase > 0 ? r->n_commit : r->n;
    /* A raw request (kvf__io_raw) gets its reply's payload whole, whatever its opcode. */
    if (r->op->raw)
        return plen > KVF_CLIENT_RAW_MAX ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_raw);
    switch (r->opcode) {
    case KVF_OP_HELLO:
        return plen < KVF_HELLO_REPLY_LEN || plen > 4096
                   ? KVF_EPROTO
                   : rd_payload_into_rtab(cn, r, plen, rd_hello);
    case KVF_OP_AUTH:
        return plen != KVF_AUTH_REPLY_LEN ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_auth);
    case KVF_OP_ADMIT:
    case KVF_OP_COMMIT:
    case KVF_OP_WRITE:
    case KVF_OP_SEAL:
    case KVF_OP_EVICT:
    case KVF_OP_PIN:
    case KVF_OP_UNPIN:
    case KVF_OP_COMPRESS:
    case KVF_OP_COPY:
        if (plen != 4 * (uint64_t)n || cn->h.item_count != n)
            return KVF_EPROTO;
        return rd_payload_into_rtab(cn, r, plen, rd_statuses);
    case KVF_OP_EXISTS:
    case KVF_OP_LOOKUP: {
        uint64_t want =
            (r->opcode == KVF_OP_LOOKUP ? 8 : 0) + (n + 7) / 8 * (r->flags & KVF_WF_TIERS ? 2 : 1);
        if (plen != want)
            return KVF_EPROTO;
        return rd_payload_into_rtab(cn, r, plen, rd_bitmap);
    }
    case KVF_OP_CLEAR:
        return plen != 8 ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_clear);
    case KVF_OP_STATS:
        return plen > (1u << 20) ? KVF_EPROTO : rd_payload_into_rtab(cn, r, plen, rd_stats);
    case KVF_OP_GET:
        if (r->flags & KVF_WF_STREAM) {
            if (!r->rtab) {
                if (plen < 16 * (uint64_t)n || cn->h.item_count != n)
                    return KVF_EPROTO;
                return rd_payload_into_rtab(cn, r, 16 * (uint64_t)n, rd_stream_table);
            }
            if (plen < 8)
                return KVF_EPROTO;
            rd_expect(cn, cn->errtext, 8, rd_layer_prefix);
            return 0;
        }
        if (plen < 16 * (uint64_t)n || cn->h.item_count != n)
            return KVF_EPROTO;
        return rd_payload_into_rtab(cn, r, 16 * (uint64_t)n, rd_get_table);
    default:
        return KVF_EPROTO;
    }
}

/* Before waiting for more: a large payload's reader wakes once a large piece of it is there. */
static void cn_set_lowat(kvf__conn *cn)
{
    kvf__sock_lowat(cn->fd, &cn->lowat, cn->rdst ? cn->rleft : 0);
}

int kvf__cn_read(kvf__conn *cn)
{
    uint64_t budget = 64u << 20;
    while (budget) {
        if (cn->rleft == 0) {
            int rc = cn->on_read(cn);
            if (rc)
                return rc;
            if (cn->fd < 0)
                return 0;
            if (cn->rleft == 0)
                continue;
        }
        uint8_t *dst = cn->rdst;
        size_t want = cn->rleft > budget ? budget : cn->rleft;
        /* Bytes that are hashed as they land are read in pieces that stay in the cache for the
         * hash: hashing a large read afterwards would fetch it from memory again. */
        if ((cn->hashing || cn->on_bytes) && want > HASH_CHUNK)
            want = HASH_CHUNK;
        if (!dst) {
            dst = cn->io->scratch;
            if (want > KVF_CLIENT_SCRATCH)
                want = KVF_CLIENT_SCRATCH;
        }
        /* A header is only expected while a request is in flight. */
        if (cn->on_read == rd_header && !cn->fl_head)
            dst = cn->hdr;
        size_t got;
        int rc = kvf__sock_read(cn->fd, dst, want, &got);
        if (rc == KVF_EAGAIN) {
            cn_set_lowat(cn);
            return 0;
        }
        if (rc)
            return rc;
        if (got == 0)
            return KVF_ECONNRESET;
        if (cn->on_read == rd_header && !cn->fl_head)
            return KVF_EPROTO; /* bytes nobody asked for */
        kvf__io_count(cn->io, 0, 0, got, 0, 0);
        budget -= got;
        if (cn->hashing)
            kvf__xxh3_update(cn->xs, cn->rdst, got);
        else if (cn->on_bytes)
            cn->on_bytes(cn, got);
        if (cn->rdst)
            cn->rdst += got;
        cn->rleft -= got;
    }
    cn_set_lowat(cn); /* the budget is spent: the poller calls again for the rest */
    return 0;
}
