"""One request at a time on one engine: the queue of a serving engine's waiting requests and
the order it takes them in (kvf-engine's --queue: hrrn, work or fifo; docs/scheduler.md "Queue
order"). Used by kvfabric.serve."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence

QUEUE_DISCIPLINES = ("hrrn", "work", "fifo")


def pick_turn(discipline: str, work_s: Sequence[float], waited_s: Sequence[float], picks: int,
              window: int = 128) -> int:
    """Which waiting request runs next (index into the waiting requests, oldest first), as
    kvf-engine's queue picks (kvf_sched_queue_pick_by, docs/scheduler.md "Queue order"): the
    lowest key among the oldest `window`, the oldest of equal keys, and every window-th pick the
    oldest whatever its key. hrrn's key is the response ratio (waited + work) / work, highest
    first, work floored at a millisecond; work's is the predicted work, least first; fifo takes
    the oldest."""
    if discipline not in QUEUE_DISCIPLINES:
        raise ValueError(f"queue discipline must be one of {', '.join(QUEUE_DISCIPLINES)}")
    n = len(work_s)
    if discipline == "fifo" or n < 2 or window < 2 or picks % window == window - 1:
        return 0

    def key(j: int) -> float:
        if discipline == "work":
            return work_s[j]
        w = max(work_s[j], 1e-3)
        return -(max(waited_s[j], 0.0) + w) / w

    best, best_key = 0, key(0)
    for j in range(1, min(n, window)):
        kj = key(j)
        if kj < best_key:
            best, best_key = j, kj
    return best


class TurnQueue:
    """One request at a time on one engine, the waiting ones taken in the order of a queue
    discipline (pick_turn: hrrn, work or fifo, kvf-engine's --queue), with what waits counted
    for load reports. `with q.turn(work_s):` waits for the turn of a request of work_s predicted
    seconds; `with q:` is a turn of no predicted work."""

    def __init__(self, discipline: str = "fifo", window: int = 128,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if discipline not in QUEUE_DISCIPLINES:
            raise ValueError(f"queue discipline must be one of {', '.join(QUEUE_DISCIPLINES)}")
        self.discipline, self.window, self.clock = discipline, window, clock
        self._cv = threading.Condition()
        self._next = 0  # tickets
        self._wait: List[List[float]] = []  # [ticket, since, work_s], oldest first
        self._granted: Optional[int] = None  # the ticket whose turn it is, not yet taken
        self._held = False
        self._picks = 0
        self.queued_prefill_tokens = 0
        self.active_decodes = 0
        self.waiting = 0
        # predicted prefill seconds of the requests here (waiting and running), and of the one
        # running since running_since (kvf-engine's queued_prefill_s, reported to kvf-sched)
        self.queued_work_s = 0.0
        self.running_work_s = 0.0
        self.running_since = 0.0

    def queued_seconds(self, now: Optional[float] = None) -> float:
        """The predicted prefill work still to do here, in seconds: every request's prediction,
        less what the running one has done (at most its prediction). The caller holds the lock
        that guards these fields (kvfabric.serve's)."""
        now = time.monotonic() if now is None else now
        done = min(max(0.0, now - self.running_since), self.running_work_s) \
            if self.running_work_s > 0 else 0.0
        return max(0.0, self.queued_work_s - done)

    def _grant_locked(self) -> None:
        """Hands a free engine to the waiting request the discipline picks."""
        if self._held or self._granted is not None or not self._wait:
            return
        now = self.clock()
        i = pick_turn(self.discipline, [w[2] for w in self._wait],
                      [now - w[1] for w in self._wait], self._picks, self.window)
        self._picks += 1
        self._granted = int(self._wait.pop(i)[0])
        self._cv.notify_all()

    def acquire(self, work_s: float = 0.0) -> None:
        """Waits for the turn of a request of work_s predicted seconds."""
        with self._cv:
            ticket = self._next
            self._next += 1
            self.waiting += 1
            self._wait.append([ticket, self.clock(), max(0.0, work_s)])
            self._grant_locked()
            while self._granted != ticket:
                self._cv.wait()
            self._granted, self._held = None, True
            self.waiting -= 1

    def release(self) -> None:
        """Ends the turn held; the next one goes to whom the discipline picks."""
        with self._cv:
            self._held = False
            self._grant_locked()

    @contextmanager
    def turn(self, work_s: float = 0.0) -> Iterator["TurnQueue"]:
        self.acquire(work_s)
        try:
            yield self
        finally:
            self.release()

    def __enter__(self) -> "TurnQueue":
        self.acquire(0.0)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def busy(self) -> bool:
        """Whether a request holds the engine or waits for it now."""
        with self._cv:
            return self._held or bool(self._wait) or self._granted is not None
