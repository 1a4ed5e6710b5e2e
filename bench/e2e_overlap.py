#!/usr/bin/env python3
"""Where an e2e run's passes ran beside each other: for every prefill pass of a `kvf-bench e2e`
run (records.json), the other passes and decodes under way during it, and its compute time
against the same request's pass in the baseline's run of the same repetition.

Engines that share one GPU (the GPU e2e's four engines on one card) slow each other's passes
down when they run at once; this says how often that happened and what it cost, by prompt length:

    bench/e2e_overlap.py RUN/records.json [--bins 1024,4096] [--json]
    bench/e2e_overlap.py --by-decodes 1.5 RUN1/records.json [RUN2/records.json ...]

Where the records carry the engines' pass clocks (kvfabric.passclock), a second table gives the
passes' wall time, thread and process CPU and GPU span in both modes. --by-decodes pools runs and
compares kvfabric's passes with the baseline's that ran alone, split by how many decoding steps
ran beside kvfabric's (engines sharing a GPU time-slice it).

A pass is [arrival + place_s + engine_queue_s + engine_gpu_turn_s, + engine_prefill_s]; a decode
is [arrival + ttft_s + decode_queue_s, arrival + e2e_s] (a colocated one's decode follows its
pass on the same engine). "Beside" counts the passes and decodes of other requests that
overlapped it (as a fraction of the pass: 2.0 = two others all the time; a pass that yielded its
turn to a shorter one, engine_gpu_yielded_s, has that time taken off its span, its overlap with
the other passes and its compute, and off each other pass's overlap with it: the pass that ran
in it did not run beside it; an approximation, since the records do not say when in the pass it
yielded); "beside" is the share of passes that took the place beside the turn's holder (a short
pass beside a long one, or two light passes: kvfabric.gputurn); "after pass" is the time from
its end to the first token in the driver's hands (the streamed first line, or where the engine
does not stream, as before 2026-12-06, the save's part after the pass and the reply; then the
router). Derived
from the records, which are real; nothing is measured here.
"""

import argparse
import json
import statistics
import sys


def intervals(records, mode, rep):
    out = []
    for r in records:
        if r["mode"] != mode or r["repetition"] != rep or r.get("rejected") or r.get("error"):
            continue
        ps = r["arrival_s"] + r["place_s"] + r["engine_queue_s"] + r.get("engine_gpu_turn_s", 0)
        pe = ps + r["engine_prefill_s"]
        ds = r["arrival_s"] + r["ttft_s"] + r.get("decode_queue_s", 0.0)  # its turn came
        out.append((r, ps, pe, ds, r["arrival_s"] + r["e2e_s"]))
    return out


def overlap(a0, a1, b0, b1):
    return max(0.0, min(a1, b1) - max(a0, b0))


def clock(r):
    """A record's pass clock (kvfabric.passclock) with its wall time, or None."""
    c = r.get("engine_pass_clock")
    if not c or not r.get("engine_prefill_s"):
        return None
    return dict(c, wall_s=r["engine_prefill_s"])


def clock_bin(sel):
    """Medians of the passes' clocks, each mode's, and of kvfabric's over the baseline's for the
    same request: thread CPU, process CPU and GPU span, and the wall time the thread spent off
    the CPU. None where the records have no clocks."""
    def med(vals):
        vals = [v for v in vals if v is not None]
        return round(statistics.median(vals), 4) if vals else None

    def each(key):
        out = {}
        for f in ("thread_cpu_s", "process_cpu_s", "gpu_s", "wall_s"):
            out[f] = med(r[key][f] for r in sel if r[key])
        out["off_cpu_s"] = med(r[key]["wall_s"] - r[key]["thread_cpu_s"] for r in sel if r[key])
        return out

    if not any(r["kvf_clock"] for r in sel):
        return None
    pair = [r for r in sel if r["kvf_clock"] and r["baseline_clock"]]
    ratio = {}
    for f in ("thread_cpu_s", "gpu_s", "wall_s"):
        ratio[f] = med(r["kvf_clock"][f] / r["baseline_clock"][f] for r in pair
                       if r["kvf_clock"][f] and r["baseline_clock"][f])
    return {"kvf": each("kvf_clock"), "baseline": each("baseline_clock") if pair else None,
            "kvf_vs_baseline": ratio}


def beside(kv):
    """For each pass of one mode's intervals kv: (record, start, end, its span less the time it
    yielded, the other passes beside it, the decodes beside it), as fractions of that span (see
    the module's docstring); passes of no span are left out."""
    for x, ps, pe, _, _ in kv:
        yl = x.get("engine_gpu_yielded_s", 0.0)
        span = pe - ps - yl
        if span <= 0:
            continue
        bp = max(0.0, sum(max(0.0, overlap(ps, pe, qs, qe) - y.get("engine_gpu_yielded_s", 0.0))
                          for y, qs, qe, _, _ in kv if y is not x) - yl) / span
        bd = sum(overlap(ps, pe, ds, de) for y, _, _, ds, de in kv if y is not x) / span
        yield x, ps, pe, span, bp, bd


def new_tokens(r):
    return r["prompt_tokens"] - r["store_tokens"] - r["device_tokens"]


def compute_s(r):
    """A pass's compute, less the time it yielded its turn."""
    return r["engine_compute_s"] - r.get("engine_gpu_yielded_s", 0.0)


def by_decodes(paths, min_new, split):
    """Over one or more runs: kvfabric's passes of at least min_new new tokens, with no other pass
    beside them, whose baseline pass of the same request ran alone (no pass, under 0.5 of a
    decode beside it), split by the decodes beside kvfabric's pass (under `split`, and from it):
    how many, and their compute against the baseline's (median, min, max)."""
    groups = {"under": [], "from": []}
    for path in paths:
        with open(path) as f:
            records = json.load(f)
        for rep in sorted({r["repetition"] for r in records if r.get("mode") == "kvf"}):
            base = {y["request"]: (y, bp, bd)
                    for y, _, _, _, bp, bd in beside(intervals(records, "baseline", rep))}
            for x, _, _, _, bp, bd in beside(intervals(records, "kvf", rep)):
                y, ybp, ybd = base.get(x["request"], (None, 0.0, 0.0))
                if y is None or new_tokens(y) != new_tokens(x) or new_tokens(x) < min_new or \
                        bp >= 0.05 or ybp >= 0.05 or ybd >= 0.5 or compute_s(y) <= 0:
                    continue
                groups["under" if bd < split else "from"].append(compute_s(x) / compute_s(y))
    return {k: {"passes": len(v), "compute_vs_baseline_median":
                round(statistics.median(v), 3) if v else None,
                "min": round(min(v), 3) if v else None, "max": round(max(v), 3) if v else None}
            for k, v in groups.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", help="records.json of a run (with --by-decodes, "
                    "one or more)")
    ap.add_argument("--bins", default="1024,4096", help="prompt-length bin edges (new tokens)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--by-decodes", type=float, metavar="SPLIT", default=None,
                    help="pooled over the runs given: kvfabric's passes of at least the first "
                    "bin edge's new tokens against the baseline's run alone, split by the "
                    "decodes beside them (under SPLIT, and from it; 1.5: both decoding engines "
                    "through most of the pass)")
    a = ap.parse_args()
    if a.by_decodes is not None:
        try:
            edges = sorted(int(x) for x in a.bins.split(",") if x)
            out = by_decodes(a.records, edges[0] if edges else 0, a.by_decodes)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"e2e_overlap: {e}")
        out = {"bench": "e2e_overlap", "by_decodes": a.by_decodes, "records": a.records,
               "min_new_tokens": edges[0] if edges else 0, **out,
               "label": "real (derived from the runs' records)"}
        if a.json:
            print(json.dumps(out))
        else:
            for k in ("under", "from"):
                g = out[k]
                print(f"decodes beside {k} {a.by_decodes}: {g['passes']} passes, compute / "
                      f"baseline's alone median {g['compute_vs_baseline_median']} "
                      f"[{g['min']}, {g['max']}]")
        return 0
    if len(a.records) != 1:
        raise SystemExit("e2e_overlap: one records.json (several only with --by-decodes)")
    a.records = a.records[0]
    try:
        with open(a.records) as f:
            records = json.load(f)
        edges = sorted(int(x) for x in a.bins.split(",") if x)
    except (OSError, ValueError) as e:
        raise SystemExit(f"e2e_overlap: {e}")
    if not isinstance(records, list) or not records:
        raise SystemExit("e2e_overlap: records.json holds no records")
    reps = sorted({r["repetition"] for r in records if r.get("mode") == "kvf"})
    rows = []
    for rep in reps:
        kv = intervals(records, "kvf", rep)
        base = {r["request"]: (r, pe) for r, _, pe, _, _ in intervals(records, "baseline", rep)}
        for x, ps, pe, _, bp, bd in beside(kv):
            b, bpe = base.get(x["request"], (None, 0.0))
            rows.append({"repetition": rep, "request": x["request"], "new_tokens": new_tokens(x),
                         "kvf_compute_s": compute_s(x),
                         # None: records from before engine_gpu_yielded_s (not known)
                         "yielded_s": x.get("engine_gpu_yielded_s"),
                         # it took the place beside the turn's holder (None: records from
                         # before engine_gpu_beside)
                         "took_beside": x.get("engine_gpu_beside"),
                         "baseline_compute_s": b["engine_compute_s"] if b else None,
                         "gpu_turn_s": x.get("engine_gpu_turn_s", 0.0),
                         # from the pass's end to the first token in the driver's hands (see
                         # the module's docstring)
                         "after_pass_s": x["ttft_s"] - (pe - x["arrival_s"]),
                         "baseline_after_pass_s": b["ttft_s"] - (bpe - b["arrival_s"])
                         if b else None,
                         "passes_beside": round(bp, 3), "decodes_beside": round(bd, 3),
                         # where the pass's time went (engines with kvfabric.passclock)
                         "kvf_clock": clock(x), "baseline_clock": clock(b) if b else None})
    bins = []
    lo = 0
    for hi in edges + [None]:
        sel = [r for r in rows if r["new_tokens"] >= lo and (hi is None or r["new_tokens"] < hi)]
        pair = [r for r in sel if r["baseline_compute_s"]]
        if sel:
            bins.append({
                "new_tokens": f"{lo}-{hi - 1}" if hi else f"{lo}+", "passes": len(sel),
                "passes_beside_mean": round(statistics.mean(r["passes_beside"] for r in sel), 3),
                "alone_share": round(sum(r["passes_beside"] < 0.05 for r in sel) / len(sel), 3),
                "decodes_beside_mean": round(statistics.mean(r["decodes_beside"] for r in sel),
                                             3),
                "gpu_turn_s_median": round(statistics.median(r["gpu_turn_s"] for r in sel), 4),
                "yielded_share": round(sum(r["yielded_s"] > 0 for r in sel) / len(sel), 3)
                if all(r["yielded_s"] is not None for r in sel) else None,
                "took_beside_share": round(sum(bool(r["took_beside"]) for r in sel) / len(sel), 3)
                if all(r["took_beside"] is not None for r in sel) else None,
                "after_pass_s_median": round(statistics.median(r["after_pass_s"] for r in sel),
                                             4),
                "baseline_after_pass_s_median": round(statistics.median(
                    r["baseline_after_pass_s"] for r in pair), 4) if pair else None,
                "compute_vs_baseline_median": round(statistics.median(
                    r["kvf_compute_s"] / r["baseline_compute_s"] for r in pair), 3)
                if pair else None,
                "clock": clock_bin(sel)})
        lo = hi or lo
    out = {"bench": "e2e_overlap", "records": a.records, "repetitions": reps, "bins": bins,
           "label": "real (derived from the run's records)"}
    if a.json:
        out["passes"] = rows
        print(json.dumps(out))
        return 0
    print(f"{a.records}: kvfabric's prefill passes beside other requests' passes and decodes "
          f"(repetitions {reps}; from the records, real)")
    print(f"{'new tokens':>12} {'passes':>6} {'others beside':>13} {'alone':>6} {'yielded':>7} "
          f"{'beside':>6} "
          f"{'decodes beside':>14} {'turn wait p50':>13} {'after pass p50 (baseline)':>25} "
          f"{'compute / baseline p50':>22}")
    for b in bins:
        cvb = "-" if b["compute_vs_baseline_median"] is None else \
            f"{b['compute_vs_baseline_median']:.2f}x"
        bap = "-" if b["baseline_after_pass_s_median"] is None else \
            f"{b['baseline_after_pass_s_median']:.4f}"
        ap = f"{b['after_pass_s_median']:.4f} s ({bap})"
        tb = "-" if b["took_beside_share"] is None else f"{b['took_beside_share']:.0%}"
        print(f"{b['new_tokens']:>12} {b['passes']:>6} {b['passes_beside_mean']:>13.2f} "
              f"{b['alone_share']:>6.0%} "
              f"{'-' if b['yielded_share'] is None else format(b['yielded_share'], '.0%'):>7} "
              f"{tb:>6} "
              f"{b['decodes_beside_mean']:>14.2f} "
              f"{b['gpu_turn_s_median']:>12.4f}s {ap:>25} {cvb:>22}")
    clocks = [b for b in bins if b["clock"]]
    if clocks:
        print("where the passes' time went (kvfabric.passclock; medians, s; ratio: kvfabric / "
              "baseline, same request)")
        print(f"{'new tokens':>12} {'mode':>9} {'wall':>8} {'thread CPU':>10} {'process CPU':>11} "
              f"{'off CPU':>8} {'GPU span':>8}")

        def f(v, w=8):
            return f"{'-':>{w}}" if v is None else f"{v:>{w}.4f}"
        for b in clocks:
            c = b["clock"]
            for m in ("kvf", "baseline"):
                if c[m]:
                    x = c[m]
                    print(f"{b['new_tokens']:>12} {m:>9} {f(x['wall_s'])} "
                          f"{f(x['thread_cpu_s'], 10)} {f(x['process_cpu_s'], 11)} "
                          f"{f(x['off_cpu_s'])} {f(x['gpu_s'])}")
            r = c["kvf_vs_baseline"]
            print(f"{b['new_tokens']:>12} {'ratio':>9} {f(r['wall_s'])} {f(r['thread_cpu_s'], 10)} "
                  f"{'':>11} {'':>8} {f(r['gpu_s'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
