#include "alloc.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void *std_alloc(void *ud, size_t size)
{
    (void)ud;
    return malloc(size);
}

static void *std_realloc(void *ud, void *p, size_t size)
{
    (void)ud;
    return realloc(p, size);
}

static void std_free(void *ud, void *p)
{
    (void)ud;
    free(p);
}

static const kvf_allocator std_allocator = {
    .alloc = std_alloc,
    .realloc = std_realloc,
    .free = std_free,
    .ud = NULL,
};

const kvf_allocator *kvf__allocator_default(void)
{
    return &std_allocator;
}

void *kvf__alloc(const kvf_allocator *a, size_t size)
{
    if (!a)
        a = &std_allocator;
    return a->alloc(a->ud, size ? size : 1);
}

void *kvf__calloc(const kvf_allocator *a, size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size)
        return NULL;
    void *p = kvf__alloc(a, n * size);
    if (p)
        memset(p, 0, n * size);
    return p;
}

void *kvf__realloc(const kvf_allocator *a, void *p, size_t size)
{
    if (!a)
        a = &std_allocator;
    return a->realloc(a->ud, p, size ? size : 1);
}

void kvf__free(const kvf_allocator *a, void *p)
{
    if (!p)
        return;
    if (!a)
        a = &std_allocator;
    a->free(a->ud, p);
}
