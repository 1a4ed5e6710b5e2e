"""A decoding step of one sequence replayed from CUDA graphs, one graph per decoder layer.

An eager decoding step of an 8B model in transformers launches about 1,100 kernels; on the H200
machine that costs the host 18 to 20 ms while the GPU works for about 7 (docs/python.md). A
decode that receives a prompt's KV from a prefill (a PD handoff) runs its first step layer by
layer as the load arrives, so its first token came when the host had launched the whole step,
not when the load ended. Here the step is one graph for the embedding and the rotary angles, one
per decoder layer, one for the last norm, the head and the argmax: the host launches 34 graphs,
and between two layers it can wait for the next layer's KV (the hook `before`), as the eager
step's pre-hooks do.

A graph replays fixed shapes over fixed memory, so the step works on the staging pages
(kvfabric.engine.Staging) whole:

- the new token's keys and values are written at the position held in a device tensor
  (index_copy_), not at a Python slice;
- attention reads the first `used` rows of the layer's pages, `used` a device tensor too:
  FlashAttention's variable-length kernel with seqused_k (the kernel family the eager step runs
  for one query, told how many keys count). A masked attention over all the rows in float32
  (`attention="masked"`) gives the same result and is kept for checks: it reads every row,
  and on the H200 it was slower than the eager step (32 ms against 30 at 8K tokens).

Captured once per engine (at start, 0.65 s for an 8B model), for a batch of one in the staging
pages' dtype, on CUDA, where torch's FlashAttention op takes seqused_k. On the H200 an 8B
decoding step at 8K tokens took 8.0 ms against 30 ms eager; the PD handoff's first token fell
from 1.71x to 1.08x the transfer (docs/python.md). Where graphs cannot be used (CPU, float32,
a model of another shape) the engine's steps stay the model's forward pass; the same code run
eagerly is what the CPU tests check against that forward pass (the same tokens and pages in
float32), and on the H200 the captured step (masked attention) matched the eager forward pass
  to 4e-5 in its logits
in float32 (bf16 differs by rounding, as any other kernel choice does).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Callable, List, Optional, Tuple


class _Tls(threading.local):
    ctx: Any = None


_TLS = _Tls()


class _Ctx:
    """What attention needs while a step runs (set around capture and eager steps)."""

    __slots__ = ("used", "cu_q", "cu_k", "n", "mode", "mask")

    def __init__(self, used: Any, cu_q: Any, cu_k: Any, n: int, mode: str, mask: Any) -> None:
        self.used, self.cu_q, self.cu_k = used, cu_q, cu_k
        self.n, self.mode, self.mask = n, mode, mask


def active() -> bool:
    """Whether a GraphStep's layers are running in this thread (their caches hand attention
    the whole pages, [T, kv_heads, head_dim])."""
    return _TLS.ctx is not None


def decode_attention(q: Any, k: Any, v: Any, scale: Optional[float] = None) -> Any:
    """Attention of one query q [1, Hq, 1, D] over the first `used` rows of a layer's pages
    k, v [T, Hk, D] (the step's context). Returns [1, Hq, 1, D]."""
    import torch

    c = _TLS.ctx
    hq, d = q.shape[1], q.shape[-1]
    s = scale if scale is not None else d ** -0.5
    if c.mode == "flash":
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(1, hq, d), k, v, c.cu_q, c.cu_k, 1, k.shape[0], 0.0, False, False,
            scale=s, seqused_k=c.used)[0]
        return out.view(1, 1, hq, d).transpose(1, 2)
    if c.mode == "masked":  # every row read, the unused masked out: a fixed shape
        hk, t = k.shape[1], k.shape[0]
        qq = q[0].reshape(hk, hq // hk, d).float()  # query head j reads key head j // (hq/hk)
        att = (qq @ k.transpose(0, 1).transpose(-1, -2).float()) * s  # [Hk, rep, T]
        att = att.masked_fill(~c.mask.view(1, 1, t), float("-inf")).softmax(-1)
        out = att @ v.transpose(0, 1).float()  # [Hk, rep, D]
        return out.to(q.dtype).reshape(1, hq, 1, d)
    # eager: the rows in use as a slice, as the staged cache's views are
    from .attention import causal_attention
    n = c.n
    return causal_attention(q, k[:n].transpose(0, 1).unsqueeze(0),
                            v[:n].transpose(0, 1).unsqueeze(0), scale)


class _PagesCache:
    """The cache a captured layer sees: update writes the token's K and V at the step's position
    in the pages and returns the pages whole (attention reads `used` rows of them)."""

    def __init__(self, planes: List[Tuple[Any, Any]], widx: Any) -> None:
        self.planes, self.widx = planes, widx

    def update(self, keys: Any, values: Any, layer: int, *_: Any, **__: Any):
        pk, pv = self.planes[layer]
        pk.index_copy_(0, self.widx, keys[0].transpose(0, 1))
        pv.index_copy_(0, self.widx, values[0].transpose(0, 1))
        return pk, pv

    def get_seq_length(self, layer: int = 0) -> int:  # read by nothing a layer runs; for safety
        return 0


# Models whose step is embedding, decoder layers, norm and head as Llama's (no embedding scale,
# no logit soft-capping, no sliding window).
_FAMILY = ("llama", "qwen2", "mistral")


def flash_varlen_available() -> bool:
    """Whether this torch's FlashAttention op takes seqused_k (a device count of keys)."""
    import torch

    try:
        op = torch.ops.aten._flash_attention_forward.default
        return "seqused_k" in str(op._schema)
    except (AttributeError, RuntimeError):
        return False


def unsupported(model: Any, planes: List[Tuple[Any, Any]]) -> Optional[str]:
    """Why a GraphStep cannot serve this model over these pages (None: it can)."""
    inner = getattr(model, "model", None)
    for what, obj in (("model.model", inner), ("model.lm_head", getattr(model, "lm_head", None))):
        if obj is None:
            return f"{what} is missing"
    for name in ("embed_tokens", "layers", "norm"):
        if getattr(inner, name, None) is None:
            return f"model.model.{name} is missing"
    if getattr(inner, "rotary_emb", None) is None and getattr(model, "inv_freq", None) is None:
        return "no rotary embedding (model.model.rotary_emb) found"
    if len(inner.layers) != len(planes):
        return f"{len(inner.layers)} layers, {len(planes)} in the pages"
    cfg = getattr(model, "config", None)
    kind = cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)
    if kind not in _FAMILY:
        return f"model type {kind!r} (the step is written for {', '.join(_FAMILY)})"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl is not None and impl != "kvf_sdpa":
        return f"attention implementation {impl!r} (kvfabric's kvf_sdpa is needed)"
    return None


class GraphStep:
    """One token's decoding step over staging pages (planes: per layer K and V [T, Hk, D]).

    capture: record CUDA graphs (needs the pages on CUDA); without, the same step runs eagerly
    (CPU tests). attention: "flash" (bf16 or f16 on CUDA, torch's op with seqused_k), "masked",
    "eager" (the rows in use as a slice: not capturable) or "auto" (flash where possible, else
    masked when capturing, else eager)."""

    def __init__(self, model: Any, planes: List[Tuple[Any, Any]], capture: bool = True,
                 attention: str = "auto") -> None:
        import torch

        why = unsupported(model, planes)
        if why:
            raise ValueError(f"a graph step cannot run this model: {why}")
        self._torch = torch
        self.model, self.planes = model, planes
        inner = model.model
        self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
        self.layers = list(inner.layers)
        self.rotary = getattr(inner, "rotary_emb", None)
        self.capacity = int(planes[0][0].shape[0])
        k0 = planes[0][0]
        dev, self.dtype = k0.device, k0.dtype
        self.device = dev
        cuda = dev.type == "cuda"
        if capture and not cuda:
            raise ValueError("CUDA graphs need the pages on a CUDA device")
        flash = cuda and self.dtype in (torch.bfloat16, torch.float16) and flash_varlen_available()
        if attention == "auto":
            attention = "flash" if flash else "masked" if capture else "eager"
        if attention == "flash" and not flash:
            raise ValueError("FlashAttention with seqused_k is not available here")
        self.attention = attention
        self.captured = False
        lng = dict(dtype=torch.long, device=dev)
        self.ids = torch.zeros((1, 1), **lng)
        self.pos = torch.zeros((1, 1), **lng)
        self.widx = torch.zeros(1, **lng)
        self.used = torch.ones(1, dtype=torch.int32, device=dev)
        self.cu_q = torch.tensor([0, 1], dtype=torch.int32, device=dev)
        self.cu_k = torch.tensor([0, self.capacity], dtype=torch.int32, device=dev)
        self.rows = torch.arange(self.capacity, device=dev)
        self.mask = torch.zeros((1, 1, 1, self.capacity), dtype=torch.bool, device=dev)
        self.cache = _PagesCache(planes, self.widx)
        self.h: Any = None
        self.cos: Any = None
        self.sin: Any = None
        self.out = torch.zeros((), **lng)
        self._layer_kw = self._layer_kwargs()
        self._graphs: List[Any] = []
        self._n = 1  # the rows attention reads in an eager step (set by _set)
        if capture:
            self._capture()

    # -- the parts of a step ----------------------------------------------------------------
    def _layer_kwargs(self) -> Callable[[], dict]:
        """How a decoder layer is called: transformers' layers take the rotary angles as
        position_embeddings and the cache as past_key_values (past_key_value before 4.56);
        kvfabric.llama's take cos, sin, cache and start."""
        params = inspect.signature(self.layers[0].forward).parameters
        if "position_embeddings" in params:
            cache_kw = "past_key_values" if "past_key_values" in params else "past_key_value"

            def kw() -> dict:
                return {"attention_mask": None, "position_ids": self.pos, cache_kw: self.cache,
                        "use_cache": True, "cache_position": self.widx,
                        "position_embeddings": (self.cos, self.sin)}
            return kw
        return lambda: {"cos": self.cos, "sin": self.sin, "cache": self.cache, "start": 0}

    def _pre(self) -> None:
        torch = self._torch
        h = self.embed(self.ids)
        if self.rotary is not None:
            cos, sin = self.rotary(h, self.pos)
        else:  # kvfabric.llama: its rule, from the position as a float
            freqs = self.pos[0].float()[:, None] * self.model.inv_freq.float()[None, :]
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        if self.h is None:  # the first (eager) run allocates the step's fixed buffers
            self.h, self.cos, self.sin = h.clone(), cos.clone(), sin.clone()
        else:
            self.h.copy_(h)
            self.cos.copy_(cos)
            self.sin.copy_(sin)

    def _layer(self, i: int) -> None:
        out = self.layers[i](self.h, **self._layer_kw())
        if isinstance(out, tuple):  # transformers before 4.54 return (hidden, ...)
            out = out[0]
        self.h.copy_(out)

    def _post(self) -> None:
        logits = self.head(self.norm(self.h))
        self.out.copy_(logits[0, -1].argmax())

    def _set(self, token: int, pos: int) -> None:
        self.ids.fill_(int(token))
        self.pos.fill_(int(pos))
        self.widx.fill_(int(pos))
        self.used.fill_(int(pos) + 1)
        if self.attention == "masked":
            self._torch.lt(self.rows, int(pos) + 1, out=self.mask[0, 0, 0])
        self._n = int(pos) + 1

    def _ctx(self) -> _Ctx:
        return _Ctx(self.used, self.cu_q, self.cu_k, self._n, self.attention, self.mask)

    def _eager(self, before: Optional[Callable[[int], None]] = None) -> None:
        _TLS.ctx = self._ctx()
        try:
            self._pre()
            for i in range(len(self.layers)):
                if before is not None:
                    before(i)
                self._layer(i)
            self._post()
        finally:
            _TLS.ctx = None

    def _capture(self) -> None:
        """Warms the step up on a side stream (allocations, library handles) and records its
        graphs. The warm-up writes K and V at the pages' last row, which no sequence uses
        before it reaches that length (and then writes its own)."""
        torch = self._torch
        self._set(0, self.capacity - 1)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                self._eager()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        parts = [self._pre] + [lambda i=i: self._layer(i) for i in range(len(self.layers))] + \
            [self._post]
        graphs = []
        _TLS.ctx = self._ctx()
        try:
            with torch.no_grad():
                for fn in parts:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        fn()
                    graphs.append(g)
        finally:
            _TLS.ctx = None
        torch.cuda.synchronize(self.device)
        self._graphs = graphs
        self.captured = True

    # -- a step -----------------------------------------------------------------------------
    def step(self, token: int, pos: int, before: Optional[Callable[[int], None]] = None) -> int:
        """Runs the model on `token` at position `pos` (the pages hold positions 0..pos-1 of
        the sequence, or will by the time `before(layer)` returns for each layer) and returns
        the next token (greedy). The token's K and V are written at row pos of every layer."""
        if not 0 <= pos < self.capacity:
            raise ValueError(f"position {pos} outside the {self.capacity} rows of the pages")
        with self._torch.no_grad():
            self._set(token, pos)
            if not self.captured:
                self._eager(before)
            else:
                g = self._graphs
                g[0].replay()
                for i in range(len(self.layers)):
                    if before is not None:
                        before(i)
                    g[i + 1].replay()
                g[-1].replay()
            return int(self.out)
