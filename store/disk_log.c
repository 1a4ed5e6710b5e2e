/*
 * The disk tier's log (disk_int.h): record headers, the write buffer, extents opened and reused
 * oldest first, and large objects written in pieces, their header last.
 */
#define _GNU_SOURCE
#include "disk_int.h"

#include "kvf/error.h"

#include "bytes.h"

#include <errno.h>
#include <string.h>

static void hdr_write(uint8_t *h, int type, int version, uint64_t seq, uint64_t ns, uint64_t lo,
                      uint64_t hi, uint64_t len, uint64_t data_xxh)
{
    memset(h, 0, HDR_LEN);
    kvf__put_u32(h, REC_MAGIC);
    h[4] = (uint8_t)type;
    h[5] = (uint8_t)version;
    kvf__put_u64(h + 8, seq);
    kvf__put_u64(h + 16, ns);
    kvf__put_u64(h + 24, lo);
    kvf__put_u64(h + 32, hi);
    kvf__put_u64(h + 40, len);
    kvf__put_u64(h + 48, data_xxh);
    kvf__put_u64(h + 56, XXH3_64bits(h, 56));
}

/* Whether h is a record header that checks. */
int kvf__dk_hdr_read(const uint8_t *h, rec *r)
{
    if (kvf__get_u32(h) != REC_MAGIC || (h[5] != REC_PACKED && h[5] != REC_PAGED) ||
        kvf__get_u64(h + 56) != XXH3_64bits(h, 56))
        return 0;
    *r = (rec){.type = h[4],
               .seq = kvf__get_u64(h + 8),
               .ns = kvf__get_u64(h + 16),
               .lo = kvf__get_u64(h + 24),
               .hi = kvf__get_u64(h + 32),
               .len = kvf__get_u64(h + 40),
               .data_xxh = kvf__get_u64(h + 48),
               .doff = h[5] == REC_PAGED ? BLK : HDR_LEN};
    /* only objects are paged */
    return r->type >= REC_OBJECT && r->type <= REC_CLEAR && r->len < MAX_OBJECT &&
           (h[5] == REC_PACKED || r->type == REC_OBJECT);
}

static int ext_header_write(kvf__disk *d, uint64_t e, uint64_t gen)
{
    uint8_t *b = kvf__dk_aligned(BLK);
    if (!b)
        return -ENOMEM;
    memset(b, 0, BLK);
    memcpy(b, EXT_MAGIC, 8);
    kvf__put_u64(b + 8, gen);
    kvf__put_u64(b + 16, e);
    memcpy(b + 24, d->uuid, 16);
    kvf__put_u64(b + 40, XXH3_64bits(b, 40));
    int rc = kvf__dk_io(d, 1, b, BLK, kvf__dk_ext_off(d, e));
    free(b);
    return rc;
}

/* Writes the buffered records and indexes them, after the large records in flight. Called with
 * mu. */
int kvf__dk_write_out(kvf__disk *d)
{
    if (kvf__dk_reap(d) != 0) {
        d->npend = 0;
        d->wlen = 0;
        return KVF_EIO;
    }
    if (!d->wlen)
        return 0;
    int rc = kvf__dk_io(d, 1, d->wbuf, d->wlen, kvf__dk_ext_off(d, d->cur) + d->wstart);
    if (rc) {
        kvf__dk_go_down(d, -rc);
        d->npend = 0;
        d->wlen = 0;
        return KVF_EIO;
    }
    for (size_t i = 0; i < d->npend; i++) {
        struct pend *p = &d->pend[i];
        if (p->type == REC_OBJECT) {
            if (kvf__dk_set(d, p->ns, p->lo, p->hi, p->off, p->len, p->seq, 0) != 0) {
                kvf__dk_go_down(d, ENOMEM);
                return KVF_EIO;
            }
        } else if (p->type == REC_TOMB) {
            kvf__dk_drop_key(d, p->ns, p->lo, p->hi, p->seq);
        } else {
            d->st.cleared += kvf__dk_drop_where(d, p->ns == 0, p->ns, UINT64_MAX, p->seq);
        }
    }
    d->npend = 0;
    d->wstart += d->wlen;
    d->wlen = 0;
    return 0;
}

/* Opens the next extent for writing (the oldest, reused): what it held leaves the index. */
static int next_extent(kvf__disk *d)
{
    int rc = kvf__dk_write_out(d);
    if (rc)
        return rc;
    uint64_t e = (d->cur + 1) % d->n_ext;
    if (d->gen[e]) {
        d->st.extents_reused++;
        d->st.dropped_by_reuse += kvf__dk_drop_where(d, 1, 0, e, UINT64_MAX);
    }
    uint64_t gen = d->seq++;
    int w = ext_header_write(d, e, gen);
    if (w) {
        kvf__dk_go_down(d, -w);
        return KVF_EIO;
    }
    d->gen[e] = gen;
    d->cur = e;
    d->wpos = d->wstart = BLK;
    return 0;
}

/* Large record r's writes are all done: indexed where they all succeeded and the device is up;
 * a failed one takes the device down. 0 or KVF_EIO. */
static int lrec_done(kvf__disk *d, struct lrec *r)
{
    r->used = 0;
    if (r->err) {
        kvf__dk_go_down(d, -r->err);
        return KVF_EIO;
    }
    if (d->st.down)
        return KVF_EIO;
    if (kvf__dk_set(d, r->ns, r->lo, r->hi, r->off, r->len, r->seq, r->paged) != 0) {
        kvf__dk_go_down(d, ENOMEM);
        return KVF_EIO;
    }
    return 0;
}

/* Waits for one write of a large record: its slot goes back on the free list, and its record is
 * indexed when it was the record's last. 0 or KVF_EIO (the device is then down). */
static int wait_piece(kvf__disk *d)
{
    struct io_uring_cqe *cqe;
    int rc = kvf__dk_wait(&d->ring, &cqe);
    if (rc < 0) {
        /* nothing more can be known of the writes in flight: none of their records is indexed */
        kvf__dk_go_down(d, -rc);
        d->pinflight = 0;
        d->lrec[0].used = d->lrec[1].used = 0;
        return KVF_EIO;
    }
    uint64_t v = io_uring_cqe_get_data64(cqe);
    int res = cqe->res;
    io_uring_cqe_seen(&d->ring, cqe);
    d->pinflight--;
    int slot = (int)(v >> 32);
    if (slot < 0 || slot >= LSLOTS + 2)
        return 0;
    struct lrec *r;
    if (slot >= LSLOTS) { /* a write straight from the caller's memory (append_direct) */
        r = &d->lrec[slot - LSLOTS];
    } else {
        d->pfree[d->npfree++] = slot;
        r = &d->lrec[d->powner[slot]];
    }
    if (!r->err && (res < 0 || (uint64_t)res != (v & 0xffffffffu)))
        r->err = res < 0 ? res : -ENOSPC;
    return --r->left == 0 ? lrec_done(d, r) : 0;
}

int kvf__dk_reap(kvf__disk *d)
{
    int rc = 0;
    while (d->pinflight) {
        int w = wait_piece(d);
        rc = rc ? rc : w;
    }
    /* nothing in flight: every buffer is free (those taken for a record that failed included) */
    d->npfree = LSLOTS;
    for (int i = 0; i < LSLOTS; i++)
        d->pfree[i] = i;
    for (int i = 0; i < 2; i++)
        if (d->lrec[i].used) /* taken, never submitted whole: a failed append's */
            d->lrec[i].used = 0;
    return rc;
}

/* A free piece buffer, waiting for a write in flight to end where none is. -1 when the device
 * went down meanwhile. */
static int take_slot(kvf__disk *d)
{
    while (!d->npfree)
        if (!d->pinflight || wait_piece(d) != 0)
            return -1;
    return d->pfree[--d->npfree];
}

/* Submits a write of kk bytes at off for record r: from piece buffer slot (0..LSLOTS-1), or with
 * slot -1 straight from the caller's memory p (append_direct; its completion is tagged
 * LSLOTS + r, which wait_piece tells apart). 0 or a negative errno. */
static int submit_write(kvf__disk *d, int slot, const uint8_t *p, uint64_t kk, uint64_t off, int r)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
    if (!sqe)
        return -EBUSY;
    io_uring_prep_write(sqe, d->fd, slot < 0 ? p : d->piece[slot], (unsigned)kk, off);
    io_uring_sqe_set_data64(sqe, (uint64_t)(slot < 0 ? LSLOTS + r : slot) << 32 | kk);
    if (slot >= 0)
        d->powner[slot] = r;
    d->lrec[r].left++;
    d->pinflight++;
    int s2 = io_uring_submit(&d->ring);
    if (s2 < 1) { /* not in flight: no completion will come for it, and the write never done */
        kvf__dk_unsubmit(sqe);
        d->pinflight--;
        d->lrec[r].left--;
        if (slot >= 0)
            d->pfree[d->npfree++] = slot;
        return s2 < 0 ? s2 : -EBUSY;
    }
    return 0;
}

static int submit_piece(kvf__disk *d, int slot, uint64_t kk, uint64_t off, int r)
{
    return submit_write(d, slot, NULL, kk, off, r);
}

/* Takes a large record's entry (the one before may still be in flight: this one takes the
 * other), made but not yet indexed (left 1 while it is made, so that writes that end meanwhile
 * never index it before its header is written). -1 when the device went down meanwhile. */
static int lrec_take(kvf__disk *d, uint64_t ns, const kvf_key *k, uint64_t base, uint64_t len,
                     uint64_t seq, int paged)
{
    while (d->lrec[0].used && d->lrec[1].used) {
        if (!d->pinflight) { /* cannot be: both would be in flight */
            kvf__dk_reap(d);
            break;
        }
        if (wait_piece(d) != 0)
            return -1;
    }
    int r = d->lrec[0].used ? 1 : 0;
    d->lrec[r] = (struct lrec){.ns = ns,
                               .lo = k->lo,
                               .hi = k->hi,
                               .off = base,
                               .len = len,
                               .seq = seq,
                               .left = 1,
                               .used = 1,
                               .paged = paged};
    return r;
}

/* What both ways of writing a large record do first: the buffered records written out, the piece
 * buffers made, the record's place (*base) and sequence number (*seq) taken, the fault hook asked
 * (tests), and a large record's entry taken (*r). 0, or KVF_ENOMEM, or KVF_EIO: the device is
 * then down and nothing of the record is in flight. */
static int large_begin(kvf__disk *d, uint64_t ns, const kvf_key *k, uint64_t len, int paged,
                       uint64_t *base, uint64_t *seq, int *r)
{
    int rc = d->wlen ? kvf__dk_write_out(d) : 0;
    if (rc)
        return rc;
    for (int i = 0; i < LSLOTS; i++)
        if (!d->piece[i] && !(d->piece[i] = kvf__dk_aligned(PIECE)))
            return KVF_ENOMEM;
    if (!d->pinflight && d->npfree != LSLOTS)
        kvf__dk_reap(d); /* the free list made whole (first use) */
    *base = kvf__dk_ext_off(d, d->cur) + d->wpos;
    *seq = d->seq++;
    if (d->o.fault) {
        int f = d->o.fault(d->o.fault_ud, 1, *base, kvf__dk_rec_size(paged, len));
        if (f) {
            kvf__dk_go_down(d, f < 0 ? -f : EIO);
            kvf__dk_reap(d);
            return KVF_EIO;
        }
    }
    *r = lrec_take(d, ns, k, *base, len, *seq, paged);
    if (*r < 0) {
        kvf__dk_reap(d);
        return KVF_EIO;
    }
    return 0;
}

/* How both ways of writing a large record end. err (a negative errno) takes the device down (the
 * first errno stays) and waits for what is in flight, the caller's memory then read no more, and
 * nothing of the record is indexed: KVF_EIO. Else the log moves past the record (size bytes),
 * which is indexed now if its writes have all ended already: 0, or KVF_EIO. */
static int large_end(kvf__disk *d, int r, uint64_t size, int err)
{
    if (err) {
        kvf__dk_go_down(d, -err);
        kvf__dk_reap(d);
        return KVF_EIO;
    }
    d->wpos += size;
    d->wstart = d->wpos;
    return --d->lrec[r].left == 0 ? lrec_done(d, &d->lrec[r]) : 0;
}

/* An object too large for the write buffer, written in pieces: each piece copied and hashed, and
 * written while the next is prepared; the first piece, which holds the header (it needs the
 * data's checksum), last. The call returns once every piece is submitted (the object's bytes
 * are all copied by then): the last ones are written while the next record's first pieces are
 * made, and the record is indexed once every piece is written (kvf__dk_reap, or the wait for a
 * buffer). Called with mu, with the record fitting in the current extent. */
static int append_large(kvf__disk *d, uint64_t ns, const kvf_key *k, const uint8_t *data,
                        uint64_t len)
{
    uint64_t base, seq;
    int r, rc = large_begin(d, ns, k, len, 0, &base, &seq, &r);
    if (rc)
        return rc;
    uint64_t size = kvf__dk_rec_size(0, len), n = (size + PIECE - 1) / PIECE;
    XXH3_64bits_reset(d->xs);
    int first = take_slot(d), err = 0;
    if (first < 0)
        goto fail;
    for (uint64_t i = 0; i < n && !err; i++) {
        uint64_t from = i * PIECE, kk = size - from < PIECE ? size - from : PIECE;
        int slot = i ? take_slot(d) : first;
        if (slot < 0)
            goto fail;
        uint8_t *b = d->piece[slot];
        /* the record's bytes [from, from + kk): header (filled last), data, zeros */
        uint64_t a = from < HDR_LEN ? HDR_LEN : from, e = from + kk;
        uint64_t de = e < HDR_LEN + len ? e : HDR_LEN + len;
        if (from < HDR_LEN)
            memset(b, 0, HDR_LEN);
        if (a < de) {
            memcpy(b + (a - from), data + (a - HDR_LEN), de - a);
            XXH3_64bits_update(d->xs, data + (a - HDR_LEN), de - a);
        }
        if (de < e)
            memset(b + (de > from ? de - from : 0), 0, e - (de > from ? de : from));
        if (i) /* the first piece waits for the checksum */
            err = submit_piece(d, slot, kk, base + from, r);
    }
    if (!err) {
        hdr_write(d->piece[first], REC_OBJECT, REC_PACKED, seq, ns, k->lo, k->hi, len,
                  XXH3_64bits_digest(d->xs));
        err = submit_piece(d, first, size < PIECE ? size : PIECE, base, r);
    }
    return large_end(d, r, size, err);
fail:
    return large_end(d, r, size, -EIO); /* the device is down already */
}

/* A large object in page-aligned memory (the arena's large blocks), written with no copy: its
 * record has the header alone in its first 4 KiB block and the data from the second on
 * (REC_PAGED), so that the data's whole blocks are written straight from the caller's memory, in
 * pieces, WSLOTS in flight; its last partial block goes through a piece buffer, and the data is
 * hashed while it is written. The header block is written once every data write has completed,
 * which is also when the call returns: the caller's memory is not read after that. The header's
 * own write may still be in flight: the record is indexed when it completes (kvf__dk_reap, or a
 * wait for a buffer). Called with mu, the record fitting in the current extent. */
static int append_direct(kvf__disk *d, uint64_t ns, const kvf_key *k, const uint8_t *data,
                         uint64_t len)
{
    uint64_t base, seq;
    int r, err = 0, rc = large_begin(d, ns, k, len, 1, &base, &seq, &r);
    if (rc)
        return rc;
    uint64_t size = kvf__dk_rec_size(1, len), body = len / BLK * BLK;
    XXH3_64bits_reset(d->xs);
    for (uint64_t from = 0; from < body && !err; from += PIECE) {
        uint64_t kk = body - from < PIECE ? body - from : PIECE;
        while (d->pinflight >= WSLOTS)
            if (wait_piece(d) != 0)
                goto fail;
        err = submit_write(d, -1, data + from, kk, base + BLK + from, r);
        if (!err)
            XXH3_64bits_update(d->xs, data + from, kk);
    }
    if (!err && len > body) { /* the last partial block, padded with zeros */
        int slot = take_slot(d);
        if (slot < 0)
            goto fail;
        memcpy(d->piece[slot], data + body, len - body);
        memset(d->piece[slot] + (len - body), 0, BLK - (len - body));
        XXH3_64bits_update(d->xs, data + body, len - body);
        err = submit_piece(d, slot, BLK, base + BLK + body, r);
    }
    if (err)
        return large_end(d, r, size, err);
    /* every data write done (the caller's memory is free again), then the header */
    while (d->lrec[r].left > 1)
        if (wait_piece(d) != 0)
            goto fail;
    if (d->lrec[r].err)
        return large_end(d, r, size, d->lrec[r].err);
    int hs = take_slot(d);
    if (hs < 0)
        goto fail;
    memset(d->piece[hs], 0, BLK);
    hdr_write(d->piece[hs], REC_OBJECT, REC_PAGED, seq, ns, k->lo, k->hi, len,
              XXH3_64bits_digest(d->xs));
    err = submit_piece(d, hs, BLK, base, r);
    if (!err)
        __atomic_fetch_add(&d->st.direct_puts, 1, __ATOMIC_RELAXED); /* read without mu */
    return large_end(d, r, size, err);
fail:
    return large_end(d, r, size, -EIO); /* the device is down already */
}

/* Appends one record to the write buffer (writing it out first where it would not fit, and
 * moving to the next extent where the extent is full); a large object goes in pieces, straight
 * from its memory where that is page-aligned. Called with mu. */
int kvf__dk_append(kvf__disk *d, int type, uint64_t ns, const kvf_key *k, const void *data,
                   uint64_t len)
{
    if (d->st.down)
        return KVF_EIO;
    int large = type == REC_OBJECT && kvf__dk_rec_size(0, len) > 2 * PIECE;
    int direct = large && ((uintptr_t)data % BLK) == 0;
    uint64_t size = kvf__dk_rec_size(direct, len);
    if (size > d->ext_bytes - BLK)
        return KVF_EINVAL;
    if (d->wpos + size > d->ext_bytes) {
        int rc = next_extent(d);
        if (rc)
            return rc;
    }
    if (direct)
        return append_direct(d, ns, k, data, len);
    if (large)
        return append_large(d, ns, k, data, len);
    if (d->wlen + size > d->wcap) {
        int rc = kvf__dk_write_out(d);
        if (rc)
            return rc;
        if (size > d->wcap) {
            uint8_t *nb = kvf__dk_aligned(size);
            if (!nb)
                return KVF_ENOMEM;
            free(d->wbuf);
            d->wbuf = nb;
            d->wcap = size;
        }
    }
    if (d->npend == d->cpend) {
        size_t nc = d->cpend ? d->cpend * 2 : 64;
        struct pend *np = realloc(d->pend, nc * sizeof *np);
        if (!np)
            return KVF_ENOMEM;
        d->pend = np;
        d->cpend = nc;
    }
    uint8_t *r = d->wbuf + d->wlen;
    uint64_t seq = d->seq++;
    hdr_write(r, type, REC_PACKED, seq, ns, k ? k->lo : 0, k ? k->hi : 0, len,
              len ? XXH3_64bits(data, len) : 0);
    if (len)
        memcpy(r + HDR_LEN, data, len);
    memset(r + HDR_LEN + len, 0, size - HDR_LEN - len);
    d->pend[d->npend++] = (struct pend){.ns = ns,
                                        .lo = k ? k->lo : 0,
                                        .hi = k ? k->hi : 0,
                                        .off = kvf__dk_ext_off(d, d->cur) + d->wpos,
                                        .len = len,
                                        .seq = seq,
                                        .type = type};
    d->wlen += size;
    d->wpos += size;
    return 0;
}
