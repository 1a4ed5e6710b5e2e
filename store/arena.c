/*
 * TLSF: "TLSF: a New Dynamic Memory Allocator for Real-Time Systems", M. Masmano, I. Ripoll,
 * A. Crespo, J. Real, ECRTS 2004. Free blocks sit in lists indexed by a first level (power of two)
 * and a second level (SL_COUNT linear subdivisions of it); two bitmaps find the first non-empty
 * list that is certain to fit in constant time. Blocks carry boundary tags (their size and the
 * offset of the previous physical block), so a freed block merges with free neighbours at once.
 *
 * Each block starts with a 64-byte header inside the arena; the usable memory follows it, so it is
 * 64-byte aligned. Offsets, not pointers, link blocks, and a zero-size sentinel ends the region.
 */
#include "arena.h"

#include "kvf/error.h"

#include <stdlib.h>
#include <string.h>

#define ALIGN_LOG2 6
#define SL_LOG2    4
#define SL_COUNT   (1u << SL_LOG2)
#define FL_SHIFT   (SL_LOG2 + ALIGN_LOG2) /* sizes below 1 KiB share first level 0 */
#define FL_MAX     48
#define FL_COUNT   (FL_MAX - FL_SHIFT + 2)
#define HDR        64u
#define NIL        UINT64_MAX

#define F_FREE      0x1ull
#define F_PREV_FREE 0x2ull
#define SIZE_MASK   (~0x3full)

typedef struct blk {
    uint64_t size_flags; /* block size including this header, and F_* flags */
    uint64_t prev_phys;  /* offset of the previous physical block, NIL for the first */
    uint64_t next_free;  /* free-list links, valid while free */
    uint64_t prev_free;
    uint64_t pad[4];
} blk;

struct kvf_arena {
    uint8_t *base;
    uint64_t size;
    uint64_t fl_bitmap;
    uint32_t sl_bitmap[FL_COUNT];
    uint64_t heads[FL_COUNT][SL_COUNT];
    uint64_t used, free_bytes, free_blocks, allocs;
};

static inline blk *B(const kvf_arena *a, uint64_t off)
{
    return (blk *)(a->base + off);
}

static inline uint64_t bsize(const blk *b)
{
    return b->size_flags & SIZE_MASK;
}

static inline int fls64(uint64_t x)
{
    return 63 - __builtin_clzll(x);
}

static void mapping(uint64_t size, int *fl, int *sl)
{
    if (size < (1ull << FL_SHIFT)) {
        *fl = 0;
        *sl = (int)(size >> ALIGN_LOG2);
    } else {
        int f = fls64(size);
        *sl = (int)((size >> (f - SL_LOG2)) ^ (1ull << SL_LOG2));
        *fl = f - (FL_SHIFT - 1);
    }
}

/* Rounds a request up to the start of the next class, so any block of the class found fits. */
static uint64_t round_up_class(uint64_t size)
{
    if (size >= (1ull << FL_SHIFT)) {
        uint64_t r = (1ull << (fls64(size) - SL_LOG2)) - 1;
        size = (size + r) & ~r;
    }
    return size;
}

static void list_insert(kvf_arena *a, uint64_t off)
{
    blk *b = B(a, off);
    int fl, sl;
    mapping(bsize(b), &fl, &sl);
    b->prev_free = NIL;
    b->next_free = a->heads[fl][sl];
    if (b->next_free != NIL)
        B(a, b->next_free)->prev_free = off;
    a->heads[fl][sl] = off;
    a->fl_bitmap |= 1ull << fl;
    a->sl_bitmap[fl] |= 1u << sl;
    a->free_bytes += bsize(b);
    a->free_blocks++;
}

static void list_remove(kvf_arena *a, uint64_t off)
{
    blk *b = B(a, off);
    int fl, sl;
    mapping(bsize(b), &fl, &sl);
    if (b->prev_free != NIL)
        B(a, b->prev_free)->next_free = b->next_free;
    else
        a->heads[fl][sl] = b->next_free;
    if (b->next_free != NIL)
        B(a, b->next_free)->prev_free = b->prev_free;
    if (a->heads[fl][sl] == NIL) {
        a->sl_bitmap[fl] &= ~(1u << sl);
        if (!a->sl_bitmap[fl])
            a->fl_bitmap &= ~(1ull << fl);
    }
    a->free_bytes -= bsize(b);
    a->free_blocks--;
}

static uint64_t find_suitable(const kvf_arena *a, uint64_t size)
{
    int fl, sl;
    mapping(size, &fl, &sl);
    if (fl >= FL_COUNT)
        return NIL;
    uint32_t slmap = a->sl_bitmap[fl] & (~0u << sl);
    if (!slmap) {
        uint64_t flmap = fl + 1 < 64 ? a->fl_bitmap & (~0ull << (fl + 1)) : 0;
        if (!flmap)
            return NIL;
        fl = __builtin_ctzll(flmap);
        slmap = a->sl_bitmap[fl];
    }
    sl = __builtin_ctz(slmap);
    return a->heads[fl][sl];
}

int kvf__arena_new(kvf_arena **out, void *base, uint64_t size)
{
    *out = NULL;
    if (!base || ((uintptr_t)base & (KVF_ARENA_ALIGN - 1)) || size < 4096)
        return KVF_EINVAL;
    kvf_arena *a = calloc(1, sizeof *a);
    if (!a)
        return KVF_ENOMEM;
    a->base = base;
    a->size = size & ~(uint64_t)(KVF_ARENA_ALIGN - 1);
    for (int f = 0; f < FL_COUNT; f++)
        for (int s = 0; s < (int)SL_COUNT; s++)
            a->heads[f][s] = NIL;
    /* One free block spanning the region, then the sentinel. */
    uint64_t span = a->size - HDR;
    blk *first = B(a, 0);
    memset(first, 0, sizeof *first);
    first->size_flags = span | F_FREE;
    first->prev_phys = NIL;
    blk *sent = B(a, span);
    memset(sent, 0, sizeof *sent);
    sent->size_flags = F_PREV_FREE;
    sent->prev_phys = 0;
    list_insert(a, 0);
    *out = a;
    return 0;
}

void kvf__arena_destroy(kvf_arena **a)
{
    if (!a || !*a)
        return;
    free(*a);
    *a = NULL;
}

/* For a large allocation (KVF_ARENA_PAGE_MIN): a free block that holds need bytes starting at a
 * page boundary of the region, removed from its list and cut so that it starts there (the part
 * before it a free block of its own); NIL where none is free. */
static uint64_t take_aligned(kvf_arena *a, uint64_t need)
{
    const uint64_t P = KVF_ARENA_PAGE, MIN = HDR + KVF_ARENA_ALIGN; /* the smallest block */
    /* a block that fits as it is and already starts there (a large block freed: the arena's
     * large blocks are recycled so, object after object of one size), else one with room for the
     * data at the next page boundary and for the part before it to be a block */
    uint64_t o = find_suitable(a, round_up_class(need));
    if (o != NIL && (o + HDR) % P == 0) {
        list_remove(a, o);
        return o;
    }
    o = find_suitable(a, round_up_class(need + P + MIN));
    if (o == NIL)
        return NIL;
    list_remove(a, o);
    blk *b = B(a, o);
    uint64_t have = bsize(b);
    uint64_t u = (o + HDR + P - 1) / P * P; /* the usable memory's offset */
    if (u - HDR > o && u - HDR - o < MIN)
        u += P;
    uint64_t lead = u - HDR - o;
    if (!lead)
        return o;
    /* [o, o + lead) stays free (its previous block is in use: free blocks are always merged) */
    uint64_t no = o + lead;
    blk *nb = B(a, no);
    nb->prev_phys = o;
    nb->size_flags = (have - lead) | F_PREV_FREE;
    B(a, o + have)->prev_phys = no;
    b->size_flags = lead | F_FREE | (b->size_flags & F_PREV_FREE);
    list_insert(a, o);
    return no;
}

int kvf__arena_alloc(kvf_arena *a, uint64_t n, uint64_t *off)
{
    if (n == 0 || n > a->size)
        return KVF_ENOSPC;
    uint64_t need = (n + HDR + KVF_ARENA_ALIGN - 1) & ~(uint64_t)(KVF_ARENA_ALIGN - 1);
    uint64_t o = n >= KVF_ARENA_PAGE_MIN ? take_aligned(a, need) : NIL;
    if (o == NIL) {
        o = find_suitable(a, round_up_class(need));
        if (o == NIL)
            return KVF_ENOSPC;
        list_remove(a, o);
    }
    blk *b = B(a, o);
    uint64_t have = bsize(b);
    uint64_t nxt = o + have;
    if (have - need >= HDR + KVF_ARENA_ALIGN) {
        /* Split: the tail becomes a free block. */
        uint64_t r = o + need;
        blk *rb = B(a, r);
        rb->size_flags = (have - need) | F_FREE;
        rb->prev_phys = o;
        B(a, nxt)->prev_phys = r;
        B(a, nxt)->size_flags |= F_PREV_FREE;
        list_insert(a, r);
        have = need;
    } else {
        B(a, nxt)->size_flags &= ~F_PREV_FREE;
    }
    b->size_flags = have | (b->size_flags & F_PREV_FREE);
    a->used += have;
    a->allocs++;
    *off = o + HDR;
    return 0;
}

void kvf__arena_free(kvf_arena *a, uint64_t uoff)
{
    uint64_t o = uoff - HDR;
    blk *b = B(a, o);
    uint64_t sz = bsize(b);
    a->used -= sz;
    a->allocs--;
    /* Merge with the next block if it is free. */
    uint64_t nx = o + sz;
    blk *nb = B(a, nx);
    if (nb->size_flags & F_FREE) {
        list_remove(a, nx);
        sz += bsize(nb);
    }
    /* Merge with the previous block if it is free. */
    if (b->size_flags & F_PREV_FREE) {
        uint64_t pv = b->prev_phys;
        list_remove(a, pv);
        sz += bsize(B(a, pv));
        o = pv;
        b = B(a, o);
    }
    b->size_flags = sz | F_FREE | (b->size_flags & F_PREV_FREE);
    uint64_t after = o + sz;
    B(a, after)->prev_phys = o;
    B(a, after)->size_flags |= F_PREV_FREE;
    list_insert(a, o);
}

uint64_t kvf__arena_largest_free(const kvf_arena *a)
{
    if (!a->fl_bitmap)
        return 0;
    /* The largest block lives in the highest non-empty list; scan that list only. */
    int fl = fls64(a->fl_bitmap);
    int sl = fls64(a->sl_bitmap[fl]);
    uint64_t best = 0;
    for (uint64_t o = a->heads[fl][sl]; o != NIL; o = B(a, o)->next_free)
        if (bsize(B(a, o)) > best)
            best = bsize(B(a, o));
    return best > HDR ? best - HDR : 0;
}

void kvf__arena_stats_get(const kvf_arena *a, kvf_arena_stats *st)
{
    st->size = a->size;
    st->used = a->used;
    st->free = a->free_bytes;
    st->free_blocks = a->free_blocks;
    st->allocs = a->allocs;
}

int kvf__arena_check(const kvf_arena *a)
{
    uint64_t o = 0, prev = NIL, free_bytes = 0, free_blocks = 0, used = 0;
    int prev_free = 0;
    for (;;) {
        blk *b = B(a, o);
        uint64_t sz = bsize(b);
        if (b->prev_phys != prev && prev != NIL)
            return -1;
        if (((b->size_flags & F_PREV_FREE) != 0) != prev_free)
            return -1;
        if (sz == 0)
            break; /* sentinel */
        if (sz % KVF_ARENA_ALIGN || o + sz > a->size)
            return -1;
        int is_free = (b->size_flags & F_FREE) != 0;
        if (is_free && prev_free)
            return -1; /* two adjacent free blocks were not merged */
        if (is_free) {
            free_bytes += sz;
            free_blocks++;
            int fl, sl;
            mapping(sz, &fl, &sl);
            uint64_t x = a->heads[fl][sl];
            while (x != NIL && x != o)
                x = B(a, x)->next_free;
            if (x != o)
                return -1; /* free block missing from its list */
        } else {
            used += sz;
        }
        prev_free = is_free;
        prev = o;
        o += sz;
    }
    if (o + HDR != a->size)
        return -1;
    if (free_bytes != a->free_bytes || free_blocks != a->free_blocks || used != a->used)
        return -1;
    return 0;
}
