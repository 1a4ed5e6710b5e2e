/*
 * The kvfabric wire protocol: frame header encoding and validation, and the item tables of batched
 * requests. docs/protocol.md is the specification; this file implements it and nothing else.
 *
 * A frame is a 40-byte little-endian header followed by payload_len bytes of payload:
 *   magic u32 "KVF1" | version u16 | opcode u16 | flags u32 | status i32 | request_id u64 |
 *   item_count u32 | reserved u32 (0) | payload_len u64
 * Requests are pipelined: a connection carries many requests in flight, and each reply names the
 * request id it answers. Every field is checked by kvf__wire_header_check() before any payload is
 * read, so a bad frame costs the server 40 bytes and an error reply.
 */
#ifndef KVF_TRANSPORT_WIRE_H
#define KVF_TRANSPORT_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "kvf/layout.h"

#define KVF_WIRE_MAGIC      0x3146564Bu /* "KVF1" as bytes on the wire */
#define KVF_WIRE_VERSION    1u
#define KVF_WIRE_HEADER_LEN 40u
#define KVF_WIRE_KEY_LEN    16u
/* Most items one request may carry. */
#define KVF_WIRE_MAX_ITEMS 65536u
/* Largest payload of a request that carries no object data (everything but PUT, COMMIT, WRITE and
 * SEAL). */
#define KVF_WIRE_MAX_CONTROL (KVF_WIRE_MAX_ITEMS * 32u + 4096u)
/* Longest "host:port" in a COPY request. */
#define KVF_WIRE_MAX_ADDR 255u

/* XX(name, number, text). Numbers are on the wire: never reuse or renumber. */
#define KVF_OPCODE_MAP(XX)               \
    XX(HELLO, 1, "hello")                \
    XX(PUT, 2, "put")                    \
    XX(ADMIT, 3, "admit")                \
    XX(COMMIT, 4, "commit")              \
    XX(GET, 5, "get")                    \
    XX(EXISTS, 6, "exists")              \
    XX(LOOKUP, 7, "lookup")              \
    XX(EVICT, 8, "evict")                \
    XX(PIN, 9, "pin")                    \
    XX(UNPIN, 10, "unpin")               \
    XX(CLEAR, 11, "clear")               \
    XX(STATS, 12, "stats")               \
    XX(COPY, 13, "copy")                 \
    XX(COMPRESS, 14, "compress")         \
    XX(DECOMPRESS, 15, "decompress")     \
    XX(RDMA_GET, 16, "rdma_get")         \
    XX(RDMA_RELEASE, 17, "rdma_release") \
    XX(RDMA_RESERVE, 18, "rdma_reserve") \
    XX(RDMA_COMMIT, 19, "rdma_commit")   \
    XX(AUTH, 20, "auth")                 \
    XX(SHM_MAP, 21, "shm_map")           \
    XX(SHM_PUT, 22, "shm_put")           \
    XX(SHM_GET, 23, "shm_get")           \
    XX(WRITE, 24, "write")               \
    XX(SEAL, 25, "seal")

typedef enum kvf_opcode {
#define KVF_OP_ENUM_(name, num, text) KVF_OP_##name = num,
    KVF_OPCODE_MAP(KVF_OP_ENUM_)
#undef KVF_OP_ENUM_
} kvf_opcode;

/* Frame flags. */
#define KVF_WF_REPLY  0x1u  /* set on every frame the server sends */
#define KVF_WF_STREAM 0x2u  /* GET: stream the reply layer-major, one frame per layer */
#define KVF_WF_MORE   0x4u  /* reply: further frames for this request id follow */
#define KVF_WF_FATAL  0x8u  /* reply: the server closes the connection after this frame */
#define KVF_WF_ALL_NS 0x10u /* CLEAR: every namespace, not only the one named */
#define KVF_WF_TIERS  0x20u /* EXISTS, LOOKUP: a second bitmap follows, the keys only on disk */
#define KVF_WF_KNOWN  0x3fu

/* Capabilities, negotiated by HELLO. */
#define KVF_CAP_STREAM   0x1ull  /* layer-major streamed GET */
#define KVF_CAP_TWOPHASE 0x2ull  /* ADMIT + COMMIT */
#define KVF_CAP_LZ4      0x4ull  /* codecs lz4 and shuffled lz4 */
#define KVF_CAP_COPY     0x8ull  /* COPY to another node */
#define KVF_CAP_RDMA     0x10ull /* RDMA descriptors (RDMA_GET ... RDMA_COMMIT) over rdma_cm */
#define KVF_CAP_PARTS    0x80ull /* objects written in parts (WRITE, SEAL) */
#define KVF_CAP_ALL      0x9full
/* HELLO reply only: the node requires AUTH before any other request; the challenge follows. */
#define KVF_CAP_AUTH 0x20ull
/* Shared memory on the node's Unix socket (SHM_MAP, SHM_PUT, SHM_GET; docs/shm.md). A client asks
 * for it in HELLO; the reply then carries, after its first 80 bytes (the challenge's place, zero
 * without AUTH), the node's boot id (16 bytes), u32 name length, u32 0 and the socket's name
 * padded to 8 bytes ("@name": Linux's abstract namespace). */
#define KVF_CAP_SHM 0x40ull
/* SHM_MAP request flag, and reply flag where granted: a read-only descriptor of the arena. */
#define KVF_SHM_MAP_ARENA 0x1u

typedef struct kvf_wire_hdr {
    uint16_t version;
    uint16_t opcode;
    uint32_t flags;
    int32_t status; /* 0 or a KVF_E* code, in replies */
    uint64_t request_id;
    uint32_t item_count;
    uint64_t payload_len;
} kvf_wire_hdr;

/* What a receiver accepts. */
typedef struct kvf_wire_limits {
    uint64_t max_request; /* largest payload of a PUT or COMMIT (the daemon's --max-request) */
    uint32_t max_items;   /* at most KVF_WIRE_MAX_ITEMS */
    int expect_reply;     /* 1 on a client: frames must carry KVF_WF_REPLY; 0 on a server */
} kvf_wire_limits;

/* Name of an opcode ("get"), or NULL for an unknown one. Borrowed; static. */
const char *kvf__wire_opcode_name(uint32_t opcode);

void kvf__wire_hdr_encode(uint8_t out[KVF_WIRE_HEADER_LEN], const kvf_wire_hdr *h);

/* Decodes and validates a header: magic, version, opcode, flags, reserved bits, status, item count
 * and payload length against the limits and against the least payload the opcode needs for its
 * item count. Returns 0, or KVF_EPROTO, KVF_EVERSION or KVF_E2BIG with one line in msg (msg may be
 * NULL). The header is filled as far as it was read, so a caller can still answer its request id.
 */
int kvf__wire_hdr_decode(const uint8_t in[KVF_WIRE_HEADER_LEN], const kvf_wire_limits *lim,
                         kvf_wire_hdr *h, char *msg, size_t msglen);

/* The exact payload length a control request (one whose payload is read whole) must have for its
 * item count and, for COPY, its address length; PUT/COMMIT tables are checked by
 * kvf__wire_put_table_check(). Returns 0 and *need, or KVF_EPROTO. */
int kvf__wire_control_len(const kvf_wire_hdr *h, const uint8_t *payload, uint64_t *need);

/* Size of the item table at the front of a PUT or COMMIT payload: 8 (namespace) + count * 24. */
static inline uint64_t kvf__wire_put_table_len(uint32_t count)
{
    return 8u + (uint64_t)count * 24u;
}

/* Whether an opcode's request carries object data after an item table (its payload is not read
 * whole): PUT, COMMIT, WRITE and SEAL. */
static inline int kvf__wire_is_data_op(uint32_t opcode)
{
    return opcode == KVF_OP_PUT || opcode == KVF_OP_COMMIT || opcode == KVF_OP_WRITE ||
           opcode == KVF_OP_SEAL;
}

/* Bytes per row of a data request's item table: (key, u64 length) for PUT and COMMIT, (key, u64
 * offset, u64 length) for WRITE and SEAL. */
static inline uint32_t kvf__wire_data_row(uint32_t opcode)
{
    return opcode == KVF_OP_WRITE || opcode == KVF_OP_SEAL ? 32u : 24u;
}

/* Size of the item table at the front of a data request's payload: 8 (namespace) + rows. */
static inline uint64_t kvf__wire_data_table_len(uint32_t opcode, uint32_t count)
{
    return 8u + (uint64_t)count * kvf__wire_data_row(opcode);
}

/* Checks a data request's table (h->opcode says its rows): the lengths summing exactly to the rest
 * of the payload, every one nonzero but a SEAL's (0 there drops the reservation). Returns 0, or
 * KVF_EPROTO with msg. */
int kvf__wire_put_table_check(const kvf_wire_hdr *h, const uint8_t *table, char *msg,
                              size_t msglen);

static inline void kvf__wire_key_put(uint8_t *p, const kvf_key *k)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(k->lo >> (8 * i));
        p[8 + i] = (uint8_t)(k->hi >> (8 * i));
    }
}

static inline kvf_key kvf__wire_key_get(const uint8_t *p)
{
    kvf_key k = {0, 0};
    for (int i = 7; i >= 0; i--) {
        k.lo = (k.lo << 8) | p[i];
        k.hi = (k.hi << 8) | p[8 + i];
    }
    return k;
}

#endif
