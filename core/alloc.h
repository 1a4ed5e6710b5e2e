/*
 * The allocator seam. Library code that allocates takes a kvf_allocator (NULL means the C
 * library's), so tests can count allocations or make the n-th one fail and check that every
 * error path releases what it took. Not used on data paths, which allocate nothing per object.
 */
#ifndef KVF_CORE_ALLOC_H
#define KVF_CORE_ALLOC_H

#include <stddef.h>

typedef struct kvf_allocator {
    void *(*alloc)(void *ud, size_t size);            /* like malloc */
    void *(*realloc)(void *ud, void *p, size_t size); /* like realloc */
    void (*free)(void *ud, void *p);                  /* like free; accepts NULL */
    void *ud;
} kvf_allocator;

/* The C library's allocator. Borrowed; static. */
const kvf_allocator *kvf__allocator_default(void);

void *kvf__alloc(const kvf_allocator *a, size_t size);
void *kvf__calloc(const kvf_allocator *a, size_t n, size_t size);
void *kvf__realloc(const kvf_allocator *a, void *p, size_t size);
void kvf__free(const kvf_allocator *a, void *p);

#endif
