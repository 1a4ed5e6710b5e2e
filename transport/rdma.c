/*
 * RDMA transport (rdma.h, docs/rdma.md).
 */
#include "rdma.h"

#include "kvf/error.h"

#include <stdio.h>
#include <string.h>

#ifndef KVF_HAVE_RDMA

int kvf__rdma_available(char *reason, size_t len)
{
    if (reason)
        snprintf(reason, len, "this build has no RDMA (libibverbs/librdmacm headers absent)");
    return 0;
}

int kvf__rdma_built(void)
{
    return 0;
}

static int no_rdma(char *err, size_t errlen)
{
    snprintf(err, errlen, "this build has no RDMA (libibverbs/librdmacm headers absent)");
    return KVF_ENOTSUP;
}

int kvf__rdma_connect(const char *host, uint16_t port, const kvf__rdma_opts *o,
                      kvf__rdma_conn **out, char *err, size_t errlen)
{
    (void)host, (void)port, (void)o;
    *out = NULL;
    return no_rdma(err, errlen);
}

int kvf__rdma_listen(const char *host, uint16_t port, const kvf__rdma_opts *o,
                     kvf__rdma_listener **out, uint16_t *bound, char *err, size_t errlen)
{
    (void)host, (void)port, (void)o, (void)bound;
    *out = NULL;
    return no_rdma(err, errlen);
}

int kvf__rdma_accept(kvf__rdma_listener *l, int timeout_ms, kvf__rdma_conn **out, char *err,
                     size_t errlen)
{
    (void)l, (void)timeout_ms;
    *out = NULL;
    return no_rdma(err, errlen);
}

int kvf__rdma_listener_register(kvf__rdma_listener *l, void *addr, size_t len, uint32_t *rkey,
                                char *err, size_t errlen)
{
    (void)l, (void)addr, (void)len, (void)rkey;
    return no_rdma(err, errlen);
}

int kvf__rdma_listener_poll(kvf__rdma_listener *l, int timeout_ms, kvf__rdma_conn **accepted,
                            kvf__rdma_conn **gone, char *err, size_t errlen)
{
    (void)l, (void)timeout_ms;
    *accepted = *gone = NULL;
    return no_rdma(err, errlen);
}

void kvf__rdma_listener_close(kvf__rdma_listener **l)
{
    if (l)
        *l = NULL;
}

int kvf__rdma_register(kvf__rdma_conn *c, void *addr, size_t len, int remote, uint32_t *lkey,
                       uint32_t *rkey)
{
    (void)c, (void)addr, (void)len, (void)remote, (void)lkey, (void)rkey;
    return KVF_ENOTSUP;
}

int kvf__rdma_transfer(kvf__rdma_conn *c, int write, kvf__rdma_op *ops, size_t n, int timeout_ms)
{
    (void)c, (void)write, (void)timeout_ms;
    for (size_t i = 0; i < n; i++)
        ops[i].status = KVF_ENOTSUP;
    return KVF_ENOTSUP;
}

int kvf__rdma_transfer_progress(kvf__rdma_conn *c, int write, kvf__rdma_op *ops, size_t n,
                                int timeout_ms, void (*progress)(void *ctx, size_t done), void *ctx)
{
    (void)progress, (void)ctx;
    return kvf__rdma_transfer(c, write, ops, n, timeout_ms);
}

int kvf__rdma_broken(const kvf__rdma_conn *c)
{
    (void)c;
    return 1;
}

void kvf__rdma_close(kvf__rdma_conn **c)
{
    if (c)
        *c = NULL;
}

int kvf__rdma_wc_error(int wc_status)
{
    return wc_status ? KVF_EIO : 0;
}

void kvf__rdma_stats_get(const kvf__rdma_conn *c, kvf__rdma_stats *out)
{
    (void)c;
    memset(out, 0, sizeof *out);
}

#else /* KVF_HAVE_RDMA */

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <rdma/rdma_cma.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

#define MAX_DEVICES 16
#define POLL_BATCH  16
#define CQ_ENTRIES  4096

/* What one device shares between its connections: the PD (so the store's arena and the client's
 * staging are registered once), the CQ, the registrations, and the lock that gives one transfer
 * at a time the CQ. */
typedef struct mr_ent {
    uintptr_t addr;
    size_t len;
    int remote;
    struct ibv_mr *mr;
} mr_ent;

typedef struct dev {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_cq *cq;
    int refs;
    pthread_mutex_t xfer;
    uint32_t gen; /* transfer generation, in the high half of every wr_id */
    mr_ent *mrs;
    size_t n_mrs, cap_mrs;
} dev;

static dev g_devs[MAX_DEVICES];
static pthread_mutex_t g_devs_mu = PTHREAD_MUTEX_INITIALIZER;

struct kvf__rdma_conn {
    struct rdma_event_channel *ch; /* NULL for an accepted connection (the listener's) */
    struct rdma_cm_id *id;
    dev *d;
    uint32_t qdepth, signal_every, chain_max;
    int connected, broken;
    kvf__rdma_stats st;
    struct ibv_send_wr *wr; /* one chain's requests and gather entries, made once */
    struct ibv_sge *sge;
    struct ibv_mr *hot; /* the registration the last op fell in: most ops of a batch share
                         * one staging region, and then need neither the lock nor a search */
};

struct kvf__rdma_listener {
    struct rdma_event_channel *ch;
    struct rdma_cm_id *id;
    kvf__rdma_opts o;
    dev *d; /* held while a region is registered through the listener */
};

static void opts_fill(kvf__rdma_opts *d, const kvf__rdma_opts *o)
{
    *d = o ? *o : (kvf__rdma_opts){0};
    d->queue_depth = d->queue_depth ? d->queue_depth : 128;
    d->signal_every = d->signal_every ? d->signal_every : 16;
    d->chain_max = d->chain_max ? d->chain_max : 32;
    d->timeout_ms = d->timeout_ms ? d->timeout_ms : 2000;
    if (d->signal_every > d->queue_depth)
        d->signal_every = d->queue_depth;
}

int kvf__rdma_wc_error(int s)
{
    switch ((enum ibv_wc_status)s) {
    case IBV_WC_SUCCESS:
        return 0;
    case IBV_WC_WR_FLUSH_ERR:
        return KVF_ECONNRESET; /* the queue pair went to the error state */
    case IBV_WC_REM_ACCESS_ERR:
    case IBV_WC_REM_INV_REQ_ERR:
        return KVF_EACCES; /* a bad rkey, a range outside the region, or a region gone */
    case IBV_WC_RETRY_EXC_ERR:
    case IBV_WC_RNR_RETRY_EXC_ERR:
        return KVF_ETIMEDOUT; /* the peer stopped answering */
    case IBV_WC_LOC_PROT_ERR:
    case IBV_WC_LOC_ACCESS_ERR:
    case IBV_WC_LOC_LEN_ERR:
        return KVF_EINVAL; /* our own registration or length was wrong */
    case IBV_WC_REM_OP_ERR:
    case IBV_WC_FATAL_ERR:
    default:
        return KVF_EIO;
    }
}

int kvf__rdma_built(void)
{
    return 1;
}

int kvf__rdma_available(char *reason, size_t len)
{
    int n = 0;
    struct ibv_device **list = ibv_get_device_list(&n);
    if (list)
        ibv_free_device_list(list);
    if (n > 0)
        return 1;
    if (reason)
        snprintf(reason, len, "no RDMA device");
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Devices */

static dev *dev_get(struct ibv_context *ctx, char *err, size_t errlen)
{
    pthread_mutex_lock(&g_devs_mu);
    dev *d = NULL, *fresh = NULL;
    for (int i = 0; i < MAX_DEVICES; i++) {
        if (g_devs[i].refs && g_devs[i].ctx == ctx)
            d = &g_devs[i];
        else if (!g_devs[i].refs && !fresh)
            fresh = &g_devs[i];
    }
    if (!d && fresh) {
        struct ibv_pd *pd = ibv_alloc_pd(ctx);
        struct ibv_cq *cq = pd ? ibv_create_cq(ctx, CQ_ENTRIES, NULL, NULL, 0) : NULL;
        if (!pd || !cq) {
            snprintf(err, errlen, "rdma: cannot allocate a %s on the device",
                     pd ? "completion queue" : "protection domain");
            if (pd)
                ibv_dealloc_pd(pd);
        } else {
            memset(fresh, 0, sizeof *fresh);
            fresh->ctx = ctx;
            fresh->pd = pd;
            fresh->cq = cq;
            pthread_mutex_init(&fresh->xfer, NULL);
            d = fresh;
        }
    } else if (!d) {
        snprintf(err, errlen, "rdma: more than %d devices", MAX_DEVICES);
    }
    if (d)
        d->refs++;
    pthread_mutex_unlock(&g_devs_mu);
    return d;
}

static void dev_put(dev *d)
{
    pthread_mutex_lock(&g_devs_mu);
    if (--d->refs == 0) {
        for (size_t i = 0; i < d->n_mrs; i++)
            ibv_dereg_mr(d->mrs[i].mr);
        free(d->mrs);
        ibv_destroy_cq(d->cq);
        ibv_dealloc_pd(d->pd);
        pthread_mutex_destroy(&d->xfer);
        memset(d, 0, sizeof *d);
    }
    pthread_mutex_unlock(&g_devs_mu);
}

/* ------------------------------------------------------------------------------------------ */
/* Connection management */

/* Reads the next event of ch, waiting up to timeout_ms: its type, status and id (acknowledged).
 * 0, KVF_ETIMEDOUT (err untouched) or KVF_EIO. */
static int next_event(struct rdma_event_channel *ch, int timeout_ms, enum rdma_cm_event_type *type,
                      int *status, struct rdma_cm_id **id, char *err, size_t errlen)
{
    struct pollfd pf = {.fd = ch->fd, .events = POLLIN};
    if (poll(&pf, 1, timeout_ms) <= 0)
        return KVF_ETIMEDOUT;
    struct rdma_cm_event *ev;
    if (rdma_get_cm_event(ch, &ev) != 0) {
        snprintf(err, errlen, "rdma: reading the event channel: %s", strerror(errno));
        return KVF_EIO;
    }
    *type = ev->event;
    *status = ev->status;
    *id = ev->id;
    rdma_ack_cm_event(ev);
    return 0;
}

/* Waits for the next event on ch, which must be `want`. *ev_id gets the event's id (for a
 * connection request). */
static int wait_event(struct rdma_event_channel *ch, enum rdma_cm_event_type want, int timeout_ms,
                      struct rdma_cm_id **ev_id, char *err, size_t errlen)
{
    enum rdma_cm_event_type got;
    int status;
    struct rdma_cm_id *id;
    int rc = next_event(ch, timeout_ms, &got, &status, &id, err, errlen);
    if (rc == KVF_ETIMEDOUT)
        snprintf(err, errlen, "rdma: no %s within %d ms", rdma_event_str(want), timeout_ms);
    if (rc)
        return rc;
    if (ev_id)
        *ev_id = id;
    if (got == want)
        return 0;
    snprintf(err, errlen, "rdma: %s (status %d) while waiting for %s", rdma_event_str(got), status,
             rdma_event_str(want));
    switch (got) {
    case RDMA_CM_EVENT_REJECTED:
        return KVF_ECONNREFUSED;
    case RDMA_CM_EVENT_ADDR_ERROR:
    case RDMA_CM_EVENT_ROUTE_ERROR:
        return KVF_ENODEV; /* no RDMA device routes there */
    case RDMA_CM_EVENT_UNREACHABLE:
        return KVF_EHOSTUNREACH;
    case RDMA_CM_EVENT_CONNECT_ERROR:
        return KVF_ECONNREFUSED;
    default:
        return KVF_EPROTO;
    }
}

static int resolve(const char *host, uint16_t port, struct addrinfo **ai, char *err, size_t errlen)
{
    char ps[8];
    snprintf(ps, sizeof ps, "%u", (unsigned)port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    int rc = getaddrinfo(host, ps, &hints, ai);
    if (rc) {
        snprintf(err, errlen, "rdma: %s: %s", host, gai_strerror(rc));
        return KVF_EHOSTUNREACH;
    }
    return 0;
}

/* The queue pair on the device's PD and CQ: reliable connected, qdepth send slots, no signal on
 * every request (sq_sig_all 0: selective signalling). */
static int make_qp(kvf__rdma_conn *c, char *err, size_t errlen)
{
    c->d = dev_get(c->id->verbs, err, errlen);
    if (!c->d)
        return KVF_ENOMEM;
    struct ibv_qp_init_attr qa = {
        .send_cq = c->d->cq,
        .recv_cq = c->d->cq,
        .cap = {.max_send_wr = c->qdepth, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1},
        .qp_type = IBV_QPT_RC,
        .sq_sig_all = 0};
    if (rdma_create_qp(c->id, c->d->pd, &qa) != 0) {
        snprintf(err, errlen, "rdma: cannot create a queue pair of depth %u: %s", c->qdepth,
                 strerror(errno));
        dev_put(c->d);
        c->d = NULL;
        return KVF_ENOMEM;
    }
    return 0;
}

static struct rdma_conn_param conn_param(void)
{
    return (struct rdma_conn_param){
        .initiator_depth = 16, .responder_resources = 16, .retry_count = 7, .rnr_retry_count = 7};
}

static kvf__rdma_conn *conn_new(const kvf__rdma_opts *o)
{
    kvf__rdma_conn *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->qdepth = o->queue_depth;
    c->signal_every = o->signal_every;
    c->chain_max = o->chain_max;
    c->wr = calloc(c->chain_max, sizeof *c->wr);
    c->sge = calloc(c->chain_max, sizeof *c->sge);
    if (!c->wr || !c->sge) {
        free(c->wr), free(c->sge), free(c);
        return NULL;
    }
    return c;
}

int kvf__rdma_connect(const char *host, uint16_t port, const kvf__rdma_opts *oin,
                      kvf__rdma_conn **out, char *err, size_t errlen)
{
    *out = NULL;
    kvf__rdma_opts o;
    opts_fill(&o, oin);
    struct addrinfo *ai = NULL;
    int rc = resolve(host, port, &ai, err, errlen);
    if (rc)
        return rc;
    kvf__rdma_conn *c = conn_new(&o);
    if (!c) {
        freeaddrinfo(ai);
        return KVF_ENOMEM;
    }
    c->ch = rdma_create_event_channel();
    if (!c->ch || rdma_create_id(c->ch, &c->id, c, RDMA_PS_TCP) != 0) {
        snprintf(err, errlen, "rdma: cannot create a connection id: %s", strerror(errno));
        rc = KVF_ENODEV;
        goto fail;
    }
    if (rdma_resolve_addr(c->id, NULL, ai->ai_addr, o.timeout_ms) != 0) {
        snprintf(err, errlen, "rdma: %s: no RDMA route to the address: %s", host, strerror(errno));
        rc = KVF_ENODEV;
        goto fail;
    }
    if ((rc = wait_event(c->ch, RDMA_CM_EVENT_ADDR_RESOLVED, o.timeout_ms, NULL, err, errlen)))
        goto fail;
    if (rdma_resolve_route(c->id, o.timeout_ms) != 0) {
        snprintf(err, errlen, "rdma: %s: cannot resolve the route: %s", host, strerror(errno));
        rc = KVF_ENODEV;
        goto fail;
    }
    if ((rc = wait_event(c->ch, RDMA_CM_EVENT_ROUTE_RESOLVED, o.timeout_ms, NULL, err, errlen)))
        goto fail;
    if ((rc = make_qp(c, err, errlen)))
        goto fail;
    struct rdma_conn_param cp = conn_param();
    if (rdma_connect(c->id, &cp) != 0) {
        snprintf(err, errlen, "rdma: connect to %s:%u: %s", host, (unsigned)port, strerror(errno));
        rc = KVF_ECONNREFUSED;
        goto fail;
    }
    if ((rc = wait_event(c->ch, RDMA_CM_EVENT_ESTABLISHED, o.timeout_ms, NULL, err, errlen)))
        goto fail;
    c->connected = 1;
    freeaddrinfo(ai);
    *out = c;
    return 0;
fail:
    freeaddrinfo(ai);
    kvf__rdma_close(&c);
    return rc;
}

int kvf__rdma_listen(const char *host, uint16_t port, const kvf__rdma_opts *oin,
                     kvf__rdma_listener **out, uint16_t *bound, char *err, size_t errlen)
{
    *out = NULL;
    kvf__rdma_listener *l = calloc(1, sizeof *l);
    if (!l)
        return KVF_ENOMEM;
    opts_fill(&l->o, oin);
    struct addrinfo *ai = NULL;
    int rc = resolve(host, port, &ai, err, errlen);
    if (rc) {
        free(l);
        return rc;
    }
    l->ch = rdma_create_event_channel();
    if (!l->ch || rdma_create_id(l->ch, &l->id, l, RDMA_PS_TCP) != 0) {
        snprintf(err, errlen, "rdma: cannot create a connection id: %s", strerror(errno));
        rc = KVF_ENODEV;
    } else if (rdma_bind_addr(l->id, ai->ai_addr) != 0) {
        snprintf(err, errlen, "rdma: bind %s:%u: %s", host, (unsigned)port, strerror(errno));
        rc = errno == EADDRINUSE ? KVF_EADDRINUSE : KVF_ENODEV;
    } else if (rdma_listen(l->id, 64) != 0) {
        snprintf(err, errlen, "rdma: listen: %s", strerror(errno));
        rc = KVF_EIO;
    }
    freeaddrinfo(ai);
    if (rc) {
        kvf__rdma_listener_close(&l);
        return rc;
    }
    if (bound)
        *bound = ntohs(rdma_get_src_port(l->id));
    *out = l;
    return 0;
}

static struct ibv_mr *mr_get(dev *d, void *addr, size_t len, int remote);

/* Accepts the connection request of id: its queue pair, the accept, the ESTABLISHED event. The
 * id's context becomes the connection, so that its DISCONNECTED event names it. */
static int accept_id(kvf__rdma_listener *l, struct rdma_cm_id *id, kvf__rdma_conn **out, char *err,
                     size_t errlen)
{
    int rc;
    kvf__rdma_conn *c = conn_new(&l->o);
    if (!c) {
        rdma_reject(id, NULL, 0);
        rdma_destroy_id(id);
        return KVF_ENOMEM;
    }
    c->id = id;
    id->context = c;
    struct rdma_conn_param cp = conn_param();
    if ((rc = make_qp(c, err, errlen)))
        goto fail;
    if (rdma_accept(c->id, &cp) != 0) {
        snprintf(err, errlen, "rdma: accept: %s", strerror(errno));
        rc = KVF_EIO;
        goto fail;
    }
    if ((rc = wait_event(l->ch, RDMA_CM_EVENT_ESTABLISHED, l->o.timeout_ms, NULL, err, errlen)))
        goto fail;
    c->connected = 1;
    *out = c;
    return 0;
fail:
    kvf__rdma_close(&c);
    return rc;
}

int kvf__rdma_accept(kvf__rdma_listener *l, int timeout_ms, kvf__rdma_conn **out, char *err,
                     size_t errlen)
{
    *out = NULL;
    struct rdma_cm_id *id = NULL;
    int rc = wait_event(l->ch, RDMA_CM_EVENT_CONNECT_REQUEST, timeout_ms, &id, err, errlen);
    if (rc)
        return rc;
    return accept_id(l, id, out, err, errlen);
}

int kvf__rdma_listener_register(kvf__rdma_listener *l, void *addr, size_t len, uint32_t *rkey,
                                char *err, size_t errlen)
{
    if (!l->id->verbs) {
        snprintf(err, errlen,
                 "rdma: the listening address belongs to no RDMA device (listen on the address of "
                 "the RDMA interface, not the wildcard)");
        return KVF_ENODEV;
    }
    if (!l->d && !(l->d = dev_get(l->id->verbs, err, errlen)))
        return KVF_ENOMEM;
    pthread_mutex_lock(&g_devs_mu);
    struct ibv_mr *mr = mr_get(l->d, addr, len, 1);
    pthread_mutex_unlock(&g_devs_mu);
    if (!mr) {
        int e = errno;
        snprintf(err, errlen, "rdma: cannot register %zu bytes: %s (memlock limit? ulimit -l)", len,
                 strerror(e));
        return e == ENOMEM ? KVF_ENOMEM : KVF_EIO;
    }
    *rkey = mr->rkey;
    return 0;
}

int kvf__rdma_listener_poll(kvf__rdma_listener *l, int timeout_ms, kvf__rdma_conn **accepted,
                            kvf__rdma_conn **gone, char *err, size_t errlen)
{
    *accepted = *gone = NULL;
    enum rdma_cm_event_type type;
    int status;
    struct rdma_cm_id *id;
    int rc = next_event(l->ch, timeout_ms, &type, &status, &id, err, errlen);
    if (rc)
        return rc;
    switch (type) {
    case RDMA_CM_EVENT_CONNECT_REQUEST:
        return accept_id(l, id, accepted, err, errlen);
    case RDMA_CM_EVENT_DISCONNECTED:
        /* An accepted connection's id carries the connection; the listener's own does not. */
        if (id != l->id)
            *gone = id->context;
        return 0;
    default:
        return 0; /* established, timewait exit, ...: nothing to do */
    }
}

void kvf__rdma_listener_close(kvf__rdma_listener **lp)
{
    if (!lp || !*lp)
        return;
    kvf__rdma_listener *l = *lp;
    if (l->d)
        dev_put(l->d);
    if (l->id)
        rdma_destroy_id(l->id);
    if (l->ch)
        rdma_destroy_event_channel(l->ch);
    free(l);
    *lp = NULL;
}

void kvf__rdma_close(kvf__rdma_conn **cp)
{
    if (!cp || !*cp)
        return;
    kvf__rdma_conn *c = *cp;
    if (c->connected)
        rdma_disconnect(c->id);
    if (c->d) {
        rdma_destroy_qp(c->id);
        dev_put(c->d); /* the last user deregisters, then destroys the CQ and the PD */
    }
    if (c->id)
        rdma_destroy_id(c->id);
    if (c->ch)
        rdma_destroy_event_channel(c->ch);
    free(c->wr), free(c->sge);
    free(c);
    *cp = NULL;
}

int kvf__rdma_broken(const kvf__rdma_conn *c)
{
    return c->broken;
}

void kvf__rdma_stats_get(const kvf__rdma_conn *c, kvf__rdma_stats *out)
{
    *out = c->st;
}

/* ------------------------------------------------------------------------------------------ */
/* Registration cache */

static struct ibv_mr *mr_find(dev *d, uintptr_t a, size_t len, int remote)
{
    for (size_t i = 0; i < d->n_mrs; i++) {
        const mr_ent *m = &d->mrs[i];
        if (a >= m->addr && a + len <= m->addr + m->len && (m->remote || !remote))
            return m->mr;
    }
    return NULL;
}

static struct ibv_mr *mr_get(dev *d, void *addr, size_t len, int remote)
{
    struct ibv_mr *mr = mr_find(d, (uintptr_t)addr, len, remote);
    if (mr)
        return mr;
    if (d->n_mrs == d->cap_mrs) {
        size_t cap = d->cap_mrs ? d->cap_mrs * 2 : 16;
        mr_ent *nm = realloc(d->mrs, cap * sizeof *nm);
        if (!nm)
            return NULL;
        d->mrs = nm;
        d->cap_mrs = cap;
    }
    int access = remote ? IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE
                        : IBV_ACCESS_LOCAL_WRITE;
    mr = ibv_reg_mr(d->pd, addr, len, access);
    if (!mr)
        return NULL;
    d->mrs[d->n_mrs++] = (mr_ent){(uintptr_t)addr, len, remote, mr};
    return mr;
}

int kvf__rdma_register(kvf__rdma_conn *c, void *addr, size_t len, int remote, uint32_t *lkey,
                       uint32_t *rkey)
{
    pthread_mutex_lock(&g_devs_mu);
    struct ibv_mr *mr = mr_get(c->d, addr, len, remote);
    pthread_mutex_unlock(&g_devs_mu);
    if (!mr)
        return errno == ENOMEM ? KVF_ENOMEM : KVF_EIO;
    if (lkey)
        *lkey = mr->lkey;
    if (rkey)
        *rkey = mr->rkey;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Batched one-sided transfers */

/* The local key of op's range: the last registration used when it covers the range, otherwise
 * the cache's (registering on a miss). */
static int local_key(kvf__rdma_conn *c, const kvf__rdma_op *op, uint32_t *lkey)
{
    uintptr_t a = (uintptr_t)op->local;
    struct ibv_mr *m = c->hot;
    if (!m || a < (uintptr_t)m->addr || a + op->len > (uintptr_t)m->addr + m->length) {
        pthread_mutex_lock(&g_devs_mu);
        m = mr_get(c->d, op->local, op->len, 0);
        pthread_mutex_unlock(&g_devs_mu);
        if (!m)
            return errno == ENOMEM ? KVF_ENOMEM : KVF_EIO;
        c->hot = m;
    }
    *lkey = m->lkey;
    return 0;
}

static double mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void fail_from(kvf__rdma_op *ops, size_t from, size_t n, int err)
{
    for (size_t i = from; i < n; i++)
        ops[i].status = err;
}

int kvf__rdma_transfer(kvf__rdma_conn *c, int write, kvf__rdma_op *ops, size_t n, int timeout_ms)
{
    return kvf__rdma_transfer_progress(c, write, ops, n, timeout_ms, NULL, NULL);
}

int kvf__rdma_transfer_progress(kvf__rdma_conn *c, int write, kvf__rdma_op *ops, size_t n,
                                int timeout_ms, void (*progress)(void *ctx, size_t done), void *ctx)
{
    if (!n)
        return 0;
    if (c->broken) {
        fail_from(ops, 0, n, KVF_ECONNRESET);
        return KVF_ECONNRESET;
    }
    /* Every local range registered before anything is posted: a registration that fails then
     * fails the batch whole, with nothing in flight. */
    uint32_t lkey;
    for (size_t i = 0; i < n; i++) {
        int rc = local_key(c, &ops[i], &lkey);
        if (rc) {
            fail_from(ops, 0, n, rc);
            return rc;
        }
    }
    struct ibv_send_wr *wr = c->wr;
    struct ibv_sge *sge = c->sge;
    dev *d = c->d;
    pthread_mutex_lock(&d->xfer);
    uint64_t gen = (uint64_t)(++d->gen) << 32;
    size_t next = 0, retired = 0, outstanding = 0;
    int rc = 0;
    double deadline = mono_ms() + timeout_ms;
    struct ibv_wc wc[POLL_BATCH];
    while (retired < n && !rc) {
        if (next < n && outstanding < c->qdepth) {
            /* One chain: as many as the queue has room for, at most chain_max; a signalled
             * request every signal_every and at the end of the chain, so every posted request
             * is retired by a completion. */
            size_t k = c->qdepth - outstanding;
            k = k < n - next ? k : n - next;
            k = k < c->chain_max ? k : c->chain_max;
            for (size_t i = 0; i < k; i++) {
                size_t j = next + i;
                int sig = (j + 1) % c->signal_every == 0 || i + 1 == k;
                local_key(c, &ops[j], &lkey); /* registered above: found, never made */
                sge[i] = (struct ibv_sge){
                    .addr = (uintptr_t)ops[j].local, .length = ops[j].len, .lkey = lkey};
                wr[i] = (struct ibv_send_wr){
                    .wr_id = gen | j,
                    .next = i + 1 < k ? &wr[i + 1] : NULL,
                    .sg_list = &sge[i],
                    .num_sge = 1,
                    .opcode = write ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ,
                    .send_flags = sig ? IBV_SEND_SIGNALED : 0,
                    .wr.rdma = {.remote_addr = ops[j].remote, .rkey = ops[j].rkey}};
                c->st.signalled += sig;
            }
            struct ibv_send_wr *bad = NULL;
            c->st.posts++;
            if (ibv_post_send(c->id->qp, wr, &bad) != 0) {
                /* Part of the chain may be in flight unsignalled: the connection is unusable. */
                rc = KVF_EIO;
                break;
            }
            c->st.wrs += k;
            next += k;
            outstanding += k;
            if (outstanding > c->st.max_outstanding)
                c->st.max_outstanding = (uint32_t)outstanding;
            continue;
        }
        c->st.polls++;
        int got = ibv_poll_cq(d->cq, POLL_BATCH, wc);
        if (got < 0) {
            rc = KVF_EIO;
            break;
        }
        if (got == 0) {
            if (mono_ms() > deadline)
                rc = KVF_ETIMEDOUT;
            else
                sched_yield();
            continue;
        }
        for (int w = 0; w < got && !rc; w++) {
            if ((wc[w].wr_id & ~(uint64_t)0xffffffffu) != gen)
                continue; /* left over from an earlier transfer that failed */
            size_t j = (size_t)(wc[w].wr_id & 0xffffffffu);
            if (wc[w].status != IBV_WC_SUCCESS) {
                /* Reliable connection: everything before j completed; j failed; the rest is
                 * flushed. */
                for (size_t i = retired; i < j; i++)
                    ops[i].status = 0;
                retired = j;
                rc = kvf__rdma_wc_error(wc[w].status);
                break;
            }
            for (size_t i = retired; i <= j; i++)
                ops[i].status = 0;
            outstanding -= j + 1 - retired;
            retired = j + 1;
            if (progress)
                progress(ctx, retired);
        }
    }
    pthread_mutex_unlock(&d->xfer);
    if (rc) {
        c->broken = 1;
        fail_from(ops, retired, n, rc);
    }
    return rc;
}

#endif /* KVF_HAVE_RDMA */
