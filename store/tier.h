/*
 * The storage node's disk tier (docs/store.md "The disk tier"): one or more devices (files or
 * block devices, one kvf__disk each) under the DRAM arena, each with a writer thread and four
 * reader threads of its own (the engine reads four objects at once), so that no event loop ever
 * waits on a disk.
 *
 * Demotion (write-back): the cache's eviction hook hands every evicted entry that passes the
 * admission rule (read at least admit_hits times) to its device's writer with a read reference,
 * so its bytes are written straight from the arena, never copied under a lock; the block is freed
 * once written. At most queue_bytes of the arena are held so; beyond, an evicted entry is not
 * demoted (counted). A key's device is fixed by its hash.
 *
 * Requests (kvf__tier_submit): promotions read objects from disk into freshly reserved DRAM
 * entries (marked on disk, so their eviction writes nothing again) and hold a reference on each
 * for the caller; removals and clears go through the writer, in order with the demotions queued
 * before them. A request's devices, and a promotion's keys on one device (dealt to the readers),
 * work in parallel; its done() runs on the worker that finished last.
 *
 * Locking: the tier's own mutex guards its queues; the cache's lock is taken without it (the
 * eviction hook runs under the cache's lock and takes the tier's, never the reverse).
 */
#ifndef KVF_STORE_TIER_H
#define KVF_STORE_TIER_H

#include "kvf/layout.h"

#include "cache.h"
#include "log.h"

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

typedef struct kvf__tier kvf__tier;

#define KVF_TIER_MAX_DEVICES 16

typedef struct kvf__tier_opts {
    const char *paths[KVF_TIER_MAX_DEVICES];
    uint64_t sizes[KVF_TIER_MAX_DEVICES]; /* 0: a block device's whole size */
    int n;
    uint32_t admit_hits; /* demote entries read at least this often since written (0: all) */
    /* write-through: a copy of an entry goes to disk while it stays in DRAM, when it is pinned
     * (write_through_pinned) or read write_through_hits times (0: not by reads) */
    uint32_t write_through_hits;
    int write_through_pinned;
    /* an object read back from disk stays in DRAM from its promote_reads-th read on (since the
     * store started); before, it is served and then leaves DRAM (0 or 1: always stays) */
    uint32_t promote_reads;
    uint64_t queue_bytes;  /* arena bytes pending demotions may hold (0: 256 MiB; at most 1/4) */
    uint32_t queue_depth;  /* io_uring entries per device (0: 32) */
    uint32_t max_requests; /* requests (promotions, removals) waiting at once (0: 256) */
    /* how long (us, at most 100 ms) after its arrival a promotion is read at the soonest, so that
     * others that come with it (a client's batch split over its connections reaches the loops as
     * several requests at once) are merged with it and read with it in runs; 0: at once */
    uint32_t gather_us;
    /* the niceness (0..19) of the tier's threads (readers, writer): above 0, the event loops,
     * which serve DRAM hits, win the CPU from the disk's copies and checksums where cores are
     * few, at the cost of the tier's own rates then */
    int nice;
    uint64_t extent_bytes; /* 0: 64 MiB, halved (to 1 MiB) until 16 fit the device */
    kvf_cache *cache;
    const kvf_log *log;
    /* Told of the disk tier's changes (disk 1): an entry written there (admitted 1), and one
     * that left it (EVICT, CLEAR, its extent reused by the log; 0). The publisher's note. May be
     * NULL. */
    void (*on_change)(void *ctx, int admitted, int disk, const kvf_key *key, uint32_t tenant);
    void *on_change_ctx;
    /* Faults for tests (kvf__disk_opts.fault), for every device, told which (0..n-1). NULL in
     * service. */
    int (*fault)(void *ud, int dev, int is_write, uint64_t off, uint64_t len);
    void *fault_ud;
} kvf__tier_opts;

/* Opens every device (rebuilding its index: what a previous run left is served again) and
 * starts the workers, then hooks the cache's eviction. 0, KVF_EINVAL, KVF_EIO, KVF_ENOMEM or
 * KVF_EINFEASIBLE (io_uring refused), with err naming the device. */
int kvf__tier_open(kvf__tier **out, const kvf__tier_opts *o, char *err, size_t errlen);
/* Unhooks the cache, writes the demotions still queued, answers the requests still queued (as
 * failed), joins the workers and closes the devices. Before the cache closes. Accepts NULL. */
void kvf__tier_close(kvf__tier **t);

/* Refuses new requests and waits for those taken to call done(): before the server that posts
 * their replies closes. Demotions go on. Accepts NULL. */
void kvf__tier_quiesce(kvf__tier *t);

/* Whether a device holds (ns, key) now, its length in *len. Never waits on I/O. */
int kvf__tier_contains(kvf__tier *t, uint64_t ns, const kvf_key *key, uint64_t *len);
/* Whether any device is up. */
int kvf__tier_up(kvf__tier *t);
/* Calls fn for every object of the devices that are up (under each device's index lock: fn must
 * be quick). */
void kvf__tier_each(kvf__tier *t, void (*fn)(void *ud, uint64_t ns, const kvf_key *key), void *ud);

enum { KVF_TIER_PROMOTE = 1, KVF_TIER_REMOVE = 2, KVF_TIER_CLEAR = 3 };

/* A request to the tier. The caller fills the first part and keeps it (and keys, st, eids) alive
 * until done() is called; the tier fills st, eids and cleared. */
typedef struct kvf__tier_req {
    int kind;
    uint64_t ns;
    int all_ns; /* CLEAR: every namespace */
    uint32_t n;
    const kvf_key *keys;
    uint32_t tenant; /* PROMOTE: whom the DRAM entries are charged to */
    /* per key. PROMOTE: 0 (promoted: eids[i] holds a read reference the caller drops), KVF_ENOENT
     * (not on disk, or it did not check), KVF_EEXIST (in DRAM already or being put), or the
     * reservation's or the device's error. REMOVE: 0 (removed from disk) or KVF_ENOENT. Callers
     * set every st[i] to KVF_ENOENT before submitting. */
    int32_t *st;
    uint32_t *eids;
    uint8_t *keep;   /* PROMOTE (may be NULL): 1 where the entry is to stay in DRAM after the
                      * request, 0 where it is to leave once served (kvf__cache_unpromote_locked) */
    int64_t cleared; /* CLEAR: objects removed from disk */
    void (*done)(struct kvf__tier_req *r);
    void *ud;
    /* the tier's */
    atomic_int remaining;
    uint64_t t0_ns;
    uint64_t bytes; /* PROMOTE: bytes read back (atomic: its shares run on several readers) */
} kvf__tier_req;

/* Queues r on the devices its keys lie on (every device for CLEAR). 0: done() will be called,
 * on a worker thread, once; KVF_EBUSY: too many requests wait (the caller serves without the
 * tier); KVF_EIO: every device is down; KVF_ENOMEM. */
int kvf__tier_submit(kvf__tier *t, kvf__tier_req *r);

typedef struct kvf__tier_stats {
    int devices, devices_down;
    uint64_t bytes, entries, entry_bytes; /* over the devices */
    uint64_t demoted, demoted_bytes, demote_skipped_cold, demote_dropped_full, demote_failed;
    uint64_t written_through, written_through_bytes, write_through_dropped_full;
    uint64_t pending_bytes; /* arena bytes held by queued demotions */
    uint64_t promoted, promoted_bytes, promote_misses, promote_failed;
    uint64_t promote_reads;  /* the devices' reads for them: neighbours read at once are one */
    uint64_t written_direct; /* large objects written straight from the arena, with no copy */
    uint64_t read_direct;    /* and read straight into it */
    uint64_t
        served_not_kept; /* promotions served, then let go (not yet read promote_reads times) */
    uint64_t removed, cleared, verify_failures, rebuilt_entries;
    uint64_t announced; /* objects found on the disk at open and told as held (ChunksAdmitted) */
    uint64_t dropped;   /* objects that left the disk otherwise than by EVICT: their extent reused
                         * by the log, CLEAR, a read that did not verify (each told as evicted) */
    /* the workers' time in the devices' reads (promotions, hit or not) and writes (demotions
     * and their flushes): promoted_bytes and demoted_bytes over these are the devices' rates */
    double read_seconds, write_seconds;
    double rebuild_seconds;
    double promote_seconds; /* summed over promotions, for a mean */
} kvf__tier_stats;
void kvf__tier_stats_get(kvf__tier *t, kvf__tier_stats *st);
/* The rate promotions read at since the last call: their bytes over their time (each from its
 * request's submission to its completion, so queueing counts), in bytes per second; 0 when none
 * completed since. */
uint64_t kvf__tier_read_rate(kvf__tier *t);
/* Device i's path, the errno that took it down (0: up), and the objects it holds and their
 * bytes; -1 past the last. */
int kvf__tier_device(kvf__tier *t, int i, const char **path, int *down, uint64_t *entries,
                     uint64_t *bytes);
/* Why device i's file was formatted anew when the tier opened ("": it was not; kvf__disk_note). */
const char *kvf__tier_device_note(kvf__tier *t, int i);

#endif
