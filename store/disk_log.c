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

static void hdr_write(uint8_t *h, int type, uint64_t seq, uint64_t ns, uint64_t lo, uint64_t hi,
                      uint64_t len, uint64_t data_xxh)
{
    memset(h, 0, HDR_LEN);
    kvf__put_u32(h, REC_MAGIC);
    h[4] = (uint8_t)type;
    h[5] = VERSION;
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
    if (kvf__get_u32(h) != REC_MAGIC || h[5] != VERSION ||
        kvf__get_u64(h + 56) != XXH3_64bits(h, 56))
        return 0;
    *r = (rec){.type = h[4],
               .seq = kvf__get_u64(h + 8),
               .ns = kvf__get_u64(h + 16),
               .lo = kvf__get_u64(h + 24),
               .hi = kvf__get_u64(h + 32),
               .len = kvf__get_u64(h + 40),
               .data_xxh = kvf__get_u64(h + 48)};
    return r->type >= REC_OBJECT && r->type <= REC_CLEAR && r->len < MAX_OBJECT;
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

/* Writes the buffered records and indexes them. Called with mu. */
int kvf__dk_write_out(kvf__disk *d)
{
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
            if (kvf__dk_set(d, p->ns, p->lo, p->hi, p->off, p->len, p->seq) != 0) {
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

/* Waits for one write of a large record; its slot goes back on the free list. Returns 0 or a
 * negative errno. */
static int wait_piece(kvf__disk *d, int *free_slots, int *nfree, int *inflight)
{
    struct io_uring_cqe *cqe;
    int rc;
    do
        rc = io_uring_wait_cqe(&d->ring, &cqe);
    while (rc == -EINTR);
    if (rc < 0)
        return rc;
    uint64_t v = io_uring_cqe_get_data64(cqe);
    int res = cqe->res;
    io_uring_cqe_seen(&d->ring, cqe);
    (*inflight)--;
    if ((v >> 32) < WSLOTS)
        free_slots[(*nfree)++] = (int)(v >> 32);
    if (res < 0)
        return res;
    return (uint64_t)res == (v & 0xffffffffu) ? 0 : -ENOSPC;
}

/* An object too large for the write buffer, written in pieces: each piece copied and hashed, and
 * written while the next is prepared; the first piece, which holds the header (it needs the
 * data's checksum), last. The record is indexed once every piece is written. Called with mu,
 * with the record fitting in the current extent. */
static int append_large(kvf__disk *d, uint64_t ns, const kvf_key *k, const uint8_t *data,
                        uint64_t len)
{
    int rc = kvf__dk_write_out(d);
    if (rc)
        return rc;
    for (int i = 0; i <= WSLOTS; i++)
        if (!d->piece[i] && !(d->piece[i] = kvf__dk_aligned(PIECE)))
            return KVF_ENOMEM;
    uint64_t size = kvf__dk_align_up(HDR_LEN + len), base = kvf__dk_ext_off(d, d->cur) + d->wpos;
    uint64_t n = (size + PIECE - 1) / PIECE, seq = d->seq++;
    if (d->o.fault) {
        int f = d->o.fault(d->o.fault_ud, 1, base, size);
        if (f) {
            kvf__dk_go_down(d, f < 0 ? -f : EIO);
            return KVF_EIO;
        }
    }
    XXH3_64bits_reset(d->xs);
    int free_slots[WSLOTS], nfree = WSLOTS, inflight = 0, err = 0;
    for (int i = 0; i < WSLOTS; i++)
        free_slots[i] = i;
    for (uint64_t i = 0; i < n && !err; i++) {
        uint64_t from = i * PIECE, kk = size - from < PIECE ? size - from : PIECE;
        if (i && !nfree)
            err = wait_piece(d, free_slots, &nfree, &inflight);
        if (err)
            break;
        int slot = i ? free_slots[--nfree] : WSLOTS;
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
        if (!i)
            continue; /* the first piece waits for the checksum */
        struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
        if (!sqe) {
            err = -EBUSY;
            break;
        }
        io_uring_prep_write(sqe, d->fd, b, (unsigned)kk, base + from);
        io_uring_sqe_set_data64(sqe, (uint64_t)slot << 32 | kk);
        inflight++;
        int s2 = io_uring_submit(&d->ring);
        if (s2 < 0)
            err = s2;
    }
    if (!err) {
        uint8_t *b = d->piece[WSLOTS];
        uint64_t kk = size < PIECE ? size : PIECE;
        hdr_write(b, REC_OBJECT, seq, ns, k->lo, k->hi, len, XXH3_64bits_digest(d->xs));
        struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
        if (!sqe) {
            err = -EBUSY;
        } else {
            io_uring_prep_write(sqe, d->fd, b, (unsigned)kk, base);
            io_uring_sqe_set_data64(sqe, (uint64_t)WSLOTS << 32 | kk);
            inflight++;
            int s2 = io_uring_submit(&d->ring);
            if (s2 < 0)
                err = s2;
        }
    }
    while (inflight) {
        int w = wait_piece(d, free_slots, &nfree, &inflight);
        if (w == -EBUSY || (w < 0 && !inflight && err))
            break;
        if (w && !err)
            err = w;
    }
    if (err) {
        kvf__dk_go_down(d, -err);
        return KVF_EIO;
    }
    if (kvf__dk_set(d, ns, k->lo, k->hi, base, len, seq) != 0) {
        kvf__dk_go_down(d, ENOMEM);
        return KVF_EIO;
    }
    d->wpos += size;
    d->wstart = d->wpos;
    return 0;
}

/* Appends one record to the write buffer (writing it out first where it would not fit, and
 * moving to the next extent where the extent is full). Called with mu. */
int kvf__dk_append(kvf__disk *d, int type, uint64_t ns, const kvf_key *k, const void *data,
                   uint64_t len)
{
    if (d->st.down)
        return KVF_EIO;
    uint64_t size = kvf__dk_align_up(HDR_LEN + len);
    if (size > d->ext_bytes - BLK)
        return KVF_EINVAL;
    if (d->wpos + size > d->ext_bytes) {
        int rc = next_extent(d);
        if (rc)
            return rc;
    }
    if (type == REC_OBJECT && size > 2 * PIECE)
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
    hdr_write(r, type, seq, ns, k ? k->lo : 0, k ? k->hi : 0, len,
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
