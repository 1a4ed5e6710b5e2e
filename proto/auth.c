/*
 * Credentials, tenants files, the AUTH signature and tenant namespace scoping (auth.h). The
 * cryptography is libsodium's: Ed25519 signatures (crypto_sign_detached,
 * crypto_sign_verify_detached), randombytes_buf, sodium_memzero for secrets; the namespace scoping
 * is XXH3 with a seed, which is not a secret: it only separates tenants, the signature decides who
 * is which.
 */
#include "auth.h"

#include "kvf/error.h"

#include "bytes.h"
#include "errf.h"
#include "units.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#define MSG_LEN (8u + KVF_AUTH_NONCE_LEN + 8u + 64u)

int kvf__auth_init(void)
{
    return sodium_init() < 0 ? KVF_EIO : 0; /* 1: already done, which is fine */
}

int kvf__auth_name_valid(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n > KVF_AUTH_NAME_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = name[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == '-'))
            return 0;
    }
    return 1;
}

const char *kvf__auth_role_name(int role)
{
    return role == KVF_ROLE_ADMIN ? "admin" : role == KVF_ROLE_TENANT ? "tenant" : "none";
}

int kvf__auth_role_parse(const char *s)
{
    if (!strcmp(s, "admin"))
        return KVF_ROLE_ADMIN;
    if (!strcmp(s, "tenant"))
        return KVF_ROLE_TENANT;
    return -1;
}

void kvf__auth_wipe(void *p, size_t n)
{
    sodium_memzero(p, n);
}

void kvf__auth_random(void *buf, size_t n)
{
    if (kvf__auth_init() == 0)
        randombytes_buf(buf, n);
}

int kvf__cred_new(kvf_credential *c, const char *name, uint8_t pk[KVF_AUTH_PK_LEN])
{
    if (!kvf__auth_name_valid(name))
        return KVF_EINVAL;
    if (kvf__auth_init() != 0)
        return KVF_EIO;
    memset(c, 0, sizeof *c);
    snprintf(c->tenant, sizeof c->tenant, "%s", name);
    randombytes_buf(c->salt, sizeof c->salt);
    return crypto_sign_keypair(pk, c->sk) == 0 ? 0 : KVF_EIO;
}

int kvf__cred_rotate(kvf_credential *c, uint8_t pk[KVF_AUTH_PK_LEN])
{
    if (kvf__auth_init() != 0)
        return KVF_EIO;
    return crypto_sign_keypair(pk, c->sk) == 0 ? 0 : KVF_EIO;
}

/* Decodes exactly n bytes of hex from s (nothing after them). 0 or -1. */
static int hex_exact(const char *s, uint8_t *out, size_t n)
{
    size_t bin_len = 0;
    const char *end = NULL;
    if (strlen(s) != 2 * n)
        return -1;
    if (sodium_hex2bin(out, n, s, 2 * n, NULL, &bin_len, &end) != 0 || bin_len != n || *end)
        return -1;
    return 0;
}

/* Strips the newline and trailing blanks of line. */
static void chomp(char *line)
{
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ' ||
                 line[n - 1] == '\t'))
        line[--n] = 0;
}

int kvf__cred_load(const char *path, kvf_credential *c, char *err, size_t errlen)
{
    if (kvf__auth_init() != 0)
        return kvf__errf(err, errlen, KVF_EIO, "libsodium cannot start");
    FILE *f = fopen(path, "r");
    if (!f)
        return kvf__errf(err, errlen, errno == ENOENT ? KVF_ENOENT : KVF_EACCES,
                         "credential %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && (sb.st_mode & 077)) {
        fclose(f);
        return kvf__errf(err, errlen, KVF_EACCES,
                         "credential %s: readable by others (mode %03o); chmod 600 it", path,
                         (unsigned)(sb.st_mode & 0777));
    }
    memset(c, 0, sizeof *c);
    char line[512];
    int have = 0, rc = 0, lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        chomp(line);
        if (!line[0] || line[0] == '#')
            continue;
        char *eq = strchr(line, '=');
        if (!eq) {
            rc = kvf__errf(err, errlen, KVF_EINVAL, "credential %s:%d: expected key=value", path,
                           lineno);
            break;
        }
        *eq = 0;
        const char *v = eq + 1;
        if (!strcmp(line, "tenant") && kvf__auth_name_valid(v)) {
            snprintf(c->tenant, sizeof c->tenant, "%s", v);
            have |= 1;
        } else if (!strcmp(line, "salt") && hex_exact(v, c->salt, sizeof c->salt) == 0) {
            have |= 2;
        } else if (!strcmp(line, "secret") && hex_exact(v, c->sk, sizeof c->sk) == 0) {
            have |= 4;
        } else {
            rc = kvf__errf(err, errlen, KVF_EINVAL, "credential %s:%d: bad or unknown %s", path,
                           lineno, line);
            break;
        }
    }
    sodium_memzero(line, sizeof line);
    fclose(f);
    if (!rc && have != 7)
        rc = kvf__errf(err, errlen, KVF_EINVAL,
                       "credential %s: needs tenant=, salt= and secret=", path);
    if (rc)
        sodium_memzero(c, sizeof *c);
    return rc;
}

int kvf__auth_key_salt(const char *path, const char *extra, size_t n_extra, uint8_t *out,
                       size_t cap, size_t *n, char *err, size_t errlen)
{
    *n = 0;
    if (!path)
        path = getenv("KVF_CREDENTIAL");
    if (path && *path) {
        kvf_credential cred;
        int rc = kvf__cred_load(path, &cred, err, errlen);
        if (rc)
            return rc;
        if (cap < sizeof cred.salt) {
            sodium_memzero(&cred, sizeof cred);
            return kvf__errf(err, errlen, KVF_EINVAL, "no room for the credential's salt");
        }
        memcpy(out, cred.salt, sizeof cred.salt);
        *n = sizeof cred.salt;
        sodium_memzero(&cred, sizeof cred);
    }
    if (n_extra > cap - *n)
        return kvf__errf(err, errlen, KVF_EINVAL, "salt longer than %zu bytes", cap - *n);
    if (n_extra)
        memcpy(out + *n, extra, n_extra);
    *n += n_extra;
    return 0;
}

int kvf__auth_cred_from_dir(const char *dir)
{
    const char *have = getenv("KVF_CREDENTIAL");
    if (have && *have)
        return 0;
    char path[4200];
    snprintf(path, sizeof path, "%s/cluster.cred", dir);
    if (access(path, R_OK) != 0)
        return -1;
    return setenv("KVF_CREDENTIAL", path, 1) == 0 ? 0 : -1;
}

int kvf__cred_write(const char *path, const kvf_credential *c, char *err, size_t errlen)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return kvf__errf(err, errlen, errno == EEXIST ? KVF_EEXIST : KVF_EIO, "%s: %s", path,
                         strerror(errno));
    char salt[2 * KVF_AUTH_SALT_LEN + 1], sk[2 * KVF_AUTH_SK_LEN + 1];
    sodium_bin2hex(salt, sizeof salt, c->salt, sizeof c->salt);
    sodium_bin2hex(sk, sizeof sk, c->sk, sizeof c->sk);
    char buf[512];
    int n = snprintf(buf, sizeof buf,
                     "# kvfabric credential: keep it secret (docs/security.md)\n"
                     "tenant=%s\nsalt=%s\nsecret=%s\n",
                     c->tenant, salt, sk);
    ssize_t w = write(fd, buf, (size_t)n);
    sodium_memzero(sk, sizeof sk);
    sodium_memzero(buf, sizeof buf);
    int ok = w == n && fsync(fd) == 0;
    close(fd);
    if (!ok) {
        unlink(path);
        return kvf__errf(err, errlen, KVF_EIO, "%s: write failed", path);
    }
    return 0;
}

/* Parses one tenants line (already chomped, not a comment) into k. 0 or -1 with why. */
static int tenant_line(char *line, kvf_tenant_key *k, const char **why)
{
    char *save = NULL;
    char *name = strtok_r(line, " \t", &save);
    char *role = strtok_r(NULL, " \t", &save);
    char *pk = strtok_r(NULL, " \t", &save);
    memset(k, 0, sizeof *k);
    if (!name || !role || !pk) {
        *why = "expected NAME ROLE PUBLIC_KEY";
        return -1;
    }
    if (!kvf__auth_name_valid(name)) {
        *why = "bad tenant name";
        return -1;
    }
    snprintf(k->name, sizeof k->name, "%s", name);
    if ((k->role = kvf__auth_role_parse(role)) < 0) {
        *why = "role is neither tenant nor admin";
        return -1;
    }
    if (hex_exact(pk, k->pk, sizeof k->pk) != 0) {
        *why = "public key is not 64 hex digits";
        return -1;
    }
    for (char *opt; (opt = strtok_r(NULL, " \t", &save));) {
        if (!strncmp(opt, "bytes=", 6)) {
            if (kvf__parse_size(opt + 6, &k->max_bytes) != 0) {
                *why = "bytes= is not a size";
                return -1;
            }
        } else if (!strncmp(opt, "reservations=", 13)) {
            char *end = NULL;
            unsigned long v = strtoul(opt + 13, &end, 10);
            if (end == opt + 13 || *end || v > UINT32_MAX) {
                *why = "reservations= is not a count";
                return -1;
            }
            k->max_reserved = (uint32_t)v;
        } else {
            *why = "unknown option (bytes= and reservations= are known)";
            return -1;
        }
    }
    return 0;
}

int kvf__tenants_parse(const char *path, kvf_tenant_key **keys, size_t *n, char *err, size_t errlen)
{
    *keys = NULL;
    *n = 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return kvf__errf(err, errlen, errno == ENOENT ? KVF_ENOENT : KVF_EACCES, "tenants %s: %s",
                         path, strerror(errno));
    char line[1024];
    int lineno = 0, rc = 0;
    size_t cap = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        chomp(line);
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p || *p == '#')
            continue;
        if (*n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            kvf_tenant_key *nk = realloc(*keys, ncap * sizeof *nk);
            if (!nk) {
                rc = kvf__errf(err, errlen, KVF_ENOMEM, "out of memory");
                break;
            }
            *keys = nk;
            cap = ncap;
        }
        const char *why = NULL;
        if (tenant_line(p, &(*keys)[*n], &why) != 0) {
            rc = kvf__errf(err, errlen, KVF_EINVAL, "tenants %s:%d: %s", path, lineno, why);
            break;
        }
        (*n)++;
    }
    fclose(f);
    if (rc) {
        free(*keys);
        *keys = NULL;
        *n = 0;
    }
    return rc;
}

void kvf__tenant_key_format(const kvf_tenant_key *k, char *out, size_t outlen)
{
    char pk[2 * KVF_AUTH_PK_LEN + 1];
    sodium_bin2hex(pk, sizeof pk, k->pk, sizeof k->pk);
    int n = snprintf(out, outlen, "%s %s %s", k->name, kvf__auth_role_name(k->role), pk);
    if (n > 0 && (size_t)n < outlen && k->max_bytes)
        n += snprintf(out + n, outlen - (size_t)n, " bytes=%" PRIu64, k->max_bytes);
    if (n > 0 && (size_t)n < outlen && k->max_reserved)
        n += snprintf(out + n, outlen - (size_t)n, " reservations=%" PRIu32, k->max_reserved);
    if (n > 0 && (size_t)n < outlen)
        snprintf(out + n, outlen - (size_t)n, "\n");
}

static void auth_msg(uint8_t out[MSG_LEN], const char *name,
                     const uint8_t nonce[KVF_AUTH_NONCE_LEN], uint64_t node_id)
{
    memset(out, 0, MSG_LEN);
    memcpy(out, "KVFAUTH1", 8);
    memcpy(out + 8, nonce, KVF_AUTH_NONCE_LEN);
    kvf__put_u64(out + 8 + KVF_AUTH_NONCE_LEN, node_id);
    memcpy(out + 16 + KVF_AUTH_NONCE_LEN, name, strnlen(name, KVF_AUTH_NAME_MAX));
}

int kvf__auth_sign(const kvf_credential *c, const uint8_t nonce[KVF_AUTH_NONCE_LEN],
                   uint64_t node_id, uint8_t sig[KVF_AUTH_SIG_LEN])
{
    if (kvf__auth_init() != 0)
        return KVF_EIO;
    uint8_t m[MSG_LEN];
    auth_msg(m, c->tenant, nonce, node_id);
    return crypto_sign_detached(sig, NULL, m, sizeof m, c->sk) == 0 ? 0 : KVF_EIO;
}

int kvf__auth_verify(const uint8_t pk[KVF_AUTH_PK_LEN], const char *name,
                     const uint8_t nonce[KVF_AUTH_NONCE_LEN], uint64_t node_id,
                     const uint8_t sig[KVF_AUTH_SIG_LEN])
{
    if (kvf__auth_init() != 0)
        return 0;
    uint8_t m[MSG_LEN];
    auth_msg(m, name, nonce, node_id);
    return crypto_sign_verify_detached(sig, m, sizeof m, pk) == 0;
}

int kvf__auth_curve_pair(const kvf_credential *c, uint8_t pk[32], uint8_t sk[32])
{
    if (kvf__auth_init() != 0 || crypto_sign_ed25519_sk_to_curve25519(sk, c->sk) != 0 ||
        crypto_sign_ed25519_pk_to_curve25519(pk, c->sk + 32) != 0)
        return KVF_EINVAL;
    return 0;
}

int kvf__auth_curve_pk(const uint8_t ed_pk[KVF_AUTH_PK_LEN], uint8_t pk[32])
{
    if (kvf__auth_init() != 0 || crypto_sign_ed25519_pk_to_curve25519(pk, ed_pk) != 0)
        return KVF_EINVAL;
    return 0;
}

uint64_t kvf__auth_scope(const char *name)
{
    return XXH3_64bits_withSeed(name, strlen(name), 0x6b76662d74656e61ull); /* "kvf-tena" */
}

uint64_t kvf__auth_ns(uint64_t scope, uint64_t ns)
{
    uint8_t b[8];
    kvf__put_u64(b, ns);
    uint64_t h = XXH3_64bits_withSeed(b, sizeof b, scope);
    return h ? h : 1;
}
