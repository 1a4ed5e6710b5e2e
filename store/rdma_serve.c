/*
 * The storage node's RDMA listener (rdma_serve.h).
 */
#include "rdma_serve.h"

#include "kvf/error.h"

#include "rdma.h"
#include "cpus.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#define POLL_MS   200
#define MAX_CONNS 1024

struct kvf__rserve {
    kvf__rdma_listener *l;
    uint16_t port;
    uint32_t rkey;
    const kvf_log *log;
    pthread_t th;
    atomic_int stop;
    pthread_mutex_t mu; /* guards conns and the counts */
    kvf__rdma_conn *conns[MAX_CONNS];
    size_t n_conns;
    uint64_t accepted;
};

static void conn_drop(kvf__rserve *r, kvf__rdma_conn *gone)
{
    pthread_mutex_lock(&r->mu);
    for (size_t i = 0; i < r->n_conns; i++) {
        if (r->conns[i] == gone) {
            r->conns[i] = r->conns[--r->n_conns];
            pthread_mutex_unlock(&r->mu);
            kvf__rdma_close(&gone);
            return;
        }
    }
    pthread_mutex_unlock(&r->mu);
}

static void *serve_main(void *arg)
{
    kvf__rserve *r = arg;
    while (!atomic_load(&r->stop)) {
        kvf__rdma_conn *in = NULL, *gone = NULL;
        char err[256] = "";
        int rc = kvf__rdma_listener_poll(r->l, POLL_MS, &in, &gone, err, sizeof err);
        if (rc == KVF_ETIMEDOUT)
            continue;
        if (rc) {
            kvf_warn(r->log, "rdma: a connection was not accepted: %s", err);
            continue;
        }
        if (gone) {
            kvf_info(r->log, "rdma: a client disconnected");
            conn_drop(r, gone);
        }
        if (!in)
            continue;
        pthread_mutex_lock(&r->mu);
        if (r->n_conns == MAX_CONNS) {
            pthread_mutex_unlock(&r->mu);
            kvf_warn(r->log, "rdma: %d connections open: refusing another", MAX_CONNS);
            kvf__rdma_close(&in);
            continue;
        }
        r->conns[r->n_conns++] = in;
        r->accepted++;
        pthread_mutex_unlock(&r->mu);
        kvf_info(r->log, "rdma: accepted a client");
    }
    return NULL;
}

int kvf__rserve_open(const char *host, uint16_t port, void *arena, size_t len, const kvf_log *log,
                     kvf__rserve **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!kvf__rdma_available(err, errlen))
        return kvf__rdma_built() ? KVF_ENODEV : KVF_ENOTSUP;
    kvf__rserve *r = calloc(1, sizeof *r);
    if (!r) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    r->log = log;
    pthread_mutex_init(&r->mu, NULL);
    int rc = kvf__rdma_listen(host, port, NULL, &r->l, &r->port, err, errlen);
    if (!rc)
        rc = kvf__rdma_listener_register(r->l, arena, len, &r->rkey, err, errlen);
    if (!rc && kvf__thread_start(&r->th, serve_main, r) != 0) {
        snprintf(err, errlen, "rdma: cannot start the listener thread");
        rc = KVF_EAGAIN;
    }
    if (rc) {
        kvf__rdma_listener_close(&r->l);
        pthread_mutex_destroy(&r->mu);
        free(r);
        return rc;
    }
    *out = r;
    return 0;
}

uint16_t kvf__rserve_port(const kvf__rserve *r)
{
    return r->port;
}

uint32_t kvf__rserve_rkey(const kvf__rserve *r)
{
    return r->rkey;
}

void kvf__rserve_counts(kvf__rserve *r, uint64_t *open, uint64_t *accepted)
{
    pthread_mutex_lock(&r->mu);
    *open = r->n_conns;
    *accepted = r->accepted;
    pthread_mutex_unlock(&r->mu);
}

void kvf__rserve_close(kvf__rserve **rp)
{
    if (!rp || !*rp)
        return;
    kvf__rserve *r = *rp;
    atomic_store(&r->stop, 1);
    pthread_join(r->th, NULL);
    /* Queue pairs first, then the listener, which holds the arena's registration and the
     * device. */
    for (size_t i = 0; i < r->n_conns; i++)
        kvf__rdma_close(&r->conns[i]);
    kvf__rdma_listener_close(&r->l);
    pthread_mutex_destroy(&r->mu);
    free(r);
    *rp = NULL;
}
