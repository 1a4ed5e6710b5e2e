/*
 * The storage node server's frame reader (docs/protocol.md). A connection reads frames with a
 * small state machine:
 *   HDR   40 header bytes, validated before anything else is read;
 *   BODY  a control payload, or the item table of a PUT/COMMIT/WRITE/SEAL, into the connection's
 *         buffer;
 *   DATA  PUT/COMMIT/WRITE/SEAL object bytes, straight into each item's reserved arena block (or
 * discarded when the item was refused), verified and committed one by one (server_put.c). A
 * complete body goes to its opcode's handler. A bad frame gets a fatal error reply: the connection
 * is read no further and closes once the reply is written.
 */
#include "server_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "clock.h"
#include "metrics.h"
#include "tcp.h"

#include <inttypes.h>
#include <stdlib.h>

#define READ_BUDGET (16u << 20) /* bytes read from one connection per readiness event */

/* Grows c's payload buffer to n bytes, keeping it across requests. */
static int ensure_rbuf(conn *c, size_t n)
{
    if (c->rcap >= n)
        return 0;
    size_t cap = c->rcap ? c->rcap : 4096;
    while (cap < n)
        cap *= 2;
    uint8_t *p = realloc(c->rbuf, cap);
    if (!p)
        return KVF_ENOMEM;
    c->rbuf = p;
    c->rcap = cap;
    return 0;
}

/* c's 40 header bytes are in: a valid header sets c to read its body (for PUT and COMMIT, only
 * the item table); a bad one gets a fatal error reply. */
static void on_header(conn *c)
{
    kvf_server *s = c->lp->srv;
    char msg[200];
    c->counted = 0;
    kvf_wire_limits lim = {
        .max_request = s->o.max_request, .max_items = s->o.max_items, .expect_reply = 0};
    int rc = kvf__wire_hdr_decode(c->hdr, &lim, &c->h, msg, sizeof msg);
    if (rc) {
        kvf__reply_error(c, rc, 1, "%s", msg);
        return;
    }
    atomic_fetch_add(&s->reqs[c->h.opcode & 31], 1);
    atomic_fetch_add(&s->reqs_by[c->is_unix != 0][c->h.opcode & 31], 1);
    c->counted = 1;
    if (s->m_op[c->h.opcode & 31])
        c->t_hdr = kvf__now_ns();
    if (!kvf__auth_gate(c, c->h.opcode))
        return;
    if (kvf__wire_is_data_op(c->h.opcode))
        c->rneed = kvf__wire_data_table_len(c->h.opcode, c->h.item_count);
    else
        c->rneed = c->h.payload_len;
    if (ensure_rbuf(c, c->rneed ? c->rneed : 1) != 0) {
        kvf__reply_error(c, KVF_ENOMEM, 1, "out of memory for a payload of %" PRIu64 " bytes",
                         c->rneed);
        return;
    }
    c->rgot = 0;
    c->rstate = R_BODY;
}

/* One row per opcode: the handler of a request whose body has been read, and whether the body
 * must name the namespace bound by HELLO, which is checked here before the handler runs and then
 * replaced by the one the node keeps it under (a tenant's are scoped to it). HELLO, AUTH and
 * STATS name none; CLEAR checks its own, as it may name every namespace; PUT and COMMIT check
 * theirs once their table is read, as their object bytes must still be read past. */
typedef struct op_row {
    uint16_t opcode;
    void (*handler)(conn *c);
    uint8_t needs_ns;
} op_row;

static const op_row ops[] = {
    {.opcode = KVF_OP_HELLO, .handler = kvf__req_hello, .needs_ns = 0},
    {.opcode = KVF_OP_PUT, .handler = kvf__req_put_begin, .needs_ns = 0},
    {.opcode = KVF_OP_ADMIT, .handler = kvf__req_per_key, .needs_ns = 1},
    {.opcode = KVF_OP_COMMIT, .handler = kvf__req_put_begin, .needs_ns = 0},
    {.opcode = KVF_OP_GET, .handler = kvf__req_get, .needs_ns = 1},
    {.opcode = KVF_OP_EXISTS, .handler = kvf__req_exists, .needs_ns = 1},
    {.opcode = KVF_OP_LOOKUP, .handler = kvf__req_lookup, .needs_ns = 1},
    {.opcode = KVF_OP_EVICT, .handler = kvf__req_per_key, .needs_ns = 1},
    {.opcode = KVF_OP_PIN, .handler = kvf__req_per_key, .needs_ns = 1},
    {.opcode = KVF_OP_UNPIN, .handler = kvf__req_per_key, .needs_ns = 1},
    {.opcode = KVF_OP_CLEAR, .handler = kvf__req_clear, .needs_ns = 0},
    {.opcode = KVF_OP_STATS, .handler = kvf__req_stats, .needs_ns = 0},
    {.opcode = KVF_OP_COPY, .handler = kvf__req_copy, .needs_ns = 1},
    {.opcode = KVF_OP_COMPRESS, .handler = kvf__req_recode, .needs_ns = 1},
    {.opcode = KVF_OP_DECOMPRESS, .handler = kvf__req_recode, .needs_ns = 1},
    {.opcode = KVF_OP_RDMA_GET, .handler = kvf__req_rdma_get, .needs_ns = 1},
    {.opcode = KVF_OP_RDMA_RELEASE, .handler = kvf__req_rdma_release, .needs_ns = 1},
    {.opcode = KVF_OP_RDMA_RESERVE, .handler = kvf__req_rdma_reserve, .needs_ns = 1},
    {.opcode = KVF_OP_RDMA_COMMIT, .handler = kvf__req_rdma_commit, .needs_ns = 1},
    {.opcode = KVF_OP_AUTH, .handler = kvf__req_auth, .needs_ns = 0},
    {.opcode = KVF_OP_SHM_MAP, .handler = kvf__req_shm_map, .needs_ns = 0},
    {.opcode = KVF_OP_SHM_PUT, .handler = kvf__req_shm_put, .needs_ns = 1},
    {.opcode = KVF_OP_SHM_GET, .handler = kvf__req_shm_get, .needs_ns = 1},
    {.opcode = KVF_OP_WRITE, .handler = kvf__req_put_begin, .needs_ns = 0},
    {.opcode = KVF_OP_SEAL, .handler = kvf__req_put_begin, .needs_ns = 0},
};

/* The row of opcode, or NULL. Rows are few (one per opcode) and looked up once per request, so a
 * scan serves. */
static const op_row *op_row_of(uint16_t opcode)
{
    for (size_t i = 0; i < sizeof ops / sizeof *ops; i++)
        if (ops[i].opcode == opcode)
            return &ops[i];
    return NULL;
}

/* Whether c, a tenant of a node that does not serve RDMA to tenants, is refused an RDMA
 * descriptor. */
static int tenant_rdma_refused(const conn *c)
{
    const kvf_server *s = c->lp->srv;
    return s->o.tenants && !s->o.rdma_tenants && c->role != KVF_ROLE_ADMIN;
}

/* The body of c's request has been read: the reader goes back to headers (PUT and COMMIT set it
 * to their data), and the request goes to its opcode's handler. */
static void on_body(conn *c)
{
    uint16_t opcode = c->h.opcode;
    const op_row *op = op_row_of(opcode);
    c->rstate = R_HDR;
    c->hdr_got = 0;
    if (!op) {
        kvf__reply_error(c, KVF_EPROTO, 1, "opcode %u is not served", opcode);
        return;
    }
    /* COPY's length depends on the address it carries, so the header could not check it. */
    if (opcode == KVF_OP_COPY) {
        uint64_t need;
        if (kvf__wire_control_len(&c->h, c->rbuf, &need) != 0 || need != c->h.payload_len) {
            kvf__reply_error(c, KVF_EPROTO, 1,
                             "copy payload of %" PRIu64
                             " bytes does not match its address and %" PRIu32 " keys",
                             c->h.payload_len, c->h.item_count);
            return;
        }
    }
    if ((opcode == KVF_OP_RDMA_GET || opcode == KVF_OP_RDMA_RESERVE) && tenant_rdma_refused(c) &&
        !(opcode == KVF_OP_RDMA_GET && c->shm_arena)) {
        kvf__reply_error(c, KVF_EACCES, 0,
                         "RDMA is not isolated between tenants (one key for the whole arena, "
                         "docs/security.md): this node serves it to tenants only with "
                         "--rdma-tenants");
        return;
    }
    if (opcode == KVF_OP_COPY && c->role != KVF_ROLE_ADMIN) {
        kvf__reply_error(c, KVF_EACCES, 0, "copy is for the admin role (tenant %s is not)",
                         c->who.name);
        return;
    }
    if (op->needs_ns) {
        uint64_t ns = kvf__get_u64(c->rbuf);
        if (!kvf__conn_ns_ok(c, ns)) {
            kvf__reply_error(c, KVF_ENAMESPACE, 0,
                             "namespace %016" PRIx64
                             " differs from the one bound by hello (%016" PRIx64 ")",
                             ns, c->ns_bound);
            return;
        }
        kvf__put_u64(c->rbuf, kvf__conn_ns_scope(c, ns));
    }
    /* keys on disk are promoted first; the request runs again when they are in */
    if (c->lp->srv->o.tier && kvf__sdisk_gate(c, op->handler))
        return;
    /* read before the handler: it may close c */
    kvf__series *m = c->lp->srv->m_op[opcode & 31];
    uint64_t t_hdr = c->t_hdr;
    op->handler(c);
    if (m)
        kvf__series_observe(m, (double)(kvf__now_ns() - t_hdr) / 1e9);
}

/* The peer closed c. Between frames that is a goodbye: c closes once its replies are written.
 * Inside a frame it is a truncated frame, answered with a fatal error naming how far it got. */
static void on_eof(conn *c)
{
    if (c->rstate == R_HDR && c->hdr_got == 0) {
        c->closing = 1;
        return;
    }
    uint64_t got, want;
    if (c->rstate == R_HDR) {
        got = c->hdr_got;
        want = KVF_WIRE_HEADER_LEN;
    } else if (c->rstate == R_BODY) {
        got = KVF_WIRE_HEADER_LEN + c->rgot;
        want = KVF_WIRE_HEADER_LEN + c->h.payload_len;
    } else {
        uint64_t sent = kvf__wire_data_table_len(c->h.opcode, c->h.item_count) + c->cur_got;
        for (uint32_t i = 0; i < c->cur; i++)
            sent += c->items[i].len;
        got = KVF_WIRE_HEADER_LEN + sent;
        want = KVF_WIRE_HEADER_LEN + c->h.payload_len;
    }
    kvf__reply_error(c, KVF_EPROTO, 1,
                     "truncated frame: the peer closed after %" PRIu64 " of %" PRIu64 " bytes", got,
                     want);
}

/* Where c's next bytes go, at most how many, in *dst and *want. Returns 1 instead when the
 * state's bytes are all in but not yet handled (a body of 0 bytes, a PUT of 0 items): they are
 * handled now, and the caller asks again. */
static int next_target(conn *c, void **dst, size_t *want)
{
    if (c->rstate == R_HDR) {
        *dst = c->hdr + c->hdr_got;
        *want = KVF_WIRE_HEADER_LEN - c->hdr_got;
    } else if (c->rstate == R_BODY) {
        if (c->rgot == c->rneed) {
            on_body(c);
            return 1;
        }
        *dst = c->rbuf + c->rgot;
        *want = c->rneed - c->rgot;
    } else {
        /* items of no bytes (a SEAL's that drops its reservation) are done as they come */
        while (c->cur < c->n_items && c->items[c->cur].len == 0)
            kvf__req_put_item_done(c, &c->items[c->cur++]);
        if (c->cur == c->n_items) {
            kvf__req_put_finish(c);
            return 1;
        }
        put_item *it = &c->items[c->cur];
        *want = it->len - c->cur_got;
        if (it->dst) {
            *dst = it->dst + c->cur_got;
        } else {
            *dst = c->lp->scratch;
            if (*want > SCRATCH_BYTES)
                *want = SCRATCH_BYTES;
        }
    }
    return 0;
}

/* got bytes arrived where next_target() said: a state whose bytes are complete is handled. */
static void took(conn *c, size_t got)
{
    if (c->rstate == R_HDR) {
        c->hdr_got += got;
        if (c->hdr_got == KVF_WIRE_HEADER_LEN)
            on_header(c);
    } else if (c->rstate == R_BODY) {
        c->rgot += got;
        if (c->rgot == c->rneed)
            on_body(c);
    } else {
        put_item *it = &c->items[c->cur];
        if (c->h.opcode == KVF_OP_WRITE && it->dst)
            kvf__req_part_bytes(c, it, it->dst + c->cur_got, got, c->cur_got == 0);
        c->cur_got += got;
        if (c->cur_got == it->len) {
            kvf__req_put_item_done(c, it);
            c->cur++;
            c->cur_got = 0;
            if (c->cur == c->n_items)
                kvf__req_put_finish(c);
        }
    }
}

int kvf__frame_on_readable(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint64_t budget = READ_BUDGET;
    while (budget > 0 && kvf__conn_may_read(c)) {
        void *dst;
        size_t want;
        if (next_target(c, &dst, &want))
            continue;
        if (want > budget)
            want = budget;
        size_t got = 0;
        int rc = kvf__sock_read(c->fd, dst, want, &got);
        if (rc == KVF_EAGAIN)
            break;
        if (rc) {
            kvf__conn_destroy(c);
            return -1;
        }
        if (got == 0) {
            on_eof(c);
            break;
        }
        atomic_fetch_add(&s->bytes_in, got);
        budget -= got;
        took(c, got);
    }
    return kvf__conn_flush(c);
}
