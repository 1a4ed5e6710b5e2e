/*
 * Unix stream sockets (unixsock.h).
 */
#define _GNU_SOURCE
#include "unixsock.h"
#include "tcp.h"

#include "kvf/error.h"

#include "clock.h"

#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* Fills sa from name; *len gets the address length. KVF_EINVAL for an empty or long name. */
static int addr_of(const char *name, struct sockaddr_un *sa, socklen_t *len)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > KVF_UNIX_PATH_MAX || (name[0] == '@' && n < 2))
        return KVF_EINVAL;
    memset(sa, 0, sizeof *sa);
    sa->sun_family = AF_UNIX;
    memcpy(sa->sun_path, name, n);
    if (name[0] == '@') {
        sa->sun_path[0] = '\0'; /* abstract: the name is the bytes after the NUL, unterminated */
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    } else {
        *len = (socklen_t)sizeof *sa;
    }
    return 0;
}

static int fail(char *err, size_t errlen, int rc, const char *what, const char *name,
                const char *why)
{
    if (err && errlen)
        snprintf(err, errlen, "%s %s: %s", what, name ? name : "(none)", why);
    return rc;
}

/* A path where a socket of a process that is gone was left: connecting is refused. */
static int stale_socket(const char *path, const struct sockaddr_un *sa, socklen_t len)
{
    struct stat st;
    if (lstat(path, &st) != 0 || !S_ISSOCK(st.st_mode))
        return 0;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return 0;
    int stale = connect(s, (const struct sockaddr *)sa, len) != 0 && errno == ECONNREFUSED;
    close(s);
    return stale;
}

int kvf__unix_listen(const char *name, int backlog, int *fd, char *err, size_t errlen)
{
    struct sockaddr_un sa;
    socklen_t len;
    if (addr_of(name, &sa, &len) != 0)
        return fail(err, errlen, KVF_EINVAL, "listen", name,
                    "a socket name is a path or @name of 1 to 107 bytes");
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0)
        return fail(err, errlen, kvf_err_from_errno(errno), "socket", name, strerror(errno));
    int b = bind(s, (const struct sockaddr *)&sa, len);
    if (b != 0 && errno == EADDRINUSE && name[0] != '@' && stale_socket(name, &sa, len)) {
        unlink(name);
        b = bind(s, (const struct sockaddr *)&sa, len);
    }
    if (b != 0) {
        int e = errno;
        close(s);
        return fail(err, errlen, kvf_err_from_errno(e), "bind", name,
                    e == EADDRINUSE ? "in use by a live listener (or not a socket)" : strerror(e));
    }
    if (listen(s, backlog) != 0) {
        int e = errno;
        close(s);
        return fail(err, errlen, kvf_err_from_errno(e), "listen", name, strerror(e));
    }
    *fd = s;
    return 0;
}

int kvf__unix_accept(int lfd, int *fd)
{
    int s = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (s >= 0) {
        *fd = s;
        return 0;
    }
    switch (errno) {
    case EAGAIN:
#if EWOULDBLOCK != EAGAIN
    case EWOULDBLOCK:
#endif
    case EINTR:
    case ECONNABORTED:
    case EPROTO:
        return KVF_EAGAIN;
    default:
        return kvf_err_from_errno(errno);
    }
}

static int connect_with(const char *name, int flags, int *fd, char *err, size_t errlen)
{
    struct sockaddr_un sa;
    socklen_t len;
    if (addr_of(name, &sa, &len) != 0)
        return fail(err, errlen, KVF_EINVAL, "connect", name,
                    "a socket name is a path or @name of 1 to 107 bytes");
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
    if (s < 0)
        return fail(err, errlen, kvf_err_from_errno(errno), "socket", name, strerror(errno));
    /* A Unix socket connects at once or not at all: EAGAIN (nonblocking) is a full backlog, not
     * a connection in progress, and fails like any other error (the caller retries or falls
     * back to TCP). */
    if (connect(s, (const struct sockaddr *)&sa, len) != 0 && !(flags && errno == EINPROGRESS)) {
        int e = errno;
        close(s);
        return fail(err, errlen, kvf_err_from_errno(e), "connect", name, strerror(e));
    }
    /* As a TCP connection's: a request of tens of MiB (a put's objects, a put in parts' WRITE)
     * would otherwise cross in the default ~200 KiB, the reader woken for each. A request the
     * kernel may clamp (net.core.wmem_max): not an error. */
    int buf = (int)KVF_TCP_SOCKBUF;
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    *fd = s;
    return 0;
}

int kvf__unix_connect(const char *name, int *fd, char *err, size_t errlen)
{
    return connect_with(name, 0, fd, err, errlen);
}

int kvf__unix_connect_nb(const char *name, int *fd, char *err, size_t errlen)
{
    return connect_with(name, SOCK_NONBLOCK, fd, err, errlen);
}

void kvf__unix_unlink(const char *name)
{
    if (name && name[0] && name[0] != '@')
        unlink(name);
}

int kvf__unix_send_fds(int fd, const void *buf, size_t len, const int *fds, int n)
{
    if (n < 0 || n > KVF_UNIX_MAX_FDS || len == 0)
        return KVF_EINVAL;
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof(int) * KVF_UNIX_MAX_FDS)];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
    if (n) {
        m.msg_control = ctl.b;
        m.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)n);
        struct cmsghdr *c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)n);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)n);
    }
    ssize_t w;
    do {
        w = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (w < 0 && errno == EINTR);
    if (w < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? KVF_EAGAIN : kvf_err_from_errno(errno);
    /* A short write of a few dozen bytes to a socket whose buffer took none of the others: the
     * caller treats it as a broken connection, since the rest cannot follow with the descriptors.
     */
    return (size_t)w == len ? 0 : KVF_EIO;
}

int kvf__unix_recv_fds(int fd, void *buf, size_t len, size_t *got, int *fds, int *n_fds)
{
    union {
        struct cmsghdr h;
        char b[CMSG_SPACE(sizeof(int) * KVF_UNIX_MAX_FDS)];
    } ctl;
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr m = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.b, .msg_controllen = sizeof ctl.b};
    int cap = *n_fds;
    *n_fds = 0;
    ssize_t r;
    do {
        r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? KVF_EAGAIN : kvf_err_from_errno(errno);
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int d;
            memcpy(&d, CMSG_DATA(c) + i * sizeof(int), sizeof d);
            if (*n_fds < cap)
                fds[(*n_fds)++] = d;
            else
                close(d);
        }
    }
    *got = (size_t)r;
    /* Descriptors cut short (MSG_CTRUNC) were closed by the kernel; the caller sees fewer. */
    return 0;
}

/* Waits until fd is ready for events or the deadline passes. 0, KVF_ETIMEDOUT or the error. */
static int wait_fd(int fd, short events, uint64_t deadline_ns)
{
    for (;;) {
        uint64_t t = kvf__now_ns();
        if (t >= deadline_ns)
            return KVF_ETIMEDOUT;
        uint64_t ms = (deadline_ns - t + 999999u) / 1000000u;
        struct pollfd p = {.fd = fd, .events = events, .revents = 0};
        int r = poll(&p, 1, ms > 60000 ? 60000 : (int)ms);
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return kvf_err_from_errno(errno);
    }
}

int kvf__sock_write_all(int fd, const void *buf, size_t len, uint64_t deadline_ns)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w;
            len -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return kvf_err_from_errno(errno);
        int rc = wait_fd(fd, POLLOUT, deadline_ns);
        if (rc)
            return rc;
    }
    return 0;
}

int kvf__sock_read_all(int fd, void *buf, size_t len, int *fds, int *n_fds, uint64_t deadline_ns)
{
    uint8_t *p = buf;
    int room = n_fds ? *n_fds : 0, got_fds = 0, rc = 0;
    while (len && !rc) {
        size_t got = 0;
        int n = room - got_fds;
        rc = kvf__unix_recv_fds(fd, p, len, &got, fds ? fds + got_fds : NULL, &n);
        if (rc == 0 && got == 0) {
            rc = KVF_ECONNRESET;
        } else if (rc == 0) {
            got_fds += n;
            p += got;
            len -= got;
        } else if (rc == KVF_EAGAIN) {
            rc = wait_fd(fd, POLLIN, deadline_ns);
        }
    }
    /* Descriptors that came before a failure are the caller's too (to close). */
    if (n_fds)
        *n_fds = got_fds;
    return rc;
}

int kvf__unix_peer(int fd, pid_t *pid, uid_t *uid)
{
    struct ucred cr;
    socklen_t l = sizeof cr;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &l) != 0)
        return KVF_ENOTSUP;
    *pid = cr.pid;
    *uid = cr.uid;
    return 0;
}

int kvf__boot_id(uint8_t id[16])
{
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");
    if (!f)
        return KVF_ENOTSUP;
    char s[64] = "";
    int ok = fgets(s, sizeof s, f) != NULL;
    fclose(f);
    if (!ok)
        return KVF_ENOTSUP;
    int k = 0;
    for (const char *p = s; *p && k < 32; p++) {
        int v = *p >= '0' && *p <= '9'   ? *p - '0'
                : *p >= 'a' && *p <= 'f' ? *p - 'a' + 10
                : *p >= 'A' && *p <= 'F' ? *p - 'A' + 10
                                         : -1;
        if (v < 0)
            continue;
        if (k % 2 == 0)
            id[k / 2] = (uint8_t)(v << 4);
        else
            id[k / 2] |= (uint8_t)v;
        k++;
    }
    return k == 32 ? 0 : KVF_ENOTSUP;
}
