#!/usr/bin/env python3
"""Checks mlx_probe.py's derivation against recorded outcomes (mlx-lm cannot run here).

 1. The transcription of mlx-lm's public cache API gives a record that kvf parses and that
    classifies every action exactly as the built-in mlx-lm record does, against every built-in
    peer, on either side.
 2. A counterfactual transcript changes the record field by field as its outcomes say.
 3. A live run here reports backend_infeasible (exit 3); a broken transcript exits 2.

usage: mlx_probe_check.py PROBE.py KVF_BINARY TRANSCRIPT_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_util  # noqa: E402
from check_util import fail  # noqa: E402

PEERS = ("kvf-store", "vllm", "llama.cpp", "reference", "mlx-lm")


def run(cmd, expect=0):
    return check_util.run(cmd, 60, expect)


def verdicts(kvf, local, remote):
    out = json.loads(run([kvf, "classify", "--local", local, "--remote", remote,
                          "--json"]).stdout)
    return [(a["action"], a["label"], a["reason"], round(a["score_s"], 9))
            for a in out["actions"]]


def main():
    probe, kvf, tdir = sys.argv[1:4]
    py = sys.executable
    with tempfile.TemporaryDirectory() as d:
        rec = os.path.join(d, "rec.json")
        ev = os.path.join(d, "ev.json")
        run([py, probe, "--replay", os.path.join(tdir, "mlx-lm-transcribed.json"), "--out", rec,
             "--evidence", ev])
        r = json.load(open(rec))
        want = {"platform": "macos", "apple_silicon": 1, "mem_kinds": 2, "quant_bits": 0b101111100,
                "quant_groups": 7, "trim": 1, "rotating_cache": 1, "rotating_with_quant": 0,
                "paged": 0, "layerwise_hooks": 0, "external_connector": 0, "async_load": 0}
        for k, v in want.items():
            if r[k] != v:
                fail("transcribed record: %s = %r, wanted %r" % (k, r[k], v))
        e = json.load(open(ev))
        rot = [x for x in e["evidence"] if x.get("action") == "rotating_quantize"]
        if not rot or rot[0]["ok"] or rot[0]["error"] != "NotImplementedError":
            fail("evidence must show the rotating cache's quantization failing: %r" % rot)
        for peer in PEERS:
            if verdicts(kvf, rec, peer) != verdicts(kvf, "mlx-lm", peer):
                fail("probe record and built-in mlx-lm classify differently against " + peer)
            if verdicts(kvf, peer, rec) != verdicts(kvf, peer, "mlx-lm"):
                fail("as the remote side, against " + peer)

        cf = os.path.join(d, "cf.json")
        saved = os.path.join(d, "saved.json")
        run([py, probe, "--replay", os.path.join(tdir, "counterfactual.json"), "--out", cf,
             "--save-transcript", saved])
        c = json.load(open(cf))
        want = {"platform": "linux", "apple_silicon": 0, "mem_kinds": 1,
                "quant_bits": (1 << 2) | (1 << 4) | (1 << 5) | (1 << 8), "quant_groups": 7,
                "trim": 0, "rotating_with_quant": 1, "paged": 1}
        for k, v in want.items():
            if c[k] != v:
                fail("counterfactual record: %s = %r, wanted %r" % (k, c[k], v))
        # The saved transcript replays to the same record.
        again = run([py, probe, "--replay", saved]).stdout
        if json.loads(again) != c:
            fail("a saved transcript does not replay to the same record")
        if verdicts(kvf, cf, "kvf-store") == verdicts(kvf, "mlx-lm", "kvf-store"):
            fail("the counterfactual record classifies like mlx-lm: the record is not used")

        p = subprocess.run([py, probe], capture_output=True, text=True, timeout=60)
        if p.returncode != 3 or "backend_infeasible" not in p.stderr:
            fail("live run without mlx: exit %d, %r" % (p.returncode, p.stderr))
        bad = os.path.join(d, "bad.json")
        with open(bad, "w") as f:
            f.write('{"outcomes": {}}')
        run([py, probe, "--replay", bad], expect=2)
        with open(bad, "w") as f:
            json.dump({"facts": {"system": "Darwin", "machine": "arm64", "api_surface": [],
                                 "mlx_lm_version": "x"}, "outcomes": {"trim": {"ok": True}}}, f)
        run([py, probe, "--replay", bad], expect=2)
    print("mlx_probe_check: ok")


if __name__ == "__main__":
    main()
