/*
 * Replies of the storage node's server: reply frames built into messages, each connection's
 * output queue, and its flushing with scatter-gather writes. A message may point into the arena;
 * it then carries the read references that keep those bytes in place until its last byte is
 * written (or the connection closes).
 */
#include "server_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "poller.h"
#include "tcp.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bytes one connection may write in one turn of its loop (kvf__conn_flush). */
#define FLUSH_BUDGET (512u << 10)

out_msg *kvf__msg_new(int niov, uint32_t nrefs, size_t buflen)
{
    size_t sz = sizeof(out_msg) + (size_t)niov * sizeof(struct iovec) + nrefs * sizeof(uint32_t);
    sz = (sz + 15) & ~(size_t)15;
    out_msg *m = malloc(sz + buflen);
    if (!m)
        return NULL;
    memset(m, 0, sizeof *m);
    m->iov = (struct iovec *)(m + 1);
    m->refs = (uint32_t *)(m->iov + niov);
    m->buf = (uint8_t *)m + sz;
    m->heap = sz + buflen; /* the iovecs and references too: a streamed GET's are most of it */
    return m;
}

void kvf__reply_hdr(uint8_t *out, const kvf_wire_hdr *req, int status, uint32_t flags,
                    uint32_t count, uint64_t payload_len)
{
    kvf_wire_hdr h = {
        .version = KVF_WIRE_VERSION,
        .opcode = req->opcode,
        .flags = KVF_WF_REPLY | flags,
        .status = status,
        .request_id = req->request_id,
        .item_count = count,
        .payload_len = payload_len,
    };
    kvf__wire_hdr_encode(out, &h);
}

int kvf__conn_may_read(const conn *c)
{
    return !c->closing && c->out_bytes < OUT_HIGH_WATER && c->out_heap < OUT_HEAP_HIGH_WATER &&
           (!c->oh ||
            atomic_load_explicit(&c->lp->srv->out_heap, memory_order_relaxed) < OUT_HEAP_BUDGET);
}

void kvf__msg_unqueued(conn *c, const out_msg *m)
{
    c->out_heap -= m->heap;
    atomic_fetch_sub_explicit(&c->lp->srv->out_heap, m->heap, memory_order_relaxed);
}

/* A connection is read while kvf__conn_may_read, and written while replies are queued. */
static void conn_set_events(conn *c)
{
    uint32_t ev = 0;
    if (kvf__conn_may_read(c))
        ev |= KVF_POLL_IN;
    if (c->oh)
        ev |= KVF_POLL_OUT;
    if (ev != c->events) {
        kvf__poller_mod(c->lp->poller, c->fd, ev, c);
        c->events = ev;
    }
}

void kvf__conn_queue(conn *c, out_msg *m)
{
    uint64_t total = 0;
    for (int i = 0; i < m->iovcnt; i++)
        total += m->iov[i].iov_len;
    c->out_bytes += total;
    c->out_heap += m->heap;
    atomic_fetch_add_explicit(&c->lp->srv->out_heap, m->heap, memory_order_relaxed);
    m->next = NULL;
    if (c->ot)
        c->ot->next = m;
    else
        c->oh = m;
    c->ot = m;
}

int kvf__conn_flush(conn *c)
{
    kvf_server *s = c->lp->srv;
    /* One connection's turn writes FLUSH_BUDGET at most, then the loop serves the others: a
     * lookup waits for a slice of a 16 MiB reply, not for all that the socket buffer takes. */
    size_t budget = FLUSH_BUDGET;
    while (c->oh && budget) {
        out_msg *m = c->oh;
        size_t done = 0;
        int rc =
            kvf__sock_writev_max(c->fd, m->iov + m->first, m->iovcnt - m->first, budget, &done);
        if (rc == KVF_EAGAIN)
            break;
        if (rc) {
            kvf__conn_destroy(c);
            return -1;
        }
        atomic_fetch_add(&s->bytes_out, done);
        c->out_bytes -= done;
        budget -= done;
        m->first = kvf__iov_advance(m->iov, m->iovcnt, m->first, done);
        if (m->first < m->iovcnt)
            break;
        c->oh = m->next;
        if (!c->oh)
            c->ot = NULL;
        kvf__msg_unqueued(c, m);
        kvf__msg_release_refs(s, m);
        free(m);
    }
    if (!c->oh && c->closing && !c->pending_jobs) {
        kvf__conn_destroy(c);
        return -1;
    }
    conn_set_events(c);
    return 0;
}

int kvf__reply_copy(conn *c, int status, uint32_t flags, uint32_t count, const void *payload,
                    size_t len)
{
    out_msg *m = kvf__msg_new(1, 0, KVF_WIRE_HEADER_LEN + len);
    if (!m)
        return KVF_ENOMEM;
    kvf__reply_hdr(m->buf, &c->h, status, flags, count, len);
    if (len)
        memcpy(m->buf + KVF_WIRE_HEADER_LEN, payload, len);
    m->iov[0].iov_base = m->buf;
    m->iov[0].iov_len = KVF_WIRE_HEADER_LEN + len;
    m->iovcnt = 1;
    kvf__conn_queue(c, m);
    return 0;
}

void kvf__reply_error(conn *c, int status, int fatal, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    kvf_server *s = c->lp->srv;
    if (c->counted) /* a request whose header was read: its operation answered with an error */
        atomic_fetch_add(&s->errs_by[c->is_unix != 0][c->h.opcode & 31], 1);
    if (fatal) {
        atomic_fetch_add(&s->proto_errors, 1);
        kvf_warn(s->o.log, "connection %" PRIu64 ": %s: %s", c->id, kvf_err_name(status), msg);
        c->closing = 1;
    }
    kvf__reply_copy(c, status, fatal ? KVF_WF_FATAL : 0, 0, msg, (size_t)n);
}

void kvf__reply_statuses(conn *c, int32_t *st, uint32_t n)
{
    uint8_t *r = (uint8_t *)st;
    for (uint32_t i = 0; i < n; i++)
        kvf__put_u32(r + 4 * (size_t)i, (uint32_t)st[i]);
    kvf__reply_copy(c, 0, 0, n, r, 4 * (size_t)n);
    free(st);
}
