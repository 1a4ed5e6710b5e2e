#!/usr/bin/env python3
"""/metrics of kvf-store (--metrics side port), kvf-sched and kvf-engine, scraped while they serve: Prometheus's
own checker (`promtool check metrics`) accepts both, every sample's family is described (HELP) and
typed (TYPE) before it, histograms are cumulative, and the counters move with the traffic (a put
and a get through the CLI, a placement, two generate requests). docs/operations.md, "Metrics".

usage: metrics_check.py BIN_DIR
Exit 77 (skipped) where promtool is not installed (cluster/deps.sh installs it).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

BIN = sys.argv[1]
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


def start(args):
    """Starts a daemon; returns it and its ready line's fields (listen=..., metrics=...)."""
    p = subprocess.Popen([os.path.join(BIN, args[0])] + args[1:], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    if "listen" not in fields:
        p.kill()
        raise SystemExit("metrics_check: FAIL: %s did not start: %r" % (args[0], line))
    return p, fields


def scrape(addr):
    with urllib.request.urlopen("http://%s/metrics" % addr, timeout=10) as r:
        ctype = r.headers.get("Content-Type", "")
        return r.read().decode(), ctype


def parse(text, who):
    """{family: type}, {series name+labels: value}; checks HELP/TYPE order and histograms."""
    types, helps, values = {}, set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helps.add(line.split()[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, t = line.split()
            check(name not in types, "%s: TYPE %s twice" % (who, name))
            types[name] = t
            continue
        m = SAMPLE.match(line)
        check(m is not None, "%s: not a sample line: %r" % (who, line))
        if not m:
            continue
        name = m.group(1)
        fam = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        check(fam in types and fam in helps,
              "%s: %s has no HELP and TYPE before it" % (who, name))
        values[name + (m.group(2) or "")] = float(m.group(3).replace("+Inf", "inf"))
    for fam, t in types.items():
        if t != "histogram":
            continue
        prev = {}
        for k, v in values.items():  # each series' buckets written in increasing le order
            if not k.startswith(fam + "_bucket"):
                continue
            series = re.sub(r',?le="[^"]*"', "", k)
            check(v >= prev.get(series, -1), "%s: %s buckets not cumulative at %s" % (who, fam, k))
            prev[series] = v
        for series, last in prev.items():  # the +Inf bucket is the count
            count = series.replace("_bucket", "_count").replace("{}", "")
            check(values.get(count) == last, "%s: %s: +Inf bucket %s, count %s"
                  % (who, series, last, values.get(count)))
    return types, values


if not shutil.which("promtool"):
    print("metrics_check: SKIP: promtool is not installed (apt-get install prometheus)")
    sys.exit(77)

procs = []
disk_dir = tempfile.mkdtemp(prefix="kvf-metrics-", dir=os.getcwd())
try:
    store_args = ["kvf-store", "--listen", "127.0.0.1:0", "--memory", "64M", "--no-prefault",
                  "--shm", "off", "--metrics", "127.0.0.1:0", "--log-level", "warn"]
    # with a disk tier, for its series too, where this build and file system allow one
    with_disk = True
    try:
        store, sf = start(store_args + ["--disk", os.path.join(disk_dir, "tier:64M")])
    except SystemExit:
        with_disk = False
        store, sf = start(store_args)
    procs.append(store)
    sched, scf = start(["kvf-sched", "--listen", "127.0.0.1:0", "--log-level", "warn"])
    procs.append(sched)
    check("metrics" in sf, "kvf-store's ready line names its metrics address: %r" % sf)
    engine, ef = start(["kvf-engine", "--serve", "--id", "e0", "--role", "both", "--listen",
                        "127.0.0.1:0", "--store", sf["listen"], "--log-level", "warn"])
    procs.append(engine)
    for _ in range(2):  # the second finds the first's prefix in the engine's pages
        req = urllib.request.Request("http://%s/v1/generate" % ef["listen"],
                                     data=json.dumps({"tokens": list(range(1, 300)),
                                                      "max_tokens": 3}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=60).read()
    # traffic: a put and a get through the CLI, a placement through kvf-sched's API
    for cmd in ("put", "get"):
        p = subprocess.run([os.path.join(BIN, "kvf"), cmd, "--node", sf["listen"], "--synthetic",
                            "512"], capture_output=True, text=True, timeout=30)
        check(p.returncode == 0, "kvf %s: rc %d %r" % (cmd, p.returncode, p.stderr[-200:]))
    req = urllib.request.Request("http://%s/v1/place" % scf["listen"],
                                 data=json.dumps({"tokens": list(range(64))}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=10).read()
    except urllib.error.HTTPError:
        pass  # no instance registered: 503, still a placement decision
    for who, addr in (("kvf-store", sf.get("metrics", "")), ("kvf-sched", scf["listen"]),
                      ("kvf-engine", ef["listen"])):
        text, ctype = scrape(addr)
        check(ctype.startswith("text/plain; version=0.0.4"), "%s: content type %r" % (who, ctype))
        p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           text=True, timeout=30)
        check(p.returncode == 0, "%s: promtool check metrics: %s %s" % (who, p.stdout, p.stderr))
        types, values = parse(text, who)
        check('kvf_build_info{component="%s",version=' % who.replace("-", "_") in text,
              "%s: kvf_build_info" % who)
        check("process_cpu_seconds_total" in values and "process_open_fds" in values,
              "%s: the process collector's series" % who)
        if who == "kvf-store":
            # a put goes as ADMIT then COMMIT (the node takes only what it lacks)
            check(values.get('kvf_store_requests_total{op="commit",transport="tcp",result="ok"}',
                             0) >= 1, "kvf-store: requests_total{op=commit,tcp,ok}: the put")
            check('kvf_store_requests_total{op="get",transport="tcp",result="error"}' in values,
                  "kvf-store: requests_total by result")
            check(values.get("kvf_store_puts_total", 0) >= 1, "kvf-store: puts_total")
            check(types.get("kvf_store_op_seconds") == "histogram" and
                  values.get('kvf_store_op_seconds_count{op="get"}', 0) >= 1,
                  "kvf-store: op_seconds{op=get}")
            check(values.get("kvf_store_hits_total", 0) >= 1, "kvf-store: hits_total")
            if with_disk:
                check(values.get("kvf_store_disk_bytes", 0) > 0 and
                      types.get("kvf_store_disk_demoted_total") == "counter",
                      "kvf-store --disk: the disk tier's series")
            check(values.get("kvf_store_arena_bytes") == 64 << 20, "kvf-store: arena_bytes")
            check(types.get("kvf_store_arena_bytes") == "gauge" and
                  types.get("kvf_store_evictions_total") == "counter", "kvf-store: types")
        elif who == "kvf-engine":
            check(values.get('kvf_engine_requests_total{kind="generate",result="ok"}') == 2,
                  "kvf-engine: requests_total{generate,ok}")
            check(values.get('kvf_engine_prompt_tokens_total{source="engine"}', 0) > 0 and
                  values.get('kvf_engine_prompt_tokens_total{source="computed"}', 0) > 0,
                  "kvf-engine: prompt tokens by source")
            check(values.get('kvf_engine_request_phase_seconds_count{phase="prefill"}') == 2,
                  "kvf-engine: the prefill phase histogram")
            check(values.get("kvf_engine_chunks_saved_total", 0) >= 1, "kvf-engine: saves")
            # the connector's timing, per layer (4 layers of ref-tiny per save) and per transfer
            check(types.get("kvf_engine_connector_layer_seconds") == "histogram" and
                  values.get('kvf_engine_connector_layer_seconds_count{op="save"}', 0) >= 4 and
                  'kvf_engine_connector_layer_seconds_count{op="load"}' in values,
                  "kvf-engine: the connector's per-layer histogram")
            check(values.get('kvf_engine_connector_transfer_seconds_count{op="save"}', 0) >= 1
                  and 'kvf_engine_connector_wait_seconds_count{op="load"}' in values,
                  "kvf-engine: the connector's transfer and wait histograms")
        else:
            check(values.get("kvf_sched_placements_total", 0) >= 1, "kvf-sched: placements")
            check(values.get("kvf_sched_place_seconds_count", 0) >= 1 and
                  types.get("kvf_sched_place_seconds") == "histogram",
                  "kvf-sched: place_seconds histogram")
    # the side port serves /metrics only
    try:
        urllib.request.urlopen("http://%s/other" % sf["metrics"], timeout=10)
        check(False, "kvf-store's metrics port answered another path")
    except urllib.error.HTTPError as e:
        check(e.code == 404, "kvf-store's metrics port: %d for another path" % e.code)
finally:
    for p in procs:
        p.terminate()
        p.wait(timeout=10)
    shutil.rmtree(disk_dir, ignore_errors=True)

if failures:
    for f in failures:
        print("metrics_check: FAIL: " + f)
    sys.exit(1)
print("metrics_check: ok (kvf-store, kvf-sched and kvf-engine pass promtool check metrics)")
