/* A storage node's chunk events (publish.h). */
#include "publish.h"

#include "kvf/error.h"

#include "clock.h"
#include "kvevents.h"
#include "pubsub.h"
#include "cpus.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

/* Changes waiting for the sender, at most; more are dropped and the sequence skips a number. Both
 * buffers are taken at this size when the publisher opens (address space: pages become resident
 * as a burst first reaches them), so noting a change never allocates under the cache's lock. */
#define MAX_PENDING (1u << 20)
/* Changes in one batch, at most. */
#define BATCH_MAX 4096u
/* How often the node's measured rates are published (StoreRates), when it has any. */
#define RATES_EVERY_NS (2000ull * 1000 * 1000)

typedef struct change {
    kvf_key key;
    uint32_t tenant;
    uint8_t admitted, disk;
} change;

struct kvf__pub {
    kvf__zpub *sock;
    kvf__tenants *tenants;
    int node;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    change *pending, *spare; /* the cache appends to pending; the sender sends the other */
    size_t n;
    int dropped, stop;
    uint64_t seq;
    /* kvf__pub_set_rates: the sender asks it every RATES_EVERY_NS (under mu) */
    uint64_t (*rates)(void *ctx);
    void *rates_ctx;
    uint64_t rates_at;
    /* kvf__pub_snapshots: what is held now, listed under lmu (never taken under the cache's
     * lock, which kvf__pub_note is called under) */
    pthread_mutex_t lmu;
    kvf__pub_list_fn list;
    void *list_ctx;
};

void kvf__pub_set_rates(kvf__pub *p, uint64_t (*disk_read_bytes_per_s)(void *ctx), void *ctx)
{
    pthread_mutex_lock(&p->mu);
    p->rates = disk_read_bytes_per_s;
    p->rates_ctx = ctx;
    pthread_mutex_unlock(&p->mu);
}

/* The node's rates, as one batch under the untenanted topic (they are nobody's data). */
static void send_rates(kvf__pub *p, uint64_t disk_bps)
{
    kvf__kve_enc *e = NULL;
    const void *data;
    size_t len;
    int rc = kvf__kve_enc_begin(&e, 1);
    if (!rc) {
        kvf__kve_enc_store_rates(e, (uint64_t)p->node, disk_bps);
        rc = kvf__kve_enc_end(e, &data, &len);
    }
    p->seq++;
    if (!rc)
        kvf__zpub_send(p->sock, "kvf-store", p->seq, data, len);
    kvf__kve_enc_free(&e);
}

void kvf__pub_note(void *pv, int admitted, int disk, const kvf_key *key, uint32_t tenant)
{
    kvf__pub *p = pv;
    pthread_mutex_lock(&p->mu);
    if (p->n < MAX_PENDING)
        p->pending[p->n++] = (change){*key, tenant, (uint8_t)(admitted != 0), (uint8_t)(disk != 0)};
    else
        p->dropped = 1;
    pthread_mutex_unlock(&p->mu);
}

/* The topic of a tenant's changes: its own where tenants are known, else the node's. */
static void topic_of(const kvf__pub *p, uint32_t tenant, char topic[128])
{
    snprintf(topic, 128, "kvf-store");
    if (p->tenants && tenant) {
        char name[KVF_AUTH_NAME_MAX + 1];
        kvf__tenants_name(p->tenants, tenant, name, sizeof name);
        snprintf(topic, 128, "kvf-store/t/%s/", name);
    }
}

/* Encodes n changes of one tenant (at most BATCH_MAX) as one batch, in order, as runs of one
 * kind. 0 with *e (free it) and the payload, or KVF_ENOMEM. */
static int encode(const kvf__pub *p, const change *c, size_t n, kvf__kve_enc **e, const void **data,
                  size_t *len)
{
    size_t runs = 0;
    for (size_t i = 0; i < n; i++)
        runs += i == 0 || c[i].admitted != c[i - 1].admitted || c[i].disk != c[i - 1].disk;
    kvf_key keys[BATCH_MAX];
    int rc = kvf__kve_enc_begin(e, runs);
    for (size_t i = 0; i < n && !rc;) {
        size_t j = i;
        while (j < n && c[j].admitted == c[i].admitted && c[j].disk == c[i].disk) {
            keys[j - i] = c[j].key;
            j++;
        }
        kvf__kve_enc_chunks(*e, c[i].admitted, (uint64_t)p->node, keys, j - i, c[i].disk);
        i = j;
    }
    return rc ? rc : kvf__kve_enc_end(*e, data, len);
}

/* One batch of one tenant's changes under the tenant's topic. A batch that cannot be encoded
 * (out of memory) is dropped with its sequence number, so that the subscriber sees a gap. */
static void send_batch(kvf__pub *p, const change *c, size_t n, int dropped)
{
    char topic[128];
    topic_of(p, c[0].tenant, topic);
    kvf__kve_enc *e = NULL;
    const void *data;
    size_t len;
    int rc = encode(p, c, n, &e, &data, &len);
    p->seq += 1 + (dropped != 0); /* a skipped number tells the subscriber changes were lost */
    if (!rc)
        kvf__zpub_send(p->sock, topic, p->seq, data, len);
    kvf__kve_enc_free(&e);
}

/* A snapshot's holdings as they are listed, grown as needed. */
typedef struct holdings {
    change *c;
    size_t n, cap;
    int oom;
} holdings;

static void holding_add(void *ud, int disk, const kvf_key *key, uint32_t tenant)
{
    holdings *h = ud;
    if (h->oom)
        return;
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 4096;
        change *c = realloc(h->c, cap * sizeof *c);
        if (!c) {
            h->oom = 1;
            return;
        }
        h->c = c, h->cap = cap;
    }
    h->c[h->n++] = (change){*key, tenant, 1, (uint8_t)(disk != 0)};
}

static int by_tenant_tier(const void *a, const void *b)
{
    const change *x = a, *y = b;
    if (x->tenant != y->tenant)
        return x->tenant < y->tenant ? -1 : 1;
    return (int)x->disk - (int)y->disk;
}

/* kvf__zpub_snap_fn: everything held now, listed, grouped by tenant and tier, as batches of
 * ChunksAdmitted under each tenant's topic. */
static int snapshot(void *ctx, kvf__zpub_snap_emit emit, void *ectx)
{
    kvf__pub *p = ctx;
    holdings h = {0};
    pthread_mutex_lock(&p->lmu);
    int listed = p->list != NULL;
    if (listed)
        p->list(p->list_ctx, holding_add, &h);
    pthread_mutex_unlock(&p->lmu);
    int rc = !listed || h.oom ? -1 : 0;
    if (!rc && h.n)
        qsort(h.c, h.n, sizeof *h.c, by_tenant_tier);
    for (size_t off = 0, len; !rc && off < h.n; off += len) {
        len = 1;
        while (off + len < h.n && len < BATCH_MAX && h.c[off + len].tenant == h.c[off].tenant)
            len++;
        char topic[128];
        topic_of(p, h.c[off].tenant, topic);
        kvf__kve_enc *e = NULL;
        const void *data;
        size_t n;
        rc = encode(p, h.c + off, len, &e, &data, &n);
        if (!rc)
            rc = emit(ectx, topic, data, n);
        kvf__kve_enc_free(&e);
    }
    free(h.c);
    return rc;
}

int kvf__pub_snapshots(kvf__pub *p, const char *host, uint16_t port, kvf__pub_list_fn list,
                       void *ctx, char *endpoint, size_t eplen, char *err, size_t errlen)
{
    pthread_mutex_lock(&p->lmu);
    p->list = list;
    p->list_ctx = ctx;
    pthread_mutex_unlock(&p->lmu);
    return kvf__zpub_snapshots(p->sock, host, port, snapshot, p, endpoint, eplen, err, errlen);
}

void kvf__pub_stop_snapshots(kvf__pub *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lmu);
    p->list = NULL;
    p->list_ctx = NULL;
    pthread_mutex_unlock(&p->lmu);
}

static void *sender_main(void *arg)
{
    kvf__pub *p = arg;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        uint64_t now = kvf__now_ns();
        if (p->rates && now - p->rates_at >= RATES_EVERY_NS) {
            p->rates_at = now;
            /* asked under mu: once kvf__pub_set_rates(NULL) returns, it is never called again */
            uint64_t bps = p->rates(p->rates_ctx);
            pthread_mutex_unlock(&p->mu);
            if (bps)
                send_rates(p, bps);
            pthread_mutex_lock(&p->mu);
            continue;
        }
        if (!p->n && !p->stop) {
            kvf__cond_wait_ms(&p->cv, &p->mu, 20);
            pthread_mutex_unlock(&p->mu);
            kvf__zpub_service(p->sock); /* subscriptions, between batches */
            pthread_mutex_lock(&p->mu);
            continue;
        }
        if (!p->n && p->stop)
            break;
        /* Swap buffers: the cache keeps appending while this batch is sent. */
        change *mine = p->pending;
        size_t n = p->n;
        int dropped = p->dropped;
        p->pending = p->spare;
        p->spare = mine;
        p->n = 0;
        p->dropped = 0;
        pthread_mutex_unlock(&p->mu);
        /* Bounded messages, each of one tenant's consecutive changes. */
        for (size_t off = 0, len; off < n; off += len) {
            len = 1;
            while (off + len < n && len < BATCH_MAX && mine[off + len].tenant == mine[off].tenant)
                len++;
            send_batch(p, mine + off, len, dropped && off == 0);
        }
        pthread_mutex_lock(&p->mu);
        if (p->stop && !p->n)
            break;
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

int kvf__pub_open(kvf__pub **out, const char *host, uint16_t port, int node, kvf__tenants *tenants,
                  const kvf__zsec *sec, char *endpoint, size_t eplen, char *err, size_t errlen)
{
    *out = NULL;
    kvf__pub *p = calloc(1, sizeof *p);
    if (p) {
        p->pending = malloc(MAX_PENDING * sizeof *p->pending);
        p->spare = malloc(MAX_PENDING * sizeof *p->spare);
    }
    if (!p || !p->pending || !p->spare) {
        if (p)
            free(p->pending), free(p->spare);
        free(p);
        snprintf(err, errlen, "events: out of memory");
        return KVF_ENOMEM;
    }
    p->node = node;
    p->tenants = tenants;
    int rc =
        sec ? kvf__zpub_open_secure(&p->sock, host, port, 1000, sec, endpoint, eplen, err, errlen)
            : kvf__zpub_open(&p->sock, host, port, 1000, endpoint, eplen, err, errlen);
    if (rc) {
        free(p->pending), free(p->spare);
        free(p);
        return rc;
    }
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->lmu, NULL);
    pthread_cond_init(&p->cv, NULL);
    if (kvf__thread_start(&p->th, sender_main, p) != 0) {
        kvf__zpub_close(&p->sock);
        free(p->pending), free(p->spare);
        free(p);
        return KVF_ENOMEM;
    }
    *out = p;
    return 0;
}

void kvf__pub_close(kvf__pub **pp)
{
    if (!pp || !*pp)
        return;
    kvf__pub *p = *pp;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_signal(&p->cv);
    pthread_mutex_unlock(&p->mu);
    pthread_join(p->th, NULL);
    kvf__zpub_close(&p->sock);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->lmu);
    pthread_cond_destroy(&p->cv);
    free(p->pending);
    free(p->spare);
    free(p);
    *pp = NULL;
}
