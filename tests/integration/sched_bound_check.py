#!/usr/bin/env python3
"""kvf-bench sched's lower bound (docs/scheduler.md, "Trace replay"): every result carries the
bound's percentiles and the policy's over them; the bound is below what a policy achieves (up to
caches filled after a request's arrival), kvf_cost is nearer to it than round robin where the
load is high, two runs of the same inputs give the same figures (the simulation is a function of
its inputs), and the work floor (the least share of the instances' time any placement needs)
grows with the rate. Usage: sched_bound_check.py KVF_BENCH TRACE"""

import json
import subprocess
import sys


def run(bench, trace):
    out = subprocess.run([bench, "sched", "--trace", trace, "--instances", "8",
                          "--max-requests", "300", "--rates", "1,4", "--policy",
                          "round_robin,kvf_cost", "--queue", "fifo", "--json"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    bench, trace = sys.argv[1:3]
    a, b = run(bench, trace), run(bench, trace)
    res = a["results"]
    assert res and res == b["results"], "two runs of the same inputs differ"
    by = {}
    for r in res:
        lb = r["lower_bound"]
        assert lb["label"] == "simulated", lb
        for q in ("p50", "p90", "p99"):
            assert lb[f"ttft_{q}_s"] > 0, (r["policy"], lb)
            ratio = lb[f"ttft_{q}_ratio"]
            assert abs(ratio - r[f"ttft_{q}_s"] / lb[f"ttft_{q}_s"]) < 1e-3 * ratio, r
            assert ratio >= 0.9, (r["policy"], r["rate"], q, ratio)
        by[(r["policy"], r["rate"])] = lb
    # the work floor: the same for every policy at a rate, in proportion to the rate, and no
    # more than the work without any reuse (each prompt prefilled whole) would ask
    for p in ("round_robin", "kvf_cost"):
        f1, f4 = by[(p, 1.0)]["work_floor"], by[(p, 4.0)]["work_floor"]
        assert 0 < f1 < f4 and abs(f4 - 4 * f1) < 1e-4 * f4, (p, f1, f4)
        assert f1 == by[("round_robin", 1.0)]["work_floor"], (p, f1)
    rr, kc = by[("round_robin", 4.0)], by[("kvf_cost", 4.0)]
    assert kc["ttft_p90_ratio"] <= rr["ttft_p90_ratio"], (kc, rr)
    print("sched_bound_check: ok:", {k: round(v["ttft_p90_ratio"], 3) for k, v in
                                     ((f"{p}@{x}x", v) for (p, x), v in by.items())})


if __name__ == "__main__":
    main()
