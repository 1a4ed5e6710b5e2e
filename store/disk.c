/*
 * The disk tier's storage engine (disk.h): a log of extents on one file or device, io_uring with
 * O_DIRECT, an in-memory index rebuilt from the records at open.
 */
#define _GNU_SOURCE
#include "disk.h"

#include "kvf/error.h"

#include "bytes.h"
#include "clock.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#define BLK        4096u
#define DATA_OFF   (1u << 20) /* the first extent's offset */
#define HDR_LEN    64u
#define SB_MAGIC   "KVFDISK1"
#define EXT_MAGIC  "KVFEXT01"
#define REC_MAGIC  0x5246564bu /* "KVFR" */
#define REC_OBJECT 1
#define REC_TOMB   2
#define REC_CLEAR  3
#define VERSION    1
#define WBUF_MIN   (4u << 20) /* the write buffer: records are written in runs this large */
#define SCAN_CHUNK (8u << 20) /* rebuild reads extents in pieces this large */
#define MAX_OBJECT (1ull << 32)
#define WSLOTS     4 /* a large record's pieces written at once (besides its first) */

typedef struct ent {
    uint64_t ns, lo, hi; /* (ns, key); lo == hi == ns == 0 and !used: an empty slot */
    uint64_t off;        /* the record's offset in the file */
    uint64_t len;        /* the object's bytes */
    uint64_t seq;
    uint32_t ext;
    uint8_t used, verified;
} ent;

struct kvf__disk {
    kvf__disk_opts o;
    int fd;
    struct io_uring ring;
    int ring_ok;
    uint32_t qd;      /* the ring's entries: reads in flight at most */
    XXH3_state_t *xs; /* a get's streaming checksum (under mu) */
    pthread_mutex_t mu;
    uint64_t size, n_ext, ext_bytes;
    uint8_t uuid[16];
    /* the index: open addressing, linear probing, tombstone-free (deletion by backward shift) */
    ent *tab;
    uint64_t cap, count, data_bytes;
    /* the log */
    uint64_t seq;  /* the next record's */
    uint64_t cur;  /* the extent written */
    uint64_t wpos; /* the next record's offset in it */
    uint64_t *gen; /* per extent: its generation (0: never opened) */
    uint8_t *wbuf; /* records not yet written, to go at (cur, wstart) */
    uint64_t wcap, wlen, wstart;
    uint8_t *rbuf; /* reads land here (kept: a fresh buffer a read costs its page faults) */
    uint64_t rcap;
    uint8_t *piece[WSLOTS + 1]; /* a large record's pieces in flight; [WSLOTS]: its first */
    struct pend {               /* the index entries of the records in wbuf */
        uint64_t ns, lo, hi, off, len, seq;
        int type;
    } * pend;
    size_t npend, cpend;
    kvf__disk_stats st;
};

/* ------------------------------------------------------------------------------------------ */
/* I/O */

static void go_down(kvf__disk *d, int e)
{
    if (!d->st.down)
        d->st.down = e ? e : EIO;
}

/* One read or write of len bytes at off through the ring, waited for; short transfers are
 * continued. Returns 0 or a negative errno. */
static int io(kvf__disk *d, int is_write, void *buf, uint64_t len, uint64_t off)
{
    if (d->o.fault) {
        int f = d->o.fault(d->o.fault_ud, is_write, off, len);
        if (f)
            return f < 0 ? f : -EIO;
    }
    uint64_t done = 0;
    while (done < len) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
        if (!sqe)
            return -EBUSY;
        unsigned n = (unsigned)(len - done > (1u << 30) ? (1u << 30) : len - done);
        if (is_write)
            io_uring_prep_write(sqe, d->fd, (uint8_t *)buf + done, n, off + done);
        else
            io_uring_prep_read(sqe, d->fd, (uint8_t *)buf + done, n, off + done);
        int rc = io_uring_submit(&d->ring);
        if (rc < 0)
            return rc;
        struct io_uring_cqe *cqe;
        do
            rc = io_uring_wait_cqe(&d->ring, &cqe);
        while (rc == -EINTR);
        if (rc < 0)
            return rc;
        int res = cqe->res;
        io_uring_cqe_seen(&d->ring, cqe);
        if (res < 0)
            return res;
        if (res == 0)
            return is_write ? -ENOSPC : -EIO; /* past the end: the file is shorter than sized */
        done += (uint64_t)res;
    }
    return 0;
}

#define PIECE (2u << 20) /* a large object is read in pieces of this, several in flight */

/* Reads len bytes at off into buf in pieces of PIECE, as many in flight as the ring holds, and
 * hands each piece to each() in order as soon as it and those before it have landed: the
 * caller's work on a piece (a checksum, a copy) overlaps the reads of the next ones. Returns 0
 * or a negative errno. */
static int io_pieces(kvf__disk *d, uint8_t *buf, uint64_t len, uint64_t off,
                     void (*each)(void *ud, const uint8_t *p, uint64_t from, uint64_t n), void *ud)
{
    if (d->o.fault) {
        int f = d->o.fault(d->o.fault_ud, 0, off, len);
        if (f)
            return f < 0 ? f : -EIO;
    }
    uint64_t n = (len + PIECE - 1) / PIECE, next_sub = 0, next_done = 0, inflight = 0;
    uint8_t landed[512];
    if (n > sizeof landed)
        return -E2BIG;
    memset(landed, 0, (size_t)n);
    int err = 0;
    while (next_done < n) {
        while (!err && next_sub < n && inflight < d->qd) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(&d->ring);
            if (!sqe)
                break;
            uint64_t from = next_sub * PIECE, k = len - from < PIECE ? len - from : PIECE;
            io_uring_prep_read(sqe, d->fd, buf + from, (unsigned)k, off + from);
            io_uring_sqe_set_data64(sqe, next_sub);
            next_sub++;
            inflight++;
        }
        int rc = io_uring_submit(&d->ring);
        if (rc < 0)
            err = err ? err : rc;
        if (!inflight)
            break;
        struct io_uring_cqe *cqe;
        do
            rc = io_uring_wait_cqe(&d->ring, &cqe);
        while (rc == -EINTR);
        if (rc < 0)
            return rc; /* the ring itself failed: nothing more can be trusted */
        uint64_t i = io_uring_cqe_get_data64(cqe);
        uint64_t want = len - i * PIECE < PIECE ? len - i * PIECE : PIECE;
        if (cqe->res < 0)
            err = err ? err : cqe->res;
        else if ((uint64_t)cqe->res != want)
            err = err ? err : -EIO; /* short: past the end */
        io_uring_cqe_seen(&d->ring, cqe);
        inflight--;
        if (i < n)
            landed[i] = 1;
        while (!err && next_done < n && landed[next_done]) {
            uint64_t from = next_done * PIECE, k = len - from < PIECE ? len - from : PIECE;
            each(ud, buf + from, from, k);
            next_done++;
        }
        if (err && !inflight)
            break;
    }
    return err;
}

static void *aligned(uint64_t len)
{
    void *p = NULL;
    return posix_memalign(&p, BLK, len ? len : BLK) ? NULL : p;
}

static uint64_t align_up(uint64_t v)
{
    return (v + BLK - 1) / BLK * BLK;
}

static uint64_t ext_off(const kvf__disk *d, uint64_t e)
{
    return DATA_OFF + e * d->ext_bytes;
}

/* ------------------------------------------------------------------------------------------ */
/* The index */

static uint64_t slot_of(const kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi)
{
    uint64_t h = lo ^ (hi * 0x9E3779B97F4A7C15ull) ^ (ns * 0xC2B2AE3D27D4EB4Full);
    h ^= h >> 29;
    return h & (d->cap - 1);
}

static ent *find(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi)
{
    for (uint64_t i = slot_of(d, ns, lo, hi);; i = (i + 1) & (d->cap - 1)) {
        ent *e = &d->tab[i];
        if (!e->used)
            return NULL;
        if (e->ns == ns && e->lo == lo && e->hi == hi)
            return e;
    }
}

static void erase(kvf__disk *d, ent *e)
{
    d->count--;
    d->data_bytes -= e->len;
    uint64_t i = (uint64_t)(e - d->tab);
    /* backward-shift deletion: the entries after it that probed past it move up */
    for (uint64_t j = (i + 1) & (d->cap - 1);; j = (j + 1) & (d->cap - 1)) {
        ent *x = &d->tab[j];
        if (!x->used)
            break;
        uint64_t home = slot_of(d, x->ns, x->lo, x->hi);
        if (((j - home) & (d->cap - 1)) >= ((j - i) & (d->cap - 1))) {
            d->tab[i] = *x;
            i = j;
        }
    }
    memset(&d->tab[i], 0, sizeof d->tab[i]);
}

static int grow(kvf__disk *d)
{
    uint64_t ncap = d->cap ? d->cap * 2 : 1024;
    ent *old = d->tab, *nt = calloc(ncap, sizeof *nt);
    if (!nt)
        return -1;
    uint64_t ocap = d->cap;
    d->tab = nt;
    d->cap = ncap;
    for (uint64_t i = 0; i < ocap; i++)
        if (old[i].used) {
            uint64_t j = slot_of(d, old[i].ns, old[i].lo, old[i].hi);
            while (nt[j].used)
                j = (j + 1) & (ncap - 1);
            nt[j] = old[i];
        }
    free(old);
    return 0;
}

/* Indexes an object record (a later sequence replaces an earlier). */
static int set(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi, uint64_t off, uint64_t len,
               uint64_t seq)
{
    if ((d->count + 1) * 10 >= d->cap * 7 && grow(d) != 0)
        return -1;
    ent *e = find(d, ns, lo, hi);
    if (e) {
        if (e->seq > seq)
            return 0;
        d->data_bytes -= e->len;
    } else {
        uint64_t i = slot_of(d, ns, lo, hi);
        while (d->tab[i].used)
            i = (i + 1) & (d->cap - 1);
        e = &d->tab[i];
        d->count++;
    }
    *e = (ent){.ns = ns,
               .lo = lo,
               .hi = hi,
               .off = off,
               .len = len,
               .seq = seq,
               .ext = (uint32_t)((off - DATA_OFF) / d->ext_bytes),
               .used = 1};
    d->data_bytes += len;
    return 0;
}

static void drop_key(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi, uint64_t seq)
{
    ent *e = find(d, ns, lo, hi);
    if (e && e->seq < seq)
        erase(d, e);
}

/* Every entry matching (ns, ext) (ext UINT64_MAX: any; all_ns: any namespace) goes. */
static uint64_t drop_where(kvf__disk *d, int all_ns, uint64_t ns, uint64_t ext, uint64_t below)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < d->cap;) {
        ent *e = &d->tab[i];
        if (e->used && (all_ns || e->ns == ns) && (ext == UINT64_MAX || e->ext == ext) &&
            e->seq < below) {
            erase(d, e); /* the slot now holds a shifted entry, or is empty: look again */
            n++;
            continue;
        }
        i++;
    }
    return n;
}

/* ------------------------------------------------------------------------------------------ */
/* Records */

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

typedef struct rec {
    int type;
    uint64_t seq, ns, lo, hi, len, data_xxh;
} rec;

/* Whether h is a record header that checks. */
static int hdr_read(const uint8_t *h, rec *r)
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
    uint8_t *b = aligned(BLK);
    if (!b)
        return -ENOMEM;
    memset(b, 0, BLK);
    memcpy(b, EXT_MAGIC, 8);
    kvf__put_u64(b + 8, gen);
    kvf__put_u64(b + 16, e);
    memcpy(b + 24, d->uuid, 16);
    kvf__put_u64(b + 40, XXH3_64bits(b, 40));
    int rc = io(d, 1, b, BLK, ext_off(d, e));
    free(b);
    return rc;
}

/* Writes the buffered records and indexes them. Called with mu. */
static int write_out(kvf__disk *d)
{
    if (!d->wlen)
        return 0;
    int rc = io(d, 1, d->wbuf, d->wlen, ext_off(d, d->cur) + d->wstart);
    if (rc) {
        go_down(d, -rc);
        d->npend = 0;
        d->wlen = 0;
        return KVF_EIO;
    }
    for (size_t i = 0; i < d->npend; i++) {
        struct pend *p = &d->pend[i];
        if (p->type == REC_OBJECT) {
            if (set(d, p->ns, p->lo, p->hi, p->off, p->len, p->seq) != 0) {
                go_down(d, ENOMEM);
                return KVF_EIO;
            }
        } else if (p->type == REC_TOMB) {
            drop_key(d, p->ns, p->lo, p->hi, p->seq);
        } else {
            d->st.cleared += drop_where(d, 0, p->ns, UINT64_MAX, p->seq);
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
    int rc = write_out(d);
    if (rc)
        return rc;
    uint64_t e = (d->cur + 1) % d->n_ext;
    if (d->gen[e]) {
        d->st.extents_reused++;
        d->st.dropped_by_reuse += drop_where(d, 1, 0, e, UINT64_MAX);
    }
    uint64_t gen = d->seq++;
    int w = ext_header_write(d, e, gen);
    if (w) {
        go_down(d, -w);
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
    int rc = write_out(d);
    if (rc)
        return rc;
    for (int i = 0; i <= WSLOTS; i++)
        if (!d->piece[i] && !(d->piece[i] = aligned(PIECE)))
            return KVF_ENOMEM;
    uint64_t size = align_up(HDR_LEN + len), base = ext_off(d, d->cur) + d->wpos;
    uint64_t n = (size + PIECE - 1) / PIECE, seq = d->seq++;
    if (d->o.fault) {
        int f = d->o.fault(d->o.fault_ud, 1, base, size);
        if (f) {
            go_down(d, f < 0 ? -f : EIO);
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
        go_down(d, -err);
        return KVF_EIO;
    }
    if (set(d, ns, k->lo, k->hi, base, len, seq) != 0) {
        go_down(d, ENOMEM);
        return KVF_EIO;
    }
    d->wpos += size;
    d->wstart = d->wpos;
    return 0;
}

/* Appends one record to the write buffer (writing it out first where it would not fit, and
 * moving to the next extent where the extent is full). Called with mu. */
static int append(kvf__disk *d, int type, uint64_t ns, const kvf_key *k, const void *data,
                  uint64_t len)
{
    if (d->st.down)
        return KVF_EIO;
    uint64_t size = align_up(HDR_LEN + len);
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
        int rc = write_out(d);
        if (rc)
            return rc;
        if (size > d->wcap) {
            uint8_t *nb = aligned(size);
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
                                        .off = ext_off(d, d->cur) + d->wpos,
                                        .len = len,
                                        .seq = seq,
                                        .type = type};
    d->wlen += size;
    d->wpos += size;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Open: format or rebuild */

static int sb_write(kvf__disk *d)
{
    uint8_t *b = aligned(BLK);
    if (!b)
        return -ENOMEM;
    memset(b, 0, BLK);
    memcpy(b, SB_MAGIC, 8);
    kvf__put_u32(b + 8, VERSION);
    kvf__put_u32(b + 12, BLK);
    kvf__put_u64(b + 16, d->ext_bytes);
    kvf__put_u64(b + 24, d->n_ext);
    kvf__put_u64(b + 32, DATA_OFF);
    memcpy(b + 40, d->uuid, 16);
    kvf__put_u64(b + 56, XXH3_64bits(b, 56));
    int rc = io(d, 1, b, BLK, 0);
    free(b);
    return rc;
}

/* Reads the superblock: 1 when it is ours with this geometry, 0 when not (format), < 0 on I/O
 * errors. */
static int sb_read(kvf__disk *d)
{
    uint8_t *b = aligned(BLK);
    if (!b)
        return -ENOMEM;
    int rc = io(d, 0, b, BLK, 0);
    if (!rc) {
        rc = !memcmp(b, SB_MAGIC, 8) && kvf__get_u64(b + 56) == XXH3_64bits(b, 56) &&
             kvf__get_u32(b + 8) == VERSION && kvf__get_u32(b + 12) == BLK &&
             kvf__get_u64(b + 16) == d->ext_bytes && kvf__get_u64(b + 24) == d->n_ext &&
             kvf__get_u64(b + 32) == DATA_OFF;
        if (rc)
            memcpy(d->uuid, b + 40, 16);
    }
    free(b);
    return rc;
}

static int format(kvf__disk *d)
{
    if (getrandom(d->uuid, sizeof d->uuid, 0) != (ssize_t)sizeof d->uuid)
        return -EIO;
    /* every extent header made invalid first: nothing of an earlier life is read as current */
    uint8_t *z = aligned(BLK);
    if (!z)
        return -ENOMEM;
    memset(z, 0, BLK);
    int rc = 0;
    for (uint64_t e = 0; e < d->n_ext && !rc; e++)
        rc = io(d, 1, z, BLK, ext_off(d, e));
    free(z);
    if (!rc)
        rc = sb_write(d);
    if (!rc)
        rc = fdatasync(d->fd) ? -errno : 0;
    return rc;
}

typedef struct ext_order {
    uint64_t gen, e;
} ext_order;

static int by_gen(const void *a, const void *b)
{
    const ext_order *x = a, *y = b;
    return x->gen < y->gen ? -1 : x->gen > y->gen;
}

/* Scans extent e (generation gen) and applies its records in order; *end gets the offset after
 * its last valid record. Returns 0 or a negative errno. */
static int scan_extent(kvf__disk *d, uint64_t e, uint64_t gen, uint8_t *buf, uint64_t *end,
                       uint64_t *max_seq)
{
    uint64_t pos = BLK, last = gen, base = ext_off(d, e);
    uint64_t have_from = 0, have_len = 0; /* buf holds the extent's [have_from, +have_len) */
    for (;;) {
        if (pos + BLK > d->ext_bytes)
            break;
        if (pos < have_from || pos + HDR_LEN > have_from + have_len) {
            uint64_t n = d->ext_bytes - pos < SCAN_CHUNK ? d->ext_bytes - pos : SCAN_CHUNK;
            int rc = io(d, 0, buf, n, base + pos);
            if (rc)
                return rc;
            have_from = pos;
            have_len = n;
        }
        rec r;
        if (!hdr_read(buf + (pos - have_from), &r) || r.seq <= last || r.seq < gen)
            break; /* the end of this extent's life: a torn header, or an earlier life's */
        uint64_t size = align_up(HDR_LEN + r.len);
        if (pos + size > d->ext_bytes)
            break;
        last = r.seq;
        if (r.type == REC_OBJECT) {
            if (set(d, r.ns, r.lo, r.hi, base + pos, r.len, r.seq) != 0)
                return -ENOMEM;
        } else if (r.type == REC_TOMB) {
            drop_key(d, r.ns, r.lo, r.hi, r.seq);
        } else {
            drop_where(d, 0, r.ns, UINT64_MAX, r.seq);
        }
        pos += size;
    }
    *end = pos;
    if (last > *max_seq)
        *max_seq = last;
    return 0;
}

static int rebuild(kvf__disk *d)
{
    uint8_t *hb = aligned(BLK), *buf = aligned(SCAN_CHUNK);
    ext_order *ord = calloc(d->n_ext, sizeof *ord);
    int rc = hb && buf && ord ? 0 : -ENOMEM;
    uint64_t n = 0;
    for (uint64_t e = 0; e < d->n_ext && !rc; e++) {
        rc = io(d, 0, hb, BLK, ext_off(d, e));
        if (!rc && !memcmp(hb, EXT_MAGIC, 8) && kvf__get_u64(hb + 40) == XXH3_64bits(hb, 40) &&
            kvf__get_u64(hb + 16) == e && !memcmp(hb + 24, d->uuid, 16) && kvf__get_u64(hb + 8))
            ord[n++] = (ext_order){.gen = kvf__get_u64(hb + 8), .e = e};
    }
    qsort(ord, n, sizeof *ord, by_gen);
    uint64_t max_seq = 0, end = BLK;
    for (uint64_t i = 0; i < n && !rc; i++) {
        d->gen[ord[i].e] = ord[i].gen;
        rc = scan_extent(d, ord[i].e, ord[i].gen, buf, &end, &max_seq);
    }
    if (!rc) {
        d->seq = max_seq + 1;
        if (n) { /* go on writing after the newest extent's last record */
            d->cur = ord[n - 1].e;
            d->wpos = d->wstart = end;
        } else {
            d->cur = d->n_ext - 1; /* the first write opens extent 0 */
            d->wpos = d->wstart = d->ext_bytes;
        }
    }
    free(hb);
    free(buf);
    free(ord);
    return rc;
}

int kvf__disk_open(kvf__disk **out, const kvf__disk_opts *o, char *err, size_t errlen)
{
    *out = NULL;
    uint64_t eb = o->extent_bytes ? o->extent_bytes : 64ull << 20;
    if (!o->path || eb % BLK || eb < (1u << 20)) {
        snprintf(err, errlen, "disk tier: a path, and extents of 1 MiB or more in 4 KiB units");
        return KVF_EINVAL;
    }
    kvf__disk *d = calloc(1, sizeof *d);
    if (!d)
        return KVF_ENOMEM;
    d->o = *o;
    d->ext_bytes = eb;
    pthread_mutex_init(&d->mu, NULL);
    d->fd = open(o->path, O_RDWR | O_CREAT | O_DIRECT | O_CLOEXEC, 0600);
    int rc = 0;
    struct stat sb;
    if (d->fd < 0 || fstat(d->fd, &sb) != 0) {
        snprintf(err, errlen, "disk tier %s: %s%s", o->path, strerror(errno),
                 errno == EINVAL ? " (O_DIRECT: the file system does not take it; tmpfs does "
                                   "not)"
                                 : "");
        rc = KVF_EIO;
        goto fail;
    }
    uint64_t size = o->size;
    if (S_ISBLK(sb.st_mode)) {
        uint64_t dev = 0;
        if (ioctl(d->fd, BLKGETSIZE64, &dev) != 0)
            dev = 0;
        if (!size || size > dev)
            size = dev;
    } else if (!size) {
        snprintf(err, errlen, "disk tier %s: a file needs a size", o->path);
        rc = KVF_EINVAL;
        goto fail;
    } else {
        int e = posix_fallocate(d->fd, 0, (off_t)size);
        if (e) {
            snprintf(err, errlen, "disk tier %s: cannot hold %llu bytes: %s", o->path,
                     (unsigned long long)size, strerror(e));
            rc = KVF_EIO;
            goto fail;
        }
    }
    if (size < DATA_OFF + 2 * eb) {
        snprintf(err, errlen, "disk tier %s: %llu bytes hold fewer than 2 extents of %llu", o->path,
                 (unsigned long long)size, (unsigned long long)eb);
        rc = KVF_EINVAL;
        goto fail;
    }
    d->size = size;
    d->n_ext = (size - DATA_OFF) / eb;
    d->qd = o->queue_depth ? o->queue_depth : 32;
    int ur = io_uring_queue_init(d->qd, &d->ring, 0);
    if (ur < 0) {
        snprintf(err, errlen, "disk tier %s: io_uring: %s", o->path, strerror(-ur));
        rc = KVF_EINFEASIBLE;
        goto fail;
    }
    d->ring_ok = 1;
    d->gen = calloc(d->n_ext, sizeof *d->gen);
    d->wcap = WBUF_MIN;
    d->wbuf = aligned(d->wcap);
    d->xs = XXH3_createState();
    if (!d->gen || !d->wbuf || !d->xs || grow(d) != 0) {
        rc = KVF_ENOMEM;
        goto fail;
    }
    uint64_t t0 = kvf__now_ns();
    int s = sb_read(d);
    int ir = s < 0 ? s : s == 0 ? format(d) : 0;
    if (!ir)
        ir = rebuild(d);
    if (ir) {
        snprintf(err, errlen, "disk tier %s: %s", o->path, strerror(-ir));
        rc = ir == -ENOMEM ? KVF_ENOMEM : KVF_EIO;
        goto fail;
    }
    d->st.rebuilt_entries = d->count;
    d->st.rebuild_seconds = (double)(kvf__now_ns() - t0) / 1e9;
    *out = d;
    return 0;
fail:
    kvf__disk_close(&d);
    return rc;
}

void kvf__disk_close(kvf__disk **pd)
{
    kvf__disk *d = *pd;
    if (!d)
        return;
    if (d->ring_ok) {
        pthread_mutex_lock(&d->mu);
        if (!d->st.down)
            write_out(d);
        pthread_mutex_unlock(&d->mu);
        io_uring_queue_exit(&d->ring);
    }
    if (d->fd >= 0)
        close(d->fd);
    pthread_mutex_destroy(&d->mu);
    free(d->tab);
    free(d->gen);
    free(d->wbuf);
    free(d->rbuf);
    free(d->pend);
    if (d->xs)
        XXH3_freeState(d->xs);
    for (int i = 0; i <= WSLOTS; i++)
        free(d->piece[i]);
    free(d);
    *pd = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Operations */

int kvf__disk_put(kvf__disk *d, uint64_t ns, const kvf_key *key, const void *data, uint64_t len)
{
    pthread_mutex_lock(&d->mu);
    int rc = append(d, REC_OBJECT, ns, key, data, len);
    if (!rc) {
        d->st.puts++;
        d->st.put_bytes += len;
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int kvf__disk_flush(kvf__disk *d)
{
    pthread_mutex_lock(&d->mu);
    int rc = d->st.down ? KVF_EIO : write_out(d);
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int kvf__disk_remove(kvf__disk *d, uint64_t ns, const kvf_key *key)
{
    pthread_mutex_lock(&d->mu);
    int rc = d->st.down ? KVF_EIO : find(d, ns, key->lo, key->hi) ? 0 : KVF_ENOENT;
    if (!rc)
        rc = append(d, REC_TOMB, ns, key, NULL, 0);
    if (!rc)
        rc = write_out(d);
    if (!rc)
        d->st.removed++;
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int64_t kvf__disk_clear(kvf__disk *d, uint64_t ns)
{
    pthread_mutex_lock(&d->mu);
    uint64_t before = d->st.cleared;
    int rc = d->st.down ? KVF_EIO : append(d, REC_CLEAR, ns, NULL, NULL, 0);
    if (!rc)
        rc = write_out(d);
    int64_t n = rc ? -(int64_t)KVF_EIO : (int64_t)(d->st.cleared - before);
    pthread_mutex_unlock(&d->mu);
    return n;
}

int kvf__disk_contains(kvf__disk *d, uint64_t ns, const kvf_key *key, uint64_t *len)
{
    pthread_mutex_lock(&d->mu);
    ent *e = d->st.down ? NULL : find(d, ns, key->lo, key->hi);
    if (e && len)
        *len = e->len;
    pthread_mutex_unlock(&d->mu);
    return e != NULL;
}

/* A get's work on each piece of its record: the data's part hashed and copied to the caller. */
struct get_ctx {
    XXH3_state_t *xs;
    uint8_t *out;
    uint64_t len;
};

static void get_piece(void *ud, const uint8_t *p, uint64_t from, uint64_t n)
{
    struct get_ctx *g = ud;
    uint64_t a = from < HDR_LEN ? HDR_LEN : from, b = from + n;
    if (b > HDR_LEN + g->len)
        b = HDR_LEN + g->len; /* the padding after the data */
    if (a >= b)
        return;
    XXH3_64bits_update(g->xs, p + (a - from), b - a);
    memcpy(g->out + (a - HDR_LEN), p + (a - from), b - a);
}

int kvf__disk_get(kvf__disk *d, uint64_t ns, const kvf_key *key, void *buf, uint64_t cap,
                  uint64_t *len)
{
    pthread_mutex_lock(&d->mu);
    int rc = 0;
    uint8_t *rb = NULL;
    ent *e = d->st.down ? NULL : find(d, ns, key->lo, key->hi);
    if (d->st.down) {
        rc = KVF_EIO;
        goto out;
    }
    d->st.gets++;
    if (!e) {
        d->st.misses++;
        rc = KVF_ENOENT;
        goto out;
    }
    *len = e->len;
    if (e->len > cap) {
        rc = KVF_EOVERFLOW;
        goto out;
    }
    uint64_t size = align_up(HDR_LEN + e->len);
    if (size > d->rcap) {
        uint8_t *nb = aligned(size);
        if (!nb) {
            rc = KVF_ENOMEM;
            goto out;
        }
        free(d->rbuf);
        d->rbuf = nb;
        d->rcap = size;
    }
    rb = d->rbuf;
    /* the data's checksum and its copy out, piece by piece as the pieces land */
    struct get_ctx g = {.xs = d->xs, .out = buf, .len = e->len};
    XXH3_64bits_reset(g.xs);
    int r = io_pieces(d, rb, size, e->off, get_piece, &g);
    if (r) {
        go_down(d, -r);
        rc = KVF_EIO;
        goto out;
    }
    rec h;
    if (!hdr_read(rb, &h) || h.type != REC_OBJECT || h.seq != e->seq || h.ns != ns ||
        h.lo != key->lo || h.hi != key->hi || h.len != e->len ||
        XXH3_64bits_digest(g.xs) != h.data_xxh) {
        /* written torn, or changed since: a miss, and gone */
        d->st.verify_failures++;
        d->st.misses++;
        erase(d, e);
        rc = KVF_ENOENT;
        goto out;
    }
    e->verified = 1; /* copied out as it landed: now known good */
    d->st.get_bytes += h.len;
out:
    pthread_mutex_unlock(&d->mu);
    return rc;
}

void kvf__disk_stats_get(kvf__disk *d, kvf__disk_stats *st)
{
    pthread_mutex_lock(&d->mu);
    *st = d->st;
    st->bytes = d->size;
    st->extents = d->n_ext;
    st->extent_bytes = d->ext_bytes;
    st->entries = d->count;
    st->entry_bytes = d->data_bytes;
    pthread_mutex_unlock(&d->mu);
}
