#!/usr/bin/env python3
"""Groups of `kvf-bench e2e` runs side by side in absolute figures, so that a change is judged by
what it does to kvfabric's own latency and not only by its ratio to the baseline (a change that
slows the baseline more than kvfabric improves every ratio while kvfabric's users wait longer):

    bench/e2e_runs.py --group before RUN1/records.json RUN2/records.json \\
                      --group after RUN3/records.json RUN4/records.json [--json]

Every repetition of every records file is one run. For each group and mode (kvfabric,
baseline): TTFT p1, p10, p50, p90 and p99, the mean inter-token latency and the end-to-end p50,
each as the median of the group's runs with the lowest and highest run; then each later group
against the first, mode by mode: the ratio of the medians and whether the later group's runs are
all above the first's ("higher in every run"), all below, or overlap. Percentiles are
kvf-bench's (the value at rank round(q x (n - 1)) of the sorted TTFTs of the requests that
completed), so a run's figures here are the figures of its summary. Derived from the records,
which are real; nothing is measured here.
"""

import argparse
import json
import statistics
import sys

PCTS = (("p1", 0.01), ("p10", 0.10), ("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
MODES = ("kvf", "baseline")


def quantile(values, q):
    """kvf-bench's quantile (bench_quantile): rank round(q (n - 1)) of the sorted values."""
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


def itl_mean_ms(recs):
    """The mean inter-token gap over every step of the run, as kvf-bench's summary: a request's
    mean weighted by its steps (itl_steps, or generated - 1 in records that predate it), in ms;
    None without decoding steps."""
    num = den = 0.0
    for r in recs:
        steps = r.get("itl_steps", max(r.get("generated", 1) - 1, 0))
        if r.get("itl_mean_s") is not None and steps > 0:
            num += r["itl_mean_s"] * steps
            den += steps
    return num / den * 1e3 if den else None


def run_figures(recs):
    done = [r for r in recs if not r.get("error") and not r.get("rejected")]
    if not done:
        return None
    ttft = [r["ttft_s"] for r in done]
    out = {k: quantile(ttft, q) for k, q in PCTS}
    out["itl_mean_ms"] = itl_mean_ms(done)
    out["e2e_p50_s"] = quantile([r["e2e_s"] for r in done], 0.5)
    out["requests"] = len(done)
    return out


def load_runs(paths):
    """The runs of these records files: {mode: [figures of one repetition, ...]}."""
    runs = {m: [] for m in MODES}
    for path in paths:
        try:
            with open(path) as f:
                records = json.load(f)
        except (OSError, ValueError) as e:
            sys.exit("e2e_runs: %s: %s" % (path, e))
        if not isinstance(records, list):
            sys.exit("e2e_runs: %s: not a kvf-bench e2e records.json (a list of records)" % path)
        for mode in MODES:
            reps = sorted({r.get("repetition", 1) for r in records if r.get("mode") == mode})
            for rep in reps:
                fig = run_figures([r for r in records if r.get("mode") == mode and
                                   r.get("repetition", 1) == rep])
                if fig:
                    fig["source"] = "%s#%s" % (path, rep)
                    runs[mode].append(fig)
    return runs


KEYS = [k for k, _ in PCTS] + ["itl_mean_ms", "e2e_p50_s"]


def spread(runs, key):
    v = [r[key] for r in runs if r.get(key) is not None]
    if not v:
        return None
    return {"median": statistics.median(v), "low": min(v), "high": max(v), "runs": len(v)}


def compare(ref, other):
    """other against ref, figure by figure: ratio of the medians, and where the runs lie."""
    out = {}
    for k in KEYS:
        a, b = spread(ref, k), spread(other, k)
        if not a or not b:
            continue
        where = "higher in every run" if b["low"] > a["high"] else \
            "lower in every run" if b["high"] < a["low"] else "overlap"
        out[k] = {"ratio": b["median"] / a["median"] if a["median"] else None, "where": where}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group", nargs="+", action="append", metavar=("NAME", "RECORDS"),
                    required=True, help="a name, then the records.json files of its runs")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    groups = []
    for g in a.group:
        if len(g) < 2:
            ap.error("--group %s names no records.json" % g[0])
        if any(g[0] == n for n, _ in groups):
            ap.error("two groups named %s" % g[0])
        groups.append((g[0], load_runs(g[1:])))
    res = {"bench": "e2e_runs", "label": "real (derived from the records)", "groups": {},
           "vs_first": {}}
    for name, runs in groups:
        res["groups"][name] = {m: {k: spread(runs[m], k) for k in KEYS} for m in MODES}
        for m in MODES:
            res["groups"][name][m]["sources"] = [r["source"] for r in runs[m]]
    first, ref = groups[0]
    for name, runs in groups[1:]:
        res["vs_first"][name] = {m: compare(ref[m], runs[m]) for m in MODES}
    if a.json:
        json.dump(res, sys.stdout, indent=1)
        print()
        return
    print("TTFT (s), ITL mean (ms) and end-to-end p50 (s): the median of each group's runs "
          "[lowest, highest run]; derived from the records, real")
    print("%-12s %-8s %4s " % ("group", "mode", "runs") + " ".join("%-21s" % k for k in KEYS))
    for name, _ in groups:
        for m in MODES:
            g = res["groups"][name][m]
            cells = []
            for k in KEYS:
                s = g[k]
                cells.append("%-21s" % ("-" if not s else "%.3f [%.3f, %.3f]" %
                                        (s["median"], s["low"], s["high"])))
            print("%-12s %-8s %4d " % (name, m, len(g["sources"])) + " ".join(cells))
    for name, per_mode in res["vs_first"].items():
        for m in MODES:
            parts = ["%s %.2fx (%s)" % (k, c["ratio"], c["where"]) for k, c in per_mode[m].items()
                     if c["ratio"] is not None]
            print("%s against %s, %s: %s" % (name, first, m, "; ".join(parts) or "no runs"))


if __name__ == "__main__":
    main()
