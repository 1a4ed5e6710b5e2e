/*
 * KV chunk objects: the self-describing format in which a chunk is stored and moved
 * (docs/protocol.md, "Objects"), and the codecs that compress its segments.
 *
 * An object is a header, then one stored segment per layer in layer order. The header carries the
 * layout fingerprint and key, and per layer the raw and stored sizes and XXH3-64 checksums of both,
 * so that each segment can be verified and decoded on its own as it arrives in a layer-major
 * stream. A reader that finds any mismatch treats the object as a miss.
 */
#ifndef KVF_STORE_OBJECT_H
#define KVF_STORE_OBJECT_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"

#define KVF_OBJ_MAGIC      0x4F46564Bu /* "KVFO" */
#define KVF_OBJ_VERSION    1u
#define KVF_OBJ_MAX_LAYERS 4096u

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

const char *kvf__codec_name(uint32_t codec);
int kvf__codec_parse(const char *name, kvf_codec *out);

/* Compresses n bytes into dst (cap bytes). Byte-shuffled LZ4 first groups the low and high bytes
 * of 16-bit values (n even), which makes bf16/f16 tensors compressible; it needs scratch of n
 * bytes. *out gets the compressed size; KVF_E2BIG when it does not fit or is not smaller than n. */
int kvf__codec_compress(kvf_codec c, const void *src, size_t n, void *dst, size_t cap, size_t *out,
                        void *scratch);
/* Decompresses exactly raw_n bytes; KVF_ECHECKSUM when the input does not decode to raw_n bytes. */
int kvf__codec_decompress(kvf_codec c, const void *src, size_t n, void *dst, size_t raw_n,
                          void *scratch);
/* Worst-case compressed size of n bytes. */
size_t kvf__codec_bound(size_t n);

/* One layer's entry in the header. */
typedef struct kvf_obj_seg {
    uint32_t raw_len;
    uint32_t stored_len; /* equal to raw_len when the segment is stored raw */
    uint64_t stored_xxh;
    uint64_t raw_xxh;
} kvf_obj_seg;

/* A parsed header. segs points into the buffer it was parsed from. */
typedef struct kvf_obj_info {
    uint32_t codec;
    uint32_t layers;
    uint32_t tokens;
    uint64_t layout_fp;
    kvf_key key;
    uint64_t raw_bytes;
    uint64_t stored_bytes;
    uint32_t header_len;
    const uint8_t *seg_table; /* layers x 24 bytes; read with kvf__obj_seg() */
} kvf_obj_info;

static inline uint32_t kvf__obj_header_len(uint32_t layers)
{
    return (uint32_t)((72u + 24u * layers + 63u) & ~63u);
}

/* Reads layer l's entry of a parsed header. */
kvf_obj_seg kvf__obj_seg(const kvf_obj_info *info, uint32_t l);

/* Parses and verifies a header (magic, version, codec, sizes, header checksum). len is what is
 * available; the whole header must be there. Returns 0, KVF_EPROTO for a malformed header or
 * KVF_ECHECKSUM for a header checksum mismatch. */
int kvf__obj_parse(const void *buf, size_t len, kvf_obj_info *info);

/* Verifies a whole stored object of exactly len bytes: header, then each segment's stored checksum.
 * Returns 0, KVF_EPROTO or KVF_ECHECKSUM. */
int kvf__obj_verify(const void *buf, size_t len, kvf_obj_info *info);

/* Size of the object that kvf__obj_encode() writes uncompressed. */
static inline uint64_t kvf__obj_raw_size(uint32_t layers, uint64_t seg_bytes)
{
    return kvf__obj_header_len(layers) + (uint64_t)layers * seg_bytes;
}

/* Builds an object from layers segments of seg_bytes each (segs[l] points to layer l), compressed
 * with codec (segments that do not shrink are stored raw). dst must hold kvf__obj_raw_size() bytes;
 * scratch must hold seg_bytes bytes for SHUFFLE_LZ4. *out_len gets the object size. */
int kvf__obj_encode(const kvf_key *key, uint64_t layout_fp, uint32_t tokens, uint32_t layers,
                    const void *const *segs, uint64_t seg_bytes, kvf_codec codec, void *dst,
                    size_t cap, size_t *out_len, void *scratch);

/* Re-encodes a verified object src with another codec into dst (cap bytes). */
int kvf__obj_recode(const void *src, size_t len, kvf_codec codec, void *dst, size_t cap,
                    size_t *out_len, void *scratch, void *scratch2);

/* Writes the header of an uncompressed object whose layers segments of seg_bytes each are already
 * in place after it (at kvf__obj_header_len(layers)), given their XXH3-64 checksums. Lets a
 * producer gather segments straight into the object buffer and hash them as it goes. */
void kvf__obj_seal_raw(void *obj, const kvf_key *key, uint64_t layout_fp, uint32_t tokens,
                       uint32_t layers, uint64_t seg_bytes, const uint64_t *seg_xxh);

/* Replaces the key in an object's header and reseals the header checksum (segments are
 * untouched). For tools that store one payload under many keys. */
void kvf__obj_rekey(void *obj, const kvf_key *key);

/* Verifies one stored segment and decodes it into dst (seg.raw_len bytes). */
int kvf__obj_decode_seg(uint32_t codec, const kvf_obj_seg *seg, const void *stored, void *dst,
                        void *scratch);

#endif
