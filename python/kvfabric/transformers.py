"""Hugging Face transformers with kvfabric: `generate` for single requests with the dynamic
cache, loading a cached prefix layer by layer while the forward pass runs, and saving the
prompt's full chunks after it (docs/python.md).

Only transformers' public cache API is used: DynamicCache, its update(keys, values, layer) and
its per-layer keys and values, forward pre-hooks on the decoder layers, and generate with
past_key_values. Keys are cached after RoPE, as the model stores them: a prefix is only reused at
the positions it was computed at, which chunk keys (chained from the first token) guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Sequence

from .connector import Connector
from .engine import Staging
from .engine import decoder_layers as _decoder_layers
from .errors import Miss
from .layout import Layout


class _Abort(Exception):
    """A layer did not arrive in the middle of the forward pass: generate is run again whole."""


@dataclass
class GenerateInfo:
    """What one generate call did with kvfabric."""

    prompt_tokens: int = 0
    cached_tokens: int = 0   # kvfabric's prefix, looked up
    loaded_tokens: int = 0   # loaded and used (0 after a miss)
    saved_tokens: int = 0    # full chunks saved after the prompt
    recomputed: bool = False
    notes: List[str] = field(default_factory=list)


class KVFabricGenerate:
    """model.generate with a kvfabric prefix cache, for one request at a time.

    A staging area of `staging_tokens` tokens in the model's device memory and dtype, in
    kvfabric's paged layout (kvfabric.engine.Staging), is registered with the connector once; a
    prefix is loaded there page by page and handed to the dynamic cache layer by layer, just
    before the layer runs."""

    def __init__(self, model: Any, connector: Connector, layout: Layout,
                 staging_tokens: int = 32768) -> None:
        self.model, self.cn, self.layout = model, connector, layout
        p = next(model.parameters())
        self.device = p.device
        self.stage = Staging(connector, layout, staging_tokens, p.device, p.dtype)
        self.layers = _decoder_layers(model)
        if len(self.layers) != layout.layers:
            raise ValueError(f"the model has {len(self.layers)} layers, the layout {layout.layers}")

    def _to_cache(self, cache: Any, layer: int, n: int) -> None:
        self.stage.to_cache(cache, layer, 0, n)

    def _save(self, cache: Any, tokens: List[int], first_chunk: int, full: int, stream: Any) -> int:
        C, P = self.layout.chunk_tokens, self.layout.page_tokens
        self.stage.from_cache(cache, first_chunk * C, full)
        sv = self.cn.save(tokens[:full], list(range(full // P)), first_chunk=first_chunk)
        try:
            for layer in range(self.layout.layers):
                sv.layer_done(layer, stream)
            sv.wait()
        finally:
            sv.close()
        return full - first_chunk * C

    def generate(self, tokens: Sequence[int], save: bool = True, **kwargs: Any):
        """Generates after the prompt `tokens` (greedy unless kwargs say otherwise) and returns
        (output ids of the whole sequence as a list, GenerateInfo)."""
        import torch
        from transformers import DynamicCache

        L = self.layout
        tokens = [int(t) for t in tokens]
        info = GenerateInfo(prompt_tokens=len(tokens))
        if len(tokens) > self.stage.tokens:
            raise ValueError("prompt longer than the staging area")
        # The last prompt token is always computed: it gives the first new token's logits.
        limit = (len(tokens) - 1) // L.chunk_tokens * L.chunk_tokens
        cached = self.cn.lookup(tokens[:limit]) if limit else 0
        info.cached_tokens = cached
        ids = torch.tensor([tokens], device=self.device)
        out = None
        if cached:
            cache = DynamicCache()
            load = self.cn.load(tokens[:cached], list(range(cached // L.page_tokens)))
            hooks = []
            try:
                load.wait_layer(0)
                self._to_cache(cache, 0, cached)

                filled = {0}

                def pre(layer):
                    def hook(module, args, kwargs_):
                        # Only the prefill's pass fills the layer; decoding steps find it there.
                        if layer in filled:
                            return None
                        try:
                            load.wait_layer(layer)
                        except Miss as e:
                            raise _Abort(str(e))
                        self._to_cache(cache, layer, cached)
                        filled.add(layer)
                        return None

                    return hook

                for layer in range(1, L.layers):
                    hooks.append(self.layers[layer].register_forward_pre_hook(pre(layer),
                                                                              with_kwargs=True))
                out = self.model.generate(ids, past_key_values=cache, **kwargs)
                info.loaded_tokens = cached
            except (Miss, _Abort) as e:
                info.notes.append(str(e))
                info.recomputed = True
                out = None
            finally:
                for h in hooks:
                    h.remove()
                load.close()
        if out is None:
            cache = DynamicCache()
            out = self.model.generate(ids, past_key_values=cache, **kwargs)
            info.loaded_tokens = 0
        if save:
            full = len(tokens) // L.chunk_tokens * L.chunk_tokens
            first = info.loaded_tokens // L.chunk_tokens
            if full > first * L.chunk_tokens:
                stream = torch.cuda.current_stream() if self.device.type == "cuda" else None
                info.saved_tokens = self._save(cache, tokens, first, full, stream)
        return out[0].tolist(), info
