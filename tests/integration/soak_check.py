#!/usr/bin/env python3
"""Runs `kvf-bench soak` briefly and checks what it claims: every object read back verified, none
resurrected after eviction, no errors, store RSS bounded, a timeline with both phases, ballast that
grew to its cap and no further; and that bad options are refused with a message and exit 2.

usage: soak_check.py KVF_BENCH [RSS_SLACK [RSS_GROWTH [DURATION]]]

RSS_SLACK (default 64M) and RSS_GROWTH (default 32M) are passed to --rss-slack and --rss-growth: a
ThreadSanitizer build maps shadow memory for every arena byte the store touches (about four times
the arena) as the churn first reaches it, which is not the store's own. DURATION (default 5) is
the first soak's length in seconds: a ThreadSanitizer build on a loaded host wants longer for its
ballast to grow.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_util import fail  # noqa: E402


def main():
    bench = sys.argv[1]
    slack = sys.argv[2] if len(sys.argv) > 2 else "64M"
    slack_mib = int(slack.rstrip("M"))
    growth = sys.argv[3] if len(sys.argv) > 3 else "32M"
    duration = sys.argv[4] if len(sys.argv) > 4 else "5"
    for bad in (["--target-pressure", "2"], ["--memory", "8M"], ["--object", "1.5M"],
                ["--duration", "1"], ["--no-such-option"]):
        p = subprocess.run([bench, "soak"] + bad, capture_output=True, text=True, timeout=30)
        if p.returncode != 2 or "kvf-bench soak:" not in p.stderr:
            fail("options %s: exit %d, stderr %r" % (bad, p.returncode, p.stderr))
    cmd = [bench, "soak", "--duration", duration, "--target-pressure", "0.95", "--memory", "64M",
           "--object", "256K", "--batch", "8", "--ballast-max", "128M", "--rss-slack", slack,
           "--rss-growth", growth, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    sys.stdout.write(p.stdout[-3000:])
    if p.returncode != 0:
        fail("exit %d: %s" % (p.returncode, p.stderr[-2000:]))
    res = json.loads(p.stdout.strip().splitlines()[-1])
    s = res["summary"]
    if res["label"] != "real" or not s["ok"]:
        fail("summary not ok: %r" % s)
    if s["verified"] <= 0 or s["checksum_mismatches"] or s["resurrected"] or s["errors"]:
        fail("verification: %r" % s)
    if s["misses"] <= 0:
        fail("the window is twice the arena, so the store must have evicted something: %r" % s)
    if (not s["rss_bounded"] or s["store_rss_idle_mib"] < s["arena_mib"]
            or s["store_rss_max_mib"] > s["store_rss_idle_mib"] + slack_mib):
        fail("store RSS: %r" % s)
    # The ballast grows (64 MiB pieces; how fast depends on the build and the machine), never past
    # its cap, and the cap keeps the pressure well short of 0.95.
    if not 0 < s["ballast_max_mib"] <= 128 or s["ballast_max_mib"] % 64 or s["target_reached"]:
        fail("ballast must grow, in 64 MiB pieces, and stop by --ballast-max 128M: %r" % s)
    tl = res["timeline"]
    phases = {x["phase"] for x in tl}
    if len(tl) < 3 or phases != {"rest", "pressure"}:
        fail("timeline: %d samples, phases %r" % (len(tl), phases))
    if any(x["ballast_mib"] > 0 for x in tl if x["phase"] == "rest"):
        fail("ballast during the rest phase")
    if any(x["pressure"] < 0 or x["pressure"] > 1 for x in tl):
        fail("pressure out of 0..1")
    if res["auth"]["on"]:
        fail("a soak without --auth says it authenticated: %r" % res["auth"])

    # With authentication on, a second tenant works under the churn's very keys throughout: each
    # reads only its own bytes.
    cmd = [bench, "soak", "--auth", "--duration", "3", "--target-pressure", "0.95", "--memory",
           "64M", "--object", "256K", "--batch", "8", "--ballast-max", "64M", "--rss-slack", slack,
           "--rss-growth", growth, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        fail("--auth: exit %d: %s" % (p.returncode, p.stderr[-2000:]))
    ra = json.loads(p.stdout.strip().splitlines()[-1])
    sa, au = ra["summary"], ra["auth"]
    if not sa["ok"] or sa["checksum_mismatches"] or sa["resurrected"] or sa["verified"] <= 0:
        fail("--auth: the churn's verification: %r" % sa)
    if not au["on"] or au["rival_mismatches"] or au["rival_errors"] or \
            au["rival_verified"] <= 0 or au["rival_puts"] <= 0:
        fail("--auth: the rival tenant: %r" % au)
    print("soak_check: ok (%d objects verified, %d misses, ballast %d MiB; with --auth %d and "
          "the rival's %d)" % (s["verified"], s["misses"], s["ballast_max_mib"], sa["verified"],
                               au["rival_verified"]))


if __name__ == "__main__":
    main()
