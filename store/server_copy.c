/*
 * COPY on the storage node's server: the objects named are pushed to another node with the client
 * library, by one of a small pool of worker threads, so the loop never waits on another node. Only
 * the peers the node was configured with may be targets (a COPY to anywhere else is KVF_EACCES),
 * a request's deadline is capped (copy_max_deadline_ms), and at most copy_queue jobs wait for
 * a worker (more are KVF_EBUSY at once). The request takes a read reference on each hit, which the
 * worker drops once the target answered; the worker posts the reply to the loop's inbox
 * (server_inbox.c), and the loop sends it if the connection is still open. A connection with a
 * COPY outstanding is not destroyed by its own closing. Closing the server drops the queued jobs
 * and joins the workers before any connection or loop is freed.
 */
#include "server_int.h"

#include "kvf/client.h"
#include "kvf/error.h"

#include "bytes.h"
#include "cache.h"
#include "tcp.h"
#include "cpus.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define COPY_WORKERS_DEFAULT     2
#define COPY_QUEUE_DEFAULT       16
#define COPY_DEADLINE_DEFAULT_MS 10000

/* A COPY's state, handed to its worker. The worker owns it and frees it. */
typedef struct copy_job {
    kvf_server *srv;
    loop *lp;
    uint64_t conn_id;
    kvf_wire_hdr h;
    uint64_t ns;
    char addr[KVF_WIRE_MAX_ADDR + 1];
    int deadline_ms;
    uint32_t n;
    kvf_key *keys;
    uint32_t *eids;
    const void **objs;
    uint64_t *lens;
    int *status;
    deferred *done; /* the inbox entry that carries the reply back: taken with the job, so that
                     * the connection always learns its COPY ended */
    struct copy_job *next; /* in the pool's queue */
} copy_job;

/* A configured target. */
typedef struct copy_peer {
    char host[256];
    uint16_t port;
} copy_peer;

struct kvf__copy_pool {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    copy_job *head, *tail; /* waiting for a worker */
    int queued, queue_max;
    int stop;
    pthread_t *th;
    int nth, nth_max; /* started, wanted */
    copy_peer *peers;
    size_t n_peers;
};

/* Frees j and its arrays. */
static void copy_job_free(copy_job *j)
{
    free(j->keys);
    free(j->eids);
    free(j->objs);
    free(j->lens);
    free(j->status);
    free(j->done);
    free(j);
}

/* A zeroed job with arrays for n keys, or NULL when out of memory. */
static copy_job *copy_job_new(uint32_t n)
{
    copy_job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    j->keys = calloc(n, sizeof *j->keys);
    j->eids = calloc(n, sizeof *j->eids);
    j->objs = calloc(n, sizeof *j->objs);
    j->lens = calloc(n, sizeof *j->lens);
    j->status = calloc(n, sizeof *j->status);
    j->done = calloc(1, sizeof *j->done);
    if (!j->keys || !j->eids || !j->objs || !j->lens || !j->status || !j->done) {
        copy_job_free(j);
        return NULL;
    }
    return j;
}

/* A push in flight: its completion wakes the worker that waits on the pool. */
typedef struct copy_wait {
    kvf__copy_pool *p;
    int done;
} copy_wait;

static void copy_done(kvf_op *op, int status, void *ud)
{
    (void)op, (void)status;
    copy_wait *w = ud;
    pthread_mutex_lock(&w->p->mu);
    w->done = 1;
    pthread_cond_broadcast(&w->p->cv);
    pthread_mutex_unlock(&w->p->mu);
}

/* Puts j's hits to its target with a client of its own; misses keep their status (KVF_ENOENT).
 * The hits are moved to the front of j's arrays, *hits says how many, and *hst gets the target's
 * status for each (caller frees; may be NULL on failure). The worker waits for the push or for the
 * pool to stop, which cancels it (KVF_ECANCELED): a closing server never waits out a deadline.
 * Returns the client's result, with a line of context in err. */
static int copy_push(kvf__copy_pool *p, copy_job *j, uint32_t *hits, int **hst, char *err,
                     size_t errlen)
{
    const char *nodes[1] = {j->addr};
    kvf_client_opts co = {
        .nodes = nodes,
        .n_nodes = 1,
        .ns = j->ns,
        .conns_per_node = 2,
        .deadline_ms = j->deadline_ms,
        /* COPY is an admin's: the objects keep the namespace they are kept under here. */
        .credential = j->srv->o.copy_credential ? j->srv->o.copy_credential : "",
    };
    kvf_client *cl = NULL;
    int rc = kvf_client_open(&cl, &co, err, errlen);
    uint32_t h = 0;
    for (uint32_t i = 0; i < j->n; i++) {
        if (j->status[i])
            continue;
        j->keys[h] = j->keys[i];
        j->objs[h] = j->objs[i];
        j->lens[h] = j->lens[i];
        j->eids[h] = j->eids[i];
        h++;
    }
    *hits = h;
    *hst = calloc(h ? h : 1, sizeof **hst);
    if (!rc && h && *hst) {
        copy_wait w = {.p = p};
        kvf_batch b = {.n = h,
                       .keys = j->keys,
                       .objs = j->objs,
                       .lens = j->lens,
                       .status = *hst,
                       .deadline_ms = j->deadline_ms,
                       .cb = copy_done,
                       .ud = &w};
        kvf_op *op = NULL;
        rc = kvf_client_put_async(cl, &b, &op);
        if (!rc) {
            pthread_mutex_lock(&p->mu);
            while (!w.done && !p->stop)
                pthread_cond_wait(&p->cv, &p->mu);
            int done = w.done;
            pthread_mutex_unlock(&p->mu);
            if (!done)
                kvf_client_close(&cl); /* fails the push with KVF_ECANCELED, calling copy_done */
            rc = kvf_op_wait(op);
            kvf_op_free(&op);
        }
    } else if (!rc && !*hst) {
        rc = KVF_ENOMEM;
    }
    kvf_client_close(&cl);
    return rc;
}

/* The reply to j's request: the error rc with its context err, or one status per key, the hits'
 * from hst spread back over the request's order. NULL when out of memory. */
static out_msg *copy_reply(const copy_job *j, int rc, const char *err, const int *hst)
{
    out_msg *m = kvf__msg_new(1, 0, KVF_WIRE_HEADER_LEN + 4 * (size_t)j->n + 256);
    if (!m)
        return NULL;
    if (rc) {
        int n = snprintf((char *)m->buf + KVF_WIRE_HEADER_LEN, 256, "copy to %s: %s%s%s", j->addr,
                         kvf_strerror(rc), err[0] ? ": " : "", err);
        n = n < 0 ? 0 : n > 255 ? 255 : n; /* what did not fit was cut off */
        kvf__reply_hdr(m->buf, &j->h, rc, 0, 0, (uint64_t)n);
        m->iov[0].iov_len = KVF_WIRE_HEADER_LEN + (size_t)n;
    } else {
        uint32_t k = 0;
        for (uint32_t i = 0; i < j->n; i++) {
            int st = j->status[i] ? j->status[i] : hst[k++];
            kvf__put_u32(m->buf + KVF_WIRE_HEADER_LEN + 4 * (size_t)i, (uint32_t)st);
        }
        kvf__reply_hdr(m->buf, &j->h, 0, 0, j->n, 4 * (uint64_t)j->n);
        m->iov[0].iov_len = KVF_WIRE_HEADER_LEN + 4 * (size_t)j->n;
    }
    m->iov[0].iov_base = m->buf;
    m->iovcnt = 1;
    return m;
}

/* Drops the read references j took on its hits. */
static void copy_release_refs(kvf_server *s, const copy_job *j)
{
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < j->n; i++)
        if (!j->status[i])
            kvf__cache_release_locked(s->o.cache, j->eids[i]);
    kvf__cache_unlock(s->o.cache);
}

/* Runs j: pushes, drops the hits' references, posts the reply and frees the job. */
static void copy_run(copy_job *j)
{
    kvf_server *s = j->srv;
    char err[256] = "";
    uint32_t h = 0;
    int *hst = NULL;
    int rc = copy_push(s->copy, j, &h, &hst, err, sizeof err);
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < h; i++)
        kvf__cache_release_locked(s->o.cache, j->eids[i]);
    kvf__cache_unlock(s->o.cache);
    kvf__inbox_post(j->lp, j->conn_id, copy_reply(j, rc, err, hst), j->done);
    j->done = NULL;
    free(hst);
    copy_job_free(j);
}

/* A worker of the pool: runs queued jobs until the pool stops. */
static void *copy_worker(void *arg)
{
    kvf__copy_pool *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->stop && !p->head)
            pthread_cond_wait(&p->cv, &p->mu);
        if (p->stop)
            break;
        copy_job *j = p->head;
        p->head = j->next;
        if (!p->head)
            p->tail = NULL;
        p->queued--;
        pthread_mutex_unlock(&p->mu);
        copy_run(j);
        pthread_mutex_lock(&p->mu);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

/* Queues j for a worker, starting the workers the first time; from then on the pool owns j. On
 * failure c gets the error (KVF_EBUSY: the queue is full; KVF_EAGAIN: no worker could start),
 * j's references are dropped and j stays the caller's. Returns 0 or that error. */
static int copy_start(conn *c, copy_job *j)
{
    kvf_server *s = c->lp->srv;
    kvf__copy_pool *p = s->copy;
    int rc = 0;
    pthread_mutex_lock(&p->mu);
    while (p->nth < p->nth_max && !p->stop &&
           kvf__thread_start(&p->th[p->nth], copy_worker, p) == 0)
        p->nth++;
    if (p->stop || p->nth == 0) {
        rc = KVF_EAGAIN;
    } else if (p->queued >= p->queue_max) {
        rc = KVF_EBUSY;
    } else {
        j->next = NULL;
        if (p->tail)
            p->tail->next = j;
        else
            p->head = j;
        p->tail = j;
        p->queued++;
        c->pending_jobs++;
        pthread_cond_broadcast(&p->cv); /* workers waiting on a push share the condition */
    }
    int queued = p->queued;
    pthread_mutex_unlock(&p->mu);
    if (rc) {
        copy_release_refs(s, j);
        if (rc == KVF_EBUSY)
            kvf__reply_error(c, rc, 0, "copy: %d copies already wait for a worker; try again later",
                             queued);
        else
            kvf__reply_error(c, rc, 0, "copy: no worker thread could start");
    }
    return rc;
}

/* Whether the node was configured with the target addr (host compared without case). */
static int copy_peer_known(const kvf__copy_pool *p, const char *host, uint16_t port)
{
    for (size_t i = 0; i < p->n_peers; i++)
        if (p->peers[i].port == port && !strcasecmp(p->peers[i].host, host))
            return 1;
    return 0;
}

int kvf__copy_target_ok(const kvf_server *s, const uint8_t *payload)
{
    uint32_t alen = kvf__get_u32(payload + 8);
    char addr[KVF_WIRE_MAX_ADDR + 1], host[256];
    uint16_t port;
    if (!s->copy || alen > KVF_WIRE_MAX_ADDR)
        return 0;
    memcpy(addr, payload + 16, alen);
    addr[alen] = '\0';
    return kvf__addr_parse(addr, host, sizeof host, &port) == 0 &&
           copy_peer_known(s->copy, host, port);
}

int kvf__copy_pool_open(kvf_server *s, char *err, size_t errlen)
{
    kvf__copy_pool *p = calloc(1, sizeof *p);
    if (!p)
        return KVF_ENOMEM;
    s->copy = p;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->nth_max = s->o.copy_workers > 0 ? s->o.copy_workers : COPY_WORKERS_DEFAULT;
    p->queue_max = s->o.copy_queue > 0 ? s->o.copy_queue : COPY_QUEUE_DEFAULT;
    p->th = calloc((size_t)p->nth_max, sizeof *p->th);
    p->peers = calloc(s->o.n_copy_peers ? s->o.n_copy_peers : 1, sizeof *p->peers);
    if (!p->th || !p->peers)
        return KVF_ENOMEM;
    for (size_t i = 0; i < s->o.n_copy_peers; i++) {
        const char *a = s->o.copy_peers[i];
        if (!a ||
            kvf__addr_parse(a, p->peers[i].host, sizeof p->peers[i].host, &p->peers[i].port) != 0) {
            snprintf(err, errlen, "copy peer: expected HOST:PORT, got \"%s\"", a ? a : "");
            return KVF_EINVAL;
        }
        p->n_peers++;
    }
    s->o.copy_peers = NULL; /* the caller's strings are not kept */
    return 0;
}

void kvf__copy_pool_close(kvf_server *s)
{
    kvf__copy_pool *p = s->copy;
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    copy_job *q = p->head;
    p->head = p->tail = NULL;
    p->queued = 0;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nth; i++)
        pthread_join(p->th[i], NULL);
    while (q) { /* never started: their connections are closed with the server */
        copy_job *next = q->next;
        copy_release_refs(s, q);
        copy_job_free(q);
        q = next;
    }
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->th);
    free(p->peers);
    free(p);
    s->copy = NULL;
}

void kvf__req_copy(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint32_t n = c->h.item_count;
    uint32_t alen = kvf__get_u32(c->rbuf + 8);
    uint32_t deadline_ms = kvf__get_u32(c->rbuf + 12);
    const uint8_t *keys = c->rbuf + 16 + ((alen + 7u) & ~7u);
    copy_job *j = copy_job_new(n);
    if (!j) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    memcpy(j->addr, c->rbuf + 16, alen);
    j->addr[alen] = '\0';
    char host[256];
    uint16_t port;
    if (kvf__addr_parse(j->addr, host, sizeof host, &port) != 0) {
        kvf__reply_error(c, KVF_EINVAL, 0, "copy: bad target address \"%s\"", j->addr);
        goto out_free_job;
    }
    if (!copy_peer_known(s->copy, host, port)) {
        kvf__reply_error(c, KVF_EACCES, 0,
                         "copy: %s is not a peer of this node (kvf-store --peer HOST:PORT names "
                         "the nodes COPY may push to)",
                         j->addr);
        goto out_free_job;
    }
    j->srv = s;
    j->lp = c->lp;
    j->conn_id = c->id;
    j->h = c->h;
    j->ns = kvf__get_u64(c->rbuf);
    j->n = n;
    uint32_t cap = s->o.copy_max_deadline_ms;
    j->deadline_ms = (int)(!deadline_ms ? COPY_DEADLINE_DEFAULT_MS : deadline_ms);
    if ((uint32_t)j->deadline_ms > cap)
        j->deadline_ms = (int)cap;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        j->keys[i] = kvf__wire_key_get(keys + 16 * (size_t)i);
        const uint8_t *p;
        j->status[i] =
            kvf__cache_acquire_locked(s->o.cache, j->ns, &j->keys[i], &j->eids[i], &p, &j->lens[i]);
        j->objs[i] = p;
    }
    kvf__cache_unlock(s->o.cache);
    if (copy_start(c, j) != 0)
        goto out_free_job;
    return; /* the worker owns j now */

out_free_job:
    copy_job_free(j);
}
