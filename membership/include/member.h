/*
 * Membership on etcd (docs/membership.md): a process registers a key under a lease that a thread
 * keeps alive, so that the key disappears when the process dies (the lease expires) or stops (the
 * lease is revoked); and a watcher follows every key under a prefix, telling its owner what
 * joined, changed and left, resuming the watch from the last revision it saw and listing again
 * when etcd has compacted that history.
 */
#ifndef KVF_MEMBERSHIP_MEMBER_H
#define KVF_MEMBERSHIP_MEMBER_H

#include "log.h"

#include <stddef.h>
#include <stdint.h>

/* The options every daemon that registers in etcd takes, for its option table (args.h): --etcd
 * (what registering means for it: etcd_what), --cluster and --etcd-ttl, into etcd, cluster and
 * ttl (a const char *, a const char * and a long). */
#define KVF__MEMBER_OPTS(etcd, cluster, ttl, etcd_what)                                      \
    KVF__OPT("etcd", KVF__ARG_STR, (etcd), "URL[,...]",                                      \
             "etcd's members (http://HOST:PORT): " etcd_what " (docs/membership.md)", NULL), \
        KVF__OPT("cluster", KVF__ARG_STR, (cluster), "NAME",                                 \
                 "the cluster's name in etcd: keys under /kvfabric/NAME/", "default"),       \
        KVF__OPT("etcd-ttl", KVF__ARG_LONG, (ttl), "SECONDS",                                \
                 "the lease in etcd: a process that dies is dropped this long after", "5",   \
                 .lo = 2, .hi = 3600)

/* Whether name may be a cluster's name in keys (/kvfabric/NAME/...): 1 to 64 of
 * [A-Za-z0-9._-]. 0, or -1 after saying why on stderr, prog first. */
int kvf__member_cluster_check(const char *prog, const char *name);
/* The same rule, said nowhere: 1 or 0. */
int kvf__member_cluster_valid(const char *name);
/* Whether zone is a zone's name (an operator's rack or availability zone: docs/scheduler.md, "The
 * nearest replica"): 1 to 63 of [A-Za-z0-9._-]. */
int kvf__member_zone_valid(const char *zone);
/* As kvf__member_cluster_check, for option opt's zone: 0, or -1 after saying why on stderr. */
int kvf__member_zone_check(const char *prog, const char *opt, const char *zone);

/* A bound ZeroMQ endpoint "tcp://HOST:PORT" as others reach it: a wildcard host (0.0.0.0, [::],
 * *) replaced by host, the one the process advertises; "-" (none), or any other, as it is. */
void kvf__member_reachable(const char *ep, const char *host, char *out, size_t n);

/* A registration: key = value under a lease of ttl_s seconds, renewed every third of it. */
typedef struct kvf__member kvf__member;

typedef struct kvf__member_opts {
    const char *endpoints; /* etcd's members, "http://HOST:PORT,..." */
    const char *key, *value;
    int ttl_s;     /* 2 to 3600 */
    int exclusive; /* take the key only where nobody holds it (a node number) */
    int wait_ms;   /* exclusive: how long to wait for a previous holder's lease to lapse */
    const kvf_log *log;
} kvf__member_opts;

/* Registers now (bounded: o->wait_ms plus the calls' timeouts), then keeps the lease alive on a
 * thread of its own; a lease lost meanwhile (the process was cut off from etcd longer than the
 * TTL) is granted again and the key put again, logged. 0, or KVF_ECONNREFUSED (no member
 * answered), KVF_EEXIST (held by another: err names the holder's value) or another KVF_E* code,
 * with one line in err. */
int kvf__member_start(kvf__member **out, const kvf__member_opts *o, char *err, size_t errlen);
/* 1 while the key is held (its lease renewed within its TTL), else 0. */
int kvf__member_registered(kvf__member *m);
/* Times the lease was lost and the key registered again. */
uint64_t kvf__member_rejoins(kvf__member *m);
/* Stops renewing and revokes the lease: the key goes at once. Accepts NULL; clears *m. */
void kvf__member_stop(kvf__member **m);

/* The number that ends a watched key (/kvfabric/CLUSTER/stores/NODE): 0..max-1, or -1 where the
 * key does not end in one. */
long kvf__member_key_number(const char *key, long max);
/* A registration record's "addr" (a store's data address) into addr (len bytes): 1, or 0 (addr
 * "") where the record is not JSON, has none or one too long. */
int kvf__member_record_addr(const char *value, char *addr, size_t len);

/* What a watcher tells: key joined or changed (put 1, with its value) or left (put 0). Called on
 * the watcher's thread, in the order etcd made the changes. */
typedef void (*kvf__watch_fn)(void *ud, int put, const char *key, const char *value);
typedef struct kvf__watcher kvf__watcher;

/* Follows the keys under prefix: lists them (each a put), then watches from the revision after
 * the list. A broken stream is resumed from the next revision on the next member (back-off 0.2 s,
 * doubling to 2 s); history compacted away is listed again, and what vanished meanwhile is told
 * as left. 0, or a KVF_E* code with one line in err (nothing is contacted before the thread). */
int kvf__watcher_start(kvf__watcher **out, const char *endpoints, const char *prefix,
                       kvf__watch_fn fn, void *ud, const kvf_log *log, char *err, size_t errlen);
/* 1 once the first listing has been told. */
int kvf__watcher_synced(kvf__watcher *w);
/* Stops the thread (within about a second). Accepts NULL; clears *w. */
void kvf__watcher_stop(kvf__watcher **w);

#endif
