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
#include "unixsock.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAP_REQ_LEN   16u
#define MAP_REPLY_LEN 32u
#define SHM_ITEM_LEN  32u

int kvf__shm_arena_granted(const conn *c)
{
    const kvf_server *s = c->lp->srv;
    return s->arena_fd >= 0 && (!s->o.tenants || c->role == KVF_ROLE_ADMIN);
}

void kvf__shm_conn_free(conn *c)
{
    if (!c->stg_map)
        return;
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
    if (c->oh) {
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

void kvf__req_shm_put(conn *c)
{
    kvf_server *s = c->lp->srv;
    if (no_stage(c))
        return;
    uint32_t n = c->h.item_count;
    uint64_t ns = kvf__get_u64(c->rbuf);
    int32_t *st = malloc((size_t)n * 4);
    if (!st) {
        kvf__reply_error(c, KVF_ENOMEM, 0, "out of memory");
        return;
    }
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *it = c->rbuf + 8 + SHM_ITEM_LEN * (size_t)i;
        kvf_key key = kvf__wire_key_get(it);
        uint64_t off = kvf__get_u64(it + 16), len = kvf__get_u64(it + 24);
        const uint8_t *src = stage_at(c, off, len);
        if (!src || len == 0) {
            st[i] = KVF_ERANGE;
            continue;
        }
        if (len > s->o.max_request) {
            st[i] = KVF_E2BIG;
            continue;
        }
        uint32_t eid;
        uint8_t *dst;
        kvf__cache_lock(s->o.cache);
        int rc = kvf__cache_reserve_locked(s->o.cache, ns, &key, len, c->id, kvf__conn_tenant(c),
                                           KVF_CACHE_VIA_WIRE, 1, &eid, &dst);
        kvf__cache_unlock(s->o.cache);
        if (rc) {
            st[i] = rc;
            continue;
        }
        /* Copied, then verified where it lies: what the client changes in its staging region
         * after the copy cannot reach the block, and what it changed during it fails here. */
        memcpy(dst, src, len);
        kvf_obj_info info;
        rc = kvf_obj_verify(dst, len, &info);
        if (!rc && !kvf_key_eq(&key, &info.key))
            rc = KVF_EPROTO;
        kvf__cache_lock(s->o.cache);
        if (rc)
            kvf__cache_abort_locked(s->o.cache, eid, c->id);
        else
            rc = kvf__cache_commit_locked(s->o.cache, eid, c->id);
        kvf__cache_unlock(s->o.cache);
        st[i] = rc;
        bytes += rc ? 0 : len;
    }
    atomic_fetch_add(&s->shm_put_bytes, bytes);
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
                if (len <= cap)
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
