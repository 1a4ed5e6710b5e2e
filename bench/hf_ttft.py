#!/usr/bin/env python3
"""Time to first token of a transformers model with a kvfabric prefix cache, against recomputing
the prompt, in the same run (docs/python.md).

A model built from its published configuration with random weights (bf16 on the GPU: compute,
memory and KV sizes are real, the text is not), a prompt of --prompt tokens of which --cached is
held by a kvf-store on this host (shared memory, or TCP with --transport tcp). Each round times
generate(max_new_tokens=1) on a prompt that shares the cached prefix with a new suffix, with
kvfabric (the prefix loaded layer by layer while the suffix is computed) and without (the whole
prompt computed), and says whether both gave the same first token.

    bench/hf_ttft.py --model llama-3.1-8b --prompt 32768 --cached 0.9 [--transport tcp] [--json]

Needs torch and transformers (a GPU machine); prints one JSON line with --json. Real.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import kvfabric as kvf  # noqa: E402
from kvfabric import models  # noqa: E402


def start_store(binary, memory, transport):
    extra = ["--shm", "off"] if transport == "tcp" else []
    p = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--memory", memory,
                          "--log-level", "warn", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    if "listen=" not in line:
        p.kill()
        raise SystemExit(f"hf_ttft: kvf-store did not start: {line!r}")
    return p, line.split("listen=")[1].split()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="a name of kvfabric.models.CONFIGS "
                    "or a config.json")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the config (a quick "
                    "check); 0: all")
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--cached", type=float, default=0.9, help="fraction of the prompt cached")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transport", choices=["shm", "tcp"], default="shm")
    ap.add_argument("--store-bin", default=os.path.join(HERE, "..", "build", "bin", "kvf-store"))
    ap.add_argument("--store-memory", default="16G")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch
    import transformers
    from kvfabric.transformers import KVFabricGenerate

    if not torch.cuda.is_available():
        raise SystemExit("hf_ttft: needs a CUDA device")
    cfg_d = models.config(a.model)
    if a.layers:
        cfg_d["num_hidden_layers"] = a.layers
    models.serving_attention()  # as kvfabric.serve runs: no per-length cuDNN plans
    t0 = time.monotonic()
    model, _, _ = models.build(cfg_d, "transformers", "cuda", "bf16", seed=0)
    cfg = model.config
    build_s = time.monotonic() - t0
    layout = models.layout_for(cfg, a.model, page_tokens=16, chunk_tokens=256, dtype="bf16")
    cached = int(a.prompt * a.cached) // layout.chunk_tokens * layout.chunk_tokens
    store, addr = start_store(a.store_bin, a.store_memory, a.transport)
    res = {"bench": "hf_ttft", "label": "real", "model": a.model,
           "layers": cfg.num_hidden_layers, "prompt_tokens": a.prompt, "cached_tokens": cached,
           "kv_bytes_per_token": layout.bytes_per_token, "transport": a.transport,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(), "model_build_s": round(build_s, 2)}
    try:
        cn = kvf.Connector(layout, nodes=[addr], deadline_ms=60000)
        res["transport_used"] = cn.transport()[0]
        gen = KVFabricGenerate(model, cn, layout, staging_tokens=a.prompt)
        rnd = random.Random(7)
        prefix = [rnd.randrange(cfg.vocab_size) for _ in range(cached)]

        def prompt():
            return prefix + [rnd.randrange(cfg.vocab_size) for _ in range(a.prompt - cached)]

        def timed(fn):
            torch.cuda.synchronize()
            t = time.monotonic()
            out = fn()
            torch.cuda.synchronize()
            return time.monotonic() - t, out

        with torch.no_grad():
            # Warm-up, and the prefix saved once (by a first request that computes it).
            model.generate(torch.tensor([prefix[:1024]], device="cuda"), max_new_tokens=1,
                           do_sample=False, pad_token_id=0)
            _, (_, info0) = timed(lambda: gen.generate(prompt(), max_new_tokens=1,
                                                       do_sample=False, pad_token_id=0))
            res["saved_tokens"] = info0.saved_tokens
            # The first load registers the store's arena with the driver (once per process).
            t_first, _ = timed(lambda: gen.generate(prompt(), max_new_tokens=1, do_sample=False,
                                                    pad_token_id=0, save=False))
            res["first_kvfabric_ms"] = round(t_first * 1e3, 1)
            rec, reu, same, loaded = [], [], 0, []
            for _ in range(a.rounds):
                p = prompt()
                ids = torch.tensor([p], device="cuda")
                dt_r, out_r = timed(lambda: model.generate(ids, max_new_tokens=1,
                                                           do_sample=False, pad_token_id=0))
                st0 = cn.stats()
                dt_k, (out_k, info) = timed(lambda: gen.generate(p, max_new_tokens=1,
                                                                 do_sample=False, pad_token_id=0,
                                                                 save=False))
                st1 = cn.stats()
                rec.append(dt_r)
                reu.append(dt_k)
                loaded.append(info.loaded_tokens)
                same += int(out_r[0].tolist()[-1] == out_k[-1])
                moved = (st1["load_bytes"] - st0["load_bytes"])
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        res.update({
            "ttft_recompute_ms": round(med(rec) * 1e3, 1),
            "ttft_kvfabric_ms": round(med(reu) * 1e3, 1),
            "ttft_speedup": round(med(rec) / med(reu), 2),
            "ttft_recompute_ms_rounds": [round(x * 1e3, 1) for x in rec],
            "ttft_kvfabric_ms_rounds": [round(x * 1e3, 1) for x in reu],
            "loaded_tokens_rounds": loaded,
            "load_bytes_per_round": moved,
            "first_token_same": f"{same} of {a.rounds}",
        })
        res["kv_gbytes_loaded"] = round(moved / 1e9, 3)
        # Where the time goes: the load alone (every layer in), handing it to the cache (in
        # place: the cache is kept in the staging pages), and the suffix computed on a full
        # cache (no load in flight).
        from kvfabric import attention
        P = layout.page_tokens
        with torch.no_grad():
            p = prompt()
            t_load, ld = timed(lambda: cn.load(p[:cached], list(range(cached // P))))
            t_wait, _ = timed(ld.wait)
            ld.close()
            cache = gen.new_cache()
            t_hand, _ = timed(lambda: [gen._to_cache(cache, i, cached)
                                       for i in range(layout.layers)])
            ids = torch.tensor([p], device="cuda")
            t_suffix, _ = timed(lambda: model.generate(ids, past_key_values=cache,
                                                       max_new_tokens=1, do_sample=False,
                                                       pad_token_id=0))
        res["load_alone_ms"] = round((t_load + t_wait) * 1e3, 1)
        res["load_alone_gbps"] = round(moved / (t_load + t_wait) / 1e9, 2)
        res["handoff_to_dynamic_cache_ms"] = round(t_hand * 1e3, 1)
        res["suffix_compute_ms"] = round(t_suffix * 1e3, 1)
        res["cache_in_staging"] = bool(getattr(cache, "staged", False))
        res["attention_calls"] = attention.stats()
        res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        cn.close()
    finally:
        store.terminate()
        store.wait()
    if a.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for k in sorted(res):
            print(f"{k:28} {res[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
