#!/usr/bin/env python3
"""A tiny kvfabric cluster end to end: `kvf cluster up` (1 store, kvf-sched, 1 prefill and 1 decode
engine), a dozen trace requests through `kvf-bench e2e` with kvfabric and with the baseline (the
same engines with their own prefix cache and no store), alternately for two repetitions (the
generated tokens must be identical request by request in every run, the cache layer must have
served part of the prompts, and the baseline must have used no store), one request twice through
`kvf cluster send` (the launcher's router: the second served from the cache), the engine's
"reuse": "engine" mode (its own pages, never a store), the engine's HTTP API on bad input, `kvf
cluster status`, and `kvf cluster down` leaving no process behind. With --netns the same runs with every process in a
network namespace of its own; where namespaces cannot be made the test says why and is skipped
(exit 77).

usage: cluster_check.py KVF KVF_BENCH TRACE [--netns]
"""
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netns_util import netns_possible  # noqa: E402
import check_util as cu  # noqa: E402
from check_util import alive, fail, run  # noqa: E402

SKIP = 77


TOKEN = [None]  # the cluster's token, once it is up: engines and kvf-sched require it


def http(method, url, body=None, auth=True):
    return cu.http(method, url, body, TOKEN[0] if auth else None)


def main():
    kvf, bench, trace = sys.argv[1], sys.argv[2], sys.argv[3]
    netns = "--netns" in sys.argv[4:]
    if netns:
        why = netns_possible()
        if why:
            print("cluster_check: SKIP: cannot create network namespaces here: %s" % why)
            sys.exit(SKIP)
    with tempfile.TemporaryDirectory() as d:
        name = "ct%d" % (os.getpid() % 100000)
        cfg = {"name": name, "stores": 1, "prefill": 1, "decode": 1, "store_memory": "128M",
               "engine_max_tokens": 4096, "run_dir": os.path.join(d, "run"),
               "netns": {"subnet": "10.79.%d" % (os.getpid() % 200 + 20), "rate": "1gbit"}}
        config = os.path.join(d, "cluster.json")
        with open(config, "w") as f:
            json.dump(cfg, f)

        # kvf auth: tenants and credentials as an operator makes and rotates them.
        if not netns:
            tf, c1, c2 = (os.path.join(d, f) for f in ("t", "a.cred", "a2.cred"))
            run([kvf, "auth", "new", "acme", "--tenants", tf, "--out", c1, "--bytes", "1G"], 30)
            run([kvf, "auth", "new", "acme", "--tenants", tf, "--out", c2], 30, expect=1)
            run([kvf, "auth", "rotate", "--tenants", tf, "--credential", c1, "--out", c2], 30)
            keys = run([kvf, "auth", "list", "--tenants", tf], 30).stdout.split("\n")
            keys = [k.split() for k in keys if k.strip()]
            if len(keys) != 2 or any(k[0] != "acme" or k[1] != "tenant" or
                                     "bytes=1073741824" not in k for k in keys):
                fail("kvf auth list after rotate: %r" % keys)
            for f in (tf, c1, c2):
                if os.stat(f).st_mode & 0o077:
                    fail("%s is readable by others" % f)
            run([kvf, "auth", "revoke", "acme", "--tenants", tf, "--key", keys[0][2][:12]], 30)
            left = run([kvf, "auth", "list", "--tenants", tf], 30).stdout.split()
            if keys[0][2] in left or keys[1][2] not in left:
                fail("kvf auth revoke --key removed the wrong key: %r" % left)
            curve = run([kvf, "auth", "curve", "--credential", c1], 30).stdout.strip()
            if len(curve) != 64 or int(curve, 16) < 0:
                fail("kvf auth curve: %r" % curve)
            run([kvf, "auth", "new", "bad/name", "--tenants", tf, "--out", c1 + "x"], 30,
                expect=2)

        # Configuration errors are refused with the field named, and start nothing.
        bad = os.path.join(d, "bad.json")
        with open(bad, "w") as f:
            json.dump({"name": "x", "stores": 0}, f)
        p = run([kvf, "cluster", "up", "--config", bad], 30, expect=2)
        if "stores" not in p.stderr:
            fail("a bad config must name the field: %r" % p.stderr)
        # Strict: a typo is an error naming the file, the key and what was meant, not a default.
        for body, want in (({"name": "x", "stroes": 3}, 'unknown key "stroes" (did you mean "stores"'),
                           ({"name": "x", "netns": {"dealy_ms": 1}}, 'netns: unknown key "dealy_ms"'),
                           ({"name": "x", "store_memory": "lots"}, '"store_memory" must be a size'),
                           ({"name": "x", "stores": "3"}, '"stores" must be an integer')):
            with open(bad, "w") as f:
                json.dump(body, f)
            p = run([kvf, "cluster", "up", "--config", bad], 30, expect=2)
            if want not in p.stderr or bad not in p.stderr:
                fail("config %r: expected %r and the file named, got %r" % (body, want, p.stderr))

        up = [kvf, "cluster", "up", "--config", config] + (["--netns"] if netns else [])

        # Ctrl-C while up is still starting things: what it started is stopped, nothing stays.
        pr = subprocess.Popen(up, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started = []
        deadline = time.time() + 60
        for line in pr.stdout:
            if " pid " in line:
                started.append(int(line.split(" pid ")[1].split()[0]))
                if line.strip().startswith("store0"):
                    pr.send_signal(2)
                    break
            if time.time() > deadline:
                break
        out, err = pr.communicate(timeout=60)
        if pr.returncode != 130 or "interrupted" not in err or not started:
            fail("Ctrl-C during up: exit %d, started %r, stderr %r" % (pr.returncode, started, err))
        deadline = time.time() + 10
        while any(alive(x) for x in started) and time.time() < deadline:
            time.sleep(0.1)
        if any(alive(x) for x in started):
            fail("Ctrl-C during up left processes: %r" % started)
        if os.path.exists(os.path.join(cfg["run_dir"], "state.json")):
            fail("Ctrl-C during up left a state file")
        if netns and ("kvf-%s-" % name) in subprocess.run(["ip", "netns", "list"],
                                                         capture_output=True, text=True).stdout:
            fail("Ctrl-C during up left network namespaces")
        run(up, 120)
        try:
            with open(os.path.join(cfg["run_dir"], "state.json")) as f:
                state = json.load(f)
            pids = [pr["pid"] for pr in state["procs"]]
            if len(pids) != 4 or not all(alive(x) for x in pids):
                fail("kvf cluster up: expected 4 live processes, state %r" % state["procs"])
            # A second up of the same cluster is refused.
            run(up, 30, expect=1)
            st = json.loads(run([kvf, "cluster", "status", "--config", config, "--json"], 30).stdout)
            if not st["up"] or len(st["procs"]) != 4:
                fail("kvf cluster status: %r" % st)

            # A dozen requests, with kvfabric and with the baseline, twice each, alternately;
            # tokens compared by the bench.
            reps = 2
            p = run([bench, "e2e", "--config", config, "--trace", trace, "--max-requests", "12",
                     "--time-scale", "4", "--max-input", "1024", "--max-output", "16",
                     "--repetitions", str(reps), "--out", os.path.join(d, "e2e"), "--json"], 300,
                    expect=None)
            if p.returncode != 0:
                fail("kvf-bench e2e exit %d\n%s\n%s" % (p.returncode, p.stdout[-3000:],
                                                       p.stderr[-3000:]))
            res = json.loads(p.stdout.strip().splitlines()[-1])
            kv, bl = res["summary"]["kvf"], res["summary"]["baseline"]
            if res.get("gpu_share") != "timeslice" or "through MPS" in p.stdout:
                fail("the run does not say its engines share no GPU through MPS: %r"
                     % res.get("gpu_share"))
            if res["tokens_compared"] != 12 or res["tokens_differ"] != 0:
                fail("generated tokens: %d compared, %d differ" % (res["tokens_compared"],
                                                                   res["tokens_differ"]))
            if res["repetitions"] != reps or kv["repetitions"] != reps or \
                    bl["repetitions"] != reps or len(kv["ttft_p50_s_rounds"]) != reps or \
                    len(res["ttft_p50_ratio_rounds"]) != reps:
                fail("want %d repetitions of each mode: %r" % (reps, res))
            if kv["completed"] != 12 * reps or bl["completed"] != 12 * reps or \
                    kv["first_token_mismatches"]:
                fail("requests: %r / %r" % (kv, bl))
            if kv["hit_rate_device"] + kv["hit_rate_store"] <= 0 or kv["bytes_loaded"] <= 0:
                fail("the cache layer served nothing: %r" % kv)
            # The baseline reuses its engines' own pages (device hits are legitimate) but no
            # store: nothing loaded from or saved to one, in the summary and in every record.
            if bl["hit_rate_store"] != 0 or max(bl["hit_rate_store_rounds"]) != 0 or \
                    bl["bytes_loaded"] or bl["bytes_saved"] or \
                    not bl["transport"].startswith("none") or bl["reuse"] != "engine":
                fail("the baseline used a store: %r" % bl)
            for k in ("ttft_p50_ratio", "ttft_p90_ratio", "ttft_p99_ratio",
                      "requests_per_s_ratio"):
                t = res["targets"][k]
                if t["repetitions"] != reps or t["met"] != (
                        t["median"] <= float(t["target"][3:]) if t["target"].startswith("<=")
                        else t["median"] >= float(t["target"][3:])):
                    fail("target %s judged wrongly: %r" % (k, t))
            for k in ("records.csv", "records.json", "summary.json"):
                if not os.path.getsize(os.path.join(d, "e2e", k)):
                    fail("%s is empty" % k)
            with open(os.path.join(d, "e2e", "records.csv")) as f:
                if len(f.read().strip().splitlines()) != 1 + 12 * 2 * reps:
                    fail("records.csv: want a header and %d records" % (12 * 2 * reps))
            with open(os.path.join(d, "e2e", "records.json")) as f:
                recs = json.load(f)
            order = [(r["mode"], r["repetition"]) for r in recs[::12]]
            if order != [(m, i) for i in range(1, reps + 1) for m in ("kvf", "baseline")]:
                fail("runs not alternating kvf, baseline: %r" % order)
            if any(r["store_tokens"] for r in recs if r["mode"] == "baseline"):
                fail("a baseline request loaded from a store")

            # One request through the launcher's router, twice: served, then served from the cache,
            # with the same tokens.
            send = [kvf, "cluster", "send", "--config", config, "--synthetic", "700", "--seed", "9",
                    "--max-tokens", "4", "--json"]
            first = json.loads(run(send, 120).stdout)
            again = json.loads(run(send, 120).stdout)
            if not first["ok"] or len(first["tokens"]) != 4 or not first["prefill"]:
                fail("kvf cluster send: %r" % first)
            if again["tokens"] != first["tokens"] or \
                    again["device_tokens"] + again["store_tokens"] <= 0:
                fail("kvf cluster send again: %r after %r" % (again, first))

            # kvf-sched heard the store's chunk events and the engines' KV events.
            got, ix = http("GET", "http://%s/v1/index/stats" % state["sched"])
            if got != 200 or ix["subscriptions"] != 3 or ix["chunks"] <= 0 or \
                    ix["blocks_stored"] <= 0 or ix["malformed"] or ix["sequence_gaps"]:
                fail("kvf-sched's event ingestion: %d %r" % (got, ix))
            # The engines' load reports listed the tickets of the requests kvf-sched placed on
            # them (the router passed each plan's ticket on), so its load figures count each once.
            tk = ix.get("placement_tickets", {})
            if tk.get("acked", 0) <= 0:
                fail("no engine listed a placement's ticket in its load reports: %r" % tk)
            # and learnt the store whole at first contact, over CURVE as an admin (its snapshot)
            if ix.get("store_snapshots", 0) < 1 or ix.get("store_snapshot_failures", 1) != 0:
                fail("kvf-sched took no snapshot of the store: %r" % ix)

            # kvf-sched's state changes only with the cluster's token (its file readable by its
            # owner only); the engines and kvf cluster send above used it.
            tok = os.path.join(cfg["run_dir"], "sched.tokens")
            if os.stat(tok).st_mode & 0o077:
                fail("%s is readable by others" % tok)
            got, err = http("POST", "http://%s/v1/place" % state["sched"],
                            {"tokens": [1, 2, 3], "output_tokens": 1}, auth=False)
            if got != 401:
                fail("kvf-sched answered an unauthenticated placement with %d %r" % (got, err))
            # The engines take the same token (their HTTP API, as kvf-sched's).
            eng0 = next(pr for pr in state["procs"] if pr["kind"] == "prefill")["addr"]
            got, err = http("POST", "http://%s/v1/generate" % eng0, {"tokens": [1, 2]},
                            auth=False)
            if got != 401:
                fail("an engine answered an unauthenticated request with %d %r" % (got, err))
            with open(tok) as f:
                TOKEN[0] = next(ln.split()[1] for ln in f if ln.strip() and ln[0] != "#")

            # The stores authenticate every client (kvf cluster up made their tenants file and
            # the credentials, owner-only): without one nothing is served; the cluster's tenant
            # sees its own counters, the admin the node's.
            st0 = next(pr for pr in state["procs"] if pr["kind"] == "store")["addr"]
            for f in ("store.tenants", "cluster.cred", "admin.cred"):
                if os.stat(os.path.join(cfg["run_dir"], f)).st_mode & 0o077:
                    fail("%s is readable by others" % f)
            env = dict(os.environ)
            env.pop("KVF_CREDENTIAL", None)
            anon = subprocess.run([kvf, "stats", "--node", st0, "--json"], env=env,
                                  capture_output=True, text=True, timeout=30)
            if anon.returncode == 0 or "permission denied" not in anon.stderr:
                fail("a store served an unauthenticated client: %r" % anon)
            for who, key in (("cluster", "tenant"), ("admin", "auth")):
                env["KVF_CREDENTIAL"] = os.path.join(cfg["run_dir"], who + ".cred")
                p = subprocess.run([kvf, "stats", "--node", st0, "--json"], env=env,
                                   capture_output=True, text=True, timeout=30)
                if p.returncode != 0 or key not in json.loads(p.stdout.strip().splitlines()[-1]):
                    fail("kvf stats as %s: %r" % (who, p))

            # "reuse": "engine": the engine's own pages serve a prompt that starts with its last
            # one, and no store is asked, loaded from or saved to.
            eng = next(pr for pr in state["procs"] if pr["kind"] == "prefill")["addr"]
            base = "http://" + eng
            # (The first prefill also waits for any save still in flight, before the counters are
            # read.)
            prompt = [(i * 7919 + 13) % 500 for i in range(300)]
            replies = [http("POST", base + "/v1/generate",
                            {"tokens": prompt[:200], "max_tokens": 2, "reuse": "engine"})]
            _, h0 = http("GET", base + "/v1/health")
            replies.append(http("POST", base + "/v1/generate",
                                {"tokens": prompt, "max_tokens": 2, "reuse": "engine"}))
            _, h1 = http("GET", base + "/v1/health")
            if any(got != 200 for got, _ in replies) or replies[1][1]["device_tokens"] != 192 or \
                    any(rep["loaded_tokens"] or rep["saved_tokens"] for _, rep in replies):
                fail("reuse engine: %r" % replies)
            if h1["connector"] != h0["connector"]:
                fail("reuse engine used the stores: %r then %r" % (h0, h1))
            got, rep = http("POST", base + "/v1/generate", {"tokens": [1, 2], "reuse": "stores"})
            if got != 400 or "reuse" not in rep.get("error", ""):
                fail("reuse \"stores\" gave %d %r, wanted 400" % (got, rep))

            # The engine's API on bad input: clear errors, and it keeps serving.
            for body, code in ((b"{not json", 400), ({"tokens": []}, 400),
                               ({"tokens": [1, -2]}, 400), ({"tokens": [1] * 5000}, 413),
                               ({"tokens": [1, 2], "max_tokens": "x"}, 400)):
                got, rep = http("POST", base + "/v1/generate", body)
                if got != code or "error" not in (rep or {}):
                    fail("engine: %r gave %d %r, wanted %d with an error" % (body, got, rep, code))
            got, _ = http("POST", base + "/v1/nothing", {"tokens": [1]})
            if got != 404:
                fail("engine: unknown path gave %d" % got)
            got, rep = http("POST", base + "/v1/generate", {"tokens": list(range(100)),
                                                            "max_tokens": 3})
            if got != 200 or len(rep["tokens"]) != 3:
                fail("engine after bad input: %d %r" % (got, rep))
            got, h = http("GET", base + "/v1/health")
            if got != 200 or h["failures"] != 0:
                fail("engine health: %d %r" % (got, h))
        finally:
            p = run([kvf, "cluster", "down", "--config", config], 60)
        deadline = time.time() + 10
        while any(alive(x) for x in pids) and time.time() < deadline:
            time.sleep(0.1)
        if any(alive(x) for x in pids):
            fail("kvf cluster down left processes: %r" % [x for x in pids if alive(x)])
        if os.path.exists(os.path.join(cfg["run_dir"], "state.json")):
            fail("kvf cluster down left its state file")
        if netns:
            ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            if ("kvf-%s-" % name) in ns:
                fail("kvf cluster down left namespaces: %s" % ns)
        run([kvf, "cluster", "status", "--config", config], 30, expect=3)
        run([kvf, "cluster", "send", "--config", config, "--synthetic", "10"], 30, expect=3)
    print("cluster_check: OK (%s): 12 requests, identical tokens, cache hit %.1f%% device + "
          "%.1f%% store" % ("network namespaces" if netns else "loopback",
                            kv["hit_rate_device"] * 100, kv["hit_rate_store"] * 100))


if __name__ == "__main__":
    main()
