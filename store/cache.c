/*
 * The cache: an open-addressing index (linear probing with backward-shift deletion, Knuth TAOCP
 * vol. 3, 6.4, algorithm R) over a preallocated entry array, the TLSF arena, and eviction policies
 * behind an ops table (cache_policy.c: lru and s3fifo; the shared insides in cache_int.h).
 * Nothing here allocates after kvf__cache_open().
 */
#define _GNU_SOURCE
#include "cache_int.h"

#include "kvf/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Index */

static uint64_t hash_of(uint64_t ns, const kvf_key *k)
{
    uint64_t h = k->lo ^ (k->hi * 0xC2B2AE3D27D4EB4Full) ^ (ns * 0x9E3779B97F4A7C15ull);
    h ^= h >> 31;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    return h;
}

/* Returns the slot holding (ns, key), or the empty slot where it would go (*found 0). */
static uint64_t slot_find(const kvf_cache *c, uint64_t ns, const kvf_key *k, int *found)
{
    uint64_t s = hash_of(ns, k) & c->mask;
    for (;;) {
        uint32_t v = c->table[s];
        if (v == 0) {
            *found = 0;
            return s;
        }
        const entry *x = &c->e[v - 1];
        if (x->ns == ns && kvf_key_eq(&x->key, k)) {
            *found = 1;
            return s;
        }
        s = (s + 1) & c->mask;
    }
}

static void slot_delete(kvf_cache *c, uint64_t i)
{
    uint64_t j = i;
    for (;;) {
        j = (j + 1) & c->mask;
        uint32_t v = c->table[j];
        if (v == 0)
            break;
        const entry *x = &c->e[v - 1];
        uint64_t home = hash_of(x->ns, &x->key) & c->mask;
        /* Move v back into the hole unless its home lies cyclically in (i, j]. */
        int stays = (i <= j) ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            c->table[i] = v;
            i = j;
        }
    }
    c->table[i] = 0;
}

static uint32_t lookup(const kvf_cache *c, uint64_t ns, const kvf_key *k)
{
    int found;
    uint64_t s = slot_find(c, ns, k, &found);
    return found ? c->table[s] - 1 : NONE;
}

static void index_remove(kvf_cache *c, uint32_t i)
{
    int found;
    uint64_t s = slot_find(c, c->e[i].ns, &c->e[i].key, &found);
    assert(found && c->table[s] == i + 1);
    slot_delete(c, s);
}

/* ------------------------------------------------------------------------------------------ */
/* Entries */

static void entry_free(kvf_cache *c, uint32_t i)
{
    entry *x = &c->e[i];
    tenant_acct *ta = &c->tenants[x->tenant];
    ta->bytes -= x->len;
    ta->entries--;
    kvf__arena_free(c->arena, x->off);
    memset(x, 0, sizeof *x);
    x->state = ST_FREE;
    x->prev = NONE;
    x->next = c->free_head;
    c->free_head = i;
    c->st.entries--;
}

/* Unlinks a ready entry from the index and its queue; frees it now, or marks it gone for its last
 * reader to free. Told as a change of the DRAM tier (an entry demoted to disk is told again by the
 * disk tier once it is written there). */
static void entry_remove(kvf_cache *c, uint32_t i)
{
    entry *x = &c->e[i];
    assert(x->state == ST_READY);
    if (c->on_change)
        c->on_change(c->on_change_ctx, 0, 0, &x->key, x->tenant);
    c->policy->unlink(c, i);
    index_remove(c, i);
    c->st.ready_bytes -= x->len;
    if (x->pins)
        c->st.pinned--;
    x->pins = 0;
    if (x->refs) {
        x->state = ST_GONE;
        return;
    }
    entry_free(c, i);
}

/* Ready entry i became hot (pinned, or read hot_hits times): the write-through hook may take a
 * reference on it, to write a copy to the disk tier while it stays in DRAM. */
/* Whether entry i's on-disk mark still holds: the disk may have dropped its copy since (its
 * extent reused by the log, a read that did not verify); then the mark goes. */
static int still_on_disk(kvf_cache *c, uint32_t i)
{
    entry *x = &c->e[i];
    if (x->on_disk && c->disk_holds && !c->disk_holds(c->disk_holds_ctx, x->ns, &x->key))
        x->on_disk = 0;
    return x->on_disk;
}

static void maybe_write_through(kvf_cache *c, uint32_t i, int check_disk)
{
    entry *x = &c->e[i];
    if (!c->on_hot || x->wt || (check_disk ? still_on_disk(c, i) : x->on_disk))
        return;
    if (c->on_hot(c->on_hot_ctx, i, x->ns, &x->key, c->mem + x->off, x->len, x->hits, x->tenant)) {
        if (x->refs++ == 0)
            c->st.referenced++;
        x->wt = 1;
    }
}

/* Evicts ready entry i to make room: the eviction hook may take a reference on it first (to demote
 * its bytes to the disk tier), so that its block lives on, gone from the index, until released. */
static void evict_entry(kvf_cache *c, uint32_t i)
{
    entry *x = &c->e[i];
    if (c->on_evict && !x->wt && !still_on_disk(c, i) &&
        c->on_evict(c->on_evict_ctx, i, x->ns, &x->key, c->mem + x->off, x->len, x->hits,
                    x->tenant)) {
        if (x->refs++ == 0)
            c->st.referenced++;
    }
    entry_remove(c, i);
    c->st.evictions++;
}

static int evict_one(kvf_cache *c)
{
    uint32_t v;
    if (c->policy->victim(c, &v) != 0)
        return KVF_ENOSPC;
    evict_entry(c, v);
    return 0;
}

/* Evicts the oldest evictable entry of tenant t, in queue order (the small FIFO first, then the
 * main queue, each from its tail). A scan, bounded by the entries queued: only a tenant at its
 * quota pays it, and others' entries are never taken. 0, or KVF_EQUOTA when none can go. */
static int evict_tenant_one(kvf_cache *c, uint16_t t)
{
    uint64_t now_ns = now(c);
    queue *qs[2] = {&c->q_small, &c->q_main};
    for (int q = 0; q < 2; q++)
        for (uint32_t i = qs[q]->tail; i != NONE; i = c->e[i].prev)
            if (c->e[i].tenant == t && kvf__cache_evictable(c, &c->e[i], now_ns)) {
                evict_entry(c, i);
                c->tenants[t].quota_evictions++;
                return 0;
            }
    return KVF_EQUOTA;
}

/* A reservation of len bytes for tenant t within its quotas: its own oldest entries go to make
 * room. 0 or KVF_EQUOTA. */
static int quota_admit(kvf_cache *c, uint32_t t, uint64_t len)
{
    tenant_acct *ta = &c->tenants[t];
    if (t == 0)
        return 0;
    if ((ta->max_reserved && ta->reserved >= ta->max_reserved) ||
        (ta->max_bytes && len > ta->max_bytes)) {
        ta->quota_rejected++;
        return KVF_EQUOTA;
    }
    while (ta->max_bytes && ta->bytes + len > ta->max_bytes)
        if (evict_tenant_one(c, (uint16_t)t) != 0) {
            ta->quota_rejected++;
            return KVF_EQUOTA;
        }
    return 0;
}

/* Allocates len bytes, evicting until it fits or nothing more can go. */
static int alloc_evicting(kvf_cache *c, uint64_t len, uint64_t *off)
{
    for (;;) {
        if (kvf__arena_alloc(c->arena, len, off) == 0)
            return 0;
        if (evict_one(c) != 0)
            return KVF_ENOSPC;
    }
}

int kvf__cache_reserve_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t len,
                              uint64_t owner, uint32_t tenant, int via, int hold, uint32_t *eid,
                              uint8_t **dst)
{
    assert_locked(c);
    if (len == 0 || len > c->mem_size / 2)
        return KVF_E2BIG;
    if (tenant >= KVF_CACHE_MAX_TENANTS)
        return KVF_EINVAL;
    int found;
    uint64_t s = slot_find(c, ns, key, &found);
    if (found) {
        c->st.duplicates++;
        return KVF_EEXIST;
    }
    int qrc = quota_admit(c, tenant, len);
    if (qrc)
        return qrc;
    if (c->free_head == NONE && evict_one(c) != 0) {
        c->st.rejected_full++;
        return KVF_ENOSPC;
    }
    uint64_t off;
    if (alloc_evicting(c, len, &off) != 0) {
        c->st.rejected_full++;
        return KVF_ENOSPC;
    }
    /* Eviction may have moved index slots: find the insertion slot again. */
    s = slot_find(c, ns, key, &found);
    uint32_t i = c->free_head;
    entry *x = &c->e[i];
    c->free_head = x->next;
    memset(x, 0, sizeof *x);
    x->key = *key;
    x->ns = ns;
    x->off = off;
    x->len = len;
    x->owner = owner;
    x->via = (uint8_t)via;
    x->tenant = (uint16_t)tenant;
    x->state = ST_RESERVED;
    x->refs = hold ? 1 : 0;
    x->prev = x->next = NONE;
    x->deadline_ns = now(c) + c->reserve_ns;
    c->table[s] = i + 1;
    c->st.entries++;
    c->st.reserved++;
    c->tenants[tenant].bytes += len;
    c->tenants[tenant].entries++;
    c->tenants[tenant].reserved++;
    *eid = i;
    *dst = c->mem + off;
    return 0;
}

/* Owner's un-held reservation of (ns, key), made to be written `via`, or NONE. */
static uint32_t unheld_reservation(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t owner,
                                   int via)
{
    uint32_t i = lookup(c, ns, key);
    if (i == NONE)
        return NONE;
    const entry *x = &c->e[i];
    if (x->state != ST_RESERVED || x->owner != owner || x->refs || x->via != via)
        return NONE;
    return i;
}

int kvf__cache_claim_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t len,
                            uint64_t owner, int via, uint32_t *eid, uint8_t **dst)
{
    assert_locked(c);
    uint32_t i = unheld_reservation(c, ns, key, owner, via);
    if (i == NONE)
        return KVF_ENOENT;
    entry *x = &c->e[i];
    if (x->len != len)
        return KVF_EINVAL;
    x->refs = 1;
    *eid = i;
    *dst = c->mem + x->off;
    return 0;
}

static void abort_entry(kvf_cache *c, uint32_t i);

int kvf__cache_part_begin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t owner,
                                 uint64_t offset, uint64_t len, uint32_t *eid, uint8_t **dst,
                                 uint32_t *wseq)
{
    assert_locked(c);
    uint32_t i = unheld_reservation(c, ns, key, owner, KVF_CACHE_VIA_WIRE);
    if (i == NONE)
        return KVF_ENOENT;
    entry *x = &c->e[i];
    int in_order = x->wstart ? offset == x->wpos : offset > 0 && offset < UINT32_MAX;
    if (!in_order || len == 0 || offset >= x->len || len > x->len - offset) {
        abort_entry(c, i);
        return KVF_EINVAL;
    }
    if (!x->wstart) {
        x->wstart = (uint32_t)offset;
        x->wseq = ++c->wseq;
        x->wfirst_s = (uint32_t)(now(c) / 1000000000u);
    }
    x->refs = 1;
    *eid = i;
    *dst = c->mem + x->off + offset;
    *wseq = x->wseq;
    x->wpos = offset + len; /* counted once the bytes are in: nothing reads it while held */
    return 0;
}

void kvf__cache_part_end_locked(kvf_cache *c, uint32_t i, uint64_t owner)
{
    assert_locked(c);
    if (i >= c->n_entries)
        return;
    entry *x = &c->e[i];
    if (x->state != ST_RESERVED || x->owner != owner)
        return;
    x->refs = 0;
    /* each part gives it another expiry, up to 8 of them after its first part: a writer that
     * keeps a reservation alive with a byte now and then does not keep it for good */
    uint64_t until = now(c) + c->reserve_ns,
             cap = (uint64_t)x->wfirst_s * 1000000000u + 8 * c->reserve_ns;
    x->deadline_ns = until < cap ? until : cap;
}

int kvf__cache_seal_begin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint64_t owner,
                                 uint64_t offset, uint64_t head_len, uint32_t *eid, uint8_t **dst,
                                 uint64_t *obj_len, uint32_t *wseq)
{
    assert_locked(c);
    uint32_t i = unheld_reservation(c, ns, key, owner, KVF_CACHE_VIA_WIRE);
    if (i == NONE)
        return KVF_ENOENT;
    entry *x = &c->e[i];
    if (head_len == 0 && offset == 0) {
        abort_entry(c, i);
        *eid = UINT32_MAX;
        *dst = NULL;
        return 0;
    }
    if (offset || !x->wstart || head_len != x->wstart || x->wpos != x->len) {
        abort_entry(c, i);
        return KVF_EINVAL;
    }
    x->refs = 1;
    *eid = i;
    *dst = c->mem + x->off;
    *obj_len = x->len;
    *wseq = x->wseq;
    return 0;
}

int kvf__cache_commit_locked(kvf_cache *c, uint32_t i, uint64_t owner)
{
    assert_locked(c);
    entry *x = &c->e[i];
    if (i >= c->n_entries || x->state != ST_RESERVED || x->owner != owner)
        return KVF_ENOENT;
    x->state = ST_READY;
    x->refs = 0;
    x->deadline_ns = 0;
    x->owner = 0;
    c->st.reserved--;
    c->tenants[x->tenant].reserved--;
    c->st.ready_bytes += x->len;
    c->st.puts++;
    c->policy->insert(c, i);
    if (c->on_change)
        c->on_change(c->on_change_ctx, 1, 0, &x->key, x->tenant);
    return 0;
}

static void abort_entry(kvf_cache *c, uint32_t i)
{
    index_remove(c, i);
    c->st.reserved--;
    c->tenants[c->e[i].tenant].reserved--;
    entry_free(c, i);
}

void kvf__cache_abort_locked(kvf_cache *c, uint32_t i, uint64_t owner)
{
    assert_locked(c);
    if (i >= c->n_entries || c->e[i].state != ST_RESERVED || c->e[i].owner != owner)
        return;
    abort_entry(c, i);
}

void kvf__cache_abort_owner_locked(kvf_cache *c, uint64_t owner)
{
    assert_locked(c);
    if (!c->st.reserved)
        return;
    for (uint32_t i = 0; i < c->n_entries; i++) {
        entry *x = &c->e[i];
        if (x->state == ST_RESERVED && x->owner == owner && x->refs == 0)
            abort_entry(c, i);
    }
}

int kvf__cache_acquire_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint32_t *eid,
                              const uint8_t **data, uint64_t *len)
{
    assert_locked(c);
    uint32_t i = lookup(c, ns, key);
    if (i == NONE || c->e[i].state != ST_READY) {
        c->st.misses++;
        return KVF_ENOENT;
    }
    entry *x = &c->e[i];
    if (x->refs++ == 0)
        c->st.referenced++;
    c->policy->touch(c, i);
    c->st.hits++;
    if (x->hits < UINT8_MAX)
        x->hits++;
    /* at the hot_hits-th read, and at later ones while a copy could not be queued (full) */
    if (c->hot_hits && x->hits >= c->hot_hits && !x->on_disk && !x->wt)
        maybe_write_through(c, i, 0);
    /* the same for a replica on another node: at the rep_hits-th read and after, until one is
     * queued (a copy that failed is asked for again at the next read) */
    if (c->rep_hits && x->hits >= c->rep_hits && !x->rep &&
        c->on_rep(c->on_rep_ctx, i, x->ns, &x->key, c->mem + x->off, x->len, x->hits, x->tenant)) {
        if (x->refs++ == 0)
            c->st.referenced++;
        x->rep = 1;
    }
    *eid = i;
    *data = c->mem + x->off;
    *len = x->len;
    return 0;
}

void kvf__cache_release_locked(kvf_cache *c, uint32_t i)
{
    assert_locked(c);
    entry *x = &c->e[i];
    assert(x->refs > 0 && (x->state == ST_READY || x->state == ST_GONE));
    if (--x->refs)
        return;
    c->st.referenced--;
    if (x->state == ST_GONE)
        entry_free(c, i);
}

int kvf__cache_contains_locked(kvf_cache *c, uint64_t ns, const kvf_key *key)
{
    assert_locked(c);
    uint32_t i = lookup(c, ns, key);
    return i != NONE && c->e[i].state == ST_READY;
}

void kvf__cache_each_locked(kvf_cache *c, void (*fn)(void *ud, const kvf_key *key, uint32_t tenant),
                            void *ud)
{
    assert_locked(c);
    for (uint32_t i = 0; i < c->n_entries; i++)
        if (c->e[i].state == ST_READY)
            fn(ud, &c->e[i].key, c->e[i].tenant);
}

int kvf__cache_remove_locked(kvf_cache *c, uint64_t ns, const kvf_key *key)
{
    assert_locked(c);
    uint32_t i = lookup(c, ns, key);
    if (i == NONE || c->e[i].state != ST_READY)
        return KVF_ENOENT;
    entry *x = &c->e[i];
    if (x->pins && x->deadline_ns > now(c))
        return KVF_EBUSY;
    entry_remove(c, i);
    c->st.removed++;
    return 0;
}

int kvf__cache_pin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint32_t lease_ms)
{
    assert_locked(c);
    uint32_t i = lookup(c, ns, key);
    if (i == NONE || c->e[i].state != ST_READY)
        return KVF_ENOENT;
    entry *x = &c->e[i];
    uint64_t t = now(c);
    if (!x->pins)
        c->st.pinned++;
    else if (x->deadline_ns <= t)
        x->pins = 0; /* an expired lease's pins do not count any more */
    x->pins++;
    uint64_t until = t + (uint64_t)lease_ms * 1000000u;
    if (until > x->deadline_ns)
        x->deadline_ns = until;
    if (c->hot_pinned)
        maybe_write_through(c, i, 1);
    return 0;
}

int kvf__cache_unpin_locked(kvf_cache *c, uint64_t ns, const kvf_key *key)
{
    assert_locked(c);
    uint32_t i = lookup(c, ns, key);
    if (i == NONE || c->e[i].state != ST_READY)
        return KVF_ENOENT;
    entry *x = &c->e[i];
    if (!x->pins)
        return KVF_EINVAL;
    if (x->deadline_ns <= now(c)) {
        x->pins = 0;
        x->deadline_ns = 0;
        c->st.pinned--;
        c->st.expired_pins++;
        return KVF_EINVAL;
    }
    if (--x->pins == 0) {
        x->deadline_ns = 0;
        c->st.pinned--;
    }
    return 0;
}

uint64_t kvf__cache_clear_locked(kvf_cache *c, uint64_t ns, int all)
{
    assert_locked(c);
    uint64_t n = 0;
    for (uint32_t i = 0; i < c->n_entries; i++) {
        entry *x = &c->e[i];
        if (x->state == ST_READY && (all || x->ns == ns)) {
            entry_remove(c, i);
            n++;
        }
    }
    c->st.cleared += n;
    return n;
}

int kvf__cache_swap_begin_locked(kvf_cache *c, uint32_t i, uint64_t len, uint64_t *newoff,
                                 uint8_t **dst)
{
    assert_locked(c);
    entry *x = &c->e[i];
    if (x->state != ST_READY || x->refs == 0)
        return KVF_EINVAL;
    if (len == 0 || len > c->mem_size / 2)
        return KVF_E2BIG;
    if (alloc_evicting(c, len, newoff) != 0)
        return KVF_ENOSPC;
    *dst = c->mem + *newoff;
    return 0;
}

int kvf__cache_swap_locked(kvf_cache *c, uint32_t i, uint64_t newoff, uint64_t len)
{
    assert_locked(c);
    entry *x = &c->e[i];
    if (x->state != ST_READY || x->refs != 1) {
        kvf__arena_free(c->arena, newoff);
        return KVF_EBUSY;
    }
    kvf__arena_free(c->arena, x->off);
    queue *q = x->queue == Q_NONE ? NULL : kvf__cache_q_of(c, x);
    if (q)
        q->bytes = q->bytes - x->len + len;
    c->st.ready_bytes = c->st.ready_bytes - x->len + len;
    c->tenants[x->tenant].bytes = c->tenants[x->tenant].bytes - x->len + len;
    x->off = newoff;
    x->len = len;
    return 0;
}

void kvf__cache_tick_locked(kvf_cache *c, uint32_t max_steps)
{
    assert_locked(c);
    uint64_t t = now(c);
    for (uint32_t s = 0; s < max_steps && s < c->n_entries; s++) {
        uint32_t i = c->sweep;
        c->sweep = (c->sweep + 1) % c->n_entries;
        entry *x = &c->e[i];
        if (x->state == ST_READY && x->pins && x->deadline_ns <= t) {
            x->pins = 0;
            x->deadline_ns = 0;
            c->st.pinned--;
            c->st.expired_pins++;
        } else if (x->state == ST_RESERVED && x->refs == 0 && x->deadline_ns <= t) {
            abort_entry(c, i);
            c->st.expired_reservations++;
        }
    }
}

void kvf__cache_quota_set_locked(kvf_cache *c, uint32_t tenant, uint64_t max_bytes,
                                 uint32_t max_reserved)
{
    assert_locked(c);
    if (tenant == 0 || tenant >= KVF_CACHE_MAX_TENANTS)
        return;
    c->tenants[tenant].max_bytes = max_bytes;
    c->tenants[tenant].max_reserved = max_reserved;
}

void kvf__cache_tenant_stats_locked(kvf_cache *c, uint32_t tenant, kvf_cache_tenant_stats *st)
{
    assert_locked(c);
    memset(st, 0, sizeof *st);
    if (tenant < KVF_CACHE_MAX_TENANTS)
        *st = c->tenants[tenant];
}

void kvf__cache_stats_locked(kvf_cache *c, kvf_cache_stats *st)
{
    assert_locked(c);
    kvf_arena_stats as;
    kvf__arena_stats_get(c->arena, &as);
    *st = c->st;
    st->memory = as.size;
    st->used = as.used;
    st->free = as.free;
    st->free_blocks = as.free_blocks;
    st->max_entries = c->n_entries;
    st->policy = c->policy->name;
}

int kvf__cache_check_locked(kvf_cache *c)
{
    assert_locked(c);
    if (kvf__arena_check(c->arena) != 0)
        return -1;
    uint64_t live = 0, ready_bytes = 0, reserved = 0, in_q = 0, indexed = 0;
    uint64_t *tbytes = calloc(KVF_CACHE_MAX_TENANTS, sizeof *tbytes);
    if (!tbytes)
        return -1;
    for (uint32_t i = 0; i < c->n_entries; i++) {
        entry *x = &c->e[i];
        if (x->state == ST_FREE)
            continue;
        live++;
        tbytes[x->tenant] += x->len;
        if (x->state == ST_READY) {
            ready_bytes += x->len;
            if (x->queue == Q_NONE)
                return -1;
            in_q++;
        }
        if (x->state == ST_RESERVED)
            reserved++;
        if (x->state != ST_GONE) {
            if (lookup(c, x->ns, &x->key) != i) {
                free(tbytes);
                return -1;
            }
            indexed++;
        }
    }
    int tenants_ok = 1;
    for (uint32_t t = 0; t < KVF_CACHE_MAX_TENANTS; t++)
        tenants_ok &= tbytes[t] == c->tenants[t].bytes;
    free(tbytes);
    if (!tenants_ok)
        return -1;
    uint64_t slots = 0;
    for (uint64_t s = 0; s <= c->mask; s++)
        slots += c->table[s] != 0;
    if (slots != indexed || live != c->st.entries || ready_bytes != c->st.ready_bytes ||
        reserved != c->st.reserved || in_q != c->q_main.count + c->q_small.count)
        return -1;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */

void kvf__cache_lock(kvf_cache *c)
{
    pthread_mutex_lock(&c->mu);
    c->holder = pthread_self();
    c->held = 1;
}

void kvf__cache_unlock(kvf_cache *c)
{
    c->held = 0;
    pthread_mutex_unlock(&c->mu);
}

uint8_t *kvf__cache_base(kvf_cache *c)
{
    return c->mem;
}

uint64_t kvf__cache_mem_size(const kvf_cache *c)
{
    return c->mem_size;
}

int kvf__cache_arena_fd(const kvf_cache *c)
{
    return c->mem_ro_ok ? c->mem_fd : -1;
}

int kvf__cache_open(kvf_cache **out, const kvf_cache_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    const evict_ops *policy = &kvf__cache_lru_ops;
    if (o->evict && strcmp(o->evict, "s3fifo") == 0)
        policy = &kvf__cache_s3fifo_ops;
    else if (o->evict && strcmp(o->evict, "lru") != 0) {
        snprintf(err, errlen, "unknown eviction policy \"%s\" (lru or s3fifo)", o->evict);
        return KVF_EINVAL;
    }
    if (o->memory < (1u << 20)) {
        snprintf(err, errlen, "memory: %llu bytes is below the minimum of 1 MiB",
                 (unsigned long long)o->memory);
        return KVF_EINVAL;
    }
    uint64_t n = o->max_entries ? o->max_entries : o->memory / (16u << 10);
    if (n < 1024)
        n = 1024;
    if (n > (1u << 26)) {
        snprintf(err, errlen, "max entries: %llu is above the limit of %u", (unsigned long long)n,
                 1u << 26);
        return KVF_EINVAL;
    }
    kvf_cache *c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "out of memory");
        return KVF_ENOMEM;
    }
    int rc = KVF_ENOMEM;
    c->policy = policy;
    c->clock = o->clock;
    c->on_change = o->on_change;
    c->on_change_ctx = o->on_change_ctx;
    c->reserve_ns = (uint64_t)(o->reserve_ms ? o->reserve_ms : 30000) * 1000000u;
    c->mem_size = o->memory & ~(uint64_t)(KVF_ARENA_ALIGN - 1);
    c->n_entries = (uint32_t)n;
    c->q_main.head = c->q_main.tail = c->q_small.head = c->q_small.tail = NONE;
    pthread_mutex_init(&c->mu, NULL);

    void *mem = kvf__arena_map(&c->mem_size, o->shared, o->hugepages, o->prefault, &c->mem_fd,
                               &c->mem_ro_ok, err, errlen);
    if (mem == MAP_FAILED)
        goto out_free;
    c->mem = mem;
    if (o->lock_memory && mlock(mem, c->mem_size) != 0) {
        snprintf(err, errlen, "mlock of %llu bytes failed (raise the memlock limit)",
                 (unsigned long long)c->mem_size);
        rc = KVF_EACCES;
        goto out_unmap;
    }
    if (kvf__arena_new(&c->arena, mem, c->mem_size) != 0) {
        snprintf(err, errlen, "arena setup failed");
        rc = KVF_EINVAL;
        goto out_unmap;
    }
    c->e = calloc(n, sizeof *c->e);
    uint64_t tcap = 1;
    while (tcap < 2 * n)
        tcap <<= 1;
    c->table = calloc(tcap, sizeof *c->table);
    c->mask = tcap - 1;
    uint64_t gcap = 1;
    while (gcap < n)
        gcap <<= 1;
    c->ghost = calloc(gcap, sizeof *c->ghost);
    c->ghost_mask = gcap - 1;
    c->tenants = calloc(KVF_CACHE_MAX_TENANTS, sizeof *c->tenants);
    if (!c->e || !c->table || !c->ghost || !c->tenants) {
        snprintf(err, errlen, "out of memory for %llu entries", (unsigned long long)n);
        goto out_tables;
    }
    for (uint32_t i = 0; i < n; i++) {
        c->e[i].next = i + 1 < n ? i + 1 : NONE;
        c->e[i].prev = NONE;
    }
    c->free_head = 0;
    *out = c;
    return 0;

out_tables:
    free(c->tenants);
    free(c->e);
    free(c->table);
    free(c->ghost);
    kvf__arena_destroy(&c->arena);
out_unmap:
    munmap(mem, c->mem_size);
    if (c->mem_fd >= 0)
        close(c->mem_fd);
out_free:
    pthread_mutex_destroy(&c->mu);
    free(c);
    return rc;
}

void kvf__cache_close(kvf_cache **cp)
{
    if (!cp || !*cp)
        return;
    kvf_cache *c = *cp;
    free(c->tenants);
    free(c->e);
    free(c->table);
    free(c->ghost);
    kvf__arena_destroy(&c->arena);
    munmap(c->mem, c->mem_size);
    if (c->mem_fd >= 0)
        close(c->mem_fd);
    pthread_mutex_destroy(&c->mu);
    free(c);
    *cp = NULL;
}

void kvf__cache_set_evict_hook(kvf_cache *c, kvf_cache_evict_hook fn, void *ctx)
{
    kvf__cache_lock(c);
    c->on_evict = fn;
    c->on_evict_ctx = ctx;
    kvf__cache_unlock(c);
}

void kvf__cache_set_write_through_hook(kvf_cache *c, kvf_cache_evict_hook fn, void *ctx,
                                       uint32_t hits, int pinned)
{
    kvf__cache_lock(c);
    c->on_hot = fn;
    c->on_hot_ctx = ctx;
    c->hot_hits = fn ? hits : 0;
    c->hot_pinned = fn ? pinned : 0;
    kvf__cache_unlock(c);
}

int kvf__cache_unpromote_locked(kvf_cache *c, uint32_t eid, uint32_t max_hits)
{
    assert_locked(c);
    if (eid >= c->n_entries || c->e[eid].state != ST_READY)
        return 0;
    entry *x = &c->e[eid];
    if ((x->pins && x->deadline_ns > now(c)) || x->hits > max_hits || x->wt)
        return 0;
    entry_remove(c, eid);
    c->st.removed++;
    return 1;
}

void kvf__cache_set_disk_check(kvf_cache *c, int (*fn)(void *ctx, uint64_t ns, const kvf_key *key),
                               void *ctx)
{
    kvf__cache_lock(c);
    c->disk_holds = fn;
    c->disk_holds_ctx = ctx;
    kvf__cache_unlock(c);
}

void kvf__cache_write_through_done_locked(kvf_cache *c, uint32_t eid, int written)
{
    assert_locked(c);
    if (eid >= c->n_entries || c->e[eid].state != ST_READY)
        return;
    c->e[eid].wt = 0;
    if (written)
        c->e[eid].on_disk = 1;
}

void kvf__cache_set_replicate_hook(kvf_cache *c, kvf_cache_evict_hook fn, void *ctx, uint32_t hits)
{
    kvf__cache_lock(c);
    c->on_rep = fn;
    c->on_rep_ctx = ctx;
    c->rep_hits = fn && hits ? (hits > UINT8_MAX ? UINT8_MAX : hits) : 0;
    kvf__cache_unlock(c);
}

void kvf__cache_replicate_done_locked(kvf_cache *c, uint32_t eid, int made)
{
    assert_locked(c);
    if (eid < c->n_entries && c->e[eid].rep == 1)
        c->e[eid].rep = made ? 2 : 0;
}

int kvf__cache_hold_locked(kvf_cache *c, uint32_t eid)
{
    assert_locked(c);
    if (eid >= c->n_entries || c->e[eid].state != ST_READY)
        return KVF_ENOENT;
    if (c->e[eid].refs++ == 0)
        c->st.referenced++;
    return 0;
}

int kvf__cache_hold_key_locked(kvf_cache *c, uint64_t ns, const kvf_key *key, uint32_t *eid)
{
    assert_locked(c);
    uint32_t i = lookup(c, ns, key);
    if (i == NONE || c->e[i].state != ST_READY)
        return KVF_ENOENT;
    *eid = i;
    return kvf__cache_hold_locked(c, i);
}

void kvf__cache_mark_on_disk_locked(kvf_cache *c, uint32_t eid)
{
    assert_locked(c);
    if (eid < c->n_entries && c->e[eid].state == ST_READY)
        c->e[eid].on_disk = 1;
}
