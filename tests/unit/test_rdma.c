/*
 * The RDMA transport against mocked verbs and rdma_cm (no machine here has an RDMA device): the
 * library calls are replaced at link time (-Wl,--wrap=...) and ibv_post_send / ibv_poll_cq, which
 * are inline calls through the device context, go to a fake context. The tests check the exact
 * sequence of calls, the shape of the work-request chains, the signalling interval, the
 * queue-depth bound, every error path and the teardown order.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kvf/error.h"
#include "rdma.h"

#include <fcntl.h>
#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* The mock */

#define LOG_MAX 256
#define WR_MAX  4096

typedef struct posted {
    uint64_t wr_id;
    int opcode, signalled;
    uint64_t remote, local;
    uint32_t rkey, lkey, len;
    int chain; /* which ibv_post_send call */
} posted;

static struct {
    const char *log[LOG_MAX];
    int n_log;
    /* scripted rdma_cm events */
    enum rdma_cm_event_type events[8];
    int n_events, next_event;
    int pipe_fd[2]; /* an event channel that never becomes readable */
    int silent_channel;
    /* failures to inject */
    int fail_alloc_pd, fail_create_qp, fail_post;
    long err_at; /* wr index (this transfer) that completes in error; -1 none */
    enum ibv_wc_status err_status;
    int poll_never; /* poll_cq always returns 0 */
    /* the fake device */
    struct ibv_context ctx;
    struct ibv_pd pd;
    struct ibv_cq cq;
    struct ibv_qp qp;
    struct rdma_cm_id id, child;
    struct rdma_event_channel ch;
    struct rdma_cm_event ev;
    struct ibv_qp_init_attr qp_attr;
    int n_mrs;
    struct ibv_mr mrs[64];
    /* the send queue */
    posted wr[WR_MAX];
    int n_wr, done_wr, chains, max_in_flight, poll_calls, poll_entries;
} M;

static void logc(const char *name)
{
    if (M.n_log < LOG_MAX)
        M.log[M.n_log++] = name;
}

static int mock_post_send(struct ibv_qp *qp, struct ibv_send_wr *wr, struct ibv_send_wr **bad)
{
    (void)qp;
    logc("ibv_post_send");
    if (M.fail_post) {
        *bad = wr;
        return ENOMEM;
    }
    M.chains++;
    for (; wr; wr = wr->next) {
        assert_true(M.n_wr < WR_MAX);
        assert_int_equal(wr->num_sge, 1);
        M.wr[M.n_wr++] = (posted){.wr_id = wr->wr_id,
                                  .opcode = wr->opcode,
                                  .signalled = (wr->send_flags & IBV_SEND_SIGNALED) != 0,
                                  .remote = wr->wr.rdma.remote_addr,
                                  .local = wr->sg_list->addr,
                                  .rkey = wr->wr.rdma.rkey,
                                  .lkey = wr->sg_list->lkey,
                                  .len = wr->sg_list->length,
                                  .chain = M.chains};
    }
    if (M.n_wr - M.done_wr > M.max_in_flight)
        M.max_in_flight = M.n_wr - M.done_wr;
    return 0;
}

/* Completes posted requests in order: a signalled one produces a completion (retiring the
 * unsignalled ones before it); the one at err_at produces an error completion, signalled or not,
 * and nothing completes after it. */
static int mock_poll_cq(struct ibv_cq *cq, int num, struct ibv_wc *wc)
{
    (void)cq;
    M.poll_calls++;
    M.poll_entries = num;
    if (M.poll_never)
        return 0;
    int got = 0;
    while (got < num && M.done_wr < M.n_wr) {
        posted *p = &M.wr[M.done_wr];
        if (M.err_at >= 0 && (long)(p->wr_id & 0xffffffffu) == M.err_at) {
            wc[got++] = (struct ibv_wc){.wr_id = p->wr_id, .status = M.err_status};
            M.done_wr = M.n_wr; /* the rest is flushed; the caller stops at the error */
            break;
        }
        M.done_wr++;
        if (p->signalled)
            wc[got++] = (struct ibv_wc){.wr_id = p->wr_id, .status = IBV_WC_SUCCESS};
    }
    return got;
}

static void mock_reset(void)
{
    if (M.pipe_fd[0] > 0) {
        close(M.pipe_fd[0]);
        close(M.pipe_fd[1]);
    }
    memset(&M, 0, sizeof M);
    M.err_at = -1;
    assert_int_equal(pipe(M.pipe_fd), 0);
    M.ctx.ops.post_send = mock_post_send;
    M.ctx.ops.poll_cq = mock_poll_cq;
    M.pd.context = &M.ctx;
    M.cq.context = &M.ctx;
    M.qp.context = &M.ctx;
    M.id.verbs = &M.ctx;
    M.child.verbs = &M.ctx;
}

static void script(int n, ...)
{
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++)
        M.events[i] = (enum rdma_cm_event_type)va_arg(ap, int);
    va_end(ap);
    M.n_events = n;
    M.next_event = 0;
}

/* Wrapped library functions. */
struct ibv_device **__wrap_ibv_get_device_list(int *n);
struct ibv_device **__wrap_ibv_get_device_list(int *n)
{
    logc("ibv_get_device_list");
    *n = 0;
    return calloc(1, sizeof(struct ibv_device *));
}
void __wrap_ibv_free_device_list(struct ibv_device **l);
void __wrap_ibv_free_device_list(struct ibv_device **l)
{
    logc("ibv_free_device_list");
    free(l);
}
struct ibv_pd *__wrap_ibv_alloc_pd(struct ibv_context *c);
struct ibv_pd *__wrap_ibv_alloc_pd(struct ibv_context *c)
{
    logc("ibv_alloc_pd");
    assert_ptr_equal(c, &M.ctx);
    return M.fail_alloc_pd ? NULL : &M.pd;
}
int __wrap_ibv_dealloc_pd(struct ibv_pd *pd);
int __wrap_ibv_dealloc_pd(struct ibv_pd *pd)
{
    logc("ibv_dealloc_pd");
    assert_ptr_equal(pd, &M.pd);
    return 0;
}
struct ibv_cq *__wrap_ibv_create_cq(struct ibv_context *c, int cqe, void *ctx,
                                    struct ibv_comp_channel *ch, int vec);
struct ibv_cq *__wrap_ibv_create_cq(struct ibv_context *c, int cqe, void *ctx,
                                    struct ibv_comp_channel *ch, int vec)
{
    (void)cqe, (void)ctx, (void)ch, (void)vec;
    logc("ibv_create_cq");
    assert_ptr_equal(c, &M.ctx);
    return &M.cq;
}
int __wrap_ibv_destroy_cq(struct ibv_cq *cq);
int __wrap_ibv_destroy_cq(struct ibv_cq *cq)
{
    logc("ibv_destroy_cq");
    assert_ptr_equal(cq, &M.cq);
    return 0;
}
static struct ibv_mr *new_mr(void *addr, size_t len, int access)
{
    logc("ibv_reg_mr");
    assert_true(M.n_mrs < 64);
    struct ibv_mr *mr = &M.mrs[M.n_mrs];
    *mr =
        (struct ibv_mr){.addr = addr,
                        .length = len,
                        .lkey = 0x100u + (uint32_t)M.n_mrs,
                        .rkey = (access & IBV_ACCESS_REMOTE_READ) ? 0x900u + (uint32_t)M.n_mrs : 0};
    M.n_mrs++;
    return mr;
}
struct ibv_mr *__wrap_ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t len, int access);
struct ibv_mr *__wrap_ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t len, int access)
{
    assert_ptr_equal(pd, &M.pd);
    return new_mr(addr, len, access);
}
struct ibv_mr *__wrap_ibv_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t len, uint64_t iova,
                                       unsigned int access);
struct ibv_mr *__wrap_ibv_reg_mr_iova2(struct ibv_pd *pd, void *addr, size_t len, uint64_t iova,
                                       unsigned int access)
{
    (void)iova;
    assert_ptr_equal(pd, &M.pd);
    return new_mr(addr, len, (int)access);
}
int __wrap_ibv_dereg_mr(struct ibv_mr *mr);
int __wrap_ibv_dereg_mr(struct ibv_mr *mr)
{
    (void)mr;
    logc("ibv_dereg_mr");
    return 0;
}
struct rdma_event_channel *__wrap_rdma_create_event_channel(void);
struct rdma_event_channel *__wrap_rdma_create_event_channel(void)
{
    logc("rdma_create_event_channel");
    M.ch.fd = M.silent_channel ? M.pipe_fd[0] : open("/dev/null", O_RDONLY);
    return &M.ch;
}
void __wrap_rdma_destroy_event_channel(struct rdma_event_channel *ch);
void __wrap_rdma_destroy_event_channel(struct rdma_event_channel *ch)
{
    logc("rdma_destroy_event_channel");
    assert_ptr_equal(ch, &M.ch);
    if (!M.silent_channel)
        close(ch->fd);
}
int __wrap_rdma_create_id(struct rdma_event_channel *ch, struct rdma_cm_id **id, void *ctx,
                          enum rdma_port_space ps);
int __wrap_rdma_create_id(struct rdma_event_channel *ch, struct rdma_cm_id **id, void *ctx,
                          enum rdma_port_space ps)
{
    (void)ctx;
    logc("rdma_create_id");
    assert_ptr_equal(ch, &M.ch);
    assert_int_equal(ps, RDMA_PS_TCP);
    *id = &M.id;
    return 0;
}
int __wrap_rdma_destroy_id(struct rdma_cm_id *id);
int __wrap_rdma_destroy_id(struct rdma_cm_id *id)
{
    (void)id;
    logc("rdma_destroy_id");
    return 0;
}
int __wrap_rdma_resolve_addr(struct rdma_cm_id *id, struct sockaddr *src, struct sockaddr *dst,
                             int ms);
int __wrap_rdma_resolve_addr(struct rdma_cm_id *id, struct sockaddr *src, struct sockaddr *dst,
                             int ms)
{
    (void)src, (void)ms;
    logc("rdma_resolve_addr");
    assert_ptr_equal(id, &M.id);
    assert_non_null(dst);
    return 0;
}
int __wrap_rdma_resolve_route(struct rdma_cm_id *id, int ms);
int __wrap_rdma_resolve_route(struct rdma_cm_id *id, int ms)
{
    (void)id, (void)ms;
    logc("rdma_resolve_route");
    return 0;
}
int __wrap_rdma_get_cm_event(struct rdma_event_channel *ch, struct rdma_cm_event **ev);
int __wrap_rdma_get_cm_event(struct rdma_event_channel *ch, struct rdma_cm_event **ev)
{
    (void)ch;
    logc("rdma_get_cm_event");
    assert_true(M.next_event < M.n_events);
    M.ev = (struct rdma_cm_event){.event = M.events[M.next_event++]};
    /* Requests and disconnects on a listener's channel are about the accepted id. */
    M.ev.id =
        M.ev.event == RDMA_CM_EVENT_CONNECT_REQUEST || M.ev.event == RDMA_CM_EVENT_DISCONNECTED
            ? &M.child
            : &M.id;
    *ev = &M.ev;
    return 0;
}
int __wrap_rdma_ack_cm_event(struct rdma_cm_event *ev);
int __wrap_rdma_ack_cm_event(struct rdma_cm_event *ev)
{
    logc("rdma_ack_cm_event");
    assert_ptr_equal(ev, &M.ev);
    return 0;
}
int __wrap_rdma_create_qp(struct rdma_cm_id *id, struct ibv_pd *pd, struct ibv_qp_init_attr *a);
int __wrap_rdma_create_qp(struct rdma_cm_id *id, struct ibv_pd *pd, struct ibv_qp_init_attr *a)
{
    logc("rdma_create_qp");
    assert_ptr_equal(pd, &M.pd);
    M.qp_attr = *a;
    if (M.fail_create_qp) {
        errno = ENOMEM;
        return -1;
    }
    id->qp = &M.qp;
    return 0;
}
void __wrap_rdma_destroy_qp(struct rdma_cm_id *id);
void __wrap_rdma_destroy_qp(struct rdma_cm_id *id)
{
    logc("rdma_destroy_qp");
    id->qp = NULL;
}
int __wrap_rdma_connect(struct rdma_cm_id *id, struct rdma_conn_param *p);
int __wrap_rdma_connect(struct rdma_cm_id *id, struct rdma_conn_param *p)
{
    (void)id;
    logc("rdma_connect");
    assert_true(p->retry_count > 0 && p->initiator_depth > 0);
    return 0;
}
int __wrap_rdma_accept(struct rdma_cm_id *id, struct rdma_conn_param *p);
int __wrap_rdma_accept(struct rdma_cm_id *id, struct rdma_conn_param *p)
{
    (void)p;
    logc("rdma_accept");
    assert_ptr_equal(id, &M.child);
    return 0;
}
int __wrap_rdma_reject(struct rdma_cm_id *id, const void *d, uint8_t len);
int __wrap_rdma_reject(struct rdma_cm_id *id, const void *d, uint8_t len)
{
    (void)id, (void)d, (void)len;
    logc("rdma_reject");
    return 0;
}
int __wrap_rdma_disconnect(struct rdma_cm_id *id);
int __wrap_rdma_disconnect(struct rdma_cm_id *id)
{
    (void)id;
    logc("rdma_disconnect");
    return 0;
}
int __wrap_rdma_bind_addr(struct rdma_cm_id *id, struct sockaddr *a);
int __wrap_rdma_bind_addr(struct rdma_cm_id *id, struct sockaddr *a)
{
    (void)id, (void)a;
    logc("rdma_bind_addr");
    return 0;
}
int __wrap_rdma_listen(struct rdma_cm_id *id, int backlog);
int __wrap_rdma_listen(struct rdma_cm_id *id, int backlog)
{
    (void)id, (void)backlog;
    logc("rdma_listen");
    return 0;
}
uint16_t __wrap_rdma_get_src_port(struct rdma_cm_id *id);
uint16_t __wrap_rdma_get_src_port(struct rdma_cm_id *id)
{
    (void)id;
    logc("rdma_get_src_port");
    return htons(7471);
}

/* ------------------------------------------------------------------------------------------ */
/* Helpers */

static void expect_log(const char *const *want, int n, int from)
{
    for (int i = 0; i < n; i++) {
        if (from + i >= M.n_log || strcmp(M.log[from + i], want[i]) != 0) {
            fprintf(stderr, "call %d: wanted %s, got %s\n", from + i, want[i],
                    from + i < M.n_log ? M.log[from + i] : "(nothing)");
            for (int k = 0; k < M.n_log; k++)
                fprintf(stderr, "  %2d %s\n", k, M.log[k]);
            fail();
        }
    }
}

static const char *const CONNECT_SEQ[] = {"rdma_create_event_channel",
                                          "rdma_create_id",
                                          "rdma_resolve_addr",
                                          "rdma_get_cm_event",
                                          "rdma_ack_cm_event",
                                          "rdma_resolve_route",
                                          "rdma_get_cm_event",
                                          "rdma_ack_cm_event",
                                          "ibv_alloc_pd",
                                          "ibv_create_cq",
                                          "rdma_create_qp",
                                          "rdma_connect",
                                          "rdma_get_cm_event",
                                          "rdma_ack_cm_event"};

static kvf__rdma_conn *connect_ok(uint32_t qdepth, uint32_t sig, uint32_t chain)
{
    script(3, RDMA_CM_EVENT_ADDR_RESOLVED, RDMA_CM_EVENT_ROUTE_RESOLVED, RDMA_CM_EVENT_ESTABLISHED);
    kvf__rdma_opts o = {.queue_depth = qdepth, .signal_every = sig, .chain_max = chain};
    kvf__rdma_conn *c = NULL;
    char err[256] = "";
    int rc = kvf__rdma_connect("127.0.0.1", 7471, &o, &c, err, sizeof err);
    if (rc)
        fprintf(stderr, "connect: %s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(c);
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* Tests */

static void test_rdma_wc_errors_map_to_kvf_codes(void **state)
{
    (void)state;
    static const int map[][2] = {{IBV_WC_SUCCESS, 0},
                                 {IBV_WC_WR_FLUSH_ERR, KVF_ECONNRESET},
                                 {IBV_WC_REM_ACCESS_ERR, KVF_EACCES},
                                 {IBV_WC_REM_INV_REQ_ERR, KVF_EACCES},
                                 {IBV_WC_RETRY_EXC_ERR, KVF_ETIMEDOUT},
                                 {IBV_WC_RNR_RETRY_EXC_ERR, KVF_ETIMEDOUT},
                                 {IBV_WC_LOC_PROT_ERR, KVF_EINVAL},
                                 {IBV_WC_LOC_LEN_ERR, KVF_EINVAL},
                                 {IBV_WC_FATAL_ERR, KVF_EIO},
                                 {IBV_WC_REM_OP_ERR, KVF_EIO}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        assert_int_equal(kvf__rdma_wc_error(map[i][0]), map[i][1]);
}

static void test_rdma_no_device(void **state)
{
    (void)state;
    mock_reset();
    char why[128] = "";
    assert_int_equal(kvf__rdma_available(why, sizeof why), 0);
    assert_string_equal(why, "no RDMA device");
    static const char *const seq[] = {"ibv_get_device_list", "ibv_free_device_list"};
    expect_log(seq, 2, 0);
}

static void test_rdma_connect_and_teardown_order(void **state)
{
    (void)state;
    mock_reset();
    kvf__rdma_conn *c = connect_ok(64, 8, 16);
    assert_int_equal(M.n_log, 14);
    expect_log(CONNECT_SEQ, 14, 0);
    /* Reliable connected, the queue depth asked for, selective signalling. */
    assert_int_equal(M.qp_attr.qp_type, IBV_QPT_RC);
    assert_int_equal(M.qp_attr.cap.max_send_wr, 64);
    assert_int_equal(M.qp_attr.sq_sig_all, 0);
    assert_ptr_equal(M.qp_attr.send_cq, &M.cq);
    /* Two registrations, then teardown: QP, registrations, CQ, PD, id, channel. */
    static char a[4096], b[4096];
    uint32_t lk, rk;
    assert_int_equal(kvf__rdma_register(c, a, sizeof a, 1, &lk, &rk), 0);
    assert_int_equal(kvf__rdma_register(c, b, sizeof b, 0, &lk, NULL), 0);
    int mark = M.n_log;
    kvf__rdma_close(&c);
    assert_null(c);
    static const char *const down[] = {
        "rdma_disconnect", "rdma_destroy_qp", "ibv_dereg_mr",    "ibv_dereg_mr",
        "ibv_destroy_cq",  "ibv_dealloc_pd",  "rdma_destroy_id", "rdma_destroy_event_channel"};
    expect_log(down, 8, mark);
    assert_int_equal(M.n_log, mark + 8);
}

static void test_rdma_connect_errors_release_everything(void **state)
{
    (void)state;
    char err[256];
    kvf__rdma_conn *c;
    kvf__rdma_opts o = {.timeout_ms = 50};
    /* The peer rejects. */
    mock_reset();
    script(3, RDMA_CM_EVENT_ADDR_RESOLVED, RDMA_CM_EVENT_ROUTE_RESOLVED, RDMA_CM_EVENT_REJECTED);
    assert_int_equal(kvf__rdma_connect("127.0.0.1", 1, &o, &c, err, sizeof err), KVF_ECONNREFUSED);
    assert_null(c);
    assert_non_null(strstr(err, "REJECTED"));
    static const char *const rej_tail[] = {"rdma_destroy_qp", "ibv_destroy_cq", "ibv_dealloc_pd",
                                           "rdma_destroy_id", "rdma_destroy_event_channel"};
    expect_log(rej_tail, 5, M.n_log - 5);
    /* No RDMA device routes to the address. */
    mock_reset();
    script(1, RDMA_CM_EVENT_ADDR_ERROR);
    assert_int_equal(kvf__rdma_connect("127.0.0.1", 1, &o, &c, err, sizeof err), KVF_ENODEV);
    static const char *const addr_tail[] = {"rdma_destroy_id", "rdma_destroy_event_channel"};
    expect_log(addr_tail, 2, M.n_log - 2);
    /* Nothing answers: bounded by the timeout. */
    mock_reset();
    M.silent_channel = 1;
    assert_int_equal(kvf__rdma_connect("127.0.0.1", 1, &o, &c, err, sizeof err), KVF_ETIMEDOUT);
    expect_log(addr_tail, 2, M.n_log - 2);
    /* No protection domain, then no queue pair: what was made is released. */
    mock_reset();
    M.fail_alloc_pd = 1;
    script(2, RDMA_CM_EVENT_ADDR_RESOLVED, RDMA_CM_EVENT_ROUTE_RESOLVED);
    assert_int_equal(kvf__rdma_connect("127.0.0.1", 1, &o, &c, err, sizeof err), KVF_ENOMEM);
    expect_log(addr_tail, 2, M.n_log - 2);
    mock_reset();
    M.fail_create_qp = 1;
    script(2, RDMA_CM_EVENT_ADDR_RESOLVED, RDMA_CM_EVENT_ROUTE_RESOLVED);
    assert_int_equal(kvf__rdma_connect("127.0.0.1", 1, &o, &c, err, sizeof err), KVF_ENOMEM);
    static const char *const qp_tail[] = {"rdma_create_qp", "ibv_destroy_cq", "ibv_dealloc_pd",
                                          "rdma_destroy_id", "rdma_destroy_event_channel"};
    expect_log(qp_tail, 5, M.n_log - 5);
    /* An unresolvable name never reaches rdma_cm. */
    mock_reset();
    assert_int_equal(kvf__rdma_connect("no-such-host.invalid", 1, &o, &c, err, sizeof err),
                     KVF_EHOSTUNREACH);
    assert_int_equal(M.n_log, 0);
}

static void test_rdma_listen_and_accept(void **state)
{
    (void)state;
    mock_reset();
    kvf__rdma_listener *l;
    uint16_t port = 0;
    char err[256];
    assert_int_equal(kvf__rdma_listen("127.0.0.1", 0, NULL, &l, &port, err, sizeof err), 0);
    assert_int_equal(port, 7471);
    static const char *const lseq[] = {"rdma_create_event_channel", "rdma_create_id",
                                       "rdma_bind_addr", "rdma_listen", "rdma_get_src_port"};
    expect_log(lseq, 5, 0);
    script(2, RDMA_CM_EVENT_CONNECT_REQUEST, RDMA_CM_EVENT_ESTABLISHED);
    kvf__rdma_conn *c;
    int mark = M.n_log;
    assert_int_equal(kvf__rdma_accept(l, 100, &c, err, sizeof err), 0);
    static const char *const aseq[] = {"rdma_get_cm_event", "rdma_ack_cm_event", "ibv_alloc_pd",
                                       "ibv_create_cq",     "rdma_create_qp",    "rdma_accept",
                                       "rdma_get_cm_event", "rdma_ack_cm_event"};
    expect_log(aseq, 8, mark);
    assert_ptr_equal(M.child.qp, &M.qp); /* the queue pair is the accepted id's */
    mark = M.n_log;
    kvf__rdma_close(&c);
    static const char *const cdown[] = {"rdma_disconnect", "rdma_destroy_qp", "ibv_destroy_cq",
                                        "ibv_dealloc_pd", "rdma_destroy_id"};
    expect_log(cdown, 5, mark);
    assert_int_equal(M.n_log, mark + 5); /* the channel is the listener's */
    kvf__rdma_listener_close(&l);
    static const char *const ldown[] = {"rdma_destroy_id", "rdma_destroy_event_channel"};
    expect_log(ldown, 2, mark + 5);
}

/* The storage node's side: the arena registered once on the listener's device (remote read and
 * write), connections accepted by polling the listener, a disconnect naming its connection, and
 * the listener releasing the registration and the device last. */
static void test_rdma_listener_registers_and_polls(void **state)
{
    (void)state;
    mock_reset();
    kvf__rdma_listener *l;
    uint16_t port = 0;
    char err[256];
    static uint8_t arena[1 << 16];
    assert_int_equal(kvf__rdma_listen("10.0.0.1", 0, NULL, &l, &port, err, sizeof err), 0);
    int mark = M.n_log;
    uint32_t rkey = 0;
    assert_int_equal(kvf__rdma_listener_register(l, arena, sizeof arena, &rkey, err, sizeof err),
                     0);
    static const char *const rseq[] = {"ibv_alloc_pd", "ibv_create_cq", "ibv_reg_mr"};
    expect_log(rseq, 3, mark);
    assert_int_equal(rkey, M.mrs[0].rkey);
    assert_true(rkey != 0); /* registered for remote access */
    /* Registering again reuses it. */
    assert_int_equal(kvf__rdma_listener_register(l, arena, 4096, &rkey, err, sizeof err), 0);
    assert_int_equal(M.n_mrs, 1);

    /* A request: accepted on the same device (no second PD or CQ). */
    kvf__rdma_conn *in = NULL, *gone = NULL;
    mark = M.n_log;
    script(3, RDMA_CM_EVENT_CONNECT_REQUEST, RDMA_CM_EVENT_ESTABLISHED, RDMA_CM_EVENT_DISCONNECTED);
    assert_int_equal(kvf__rdma_listener_poll(l, 100, &in, &gone, err, sizeof err), 0);
    assert_non_null(in);
    assert_null(gone);
    static const char *const aseq[] = {"rdma_get_cm_event", "rdma_ack_cm_event",
                                       "rdma_create_qp",    "rdma_accept",
                                       "rdma_get_cm_event", "rdma_ack_cm_event"};
    expect_log(aseq, 6, mark);
    /* The peer disconnects: the event names the connection. */
    assert_int_equal(kvf__rdma_listener_poll(l, 100, &in, &gone, err, sizeof err), 0);
    assert_null(in);
    assert_non_null(gone);
    mark = M.n_log;
    kvf__rdma_close(&gone);
    static const char *const cdown[] = {"rdma_disconnect", "rdma_destroy_qp", "rdma_destroy_id"};
    expect_log(cdown, 3, mark); /* the device stays: the listener holds it */
    mark = M.n_log;
    kvf__rdma_listener_close(&l);
    static const char *const ldown[] = {"ibv_dereg_mr", "ibv_destroy_cq", "ibv_dealloc_pd",
                                        "rdma_destroy_id", "rdma_destroy_event_channel"};
    expect_log(ldown, 5, mark);
}

/* 45 reads, queue depth 8, a signal every 4, chains of at most 6. */
static void test_rdma_read_chains_signalling_and_depth(void **state)
{
    (void)state;
    mock_reset();
    kvf__rdma_conn *c = connect_ok(8, 4, 6);
    enum { N = 45, SZ = 1024 };
    static uint8_t buf[N * SZ];
    kvf__rdma_op ops[N];
    for (int i = 0; i < N; i++)
        ops[i] = (kvf__rdma_op){.local = buf + i * SZ,
                                .remote = 0x7f0000000000ull + (uint64_t)i * 65536,
                                .rkey = 0xabc,
                                .len = SZ,
                                .status = 99};
    int regs = M.n_mrs;
    uint32_t lk;
    assert_int_equal(kvf__rdma_register(c, buf, sizeof buf, 0, &lk, NULL), 0);
    assert_int_equal(M.n_mrs, regs + 1);
    assert_int_equal(kvf__rdma_transfer(c, 0, ops, N, 1000), 0);
    assert_int_equal(M.n_mrs, regs + 1); /* every op fell inside the one registration */
    assert_int_equal(M.n_wr, N);
    assert_true(M.max_in_flight <= 8);
    assert_int_equal(M.max_in_flight, 8);
    int chain_len = 0;
    for (int i = 0; i < N; i++) {
        posted *p = &M.wr[i];
        assert_int_equal(ops[i].status, 0);
        assert_int_equal(p->opcode, IBV_WR_RDMA_READ);
        assert_int_equal((int)(p->wr_id & 0xffffffffu), i);
        assert_int_equal(p->remote, ops[i].remote);
        assert_int_equal(p->rkey, 0xabc);
        assert_int_equal(p->lkey, lk);
        assert_int_equal(p->len, SZ);
        assert_int_equal(p->local, (uint64_t)(uintptr_t)ops[i].local);
        int last_of_chain = i + 1 == N || M.wr[i + 1].chain != p->chain;
        chain_len++;
        /* Signalled: every 4th, and the last of each chain; no other. */
        assert_int_equal(p->signalled, (i + 1) % 4 == 0 || last_of_chain);
        if (last_of_chain) {
            assert_true(chain_len <= 6);
            chain_len = 0;
        }
    }
    kvf__rdma_stats st;
    kvf__rdma_stats_get(c, &st);
    assert_int_equal(st.wrs, N);
    assert_int_equal(st.posts, M.chains);
    assert_true(st.max_outstanding <= 8);
    assert_int_equal(M.poll_entries, 16); /* completions are polled in batches */
    assert_false(kvf__rdma_broken(c));
    kvf__rdma_close(&c);
}

static void test_rdma_write_and_registration_cache(void **state)
{
    (void)state;
    mock_reset();
    kvf__rdma_conn *c = connect_ok(16, 16, 32);
    static uint8_t a[8192], b[8192];
    kvf__rdma_op ops[3] = {{.local = a, .remote = 0x1000, .rkey = 7, .len = 4096},
                           {.local = a + 4096, .remote = 0x2000, .rkey = 7, .len = 4096},
                           {.local = b, .remote = 0x3000, .rkey = 7, .len = 100}};
    assert_int_equal(kvf__rdma_transfer(c, 1, ops, 3, 1000), 0);
    /* Each op's range was registered when nothing covered it. A registration of the whole of a
     * serves any range inside it afterwards. */
    int before = M.n_mrs;
    uint32_t lk, rk;
    assert_int_equal(kvf__rdma_register(c, a, sizeof a, 0, &lk, NULL), 0);
    assert_int_equal(M.n_mrs, before + 1);
    assert_int_equal(kvf__rdma_register(c, a + 100, 50, 0, &lk, NULL), 0);
    assert_int_equal(M.n_mrs, before + 1);
    /* A local registration does not serve a remote one; the remote one serves later locals. */
    assert_int_equal(kvf__rdma_register(c, a, sizeof a, 1, &lk, &rk), 0);
    assert_int_equal(M.n_mrs, before + 2);
    assert_true(rk != 0);
    for (int i = 0; i < M.n_wr; i++)
        assert_int_equal(M.wr[i].opcode, IBV_WR_RDMA_WRITE);
    assert_int_equal(M.wr[2].signalled, 1); /* the last of the chain */
    assert_int_equal(M.wr[0].signalled, 0);
    kvf__rdma_close(&c);
}

static void test_rdma_completion_error_breaks_the_connection(void **state)
{
    (void)state;
    static const struct {
        enum ibv_wc_status st;
        int want;
    } cases[] = {{IBV_WC_REM_ACCESS_ERR, KVF_EACCES},
                 {IBV_WC_RETRY_EXC_ERR, KVF_ETIMEDOUT},
                 {IBV_WC_WR_FLUSH_ERR, KVF_ECONNRESET}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        mock_reset();
        kvf__rdma_conn *c = connect_ok(8, 4, 8);
        enum { N = 20 };
        static uint8_t buf[N * 64];
        kvf__rdma_op ops[N];
        for (int i = 0; i < N; i++)
            ops[i] = (kvf__rdma_op){.local = buf + i * 64, .remote = 64u * i, .rkey = 1, .len = 64};
        assert_int_equal(kvf__rdma_register(c, buf, sizeof buf, 0, NULL, NULL), 0);
        M.err_at = 9; /* unsignalled: errors complete whether signalled or not */
        M.err_status = cases[k].st;
        assert_int_equal(kvf__rdma_transfer(c, 0, ops, N, 1000), cases[k].want);
        for (int i = 0; i < N; i++)
            assert_int_equal(ops[i].status, i < 9 ? 0 : cases[k].want);
        assert_true(kvf__rdma_broken(c));
        /* A broken connection posts nothing more; the caller rebuilds it. */
        int posted_before = M.n_wr;
        assert_int_equal(kvf__rdma_transfer(c, 0, ops, 2, 1000), KVF_ECONNRESET);
        assert_int_equal(M.n_wr, posted_before);
        kvf__rdma_close(&c);
    }
}

static void test_rdma_post_failure_and_timeout(void **state)
{
    (void)state;
    static uint8_t buf[4096];
    kvf__rdma_op ops[4];
    for (int i = 0; i < 4; i++)
        ops[i] = (kvf__rdma_op){.local = buf + i * 1024, .remote = 0, .rkey = 1, .len = 1024};
    /* ibv_post_send refuses. */
    mock_reset();
    kvf__rdma_conn *c = connect_ok(8, 2, 8);
    M.fail_post = 1;
    assert_int_equal(kvf__rdma_transfer(c, 0, ops, 4, 1000), KVF_EIO);
    for (int i = 0; i < 4; i++)
        assert_int_equal(ops[i].status, KVF_EIO);
    assert_true(kvf__rdma_broken(c));
    kvf__rdma_close(&c);
    /* No completion ever comes: bounded by the deadline. */
    mock_reset();
    c = connect_ok(8, 2, 8);
    M.poll_never = 1;
    assert_int_equal(kvf__rdma_transfer(c, 0, ops, 4, 30), KVF_ETIMEDOUT);
    assert_true(M.poll_calls > 1);
    for (int i = 0; i < 4; i++)
        assert_int_equal(ops[i].status, KVF_ETIMEDOUT);
    assert_true(kvf__rdma_broken(c));
    kvf__rdma_close(&c);
}

/* A layer-major batch reports its progress as completions arrive, so layers land in order. */
typedef struct layers_seen {
    size_t calls, last, per_layer;
    int landed[8];
    int order[8], n_order;
} layers_seen;

static void on_progress(void *ctx, size_t done)
{
    layers_seen *ls = ctx;
    assert_true(done > ls->last); /* only forward */
    ls->last = done;
    ls->calls++;
    for (size_t l = 0; l < 8 && (l + 1) * ls->per_layer <= done; l++)
        if (!ls->landed[l]) {
            ls->landed[l] = 1;
            ls->order[ls->n_order++] = (int)l;
        }
}

static void test_rdma_layerwise_progress(void **state)
{
    (void)state;
    mock_reset();
    kvf__rdma_conn *c = connect_ok(8, 5, 8);
    enum { LAYERS = 4, CHUNKS = 5, N = LAYERS * CHUNKS };
    static uint8_t buf[N * 256];
    kvf__rdma_op ops[N];
    for (int l = 0; l < LAYERS; l++) /* layer-major: layer 0 of every chunk first */
        for (int k = 0; k < CHUNKS; k++)
            ops[l * CHUNKS + k] = (kvf__rdma_op){.local = buf + (l * CHUNKS + k) * 256,
                                                 .remote = 0x10000u * (uint64_t)k + 256u * l,
                                                 .rkey = 5,
                                                 .len = 256};
    assert_int_equal(kvf__rdma_register(c, buf, sizeof buf, 0, NULL, NULL), 0);
    layers_seen ls = {.per_layer = CHUNKS};
    assert_int_equal(kvf__rdma_transfer_progress(c, 0, ops, N, 1000, on_progress, &ls), 0);
    assert_int_equal(ls.last, N);
    assert_int_equal(ls.n_order, LAYERS);
    for (int l = 0; l < LAYERS; l++)
        assert_int_equal(ls.order[l], l);
    /* Every report is a signalled completion: progress is as fine as the signalling. */
    size_t signalled = 0;
    for (int i = 0; i < M.n_wr; i++)
        signalled += (size_t)M.wr[i].signalled;
    assert_int_equal(ls.calls, signalled);
    /* After an error no further progress is reported, and never past the failed op. */
    kvf__rdma_close(&c);
    mock_reset();
    c = connect_ok(8, 5, 8);
    assert_int_equal(kvf__rdma_register(c, buf, sizeof buf, 0, NULL, NULL), 0);
    M.err_at = 12;
    M.err_status = IBV_WC_REM_ACCESS_ERR;
    layers_seen ls2 = {.per_layer = CHUNKS};
    assert_int_equal(kvf__rdma_transfer_progress(c, 0, ops, N, 1000, on_progress, &ls2),
                     KVF_EACCES);
    assert_true(ls2.last <= 12);
    assert_int_equal(ls2.n_order, 2); /* layers 0 and 1 landed; layer 2 did not */
    kvf__rdma_close(&c);
}

/* Two connections on one device share its PD, CQ and registrations; the last one out frees
 * them. */
static void test_rdma_one_pd_and_cq_per_device(void **state)
{
    (void)state;
    mock_reset();
    kvf__rdma_conn *a = connect_ok(8, 4, 8);
    kvf__rdma_conn *b = connect_ok(8, 4, 8);
    int pds = 0, cqs = 0;
    for (int i = 0; i < M.n_log; i++) {
        pds += !strcmp(M.log[i], "ibv_alloc_pd");
        cqs += !strcmp(M.log[i], "ibv_create_cq");
    }
    assert_int_equal(pds, 1);
    assert_int_equal(cqs, 1);
    static char arena[65536];
    uint32_t r1, r2;
    assert_int_equal(kvf__rdma_register(a, arena, sizeof arena, 1, NULL, &r1), 0);
    assert_int_equal(kvf__rdma_register(b, arena + 4096, 4096, 1, NULL, &r2), 0);
    assert_int_equal(r1, r2); /* registered once */
    int mark = M.n_log;
    kvf__rdma_close(&a);
    for (int i = mark; i < M.n_log; i++)
        assert_true(strcmp(M.log[i], "ibv_dealloc_pd") && strcmp(M.log[i], "ibv_dereg_mr"));
    kvf__rdma_close(&b);
    static const char *const tail[] = {"ibv_dereg_mr", "ibv_destroy_cq", "ibv_dealloc_pd"};
    expect_log(tail, 3, M.n_log - 5);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rdma_wc_errors_map_to_kvf_codes),
        cmocka_unit_test(test_rdma_no_device),
        cmocka_unit_test(test_rdma_connect_and_teardown_order),
        cmocka_unit_test(test_rdma_connect_errors_release_everything),
        cmocka_unit_test(test_rdma_listen_and_accept),
        cmocka_unit_test(test_rdma_listener_registers_and_polls),
        cmocka_unit_test(test_rdma_read_chains_signalling_and_depth),
        cmocka_unit_test(test_rdma_write_and_registration_cache),
        cmocka_unit_test(test_rdma_completion_error_breaks_the_connection),
        cmocka_unit_test(test_rdma_post_failure_and_timeout),
        cmocka_unit_test(test_rdma_one_pd_and_cq_per_device),
        cmocka_unit_test(test_rdma_layerwise_progress),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
