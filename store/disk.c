/*
 * The disk tier's storage engine (disk.h): a log of extents on one file or device, io_uring with
 * O_DIRECT, an in-memory index rebuilt from the records at open.
 */
#define _GNU_SOURCE
#include "disk_int.h"

#include "kvf/error.h"

#include "bytes.h"
#include "clock.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Open: format or rebuild */

static int sb_write(kvf__disk *d)
{
    uint8_t *b = kvf__dk_aligned(BLK);
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
    int rc = kvf__dk_io(d, 1, b, BLK, 0);
    free(b);
    return rc;
}

/* Reads the superblock: 1 when it is ours with this geometry, 0 when not (format), < 0 on I/O
 * errors. */
static int sb_read(kvf__disk *d)
{
    uint8_t *b = kvf__dk_aligned(BLK);
    if (!b)
        return -ENOMEM;
    int rc = kvf__dk_io(d, 0, b, BLK, 0);
    if (!rc) {
        int ours = !memcmp(b, SB_MAGIC, 8), sound = kvf__get_u64(b + 56) == XXH3_64bits(b, 56);
        rc = ours && sound && kvf__get_u32(b + 8) == VERSION && kvf__get_u32(b + 12) == BLK &&
             kvf__get_u64(b + 16) == d->ext_bytes && kvf__get_u64(b + 24) == d->n_ext &&
             kvf__get_u64(b + 32) == DATA_OFF;
        if (rc)
            memcpy(d->uuid, b + 40, 16);
        /* what is about to be formatted over, said (the caller warns): a size given other than
         * before, or a damaged first block, must not drop a tier's worth without a word */
        else if (ours && sound &&
                 (kvf__get_u64(b + 24) != d->n_ext || kvf__get_u64(b + 16) != d->ext_bytes))
            snprintf(d->note, sizeof d->note,
                     "it held a tier of another size (version %u, %llu extents of %llu bytes; "
                     "now %llu of %llu: another --disk SIZE?)",
                     kvf__get_u32(b + 8), (unsigned long long)kvf__get_u64(b + 24),
                     (unsigned long long)kvf__get_u64(b + 16), (unsigned long long)d->n_ext,
                     (unsigned long long)d->ext_bytes);
        else if (ours && sound)
            snprintf(d->note, sizeof d->note,
                     "it held a tier of another layout (version %u, blocks of %u, extents of "
                     "%llu bytes from %llu)",
                     kvf__get_u32(b + 8), kvf__get_u32(b + 12),
                     (unsigned long long)kvf__get_u64(b + 16),
                     (unsigned long long)kvf__get_u64(b + 32));
        else if (ours)
            snprintf(d->note, sizeof d->note, "its superblock does not verify (damaged)");
        else
            for (size_t i = 0; i < BLK; i++)
                if (b[i]) {
                    snprintf(d->note, sizeof d->note,
                             "its first block is no disk tier's superblock (another file?)");
                    break;
                }
    }
    free(b);
    return rc;
}

static int format(kvf__disk *d)
{
    if (getrandom(d->uuid, sizeof d->uuid, 0) != (ssize_t)sizeof d->uuid)
        return -EIO;
    /* every extent header made invalid first: nothing of an earlier life is read as current */
    uint8_t *z = kvf__dk_aligned(BLK);
    if (!z)
        return -ENOMEM;
    memset(z, 0, BLK);
    int rc = 0;
    for (uint64_t e = 0; e < d->n_ext && !rc; e++)
        rc = kvf__dk_io(d, 1, z, BLK, kvf__dk_ext_off(d, e));
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
    uint64_t pos = BLK, last = gen, base = kvf__dk_ext_off(d, e);
    uint64_t have_from = 0, have_len = 0; /* buf holds the extent's [have_from, +have_len) */
    for (;;) {
        if (pos + BLK > d->ext_bytes)
            break;
        if (pos < have_from || pos + HDR_LEN > have_from + have_len) {
            uint64_t n = d->ext_bytes - pos < SCAN_CHUNK ? d->ext_bytes - pos : SCAN_CHUNK;
            int rc = kvf__dk_io(d, 0, buf, n, base + pos);
            if (rc)
                return rc;
            have_from = pos;
            have_len = n;
        }
        rec r;
        if (!kvf__dk_hdr_read(buf + (pos - have_from), &r) || r.seq <= last || r.seq < gen)
            break; /* the end of this extent's life: a torn header, or an earlier life's */
        uint64_t size = kvf__dk_align_up(r.doff + r.len);
        if (pos + size > d->ext_bytes)
            break;
        last = r.seq;
        if (r.type == REC_OBJECT) {
            if (kvf__dk_set(d, r.ns, r.lo, r.hi, base + pos, r.len, r.seq, r.doff == BLK) != 0)
                return -ENOMEM;
        } else if (r.type == REC_TOMB) {
            kvf__dk_drop_key(d, r.ns, r.lo, r.hi, r.seq);
        } else {
            kvf__dk_drop_where(d, r.ns == 0, r.ns, UINT64_MAX, r.seq);
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
    uint8_t *hb = kvf__dk_aligned(BLK), *buf = kvf__dk_aligned(SCAN_CHUNK);
    ext_order *ord = calloc(d->n_ext, sizeof *ord);
    int rc = hb && buf && ord ? 0 : -ENOMEM;
    uint64_t n = 0;
    for (uint64_t e = 0; e < d->n_ext && !rc; e++) {
        rc = kvf__dk_io(d, 0, hb, BLK, kvf__dk_ext_off(d, e));
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

#define LOCK_WAIT_MS 2000

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
    pthread_mutex_init(&d->imu, NULL);
    for (int i = 0; i < RSLOTS; i++)
        pthread_mutex_init(&d->rs[i].mu, NULL);
    /* made here (and so removed again if the open fails), or there already */
    int created = 1;
    d->fd = open(o->path, O_RDWR | O_CREAT | O_EXCL | O_DIRECT | O_CLOEXEC, 0600);
    if (d->fd < 0 && errno == EEXIST) {
        created = 0;
        d->fd = open(o->path, O_RDWR | O_DIRECT | O_CLOEXEC);
    }
    int rc = 0;
    struct stat sb;
    if (d->fd < 0 || fstat(d->fd, &sb) != 0) {
        int e = errno;
        struct stat ps;
        int other = stat(o->path, &ps) == 0 && !S_ISREG(ps.st_mode) && !S_ISBLK(ps.st_mode);
        snprintf(err, errlen, "disk tier %s: %s%s", o->path,
                 other ? "not a regular file or a block device" : strerror(e),
                 !other && e == EINVAL ? " (O_DIRECT: the file system does not take it)" : "");
        rc = other ? KVF_EINVAL : KVF_EIO;
        goto fail;
    }
    if (!S_ISREG(sb.st_mode) && !S_ISBLK(sb.st_mode)) {
        snprintf(err, errlen, "disk tier %s: not a regular file or a block device", o->path);
        rc = KVF_EINVAL;
        goto fail;
    }
    /* One writer per file: another kvf-store on it, or this one's --disk naming it twice under
     * two spellings (a link, "./"), would interleave two logs that each read as valid. A store
     * killed a moment ago may still hold it (the kernel tears its io_uring instances down after
     * the process is gone, and the file and its lock go with their last reference), so a lock
     * that is held is asked again for LOCK_WAIT_MS. */
    int locked = flock(d->fd, LOCK_EX | LOCK_NB) == 0;
    for (int t = 0; !locked && errno == EWOULDBLOCK && t < LOCK_WAIT_MS / 50; t++) {
        usleep(50000);
        locked = flock(d->fd, LOCK_EX | LOCK_NB) == 0;
    }
    /* a file system that takes no locks (NFS without its lock daemon, some FUSE ones): served
     * unlocked, as before the lock existed */
    if (!locked && (errno == ENOLCK || errno == EOPNOTSUPP || errno == ENOTSUP))
        locked = 1;
    if (!locked) {
        int e = errno;
        created = 0; /* another store's file: never removed by this failure */
        snprintf(err, errlen, "disk tier %s: %s", o->path,
                 e == EWOULDBLOCK ? "in use by another disk tier (another kvf-store, or "
                                    "another --disk of this one naming the same file)"
                                  : strerror(e));
        rc = e == EWOULDBLOCK ? KVF_EBUSY : KVF_EIO;
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
        /* the file system's free space first: posix_fallocate would fill it before it fails */
        struct statvfs fs;
        uint64_t have = (uint64_t)sb.st_blocks * 512u;
        if (fstatvfs(d->fd, &fs) == 0 && size > have &&
            size - have > (uint64_t)fs.f_bavail * (uint64_t)fs.f_frsize) {
            snprintf(err, errlen,
                     "disk tier %s: cannot hold %llu bytes: %s (the file system has %llu free)",
                     o->path, (unsigned long long)size, strerror(ENOSPC),
                     (unsigned long long)fs.f_bavail * (unsigned long long)fs.f_frsize);
            rc = KVF_EIO;
            goto fail;
        }
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
    for (int i = 0; i < RSLOTS; i++) {
        if ((ur = io_uring_queue_init(d->qd, &d->rs[i].ring, 0)) < 0) {
            snprintf(err, errlen, "disk tier %s: io_uring: %s", o->path, strerror(-ur));
            rc = KVF_EINFEASIBLE;
            goto fail;
        }
        d->rs[i].ring_ok = 1;
        if (!(d->rs[i].xs = XXH3_createState())) {
            rc = KVF_ENOMEM;
            goto fail;
        }
    }
    d->gen = calloc(d->n_ext, sizeof *d->gen);
    d->wcap = WBUF_MIN;
    d->wbuf = kvf__dk_aligned(d->wcap);
    d->xs = XXH3_createState();
    if (!d->gen || !d->wbuf || !d->xs || kvf__dk_grow(d) != 0) {
        rc = KVF_ENOMEM;
        goto fail;
    }
    uint64_t t0 = kvf__now_ns();
    int s = sb_read(d);
    if (s != 0)
        d->note[0] = '\0';
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
    if (created)
        unlink(o->path);
    return rc;
}

const char *kvf__disk_note(const kvf__disk *d)
{
    return d->note;
}

void kvf__disk_close(kvf__disk **pd)
{
    kvf__disk *d = *pd;
    if (!d)
        return;
    if (d->ring_ok) {
        pthread_mutex_lock(&d->mu);
        if (!d->st.down)
            kvf__dk_write_out(d);
        kvf__dk_reap(d); /* also when down: no write may be in flight when the ring goes */
        pthread_mutex_unlock(&d->mu);
        io_uring_queue_exit(&d->ring);
    }
    for (int i = 0; i < RSLOTS; i++) {
        if (d->rs[i].ring_ok)
            io_uring_queue_exit(&d->rs[i].ring);
        if (d->rs[i].xs)
            XXH3_freeState(d->rs[i].xs);
        free(d->rs[i].buf);
        pthread_mutex_destroy(&d->rs[i].mu);
    }
    if (d->fd >= 0)
        close(d->fd);
    pthread_mutex_destroy(&d->mu);
    pthread_mutex_destroy(&d->imu);
    free(d->tab);
    free(d->gen);
    free(d->wbuf);
    free(d->pend);
    if (d->xs)
        XXH3_freeState(d->xs);
    for (int i = 0; i < LSLOTS; i++)
        free(d->piece[i]);
    free(d);
    *pd = NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* Operations */

int kvf__disk_put(kvf__disk *d, uint64_t ns, const kvf_key *key, const void *data, uint64_t len)
{
    pthread_mutex_lock(&d->mu);
    int rc = kvf__dk_append(d, REC_OBJECT, ns, key, data, len);
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
    int rc = d->st.down ? KVF_EIO : kvf__dk_write_out(d);
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int kvf__disk_remove(kvf__disk *d, uint64_t ns, const kvf_key *key)
{
    pthread_mutex_lock(&d->mu);
    kvf__dk_reap(d); /* a put of it still in flight is indexed first */
    int rc = d->st.down ? KVF_EIO : kvf__dk_find(d, ns, key->lo, key->hi) ? 0 : KVF_ENOENT;
    if (!rc)
        rc = kvf__dk_append(d, REC_TOMB, ns, key, NULL, 0);
    if (!rc)
        rc = kvf__dk_write_out(d);
    if (!rc)
        d->st.removed++;
    pthread_mutex_unlock(&d->mu);
    return rc;
}

int64_t kvf__disk_clear(kvf__disk *d, uint64_t ns)
{
    pthread_mutex_lock(&d->mu);
    uint64_t before = d->st.cleared;
    int rc = d->st.down ? KVF_EIO : kvf__dk_append(d, REC_CLEAR, ns, NULL, NULL, 0);
    if (!rc)
        rc = kvf__dk_write_out(d);
    int64_t n = rc ? (int64_t)KVF_EIO : (int64_t)(d->st.cleared - before);
    pthread_mutex_unlock(&d->mu);
    return n;
}

void kvf__disk_usage(kvf__disk *d, uint64_t *entries, uint64_t *bytes, uint64_t *verify_failures)
{
    pthread_mutex_lock(&d->imu);
    *entries = d->count;
    *bytes = d->data_bytes;
    pthread_mutex_unlock(&d->imu);
    *verify_failures = __atomic_load_n(&d->st.verify_failures, __ATOMIC_RELAXED);
}

uint64_t kvf__disk_get_reads(kvf__disk *d)
{
    return __atomic_load_n(&d->r_reads, __ATOMIC_RELAXED);
}

void kvf__disk_each(kvf__disk *d, void (*fn)(void *ud, uint64_t ns, const kvf_key *key), void *ud)
{
    pthread_mutex_lock(&d->imu);
    for (uint64_t i = 0; i < d->cap; i++) {
        if (d->tab[i].used) {
            kvf_key k = {.lo = d->tab[i].lo, .hi = d->tab[i].hi};
            fn(ud, d->tab[i].ns, &k);
        }
    }
    pthread_mutex_unlock(&d->imu);
}

void kvf__disk_set_drop_hook(kvf__disk *d, void (*fn)(void *ud, uint64_t ns, const kvf_key *key),
                             void *ud)
{
    pthread_mutex_lock(&d->mu);
    pthread_mutex_lock(&d->imu);
    d->on_drop = fn;
    d->drop_ud = ud;
    pthread_mutex_unlock(&d->imu);
    pthread_mutex_unlock(&d->mu);
}

int kvf__disk_down(kvf__disk *d)
{
    return __atomic_load_n(&d->st.down, __ATOMIC_RELAXED);
}

unsigned kvf__disk_note_read(kvf__disk *d, uint64_t ns, const kvf_key *key)
{
    pthread_mutex_lock(&d->imu);
    ent *e = kvf__dk_find(d, ns, key->lo, key->hi);
    unsigned n = 0;
    if (e) {
        if (e->reads < 255)
            e->reads++;
        n = e->reads;
    }
    pthread_mutex_unlock(&d->imu);
    return n;
}

int kvf__disk_contains(kvf__disk *d, uint64_t ns, const kvf_key *key, uint64_t *len)
{
    pthread_mutex_lock(&d->imu);
    ent *e = __atomic_load_n(&d->st.down, __ATOMIC_RELAXED) ? NULL
                                                            : kvf__dk_find(d, ns, key->lo, key->hi);
    if (e && len)
        *len = e->len;
    pthread_mutex_unlock(&d->imu);
    return e != NULL;
}

uint64_t kvf__disk_offset(kvf__disk *d, uint64_t ns, const kvf_key *key)
{
    pthread_mutex_lock(&d->imu);
    ent *e = __atomic_load_n(&d->st.down, __ATOMIC_RELAXED) ? NULL
                                                            : kvf__dk_find(d, ns, key->lo, key->hi);
    uint64_t off = e ? e->off : UINT64_MAX;
    pthread_mutex_unlock(&d->imu);
    return off;
}

/* A get's work on each piece of its record: the data's part hashed and copied to the caller. */
struct get_ctx {
    XXH3_state_t *xs;
    uint8_t *out;
    uint64_t len, doff; /* the data's bytes, and where they begin in the record */
};

static void get_piece(void *ud, const uint8_t *p, uint64_t from, uint64_t n)
{
    struct get_ctx *g = ud;
    uint64_t a = from < g->doff ? g->doff : from, b = from + n;
    if (b > g->doff + g->len)
        b = g->doff + g->len; /* the padding after the data */
    if (a >= b)
        return;
    XXH3_64bits_update(g->xs, p + (a - from), b - a);
    memcpy(g->out + (a - g->doff), p + (a - from), b - a);
}

/* A paged read's work on each piece: the whole data blocks hashed as they land (they lie from
 * BLK to BLK + body in the order the pieces come: the header block first, the tail block last). */
struct paged_ctx {
    XXH3_state_t *xs;
    uint64_t body;
};

static void paged_piece(void *ud, const uint8_t *p, uint64_t from, uint64_t n)
{
    struct paged_ctx *g = ud;
    uint64_t a = from < BLK ? BLK : from, b = from + n < BLK + g->body ? from + n : BLK + g->body;
    if (a < b)
        XXH3_64bits_update(g->xs, p + (a - from), b - a);
}

/* A paged record (REC_PAGED) read into page-aligned memory out with no copy: its header block and
 * its last partial data block (if any) into the slot's buffer, its whole data blocks straight into
 * out, all three reads sent together, the data blocks hashed as they land; the tail copied.
 * 0 or a negative errno; *xxh the data's checksum. */
static int read_paged(kvf__disk *d, struct rslot *sl, uint64_t off, uint8_t *out, uint64_t len,
                      uint64_t *xxh)
{
    uint64_t body = len / BLK * BLK;
    kvf__dk_seg segs[3] = {{.buf = sl->buf, .len = BLK, .off = off},
                           {.buf = out, .len = body, .off = off + BLK},
                           {.buf = sl->buf + BLK, .len = BLK, .off = off + BLK + body}};
    struct paged_ctx g = {.xs = sl->xs, .body = body};
    XXH3_64bits_reset(sl->xs);
    int r = kvf__dk_io_segs(d, &sl->ring, segs, len > body ? 3 : 2, paged_piece, &g);
    if (!r && len > body) {
        memcpy(out + body, sl->buf + BLK, len - body);
        XXH3_64bits_update(sl->xs, out + body, len - body);
    }
    *xxh = XXH3_64bits_digest(sl->xs);
    return r;
}

struct rslot *kvf__dk_slot_take(kvf__disk *d, uint64_t size)
{
    unsigned first = __atomic_fetch_add(&d->rnext, 1, __ATOMIC_RELAXED);
    struct rslot *sl = NULL;
    for (unsigned k = 0; k < RSLOTS && !sl; k++)
        if (pthread_mutex_trylock(&d->rs[(first + k) % RSLOTS].mu) == 0)
            sl = &d->rs[(first + k) % RSLOTS];
    if (!sl) {
        sl = &d->rs[first % RSLOTS];
        pthread_mutex_lock(&sl->mu);
    }
    if (size > sl->cap) {
        uint8_t *nb = kvf__dk_aligned(size);
        if (!nb) {
            pthread_mutex_unlock(&sl->mu);
            return NULL;
        }
        free(sl->buf);
        sl->buf = nb;
        sl->cap = size;
    }
    return sl;
}

void kvf__dk_read_failed(kvf__disk *d, uint64_t ns, const kvf_key *key, uint64_t seq)
{
    /* written torn, or its extent reused since: a miss, and gone (if it still is this one) */
    ent *now = kvf__dk_find(d, ns, key->lo, key->hi);
    if (now && now->seq == seq) {
        __atomic_fetch_add(&d->st.verify_failures, 1, __ATOMIC_RELAXED);
        if (d->on_drop)
            d->on_drop(d->drop_ud, ns, key);
        kvf__dk_erase(d, now);
    }
    __atomic_fetch_add(&d->r_misses, 1, __ATOMIC_RELAXED);
}

int kvf__disk_get(kvf__disk *d, uint64_t ns, const kvf_key *key, void *buf, uint64_t cap,
                  uint64_t *len)
{
    /* what the index says, under imu: never behind a write's I/O */
    pthread_mutex_lock(&d->imu);
    int down = __atomic_load_n(&d->st.down, __ATOMIC_RELAXED) != 0;
    ent *e = down ? NULL : kvf__dk_find(d, ns, key->lo, key->hi);
    uint64_t off = e ? e->off : 0, elen = e ? e->len : 0, seq = e ? e->seq : 0;
    int paged = e ? e->paged : 0;
    pthread_mutex_unlock(&d->imu);
    if (down)
        return KVF_EIO;
    __atomic_fetch_add(&d->r_gets, 1, __ATOMIC_RELAXED);
    if (!e) {
        __atomic_fetch_add(&d->r_misses, 1, __ATOMIC_RELAXED);
        return KVF_ENOENT;
    }
    *len = elen;
    if (elen > cap)
        return KVF_EOVERFLOW;

    /* the read, under a read slot's lock alone: writes and other gets go on meanwhile. Should the
     * log reuse the record's extent under it, the header's sequence or the data's checksum no
     * longer checks. A free slot is taken where there is one, else the next in turn is waited for.
     */
    int rc = 0, r = 0, ok = 0;
    /* a paged record into page-aligned memory (a DRAM entry of the arena's) is read straight
     * into it; else the record through the slot's buffer, its data copied out */
    int direct = paged && ((uintptr_t)buf % BLK) == 0;
    uint64_t size = direct ? 2 * BLK : kvf__dk_rec_size(paged, elen), xxh = 0;
    struct rslot *sl = kvf__dk_slot_take(d, size);
    if (!sl)
        return KVF_ENOMEM;
    struct get_ctx g = {.xs = sl->xs, .out = buf, .len = elen, .doff = paged ? BLK : HDR_LEN};
    if (direct) {
        r = read_paged(d, sl, off, buf, elen, &xxh);
        __atomic_fetch_add(&d->st.direct_gets, 1, __ATOMIC_RELAXED);
    } else {
        /* the data's checksum and its copy out, piece by piece as the pieces land */
        XXH3_64bits_reset(g.xs);
        r = kvf__dk_io_pieces(d, &sl->ring, sl->buf, size, off, get_piece, &g);
        xxh = XXH3_64bits_digest(g.xs);
    }
    rec h;
    ok = !r && kvf__dk_hdr_read(sl->buf, &h) && h.type == REC_OBJECT && h.seq == seq &&
         h.ns == ns && h.lo == key->lo && h.hi == key->hi && h.len == elen && h.doff == g.doff &&
         xxh == h.data_xxh;
    pthread_mutex_unlock(&sl->mu);

    __atomic_fetch_add(&d->r_reads, 1, __ATOMIC_RELAXED);
    if (ok) {
        __atomic_fetch_add(&d->r_bytes, elen, __ATOMIC_RELAXED);
        return 0;
    }
    pthread_mutex_lock(&d->mu);
    if (r) {
        kvf__dk_go_down(d, -r);
        rc = KVF_EIO;
    } else {
        kvf__dk_read_failed(d, ns, key, seq);
        rc = KVF_ENOENT;
    }
    pthread_mutex_unlock(&d->mu);
    return rc;
}

uint64_t kvf__disk_direct_puts(kvf__disk *d)
{
    return __atomic_load_n(&d->st.direct_puts, __ATOMIC_RELAXED);
}

uint64_t kvf__disk_direct_gets(kvf__disk *d)
{
    return __atomic_load_n(&d->st.direct_gets, __ATOMIC_RELAXED);
}

void kvf__disk_stats_get(kvf__disk *d, kvf__disk_stats *st)
{
    pthread_mutex_lock(&d->mu);
    *st = d->st;
    st->gets = __atomic_load_n(&d->r_gets, __ATOMIC_RELAXED);
    st->misses = __atomic_load_n(&d->r_misses, __ATOMIC_RELAXED);
    st->get_bytes = __atomic_load_n(&d->r_bytes, __ATOMIC_RELAXED);
    st->get_reads = __atomic_load_n(&d->r_reads, __ATOMIC_RELAXED);
    st->bytes = d->size;
    st->extents = d->n_ext;
    st->extent_bytes = d->ext_bytes;
    st->entries = d->count;
    st->entry_bytes = d->data_bytes;
    pthread_mutex_unlock(&d->mu);
}
