#!/usr/bin/env python3
"""What a GPU turn costs the engine when nobody else wants the GPU (kvfabric.gputurn): a pass's
acquire and release, and a decoding step's check for waiting passes, against the ceiling of the
same process taking and giving back an flock on the same file (the least the page's lock
costs), in the same run, alternating rounds; medians in microseconds.

    bench/gpu_turn_cost.py [--ops 20000] [--rounds 5] [--json]

No GPU needed (the turn page is host memory). Real.
"""

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from kvfabric.gputurn import GpuTurn  # noqa: E402


def per_op_us(fn, ops):
    t0 = time.perf_counter()
    for _ in range(ops):
        fn()
    return (time.perf_counter() - t0) / ops * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.ops < 1 or a.rounds < 1:
        raise SystemExit("gpu_turn_cost: --ops and --rounds at least 1")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "turn")
        with GpuTurn(path) as t:
            fd = os.open(path, os.O_RDWR)
            try:
                def flock_pair():
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    fcntl.flock(fd, fcntl.LOCK_UN)

                def turn_pair():
                    ticket, _ = t.acquire(0.01)
                    t.release(ticket)

                res = {"flock": [], "turn": [], "pending": []}
                for _ in range(a.rounds):
                    res["flock"].append(per_op_us(flock_pair, a.ops))
                    res["turn"].append(per_op_us(turn_pair, a.ops))
                    res["pending"].append(per_op_us(t.passes_pending, a.ops))
            finally:
                os.close(fd)
    med = {k: statistics.median(v) for k, v in res.items()}
    out = {"bench": "gpu_turn_cost", "label": "real", "ops": a.ops, "rounds": a.rounds,
           "flock_pair_us": round(med["flock"], 2),
           "turn_acquire_release_us": round(med["turn"], 2),
           "decode_check_us": round(med["pending"], 2),
           "turn_vs_flock": round(med["turn"] / med["flock"], 2),
           "rounds_us": {k: [round(x, 2) for x in v] for k, v in res.items()}}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"gpu_turn_cost (real, medians of {a.rounds} rounds of {a.ops}): a pass's turn "
              f"{out['turn_acquire_release_us']} us, a decoding step's check "
              f"{out['decode_check_us']} us, against an flock taken and given back "
              f"{out['flock_pair_us']} us ({out['turn_vs_flock']}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
