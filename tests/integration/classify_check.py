#!/usr/bin/env python3
"""Checks `kvf classify`'s gap constants: calibration from kvf-bench results, the order in which
defaults, calibration files, --state and --live-pressure apply, and the errors.

usage: classify_check.py KVF_BINARY
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_util import fail  # noqa: E402


def kvf(args, expect=0):
    p = subprocess.run([sys.argv[1]] + args, capture_output=True, text=True, timeout=60)
    if p.returncode != expect:
        fail("kvf %s: exit %d (wanted %d): %s" % (" ".join(args), p.returncode, expect, p.stderr))
    return p


def classify(extra):
    out = kvf(["classify", "--local", "mlx-lm", "--remote", "kvf-store", "--json"] + extra)
    d = json.loads(out.stdout)
    return d["state"], {a["action"]: a["score_s"] for a in d["actions"]}


def close(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def main():
    with tempfile.TemporaryDirectory() as d:
        def write(name, obj):
            path = os.path.join(d, name)
            with open(path, "w") as f:
                json.dump(obj, f)
            return path

        base, _ = classify([])
        store = write("store.json", {"bench": "store", "label": "real", "kvf_get_gbps": 1.5})
        conn = write("conn.json", {"bench": "connector", "label": "real", "ttft_model": "ref-100m",
                                   "ttft_full_ms_8k": 4096.0})
        st, sc = classify(["--calibration", store])
        if st["tcp_bytes_per_s"] != 1.5e9:
            fail("store calibration: tcp_bytes_per_s %r" % st["tcp_bytes_per_s"])
        c, n, b = st["cached_tokens"], st["prompt_tokens"], st["kv_bytes_per_token"]
        want = c / st["prefill_tokens_per_s"] - c * b / 1.5e9
        if not close(sc["retrieve"], want):
            fail("retrieve score %r, wanted %r from the calibrated bandwidth" % (sc["retrieve"], want))
        for k in ("prefill_tokens_per_s", "kv_bytes_per_token", "memory_pressure"):
            if st[k] != base[k]:
                fail("a store calibration must leave %s alone" % k)

        est = json.loads(kvf(["estimate", "--model", "ref-100m", "--tokens", "1", "--json"]).stdout)
        st, _ = classify(["--calibration", store, "--calibration", conn])
        if not close(st["prefill_tokens_per_s"], 2000.0) or st["tcp_bytes_per_s"] != 1.5e9:
            fail("connector calibration: %r" % st)
        if st["kv_bytes_per_token"] != est["bytes_per_token"]:
            fail("kv_bytes_per_token %r, the model's is %r" % (st["kv_bytes_per_token"],
                                                              est["bytes_per_token"]))
        # --state overrides calibration; --live-pressure overrides both.
        state = write("state.json", {"tcp_bytes_per_s": 2e9, "memory_pressure": 0.7})
        st, _ = classify(["--calibration", store, "--state", state])
        if st["tcp_bytes_per_s"] != 2e9 or st["memory_pressure"] != 0.7:
            fail("--state must override calibration: %r" % st)
        st, _ = classify(["--state", state, "--live-pressure"])
        if not 0 <= st["memory_pressure"] <= 1 or st["memory_pressure"] == 0.7:
            fail("--live-pressure must read telemetry: %r" % st["memory_pressure"])

        bad = [({"bench": "store", "label": "simulated", "kvf_get_gbps": 1}, "labelled real"),
               ({"bench": "store", "label": "real"}, "kvf_get_gbps"),
               ({"bench": "connector", "label": "real", "ttft_model": "no-such-model",
                 "ttft_full_ms_8k": 1}, "ttft_model"),
               ({"bench": "sched", "label": "real"}, "no constants"),
               ([1, 2], "expected a JSON object")]
        for i, (obj, why) in enumerate(bad):
            p = kvf(["classify", "--local", "mlx-lm", "--remote", "kvf-store", "--calibration",
                     write("bad%d.json" % i, obj)], expect=2)
            if why not in p.stderr:
                fail("calibration %r: message %r lacks %r" % (obj, p.stderr, why))
        kvf(["classify", "--local", "mlx-lm", "--remote", "kvf-store", "--calibration",
             os.path.join(d, "missing.json")], expect=2)
    print("classify_check: ok")


if __name__ == "__main__":
    main()
