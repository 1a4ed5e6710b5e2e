#!/usr/bin/env python3
"""Independent reference implementation of kvfabric's layout fingerprint and chunk keys.

Written from docs/keys.md alone, with Debian's python3-xxhash, so that the C implementation is
checked against the specification rather than against itself.

  keys_ref.py check FILE   reads the JSON cases that `test_keys_dump` writes and recomputes
                           every fingerprint, seed and key; exits 1 on the first disagreement.
  keys_ref.py golden       prints the golden vectors of docs/keys.md.
"""
import json
import struct
import sys

import xxhash

DTYPES = ["f32", "f16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8"]
KINDS = {"kv": 0, "latent": 1}
LAYOUT_FORMAT_VERSION = 1
KEY_FORMAT_VERSION = 1


def layout_fingerprint(l):
    mid = l["model_id"].encode()
    enc = b"KVFL" + struct.pack("<II", LAYOUT_FORMAT_VERSION, len(mid)) + mid
    enc += struct.pack(
        "<9I",
        l["layers"],
        l["kv_heads"],
        l["head_dim"],
        DTYPES.index(l["dtype"]),
        KINDS[l["kind"]],
        l["page_tokens"],
        l["chunk_tokens"],
        l["tp_rank"],
        l["tp_size"],
    )
    return xxhash.xxh3_64_intdigest(enc)


def keyspace_seed(l, salt):
    mid = l["model_id"].encode()
    enc = b"KVFK" + struct.pack("<II", KEY_FORMAT_VERSION, len(mid)) + mid
    enc += struct.pack("<QI", layout_fingerprint(l), len(salt)) + salt
    return xxhash.xxh3_64_intdigest(enc)


def chunk_keys(l, salt, tokens):
    """Returns the keys of the full chunks as (lo, hi) pairs."""
    c = l["chunk_tokens"]
    head = struct.pack("<Q", keyspace_seed(l, salt))
    keys = []
    for i in range(len(tokens) // c):
        body = struct.pack("<%dI" % c, *tokens[i * c:(i + 1) * c])
        h = xxhash.xxh3_128_intdigest(head + body)
        lo, hi = h & (2**64 - 1), h >> 64
        keys.append((lo, hi))
        head = struct.pack("<QQ", lo, hi)
    return keys


def key_hex(k):
    return "%016x%016x" % (k[1], k[0])


def check(path):
    with open(path) as f:
        cases = json.load(f)
    n = 0
    for case in cases:
        l = case["layout"]
        salt = bytes.fromhex(case["salt_hex"])
        fp = "%016x" % layout_fingerprint(l)
        if fp != case["fingerprint"]:
            print("case %d: fingerprint C %s, Python %s" % (n, case["fingerprint"], fp))
            return 1
        seed = "%016x" % keyspace_seed(l, salt)
        if seed != case["seed"]:
            print("case %d: seed C %s, Python %s" % (n, case["seed"], seed))
            return 1
        want = [key_hex(k) for k in chunk_keys(l, salt, case["tokens"])]
        if want != case["keys"]:
            print("case %d: keys differ\n C      %s\n Python %s" % (n, case["keys"], want))
            return 1
        n += 1
    if n == 0:
        print("no cases read from %s" % path)
        return 1
    print("python reference agrees with C on %d cases" % n)
    return 0


def golden():
    l = {
        "model_id": "ref-tiny", "layers": 4, "kv_heads": 2, "head_dim": 32, "dtype": "f32",
        "kind": "kv", "page_tokens": 16, "chunk_tokens": 64, "tp_rank": 0, "tp_size": 1,
    }
    tokens = list(range(1000, 1000 + 3 * 64))
    print("fingerprint %016x" % layout_fingerprint(l))
    print("seed        %016x" % keyspace_seed(l, b""))
    for i, k in enumerate(chunk_keys(l, b"", tokens)):
        print("key[%d]      %s" % (i, key_hex(k)))
    print("seed(salt=tenant-a) %016x" % keyspace_seed(l, b"tenant-a"))
    for i, k in enumerate(chunk_keys(l, b"tenant-a", tokens)):
        print("key[%d]      %s" % (i, key_hex(k)))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        sys.exit(check(sys.argv[2]))
    if len(sys.argv) == 2 and sys.argv[1] == "golden":
        golden()
        sys.exit(0)
    print(__doc__)
    sys.exit(2)
