"""The backend-feasibility classifier (kvf/feasibility.h, docs/feasibility.md): every remote KV
action is `real` (it runs here), `backend_infeasible` (the reason names the missing capability) or
`simulated` (allowed to be evaluated by the cost model; nothing executes), and the optimality gap
is what a backend's limits cost: the best action over all minus the best over the real ones."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional

from . import _lib
from .errors import KvfError, check

_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None


def actions() -> List[str]:
    """The actions the classifier knows ("store", "retrieve", ..., "pd_handoff_store", ...)."""
    out, i = [], 0
    while True:
        n = _lib.lib().kvf_action_name(i).decode()
        if n == "?":
            return out
        out.append(n)
        i += 1


def _action(name: str) -> int:
    a = ctypes.c_int()
    if _lib.lib().kvf_action_parse(name.encode(), ctypes.byref(a)) != 0:
        raise ValueError(f"unknown action {name!r}: one of {', '.join(actions())}")
    return a.value


class Caps:
    """A backend's capability record: a built-in one ("vllm", "mlx-lm", "llama.cpp",
    "reference", "kvf-store"), or one from a dict ({"base": built-in name, field: value ...},
    the JSON records of docs/feasibility.md)."""

    def __init__(self, record: Any) -> None:
        self._c = _lib.Caps()
        if isinstance(record, str):
            check(_lib.lib().kvf_caps_builtin(record.encode(), ctypes.byref(self._c)),
                  "capability record", f"no built-in record {record!r}")
            return
        text = json.dumps(dict(record)).encode()
        err = ctypes.create_string_buffer(300)
        check(_lib.lib().kvf_caps_from_json(text, len(text), ctypes.byref(self._c), err,
                                            len(err)), "capability record", err.value.decode())

    @staticmethod
    def builtins() -> List[str]:
        out, i = [], 0
        while True:
            n = _lib.lib().kvf_caps_builtin_name(i)
            if not n:
                return out
            out.append(n.decode())
            i += 1

    def to_dict(self) -> Dict[str, Any]:
        p = _lib.lib().kvf_caps_to_json(ctypes.byref(self._c))
        if not p:
            raise MemoryError("kvf_caps_to_json")
        try:
            return json.loads(ctypes.string_at(p).decode())
        finally:
            _libc.free(p)


@dataclass
class Verdict:
    label: str   # "real", "backend_infeasible", "simulated"
    reason: str  # "none", or the missing capability ("memory_kind", "no_rdma_device", ...)
    why: str     # one sentence naming it and the side


def classify(action: str, local: Caps, remote: Caps, allow_simulated: bool = False) -> Verdict:
    """Classifies `action` from local towards remote."""
    v = _lib.Verdict()
    check(_lib.lib().kvf_classify(_action(action), ctypes.byref(local._c),
                                  ctypes.byref(remote._c), int(allow_simulated),
                                  ctypes.byref(v)), "classify")
    L = _lib.lib()
    return Verdict(L.kvf_feas_label_name(v.label).decode(),
                   L.kvf_feas_reason_name(v.reason).decode(), v.why.decode())


def optimality_gap(local: Caps, remote: Caps, state: Optional[Mapping[str, float]] = None
                   ) -> Dict[str, Any]:
    """The gap in a state (prompt_tokens, cached_tokens, kv_bytes_per_token,
    prefill_tokens_per_s, tcp_bytes_per_s, rdma_bytes_per_s, memory_pressure; the rest default):
    the best action over all, the best real one, their scores (seconds of TTFT saved, net) and
    the gap between them."""
    s = _lib.GapState()
    _lib.lib().kvf_gap_state_defaults(ctypes.byref(s))
    for k, v in (state or {}).items():
        if k not in dict(_lib.GapState._fields_):
            raise ValueError(f"unknown state field {k!r}")
        setattr(s, k, float(v))
    g = _lib.Gap()
    check(_lib.lib().kvf_optimality_gap(ctypes.byref(local._c), ctypes.byref(remote._c),
                                        ctypes.byref(s), ctypes.byref(g)), "optimality_gap")
    name = lambda a: _lib.lib().kvf_action_name(a).decode()  # noqa: E731
    return {"best_all": name(g.best_all), "score_all": g.score_all,
            "best_feasible": name(g.best_feasible) if g.have_feasible else None,
            "score_feasible": g.score_feasible if g.have_feasible else None, "gap": g.gap}


__all__ = ["Caps", "Verdict", "classify", "optimality_gap", "actions", "KvfError"]
