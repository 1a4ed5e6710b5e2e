#!/usr/bin/env python3
"""docs/operations.md's multi-host deployment, followed literally on two hosts that are network
namespaces: `kvf deploy render` from one deployment file, each host's files copied into place and
its units started in the README's order exactly as systemd starts them (the installed unit's
EnvironmentFile, RuntimeDirectory, ExecStart with $VARS split on whitespace, Type=notify's
READY=1 on $NOTIFY_SOCKET). Then: kvf-sched subscribed to both stores' and the engine's events;
the engine, on the other host, serves a request through the stores; kvf-sched's index holds the
stores' chunks and the engine's blocks; the chunks are found from either host with the cluster's
credential. Skipped (77) where network namespaces cannot be made (not root).

usage: deploy_check.py BIN_DIR UNIT_TEMPLATE_DIR (cluster/systemd)
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BIN, UNITS = sys.argv[1], sys.argv[2]
KVF = os.path.join(BIN, "kvf")
TAG = "kvfd%d" % (os.getpid() % 100000)
NET = "10.%d.%d" % (90 + os.getpid() % 60, os.getpid() // 60 % 250)
HOSTS = {"%s.1" % NET: TAG + "a", "%s.2" % NET: TAG + "b"}


def sh(*args, check=True):
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and p.returncode:
        raise RuntimeError("%s: %s" % (" ".join(args), p.stderr.strip()))
    return p


def skip(why):
    print("deploy_check: skipped: %s" % why)
    sys.exit(77)


def netns_up():
    if os.geteuid() != 0:
        skip("network namespaces need root")
    if not shutil.which("ip"):
        skip("no ip command (iproute2) on this host")
    a, b = HOSTS.values()
    if sh("ip", "netns", "add", a, check=False).returncode:
        skip("ip netns add failed")
    sh("ip", "netns", "add", b)
    sh("ip", "link", "add", TAG + "x", "type", "veth", "peer", "name", TAG + "y")
    for (addr, ns), dev in zip(HOSTS.items(), (TAG + "x", TAG + "y")):
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def netns_down():
    for ns in HOSTS.values():
        sh("ip", "netns", "del", ns, check=False)


def in_ns(host, args):
    return ["ip", "netns", "exec", HOSTS[host]] + args


def http(host, method, url, body=None, token=None):
    """An HTTP request from inside a host's namespace (Python there): (status, JSON)."""
    code = ("import json,sys,urllib.request as u\n"
            "r=u.Request(sys.argv[2],method=sys.argv[1],data=sys.argv[3].encode() or None,"
            "headers={'Content-Type':'application/json'})\n"
            "t=sys.argv[4]\n"
            "if t: r.add_header('Authorization','Bearer '+t)\n"
            "try:\n  x=u.urlopen(r,timeout=20); print(x.status); print(x.read().decode())\n"
            "except u.HTTPError as e:\n  print(e.code); print(e.read().decode())\n")
    p = subprocess.run(in_ns(host, [sys.executable, "-c", code, method, url,
                                    json.dumps(body) if body is not None else "", token or ""]),
                       capture_output=True, text=True, timeout=60)
    lines = p.stdout.split("\n", 1)
    try:
        return int(lines[0]), json.loads(lines[1]) if len(lines) > 1 and lines[1].strip() else {}
    except ValueError:
        return 0, {"error": p.stdout + p.stderr}


class Units:
    """Starts units as systemd does, from the unit files kvfabric installs."""

    def __init__(self, etc, tmp):
        self.etc, self.tmp, self.procs, self.runtime = etc, tmp, [], []

    def start(self, host, unit):
        name, inst = (unit.split("@", 1) + [""])[:2]
        path = os.path.join(UNITS, name + ("@" if inst else "") + ".service.in")
        with open(path) as f:  # the unit as installed: its binaries are this build's
            text = f.read().replace("@KVF_UNIT_BINDIR@", os.path.abspath(BIN))
        keys = {}
        for line in text.splitlines():
            m = re.match(r"^(\w+)=(.*)$", line)
            if m:
                keys.setdefault(m.group(1), m.group(2).replace("%i", inst))
        env = dict(os.environ)
        envfile = keys["EnvironmentFile"].replace("/etc/kvfabric", self.etc)
        with open(envfile) as f:
            for line in f:
                m = re.match(r"^([A-Z_][A-Z0-9_]*)=(.*)$", line.strip())
                if m:
                    env[m.group(1)] = m.group(2)
        if "RuntimeDirectory" in keys:
            d = os.path.join("/run", keys["RuntimeDirectory"])
            os.makedirs(d, mode=0o750, exist_ok=True)
            self.runtime.append(d)
        argv = []
        for w in keys["ExecStart"].split():  # systemd: an unbraced $VAR is split on whitespace
            argv += env.get(w[1:], "").split() if w.startswith("$") else [w]
        sock_path = os.path.join(self.tmp, "notify-%s" % unit.replace("@", "-"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        sock.settimeout(1)
        env["NOTIFY_SOCKET"] = sock_path
        log = open(os.path.join(self.tmp, unit + ".log"), "w")
        p = subprocess.Popen(in_ns(host, argv), env=env, stdout=log, stderr=log)
        self.procs.append((unit, p))
        end = time.monotonic() + 60
        try:
            while time.monotonic() < end:
                if p.poll() is not None:
                    raise RuntimeError("%s exited %d: %s" % (unit, p.returncode, self.log(unit)))
                try:
                    if b"READY=1" in sock.recv(4096):
                        return
                except socket.timeout:
                    pass
            raise RuntimeError("%s: no READY=1 in 60 s: %s" % (unit, self.log(unit)))
        finally:
            sock.close()

    def log(self, unit):
        with open(os.path.join(self.tmp, unit + ".log")) as f:
            return f.read()[-2000:]

    def stop(self):
        for _, p in reversed(self.procs):
            p.terminate()
        for _, p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for d in self.runtime:
            shutil.rmtree(d, ignore_errors=True)


def main():
    failures = []

    def check(cond, what):
        if not cond:
            failures.append(what)

    netns_up()
    tmp = tempfile.mkdtemp(prefix="kvf-deploy-")
    etc = os.path.join(tmp, "etc-kvfabric")
    units = Units(etc, tmp)
    a, b = sorted(HOSTS)
    try:
        deploy = {"name": "two-hosts", "model": "ref-tiny", "etc": etc, "log_format": "text",
                  "sched": {"host": a},
                  "stores": [{"host": a, "memory": "64M", "threads": 1},
                             {"host": b, "memory": "64M", "threads": 1}],
                  "engines": [{"host": b, "role": "both"}]}
        cfg = os.path.join(tmp, "deploy.json")
        with open(cfg, "w") as f:
            json.dump(deploy, f)
        out = os.path.join(tmp, "out")
        p = sh(KVF, "deploy", "render", "--config", cfg, "--out", out, check=False)
        check(p.returncode == 0, "kvf deploy render: %d %s" % (p.returncode, p.stderr))
        # a typo in the deployment file is refused with its path
        bad = dict(deploy, stroes=[])
        with open(cfg + ".bad", "w") as f:
            json.dump(bad, f)
        p = sh(KVF, "deploy", "render", "--config", cfg + ".bad", "--out", out + ".bad",
               check=False)
        check(p.returncode == 2 and "stroes" in p.stderr, "a typo accepted: %r" % p.stderr)

        # The README, literally: on each host in its order, the files into place, then enable.sh.
        with open(os.path.join(out, "README")) as f:
            readme = f.read()
        order = re.findall(r"^  (\d+\.\d+\.\d+\.\d+)$", readme, re.M)
        check(order == [a, b], "README's hosts: %r" % order)
        os.makedirs(etc, mode=0o750)
        for host in order:
            src = os.path.join(out, "hosts", host, "etc", "kvfabric")
            for fn in os.listdir(src):  # the README's modes (as root: no kvfabric user here)
                shutil.copy(os.path.join(src, fn), os.path.join(etc, fn))
                secret = fn.endswith(".cred") or fn.endswith(".tokens")
                os.chmod(os.path.join(etc, fn), 0o600 if secret else 0o640)
            check("chmod 0600 %s/*.cred %s/*.tokens" % (etc, etc) in readme,
                  "the README's modes for the secrets")
            with open(os.path.join(out, "hosts", host, "enable.sh")) as f:
                for unit in re.findall(r"^systemctl enable --now (\S+)$", f.read(), re.M):
                    units.start(host, unit)
        check([u for u, _ in units.procs] == ["kvf-store@0", "kvf-sched", "kvf-store@1",
                                              "kvf-engine@both0"],
              "units started: %r" % [u for u, _ in units.procs])
        with open(os.path.join(etc, "sched.tokens")) as f:
            token = f.read().split()[-1]
        sched = "http://%s:7500" % a

        # kvf-sched subscribed to both stores' chunk events and the engine's KV events
        ix = {}
        for _ in range(100):
            got, ix = http(a, "GET", sched + "/v1/index/stats")
            if got == 200 and ix.get("subscriptions") == 3:
                break
            time.sleep(0.2)
        check(ix.get("subscriptions") == 3, "kvf-sched's subscriptions: %r" % ix)

        # The engine on the other host serves through the stores, twice: the second finds it.
        prompt = list(range(7, 7 + 300))
        got, r1 = http(b, "POST", "http://%s:7600/v1/generate" % b,
                       {"id": "d1", "tokens": prompt, "max_tokens": 3}, token)
        check(got == 200 and len(r1.get("tokens", [])) == 3 and r1.get("saved_tokens", 0) > 0,
              "the engine's first request: %d %r" % (got, r1))
        got, r2 = http(b, "POST", "http://%s:7600/v1/generate" % b,
                       {"id": "d2", "tokens": prompt, "max_tokens": 3}, token)
        check(got == 200 and r2.get("tokens") == r1.get("tokens") and
              r2.get("device_tokens", 0) + r2.get("loaded_tokens", 0) > 0,
              "the engine's second request: %d %r" % (got, r2))

        # kvf-sched heard the stores' chunks and the engine's blocks
        for _ in range(100):
            got, ix = http(a, "GET", sched + "/v1/index/stats")
            if ix.get("chunks", 0) > 0 and ix.get("blocks_stored", 0) > 0:
                break
            time.sleep(0.2)
        check(ix.get("chunks", 0) > 0 and ix.get("blocks_stored", 0) > 0 and
              not ix.get("malformed"), "kvf-sched's index after the requests: %r" % ix)

        # The chunks from either host, with the cluster's credential (the engines' tenant)
        env = dict(os.environ, KVF_CREDENTIAL=os.path.join(etc, "cluster.cred"))
        nodes = "%s:7400,%s:7400" % (a, b)
        put = subprocess.run(in_ns(a, [KVF, "put", "--node", nodes, "--synthetic", "512",
                                       "--seed", "3", "--json"]),
                             capture_output=True, text=True, env=env, timeout=60)
        check(put.returncode == 0, "kvf put from %s: %d %s" % (a, put.returncode, put.stderr))
        look = subprocess.run(in_ns(b, [KVF, "lookup", "--node", nodes, "--synthetic", "512",
                                        "--seed", "3", "--json"]),
                              capture_output=True, text=True, env=env, timeout=60)
        try:
            lk = json.loads(look.stdout)
        except ValueError:
            lk = {}
        check(look.returncode == 0 and lk.get("cached_tokens", 0) >= 448,
              "kvf lookup from %s: %d %r %s" % (b, look.returncode, look.stdout, look.stderr))
    except RuntimeError as e:
        check(False, str(e))
    finally:
        units.stop()
        netns_down()
        shutil.rmtree(tmp, ignore_errors=True)
    if failures:
        for f in failures:
            print("FAIL:", f)
        return 1
    print("deploy_check: ok (two hosts on network namespaces: 2 stores, kvf-sched, an engine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
