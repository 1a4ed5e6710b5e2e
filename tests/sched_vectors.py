#!/usr/bin/env python3
"""Writes KV event batches, encoded by an independent msgpack encoder (Debian's python3-msgpack),
for tests/unit/test_sched.c: vLLM's positional-array encoding and the newer map encoding (with a
"type" field) at both levels, block hashes as signed and unsigned integers and as bytes, and
kvfabric's store events. Output: for each batch, u32 LE source (instance index, or 1000 + store
node), u32 LE length, then the msgpack payload.

  sched_vectors.py OUT.bin
"""
import struct
import sys

import msgpack


def batch_array(events, dp_rank=None):
    b = [1732000000.25, events]
    if dp_rank is not None:
        b.append(dp_rank)
    return msgpack.packb(b, use_bin_type=True)


def batch_map(events):
    return msgpack.packb({"ts": 1732000001.5, "events": events, "data_parallel_rank": 0},
                         use_bin_type=True)


def main(path):
    out = []
    # Instance 0 (block size 4): three blocks, no parent; msgspec omits trailing defaults, so
    # the medium is left out of this one.
    out.append((0, batch_array([["BlockStored", [101, 102, 103], None, list(range(1, 13)), 4, None]])))
    # A child of block 103 whose hash is bytes.
    out.append((0, batch_array([["BlockStored", [b"\x01" * 32], 103, [13, 14, 15, 16], 4, None, "GPU"]], 0)))
    # Instance 1 (block size 4), map encoding at both levels, hashes beyond int64 and negative,
    # the same tokens as instance 0's first two blocks, held in host memory.
    out.append((1, batch_map([{"type": "BlockStored", "block_hashes": [2**63 + 7, -5],
                               "parent_block_hash": None, "token_ids": list(range(1, 9)),
                               "block_size": 4, "lora_id": None, "medium": "CPU"}])))
    # Instance 0 drops its second block: its prefix shrinks to one block.
    out.append((0, batch_array([["BlockRemoved", [102], "GPU"]])))
    # A malformed event among good ones, and an event kind this version does not know.
    out.append((1, batch_array([["BlockStored", "not a list"], ["SomethingNew", 1, 2],
                                ["BlockRemoved", [-5]]])))
    # Store node 2 admits two chunks, then evicts one (map encoding).
    k1 = bytes(range(16))
    k2 = bytes(range(16, 32))
    out.append((1002, batch_array([["ChunksAdmitted", 2, [k1, k2]]])))
    out.append((1002, batch_map([{"type": "ChunksEvicted", "node": 2, "keys": [k2]}])))
    # Instance 2 stores one block, then clears everything.
    out.append((2, batch_array([["BlockStored", [7], None, [1, 2, 3, 4], 4, None, "GPU"],
                                ["AllBlocksCleared"]])))
    with open(path, "wb") as f:
        for src, payload in out:
            f.write(struct.pack("<II", src, len(payload)))
            f.write(payload)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
