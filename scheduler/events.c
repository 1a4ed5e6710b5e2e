/*
 * KV event decoding (docs/scheduler.md, "KV events"), with msgpack-c.
 *
 * vLLM publishes batches over ZeroMQ as three frames: topic, an 8-byte big-endian sequence number,
 * and a msgpack payload. The payload is a batch [ts, events, data_parallel_rank] whose events are
 * tagged arrays ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
 * medium, ...], ["BlockRemoved", block_hashes, medium, ...], ["AllBlocksCleared"] (msgspec's
 * array_like tagged structs; trailing fields with default values may be omitted). Newer
 * publishers send maps instead, with a "type" field for events and named fields at both levels.
 * Block hashes are integers (signed or unsigned 64-bit) or bytes; bytes are reduced to 64 bits
 * with XXH3, which keeps them opaque and distinct.
 *
 * kvfabric's storage nodes publish the same way, with events ["ChunksAdmitted", node, keys],
 * ["ChunksEvicted", node, keys] and ["ChunksCleared", node] (or maps with "type", "node" and
 * "keys"), keys being 16-byte binaries (docs/keys.md's wire form).
 */
#include "events.h"

#include "kvf/error.h"

#include "bytes.h"

#include <msgpack.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

static int bad(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int bad(char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return KVF_EPROTO;
}

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
typedef struct ev {
    const msgpack_object *type, *hashes, *parent, *tokens, *block_size, *medium, *node, *keys;
} ev;

static int fetch(const msgpack_object *o, ev *e, char *err, size_t errlen)
{
    memset(e, 0, sizeof *e);
    if (o->type == MSGPACK_OBJECT_MAP) {
        e->type = map_get(o, "type");
        e->hashes = map_get(o, "block_hashes");
        e->parent = map_get(o, "parent_block_hash");
        e->tokens = map_get(o, "token_ids");
        e->block_size = map_get(o, "block_size");
        e->medium = map_get(o, "medium");
        e->node = map_get(o, "node");
        e->keys = map_get(o, "keys");
    } else if (o->type == MSGPACK_OBJECT_ARRAY && o->via.array.size >= 1) {
        const msgpack_object *a = o->via.array.ptr;
        uint32_t n = o->via.array.size;
        e->type = &a[0];
        if (str_eq(e->type, "BlockStored")) {
            e->hashes = n > 1 ? &a[1] : NULL;
            e->parent = n > 2 ? &a[2] : NULL;
            e->tokens = n > 3 ? &a[3] : NULL;
            e->block_size = n > 4 ? &a[4] : NULL;
            e->medium = n > 6 ? &a[6] : NULL;
        } else if (str_eq(e->type, "BlockRemoved")) {
            e->hashes = n > 1 ? &a[1] : NULL;
            e->medium = n > 2 ? &a[2] : NULL;
        } else {
            e->node = n > 1 ? &a[1] : NULL;
            e->keys = n > 2 ? &a[2] : NULL;
        }
    } else {
        return bad(err, errlen, "event is neither an array nor a map");
    }
    if (!e->type || e->type->type != MSGPACK_OBJECT_STR)
        return bad(err, errlen, "event without a type name");
    return 0;
}

static kvf_tier tier_of(const msgpack_object *medium)
{
    /* vLLM's mediums: "GPU" (device), "CPU" (host offload); absent means device. */
    if (medium && (str_eq(medium, "CPU") || str_eq(medium, "cpu")))
        return KVF_TIER_HOST;
    return KVF_TIER_DEVICE;
}

static int hash_list(const msgpack_object *o, uint64_t **out, size_t *n, char *err, size_t errlen)
{
    if (!o || o->type != MSGPACK_OBJECT_ARRAY)
        return bad(err, errlen, "block_hashes is not an array");
    *n = o->via.array.size;
    *out = malloc((*n ? *n : 1) * sizeof **out);
    if (!*out)
        return KVF_ENOMEM;
    for (size_t i = 0; i < *n; i++)
        if (get_u64(&o->via.array.ptr[i], &(*out)[i]) != 0) {
            free(*out);
            return bad(err, errlen, "block hash %zu is not an integer or bytes", i);
        }
    return 0;
}

static int apply(kvf_sched *s, const kvf_event_source *src, const msgpack_object *o,
                 kvf_ingest_stats *st, char *err, size_t errlen)
{
    ev e;
    int rc = fetch(o, &e, err, errlen);
    if (rc)
        return rc;
    if (str_eq(e.type, "BlockStored") || str_eq(e.type, "BlockRemoved") ||
        str_eq(e.type, "AllBlocksCleared")) {
        if (src->instance < 0)
            return bad(err, errlen, "engine event from a publisher registered as a store");
    }
    if (str_eq(e.type, "BlockStored")) {
        uint64_t *h;
        size_t n;
        if ((rc = hash_list(e.hashes, &h, &n, err, errlen)) != 0)
            return rc;
        uint64_t bs = 0, parent = 0;
        int has_parent = e.parent && e.parent->type != MSGPACK_OBJECT_NIL;
        if (!e.block_size || get_u64(e.block_size, &bs) != 0 || bs == 0 || bs > 65536 ||
            (has_parent && get_u64(e.parent, &parent) != 0) || !e.tokens ||
            e.tokens->type != MSGPACK_OBJECT_ARRAY || e.tokens->via.array.size != n * bs) {
            free(h);
            return bad(err, errlen,
                       "BlockStored: block_size, parent or token_ids malformed "
                       "(%zu blocks)",
                       n);
        }
        uint32_t *t = malloc((n * bs > 0 ? n * bs : 1) * sizeof *t);
        if (!t) {
            free(h);
            return KVF_ENOMEM;
        }
        for (size_t i = 0; i < n * bs; i++) {
            uint64_t v;
            if (get_u64(&e.tokens->via.array.ptr[i], &v) != 0 || v > UINT32_MAX) {
                free(h);
                free(t);
                return bad(err, errlen, "BlockStored: token %zu is not a 32-bit id", i);
            }
            t[i] = (uint32_t)v;
        }
        rc = kvf_sched_block_stored(s, src->instance, h, n, has_parent, parent, t, n * bs,
                                    (uint32_t)bs, tier_of(e.medium));
        free(h);
        free(t);
        if (rc == KVF_ENOENT) {
            st->unknown_parents++;
            return 0;
        }
        st->stored += n;
        return rc;
    }
    if (str_eq(e.type, "BlockRemoved")) {
        uint64_t *h;
        size_t n;
        if ((rc = hash_list(e.hashes, &h, &n, err, errlen)) != 0)
            return rc;
        rc = kvf_sched_block_removed(s, src->instance, h, n);
        free(h);
        st->removed += n;
        return rc;
    }
    if (str_eq(e.type, "AllBlocksCleared")) {
        st->cleared++;
        return kvf_sched_all_cleared(s, src->instance);
    }
    if (str_eq(e.type, "ChunksAdmitted") || str_eq(e.type, "ChunksEvicted")) {
        uint64_t node;
        if (src->store < 0)
            return bad(err, errlen, "store event from a publisher registered as an engine");
        if (!e.node || get_u64(e.node, &node) != 0 || (int)node != src->store || !e.keys ||
            e.keys->type != MSGPACK_OBJECT_ARRAY)
            return bad(err, errlen, "%.*s: node or keys malformed", (int)e.type->via.str.size,
                       e.type->via.str.ptr);
        size_t n = e.keys->via.array.size;
        kvf_key *k = malloc((n ? n : 1) * sizeof *k);
        if (!k)
            return KVF_ENOMEM;
        for (size_t i = 0; i < n; i++) {
            const msgpack_object *b = &e.keys->via.array.ptr[i];
            if (b->type != MSGPACK_OBJECT_BIN || b->via.bin.size != 16) {
                free(k);
                return bad(err, errlen, "store event: key %zu is not 16 bytes", i);
            }
            const uint8_t *p = (const uint8_t *)b->via.bin.ptr;
            k[i].lo = kvf__get_u64(p);
            k[i].hi = kvf__get_u64(p + 8);
        }
        rc = kvf_sched_store_chunks(s, src->store, k, n, str_eq(e.type, "ChunksAdmitted"));
        free(k);
        st->chunks += n;
        return rc;
    }
    if (str_eq(e.type, "ChunksCleared")) {
        st->cleared++;
        return 0; /* the store's own accounting follows with evictions; nothing to drop here */
    }
    st->unknown_types++;
    return 0; /* newer event kinds are skipped, not fatal */
}

int kvf_sched_ingest(kvf_sched *s, const kvf_event_source *src, const void *payload, size_t len,
                     kvf_ingest_stats *st, char *err, size_t errlen)
{
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    size_t off = 0;
    int rc;
    msgpack_unpack_return ur = msgpack_unpack_next(&u, payload, len, &off);
    if (ur != MSGPACK_UNPACK_SUCCESS) {
        rc = bad(err, errlen, "payload is not msgpack (%d)", (int)ur);
        goto out;
    }
    if (off != len) {
        rc = bad(err, errlen, "%zu trailing bytes after the batch", len - off);
        goto out;
    }
    const msgpack_object *b = &u.data, *events = NULL;
    if (b->type == MSGPACK_OBJECT_ARRAY && b->via.array.size >= 2)
        events = &b->via.array.ptr[1];
    else if (b->type == MSGPACK_OBJECT_MAP)
        events = map_get(b, "events");
    if (!events || events->type != MSGPACK_OBJECT_ARRAY) {
        rc = bad(err, errlen, "batch has no events array");
        goto out;
    }
    rc = 0;
    for (uint32_t i = 0; i < events->via.array.size && !rc; i++) {
        rc = apply(s, src, &events->via.array.ptr[i], st, err, errlen);
        if (rc == KVF_EPROTO) {
            /* One malformed event is skipped, with the reason; the batch goes on. */
            st->malformed++;
            rc = 0;
        }
    }
    st->batches++;
out:
    msgpack_unpacked_destroy(&u);
    return rc;
}

int kvf_seq_check(kvf_seq_tracker *t, const void *seq8, uint64_t *missing_from)
{
    const uint8_t *p = seq8;
    uint64_t seq = 0;
    for (int i = 0; i < 8; i++)
        seq = (seq << 8) | p[i];
    int gap = 0;
    if (t->seen && seq > t->last + 1) {
        *missing_from = t->last + 1;
        t->gaps++;
        t->missed += seq - t->last - 1;
        gap = 1;
    }
    if (!t->seen || seq > t->last)
        t->last = seq;
    t->seen = 1;
    return gap;
}
