/*
 * KV event ingestion (ingest.h): events decoded by proto/kvevents.h applied to the scheduler's
 * index, and the sequence numbers of each publisher checked for gaps.
 */
#include "ingest.h"

#include "kvf/error.h"

#include "errf.h"
#include "kvevents.h"

typedef struct ingest_ctx {
    kvf_sched *s;
    const kvf_event_source *src;
    kvf_ingest_stats *st;
} ingest_ctx;

static int is_engine_event(kvf_kve_type t)
{
    return t == KVF_KVE_BLOCK_STORED || t == KVF_KVE_BLOCK_REMOVED || t == KVF_KVE_ALL_CLEARED;
}

/* Applies one decoded event to the index, after checking that its kind matches its publisher. */
static int apply(void *ud, const kvf_kve *ev, char *err, size_t errlen)
{
    ingest_ctx *x = ud;
    const kvf_event_source *src = x->src;
    kvf_ingest_stats *st = x->st;
    int rc;
    if (is_engine_event(ev->type) && src->instance < 0)
        return kvf__errf(err, errlen, KVF_EPROTO,
                         "engine event from a publisher registered as a store");
    switch (ev->type) {
    case KVF_KVE_BLOCK_STORED:
        rc = kvf_sched_block_stored(x->s, src->instance, ev->hashes, ev->n_hashes, ev->has_parent,
                                    ev->parent, ev->tokens, ev->n_tokens, ev->block_size,
                                    ev->host_tier ? KVF_TIER_HOST : KVF_TIER_DEVICE);
        if (rc == KVF_ENOENT) {
            st->unknown_parents++;
            return 0;
        }
        st->stored += ev->n_hashes;
        return rc;
    case KVF_KVE_BLOCK_REMOVED:
        st->removed += ev->n_hashes;
        return kvf_sched_block_removed(x->s, src->instance, ev->hashes, ev->n_hashes);
    case KVF_KVE_ALL_CLEARED:
        st->cleared++;
        return kvf_sched_all_cleared(x->s, src->instance);
    case KVF_KVE_CHUNKS_ADMITTED:
    case KVF_KVE_CHUNKS_EVICTED:
        if (src->store < 0)
            return kvf__errf(err, errlen, KVF_EPROTO,
                             "store event from a publisher registered as an engine");
        if (ev->node != (uint64_t)src->store)
            return kvf__errf(err, errlen, KVF_EPROTO, "%.*s: node %llu is not publisher %d",
                             (int)ev->type_len, ev->type_name, (unsigned long long)ev->node,
                             src->store);
        st->chunks += ev->n_keys;
        return kvf_sched_store_chunks(x->s, src->store, ev->keys, ev->n_keys,
                                      ev->type == KVF_KVE_CHUNKS_ADMITTED, ev->disk_tier);
    case KVF_KVE_STORE_RATES:
        if (src->store < 0 || ev->node != (uint64_t)src->store)
            return kvf__errf(err, errlen, KVF_EPROTO, "StoreRates: not from storage node %d",
                             src->store);
        return ev->disk_read_bytes_per_s
                   ? kvf_sched_store_rates(x->s, src->store, (double)ev->disk_read_bytes_per_s)
                   : 0;
    case KVF_KVE_CHUNKS_CLEARED:
        st->cleared++;
        return 0; /* the store's own accounting follows with evictions; nothing to drop here */
    default:
        st->unknown_types++;
        return 0; /* newer event kinds are skipped, not fatal */
    }
}

int kvf_sched_apply(kvf_sched *s, const kvf_event_source *src, const kvf_kve *events, size_t n,
                    uint64_t malformed, kvf_ingest_stats *st, char *err, size_t errlen)
{
    ingest_ctx x = {.s = s, .src = src, .st = st};
    st->batches++;
    st->malformed += malformed;
    for (size_t i = 0; i < n; i++) {
        int rc = apply(&x, &events[i], err, errlen);
        if (rc == KVF_EPROTO) { /* one event that does not fit its publisher: skipped */
            st->malformed++;
            continue;
        }
        if (rc)
            return rc;
    }
    return 0;
}

/* The blocks (or keys) of an event that slices count, 0 for an event applied whole. */
static size_t sliced_len(const kvf_kve *ev)
{
    switch (ev->type) {
    case KVF_KVE_BLOCK_STORED:
    case KVF_KVE_BLOCK_REMOVED:
        return ev->n_hashes;
    case KVF_KVE_CHUNKS_ADMITTED:
    case KVF_KVE_CHUNKS_EVICTED:
        return ev->n_keys;
    default:
        return 0;
    }
}

int kvf_sched_apply_some(kvf_sched *s, const kvf_event_source *src, const kvf_kve *events, size_t n,
                         uint64_t malformed, kvf_apply_cursor *cur, size_t blocks,
                         kvf_ingest_stats *st, char *err, size_t errlen)
{
    ingest_ctx x = {.s = s, .src = src, .st = st};
    if (cur->event == 0 && cur->off == 0) {
        st->batches++;
        st->malformed += malformed;
    }
    size_t budget = blocks ? blocks : SIZE_MAX;
    while (cur->event < n && budget > 0) {
        const kvf_kve *ev = &events[cur->event];
        size_t len = sliced_len(ev), k = len - cur->off;
        kvf_kve piece = *ev;
        if (len) {
            k = k < budget ? k : budget;
            if (piece.n_hashes) {
                piece.hashes = ev->hashes + cur->off;
                piece.n_hashes = k;
            }
            if (piece.n_keys) {
                piece.keys = ev->keys + cur->off;
                piece.n_keys = k;
            }
            if (ev->type == KVF_KVE_BLOCK_STORED) {
                piece.tokens = ev->tokens + cur->off * ev->block_size;
                piece.n_tokens = k * ev->block_size;
                if (cur->off) { /* the rest of a chain: its parent is the last block applied */
                    piece.has_parent = 1;
                    piece.parent = ev->hashes[cur->off - 1];
                }
            }
        }
        uint64_t unknown = st->unknown_parents;
        int rc = apply(&x, &piece, err, errlen);
        if (rc == KVF_EPROTO) /* one event that does not fit its publisher: skipped */
            st->malformed++;
        else if (rc)
            return rc;
        budget -= len ? k : 1;
        cur->off += len ? k : 0;
        /* done with the event: all of it applied, refused, or its chain unknown to the index
         * (its other pieces would be too) */
        if (!len || cur->off >= len || rc == KVF_EPROTO || st->unknown_parents != unknown) {
            cur->event++;
            cur->off = 0;
        }
    }
    return 0;
}

int kvf_sched_ingest(kvf_sched *s, const kvf_event_source *src, const void *payload, size_t len,
                     kvf_ingest_stats *st, char *err, size_t errlen)
{
    kvf__kve_decoder *d;
    if (kvf__kve_decoder_new(&d) != 0)
        return KVF_ENOMEM;
    const kvf_kve *ev;
    size_t n;
    uint64_t malformed = 0;
    int rc = kvf__kve_decode_batch(d, payload, len, &ev, &n, &malformed, err, errlen);
    if (!rc)
        rc = kvf_sched_apply(s, src, ev, n, malformed, st, err, errlen);
    kvf__kve_decoder_free(&d);
    return rc;
}

static uint64_t add_sat(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

void kvf_replay_walk_init(kvf_replay_walk *w, uint64_t from, uint64_t upto, int cleared)
{
    *w = (kvf_replay_walk){
        .from = from, .want = upto - from, .cleared_at = cleared ? 0 : UINT64_MAX};
}

unsigned kvf_replay_walk_step(kvf_replay_walk *w, uint64_t seq, uint64_t *lost_from)
{
    const uint64_t half = (uint64_t)1 << 63;
    uint64_t off = seq - w->from; /* modulo 2^64, as kvf_seq_check compares */
    if (off >= half)
        return 0; /* before the first one asked for */
    unsigned r = 0;
    if (off > w->next && !(w->from == 0 && w->next == 0 && off == 1) && w->cleared_at != w->next) {
        /* each hole: what was applied since an earlier one may be stale again */
        *lost_from = w->from + w->next;
        w->cleared_at = w->next;
        r |= KVF_REPLAY_HOLE | (off >= w->want ? KVF_REPLAY_PAST : 0);
    }
    if (off < w->want) {
        r |= KVF_REPLAY_APPLY;
        w->next = off + 1;
    }
    if (off + 1 >= w->want) {
        r |= KVF_REPLAY_DONE;
        w->done = 1;
    }
    return r;
}

int kvf_replay_walk_short(const kvf_replay_walk *w, uint64_t *lost_from)
{
    if (w->next >= w->want || w->next == w->cleared_at || (w->from == 0 && w->want == 1))
        return 0;
    *lost_from = w->from + w->next;
    return 1;
}

int kvf_replay_walk_cut(const kvf_replay_walk *w, uint64_t *rest, int *cleared)
{
    if (w->next >= w->want || w->done)
        return 0;
    *rest = w->from + w->next;
    *cleared = w->cleared_at == w->next;
    return 1;
}

uint64_t kvf_replay_charge(kvf_replay_credit *c, uint64_t t0, uint64_t now)
{
    const int64_t cap = (int64_t)KVF_REPLAY_CREDIT_MS * 1000000;
    if (!c->at_ns) /* a new subscription: the whole budget */
        c->left_ns = cap;
    else if (now > c->at_ns)
        c->left_ns += (int64_t)((now - c->at_ns) / KVF_REPLAY_SHARE);
    if (c->left_ns > cap)
        c->left_ns = cap;
    c->left_ns -= now > t0 ? (int64_t)(now - t0) : 0;
    c->at_ns = now;
    return c->left_ns < 0 ? now + (uint64_t)(-c->left_ns) * KVF_REPLAY_SHARE : 0;
}

void kvf_replay_owe(kvf_replay_debt *d, uint64_t from, int cleared)
{
    if (cleared || !d->owed) {
        d->from = from;
        d->cleared = cleared;
    } else {
        if (from - d->from >= ((uint64_t)1 << 63)) /* earlier, modulo 2^64 */
            d->from = from;
        /* a gap since the restart: a window that no longer reaches it is a loss again */
        d->cleared = 0;
    }
    d->owed = 1;
}

int kvf_seq_check(kvf_seq_tracker *t, const void *seq8, uint64_t *missing_from)
{
    uint64_t seq = kvf__kve_seq_get(seq8);
    if (!t->seen) {
        t->seen = 1;
        t->last = seq;
        return KVF_SEQ_NEXT;
    }
    /* How far ahead of the last number this one is, modulo 2^64: a publisher that counts past
     * 2^64 - 1 goes on from 0 without a gap, and one that goes backwards is a huge step ahead. */
    uint64_t ahead = seq - t->last;
    if (ahead <= 1) {
        t->last = seq;
        return KVF_SEQ_NEXT;
    }
    t->last = seq;
    if (ahead - 1 > KVF_SEQ_MAX_GAP) {
        t->restarts = add_sat(t->restarts, 1);
        return KVF_SEQ_RESTART;
    }
    *missing_from = seq - (ahead - 1);
    t->gaps = add_sat(t->gaps, 1);
    t->missed = add_sat(t->missed, ahead - 1);
    return KVF_SEQ_GAP;
}
