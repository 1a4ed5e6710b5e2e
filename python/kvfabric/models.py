"""Model shapes: the KV layout of a model from its configuration (a Hugging Face config object or
its config.json as a dict), and the published configurations of the models the benchmarks use.

Only shapes are here: weights are the user's (docs/python.md says what a user with real
checkpoints does); the benchmarks build these models with random weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from .layout import Layout

# The fields of config.json that decide the KV cache, as published with each model.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
        "torch_dtype": "bfloat16",
    },
    "llama-3.1-70b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
    },
}

_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32", "torch.bfloat16": "bf16",
           "torch.float16": "f16", "torch.float32": "f32", "bf16": "bf16", "f16": "f16",
           "f32": "f32", "fp8_e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3"}


def config(name_or_path: str) -> Dict[str, Any]:
    """A configuration: one of CONFIGS by name, or a config.json file (or a folder holding one)."""
    if name_or_path in CONFIGS:
        return dict(CONFIGS[name_or_path])
    path = name_or_path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{name_or_path!r}: not a known model ({', '.join(CONFIGS)}) nor a "
                         "config.json")
    with open(path) as f:
        return json.load(f)


def _get(cfg: Union[Mapping[str, Any], Any], key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def layout_for(cfg: Union[Mapping[str, Any], Any], model_id: str = "", page_tokens: int = 16,
               chunk_tokens: int = 256, dtype: str = "", tp_rank: int = 0, tp_size: int = 1) -> Layout:
    """The KV layout of a model from its configuration: num_hidden_layers, num_key_value_heads
    (num_attention_heads where absent), head_dim (hidden_size / num_attention_heads where
    absent), and the cache dtype (the model's torch_dtype / dtype unless given)."""
    layers = int(_get(cfg, "num_hidden_layers"))
    heads = int(_get(cfg, "num_attention_heads"))
    kv_heads = int(_get(cfg, "num_key_value_heads", None) or heads)
    head_dim = _get(cfg, "head_dim", None) or int(_get(cfg, "hidden_size")) // heads
    if not dtype:
        raw = _get(cfg, "torch_dtype", None) or _get(cfg, "dtype", None) or "bfloat16"
        dtype = _DTYPES.get(str(raw))
        if dtype is None:
            raise ValueError(f"cache dtype {raw!r}: give dtype= explicitly")
    name = model_id or str(_get(cfg, "_name_or_path", "") or _get(cfg, "model_type", "model"))
    return Layout(name[:63], layers, kv_heads, int(head_dim), dtype, page_tokens=page_tokens,
                  chunk_tokens=chunk_tokens, tp_rank=tp_rank, tp_size=tp_size)


def serving_attention() -> None:
    """Process-wide: takes cuDNN's attention out of torch's scaled_dot_product_attention choices.
    cuDNN builds an execution plan for every new sequence length, about 30 ms on an H200, so a
    decoding engine (whose length grows by one each step) paid it on every step of every request
    whose lengths it had not seen: 34 ms per token instead of 3 ms for a 4-layer 8B-shaped model.
    Flash and memory-efficient attention need no plans."""
    import torch

    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def build(cfg: Mapping[str, Any], backend: str = "auto", device: str = "cpu", dtype: str = "bf16",
          seed: int = 0, checkpoint: Optional[str] = None) -> Tuple[Any, Callable[[], Any], str]:
    """A causal LM of a configuration, in eval mode on device with weights and KV in dtype (bf16,
    f16, f32): random weights from seed, or a safetensors checkpoint's (kvfabric.checkpoint).
    backend: "transformers" (AutoModelForCausalLM), "torch" (kvfabric.llama, Llama-family
    architectures) or "auto" (transformers where installed). Returns (model, a factory of empty
    caches of its kind, the backend used)."""
    import torch

    tdtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    if backend == "auto":
        try:
            import transformers  # noqa: F401
            backend = "transformers"
        except ImportError:
            backend = "torch"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:  # built in dtype: an 8B model never exists in float32 on the way
        torch.set_default_dtype(tdtype)
        return _build(cfg, backend, torch.device(device), tdtype, checkpoint)
    finally:
        torch.set_default_dtype(old)


def _build(cfg: Mapping[str, Any], backend: str, dev: Any, tdtype: Any,
           checkpoint: Optional[str]) -> Tuple[Any, Callable[[], Any], str]:
    from .checkpoint import load_checkpoint

    on_device = dev if hasattr(dev, "__enter__") else contextlib.nullcontext()  # torch >= 2.0
    if backend == "transformers":
        import transformers
        hf = transformers.AutoConfig.for_model(cfg.get("model_type", "llama"), **{
            k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
        with on_device:
            model = transformers.AutoModelForCausalLM.from_config(hf)
        from .attention import use_fast_attention
        use_fast_attention(model)  # a suffix over a cached prefix without a materialized mask
        factory: Callable[[], Any] = transformers.DynamicCache
    elif backend == "torch":
        from .llama import KVCache, LlamaModel
        with on_device:
            model = LlamaModel(cfg)
        factory = KVCache
    else:
        raise ValueError(f"backend {backend!r}: transformers, torch or auto")
    model = model.to(device=dev, dtype=tdtype)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    return model.eval(), factory, backend
