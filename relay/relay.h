/*
 * kvf-relay (docs/scale.md, "A relay for engines that publish one stream"): follows one engine's
 * KV event stream as kvf-sched follows it, and publishes every event again through a sharded
 * kvf_events publisher, so that an engine that publishes one stream (vLLM's) feeds kvf-sched
 * replicas that each hold one shard of the index. Shared by the relay's loop (relay.c) and the
 * daemon around it (main.c).
 */
#ifndef KVF_RELAY_H
#define KVF_RELAY_H

#include "kvf/events.h"

#include "log.h"

#include <stdatomic.h>
#include <stdint.h>

typedef struct kvf__relay kvf__relay;

typedef struct kvf__relay_opts {
    const char *from;        /* the engine's publisher, "tcp://HOST:PORT" */
    const char *from_replay; /* its replay socket, or NULL */
    kvf_events_opts out;     /* the relay's own publisher: listen, replay, shards, security */
} kvf__relay_opts;

/* What the relay has done, each a count since it started. */
typedef struct kvf__relay_stats {
    uint64_t batches;          /* batches received from the engine, live or replayed */
    uint64_t replayed;         /* of them, those asked of its replay socket */
    uint64_t stored, removed;  /* blocks stored and removed, as published again */
    uint64_t cleared;          /* AllBlocksCleared published (the engine's, and the relay's own) */
    uint64_t skipped;          /* events of other kinds (a storage node's), not published */
    uint64_t malformed;        /* batches or events that did not decode or did not add up */
    uint64_t gaps, missed;     /* gaps in the engine's numbering, and the batches they skipped */
    uint64_t late_joins;       /* first contacts that asked the replay socket from the start */
    uint64_t lost;             /* gaps the replay socket could not fill: the index cleared */
    uint64_t replay_timeouts;  /* replay requests not answered */
    uint64_t replay_retries;   /* replays asked again for what one not answered (to its end) owed */
    uint64_t restarts;         /* the engine's numbering started again */
    uint64_t sharded_upstream; /* batches already sharded (a kvfabric engine's): dropped */
    uint64_t publish_errors;   /* events that could not be published */
    uint64_t last_seq;         /* the engine's last sequence number seen */
} kvf__relay_stats;

/* Opens the relay's publisher and subscribes to the engine. 0, or a KVF_E* code with one line in
 * err. *out to be closed with kvf__relay_close() either way. */
int kvf__relay_open(kvf__relay **out, const kvf__relay_opts *o, kvf_log *lg, char *err,
                    size_t errlen);
/* Waits up to 100 ms for the engine's batches and relays those that came. One thread. */
void kvf__relay_round(kvf__relay *r, const atomic_int *stop);
/* The counters, from any thread. */
void kvf__relay_stats_get(kvf__relay *r, kvf__relay_stats *st);
/* Batches the relay published, and continuations whose parent it never saw. */
uint64_t kvf__relay_published(kvf__relay *r);
uint64_t kvf__relay_unknown_parents(kvf__relay *r);
/* The relay's publisher and replay socket ("tcp://HOST:PORT"; the replay "" without one). */
const char *kvf__relay_endpoint(const kvf__relay *r);
const char *kvf__relay_replay_endpoint(const kvf__relay *r);
/* Accepts NULL; clears *r. */
void kvf__relay_close(kvf__relay **r);

#endif
