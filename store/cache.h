/*
 * The storage node's cache: the arena, the index of (namespace, key) -> entry, entry states,
 * read references, pins with leases, and eviction. docs/store.md gives the design and its reasons.
 *
 * Entry states: reserved (being written, invisible) -> ready (visible) -> gone (unlinked; its
 * block is freed when the last reference drops). Eviction takes only ready entries that have no
 * reference and no pin whose lease is still running; reserved entries are never in an eviction
 * queue.
 *
 * Locking: one mutex guards everything here. Functions named *_locked must be called with it held
 * (kvf__cache_lock); they assert it. Data is copied into or out of entries outside the lock: a
 * reservation (held by its writer) or a reference keeps the block in place meanwhile. Lock order:
 * the cache lock is taken last, after any lock of a connection or event loop.
 */
#ifndef KVF_STORE_CACHE_H
#define KVF_STORE_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"

#include "clock.h"

typedef struct kvf_cache kvf_cache;

#define KVF_CACHE_NONE UINT32_MAX
/* Tenants whose use of the arena is counted and bounded (index 0 is nobody's). */
#define KVF_CACHE_MAX_TENANTS 4096u

typedef struct kvf_cache_opts {
    uint64_t memory;        /* arena bytes */
    uint32_t max_entries;   /* 0: memory / 16 KiB, at least 1024 */
    const char *evict;      /* "lru" (default) or "s3fifo" */
    const kvf_clock *clock; /* NULL: the monotonic clock */
    uint32_t reserve_ms;    /* how long an admitted, unwritten reservation lives; 0: 30 s */
    int prefault;           /* touch every arena page at start, so RSS is taken up front */
    int lock_memory;        /* mlock the arena (RDMA registration wants it) */
    /* The arena is a memfd (sealed against resizing and later writable mappings) that read-only
     * views can be handed out of, to clients on this host (docs/shm.md); else anonymous memory.
     * hugepages: the memfd on huge pages (hugetlbfs; the size is rounded up to 2 MiB). */
    int shared, hugepages;
    /* Called under the cache's lock when an entry becomes readable (admitted 1) and when a
     * readable one leaves (0: evicted, removed, cleared, demoted), with the tenant it is charged
     * to (0: nobody); disk is always 0 (the DRAM tier's changes; the disk tier calls the same
     * hook with 1 for its own). Must be quick. May be NULL. */
    void (*on_change)(void *ctx, int admitted, int disk, const kvf_key *key, uint32_t tenant);
    void *on_change_ctx;
} kvf_cache_opts;

typedef struct kvf_cache_stats {
    uint64_t memory, used, free, free_blocks;
    uint64_t entries, ready_bytes, reserved, pinned, referenced;
    uint64_t max_entries;
    uint64_t hits, misses, puts, duplicates, evictions, removed, rejected_full;
    uint64_t expired_pins, expired_reservations, cleared;
    const char *policy;
} kvf_cache_stats;

/* Caller owns the result; free with kvf__cache_close(). err gets one line on failure. */
int kvf__cache_open(kvf_cache **out, const kvf_cache_opts *opts, char *err, size_t errlen);
void kvf__cache_close(kvf_cache **c);

void kvf__cache_lock(kvf_cache *c);
void kvf__cache_unlock(kvf_cache *c);

/* The arena's base address: entry data lives at base + offset. */
uint8_t *kvf__cache_base(kvf_cache *c);
/* The arena's length in bytes. */
uint64_t kvf__cache_mem_size(const kvf_cache *c);
/* The shared arena's memfd, sealed so that a read-only view of it stays read-only; -1 for an
 * anonymous arena or where the kernel cannot seal it so. Borrowed; valid until the cache closes. */
int kvf__cache_arena_fd(const kvf_cache *c);

/* How a reservation's bytes are written: through the connection that made it (PUT, or ADMIT then
 * COMMIT: the node reads every byte into the block itself), or by the client's one-sided RDMA
 * WRITEs (RDMA_RESERVE then RDMA_COMMIT: the node cannot see which bytes arrived). A reservation is
 * claimed only the way it was made, so bytes a block kept from an earlier object can never become
 * visible without a write: a wire reservation is filled by the node's own reads, and an RDMA one
 * has its header cleared when it is made, so that unwritten it fails verification. */
enum { KVF_CACHE_VIA_WIRE = 0, KVF_CACHE_VIA_RDMA = 1 };

/* Reserves len bytes for (ns, key) on behalf of owner, to be written `via` a KVF_CACHE_VIA_*,
 * evicting as needed, and charged to tenant (0: nobody; else < KVF_CACHE_MAX_TENANTS): a tenant
 * over its byte quota first evicts its own oldest entries, never another's. The reservation is
 * invisible to readers until committed. With hold, the caller also holds it (it is being written
 * now and cannot expire) and must drop that hold with kvf__cache_commit_locked or
 * kvf__cache_abort_locked. Returns 0 with *eid and *dst, KVF_EEXIST when the key is ready or
 * reserved already, KVF_E2BIG when len exceeds the arena, KVF_ENOSPC when nothing evictable makes
 * room, KVF_EQUOTA when the tenant's quotas (its outstanding reservations, or its bytes with
 * nothing of its own left to evict) refuse it. */
int kvf__cache_reserve_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t len,
                              uint64_t owner, uint32_t tenant, int via, int hold, uint32_t *eid,
                              uint8_t **dst);
/* Finds owner's un-held reservation of (ns, key), made to be written `via`, and holds it for
 * writing. Returns 0, KVF_ENOENT (none: expired, aborted, another owner's, or made the other
 * way), or KVF_EINVAL when len differs. */
int kvf__cache_claim_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t len,
                            uint64_t owner, int via, uint32_t *eid, uint8_t **dst);
/* Written in parts (WRITE and SEAL, docs/protocol.md): holds owner's un-held wire reservation of
 * (ns, key) to write len bytes at offset (*dst is where they go): the first part sets where the
 * parts begin (offset > 0, below 4 GiB: the object's head is left to the seal) and each next one
 * must begin where the last ended, all within the reservation. Then kvf__cache_part_end_locked.
 * *wseq says which reservation the parts belong to (a slot's reservations differ in it), for the
 * caller's records of them. Returns 0, KVF_ENOENT (no such reservation), or KVF_EINVAL for a part
 * out of order or out of bounds, which drops the reservation. */
int kvf__cache_part_begin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t owner,
                                 uint64_t offset, uint64_t len, uint32_t *eid, uint8_t **dst,
                                 uint32_t *wseq);
/* The part held by kvf__cache_part_begin_locked is in: the next begins after it; the hold is
 * dropped and the reservation's expiry starts again, up to 8 expiries after its first part. */
void kvf__cache_part_end_locked(kvf_cache *c, uint32_t eid, uint64_t owner);
/* SEAL: holds owner's un-held wire reservation of (ns, key) to write its head, head_len bytes
 * at offset 0 (*dst; the whole object is *obj_len bytes), once its parts covered the rest: the
 * offset must be 0, head_len where they began, and they must reach the end. Then
 * kvf__cache_commit_locked or kvf__cache_abort_locked. head_len 0 at offset 0 drops the
 * reservation instead (returns 0 with *eid UINT32_MAX). Returns 0, KVF_ENOENT, or KVF_EINVAL
 * (dropped) for a seal that breaks those rules. */
int kvf__cache_seal_begin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t owner,
                                 uint64_t offset, uint64_t head_len, uint32_t *eid, uint8_t **dst,
                                 uint64_t *obj_len, uint32_t *wseq);
/* Makes a held reservation visible. Returns 0, or KVF_ENOENT when it is no longer owner's. */
int kvf__cache_commit_locked(kvf_cache *c, uint32_t eid, uint64_t owner);
/* Drops a reservation (held or not) of owner's and frees its block. */
void kvf__cache_abort_locked(kvf_cache *c, uint32_t eid, uint64_t owner);
/* Drops every reservation of owner's that is not held (a connection that went away). */
void kvf__cache_abort_owner_locked(kvf_cache *c, uint64_t owner);

/* Takes a read reference on a ready entry and counts a hit (or a miss). Returns 0 with data and
 * length, or KVF_ENOENT. The block stays in place until kvf__cache_release_locked. */
int kvf__cache_acquire_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint32_t *eid,
                              const uint8_t **data, uint64_t *len);
void kvf__cache_release_locked(kvf_cache *c, uint32_t eid);

/* Whether (ns, key) is ready; counts nothing. */
int kvf__cache_contains_locked(kvf_cache *c, uint64_t ns, const kvf_key *key);
/* Removes a ready entry: 0, KVF_ENOENT, or KVF_EBUSY while a pin's lease runs. A referenced entry
 * is unlinked now and freed when its last reader is done. */
/* Calls fn for every readable entry, with the tenant it is charged to (a snapshot of what the
 * node's events describe). fn must be quick: the cache's lock is held. */
void kvf__cache_each_locked(kvf_cache *c, void (*fn)(void *ud, const kvf_key *key, uint32_t tenant),
                            void *ud);
int kvf__cache_remove_locked(kvf_cache *c, uint64_t ns, const kvf_key *key);
/* Adds a pin and extends the lease to at least now + lease_ms. 0 or KVF_ENOENT. */
int kvf__cache_pin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint32_t lease_ms);
/* Drops one pin. 0, KVF_ENOENT, or KVF_EINVAL when the entry holds no pin. */
int kvf__cache_unpin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key);
/* Removes every ready entry of ns (of every namespace with all), pinned ones too. Reservations
 * are left to complete. Returns the number removed. */
uint64_t kvf__cache_clear_locked(kvf_cache *c, uint64_t ns, int all);

/* Replaces the data of a ready entry that the caller holds the only reference to: reserves a new
 * block of len bytes (evicting others as needed). The caller copies into *dst outside the lock and
 * then calls kvf__cache_swap_locked. */
int kvf__cache_swap_begin_locked(kvf_cache *c, uint32_t eid, uint64_t len, uint64_t *newoff,
                                 uint8_t **dst);
/* Points the entry at the new block and frees the old one. KVF_EBUSY (new block freed) when the
 * entry was removed or gained readers meanwhile. */
int kvf__cache_swap_locked(kvf_cache *c, uint32_t eid, uint64_t newoff, uint64_t len);

/* Background maintenance in bounded steps: expires pins whose lease ended and reservations nobody
 * wrote in time, looking at no more than max_steps entries per call. */
void kvf__cache_tick_locked(kvf_cache *c, uint32_t max_steps);

void kvf__cache_stats_locked(kvf_cache *c, kvf_cache_stats *st);

/* A tenant's use of the arena and its quotas. */
typedef struct kvf_cache_tenant_stats {
    uint64_t bytes, entries, reserved, max_bytes, max_reserved, quota_evictions, quota_rejected;
} kvf_cache_tenant_stats;
/* Sets tenant's quotas (0: none): the bytes its entries may hold and its reservations not yet
 * committed. Lowering a quota evicts nothing now; the tenant's next reservations make room. */
void kvf__cache_quota_set_locked(kvf_cache *c, uint32_t tenant, uint64_t max_bytes,
                                 uint32_t max_reserved);
void kvf__cache_tenant_stats_locked(kvf_cache *c, uint32_t tenant, kvf_cache_tenant_stats *st);
/* The disk tier's hook into eviction: called under the cache's lock for every ready entry evicted
 * to make room (by the policy or a tenant's quota; not for EVICT or CLEAR, and not for an entry
 * marked on disk), with its bytes, its reads since it became ready and its tenant. Returning 1
 * takes a read reference on the entry (eid), so that its block stays in place, out of the index,
 * until the hook's owner drops it with kvf__cache_release_locked; 0 lets it go. Either way
 * on_change is told that the entry left DRAM (the disk tier tells when it is on disk). Must be
 * quick: it may queue, never copy or wait. fn NULL: none. */
typedef int (*kvf_cache_evict_hook)(void *ctx, uint32_t eid, uint64_t ns, const kvf_key *key,
                                    const uint8_t *data, uint64_t len, uint32_t hits,
                                    uint32_t tenant);
void kvf__cache_set_evict_hook(kvf_cache *c, kvf_cache_evict_hook fn, void *ctx);
/* The disk tier's write-through hook: called (as the eviction hook, under the cache's lock) for a
 * ready entry that is neither on disk nor queued for it when it is pinned (pinned 1) or is read
 * for the hits-th time (hits 0: never). Returning 1 takes a read reference and marks it queued:
 * its eviction then demotes nothing; the hook's owner ends it with
 * kvf__cache_write_through_done_locked and kvf__cache_release_locked. fn NULL: none. */
void kvf__cache_set_write_through_hook(kvf_cache *c, kvf_cache_evict_hook fn, void *ctx,
                                       uint32_t hits, int pinned);
/* How the cache checks, before it trusts an entry's on-disk mark (at its eviction, at a pin), that
 * the disk tier still holds it: fn (called under the cache's lock; it must never wait on I/O).
 * NULL: the mark is trusted. */
void kvf__cache_set_disk_check(kvf_cache *c, int (*fn)(void *ctx, uint64_t ns, const kvf_key *key),
                               void *ctx);
/* A promotion served and not to be kept: ready entry eid leaves the index (told as a DRAM
 * eviction; its bytes live on for the references still held) unless it is pinned or was read more
 * than max_hits times. Returns 1 if it left. */
int kvf__cache_unpromote_locked(kvf_cache *c, uint32_t eid, uint32_t max_hits);
/* A queued write-through ended: the entry is marked on disk where it was written (if still
 * readable), and can be demoted again where it was not. */
void kvf__cache_write_through_done_locked(kvf_cache *c, uint32_t eid, int written);
/* The replication hook (replicate.c): called as the eviction hook, under the cache's lock, for a
 * ready entry read for the hits-th time (and at later reads while it has no replica queued or
 * made; hits 0: never; at most 255). Returning 1 takes a read reference and marks a replica
 * queued; the hook's owner ends it with kvf__cache_replicate_done_locked (made 0: asked for again
 * at a later read) and kvf__cache_release_locked. fn NULL: none. */
void kvf__cache_set_replicate_hook(kvf_cache *c, kvf_cache_evict_hook fn, void *ctx, uint32_t hits);
void kvf__cache_replicate_done_locked(kvf_cache *c, uint32_t eid, int made);
/* Takes one more read reference on ready entry eid, counting no hit. 0 or KVF_ENOENT. */
int kvf__cache_hold_locked(kvf_cache *c, uint32_t eid);
/* Takes a read reference on (ns, key)'s ready entry, counting no hit: 0 with its eid (to release
 * with kvf__cache_release_locked), or KVF_ENOENT. */
int kvf__cache_hold_key_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint32_t *eid);
/* Marks ready entry eid as held by the disk tier too (promoted from it, or written to it), so
 * that its eviction demotes nothing. */
void kvf__cache_mark_on_disk_locked(kvf_cache *c, uint32_t eid);

/* Full consistency check (index, lists, arena). For tests; O(entries). Returns 0 or -1. */
int kvf__cache_check_locked(kvf_cache *c);

#endif
