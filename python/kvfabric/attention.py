"""Causal attention for a prefill over a cached prefix, without a materialized mask.

A suffix of n queries over T >= n keys (the cached prefix then the suffix itself) needs causal
attention aligned at the bottom right: query i, at position T - n + i, sees keys 0 .. T - n + i.
transformers' SDPA path expresses that as an n x T boolean mask, which takes PyTorch's kernels
with arbitrary masks: on an H200, a 3,328-token suffix over a 32K cache took 87 ms per layer with
the mask and grouped-query heads, and 5.7 ms through FlashAttention's bottom-right causal mode
(torch.nn.attention.bias.causal_lower_right), the same kernel as a full causal prefill at 25 ms
for 32K x 32K. Where PyTorch is older than that, the mask is built as before.

Keys and values may be strided views ([batch, heads, T, head_dim] over token-major memory, as
kvfabric's staging pages hold them): FlashAttention reads them in place.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Optional

_CAPS: Optional[dict] = None


def _caps() -> dict:
    global _CAPS
    if _CAPS is None:
        import torch.nn.functional as F

        sdpa = getattr(F, "scaled_dot_product_attention", None)
        gqa = False
        if sdpa is not None:
            try:
                gqa = "enable_gqa" in inspect.signature(sdpa).parameters
            except (TypeError, ValueError):  # a builtin without a signature: ask by calling
                gqa = False
        try:
            from torch.nn.attention.bias import causal_lower_right
        except ImportError:
            causal_lower_right = None
        _CAPS = {"sdpa": sdpa, "gqa": gqa, "lower_right": causal_lower_right}
    return _CAPS


def causal_attention(q: Any, k: Any, v: Any, scale: Optional[float] = None) -> Any:
    """Attention of queries q [B, Hq, n, D] over keys and values [B, Hk, T, D] (T >= n, Hq a
    multiple of Hk), causal and aligned at the bottom right. Returns [B, Hq, n, D]."""
    import torch

    if k.dim() == 3:  # a layer's pages whole ([T, Hk, D]): a graph step's (kvfabric.graphstep)
        from .graphstep import decode_attention
        return decode_attention(q, k, v, scale)
    c = _caps()
    n, T = q.shape[-2], k.shape[-2]
    if n > T:
        raise ValueError(f"{n} queries over {T} keys")
    rep = q.shape[1] // k.shape[1]
    sdpa = c["sdpa"]
    kw = {} if scale is None else {"scale": scale}
    if sdpa is not None and rep > 1 and c["gqa"]:
        kw["enable_gqa"] = True
    elif rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if sdpa is not None:
        if n == T:
            return sdpa(q, k, v, is_causal=True, **kw)
        if n == 1:  # the last position sees every key
            return sdpa(q, k, v, **kw)
        if c["lower_right"] is not None:
            return sdpa(q, k, v, attn_mask=c["lower_right"](n, T), **kw)
    mask = torch.arange(T, device=q.device)[None, :] <= \
        torch.arange(T - n, T, device=q.device)[:, None]
    if sdpa is not None:
        return sdpa(q, k, v, attn_mask=mask, **kw)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    att = (q @ k.transpose(-1, -2)) * s
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return att @ v


class _MaskCheck:
    """Whether a mask transformers built is the plain causal one (batch of one, no padding, no
    window): checked once per mask (the same tensor reaches every layer of a forward pass). The
    last verdict is one tuple (a reference to its mask, the verdict), replaced in one assignment,
    so that threads running models side by side never pair one mask with another's verdict."""

    def __init__(self) -> None:
        self._last: Any = (None, False)

    def plain_causal(self, mask: Any, n: int, T: int) -> bool:
        import torch

        ref, ok = self._last
        if ref is not None and ref() is mask:
            return ok
        ok = False
        if mask.dim() == 4 and tuple(mask.shape) == (1, 1, n, T):
            m = mask[0, 0]
            if m.dtype != torch.bool:  # additive: 0 where attended
                m = m == 0
            want = torch.arange(T, device=m.device)[None, :] <= \
                torch.arange(T - n, T, device=m.device)[:, None]
            ok = bool(torch.equal(m, want))
        try:
            self._last = (weakref.ref(mask), ok)
        except TypeError:
            self._last = (None, False)
        return ok


_CHECK = _MaskCheck()
_STATS = {"bottom_right": 0, "delegated": 0}


def transformers_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                           dropout: float = 0.0, scaling: Optional[float] = None, **kwargs: Any):
    """transformers' attention function (AttentionInterface) "kvf_sdpa": transformers' own SDPA
    attention, except that a suffix over a cached prefix with the plain causal mask runs without
    the mask (causal_attention). Every other case (padding, windows, bidirectional, dropout) is
    transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.dim() == 3:  # a graph step's pages (kvfabric.graphstep): one query, no mask
        out = causal_attention(query, key, value, scaling)
        return out.transpose(1, 2).contiguous(), None
    n, T = query.shape[-2], key.shape[-2]
    if (attention_mask is not None and 1 < n < T and query.shape[0] == 1 and not dropout and
            getattr(module, "is_causal", True) and kwargs.get("is_causal", True) is not False and
            _CHECK.plain_causal(attention_mask, n, T)):
        _STATS["bottom_right"] += 1
        out = causal_attention(query, key, value, scaling)
        return out.transpose(1, 2).contiguous(), None
    _STATS["delegated"] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def use_fast_attention(model: Any) -> bool:
    """Makes a transformers model that runs PyTorch's SDPA run transformers_attention instead
    (registered as "kvf_sdpa"). Models set to another implementation (FlashAttention 2 or 3
    handle a suffix over a prefix themselves, eager) are left alone. Returns whether it changed."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask
    except ImportError:
        return False
    cfg = getattr(model, "config", None)
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register("kvf_sdpa", transformers_attention)
    AttentionMaskInterface.register("kvf_sdpa", sdpa_mask)
    model.set_attn_implementation("kvf_sdpa")
    return True


def stats() -> dict:
    """How many attention calls took the bottom-right path and how many were transformers'."""
    return dict(_STATS)
