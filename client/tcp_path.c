/*
 * The TCP data path (kvf__path_tcp): gets and puts run on the client's I/O engines. A batch large
 * enough to keep more than one engine busy is split into one child op per engine, by bytes, so
 * that receiving (and verifying) runs on as many cores as there are engines; the caller's op
 * completes when the last child does. Layer callbacks of a streamed get fire for layer l once
 * every child has delivered it, in order, one at a time. Other ops run whole on the first engine.
 * A put in parts (kvf_client_put_parts, on this path or the shared-memory one, whose engines
 * carry its bytes) is split the same way: each child a put in parts of its keys, told what the
 * caller says of the parent (kvf__split_say).
 */
#include "client_int.h"

#include "kvf/error.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct agg agg;

typedef struct child {
    agg *a;
    kvf__part p;
} child;

struct agg {
    kvf_op *parent;
    const kvf_batch *pb;
    pthread_mutex_t mu;
    int left, result;
    uint32_t fired, max_layers;
    int n;
    child ch[KVF_CLIENT_MAX_IO];
};

/* Fires the parent's layers that every unfinished child has delivered. Lock held. */
static void fire(agg *a)
{
    uint32_t front = UINT32_MAX;
    for (int i = 0; i < a->n; i++)
        if (!a->ch[i].p.done && a->ch[i].p.layers < front)
            front = a->ch[i].p.layers;
    while (a->pb->layer_cb && a->fired < front && a->fired < a->max_layers)
        a->pb->layer_cb(a->parent, a->fired++, a->pb->ud);
}

static void on_layer(kvf_op *op, uint32_t l, void *ud)
{
    (void)op;
    child *k = ud;
    agg *a = k->a;
    pthread_mutex_lock(&a->mu);
    if (l + 1 > k->p.layers)
        k->p.layers = l + 1;
    if (l + 1 > a->max_layers)
        a->max_layers = l + 1;
    fire(a);
    pthread_mutex_unlock(&a->mu);
}

/* A child ended (or never started: op NULL, status its error): its results go to the parent's
 * arrays; the last one completes the parent. */
static void child_end(child *k, int status)
{
    agg *a = k->a;
    pthread_mutex_lock(&a->mu);
    for (uint32_t i = 0; i < k->p.b.n; i++) {
        a->pb->status[k->p.idx[i]] = k->p.op ? k->p.st[i] : status;
        if (a->pb->out_lens && k->p.op)
            a->pb->out_lens[k->p.idx[i]] = k->p.out_lens[i];
    }
    if (status && !a->result)
        a->result = status;
    k->p.done = 1;
    fire(a);
    int last = --a->left == 0;
    pthread_mutex_unlock(&a->mu);
    if (!last)
        return;
    kvf_op *parent = a->parent;
    if (parent->parts_split) {
        /* what the caller says from now on reaches no child (they are freed below) */
        pthread_mutex_lock(&parent->mu);
        parent->split = NULL;
        pthread_mutex_unlock(&parent->mu);
    }
    int result = a->result;
    for (int i = 0; i < a->n; i++) {
        kvf_op_free(&a->ch[i].p.op);
        kvf__part_free(&a->ch[i].p);
    }
    pthread_mutex_destroy(&a->mu);
    free(a);
    kvf__op_finish(parent, result); /* may free parent: nothing of it is used after */
}

static void on_done(kvf_op *op, int status, void *ud)
{
    (void)op;
    child_end(ud, status);
}

static int child_make(child *k, const kvf_batch *pb, int get, size_t from, size_t to)
{
    int rc = kvf__part_alloc(&k->p, to - from, get);
    for (size_t i = from; !rc && i < to; i++)
        kvf__part_add(&k->p, pb, (uint32_t)i);
    if (!rc)
        kvf__part_batch(&k->p, pb, on_done, on_layer, k);
    return rc;
}

/* Splits parent's batch into one child op per engine: contiguous ranges of about equal bytes,
 * at least one key each. Returns 0 or KVF_ENOMEM (nothing submitted). */
static int split_submit(kvf_client *c, kvf_op *parent)
{
    const kvf_batch *pb = &parent->b;
    int get = parent->kind == KVF__OPK_GET;
    agg *a = calloc(1, sizeof *a);
    if (!a)
        return KVF_ENOMEM;
    a->parent = parent;
    a->pb = pb;
    pthread_mutex_init(&a->mu, NULL);
    uint64_t total = 0, acc = 0;
    for (size_t i = 0; i < pb->n; i++)
        total += get ? pb->caps[i] : pb->lens[i];
    size_t from = 0;
    int rc = 0;
    for (int s = 0; s < c->n_io && from < pb->n && !rc; s++) {
        size_t to = from;
        uint64_t goal = total * (uint64_t)(s + 1) / (uint64_t)c->n_io;
        while (to < pb->n && (to == from || acc < goal)) {
            acc += get ? pb->caps[to] : pb->lens[to];
            to++;
        }
        if (s + 1 == c->n_io)
            to = pb->n;
        child *k = &a->ch[a->n++];
        k->a = a;
        rc = child_make(k, pb, get, from, to);
        from = to;
    }
    if (rc) {
        for (int i = 0; i < a->n; i++)
            kvf__part_free(&a->ch[i].p);
        pthread_mutex_destroy(&a->mu);
        free(a);
        return rc;
    }
    /* One more than the children until every one is submitted: none can complete the parent
     * before the last submission. */
    a->left = a->n + 1;
    int n = a->n;
    for (int i = 0; i < n; i++) {
        child *k = &a->ch[i];
        k->p.op = kvf__op_new(c, c->io[i], parent->kind, parent->opcode, &k->p.b);
        int src = k->p.op ? 0 : KVF_ENOMEM;
        if (k->p.op && parent->parts &&
            kvf__op_parts_init(k->p.op, parent->head_len, parent->obj_len)) {
            kvf__op_destroy(k->p.op);
            k->p.op = NULL;
            src = KVF_ENOMEM;
        }
        if (k->p.op) {
            k->p.op->transport = "tcp";
            if ((src = kvf__io_submit(c->io[i], k->p.op)) != 0)
                kvf__op_destroy(k->p.op);
        }
        if (src) {
            k->p.op = NULL;
            child_end(k, src); /* its keys fail with the error; the parent still completes */
        }
    }
    if (parent->parts_split) {
        /* from now on what the caller says of the parent reaches the children */
        pthread_mutex_lock(&parent->mu);
        parent->split = a;
        pthread_mutex_unlock(&parent->mu);
    }
    /* The guard: a child of one key per engine is done at once in the worst case. */
    child guard = {.a = a};
    child_end(&guard, 0);
    return 0;
}

/* A batch is split across the engines when it is large enough to keep more than one busy: at
 * least two stripes' worth of bytes, and two keys. */
int kvf__split_worth(const kvf_client *c, const kvf_batch *b, int kind)
{
    if (c->n_io < 2 || b->n < 2)
        return 0;
    uint64_t bytes = 0;
    for (size_t i = 0; i < b->n; i++)
        bytes += kind == KVF__OPK_PUT ? b->lens[i] : b->caps[i];
    return bytes >= 2 * c->o.stripe_bytes;
}

int kvf__split_submit(kvf_client *c, kvf_op *op)
{
    return split_submit(c, op);
}

void kvf__split_say(void *split, uint64_t upto, int state)
{
    agg *a = split;
    for (int i = 0; i < a->n; i++) {
        kvf_op *k = a->ch[i].p.op;
        if (!k)
            continue; /* never submitted: its keys failed already */
        if (state == 2)
            kvf_op_put_abort(k);
        else if (state == 1)
            kvf_op_put_seal(k);
        else
            kvf_op_put_ready(k, upto);
    }
}

static int tcp_submit(kvf_client *c, kvf_op *op)
{
    if (kvf__split_worth(c, &op->b, op->kind))
        return split_submit(c, op);
    op->io = c->io[0];
    return kvf__io_submit(op->io, op);
}

static void tcp_close(kvf_client *c)
{
    (void)c; /* the engines belong to the client, which closes them */
}

const kvf__path_ops kvf__path_tcp = {
    .name = "tcp",
    .submit = tcp_submit,
    .close = tcp_close,
};
