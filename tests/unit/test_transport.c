/*
 * Unit tests of the transport module: the pollers (each back-end built here), TCP helpers, the
 * receive low-water mark, the HTTP client's connection reuse and iovec arithmetic.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kvf/kvf.h"

#include "bytes.h"
#include "http.h"
#include "poller.h"
#include "tcp.h"

static void poller_basics(const char *name)
{
    kvf_poller *p;
    int rc = kvf__poller_open(&p, name);
    assert_int_equal(rc, 0);
    assert_string_equal(kvf__poller_name(p), name);
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    int tag = 5;
    assert_int_equal(kvf__poller_add(p, sv[0], KVF_POLL_IN, &tag), 0);
    kvf_poll_event ev[4];
    assert_int_equal(kvf__poller_wait(p, ev, 4, 10), 0);
    assert_int_equal(write(sv[1], "x", 1), 1);
    assert_int_equal(kvf__poller_wait(p, ev, 4, 1000), 1);
    assert_ptr_equal(ev[0].ud, &tag);
    assert_true(ev[0].events & KVF_POLL_IN);
    /* Level-triggered: still readable until read. */
    assert_int_equal(kvf__poller_wait(p, ev, 4, 0), 1);
    char c;
    assert_int_equal(read(sv[0], &c, 1), 1);
    assert_int_equal(kvf__poller_wait(p, ev, 4, 0), 0);
    assert_int_equal(kvf__poller_mod(p, sv[0], KVF_POLL_OUT, &tag), 0);
    assert_int_equal(kvf__poller_wait(p, ev, 4, 1000), 1);
    assert_true(ev[0].events & KVF_POLL_OUT);
    assert_int_equal(kvf__poller_del(p, sv[0]), 0);
    assert_int_equal(kvf__poller_wait(p, ev, 4, 0), 0);
    close(sv[1]);
    close(sv[0]);
    kvf__poller_close(&p);
    assert_null(p);
    kvf__poller_close(&p);
}

static void test_transport_poller_backends(void **state)
{
    (void)state;
    kvf_poller *p;
    assert_int_equal(kvf__poller_open(&p, NULL), 0);
#ifdef __linux__
    assert_string_equal(kvf__poller_name(p), "epoll");
    poller_basics("epoll");
#endif
    kvf__poller_close(&p);
    poller_basics("poll");
    assert_int_equal(kvf__poller_open(&p, "no-such-poller"), KVF_ENOTSUP);
}

static void test_transport_tcp_helpers(void **state)
{
    (void)state;
    char host[64];
    uint16_t port;
    assert_int_equal(kvf__addr_parse("127.0.0.1:7400", host, sizeof host, &port), 0);
    assert_string_equal(host, "127.0.0.1");
    assert_int_equal(port, 7400);
    assert_int_equal(kvf__addr_parse("[::1]:9", host, sizeof host, &port), 0);
    assert_string_equal(host, "::1");
    assert_int_equal(kvf__addr_parse("localhost", host, sizeof host, &port), KVF_EINVAL);
    assert_int_equal(kvf__addr_parse("h:70000", host, sizeof host, &port), KVF_EINVAL);
    assert_int_equal(kvf__addr_parse(":80", host, sizeof host, &port), KVF_EINVAL);
    assert_int_equal(kvf__addr_parse("h:8x", host, sizeof host, &port), KVF_EINVAL);

    int lfd, cfd, afd;
    uint16_t bound = 0;
    char err[256];
    assert_int_equal(kvf__tcp_listen("127.0.0.1", 0, 8, &lfd, &bound, err, sizeof err), 0);
    assert_true(bound > 0);
    assert_int_equal(kvf__tcp_connect("127.0.0.1", bound, 1000, &cfd, err, sizeof err), 0);
    int rc;
    for (int i = 0; i < 100 && (rc = kvf__tcp_accept(lfd, &afd)) == KVF_EAGAIN; i++)
        usleep(1000);
    assert_int_equal(rc, 0);
    /* Scatter-gather write of more vectors than IOV_MAX. */
    enum { NV = 3000 };
    static char data[NV];
    static struct iovec iov[NV];
    for (int i = 0; i < NV; i++) {
        data[i] = (char)i;
        iov[i].iov_base = &data[i];
        iov[i].iov_len = 1;
    }
    size_t done = 0;
    int first = 0;
    while (first < NV) {
        rc = kvf__sock_writev(cfd, iov + first, NV - first, &done);
        assert_true(rc == 0 || rc == KVF_EAGAIN);
        first = kvf__iov_advance(iov, NV, first, done);
    }
    char got[NV];
    size_t have = 0;
    for (int i = 0; i < 1000 && have < NV; i++) {
        size_t g;
        rc = kvf__sock_read(afd, got + have, NV - have, &g);
        if (rc == KVF_EAGAIN) {
            usleep(1000);
            continue;
        }
        assert_int_equal(rc, 0);
        have += g;
    }
    assert_int_equal(have, NV);
    assert_memory_equal(got, data, NV);
    close(cfd);
    size_t g = 99;
    for (int i = 0; i < 1000; i++) {
        rc = kvf__sock_read(afd, got, 1, &g);
        if (rc != KVF_EAGAIN)
            break;
        usleep(1000);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(g, 0); /* peer closed */
    /* Writing to a closed peer reports an error instead of raising SIGPIPE. */
    struct iovec one = {.iov_base = data, .iov_len = 1};
    for (int i = 0; i < 100 && rc == 0; i++)
        rc = kvf__sock_writev(afd, &one, 1, &done);
    assert_true(rc == KVF_EPIPE || rc == KVF_ECONNRESET);
    close(afd);
    /* Port taken. */
    int l2;
    uint16_t b2;
    assert_int_equal(kvf__tcp_listen("127.0.0.1", bound, 8, &l2, &b2, err, sizeof err),
                     KVF_EADDRINUSE);
    assert_non_null(strstr(err, "listen 127.0.0.1"));
    close(lfd);
    /* Nobody listening any more. */
    assert_int_equal(kvf__tcp_connect("127.0.0.1", bound, 1000, &cfd, err, sizeof err),
                     KVF_ECONNREFUSED);
    assert_non_null(strstr(err, "connect 127.0.0.1"));
}

static int sock_lowat(int fd)
{
    int v = -1;
    socklen_t l = sizeof v;
    assert_int_equal(getsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &v, &l), 0);
    return v;
}

static int readable(int fd)
{
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    return poll(&pf, 1, 20) == 1 && (pf.revents & POLLIN);
}

/* The receive low-water mark: asked only for large rests, never above what is owed or a quarter
 * of the receive buffer, and the socket then reports readable once that much is there. */
/* Only loopback addresses count as loopback: the daemons listen elsewhere only with --insecure. */
static void test_transport_loopback_hosts(void **state)
{
    (void)state;
    assert_true(kvf__host_is_loopback("127.0.0.1"));
    assert_true(kvf__host_is_loopback("127.1.2.3"));
    assert_true(kvf__host_is_loopback("localhost"));
    assert_true(kvf__host_is_loopback("::1"));
    assert_false(kvf__host_is_loopback("0.0.0.0"));
    assert_false(kvf__host_is_loopback("::"));
    assert_false(kvf__host_is_loopback("10.1.2.3"));
    assert_false(kvf__host_is_loopback("192.168.0.1"));
    assert_false(kvf__host_is_loopback(""));
    assert_int_equal(kvf__listen_policy("test", "--listen", "127.0.0.1", 0), 0);
    assert_int_equal(kvf__listen_policy("test", "--listen", "0.0.0.0", 0), 2);
    assert_int_equal(kvf__listen_policy("test", "--listen", "0.0.0.0", 1), 0);
    assert_int_equal(kvf__listen_policy("test", "--listen", "0.0.0.0", KVF_LISTEN_AUTHENTICATED),
                     0);
}

static void test_transport_receive_low_water(void **state)
{
    (void)state;
    int lfd, cfd, afd, rc;
    uint16_t bound = 0;
    char err[256];
    assert_int_equal(kvf__tcp_listen("127.0.0.1", 0, 8, &lfd, &bound, err, sizeof err), 0);
    assert_int_equal(kvf__tcp_connect("127.0.0.1", bound, 1000, &cfd, err, sizeof err), 0);
    for (int i = 0; i < 100 && (rc = kvf__tcp_accept(lfd, &afd)) == KVF_EAGAIN; i++)
        usleep(1000);
    assert_int_equal(rc, 0);
    kvf_lowat lw;
    kvf__sock_lowat_init(afd, &lw);
    int rcv = 0;
    socklen_t l = sizeof rcv;
    assert_int_equal(getsockopt(afd, SOL_SOCKET, SO_RCVBUF, &rcv, &l), 0);
    int cap = rcv / 4 < (256 << 10) ? rcv / 4 : (256 << 10);
    assert_int_equal(lw.cap, cap >= (64 << 10) ? cap : 0);
    if (lw.cap) {
        kvf__sock_lowat(afd, &lw, 1000); /* small rests keep the default */
        assert_int_equal(sock_lowat(afd), 1);
        kvf__sock_lowat(afd, &lw, 100 << 10); /* the rest owed, when under the cap */
        assert_int_equal(sock_lowat(afd), 100 << 10);
        kvf__sock_lowat(afd, &lw, 64ull << 20); /* the cap */
        assert_int_equal(sock_lowat(afd), lw.cap);
        kvf__sock_lowat(afd, &lw, 100 << 10);
        static char buf[100 << 10];
        size_t done = 0;
        struct iovec v = {buf, 60 << 10};
        assert_int_equal(kvf__sock_writev(cfd, &v, 1, &done), 0);
        assert_int_equal(done, 60 << 10);
        assert_false(readable(afd)); /* 60 of the 100 KiB owed */
        v = (struct iovec){buf, 40 << 10};
        assert_int_equal(kvf__sock_writev(cfd, &v, 1, &done), 0);
        int ok = 0;
        for (int i = 0; i < 50 && !ok; i++)
            ok = readable(afd);
        assert_true(ok);
        kvf__sock_lowat(afd, &lw, 0);
        assert_int_equal(sock_lowat(afd), 1);
    }
    /* A small receive buffer turns the mark off: the window could never fill it. */
    int small = 16 << 10;
    assert_int_equal(setsockopt(afd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small), 0);
    kvf__sock_lowat_init(afd, &lw);
    assert_int_equal(lw.cap, 0);
    kvf__sock_lowat(afd, &lw, 64ull << 20);
    assert_int_equal(sock_lowat(afd), 1);
    close(cfd);
    close(afd);
    close(lfd);
}

/* A minimal HTTP/1.1 server on a raw socket: answers each request {"n": its number} and counts
 * the connections it accepted; it drops the connection after the request numbered close_after
 * (without saying so), as a restarted server would. */
typedef struct mini_http {
    int lfd;
    uint16_t port;
    _Atomic int stop, accepts, requests;
    int close_after;
    pthread_t th;
} mini_http;

static void *mini_http_main(void *arg)
{
    mini_http *m = arg;
    int c = -1;
    char buf[8192];
    size_t have = 0;
    while (!atomic_load(&m->stop)) {
        struct pollfd pf[2] = {{.fd = m->lfd, .events = POLLIN}, {.fd = c, .events = POLLIN}};
        if (poll(pf, c >= 0 ? 2 : 1, 20) <= 0)
            continue;
        if (pf[0].revents & POLLIN) {
            int n = accept(m->lfd, NULL, NULL);
            if (n >= 0) {
                if (c >= 0)
                    close(c);
                c = n;
                have = 0;
                atomic_fetch_add(&m->accepts, 1);
            }
            continue;
        }
        ssize_t r = recv(c, buf + have, sizeof buf - 1 - have, 0);
        if (r <= 0) {
            close(c);
            c = -1;
            continue;
        }
        have += (size_t)r;
        buf[have] = '\0';
        char *end = strstr(buf, "\r\n\r\n");
        if (!end)
            continue;
        const char *cl = strstr(buf, "Content-Length:");
        size_t body = cl && cl < end ? strtoul(cl + 15, NULL, 10) : 0;
        size_t need = (size_t)(end + 4 - buf) + body;
        if (have < need)
            continue;
        int k = atomic_fetch_add(&m->requests, 1) + 1;
        char rep[160], js[32];
        int jl = snprintf(js, sizeof js, "{\"n\": %d}", k);
        int rl = snprintf(rep, sizeof rep,
                          "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                          "Content-Length: %d\r\n\r\n%s",
                          jl, js);
        assert_int_equal(send(c, rep, (size_t)rl, MSG_NOSIGNAL), rl);
        memmove(buf, buf + need, have - need);
        have -= need;
        if (k == m->close_after) {
            close(c);
            c = -1;
            have = 0;
        }
    }
    if (c >= 0)
        close(c);
    return NULL;
}

static void mini_http_call(mini_http *m, const char *method, int want_n)
{
    char url[64], err[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/x", m->port);
    json_t *body = !strcmp(method, "POST") ? json_pack("{s:i}", "k", want_n) : NULL, *reply = NULL;
    long status = 0;
    assert_int_equal(kvf__http_call(method, url, body, 2000, &status, &reply, err, sizeof err), 0);
    assert_int_equal(status, 200);
    assert_non_null(reply);
    assert_int_equal(json_integer_value(json_object_get(reply, "n")), want_n);
    json_decref(reply);
    json_decref(body);
}

static void *other_thread_call(void *arg)
{
    mini_http_call(arg, "GET", 6);
    return NULL;
}

/* One thread's calls to one server reuse one connection; a connection the server dropped is
 * replaced, and the call on it still answered; another thread has its own. */
static void test_transport_http_client_reuses_connections(void **state)
{
    (void)state;
    mini_http m = {.close_after = 3};
    char err[256];
    assert_int_equal(kvf__tcp_listen("127.0.0.1", 0, 8, &m.lfd, &m.port, err, sizeof err), 0);
    assert_int_equal(pthread_create(&m.th, NULL, mini_http_main, &m), 0);
    mini_http_call(&m, "GET", 1);
    mini_http_call(&m, "POST", 2);
    mini_http_call(&m, "POST", 3);
    assert_int_equal(atomic_load(&m.accepts), 1);
    usleep(50000); /* the server has dropped the connection by now */
    mini_http_call(&m, "POST", 4);
    mini_http_call(&m, "GET", 5);
    assert_int_equal(atomic_load(&m.accepts), 2);
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, other_thread_call, &m), 0);
    pthread_join(t, NULL);
    assert_int_equal(atomic_load(&m.accepts), 3);
    /* A server that is gone: the call fails with a clear error, and the next one to a live
     * server works again. */
    char url[64];
    long status = 0;
    json_t *reply = NULL;
    int dead;
    uint16_t dead_port;
    assert_int_equal(kvf__tcp_listen("127.0.0.1", 0, 8, &dead, &dead_port, err, sizeof err), 0);
    close(dead);
    snprintf(url, sizeof url, "http://127.0.0.1:%u/x", dead_port);
    assert_int_equal(kvf__http_call("GET", url, NULL, 1000, &status, &reply, err, sizeof err),
                     KVF_ECONNREFUSED);
    assert_null(reply);
    mini_http_call(&m, "GET", 7);
    atomic_store(&m.stop, 1);
    pthread_join(m.th, NULL);
    close(m.lfd);
}

static void test_transport_iov_advance(void **state)
{
    (void)state;
    char a[10], b[5], c[7];
    struct iovec v[3] = {{a, 10}, {b, 5}, {c, 7}};
    int f = kvf__iov_advance(v, 3, 0, 12);
    assert_int_equal(f, 1);
    assert_ptr_equal(v[1].iov_base, b + 2);
    assert_int_equal(v[1].iov_len, 3);
    f = kvf__iov_advance(v, 3, f, 3);
    assert_int_equal(f, 2);
    f = kvf__iov_advance(v, 3, f, 7);
    assert_int_equal(f, 3);
}

/* A bounded write takes no more than its budget, cuts the vector the budget ends in, and leaves
 * the caller's vectors as they were; the bytes arrive in order. */
static void test_transport_writev_budget(void **state)
{
    (void)state;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    char a[100], b[300], c[50];
    memset(a, 'a', sizeof a), memset(b, 'b', sizeof b), memset(c, 'c', sizeof c);
    struct iovec v[3] = {{a, sizeof a}, {b, sizeof b}, {c, sizeof c}};
    size_t done;
    assert_int_equal(kvf__sock_writev_max(sv[0], v, 3, 250, &done), 0);
    assert_int_equal(done, 250);
    assert_int_equal(v[1].iov_len, 300); /* the caller's vectors are untouched */
    int first = kvf__iov_advance(v, 3, 0, done);
    assert_int_equal(kvf__sock_writev_max(sv[0], v + first, 3 - first, 1000, &done), 0);
    assert_int_equal(done, 200);
    char got[450];
    size_t n = 0;
    while (n < sizeof got) {
        ssize_t r = read(sv[1], got + n, sizeof got - n);
        assert_true(r > 0);
        n += (size_t)r;
    }
    assert_int_equal(got[99], 'a');
    assert_int_equal(got[100], 'b');
    assert_int_equal(got[399], 'b');
    assert_int_equal(got[400], 'c');
    assert_int_equal(kvf__sock_writev_max(sv[0], v, 3, 0, &done), 0);
    assert_int_equal(done, 0);
    close(sv[0]);
    close(sv[1]);
}

/* At the descriptor limit the listener's pending connection is taken off the backlog and closed
 * with the reserve descriptor's slot, and the reserve comes back. */
static void test_transport_accept_shed(void **state)
{
    (void)state;
    int lfd, cfd;
    uint16_t bound = 0;
    char err[256];
    assert_int_equal(kvf__tcp_listen("127.0.0.1", 0, 8, &lfd, &bound, err, sizeof err), 0);
    int reserve = kvf__fd_reserve_open();
    assert_true(reserve >= 0);
    assert_int_equal(kvf__tcp_accept_shed(lfd, &reserve), KVF_EAGAIN);
    assert_true(reserve >= 0);
    assert_int_equal(kvf__tcp_connect("127.0.0.1", bound, 1000, &cfd, err, sizeof err), 0);
    int rc = KVF_EAGAIN;
    for (int i = 0; i < 1000 && (rc = kvf__tcp_accept_shed(lfd, &reserve)) == KVF_EAGAIN; i++)
        usleep(1000);
    assert_int_equal(rc, 0);
    assert_true(reserve >= 0);
    /* The client sees the connection closed, not a connection that never answers. */
    struct pollfd pf = {.fd = cfd, .events = POLLIN};
    assert_int_equal(poll(&pf, 1, 5000), 1);
    char b;
    size_t got = 1;
    rc = kvf__sock_read(cfd, &b, 1, &got);
    assert_true((rc == 0 && got == 0) || rc == KVF_ECONNRESET);
    /* No reserve (it could not be reopened): the next call tries again. */
    close(reserve);
    reserve = -1;
    assert_int_equal(kvf__tcp_accept_shed(lfd, &reserve), KVF_EAGAIN);
    assert_true(reserve >= 0);
    close(reserve);
    close(cfd);
    close(lfd);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_transport_poller_backends),
        cmocka_unit_test(test_transport_tcp_helpers),
        cmocka_unit_test(test_transport_loopback_hosts),
        cmocka_unit_test(test_transport_accept_shed),
        cmocka_unit_test(test_transport_receive_low_water),
        cmocka_unit_test(test_transport_http_client_reuses_connections),
        cmocka_unit_test(test_transport_iov_advance),
        cmocka_unit_test(test_transport_writev_budget),
    };
    return cmocka_run_group_tests_name("transport", tests, NULL, NULL);
}
