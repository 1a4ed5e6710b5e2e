/*
 * Unit tests of the core module: the error space, layouts (every validation failure), the layout
 * fingerprint, chunk keys (golden vectors from docs/keys.md, the prefix property, namespace
 * separation), logging and clocks.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvf/kvf.h"

#include "clock.h"
#include "jsonkeys.h"
#include "log.h"
#include "member.h"
#include "metrics.h"
#include "units.h"

#include <pthread.h>

/* ------------------------------------------------------------------------------------------ */
/* Errors */

static void test_core_error_names_and_messages(void **state)
{
    (void)state;
    int seen = 0;
#define XX(name, num, msg)                                       \
    assert_int_equal(KVF_##name, -(num));                        \
    assert_string_equal(kvf_err_name(KVF_##name), "KVF_" #name); \
    assert_string_equal(kvf_strerror(KVF_##name), msg);          \
    assert_true(kvf_err_is_known(KVF_##name));                   \
    seen++;
    KVF_ERRNO_MAP(XX)
#undef XX
    assert_true(seen >= 30);
    assert_string_equal(kvf_err_name(0), "KVF_OK");
    assert_string_equal(kvf_strerror(0), "success");
    assert_string_equal(kvf_err_name(-12345), "KVF_E?");
    assert_string_equal(kvf_strerror(-12345), "unknown error code");
    assert_false(kvf_err_is_known(-12345));
    assert_false(kvf_err_is_known(5));
    /* one node's answer another may not give, and answers any node would give alike */
    static const int elsewhere[] = {KVF_ENOENT,     KVF_EHOSTUNREACH, KVF_ECONNREFUSED,
                                    KVF_ECONNRESET, KVF_ETIMEDOUT,    KVF_ECHECKSUM,
                                    KVF_EPROTO,     KVF_EIO};
    for (size_t i = 0; i < sizeof elsewhere / sizeof elsewhere[0]; i++)
        assert_true(kvf_err_ask_elsewhere(elsewhere[i]));
    static const int alike[] = {0, KVF_ECANCELED, KVF_ECLOSED, KVF_E2BIG, KVF_ELAYOUT, KVF_ENOMEM};
    for (size_t i = 0; i < sizeof alike / sizeof alike[0]; i++)
        assert_false(kvf_err_ask_elsewhere(alike[i]));
}

static void test_core_error_codes_are_distinct(void **state)
{
    (void)state;
    static const int codes[] = {
#define XX(name, num, msg) KVF_##name,
        KVF_ERRNO_MAP(XX)
#undef XX
    };
    size_t n = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < n; i++) {
        assert_true(codes[i] < 0);
        for (size_t j = i + 1; j < n; j++)
            assert_int_not_equal(codes[i], codes[j]);
    }
}

static void test_core_error_from_errno(void **state)
{
    (void)state;
    assert_int_equal(kvf_err_from_errno(0), KVF_OK);
    assert_int_equal(kvf_err_from_errno(EINVAL), KVF_EINVAL);
    assert_int_equal(kvf_err_from_errno(ENOMEM), KVF_ENOMEM);
    assert_int_equal(kvf_err_from_errno(ECONNREFUSED), KVF_ECONNREFUSED);
    assert_int_equal(kvf_err_from_errno(ETIMEDOUT), KVF_ETIMEDOUT);
    assert_int_equal(kvf_err_from_errno(EWOULDBLOCK), KVF_EAGAIN);
    assert_int_equal(kvf_err_from_errno(ECONNRESET), KVF_ECONNRESET);
    assert_int_equal(kvf_err_from_errno(EPIPE), KVF_EPIPE);
    assert_int_equal(kvf_err_from_errno(EADDRINUSE), KVF_EADDRINUSE);
    assert_int_equal(kvf_err_from_errno(ENOSPC), KVF_ENOSPC);
    assert_int_equal(kvf_err_from_errno(EPERM), KVF_EACCES);
    assert_int_equal(kvf_err_from_errno(EMSGSIZE), KVF_E2BIG);
    assert_int_equal(kvf_err_from_errno(EXDEV), KVF_EUNKNOWN);
    /* Every errno from 1 to 200 maps to a known code: never an unlisted number. */
    for (int e = 1; e < 200; e++) {
        int c = kvf_err_from_errno(e);
        assert_true(c < 0);
        assert_true(kvf_err_is_known(c));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Layouts */

static kvf_layout base_layout(void)
{
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("llama-3.1-8b", &l), 0);
    return l;
}

/* Each case breaks one field; the error must name that field. */
static void expect_invalid(const kvf_layout *l, const char *field)
{
    char err[256] = "";
    assert_int_equal(kvf_layout_validate(l, err, sizeof err), KVF_EINVAL);
    if (strncmp(err, field, strlen(field)) != 0)
        fail_msg("expected an error naming \"%s\", got \"%s\"", field, err);
    uint64_t fp;
    assert_int_equal(kvf_layout_fingerprint(l, &fp), KVF_EINVAL);
    assert_int_equal(kvf_layout_chunk_bytes(l), 0);
}

static void test_core_layout_validation_failures(void **state)
{
    (void)state;
    kvf_layout l;

    l = base_layout();
    assert_int_equal(kvf_layout_validate(&l, NULL, 0), 0);

    l = base_layout();
    l.model_id[0] = '\0';
    expect_invalid(&l, "model_id");

    l = base_layout();
    memset(l.model_id, 'a', sizeof l.model_id); /* not NUL-terminated */
    expect_invalid(&l, "model_id");

    l = base_layout();
    strcpy(l.model_id, "has space");
    expect_invalid(&l, "model_id");

    l = base_layout();
    l.layers = 0;
    expect_invalid(&l, "layers");

    l = base_layout();
    l.layers = 5000;
    expect_invalid(&l, "layers");

    l = base_layout();
    l.kv_heads = 0;
    expect_invalid(&l, "kv_heads");

    l = base_layout();
    l.head_dim = 0;
    expect_invalid(&l, "head_dim");

    l = base_layout();
    l.dtype = (kvf_dtype)99;
    expect_invalid(&l, "dtype");

    l = base_layout();
    l.kind = (kvf_kv_kind)7;
    expect_invalid(&l, "kind");

    l = base_layout();
    l.kind = KVF_KV_LATENT; /* 8 heads cannot be latent */
    expect_invalid(&l, "kv_heads");

    l = base_layout();
    l.page_tokens = 0;
    expect_invalid(&l, "page_tokens");

    l = base_layout();
    l.chunk_tokens = 0;
    expect_invalid(&l, "chunk_tokens");

    l = base_layout();
    l.chunk_tokens = 100; /* not a multiple of 16 */
    expect_invalid(&l, "chunk_tokens");

    l = base_layout();
    l.chunk_tokens = 1u << 21;
    expect_invalid(&l, "chunk_tokens");

    l = base_layout();
    l.chunk_tokens = 1u << 20; /* 1M tokens x 128 KiB per token: over 4 GiB a chunk */
    expect_invalid(&l, "chunk_tokens");

    l = base_layout();
    l.tp_size = 0;
    expect_invalid(&l, "tp_size");

    l = base_layout();
    l.tp_size = 4;
    l.tp_rank = 4;
    expect_invalid(&l, "tp_rank");

    l = base_layout();
    l.tp_size = 3; /* 8 heads over 3 ranks */
    expect_invalid(&l, "kv_heads");

    l = base_layout();
    l.tp_size = 12; /* 8 heads, 12 ranks: neither divides the other */
    expect_invalid(&l, "kv_heads");

    assert_int_equal(kvf_layout_validate(NULL, NULL, 0), KVF_EINVAL);
}

static void test_core_layout_sizes_match_public_configs(void **state)
{
    (void)state;
    kvf_layout l;
    /* llama-3.1-8b, bf16: 32 layers x 2 (K,V) x 8 heads x 128 x 2 bytes = 131072 bytes/token. */
    assert_int_equal(kvf_layout_preset("llama-3.1-8b", &l), 0);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 131072);
    assert_int_equal(kvf_layout_bytes_per_token_layer(&l), 4096);
    assert_int_equal(kvf_layout_segment_bytes(&l), 4096 * 256);
    assert_int_equal(kvf_layout_chunk_bytes(&l), 131072ull * 256);
    /* llama-3.1-70b: 80 x 2 x 8 x 128 x 2 = 327680. */
    assert_int_equal(kvf_layout_preset("llama-3.1-70b", &l), 0);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 327680);
    /* qwen2.5-7b: 28 x 2 x 4 x 128 x 2 = 57344. */
    assert_int_equal(kvf_layout_preset("qwen2.5-7b", &l), 0);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 57344);
    /* mistral-7b: 32 x 2 x 8 x 128 x 2 = 131072. */
    assert_int_equal(kvf_layout_preset("mistral-7b", &l), 0);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 131072);
    /* deepseek-v3 (MLA): 61 x (512 + 64) x 2 = 70272. */
    assert_int_equal(kvf_layout_preset("deepseek-v3", &l), 0);
    assert_int_equal(l.kind, KVF_KV_LATENT);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 70272);
    /* ref-100m, f32: 12 x 2 x 4 x 64 x 4 = 24576. */
    assert_int_equal(kvf_layout_preset("ref-100m", &l), 0);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 24576);
    assert_int_equal(kvf_layout_preset("no-such-model", &l), KVF_ENOENT);

    size_t n = 0;
    while (kvf_layout_preset_name(n))
        n++;
    assert_int_equal(n, 8);
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(kvf_layout_preset(kvf_layout_preset_name(i), &l), 0);
        assert_int_equal(kvf_layout_validate(&l, NULL, 0), 0);
    }
}

static void test_core_layout_tensor_parallel_heads(void **state)
{
    (void)state;
    kvf_layout l = base_layout();
    l.tp_size = 4;
    l.tp_rank = 3;
    assert_int_equal(kvf_layout_heads_per_rank(&l), 2);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 131072 / 4);
    /* 16 ranks over 8 heads: each head is replicated on two ranks, one head per rank. */
    l.tp_size = 16;
    l.tp_rank = 15;
    assert_int_equal(kvf_layout_heads_per_rank(&l), 1);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 131072 / 8);
    /* A latent cache is the same on every rank. */
    assert_int_equal(kvf_layout_preset("deepseek-v3", &l), 0);
    l.tp_size = 8;
    l.tp_rank = 5;
    assert_int_equal(kvf_layout_validate(&l, NULL, 0), 0);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 70272);
}

static void test_core_layout_fingerprint_covers_every_field(void **state)
{
    (void)state;
    kvf_layout a = base_layout();
    uint64_t fa, fb;
    assert_int_equal(kvf_layout_fingerprint(&a, &fa), 0);
    kvf_layout b = a;
    assert_int_equal(kvf_layout_fingerprint(&b, &fb), 0);
    assert_true(fa == fb);
    uint64_t seen[16];
    size_t n = 0;
    seen[n++] = fa;
    for (int field = 0; field < 10; field++) {
        b = a;
        switch (field) {
        case 0:
            strcpy(b.model_id, "llama-3.1-8b-instruct");
            break;
        case 1:
            b.layers = 31;
            break;
        case 2:
            b.kv_heads = 4;
            break;
        case 3:
            b.head_dim = 64;
            break;
        case 4:
            b.dtype = KVF_DTYPE_F16;
            break;
        case 5:
            b.kind = KVF_KV_LATENT;
            b.kv_heads = 1;
            break;
        case 6:
            b.page_tokens = 32;
            break;
        case 7:
            b.chunk_tokens = 512;
            break;
        case 8:
            b.tp_size = 2;
            break;
        case 9:
            b.tp_size = 2;
            b.tp_rank = 1;
            break;
        }
        assert_int_equal(kvf_layout_fingerprint(&b, &fb), 0);
        for (size_t i = 0; i < n; i++)
            assert_true(fb != seen[i]);
        seen[n++] = fb;
    }
    /* Golden value, docs/keys.md. */
    assert_int_equal(kvf_layout_preset("ref-tiny", &a), 0);
    assert_int_equal(kvf_layout_fingerprint(&a, &fa), 0);
    assert_true(fa == 0x2983fb67497fe707ull);
}

static void test_core_layout_json(void **state)
{
    (void)state;
    kvf_layout l;
    char err[256];
    const char *ok = "{\"preset\":\"qwen2.5-7b\",\"chunk_tokens\":512,\"tp_size\":2,\"tp_rank\":1}";
    assert_int_equal(kvf_layout_from_json(ok, strlen(ok), &l, err, sizeof err), 0);
    assert_string_equal(l.model_id, "qwen2.5-7b");
    assert_int_equal(l.chunk_tokens, 512);
    assert_int_equal(l.tp_rank, 1);

    const char *full = "{\"model_id\":\"my/model\",\"layers\":2,\"kv_heads\":1,\"head_dim\":8,"
                       "\"dtype\":\"fp8_e4m3\",\"kind\":\"latent\",\"page_tokens\":8,"
                       "\"chunk_tokens\":8}";
    assert_int_equal(kvf_layout_from_json(full, strlen(full), &l, err, sizeof err), 0);
    assert_int_equal(l.dtype, KVF_DTYPE_FP8_E4M3);
    assert_int_equal(l.kind, KVF_KV_LATENT);
    assert_int_equal(kvf_layout_bytes_per_token(&l), 16);

    /* Round trip through kvf_layout_to_json, fingerprint included. */
    char buf[512];
    int n = kvf_layout_to_json(&l, buf, sizeof buf);
    assert_true(n > 0 && (size_t)n < sizeof buf);
    kvf_layout r;
    assert_int_equal(kvf_layout_from_json(buf, (size_t)n, &r, err, sizeof err), 0);
    assert_memory_equal(&l, &r, sizeof l);

    static const struct {
        const char *json, *needle;
    } bad[] = {
        {"[1,2]", "expected an object"},
        {"{\"preset\":\"nope\"}", "preset"},
        {"{\"preset\":3}", "preset"},
        {"{\"preset\":\"ref-tiny\",\"layers\":-1}", "layers"},
        {"{\"preset\":\"ref-tiny\",\"layers\":\"4\"}", "layers"},
        {"{\"preset\":\"ref-tiny\",\"dtype\":\"f64\"}", "dtype"},
        {"{\"preset\":\"ref-tiny\",\"kind\":\"mla\"}", "kind"},
        {"{\"preset\":\"ref-tiny\",\"colour\":1}", "unknown key \"colour\""},
        {"{\"preset\":\"ref-tiny\",\"chunk_tokens\":20}", "chunk_tokens"},
        {"{\"preset\":\"ref-tiny\",\"fingerprint\":\"0000000000000000\"}", "fingerprint"},
        {"{\"preset\":\"ref-tiny\",\"layers\":4,\"layers\":5}", "line"},
        {"{\"layers\":4,", "line"},
        {"{\"layers\":4,\"kv_heads\":2,\"head_dim\":8}", "model_id"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        assert_int_equal(
            kvf_layout_from_json(bad[i].json, strlen(bad[i].json), &l, err, sizeof err),
            KVF_EINVAL);
        if (!strstr(err, bad[i].needle))
            fail_msg("case %zu: expected \"%s\" in \"%s\"", i, bad[i].needle, err);
    }
}

static void test_core_layout_json_file(void **state)
{
    (void)state;
    char path[] = "/tmp/kvf-layout-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    const char *j = "{\"preset\":\"mistral-7b\",\"page_tokens\":32}";
    assert_int_equal(write(fd, j, strlen(j)), (ssize_t)strlen(j));
    close(fd);
    kvf_layout l;
    char err[256];
    assert_int_equal(kvf_layout_load_json(path, &l, err, sizeof err), 0);
    assert_int_equal(l.page_tokens, 32);
    assert_int_equal(kvf_layout_resolve(path, &l, err, sizeof err), 0);
    assert_int_equal(kvf_layout_resolve("mistral-7b", &l, err, sizeof err), 0);
    assert_int_equal(l.page_tokens, 16);
    unlink(path);
    assert_int_equal(kvf_layout_load_json(path, &l, err, sizeof err), KVF_ENOENT);
    assert_non_null(strstr(err, path));
    assert_int_equal(kvf_layout_resolve("unknown-model", &l, err, sizeof err), KVF_ENOENT);
    assert_non_null(strstr(err, "unknown model"));
    assert_int_equal(kvf_layout_load_json("/tmp", &l, err, sizeof err), KVF_EINVAL);
}

static void test_core_layout_dtype_names(void **state)
{
    (void)state;
    for (int i = 0; i < KVF_DTYPE_COUNT_; i++) {
        kvf_dtype d;
        assert_int_equal(kvf_dtype_parse(kvf_dtype_name((kvf_dtype)i), &d), 0);
        assert_int_equal(d, i);
    }
    assert_null(kvf_dtype_name(KVF_DTYPE_COUNT_));
    kvf_dtype d;
    assert_int_equal(kvf_dtype_parse("float", &d), KVF_EINVAL);
    assert_int_equal(kvf_layout_dtype_size(KVF_DTYPE_BF16), 2);
    assert_int_equal(kvf_layout_dtype_size(KVF_DTYPE_F32), 4);
    assert_int_equal(kvf_layout_dtype_size(KVF_DTYPE_INT8), 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Keys */

static void fill_tokens(uint32_t *t, size_t n, uint32_t start)
{
    for (size_t i = 0; i < n; i++)
        t[i] = start + (uint32_t)i;
}

static void test_core_keys_golden_vectors(void **state)
{
    (void)state;
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    uint32_t tokens[3 * 64 + 10];
    fill_tokens(tokens, 3 * 64 + 10, 1000);
    kvf_keyspace ks;
    assert_int_equal(kvf_keyspace_init(&ks, &l, NULL, 0), 0);
    assert_true(ks.seed == 0x0b160b44a187fbc4ull);
    kvf_key keys[8];
    size_t n, left;
    assert_int_equal(kvf_keys_compute(&ks, tokens, 3 * 64 + 10, keys, 8, &n, &left), 0);
    assert_int_equal(n, 3);
    assert_int_equal(left, 10);
    char hex[33];
    assert_string_equal(kvf_key_to_hex(&keys[0], hex), "1793a9698aa36cbbe99cdb687fca03df");
    assert_string_equal(kvf_key_to_hex(&keys[1], hex), "c3ef6168d92a61b14b0f262c80901433");
    assert_string_equal(kvf_key_to_hex(&keys[2], hex), "4b01f11cb5efa1a023527988551d4911");

    assert_int_equal(kvf_keyspace_init(&ks, &l, "tenant-a", 8), 0);
    assert_true(ks.seed == 0x76c22dd6b52a51e6ull);
    assert_int_equal(kvf_keys_compute(&ks, tokens, 3 * 64, keys, 8, &n, &left), 0);
    assert_int_equal(left, 0);
    assert_string_equal(kvf_key_to_hex(&keys[0], hex), "1980a43bdbef9bc323285dd5ffcc9660");
    assert_string_equal(kvf_key_to_hex(&keys[1], hex), "655a5734515c180be3665e8393f97f72");
    assert_string_equal(kvf_key_to_hex(&keys[2], hex), "1a19e7ca6b828771fa353aacb2969d02");
}

/* Sequences that share exactly k full chunks share exactly their first k keys. */
static void test_core_keys_prefix_property(void **state)
{
    (void)state;
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    kvf_keyspace ks;
    assert_int_equal(kvf_keyspace_init(&ks, &l, NULL, 0), 0);
    enum { C = 64, CH = 8 };
    uint32_t a[C * CH], b[C * CH];
    srand(7);
    for (int k = 0; k <= CH; k++) {
        for (size_t i = 0; i < C * CH; i++)
            a[i] = b[i] = (uint32_t)rand();
        /* Make them differ at a random token of chunk k (if any chunk is left). */
        if (k < CH)
            b[k * C + rand() % C] ^= 0x5a5a5a5a;
        kvf_key ka[CH], kb[CH];
        size_t na, nb;
        assert_int_equal(kvf_keys_compute(&ks, a, C * CH, ka, CH, &na, NULL), 0);
        assert_int_equal(kvf_keys_compute(&ks, b, C * CH, kb, CH, &nb, NULL), 0);
        assert_int_equal(na, CH);
        for (int i = 0; i < CH; i++) {
            if (i < k)
                assert_true(kvf_key_eq(&ka[i], &kb[i]));
            else
                assert_false(kvf_key_eq(&ka[i], &kb[i]));
        }
    }
    /* The same chunk content after different prefixes gets different keys. */
    uint32_t c[2 * C];
    fill_tokens(c, C, 1);
    fill_tokens(c + C, C, 1);
    kvf_key kc[2];
    size_t nc;
    assert_int_equal(kvf_keys_compute(&ks, c, 2 * C, kc, 2, &nc, NULL), 0);
    assert_false(kvf_key_eq(&kc[0], &kc[1]));
}

static void test_core_keys_namespaces_are_disjoint(void **state)
{
    (void)state;
    enum { C = 256, CH = 4 };
    static uint32_t t[C * CH];
    fill_tokens(t, C * CH, 42);
    kvf_layout base;
    assert_int_equal(kvf_layout_preset("llama-3.1-8b", &base), 0);
    kvf_layout other_model = base, other_layout = base;
    strcpy(other_model.model_id, "mistral-7b");
    other_layout.dtype = KVF_DTYPE_FP8_E4M3;
    kvf_keyspace spaces[5];
    assert_int_equal(kvf_keyspace_init(&spaces[0], &base, NULL, 0), 0);
    assert_int_equal(kvf_keyspace_init(&spaces[1], &other_model, NULL, 0), 0);
    assert_int_equal(kvf_keyspace_init(&spaces[2], &other_layout, NULL, 0), 0);
    assert_int_equal(kvf_keyspace_init(&spaces[3], &base, "tenant-a", 8), 0);
    assert_int_equal(kvf_keyspace_init(&spaces[4], &base, "tenant-b", 8), 0);
    kvf_key keys[5][CH];
    for (int s = 0; s < 5; s++) {
        size_t n;
        assert_int_equal(kvf_keys_compute(&spaces[s], t, C * CH, keys[s], CH, &n, NULL), 0);
        assert_int_equal(n, CH);
    }
    for (int s = 0; s < 5; s++)
        for (int u = s + 1; u < 5; u++)
            for (int i = 0; i < CH; i++)
                for (int j = 0; j < CH; j++)
                    assert_false(kvf_key_eq(&keys[s][i], &keys[u][j]));
}

static void test_core_keys_bounds_and_errors(void **state)
{
    (void)state;
    kvf_layout l;
    assert_int_equal(kvf_layout_preset("ref-tiny", &l), 0);
    kvf_keyspace ks;
    assert_int_equal(kvf_keyspace_init(&ks, &l, NULL, 0), 0);
    uint32_t t[64 * 5];
    fill_tokens(t, 64 * 5, 0);
    kvf_key keys[2];
    size_t n, left;
    /* max_keys bounds the output; leftover counts what the written keys do not cover. */
    assert_int_equal(kvf_keys_compute(&ks, t, 64 * 5, keys, 2, &n, &left), 0);
    assert_int_equal(n, 2);
    assert_int_equal(left, 64 * 3);
    assert_int_equal(kvf_keys_compute(&ks, t, 63, keys, 2, &n, &left), 0);
    assert_int_equal(n, 0);
    assert_int_equal(left, 63);
    assert_int_equal(kvf_keys_compute(&ks, NULL, 0, keys, 2, &n, &left), 0);
    assert_int_equal(n, 0);
    assert_int_equal(kvf_keys_compute(&ks, NULL, 64, keys, 2, &n, &left), KVF_EINVAL);
    assert_int_equal(kvf_keys_compute(NULL, t, 64, keys, 2, &n, &left), KVF_EINVAL);
    /* kvf_key_next chains exactly as kvf_keys_compute. */
    kvf_key k0 = kvf_key_next(&ks, NULL, t);
    kvf_key k1 = kvf_key_next(&ks, &k0, t + 64);
    assert_int_equal(kvf_keys_compute(&ks, t, 128, keys, 2, &n, NULL), 0);
    assert_true(kvf_key_eq(&k0, &keys[0]));
    assert_true(kvf_key_eq(&k1, &keys[1]));

    char big[KVF_SALT_MAX + 1];
    memset(big, 'x', sizeof big);
    assert_int_equal(kvf_keyspace_init(&ks, &l, big, sizeof big), KVF_E2BIG);
    assert_int_equal(kvf_keyspace_init(&ks, &l, NULL, 3), KVF_EINVAL);
    l.layers = 0;
    assert_int_equal(kvf_keyspace_init(&ks, &l, NULL, 0), KVF_EINVAL);
}

static void test_core_keys_hex_round_trip(void **state)
{
    (void)state;
    kvf_key k = {.lo = 0x0123456789abcdefull, .hi = 0xfedcba9876543210ull};
    char hex[33];
    assert_string_equal(kvf_key_to_hex(&k, hex), "fedcba98765432100123456789abcdef");
    kvf_key r;
    assert_int_equal(kvf_key_from_hex(hex, &r), 0);
    assert_true(kvf_key_eq(&k, &r));
    assert_int_equal(kvf_key_from_hex("FEDCBA98765432100123456789ABCDEF", &r), 0);
    assert_true(kvf_key_eq(&k, &r));
    assert_int_equal(kvf_key_from_hex("xyz", &r), KVF_EINVAL);
    assert_int_equal(kvf_key_from_hex("fedcba98765432100123456789abcdeg", &r), KVF_EINVAL);
    assert_int_equal(kvf_key_from_hex(NULL, &r), KVF_EINVAL);
}

/* ------------------------------------------------------------------------------------------ */
/* Log and clock */

struct captured {
    int lines;
    char last[1024];
};

static void capture_sink(void *ud, kvf_log_level level, const char *line)
{
    struct captured *c = ud;
    (void)level;
    c->lines++;
    snprintf(c->last, sizeof c->last, "%s", line);
}

static void test_core_log_levels_and_format(void **state)
{
    (void)state;
    struct captured c = {0};
    kvf_log lg = {.level = KVF_LOG_INFO, .name = "unit", .sink = capture_sink, .ud = &c};
    kvf_debug(&lg, "hidden %d", 1);
    assert_int_equal(c.lines, 0);
    kvf_info(&lg, "visible %d", 2);
    assert_int_equal(c.lines, 1);
    assert_non_null(strstr(c.last, "INFO  unit: visible 2"));
    /* ISO 8601 UTC timestamp with milliseconds: 2026-11-22T06:03:29.123Z */
    assert_int_equal(c.last[4], '-');
    assert_int_equal(c.last[10], 'T');
    assert_int_equal(c.last[19], '.');
    assert_int_equal(c.last[23], 'Z');
    lg.level = KVF_LOG_ERROR;
    kvf_warn(&lg, "dropped");
    assert_int_equal(c.lines, 1);
    kvf_error(&lg, "kept");
    assert_int_equal(c.lines, 2);
    kvf_log_level lv;
    assert_int_equal(kvf__log_level_parse("debug", &lv), 0);
    assert_int_equal(lv, KVF_LOG_DEBUG);
    assert_int_equal(kvf__log_level_parse("WARNING", &lv), 0);
    assert_int_equal(lv, KVF_LOG_WARN);
    assert_int_equal(kvf__log_level_parse("loud", &lv), -1);
    /* --log-format json: one object a line, the message escaped */
    kvf_log_format fm;
    assert_int_equal(kvf__log_format_parse("json", &fm), 0);
    assert_int_equal(fm, KVF_LOG_JSON);
    assert_int_equal(kvf__log_format_parse("xml", &fm), -1);
    lg.format = fm;
    lg.level = KVF_LOG_DEBUG;
    kvf_warn(&lg, "a \"quoted\" %s\nline", "two-part");
    json_error_t je;
    json_t *o = json_loads(c.last, 0, &je);
    if (!o)
        fail_msg("not JSON: %s (%s)", c.last, je.text);
    assert_string_equal(json_string_value(json_object_get(o, "level")), "warn");
    assert_string_equal(json_string_value(json_object_get(o, "component")), "unit");
    assert_string_equal(json_string_value(json_object_get(o, "msg")),
                        "a \"quoted\" two-part\nline");
    assert_int_equal(strlen(json_string_value(json_object_get(o, "ts"))), 24);
    assert_true(json_integer_value(json_object_get(o, "pid")) == (json_int_t)getpid());
    json_decref(o);
}

static void test_core_clock(void **state)
{
    (void)state;
    uint64_t a = kvf__now_ns();
    uint64_t b = kvf__now_ns();
    assert_true(b >= a);
    uint64_t fake = 1234;
    kvf_clock fc = {.now_ns = kvf__clock_fake_now, .ud = &fake};
    assert_int_equal(kvf__clock_now(&fc), 1234);
    fake = 99999;
    assert_int_equal(kvf__clock_now(&fc), 99999);
    assert_true(kvf__clock_now(kvf__clock_monotonic()) >= b);
}

static void test_core_parse_size(void **state)
{
    (void)state;
    static const struct {
        const char *s;
        uint64_t v;
    } ok[] = {{"0", 0},
              {"1048576", 1048576},
              {"64k", 64ull << 10},
              {"64KiB", 64ull << 10},
              {"512M", 512ull << 20},
              {"512MB", 512ull << 20},
              {"4G", 4ull << 30},
              {"2t", 2ull << 40}};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        uint64_t v = 1;
        assert_int_equal(kvf__parse_size(ok[i].s, &v), 0);
        assert_true(v == ok[i].v);
    }
    static const char *const bad[] = {
        "", "M", "-1", "1x", "4GiBs", "1.5G", " 4G", "99999999999999999999", "16777216T"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 7;
        assert_int_equal(kvf__parse_size(bad[i], &v), -1);
        assert_true(v == 7);
    }
}

static void test_core_fmt_size(void **state)
{
    (void)state;
    char b[32];
    assert_string_equal(kvf__fmt_size(4096, b, sizeof b), "4 KiB");
    assert_string_equal(kvf__fmt_size(1000, b, sizeof b), "1000 B");
    assert_string_equal(kvf__fmt_size(4ull << 40, b, sizeof b), "4 TiB");
    assert_string_equal(kvf__fmt_size(3ull << 29, b, sizeof b), "1.5 GiB");
}

static void test_core_json_keys(void **state)
{
    (void)state;
    static const char *const known[] = {"stores", "prefill", "decode", NULL};
    char err[300];
    json_t *o = json_loads("{\"stores\": 1, \"decode\": 2}", 0, NULL);
    assert_int_equal(kvf__json_keys_check(o, known, "f.json", err, sizeof err), 0);
    json_decref(o);
    o = json_loads("{\"stroes\": 1}", 0, NULL);
    assert_int_equal(kvf__json_keys_check(o, known, "f.json", err, sizeof err), -1);
    assert_non_null(strstr(err, "f.json: unknown key \"stroes\" (did you mean \"stores\"?"));
    json_decref(o);
    o = json_loads("{\"colour\": 1}", 0, NULL);
    assert_int_equal(kvf__json_keys_check(o, known, "f.json", err, sizeof err), -1);
    assert_null(strstr(err, "did you mean"));
    assert_non_null(strstr(err, "known: stores, prefill, decode"));
    json_decref(o);
    o = json_loads("[1]", 0, NULL);
    assert_int_equal(kvf__json_keys_check(o, known, "f.json", err, sizeof err), -1);
    assert_non_null(strstr(err, "must be an object"));
    json_decref(o);
}

static void collect_gauge(void *ud, kvf__metrics *m)
{
    kvf__series_set(
        kvf__metric_series(kvf__metric_gauge(m, "arena_bytes", "Arena size.", NULL), NULL),
        (double)*(uint64_t *)ud);
}

static void test_core_metrics_exposition(void **state)
{
    (void)state;
    kvf__metrics *m = kvf__metrics_new("kvf_test");
    assert_non_null(m);
    kvf__metric *req =
        kvf__metric_counter(m, "requests_total", "Requests\nserved \\ here.", "op,result");
    assert_non_null(req);
    kvf__series_add(kvf__metric_series(req, (const char *[]){"get", "ok"}), 2);
    kvf__series_add(kvf__metric_series(req, (const char *[]){"get", "ok"}), 1);
    kvf__series_add(kvf__metric_series(req, (const char *[]){"put", "a\"b\\c\nd"}), 1);
    static const double bounds[] = {0.001, 0.01, 0.1};
    kvf__metric *lat = kvf__metric_histogram(m, "op_seconds", "Op latency.", "op", bounds, 3);
    kvf__series *g = kvf__metric_series(lat, (const char *[]){"get"});
    kvf__series_observe(g, 0.0005);
    kvf__series_observe(g, 0.001); /* on a bound: in it (le) */
    kvf__series_observe(g, 0.05);
    kvf__series_observe(g, 3.0);
    uint64_t arena = 1ull << 30;
    kvf__metrics_on_collect(m, collect_gauge, &arena);
    char *t = NULL;
    size_t len = 0;
    assert_int_equal(kvf__metrics_expose(m, &t, &len), 0);
    assert_int_equal(strlen(t), len);
    const char *want[] = {
        "kvf_build_info{component=\"kvf_test\",version=\"" KVF_VERSION_STRING "\"} 1\n",
        "# HELP kvf_test_requests_total Requests\\nserved \\\\ here.\n",
        "# TYPE kvf_test_requests_total counter\n",
        "kvf_test_requests_total{op=\"get\",result=\"ok\"} 3\n",
        "kvf_test_requests_total{op=\"put\",result=\"a\\\"b\\\\c\\nd\"} 1\n",
        "# TYPE kvf_test_op_seconds histogram\n",
        "kvf_test_op_seconds_bucket{op=\"get\",le=\"0.001\"} 2\n",
        "kvf_test_op_seconds_bucket{op=\"get\",le=\"0.01\"} 2\n",
        "kvf_test_op_seconds_bucket{op=\"get\",le=\"0.1\"} 3\n",
        "kvf_test_op_seconds_bucket{op=\"get\",le=\"+Inf\"} 4\n",
        "kvf_test_op_seconds_sum{op=\"get\"} 3.0515\n",
        "kvf_test_op_seconds_count{op=\"get\"} 4\n",
        "# TYPE kvf_test_arena_bytes gauge\nkvf_test_arena_bytes 1073741824\n",
        "# TYPE process_open_fds gauge\n",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (!strstr(t, want[i]))
            fail_msg("missing %s in:\n%s", want[i], t);
    /* HELP and TYPE come once per family, before its samples */
    assert_null(
        strstr(strstr(t, "# TYPE kvf_test_requests_total") + 1, "# TYPE kvf_test_requests_total"));
    free(t);
    kvf__metrics_free(&m);
    assert_null(m);
}

static void test_core_metrics_rules(void **state)
{
    (void)state;
    kvf__metrics *m = kvf__metrics_new("kvf_test");
    kvf__metric *a = kvf__metric_counter(m, "x_total", "X.", "op");
    assert_non_null(a);
    assert_ptr_equal(kvf__metric_counter(m, "x_total", "X.", "op"), a); /* the same again */
    assert_null(kvf__metric_gauge(m, "x_total", "X.", "op"));           /* another type */
    assert_null(kvf__metric_counter(m, "x_total", "X.", "result"));     /* other labels */
    assert_null(kvf__metric_counter(m, "bad-name", "X.", NULL));
    assert_null(kvf__metric_counter(m, "y_total", "Y.", "le"));   /* reserved */
    assert_null(kvf__metric_counter(m, "y_total", "Y.", "a,,b")); /* empty */
    assert_null(kvf__metric_counter(m, "y_total", "Y.", "__a"));
    static const double down[] = {1.0, 0.5};
    assert_null(kvf__metric_histogram(m, "h_seconds", "H.", NULL, down, 2));
    assert_null(kvf__metric_histogram(m, "h_seconds", "H.", NULL, NULL, 0));
    /* NULL series and families are ignored, never a crash */
    kvf__series_add(kvf__metric_series(NULL, NULL), 1);
    kvf__series_observe(NULL, 1);
    /* observe on a counter does nothing; set on a gauge replaces */
    kvf__series *c = kvf__metric_series(a, (const char *[]){"get"});
    kvf__series_observe(c, 5);
    assert_true(kvf__series_value(c) == 0.0);
    kvf__series *g = kvf__metric_series(kvf__metric_gauge(m, "g", "G.", NULL), NULL);
    kvf__series_set(g, 7);
    kvf__series_set(g, 2.5);
    assert_true(kvf__series_value(g) == 2.5);
    kvf__metrics_free(&m);
}

typedef struct adder {
    kvf__metric *f;
    int n;
} adder;

static void *add_many(void *arg)
{
    adder *a = arg;
    kvf__series *s = kvf__metric_series(a->f, (const char *[]){"t"});
    for (int i = 0; i < a->n; i++)
        kvf__series_add(s, 1);
    return NULL;
}

static void test_core_metrics_threads(void **state)
{
    (void)state;
    kvf__metrics *m = kvf__metrics_new("kvf_test");
    adder a = {kvf__metric_counter(m, "n_total", "N.", "who"), 20000};
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        assert_int_equal(pthread_create(&th[i], NULL, add_many, &a), 0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    assert_true(kvf__series_value(kvf__metric_series(a.f, (const char *[]){"t"})) == 80000.0);
    kvf__metrics_free(&m);
}

/* An endpoint bound to every address, made one that others can reach at the advertised host;
 * an IPv6 host bracketed. */
static void test_member_reachable_endpoints(void **state)
{
    (void)state;
    char out[128];
    kvf__member_reachable("tcp://0.0.0.0:5557", "10.0.0.2", out, sizeof out);
    assert_string_equal(out, "tcp://10.0.0.2:5557");
    kvf__member_reachable("tcp://*:5557", "node7", out, sizeof out);
    assert_string_equal(out, "tcp://node7:5557");
    kvf__member_reachable("tcp://[::]:5557", "fd00::2", out, sizeof out);
    assert_string_equal(out, "tcp://[fd00::2]:5557");
    kvf__member_reachable("tcp://:::5557", "[fd00::3]", out, sizeof out);
    assert_string_equal(out, "tcp://[fd00::3]:5557");
    kvf__member_reachable("tcp://10.0.0.9:5557", "10.0.0.2", out, sizeof out);
    assert_string_equal(out, "tcp://10.0.0.9:5557");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_core_error_names_and_messages),
        cmocka_unit_test(test_member_reachable_endpoints),
        cmocka_unit_test(test_core_error_codes_are_distinct),
        cmocka_unit_test(test_core_error_from_errno),
        cmocka_unit_test(test_core_layout_validation_failures),
        cmocka_unit_test(test_core_layout_sizes_match_public_configs),
        cmocka_unit_test(test_core_layout_tensor_parallel_heads),
        cmocka_unit_test(test_core_layout_fingerprint_covers_every_field),
        cmocka_unit_test(test_core_layout_json),
        cmocka_unit_test(test_core_layout_json_file),
        cmocka_unit_test(test_core_layout_dtype_names),
        cmocka_unit_test(test_core_keys_golden_vectors),
        cmocka_unit_test(test_core_keys_prefix_property),
        cmocka_unit_test(test_core_keys_namespaces_are_disjoint),
        cmocka_unit_test(test_core_keys_bounds_and_errors),
        cmocka_unit_test(test_core_keys_hex_round_trip),
        cmocka_unit_test(test_core_log_levels_and_format),
        cmocka_unit_test(test_core_clock),
        cmocka_unit_test(test_core_parse_size),
        cmocka_unit_test(test_core_fmt_size),
        cmocka_unit_test(test_core_json_keys),
        cmocka_unit_test(test_core_metrics_exposition),
        cmocka_unit_test(test_core_metrics_rules),
        cmocka_unit_test(test_core_metrics_threads),
    };
    return cmocka_run_group_tests_name("core", tests, NULL, NULL);
}
