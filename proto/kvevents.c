/* KV event batches, both encodings: the encoder and the reference decoder, with msgpack-c
 * (kvevents.h; kvevents_int.h says which decoder is which). */
#include "kvevents_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "errf.h"

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
    const msgpack_object *rate;
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
        f->rate = map_get(o, "disk_read_bytes_per_s");
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
        } else if (str_eq(f->type, "StoreRates")) {
            f->node = n > 1 ? &a[1] : NULL;
            f->rate = n > 2 ? &a[2] : NULL;
        } else {
            f->node = n > 1 ? &a[1] : NULL;
            f->keys = n > 2 ? &a[2] : NULL;
            f->medium = n > 3 ? &a[3] : NULL;
        }
    } else {
        return kvf__errf(err, errlen, KVF_EPROTO, "event is neither an array nor a map");
    }
    if (!f->type || f->type->type != MSGPACK_OBJECT_STR)
        return kvf__errf(err, errlen, KVF_EPROTO, "event without a type name");
    return 0;
}

kvf_kve_type kvf__kve_type_named(const char *name, size_t len)
{
    static const struct {
        const char *name;
        kvf_kve_type type;
    } names[] = {
        {"BlockStored", KVF_KVE_BLOCK_STORED},     {"BlockRemoved", KVF_KVE_BLOCK_REMOVED},
        {"AllBlocksCleared", KVF_KVE_ALL_CLEARED}, {"ChunksAdmitted", KVF_KVE_CHUNKS_ADMITTED},
        {"ChunksEvicted", KVF_KVE_CHUNKS_EVICTED}, {"ChunksCleared", KVF_KVE_CHUNKS_CLEARED},
        {"StoreRates", KVF_KVE_STORE_RATES}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strlen(names[i].name) == len && !memcmp(names[i].name, name, len))
            return names[i].type;
    return KVF_KVE_UNKNOWN;
}

/* ------------------------------------------------------------------------------------------ */
/* The decoder's scratch */

/* The first-byte table, from the ranges of the msgpack specification. */
static void shapes_init(kvf__kve_shape *t)
{
    static const struct {
        uint8_t lo, hi, head, len_bytes, kind;
    } r[] = {
        {0x00, 0x7f, 1, 0, 0},  {0x80, 0x8f, 1, 0, 3}, {0x90, 0x9f, 1, 0, 2},
        {0xa0, 0xbf, 1, 0, 1},  {0xc0, 0xc0, 1, 0, 0}, {0xc1, 0xc1, 1, 0, 4},
        {0xc2, 0xc3, 1, 0, 0},  {0xc4, 0xc4, 2, 1, 1}, {0xc5, 0xc5, 3, 2, 1},
        {0xc6, 0xc6, 5, 4, 1},  {0xc7, 0xc7, 3, 1, 1}, {0xc8, 0xc8, 4, 2, 1},
        {0xc9, 0xc9, 6, 4, 1},  {0xca, 0xca, 5, 0, 0}, {0xcb, 0xcb, 9, 0, 0},
        {0xcc, 0xcc, 2, 0, 0},  {0xcd, 0xcd, 3, 0, 0}, {0xce, 0xce, 5, 0, 0},
        {0xcf, 0xcf, 9, 0, 0},  {0xd0, 0xd0, 2, 0, 0}, {0xd1, 0xd1, 3, 0, 0},
        {0xd2, 0xd2, 5, 0, 0},  {0xd3, 0xd3, 9, 0, 0}, {0xd4, 0xd4, 3, 0, 0},
        {0xd5, 0xd5, 4, 0, 0},  {0xd6, 0xd6, 6, 0, 0}, {0xd7, 0xd7, 10, 0, 0},
        {0xd8, 0xd8, 18, 0, 0}, {0xd9, 0xd9, 2, 1, 1}, {0xda, 0xda, 3, 2, 1},
        {0xdb, 0xdb, 5, 4, 1},  {0xdc, 0xdc, 3, 2, 2}, {0xdd, 0xdd, 5, 4, 2},
        {0xde, 0xde, 3, 2, 3},  {0xdf, 0xdf, 5, 4, 3}, {0xe0, 0xff, 1, 0, 0},
    };
    for (size_t i = 0; i < sizeof r / sizeof r[0]; i++)
        for (unsigned b = r[i].lo; b <= r[i].hi; b++)
            t[b] = (kvf__kve_shape){r[i].head, r[i].len_bytes, r[i].kind};
}

/* The zone's first chunk is kept across batches: a batch of 64 blocks of 16 tokens unpacks to
 * about 27 KB of objects, so this holds most batches without an allocation. */
#define ZONE_CHUNK (256u << 10)

int kvf__kve_decoder_new(kvf__kve_decoder **out)
{
    kvf__kve_decoder *d = calloc(1, sizeof *d);
    *out = NULL;
    if (!d)
        return KVF_ENOMEM;
    if (!msgpack_zone_init(&d->zone, ZONE_CHUNK)) {
        free(d);
        return KVF_ENOMEM;
    }
    shapes_init(d->shapes);
    *out = d;
    return 0;
}

void kvf__kve_decoder_free(kvf__kve_decoder **dp)
{
    if (!dp || !*dp)
        return;
    kvf__kve_decoder *d = *dp;
    msgpack_zone_destroy(&d->zone);
    free(d->ev);
    free(d->hashes);
    free(d->tokens);
    free(d->keys);
    free(d);
    *dp = NULL;
}

int kvf__kve_reserve(void **a, size_t *cap, size_t len, size_t n, size_t sz)
{
    /* allocated even for n == 0: the callers add len to the array's start, never to NULL */
    if (*a && n <= *cap - len)
        return 0;
    size_t want = *cap ? *cap : 1024;
    while (want - len < n) {
        if (want > SIZE_MAX / 2 / sz)
            return -1;
        want *= 2;
    }
    void *p = realloc(*a, want * sz);
    if (!p)
        return -1;
    *a = p;
    *cap = want;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* One event */

static int hash_list(kvf__kve_decoder *d, const msgpack_object *o, kvf_kve *ev, char *err,
                     size_t errlen)
{
    if (!o || o->type != MSGPACK_OBJECT_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "block_hashes is not an array");
    size_t n = o->via.array.size;
    if (kvf__kve_reserve((void **)&d->hashes, &d->h_cap, d->h_len, n, sizeof *d->hashes) != 0)
        return KVF_ENOMEM;
    uint64_t *h = d->hashes + d->h_len;
    for (size_t i = 0; i < n; i++)
        if (get_u64(&o->via.array.ptr[i], &h[i]) != 0)
            return kvf__errf(err, errlen, KVF_EPROTO, "block hash %zu is not an integer or bytes",
                             i);
    ev->hashes = (const uint64_t *)(uintptr_t)d->h_len; /* an offset until the batch is done */
    ev->n_hashes = n;
    d->h_len += n;
    return 0;
}

/* BlockStored's block size, parent and token ids. ev->n_hashes is set. */
static int block_fields(kvf__kve_decoder *d, const fields *f, kvf_kve *ev, char *err, size_t errlen)
{
    size_t n = ev->n_hashes;
    uint64_t bs = 0;
    ev->has_parent = f->parent && f->parent->type != MSGPACK_OBJECT_NIL;
    if (!f->block_size || get_u64(f->block_size, &bs) != 0 || bs == 0 || bs > 65536 ||
        (ev->has_parent && get_u64(f->parent, &ev->parent) != 0) || !f->tokens ||
        f->tokens->type != MSGPACK_OBJECT_ARRAY || f->tokens->via.array.size != n * bs)
        return kvf__errf(err, errlen, KVF_EPROTO,
                         "BlockStored: block_size, parent or token_ids malformed (%zu blocks)", n);
    size_t nt = n * bs;
    if (kvf__kve_reserve((void **)&d->tokens, &d->t_cap, d->t_len, nt, sizeof *d->tokens) != 0)
        return KVF_ENOMEM;
    uint32_t *t = d->tokens + d->t_len;
    const msgpack_object *a = f->tokens->via.array.ptr;
    for (size_t i = 0; i < nt; i++) {
        /* Token ids are positive integers: the common case first, the rest through get_u64. */
        uint64_t v = a[i].via.u64;
        if (a[i].type != MSGPACK_OBJECT_POSITIVE_INTEGER && get_u64(&a[i], &v) != 0)
            v = UINT64_MAX;
        if (v > UINT32_MAX)
            return kvf__errf(err, errlen, KVF_EPROTO, "BlockStored: token %zu is not a 32-bit id",
                             i);
        t[i] = (uint32_t)v;
    }
    ev->block_size = (uint32_t)bs;
    ev->tokens = (const uint32_t *)(uintptr_t)d->t_len;
    ev->n_tokens = nt;
    d->t_len += nt;
    /* vLLM's mediums: "GPU" (device), "CPU" (host offload); absent means device. */
    ev->host_tier = f->medium && (str_eq(f->medium, "CPU") || str_eq(f->medium, "cpu"));
    return 0;
}

static int chunk_fields(kvf__kve_decoder *d, const fields *f, kvf_kve *ev, char *err, size_t errlen)
{
    if (!f->node || get_u64(f->node, &ev->node) != 0 || !f->keys ||
        f->keys->type != MSGPACK_OBJECT_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "%.*s: node or keys malformed", (int)ev->type_len,
                         ev->type_name);
    size_t n = f->keys->via.array.size;
    if (kvf__kve_reserve((void **)&d->keys, &d->k_cap, d->k_len, n, sizeof *d->keys) != 0)
        return KVF_ENOMEM;
    kvf_key *k = d->keys + d->k_len;
    for (size_t i = 0; i < n; i++) {
        const msgpack_object *b = &f->keys->via.array.ptr[i];
        if (b->type != MSGPACK_OBJECT_BIN || b->via.bin.size != 16)
            return kvf__errf(err, errlen, KVF_EPROTO, "store event: key %zu is not 16 bytes", i);
        const uint8_t *p = (const uint8_t *)b->via.bin.ptr;
        k[i].lo = kvf__get_u64(p);
        k[i].hi = kvf__get_u64(p + 8);
    }
    ev->disk_tier = 0;
    if (f->medium && f->medium->type != MSGPACK_OBJECT_NIL) {
        if (str_eq(f->medium, "DISK"))
            ev->disk_tier = 1;
        else if (!str_eq(f->medium, "DRAM"))
            return kvf__errf(err, errlen, KVF_EPROTO, "%.*s: medium is \"DRAM\" or \"DISK\"",
                             (int)ev->type_len, ev->type_name);
    }
    ev->keys = (const kvf_key *)(uintptr_t)d->k_len;
    ev->n_keys = n;
    d->k_len += n;
    return 0;
}

/* Decodes one event into ev, its arrays appended to the decoder's (as offsets). */
static int decode_one(kvf__kve_decoder *d, const msgpack_object *o, kvf_kve *ev, char *err,
                      size_t errlen)
{
    fields f;
    int rc = fetch(o, &f, err, errlen);
    if (rc)
        return rc;
    *ev = (kvf_kve){.type = kvf__kve_type_named(f.type->via.str.ptr, f.type->via.str.size),
                    .type_name = f.type->via.str.ptr,
                    .type_len = f.type->via.str.size};
    size_t h = d->h_len, t = d->t_len, k = d->k_len;
    switch (ev->type) {
    case KVF_KVE_BLOCK_STORED:
    case KVF_KVE_BLOCK_REMOVED:
        rc = hash_list(d, f.hashes, ev, err, errlen);
        if (!rc && ev->type == KVF_KVE_BLOCK_STORED)
            rc = block_fields(d, &f, ev, err, errlen);
        break;
    case KVF_KVE_CHUNKS_ADMITTED:
    case KVF_KVE_CHUNKS_EVICTED:
        rc = chunk_fields(d, &f, ev, err, errlen);
        break;
    case KVF_KVE_STORE_RATES:
        if (!f.node || get_u64(f.node, &ev->node) != 0 || !f.rate ||
            f.rate->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            rc = kvf__errf(err, errlen, KVF_EPROTO, "StoreRates: node or rate malformed");
        else
            ev->disk_read_bytes_per_s = f.rate->via.u64;
        break;
    default:
        break;
    }
    if (rc) /* what a malformed event appended is dropped */
        d->h_len = h, d->t_len = t, d->k_len = k;
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

/* msgpack-c allocates what a header claims before it reads the items (an array header claiming
 * 2^32-1 items asks for 96 GiB), and msgpuck reads what it is pointed at: so nothing is decoded
 * that this refuses. */
size_t kvf__kve_claims_fit(const kvf__kve_shape *shapes, const uint8_t *p, size_t len)
{
    uint64_t left[KVF_KVE_MAX_DEPTH + 1]; /* items still to come in each open container */
    int depth = 0;
    size_t off = 0;
    left[0] = 1;
    for (;;) {
        while (left[depth] == 0)
            if (depth-- == 0)
                return off;
        if (off >= len)
            return 0;
        uint8_t b = p[off];
        const kvf__kve_shape *sh = &shapes[b];
        if (sh->kind == 4 || len - off < sh->head)
            return 0;
        if (sh->kind == 0) {
            /* A scalar is its header alone. Arrays of token ids and block hashes are runs of
             * scalars of one kind (uint16 ids, uint64 hashes): the run is skipped in a loop that
             * compares one byte per item. */
            size_t h = sh->head;
            do {
                off += h;
                left[depth]--;
            } while (left[depth] && off < len && p[off] == b && len - off >= h);
            continue;
        }
        uint64_t n = sh->len_bytes ? be(p + off + 1, sh->len_bytes)
                     : b <= 0x9f   ? (uint64_t)(b & 0x0f) /* fixmap, fixarray */
                                   : (uint64_t)(b & 0x1f);  /* fixstr */
        if (n == 0 && b >= 0xc7 && b <= 0xc9)
            return 0; /* an ext of no bytes: msgpack-c refuses it (and no event has one) */
        off += sh->head;
        uint64_t body = sh->kind == 1 ? n : 0;
        uint64_t items = sh->kind == 2 ? n : sh->kind == 3 ? 2 * n : 0;
        if (body > len - off || items > len - off)
            return 0;
        off += (size_t)body;
        left[depth]--;
        if (sh->kind >= 2) {
            if (depth == KVF_KVE_MAX_DEPTH) /* one container too many, even an empty one */
                return 0;
            if (items)
                left[++depth] = items;
        }
    }
}

void kvf__kve_finish(kvf__kve_decoder *d, size_t kept)
{
    for (size_t i = 0; i < kept; i++) {
        kvf_kve *ev = &d->ev[i];
        ev->hashes = ev->n_hashes ? d->hashes + (uintptr_t)ev->hashes : NULL;
        ev->tokens = ev->n_tokens ? d->tokens + (uintptr_t)ev->tokens : NULL;
        ev->keys = ev->n_keys ? d->keys + (uintptr_t)ev->keys : NULL;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* A batch */

/* What both decoders check first: a payload of one msgpack item, whose claims fit, and no more
 * than a decoder's counts hold. */
static int batch_begin(kvf__kve_decoder *d, const void *payload, size_t len, const kvf_kve **events,
                       size_t *n_events, char *err, size_t errlen)
{
    *events = NULL;
    *n_events = 0;
    d->h_len = d->t_len = d->k_len = 0;
    if (len > KVF_KVE_MAX_BATCH)
        return kvf__errf(err, errlen, KVF_EPROTO, "a batch of %zu bytes (at most %u)", len,
                         (unsigned)KVF_KVE_MAX_BATCH);
    size_t item = kvf__kve_claims_fit(d->shapes, payload, len);
    if (!item)
        return kvf__errf(
            err, errlen, KVF_EPROTO,
            "payload is not msgpack, nests deeper than %d, or claims more items than its "
            "%zu bytes hold",
            KVF_KVE_MAX_DEPTH, len);
    if (item != len)
        return kvf__errf(err, errlen, KVF_EPROTO, "%zu trailing bytes after the batch", len - item);
    return 0;
}

int kvf__kve_decode_events(kvf__kve_decoder *d, size_t n, kvf__kve_next_fn next, void *cursor,
                           const kvf_kve **events, size_t *n_events, uint64_t *malformed, char *err,
                           size_t errlen)
{
    size_t kept = 0;
    if (kvf__kve_reserve((void **)&d->ev, &d->ev_cap, 0, n, sizeof *d->ev) != 0)
        return KVF_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        int rc = next(d, cursor, &d->ev[kept], err, errlen);
        if (rc == KVF_EPROTO) {
            /* One malformed event is skipped, with the reason; the batch goes on. */
            if (malformed)
                (*malformed)++;
            continue;
        }
        if (rc)
            return rc;
        kept++;
    }
    kvf__kve_finish(d, kept);
    *events = d->ev;
    *n_events = kept;
    return 0;
}

/* The reference decoder's place in the events array. */
typedef struct ref_cursor {
    const msgpack_object *at;
} ref_cursor;

static int ref_next(kvf__kve_decoder *d, void *cursor, kvf_kve *ev, char *err, size_t errlen)
{
    ref_cursor *c = cursor;
    return decode_one(d, c->at++, ev, err, errlen);
}

static int decode_ref(kvf__kve_decoder *d, const void *payload, size_t len, const kvf_kve **events,
                      size_t *n_events, uint64_t *malformed, char *err, size_t errlen)
{
    msgpack_zone_clear(&d->zone);
    size_t off = 0;
    msgpack_object root;
    msgpack_unpack_return ur = msgpack_unpack(payload, len, &off, &d->zone, &root);
    if (ur != MSGPACK_UNPACK_SUCCESS)
        return ur == MSGPACK_UNPACK_NOMEM_ERROR
                   ? KVF_ENOMEM
                   : kvf__errf(err, errlen, KVF_EPROTO, "payload is not msgpack (%d)", (int)ur);
    if (off != len)
        return kvf__errf(err, errlen, KVF_EPROTO, "%zu trailing bytes after the batch", len - off);
    const msgpack_object *events_o = NULL;
    if (root.type == MSGPACK_OBJECT_ARRAY && root.via.array.size >= 2)
        events_o = &root.via.array.ptr[1];
    else if (root.type == MSGPACK_OBJECT_MAP)
        events_o = map_get(&root, "events");
    if (!events_o || events_o->type != MSGPACK_OBJECT_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "batch has no events array");
    ref_cursor c = {events_o->via.array.ptr};
    return kvf__kve_decode_events(d, events_o->via.array.size, ref_next, &c, events, n_events,
                                  malformed, err, errlen);
}

int kvf__kve_decode_batch_ref(kvf__kve_decoder *d, const void *payload, size_t len,
                              const kvf_kve **events, size_t *n_events, uint64_t *malformed,
                              char *err, size_t errlen)
{
    int rc = batch_begin(d, payload, len, events, n_events, err, errlen);
    return rc ? rc : decode_ref(d, payload, len, events, n_events, malformed, err, errlen);
}

int kvf__kve_decode_batch(kvf__kve_decoder *d, const void *payload, size_t len,
                          const kvf_kve **events, size_t *n_events, uint64_t *malformed, char *err,
                          size_t errlen)
{
    int rc = batch_begin(d, payload, len, events, n_events, err, errlen);
    if (rc)
        return rc;
#ifdef KVF_HAVE_MSGPUCK
    return kvf__kve_decode_mp(d, payload, len, events, n_events, malformed, err, errlen);
#else
    return decode_ref(d, payload, len, events, n_events, malformed, err, errlen);
#endif
}

static int same(const void *a, const void *b, size_t n, size_t sz)
{
    return n == 0 || (a && b && !memcmp(a, b, n * sz));
}

int kvf__kve_equal(const kvf_kve *a, const kvf_kve *b)
{
    return a->type == b->type && a->type_len == b->type_len &&
           same(a->type_name, b->type_name, a->type_len, 1) && a->n_hashes == b->n_hashes &&
           same(a->hashes, b->hashes, a->n_hashes, sizeof *a->hashes) &&
           a->has_parent == b->has_parent && (!a->has_parent || a->parent == b->parent) &&
           a->n_tokens == b->n_tokens &&
           same(a->tokens, b->tokens, a->n_tokens, sizeof *a->tokens) &&
           a->block_size == b->block_size && a->host_tier == b->host_tier && a->node == b->node &&
           a->n_keys == b->n_keys && same(a->keys, b->keys, a->n_keys, sizeof *a->keys) &&
           a->disk_tier == b->disk_tier && a->disk_read_bytes_per_s == b->disk_read_bytes_per_s;
}

const char *kvf__kve_decoder_name(void)
{
#ifdef KVF_HAVE_MSGPUCK
    return "msgpuck";
#else
    return "msgpack-c";
#endif
}

int kvf__kve_decode(const void *payload, size_t len, kvf_kve_fn fn, void *ud, uint64_t *malformed,
                    char *err, size_t errlen)
{
    kvf__kve_decoder *d;
    if (kvf__kve_decoder_new(&d) != 0)
        return KVF_ENOMEM;
    const kvf_kve *ev;
    size_t n;
    int rc = kvf__kve_decode_batch(d, payload, len, &ev, &n, malformed, err, errlen);
    for (size_t i = 0; !rc && i < n; i++) {
        rc = fn(ud, &ev[i], err, errlen);
        if (rc == KVF_EPROTO) {
            if (malformed)
                (*malformed)++;
            rc = 0;
        }
    }
    kvf__kve_decoder_free(&d);
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

void kvf__kve_enc_all_cleared(kvf__kve_enc *e)
{
    check(e, msgpack_pack_array(&e->pk, 1));
    pack_str(e, "AllBlocksCleared");
    e->written++;
}

void kvf__kve_enc_chunks(kvf__kve_enc *e, int admitted, uint64_t node, const kvf_key *keys,
                         size_t n_keys, int disk)
{
    check(e, msgpack_pack_array(&e->pk, 4));
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
    pack_str(e, disk ? "DISK" : "DRAM");
    e->written++;
}

void kvf__kve_enc_store_rates(kvf__kve_enc *e, uint64_t node, uint64_t disk_read_bytes_per_s)
{
    check(e, msgpack_pack_array(&e->pk, 3));
    pack_str(e, "StoreRates");
    check(e, msgpack_pack_uint64(&e->pk, node));
    check(e, msgpack_pack_uint64(&e->pk, disk_read_bytes_per_s));
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
