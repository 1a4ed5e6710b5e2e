#include "tcp.h"

#include "kvf/error.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif
#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set on the socket instead */
#endif

static int errmsg(char *err, size_t errlen, int code, const char *what, const char *host,
                  uint16_t port, const char *why)
{
    if (err && errlen)
        snprintf(err, errlen, "%s %s:%u: %s", what, host, port, why);
    return code;
}

int kvf__addr_parse(const char *addr, char *host, size_t hostlen, uint16_t *port)
{
    if (!addr)
        return KVF_EINVAL;
    const char *colon;
    const char *h = addr;
    size_t hl;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':')
            return KVF_EINVAL;
        h = addr + 1;
        hl = (size_t)(end - h);
        colon = end + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon)
            return KVF_EINVAL;
        hl = (size_t)(colon - addr);
    }
    if (hl == 0 || hl >= hostlen)
        return KVF_EINVAL;
    char *endp;
    errno = 0;
    unsigned long p = strtoul(colon + 1, &endp, 10);
    if (errno || *endp || endp == colon + 1 || p > 65535)
        return KVF_EINVAL;
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (uint16_t)p;
    return 0;
}

static int set_nonblock_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return kvf_err_from_errno(errno);
    int fdfl = fcntl(fd, F_GETFD);
    if (fdfl < 0 || fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) < 0)
        return kvf_err_from_errno(errno);
    return 0;
}

int kvf__tcp_tune(int fd)
{
    int one = 1;
    int buf = (int)KVF_TCP_SOCKBUF;
    /* Buffer sizes are requests the kernel may clamp (net.core.*mem_max): not an error. */
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
#ifdef SO_NOSIGPIPE
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        return kvf_err_from_errno(errno);
    return set_nonblock_cloexec(fd);
}

int kvf__host_is_loopback(const char *host)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    if (!host || !host[0] || getaddrinfo(host, NULL, &hints, &res) != 0 || !res)
        return 0;
    int loop = 1;
    for (struct addrinfo *a = res; a && loop; a = a->ai_next) {
        if (a->ai_family == AF_INET) {
            uint32_t v4 =
                ntohl(((const struct sockaddr_in *)(const void *)a->ai_addr)->sin_addr.s_addr);
            loop = (v4 >> 24) == 127;
        } else if (a->ai_family == AF_INET6) {
            loop = IN6_IS_ADDR_LOOPBACK(
                &((const struct sockaddr_in6 *)(const void *)a->ai_addr)->sin6_addr);
        } else {
            loop = 0;
        }
    }
    freeaddrinfo(res);
    return loop;
}

int kvf__host_is_local(const char *host)
{
    if (kvf__host_is_loopback(host))
        return 1;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    if (!host || !host[0] || getaddrinfo(host, NULL, &hints, &res) != 0 || !res)
        return 0;
    struct ifaddrs *ifs = NULL;
    int local = 0;
    if (getifaddrs(&ifs) == 0) {
        for (struct addrinfo *a = res; a && !local; a = a->ai_next) {
            for (struct ifaddrs *i = ifs; i && !local; i = i->ifa_next) {
                if (!i->ifa_addr || i->ifa_addr->sa_family != a->ai_family)
                    continue;
                if (a->ai_family == AF_INET)
                    local =
                        !memcmp(&((const struct sockaddr_in *)(const void *)a->ai_addr)->sin_addr,
                                &((const struct sockaddr_in *)(const void *)i->ifa_addr)->sin_addr,
                                sizeof(struct in_addr));
                else if (a->ai_family == AF_INET6)
                    local = !memcmp(
                        &((const struct sockaddr_in6 *)(const void *)a->ai_addr)->sin6_addr,
                        &((const struct sockaddr_in6 *)(const void *)i->ifa_addr)->sin6_addr,
                        sizeof(struct in6_addr));
            }
        }
        freeifaddrs(ifs);
    }
    freeaddrinfo(res);
    return local;
}

int kvf__listen_policy(const char *daemon, const char *what, const char *host, int insecure)
{
    if (kvf__host_is_loopback(host) || insecure == KVF_LISTEN_AUTHENTICATED)
        return 0;
    if (!insecure) {
        fprintf(stderr,
                "%s: refusing %s on %s without credentials: anyone who can reach that address "
                "could read, overwrite or clear every tenant's KV (docs/security.md). Configure "
                "credentials where the daemon has them (kvf-store --auth, kvf-sched --tokens), "
                "listen on loopback, or add --insecure where the network is private and every "
                "host on it is trusted.\n",
                daemon, what, host);
        return 2;
    }
    fprintf(stderr,
            "%s: warning: %s on %s with --insecure: every client that reaches it is trusted "
            "(docs/security.md)\n",
            daemon, what, host);
    return 0;
}

int kvf__listen_policy_addr(const char *daemon, const char *what, const char *addr, int insecure)
{
    char host[256];
    uint16_t port;
    if (!addr || kvf__addr_parse(addr, host, sizeof host, &port) != 0)
        return 0;
    return kvf__listen_policy(daemon, what, host, insecure);
}

static int resolve(const char *host, uint16_t port, int passive, struct addrinfo **res)
{
    struct addrinfo hints;
    char ps[8];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = passive ? AI_PASSIVE : 0;
    snprintf(ps, sizeof ps, "%u", port);
    return getaddrinfo(host, ps, &hints, res);
}

int kvf__tcp_listen(const char *host, uint16_t port, int backlog, int *fd, uint16_t *bound,
                    char *err, size_t errlen)
{
    struct addrinfo *res;
    int gai = resolve(host, port, 1, &res);
    if (gai)
        return errmsg(err, errlen, KVF_EADDRNOTAVAIL, "resolve", host, port, gai_strerror(gai));
    int rc = KVF_EADDRNOTAVAIL;
    int s = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        s = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (s < 0) {
            rc = errmsg(err, errlen, kvf_err_from_errno(errno), "socket", host, port,
                        strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(s, ai->ai_addr, ai->ai_addrlen) < 0 || listen(s, backlog) < 0) {
            rc = errmsg(err, errlen, kvf_err_from_errno(errno), "listen", host, port,
                        strerror(errno));
            close(s);
            s = -1;
            continue;
        }
        rc = set_nonblock_cloexec(s);
        if (rc) {
            close(s);
            s = -1;
            continue;
        }
        break;
    }
    freeaddrinfo(res);
    if (s < 0)
        return rc;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(s, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET)
            *bound = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        else if (ss.ss_family == AF_INET6)
            *bound = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    }
    *fd = s;
    return 0;
}

/* Whether accept() failed for this one connection or for nothing at all: the listener is fine and
 * the next accept may succeed. Linux also reports a pending connection's network error here. */
static int accept_benign(int e)
{
    switch (e) {
    case EAGAIN:
#if defined(EWOULDBLOCK) && EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case EINTR:
    case ECONNABORTED:
    case EPROTO:
    case ENETDOWN:
    case ENETUNREACH:
    case EHOSTDOWN:
    case EHOSTUNREACH:
#ifdef ENONET
    case ENONET:
#endif
        return 1;
    default:
        return 0;
    }
}

int kvf__tcp_accept(int lfd, int *fd)
{
    int s = accept(lfd, NULL, NULL);
    if (s < 0) {
        if (accept_benign(errno))
            return KVF_EAGAIN;
        return kvf_err_from_errno(errno);
    }
    int rc = kvf__tcp_tune(s);
    if (rc) {
        close(s);
        return rc;
    }
    *fd = s;
    return 0;
}

int kvf__fd_reserve_open(void)
{
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    return fd >= 0 ? fd : -1;
}

int kvf__tcp_accept_shed(int lfd, int *reserve)
{
    if (*reserve >= 0) {
        close(*reserve);
        *reserve = -1;
    }
    int s = accept(lfd, NULL, NULL);
    int e = errno;
    if (s >= 0)
        close(s);
    *reserve = kvf__fd_reserve_open();
    if (s >= 0)
        return 0;
    if (accept_benign(e))
        return KVF_EAGAIN;
    return kvf_err_from_errno(e);
}

int kvf__tcp_connect(const char *host, uint16_t port, int timeout_ms, int *fd, char *err,
                     size_t errlen)
{
    struct addrinfo *res;
    int gai = resolve(host, port, 0, &res);
    if (gai)
        return errmsg(err, errlen, KVF_EHOSTUNREACH, "resolve", host, port, gai_strerror(gai));
    int rc = KVF_ECONNREFUSED;
    int s = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        s = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (s < 0) {
            rc = errmsg(err, errlen, kvf_err_from_errno(errno), "socket", host, port,
                        strerror(errno));
            continue;
        }
        rc = kvf__tcp_tune(s);
        if (rc) {
            close(s);
            s = -1;
            continue;
        }
        if (connect(s, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        if (errno != EINPROGRESS) {
            rc = errmsg(err, errlen, kvf_err_from_errno(errno), "connect", host, port,
                        strerror(errno));
            close(s);
            s = -1;
            continue;
        }
        struct pollfd pfd = {.fd = s, .events = POLLOUT, .revents = 0};
        int pr;
        do {
            pr = poll(&pfd, 1, timeout_ms);
        } while (pr < 0 && errno == EINTR);
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        if (pr == 0) {
            rc = errmsg(err, errlen, KVF_ETIMEDOUT, "connect", host, port, "timed out");
        } else if (pr < 0 || getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0) {
            rc = errmsg(err, errlen, kvf_err_from_errno(errno), "connect", host, port,
                        strerror(errno));
        } else if (soerr) {
            rc = errmsg(err, errlen, kvf_err_from_errno(soerr), "connect", host, port,
                        strerror(soerr));
        } else {
            break;
        }
        close(s);
        s = -1;
    }
    freeaddrinfo(res);
    if (s < 0)
        return rc;
    *fd = s;
    return 0;
}

int kvf__sock_writev_max(int fd, const struct iovec *iov, int iovcnt, size_t max, size_t *done)
{
    struct iovec part[64];
    size_t total = 0;
    *done = 0;
    while (iovcnt > 0 && total < max) {
        /* The next vectors, the last cut to what the budget leaves. */
        int n = 0;
        size_t want = 0;
        while (n < iovcnt && n < (int)(sizeof part / sizeof part[0]) && want < max - total) {
            part[n] = iov[n];
            if (part[n].iov_len > max - total - want)
                part[n].iov_len = max - total - want;
            want += part[n].iov_len;
            n++;
        }
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = part;
        mh.msg_iovlen = (size_t)n;
        ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return total ? 0 : KVF_EAGAIN;
            return kvf_err_from_errno(errno);
        }
        total += (size_t)w;
        *done = total;
        if ((size_t)w < want || part[n - 1].iov_len < iov[n - 1].iov_len)
            return 0; /* the socket is full, or the budget cut the last vector */
        iov += n;
        iovcnt -= n;
    }
    return 0;
}

int kvf__sock_writev(int fd, const struct iovec *iov, int iovcnt, size_t *done)
{
    return kvf__sock_writev_max(fd, iov, iovcnt, SIZE_MAX, done);
}

int kvf__sock_read(int fd, void *buf, size_t len, size_t *got)
{
    *got = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, len, 0);
        if (r >= 0) {
            *got = (size_t)r;
            return 0;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return KVF_EAGAIN;
        return kvf_err_from_errno(errno);
    }
}

#define LOWAT_MAX (256u << 10)
#define LOWAT_MIN (64u << 10)

void kvf__sock_lowat_init(int fd, kvf_lowat *lw)
{
    lw->cur = 1;
    lw->cap = 0;
#ifdef SO_RCVLOWAT
    /* A mark near the receive buffer's size could wait on bytes the window never lets the peer
     * send: a quarter of it at most (the kernel clamps buffers to net.core.rmem_max). */
    int rcv = 0;
    socklen_t l = sizeof rcv;
    if (getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, &l) == 0 && rcv / 4 >= (int)LOWAT_MIN)
        lw->cap = rcv / 4 < (int)LOWAT_MAX ? rcv / 4 : (int)LOWAT_MAX;
#else
    (void)fd;
#endif
}

void kvf__sock_lowat(int fd, kvf_lowat *lw, uint64_t owed)
{
#ifdef SO_RCVLOWAT
    int want = 1;
    if (lw->cap && owed >= LOWAT_MIN)
        want = owed < (uint64_t)lw->cap ? (int)owed : lw->cap;
    if (want != lw->cur && setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &want, sizeof want) == 0)
        lw->cur = want;
#else
    (void)fd, (void)lw, (void)owed;
#endif
}

int kvf__iov_advance(struct iovec *iov, int iovcnt, int first, size_t n)
{
    while (first < iovcnt && n) {
        if (n >= iov[first].iov_len) {
            n -= iov[first].iov_len;
            iov[first].iov_len = 0;
            first++;
        } else {
            iov[first].iov_base = (char *)iov[first].iov_base + n;
            iov[first].iov_len -= n;
            n = 0;
        }
    }
    while (first < iovcnt && iov[first].iov_len == 0)
        first++;
    return first;
}
