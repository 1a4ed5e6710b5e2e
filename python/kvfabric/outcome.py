"""What one request did (Outcome: the fields of kvf-engine's answers) and its answer's JSON
(outcome_json), as kvfabric.engine runs requests and kvfabric.serve answers them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass
class Outcome:
    """What one request did (the fields of kvf-engine's answers)."""

    tokens: List[int]
    itl_s: List[float]
    prompt_tokens: int
    device_tokens: int
    loaded_tokens: int
    saved_tokens: int
    prefill_s: float
    compute_s: float
    wait_s: float
    decode_s: float
    save_s: float
    load_error: str
    first_token_mismatch: bool
    notes: List[str]
    save_error: str = "KVF_OK"
    handed_over: bool = False  # a decode that loaded the whole prompt's KV and computed nothing
    tail_saved: bool = False  # a prefill saved its last partial chunk too, padded, for the decode
    decision: Dict[str, Any] = field(default_factory=dict)  # load or recompute, and why
    prefetch: Dict[str, Any] = field(default_factory=dict)  # fetched while it waited: how much
    abandoned: bool = False  # its decode stopped early: nobody waited for it any more
    gpu_turn: Dict[str, Any] = field(default_factory=dict)  # its wait for the GPU's turn
    oom_retried: bool = False  # ran out of device memory once and was run again (Engine.run)
    pass_clock: Dict[str, Any] = field(default_factory=dict)  # where the pass's time went


def outcome_json(o: Outcome) -> Dict[str, Any]:
    """o as the engine's answer: every field, and the optional ones where they say something."""
    return {"tokens": o.tokens, "itl_s": o.itl_s, "prompt_tokens": o.prompt_tokens,
            "device_tokens": o.device_tokens, "loaded_tokens": o.loaded_tokens,
            "saved_tokens": o.saved_tokens, "prefill_s": o.prefill_s, "compute_s": o.compute_s,
            "wait_s": o.wait_s, "decode_s": o.decode_s, "save_s": o.save_s,
            "load_error": o.load_error, "save_error": o.save_error,
            "first_token_mismatch": o.first_token_mismatch, "handed_over": o.handed_over,
            "tail_saved": o.tail_saved, "decision": o.decision, "notes": o.notes,
            **({"prefetch": o.prefetch} if o.prefetch else {}),
            **({"gpu_turn": o.gpu_turn} if o.gpu_turn else {}),
            **({"oom_retried": True} if o.oom_retried else {}),
            **({"pass_clock": o.pass_clock} if o.pass_clock else {})}
