/*
 * A copier (cuda/copy.c, docs/cuda.md): moves runs of bytes between host memory and device pages
 * on a stream of its own. Each call adds one group: a contiguous run of host bytes (a chunk's
 * segment in staging, or in a storage node's arena) and the device pages it maps to, in order.
 * Groups are submitted in batches:
 *   - pages of at least kernel_below bytes: cudaMemcpyBatchAsync, one entry per page, on the copy
 *     engine (no SM time); without it (runtime before 12.8), one cudaMemcpyAsync per page;
 *   - smaller pages: the page-copy kernel, which reads and writes registered (page-locked, mapped)
 *     host memory directly where the host memory is so (DIRECT); where it is not, the groups are
 *     copied whole between host and a device buffer and the kernel scatters (load) or gathers
 *     (save) the pages there (STAGED). Two run lists (and buffers) are used in turn, so that one
 *     is refilled while the other's work runs.
 * marks record an event after what was submitted so far; waits block on one. The first failure
 * is kept (err) and every later call returns it until kvf__cucopy_begin.
 * One thread uses a copier at a time.
 */
#ifndef KVF_CUDA_CUCOPY_H
#define KVF_CUDA_CUCOPY_H

#include <stddef.h>
#include <stdint.h>

#include "cu.h"

#define KVF__CUCOPY_MARKS 64
#define KVF__CUCOPY_BATCH 1024 /* entries per cudaMemcpyBatchAsync */

typedef enum { KVF__CU_H2D = 1, KVF__CU_D2H = 2 } kvf__cudir;

/* How a transfer's pages move (kvf__cucopy_begin). */
enum {
    KVF__CUCOPY_ENGINE = 0, /* cudaMemcpyBatchAsync, a run per page */
    KVF__CUCOPY_STAGED = 1, /* the kernel, through a device buffer copied whole */
    KVF__CUCOPY_DIRECT = 2, /* the kernel, reading or writing registered host memory itself */
};

typedef struct kvf__cuslot {
    void *dbuf;      /* device staging */
    uint64_t *pairs; /* the kernel's run list, mapped host memory */
    size_t used, n_pairs, n_groups;
    void *host[KVF__CUCOPY_BATCH]; /* the groups' host runs and their offsets in dbuf */
    size_t off[KVF__CUCOPY_BATCH], len[KVF__CUCOPY_BATCH];
    kvf__cuevent ev; /* after the slot's last submission */
    int pending;
} kvf__cuslot;

typedef struct kvf__cucopy {
    const kvf__cu *cu;
    int dev;
    kvf__custream stream;
    int shared;          /* the stream is the caller's, shared with other copiers */
    size_t call_entries; /* runs per cudaMemcpyBatchAsync call (copy.c) */
    kvf__cuevent marks[KVF__CUCOPY_MARKS];
    unsigned n_marks;
    kvf__cudir dir;
    size_t page_bytes;
    int use_kernel;  /* KVF__CUCOPY_* of this transfer */
    int host_ptr_ok; /* registered host memory has the same address on the device */
    /* batched pages not yet submitted */
    void *dsts[KVF__CUCOPY_BATCH];
    const void *srcs[KVF__CUCOPY_BATCH];
    size_t sizes[KVF__CUCOPY_BATCH];
    size_t n;
    /* the kernel path's two staging slots */
    kvf__cuslot slot[2];
    size_t slot_bytes, pair_cap;
    int cur;
    kvf__cukernel kernel;
    /* counters */
    uint64_t kernels, batch_calls, bytes;
    int err;
    char errmsg[200];
} kvf__cucopy;

/* Makes a copier on device dev: its events, and a stream of its own, or `shared` (a stream the
 * caller keeps, which several copiers may use from their threads: each waits only for its own
 * work). 0 or the error, with why in err. */
int kvf__cucopy_init(kvf__cucopy *cc, const kvf__cu *cu, int dev, kvf__custream shared, char *err,
                     size_t errlen);
void kvf__cucopy_fini(kvf__cucopy *cc);

/* Starts a transfer in one direction, of pages of page_bytes: clears the error and the marks.
 * use_kernel is a KVF__CUCOPY_* mode: DIRECT only where every host run of the transfer is
 * registered with CUDA as mapped; it becomes STAGED where the device cannot use host addresses,
 * and the kernel modes become ENGINE where the kernel cannot be had. 0 or the error. */
int kvf__cucopy_begin(kvf__cucopy *cc, kvf__cudir dir, size_t page_bytes, int use_kernel);
/* Has the stream wait for ev (recorded by the engine) before what is submitted next. */
int kvf__cucopy_after(kvf__cucopy *cc, kvf__cuevent ev);
/* Adds a group: host[0 .. n_pages * page_bytes) <-> dev_pages[0 .. n_pages). */
int kvf__cucopy_group(kvf__cucopy *cc, void *host, void *const *dev_pages, size_t n_pages);
/* Submits what is pending and records a mark: its index in *mark. */
int kvf__cucopy_mark(kvf__cucopy *cc, unsigned *mark);
/* Waits for mark m (and so for everything submitted before it). */
int kvf__cucopy_wait(kvf__cucopy *cc, unsigned mark);
/* Submits what is pending and waits for all of it. Returns the first failure of the transfer. */
int kvf__cucopy_end(kvf__cucopy *cc);

/* Whether pages of page_bytes take the kernel path: below KVF_CUDA_KERNEL_BELOW bytes (default
 * 64 KiB: below it the copy engine falls behind the kernel on PCIe gen5, measured by kvf-bench
 * connector --device cuda's page-size sweep: docs/cuda.md). */
int kvf__cucopy_rule(size_t page_bytes);

#endif
