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
#include "unixsock.h"
#include "wire.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define STAGING_BYTES   (64ull << 20)
#define LEASE_MS        2000u
#define LEASE_MARGIN_NS 2000000ull
#define MAX_KEYS        4096u
#define RETRY_NS        (200ull * 1000000u)
#define PROBE_NS        (200ull * 1000000u) /* a node on this host answers HELLO in well under 1 ms */
#define SPLIT_MIN_BYTES (1ull << 20)
#define PUT_ROUND       (4ull << 20)
#define RELEASES_MAX    16
#define SHM_MAX_WORKERS 16 /* copying is memory-bound well before this many */
#define ALIGN           64u
#define MOVED           UINT32_MAX /* a sub's key handed to another sub */

/* A read-only view of one store process's arena, and the store's address of its base. A node
 * restarted is another arena (another memfd): each connection uses the view of the store it is
 * connected to, found by the descriptor's identity. A view is held by the connections that use
 * it and by the leases taken on them; one that is not the node's newest goes once the last lets
 * it go (a dead store's memory is not kept alive by its clients). */
typedef struct sview {
    struct sview *next;
    const uint8_t *map;
    uint64_t base, len;
    dev_t dev;
    ino_t ino;
    int refs;   /* under the path's vmu */
    int pinned; /* handed out by kvf_client_shm_view: mapped until the client closes */
} sview;

typedef struct sconn {
    int fd; /* -1: not connected */
    uint8_t *stg;
    uint64_t stg_len;
    uint64_t next_id;
    uint64_t retry_at;
    int gone; /* the last attempt found no socket to connect to: its keys go over TCP */
    int last_rc;
    /* RDMA_RELEASEs sent and not yet answered (their ids): the replies are read before the
     * connection's next request, off the get's critical path */
    uint64_t rel[RELEASES_MAX];
    int n_rel;
    const sview *view; /* the arena of the store this connection reaches (NULL: none), held */
    struct kvf__shm_path *p;
    size_t node;
    /* how many times it was closed: the node drops a connection's leases when it closes, so a
     * lease taken on it holds only while this has not moved (kvf_lease_valid) */
    atomic_uint_fast64_t epoch;
    char err[240];
} sconn;

typedef struct snode {
    int on;       /* served over shared memory */
    int has_view; /* the arena is handed to this client (else its gets are staged) */
    sview *views; /* newest first, under the path's vmu */
} snode;

typedef struct sub sub;
typedef struct agg agg;

/* A part of an op: a worker's share, or the keys that go over TCP as a child op. */
struct sub {
    agg *a;
    sub *next; /* the workers' queue */
    int tcp;
    uint32_t *idx; /* parent index of each key */
    kvf_batch b;
    kvf_key *keys;
    const void **objs;
    uint64_t *lens;
    void **bufs;
    uint64_t *caps, *out_lens;
    int *st;
    uint32_t layers; /* layers delivered */
    int done;
    kvf_op *op; /* the TCP child */
};

struct agg {
    kvf_op *parent;
    const kvf_batch *pb;
    struct kvf__shm_path *p;
    pthread_mutex_t mu;
    int left, result, used_shm, used_tcp;
    uint32_t fired, max_layers;
    int n, cap;
    sub **subs;
};

typedef struct worker {
    struct kvf__shm_path *p;
    int idx;
    pthread_t th;
    int started;
    sconn *cn;         /* one per node */
    sub *qh, *qt;      /* its shares to run, under the path's mu */
    pthread_cond_t cv; /* signalled when one is queued or the path stops */
} worker;

struct kvf__shm_path {
    kvf_client *c;
    size_t n;
    snode *nodes;
    /* Control requests on the caller's own thread (kvf__shm_exists): one connection per node,
     * taken by whoever gets its lock first; the others use the engines. */
    sconn *ctl;
    pthread_mutex_t *ctl_mu;
    int W;
    worker *w;
    uint32_t lease_ms;
    uint64_t staging;
    pthread_mutex_t mu; /* guards the workers' queues and stop */
    int stop;
    pthread_mutex_t vmu; /* guards the nodes' view lists */
    pthread_mutex_t cmu;
    kvf_client_counters cnt;
};

static void count(struct kvf__shm_path *p, uint64_t reqs, uint64_t in, uint64_t out,
                  uint64_t failed, uint64_t expired, uint64_t reconnects, uint64_t fallback)
{
    pthread_mutex_lock(&p->cmu);
    p->cnt.requests += reqs;
    p->cnt.bytes_received += in;
    p->cnt.bytes_sent += out;
    p->cnt.shm_bytes_received += in;
    p->cnt.shm_bytes_sent += out;
    p->cnt.failed_keys += failed;
    p->cnt.shm_lease_expired += expired;
    p->cnt.reconnects += reconnects;
    p->cnt.shm_fallback_keys += fallback;
    pthread_mutex_unlock(&p->cmu);
}

/* ------------------------------------------------------------------------------------------ */
/* Connections */

static void view_put(struct kvf__shm_path *p, size_t node, const sview *cv);

static void sconn_close(sconn *s)
{
    if (s->fd >= 0) {
        atomic_fetch_add(&s->epoch, 1); /* before the node can see the close */
        close(s->fd);
    }
    if (s->view)
        view_put(s->p, s->node, s->view);
    s->view = NULL;
    if (s->stg)
        munmap(s->stg, s->stg_len);
    s->fd = -1;
    s->stg = NULL;
    s->stg_len = 0;
    s->n_rel = 0;
}

/* Reads the replies of s's releases in flight. 0, or the error (s is then closed). */
static int drain_releases(sconn *s)
{
    /* A release that cannot be answered costs nothing but its lease's remaining time. */
    uint64_t d = kvf__now_ns() + 1000000000ull;
    for (int i = 0; i < s->n_rel && s->fd >= 0; i++) {
        uint8_t *rep;
        size_t rlen;
        if (kvf__sync_recv(s->fd, s->rel[i], KVF_OP_RDMA_RELEASE, &rep, &rlen, NULL, NULL, d,
                           s->err, sizeof s->err) != 0) {
            sconn_close(s);
            return KVF_ECONNRESET;
        }
        free(rep);
    }
    s->n_rel = 0;
    return 0;
}

static int node_name(kvf_client *c, size_t node, char *name, size_t len)
{
    pthread_mutex_lock(&c->shm_mu);
    int ok = c->nodes[node].shm_local && c->nodes[node].shm_name[0];
    snprintf(name, len, "%s", ok ? c->nodes[node].shm_name : "");
    pthread_mutex_unlock(&c->shm_mu);
    return ok;
}

/* The view of the arena whose descriptor fd is (the store's address of its base, its length):
 * one already mapped for the same store process, or a new one. NULL when it cannot be mapped.
 * Takes the path's vmu. */
static const sview *view_of(struct kvf__shm_path *p, size_t node, int fd, uint64_t base,
                            uint64_t len)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || len == 0)
        return NULL;
    pthread_mutex_lock(&p->vmu);
    sview *v = p->nodes[node].views;
    while (v && !(v->dev == st.st_dev && v->ino == st.st_ino && v->base == base && v->len == len))
        v = v->next;
    if (v)
        v->refs++;
    if (!v && (v = calloc(1, sizeof *v)) != NULL) {
        void *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            free(v);
            v = NULL;
        } else {
            *v = (sview){.next = p->nodes[node].views,
                         .map = m,
                         .base = base,
                         .len = len,
                         .dev = st.st_dev,
                         .ino = st.st_ino,
                         .refs = 1};
            p->nodes[node].views = v;
            /* The views before it that nobody holds any more go now. */
            for (sview **pp = &v->next; *pp;) {
                sview *o = *pp;
                if (o->refs || o->pinned) {
                    pp = &o->next;
                    continue;
                }
                *pp = o->next;
                munmap((void *)o->map, o->len);
                free(o);
            }
        }
    }
    pthread_mutex_unlock(&p->vmu);
    return v;
}

/* Lets one hold of v on node go: a view nobody holds that is not the node's newest is unmapped. */
static void view_put(struct kvf__shm_path *p, size_t node, const sview *cv)
{
    if (!cv)
        return;
    pthread_mutex_lock(&p->vmu);
    sview *v = (sview *)cv;
    if (--v->refs == 0 && !v->pinned && p->nodes[node].views != v) {
        for (sview **pp = &p->nodes[node].views; *pp; pp = &(*pp)->next) {
            if (*pp == v) {
                *pp = v->next;
                munmap((void *)v->map, v->len);
                free(v);
                break;
            }
        }
    }
    pthread_mutex_unlock(&p->vmu);
}

/* Connects s to node's socket: HELLO (and AUTH), SHM_MAP of a staging region (and, where
 * want_view, the arena, whose view becomes s->view; where need_view, a connection not handed it
 * fails). 0, or the error with the reason in s->err. */
static int sconn_open(struct kvf__shm_path *p, size_t node, sconn *s, int want_view, int need_view,
                      uint64_t staging, uint64_t deadline_ns)
{
    kvf_client *c = p->c;
    s->view = NULL;
    s->p = p;
    s->node = node;
    char name[128];
    if (!node_name(c, node, name, sizeof name))
        return kvf__errf(s->err, sizeof s->err, KVF_ENOTSUP, "node %zu serves no shared memory",
                         node);
    int rc = kvf__unix_connect_nb(name, &s->fd, s->err, sizeof s->err);
    s->gone = rc != 0;
    if (rc)
        return rc;
    kvf__hello h;
    rc = kvf__sync_hello(s->fd, c, &s->next_id, &h, deadline_ns, s->err, sizeof s->err);
    if (rc)
        goto out_close;
    uint8_t req[16], *rep = NULL;
    size_t rlen;
    int fds[KVF_UNIX_MAX_FDS], nfd = KVF_UNIX_MAX_FDS;
    kvf__put_u64(req, staging);
    kvf__put_u32(req + 8, want_view ? KVF_SHM_MAP_ARENA : 0);
    kvf__put_u32(req + 12, 0);
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_SHM_MAP, 0, req, sizeof req, &rep, &rlen, fds,
                        &nfd, deadline_ns, s->err, sizeof s->err);
    if (rc) {
        /* The node has no staging region to spare (its --shm-staging-total), or none this
         * large: this connection's keys go over TCP rather than fail. */
        s->gone = rc == KVF_ENOMEM || rc == KVF_E2BIG;
        goto out_close;
    }
    uint64_t base = rlen >= 32 ? kvf__get_u64(rep) : 0,
             alen = rlen >= 32 ? kvf__get_u64(rep + 8) : 0;
    uint64_t slen = rlen >= 32 ? kvf__get_u64(rep + 16) : 0;
    int granted = rlen >= 32 && (kvf__get_u32(rep + 24) & KVF_SHM_MAP_ARENA);
    free(rep);
    if (rlen < 32 || nfd != (slen ? 1 : 0) + granted || slen < staging) {
        for (int i = 0; i < nfd; i++)
            close(fds[i]);
        rc = kvf__errf(s->err, sizeof s->err, KVF_EPROTO,
                       "SHM_MAP answered %zu bytes and %d descriptors", rlen, nfd);
        goto out_close;
    }
    if (slen) {
        void *m = mmap(NULL, slen, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
        close(fds[0]);
        if (m == MAP_FAILED) {
            if (granted)
                close(fds[1]);
            rc = kvf__errf(s->err, sizeof s->err, KVF_ENOMEM,
                           "cannot map a staging region of %llu bytes", (unsigned long long)slen);
            goto out_close;
        }
        s->stg = m;
        s->stg_len = slen;
    }
    if (granted) {
        s->view = view_of(p, node, fds[slen ? 1 : 0], base, alen);
        close(fds[slen ? 1 : 0]);
    }
    if (need_view && !s->view) {
        /* Leased gets need the arena: a node that no longer hands it out (or a view that cannot
         * be mapped) sends this connection's keys over TCP rather than fail them. */
        s->gone = 1;
        rc = kvf__errf(s->err, sizeof s->err, KVF_ENOTSUP, "node %zu did not hand out its arena",
                       node);
        goto out_close;
    }
    return 0;

out_close:
    sconn_close(s);
    return rc;
}

/* Worker w's connection to node, made (again) where needed. 0 or the error (the connection
 * stays closed until RETRY_NS have passed). */
static int conn_of(worker *w, size_t node, uint64_t deadline_ns, sconn **out)
{
    sconn *s = &w->cn[node];
    *out = s;
    if (s->fd >= 0)
        return 0;
    uint64_t t = kvf__now_ns();
    if (t < s->retry_at)
        return s->last_rc;
    /* A connection that asks for leased descriptors must hold the arena too (the node hands
     * them only to those). */
    int hv = w->p->nodes[node].has_view;
    int rc = sconn_open(w->p, node, s, hv, hv, w->p->staging, deadline_ns);
    if (rc) {
        s->retry_at = t + RETRY_NS;
        s->last_rc = rc;
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&w->p->c->nodes[node]);
        return rc;
    }
    count(w->p, 0, 0, 0, 0, 0, 1, 0);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Subs and their aggregation */

static void sub_free(sub *k)
{
    if (!k)
        return;
    free(k->idx), free(k->keys), free(k->objs), free(k->lens), free(k->bufs), free(k->caps);
    free(k->out_lens), free(k->st);
    free(k);
}

/* Fires the parent's layers that every unfinished sub has delivered. Lock held. */
static void fire(agg *a)
{
    uint32_t front = UINT32_MAX;
    for (int i = 0; i < a->n; i++)
        if (!a->subs[i]->done && a->subs[i]->layers < front)
            front = a->subs[i]->layers;
    while (a->pb->layer_cb && a->fired < front && a->fired < a->max_layers)
        a->pb->layer_cb(a->parent, a->fired++, a->pb->ud);
}

/* Sub k delivered `layers` layers of every key it still has a hit for. Its keys' statuses go to
 * the parent first: a layer callback must not take a key that already failed for one that hit. */
static void sub_layers(sub *k, uint32_t layers)
{
    agg *a = k->a;
    pthread_mutex_lock(&a->mu);
    for (size_t i = 0; i < k->b.n; i++)
        if (k->idx[i] != MOVED)
            a->pb->status[k->idx[i]] = k->st[i];
    if (layers > k->layers)
        k->layers = layers;
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
        kvf_op_free(&a->subs[i]->op);
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
    for (size_t i = 0; i < k->b.n; i++) {
        if (k->idx[i] == MOVED)
            continue;
        a->pb->status[k->idx[i]] = k->st[i];
        if (a->pb->out_lens && k->out_lens)
            a->pb->out_lens[k->idx[i]] = k->out_lens[i];
    }
    if (status && !a->result)
        a->result = status;
    k->done = 1;
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
    size_t m = n ? n : 1;
    k->idx = malloc(m * sizeof *k->idx);
    k->keys = malloc(m * sizeof *k->keys);
    k->st = calloc(m, sizeof *k->st);
    if (get) {
        k->bufs = malloc(m * sizeof *k->bufs);
        k->caps = malloc(m * sizeof *k->caps);
        k->out_lens = calloc(m, sizeof *k->out_lens);
    } else {
        k->objs = malloc(m * sizeof *k->objs);
        k->lens = malloc(m * sizeof *k->lens);
    }
    if (!k->idx || !k->keys || !k->st || (get && (!k->bufs || !k->caps || !k->out_lens)) ||
        (!get && (!k->objs || !k->lens))) {
        sub_free(k);
        return NULL;
    }
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

/* Appends parent key i to k (whose arrays hold room for it). */
static void sub_add(sub *k, const kvf_batch *pb, uint32_t i)
{
    size_t j = k->b.n++;
    k->idx[j] = i;
    k->keys[j] = pb->keys[i];
    if (k->bufs) {
        k->bufs[j] = pb->bufs[i];
        k->caps[j] = pb->caps[i];
    } else {
        k->objs[j] = pb->objs[i];
        k->lens[j] = pb->lens[i];
    }
}

static void tcp_done(kvf_op *op, int status, void *ud)
{
    (void)op;
    sub_end(ud, status);
}

static void tcp_layer(kvf_op *op, uint32_t l, void *ud)
{
    (void)op;
    sub_layers(ud, l + 1);
}

/* Runs k's keys over TCP as a child op. */
static void sub_submit_tcp(kvf_client *c, sub *k)
{
    const kvf_batch *pb = k->a->pb;
    k->b = (kvf_batch){.n = k->b.n,
                       .keys = k->keys,
                       .objs = k->objs,
                       .lens = k->lens,
                       .bufs = (void *const *)k->bufs,
                       .caps = k->caps,
                       .out_lens = k->out_lens,
                       .status = k->st,
                       .flags = pb->flags,
                       .deadline_ms = pb->deadline_ms,
                       .cb = tcp_done,
                       .layer_cb = pb->layer_cb ? tcp_layer : NULL,
                       .ud = k};
    kvf_op *parent = k->a->parent;
    k->op = kvf__op_new(c, NULL, parent->kind, parent->opcode, &k->b);
    int rc = k->op ? 0 : KVF_ENOMEM;
    if (k->op) {
        k->op->transport = "tcp";
        k->op->deadline_ns = parent->deadline_ns;
        if ((rc = kvf__path_tcp.submit(c, k->op)) != 0)
            kvf__op_destroy(k->op);
    }
    if (rc) {
        k->op = NULL;
        for (size_t i = 0; i < k->b.n; i++)
            k->st[i] = rc;
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

static uint64_t align_up(uint64_t x)
{
    return (x + ALIGN - 1) & ~(uint64_t)(ALIGN - 1);
}

/* The positions of k's keys on node, in *pos (n of them). */
static size_t of_node(const kvf_client *c, const sub *k, size_t node, uint32_t *pos)
{
    size_t n = 0;
    for (size_t i = 0; i < k->b.n; i++)
        if (kvf_client_node_of(c, &k->keys[i]) == node)
            pos[n++] = (uint32_t)i;
    return n;
}

/* A connection that failed: closed; its keys go over TCP (fallback) where the connection could
 * not be made at all, else fail with rc. */
static void keys_fail(sub *k, const uint32_t *pos, size_t n, int rc, uint32_t *fb, size_t *n_fb)
{
    for (size_t i = 0; i < n; i++) {
        if (fb)
            fb[(*n_fb)++] = pos[i];
        else
            k->st[pos[i]] = rc;
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
        k->st[pos[x]] = st;
        sent += st ? 0 : k->lens[pos[x]];
        failed += st && st != KVF_EEXIST;
    }
    if (!rc)
        free(rep);
    count(w->p, 1, 0, sent, failed, 0, 0, 0);
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
    int rc = conn_of(w, node, deadline_ns, &s);
    if (!rc && s->n_rel && drain_releases(s) != 0)
        rc = conn_of(w, node, deadline_ns, &s);
    if (rc) {
        keys_fail(k, pos, n, rc, fb, n_fb);
        return;
    }
    size_t maxk = n < MAX_KEYS ? n : MAX_KEYS;
    put_round r[2] = {{.req = malloc(8 + 32 * maxk)}, {.req = malloc(8 + 32 * maxk)}};
    if (!r[0].req || !r[1].req) {
        free(r[0].req), free(r[1].req);
        keys_fail(k, pos, n, KVF_ENOMEM, NULL, NULL);
        return;
    }
    uint64_t half = s->stg_len / 2;
    int cur = 0, pending = -1; /* the round in flight, if any */
    size_t i = 0;
    while (i < n && !rc) {
        int whole = k->lens[pos[i]] > half;
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
        while (j < n && j - i < MAX_KEYS && align_up(off) + k->lens[pos[j]] <= cap &&
               (!whole || j == i) && (j == i || off < PUT_ROUND)) {
            off = align_up(off);
            memcpy(s->stg + base + off, k->objs[pos[j]], k->lens[pos[j]]);
            uint8_t *it = q->req + 8 + 32 * (j - i);
            kvf__wire_key_put(it, &k->keys[pos[j]]);
            kvf__put_u64(it + 16, base + off);
            kvf__put_u64(it + 24, k->lens[pos[j]]);
            off += k->lens[pos[j]];
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
                k->st[pos[x]] = rc;
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
        sconn_close(s);
        if (pending >= 0)
            for (size_t x = r[pending].from; x < r[pending].to; x++)
                if (k->st[pos[x]] == 0)
                    k->st[pos[x]] = rc;
        for (size_t x = i; x < n; x++)
            if (k->st[pos[x]] == 0)
                k->st[pos[x]] = rc;
    }
    free(r[0].req), free(r[1].req);
}

/* What one node's leases hold: the hits' positions in k, their headers, where each lies in the
 * view, and when the lease may have ended. */
typedef struct leased {
    size_t node;
    uint64_t id, until_ns, epoch; /* epoch: of the connection it was taken on */
    size_t n;
    uint32_t *pos;
    kvf_obj_info *info;
    const uint8_t **src;
    uint64_t *segoff; /* streamed: where each hit's next segment starts */
} leased;

/* RDMA_GET for the keys at pos (on node, whose arena w's process views): each hit's header
 * copied into its buffer and checked, its bytes located in the view. *l gets the hits. 0, or the
 * error that fails every key (the connection closed). */
static int lease_node(worker *w, sub *k, size_t node, const uint32_t *pos, size_t n,
                      uint64_t deadline_ns, int stream, uint32_t *layers, leased *l)
{
    struct kvf__shm_path *p = w->p;
    sconn *s;
    int rc = conn_of(w, node, deadline_ns, &s);
    if (!rc && s->n_rel && drain_releases(s) != 0)
        rc = conn_of(w, node, deadline_ns, &s);
    if (rc)
        return rc;
    /* The addresses are those of the store this connection reaches: its view says where. */
    const sview *sn = s->view;
    if (!sn)
        return KVF_ENOTSUP;
    size_t plen = 16 + 16 * n;
    uint8_t *req = malloc(plen), *rep = NULL;
    l->pos = malloc(n * sizeof *l->pos);
    l->info = malloc(n * sizeof *l->info);
    l->src = malloc(n * sizeof *l->src);
    l->segoff = malloc(n * sizeof *l->segoff);
    if (!req || !l->pos || !l->info || !l->src || !l->segoff) {
        free(req);
        return KVF_ENOMEM;
    }
    kvf__put_u64(req, p->c->o.ns);
    kvf__put_u32(req + 8, p->lease_ms);
    kvf__put_u32(req + 12, 0);
    for (size_t i = 0; i < n; i++)
        kvf__wire_key_put(req + 16 + 16 * i, &k->keys[pos[i]]);
    size_t rlen;
    uint64_t t0 = kvf__now_ns();
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_RDMA_GET, (uint32_t)n, req, plen, &rep, &rlen,
                        NULL, NULL, deadline_ns, s->err, sizeof s->err);
    free(req);
    count(p, 1, 0, 0, 0, 0, 0, 0);
    if (rc) {
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&p->c->nodes[node]);
        sconn_close(s);
        return rc;
    }
    if (rlen < 16 + 24 * n) {
        free(rep);
        sconn_close(s);
        return KVF_EPROTO;
    }
    l->node = node;
    l->id = kvf__get_u64(rep);
    l->epoch = atomic_load(&s->epoch);
    uint32_t lease = kvf__get_u32(rep + 12);
    l->until_ns = t0 + (uint64_t)lease * 1000000u;
    l->until_ns = l->until_ns > LEASE_MARGIN_NS ? l->until_ns - LEASE_MARGIN_NS : 0;
    size_t off = 16 + 24 * n;
    rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        const uint8_t *e = rep + 16 + 24 * i;
        uint32_t x = pos[i];
        int st = (int)(int32_t)kvf__get_u32(e);
        uint32_t hl = kvf__get_u32(e + 4);
        uint64_t a = kvf__get_u64(e + 8), len = kvf__get_u64(e + 16);
        if (!kvf_err_is_known(st)) {
            rc = KVF_EPROTO;
            break;
        }
        k->st[x] = st;
        if (st)
            continue;
        /* What the node says must lie inside the view, and the header inside the reply. */
        if (hl > rlen - off || hl > len || a < sn->base || a - sn->base > sn->len ||
            len > sn->len - (a - sn->base)) {
            rc = KVF_EPROTO;
            break;
        }
        const uint8_t *hdr = rep + off;
        off += hl;
        if (len > k->caps[x]) {
            k->st[x] = KVF_E2BIG;
            continue;
        }
        memcpy(k->bufs[x], hdr, hl);
        kvf_obj_info *in = &l->info[l->n];
        if (kvf_obj_parse(k->bufs[x], hl, in) != 0 || in->header_len != hl ||
            hl + in->stored_bytes != len || !kvf_key_eq(&in->key, &k->keys[x])) {
            k->st[x] = KVF_EPROTO;
            continue;
        }
        if (stream && *layers && in->layers != *layers) {
            k->st[x] = KVF_ELAYOUT;
            continue;
        }
        if (stream && !*layers)
            *layers = in->layers;
        k->out_lens[x] = len;
        l->segoff[l->n] = hl;
        l->src[l->n] = sn->map + (a - sn->base);
        l->pos[l->n++] = x;
    }
    free(rep);
    if (rc)
        sconn_close(s); /* the lease ends with the connection */
    return rc;
}

static void release(worker *w, leased *l, uint64_t deadline_ns)
{
    sconn *s = &w->cn[l->node];
    /* A connection closed since took the lease with it; its successor's ids are not ours. */
    if (!l->id || s->fd < 0 || atomic_load(&s->epoch) != l->epoch)
        return;
    (void)deadline_ns;
    if (s->n_rel == RELEASES_MAX && drain_releases(s) != 0)
        return;
    uint8_t req[16];
    kvf__put_u64(req, w->p->c->o.ns);
    kvf__put_u64(req + 8, l->id);
    /* Sent now, its reply read before the next request: the get is over once its copies are. */
    uint64_t d = kvf__now_ns() + 1000000000ull, id = ++s->next_id;
    if (kvf__sync_send(s->fd, id, KVF_OP_RDMA_RELEASE, 0, req, sizeof req, d, s->err,
                       sizeof s->err) != 0)
        sconn_close(s);
    else
        s->rel[s->n_rel++] = id;
}

/* Whether the lease l still held now: after a copy, what it read is then the object. */
static int lease_held(const leased *l)
{
    return kvf__now_ns() < l->until_ns;
}

/* Copies and verifies the leased hits: whole objects, or layer by layer (reporting each layer of
 * the share once every hit has it). A hit whose lease ended before its copy was checked is a
 * miss. Returns the bytes delivered. */
static uint64_t copy_leased(sub *k, leased *ls, size_t nl, int stream, uint32_t L,
                            uint64_t *expired, uint64_t *failed)
{
    uint64_t bytes = 0;
    if (!stream) {
        for (size_t g = 0; g < nl; g++) {
            leased *l = &ls[g];
            for (size_t h = 0; h < l->n; h++) {
                uint32_t x = l->pos[h];
                uint64_t len = l->info[h].header_len + l->info[h].stored_bytes;
                kvf_obj_info in;
                int rc = kvf__obj_copy_verify(k->bufs[x], l->src[h], len, &in);
                if (!lease_held(l)) {
                    k->st[x] = KVF_ENOENT;
                    (*expired)++;
                } else if (rc || !kvf_key_eq(&in.key, &k->keys[x])) {
                    k->st[x] = rc ? rc : KVF_EPROTO;
                    (*failed)++;
                } else {
                    bytes += len;
                }
            }
        }
        return bytes;
    }
    for (uint32_t layer = 0; layer < L; layer++) {
        for (size_t g = 0; g < nl; g++) {
            leased *l = &ls[g];
            for (size_t h = 0; h < l->n; h++) {
                uint32_t x = l->pos[h];
                kvf_obj_seg sg = kvf_obj_seg_at(&l->info[h], layer);
                uint64_t o = l->segoff[h];
                l->segoff[h] += sg.stored_len;
                if (k->st[x])
                    continue;
                uint8_t *d = (uint8_t *)k->bufs[x] + o;
                memcpy(d, l->src[h] + o, sg.stored_len);
                if (kvf__xxh3(d, sg.stored_len) != sg.stored_xxh) {
                    k->st[x] = KVF_ECHECKSUM;
                    (*failed)++;
                } else {
                    bytes += sg.stored_len;
                }
            }
            if (!lease_held(l)) {
                for (size_t h = 0; h < l->n; h++) {
                    if (!k->st[l->pos[h]]) {
                        k->st[l->pos[h]] = KVF_ENOENT;
                        (*expired)++;
                    }
                }
            }
        }
        sub_layers(k, layer + 1);
    }
    return bytes;
}

/* Staged get of the keys at pos (on node): SHM_GET in rounds that fit w's staging region; each
 * object copied out into its buffer and verified there. */
static void get_staged(worker *w, sub *k, size_t node, const uint32_t *pos, size_t n,
                       uint64_t deadline_ns, int stream, uint32_t *layers, uint32_t *fb,
                       size_t *n_fb)
{
    struct kvf__shm_path *p = w->p;
    sconn *s;
    int rc = conn_of(w, node, deadline_ns, &s);
    if (!rc && s->n_rel && drain_releases(s) != 0)
        rc = conn_of(w, node, deadline_ns, &s);
    if (rc) {
        keys_fail(k, pos, n, rc, fb, n_fb);
        return;
    }
    uint8_t *req = malloc(8 + 32 * (size_t)(n < MAX_KEYS ? n : MAX_KEYS));
    uint64_t *offs = malloc((n < MAX_KEYS ? n : MAX_KEYS) * sizeof *offs);
    if (!req || !offs) {
        free(req), free(offs);
        keys_fail(k, pos, n, KVF_ENOMEM, NULL, NULL);
        return;
    }
    for (size_t i = 0; i < n;) {
        uint64_t off = 0;
        size_t j = i;
        kvf__put_u64(req, p->c->o.ns);
        while (j < n && j - i < MAX_KEYS && align_up(off) + k->caps[pos[j]] <= s->stg_len) {
            off = align_up(off);
            uint8_t *it = req + 8 + 32 * (j - i);
            kvf__wire_key_put(it, &k->keys[pos[j]]);
            kvf__put_u64(it + 16, off);
            kvf__put_u64(it + 24, k->caps[pos[j]]);
            offs[j - i] = off;
            off += k->caps[pos[j]];
            j++;
        }
        uint8_t *rep = NULL;
        size_t rlen;
        uint32_t m = (uint32_t)(j - i);
        rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_SHM_GET, m, req, 8 + 32 * (size_t)m, &rep,
                            &rlen, NULL, NULL, deadline_ns, s->err, sizeof s->err);
        if (!rc && rlen != 16 * (size_t)m) {
            free(rep);
            rep = NULL;
            rc = KVF_EPROTO;
        }
        uint64_t got = 0, failed = 0;
        for (size_t x = i; x < j && !rc; x++) {
            uint32_t q = pos[x];
            int st = (int)(int32_t)kvf__get_u32(rep + 16 * (x - i));
            uint64_t len = kvf__get_u64(rep + 16 * (x - i) + 8);
            kvf_obj_info in;
            if (!kvf_err_is_known(st))
                st = KVF_EPROTO;
            else if (!st && len > k->caps[q])
                st = KVF_EPROTO;
            if (!st) {
                if (kvf__obj_copy_verify(k->bufs[q], s->stg + offs[x - i], len, &in) != 0)
                    st = KVF_ECHECKSUM;
                else if (!kvf_key_eq(&in.key, &k->keys[q]))
                    st = KVF_EPROTO;
                else if (stream && *layers && in.layers != *layers)
                    st = KVF_ELAYOUT;
                else if (stream && !*layers)
                    *layers = in.layers;
            }
            k->st[q] = st;
            if (!st) {
                k->out_lens[q] = len;
                got += len;
            }
            failed += st && st != KVF_ENOENT;
        }
        free(rep);
        count(p, 1, got, 0, failed, 0, 0, 0);
        if (rc) {
            if (rc == KVF_ETIMEDOUT)
                kvf__node_mark_down(&p->c->nodes[node]);
            sconn_close(s);
            for (size_t x = i; x < n; x++)
                k->st[pos[x]] = rc;
            break;
        }
        i = j;
    }
    free(req);
    free(offs);
}

/* Whether w may send node its keys now: 0 once connected. A node that is down (a request to it
 * timed out) fails them at once with KVF_EHOSTUNREACH; once its backoff has passed, the first
 * worker to ask probes it with a fresh connection of a short deadline, whose answer brings it up,
 * as the engines do: a hung node costs one deadline, not one per request. */
static int node_ready(worker *w, size_t node, uint64_t deadline_ns)
{
    kvf__node *nd = &w->p->c->nodes[node];
    sconn *s;
    uint64_t until = atomic_load(&nd->down_until);
    if (!until)
        return conn_of(w, node, deadline_ns, &s);
    int idle = 0;
    uint64_t t = kvf__now_ns();
    if (t < until || !atomic_compare_exchange_strong(&nd->probing, &idle, 1))
        return KVF_EHOSTUNREACH;
    sconn_close(&w->cn[node]);
    w->cn[node].retry_at = 0;
    uint64_t d = t + PROBE_NS < deadline_ns ? t + PROBE_NS : deadline_ns;
    int rc = conn_of(w, node, d, &s);
    if (rc) {
        kvf__node_mark_down(nd);
        return w->cn[node].gone ? rc : KVF_EHOSTUNREACH;
    }
    kvf__node_mark_up(nd);
    return 0;
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
    size_t n = k->b.n ? k->b.n : 1;
    uint32_t *pos = malloc(n * sizeof *pos), *fb = malloc(n * sizeof *fb);
    /* A node's keys are leased MAX_KEYS at a time: one entry per request. */
    size_t cap_ls = p->n + k->b.n / MAX_KEYS + 1;
    leased *ls = calloc(cap_ls, sizeof *ls);
    size_t n_fb = 0, nl = 0;
    uint32_t layers = 0;
    uint64_t expired = 0, failed = 0, bytes = 0;
    if (!pos || !fb || !ls) {
        for (size_t i = 0; i < k->b.n; i++)
            k->st[i] = KVF_ENOMEM;
        goto out;
    }
    for (size_t node = 0; node < p->n; node++) {
        size_t m = of_node(c, k, node, pos);
        if (!m)
            continue;
        int rc = node_ready(w, node, deadline_ns);
        if (rc) {
            if (w->cn[node].gone)
                keys_fail(k, pos, m, 0, fb, &n_fb);
            else
                keys_fail(k, pos, m, rc, NULL, NULL);
            continue;
        }
        if (!get) {
            put_node(w, k, node, pos, m, deadline_ns, fb, &n_fb);
        } else if (!p->nodes[node].has_view) {
            get_staged(w, k, node, pos, m, deadline_ns, stream, &layers, fb, &n_fb);
        } else {
            for (size_t from = 0; from < m; from += MAX_KEYS) {
                size_t cnt = m - from < MAX_KEYS ? m - from : MAX_KEYS;
                rc = lease_node(w, k, node, pos + from, cnt, deadline_ns, stream, &layers, &ls[nl]);
                if (rc) {
                    keys_fail(k, pos + from, cnt, rc, NULL, NULL);
                    free(ls[nl].pos), free(ls[nl].info), free(ls[nl].src), free(ls[nl].segoff);
                    memset(&ls[nl], 0, sizeof ls[nl]);
                } else {
                    nl++;
                }
            }
        }
    }
    /* Keys that go over TCP get their sub before any layer is reported: it holds the op's layers
     * back until its own keys have them. */
    if (n_fb) {
        /* The node's socket is gone (a restarted store listens under a new name until the
         * engines' next HELLO says so): these keys go over TCP. */
        sub *t = sub_new(k->a, n_fb, 1);
        if (t) {
            /* The keys are the TCP sub's now: this share reports nothing for them. */
            for (size_t i = 0; i < n_fb; i++) {
                sub_add(t, k->a->pb, k->idx[fb[i]]);
                k->idx[fb[i]] = MOVED;
            }
            count(p, 0, 0, 0, 0, 0, 0, n_fb);
            sub_submit_tcp(c, t);
        } else {
            for (size_t i = 0; i < n_fb; i++)
                k->st[fb[i]] = KVF_ENOMEM;
        }
    }
    if (get && nl)
        bytes = copy_leased(k, ls, nl, stream, layers, &expired, &failed);
    for (size_t g = 0; g < nl; g++)
        release(w, &ls[g], deadline_ns);
    count(p, 0, bytes, 0, failed, expired, 0, 0);
    if (stream && !nl && layers)
        sub_layers(k, layers);
out:
    for (size_t g = 0; g < cap_ls && ls; g++)
        free(ls[g].pos), free(ls[g].info), free(ls[g].src), free(ls[g].segoff);
    free(ls), free(pos), free(fb);
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
            for (size_t i = 0; i < k->b.n; i++)
                k->st[i] = KVF_ECANCELED;
            sub_end(k, KVF_ECANCELED);
            continue;
        }
        run_share(w, k);
    }
    for (size_t i = 0; i < p->n; i++)
        sconn_close(&w->cn[i]);
    return NULL;
}

/* Whether key i of b goes over shared memory: its node serves it, and the object fits a staging
 * region where one is needed. */
static int via_shm(const struct kvf__shm_path *p, const kvf_client *c, const kvf_batch *b, size_t i,
                   int get)
{
    const snode *sn = &p->nodes[kvf_client_node_of(c, &b->keys[i])];
    if (!sn->on)
        return 0;
    if (get)
        return sn->has_view || b->caps[i] <= p->staging;
    return b->lens[i] <= p->staging;
}

static int shm_submit(kvf_client *c, kvf_op *op)
{
    struct kvf__shm_path *p = c->shm;
    const kvf_batch *b = &op->b;
    int get = op->kind == KVF__OPK_GET;
    size_t n_shm = 0;
    uint64_t bytes = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (via_shm(p, c, b, i, get)) {
            n_shm++;
            bytes += get ? b->caps[i] : b->lens[i];
        }
    }
    if (!n_shm) {
        op->transport = "tcp";
        return kvf__path_tcp.submit(c, op);
    }
    agg *a = calloc(1, sizeof *a);
    if (!a)
        return KVF_ENOMEM;
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
        pthread_mutex_destroy(&a->mu);
        free(a);
        return rc;
    }
    uint64_t acc = 0, s = 0;
    for (size_t i = 0; i < b->n; i++) {
        if (!via_shm(p, c, b, i, get)) {
            sub_add(tcp, b, (uint32_t)i);
            continue;
        }
        while (s + 1 < shares && acc >= bytes * (s + 1) / shares && sh[s]->b.n)
            s++;
        sub_add(sh[s], b, (uint32_t)i);
        acc += get ? b->caps[i] : b->lens[i];
    }
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
        sconn_close(&p->ctl[i]);
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
        if (!node_name(c, i, name, sizeof name))
            continue;
        sconn *s = &p->w[0].cn[i];
        int rc = sconn_open(p, i, s, 1, 0, p->staging, deadline);
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
    p->c = c;
    p->n = c->n_nodes;
    p->lease_ms = c->o.shm_lease_ms ? c->o.shm_lease_ms : LEASE_MS;
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
            sconn_close(&p->w[0].cn[i]);
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
                sconn_close(&p->w[i].cn[j]);
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

/* ------------------------------------------------------------------------------------------ */
/* Control requests on the caller's thread */

/* The control connection to node, made where needed: HELLO and AUTH, and where the node's arena
 * is mapped, SHM_MAP of it (no staging region), so that leases may be asked for on it. Its lock
 * held. 0 or the error. */
static int ctl_connect(struct kvf__shm_path *p, size_t node, uint64_t deadline_ns)
{
    sconn *s = &p->ctl[node];
    if (s->fd >= 0)
        return 0;
    int hv = p->nodes[node].has_view;
    return sconn_open(p, node, s, hv, hv, 0, deadline_ns);
}

/* EXISTS of the keys at pos on node over its control connection (made where needed, HELLO and
 * AUTH only), bits into present. 0 or the error (the connection is then closed). */
static int ctl_exists(struct kvf__shm_path *p, size_t node, const kvf_key *keys,
                      const uint32_t *pos, size_t m, uint8_t *present, uint64_t deadline_ns)
{
    kvf_client *c = p->c;
    sconn *s = &p->ctl[node];
    int rc = ctl_connect(p, node, deadline_ns);
    if (rc)
        return rc;
    size_t plen = 8 + 16 * m;
    uint8_t stackbuf[8 + 16 * 256], *req = plen <= sizeof stackbuf ? stackbuf : malloc(plen);
    if (!req)
        return KVF_ENOMEM;
    kvf__put_u64(req, c->o.ns);
    for (size_t i = 0; i < m; i++)
        kvf__wire_key_put(req + 8 + 16 * i, &keys[pos[i]]);
    uint8_t *rep;
    size_t rlen;
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_EXISTS, (uint32_t)m, req, plen, &rep, &rlen,
                        NULL, NULL, deadline_ns, s->err, sizeof s->err);
    if (req != stackbuf)
        free(req);
    if (!rc && rlen != (m + 7) / 8) {
        free(rep);
        rc = KVF_EPROTO;
    }
    if (rc) {
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&c->nodes[node]);
        sconn_close(s);
        return rc;
    }
    for (size_t i = 0; i < m; i++)
        present[pos[i]] = (rep[i / 8] >> (i % 8)) & 1;
    free(rep);
    return 0;
}

int kvf__shm_exists(kvf_client *c, size_t n, const kvf_key *keys, uint8_t *present, int deadline_ms,
                    int *rc)
{
    struct kvf__shm_path *p = c->shm;
    if (!p || !p->ctl || n == 0 || n > KVF_WIRE_MAX_ITEMS)
        return 0;
    /* Every key's node must be one on this host that is up, and its connection free. */
    size_t n_nodes = 0, nodes[8];
    for (size_t i = 0; i < n; i++) {
        size_t nd = kvf_client_node_of(c, &keys[i]);
        size_t j = 0;
        while (j < n_nodes && nodes[j] != nd)
            j++;
        if (j < n_nodes)
            continue;
        if (n_nodes == 8 || !p->nodes[nd].on || atomic_load(&c->nodes[nd].down_until))
            return 0;
        nodes[n_nodes++] = nd;
    }
    size_t locked = 0;
    for (; locked < n_nodes; locked++)
        if (pthread_mutex_trylock(&p->ctl_mu[nodes[locked]]) != 0)
            break;
    int mine = locked == n_nodes;
    uint32_t *pos = mine ? malloc(n * sizeof *pos) : NULL;
    uint64_t deadline_ns =
        kvf__now_ns() + (uint64_t)(deadline_ms > 0 ? deadline_ms : c->o.deadline_ms) * 1000000u;
    *rc = 0;
    if (mine && !pos)
        *rc = KVF_ENOMEM;
    for (size_t j = 0; mine && pos && j < n_nodes && !*rc; j++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if (kvf_client_node_of(c, &keys[i]) == nodes[j])
                pos[m++] = (uint32_t)i;
        *rc = ctl_exists(p, nodes[j], keys, pos, m, present, deadline_ns);
    }
    free(pos);
    for (size_t j = 0; j < locked; j++)
        pthread_mutex_unlock(&p->ctl_mu[nodes[j]]);
    if (mine && *rc && *rc != KVF_ENOMEM)
        return 0; /* the engines try, and say what is wrong */
    return mine;
}

/* ------------------------------------------------------------------------------------------ */
/* Discovery at open */

/* Asks node i over TCP, with a short deadline, for its HELLO; records its socket where it is on
 * this host. Returns 1 when it is, else 0 with the reason appended to why. */
static int discover_one(kvf_client *c, size_t i, char *why, size_t whylen)
{
    kvf__node *N = &c->nodes[i];
    char err[240] = "";
    int fd, rc;
    int ms = c->o.connect_timeout_ms < 500 ? c->o.connect_timeout_ms : 500;
    size_t used = strlen(why);
#define WHY(...)                                              \
    do {                                                      \
        if (used < whylen)                                    \
            snprintf(why + used, whylen - used, __VA_ARGS__); \
    } while (0)
    if ((rc = kvf__tcp_connect(N->host, N->port, ms, &fd, err, sizeof err)) != 0) {
        WHY("; node %zu: %s", i, err);
        return 0;
    }
    kvf__hello h;
    uint64_t id = 0;
    /* HELLO only: authenticating here would cost a signature for nothing. */
    kvf_client probe = *c;
    probe.has_cred = 0;
    rc = kvf__sync_hello(fd, &probe, &id, &h, kvf__now_ns() + (uint64_t)ms * 1000000u, err,
                         sizeof err);
    close(fd);
    if (rc == KVF_EACCES)
        rc = 0; /* the node asks for AUTH: its HELLO said what it serves all the same */
    if (rc) {
        WHY("; node %zu: %s", i, err);
        return 0;
    }
    if (!(h.caps & KVF_CAP_SHM)) {
        WHY("; node %zu serves no shared memory", i);
        return 0;
    }
    if (memcmp(h.boot_id, c->boot_id, 16) != 0) {
        WHY("; node %zu runs on another host (boot id differs)", i);
        return 0;
    }
#undef WHY
    pthread_mutex_lock(&c->shm_mu);
    snprintf(N->shm_name, sizeof N->shm_name, "%s", h.shm_name);
    N->shm_local = 1;
    pthread_mutex_unlock(&c->shm_mu);
    return 1;
}

void kvf__shm_discover(kvf_client *c, char *why, size_t whylen)
{
    why[0] = 0;
    if (kvf__boot_id(c->boot_id) != 0) {
        snprintf(why, whylen, "; this system does not say its boot id");
        return;
    }
    for (size_t i = 0; i < c->n_nodes; i++) {
        if (!kvf__host_is_local(c->nodes[i].host)) {
            size_t used = strlen(why);
            if (used < whylen)
                snprintf(why + used, whylen - used, "; node %zu is not on this host", i);
            continue;
        }
        discover_one(c, i, why, whylen);
    }
}

const kvf__path_ops kvf__path_shm = {
    .name = "shm",
    .submit = shm_submit,
    .close = shm_close,
};

/* ------------------------------------------------------------------------------------------ */
/* Leases for the caller (kvf_client_lease) */

struct kvf_lease {
    kvf_client *c;
    size_t n;
    struct {
        size_t node;
        uint64_t id, epoch;
        const sview *view; /* held: the objects stay mapped until the release */
    } held[KVF_CLIENT_MAX_NODES];
    uint64_t until_ns; /* the earliest of the nodes' leases' ends, less a margin */
};

/* RDMA_GET of the keys at pos (all on node) over its control connection (lock held): each hit's
 * place in the view into objs and lens. The lease's id into l. 0 or the error. */
static int lease_on(struct kvf__shm_path *p, size_t node, const kvf_key *keys, const uint32_t *pos,
                    size_t m, uint32_t lease_ms, const void **objs, uint64_t *lens, int *status,
                    kvf_lease *l, uint64_t deadline_ns)
{
    int rc = ctl_connect(p, node, deadline_ns);
    if (rc)
        return rc;
    sconn *s = &p->ctl[node];
    const sview *sn = s->view;
    if (!sn)
        return KVF_ENOTSUP;
    size_t plen = 16 + 16 * m;
    uint8_t *req = malloc(plen), *rep = NULL;
    if (!req)
        return KVF_ENOMEM;
    kvf__put_u64(req, p->c->o.ns);
    kvf__put_u32(req + 8, lease_ms);
    kvf__put_u32(req + 12, 0);
    for (size_t i = 0; i < m; i++)
        kvf__wire_key_put(req + 16 + 16 * i, &keys[pos[i]]);
    size_t rlen;
    uint64_t t0 = kvf__now_ns();
    rc = kvf__sync_call(s->fd, ++s->next_id, KVF_OP_RDMA_GET, (uint32_t)m, req, plen, &rep, &rlen,
                        NULL, NULL, deadline_ns, s->err, sizeof s->err);
    free(req);
    if (!rc && rlen < 16 + 24 * m) {
        free(rep);
        rc = KVF_EPROTO;
    }
    if (rc) {
        sconn_close(s);
        return rc;
    }
    uint64_t bytes = 0;
    uint64_t until = t0 + (uint64_t)kvf__get_u32(rep + 12) * 1000000u;
    until = until > LEASE_MARGIN_NS ? until - LEASE_MARGIN_NS : 0;
    if (!l->until_ns || until < l->until_ns)
        l->until_ns = until;
    l->held[l->n].node = node;
    l->held[l->n].epoch = atomic_load(&s->epoch);
    pthread_mutex_lock(&p->vmu);
    ((sview *)sn)->refs++;
    pthread_mutex_unlock(&p->vmu);
    l->held[l->n].view = sn;
    l->held[l->n++].id = kvf__get_u64(rep);
    for (size_t i = 0; i < m; i++) {
        const uint8_t *e = rep + 16 + 24 * i;
        int st = (int)(int32_t)kvf__get_u32(e);
        uint64_t a = kvf__get_u64(e + 8), len = kvf__get_u64(e + 16);
        if (!kvf_err_is_known(st))
            st = KVF_EPROTO;
        if (!st && (a < sn->base || a - sn->base > sn->len || len > sn->len - (a - sn->base)))
            st = KVF_EPROTO; /* outside the view: not trusted */
        status[pos[i]] = st;
        objs[pos[i]] = st ? NULL : sn->map + (a - sn->base);
        lens[pos[i]] = st ? 0 : len;
        bytes += st ? 0 : len;
    }
    free(rep);
    /* The caller reads them out of the view: bytes moved over shared memory. */
    count(p, 1, bytes, 0, 0, 0, 0, 0);
    return 0;
}

int kvf_client_lease(kvf_client *c, size_t n, const kvf_key *keys, uint32_t lease_ms,
                     const void **objs, uint64_t *lens, int *status, kvf_lease **out)
{
    if (!out)
        return KVF_EINVAL;
    *out = NULL;
    if (!c || !keys || !objs || !lens || !status || n == 0 || n > KVF_WIRE_MAX_ITEMS)
        return KVF_EINVAL;
    struct kvf__shm_path *p = c->shm;
    if (!p || !p->ctl)
        return KVF_ENOTSUP;
    for (size_t i = 0; i < n; i++)
        if (!p->nodes[kvf_client_node_of(c, &keys[i])].has_view)
            return KVF_ENOTSUP;
    kvf_lease *l = calloc(1, sizeof *l);
    uint32_t *pos = malloc(n * sizeof *pos);
    if (!l || !pos) {
        free(l), free(pos);
        return KVF_ENOMEM;
    }
    l->c = c;
    uint64_t deadline_ns = kvf__now_ns() + (uint64_t)c->o.deadline_ms * 1000000u;
    int rc = 0;
    for (size_t node = 0; node < p->n && !rc; node++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if (kvf_client_node_of(c, &keys[i]) == node)
                pos[m++] = (uint32_t)i;
        if (!m)
            continue;
        if (atomic_load(&c->nodes[node].down_until)) {
            for (size_t i = 0; i < m; i++)
                status[pos[i]] = KVF_EHOSTUNREACH, objs[pos[i]] = NULL, lens[pos[i]] = 0;
            continue;
        }
        pthread_mutex_lock(&p->ctl_mu[node]);
        rc = lease_on(p, node, keys, pos, m, lease_ms ? lease_ms : p->lease_ms, objs, lens, status,
                      l, deadline_ns);
        pthread_mutex_unlock(&p->ctl_mu[node]);
        if (rc == KVF_ETIMEDOUT)
            kvf__node_mark_down(&c->nodes[node]);
    }
    free(pos);
    if (rc) {
        kvf_lease_release(&l);
        return rc;
    }
    *out = l;
    return 0;
}

int kvf_lease_valid(const kvf_lease *l)
{
    if (!l || kvf__now_ns() >= l->until_ns)
        return 0;
    /* A connection closed since (and its leases with it, on the node) ends the lease too. */
    for (size_t i = 0; i < l->n; i++)
        if (atomic_load(&l->c->shm->ctl[l->held[i].node].epoch) != l->held[i].epoch)
            return 0;
    return 1;
}

void kvf_lease_release(kvf_lease **lp)
{
    if (!lp || !*lp)
        return;
    kvf_lease *l = *lp;
    struct kvf__shm_path *p = l->c->shm;
    for (size_t i = 0; p && i < l->n; i++) {
        size_t node = l->held[i].node;
        if (!l->held[i].id) { /* no hit: nothing to release on the node */
            view_put(p, node, l->held[i].view);
            continue;
        }
        uint8_t req[16], *rep;
        size_t rlen;
        kvf__put_u64(req, l->c->o.ns);
        kvf__put_u64(req + 8, l->held[i].id);
        pthread_mutex_lock(&p->ctl_mu[node]);
        sconn *s = &p->ctl[node];
        /* A connection closed since took the lease with it (and a new one numbers its leases
         * afresh: releasing this id there would drop another's). A release that cannot be said
         * costs the node the lease's remaining time, no more. */
        if (atomic_load(&s->epoch) != l->held[i].epoch) {
            pthread_mutex_unlock(&p->ctl_mu[node]);
            view_put(p, node, l->held[i].view);
            continue;
        }
        if (s->fd >= 0 && kvf__sync_call(s->fd, ++s->next_id, KVF_OP_RDMA_RELEASE, 0, req,
                                         sizeof req, &rep, &rlen, NULL, NULL,
                                         kvf__now_ns() + 1000000000ull, s->err, sizeof s->err) == 0)
            free(rep);
        else
            sconn_close(s);
        pthread_mutex_unlock(&p->ctl_mu[node]);
        view_put(p, node, l->held[i].view);
    }
    free(l);
    *lp = NULL;
}
