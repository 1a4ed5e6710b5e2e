/*
 * KV events (docs/scheduler.md, "KV events"): the msgpack batches that engines and kvfabric's
 * storage nodes publish and kvf-sched reads, encoded and decoded here and nowhere else (msgpack-c).
 *
 * A batch is [ts, events, data_parallel_rank] (or a map with "ts", "events", ...). vLLM's events
 * are msgspec's array_like tagged structs ["BlockStored", block_hashes, parent_block_hash,
 * token_ids, block_size, lora_id, medium], ["BlockRemoved", block_hashes, medium] and
 * ["AllBlocksCleared"] (trailing fields with default values may be omitted); newer publishers send
 * maps instead, with a "type" field and named fields. Block hashes are integers (signed or
 * unsigned 64-bit) or bytes; bytes are reduced to 64 bits with XXH3, which keeps them opaque and
 * distinct. kvfabric's storage nodes publish ["ChunksAdmitted", node, keys], ["ChunksEvicted",
 * node, keys] and ["ChunksCleared", node] (or maps with "type", "node" and "keys"), keys being
 * 16-byte binaries (docs/keys.md's wire form).
 *
 * On ZeroMQ each batch travels as [topic, 8-byte big-endian sequence number, payload]
 * (transport/include/pubsub.h).
 *
 * Decoding is msgpuck's where the build has it (a pull parser: nothing is allocated per batch),
 * else msgpack-c's; kvevents_int.h says how the two are kept equal.
 */
#ifndef KVF_PROTO_KVEVENTS_H
#define KVF_PROTO_KVEVENTS_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"

typedef enum kvf_kve_type {
    KVF_KVE_BLOCK_STORED,
    KVF_KVE_BLOCK_REMOVED,
    KVF_KVE_ALL_CLEARED,
    KVF_KVE_CHUNKS_ADMITTED,
    KVF_KVE_CHUNKS_EVICTED,
    KVF_KVE_CHUNKS_CLEARED,
    KVF_KVE_STORE_RATES,
    KVF_KVE_UNKNOWN, /* a kind this version does not know: skipped by readers */
} kvf_kve_type;

/* One decoded event. Arrays and the type name are borrowed: valid during the callback that
 * receives it, or until the next decode with the decoder that decoded it. */
typedef struct kvf_kve {
    kvf_kve_type type;
    const char *type_name; /* as published (not NUL-terminated: type_len bytes) */
    size_t type_len;
    /* BlockStored, BlockRemoved */
    const uint64_t *hashes;
    size_t n_hashes;
    /* BlockStored: the parent block (has_parent 0: the first block of a sequence), the token ids
     * of every block (n_hashes * block_size) and the tier the blocks are in */
    int has_parent;
    uint64_t parent;
    const uint32_t *tokens;
    size_t n_tokens;
    uint32_t block_size;
    int host_tier; /* medium "CPU": the engine's host offload; otherwise its device memory */
    /* Chunks*: the publishing storage node's number and the chunk keys */
    uint64_t node;
    const kvf_key *keys;
    size_t n_keys;
    /* ChunksAdmitted, ChunksEvicted: the node's tier the change is in (medium "DRAM", the
     * default when none is given, or "DISK") */
    int disk_tier;
    /* StoreRates: the node's measured rate of reads from its disk tier (bytes per second, as a
     * promotion sees it, queueing included) */
    uint64_t disk_read_bytes_per_s;
} kvf_kve;

/* Called for each event of a batch, in order. Return 0 to go on, KVF_EPROTO to count the event as
 * malformed (with the reason in err) and go on, any other code to stop the batch with it. */
typedef int (*kvf_kve_fn)(void *ud, const kvf_kve *ev, char *err, size_t errlen);

/* Decodes one batch (either encoding) and calls fn for each event. A malformed event is skipped:
 * *malformed (may be NULL) counts it and err keeps the last reason. Returns 0, KVF_EPROTO for a
 * payload that is not a batch at all (not msgpack, trailing bytes, no events array), KVF_ENOMEM,
 * or the code fn stopped with. */
int kvf__kve_decode(const void *payload, size_t len, kvf_kve_fn fn, void *ud, uint64_t *malformed,
                    char *err, size_t errlen);

/* A decoder: the msgpack zone and the decoded events' arrays, reused batch after batch, so that
 * decoding a batch allocates nothing once they are large enough. One thread at a time. */
typedef struct kvf__kve_decoder kvf__kve_decoder;

/* The largest batch a decoder takes, in bytes (KVF_EPROTO beyond). */
#define KVF_KVE_MAX_BATCH (256u << 20)

/* 0 or KVF_ENOMEM. Caller owns *out; free with kvf__kve_decoder_free(), which accepts NULL. */
int kvf__kve_decoder_new(kvf__kve_decoder **out);
void kvf__kve_decoder_free(kvf__kve_decoder **d);

/* Decodes one batch (either encoding) into d: *events, *n_events long, valid until the next
 * decode with d. A malformed event is skipped: *malformed (may be NULL) counts it and err keeps
 * the last reason. Touches nothing but d, so it may run outside any lock that guards what the
 * events are applied to. Returns 0, KVF_EPROTO for a payload that is not a batch at all, or
 * KVF_ENOMEM. */
int kvf__kve_decode_batch(kvf__kve_decoder *d, const void *payload, size_t len,
                          const kvf_kve **events, size_t *n_events, uint64_t *malformed, char *err,
                          size_t errlen);

/* The same decoding through msgpack-c's object tree: the reference that the tests and the fuzzer
 * compare kvf__kve_decode_batch() with (the decoder itself in builds without msgpuck). */
int kvf__kve_decode_batch_ref(kvf__kve_decoder *d, const void *payload, size_t len,
                              const kvf_kve **events, size_t *n_events, uint64_t *malformed,
                              char *err, size_t errlen);

/* Whether two decoded events say the same: every field, and every element of their arrays (the
 * tests compare the two decoders with it). */
int kvf__kve_equal(const kvf_kve *a, const kvf_kve *b);

/* The library kvf__kve_decode_batch() decodes with: "msgpuck" or "msgpack-c". */
const char *kvf__kve_decoder_name(void);

/* An encoder of one batch, in the array encoding, as vLLM's publishers write it. */
typedef struct kvf__kve_enc kvf__kve_enc;

/* Starts a batch of exactly n_events events, stamped with the wall clock. Caller owns *out; free
 * with kvf__kve_enc_free(). 0 or KVF_ENOMEM. */
int kvf__kve_enc_begin(kvf__kve_enc **out, size_t n_events);
/* ["BlockStored", hashes, parent or nil, tokens (n_hashes * block_size), block_size, nil, medium]
 */
void kvf__kve_enc_block_stored(kvf__kve_enc *e, const uint64_t *hashes, size_t n_hashes,
                               int has_parent, uint64_t parent, const uint32_t *tokens,
                               uint32_t block_size, const char *medium);
/* ["BlockRemoved", hashes, medium] */
void kvf__kve_enc_block_removed(kvf__kve_enc *e, const uint64_t *hashes, size_t n_hashes,
                                const char *medium);
/* ["AllBlocksCleared"]: the engine's cache was emptied */
void kvf__kve_enc_all_cleared(kvf__kve_enc *e);
/* ["ChunksAdmitted" or "ChunksEvicted", node, keys as 16-byte binaries, medium]: medium "DRAM"
 * (disk 0: the node's arena) or "DISK" (its disk tier) */
void kvf__kve_enc_chunks(kvf__kve_enc *e, int admitted, uint64_t node, const kvf_key *keys,
                         size_t n_keys, int disk);
/* ["StoreRates", node, disk_read_bytes_per_s] */
void kvf__kve_enc_store_rates(kvf__kve_enc *e, uint64_t node, uint64_t disk_read_bytes_per_s);
/* Ends the batch (data_parallel_rank 0). *data and *len: the payload, borrowed until free.
 * Returns 0, or KVF_ENOMEM when any part could not be written, or KVF_EINVAL when the events
 * written are not the n_events announced. */
int kvf__kve_enc_end(kvf__kve_enc *e, const void **data, size_t *len);
/* Accepts NULL; clears *e. */
void kvf__kve_enc_free(kvf__kve_enc **e);

/* The 8-byte big-endian sequence number frame. */
uint64_t kvf__kve_seq_get(const void *be8);
void kvf__kve_seq_put(void *be8, uint64_t seq);

#endif
