/*
 * libFuzzer target for everything that reads bytes from a peer before trusting them: the frame
 * header decoder (as a server and as a client), the control payload length rules, the PUT item
 * table check, and the object header parser and verifier. Any crash, sanitizer report or
 * disagreement between the checks below is a bug.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kvf/kvf.h"

#include "kvf/object.h"
#include "wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size >= KVF_WIRE_HEADER_LEN) {
        for (int reply = 0; reply < 2; reply++) {
            kvf_wire_limits lim = {
                .max_request = 1u << 20, .max_items = 4096, .expect_reply = reply};
            kvf_wire_hdr h;
            char msg[200];
            int rc = kvf__wire_hdr_decode(data, &lim, &h, msg, sizeof msg);
            if (rc != 0 || reply)
                continue;
            const uint8_t *payload = data + KVF_WIRE_HEADER_LEN;
            uint64_t avail = size - KVF_WIRE_HEADER_LEN;
            if (h.payload_len != avail)
                continue;
            if (kvf__wire_is_data_op(h.opcode)) {
                uint64_t tl = kvf__wire_data_table_len(h.opcode, h.item_count);
                size_t row = kvf__wire_data_row(h.opcode);
                if (avail >= tl && kvf__wire_put_table_check(&h, payload, msg, sizeof msg) == 0) {
                    /* The table was accepted: its lengths must sum to the data that follows. */
                    uint64_t sum = 0;
                    for (uint32_t i = 0; i < h.item_count; i++) {
                        uint64_t len = 0;
                        memcpy(&len, payload + 8 + row * i + row - 8, 8);
                        sum += len;
                    }
                    if (sum != avail - tl)
                        __builtin_trap();
                }
            } else {
                uint64_t need = 0;
                if (kvf__wire_control_len(&h, payload, &need) == 0 && h.opcode != KVF_OP_COPY &&
                    need != avail)
                    __builtin_trap(); /* the decoder let a wrong length through */
            }
        }
    }
    kvf_obj_info info;
    if (kvf_obj_parse(data, size, &info) == 0) {
        /* A parsed header's segment table lies inside the input. */
        if (info.header_len > size)
            __builtin_trap();
        for (uint32_t l = 0; l < info.layers; l++)
            (void)kvf_obj_seg_at(&info, l);
    }
    (void)kvf_obj_verify(data, size, &info);
    return 0;
}
