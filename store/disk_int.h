/*
 * The disk tier's storage engine inside (disk.h is its interface): the on-disk constants, the
 * engine's state, and what its files share. disk_io.c: reads and writes through io_uring;
 * disk_index.c: the in-memory index; disk_log.c: records and the log they are appended to;
 * disk.c: open (format, rebuild), close and the operations. Everything here is called with the
 * engine's mutex held (mu, which the writes hold through their I/O), but the gets: a get asks the
 * index under imu (a second mutex, held only for the index's changes, which take mu too, and for
 * lookups), reads under one of RSLOTS read slots alone, and checks what it read against the
 * record's header (sequence, key, length, checksum), so that it never waits behind a write and
 * several gets read at once; only a read that failed or did not check takes mu (to take the
 * device down or drop the record, if the index still names that one).
 */
#ifndef KVF_STORE_DISK_INT_H
#define KVF_STORE_DISK_INT_H

#include "disk.h"

#include <liburing.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
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
/* A record header's version says where its data begins: 1, right after the 64-byte header (the
 * records the write buffer gathers, and large ones copied in pieces); 2, at the record's second
 * 4 KiB block (large objects written straight from page-aligned memory, with no copy:
 * append_direct) */
#define REC_PACKED 1
#define REC_PAGED  2
#define WBUF_MIN   (4u << 20) /* the write buffer: records are written in runs this large */
#define SCAN_CHUNK (8u << 20) /* rebuild reads extents in pieces this large */
#define MAX_OBJECT (1ull << 32)
#define WSLOTS     4 /* a large record's pieces written at once (besides its first) */
/* the large records' piece buffers: the next record's first pieces are made while the last
 * pieces of the one before are still being written */
#define LSLOTS (WSLOTS + 2)
#define RSLOTS 4 /* gets that read at once */

typedef struct ent {
    uint64_t ns, lo, hi; /* (ns, key); lo == hi == ns == 0 and !used: an empty slot */
    uint64_t off;        /* the record's offset in the file */
    uint64_t len;        /* the object's bytes */
    uint64_t seq;
    uint32_t ext;
    uint8_t used;
    uint8_t reads; /* times read back since open (saturating): kvf__disk_note_read */
    uint8_t paged; /* its data at the record's second block (REC_PAGED) */
} ent;

struct kvf__disk {
    kvf__disk_opts o;
    int fd;
    struct io_uring ring; /* writes and the open's reads (under mu) */
    int ring_ok;
    uint32_t qd;      /* the ring's entries: reads in flight at most */
    XXH3_state_t *xs; /* a large write's streaming checksum (under mu) */
    pthread_mutex_t mu;
    pthread_mutex_t imu; /* the index's changes (under mu too) and kvf__disk_contains */
    uint64_t size, n_ext, ext_bytes;
    uint8_t uuid[16];
    /* why an existing file was formatted anew at open ("": it was not, or it held nothing) */
    char note[200];
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
    /* gets' reads, each under its slot's lock alone (never mu): its ring, checksum state and
     * buffer (kept: a fresh buffer costs its page faults) */
    struct rslot {
        pthread_mutex_t mu;
        struct io_uring ring;
        int ring_ok;
        XXH3_state_t *xs;
        uint8_t *buf;
        uint64_t cap;
    } rs[RSLOTS];
    unsigned rnext; /* the slot the next get tries first (atomic) */
    /* large records' pieces (append_large): the buffers, those free, which record each write in
     * flight is of, and the records written and not yet indexed (two at most: the one being
     * made and the one before, whose last pieces may still be in flight) */
    uint8_t *piece[LSLOTS];
    int pfree[LSLOTS], npfree, powner[LSLOTS];
    unsigned pinflight;
    struct lrec {
        uint64_t ns, lo, hi, off, len, seq;
        int left, err, used, paged;
    } lrec[2];
    struct pend { /* the index entries of the records in wbuf */
        uint64_t ns, lo, hi, off, len, seq;
        int type;
    } * pend;
    size_t npend, cpend;
    kvf__disk_stats st;
    /* the gets' counters (kvf__disk_stats' gets, misses, get_bytes, get_reads), kept apart and
     * only touched atomically: a get that hits takes neither mu nor imu to count */
    uint64_t r_gets, r_misses, r_bytes, r_reads;
    /* kvf__disk_set_drop_hook (NULL while the index is rebuilt at open) */
    void (*on_drop)(void *ud, uint64_t ns, const kvf_key *key);
    void *drop_ud;
};

#define PIECE (2u << 20) /* a large object is read and written in pieces of this */

/* A record header, read (kvf__dk_hdr_read). */
typedef struct rec {
    int type;
    uint64_t seq, ns, lo, hi, len, data_xxh;
    uint64_t doff; /* where its data begins in the record: HDR_LEN, or BLK (REC_PAGED) */
} rec;

static inline void *kvf__dk_aligned(uint64_t len)
{
    void *p = NULL;
    return posix_memalign(&p, BLK, len ? len : BLK) ? NULL : p;
}

static inline uint64_t kvf__dk_align_up(uint64_t v)
{
    return (v + BLK - 1) / BLK * BLK;
}

/* The bytes a record of len data bytes takes on disk, its data at HDR_LEN or (paged) at BLK. */
static inline uint64_t kvf__dk_rec_size(int paged, uint64_t len)
{
    return kvf__dk_align_up((paged ? BLK : HDR_LEN) + len);
}

static inline uint64_t kvf__dk_ext_off(const kvf__disk *d, uint64_t e)
{
    return DATA_OFF + e * d->ext_bytes;
}

/* disk_io.c */
/* The tier goes down with errno e (the first one stays): every later call fails. */
void kvf__dk_go_down(kvf__disk *d, int e);
/* One read or write of len bytes at off, waited for; 0 or a negative errno. */
int kvf__dk_io(kvf__disk *d, int is_write, void *buf, uint64_t len, uint64_t off);
/* An each() for kvf__dk_io_pieces that does nothing with the pieces. */
void kvf__dk_nothing(void *ud, const uint8_t *p, uint64_t from, uint64_t n);
/* A read through ring in pieces, each handed to each() in order as it and those before it land. */
int kvf__dk_io_pieces(kvf__disk *d, struct io_uring *ring, uint8_t *buf, uint64_t len, uint64_t off,
                      void (*each)(void *ud, const uint8_t *p, uint64_t from, uint64_t n),
                      void *ud);
/* A request prepared on a ring and refused by the kernel becomes a no-op tagged KVF__DK_STRAY:
 * the next submission on the ring takes it (it stays in the ring's queue), harmlessly, and
 * kvf__dk_wait skips its completion. */
#define KVF__DK_STRAY UINT64_MAX
void kvf__dk_unsubmit(struct io_uring_sqe *sqe);
/* The ring's next completion that is not a stray no-op's (EINTR waited through); 0 or a
 * negative errno. */
int kvf__dk_wait(struct io_uring *ring, struct io_uring_cqe **cqe);
/* A read of len bytes at off into buf: one of the segments of kvf__dk_io_segs. */
typedef struct kvf__dk_seg {
    uint8_t *buf;
    uint64_t len, off;
} kvf__dk_seg;
/* kvf__dk_io_pieces over several segments read together, each() seeing them one after the
 * other (from counts through them all). */
int kvf__dk_io_segs(kvf__disk *d, struct io_uring *ring, const kvf__dk_seg *segs, size_t nsegs,
                    void (*each)(void *ud, const uint8_t *p, uint64_t from, uint64_t n), void *ud);

/* disk_index.c: (ns, key) -> the newest object record */
ent *kvf__dk_find(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi);
/* A read slot, locked, whose buffer holds size bytes at least; NULL when it cannot grow (no
 * memory). A free one where there is one, else the next in turn, waited for. */
struct rslot *kvf__dk_slot_take(kvf__disk *d, uint64_t size);
/* A record read back that did not check (written torn, or its extent reused since): a miss, and
 * gone from the index if it still is that one (seq). Called with mu. */
void kvf__dk_read_failed(kvf__disk *d, uint64_t ns, const kvf_key *key, uint64_t seq);
void kvf__dk_erase(kvf__disk *d, ent *e);
int kvf__dk_grow(kvf__disk *d);
/* Indexes an object record (a later sequence replaces an earlier). 0 or -1 (no memory). */
int kvf__dk_set(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi, uint64_t off, uint64_t len,
                uint64_t seq, int paged);
/* Removes (ns, key) if its record is older than seq. */
void kvf__dk_drop_key(kvf__disk *d, uint64_t ns, uint64_t lo, uint64_t hi, uint64_t seq);
/* Removes the entries of ns (or any, all_ns) in extent ext (UINT64_MAX: any) older than below;
 * returns how many. */
uint64_t kvf__dk_drop_where(kvf__disk *d, int all_ns, uint64_t ns, uint64_t ext, uint64_t below);

/* disk_log.c */
/* Whether h is a record header that checks (then *r holds it). */
int kvf__dk_hdr_read(const uint8_t *h, rec *r);
/* Writes the buffered records and indexes them. 0 or KVF_EIO (the tier goes down). */
int kvf__dk_write_out(kvf__disk *d);
/* Waits for every large record's write in flight and indexes each record whose writes all
 * succeeded (none while the device is down); a failed one takes the device down. 0 or KVF_EIO.
 * Called with mu, before anything else uses the ring. */
int kvf__dk_reap(kvf__disk *d);
/* Appends a record of type (REC_*) to the log. 0, KVF_EINVAL (too large), KVF_ENOMEM, KVF_EIO. */
int kvf__dk_append(kvf__disk *d, int type, uint64_t ns, const kvf_key *k, const void *data,
                   uint64_t len);

#endif
