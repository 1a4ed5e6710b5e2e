/*
 * A daemon's tenants (tenants.h). The keys are a plain array scanned per AUTH: there is one
 * AUTH per connection and a tenants file holds tens or hundreds of keys, so a scan of a few
 * signature checks (only the keys of the name presented are tried) costs microseconds.
 */
#include "tenants.h"

#include "kvf/error.h"

#include "errf.h"

#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kvf__tenants {
    pthread_mutex_t mu;
    char *path;
    kvf_tenant_key *keys;
    uint8_t (*curve)[32]; /* keys[i]'s public key as X25519 (all zero where it has none) */
    size_t n_keys;
    /* Tenant numbers: names[i] is tenant i + 1. Only grows, so a number never changes owner. */
    char (*names)[KVF_AUTH_NAME_MAX + 1];
    size_t n_names;
    atomic_uint generation;
};

/* The number of name, given one if it has none. 0 when the table is full. */
static uint32_t number_of(kvf__tenants *t, const char *name)
{
    for (size_t i = 0; i < t->n_names; i++)
        if (!strcmp(t->names[i], name))
            return (uint32_t)(i + 1);
    if (t->n_names + 1 >= KVF_AUTH_MAX_TENANTS)
        return 0;
    snprintf(t->names[t->n_names], sizeof t->names[0], "%s", name);
    return (uint32_t)(++t->n_names);
}

/* Reads the file into fresh keys and numbers every name. Called with mu held (or before t is
 * shared). */
static int load(kvf__tenants *t, char *err, size_t errlen)
{
    kvf_tenant_key *keys = NULL;
    size_t n = 0;
    int rc = kvf__tenants_parse(t->path, &keys, &n, err, errlen);
    if (rc)
        return rc;
    if (n == 0) {
        free(keys);
        return kvf__errf(err, errlen, KVF_EINVAL, "tenants %s: no keys", t->path);
    }
    for (size_t i = 0; i < n; i++)
        if (number_of(t, keys[i].name) == 0) {
            free(keys);
            return kvf__errf(err, errlen, KVF_E2BIG, "tenants %s: more than %u tenant names",
                             t->path, KVF_AUTH_MAX_TENANTS - 1);
        }
    uint8_t(*curve)[32] = calloc(n, sizeof *curve);
    if (!curve) {
        free(keys);
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < n; i++)
        if (crypto_sign_ed25519_pk_to_curve25519(curve[i], keys[i].pk) != 0)
            memset(curve[i], 0, 32);
    free(t->keys);
    free(t->curve);
    t->keys = keys;
    t->curve = curve;
    t->n_keys = n;
    return 0;
}

int kvf__tenants_open(kvf__tenants **out, const char *path, char *err, size_t errlen)
{
    *out = NULL;
    if (kvf__auth_init() != 0)
        return kvf__errf(err, errlen, KVF_EIO, "libsodium cannot start");
    kvf__tenants *t = calloc(1, sizeof *t);
    if (t)
        t->names = calloc(KVF_AUTH_MAX_TENANTS, sizeof *t->names);
    if (t)
        t->path = strdup(path);
    if (!t || !t->names || !t->path) {
        if (t) {
            free(t->names);
            free(t->path);
        }
        free(t);
        return kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
    }
    pthread_mutex_init(&t->mu, NULL);
    int rc = load(t, err, errlen);
    if (rc) {
        kvf__tenants_close(&t);
        return rc;
    }
    *out = t;
    return 0;
}

void kvf__tenants_close(kvf__tenants **tp)
{
    if (!tp || !*tp)
        return;
    kvf__tenants *t = *tp;
    pthread_mutex_destroy(&t->mu);
    free(t->keys);
    free(t->curve);
    free(t->names);
    free(t->path);
    free(t);
    *tp = NULL;
}

int kvf__tenants_reload(kvf__tenants *t, char *err, size_t errlen)
{
    pthread_mutex_lock(&t->mu);
    int rc = load(t, err, errlen);
    pthread_mutex_unlock(&t->mu);
    if (!rc)
        atomic_fetch_add(&t->generation, 1);
    return rc;
}

void kvf__tenants_quota(kvf__tenants *t, uint32_t idx, uint64_t *max_bytes, uint32_t *max_reserved)
{
    *max_bytes = 0;
    *max_reserved = 0;
    pthread_mutex_lock(&t->mu);
    for (size_t i = 0; idx >= 1 && idx <= t->n_names && i < t->n_keys; i++)
        if (!strcmp(t->keys[i].name, t->names[idx - 1])) {
            *max_bytes = t->keys[i].max_bytes;
            *max_reserved = t->keys[i].max_reserved;
            break;
        }
    pthread_mutex_unlock(&t->mu);
}

void kvf__tenants_name(kvf__tenants *t, uint32_t idx, char *name, size_t namelen)
{
    pthread_mutex_lock(&t->mu);
    snprintf(name, namelen, "%s", idx >= 1 && idx <= t->n_names ? t->names[idx - 1] : "");
    pthread_mutex_unlock(&t->mu);
}

int kvf__tenants_curve_allow(kvf__tenants *t, const uint8_t pk[32], char *name, size_t namelen,
                             int *admin)
{
    static const uint8_t zero[32];
    int ok = 0;
    pthread_mutex_lock(&t->mu);
    for (size_t i = 0; i < t->n_keys && !ok; i++)
        if (sodium_memcmp(t->curve[i], pk, 32) == 0 && sodium_memcmp(t->curve[i], zero, 32)) {
            snprintf(name, namelen, "%s", t->keys[i].name);
            *admin = t->keys[i].role == KVF_ROLE_ADMIN;
            ok = 1;
        }
    pthread_mutex_unlock(&t->mu);
    return ok;
}

int kvf__tenants_check(kvf__tenants *t, const char *name, const uint8_t nonce[KVF_AUTH_NONCE_LEN],
                       uint64_t node_id, const uint8_t sig[KVF_AUTH_SIG_LEN], kvf__tenant_id *id)
{
    int ok = 0;
    pthread_mutex_lock(&t->mu);
    for (size_t i = 0; i < t->n_keys && !ok; i++) {
        const kvf_tenant_key *k = &t->keys[i];
        if (strcmp(k->name, name) != 0 || !kvf__auth_verify(k->pk, name, nonce, node_id, sig))
            continue;
        memset(id, 0, sizeof *id);
        snprintf(id->name, sizeof id->name, "%s", name);
        id->role = k->role;
        id->index = number_of(t, name);
        id->scope = kvf__auth_scope(name);
        memcpy(id->pk, k->pk, sizeof id->pk);
        ok = 1;
    }
    pthread_mutex_unlock(&t->mu);
    return ok;
}

int kvf__tenants_has_key(kvf__tenants *t, const kvf__tenant_id *id)
{
    int found = 0;
    pthread_mutex_lock(&t->mu);
    for (size_t i = 0; i < t->n_keys && !found; i++)
        found = t->keys[i].role == id->role && !strcmp(t->keys[i].name, id->name) &&
                !memcmp(t->keys[i].pk, id->pk, sizeof id->pk);
    pthread_mutex_unlock(&t->mu);
    return found;
}

unsigned kvf__tenants_generation(kvf__tenants *t)
{
    return atomic_load(&t->generation);
}

void kvf__tenants_count(kvf__tenants *t, size_t *keys, size_t *names)
{
    pthread_mutex_lock(&t->mu);
    *keys = t->n_keys;
    *names = t->n_names;
    pthread_mutex_unlock(&t->mu);
}
