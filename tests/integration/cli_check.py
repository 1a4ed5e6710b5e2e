#!/usr/bin/env python3
"""Every binary and subcommand behaves as scripts expect (docs/operations.md, "Exit status"):
--help prints the usage on stdout and exits 0, --version prints kvfabric's version and exits 0,
an unknown option or a missing value exits 2 naming the option; the data commands tell a store
that did not answer (5) from chunks that were not done (3) and from success (0).

usage: cli_check.py BIN_DIR
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = sys.argv[1]
VERSION = re.compile(r"\(kvfabric\) \d+\.\d+\.\d+")
failures = []


def run(args, timeout=30):
    return subprocess.run([os.path.join(BIN, args[0])] + args[1:], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def check(cond, what):
    if not cond:
        failures.append(what)


def walk(cmd):
    name = " ".join(cmd)
    p = run(cmd + ["--help"])
    check(p.returncode == 0 and "usage" in p.stdout.lower(),
          "%s --help: rc %d, stdout %r, stderr %r" % (name, p.returncode, p.stdout[:80], p.stderr[:200]))
    p = run(cmd + ["--version"])
    check(p.returncode == 0 and VERSION.search(p.stdout),
          "%s --version: rc %d, %r %r" % (name, p.returncode, p.stdout[:80], p.stderr[:200]))
    p = run(cmd + ["--no-such-option"])
    check(p.returncode == 2 and "--no-such-option" in p.stderr,
          "%s --no-such-option: rc %d, stderr %r" % (name, p.returncode, p.stderr[:200]))


def daemon_log(cmd, journal=False):
    """The stderr lines of a daemon started with cmd and stopped once it is ready; with journal,
    as under systemd (JOURNAL_STREAM naming its stderr)."""
    with tempfile.TemporaryFile("w+") as err:
        env = None
        if journal:
            st = os.fstat(err.fileno())
            env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
        d = subprocess.Popen([os.path.join(BIN, cmd[0])] + cmd[1:], stdout=subprocess.PIPE,
                             stderr=err, text=True, env=env)
        try:
            d.stdout.readline()  # the ready line: logging has begun
            time.sleep(0.3)
        finally:
            d.terminate()
            d.wait(timeout=10)
        err.seek(0)
        return [l for l in err.read().splitlines() if l.strip()]


def subcommands(binary):
    """The names a binary's --help lists under its commands."""
    out = run([binary, "--help"]).stdout.splitlines()
    names, listing = [], False
    for line in out:
        if re.match(r"^(commands|subcommands):", line):
            listing = True
            continue
        m = re.match(r"^  ([a-z0-9-]+)\s", line)
        if listing and m:
            names.append(m.group(1))
    return names


for b in ("kvf-store", "kvf-sched", "kvf-engine", "kvf", "kvf-bench"):
    walk([b])
kvf_cmds = subcommands("kvf")
bench_cmds = subcommands("kvf-bench")
check(len(kvf_cmds) >= 10 and "get" in kvf_cmds, "kvf --help lists its commands: %r" % kvf_cmds)
check(set(bench_cmds) >= {"store", "connector", "sched", "soak", "e2e"},
      "kvf-bench --help lists its subcommands: %r" % bench_cmds)
for c in kvf_cmds:
    walk(["kvf", c])
for c in bench_cmds:
    walk(["kvf-bench", c])

# the parser every binary uses: each option of the usage described (its text after the option),
# valid values listed where there is a list, defaults shown; bad values named, exit 2
def described(cmd):
    out = run(cmd + ["--help"]).stdout.splitlines()
    if "options:" not in out:
        return
    opts = 0
    for i, line in enumerate(out[out.index("options:") + 1:]):
        if not line.startswith("  -"):
            continue
        opts += 1
        m = re.match(r"^  (-\w, )?--[a-z0-9-]+( \S+)?\s{2,}(\S.*)$", line)
        nxt = out[out.index("options:") + 2 + i] if out.index("options:") + 2 + i < len(out) else ""
        check(m or re.match(r"^\s{10,}\S", nxt),
              "%s --help: an option without its description: %r" % (" ".join(cmd), line))
    check(opts >= 3, "%s --help lists its options (%d)" % (" ".join(cmd), opts))


for cmd in (["kvf-store"], ["kvf-sched"], ["kvf-engine"], ["kvf-engine", "--serve"],
            ["kvf-engine", "--calibrate", "x"]):
    described(cmd)
for c in bench_cmds:
    described(["kvf-bench", c])
help_text = {" ".join(c): " ".join(run(c + ["--help"]).stdout.split())
             for c in (["kvf-store"], ["kvf-sched"])}
check("[default: 1G]" in help_text["kvf-store"] and "(one of: lru, s3fifo)" in help_text["kvf-store"],
      "kvf-store --help shows defaults and valid values")
check("(one of: round_robin, least_loaded, longest_prefix, dynamo_cost, kvf_cost)"
      in help_text["kvf-sched"], "kvf-sched --help lists its policies")
for cmd, opt in ((["kvf-store", "--threads", "100"], "--threads"),
                 (["kvf-store", "--evict", "fifo"], "--evict"),
                 (["kvf-store", "--memory=4X"], "--memory"),
                 (["kvf-sched", "--chunk-tokens", "0"], "--chunk-tokens"),
                 (["kvf-sched", "--policy", "prefil"], "--policy"),
                 (["kvf-sched", "--stores", "127.0.0.1:7400,,127.0.0.1:7401"], "--stores"),
                 (["kvf-sched", "--stores", "127.0.0.1"], "--stores"),
                 (["kvf-engine", "--serve", "--id", "a/b"], "--id"),
                 (["kvf-bench", "store", "--sources", "--link-gbps", "0"], "--link-gbps"),
                 (["kvf-engine", "--prompt", "zero"], "--prompt"),
                 (["kvf-engine", "--serve", "--role", "prefil"], "--role"),
                 (["kvf-bench", "e2e", "--concurrency", "0"], "--concurrency"),
                 (["kvf-bench", "soak", "--object", "1Q"], "--object"),
                 (["kvf-bench", "store", "--transport", "udp"], "--transport"),
                 (["kvf-store", "stray"], "stray")):
    p = run(cmd)
    check(p.returncode == 2 and opt in p.stderr,
          "%s: rc %d, stderr %r" % (" ".join(cmd), p.returncode, p.stderr[:200]))

# a value missing: named, exit 2
for cmd in (["kvf-store", "--memory"], ["kvf-sched", "--policy"], ["kvf-engine", "--serve", "--id"],
            ["kvf", "get", "--node"], ["kvf-bench", "e2e", "--trace"]):
    p = run(cmd)
    check(p.returncode == 2 and cmd[-1] in p.stderr,
          "%s (no value): rc %d, stderr %r" % (" ".join(cmd), p.returncode, p.stderr[:200]))

# --log-format json on each daemon: every line one JSON object with its level and component
for cmd in (["kvf-store", "--listen", "127.0.0.1:0", "--memory", "16M", "--no-prefault",
             "--shm", "off"],
            ["kvf-sched", "--listen", "127.0.0.1:0"],
            ["kvf-engine", "--serve", "--id", "j", "--listen", "127.0.0.1:0"]):
    lines = daemon_log(cmd + ["--log-format", "json"])
    check(lines, "%s --log-format json: no log line" % cmd[0])
    for l in lines:
        try:
            o = json.loads(l)
            check(o.get("component") == cmd[0] and o.get("level") in ("debug", "info", "warn",
                                                                          "error")
                  and "msg" in o and "ts" in o, "%s: a JSON line without its fields: %r"
                  % (cmd[0], l))
        except ValueError:
            check(False, "%s --log-format json: not JSON: %r" % (cmd[0], l))

# under systemd (stderr is the journal's stream, JOURNAL_STREAM=dev:ino): syslog priority prefixes
lines = daemon_log(["kvf-sched", "--listen", "127.0.0.1:0"], journal=True)
check(lines and all(re.match(r"^<[3467]>\d{4}-", l) for l in lines) and
      any(l.startswith("<6>") for l in lines),
      "kvf-sched under journald: lines without their priority: %r" % lines[:3])

# Type=notify: each daemon says READY=1 to $NOTIFY_SOCKET once it serves, pings the watchdog
# where WATCHDOG_USEC asks, and says STOPPING=1 on SIGTERM (a build without libsystemd says, on
# stderr, that it cannot)
for cmd in (["kvf-store", "--listen", "127.0.0.1:0", "--memory", "16M", "--no-prefault",
             "--shm", "off"],
            ["kvf-sched", "--listen", "127.0.0.1:0"],
            ["kvf-engine", "--serve", "--id", "n", "--listen", "127.0.0.1:0"]):
    with tempfile.TemporaryDirectory() as sd, tempfile.TemporaryFile("w+") as err:
        path = os.path.join(sd, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10)
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
        d = subprocess.Popen([os.path.join(BIN, cmd[0])] + cmd[1:], stdout=subprocess.PIPE,
                             stderr=err, text=True, env=env)
        got = []
        try:
            d.stdout.readline()
            deadline = time.time() + 10
            while time.time() < deadline and not (any("READY=1" in g for g in got) and
                                                   any("WATCHDOG=1" in g for g in got)):
                try:
                    got.append(sock.recv(4096).decode())
                except socket.timeout:
                    break
            d.terminate()
            deadline = time.time() + 10
            while time.time() < deadline and not any("STOPPING=1" in g for g in got):
                try:
                    got.append(sock.recv(4096).decode())
                except socket.timeout:
                    break
        finally:
            if d.poll() is None:
                d.terminate()
            d.wait(timeout=10)
            sock.close()
        err.seek(0)
        log = err.read()
    if "has no libsystemd" in log:
        print("cli_check: %s: built without libsystemd: no notification (said so)" % cmd[0])
        continue
    for want in ("READY=1", "WATCHDOG=1", "STOPPING=1"):
        check(any(want in g for g in got), "%s: no %s on $NOTIFY_SOCKET: %r" % (cmd[0], want, got))

# exit statuses of the data commands
with tempfile.TemporaryDirectory() as d:
    store = subprocess.Popen([os.path.join(BIN, "kvf-store"), "--listen", "127.0.0.1:0",
                              "--memory", "64M", "--no-prefault", "--shm", "off",
                              "--log-level", "warn"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = store.stdout.readline()
        addr = line.split("listen=")[1].split()[0]
        chunks = ["--synthetic", "512", "--seed", "3"]
        for cmd, want in ((["put"], 0), (["get"], 0), (["lookup"], 0), (["evict"], 0),
                          (["get"], 3), (["lookup"], 0), (["put"], 0), (["pin"], 0),
                          (["unpin"], 0), (["stats"], 0)):
            args = ["kvf"] + cmd + ["--node", addr] + ([] if cmd == ["stats"] else chunks)
            p = run(args)
            check(p.returncode == want, "%s against a live store: rc %d (want %d): %r %r"
                  % (" ".join(cmd), p.returncode, want, p.stdout[-200:], p.stderr[-200:]))
        # one live node and one dead: partial
        p = run(["kvf", "stats", "--node", addr + ",127.0.0.1:1"])
        check(p.returncode == 3, "stats with one node down: rc %d (want 3)" % p.returncode)
    finally:
        store.terminate()
        store.wait(timeout=10)
    time.sleep(0.1)
    for cmd in (["put"], ["get"], ["lookup"], ["evict"], ["pin"], ["stats"]):
        args = ["kvf"] + cmd + ["--node", addr, "--deadline-ms", "2000"] + \
            ([] if cmd == ["stats"] else ["--synthetic", "512"])
        p = run(args)
        check(p.returncode == 5, "%s against a dead store: rc %d (want 5): %r"
              % (" ".join(cmd), p.returncode, p.stderr[-200:]))

# A client holding a thousand idle, half-sent connections shuts nobody else out of kvf-sched's
# HTTP API (select() would have stopped at descriptor 1,024), where this process may open that many.
try:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400 and hard >= 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))
    can_open = resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1400
except (ImportError, ValueError, OSError):
    can_open = False
if can_open:
    sched = subprocess.Popen([os.path.join(BIN, "kvf-sched"), "--listen", "127.0.0.1:0",
                              "--log-level", "warn"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    held = []
    try:
        line = sched.stdout.readline()
        host, port = line.split("listen=")[1].split()[0].rsplit(":", 1)
        for _ in range(1100):
            c = socket.create_connection((host, int(port)), timeout=5)
            c.send(b"GET /v1/heal")
            held.append(c)
        t0 = time.time()
        ok = False
        try:
            with urllib.request.urlopen("http://%s:%s/healthz" % (host, port), timeout=10) as r:
                ok = r.status == 200
        except OSError as e:
            ok = False
            check(False, "kvf-sched with 1,100 idle connections open: /healthz failed: %s" % e)
        check(ok, "kvf-sched with 1,100 idle connections open: /healthz not answered")
        print("cli_check: /healthz answered in %.3f s with 1,100 idle connections open"
              % (time.time() - t0))
    finally:
        for c in held:
            c.close()
        sched.terminate()
        sched.wait(timeout=10)

if failures:
    for f in failures:
        print("cli_check: FAIL: " + f)
    sys.exit(1)
print("cli_check: ok (%d kvf commands, %d kvf-bench subcommands)" % (len(kvf_cmds), len(bench_cmds)))
