/*
 * The segment codecs (kvf/codec.h, codec.h). LZ4 is liblz4's block format; byte shuffling
 * (grouping byte i of every 16-bit element, as HDF5's and Blosc's shuffle filters do) is ours.
 */
#include "kvf/codec.h"

#include "codec.h"

#include "kvf/error.h"

#include <lz4.h>
#include <string.h>

static const char *const codec_names[] = {
#define XX(e, num, name) [num] = name,
    KVF_CODEC_MAP(XX)
#undef XX
};

const char *kvf_codec_name(uint32_t codec)
{
    return codec < KVF_CODEC_COUNT_ ? codec_names[codec] : NULL;
}

int kvf_codec_parse(const char *name, kvf_codec *out)
{
    for (uint32_t i = 0; i < KVF_CODEC_COUNT_; i++) {
        if (strcmp(name, codec_names[i]) == 0) {
            *out = (kvf_codec)i;
            return 0;
        }
    }
    return KVF_EINVAL;
}

size_t kvf__codec_bound(size_t n)
{
    return n > (size_t)LZ4_MAX_INPUT_SIZE ? 0 : (size_t)LZ4_compressBound((int)n);
}

static void shuffle2(const uint8_t *src, uint8_t *dst, size_t n)
{
    size_t half = n / 2;
    for (size_t i = 0; i < half; i++) {
        dst[i] = src[2 * i];
        dst[half + i] = src[2 * i + 1];
    }
}

static void unshuffle2(const uint8_t *src, uint8_t *dst, size_t n)
{
    size_t half = n / 2;
    for (size_t i = 0; i < half; i++) {
        dst[2 * i] = src[i];
        dst[2 * i + 1] = src[half + i];
    }
}

int kvf__codec_compress(kvf_codec c, const void *src, size_t n, void *dst, size_t cap, size_t *out,
                        void *scratch)
{
    if (n > (size_t)LZ4_MAX_INPUT_SIZE || cap > (size_t)INT32_MAX)
        return KVF_E2BIG;
    const char *in = src;
    switch (c) {
    case KVF_CODEC_NONE:
        if (cap < n)
            return KVF_E2BIG;
        memcpy(dst, src, n);
        *out = n;
        return 0;
    case KVF_CODEC_SHUFFLE_LZ4:
        if (n % 2 || !scratch)
            return KVF_EINVAL;
        shuffle2(src, scratch, n);
        in = scratch;
        /* fall through */
    case KVF_CODEC_LZ4: {
        int w = LZ4_compress_default(in, dst, (int)n, (int)cap);
        if (w <= 0 || (size_t)w >= n)
            return KVF_E2BIG;
        *out = (size_t)w;
        return 0;
    }
    default:
        return KVF_EINVAL;
    }
}

int kvf__codec_decompress(kvf_codec c, const void *src, size_t n, void *dst, size_t raw_n,
                          void *scratch)
{
    if (n > (size_t)INT32_MAX || raw_n > (size_t)INT32_MAX)
        return KVF_E2BIG;
    switch (c) {
    case KVF_CODEC_NONE:
        if (n != raw_n)
            return KVF_ECHECKSUM;
        memcpy(dst, src, n);
        return 0;
    case KVF_CODEC_LZ4: {
        int r = LZ4_decompress_safe(src, dst, (int)n, (int)raw_n);
        return r == (int)raw_n ? 0 : KVF_ECHECKSUM;
    }
    case KVF_CODEC_SHUFFLE_LZ4: {
        if (raw_n % 2 || !scratch)
            return KVF_EINVAL;
        int r = LZ4_decompress_safe(src, scratch, (int)n, (int)raw_n);
        if (r != (int)raw_n)
            return KVF_ECHECKSUM;
        unshuffle2(scratch, dst, raw_n);
        return 0;
    }
    default:
        return KVF_EINVAL;
    }
}
