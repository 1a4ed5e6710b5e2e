/*
 * Unix stream sockets, for clients on the storage node's own host (docs/shm.md): listening on a
 * path or an abstract name ("@name", Linux), connecting with a deadline, passing descriptors with
 * SCM_RIGHTS, the peer's credentials, and this host's boot id (what says that two processes share
 * a kernel, and so memory). Like tcp.h, the only place that reads errno for these calls.
 */
#ifndef KVF_TRANSPORT_UNIXSOCK_H
#define KVF_TRANSPORT_UNIXSOCK_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Longest socket name, the NUL excluded (sun_path's size, less one). */
#define KVF_UNIX_PATH_MAX 107u
/* Most descriptors one message carries. */
#define KVF_UNIX_MAX_FDS 4

/* Listens on name, nonblocking and close-on-exec: a path (a stale socket file left by a process
 * that died is replaced; any other file there is an error), or "@name" for Linux's abstract
 * namespace (no file; reachable from this network namespace only). 0 or a KVF_E* code with the
 * reason in err. */
int kvf__unix_listen(const char *name, int backlog, int *fd, char *err, size_t errlen);
/* Accepts one connection, nonblocking and close-on-exec. 0, KVF_EAGAIN when none is waiting, or
 * the error (KVF_EMFILE at the descriptor limit). */
int kvf__unix_accept(int lfd, int *fd);
/* Connects to name (as for listen), blocking, close-on-exec, with send and receive bounded by
 * nothing (the caller polls). 0 or a KVF_E* code with the reason in err. */
int kvf__unix_connect(const char *name, int *fd, char *err, size_t errlen);
/* The same, leaving the socket nonblocking: 0 once connected; a full listen backlog is an error
 * (KVF_EAGAIN), as Unix sockets never connect in the background. */
int kvf__unix_connect_nb(const char *name, int *fd, char *err, size_t errlen);
/* Removes the socket file of a path listener (nothing for an abstract name). */
void kvf__unix_unlink(const char *name);

/* Sends all len bytes of buf with the n descriptors fds attached to the first byte (a
 * nonblocking socket that cannot take it all at once: KVF_EAGAIN, nothing sent). */
int kvf__unix_send_fds(int fd, const void *buf, size_t len, const int *fds, int n);
/* Receives up to len bytes; descriptors that come with them are stored into fds (at most
 * *n_fds, close-on-exec; any beyond are closed) and *n_fds says how many. 0 with *got (0: the
 * peer closed), or a KVF_E* code. */
int kvf__unix_recv_fds(int fd, void *buf, size_t len, size_t *got, int *fds, int *n_fds);

/* Blocking exchanges on a socket (either blocking or not), bounded by a deadline on the monotonic
 * clock (kvf__now_ns). Writes all of buf: 0, KVF_ETIMEDOUT, or the error. */
int kvf__sock_write_all(int fd, const void *buf, size_t len, uint64_t deadline_ns);
/* Reads exactly len bytes; descriptors that arrive with them go to fds (*n_fds in: room, out:
 * how many, also on failure: the caller closes them; both may be NULL). 0, KVF_ECONNRESET when
 * the peer closed first, KVF_ETIMEDOUT, or the error. */
int kvf__sock_read_all(int fd, void *buf, size_t len, int *fds, int *n_fds, uint64_t deadline_ns);

/* The peer's process id and user id (SO_PEERCRED). 0 or KVF_ENOTSUP. */
int kvf__unix_peer(int fd, pid_t *pid, uid_t *uid);

/* This host's boot id (16 bytes, /proc/sys/kernel/random/boot_id): two processes with the same
 * one run on the same kernel. 0 or KVF_ENOTSUP where the system does not say. */
int kvf__boot_id(uint8_t id[16]);

#endif
