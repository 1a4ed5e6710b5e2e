/*
 * Shared memory for clients on the node's own host (docs/shm.md): the requests that only a
 * connection from the node's Unix socket may send.
 *
 *   SHM_MAP  hands the connection, with SCM_RIGHTS, a staging region of its own (a sealed memfd
 *            that this connection and nobody else uses) and, where the connection may read every
 *            namespace (a node without tenants, or an admin), a read-only descriptor of the arena.
 *   SHM_PUT  reserves a block per object, copies the object from the staging region into it,
 *            verifies it there (header, key, every segment's checksum: the client may change its
 *            staging region at any moment) and only then makes it visible.
 *   SHM_GET  copies each object under a read reference into the staging region, for clients that
 *            may not map the arena (tenants): they read their own namespaces' bytes and nothing
 *            else.
 * With the arena mapped, gets use RDMA_GET and RDMA_RELEASE's leased descriptors and the client
 * copies the objects out itself (one copy instead of two).
 *
 * Isolation: the arena's memfd is sealed against growing, shrinking and any later writable
 * mapping (F_SEAL_FUTURE_WRITE), and is passed opened read-only, so that a client can neither
 * write through it, remap it writable, nor reopen it writable through /proc. A staging region is
 * sealed against resizing, so that a client cannot make the node's copies fault.
 */
#define _GNU_SOURCE
#include "server_int.h"

#include "kvf/error.h"
#include "kvf/object.h"

#include "bytes.h"
#include "cache.h"
#include "objcopy.h"
#include "unixsock.h"
#include "cpus.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAP_REQ_LEN   16u
#define MAP_REPLY_LEN 32u
#define SHM_ITEM_LEN  32u
/* A SHM_PUT of fewer bytes is copied by its loop alone: handing it out costs more than it saves. */
#define PARALLEL_MIN_BYTES (1u << 20)

int kvf__shm_arena_granted(const conn *c)
{
    const kvf_server *s = c->lp->srv;
    return s->arena_fd >= 0 && (!s->o.tenants || c->role == KVF_ROLE_ADMIN);
}

void kvf__shm_conn_free(conn *c)
{
    if (!c->stg_map)
        return;
    /* The pages go with the connection: a client that keeps its descriptor after the connection
     * closed would otherwise keep them in memory (the node's, which wrote them) beyond
     * --shm-staging-total. It then reads zeros there. */
    (void)madvise(c->stg_map, c->stg_len, MADV_REMOVE);
    munmap(c->stg_map, c->stg_len);
    atomic_fetch_sub(&c->lp->srv->shm_staging_bytes, c->stg_len);
    c->stg_map = NULL;
    c->stg_len = 0;
}

/* A staging region of len bytes: a sealed memfd mapped into this process. Returns its descriptor
 * (the caller passes it and closes it) or a negative KVF_E* code. */
static int stage_new(conn *c, uint64_t len)
{
    int fd = memfd_create("kvf-staging", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return kvf_err_from_errno(errno);
    if (ftruncate(fd, (off_t)len) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
        int rc = kvf_err_from_errno(errno);
        close(fd);
        return rc;
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        close(fd);
        return KVF_ENOMEM;
    }
    c->stg_map = p;
    c->stg_len = len;
    return fd;
}

void kvf__req_shm_map(conn *c)
{
    kvf_server *s = c->lp->srv;
    uint64_t want = kvf__get_u64(c->rbuf);
    uint32_t flags = kvf__get_u32(c->rbuf + 8);
    if (!c->is_unix) {
        kvf__reply_error(c, KVF_ENOTSUP, 0,
                         "shared memory is served on the node's Unix socket only (%s)",
                         s->shm_name[0] ? s->shm_name : "this node has none");
        return;
    }
    if (c->stg_map || c->shm_arena) {
        kvf__reply_error(c, KVF_EINVAL, 0, "this connection has mapped its memory already");
        return;
    }
    if (c->oh || c->pending_jobs) {
        kvf__reply_error(c, KVF_EBUSY, 0,
                         "SHM_MAP must be the only request in flight on its connection");
        return;
    }
    if (want > s->o.shm_staging_max) {
        kvf__reply_error(c, KVF_E2BIG, 0,
                         "a staging region of %" PRIu64
                         " bytes exceeds the node's limit of %" PRIu64,
                         want, s->o.shm_staging_max);
        return;
    }
    want = (want + 4095) & ~(uint64_t)4095;
    if (want) {
        uint64_t now = atomic_fetch_add(&s->shm_staging_bytes, want) + want;
        if (now > s->o.shm_staging_total) {
            atomic_fetch_sub(&s->shm_staging_bytes, want);
            kvf__reply_error(c, KVF_ENOMEM, 0,
                             "the node's staging regions would exceed %" PRIu64
                             " bytes (--shm-staging-total)",
                             s->o.shm_staging_total);
            return;
        }
    }
    int fds[2], nfd = 0;
    if (want) {
        int fd = stage_new(c, want);
        if (fd < 0) {
            atomic_fetch_sub(&s->shm_staging_bytes, want);
            kvf__reply_error(c, fd, 0, "cannot make a staging region of %" PRIu64 " bytes: %s",
                             want, kvf_strerror(fd));
            return;
        }
        fds[nfd++] = fd;
    }
    int arena = (flags & KVF_SHM_MAP_ARENA) && kvf__shm_arena_granted(c);
    if (arena)
        fds[nfd++] = s->arena_fd;
    uint8_t msg[KVF_WIRE_HEADER_LEN + MAP_REPLY_LEN];
    uint8_t *r = msg + KVF_WIRE_HEADER_LEN;
    kvf__reply_hdr(msg, &c->h, 0, 0, 0, MAP_REPLY_LEN);
    kvf__put_u64(r, arena ? (uint64_t)(uintptr_t)kvf__cache_base(s->o.cache) : 0);
    kvf__put_u64(r + 8, arena ? kvf__cache_mem_size(s->o.cache) : 0);
    kvf__put_u64(r + 16, c->stg_len);
    kvf__put_u32(r + 24, arena ? KVF_SHM_MAP_ARENA : 0);
    kvf__put_u32(r + 28, 0);
    int rc = nfd ? kvf__unix_send_fds(c->fd, msg, sizeof msg, fds, nfd) : KVF_EINVAL;
    if (want)
        close(fds[0]);
    if (!nfd) {
        kvf__reply_copy(c, 0, 0, 0, r, MAP_REPLY_LEN);
        return;
    }
    if (rc) {
        /* The reply and its descriptors could not go as one message: nothing else can follow. */
        kvf__reply_error(c, rc, 1, "cannot send the mapping: %s", kvf_strerror(rc));
        return;
    }
    atomic_fetch_add(&s->bytes_out, sizeof msg);
    atomic_fetch_add(&s->shm_maps, 1);
    c->shm_arena = arena;
}

/* The staging range [off, off + len) of c, or NULL when it is not all inside. */
static uint8_t *stage_at(const conn *c, uint64_t off, uint64_t len)
{
    if (!c->stg_map || off > c->stg_len || len > c->stg_len - off)
        return NULL;
    return c->stg_map + off;
}

static int no_stage(conn *c)
{
    if (c->stg_map)
        return 0;
    kvf__reply_error(c, KVF_EINVAL, 0, "no staging region: SHM_MAP one on this connection first");
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* The copiers: threads that share a large SHM_PUT's copying with the loop that serves it */

/* One piece of a batch: segments [from, to) of object `item`, starting at byte off. */
typedef struct copy_task {
    uint32_t item, from, to;
    uint64_t off;
} copy_task;

/* A SHM_PUT's copying: every task runs once, on the loop's thread or a copier's; a task whose
 * segments fail verification marks its object failed. */
typedef struct kvf__copy_batch {
    struct kvf__copy_batch *next;
    copy_task *t;
    size_t n;
    uint8_t **dst;
    const uint8_t **src;
    const kvf_obj_info *info;
    atomic_int *failed;
    atomic_size_t claimed, done;
    int users; /* copiers holding it, under the copiers' mu: it lives on its loop's stack until
                * the last of them lets it go */
} copy_batch;

struct kvf__copiers {
    pthread_mutex_t mu;
    pthread_cond_t work, finished;
    copy_batch *head; /* batches with tasks not yet claimed */
    int stop, n;
    pthread_t th[KVF_SHM_COPIERS_MAX];
};

static void unlink_batch_locked(kvf__copiers *cp, copy_batch *b)
{
    for (copy_batch **pp = &cp->head; *pp; pp = &(*pp)->next)
        if (*pp == b) {
            *pp = b->next;
            return;
        }
}

/* Runs b's tasks until none is left to claim; the last to finish wakes the loop waiting on b. */
static void run_tasks(kvf__copiers *cp, copy_batch *b)
{
    size_t i;
    while ((i = atomic_fetch_add(&b->claimed, 1)) < b->n) {
        const copy_task *t = &b->t[i];
        if (kvf__obj_copy_segs(b->dst[t->item], b->src[t->item], &b->info[t->item], t->from, t->to,
                               t->off) != 0)
            atomic_store(&b->failed[t->item], 1);
        if (atomic_fetch_add(&b->done, 1) + 1 == b->n && cp) {
            pthread_mutex_lock(&cp->mu);
            pthread_cond_broadcast(&cp->finished);
            pthread_mutex_unlock(&cp->mu);
        }
    }
}

static void *copier_main(void *arg)
{
    kvf__copiers *cp = arg;
    pthread_mutex_lock(&cp->mu);
    while (!cp->stop) {
        copy_batch *b = cp->head;
        if (!b) {
            pthread_cond_wait(&cp->work, &cp->mu);
            continue;
        }
        b->users++;
        pthread_mutex_unlock(&cp->mu);
        run_tasks(cp, b);
        pthread_mutex_lock(&cp->mu);
        unlink_batch_locked(cp, b); /* every task claimed: nothing left for anyone here */
        if (--b->users == 0)
            pthread_cond_broadcast(&cp->finished);
    }
    pthread_mutex_unlock(&cp->mu);
    return NULL;
}

int kvf__copiers_open(kvf_server *s, int n)
{
    s->copiers = NULL;
    if (n <= 0)
        return 0;
    kvf__copiers *cp = calloc(1, sizeof *cp);
    if (!cp)
        return KVF_ENOMEM;
    pthread_mutex_init(&cp->mu, NULL);
    pthread_cond_init(&cp->work, NULL);
    pthread_cond_init(&cp->finished, NULL);
    n = n < KVF_SHM_COPIERS_MAX ? n : KVF_SHM_COPIERS_MAX;
    for (int i = 0; i < n; i++) {
        if (kvf__thread_start(&cp->th[i], copier_main, cp) != 0)
            break;
        cp->n++;
    }
    s->copiers = cp;
    return 0;
}

void kvf__copiers_close(kvf_server *s)
{
    kvf__copiers *cp = s->copiers;
    if (!cp)
        return;
    pthread_mutex_lock(&cp->mu);
    cp->stop = 1;
    pthread_cond_broadcast(&cp->work);
    pthread_mutex_unlock(&cp->mu);
    for (int i = 0; i < cp->n; i++)
        pthread_join(cp->th[i], NULL);
    pthread_cond_destroy(&cp->work);
    pthread_cond_destroy(&cp->finished);
    pthread_mutex_destroy(&cp->mu);
    free(cp);
    s->copiers = NULL;
}

/* Runs b: with the copiers where it is worth it (they and this thread take tasks in turn, and this
 * thread waits for the last), else here alone. */
static void run_batch(kvf__copiers *cp, copy_batch *b, uint64_t bytes)
{
    if (!cp || cp->n == 0 || b->n < 2 || bytes < PARALLEL_MIN_BYTES) {
        run_tasks(NULL, b);
        return;
    }
    pthread_mutex_lock(&cp->mu);
    b->next = cp->head;
    cp->head = b;
    pthread_cond_broadcast(&cp->work);
    pthread_mutex_unlock(&cp->mu);
    run_tasks(cp, b);
    pthread_mutex_lock(&cp->mu);
    unlink_batch_locked(cp, b);
    while (atomic_load(&b->done) < b->n || b->users > 0)
        pthread_cond_wait(&cp->finished, &cp->mu);
    pthread_mutex_unlock(&cp->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* SHM_PUT */

/* What SHM_PUT holds for its n items while they are copied. */
typedef struct put_items {
    uint32_t *eid;
    uint8_t **dst;
    const uint8_t **src;
    kvf_obj_info *info;
    atomic_int *failed;
    int32_t *st;
    copy_task *t;
} put_items;

static void put_items_free(put_items *p)
{
    free(p->eid), free(p->dst), free(p->src), free(p->info), free(p->failed), free(p->t);
}

/* Reserves a block for item i and copies the object's header into it (parsed there, its length
 * checked). *st gets the error that ends the item, if any; 1 when it goes on. */
static int put_begin(conn *c, uint64_t ns, uint32_t i, put_items *p)
{
    kvf_server *s = c->lp->srv;
    const uint8_t *it = c->rbuf + 8 + SHM_ITEM_LEN * (size_t)i;
    kvf_key key = kvf__wire_key_get(it);
    uint64_t off = kvf__get_u64(it + 16), len = kvf__get_u64(it + 24);
    const uint8_t *src = stage_at(c, off, len);
    if (!src || len == 0) {
        p->st[i] = KVF_ERANGE;
        return 0;
    }
    if (len > s->o.max_request) {
        p->st[i] = KVF_E2BIG;
        return 0;
    }
    kvf__cache_lock(s->o.cache);
    int rc = kvf__cache_reserve_locked(s->o.cache, ns, &key, len, c->id, kvf__conn_tenant(c),
                                       KVF_CACHE_VIA_WIRE, 1, &p->eid[i], &p->dst[i]);
    kvf__cache_unlock(s->o.cache);
    if (!rc) {
        rc = kvf__obj_copy_header(p->dst[i], src, len, &p->info[i]);
        if (!rc && !kvf_key_eq(&key, &p->info[i].key))
            rc = KVF_EPROTO;
        if (rc) {
            kvf__cache_lock(s->o.cache);
            kvf__cache_abort_locked(s->o.cache, p->eid[i], c->id);
            kvf__cache_unlock(s->o.cache);
        }
    }
    p->st[i] = rc;
    p->src[i] = src;
    return rc == 0;
}

void kvf__req_shm_put(conn *c)
{
    kvf_server *s = c->lp->srv;
    if (no_stage(c))
        return;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    /* A request moves at most its staging region's worth: items may not add up to more (they
     * could overlap and make one region reserve and copy the arena many times over). */
    uint64_t sum = 0;
    for (uint32_t i = 0; i < n && sum <= c->stg_len; i++)
        sum += kvf__get_u64(c->rbuf + 8 + SHM_ITEM_LEN * (size_t)i + 24) > c->stg_len
                   ? c->stg_len + 1
                   : kvf__get_u64(c->rbuf + 8 + SHM_ITEM_LEN * (size_t)i + 24);
    if (sum > c->stg_len) {
        kvf__reply_error(c, KVF_E2BIG, 0,
                         "the items' lengths add up to more than the staging region (%" PRIu64
                         " bytes)",
                         c->stg_len);
        return;
    }
    int threads = 1 + (s->copiers ? s->copiers->n : 0);
    put_items p = {
        .eid = malloc((size_t)n * sizeof *p.eid),
        .dst = malloc((size_t)n * sizeof *p.dst),
        .src = malloc((size_t)n * sizeof *p.src),
        .info = malloc((size_t)n * sizeof *p.info),
        .failed = calloc(n, sizeof *p.failed),
        .st = malloc((size_t)n * 4),
    };
    if (!p.eid || !p.dst || !p.src || !p.info || !p.failed || !p.st) {
        put_items_free(&p);
        free(p.st);
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    /* Blocks reserved and headers in: the segments are what takes the time. */
    uint32_t ok = 0;
    uint64_t bytes = 0, segs = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (put_begin(c, ns, i, &p)) {
            ok++;
            bytes += p.info[i].stored_bytes;
            segs += p.info[i].layers;
        }
    }
    /* Copied, then verified where it lies: what the client changes in its staging region after
     * the copy cannot reach the block, and what it changed during it fails here. Work is split
     * by object where there are enough of them for every thread, else by segment. */
    int by_seg = ok < 4u * (uint32_t)threads && segs <= 65536;
    size_t nt = by_seg ? segs : ok;
    p.t = malloc((nt ? nt : 1) * sizeof *p.t);
    if (!p.t) {
        for (uint32_t i = 0; i < n; i++)
            if (p.st[i] == 0) {
                atomic_store(&p.failed[i], 1);
                p.st[i] = KVF_ENOMEM;
            }
        nt = 0;
    }
    size_t k = 0;
    for (uint32_t i = 0; p.t && i < n; i++) {
        if (p.st[i])
            continue;
        if (!by_seg) {
            p.t[k++] = (copy_task){
                .item = i, .from = 0, .to = p.info[i].layers, .off = p.info[i].header_len};
            continue;
        }
        uint64_t off = p.info[i].header_len;
        for (uint32_t l = 0; l < p.info[i].layers; l++) {
            p.t[k++] = (copy_task){.item = i, .from = l, .to = l + 1, .off = off};
            off += kvf_obj_seg_at(&p.info[i], l).stored_len;
        }
    }
    copy_batch b = {
        .t = p.t, .n = k, .dst = p.dst, .src = p.src, .info = p.info, .failed = p.failed};
    atomic_init(&b.claimed, 0);
    atomic_init(&b.done, 0);
    if (k)
        run_batch(s->copiers, &b, bytes);
    uint64_t stored = 0;
    kvf__cache_lock(s->o.cache);
    for (uint32_t i = 0; i < n; i++) {
        if (p.st[i] == KVF_ENOMEM && atomic_load(&p.failed[i])) {
            kvf__cache_abort_locked(s->o.cache, p.eid[i], c->id);
            continue;
        }
        if (p.st[i])
            continue;
        if (atomic_load(&p.failed[i])) {
            kvf__cache_abort_locked(s->o.cache, p.eid[i], c->id);
            p.st[i] = KVF_ECHECKSUM;
        } else {
            p.st[i] = kvf__cache_commit_locked(s->o.cache, p.eid[i], c->id);
            stored += p.st[i] ? 0 : p.info[i].header_len + p.info[i].stored_bytes;
        }
    }
    kvf__cache_unlock(s->o.cache);
    atomic_fetch_add(&s->shm_put_bytes, stored);
    int32_t *st = p.st;
    put_items_free(&p);
    kvf__reply_statuses(c, st, n);
}

void kvf__req_shm_get(conn *c)
{
    kvf_server *s = c->lp->srv;
    if (no_stage(c))
        return;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    uint8_t *r = malloc(16 * (size_t)n);
    if (!r) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    /* A request moves at most its staging region's worth, as SHM_PUT's: items naming one large
     * object many times over (overlapping regions) would hold the loop for one copy each. An item
     * that would pass it is E2BIG (a client's distinct regions never get there). */
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *it = c->rbuf + 8 + SHM_ITEM_LEN * (size_t)i;
        kvf_key key = kvf__wire_key_get(it);
        uint64_t off = kvf__get_u64(it + 16), cap = kvf__get_u64(it + 24);
        uint8_t *dst = stage_at(c, off, cap);
        uint64_t len = 0;
        int rc = dst ? 0 : KVF_ERANGE;
        if (!rc) {
            uint32_t eid;
            const uint8_t *p;
            kvf__cache_lock(s->o.cache);
            rc = kvf__cache_acquire_locked(s->o.cache, ns, &key, &eid, &p, &len);
            kvf__cache_unlock(s->o.cache);
            if (!rc) {
                /* Under the reference the block stays as it is, evicted or not. */
                if (len <= cap && len <= c->stg_len - bytes)
                    memcpy(dst, p, len);
                else
                    rc = KVF_E2BIG;
                kvf__cache_lock(s->o.cache);
                kvf__cache_release_locked(s->o.cache, eid);
                kvf__cache_unlock(s->o.cache);
            }
        }
        kvf__put_u32(r + 16 * (size_t)i, (uint32_t)rc);
        kvf__put_u32(r + 16 * (size_t)i + 4, 0);
        kvf__put_u64(r + 16 * (size_t)i + 8, len);
        bytes += rc ? 0 : len;
    }
    atomic_fetch_add(&s->shm_get_bytes, bytes);
    kvf__reply_copy(c, 0, 0, n, r, 16 * (size_t)n);
    free(r);
}
