/*
 * Shared by the tests that publish KV events to a real kvf-sched (test_sched_daemon,
 * test_sched_hostile): ZeroMQ sockets of the test on loopback, and vLLM-format batches encoded
 * with msgpack-c.
 */
#ifndef KVF_TEST_KVEVENTS_UTIL_H
#define KVF_TEST_KVEVENTS_UTIL_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

/* A socket of type `type` bound on loopback (a free port); *ep gets its endpoint. Fails the test
 * when it cannot bind. */
void *pub_open(void *ctx, int type, char *ep, size_t eplen);
/* Sends one batch on pub as vLLM does: topic "kv-events", the 8-byte big-endian seq, payload. */
void publish(void *pub, uint64_t seq, const void *payload, size_t len);
/* Appends to sb a batch [ts, [["BlockStored", hashes, parent nil, tokens, block_size, lora nil,
 * "GPU"]], rank 0] of `blocks` blocks (hashes from first_hash on) of bt tokens each, the tokens
 * counting up from token0. */
void pack_stored(msgpack_sbuffer *sb, uint64_t first_hash, int blocks, uint32_t bt,
                 uint32_t token0);
/* Initializes sb (destroyed by the caller) with a batch of no events: [ts, [], rank 0]. */
void pack_empty(msgpack_sbuffer *sb);

#endif
