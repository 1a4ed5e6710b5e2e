#!/usr/bin/env python3
"""A short prefill's forward pass alone on the GPU against the same pass while other engine
processes work on the same GPU, in the same run (docs/python.md, "The same four engines on
2026-12-05": with kvfabric the e2e's four engines share one GPU, where the baseline's routing ran
nearly every request on one engine).

Each neighbour is a process of its own with its own model, as a `kvfabric.serve` engine is: a
prefill neighbour prefills --neighbour-prompt tokens in a loop, a decode neighbour generates
--decode-tokens tokens after a 512-token prompt in a loop (eager steps: the CUDA-graph step
needs a connector's staging pages, which these engines without a store do not have; in the e2e
the decode engines replay graphs, fewer launches for the same work). The measured engine has no store (no save runs beside or
after its pass). Rounds alternate alone and shared in ABBA order; alone, the neighbours are idle
(their loops paused and drained) but their models stay on the GPU.

    bench/gpu_share.py --model llama-3.1-8b --prompt 256 [--prefill-neighbours 1]
        [--decode-neighbours 2] [--rounds 8] [--json]

Needs torch and a GPU with room for 1 + neighbours models (bf16, random weights). Real. Not yet
run on a GPU (written 2026-12-05, when the device machine had no time left; docs/python.md).
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))


def engine(model_name, backend, seed, graphs):
    from kvfabric import models
    from kvfabric.engine import Engine
    cfg = models.config(model_name)
    layout = models.layout_for(cfg, model_id=model_name, page_tokens=16, chunk_tokens=256,
                               dtype="bf16")
    models.serving_attention()
    model, factory, _ = models.build(cfg, backend, "cuda", "bf16", seed)
    return Engine(model, layout, factory, graphs=graphs, max_tokens=16384), int(cfg["vocab_size"])


def neighbour(kind, a, go, ready, stop, done):
    """A loop of kind's work while go is set; counts its requests in done."""
    eng, vocab = engine(a.model, a.backend, 100 + os.getpid() % 1000, "off")
    rng = random.Random(os.getpid())
    n = a.neighbour_prompt if kind == "prefill" else 512
    eng.run("generate" if kind == "decode" else "prefill",
            [rng.randrange(vocab) for _ in range(n)],
            max_tokens=a.decode_tokens if kind == "decode" else 1)  # warm-up
    ready.release()
    deadline = time.monotonic() + a.max_s
    while not stop.is_set() and time.monotonic() < deadline:
        if not go.wait(0.05):
            continue
        toks = [rng.randrange(vocab) for _ in range(n)]
        if kind == "decode":
            eng.run("generate", toks, max_tokens=a.decode_tokens)
        else:
            eng.run("prefill", toks)
        with done.get_lock():
            done.value += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--backend", default="transformers")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--prefill-neighbours", type=int, default=1)
    ap.add_argument("--decode-neighbours", type=int, default=2)
    ap.add_argument("--neighbour-prompt", type=int, default=2048)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8, help="passes timed per mode")
    ap.add_argument("--max-s", type=float, default=240, help="the neighbours' time bound")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.prompt < 1 or a.rounds < 1 or a.prefill_neighbours < 0 or a.decode_neighbours < 0:
        raise SystemExit("gpu_share: --prompt and --rounds at least 1, neighbours at least 0")
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("gpu_share: needs a CUDA GPU")
    ctx = mp.get_context("spawn")
    go, stop, ready = ctx.Event(), ctx.Event(), ctx.Semaphore(0)
    done = ctx.Value("l", 0)
    kinds = ["prefill"] * a.prefill_neighbours + ["decode"] * a.decode_neighbours
    procs = [ctx.Process(target=neighbour, args=(k, a, go, ready, stop, done), daemon=True)
             for k in kinds]
    for p in procs:
        p.start()
    times = {"alone": [], "shared": []}
    try:
        eng, vocab = engine(a.model, a.backend, 7, "off")
        rng = random.Random(11)
        eng.run("prefill", [rng.randrange(vocab) for _ in range(a.prompt)])  # warm-up
        t_ready = time.monotonic()
        for _ in procs:
            if not ready.acquire(timeout=max(1.0, 180 - (time.monotonic() - t_ready))):
                raise SystemExit("gpu_share: a neighbour did not get ready within 180 s")
        work0 = done.value
        for r in range(2 * a.rounds):
            mode = ("alone", "shared")[(r + r // 2) % 2]  # ABBA: neither always first
            if mode == "shared":
                go.set()
                time.sleep(0.3)  # every neighbour inside its loop
            else:
                go.clear()
                time.sleep(1.0 + a.decode_tokens * 0.05)  # their requests under way drain
            toks = [rng.randrange(vocab) for _ in range(a.prompt)]
            torch.cuda.synchronize()
            o = eng.run("prefill", toks)
            times[mode].append(o.prefill_s)
        go.clear()
        work = done.value - work0
    finally:
        stop.set()
        go.clear()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.terminate()
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {"bench": "gpu_share", "label": "real", "model": a.model, "backend": a.backend,
           "gpu": torch.cuda.get_device_name(0), "prompt_tokens": a.prompt,
           "prefill_neighbours": a.prefill_neighbours, "decode_neighbours": a.decode_neighbours,
           "neighbour_prompt_tokens": a.neighbour_prompt, "decode_tokens": a.decode_tokens,
           "rounds": a.rounds, "neighbour_requests": work,
           "pass_s_alone": round(med["alone"], 4), "pass_s_shared": round(med["shared"], 4),
           "shared_vs_alone": round(med["shared"] / med["alone"], 3),
           "pass_s_all": {m: [round(x, 4) for x in v] for m, v in times.items()}}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"gpu_share: a {a.prompt}-token prefill of {a.model} on {out['gpu']}, median of "
              f"{a.rounds} passes each (real): alone {med['alone']:.4f} s, beside "
              f"{a.prefill_neighbours} prefill and {a.decode_neighbours} decode engine(s) "
              f"{med['shared']:.4f} s: {out['shared_vs_alone']}x ({work} neighbour requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
