/*
 * COPY on the storage node's server: the objects named are pushed to another node with the client
 * library, by a short-lived worker thread of the request's own, so the loop never waits on another
 * node. The request takes a read reference on each hit, which the worker drops once the target
 * answered; the worker posts the reply to the loop's inbox (server_inbox.c), and the loop sends it
 * if the connection is still open. A connection with a COPY outstanding is not destroyed by its own
 * closing.
 */
#include "server_int.h"

#include "kvf/client.h"
#include "kvf/error.h"

#include "bytes.h"
#include "cache.h"
#include "tcp.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
} copy_job;

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

/* Puts j's hits to its target with a client of its own; misses keep their status (KVF_ENOENT).
 * The hits are moved to the front of j's arrays, *hits says how many, and *hst gets the target's
 * status for each (caller frees; may be NULL on failure). Returns the client's result, with a line
 * of context in err. */
static int copy_push(copy_job *j, uint32_t *hits, int **hst, char *err, size_t errlen)
{
    const char *nodes[1] = {j->addr};
    kvf_client_opts co = {
        .nodes = nodes,
        .n_nodes = 1,
        .ns = j->ns,
        .conns_per_node = 2,
        .deadline_ms = j->deadline_ms,
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
        kvf_batch b = {.n = h,
                       .keys = j->keys,
                       .objs = j->objs,
                       .lens = j->lens,
                       .status = *hst,
                       .deadline_ms = j->deadline_ms};
        rc = kvf_client_put(cl, &b);
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

/* A COPY's thread: pushes, drops the hits' references, posts the reply and frees the job. */
static void *copy_worker(void *arg)
{
    copy_job *j = arg;
    kvf_server *s = j->srv;
    char err[256] = "";
    uint32_t h = 0;
    int *hst = NULL;
    int rc = copy_push(j, &h, &hst, err, sizeof err);
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < h; i++)
        kvf__cache_release_locked(s->o.cache, j->eids[i]);
    kvf__cache_unlock(s->o.cache);
    kvf__inbox_post(j->lp, j->conn_id, copy_reply(j, rc, err, hst), j->done);
    j->done = NULL;
    free(hst);
    copy_job_free(j);
    atomic_fetch_sub(&s->jobs, 1);
    return NULL;
}

/* Starts j's worker, detached; from then on the worker owns j. On failure c gets KVF_EAGAIN, j's
 * references are dropped and j stays the caller's. Returns 0 or KVF_EAGAIN. */
static int copy_start(conn *c, copy_job *j)
{
    kvf_server *s = c->lp->srv;
    int rc = 0;
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    atomic_fetch_add(&s->jobs, 1);
    c->pending_jobs++;
    if (pthread_create(&th, &attr, copy_worker, j) != 0) {
        atomic_fetch_sub(&s->jobs, 1);
        c->pending_jobs--;
        kvf__cache_lock(s->o.cache);
        for (uint32_t i = 0; i < j->n; i++)
            if (!j->status[i])
                kvf__cache_release_locked(s->o.cache, j->eids[i]);
        kvf__cache_unlock(s->o.cache);
        kvf__reply_error(c, KVF_EAGAIN, 0, "copy: cannot start a worker thread");
        rc = KVF_EAGAIN;
    }
    pthread_attr_destroy(&attr);
    return rc;
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
    j->srv = s;
    j->lp = c->lp;
    j->conn_id = c->id;
    j->h = c->h;
    j->ns = kvf__get_u64(c->rbuf);
    j->n = n;
    j->deadline_ms = deadline_ms ? (int)deadline_ms : 10000;
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
