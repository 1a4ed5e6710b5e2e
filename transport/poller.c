/*
 * Poller back-ends. Each is a const ops table; kvf__poller_open() picks one.
 */
#include "poller.h"

#include "kvf/error.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__linux__)
#include <sys/epoll.h>
#define KVF_HAVE_EPOLL 1
#endif
#if defined(__APPLE__) || defined(__FreeBSD__) || defined(__NetBSD__) || defined(__OpenBSD__)
#include <sys/event.h>
#define KVF_HAVE_KQUEUE 1
#endif

typedef struct poller_ops {
    const char *name;
    int (*open)(kvf_poller *p);
    void (*close)(kvf_poller *p);
    int (*ctl)(kvf_poller *p, int op, int fd, uint32_t events, void *ud);
    int (*wait)(kvf_poller *p, kvf_poll_event *evs, int max, int timeout_ms);
} poller_ops;

enum { CTL_ADD, CTL_MOD, CTL_DEL };

struct kvf_poller {
    const poller_ops *ops;
    int fd; /* epoll or kqueue descriptor */
    /* poll back-end: pollfd array, parallel user data, and an fd -> slot map */
    struct pollfd *pfds;
    void **uds;
    int n, cap;
    int *slot_of_fd;
    int map_cap;
};

/* ------------------------------------------------------------------------------------------ */
#ifdef KVF_HAVE_EPOLL
static int epoll_open_(kvf_poller *p)
{
    p->fd = epoll_create1(EPOLL_CLOEXEC);
    return p->fd < 0 ? kvf_err_from_errno(errno) : 0;
}

static void epoll_close_(kvf_poller *p)
{
    if (p->fd >= 0)
        close(p->fd);
}

static int epoll_ctl_(kvf_poller *p, int op, int fd, uint32_t events, void *ud)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = ((events & KVF_POLL_IN) ? EPOLLIN : 0) | ((events & KVF_POLL_OUT) ? EPOLLOUT : 0);
    ev.data.ptr = ud;
    int eop = op == CTL_ADD ? EPOLL_CTL_ADD : op == CTL_MOD ? EPOLL_CTL_MOD : EPOLL_CTL_DEL;
    return epoll_ctl(p->fd, eop, fd, &ev) < 0 ? kvf_err_from_errno(errno) : 0;
}

static int epoll_wait_(kvf_poller *p, kvf_poll_event *evs, int max, int timeout_ms)
{
    struct epoll_event raw[64];
    if (max > 64)
        max = 64;
    int n = epoll_wait(p->fd, raw, max, timeout_ms);
    if (n < 0)
        return errno == EINTR ? 0 : kvf_err_from_errno(errno);
    for (int i = 0; i < n; i++) {
        uint32_t e = raw[i].events;
        evs[i].ud = raw[i].data.ptr;
        evs[i].events = ((e & EPOLLIN) ? KVF_POLL_IN : 0) | ((e & EPOLLOUT) ? KVF_POLL_OUT : 0) |
                        ((e & (EPOLLERR | EPOLLHUP)) ? KVF_POLL_ERR : 0);
    }
    return n;
}

static const poller_ops epoll_ops = {
    .name = "epoll",
    .open = epoll_open_,
    .close = epoll_close_,
    .ctl = epoll_ctl_,
    .wait = epoll_wait_,
};
#endif

/* ------------------------------------------------------------------------------------------ */
#ifdef KVF_HAVE_KQUEUE
static int kq_open(kvf_poller *p)
{
    p->fd = kqueue();
    return p->fd < 0 ? kvf_err_from_errno(errno) : 0;
}

static void kq_close(kvf_poller *p)
{
    if (p->fd >= 0)
        close(p->fd);
}

static int kq_ctl(kvf_poller *p, int op, int fd, uint32_t events, void *ud)
{
    struct kevent ch[2];
    int want_in = op != CTL_DEL && (events & KVF_POLL_IN);
    int want_out = op != CTL_DEL && (events & KVF_POLL_OUT);
    EV_SET(&ch[0], fd, EVFILT_READ, want_in ? EV_ADD | EV_ENABLE : EV_DELETE, 0, 0, ud);
    EV_SET(&ch[1], fd, EVFILT_WRITE, want_out ? EV_ADD | EV_ENABLE : EV_DELETE, 0, 0, ud);
    for (int i = 0; i < 2; i++) {
        /* Deleting a filter that was never added fails with ENOENT: that is the wanted state. */
        if (kevent(p->fd, &ch[i], 1, NULL, 0, NULL) < 0 && errno != ENOENT)
            return kvf_err_from_errno(errno);
    }
    return 0;
}

static int kq_wait(kvf_poller *p, kvf_poll_event *evs, int max, int timeout_ms)
{
    struct kevent raw[64];
    struct timespec ts, *tsp = NULL;
    if (max > 64)
        max = 64;
    if (timeout_ms >= 0) {
        ts.tv_sec = timeout_ms / 1000;
        ts.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
        tsp = &ts;
    }
    int n = kevent(p->fd, NULL, 0, raw, max, tsp);
    if (n < 0)
        return errno == EINTR ? 0 : kvf_err_from_errno(errno);
    for (int i = 0; i < n; i++) {
        evs[i].ud = raw[i].udata;
        evs[i].events = (raw[i].filter == EVFILT_READ ? KVF_POLL_IN : KVF_POLL_OUT) |
                        ((raw[i].flags & (EV_EOF | EV_ERROR)) ? KVF_POLL_ERR : 0);
    }
    return n;
}

static const poller_ops kqueue_ops = {
    .name = "kqueue",
    .open = kq_open,
    .close = kq_close,
    .ctl = kq_ctl,
    .wait = kq_wait,
};
#endif

/* ------------------------------------------------------------------------------------------ */
static int poll_open_(kvf_poller *p)
{
    (void)p;
    return 0;
}

static void poll_close_(kvf_poller *p)
{
    free(p->pfds);
    free(p->uds);
    free(p->slot_of_fd);
}

static int poll_ctl_(kvf_poller *p, int op, int fd, uint32_t events, void *ud)
{
    if (fd < 0)
        return KVF_EINVAL;
    if (fd >= p->map_cap) {
        int nc = p->map_cap ? p->map_cap : 64;
        while (nc <= fd)
            nc *= 2;
        int *m = realloc(p->slot_of_fd, (size_t)nc * sizeof *m);
        if (!m)
            return KVF_ENOMEM;
        for (int i = p->map_cap; i < nc; i++)
            m[i] = -1;
        p->slot_of_fd = m;
        p->map_cap = nc;
    }
    int slot = p->slot_of_fd[fd];
    short pev =
        (short)(((events & KVF_POLL_IN) ? POLLIN : 0) | ((events & KVF_POLL_OUT) ? POLLOUT : 0));
    if (op == CTL_ADD) {
        if (slot >= 0)
            return KVF_EEXIST;
        if (p->n == p->cap) {
            int nc = p->cap ? 2 * p->cap : 16;
            struct pollfd *np = realloc(p->pfds, (size_t)nc * sizeof *np);
            if (!np)
                return KVF_ENOMEM;
            p->pfds = np;
            void **nu = realloc(p->uds, (size_t)nc * sizeof *nu);
            if (!nu)
                return KVF_ENOMEM;
            p->uds = nu;
            p->cap = nc;
        }
        p->pfds[p->n] = (struct pollfd){.fd = fd, .events = pev, .revents = 0};
        p->uds[p->n] = ud;
        p->slot_of_fd[fd] = p->n++;
        return 0;
    }
    if (slot < 0)
        return KVF_ENOENT;
    if (op == CTL_MOD) {
        p->pfds[slot].events = pev;
        p->uds[slot] = ud;
        return 0;
    }
    int last = --p->n;
    if (slot != last) {
        p->pfds[slot] = p->pfds[last];
        p->uds[slot] = p->uds[last];
        p->slot_of_fd[p->pfds[slot].fd] = slot;
    }
    p->slot_of_fd[fd] = -1;
    return 0;
}

static int poll_wait_(kvf_poller *p, kvf_poll_event *evs, int max, int timeout_ms)
{
    int r = poll(p->pfds, (nfds_t)p->n, timeout_ms);
    if (r < 0)
        return errno == EINTR ? 0 : kvf_err_from_errno(errno);
    int k = 0;
    for (int i = 0; i < p->n && k < max && r > 0; i++) {
        short re = p->pfds[i].revents;
        if (!re)
            continue;
        r--;
        evs[k].ud = p->uds[i];
        evs[k].events = ((re & POLLIN) ? KVF_POLL_IN : 0) | ((re & POLLOUT) ? KVF_POLL_OUT : 0) |
                        ((re & (POLLERR | POLLHUP | POLLNVAL)) ? KVF_POLL_ERR : 0);
        k++;
    }
    return k;
}

static const poller_ops poll_ops = {
    .name = "poll",
    .open = poll_open_,
    .close = poll_close_,
    .ctl = poll_ctl_,
    .wait = poll_wait_,
};

/* ------------------------------------------------------------------------------------------ */
static const poller_ops *const backends[] = {
#ifdef KVF_HAVE_EPOLL
    &epoll_ops,
#endif
#ifdef KVF_HAVE_KQUEUE
    &kqueue_ops,
#endif
    &poll_ops,
};

int kvf__poller_open(kvf_poller **out, const char *backend)
{
    *out = NULL;
    const poller_ops *ops = NULL;
    for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++) {
        if (!backend || strcmp(backend, backends[i]->name) == 0) {
            ops = backends[i];
            break;
        }
    }
    if (!ops)
        return KVF_ENOTSUP;
    kvf_poller *p = calloc(1, sizeof *p);
    if (!p)
        return KVF_ENOMEM;
    p->ops = ops;
    p->fd = -1;
    int rc = ops->open(p);
    if (rc) {
        free(p);
        return rc;
    }
    *out = p;
    return 0;
}

void kvf__poller_close(kvf_poller **pp)
{
    if (!pp || !*pp)
        return;
    (*pp)->ops->close(*pp);
    free(*pp);
    *pp = NULL;
}

const char *kvf__poller_name(const kvf_poller *p)
{
    return p->ops->name;
}

int kvf__poller_add(kvf_poller *p, int fd, uint32_t events, void *ud)
{
    return p->ops->ctl(p, CTL_ADD, fd, events, ud);
}

int kvf__poller_mod(kvf_poller *p, int fd, uint32_t events, void *ud)
{
    return p->ops->ctl(p, CTL_MOD, fd, events, ud);
}

int kvf__poller_del(kvf_poller *p, int fd)
{
    return p->ops->ctl(p, CTL_DEL, fd, 0, NULL);
}

int kvf__poller_wait(kvf_poller *p, kvf_poll_event *evs, int max, int timeout_ms)
{
    return p->ops->wait(p, evs, max, timeout_ms);
}
