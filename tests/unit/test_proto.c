/*
 * Unit tests of the proto module: frame header encoding and every validation rule, the item
 * table checks, chunk objects and their codecs, and KV event batches (encoded here, decoded
 * here, both encodings, malformed events skipped with a reason).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <msgpack.h>

#include "kvf/kvf.h"

#include "auth.h"
#include "bytes.h"
#include "codec.h"
#include "kvevents.h"
#include "wire.h"

/* ------------------------------------------------------------------------------------------ */
/* Frames */

static const kvf_wire_limits server_lim = {.max_request = 1 << 20, .max_items = 1024};

static kvf_wire_hdr req(uint16_t op, uint32_t n, uint64_t len)
{
    kvf_wire_hdr h = {.version = KVF_WIRE_VERSION,
                      .opcode = op,
                      .request_id = 77,
                      .item_count = n,
                      .payload_len = len};
    return h;
}

static int decode(const kvf_wire_hdr *h, const kvf_wire_limits *lim, char *msg)
{
    uint8_t b[KVF_WIRE_HEADER_LEN];
    kvf__wire_hdr_encode(b, h);
    kvf_wire_hdr out;
    return kvf__wire_hdr_decode(b, lim, &out, msg, 200);
}

static void test_proto_wire_round_trip(void **state)
{
    (void)state;
    kvf_wire_hdr h = req(KVF_OP_GET, 3, 8 + 48);
    h.flags = KVF_WF_STREAM;
    h.request_id = 0x0102030405060708ull;
    uint8_t b[KVF_WIRE_HEADER_LEN];
    kvf__wire_hdr_encode(b, &h);
    /* Little-endian on the wire, whatever the host. */
    assert_int_equal(b[0], 'K');
    assert_int_equal(b[1], 'V');
    assert_int_equal(b[2], 'F');
    assert_int_equal(b[3], '1');
    assert_int_equal(b[16], 0x08);
    assert_int_equal(b[23], 0x01);
    kvf_wire_hdr o;
    char msg[200];
    assert_int_equal(kvf__wire_hdr_decode(b, &server_lim, &o, msg, sizeof msg), 0);
    assert_int_equal(o.opcode, KVF_OP_GET);
    assert_int_equal(o.flags, KVF_WF_STREAM);
    assert_true(o.request_id == h.request_id);
    assert_int_equal(o.item_count, 3);
    assert_int_equal(o.payload_len, 56);
    kvf_key k = {.lo = 0x1122334455667788ull, .hi = 0x99aabbccddeeff00ull};
    uint8_t kb[16];
    kvf__wire_key_put(kb, &k);
    assert_int_equal(kb[0], 0x88);
    assert_int_equal(kb[15], 0x99);
    kvf_key r = kvf__wire_key_get(kb);
    assert_true(kvf_key_eq(&k, &r));
    assert_string_equal(kvf__wire_opcode_name(KVF_OP_COMPRESS), "compress");
    assert_null(kvf__wire_opcode_name(99));
}

/* Every header rule, each with the code and the words of its message. */
static void test_proto_wire_rejects_bad_headers(void **state)
{
    (void)state;
    char msg[200];
    uint8_t b[KVF_WIRE_HEADER_LEN];
    kvf_wire_hdr o;
    kvf_wire_hdr h = req(KVF_OP_GET, 1, 24);

    kvf__wire_hdr_encode(b, &h);
    b[0] = 'X';
    assert_int_equal(kvf__wire_hdr_decode(b, &server_lim, &o, msg, sizeof msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "bad magic"));

    h.version = 9;
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EVERSION);
    assert_non_null(strstr(msg, "version 9"));
    h.version = KVF_WIRE_VERSION;

    h.opcode = 200;
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "unknown opcode 200"));
    h.opcode = KVF_OP_GET;

    h.flags = 0x100;
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "unknown flags"));
    h.flags = KVF_WF_REPLY;
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "reply flag"));
    h.flags = KVF_WF_MORE;
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    h.flags = KVF_WF_ALL_NS;
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    h.flags = KVF_WF_TIERS; /* EXISTS and LOOKUP only */
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "tiers flag on"));
    h.opcode = KVF_OP_EXISTS;
    assert_int_equal(decode(&h, &server_lim, msg), 0);
    h.opcode = KVF_OP_GET;
    h.flags = 0;

    h.status = -3;
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    h.status = 0;

    kvf__wire_hdr_encode(b, &h);
    b[28] = 1; /* reserved */
    assert_int_equal(kvf__wire_hdr_decode(b, &server_lim, &o, msg, sizeof msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "reserved"));

    h = req(KVF_OP_GET, 2000, 8 + 16 * 2000);
    assert_int_equal(decode(&h, &server_lim, msg), KVF_E2BIG);
    assert_non_null(strstr(msg, "exceed the limit"));

    h = req(KVF_OP_GET, 2, 8 + 16); /* lengths disagree with the item count */
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "needs a payload of 40 bytes"));

    h = req(KVF_OP_GET, 0, 8);
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "no items"));

    h = req(KVF_OP_STATS, 1, 0);
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);

    h = req(KVF_OP_PUT, 1, 2u << 20); /* over max_request */
    assert_int_equal(decode(&h, &server_lim, msg), KVF_E2BIG);
    assert_non_null(strstr(msg, "exceeds the node's limit"));

    h = req(KVF_OP_PUT, 4, 8 + 24 * 4); /* no room for any data */
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "shorter than its table"));

    h = req(KVF_OP_COPY, 1, 8);
    assert_int_equal(decode(&h, &server_lim, msg), KVF_EPROTO);

    h = req(KVF_OP_EXISTS, 1, (uint64_t)KVF_WIRE_MAX_CONTROL + 1);
    assert_int_equal(decode(&h, &server_lim, msg), KVF_E2BIG);

    /* On a client: replies must carry the flag and a known status. */
    kvf_wire_limits cl = {.max_request = 1 << 20, .expect_reply = 1};
    h = req(KVF_OP_GET, 1, 24);
    assert_int_equal(decode(&h, &cl, msg), KVF_EPROTO);
    h.flags = KVF_WF_REPLY;
    h.status = -1234;
    assert_int_equal(decode(&h, &cl, msg), KVF_EPROTO);
    h.status = KVF_ENOENT;
    assert_int_equal(decode(&h, &cl, msg), 0);

    /* Valid requests of every opcode pass. */
    const struct {
        uint16_t op;
        uint32_t n;
        uint64_t len;
    } ok[] = {{KVF_OP_HELLO, 0, 24},         {KVF_OP_STATS, 0, 0},
              {KVF_OP_CLEAR, 0, 8},          {KVF_OP_ADMIT, 2, 56},
              {KVF_OP_GET, 2, 40},           {KVF_OP_EXISTS, 1, 24},
              {KVF_OP_LOOKUP, 1, 24},        {KVF_OP_EVICT, 1, 24},
              {KVF_OP_PIN, 1, 32},           {KVF_OP_UNPIN, 1, 24},
              {KVF_OP_COMPRESS, 1, 32},      {KVF_OP_DECOMPRESS, 1, 32},
              {KVF_OP_PUT, 1, 8 + 24 + 100}, {KVF_OP_COMMIT, 1, 8 + 24 + 1},
              {KVF_OP_COPY, 1, 48},          {KVF_OP_RDMA_GET, 2, 48},
              {KVF_OP_RDMA_RELEASE, 0, 16},  {KVF_OP_RDMA_RESERVE, 1, 32},
              {KVF_OP_RDMA_COMMIT, 2, 56}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        h = req(ok[i].op, ok[i].n, ok[i].len);
        if (decode(&h, &server_lim, msg) != 0)
            fail_msg("opcode %u: %s", ok[i].op, msg);
    }
}

static void test_proto_wire_put_table(void **state)
{
    (void)state;
    uint8_t t[8 + 24 * 3];
    memset(t, 0, sizeof t);
    kvf__put_u64(t + 8 + 16, 100);
    kvf__put_u64(t + 8 + 24 + 16, 50);
    kvf__put_u64(t + 8 + 48 + 16, 10);
    kvf_wire_hdr h = req(KVF_OP_PUT, 3, sizeof t + 160);
    char msg[200];
    assert_int_equal(kvf__wire_put_table_check(&h, t, msg, sizeof msg), 0);
    h.payload_len = sizeof t + 161;
    assert_int_equal(kvf__wire_put_table_check(&h, t, msg, sizeof msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "sum to 160"));
    h.payload_len = sizeof t + 159;
    assert_int_equal(kvf__wire_put_table_check(&h, t, msg, sizeof msg), KVF_EPROTO);
    kvf__put_u64(t + 8 + 24 + 16, 0);
    h.payload_len = sizeof t + 110;
    assert_int_equal(kvf__wire_put_table_check(&h, t, msg, sizeof msg), KVF_EPROTO);
    assert_non_null(strstr(msg, "length 0"));
    /* A length near 2^64 must not wrap the sum. */
    kvf__put_u64(t + 8 + 24 + 16, UINT64_MAX - 50);
    assert_int_equal(kvf__wire_put_table_check(&h, t, msg, sizeof msg), KVF_EPROTO);
}

/* ------------------------------------------------------------------------------------------ */
/* Objects and codecs */

static uint64_t rng = 88172645463325252ull;

static uint64_t xorshift(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static void make_bf16(uint8_t *p, size_t n, uint64_t seed)
{
    for (size_t i = 0; i + 1 < n; i += 2) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        float v = (float)((int)(seed >> 48) - 32768) / 65536.0f;
        uint32_t b;
        memcpy(&b, &v, 4);
        p[i] = (uint8_t)(b >> 16);
        p[i + 1] = (uint8_t)(b >> 24);
    }
}

static void test_proto_codecs_round_trip(void **state)
{
    (void)state;
    size_t n = 1 << 16;
    uint8_t *src = malloc(n), *dst = malloc(kvf__codec_bound(n)), *back = malloc(n),
            *scratch = malloc(n);
    make_bf16(src, n, 1);
    size_t lz = 0, sh = 0;
    /* Plain LZ4 finds no 4-byte matches in bf16 values with random mantissas: it must not win. */
    int lzrc = kvf__codec_compress(KVF_CODEC_LZ4, src, n, dst, kvf__codec_bound(n), &lz, NULL);
    if (lzrc == KVF_E2BIG)
        lz = n;
    else
        assert_int_equal(lzrc, 0);
    /* On data with repeats it round-trips. */
    uint8_t *rep = malloc(n);
    for (size_t i = 0; i < n; i++)
        rep[i] = (uint8_t)(i % 251 < 100 ? 7 : i % 13);
    size_t rl;
    assert_int_equal(
        kvf__codec_compress(KVF_CODEC_LZ4, rep, n, dst, kvf__codec_bound(n), &rl, NULL), 0);
    assert_true(rl < n / 4);
    assert_int_equal(kvf__codec_decompress(KVF_CODEC_LZ4, dst, rl, back, n, NULL), 0);
    assert_memory_equal(rep, back, n);
    free(rep);
    assert_int_equal(
        kvf__codec_compress(KVF_CODEC_SHUFFLE_LZ4, src, n, dst, kvf__codec_bound(n), &sh, scratch),
        0);
    memset(back, 0, n);
    assert_int_equal(kvf__codec_decompress(KVF_CODEC_SHUFFLE_LZ4, dst, sh, back, n, scratch), 0);
    assert_memory_equal(src, back, n);
    /* Byte shuffling is what makes 16-bit KV compress: it must beat plain LZ4 here. */
    assert_true(sh < lz);
    assert_true(sh < n * 85 / 100);
    /* Corrupt input never decodes to the wrong length silently. */
    dst[sh / 2] ^= 0xff;
    int rc = kvf__codec_decompress(KVF_CODEC_SHUFFLE_LZ4, dst, sh / 2, back, n, scratch);
    assert_int_equal(rc, KVF_ECHECKSUM);
    /* Incompressible data is refused (and stored raw by the object encoder). */
    for (size_t i = 0; i < n; i++)
        src[i] = (uint8_t)(xorshift() >> 24);
    assert_int_equal(kvf__codec_compress(KVF_CODEC_LZ4, src, n, dst, n, &lz, NULL), KVF_E2BIG);
    kvf_codec c;
    assert_int_equal(kvf_codec_parse("shuffle-lz4", &c), 0);
    assert_int_equal(c, KVF_CODEC_SHUFFLE_LZ4);
    assert_int_equal(kvf_codec_parse("zstd", &c), KVF_EINVAL);
    assert_string_equal(kvf_codec_name(KVF_CODEC_LZ4), "lz4");
    free(src);
    free(dst);
    free(back);
    free(scratch);
}

static void test_proto_object_encode_verify_corrupt(void **state)
{
    (void)state;
    enum { L = 5, SEG = 4096 };
    uint8_t raw[L][SEG];
    const void *segs[L];
    for (int l = 0; l < L; l++) {
        make_bf16(raw[l], SEG, (uint64_t)l + 10);
        segs[l] = raw[l];
    }
    kvf_key key = {.lo = 1, .hi = 2};
    size_t cap = kvf_obj_raw_size(L, SEG);
    uint8_t *obj = malloc(cap), *scratch = malloc(SEG), *out = malloc(SEG);
    for (int codec = 0; codec < KVF_CODEC_COUNT_; codec++) {
        size_t len;
        assert_int_equal(kvf_obj_encode(&key, 0xfeed, 64, L, segs, SEG, (kvf_codec)codec, obj, cap,
                                        &len, scratch),
                         0);
        kvf_obj_info info;
        assert_int_equal(kvf_obj_verify(obj, len, &info), 0);
        assert_int_equal(info.layers, L);
        assert_int_equal(info.codec, codec);
        assert_true(info.layout_fp == 0xfeed);
        assert_true(kvf_key_eq(&info.key, &key));
        assert_int_equal(info.raw_bytes, L * SEG);
        if (codec == KVF_CODEC_SHUFFLE_LZ4)
            assert_true(len < cap * 9 / 10);
        const uint8_t *p = obj + info.header_len;
        for (uint32_t l = 0; l < L; l++) {
            kvf_obj_seg s = kvf_obj_seg_at(&info, l);
            assert_int_equal(kvf_obj_decode_seg(info.codec, &s, p, out, scratch), 0);
            assert_memory_equal(out, raw[l], SEG);
            p += s.stored_len;
        }
        /* Every single-byte corruption, header or payload, is caught. */
        for (size_t at = 0; at < len; at += 97) {
            obj[at] ^= 0x40;
            assert_int_not_equal(kvf_obj_verify(obj, len, &info), 0);
            obj[at] ^= 0x40;
        }
        assert_int_equal(kvf_obj_verify(obj, len - 1, &info), KVF_EPROTO);
        /* Recode to every codec and back keeps the content. */
        uint8_t *re = malloc(cap), *s2 = malloc(SEG);
        size_t rlen;
        for (int to = 0; to < KVF_CODEC_COUNT_; to++) {
            assert_int_equal(kvf_obj_recode(obj, len, (kvf_codec)to, re, cap, &rlen, scratch, s2),
                             0);
            assert_int_equal(kvf_obj_verify(re, rlen, &info), 0);
            assert_int_equal(info.codec, to);
            const uint8_t *q = re + info.header_len;
            for (uint32_t l = 0; l < L; l++) {
                kvf_obj_seg s = kvf_obj_seg_at(&info, l);
                assert_int_equal(kvf_obj_decode_seg(info.codec, &s, q, out, scratch), 0);
                assert_memory_equal(out, raw[l], SEG);
                q += s.stored_len;
            }
        }
        free(re);
        free(s2);
    }
    size_t len;
    assert_int_equal(
        kvf_obj_encode(&key, 1, 64, 0, segs, SEG, KVF_CODEC_NONE, obj, cap, &len, scratch),
        KVF_EINVAL);
    assert_int_equal(
        kvf_obj_encode(&key, 1, 64, L, segs, SEG, KVF_CODEC_NONE, obj, cap - 1, &len, scratch),
        KVF_E2BIG);
    free(obj);
    free(scratch);
    free(out);
}

/* ------------------------------------------------------------------------------------------ */
/* KV events */

/* What the decoder handed over, copied out of the callback. */
typedef struct seen {
    int n;
    kvf_kve_type type[8];
    size_t n_hashes[8], n_tokens[8], n_keys[8];
    uint64_t first_hash[8], parent[8], node[8];
    int has_parent[8], host_tier[8], disk_tier[8];
    uint32_t block_size[8], last_token[8];
    kvf_key last_key[8];
    uint64_t rate[8];
} seen;

static int collect(void *ud, const kvf_kve *ev, char *err, size_t errlen)
{
    (void)err, (void)errlen;
    seen *s = ud;
    int i = s->n++;
    s->type[i] = ev->type;
    s->n_hashes[i] = ev->n_hashes;
    s->n_tokens[i] = ev->n_tokens;
    s->n_keys[i] = ev->n_keys;
    s->first_hash[i] = ev->n_hashes ? ev->hashes[0] : 0;
    s->parent[i] = ev->parent;
    s->has_parent[i] = ev->has_parent;
    s->host_tier[i] = ev->host_tier;
    s->disk_tier[i] = ev->disk_tier;
    s->block_size[i] = ev->block_size;
    s->last_token[i] = ev->n_tokens ? ev->tokens[ev->n_tokens - 1] : 0;
    s->node[i] = ev->node;
    s->rate[i] = ev->disk_read_bytes_per_s;
    if (ev->n_keys)
        s->last_key[i] = ev->keys[ev->n_keys - 1];
    return 0;
}

static void test_proto_kvevents_round_trip(void **state)
{
    (void)state;
    uint64_t hashes[3] = {11, 12, UINT64_MAX};
    uint32_t tokens[3 * 4];
    for (int i = 0; i < 12; i++)
        tokens[i] = 1000u + (uint32_t)i;
    kvf_key keys[2] = {{1, 2}, {UINT64_MAX, 7}};
    kvf__kve_enc *e;
    assert_int_equal(kvf__kve_enc_begin(&e, 5), 0);
    kvf__kve_enc_block_stored(e, hashes, 3, 1, 10, tokens, 4, "CPU");
    kvf__kve_enc_block_removed(e, hashes + 1, 2, "GPU");
    kvf__kve_enc_chunks(e, 1, 5, keys, 2, 0);
    kvf__kve_enc_chunks(e, 0, 5, keys, 1, 1);
    kvf__kve_enc_store_rates(e, 5, 3000000000ull);
    const void *data;
    size_t len;
    assert_int_equal(kvf__kve_enc_end(e, &data, &len), 0);
    seen s = {0};
    uint64_t malformed = 0;
    char err[128] = "";
    assert_int_equal(kvf__kve_decode(data, len, collect, &s, &malformed, err, sizeof err), 0);
    kvf__kve_enc_free(&e);
    assert_null(e);
    assert_int_equal(malformed, 0);
    assert_int_equal(s.n, 5);
    assert_int_equal(s.type[0], KVF_KVE_BLOCK_STORED);
    assert_int_equal(s.n_hashes[0], 3);
    assert_int_equal(s.first_hash[0], 11);
    assert_true(s.has_parent[0]);
    assert_int_equal(s.parent[0], 10);
    assert_int_equal(s.block_size[0], 4);
    assert_int_equal(s.n_tokens[0], 12);
    assert_int_equal(s.last_token[0], 1011);
    assert_true(s.host_tier[0]);
    assert_int_equal(s.type[1], KVF_KVE_BLOCK_REMOVED);
    assert_int_equal(s.n_hashes[1], 2);
    assert_int_equal(s.first_hash[1], 12);
    assert_int_equal(s.type[2], KVF_KVE_CHUNKS_ADMITTED);
    assert_int_equal(s.node[2], 5);
    assert_int_equal(s.n_keys[2], 2);
    assert_true(kvf_key_eq(&s.last_key[2], &keys[1]));
    assert_int_equal(s.disk_tier[2], 0);
    assert_int_equal(s.type[3], KVF_KVE_CHUNKS_EVICTED);
    assert_int_equal(s.n_keys[3], 1);
    assert_int_equal(s.disk_tier[3], 1);
    assert_int_equal(s.type[4], KVF_KVE_STORE_RATES);
    assert_int_equal(s.node[4], 5);
    assert_int_equal(s.rate[4], 3000000000ull);

    /* An encoder that writes fewer events than it announced says so. */
    assert_int_equal(kvf__kve_enc_begin(&e, 2), 0);
    kvf__kve_enc_block_removed(e, hashes, 1, "GPU");
    assert_int_equal(kvf__kve_enc_end(e, &data, &len), KVF_EINVAL);
    kvf__kve_enc_free(&e);

    uint8_t be[8];
    kvf__kve_seq_put(be, 0x0102030405060708ull);
    assert_int_equal(be[0], 1);
    assert_int_equal(be[7], 8);
    assert_int_equal(kvf__kve_seq_get(be), 0x0102030405060708ull);
}

static void pack_str(msgpack_packer *pk, const char *s)
{
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

/* The map encoding of newer publishers, unknown kinds and malformed events among good ones. */
static void test_proto_kvevents_maps_and_malformed(void **state)
{
    (void)state;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 2);
    pack_str(&pk, "ts");
    msgpack_pack_double(&pk, 1.0);
    pack_str(&pk, "events");
    msgpack_pack_array(&pk, 7);
    /* a BlockStored map with a byte-string hash and no parent */
    msgpack_pack_map(&pk, 5);
    pack_str(&pk, "type");
    pack_str(&pk, "BlockStored");
    pack_str(&pk, "block_hashes");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_bin(&pk, 3);
    msgpack_pack_bin_body(&pk, "abc", 3);
    pack_str(&pk, "parent_block_hash");
    msgpack_pack_nil(&pk);
    pack_str(&pk, "token_ids");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint32(&pk, 5);
    msgpack_pack_uint32(&pk, 6);
    pack_str(&pk, "block_size");
    msgpack_pack_uint32(&pk, 2);
    /* token ids that do not fill the blocks: malformed, skipped */
    msgpack_pack_array(&pk, 5);
    pack_str(&pk, "BlockStored");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_uint64(&pk, 9);
    msgpack_pack_nil(&pk);
    msgpack_pack_array(&pk, 1);
    msgpack_pack_uint32(&pk, 5);
    msgpack_pack_uint32(&pk, 16);
    /* a kind this version does not know */
    msgpack_pack_array(&pk, 1);
    pack_str(&pk, "SomethingNew");
    /* a store event whose key is not 16 bytes: malformed */
    msgpack_pack_array(&pk, 3);
    pack_str(&pk, "ChunksAdmitted");
    msgpack_pack_uint32(&pk, 0);
    msgpack_pack_array(&pk, 1);
    msgpack_pack_bin(&pk, 3);
    msgpack_pack_bin_body(&pk, "abc", 3);
    /* store events of an older publisher (no medium: DRAM), of the disk tier, and of a medium
     * this version does not know (malformed) */
    static const char *const media[3] = {NULL, "DISK", "TAPE"};
    for (int m = 0; m < 3; m++) {
        msgpack_pack_array(&pk, media[m] ? 4 : 3);
        pack_str(&pk, "ChunksEvicted");
        msgpack_pack_uint32(&pk, 3);
        msgpack_pack_array(&pk, 1);
        msgpack_pack_bin(&pk, 16);
        msgpack_pack_bin_body(&pk, "0123456789abcdef", 16);
        if (media[m])
            pack_str(&pk, media[m]);
    }
    seen s = {0};
    uint64_t malformed = 0;
    char err[128] = "";
    assert_int_equal(kvf__kve_decode(sb.data, sb.size, collect, &s, &malformed, err, sizeof err),
                     0);
    assert_int_equal(malformed, 3);
    assert_non_null(strstr(err, "medium"));
    assert_int_equal(s.n, 4);
    assert_int_equal(s.type[0], KVF_KVE_BLOCK_STORED);
    assert_false(s.has_parent[0]);
    assert_false(s.host_tier[0]);
    assert_int_equal(s.n_tokens[0], 2);
    assert_int_not_equal(s.first_hash[0], 0);
    assert_int_equal(s.type[1], KVF_KVE_UNKNOWN);
    assert_int_equal(s.type[2], KVF_KVE_CHUNKS_EVICTED);
    assert_int_equal(s.disk_tier[2], 0);
    assert_int_equal(s.type[3], KVF_KVE_CHUNKS_EVICTED);
    assert_int_equal(s.disk_tier[3], 1);

    /* Not a batch at all. */
    assert_int_equal(kvf__kve_decode("\x01", 1, collect, &s, &malformed, err, sizeof err),
                     KVF_EPROTO);
    assert_int_equal(kvf__kve_decode(sb.data, sb.size - 1, collect, &s, NULL, err, sizeof err),
                     KVF_EPROTO);
    msgpack_sbuffer_destroy(&sb);
}

/* Regression: a 5-byte payload whose array header claims 2^32-1 events made msgpack-c ask for
 * 96 GiB before it read a single one (an ASan build aborted). Headers that claim more than the
 * payload holds are refused before anything is unpacked, at any depth. */
static void test_proto_kvevents_claims_bounded(void **state)
{
    (void)state;
    static const uint8_t huge[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
    static const uint8_t nested[] = {0x93, 0xcb, 0,    0,    0,    0,    0,    0,
                                     0,    0,    0xdf, 0x7f, 0xff, 0xff, 0xff, 0x00};
    static const uint8_t long_str[] = {0x92, 0xdb, 0x7f, 0xff, 0xff, 0xff, 'a'};
    static const uint8_t unused_byte[] = {0x91, 0xc1};
    seen s = {0};
    char err[160] = "";
    assert_int_equal(kvf__kve_decode(huge, sizeof huge, collect, &s, NULL, err, sizeof err),
                     KVF_EPROTO);
    assert_non_null(strstr(err, "claims more"));
    assert_int_equal(kvf__kve_decode(nested, sizeof nested, collect, &s, NULL, err, sizeof err),
                     KVF_EPROTO);
    assert_int_equal(kvf__kve_decode(long_str, sizeof long_str, collect, &s, NULL, err, sizeof err),
                     KVF_EPROTO);
    assert_int_equal(
        kvf__kve_decode(unused_byte, sizeof unused_byte, collect, &s, NULL, err, sizeof err),
        KVF_EPROTO);
    assert_int_equal(s.n, 0);
}

/* Nesting: 32 containers open at once is the most either decoder takes (msgpack-c's own limit),
 * an empty 33rd included; an ext of no bytes (which msgpack-c cannot unpack) is refused by both,
 * as malformed input rather than as a lack of memory. */
static void test_proto_kvevents_depth_and_ext(void **state)
{
    (void)state;
    uint8_t buf[64];
    kvf__kve_decoder *d;
    assert_int_equal(kvf__kve_decoder_new(&d), 0);
    for (int open = 31; open <= 33; open++)
        for (int empty = 0; empty < 2; empty++) {
            /* [0, [[...[x]...]]]: `open` containers, the innermost empty or holding 0 */
            size_t n = 0;
            buf[n++] = 0x92, buf[n++] = 0x00;
            for (int i = 1; i < open - empty; i++)
                buf[n++] = 0x91;
            buf[n++] = empty ? 0x90 : 0x00;
            const kvf_kve *ev;
            size_t ne;
            char err[160] = "";
            int want = open + empty > 33 || (!empty && open > 32) ? KVF_EPROTO : 0;
            if (empty && open == 33)
                want = KVF_EPROTO;
            assert_int_equal(kvf__kve_decode_batch(d, buf, n, &ev, &ne, NULL, err, sizeof err),
                             want);
            assert_int_equal(kvf__kve_decode_batch_ref(d, buf, n, &ev, &ne, NULL, err, sizeof err),
                             want);
        }
    static const uint8_t ext0[] = {0x92, 0x00, 0x91, 0x92, 0xc7, 0x00, 0x05, 0x00};
    const kvf_kve *ev;
    size_t ne;
    char err[160] = "";
    assert_int_equal(kvf__kve_decode_batch(d, ext0, sizeof ext0, &ev, &ne, NULL, err, sizeof err),
                     KVF_EPROTO);
    assert_int_equal(
        kvf__kve_decode_batch_ref(d, ext0, sizeof ext0, &ev, &ne, NULL, err, sizeof err),
        KVF_EPROTO);
    kvf__kve_decoder_free(&d);
}

/* A value of a random kind, as a publisher that got a field wrong might send it. */
static void pack_any(msgpack_packer *pk, int depth)
{
    uint64_t r = xorshift() >> 33;
    switch (r % 12) {
    case 0:
        msgpack_pack_uint8(pk, (uint8_t)r);
        break;
    case 1:
        msgpack_pack_uint16(pk, (uint16_t)r);
        break;
    case 2:
        msgpack_pack_uint64(pk, r << 31);
        break;
    case 3:
        msgpack_pack_int64(pk, -(int64_t)(r % 1000) - 1);
        break;
    case 4:
        msgpack_pack_int32(pk, (int32_t)(r % 70000)); /* a signed encoding of a positive value */
        break;
    case 5:
        msgpack_pack_nil(pk);
        break;
    case 6:
        msgpack_pack_double(pk, 1.5);
        break;
    case 7:
        msgpack_pack_bin(pk, r % 20);
        msgpack_pack_bin_body(pk, "0123456789abcdefghij", r % 20);
        break;
    case 8:
        pack_str(pk, (r & 1) ? "DISK" : (r & 2) ? "CPU" : "GPU");
        break;
    case 9:
        msgpack_pack_true(pk);
        break;
    default:
        if (depth > 2) {
            msgpack_pack_uint32(pk, (uint32_t)r);
            break;
        }
        msgpack_pack_array(pk, r % 4);
        for (uint64_t i = 0; i < r % 4; i++)
            pack_any(pk, depth + 1);
    }
}

/* One event of a random kind in a random encoding, each field right or (now and then) wrong. */
static void pack_random_event(msgpack_packer *pk)
{
    static const char *const types[] = {"BlockStored",    "BlockRemoved",  "AllBlocksCleared",
                                        "ChunksAdmitted", "ChunksEvicted", "ChunksCleared",
                                        "StoreRates",     "SomethingNew"};
    static const char *const names[] = {
        "block_hashes", "parent_block_hash",    "token_ids", "block_size", "medium", "node",
        "keys",         "disk_read_bytes_per_s"};
    uint64_t r = xorshift() >> 33;
    const char *type = types[r % 8];
    int as_map = (r >> 3) & 1, wrong = (r >> 4) % 4 == 0;
    uint32_t blocks = (uint32_t)((r >> 6) % 5), bs = 1 + (uint32_t)((r >> 9) % 4);
    /* the fields in their array order (kvevents.h), as (name index, kind) */
    int fields = 7;
    if (as_map) {
        msgpack_pack_map(pk, (size_t)fields + 1);
        pack_str(pk, "type");
    } else {
        msgpack_pack_array(pk, (size_t)fields + 1);
    }
    pack_str(pk, type);
    for (int f = 0; f < fields; f++) {
        int name = (int)((r >> (12 + f)) % 8);
        if (!as_map)
            name = f; /* what the position means depends on the type: any value will do */
        else
            pack_str(pk, names[name]);
        uint64_t w = xorshift() >> 33;
        if (wrong && w % 3 == 0) {
            pack_any(pk, 0);
            continue;
        }
        switch (name) {
        case 0: /* hashes, or a node */
            if (!strcmp(type, "StoreRates") || !strncmp(type, "Chunks", 6)) {
                msgpack_pack_uint64(pk, w % 7);
                break;
            }
            msgpack_pack_array(pk, blocks);
            for (uint32_t i = 0; i < blocks; i++)
                msgpack_pack_uint64(pk, w * (i + 1));
            break;
        case 2: /* token ids, or keys */
            if (!strncmp(type, "Chunks", 6)) {
                msgpack_pack_array(pk, blocks);
                for (uint32_t i = 0; i < blocks; i++) {
                    msgpack_pack_bin(pk, 16);
                    msgpack_pack_bin_body(pk, "0123456789abcdef", 16);
                }
                break;
            }
            msgpack_pack_array(pk, (size_t)blocks * bs + (wrong ? w % 2 : 0));
            for (uint32_t i = 0; i < blocks * bs + (wrong ? w % 2 : 0); i++) {
                if (w % 5 == 0)
                    msgpack_pack_uint32(pk, 100000 + i); /* beyond uint16 */
                else if (w % 7 == 0)
                    msgpack_pack_int16(pk, (int16_t)i);
                else
                    msgpack_pack_uint16(pk, (uint16_t)(i * 257));
            }
            break;
        case 3:
            msgpack_pack_uint32(pk, bs);
            break;
        default:
            pack_any(pk, 0);
        }
    }
}

/* msgpuck's decoder and msgpack-c's give the same answer for every batch: random events of every
 * kind in both encodings, fields of the wrong kind, then the same batches cut short and with bytes
 * flipped (the fuzzer does this at length: tests/fuzz/fuzz_kvevents.c). */
static void test_proto_kvevents_decoders_agree(void **state)
{
    (void)state;
    kvf__kve_decoder *d, *r;
    assert_int_equal(kvf__kve_decoder_new(&d), 0);
    assert_int_equal(kvf__kve_decoder_new(&r), 0);
    size_t decoded = 0, refused = 0, events = 0;
    for (int round = 0; round < 600; round++) {
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        msgpack_packer pk;
        msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
        int n = round % 9;
        msgpack_pack_array(&pk, 3);
        msgpack_pack_double(&pk, 2.5);
        msgpack_pack_array(&pk, (size_t)n);
        for (int i = 0; i < n; i++)
            pack_random_event(&pk);
        msgpack_pack_int(&pk, 0);
        for (int variant = 0; variant < 3; variant++) {
            uint8_t *buf = malloc(sb.size);
            assert_non_null(buf);
            memcpy(buf, sb.data, sb.size);
            size_t len = sb.size;
            uint64_t x = xorshift();
            if (variant == 1)
                len = (size_t)(x % sb.size);
            if (variant == 2)
                buf[x % sb.size] ^= (uint8_t)(1u << (x >> 40) % 8);
            const kvf_kve *e1, *e2;
            size_t n1 = 0, n2 = 0;
            uint64_t m1 = 0, m2 = 0;
            char err1[256] = "", err2[256] = "";
            int rc1 = kvf__kve_decode_batch(d, buf, len, &e1, &n1, &m1, err1, sizeof err1);
            int rc2 = kvf__kve_decode_batch_ref(r, buf, len, &e2, &n2, &m2, err2, sizeof err2);
            assert_int_equal(rc1, rc2);
            assert_int_equal(m1, m2);
            assert_string_equal(err1, err2);
            assert_int_equal(n1, n2);
            for (size_t i = 0; i < n1; i++)
                assert_true(kvf__kve_equal(&e1[i], &e2[i]));
            decoded += rc1 == 0, refused += rc1 != 0, events += n1;
            free(buf);
        }
        msgpack_sbuffer_destroy(&sb);
    }
    /* the batches exercised both sides */
    assert_true(decoded > 600 && refused > 100 && events > 1000);
    kvf__kve_decoder_free(&d);
    kvf__kve_decoder_free(&r);
}

static int stop_at_second(void *ud, const kvf_kve *ev, char *err, size_t errlen)
{
    (void)ev, (void)err, (void)errlen;
    return ++*(int *)ud == 2 ? KVF_ENOMEM : 0;
}

/* A callback's error other than KVF_EPROTO stops the batch with that error. */
static void test_proto_kvevents_callback_stops(void **state)
{
    (void)state;
    uint64_t h = 1;
    kvf__kve_enc *e;
    assert_int_equal(kvf__kve_enc_begin(&e, 3), 0);
    for (int i = 0; i < 3; i++)
        kvf__kve_enc_block_removed(e, &h, 1, "GPU");
    const void *data;
    size_t len;
    assert_int_equal(kvf__kve_enc_end(e, &data, &len), 0);
    int calls = 0;
    assert_int_equal(kvf__kve_decode(data, len, stop_at_second, &calls, NULL, NULL, 0), KVF_ENOMEM);
    assert_int_equal(calls, 2);
    kvf__kve_enc_free(&e);
}

/* One decoder, batch after batch: events whose arrays outgrow the decoder's scratch mid-batch
 * (offsets turned into pointers once the batch is done) hold exactly what was encoded; a malformed
 * event in between drops what it appended; a later, smaller batch is decoded into the same
 * scratch; runs of scalars cut short are refused; and nothing leaks (ASan). */
static void test_proto_kvevents_decoder_reuse(void **state)
{
    (void)state;
    kvf__kve_decoder *d;
    assert_int_equal(kvf__kve_decoder_new(&d), 0);
    enum { BIG = 3000, BS = 16 };
    static uint32_t tokens[BIG * BS];
    static uint64_t hashes[BIG];
    for (size_t i = 0; i < BIG * BS; i++)
        tokens[i] = (uint32_t)(i * 2654435761u % 200000u); /* fixints, uint16s and uint32s */
    for (size_t i = 0; i < BIG; i++)
        hashes[i] = i * 0x9E3779B97F4A7C15ull + 1;
    /* Three BlockStored of growing sizes around a malformed one (a token that is a string). */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_double(&pk, 1.0);
    msgpack_pack_array(&pk, 4);
    size_t sizes[3] = {10, 700, BIG - 710}, at = 0;
    for (int e = 0; e < 4; e++) {
        size_t n = e == 1 ? 2 : sizes[e < 1 ? 0 : e - 1];
        msgpack_pack_array(&pk, 7);
        pack_str(&pk, "BlockStored");
        msgpack_pack_array(&pk, n);
        for (size_t i = 0; i < n; i++)
            msgpack_pack_uint64(&pk, hashes[(e == 1 ? 0 : at) + i]);
        msgpack_pack_nil(&pk);
        msgpack_pack_array(&pk, n * BS);
        for (size_t i = 0; i < n * BS; i++) {
            if (e == 1 && i == 5)
                pack_str(&pk, "x");
            else
                msgpack_pack_uint32(&pk, tokens[((e == 1 ? 0 : at) * BS) + i]);
        }
        msgpack_pack_uint32(&pk, BS);
        msgpack_pack_nil(&pk);
        pack_str(&pk, "GPU");
        if (e != 1)
            at += n;
    }
    msgpack_pack_int(&pk, 0);
    const kvf_kve *ev;
    size_t n;
    uint64_t malformed = 0;
    char err[160] = "";
    assert_int_equal(
        kvf__kve_decode_batch(d, sb.data, sb.size, &ev, &n, &malformed, err, sizeof err), 0);
    assert_int_equal(n, 3);
    assert_int_equal(malformed, 1);
    assert_non_null(strstr(err, "token 5"));
    at = 0;
    for (size_t e = 0; e < 3; e++) {
        assert_int_equal(ev[e].type, KVF_KVE_BLOCK_STORED);
        assert_int_equal(ev[e].n_hashes, sizes[e]);
        assert_int_equal(ev[e].n_tokens, sizes[e] * BS);
        assert_memory_equal(ev[e].hashes, hashes + at, sizes[e] * sizeof *hashes);
        assert_memory_equal(ev[e].tokens, tokens + at * BS, sizes[e] * BS * sizeof *tokens);
        at += sizes[e];
    }
    /* The same decoder, a small batch: its own events only. */
    kvf__kve_enc *enc;
    uint64_t h2[2] = {77, 78};
    assert_int_equal(kvf__kve_enc_begin(&enc, 1), 0);
    kvf__kve_enc_block_removed(enc, h2, 2, "GPU");
    const void *data;
    size_t len;
    assert_int_equal(kvf__kve_enc_end(enc, &data, &len), 0);
    malformed = 0;
    assert_int_equal(kvf__kve_decode_batch(d, data, len, &ev, &n, &malformed, err, sizeof err), 0);
    assert_int_equal(n, 1);
    assert_int_equal(malformed, 0);
    assert_int_equal(ev[0].type, KVF_KVE_BLOCK_REMOVED);
    assert_int_equal(ev[0].n_hashes, 2);
    assert_int_equal(ev[0].hashes[1], 78);
    /* Every cut of the big batch is refused (runs of uint16 and uint64 cut mid-item included),
     * and leaves no event behind. */
    for (size_t cut = 1; cut < sb.size; cut += 997) {
        assert_int_equal(kvf__kve_decode_batch(d, sb.data, cut, &ev, &n, NULL, err, sizeof err),
                         KVF_EPROTO);
        assert_int_equal(n, 0);
    }
    kvf__kve_enc_free(&enc);
    msgpack_sbuffer_destroy(&sb);
    kvf__kve_decoder_free(&d);
    assert_null(d);
    kvf__kve_decoder_free(&d); /* accepts NULL */
}

/* Credentials and tenants files: a credential round-trips, one readable by others or malformed
 * is refused with its reason; a signature verifies only for its name, challenge, node and key;
 * tenant scoping keeps one namespace apart per tenant. */
static void test_proto_auth_credentials_and_signatures(void **state)
{
    (void)state;
    char dir[] = "/tmp/kvf-proto-auth-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128], tpath[128], err[300];
    snprintf(path, sizeof path, "%s/a.cred", dir);
    snprintf(tpath, sizeof tpath, "%s/tenants", dir);
    kvf_credential c, back;
    uint8_t pk[KVF_AUTH_PK_LEN], pk2[KVF_AUTH_PK_LEN];
    assert_int_equal(kvf__cred_new(&c, "bad name", pk), KVF_EINVAL);
    assert_int_equal(kvf__cred_new(&c, "acme-1", pk), 0);
    assert_int_equal(kvf__cred_write(path, &c, err, sizeof err), 0);
    assert_int_equal(kvf__cred_write(path, &c, err, sizeof err), KVF_EEXIST);
    assert_int_equal(kvf__cred_load(path, &back, err, sizeof err), 0);
    assert_memory_equal(&c, &back, sizeof c);
    chmod(path, 0644);
    assert_int_equal(kvf__cred_load(path, &back, err, sizeof err), KVF_EACCES);
    assert_non_null(strstr(err, "chmod 600"));
    FILE *f = fopen(path, "w");
    fputs("tenant=acme-1\nsalt=00\n", f);
    fclose(f);
    chmod(path, 0600);
    assert_int_equal(kvf__cred_load(path, &back, err, sizeof err), KVF_EINVAL);

    uint8_t nonce[KVF_AUTH_NONCE_LEN], sig[KVF_AUTH_SIG_LEN];
    kvf__auth_random(nonce, sizeof nonce);
    assert_int_equal(kvf__auth_sign(&c, nonce, 77, sig), 0);
    assert_true(kvf__auth_verify(pk, "acme-1", nonce, 77, sig));
    assert_false(kvf__auth_verify(pk, "acme-2", nonce, 77, sig));
    assert_false(kvf__auth_verify(pk, "acme-1", nonce, 78, sig));
    nonce[5] ^= 1;
    assert_false(kvf__auth_verify(pk, "acme-1", nonce, 77, sig));
    nonce[5] ^= 1;
    kvf_credential r = c;
    assert_int_equal(kvf__cred_rotate(&r, pk2), 0);
    assert_memory_equal(r.salt, c.salt, sizeof c.salt);
    assert_false(kvf__auth_verify(pk2, "acme-1", nonce, 77, sig));

    f = fopen(tpath, "w");
    kvf_tenant_key k = {.role = KVF_ROLE_ADMIN, .max_bytes = 1 << 20, .max_reserved = 4};
    snprintf(k.name, sizeof k.name, "acme-1");
    memcpy(k.pk, pk, sizeof pk);
    char line[512];
    kvf__tenant_key_format(&k, line, sizeof line);
    fprintf(f, "# comment\n\n%s", line);
    fclose(f);
    kvf_tenant_key *keys;
    size_t n;
    assert_int_equal(kvf__tenants_parse(tpath, &keys, &n, err, sizeof err), 0);
    assert_int_equal(n, 1);
    assert_memory_equal(&keys[0], &k, sizeof k);
    free(keys);
    const char *bad[] = {"acme admin\n",
                         "acme boss 00\n",
                         "acme tenant abc\n",
                         "bad/name tenant 00\n",
                         "acme tenant %s bytes=lots\n",
                         "acme tenant %s colour=red\n"};
    char hex[65];
    for (size_t i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", pk[i]);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        f = fopen(tpath, "w");
        fprintf(f, bad[i], hex);
        fclose(f);
        assert_int_equal(kvf__tenants_parse(tpath, &keys, &n, err, sizeof err), KVF_EINVAL);
        assert_non_null(strstr(err, ":1:"));
    }

    uint64_t sa = kvf__auth_scope("alice"), sb = kvf__auth_scope("bob");
    assert_int_not_equal(sa, sb);
    assert_int_not_equal(kvf__auth_ns(sa, 42), kvf__auth_ns(sb, 42));
    assert_int_equal(kvf__auth_ns(sa, 42), kvf__auth_ns(sa, 42));
    assert_int_not_equal(kvf__auth_ns(sa, 42), 0);
    unlink(path);
    unlink(tpath);
    rmdir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_proto_wire_round_trip),
        cmocka_unit_test(test_proto_wire_rejects_bad_headers),
        cmocka_unit_test(test_proto_wire_put_table),
        cmocka_unit_test(test_proto_codecs_round_trip),
        cmocka_unit_test(test_proto_object_encode_verify_corrupt),
        cmocka_unit_test(test_proto_kvevents_round_trip),
        cmocka_unit_test(test_proto_kvevents_maps_and_malformed),
        cmocka_unit_test(test_proto_kvevents_callback_stops),
        cmocka_unit_test(test_proto_kvevents_decoder_reuse),
        cmocka_unit_test(test_proto_kvevents_claims_bounded),
        cmocka_unit_test(test_proto_kvevents_depth_and_ext),
        cmocka_unit_test(test_proto_kvevents_decoders_agree),
        cmocka_unit_test(test_proto_auth_credentials_and_signatures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
