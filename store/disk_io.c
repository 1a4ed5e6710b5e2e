/*
 * The disk tier's I/O (disk_int.h): one transfer at a time through io_uring, or a large read in
 * pieces in flight, with the tests' fault hook in front of both.
 */
#define _GNU_SOURCE
#include "disk_int.h"

#include "kvf/error.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#define STRAY KVF__DK_STRAY

void kvf__dk_unsubmit(struct io_uring_sqe *sqe)
{
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data64(sqe, STRAY);
}

int kvf__dk_wait(struct io_uring *ring, struct io_uring_cqe **cqe)
{
    for (;;) {
        int rc = io_uring_wait_cqe(ring, cqe);
        if (rc == -EINTR)
            continue;
        if (rc < 0 || io_uring_cqe_get_data64(*cqe) != STRAY)
            return rc;
        io_uring_cqe_seen(ring, *cqe); /* an earlier call's no-op */
    }
}

/* io_uring_submit, again a while on a transient refusal (nothing of this caller's in flight to
 * wait for meanwhile); the count submitted or a negative errno. */
static int submit_retrying(struct io_uring *ring)
{
    int rc = 0;
    for (int k = 0; k < 1000; k++) {
        rc = io_uring_submit(ring);
        if (rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
            return rc;
        usleep(100);
    }
    return rc;
}

void kvf__dk_go_down(kvf__disk *d, int e)
{
    if (!__atomic_load_n(&d->st.down, __ATOMIC_RELAXED)) /* kvf__disk_contains reads it under imu */
        __atomic_store_n(&d->st.down, e ? e : EIO, __ATOMIC_RELAXED);
}

/* One read or write of len bytes at off through the ring, waited for; short transfers are
 * continued. Returns 0 or a negative errno. */
int kvf__dk_io(kvf__disk *d, int is_write, void *buf, uint64_t len, uint64_t off)
{
    /* the ring's completions are this request's alone: the large records' writes are done first */
    if (d->pinflight && kvf__dk_reap(d) != 0)
        return -EIO;
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
        int rc = submit_retrying(&d->ring);
        if (rc < 1) {
            kvf__dk_unsubmit(sqe); /* never to be done: a later submission skips it */
            return rc < 0 ? rc : -EIO;
        }
        struct io_uring_cqe *cqe;
        rc = kvf__dk_wait(&d->ring, &cqe);
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

void kvf__dk_nothing(void *ud, const uint8_t *p, uint64_t from, uint64_t n)
{
    (void)ud, (void)p, (void)from, (void)n;
}

/* Where piece i of the segments lies: its segment and its offset there. Returns its length (the
 * segment's last piece may be short). */
static uint64_t piece_at(const kvf__dk_seg *segs, size_t nsegs, uint64_t i, size_t *seg,
                         uint64_t *at)
{
    size_t s = 0;
    for (; s + 1 < nsegs; s++) {
        uint64_t k = (segs[s].len + PIECE - 1) / PIECE;
        if (i < k)
            break;
        i -= k;
    }
    *seg = s;
    *at = i * PIECE;
    return segs[s].len - *at < PIECE ? segs[s].len - *at : PIECE;
}

/* Reads the segments (each len bytes at off into buf) in pieces of PIECE, as many in flight as
 * the ring holds, and hands each piece to each() in order as soon as it and those before it have
 * landed, its place `from` counted through the segments one after the other: the caller's work on
 * a piece (a checksum, a copy) overlaps the reads of the next ones, and the segments' reads go
 * out together. Returns 0 or a negative errno. */
int kvf__dk_io_segs(kvf__disk *d, struct io_uring *ring, const kvf__dk_seg *segs, size_t nsegs,
                    void (*each)(void *ud, const uint8_t *p, uint64_t from, uint64_t n), void *ud)
{
    uint64_t n = 0;
    for (size_t s = 0; s < nsegs; s++) {
        if (segs[s].len && d->o.fault) {
            int f = d->o.fault(d->o.fault_ud, 0, segs[s].off, segs[s].len);
            if (f)
                return f < 0 ? f : -EIO;
        }
        n += (segs[s].len + PIECE - 1) / PIECE;
    }
    uint64_t next_sub = 0, next_done = 0, inflight = 0, done_from = 0;
    /* which of the pieces submitted and not yet handed on have landed: a window of them, piece
     * i at i % WINDOW, no piece submitted WINDOW or more past the next one to hand on */
    enum { WINDOW = 512 };
    uint8_t landed[WINDOW];
    memset(landed, 0, sizeof landed);
    struct io_uring_sqe *unsub[WINDOW]; /* prepared, not yet taken by the kernel */
    unsigned n_unsub = 0, retries = 0;
    int err = 0;
    while (next_done < n) {
        while (!err && next_sub < n && inflight + n_unsub < d->qd &&
               next_sub - next_done < WINDOW) {
            struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
            if (!sqe)
                break;
            size_t s;
            uint64_t at;
            uint64_t k = piece_at(segs, nsegs, next_sub, &s, &at);
            io_uring_prep_read(sqe, d->fd, segs[s].buf + at, (unsigned)k, segs[s].off + at);
            io_uring_sqe_set_data64(sqe, next_sub);
            unsub[n_unsub++] = sqe;
            next_sub++;
        }
        if (n_unsub) {
            int rc = io_uring_submit(ring);
            if (rc > 0) {
                /* the kernel takes them in order */
                memmove(unsub, unsub + rc, (n_unsub - (unsigned)rc) * sizeof *unsub);
                n_unsub -= (unsigned)rc;
                inflight += (uint64_t)rc;
            } else if ((rc == -EINTR || rc == -EAGAIN || rc == -EBUSY) && retries++ < 1000) {
                if (!inflight) { /* nothing to reap meanwhile: a moment, then again */
                    usleep(100);
                    continue;
                }
            } else if (rc <= 0) {
                /* never to be read: what was prepared becomes no-ops that nobody waits for (a
                 * later submission on this ring takes them; their completions are skipped) */
                for (unsigned k = 0; k < n_unsub; k++)
                    kvf__dk_unsubmit(unsub[k]);
                n_unsub = 0;
                err = err ? err : rc < 0 ? rc : -EIO;
            }
        }
        if (!inflight)
            break;
        struct io_uring_cqe *cqe;
        int rc = kvf__dk_wait(ring, &cqe);
        if (rc < 0)
            return rc; /* the ring itself failed: nothing more can be trusted */
        uint64_t i = io_uring_cqe_get_data64(cqe);
        size_t s = 0;
        uint64_t at = 0, want = 0;
        if (i < n)
            want = piece_at(segs, nsegs, i, &s, &at);
        if (cqe->res < 0)
            err = err ? err : cqe->res;
        else if (i >= n || (uint64_t)cqe->res != want)
            err = err ? err : -EIO; /* short: past the end */
        io_uring_cqe_seen(ring, cqe);
        inflight--;
        if (i < n)
            landed[i % WINDOW] = 1;
        while (!err && next_done < n && landed[next_done % WINDOW]) {
            landed[next_done % WINDOW] = 0;
            uint64_t k = piece_at(segs, nsegs, next_done, &s, &at);
            each(ud, segs[s].buf + at, done_from, k);
            done_from += k;
            next_done++;
        }
        if (err && !inflight)
            break;
    }
    return err;
}

int kvf__dk_io_pieces(kvf__disk *d, struct io_uring *ring, uint8_t *buf, uint64_t len, uint64_t off,
                      void (*each)(void *ud, const uint8_t *p, uint64_t from, uint64_t n), void *ud)
{
    kvf__dk_seg seg = {.buf = buf, .len = len, .off = off};
    return kvf__dk_io_segs(d, ring, &seg, 1, each, ud);
}
