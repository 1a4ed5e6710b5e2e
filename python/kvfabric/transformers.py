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
from .attention import use_fast_attention


_STAGED: Any = None


def _staged_class() -> Any:
    """transformers' DynamicCache with its layers in staging pages (kvfabric.staged): made on
    first use, so that this module imports without transformers."""
    global _STAGED
    if _STAGED is not None:
        return _STAGED
    from transformers import DynamicCache
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

    from .staged import StagedLayer

    class StagedDynamicLayer(StagedLayer, DynamicLayer):
        def __init__(self, planes: Any) -> None:
            CacheLayerMixin.__init__(self)
            self._staged_init(planes)
            k = planes[0]
            self.dtype, self.device = k.dtype, k.device
            self.is_initialized = True

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            self.is_initialized = True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any):
            return self.staged_update(key_states, value_states)

        def get_seq_length(self) -> int:
            return self.length

        def crop(self, tokens_to_remove: int) -> None:
            # transformers >= 5.17: a negative count removes that many; a positive one (older
            # versions) is the length to keep. staged_crop reads both the same way.
            self.staged_crop(tokens_to_remove)

        def reset(self) -> None:
            self.staged_crop(0)

        # beam search and batch changes: tensors of the layer's own, then the dynamic rules
        def reorder_cache(self, beam_idx: Any) -> None:
            self.detach()
            DynamicLayer.reorder_cache(self, beam_idx)

        def batch_repeat_interleave(self, repeats: int) -> None:
            self.detach()
            DynamicLayer.batch_repeat_interleave(self, repeats)
            self.length = 0 if self.keys is None else int(self.keys.shape[-2])

        def batch_select_indices(self, indices: Any) -> None:
            self.detach()
            DynamicLayer.batch_select_indices(self, indices)

        def offload(self) -> None:
            self.detach()
            DynamicLayer.offload(self)

    class StagedCache(DynamicCache):
        """A DynamicCache whose layers are kept in a kvfabric staging area (one sequence)."""

        def __init__(self, stage: Any) -> None:
            Cache.__init__(self, layers=[StagedDynamicLayer(p) for p in stage.planes()])

        @property
        def staged(self) -> bool:
            return not any(s.detached for s in self.layers)

    _STAGED = StagedCache
    return _STAGED


def staged_cache(stage: Any) -> Any:
    """An empty transformers cache (a DynamicCache) kept in the pages of stage
    (kvfabric.engine.Staging): loads attach to it in place, what the model computes is written
    after them, saves read the pages as they are."""
    return _staged_class()(stage)


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
        use_fast_attention(model)

    def _to_cache(self, cache: Any, layer: int, n: int) -> None:
        self.stage.attach(cache, layer, 0, n)

    def new_cache(self) -> Any:
        """An empty cache in the staging pages (kvfabric.staged): one sequence at a time."""
        return staged_cache(self.stage)

    def _save(self, cache: Any, tokens: List[int], first_chunk: int, full: int, stream: Any) -> int:
        C, P = self.layout.chunk_tokens, self.layout.page_tokens
        self.stage.from_cache(cache, first_chunk * C, full)
        self.stage.own()
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
            cache = self.new_cache()
            self.stage.own()
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
            cache = self.new_cache()
            out = self.model.generate(ids, past_key_values=cache, **kwargs)
            info.loaded_tokens = 0
        if save:
            full = len(tokens) // L.chunk_tokens * L.chunk_tokens
            first = info.loaded_tokens // L.chunk_tokens
            if full > first * L.chunk_tokens:
                stream = torch.cuda.current_stream() if self.device.type == "cuda" else None
                info.saved_tokens = self._save(cache, tokens, first, full, stream)
        return out[0].tolist(), info
