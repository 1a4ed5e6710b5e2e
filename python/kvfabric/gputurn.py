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
that comes later than another's key cannot go before it). One exception: a pass predicted to
take at most 1/share of what the holder's pass has left (share = 2 by default) runs beside it,
one such pass at a time: sharing the GPU, the short pass takes about twice its time instead of
waiting for the long one, and the long one loses about the short one's time (a net gain where
the holder has more than twice the short pass's time left). Better still, a pass that yields
(an Engine's pass predicted to take YIELD_MIN_S or more) asks at each layer boundary whether a
waiter has an earlier key (preempted) and, where one has, finishes its queued GPU work, gives the
turn to it and waits for it again under its own key (yield_turn): the short pass then runs alone,
after at most a layer or two of the long one; no pass goes beside a pass that yields. And two
light passes (LIGHT: predicted to take mostly their fixed cost, the host launching kernels while
the GPU waits for them, as a few hundred tokens of an 8B model do) run beside each other: each
fills the other's gaps (measured in the 2026-12-06 e2e records: two 250-token prompts that came
together took 30 + 60 ms one after the other in turns, 35-42 ms each beside each other; about
25 ms alone). Decoding steps do not take turns:
before each step a decoding engine yields to the passes (waits while one holds or waits for the
turn), at most a bound per step (--gpu-turn-decode-wait, 50 ms by default), so that a pass runs
nearly alone (a decode step in each bound's time beside it) and no inter-token gap grows by more
than the bound: time to first token first, inter-token latency bounded.

The turn is a page of shared memory (a file, normally in /dev/shm, mode 0600: only this user's
processes share it) holding the holder (and the pass beside it) and up to SLOTS waiters, changed
under an flock. A holder
that dies frees its turn (its pid is gone); one that has held it longer than max_wait_s loses it;
a waiter that has not looked for STALE_S (a stopped process) is passed over; a pass that has
waited max_wait_s runs without the turn (and says so). Without the file (another user's, a
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

MAGIC = 0x344E5255544656  # "VFTURN4" little-endian, in the page's first 8 bytes
SLOTS = 64
_TOP = struct.Struct("<QQ")  # magic, next ticket
# the holder (MAIN) and the short pass beside it (BESIDE): pid (0: none), ticket, since when,
# predicted end (CLOCK_MONOTONIC seconds), key, flags (YIELDS)
_HOLD = struct.Struct("<QQdddQ")
YIELDS = 1  # the holder's pass yields the turn at its layer boundaries (yield_turn)
# the pass is light: its predicted time mostly its fixed cost (the host launching kernels, the GPU
# mostly idle), so that another light pass beside it costs it little (Engine: Rates.light)
LIGHT = 2
MAIN, BESIDE = 0, 1
_HDR_SIZE = _TOP.size + 2 * _HOLD.size
# pid (0: free), ticket, key, last seen (CLOCK_MONOTONIC seconds: one clock for the host)
_SLOT = struct.Struct("<QQdd")
_ALL = struct.Struct("<" + "QQdd" * 64)  # every slot at once (one call, not 64)
SIZE = 4096
STALE_S = 0.25  # a waiter that has not looked for this long is passed over (stopped, stuck)
REUSE_S = 60.0  # ... and its slot given to another waiter after this long
# The page's lock is held for microseconds; one not had within LOCK_S is held by a process that
# stopped inside (SIGSTOP, a frozen cgroup): the turns are then off for OFF_S, passes running
# without them, rather than every pass waiting.
LOCK_S = 0.5
OFF_S = 30.0


class TurnPageBusy(OSError):
    """The turn page's lock could not be had within LOCK_S."""


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
    """One GPU's turns (see the module's docstring): acquire() before a pass, release() after.
    Each acquire is a ticket of its own; an Engine runs one pass at a time."""

    def __init__(self, path: str, max_wait_s: float = 10.0, share: float = 2.0,
                 light: bool = True) -> None:
        if not max_wait_s > 0:
            raise ValueError("max_wait_s must be positive")
        if not share >= 0:
            raise ValueError("share must be 0 (no pass beside the holder's) or more")
        self.path, self.max_wait_s, self.share = path, max_wait_s, share
        self.light = light  # a light pass goes beside a light holder's (LIGHT)
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
                if _TOP.unpack_from(mm, 0)[0] != MAGIC:  # new (zeros), or not ours: afresh
                    mm[:SIZE] = bytes(SIZE)
                    _TOP.pack_into(mm, 0, MAGIC, 1)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._mm = fd, mm
        self.passes = self.waited_passes = self.timeouts = self.decode_yields = 0
        self.beside_passes = self.yields = 0
        self.yield_s = 0.0
        self.last_beside = False  # the last acquire's pass runs beside the holder's
        self.last_yielded = False  # the last yield_turn gave the turn up
        self.lock_timeouts = 0
        self.wait_s = self.decode_yield_s = 0.0
        self._off_until = 0.0

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
    def _lock(self, bound_s: float = LOCK_S, trip: bool = True) -> bool:
        """Takes the page's lock within bound_s; False where it could not (with trip, and the
        whole LOCK_S waited: the turns are off for OFF_S)."""
        now = time.monotonic()
        if now < self._off_until:
            return False
        end, pause = now + bound_s, 0.00005
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                now = time.monotonic()
                if now >= end:
                    if trip:
                        self._off_until = now + OFF_S
                        self.lock_timeouts += 1
                    return False
                time.sleep(min(pause, end - now))
                pause = min(pause * 2, 0.002)

    def _must_lock(self) -> None:
        if not self._lock():
            raise TurnPageBusy(f"{self.path}: its lock was not had within {LOCK_S} s")

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _slots(self):
        """The taken slots as (index, pid, ticket, key, seen), read at once."""
        v = _ALL.unpack_from(self._mm, _HDR_SIZE)
        return [(i, pid, v[4 * i + 1], v[4 * i + 2], v[4 * i + 3])
                for i, pid in enumerate(v[0::4]) if pid]

    def _slot(self, i: int) -> Tuple[int, int, float, float]:
        return _SLOT.unpack_from(self._mm, _HDR_SIZE + i * _SLOT.size)

    def _set_slot(self, i: int, pid: int = 0, ticket: int = 0, key: float = 0.0,
                  seen: float = 0.0) -> None:
        _SLOT.pack_into(self._mm, _HDR_SIZE + i * _SLOT.size, pid, ticket, key, seen)

    def _next(self) -> int:
        return _TOP.unpack_from(self._mm, 0)[1]

    def _set_next(self, nxt: int) -> None:
        _TOP.pack_into(self._mm, 0, MAGIC, nxt)

    def _held(self, which: int) -> Tuple[int, int, float, float, float, int]:
        """MAIN's or BESIDE's (pid, ticket, since, predicted end, key, flags)."""
        return _HOLD.unpack_from(self._mm, _TOP.size + which * _HOLD.size)

    def _set_held(self, which: int, pid: int = 0, ticket: int = 0, since: float = 0.0,
                  until: float = 0.0, key: float = 0.0, flags: int = 0) -> None:
        _HOLD.pack_into(self._mm, _TOP.size + which * _HOLD.size, pid, ticket, since, until,
                        key, flags)

    def _holders_now(self, now: float) -> Tuple[int, int]:
        """The pids holding MAIN and BESIDE (0: none), each freed first where its holder died or
        held it longer than max_wait_s (a pass that never gave it back: the others are not held
        up twice)."""
        out = []
        for which in (MAIN, BESIDE):
            hpid, _, since, _, _, _ = self._held(which)
            if hpid and (not _alive(hpid) or now - since > self.max_wait_s):
                self._set_held(which)
                hpid = 0
            out.append(hpid)
        return out[0], out[1]

    def _holder_now(self, now: float) -> int:
        """The holder's pid (the pass beside's where the holder's is free; 0: nobody)."""
        m, b = self._holders_now(now)
        return m or b

    def _enqueue(self, key: float, now: float) -> Tuple[int, int]:
        """Adds a waiter: its slot and ticket (slot -1: every slot taken by live waiters)."""
        nxt = self._next()
        v = _ALL.unpack_from(self._mm, _HDR_SIZE)
        for i, pid in enumerate(v[0::4]):
            if pid == 0 or now - v[4 * i + 3] > REUSE_S or not _alive(pid):
                self._set_slot(i, os.getpid(), nxt, key, now)
                self._set_next(nxt + 1)
                return i, nxt
        return -1, 0

    def _try_take(self, slot: int, ticket: int, now: float, predicted_s: float = 0.0,
                  flags: int = 0) -> Optional[bool]:
        """Takes the turn where it is free and this waiter's key is the earliest of the waiters
        that live and looked within STALE_S, or, for such a waiter, the place beside the
        holder's pass where that is free, and either both passes are light (LIGHT in flags and
        the holder's), or the holder's pass does not yield (it would yield to this waiter at its
        next layer instead) and has at least share times predicted_s left (predicted); else notes
        that this waiter looked. None: the slot is no longer this
        waiter's (it was stopped longer than REUSE_S)."""
        pid, t, mykey, _ = self._slot(slot)
        if pid != os.getpid() or t != ticket:
            return None
        self._set_slot(slot, pid, t, mykey, now)
        main, beside = self._holders_now(now)
        if main and (beside or not self._beside_holder(now, predicted_s, flags)):
            return False
        best, me = None, os.getpid()
        for i, pid, t, key, seen in self._slots():
            if pid != me and not _alive(pid):
                self._set_slot(i)
                continue
            if now - seen > STALE_S:
                continue
            if best is None or (key, t) < best:
                best = (key, t)
        if best != (mykey, ticket):
            return False
        self._set_slot(slot)
        self.last_beside = bool(main)
        if main:
            self.beside_passes += 1
        self._set_held(BESIDE if main else MAIN, os.getpid(), ticket, now,
                       now + max(0.0, predicted_s), mykey, flags)
        return True

    def _beside_holder(self, now: float, predicted_s: float, flags: int) -> bool:
        """Whether a pass of these flags and prediction may run beside the holder's: both light,
        or by the share rule where the holder does not yield (it would yield to this one at its
        next layer instead)."""
        _, _, _, until, _, hflags = self._held(MAIN)
        if self.light and flags & LIGHT and hflags & LIGHT:
            return True
        return not hflags & YIELDS and self.share > 0 and 0 < predicted_s and \
            self.share * predicted_s <= until - now

    def _leave(self, slot: int, ticket: int) -> None:
        pid, t, _, _ = self._slot(slot)
        if pid == os.getpid() and t == ticket:
            self._set_slot(slot)

    # -- the API --------------------------------------------------------------------------------
    def acquire(self, predicted_s: float = 0.0, yields: bool = False,
                light: bool = False) -> Tuple[Optional[int], float]:
        """Waits for the turn (at most max_wait_s): returns (a ticket to release with, or None
        where the pass runs without the turn: the wait ran out, no slot was free, or the page's
        lock was not had (lock_timeouts); seconds waited). yields: the pass will call
        preempted() at its layer boundaries and yield_turn() where it says so (no pass then goes
        beside it). light: the pass is light (LIGHT): beside a light holder's, it does not wait
        (with this turn's light rule on; off, its passes are never marked light, so that no other
        process's light pass goes beside them either)."""
        t0 = time.monotonic()
        self.last_beside = False
        predicted_s = max(0.0, float(predicted_s))
        ticket, waited = self._take(t0 + predicted_s, t0, predicted_s,
                                    (YIELDS if yields else 0) | (LIGHT if light and self.light
                                                                 else 0))
        self.wait_s += waited
        if ticket is not None:
            self.passes += 1
            self.waited_passes += waited > 0
        return ticket, waited

    def _take(self, key: float, t0: float, predicted_s: float, flags: int,
              held: Optional[int] = None) -> Tuple[Optional[int], float]:
        """Waits, as a waiter of that key, for the turn (acquire). held (yield_turn): the ticket
        of the turn this process holds, given up under the same lock as it is queued for again,
        under its key, flags and what it has left of its predicted time (so that no waiter of a
        later key takes it in between); where it no longer holds it, (None, 0); where it cannot
        be queued (the lock not had, no waiter's place), it goes on holding: (held, 0).
        last_yielded says whether it gave the turn up."""
        if not self._lock():
            if held is not None:
                return held, 0.0
            self.timeouts += 1
            return None, time.monotonic() - t0
        try:
            if held is not None:
                hpid, hticket, _, until, key, flags = self._held(MAIN)
                if hpid != os.getpid() or hticket != held:
                    return None, 0.0  # deposed meanwhile
                predicted_s = max(0.0, until - t0)
            slot, ticket = self._enqueue(key, t0)
            if slot < 0:
                if held is not None:
                    return held, 0.0
                self.timeouts += 1
                return None, 0.0
            if held is not None:
                self._set_held(MAIN)
                self.last_yielded = True
            if self._try_take(slot, ticket, t0, predicted_s, flags):
                return ticket, 0.0
        finally:
            self._unlock()
        pause = 0.0001
        try:
            while True:
                time.sleep(pause)
                pause = min(pause * 1.5, 0.001)
                if not self._lock():
                    self.timeouts += 1  # its slot goes stale, then free, by itself
                    return None, time.monotonic() - t0
                try:
                    now = time.monotonic()
                    took = self._try_take(slot, ticket, now, predicted_s, flags)
                    if took:
                        return ticket, now - t0
                    if took is None or now - t0 > self.max_wait_s:
                        self._leave(slot, ticket)
                        self.timeouts += 1
                        return None, now - t0
                finally:
                    self._unlock()
        except BaseException:  # interrupted while waiting: the slot is not left behind
            if self._lock():
                try:
                    self._leave(slot, ticket)
                finally:
                    self._unlock()
            raise

    def preempted(self, ticket: Optional[int]) -> bool:
        """Whether the holder's pass of this ticket should yield the turn: a live waiter that
        looked within STALE_S has an earlier key (it came later, but its pass is predicted to
        end before this one's). False where the page's lock is not had at once."""
        if ticket is None or not self._lock(0.002, trip=False):
            return False
        try:
            me = os.getpid()
            hpid, hticket, _, _, key, _ = self._held(MAIN)
            if hpid != me or hticket != ticket:
                return False
            now = time.monotonic()
            for _, pid, t, k, seen in self._slots():
                if pid != me and now - seen <= STALE_S and (k, t) < (key, ticket) and \
                        _alive(pid):
                    return True
            return False
        finally:
            self._unlock()

    def yield_turn(self, ticket: Optional[int]) -> Tuple[Optional[int], float]:
        """Between two layers of the holder's pass (its GPU work so far finished): gives the
        turn to the waiters of earlier keys and waits for it again under the pass's own key
        (which the later comers' keys do not beat). Returns (the ticket to go on with, None
        where the pass goes on without the turn; seconds yielded); last_yielded says whether it
        gave the turn up (not where the page's lock was not had, no waiter's place was free,
        or it had been deposed)."""
        self.last_yielded = False
        if ticket is None:
            return None, 0.0
        t0 = time.monotonic()
        new, waited = self._take(0.0, t0, 0.0, 0, held=ticket)
        if self.last_yielded:
            self.yields += 1
            self.yield_s += time.monotonic() - t0
        return new, waited

    def release(self, ticket: Optional[int]) -> None:
        """Gives the turn back (where the lock cannot be had, the others take it from this
        holder after max_wait_s)."""
        if ticket is None or self._mm is None or not self._lock():
            return
        try:
            for which in (MAIN, BESIDE):
                hpid, hticket, _, _, _, _ = self._held(which)
                if hpid == os.getpid() and hticket == ticket:
                    self._set_held(which)
        finally:
            self._unlock()

    def holder(self) -> int:
        """The pid holding the turn now (0: nobody). TurnPageBusy where the lock is not had."""
        self._must_lock()
        try:
            return self._holder_now(time.monotonic())
        finally:
            self._unlock()

    def passes_pending(self) -> bool:
        """Whether a pass holds the turn or waits for it now (another process's, or this one's);
        False where the page's lock is not had at once (a decoding step does not wait for it)."""
        if not self._lock(0.005, trip=False):
            return False
        try:
            now = time.monotonic()
            if self._holder_now(now):
                return True
            for _, pid, _, _, seen in self._slots():
                if pid and now - seen <= STALE_S and _alive(pid):
                    return True
            return False
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
        """How many live passes wait for the turn now. TurnPageBusy where the lock is not had."""
        self._must_lock()
        try:
            return sum(1 for _, pid, _, _, _ in self._slots() if pid and _alive(pid))
        finally:
            self._unlock()

    def stats(self) -> dict:
        return {"path": self.path, "passes": self.passes, "waited_passes": self.waited_passes,
                "beside_passes": self.beside_passes, "share": self.share, "light": self.light,
                "yields": self.yields, "yield_s": round(self.yield_s, 6),
                "wait_s": round(self.wait_s, 6), "timeouts": self.timeouts,
                "lock_timeouts": self.lock_timeouts,
                "decode_yields": self.decode_yields,
                "decode_yield_s": round(self.decode_yield_s, 6),
                "max_wait_s": self.max_wait_s, "label": "real"}


def open_for(device, setting: str, max_wait_s: float = 10.0, log=None,
             share: float = 2.0, light: bool = True) -> Optional[GpuTurn]:
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
        return GpuTurn(path, max_wait_s, share, light)
    except OSError as e:
        if log is not None:
            log("warn", f"--gpu-turn {path}: {e}: passes run without turns")
        return None
