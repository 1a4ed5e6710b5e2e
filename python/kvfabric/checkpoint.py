"""Checkpoints in the safetensors format (a little-endian u64 header length, a JSON header naming
each tensor's dtype, shape and byte range, then the raw tensors), as Hugging Face publishes model
weights: read, written (tests and tools make small ones) and loaded into a model by parameter name,
from one file or from a folder with model.safetensors or a sharded model.safetensors.index.json.

The header is read with the standard library's json; the data with torch.frombuffer, one copy
from the file to the tensor's device. Where the `safetensors` package is installed, tests check
this reader against it.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_MAX_HEADER = 100 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model: says which file and tensor."""


def _torch_dtype(name: str):
    import torch
    t = _DTYPES.get(name)
    if t is None or not hasattr(torch, t):
        raise CheckpointError(f"dtype {name} is not supported")
    return getattr(torch, t)


def _header(f, path: str) -> Tuple[Dict[str, Any], int]:
    raw = f.read(8)
    if len(raw) != 8:
        raise CheckpointError(f"{path}: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path}: header of {n} bytes does not fit the file ({size} bytes)")
    try:
        head = json.loads(f.read(n))
    except ValueError as e:
        raise CheckpointError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(head, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    return head, 8 + n


def read_safetensors(path: str, device: Any = "cpu",
                     names: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """The tensors of a safetensors file (those in `names` only, when given), on `device`."""
    import torch
    wanted = set(names) if names is not None else None
    out: Dict[str, Any] = {}
    with open(path, "rb") as f:
        head, base = _header(f, path)
        size = os.fstat(f.fileno()).st_size
        for name, meta in head.items():
            if name == "__metadata__" or (wanted is not None and name not in wanted):
                continue
            try:
                dtype = _torch_dtype(meta["dtype"])
                shape = [int(s) for s in meta["shape"]]
                begin, end = (int(x) for x in meta["data_offsets"])
                if any(s < 0 for s in shape):
                    raise ValueError("a negative dimension")
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: tensor {name}: bad header entry ({e})") from None
            count = 1
            for s in shape:
                count *= s
            elem = torch.empty((), dtype=dtype).element_size()
            if begin < 0 or end < begin or base + end > size or end - begin != count * elem:
                raise CheckpointError(f"{path}: tensor {name}: byte range {begin}..{end} does "
                                      f"not hold {shape} of {meta['dtype']}")
            f.seek(base + begin)
            buf = bytearray(end - begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{path}: tensor {name}: file ends early")
            t = torch.frombuffer(buf, dtype=dtype) if count else torch.empty(0, dtype=dtype)
            out[name] = t.reshape(shape).to(device)
    return out


def write_safetensors(path: str, tensors: Mapping[str, Any],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes tensors (CPU or not; contiguous copies are taken) as a safetensors file."""
    import torch
    rev = {v: k for k, v in _DTYPES.items()}
    head: Dict[str, Any] = {}
    blobs: List[bytes] = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        kind = rev.get(str(t.dtype).replace("torch.", ""))
        if kind is None:
            raise CheckpointError(f"tensor {name}: dtype {t.dtype} cannot be written")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        head[name] = {"dtype": kind, "shape": list(t.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    if metadata:
        head["__metadata__"] = dict(metadata)
    h = json.dumps(head, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def checkpoint_files(path: str) -> List[str]:
    """The safetensors files of a checkpoint: a file, or a folder with model.safetensors or
    model.safetensors.index.json (its shards, in order)."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index}: no weight_map")
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise CheckpointError(f"{path}: no safetensors file (model.safetensors or an index)")


def load_checkpoint(model: Any, path: str, strict: bool = True) -> Dict[str, List[str]]:
    """Copies a checkpoint's tensors into model's parameters and buffers of the same names (cast
    to each parameter's dtype, on its device). strict: every parameter must be in the checkpoint
    (a tied lm_head.weight may be absent) and every tensor must be a parameter. Returns the
    "missing" and "unexpected" names."""
    import torch
    try:  # tied weights under each of their names (torch >= 2.0)
        params = dict(model.named_parameters(remove_duplicate=False))
    except TypeError:
        params = dict(model.named_parameters())
    params.update({k: v for k, v in model.named_buffers() if k in model.state_dict()})
    seen, unexpected = set(), []
    with torch.no_grad():
        for f in checkpoint_files(path):
            for name, t in read_safetensors(f).items():
                p = params.get(name)
                if p is None:
                    unexpected.append(name)
                    continue
                if tuple(p.shape) != tuple(t.shape):
                    raise CheckpointError(f"{f}: {name} has shape {tuple(t.shape)}, the model "
                                          f"{tuple(p.shape)}")
                p.copy_(t.to(p.device, p.dtype))
                seen.add(name)
    tied = {n for n, p in params.items()
            if n not in seen and any(p is q for m, q in params.items() if m in seen)}
    missing = sorted(n for n in params if n not in seen and n not in tied)
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return {"missing": missing, "unexpected": sorted(unexpected)}
