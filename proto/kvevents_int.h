/*
 * The KV event decoders' shared insides (kvevents.h is the contract). Not a public interface.
 *
 * Two decoders read a batch into the same kvf__kve_decoder: msgpuck's (kvevents_mp.c), a pull
 * parser that reads each field where it lies and allocates nothing, which kvf__kve_decode_batch()
 * is wherever the build has msgpuck; and msgpack-c's (kvevents.c), which unpacks the batch into an
 * object tree first: the reference the tests and the fuzzer compare the first with, and the
 * decoder of builds without msgpuck. Both accept and refuse the same batches and events, with the
 * same reasons. Neither reads a byte that kvf__kve_claims_fit() has not first found to belong to
 * the batch.
 */
#ifndef KVF_PROTO_KVEVENTS_INT_H
#define KVF_PROTO_KVEVENTS_INT_H

#include "kvevents.h"

#include <msgpack.h>

/* How a msgpack item starts, by its first byte: the bytes before its contents, how many of them
 * give a length (big-endian, after the first byte), and what the length counts. */
typedef struct kvf__kve_shape {
    uint8_t head, len_bytes, kind; /* kind: 0 scalar, 1 body bytes, 2 array items, 3 map pairs,
                                    * 4 never used by msgpack */
} kvf__kve_shape;

struct kvf__kve_decoder {
    msgpack_zone zone; /* the reference decoder's objects; cleared, not freed, between batches */
    kvf__kve_shape shapes[256];
    kvf_kve *ev; /* the batch's events */
    size_t ev_cap;
    /* The events' arrays, end to end; an event holds offsets into them until the batch is
     * decoded (the arrays may move as they grow), then pointers. */
    uint64_t *hashes;
    uint32_t *tokens;
    kvf_key *keys;
    size_t h_len, h_cap, t_len, t_cap, k_len, k_cap;
};

/* Makes room for n more elements of size sz in *a (len used of *cap). 0 or -1. */
int kvf__kve_reserve(void **a, size_t *cap, size_t len, size_t n, size_t sz);

/* Containers open at once, at most: msgpack-c's unpacker's own limit (a batch needs 4). */
#define KVF_KVE_MAX_DEPTH 32

/* The length of the first msgpack item of the len bytes at p when it claims no more than it can
 * hold (every container's items and every body fit in the bytes that follow, no byte is one
 * msgpack never uses, and no more than KVF_KVE_MAX_DEPTH containers are open at once), else 0. */
size_t kvf__kve_claims_fit(const kvf__kve_shape *shapes, const uint8_t *p, size_t len);

/* The event type of a type name. */
kvf_kve_type kvf__kve_type_named(const char *name, size_t len);

/* Decodes the next event at *cursor into ev and moves the cursor past it, whether the event
 * decoded or not. 0, KVF_EPROTO (the event is malformed: err says why) or KVF_ENOMEM. */
typedef int (*kvf__kve_next_fn)(kvf__kve_decoder *d, void *cursor, kvf_kve *ev, char *err,
                                size_t errlen);

/* Both decoders' loop over a batch's n events: each malformed one skipped and counted, the rest
 * kept, then the batch finished (kvf__kve_finish()). */
int kvf__kve_decode_events(kvf__kve_decoder *d, size_t n, kvf__kve_next_fn next, void *cursor,
                           const kvf_kve **events, size_t *n_events, uint64_t *malformed, char *err,
                           size_t errlen);

/* Ends a batch of `kept` events: their offsets into the decoder's arrays become pointers. */
void kvf__kve_finish(kvf__kve_decoder *d, size_t kept);

/* msgpuck's decoding of the item of `len` bytes at payload (claims_fit accepted it whole). Same
 * contract as kvf__kve_decode_batch(). */
int kvf__kve_decode_mp(kvf__kve_decoder *d, const void *payload, size_t len, const kvf_kve **events,
                       size_t *n_events, uint64_t *malformed, char *err, size_t errlen);

#endif
