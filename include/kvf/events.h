/*
 * kvf/events.h - an engine's KV events: what its own KV pages hold, published the way vLLM's
 * engines publish them (ZeroMQ PUB, [topic, 8-byte big-endian sequence, msgpack [ts, events, 0]],
 * BlockStored / BlockRemoved), so that kvf-sched places requests where their prefix already is.
 *
 * A block's hash is the engine's chain over token ids: block b's hash is XXH3-64 of its
 * block_tokens token ids (little-endian 32-bit) seeded with block b-1's hash (0 for the first),
 * the hash kvf-sched matches prompts against (docs/scheduler.md). kvf_events_hash_blocks computes
 * it; engines with another hash must map theirs to it.
 *
 * Secured publishers (docs/security.md, "KV events"): with a credential, the socket is a CURVE
 * server; only subscribers listed in the tenants file connect, and the events go under the topic
 * of the engine's tenant ("kv-events/t/TENANT/"), which is all a tenant's subscriber receives.
 */
#ifndef KVF_EVENTS_H
#define KVF_EVENTS_H

#include "kvf/export.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvf_events kvf_events;

typedef struct kvf_events_opts {
    const char *listen; /* HOST:PORT to bind (port 0: a free one) */
    /* NULL: an open publisher (loopback or --insecure deployments only). Else the path of the
     * publisher's credential (its CURVE key) ... */
    const char *credential;
    const char *tenants;           /* ... the tenants file saying who may subscribe ... */
    const char *tenant_credential; /* ... and whose tenant's topic the events go under (NULL:
                                      the credential file $KVF_CREDENTIAL names) */
    /* HOST:PORT of a replay socket (port 0: a free one; NULL: none): the last batches are kept
     * and a subscriber that missed some (kvf-sched joining late, or after a gap) asks for them
     * there, as from vLLM's publishers; secured as the publisher is. */
    const char *replay;
    size_t replay_batches; /* batches kept (0: 4096) ... */
    size_t replay_bytes;   /* ... and payload bytes at most (0: 64 MiB) */
    /* Shards of kvf-sched's index (docs/scale.md, "The sharded index"; 0 or 1: not sharded, at
     * most KVF_EVENTS_MAX_SHARDS). Each batch then goes under the topic of the shard of the
     * sequences in it, KVF_EVENTS_SHARD_TOPIC "K/" (then the tenant's "t/TENANT/" where
     * secured), numbered on its own from 1: a replica of shard K subscribes to that topic only
     * and never receives, decodes or replays the other shards' batches. The shard of a block is
     * that of the first block of its sequence (kvf_events_shard_of of that block's hash in
     * kvfabric's chain, kvf_events_hash_blocks, whatever hash the engine publishes); the
     * publisher remembers it
     * for every block stored until the block is removed. Sharded batches go to admin subscribers
     * only (a tenant's subscription names its own topic). */
    uint32_t shards;
    /* Sharded: the blocks remembered at most (0: 16M). A publisher past it (removals missed
     * upstream, or blocks never removed) tells every shard AllBlocksCleared and starts again. */
    size_t shard_roots_max;
} kvf_events_opts;

#define KVF_EVENTS_SHARD_TOPIC "kv-events/s/"
#define KVF_EVENTS_MAX_SHARDS  256

/* Binds the publisher. 0, or KVF_EINVAL (a bad address, credential or tenants file),
 * KVF_EADDRINUSE, KVF_ENOTSUP (libzmq without CURVE), KVF_ENOMEM, with one line in err. Caller
 * owns *out; close with kvf_events_close(). Safe to use from several threads. */
KVF_API int kvf_events_open(kvf_events **out, const kvf_events_opts *o, char *err, size_t errlen);
/* The bound endpoint, "tcp://HOST:PORT": what the engine registers with kvf-sched. */
KVF_API const char *kvf_events_endpoint(const kvf_events *ev);
/* The replay socket's endpoint, "tcp://HOST:PORT", or "" without one: what the engine registers
 * with kvf-sched as "replay". */
KVF_API const char *kvf_events_replay_endpoint(const kvf_events *ev);
/* The topic the batches go under ("kv-events", or a tenant's). */
KVF_API const char *kvf_events_topic(const kvf_events *ev);

/* Hashes n_blocks whole blocks of tokens (n_blocks * block_tokens ids) into out, chained from
 * parent (0: the sequence's first block). 0, or KVF_EINVAL (block_tokens 0, NULL arrays). */
KVF_API int kvf_events_hash_blocks(const uint32_t *tokens, size_t n_blocks, uint32_t block_tokens,
                                   uint64_t parent, uint64_t *out);

/* The shard (0..shards-1) of the sequences whose first block's hash is first_block_hash: where
 * their blocks' events go (kvf_events_opts.shards) and which kvf-sched replica places them. 0
 * where shards < 2. */
KVF_API uint32_t kvf_events_shard_of(uint64_t first_block_hash, uint32_t shards);

/* Publishes one batch: BlockRemoved for removed[0..n_removed) (if any), then BlockStored for
 * stored[0..n_stored) (if any), whose tokens are n_stored * block_tokens ids and whose first
 * block follows the block hashed parent (has_parent 0: they start a sequence). medium: "GPU",
 * "CPU" (NULL: "GPU"). Every batch takes the next sequence number. Sharded
 * (kvf_events_opts.shards): one batch per shard the blocks belong to, the removed blocks of each
 * shard and the stored ones (all of one sequence) in theirs, each numbered in its shard. 0,
 * KVF_EINVAL, KVF_ENOMEM or KVF_EIO. */
KVF_API int kvf_events_publish(kvf_events *ev, const uint64_t *removed, size_t n_removed,
                               const uint64_t *stored, size_t n_stored, int has_parent,
                               uint64_t parent, const uint32_t *tokens, uint32_t block_tokens,
                               const char *medium);
/* Publishes AllBlocksCleared: subscribers drop every block of this engine. forget 1: the engine
 * holds no block any more (a reset, a restart); a sharded publisher then forgets its blocks'
 * shards too. forget 0: events were lost on the way (a relay's upstream gap) and the subscribers
 * learn the engine again from what follows, while the engine still holds blocks: their shards are
 * kept, so that continuations of them still go where their sequences are. Sharded, one batch in
 * every shard. 0, KVF_EINVAL, KVF_ENOMEM or KVF_EIO. */
KVF_API int kvf_events_clear(kvf_events *ev, int forget);
/* Continuations a sharded publisher was given whose parent it never stored (or had forgotten):
 * they went where the parent's own hash says, where a replica counts them as unknown. */
KVF_API uint64_t kvf_events_unknown_parents(const kvf_events *ev);
/* Batches published so far (the last sequence number; sharded, the batches of every shard). */
KVF_API uint64_t kvf_events_sequence(const kvf_events *ev);

/* Accepts NULL; clears *ev. */
KVF_API void kvf_events_close(kvf_events **ev);

#ifdef __cplusplus
}
#endif

#endif
