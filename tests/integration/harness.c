#include "harness.h"

#include "proc.h"
#include "tcp.h"

#include "kvf/client.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef KVF_STORE_BIN
#error "KVF_STORE_BIN must name the kvf-store binary"
#endif

/* Every daemon started and not yet stopped, so a failing test (cmocka unwinds it with longjmp)
 * still leaves no process behind: the teardown and an atexit handler kill them. */
static pid_t live[32];

static void track(pid_t pid, int add)
{
    for (int i = 0; i < 32; i++) {
        if (add ? live[i] == 0 : live[i] == pid) {
            live[i] = add ? pid : 0;
            return;
        }
    }
}

static void kill_all(void)
{
    for (int i = 0; i < 32; i++) {
        if (live[i] > 0) {
            kill(live[i], SIGCONT);
            kill(live[i], SIGKILL);
            waitpid(live[i], NULL, 0);
            live[i] = 0;
        }
    }
}

int teardown_daemons(void **state)
{
    (void)state;
    kill_all();
    return 0;
}

void harness_init(void)
{
    signal(SIGPIPE, SIG_IGN);
    atexit(kill_all);
    const char *filter = getenv("KVF_TEST_FILTER");
    if (filter)
        cmocka_set_test_filter(filter);
}

static void started(daemon_t *d, pid_t pid, uint16_t port, const char *err)
{
    if (pid < 0)
        fail_msg("%s", err);
    track(pid, 1);
    d->pid = pid;
    d->port = port;
    snprintf(d->addr, sizeof d->addr, "127.0.0.1:%u", d->port);
}

void proc_start(daemon_t *d, char *const argv[])
{
    char err[640];
    uint16_t port = 0;
    pid_t pid = kvf__proc_start_daemon(argv, 10000, &port, err, sizeof err);
    started(d, pid, port, err);
}

const char *harness_store_bin(void)
{
    return KVF_STORE_BIN;
}

void daemon_start(daemon_t *d, const char *memory, const char *extra)
{
    char err[640];
    uint16_t port = 0;
    pid_t pid = kvf__proc_start_store(KVF_STORE_BIN, memory, extra, 10000, &port, err, sizeof err);
    started(d, pid, port, err);
}

void daemon_start_limited(daemon_t *d, const char *memory, const char *extra, int nofile,
                          const char *stderr_path)
{
    /* The shell lowers the limit and redirects, then becomes kvf-store: the pid is the daemon's. */
    char script[768];
    snprintf(script, sizeof script,
             "ulimit -n %d && exec \"$0\" --listen 127.0.0.1:0 --memory %s --log-level warn %s "
             "2>\"$1\"",
             nofile, memory, extra ? extra : "");
    char *argv[] = {(char *)"/bin/sh",     (char *)"-c",        script,
                    (char *)KVF_STORE_BIN, (char *)stderr_path, NULL};
    proc_start(d, argv);
}

void daemon_stop(daemon_t *d)
{
    if (d->pid <= 0)
        return;
    kill(d->pid, SIGTERM);
    int status = 0;
    for (int i = 0; i < 1000; i++) {
        if (waitpid(d->pid, &status, WNOHANG) == d->pid) {
            track(d->pid, 0);
            d->pid = 0;
            assert_true(WIFEXITED(status));
            assert_int_equal(WEXITSTATUS(status), 0);
            return;
        }
        usleep(10000);
    }
    kill(d->pid, SIGKILL);
    waitpid(d->pid, &status, 0);
    track(d->pid, 0);
    d->pid = 0;
    fail_msg("kvf-store did not stop within 10 s of SIGTERM");
}

void daemon_kill(daemon_t *d)
{
    if (d->pid <= 0)
        return;
    kill(d->pid, SIGKILL);
    waitpid(d->pid, NULL, 0);
    track(d->pid, 0);
    d->pid = 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Proxy: one thread accepts; each client connection gets a relay thread that polls both sides
 * with a timeout, so every thread notices the stop flag within 50 ms. */

struct proxy {
    proxy_opts o;
    int lfd;
    char addr[64];
    pthread_t acceptor;
    atomic_int stop;
    atomic_int corrupted;
    atomic_int relays;
};

typedef struct relay {
    proxy *p;
    int c, s;
} relay;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int write_all(int fd, const uint8_t *b, size_t n)
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

static void *relay_main(void *arg)
{
    relay *r = arg;
    proxy *p = r->p;
    uint8_t buf[16384];
    int64_t down = 0; /* server-to-client bytes */
    double t0 = now_s();
    while (!atomic_load(&p->stop)) {
        struct pollfd pf[2] = {{.fd = r->c, .events = POLLIN}, {.fd = r->s, .events = POLLIN}};
        if (poll(pf, 2, 50) < 0)
            break;
        if (pf[0].revents) {
            ssize_t n = recv(r->c, buf, sizeof buf, 0);
            if (n <= 0 || write_all(r->s, buf, (size_t)n))
                break;
        }
        if (pf[1].revents) {
            ssize_t n = recv(r->s, buf, sizeof buf, 0);
            if (n <= 0)
                break;
            if (p->o.corrupt_at >= 0 && down <= p->o.corrupt_at && p->o.corrupt_at < down + n) {
                int expected = 0;
                if (atomic_compare_exchange_strong(&p->corrupted, &expected, 1))
                    buf[p->o.corrupt_at - down] ^= 0x5a;
            }
            if (p->o.cut_at > 0 && down + n >= p->o.cut_at) {
                write_all(r->c, buf, (size_t)(p->o.cut_at - down));
                break;
            }
            down += n;
            if (p->o.bytes_per_s > 0) {
                double due = t0 + (double)down / p->o.bytes_per_s;
                double wait = due - now_s();
                if (wait > 0)
                    usleep((useconds_t)(wait * 1e6));
            }
            if (write_all(r->c, buf, (size_t)n))
                break;
        }
    }
    close(r->c);
    close(r->s);
    atomic_fetch_sub(&p->relays, 1);
    free(r);
    return NULL;
}

static void *acceptor_main(void *arg)
{
    proxy *p = arg;
    while (!atomic_load(&p->stop)) {
        struct pollfd pf = {.fd = p->lfd, .events = POLLIN};
        if (poll(&pf, 1, 50) <= 0)
            continue;
        int c = accept(p->lfd, NULL, NULL);
        if (c < 0)
            continue;
        int s = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = htons(p->o.upstream);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
            close(c);
            if (s >= 0)
                close(s);
            continue;
        }
        relay *r = malloc(sizeof *r);
        r->p = p;
        r->c = c;
        r->s = s;
        pthread_t th;
        atomic_fetch_add(&p->relays, 1);
        if (pthread_create(&th, NULL, relay_main, r) != 0) {
            atomic_fetch_sub(&p->relays, 1);
            close(c);
            close(s);
            free(r);
            continue;
        }
        pthread_detach(th);
    }
    return NULL;
}

proxy *proxy_start(const proxy_opts *o)
{
    proxy *p = calloc(1, sizeof *p);
    p->o = *o;
    p->lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t sl = sizeof a;
    assert_int_equal(bind(p->lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(p->lfd, 64), 0);
    assert_int_equal(getsockname(p->lfd, (struct sockaddr *)&a, &sl), 0);
    snprintf(p->addr, sizeof p->addr, "127.0.0.1:%u", ntohs(a.sin_port));
    assert_int_equal(pthread_create(&p->acceptor, NULL, acceptor_main, p), 0);
    return p;
}

const char *proxy_addr(const proxy *p)
{
    return p->addr;
}

int proxy_corrupted(const proxy *p)
{
    return atomic_load(&((proxy *)p)->corrupted);
}

void proxy_stop(proxy **pp)
{
    if (!pp || !*pp)
        return;
    proxy *p = *pp;
    atomic_store(&p->stop, 1);
    pthread_join(p->acceptor, NULL);
    for (int i = 0; i < 200 && atomic_load(&p->relays) > 0; i++)
        usleep(10000);
    close(p->lfd);
    free(p);
    *pp = NULL;
}

/* Runs argv to its end (10 s at most) and returns its exit status, its output in out. */
int harness_run(char *const argv[], char *out, size_t outlen)
{
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(pfd[1], 1);
        dup2(pfd[1], 2);
        close(pfd[0]);
        execv(argv[0], argv);
        _exit(127);
    }
    close(pfd[1]);
    size_t got = 0;
    ssize_t k;
    while (got < outlen - 1 && (k = read(pfd[0], out + got, outlen - 1 - got)) > 0)
        got += (size_t)k;
    out[got] = '\0';
    close(pfd[0]);
    int status = 0;
    for (int w = 0; w < 100 && waitpid(pid, &status, WNOHANG) == 0; w++)
        usleep(100000);
    if (!WIFEXITED(status)) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        return -1;
    }
    return WEXITSTATUS(status);
}

int harness_raw_connect(uint16_t port)
{
    int fd;
    char err[128];
    assert_int_equal(kvf__tcp_connect("127.0.0.1", port, 2000, &fd, err, sizeof err), 0);
    /* Back to blocking with a receive timeout: every read is bounded. */
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    struct timeval tv = {.tv_sec = 5, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

void harness_raw_send(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n) {
        ssize_t w = send(fd, b, n, MSG_NOSIGNAL);
        assert_true(w > 0);
        b += w;
        n -= (size_t)w;
    }
}

int harness_raw_read_full(int fd, void *p, size_t n)
{
    uint8_t *b = p;
    while (n) {
        ssize_t r = recv(fd, b, n, 0);
        if (r <= 0)
            return -1;
        b += r;
        n -= (size_t)r;
    }
    return 0;
}

int harness_raw_reply(int fd, kvf_wire_hdr *h, void *payload, size_t cap, size_t *got)
{
    uint8_t hb[KVF_WIRE_HEADER_LEN];
    assert_int_equal(harness_raw_read_full(fd, hb, sizeof hb), 0);
    kvf_wire_limits lim = {.max_request = 1ull << 40, .expect_reply = 1};
    char msg[200];
    if (kvf__wire_hdr_decode(hb, &lim, h, msg, sizeof msg) != 0)
        fail_msg("reply header: %s", msg);
    size_t n = 0;
    if (payload) {
        n = h->payload_len < cap ? (size_t)h->payload_len : cap;
        assert_int_equal(harness_raw_read_full(fd, payload, n), 0);
    }
    if (got)
        *got = n;
    return h->status;
}

kvf_client *harness_client_two(const daemon_t *a, const daemon_t *b, uint64_t ns,
                               const char *credential, const char *transport)
{
    const char *nodes[2] = {a->addr, b->addr};
    kvf_client_opts o = {.nodes = nodes,
                         .n_nodes = 2,
                         .ns = ns,
                         .deadline_ms = 5000,
                         .credential = credential,
                         .transport = transport};
    kvf_client *c = NULL;
    char err[400];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client open: %s", err);
    return c;
}

size_t harness_wait_present(const daemon_t *d, uint64_t ns, const char *credential,
                            const kvf_key *keys, size_t n, int timeout_ms)
{
    const char *nodes[1] = {d->addr};
    kvf_client_opts o = {.nodes = nodes,
                         .n_nodes = 1,
                         .ns = ns,
                         .deadline_ms = 5000,
                         .credential = credential,
                         .transport = "tcp"};
    kvf_client *c = NULL;
    char err[400];
    if (kvf_client_open(&c, &o, err, sizeof err) != 0)
        fail_msg("client open: %s", err);
    uint8_t *present = calloc(n ? n : 1, 1);
    assert_non_null(present);
    size_t there = 0;
    for (int waited = 0; there < n && waited <= timeout_ms; waited += 50) {
        usleep(50000);
        assert_int_equal(kvf_client_exists(c, n, keys, present, 2000), 0);
        there = 0;
        for (size_t i = 0; i < n; i++)
            there += present[i];
    }
    free(present);
    kvf_client_close(&c);
    return there;
}
