/*
 * The router (engine/include/router.h) carries kvf-sched's plan to the engines: a fake kvf-sched
 * and fake engines on one loopback HTTP server of this test answer as the real ones do, and
 * record what the router sends. A plan that loads from the stores gives the prefill engine
 * (/v1/prefill, or /v1/generate where kvf-sched colocates) its load deadline and its sources as
 * the plan lists them; the decode engine gets neither; a plan that loads nothing sends no
 * sources; prefills and generates ask for a stream.
 *
 * A streamed reply (kvf__http_call_stream) against a raw loopback socket that sends its first
 * line, waits, then its last: the first token is given when it arrives, not with the reply; the
 * last line is the reply; an error after the first line gives its status.
 */
#define _GNU_SOURCE /* strcasestr */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http.h"
#include "kvf/kvf.h"
#include "router.h"

typedef struct fake {
    pthread_mutex_t mu;
    uint16_t port;
    int colocated, loads;
    json_t *sources;                /* the plan's */
    json_t *prefill, *decode, *gen; /* the last bodies the engines received */
    int places;
} fake;

static unsigned handle(void *ctx, const char *method, const char *url, json_t *body,
                       kvf__http_reply *out)
{
    fake *f = ctx;
    char ep[64];
    snprintf(ep, sizeof ep, "127.0.0.1:%u", f->port);
    pthread_mutex_lock(&f->mu);
    unsigned st = 200;
    if (!strcmp(method, "GET") && !strcmp(url, "/v1/instances")) {
        out->json =
            json_pack("{s:[{s:s,s:s,s:s},{s:s,s:s,s:s}]}", "instances", "id", "p1", "role",
                      "prefill", "endpoint", ep, "id", "d1", "role", "decode", "endpoint", ep);
    } else if (!strcmp(method, "GET") && !strcmp(url, "/v1/index/stats")) {
        out->json = json_pack("{s:i}", "shards", 1);
    } else if (!strcmp(method, "GET") && !strcmp(url, "/v1/health")) {
        out->json = json_pack("{s:b}", "running", 0);
    } else if (!strcmp(url, "/v1/place")) {
        f->places++;
        json_t *acts = json_array();
        if (f->loads)
            json_array_append_new(acts, json_pack("{s:s,s:s,s:i,s:f,s:s,s:O}", "action",
                                                  "load_from_store", "instance", "p1", "tokens", 64,
                                                  "seconds", 0.01, "label", "real", "sources",
                                                  f->sources));
        json_array_append_new(acts,
                              json_pack("{s:s,s:s,s:i,s:f,s:s}", "action", "prefill", "instance",
                                        "p1", "tokens", 64, "seconds", 0.02, "label", "real"));
        out->json =
            json_pack("{s:s,s:s,s:b,s:o}", "prefill", "p1", "decode", f->colocated ? "p1" : "d1",
                      "colocated", f->colocated, "actions", acts);
        if (f->loads)
            json_object_set_new(out->json, "load_deadline_ms", json_real(250));
    } else if (!strcmp(url, "/v1/prefill") || !strcmp(url, "/v1/generate") ||
               !strcmp(url, "/v1/decode")) {
        json_t **slot = !strcmp(url, "/v1/prefill")  ? &f->prefill
                        : !strcmp(url, "/v1/decode") ? &f->decode
                                                     : &f->gen;
        json_decref(*slot);
        *slot = json_incref(body);
        out->json = json_pack("{s:[i,i],s:[f],s:i}", "tokens", 5, 6, "itl_s", 0.001,
                              "loaded_tokens", f->loads ? 64 : 0);
    } else {
        out->json = kvf__http_error("no %s %s here", method, url);
        st = 404;
    }
    pthread_mutex_unlock(&f->mu);
    return st;
}

static void serve_one(kvfe_router *r, uint32_t *t, kvf_key *keys)
{
    kvfe_route q = {.tokens = t, .n = 128, .keys = keys, .n_keys = 2, .max_tokens = 2};
    int rc = kvfe_router_serve(r, &q);
    if (rc)
        fail_msg("serve: %d %s", rc, q.err);
    assert_int_equal(q.n_generated, 2);
    kvfe_route_release(&q);
}

static void test_router_carries_the_plan(void **state)
{
    (void)state;
    fake f = {.loads = 1};
    pthread_mutex_init(&f.mu, NULL);
    f.sources = json_pack("[{s:i,s:s,s:s,s:s,s:i,s:i},{s:b}]", "node", 1, "store", "10.0.0.9:7400",
                          "near", "zone", "tier", "dram", "from", 0, "tokens", 64, "more", 1);
    kvf__httpd *d;
    char err[300];
    assert_int_equal(kvf__httpd_start(&d, "127.0.0.1", 0, KVF_HTTPD_PER_CONNECTION, 1 << 20, handle,
                                      &f, &f.port, err, sizeof err),
                     0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%u", f.port);
    kvfe_router *r;
    if (kvfe_router_open(&r, addr, err, sizeof err) != 0)
        fail_msg("router: %s", err);
    uint32_t t[128];
    for (int i = 0; i < 128; i++)
        t[i] = (uint32_t)(i * 7 + 1);
    kvf_key keys[2] = {{.lo = 1, .hi = 2}, {.lo = 3, .hi = 4}};

    /* disaggregated: the prefill gets deadline and sources, the decode neither */
    serve_one(r, t, keys);
    pthread_mutex_lock(&f.mu);
    assert_non_null(f.prefill);
    assert_true(json_equal(json_object_get(f.prefill, "sources"), f.sources));
    assert_true(json_is_true(json_object_get(f.prefill, "stream")));
    assert_true(json_number_value(json_object_get(f.prefill, "load_deadline_ms")) == 250);
    assert_non_null(f.decode);
    assert_null(json_object_get(f.decode, "sources"));
    assert_null(json_object_get(f.decode, "stream"));
    pthread_mutex_unlock(&f.mu);

    /* colocated: the generate gets them */
    f.colocated = 1;
    serve_one(r, t, keys);
    pthread_mutex_lock(&f.mu);
    assert_non_null(f.gen);
    assert_true(json_equal(json_object_get(f.gen, "sources"), f.sources));
    assert_true(json_is_true(json_object_get(f.gen, "stream")));
    pthread_mutex_unlock(&f.mu);

    /* a plan that loads nothing: no sources, no deadline */
    f.loads = 0;
    f.colocated = 0;
    serve_one(r, t, keys);
    pthread_mutex_lock(&f.mu);
    assert_null(json_object_get(f.prefill, "sources"));
    assert_null(json_object_get(f.prefill, "load_deadline_ms"));
    assert_int_equal(f.places, 3);
    pthread_mutex_unlock(&f.mu);

    kvfe_router_close(&r);
    kvf__httpd_stop(&d);
    json_decref(f.prefill), json_decref(f.decode), json_decref(f.gen), json_decref(f.sources);
    pthread_mutex_destroy(&f.mu);
}

/* A one-connection HTTP server on a raw loopback socket: reads the request's headers and body,
 * sends a chunked reply's first line, waits pause_ms, then the last line and the end. */
typedef struct streamer {
    int lfd;
    uint16_t port;
    const char *first, *last; /* the two lines, newline included */
    int pause_ms;
} streamer;

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void send_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

static void send_chunk(int fd, const char *line)
{
    char buf[512];
    int n = snprintf(buf, sizeof buf, "%zx\r\n%s\r\n", strlen(line), line);
    send_all(fd, buf, (size_t)n);
}

static void *streamer_main(void *arg)
{
    streamer *s = arg;
    struct pollfd p = {.fd = s->lfd, .events = POLLIN};
    if (poll(&p, 1, 5000) != 1)
        return NULL;
    int fd = accept(s->lfd, NULL, NULL);
    if (fd < 0)
        return NULL;
    char req[8192];
    size_t got = 0;
    double until = mono_s() + 5;
    /* the headers, then the body of Content-Length bytes (a small JSON object) */
    while (got < sizeof req - 1 && mono_s() < until) {
        struct pollfd q = {.fd = fd, .events = POLLIN};
        if (poll(&q, 1, 100) != 1)
            continue;
        ssize_t r = recv(fd, req + got, sizeof req - 1 - got, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
        req[got] = '\0';
        char *end = strstr(req, "\r\n\r\n");
        char *cl = strcasestr(req, "Content-Length:");
        if (end && cl && got >= (size_t)(end + 4 - req) + (size_t)atoi(cl + 15))
            break;
    }
    const char *hdr = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n";
    send_all(fd, hdr, strlen(hdr));
    send_chunk(fd, s->first);
    usleep((useconds_t)s->pause_ms * 1000);
    send_chunk(fd, s->last);
    send_all(fd, "0\r\n\r\n", 5);
    close(fd);
    return NULL;
}

static void streamer_start(streamer *s, pthread_t *th)
{
    s->lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s->lfd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    assert_int_equal(bind(s->lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(s->lfd, 1), 0);
    assert_int_equal(getsockname(s->lfd, (struct sockaddr *)&a, &al), 0);
    s->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(th, NULL, streamer_main, s), 0);
}

typedef struct first_seen {
    double at;
    json_int_t token;
    int calls;
} first_seen;

static void on_first(void *arg, json_t *line)
{
    first_seen *f = arg;
    f->at = mono_s();
    f->token = json_integer_value(json_object_get(line, "first_token"));
    f->calls++;
}

/* Streams first and last through a server that waits pause_ms between them; returns the call's
 * code with its status, reply and what on_first saw. */
static int stream_once(const char *first, const char *last, int pause_ms, long *st, json_t **reply,
                       first_seen *fs, double *done_at)
{
    streamer s = {.first = first, .last = last, .pause_ms = pause_ms};
    pthread_t th;
    streamer_start(&s, &th);
    char url[64], err[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%u/v1/prefill", s.port);
    json_t *body = json_pack("{s:[i],s:b}", "tokens", 1, "stream", 1);
    int rc = kvf__http_call_stream("POST", url, body, NULL, 5000, on_first, fs, st, reply, err,
                                   sizeof err);
    *done_at = mono_s();
    json_decref(body);
    pthread_join(th, NULL);
    close(s.lfd);
    return rc;
}

static void test_a_streamed_first_token_comes_before_the_reply(void **state)
{
    (void)state;
    long st;
    json_t *rep = NULL;
    first_seen fs = {0};
    double done;
    int rc = stream_once("{\"first_token\": 42, \"label\": \"real\"}\n",
                         "{\"tokens\": [42], \"saved_tokens\": 256}\n", 300, &st, &rep, &fs, &done);
    assert_int_equal(rc, 0);
    assert_int_equal(st, 200);
    assert_int_equal(fs.calls, 1);
    assert_int_equal(fs.token, 42);
    assert_true(done - fs.at >= 0.25); /* given when it came, not with the reply */
    assert_int_equal(json_integer_value(json_object_get(rep, "saved_tokens")), 256);
    json_decref(rep);

    /* an error after the first line: its status is the call's */
    memset(&fs, 0, sizeof fs);
    rep = NULL;
    rc = stream_once("{\"first_token\": 7}\n", "{\"error\": \"prefill: boom\", \"status\": 500}\n",
                     0, &st, &rep, &fs, &done);
    assert_int_equal(rc, 0);
    assert_int_equal(fs.calls, 1);
    assert_int_equal(st, 500);
    assert_string_equal(json_string_value(json_object_get(rep, "error")), "prefill: boom");
    json_decref(rep);

    /* a first line that is not a first token's: no call, and the body is not one document */
    memset(&fs, 0, sizeof fs);
    rep = NULL;
    rc = stream_once("{\"tokens\": [1]}\n", "{\"tokens\": [2]}\n", 0, &st, &rep, &fs, &done);
    assert_int_equal(rc, 0);
    assert_int_equal(fs.calls, 0);
    assert_null(rep);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_router_carries_the_plan),
        cmocka_unit_test(test_a_streamed_first_token_comes_before_the_reply),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
