/*
 * Chunk objects (kvf/object.h): encoding, parsing and verification, re-encoding with another
 * codec (codec.c).
 */
#include "kvf/object.h"

#include "codec.h"
#include "objcopy.h"

#include "kvf/error.h"

#include "bytes.h"
#include "hash.h"

#include <string.h>

kvf_obj_seg kvf_obj_seg_at(const kvf_obj_info *info, uint32_t l)
{
    const uint8_t *p = info->seg_table + 24 * (size_t)l;
    kvf_obj_seg s = {
        .raw_len = kvf__get_u32(p),
        .stored_len = kvf__get_u32(p + 4),
        .stored_xxh = kvf__get_u64(p + 8),
        .raw_xxh = kvf__get_u64(p + 16),
    };
    return s;
}

int kvf_obj_parse(const void *buf, size_t len, kvf_obj_info *info)
{
    const uint8_t *p = buf;
    if (len < 72 || kvf__get_u32(p) != KVF_OBJ_MAGIC || kvf__get_u16(p + 4) != KVF_OBJ_VERSION)
        return KVF_EPROTO;
    uint32_t layers = kvf__get_u32(p + 36);
    if (layers == 0 || layers > KVF_OBJ_MAX_LAYERS)
        return KVF_EPROTO;
    uint32_t hlen = kvf_obj_header_len(layers);
    if (len < hlen)
        return KVF_EPROTO;
    size_t table_end = 64 + 24 * (size_t)layers;
    if (kvf__xxh3(p, table_end) != kvf__get_u64(p + table_end))
        return KVF_ECHECKSUM;
    info->codec = kvf__get_u16(p + 6);
    info->layout_fp = kvf__get_u64(p + 8);
    info->key.lo = kvf__get_u64(p + 16);
    info->key.hi = kvf__get_u64(p + 24);
    info->tokens = kvf__get_u32(p + 32);
    info->layers = layers;
    info->raw_bytes = kvf__get_u64(p + 40);
    info->stored_bytes = kvf__get_u64(p + 48);
    info->header_len = hlen;
    info->seg_table = p + 64;
    if (info->codec >= KVF_CODEC_COUNT_ || kvf__get_u64(p + 56) != 0)
        return KVF_EPROTO;
    uint64_t raw = 0, stored = 0;
    for (uint32_t l = 0; l < layers; l++) {
        kvf_obj_seg s = kvf_obj_seg_at(info, l);
        if (s.stored_len == 0 || s.stored_len > s.raw_len)
            return KVF_EPROTO;
        if (info->codec == KVF_CODEC_NONE && s.stored_len != s.raw_len)
            return KVF_EPROTO;
        raw += s.raw_len;
        stored += s.stored_len;
    }
    if (raw != info->raw_bytes || stored != info->stored_bytes)
        return KVF_EPROTO;
    return 0;
}

int kvf__obj_verify_known(const void *buf, size_t len, kvf_obj_info *info,
                          int (*known)(void *ud, uint64_t off, uint64_t len, uint64_t *xxh),
                          void *ud)
{
    int rc = kvf_obj_parse(buf, len, info);
    if (rc)
        return rc;
    if ((uint64_t)len != info->header_len + info->stored_bytes)
        return KVF_EPROTO;
    uint64_t off = info->header_len;
    for (uint32_t l = 0; l < info->layers; l++) {
        kvf_obj_seg s = kvf_obj_seg_at(info, l);
        uint64_t x;
        if (!known || !known(ud, off, s.stored_len, &x))
            x = kvf__xxh3((const uint8_t *)buf + off, s.stored_len);
        if (x != s.stored_xxh)
            return KVF_ECHECKSUM;
        off += s.stored_len;
    }
    return 0;
}

int kvf_obj_verify(const void *buf, size_t len, kvf_obj_info *info)
{
    return kvf__obj_verify_known(buf, len, info, NULL, NULL);
}

/* Bytes copied and hashed at a time: they stay in the core's cache between the two. */
#define COPY_PIECE (64u << 10)

int kvf__obj_copy_header(void *dst, const void *src, size_t len, kvf_obj_info *info)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    if (len < 72)
        return KVF_EPROTO;
    /* The header is parsed from the copy: the layer count decides how much more of it there is. */
    memcpy(d, s, 72);
    uint32_t layers = kvf__get_u32(d + 36);
    if (layers == 0 || layers > KVF_OBJ_MAX_LAYERS || kvf_obj_header_len(layers) > len)
        return KVF_EPROTO;
    uint32_t hlen = kvf_obj_header_len(layers);
    memcpy(d + 72, s + 72, hlen - 72);
    int rc = kvf_obj_parse(d, len, info);
    if (rc)
        return rc;
    if ((uint64_t)len != info->header_len + info->stored_bytes)
        return KVF_EPROTO;
    return 0;
}

int kvf__obj_copy_segs(void *dst, const void *src, const kvf_obj_info *info, uint32_t from,
                       uint32_t to, uint64_t off)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    XXH3_state_t st;
    for (uint32_t l = from; l < to; l++) {
        kvf_obj_seg sg = kvf_obj_seg_at(info, l);
        XXH3_64bits_reset(&st);
        for (size_t done = 0; done < sg.stored_len;) {
            size_t n = sg.stored_len - done < COPY_PIECE ? sg.stored_len - done : COPY_PIECE;
            memcpy(d + off + done, s + off + done, n);
            kvf__xxh3_update(&st, d + off + done, n);
            done += n;
        }
        if (XXH3_64bits_digest(&st) != sg.stored_xxh)
            return KVF_ECHECKSUM;
        off += sg.stored_len;
    }
    return 0;
}

int kvf__obj_copy_verify(void *dst, const void *src, size_t len, kvf_obj_info *info)
{
    int rc = kvf__obj_copy_header(dst, src, len, info);
    return rc ? rc : kvf__obj_copy_segs(dst, src, info, 0, info->layers, info->header_len);
}

static void write_header(uint8_t *d, const kvf_key *key, uint64_t fp, uint32_t tokens,
                         uint32_t layers, kvf_codec codec, uint64_t raw, uint64_t stored)
{
    memset(d, 0, kvf_obj_header_len(layers));
    kvf__put_u32(d, KVF_OBJ_MAGIC);
    kvf__put_u16(d + 4, KVF_OBJ_VERSION);
    kvf__put_u16(d + 6, (uint16_t)codec);
    kvf__put_u64(d + 8, fp);
    kvf__put_u64(d + 16, key->lo);
    kvf__put_u64(d + 24, key->hi);
    kvf__put_u32(d + 32, tokens);
    kvf__put_u32(d + 36, layers);
    kvf__put_u64(d + 40, raw);
    kvf__put_u64(d + 48, stored);
}

static void seal_header(uint8_t *d, uint32_t layers)
{
    size_t table_end = 64 + 24 * (size_t)layers;
    kvf__put_u64(d + table_end, kvf__xxh3(d, table_end));
}

static void put_seg(uint8_t *d, uint32_t l, const kvf_obj_seg *s)
{
    uint8_t *p = d + 64 + 24 * (size_t)l;
    kvf__put_u32(p, s->raw_len);
    kvf__put_u32(p + 4, s->stored_len);
    kvf__put_u64(p + 8, s->stored_xxh);
    kvf__put_u64(p + 16, s->raw_xxh);
}

/* Stores one raw segment at out, compressed when that helps; fills s. */
static int store_seg(kvf_codec codec, const void *raw, uint32_t n, uint8_t *out, size_t room,
                     kvf_obj_seg *s, void *scratch)
{
    size_t w = 0;
    s->raw_len = n;
    s->raw_xxh = kvf__xxh3(raw, n);
    int rc = codec == KVF_CODEC_NONE
                 ? KVF_E2BIG
                 : kvf__codec_compress(codec, raw, n, out, room < n ? room : n - 1, &w, scratch);
    if (rc == KVF_E2BIG) {
        if (room < n)
            return KVF_E2BIG;
        memcpy(out, raw, n);
        w = n;
    } else if (rc) {
        return rc;
    }
    s->stored_len = (uint32_t)w;
    s->stored_xxh = w == n ? s->raw_xxh : kvf__xxh3(out, w);
    return 0;
}

int kvf_obj_encode(const kvf_key *key, uint64_t layout_fp, uint32_t tokens, uint32_t layers,
                   const void *const *segs, uint64_t seg_bytes, kvf_codec codec, void *dst,
                   size_t cap, size_t *out_len, void *scratch)
{
    if (layers == 0 || layers > KVF_OBJ_MAX_LAYERS || seg_bytes == 0 || seg_bytes > UINT32_MAX ||
        (unsigned)codec >= KVF_CODEC_COUNT_)
        return KVF_EINVAL;
    uint32_t hlen = kvf_obj_header_len(layers);
    if (cap < kvf_obj_raw_size(layers, seg_bytes))
        return KVF_E2BIG;
    uint8_t *d = dst;
    write_header(d, key, layout_fp, tokens, layers, codec, (uint64_t)layers * seg_bytes, 0);
    size_t off = hlen;
    for (uint32_t l = 0; l < layers; l++) {
        kvf_obj_seg s;
        int rc = store_seg(codec, segs[l], (uint32_t)seg_bytes, d + off, cap - off, &s, scratch);
        if (rc)
            return rc;
        put_seg(d, l, &s);
        off += s.stored_len;
    }
    kvf__put_u64(d + 48, off - hlen);
    seal_header(d, layers);
    *out_len = off;
    return 0;
}

int kvf_obj_decode_seg(uint32_t codec, const kvf_obj_seg *seg, const void *stored, void *dst,
                       void *scratch)
{
    if (kvf__xxh3(stored, seg->stored_len) != seg->stored_xxh)
        return KVF_ECHECKSUM;
    int rc;
    if (seg->stored_len == seg->raw_len) {
        memcpy(dst, stored, seg->raw_len);
        rc = 0;
    } else {
        rc = kvf__codec_decompress((kvf_codec)codec, stored, seg->stored_len, dst, seg->raw_len,
                                   scratch);
    }
    if (rc == 0 && kvf__xxh3(dst, seg->raw_len) != seg->raw_xxh)
        rc = KVF_ECHECKSUM;
    return rc;
}

int kvf_obj_recode(const void *src, size_t len, kvf_codec codec, void *dst, size_t cap,
                   size_t *out_len, void *scratch, void *scratch2)
{
    kvf_obj_info in;
    int rc = kvf_obj_verify(src, len, &in);
    if (rc)
        return rc;
    uint8_t *d = dst;
    if (cap < in.header_len)
        return KVF_E2BIG;
    write_header(d, &in.key, in.layout_fp, in.tokens, in.layers, codec, in.raw_bytes, 0);
    const uint8_t *seg = (const uint8_t *)src + in.header_len;
    size_t off = in.header_len;
    for (uint32_t l = 0; l < in.layers; l++) {
        kvf_obj_seg s = kvf_obj_seg_at(&in, l);
        /* Decode into scratch2 (raw), then store with the new codec. */
        rc = kvf_obj_decode_seg(in.codec, &s, seg, scratch2, scratch);
        if (rc)
            return rc;
        kvf_obj_seg ns;
        rc = store_seg(codec, scratch2, s.raw_len, d + off, cap - off, &ns, scratch);
        if (rc)
            return rc;
        put_seg(d, l, &ns);
        off += ns.stored_len;
        seg += s.stored_len;
    }
    kvf__put_u64(d + 48, off - in.header_len);
    seal_header(d, in.layers);
    *out_len = off;
    return 0;
}

void kvf_obj_rekey(void *obj, const kvf_key *key)
{
    uint8_t *d = obj;
    kvf__put_u64(d + 16, key->lo);
    kvf__put_u64(d + 24, key->hi);
    seal_header(d, kvf__get_u32(d + 36));
}

void kvf_obj_seal_raw(void *obj, const kvf_key *key, uint64_t layout_fp, uint32_t tokens,
                      uint32_t layers, uint64_t seg_bytes, const uint64_t *seg_xxh)
{
    uint8_t *d = obj;
    uint64_t total = (uint64_t)layers * seg_bytes;
    write_header(d, key, layout_fp, tokens, layers, KVF_CODEC_NONE, total, total);
    for (uint32_t l = 0; l < layers; l++) {
        kvf_obj_seg s = {.raw_len = (uint32_t)seg_bytes,
                         .stored_len = (uint32_t)seg_bytes,
                         .stored_xxh = seg_xxh[l],
                         .raw_xxh = seg_xxh[l]};
        put_seg(d, l, &s);
    }
    seal_header(d, layers);
}
