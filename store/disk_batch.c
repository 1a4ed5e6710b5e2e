/*
 * Gets of many objects at once (disk.h, kvf__disk_get_many): the objects a batch demoted
 * together lie side by side in the log (one buffered write gathered them), or near each other
 * (interleaved with another request's), so they are read back in one I/O of the run's span
 * instead of one I/O each: the same queue depth, larger reads, as the log's writes gather small
 * objects. Every record is checked as kvf__disk_get checks one; what lies between them is not
 * looked at.
 */
#include "disk_int.h"

#include "kvf/error.h"

#include <stdlib.h>
#include <string.h>

/* A run's span at most: a batch of 64 KiB objects is read in 4 MiB I/Os. */
#define SPAN_MAX (4ull << 20)
/* The most a run reads past between two of its records (records of others: a batch's keys that
 * came to the store in several requests, each its own promotion, were demoted interleaved), so
 * long as half the run's span at least is wanted: one larger read in place of many small ones,
 * at most twice the bytes. */
#define GAP_MAX (256ull << 10)

typedef struct want {
    uint64_t off, size, len, seq;
    uint32_t i;
} want;

static int by_off(const void *a, const void *b)
{
    const want *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* A run's records checked, and copied out, as the pieces that hold them land: those of the
 * first pieces while the last ones are read. */
struct run_ctx {
    const uint8_t *base; /* the run's first byte in the slot's buffer */
    uint64_t ns;
    const want *w;
    size_t m, k; /* the records, and the next to check */
    const kvf_key *keys;
    void *const *bufs;
    int *st;
    uint8_t *ok;
    uint64_t bytes;
};

static void run_piece(void *ud, const uint8_t *p, uint64_t from, uint64_t n)
{
    (void)p; /* one segment: the pieces lie in order from base */
    struct run_ctx *c = ud;
    for (; c->k < c->m; c->k++) {
        const want *x = &c->w[c->k];
        uint64_t at = x->off - c->w[0].off;
        if (at + HDR_LEN + x->len > from + n)
            return; /* not all landed yet */
        const uint8_t *r = c->base + at;
        const kvf_key *key = &c->keys[x->i];
        rec h;
        c->ok[c->k] = kvf__dk_hdr_read(r, &h) && h.type == REC_OBJECT && h.seq == x->seq &&
                      h.ns == c->ns && h.lo == key->lo && h.hi == key->hi && h.len == x->len &&
                      h.doff == HDR_LEN && XXH3_64bits(r + HDR_LEN, x->len) == h.data_xxh;
        if (c->ok[c->k]) {
            memcpy(c->bufs[x->i], r + HDR_LEN, x->len);
            c->st[x->i] = 0;
            c->bytes += x->len;
        }
    }
}

/* Reads the run w[0..m) (records in log order, span bytes from w[0].off) and checks each
 * record. 0, or 1 when the read of a run of several records failed: then nothing is concluded
 * (the error may lie in bytes between them, which no one asked for) and the caller reads them
 * one by one. */
static int read_run(kvf__disk *d, uint64_t ns, const want *w, size_t m, uint64_t span,
                    const kvf_key *keys, void *const *bufs, int *st)
{
    struct rslot *sl = kvf__dk_slot_take(d, span);
    if (!sl) {
        for (size_t k = 0; k < m; k++)
            st[w[k].i] = KVF_ENOMEM;
        return 0;
    }
    uint8_t ok[SPAN_MAX / BLK];
    memset(ok, 0, m);
    struct run_ctx c = {
        .base = sl->buf, .ns = ns, .w = w, .m = m, .keys = keys, .bufs = bufs, .st = st, .ok = ok};
    int r = kvf__dk_io_pieces(d, &sl->ring, sl->buf, span, w[0].off, run_piece, &c);
    if (r && m > 1) {
        pthread_mutex_unlock(&sl->mu);
        __atomic_fetch_add(&d->r_reads, 1, __ATOMIC_RELAXED);
        return 1;
    }
    uint64_t bytes = r ? 0 : c.bytes;
    pthread_mutex_unlock(&sl->mu);
    __atomic_fetch_add(&d->r_reads, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&d->r_bytes, bytes, __ATOMIC_RELAXED);
    size_t bad = 0;
    for (size_t k = 0; k < m; k++)
        bad += r || !ok[k];
    if (!bad)
        return 0; /* every record checked: no lock taken, none waited for */
    pthread_mutex_lock(&d->mu);
    if (r) {
        kvf__dk_go_down(d, -r);
        for (size_t k = 0; k < m; k++)
            st[w[k].i] = KVF_EIO;
    } else {
        for (size_t k = 0; k < m; k++)
            if (!ok[k]) {
                kvf__dk_read_failed(d, ns, &keys[w[k].i], w[k].seq);
                st[w[k].i] = KVF_ENOENT;
            }
    }
    pthread_mutex_unlock(&d->mu);
    return 0;
}

int kvf__disk_get_many(kvf__disk *d, uint64_t ns, size_t n, const kvf_key *keys, void *const *bufs,
                       const uint64_t *caps, uint64_t *lens, int *st)
{
    want *w = malloc((n ? n : 1) * sizeof *w);
    if (!w)
        return KVF_ENOMEM;
    size_t m = 0;
    /* what the index says, under imu: never behind a write's I/O */
    pthread_mutex_lock(&d->imu);
    int down = __atomic_load_n(&d->st.down, __ATOMIC_RELAXED) != 0;
    for (size_t i = 0; i < n; i++) {
        lens[i] = 0;
        if (down) {
            st[i] = KVF_EIO;
            continue;
        }
        ent *e = kvf__dk_find(d, ns, keys[i].lo, keys[i].hi);
        uint64_t size = e ? kvf__dk_rec_size(e->paged, e->len) : 0;
        /* counted here, but a large object to read: kvf__disk_get counts that one */
        if (!e || e->len > caps[i] || size <= SPAN_MAX / 2)
            __atomic_fetch_add(&d->r_gets, 1, __ATOMIC_RELAXED);
        if (!e) {
            __atomic_fetch_add(&d->r_misses, 1, __ATOMIC_RELAXED);
            st[i] = KVF_ENOENT;
            continue;
        }
        lens[i] = e->len;
        st[i] = e->len > caps[i] ? KVF_EOVERFLOW : KVF_EIO; /* EIO until read */
        if (e->len <= caps[i])
            w[m++] =
                (want){.off = e->off, .size = size, .len = e->len, .seq = e->seq, .i = (uint32_t)i};
    }
    pthread_mutex_unlock(&d->imu);
    qsort(w, m, sizeof *w, by_off);
    for (size_t j = 0; j < m;) {
        if (w[j].size > SPAN_MAX / 2) {
            /* a large object: read in pieces, checked as they land (kvf__disk_get) */
            uint64_t got = 0;
            int rc = kvf__disk_get(d, ns, &keys[w[j].i], bufs[w[j].i], caps[w[j].i], &got);
            st[w[j].i] = rc;
            lens[w[j].i] = got; /* as it is now: the index is asked again */
            j++;
            continue;
        }
        /* the records that follow each other in the log, with gaps of at most GAP_MAX and at
         * least half the span wanted, up to SPAN_MAX */
        size_t k = j + 1;
        uint64_t span = w[j].size, wanted = w[j].size;
        while (k < m && w[k].size <= SPAN_MAX / 2) {
            uint64_t end = w[k - 1].off + w[k - 1].size, to = w[k].off + w[k].size - w[j].off;
            if (w[k].off < end || w[k].off - end > GAP_MAX || to > SPAN_MAX ||
                2 * (wanted + w[k].size) < to)
                break;
            span = to;
            wanted += w[k++].size;
        }
        if (read_run(d, ns, w + j, k - j, span, keys, bufs, st)) {
            /* one by one: a record that reads takes nothing down with it (counted once) */
            __atomic_fetch_sub(&d->r_gets, (uint64_t)(k - j), __ATOMIC_RELAXED);
            for (size_t x = j; x < k; x++) {
                uint64_t got = 0;
                st[w[x].i] = kvf__disk_get(d, ns, &keys[w[x].i], bufs[w[x].i], w[x].len, &got);
            }
        }
        j = k;
    }
    free(w);
    return 0;
}
