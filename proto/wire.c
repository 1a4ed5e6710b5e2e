/*
 * Frame header encoding and validation (docs/protocol.md, "Frames" and "Payloads").
 */
#include "wire.h"

#include "auth.h"

#include "kvf/error.h"

#include "bytes.h"
#include "errf.h"

#include <inttypes.h>

const char *kvf__wire_opcode_name(uint32_t opcode)
{
    switch (opcode) {
#define XX(name, num, text) \
    case num:               \
        return text;
        KVF_OPCODE_MAP(XX)
#undef XX
    default:
        return NULL;
    }
}

void kvf__wire_hdr_encode(uint8_t out[KVF_WIRE_HEADER_LEN], const kvf_wire_hdr *h)
{
    kvf__put_u32(out, KVF_WIRE_MAGIC);
    kvf__put_u16(out + 4, h->version ? h->version : KVF_WIRE_VERSION);
    kvf__put_u16(out + 6, h->opcode);
    kvf__put_u32(out + 8, h->flags);
    kvf__put_u32(out + 12, (uint32_t)h->status);
    kvf__put_u64(out + 16, h->request_id);
    kvf__put_u32(out + 24, h->item_count);
    kvf__put_u32(out + 28, 0);
    kvf__put_u64(out + 32, h->payload_len);
}

/* Ops whose requests carry no items. */
static int is_itemless_op(uint32_t op)
{
    return op == KVF_OP_HELLO || op == KVF_OP_AUTH || op == KVF_OP_CLEAR || op == KVF_OP_STATS ||
           op == KVF_OP_RDMA_RELEASE || op == KVF_OP_SHM_MAP;
}

int kvf__wire_hdr_decode(const uint8_t in[KVF_WIRE_HEADER_LEN], const kvf_wire_limits *lim,
                         kvf_wire_hdr *h, char *msg, size_t msglen)
{
    uint32_t magic = kvf__get_u32(in);
    h->version = kvf__get_u16(in + 4);
    h->opcode = kvf__get_u16(in + 6);
    h->flags = kvf__get_u32(in + 8);
    h->status = (int32_t)kvf__get_u32(in + 12);
    h->request_id = kvf__get_u64(in + 16);
    h->item_count = kvf__get_u32(in + 24);
    uint32_t reserved = kvf__get_u32(in + 28);
    h->payload_len = kvf__get_u64(in + 32);

    if (magic != KVF_WIRE_MAGIC)
        return kvf__errf(msg, msglen, KVF_EPROTO, "bad magic 0x%08" PRIx32 " (expected 0x%08x)",
                         magic, KVF_WIRE_MAGIC);
    if (h->version != KVF_WIRE_VERSION)
        return kvf__errf(msg, msglen, KVF_EVERSION,
                         "unsupported protocol version %u (this node speaks %u)", h->version,
                         KVF_WIRE_VERSION);
    /* A fatal reply echoes whatever opcode the bad frame carried, known or not. */
    int fatal_reply = (h->flags & KVF_WF_REPLY) && (h->flags & KVF_WF_FATAL) && lim->expect_reply;
    if (!kvf__wire_opcode_name(h->opcode) && !fatal_reply)
        return kvf__errf(msg, msglen, KVF_EPROTO, "unknown opcode %u", h->opcode);
    if (h->flags & ~KVF_WF_KNOWN)
        return kvf__errf(msg, msglen, KVF_EPROTO, "unknown flags 0x%" PRIx32,
                         h->flags & ~KVF_WF_KNOWN);
    if (reserved != 0)
        return kvf__errf(msg, msglen, KVF_EPROTO, "reserved header field is %" PRIu32 ", not 0",
                         reserved);
    int is_reply = (h->flags & KVF_WF_REPLY) != 0;
    if (is_reply != (lim->expect_reply != 0))
        return kvf__errf(msg, msglen, KVF_EPROTO,
                         is_reply ? "reply flag set on a request"
                                  : "reply flag missing on a reply");
    if (is_reply) {
        if (!kvf_err_is_known(h->status))
            return kvf__errf(msg, msglen, KVF_EPROTO, "unknown status %" PRId32, h->status);
    } else {
        if (h->status != 0)
            return kvf__errf(msg, msglen, KVF_EPROTO, "status %" PRId32 " set on a request",
                             h->status);
        if (h->flags & (KVF_WF_MORE | KVF_WF_FATAL))
            return kvf__errf(msg, msglen, KVF_EPROTO, "reply-only flags on a request");
        if ((h->flags & KVF_WF_STREAM) && h->opcode != KVF_OP_GET)
            return kvf__errf(msg, msglen, KVF_EPROTO, "stream flag on %s",
                             kvf__wire_opcode_name(h->opcode));
        if ((h->flags & KVF_WF_ALL_NS) && h->opcode != KVF_OP_CLEAR)
            return kvf__errf(msg, msglen, KVF_EPROTO, "all-namespaces flag on %s",
                             kvf__wire_opcode_name(h->opcode));
        if ((h->flags & KVF_WF_TIERS) && h->opcode != KVF_OP_EXISTS && h->opcode != KVF_OP_LOOKUP)
            return kvf__errf(msg, msglen, KVF_EPROTO, "tiers flag on %s",
                             kvf__wire_opcode_name(h->opcode));
    }
    uint32_t max_items = lim->max_items ? lim->max_items : KVF_WIRE_MAX_ITEMS;
    if (max_items > KVF_WIRE_MAX_ITEMS)
        max_items = KVF_WIRE_MAX_ITEMS;
    if (h->item_count > max_items)
        return kvf__errf(msg, msglen, KVF_E2BIG, "%" PRIu32 " items exceed the limit of %" PRIu32,
                         h->item_count, max_items);
    if (is_reply) {
        if (h->payload_len > lim->max_request)
            return kvf__errf(msg, msglen, KVF_E2BIG, "reply of %" PRIu64 " bytes exceeds %" PRIu64,
                             h->payload_len, lim->max_request);
        return 0;
    }
    if (is_itemless_op(h->opcode) && h->item_count != 0)
        return kvf__errf(msg, msglen, KVF_EPROTO, "%s carries no items, got %" PRIu32,
                         kvf__wire_opcode_name(h->opcode), h->item_count);
    if (!is_itemless_op(h->opcode) && h->item_count == 0)
        return kvf__errf(msg, msglen, KVF_EPROTO, "%s with no items",
                         kvf__wire_opcode_name(h->opcode));
    if (kvf__wire_is_data_op(h->opcode)) {
        uint64_t table = kvf__wire_data_table_len(h->opcode, h->item_count);
        /* every item carries a byte at least, but a SEAL's (which may drop its reservation) */
        uint64_t least = table + (h->opcode == KVF_OP_SEAL ? 0 : h->item_count);
        if (h->payload_len > lim->max_request)
            return kvf__errf(msg, msglen, KVF_E2BIG,
                             "request of %" PRIu64 " bytes exceeds the node's limit of %" PRIu64,
                             h->payload_len, lim->max_request);
        if (h->payload_len < least)
            return kvf__errf(msg, msglen, KVF_EPROTO,
                             "payload of %" PRIu64 " bytes is shorter than its table of %" PRIu32
                             " items (%" PRIu64 " bytes) and a byte of data for each%s",
                             h->payload_len, h->item_count, table,
                             h->payload_len >= table ? " (an item of no bytes is not stored)" : "");
        return 0;
    }
    if (h->payload_len > KVF_WIRE_MAX_CONTROL)
        return kvf__errf(msg, msglen, KVF_E2BIG, "%s payload of %" PRIu64 " bytes is too large",
                         kvf__wire_opcode_name(h->opcode), h->payload_len);
    /* COPY's exact length depends on its address, checked once the payload is in. */
    if (h->opcode != KVF_OP_COPY) {
        uint64_t need = 0;
        kvf__wire_control_len(h, NULL, &need);
        if (h->payload_len != need)
            return kvf__errf(msg, msglen, KVF_EPROTO,
                             "%s with %" PRIu32 " items needs a payload of %" PRIu64
                             " bytes, not %" PRIu64,
                             kvf__wire_opcode_name(h->opcode), h->item_count, need, h->payload_len);
    } else if (h->payload_len < 16) {
        return kvf__errf(msg, msglen, KVF_EPROTO, "copy payload of %" PRIu64 " bytes is truncated",
                         h->payload_len);
    }
    return 0;
}

int kvf__wire_control_len(const kvf_wire_hdr *h, const uint8_t *payload, uint64_t *need)
{
    uint64_t n = h->item_count;
    switch (h->opcode) {
    case KVF_OP_HELLO:
        *need = 24;
        return 0;
    case KVF_OP_AUTH:
        *need = KVF_AUTH_REQ_LEN;
        return 0;
    case KVF_OP_STATS:
        *need = 0;
        return 0;
    case KVF_OP_CLEAR:
        *need = 8;
        return 0;
    case KVF_OP_RDMA_RELEASE:
    case KVF_OP_SHM_MAP:
        *need = 16;
        return 0;
    case KVF_OP_SHM_PUT:
    case KVF_OP_SHM_GET:
        *need = 8 + 32 * n;
        return 0;
    case KVF_OP_ADMIT:
    case KVF_OP_RDMA_RESERVE:
    case KVF_OP_RDMA_COMMIT:
        *need = 8 + 24 * n;
        return 0;
    case KVF_OP_GET:
    case KVF_OP_EXISTS:
    case KVF_OP_LOOKUP:
    case KVF_OP_EVICT:
    case KVF_OP_UNPIN:
        *need = 8 + 16 * n;
        return 0;
    case KVF_OP_PIN:
    case KVF_OP_COMPRESS:
    case KVF_OP_DECOMPRESS:
    case KVF_OP_RDMA_GET:
        *need = 16 + 16 * n;
        return 0;
    case KVF_OP_COPY: {
        if (!payload)
            return KVF_EPROTO;
        uint32_t alen = kvf__get_u32(payload + 8);
        if (alen == 0 || alen > KVF_WIRE_MAX_ADDR)
            return KVF_EPROTO;
        *need = 16 + ((alen + 7u) & ~7u) + 16 * n;
        return 0;
    }
    default:
        return KVF_EPROTO;
    }
}

int kvf__wire_put_table_check(const kvf_wire_hdr *h, const uint8_t *table, char *msg, size_t msglen)
{
    uint64_t sum = 0;
    uint64_t rest = h->payload_len - kvf__wire_data_table_len(h->opcode, h->item_count);
    size_t row = kvf__wire_data_row(h->opcode);
    for (uint32_t i = 0; i < h->item_count; i++) {
        uint64_t len = kvf__get_u64(table + 8 + row * i + row - 8);
        if (len == 0 && h->opcode != KVF_OP_SEAL)
            return kvf__errf(msg, msglen, KVF_EPROTO, "item %" PRIu32 " has length 0", i);
        if (len > rest - sum)
            return kvf__errf(msg, msglen, KVF_EPROTO,
                             "item lengths exceed the payload (item %" PRIu32 ")", i);
        sum += len;
    }
    if (sum != rest)
        return kvf__errf(msg, msglen, KVF_EPROTO,
                         "item lengths sum to %" PRIu64 " bytes but the payload carries %" PRIu64,
                         sum, rest);
    return 0;
}
