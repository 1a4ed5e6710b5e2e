/* A storage node's chunk events (publish.h). */
#include "publish.h"

#include "bytes.h"
#include "clock.h"
#include "kvevents.h"
#include "kvf/error.h"

#include <msgpack.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

/* Changes waiting for the sender, at most; more are dropped and the sequence skips a number. Both
 * buffers are taken at this size when the publisher opens (address space: pages become resident
 * as a burst first reaches them), so noting a change never allocates under the cache's lock. */
#define MAX_PENDING (1u << 20)

typedef struct change {
    kvf_key key;
    uint8_t admitted;
} change;

struct kvf__pub {
    void *zctx, *sock;
    int node;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    change *pending, *spare; /* the cache appends to pending; the sender sends the other */
    size_t n;
    int dropped, stop;
    uint64_t seq;
};

void kvf__pub_note(void *pv, int admitted, const kvf_key *key)
{
    kvf__pub *p = pv;
    pthread_mutex_lock(&p->mu);
    if (p->n < MAX_PENDING)
        p->pending[p->n++] = (change){*key, (uint8_t)(admitted != 0)};
    else
        p->dropped = 1;
    pthread_mutex_unlock(&p->mu);
}

static void pack_str(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* One batch: the changes in order, as runs of one kind. */
static void send_batch(kvf__pub *p, const change *c, size_t n, int dropped)
{
    size_t runs = 0;
    for (size_t i = 0; i < n; i++)
        runs += i == 0 || c[i].admitted != c[i - 1].admitted;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 3);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    msgpack_pack_double(&pk, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
    msgpack_pack_array(&pk, runs);
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j < n && c[j].admitted == c[i].admitted)
            j++;
        msgpack_pack_array(&pk, 3);
        pack_str(&pk, c[i].admitted ? "ChunksAdmitted" : "ChunksEvicted");
        msgpack_pack_int(&pk, p->node);
        msgpack_pack_array(&pk, j - i);
        for (size_t k = i; k < j; k++) {
            uint8_t b[16];
            kvf__put_u64(b, c[k].key.lo);
            kvf__put_u64(b + 8, c[k].key.hi);
            msgpack_pack_bin(&pk, 16);
            msgpack_pack_bin_body(&pk, b, 16);
        }
        i = j;
    }
    msgpack_pack_int(&pk, 0);
    p->seq += 1 + (dropped != 0); /* a skipped number tells the subscriber changes were lost */
    kvf__kv_events_send(p->sock, "kvf-store", p->seq, sb.data, sb.size);
    msgpack_sbuffer_destroy(&sb);
}

static void *sender_main(void *arg)
{
    kvf__pub *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        if (!p->n && !p->stop) {
            kvf__cond_wait_ms(&p->cv, &p->mu, 20);
            continue;
        }
        if (!p->n && p->stop)
            break;
        /* Swap buffers: the cache keeps appending while this batch is sent. */
        change *mine = p->pending;
        size_t n = p->n;
        int dropped = p->dropped;
        p->pending = p->spare;
        p->spare = mine;
        p->n = 0;
        p->dropped = 0;
        pthread_mutex_unlock(&p->mu);
        for (size_t off = 0; off < n; off += 4096) /* bounded messages */
            send_batch(p, mine + off, n - off < 4096 ? n - off : 4096, dropped && off == 0);
        pthread_mutex_lock(&p->mu);
        if (p->stop && !p->n)
            break;
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int kvf__pub_open(kvf__pub **out, const char *host, uint16_t port, int node, char *endpoint,
                  size_t eplen, char *err, size_t errlen)
{
    *out = NULL;
    kvf__pub *p = calloc(1, sizeof *p);
    if (p) {
        p->pending = malloc(MAX_PENDING * sizeof *p->pending);
        p->spare = malloc(MAX_PENDING * sizeof *p->spare);
    }
    if (!p || !p->pending || !p->spare) {
        if (p)
            free(p->pending), free(p->spare);
        free(p);
        snprintf(err, errlen, "events: out of memory");
        return KVF_ENOMEM;
    }
    p->node = node;
    p->zctx = zmq_ctx_new();
    p->sock = p->zctx ? zmq_socket(p->zctx, ZMQ_PUB) : NULL;
    char bind[300];
    if (port)
        snprintf(bind, sizeof bind, "tcp://%s:%u", host, (unsigned)port);
    else
        snprintf(bind, sizeof bind, "tcp://%s:*", host);
    int linger = 1000;
    size_t el = eplen;
    if (!p->sock || zmq_setsockopt(p->sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_bind(p->sock, bind) != 0 ||
        zmq_getsockopt(p->sock, ZMQ_LAST_ENDPOINT, endpoint, &el) != 0) {
        snprintf(err, errlen, "events: cannot bind %s: %s", bind, zmq_strerror(zmq_errno()));
        if (p->sock)
            zmq_close(p->sock);
        if (p->zctx)
            zmq_ctx_term(p->zctx);
        free(p->pending), free(p->spare);
        free(p);
        return KVF_EADDRINUSE;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    if (pthread_create(&p->th, NULL, sender_main, p) != 0) {
        zmq_close(p->sock);
        zmq_ctx_term(p->zctx);
        free(p->pending), free(p->spare);
        free(p);
        return KVF_ENOMEM;
    }
    *out = p;
    return 0;
}

void kvf__pub_close(kvf__pub **pp)
{
    if (!pp || !*pp)
        return;
    kvf__pub *p = *pp;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->th, NULL);
    zmq_close(p->sock);
    zmq_ctx_term(p->zctx);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->pending);
    free(p->spare);
    free(p);
    *pp = NULL;
}
