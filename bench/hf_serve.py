#!/usr/bin/env python3
"""Disaggregated serving of a transformers model through kvfabric, process to process
(docs/python.md): a kvf-store, a kvf-sched and two `python -m kvfabric.serve` processes (one
prefill-only, one decode-only) on one GPU, driven over their HTTP API as the cluster's router
drives them.

1. PD handoff: prompts of --handoff-tokens fresh tokens are prefilled on one process, which saves
   their KV; the other process decodes them, loading that KV. Reported: the prefill's save, the
   decode's wait for the handoff, its time to its own first token (the KV loaded and the first
   decoding step, run layer by layer as the load arrives), and the same KV loaded alone into GPU
   pages by this driver in the same run: the transfer at the bandwidth measured now.
   decode_first_token_vs_transfer is their ratio.
2. Identity: --requests requests sharing system prompts, each served three ways: prefilled on one
   process and decoded on the other through kvfabric; generated on one process with its own GPU
   prefix cache only (reuse "engine", no kvfabric); and computed whole (no reuse). Greedy tokens
   are compared request by request.

    bench/hf_serve.py --model llama-3.1-8b [--requests 100] [--json]

Needs torch and transformers and a GPU. Real; weights random (bf16), so the text is not.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(ROOT, "python"))

import kvfabric as kvf  # noqa: E402
from kvfabric import models  # noqa: E402


def call(addr, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{addr}{path}", data=data,
                                 method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def spawn(args, marker, what, log):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.join(ROOT, "python"),
                                                      env.get("PYTHONPATH")]))
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if marker in line:
            return p, line.split("listen=")[1].split()[0]
    p.kill()
    raise SystemExit(f"hf_serve: {what} did not start (see its log)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--handoff-tokens", type=int, default=8192)
    ap.add_argument("--handoff-rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--output-tokens", type=int, default=8)
    ap.add_argument("--transport", choices=["shm", "tcp"], default="shm")
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "bin"))
    ap.add_argument("--store-memory", default="24G")
    ap.add_argument("--logs", default="hf_serve_logs")
    ap.add_argument("--trust-local-store", action="store_true",
                    help="the serving processes' --trust-local-store (no second hash of KV read "
                    "in place from the same-host store)")
    ap.add_argument("--cuda-graphs", choices=["auto", "on", "off"], default="auto",
                    help="the serving processes' --cuda-graphs (decoding steps from CUDA graphs)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch
    import transformers
    if not torch.cuda.is_available():
        raise SystemExit("hf_serve: needs a CUDA device")
    os.makedirs(a.logs, exist_ok=True)
    procs = []
    res = {"bench": "hf_serve", "label": "real", "model": a.model, "dtype": a.dtype,
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "transformers": transformers.__version__, "transport": a.transport,
           "trust_local_store": a.trust_local_store, "cuda_graphs": a.cuda_graphs,
           "date": time.strftime("%Y-%m-%d")}
    try:
        log = open(os.path.join(a.logs, "store.log"), "w")
        store, saddr = spawn([os.path.join(a.bin, "kvf-store"), "--listen", "127.0.0.1:0",
                              "--memory", a.store_memory, "--log-level", "warn",
                              *(["--shm", "off"] if a.transport == "tcp" else [])],
                             "ready", "kvf-store", log)
        procs.append(store)
        sched, sched_addr = spawn([os.path.join(a.bin, "kvf-sched"), "--listen", "127.0.0.1:0",
                                   "--stores", saddr, "--chunk-tokens", "256", "--log-level",
                                   "warn"], "kvf-sched ready", "kvf-sched",
                                  open(os.path.join(a.logs, "sched.log"), "w"))
        procs.append(sched)
        eng = {}
        env_args = ["--model", a.model, "--device", "cuda", "--dtype", a.dtype, "--sched",
                    sched_addr, "--store", saddr, "--events", "127.0.0.1:0", "--max-tokens",
                    str(max(16384, a.handoff_tokens + 512)), "--backend", "transformers",
                    "--cuda-graphs", a.cuda_graphs,
                    *(["--trust-local-store"] if a.trust_local_store else [])]
        if a.layers:
            env_args += ["--layers", str(a.layers)]
        t0 = time.monotonic()
        for role in ("prefill", "decode"):
            p, addr = spawn([sys.executable, "-m", "kvfabric.serve", "--id", f"{role}0",
                             "--role", role, *env_args], "kvf-engine ready",
                            f"kvfabric.serve {role}", open(os.path.join(a.logs, f"{role}.log"),
                                                           "w"))
            procs.append(p)
            eng[role] = addr
        res["start_s"] = round(time.monotonic() - t0, 1)
        P, D = eng["prefill"], eng["decode"]
        cfg = models.config(a.model)
        if a.layers:
            cfg["num_hidden_layers"] = a.layers
        layout = models.layout_for(cfg, model_id=a.model, dtype=a.dtype)
        vocab = int(cfg["vocab_size"])
        rnd = random.Random(11)
        C = layout.chunk_tokens

        # warm-up: both processes' first requests (CUDA graphs of kernels, the arena's mapping)
        w = [rnd.randrange(vocab) for _ in range(1024)]
        p0 = call(P, "/v1/prefill", {"tokens": w})
        call(D, "/v1/decode", {"tokens": w, "first_token": p0["tokens"][0], "max_tokens": 2,
                               "expect_cached": 1024})

        # 1. PD handoff, and the same KV loaded alone by this driver into GPU pages
        from kvfabric.engine import Staging, handoff_tokens
        tdt = {"bf16": torch.bfloat16, "f32": torch.float32}[a.dtype]
        cn = kvf.Connector(layout, nodes=[saddr], deadline_ms=60000)
        staging = Staging(cn, layout, a.handoff_tokens + C, torch.device("cuda"), tdt)
        rounds = []
        for r in range(a.handoff_rounds + 1):
            toks = [rnd.randrange(vocab) for _ in range(a.handoff_tokens)]
            pre = call(P, "/v1/prefill", {"tokens": toks})
            dec = call(D, "/v1/decode", {"tokens": toks, "first_token": pre["tokens"][0],
                                         "max_tokens": a.output_tokens,
                                         "expect_cached": pre["saved_tokens"]})
            # the same KV as the decode loaded: the whole prompt where the prefill handed it over
            seq = handoff_tokens(toks, C) if dec.get("handed_over") else toks
            n = len(seq) if dec.get("handed_over") else (len(toks) - 1) // C * C
            torch.cuda.synchronize()
            t = time.perf_counter()
            ld = cn.load(seq[:n], list(range(n // layout.page_tokens)))
            ld.wait()
            torch.cuda.synchronize()
            alone = time.perf_counter() - t
            ld.close()
            if r == 0:
                continue  # the driver's first load maps the store's arena
            rounds.append({
                "prefill_s": pre["prefill_s"], "save_s": pre["save_s"],
                "saved_tokens": pre["saved_tokens"], "handoff_wait_s": dec["handoff_s"],
                "decode_first_token_s": dec["prefill_s"], "decode_loaded_tokens":
                dec["loaded_tokens"], "decode_load_wait_s": dec["wait_s"],
                "load_bytes": dec.get("load_bytes", 0), "transfer_alone_s": alone,
                "handed_over": dec.get("handed_over"), "tail_saved": pre.get("tail_saved"),
                "transfer_gbps": n * layout.bytes_per_token / alone / 1e9,
                "itl_ms_median": sorted(dec["itl_s"])[len(dec["itl_s"]) // 2] * 1e3
                if dec["itl_s"] else None,
                "itl_ms": [round(x * 1e3, 2) for x in dec["itl_s"]],
                "first_token_mismatch": dec["first_token_mismatch"],
                "transport": dec.get("transport")})
        staging = None
        cn.close()
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        first = med([x["decode_first_token_s"] for x in rounds])
        alone = med([x["transfer_alone_s"] for x in rounds])
        res["handoff"] = {
            "tokens": a.handoff_tokens, "rounds": rounds,
            "kv_bytes": rounds[0]["load_bytes"],
            "prefill_ms": round(med([x["prefill_s"] for x in rounds]) * 1e3, 1),
            "save_ms": round(med([x["save_s"] for x in rounds]) * 1e3, 1),
            "handoff_wait_ms": round(med([x["handoff_wait_s"] for x in rounds]) * 1e3, 1),
            "decode_first_token_ms": round(first * 1e3, 1),
            "transfer_alone_ms": round(alone * 1e3, 1),
            "transfer_gbps": round(med([x["transfer_gbps"] for x in rounds]), 2),
            "decode_first_token_vs_transfer": round(first / alone, 3),
            "target_vs_transfer": 1.2}

        # 2. identity: kvfabric (disaggregated) vs the engine's own prefix cache vs computed whole
        systems = [[rnd.randrange(vocab) for _ in range(rnd.choice((512, 1024, 2048)))]
                   for _ in range(4)]
        same_engine = same_whole = 0
        loaded = 0
        diffs = []
        t0 = time.monotonic()
        for i in range(a.requests):
            s = rnd.choice(systems)
            toks = s + [rnd.randrange(vocab) for _ in range(rnd.randrange(16, 768))]
            pre = call(P, "/v1/prefill", {"tokens": toks})
            dec = call(D, "/v1/decode", {"tokens": toks, "first_token": pre["tokens"][0],
                                         "max_tokens": a.output_tokens,
                                         "expect_cached": pre["saved_tokens"]})
            own = call(P, "/v1/generate", {"tokens": toks, "max_tokens": a.output_tokens,
                                           "reuse": "engine"})
            whole = call(P, "/v1/generate", {"tokens": toks, "max_tokens": a.output_tokens,
                                             "reuse": False})
            loaded += dec["loaded_tokens"]
            same_engine += dec["tokens"] == own["tokens"]
            same_whole += dec["tokens"] == whole["tokens"]
            if dec["tokens"] != whole["tokens"] and len(diffs) < 5:
                diffs.append({"request": i, "kvfabric": dec["tokens"], "whole": whole["tokens"],
                              "engine_cache": own["tokens"]})
        res["identity"] = {"requests": a.requests, "output_tokens": a.output_tokens,
                           "kvfabric_vs_engine_cache_identical": same_engine,
                           "kvfabric_vs_recompute_identical": same_whole,
                           "decode_loaded_tokens": loaded, "first_differences": diffs,
                           "seconds": round(time.monotonic() - t0, 1)}
        res["health"] = {"prefill": call(P, "/v1/health"), "decode": call(D, "/v1/health")}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    print(json.dumps(res, sort_keys=True) if a.json else json.dumps(res, indent=1,
                                                                     sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
