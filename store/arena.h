/*
 * The storage node's arena allocator: a two-level segregated fit (TLSF) allocator over one region
 * taken at start. O(1) allocation and free with immediate coalescing; 16 size classes per power of
 * two bound the internal fragmentation of a class to 1/16. Not thread-safe: the cache calls it
 * under its lock.
 */
#ifndef KVF_STORE_ARENA_H
#define KVF_STORE_ARENA_H

#include <stddef.h>
#include <stdint.h>

/* Allocations are aligned to, and sized in multiples of, this many bytes. */
#define KVF_ARENA_ALIGN 64u
/* Allocations of at least KVF_ARENA_PAGE_MIN bytes start on a KVF_ARENA_PAGE boundary of the
 * region (where the region's base is one, so is their address): the disk tier writes and reads
 * such objects straight between the device and the arena (O_DIRECT wants page-aligned memory),
 * with no bounce copy. Where no aligned block is free, they are placed as any other. */
#define KVF_ARENA_PAGE     4096u
#define KVF_ARENA_PAGE_MIN (1u << 20)

typedef struct kvf_arena kvf_arena;

typedef struct kvf_arena_stats {
    uint64_t size;        /* bytes of the region managed */
    uint64_t used;        /* bytes in allocated blocks, headers included */
    uint64_t free;        /* bytes in free blocks */
    uint64_t free_blocks; /* number of free blocks (fragmentation) */
    uint64_t allocs;      /* live allocations */
} kvf_arena_stats;

/* Manages [base, base + size). base must be KVF_ARENA_ALIGN-aligned and size at least 4 KiB.
 * The arena keeps its block headers inside the region. Caller owns the result and the region;
 * free the arena with kvf__arena_destroy(). */
int kvf__arena_new(kvf_arena **out, void *base, uint64_t size);
void kvf__arena_destroy(kvf_arena **a);

/* Maps the memory an arena of *size bytes manages: anonymous (shared 0), or a memfd (on huge
 * pages where asked, *size then rounded up to 2 MiB) sealed against resizing and, where the kernel
 * can (*ro_ok), against any later writable mapping, so that a read-only view of it handed out
 * stays read-only; *fd_out gets the memfd (-1: anonymous). prefault: pages populated now. Returns
 * the mapping, or MAP_FAILED with the reason in err. */
void *kvf__arena_map(uint64_t *size, int shared, int hugepages, int prefault, int *fd_out,
                     int *ro_ok, char *err, size_t errlen);

/* Allocates n bytes. Returns 0 and the offset of the usable memory from base, or KVF_ENOSPC. */
int kvf__arena_alloc(kvf_arena *a, uint64_t n, uint64_t *off);
/* Frees an offset returned by kvf__arena_alloc. */
void kvf__arena_free(kvf_arena *a, uint64_t off);
/* The largest single allocation that could succeed now (a lower bound within one size class). */
uint64_t kvf__arena_largest_free(const kvf_arena *a);
void kvf__arena_stats_get(const kvf_arena *a, kvf_arena_stats *st);
/* Walks every block and checks the invariants (sizes, links, coalescing, free lists). Returns 0
 * or -1. For tests. */
int kvf__arena_check(const kvf_arena *a);

#endif
