/*
 * The rate-limited link (ratelink.h). One thread accepts; each connection gets a relay thread
 * that polls both sides. Bytes from the upstream server are paced through one reservation clock
 * shared by every connection: a piece of n bytes occupies the link for n / rate seconds after the
 * link frees, and is forwarded once its last byte would have left (store and forward, in pieces
 * small enough that the pacing error stays under a millisecond at the rates the benchmarks use).
 * Bytes towards the server are not limited: requests are small, and saves do not go through it.
 */
#include "ratelink.h"

#include "bench_util.h"

#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#define PIECE (256 * 1024)

typedef struct relay {
    struct relay *next;
    bench_link *l;
    int c, s; /* client and server sockets; closed by bench_link_stop */
    pthread_t th;
} relay;

struct bench_link {
    int lfd;
    uint16_t port, upstream;
    pthread_t acceptor;
    atomic_int stop;
    pthread_mutex_t mu; /* guards what follows */
    double rate;        /* bytes per second; 0: unlimited */
    double free_at;     /* when the link has sent every byte reserved so far */
    relay *relays;
};

static int send_all(int fd, const uint8_t *b, size_t n)
{
    while (n) {
        ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
        if (w <= 0)
            return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Reserves the link for n bytes and sleeps until they would have left it. */
static void pace(bench_link *l, size_t n)
{
    pthread_mutex_lock(&l->mu);
    double rate = l->rate, now = bench_now();
    double due = now;
    if (rate > 0) {
        l->free_at = (l->free_at > now ? l->free_at : now) + (double)n / rate;
        due = l->free_at;
    }
    pthread_mutex_unlock(&l->mu);
    if (due <= now)
        return;
    struct timespec ts = {.tv_sec = (time_t)due};
    ts.tv_nsec = (long)((due - floor(due)) * 1e9);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0)
        ;
}

static void *relay_main(void *arg)
{
    relay *r = arg;
    bench_link *l = r->l;
    uint8_t *buf = malloc(PIECE);
    while (buf && !atomic_load(&l->stop)) {
        struct pollfd pf[2] = {{.fd = r->c, .events = POLLIN}, {.fd = r->s, .events = POLLIN}};
        if (poll(pf, 2, 50) < 0)
            break;
        if (pf[0].revents) {
            ssize_t n = recv(r->c, buf, PIECE, 0);
            if (n <= 0 || send_all(r->s, buf, (size_t)n))
                break;
        }
        if (pf[1].revents) {
            ssize_t n = recv(r->s, buf, PIECE, 0);
            if (n <= 0)
                break;
            pace(l, (size_t)n);
            if (send_all(r->c, buf, (size_t)n))
                break;
        }
    }
    /* The peer still connected learns the link is gone. */
    shutdown(r->c, SHUT_RDWR);
    shutdown(r->s, SHUT_RDWR);
    free(buf);
    return NULL;
}

/* Connects to the upstream server; -1 on failure. */
static int dial(uint16_t port)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        close(s);
        s = -1;
    }
    if (s >= 0) {
        int one = 1;
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    return s;
}

static void *acceptor_main(void *arg)
{
    bench_link *l = arg;
    while (!atomic_load(&l->stop)) {
        struct pollfd pf = {.fd = l->lfd, .events = POLLIN};
        if (poll(&pf, 1, 50) <= 0)
            continue;
        int c = accept(l->lfd, NULL, NULL);
        if (c < 0)
            continue;
        int one = 1;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int s = dial(l->upstream);
        relay *r = s >= 0 ? calloc(1, sizeof *r) : NULL;
        if (!r) {
            close(c);
            if (s >= 0)
                close(s);
            continue;
        }
        *r = (relay){.l = l, .c = c, .s = s};
        if (pthread_create(&r->th, NULL, relay_main, r) != 0) {
            close(c);
            close(s);
            free(r);
            continue;
        }
        pthread_mutex_lock(&l->mu);
        r->next = l->relays;
        l->relays = r;
        pthread_mutex_unlock(&l->mu);
    }
    return NULL;
}

int bench_link_start(bench_link **out, uint16_t upstream)
{
    *out = NULL;
    bench_link *l = calloc(1, sizeof *l);
    if (!l) {
        fprintf(stderr, "kvf-bench: out of memory for the rate-limited link\n");
        return -1;
    }
    l->upstream = upstream;
    pthread_mutex_init(&l->mu, NULL);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof a;
    l->lfd = socket(AF_INET, SOCK_STREAM, 0);
    if (l->lfd < 0 || bind(l->lfd, (struct sockaddr *)&a, sizeof a) != 0 ||
        listen(l->lfd, 64) != 0 || getsockname(l->lfd, (struct sockaddr *)&a, &sl) != 0) {
        perror("kvf-bench: rate-limited link");
        goto out_free;
    }
    l->port = ntohs(a.sin_port);
    if (pthread_create(&l->acceptor, NULL, acceptor_main, l) != 0) {
        fprintf(stderr, "kvf-bench: cannot start the rate-limited link's thread\n");
        goto out_free;
    }
    *out = l;
    return 0;

out_free:
    if (l->lfd >= 0)
        close(l->lfd);
    pthread_mutex_destroy(&l->mu);
    free(l);
    return -1;
}

uint16_t bench_link_port(const bench_link *l)
{
    return l->port;
}

void bench_link_set_rate(bench_link *l, double bytes_per_s)
{
    pthread_mutex_lock(&l->mu);
    l->rate = bytes_per_s > 0 ? bytes_per_s : 0;
    pthread_mutex_unlock(&l->mu);
}

void bench_link_stop(bench_link **lp)
{
    if (!lp || !*lp)
        return;
    bench_link *l = *lp;
    atomic_store(&l->stop, 1);
    pthread_join(l->acceptor, NULL);
    /* No relay is added any more: each notices the flag within its poll's timeout, or its
     * sockets' shutdown if it is blocked sending. */
    relay *r = l->relays;
    while (r) {
        relay *next = r->next;
        shutdown(r->c, SHUT_RDWR);
        shutdown(r->s, SHUT_RDWR);
        pthread_join(r->th, NULL);
        close(r->c);
        close(r->s);
        free(r);
        r = next;
    }
    close(l->lfd);
    pthread_mutex_destroy(&l->mu);
    free(l);
    *lp = NULL;
}
