/*
 * TCP sockets: listening, connecting with a deadline, tuning, and scatter-gather I/O that never
 * raises SIGPIPE. The only place in kvfabric that reads errno on sockets; every failure comes back
 * as a KVF_E* code, with one line of context in err for setup calls.
 */
#ifndef KVF_TRANSPORT_TCP_H
#define KVF_TRANSPORT_TCP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* Socket buffer size asked for on data connections: large enough for a 16 MiB transfer to stream
 * without waiting on every window. */
#define KVF_TCP_SOCKBUF (8u << 20)

/* Splits "host:port" (or "[v6]:port") into host and port. Returns 0 or KVF_EINVAL. */
int kvf__addr_parse(const char *addr, char *host, size_t hostlen, uint16_t *port);

/* Whether every address host resolves to is a loopback one (127.0.0.0/8, ::1): 0 for a wildcard
 * (0.0.0.0, ::), any other address, or a name that does not resolve. */
int kvf__host_is_loopback(const char *host);
/* Whether host resolves to an address of this machine: a loopback one, or one of its
 * interfaces'. 0 for a wildcard or a name that does not resolve. */
int kvf__host_is_local(const char *host);

/* The daemons' rule (docs/security.md): a listener on an address that is not loopback is refused
 * unless the daemon authenticates what arrives there (insecure = KVF_LISTEN_AUTHENTICATED), or
 * insecure is set (1), which is warned about. what names the option ("--listen"), daemon the
 * program. Returns 0, or 2 (bad usage) after saying why on stderr. */
#define KVF_LISTEN_AUTHENTICATED 2
int kvf__listen_policy(const char *daemon, const char *what, const char *host, int insecure);
/* The same for an address "HOST:PORT" (NULL: nothing to check; one that does not parse is left to
 * the option's own parsing, which says so). */
int kvf__listen_policy_addr(const char *daemon, const char *what, const char *addr, int insecure);

/* Listens on host:port (port 0: any free port), nonblocking. *bound gets the port bound. */
int kvf__tcp_listen(const char *host, uint16_t port, int backlog, int *fd, uint16_t *bound,
                    char *err, size_t errlen);
/* Accepts one connection, tuned and nonblocking. Returns 0, KVF_EAGAIN when none is waiting (or
 * one was aborted or failed on its own), or another KVF_E* code: KVF_EMFILE at the process's or
 * the system's descriptor limit, KVF_ENOMEM when the kernel is short of memory. */
int kvf__tcp_accept(int lfd, int *fd);
/* A descriptor held in reserve (/dev/null, close-on-exec) so that a listener at the descriptor
 * limit can still take its pending connections off the backlog. Returns it, or -1. */
int kvf__fd_reserve_open(void);
/* At the descriptor limit (kvf__tcp_accept() gave KVF_EMFILE): closes *reserve, accepts one
 * pending connection and closes it at once, so that its client sees the connection closed rather
 * than waiting in the backlog, and reopens the reserve (*reserve is -1 when that failed; it is
 * tried again on the next call). Returns 0 when a connection was shed, KVF_EAGAIN when none was
 * pending, or the error (KVF_EMFILE when even the reserve's slot was not enough). */
int kvf__tcp_accept_shed(int lfd, int *reserve);
/* Connects to host:port within timeout_ms; the socket comes back tuned and nonblocking. */
int kvf__tcp_connect(const char *host, uint16_t port, int timeout_ms, int *fd, char *err,
                     size_t errlen);
/* TCP_NODELAY, KVF_TCP_SOCKBUF buffers, nonblocking, close-on-exec, no SIGPIPE. */
int kvf__tcp_tune(int fd);

/* Writes as much of iov as the socket takes now, in calls of at most 64 vectors. *done gets
 * the bytes written. Returns 0 (all or part written), KVF_EAGAIN when nothing could be written,
 * or the error (KVF_EPIPE, KVF_ECONNRESET ...). */
int kvf__sock_writev(int fd, const struct iovec *iov, int iovcnt, size_t *done);
/* As kvf__sock_writev(), writing max bytes at most: an event loop that serves many connections
 * bounds what one of them takes of its turn. */
int kvf__sock_writev_max(int fd, const struct iovec *iov, int iovcnt, size_t max, size_t *done);
/* Reads up to len bytes. *got gets the count; 0 with return 0 means the peer closed. Returns 0,
 * KVF_EAGAIN, or the error. */
int kvf__sock_read(int fd, void *buf, size_t len, size_t *got);

/* Receive low-water mark: while a large payload arrives, the socket reports readable once a large
 * piece of it is there rather than per segment (fewer wake-ups and reads). The state of one
 * socket; kvf__sock_lowat_init() when it is opened. */
typedef struct kvf_lowat {
    int cur; /* SO_RCVLOWAT now set (1: the default) */
    int cap; /* the most ever asked: a quarter of the receive buffer, 256 KiB at most; 0: off */
} kvf_lowat;
void kvf__sock_lowat_init(int fd, kvf_lowat *lw);
/* Before waiting on fd: owed is what the peer still owes of the step being read (a payload's
 * rest). Asks for min(owed, cap) when owed is at least 64 KiB, else 1. Never more than owed, so
 * the wait always ends; the end of the stream and errors wake it regardless. */
void kvf__sock_lowat(int fd, kvf_lowat *lw, uint64_t owed);

/* Advances an iovec array past n bytes; returns the new first index and adjusts that entry. */
int kvf__iov_advance(struct iovec *iov, int iovcnt, int first, size_t n);

#endif
