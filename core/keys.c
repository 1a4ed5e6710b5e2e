/*
 * Prefix-chained chunk keys, as fixed by design.md ("Key") and specified byte by byte in
 * docs/keys.md:
 *   seed   = XXH3_64(KVFK | u32 key version | u32 len | model id | u64 layout fp | u32 len | salt)
 *   key[0] = XXH3_128(u64 seed | tokens of chunk 0 as u32 LE)
 *   key[i] = XXH3_128(u64 key[i-1].lo | u64 key[i-1].hi | tokens of chunk i as u32 LE)
 * XXH3 is libxxhash's (Yann Collet, xxHash specification "XXH3"), with seed 0 everywhere. Hashing
 * the previous key in front of the chunk makes every key depend on the whole prefix, so equal keys
 * mean equal prefixes, and the seed in front of the first chunk separates models, layouts and
 * tenants.
 */
#include "kvf/error.h"
#include "kvf/layout.h"

#include "bytes.h"

#include <string.h>

#define XXH_STATIC_LINKING_ONLY
#include <xxhash.h>

int kvf_keyspace_init(kvf_keyspace *ks, const kvf_layout *l, const void *salt, size_t salt_len)
{
    uint64_t fp;
    if (!ks || kvf_layout_fingerprint(l, &fp) != 0)
        return KVF_EINVAL;
    if (salt_len > KVF_SALT_MAX)
        return KVF_E2BIG;
    if (salt_len && !salt)
        return KVF_EINVAL;
    uint8_t buf[4 + 4 + 4 + KVF_MODEL_ID_MAX + 8 + 4 + KVF_SALT_MAX];
    kvf__wbuf w = {buf, 0, sizeof buf, 0};
    uint32_t idlen = (uint32_t)strlen(l->model_id);
    kvf__wbuf_bytes(&w, "KVFK", 4);
    kvf__wbuf_u32(&w, KVF_KEY_FORMAT_VERSION);
    kvf__wbuf_u32(&w, idlen);
    kvf__wbuf_bytes(&w, l->model_id, idlen);
    kvf__wbuf_u64(&w, fp);
    kvf__wbuf_u32(&w, (uint32_t)salt_len);
    kvf__wbuf_bytes(&w, salt, salt_len);
    if (w.overflow)
        return KVF_EOVERFLOW;
    ks->seed = XXH3_64bits(buf, w.len);
    ks->layout_fp = fp;
    ks->chunk_tokens = l->chunk_tokens;
    return 0;
}

/* Feeds n tokens to the hash as little-endian u32. On little-endian hosts that is the array as it
 * is; elsewhere the tokens are converted through a small buffer. */
static void update_tokens(XXH3_state_t *st, const uint32_t *tokens, size_t n)
{
    if (kvf__host_is_le()) {
        XXH3_128bits_update(st, tokens, n * sizeof *tokens);
        return;
    }
    uint8_t tmp[256 * 4];
    while (n) {
        size_t k = n < 256 ? n : 256;
        for (size_t i = 0; i < k; i++)
            kvf__put_u32(tmp + 4 * i, tokens[i]);
        XXH3_128bits_update(st, tmp, k * 4);
        tokens += k;
        n -= k;
    }
}

kvf_key kvf_key_next(const kvf_keyspace *ks, const kvf_key *prev, const uint32_t *tokens)
{
    XXH3_state_t st;
    uint8_t head[16];
    size_t head_len;
    if (prev) {
        kvf__put_u64(head, prev->lo);
        kvf__put_u64(head + 8, prev->hi);
        head_len = 16;
    } else {
        kvf__put_u64(head, ks->seed);
        head_len = 8;
    }
    XXH3_128bits_reset(&st);
    XXH3_128bits_update(&st, head, head_len);
    update_tokens(&st, tokens, ks->chunk_tokens);
    XXH128_hash_t h = XXH3_128bits_digest(&st);
    kvf_key k = {.lo = h.low64, .hi = h.high64};
    return k;
}

int kvf_keys_compute(const kvf_keyspace *ks, const uint32_t *tokens, size_t n_tokens, kvf_key *keys,
                     size_t max_keys, size_t *n_keys, size_t *leftover)
{
    if (!ks || ks->chunk_tokens == 0 || !n_keys || (n_tokens && !tokens) || (max_keys && !keys))
        return KVF_EINVAL;
    size_t full = n_tokens / ks->chunk_tokens;
    size_t n = full < max_keys ? full : max_keys;
    for (size_t i = 0; i < n; i++)
        keys[i] = kvf_key_next(ks, i ? &keys[i - 1] : NULL, tokens + i * ks->chunk_tokens);
    *n_keys = n;
    if (leftover)
        *leftover = n_tokens - n * ks->chunk_tokens;
    return 0;
}

char *kvf_key_to_hex(const kvf_key *k, char buf[33])
{
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 16; i++) {
        buf[i] = digits[(k->hi >> (60 - 4 * i)) & 0xf];
        buf[16 + i] = digits[(k->lo >> (60 - 4 * i)) & 0xf];
    }
    buf[32] = '\0';
    return buf;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int kvf_key_from_hex(const char *hex, kvf_key *out)
{
    if (!hex || strlen(hex) != 32)
        return KVF_EINVAL;
    uint64_t hi = 0, lo = 0;
    for (int i = 0; i < 32; i++) {
        int v = hexval(hex[i]);
        if (v < 0)
            return KVF_EINVAL;
        if (i < 16)
            hi = (hi << 4) | (uint64_t)v;
        else
            lo = (lo << 4) | (uint64_t)v;
    }
    out->hi = hi;
    out->lo = lo;
    return 0;
}
