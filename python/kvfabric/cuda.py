"""What libkvf finds of CUDA on this host (include/kvf/cuda.h, docs/cuda.md)."""

from __future__ import annotations

import ctypes
from typing import Dict, Union

from . import _lib


def cuda_probe() -> Dict[str, Union[int, str, bool]]:
    """The CUDA runtime as libkvf loads it: usable, versions (1000 * major + 10 * minor),
    devices, compute capability, batched copies, NVRTC, and why it is not usable."""
    ci = _lib.CudaInfo()
    _lib.lib().kvf_cuda_probe(ctypes.byref(ci))
    return {
        "usable": bool(ci.usable),
        "runtime_version": ci.runtime_version,
        "driver_version": ci.driver_version,
        "devices": ci.devices,
        "cc": f"{ci.cc_major}.{ci.cc_minor}",
        "sm_count": ci.sm_count,
        "batch_copy": bool(ci.batch_copy),
        "nvrtc_version": ci.nvrtc_version,
        "library": ci.library.decode(),
        "why": ci.why.decode(),
    }
