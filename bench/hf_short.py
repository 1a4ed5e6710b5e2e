#!/usr/bin/env python3
"""What kvfabric costs a pass that finds nothing to load: kvfabric.engine's forward pass over a
prompt no store holds, with the connector (the lookup, the cache in the staging pages, the save
after the first token) against the same engine without one (transformers' own cache), in the same
run, alternating, one GPU and nothing else on it (docs/python.md, "What a pass with nothing
cached costs").

Short passes are where it shows: a few hundred tokens of an 8B model take 20-40 ms, most of it the
host launching kernels, so that a copy or a Python call more per layer is a per cent or two each.

    bench/hf_short.py --model llama-3.1-8b --lengths 128,256,512,1024,2048 --rounds 7 \
        [--profile] [--json]

Three ways per length: "plain" (no connector), "kvf" (connector, stores asked: what a colocated
generate of the e2e does) and "staged" (connector, reuse="engine": the staging pages without the
lookup and the save, which says where a difference comes from). Median pass time (the engine's
prefill_s: the forward pass alone) and time to the first token (run() to on_first). Needs torch,
transformers, a CUDA device and kvf-store built (build/bin). Real.
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

from hf_ttft import start_store  # noqa: E402
from kvfabric import models  # noqa: E402


def profile(engine, lengths, rnd, vocab, quiet):
    """One plain pass of each length under torch.profiler: the host's time (every op's own CPU
    time) and the GPU's (every kernel's), in ms; a pass whose host time is above its GPU time is
    bound by the launches, not by the GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    out = []
    for n in lengths:
        engine.last_tokens, engine.last_cache = [], None
        toks = [rnd.randrange(vocab) for _ in range(n)]
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            o = engine.run("prefill", toks, reuse="none")
        ev = prof.key_averages()
        cpu = sum(e.self_cpu_time_total for e in ev) / 1e3
        # the kernels' own time: an operator's row carries its kernels' time too, so only the
        # rows of device events count (summing every row counts each kernel twice)
        gpu = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
                  for e in ev if getattr(e, "device_type", None) == DeviceType.CUDA) / 1e3
        out.append({"tokens": n, "pass_ms_profiled": round(o.prefill_s * 1e3, 2),
                    "host_ms": round(cpu, 2), "gpu_ms": round(gpu, 2)})
        if not quiet:
            print(f"{n:>6} tokens under the profiler: pass {o.prefill_s * 1e3:.1f} ms, host "
                  f"{cpu:.1f} ms, GPU {gpu:.1f} ms", flush=True)
            print(ev.table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers than the config; 0: all")
    ap.add_argument("--lengths", default="128,256,512,1024,2048")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--transport", choices=["shm", "tcp"], default="tcp")
    ap.add_argument("--store-bin", default=os.path.join(HERE, "..", "build", "bin", "kvf-store"))
    ap.add_argument("--profile", action="store_true",
                    help="also one pass of each length under torch.profiler (plain engine): the "
                    "host's time against the GPU's, and the top kernels")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    try:
        lengths = [int(x) for x in a.lengths.split(",") if x]
    except ValueError:
        raise SystemExit("hf_short: --lengths: integers separated by commas") from None
    if not lengths or min(lengths) < 2 or max(lengths) > 65536 or not 1 <= a.rounds <= 1000:
        raise SystemExit("hf_short: --lengths 2..65536, --rounds 1..1000")

    import torch
    from kvfabric import Connector
    from kvfabric.engine import Engine

    if not torch.cuda.is_available():
        raise SystemExit("hf_short: needs a CUDA device")
    cfg = models.config(a.model)
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    models.serving_attention()
    model, factory, backend = models.build(cfg, "transformers", "cuda", "bf16", seed=0)
    layout = models.layout_for(model.config, a.model, page_tokens=16, chunk_tokens=256,
                               dtype="bf16")
    store, addr = start_store(a.store_bin, "24G", a.transport)
    res = {"bench": "hf_short", "label": "real", "model": a.model,
           "layers": model.config.num_hidden_layers, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "transport": a.transport, "rounds": a.rounds, "rows": []}
    try:
        cn = Connector(layout, nodes=[addr], deadline_ms=60000)
        cap = max(lengths) + 64
        plain = Engine(model, layout, factory, max_tokens=cap)
        kvf = Engine(model, layout, factory, connector=cn, max_tokens=cap)
        rnd = random.Random(11)
        vocab = model.config.vocab_size
        for e in (plain, kvf):  # CUDA's lazy set-up, and each length's first kernels
            for n in lengths:
                e.run("generate", [rnd.randrange(vocab) for _ in range(n)], max_tokens=2,
                      reuse="none")
        ways = (("plain", plain, "engine"), ("kvf", kvf, "all"), ("staged", kvf, "engine"))
        for n in lengths:
            got = {w: ([], []) for w, _, _ in ways}
            for r in range(a.rounds):
                for w, e, reuse in (ways if r % 2 == 0 else ways[::-1]):
                    toks = [rnd.randrange(vocab) for _ in range(n)]  # nothing cached anywhere
                    e.last_tokens, e.last_cache = [], None
                    first = []
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    o = e.run("generate", toks, max_tokens=1, reuse=reuse,
                              on_first=lambda t: first.append(time.perf_counter()))
                    got[w][0].append(o.prefill_s)
                    got[w][1].append(first[0] - t0)
            row = {"tokens": n}
            for w, _, _ in ways:
                row[f"{w}_pass_ms"] = round(statistics.median(got[w][0]) * 1e3, 2)
                row[f"{w}_first_ms"] = round(statistics.median(got[w][1]) * 1e3, 2)
            row["kvf_vs_plain_pass"] = round(row["kvf_pass_ms"] / row["plain_pass_ms"], 3)
            row["kvf_vs_plain_first"] = round(row["kvf_first_ms"] / row["plain_first_ms"], 3)
            row["staged_vs_plain_pass"] = round(row["staged_pass_ms"] / row["plain_pass_ms"], 3)
            res["rows"].append(row)
            if not a.json:
                print(f"{n:>6} tokens: pass plain {row['plain_pass_ms']:.2f} ms, kvf "
                      f"{row['kvf_pass_ms']:.2f} ({row['kvf_vs_plain_pass']:.3f}x), staged "
                      f"{row['staged_pass_ms']:.2f} ({row['staged_vs_plain_pass']:.3f}x); first "
                      f"token plain {row['plain_first_ms']:.2f} ms, kvf {row['kvf_first_ms']:.2f} "
                      f"({row['kvf_vs_plain_first']:.3f}x)", flush=True)
        if a.profile:
            res["profile"] = profile(plain, lengths, rnd, vocab, a.json)
        cn.close()
    finally:
        store.terminate()
        store.wait(10)
    print(json.dumps(res) if a.json else f"hf_short: {json.dumps(res['rows'])}")


if __name__ == "__main__":
    main()
