#!/usr/bin/env python3
"""Engines the launcher does not start, through `kvf cluster up`: a stand-in for a vLLM engine (one
stream of KV events in vLLM's format, its own block hashes, a replay socket) named in the cluster
file's "external_engines", with kvf-sched's index in two shards. The launcher starts a kvf-relay
before it and tells both replicas of it; each replica then knows the engine holds exactly the
sequences of its shard, those published before the cluster was up (the relay asks the engine's
replay socket) and after. `kvf cluster status` shows the relay, `kvf cluster down` stops it, and
bad entries are refused with the field named. With etcd installed, once more with a one-member
etcd in the cluster file: the relay registers the engine in etcd itself (no external.json), and
once the relay is killed the replicas drop the engine within its lease.

usage: cluster_relay_check.py KVF   (PYTHONPATH and KVF_LIBRARY name the Python package and libkvf)
"""
import json
import os
import shutil
import sys
import tempfile
import time

import kvfabric as kvf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_util import alive, fail, http, run  # noqa: E402


SEQS, BLOCKS, BT = 12, 4, 16


def tokens_of(j):
    return [1000 * (j + 1) + i for i in range(BLOCKS * BT)]


def publish(ev, j):
    # the engine's own hashes, unrelated to kvfabric's chain (vLLM's are its own)
    h = [0x9E3779B97F4A7C15 * (BLOCKS * j + b + 1) % (1 << 63) for b in range(BLOCKS)]
    ev.publish(stored=h, tokens=tokens_of(j), block_tokens=BT)


def check_up(kvf_bin, cfg, config, shards):
    """Up with the external engine and kvf-sched's index in `shards` shards (one replica each): a
    fresh engine stream, its first two sequences published before the cluster is up. With "etcd"
    in cfg the relay registers the engine there (no external.json), and once the relay is killed
    the replicas drop the engine within the lease."""
    ev = kvf.Events("127.0.0.1:0", replay="127.0.0.1:0")
    cfg["external_engines"] = [dict(cfg["external_engines"][0], events=ev.endpoint,
                                    replay=ev.replay_endpoint)]
    shard = [kvf.shard_of(kvf.hash_blocks(tokens_of(j), BT)[0], shards) for j in range(SEQS)]
    with open(config, "w") as f:
        json.dump(cfg, f)
    for j in range(2):  # before the cluster: the relay asks the engine's replay socket
        publish(ev, j)
    ext = os.path.join(cfg["run_dir"], "external.json")
    if os.path.exists(ext):  # an earlier run's, in the same run directory
        os.remove(ext)
    run([kvf_bin, "cluster", "up", "--config", config], 180)
    pids = []
    try:
        with open(os.path.join(cfg["run_dir"], "state.json")) as f:
            state = json.load(f)
        pids = [pr["pid"] for pr in state["procs"]]
        relays = [pr for pr in state["procs"] if pr["kind"] == "relay"]
        scheds = [pr["addr"] for pr in state["procs"] if pr["kind"] == "sched"]
        if len(relays) != 1 or len(scheds) != shards:
            fail("expected one relay and %d kvf-sched replica(s): %r" % (shards, state["procs"]))
        with open(os.path.join(cfg["run_dir"], "sched.tokens")) as f:
            token = next(ln.split()[1] for ln in f if ln.strip() and ln[0] != "#")
        for j in range(2, SEQS):
            publish(ev, j)
        # Each replica: the engine holds the sequences of its shard, and none of the others'.
        # Replica r serves shard r (the launcher starts them shard by shard).
        want = [[j for j in range(SEQS) if shard[j] == r] for r in range(shards)]
        got = None
        deadline = time.time() + 30
        while time.time() < deadline:
            got = [[] for _ in range(shards)]
            for r in range(shards):
                for j in range(SEQS):
                    st, rep = http("POST", "http://%s/v1/lookup" % scheds[r],
                                   {"tokens": tokens_of(j), "output_tokens": 1}, token)
                    if st != 200:
                        fail("lookup: %d %r" % (st, rep))
                    if any(i["id"] == "vllm0" and i["tokens"] == BLOCKS * BT
                           for i in rep["instances"]):
                        got[r].append(j)
            if got == want:
                break
            time.sleep(0.2)
        if got != want:
            fail("sequences the replicas know the engine holds: %r, wanted %r" % (got, want))
        st, ins = http("GET", "http://%s/v1/instances" % scheds[0], None, token)
        if st != 200 or "vllm0" not in json.dumps(ins):
            fail("the engine is not registered with the replica: %d %r" % (st, ins))
        st, rl = http("GET", "http://%s/v1/relay" % relays[0]["addr"])
        if st != 200 or rl["shards"] != shards or rl["late_joins"] < 1 or rl["replayed"] < 2 \
                or rl["malformed"]:
            fail("the relay's counters: %d %r" % (st, rl))
        out = run([kvf_bin, "cluster", "status", "--config", config], 30).stdout
        if "relay0" not in out or "relaying " + ev.endpoint not in out:
            fail("kvf cluster status does not show the relay:\n" + out)
        if cfg.get("etcd"):
            if os.path.exists(ext):
                fail("with etcd the engine is registered by its relay, not by external.json")
            if rl.get("etcd", {}).get("registered") is not True:
                fail("the relay did not register the engine in etcd: %r" % rl)
            os.kill(relays[0]["pid"], 9)
            t0 = time.time()
            limit = cfg["etcd_ttl"] + 8
            while time.time() - t0 < limit:
                st, ins = http("GET", "http://%s/v1/instances" % scheds[0], None, token)
                if st == 200 and "vllm0" not in json.dumps(ins):
                    break
                time.sleep(0.1)
            else:
                fail("the replica kept the engine %.0f s after its relay died" % limit)
            print("cluster_relay_check: etcd: the engine left placement %.2f s after its relay's "
                  "kill -9 (lease %d s)" % (time.time() - t0, cfg["etcd_ttl"]))
    finally:
        run([kvf_bin, "cluster", "down", "--config", config], 60)
    deadline = time.time() + 10
    while any(alive(x) for x in pids) and time.time() < deadline:
        time.sleep(0.1)
    if any(alive(x) for x in pids):
        fail("kvf cluster down left processes: %r" % [x for x in pids if alive(x)])
    ev.close()


def main():
    kvf_bin = sys.argv[1]
    ev = kvf.Events("127.0.0.1:0", replay="127.0.0.1:0")  # the engine: one stream
    shard = [kvf.shard_of(kvf.hash_blocks(tokens_of(j), BT)[0], 2) for j in range(SEQS)]
    if set(shard) != {0, 1}:
        fail("the sequences do not fall in both shards: %r" % shard)
    with tempfile.TemporaryDirectory(prefix="kvf-relay-check-") as d:
        ext = {"id": "vllm0", "role": "both", "endpoint": "http://127.0.0.1:1",
               "events": ev.endpoint, "replay": ev.replay_endpoint, "block_tokens": BT}
        cfg = {"name": "relayck", "stores": 1, "store_memory": "64M", "prefill": 1, "decode": 1,
               "sched_shards": 2, "run_dir": os.path.join(d, "run"), "external_engines": [ext]}
        config = os.path.join(d, "cluster.json")

        # Bad entries are refused with the field named, and start nothing.
        for bad, want in (({"events": "127.0.0.1:5557"}, '"events" is the engine'),
                          ({"replay": "tcp://h:port"}, '"replay" is the engine'),
                          ({"role": "router"}, '"role" is prefill, decode or both'),
                          ({"id": "a b"}, '"id" must be'),
                          ({"evnets": "x"}, 'unknown key "evnets"')):
            with open(config, "w") as f:
                json.dump(dict(cfg, external_engines=[dict(ext, **bad)]), f)
            p = run([kvf_bin, "cluster", "up", "--config", config], 30, expect=2)
            if want not in p.stderr or "external_engines[0]" not in p.stderr:
                fail("entry %r: expected %r, got %r" % (bad, want, p.stderr))
        with open(config, "w") as f:
            json.dump(dict(cfg, external_engines=[ext, ext]), f)
        p = run([kvf_bin, "cluster", "up", "--config", config], 30, expect=2)
        if "given twice" not in p.stderr:
            fail("an id given twice: %r" % p.stderr)
        with open(config, "w") as f:
            json.dump(cfg, f)
        p = run([kvf_bin, "cluster", "up", "--config", config, "--netns"], 30, expect=1)
        if "not with --netns" not in p.stderr:
            fail("external engines with --netns: %r" % p.stderr)

        for shards in (2, 1):
            check_up(kvf_bin, dict(cfg, sched_shards=shards), config, shards)
        if shutil.which("etcd"):
            check_up(kvf_bin, dict(cfg, sched_shards=2, etcd=1, etcd_ttl=2), config, 2)
        else:
            print("cluster_relay_check: etcd is not installed: the relay's etcd registration "
                  "through the launcher is not checked here (test_etcd checks the relay's)")
    ev.close()
    print("cluster_relay_check: OK: %d sequences of an external engine, with kvf-sched's index in "
          "2 shards each known to the replica of its shard only, and in one, all known; 2 of them "
          "published before the cluster was up" % SEQS)


if __name__ == "__main__":
    main()
