"""A Llama-architecture decoder in plain torch (RMSNorm, rotary positions, grouped-query
attention, SwiGLU), with the parameter names of Hugging Face's LlamaForCausalLM and Qwen2ForCausalLM,
so that the same checkpoints load into it (kvfabric.checkpoint), and the call shape transformers'
models have: model(input_ids=..., past_key_values=cache).logits, model.model.layers.

It is what `python -m kvfabric.serve --backend torch` runs where transformers is not installed
(Debian ships torch, not transformers): the serving path, the loader and the cache hand-over are
then tested with a real model on any host. With transformers installed, the transformers backend
runs the transformers model itself; tests compare the two on the same weights.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

import torch
from torch import nn

from .attention import causal_attention


class _Layer:
    __slots__ = ("keys", "values")

    def __init__(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None


class KVCache:
    """A per-layer cache of keys and values ([batch, kv_heads, seq, head_dim]) with the methods of
    transformers' DynamicCache that kvfabric uses: update, get_seq_length, crop, layers."""

    def __init__(self) -> None:
        self.layers: List[_Layer] = []

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer: int, *_: Any, **__: Any):
        while len(self.layers) <= layer:
            self.layers.append(_Layer())
        s = self.layers[layer]
        if s.keys is None:
            s.keys, s.values = keys, values
        else:
            s.keys = torch.cat([s.keys, keys], dim=-2)
            s.values = torch.cat([s.values, values], dim=-2)
        return s.keys, s.values

    def get_seq_length(self, layer: int = 0) -> int:
        if layer >= len(self.layers) or self.layers[layer].keys is None:
            return 0
        return int(self.layers[layer].keys.shape[-2])

    def crop(self, n: int) -> None:
        """Keeps the first n positions (n < 0: removes the last -n), as DynamicCache.crop."""
        if n < 0:
            n = max(0, self.get_seq_length() + n)
        for s in self.layers:
            if s.keys is not None:
                s.keys, s.values = s.keys[..., :n, :], s.values[..., :n, :]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dt)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class _Attention(nn.Module):
    def __init__(self, cfg: Mapping[str, Any], index: int) -> None:
        super().__init__()
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        self.heads = heads
        self.kv_heads = int(cfg.get("num_key_value_heads") or heads)
        self.head_dim = int(cfg.get("head_dim") or hidden // heads)
        bias = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.index = index

    def forward(self, x, cos, sin, cache: KVCache, start: int) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, self.index)
        # query i (position start + i) sees keys 0 .. start + i: causal, bottom-right aligned
        out = causal_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        h, i = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: Mapping[str, Any], index: int) -> None:
        super().__init__()
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.self_attn = _Attention(cfg, index)
        self.mlp = _MLP(cfg)
        self.input_layernorm = _RMSNorm(int(cfg["hidden_size"]), eps)
        self.post_attention_layernorm = _RMSNorm(int(cfg["hidden_size"]), eps)

    def forward(self, x, cos=None, sin=None, cache=None, start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Model(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(int(cfg["vocab_size"]), int(cfg["hidden_size"]))
        self.layers = nn.ModuleList(_DecoderLayer(cfg, i)
                                    for i in range(int(cfg["num_hidden_layers"])))
        self.norm = _RMSNorm(int(cfg["hidden_size"]), float(cfg.get("rms_norm_eps", 1e-6)))


class _Output:
    def __init__(self, logits: torch.Tensor, cache: KVCache) -> None:
        self.logits, self.past_key_values = logits, cache


class LlamaModel(nn.Module):
    """A causal LM of the Llama family from a configuration (config.json's fields: hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    vocab_size, rope_theta, rms_norm_eps, tie_word_embeddings, attention_bias). Rope scaling
    (Llama 3.1's long-context rule) is not applied: positions beyond the original context differ
    from the real model's; kvfabric's caching is exact either way."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(cfg)
        self.model = _Model(cfg)
        self.lm_head = nn.Linear(int(cfg["hidden_size"]), int(cfg["vocab_size"]), bias=False)
        if cfg.get("tie_word_embeddings"):
            self.lm_head.weight = self.model.embed_tokens.weight
        heads = int(cfg["num_attention_heads"])
        d = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        rp = cfg.get("rope_parameters") or {}
        theta = float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, input_ids: torch.Tensor, past_key_values: Optional[KVCache] = None,
                logits_to_keep: int = 0, **_: Any) -> _Output:
        cache = past_key_values if past_key_values is not None else KVCache()
        start = cache.get_seq_length()
        n = input_ids.shape[-1]
        pos = torch.arange(start, start + n, device=input_ids.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq.to(input_ids.device).float()[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        x = self.model.embed_tokens(input_ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos=cos, sin=sin, cache=cache, start=start)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return _Output(self.lm_head(self.model.norm(x)), cache)
