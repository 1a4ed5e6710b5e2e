/*
 * kvf-sched over HTTP and ZeroMQ: a real daemon on loopback, an engine instance that publishes KV
 * events in vLLM's format (a ZeroMQ PUB socket of this test, msgpack-c encoding), placements that
 * follow the published blocks, and bad input (malformed JSON, unknown instances and paths, invalid
 * tokens, garbage msgpack, sequence gaps) that gets clear errors while the daemon keeps serving.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <inttypes.h>
#include <msgpack.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <sodium.h>
#include <zmq.h>

#include "kvf/events.h"
#include "kvf/kvf.h"

#include "harness.h"
#include "kvevents_util.h"
#include "http.h"
#include "tcp.h"

/* kvf-sched's index sized for what these tests publish (it grows past it): the default's 192
 * MiB of tables, zeroed at every start, cost seconds a start under ThreadSanitizer. */
#define SMALL_INDEX (char *)"--index-blocks", (char *)"4096"

#ifndef KVF_SCHED_BIN
#error "KVF_SCHED_BIN must name the kvf-sched binary"
#endif
#ifndef KVF_ENGINE_BIN
#error "KVF_ENGINE_BIN must name the kvf-engine binary"
#endif

/* One HTTP/1.1 request with Connection: close; returns the status and copies the body. */
static int http(const daemon_t *d, const char *method, const char *path, const char *body,
                char *out, size_t outlen)
{
    int fd;
    char err[128];
    assert_int_equal(kvf__tcp_connect("127.0.0.1", d->port, 2000, &fd, err, sizeof err), 0);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    struct timeval tv = {.tv_sec = 5, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char req[8192];
    int n = snprintf(req, sizeof req,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n%s",
                     method, path, body ? strlen(body) : 0, body ? body : "");
    assert_true(n > 0 && (size_t)n < sizeof req);
    assert_int_equal(send(fd, req, (size_t)n, MSG_NOSIGNAL), n);
    static char resp[1 << 16];
    size_t got = 0;
    for (;;) {
        ssize_t r = recv(fd, resp + got, sizeof resp - 1 - got, 0);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    resp[got] = '\0';
    int status = 0;
    sscanf(resp, "HTTP/1.%*d %d", &status);
    const char *b = strstr(resp, "\r\n\r\n");
    snprintf(out, outlen, "%s", b ? b + 4 : "");
    return status;
}

static long stat_of(const daemon_t *d, const char *key)
{
    char body[4096], want[64];
    assert_int_equal(http(d, "GET", "/v1/index/stats", NULL, body, sizeof body), 200);
    snprintf(want, sizeof want, "\"%s\":", key);
    const char *p = strstr(body, want);
    return p ? strtol(p + strlen(want), NULL, 10) : -1;
}

/* Publishes sb's batch as seq until the daemon's index holds `blocks` blocks: ZeroMQ drops what a
 * subscriber has not joined for yet, so the first batches may be lost. Bounded to 5 s. */
static void publish_until(daemon_t *d, void *pub, uint64_t seq, const msgpack_sbuffer *sb,
                          long blocks)
{
    for (int i = 0; i < 100 && stat_of(d, "blocks") < blocks; i++) {
        publish(pub, seq, sb->data, sb->size);
        usleep(50000);
    }
    assert_int_equal(stat_of(d, "blocks"), blocks);
}

/* Instance "hot" publishes 64 blocks of 16 tokens (1024 tokens from id 100); "cold" none. */
static void register_and_index(daemon_t *d, void *pub, const char *ep)
{
    char body[1024], out[8192];
    snprintf(body, sizeof body,
             "{\"id\":\"hot\",\"role\":\"both\",\"block_tokens\":16,\"capacity_blocks\":10000,"
             "\"events\":\"%s\",\"endpoint\":\"127.0.0.1:9001\"}",
             ep);
    assert_int_equal(http(d, "POST", "/v1/instances", body, out, sizeof out), 201);
    assert_int_equal(http(d, "POST", "/v1/instances",
                          "{\"id\":\"cold\",\"role\":\"both\",\"block_tokens\":16,"
                          "\"capacity_blocks\":10000,\"endpoint\":\"127.0.0.1:9002\"}",
                          out, sizeof out),
                     201);
    assert_int_equal(http(d, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, "\"hot\""));
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_stored(&sb, 5000, 64, 16, 100);
    publish_until(d, pub, 1, &sb, 64);
    msgpack_sbuffer_destroy(&sb);
}

/* Garbage and a sequence gap: logged and counted, the daemon goes on. */
static void garbage_is_counted(daemon_t *d, void *pub)
{
    static const uint8_t junk[] = {0xc1, 0xc1, 0xc1};
    long malformed = stat_of(d, "malformed");
    publish(pub, 12, junk, sizeof junk);
    for (int i = 0; i < 100 && stat_of(d, "malformed") == malformed; i++)
        usleep(20000);
    assert_true(stat_of(d, "malformed") > malformed);
    assert_true(stat_of(d, "sequence_gaps") >= 1);
}

/* Bad HTTP input: each a clear error, nothing else changes. */
static void bad_http_input(daemon_t *d)
{
    char out[8192];
    assert_int_equal(http(d, "POST", "/v1/place", "{not json", out, sizeof out), 400);
    assert_non_null(strstr(out, "JSON"));
    assert_int_equal(http(d, "POST", "/v1/place", "{\"tokens\":[1,-2]}", out, sizeof out), 400);
    assert_non_null(strstr(out, "tokens[1]"));
    assert_int_equal(http(d, "POST", "/v1/place", "{\"tokens\":[]}", out, sizeof out), 400);
    assert_int_equal(http(d, "POST", "/v1/instances/nobody/load", "{\"queued_prefill_tokens\":5}",
                          out, sizeof out),
                     404);
    assert_non_null(strstr(out, "nobody"));
    assert_int_equal(http(d, "POST", "/v1/instances", "{\"role\":\"both\"}", out, sizeof out), 400);
    assert_non_null(strstr(out, "is required"));
    assert_int_equal(
        http(d, "POST", "/v1/instances", "{\"id\":\"x\",\"role\":\"boss\"}", out, sizeof out), 400);
    assert_int_equal(http(d, "GET", "/nowhere", NULL, out, sizeof out), 404);
    assert_int_equal(http(d, "DELETE", "/v1/place", NULL, out, sizeof out), 405);
}

/* Receives one replay request waiting on router (50 ms at most): the requester's identity into
 * id (zmq_msg_init'ed by the caller, closed by it), the number asked for returned; -1 when none
 * came. */
static long recv_request(void *router, zmq_msg_t *id)
{
    zmq_pollitem_t it = {.socket = router, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, 50) <= 0)
        return -1;
    zmq_msg_t delim, seqm;
    zmq_msg_init(&delim);
    zmq_msg_init(&seqm);
    zmq_msg_recv(id, router, 0);
    zmq_msg_recv(&delim, router, 0);
    zmq_msg_recv(&seqm, router, 0);
    assert_int_equal(zmq_msg_size(&seqm), 8);
    uint64_t from = 0;
    for (int i = 0; i < 8; i++)
        from = from << 8 | ((uint8_t *)zmq_msg_data(&seqm))[i];
    zmq_msg_close(&delim);
    zmq_msg_close(&seqm);
    return (long)from;
}

/* Sends requester id the end of a replay or snapshot: numbered seq, with an empty payload (a
 * snapshot's says the last batch of the stream it reflects). */
static void send_end(void *router, zmq_msg_t *id, uint64_t seq)
{
    uint8_t s8[8];
    for (int i = 0; i < 8; i++)
        s8[i] = (uint8_t)(seq >> (56 - 8 * i));
    zmq_send(router, zmq_msg_data(id), zmq_msg_size(id), ZMQ_SNDMORE);
    zmq_send(router, "", 0, ZMQ_SNDMORE);
    zmq_send(router, s8, 8, ZMQ_SNDMORE);
    zmq_send(router, "", 0, 0);
}

/* Answers requester id with the batches of bufs numbered from on, then the end of the replay
 * where `end` is set (else the answers just stop: a publisher too slow for the replay's time). */
static void answer_some(void *router, zmq_msg_t *id, uint64_t from, const msgpack_sbuffer *bufs,
                        const uint64_t *seqs, int n, int end)
{
    for (int k = 0; k < n; k++) {
        if (seqs[k] < from)
            continue;
        uint8_t s8[8];
        for (int i = 0; i < 8; i++)
            s8[i] = (uint8_t)(seqs[k] >> (56 - 8 * i));
        zmq_send(router, zmq_msg_data(id), zmq_msg_size(id), ZMQ_SNDMORE);
        zmq_send(router, "", 0, ZMQ_SNDMORE);
        zmq_send(router, s8, 8, ZMQ_SNDMORE);
        zmq_send(router, bufs[k].data, bufs[k].size, 0);
    }
    if (end)
        send_end(router, id, UINT64_MAX);
}

static void answer_batches(void *router, zmq_msg_t *id, uint64_t from, const msgpack_sbuffer *bufs,
                           const uint64_t *seqs, int n)
{
    answer_some(router, id, from, bufs, seqs, n, 1);
}

/* Receives the next replay request on router (5 s at most) and answers it with the first batch
 * of bufs it asks for and nothing more, not even the end (a slow publisher). Returns the number
 * asked for, or -1. */
static long answer_one_and_stop(void *router, const msgpack_sbuffer *bufs, const uint64_t *seqs,
                                int n)
{
    long from = -1;
    for (int i = 0; i < 100 && from < 0; i++) {
        zmq_msg_t id;
        zmq_msg_init(&id);
        if ((from = recv_request(router, &id)) >= 0)
            for (int k = 0; k < n; k++)
                if (seqs[k] >= (uint64_t)from) {
                    answer_some(router, &id, (uint64_t)from, &bufs[k], &seqs[k], 1, 0);
                    break;
                }
        zmq_msg_close(&id);
    }
    return from;
}

/* Answers one replay request waiting on router (50 ms at most) with the batches of bufs whose
 * number (seqs) is at least the one asked for, then the end of the replay. Returns the number
 * asked for, or -1 when no request came. */
static long serve_batches(void *router, const msgpack_sbuffer *bufs, const uint64_t *seqs, int n)
{
    zmq_msg_t id;
    zmq_msg_init(&id);
    long from = recv_request(router, &id);
    if (from >= 0)
        answer_batches(router, &id, (uint64_t)from, bufs, seqs, n);
    zmq_msg_close(&id);
    return from;
}

/* Registers instance id (16-token blocks, more fields in extra: "" or ",\"key\":..."), an engine
 * whose events the test publishes on *pub and whose replay requests it answers on *router. */
static void engine_with_replay(daemon_t *d, void *ctx, const char *id, const char *extra,
                               void **pub, void **router)
{
    char ep[128], rep[128], body[1024], out[8192];
    *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    *router = pub_open(ctx, ZMQ_ROUTER, rep, sizeof rep);
    snprintf(body, sizeof body,
             "{\"id\":\"%s\",\"block_tokens\":16,\"events\":\"%s\",\"replay\":\"%s\"%s}", id, ep,
             rep, extra);
    assert_int_equal(http(d, "POST", "/v1/instances", body, out, sizeof out), 201);
}

/* A publisher with a replay socket: a skipped batch is asked for and recovered. */
static void replay_recovers_gap(daemon_t *d, void *ctx)
{
    void *pub2, *router;
    engine_with_replay(d, ctx, "rep", "", &pub2, &router);
    /* its first contact: everything the window holds is asked for at once; nothing yet */
    long first = -1;
    for (int i = 0; i < 40 && first < 0; i++)
        first = serve_batches(router, NULL, NULL, 0);
    assert_int_equal(first, 0);
    msgpack_sbuffer a, b2, c3;
    msgpack_sbuffer_init(&a);
    msgpack_sbuffer_init(&b2);
    msgpack_sbuffer_init(&c3);
    pack_stored(&a, 100000, 8, 16, 20000);
    pack_stored(&b2, 200000, 8, 16, 30000);
    pack_stored(&c3, 300000, 8, 16, 40000);
    publish_until(d, pub2, 1, &a, 72);
    publish(pub2, 3, c3.data, c3.size); /* batch 2 never published live */
    long asked = -1;
    uint64_t seq2 = 2;
    for (int i = 0; i < 40 && asked < 0; i++)
        asked = serve_batches(router, &b2, &seq2, 1);
    assert_int_equal(asked, 2); /* from batch 2 */
    for (int i = 0; i < 100 && stat_of(d, "blocks") < 88; i++)
        usleep(20000);
    assert_int_equal(stat_of(d, "blocks"), 88);
    assert_int_equal(stat_of(d, "batches_replayed"), 1);
    msgpack_sbuffer_destroy(&a);
    msgpack_sbuffer_destroy(&b2);
    msgpack_sbuffer_destroy(&c3);
    zmq_close(pub2);
    zmq_close(router);
}

/* Publishes one batch as seq and waits (bounded, 5 s) for the daemon to have ingested it. */
static void publish_seen(daemon_t *d, void *pub, uint64_t seq, const msgpack_sbuffer *sb)
{
    long batches = stat_of(d, "batches");
    publish(pub, seq, sb->data, sb->size);
    for (int i = 0; i < 250 && stat_of(d, "batches") == batches; i++)
        usleep(20000);
    assert_true(stat_of(d, "batches") > batches);
}

/* Starts kvf-sched on a free port, with one more option and its value when opt1 is not NULL. */
static void sched_start(daemon_t *d, const char *opt1, const char *val1)
{
    char *argv[] = {(char *)KVF_SCHED_BIN, SMALL_INDEX,           (char *)"--listen",
                    (char *)"127.0.0.1:0", (char *)"--log-level", (char *)"warn",
                    (char *)opt1,          (char *)val1,          NULL};
    proc_start(d, argv);
}

/* Sequence numbers near 2^63, wrapping past 2^64 and going backwards (a publisher that restarts)
 * are counted as what they are: batches_missed adds only the plausible gaps, in unsigned
 * arithmetic, and never turns huge or negative. */
static void test_sched_daemon_sequence_extremes(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    void *ctx = zmq_ctx_new();
    char ep[128], body[512], out[8192];
    void *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    snprintf(body, sizeof body, "{\"id\":\"seq\",\"block_tokens\":16,\"events\":\"%s\"}", ep);
    assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 201);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_stored(&sb, 7000, 4, 16, 500);
    publish_until(&d, pub, 1, &sb, 4);
    assert_int_equal(stat_of(&d, "batches_missed"), 0);

    static const struct {
        uint64_t seq;
        long missed; /* batches_missed after it */
    } steps[] = {
        {((uint64_t)1 << 63) - 10, 0}, /* a jump of 2^63: a restart, not 2^63 missed */
        {((uint64_t)1 << 63) + 5, 14}, /* 14 missed across 2^63 */
        {UINT64_MAX, 14},              /* another implausible jump */
        {1, 15},                       /* wraps past 2^64: batch 0 missed */
        {0, 15},                       /* backwards: the publisher restarted */
        {5, 19},                       /* 1..4 missed */
    };
    for (size_t k = 0; k < sizeof steps / sizeof steps[0]; k++) {
        publish_seen(&d, pub, steps[k].seq, &sb);
        long missed = stat_of(&d, "batches_missed");
        print_message("seq %" PRIu64 ": batches_missed %ld\n", steps[k].seq, missed);
        assert_true(missed >= 0);
        assert_int_equal(missed, steps[k].missed);
    }
    assert_int_equal(stat_of(&d, "sequence_gaps"), 3);
    assert_int_equal(stat_of(&d, "sequence_restarts"), 3);
    msgpack_sbuffer_destroy(&sb);
    zmq_close(pub);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

/* Milliseconds on the monotonic clock. */
static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Takes the replay requests waiting on router without answering them; returns how many. */
static int swallow_requests(void *router, int timeout_ms)
{
    int n = 0;
    zmq_pollitem_t it = {.socket = router, .events = ZMQ_POLLIN};
    for (int guard = 0; guard < 10000 && zmq_poll(&it, 1, timeout_ms) > 0; guard++) {
        zmq_msg_t part;
        int more = 1;
        for (int f = 0; f < 16 && more; f++) {
            zmq_msg_init(&part);
            zmq_msg_recv(&part, router, 0);
            more = zmq_msg_more(&part);
            zmq_msg_close(&part);
        }
        n++;
    }
    return n;
}

/* A replay socket that takes requests and never answers: placements stay fast while replays hang
 * (the daemon waits on the network without its lock), and after the first timeout the publisher's
 * replay is left alone for a back-off period instead of being asked at every gap. */
static void test_sched_daemon_hung_replay(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    void *ctx = zmq_ctx_new(), *pub, *router;
    char body[8192], out[8192];
    engine_with_replay(&d, ctx, "hung",
                       ",\"capacity_blocks\":10000,\"endpoint\":\"127.0.0.1:9003\"", &pub, &router);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_stored(&sb, 9000, 8, 16, 700);
    publish_until(&d, pub, 1, &sb, 8);

    char *p = body;
    p += sprintf(p, "{\"output_tokens\":16,\"tokens\":[");
    for (int i = 0; i < 200; i++)
        p += sprintf(p, "%s%d", i ? "," : "", 700 + i);
    sprintf(p, "]}");
    /* Every batch skips one: a gap, and a replay request that hangs, each time. */
    uint64_t seq = 1;
    int requests = 0;
    double worst = 0, start = now_ms();
    for (int i = 0; i < 30 && now_ms() - start < 20000; i++) {
        seq += 2;
        publish(pub, seq, sb.data, sb.size);
        usleep(2000); /* the batch reaches the daemon, whose replay request is then in flight */
        double t0 = now_ms();
        assert_int_equal(http(&d, "POST", "/v1/place", body, out, sizeof out), 200);
        double ms = now_ms() - t0;
        worst = ms > worst ? ms : worst;
        requests += swallow_requests(router, 0);
        usleep(20000);
    }
    requests += swallow_requests(router, 300);
    print_message("hung replay: worst place %.1f ms, %d replay requests for 30 gaps\n", worst,
                  requests);
    assert_true(worst < 100);
    assert_true(requests >= 1);
    assert_true(requests <= 3);
    assert_true(stat_of(&d, "sequence_gaps") >= 30);
    assert_true(stat_of(&d, "replay_timeouts") >= 1);
    msgpack_sbuffer_destroy(&sb);
    zmq_close(pub);
    zmq_close(router);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

static void test_sched_daemon_events_and_placement(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    void *ctx = zmq_ctx_new();
    char ep[128];
    void *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    register_and_index(&d, pub, ep);

    /* A request sharing those 1024 tokens goes where they are cached. */
    char body[8192], out[8192];
    char *p = body;
    p += sprintf(p, "{\"output_tokens\":64,\"tokens\":[");
    for (int i = 0; i < 1200; i++)
        p += sprintf(p, "%s%d", i ? "," : "", 100 + i);
    sprintf(p, "]}");
    assert_int_equal(http(&d, "POST", "/v1/place", body, out, sizeof out), 200);
    assert_non_null(strstr(out, "\"prefill\":\"hot\""));
    assert_non_null(strstr(out, "\"device\":1024"));
    assert_non_null(strstr(out, "\"label\":\"real\""));

    garbage_is_counted(&d, pub);
    bad_http_input(&d);

    /* A busy cache holder loses to an idle instance once its queue outweighs the cache. */
    assert_int_equal(http(&d, "POST", "/v1/instances/hot/load",
                          "{\"queued_prefill_tokens\":500000,\"used_blocks\":100}", out,
                          sizeof out),
                     200);
    assert_int_equal(http(&d, "POST", "/v1/place", body, out, sizeof out), 200);
    assert_non_null(strstr(out, "\"prefill\":\"cold\""));
    assert_int_equal(http(&d, "GET", "/metrics", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, "kvf_sched_index_blocks 64"));
    assert_non_null(strstr(out, "kvf_sched_placements_total 2"));

    replay_recovers_gap(&d, ctx);
    zmq_close(pub);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

/* Late join: an engine that published batches 1..3 before kvf-sched knew it, and is idle: at its
 * first contact kvf-sched asks the replay socket from the start and indexes all three, before any
 * further batch; then batch 4 follows them. Then a
 * gap wider than the replay window (batches 5 and 6 lost, the window starting at 7): a full
 * resync drops what the index held of the engine, which the window and the live stream rebuild,
 * so nothing stale stays. */
static void test_sched_daemon_late_join_and_resync(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    void *ctx = zmq_ctx_new();
    char ep[128], rep[128], body[512], out[8192];
    void *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    void *router = pub_open(ctx, ZMQ_ROUTER, rep, sizeof rep);
    msgpack_sbuffer b[8];
    for (int k = 0; k < 8; k++) {
        msgpack_sbuffer_init(&b[k]);
        pack_stored(&b[k], 100000u * (uint64_t)(k + 1), 8, 16, 10000u * (uint32_t)(k + 1));
        if (k < 3)
            publish(pub, (uint64_t)k + 1, b[k].data, b[k].size); /* nobody listens yet */
    }
    snprintf(body, sizeof body,
             "{\"id\":\"late\",\"block_tokens\":16,\"events\":\"%s\",\"replay\":\"%s\"}", ep, rep);
    assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 201);
    /* First contact: kvf-sched asks the replay socket from the start as soon as it subscribes.
     * The engine publishes nothing more (it is idle), and its three batches are known all the
     * same. */
    uint64_t seqs[3] = {1, 2, 3};
    long asked = -1;
    for (int i = 0; i < 100 && asked < 0; i++)
        asked = serve_batches(router, b, seqs, 3);
    assert_int_equal(asked, 0);
    /* the contact is counted once its batches are applied: both waited for */
    for (int i = 0; i < 100 && (stat_of(&d, "blocks") < 24 || stat_of(&d, "late_joins") < 1); i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "blocks"), 24);
    assert_int_equal(stat_of(&d, "late_joins"), 1);
    assert_int_equal(stat_of(&d, "batches_replayed"), 3);
    /* the live stream goes on from there: batch 3 again (queued while the replay ran) changes
     * nothing, batch 4 follows without a gap */
    publish(pub, 3, b[2].data, b[2].size);
    for (int i = 0; i < 100 && stat_of(&d, "blocks") < 32; i++) {
        publish(pub, 4, b[3].data, b[3].size);
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "blocks"), 32);
    assert_int_equal(stat_of(&d, "late_joins"), 1);
    assert_int_equal(stat_of(&d, "batches_replayed"), 3);
    assert_int_equal(stat_of(&d, "sequence_gaps"), 0);
    assert_int_equal(stat_of(&d, "resyncs"), 0);

    uint64_t seq7 = 7;
    publish(pub, 8, b[7].data, b[7].size); /* 5, 6 and 7 missed: 7 is in the window, not 5 */
    asked = -1;
    for (int i = 0; i < 60 && asked < 0; i++)
        asked = serve_batches(router, &b[6], &seq7, 1);
    assert_int_equal(asked, 5);
    for (int i = 0; i < 100 && stat_of(&d, "blocks") != 16; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "blocks"), 16); /* batches 7 and 8; 1..4 dropped */
    assert_int_equal(stat_of(&d, "resyncs"), 1);
    for (int k = 0; k < 8; k++)
        msgpack_sbuffer_destroy(&b[k]);
    zmq_close(pub);
    zmq_close(router);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

/* Receives the next replay request on router (5 s at most) and answers it with the batches of
 * bufs (seqs: their numbers; n 0: none), or with nothing at all where ignore is set (a replay
 * socket that lost it). Returns the number asked for, or -1 when no request came. */
static long next_request(void *router, const msgpack_sbuffer *bufs, const uint64_t *seqs, int n,
                         int ignore)
{
    long from = -1;
    for (int i = 0; i < 100 && from < 0; i++) {
        zmq_msg_t id;
        zmq_msg_init(&id);
        if ((from = recv_request(router, &id)) >= 0 && !ignore)
            answer_batches(router, &id, (uint64_t)from, bufs, seqs, n);
        zmq_msg_close(&id);
    }
    return from;
}

/* 1 when no replay request waits on router (50 ms), else 0 (the request taken). */
static int no_request(void *router)
{
    zmq_msg_t id;
    zmq_msg_init(&id);
    long from = recv_request(router, &id);
    zmq_msg_close(&id);
    return from < 0;
}

/* Packs n batches of 8 blocks into b (each its own tokens; destroyed by the caller). */
static void pack_batches(msgpack_sbuffer *b, int n)
{
    for (int k = 0; k < n; k++) {
        msgpack_sbuffer_init(&b[k]);
        pack_stored(&b[k], 100000u * (uint64_t)(k + 1), 8, 16, 10000u * (uint32_t)(k + 1));
    }
}

/* Answers the first contact on router with nothing (5 s at most) and packs four batches of 8
 * blocks into b (to be destroyed by the caller). */
static void empty_contact_and_batches(void *router, msgpack_sbuffer b[4])
{
    assert_int_equal(next_request(router, NULL, NULL, 0, 0), 0); /* the first contact: nothing */
    pack_batches(b, 4);
}

/* Waits (2 s at most) for the four batches of empty_contact_and_batches() to be indexed, two of
 * them (and the live one after them) through replays, one of which was asked again, and no
 * resync. */
static void gap_learnt_by_one_retry(const daemon_t *d)
{
    for (int i = 0; i < 100 && stat_of(d, "blocks") < 32; i++)
        usleep(20000);
    assert_int_equal(stat_of(d, "blocks"), 32);
    assert_int_equal(stat_of(d, "replay_retries"), 1);
    assert_int_equal(stat_of(d, "batches_replayed"), 3);
    assert_int_equal(stat_of(d, "resyncs"), 0);
}

/* A replay that got no answer is not forgotten: the batches of the gap are asked for again
 * when the back-off ends, together with those applied live since (in order again, so a block
 * removed in the gap and stored after it, or the other way round, ends as the engine has it),
 * and the engine's blocks of the gap become known. */
static void test_sched_daemon_unanswered_replay_is_asked_again(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    void *ctx = zmq_ctx_new(), *pub, *router;
    engine_with_replay(&d, ctx, "owed", "", &pub, &router);
    msgpack_sbuffer b[4];
    empty_contact_and_batches(router, b);
    publish_until(&d, pub, 1, &b[0], 8);
    publish(pub, 3, b[2].data, b[2].size);                       /* batch 2 lost on the way */
    assert_int_equal(next_request(router, NULL, NULL, 0, 1), 2); /* ... and its replay too */
    for (int i = 0; i < 100 && stat_of(&d, "replay_timeouts") < 1; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "replay_timeouts"), 1);
    /* the stream goes on meanwhile, without a gap */
    for (int i = 0; i < 100 && stat_of(&d, "blocks") < 24; i++) {
        publish(pub, 4, b[3].data, b[3].size);
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "blocks"), 24);
    assert_int_equal(stat_of(&d, "replay_retries"), 0);
    /* once the back-off (2 s) ends, batches 2 to 4 are asked for again */
    uint64_t seqs[3] = {2, 3, 4};
    assert_int_equal(next_request(router, &b[1], seqs, 3, 0), 2);
    gap_learnt_by_one_retry(&d);
    /* and not again: nothing is owed any more */
    usleep(300000);
    assert_int_equal(no_request(router), 1);
    assert_int_equal(stat_of(&d, "replay_retries"), 1);
    for (int k = 0; k < 4; k++)
        msgpack_sbuffer_destroy(&b[k]);
    zmq_close(pub);
    zmq_close(router);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

/* kvf-sched and engine id, whose events the test publishes on *pub and whose replay requests it
 * answers on *router; then_stop() ends them. */
static void sched_and_engine(daemon_t *d, void *ctx, const char *id, void **pub, void **router)
{
    sched_start(d, NULL, NULL);
    engine_with_replay(d, ctx, id, "", pub, router);
}

static void then_stop(daemon_t *d, void *pub, void *router)
{
    zmq_close(pub);
    zmq_close(router);
    daemon_stop(d);
}

/* A replay whose answers stop without the end marker (a publisher too slow for the replay's
 * time, as a large window under load) is continued from the first batch not applied at the next
 * round, not taken for lost batches: no resync (which would drop blocks that are still true),
 * and the blocks of the gap and after it known. */
static void test_sched_daemon_slow_replay_is_continued(void **state)
{
    (void)state;
    daemon_t d;
    void *ctx = zmq_ctx_new(), *pub, *router;
    sched_and_engine(&d, ctx, "slow", &pub, &router);
    msgpack_sbuffer b[4];
    empty_contact_and_batches(router, b);
    publish_until(&d, pub, 1, &b[0], 8);
    publish(pub, 4, b[3].data, b[3].size); /* batches 2 and 3 lost on the way */
    uint64_t seqs[3] = {2, 3, 4};
    assert_int_equal(answer_one_and_stop(router, &b[1], seqs, 3), 2);
    assert_int_equal(next_request(router, &b[2], &seqs[1], 2, 0), 3); /* the rest, at once */
    gap_learnt_by_one_retry(&d);
    for (int k = 0; k < 4; k++)
        msgpack_sbuffer_destroy(&b[k]);
    then_stop(&d, pub, router);
    zmq_ctx_term(ctx);
}

/* Waits (10 s at most each) for a request on each of the n routers, taking it unanswered, and
 * closes them and their publishers: the number of routers that were asked. */
static int each_asked_then_close(void **pubs, void **routers, int n)
{
    int asked = 0;
    for (int k = 0; k < n; k++) {
        double s0 = now_ms();
        int got = 0;
        while (!got && now_ms() - s0 < 10000)
            got = swallow_requests(routers[k], 100);
        asked += got > 0;
    }
    for (int k = 0; k < n; k++) {
        zmq_close(pubs[k]);
        zmq_close(routers[k]);
    }
    return asked;
}

/* Engines whose replay sockets take requests and never answer, registered together, cost the
 * events thread 200 ms each at their first contact; a round asks for 100 ms at most before it
 * reads the live streams again, so a healthy engine's batches are indexed while those contacts
 * go on (asked one after the other, 30 of them held it back 6 s), and each of them is asked in
 * its turn. */
static void test_sched_daemon_silent_replay_sockets(void **state)
{
    (void)state;
    enum { SILENT = 30 };
    daemon_t d;
    void *ctx = zmq_ctx_new(), *pub, *router, *spub[SILENT], *srouter[SILENT];
    sched_and_engine(&d, ctx, "healthy", &pub, &router);
    msgpack_sbuffer b[4];
    empty_contact_and_batches(router, b);
    publish_until(&d, pub, 1, &b[0], 8);
    for (int k = 0; k < SILENT; k++) {
        char id[32];
        snprintf(id, sizeof id, "silent%d", k);
        engine_with_replay(&d, ctx, id, "", &spub[k], &srouter[k]);
    }
    /* while their first contacts go on, each new batch of the healthy engine is indexed soon */
    double worst = 0, end = now_ms() + 3000;
    long blocks = 8;
    for (uint64_t seq = 2; seq < 200 && now_ms() < end; seq++) {
        msgpack_sbuffer x;
        msgpack_sbuffer_init(&x);
        pack_stored(&x, 500000u + 1000u * seq, 8, 16, 200000u + 1000u * (uint32_t)seq);
        double t0 = now_ms();
        publish(pub, seq, x.data, x.size);
        blocks += 8;
        while (stat_of(&d, "blocks") < blocks && now_ms() - t0 < 10000)
            usleep(10000);
        worst = now_ms() - t0 > worst ? now_ms() - t0 : worst;
        assert_int_equal(stat_of(&d, "blocks"), blocks);
        msgpack_sbuffer_destroy(&x);
        usleep(50000);
    }
    print_message("a healthy engine's batches indexed within %.0f ms beside %d silent first "
                  "contacts\n",
                  worst, SILENT);
    assert_true(worst < 1500);
    /* each silent socket is asked in its turn (30 x 200 ms of silence, over many rounds) */
    assert_true(stat_of(&d, "replay_asks_deferred") >= 1);
    assert_int_equal(each_asked_then_close(spub, srouter, SILENT), SILENT);
    for (int k = 0; k < 4; k++)
        msgpack_sbuffer_destroy(&b[k]);
    then_stop(&d, pub, router);
    zmq_ctx_term(ctx);
}

/* Gaps in many engines' streams at once, behind replay sockets that take requests and never
 * answer: a gap's replay shares its round's asking time (what the round's asks left of 100 ms; a
 * silent socket's replay takes its 200 ms), so the gaps past it are owed to later rounds, each
 * asked in its turn, and a healthy engine's batches are indexed meanwhile. (Asked as their batches
 * were read, ten such gaps held the healthy engine's next batch back 1.7 s.) */
static void test_sched_daemon_gaps_share_the_round(void **state)
{
    (void)state;
    enum { GAPPY = 10 };
    daemon_t d;
    void *ctx = zmq_ctx_new(), *pub, *router, *gpub[GAPPY], *grouter[GAPPY];
    sched_and_engine(&d, ctx, "healthy", &pub, &router);
    msgpack_sbuffer b[4], x[GAPPY];
    empty_contact_and_batches(router, b);
    publish_until(&d, pub, 1, &b[0], 8);
    long blocks = 8;
    for (int k = 0; k < GAPPY; k++) {
        char id[32];
        snprintf(id, sizeof id, "gappy%d", k);
        engine_with_replay(&d, ctx, id, "", &gpub[k], &grouter[k]);
        assert_int_equal(next_request(grouter[k], NULL, NULL, 0, 0), 0); /* contact: nothing */
        msgpack_sbuffer_init(&x[k]);
        pack_stored(&x[k], 700000u + 1000u * (uint64_t)k, 4, 16, 300000u + 1000u * (uint32_t)k);
        blocks += 4;
        publish_until(&d, gpub[k], 1, &x[k], blocks);
    }
    /* every gappy engine's batch 2 is lost on the way; their batches 3 come together */
    long gaps = stat_of(&d, "batches_missed");
    for (int k = 0; k < GAPPY; k++)
        publish(gpub[k], 3, x[k].data, x[k].size);
    for (int i = 0; i < 250 && stat_of(&d, "batches_missed") == gaps; i++)
        usleep(2000);
    assert_true(stat_of(&d, "batches_missed") > gaps);
    double worst = 0;
    for (uint64_t seq = 2; seq <= 4; seq++) {
        double t0 = now_ms();
        publish(pub, seq, b[seq - 1].data, b[seq - 1].size);
        blocks += 8;
        while (stat_of(&d, "blocks") < blocks && now_ms() - t0 < 10000)
            usleep(5000);
        assert_int_equal(stat_of(&d, "blocks"), blocks);
        worst = now_ms() - t0 > worst ? now_ms() - t0 : worst;
        usleep(100000);
    }
    print_message("a healthy engine's batches indexed within %.0f ms beside %d gaps asked of "
                  "silent replay sockets\n",
                  worst, GAPPY);
    assert_true(worst < 1000);
    assert_true(stat_of(&d, "replay_asks_deferred") >= 1);
    /* each gap is asked for in its turn (10 x 200 ms of silence, over many rounds) */
    assert_int_equal(each_asked_then_close(gpub, grouter, GAPPY), GAPPY);
    for (int k = 0; k < GAPPY; k++)
        msgpack_sbuffer_destroy(&x[k]);
    for (int k = 0; k < 4; k++)
        msgpack_sbuffer_destroy(&b[k]);
    then_stop(&d, pub, router);
    zmq_ctx_term(ctx);
}

/* kvf-sched with one storage node (node 0), whose events the test publishes on *spub and whose
 * snapshot requests it answers on *snap. */
static void sched_with_store(daemon_t *d, void *ctx, void **spub, void **snap)
{
    char sev[128], ssnap[128];
    *spub = pub_open(ctx, ZMQ_PUB, sev, sizeof sev);
    *snap = pub_open(ctx, ZMQ_ROUTER, ssnap, sizeof ssnap);
    char *argv[] = {(char *)KVF_SCHED_BIN,
                    SMALL_INDEX,
                    (char *)"--listen",
                    (char *)"127.0.0.1:0",
                    (char *)"--log-level",
                    (char *)"warn",
                    (char *)"--stores",
                    (char *)"127.0.0.1:9",
                    (char *)"--store-events",
                    sev,
                    (char *)"--store-snapshots",
                    ssnap,
                    NULL};
    proc_start(d, argv);
}

/* Receives the next snapshot request on router (5 s at most): its requester into *id
 * (initialized here, closed by the caller). */
static void snapshot_request(void *router, zmq_msg_t *id)
{
    zmq_msg_init(id);
    long from = -1;
    for (int i = 0; i < 100 && from < 0; i++)
        from = recv_request(router, id);
    assert_int_equal(from, 0);
}

/* Sends requester id of router one more answer of a snapshot that never ends: an empty batch. */
static void snapshot_drip(void *router, zmq_msg_t *id)
{
    msgpack_sbuffer e;
    pack_empty(&e);
    uint64_t seq = 1;
    answer_some(router, id, 0, &e, &seq, 1, 0);
    msgpack_sbuffer_destroy(&e);
}

/* A storage node's snapshot socket that answers a batch a second and never ends (a slow or
 * hostile node) is read a slice a round: an engine registered meanwhile is subscribed, contacted
 * and its batches indexed at once (read whole, the snapshot held the events thread up to its
 * 60 s deadline); the snapshot ends as failed 3 s after the node falls silent, and is asked
 * again after the back-off. */
static void test_sched_daemon_slow_snapshot(void **state)
{
    (void)state;
    daemon_t d;
    void *ctx = zmq_ctx_new(), *spub, *snap;
    sched_with_store(&d, ctx, &spub, &snap);
    zmq_msg_t id;
    snapshot_request(snap, &id);
    snapshot_drip(snap, &id);
    double drip = now_ms(), t0 = drip;
    void *pub, *router;
    engine_with_replay(&d, ctx, "beside", "", &pub, &router);
    /* its first contact comes while the snapshot goes on (a batch a second) */
    long contact = -1;
    for (int i = 0; i < 80 && contact < 0; i++) {
        zmq_msg_t cid;
        zmq_msg_init(&cid);
        if ((contact = recv_request(router, &cid)) >= 0)
            answer_batches(router, &cid, 0, NULL, NULL, 0);
        zmq_msg_close(&cid);
        if (now_ms() - drip >= 1000) {
            snapshot_drip(snap, &id);
            drip = now_ms();
        }
    }
    assert_int_equal(contact, 0);
    msgpack_sbuffer b;
    msgpack_sbuffer_init(&b);
    pack_stored(&b, 100000, 8, 16, 10000);
    /* its batches indexed, and the snapshot kept going (a batch a second) for 4 s in all */
    while (now_ms() - t0 < 4000 || stat_of(&d, "blocks") < 8) {
        if (now_ms() - t0 > 10000)
            break;
        if (stat_of(&d, "blocks") < 8)
            publish(pub, 1, b.data, b.size);
        if (now_ms() - drip >= 1000) {
            snapshot_drip(snap, &id);
            drip = now_ms();
        }
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "blocks"), 8);
    assert_int_equal(stat_of(&d, "store_snapshots"), 0);
    assert_int_equal(stat_of(&d, "store_snapshot_failures"), 0);
    /* silent from now: failed after 3 s, asked again after the back-off (2 s), and that one ends */
    for (int i = 0; i < 300 && stat_of(&d, "store_snapshot_failures") < 1; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "store_snapshot_failures"), 1);
    assert_int_equal(next_request(snap, NULL, NULL, 0, 0), 0);
    for (int i = 0; i < 100 && stat_of(&d, "store_snapshots") < 1; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "store_snapshots"), 1);
    zmq_msg_close(&id);
    msgpack_sbuffer_destroy(&b);
    zmq_close(spub);
    zmq_close(snap);
    then_stop(&d, pub, router);
    zmq_ctx_term(ctx);
}

/* Initializes sb with a storage node's batch: ChunksAdmitted (or ChunksEvicted) by node 0 of the
 * keys whose first bytes are lo[0..n-1], in DRAM. */
static void pack_chunks(msgpack_sbuffer *sb, int admitted, const uint8_t *lo, int n)
{
    msgpack_sbuffer_init(sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_double(&pk, 1.5);
    msgpack_pack_array(&pk, 1);
    msgpack_pack_array(&pk, 4);
    const char *type = admitted ? "ChunksAdmitted" : "ChunksEvicted";
    msgpack_pack_str(&pk, strlen(type));
    msgpack_pack_str_body(&pk, type, strlen(type));
    msgpack_pack_uint64(&pk, 0);
    msgpack_pack_array(&pk, (size_t)n);
    for (int k = 0; k < n; k++) {
        uint8_t key[16] = {lo[k], 7};
        msgpack_pack_bin(&pk, 16);
        msgpack_pack_bin_body(&pk, key, 16);
    }
    msgpack_pack_str(&pk, 4);
    msgpack_pack_str_body(&pk, "DRAM", 4);
    msgpack_pack_int(&pk, 0);
}

/* Receives the next snapshot request on router (5 s at most), answers it with the batch in b and
 * the end, numbered seq (the last batch of the stream the snapshot reflects). */
static void serve_snapshot(void *router, const msgpack_sbuffer *b, uint64_t seq)
{
    zmq_msg_t id;
    snapshot_request(router, &id);
    uint64_t one = 1;
    answer_some(router, &id, 0, b, &one, 1, 0);
    send_end(router, &id, seq);
    zmq_msg_close(&id);
}

/* A storage node's stream waits while its snapshot is read, and is applied over it after, in
 * order: a gap (batch 2 lost) asks for a snapshot; the node evicts chunk A (batch 4) before it
 * answers, and its snapshot (taken at batch 3) still holds A; applied after the snapshot, the
 * eviction leaves B, C and D, as the node holds them (applied before it, A would stay). */
static void test_sched_daemon_snapshot_holds_the_stream(void **state)
{
    (void)state;
    daemon_t d;
    void *ctx = zmq_ctx_new(), *spub, *snap;
    sched_with_store(&d, ctx, &spub, &snap);
    static const uint8_t ab[] = {'A', 'B'}, c[] = {'C'}, dd[] = {'D'},
                         abcd[] = {'A', 'B', 'C', 'D'};
    msgpack_sbuffer s_ab, s_c, s_d, s_a, s_abcd;
    pack_chunks(&s_ab, 1, ab, 2);
    pack_chunks(&s_c, 1, c, 1);
    pack_chunks(&s_d, 1, dd, 1);
    pack_chunks(&s_a, 0, ab, 1);
    pack_chunks(&s_abcd, 1, abcd, 4);
    serve_snapshot(snap, &s_ab, 0); /* at first contact: A and B, before any batch */
    for (int i = 0; i < 100 && stat_of(&d, "store_dram_chunks") < 3; i++) {
        publish(spub, 1, s_c.data, s_c.size); /* C */
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "store_dram_chunks"), 3);
    assert_int_equal(stat_of(&d, "store_snapshots"), 1);
    publish(spub, 3, s_d.data, s_d.size); /* D, after a gap: a snapshot is asked */
    zmq_msg_t id;
    snapshot_request(snap, &id);
    publish(spub, 4, s_a.data, s_a.size); /* A evicted while the snapshot is under way */
    usleep(200000);
    uint64_t one = 1;
    answer_some(snap, &id, 0, &s_abcd, &one, 1, 0);
    send_end(snap, &id, 3);
    zmq_msg_close(&id);
    for (int i = 0; i < 100 && stat_of(&d, "store_snapshots") < 2; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "store_snapshots"), 2);
    for (int i = 0; i < 25 && stat_of(&d, "store_dram_chunks") != 3; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "store_dram_chunks"), 3);
    assert_int_equal(stat_of(&d, "sequence_gaps"), 1);
    msgpack_sbuffer *all[] = {&s_ab, &s_c, &s_d, &s_a, &s_abcd};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        msgpack_sbuffer_destroy(all[k]);
    zmq_close(spub);
    zmq_close(snap);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

/* Replay sockets that misbehave as real ones can leave the index neither wrong nor stuck:
 * (1) answers to a request that was given up on come to the old socket, not taken for the next
 * request's (a late answer of a different window); (2) a first contact whose answers skip a
 * batch drops what came before the hole; (3) a replay owed by an engine's earlier life is not
 * asked of its new one (whose window does not reach that far: it would wipe the new blocks);
 * (4) a restart seen while the socket is held off owes the new life's first batches. */
static void test_sched_daemon_replay_socket_misbehaves(void **state)
{
    (void)state;
    msgpack_sbuffer b[4];
    uint64_t seqs[4] = {1, 2, 3, 4};
    daemon_t d;
    void *ctx = zmq_ctx_new(), *pub, *router;
    /* (1) the first contact's request unanswered; when the second comes, the first is answered
     * (batch 3 alone, as a window that moved on would) and then the second (batches 1 and 2) */
    sched_and_engine(&d, ctx, "late", &pub, &router);
    pack_batches(b, 4);
    zmq_msg_t id1, id2;
    zmq_msg_init(&id1);
    zmq_msg_init(&id2);
    long asked = -1;
    for (int i = 0; i < 100 && asked < 0; i++)
        asked = recv_request(router, &id1);
    assert_int_equal(asked, 0);
    asked = -1;
    for (int i = 0; i < 100 && asked < 0; i++) /* after the back-off, 2 s */
        asked = recv_request(router, &id2);
    assert_int_equal(asked, 0);
    answer_batches(router, &id1, 0, &b[2], &seqs[2], 1);
    answer_batches(router, &id2, 0, b, seqs, 2);
    for (int i = 0; i < 100 && stat_of(&d, "blocks") < 16; i++)
        usleep(20000);
    usleep(200000);
    assert_int_equal(stat_of(&d, "blocks"), 16); /* batches 1 and 2, not 3 */
    assert_int_equal(stat_of(&d, "late_joins"), 1);
    assert_int_equal(stat_of(&d, "resyncs"), 0);
    zmq_msg_close(&id1);
    zmq_msg_close(&id2);
    then_stop(&d, pub, router);
    /* (2) the first contact answers 1 and 3: 2 is lost, so 1's blocks are dropped */
    sched_and_engine(&d, ctx, "holey", &pub, &router);
    uint64_t skip[2] = {1, 3};
    msgpack_sbuffer sk[2] = {b[0], b[2]};
    assert_int_equal(next_request(router, sk, skip, 2, 0), 0);
    /* (the resync is counted before batch 3 is applied: both waited for) */
    for (int i = 0; i < 100 && (stat_of(&d, "resyncs") < 1 || stat_of(&d, "blocks") != 8); i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "resyncs"), 1);
    assert_int_equal(stat_of(&d, "blocks"), 8); /* batch 3's */
    then_stop(&d, pub, router);
    /* (3) batch 3 follows 1 and its replay goes unanswered (owed from 2); the engine restarts
     * and publishes its new batch 1; after the back-off nothing is asked of the new life, and
     * its blocks stay */
    sched_and_engine(&d, ctx, "reborn", &pub, &router);
    assert_int_equal(next_request(router, NULL, NULL, 0, 0), 0);
    publish_until(&d, pub, 1, &b[0], 8);
    publish(pub, 3, b[2].data, b[2].size);
    assert_int_equal(next_request(router, NULL, NULL, 0, 1), 2);
    for (int i = 0; i < 100 && stat_of(&d, "sequence_restarts") < 1; i++) {
        publish(pub, 1, b[3].data, b[3].size); /* the new life's first batch */
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "sequence_restarts"), 1);
    for (int i = 0; i < 60; i++) /* past the back-off: any request answered as the new window */
        serve_batches(router, &b[3], seqs, 1);
    assert_int_equal(stat_of(&d, "blocks"), 8); /* the new life's batch 1 */
    assert_int_equal(stat_of(&d, "replay_retries"), 0);
    then_stop(&d, pub, router);
    /* (4) the first contact unanswered, then batch 5 seen while the socket is held off (owed),
     * then the engine restarts and its batch 2 is the first seen of its new life: its batch 1 is
     * owed now, and asked for when the back-off ends */
    sched_and_engine(&d, ctx, "reborn2", &pub, &router);
    assert_int_equal(next_request(router, NULL, NULL, 0, 1), 0);
    for (int i = 0; i < 50 && stat_of(&d, "blocks") < 8; i++) {
        publish(pub, 5, b[0].data, b[0].size);
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "blocks"), 8);
    for (int i = 0; i < 50 && stat_of(&d, "sequence_restarts") < 1; i++) {
        publish(pub, 2, b[2].data, b[2].size);
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "sequence_restarts"), 1);
    /* batches 1 and 2 of the new life */
    assert_int_equal(next_request(router, &b[1], seqs, 2, 0), 0);
    for (int i = 0; i < 100 && stat_of(&d, "blocks") < 16; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "blocks"), 16);
    then_stop(&d, pub, router);
    for (int k = 0; k < 4; k++)
        msgpack_sbuffer_destroy(&b[k]);
    zmq_ctx_term(ctx);
}

/* The lookup of sequence j's 64 tokens: 1 when instance "sh" holds all of them on d, 0 when it
 * holds none, -1 otherwise. */
static int holds_sequence(const daemon_t *d, int j)
{
    char body[2048], out[8192], *p = body;
    p += sprintf(p, "{\"tokens\":[");
    for (int i = 0; i < 65; i++)
        p += sprintf(p, "%s%d", i ? "," : "", 1000 * (j + 1) + i);
    sprintf(p, "]}");
    assert_int_equal(http(d, "POST", "/v1/lookup", body, out, sizeof out), 200);
    if (!strstr(out, "\"id\":\"sh\""))
        return 0;
    return strstr(out, "\"tokens\":64") ? 1 : -1;
}

/* Publishes sequences 2..n-1 (each 4 blocks of 16 tokens: hashes at h + j * hstride, tokens at
 * tok + j * tstride) until replicas d[0] and d[1] hold every block of their shard, then
 * checks that each replica's lookup finds exactly the sequences of its shard (the first two
 * published before anyone subscribed). */
static void publish_until_sharded(kvf_events *ev, const daemon_t d[2], int n, const uint64_t *h,
                                  size_t hstride, const uint32_t *tok, size_t tstride,
                                  const int *shard)
{
    int per[2] = {0, 0}, done = 0;
    for (int j = 0; j < n; j++)
        per[shard[j]]++;
    /* 10 s at most: time for a relay whose first contact went unanswered to ask again (2 s) */
    double t0 = now_ms();
    for (int t = 0; t < 1000 && !done && now_ms() - t0 < 10000; t++) {
        for (int j = 2; j < n; j++)
            assert_int_equal(kvf_events_publish(ev, NULL, 0, h + (size_t)j * hstride, 4, 0, 0,
                                                tok + (size_t)j * tstride, 16, "GPU"),
                             0);
        usleep(20000);
        done = stat_of(&d[0], "blocks") == 4 * per[0] && stat_of(&d[1], "blocks") == 4 * per[1];
    }
    for (int j = 0; j < n; j++) {
        assert_int_equal(holds_sequence(&d[shard[j]], j), 1);
        assert_int_equal(holds_sequence(&d[1 - shard[j]], j), 0);
    }
}

/* A sharded index: an engine publishes with kvf_events_opts.shards 2, and two kvf-sched replicas
 * hold shard 0/2 and 1/2. Each indexes exactly the sequences whose first block is in its shard
 * (the ones published before it subscribed too, asked of the replay socket by topic), and their
 * removals; a replica holding the whole index drops the sharded batches and says so. */
static void test_sched_daemon_sharded_index(void **state)
{
    (void)state;
    enum { SEQS = 12 };
    daemon_t d[3];
    sched_start(&d[0], "--shard", "0/2");
    sched_start(&d[1], "--shard", "1/2");
    sched_start(&d[2], NULL, NULL);
    char err[256], out[4096];
    assert_int_equal(http(&d[1], "GET", "/v1/index/stats", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, "\"shard\":1"));
    assert_non_null(strstr(out, "\"shards\":2"));
    kvf_events *ev = NULL;
    kvf_events_opts o = {.listen = "127.0.0.1:0", .replay = "127.0.0.1:0", .shards = 2};
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    uint32_t tok[SEQS][64];
    uint64_t h[SEQS][4];
    int shard[SEQS], per[2] = {0, 0};
    for (int j = 0; j < SEQS; j++) {
        for (int i = 0; i < 64; i++)
            tok[j][i] = (uint32_t)(1000 * (j + 1) + i);
        assert_int_equal(kvf_events_hash_blocks(tok[j], 4, 16, 0, h[j]), 0);
        shard[j] = (int)kvf_events_shard_of(h[j][0], 2);
        per[shard[j]]++;
    }
    assert_true(per[0] > 0 && per[1] > 0);
    /* the first two sequences before anyone subscribed: the replicas ask for them (late join) */
    for (int j = 0; j < 2; j++)
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[j], 4, 0, 0, tok[j], 16, "GPU"), 0);
    char body[512];
    snprintf(body, sizeof body,
             "{\"id\":\"sh\",\"block_tokens\":16,\"events\":\"%s\",\"replay\":\"%s\","
             "\"event_shards\":2}",
             kvf_events_endpoint(ev), kvf_events_replay_endpoint(ev));
    for (int r = 0; r < 3; r++)
        assert_int_equal(http(&d[r], "POST", "/v1/instances", body, out, sizeof out), 201);
    /* The record says its shards: a replica split otherwise (the whole-index one here) counts
     * it as mismatched and says so; the sharded ones do not. A second engine that publishes
     * unsharded is mismatched on the sharded replicas. Shards outside 0..256 are refused. */
    assert_int_equal(stat_of(&d[0], "instances_shard_mismatch"), 0);
    assert_int_equal(stat_of(&d[1], "instances_shard_mismatch"), 0);
    assert_int_equal(stat_of(&d[2], "instances_shard_mismatch"), 1);
    assert_int_equal(http(&d[0], "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, "\"event_shards\":2"));
    assert_int_equal(http(&d[0], "POST", "/v1/instances",
                          "{\"id\":\"flat\",\"events\":\"127.0.0.1:1\",\"event_shards\":1}", out,
                          sizeof out),
                     201);
    assert_int_equal(stat_of(&d[0], "instances_shard_mismatch"), 1);
    assert_int_equal(http(&d[0], "DELETE", "/v1/instances/flat", NULL, out, sizeof out), 200);
    assert_int_equal(stat_of(&d[0], "instances_shard_mismatch"), 0);
    assert_int_equal(http(&d[0], "POST", "/v1/instances",
                          "{\"id\":\"bad\",\"events\":\"127.0.0.1:1\",\"event_shards\":300}", out,
                          sizeof out),
                     400);
    assert_non_null(strstr(out, "event_shards"));
    /* the rest, published until both replicas hold every sequence of their shard (bounded) */
    publish_until_sharded(ev, d, SEQS, h[0], 4, tok[0], 64, shard);
    assert_true(stat_of(&d[0], "late_joins") + stat_of(&d[1], "late_joins") >= 1);
    assert_int_equal(stat_of(&d[0], "unknown_parents"), 0);
    /* the whole-index replica applies none of it, and counts what it dropped */
    for (int t = 0; t < 100 && stat_of(&d[2], "sharded_batches_dropped") <= 0; t++) {
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[2], 4, 0, 0, tok[2], 16, "GPU"), 0);
        usleep(20000);
    }
    assert_int_equal(stat_of(&d[2], "blocks"), 0);
    assert_true(stat_of(&d[2], "sharded_batches_dropped") > 0);
    /* removals in one call go to each block's shard */
    uint64_t last[SEQS];
    for (int j = 0; j < SEQS; j++)
        last[j] = h[j][3];
    assert_int_equal(kvf_events_publish(ev, last, SEQS, NULL, 0, 0, 0, NULL, 16, NULL), 0);
    for (int t = 0; t < 100 && (stat_of(&d[0], "blocks") != 3 * per[0] ||
                                stat_of(&d[1], "blocks") != 3 * per[1]);
         t++)
        usleep(20000);
    assert_int_equal(stat_of(&d[0], "blocks"), 3 * per[0]);
    assert_int_equal(stat_of(&d[1], "blocks"), 3 * per[1]);
    assert_int_equal(stat_of(&d[0], "unknown_removals") + stat_of(&d[1], "unknown_removals"), 0);
    kvf_events_close(&ev);
    for (int r = 0; r < 3; r++)
        daemon_stop(&d[r]);
}

/* A publisher that starts again on the same endpoints (an engine restarted, with nothing cached;
 * a relay restarted) numbers its batches from 1 again. kvf-sched drops what it held of the engine
 * and asks the new stream's replay socket for what it published before the first batch seen, so
 * the index holds exactly what the new stream says: none of the old sequences, all of the new. */
static void test_sched_daemon_restarted_publisher_is_learnt_again(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    char err[256], out[4096], body[640], ep[128], rep[128];
    kvf_events *ev = NULL;
    kvf_events_opts o = {.listen = "127.0.0.1:0", .replay = "127.0.0.1:0"};
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    snprintf(ep, sizeof ep, "%s", kvf_events_endpoint(ev) + 6); /* HOST:PORT after tcp:// */
    snprintf(rep, sizeof rep, "%s", kvf_events_replay_endpoint(ev) + 6);
    snprintf(body, sizeof body,
             "{\"id\":\"sh\",\"block_tokens\":16,\"events\":\"%s\",\"replay\":\"%s\"}",
             kvf_events_endpoint(ev), kvf_events_replay_endpoint(ev));
    assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 201);
    enum { SEQS = 6 };
    uint32_t tok[SEQS][64];
    uint64_t h[SEQS][4];
    for (int j = 0; j < SEQS; j++) {
        for (int i = 0; i < 64; i++)
            tok[j][i] = (uint32_t)(1000 * (j + 1) + i);
        assert_int_equal(kvf_events_hash_blocks(tok[j], 4, 16, 0, h[j]), 0);
    }
    /* the first life: sequences 0..2, published until indexed */
    for (int t = 0; t < 150 && stat_of(&d, "blocks") < 12; t++) {
        for (int j = 0; j < 3; j++)
            assert_int_equal(kvf_events_publish(ev, NULL, 0, h[j], 4, 0, 0, tok[j], 16, "GPU"), 0);
        usleep(20000);
    }
    assert_int_equal(stat_of(&d, "blocks"), 12);
    /* The first life's numbers well past what the second will reach below (at most 152): its
     * batches, seen after these, always go backwards (a stream that overtook the old numbers
     * before the subscriber reconnected would look like a gap, not a restart). */
    long seen = stat_of(&d, "batches");
    for (int k = 0; k < 400; k++)
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[0], 4, 0, 0, tok[0], 16, "GPU"), 0);
    for (int t = 0; t < 250 && stat_of(&d, "batches") < seen + 400; t++)
        usleep(20000);
    assert_true(stat_of(&d, "batches") >= seen + 400);
    long restarts = stat_of(&d, "sequence_restarts");
    kvf_events_close(&ev);
    /* the second life, on the same endpoints: sequences 3 and 4 before kvf-sched reconnects
     * (its batches 1 and 2), then 5 until seen */
    kvf_events_opts o2 = {.listen = ep, .replay = rep};
    int rc = -1;
    for (int t = 0; t < 100 && rc != 0; t++) /* the ports come free once the sockets are gone */
        if ((rc = kvf_events_open(&ev, &o2, err, sizeof err)) != 0)
            usleep(20000);
    assert_int_equal(rc, 0);
    for (int j = 3; j < 5; j++)
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[j], 4, 0, 0, tok[j], 16, "GPU"), 0);
    for (int t = 0; t < 150 && (stat_of(&d, "sequence_restarts") == restarts ||
                                holds_sequence(&d, 3) != 1 || holds_sequence(&d, 5) != 1);
         t++) {
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[5], 4, 0, 0, tok[5], 16, "GPU"), 0);
        usleep(20000);
    }
    assert_true(stat_of(&d, "sequence_restarts") > restarts);
    for (int j = 0; j < SEQS; j++)
        assert_int_equal(holds_sequence(&d, j), j >= 3);
    kvf_events_close(&ev);
    daemon_stop(&d);
}

/* A relay's counter from GET /v1/relay, or -1. */
static long relay_stat(const daemon_t *relay, const char *key)
{
    char body[4096], want[64];
    assert_int_equal(http(relay, "GET", "/v1/relay", NULL, body, sizeof body), 200);
    snprintf(want, sizeof want, "\"%s\":", key);
    const char *p = strstr(body, want);
    return p ? strtol(p + strlen(want), NULL, 10) : -1;
}

/* A relay's endpoint ("events" or "replay") from GET /v1/relay, into out. */
static void relay_endpoint(const daemon_t *relay, const char *key, char *out, size_t n)
{
    char body[4096], want[64];
    assert_int_equal(http(relay, "GET", "/v1/relay", NULL, body, sizeof body), 200);
    snprintf(want, sizeof want, "\"%s\":\"", key);
    const char *p = strstr(body, want);
    assert_non_null(p);
    p += strlen(want);
    size_t k = strcspn(p, "\"");
    assert_true(k > 0 && k < n);
    snprintf(out, n, "%.*s", (int)k, p);
}

static void relay_start(daemon_t *relay, const char *from, const char *from_replay,
                        const char *shards)
{
    char *argv[] = {(char *)KVF_RELAY_BIN,   (char *)"--from",    (char *)from,
                    (char *)"--from-replay", (char *)from_replay, (char *)"--shards",
                    (char *)shards,          (char *)"--listen",  (char *)"127.0.0.1:0",
                    (char *)"--log-level",   (char *)"warn",      NULL};
    proc_start(relay, argv);
}

/* Starts kvf-relay (2 shards) in front of engine and registers the engine as "sh" with replicas
 * d[0] and d[1] under the relay's endpoints. */
static void relay_in_front(daemon_t *relay, const kvf_events *engine, const daemon_t d[2])
{
    char ep[160], rep[160], body[640], out[1024];
    relay_start(relay, kvf_events_endpoint(engine), kvf_events_replay_endpoint(engine), "2");
    relay_endpoint(relay, "events", ep, sizeof ep);
    relay_endpoint(relay, "replay", rep, sizeof rep);
    snprintf(body, sizeof body,
             "{\"id\":\"sh\",\"block_tokens\":16,\"events\":\"%s\",\"replay\":\"%s\","
             "\"event_shards\":2}",
             ep, rep);
    for (int r = 0; r < 2; r++)
        assert_int_equal(http(&d[r], "POST", "/v1/instances", body, out, sizeof out), 201);
}

/* kvf-relay (2 shards) in front of an engine whose events the test publishes on *pub and whose
 * replay requests it answers on *router; relay_and_engine_stop() ends them and ctx. */
static void relay_and_engine(daemon_t *relay, void *ctx, void **pub, void **router)
{
    char ep[128], rep[128];
    *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    *router = pub_open(ctx, ZMQ_ROUTER, rep, sizeof rep);
    relay_start(relay, ep, rep, "2");
}

static void relay_and_engine_stop(daemon_t *relay, void *ctx, void *pub, void *router)
{
    daemon_stop(relay);
    zmq_close(pub);
    zmq_close(router);
    zmq_ctx_term(ctx);
}

/* kvf-relay's first contact whose answers skip a batch (1, then 3): what it relayed before the
 * hole may be stale, so every shard is told to clear (counted as lost). */
static void test_sched_daemon_relay_contact_hole(void **state)
{
    (void)state;
    daemon_t relay;
    void *ctx = zmq_ctx_new(), *pub, *router;
    relay_and_engine(&relay, ctx, &pub, &router);
    msgpack_sbuffer b[2];
    uint64_t seqs[2] = {1, 3};
    pack_batches(b, 2);
    assert_int_equal(next_request(router, b, seqs, 2, 0), 0);
    for (int i = 0; i < 100 && relay_stat(&relay, "replayed") < 2; i++)
        usleep(20000);
    assert_int_equal(relay_stat(&relay, "replayed"), 2);
    assert_int_equal(relay_stat(&relay, "lost"), 1);
    assert_int_equal(relay_stat(&relay, "cleared"), 2); /* its start's, and the hole's */
    for (int k = 0; k < 2; k++)
        msgpack_sbuffer_destroy(&b[k]);
    relay_and_engine_stop(&relay, ctx, pub, router);
}

/* kvf-relay owes what it could not ask for: (1) a late join seen while the engine's replay socket
 * is held off (its first contact went unanswered) is asked for from the start when the back-off
 * ends, and what was relayed live since is relayed again after it, in order; (2) a replay whose
 * answers stop without the end marker (a slow engine) is continued from the first batch not
 * relayed, not taken for a loss (which would clear every shard). */
static void test_sched_daemon_relay_owes_what_it_could_not_ask(void **state)
{
    (void)state;
    enum { N = 6 };
    daemon_t relay;
    void *ctx = zmq_ctx_new(), *pub, *router;
    relay_and_engine(&relay, ctx, &pub, &router);
    msgpack_sbuffer b[N];
    uint64_t seqs[N];
    pack_batches(b, N);
    for (int k = 0; k < N; k++)
        seqs[k] = (uint64_t)k + 1;
    assert_int_equal(next_request(router, NULL, NULL, 0, 1), 0); /* the first contact, lost */
    for (int i = 0; i < 100 && relay_stat(&relay, "batches") < 1; i++) {
        publish(pub, 3, b[2].data, b[2].size); /* live, while the socket is held off (2 s) */
        usleep(20000);
    }
    /* answered at once (a stat asked first could outlast the relay's 200 ms of patience) */
    assert_int_equal(next_request(router, b, seqs, 3, 0), 0); /* the back-off over: 1 to 3 */
    for (int i = 0; i < 100 && relay_stat(&relay, "replayed") < 3; i++)
        usleep(20000);
    assert_int_equal(relay_stat(&relay, "replayed"), 3);
    assert_int_equal(relay_stat(&relay, "replay_retries"), 1);
    /* batches 4 and 5 missed; the answers stop after 4, and 5 on are asked for next */
    publish(pub, 6, b[5].data, b[5].size);
    assert_int_equal(answer_one_and_stop(router, &b[3], &seqs[3], 3), 4);
    assert_int_equal(next_request(router, &b[4], &seqs[4], 2, 0), 5);
    for (int i = 0; i < 100 && relay_stat(&relay, "replayed") < 6; i++)
        usleep(20000);
    assert_int_equal(relay_stat(&relay, "replayed"), 6);
    assert_int_equal(relay_stat(&relay, "replay_retries"), 2);
    assert_int_equal(relay_stat(&relay, "lost"), 0);
    assert_int_equal(relay_stat(&relay, "cleared"), 1); /* its start's only */
    for (int k = 0; k < N; k++)
        msgpack_sbuffer_destroy(&b[k]);
    relay_and_engine_stop(&relay, ctx, pub, router);
}

/* An engine that publishes one stream (vLLM's way: one topic, its own block hashes, not
 * kvfabric's chain) behind kvf-relay, with kvf-sched replicas --shard 0/2 and 1/2 registered
 * under the relay's endpoints. Each replica indexes exactly the sequences whose first block's
 * kvfabric hash is in its shard (those the engine published before the relay started too, which
 * the relay asks of the engine's replay socket), a continuation lands in its sequence's shard,
 * removals reach the right replica, and the engine's AllBlocksCleared empties both. */
static void test_sched_daemon_relay_shards_a_vllm_stream(void **state)
{
    (void)state;
    enum { SEQS = 12 };
    daemon_t d[2], relay;
    sched_start(&d[0], "--shard", "0/2");
    sched_start(&d[1], "--shard", "1/2");
    char err[256], out[4096];
    kvf_events *ev = NULL; /* the engine: one stream, with a replay socket */
    kvf_events_opts o = {.listen = "127.0.0.1:0", .replay = "127.0.0.1:0"};
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    uint32_t tok[SEQS][80];
    uint64_t h[SEQS][5], mine[SEQS][5];
    int shard[SEQS], per[2] = {0, 0};
    for (int j = 0; j < SEQS; j++) {
        for (int i = 0; i < 80; i++)
            tok[j][i] = (uint32_t)(1000 * (j + 1) + i);
        assert_int_equal(kvf_events_hash_blocks(tok[j], 5, 16, 0, mine[j]), 0);
        for (int b = 0; b < 5; b++) /* the engine's own hashes: unrelated to kvfabric's */
            h[j][b] = (0x9e3779b97f4a7c15ull * (uint64_t)(5 * j + b + 1)) ^ 0xabcdefull;
        shard[j] = (int)kvf_events_shard_of(mine[j][0], 2);
        per[shard[j]]++;
    }
    assert_true(per[0] > 0 && per[1] > 0);
    for (int j = 0; j < 2; j++) /* before the relay: it asks for them (a late join) */
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[j], 4, 0, 0, tok[j], 16, "GPU"), 0);
    relay_in_front(&relay, ev, d);
    assert_int_equal(http(&relay, "GET", "/healthz", NULL, out, sizeof out), 200);
    assert_int_equal(http(&relay, "POST", "/v1/relay", "{}", out, sizeof out), 405);
    assert_int_equal(relay_stat(&relay, "shards"), 2);
    publish_until_sharded(ev, d, SEQS, h[0], 5, tok[0], 80, shard);
    assert_true(relay_stat(&relay, "late_joins") >= 1);
    assert_true(relay_stat(&relay, "replayed") >= 2);
    assert_int_equal(relay_stat(&relay, "malformed"), 0);
    /* a continuation of sequence 0 (its fifth block, the engine's parent hash) joins it */
    assert_int_equal(
        kvf_events_publish(ev, NULL, 0, &h[0][4], 1, 1, h[0][3], tok[0] + 64, 16, "GPU"), 0);
    for (int t = 0; t < 100 && stat_of(&d[shard[0]], "blocks") != 4 * per[shard[0]] + 1; t++)
        usleep(20000);
    assert_int_equal(stat_of(&d[shard[0]], "blocks"), 4 * per[shard[0]] + 1);
    assert_int_equal(stat_of(&d[1 - shard[0]], "blocks"), 4 * per[1 - shard[0]]);
    assert_int_equal(relay_stat(&relay, "unknown_parents"), 0);
    /* removals in one batch go to each block's replica */
    uint64_t last[SEQS];
    for (int j = 0; j < SEQS; j++)
        last[j] = h[j][3 + (j == 0)];
    assert_int_equal(kvf_events_publish(ev, last, SEQS, NULL, 0, 0, 0, NULL, 16, NULL), 0);
    for (int t = 0; t < 100 && (stat_of(&d[0], "blocks") != 3 * per[0] + (shard[0] == 0) ||
                                stat_of(&d[1], "blocks") != 3 * per[1] + (shard[0] == 1));
         t++)
        usleep(20000);
    assert_int_equal(stat_of(&d[0], "blocks"), 3 * per[0] + (shard[0] == 0));
    assert_int_equal(stat_of(&d[1], "blocks"), 3 * per[1] + (shard[0] == 1));
    assert_int_equal(stat_of(&d[0], "unknown_removals") + stat_of(&d[1], "unknown_removals"), 0);
    /* the engine's AllBlocksCleared reaches every shard */
    assert_int_equal(kvf_events_clear(ev, 1), 0);
    for (int t = 0; t < 100 && (stat_of(&d[0], "blocks") || stat_of(&d[1], "blocks")); t++)
        usleep(20000);
    assert_int_equal(stat_of(&d[0], "blocks"), 0);
    assert_int_equal(stat_of(&d[1], "blocks"), 0);
    assert_true(relay_stat(&relay, "cleared") >= 1);
    daemon_stop(&relay);
    kvf_events_close(&ev);
    for (int r = 0; r < 2; r++)
        daemon_stop(&d[r]);
}

/* Batches the engine's replay window no longer holds are lost for good: the relay publishes
 * AllBlocksCleared in every shard before relaying what the window still has, so no replica keeps
 * what it cannot know is still true, and the sequences the window and the live stream bring are
 * indexed. A relay given bad options exits 2 saying why. */
static void test_sched_daemon_relay_clears_what_was_lost(void **state)
{
    (void)state;
    enum { SEQS = 8 };
    daemon_t d[2], relay;
    sched_start(&d[0], "--shard", "0/2");
    sched_start(&d[1], "--shard", "1/2");
    char err[256];
    kvf_events *ev = NULL;
    kvf_events_opts o = {.listen = "127.0.0.1:0", .replay = "127.0.0.1:0", .replay_batches = 2};
    assert_int_equal(kvf_events_open(&ev, &o, err, sizeof err), 0);
    uint32_t tok[SEQS][64];
    uint64_t h[SEQS][4], mine[SEQS][4];
    int shard[SEQS];
    for (int j = 0; j < SEQS; j++) {
        for (int i = 0; i < 64; i++)
            tok[j][i] = (uint32_t)(1000 * (j + 1) + i);
        assert_int_equal(kvf_events_hash_blocks(tok[j], 4, 16, 0, mine[j]), 0);
        shard[j] = (int)kvf_events_shard_of(mine[j][0], 2);
        for (int b = 0; b < 4; b++)
            h[j][b] = 7777u * (uint64_t)(4 * j + b + 1);
    }
    for (int j = 0; j < 6; j++) /* the window keeps the last two of these six */
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[j], 4, 0, 0, tok[j], 16, "GPU"), 0);
    relay_in_front(&relay, ev, d);
    /* At its first contact the relay asks the engine's replay socket for everything, before any
     * live batch: the window keeps batches 5 and 6 only, so 1..4 are lost (said once), and 5 and
     * 6 relayed; then the live stream (batch 7) follows them. */
    for (int t = 0;
         t < 150 && (relay_stat(&relay, "replayed") < 2 || holds_sequence(&d[shard[4]], 4) != 1 ||
                     holds_sequence(&d[shard[5]], 5) != 1);
         t++) /* each replica in its own time: the two may be in different shards */
        usleep(20000);
    assert_int_equal(relay_stat(&relay, "lost"), 1);
    assert_true(relay_stat(&relay, "cleared") >= 1);
    assert_int_equal(relay_stat(&relay, "late_joins"), 1);
    assert_int_equal(relay_stat(&relay, "replayed"), 2); /* the window's two */
    for (int t = 0; t < 150 && holds_sequence(&d[shard[6]], 6) != 1; t++) {
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[6], 4, 0, 0, tok[6], 16, "GPU"), 0);
        usleep(20000);
    }
    for (int j = 0; j < 4; j++) /* lost for good: nothing of them indexed */
        assert_int_equal(holds_sequence(&d[shard[j]], j), 0);
    assert_int_equal(holds_sequence(&d[shard[4]], 4), 1); /* the window's */
    assert_int_equal(holds_sequence(&d[shard[5]], 5), 1);
    assert_int_equal(holds_sequence(&d[shard[6]], 6), 1);
    assert_int_equal(relay_stat(&relay, "lost"), 1);
    /* Mid-stream: the relay stopped while the engine floods past every queue, so ZeroMQ drops
     * batches; on waking, the gap cannot be filled from a window of two, and sequence 6, which
     * the replicas held, is forgotten until stored again. */
    assert_int_equal(kill(relay.pid, SIGSTOP), 0);
    for (int k = 0; k < 20000; k++)
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[5], 4, 0, 0, tok[5], 16, "GPU"), 0);
    assert_int_equal(kill(relay.pid, SIGCONT), 0);
    for (int t = 0;
         t < 250 && (relay_stat(&relay, "lost") < 2 || holds_sequence(&d[shard[7]], 7) != 1 ||
                     holds_sequence(&d[shard[6]], 6) != 0);
         t++) {
        assert_int_equal(kvf_events_publish(ev, NULL, 0, h[7], 4, 0, 0, tok[7], 16, "GPU"), 0);
        usleep(20000);
    }
    assert_true(relay_stat(&relay, "gaps") >= 1);
    assert_true(relay_stat(&relay, "lost") >= 2);
    assert_int_equal(holds_sequence(&d[shard[6]], 6), 0);
    assert_int_equal(holds_sequence(&d[shard[7]], 7), 1);
    daemon_stop(&relay);
    kvf_events_close(&ev);
    for (int r = 0; r < 2; r++)
        daemon_stop(&d[r]);
    /* bad options: a usage error, said */
    char *bad[][8] = {
        {(char *)KVF_RELAY_BIN, (char *)"--shards", (char *)"2", NULL},
        {(char *)KVF_RELAY_BIN, (char *)"--from", (char *)"tcp://127.0.0.1:1", (char *)"--shards",
         (char *)"0", NULL},
        {(char *)KVF_RELAY_BIN, (char *)"--from", (char *)"127.0.0.1:1", (char *)"--shards",
         (char *)"2", NULL},
        {(char *)KVF_RELAY_BIN, (char *)"--from", (char *)"tcp://127.0.0.1:1", (char *)"--shards",
         (char *)"2", (char *)"--events", (char *)"0.0.0.0:0", NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[2048];
        assert_int_equal(harness_run(bad[i], text, sizeof text), 2);
        assert_true(strlen(text) > 0);
    }
}

/* The read-only lookup names who holds a prefix and changes no load; /healthz answers at once,
 * /readyz only once an instance is registered; without stores no plan loads from, saves to or
 * hands over through one (the handoff between two instances is labelled backend_infeasible),
 * and with --stores the same request's plan saves to them. */
static void test_sched_daemon_lookup_health_and_no_store(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    char out[8192], body[8192];
    assert_int_equal(http(&d, "GET", "/healthz", NULL, out, sizeof out), 200);
    assert_int_equal(http(&d, "GET", "/readyz", NULL, out, sizeof out), 503);
    assert_non_null(strstr(out, "no engine instance"));
    void *ctx = zmq_ctx_new();
    char ep[128];
    void *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    register_and_index(&d, pub, ep); /* "hot" holds 1024 tokens from id 100; "cold" nothing */
    assert_int_equal(http(&d, "GET", "/readyz", NULL, out, sizeof out), 200);
    char *p = body;
    p += sprintf(p, "{\"output_tokens\":8,\"tokens\":[");
    for (int i = 0; i < 1100; i++)
        p += sprintf(p, "%s%d", i ? "," : "", 100 + i);
    sprintf(p, "]}");
    long placed = stat_of(&d, "placements");
    assert_true(placed >= 0);
    for (int k = 0; k < 3; k++) {
        assert_int_equal(http(&d, "POST", "/v1/lookup", body, out, sizeof out), 200);
        assert_non_null(strstr(out, "\"id\":\"hot\""));
        assert_non_null(strstr(out, "\"tokens\":1024"));
        assert_null(strstr(out, "\"cold\"")); /* it holds nothing of it */
        assert_non_null(strstr(out, "\"store_tokens\":0"));
    }
    /* the same tokens in the router's compact form: base64 of little-endian 32-bit ids */
    {
        static uint8_t raw[4 * 1100];
        static char b64[8192], compact[8400];
        for (int i = 0; i < 1100; i++)
            for (int b = 0; b < 4; b++)
                raw[4 * i + b] = (uint8_t)((uint32_t)(100 + i) >> (8 * b));
        sodium_bin2base64(b64, sizeof b64, raw, sizeof raw, sodium_base64_VARIANT_ORIGINAL);
        snprintf(compact, sizeof compact, "{\"output_tokens\":8,\"tokens\":\"%s\"}", b64);
        assert_int_equal(http(&d, "POST", "/v1/lookup", compact, out, sizeof out), 200);
        assert_non_null(strstr(out, "\"id\":\"hot\""));
        assert_non_null(strstr(out, "\"tokens\":1024"));
        assert_non_null(strstr(out, "\"prompt_tokens\":1100"));
        /* not base64, or not whole ids: refused, naming the form */
        assert_int_equal(http(&d, "POST", "/v1/lookup", "{\"tokens\":\"!!!!\"}", out, sizeof out),
                         400);
        assert_non_null(strstr(out, "base64"));
        assert_int_equal(
            http(&d, "POST", "/v1/lookup", "{\"tokens\":\"AAAAAAA=\"}", out, sizeof out), 400);
        assert_int_equal(http(&d, "POST", "/v1/lookup", "{\"tokens\":\"\"}", out, sizeof out), 400);
    }
    assert_int_equal(stat_of(&d, "placements"), placed); /* nothing placed, no load noted */
    assert_int_equal(http(&d, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_null(strstr(out, "\"queued_prefill_tokens\":1"));
    assert_int_equal(http(&d, "POST", "/v1/lookup", "{\"tokens\":[]}", out, sizeof out), 400);

    assert_int_equal(http(&d, "POST", "/v1/place", body, out, sizeof out), 200);
    assert_int_equal(stat_of(&d, "placements"), placed + 1);
    assert_null(strstr(out, "save_to_store"));
    assert_null(strstr(out, "load_from_store"));
    if (strstr(out, "handoff_through_store"))
        assert_non_null(strstr(out, "backend_infeasible"));
    zmq_close(pub);
    zmq_ctx_term(ctx);
    daemon_stop(&d);

    sched_start(&d, "--stores", "127.0.0.1:9");
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"one\",\"role\":\"both\",\"block_tokens\":16,"
                          "\"capacity_blocks\":1000,\"endpoint\":\"127.0.0.1:9005\"}",
                          out, sizeof out),
                     201);
    assert_int_equal(http(&d, "POST", "/v1/place", body, out, sizeof out), 200);
    assert_non_null(strstr(out, "save_to_store"));
    daemon_stop(&d);
}

/* Whether GET /v1/instances lists id. */
static int listed(const daemon_t *d, const char *id)
{
    static char out[1 << 16];
    char want[96];
    assert_int_equal(http(d, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    snprintf(want, sizeof want, "\"id\":\"%s\"", id);
    return strstr(out, want) != NULL;
}

/* The load figure `key` that GET /v1/instances gives instance id. */
static double load_of(const daemon_t *d, const char *id, const char *key)
{
    static char out[1 << 16];
    char want[96];
    assert_int_equal(http(d, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    snprintf(want, sizeof want, "\"id\":\"%s\"", id);
    const char *p = strstr(out, want);
    assert_non_null(p);
    snprintf(want, sizeof want, "\"%s\":", key);
    p = strstr(p, want);
    assert_non_null(p);
    return strtod(p + strlen(want), NULL);
}

static double queued_of(const daemon_t *d, const char *id)
{
    return load_of(d, id, "queued_prefill_tokens");
}

static char placed_decode[64]; /* the decode instance of placed_ticket()'s last placement */

/* Places a 32-token request: its ticket (and its prefill instance in who). */
static uint64_t placed_ticket(const daemon_t *d, char *who, size_t n)
{
    char out[8192];
    assert_int_equal(http(d, "POST", "/v1/place",
                          "{\"tokens\":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,"
                          "23,24,25,26,27,28,29,30,31,32],\"output_tokens\":8}",
                          out, sizeof out),
                     200);
    const char *t = strstr(out, "\"ticket\":"), *p = strstr(out, "\"prefill\":\"");
    assert_non_null(t);
    assert_non_null(p);
    p += strlen("\"prefill\":\"");
    size_t k = 0;
    while (p[k] && p[k] != '"' && k + 1 < n) {
        who[k] = p[k];
        k++;
    }
    who[k] = '\0';
    const char *q = strstr(out, "\"decode\":\"");
    assert_non_null(q);
    q += strlen("\"decode\":\"");
    for (k = 0; q[k] && q[k] != '"' && k + 1 < sizeof placed_decode; k++)
        placed_decode[k] = q[k];
    placed_decode[k] = '\0';
    uint64_t ticket = strtoull(t + strlen("\"ticket\":"), NULL, 10);
    assert_true(ticket > 0 && ticket <= (1ull << 53));
    return ticket;
}

static void report_load(const daemon_t *d, const char *id, double queued, const char *tickets)
{
    char path[128], body[512], out[1024];
    snprintf(path, sizeof path, "/v1/instances/%s/load", id);
    snprintf(body, sizeof body, "{\"queued_prefill_tokens\":%g,\"active_decodes\":0%s%s}", queued,
             tickets ? ",\"tickets\":" : "", tickets ? tickets : "");
    assert_int_equal(http(d, "POST", path, body, out, sizeof out), 200);
}

/* The instance a 32-token request is sent to for prefill, in *who. */
static void placed_on(const daemon_t *d, char *who, size_t n)
{
    placed_ticket(d, who, n);
}

/* A load report taken before a placed request reached its engine does not erase the request's
 * work: kvf-sched adds it back until a report lists the placement's ticket (the engine took the
 * request in), for at most --placement-ack-s. So the next request of a burst goes to the other,
 * idle instance, as it does when no report came between the two. A report without "tickets"
 * replaces the load (engines that do not know tickets); bad ticket lists are refused. */
static void test_sched_daemon_placement_tickets(void **state)
{
    (void)state;
    daemon_t d;
    char out[4096], who[64], other[64];
    sched_start(&d, "--placement-ack-s", "1");
    for (int i = 0; i < 2; i++) {
        char body[256];
        snprintf(body, sizeof body,
                 "{\"id\":\"p%d\",\"role\":\"both\",\"block_tokens\":16,"
                 "\"capacity_blocks\":1000,\"endpoint\":\"127.0.0.1:%d\"}",
                 i, 9100 + i);
        assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 201);
    }
    uint64_t t1 = placed_ticket(&d, who, sizeof who);
    assert_int_equal((long)queued_of(&d, who), 32);
    /* the engine reports before the request arrived: its work stays (its decode too, where it
     * decodes there) */
    report_load(&d, who, 0, "[]");
    assert_int_equal((long)queued_of(&d, who), 32);
    assert_int_equal((long)load_of(&d, who, "active_decodes"), !strcmp(placed_decode, who));
    assert_int_equal(stat_of(&d, "reports_behind"), 1);
    assert_int_equal(stat_of(&d, "pending"), 1);
    uint64_t t2 = placed_ticket(&d, other, sizeof other);
    assert_string_not_equal(who, other); /* the burst spreads */
    assert_true(t2 != t1);
    /* the engine took the request in: its own figure, counted once */
    char acks[64];
    snprintf(acks, sizeof acks, "[7,%" PRIu64 "]", t1);
    report_load(&d, who, 32, acks);
    assert_int_equal((long)queued_of(&d, who), 32);
    assert_int_equal(stat_of(&d, "acked"), 1);
    report_load(&d, who, 0, acks); /* done: nothing added back */
    assert_int_equal((long)queued_of(&d, who), 0);
    /* a report without tickets replaces the load (other's placement is answered) */
    report_load(&d, other, 0, NULL);
    assert_int_equal((long)queued_of(&d, other), 0);
    assert_int_equal(stat_of(&d, "pending"), 0);
    /* a placement no report lists is kept for the window only */
    placed_ticket(&d, who, sizeof who);
    report_load(&d, who, 0, "[]");
    assert_int_equal((long)queued_of(&d, who), 32);
    usleep(1100 * 1000);
    report_load(&d, who, 0, "[]");
    assert_int_equal((long)queued_of(&d, who), 0);
    assert_int_equal(stat_of(&d, "expired"), 1);
    /* an instance removed: its placements go with it (a new one in its slot starts clean) */
    placed_ticket(&d, who, sizeof who);
    assert_int_equal(stat_of(&d, "pending"), 1);
    char path[96], reg[256];
    snprintf(path, sizeof path, "/v1/instances/%s", who);
    assert_int_equal(http(&d, "DELETE", path, NULL, out, sizeof out), 200);
    assert_int_equal(stat_of(&d, "pending"), 0);
    snprintf(reg, sizeof reg,
             "{\"id\":\"%s\",\"role\":\"both\",\"block_tokens\":16,\"capacity_blocks\":1000,"
             "\"endpoint\":\"127.0.0.1:9300\"}",
             who);
    assert_int_equal(http(&d, "POST", "/v1/instances", reg, out, sizeof out), 201);
    report_load(&d, who, 0, "[]");
    assert_int_equal((long)queued_of(&d, who), 0);
    daemon_stop(&d);

    /* Disaggregated: the decode engine's reports keep the decode placed there until its decode
     * request comes with the ticket, after the prefill. */
    sched_start(&d, "--stores", "127.0.0.1:9");
    const char *roles[2][2] = {{"pf", "prefill"}, {"dc", "decode"}};
    for (int i = 0; i < 2; i++) {
        snprintf(reg, sizeof reg,
                 "{\"id\":\"%s\",\"role\":\"%s\",\"block_tokens\":16,"
                 "\"capacity_blocks\":1000,\"endpoint\":\"127.0.0.1:%d\"}",
                 roles[i][0], roles[i][1], 9400 + i);
        assert_int_equal(http(&d, "POST", "/v1/instances", reg, out, sizeof out), 201);
    }
    static char longp[8192];
    char *b = longp + sprintf(longp, "{\"output_tokens\":8,\"tokens\":[");
    for (int i = 0; i < 1024; i++) /* long and uncached: prefilled on pf, handed to dc */
        b += sprintf(b, "%s%d", i ? "," : "", 5000 + i);
    sprintf(b, "]}");
    assert_int_equal(http(&d, "POST", "/v1/place", longp, out, sizeof out), 200);
    assert_non_null(strstr(out, "\"prefill\":\"pf\""));
    assert_non_null(strstr(out, "\"decode\":\"dc\""));
    const char *tk = strstr(out, "\"ticket\":");
    assert_non_null(tk);
    snprintf(acks, sizeof acks, "[%" PRIu64 "]",
             (uint64_t)strtoull(tk + strlen("\"ticket\":"), NULL, 10));
    report_load(&d, "pf", 0, "[]"); /* both engines report before the request reached them */
    report_load(&d, "dc", 0, "[]");
    assert_int_equal((long)queued_of(&d, "pf"), 1024);
    assert_int_equal((long)load_of(&d, "dc", "active_decodes"), 1);
    assert_int_equal((long)queued_of(&d, "dc"), 0);
    report_load(&d, "pf", 1024, acks); /* the prefill arrived: pf's figures count it */
    assert_int_equal((long)queued_of(&d, "pf"), 1024);
    report_load(&d, "dc", 0, "[]"); /* the decode is still to come */
    assert_int_equal((long)load_of(&d, "dc", "active_decodes"), 1);
    snprintf(path, sizeof path, "/v1/instances/dc/load");
    char load[160];
    snprintf(load, sizeof load, "{\"queued_prefill_tokens\":0,\"active_decodes\":1,\"tickets\":%s}",
             acks);
    assert_int_equal(http(&d, "POST", path, load, out, sizeof out), 200);
    assert_int_equal((long)load_of(&d, "dc", "active_decodes"), 1); /* counted once */
    assert_int_equal(stat_of(&d, "pending"), 0);
    /* bad lists: refused with the reason, the load unchanged */
    const char *bad[] = {"\"x\"", "[-1]", "[1.5]", "[\"1\"]", "[9007199254740993]", "{}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char body[256];
        snprintf(body, sizeof body, "{\"queued_prefill_tokens\":5,\"tickets\":%s}", bad[i]);
        assert_int_equal(http(&d, "POST", "/v1/instances/pf/load", body, out, sizeof out), 400);
        assert_non_null(strstr(out, "ticket"));
    }
    static char big[16384];
    char *p = big + sprintf(big, "{\"queued_prefill_tokens\":5,\"tickets\":[");
    for (int i = 0; i < 1025; i++)
        p += sprintf(p, "%s%d", i ? "," : "", i + 1);
    sprintf(p, "]}");
    assert_int_equal(http(&d, "POST", "/v1/instances/pf/load", big, out, sizeof out), 400);
    assert_int_equal((long)queued_of(&d, "pf"), 1024);
    daemon_stop(&d);
}

/* Load reports, registrations and placement requests with numbers out of range (negative, huge,
 * fractional where a count is asked for, too large for a double) are refused with 400 naming the
 * field and its range, and change nothing: the instance that lied does not win placement. */
static void test_sched_daemon_numbers_are_range_checked(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    char out[8192], who[64];
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"honest\",\"block_tokens\":16,\"capacity_blocks\":1000,"
                          "\"endpoint\":\"127.0.0.1:9101\"}",
                          out, sizeof out),
                     201);
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"liar\",\"block_tokens\":16,\"capacity_blocks\":1000,"
                          "\"endpoint\":\"127.0.0.1:9102\"}",
                          out, sizeof out),
                     201);
    assert_int_equal(http(&d, "POST", "/v1/instances/liar/load",
                          "{\"queued_prefill_tokens\":100000,\"active_decodes\":4,"
                          "\"used_blocks\":10}",
                          out, sizeof out),
                     200);
    placed_on(&d, who, sizeof who);
    assert_string_equal(who, "honest");

    static const struct {
        const char *body, *field;
    } loads[] = {
        {"{\"queued_prefill_tokens\":-1e300}", "queued_prefill_tokens"},
        {"{\"queued_prefill_tokens\":-1}", "queued_prefill_tokens"},
        {"{\"queued_prefill_tokens\":1e300}", "queued_prefill_tokens"},
        {"{\"queued_prefill_tokens\":-9223372036854775807}", "queued_prefill_tokens"},
        {"{\"queued_prefill_tokens\":\"0\"}", "queued_prefill_tokens"},
        {"{\"queued_prefill_s\":-0.5}", "queued_prefill_s"},
        {"{\"queued_prefill_s\":1e12}", "queued_prefill_s"},
        {"{\"queued_prefill_s\":\"3\"}", "queued_prefill_s"},
        {"{\"active_decodes\":-1}", "active_decodes"},
        {"{\"active_decodes\":1.5}", "active_decodes"},
        {"{\"active_decodes\":4294967296}", "active_decodes"},
        {"{\"used_blocks\":-5}", "used_blocks"},
        {"{\"used_blocks\":1e19}", "used_blocks"},
        {"{\"queued_prefill_tokens\":1e400}", "JSON"}, /* infinite: not a JSON number */
        {"{\"queued_prefill_tokens\":NaN}", "JSON"},
    };
    for (size_t i = 0; i < sizeof loads / sizeof loads[0]; i++) {
        print_message("load %s\n", loads[i].body);
        assert_int_equal(
            http(&d, "POST", "/v1/instances/liar/load", loads[i].body, out, sizeof out), 400);
        assert_non_null(strstr(out, loads[i].field));
        if (strcmp(loads[i].field, "JSON") != 0)
            assert_non_null(strstr(out, "from 0 to"));
        placed_on(&d, who, sizeof who);
        assert_string_equal(who, "honest");
    }
    /* Whole numbers written as reals are taken. */
    assert_int_equal(http(&d, "POST", "/v1/instances/liar/load",
                          "{\"queued_prefill_tokens\":200000.5,\"active_decodes\":4.0}", out,
                          sizeof out),
                     200);

    static const struct {
        const char *body, *field;
    } regs[] = {
        {"{\"id\":\"r\",\"capacity_blocks\":-1}", "capacity_blocks"},
        {"{\"id\":\"r\",\"compute_slots\":-2}", "compute_slots"},
        {"{\"id\":\"r\",\"compute_uses\":1.5}", "compute_uses"},
        {"{\"id\":\"r\",\"compute\":7}", "compute"},
        {"{\"id\":\"r\",\"capacity_blocks\":1e300}", "capacity_blocks"},
        {"{\"id\":\"r\",\"block_tokens\":0}", "block_tokens"},
        {"{\"id\":\"r\",\"block_tokens\":-16}", "block_tokens"},
        {"{\"id\":\"r\",\"block_tokens\":16.5}", "block_tokens"},
        {"{\"id\":\"r\",\"block_tokens\":4294967312}", "block_tokens"}, /* 2^32 + 16 */
        {"{\"id\":\"\"}", "id"},
        {"{\"id\":\"a/b\"}", "id"}, /* DELETE /v1/instances/a/b could not name it */
        {"{\"id\":\"r s\"}", "id"},
        {"{\"id\":\"r\",\"endpoint\":\"nothostport\"}", "endpoint"},
        {"{\"id\":\"r\",\"events\":\"ipc:///tmp/x\"}", "events"},
        {"{\"id\":\"r\",\"replay\":\"inproc://x\"}", "replay"},
    };
    for (size_t i = 0; i < sizeof regs / sizeof regs[0]; i++) {
        print_message("registration %s\n", regs[i].body);
        assert_int_equal(http(&d, "POST", "/v1/instances", regs[i].body, out, sizeof out), 400);
        assert_non_null(strstr(out, regs[i].field));
    }
    assert_false(listed(&d, "r"));

    static const struct {
        const char *body, *field;
    } places[] = {
        {"{\"tokens\":[1,2],\"output_tokens\":-1}", "output_tokens"},
        {"{\"tokens\":[1,2],\"output_tokens\":4294967297}", "output_tokens"},
        {"{\"tokens\":[1,2],\"slo_ttft_ms\":-5}", "slo_ttft_ms"},
        {"{\"tokens\":[1,2],\"slo_ttft_ms\":1e300}", "slo_ttft_ms"},
        {"{\"tokens\":[1,2],\"slo_ttft_ms\":\"soon\"}", "slo_ttft_ms"},
    };
    for (size_t i = 0; i < sizeof places / sizeof places[0]; i++) {
        print_message("placement %s\n", places[i].body);
        assert_int_equal(http(&d, "POST", "/v1/place", places[i].body, out, sizeof out), 400);
        assert_non_null(strstr(out, places[i].field));
    }
    daemon_stop(&d);
}

/* A full instance table says so, with its size; a DELETE frees a slot for the real engine. */
static void test_sched_daemon_table_full(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    char body[256], out[8192];
    double start = now_ms();
    for (int i = 0; i < 4096; i++) {
        snprintf(body, sizeof body, "{\"id\":\"fake%d\",\"endpoint\":\"10.9.9.9:%d\"}", i,
                 1000 + i);
        assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 201);
    }
    print_message("4096 registrations: %.0f ms\n", now_ms() - start);
    const char *real = "{\"id\":\"engine0\",\"endpoint\":\"127.0.0.1:9200\"}";
    int status = http(&d, "POST", "/v1/instances", real, out, sizeof out);
    print_message("4097th: %d %s\n", status, out);
    assert_int_equal(status, 503);
    assert_non_null(strstr(out, "instance table full (4096 of 4096)"));
    assert_null(strstr(out, "store"));
    assert_int_equal(http(&d, "DELETE", "/v1/instances/fake17", NULL, out, sizeof out), 200);
    assert_int_equal(http(&d, "POST", "/v1/instances", real, out, sizeof out), 201);
    assert_true(listed(&d, "engine0"));
    assert_false(listed(&d, "fake17"));
    daemon_stop(&d);
}

/* With --instance-ttl 1, an instance that stops reporting leaves placement, the table and the
 * index within about a second, its events subscription ended; one that reports stays. */
static void test_sched_daemon_instances_expire(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, "--instance-ttl", "1");
    void *ctx = zmq_ctx_new();
    char ep[128], body[512], out[8192], who[64];
    void *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"busy\",\"block_tokens\":16,\"capacity_blocks\":1000,"
                          "\"endpoint\":\"127.0.0.1:9301\"}",
                          out, sizeof out),
                     201);
    snprintf(body, sizeof body,
             "{\"id\":\"quiet\",\"block_tokens\":16,\"capacity_blocks\":1000,\"events\":\"%s\","
             "\"endpoint\":\"127.0.0.1:9302\"}",
             ep);
    assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 201);
    double registered = now_ms();
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_stored(&sb, 100, 2, 16, 1); /* tokens 1..32: quiet holds the whole request */
    publish_until(&d, pub, 1, &sb, 2);
    assert_int_equal(http(&d, "POST", "/v1/instances/quiet/load", "{\"queued_prefill_tokens\":0}",
                          out, sizeof out),
                     200);
    registered = now_ms();
    placed_on(&d, who, sizeof who);
    assert_string_equal(who, "quiet");

    /* busy reports every 100 ms; quiet no more. Bounded to 5 s. */
    double gone = 0;
    while (now_ms() - registered < 5000) {
        assert_int_equal(http(&d, "POST", "/v1/instances/busy/load",
                              "{\"queued_prefill_tokens\":0}", out, sizeof out),
                         200);
        if (!listed(&d, "quiet")) {
            gone = now_ms() - registered;
            break;
        }
        usleep(100000);
    }
    print_message("quiet expired after %.0f ms\n", gone);
    assert_true(gone >= 900 && gone < 3000);
    assert_true(listed(&d, "busy"));
    assert_int_equal(stat_of(&d, "instances"), 1);
    assert_int_equal(stat_of(&d, "instances_expired"), 1);
    assert_int_equal(stat_of(&d, "holdings"), 0);
    assert_int_equal(stat_of(&d, "blocks"), 0);
    assert_int_equal(http(&d, "POST", "/v1/instances/quiet/load", "{\"queued_prefill_tokens\":0}",
                          out, sizeof out),
                     404);
    placed_on(&d, who, sizeof who);
    assert_string_equal(who, "busy");
    for (int i = 0; i < 50 && stat_of(&d, "subscriptions") != 0; i++)
        usleep(20000);
    assert_int_equal(stat_of(&d, "subscriptions"), 0);
    /* Its batches are no longer applied. */
    publish(pub, 2, sb.data, sb.size);
    usleep(300000);
    assert_int_equal(stat_of(&d, "blocks"), 0);
    /* An expired id is free again, whatever it registers with. */
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"quiet\",\"endpoint\":\"127.0.0.1:9999\"}", out, sizeof out),
                     201);
    msgpack_sbuffer_destroy(&sb);
    zmq_close(pub);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

/* An id registered with an endpoint is not taken over by a registration with another endpoint
 * or role (409) until it is deleted; the same registration again is fine. DELETE removes an
 * instance, and the instance that takes its slot gets none of its events. */
static void test_sched_daemon_conflicts_and_delete(void **state)
{
    (void)state;
    daemon_t d;
    sched_start(&d, NULL, NULL);
    char body[512], out[8192];
    const char *a = "{\"id\":\"eng\",\"role\":\"prefill\",\"endpoint\":\"127.0.0.1:9401\"}";
    assert_int_equal(http(&d, "POST", "/v1/instances", a, out, sizeof out), 201);
    assert_int_equal(http(&d, "POST", "/v1/instances", a, out, sizeof out), 200);
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"eng\",\"role\":\"prefill\",\"endpoint\":\"6.6.6.6:80\"}", out,
                          sizeof out),
                     409);
    print_message("409: %s\n", out);
    assert_non_null(strstr(out, "endpoint"));
    assert_non_null(strstr(out, "127.0.0.1:9401"));
    assert_non_null(strstr(out, "DELETE /v1/instances/eng"));
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"eng\",\"role\":\"both\",\"endpoint\":\"127.0.0.1:9401\"}", out,
                          sizeof out),
                     409);
    assert_non_null(strstr(out, "role"));
    /* where it runs is part of the record too: another zone or host is another instance */
    const char *where[][2] = {{"zone", "z9"}, {"host", "10.1.1.1"}};
    for (int i = 0; i < 2; i++) {
        snprintf(body, sizeof body,
                 "{\"id\":\"eng\",\"role\":\"prefill\",\"endpoint\":\"127.0.0.1:9401\","
                 "\"%s\":\"%s\"}",
                 where[i][0], where[i][1]);
        assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 409);
        assert_non_null(strstr(out, where[i][0]));
    }
    assert_int_equal(http(&d, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, "127.0.0.1:9401"));
    assert_null(strstr(out, "6.6.6.6"));
    assert_null(strstr(out, "z9"));

    assert_int_equal(http(&d, "DELETE", "/v1/instances/eng", NULL, out, sizeof out), 200);
    assert_int_equal(http(&d, "DELETE", "/v1/instances/eng", NULL, out, sizeof out), 404);
    assert_int_equal(http(&d, "DELETE", "/v1/instances/nobody", NULL, out, sizeof out), 404);
    assert_int_equal(http(&d, "DELETE", "/v1/instances", NULL, out, sizeof out), 405);
    assert_false(listed(&d, "eng"));
    assert_int_equal(http(&d, "POST", "/v1/instances",
                          "{\"id\":\"eng\",\"endpoint\":\"127.0.0.1:9402\"}", out, sizeof out),
                     201);
    assert_int_equal(stat_of(&d, "instances_deleted"), 1);

    /* old publishes events; deleted, its slot goes to new, which must not get them. */
    void *ctx = zmq_ctx_new();
    char ep[128];
    void *pub = pub_open(ctx, ZMQ_PUB, ep, sizeof ep);
    snprintf(body, sizeof body, "{\"id\":\"old\",\"block_tokens\":16,\"events\":\"%s\"}", ep);
    assert_int_equal(http(&d, "POST", "/v1/instances", body, out, sizeof out), 201);
    assert_non_null(strstr(out, "\"index\":1"));
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    pack_stored(&sb, 100, 4, 16, 1);
    publish_until(&d, pub, 1, &sb, 4);
    assert_int_equal(http(&d, "DELETE", "/v1/instances/old", NULL, out, sizeof out), 200);
    assert_int_equal(stat_of(&d, "blocks"), 0);
    assert_int_equal(
        http(&d, "POST", "/v1/instances", "{\"id\":\"new\",\"block_tokens\":16}", out, sizeof out),
        201);
    assert_non_null(strstr(out, "\"index\":1"));
    for (uint64_t seq = 2; seq < 12; seq++) {
        publish(pub, seq, sb.data, sb.size);
        usleep(30000);
    }
    assert_int_equal(stat_of(&d, "blocks"), 0);
    assert_int_equal(stat_of(&d, "subscriptions"), 0);
    msgpack_sbuffer_destroy(&sb);
    zmq_close(pub);
    zmq_ctx_term(ctx);
    daemon_stop(&d);
}

/* The reference engine reports its load every few seconds while idle, so it does not expire
 * (--instance-ttl 7 here, 5 s between its reports), and registers again when kvf-sched no longer
 * knows it (deleted here). */
static void test_sched_daemon_engine_heartbeat(void **state)
{
    (void)state;
    daemon_t store, sched, eng;
    daemon_start(&store, "64M", NULL);
    sched_start(&sched, "--instance-ttl", "7");
    char *argv[] = {(char *)KVF_ENGINE_BIN,
                    (char *)"--serve",
                    (char *)"--id",
                    (char *)"hb0",
                    (char *)"--listen",
                    (char *)"127.0.0.1:0",
                    (char *)"--zone",
                    (char *)"rack-7",
                    (char *)"--sched",
                    sched.addr,
                    (char *)"--store",
                    store.addr,
                    (char *)"--log-level",
                    (char *)"error",
                    NULL};
    proc_start(&eng, argv);
    static char out[1 << 16];
    /* its zone (--zone) is in its registration */
    assert_int_equal(http(&sched, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, "\"zone\":\"rack-7\""));
    double start = now_ms();
    while (now_ms() - start < 9000) {
        assert_true(listed(&sched, "hb0"));
        usleep(250000);
    }
    assert_int_equal(stat_of(&sched, "instances_expired"), 0);
    assert_int_equal(http(&sched, "DELETE", "/v1/instances/hb0", NULL, out, sizeof out), 200);
    start = now_ms();
    while (!listed(&sched, "hb0") && now_ms() - start < 8000)
        usleep(100000);
    print_message("registered again after %.0f ms\n", now_ms() - start);
    assert_true(listed(&sched, "hb0"));
    daemon_stop(&eng);
    daemon_stop(&sched);
    daemon_stop(&store);
}

/* A connector given only the scheduler's address finds the storage nodes through it. */
static void test_sched_daemon_connector_finds_stores(void **state)
{
    (void)state;
    daemon_t store, sched, bare;
    daemon_start(&store, "64M", NULL);
    sched_start(&sched, "--stores", store.addr);
    sched_start(&bare, NULL, NULL);
    char out[1024];
    assert_int_equal(http(&sched, "GET", "/v1/stores", NULL, out, sizeof out), 200);
    assert_non_null(strstr(out, store.addr));

    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    kvf_connector_opts o = {.sched = bare.addr, .layout = l, .deadline_ms = 2000};
    kvf_connector *cn = NULL;
    char err[256] = "";
    assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), KVF_ECONNREFUSED);
    assert_non_null(strstr(err, "no storage node"));
    o.sched = sched.addr;
    assert_int_equal(kvf_connector_open(&cn, &o, err, sizeof err), 0);
    /* Pages of our own: one chunk (4 pages of 16 tokens) per layer. */
    size_t page = kvf_layout_bytes_per_token_layer(&l) / 2 * l.page_tokens;
    kvf_kv_layer reg[4];
    for (uint32_t i = 0; i < l.layers; i++) {
        reg[i] = (kvf_kv_layer){.k_base = malloc(4 * page),
                                .v_base = malloc(4 * page),
                                .page_stride = page,
                                .num_pages = 4,
                                .kind = KVF_MEM_HOST};
        memset(reg[i].k_base, (int)i + 1, 4 * page);
        memset(reg[i].v_base, (int)i + 101, 4 * page);
    }
    assert_int_equal(kvf_connector_register(cn, reg, l.layers, err, sizeof err), 0);
    uint32_t tokens[64], ids[4] = {0, 1, 2, 3};
    for (int i = 0; i < 64; i++)
        tokens[i] = (uint32_t)(i * 7 + 3);
    kvf_xfer *x;
    assert_int_equal(kvf_connector_save(cn, tokens, 64, 0, ids, 4, &x), 0);
    for (uint32_t i = 0; i < l.layers; i++)
        assert_int_equal(kvf_xfer_layer_done(x, i), 0);
    assert_int_equal(kvf_xfer_wait(x), 0);
    kvf_xfer_free(&x);
    size_t cached = 0;
    assert_int_equal(kvf_connector_lookup(cn, tokens, 64, &cached), 0);
    assert_int_equal(cached, 64);
    kvf_connector_close(&cn);
    for (uint32_t i = 0; i < l.layers; i++) {
        free(reg[i].k_base);
        free(reg[i].v_base);
    }
    daemon_stop(&bare);
    daemon_stop(&sched);
    daemon_stop(&store);
}

/* status of method path on d with bearer (NULL: no Authorization header), body's reply in out. */
static long call_as(const daemon_t *d, const char *bearer, const char *method, const char *path,
                    const char *body, char *out, size_t outlen)
{
    char url[128], err[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%u%s", d->port, path);
    json_t *b = body ? json_loads(body, 0, NULL) : NULL;
    long status = 0;
    json_t *reply = NULL;
    assert_int_equal(
        kvf__http_call_bearer(method, url, b, bearer, 3000, &status, &reply, err, sizeof err), 0);
    char *t = reply ? json_dumps(reply, JSON_COMPACT) : NULL;
    snprintf(out, outlen, "%s", t ? t : "");
    free(t);
    json_decref(reply);
    json_decref(b);
    return status;
}

/* With --tokens every request but GETs needs a token of the file, compared whole; an instance
 * belongs to the token that registered it: another token can neither take it over nor report its
 * load nor delete it. A token file that does not read is refused at start. */
static void test_sched_daemon_bearer_tokens(void **state)
{
    (void)state;
    const char *ta = "alpha-0123456789abcdef0123456789abcdef",
               *tb = "bravo-0123456789abcdef0123456789abcdef";
    char path[] = "/tmp/kvf-test-tokens-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    char file[256];
    int n = snprintf(file, sizeof file, "# engines\nalpha %s\nbravo %s  # the router\n", ta, tb);
    assert_int_equal(write(fd, file, (size_t)n), n);
    close(fd);
    daemon_t d;
    sched_start(&d, "--tokens", path);
    char out[4096];
    const char *reg = "{\"id\":\"eng\",\"role\":\"both\",\"endpoint\":\"127.0.0.1:9401\"}";
    assert_int_equal(call_as(&d, NULL, "POST", "/v1/instances", reg, out, sizeof out), 401);
    assert_non_null(strstr(out, "Bearer"));
    char wrong[64];
    snprintf(wrong, sizeof wrong, "%.*sX", (int)strlen(ta) - 1, ta); /* one character off */
    assert_int_equal(call_as(&d, wrong, "POST", "/v1/instances", reg, out, sizeof out), 401);
    assert_int_equal(call_as(&d, "alpha", "POST", "/v1/instances", reg, out, sizeof out), 401);
    assert_int_equal(call_as(&d, NULL, "GET", "/v1/instances", NULL, out, sizeof out), 200);
    assert_null(strstr(out, "9401"));
    assert_int_equal(call_as(&d, ta, "POST", "/v1/instances", reg, out, sizeof out), 201);
    assert_int_equal(call_as(&d, ta, "POST", "/v1/instances", reg, out, sizeof out), 200);
    assert_int_equal(call_as(&d, tb, "POST", "/v1/instances", reg, out, sizeof out), 403);
    assert_non_null(strstr(out, "alpha"));
    const char *load = "{\"queued_prefill_tokens\":0,\"active_decodes\":0,\"used_blocks\":0}";
    assert_int_equal(call_as(&d, tb, "POST", "/v1/instances/eng/load", load, out, sizeof out), 403);
    assert_int_equal(call_as(&d, NULL, "POST", "/v1/instances/eng/load", load, out, sizeof out),
                     401);
    assert_int_equal(call_as(&d, ta, "POST", "/v1/instances/eng/load", load, out, sizeof out), 200);
    const char *place = "{\"tokens\":[1,2,3,4],\"output_tokens\":4}";
    assert_int_equal(call_as(&d, NULL, "POST", "/v1/place", place, out, sizeof out), 401);
    long st = call_as(&d, tb, "POST", "/v1/place", place, out, sizeof out);
    assert_true(st != 401 && st != 403);
    assert_int_equal(call_as(&d, tb, "DELETE", "/v1/instances/eng", NULL, out, sizeof out), 403);
    assert_int_equal(call_as(&d, NULL, "DELETE", "/v1/instances/eng", NULL, out, sizeof out), 401);
    assert_int_equal(call_as(&d, ta, "DELETE", "/v1/instances/eng", NULL, out, sizeof out), 200);
    /* Once deleted, the id is free for another token. */
    assert_int_equal(call_as(&d, tb, "POST", "/v1/instances", reg, out, sizeof out), 201);
    daemon_stop(&d);

    /* A token too short to be one: refused at start, with the line named. */
    fd = open(path, O_WRONLY | O_TRUNC);
    assert_true(fd >= 0);
    n = snprintf(file, sizeof file, "alpha short\n");
    assert_int_equal(write(fd, file, (size_t)n), n);
    close(fd);
    char *argv[] = {(char *)KVF_SCHED_BIN,
                    SMALL_INDEX,
                    (char *)"--listen",
                    (char *)"127.0.0.1:0",
                    (char *)"--tokens",
                    path,
                    NULL};
    char msg[2048];
    assert_int_equal(harness_run(argv, msg, sizeof msg), 2);
    assert_non_null(strstr(msg, ":1:"));
    unlink(path);
}

/* Until clients are authenticated, kvf-sched and kvf-engine refuse to listen where other hosts
 * could reach them unless told --insecure: they say why and exit 2. */
/* A cluster file with a typo, an unknown role or a wrong shape is refused with the file, the
 * instance and the key named, and serves nothing (it used to start with the role "both"). */
static void test_sched_daemon_strict_config(void **state)
{
    (void)state;
    static const struct {
        const char *body, *want;
    } cases[] = {
        {"{\"instances\": [{\"id\": \"a\", \"role\": \"prefil\"}]}",
         "instances[0]: \"role\" must be prefill, decode or both, not \"prefil\""},
        {"{\"instances\": [{\"id\": \"a\"}, {\"id\": \"b\", \"rol\": \"decode\"}]}",
         "instances[1]: unknown key \"rol\" (did you mean \"role\""},
        {"{\"instance\": []}", "unknown key \"instance\" (did you mean \"instances\""},
        {"{\"instances\": {\"id\": \"a\"}}", "\"instances\" must be an array"},
        {"{\"instances\": [{\"id\": 7}]}", "instances[0]: \"id\" must be a string"},
        {"{\"instances\": [{\"id\": \"a\", \"block_tokens\": 0}]}",
         "instances[0]: \"block_tokens\" must be an integer in 1..65536"},
    };
    char path[] = "/tmp/kvf-sched-config-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        fputs(cases[i].body, f);
        fclose(f);
        char out[2048];
        char *argv[] = {(char *)KVF_SCHED_BIN,
                        SMALL_INDEX,
                        (char *)"--listen",
                        (char *)"127.0.0.1:0",
                        (char *)"--config",
                        path,
                        NULL};
        assert_int_equal(harness_run(argv, out, sizeof out), 2);
        if (!strstr(out, cases[i].want) || !strstr(out, path))
            fail_msg("config %s: expected \"%s\" and the file named, got: %s", cases[i].body,
                     cases[i].want, out);
    }
    unlink(path);
}

static void test_sched_daemon_refuses_open_listen(void **state)
{
    (void)state;
    char out[2048];
    char *sched[] = {(char *)KVF_SCHED_BIN, SMALL_INDEX, (char *)"--listen", (char *)"0.0.0.0:0",
                     NULL};
    assert_int_equal(harness_run(sched, out, sizeof out), 2);
    assert_non_null(strstr(out, "refusing --listen on 0.0.0.0"));
    char *engine[] = {(char *)KVF_ENGINE_BIN, (char *)"--serve",   (char *)"--id",
                      (char *)"e0",           (char *)"--role",    (char *)"both",
                      (char *)"--listen",     (char *)"0.0.0.0:0", NULL};
    assert_int_equal(harness_run(engine, out, sizeof out), 2);
    assert_non_null(strstr(out, "--insecure"));
    char *events[] = {(char *)KVF_ENGINE_BIN, (char *)"--serve",   (char *)"--id",
                      (char *)"e0",           (char *)"--role",    (char *)"both",
                      (char *)"--events",     (char *)"0.0.0.0:0", NULL};
    assert_int_equal(harness_run(events, out, sizeof out), 2);
    assert_non_null(strstr(out, "refusing --events"));
}

int main(void)
{
    harness_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_sched_daemon_events_and_placement, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_refuses_open_listen, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_strict_config, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_bearer_tokens, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_connector_finds_stores, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_sequence_extremes, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_hung_replay, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_late_join_and_resync, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_sharded_index, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_restarted_publisher_is_learnt_again,
                                  teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_unanswered_replay_is_asked_again,
                                  teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_replay_socket_misbehaves, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_slow_replay_is_continued, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_silent_replay_sockets, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_gaps_share_the_round, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_slow_snapshot, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_snapshot_holds_the_stream, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_relay_shards_a_vllm_stream, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_relay_clears_what_was_lost, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_relay_contact_hole, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_relay_owes_what_it_could_not_ask,
                                  teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_lookup_health_and_no_store, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_numbers_are_range_checked, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_table_full, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_placement_tickets, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_instances_expire, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_conflicts_and_delete, teardown_daemons),
        cmocka_unit_test_teardown(test_sched_daemon_engine_heartbeat, teardown_daemons),
    };
    return cmocka_run_group_tests_name("sched_daemon", tests, NULL, NULL);
}
