/*
 * A cluster's credentials (creds.h): libsodium keys through auth.c's credential files.
 */
#include "creds.h"

#include "auth.h"
#include "kvf/kvf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

static int events_key_make(const char *dir, char events_key[65], char *err, size_t errlen)
{
    char path[4200];
    kvf_credential cred;
    uint8_t pk[KVF_AUTH_PK_LEN], xpk[32];
    snprintf(path, sizeof path, "%s/events.cred", dir);
    unlink(path);
    int rc = kvf__cred_new(&cred, "events", pk) != 0 ||
             kvf__cred_write(path, &cred, err, errlen) != 0 || kvf__auth_curve_pk(pk, xpk) != 0;
    kvf__auth_wipe(&cred, sizeof cred);
    if (rc) {
        if (!err[0])
            snprintf(err, errlen, "cannot make the events key %s", path);
        return -1;
    }
    for (int i = 0; i < 32; i++)
        snprintf(events_key + 2 * i, 3, "%02x", xpk[i]);
    return 0;
}

int kvf__cluster_make_creds(const char *dir, const char *tenants_name, uint64_t quota_bytes,
                            char events_key[65], char *err, size_t errlen)
{
    const struct {
        const char *name, *file;
        int role;
    } who[] = {{"cluster", "cluster.cred", KVF_ROLE_TENANT},
               {"admin", "admin.cred", KVF_ROLE_ADMIN}};
    char tenants[4200];
    err[0] = '\0';
    snprintf(tenants, sizeof tenants, "%s/%s", dir, tenants_name);
    unlink(tenants);
    int fd = open(tenants, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f) {
        if (fd >= 0)
            close(fd);
        snprintf(err, errlen, "cannot write %s: %s", tenants, strerror(errno));
        return -1;
    }
    fprintf(f, "# the stores' tenants (kvf auth list --tenants this file)\n");
    int rc = 0;
    for (size_t i = 0; i < sizeof who / sizeof who[0] && !rc; i++) {
        char path[4200], line[512];
        snprintf(path, sizeof path, "%s/%s", dir, who[i].file);
        unlink(path);
        kvf_credential cred;
        kvf_tenant_key k = {.role = who[i].role};
        if (who[i].role == KVF_ROLE_TENANT)
            k.max_bytes = quota_bytes;
        snprintf(k.name, sizeof k.name, "%s", who[i].name);
        if (kvf__cred_new(&cred, who[i].name, k.pk) != 0 ||
            kvf__cred_write(path, &cred, err, errlen) != 0) {
            if (!err[0])
                snprintf(err, errlen, "cannot make the credential %s", path);
            rc = -1;
        }
        kvf__auth_wipe(&cred, sizeof cred);
        kvf__tenant_key_format(&k, line, sizeof line);
        fputs(line, f);
    }
    if (fclose(f) != 0 && !rc) {
        snprintf(err, errlen, "cannot write %s", tenants);
        rc = -1;
    }
    return rc ? rc : events_key_make(dir, events_key, err, errlen);
}

int kvf__cluster_make_token(const char *dir, char token[65], char *err, size_t errlen)
{
    unsigned char r[32];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
        snprintf(err, errlen, "cannot draw a token for kvf-sched: %s", strerror(errno));
        return -1;
    }
    for (size_t i = 0; i < sizeof r; i++)
        snprintf(token + 2 * i, 3, "%02x", r[i]);
    char path[4200], line[128];
    snprintf(path, sizeof path, "%s/sched.tokens", dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    int n = snprintf(line, sizeof line, "# kvf-sched's bearer tokens\ncluster %s\n", token);
    int ok = fd >= 0 && fchmod(fd, 0600) == 0 && write(fd, line, (size_t)n) == n;
    if (fd >= 0)
        close(fd);
    if (!ok) {
        snprintf(err, errlen, "cannot write %s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}
