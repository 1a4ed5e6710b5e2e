/* KV event batches decoded with msgpuck, where each field is read in place (kvevents_int.h). The
 * rules are kvevents.c's decode_one(), field for field; the tests compare the two. */
#include "kvevents_int.h"

#ifdef KVF_HAVE_MSGPUCK

#include "kvf/error.h"

#include "bytes.h"
#include "errf.h"

/* this file holds msgpuck's functions and tables (only this one may define it) */
#define MP_SOURCE 1
#include <msgpuck.h>
#include <stddef.h>
#include <string.h>
#include <xxhash.h>

/* Every pointer below is at an item that kvf__kve_claims_fit() found whole inside the batch: the
 * mp_decode_* calls and mp_next() read within it. */

static int str_is(const char *p, const char *s, size_t n)
{
    if (mp_typeof(*p) != MP_STR)
        return 0;
    uint32_t len;
    const char *body = mp_decode_str(&p, &len);
    return len == n && !memcmp(body, s, n);
}
#define STR_IS(p, lit) str_is((p), (lit), sizeof(lit) - 1)

/* An integer (signed ones as their two's complement) or the XXH3 of bytes, as kvevents.c's
 * get_u64(). Advances *p past it on success. */
static int get_u64(const char **p, uint64_t *out)
{
    uint32_t n;
    const char *b;
    switch (mp_typeof(**p)) {
    case MP_UINT:
        *out = mp_decode_uint(p);
        return 0;
    case MP_INT:
        *out = (uint64_t)mp_decode_int(p);
        return 0;
    case MP_BIN:
        b = mp_decode_bin(p, &n);
        *out = XXH3_64bits(b, n);
        return 0;
    case MP_STR:
        b = mp_decode_str(p, &n);
        *out = XXH3_64bits(b, n);
        return 0;
    default:
        return -1;
    }
}

/* A non-negative integer, whatever its encoding (msgpack-c's POSITIVE_INTEGER). */
static int get_positive(const char *p, uint64_t *out)
{
    if (mp_typeof(*p) == MP_UINT) {
        *out = mp_decode_uint(&p);
        return 0;
    }
    if (mp_typeof(*p) == MP_INT) {
        int64_t v = mp_decode_int(&p);
        *out = (uint64_t)v;
        return v < 0 ? -1 : 0;
    }
    return -1;
}

/* Where each field of one event is (NULL: absent), and the token ids, read as they are passed. */
typedef struct fields {
    const char *type, *hashes, *parent, *tokens, *block_size, *medium, *node, *keys, *rate;
    int tokens_array; /* tokens is an array: its n_tokens ids are at the decoder's t_len */
    int tokens_nomem;
    size_t n_tokens;
    size_t bad_token; /* the first that is not a 32-bit id (SIZE_MAX: none) */
} fields;

/* Reads the token ids at p (f->tokens) into the decoder's array past its end, where an accepted
 * BlockStored keeps them (block_fields()); returns where they end. Reading them as the event is
 * walked passes over them once instead of twice. */
static const char *read_tokens(kvf__kve_decoder *d, fields *f, const char *t)
{
    f->bad_token = SIZE_MAX;
    if (mp_typeof(*t) != MP_ARRAY) {
        mp_next(&t);
        return t;
    }
    size_t n = mp_decode_array(&t);
    f->tokens_array = 1;
    f->n_tokens = n;
    if (kvf__kve_reserve((void **)&d->tokens, &d->t_cap, d->t_len, n, sizeof *d->tokens) != 0) {
        f->tokens_nomem = 1;
        for (size_t i = 0; i < n; i++)
            mp_next(&t);
        return t;
    }
    uint32_t *out = d->tokens + d->t_len;
    for (size_t i = 0; i < n; i++) {
        /* Token ids are small positive integers: the common encodings first. */
        uint8_t c = (uint8_t)*t;
        uint64_t v;
        if (c <= 0x7f) {
            v = c;
            t++;
        } else if (c == 0xcd) {
            v = (uint64_t)(uint8_t)t[1] << 8 | (uint8_t)t[2];
            t += 3;
        } else {
            const char *q = t;
            if (get_u64(&q, &v) != 0)
                v = UINT64_MAX; /* negative ids are above it already */
            mp_next(&t);
        }
        if (v > UINT32_MAX && f->bad_token == SIZE_MAX)
            f->bad_token = i;
        out[i] = (uint32_t)v;
    }
    return t;
}

/* The array encoding's layouts: which field each position after the type name holds. */
enum {
    AT_NONE,
    AT_HASHES,
    AT_PARENT,
    AT_TOKENS,
    AT_BLOCK_SIZE,
    AT_MEDIUM,
    AT_NODE,
    AT_KEYS,
    AT_RATE
};
static const uint8_t layouts[4][7] = {
    {AT_NONE, AT_HASHES, AT_PARENT, AT_TOKENS, AT_BLOCK_SIZE, AT_NONE, AT_MEDIUM}, /* BlockStored */
    {AT_NONE, AT_HASHES, AT_MEDIUM},        /* BlockRemoved */
    {AT_NONE, AT_NODE, AT_RATE},            /* StoreRates */
    {AT_NONE, AT_NODE, AT_KEYS, AT_MEDIUM}, /* the rest */
};

static const char **slot_of(fields *f, int at)
{
    static const size_t off[] = {
        [AT_HASHES] = offsetof(fields, hashes), [AT_PARENT] = offsetof(fields, parent),
        [AT_TOKENS] = offsetof(fields, tokens), [AT_BLOCK_SIZE] = offsetof(fields, block_size),
        [AT_MEDIUM] = offsetof(fields, medium), [AT_NODE] = offsetof(fields, node),
        [AT_KEYS] = offsetof(fields, keys),     [AT_RATE] = offsetof(fields, rate),
    };
    return at == AT_NONE ? NULL : (const char **)(void *)((char *)f + off[at]);
}

/* The fields of a map-encoded event by name (the first of a name counts, as in kvevents.c). */
static const char **by_name(fields *f, const char *key)
{
    static const struct {
        const char *name;
        int at; /* -1: the type */
    } names[] = {
        {"type", -1},
        {"block_hashes", AT_HASHES},
        {"parent_block_hash", AT_PARENT},
        {"token_ids", AT_TOKENS},
        {"block_size", AT_BLOCK_SIZE},
        {"medium", AT_MEDIUM},
        {"node", AT_NODE},
        {"keys", AT_KEYS},
        {"disk_read_bytes_per_s", AT_RATE},
    };
    if (mp_typeof(*key) != MP_STR)
        return NULL;
    uint32_t len;
    const char *s = mp_decode_str(&key, &len);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strlen(names[i].name) == len && !memcmp(names[i].name, s, len)) {
            const char **slot = names[i].at < 0 ? &f->type : slot_of(f, names[i].at);
            return *slot ? NULL : slot;
        }
    return NULL;
}

/* The array encoding's layout for a type name: 0 BlockStored, 1 BlockRemoved, 2 StoreRates, 3 the
 * rest. */
static int layout_of(const char *type)
{
    return STR_IS(type, "BlockStored")    ? 0
           : STR_IS(type, "BlockRemoved") ? 1
           : STR_IS(type, "StoreRates")   ? 2
                                          : 3;
}

/* Finds the event's fields; *end: where the event ends. */
static int fetch(kvf__kve_decoder *d, const char *p, fields *f, const char **end, char *err,
                 size_t errlen)
{
    memset(f, 0, sizeof *f);
    uint32_t n;
    if (mp_typeof(*p) == MP_MAP) {
        n = mp_decode_map(&p);
        for (uint32_t i = 0; i < n; i++) {
            const char **slot = by_name(f, p);
            mp_next(&p);
            if (slot)
                *slot = p;
            if (slot && slot == &f->tokens)
                p = read_tokens(d, f, p);
            else
                mp_next(&p);
        }
    } else if (mp_typeof(*p) == MP_ARRAY && (n = mp_decode_array(&p)) >= 1) {
        f->type = p;
        const uint8_t *at = layouts[layout_of(p)];
        mp_next(&p);
        for (uint32_t i = 1; i < n; i++) {
            const char **slot = i < 7 ? slot_of(f, at[i]) : NULL;
            if (slot)
                *slot = p;
            if (slot && slot == &f->tokens)
                p = read_tokens(d, f, p);
            else
                mp_next(&p);
        }
    } else {
        return kvf__errf(err, errlen, KVF_EPROTO, "event is neither an array nor a map");
    }
    *end = p;
    if (!f->type || mp_typeof(*f->type) != MP_STR)
        return kvf__errf(err, errlen, KVF_EPROTO, "event without a type name");
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* One event */

static int hash_list(kvf__kve_decoder *d, const char *p, kvf_kve *ev, char *err, size_t errlen)
{
    if (!p || mp_typeof(*p) != MP_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "block_hashes is not an array");
    size_t n = mp_decode_array(&p);
    if (kvf__kve_reserve((void **)&d->hashes, &d->h_cap, d->h_len, n, sizeof *d->hashes) != 0)
        return KVF_ENOMEM;
    uint64_t *h = d->hashes + d->h_len;
    for (size_t i = 0; i < n; i++)
        if (get_u64(&p, &h[i]) != 0)
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
    const char *p = f->block_size, *q = f->parent;
    ev->has_parent = q && mp_typeof(*q) != MP_NIL;
    size_t nt = f->n_tokens;
    if (!p || get_u64(&p, &bs) != 0 || bs == 0 || bs > 65536 ||
        (ev->has_parent && get_u64(&q, &ev->parent) != 0) || !f->tokens_array || nt != n * bs)
        return kvf__errf(err, errlen, KVF_EPROTO,
                         "BlockStored: block_size, parent or token_ids malformed (%zu blocks)", n);
    if (f->tokens_nomem)
        return KVF_ENOMEM;
    if (f->bad_token != SIZE_MAX)
        return kvf__errf(err, errlen, KVF_EPROTO, "BlockStored: token %zu is not a 32-bit id",
                         f->bad_token);
    ev->block_size = (uint32_t)bs;
    ev->tokens = (const uint32_t *)(uintptr_t)d->t_len;
    ev->n_tokens = nt;
    d->t_len += nt;
    /* vLLM's mediums: "GPU" (device), "CPU" (host offload); absent means device. */
    ev->host_tier = f->medium && (STR_IS(f->medium, "CPU") || STR_IS(f->medium, "cpu"));
    return 0;
}

static int chunk_fields(kvf__kve_decoder *d, const fields *f, kvf_kve *ev, char *err, size_t errlen)
{
    const char *p = f->node, *k = f->keys;
    if (!p || get_u64(&p, &ev->node) != 0 || !k || mp_typeof(*k) != MP_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "%.*s: node or keys malformed", (int)ev->type_len,
                         ev->type_name);
    size_t n = mp_decode_array(&k);
    if (kvf__kve_reserve((void **)&d->keys, &d->k_cap, d->k_len, n, sizeof *d->keys) != 0)
        return KVF_ENOMEM;
    kvf_key *out = d->keys + d->k_len;
    for (size_t i = 0; i < n; i++) {
        uint32_t len = 0;
        const uint8_t *b = NULL;
        if (mp_typeof(*k) == MP_BIN)
            b = (const uint8_t *)mp_decode_bin(&k, &len);
        if (!b || len != 16)
            return kvf__errf(err, errlen, KVF_EPROTO, "store event: key %zu is not 16 bytes", i);
        out[i].lo = kvf__get_u64(b);
        out[i].hi = kvf__get_u64(b + 8);
    }
    ev->disk_tier = 0;
    if (f->medium && mp_typeof(*f->medium) != MP_NIL) {
        if (STR_IS(f->medium, "DISK"))
            ev->disk_tier = 1;
        else if (!STR_IS(f->medium, "DRAM"))
            return kvf__errf(err, errlen, KVF_EPROTO, "%.*s: medium is \"DRAM\" or \"DISK\"",
                             (int)ev->type_len, ev->type_name);
    }
    ev->keys = (const kvf_key *)(uintptr_t)d->k_len;
    ev->n_keys = n;
    d->k_len += n;
    return 0;
}

/* Decodes the event at p into ev, its arrays appended to the decoder's (as offsets); *end: where
 * it ends, whether it decoded or not. */
static int decode_one(kvf__kve_decoder *d, const char *p, kvf_kve *ev, const char **end, char *err,
                      size_t errlen)
{
    fields f;
    int rc = fetch(d, p, &f, end, err, errlen);
    if (rc) {
        *end = p;
        mp_next(end);
        return rc;
    }
    uint32_t tl;
    const char *q = f.type;
    const char *name = mp_decode_str(&q, &tl);
    *ev = (kvf_kve){.type = kvf__kve_type_named(name, tl), .type_name = name, .type_len = tl};
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
    case KVF_KVE_STORE_RATES: {
        const char *n = f.node;
        if (!n || get_u64(&n, &ev->node) != 0 || !f.rate ||
            get_positive(f.rate, &ev->disk_read_bytes_per_s) != 0)
            rc = kvf__errf(err, errlen, KVF_EPROTO, "StoreRates: node or rate malformed");
        break;
    }
    default:
        break;
    }
    if (rc) /* what a malformed event appended is dropped */
        d->h_len = h, d->t_len = t, d->k_len = k;
    return rc;
}

static int mp_next_event(kvf__kve_decoder *d, void *cursor, kvf_kve *ev, char *err, size_t errlen)
{
    const char **at = cursor;
    return decode_one(d, *at, ev, at, err, errlen);
}

/* ------------------------------------------------------------------------------------------ */
/* A batch */

/* The value of the map at p under the string key `name` (the first such), or NULL. */
static const char *map_get(const char *p, const char *name)
{
    uint32_t n = mp_decode_map(&p);
    for (uint32_t i = 0; i < n; i++) {
        int match = str_is(p, name, strlen(name));
        mp_next(&p);
        if (match)
            return p;
        mp_next(&p);
    }
    return NULL;
}

int kvf__kve_decode_mp(kvf__kve_decoder *d, const void *payload, size_t len, const kvf_kve **events,
                       size_t *n_events, uint64_t *malformed, char *err, size_t errlen)
{
    (void)len; /* claims_fit() found the batch to be exactly len bytes */
    const char *p = payload, *events_p = NULL;
    if (mp_typeof(*p) == MP_ARRAY) {
        const char *q = p;
        if (mp_decode_array(&q) >= 2) {
            mp_next(&q); /* the timestamp */
            events_p = q;
        }
    } else if (mp_typeof(*p) == MP_MAP) {
        events_p = map_get(p, "events");
    }
    if (!events_p || mp_typeof(*events_p) != MP_ARRAY)
        return kvf__errf(err, errlen, KVF_EPROTO, "batch has no events array");
    size_t n = mp_decode_array(&events_p);
    return kvf__kve_decode_events(d, n, mp_next_event, &events_p, events, n_events, malformed, err,
                                  errlen);
}

#endif
