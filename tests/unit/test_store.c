/*
 * Unit tests of the store module: the TLSF arena, the cache (index, states, references, pins and
 * leases on a fake clock, reservations, both eviction policies), and the server's setup failures.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>

#include "kvf/kvf.h"

#include "arena.h"
#include "cache.h"
#include "replicate.h"
#include "server.h"
#include "clock.h"

#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Arena */

static uint64_t rng = 88172645463325252ull;

static uint64_t xorshift(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Random allocations (sizes from size_of) and frees on arena a over mem: each block is filled
 * and its fill checked when it is freed (no neighbour overwrote it), the invariants every 500
 * rounds; then everything is freed and must merge back into the one block it started as. Counts
 * the allocations of KVF_ARENA_PAGE_MIN or more that started on a page boundary and those that
 * did not. */
static void churn(kvf_arena *a, uint8_t *mem, size_t size, int rounds, uint64_t (*size_of)(void),
                  int *aligned, int *unaligned)
{
    kvf_arena_stats st;
    kvf__arena_stats_get(a, &st);
    uint64_t initial_free = st.free;
    assert_int_equal(st.free_blocks, 1);
    enum { N = 2000 };
    static uint64_t offs[N], lens[N];
    int live = 0;
    for (int round = 0; round < rounds; round++) {
        if (live < N && (xorshift() % 3 != 0 || live == 0)) {
            uint64_t n = size_of(), off;
            if (kvf__arena_alloc(a, n, &off) != 0)
                continue;
            assert_int_equal(off % KVF_ARENA_ALIGN, 0);
            assert_true(off + n <= size);
            if (n >= KVF_ARENA_PAGE_MIN)
                off % KVF_ARENA_PAGE == 0 ? (*aligned)++ : (*unaligned)++;
            memset(mem + off, (int)(live & 0xff), n);
            offs[live] = off;
            lens[live++] = n;
        } else {
            int k = (int)(xorshift() % (uint64_t)live);
            assert_int_equal(mem[offs[k]], mem[offs[k] + lens[k] - 1]);
            kvf__arena_free(a, offs[k]);
            offs[k] = offs[live - 1];
            lens[k] = lens[live - 1];
            live--;
            /* the moved block's fill byte rewritten, so that the check above stays meaningful */
            if (k < live)
                memset(mem + offs[k], (int)(k & 0xff), lens[k]);
        }
        if (round % 500 == 0)
            assert_int_equal(kvf__arena_check(a), 0);
    }
    while (live > 0)
        kvf__arena_free(a, offs[--live]);
    assert_int_equal(kvf__arena_check(a), 0);
    kvf__arena_stats_get(a, &st);
    assert_int_equal(st.free, initial_free);
    assert_int_equal(st.free_blocks, 1);
    assert_int_equal(st.allocs, 0);
}

static uint64_t small_sizes(void)
{
    return 1 + xorshift() % (xorshift() % 4 == 0 ? 200000 : 4000);
}

static uint64_t mixed_sizes(void)
{
    return xorshift() % 2 ? KVF_ARENA_PAGE_MIN + xorshift() % (3u << 20) : 1 + xorshift() % 8000;
}

/* An arena over size bytes at an alignment of align, churned (above) with sizes from size_of. */
static kvf_arena *churned(size_t size, size_t align, int rounds, uint64_t (*size_of)(void),
                          uint8_t **mem, int *aligned, int *unaligned)
{
    *mem = aligned_alloc(align, size);
    kvf_arena *a;
    assert_int_equal(kvf__arena_new(&a, *mem, size), 0);
    *aligned = *unaligned = 0;
    churn(a, *mem, size, rounds, size_of, aligned, unaligned);
    return a;
}

static void test_store_arena_alloc_free_coalesce(void **state)
{
    (void)state;
    uint8_t *mem;
    int aligned, unaligned;
    kvf_arena *a = churned(8u << 20, 64, 20000, small_sizes, &mem, &aligned, &unaligned);
    kvf__arena_destroy(&a);
    assert_null(a);
    free(mem);
}

/* Allocations of 1 MiB and more start on a page boundary (the disk tier moves them straight
 * between the device and the arena) wherever an aligned block is free, small ones fill the pieces
 * cut off before them, and every invariant holds through random allocations and frees. */
static void test_store_arena_large_are_page_aligned(void **state)
{
    (void)state;
    uint8_t *mem;
    int aligned, unaligned;
    kvf_arena *a = churned(64u << 20, 4096, 6000, mixed_sizes, &mem, &aligned, &unaligned);
    /* placed anyhow only when the arena was too full for an aligned block (it is kept full) */
    assert_true(aligned > 200);
    assert_true(unaligned * 10 < aligned);
    /* On an empty arena a large one is always aligned, and a small one after it fills the piece
     * cut off before its page. */
    uint64_t o1, o2, o3;
    assert_int_equal(kvf__arena_alloc(a, 100, &o1), 0);
    assert_int_equal(kvf__arena_alloc(a, KVF_ARENA_PAGE_MIN, &o2), 0);
    assert_int_equal(o2 % KVF_ARENA_PAGE, 0);
    assert_int_equal(kvf__arena_alloc(a, 100, &o3), 0);
    assert_true(o3 < o2);
    assert_int_equal(kvf__arena_check(a), 0);
    kvf__arena_free(a, o2);
    kvf__arena_free(a, o1);
    kvf__arena_free(a, o3);
    assert_int_equal(kvf__arena_check(a), 0);
    kvf_arena_stats st;
    kvf__arena_stats_get(a, &st);
    assert_int_equal(st.free_blocks, 1);
    kvf__arena_destroy(&a);
    free(mem);
}

static void test_store_arena_exhaustion(void **state)
{
    (void)state;
    size_t size = 1u << 20;
    void *mem = aligned_alloc(64, size);
    kvf_arena *a;
    assert_int_equal(kvf__arena_new(&a, mem, size), 0);
    uint64_t off, n = 0;
    while (kvf__arena_alloc(a, 10000, &off) == 0)
        n++;
    assert_true(n >= 90 && n <= 104);
    assert_int_equal(kvf__arena_alloc(a, 10000, &off), KVF_ENOSPC);
    assert_int_equal(kvf__arena_alloc(a, 0, &off), KVF_ENOSPC);
    assert_int_equal(kvf__arena_alloc(a, size * 2, &off), KVF_ENOSPC);
    assert_true(kvf__arena_largest_free(a) < 10000 + 2048);
    assert_int_equal(kvf__arena_check(a), 0);
    kvf__arena_destroy(&a);
    assert_int_equal(kvf__arena_new(&a, (uint8_t *)mem + 1, size - 64), KVF_EINVAL);
    free(mem);
}

/* ------------------------------------------------------------------------------------------ */
/* Cache */

typedef struct fixture {
    kvf_cache *c;
    uint64_t now;
    kvf_clock clock;
} fixture;

static fixture *fx_open(uint64_t memory, const char *policy, uint32_t max_entries)
{
    fixture *f = calloc(1, sizeof *f);
    f->now = 1000000000ull;
    f->clock.now_ns = kvf__clock_fake_now;
    f->clock.ud = &f->now;
    kvf_cache_opts o = {.memory = memory,
                        .evict = policy,
                        .clock = &f->clock,
                        .max_entries = max_entries,
                        .reserve_ms = 1000};
    char err[200];
    assert_int_equal(kvf__cache_open(&f->c, &o, err, sizeof err), 0);
    return f;
}

static void fx_close(fixture *f)
{
    kvf__cache_close(&f->c);
    free(f);
}

static kvf_key K(uint64_t i)
{
    kvf_key k = {.lo = i * 0x9E3779B97F4A7C15ull + 1, .hi = i};
    return k;
}

/* Reserves, fills with a pattern and commits (ns, K(i)). Returns the reserve status. */
static int put(fixture *f, uint64_t ns, uint64_t i, uint64_t len)
{
    uint32_t eid;
    uint8_t *dst;
    kvf_key k = K(i);
    int rc = kvf__cache_reserve_locked(f->c, ns, &k, len, 42, 0, KVF_CACHE_VIA_WIRE, 1, &eid, &dst);
    if (rc)
        return rc;
    memset(dst, (int)(i & 0xff), len);
    assert_int_equal(kvf__cache_commit_locked(f->c, eid, 42), 0);
    return 0;
}

static int has(fixture *f, uint64_t ns, uint64_t i)
{
    kvf_key k = K(i);
    return kvf__cache_contains_locked(f->c, ns, &k);
}

static void test_store_cache_states_and_references(void **state)
{
    (void)state;
    fixture *f = fx_open(4u << 20, "lru", 0);
    kvf__cache_lock(f->c);
    kvf_key k = K(1);
    uint32_t eid;
    uint8_t *dst;
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 7, &k, 1000, 42, 0, KVF_CACHE_VIA_WIRE, 1, &eid, &dst), 0);
    /* Reserved: invisible, and a second reservation of the key is refused. */
    assert_false(kvf__cache_contains_locked(f->c, 7, &k));
    const uint8_t *p;
    uint64_t len;
    uint32_t r;
    assert_int_equal(kvf__cache_acquire_locked(f->c, 7, &k, &r, &p, &len), KVF_ENOENT);
    uint32_t e2;
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 7, &k, 1000, 43, 0, KVF_CACHE_VIA_WIRE, 1, &e2, &dst),
        KVF_EEXIST);
    /* Another owner cannot commit it. */
    assert_int_equal(kvf__cache_commit_locked(f->c, eid, 43), KVF_ENOENT);
    memset(dst, 0xab, 1000);
    assert_int_equal(kvf__cache_commit_locked(f->c, eid, 42), 0);
    assert_true(kvf__cache_contains_locked(f->c, 7, &k));
    /* Another namespace does not see it. */
    assert_false(kvf__cache_contains_locked(f->c, 8, &k));
    /* A referenced entry removed is unlinked at once but freed only after its last reader. */
    assert_int_equal(kvf__cache_acquire_locked(f->c, 7, &k, &r, &p, &len), 0);
    assert_int_equal(len, 1000);
    assert_int_equal(p[999], 0xab);
    assert_int_equal(kvf__cache_remove_locked(f->c, 7, &k), 0);
    assert_false(kvf__cache_contains_locked(f->c, 7, &k));
    kvf_cache_stats st;
    kvf__cache_stats_locked(f->c, &st);
    assert_int_equal(st.entries, 1);
    assert_int_equal(p[0], 0xab); /* still readable */
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_release_locked(f->c, r);
    kvf__cache_stats_locked(f->c, &st);
    assert_int_equal(st.entries, 0);
    assert_int_equal(st.used, 0);
    assert_int_equal(kvf__cache_remove_locked(f->c, 7, &k), KVF_ENOENT);
    /* Abort frees; an abort by another owner is ignored. */
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 7, &k, 500, 42, 0, KVF_CACHE_VIA_WIRE, 0, &eid, &dst), 0);
    kvf__cache_abort_locked(f->c, eid, 99);
    kvf__cache_stats_locked(f->c, &st);
    assert_int_equal(st.reserved, 1);
    kvf__cache_abort_owner_locked(f->c, 42);
    kvf__cache_stats_locked(f->c, &st);
    assert_int_equal(st.reserved, 0);
    assert_int_equal(st.entries, 0);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 7, &k, 0, 42, 0, KVF_CACHE_VIA_WIRE, 1, &eid, &dst),
        KVF_E2BIG);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 7, &k, 3u << 20, 42, 0, KVF_CACHE_VIA_WIRE, 1, &eid, &dst),
        KVF_E2BIG);
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_unlock(f->c);
    fx_close(f);
}

/* Eviction under pressure takes only ready, unreferenced, unpinned entries. */
static void eviction_respects_pins_and_refs(const char *policy)
{
    fixture *f = fx_open(4u << 20, policy, 0);
    kvf__cache_lock(f->c);
    for (uint64_t i = 0; i < 10; i++)
        assert_int_equal(put(f, 1, i, 64 * 1024), 0);
    kvf_key k3 = K(3), k5 = K(5);
    assert_int_equal(kvf__cache_pin_locked(f->c, 1, &k3, 60000), 0);
    uint32_t ref;
    const uint8_t *p;
    uint64_t len;
    assert_int_equal(kvf__cache_acquire_locked(f->c, 1, &k5, &ref, &p, &len), 0);
    /* 40 MiB through a 4 MiB arena. */
    for (uint64_t i = 100; i < 740; i++) {
        assert_int_equal(put(f, 1, i, 64 * 1024), 0);
        if (i % 64 == 0)
            assert_int_equal(kvf__cache_check_locked(f->c), 0);
    }
    assert_true(has(f, 1, 3));
    assert_true(has(f, 1, 5));
    assert_int_equal(p[0], 5);
    assert_int_equal(p[len - 1], 5);
    assert_false(has(f, 1, 0));
    kvf_cache_stats st;
    kvf__cache_stats_locked(f->c, &st);
    assert_true(st.evictions >= 550); /* 650 puts of 64 KiB, about 60 fit */
    assert_int_equal(st.pinned, 1);
    assert_int_equal(st.referenced, 1);
    /* A pinned entry cannot be removed while its lease runs. */
    assert_int_equal(kvf__cache_remove_locked(f->c, 1, &k3), KVF_EBUSY);
    kvf__cache_release_locked(f->c, ref);
    assert_int_equal(kvf__cache_unpin_locked(f->c, 1, &k3), 0);
    assert_int_equal(kvf__cache_unpin_locked(f->c, 1, &k3), KVF_EINVAL);
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_unlock(f->c);
    fx_close(f);
}

static void test_store_cache_eviction_lru(void **state)
{
    (void)state;
    eviction_respects_pins_and_refs("lru");
}

static void test_store_cache_eviction_s3fifo(void **state)
{
    (void)state;
    eviction_respects_pins_and_refs("s3fifo");
}

static void test_store_cache_full_of_pinned_is_enospc(void **state)
{
    (void)state;
    fixture *f = fx_open(2u << 20, "lru", 0);
    kvf__cache_lock(f->c);
    uint64_t n = 0;
    int rc;
    /* Fill with entries, each pinned before the next put, until a put finds no room. */
    while ((rc = put(f, 1, n, 100000)) == 0) {
        kvf_key k = K(n);
        assert_int_equal(kvf__cache_pin_locked(f->c, 1, &k, 5000), 0);
        n++;
        assert_true(n < 100);
    }
    assert_int_equal(rc, KVF_ENOSPC);
    assert_true(n >= 15);
    for (uint64_t i = 0; i < n; i++)
        assert_true(has(f, 1, i));
    assert_int_equal(put(f, 1, 9999, 100000), KVF_ENOSPC);
    kvf_cache_stats st;
    kvf__cache_stats_locked(f->c, &st);
    assert_true(st.rejected_full >= 1);
    /* Once the leases run out, the same put succeeds by evicting. */
    f->now += 6000ull * 1000000ull;
    assert_int_equal(put(f, 1, 9999, 100000), 0);
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_unlock(f->c);
    fx_close(f);
}

/* A reservation written in parts (WRITE, SEAL): parts in order from past the head, the seal only
 * once they reach the end and only with the head they left; a part out of order drops it; each
 * part gives it another expiry, up to eight after its first. */
static void test_store_cache_parts(void **state)
{
    (void)state;
    fixture *f = fx_open(4u << 20, "lru", 0);
    kvf__cache_lock(f->c);
    kvf_key k = K(7);
    uint32_t eid, wseq, wseq2;
    uint8_t *dst, *base;
    uint64_t olen;
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &k, 1000, 42, 0, KVF_CACHE_VIA_WIRE, 0, &eid, &base), 0);
    /* another owner's, the head first, nothing written: refused */
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 43, 100, 10, &eid, &dst, &wseq),
                     KVF_ENOENT);
    assert_int_equal(
        kvf__cache_seal_begin_locked(f->c, 1, &k, 42, 0, 100, &eid, &dst, &olen, &wseq),
        KVF_EINVAL); /* nothing written: dropped */
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, 100, 10, &eid, &dst, &wseq),
                     KVF_ENOENT);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &k, 1000, 42, 0, KVF_CACHE_VIA_WIRE, 0, &eid, &base), 0);
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, 100, 400, &eid, &dst, &wseq), 0);
    assert_ptr_equal(dst, base + 100);
    /* held while its bytes come: no second part meanwhile */
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, 500, 10, &eid, &dst, &wseq2),
                     KVF_ENOENT);
    kvf__cache_part_end_locked(f->c, eid, 42);
    assert_int_equal(
        kvf__cache_seal_begin_locked(f->c, 1, &k, 42, 0, 100, &eid, &dst, &olen, &wseq2),
        KVF_EINVAL); /* the parts stop at 500 of 1000: dropped */
    /* again, kept alive by parts for a while, then no longer */
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &k, 1000, 42, 0, KVF_CACHE_VIA_WIRE, 0, &eid, &base), 0);
    uint64_t at = 100;
    int parts = 0;
    for (; at < 1000 && parts < 20; parts++) {
        assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, at, 10, &eid, &dst, &wseq2),
                         0);
        kvf__cache_part_end_locked(f->c, eid, 42);
        at += 10;
        f->now += 900000000ull; /* 0.9 of the 1 s expiry between parts */
        kvf__cache_tick_locked(f->c, 1000);
        if (f->now - 1000000000ull > 8000000000ull)
            break;
    }
    /* 8 s after the first part (at 1.0 s) the reservation is gone though a part came 0.9 s ago,
     * within the 1 s expiry it would otherwise have had */
    assert_true(f->now > 9000000000ull && f->now < 9500000000ull);
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, at, 10, &eid, &dst, &wseq2),
                     KVF_ENOENT);
    /* kept: in order to the end, sealed with its head, committed, visible */
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &k, 1000, 42, 0, KVF_CACHE_VIA_WIRE, 0, &eid, &base), 0);
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, 64, 936, &eid, &dst, &wseq), 0);
    kvf__cache_part_end_locked(f->c, eid, 42);
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, 1000, 1, &eid, &dst, &wseq2),
                     KVF_EINVAL); /* past the end: dropped */
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &k, 1000, 42, 0, KVF_CACHE_VIA_WIRE, 0, &eid, &base), 0);
    assert_int_equal(kvf__cache_part_begin_locked(f->c, 1, &k, 42, 64, 936, &eid, &dst, &wseq), 0);
    kvf__cache_part_end_locked(f->c, eid, 42);
    assert_int_equal(
        kvf__cache_seal_begin_locked(f->c, 1, &k, 42, 0, 64, &eid, &dst, &olen, &wseq2), 0);
    assert_int_equal(olen, 1000);
    assert_int_equal(wseq2, wseq);
    assert_ptr_equal(dst, base);
    assert_int_equal(kvf__cache_commit_locked(f->c, eid, 42), 0);
    assert_true(kvf__cache_contains_locked(f->c, 1, &k));
    kvf__cache_unlock(f->c);
    fx_close(f);
}

static void test_store_cache_leases_expire(void **state)
{
    (void)state;
    fixture *f = fx_open(4u << 20, "lru", 0);
    kvf__cache_lock(f->c);
    assert_int_equal(put(f, 1, 1, 1000), 0);
    kvf_key k = K(1);
    assert_int_equal(kvf__cache_pin_locked(f->c, 1, &k, 100), 0);
    assert_int_equal(kvf__cache_pin_locked(f->c, 1, &k, 50), 0); /* lease stays at 100 ms */
    assert_int_equal(kvf__cache_remove_locked(f->c, 1, &k), KVF_EBUSY);
    f->now += 60ull * 1000000ull;
    assert_int_equal(kvf__cache_remove_locked(f->c, 1, &k), KVF_EBUSY);
    f->now += 50ull * 1000000ull;
    kvf__cache_tick_locked(f->c, 1000000);
    kvf_cache_stats st;
    kvf__cache_stats_locked(f->c, &st);
    assert_int_equal(st.pinned, 0);
    assert_int_equal(st.expired_pins, 1);
    assert_int_equal(kvf__cache_remove_locked(f->c, 1, &k), 0);
    /* An admitted reservation nobody writes expires; a held one does not. */
    kvf_key a = K(2), b = K(3);
    uint32_t ea, eb;
    uint8_t *d;
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &a, 1000, 7, 0, KVF_CACHE_VIA_WIRE, 0, &ea, &d), 0);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &b, 1000, 7, 0, KVF_CACHE_VIA_WIRE, 1, &eb, &d), 0);
    f->now += 2000ull * 1000000ull;
    kvf__cache_tick_locked(f->c, 1000000);
    kvf__cache_stats_locked(f->c, &st);
    assert_int_equal(st.expired_reservations, 1);
    assert_int_equal(st.reserved, 1);
    assert_int_equal(kvf__cache_claim_locked(f->c, 1, &a, 1000, 7, KVF_CACHE_VIA_WIRE, &ea, &d),
                     KVF_ENOENT);
    assert_int_equal(kvf__cache_commit_locked(f->c, eb, 7), 0);
    /* Claim: only the owner, only an un-held reservation, only the same length. */
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 1, &a, 1000, 7, 0, KVF_CACHE_VIA_WIRE, 0, &ea, &d), 0);
    assert_int_equal(kvf__cache_claim_locked(f->c, 1, &a, 1000, 8, KVF_CACHE_VIA_WIRE, &ea, &d),
                     KVF_ENOENT);
    assert_int_equal(kvf__cache_claim_locked(f->c, 1, &a, 999, 7, KVF_CACHE_VIA_WIRE, &ea, &d),
                     KVF_EINVAL);
    assert_int_equal(kvf__cache_claim_locked(f->c, 1, &a, 1000, 7, KVF_CACHE_VIA_WIRE, &ea, &d), 0);
    assert_int_equal(kvf__cache_claim_locked(f->c, 1, &a, 1000, 7, KVF_CACHE_VIA_WIRE, &ea, &d),
                     KVF_ENOENT);
    assert_int_equal(kvf__cache_commit_locked(f->c, ea, 7), 0);
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_unlock(f->c);
    fx_close(f);
}

static void test_store_cache_clear_and_entry_limit(void **state)
{
    (void)state;
    fixture *f = fx_open(8u << 20, "lru", 1024);
    kvf__cache_lock(f->c);
    for (uint64_t i = 0; i < 300; i++) {
        assert_int_equal(put(f, 1, i, 100), 0);
        assert_int_equal(put(f, 2, i, 100), 0);
    }
    kvf_key k = K(5);
    assert_int_equal(kvf__cache_pin_locked(f->c, 1, &k, 60000), 0);
    assert_int_equal(kvf__cache_clear_locked(f->c, 1, 0), 300);
    assert_false(has(f, 1, 5));
    assert_true(has(f, 2, 5));
    assert_int_equal(kvf__cache_clear_locked(f->c, 0, 1), 300);
    /* More keys than entries: the entry table, not the arena, forces eviction. */
    for (uint64_t i = 0; i < 3000; i++)
        assert_int_equal(put(f, 3, i, 100), 0);
    kvf_cache_stats st;
    kvf__cache_stats_locked(f->c, &st);
    assert_int_equal(st.entries, 1024);
    assert_true(has(f, 3, 2999));
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_unlock(f->c);
    fx_close(f);
}

/* S3-FIFO keeps a re-read working set that LRU loses to a one-pass scan. */
static void test_store_cache_s3fifo_resists_scans(void **state)
{
    (void)state;
    uint64_t hot_hits[2] = {0, 0};
    const char *pol[2] = {"lru", "s3fifo"};
    for (int p = 0; p < 2; p++) {
        fixture *f = fx_open(4u << 20, pol[p], 0);
        kvf__cache_lock(f->c);
        uint64_t scan = 10000;
        for (int round = 0; round < 40; round++) {
            for (uint64_t h = 0; h < 20; h++) {
                kvf_key k = K(h);
                uint32_t r;
                const uint8_t *d;
                uint64_t len;
                if (kvf__cache_acquire_locked(f->c, 1, &k, &r, &d, &len) == 0) {
                    hot_hits[p]++;
                    kvf__cache_release_locked(f->c, r);
                } else {
                    assert_int_equal(put(f, 1, h, 64 * 1024), 0);
                }
            }
            for (int s = 0; s < 80; s++)
                assert_int_equal(put(f, 1, scan++, 64 * 1024), 0);
        }
        assert_int_equal(kvf__cache_check_locked(f->c), 0);
        kvf__cache_unlock(f->c);
        fx_close(f);
    }
    /* 20 hot entries and 80 scan entries per round in a cache of about 60: the reuse distance of
     * a hot entry (100) exceeds the capacity, so LRU loses it every round; S3-FIFO sends it to
     * the main queue on its return through the ghost and keeps it there. */
    print_message("hot hits of 800: lru %llu, s3fifo %llu\n", (unsigned long long)hot_hits[0],
                  (unsigned long long)hot_hits[1]);
    assert_true(hot_hits[0] < 100);
    assert_true(hot_hits[1] >= 600);
}

static void test_store_cache_swap(void **state)
{
    (void)state;
    fixture *f = fx_open(4u << 20, "lru", 0);
    kvf__cache_lock(f->c);
    assert_int_equal(put(f, 1, 1, 5000), 0);
    kvf_key k = K(1);
    uint32_t r;
    const uint8_t *p;
    uint64_t len;
    assert_int_equal(kvf__cache_acquire_locked(f->c, 1, &k, &r, &p, &len), 0);
    uint64_t off;
    uint8_t *dst;
    assert_int_equal(kvf__cache_swap_begin_locked(f->c, r, 2000, &off, &dst), 0);
    memset(dst, 0x77, 2000);
    assert_int_equal(kvf__cache_swap_locked(f->c, r, off, 2000), 0);
    kvf__cache_release_locked(f->c, r);
    assert_int_equal(kvf__cache_acquire_locked(f->c, 1, &k, &r, &p, &len), 0);
    assert_int_equal(len, 2000);
    assert_int_equal(p[1999], 0x77);
    /* A second reader makes the swap give up. */
    uint32_t r2;
    assert_int_equal(kvf__cache_acquire_locked(f->c, 1, &k, &r2, &p, &len), 0);
    assert_int_equal(kvf__cache_swap_begin_locked(f->c, r, 1000, &off, &dst), 0);
    assert_int_equal(kvf__cache_swap_locked(f->c, r, off, 1000), KVF_EBUSY);
    kvf__cache_release_locked(f->c, r2);
    kvf__cache_release_locked(f->c, r);
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_unlock(f->c);
    fx_close(f);
}

/* Quotas: a tenant over its byte quota evicts its own oldest entries, never another tenant's nor
 * untenanted ones, though the arena has room; its outstanding reservations are bounded; a tenant
 * whose own entries cannot go (pinned) is refused with KVF_EQUOTA. Accounting stays exact. */
static void tenant_quotas(const char *policy)
{
    fixture *f = fx_open(16u << 20, policy, 0);
    kvf__cache_lock(f->c);
    kvf__cache_quota_set_locked(f->c, 1, 10 * 4096, 0);
    kvf__cache_quota_set_locked(f->c, 3, 0, 2);
    uint32_t eid;
    uint8_t *dst;
    for (uint64_t i = 0; i < 8; i++) { /* tenant 2 and nobody's, no quota */
        kvf_key k = K(1000 + i);
        assert_int_equal(kvf__cache_reserve_locked(f->c, 9, &k, 4096, 1, i & 1 ? 2 : 0,
                                                   KVF_CACHE_VIA_WIRE, 1, &eid, &dst),
                         0);
        assert_int_equal(kvf__cache_commit_locked(f->c, eid, 1), 0);
    }
    for (uint64_t i = 0; i < 30; i++) {
        kvf_key k = K(i);
        assert_int_equal(
            kvf__cache_reserve_locked(f->c, 7, &k, 4096, 1, 1, KVF_CACHE_VIA_WIRE, 1, &eid, &dst),
            0);
        assert_int_equal(kvf__cache_commit_locked(f->c, eid, 1), 0);
        assert_int_equal(kvf__cache_check_locked(f->c), 0);
    }
    kvf_cache_tenant_stats ts;
    kvf__cache_tenant_stats_locked(f->c, 1, &ts);
    assert_int_equal(ts.bytes, 10 * 4096);
    assert_int_equal(ts.entries, 10);
    assert_int_equal(ts.quota_evictions, 20);
    for (uint64_t i = 0; i < 8; i++)
        assert_true(has(f, 9, 1000 + i));
    for (uint64_t i = 20; i < 30; i++)
        assert_true(has(f, 7, i));
    /* Pinned, tenant 1's entries cannot go: a reservation beyond its quota is refused. */
    for (uint64_t i = 20; i < 30; i++) {
        kvf_key k = K(i);
        assert_int_equal(kvf__cache_pin_locked(f->c, 7, &k, 60000), 0);
    }
    kvf_key k = K(99);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 7, &k, 4096, 1, 1, KVF_CACHE_VIA_WIRE, 1, &eid, &dst),
        KVF_EQUOTA);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 7, &k, 11 * 4096, 1, 2, KVF_CACHE_VIA_WIRE, 1, &eid, &dst),
        0); /* tenant 2 has no quota */
    kvf__cache_abort_locked(f->c, eid, 1);
    /* Tenant 3: two reservations outstanding, the third refused until one commits. */
    uint32_t e3[3];
    for (uint64_t i = 0; i < 2; i++) {
        kvf_key kk = K(500 + i);
        assert_int_equal(kvf__cache_reserve_locked(f->c, 5, &kk, 4096, 1, 3, KVF_CACHE_VIA_WIRE, 0,
                                                   &e3[i], &dst),
                         0);
    }
    kvf_key k3 = K(502);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 5, &k3, 4096, 1, 3, KVF_CACHE_VIA_WIRE, 0, &e3[2], &dst),
        KVF_EQUOTA);
    kvf__cache_abort_owner_locked(f->c, 1);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 5, &k3, 4096, 1, 3, KVF_CACHE_VIA_WIRE, 1, &e3[2], &dst),
        0);
    assert_int_equal(kvf__cache_commit_locked(f->c, e3[2], 1), 0);
    kvf__cache_tenant_stats_locked(f->c, 3, &ts);
    assert_int_equal(ts.reserved, 0);
    assert_int_equal(ts.entries, 1);
    assert_int_equal(ts.quota_rejected, 1);
    assert_int_equal(kvf__cache_check_locked(f->c), 0);
    kvf__cache_unlock(f->c);
    fx_close(f);
}

static void test_store_cache_tenant_quotas_lru(void **state)
{
    (void)state;
    tenant_quotas("lru");
}

static void test_store_cache_tenant_quotas_s3fifo(void **state)
{
    (void)state;
    tenant_quotas("s3fifo");
}

static void test_store_cache_open_errors(void **state)
{
    (void)state;
    kvf_cache *c;
    char err[200];
    kvf_cache_opts o = {.memory = 4u << 20, .evict = "fifo"};
    assert_int_equal(kvf__cache_open(&c, &o, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "fifo"));
    o.evict = NULL;
    o.memory = 1000;
    assert_int_equal(kvf__cache_open(&c, &o, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "minimum"));
}
/* ------------------------------------------------------------------------------------------ */
/* Server */

/* Regression: when a loop's setup failed, the loops after it still held the wake-pipe
 * descriptors 0 of calloc, and closing the server closed descriptor 0 (stdin) twice. */
static void test_store_server_failed_open_closes_only_its_own(void **state)
{
    (void)state;
    if (fcntl(0, F_GETFD) == -1) /* descriptor 0 must be open for the check to mean anything */
        assert_int_equal(open("/dev/null", O_RDONLY), 0);
    fixture *f = fx_open(4u << 20, "lru", 0);
    kvf_server_opts o = {.threads = 4, .poller = "no-such-poller", .cache = f->c};
    kvf_server *s = NULL;
    char err[200] = "";
    assert_int_not_equal(kvf__server_open(&s, &o, err, sizeof err), 0);
    assert_null(s);
    assert_non_null(strstr(err, "no-such-poller"));
    assert_int_not_equal(fcntl(0, F_GETFD), -1);
    fx_close(f);
}

/* ------------------------------------------------------------------------------------------ */
/* Replication of hot entries (replicate.c) */

static void *srv_main(void *arg)
{
    kvf__server_run(arg);
    return NULL;
}

/* Entry i of f: a kvf object of key K(i) (the target's put verifies what it is sent). */
static void put_obj(fixture *f, uint64_t i)
{
    uint8_t seg[2][512];
    const void *segs[2] = {seg[0], seg[1]};
    memset(seg, (int)(i & 0xff), sizeof seg);
    uint8_t obj[2048];
    size_t len;
    kvf_key k = K(i);
    assert_int_equal(
        kvf_obj_encode(&k, 7, 16, 2, segs, 512, KVF_CODEC_NONE, obj, sizeof obj, &len, NULL), 0);
    uint32_t eid;
    uint8_t *dst;
    kvf__cache_lock(f->c);
    assert_int_equal(
        kvf__cache_reserve_locked(f->c, 5, &k, len, 42, 0, KVF_CACHE_VIA_WIRE, 1, &eid, &dst), 0);
    memcpy(dst, obj, len);
    assert_int_equal(kvf__cache_commit_locked(f->c, eid, 42), 0);
    kvf__cache_unlock(f->c);
}

static void read_n(fixture *f, uint64_t i, int n)
{
    kvf_key k = K(i);
    for (int r = 0; r < n; r++) {
        uint32_t eid;
        const uint8_t *d;
        uint64_t len;
        kvf__cache_lock(f->c);
        assert_int_equal(kvf__cache_acquire_locked(f->c, 5, &k, &eid, &d, &len), 0);
        kvf__cache_release_locked(f->c, eid);
        kvf__cache_unlock(f->c);
    }
}

/* Entries read 3 times are copied to the peer that ranks first for their key (of two: one a real
 * node, one refusing), byte for byte; those read twice are not; a key whose first peer refuses
 * goes to the other after the refusal; closing with copies queued drops their references. */
static void test_store_replicate_hot_entries(void **state)
{
    (void)state;
    fixture *a = fx_open(4u << 20, "lru", 0), *b = fx_open(4u << 20, "lru", 0);
    kvf_server_opts so = {.host = "127.0.0.1", .threads = 1, .cache = b->c, .verify_puts = 1};
    kvf_server *srv = NULL;
    char err[300] = "", live[64], dead[64];
    assert_int_equal(kvf__server_open(&srv, &so, err, sizeof err), 0);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, srv_main, srv), 0);
    snprintf(live, sizeof live, "127.0.0.1:%u", (unsigned)kvf__server_port(srv));
    snprintf(dead, sizeof dead, "127.0.0.1:1");        /* nothing listens on port 1 */
    const char *peers[] = {live, dead, "127.0.0.1:9"}; /* the third is this node: left out */
    kvf__replicate_opts ro = {
        .cache = a->c, .self = "127.0.0.1:9", .peers = peers, .n_peers = 3, .hits = 3};
    kvf__replicator *r = NULL;
    assert_int_equal(kvf__replicator_open(&r, &ro, err, sizeof err), 0);
    kvf__replicate_stats st;
    kvf__replicator_stats(r, &st);
    assert_int_equal(st.peers, 2);
    /* which keys rank the live node first among the two peers: as a client of both places
     * them (the order a rerouting client follows is the one the copies must follow) */
    const char *both[2] = {live, dead};
    kvf_client_opts co = {.nodes = both, .n_nodes = 2, .ns = 5, .transport = "tcp"};
    kvf_client *cl = NULL;
    assert_int_equal(kvf_client_open(&cl, &co, err, sizeof err), 0);
    int live_first[24], n_live = 0;
    for (uint64_t i = 0; i < 24; i++) {
        kvf_key k = K(i);
        live_first[i] = kvf_client_node_of(cl, &k) == 0;
        n_live += live_first[i];
        put_obj(a, i);
    }
    kvf_client_close(&cl);
    assert_true(n_live > 0 && n_live < 24);
    for (uint64_t i = 0; i < 24; i++)
        read_n(a, i, i < 16 ? 3 : 2); /* 0..15 hot, the rest not */
    /* every hot key ends on the live node: directly, or after its first peer refused */
    int done = 0;
    for (int t = 0; t < 500 && !done; t++) {
        usleep(10000);
        done = 1;
        for (uint64_t i = 0; i < 16; i++) {
            kvf__cache_lock(b->c); /* b's server thread writes it */
            int there = has(b, 5, i);
            kvf__cache_unlock(b->c);
            if (!there) /* a failed copy is asked for again at a later read */
                read_n(a, i, 1);
            done = done && there;
        }
    }
    assert_true(done);
    kvf__cache_lock(b->c);
    for (uint64_t i = 16; i < 24; i++)
        assert_false(has(b, 5, i));
    kvf__cache_unlock(b->c);
    /* the copies are the same bytes */
    for (uint64_t i = 0; i < 16; i++) {
        kvf_key k = K(i);
        uint32_t ea, eb;
        const uint8_t *da, *db;
        uint64_t la, lb;
        kvf__cache_lock(a->c);
        assert_int_equal(kvf__cache_acquire_locked(a->c, 5, &k, &ea, &da, &la), 0);
        kvf__cache_lock(b->c);
        assert_int_equal(kvf__cache_acquire_locked(b->c, 5, &k, &eb, &db, &lb), 0);
        assert_int_equal(la, lb);
        assert_memory_equal(da, db, la);
        kvf__cache_release_locked(b->c, eb);
        kvf__cache_unlock(b->c);
        kvf__cache_release_locked(a->c, ea);
        kvf__cache_unlock(a->c);
    }
    /* the node stored them before the push's answer came back and was counted */
    for (int t = 0; t < 500 && (kvf__replicator_stats(r, &st), st.made < 16); t++)
        usleep(10000);
    assert_true(st.made >= 16);
    int dead_first = 0;
    for (uint64_t i = 0; i < 16; i++)
        dead_first += !live_first[i];
    if (dead_first) /* those went to the refusing node first */
        assert_true(st.failed >= 1);
    kvf__replicator_close(&r);
    assert_null(r);
    kvf__replicator_close(&r); /* NULL is accepted */
    /* no reference is left behind: every entry can be removed */
    kvf__cache_lock(a->c);
    for (uint64_t i = 0; i < 24; i++) {
        kvf_key k = K(i);
        assert_int_equal(kvf__cache_remove_locked(a->c, 5, &k), 0);
    }
    kvf_cache_stats cs;
    kvf__cache_stats_locked(a->c, &cs);
    assert_int_equal(cs.referenced, 0);
    kvf__cache_unlock(a->c);
    kvf__server_stop(srv);
    pthread_join(th, NULL);
    kvf__server_close(&srv);
    fx_close(a);
    fx_close(b);
}

/* --replicas 3: each hot entry goes to the two peers its key ranks first (here the only two),
 * so that its hits outlive two of its three holders; one that is not hot goes to neither. */
static void test_store_replicate_to_k_nodes(void **state)
{
    (void)state;
    fixture *a = fx_open(4u << 20, "lru", 0),
            *p[2] = {fx_open(4u << 20, "lru", 0), fx_open(4u << 20, "lru", 0)};
    kvf_server *srv[2] = {NULL, NULL};
    pthread_t th[2];
    char err[300] = "", addr[2][64];
    for (int i = 0; i < 2; i++) {
        kvf_server_opts so = {
            .host = "127.0.0.1", .threads = 1, .cache = p[i]->c, .verify_puts = 1};
        assert_int_equal(kvf__server_open(&srv[i], &so, err, sizeof err), 0);
        assert_int_equal(pthread_create(&th[i], NULL, srv_main, srv[i]), 0);
        snprintf(addr[i], sizeof addr[i], "127.0.0.1:%u", (unsigned)kvf__server_port(srv[i]));
    }
    const char *peers[] = {addr[0], addr[1]};
    kvf__replicate_opts ro = {
        .cache = a->c, .self = "127.0.0.1:9", .peers = peers, .n_peers = 2, .hits = 2, .copies = 2};
    kvf__replicator *r = NULL;
    assert_int_equal(kvf__replicator_open(&r, &ro, err, sizeof err), 0);
    for (uint64_t i = 0; i < 12; i++) {
        put_obj(a, i);
        read_n(a, i, i < 8 ? 2 : 1); /* 0..7 hot */
    }
    kvf__replicate_stats st;
    for (int t = 0; t < 500 && (kvf__replicator_stats(r, &st), st.made < 16); t++)
        usleep(10000);
    assert_int_equal(st.copies, 2);
    assert_int_equal(st.made, 16);
    assert_int_equal(st.failed, 0);
    for (int k = 0; k < 2; k++) {
        kvf__cache_lock(p[k]->c);
        for (uint64_t i = 0; i < 12; i++)
            assert_int_equal(has(p[k], 5, i), i < 8);
        kvf__cache_unlock(p[k]->c);
    }
    kvf__replicator_close(&r);
    for (int i = 0; i < 2; i++) {
        kvf__server_stop(srv[i]);
        pthread_join(th[i], NULL);
        kvf__server_close(&srv[i]);
        fx_close(p[i]);
    }
    kvf_cache_stats cs;
    kvf__cache_lock(a->c);
    kvf__cache_stats_locked(a->c, &cs);
    kvf__cache_unlock(a->c);
    assert_int_equal(cs.referenced, 0);
    fx_close(a);
}

static void test_store_replicate_bad_options(void **state)
{
    (void)state;
    fixture *a = fx_open(4u << 20, "lru", 0);
    kvf__replicator *r = NULL;
    char err[300] = "";
    const char *bad[] = {"no-port"};
    kvf__replicate_opts ro = {.cache = a->c, .self = "nohost", .hits = 2};
    assert_int_equal(kvf__replicator_open(&r, &ro, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "nohost"));
    ro.self = "127.0.0.1:5";
    ro.peers = bad, ro.n_peers = 1;
    assert_int_equal(kvf__replicator_open(&r, &ro, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "no-port"));
    ro.n_peers = 0, ro.hits = 0;
    assert_int_equal(kvf__replicator_open(&r, &ro, err, sizeof err), KVF_EINVAL);
    ro.hits = 2, ro.copies = KVF_REP_MAX_COPIES + 1;
    assert_int_equal(kvf__replicator_open(&r, &ro, err, sizeof err), KVF_EINVAL);
    assert_non_null(strstr(err, "copies"));
    assert_null(r);
    fx_close(a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_store_arena_alloc_free_coalesce),
        cmocka_unit_test(test_store_arena_exhaustion),
        cmocka_unit_test(test_store_arena_large_are_page_aligned),
        cmocka_unit_test(test_store_cache_states_and_references),
        cmocka_unit_test(test_store_cache_eviction_lru),
        cmocka_unit_test(test_store_cache_eviction_s3fifo),
        cmocka_unit_test(test_store_cache_full_of_pinned_is_enospc),
        cmocka_unit_test(test_store_cache_parts),
        cmocka_unit_test(test_store_cache_leases_expire),
        cmocka_unit_test(test_store_cache_clear_and_entry_limit),
        cmocka_unit_test(test_store_cache_s3fifo_resists_scans),
        cmocka_unit_test(test_store_cache_swap),
        cmocka_unit_test(test_store_cache_tenant_quotas_lru),
        cmocka_unit_test(test_store_cache_tenant_quotas_s3fifo),
        cmocka_unit_test(test_store_cache_open_errors),
        cmocka_unit_test(test_store_server_failed_open_closes_only_its_own),
        cmocka_unit_test(test_store_replicate_hot_entries),
        cmocka_unit_test(test_store_replicate_to_k_nodes),
        cmocka_unit_test(test_store_replicate_bad_options),
    };
    return cmocka_run_group_tests_name("store", tests, NULL, NULL);
}
