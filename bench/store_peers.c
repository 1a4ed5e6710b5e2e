/*
 * What kvf-bench store compares kvfabric with (store_bench.h): the loopback TCP ceiling at a
 * given write size and stream count, and Redis with as many connections as kvfabric uses, at its
 * better of two forms for a batch: MGET/MSET, or GET/SET pipelined (hiredis).
 */
#include "store_bench.h"

#include "bench_util.h"

#include <hiredis/hiredis.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_STREAMS 16

/* ------------------------------------------------------------------------------------------ */
/* The TCP ceiling */

typedef struct ceil_arg {
    int fd;
    double secs;
    uint64_t bytes;
    uint8_t *buf;
    size_t len;
} ceil_arg;

static void *ceil_send(void *p)
{
    ceil_arg *a = p;
    double end = bench_now() + a->secs;
    while (bench_now() < end) {
        size_t off = 0;
        while (off < a->len) {
            ssize_t w = send(a->fd, a->buf + off, a->len - off, MSG_NOSIGNAL);
            if (w <= 0)
                goto out_shutdown;
            off += (size_t)w;
        }
    }
out_shutdown:
    shutdown(a->fd, SHUT_WR);
    return NULL;
}

static void *ceil_recv(void *p)
{
    ceil_arg *a = p;
#ifdef SO_RCVLOWAT
    /* Woken once per 256 KiB (or per write, where smaller) rather than per segment, as the
     * client's receiver is: a ceiling that wakes per segment is not the best the loopback gives. */
    int lowat = a->len < (256u << 10) ? (int)a->len : 256 << 10;
    setsockopt(a->fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof lowat);
#endif
    for (;;) {
        ssize_t r = recv(a->fd, a->buf, a->len, 0);
        if (r <= 0)
            break;
        a->bytes += (uint64_t)r;
    }
    return NULL;
}

static void sock_bufs(int fd)
{
    int sz = 8 << 20, one = 1;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* A connected pair on the listener l (bound to a): *c the sending end, *s the receiving one. */
static int stream_pair(int l, const struct sockaddr_in *a, int *c, int *s)
{
    *c = socket(AF_INET, SOCK_STREAM, 0);
    if (*c < 0)
        return -1;
    sock_bufs(*c);
    if (connect(*c, (const struct sockaddr *)a, sizeof *a) != 0 ||
        (*s = accept(l, NULL, NULL)) < 0) {
        close(*c);
        return -1;
    }
    sock_bufs(*s);
    return 0;
}

/* The polled form: one thread sends on every stream and one receives from every stream, each
 * waiting in poll() for whichever socket is ready, as kvf-store's loop and the client's I/O thread
 * do (with few cores, a thread per stream and side competes for them). */
typedef struct poll_arg {
    int n;
    ceil_arg *a; /* a[0..n) */
    int send;
} poll_arg;

static void *ceil_poll(void *p)
{
    poll_arg *pa = p;
    struct pollfd pf[MAX_STREAMS];
    size_t off[MAX_STREAMS] = {0};
    int open = pa->n;
    double end = pa->send ? bench_now() + pa->a[0].secs : 0;
    for (int i = 0; i < pa->n; i++) {
        pf[i] = (struct pollfd){.fd = pa->a[i].fd, .events = pa->send ? POLLOUT : POLLIN};
        fcntl(pa->a[i].fd, F_SETFL, fcntl(pa->a[i].fd, F_GETFL) | O_NONBLOCK);
#ifdef SO_RCVLOWAT
        int lowat = pa->a[i].len < (256u << 10) ? (int)pa->a[i].len : 256 << 10;
        if (!pa->send)
            setsockopt(pa->a[i].fd, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof lowat);
#endif
    }
    while (open > 0) {
        if (pa->send && bench_now() >= end)
            break;
        if (poll(pf, (nfds_t)pa->n, 200) < 0)
            break;
        for (int i = 0; i < pa->n; i++) {
            ceil_arg *a = &pa->a[i];
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLOUT | POLLHUP | POLLERR)))
                continue;
            ssize_t r = pa->send ? send(a->fd, a->buf + off[i], a->len - off[i], MSG_NOSIGNAL)
                                 : recv(a->fd, a->buf, a->len, 0);
            if (r > 0 && pa->send) {
                off[i] = (off[i] + (size_t)r) % a->len;
            } else if (r > 0) {
                a->bytes += (uint64_t)r;
            } else if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
                pf[i].fd = -1;
                open--;
            }
        }
    }
    if (pa->send) {
        for (int i = 0; i < pa->n; i++)
            shutdown(pa->a[i].fd, SHUT_WR);
    }
    return NULL;
}

double tcp_ceiling(int streams, size_t write_bytes, int polled, double secs)
{
    int n = streams < MAX_STREAMS ? streams : MAX_STREAMS;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t sl = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 64) ||
        getsockname(l, (struct sockaddr *)&a, &sl)) {
        if (l >= 0)
            close(l);
        return 0;
    }
    ceil_arg snd[MAX_STREAMS] = {0}, rcv[MAX_STREAMS] = {0};
    pthread_t ts[MAX_STREAMS], tr[MAX_STREAMS];
    int made = 0;
    for (; made < n; made++) {
        int c, s;
        uint8_t *sb = malloc(write_bytes), *rb = malloc(write_bytes);
        if (!sb || !rb || stream_pair(l, &a, &c, &s) != 0) {
            free(sb), free(rb);
            break;
        }
        memset(sb, made + 1, write_bytes);
        memset(rb, 0, write_bytes); /* both buffers faulted in before the clock starts */
        snd[made] = (ceil_arg){.fd = c, .secs = secs, .buf = sb, .len = write_bytes};
        rcv[made] = (ceil_arg){.fd = s, .buf = rb, .len = write_bytes};
    }
    close(l);
    double t0 = bench_now();
    poll_arg ps = {.n = n, .a = snd, .send = 1}, pr = {.n = n, .a = rcv, .send = 0};
    int threads = made < n ? 0 : polled ? 1 : n, started = 0;
    for (int i = 0; i < threads; i++, started++) {
        if (pthread_create(&tr[i], NULL, polled ? ceil_poll : ceil_recv,
                           polled ? (void *)&pr : &rcv[i]) != 0)
            break;
        if (pthread_create(&ts[i], NULL, polled ? ceil_poll : ceil_send,
                           polled ? (void *)&ps : &snd[i]) != 0) {
            for (int j = polled ? 0 : i; j < (polled ? n : i + 1); j++)
                shutdown(rcv[j].fd, SHUT_RDWR);
            pthread_join(tr[i], NULL);
            break;
        }
    }
    for (int i = 0; i < started; i++) {
        pthread_join(ts[i], NULL);
        pthread_join(tr[i], NULL);
    }
    uint64_t total = 0;
    for (int i = 0; i < made; i++) {
        total += rcv[i].bytes;
        close(snd[i].fd);
        close(rcv[i].fd);
        free(snd[i].buf);
        free(rcv[i].buf);
    }
    double dt = bench_now() - t0;
    return made == n && started == threads ? (double)total / dt / 1e9 : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Redis */

struct redis_peer {
    bench_proc proc;
    int n;
    redisContext *c[MAX_STREAMS];
};

void redis_peer_close(redis_peer **pp)
{
    if (!pp || !*pp)
        return;
    redis_peer *p = *pp;
    for (int i = 0; i < p->n; i++)
        redisFree(p->c[i]);
    bench_stop(&p->proc);
    free(p);
    *pp = NULL;
}

redis_peer *redis_peer_open(int conns)
{
    redis_peer *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    if (bench_start_redis(&p->proc) != 0) {
        bench_progress("store", "redis-server not available: peer figures omitted");
        free(p);
        return NULL;
    }
    struct timeval tv = {30, 0};
    for (; p->n < (conns < MAX_STREAMS ? conns : MAX_STREAMS); p->n++) {
        redisContext *c = redisConnectWithTimeout("127.0.0.1", p->proc.port, tv);
        if (!c || c->err) {
            if (c)
                redisFree(c);
            redis_peer_close(&p);
            return NULL;
        }
        p->c[p->n] = c;
    }
    return p;
}

/* One connection's share of a batch: keys i, i + n, i + 2n ... */
typedef struct share {
    redisContext *c;
    workload *w;
    int first, step, set, pipelined;
    double secs;
    uint64_t bytes;
    int errors;
    char (*names)[32];
} share;

/* One reply for key i: a SET's status, or a GET's value copied into the destination as a
 * connector must; its bytes into s->bytes, or an error counted. */
static void take_reply(share *s, size_t i, const redisReply *e)
{
    workload *w = s->w;
    if (s->set && e && e->type == REDIS_REPLY_STATUS) {
        s->bytes += w->lens[i];
    } else if (!s->set && e && e->type == REDIS_REPLY_STRING && e->len <= w->caps[i]) {
        memcpy(w->bufs[i], e->str, e->len);
        s->bytes += e->len;
    } else {
        s->errors++;
    }
}

/* GET or SET of each of the share's keys, all sent before the first reply is read. */
static int pipelined_batch(share *s)
{
    workload *w = s->w;
    size_t sent = 0;
    for (size_t i = (size_t)s->first; i < w->n; i += (size_t)s->step, sent++) {
        const char *argv[3] = {s->set ? "SET" : "GET", s->names[i], (const char *)w->objs[i]};
        size_t argl[3] = {3, strlen(s->names[i]), w->lens[i]};
        if (redisAppendCommandArgv(s->c, s->set ? 3 : 2, argv, argl) != REDIS_OK)
            return -1;
    }
    for (size_t i = (size_t)s->first; i < w->n && sent > 0; i += (size_t)s->step, sent--) {
        redisReply *r = NULL;
        if (redisGetReply(s->c, (void **)&r) != REDIS_OK)
            return -1;
        take_reply(s, i, r);
        freeReplyObject(r);
    }
    return 0;
}

/* MSET or MGET of the share's keys (or, pipelined, GET or SET of each); the bytes that arrived
 * whole into s->bytes. */
static int one_batch(share *s, const char **argv, size_t *argl)
{
    if (s->pipelined)
        return pipelined_batch(s);
    workload *w = s->w;
    int argc = 1;
    argv[0] = s->set ? "MSET" : "MGET";
    argl[0] = 4;
    for (size_t i = (size_t)s->first; i < w->n; i += (size_t)s->step) {
        argv[argc] = s->names[i];
        argl[argc++] = strlen(s->names[i]);
        if (s->set) {
            argv[argc] = (const char *)w->objs[i];
            argl[argc++] = w->lens[i];
        }
    }
    redisReply *r = redisCommandArgv(s->c, argc, argv, argl);
    if (!r)
        return -1;
    if (s->set && r->type == REDIS_REPLY_STATUS) {
        for (size_t i = (size_t)s->first; i < w->n; i += (size_t)s->step)
            s->bytes += w->lens[i];
    } else if (!s->set && r->type == REDIS_REPLY_ARRAY) {
        size_t k = 0;
        for (size_t i = (size_t)s->first; i < w->n; i += (size_t)s->step, k++)
            take_reply(s, i, k < r->elements ? r->element[k] : NULL);
    } else {
        s->errors += (int)((w->n - (size_t)s->first + (size_t)s->step - 1) / (size_t)s->step);
    }
    freeReplyObject(r);
    return 0;
}

static void *share_main(void *arg)
{
    share *s = arg;
    size_t max = 1 + 2 * s->w->n;
    const char **argv = malloc(max * sizeof *argv);
    size_t *argl = malloc(max * sizeof *argl);
    double end = bench_now() + s->secs;
    int iters = 0;
    while (argv && argl && (bench_now() < end || iters == 0) && one_batch(s, argv, argl) == 0)
        iters++;
    free(argv);
    free(argl);
    return NULL;
}

/* GB/s of one form (pipelined or not) of w's batch over p's connections, for secs. */
static double form_rate(redis_peer *p, workload *w, char (*names)[32], int set, int pipelined,
                        double secs, int *errors)
{
    *errors = 0;
    share sh[MAX_STREAMS];
    pthread_t th[MAX_STREAMS];
    int n = p->n < (int)w->n ? p->n : (int)w->n;
    double t0 = bench_now();
    int started[MAX_STREAMS];
    for (int i = 0; i < n; i++) {
        sh[i] = (share){.c = p->c[i],
                        .w = w,
                        .first = i,
                        .step = n,
                        .set = set,
                        .pipelined = pipelined,
                        .secs = secs,
                        .names = names};
        started[i] = pthread_create(&th[i], NULL, share_main, &sh[i]) == 0;
    }
    uint64_t bytes = 0;
    for (int i = 0; i < n; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        else
            sh[i].errors += (int)((w->n - (size_t)i + (size_t)n - 1) / (size_t)n);
        bytes += sh[i].bytes;
        *errors += sh[i].errors;
    }
    double dt = bench_now() - t0;
    return (double)bytes / dt / 1e9;
}

double redis_peer_rate(redis_peer *p, workload *w, int set, double secs, int *errors,
                       int *pipelined_best)
{
    *errors = 0;
    *pipelined_best = 0;
    char(*names)[32] = calloc(w->n, sizeof *names);
    if (!names)
        return 0;
    for (size_t i = 0; i < w->n; i++)
        snprintf(names[i], sizeof names[i], "kvf:%zu:%zu", (size_t)w->payload, i);
    int n = p->n < (int)w->n ? p->n : (int)w->n;
    for (int i = 0; !set && i < n; i++) { /* what a GET reads is stored first, untimed */
        share one = {
            .c = p->c[i], .w = w, .first = i, .step = n, .set = 1, .secs = 0, .names = names};
        share_main(&one);
    }
    int e[2];
    double multi = form_rate(p, w, names, set, 0, secs, &e[0]);
    double piped = form_rate(p, w, names, set, 1, secs, &e[1]);
    free(names);
    *errors = e[0] + e[1];
    *pipelined_best = piped > multi;
    return piped > multi ? piped : multi;
}
