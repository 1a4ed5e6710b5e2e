/*
 * The shared-memory data path (kvf__path_shm; docs/shm.md), for nodes on this host.
 *
 * Worker threads (one per core, at most SHM_MAX_WORKERS) each keep their own Unix connection
 * to every such node, with a staging region of their own (SHM_MAP). A get or put is split into
 * shares by bytes, one per worker; keys of nodes that are not on this host, and objects larger
 * than a staging region where one is needed, go over TCP as one child op. The op completes when
 * every share and the child did.
 *
 *   get, arena mapped (a node without tenants, or an admin): RDMA_GET leases the hits and says
 *        where each lies; the worker copies them from its read-only view of the arena straight
 *        into the caller's buffers (layer by layer for a streamed get), verifies every segment's
 *        checksum in the buffer, and checks that the lease still held when the copy ended (the
 *        node frees nothing leased before the lease's end, on the same monotonic clock): a block
 *        evicted and reused meanwhile is a miss, never data. Then RDMA_RELEASE.
 *   get, staged (tenants): SHM_GET copies the objects into the worker's staging region under
 *        read references; the worker copies them out and verifies them.
 *   put: the worker copies the objects into its staging region; SHM_PUT copies each into a
 *        reserved block, verifies it there and only then makes it visible.
 * A connection that fails is closed and made again on next use; keys whose node cannot be
 * reached over its socket (a store restarted under a new name, say) go over TCP instead.
 */
#define _GNU_SOURCE
#include "client_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "clock.h"
#include "cpus.h"
#include "errf.h"
#include "hash.h"
#include "objcopy.h"
#include "rendezvous.h"
#include "unixsock.h"
#include "wire.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "shm_int.h"

/* ------------------------------------------------------------------------------------------ */
/* Subs and their aggregation */

static void sub_free(sub *k)
{
    if (!k)
        return;
    kvf__part_free(&k->p);
    for (size_t i = 0; k->tail && i < k->p.b.n; i++)
        free(k->tail[i].got);
    free(k->tail);
    free(k->node); /* and near, in the same block */
    free(k);
}

/* Fires the parent's layers that every unfinished sub has delivered. Lock held. */
static void fire(agg *a)
{
    uint32_t front = UINT32_MAX;
    for (int i = 0; i < a->n; i++)
        if (!a->subs[i]->p.done && a->subs[i]->p.layers < front)
            front = a->subs[i]->p.layers;
    while (a->pb->layer_cb && a->fired < front && a->fired < a->max_layers)
        a->pb->layer_cb(a->parent, a->fired++, a->pb->ud);
}

/* Sub k delivered `layers` layers of every key it still has a hit for. Its keys' statuses go to
 * the parent first: a layer callback must not take a key that already failed for one that hit. */
void kvf__shm_sub_layers(sub *k, uint32_t layers)
{
    agg *a = k->a;
    pthread_mutex_lock(&a->mu);
    for (size_t i = 0; i < k->p.b.n; i++)
        if (k->p.idx[i] != MOVED)
            a->pb->status[k->p.idx[i]] = k->p.st[i];
    if (layers > k->p.layers)
        k->p.layers = layers;
    if (layers > a->max_layers)
        a->max_layers = layers;
    fire(a);
    pthread_mutex_unlock(&a->mu);
}

/* One pending part of a is over (a's lock held, and released here): the last one completes the
 * op and frees a. */
static void agg_release_locked(agg *a)
{
    int last = --a->left == 0;
    pthread_mutex_unlock(&a->mu);
    if (!last)
        return;
    kvf_op *parent = a->parent;
    int result = a->result;
    parent->transport = a->used_shm && a->used_tcp ? "shm+tcp" : a->used_tcp ? "tcp" : "shm";
    for (int i = 0; i < a->n; i++) {
        kvf_op_free(&a->subs[i]->p.op);
        sub_free(a->subs[i]);
    }
    free(a->subs);
    pthread_mutex_destroy(&a->mu);
    free(a);
    kvf__op_finish(parent, result); /* may free parent: nothing of it is used after */
}

/* A sub ended with status (an error that failed it whole, or 0): its keys' results go to the
 * parent; the last one completes it. */
static void sub_end(sub *k, int status)
{
    agg *a = k->a;
    pthread_mutex_lock(&a->mu);
    for (size_t i = 0; i < k->p.b.n; i++) {
        if (k->p.idx[i] == MOVED)
            continue;
        /* A hit has bytes: a get's key left at 0 with none was never asked (a bug), and is
         * never handed on as a hit. */
        if (k->p.out_lens && k->p.st[i] == 0 && k->p.out_lens[i] == 0)
            k->p.st[i] = KVF_EPROTO;
        a->pb->status[k->p.idx[i]] = k->p.st[i];
        if (a->pb->out_lens && k->p.out_lens)
            a->pb->out_lens[k->p.idx[i]] = k->p.out_lens[i];
    }
    if (status && !a->result)
        a->result = status;
    k->p.done = 1;
    fire(a);
    agg_release_locked(a);
}

/* A new sub of a's op for n keys; added to a (and counted as pending) under its lock. */
static sub *sub_new(agg *a, size_t n, int tcp)
{
    int get = a->parent->kind == KVF__OPK_GET;
    sub *k = calloc(1, sizeof *k);
    if (!k)
        return NULL;
    k->a = a;
    k->tcp = tcp;
    if (kvf__part_alloc(&k->p, n, get) != 0 ||
        (!tcp && !(k->node = malloc((n ? n : 1) * (sizeof *k->node + 1))))) {
        sub_free(k);
        return NULL;
    }
    if (!tcp)
        k->near = (uint8_t *)(k->node + (n ? n : 1));
    pthread_mutex_lock(&a->mu);
    if (a->n == a->cap) {
        int cap = a->cap ? a->cap * 2 : 8;
        sub **s = realloc(a->subs, (size_t)cap * sizeof *s);
        if (!s) {
            pthread_mutex_unlock(&a->mu);
            sub_free(k);
            return NULL;
        }
        a->subs = s;
        a->cap = cap;
    }
    a->subs[a->n++] = k;
    a->left++;
    if (tcp)
        a->used_tcp = 1;
    else
        a->used_shm = 1;
    pthread_mutex_unlock(&a->mu);
    return k;
}

static void tcp_done(kvf_op *op, int status, void *ud)
{
    (void)op;
    sub_end(ud, status);
}

static void tcp_layer(kvf_op *op, uint32_t l, void *ud)
{
    (void)op;
    kvf__shm_sub_layers(ud, l + 1);
}

/* A retried key's object read whole (struct sub_tail): its layers not delivered yet go into the
 * engine's buffer where it is the object whose earlier layers were; else the key is a miss. A
 * retry that fails is a miss too, never the op's failure: the key was a hit until its lease ended
 * (or, of a nearer holder, a hit there). */
static void tail_done(kvf_op *op, int status, void *ud)
{
    (void)op;
    sub *t = ud;
    for (size_t i = 0; i < t->p.b.n; i++) {
        struct sub_tail *x = &t->tail[i];
        uint64_t len = t->p.out_lens[i];
        kvf_obj_info in;
        if (status || t->p.st[i] || kvf_obj_verify(x->got, len, &in) != 0 ||
            !kvf_key_eq(&in.key, &t->p.keys[i]) || x->from < in.header_len || x->from > len ||
            memcmp(x->got, x->dst, in.header_len) != 0) {
            t->p.st[i] = KVF_ENOENT;
            t->p.out_lens[i] = 0;
            continue;
        }
        memcpy(x->dst + x->from, x->got + x->from, len - x->from);
    }
    sub_end(t, 0);
}

/* Runs k's keys over TCP as a child op: a share's keys (tcp_done: streamed as the parent is), or
 * keys asked again whole (tail_done). */
static void sub_submit_tcp(kvf_client *c, sub *k)
{
    if (k->tail) {
        kvf__part_batch(&k->p, k->a->pb, tail_done, NULL, k);
        k->p.b.flags &= ~(uint32_t)KVF_GET_STREAM;
    } else {
        kvf__part_batch(&k->p, k->a->pb, tcp_done, tcp_layer, k);
    }
    kvf_op *parent = k->a->parent;
    k->p.op = kvf__op_new(c, NULL, parent->kind, parent->opcode, &k->p.b);
    int rc = k->p.op ? 0 : KVF_ENOMEM;
    if (k->p.op) {
        k->p.op->transport = "tcp";
        k->p.op->deadline_ns = parent->deadline_ns;
        if ((rc = kvf__path_tcp.submit(c, k->p.op)) != 0)
            kvf__op_destroy(k->p.op);
    }
    if (rc) {
        k->p.op = NULL;
        for (size_t i = 0; i < k->p.b.n; i++)
            k->p.st[i] = rc;
        sub_end(k, 0);
    }
}

/* Queues k on worker w. A worker runs only its own shares: an op of one share goes to the first
 * worker, whose connections are made at open, so that small ops never wait on a new connection. */
static void enqueue(struct kvf__shm_path *p, worker *w, sub *k)
{
    pthread_mutex_lock(&p->mu);
    k->next = NULL;
    if (w->qt)
        w->qt->next = k;
    else
        w->qh = k;
    w->qt = k;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&p->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* The work of one share */

/* The positions of k's keys on node, in *pos (n of them): by the nodes chosen at submission. */
static size_t of_node(const sub *k, size_t node, uint32_t *pos)
{
    size_t n = 0;
    for (size_t i = 0; i < k->p.b.n; i++)
        if (k->node[i] == node)
            pos[n++] = (uint32_t)i;
    return n;
}

/* A connection that failed: closed; its keys go over TCP (fallback) where the connection could
 * not be made at all, else fail with rc. */
void kvf__shm_keys_fail(sub *k, const uint32_t *pos, size_t n, int rc, uint32_t *fb, size_t *n_fb)
{
    for (size_t i = 0; i < n; i++) {
        if (fb)
            fb[(*n_fb)++] = pos[i];
        else
            k->p.st[pos[i]] = rc;
    }
}

/* One SHM_PUT round of a put: the keys [from, to) of pos, in one half of the staging region. */
typedef struct put_round {
    size_t from, to;
    uint64_t id;
    uint8_t *req;
} put_round;

/* Reads round r's reply into the keys' statuses. 0, or the error that failed the round's keys. */
static int put_reply(worker *w, sconn *s, sub *k, const uint32_t *pos, const put_round *r,
                     uint64_t deadline_ns)
{
    uint8_t *rep;
    size_t rlen;
    uint32_t m = (uint32_t)(r->to - r->from);
    int rc = kvf__sync_recv(s->fd, r->id, KVF_OP_SHM_PUT, &rep, &rlen, NULL, NULL, deadline_ns,
                            s->err, sizeof s->err);
    if (!rc && rlen != 4 * (size_t)m) {
        free(rep);
        rc = KVF_EPROTO;
    }
    uint64_t sent = 0, failed = 0;
    for (size_t x = r->from; x < r->to; x++) {
        int st = rc ? rc : (int)(int32_t)kvf__get_u32(rep + 4 * (x - r->from));
        st = kvf_err_is_known(st) ? st : KVF_EPROTO;
        k->p.st[pos[x]] = st;
        sent += st ? 0 : k->p.lens[pos[x]];
        failed += st && st != KVF_EEXIST;
    }
    if (!rc)
        free(rep);
    kvf__shm_count(w->p, 1, 0, sent, failed, 0, 0, 0);
    /* Any failure here (an error reply included, rare: no staging region, a namespace the
     * connection is not bound to) ends the connection: the next use makes a fresh one. */
    return rc;
}

/* Puts the objects at pos (all on node) through w's staging region: rounds of objects copied
 * into one half of it while the node copies the previous round out of the other half, so that
 * the worker's copies and the node's run at once. An object larger than half the region takes
 * the whole of it, alone. */
static void put_node(worker *w, sub *k, size_t node, const uint32_t *pos, size_t n,
                     uint64_t deadline_ns, uint32_t *fb, size_t *n_fb)
{
    struct kvf__shm_path *p = w->p;
    sconn *s;
    int rc = kvf__shm_conn_clear(w, node, deadline_ns, &s);
    if (rc) {
        kvf__shm_keys_fail(k, pos, n, rc, fb, n_fb);
        return;
    }
    size_t maxk = n < MAX_KEYS ? n : MAX_KEYS;
    put_round r[2] = {{.req = malloc(8 + 32 * maxk)}, {.req = malloc(8 + 32 * maxk)}};
    if (!r[0].req || !r[1].req) {
        free(r[0].req), free(r[1].req);
        kvf__shm_keys_fail(k, pos, n, KVF_ENOMEM, NULL, NULL);
        return;
    }
    uint64_t half = s->stg_len / 2;
    int cur = 0, pending = -1; /* the round in flight, if any */
    size_t i = 0;
    while (i < n && !rc) {
        int whole = k->p.lens[pos[i]] > half;
        /* An object larger than a round takes a region of its own: the whole staging region
         * when it needs it, else the half not in flight. */
        if (whole && pending >= 0) {
            rc = put_reply(w, s, k, pos, &r[pending], deadline_ns);
            pending = -1;
            if (rc)
                break;
        }
        uint64_t base = whole ? 0 : (uint64_t)cur * half, cap = whole ? s->stg_len : half;
        uint64_t off = 0;
        size_t j = i;
        put_round *q = &r[cur];
        kvf__put_u64(q->req, p->c->o.ns);
        /* Rounds of a few MiB (or one object): the node starts on one while the worker fills
         * the next. */
        while (j < n && j - i < MAX_KEYS && kvf__shm_align(off) + k->p.lens[pos[j]] <= cap &&
               (!whole || j == i) && (j == i || off < PUT_ROUND)) {
            off = kvf__shm_align(off);
            memcpy(s->stg + base + off, k->p.objs[pos[j]], k->p.lens[pos[j]]);
            uint8_t *it = q->req + 8 + 32 * (j - i);
            kvf__wire_key_put(it, &k->p.keys[pos[j]]);
            kvf__put_u64(it + 16, base + off);
            kvf__put_u64(it + 24, k->p.lens[pos[j]]);
            off += k->p.lens[pos[j]];
            j++;
        }
        q->from = i;
        q->to = j;
        q->id = ++s->next_id;
        uint32_t m = (uint32_t)(j - i);
        rc = kvf__sync_send(s->fd, q->id, KVF_OP_SHM_PUT, m, q->req, 8 + 32 * (size_t)m,
                            deadline_ns, s->err, sizeof s->err);
        if (rc) {
            for (size_t x = i; x < j; x++)
                k->p.st[pos[x]] = rc;
            break;
        }
        /* The round before is answered now, its half free for the next round. */
        if (pending >= 0 && (rc = put_reply(w, s, k, pos, &r[pending], deadline_ns)) != 0) {
            pending = cur;
            break;
        }
        pending = whole ? -1 : cur;
        if (whole && (rc = put_reply(w, s, k, pos, q, deadline_ns)) != 0)
            break;
        cur ^= 1;
        i = j;
    }
    if (!rc && pending >= 0)
        rc = put_reply(w, s, k, pos, &r[pending], deadline_ns);
    if (rc) {
        /* The framing is lost (or the node stopped answering): what was not answered fails. */
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&p->c->nodes[node]);
        kvf__shm_conn_close(s);
        if (pending >= 0)
            for (size_t x = r[pending].from; x < r[pending].to; x++)
                if (k->p.st[pos[x]] == 0)
                    k->p.st[pos[x]] = rc;
        for (size_t x = i; x < n; x++)
            if (k->p.st[pos[x]] == 0)
                k->p.st[pos[x]] = rc;
    }
    free(r[0].req), free(r[1].req);
}

/* Hands k's keys at fb (n of them) to a new TCP sub; counted keys are counted as fallbacks (the
 * node's socket unreachable). */
static void to_tcp(kvf_client *c, sub *k, const uint32_t *fb, size_t n, size_t counted)
{
    if (!n)
        return;
    sub *t = sub_new(k->a, n, 1);
    if (!t) {
        for (size_t i = 0; i < n; i++)
            k->p.st[fb[i]] = KVF_ENOMEM;
        return;
    }
    /* The keys are the TCP sub's now: this share reports nothing for them. A key asked of a
     * nearer holder goes to its own node now, whatever node the batch named. */
    for (size_t i = 0; i < n; i++) {
        size_t j = t->p.b.n;
        kvf__part_add(&t->p, k->a->pb, k->p.idx[fb[i]]);
        if (k->near[fb[i]] && t->p.nodes)
            t->p.nodes[j] = KVF_NODE_ANY;
        k->p.idx[fb[i]] = MOVED;
    }
    if (counted)
        kvf__shm_count(k->a->p, 0, 0, 0, 0, 0, 0, counted);
    sub_submit_tcp(c, t);
}

void kvf__shm_lease_grow(struct kvf__shm_path *p, uint32_t was)
{
    /* once for all the shares, gets and leases that asked the same lease */
    uint32_t grown = was * 2 < LEASE_GROWN_MAX_MS ? was * 2 : LEASE_GROWN_MAX_MS;
    if (was < grown)
        atomic_compare_exchange_strong(&p->lease_ms, &was, grown);
}

void kvf__shm_retry_tail(sub *k, const leased *l, const size_t *hs, size_t n, uint32_t layer)
{
    uint64_t near = 0;
    sub *t = n ? sub_new(k->a, n, 1) : NULL;
    if (t && !(t->tail = calloc(n, sizeof *t->tail))) {
        sub_end(t, 0); /* no keys yet: it only leaves */
        t = NULL;
    }
    for (size_t i = 0; i < n; i++) {
        uint32_t x = l->pos[hs[i]];
        uint8_t *got = t ? malloc(k->p.caps[x] ? k->p.caps[x] : 1) : NULL;
        if (!got) {
            k->p.st[x] = KVF_ENOENT;
            continue;
        }
        size_t j = t->p.b.n;
        kvf__part_add(&t->p, k->a->pb, k->p.idx[x]);
        if (k->near[x] && t->p.nodes)
            t->p.nodes[j] = KVF_NODE_ANY; /* asked of its own node */
        t->tail[j] = (struct sub_tail){.dst = k->p.bufs[x],
                                       .got = got,
                                       .from = l->segoff[hs[i]] -
                                               kvf_obj_seg_at(&l->info[hs[i]], layer).stored_len};
        t->p.bufs[j] = got;
        k->p.idx[x] = MOVED;
        k->p.st[x] = KVF_ENOENT; /* k copies nothing more of it (and reports nothing of it) */
        near += k->near[x];
    }
    if (!t)
        return;
    pthread_mutex_lock(&k->a->p->cmu);
    k->a->p->cnt.near_misses += near;
    pthread_mutex_unlock(&k->a->p->cmu);
    if (!t->p.b.n)
        sub_end(t, 0);
    else
        sub_submit_tcp(k->a->p->c, t);
}

/* Runs share k on worker w: node by node; keys whose node's socket cannot be reached are sent
 * over TCP as a new sub. */
static void run_share(worker *w, sub *k)
{
    struct kvf__shm_path *p = w->p;
    kvf_client *c = p->c;
    kvf_op *parent = k->a->parent;
    uint64_t deadline_ns = parent->deadline_ns;
    int get = parent->kind == KVF__OPK_GET;
    int stream = get && (k->a->pb->flags & KVF_GET_STREAM);
    size_t n = k->p.b.n ? k->p.b.n : 1;
    uint32_t *pos = malloc(n * sizeof *pos), *fb = malloc(n * sizeof *fb);
    uint32_t *again = malloc(n * sizeof *again);
    /* A node's keys are leased MAX_KEYS at a time: one entry per request. */
    size_t cap_ls = p->n + k->p.b.n / MAX_KEYS + 1;
    leased *ls = calloc(cap_ls, sizeof *ls);
    size_t n_fb = 0, nl = 0, n_again = 0;
    uint32_t layers = 0;
    uint64_t expired = 0, failed = 0, bytes = 0;
    if (!pos || !fb || !again || !ls) {
        for (size_t i = 0; i < k->p.b.n; i++)
            k->p.st[i] = KVF_ENOMEM;
        goto out;
    }
    for (size_t node = 0; node < p->n; node++) {
        size_t m = of_node(k, node, pos);
        if (!m)
            continue;
        int rc = kvf__shm_node_ready(w, node, deadline_ns);
        if (rc) {
            if (w->cn[node].gone)
                kvf__shm_keys_fail(k, pos, m, 0, fb, &n_fb);
            else
                kvf__shm_keys_fail(k, pos, m, rc, NULL, NULL);
            continue;
        }
        if (!get) {
            put_node(w, k, node, pos, m, deadline_ns, fb, &n_fb);
        } else if (!p->nodes[node].has_view) {
            kvf__shm_get_staged(w, k, node, pos, m, deadline_ns, stream, &layers, fb, &n_fb);
        } else {
            for (size_t from = 0; from < m; from += MAX_KEYS) {
                size_t cnt = m - from < MAX_KEYS ? m - from : MAX_KEYS;
                rc = kvf__shm_lease_node(w, k, node, pos + from, cnt, deadline_ns, stream, &layers,
                                         &ls[nl]);
                if (rc) {
                    kvf__shm_keys_fail(k, pos + from, cnt, rc, NULL, NULL);
                    free(ls[nl].pos), free(ls[nl].info), free(ls[nl].src), free(ls[nl].segoff);
                    memset(&ls[nl], 0, sizeof ls[nl]);
                } else {
                    nl++;
                }
            }
        }
    }
    /* Keys asked of a nearer holder that it did not have (or could not serve) are asked of their
     * first node, over TCP, as those whose socket is gone. */
    uint64_t near = 0, near_missed = 0;
    for (size_t i = 0; i < k->p.b.n; i++) {
        if (!k->near[i] || k->p.idx[i] == MOVED)
            continue;
        near++;
        int st = k->p.st[i];
        if (st && st != KVF_E2BIG && st != KVF_ELAYOUT) {
            k->p.st[i] = 0;
            fb[n_fb++] = (uint32_t)i;
            near_missed++;
        }
    }
    if (near) {
        pthread_mutex_lock(&p->cmu);
        p->cnt.near_keys += near;
        p->cnt.near_misses += near_missed;
        pthread_mutex_unlock(&p->cmu);
    }
    /* Keys that go over TCP get their sub before any layer is reported: it holds the op's layers
     * back until its own keys have them. The node's socket is gone (a restarted store listens
     * under a new name until the engines' next HELLO says so), or a nearer holder lacked them. */
    to_tcp(c, k, fb, n_fb, n_fb - near_missed);
    if (get && nl)
        bytes = kvf__shm_copy_leased(k, ls, nl, stream, layers, &expired, &failed, again, &n_again);
    if (expired && !p->lease_set)
        kvf__shm_lease_grow(p, ls[0].asked_ms);
    if (get && !stream && nl) {
        /* a nearer holder's hit whose lease ended during its copy, or that did not check: asked
         * of the first node too; a first node's hit whose lease ended, asked of it again, over
         * TCP (a plain get reports no layers, so a sub may still join) */
        size_t n2 = 0;
        for (size_t i = 0; near && i < k->p.b.n; i++) {
            int st = k->p.st[i];
            if (k->near[i] && k->p.idx[i] != MOVED && st && st != KVF_E2BIG && st != KVF_ELAYOUT) {
                k->p.st[i] = 0;
                fb[n2++] = (uint32_t)i;
            }
        }
        if (n2) {
            pthread_mutex_lock(&p->cmu);
            p->cnt.near_misses += n2;
            pthread_mutex_unlock(&p->cmu);
        }
        for (size_t i = 0; i < n_again; i++) {
            k->p.st[again[i]] = 0;
            fb[n2++] = again[i];
        }
        to_tcp(c, k, fb, n2, 0);
    }
    for (size_t g = 0; g < nl; g++)
        kvf__shm_release(w, &ls[g], deadline_ns);
    kvf__shm_count(p, 0, bytes, 0, failed, expired, 0, 0);
    if (stream && !nl && layers)
        kvf__shm_sub_layers(k, layers);
out:
    for (size_t g = 0; g < cap_ls && ls; g++)
        free(ls[g].pos), free(ls[g].info), free(ls[g].src), free(ls[g].segoff);
    free(ls), free(pos), free(fb), free(again);
    sub_end(k, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Workers, submission, open and close */

static void *worker_main(void *arg)
{
    worker *w = arg;
    struct kvf__shm_path *p = w->p;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (!w->qh && !p->stop)
            pthread_cond_wait(&w->cv, &p->mu);
        sub *k = w->qh;
        if (k) {
            w->qh = k->next;
            if (!w->qh)
                w->qt = NULL;
        }
        int stop = p->stop;
        pthread_mutex_unlock(&p->mu);
        if (!k)
            break;
        if (stop) {
            for (size_t i = 0; i < k->p.b.n; i++)
                k->p.st[i] = KVF_ECANCELED;
            sub_end(k, KVF_ECANCELED);
            continue;
        }
        run_share(w, k);
    }
    for (size_t i = 0; i < p->n; i++)
        kvf__shm_conn_close(&w->cn[i]);
    return NULL;
}

/* Whether key i of b, on node, goes over shared memory: its node serves it, and the object fits a
 * staging region where one is needed. */
static int via_shm(const struct kvf__shm_path *p, const kvf_batch *b, size_t i, size_t node,
                   int get)
{
    const snode *sn = &p->nodes[node];
    if (!sn->on)
        return 0;
    if (get)
        return sn->has_view || b->caps[i] <= p->staging;
    return b->lens[i] <= p->staging;
}

/* Key i_key's node for a get: the node b names for it (kvf_batch.nodes, where usable), else its
 * first node (kvf_client_node_of), unless that one is not on this host
 * and keeps replicas of its hot keys (HELLO's holders: K), and one of the key's first K live nodes
 * in rendezvous order is on this host and can serve it over shared memory (its arena mapped, or,
 * for a tenant's staged get, the object fits the staging: staged): then that one, *near set. The
 * store copies a hot entry to the nodes after it in the key's order (store/replicate.c), so a hot
 * key is read from the holder on this host, over shared memory; a cold one costs a local miss
 * first. */
static size_t get_node(const struct kvf__shm_path *p, const kvf_client *c, const kvf_batch *b,
                       size_t i_key, int staged, uint8_t *near)
{
    const kvf_key *key = &b->keys[i_key];
    size_t first = kvf_client_node_of(c, key);
    *near = 0;
    size_t named = kvf__key_node(c, b, 1, i_key);
    if (named != first) {
        /* The batch names it (a plan's nearest holder). Over shared memory, a miss there is
         * asked of the key's own node as a nearer holder's is; over TCP it is the get's miss. */
        *near = p->nodes[named].on && (p->nodes[named].has_view || staged);
        return named;
    }
    if (p->nodes[first].on || c->n_nodes < 2)
        return first;
    unsigned k = atomic_load_explicit(&c->nodes[first].holders, memory_order_relaxed);
    int heard = atomic_load_explicit(&c->nodes[first].hello_seen, memory_order_relaxed);
    for (size_t i = 0; !heard && i < c->n_nodes; i++) {
        unsigned h = atomic_load_explicit(&c->nodes[i].holders, memory_order_relaxed);
        if (p->nodes[i].has_view && h > k)
            k = h; /* the first node's HELLO not heard yet: the cluster's K, as a local node says */
    }
    if (k < 2)
        return first;
    /* The first k live nodes, best first: selection of the next best below the last score. */
    uint64_t last = UINT64_MAX;
    size_t last_i = SIZE_MAX;
    for (unsigned r = 0; r < k; r++) {
        size_t best = SIZE_MAX;
        uint64_t bs = 0;
        for (size_t i = 0; i < c->n_nodes; i++) {
            if (atomic_load_explicit(&c->nodes[i].down_until, memory_order_relaxed))
                continue;
            uint64_t s = kvf__rendezvous_score(key->lo, key->hi, c->nodes[i].seed);
            /* below the last one taken (ties broken by index, as it was taken) */
            if (s > last || (s == last && i <= last_i))
                continue;
            if (best == SIZE_MAX || s > bs)
                bs = s, best = i;
        }
        if (best == SIZE_MAX)
            break;
        if (p->nodes[best].on && (p->nodes[best].has_view || staged)) {
            *near = best != first;
            return best;
        }
        last = bs;
        last_i = best;
    }
    return first;
}

static int shm_submit(kvf_client *c, kvf_op *op)
{
    struct kvf__shm_path *p = c->shm;
    const kvf_batch *b = &op->b;
    int get = op->kind == KVF__OPK_GET;
    /* Each key's node, chosen once: the count below and the shares after must agree, and a
     * share runs its keys by the node they were given here (sub.node). */
    size_t nn = b->n ? b->n : 1;
    uint32_t *nd = malloc(nn * (sizeof *nd + 1)); /* and, after them, each key's near flag */
    if (!nd)
        return KVF_ENOMEM;
    uint8_t *nr = (uint8_t *)(nd + nn);
    size_t n_shm = 0;
    uint64_t bytes = 0;
    for (size_t i = 0; i < b->n; i++) {
        nr[i] = 0;
        nd[i] = (uint32_t)(get ? get_node(p, c, b, i, b->caps[i] <= p->staging, &nr[i])
                               : kvf_client_node_of(c, &b->keys[i]));
        if (via_shm(p, b, i, nd[i], get)) {
            n_shm++;
            bytes += get ? b->caps[i] : b->lens[i];
        }
    }
    if (!n_shm) {
        free(nd);
        op->transport = "tcp";
        return kvf__path_tcp.submit(c, op);
    }
    agg *a = calloc(1, sizeof *a);
    if (!a) {
        free(nd);
        return KVF_ENOMEM;
    }
    a->parent = op;
    a->pb = b;
    a->p = p;
    a->left = 1; /* until every part is submitted */
    pthread_mutex_init(&a->mu, NULL);
    uint64_t shares = bytes / SPLIT_MIN_BYTES + 1;
    if (shares > (uint64_t)p->W)
        shares = (uint64_t)p->W;
    if (shares > n_shm)
        shares = n_shm;
    sub *tcp = n_shm < b->n ? sub_new(a, b->n - n_shm, 1) : NULL;
    sub **sh = calloc(shares, sizeof *sh);
    int rc = (n_shm < b->n && !tcp) || !sh ? KVF_ENOMEM : 0;
    for (uint64_t s = 0; s < shares && !rc; s++)
        if (!(sh[s] = sub_new(a, n_shm, 0)))
            rc = KVF_ENOMEM;
    if (rc) {
        /* Nothing was submitted: the parts go, and the op stays the caller's. */
        for (int i = 0; i < a->n; i++)
            sub_free(a->subs[i]);
        free(a->subs);
        free(sh);
        free(nd);
        pthread_mutex_destroy(&a->mu);
        free(a);
        return rc;
    }
    uint64_t acc = 0, s = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (!via_shm(p, b, i, nd[i], get)) {
            kvf__part_add(&tcp->p, b, (uint32_t)i);
            continue;
        }
        while (s + 1 < shares && acc >= bytes * (s + 1) / shares && sh[s]->p.b.n)
            s++;
        sh[s]->node[sh[s]->p.b.n] = nd[i];
        sh[s]->near[sh[s]->p.b.n] = nr[i];
        kvf__part_add(&sh[s]->p, b, (uint32_t)i);
        acc += get ? b->caps[i] : b->lens[i];
    }
    free(nd);
    for (uint64_t x = 0; x < shares; x++)
        enqueue(p, &p->w[x], sh[x]);
    free(sh);
    if (tcp)
        sub_submit_tcp(c, tcp);
    pthread_mutex_lock(&a->mu);
    agg_release_locked(a);
    return 0;
}

static void shm_free(struct kvf__shm_path *p)
{
    for (size_t i = 0; p->ctl && i < p->n; i++) {
        kvf__shm_conn_close(&p->ctl[i]);
        pthread_mutex_destroy(&p->ctl_mu[i]);
    }
    free(p->ctl);
    free(p->ctl_mu);
    for (int i = 0; p->w && i < p->W; i++)
        free(p->w[i].cn);
    for (size_t i = 0; p->nodes && i < p->n; i++)
        while (p->nodes[i].views) {
            sview *v = p->nodes[i].views;
            p->nodes[i].views = v->next;
            munmap((void *)v->map, v->len);
            free(v);
        }
    for (int i = 0; p->w && i < p->W; i++)
        pthread_cond_destroy(&p->w[i].cv);
    free(p->w);
    free(p->nodes);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->cmu);
    pthread_mutex_destroy(&p->vmu);
    pthread_mutex_destroy(&p->lmu);
    free(p);
}

/* Opens worker 0's connection to every node of this host that serves shared memory, mapping the
 * arena where granted; a node that fails stays on TCP, and why says so. Returns the nodes on. */
static size_t nodes_open(struct kvf__shm_path *p, char *why, size_t whylen)
{
    kvf_client *c = p->c;
    size_t on = 0, used = strlen(why);
    uint64_t deadline = kvf__now_ns() + (uint64_t)c->o.connect_timeout_ms * 1000000u;
    for (size_t i = 0; i < p->n; i++) {
        char name[128];
        if (!kvf__shm_node_name(c, i, name, sizeof name))
            continue;
        sconn *s = &p->w[0].cn[i];
        int rc = kvf__shm_conn_open(p, i, s, 1, 0, p->staging, deadline);
        if (rc) {
            used += (size_t)snprintf(why + used, used < whylen ? whylen - used : 0,
                                     "; node %zu: %s", i, s->err);
            used = used < whylen ? used : whylen;
            continue;
        }
        snode *sn = &p->nodes[i];
        sn->on = 1;
        sn->has_view = s->view != NULL;
        on++;
    }
    return on;
}

int kvf__path_shm_open(kvf_client *c, char *why, size_t whylen)
{
    why[0] = 0;
    struct kvf__shm_path *p = calloc(1, sizeof *p);
    if (!p)
        return kvf__errf(why, whylen, KVF_ENOMEM, "out of memory");
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->cmu, NULL);
    pthread_mutex_init(&p->vmu, NULL);
    pthread_mutex_init(&p->lmu, NULL);
    p->c = c;
    p->n = c->n_nodes;
    p->lease_set = c->o.shm_lease_ms != 0;
    atomic_init(&p->lease_ms, p->lease_set ? c->o.shm_lease_ms : LEASE_MS);
    p->staging = c->o.shm_staging_bytes ? c->o.shm_staging_bytes : STAGING_BYTES;
    /* Copying is the whole of the work: as many workers as cores, within bounds. */
    int cores = kvf__cores();
    p->W = cores < 1 ? 1 : cores > SHM_MAX_WORKERS ? SHM_MAX_WORKERS : cores;
    p->nodes = calloc(p->n, sizeof *p->nodes);
    p->w = calloc((size_t)p->W, sizeof *p->w);
    p->ctl = calloc(p->n, sizeof *p->ctl);
    p->ctl_mu = calloc(p->n, sizeof *p->ctl_mu);
    int rc = p->nodes && p->w && p->ctl && p->ctl_mu ? 0 : KVF_ENOMEM;
    for (size_t j = 0; !rc && j < p->n; j++) {
        p->ctl[j].fd = -1;
        pthread_mutex_init(&p->ctl_mu[j], NULL);
    }
    if (rc) {
        free(p->ctl), free(p->ctl_mu);
        p->ctl = NULL;
        p->ctl_mu = NULL;
    }
    for (int i = 0; i < p->W && !rc; i++) {
        p->w[i].p = p;
        p->w[i].idx = i;
        pthread_cond_init(&p->w[i].cv, NULL);
        if (!(p->w[i].cn = calloc(p->n, sizeof *p->w[i].cn)))
            rc = KVF_ENOMEM;
        for (size_t j = 0; !rc && j < p->n; j++)
            p->w[i].cn[j].fd = -1;
    }
    if (rc) {
        shm_free(p);
        return kvf__errf(why, whylen, rc, "out of memory");
    }
    size_t on = nodes_open(p, why, whylen);
    if (!on) {
        shm_free(p);
        return KVF_ENOTSUP;
    }
    for (int i = 0; i < p->W; i++) {
        if (pthread_create(&p->w[i].th, NULL, worker_main, &p->w[i]) != 0)
            break;
        p->w[i].started = 1;
    }
    if (!p->w[0].started) {
        for (size_t i = 0; i < p->n; i++)
            kvf__shm_conn_close(&p->w[0].cn[i]);
        shm_free(p);
        return kvf__errf(why, whylen, KVF_EAGAIN, "cannot start the shared-memory workers");
    }
    char head[200];
    int views = 0;
    for (size_t i = 0; i < p->n; i++)
        views += p->nodes[i].has_view;
    snprintf(head, sizeof head,
             "%zu of %zu node(s) on this host over shared memory (%d with the "
             "arena mapped read-only, %zu staged), %d worker(s)",
             on, p->n, views, on - (size_t)views, p->W);
    size_t hl = strlen(head), wl = strlen(why);
    if (hl + wl + 1 < whylen) {
        memmove(why + hl, why, wl + 1);
        memcpy(why, head, hl);
    } else {
        snprintf(why, whylen, "%s", head);
    }
    c->shm = p;
    return 0;
}

static void shm_close(kvf_client *c)
{
    struct kvf__shm_path *p = c->shm;
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    for (int i = 0; i < p->W; i++)
        pthread_cond_broadcast(&p->w[i].cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->W; i++)
        if (p->w[i].started)
            pthread_join(p->w[i].th, NULL);
        else
            for (size_t j = 0; j < p->n; j++)
                kvf__shm_conn_close(&p->w[i].cn[j]);
    kvf__shm_leases_orphan(p);
    c->shm = NULL;
    shm_free(p);
}

void kvf__shm_counters(kvf_client *c, kvf_client_counters *out)
{
    struct kvf__shm_path *p = c->shm;
    if (!p)
        return;
    pthread_mutex_lock(&p->cmu);
    out->bytes_sent += p->cnt.bytes_sent;
    out->bytes_received += p->cnt.bytes_received;
    out->requests += p->cnt.requests;
    out->failed_keys += p->cnt.failed_keys;
    out->reconnects += p->cnt.reconnects;
    out->shm_bytes_sent += p->cnt.shm_bytes_sent;
    out->shm_bytes_received += p->cnt.shm_bytes_received;
    out->shm_lease_expired += p->cnt.shm_lease_expired;
    out->shm_fallback_keys += p->cnt.shm_fallback_keys;
    out->near_keys += p->cnt.near_keys;
    out->near_misses += p->cnt.near_misses;
    pthread_mutex_unlock(&p->cmu);
}

int kvf_client_shm_view(const kvf_client *c, size_t node, const void **base, size_t *len)
{
    if (!c || !base || !len || node >= c->n_nodes)
        return KVF_EINVAL;
    *base = NULL;
    *len = 0;
    if (!c->shm)
        return KVF_ENOTSUP;
    /* The newest view: the store as it is now (a restarted one is a new arena). */
    pthread_mutex_lock(&c->shm->vmu);
    sview *v = c->shm->nodes[node].views;
    if (v) {
        v->pinned = 1; /* the caller may keep it (register it with a driver): never unmapped */
        *base = v->map;
        *len = v->len;
    }
    pthread_mutex_unlock(&c->shm->vmu);
    if (!v)
        return KVF_ENOTSUP;
    return 0;
}

const kvf__path_ops kvf__path_shm = {
    .name = "shm",
    .submit = shm_submit,
    .close = shm_close,
};
