/*
 * kvf/layout.h - the data model: KV layouts, their fingerprints, and prefix-chained chunk keys.
 *
 * A layout describes the KV cache of one model on one tensor-parallel rank: how many layers, heads
 * and dimensions, which dtype, whether K and V are separate or one latent vector per token (MLA),
 * and how tokens are grouped into engine pages and into chunks, the unit kvfabric stores. Two
 * engines can share chunks exactly when their layout fingerprints are equal.
 *
 * A chunk key names chunk_tokens consecutive tokens together with everything before them, so equal
 * keys mean equal prefixes under equal layouts and tenants. The algorithm is specified byte by byte
 * in docs/keys.md, with golden vectors, so that any language can reproduce it.
 */
#ifndef KVF_LAYOUT_H
#define KVF_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/export.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The version of the canonical layout encoding hashed into the fingerprint. */
#define KVF_LAYOUT_FORMAT_VERSION 1u
/* The version of the key algorithm, hashed into every key seed. */
#define KVF_KEY_FORMAT_VERSION 1u
/* Longest model id, in bytes, not counting the terminating NUL. */
#define KVF_MODEL_ID_MAX 63u
/* Default chunk size in tokens. */
#define KVF_DEFAULT_CHUNK_TOKENS 256u

/* XX(enum suffix, name in JSON and on the command line, bytes per element). */
#define KVF_DTYPE_MAP(XX)       \
    XX(F32, "f32", 4)           \
    XX(F16, "f16", 2)           \
    XX(BF16, "bf16", 2)         \
    XX(FP8_E4M3, "fp8_e4m3", 1) \
    XX(FP8_E5M2, "fp8_e5m2", 1) \
    XX(INT8, "int8", 1)

typedef enum kvf_dtype {
#define KVF_DTYPE_ENUM_(e, name, size) KVF_DTYPE_##e,
    KVF_DTYPE_MAP(KVF_DTYPE_ENUM_)
#undef KVF_DTYPE_ENUM_
        KVF_DTYPE_COUNT_
} kvf_dtype;

typedef enum kvf_kv_kind {
    KVF_KV_SEPARATE = 0, /* K and V planes, each [tokens][kv_heads][head_dim] */
    KVF_KV_LATENT = 1,   /* one latent vector per token (MLA): [tokens][1][head_dim] */
} kvf_kv_kind;

typedef struct kvf_layout {
    char model_id[KVF_MODEL_ID_MAX + 1]; /* NUL-terminated, non-empty */
    uint32_t layers;                     /* transformer layers holding KV */
    uint32_t kv_heads;                   /* KV heads of the whole model (1 for a latent layout) */
    uint32_t head_dim;                   /* elements per head (the latent width for MLA) */
    kvf_dtype dtype;                     /* element type of the cache */
    kvf_kv_kind kind;                    /* separate K and V, or one latent */
    uint32_t page_tokens;                /* tokens per engine page (block), e.g. 16 */
    uint32_t chunk_tokens;               /* tokens per chunk, a multiple of page_tokens */
    uint32_t tp_rank;                    /* tensor-parallel rank, < tp_size */
    uint32_t tp_size;                    /* tensor-parallel size, >= 1 */
} kvf_layout;

/* Checks every field. Returns 0, or KVF_EINVAL with one line in err naming the first bad field
 * and its value (err may be NULL). */
KVF_API int kvf_layout_validate(const kvf_layout *l, char *err, size_t errlen);

/* Sizes of a valid layout, on this rank. heads_per_rank is kv_heads / tp_size, or 1 where tp_size
 * exceeds kv_heads and the heads are replicated, as vLLM does; a latent layout is replicated on
 * every rank. A segment is one layer of one chunk (K then V). Results for an invalid layout are 0.
 */
KVF_API uint32_t kvf_layout_heads_per_rank(const kvf_layout *l);
KVF_API size_t kvf_layout_dtype_size(kvf_dtype dtype);
KVF_API uint64_t kvf_layout_bytes_per_token_layer(const kvf_layout *l);
KVF_API uint64_t kvf_layout_bytes_per_token(const kvf_layout *l);
KVF_API uint64_t kvf_layout_segment_bytes(const kvf_layout *l);
KVF_API uint64_t kvf_layout_chunk_bytes(const kvf_layout *l);

/* The 64-bit fingerprint of a valid layout: XXH3-64 of its canonical encoding (docs/keys.md).
 * Returns 0 and writes *fp, or KVF_EINVAL for an invalid layout. */
KVF_API int kvf_layout_fingerprint(const kvf_layout *l, uint64_t *fp);

/* Name of a dtype ("bf16"), or NULL for an unknown value. Borrowed; static. */
KVF_API const char *kvf_dtype_name(kvf_dtype dtype);
/* Parses a dtype name. Returns 0, or KVF_EINVAL for an unknown name. */
KVF_API int kvf_dtype_parse(const char *name, kvf_dtype *out);

/* Fills *out with a named preset taken from a public model config (docs/layouts.md lists them and
 * their sources): llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, mistral-7b, deepseek-v3, ref-tiny,
 * ref-100m. Presets are bf16 (f32 for ref-*), page 16, chunk 256 (64 for ref-tiny), TP 0 of 1.
 * Returns 0 or KVF_ENOENT for an unknown name. */
KVF_API int kvf_layout_preset(const char *name, kvf_layout *out);
/* The name of preset i, or NULL past the last. Borrowed; static. */
KVF_API const char *kvf_layout_preset_name(size_t i);

/* Parses a layout from a JSON object (text of len bytes). Keys: "preset" (optional base), then any
 * of "model_id", "layers", "kv_heads", "head_dim", "dtype", "kind" ("kv" or "latent"),
 * "page_tokens", "chunk_tokens", "tp_rank", "tp_size" overriding it. Unknown keys, wrong types and
 * an invalid result are errors. Returns 0, KVF_EINVAL (err names the problem) or KVF_ENOMEM. */
KVF_API int kvf_layout_from_json(const char *text, size_t len, kvf_layout *out, char *err,
                                 size_t errlen);
/* As kvf_layout_from_json, reading the file at path. Also KVF_ENOENT/KVF_EIO for an unreadable
 * file and KVF_E2BIG for a file over 1 MiB. */
KVF_API int kvf_layout_load_json(const char *path, kvf_layout *out, char *err, size_t errlen);
/* Resolves spec as a preset name first, else as a JSON file path. */
KVF_API int kvf_layout_resolve(const char *spec, kvf_layout *out, char *err, size_t errlen);

/* Writes the layout as a JSON object into buf (NUL-terminated). Returns the length it needs, not
 * counting the NUL, or a negative KVF_E* code; output is truncated when buflen is too small. */
KVF_API int kvf_layout_to_json(const kvf_layout *l, char *buf, size_t buflen);

/* The KV memory a workload needs under a layout, and what fits in a budget. */
typedef struct kvf_estimate {
    uint64_t bytes_per_token; /* all layers, this rank */
    uint64_t bytes_per_chunk;
    uint64_t chunks_per_sequence; /* full chunks of one sequence */
    uint64_t bytes_per_sequence;  /* tokens x bytes per token */
    uint64_t bytes_total;         /* x batch */
    uint64_t tokens_fit;          /* tokens that fit in memory (0 when no budget was given) */
    uint64_t sequences_fit;       /* sequences of `tokens` that fit */
} kvf_estimate;

/* Fills *e for `batch` sequences of `tokens` tokens and a memory budget (0: none). Returns 0,
 * KVF_EINVAL for an invalid layout, or KVF_EOVERFLOW. */
KVF_API int kvf_layout_estimate(const kvf_layout *l, uint64_t tokens, uint64_t batch,
                                uint64_t memory, kvf_estimate *e);

/* ------------------------------------------------------------------------------------------ */
/* Chunk keys                                                                                  */

/* A 128-bit chunk key. On the wire and in docs: lo as 8 little-endian bytes, then hi. */
typedef struct kvf_key {
    uint64_t lo;
    uint64_t hi;
} kvf_key;

/* The namespace in which keys are computed: one model, one layout, one tenant. Caller-allocated;
 * fill with kvf_keyspace_init(). */
typedef struct kvf_keyspace {
    uint64_t seed;         /* output: H64 of the namespace */
    uint64_t layout_fp;    /* output: the layout fingerprint */
    uint32_t chunk_tokens; /* output: tokens per chunk */
} kvf_keyspace;

/* Longest tenant salt, in bytes. */
#define KVF_SALT_MAX 256u

/* Computes the namespace seed for a valid layout and a tenant salt (salt may be NULL when
 * salt_len is 0). Returns 0, KVF_EINVAL for an invalid layout, or KVF_E2BIG for a long salt. */
KVF_API int kvf_keyspace_init(kvf_keyspace *ks, const kvf_layout *l, const void *salt,
                              size_t salt_len);

/* Computes the keys of the full chunks of tokens[0..n_tokens): key[0] = H128(seed, chunk 0),
 * key[i] = H128(key[i-1], chunk i). Writes min(full chunks, max_keys) keys; *n_keys gets the number
 * written and *leftover (may be NULL) the tokens not covered by them. Never allocates. Returns 0 or
 * KVF_EINVAL. */
KVF_API int kvf_keys_compute(const kvf_keyspace *ks, const uint32_t *tokens, size_t n_tokens,
                             kvf_key *keys, size_t max_keys, size_t *n_keys, size_t *leftover);

/* One chaining step: the key of the chunk of chunk_tokens tokens that follows prev (prev NULL:
 * the first chunk of the keyspace). */
KVF_API kvf_key kvf_key_next(const kvf_keyspace *ks, const kvf_key *prev, const uint32_t *tokens);

/* Formats a key as 32 lowercase hex digits, hi first (the number hi:lo), plus a NUL: buf must hold
 * 33 bytes. Returns buf. */
KVF_API char *kvf_key_to_hex(const kvf_key *k, char buf[33]);
/* Parses 32 hex digits. Returns 0 or KVF_EINVAL. */
KVF_API int kvf_key_from_hex(const char *hex, kvf_key *out);

static inline int kvf_key_eq(const kvf_key *a, const kvf_key *b)
{
    return a->lo == b->lo && a->hi == b->hi;
}

#ifdef __cplusplus
}
#endif
#endif
