/*
 * kvf/object.h - KV chunk objects: the self-describing format in which a chunk is stored and moved
 * (docs/protocol.md, "Objects"), whose segments are stored with a codec (kvf/codec.h).
 * kvf_client_put() takes objects in this format; engines and tools build them with kvf_obj_encode()
 * or kvf_obj_seal_raw() and check what they read with kvf_obj_verify().
 *
 * An object is a header, then one stored segment per layer in layer order. The header carries the
 * layout fingerprint and key, and per layer the raw and stored sizes and XXH3-64 checksums of both,
 * so that each segment can be verified and decoded on its own as it arrives in a layer-major
 * stream. A reader that finds any mismatch treats the object as a miss.
 */
#ifndef KVF_OBJECT_H
#define KVF_OBJECT_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/codec.h"
#include "kvf/export.h"
#include "kvf/layout.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVF_OBJ_MAGIC      0x4F46564Bu /* "KVFO" */
#define KVF_OBJ_VERSION    1u
#define KVF_OBJ_MAX_LAYERS 4096u

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
    const uint8_t *seg_table; /* layers x 24 bytes; read with kvf_obj_seg_at() */
} kvf_obj_info;

static inline uint32_t kvf_obj_header_len(uint32_t layers)
{
    return (uint32_t)((72u + 24u * layers + 63u) & ~63u);
}

/* Reads layer l's entry of a parsed header. */
KVF_API kvf_obj_seg kvf_obj_seg_at(const kvf_obj_info *info, uint32_t l);

/* Parses and verifies a header (magic, version, codec, sizes, header checksum). len is what is
 * available; the whole header must be there. Returns 0, KVF_EPROTO for a malformed header or
 * KVF_ECHECKSUM for a header checksum mismatch. */
KVF_API int kvf_obj_parse(const void *buf, size_t len, kvf_obj_info *info);

/* Verifies a whole stored object of exactly len bytes: header, then each segment's stored checksum.
 * Returns 0, KVF_EPROTO or KVF_ECHECKSUM. */
KVF_API int kvf_obj_verify(const void *buf, size_t len, kvf_obj_info *info);

/* Size of the object that kvf_obj_encode() writes uncompressed. */
static inline uint64_t kvf_obj_raw_size(uint32_t layers, uint64_t seg_bytes)
{
    return kvf_obj_header_len(layers) + (uint64_t)layers * seg_bytes;
}

/* Builds an object from layers segments of seg_bytes each (segs[l] points to layer l), compressed
 * with codec (segments that do not shrink are stored raw). dst must hold kvf_obj_raw_size() bytes;
 * scratch must hold seg_bytes bytes for SHUFFLE_LZ4. *out_len gets the object size. */
KVF_API int kvf_obj_encode(const kvf_key *key, uint64_t layout_fp, uint32_t tokens, uint32_t layers,
                           const void *const *segs, uint64_t seg_bytes, kvf_codec codec, void *dst,
                           size_t cap, size_t *out_len, void *scratch);

/* Re-encodes a verified object src with another codec into dst (cap bytes). */
KVF_API int kvf_obj_recode(const void *src, size_t len, kvf_codec codec, void *dst, size_t cap,
                           size_t *out_len, void *scratch, void *scratch2);

/* Writes the header of an uncompressed object whose layers segments of seg_bytes each are already
 * in place after it (at kvf_obj_header_len(layers)), given their XXH3-64 checksums. Lets a
 * producer gather segments straight into the object buffer and hash them as it goes. */
KVF_API void kvf_obj_seal_raw(void *obj, const kvf_key *key, uint64_t layout_fp, uint32_t tokens,
                              uint32_t layers, uint64_t seg_bytes, const uint64_t *seg_xxh);

/* Replaces the key in an object's header and reseals the header checksum (segments are
 * untouched). For tools that store one payload under many keys. */
KVF_API void kvf_obj_rekey(void *obj, const kvf_key *key);

/* Verifies one stored segment and decodes it into dst (seg.raw_len bytes). */
KVF_API int kvf_obj_decode_seg(uint32_t codec, const kvf_obj_seg *seg, const void *stored,
                               void *dst, void *scratch);

#ifdef __cplusplus
}
#endif
#endif
