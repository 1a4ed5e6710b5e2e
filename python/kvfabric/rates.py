"""What an engine measured, for its predictions (docs/python.md, "Measured rates"): the load
bandwidth from the stores, the time of a decoding step, and the prefill's compute time as a
function of the prompt positions a pass computes.

A pass's time is modelled as

    t(begin, end) = base + per_token * n + attention * n * (begin + end) / 2,   n = end - begin

a fixed cost (launches, the host's work: most of a short pass), a per-token cost (the weights'
GEMMs) and the attention's, which grows with the context each new position reads. The three are
fitted by weighted least squares, non-negative, to what the engine measured, kept per prompt
length class (powers of two of n): each class holds a decayed mean of its passes (the newest
weighted `alpha`), so that many short passes do not push the long ones' measurements out of the
fit, and a class not measured for a while counts less (its weight halves every HALF_LIFE_S). A
single per-token rate (before 2026-12-07) made a short pass predict a long one badly: a 20-token
pass of 15 ms (its fixed cost) put a 250-token pass at 190 ms, which then yielded its GPU turn to
every other pass of a burst (measured: 0.3-1.5 s for 250-token passes that take 25-45 ms).

A measurement far above the prediction of a model fitted to two or more classes of the engine's
own (more than OUTLIER times, in a class the prior does not hold: a first pass paying CUDA's lazy
initialisation, a pass the GPU shared with another process's) is taken at OUTLIER times the
prediction: a real change of speed moves the model within a few passes, and one slow pass does
not throw it out. Until two length classes are measured, the model is the
per-token rate through the origin of what was measured. seed() puts the calibration's model
(kvf-sched's cost file: prefill_tokens_per_s and prefill_attn_s_per_tok2) in as a prior, one
measurement per class of 256 to 4,096 tokens, each replaced by the engine's first own
measurement of its class.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

HALF_LIFE_S = 600.0  # a length class not measured for this long counts half
MAX_COUNT = 8  # a class's weight grows with its passes up to this many
OUTLIER = 3.0
MIN_S = 1e-9  # a pass measured shorter than this is no measurement (the fit weighs by 1 / t^2)
_X, _Z = 1e-3, 1e-6  # the fit's units: thousands of tokens, millions of token-positions
# the models tried in this order (the terms they keep: base, per token, attention); the first
# whose coefficients are all non-negative is used
_MODELS = ((0, 1, 2), (0, 1), (1, 2), (1,))


def _solve(m: List[List[float]], v: List[float]) -> Optional[List[float]]:
    """Gaussian elimination with partial pivoting; None where the system is singular."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    scale = max(abs(x) for row in m for x in row) or 1.0
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[p][c]) <= 1e-12 * scale:
            return None
        a[c], a[p] = a[p], a[c]
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            for k in range(c, n + 1):
                a[r][k] -= f * a[c][k]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][k] * out[k] for k in range(r + 1, n))) / a[r][r]
    return out


@dataclass
class _Class:
    """One prompt-length class: decayed means of its passes' terms and seconds."""
    x: float  # new tokens, in thousands
    z: float  # new tokens x their mean context, in millions
    y: float  # seconds
    count: int  # passes, up to MAX_COUNT
    when: float  # last noted (time.monotonic())
    prior: bool  # the calibration's, not yet replaced by a pass of the engine's own


class Rates:
    """The engine's measured rates (see the module's docstring)."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.load_bps: Optional[float] = None
        self.s_per_step: Optional[float] = None  # per decoding step
        self._classes: Dict[int, _Class] = {}  # by the bit length of the new tokens
        self._fit: Optional[Tuple[float, float, float]] = None  # base, per token, attention
        self.outliers = 0  # measurements taken at OUTLIER times the prediction

    def _mix(self, old: Optional[float], new: float) -> float:
        return new if old is None else (1 - self.alpha) * old + self.alpha * new

    def note_load(self, nbytes: float, seconds: float) -> None:
        if nbytes > 0 and seconds > 0 and math.isfinite(seconds) and math.isfinite(nbytes):
            self.load_bps = self._mix(self.load_bps, nbytes / seconds)

    def note_decode(self, steps: int, seconds: float) -> None:
        if steps > 0 and seconds > 0 and math.isfinite(seconds):
            self.s_per_step = self._mix(self.s_per_step, seconds / steps)

    @staticmethod
    def _terms(begin: int, end: int) -> Tuple[float, float]:
        n = end - begin
        return n * _X, n * (begin + end) / 2.0 * _Z

    def note_prefill(self, new: int, seconds: float, begin: int = 0, now: Optional[float] = None,
                     prior: bool = False) -> None:
        """A pass that computed `new` positions after `begin` cached ones in `seconds`."""
        if new <= 0 or begin < 0 or not (seconds >= MIN_S and math.isfinite(seconds)):
            return
        now = time.monotonic() if now is None else now
        x, z = self._terms(begin, begin + new)
        c = new.bit_length()
        old = self._classes.get(c)
        own = sum(1 for k in self._classes.values() if not k.prior)
        # not against a class the prior holds: the engine's own pass replaces it as it is
        if not prior and own >= 2 and self._fit is not None and not (old and old.prior):
            want = self.compute_s(begin, begin + new)
            if want and seconds > OUTLIER * want:
                seconds = OUTLIER * want
                self.outliers += 1
        if old is None or (old.prior and not prior):
            self._classes[c] = _Class(x, z, seconds, 1, now, prior)
        else:
            old.x, old.z = self._mix(old.x, x), self._mix(old.z, z)
            old.y = self._mix(old.y, seconds)
            old.count = min(old.count + 1, MAX_COUNT)
            old.when = now
        self._refit(now)

    def seed(self, tokens_per_s: float, attn_s_per_tok2: float = 0.0) -> None:
        """The calibration's model (kvf-sched's cost file) as a prior: t = n / tokens_per_s +
        attn_s_per_tok2 * n^2 / 2 at 256 to 4,096 tokens from scratch."""
        if not (tokens_per_s > 0 and math.isfinite(tokens_per_s) and attn_s_per_tok2 >= 0 and
                math.isfinite(attn_s_per_tok2)):
            raise ValueError("the calibration's prefill_tokens_per_s must be positive and its "
                             "prefill_attn_s_per_tok2 non-negative")
        now = time.monotonic()
        for n in (256, 512, 1024, 2048, 4096):
            self.note_prefill(n, n / tokens_per_s + attn_s_per_tok2 * n * n / 2.0, now=now,
                              prior=True)

    def _refit(self, now: float) -> None:
        rows = []
        for k in self._classes.values():  # weighed by relative error, and by age
            w = k.count * 0.5 ** (max(0.0, now - k.when) / HALF_LIFE_S) / (k.y * k.y)
            rows.append(((1.0, k.x, k.z), k.y, w))
        fit = None
        for terms in _MODELS:
            if len(rows) < len(terms):
                continue
            m = [[sum(w * f[i] * f[j] for f, _, w in rows) for j in terms] for i in terms]
            v = [sum(w * f[i] * y for f, y, w in rows) for i in terms]
            sol = _solve(m, v)
            if sol is None or any(s < 0 or not math.isfinite(s) for s in sol) or \
                    not any(s > 0 for s in sol):
                continue
            full = [0.0, 0.0, 0.0]
            for i, s in zip(terms, sol):
                full[i] = s
            fit = (full[0], full[1], full[2])
            break
        self._fit = fit

    def compute_s(self, begin: int, end: int) -> Optional[float]:
        """Predicted seconds to prefill positions begin..end over a cache of begin (None before
        any measurement)."""
        fit = self._fit  # once: the engine's thread may replace it meanwhile
        if fit is None:
            return None
        x, z = self._terms(begin, end)
        a, b, c = fit
        return a + b * x + c * z

    def light(self, begin: int, end: int) -> bool:
        """Whether the pass's predicted time is mostly the fixed cost: its per-token and
        attention terms together at most the base (the GPU then idles more than it computes;
        kvfabric.gputurn lets two such passes run beside each other). False without a base."""
        fit = self._fit
        if fit is None or fit[0] <= 0:
            return False
        x, z = self._terms(begin, end)
        a, b, c = fit
        return b * x + c * z <= a

    def load_s(self, nbytes: float) -> Optional[float]:
        """Predicted seconds to load nbytes from the stores (None before any load)."""
        return None if self.load_bps is None else nbytes / self.load_bps

    @property
    def s_per_token(self) -> Optional[float]:
        """The per-token term (seconds per new token, the attention's aside)."""
        fit = self._fit
        return None if fit is None else fit[1] * _X

    @s_per_token.setter
    def s_per_token(self, v: Optional[float]) -> None:
        """Sets the model to this per-token rate alone (what was measured is forgotten)."""
        self._classes.clear()
        self._fit = None if v is None else (0.0, float(v) / _X, 0.0)

    def model(self) -> Optional[Dict[str, float]]:
        """The fitted model, for records and answers."""
        fit = self._fit
        if fit is None:
            return None
        a, b, c = fit
        return {"base_s": a, "s_per_token": b * _X, "attn_s_per_token2": c * _Z,
                "classes": len(self._classes), "label": "real"}
