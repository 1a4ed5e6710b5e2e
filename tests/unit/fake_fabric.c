/* The fake RDMA fabric (fake_fabric.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "fake_fabric.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

fake_fabric F = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void ev_push(fchan *c, enum rdma_cm_event_type type, fid *id)
{
    struct rdma_cm_event *ev = calloc(1, sizeof *ev);
    assert_non_null(ev);
    ev->event = type;
    ev->id = &id->id;
    assert_true(c->n < MAX_EVS);
    c->evs[c->n++] = ev;
    assert_int_equal(write(c->wfd, "e", 1), 1);
}

static struct ibv_mr *mr_covering(uint32_t key, int remote, uint64_t addr, uint32_t len)
{
    for (int i = 0; i < MAX_MRS; i++) {
        struct ibv_mr *m = F.mrs[i];
        if (m && (remote ? m->rkey : m->lkey) == key && addr >= (uintptr_t)m->addr &&
            addr + len <= (uintptr_t)m->addr + m->length)
            return m;
    }
    return NULL;
}

static void wc_push(uint64_t wr_id, enum ibv_wc_status st)
{
    assert_true(F.wc_n < MAX_WC);
    F.wc[(F.wc_head + F.wc_n++) % MAX_WC] = (struct ibv_wc){.wr_id = wr_id, .status = st};
}

static long g_wr_index;

static int fab_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad)
{
    (void)bad;
    fid *me = qp->qp_context;
    pthread_mutex_lock(&F.mu);
    for (; wr; wr = wr->next) {
        struct ibv_sge *sg = wr->sg_list;
        long index = g_wr_index++;
        enum ibv_wc_status st = IBV_WC_SUCCESS;
        if (me->in_error || !me->peer || me->peer->gone)
            st = IBV_WC_WR_FLUSH_ERR;
        else if (!mr_covering(sg->lkey, 0, sg->addr, sg->length))
            st = IBV_WC_LOC_PROT_ERR;
        else if (!mr_covering(wr->wr.rdma.rkey, 1, wr->wr.rdma.remote_addr, sg->length))
            st = IBV_WC_REM_ACCESS_ERR;
        else if (F.hook)
            st = F.hook(wr->opcode, (void *)(uintptr_t)sg->addr, wr->wr.rdma.remote_addr,
                        sg->length, index);
        if (st == IBV_WC_SUCCESS) {
            void *remote = (void *)(uintptr_t)wr->wr.rdma.remote_addr;
            void *local = (void *)(uintptr_t)sg->addr;
            if (wr->opcode == IBV_WR_RDMA_READ) {
                memcpy(local, remote, sg->length);
                F.reads++;
                F.read_bytes += sg->length;
            } else {
                memcpy(remote, local, sg->length);
                F.writes++;
                F.write_bytes += sg->length;
            }
            if (F.after)
                F.after(wr->opcode, local, sg->length, index);
            if (wr->send_flags & IBV_SEND_SIGNALED)
                wc_push(wr->wr_id, st);
        } else {
            if (st != IBV_WC_WR_FLUSH_ERR)
                F.errors++;
            me->in_error = 1; /* the queue pair went to the error state */
            wc_push(wr->wr_id, st);
        }
    }
    pthread_mutex_unlock(&F.mu);
    return 0;
}

static int fab_poll_cq(struct ibv_cq *cq, int num, struct ibv_wc *wc)
{
    (void)cq;
    pthread_mutex_lock(&F.mu);
    int got = 0;
    while (got < num && F.wc_n) {
        wc[got++] = F.wc[F.wc_head];
        F.wc_head = (F.wc_head + 1) % MAX_WC;
        F.wc_n--;
    }
    pthread_mutex_unlock(&F.mu);
    return got;
}

void fabric_reset(void)
{
    pthread_mutex_lock(&F.mu);
    F.ctx.ops.post_send = fab_post_send;
    F.ctx.ops.poll_cq = fab_poll_cq;
    F.pd.context = &F.ctx;
    F.cq.context = &F.ctx;
    F.reads = F.writes = F.read_bytes = F.write_bytes = F.errors = 0;
    F.hook = NULL;
    F.after = NULL;
    g_wr_index = 0;
    pthread_mutex_unlock(&F.mu);
}

/* Wrapped library functions. */
#define WRAP(ret, name, ...)        \
    ret __wrap_##name(__VA_ARGS__); \
    ret __wrap_##name(__VA_ARGS__)

static struct ibv_device fake_dev;
WRAP(struct ibv_device **, ibv_get_device_list, int *n)
{
    struct ibv_device **l = calloc(2, sizeof *l);
    l[0] = &fake_dev;
    *n = 1;
    return l;
}
WRAP(void, ibv_free_device_list, struct ibv_device **l)
{
    free(l);
}
WRAP(struct ibv_pd *, ibv_alloc_pd, struct ibv_context *c)
{
    (void)c;
    return &F.pd;
}
WRAP(int, ibv_dealloc_pd, struct ibv_pd *pd)
{
    (void)pd;
    return 0;
}
WRAP(struct ibv_cq *, ibv_create_cq, struct ibv_context *c, int cqe, void *ctx,
     struct ibv_comp_channel *ch, int vec)
{
    (void)c, (void)cqe, (void)ctx, (void)ch, (void)vec;
    return &F.cq;
}
WRAP(int, ibv_destroy_cq, struct ibv_cq *cq)
{
    (void)cq;
    return 0;
}
static struct ibv_mr *fab_reg(void *addr, size_t len, int access)
{
    pthread_mutex_lock(&F.mu);
    struct ibv_mr *mr = calloc(1, sizeof *mr);
    mr->addr = addr;
    mr->length = len;
    mr->lkey = ++F.next_key;
    mr->rkey = (access & IBV_ACCESS_REMOTE_READ) ? 0x10000u + F.next_key : 0;
    int i = 0;
    while (i < MAX_MRS && F.mrs[i])
        i++;
    assert_true(i < MAX_MRS);
    F.mrs[i] = mr;
    pthread_mutex_unlock(&F.mu);
    return mr;
}
WRAP(struct ibv_mr *, ibv_reg_mr, struct ibv_pd *pd, void *addr, size_t len, int access)
{
    (void)pd;
    return fab_reg(addr, len, access);
}
WRAP(struct ibv_mr *, ibv_reg_mr_iova2, struct ibv_pd *pd, void *addr, size_t len, uint64_t iova,
     unsigned int access)
{
    (void)pd, (void)iova;
    return fab_reg(addr, len, (int)access);
}
WRAP(int, ibv_dereg_mr, struct ibv_mr *mr)
{
    pthread_mutex_lock(&F.mu);
    for (int i = 0; i < MAX_MRS; i++)
        if (F.mrs[i] == mr)
            F.mrs[i] = NULL;
    pthread_mutex_unlock(&F.mu);
    free(mr);
    return 0;
}
WRAP(struct rdma_event_channel *, rdma_create_event_channel, void)
{
    fchan *c = calloc(1, sizeof *c);
    int p[2];
    assert_int_equal(pipe(p), 0);
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    c->ch.fd = p[0];
    c->wfd = p[1];
    return &c->ch;
}
WRAP(void, rdma_destroy_event_channel, struct rdma_event_channel *ch)
{
    fchan *c = (fchan *)ch;
    for (int i = 0; i < c->n; i++)
        free(c->evs[i]);
    close(c->ch.fd);
    close(c->wfd);
    free(c);
}
WRAP(int, rdma_create_id, struct rdma_event_channel *ch, struct rdma_cm_id **id, void *ctx,
     enum rdma_port_space ps)
{
    (void)ps;
    fid *f = calloc(1, sizeof *f);
    f->id.channel = ch;
    f->id.context = ctx;
    *id = &f->id;
    return 0;
}
WRAP(int, rdma_destroy_id, struct rdma_cm_id *id)
{
    fid *f = (fid *)id;
    pthread_mutex_lock(&F.mu);
    for (int i = 0; i < 8; i++)
        if (F.listeners[i] == f)
            F.listeners[i] = NULL;
    if (f->peer && f->peer->peer == f)
        f->peer->peer = NULL;
    pthread_mutex_unlock(&F.mu);
    free(f);
    return 0;
}
WRAP(int, rdma_bind_addr, struct rdma_cm_id *id, struct sockaddr *addr)
{
    fid *f = (fid *)id;
    static uint16_t next_port = 20000;
    uint16_t p = ntohs(((struct sockaddr_in *)addr)->sin_port);
    f->port = p ? p : next_port++;
    id->verbs = &F.ctx; /* bound to an address that an RDMA device owns */
    return 0;
}
WRAP(int, rdma_listen, struct rdma_cm_id *id, int backlog)
{
    (void)backlog;
    fid *f = (fid *)id;
    pthread_mutex_lock(&F.mu);
    for (int i = 0; i < 8; i++)
        if (!F.listeners[i]) {
            F.listeners[i] = f;
            break;
        }
    f->listening = 1;
    pthread_mutex_unlock(&F.mu);
    return 0;
}
WRAP(uint16_t, rdma_get_src_port, struct rdma_cm_id *id)
{
    return htons(((fid *)id)->port);
}
WRAP(int, rdma_resolve_addr, struct rdma_cm_id *id, struct sockaddr *src, struct sockaddr *dst,
     int ms)
{
    (void)src, (void)ms;
    fid *f = (fid *)id;
    f->port = ntohs(((struct sockaddr_in *)dst)->sin_port);
    id->verbs = &F.ctx;
    pthread_mutex_lock(&F.mu);
    ev_push((fchan *)id->channel, RDMA_CM_EVENT_ADDR_RESOLVED, f);
    pthread_mutex_unlock(&F.mu);
    return 0;
}
WRAP(int, rdma_resolve_route, struct rdma_cm_id *id, int ms)
{
    (void)ms;
    pthread_mutex_lock(&F.mu);
    ev_push((fchan *)id->channel, RDMA_CM_EVENT_ROUTE_RESOLVED, (fid *)id);
    pthread_mutex_unlock(&F.mu);
    return 0;
}
WRAP(int, rdma_get_cm_event, struct rdma_event_channel *ch, struct rdma_cm_event **ev)
{
    fchan *c = (fchan *)ch;
    pthread_mutex_lock(&F.mu);
    if (c->n == 0) {
        pthread_mutex_unlock(&F.mu);
        return -1;
    }
    *ev = c->evs[0];
    memmove(c->evs, c->evs + 1, (size_t)--c->n * sizeof c->evs[0]);
    char b;
    assert_int_equal(read(c->ch.fd, &b, 1), 1);
    pthread_mutex_unlock(&F.mu);
    return 0;
}
WRAP(int, rdma_ack_cm_event, struct rdma_cm_event *ev)
{
    free(ev);
    return 0;
}
WRAP(int, rdma_create_qp, struct rdma_cm_id *id, struct ibv_pd *pd, struct ibv_qp_init_attr *a)
{
    (void)pd, (void)a;
    fid *f = (fid *)id;
    f->qp.context = &F.ctx;
    f->qp.qp_context = f;
    id->qp = &f->qp;
    return 0;
}
WRAP(void, rdma_destroy_qp, struct rdma_cm_id *id)
{
    id->qp = NULL;
}
WRAP(int, rdma_connect, struct rdma_cm_id *id, struct rdma_conn_param *p)
{
    (void)p;
    fid *f = (fid *)id;
    pthread_mutex_lock(&F.mu);
    fid *l = NULL;
    for (int i = 0; i < 8; i++)
        if (F.listeners[i] && F.listeners[i]->port == f->port)
            l = F.listeners[i];
    if (!l) {
        ev_push((fchan *)id->channel, RDMA_CM_EVENT_REJECTED, f);
    } else {
        fid *child = calloc(1, sizeof *child);
        child->id.channel = l->id.channel;
        child->id.context = l->id.context;
        child->id.verbs = &F.ctx;
        child->peer = f;
        f->peer = child;
        F.connects++;
        ev_push((fchan *)l->id.channel, RDMA_CM_EVENT_CONNECT_REQUEST, child);
    }
    pthread_mutex_unlock(&F.mu);
    return 0;
}
WRAP(int, rdma_accept, struct rdma_cm_id *id, struct rdma_conn_param *p)
{
    (void)p;
    fid *child = (fid *)id;
    pthread_mutex_lock(&F.mu);
    ev_push((fchan *)id->channel, RDMA_CM_EVENT_ESTABLISHED, child);
    if (child->peer)
        ev_push((fchan *)child->peer->id.channel, RDMA_CM_EVENT_ESTABLISHED, child->peer);
    pthread_mutex_unlock(&F.mu);
    return 0;
}
WRAP(int, rdma_reject, struct rdma_cm_id *id, const void *d, uint8_t n)
{
    (void)d, (void)n;
    fid *child = (fid *)id;
    pthread_mutex_lock(&F.mu);
    if (child->peer)
        ev_push((fchan *)child->peer->id.channel, RDMA_CM_EVENT_REJECTED, child->peer);
    pthread_mutex_unlock(&F.mu);
    return 0;
}
WRAP(int, rdma_disconnect, struct rdma_cm_id *id)
{
    fid *f = (fid *)id;
    pthread_mutex_lock(&F.mu);
    f->gone = 1;
    if (f->peer && !f->peer->gone)
        ev_push((fchan *)f->peer->id.channel, RDMA_CM_EVENT_DISCONNECTED, f->peer);
    pthread_mutex_unlock(&F.mu);
    return 0;
}