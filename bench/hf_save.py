#!/usr/bin/env python3
"""A prefill engine's save of the prompt's KV beside its forward pass, layer by layer, against
the save after the pass, in the same run (docs/python.md). On a GPU the model attends as
`kvfabric.serve` makes it (models.serving_attention).

kvfabric's serving engine (kvfabric.engine.Engine, as `python -m kvfabric.serve --backend torch`
runs it) on a model built from its published configuration with random weights (bf16 on the
GPU: compute, memory and KV sizes are real, the text is not), a kvf-store on this host (shared
memory, or TCP with --transport tcp). Each round prefills a new prompt of --prompt tokens as a
disaggregated prefill does (its chunks and its padded last chunk saved for the decode engine),
alternately with the save beside the pass and after it, and times the request (the answer waits
for the save: the decode engine loads what it stored) and the save's part after the pass.

    bench/hf_save.py --model llama-3.1-8b --prompt 8192 [--transport tcp] [--rounds 6] [--json]

Needs torch (a GPU machine); prints one JSON line with --json. Real.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import kvfabric as kvf  # noqa: E402
from kvfabric import models  # noqa: E402
from kvfabric.engine import Engine  # noqa: E402
from hf_ttft import start_store  # noqa: E402


SHM_PARTS = {"auto": None, "on": True, "off": False}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="a name of kvfabric.models.CONFIGS "
                    "or a config.json")
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=6, help="rounds of each mode (alternated)")
    ap.add_argument("--transport", choices=["shm", "tcp"], default="shm")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--store-bin", default=os.path.join(HERE, "..", "build", "bin", "kvf-store"))
    ap.add_argument("--store-memory", default="32G")
    ap.add_argument("--save-whole", action="store_true",
                    help="the connector puts a save once its last layer is gathered, not in parts "
                    "(over TCP): the A/B of docs/connector.md's saves in parts")
    ap.add_argument("--save-parts-shm", nargs="?", const="on", default="auto",
                    choices=["auto", "on", "off"],
                    help="over shared memory, the save in parts (on, over the store's Unix "
                    "socket) or whole (off, through the staging regions); auto: the "
                    "connector's default (parts where its client runs two I/O threads or more)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.prompt < 1 or a.rounds < 1:
        raise SystemExit("hf_save: --prompt and --rounds must be at least 1")

    import torch
    cfg = models.config(a.model)
    dtype = "bf16" if a.device == "cuda" else "f32"
    layout = models.layout_for(cfg, model_id=a.model, page_tokens=16, chunk_tokens=256,
                               dtype=dtype)
    if a.device.startswith("cuda"):
        models.serving_attention()  # as kvfabric.serve runs on a GPU
    model, factory, _ = models.build(cfg, "torch", a.device, dtype, 7)
    store, addr = start_store(a.store_bin, a.store_memory, a.transport)
    rng = random.Random(11)
    vocab = int(cfg["vocab_size"])
    times = {"beside": [], "after": []}
    after_pass = {"beside": [], "after": []}
    try:
        with kvf.Connector(layout, nodes=[addr], salt=f"hf-save-{os.getpid()}",
                           save_whole=a.save_whole,
                           save_parts_shm=SHM_PARTS[a.save_parts_shm]) as cn:
            eng = Engine(model, layout, factory, connector=cn, save_beside_tokens=0,
                         max_tokens=a.prompt + 2 * layout.chunk_tokens)
            transport = cn.transport()[0]
            eng.run("prefill", [rng.randrange(vocab) for _ in range(a.prompt)])  # warm-up
            for r in range(2 * a.rounds):
                mode = ("beside", "after")[(r + r // 2) % 2]  # ABBA: neither always first
                eng.save_beside_tokens = 0 if mode == "beside" else None
                toks = [rng.randrange(vocab) for _ in range(a.prompt)]
                if a.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                o = eng.run("prefill", toks)
                times[mode].append(time.perf_counter() - t)
                after_pass[mode].append(o.save_s)
                beside = "saved beside the forward pass, layer by layer" in o.notes
                if beside != (mode == "beside") or o.save_error != "KVF_OK" or \
                        o.saved_tokens != a.prompt // layout.chunk_tokens * layout.chunk_tokens:
                    raise SystemExit(f"hf_save: round {r} ({mode}): beside={beside}, save "
                                     f"{o.save_error}, {o.saved_tokens} tokens; {o.notes}")
            cn_parts = cn.stats()["saves_in_parts"]
    finally:
        store.terminate()
        store.wait(10)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {"bench": "hf_save", "label": "real", "model": a.model, "prompt_tokens": a.prompt,
           "transport": transport, "rounds": a.rounds, "save_whole": a.save_whole, "save_parts_shm": a.save_parts_shm,
           "saves_in_parts": cn_parts,
           "kv_bytes": a.prompt * layout.bytes_per_token,
           "request_s_beside": round(med["beside"], 4), "request_s_after": round(med["after"], 4),
           "save_after_pass_s_beside": round(statistics.median(after_pass["beside"]), 4),
           "save_after_pass_s_after": round(statistics.median(after_pass["after"]), 4),
           "request_beside_vs_after": round(med["beside"] / med["after"], 3),
           "request_s_all": {m: [round(x, 4) for x in v] for m, v in times.items()}}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"hf_save: {a.prompt} tokens of {a.model} ({out['kv_bytes'] / 1e9:.2f} GB of KV), "
              f"store over {transport}, median of {a.rounds} rounds each (real)")
        for m in ("beside", "after"):
            print(f"  save {m:6} the pass: request {med[m]:.3f} s, of it after the pass "
                  f"{statistics.median(after_pass[m]):.3f} s")
        print(f"  beside / after: {out['request_beside_vs_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
