/*
 * KV event ingestion: decodes vLLM's and kvfabric's msgpack event batches and applies them to the
 * scheduler's index; tracks ZeroMQ sequence numbers to detect gaps.
 */
#ifndef KVF_SCHED_EVENTS_H
#define KVF_SCHED_EVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler.h"

/* Who published a batch: an engine instance (index) or a storage node (number); the other -1. */
typedef struct kvf_event_source {
    int instance;
    int store;
} kvf_event_source;

typedef struct kvf_ingest_stats {
    uint64_t batches, stored, removed, cleared, chunks;
    uint64_t malformed;       /* events skipped for their shape, with a logged reason */
    uint64_t unknown_parents; /* BlockStored whose parent the index never saw */
    uint64_t unknown_types;   /* event kinds this version does not know: skipped */
} kvf_ingest_stats;

/* Decodes one msgpack batch and applies its events. A malformed event is skipped (counted, the
 * last reason in err); a payload that is not a batch at all returns KVF_EPROTO. */
int kvf_sched_ingest(kvf_sched *s, const kvf_event_source *src, const void *payload, size_t len,
                     kvf_ingest_stats *st, char *err, size_t errlen);

typedef struct kvf_seq_tracker {
    uint64_t last;
    int seen;
    uint64_t gaps, missed;
} kvf_seq_tracker;

/* Checks an 8-byte big-endian sequence number. Returns 1 and *missing_from when some were
 * skipped (a gap to recover through the replay socket), else 0. */
int kvf_seq_check(kvf_seq_tracker *t, const void *seq8, uint64_t *missing_from);

#endif
