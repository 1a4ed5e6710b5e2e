#!/usr/bin/env python3
"""`kvf cluster up` with "gpu_share": "mps" (the engines reach a shared GPU through an MPS control
daemon), against a stand-in for nvidia-cuda-mps-control (fake_mps_control.sh; CI has no GPU):
up starts the daemon before the engines and gives every engine its pipe directory; down asks it
to quit after the engines and removes its pipes; an up that fails later undoes it too; a control
program that cannot be run or fails stops up with its reason and nothing left behind; an
operator's daemon (CUDA_MPS_PIPE_DIRECTORY already set) is used, never started or stopped; a bad
"gpu_share" is refused; a daemon that makes no pipes fails up and is asked to quit once; a daemon
an earlier up left (its cluster's processes killed) is stopped by the next up.

usage: cluster_mps_check.py KVF KVF_BENCH TRACE
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_util import alive, fail, run  # noqa: E402

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_mps_control.sh")


def environ_of(pid):
    with open("/proc/%d/environ" % pid, "rb") as f:
        return dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)


def write(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)


def down_quietly(kvf, config):
    run([kvf, "cluster", "down", "--config", config], 60, expect=None)


def calls_of(path):
    with open(path) as f:
        return [c for c in f.read().split("\n") if c]


def main():
    kvf, bench, trace = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.pop("CUDA_MPS_PIPE_DIRECTORY", None)
    os.environ.pop("CUDA_MPS_LOG_DIRECTORY", None)
    os.environ["KVF_MPS_CONTROL"] = FAKE
    with tempfile.TemporaryDirectory() as d:
        name = "mp%d" % (os.getpid() % 100000)
        run_dir = os.path.join(d, "run")
        cfg = {"name": name, "stores": 1, "prefill": 1, "decode": 1, "store_memory": "64M",
               "engine_max_tokens": 2048, "run_dir": run_dir, "gpu_share": "mps"}
        config = os.path.join(d, "cluster.json")
        write(config, cfg)
        state = os.path.join(run_dir, "state.json")
        fake_log = os.path.join(run_dir, "mps", "fake.log")

        # A bad value is refused, the field named; nothing starts.
        write(os.path.join(d, "bad.json"), dict(cfg, gpu_share="exclusive"))
        p = run([kvf, "cluster", "up", "--config", os.path.join(d, "bad.json")], 60, expect=None)
        if p.returncode == 0 or "gpu_share" not in p.stderr or os.path.exists(state):
            fail("a bad gpu_share: exit %d, %r" % (p.returncode, p.stderr))

        try:
            checks(kvf, bench, trace, d, name, cfg, config, state, fake_log)
        finally:  # whatever failed, nothing of the test's is left running
            down_quietly(kvf, config)
            for e in os.listdir("/tmp"):
                if e.startswith("kvf-mps-%s-" % name):
                    p = os.path.join("/tmp", e)
                    os.system("echo quit | CUDA_MPS_PIPE_DIRECTORY=%s %s >/dev/null 2>&1"
                              % (p, FAKE))
                    os.system("rm -rf %s" % p)
    print("cluster_mps_check: ok")


def checks(kvf, bench, trace, d, name, cfg, config, state, fake_log):
    """The checks the module's docstring lists, in order; main cleans up whatever fails."""
    # Up: the daemon first, every engine given its pipes.
    p = run([kvf, "cluster", "up", "--config", config], 180)
    if "gpu share: MPS" not in p.stdout:
        fail("up did not say how the engines share the GPU: %r" % p.stdout)
    with open(state) as f:
        st = json.load(f)
    mps = st.get("mps") or {}
    pipe = mps.get("pipe", "")
    if st.get("gpu_share") != "mps" or not mps.get("started") or \
            not os.path.exists(os.path.join(pipe, "control")):
        fail("state.json after up: %r" % st)
    with open(os.path.join(pipe, "daemon.pid")) as f:
        daemon = int(f.read())
    engines = [q for q in st["procs"] if q["kind"] in ("prefill", "decode")]
    if len(engines) != 2:
        fail("engines in state.json: %r" % st["procs"])
    for q in engines:
        env = environ_of(q["pid"])
        if env.get(b"CUDA_MPS_PIPE_DIRECTORY", b"").decode() != pipe or \
                env.get(b"CUDA_MPS_LOG_DIRECTORY", b"").decode() != mps["log_dir"]:
            fail("%s runs without the daemon's pipes: %r" % (q["name"], env))
    # A run on it says how its engines shared the GPU, in its table and its summary.
    p = run([bench, "e2e", "--config", config, "--trace", trace, "--max-requests", "4",
             "--time-scale", "4", "--max-input", "512", "--max-output", "8",
             "--repetitions", "1", "--out", os.path.join(d, "e2e"), "--json"], 300)
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res.get("gpu_share") != "mps" or "the engines' GPU shared through MPS" not in p.stdout:
        fail("the e2e run does not say it ran under MPS: %r" % res.get("gpu_share"))
    # Down: the engines stopped, then the daemon asked to quit and its pipes removed.
    p = run([kvf, "cluster", "down", "--config", config], 60)
    if "MPS control daemon" not in p.stdout:
        fail("down did not say it stopped the daemon: %r" % p.stdout)
    calls = calls_of(fake_log)
    if calls != ["start pipe=" + pipe, "cmd quit clients=0"]:  # quit after the engines
        fail("the control program's calls: %r" % calls)
    if os.path.exists(pipe) or any(alive(q["pid"]) for q in engines):
        fail("down left the pipes or an engine behind")
    for _ in range(50):  # the stand-in's loop notices within 0.1 s
        if not alive(daemon):
            break
        os.system("sleep 0.1")
    else:
        fail("the daemon still runs after down")
    os.unlink(fake_log)

    # An up that fails after the daemon started (an engine that cannot start: a model no
    # engine knows) undoes it.
    write(os.path.join(d, "late.json"), dict(cfg, model="no-such-model"))
    p = run([kvf, "cluster", "up", "--config", os.path.join(d, "late.json")], 180,
            expect=None)
    if p.returncode == 0:
        run([kvf, "cluster", "down", "--config", os.path.join(d, "late.json")], 60)
        fail("up with an unknown model succeeded")
    calls = calls_of(fake_log)
    if len(calls) != 2 or calls[1] != "cmd quit clients=0" or os.path.exists(state):
        fail("a failed up left the daemon: %r; %r" % (calls, p.stderr[-2000:]))
    started = calls[0].split("=", 1)[1]
    if os.path.exists(started):
        fail("a failed up left the pipes %s" % started)
    os.unlink(fake_log)

    # A control program that cannot be run, or fails: up stops with the reason.
    for env, want in ((dict(KVF_MPS_CONTROL=os.path.join(d, "none")), "could not be run"),
                      (dict(FAKE_MPS_FAIL="1"), "already running")):
        os.environ.update(env)
        p = run([kvf, "cluster", "up", "--config", config], 60, expect=1)
        os.environ["KVF_MPS_CONTROL"] = FAKE
        os.environ.pop("FAKE_MPS_FAIL", None)
        if want not in p.stderr or "timeslice" not in p.stderr or os.path.exists(state):
            fail("up with a control program that %s: %r" % (want, p.stderr))
    if os.path.exists(fake_log):  # the failing one's call
        os.unlink(fake_log)
    # A daemon that makes no pipes: up fails, the daemon asked to quit once, nothing left.
    os.environ["FAKE_MPS_NOPIPE"] = "1"
    p = run([kvf, "cluster", "up", "--config", config], 60, expect=1)
    os.environ.pop("FAKE_MPS_NOPIPE")
    calls = calls_of(fake_log)
    if "made no pipes" not in p.stderr or len(calls) != 2 or \
            not calls[1].startswith("cmd quit: no daemon") or os.path.exists(state):
        fail("a daemon without pipes: %r, %r" % (calls, p.stderr))
    os.unlink(fake_log)
    left = [e for e in os.listdir("/tmp") if e.startswith("kvf-mps-%s-" % name)]
    if left:
        fail("pipe directories left in /tmp: %r" % left)

    # A cluster whose processes died without a down: the next up stops the daemon the
    # earlier one started before it starts its own.
    run([kvf, "cluster", "up", "--config", config], 180)
    with open(state) as f:
        st = json.load(f)
    first = st["mps"]["pipe"]
    for q in st["procs"]:
        os.kill(q["pid"], 9)
    for q in st["procs"]:
        for _ in range(100):
            if not alive(q["pid"]):
                break
            os.system("sleep 0.05")
    p = run([kvf, "cluster", "up", "--config", config], 180)
    run([kvf, "cluster", "down", "--config", config], 60)
    calls = calls_of(fake_log)
    if "an earlier up left" not in p.stdout or os.path.exists(first) or \
            calls[:2] != ["start pipe=" + first, "cmd quit clients=0"] or len(calls) != 4:
        fail("a daemon left by a dead cluster: %r\n%s" % (calls, p.stdout))
    os.unlink(fake_log)

    # The operator's daemon: used as it is; an empty directory is refused.
    theirs = os.path.join(d, "theirs")
    os.mkdir(theirs)
    os.environ["CUDA_MPS_PIPE_DIRECTORY"] = theirs
    p = run([kvf, "cluster", "up", "--config", config], 60, expect=1)
    if "holds no MPS control daemon" not in p.stderr:
        fail("an empty CUDA_MPS_PIPE_DIRECTORY: %r" % p.stderr)
    os.mkfifo(os.path.join(theirs, "control"))
    p = run([kvf, "cluster", "up", "--config", config], 180)
    try:
        with open(state) as f:
            st = json.load(f)
        if st["mps"]["started"] or st["mps"]["pipe"] != theirs:
            fail("state.json with the operator's daemon: %r" % st["mps"])
        for q in st["procs"]:
            if q["kind"] in ("prefill", "decode") and \
                    environ_of(q["pid"]).get(b"CUDA_MPS_PIPE_DIRECTORY") != theirs.encode():
                fail("%s was not given the operator's daemon" % q["name"])
    finally:
        run([kvf, "cluster", "down", "--config", config], 60)
    # "timeslice" with a daemon named in the shell: the engines are not given it.
    ts = os.path.join(d, "ts.json")
    write(ts, dict(cfg, gpu_share="timeslice"))
    p = run([kvf, "cluster", "up", "--config", ts], 180)
    try:
        with open(state) as f:
            st = json.load(f)
        if "not given to the engines" not in p.stdout or "mps" in st or \
                st["gpu_share"] != "timeslice":
            fail("timeslice with CUDA_MPS_PIPE_DIRECTORY set: %r\n%s" % (st, p.stdout))
        for q in st["procs"]:
            if q["kind"] in ("prefill", "decode") and \
                    b"CUDA_MPS_PIPE_DIRECTORY" in environ_of(q["pid"]):
                fail("%s runs under MPS with \"gpu_share\": \"timeslice\"" % q["name"])
    finally:
        run([kvf, "cluster", "down", "--config", ts], 60)
        os.environ.pop("CUDA_MPS_PIPE_DIRECTORY")
    if os.path.exists(fake_log) or os.path.exists(os.path.join(theirs, "fake.log")) or \
            not os.path.exists(os.path.join(theirs, "control")):
        fail("the launcher started or stopped the operator's daemon")


if __name__ == "__main__":
    main()
