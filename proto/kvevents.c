/* KV event batches, both encodings, with msgpack-c (kvevents.h). */
#include "kvevents.h"

#include "kvf/error.h"

#include "bytes.h"
#include "errf.h"

#include <msgpack.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>

uint64_t kvf__kve_seq_get(const void *be8)
{
    const uint8_t *p = be8;
    uint64_t seq = 0;
    for (int i = 0; i < 8; i++)
        seq = (seq << 8) | p[i];
    return seq;
}

void kvf__kve_seq_put(void *be8, uint64_t seq)
{
    uint8_t *p = be8;
    for (int i = 7; i >= 0; i--, seq >>= 8)
        p[i] = (uint8_t)seq;
}

/* ------------------------------------------------------------------------------------------ */
/* Decoding */

static int str_eq(const msgpack_object *o, const char *s)
{
    size_t n = strlen(s);
    return o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && !memcmp(o->via.str.ptr, s, n);
}

static const msgpack_object *map_get(const msgpack_object *m, const char *key)
{
    for (uint32_t i = 0; i < m->via.map.size; i++)
        if (str_eq(&m->via.map.ptr[i].key, key))
            return &m->via.map.ptr[i].val;
    return NULL;
}

static int get_u64(const msgpack_object *o, uint64_t *out)
{
    switch (o->type) {
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        *out = o->via.u64;
        return 0;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        *out = (uint64_t)o->via.i64;
        return 0;
    case MSGPACK_OBJECT_BIN:
        *out = XXH3_64bits(o->via.bin.ptr, o->via.bin.size);
        return 0;
    case MSGPACK_OBJECT_STR:
        *out = XXH3_64bits(o->via.str.ptr, o->via.str.size);
        return 0;
    default:
        return -1;
    }
}

/* The fields of one event, whichever encoding it came in. */
typedef struct fields {
    const msgpack_object *type, *hashes, *parent, *tokens, *block_size, *medium, *node, *keys;
} fields;

static int fetch(const msgpack_object *o, fields *f, char *err, size_t errlen)
{
    memset(f, 0, sizeof *f);
    if (o->type == MSGPACK_OBJECT_MAP) {
        f->type = map_get(o, "type");
        f->hashes = map_get(o, "block_hashes");
        f->parent = map_get(o, "parent_block_hash");
        f->tokens = map_get(o, "token_ids");
        f->block_size = map_get(o, "block_size");
        f->medium = map_get(o, "medium");
        f->node = map_get(o, "node");
        f->keys = map_get(o, "keys");
    } else if (o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size >= 1) {
        const msgpack_object *a = o->via.array.ptr;
        uint32_t n = o->via.array.size;
        f->type = &a[0];
        if (str_eq(f->type, "BlockStored")) {
            f->hashes = n > 1 ? &a[1] : NULL;
            f->parent = n > 2 ? &a[2] : NULL;
            f->tokens = n > 3 ? &a[3] : NULL;
            f->block_size = n > 4 ? &a[4] : NULL;
            f->medium = n > 6 ? &a[6] : NULL;
        } else if (str_eq(f->type, "BlockRemoved")) {
            f->hashes = n > 1 ? &a[1] : NULL;
            f->medium = n > 2 ? &a[2] : NULL;
        } else {
            f->node = n > 1 ? &a[1] : NULL;
            f->keys = n > 2 ? &a[2] : NULL;
        }
    } else {
        return kvf__errf(err, errlen, KVF_EPROTO, "event is neither an array nor a map");
    }
    if (!f->type || f->type->type != MSGPACK_OBJECT_STR)
        return kvf__errf(err, errlen, KVF_EPROTO, "event without a type name");
    return 0;
}

static kvf_kve_type type_of(const msgpack_object *t)
{
    static const struct {
        const char *name;
        kvf_kve_type type;
    } names[] = {
        {"BlockStored", KVF_KVE_BLOCK_STORED},     {"BlockRemoved", KVF_KVE_BLOCK_REMOVED},
        {"AllBlocksCleared", KVF_KVE_ALL_CLEARED}, {"ChunksAdmitted", KVF_KVE_CHUNKS_ADMITTED},
        {"ChunksEvicted", KVF_KVE_CHUNKS_EVICTED}, {"ChunksCleared", KVF_KVE_CHUNKS_CLEARED}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (str_eq(t, names[i].name))
            return names[i].type;
    return KVF_KVE_UNKNOWN;
}

static int hash_list(const msgpack_object *o, uint64_t **out, size_t *n, char *err, size_t errlen)
{
    if (!o || o->type != MSGPACK_OBJECT_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "block_hashes is not an array");
    *n = o->via.array.size;
    *out = malloc((*n ? *n : 1) * sizeof **out);
    if (!*out)
        return KVF_ENOMEM;
    for (size_t i = 0; i < *n; i++)
        if (get_u64(&o->via.array.ptr[i], &(*out)[i]) != 0) {
            free(*out);
            *out = NULL;
            return kvf__errf(err, errlen, KVF_EPROTO, "block hash %zu is not an integer or bytes",
                             i);
        }
    return 0;
}

/* BlockStored's block size, parent and token ids. ev->hashes is set. */
static int block_fields(const fields *f, kvf_kve *ev, uint32_t **tokens, char *err, size_t errlen)
{
    size_t n = ev->n_hashes;
    uint64_t bs = 0;
    ev->has_parent = f->parent && f->parent->type != MSGPACK_OBJECT_NIL;
    if (!f->block_size || get_u64(f->block_size, &bs) != 0 || bs == 0 || bs > 65536 ||
        (ev->has_parent && get_u64(f->parent, &ev->parent) != 0) || !f->tokens ||
        f->tokens->type != MSGPACK_OBJECT_ARRAY || f->tokens->via.array.size != n * bs)
        return kvf__errf(err, errlen, KVF_EPROTO,
                         "BlockStored: block_size, parent or token_ids malformed (%zu blocks)", n);
    uint32_t *t = malloc((n * bs > 0 ? n * bs : 1) * sizeof *t);
    if (!t)
        return KVF_ENOMEM;
    for (size_t i = 0; i < n * bs; i++) {
        uint64_t v;
        if (get_u64(&f->tokens->via.array.ptr[i], &v) != 0 || v > UINT32_MAX) {
            free(t);
            return kvf__errf(err, errlen, KVF_EPROTO, "BlockStored: token %zu is not a 32-bit id",
                             i);
        }
        t[i] = (uint32_t)v;
    }
    ev->block_size = (uint32_t)bs;
    ev->tokens = *tokens = t;
    ev->n_tokens = n * bs;
    /* vLLM's mediums: "GPU" (device), "CPU" (host offload); absent means device. */
    ev->host_tier = f->medium && (str_eq(f->medium, "CPU") || str_eq(f->medium, "cpu"));
    return 0;
}

static int chunk_fields(const fields *f, kvf_kve *ev, kvf_key **keys, char *err, size_t errlen)
{
    if (!f->node || get_u64(f->node, &ev->node) != 0 || !f->keys ||
        f->keys->type != MSGPACK_OBJECT_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "%.*s: node or keys malformed", (int)ev->type_len,
                         ev->type_name);
    size_t n = f->keys->via.array.size;
    kvf_key *k = malloc((n ? n : 1) * sizeof *k);
    if (!k)
        return KVF_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        const msgpack_object *b = &f->keys->via.array.ptr[i];
        if (b->type != MSGPACK_OBJECT_BIN || b->via.bin.size != 16) {
            free(k);
            return kvf__errf(err, errlen, KVF_EPROTO, "store event: key %zu is not 16 bytes", i);
        }
        const uint8_t *p = (const uint8_t *)b->via.bin.ptr;
        k[i].lo = kvf__get_u64(p);
        k[i].hi = kvf__get_u64(p + 8);
    }
    ev->keys = *keys = k;
    ev->n_keys = n;
    return 0;
}

/* Decodes one event and hands it to fn. */
static int decode_one(const msgpack_object *o, kvf_kve_fn fn, void *ud, char *err, size_t errlen)
{
    fields f;
    int rc = fetch(o, &f, err, errlen);
    if (rc)
        return rc;
    kvf_kve ev = {.type = type_of(f.type),
                  .type_name = f.type->via.str.ptr,
                  .type_len = f.type->via.str.size};
    uint64_t *hashes = NULL;
    uint32_t *tokens = NULL;
    kvf_key *keys = NULL;
    switch (ev.type) {
    case KVF_KVE_BLOCK_STORED:
    case KVF_KVE_BLOCK_REMOVED:
        rc = hash_list(f.hashes, &hashes, &ev.n_hashes, err, errlen);
        ev.hashes = hashes;
        if (!rc && ev.type == KVF_KVE_BLOCK_STORED)
            rc = block_fields(&f, &ev, &tokens, err, errlen);
        break;
    case KVF_KVE_CHUNKS_ADMITTED:
    case KVF_KVE_CHUNKS_EVICTED:
        rc = chunk_fields(&f, &ev, &keys, err, errlen);
        break;
    default:
        break;
    }
    if (!rc)
        rc = fn(ud, &ev, err, errlen);
    free(hashes);
    free(tokens);
    free(keys);
    return rc;
}

/* Big-endian unsigned of n bytes at p. */
static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

/* How one msgpack item at p starts: the bytes before its contents (*head), the bytes of its
 * contents (*body: strings, binaries, extensions), and the items it contains (*items: arrays,
 * maps twice their pairs). -1 for the byte that msgpack never uses, or a header cut short. */
static int item_shape(const uint8_t *p, size_t left, size_t *head, uint64_t *body, uint64_t *items)
{
    static const struct {
        uint8_t lo, hi, head, len_bytes, kind; /* kind: 0 scalar, 1 body, 2 array, 3 map */
    } t[] = {
        {0x00, 0x7f, 1, 0, 0}, {0x80, 0x8f, 1, 0, 3},  {0x90, 0x9f, 1, 0, 2},
        {0xa0, 0xbf, 1, 0, 1}, {0xc0, 0xc0, 1, 0, 0},  {0xc2, 0xc3, 1, 0, 0},
        {0xc4, 0xc4, 2, 1, 1}, {0xc5, 0xc5, 3, 2, 1},  {0xc6, 0xc6, 5, 4, 1},
        {0xc7, 0xc7, 3, 1, 1}, {0xc8, 0xc8, 4, 2, 1},  {0xc9, 0xc9, 6, 4, 1},
        {0xca, 0xca, 5, 0, 0}, {0xcb, 0xcb, 9, 0, 0},  {0xcc, 0xcc, 2, 0, 0},
        {0xcd, 0xcd, 3, 0, 0}, {0xce, 0xce, 5, 0, 0},  {0xcf, 0xcf, 9, 0, 0},
        {0xd0, 0xd0, 2, 0, 0}, {0xd1, 0xd1, 3, 0, 0},  {0xd2, 0xd2, 5, 0, 0},
        {0xd3, 0xd3, 9, 0, 0}, {0xd4, 0xd4, 3, 0, 0},  {0xd5, 0xd5, 4, 0, 0},
        {0xd6, 0xd6, 6, 0, 0}, {0xd7, 0xd7, 10, 0, 0}, {0xd8, 0xd8, 18, 0, 0},
        {0xd9, 0xd9, 2, 1, 1}, {0xda, 0xda, 3, 2, 1},  {0xdb, 0xdb, 5, 4, 1},
        {0xdc, 0xdc, 3, 2, 2}, {0xdd, 0xdd, 5, 4, 2},  {0xde, 0xde, 3, 2, 3},
        {0xdf, 0xdf, 5, 4, 3}, {0xe0, 0xff, 1, 0, 0},
    };
    uint8_t b = p[0];
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        if (b < t[i].lo || b > t[i].hi)
            continue;
        if (left < t[i].head)
            return -1;
        uint64_t n = t[i].len_bytes ? be(p + 1, t[i].len_bytes) : (uint64_t)(b & 0x1f);
        if (b <= 0x9f)
            n = b & 0x0f; /* fixmap, fixarray */
        *head = t[i].head;
        *body = t[i].kind == 1 ? n : 0;
        *items = t[i].kind == 2 ? n : t[i].kind == 3 ? 2 * n : 0;
        return 0;
    }
    return -1;
}

/* Whether the first msgpack item of the len bytes at p claims no more than it can hold: every
 * container's items and every body fit in the bytes that follow (an item takes a byte at least).
 * msgpack-c allocates what a header claims before it reads the items (an array header claiming
 * 2^32-1 items asks for 96 GiB), so nothing is unpacked that this refuses. */
static int claims_fit(const uint8_t *p, size_t len)
{
    uint64_t pending = 1;
    size_t off = 0;
    while (pending) {
        size_t head;
        uint64_t body, items;
        if (off >= len || item_shape(p + off, len - off, &head, &body, &items) != 0)
            return 0;
        off += head;
        if (body > len - off || items > len - off)
            return 0;
        off += (size_t)body;
        pending = pending - 1 + items;
    }
    return 1;
}

int kvf__kve_decode(const void *payload, size_t len, kvf_kve_fn fn, void *ud, uint64_t *malformed,
                    char *err, size_t errlen)
{
    if (!claims_fit(payload, len))
        return kvf__errf(err, errlen, KVF_EPROTO,
                         "payload is not msgpack, or claims more items than its %zu bytes hold",
                         len);
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    int rc;
    msgpack_unpack_return ur = msgpack_unpack_next(&u, payload, len, &off);
    if (ur != MSGPACK_UNPACK_SUCCESS) {
        rc = kvf__errf(err, errlen, KVF_EPROTO, "payload is not msgpack (%d)", (int)ur);
        goto out;
    }
    if (off != len) {
        rc = kvf__errf(err, errlen, KVF_EPROTO, "%zu trailing bytes after the batch", len - off);
        goto out;
    }
    const msgpack_object *b = &u.data, *events = NULL;
    if (b->type == MSGPACK_OBJECT_ARRAY && b->via.array.size >= 2)
        events = &b->via.array.ptr[1];
    else if (b->type == MSGPACK_OBJECT_MAP)
        events = map_get(b, "events");
    if (!events || events->type != MSGPACK_OBJECT_ARRAY) {
        rc = kvf__errf(err, errlen, KVF_EPROTO, "batch has no events array");
        goto out;
    }
    rc = 0;
    for (uint32_t i = 0; i < events->via.array.size && !rc; i++) {
        rc = decode_one(&events->via.array.ptr[i], fn, ud, err, errlen);
        if (rc == KVF_EPROTO) {
            /* One malformed event is skipped, with the reason; the batch goes on. */
            if (malformed)
                (*malformed)++;
            rc = 0;
        }
    }
out:
    msgpack_unpacked_destroy(&u);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* Encoding */

struct kvf__kve_enc {
    msgpack_sbuffer sb;
    msgpack_packer pk;
    size_t announced, written;
    int failed; /* a write into the buffer failed (out of memory) */
};

static void check(kvf__kve_enc *e, int rc)
{
    if (rc != 0)
        e->failed = 1;
}

static void pack_str(kvf__kve_enc *e, const char *s)
{
    size_t n = strlen(s);
    check(e, msgpack_pack_str(&e->pk, n));
    check(e, msgpack_pack_str_body(&e->pk, s, n));
}

int kvf__kve_enc_begin(kvf__kve_enc **out, size_t n_events)
{
    kvf__kve_enc *e = calloc(1, sizeof *e);
    *out = e;
    if (!e)
        return KVF_ENOMEM;
    msgpack_sbuffer_init(&e->sb);
    msgpack_packer_init(&e->pk, &e->sb, msgpack_sbuffer_write);
    e->announced = n_events;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    check(e, msgpack_pack_array(&e->pk, 3));
    check(e, msgpack_pack_double(&e->pk, (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9));
    check(e, msgpack_pack_array(&e->pk, n_events));
    return e->failed ? KVF_ENOMEM : 0;
}

static void pack_hashes(kvf__kve_enc *e, const uint64_t *hashes, size_t n)
{
    check(e, msgpack_pack_array(&e->pk, n));
    for (size_t i = 0; i < n; i++)
        check(e, msgpack_pack_uint64(&e->pk, hashes[i]));
}

void kvf__kve_enc_block_stored(kvf__kve_enc *e, const uint64_t *hashes, size_t n_hashes,
                               int has_parent, uint64_t parent, const uint32_t *tokens,
                               uint32_t block_size, const char *medium)
{
    check(e, msgpack_pack_array(&e->pk, 7));
    pack_str(e, "BlockStored");
    pack_hashes(e, hashes, n_hashes);
    check(e, has_parent ? msgpack_pack_uint64(&e->pk, parent) : msgpack_pack_nil(&e->pk));
    check(e, msgpack_pack_array(&e->pk, n_hashes * block_size));
    for (size_t t = 0; t < n_hashes * block_size; t++)
        check(e, msgpack_pack_uint32(&e->pk, tokens[t]));
    check(e, msgpack_pack_uint32(&e->pk, block_size));
    check(e, msgpack_pack_nil(&e->pk)); /* lora_id */
    pack_str(e, medium);
    e->written++;
}

void kvf__kve_enc_block_removed(kvf__kve_enc *e, const uint64_t *hashes, size_t n_hashes,
                                const char *medium)
{
    check(e, msgpack_pack_array(&e->pk, 3));
    pack_str(e, "BlockRemoved");
    pack_hashes(e, hashes, n_hashes);
    pack_str(e, medium);
    e->written++;
}

void kvf__kve_enc_chunks(kvf__kve_enc *e, int admitted, uint64_t node, const kvf_key *keys,
                         size_t n_keys)
{
    check(e, msgpack_pack_array(&e->pk, 3));
    pack_str(e, admitted ? "ChunksAdmitted" : "ChunksEvicted");
    check(e, msgpack_pack_uint64(&e->pk, node));
    check(e, msgpack_pack_array(&e->pk, n_keys));
    for (size_t k = 0; k < n_keys; k++) {
        uint8_t b[16];
        kvf__put_u64(b, keys[k].lo);
        kvf__put_u64(b + 8, keys[k].hi);
        check(e, msgpack_pack_bin(&e->pk, 16));
        check(e, msgpack_pack_bin_body(&e->pk, b, 16));
    }
    e->written++;
}

int kvf__kve_enc_end(kvf__kve_enc *e, const void **data, size_t *len)
{
    check(e, msgpack_pack_int(&e->pk, 0)); /* data_parallel_rank */
    if (e->failed)
        return KVF_ENOMEM;
    if (e->written != e->announced)
        return KVF_EINVAL;
    *data = e->sb.data;
    *len = e->sb.size;
    return 0;
}

void kvf__kve_enc_free(kvf__kve_enc **ep)
{
    if (!ep || !*ep)
        return;
    msgpack_sbuffer_destroy(&(*ep)->sb);
    free(*ep);
    *ep = NULL;
}
