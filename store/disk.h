/*
 * The disk tier's storage engine (disk.c, with disk_io.c, disk_index.c and disk_log.c; their
 * shared inside in disk_int.h; docs/store.md "The disk tier"): KV objects in one file
 * or block device, written and read through io_uring with O_DIRECT, as a log of large extents
 * reused oldest first, from which the index is rebuilt at open.
 *
 * On disk (every multi-byte field little-endian; the layout byte by byte is in docs/store.md):
 * a 4 KiB superblock at offset 0; extents of extent_bytes from offset 1 MiB, each beginning with
 * a 4 KiB extent header (its generation: the sequence number it was opened at) followed by
 * records, each a 64-byte header and its data (after the header, or for a large object written
 * from page-aligned memory from the record's second 4 KiB block), padded to 4 KiB. A record is an
 * object, a tombstone (its key removed) or a namespace cleared. Headers carry their own checksum
 * and the data's (XXH3-64): a record whose header does not check ends its extent's scan at open; an
 * object whose data does not check when read is a miss, dropped. Extents are reused in the order
 * they were written (the tier is a FIFO cache), so a tombstone never outlives the objects it
 * removes, and records of an extent's previous life (sequence below its generation) are never
 * read as current: after a crash at any moment the rebuilt index names only objects whose
 * header was written whole, and a read returns an object's bytes only if they check.
 *
 * Locking: one mutex guards the index, the write buffer and the ring; calls are thread-safe and
 * block for their I/O (a disk worker thread of the store calls them, never an event loop), but
 * kvf__disk_contains, which takes only the index's own short lock.
 */
#ifndef KVF_STORE_DISK_H
#define KVF_STORE_DISK_H

#include "kvf/layout.h"

#include <stddef.h>
#include <stdint.h>

typedef struct kvf__disk kvf__disk;

typedef struct kvf__disk_opts {
    const char *path;      /* a file (made and sized) or a block device */
    uint64_t size;         /* bytes of the tier; 0 for a block device: all of it */
    uint64_t extent_bytes; /* 0: 64 MiB; a multiple of 4 KiB, at least 1 MiB */
    uint32_t queue_depth;  /* io_uring entries; 0: 32 */
    /* Faults for tests: called before each I/O; a nonzero return (a negative errno) is the I/O's
     * result instead. NULL in service. */
    int (*fault)(void *ud, int is_write, uint64_t off, uint64_t len);
    void *fault_ud;
} kvf__disk_opts;

typedef struct kvf__disk_stats {
    uint64_t bytes, extents, extent_bytes; /* the tier's size */
    uint64_t entries, entry_bytes;         /* objects indexed, their data bytes */
    uint64_t puts, put_bytes, gets, get_bytes, misses, removed, cleared;
    uint64_t get_reads;       /* reads issued for gets: a run of neighbours read at once is one */
    uint64_t verify_failures; /* objects dropped on read: a checksum or header that did not check */
    uint64_t extents_reused, dropped_by_reuse;
    uint64_t direct_puts;     /* large objects written straight from page-aligned memory, no copy */
    uint64_t direct_gets;     /* and read straight into page-aligned memory */
    uint64_t rebuilt_entries; /* indexed at open */
    double rebuild_seconds;
    int down; /* 0, or the errno that took the tier down (every call then fails) */
} kvf__disk_stats;

/* Opens the tier, formatting it where no superblock of the same geometry is found, and rebuilds
 * the index from what is on it. Returns 0; KVF_EINVAL (bad options); KVF_EIO (cannot open,
 * size, read or write it: err says which and why; ENOSPC where the file system cannot hold
 * size); KVF_ENOMEM. io_uring not available: KVF_EINFEASIBLE with the reason. */
int kvf__disk_open(kvf__disk **out, const kvf__disk_opts *o, char *err, size_t errlen);
/* Writes what is buffered and closes. Accepts NULL. */
void kvf__disk_close(kvf__disk **d);
/* Why the open formatted an existing file anew, dropping what it held ("" where it did not, or
 * the file held nothing): another layout (a --disk SIZE other than before), a damaged superblock,
 * or a file that was never a disk tier's. */
const char *kvf__disk_note(const kvf__disk *d);

/* Appends the object (ns, key) of len bytes (data is copied; a large one in page-aligned memory is
 * written straight from it, before the call returns). It is found by get and lookup once
 * written: at the next flush, or when the write buffer fills. Returns 0, KVF_EINVAL (too large
 * for an extent), KVF_EIO (the tier is down, or goes down: a write failed). */
int kvf__disk_put(kvf__disk *d, uint64_t ns, const kvf_key *key, const void *data, uint64_t len);
/* Writes what is buffered and waits for it. Returns 0 or KVF_EIO. */
int kvf__disk_flush(kvf__disk *d);
/* Removes (ns, key): a tombstone, so that a restart does not bring it back. 0 or KVF_ENOENT;
 * KVF_EIO. */
int kvf__disk_remove(kvf__disk *d, uint64_t ns, const kvf_key *key);
/* Removes every object of namespace ns (0: of every namespace). Returns the count, or a negative
 * KVF_EIO. */
int64_t kvf__disk_clear(kvf__disk *d, uint64_t ns);
/* Whether (ns, key) is indexed; its length in *len. Never waits behind I/O (an event loop may
 * call it). */
int kvf__disk_contains(kvf__disk *d, uint64_t ns, const kvf_key *key, uint64_t *len);
/* Where (ns, key)'s record starts in the log (its byte offset), or UINT64_MAX where it is not
 * indexed: reads of many keys are dealt in log order. Never waits behind I/O. */
uint64_t kvf__disk_offset(kvf__disk *d, uint64_t ns, const kvf_key *key);
/* Reads (ns, key) into buf (cap bytes) and checks it: 0 with *len; KVF_ENOENT (not here, or it
 * did not check: then it is dropped and counted); KVF_EOVERFLOW (cap too small: *len says how
 * much); KVF_EIO (the tier is down, or goes down). */
int kvf__disk_get(kvf__disk *d, uint64_t ns, const kvf_key *key, void *buf, uint64_t cap,
                  uint64_t *len);
/* Reads n objects of ns at once, keys[i] into bufs[i] (caps[i] bytes): st[i] as kvf__disk_get
 * returns, with lens[i]. Objects that lie side by side in the log (a batch demoted together) are
 * read in one I/O of up to 4 MiB; large ones one by one, in pieces. Returns 0, or KVF_ENOMEM
 * (nothing read). */
int kvf__disk_get_many(kvf__disk *d, uint64_t ns, size_t n, const kvf_key *keys, void *const *bufs,
                       const uint64_t *caps, uint64_t *lens, int *st);
/* Waits for the I/O in progress (the engine's mutex): not for an event loop. */
void kvf__disk_stats_get(kvf__disk *d, kvf__disk_stats *st);
/* The objects indexed, their bytes, and the objects dropped on read for not checking. Never
 * waits on I/O. */
void kvf__disk_usage(kvf__disk *d, uint64_t *entries, uint64_t *bytes, uint64_t *verify_failures);
/* Large objects written straight from their page-aligned memory so far (kvf__disk_stats'
 * direct_puts), without waiting on anything. */
uint64_t kvf__disk_direct_puts(kvf__disk *d);
/* Gets read straight into page-aligned memory so far (direct_gets), without waiting. */
uint64_t kvf__disk_direct_gets(kvf__disk *d);
/* Reads issued for gets so far (kvf__disk_stats' get_reads), without waiting on anything. */
uint64_t kvf__disk_get_reads(kvf__disk *d);
/* Counts a read of (ns, key) back from disk; returns how many there were since open (saturating
 * at 255), 0 if it is not indexed. Never waits on I/O. */
unsigned kvf__disk_note_read(kvf__disk *d, uint64_t ns, const kvf_key *key);
/* Calls fn for every object indexed (under the index's lock: fn must be quick and must not call
 * the engine). */
void kvf__disk_each(kvf__disk *d, void (*fn)(void *ud, uint64_t ns, const kvf_key *key), void *ud);
/* fn is called for every object that leaves the index otherwise than by kvf__disk_remove: its
 * extent reused by the log, a clear of its namespace, a read that did not verify. Called from
 * the thread whose call dropped it, with the engine's locks held: it must be quick and must not
 * call the engine. Set it before the device is used by several threads; NULL: none. */
void kvf__disk_set_drop_hook(kvf__disk *d, void (*fn)(void *ud, uint64_t ns, const kvf_key *key),
                             void *ud);
/* 0, or the errno that took the tier down. Never waits. */
int kvf__disk_down(kvf__disk *d);

#endif
