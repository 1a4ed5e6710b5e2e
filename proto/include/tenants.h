/*
 * The tenants a daemon authenticates (docs/security.md): the keys of its tenants file, read at
 * start and again on SIGHUP, and a stable number per tenant name (a storage node's quota
 * accounting). Checked two ways: an AUTH signature (Ed25519) on the store protocol, and a CURVE
 * public key (the same key pair as X25519) from ZeroMQ's ZAP for KV event subscribers. Safe from
 * any thread: checks run on event loops while a reload swaps the keys.
 */
#ifndef KVF_PROTO_TENANTS_H
#define KVF_PROTO_TENANTS_H

#include <stddef.h>
#include <stdint.h>

#include "auth.h"

/* Tenant numbers are 1 .. KVF_AUTH_MAX_TENANTS - 1. */
#define KVF_AUTH_MAX_TENANTS 4096u

typedef struct kvf__tenants kvf__tenants;

/* Who a connection proved to be. */
typedef struct kvf__tenant_id {
    char name[KVF_AUTH_NAME_MAX + 1];
    int role;                    /* KVF_ROLE_TENANT or KVF_ROLE_ADMIN */
    uint32_t index;              /* 1.. : the cache's tenant number, stable across reloads */
    uint64_t scope;              /* kvf__auth_scope(name) */
    uint8_t pk[KVF_AUTH_PK_LEN]; /* the key it proved */
} kvf__tenant_id;

/* Reads the tenants file at path. Caller owns the result; free with kvf__tenants_close(). 0, or
 * the error of kvf__tenants_parse (with err), or KVF_E2BIG past KVF_AUTH_MAX_TENANTS - 1 names. */
int kvf__tenants_open(kvf__tenants **out, const char *path, char *err, size_t errlen);
void kvf__tenants_close(kvf__tenants **t);
/* Reads the file again and replaces the keys (on a bad file, keeps the old ones and says why in
 * err). Connections already authenticated keep their tenant. */
int kvf__tenants_reload(kvf__tenants *t, char *err, size_t errlen);
/* The quotas of tenant number idx (those of the first of its keys; 0: none, also for a name no
 * longer in the file). */
void kvf__tenants_quota(kvf__tenants *t, uint32_t idx, uint64_t *max_bytes, uint32_t *max_reserved);
/* The name of tenant number idx into name (namelen bytes); "" where there is none. */
void kvf__tenants_name(kvf__tenants *t, uint32_t idx, char *name, size_t namelen);
/* ZAP's question for a CURVE subscriber: 1 with its tenant's name and *admin when pk is the
 * X25519 form of one of the keys, else 0. */
int kvf__tenants_curve_allow(kvf__tenants *t, const uint8_t pk[32], char *name, size_t namelen,
                             int *admin);
/* Checks an AUTH: 1 with *id when sig is name's signature over (nonce, node_id) under one of the
 * keys of name, else 0. */
int kvf__tenants_check(kvf__tenants *t, const char *name, const uint8_t nonce[KVF_AUTH_NONCE_LEN],
                       uint64_t node_id, const uint8_t sig[KVF_AUTH_SIG_LEN], kvf__tenant_id *id);
/* Whether id's key is still in the file, with the same name and role (a reload may have revoked
 * it). */
int kvf__tenants_has_key(kvf__tenants *t, const kvf__tenant_id *id);
/* How many times the file was read again successfully: a change says to check open connections
 * against it. */
unsigned kvf__tenants_generation(kvf__tenants *t);
/* The number of keys and of tenant names known. */
void kvf__tenants_count(kvf__tenants *t, size_t *keys, size_t *names);

#endif
