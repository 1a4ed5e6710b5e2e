/* Registrations under leases and watchers of a prefix (member.h), over etcd.h. */
#include "member.h"

#include "kvf/error.h"

#include "clock.h"
#include "etcd.h"

#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Each etcd call is bounded by this (one member); the registration's retries by its TTL. */
#define CALL_MS 2000

/* Sleeps ms in steps of 50 ms, returning early once *stop is set. */
static void nap(atomic_int *stop, unsigned ms)
{
    for (unsigned t = 0; t < ms && !atomic_load(stop); t += 50)
        usleep(50000);
}

int kvf__member_cluster_valid(const char *name)
{
    size_t n = strlen(name);
    return n && n <= 64 &&
           strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-") == n;
}

void kvf__member_reachable(const char *ep, const char *host, char *out, size_t n)
{
    const char *port = strrchr(ep, ':');
    if (!strncmp(ep, "tcp://", 6) && port &&
        (!strncmp(ep + 6, "0.0.0.0:", 8) || !strncmp(ep + 6, "[::]:", 5) ||
         !strncmp(ep + 6, ":::", 3) || !strncmp(ep + 6, "*:", 2))) {
        /* an IPv6 literal is bracketed in an endpoint */
        int v6 = strchr(host, ':') && host[0] != '[';
        snprintf(out, n, "tcp://%s%s%s%s", v6 ? "[" : "", host, v6 ? "]" : "", port);
    } else {
        snprintf(out, n, "%s", ep);
    }
}

int kvf__member_zone_valid(const char *zone)
{
    return zone && zone[0] && strlen(zone) < 64 && kvf__member_cluster_valid(zone);
}

int kvf__member_zone_check(const char *prog, const char *opt, const char *zone)
{
    if (kvf__member_zone_valid(zone))
        return 0;
    fprintf(stderr, "%s: %s: a zone is 1 to 63 of [A-Za-z0-9._-], got \"%s\"\n", prog, opt, zone);
    return -1;
}

int kvf__member_cluster_check(const char *prog, const char *name)
{
    if (kvf__member_cluster_valid(name))
        return 0;
    fprintf(stderr, "%s: --cluster: 1 to 64 of [A-Za-z0-9._-], got \"%s\"\n", prog, name);
    return -1;
}

/* ---- a registration ------------------------------------------------------------------------ */

struct kvf__member {
    kvf__etcd *e;
    char *key, *value;
    int ttl_s, exclusive;
    const kvf_log *log;
    int64_t lease;
    uint64_t renewed_ns; /* the last renewal (or grant) that etcd answered */
    atomic_int registered, stop;
    _Atomic uint64_t rejoins;
    pthread_t th;
};

/* Grants a lease and puts the key under it (exclusive: only where it is free, waiting up to
 * wait_ms for a previous holder's lease to lapse). */
static int join(kvf__member *m, int wait_ms, char *err, size_t errlen)
{
    int64_t lease = 0;
    int rc = kvf__etcd_grant(m->e, m->ttl_s, &lease, err, errlen);
    if (rc)
        return rc;
    uint64_t until = kvf__now_ns() + (uint64_t)(wait_ms > 0 ? wait_ms : 0) * 1000000u;
    char holder[512] = "";
    for (;;) {
        int created = 1;
        rc = m->exclusive ? kvf__etcd_create(m->e, m->key, m->value, lease, &created, holder,
                                             sizeof holder, err, errlen)
                          : kvf__etcd_put(m->e, m->key, m->value, lease, err, errlen);
        if (rc || created)
            break;
        if (!strcmp(holder, m->value)) {
            /* our own earlier registration (a restart within the TTL, same addresses): taken
             * over under the new lease */
            rc = kvf__etcd_put(m->e, m->key, m->value, lease, err, errlen);
            break;
        }
        if (kvf__now_ns() >= until || atomic_load(&m->stop)) {
            snprintf(err, errlen, "etcd: %s is held by another process (%s)", m->key, holder);
            rc = KVF_EEXIST;
            break;
        }
        nap(&m->stop, 250);
    }
    if (rc) {
        char e2[64];
        kvf__etcd_revoke(m->e, lease, e2, sizeof e2);
        return rc;
    }
    m->lease = lease;
    m->renewed_ns = kvf__now_ns();
    atomic_store(&m->registered, 1);
    return 0;
}

static void *keepalive_main(void *arg)
{
    kvf__member *m = arg;
    unsigned period_ms = (unsigned)m->ttl_s * 1000u / 3u;
    uint64_t ttl_ns = (uint64_t)m->ttl_s * 1000000000ull;
    int down_logged = 0;
    while (!atomic_load(&m->stop)) {
        nap(&m->stop, period_ms);
        if (atomic_load(&m->stop))
            break;
        char err[300] = "";
        int64_t ttl = 0;
        int rc = atomic_load(&m->registered)
                     ? kvf__etcd_keepalive(m->e, m->lease, &ttl, err, sizeof err)
                     : KVF_ENOENT;
        if (rc == 0) {
            m->renewed_ns = kvf__now_ns();
            if (down_logged)
                kvf_info(m->log, "etcd: %s renewed again", m->key);
            down_logged = 0;
            continue;
        }
        if (rc != KVF_ENOENT && kvf__now_ns() - m->renewed_ns < ttl_ns) {
            if (!down_logged)
                kvf_warn(m->log, "etcd: cannot renew %s (%s); trying every %u ms", m->key, err,
                         period_ms);
            down_logged = 1;
            continue; /* the lease may still live: keep asking */
        }
        /* expired, or not renewed for a whole TTL: the key is gone; register again */
        if (atomic_exchange(&m->registered, 0))
            kvf_warn(m->log, "etcd: the lease of %s has lapsed (%s); registering again", m->key,
                     err[0] ? err : "not renewed within its TTL");
        if (join(m, 0, err, sizeof err) == 0) {
            atomic_fetch_add(&m->rejoins, 1);
            kvf_info(m->log, "etcd: %s registered again (lease %" PRId64 ")", m->key, m->lease);
            down_logged = 0;
        } else if (!down_logged) {
            kvf_warn(m->log, "etcd: cannot register %s again yet: %s", m->key, err);
            down_logged = 1;
        }
    }
    return NULL;
}

static void member_free(kvf__member *m)
{
    kvf__etcd_close(&m->e);
    free(m->key);
    free(m->value);
    free(m);
}

int kvf__member_start(kvf__member **out, const kvf__member_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    if (o->ttl_s < 2 || o->ttl_s > 3600 || !o->key || !o->value) {
        snprintf(err, errlen, "etcd: a lease of 2 to 3600 s and a key and value are needed");
        return KVF_EINVAL;
    }
    kvf__member *m = calloc(1, sizeof *m);
    if (!m || !(m->key = strdup(o->key)) || !(m->value = strdup(o->value))) {
        if (m)
            member_free(m);
        snprintf(err, errlen, "etcd: out of memory");
        return KVF_ENOMEM;
    }
    m->ttl_s = o->ttl_s;
    m->exclusive = o->exclusive;
    m->log = o->log;
    int rc = kvf__etcd_open(&m->e, o->endpoints, CALL_MS, err, errlen);
    if (!rc)
        rc = join(m, o->wait_ms, err, errlen);
    if (!rc && pthread_create(&m->th, NULL, keepalive_main, m) != 0) {
        char e2[64];
        kvf__etcd_revoke(m->e, m->lease, e2, sizeof e2);
        snprintf(err, errlen, "etcd: cannot start the keep-alive thread");
        rc = KVF_ENOMEM;
    }
    if (rc) {
        member_free(m);
        return rc;
    }
    kvf_info(m->log, "etcd: registered %s at %s (lease %" PRId64 ", %d s)", m->key,
             kvf__etcd_member(m->e), m->lease, m->ttl_s);
    *out = m;
    return 0;
}

int kvf__member_registered(kvf__member *m)
{
    return m && atomic_load(&m->registered);
}

uint64_t kvf__member_rejoins(kvf__member *m)
{
    return m ? atomic_load(&m->rejoins) : 0;
}

void kvf__member_stop(kvf__member **pm)
{
    if (!pm || !*pm)
        return;
    kvf__member *m = *pm;
    atomic_store(&m->stop, 1);
    pthread_join(m->th, NULL);
    char err[300];
    if (atomic_load(&m->registered) && kvf__etcd_revoke(m->e, m->lease, err, sizeof err) != 0)
        kvf_warn(m->log, "etcd: cannot revoke the lease of %s (%s): it lapses in %d s", m->key, err,
                 m->ttl_s);
    member_free(m);
    *pm = NULL;
}

/* ---- a watcher ----------------------------------------------------------------------------- */

typedef struct known {
    char *key, *value;
} known;

struct kvf__watcher {
    kvf__etcd *e;
    char *prefix;
    kvf__watch_fn fn;
    void *ud;
    const kvf_log *log;
    known *k; /* the keys told as present, with their values (the thread's own) */
    size_t n, cap;
    atomic_int synced, stop;
    pthread_t th;
};

static known *find(kvf__watcher *w, const char *key)
{
    for (size_t i = 0; i < w->n; i++)
        if (!strcmp(w->k[i].key, key))
            return &w->k[i];
    return NULL;
}

/* Records key = value (value NULL: gone) and tells the owner where that is news. */
static void note(kvf__watcher *w, const char *key, const char *value)
{
    known *k = find(w, key);
    if (!value) {
        if (!k)
            return;
        w->fn(w->ud, 0, key, "");
        free(k->key);
        free(k->value);
        *k = w->k[--w->n];
        return;
    }
    if (k && !strcmp(k->value, value))
        return;
    char *v = strdup(value);
    if (!v)
        return; /* out of memory: told at the next change or listing */
    if (k) {
        free(k->value);
        k->value = v;
    } else {
        char *kk = strdup(key);
        if (kk && w->n == w->cap) {
            size_t cap = w->cap ? 2 * w->cap : 16;
            known *nk = realloc(w->k, cap * sizeof *nk);
            if (nk)
                w->k = nk, w->cap = cap;
        }
        if (!kk || w->n == w->cap) {
            free(kk);
            free(v);
            return; /* out of memory: told at the next change or listing */
        }
        w->k[w->n++] = (known){kk, v};
    }
    w->fn(w->ud, 1, key, value);
}

static void on_change(void *ud, int put, const char *key, const char *value, int64_t rev)
{
    (void)rev;
    note(ud, key, put ? value : NULL);
}

/* A listing: every key under the prefix, collected before anything is told. */
typedef struct listing {
    known *k;
    size_t n, cap;
    int oom;
} listing;

static void on_listed(void *ud, int put, const char *key, const char *value, int64_t rev)
{
    (void)put, (void)rev;
    listing *l = ud;
    if (l->oom)
        return;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        known *k = realloc(l->k, cap * sizeof *k);
        if (!k) {
            l->oom = 1;
            return;
        }
        l->k = k, l->cap = cap;
    }
    l->k[l->n].key = strdup(key);
    l->k[l->n].value = strdup(value);
    if (!l->k[l->n].key || !l->k[l->n].value)
        l->oom = 1;
    l->n++;
}

static void listing_free(listing *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->k[i].key), free(l->k[i].value);
    free(l->k);
}

/* Lists the prefix and tells the difference from what was told before. 0 with *rev. */
static int relist(kvf__watcher *w, int64_t *rev, char *err, size_t errlen)
{
    listing l = {0};
    int rc = kvf__etcd_range(w->e, w->prefix, on_listed, &l, rev, err, errlen);
    if (!rc && l.oom) {
        snprintf(err, errlen, "etcd: out of memory listing %s", w->prefix);
        rc = KVF_ENOMEM;
    }
    if (!rc) {
        for (size_t i = w->n; i-- > 0;) { /* gone meanwhile */
            int still = 0;
            for (size_t j = 0; j < l.n && !still; j++)
                still = !strcmp(l.k[j].key, w->k[i].key);
            if (!still)
                note(w, w->k[i].key, NULL);
        }
        for (size_t j = 0; j < l.n; j++)
            note(w, l.k[j].key, l.k[j].value);
    }
    listing_free(&l);
    return rc;
}

static void *watch_main(void *arg)
{
    kvf__watcher *w = arg;
    int64_t next = 0;
    int listed = 0;
    unsigned backoff = 0;
    char err[300] = "", last[300] = "";
    while (!atomic_load(&w->stop)) {
        int rc;
        if (!listed) {
            int64_t rev = 0;
            rc = relist(w, &rev, err, sizeof err);
            if (!rc) {
                listed = 1;
                next = rev + 1;
                atomic_store(&w->synced, 1);
            }
        } else {
            rc = kvf__etcd_watch(w->e, w->prefix, next, on_change, w, &w->stop, &next, err,
                                 sizeof err);
            if (rc == KVF_ERANGE)
                listed = 0; /* compacted: list again at once */
        }
        if (atomic_load(&w->stop))
            break;
        if (rc == 0 || rc == KVF_ERANGE) {
            backoff = 0;
            continue;
        }
        if (strcmp(err, last) != 0)
            kvf_warn(w->log, "etcd: watching %s: %s", w->prefix, err);
        snprintf(last, sizeof last, "%s", err);
        backoff = backoff ? (backoff * 2 > 2000 ? 2000 : backoff * 2) : 200;
        nap(&w->stop, backoff);
    }
    return NULL;
}

int kvf__watcher_start(kvf__watcher **out, const char *endpoints, const char *prefix,
                       kvf__watch_fn fn, void *ud, const kvf_log *log, char *err, size_t errlen)
{
    *out = NULL;
    kvf__watcher *w = calloc(1, sizeof *w);
    if (!w || !(w->prefix = strdup(prefix))) {
        free(w);
        snprintf(err, errlen, "etcd: out of memory");
        return KVF_ENOMEM;
    }
    w->fn = fn, w->ud = ud, w->log = log;
    int rc = kvf__etcd_open(&w->e, endpoints, CALL_MS, err, errlen);
    if (!rc && pthread_create(&w->th, NULL, watch_main, w) != 0) {
        kvf__etcd_close(&w->e);
        snprintf(err, errlen, "etcd: cannot start the watch thread");
        rc = KVF_ENOMEM;
    }
    if (rc) {
        free(w->prefix);
        free(w);
        return rc;
    }
    *out = w;
    return 0;
}

int kvf__watcher_synced(kvf__watcher *w)
{
    return w && atomic_load(&w->synced);
}

void kvf__watcher_stop(kvf__watcher **pw)
{
    if (!pw || !*pw)
        return;
    kvf__watcher *w = *pw;
    atomic_store(&w->stop, 1);
    pthread_join(w->th, NULL);
    for (size_t i = 0; i < w->n; i++)
        free(w->k[i].key), free(w->k[i].value);
    free(w->k);
    kvf__etcd_close(&w->e);
    free(w->prefix);
    free(w);
    *pw = NULL;
}

long kvf__member_key_number(const char *key, long max)
{
    const char *slash = strrchr(key, '/');
    char *end = NULL;
    long n = slash && slash[1] >= '0' && slash[1] <= '9' ? strtol(slash + 1, &end, 10) : -1;
    return n >= 0 && n < max && end && !*end ? n : -1;
}

int kvf__member_record_addr(const char *value, char *addr, size_t len)
{
    addr[0] = 0;
    json_t *o = value ? json_loads(value, 0, NULL) : NULL;
    const char *a = json_string_value(json_object_get(o, "addr"));
    if (a && strlen(a) < len)
        snprintf(addr, len, "%s", a);
    json_decref(o);
    return addr[0] != 0;
}
