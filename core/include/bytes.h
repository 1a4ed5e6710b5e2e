/*
 * Little-endian encoding helpers shared by the canonical encodings (layouts, keys) and the wire
 * codec. Every multi-byte integer kvfabric writes to a hash, a file or a socket is little-endian;
 * these helpers make that independent of the host's byte order.
 */
#ifndef KVF_CORE_BYTES_H
#define KVF_CORE_BYTES_H

#include <stdint.h>
#include <string.h>

static inline void kvf__put_u16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static inline void kvf__put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static inline void kvf__put_u64(uint8_t *p, uint64_t v)
{
    kvf__put_u32(p, (uint32_t)v);
    kvf__put_u32(p + 4, (uint32_t)(v >> 32));
}

static inline uint16_t kvf__get_u16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t kvf__get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline uint64_t kvf__get_u64(const uint8_t *p)
{
    return (uint64_t)kvf__get_u32(p) | ((uint64_t)kvf__get_u32(p + 4) << 32);
}

static inline int kvf__host_is_le(void)
{
    const uint16_t one = 1;
    uint8_t b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* MurmurHash3's 64-bit finalizer (fmix64): spreads every input bit over the output. Used to turn
 * keys that are already hashes, or small integers, into table slots and placement scores. */
static inline uint64_t kvf__fmix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

/* SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014):
 * advances *state and returns the next value of a fixed, portable sequence. Seeds synthetic
 * tokens, KV bytes and weights, so that every run and every language reproduces them. */
static inline uint64_t kvf__splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A bounded append-only byte writer; overflow is sticky and checked once at the end. */
typedef struct kvf__wbuf {
    uint8_t *p;
    size_t len;
    size_t cap;
    int overflow;
} kvf__wbuf;

static inline void kvf__wbuf_bytes(kvf__wbuf *w, const void *src, size_t n)
{
    if (w->overflow || n > w->cap - w->len) {
        w->overflow = 1;
        return;
    }
    if (n)
        memcpy(w->p + w->len, src, n);
    w->len += n;
}

static inline void kvf__wbuf_u32(kvf__wbuf *w, uint32_t v)
{
    uint8_t b[4];
    kvf__put_u32(b, v);
    kvf__wbuf_bytes(w, b, 4);
}

static inline void kvf__wbuf_u64(kvf__wbuf *w, uint64_t v)
{
    uint8_t b[8];
    kvf__put_u64(b, v);
    kvf__wbuf_bytes(w, b, 8);
}

#endif
