/* KV event streams over ZeroMQ (pubsub.h). */
#include "pubsub.h"

#include "kvf/error.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* A batch kept for replay: its topic, sequence number and payload, in one allocation. */
typedef struct kept {
    uint64_t seq;
    size_t topic_len, len;
    atomic_int refs;      /* the ring's, and each replay sending it: no copies per request */
    unsigned char data[]; /* topic, then payload */
} kept;

static void kept_unref(kept *k)
{
    if (k && atomic_fetch_sub(&k->refs, 1) == 1)
        free(k);
}

/* ZeroMQ is done with a replayed payload (sent, or dropped): its reference goes. */
static void kept_msg_free(void *data, void *hint)
{
    (void)data;
    kept_unref(hint);
}

struct kvf__zpub {
    void *ctx, *sock;
    /* The replay socket (kvf__zpub_replay): a ROUTER served by its own thread from a ring of the
     * last batches sent, under rmu. */
    void *router;
    pthread_t replay_th;
    int replay_started;
    atomic_int replay_stop;
    pthread_mutex_t rmu;
    kept **ring;
    size_t ring_cap, ring_head, ring_n, ring_bytes, max_bytes;
    /* Or, instead of a ring, snapshots (kvf__zpub_snapshots): the ROUTER answers every request
     * with what snap() emits, numbered with the last sequence number sent when it began. */
    kvf__zpub_snap_fn snap;
    void *snap_ctx;
    _Atomic uint64_t last_seq;
    /* Secured (kvf__zpub_open_secure): the ZAP handler's thread and socket, and the policy. */
    int secure;
    kvf__zsec sec;
    char prefix[128];
    pthread_t zap_th;
    void *zap;
    atomic_int zap_stop;
    int zap_started;
};

static void seq_put(uint8_t be[8], uint64_t seq)
{
    for (int i = 7; i >= 0; i--, seq >>= 8)
        be[i] = (uint8_t)seq;
}

/* ZeroMQ's ZAP (RFC 27): one request is [version, request id, domain, address, identity,
 * mechanism, credentials...]; for CURVE the credential is the client's 32-byte public key. The
 * reply's user id ("a:NAME" for an admin, "t:NAME" for a tenant) comes back on every message of
 * that peer, subscriptions included, as the "User-Id" property. */
static void zap_answer(kvf__zpub *p)
{
    zmq_msg_t f[8];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t *m = n < 8 ? &f[n] : NULL, drop;
        if (!m)
            m = &drop;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, p->zap, 0) < 0) {
            zmq_msg_close(m);
            break;
        }
        more = zmq_msg_more(m);
        if (m == &drop)
            zmq_msg_close(m);
        else
            n++;
    }
    char user[160] = "";
    int ok = 0, admin = 0;
    if (n >= 7 && zmq_msg_size(&f[5]) == 5 && !memcmp(zmq_msg_data(&f[5]), "CURVE", 5) &&
        zmq_msg_size(&f[6]) == 32) {
        char name[128] = "";
        ok = p->sec.allow(p->sec.ud, zmq_msg_data(&f[6]), name, sizeof name, &admin);
        snprintf(user, sizeof user, "%s:%s", admin ? "a" : "t", name);
    }
    const char *status = ok ? "200" : "400";
    const char *text = ok ? "OK" : "unknown key";
    zmq_send(p->zap, "1.0", 3, ZMQ_SNDMORE);
    if (n >= 2)
        zmq_send(p->zap, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]), ZMQ_SNDMORE);
    else
        zmq_send(p->zap, "", 0, ZMQ_SNDMORE);
    zmq_send(p->zap, status, 3, ZMQ_SNDMORE);
    zmq_send(p->zap, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(p->zap, ok ? user : "", ok ? strlen(user) : 0, ZMQ_SNDMORE);
    zmq_send(p->zap, "", 0, 0);
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}

/* ZeroMQ's address to bind host:port on (port 0: a free one). */
static void bind_addr(char *out, size_t n, const char *host, uint16_t port)
{
    if (port)
        snprintf(out, n, "tcp://%s:%u", host, (unsigned)port);
    else
        snprintf(out, n, "tcp://%s:*", host);
}

/* Makes sock a CURVE server with the publisher's secret, authenticated by its ZAP handler. */
static int curve_server(void *sock, const uint8_t secret[32])
{
    int one = 1;
    return zmq_setsockopt(sock, ZMQ_CURVE_SERVER, &one, sizeof one) ||
           zmq_setsockopt(sock, ZMQ_CURVE_SECRETKEY, secret, 32) ||
           zmq_setsockopt(sock, ZMQ_ZAP_DOMAIN, "kvf", 3);
}

/* A helper thread's loop: answers what arrives on sock with fn until stop is set. */
static void serve_socket(kvf__zpub *p, void *sock, atomic_int *stop, void (*fn)(kvf__zpub *))
{
    while (!atomic_load(stop)) {
        zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 100) > 0 && (it.revents & ZMQ_POLLIN))
            fn(p);
    }
}

static void *zap_main(void *arg)
{
    kvf__zpub *p = arg;
    serve_socket(p, p->zap, &p->zap_stop, zap_answer);
    return NULL;
}

/* A publisher on host:port, secured by sec (NULL: an open PUB socket). The ZAP handler must be
 * bound before the socket that uses it accepts anyone. */
static int zpub_make(kvf__zpub **out, const char *host, uint16_t port, int linger_ms,
                     const kvf__zsec *sec, char *endpoint, size_t eplen, char *err, size_t errlen)
{
    *out = NULL;
    kvf__zpub *p = calloc(1, sizeof *p);
    if (!p || !(p->ctx = zmq_ctx_new()) ||
        !(p->sock = zmq_socket(p->ctx, sec ? ZMQ_XPUB : ZMQ_PUB)) ||
        (sec && !(p->zap = zmq_socket(p->ctx, ZMQ_REP)))) {
        snprintf(err, errlen, "events: cannot make a ZeroMQ socket: %s",
                 p ? zmq_strerror(zmq_errno()) : "out of memory");
        kvf__zpub_close(&p);
        return KVF_ENOMEM;
    }
    int one = 1, zero = 0;
    if (sec) {
        p->secure = 1;
        p->sec = *sec;
        snprintf(p->prefix, sizeof p->prefix, "%s", sec->tenant_prefix ? sec->tenant_prefix : "");
        if (zmq_setsockopt(p->zap, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
            zmq_bind(p->zap, "inproc://zeromq.zap.01") != 0 ||
            pthread_create(&p->zap_th, NULL, zap_main, p) != 0) {
            snprintf(err, errlen, "events: cannot start the ZAP handler: %s",
                     zmq_strerror(zmq_errno()));
            kvf__zpub_close(&p);
            return KVF_ENOMEM;
        }
        p->zap_started = 1;
    }
    char bind[300];
    bind_addr(bind, sizeof bind, host, port);
    size_t el = eplen;
    int rc = zmq_setsockopt(p->sock, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    if (!rc && sec)
        rc = curve_server(p->sock, sec->secret) ||
             zmq_setsockopt(p->sock, ZMQ_XPUB_MANUAL, &one, sizeof one);
    if (rc || zmq_bind(p->sock, bind) != 0 ||
        zmq_getsockopt(p->sock, ZMQ_LAST_ENDPOINT, endpoint, &el) != 0) {
        snprintf(err, errlen, "events: cannot bind %s: %s", bind, zmq_strerror(zmq_errno()));
        kvf__zpub_close(&p);
        return KVF_EADDRINUSE;
    }
    *out = p;
    return 0;
}

int kvf__zpub_open(kvf__zpub **out, const char *host, uint16_t port, int linger_ms, char *endpoint,
                   size_t eplen, char *err, size_t errlen)
{
    return zpub_make(out, host, port, linger_ms, NULL, endpoint, eplen, err, errlen);
}

int kvf__zpub_open_secure(kvf__zpub **out, const char *host, uint16_t port, int linger_ms,
                          const kvf__zsec *sec, char *endpoint, size_t eplen, char *err,
                          size_t errlen)
{
    *out = NULL;
    if (!zmq_has("curve")) {
        snprintf(err, errlen, "events: this libzmq has no CURVE security");
        return KVF_ENOTSUP;
    }
    return zpub_make(out, host, port, linger_ms, sec, endpoint, eplen, err, errlen);
}

void kvf__zpub_service(kvf__zpub *p)
{
    if (!p->secure)
        return;
    for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, p->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        const uint8_t *d = zmq_msg_data(&m);
        size_t n = zmq_msg_size(&m);
        const char *user = zmq_msg_gets(&m, "User-Id");
        if (n >= 1 && (d[0] == 0 || d[0] == 1) && user && (user[0] == 'a' || user[0] == 't') &&
            user[1] == ':') {
            int opt = d[0] ? ZMQ_SUBSCRIBE : ZMQ_UNSUBSCRIBE;
            if (user[0] == 'a') {
                zmq_setsockopt(p->sock, opt, d + 1, n - 1);
            } else { /* a tenant: its own topic, whatever it asked for */
                char topic[300];
                int tl = snprintf(topic, sizeof topic, "%s%s/", p->prefix, user + 2);
                if (tl > 0 && (size_t)tl < sizeof topic)
                    zmq_setsockopt(p->sock, opt, topic, (size_t)tl);
            }
        }
        zmq_msg_close(&m);
    }
}

/* Keeps a batch for replay, dropping the oldest beyond the ring's count or bytes. */
static void keep(kvf__zpub *p, const char *topic, uint64_t seq, const void *payload, size_t len)
{
    size_t tl = strlen(topic);
    if (len > p->max_bytes)
        return; /* larger than the whole window: a replay asking for it ends short */
    kept *k = malloc(sizeof *k + tl + len);
    if (!k)
        return; /* a batch missing from the window: a replay of it ends short */
    k->seq = seq, k->topic_len = tl, k->len = len;
    atomic_init(&k->refs, 1);
    memcpy(k->data, topic, tl);
    memcpy(k->data + tl, payload, len);
    pthread_mutex_lock(&p->rmu);
    while (p->ring_n && (p->ring_n == p->ring_cap || p->ring_bytes + len > p->max_bytes)) {
        kept *old = p->ring[p->ring_head];
        p->ring_bytes -= old->len;
        kept_unref(old);
        p->ring_head = (p->ring_head + 1) % p->ring_cap;
        p->ring_n--;
    }
    p->ring[(p->ring_head + p->ring_n) % p->ring_cap] = k;
    p->ring_n++;
    p->ring_bytes += len;
    pthread_mutex_unlock(&p->rmu);
}

int kvf__zpub_send(kvf__zpub *p, const char *topic, uint64_t seq, const void *payload, size_t len)
{
    kvf__zpub_service(p);
    uint8_t be[8];
    seq_put(be, seq);
    atomic_store(&p->last_seq, seq);
    if (p->replay_started && !p->snap)
        keep(p, topic, seq, payload, len);
    if (zmq_send(p->sock, topic, strlen(topic), ZMQ_SNDMORE) < 0 ||
        zmq_send(p->sock, be, 8, ZMQ_SNDMORE) < 0 || zmq_send(p->sock, payload, len, 0) < 0)
        return KVF_EIO;
    return 0;
}

/* Whether a replay requester whose ZAP user id is `user` may see a batch under topic: anyone on
 * an open publisher; on a secured one an admin, or the tenant whose topic it is. */
static int may_see(const kvf__zpub *p, const char *user, const unsigned char *t, size_t tlen)
{
    if (!p->secure)
        return 1;
    if (!user || user[1] != ':')
        return 0;
    if (user[0] == 'a')
        return 1;
    char topic[300];
    int tl = snprintf(topic, sizeof topic, "%s%s/", p->prefix, user + 2);
    return user[0] == 't' && tl > 0 && (size_t)tl == tlen && !memcmp(topic, t, tlen);
}

/* One snapshot being answered: to whom, as whom, and under which number. */
typedef struct snap_req {
    kvf__zpub *p;
    zmq_msg_t *id;
    const char *user; /* the ZAP user id, or NULL on an open publisher */
    uint8_t seq[8];
    int failed;
} snap_req;

/* kvf__zpub_snap_emit: one batch of a snapshot, sent where the requester may see its topic. A
 * send that fails (the requester gone, or not reading for the socket's timeout) ends the
 * snapshot: the requester sees no end marker and asks again later. */
static int snap_emit(void *ectx, const char *topic, const void *payload, size_t len)
{
    snap_req *r = ectx;
    if (r->failed)
        return -1;
    if (!may_see(r->p, r->user, (const unsigned char *)topic, strlen(topic)))
        return 0;
    void *sock = r->p->router;
    if (zmq_send(sock, zmq_msg_data(r->id), zmq_msg_size(r->id), ZMQ_SNDMORE) < 0 ||
        zmq_send(sock, "", 0, ZMQ_SNDMORE) < 0 || zmq_send(sock, r->seq, 8, ZMQ_SNDMORE) < 0 ||
        zmq_send(sock, payload, len, 0) < 0) {
        r->failed = 1;
        return -1;
    }
    return 0;
}

/* One replay request, [identity, "", first sequence (8 bytes)]: every batch kept from that
 * number on that the requester may see, [identity, "", sequence, payload], then the end
 * [identity, "", 0xff x 8, ""] (vLLM's protocol). A fourth frame names a topic, as a subscription
 * does (a prefix: "kv-events/s/K/" takes a secured publisher's "kv-events/s/K/t/TENANT/"): only
 * its batches are answered (a sharded publisher numbers each shard on its own). The ring is
 * copied out under rmu first. */
static void replay_answer(kvf__zpub *p)
{
    zmq_msg_t f[4];
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, p->router, 0) < 0) {
            zmq_msg_close(&m);
            break;
        }
        more = zmq_msg_more(&m);
        if (n < 4)
            f[n++] = m;
        else
            zmq_msg_close(&m);
    }
    if ((n == 3 || n == 4) && zmq_msg_size(&f[2]) == 8) {
        const void *want = n == 4 ? zmq_msg_data(&f[3]) : NULL;
        size_t want_len = n == 4 ? zmq_msg_size(&f[3]) : 0;
        char user[160] = "";
        const char *u = zmq_msg_gets(&f[2], "User-Id");
        snprintf(user, sizeof user, "%s", u ? u : "");
        uint8_t end[8];
        memset(end, 0xff, sizeof end);
        if (p->snap) {
            snap_req r = {.p = p, .id = &f[0], .user = u ? user : NULL};
            seq_put(r.seq, atomic_load(&p->last_seq));
            if (p->snap(p->snap_ctx, snap_emit, &r) != 0 || r.failed)
                goto done;
            memcpy(end, r.seq, 8); /* a snapshot's end says its number too */
            goto end;
        }
        const uint8_t *b = zmq_msg_data(&f[2]);
        uint64_t from = 0;
        for (int i = 0; i < 8; i++)
            from = from << 8 | b[i];
        pthread_mutex_lock(&p->rmu);
        size_t cnt = p->ring_n, k = 0;
        kept **copy = malloc((cnt ? cnt : 1) * sizeof *copy);
        for (size_t i = 0; copy && i < cnt; i++) {
            kept *src = p->ring[(p->ring_head + i) % p->ring_cap];
            /* modulo 2^64, as subscribers compare: at or after from */
            if (src->seq - from >= ((uint64_t)1 << 63) ||
                (want && (src->topic_len < want_len || memcmp(src->data, want, want_len))) ||
                !may_see(p, u ? user : NULL, src->data, src->topic_len))
                continue;
            atomic_fetch_add(&src->refs, 1);
            copy[k++] = src;
        }
        pthread_mutex_unlock(&p->rmu);
        /* Each payload goes by reference, not copied: the replies queued for requesters that
         * do not read (each request answers the whole window) hold the ring's batches, not a
         * copy of them per request (40 unread requests of a 64 MiB window took 2.5 GB). */
        for (size_t i = 0; i < k; i++) {
            uint8_t be[8];
            seq_put(be, copy[i]->seq);
            zmq_send(p->router, zmq_msg_data(&f[0]), zmq_msg_size(&f[0]), ZMQ_SNDMORE);
            zmq_send(p->router, "", 0, ZMQ_SNDMORE);
            zmq_send(p->router, be, 8, ZMQ_SNDMORE);
            /* The message takes a reference of its own, and this thread lets go of its one
             * only after its last look at the batch: that release is what orders its reads
             * before the free, wherever the last reference goes (ZeroMQ hands the message to
             * its I/O thread by means a race detector does not see). */
            atomic_fetch_add(&copy[i]->refs, 1);
            zmq_msg_t m;
            if (zmq_msg_init_data(&m, copy[i]->data + copy[i]->topic_len, copy[i]->len,
                                  kept_msg_free, copy[i]) != 0) {
                kept_unref(copy[i]); /* the message's: sent by copy instead */
                zmq_send(p->router, copy[i]->data + copy[i]->topic_len, copy[i]->len, 0);
            } else if (zmq_msg_send(&m, p->router, 0) < 0) {
                zmq_msg_close(&m); /* its reference goes with it */
            }
            kept_unref(copy[i]);
        }
        free(copy);
    end:
        zmq_send(p->router, zmq_msg_data(&f[0]), zmq_msg_size(&f[0]), ZMQ_SNDMORE);
        zmq_send(p->router, "", 0, ZMQ_SNDMORE);
        zmq_send(p->router, end, 8, ZMQ_SNDMORE);
        zmq_send(p->router, "", 0, 0);
    }
done:
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}

static void *replay_main(void *arg)
{
    kvf__zpub *p = arg;
    serve_socket(p, p->router, &p->replay_stop, replay_answer);
    return NULL;
}

/* The largest message a subscriber takes (a batch: the decoder refuses larger ones), and the
 * largest a replay socket takes (a request: a sequence number and a topic). A peer that sends
 * more is disconnected by ZeroMQ before the message is held whole. */
#define SUB_MAX_MSG    ((int64_t)256 << 20)
#define REPLAY_MAX_MSG ((int64_t)4096)

/* Binds the ROUTER that answers replay requests (from the ring, or with snapshots) and starts its
 * thread. hwm: the messages it may queue for a peer; mandatory: a send beyond that waits (at most
 * a few seconds) instead of dropping. */
static int router_start(kvf__zpub *p, const char *host, uint16_t port, int hwm, int mandatory,
                        char *endpoint, size_t eplen, char *err, size_t errlen)
{
    int zero = 0, one = 1, wait_ms = 5000, rc = 0;
    char bind[300];
    bind_addr(bind, sizeof bind, host, port);
    size_t el = eplen;
    if (!(p->router = zmq_socket(p->ctx, ZMQ_ROUTER))) {
        snprintf(err, errlen, "events: cannot make the replay socket");
        return KVF_ENOMEM;
    }
    int64_t most = REPLAY_MAX_MSG;
    rc = zmq_setsockopt(p->router, ZMQ_LINGER, &zero, sizeof zero) ||
         zmq_setsockopt(p->router, ZMQ_SNDHWM, &hwm, sizeof hwm) ||
         zmq_setsockopt(p->router, ZMQ_MAXMSGSIZE, &most, sizeof most);
    if (!rc && mandatory)
        rc = zmq_setsockopt(p->router, ZMQ_ROUTER_MANDATORY, &one, sizeof one) ||
             zmq_setsockopt(p->router, ZMQ_SNDTIMEO, &wait_ms, sizeof wait_ms);
    if (!rc && p->secure)
        rc = curve_server(p->router, p->sec.secret);
    if (rc || zmq_bind(p->router, bind) != 0 ||
        zmq_getsockopt(p->router, ZMQ_LAST_ENDPOINT, endpoint, &el) != 0) {
        snprintf(err, errlen, "events: cannot bind the replay socket %s: %s", bind,
                 zmq_strerror(zmq_errno()));
        zmq_close(p->router);
        p->router = NULL;
        return KVF_EADDRINUSE;
    }
    pthread_mutex_init(&p->rmu, NULL);
    if (pthread_create(&p->replay_th, NULL, replay_main, p) != 0) {
        pthread_mutex_destroy(&p->rmu);
        zmq_close(p->router);
        p->router = NULL;
        snprintf(err, errlen, "events: cannot start the replay thread");
        return KVF_ENOMEM;
    }
    p->replay_started = 1;
    return 0;
}

int kvf__zpub_replay(kvf__zpub *p, const char *host, uint16_t port, size_t batches, size_t bytes,
                     char *endpoint, size_t eplen, char *err, size_t errlen)
{
    if (p->replay_started || batches == 0 || bytes == 0) {
        snprintf(err, errlen, "events: replay already started, or an empty window");
        return KVF_EINVAL;
    }
    if (!(p->ring = calloc(batches, sizeof *p->ring))) {
        snprintf(err, errlen, "events: cannot make the replay socket");
        return KVF_ENOMEM;
    }
    p->ring_cap = batches;
    p->max_bytes = bytes;
    /* A ROUTER drops what goes over a peer's high-water mark without a word: room for a whole
     * window and its end marker, so that a replay is never cut in the middle. */
    int hwm = batches > (size_t)INT32_MAX - 16 ? INT32_MAX : (int)batches + 16;
    int rc = router_start(p, host, port, hwm, 0, endpoint, eplen, err, errlen);
    if (rc) {
        free(p->ring);
        p->ring = NULL;
    }
    return rc;
}

int kvf__zpub_snapshots(kvf__zpub *p, const char *host, uint16_t port, kvf__zpub_snap_fn fn,
                        void *ctx, char *endpoint, size_t eplen, char *err, size_t errlen)
{
    if (p->replay_started || !fn) {
        snprintf(err, errlen, "events: replay already started, or no snapshot");
        return KVF_EINVAL;
    }
    p->snap = fn;
    p->snap_ctx = ctx;
    /* A snapshot can be any number of batches: a few queued, then each send waits for the
     * requester to read (a requester that stops reading for 5 s ends it). */
    int rc = router_start(p, host, port, 64, 1, endpoint, eplen, err, errlen);
    if (rc)
        p->snap = NULL;
    return rc;
}

void kvf__zpub_close(kvf__zpub **pp)
{
    if (!pp || !*pp)
        return;
    kvf__zpub *p = *pp;
    if (p->replay_started) {
        atomic_store(&p->replay_stop, 1);
        pthread_join(p->replay_th, NULL);
        for (size_t i = 0; i < p->ring_n; i++)
            kept_unref(p->ring[(p->ring_head + i) % p->ring_cap]);
        pthread_mutex_destroy(&p->rmu);
    }
    if (p->router)
        zmq_close(p->router);
    free(p->ring);
    if (p->sock)
        zmq_close(p->sock);
    if (p->zap_started) {
        atomic_store(&p->zap_stop, 1);
        pthread_join(p->zap_th, NULL);
    }
    if (p->zap)
        zmq_close(p->zap);
    if (p->ctx)
        zmq_ctx_term(p->ctx);
    free(p);
    *pp = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Subscribers */

#define KEEP_FRAMES 3

typedef struct zsub {
    void *sock;
    void *replay;        /* DEALER to the publisher's replay socket, or NULL */
    char topic[96];      /* what it subscribed to ("": everything), named in its replay requests */
    char replay_ep[256]; /* where the DEALER connects (kvf__zsubs_replay_reset) */
} zsub;

struct kvf__zsubs {
    void *ctx;
    int curve; /* kvf__zsubs_curve: keys for the sockets made from then on */
    uint8_t server_pk[32], pk[32], sk[32];
    zsub subs[KVF_ZSUBS_MAX];
    int n;
    /* The last message received from a subscription (slot 0) and from a replay socket (slot 1),
     * each kept until the next one of its kind: a replay runs while a batch is in hand. */
    zmq_msg_t parts[2][KEEP_FRAMES];
    int held[2];
};

int kvf__zsubs_open(kvf__zsubs **out)
{
    *out = NULL;
    kvf__zsubs *s = calloc(1, sizeof *s);
    if (!s)
        return KVF_ENOMEM;
    if (!(s->ctx = zmq_ctx_new())) {
        free(s);
        return KVF_ENOMEM;
    }
    /* a SUB and a replay DEALER per publisher: ZeroMQ's default of 1,023 sockets would stop new
     * subscriptions at about 511 publishers */
    zmq_ctx_set(s->ctx, ZMQ_MAX_SOCKETS, 2 * KVF_ZSUBS_MAX + 64);
    *out = s;
    return 0;
}

static void release_msg(kvf__zsubs *s, int slot)
{
    for (int k = 0; k < s->held[slot]; k++)
        zmq_msg_close(&s->parts[slot][k]);
    s->held[slot] = 0;
}

void kvf__zsubs_curve(kvf__zsubs *s, const uint8_t server_pk[32], const uint8_t pk[32],
                      const uint8_t sk[32])
{
    s->curve = 1;
    memcpy(s->server_pk, server_pk, 32);
    memcpy(s->pk, pk, 32);
    memcpy(s->sk, sk, 32);
}

static void *socket_to(const kvf__zsubs *s, int type, const char *endpoint, const char *topic)
{
    void *sk = zmq_socket(s->ctx, type);
    if (!sk)
        return NULL;
    int zero = 0;
    int64_t most = SUB_MAX_MSG;
    zmq_setsockopt(sk, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sk, ZMQ_MAXMSGSIZE, &most, sizeof most);
    if (s->curve && (zmq_setsockopt(sk, ZMQ_CURVE_SERVERKEY, s->server_pk, 32) != 0 ||
                     zmq_setsockopt(sk, ZMQ_CURVE_PUBLICKEY, s->pk, 32) != 0 ||
                     zmq_setsockopt(sk, ZMQ_CURVE_SECRETKEY, s->sk, 32) != 0)) {
        zmq_close(sk);
        return NULL;
    }
    if (type == ZMQ_SUB)
        zmq_setsockopt(sk, ZMQ_SUBSCRIBE, topic, strlen(topic));
    if (zmq_connect(sk, endpoint) != 0) {
        zmq_close(sk);
        return NULL;
    }
    return sk;
}

int kvf__zsubs_add(kvf__zsubs *s, const char *endpoint, const char *replay, int *idx, char *err,
                   size_t errlen)
{
    return kvf__zsubs_add_topic(s, endpoint, replay, NULL, idx, err, errlen);
}

int kvf__zsubs_add_topic(kvf__zsubs *s, const char *endpoint, const char *replay, const char *topic,
                         int *idx, char *err, size_t errlen)
{
    topic = topic ? topic : "";
    if (replay && strlen(replay) >= sizeof s->subs[0].replay_ep) {
        snprintf(err, errlen, "events: replay endpoint \"%.40s...\" is too long", replay);
        return KVF_EINVAL;
    }
    if (strlen(topic) >= sizeof s->subs[0].topic) {
        snprintf(err, errlen, "events: topic \"%.40s...\" is too long", topic);
        return KVF_EINVAL;
    }
    int i = 0;
    while (i < s->n && s->subs[i].sock) /* the lowest slot kvf__zsubs_drop() freed, or a new one */
        i++;
    if (i == KVF_ZSUBS_MAX) {
        snprintf(err, errlen, "events: %d publishers already", KVF_ZSUBS_MAX);
        return KVF_E2BIG;
    }
    zsub *z = &s->subs[i];
    snprintf(z->topic, sizeof z->topic, "%s", topic);
    if (!(z->sock = socket_to(s, ZMQ_SUB, endpoint, topic))) {
        snprintf(err, errlen, "events: cannot connect to %s: %s", endpoint,
                 zmq_strerror(zmq_errno()));
        return KVF_ECONNREFUSED;
    }
    z->replay = NULL;
    snprintf(z->replay_ep, sizeof z->replay_ep, "%s", replay ? replay : "");
    if (replay && replay[0] && !(z->replay = socket_to(s, ZMQ_DEALER, replay, ""))) {
        snprintf(err, errlen, "events: cannot connect to the replay socket %s: %s", replay,
                 zmq_strerror(zmq_errno()));
        z->replay_ep[0] = '\0'; /* left out */
    }
    *idx = i;
    if (i == s->n)
        s->n++;
    return 0;
}

void kvf__zsubs_drop(kvf__zsubs *s, int idx)
{
    if (idx < 0 || idx >= s->n || !s->subs[idx].sock)
        return;
    zmq_close(s->subs[idx].sock);
    if (s->subs[idx].replay)
        zmq_close(s->subs[idx].replay);
    s->subs[idx] = (zsub){0};
    while (s->n > 0 && !s->subs[s->n - 1].sock)
        s->n--;
}

int kvf__zsubs_has_replay(const kvf__zsubs *s, int idx)
{
    /* a socket whose replacement could not be made (kvf__zsubs_replay_reset) is made again at
     * the next request */
    return s->subs[idx].replay != NULL || s->subs[idx].replay_ep[0];
}

int kvf__zsubs_poll_held(kvf__zsubs *s, int timeout_ms, const uint8_t *held, uint8_t *ready)
{
    zmq_pollitem_t items[KVF_ZSUBS_MAX];
    int of[KVF_ZSUBS_MAX], k = 0; /* items[j] is publisher of[j]'s: dropped slots are left out */
    for (int i = 0; i < s->n; i++) {
        ready[i] = 0;
        void *sock = held && held[i] ? s->subs[i].replay : s->subs[i].sock;
        if (s->subs[i].sock && sock) {
            of[k] = held && held[i] ? -1 : i;
            items[k++] = (zmq_pollitem_t){.socket = sock, .events = ZMQ_POLLIN};
        }
    }
    int n = zmq_poll(items, k, timeout_ms);
    if (n < 0)
        return zmq_errno() == EINTR ? 0 : KVF_EIO;
    for (int j = 0; j < k; j++)
        if (of[j] >= 0)
            ready[of[j]] = (items[j].revents & ZMQ_POLLIN) != 0;
    return n;
}

int kvf__zsubs_poll(kvf__zsubs *s, int timeout_ms, uint8_t *ready)
{
    return kvf__zsubs_poll_held(s, timeout_ms, NULL, ready);
}

/* Receives one multipart message into slot, keeping its first KEEP_FRAMES frames and dropping
 * the rest. flags: ZMQ_DONTWAIT or 0. */
static int recv_msg(kvf__zsubs *s, int slot, void *sock, int flags, kvf__zmsg *m)
{
    release_msg(s, slot);
    zmq_msg_t *parts = s->parts[slot];
    int more = 1, frames = 0, held = 0;
    while (more) {
        zmq_msg_t drop, *part = held < KEEP_FRAMES ? &parts[held] : &drop;
        zmq_msg_init(part);
        if (zmq_msg_recv(part, sock, frames ? 0 : flags) < 0) {
            int e = zmq_errno();
            zmq_msg_close(part);
            if (frames == 0)
                return e == EAGAIN ? KVF_EAGAIN : KVF_EIO;
            break;
        }
        more = zmq_msg_more(part);
        frames++;
        if (part == &drop)
            zmq_msg_close(&drop);
        else
            held++;
    }
    s->held[slot] = held;
    memset(m, 0, sizeof *m);
    m->frames = frames;
    if (held >= 2) {
        m->seq = zmq_msg_data(&parts[held - 2]);
        m->seq_len = zmq_msg_size(&parts[held - 2]);
    }
    if (held == 3) {
        m->topic = zmq_msg_data(&parts[0]);
        m->topic_len = zmq_msg_size(&parts[0]);
    }
    m->payload = zmq_msg_data(&parts[held - 1]);
    m->len = zmq_msg_size(&parts[held - 1]);
    return 0;
}

int kvf__zsubs_recv(kvf__zsubs *s, int idx, kvf__zmsg *m)
{
    if (!s->subs[idx].sock)
        return KVF_EAGAIN;
    return recv_msg(s, 0, s->subs[idx].sock, ZMQ_DONTWAIT, m);
}

int kvf__zsubs_replay_ask(kvf__zsubs *s, int idx, uint64_t from)
{
    zsub *z = &s->subs[idx];
    if (!z->replay && z->replay_ep[0])
        z->replay = socket_to(s, ZMQ_DEALER, z->replay_ep, "");
    void *r = z->replay;
    if (!r)
        return KVF_ENOTCONN;
    uint8_t req[8];
    seq_put(req, from);
    /* Never blocks: a DEALER whose peer is gone or does not read would wait in zmq_send().
     * Once the first frame is queued, the rest of the message is too. */
    if (zmq_send(r, "", 0, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return zmq_errno() == EAGAIN ? KVF_EAGAIN : KVF_EIO;
    const char *t = s->subs[idx].topic;
    if (zmq_send(r, req, 8, t[0] ? ZMQ_SNDMORE | ZMQ_DONTWAIT : ZMQ_DONTWAIT) < 0)
        return KVF_EIO;
    if (t[0] && zmq_send(r, t, strlen(t), ZMQ_DONTWAIT) < 0)
        return KVF_EIO;
    return 0;
}

int kvf__zsubs_replay_recv(kvf__zsubs *s, int idx, int timeout_ms, kvf__zmsg *m)
{
    void *r = s->subs[idx].replay;
    if (!r)
        return KVF_ENOTCONN;
    zmq_pollitem_t it = {.socket = r, .events = ZMQ_POLLIN};
    int n = zmq_poll(&it, 1, timeout_ms);
    if (n < 0)
        return KVF_EIO;
    if (n == 0)
        return KVF_ETIMEDOUT;
    return recv_msg(s, 1, r, 0, m);
}

int kvf__zsubs_replay_reset(kvf__zsubs *s, int idx)
{
    zsub *z = &s->subs[idx];
    if (!z->replay_ep[0])
        return KVF_ENOTCONN;
    if (z->replay) {
        release_msg(s, 1); /* a held answer is the old socket's */
        zmq_close(z->replay);
    }
    /* when this fails, the next request makes it (kvf__zsubs_replay_ask) */
    z->replay = socket_to(s, ZMQ_DEALER, z->replay_ep, "");
    return z->replay ? 0 : KVF_EIO;
}

void kvf__zsubs_close(kvf__zsubs **sp)
{
    if (!sp || !*sp)
        return;
    kvf__zsubs *s = *sp;
    release_msg(s, 0);
    release_msg(s, 1);
    for (int i = 0; i < s->n; i++) {
        if (s->subs[i].sock)
            zmq_close(s->subs[i].sock);
        if (s->subs[i].replay)
            zmq_close(s->subs[i].replay);
    }
    zmq_ctx_term(s->ctx);
    for (volatile uint8_t *v = s->sk; v < s->sk + sizeof s->sk; v++) /* not optimised away */
        *v = 0;
    free(s);
    *sp = NULL;
}
