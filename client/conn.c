/*
 * A connection's queues and its send side (client_int.h). A request waits on the send queue
 * until its last byte is written, then on the in-flight list until its reply is read. The engine's
 * thread owns both. Below them, the node's health that every engine shares (atomics).
 */
#include "client_int.h"

#include "kvf/error.h"

#include "clock.h"

void kvf__cn_set_events(kvf__conn *cn)
{
    if (cn->fd < 0)
        return;
    uint32_t ev = KVF_POLL_IN;
    if (cn->sq_head)
        ev |= KVF_POLL_OUT;
    if (ev != cn->events) {
        kvf__poller_mod(cn->io->poller, cn->fd, ev, cn);
        cn->events = ev;
    }
}

void kvf__req_push(kvf__req **h, kvf__req **t, kvf__req *r)
{
    r->next = NULL;
    if (*t)
        (*t)->next = r;
    else
        *h = r;
    *t = r;
}

/* Unlinks r from the list that head and tail bound; 1 when it was there. */
static int unlink_req(kvf__req **head, kvf__req **tail, kvf__req *r)
{
    kvf__req **pp = head;
    kvf__req *prev = NULL;
    while (*pp && *pp != r) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp)
        return 0;
    *pp = r->next;
    if (*tail == r)
        *tail = prev;
    r->next = NULL;
    return 1;
}

void kvf__cn_unflight(kvf__conn *cn, kvf__req *r)
{
    unlink_req(&cn->fl_head, &cn->fl_tail, r);
}

int kvf__cn_unqueue(kvf__conn *cn, kvf__req *r)
{
    return unlink_req(&cn->sq_head, &cn->sq_tail, r);
}

int kvf__cn_write(kvf__conn *cn)
{
    while (cn->sq_head) {
        kvf__req *r = cn->sq_head;
        if (cn->gated && r->opcode != KVF_OP_HELLO && r->opcode != KVF_OP_AUTH)
            break;
        size_t done = 0;
        int rc = kvf__sock_writev(cn->fd, r->iov + r->first, r->iovcnt - r->first, &done);
        if (rc == KVF_EAGAIN)
            break;
        if (rc)
            return rc;
        r->sending = 1;
        kvf__io_count(cn->io, 0, done, 0, 0, 0);
        r->first = kvf__iov_advance(r->iov, r->iovcnt, r->first, done);
        if (r->first < r->iovcnt)
            break;
        cn->sq_head = r->next;
        if (!cn->sq_head)
            cn->sq_tail = NULL;
        kvf__req_push(&cn->fl_head, &cn->fl_tail, r);
    }
    kvf__cn_set_events(cn);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The node's health (client_int.h) */

/* A node marked down: how long before it is probed, doubling while it stays down. */
#define NODE_DOWN_MIN_NS 200000000ull
#define NODE_DOWN_MAX_NS 5000000000ull

/* The node did not answer a request in time (or a probe): down for a backoff that doubles while
 * it stays down; the probe, if any, is over. */
void kvf__node_mark_down(kvf__node *nd)
{
    uint64_t b = atomic_load(&nd->down_backoff);
    b = b ? b * 2 : NODE_DOWN_MIN_NS;
    if (b > NODE_DOWN_MAX_NS)
        b = NODE_DOWN_MAX_NS;
    atomic_store(&nd->down_backoff, b);
    atomic_store(&nd->down_until, kvf__now_ns() + b);
    atomic_store(&nd->probing, 0);
}

void kvf__node_mark_up(kvf__node *nd)
{
    atomic_store(&nd->down_until, 0);
    atomic_store(&nd->down_backoff, 0);
    atomic_store(&nd->probing, 0);
}
