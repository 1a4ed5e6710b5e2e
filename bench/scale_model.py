#!/usr/bin/env python3
"""kvfabric at 1,000 storage nodes and 10,000 engines (docs/scale.md): what etcd, each kvf-sched
replica and its index must carry, from figures measured on this machine and a model of the
cluster. Every derived figure is labelled `simulated`; the measured inputs `real`.

Measured (real), in the same run where asked:
- the index: events ingested per second on one core and bytes per indexed block, from
  `kvf-bench sched --ingest --json` (--ingest-json FILE, or run here with --ingest-run BIN);
- etcd (--etcd-measure, where etcd is installed): a one-member etcd on loopback, the lease
  renewals and the puts it answers per second through its JSON gateway, from --etcd-threads
  client threads, as kvfabric's own client makes them (one HTTP POST each).

Modelled (simulated): keys, renewals and watch events in etcd; KV events per engine from its
prefill rate; every replica ingesting every engine's stream; the index's holdings from each
engine's KV capacity and the share of blocks that several engines hold; how many index shards
keep each replica's ingest under its budget of one core.

usage: scale_model.py [--ingest-json FILE | --ingest-run KVF_BENCH] [--etcd-measure]
                      [--stores 1000] [--engines 10000] [--replicas 2] [--json]
"""

import argparse
import base64
import http.client
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from kvfabric.etcd import wait_healthy  # noqa: E402 (the package beside, standard library only)


def post(url, body, timeout=5):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_etcd(threads, seconds):
    """Renewals and puts per second that a one-member etcd on loopback answers (real)."""
    etcd = shutil.which("etcd")
    if not etcd:
        return None
    tmp = tempfile.mkdtemp(prefix="kvf-scale-etcd-")
    cp, pp = free_port(), free_port()
    url = "http://127.0.0.1:%d" % cp
    log = open(os.path.join(tmp, "etcd.log"), "w")
    p = subprocess.Popen([etcd, "--data-dir", os.path.join(tmp, "data"), "--listen-client-urls",
                          url, "--advertise-client-urls", url, "--listen-peer-urls",
                          "http://127.0.0.1:%d" % pp, "--initial-advertise-peer-urls",
                          "http://127.0.0.1:%d" % pp, "--initial-cluster",
                          "default=http://127.0.0.1:%d" % pp], stdout=log, stderr=log)
    try:
        if not wait_healthy(url, 10):
            return None
        leases = [post(url + "/v3/lease/grant", {"TTL": "60"})["ID"] for _ in range(threads)]

        def rate(kind):
            count = [0] * threads
            stop = time.time() + seconds

            def run(i):
                # one kept-alive connection a thread, as kvfabric's client keeps one a thread
                conn = http.client.HTTPConnection("127.0.0.1", cp, timeout=5)
                key = base64.b64encode(b"/kvfabric/scale/stores/%d" % i).decode()
                val = base64.b64encode(b'{"addr":"10.0.0.1:7400"}').decode()
                path, body = (("/v3/lease/keepalive", {"ID": leases[i]}) if kind == "renew" else
                              ("/v3/kv/put", {"key": key, "value": val, "lease": leases[i]}))
                data = json.dumps(body)
                while time.time() < stop:
                    conn.request("POST", path, data, {"Content-Type": "application/json"})
                    conn.getresponse().read()
                    count[i] += 1
                conn.close()

            th = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
            t0 = time.time()
            for t in th:
                t.start()
            for t in th:
                t.join()
            return sum(count) / (time.time() - t0)

        return {"etcd_renewals_per_s": rate("renew"), "etcd_puts_per_s": rate("put"),
                "etcd_threads": threads, "etcd_label": "real"}
    finally:
        p.terminate()
        p.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ingest-json", help="kvf-bench sched --ingest --json output")
    ap.add_argument("--ingest-run", help="run KVF_BENCH sched --ingest --quick --json here")
    ap.add_argument("--etcd-measure", action="store_true", help="measure a local etcd")
    ap.add_argument("--etcd-threads", type=int, default=8)
    ap.add_argument("--etcd-seconds", type=float, default=3)
    ap.add_argument("--stores", type=int, default=1000)
    ap.add_argument("--engines", type=int, default=10000)
    ap.add_argument("--replicas", type=int, default=2, help="kvf-sched replicas per shard")
    ap.add_argument("--ttl", type=float, default=5, help="lease TTL, seconds")
    ap.add_argument("--churn-per-hour", type=float, default=0.05,
                    help="share of processes that restart each hour")
    ap.add_argument("--prefill-tokens-per-s", type=float, default=29900,
                    help="one engine's prefill rate (8B model on an H200: 8192 in 274 ms)")
    ap.add_argument("--utilization", type=float, default=0.5, help="share of time prefilling")
    ap.add_argument("--block-tokens", type=int, default=16)
    ap.add_argument("--engine-kv-blocks", type=int, default=30000,
                    help="blocks of KV one engine holds (8B: 2 MiB a 16-token block, ~60 GB)")
    ap.add_argument("--shared", type=float, default=0.5,
                    help="share of an engine's blocks that another engine also holds")
    ap.add_argument("--store-chunks", type=int, default=16000,
                    help="chunks one store holds (8B: 32 MiB a 256-token chunk, 512 GB)")
    ap.add_argument("--ingest-budget", type=float, default=0.5,
                    help="share of a core a replica may spend ingesting (the rest places)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    ing = None
    if a.ingest_run:
        out = subprocess.run([a.ingest_run, "sched", "--ingest", "--quick", "--json"],
                             capture_output=True, text=True, timeout=600).stdout
        ing = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    elif a.ingest_json:
        with open(a.ingest_json) as f:
            text = f.read()
        try:  # a JSON file, or kvf-bench's output whose last line is the JSON
            ing = json.loads(text)
        except json.JSONDecodeError:
            ing = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    if not ing or "index_bytes" not in ing:
        sys.exit("scale_model: give --ingest-json (with index_bytes) or --ingest-run")
    ingest_per_core = ing["ingest_events_per_s"]
    bytes_per_block = ing["index_bytes"] / ing["index_blocks"]
    etcd = measure_etcd(a.etcd_threads, a.etcd_seconds) if a.etcd_measure else None

    # etcd: a key and a lease per process; renewals every third of the TTL
    procs = a.stores + a.engines
    keys = procs + a.replicas
    renew = keys / (a.ttl / 3)
    churn = procs * a.churn_per_hour / 3600 * 2  # a leave and a join each
    watchers = a.replicas  # every replica follows every registration
    # KV events: each engine stores its prefill's blocks and, at steady state, removes as many
    ev_engine = a.prefill_tokens_per_s * a.utilization / a.block_tokens * 2
    ev_total = ev_engine * a.engines
    # every replica of a shard ingests that shard's share of every engine's stream
    per_core = ingest_per_core * a.ingest_budget
    shards = max(1, math.ceil(ev_total / per_core))
    engines_per_replica = per_core / ev_engine
    # the index: distinct blocks (shared ones counted once), their holders, and the stores'
    distinct = a.engines * a.engine_kv_blocks * (1 - a.shared / 2)
    index_bytes = distinct * bytes_per_block + a.stores * a.store_chunks * bytes_per_block
    res = {
        "bench": "scale", "label": "simulated",
        "inputs": {"stores": a.stores, "engines": a.engines, "replicas_per_shard": a.replicas,
                   "ttl_s": a.ttl, "churn_per_hour": a.churn_per_hour,
                   "prefill_tokens_per_s": a.prefill_tokens_per_s,
                   "utilization": a.utilization, "block_tokens": a.block_tokens,
                   "engine_kv_blocks": a.engine_kv_blocks, "shared": a.shared,
                   "store_chunks": a.store_chunks, "ingest_budget": a.ingest_budget},
        "measured": {"ingest_events_per_s_one_core": ingest_per_core,
                     "index_bytes_per_block": bytes_per_block, "ingest_label": "real"},
        "etcd_keys": keys, "etcd_renewals_per_s": renew, "etcd_watch_events_per_s": churn *
        watchers, "etcd_membership_changes_per_s": churn,
        "kv_events_per_s_per_engine": ev_engine, "kv_events_per_s_total": ev_total,
        "engines_one_replica_keeps_up_with": engines_per_replica,
        "index_shards_needed": shards,
        "index_bytes_unsharded": index_bytes, "index_bytes_per_shard": index_bytes / shards,
        "replicas_total": shards * a.replicas,
        "store_chunk_holdings": a.stores * a.store_chunks,
    }
    if etcd:
        res["measured"].update(etcd)
        res["etcd_renewals_share_of_measured"] = renew / etcd["etcd_renewals_per_s"]
    if a.json:
        print(json.dumps(res, sort_keys=True))
        return
    print("kvfabric at %d stores and %d engines (simulated; measured inputs real)" %
          (a.stores, a.engines))
    print("  etcd: %d keys, %.0f lease renewals/s%s, %.2f membership changes/s, each told to %d "
          "watchers" % (keys, renew, (" (%.0f%% of the %.0f/s one local member answered)" %
                                      (100 * renew / etcd["etcd_renewals_per_s"],
                                       etcd["etcd_renewals_per_s"])) if etcd else "",
                        churn, watchers))
    print("  KV events: %.0f/s per engine, %.2f M/s in all; one replica ingests %.2f M/s in %.0f%% "
          "of a core (measured %.2f M/s a core): it keeps up with %.0f engines" %
          (ev_engine, ev_total / 1e6, per_core / 1e6, 100 * a.ingest_budget,
           ingest_per_core / 1e6, engines_per_replica))
    print("  the index: %.1f GB unsharded (%.0f bytes a block, measured); %d shards by the hash "
          "of each prefix's first block, %.1f GB each, %d replicas in all" %
          (index_bytes / 1e9, bytes_per_block, shards, index_bytes / shards / 1e9,
           shards * a.replicas))


main()
