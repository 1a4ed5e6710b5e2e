#!/usr/bin/env python3
"""transformers' continuous batching with kvfabric, against transformers' own GPU prefix sharing
and against recomputing, on the same requests in the same run (docs/python.md).

--docs documents of --doc-tokens tokens; --requests requests, each a document followed by a
question of its own (--question-min..--question-max tokens), --max-new-tokens generated greedily.
All requests are queued, then the manager runs them (continuous batching, paged cache, blocks of
--block-size tokens). Three runs, each on a fresh manager (an empty GPU cache):

- recompute: no prefix sharing beyond what the requests share among themselves;
- gpu_sharing: the documents were computed before by the same manager (transformers' prefix
  sharing holds them in GPU blocks: the best case of a GPU-only cache);
- kvfabric: the documents were computed and saved to a kvf-store by another manager, destroyed
  since: this manager finds them in kvfabric and loads them into its blocks layer by layer.

Reports per run the time to first token (p50, p90 of the requests), the time of the whole batch,
tokens/s, and for kvfabric the tokens loaded; whether the kvfabric run generated the same tokens
as the gpu_sharing run, request by request; whether the blocks kvfabric loaded are bitwise the
blocks the GPU had computed. Needs torch, transformers >= 5.17 and a GPU. Real.

    bench/hf_cb.py --model llama-3.1-8b [--transport tcp] [--json]
"""

import argparse
import gc
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

import kvfabric as kvf  # noqa: E402
from kvfabric import models  # noqa: E402
from hf_ttft import start_store  # noqa: E402


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=0, help="fewer layers (a quick check); 0: all")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--question-min", type=int, default=64)
    ap.add_argument("--question-max", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--num-blocks", type=int, default=1000, help="the paged cache's blocks: "
                    "enough that transformers does not evict requests (whose tokens would then "
                    "come from a prefill of what they generated, not from decoding)")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--cuda-graph", choices=["off", "auto"], default="off",
                    help="transformers' CUDA graphs (auto: its default; kvfabric then waits for "
                    "loads before the forward pass instead of layer by layer)")
    ap.add_argument("--async-batching", choices=["off", "auto"], default="off")
    ap.add_argument("--transport", choices=["shm", "tcp"], default="shm")
    ap.add_argument("--store-bin", default=os.path.join(HERE, "..", "build", "bin", "kvf-store"))
    ap.add_argument("--store-memory", default="24G")
    ap.add_argument("--no-warmup", action="store_true", help="no warm-up request on the kvfabric "
                    "manager (its first load then registers the store's memory)")
    ap.add_argument("--skip-recompute", action="store_true", help="no recompute run (its figures "
                    "do not depend on the transport)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    import torch
    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from kvfabric.continuous import ContinuousKV

    if not torch.cuda.is_available():
        raise SystemExit("hf_cb: needs a CUDA device")
    cfg_d = models.config(a.model)
    if a.layers:
        cfg_d["num_hidden_layers"] = a.layers
    model, _, _ = models.build(cfg_d, "transformers", "cuda", a.dtype, seed=0)
    model.set_attn_implementation("sdpa")
    cfg = model.config
    P = a.block_size
    layout = models.layout_for(cfg, a.model, page_tokens=P, chunk_tokens=P, dtype=a.dtype)
    rnd = random.Random(11)
    docs = [[rnd.randrange(10, cfg.vocab_size) for _ in range(a.doc_tokens)] for _ in range(a.docs)]
    # a document of its own for the kvfabric manager's warm-up: its first load registers the
    # store's shared memory with the CUDA driver, once per process, as a server does at start
    warm = [rnd.randrange(10, cfg.vocab_size) for _ in range(P + 8)]
    reqs = [docs[i % a.docs] + [rnd.randrange(10, cfg.vocab_size)
                                for _ in range(rnd.randint(a.question_min, a.question_max))]
            for i in range(a.requests)]
    gen_cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, do_sample=False, eos_token_id=-1,
                               pad_token_id=0)
    res = {"bench": "hf_cb", "label": "real", "model": a.model, "layers": cfg.num_hidden_layers,
           "dtype": a.dtype, "docs": a.docs, "doc_tokens": a.doc_tokens, "requests": a.requests,
           "question_tokens": [a.question_min, a.question_max],
           "max_new_tokens": a.max_new_tokens, "block_size": P, "num_blocks": a.num_blocks,
           "max_batch_tokens": a.max_batch_tokens, "transport": a.transport,
           "cuda_graph": a.cuda_graph, "async_batching": a.async_batching,
           "kvfabric_warmup": not a.no_warmup,
           "torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}

    def manager(sharing=True):
        cb = ContinuousBatchingConfig(block_size=P, num_blocks=a.num_blocks,
                                      max_batch_tokens=a.max_batch_tokens,
                                      allow_block_sharing=sharing,
                                      use_cuda_graph=None if a.cuda_graph == "auto" else False,
                                      use_async_batching=None if a.async_batching == "auto"
                                      else False)
        return model.init_continuous_batching(generation_config=gen_cfg,
                                              continuous_batching_config=cb)

    last_ids = []

    offloads = [0]

    def count_offloads(m):
        """Counts the requests transformers evicts when its cache is full (offloaded, or reset
        and computed again: their later tokens come from a prefill, not from decoding)."""
        make = m._create_batch_processor

        def create():
            bp = make()
            om = bp.offloading_manager
            if not getattr(om, "_counted", False):
                f = om.offload_requests

                def offload():
                    n = f()
                    offloads[0] += n
                    return n

                om.offload_requests, om._counted = offload, True
            return bp

        m._create_batch_processor = create

    def run(m, inputs, kv=None):
        """Queues inputs, runs them to the end; per request (tokens, ttft_s)."""
        if not getattr(m, "_offloads_counted", False):
            count_offloads(m)
            m._offloads_counted = True
        offloads[0] = 0
        if kv is not None:
            kv.attach(m)
        # a manager that ran before (stop(keep_for_next_session)): accept requests before start()
        # and switch the model back to paged attention, as init_continuous_batching does
        m.background_thread_status.clear()
        m.switch_to_cb_friendly_attn(model)
        ids = m.add_requests(inputs, max_new_tokens=a.max_new_tokens, record_timestamps=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m.start()
        out, deadline = {}, time.monotonic() + 900
        while len(out) < len(ids) and time.monotonic() < deadline:
            r = m.get_result(timeout=1)
            if r is not None and r.is_finished():
                out[r.request_id] = r
            elif r is None and not m.is_running():
                break
        wall = time.perf_counter() - t0
        m.stop(block=True, timeout=30, keep_for_next_session=True)  # keeps its cache
        if kv is not None:
            kv.drain()
        if len(out) < len(ids):
            raise SystemExit(f"hf_cb: {len(ids) - len(out)} requests did not finish")
        bad = [r.error for r in out.values() if r.error]
        if bad:
            raise SystemExit(f"hf_cb: a request failed: {bad[0]}")
        toks = [out[i].generated_tokens for i in ids]
        ttft = [out[i].timestamps[0] - out[i].created_time for i in ids]
        last_ids[:] = ids
        return toks, ttft, wall

    def summary(name, toks, ttft, wall):
        n = sum(len(t) for t in toks)
        res[name] = {"offloaded_requests": offloads[0],
                     "ttft_p50_ms": round(pct(ttft, 0.5) * 1e3, 1),
                     "ttft_p90_ms": round(pct(ttft, 0.9) * 1e3, 1),
                     "batch_s": round(wall, 3), "tokens_per_s": round(n / wall, 1)}

    def done(m):
        model.destroy_cached_continuous_batching_manager()
        m.batch_processor = None
        gc.collect()
        torch.cuda.empty_cache()

    def blocks_of(m, doc, layers):
        """The GPU's blocks for a document's prefix (by transformers' block hashes): K of the
        given layers, on the host."""
        cache = m.batch_processor.cache
        bm = cache._block_manager
        h, ids = None, []
        for b in range(len(doc) // P):
            h = bm.compute_hash(h, doc[b * P:(b + 1) * P], 0)
            ids.append(bm._hash_to_id.get(h))
        if any(i is None for i in ids):
            return None
        shape = (-1, P, cache.num_key_value_heads, cache.head_dim)
        return [cache.key_cache[l].view(shape)[ids].cpu() for l in layers] + \
            [cache.value_cache[l].view(shape)[ids].cpu() for l in layers]

    probe_layers = list(range(cfg.num_hidden_layers))
    store, addr = start_store(a.store_bin, a.store_memory, a.transport)
    try:
        with torch.no_grad():
            # 1. recompute (prefix sharing off: every request computes its document)
            if not a.skip_recompute:
                m = manager(sharing=False)
                summary("recompute", *run(m, reqs))
                done(m)
            # 2. GPU prefix sharing, the documents computed first by the same manager
            m = manager()
            run(m, docs)
            toks_gpu, ttft, wall = run(m, reqs)
            summary("gpu_sharing", toks_gpu, ttft, wall)
            ref_blocks = [blocks_of(m, d, probe_layers) for d in docs]
            done(m)
            # 3. kvfabric: documents saved by one manager, loaded by a fresh one
            cn = kvf.Connector(layout, nodes=[addr], deadline_ms=60000)
            res["transport_used"] = cn.transport()[0]
            m = manager()
            kv0 = ContinuousKV(cn, layout)
            # the documents alone first, as the GPU-sharing manager computed them (the same
            # batches: their KV the same to the bit), then the warm-up document on its own
            run(m, docs, kv0)
            run(m, [warm], kv0)
            res["saved_tokens"] = kv0.stats["saved_tokens"]
            kv0.close()
            done(m)
            m = manager()
            kv1 = ContinuousKV(cn, layout)
            if not a.no_warmup:
                run(m, [warm], kv1)
            for k in kv1.stats:
                kv1.stats[k] = type(kv1.stats[k])(0)
            toks_kvf, ttft, wall = run(m, reqs, kv1)
            ids_kvf = list(last_ids)
            summary("kvfabric", toks_kvf, ttft, wall)
            res["kvfabric"].update({k: kv1.stats[k] for k in (
                "loads", "loaded_tokens", "gpu_shared_tokens", "inflight_shared_tokens",
                "load_failures", "requeued", "whole_waits", "rescheduled")})
            res["kvfabric"]["load_stall_s"] = round(kv1.stats["stall_s"], 3)
            lt = [r.load_s for r in kv1.records.values() if r.loaded_tokens and r.request_id in
                  set(ids_kvf)]
            if lt:
                res["kvfabric"]["load_ms_p50"] = round(pct(lt, 0.5) * 1e3, 1)
            got = [blocks_of(m, d, probe_layers) for d in docs]
            kv1.close()
            done(m)
            cn.close()
        same = sum(int(x == y) for x, y in zip(toks_gpu, toks_kvf))
        res["tokens_same_as_gpu_sharing"] = f"{same} of {len(reqs)}"
        res["tokens_differ"] = [
            {"request": i, "doc": i % a.docs, "first_position": next(
                j for j, (p, q) in enumerate(zip(x, y)) if p != q)}
            for i, (x, y) in enumerate(zip(toks_gpu, toks_kvf)) if x != y][:20]
        # every document's K and V, every layer: the blocks kvfabric loaded (or that were
        # shared from them) against the blocks the GPU-sharing manager computed
        eq = [None if r is None or g is None else all(torch.equal(x, y) for x, y in zip(r, g))
              for r, g in zip(ref_blocks, got)]
        res["loaded_blocks_bitwise_equal"] = all(eq) if None not in eq else None
        res["documents_bitwise_equal"] = f"{sum(1 for e in eq if e)} of {len(eq)}"
        for k in ("gpu_sharing", "kvfabric"):
            if "recompute" in res:
                res[k]["ttft_p50_vs_recompute"] = round(
                    res["recompute"]["ttft_p50_ms"] / res[k]["ttft_p50_ms"], 2)
        res["kvfabric_ttft_p50_vs_gpu_sharing"] = round(
            res["kvfabric"]["ttft_p50_ms"] / res["gpu_sharing"]["ttft_p50_ms"], 2)
    finally:
        store.kill()
        store.wait()
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
