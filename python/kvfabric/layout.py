"""KV layouts and chunk keys (docs/layouts.md, docs/keys.md)."""

from __future__ import annotations

import ctypes
from typing import List, Sequence, Union

from . import _lib
from .errors import KvfError, check

SEPARATE, LATENT = 0, 1


class Layout:
    """A model's KV layout: layers, KV heads, head size, element type, page and chunk tokens,
    tensor-parallel rank. Validated on construction (KvfError KVF_EINVAL says what is wrong)."""

    def __init__(self, model_id: str, layers: int, kv_heads: int, head_dim: int,
                 dtype: str = "bf16", page_tokens: int = 16, chunk_tokens: int = 256,
                 kind: int = SEPARATE, tp_rank: int = 0, tp_size: int = 1) -> None:
        c = _lib.Layout()
        mid = model_id.encode()
        if not mid or len(mid) > _lib.MODEL_ID_MAX:
            raise KvfError(-1, "layout", f"model_id must be 1 to {_lib.MODEL_ID_MAX} bytes")
        c.model_id = mid
        dt = ctypes.c_int()
        check(_lib.lib().kvf_dtype_parse(dtype.encode(), ctypes.byref(dt)), "layout",
              f"unknown dtype {dtype!r}")
        c.layers, c.kv_heads, c.head_dim, c.dtype, c.kind = layers, kv_heads, head_dim, dt.value, kind
        c.page_tokens, c.chunk_tokens, c.tp_rank, c.tp_size = page_tokens, chunk_tokens, tp_rank, tp_size
        self._c = c
        self._validate()

    def _validate(self) -> None:
        err = ctypes.create_string_buffer(256)
        check(_lib.lib().kvf_layout_validate(ctypes.byref(self._c), err, len(err)), "layout",
              err.value.decode())

    @classmethod
    def preset(cls, name: str) -> "Layout":
        """A built-in layout by name (Layout.presets() lists them)."""
        self = cls.__new__(cls)
        self._c = _lib.Layout()
        check(_lib.lib().kvf_layout_preset(name.encode(), ctypes.byref(self._c)), "layout preset",
              name)
        return self

    @staticmethod
    def presets() -> List[str]:
        out, i = [], 0
        while True:
            n = _lib.lib().kvf_layout_preset_name(i)
            if not n:
                return out
            out.append(n.decode())
            i += 1

    def __getattr__(self, name: str):
        if name in ("layers", "kv_heads", "head_dim", "kind", "page_tokens", "chunk_tokens",
                    "tp_rank", "tp_size"):
            return getattr(self._c, name)
        raise AttributeError(name)

    @property
    def model_id(self) -> str:
        return self._c.model_id.decode()

    @property
    def dtype(self) -> str:
        return _lib.lib().kvf_dtype_name(self._c.dtype).decode()

    @property
    def dtype_size(self) -> int:
        return int(_lib.lib().kvf_layout_dtype_size(self._c.dtype))

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token, all layers (this rank)."""
        return int(_lib.lib().kvf_layout_bytes_per_token(ctypes.byref(self._c)))

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of one plane (K or V) of one layer."""
        planes = 1 if self._c.kind == LATENT else 2
        per = _lib.lib().kvf_layout_bytes_per_token_layer(ctypes.byref(self._c)) // planes
        return int(per * self._c.page_tokens)

    @property
    def chunk_bytes(self) -> int:
        return int(_lib.lib().kvf_layout_chunk_bytes(ctypes.byref(self._c)))

    @property
    def fingerprint(self) -> int:
        fp = ctypes.c_uint64()
        check(_lib.lib().kvf_layout_fingerprint(ctypes.byref(self._c), ctypes.byref(fp)),
              "layout fingerprint")
        return fp.value

    def to_json(self) -> str:
        """The layout as the JSON object kvf_layout_from_json (and every kvfabric tool) reads."""
        buf = ctypes.create_string_buffer(1024)
        n = _lib.lib().kvf_layout_to_json(ctypes.byref(self._c), buf, len(buf))
        check(n if n < 0 else 0, "layout to_json")
        return buf.value.decode()

    def __repr__(self) -> str:
        c = self._c
        return (f"Layout({self.model_id!r}, layers={c.layers}, kv_heads={c.kv_heads}, "
                f"head_dim={c.head_dim}, dtype={self.dtype!r}, page_tokens={c.page_tokens}, "
                f"chunk_tokens={c.chunk_tokens}, tp={c.tp_rank}/{c.tp_size})")


class KeySpace:
    """The namespace chunk keys are computed in: one layout and one tenant salt. The keys are the
    ones the C library, the stores and the scheduler compute (docs/keys.md)."""

    def __init__(self, layout: Layout, salt: Union[bytes, str, None] = None) -> None:
        s = salt.encode() if isinstance(salt, str) else (salt or b"")
        self._c = _lib.KeySpace()
        buf = ctypes.create_string_buffer(s, len(s)) if s else None
        check(_lib.lib().kvf_keyspace_init(ctypes.byref(self._c), ctypes.byref(layout._c), buf,
                                           len(s)), "keyspace")
        self.layout = layout

    @property
    def seed(self) -> int:
        return self._c.seed

    def keys(self, tokens: Sequence[int]) -> List[str]:
        """The keys of the full chunks of tokens, as 32-digit hex strings, in order."""
        n = len(tokens)
        nc = n // self._c.chunk_tokens
        if nc == 0:
            return []
        arr = _lib.u32_array(tokens)
        keys = (_lib.Key * nc)()
        nk, left = ctypes.c_size_t(), ctypes.c_size_t()
        check(_lib.lib().kvf_keys_compute(ctypes.byref(self._c), arr, n, keys, nc,
                                          ctypes.byref(nk), ctypes.byref(left)), "keys")
        hexbuf = ctypes.create_string_buffer(33)
        return [_lib.lib().kvf_key_to_hex(ctypes.byref(keys[i]), hexbuf).decode()
                for i in range(nk.value)]
