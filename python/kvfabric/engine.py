"""A serving engine over a causal LM (transformers' or kvfabric.llama's) with kvfabric: one
sequence at a time on the model's device, the KV of the last sequence kept (the engine's own
prefix cache, as kvf-engine keeps its pages), a cached prefix beyond it loaded from kvfabric layer
by layer while the forward pass runs, the prompt's new full chunks saved, and the blocks it holds
published as KV events. kvfabric.serve puts it behind kvf-engine's HTTP API.

Each request is one of
  prefill   compute (or load) the prompt, save its chunks, answer the first token;
  decode    the decode half of a disaggregated request: load what the prefill saved (waiting,
            bounded, for the handoff), check the first token, decode;
  generate  both here.
with reuse "all" (the engine's own KV and kvfabric), "engine" (its own only: the baseline without
kvfabric) or "none". Greedy decoding.
"""

from __future__ import annotations

import gc
import inspect
import threading
import time
import weakref
from typing import Any, Callable, List, Optional, Sequence, Tuple

from . import devmem
from .connector import Connector, Prefetch, pages_from_tensors
from .errors import KvfError, Miss
from .events import Events, HeldBlocks
from .gputurn import GpuTurn
from .layout import Layout
from .outcome import Outcome, outcome_json  # noqa: F401 - outcome_json re-exported
from .paged import PagedKVCache
from .passclock import PassClock
from .rates import Rates


# The token that pads a prompt's last partial chunk when a prefill hands its whole KV over to a
# decode: no tokenizer has 2^32 - 1 tokens, so the padded chunk's key is never a real prompt's.
PAD_TOKEN = 0xFFFFFFFF


# A pass predicted to take this long or more yields its turn on a shared GPU at its layer
# boundaries to a later pass of an earlier key (a short one; kvfabric.gputurn), at most
# MAX_YIELDS times, the host running at most RUN_AHEAD layers ahead of the GPU meanwhile.
YIELD_MIN_S = 0.03
MAX_YIELDS = 8
RUN_AHEAD = 2


def handoff_tokens(tokens: Sequence[int], chunk_tokens: int) -> List[int]:
    """The tokens whose chunks carry a prompt's whole KV from a prefill to a decode: the prompt,
    its last partial chunk padded with PAD_TOKEN."""
    return list(tokens) + [PAD_TOKEN] * (-len(tokens) % chunk_tokens)


def _cover(sources: Optional[Sequence[Tuple[str, int, int]]]) -> int:
    """The tokens [0, end) a plan's sources (store, from, tokens) cover without a hole: what
    the plan says the stores hold of the prompt, whoever holds it (0 where none starts at 0)."""
    end = 0
    for _ in range(len(sources or ())):
        moved = False
        for _, start, n in sources:
            if start <= end < start + n:
                end, moved = start + n, True
        if not moved:
            break
    return end


class _Abort(Exception):
    """A layer of the load did not arrive in the middle of the forward pass."""


def decoder_layers(model: Any) -> Sequence[Any]:
    """The decoder layers of a causal LM (model.model.layers and the like)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise TypeError("cannot find the decoder layers of this model (model.layers)")


def layer_kv(cache: Any, layer: int):
    """The keys and values ([batch, kv_heads, seq, head_dim]) cached for a layer."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


def _crop(cache: Any, n: int) -> None:
    """Keeps the first n positions of every layer (a negative crop, as transformers >= 5.17 asks,
    which older versions and kvfabric.llama.KVCache read the same way)."""
    excess = cache.get_seq_length() - n
    if excess > 0:
        cache.crop(-excess)


class Staging:
    """Pages in kvfabric's layout on the model's device, registered with a connector: loads land
    there and are handed to the model's cache layer by layer; saves are copied there from it."""

    def __init__(self, connector: Connector, layout: Layout, tokens: int, device: Any,
                 dtype: Any) -> None:
        P = layout.page_tokens
        self.layout, self.cn = layout, connector
        self.pages = PagedKVCache(layout, (tokens + P - 1) // P, device=device, dtype=dtype)
        self._regs = pages_from_tensors(layout, self.pages.tensors)
        connector.register(self._regs)

    def own(self) -> None:
        """Makes these pages the connector's before a transfer: a connector moves one engine's
        registered memory, and two engines sharing one (tests, benchmarks) would otherwise load
        into, and save from, the pages of the one registered last. Raises KvfError (KVF_EBUSY)
        while the other engine's transfers are in flight."""
        self.cn.take(self._regs)

    @property
    def tokens(self) -> int:
        return self.pages.num_pages * self.layout.page_tokens

    def planes(self) -> List[Tuple[Any, Any]]:
        """Per layer, K and V of the staging pages as [tokens, kv_heads, head_dim] (views)."""
        L = self.layout
        return [(t[0].view(-1, L.kv_heads, L.head_dim), t[1].view(-1, L.kv_heads, L.head_dim))
                for t in self.pages.tensors]

    def cache(self, factory: Callable[[], Any]) -> Any:
        """An empty cache of the kind factory makes, kept in these pages (kvfabric.staged), or
        factory() where that kind has no staged form. One at a time: a new one reuses the pages."""
        from .llama import KVCache
        from .staged import StagedKVCache

        if factory is KVCache:
            return StagedKVCache(self.planes())
        try:
            from transformers import DynamicCache
        except ImportError:
            return factory()
        if factory is DynamicCache:
            from .transformers import staged_cache
            return staged_cache(self)
        return factory()

    def attach(self, cache: Any, layer: int, begin: int, end: int) -> None:
        """Positions begin..end of the staged prefix join the cache's layer (which holds
        positions 0..begin): in place for a staged cache, copied for any other."""
        s = cache.layers[layer] if hasattr(cache, "layers") and layer < len(cache.layers) else None
        if getattr(s, "detached", True) is False:
            if s.length != begin:
                raise RuntimeError(f"layer {layer} holds {s.length} positions, not {begin}")
            s.attach(end)
        else:
            self.to_cache(cache, layer, begin, end)

    def to_cache(self, cache: Any, layer: int, begin: int, end: int) -> None:
        """Appends positions begin..end of the staged prefix to the cache's layer (a copy)."""
        P = self.layout.page_tokens
        k, v = self.pages.read(layer, range((end + P - 1) // P), end)  # [end, H, D]
        cache.update(k[begin:end].transpose(0, 1).unsqueeze(0),
                     v[begin:end].transpose(0, 1).unsqueeze(0), layer)

    def from_cache(self, cache: Any, begin: int, end: int) -> None:
        """Copies positions begin..end of the cache into the staging pages; positions the cache
        does not hold (the padding of a prompt's last partial chunk) are zeros. A staged cache
        is in the pages already: only the padding is written."""
        staged = getattr(cache, "staged", False)
        for layer in range(self.layout.layers):
            if staged:
                have = max(begin, min(end, cache.layers[layer].length))
                if have < end:
                    t = self.pages.tensors[layer]
                    for plane in (0, 1):
                        t[plane].view(-1, *t.shape[3:])[have:end].zero_()
                continue
            k, v = layer_kv(cache, layer)
            have = max(begin, min(end, k.shape[-2]))
            t = self.pages.tensors[layer]
            for plane, src in ((0, k), (1, v)):
                flat = t[plane].view(-1, *t.shape[3:])  # [tokens, H, D]
                flat[begin:have].copy_(src[0, :, begin:have].transpose(0, 1))
                if have < end:
                    flat[have:end].zero_()


class Engine:
    """One model on one device with kvfabric (connector may be None: no stores) and KV events
    (events may be None). cache_factory makes an empty cache of the model's kind (transformers'
    DynamicCache, kvfabric.llama.KVCache). max_tokens bounds a sequence (prompt and output)."""

    def __init__(self, model: Any, layout: Layout, cache_factory: Callable[[], Any],
                 connector: Optional[Connector] = None, events: Optional[Events] = None,
                 max_tokens: int = 16384, graphs: str = "off",
                 save_beside_tokens: Optional[int] = 1024,
                 gpu_turn: Optional[GpuTurn] = None, decode_yield_s: float = 0.05,
                 release_below: Optional[int] = 2 << 30) -> None:
        import torch

        self.model, self.layout, self.new_cache = model, layout, cache_factory
        self.cn, self.max_tokens = connector, max_tokens
        # A prefill's save beside its forward pass (_save_beside), for a pass of at least
        # save_beside_tokens new tokens: on an H200 (bench/hf_save.py, docs/python.md) it took
        # 3-6% off prefills of 1,024 to 8,192 tokens of an 8B model with the serving attention;
        # shorter ones were not measured, and under torch's default attention a 2,048-token one
        # was 10% slower (a pass that its launches bound, the save's CUDA calls beside it). None:
        # every save after the pass.
        self.save_beside_tokens = save_beside_tokens
        self._beside: Optional["_LayerSave"] = None  # made by _prefill, until run() takes it
        # The turns of the engine processes sharing this GPU (kvfabric.gputurn): a pass that
        # computes prompt positions waits for its turn; None: passes run whenever they come.
        self.gpu_turn = gpu_turn
        self.decode_yield_s = decode_yield_s  # a decoding step's longest wait for the passes
        self._turn: Optional[int] = None  # the ticket of the turn held by the pass under way
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.layers = decoder_layers(model)
        if len(self.layers) != layout.layers:
            raise ValueError(f"the model has {len(self.layers)} layers, the layout {layout.layers}")
        self.staging = Staging(connector, layout, max_tokens, self.device, self.dtype) \
            if connector is not None else None
        self.held = HeldBlocks(events, layout.page_tokens)
        self.rates = Rates()
        self.vocab: Optional[int] = None  # token ids at or above it are refused (where set)
        self.last_tokens: List[int] = []  # the sequence whose KV the cache holds
        self.last_cache: Any = None
        self.oom_retries = 0  # requests run again after running out of device memory
        # After each request, where the device has less than this free (bytes; None: never),
        # the allocator's free blocks go back to it, for the other engines on the GPU.
        self.release_below = release_below
        self.memory_releases = 0
        self.release_error = ""  # the last check or release that failed, if one did
        self._torch = torch
        # logits of the last position only: all 8K positions' logits of a 128K vocabulary would
        # be 2 GiB written for one token read
        params = inspect.signature(model.forward).parameters
        self._last_only = {k: 1 for k in ("logits_to_keep", "num_logits_to_keep") if k in params}
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.graph: Any = None  # kvfabric.graphstep.GraphStep: decoding steps in the pages
        self.graph_note = self._graphs(graphs)

    def _graphs(self, mode: str) -> str:
        """Sets up decoding steps replayed from CUDA graphs over the staging pages
        (kvfabric.graphstep). mode: "off"; "auto" (captured where the device, dtype, model and
        torch allow, else eager steps of the model); "on" (captured, or an error); "eager"
        (the graph step's code run without graphs: tests). Returns what was set up, or why not."""
        if mode not in ("off", "auto", "on", "eager"):
            raise ValueError("graphs must be off, auto, on or eager")
        if mode == "off":
            return "off"
        from . import graphstep

        planes = self.staging.planes() if self.staging is not None else None
        why = "no staging pages (no connector)" if planes is None else \
            graphstep.unsupported(self.model, planes)
        if why is None and mode != "eager":
            if self.device.type != "cuda":
                why = "not a CUDA device"
            elif not graphstep.flash_varlen_available() or self.dtype not in (
                    self._torch.bfloat16, self._torch.float16):
                why = f"no FlashAttention with seqused_k for {self.dtype} in this torch"
        if why is not None:
            if mode == "on":
                raise ValueError(f"CUDA graphs for decoding steps: {why}")
            return f"eager steps: {why}"
        self.graph = graphstep.GraphStep(self.model, planes, capture=mode != "eager")
        return "captured" if self.graph.captured else "eager (graph step code, not captured)"

    def _step(self, token: int, cache: Any, before: Any = None, pos: Optional[int] = None) -> int:
        """One decoding step of `token`: through the graph step where the cache is in the
        staging pages and has room there (the token's K and V join every layer), else the
        model's forward pass. pos: the cache's length, where its layers are still arriving."""
        g = self.graph
        if g is not None and getattr(cache, "staged", False):
            n = cache.get_seq_length() if pos is None else pos
            if n < g.capacity:
                nxt = g.step(token, n, before)
                for s in cache.layers:
                    s.attach(n + 1)
                return nxt
        if before is not None:
            hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: before(i))
                     for i, layer in enumerate(self.layers)]
            try:
                return self._forward([token], cache)
            finally:
                for h in hooks:
                    h.remove()
        return self._forward([token], cache)

    def _new_cache(self) -> Any:
        """An empty cache: in the staging pages where there is a connector (kvfabric.staged: a
        load lands where the model reads it, a save reads what the model wrote), the model's
        own kind otherwise."""
        return self.staging.cache(self.new_cache) if self.staging is not None else \
            self.new_cache()

    # ---------------------------------------------------------------------------------------
    def lookup(self, tokens: Sequence[int],
               sources: Optional[Sequence[Tuple[str, int, int]]] = None) -> int:
        """The leading tokens of `tokens` the stores hold (0 without a connector); with a
        plan's sources, those its named stores hold count too."""
        return self.cn.lookup(tokens, sources) if self.cn is not None else 0

    def _device_prefix(self, tokens: List[int], limit: int) -> int:
        n = 0
        for a, b in zip(self.last_tokens[:limit], tokens[:limit]):
            if a != b:
                break
            n += 1
        return n // self.layout.chunk_tokens * self.layout.chunk_tokens

    def _decide(self, d: int, cached: int, n: int, o: Outcome) -> int:
        """How much of the stores' prefix (tokens d..cached beyond the engine's own d) to load:
        the chunk boundary p where loading d..p (at the bandwidth measured) overlapped with
        computing p..n is quickest, or d (recompute) where nothing beats computing d..n. Without
        measurements yet, everything is loaded. The choice and its inputs go into o.decision."""
        L, C = self.layout, self.layout.chunk_tokens
        r = self.rates
        whole_s = r.compute_s(d, n)
        if whole_s is None or r.load_bps is None:
            o.decision.update({"choice": "load", "why": "no measurement yet",
                               "cached_tokens": cached})
            return cached
        best, best_s = d, whole_s
        for p in range(d + C, cached + 1, C):
            t = max(r.load_s((p - d) * L.bytes_per_token), r.compute_s(p, n))
            if t < best_s * 0.95:  # a load must win clearly: it costs memory traffic too
                best, best_s = p, t
        o.decision.update({
            "choice": "recompute" if best == d else "load" if best == cached else "partial",
            "cached_tokens": cached, "load_tokens": best - d, "load_bps": r.load_bps,
            "prefill_s_per_token": r.s_per_token, "prefill_model": r.model(),
            "predicted_s": best_s,
            "predicted_recompute_s": whole_s})
        return best

    def _forward(self, ids: List[int], cache: Any):
        t = self._torch.tensor([ids], device=self.device)
        out = self.model(input_ids=t, past_key_values=cache, use_cache=True, **self._last_only)
        return int(out.logits[0, -1].argmax())

    def prefetch(self, tokens: Sequence[int],
                 sources: Optional[Sequence[Tuple[str, int, int]]] = None) -> Optional[Prefetch]:
        """For a request that will wait for this engine: starts fetching the stores' prefix of
        tokens (all but the chunk of the last token, which is computed anyway) into memory of
        its own, for run(prefetch=...), each run of chunks from the store the plan's sources
        name (Connector.prefetch). None when nothing is cached or the stores do not answer: the
        request then loads at its turn."""
        C = self.layout.chunk_tokens
        limit = (len(tokens) - 1) // C * C
        if self.cn is None or limit == 0:
            return None
        try:
            cached = min(max(self.lookup(list(tokens[:limit])), _cover(sources) // C * C), limit)
            return self.cn.prefetch(list(tokens[:cached]), sources) if cached else None
        except KvfError:
            return None

    def _from_prefetch(self, pf: Prefetch, deadline: Optional[float], limit: int,
                       o: Outcome) -> int:
        """Waits for pf until the deadline (time.monotonic() seconds; None: until it
        completes) and returns the leading tokens that arrived, at most limit."""
        w = time.perf_counter()
        ready = pf.wait(deadline)
        o.prefetch = {"tokens": pf.tokens, "ready_tokens": ready,
                      "deadline_missed": ready < pf.tokens,
                      "wait_s": time.perf_counter() - w, "label": "real"}
        return min(ready, limit)

    def _prefill(self, tokens: List[int], reuse: str, o: Outcome,
                 handed: Optional[int] = None, pf: Optional[Prefetch] = None,
                 deadline: Optional[float] = None, step: bool = False,
                 sources: Optional[Sequence[Tuple[str, int, int]]] = None,
                 save: Optional[bool] = None) -> Any:
        """Fills a cache with the prompt's KV (reused, loaded, computed): returns it, how many
        leading tokens the stores hold, and the token after the first where this ran the first
        decoding step (else None); the first token goes into o.tokens. handed: a decode's first
        token, chosen by its prefill: where the prefill handed the whole prompt's KV over
        (handoff_tokens), it is all loaded and nothing is computed here; with step, the first
        decoding step then runs layer by layer as the load arrives. sources: the plan's runs
        (store, from, tokens) that the prompt's loads take their chunks from (not a handoff's,
        whose chunks are other keys). save: the prompt's chunks are to be saved (True: its last
        partial chunk too, padded: _save); where the prompt is computed into the staging pages
        with nothing to load, the save runs beside the forward pass, layer by layer, and the
        fourth value returned is it (_LayerSave), else None and the caller saves after."""
        L, C = self.layout, self.layout.chunk_tokens
        n = len(tokens)
        limit = (n - 1) // C * C  # the last token is computed: its logits are the answer
        d = self._device_prefix(tokens, limit) if reuse != "none" and self.last_cache is not None \
            else 0
        cached, seq = 0, tokens
        if handed is not None:
            seq = handoff_tokens(tokens, C)
        use_pf = pf is not None and reuse == "all" and handed is None and self.cn is not None
        if use_pf:  # fetched while it waited: what arrived by the deadline, no decision needed
            cached = self._from_prefetch(pf, deadline, limit, o)
        elif reuse == "all" and (limit or handed is not None) and self.cn is not None:
            try:  # the stores unreachable: a miss, and the prompt is computed
                cached = (self.lookup(seq) if handed is not None else
                          self.lookup(tokens[:limit], sources))
            except KvfError as e:
                o.load_error = e.name
                o.notes.append(f"lookup: {e}")
        whole = handed is not None and cached == len(seq) and len(seq) <= self.staging.tokens
        if not whole:
            cached = min(cached, limit)
        if cached > d and not whole and not use_pf:
            cached = self._decide(d, cached, n, o)
        upto = n if whole else cached  # the positions handed to the cache
        cache = self.last_cache if d else self._new_cache()
        if d:
            _crop(cache, d)
        else:
            self.last_cache = None  # its memory goes back before this sequence's is taken
        load = None
        if cached > d:
            try:
                pages = list(range(cached // L.page_tokens))
                self.staging.own()
                load = (self.cn.load_prefetched(pf, seq[:cached], pages) if use_pf else
                        self.cn.load(seq[:cached], pages, first_chunk=d // C,
                                     sources=sources if handed is None else None))
            except KvfError as e:
                o.load_error = e.name
                o.notes.append(f"load: {e}")
                cached, whole = 0, False
        if use_pf and load is not None and not o.prefetch["deadline_missed"] and \
                pf.tokens < limit:  # nothing more could be loaded: no round trip
            # What the stores hold now beyond what the prefetch was asked for (another request
            # saved more of this prompt while this one waited) is loaded beside it (kvf-engine's
            # rule; not after a deadline cut the prefetch short).
            try:
                now = min(self.lookup(tokens[:limit]), limit) // C * C
                if now > cached:
                    self.staging.own()
                    more = self.cn.load(seq[:now], list(range(now // L.page_tokens)),
                                        first_chunk=cached // C, sources=sources)
                    load, cached, upto = _Both(load, more), now, now
            except KvfError as e:
                o.notes.append(f"beyond the prefetch: {e}")
        hooks, waited, load_done, arrived = [], [0.0], [0.0], [0.0]
        following = None  # the token after the first, where the first decoding step ran here
        beside = None  # the save that runs beside the forward pass (before t0: not the pass's)
        yields = False  # the pass yields its turn at layer boundaries (_yield_hooks)
        if self.gpu_turn is not None and not whole:
            # after the load started (it goes on while this waits), before the pass's first
            # kernel; the key's predicted time is what the pass computes
            begin = cached if load is not None else d
            ahead = self.rates.compute_s(begin, n)
            yields = ahead is not None and ahead >= YIELD_MIN_S
            light = self.rates.light(begin, n)
            self._turn, waited_turn = self.gpu_turn.acquire(ahead or 0.0, yields=yields,
                                                            light=light)
            o.gpu_turn = {"wait_s": waited_turn, "held": self._turn is not None,
                          "beside": self.gpu_turn.last_beside, "predicted_s": ahead,
                          "light": light, "label": "real"}
        if load is None and save is not None and self.save_beside_tokens is not None and \
                n - d >= self.save_beside_tokens:
            beside = self._beside = self._save_beside(tokens, cache, min(cached, n // C * C),
                                                      save)
        t0 = time.perf_counter()
        clock = PassClock(self._torch, self.device.type == "cuda")
        recompute_s = self.rates.compute_s(d, n) if load is not None else None
        yielded = [0, 0.0]  # the pass's yields of its turn, and their seconds
        hooked = yields and self._turn is not None
        if hooked:  # removed with the load's (finally, below)
            hooks.extend(self._yield_hooks(yielded))
        try:
            if load is not None:
                def fill(layer: int) -> None:
                    w = time.perf_counter()
                    try:
                        load.wait_layer(layer)
                    except Miss as e:
                        raise _Abort(e.name, str(e)) from None
                    finally:
                        arrived[0] = time.perf_counter()
                        waited[0] += arrived[0] - w
                    # Behind its prediction: where the rest of the load, at the pace so far,
                    # would take longer than computing the prompt after the engine's own
                    # prefix, the load is cut at this layer boundary and the prompt computed.
                    # (not the time the pass yielded its turn: the pass, not the load, waited)
                    spent = time.perf_counter() - t0 - yielded[1]
                    rest = spent * (L.layers - layer - 1) / (layer + 1)
                    if (not whole and recompute_s is not None and layer + 1 < L.layers and
                            rest > recompute_s * 1.2 + 0.002):
                        self.rates.note_load((upto - d) * L.bytes_per_token * (layer + 1) /
                                             L.layers, spent)
                        o.decision["cut_at_layer"] = layer
                        load.cancel()
                        raise _Abort("KVF_ETIMEDOUT", f"load cut at layer {layer}: {rest:.3f} s "
                                     f"more predicted, recompute {recompute_s:.3f} s")
                    self.staging.attach(cache, layer, d, upto)

                fill(0)  # before the model reads the cache's length from layer 0
                filled = {0}

                def pre(layer: int):
                    def hook(module, args):
                        if layer not in filled:
                            filled.add(layer)
                            fill(layer)
                    return hook

                if whole and step:
                    # No prompt position to compute: the first token is the prefill's, and the
                    # first decoding step runs layer by layer as the load arrives.
                    first = int(handed)
                    t_step = time.perf_counter()
                    following = self._step(first, cache, lambda i: pre(i)(None, None), upto)
                    # its inter-token latency: the part of the step after the last layer arrived
                    # (the load's own time is the decode's prefill, as for any decode)
                    o.itl_s.append(time.perf_counter() - max(t_step, arrived[0]))
                    o.notes.append("the whole prompt's KV handed over: nothing computed; the "
                                   "first decoding step overlapped the load")
                elif whole:  # every layer, and no forward pass: the first token is the prefill's
                    for layer in range(1, L.layers):
                        fill(layer)
                    first = int(handed)
                    o.notes.append("the whole prompt's KV handed over: nothing computed")
                else:
                    for layer in range(1, L.layers):
                        hooks.append(self.layers[layer].register_forward_pre_hook(pre(layer)))
                    first = self._forward(tokens[cached:], cache)
                o.loaded_tokens, o.device_tokens = upto - d, d
            else:
                try:
                    first = self._forward(tokens[d:], cache)
                finally:
                    if beside is not None:
                        beside.remove_hooks()
                o.device_tokens = d
        except _Abort as e:  # recompute what did not arrive, after the engine's own prefix
            whole, following = False, None
            o.load_error, note = e.args
            o.notes.append(note)
            for h in hooks:
                h.remove()
            hooks = []  # the recompute yields as the pass would have
            if yields and self._turn is not None:
                hooks = self._yield_hooks(yielded)
            _crop(cache, d)
            if d == 0:
                cache = self._new_cache()
            first = self._forward(tokens[d:], cache)
            o.loaded_tokens, o.device_tokens = 0, d
        finally:
            for h in hooks:
                h.remove()
            if load is not None:
                try:
                    load.wait()
                    load_done[0] = time.perf_counter()
                except KvfError:
                    pass
                load.close()
        clock.stop()
        self._sync()
        o.prefill_s = time.perf_counter() - t0
        o.pass_clock = clock.read()
        o.pass_clock["yield_hooks"] = hooked
        self._release_turn()
        o.wait_s = waited[0]
        o.compute_s = max(0.0, o.prefill_s - o.wait_s)
        if yielded[0]:  # inside prefill_s and compute_s (the pass's time); not its rate
            o.gpu_turn.update(yields=yielded[0], yielded_s=yielded[1])
        if o.loaded_tokens and load_done[0] and not use_pf:  # a prefetch's copy is no link's
            self.rates.note_load(o.loaded_tokens * L.bytes_per_token,
                                 max(1e-6, load_done[0] - t0 - yielded[1]))
        # not a pass that shared the GPU with the holder's (beside it): its time is not its own
        if not o.loaded_tokens and not whole and o.device_tokens < n and \
                not o.gpu_turn.get("beside"):
            self.rates.note_prefill(n - o.device_tokens, max(1e-6, o.compute_s - yielded[1]),
                                    begin=o.device_tokens)
        if o.decision:
            o.decision["label"] = "real"
            o.decision["outcome"] = ("loaded" if o.loaded_tokens else
                                     "cut, recomputed" if "cut_at_layer" in o.decision else
                                     "recomputed")
        o.tokens.append(first)
        o.handed_over = whole
        # what the stores hold of the prompt: the lookup's prefix, unless its load failed
        known = 0 if load is not None and not o.loaded_tokens else min(cached, n // C * C)
        return cache, known, following, beside

    def _yield_hooks(self, yielded: List[Any]) -> List[Any]:
        """Hooks before each decoder layer but the first, by which the pass under way yields
        its turn on the GPU to a later pass of an earlier key (kvfabric.gputurn: preempted,
        yield_turn): at most MAX_YIELDS times, once its GPU work so far is done. On CUDA the
        host runs at most RUN_AHEAD layers ahead of the GPU (an event per layer), so that a
        boundary is asked about when the GPU reaches it, not all at once as the host queues the
        whole pass. yielded: [yields, seconds], added to (shared by the hooks of a pass and of
        its recompute after a cut load)."""
        torch, cuda = self._torch, self.device.type == "cuda"
        marks: List[Any] = []
        tries = [0]  # yields tried (one that could not give the turn up counts too)

        def hook(module: Any, args: Any) -> None:
            if cuda:
                ev = torch.cuda.Event()
                ev.record()
                marks.append(ev)
                if len(marks) > RUN_AHEAD:
                    marks.pop(0).synchronize()
            if self._turn is None or tries[0] >= MAX_YIELDS or \
                    not self.gpu_turn.preempted(self._turn):
                return
            tries[0] += 1
            if cuda:  # what it queued runs before the other's pass, not beside it
                torch.cuda.current_stream().synchronize()
            self._turn, s = self.gpu_turn.yield_turn(self._turn)
            if self.gpu_turn.last_yielded:
                yielded[0] += 1
                yielded[1] += s

        return [layer.register_forward_pre_hook(hook) for layer in self.layers[1:]]

    def _release_turn(self) -> None:
        if self._turn is not None:
            self.gpu_turn.release(self._turn)
            self._turn = None

    def _save_span(self, tokens: List[int], known: int, tail: bool) -> Tuple[List[int], int, int]:
        """What a save of the prompt writes: the tokens its chunks are keyed by (with tail, the
        padded form: handoff_tokens), the positions saved to (whole chunks) and the first chunk
        (the stores hold the `known` tokens before it)."""
        C = self.layout.chunk_tokens
        seq = handoff_tokens(tokens, C) if tail else tokens
        if len(seq) > self.staging.tokens:
            seq = tokens
        return seq, len(seq) // C * C, known // C

    def _save_beside(self, tokens: List[int], cache: Any, known: int,
                     tail: bool) -> Optional["_LayerSave"]:
        """Starts the save of the prompt's chunks beyond `known` before its forward pass, each
        layer reported as the model finishes it, so that its copies and sends overlap the
        layers after it (after the pass, only the last layers' remain): where the cache is in
        the staging pages and the prompt fits there (the model writes its KV where the save
        reads it). None where it cannot (the caller saves after the pass: _save), or where the
        save cannot start (the caller's save after the pass meets the error again and reports
        it)."""
        L, C = self.layout, self.layout.chunk_tokens
        if self.cn is None or not getattr(cache, "staged", False) or \
                len(tokens) > self.staging.tokens:
            return None
        seq, full, first = self._save_span(tokens, known, tail)
        if full <= first * C:
            return None
        n = len(tokens)
        self.staging.from_cache(cache, n, full)  # the padding of the last partial chunk: zeros
        try:
            self.staging.own()
            sv = self.cn.save(seq[:full], list(range(full // L.page_tokens)), first_chunk=first)
        except KvfError:
            return None
        stream = self._torch.cuda.current_stream() if self.device.type == "cuda" else None
        return _LayerSave(sv, self.layers, stream, cache, n, n // C * C - first * C, full > n)

    def _save(self, tokens: List[int], cache: Any, known: int,
              tail: bool = False) -> Tuple[int, bool]:
        """Saves the prompt's full chunks beyond the first `known` tokens (which the stores hold
        already), and with tail its last partial chunk, padded (handoff_tokens: for the decode
        of a disaggregated request). Returns the tokens of the whole chunks saved, and whether the
        padded last chunk was saved too."""
        L, C = self.layout, self.layout.chunk_tokens
        if self.cn is None:
            return 0, False
        seq, full, first = self._save_span(tokens, known, tail)
        if full <= first * C:
            return 0, False
        self.staging.from_cache(cache, first * C, full)
        stream = self._torch.cuda.current_stream() if self.device.type == "cuda" else None
        self.staging.own()
        sv = self.cn.save(seq[:full], list(range(full // L.page_tokens)), first_chunk=first)
        try:
            for layer in range(L.layers):
                sv.layer_done(layer, stream)
            sv.wait()
        finally:
            sv.close()
        return len(tokens) // C * C - first * C, len(seq) > len(tokens)

    def run(self, kind: str, tokens: Sequence[int], max_tokens: int = 1, reuse: str = "all",
            first_token: Optional[int] = None, prefetch: Optional[Prefetch] = None,
            deadline: Optional[float] = None,
            sources: Optional[Sequence[Tuple[str, int, int]]] = None,
            gone: Optional[Callable[[], bool]] = None,
            on_first: Optional[Callable[[int], None]] = None) -> Outcome:
        """Runs one request (see _run). A request that runs out of device memory (engines that
        share a GPU: another process's allocator holds what this one needs) is run once more
        from the start, after the engine let go of what it holds between requests (the last
        sequence's cache, published as no longer held) and its allocator's free blocks went
        back to the device; without its prefetch, and with its first token told once (it is
        the same token but where the second run loaded what the first computed and saved, and
        the two differ: then first_token_mismatch and a note). A second failure raises. After
        every request, failed or not: release_if_low()."""
        told: List[int] = []

        def first(t: int) -> None:
            if not told:
                told.append(t)
                on_first(t)

        hook = first if on_first is not None else None
        try:
            try:
                return self._run(kind, tokens, max_tokens, reuse, first_token, prefetch,
                                 deadline, sources, gone, hook)
            except Exception as e:  # noqa: BLE001 - only running out of memory is retried
                if not devmem.is_out_of_memory(self._torch, e):
                    raise
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            freed = self.free_memory()
            self.oom_retries += 1
            o = self._run(kind, tokens, max_tokens, reuse, first_token, None, None, sources,
                          gone, hook)
            o.oom_retried = True
            o.notes.append(f"out of device memory ({why}); run again after freeing {freed}")
            if told and o.tokens and o.tokens[0] != told[0]:
                o.first_token_mismatch = True
                o.notes.append(f"the first token streamed before the failure ({told[0]}) "
                               f"differs from the second run's ({o.tokens[0]})")
            return o
        finally:
            try:
                self.release_if_low()
            except Exception as e:  # noqa: BLE001 - never the request's answer or its error
                self.release_error = f"{type(e).__name__}: {e}"

    def free_memory(self) -> str:
        """Lets go of what the engine holds between requests: the last sequence's cache (its
        blocks published as removed) and the allocator's free blocks (back to the device, for
        the other processes on it). Returns what was freed, in words."""
        held = len(self.last_tokens)
        self.last_tokens, self.last_cache = [], None
        self.held.set([])
        gc.collect()
        gave = devmem.give_back(self._torch, self.device)
        return (f"the cache of the last sequence ({held} tokens) and {gave / 2**20:.0f} MiB of "
                f"the allocator's free blocks")

    def release_if_low(self) -> bool:
        """Gives the allocator's free blocks back to the device where it has less than
        release_below free (kvfabric.devmem: engines sharing a GPU each keep the blocks of
        their largest pass). A check costs one cudaMemGetInfo; a release, only when the device
        is that full, the next pass's allocations. True where it released."""
        if self.release_below is None:
            return False
        free = self._device_free()
        if free is None or free >= self.release_below:
            return False
        self._give_back()
        self.memory_releases += 1
        return True

    def _device_free(self) -> Optional[int]:
        return devmem.device_free(self._torch, self.device)

    def _give_back(self) -> int:
        return devmem.give_back(self._torch, self.device)

    def _run(self, kind: str, tokens: Sequence[int], max_tokens: int, reuse: str,
             first_token: Optional[int], prefetch: Optional[Prefetch],
             deadline: Optional[float], sources: Optional[Sequence[Tuple[str, int, int]]],
             gone: Optional[Callable[[], bool]],
             on_first: Optional[Callable[[int], None]]) -> Outcome:
        """Runs one request (see the module's docstring). Not thread-safe: one at a time.
        prefetch: its prefix fetched while it waited (Engine.prefetch), used as far as it arrived
        by deadline (time.monotonic() seconds); stays the caller's. sources: the plan's runs
        (store "host:port", from token, tokens) its loads take their chunks from first. gone:
        asked before each decoding step; true stops the decode there (o.abandoned): nobody waits
        for the rest. on_first: called with the first token the moment the pass gives it (a
        prefill or generate, before the prompt's save and the decode: a server streams it), on
        this thread; what it raises is the caller's (it should not raise)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("tokens must not be empty")
        if len(tokens) + max_tokens + 1 > self.max_tokens:
            raise ValueError(f"prompt of {len(tokens)} tokens + {max_tokens} to generate exceed "
                             f"this engine's KV capacity of {self.max_tokens} tokens")
        if self.vocab is not None and (min(tokens) < 0 or max(tokens) >= self.vocab or (
                first_token is not None and not 0 <= int(first_token) < self.vocab)):
            raise ValueError(f"a token id is outside the model's vocabulary of {self.vocab}")
        if reuse not in ("all", "engine", "none"):
            raise ValueError("reuse must be all, engine or none")
        o = Outcome([], [], len(tokens), 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, "KVF_OK", False, [])
        stores = reuse == "all" and self.cn is not None
        # the connector's count of saves put in parts, to say whether this one was (its records)
        parts0 = self.cn.stats()["saves_in_parts"] if stores and kind != "decode" else 0
        with self._torch.no_grad():
            handed = int(first_token) if kind == "decode" and first_token is not None else None
            try:
                cache, known, following, beside = self._prefill(
                    tokens, reuse if stores or reuse != "all" else "engine", o, handed, prefetch,
                    deadline, step=kind == "decode" and max_tokens > 1, sources=sources,
                    save=kind == "prefill" if stores and kind != "decode" else None)
            except BaseException:
                # The cache may be cropped or half-filled: nothing of it is reused or saved.
                self.last_tokens, self.last_cache = [], None
                if self._beside is not None:  # cancelled, freed (what it put, if it did, stays)
                    self._beside.abandon()
                raise
            finally:
                self._beside = None
                self._release_turn()  # where the pass raised before giving it back
            self.last_tokens, self.last_cache = tokens, cache
            if on_first is not None and kind != "decode":
                on_first(o.tokens[0])
            if stores and kind != "decode":
                t_save = time.perf_counter()
                try:  # a save that fails loses the cache entry, not the request
                    # what the pass left to send; a put that failed raises (below), a layer not
                    # reported leaves it unsent: the whole save then, after the pass
                    if beside is not None and beside.finish():
                        o.saved_tokens, o.tail_saved = beside.tokens, beside.tail
                        o.notes.append("saved beside the forward pass, layer by layer")
                    else:
                        if beside is not None:
                            o.notes.append(f"the save beside the forward pass stopped "
                                           f"({beside.why}): saved after it")
                        o.saved_tokens, o.tail_saved = self._save(tokens, cache, known,
                                                                  tail=kind == "prefill")
                except KvfError as e:
                    o.save_error = e.name
                    o.notes.append(f"save: {e}")
                o.save_s = time.perf_counter() - t_save
                if self.cn.stats()["saves_in_parts"] > parts0:
                    o.notes.append("the save was put in parts as its layers were gathered")
            self.held.set(tokens)
            if kind == "decode" and first_token is not None:
                o.first_token_mismatch = o.tokens[0] != int(first_token)
                o.tokens[0] = int(first_token)
            if kind != "prefill":
                t_dec = time.perf_counter()
                last = o.tokens[0]
                if following is not None:  # the first step ran with the load (_prefill)
                    o.tokens.append(following)
                    last = following
                for _ in range(max_tokens - len(o.tokens)):
                    if gone is not None and gone():
                        o.abandoned = True
                        break
                    t = time.perf_counter()
                    if self.gpu_turn is not None:  # inside the step's inter-token latency
                        y = self.gpu_turn.yield_to_passes(self.decode_yield_s)
                        if y:
                            o.gpu_turn["decode_yield_s"] = o.gpu_turn.get("decode_yield_s",
                                                                          0.0) + y
                    last = self._step(last, cache)
                    o.tokens.append(last)
                    o.itl_s.append(time.perf_counter() - t)
                o.decode_s = time.perf_counter() - t_dec
                self.rates.note_decode(len(o.itl_s), sum(o.itl_s))
            self.last_tokens = tokens + o.tokens[:-1] if kind != "prefill" else tokens
        return o


class _LayerSave:
    """A save beside a forward pass (Engine._save_beside): a hook on each decoder layer reports
    the layer done as the model finishes it (for CUDA pages: queued on the pass's stream, so the
    copy waits for the layer's kernels, not the host). A layer is reported only if its positions
    are all in the staging pages (the cache layer holds the prompt's n positions there, and has
    not left the pages); the first that is not, or that the save refuses, stops the reporting:
    the save is then cancelled (nothing of it is put: a batch is put once every layer was
    gathered) and the caller saves the whole prompt after the pass. Calls from another thread
    (another engine's pass over a shared model) are not this pass's and are ignored. If it is
    dropped unfinished, the save is cancelled before its handle is freed."""

    def __init__(self, sv: Any, layers: Sequence[Any], stream: Any, cache: Any, n: int,
                 tokens: int, tail: bool) -> None:
        self.sv, self.stream, self.cache, self.n = sv, stream, cache, n
        self.tokens, self.tail = tokens, tail
        self.reported, self.failed, self.why = 0, False, ""
        self.layers = len(layers)
        self.thread = threading.get_ident()
        self._fin = weakref.finalize(self, _LayerSave._cancel, sv)
        self.hooks: List[Any] = []
        try:
            for i, layer in enumerate(layers):
                self.hooks.append(layer.register_forward_hook(self._hook(i)))
        except BaseException:
            self.abandon()
            raise

    @staticmethod
    def _cancel(sv: Any) -> None:
        try:
            sv.cancel()
        except KvfError:  # closed already
            pass

    def _stop(self, why: str) -> None:
        if not self.failed:
            self.failed, self.why = True, why

    def _hook(self, i: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, out: Any) -> None:
            if threading.get_ident() != self.thread or self.failed:
                return
            if i != self.reported:  # in order, each once
                self._stop(f"layer {i} ran out of order")
                return
            layers = getattr(self.cache, "layers", None)
            s = layers[i] if layers is not None and i < len(layers) else None
            if s is None or getattr(s, "detached", True) or getattr(s, "length", -1) != self.n:
                self._stop(f"layer {i} is not in the staging pages")
                return
            try:
                self.sv.layer_done(i, self.stream)
                self.reported += 1
            except KvfError as e:
                self._stop(f"layer {i}: {e}")
        return hook

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def abandon(self) -> None:
        """The pass failed: the save is cancelled and freed. (If every layer was reported, its
        batch may be on its way already: a cancel does not withdraw it, and it is what the pass
        computed.)"""
        self.remove_hooks()
        self._fin.detach()
        self._cancel(self.sv)
        self.sv.close()

    def finish(self) -> bool:
        """After the pass: waits for what is left of the save and returns True; False (the save
        cancelled and freed, nothing of it put) where a layer was not reported; raises KvfError
        (the save freed) where its put failed."""
        self.remove_hooks()
        self._fin.detach()
        try:
            if self.failed or self.reported != self.layers:
                self._stop(f"{self.reported} of {self.layers} layers reported")
                self._cancel(self.sv)
                return False
            self.sv.wait()
            return True
        finally:
            self.sv.close()


class _Both:
    """Two loads of one sequence's pages, waited for as one: a prefetch's scatter and the
    stores' chunks beyond it."""

    def __init__(self, a: Any, b: Any) -> None:
        self.a, self.b = a, b

    def wait_layer(self, layer: int) -> None:
        self.a.wait_layer(layer)
        self.b.wait_layer(layer)

    def cancel(self) -> None:
        self.a.cancel()
        self.b.cancel()

    def wait(self) -> None:
        try:
            self.a.wait()
        finally:
            self.b.wait()

    def close(self) -> None:
        self.a.close()
        self.b.close()
