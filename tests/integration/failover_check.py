#!/usr/bin/env python3
"""Failover with load running, through the launcher (docs/membership.md): a cluster of two stores,
two kvf-sched replicas, one prefill and one decode engine and a three-member etcd, on loopback.
A load of requests runs throughout through `kvf cluster send` (the router fails over between the
replicas), each request's tokens compared with the same prompt's tokens before any fault; then:

- kill -9 the first kvf-sched replica: no request fails, the other serves them;
- kill -9 the etcd member every process asks first: nothing notices;
- kill -9 a store: its lease lapses and the live replica drops it (the time is printed; the
  check allows SLACK s beyond the TTL on a loaded machine); requests
  go on with the same tokens, and the engines' connectors reroute the dead store's keys to their
  next store, where the stores had copied every chunk read twice ("replicate_hits": 2): the
  store hit rate of the first requests after the death is at least 0.75 of what it was before
  (without replicas 0.35-0.52 of it), and stays (at least a quarter; without rerouting it fell
  to a tenth).

With --netns every process is a host of its own (a network namespace), and then:

- the last store is partitioned from every etcd member but not from its clients (blackhole routes
  in its namespace): its lease lapses and the replica drops it from placement within the TTL +
  1 s, requests go on (the engines still reach it), and once the partition heals it registers
  again and the replica learns it whole from a fresh snapshot: the index holds exactly what the
  store reports, nothing stale.

0 failed requests and 0 wrong tokens are required; the times and the store hit rates before and
after are printed.

usage: failover_check.py KVF_BIN [--netns | --netns-if-possible]
       (exit 77, skipped, where etcd is not installed or, with --netns, namespaces cannot be made;
       --netns-if-possible runs on loopback then)
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns_util import netns_possible  # noqa: E402

KVF = sys.argv[1]
TTL = 2
# The time from a death to its removal is printed; the check allows this much beyond the TTL, so
# that a loaded or sanitized machine does not fail it (speed is not what the test judges: that
# the lease, and nothing else, removes the process is)
SLACK = 6.0
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("failover_check: FAIL: " + what, flush=True)


def get_json(url):
    with urllib.request.urlopen(url, timeout=3) as r:
        return json.loads(r.read())


class Load:
    """Requests in a loop over a few prompts, each checked against its first answer."""

    def __init__(self, config, prompts):
        self.config, self.prompts = config, prompts
        self.want = {}
        self.sent = self.failed = self.wrong = 0
        self.store_tokens = []  # (time, prompt tokens, tokens loaded from a store)
        self.errors = []
        self.stop = threading.Event()
        for p in prompts:
            r = self.send(p)
            check(r is not None and r["ok"], "the first request of %r: %r" % (p, r))
            self.want[p] = r["tokens"] if r else None
        self.th = threading.Thread(target=self.run, daemon=True)

    def send(self, p):
        n, seed = p
        try:
            out = subprocess.run([KVF, "cluster", "send", "--config", self.config, "--synthetic",
                                  str(n), "--seed", str(seed), "--max-tokens", "4", "--json"],
                                 capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout) if out.stdout.strip() else {"ok": False,
                                                                     "error": out.stderr}
        except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
            return {"ok": False, "error": str(e)}

    def run(self):
        i = 0
        while not self.stop.is_set() and self.sent < 5000:
            p = self.prompts[i % len(self.prompts)]
            i += 1
            r = self.send(p)
            self.sent += 1
            if not r.get("ok"):
                self.failed += 1
                self.errors.append(r.get("error", "")[-300:])
                continue
            if r["tokens"] != self.want[p]:
                self.wrong += 1
            self.store_tokens.append((time.time(), r["prompt_tokens"], r["store_tokens"],
                                      r["ttft_s"]))

    def hit_rate(self, t0, t1, last=None, first=None):
        """The store hit rate of the requests answered in [t0, t1) (of the last `last` or the
        first `first` of them where given), and how many requests that is."""
        sel = [(n, s) for t, n, s, _ in self.store_tokens if t0 <= t < t1]
        if last:
            sel = sel[-last:]
        if first:
            sel = sel[:first]
        total = sum(n for n, _ in sel)
        return (sum(s for _, s in sel) / total if total else 0.0), len(sel)

    def answered_since(self, t0):
        return sum(1 for t, _, _, _ in self.store_tokens if t >= t0)



def stores_known(sched):
    return get_json("http://%s/v1/index/stats" % sched)["etcd"]["stores"]


def partition(store, etcd_addrs, cut):
    """Blackhole routes to every etcd member in the store's namespace (cut), or none."""
    for a in etcd_addrs:
        ip = a.split(":")[0]
        subprocess.run(["ip", "-n", store["netns"], "route", "add" if cut else "del", "blackhole",
                        ip + "/32"], check=True, capture_output=True)


def phase_partition(st, procs, live, load):
    """The last store cut off from etcd, not from its clients; then healed."""
    store = procs["store1"]
    sent0, failed0 = load.sent, load.failed
    t0 = time.time()
    partition(store, st["etcd"], True)
    dropped = None
    end = time.time() + TTL + SLACK + 4
    while time.time() < end:
        if stores_known(live) == 0:
            dropped = time.time() - t0
            break
        time.sleep(0.05)
    check(dropped is not None and dropped <= TTL + SLACK,
          "a store cut off from etcd was dropped after %r s (TTL %d)" % (dropped, TTL))
    time.sleep(2)
    snaps = get_json("http://%s/v1/index/stats" % live)["store_snapshots"]
    partition(store, st["etcd"], False)
    t1 = time.time()
    back = None
    end = time.time() + 30
    while time.time() < end:
        if stores_known(live) == 1:
            back = time.time() - t1
            break
        time.sleep(0.1)
    check(back is not None, "the store did not register again within 30 s of the partition's end")
    time.sleep(2)
    ix = get_json("http://%s/v1/index/stats" % live)
    check(ix["store_snapshots"] > snaps, "no fresh snapshot of the returning store: %r" % ix)
    check(load.sent > sent0 and load.failed == failed0,
          "requests during the partition: %d sent, %d failed" % (load.sent - sent0,
                                                                 load.failed - failed0))
    print("failover_check: a store cut off from etcd was dropped %.2f s after the cut, "
          "registered again %.2f s after it healed, and was learnt by a fresh snapshot"
          % (dropped or -1, back or -1), flush=True)


def state(run_dir):
    with open(os.path.join(run_dir, "state.json")) as f:
        return json.load(f)


def main():
    if not shutil.which("etcd"):
        print("failover_check: skipped: etcd is not installed (apt-get install etcd-server)")
        sys.exit(77)
    netns = "--netns" in sys.argv[2:]
    if netns or "--netns-if-possible" in sys.argv[2:]:
        why = netns_possible()
        if why and netns:
            print("failover_check: skipped: network namespaces cannot be made here: " + why)
            sys.exit(77)
        if why:
            print("failover_check: network namespaces cannot be made here (%s): on loopback"
                  % why, flush=True)
        netns = not why
    tmp = tempfile.mkdtemp(prefix="kvf-failover-")
    run_dir = os.path.join(tmp, "run")
    config = os.path.join(tmp, "cluster.json")
    cfg = {"name": "fons" if netns else "fo", "stores": 2, "prefill": 1, "decode": 1,
           "scheds": 2, "etcd": 3, "etcd_ttl": TTL, "store_memory": "64M", "run_dir": run_dir,
           "replicate_hits": 2}
    if netns:
        cfg["netns"] = {"subnet": "10.79.0"}
    with open(config, "w") as f:
        json.dump(cfg, f)
    up = subprocess.run([KVF, "cluster", "up", "--config", config] + (["--netns"] if netns else []),
                        capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        print(up.stdout + up.stderr)
        check(False, "kvf cluster up failed (%d)" % up.returncode)
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(1)
    try:
        st = state(run_dir)
        procs = {p["name"]: p for p in st["procs"]}
        check(len(st["scheds"]) == 2 and len(st["etcd"]) == 3, "state.json: %r" % st)
        load = Load(config, [(1400, s) for s in (11, 12, 13)])
        load.th.start()
        time.sleep(3)

        # a kvf-sched replica killed: the router goes on through the other
        os.kill(procs["sched"]["pid"], signal.SIGKILL)
        time.sleep(3)
        # the etcd member every process asks first, killed: nothing notices
        os.kill(procs["etcd0"]["pid"], signal.SIGKILL)
        time.sleep(TTL + 2)
        live = st["scheds"][1]
        ix = get_json("http://%s/v1/index/stats" % live)
        check(ix["etcd"]["stores"] == 2, "with an etcd member down: %r" % ix["etcd"])
        t_kill = time.time()
        # a store killed: dropped within the TTL + 1 s
        os.kill(procs["store0"]["pid"], signal.SIGKILL)
        dropped = None
        end = time.time() + TTL + SLACK + 4
        while time.time() < end:
            if get_json("http://%s/v1/index/stats" % live)["etcd"]["stores"] == 1:
                dropped = time.time() - t_kill
                break
            time.sleep(0.05)
        check(dropped is not None and dropped <= TTL + SLACK,
              "a killed store was dropped after %r s (TTL %d)" % (dropped, TTL))
        # each prompt asked twice more after the store left placement (bounded: a sanitized
        # build answers slowly): its first recomputes and saves what the dead store held, on
        # the next store; its second finds it there
        t_after = t_kill + TTL + 1
        end = time.time() + 120
        while time.time() < end and (time.time() < t_kill + 8 or
                                     load.answered_since(t_after) < 2 * len(load.prompts)):
            time.sleep(0.2)
        after, na = load.hit_rate(t_after, time.time(), last=len(load.prompts))
        # the requests answered first after the death, before anything was recomputed: the
        # stores replicated the prompts' chunks (read on every request) to the next store of
        # each key, where the connectors look once the dead store refuses them
        early, ne = load.hit_rate(t_kill + 0.2, time.time(), first=2 * len(load.prompts))
        if netns:
            phase_partition(st, procs, live, load)
        load.stop.set()
        load.th.join(timeout=120)
        before, nb = load.hit_rate(0, t_kill)
        print("failover_check: %d requests under faults, %d failed, %d with wrong tokens; a killed "
              "store dropped %.2f s after its death (TTL %d s); store hit rate %.3f before (%d "
              "requests), %.3f after (the last %d), %.3f at once (the first %d after the death)"
              % (load.sent, load.failed, load.wrong, dropped or -1, TTL, before, nb, after, na,
                 early, ne), flush=True)
        check(load.sent >= 10, "only %d requests ran" % load.sent)
        check(load.failed == 0, "%d request(s) failed: %r" % (load.failed, load.errors[:3]))
        check(load.wrong == 0, "%d request(s) gave other tokens" % load.wrong)
        # the dead store's keys go to their next store (the connectors reroute): the prompts
        # are saved there again and hit again, instead of missing for as long as it is down
        # without rerouting the rate fell to a tenth of what it was (0.061 of 0.643); with it,
        # all of it comes back on a fast build, and half on a sanitized one in namespaces, where
        # a request every 2 s meets the dead store's probes (every 5 s, each a miss)
        check(na >= len(load.prompts) and after >= 0.25 * before,
              "store hit rate %.3f after the store's death (%d requests), %.3f before"
              % (after, na, before))
        # and at once: the prompts' chunks, read on every request, had replicas on the next
        # store of each key (kvf-store --replicate-hits); without them the first requests after
        # the death recomputed what the dead store held (0.22-0.34 of 0.64 measured)
        check(ne >= len(load.prompts) and early >= 0.75 * before,
              "store hit rate %.3f at once after the store's death (the first %d requests), "
              "%.3f before: the replicas were not found" % (early, ne, before))
    finally:
        subprocess.run([KVF, "cluster", "down", "--config", config], capture_output=True,
                       timeout=120)
        if failures:  # what the processes said, before their folder goes
            for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
                if name.endswith(".log") and not name.startswith("etcd"):
                    with open(os.path.join(run_dir, name), errors="replace") as f:
                        tail = f.readlines()[-25:]
                    print("---- %s\n%s" % (name, "".join(tail)), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        print("failover_check: %d failure(s)" % len(failures))
        sys.exit(1)
    print("failover_check: ok")


main()
