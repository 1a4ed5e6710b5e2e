/*
 * I/O engines (client_int.h): one thread each, driving its connections with a poller. User threads
 * hand it requests through a locked queue and a wake pipe and wait on their op; the thread writes
 * requests, reads replies, fails what passed its deadline, and signals completed ops at the end
 * of each iteration. A connection that breaks fails what it carries and is made again on demand,
 * after a backoff when the node refused or timed out.
 */
#include "client_int.h"

#include "kvf/error.h"

#include "clock.h"
#include "errf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define BACKOFF_MIN_NS 100000000ull
#define BACKOFF_MAX_NS 2000000000ull
/* A probe's deadline (a node marked down, conn.c). */
#define PROBE_DEADLINE_NS 1000000000ull

static const char wake_byte = 'w';

static int cn_connect(kvf__io *io, kvf__conn *cn, int probe);
static void cn_reset(kvf__io *io, kvf__conn *cn, int status);

/* Probes cn's node, unless another engine or request already does: a fresh connection whose
 * HELLO has a short deadline (its answer brings the node up; its failure, hello_done(), or its
 * deadline marks it down again). */
static void probe_node(kvf__io *io, kvf__conn *cn)
{
    int idle = 0;
    if (!atomic_compare_exchange_strong(&cn->nd->probing, &idle, 1))
        return;
    if (cn->state == KVF__CS_UP)
        cn_reset(io, cn, KVF_EHOSTUNREACH); /* what it carried waited on the hung node */
    if (cn_connect(io, cn, 1) != 0)
        kvf__node_mark_down(cn->nd);
}

/* Whether r may go to its node now. A node that is down fails it at once; once its backoff has
 * passed, the first engine to ask probes it (a fresh connection whose HELLO has a short deadline)
 * and fails r meanwhile too: a hung node costs the client one deadline, not one per request.
 * With rerouting no request is sent to a node marked down (place.c): probe_down_nodes() probes
 * it apart from them. */
static int node_admits(kvf__io *io, kvf__req *r)
{
    kvf__conn *cn = r->cn;
    kvf__node *nd = cn->nd;
    uint64_t until = atomic_load(&nd->down_until);
    if (!until)
        return 1;
    if (kvf__now_ns() >= until)
        probe_node(io, cn);
    kvf__req_fail(r, KVF_EHOSTUNREACH);
    return 0;
}

/* Closes the connection and fails every request on it. */
static void cn_reset(kvf__io *io, kvf__conn *cn, int status)
{
    if (cn->fd >= 0) {
        kvf__poller_del(io->poller, cn->fd);
        close(cn->fd);
        cn->fd = -1;
    }
    uint64_t t = kvf__now_ns();
    cn->backoff = cn->backoff ? cn->backoff * 2 : BACKOFF_MIN_NS;
    if (cn->backoff > BACKOFF_MAX_NS)
        cn->backoff = BACKOFF_MAX_NS;
    cn->retry_at = status == KVF_ECONNREFUSED || status == KVF_ETIMEDOUT ? t + cn->backoff : t;
    cn->state = KVF__CS_DOWN;
    cn->events = 0;
    cn->rreq = NULL;
    cn->auth_due = 0;
    kvf__req *lists[2] = {cn->fl_head, cn->sq_head};
    cn->fl_head = cn->fl_tail = cn->sq_head = cn->sq_tail = NULL;
    for (int k = 0; k < 2; k++) {
        for (kvf__req *r = lists[k]; r;) {
            kvf__req *next = r->next;
            r->next = NULL;
            kvf__req_fail(r, status);
            r = next;
        }
    }
}

/* Queues r on its connection, connecting first if needed. */
static void cn_submit(kvf__io *io, kvf__req *r)
{
    kvf__conn *cn = r->cn;
    if (!node_admits(io, r))
        return;
    if (cn->state == KVF__CS_DOWN) {
        if (kvf__now_ns() < cn->retry_at) {
            /* refused a moment ago (at open, say): with rerouting the node is down for the
             * client as a whole from now, as when a connect is refused below */
            if (atomic_load_explicit(&io->cl->reroute, memory_order_relaxed) &&
                !atomic_load(&cn->nd->down_until))
                kvf__node_mark_down(cn->nd);
            kvf__req_fail(r, KVF_ECONNREFUSED);
            return;
        }
        if (cn_connect(io, cn, 0) != 0) {
            /* refused: the node is down for the client as a whole (its keys go to their next
             * node meanwhile, place.c), until a probe after the backoff finds it again */
            kvf__node_mark_down(cn->nd);
            kvf__req_fail(r, KVF_ECONNREFUSED);
            return;
        }
    }
    kvf__req_push(&cn->sq_head, &cn->sq_tail, r);
    /* Write now rather than on the next poll round: a small request leaves at once. */
    if (kvf__cn_write(cn) != 0)
        cn_reset(io, cn, KVF_ECONNRESET);
}

void kvf__req_reask_named(kvf__req *r, int why)
{
    kvf_op *op = r->op;
    kvf__io *io = op->io;
    kvf_client *c = io ? io->cl : NULL;
    /* Not when the get has too little time left: a request sent to the key's own node at its
     * deadline's edge would time out there, and a timeout marks a node down. */
    if (!c || (why && !kvf_err_ask_elsewhere(why)) || op->kind != KVF__OPK_GET ||
        !(op->b.flags & KVF_GET_STREAM) || !op->b.nodes || r->finished ||
        r->layers_delivered != 0 || op->layers_fired != 0 || op->completing ||
        kvf__now_ns() + KVF__REASK_MIN_NS >= op->deadline_ns)
        return;
    pthread_mutex_lock(&io->mu);
    int stopping = io->stop;
    pthread_mutex_unlock(&io->mu);
    if (stopping)
        return; /* the client is closing: what is not answered fails */
    size_t from = (size_t)(r->cn->nd - c->nodes);
    /* Each item's own node (SIZE_MAX: stays), decided once: rerouting may change it meanwhile. */
    size_t *own = malloc((r->n ? r->n : 1) * sizeof *own);
    uint32_t count[KVF_CLIENT_MAX_NODES] = {0};
    size_t m = 0, groups = 0;
    if (!own)
        return; /* the keys keep what the named node answered */
    for (uint32_t i = 0; i < r->n; i++) {
        uint32_t k = r->idx[i];
        own[i] = SIZE_MAX;
        if ((r->moved && r->moved[i]) || op->b.nodes[k] == KVF_NODE_ANY ||
            !kvf_err_ask_elsewhere(op->b.status[k]))
            continue;
        size_t nd = kvf_client_node_of(c, &op->b.keys[k]);
        if (nd == from || nd >= c->n_nodes)
            continue;
        own[i] = nd;
        groups += count[nd]++ == 0;
        m++;
    }
    kvf__req **grown = m && (r->moved || (r->moved = calloc(r->n, 1)))
                           ? realloc(op->reqs, ((size_t)op->n_reqs + groups) * sizeof *grown)
                           : NULL;
    if (!grown) {
        free(own);
        return;
    }
    op->reqs = grown;
    /* First every new request built and counted in the op, then each sent: a send that fails at
     * once (and what it sets off) finds the op whole. */
    int first = op->n_reqs;
    uint64_t reasked = 0;
    for (size_t nd = 0; nd < c->n_nodes; nd++) {
        if (!count[nd])
            continue;
        unsigned at = (unsigned)atomic_fetch_add(&io->rr[nd], 1);
        kvf__req *q = kvf__req_new(op, &io->cn[nd * (size_t)io->conns + at % (unsigned)io->conns],
                                   op->opcode, count[nd]);
        for (uint32_t i = 0; q && i < r->n; i++)
            if (own[i] == nd)
                q->idx[q->n++] = r->idx[i];
        if (!q || kvf__req_build(c, q) != 0) {
            kvf__req_free(q); /* those keys keep what the named node answered */
            continue;
        }
        for (uint32_t i = 0; i < r->n; i++) {
            if (own[i] != nd)
                continue;
            r->moved[i] = 1;
            op->b.status[r->idx[i]] = 0; /* pending again */
        }
        op->reqs[op->n_reqs++] = q;
        op->pending++;
        reasked += q->n;
    }
    free(own);
    int last = op->n_reqs;
    if (last > first) {
        kvf__io_count(io, (uint64_t)(last - first), 0, 0, 0, 0);
        pthread_mutex_lock(&io->cmu);
        io->counters.named_reasked += reasked;
        pthread_mutex_unlock(&io->cmu);
    }
    for (int i = first; i < last; i++)
        cn_submit(io, op->reqs[i]);
}

void kvf__req_parts_next(kvf__req *r)
{
    kvf_op *op = r->op;
    kvf__conn *cn = r->cn;
    r->parked = 0;
    if (r->n_commit == 0) {
        kvf__req_finish(r); /* nothing of it is reserved any more */
        return;
    }
    if (cn->state != KVF__CS_UP) {
        kvf__req_fail(r, KVF_ECONNRESET); /* its reservations went with the connection */
        return;
    }
    int state = atomic_load(&op->parts_state);
    /* the first point the caller said final past wpos (few: a scan serves), 0 where none */
    uint64_t next = 0;
    pthread_mutex_lock(&op->mu);
    for (uint32_t i = 0; i < op->n_bounds && !next; i++)
        if (op->bounds[i] > r->wpos)
            next = op->bounds[i];
    pthread_mutex_unlock(&op->mu);
    if (state != 2 && next) {
        r->opcode = KVF_OP_WRITE;
        r->wnext = next;
    } else if (state == 2 || (state == 1 && r->wpos == op->obj_len)) {
        r->opcode = KVF_OP_SEAL;
    } else {
        r->parked = 1; /* until the caller says more (drain_submissions) or the deadline */
        return;
    }
    int rc = kvf__req_build(op->cl, r);
    if (rc) {
        kvf__req_fail(r, rc);
        return;
    }
    kvf__req_push(&cn->sq_head, &cn->sq_tail, r);
    kvf__cn_set_events(cn);
}

/* The caller of a put in parts of this engine said more (kvf_op_put_ready, _seal, _abort): its
 * parked requests go on. */
static void parts_resume(kvf__io *io)
{
    if (!atomic_exchange(&io->parts_kick, 0))
        return;
    kvf_op *next;
    for (kvf_op *op = io->active; op; op = next) {
        next = op->next_active; /* op leaves the list where this completes it */
        for (int i = 0; op->parts && i < op->n_reqs && !op->completing; i++)
            if (op->reqs[i] && op->reqs[i]->parked && !op->reqs[i]->finished)
                kvf__req_parts_next(op->reqs[i]);
    }
}

static void hello_done(kvf_op *op, int status, void *ud)
{
    /* A probe that failed in any way (reset, refused mid-way, a bad answer) ends the probe: the
     * node stays down for another backoff, and is probed again after it. One that timed out was
     * marked down already (check_deadlines), which ended the probe. */
    kvf__node *nd = op->cl && op->target >= 0 ? &op->cl->nodes[op->target] : NULL;
    if (status != 0 && op->deadline_ns != UINT64_MAX && nd && atomic_load(&nd->probing))
        kvf__node_mark_down(nd);
    kvf_op_free(&op);
    free(ud);
}

static void op_activate(kvf__io *io, kvf_op *op)
{
    op->next_active = io->active;
    op->prev_active = NULL;
    if (io->active)
        io->active->prev_active = op;
    io->active = op;
}

/* Each connection opens with a HELLO that binds it to the client's namespace. It is pipelined:
 * requests queue behind it without waiting for its reply, or, with a credential, behind the AUTH
 * that answers the node's challenge (the connection is gated until then). A probe's HELLO has a
 * deadline (its expiry marks the node down again); an ordinary one has none. The AUTH goes to the
 * head of the queue (front). Returns 0 or KVF_ENOMEM. */
static int send_ctrl(kvf__io *io, kvf__conn *cn, uint32_t opcode, int probe, int front)
{
    kvf_op *op = calloc(1, sizeof *op);
    int *st = calloc(1, sizeof *st);
    kvf__req *r = op ? kvf__req_new(op, cn, opcode, 0) : NULL;
    if (!op || !st || !r) {
        free(op);
        free(st);
        kvf__req_free(r);
        return KVF_ENOMEM;
    }
    op->cl = io->cl;
    op->io = io;
    op->kind = KVF__OPK_CTRL;
    op->target = (int)(cn->nd - io->cl->nodes);
    op->b.status = st;
    op->b.cb = hello_done;
    op->b.ud = st;
    op->pending = 1;
    op->reqs = calloc(1, sizeof *op->reqs);
    pthread_mutex_init(&op->mu, NULL);
    pthread_cond_init(&op->cv, NULL);
    if (!op->reqs || kvf__req_build(io->cl, r) != 0) {
        kvf__req_free(r);
        free(op->reqs);
        free(op);
        free(st);
        return KVF_ENOMEM;
    }
    op->reqs[0] = r;
    op->n_reqs = 1;
    op->deadline_ns = probe ? kvf__now_ns() + PROBE_DEADLINE_NS : UINT64_MAX;
    if (probe)
        op_activate(io, op);
    if (front && cn->sq_head) {
        r->next = cn->sq_head;
        cn->sq_head = r;
    } else {
        kvf__req_push(&cn->sq_head, &cn->sq_tail, r);
    }
    return 0;
}

/* Answers the node's challenge (HELLO's reply, cn->auth_due): an AUTH at the head of cn's queue,
 * written at once. 0, or an error (the caller resets cn). */
static int send_auth(kvf__conn *cn)
{
    cn->auth_due = 0;
    int rc = send_ctrl(cn->io, cn, KVF_OP_AUTH, 0, 1);
    return rc ? rc : kvf__cn_write(cn);
}

static int cn_connect(kvf__io *io, kvf__conn *cn, int probe)
{
    char err[256];
    int fd;
    /* A node on this host that serves shared memory is reached over its Unix socket (where that
     * fails, a store restarted under another name say, over TCP, whose HELLO then says the new
     * name). The connect itself is bounded by the connect timeout; the node is on loopback or a
     * LAN. */
    int rc = KVF_ENOTSUP;
    char uname[128];
    if (io->cl->shm_engines) {
        pthread_mutex_lock(&io->cl->shm_mu);
        snprintf(uname, sizeof uname, "%s", cn->nd->shm_local ? cn->nd->shm_name : "");
        pthread_mutex_unlock(&io->cl->shm_mu);
        if (uname[0])
            rc = kvf__unix_connect_nb(uname, &fd, err, sizeof err);
    }
    if (rc)
        rc = kvf__tcp_connect(cn->nd->host, cn->nd->port, io->cl->o.connect_timeout_ms, &fd, err,
                              sizeof err);
    if (rc) {
        uint64_t t = kvf__now_ns();
        cn->backoff = cn->backoff ? cn->backoff * 2 : BACKOFF_MIN_NS;
        if (cn->backoff > BACKOFF_MAX_NS)
            cn->backoff = BACKOFF_MAX_NS;
        cn->retry_at = t + cn->backoff;
        return rc;
    }
    cn->fd = fd;
    kvf__sock_lowat_init(fd, &cn->lowat);
    cn->state = KVF__CS_UP;
    cn->events = KVF_POLL_IN;
    if (kvf__poller_add(io->poller, fd, KVF_POLL_IN, cn) != 0) {
        close(fd);
        cn->fd = -1;
        cn->state = KVF__CS_DOWN;
        return KVF_ENOMEM;
    }
    kvf__rd_next_frame(cn);
    kvf__io_count(io, 0, 0, 0, 0, 1);
    cn->gated = io->cl->has_cred;
    send_ctrl(io, cn, KVF_OP_HELLO, probe, 0);
    kvf__cn_set_events(cn);
    return 0;
}

static kvf_op *first_expired(kvf__io *io, uint64_t t)
{
    for (kvf_op *op = io->active; op; op = op->next_active)
        if (op->deadline_ns <= t)
            return op;
    return NULL;
}

/* Fails every request of each op past its deadline. Requests not yet written are dropped; a
 * request partly written or awaiting its reply cannot be taken back, so its connection is reset
 * (failing what else it carries). Each pass completes the op it handles, which leaves the active
 * list, so the scan restarts from the head and ends. */
static void check_deadlines(kvf__io *io)
{
    uint64_t t = kvf__now_ns();
    kvf_op *op;
    while ((op = first_expired(io, t)) != NULL) {
        for (int i = 0; i < op->n_reqs && !op->completing; i++) {
            kvf__req *r = op->reqs[i];
            if (!r || r->finished)
                continue;
            kvf__conn *cn = r->cn;
            if (r->parked) {
                /* a put in parts whose caller did not finish it in time: not the node's fault */
                r->parked = 0;
                kvf__req_fail(r, KVF_ETIMEDOUT);
                continue;
            }
            if (!r->sending && kvf__cn_unqueue(cn, r)) {
                kvf__req_fail(r, KVF_ETIMEDOUT);
                continue;
            }
            kvf__node_mark_down(cn->nd); /* sent and not answered in time */
            cn_reset(io, cn, KVF_ETIMEDOUT);
        }
    }
}

static int next_timeout_ms(kvf__io *io)
{
    uint64_t t = kvf__now_ns(), best = UINT64_MAX;
    for (kvf_op *op = io->active; op; op = op->next_active)
        if (op->deadline_ns < best)
            best = op->deadline_ns;
    if (best == UINT64_MAX)
        return 100;
    if (best <= t)
        return 0;
    uint64_t ms = (best - t) / 1000000u + 1;
    return ms > 100 ? 100 : (int)ms;
}

static void drain_submissions(kvf__io *io)
{
    char buf[64];
    while (read(io->wake[0], buf, sizeof buf) > 0) {
    }
    pthread_mutex_lock(&io->mu);
    kvf__req *r = io->subq_head;
    io->subq_head = io->subq_tail = NULL;
    pthread_mutex_unlock(&io->mu);
    while (r) {
        kvf__req *next = r->next;
        r->next = NULL;
        kvf_op *op = r->op;
        if (!op->next_active && !op->prev_active && io->active != op)
            op_activate(io, op);
        cn_submit(io, r);
        r = next;
    }
    parts_resume(io);
}

/* With rerouting, a node marked down gets no requests (place.c sends its keys to the next node)
 * until a probe finds it again: once its backoff has passed, the first engine of the client
 * probes it here, apart from any request, so that no request waits on it or fails with it. The
 * nodes are looked at every PROBE_SCAN_NS at most, not at every wake of a busy loop. */
#define PROBE_SCAN_NS 10000000ull
static void probe_down_nodes(kvf__io *io)
{
    kvf_client *c = io->cl;
    if (!io->prober || !atomic_load_explicit(&c->reroute, memory_order_relaxed))
        return;
    uint64_t t = kvf__now_ns();
    if (t < io->next_scan_ns)
        return;
    io->next_scan_ns = t + PROBE_SCAN_NS;
    for (size_t i = 0; i < c->n_nodes; i++) {
        uint64_t until = atomic_load(&c->nodes[i].down_until);
        if (until && t >= until)
            probe_node(io, &io->cn[i * (size_t)io->conns]);
    }
}

static void *io_main(void *arg)
{
    kvf__io *io = arg;
    static const int wake_tag = 0;
    kvf__poller_add(io->poller, io->wake[0], KVF_POLL_IN, (void *)&wake_tag);
    kvf_poll_event evs[64];
    for (;;) {
        pthread_mutex_lock(&io->mu);
        int stop = io->stop;
        pthread_mutex_unlock(&io->mu);
        if (stop)
            break;
        int n = kvf__poller_wait(io->poller, evs, 64, next_timeout_ms(io));
        for (int i = 0; i < n; i++) {
            if (evs[i].ud == &wake_tag) {
                drain_submissions(io);
                continue;
            }
            kvf__conn *cn = evs[i].ud;
            if (cn->fd < 0)
                continue;
            int rc = 0;
            if (evs[i].events & KVF_POLL_OUT)
                rc = kvf__cn_write(cn);
            if (!rc && (evs[i].events & (KVF_POLL_IN | KVF_POLL_ERR)))
                rc = kvf__cn_read(cn);
            if (!rc && cn->auth_due)
                rc = send_auth(cn);
            if (rc && rc != KVF_EPROTO && rc != KVF_EACCES &&
                atomic_load_explicit(&io->cl->reroute, memory_order_relaxed) &&
                !atomic_load(&cn->nd->down_until))
                kvf__node_mark_down(cn->nd); /* reset (the node died or restarted): its keys go
                                              * to the next node until a probe finds it again */
            if (rc)
                cn_reset(io, cn, rc == KVF_EPROTO || rc == KVF_EACCES ? rc : KVF_ECONNRESET);
        }
        check_deadlines(io);
        probe_down_nodes(io);
        kvf__io_flush_completed(io);
    }
    /* Closing: fail whatever is left. */
    drain_submissions(io);
    for (size_t i = 0; i < io->cl->n_nodes * (size_t)io->conns; i++)
        cn_reset(io, &io->cn[i], KVF_ECANCELED);
    /* and the puts in parts that wait on their callers */
    kvf_op *op = io->active;
    while (op) {
        kvf_op *next = op->next_active; /* a failure may complete op: it leaves the list */
        for (int i = 0; op->parts && i < op->n_reqs && !op->completing; i++) {
            kvf__req *r = op->reqs[i];
            if (r && r->parked && !r->finished) {
                r->parked = 0;
                kvf__req_fail(r, KVF_ECANCELED);
            }
        }
        op = next;
    }
    kvf__io_flush_completed(io);
    return NULL;
}

int kvf__io_submit(kvf__io *io, kvf_op *op)
{
    for (size_t i = 0; i < op->b.n; i++)
        op->b.status[i] = 0;
    int rc = kvf__op_split(io, op);
    if (rc)
        return rc;
    if (op->n_reqs == 0) {
        /* Nothing to send (an empty batch): it completes at once, on the caller's thread. */
        pthread_mutex_lock(&op->mu);
        op->done = 1;
        pthread_mutex_unlock(&op->mu);
        if (op->b.cb)
            op->b.cb(op, 0, op->b.ud);
        return 0;
    }
    kvf__io_count(io, (uint64_t)op->n_reqs, 0, 0, 0, 0);
    pthread_mutex_lock(&io->mu);
    if (io->stop) {
        pthread_mutex_unlock(&io->mu);
        return KVF_ECLOSED;
    }
    for (int i = 0; i < op->n_reqs; i++) {
        kvf__req *r = op->reqs[i];
        r->next = NULL;
        if (io->subq_tail)
            io->subq_tail->next = r;
        else
            io->subq_head = r;
        io->subq_tail = r;
    }
    pthread_mutex_unlock(&io->mu);
    ssize_t w = write(io->wake[1], &wake_byte, 1);
    (void)w;
    return 0;
}

void kvf__io_kick_parts(kvf__io *io)
{
    atomic_store(&io->parts_kick, 1);
    ssize_t w = write(io->wake[1], &wake_byte, 1);
    (void)w;
}

int kvf__io_raw(kvf__io *io, size_t node_idx, int conn, uint32_t opcode, uint32_t count,
                const void *payload, size_t plen, uint8_t **reply, size_t *rlen, int deadline_ms)
{
    *reply = NULL;
    *rlen = 0;
    kvf_batch b = {.deadline_ms = deadline_ms};
    kvf_op *op = kvf__op_new(io->cl, io, KVF__OPK_CTRL, opcode, &b);
    if (!op)
        return KVF_ENOMEM;
    op->target = (int)node_idx;
    op->conn = conn >= 0 ? conn % io->conns : -1;
    op->raw = 1;
    op->raw_req = payload;
    op->raw_len = plen;
    op->raw_count = count;
    int rc = kvf__io_submit(io, op);
    if (rc) {
        kvf__op_destroy(op);
        return rc;
    }
    rc = kvf_op_wait(op);
    if (!rc) {
        *reply = op->raw_rep;
        *rlen = op->raw_rep_len;
        op->raw_rep = NULL;
    }
    kvf__op_destroy(op);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Open and close */

static void io_free(kvf__io *io)
{
    size_t n = io->cl->n_nodes * (size_t)io->conns;
    for (size_t i = 0; io->cn && i < n; i++)
        XXH3_freeState(io->cn[i].xs);
    kvf__poller_close(&io->poller);
    for (int k = 0; k < 2; k++)
        if (io->wake[k] >= 0)
            close(io->wake[k]);
    free(io->cn);
    free(io->rr);
    free(io->scratch);
    pthread_mutex_destroy(&io->mu);
    pthread_mutex_destroy(&io->cmu);
    free(io);
}

/* The engine's connections (not yet connected), its poller and its wake pipe. */
static int io_alloc(kvf__io *io, char *err, size_t errlen)
{
    kvf_client *c = io->cl;
    size_t n = c->n_nodes * (size_t)io->conns;
    io->cn = calloc(n, sizeof *io->cn);
    io->rr = calloc(c->n_nodes, sizeof *io->rr);
    io->scratch = malloc(KVF_CLIENT_SCRATCH);
    if (!io->cn || !io->rr || !io->scratch)
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        kvf__conn *cn = &io->cn[i];
        cn->io = io;
        cn->nd = &c->nodes[i / (size_t)io->conns];
        cn->idx = (int)(i % (size_t)io->conns);
        cn->fd = -1;
        if (!(cn->xs = XXH3_createState()))
            return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    }
    int rc = kvf__poller_open(&io->poller, NULL);
    if (rc)
        return kvf__errf(err, errlen, rc, "poller: %s", kvf_strerror(rc));
    if (pipe(io->wake) != 0) {
        io->wake[0] = io->wake[1] = -1;
        return kvf__errf(err, errlen, kvf_err_from_errno(errno), "pipe: %s", strerror(errno));
    }
    for (int k = 0; k < 2; k++) {
        fcntl(io->wake[k], F_SETFL, fcntl(io->wake[k], F_GETFL) | O_NONBLOCK);
        fcntl(io->wake[k], F_SETFD, FD_CLOEXEC);
    }
    return 0;
}

int kvf__io_open(kvf_client *c, int conns, kvf__io **out, char *err, size_t errlen)
{
    *out = NULL;
    kvf__io *io = calloc(1, sizeof *io);
    if (!io)
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    io->cl = c;
    io->conns = conns;
    io->prober = out == &c->io[0]; /* set before its thread starts, which reads it */
    io->wake[0] = io->wake[1] = -1;
    pthread_mutex_init(&io->mu, NULL);
    pthread_mutex_init(&io->cmu, NULL);
    int rc = io_alloc(io, err, errlen);
    if (rc)
        goto out_free;
    /* Connect up front, so that a first operation does not pay for it; a node that refuses is
     * retried on demand. */
    for (size_t i = 0; i < c->n_nodes; i++)
        for (int k = 0; k < conns; k++)
            if (cn_connect(io, &io->cn[i * (size_t)conns + k], 0) != 0)
                break;
    if (pthread_create(&io->th, NULL, io_main, io) != 0) {
        rc = kvf__errf(err, errlen, KVF_EAGAIN, "cannot start the I/O thread");
        goto out_reset;
    }
    io->started = 1;
    *out = io;
    return 0;

out_reset:
    for (size_t i = 0; i < c->n_nodes * (size_t)conns; i++)
        if (io->cn[i].fd >= 0)
            cn_reset(io, &io->cn[i], KVF_ECANCELED);
    kvf__io_flush_completed(io);
out_free:
    io_free(io);
    return rc;
}

void kvf__io_close(kvf__io **iop)
{
    if (!iop || !*iop)
        return;
    kvf__io *io = *iop;
    pthread_mutex_lock(&io->mu);
    io->stop = 1;
    pthread_mutex_unlock(&io->mu);
    ssize_t w = write(io->wake[1], &wake_byte, 1);
    (void)w;
    if (io->started)
        pthread_join(io->th, NULL);
    io_free(io);
    *iop = NULL;
}
