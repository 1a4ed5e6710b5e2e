/*
 * Tenant authentication on the store protocol (docs/protocol.md, "HELLO and AUTH";
 * docs/security.md): the two text files an operator keeps with `kvf auth`, the message a client
 * signs, and the namespace scoping the server applies to an authenticated tenant.
 *
 * A tenant holds a credential: its name, a random salt (the tenant salt of docs/keys.md, kept
 * across key rotations) and an Ed25519 secret key (libsodium's crypto_sign). A storage node holds a
 * tenants file: one line per public key, with the tenant's role and quotas. A connection proves its
 * tenant by signing the node's random HELLO challenge; the node then decides the namespaces the
 * connection may touch, so no client can name another tenant's.
 *
 * Credential file (mode 0600), key=value lines, '#' comments:
 *   tenant=NAME
 *   salt=64 hex digits
 *   secret=128 hex digits (Ed25519 secret key)
 * Tenants file (mode 0600), one key per line, '#' comments:
 *   NAME ROLE PUBLIC_KEY_HEX [bytes=SIZE] [reservations=N]
 * with ROLE tenant or admin; SIZE as --memory takes it (0 or absent: no quota).
 */
#ifndef KVF_PROTO_AUTH_H
#define KVF_PROTO_AUTH_H

#include <stddef.h>
#include <stdint.h>

#define KVF_AUTH_NAME_MAX  63u /* bytes of a tenant name: [A-Za-z0-9_.-] */
#define KVF_AUTH_NONCE_LEN 32u
#define KVF_AUTH_SIG_LEN   64u
#define KVF_AUTH_PK_LEN    32u
#define KVF_AUTH_SK_LEN    64u
#define KVF_AUTH_SALT_LEN  32u
/* AUTH request payload: u32 name_len, u32 0, name (64 bytes, zero padded), signature (64). */
#define KVF_AUTH_REQ_LEN (8u + 64u + KVF_AUTH_SIG_LEN)
/* AUTH reply payload: u32 role, u32 0, u64 scope. */
#define KVF_AUTH_REPLY_LEN 16u
/* HELLO reply payload: 48 bytes, then the challenge where the node asks for AUTH. */
#define KVF_HELLO_REPLY_LEN      48u
#define KVF_HELLO_REPLY_AUTH_LEN (KVF_HELLO_REPLY_LEN + KVF_AUTH_NONCE_LEN)

/* What a connection may do. NONE: nothing but HELLO and AUTH. TENANT: data requests in its own
 * namespaces, its own STATS. ADMIN: everything, in every namespace as named. */
enum { KVF_ROLE_NONE = 0, KVF_ROLE_TENANT = 1, KVF_ROLE_ADMIN = 2 };

typedef struct kvf_credential {
    char tenant[KVF_AUTH_NAME_MAX + 1];
    uint8_t salt[KVF_AUTH_SALT_LEN];
    uint8_t sk[KVF_AUTH_SK_LEN];
} kvf_credential;

/* One line of a tenants file. */
typedef struct kvf_tenant_key {
    char name[KVF_AUTH_NAME_MAX + 1];
    int role; /* KVF_ROLE_TENANT or KVF_ROLE_ADMIN */
    uint8_t pk[KVF_AUTH_PK_LEN];
    uint64_t max_bytes;    /* 0: no quota */
    uint32_t max_reserved; /* outstanding reservations; 0: no quota */
} kvf_tenant_key;

/* Initialises libsodium once (thread-safe). 0, or KVF_EIO when it cannot. */
int kvf__auth_init(void);
/* Whether name is a valid tenant name: 1..KVF_AUTH_NAME_MAX bytes of [A-Za-z0-9_.-]. */
int kvf__auth_name_valid(const char *name);
/* The role's name ("tenant", "admin", "none"), and back (-1: unknown). */
const char *kvf__auth_role_name(int role);
int kvf__auth_role_parse(const char *s);

/* A fresh credential for name: a new key pair and salt; pk gets its public key. 0, KVF_EINVAL
 * (bad name) or KVF_EIO. */
int kvf__cred_new(kvf_credential *c, const char *name, uint8_t pk[KVF_AUTH_PK_LEN]);
/* The same tenant and salt under a new key pair (rotation). */
int kvf__cred_rotate(kvf_credential *c, uint8_t pk[KVF_AUTH_PK_LEN]);
/* The tenant salt of a key space (docs/keys.md): the salt of the credential at path (NULL:
 * $KVF_CREDENTIAL; none where that is unset or empty), then the n_extra bytes of extra. out gets
 * at most cap bytes, *n how many. 0, the error of kvf__cred_load, or KVF_EINVAL when they do not
 * fit, with one line in err. */
int kvf__auth_key_salt(const char *path, const char *extra, size_t n_extra, uint8_t *out,
                       size_t cap, size_t *n, char *err, size_t errlen);
/* A cluster's tools (kvf cluster send, kvf-bench e2e) use the credential `kvf cluster up` made in
 * its run directory: sets $KVF_CREDENTIAL to DIR/cluster.cred where it is unset and that file
 * exists. Returns 0 when $KVF_CREDENTIAL is set afterwards, -1 otherwise. */
int kvf__auth_cred_from_dir(const char *dir);
/* Reads a credential file. 0, or KVF_ENOENT / KVF_EINVAL / KVF_EACCES (readable by others) with
 * one line in err. */
int kvf__cred_load(const char *path, kvf_credential *c, char *err, size_t errlen);
/* Writes a credential file, mode 0600; never over an existing file. 0, KVF_EEXIST or KVF_EIO. */
int kvf__cred_write(const char *path, const kvf_credential *c, char *err, size_t errlen);

/* Reads a tenants file. Caller owns *keys; free with free(). 0, or KVF_ENOENT / KVF_EINVAL (line
 * named in err) / KVF_ENOMEM. */
int kvf__tenants_parse(const char *path, kvf_tenant_key **keys, size_t *n, char *err,
                       size_t errlen);
/* Formats one line of a tenants file (with its newline) into out. */
void kvf__tenant_key_format(const kvf_tenant_key *k, char *out, size_t outlen);

/* AUTH: the signature of a credential over the node's challenge, and its check. The signed
 * message is "KVFAUTH1" | nonce (32) | node_id (u64 LE) | name (64, zero padded). */
int kvf__auth_sign(const kvf_credential *c, const uint8_t nonce[KVF_AUTH_NONCE_LEN],
                   uint64_t node_id, uint8_t sig[KVF_AUTH_SIG_LEN]);
/* 1 when sig is name's signature under pk, else 0. */
int kvf__auth_verify(const uint8_t pk[KVF_AUTH_PK_LEN], const char *name,
                     const uint8_t nonce[KVF_AUTH_NONCE_LEN], uint64_t node_id,
                     const uint8_t sig[KVF_AUTH_SIG_LEN]);
/* The credential's key pair in its X25519 form (for ZeroMQ's CURVE), and an Ed25519 public key's.
 * 0, or KVF_EINVAL for a key that has none. */
int kvf__auth_curve_pair(const kvf_credential *c, uint8_t pk[32], uint8_t sk[32]);
int kvf__auth_curve_pk(const uint8_t ed_pk[KVF_AUTH_PK_LEN], uint8_t pk[32]);
/* Wipes n bytes of a secret (libsodium's sodium_memzero: not optimised away before a free). */
void kvf__auth_wipe(void *p, size_t n);
/* Random bytes from libsodium. */
void kvf__auth_random(void *buf, size_t n);

/* A tenant's scope (a 64-bit hash of its name), and the namespace a node keeps a tenant's
 * namespace ns under: a keyed hash of ns under the scope, never 0. Two tenants' namespaces
 * collide with probability 2^-64. */
uint64_t kvf__auth_scope(const char *name);
uint64_t kvf__auth_ns(uint64_t scope, uint64_t ns);

#endif
