"""An engine's own measurements before it serves (docs/python.md, "Measured rates"): the
calibration kvf-sched's cost file is made from (`--calibrate`), that file as the prior of the
engine's rates (`--cost`), and the warm-up that takes CUDA's lazy set-up off the first request
(`--warmup`)."""

from __future__ import annotations

import json
import time
from typing import Callable, Dict

from .engine import Engine
from .events import HeldBlocks
from .layout import Layout
from .rates import Rates


def seed_rates(engine: Engine, path: str, log: Callable[[str, str], None]) -> None:
    """The calibration file's prefill model as the prior of the engine's rates (Rates.seed). A
    file that is not a JSON object, or whose prefill figures are not numbers Rates.seed takes,
    is an error; one without prefill_tokens_per_s (kvf-sched's own settings only) seeds
    nothing, and says so."""
    try:
        with open(path) as f:
            cost = json.load(f)
        if not isinstance(cost, dict):
            raise ValueError("not a JSON object")
        if "prefill_tokens_per_s" not in cost:
            log("info", f"--cost {path}: no prefill_tokens_per_s: no prior for the prefill "
                        "model (it is measured from the first passes)")
            return
        rate, attn = cost["prefill_tokens_per_s"], cost.get("prefill_attn_s_per_tok2", 0.0)
        if isinstance(rate, bool) or isinstance(attn, bool):
            raise ValueError("the prefill figures must be numbers")
        engine.rates.seed(float(rate), float(attn))
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"kvfabric.serve: --cost {path}: {type(e).__name__}: {e}") from None
    m = engine.rates.model()
    log("info", f"prefill model from {path} (the calibration's, a prior): "
                f"{m['s_per_token'] * 1e3:.4f} ms per token" if m else f"--cost {path}: no model")


def warm_up(engine: Engine, vocab: int, log: Callable[[str, str], None]) -> None:
    """Runs before the engine serves (--warmup): a short generate whose time is not noted (its
    first pass pays CUDA's and the libraries' lazy set-up: hundreds of ms, which would otherwise
    be the first request's, and its prediction's), then prefills of 256 and 1,024 tokens,
    measured, so that the rates have two length classes of this engine's own before the first
    request. No store is asked and no event published; the engine's cache is emptied after."""
    held, rates = engine.held, engine.rates
    engine.held = HeldBlocks(None, engine.layout.page_tokens)
    toks = [(i * 2654435761 + 7) % vocab for i in range(1024)]
    t0 = time.perf_counter()
    try:
        engine.rates = Rates()
        engine.run("generate", toks[:64], max_tokens=2, reuse="none")
        engine.rates = rates
        for n in (256, 1024):
            if n + 2 <= engine.max_tokens:
                engine.run("prefill", toks[:n], reuse="none")
    finally:
        engine.rates, engine.held = rates, held
        engine.last_tokens, engine.last_cache = [], None
    m = rates.model()
    log("info", f"warmed up in {time.perf_counter() - t0:.2f} s" +
        (f"; prefill model: {m['base_s'] * 1e3:.1f} ms + {m['s_per_token'] * 1e3:.4f} ms per "
         f"token" if m else ""))


def calibrate(engine: Engine, layout: Layout, vocab: int, path: str) -> Dict[str, float]:
    """kvf-engine --calibrate for this model on this device: prefills from scratch of 256 to 4096
    tokens (up to half the engine's capacity; the best of two each) and 32 decode steps, the
    scheduler's cost model (t = n / rate + attn * n^2 / 2) fitted by least squares, written as a
    kvf-sched calibration file."""
    lens = [n for n in (256, 512, 1024, 2048, 4096) if n <= max(engine.max_tokens // 2, 1024)]
    toks = [(i * 2654435761 + 11) % vocab for i in range(4096 + 64)]
    secs = []
    for n in lens:
        secs.append(min(engine.run("prefill", toks[:n], reuse="none").prefill_s
                        for _ in range(2)))
    o = engine.run("generate", toks[:1024], max_tokens=33, reuse="none")
    tpot = sum(o.itl_s) / len(o.itl_s)
    s11 = sum(n ** 2 for n in lens)
    s12 = sum(n ** 3 for n in lens)
    s22 = sum(n ** 4 for n in lens)
    y1 = sum(n * t for n, t in zip(lens, secs))
    y2 = sum(n * n * t for n, t in zip(lens, secs))
    det = s11 * s22 - s12 * s12
    a = (y1 * s22 - y2 * s12) / det
    b = (s11 * y2 - s12 * y1) / det
    if a <= 0:  # all quadratic: the linear fit through the shortest
        a, b = secs[0] / lens[0], max(b, 0.0)
    cost = {"prefill_tokens_per_s": 1.0 / a, "prefill_attn_s_per_tok2": max(2.0 * b, 0.0),
            "kv_bytes_per_token": layout.bytes_per_token, "tpot_base_s": tpot}
    with open(path, "w") as f:
        json.dump(cost, f)
        f.write("\n")
    print(f"kvfabric.serve: calibrated {layout.model_id} on {engine.device} (real): prefill of "
          f"{lens[0]}..{lens[-1]} tokens took {' '.join(f'{t:.4f}' for t in secs)} s: "
          f"{1.0 / a:.0f} tokens/s + {2.0 * b:.3g} s/token^2 attention; {tpot * 1e3:.2f} ms per "
          f"decode step; written to {path}", flush=True)
    return cost
