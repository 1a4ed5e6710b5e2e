/*
 * Layouts: validation, sizes, the canonical encoding and its fingerprint (docs/keys.md, section
 * "Layout fingerprint"), named presets from public model configs, and JSON input and output.
 */
#include "kvf/layout.h"
#include "kvf/error.h"

#include "bytes.h"
#include "errf.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <xxhash.h>

/* Upper bounds that no real model reaches; they keep every size computation far from overflow. */
#define MAX_LAYERS       4096u
#define MAX_HEADS        4096u
#define MAX_HEAD_DIM     65536u
#define MAX_PAGE_TOKENS  65536u
#define MAX_CHUNK_TOKENS (1u << 20)
#define MAX_TP           1024u
#define MAX_CHUNK_BYTES  (1ull << 32)
#define MAX_JSON_FILE    (1u << 20)

static const struct {
    const char *name;
    size_t size;
} dtypes[] = {
#define XX(e, name, size) {name, size},
    KVF_DTYPE_MAP(XX)
#undef XX
};

const char *kvf_dtype_name(kvf_dtype dtype)
{
    if ((unsigned)dtype >= KVF_DTYPE_COUNT_)
        return NULL;
    return dtypes[dtype].name;
}

size_t kvf_layout_dtype_size(kvf_dtype dtype)
{
    if ((unsigned)dtype >= KVF_DTYPE_COUNT_)
        return 0;
    return dtypes[dtype].size;
}

int kvf_dtype_parse(const char *name, kvf_dtype *out)
{
    for (unsigned i = 0; i < KVF_DTYPE_COUNT_; i++) {
        if (strcmp(name, dtypes[i].name) == 0) {
            *out = (kvf_dtype)i;
            return 0;
        }
    }
    return KVF_EINVAL;
}

static int model_id_char_ok(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-' || c == '/' || c == ':' || c == '+';
}

static uint64_t chunk_bytes_unchecked(const kvf_layout *l)
{
    uint64_t per_tl = (uint64_t)kvf_layout_dtype_size(l->dtype) * l->head_dim;
    if (l->kind == KVF_KV_SEPARATE) {
        uint32_t h = l->kv_heads >= l->tp_size ? l->kv_heads / l->tp_size : 1;
        per_tl *= 2ull * h;
    }
    return per_tl * l->layers * l->chunk_tokens;
}

int kvf_layout_validate(const kvf_layout *l, char *err, size_t errlen)
{
    if (!l)
        return kvf__errf(err, errlen, KVF_EINVAL, "layout: NULL");
    size_t idlen = strnlen(l->model_id, sizeof l->model_id);
    if (idlen == 0)
        return kvf__errf(err, errlen, KVF_EINVAL, "model_id: empty");
    if (idlen == sizeof l->model_id)
        return kvf__errf(err, errlen, KVF_EINVAL,
                         "model_id: longer than %u bytes or not NUL-terminated", KVF_MODEL_ID_MAX);
    for (size_t i = 0; i < idlen; i++)
        if (!model_id_char_ok(l->model_id[i]))
            return kvf__errf(
                err, errlen, KVF_EINVAL,
                "model_id: character 0x%02x at %zu is not one of A-Z a-z 0-9 . _ - / : +",
                (unsigned char)l->model_id[i], i);
    if (l->layers == 0 || l->layers > MAX_LAYERS)
        return kvf__errf(err, errlen, KVF_EINVAL, "layers: %" PRIu32 " is not in 1..%u", l->layers,
                         MAX_LAYERS);
    if (l->kv_heads == 0 || l->kv_heads > MAX_HEADS)
        return kvf__errf(err, errlen, KVF_EINVAL, "kv_heads: %" PRIu32 " is not in 1..%u",
                         l->kv_heads, MAX_HEADS);
    if (l->head_dim == 0 || l->head_dim > MAX_HEAD_DIM)
        return kvf__errf(err, errlen, KVF_EINVAL, "head_dim: %" PRIu32 " is not in 1..%u",
                         l->head_dim, MAX_HEAD_DIM);
    if ((unsigned)l->dtype >= KVF_DTYPE_COUNT_)
        return kvf__errf(err, errlen, KVF_EINVAL, "dtype: unknown value %d", (int)l->dtype);
    if (l->kind != KVF_KV_SEPARATE && l->kind != KVF_KV_LATENT)
        return kvf__errf(err, errlen, KVF_EINVAL,
                         "kind: unknown value %d (0 = separate K and V, 1 = latent)", (int)l->kind);
    if (l->kind == KVF_KV_LATENT && l->kv_heads != 1)
        return kvf__errf(err, errlen, KVF_EINVAL,
                         "kv_heads: a latent (MLA) layout has 1 head, not %" PRIu32, l->kv_heads);
    if (l->page_tokens == 0 || l->page_tokens > MAX_PAGE_TOKENS)
        return kvf__errf(err, errlen, KVF_EINVAL, "page_tokens: %" PRIu32 " is not in 1..%u",
                         l->page_tokens, MAX_PAGE_TOKENS);
    if (l->chunk_tokens == 0 || l->chunk_tokens > MAX_CHUNK_TOKENS)
        return kvf__errf(err, errlen, KVF_EINVAL, "chunk_tokens: %" PRIu32 " is not in 1..%u",
                         l->chunk_tokens, MAX_CHUNK_TOKENS);
    if (l->chunk_tokens % l->page_tokens != 0)
        return kvf__errf(err, errlen, KVF_EINVAL,
                         "chunk_tokens: %" PRIu32 " is not a multiple of page_tokens (%" PRIu32 ")",
                         l->chunk_tokens, l->page_tokens);
    if (l->tp_size == 0 || l->tp_size > MAX_TP)
        return kvf__errf(err, errlen, KVF_EINVAL, "tp_size: %" PRIu32 " is not in 1..%u",
                         l->tp_size, MAX_TP);
    if (l->tp_rank >= l->tp_size)
        return kvf__errf(err, errlen, KVF_EINVAL,
                         "tp_rank: %" PRIu32 " is not below tp_size (%" PRIu32 ")", l->tp_rank,
                         l->tp_size);
    if (l->kind == KVF_KV_SEPARATE) {
        int splits = l->kv_heads % l->tp_size == 0;
        int replicates = l->kv_heads < l->tp_size && l->tp_size % l->kv_heads == 0;
        if (!splits && !replicates)
            return kvf__errf(err, errlen, KVF_EINVAL,
                             "kv_heads: %" PRIu32 " heads cannot be split over tp_size %" PRIu32
                             " (one must divide the other)",
                             l->kv_heads, l->tp_size);
    }
    uint64_t cb = chunk_bytes_unchecked(l);
    if (cb > MAX_CHUNK_BYTES)
        return kvf__errf(err, errlen, KVF_EINVAL,
                         "chunk_tokens: a chunk of %" PRIu64 " bytes exceeds 4 GiB", cb);
    return 0;
}

uint32_t kvf_layout_heads_per_rank(const kvf_layout *l)
{
    if (kvf_layout_validate(l, NULL, 0) != 0)
        return 0;
    if (l->kind == KVF_KV_LATENT)
        return 1;
    return l->kv_heads >= l->tp_size ? l->kv_heads / l->tp_size : 1;
}

uint64_t kvf_layout_bytes_per_token_layer(const kvf_layout *l)
{
    uint32_t h = kvf_layout_heads_per_rank(l);
    if (!h)
        return 0;
    uint64_t plane = (uint64_t)h * l->head_dim * kvf_layout_dtype_size(l->dtype);
    return l->kind == KVF_KV_SEPARATE ? 2 * plane : plane;
}

uint64_t kvf_layout_bytes_per_token(const kvf_layout *l)
{
    return kvf_layout_bytes_per_token_layer(l) * (l ? l->layers : 0);
}

uint64_t kvf_layout_segment_bytes(const kvf_layout *l)
{
    return kvf_layout_bytes_per_token_layer(l) * (l ? l->chunk_tokens : 0);
}

uint64_t kvf_layout_chunk_bytes(const kvf_layout *l)
{
    return kvf_layout_segment_bytes(l) * (l ? l->layers : 0);
}

int kvf_layout_fingerprint(const kvf_layout *l, uint64_t *fp)
{
    if (kvf_layout_validate(l, NULL, 0) != 0)
        return KVF_EINVAL;
    uint8_t buf[16 + KVF_MODEL_ID_MAX + 9 * 4];
    kvf__wbuf w = {buf, 0, sizeof buf, 0};
    uint32_t idlen = (uint32_t)strlen(l->model_id);
    kvf__wbuf_bytes(&w, "KVFL", 4);
    kvf__wbuf_u32(&w, KVF_LAYOUT_FORMAT_VERSION);
    kvf__wbuf_u32(&w, idlen);
    kvf__wbuf_bytes(&w, l->model_id, idlen);
    kvf__wbuf_u32(&w, l->layers);
    kvf__wbuf_u32(&w, l->kv_heads);
    kvf__wbuf_u32(&w, l->head_dim);
    kvf__wbuf_u32(&w, (uint32_t)l->dtype);
    kvf__wbuf_u32(&w, (uint32_t)l->kind);
    kvf__wbuf_u32(&w, l->page_tokens);
    kvf__wbuf_u32(&w, l->chunk_tokens);
    kvf__wbuf_u32(&w, l->tp_rank);
    kvf__wbuf_u32(&w, l->tp_size);
    if (w.overflow)
        return KVF_EOVERFLOW;
    *fp = XXH3_64bits(buf, w.len);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Presets. Sources are listed in docs/layouts.md. */

static const struct preset {
    const char *name;
    uint32_t layers, kv_heads, head_dim;
    kvf_dtype dtype;
    kvf_kv_kind kind;
    uint32_t chunk_tokens;
} presets[] = {
    /* config.json: num_hidden_layers 32, num_key_value_heads 8, hidden 4096 / 32 heads. */
    {"llama-3.1-8b", 32, 8, 128, KVF_DTYPE_BF16, KVF_KV_SEPARATE, 256},
    /* num_hidden_layers 80, num_key_value_heads 8, hidden 8192 / 64 heads. */
    {"llama-3.1-70b", 80, 8, 128, KVF_DTYPE_BF16, KVF_KV_SEPARATE, 256},
    /* num_hidden_layers 28, num_key_value_heads 4, hidden 3584 / 28 heads. */
    {"qwen2.5-7b", 28, 4, 128, KVF_DTYPE_BF16, KVF_KV_SEPARATE, 256},
    /* num_hidden_layers 32, num_key_value_heads 8, head_dim 128. */
    {"mistral-7b", 32, 8, 128, KVF_DTYPE_BF16, KVF_KV_SEPARATE, 256},
    /* MLA: num_hidden_layers 61, kv_lora_rank 512 + qk_rope_head_dim 64 = 576 per token. */
    {"deepseek-v3", 61, 1, 576, KVF_DTYPE_BF16, KVF_KV_LATENT, 256},
    /* The reference engine's models (engine/): f32 because its GEMMs are f32. */
    {"ref-tiny", 4, 2, 32, KVF_DTYPE_F32, KVF_KV_SEPARATE, 64},
    {"ref-100m", 12, 4, 64, KVF_DTYPE_F32, KVF_KV_SEPARATE, 256},
    /* ref-tiny's layers, 32 of them: the depth of an 8B model, for the overlap benchmark. */
    {"ref-tiny-32l", 32, 2, 32, KVF_DTYPE_F32, KVF_KV_SEPARATE, 64},
};

#define N_PRESETS (sizeof presets / sizeof presets[0])

const char *kvf_layout_preset_name(size_t i)
{
    return i < N_PRESETS ? presets[i].name : NULL;
}

int kvf_layout_preset(const char *name, kvf_layout *out)
{
    for (size_t i = 0; i < N_PRESETS; i++) {
        const struct preset *p = &presets[i];
        if (strcmp(name, p->name) != 0)
            continue;
        memset(out, 0, sizeof *out);
        snprintf(out->model_id, sizeof out->model_id, "%s", p->name);
        out->layers = p->layers;
        out->kv_heads = p->kv_heads;
        out->head_dim = p->head_dim;
        out->dtype = p->dtype;
        out->kind = p->kind;
        out->page_tokens = 16;
        out->chunk_tokens = p->chunk_tokens;
        out->tp_rank = 0;
        out->tp_size = 1;
        return 0;
    }
    return KVF_ENOENT;
}

/* ------------------------------------------------------------------------------------------ */
/* JSON */

static int json_u32(json_t *v, const char *key, uint32_t *out, char *err, size_t errlen)
{
    if (!json_is_integer(v))
        return kvf__errf(err, errlen, KVF_EINVAL, "%s: expected an integer", key);
    json_int_t x = json_integer_value(v);
    if (x < 0 || x > (json_int_t)UINT32_MAX)
        return kvf__errf(err, errlen, KVF_EINVAL, "%s: %" JSON_INTEGER_FORMAT " is out of range",
                         key, x);
    *out = (uint32_t)x;
    return 0;
}

int kvf_layout_from_json(const char *text, size_t len, kvf_layout *out, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return kvf__errf(err, errlen, KVF_EINVAL, "layout JSON: line %d column %d: %s", jerr.line,
                         jerr.column, jerr.text);
    int rc = 0;
    kvf_layout l;
    memset(&l, 0, sizeof l);
    l.page_tokens = 16;
    l.chunk_tokens = KVF_DEFAULT_CHUNK_TOKENS;
    l.tp_size = 1;
    l.dtype = KVF_DTYPE_BF16;

    if (!json_is_object(root)) {
        rc = kvf__errf(err, errlen, KVF_EINVAL, "layout JSON: expected an object");
        goto out_decref;
    }
    json_t *preset = json_object_get(root, "preset");
    if (preset) {
        if (!json_is_string(preset)) {
            rc = kvf__errf(err, errlen, KVF_EINVAL, "preset: expected a string");
            goto out_decref;
        }
        if (kvf_layout_preset(json_string_value(preset), &l) != 0) {
            rc = kvf__errf(err, errlen, KVF_EINVAL, "preset: unknown preset \"%s\"",
                           json_string_value(preset));
            goto out_decref;
        }
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v)
    {
        if (strcmp(key, "preset") == 0 || strcmp(key, "fingerprint") == 0)
            continue;
        if (strcmp(key, "model_id") == 0) {
            if (!json_is_string(v)) {
                rc = kvf__errf(err, errlen, KVF_EINVAL, "model_id: expected a string");
                goto out_decref;
            }
            if (json_string_length(v) > KVF_MODEL_ID_MAX) {
                rc = kvf__errf(err, errlen, KVF_EINVAL, "model_id: longer than %u bytes",
                               KVF_MODEL_ID_MAX);
                goto out_decref;
            }
            snprintf(l.model_id, sizeof l.model_id, "%s", json_string_value(v));
        } else if (strcmp(key, "dtype") == 0) {
            if (!json_is_string(v) || kvf_dtype_parse(json_string_value(v), &l.dtype) != 0) {
                rc = kvf__errf(err, errlen, KVF_EINVAL,
                               "dtype: expected one of f32 f16 bf16 fp8_e4m3 fp8_e5m2 int8");
                goto out_decref;
            }
        } else if (strcmp(key, "kind") == 0) {
            const char *s = json_is_string(v) ? json_string_value(v) : "";
            if (strcmp(s, "kv") == 0) {
                l.kind = KVF_KV_SEPARATE;
            } else if (strcmp(s, "latent") == 0) {
                l.kind = KVF_KV_LATENT;
            } else {
                rc = kvf__errf(err, errlen, KVF_EINVAL, "kind: expected \"kv\" or \"latent\"");
                goto out_decref;
            }
        } else {
            static const struct {
                const char *name;
                size_t off;
            } u32s[] = {
                {"layers", offsetof(kvf_layout, layers)},
                {"kv_heads", offsetof(kvf_layout, kv_heads)},
                {"head_dim", offsetof(kvf_layout, head_dim)},
                {"page_tokens", offsetof(kvf_layout, page_tokens)},
                {"chunk_tokens", offsetof(kvf_layout, chunk_tokens)},
                {"tp_rank", offsetof(kvf_layout, tp_rank)},
                {"tp_size", offsetof(kvf_layout, tp_size)},
            };
            size_t i;
            for (i = 0; i < sizeof u32s / sizeof u32s[0]; i++)
                if (strcmp(key, u32s[i].name) == 0)
                    break;
            if (i == sizeof u32s / sizeof u32s[0]) {
                rc = kvf__errf(err, errlen, KVF_EINVAL, "layout JSON: unknown key \"%s\"", key);
                goto out_decref;
            }
            rc = json_u32(v, key, (uint32_t *)((char *)&l + u32s[i].off), err, errlen);
            if (rc)
                goto out_decref;
        }
    }
    rc = kvf_layout_validate(&l, err, errlen);
    if (rc)
        goto out_decref;
    /* A fingerprint, as kvf_layout_to_json writes it, must match the fields beside it. */
    json_t *fpv = json_object_get(root, "fingerprint");
    if (fpv) {
        uint64_t fp = 0;
        char want[17];
        kvf_layout_fingerprint(&l, &fp);
        snprintf(want, sizeof want, "%016" PRIx64, fp);
        if (!json_is_string(fpv) || strcmp(json_string_value(fpv), want) != 0) {
            rc = kvf__errf(err, errlen, KVF_EINVAL,
                           "fingerprint: does not match the layout (expected \"%s\")", want);
            goto out_decref;
        }
    }
    *out = l;
out_decref:
    json_decref(root);
    return rc;
}

int kvf_layout_load_json(const char *path, kvf_layout *out, char *err, size_t errlen)
{
    int rc;
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        if (err && errlen)
            snprintf(err, errlen, "open %s: %s", path, strerror(e));
        return kvf_err_from_errno(e);
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        if (err && errlen)
            snprintf(err, errlen, "%s: not a regular file", path);
        rc = KVF_EINVAL;
        goto out_close;
    }
    if (st.st_size > (off_t)MAX_JSON_FILE) {
        if (err && errlen)
            snprintf(err, errlen, "%s: larger than 1 MiB", path);
        rc = KVF_E2BIG;
        goto out_close;
    }
    size_t size = (size_t)st.st_size;
    char *buf = malloc(size + 1);
    if (!buf) {
        rc = KVF_ENOMEM;
        goto out_close;
    }
    if (fread(buf, 1, size, f) != size) {
        if (err && errlen)
            snprintf(err, errlen, "read %s: short read", path);
        rc = KVF_EIO;
        goto out_free;
    }
    char inner[200];
    rc = kvf_layout_from_json(buf, size, out, inner, sizeof inner);
    if (rc && err && errlen)
        snprintf(err, errlen, "%s: %s", path, inner);
out_free:
    free(buf);
out_close:
    fclose(f);
    return rc;
}

int kvf_layout_resolve(const char *spec, kvf_layout *out, char *err, size_t errlen)
{
    if (kvf_layout_preset(spec, out) == 0)
        return 0;
    if (!strchr(spec, '/') && !strstr(spec, ".json")) {
        if (err && errlen)
            snprintf(err, errlen,
                     "unknown model \"%s\": give a preset (see `kvf estimate --list`) or a "
                     "layout JSON file",
                     spec);
        return KVF_ENOENT;
    }
    return kvf_layout_load_json(spec, out, err, errlen);
}

int kvf_layout_to_json(const kvf_layout *l, char *buf, size_t buflen)
{
    if (kvf_layout_validate(l, NULL, 0) != 0)
        return KVF_EINVAL;
    uint64_t fp = 0;
    kvf_layout_fingerprint(l, &fp);
    int n = snprintf(buf, buflen,
                     "{\"model_id\":\"%s\",\"layers\":%" PRIu32 ",\"kv_heads\":%" PRIu32
                     ",\"head_dim\":%" PRIu32 ",\"dtype\":\"%s\",\"kind\":\"%s\","
                     "\"page_tokens\":%" PRIu32 ",\"chunk_tokens\":%" PRIu32 ",\"tp_rank\":%" PRIu32
                     ",\"tp_size\":%" PRIu32 ",\"fingerprint\":\"%016" PRIx64 "\"}",
                     l->model_id, l->layers, l->kv_heads, l->head_dim, kvf_dtype_name(l->dtype),
                     l->kind == KVF_KV_LATENT ? "latent" : "kv", l->page_tokens, l->chunk_tokens,
                     l->tp_rank, l->tp_size, fp);
    return n < 0 ? KVF_EIO : n;
}

int kvf_layout_estimate(const kvf_layout *l, uint64_t tokens, uint64_t batch, uint64_t memory,
                        kvf_estimate *e)
{
    if (kvf_layout_validate(l, NULL, 0) != 0 || !e)
        return KVF_EINVAL;
    memset(e, 0, sizeof *e);
    uint64_t bpt = kvf_layout_bytes_per_token(l);
    e->bytes_per_token = bpt;
    e->bytes_per_chunk = kvf_layout_chunk_bytes(l);
    e->chunks_per_sequence = tokens / l->chunk_tokens;
    if (tokens && bpt > UINT64_MAX / tokens)
        return KVF_EOVERFLOW;
    e->bytes_per_sequence = bpt * tokens;
    if (batch && e->bytes_per_sequence > UINT64_MAX / batch)
        return KVF_EOVERFLOW;
    e->bytes_total = e->bytes_per_sequence * batch;
    if (memory) {
        e->tokens_fit = memory / bpt;
        e->sequences_fit = e->bytes_per_sequence ? memory / e->bytes_per_sequence : 0;
    }
    return 0;
}
