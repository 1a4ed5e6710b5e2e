"""kvfabric: the Python binding of libkvf, kvfabric's KV-cache connector (docs/python.md).

Pure Python over libkvf.so with ctypes: no compiled extension, no dependency beyond the standard
library; torch tensors (CPU or CUDA) are accepted where torch is installed.
"""

from .client import Client, Object
from .connector import (CUDA, HOST, UNIFIED, Connector, KVPages, Prefetch, Transfer,
                        pages_from_tensors)
from .cuda import cuda_probe
from .errors import KvfError, Miss, error_name, error_text
from .events import Events, hash_blocks, shard_of
from .feasibility import Caps, classify, optimality_gap
from .layout import LATENT, SEPARATE, KeySpace, Layout

__version__ = "0.1.0"

__all__ = [
    "Connector", "Prefetch", "Transfer", "KVPages", "pages_from_tensors", "HOST", "UNIFIED", "CUDA",
    "Layout", "KeySpace", "SEPARATE", "LATENT", "KvfError", "Miss", "error_name", "error_text",
    "cuda_probe", "Client", "Object", "Events", "hash_blocks", "shard_of", "Caps", "classify",
    "optimality_gap", "__version__",
]
