"""Engine-side bookkeeping between a paged KV cache in torch tensors and kvfabric: which pages a
request gets, what to load (the cached prefix beyond what the engine already shares), what to
save (the full chunks computed), layer by layer. Engine-agnostic: the transformers integration
and the tests' tiny model use it the same way (docs/python.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from .connector import Connector, Transfer, pages_from_tensors
from .errors import Miss
from .layout import Layout


class PoolExhausted(RuntimeError):
    """No free page for a request: the engine must wait for another to finish."""


class BlockPool:
    """Page ids [0, num_pages) handed out and taken back."""

    def __init__(self, num_pages: int) -> None:
        self._free = list(range(num_pages - 1, -1, -1))
        self.num_pages = num_pages

    @property
    def free_count(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> List[int]:
        if n > len(self._free):
            raise PoolExhausted(f"{n} pages asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, ids: Sequence[int]) -> None:
        self._free.extend(reversed(list(ids)))


class PagedKVCache:
    """A paged KV cache as torch tensors in the layout kvfabric registers: per layer one tensor
    [2, num_pages, page_tokens, kv_heads, head_dim] (K then V), as vLLM's FlashAttention backend
    keeps it."""

    def __init__(self, layout: Layout, num_pages: int, device: Any = "cpu", dtype: Any = None) -> None:
        import torch

        self.layout = layout
        self.num_pages = num_pages
        self.dtype = dtype or {"f32": torch.float32, "f16": torch.float16,
                               "bf16": torch.bfloat16}[layout.dtype]
        shape = (2, num_pages, layout.page_tokens, layout.kv_heads, layout.head_dim)
        self.tensors = [torch.zeros(shape, dtype=self.dtype, device=device)
                        for _ in range(layout.layers)]

    def write(self, layer: int, page_ids: Sequence[int], start: int, k: Any, v: Any) -> None:
        """Writes the K and V rows ([n, kv_heads, head_dim]) of positions start.. of a sequence
        whose pages are page_ids."""
        P = self.layout.page_tokens
        t = self.tensors[layer]
        for i in range(k.shape[0]):
            pos = start + i
            page, off = page_ids[pos // P], pos % P
            t[0, page, off] = k[i]
            t[1, page, off] = v[i]

    def read(self, layer: int, page_ids: Sequence[int], n: int):
        """K and V ([n, kv_heads, head_dim]) of positions 0..n of a sequence (views where
        page_ids is a range of consecutive pages, copies otherwise)."""
        P = self.layout.page_tokens
        t = self.tensors[layer]
        pages = page_ids[: (n + P - 1) // P]
        if isinstance(pages, range) and pages.step == 1:
            # consecutive pages: a view. A gather would copy, and its index list, made on the
            # host, would be copied to the device synchronously: the host then waits for the
            # GPU at every layer and the forward pass stops overlapping its own launches.
            sel = slice(pages.start, pages.stop)
        else:
            sel = list(pages)
        k = t[0, sel].reshape(-1, self.layout.kv_heads, self.layout.head_dim)[:n]
        v = t[1, sel].reshape(-1, self.layout.kv_heads, self.layout.head_dim)[:n]
        return k, v


@dataclass
class Plan:
    """What one request does with kvfabric: its pages, the prefix loaded (tokens), the first
    token the engine must compute, and the load in flight."""

    tokens: List[int]
    page_ids: List[int]
    shared: int            # leading tokens the engine already holds (its own prefix sharing)
    cached: int            # leading tokens kvfabric holds (lookup), >= shared when loading
    load: Optional[Transfer] = None
    first_bad_layer: Optional[int] = None  # a layer that did not arrive: recompute from there
    notes: List[str] = field(default_factory=list)

    @property
    def compute_from(self) -> int:
        """The first position the engine computes: after the loaded prefix, or after its own
        shared prefix when the load missed."""
        if self.load is None or self.first_bad_layer is not None:
            return self.shared
        return max(self.cached, self.shared)


class KVReuse:
    """Lookup, load and save for requests over a PagedKVCache registered with a connector."""

    def __init__(self, connector: Connector, cache: PagedKVCache, pool: Optional[BlockPool] = None) -> None:
        self.cn = connector
        self.cache = cache
        self.layout = cache.layout
        self.pool = pool or BlockPool(cache.num_pages)
        self._regs = pages_from_tensors(self.layout, cache.tensors)
        connector.register(self._regs)

    def begin(self, tokens: Sequence[int], shared: int = 0, shared_pages: Sequence[int] = ()) -> Plan:
        """Plans a request: its pages (the shared prefix's pages, then new ones for the rest),
        kvfabric's cached prefix, and a load of the chunks beyond the shared prefix, started now,
        layer by layer. shared must be a multiple of page_tokens."""
        L = self.layout
        tokens = list(tokens)
        if shared % L.page_tokens:
            raise ValueError("shared must be a multiple of page_tokens")
        n_pages = (len(tokens) + L.page_tokens - 1) // L.page_tokens
        own = list(shared_pages)[: shared // L.page_tokens]
        page_ids = own + self.pool.alloc(n_pages - len(own))
        full = len(tokens) // L.chunk_tokens * L.chunk_tokens
        cached = self.cn.lookup(tokens[:full]) if full else 0
        plan = Plan(tokens, page_ids, shared, cached)
        first = shared // L.chunk_tokens  # chunks wholly shared are not moved
        if cached > first * L.chunk_tokens and cached > shared:
            self.cn.take(self._regs)  # another user of the connector may have registered since
            plan.load = self.cn.load(tokens[:cached], page_ids[: cached // L.page_tokens],
                                     first_chunk=first)
        return plan

    def wait_layer(self, plan: Plan, layer: int) -> bool:
        """Before computing layer `layer`: True when the loaded prefix is in for this layer; False
        when it did not arrive (then and from then on the engine computes from plan.shared)."""
        if plan.load is None or plan.first_bad_layer is not None:
            return False
        try:
            plan.load.wait_layer(layer)
            return True
        except Miss as e:
            plan.first_bad_layer = layer
            plan.notes.append(str(e))
            return False

    def finish_load(self, plan: Plan) -> None:
        if plan.load is not None:
            try:
                plan.load.wait()
            except Miss as e:
                if plan.first_bad_layer is None:
                    plan.first_bad_layer = 0
                plan.notes.append(str(e))
            plan.load.close()

    def save(self, plan: Plan, computed_to: int, stream: Any = None) -> Optional[Transfer]:
        """Saves the full chunks of tokens[:computed_to] that kvfabric does not hold yet, every
        layer at once (after the forward pass). Returns the transfer (close it, or wait on it, off
        the critical path), or None when there is nothing new."""
        L = self.layout
        full = computed_to // L.chunk_tokens * L.chunk_tokens
        first = plan.cached // L.chunk_tokens if plan.first_bad_layer is None else 0
        if full == 0 or first * L.chunk_tokens >= full:
            return None
        self.cn.take(self._regs)
        sv = self.cn.save(plan.tokens[:full], plan.page_ids[: full // L.page_tokens],
                          first_chunk=first)
        for layer in range(L.layers):
            sv.layer_done(layer, stream)
        return sv

    def end(self, plan: Plan) -> None:
        """Returns the request's own pages to the pool (not the shared prefix's)."""
        self.pool.free(plan.page_ids[plan.shared // self.layout.page_tokens:])
