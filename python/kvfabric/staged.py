"""A model's KV cache kept in kvfabric's staging pages: no copy between the pages that loads land
in and saves are read from, and the cache the model attends over.

The staging pages of a layer are one tensor [2, pages, page_tokens, kv_heads, head_dim]: K and V
each token-major and contiguous, [tokens, kv_heads, head_dim]. A cache layer here is a length and
two views of that memory as [1, kv_heads, length, head_dim] (strided: token-major underneath),
which is what attention reads; FlashAttention reads such views in place. So

- a prefix loaded from kvfabric is in the cache once its layer has arrived (attach: no copy; the
  dynamic cache took two copies of it, one when it was handed over and one when the suffix was
  appended, 38 ms and more for a 29K-token prefix of an 8B model on an H200);
- what the model computes (the suffix, decoded tokens) is written into the pages after it
  (update), and the prompt's chunks are saved from the pages as they are.

One sequence at a time uses a staging area: an engine (kvfabric.engine, kvfabric.transformers)
that keeps the last sequence's KV keeps it in the pages. A batch of more than one, or a sequence
that outgrows the pages, leaves the pages for tensors of its own (the dynamic cache's rule: cat),
and says so (detached).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple


class StagedLayer:
    """One layer's keys and values in staging pages (planes k and v, [tokens, heads, dim])."""

    def _staged_init(self, planes: Optional[Tuple[Any, Any]]) -> None:
        self._planes = planes
        self.length = 0
        self.detached = planes is None
        self.keys: Any = None
        self.values: Any = None
        if planes is not None:
            self._views()  # empty views: the batch size and head count are readable

    def _views(self) -> None:
        k, v = self._planes
        n = self.length
        self.keys = k[:n].transpose(0, 1).unsqueeze(0)
        self.values = v[:n].transpose(0, 1).unsqueeze(0)

    def attach(self, n: int) -> None:
        """Positions 0..n of this layer are in the pages (a load put them there)."""
        if self.detached:
            raise RuntimeError("this cache layer no longer uses the staging pages")
        if n > self._planes[0].shape[0]:
            raise ValueError(f"{n} positions in a staging area of {self._planes[0].shape[0]}")
        self.length = n
        self._views()

    def detach(self) -> None:
        """Leaves the pages: the cached positions are copied into tensors of this layer's own."""
        if not self.detached:
            if self.length:
                self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
            else:
                self.keys = self.values = None
            self.detached = True

    def staged_update(self, k: Any, v: Any) -> Tuple[Any, Any]:
        """Appends keys and values [batch, heads, m, dim]; returns the whole layer's."""
        import torch

        m = k.shape[-2]
        if not self.detached and (k.shape[0] != 1 or self.length + m > self._planes[0].shape[0]):
            self.detach()
        if self.detached:
            if self.keys is None:
                self.keys, self.values = k, v
            else:
                self.keys = torch.cat([self.keys, k], dim=-2)
                self.values = torch.cat([self.values, v], dim=-2)
            self.length = int(self.keys.shape[-2])
            return self.keys, self.values
        pk, pv = self._planes
        pk[self.length:self.length + m].copy_(k[0].transpose(0, 1))
        pv[self.length:self.length + m].copy_(v[0].transpose(0, 1))
        self.length += m
        self._views()
        return self.keys, self.values

    def staged_crop(self, n: int) -> None:
        """Keeps the first n positions (n < 0: removes the last -n)."""
        keep = max(0, self.length + n) if n < 0 else min(self.length, n)
        if keep == self.length:
            return
        self.length = keep
        if self.detached:
            self.keys = self.keys[..., :keep, :]
            self.values = self.values[..., :keep, :]
        else:
            self._views()


class _Layer(StagedLayer):
    def __init__(self, planes: Optional[Tuple[Any, Any]]) -> None:
        self._staged_init(planes)


class StagedKVCache:
    """kvfabric.llama's cache interface (update, get_seq_length, crop, layers) over staging
    pages (Staging.planes): what `python -m kvfabric.serve --backend torch` runs."""

    def __init__(self, planes: List[Tuple[Any, Any]]) -> None:
        self.layers = [_Layer(p) for p in planes]

    def update(self, keys: Any, values: Any, layer: int, *_: Any, **__: Any):
        while len(self.layers) <= layer:
            self.layers.append(_Layer(None))
        return self.layers[layer].staged_update(keys, values)

    def get_seq_length(self, layer: int = 0) -> int:
        return self.layers[layer].length if layer < len(self.layers) else 0

    def crop(self, n: int) -> None:
        for s in self.layers:
            s.staged_crop(n)

    @property
    def staged(self) -> bool:
        """Whether every layer's positions are in the staging pages."""
        return not any(s.detached for s in self.layers)
