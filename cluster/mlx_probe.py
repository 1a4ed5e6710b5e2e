#!/usr/bin/env python3
"""mlx_probe.py (kvfabric): the engine-side capability probe for mlx-lm.

It fills an mlx-lm host's capability record (the JSON that `kvf classify --local FILE` and the
connector read) by executing tiny actions against mlx-lm, not by declaration:

  quantize      a one-token KVCache to every width (2 3 4 5 6 8 bits) and group size (32 64 128)
  trim          drop one token of a two-token KVCache
  rotating      build a RotatingKVCache (what max_kv_size selects) and try to quantize it
  prompt-cache  save a one-token cache with save_prompt_cache, load it back, compare

Capabilities that no tiny action can exercise (a paged layout, layerwise hooks, an external
connector, asynchronous loads, removal of a middle range) are read from the API surface of
mlx_lm.models.cache, and the evidence says so.

Live runs need mlx and mlx-lm (Apple Silicon). `--replay TRANSCRIPT` runs the same derivation on
recorded outcomes instead; `--save-transcript FILE` writes a live run's outcomes in that format.

usage: mlx_probe.py [--replay TRANSCRIPT] [--out RECORD.json] [--evidence FILE.json]
                    [--save-transcript FILE.json]
"""
import argparse
import json
import os
import platform
import sys
import tempfile

BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
GROUP_BIT = {32: 1, 64: 2, 128: 4}
MEMK_UNIFIED = 0x2
MEMK_HOST = 0x1
TRANSPORT_TCP = 0x1
# Names in mlx_lm.models.cache (or on KVCache) that would mean a capability exists.
SURFACE = {
    "paged": ("PagedKVCache", "BlockTable", "PagedAttention"),
    "layerwise_hooks": ("register_layer_hook", "on_layer_done", "wait_for_layer_load"),
    "external_connector": ("KVConnector", "register_connector", "KVConnectorBase"),
    "async_load": ("load_async", "async_load_prompt_cache"),
    "partial_evict": ("remove", "evict", "drop_range", "seq_rm"),
}


class ProbeError(Exception):
    """An action's failure, as mlx-lm raised it (type name and message)."""

    def __init__(self, kind, message):
        super().__init__("%s: %s" % (kind, message))
        self.kind = kind
        self.message = message


class LiveMLX:
    """Executes the actions against the installed mlx and mlx-lm."""

    def __init__(self):
        import mlx.core as mx  # an ImportError is reported by main
        from mlx_lm.models import cache

        self.mx = mx
        self.cache = cache

    def facts(self):
        import importlib.metadata as md

        surface = sorted(set(dir(self.cache)) | set(dir(self.cache.KVCache)))
        return {
            "system": platform.system(),
            "machine": platform.machine(),
            "mlx_version": md.version("mlx"),
            "mlx_lm_version": md.version("mlx-lm"),
            "default_device": str(self.mx.default_device()),
            "api_surface": surface,
        }

    def _token(self, n=1):
        k = self.mx.random.normal((1, 2, n, 128))
        return k, self.mx.random.normal((1, 2, n, 128))

    def _run(self, fn):
        try:
            return fn()
        except Exception as e:  # every failure is an outcome to record
            raise ProbeError(type(e).__name__, str(e)) from None

    def quantize(self, bits, group):
        def go():
            c = self.cache.KVCache()
            c.update_and_fetch(*self._token())
            q = c.to_quantized(group_size=group, bits=bits)
            self.mx.eval(q.state)
            return {"offset": q.offset}

        return self._run(go)

    def trim(self):
        def go():
            c = self.cache.KVCache()
            c.update_and_fetch(*self._token(2))
            trimmable = bool(c.is_trimmable())
            n = c.trim(1) if trimmable else 0
            return {"trimmable": trimmable, "trimmed": int(n), "offset": int(c.offset)}

        return self._run(go)

    def rotating_create(self):
        def go():
            r = self.cache.RotatingKVCache(max_size=4, keep=0)
            r.update_and_fetch(*self._token())
            return {"offset": int(r.offset)}

        return self._run(go)

    def rotating_quantize(self):
        def go():
            r = self.cache.RotatingKVCache(max_size=4, keep=0)
            r.update_and_fetch(*self._token())
            q = r.to_quantized(group_size=64, bits=4)
            self.mx.eval(q.state)
            return {"offset": int(q.offset)}

        return self._run(go)

    def prompt_cache(self):
        def go():
            c = self.cache.KVCache()
            c.update_and_fetch(*self._token())
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "probe.safetensors")
                self.cache.save_prompt_cache(path, [c], {"kvf": "probe"})
                back, meta = self.cache.load_prompt_cache(path, return_metadata=True)
            equal = all(bool(self.mx.array_equal(a, b)) for a, b in zip(c.state, back[0].state))
            return {"equal": equal, "metadata": dict(meta)}

        return self._run(go)


class Replay:
    """Answers each action from a recorded transcript: a value, or the error that was raised."""

    def __init__(self, transcript):
        self.t = transcript
        self.outcomes = transcript["outcomes"]

    def facts(self):
        return self.t["facts"]

    def _get(self, name):
        if name not in self.outcomes:
            raise KeyError("the transcript has no outcome for %s" % name)
        o = self.outcomes[name]
        if o.get("ok"):
            return o.get("value", {})
        raise ProbeError(o.get("error", "Exception"), o.get("message", ""))

    def quantize(self, bits, group):
        return self._get("quantize:%d:%d" % (bits, group))

    def trim(self):
        return self._get("trim")

    def rotating_create(self):
        return self._get("rotating_create")

    def rotating_quantize(self):
        return self._get("rotating_quantize")

    def prompt_cache(self):
        return self._get("prompt_cache")


def attempt(evidence, outcomes, name, fn, *args):
    """Runs one action; records its outcome for the transcript and the evidence."""
    try:
        v = fn(*args)
        outcomes[name] = {"ok": True, "value": v}
        evidence.append({"action": name, "ok": True, "value": v})
        return True, v
    except ProbeError as e:
        outcomes[name] = {"ok": False, "error": e.kind, "message": e.message}
        evidence.append({"action": name, "ok": False, "error": e.kind, "message": e.message})
        return False, None


def probe(engine):
    """Returns (record, evidence, outcomes)."""
    facts = engine.facts()
    evidence, outcomes = [], {}
    apple = facts["system"] == "Darwin" and facts["machine"] in ("arm64", "aarch64")
    gpu = "gpu" in facts.get("default_device", "")
    rec = {
        "name": "probe:mlx-lm",
        "platform": "macos" if facts["system"] == "Darwin" else facts["system"].lower()[:15],
        "apple_silicon": int(apple),
        "transports": TRANSPORT_TCP,
        "rdma_devices": 0,
        "rdma_one_sided": 0,
        # Apple Silicon GPUs share the host's memory: the KV lives in unified memory.
        "mem_kinds": MEMK_UNIFIED if apple and gpu else MEMK_HOST,
        "xfer_mem_kinds": MEMK_HOST | MEMK_UNIFIED,
        "engine": "mlx-lm",
        "engine_version": facts["mlx_lm_version"][:31],
    }
    bits = groups = 0
    for b in BITS:
        for g in GROUPS:
            ok, _ = attempt(evidence, outcomes, "quantize:%d:%d" % (b, g), engine.quantize, b, g)
            if ok:
                bits |= 1 << b
                groups |= GROUP_BIT[g]
    rec["quant_bits"], rec["quant_groups"] = bits, groups

    ok, v = attempt(evidence, outcomes, "trim", engine.trim)
    rec["trim"] = int(ok and v["trimmable"] and v["trimmed"] == 1 and v["offset"] == 1)
    rec["trim_can_fail"] = 0

    ok, _ = attempt(evidence, outcomes, "rotating_create", engine.rotating_create)
    rec["rotating_cache"] = int(ok)
    okq, _ = attempt(evidence, outcomes, "rotating_quantize", engine.rotating_quantize)
    rec["rotating_with_quant"] = int(ok and okq)

    ok, v = attempt(evidence, outcomes, "prompt_cache", engine.prompt_cache)
    pc = ok and v["equal"] and v["metadata"].get("kvf") == "probe"
    evidence.append({"derived": "prompt_cache_round_trip", "value": bool(pc)})

    surface = set(facts.get("api_surface", []))
    for field, names in SURFACE.items():
        hit = sorted(surface.intersection(names))
        rec[field] = int(bool(hit))
        evidence.append({"field": field, "source": "api_surface", "looked_for": list(names),
                         "found": hit})
    rec["store_tiers"] = 0
    rec["codecs"] = 0
    return rec, evidence, {"facts": facts, "outcomes": outcomes}


def main(argv):
    ap = argparse.ArgumentParser(prog="mlx_probe.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--replay", help="derive the record from a recorded transcript")
    ap.add_argument("--out", help="write the capability record here (default: stdout)")
    ap.add_argument("--evidence", help="write each action's outcome and the derivation here")
    ap.add_argument("--save-transcript", help="write this run's outcomes as a transcript")
    a = ap.parse_args(argv)
    if a.replay:
        try:
            with open(a.replay) as f:
                engine = Replay(json.load(f))
            engine.facts()["api_surface"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print("mlx_probe: %s: not a usable transcript (%s)" % (a.replay, e), file=sys.stderr)
            return 2
        source = "replay of " + os.path.basename(a.replay)
    else:
        try:
            engine = LiveMLX()
        except ImportError as e:
            print("mlx_probe: backend_infeasible: mlx-lm cannot be imported here (%s); "
                  "it runs on Apple Silicon. Use --replay TRANSCRIPT to check the derivation."
                  % e, file=sys.stderr)
            return 3
        source = "live"
    try:
        rec, evidence, transcript = probe(engine)
    except (KeyError, TypeError) as e:
        print("mlx_probe: malformed transcript: %s" % (e,), file=sys.stderr)
        return 2
    text = json.dumps(rec, sort_keys=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    if a.evidence:
        with open(a.evidence, "w") as f:
            json.dump({"source": source, "evidence": evidence}, f, indent=1, sort_keys=True)
    if a.save_transcript:
        with open(a.save_transcript, "w") as f:
            json.dump(transcript, f, indent=1, sort_keys=True)
    ok = sum(1 for e in evidence if e.get("ok"))
    ran = sum(1 for e in evidence if "action" in e)
    print("mlx_probe (%s): %d of %d actions succeeded" % (source, ok, ran), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
