/*
 * A client for etcd's v3 API through its JSON gateway (docs/membership.md): the unary calls over
 * transport/http.h's libcurl client, the watch as a streamed POST of its own. Keys and values are
 * strings (base64 on the wire, libsodium's codec); revisions and lease ids are etcd's int64s.
 *
 * One kvf__etcd is a list of member endpoints ("http://HOST:PORT", comma-separated): a call that
 * gets no HTTP answer from one member (refused, timed out) is tried on the next, and the member
 * that answered is asked first next time. Every call is bounded by the client's timeout. Calls
 * on one kvf__etcd may come from several threads.
 */
#ifndef KVF_MEMBERSHIP_ETCD_H
#define KVF_MEMBERSHIP_ETCD_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define KVF_ETCD_MAX_MEMBERS 8

typedef struct kvf__etcd kvf__etcd;

/* endpoints: up to KVF_ETCD_MAX_MEMBERS "http://HOST:PORT" (or "HOST:PORT"), comma-separated.
 * timeout_ms bounds each unary call to one member. Nothing is contacted here. 0, or KVF_EINVAL /
 * KVF_ENOMEM with one line in err. */
int kvf__etcd_open(kvf__etcd **out, const char *endpoints, int timeout_ms, char *err,
                   size_t errlen);
void kvf__etcd_close(kvf__etcd **e);
/* The member endpoint that answered last (borrowed). */
const char *kvf__etcd_member(const kvf__etcd *e);

/* Grants a lease of ttl_s seconds: *lease its id. */
int kvf__etcd_grant(kvf__etcd *e, int ttl_s, int64_t *lease, char *err, size_t errlen);
/* Renews a lease once: *ttl the seconds it now has. KVF_ENOENT when it has expired (its keys are
 * gone). */
int kvf__etcd_keepalive(kvf__etcd *e, int64_t lease, int64_t *ttl, char *err, size_t errlen);
/* Revokes a lease: its keys are deleted at once. */
int kvf__etcd_revoke(kvf__etcd *e, int64_t lease, char *err, size_t errlen);
/* Puts key = value, attached to lease (0: none). */
int kvf__etcd_put(kvf__etcd *e, const char *key, const char *value, int64_t lease, char *err,
                  size_t errlen);
/* Puts key = value under lease only if key does not exist (a transaction). *created says
 * whether it did; where it did not, holder (may be NULL) gets the value that holds the key. */
int kvf__etcd_create(kvf__etcd *e, const char *key, const char *value, int64_t lease, int *created,
                     char *holder, size_t hlen, char *err, size_t errlen);
/* Deletes key. */
int kvf__etcd_delete(kvf__etcd *e, const char *key, char *err, size_t errlen);

/* A key's change: put (1) with its value, or deleted (0, value ""), at revision rev. */
typedef void (*kvf__etcd_kv_fn)(void *ud, int put, const char *key, const char *value, int64_t rev);
/* Every key under prefix, as puts; *revision the store's revision they are as of. */
int kvf__etcd_range(kvf__etcd *e, const char *prefix, kvf__etcd_kv_fn fn, void *ud,
                    int64_t *revision, char *err, size_t errlen);
/* Watches the keys under prefix from revision start on, calling fn for each change as it comes,
 * until *stop is set (checked at least every second; returns 0), the member goes away or the
 * stream breaks (KVF_ECONNREFUSED / KVF_EIO), or etcd has compacted the history past start
 * (KVF_ERANGE: list the keys again). *next is the revision to resume from: one past the last
 * change delivered (or start). A member that is partitioned away is noticed by TCP keep-alive
 * within a few seconds. */
int kvf__etcd_watch(kvf__etcd *e, const char *prefix, int64_t start, kvf__etcd_kv_fn fn, void *ud,
                    atomic_int *stop, int64_t *next, char *err, size_t errlen);

#endif
