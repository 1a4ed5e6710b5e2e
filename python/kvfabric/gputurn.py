"""Turns on one GPU for the forward passes of the engine processes that share it
(docs/python.md, "Engines sharing one GPU").

Several engine processes on one GPU (a prefill and a decode engine of a small disaggregated
deployment, or the e2e's four engines on one card) run their passes at once when requests come
together: the GPU time-slices between the processes' contexts and every pass of a burst takes
two to three times as long as it would alone (measured in the 2026-12-05 e2e records: the short
prompts' passes overlapped two or three other engines' passes). A GpuTurn makes the passes take
turns: one pass at a time on the GPU, the others wait for it, and the next to go is the one with
the earliest key, its arrival plus its predicted pass time (earliest deadline first: a short
pass goes before a long one that came a little earlier, and none waits for ever, since a pass
that comes later than another's key cannot go before it). Decoding steps do not take turns:
before each step a decoding engine yields to the passes (waits while one holds or waits for the
turn), at most a bound per step (--gpu-turn-decode-wait, 50 ms by default), so that a pass runs
nearly alone (a decode step in each bound's time beside it) and no inter-token gap grows by more
than the bound: time to first token first, inter-token latency bounded.

The turn is a page of shared memory (a file, normally in /dev/shm, mode 0600: only this user's
processes share it) holding the holder and up to SLOTS waiters, changed under an flock. A holder
that dies frees its turn (its pid is gone); a holder that hangs is waited for at most max_wait_s,
after which the waiter runs its pass anyway (and says so). Without the file (another user's, a
read-only /dev/shm) the passes run without turns, as before; nothing fails because of it.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
from typing import Optional, Tuple

MAGIC = 0x314E5255544656  # "VFTURN1" little-endian, in the page's first 8 bytes
SLOTS = 64
_HDR = struct.Struct("<QQQQ")  # magic, holder pid, holder ticket, next ticket
_SLOT = struct.Struct("<QQd")  # pid (0: free), ticket, key (CLOCK_MONOTONIC seconds)
SIZE = 4096


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here: the signal's answer
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def default_path(device_uuid: str) -> str:
    """The turn file of a GPU for this user: /dev/shm/kvfabric-turn-UID-UUID."""
    safe = "".join(c for c in device_uuid if c.isalnum() or c in "-_")[:80] or "gpu"
    return os.path.join("/dev/shm", f"kvfabric-turn-{os.getuid()}-{safe}")


class GpuTurn:
    """One GPU's turns (see the module's docstring). acquire() before a pass, release() after;
    or `with turn.hold(predicted_s) as waited:`. Thread-safe in the sense that each acquire is
    its own ticket; an Engine runs one pass at a time anyway."""

    def __init__(self, path: str, max_wait_s: float = 10.0) -> None:
        if not max_wait_s > 0:
            raise ValueError("max_wait_s must be positive")
        self.path, self.max_wait_s = path, max_wait_s
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise PermissionError(errno.EPERM, "another user's turn file", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if st.st_size < SIZE:
                    os.ftruncate(fd, SIZE)
                mm = mmap.mmap(fd, SIZE)
                magic = _HDR.unpack_from(mm, 0)[0]
                if magic != MAGIC:  # new (zeros), or not ours: a fresh page
                    mm[:SIZE] = bytes(SIZE)
                    _HDR.pack_into(mm, 0, MAGIC, 0, 0, 1)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._mm = fd, mm
        self.passes = self.waited_passes = self.timeouts = self.decode_yields = 0
        self.wait_s = self.decode_yield_s = 0.0

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            os.close(self._fd)
            self._mm = None

    def __enter__(self) -> "GpuTurn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the page, under the flock ------------------------------------------------------------
    def _lock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slot(self, i: int) -> Tuple[int, int, float]:
        return _SLOT.unpack_from(self._mm, _HDR.size + i * _SLOT.size)

    def _set_slot(self, i: int, pid: int, ticket: int, key: float) -> None:
        _SLOT.pack_into(self._mm, _HDR.size + i * _SLOT.size, pid, ticket, key)

    def _enqueue(self, key: float) -> Tuple[int, int]:
        """Adds a waiter: its slot and ticket (slot -1: every slot taken by live waiters)."""
        magic, hpid, hticket, nxt = _HDR.unpack_from(self._mm, 0)
        for i in range(SLOTS):
            pid, _, _ = self._slot(i)
            if pid == 0 or not _alive(pid):
                self._set_slot(i, os.getpid(), nxt, key)
                _HDR.pack_into(self._mm, 0, magic, hpid, hticket, nxt + 1)
                return i, nxt
        return -1, 0

    def _try_take(self, slot: int, ticket: int) -> bool:
        magic, hpid, hticket, nxt = _HDR.unpack_from(self._mm, 0)
        if hpid and not _alive(hpid):  # its holder died holding it
            hpid = hticket = 0
        if hpid:
            return False
        me = self._slot(slot)
        best = None
        for i in range(SLOTS):
            pid, t, key = self._slot(i)
            if pid == 0:
                continue
            if not _alive(pid):
                self._set_slot(i, 0, 0, 0.0)
                continue
            if best is None or (key, t) < best:
                best = (key, t)
        if best != (me[2], me[1]):
            _HDR.pack_into(self._mm, 0, magic, hpid, hticket, nxt)
            return False
        self._set_slot(slot, 0, 0, 0.0)
        _HDR.pack_into(self._mm, 0, magic, os.getpid(), ticket, nxt)
        return True

    # -- the API --------------------------------------------------------------------------------
    def acquire(self, predicted_s: float = 0.0) -> Tuple[Optional[int], float]:
        """Waits for the turn (at most max_wait_s): returns (a ticket to release with, or None
        where the wait ran out or no slot was free: the pass runs without the turn; seconds
        waited)."""
        t0 = time.monotonic()
        key = t0 + max(0.0, float(predicted_s))
        self._lock()
        try:
            slot, ticket = self._enqueue(key)
            if slot >= 0 and self._try_take(slot, ticket):
                self.passes += 1
                return ticket, 0.0
        finally:
            self._unlock()
        if slot < 0:
            self.timeouts += 1
            return None, 0.0
        pause = 0.0001
        while True:
            time.sleep(pause)
            pause = min(pause * 1.5, 0.001)
            self._lock()
            try:
                if self._try_take(slot, ticket):
                    waited = time.monotonic() - t0
                    self.passes += 1
                    self.waited_passes += 1
                    self.wait_s += waited
                    return ticket, waited
                if time.monotonic() - t0 > self.max_wait_s:
                    pid, t, _ = self._slot(slot)
                    if pid == os.getpid() and t == ticket:
                        self._set_slot(slot, 0, 0, 0.0)
                    self.timeouts += 1
                    waited = time.monotonic() - t0
                    self.wait_s += waited
                    return None, waited
            finally:
                self._unlock()

    def release(self, ticket: Optional[int]) -> None:
        if ticket is None or self._mm is None:
            return
        self._lock()
        try:
            magic, hpid, hticket, nxt = _HDR.unpack_from(self._mm, 0)
            if hpid == os.getpid() and hticket == ticket:
                _HDR.pack_into(self._mm, 0, magic, 0, 0, nxt)
        finally:
            self._unlock()

    def holder(self) -> int:
        """The pid holding the turn now (0: nobody)."""
        self._lock()
        try:
            hpid = _HDR.unpack_from(self._mm, 0)[1]
            return hpid if hpid and _alive(hpid) else 0
        finally:
            self._unlock()

    def passes_pending(self) -> bool:
        """Whether a pass holds the turn or waits for it now (another process's, or this one's)."""
        self._lock()
        try:
            hpid = _HDR.unpack_from(self._mm, 0)[1]
            if hpid and _alive(hpid):
                return True
            return any(_alive(self._slot(i)[0]) for i in range(SLOTS) if self._slot(i)[0])
        finally:
            self._unlock()

    def yield_to_passes(self, max_s: float) -> float:
        """A decoding step's courtesy: waits while a pass holds or waits for the turn, at most
        max_s; returns the seconds waited (counted in decode_yields and decode_yield_s)."""
        if max_s <= 0 or not self.passes_pending():
            return 0.0
        t0 = time.monotonic()
        pause = 0.0002
        while time.monotonic() - t0 < max_s:
            time.sleep(min(pause, max(0.0, max_s - (time.monotonic() - t0))))
            pause = min(pause * 1.5, 0.001)
            if not self.passes_pending():
                break
        waited = time.monotonic() - t0
        self.decode_yields += 1
        self.decode_yield_s += waited
        return waited

    def waiting(self) -> int:
        """How many live passes wait for the turn now."""
        self._lock()
        try:
            return sum(1 for i in range(SLOTS) if _alive(self._slot(i)[0]))
        finally:
            self._unlock()

    def stats(self) -> dict:
        return {"path": self.path, "passes": self.passes, "waited_passes": self.waited_passes,
                "wait_s": round(self.wait_s, 6), "timeouts": self.timeouts,
                "decode_yields": self.decode_yields,
                "decode_yield_s": round(self.decode_yield_s, 6),
                "max_wait_s": self.max_wait_s, "label": "real"}


def open_for(device, setting: str, max_wait_s: float = 10.0, log=None) -> Optional[GpuTurn]:
    """The turn of the engine's device for --gpu-turn's setting: "off" -> None; "auto" -> the
    GPU's file in /dev/shm (None on a CPU device); a path -> that file. A file that cannot be
    opened or is another user's: None, said through log (passes then run without turns)."""
    if setting == "off":
        return None
    if setting == "auto":
        if getattr(device, "type", str(device)) != "cuda":
            return None
        import torch
        idx = device.index if getattr(device, "index", None) is not None else \
            torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        path = default_path(str(getattr(props, "uuid", "") or "") or f"index{idx}")
    else:
        path = setting
    try:
        return GpuTurn(path, max_wait_s)
    except OSError as e:
        if log is not None:
            log("warn", f"--gpu-turn {path}: {e}: passes run without turns")
        return None
