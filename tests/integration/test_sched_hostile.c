/*
 * A real kvf-sched on loopback against clients that try to exhaust or confuse it: requests
 * refused on their headers before any of their body is read (no token, a body said to be too
 * large, two Content-Length headers), a budget for the bodies of all connections together that
 * half-sent uploads cannot exceed, paths with an escaped NUL or '/', record fields that ZeroMQ or
 * a log would take for something else, and a publisher whose replay socket answers as slowly as
 * it may while opening gap after gap. The daemon keeps serving after each.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <msgpack.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "harness.h"
#include "kvevents_util.h"
#include "tcp.h"

#ifndef KVF_SCHED_BIN
#error "KVF_SCHED_BIN must name the kvf-sched binary"
#endif

#define TOKEN "alpha-0123456789abcdef0123456789abcdef"

static char token_file[64];

static void sched_start(daemon_t *d, int with_tokens)
{
    char *argv[] = {(char *)KVF_SCHED_BIN,
                    (char *)"--index-blocks",
                    (char *)"4096",
                    (char *)"--listen",
                    (char *)"127.0.0.1:0",
                    (char *)"--log-level",
                    (char *)"error",
                    (char *)"--tokens",
                    token_file,
                    NULL};
    if (!with_tokens)
        argv[7] = NULL;
    proc_start(d, argv);
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* A connection whose reads wait 5 s at most. */
static int dial(const daemon_t *d)
{
    int fd;
    char err[128];
    assert_int_equal(kvf__tcp_connect("127.0.0.1", d->port, 2000, &fd, err, sizeof err), 0);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    struct timeval tv = {.tv_sec = 5, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static void send_all(int fd, const char *p, size_t n)
{
    assert_int_equal(send(fd, p, n, MSG_NOSIGNAL), (ssize_t)n);
}

/* Reads a reply until the peer closes or 5 s pass; returns its status (0: none) and its body. */
static int read_reply(int fd, char *body, size_t n)
{
    static char resp[1 << 16];
    size_t got = 0;
    for (;;) {
        ssize_t r = recv(fd, resp + got, sizeof resp - 1 - got, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
        resp[got] = '\0';
        /* a reply with its whole body, the connection kept or not */
        const char *e = strstr(resp, "\r\n\r\n"), *cl = strstr(resp, "Content-Length: ");
        if (e && cl && cl < e && got >= (size_t)(e + 4 - resp) + (size_t)atol(cl + 16))
            break;
    }
    resp[got] = '\0';
    int status = 0;
    sscanf(resp, "HTTP/1.%*d %d", &status);
    const char *b = strstr(resp, "\r\n\r\n");
    snprintf(body, n, "%s", b ? b + 4 : "");
    return status;
}

/* One whole request (Connection: close), with a token when bearer. */
static int call(const daemon_t *d, int bearer, const char *method, const char *path,
                const char *body, char *out, size_t n)
{
    int fd = dial(d);
    char req[8192];
    int k = snprintf(req, sizeof req,
                     "%s %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s"
                     "Content-Length: %zu\r\n\r\n%s",
                     method, path, bearer ? "Authorization: Bearer " TOKEN "\r\n" : "",
                     body ? strlen(body) : 0, body ? body : "");
    assert_true(k > 0 && (size_t)k < sizeof req);
    send_all(fd, req, (size_t)k);
    int st = read_reply(fd, out, n);
    close(fd);
    return st;
}

/* Headers alone, the body announced and never sent: the answer must come without it. */
static int headers_only(const daemon_t *d, const char *extra, size_t length, char *out, size_t n)
{
    int fd = dial(d);
    char req[1024];
    int k = snprintf(req, sizeof req,
                     "POST /v1/place HTTP/1.1\r\nHost: x\r\n%sContent-Length: %zu\r\n\r\n", extra,
                     length);
    send_all(fd, req, (size_t)k);
    double t0 = now_s();
    int st = read_reply(fd, out, n);
    assert_true(now_s() - t0 < 4.0); /* answered, not waiting for the body */
    close(fd);
    return st;
}

static void test_refused_on_headers(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, 1);
    char out[4096];
    /* no token: 401 before any of the 10 MB is read */
    assert_int_equal(headers_only(&d, "", 10u << 20, out, sizeof out), 401);
    assert_non_null(strstr(out, "Bearer"));
    /* a body said to be over the largest (16 MiB): 413 at once */
    assert_int_equal(
        headers_only(&d, "Authorization: Bearer " TOKEN "\r\n", 17u << 20, out, sizeof out), 413);
    /* two lengths: which one frames the body is ambiguous */
    assert_int_equal(headers_only(&d, "Authorization: Bearer " TOKEN "\r\nContent-Length: 5\r\n",
                                  20, out, sizeof out),
                     400);
    assert_non_null(strstr(out, "Content-Length"));
    /* a method not served: 405, its body unread */
    int fd = dial(&d);
    const char *put = "PUT /v1/place HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n";
    send_all(fd, put, strlen(put));
    assert_int_equal(read_reply(fd, out, sizeof out), 405);
    close(fd);
    assert_int_equal(call(&d, 0, "GET", "/healthz", NULL, out, sizeof out), 200);
    daemon_stop(&d);
}

/* Half-sent bodies of 16,000,000 bytes each, held open: the bodies' budget (four times the
 * largest body) takes four, the fifth is refused with 503 before its body, and once they close
 * the room is back. */
static void test_bodies_budget(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, 1);
    char out[4096], req[512];
    const size_t len = 16000000;
    int k = snprintf(req, sizeof req,
                     "POST /v1/place HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " TOKEN
                     "\r\nContent-Length: %zu\r\n\r\n{\"tokens\":[",
                     len);
    static char chunk[1 << 20];
    for (size_t i = 0; i + 1 < sizeof chunk; i += 2)
        memcpy(chunk + i, "1,", 2);
    int held[4];
    for (int i = 0; i < 4; i++) {
        held[i] = dial(&d);
        send_all(held[i], req, (size_t)k);
        send_all(held[i], chunk, sizeof chunk);
    }
    /* the fifth: refused once the four's headers are read (by the server's threads, in any
     * order); one that came before them is taken, waits for its body and is let go (bounded:
     * 30 tries of at most 1.2 s; under the thread sanitizer beside another suite's daemons, 10
     * were once not enough) */
    int refused = 0;
    for (int tries = 0; tries < 30 && !refused; tries++) {
        usleep(200000);
        int fd = dial(&d);
        send_all(fd, req, strlen(req) - strlen("{\"tokens\":["));
        struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        refused = read_reply(fd, out, sizeof out) == 503;
        close(fd);
    }
    assert_true(refused);
    assert_non_null(strstr(out, "busy"));
    /* small requests are refused too while it is full, but the daemon answers */
    assert_int_equal(call(&d, 0, "GET", "/healthz", NULL, out, sizeof out), 200);
    for (int i = 0; i < 4; i++)
        close(held[i]);
    /* the room comes back as the connections end (bounded wait) */
    int st = 0;
    for (int tries = 0; tries < 50; tries++) {
        st = call(&d, 1, "POST", "/v1/place", "{\"tokens\":[1,2,3]}", out, sizeof out);
        if (!strstr(out, "busy"))
            break;
        usleep(100000);
    }
    assert_int_equal(st, 503);
    assert_non_null(strstr(out, "no instance can serve"));
    daemon_stop(&d);
}

/* %00 and %2F stay escaped: "victim%00/x" is no id, and victim stays registered. */
static void test_escaped_nul_and_slash(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, 0);
    char out[4096];
    const char *reg = "{\"id\":\"victim\",\"role\":\"both\",\"endpoint\":\"127.0.0.1:9401\"}";
    assert_int_equal(call(&d, 0, "POST", "/v1/instances", reg, out, sizeof out), 201);
    /* not found, or no such route (405): either way nothing is deleted or placed */
    static const char *const paths[] = {"/v1/instances/victim%00/x", "/v1/instances/victim%00",
                                        "/v1/instances/victim%2Fx", "/v1/instances/victim%2f"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        int st = call(&d, 0, "DELETE", paths[i], NULL, out, sizeof out);
        if (st != 404 && st != 405)
            fail_msg("DELETE %s: %d %s", paths[i], st, out);
    }
    int st = call(&d, 0, "POST", "/v1%2Fplace", "{\"tokens\":[1]}", out, sizeof out);
    assert_true(st == 404 || st == 405);
    assert_int_equal(call(&d, 0, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, "victim"));
    /* other escapes are decoded as before */
    assert_int_equal(call(&d, 0, "DELETE", "/v1/instances/vict%69m", NULL, out, sizeof out), 200);
    daemon_stop(&d);
}

/* Fields that ZeroMQ or a log would read as something else, and wrong types, are 400 with the
 * field named. */
static void test_record_fields(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, 0);
    char out[4096], body[512];
    static const struct {
        const char *extra, *says;
    } bad[] = {
        {"\"events\":\"tcp://*:5555\"", "events"},
        {"\"events\":\"tcp://a b:5555\"", "events"},
        {"\"events\":\"tcp://eth0;127.0.0.1:5555\"", "events"},
        {"\"replay\":\"tcp://*:5556\"", "replay"},
        {"\"host\":\"node\\u0001a\"", "control character"},
        {"\"zone\":\"z\\nz\"", "control character"},
        {"\"capabilities\":5", "JSON object"},
        {"\"capabilities\":null", "JSON object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(body, sizeof body,
                 "{\"id\":\"e%zu\",\"role\":\"both\",\"endpoint\":\"127.0.0.1:9401\",%s}", i,
                 bad[i].extra);
        assert_int_equal(call(&d, 0, "POST", "/v1/instances", body, out, sizeof out), 400);
        if (!strstr(out, bad[i].says))
            fail_msg("%s: %s", bad[i].extra, out);
    }
    assert_int_equal(
        call(&d, 0, "POST", "/v1/place", "{\"tokens\":[1],\"chunk_keys\":\"x\"}", out, sizeof out),
        400);
    assert_non_null(strstr(out, "chunk_keys"));
    assert_int_equal(call(&d, 0, "POST", "/v1/place", "[]", out, sizeof out), 400);
    assert_non_null(strstr(out, "an array"));
    assert_int_equal(call(&d, 0, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_null(strstr(out, "\"e0\""));
    daemon_stop(&d);
}

/* ------------------------------------------------------------------------------------------ */
/* A replay socket that drips */

typedef struct dripper {
    void *router;
    atomic_int stop;
    atomic_int requests; /* replay requests it got */
} dripper;

/* Answers every replay request with the first batch asked for, again and again, every 100 ms
 * (well under kvf-sched's 200 ms of silence), never the end: each replay lasts to its 2 s
 * deadline. */
static void *drip(void *p)
{
    dripper *x = p;
    msgpack_sbuffer b;
    pack_empty(&b);
    while (!atomic_load(&x->stop)) {
        zmq_pollitem_t it = {.socket = x->router, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 50) <= 0)
            continue;
        zmq_msg_t id, delim, sq;
        zmq_msg_init(&id), zmq_msg_init(&delim), zmq_msg_init(&sq);
        zmq_msg_recv(&id, x->router, 0);
        zmq_msg_recv(&delim, x->router, 0);
        zmq_msg_recv(&sq, x->router, 0);
        atomic_fetch_add(&x->requests, 1);
        uint8_t from[8];
        memcpy(from, zmq_msg_data(&sq), zmq_msg_size(&sq) == 8 ? 8 : 0);
        for (int k = 0; k < 60 && !atomic_load(&x->stop); k++) {
            usleep(100000);
            zmq_send(x->router, zmq_msg_data(&id), zmq_msg_size(&id), ZMQ_SNDMORE);
            zmq_send(x->router, "", 0, ZMQ_SNDMORE);
            zmq_send(x->router, from, 8, ZMQ_SNDMORE);
            zmq_send(x->router, b.data, b.size, 0);
            zmq_pollitem_t more = {.socket = x->router, .events = ZMQ_POLLIN};
            if (zmq_poll(&more, 1, 0) > 0)
                break; /* a new request: this replay was given up on */
        }
        zmq_msg_close(&id), zmq_msg_close(&delim), zmq_msg_close(&sq);
    }
    msgpack_sbuffer_destroy(&b);
    return NULL;
}

static long index_blocks(const daemon_t *d)
{
    char out[8192];
    assert_int_equal(call(d, 0, "GET", "/v1/index/stats", NULL, out, sizeof out), 200);
    const char *p = strstr(out, "\"blocks\":");
    return p ? strtol(p + 9, NULL, 10) : -1;
}

/* A publisher that opens a gap every 200 ms and whose replay socket drips answers (each replay
 * then takes kvf-sched's events thread to its 2 s deadline) is asked only as its budget allows
 * (1 s, refilled at a tenth of the time): over 8 s, a few requests, not one per gap; and a
 * normal engine's batches meanwhile are in the index within a second, past the first replays. */
static void test_slow_replay_socket_is_budgeted(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, 0);
    void *ctx = zmq_ctx_new();
    char ep1[128], rep1[128], ep2[128], out[4096], body[512];
    void *pub1 = pub_open(ctx, ZMQ_PUB, ep1, sizeof ep1),
         *pub2 = pub_open(ctx, ZMQ_PUB, ep2, sizeof ep2);
    dripper x = {.router = pub_open(ctx, ZMQ_ROUTER, rep1, sizeof rep1)};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, drip, &x), 0);
    /* the good engine first, its first block in the index before anything is timed */
    snprintf(body, sizeof body, "{\"id\":\"good\",\"block_tokens\":16,\"events\":\"%s\"}", ep2);
    assert_int_equal(call(&d, 0, "POST", "/v1/instances", body, out, sizeof out), 201);
    uint64_t seq1 = 1, seq2 = 1;
    for (int i = 0; i < 100 && index_blocks(&d) < 1; i++) { /* ZeroMQ drops the first ones */
        msgpack_sbuffer g;
        msgpack_sbuffer_init(&g);
        pack_stored(&g, 99999, 1, 16, 1);
        publish(pub2, seq2++, g.data, g.size);
        msgpack_sbuffer_destroy(&g);
        usleep(50000);
    }
    assert_int_equal(index_blocks(&d), 1);
    snprintf(body, sizeof body,
             "{\"id\":\"slow\",\"block_tokens\":16,\"events\":\"%s\",\"replay\":\"%s\"}", ep1,
             rep1);
    assert_int_equal(call(&d, 0, "POST", "/v1/instances", body, out, sizeof out), 201);
    msgpack_sbuffer gap;
    pack_empty(&gap);
    double t0 = now_s(), worst_late = 0;
    int late_batches = 0;
    while (now_s() - t0 < 8.0) {
        seq1 += 2; /* one missed each time */
        publish(pub1, seq1, gap.data, gap.size);
        msgpack_sbuffer g;
        msgpack_sbuffer_init(&g);
        pack_stored(&g, 100000 + seq2, 1, 16, (uint32_t)(1000 + 16 * seq2));
        long before = index_blocks(&d);
        double p0 = now_s();
        publish(pub2, seq2++, g.data, g.size);
        msgpack_sbuffer_destroy(&g);
        /* the batch in the index (bounded: 4 s); ZeroMQ may drop the very first ones */
        while (now_s() - p0 < 4.0 && index_blocks(&d) <= before)
            usleep(20000);
        double took = now_s() - p0;
        if (now_s() - t0 > 4.0) { /* past the first contact's and the first replays' time */
            late_batches++;
            if (took > worst_late)
                worst_late = took;
        }
        usleep(200000);
    }
    atomic_store(&x.stop, 1);
    pthread_join(t, NULL);
    int asked = atomic_load(&x.requests);
    print_message("replay requests %d over 8 s of gaps every ~0.2 s; the normal engine's batches "
                  "after 4 s took %.2f s at most (%d of them)\n",
                  asked, worst_late, late_batches);
    /* the first contact alone spends the budget (2 s against 1 s): one request; without the
     * budget, one per replay, back to back (2 s each): four or more */
    assert_true(asked >= 1 && asked <= 2);
    assert_true(late_batches > 0);
    assert_true(worst_late < 1.0);
    assert_int_equal(call(&d, 0, "GET", "/healthz", NULL, out, sizeof out), 200);
    msgpack_sbuffer_destroy(&gap);
    zmq_close(pub1), zmq_close(pub2), zmq_close(x.router);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

int main(void)
{
    harness_init();
    snprintf(token_file, sizeof token_file, "/tmp/kvf-test-hostile-XXXXXX");
    int fd = mkstemp(token_file);
    if (fd < 0)
        return 1;
    const char *line = "alpha " TOKEN "\n";
    if (write(fd, line, strlen(line)) != (ssize_t)strlen(line))
        return 1;
    close(fd);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_refused_on_headers, teardown_daemons),
        cmocka_unit_test_teardown(test_bodies_budget, teardown_daemons),
        cmocka_unit_test_teardown(test_escaped_nul_and_slash, teardown_daemons),
        cmocka_unit_test_teardown(test_record_fields, teardown_daemons),
        cmocka_unit_test_teardown(test_slow_replay_socket_is_budgeted, teardown_daemons),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    unlink(token_file);
    return rc;
}
