/*
 * kvf auth: an operator's tenants and credentials (docs/security.md).
 *
 *   kvf auth new NAME --tenants FILE --out CRED [--admin] [--bytes SIZE] [--reservations N]
 *   kvf auth rotate --tenants FILE --credential CRED --out NEWCRED
 *   kvf auth revoke NAME --tenants FILE [--key HEXPREFIX]
 *   kvf auth list --tenants FILE
 *   kvf auth key NAME --out CRED
 *   kvf auth curve --credential CRED
 *
 * `new` makes a key pair and a salt, adds the public key to the tenants file (created 0600 where
 * missing) and writes the credential (0600, never over a file). `rotate` gives a tenant a second
 * key with the same salt, role and quotas (its keys, and so its cached chunks, stay the same);
 * once every client uses the new credential, `revoke --key` drops the old key. `key` makes a
 * credential that no tenants file names (the KV event publishers' CURVE identity), `curve` prints
 * a credential's public key in its X25519 form (what kvf-sched's --events-server-key takes).
 * A storage node
 * reads its tenants file again on SIGHUP. Edits rewrite the tenants file through a temporary file
 * and rename, so a node never reads half of one.
 */
#include "cmd_auth.h"

#include "kvf/error.h"

#include "auth.h"
#include "cli_common.h"
#include "units.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static void usage(FILE *f)
{
    fprintf(f, "usage: kvf auth new NAME --tenants FILE --out CRED [--admin] [--bytes SIZE]\n"
               "                [--reservations N]\n"
               "       kvf auth rotate --tenants FILE --credential CRED --out NEWCRED\n"
               "       kvf auth revoke NAME --tenants FILE [--key HEXPREFIX]\n"
               "       kvf auth list --tenants FILE\n"
               "       kvf auth key NAME --out CRED\n"
               "       kvf auth curve --credential CRED\n"
               "Tenants and their credentials for kvf-store --auth (docs/security.md).\n"
               "  new     a tenant's first key: adds it to FILE, writes its credential to CRED\n"
               "  rotate  a second key for CRED's tenant, same salt, role and quotas\n"
               "  revoke  removes NAME's keys (or the one whose public key starts with HEXPREFIX)\n"
               "  list    the keys of FILE\n"
               "  key     a credential in no tenants file (the KV event publishers' key)\n"
               "  curve   CRED's public key as X25519, in hex (kvf-sched --events-server-key)\n"
               "  --admin            the admin role: every namespace, CLEAR of all, STATS, COPY\n"
               "  --bytes SIZE       the arena bytes the tenant may hold (e.g. 4G; default none)\n"
               "  --reservations N   its puts in progress at once (default none)\n"
               "A node reads its tenants file again on SIGHUP.\n");
}

/* Writes keys to path through a temporary file and rename, mode 0600. 0 or 1 after saying why. */
static int tenants_write(const char *path, const kvf_tenant_key *keys, size_t n)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "kvf auth: %s: %s\n", tmp, strerror(errno));
        return 1;
    }
    FILE *f = fdopen(fd, "w");
    fprintf(f, "# kvfabric tenants: NAME ROLE PUBLIC_KEY [bytes=SIZE] [reservations=N]\n");
    for (size_t i = 0; i < n; i++) {
        char line[512];
        kvf__tenant_key_format(&keys[i], line, sizeof line);
        fputs(line, f);
    }
    int ok = fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok &= fclose(f) == 0;
    if (!ok || rename(tmp, path) != 0) {
        fprintf(stderr, "kvf auth: writing %s: %s\n", path, strerror(errno));
        unlink(tmp);
        return 1;
    }
    return 0;
}

/* The keys of path, or none where it does not exist yet (missing_ok). 0 or 1 after saying why. */
static int tenants_read(const char *path, int missing_ok, kvf_tenant_key **keys, size_t *n)
{
    char err[300];
    int rc = kvf__tenants_parse(path, keys, n, err, sizeof err);
    if (rc == KVF_ENOENT && missing_ok)
        return 0;
    if (rc) {
        fprintf(stderr, "kvf auth: %s\n", err);
        return 1;
    }
    return 0;
}

/* Adds k to the tenants file and writes cred to out; 0 or 1. The credential is written first, so
 * a failure leaves no key in the file that nobody holds. */
static int add_key(const char *tenants, const char *out, const kvf_credential *cred,
                   const kvf_tenant_key *k)
{
    kvf_tenant_key *keys = NULL;
    size_t n = 0;
    if (tenants_read(tenants, 1, &keys, &n))
        return 1;
    char err[300];
    if (kvf__cred_write(out, cred, err, sizeof err) != 0) {
        fprintf(stderr, "kvf auth: credential %s\n", err);
        free(keys);
        return 1;
    }
    kvf_tenant_key *nk = realloc(keys, (n + 1) * sizeof *nk);
    if (!nk) {
        free(keys);
        unlink(out);
        return 1;
    }
    nk[n] = *k;
    int rc = tenants_write(tenants, nk, n + 1);
    free(nk);
    if (rc)
        unlink(out);
    return rc;
}

static void pk_hex(const uint8_t *pk, char out[2 * KVF_AUTH_PK_LEN + 1])
{
    sodium_bin2hex(out, 2 * KVF_AUTH_PK_LEN + 1, pk, KVF_AUTH_PK_LEN);
}

typedef struct auth_args {
    const char *tenants, *out, *credential, *key;
    int admin;
    uint64_t bytes;
    uint32_t reservations;
} auth_args;

/* Reads the options after the action (and its NAME, if any). Returns -1 to go on, or the exit
 * status. */
static int parse(int argc, char **argv, auth_args *a)
{
    static const struct option opts[] = {
        {"tenants", required_argument, NULL, 't'},
        {"out", required_argument, NULL, 'o'},
        {"credential", required_argument, NULL, 'c'},
        {"key", required_argument, NULL, 'k'},
        {"admin", no_argument, NULL, 'a'},
        {"bytes", required_argument, NULL, 'b'},
        {"reservations", required_argument, NULL, 'r'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    optind = 1;
    const char *optval = NULL;
    for (int ch; (ch = kvf__cli_next_opt(argc, argv, opts, &optval)) != 0;) {
        switch (ch) {
        case 't':
            a->tenants = optval;
            break;
        case 'o':
            a->out = optval;
            break;
        case 'c':
            a->credential = optval;
            break;
        case 'k':
            a->key = optval;
            break;
        case 'a':
            a->admin = 1;
            break;
        case 'b':
            if (kvf__parse_size(optval, &a->bytes) != 0) {
                fprintf(stderr, "kvf auth: --bytes: cannot parse size \"%s\" (see --help)\n",
                        optval);
                return 2;
            }
            break;
        case 'r': {
            char *end = NULL;
            unsigned long v = strtoul(optval, &end, 10);
            if (end == optval || *end || v > UINT32_MAX) {
                fprintf(stderr, "kvf auth: --reservations: \"%s\" is not a count (see --help)\n",
                        optval);
                return 2;
            }
            a->reservations = (uint32_t)v;
            break;
        }
        case 'h':
            usage(stdout);
            return 0;
        case KVF__CLI_OPT_NOVALUE:
            fprintf(stderr, "kvf auth: %s needs a value (see --help)\n", optval);
            return 2;
        default:
            if (optval && optval[0] != '-') {
                fprintf(stderr, "kvf auth: unexpected argument \"%s\" (see --help)\n", optval);
                return 2;
            }
            fprintf(stderr, "kvf auth: unknown option %s (see --help)\n", optval ? optval : "?");
            return 2;
        }
    }
    return -1;
}

static int cmd_new(const char *name, const auth_args *a)
{
    if (!a->out) {
        fprintf(stderr, "kvf auth new: --out CRED is required\n");
        return 2;
    }
    if (!kvf__auth_name_valid(name)) {
        fprintf(stderr, "kvf auth new: \"%s\" is not a tenant name (1-%u of A-Z a-z 0-9 _ . -)\n",
                name, KVF_AUTH_NAME_MAX);
        return 2;
    }
    kvf_tenant_key *keys = NULL;
    size_t n = 0;
    if (tenants_read(a->tenants, 1, &keys, &n))
        return 1;
    for (size_t i = 0; i < n; i++)
        if (!strcmp(keys[i].name, name)) {
            fprintf(stderr,
                    "kvf auth new: %s already has a key in %s (kvf auth rotate gives it another)\n",
                    name, a->tenants);
            free(keys);
            return 1;
        }
    free(keys);
    kvf_credential cred;
    kvf_tenant_key k = {.role = a->admin ? KVF_ROLE_ADMIN : KVF_ROLE_TENANT,
                        .max_bytes = a->bytes,
                        .max_reserved = a->reservations};
    snprintf(k.name, sizeof k.name, "%s", name);
    if (kvf__cred_new(&cred, name, k.pk) != 0) {
        fprintf(stderr, "kvf auth new: libsodium failed\n");
        return 1;
    }
    int rc = add_key(a->tenants, a->out, &cred, &k);
    sodium_memzero(&cred, sizeof cred);
    if (!rc) {
        char pk[2 * KVF_AUTH_PK_LEN + 1];
        pk_hex(k.pk, pk);
        printf("tenant %s (%s): key %.16s... added to %s; credential in %s\n", name,
               kvf__auth_role_name(k.role), pk, a->tenants, a->out);
    }
    return rc;
}

static int cmd_rotate(const auth_args *a)
{
    if (!a->out || !a->credential) {
        fprintf(stderr, "kvf auth rotate: --credential CRED and --out NEWCRED are required\n");
        return 2;
    }
    kvf_credential cred;
    char err[300];
    if (kvf__cred_load(a->credential, &cred, err, sizeof err) != 0) {
        fprintf(stderr, "kvf auth rotate: %s\n", err);
        return 1;
    }
    kvf_tenant_key *keys = NULL;
    size_t n = 0;
    if (tenants_read(a->tenants, 0, &keys, &n)) {
        sodium_memzero(&cred, sizeof cred);
        return 1;
    }
    const kvf_tenant_key *old = NULL;
    for (size_t i = 0; i < n && !old; i++)
        if (!strcmp(keys[i].name, cred.tenant))
            old = &keys[i];
    if (!old) {
        fprintf(stderr, "kvf auth rotate: %s has no key in %s\n", cred.tenant, a->tenants);
        free(keys);
        sodium_memzero(&cred, sizeof cred);
        return 1;
    }
    kvf_tenant_key k = *old;
    free(keys);
    int rc = kvf__cred_rotate(&cred, k.pk) != 0 ? 1 : add_key(a->tenants, a->out, &cred, &k);
    if (!rc) {
        char pk[2 * KVF_AUTH_PK_LEN + 1];
        pk_hex(k.pk, pk);
        printf("tenant %s: new key %.16s... added to %s; credential in %s. Once every client "
               "uses it: kvf auth revoke %s --tenants %s --key <the old key's prefix>\n",
               cred.tenant, pk, a->tenants, a->out, cred.tenant, a->tenants);
    }
    sodium_memzero(&cred, sizeof cred);
    return rc;
}

static int cmd_revoke(const char *name, const auth_args *a)
{
    kvf_tenant_key *keys = NULL;
    size_t n = 0, kept = 0;
    if (tenants_read(a->tenants, 0, &keys, &n))
        return 1;
    for (size_t i = 0; i < n; i++) {
        char pk[2 * KVF_AUTH_PK_LEN + 1];
        pk_hex(keys[i].pk, pk);
        int match =
            !strcmp(keys[i].name, name) && (!a->key || !strncasecmp(pk, a->key, strlen(a->key)));
        if (!match)
            keys[kept++] = keys[i];
    }
    if (kept == n) {
        fprintf(stderr, "kvf auth revoke: no key of %s%s%s in %s\n", name,
                a->key ? " starting with " : "", a->key ? a->key : "", a->tenants);
        free(keys);
        return 1;
    }
    int rc = tenants_write(a->tenants, keys, kept);
    free(keys);
    if (!rc)
        printf("revoked %zu key(s) of %s; send SIGHUP to the storage nodes that read %s\n",
               n - kept, name, a->tenants);
    return rc;
}

static int cmd_list(const auth_args *a)
{
    kvf_tenant_key *keys = NULL;
    size_t n = 0;
    if (tenants_read(a->tenants, 0, &keys, &n))
        return 1;
    for (size_t i = 0; i < n; i++) {
        char line[512];
        kvf__tenant_key_format(&keys[i], line, sizeof line);
        fputs(line, stdout);
    }
    free(keys);
    return 0;
}

/* kvf auth key NAME --out CRED: a credential that no tenants file names. */
static int cmd_key(const char *name, const auth_args *a)
{
    if (!a->out || !kvf__auth_name_valid(name)) {
        fprintf(stderr, "kvf auth key: a NAME and --out CRED are required\n");
        return 2;
    }
    kvf_credential cred;
    uint8_t pk[KVF_AUTH_PK_LEN];
    char err[300];
    int rc = kvf__cred_new(&cred, name, pk) != 0 || kvf__cred_write(a->out, &cred, err, sizeof err);
    sodium_memzero(&cred, sizeof cred);
    if (rc) {
        fprintf(stderr, "kvf auth key: cannot write %s\n", a->out);
        return 1;
    }
    printf("key %s in %s (in no tenants file)\n", name, a->out);
    return 0;
}

/* kvf auth curve --credential CRED: its public key as X25519, in hex. */
static int cmd_curve(const auth_args *a)
{
    kvf_credential cred;
    uint8_t pk[32], sk[32];
    char err[300], hex[65];
    if (!a->credential) {
        fprintf(stderr, "kvf auth curve: --credential CRED is required\n");
        return 2;
    }
    if (kvf__cred_load(a->credential, &cred, err, sizeof err) != 0 ||
        kvf__auth_curve_pair(&cred, pk, sk) != 0) {
        fprintf(stderr, "kvf auth curve: %s\n", err);
        sodium_memzero(&cred, sizeof cred);
        return 1;
    }
    sodium_memzero(&cred, sizeof cred);
    sodium_memzero(sk, sizeof sk);
    sodium_bin2hex(hex, sizeof hex, pk, sizeof pk);
    printf("%s\n", hex);
    return 0;
}

int kvf__cli_auth(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *action = argv[1];
    int named = !strcmp(action, "new") || !strcmp(action, "revoke") || !strcmp(action, "key");
    if (!named && strcmp(action, "rotate") && strcmp(action, "list") && strcmp(action, "curve")) {
        fprintf(stderr, "kvf auth: unknown action \"%s\" (new, rotate, revoke, list, key, curve)\n",
                action);
        return 2;
    }
    const char *name = NULL;
    int skip = 1;
    if (named) {
        if (argc < 3 || argv[2][0] == '-') {
            fprintf(stderr, "kvf auth %s: NAME is required (see --help)\n", action);
            return 2;
        }
        name = argv[2];
        skip = 2;
    }
    auth_args a = {0};
    int st = parse(argc - skip, argv + skip, &a);
    if (st >= 0)
        return st;
    if (kvf__auth_init() != 0) {
        fprintf(stderr, "kvf auth: libsodium cannot start\n");
        return 1;
    }
    if (!strcmp(action, "key"))
        return cmd_key(name, &a);
    if (!strcmp(action, "curve"))
        return cmd_curve(&a);
    if (!a.tenants) {
        fprintf(stderr, "kvf auth %s: --tenants FILE is required\n", action);
        return 2;
    }
    if (!strcmp(action, "new"))
        return cmd_new(name, &a);
    if (!strcmp(action, "rotate"))
        return cmd_rotate(&a);
    if (!strcmp(action, "revoke"))
        return cmd_revoke(name, &a);
    return cmd_list(&a);
}
