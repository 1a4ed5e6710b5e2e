/*
 * Ops and requests: their lifecycle, completion and accounting (client_int.h).
 *
 * An op completes when its last request finishes. Its waiter or callback runs only once the
 * engine's thread has finished the iteration in which that happened and holds no pointer into it
 * (kvf__io_flush_completed), because either may free the op.
 */
#include "client_int.h"

#include "kvf/error.h"

#include "clock.h"

#include <stdlib.h>

void kvf__io_count(kvf__io *io, uint64_t requests, uint64_t sent, uint64_t received,
                   uint64_t failed, uint64_t reconnects)
{
    pthread_mutex_lock(&io->cmu);
    io->counters.requests += requests;
    io->counters.bytes_sent += sent;
    io->counters.bytes_received += received;
    io->counters.failed_keys += failed;
    io->counters.reconnects += reconnects;
    pthread_mutex_unlock(&io->cmu);
}

void kvf__req_free(kvf__req *r)
{
    if (!r)
        return;
    free(r->idx);
    free(r->buf);
    free(r->iov);
    free(r->commit_map);
    free(r->rtab);
    free(r->segoff);
    free(r->info);
    free(r->moved);
    free(r);
}

kvf_op *kvf__op_new(kvf_client *c, kvf__io *io, int kind, uint32_t opcode, const kvf_batch *b)
{
    kvf_op *op = calloc(1, sizeof *op);
    if (!op)
        return NULL;
    op->cl = c;
    op->io = io;
    op->target = -1;
    op->conn = -1;
    op->kind = kind;
    op->opcode = opcode;
    op->b = *b;
    int dl = b->deadline_ms > 0 ? b->deadline_ms : c->o.deadline_ms;
    op->deadline_ns = kvf__now_ns() + (uint64_t)dl * 1000000u;
    pthread_mutex_init(&op->mu, NULL);
    pthread_cond_init(&op->cv, NULL);
    return op;
}

int kvf__op_parts_init(kvf_op *op, uint64_t head_len, uint64_t obj_len)
{
    op->parts = 1;
    op->head_len = head_len;
    op->obj_len = obj_len;
    op->cap_bounds = 64; /* grown as needed: never none, so that what is said final is kept */
    op->bounds = malloc(op->cap_bounds * sizeof *op->bounds);
    return op->bounds ? 0 : KVF_ENOMEM;
}

void kvf__op_destroy(kvf_op *op)
{
    for (int i = 0; i < op->n_reqs; i++)
        kvf__req_free(op->reqs[i]);
    free(op->reqs);
    free(op->json);
    free(op->raw_rep);
    free(op->bounds);
    pthread_mutex_destroy(&op->mu);
    pthread_cond_destroy(&op->cv);
    free(op);
}

int kvf__op_validate(const kvf_batch *b, int kind)
{
    if (!b || (b->n && (!b->keys || !b->status)) || b->n > KVF_WIRE_MAX_ITEMS)
        return KVF_EINVAL;
    if (kind == KVF__OPK_PUT && b->n && (!b->objs || !b->lens))
        return KVF_EINVAL;
    if (kind == KVF__OPK_GET && b->n && (!b->bufs || !b->caps))
        return KVF_EINVAL;
    if (kind == KVF__OPK_PUT)
        for (size_t i = 0; i < b->n; i++)
            if (!b->objs[i] || b->lens[i] == 0)
                return KVF_EINVAL;
    return 0;
}

void kvf__op_put_fixup(const kvf_batch *b)
{
    for (size_t i = 0; i < b->n; i++)
        if (b->status[i] == 1)
            b->status[i] = KVF_ETIMEDOUT;
}

static void fire_layers(kvf_op *op, uint32_t upto)
{
    while (op->layers_fired < upto && op->layers_fired < op->layers) {
        if (op->b.layer_cb)
            op->b.layer_cb(op, op->layers_fired, op->b.ud);
        op->layers_fired++;
    }
}

void kvf__op_stream_progress(kvf_op *op)
{
    uint32_t lo = UINT32_MAX;
    for (int i = 0; i < op->n_reqs; i++) {
        kvf__req *r = op->reqs[i];
        if (r && !r->finished && r->layers_delivered < lo)
            lo = r->layers_delivered;
    }
    fire_layers(op, lo);
}

static void op_complete(kvf_op *op)
{
    kvf__io *io = op->io;
    if (op->prev_active)
        op->prev_active->next_active = op->next_active;
    else if (io->active == op)
        io->active = op->next_active;
    if (op->next_active)
        op->next_active->prev_active = op->prev_active;
    op->next_active = op->prev_active = NULL;
    if (op->kind == KVF__OPK_GET && (op->b.flags & KVF_GET_STREAM))
        fire_layers(op, UINT32_MAX);
    for (int i = 0; i < op->n_reqs; i++) {
        kvf__req_free(op->reqs[i]);
        op->reqs[i] = NULL;
    }
    op->completing = 1;
    op->next_completed = io->completed;
    io->completed = op;
}

/* Marks op done and runs its callback or wakes its waiter. */
static void op_signal(kvf_op *op)
{
    kvf_op_cb cb = op->b.cb;
    void *ud = op->b.ud;
    int result = op->result;
    if (cb) {
        /* With a callback the caller may free op inside it; nobody waits on it. */
        pthread_mutex_lock(&op->mu);
        op->done = 1;
        pthread_mutex_unlock(&op->mu);
        cb(op, result, ud);
        return;
    }
    pthread_mutex_lock(&op->mu);
    op->done = 1;
    pthread_cond_broadcast(&op->cv);
    pthread_mutex_unlock(&op->mu);
}

void kvf__op_finish(kvf_op *op, int result)
{
    op->result = result;
    op_signal(op);
}

void kvf__io_flush_completed(kvf__io *io)
{
    while (io->completed) {
        kvf_op *op = io->completed;
        io->completed = op->next_completed;
        op_signal(op);
    }
}

void kvf__req_finish(kvf__req *r)
{
    if (r->finished)
        return;
    r->finished = 1;
    kvf_op *op = r->op;
    if (op->kind == KVF__OPK_GET && (op->b.flags & KVF_GET_STREAM))
        kvf__op_stream_progress(op);
    if (--op->pending == 0)
        op_complete(op);
}

void kvf__req_fail(kvf__req *r, int status)
{
    kvf_op *op = r->op;
    uint64_t failed = 0;
    /* A plain GET's items before the current one are complete and verified: they stand. */
    uint32_t from = (op->kind == KVF__OPK_GET && !(op->b.flags & KVF_GET_STREAM)) ? r->item : 0;
    for (uint32_t i = from; i < r->n; i++) {
        if (r->moved && r->moved[i])
            continue; /* another request of the op answers for it */
        int *st = &op->b.status[r->idx[i]];
        if (op->kind == KVF__OPK_CTRL || *st == 0 || *st == 1)
            *st = status;
    }
    if (op->kind == KVF__OPK_CTRL && op->b.n == 0 && op->result == 0)
        op->result = status;
    /* A streamed get's keys that a named node failed before any layer came: their own node. */
    if (!r->finished)
        kvf__req_reask_named(r, status);
    for (uint32_t i = from; i < r->n; i++)
        failed += !(r->moved && r->moved[i]) && op->b.status[r->idx[i]] == status;
    kvf__io_count(op->io, 0, 0, 0, failed, 0);
    kvf__req_finish(r);
}

int kvf_op_wait(kvf_op *op)
{
    if (!op)
        return KVF_EINVAL;
    /* No spinning or yielding first: on a host whose cores are busy (the storage node's sends,
     * other engines) a waiter that yields takes the CPU from the threads that would complete it,
     * and the lookup p99 under load measured 1.8x that of a raw socket with 64 yields, 1.1x
     * without (docs/benchmarks.md). */
    pthread_mutex_lock(&op->mu);
    while (!op->done)
        pthread_cond_wait(&op->cv, &op->mu);
    pthread_mutex_unlock(&op->mu);
    return op->result;
}

int kvf_op_free(kvf_op **opp)
{
    if (!opp || !*opp)
        return 0;
    kvf_op *op = *opp;
    pthread_mutex_lock(&op->mu);
    int done = op->done;
    pthread_mutex_unlock(&op->mu);
    if (!done)
        return KVF_EBUSY;
    kvf__op_destroy(op);
    *opp = NULL;
    return 0;
}

const char *kvf_op_transport(const kvf_op *op)
{
    return op && op->transport ? op->transport : "tcp";
}
