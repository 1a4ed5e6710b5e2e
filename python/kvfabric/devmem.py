"""Device memory of engines that share a GPU (kvfabric.engine): each process's allocator
(PyTorch's caching allocator) keeps the blocks of its largest pass, so one engine can fail to
allocate what the others hold idle. Running out is recognised here, and free blocks are given
back to the device (docs/python.md, "Out of device memory")."""

from typing import Any, Optional


def is_out_of_memory(torch: Any, e: BaseException) -> bool:
    """Whether e is the device running out of memory (torch.cuda.OutOfMemoryError, or the
    RuntimeError older torch raised for it)."""
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return (oom is not None and isinstance(e, oom)) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def device_free(torch: Any, device: Any) -> Optional[int]:
    """The device's free memory in bytes (every process's use counted), None off CUDA."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def give_back(torch: Any, device: Any) -> int:
    """Gives the allocator's free blocks back to the device; the bytes it gave (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    before = torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    return max(0, before - torch.cuda.memory_reserved(device))
