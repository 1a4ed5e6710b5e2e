/*
 * Shared by the integration tests: real kvf-store daemons on loopback (port 0) that die with the
 * test process whatever happens to it, and a TCP proxy that can slow down, corrupt or cut the
 * traffic between a client and a daemon.
 */
#ifndef KVF_TEST_HARNESS_H
#define KVF_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "wire.h"

typedef struct daemon_t {
    pid_t pid;
    uint16_t port;
    char addr[64];
} daemon_t;

/* Ignores SIGPIPE, kills leftover daemons at exit, and applies KVF_TEST_FILTER (a cmocka test
 * name pattern) when set. Call first in main. */
void harness_init(void);
/* Starts kvf-store with --memory memory and extra flags; fails the test if it is not ready in
 * 10 s. */
void daemon_start(daemon_t *d, const char *memory, const char *extra);
/* A client of nodes a and b, in that order, in namespace ns, with credential (NULL: none) over
 * transport (NULL: the default); fails the test when it cannot open. */
struct kvf_client;
struct kvf_client *harness_client_two(const daemon_t *a, const daemon_t *b, uint64_t ns,
                                      const char *credential, const char *transport);
/* Waits up to timeout_ms for keys[0..n) to be on d (asked of d alone over TCP, in namespace ns
 * with credential); returns how many are. */
struct kvf_key;
size_t harness_wait_present(const daemon_t *d, uint64_t ns, const char *credential,
                            const struct kvf_key *keys, size_t n, int timeout_ms);
/* As daemon_start, with the daemon's descriptor limit (RLIMIT_NOFILE) lowered to nofile and its
 * standard error written to the file stderr_path. */
void daemon_start_limited(daemon_t *d, const char *memory, const char *extra, int nofile,
                          const char *stderr_path);
/* Starts any program that prints "listen=HOST:PORT" on stdout when ready (argv[0] a path); same
 * guarantees as daemon_start. */
void proc_start(daemon_t *d, char *const argv[]);
/* Runs argv (argv[0] a path) to its end, 10 s at most (then killed: -1), its stdout and stderr
 * into out; returns its exit status. */
int harness_run(char *const argv[], char *out, size_t outlen);
/* The kvf-store binary the daemons are started from. */
const char *harness_store_bin(void);
/* SIGTERM; the daemon must exit 0 within 10 s. */
void daemon_stop(daemon_t *d);
/* SIGKILL, no checks. */
void daemon_kill(daemon_t *d);
/* cmocka teardown: kills every daemon the test left running. */
int teardown_daemons(void **state);

/* Raw sockets for hand-made frames. A blocking connection to 127.0.0.1:port whose reads wait
 * 5 s at most (fails the test when it cannot connect). */
int harness_raw_connect(uint16_t port);
/* Sends all of p (fails the test when the peer is gone). */
void harness_raw_send(int fd, const void *p, size_t n);
/* Reads exactly n bytes: 0, or -1 at EOF, an error or the read timeout. */
int harness_raw_read_full(int fd, void *p, size_t n);
/* Reads one reply's header into h (fails the test on a bad one), then the first
 * min(payload_len, cap) bytes of its payload into payload, *got how many (payload NULL: none is
 * read, the caller reads it). Returns the reply's status. */
int harness_raw_reply(int fd, kvf_wire_hdr *h, void *payload, size_t cap, size_t *got);

typedef struct proxy proxy;
typedef struct proxy_opts {
    uint16_t upstream;  /* daemon port */
    double bytes_per_s; /* server-to-client rate limit; 0: none */
    int64_t corrupt_at; /* flip one byte at this offset of a server-to-client stream; -1 */
    int64_t cut_at;     /* drop a connection once it carried this many server-to-client
                         * bytes, as a node that dies mid-reply does; 0: never */
} proxy_opts;
/* Starts a proxy on a free loopback port; its address is proxy_addr(). Fails the test on error. */
proxy *proxy_start(const proxy_opts *o);
const char *proxy_addr(const proxy *p);
/* Whether the corruption was applied. */
int proxy_corrupted(const proxy *p);
void proxy_stop(proxy **p);

#endif
