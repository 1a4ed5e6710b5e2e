#!/usr/bin/env python3
"""Checks the e2e verdict on records made for it (`kvf-bench e2e --report DIR`): records where
kvfabric wins at every percentile pass; records whose tails regress (p99 alone, then p90 and p99)
fail with exit status 3 under --require-targets and name the target missed; records slower only at
the lowest percentiles pass, the line percentile by percentile naming where; records with a failed
request or differing tokens exit 1; malformed records are refused with a message naming the record.

usage: e2e_verdict_check.py KVF_BENCH
"""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_util import fail  # noqa: E402

N, REPS = 100, 3


def base_ttft(i):
    # A spread of TTFTs, 0.5 s to 5 s, in an order unrelated to the request index.
    return 0.5 + ((i * 37) % N) * 0.045


def records(kvf_ttft, edit=None):
    out = []
    for rep in range(1, REPS + 1):
        for mode in ("kvf", "baseline"):
            for i in range(N):
                t = kvf_ttft(i, rep) if mode == "kvf" else base_ttft(i)
                arrival = i * 0.05
                r = {"mode": mode, "repetition": rep, "request": i, "arrival_s": arrival,
                     "prompt_tokens": 1000 + i, "output_tokens": 8, "colocated": mode != "kvf",
                     "device_tokens": 0, "store_tokens": 512 if mode == "kvf" else 0,
                     "ttft_s": t, "e2e_s": t + 0.1, "itl_mean_s": 0.01, "generated": 8,
                     "tokens_xxh64": "%016x" % (0x1234567 + i), "rejected": False, "error": "",
                     "label": "real"}
                if edit:
                    edit(r)
                out.append(r)
    return out


def judge(bench, recs, *extra, raw=None):
    d = tempfile.mkdtemp(prefix="kvf_verdict_")
    try:
        with open(os.path.join(d, "records.json"), "w") as f:
            f.write(raw if raw is not None else json.dumps(recs))
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump({"engines": 4, "baseline_routing": "prefix", "slo_ttft_ms": 2000}, f)
        p = subprocess.run([bench, "e2e", "--report", d, "--json"] + list(extra),
                           capture_output=True, text=True, timeout=60)
        res = None
        lines = p.stdout.strip().splitlines()
        if lines and lines[-1].startswith("{"):
            res = json.loads(lines[-1])
        return p, res
    finally:
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


def met(res):
    return {k: v["met"] for k, v in res["targets"].items()}


def main():
    bench = sys.argv[1]
    # 1. kvfabric 0.4x at every request: every target met, exit 0 with or without the flag.
    good = records(lambda i, rep: 0.4 * base_ttft(i))
    for extra in ([], ["--require-targets"]):
        p, res = judge(bench, good, *extra)
        if p.returncode != 0 or not res or not res["targets_met"]:
            fail("good records %s: exit %d, %s" % (extra, p.returncode, p.stdout[-1500:]))
    if not all(met(res).values()) or res["tokens_differ"] or res["tokens_compared"] != N:
        fail("good records: %r" % res)
    if "all targets met: yes" not in p.stdout:
        fail("good records: no verdict line: %s" % p.stdout[-1500:])
    if res["ttft_by_percentile"]["slower_at"] or "not slower at any" not in p.stdout:
        fail("good records: slower somewhere? %r" % res["ttft_by_percentile"])

    # 2. The median wins, the two slowest requests (2% > the 1% p99 quantile) regress 3x: p50
    #    and p90 met, p99 not; exit 3 only under --require-targets.
    slow = sorted(range(N), key=base_ttft)[-2:]

    def tail(i, rep):
        return 3.0 * base_ttft(i) if i in slow else 0.4 * base_ttft(i)
    p, res = judge(bench, records(tail))
    if p.returncode != 0 or res["targets_met"]:
        fail("p99 regressed, no flag: exit %d, %r" % (p.returncode, res and res["targets"]))
    p, res = judge(bench, records(tail), "--require-targets")
    m = met(res) if res else {}
    if p.returncode != 3 or m.get("ttft_p99_ratio") is not False or not m.get("ttft_p50_ratio") \
            or not m.get("ttft_p90_ratio"):
        fail("p99 regressed: exit %d, met %r\n%s" % (p.returncode, m, p.stdout[-1500:]))
    if "TTFT p99" not in p.stdout or "NOT met" not in p.stdout:
        fail("p99 regressed: the verdict does not say so: %s" % p.stdout[-1500:])
    if res["ttft_by_percentile"]["slower_at"] != [99] or \
            res["ttft_by_percentile"]["slower_ranges"] != "p99" or \
            "slower at p99 (1 of 99" not in p.stdout:
        fail("p99 regressed: percentile by percentile %r" % res["ttft_by_percentile"])
    # two requests of a hundred, in each repetition: not beyond the requests' sampling noise
    if res["ttft_by_percentile"]["beyond_noise_at"] != [] or \
            "within the requests' sampling noise at all of them" not in p.stdout:
        fail("p99 regressed by two requests: beyond noise? %r" % res["ttft_by_percentile"])

    # 3. The slowest 15% regress 1.5x: p90 and p99 missed, p50 met.
    slow15 = set(sorted(range(N), key=base_ttft)[-15:])
    p, res = judge(bench, records(lambda i, rep: 1.5 * base_ttft(i) if i in slow15
                                  else 0.3 * base_ttft(i)), "--require-targets")
    m = met(res) if res else {}
    if p.returncode != 3 or m.get("ttft_p90_ratio") is not False or \
            m.get("ttft_p99_ratio") is not False or not m.get("ttft_p50_ratio"):
        fail("p90/p99 regressed: exit %d, met %r" % (p.returncode, m))

    # 4. Regressed in one repetition only: the verdict is on the median of the repetitions.
    p, res = judge(bench, records(lambda i, rep: tail(i, rep) if rep == 2 else 0.4 * base_ttft(i)),
                   "--require-targets")
    if p.returncode != 0 or res["targets"]["ttft_p99_ratio"]["met_in_repetitions"] != 2:
        fail("one repetition regressed: exit %d, %r" % (p.returncode, res and res["targets"]))

    # 5. The fastest requests slower (kvfabric never under 0.8 s), the rest 0.4x: every target
    #    the verdict judges is met, and the line percentile by percentile names where the curves
    #    cross, as the report's own quantile finds it on the pooled repetitions.
    def floor(i, rep):
        return max(0.8, 0.4 * base_ttft(i))
    p, res = judge(bench, records(floor), "--require-targets")
    pooled = {m: sorted(f(i, rep) for rep in range(1, REPS + 1) for i in range(N))
              for m, f in (("kvf", floor), ("baseline", lambda i, rep: base_ttft(i)))}

    def q(v, x):
        return v[min(len(v) - 1, int(x * (len(v) - 1) + 0.5))]
    ratios = [q(pooled["kvf"], pc / 100) / q(pooled["baseline"], pc / 100) for pc in range(1, 100)]
    want = [pc for pc in range(1, 100) if ratios[pc - 1] > 1]
    got = res and res["ttft_by_percentile"]
    if p.returncode != 0 or not want or got["slower_at"] != want or \
            abs(got["worst_ratio"] - max(ratios)) > 1e-4 or \
            got["slower_ranges"] != "p%d-p%d" % (want[0], want[-1]) or \
            "slower at p%d-p%d" % (want[0], want[-1]) not in p.stdout:
        fail("low percentiles slower: exit %d, want %r, got %r\n%s" % (p.returncode, want, got,
                                                                       p.stdout[-800:]))
    # kvfabric 1.47x at p1, the curves crossing at the last of them: the lowest percentiles
    # beyond the requests' sampling noise (a seeded bootstrap), the crossing itself not
    beyond = got["beyond_noise_at"]
    if not beyond or beyond[0] != 1 or not set(beyond) < set(want) or want[-1] in beyond or \
            got["resamples"] != 1000 or \
            "of 1000 resamples of them) at p1" \
            not in p.stdout:
        fail("low percentiles slower: beyond noise %r of %r\n%s" % (beyond, want,
                                                                   p.stdout[-800:]))

    # 6. A failed request, or tokens that differ between runs: exit 1 whatever the verdict.
    def failed(r):
        if r["mode"] == "kvf" and r["repetition"] == 1 and r["request"] == 7:
            r["error"] = "engine 127.0.0.1:1: connection refused"

    def differs(r):
        if r["mode"] == "baseline" and r["repetition"] == 3 and r["request"] == 9:
            r["tokens_xxh64"] = "%016x" % 42
    for edit, what in ((failed, "a failed request"), (differs, "differing tokens")):
        p, res = judge(bench, records(lambda i, rep: 0.4 * base_ttft(i), edit))
        if p.returncode != 1:
            fail("%s: exit %d" % (what, p.returncode))
    if res["tokens_differ"] != 1:
        fail("differing tokens: %r" % res)

    # 7. Malformed records: exit 1, the record and the key named; nothing crashes.
    good_text = json.dumps(good)
    bad = [
        ("not json", "{\"mode\": ", "records.json"),
        ("an object", "{}", "array"),
        ("empty", "[]", "array"),
        ("no ttft", json.dumps([{k: v for k, v in good[0].items() if k != "ttft_s"}]),
         "\"ttft_s\""),
        ("negative ttft", good_text.replace("\"ttft_s\": 0.2", "\"ttft_s\": -1", 1), "ttft_s"),
        ("bad mode", good_text.replace("\"mode\": \"kvf\"", "\"mode\": \"kfv\"", 1), "mode"),
        ("bad hash", good_text.replace("\"tokens_xxh64\": \"", "\"tokens_xxh64\": \"zz", 1),
         "tokens_xxh64"),
        ("a request twice", json.dumps(good + good[:1]), "twice"),
        ("a request missing", json.dumps(good[1:]), "no record of request 0"),
        ("huge index", json.dumps(good[:1] + [dict(good[1], request=10 ** 12)]), "request"),
    ]
    for what, text, says in bad:
        p, _ = judge(bench, None, raw=text)
        if p.returncode != 1 or says not in p.stderr or "Sanitizer" in p.stderr:
            fail("%s: exit %d, stderr %r" % (what, p.returncode, p.stderr[-600:]))
    p = subprocess.run([bench, "e2e", "--report"], capture_output=True, text=True, timeout=30)
    if p.returncode != 2:
        fail("--report without a folder: exit %d" % p.returncode)
    print("e2e_verdict_check: ok (targets met; p99 regressed -> exit 3; p90 and p99 regressed; "
          "one repetition regressed; low percentiles slower, named; failures and differing tokens -> exit 1; %d malformed "
          "records refused)" % len(bad))


if __name__ == "__main__":
    main()
