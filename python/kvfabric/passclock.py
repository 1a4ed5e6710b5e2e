"""Where a forward pass's time went, beside its wall time: the CPU time of the thread that ran it,
the CPU time of its whole process (every thread: the connector's, the server's), and the span of
the GPU work it queued (two CUDA events on its stream: from where its first kernel was queued to
where its last one was).

Read over many passes (the e2e's records, bench/e2e_overlap.py), it tells a pass the host held
up (thread CPU near the wall time: launching kernels, Python) from one the GPU held up (GPU span
near the wall time, thread CPU well below it) and from one that waited for neither (the thread
off the CPU: another thread holding the interpreter, a synchronization, the host's cores busy).
The GPU span includes the time the GPU gave other processes' contexts (engines sharing it
time-slice) and the gaps where it waited for the host to queue more.

Costs two CUDA events and six clock reads a pass. Real measurements; nothing is modelled."""

from __future__ import annotations

import time
from typing import Any, Dict, Optional


class PassClock:
    """Started where the pass starts (after any wait for the GPU's turn); stop() where its last
    kernel is queued, before the synchronization; read() after it."""

    def __init__(self, torch: Any = None, cuda: bool = False) -> None:
        self._ev0: Optional[Any] = None
        self._ev1: Optional[Any] = None
        self._cuda = torch.cuda if cuda and torch is not None else None
        self._c0 = time.thread_time()
        self._p0 = time.process_time()
        self._w0 = time.perf_counter()
        if self._cuda is not None:
            self._ev0 = self._cuda.Event(enable_timing=True)
            self._ev0.record()

    def stop(self) -> None:
        if self._cuda is not None and self._ev1 is None:
            self._ev1 = self._cuda.Event(enable_timing=True)
            self._ev1.record()

    def read(self) -> Dict[str, Any]:
        """The pass's figures, in seconds (gpu_s None on a CPU, or where the events could not
        be read); to be called once the stream's work is done."""
        self.stop()
        w = time.perf_counter() - self._w0
        gpu = None
        if self._ev1 is not None:
            try:
                self._ev1.synchronize()
                gpu = self._ev0.elapsed_time(self._ev1) / 1e3
            except RuntimeError:  # an event never recorded on this device: no span
                gpu = None
        return {"wall_s": w, "thread_cpu_s": time.thread_time() - self._c0,
                "process_cpu_s": time.process_time() - self._p0, "gpu_s": gpu, "label": "real"}
