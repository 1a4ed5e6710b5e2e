/*
 * XXH3-64 of object bytes at the widest vector width this CPU has. Debian's libxxhash exports
 * runtime-dispatched entry points (xxh_x86dispatch.h: SSE2, AVX2 or AVX-512, chosen once) next to
 * the portable ones, which are built for the baseline only: on this project's machines they hash
 * about 3x faster, and checksums are on every object's data path. The values are the same either
 * way. Where the library offers no dispatch (other CPUs, other builds) the portable ones serve.
 */
#ifndef KVF_CORE_HASH_H
#define KVF_CORE_HASH_H

#include <stddef.h>
#include <stdint.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

#ifdef KVF_HAVE_XXH_DISPATCH
#include <xxh_x86dispatch.h>
#endif

static inline uint64_t kvf__xxh3(const void *p, size_t n)
{
#ifdef KVF_HAVE_XXH_DISPATCH
    return XXH3_64bits_dispatch(p, n);
#else
    return XXH3_64bits(p, n);
#endif
}

static inline void kvf__xxh3_update(XXH3_state_t *s, const void *p, size_t n)
{
#ifdef KVF_HAVE_XXH_DISPATCH
    XXH3_64bits_update_dispatch(s, p, n);
#else
    XXH3_64bits_update(s, p, n);
#endif
}

#endif
