/*
 * KV events for the tests (kvevents_util.h).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <zmq.h>

#include "kvevents_util.h"

/* Starts a batch [ts, [n events ...] on sb with *pk (its rank is the caller's to pack last). */
static void begin_batch(msgpack_packer *pk, msgpack_sbuffer *sb, size_t n)
{
    msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
    msgpack_pack_array(pk, 3);
    msgpack_pack_double(pk, 1.5);
    msgpack_pack_array(pk, n);
}

/* A vLLM-format batch: [ts, [["BlockStored", hashes, parent, tokens, block_size, lora, medium]]].
 */
void pack_stored(msgpack_sbuffer *sb, uint64_t first_hash, int blocks, uint32_t bt, uint32_t token0)
{
    msgpack_packer pk;
    begin_batch(&pk, sb, 1);
    msgpack_pack_array(&pk, 7);
    msgpack_pack_str(&pk, 11);
    msgpack_pack_str_body(&pk, "BlockStored", 11);
    msgpack_pack_array(&pk, (size_t)blocks);
    for (int i = 0; i < blocks; i++)
        msgpack_pack_uint64(&pk, first_hash + (uint64_t)i);
    msgpack_pack_nil(&pk);
    msgpack_pack_array(&pk, (size_t)blocks * bt);
    for (uint32_t i = 0; i < (uint32_t)blocks * bt; i++)
        msgpack_pack_uint32(&pk, token0 + i);
    msgpack_pack_uint32(&pk, bt);
    msgpack_pack_nil(&pk);
    msgpack_pack_str(&pk, 3);
    msgpack_pack_str_body(&pk, "GPU", 3);
    msgpack_pack_int(&pk, 0);
}

void pack_empty(msgpack_sbuffer *sb)
{
    msgpack_packer pk;
    msgpack_sbuffer_init(sb);
    begin_batch(&pk, sb, 0);
    msgpack_pack_int(&pk, 0);
}

void publish(void *pub, uint64_t seq, const void *payload, size_t len)
{
    uint8_t s[8];
    for (int i = 0; i < 8; i++)
        s[i] = (uint8_t)(seq >> (56 - 8 * i));
    zmq_send(pub, "kv-events", 9, ZMQ_SNDMORE);
    zmq_send(pub, s, 8, ZMQ_SNDMORE);
    zmq_send(pub, payload, len, 0);
}

/* A PUB socket of this test, bound on loopback; *ep gets its endpoint. */
void *pub_open(void *ctx, int type, char *ep, size_t eplen)
{
    void *sk = zmq_socket(ctx, type);
    int zero = 0;
    zmq_setsockopt(sk, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_bind(sk, "tcp://127.0.0.1:*"), 0);
    zmq_getsockopt(sk, ZMQ_LAST_ENDPOINT, ep, &eplen);
    return sk;
}
