/*
 * kvf/codec.h - the codecs that chunk objects store their segments with: none, LZ4, and
 * byte-shuffled LZ4, which groups the low and high bytes of 16-bit values first so that bf16/f16
 * tensors compress. A store recompresses objects on request (kvf_client_compress()).
 */
#ifndef KVF_CODEC_H
#define KVF_CODEC_H

#include <stdint.h>

#include "kvf/export.h"

#ifdef __cplusplus
extern "C" {
#endif

/* XX(enum suffix, number, name). Numbers are stored in objects: never renumber. */
#define KVF_CODEC_MAP(XX) \
    XX(NONE, 0, "none")   \
    XX(LZ4, 1, "lz4")     \
    XX(SHUFFLE_LZ4, 2, "shuffle-lz4")

typedef enum kvf_codec {
#define KVF_CODEC_ENUM_(e, num, name) KVF_CODEC_##e = num,
    KVF_CODEC_MAP(KVF_CODEC_ENUM_)
#undef KVF_CODEC_ENUM_
        KVF_CODEC_COUNT_
} kvf_codec;

/* The name of a codec ("lz4"), or NULL for an unknown number. Borrowed; static. */
KVF_API const char *kvf_codec_name(uint32_t codec);
/* The codec named name: 0, or KVF_EINVAL for an unknown name. */
KVF_API int kvf_codec_parse(const char *name, kvf_codec *out);

#ifdef __cplusplus
}
#endif
#endif
