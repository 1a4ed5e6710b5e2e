/*
 * A cluster's credentials (creds.c), as kvf cluster up and kvf deploy render make them: the
 * tenant the engines and tools use, an admin, the stores' tenants file, the key the event
 * publishers secure their streams with, and kvf-sched's bearer token.
 */
#ifndef KVF_CLUSTER_CREDS_H
#define KVF_CLUSTER_CREDS_H

#include <stddef.h>
#include <stdint.h>

/* Makes in dir, each file mode 0600 (an existing one is replaced):
 * - cluster.cred: the tenant "cluster" (the engines' and tools' credential), with a quota of
 *   quota_bytes where nonzero;
 * - admin.cred: the admin "admin" (operators' management requests, kvf-sched's subscriptions);
 * - tenants_name: the stores' tenants file with both public keys;
 * - events.cred: the publishers' CURVE identity, in no tenants file (it authenticates nobody),
 *   and its X25519 public key in hex (64 digits) into events_key.
 * Returns 0, or -1 with the reason in err. */
int kvf__cluster_make_creds(const char *dir, const char *tenants_name, uint64_t quota_bytes,
                            char events_key[65], char *err, size_t errlen);

/* A fresh bearer token for kvf-sched (32 bytes of the kernel's random numbers, in hex, into
 * token) in dir/sched.tokens as the line "cluster TOKEN", mode 0600. Returns 0 or -1 with err. */
int kvf__cluster_make_token(const char *dir, char token[65], char *err, size_t errlen);

#endif
