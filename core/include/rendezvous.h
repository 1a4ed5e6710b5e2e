/*
 * Rendezvous hashing (highest random weight; Thaler and Ravishankar, 1996): a key goes to the node
 * whose score for it is highest. The client places keys by it (client/place.c); a storage node
 * copies a hot entry to the node that comes next for its key (store/replicate.c), where a client
 * that finds the first node down looks. Both must score alike: they share these.
 */
#ifndef KVF_CORE_RENDEZVOUS_H
#define KVF_CORE_RENDEZVOUS_H

#include "bytes.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

/* A key's score on the node of seed. */
static inline uint64_t kvf__rendezvous_score(uint64_t key_lo, uint64_t key_hi, uint64_t seed)
{
    return kvf__fmix64(key_lo ^ kvf__fmix64(key_hi ^ seed));
}

/* A node's seed: XXH3 of its address as "host:port", the host as kvf__addr_parse gives it. */
static inline uint64_t kvf__rendezvous_seed(const char *host, uint16_t port)
{
    char a[320];
    int n = snprintf(a, sizeof a, "%s:%u", host, (unsigned)port);
    return XXH3_64bits(a, n > 0 && (size_t)n < sizeof a ? (size_t)n : strlen(a));
}

#endif
