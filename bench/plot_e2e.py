#!/usr/bin/env python3
"""Draws the TTFT CDF of a `kvf-bench e2e` run from its records.json, for runs made where gnuplot
is missing (the GPU machine) or to title a figure with its setup: both modes' TTFT, repetitions
pooled, on a log axis, with the SLO line and each mode's p50, p90 and p99 marked.

    bench/plot_e2e.py RECORDS.json OUT.png --title "4 x Llama-3.1-8B (transformers), one H200" \\
        [--slo-ms 2000]

Needs gnuplot (pngcairo). The figures are the records' own: real where the run was."""

import argparse
import json
import os
import subprocess
import sys
import tempfile

TITLES = {"kvf": "with kvfabric (disaggregated, cached)",
          "baseline": "baseline (engine prefix caches, no store)"}


def pct(v, q):
    """v sorted: the same definition as kvf-bench e2e's report (bench_quantile)."""
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records")
    ap.add_argument("out")
    ap.add_argument("--title", default="")
    ap.add_argument("--slo-ms", type=float, default=0)
    a = ap.parse_args()
    with open(a.records) as f:
        recs = json.load(f)
    d = tempfile.mkdtemp(prefix="kvf-plot-")
    plots, marks, lo, hi = [], [], float("inf"), 0.0
    for i, mode in enumerate(("kvf", "baseline")):
        v = sorted(r["ttft_s"] for r in recs if r.get("mode") == mode and not r.get("error")
                   and not r.get("rejected") and r.get("ttft_s") is not None)
        if not v:
            continue
        lo, hi = min(lo, v[0]), max(hi, v[-1])
        dat = os.path.join(d, f"{mode}.dat")
        with open(dat, "w") as f:
            for k, x in enumerate(v):
                f.write(f"{x:.6f} {(k + 1) / len(v):.6f}\n")
        plots.append(f"'{dat}' using 1:2 with steps lw 2 lc {i + 1} title "
                     f"'{TITLES[mode]} (n={len(v)})'")
        for q in (0.5, 0.9, 0.99):
            x = pct(v, q)
            marks.append(f"set object circle at {x},{q} size screen 0.006 fc lt {i + 1} "
                         f"fs solid front\nset label 'p{int(q * 100)} {x:.2f} s' at {x},{q} "
                         f"offset 0.6,{-0.8 if i else 0.8} tc lt {i + 1} font ',8' front")
    if not plots:
        raise SystemExit("plot_e2e: no records with a TTFT")
    n = len({r["request"] for r in recs})
    title = f"Time to first token, CDF (real, {n} requests{', ' + a.title if a.title else ''})"
    g = ["set terminal pngcairo size 960,560 font 'sans,10'", f"set output '{a.out}'",
         "set grid", "set key bottom right", "set logscale x", f"set title '{title}'",
         "set xlabel 'TTFT (s), log scale'", "set ylabel 'fraction of requests'",
         "set yrange [0:1.02]", f"set xrange [{lo / 1.5}:{hi * 2.5}]", *marks]
    if a.slo_ms > 0:
        s = a.slo_ms / 1e3
        g.append(f"set arrow from {s},0 to {s},1.02 nohead dt 2 lw 1.5 lc rgb 'gray30' front")
        g.append(f"set label 'SLO {s:g} s' at {s},0.3 offset 0.5,0 tc rgb 'gray30' front")
    g.append("plot " + ", ".join(plots))
    p = subprocess.run(["gnuplot"], input="\n".join(g) + "\n", text=True, capture_output=True)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        return 1
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
