"""python -m kvfabric.serve as a cluster runs it, on loopback: a kvf-store, a kvf-sched and two
serving processes (prefill-only and decode-only) with a tiny Llama-architecture model (random
weights, plain torch, CPU). A disaggregated request prefills on one, hands the KV over through
the store and decodes on the other with exactly the tokens the model gives computed whole; the
scheduler learns the prefill engine's blocks from its KV events; bad requests get 4xx answers and
the servers go on. Also: safetensors checkpoints written, read and loaded, the same logits.
"""

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

try:
    import torch
except ImportError:
    torch = None

from test_binding import Store

SCHED_BIN = os.environ.get("KVF_SCHED_BIN", "kvf-sched")

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 500, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "torch_dtype": "float32"}


def call(addr, path, body=None, token=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://{addr}{path}", data=data,
                                 method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def started(p, what, marker):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if marker in line:
            return line.split("listen=")[1].split()[0]
    p.kill()
    raise RuntimeError(f"{what} did not start")


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p.stdout:
        p.stdout.close()


def prompt(n, seed):
    r = random.Random(seed)
    return [r.randrange(500) for _ in range(n)]


@unittest.skipIf(torch is None, "torch is not installed")
class TestServe(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kvf-serve-")
        cls.cfg = os.path.join(cls.dir, "tiny-llama.json")
        with open(cls.cfg, "w") as f:
            json.dump(TINY, f)
        cls.store = Store(memory="64M")
        cls.sched_p = subprocess.Popen(
            [SCHED_BIN, "--listen", "127.0.0.1:0", "--policy", "kvf_cost", "--stores",
             cls.store.addr, "--chunk-tokens", "64", "--log-level", "warn",
             "--placement-ack-s", "5"],  # a slow CPU host's report still finds its ticket
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        cls.sched = started(cls.sched_p, "kvf-sched", "kvf-sched ready")
        cls.engines = {}
        for role in ("prefill", "decode"):
            p = subprocess.Popen(
                [sys.executable, "-m", "kvfabric.serve", "--id", f"{role}0", "--role", role,
                 "--sched", cls.sched, "--events", "127.0.0.1:0", "--model", cls.cfg,
                 "--backend", "torch", "--device", "cpu", "--chunk-tokens", "64",
                 "--max-tokens", "2048", "--seed", "7", "--zone", f"zone-{role}"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            cls.engines[role] = (p, started(p, f"kvfabric.serve {role}", "kvf-engine ready"))

    @classmethod
    def tearDownClass(cls):
        for p, _ in cls.engines.values():
            stop(p)
            if p.stderr:
                p.stderr.close()
        stop(cls.sched_p)
        cls.store.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)

    def reference(self, tokens, n):
        """Greedy tokens of the same model (same config and seed) computed whole in-process."""
        from kvfabric import models
        model, factory, _ = models.build(models.config(self.cfg), "torch", "cpu", "f32", 7)
        cache, out = factory(), []
        with torch.no_grad():
            ids = torch.tensor([tokens])
            for _ in range(n):
                nxt = int(model(input_ids=ids, past_key_values=cache).logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.tensor([[nxt]])
        return out

    def test_disaggregated_request_through_the_store(self):
        pre, dec = self.engines["prefill"][1], self.engines["decode"][1]
        toks = prompt(300, 1)  # 4 whole chunks of 64, and 44 tokens more
        st, p = call(pre, "/v1/prefill", {"tokens": toks})
        self.assertEqual(st, 200, p)
        self.assertEqual(p["saved_tokens"], 256)
        self.assertEqual(p["label"], "real")
        self.assertTrue(p["tail_saved"])  # the last 44 tokens too, in a padded chunk
        st, d = call(dec, "/v1/decode", {"tokens": toks, "first_token": p["tokens"][0],
                                         "max_tokens": 6, "expect_cached": 256})
        self.assertEqual(st, 200, d)
        self.assertEqual(d["loaded_tokens"], 300)  # the whole prompt: nothing computed
        self.assertTrue(d["handed_over"])
        self.assertFalse(d["first_token_mismatch"])
        self.assertEqual(len(d["itl_s"]), 5)
        self.assertEqual(d["tokens"], self.reference(toks, 6))
        # a prompt extending it: its chunks are there, the padded tail of the first is not used
        longer = toks + prompt(30, 4)
        st, d2 = call(dec, "/v1/decode", {"tokens": longer, "first_token": 7, "max_tokens": 3})
        self.assertEqual(st, 200, d2)
        self.assertFalse(d2["handed_over"])
        self.assertEqual(d2["device_tokens"] + d2["loaded_tokens"], 256)
        self.assertEqual(d2["tokens"][1:], self.reference(longer + [7], 2))
        # the same prompt again on the prefill engine: its own KV (device), nothing loaded
        st, again = call(pre, "/v1/prefill", {"tokens": toks})
        self.assertEqual(again["device_tokens"], 256)
        self.assertEqual(again["loaded_tokens"], 0)
        self.assertEqual(again["tokens"][0], p["tokens"][0])
        # kvf-sched learned the prefill engine's blocks from its events
        blocks = 0
        for _ in range(100):
            st, s = call(self.sched, "/v1/index/stats")
            blocks = s.get("blocks_stored", 0)
            if blocks >= 300 // 16:
                break
            time.sleep(0.05)
        self.assertGreaterEqual(blocks, 300 // 16)
        st, pl = call(self.sched, "/v1/place", {"tokens": toks, "output_tokens": 4})
        self.assertEqual(st, 200, pl)
        self.assertGreater(pl["cached_tokens"]["device"] + pl["cached_tokens"]["store"], 0)
        # the plan's ticket, passed on to the engine it names: that engine's load reports list
        # it, and kvf-sched counts the request's work once
        eng = self.engines[pl["prefill"][:-1]][1]
        st, _ = call(eng, "/v1/generate" if pl["colocated"] else "/v1/prefill",
                     {"tokens": toks, "ticket": pl["ticket"]})
        self.assertEqual(st, 200)
        acked = 0
        for _ in range(100):
            st, s = call(self.sched, "/v1/index/stats")
            acked = s["placement_tickets"]["acked"]
            if acked:
                break
            time.sleep(0.05)
        self.assertEqual(acked, 1)
        for bad in (-1, 1.5, "7", True, 1 << 54):
            st, e = call(pre, "/v1/prefill", {"tokens": toks, "ticket": bad})
            self.assertEqual(st, 400, e)
            self.assertIn("ticket", e["error"])
        # the engines' zones (--zone) are in their registrations
        st, ins = call(self.sched, "/v1/instances")
        self.assertEqual({i["id"]: i.get("zone") for i in ins["instances"]},
                         {"prefill0": "zone-prefill", "decode0": "zone-decode"})
        st, h = call(pre, "/v1/health")
        self.assertEqual(h["failures"], 0)
        self.assertEqual(h["decode_steps"], "eager steps: not a CUDA device")
        self.assertGreaterEqual(h["connector"]["chunks_saved"], 4)
        self.assertEqual(h["queued_prefill_s"], 0)  # nothing waits now
        # /metrics: kvf-engine's series, through libkvf's registry
        with urllib.request.urlopen(f"http://{pre}/metrics", timeout=30) as r:
            self.assertTrue(r.headers["Content-Type"].startswith("text/plain; version=0.0.4"))
            text = r.read().decode()
        self.assertIn('kvf_engine_requests_total{kind="prefill",result="ok"}', text)
        self.assertIn("# TYPE kvf_engine_request_phase_seconds histogram", text)
        self.assertIn("# TYPE kvf_engine_chunks_saved_total counter", text)
        if shutil.which("promtool"):
            p = subprocess.run(["promtool", "check", "metrics"], input=text, text=True,
                               capture_output=True, timeout=30)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_generate_reuse_modes_agree(self):
        dec = self.engines["decode"][1]
        base = prompt(200, 2)
        outs = []
        for reuse in (False, "engine", True):
            st, g = call(dec, "/v1/generate", {"tokens": base + [int(reuse is True)], "max_tokens": 4,
                                               "reuse": reuse})
            self.assertEqual(st, 200, g)
            outs.append((g["tokens"], g["device_tokens"], g["loaded_tokens"]))
        self.assertEqual(outs[0][0], self.reference(base + [0], 4))
        self.assertEqual(outs[1][0], outs[0][0])
        self.assertEqual(outs[1][1], 192)  # the engine's own KV of the previous sequence
        self.assertEqual(outs[2][0], self.reference(base + [1], 4))

    def test_streamed_first_token(self):
        """"stream": true: the first token on a line of its own as the pass gives it, then the
        answer as the last line of a chunked application/x-ndjson reply; the connection serves
        the next request; a stream that is not a boolean is refused."""
        import http.client
        dec = self.engines["decode"][1]
        host, port = dec.rsplit(":", 1)
        toks = prompt(200, 5)
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            for path in ("/v1/generate", "/v1/prefill"):
                c.request("POST", path, json.dumps({"tokens": toks, "max_tokens": 4,
                                                    "reuse": False, "stream": True}),
                          {"Content-Type": "application/json"})
                r = c.getresponse()
                self.assertEqual(r.status, 200)
                self.assertEqual(r.getheader("Content-Type"), "application/x-ndjson")
                first = json.loads(r.readline())
                rest = [ln for ln in r.read().split(b"\n") if ln.strip()]
                self.assertEqual(len(rest), 1, rest)
                last = json.loads(rest[0])
                self.assertEqual(first["first_token"], last["tokens"][0], path)
                want = self.reference(toks, 4 if path == "/v1/generate" else 1)
                self.assertEqual(last["tokens"], want, path)
            c.request("POST", "/v1/generate", json.dumps({"tokens": toks, "stream": "yes"}),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            self.assertEqual(r.status, 400)
            self.assertIn("stream", json.loads(r.read())["error"])
        finally:
            c.close()

    def test_prefetch_while_waiting(self):
        """A request that finds the engine busy fetches its prefix while it waits and loads it at
        its turn from memory: tokens as computed whole; a bad load_deadline_ms is refused."""
        pre = self.engines["prefill"][1]
        toks = prompt(330, 11)
        st, r = call(pre, "/v1/prefill", {"tokens": toks})  # its 5 chunks into the store
        self.assertEqual(st, 200, r)
        for bad in (-5, "soon", True, 1e12):
            st, r = call(pre, "/v1/generate", {"tokens": toks, "load_deadline_ms": bad})
            self.assertEqual(st, 400, (bad, r))
            self.assertIn("load_deadline_ms", r["error"])
        done = {}

        def long_one():  # holds the engine: a long decode, nothing reused
            done["r"] = call(pre, "/v1/generate", {"tokens": prompt(1200, 12), "max_tokens": 300,
                                                   "reuse": False})
        th = threading.Thread(target=long_one)
        th.start()
        for _ in range(2000):  # 10 s at most: a loaded machine may start it late
            if call(pre, "/v1/health")[1]["active_decodes"] >= 1:
                break
            time.sleep(0.005)
        else:
            self.fail("the long request never held the engine")
        # the plan's sources naming this engine's store (its own node for every chunk: nothing
        # named) and one it does not use (passed over, counted)
        src = [{"store": self.store.addr, "from": 0, "tokens": 320},
               {"store": "127.0.0.1:1", "from": 0, "tokens": 64}, {"more": True}]
        st, g = call(pre, "/v1/generate", {"tokens": toks, "max_tokens": 4,
                                           "load_deadline_ms": 60000, "sources": src})
        th.join(120)
        self.assertEqual(done["r"][0], 200, done["r"])
        self.assertEqual(st, 200, g)
        self.assertIn("prefetch", g, g)
        pf = g["prefetch"]
        self.assertEqual((pf["tokens"], pf["ready_tokens"], pf["deadline_missed"], pf["label"]),
                         (320, 320, False, "real"))
        self.assertEqual(g["loaded_tokens"], 320)
        self.assertEqual(g["tokens"], self.reference(toks, 4))
        st, h = call(pre, "/v1/health")
        self.assertGreaterEqual(h["connector"]["prefetches"], 1)
        self.assertEqual(h["connector"]["prefetch_named"], 0, h)
        self.assertEqual(h["connector"]["prefetch_sources_unknown"], 1, h)
        for bad in ("here", [{"store": 7, "from": 0, "tokens": 1}],
                    [{"store": "a:1", "from": True, "tokens": 1}], [{"more": True}] * 65):
            st, r = call(pre, "/v1/generate", {"tokens": toks, "sources": bad})
            self.assertEqual(st, 400, (bad, r))
            self.assertIn("sources", r["error"])
        # At rest, its pages holding another prompt: the layerwise load takes the same sources
        # (Connector.load(sources=...)); tokens as computed whole.
        st, r = call(pre, "/v1/generate", {"tokens": prompt(200, 14), "max_tokens": 1,
                                           "reuse": False})
        self.assertEqual(st, 200, r)
        st, g = call(pre, "/v1/generate", {"tokens": toks, "max_tokens": 4, "sources": src})
        self.assertEqual(st, 200, g)
        self.assertNotIn("prefetch", g, g)
        self.assertEqual((g["loaded_tokens"], g["load_named"], g["load_named_reasked"]),
                         (320, 0, 0), g)
        self.assertEqual(g["tokens"], self.reference(toks, 4))

    def test_bad_requests_are_refused(self):
        pre = self.engines["prefill"][1]
        for body, code in (({"tokens": []}, 400), ({"tokens": [1, -2]}, 400),
                           ({"tokens": [1], "reuse": "x"}, 400),
                           ({"tokens": [1], "max_tokens": "9"}, 400),
                           ({"tokens": [1] * 4000}, 413), ([1, 2], 400),
                           ({"tokens": [1, 500]}, 400),  # the vocabulary is 500
                           ({"tokens": [1, 2], "first_token": -1}, 400)):
            st, r = call(pre, "/v1/generate", body)
            self.assertEqual(st, code, (body, r))
            self.assertIn("error", r)
        st, r = call(pre, "/v1/generate", raw=b"{not json")
        self.assertEqual(st, 400)
        st, r = call(pre, "/v1/nothing", {"tokens": [1]})
        self.assertEqual(st, 404)
        st, r = call(pre, "/v1/prefill", {"tokens": prompt(70, 3)})
        self.assertEqual(st, 200, r)  # still serving

    def test_a_client_that_leaves_stops_its_decode(self):
        """A generation whose client closed its connection stops decoding at the next token
        (abandoned in /v1/health, requests_abandoned_total), as kvf-engine's does."""
        pre = self.engines["prefill"][1]
        before = call(pre, "/v1/health")[1]["abandoned"]
        body = json.dumps({"tokens": prompt(40, 21), "max_tokens": 1900,
                           "reuse": False}).encode()
        host, port = pre.rsplit(":", 1)
        sk = socket.create_connection((host, int(port)), timeout=10)
        sk.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        for _ in range(1000):  # 10 s at most
            if call(pre, "/v1/health")[1]["running"]:
                break
            time.sleep(0.01)
        sk.close()
        for _ in range(600):  # 60 s at most
            h = call(pre, "/v1/health")[1]
            if h["abandoned"] > before and not h["running"]:
                break
            time.sleep(0.1)
        else:
            self.fail(f"the abandoned generation was not stopped: {h}")
        self.assertIn("kvf_engine_requests_abandoned_total", urllib.request.urlopen(
            f"http://{pre}/metrics", timeout=10).read().decode())
        st, r = call(pre, "/v1/prefill", {"tokens": prompt(70, 3)})
        self.assertEqual(st, 200, r)  # still serving

    def test_a_dead_store_is_a_miss_not_a_failure(self):
        """The store gone under a colocated engine: its requests are computed whole and answered
        with the model's tokens; the answer says what failed."""
        store = Store(memory="32M")
        p = subprocess.Popen(
            [sys.executable, "-m", "kvfabric.serve", "--id", "alone", "--store", store.addr,
             "--model", self.cfg, "--backend", "torch", "--device", "cpu", "--chunk-tokens",
             "64", "--max-tokens", "2048", "--seed", "7"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            addr = started(p, "kvfabric.serve alone", "kvf-engine ready")
            a = prompt(200, 9)
            st, g = call(addr, "/v1/generate", {"tokens": a, "max_tokens": 3})
            self.assertEqual((st, g["saved_tokens"]), (200, 192), g)
            store.stop()
            b = prompt(150, 10)
            st, g = call(addr, "/v1/generate", {"tokens": b, "max_tokens": 3})
            self.assertEqual(st, 200, g)
            self.assertEqual(g["tokens"], self.reference(b, 3))
            self.assertEqual(g["loaded_tokens"], 0)
            self.assertNotEqual((g["load_error"], g["save_error"]), ("KVF_OK", "KVF_OK"), g)
            st, h = call(addr, "/v1/health")
            self.assertEqual(h["failures"], 0)
        finally:
            stop(p)
            if p.stderr:
                p.stderr.close()
            store.stop()

    def test_a_restarted_scheduler_learns_what_the_engine_held(self):
        """kvf-sched restarted while an engine serves: the engine registers again (its load
        report gets a 404), and the new kvf-sched, whose first batch from it is not the first,
        asks its replay socket for the earlier ones: the prefix the engine held before the
        restart is in the new index, its later blocks (whose parents are those) too."""
        import socket
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        addr = f"127.0.0.1:{port}"

        def sched():
            p = subprocess.Popen([SCHED_BIN, "--listen", addr, "--stores", self.store.addr,
                                  "--log-level", "warn"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            started(p, "kvf-sched", "kvf-sched ready")
            return p

        s1 = sched()
        e = subprocess.Popen(
            [sys.executable, "-m", "kvfabric.serve", "--id", "rejoin", "--sched", addr,
             "--events", "127.0.0.1:0", "--model", self.cfg, "--backend", "torch", "--device",
             "cpu", "--chunk-tokens", "64", "--max-tokens", "2048", "--seed", "7"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        s2 = None
        try:
            eng = started(e, "kvfabric.serve rejoin", "kvf-engine ready")
            base = prompt(256, 11)  # 16 blocks
            self.assertEqual(call(eng, "/v1/generate", {"tokens": base, "reuse": "engine"})[0],
                             200)
            stop(s1)
            s2 = sched()
            for _ in range(80):  # the engine's next load report (<= 5 s) registers it again
                st, ins = call(addr, "/v1/instances")
                if any(i["id"] == "rejoin" for i in ins.get("instances", [])):
                    break
                time.sleep(0.1)
            else:
                self.fail("the engine did not register again")
            # Each request extends the held prefix by a different block: one batch each, whose
            # parent is the prefix stored before the restart. A subscriber misses the first
            # batches while it connects: go on until the new kvf-sched has asked for the past.
            stats = {}
            for k in range(40):
                ext = base + prompt(16, 100 + k)
                self.assertEqual(call(eng, "/v1/generate", {"tokens": ext, "reuse": "engine"})[0],
                                 200)
                st, stats = call(addr, "/v1/index/stats")
                if stats.get("late_joins", 0) >= 1 and stats.get("blocks", 0) >= 17:
                    break
                time.sleep(0.05)
            self.assertGreaterEqual(stats.get("late_joins", 0), 1, stats)
            self.assertGreaterEqual(stats.get("batches_replayed", 0), 1, stats)
            st, pl = call(addr, "/v1/place", {"tokens": base + [1], "output_tokens": 1})
            self.assertEqual(st, 200, pl)
            self.assertEqual(pl["cached_tokens"]["device"], 256, pl)
        finally:
            stop(e)
            for p in (s1, s2):
                if p is not None:
                    stop(p)
            if e.stderr:
                e.stderr.close()

    @unittest.skipIf(shutil.which("etcd") is None, "etcd is not installed")
    def test_registers_in_etcd(self):
        """--etcd: the engine registers /kvfabric/CLUSTER/engines/ID under a lease; a kvf-sched
        following the cluster learns it from there alone (no --sched), and removes it as soon
        as it stops (the lease revoked) -- and within the lease after a kill -9."""
        import socket
        ports = []
        for _ in range(2):
            with socket.socket() as sk:
                sk.bind(("127.0.0.1", 0))
                ports.append(sk.getsockname()[1])
        url = f"http://127.0.0.1:{ports[0]}"
        data = os.path.join(self.dir, "etcd")
        etcd = subprocess.Popen(
            ["etcd", "--data-dir", data, "--listen-client-urls", url, "--advertise-client-urls",
             url, "--listen-peer-urls", f"http://127.0.0.1:{ports[1]}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{ports[1]}",
             "--initial-cluster", f"default=http://127.0.0.1:{ports[1]}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = [etcd]

        def ids(addr):
            return sorted(i["id"] for i in call(addr, "/v1/instances")[1].get("instances", []))

        def engine():
            p = subprocess.Popen(
                [sys.executable, "-m", "kvfabric.serve", "--id", "etcd0", "--etcd", url,
                 "--cluster", "pytest", "--etcd-ttl", "2", "--model", self.cfg, "--backend",
                 "torch", "--device", "cpu", "--chunk-tokens", "64", "--max-tokens", "2048"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            engine.addr = started(p, "kvfabric.serve --etcd", "kvf-engine ready")
            return p

        def until(cond, secs):
            end = time.monotonic() + secs
            while time.monotonic() < end and not cond():
                time.sleep(0.1)
            return cond()

        try:
            from kvfabric.etcd import wait_healthy
            self.assertTrue(wait_healthy(url, 10), "etcd did not become healthy")
            sp = subprocess.Popen([SCHED_BIN, "--listen", "127.0.0.1:0", "--etcd", url,
                                   "--cluster", "pytest", "--log-level", "warn"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(sp)
            sched = started(sp, "kvf-sched --etcd", "kvf-sched ready")
            e = engine()
            self.assertTrue(until(lambda: ids(sched) == ["etcd0"], 10), ids(sched))
            # its load goes to the replica it found in etcd (it was given no --sched)
            st, g = call(engine.addr, "/v1/generate", {"tokens": prompt(100, 3), "max_tokens": 2})
            self.assertEqual(st, 200, g)

            def used():
                inst = call(sched, "/v1/instances")[1].get("instances", [])
                return [i["load"]["used_blocks"] for i in inst]
            self.assertTrue(until(lambda: used() and used()[0] > 0, 10), used())
            stop(e)  # SIGTERM: the lease is revoked, the instance goes at once
            self.assertTrue(until(lambda: ids(sched) == [], 2), ids(sched))
            e = engine()
            self.assertTrue(until(lambda: ids(sched) == ["etcd0"], 10), ids(sched))
            e.kill()  # kill -9: the lease lapses
            e.wait()
            self.assertTrue(until(lambda: ids(sched) == [], 10), ids(sched))
        finally:
            for p in reversed(procs):
                stop(p)
                if getattr(p, "stderr", None):
                    p.stderr.close()

    def test_refuses_bad_options(self):
        for args, why in ((["--listen", "0.0.0.0:0"], "refusing"),
                          (["--model", "no-such-model"], "not a known model"),
                          (["--max-tokens", "10"], "max-tokens"),
                          (["--prefetch-memory", "lots"], "prefetch-memory"),
                          (["--model", self.cfg, "--backend", "torch", "--device", "cpu",
                            "--save-beside", "0"], "--save-beside: a number of tokens"),
                          (["--model", self.cfg, "--backend", "torch", "--device", "cpu",
                            "--release-below", "lots"], "--release-below: a size"),
                          (["--model", self.cfg, "--backend", "torch", "--device", "cpu",
                            "--cuda-graphs", "on"], "--cuda-graphs: CUDA graphs")):
            p = subprocess.run([sys.executable, "-m", "kvfabric.serve", "--id", "x", *args],
                               capture_output=True, text=True, timeout=60)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn(why, p.stderr)


class SlowProxy:
    """A TCP proxy on loopback whose answers (store to client) are held to `rate` bytes/s: a
    store on a slow link, for the engine's load-or-recompute decision."""

    def __init__(self, upstream, rate):
        import socket
        import threading
        self.up, self.rate, self.stop = upstream, rate, threading.Event()
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.ls.settimeout(0.2)
        self.addr = "127.0.0.1:%d" % self.ls.getsockname()[1]
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _pump(self, a, b, slow):
        try:
            while not self.stop.is_set():
                data = a.recv(4096)
                if not data:
                    break
                b.sendall(data)
                if slow:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(2)
            except OSError:
                pass

    def _accept(self):
        import socket
        import threading
        while not self.stop.is_set():
            try:
                c, _ = self.ls.accept()
            except OSError:
                continue
            host, port = self.up.rsplit(":", 1)
            u = socket.create_connection((host, int(port)))
            self.socks += [c, u]
            threading.Thread(target=self._pump, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, True), daemon=True).start()

    def close(self):
        self.stop.set()
        self.ls.close()
        for x in self.socks:
            try:
                x.close()
            except OSError:
                pass


@contextlib.contextmanager
def fast_and_slow(cfg, name, rate, deadline_ms, another=False):
    """A tiny model built from cfg, a kvf-store, and two connectors to it in one namespace: one
    direct, one through a SlowProxy of `rate` bytes per second. Yields (model, factory, layout,
    fast_cn, slow_cn), and with `another` a second direct connector after them (an engine of
    its own: a connector moves one engine's pages, and another engine's prefetch in flight keeps
    it from taking them); stops everything after."""
    import kvfabric as kvf
    from kvfabric import models
    layout = models.layout_for(cfg, name, page_tokens=16, chunk_tokens=64, dtype="f32")
    model, factory, _ = models.build(cfg, "torch", "cpu", "f32", 7)
    store = Store(memory="64M", extra=("--shm", "off"))
    proxy = SlowProxy(store.addr, rate)
    try:
        with kvf.Connector(layout, nodes=[store.addr], salt=name) as fast_cn, \
                kvf.Connector(layout, nodes=[proxy.addr], salt=name, deadline_ms=deadline_ms) \
                as slow_cn, kvf.Connector(layout, nodes=[store.addr], salt=name) as other_cn:
            yield (model, factory, layout, fast_cn, slow_cn) + ((other_cn,) if another else ())
    finally:
        proxy.close()
        store.stop()


@unittest.skipIf(torch is None, "torch is not installed")
class TestWarmUp(unittest.TestCase):
    """kvfabric.calibration.warm_up on a real engine with a store: its passes measured (two
    length classes, the cold one not), nothing saved to the store nor left in the engine's
    cache, and the next request's tokens the model's own."""

    def test_warm_up_a_real_engine(self):
        from kvfabric.calibration import warm_up
        from kvfabric.engine import Engine
        cfg = dict(TINY, num_hidden_layers=4)
        with fast_and_slow(cfg, "tiny-warm", 10 ** 9, 20000) as (model, factory, layout, cn, _):
            e = Engine(model, layout, factory, connector=cn, max_tokens=2048)
            said = []
            warm_up(e, TINY["vocab_size"], lambda lvl, msg: said.append(msg))
            self.assertIn("warmed up", said[0])
            m = e.rates.model()
            self.assertIsNotNone(m)
            self.assertEqual(m["classes"], 2, m)  # 256 and 1,024 tokens; not the cold 64
            self.assertEqual((e.last_tokens, e.last_cache), ([], None))
            toks = [(i * 2654435761 + 7) % TINY["vocab_size"] for i in range(1024)]
            self.assertEqual(cn.lookup(toks), 0, "the warm-up saved nothing")
            p = prompt(300, 5)
            got = e.run("generate", p, max_tokens=4)
            self.assertEqual(got.tokens, TestLoadOrRecompute.reference(model, factory, p, 4))


@unittest.skipIf(torch is None, "torch is not installed")
class TestPrefetch(unittest.TestCase):
    """The engine's prefetch in-process: the stores held one chunk when the request arrived and
    three at its turn: the prefetch's chunk and the stores' other two are loaded side by side;
    through a slow link a deadline cuts the prefetch and the rest is computed, the stores' other
    chunks not fetched after it; the tokens are the model's own every time."""

    def test_prefetch_and_deadline(self):
        from kvfabric.engine import Engine
        toks = prompt(200, 61)
        # 20 KB/s through the slow connector: a chunk of this model's KV takes 2 s.
        with fast_and_slow(TINY, "tiny-pf", 20000, 30000, another=True) as (
                model, factory, layout, fast_cn, slow_cn, saver_cn):
            want = TestLoadOrRecompute.reference(model, factory, toks, 3)
            saver = Engine(model, layout, factory, connector=saver_cn, max_tokens=1024)
            user = Engine(model, layout, factory, connector=fast_cn, max_tokens=1024)
            saver.run("prefill", toks[:70])  # one chunk in the stores
            pf = user.prefetch(toks)
            self.assertEqual(pf.tokens, 64)
            self.assertEqual(pf.wait(), 64)
            saver.run("prefill", toks)  # three now
            o = user.run("generate", toks, max_tokens=3, prefetch=pf)
            pf.close()
            self.assertEqual(o.prefetch["ready_tokens"], 64)
            self.assertEqual(o.loaded_tokens, 192)
            self.assertEqual(o.tokens, want)
            # Slow: a 0.3 s deadline, nothing arrived by then: computed, nothing more loaded.
            slow = Engine(model, layout, factory, connector=slow_cn, max_tokens=1024)
            pf = slow.prefetch(toks)
            self.assertEqual(pf.tokens, 192)
            o = slow.run("generate", toks, max_tokens=3, prefetch=pf,
                         deadline=time.monotonic() + 0.3)
            pf.close()
            self.assertTrue(o.prefetch["deadline_missed"])
            self.assertLess(o.prefetch["ready_tokens"], 192)
            self.assertEqual(o.loaded_tokens, o.prefetch["ready_tokens"])
            self.assertEqual(o.tokens, want)
            self.assertGreaterEqual(fast_cn.stats()["prefetch_chunks_loaded"], 1)


@unittest.skipIf(torch is None, "torch is not installed")
class TestLoadOrRecompute(unittest.TestCase):
    """The engine's per-request decision from what it measured: behind a slow link it
    recomputes (after cutting the first load, taken before anything was measured, at a layer
    boundary); over a fast one it loads; the tokens are the model's own either way."""

    def test_slow_link_recomputes_fast_link_loads(self):
        from kvfabric.engine import Engine
        cfg = dict(TINY, num_hidden_layers=8)
        # 200 KB/s through the slow connector: 192 tokens of KV take 2 s.
        with fast_and_slow(cfg, "tiny-lor", 200000, 20000) as (model, factory, layout, fast_cn,
                                                                slow_cn):
            saver = Engine(model, layout, factory, connector=fast_cn, max_tokens=1024)
            slow = Engine(model, layout, factory, connector=slow_cn, max_tokens=1024)
            prompts = [prompt(200, 40 + k) for k in range(4)]
            for p in prompts:
                saver.run("prefill", p)  # the stores hold their first 192 tokens
            slow.run("generate", prompt(200, 99), reuse="none")  # the compute rate
            first = slow.run("generate", prompts[0], max_tokens=3)
            self.assertEqual(first.decision["choice"], "load")  # nothing measured yet
            self.assertEqual(first.decision["outcome"], "cut, recomputed", first.decision)
            self.assertEqual(first.tokens, self.reference(model, factory, prompts[0], 3))
            second = slow.run("generate", prompts[1], max_tokens=3)
            self.assertEqual(second.decision["choice"], "recompute", second.decision)
            self.assertEqual(second.loaded_tokens, 0)
            self.assertEqual(second.tokens, self.reference(model, factory, prompts[1], 3))
            fast = Engine(model, layout, factory, connector=fast_cn, max_tokens=1024)
            fast.run("generate", prompts[2], max_tokens=2)  # nothing measured: loads
            self.assertGreater(fast.rates.load_bps, 0)  # and measures the link
            # A link far faster than computing (set, not measured: a loaded machine's measure
            # of a millisecond's load swings more than this test can bound).
            fast.rates.load_bps, fast.rates.s_per_token = 1e12, 1e-3
            third = fast.run("generate", prompts[3], max_tokens=3)
            self.assertEqual(third.decision["choice"], "load", third.decision)
            self.assertEqual(third.loaded_tokens, 192)
            self.assertEqual(third.tokens, self.reference(model, factory, prompts[3], 3))

    @staticmethod
    def reference(model, factory, tokens, n):
        cache, out, ids = factory(), [], torch.tensor([tokens])
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(input_ids=ids, past_key_values=cache).logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.tensor([[nxt]])
        return out


@unittest.skipIf(torch is None, "torch is not installed")
class TestGraphSteps(unittest.TestCase):
    """Decoding steps through kvfabric.graphstep's code (eager here: graphs need a GPU) in the
    engine: a handoff's first step as the layers arrive, the steps after it, a generate, and a
    sequence that outgrows the staging pages: the model's own tokens every time."""

    def test_handoff_and_generate_through_the_step(self):
        from kvfabric.engine import Engine
        toks = prompt(150, 71)
        with fast_and_slow(TINY, "tiny-gs", 10 ** 9, 30000) as (model, factory, layout, cn, _):
            want = TestLoadOrRecompute.reference(model, factory, toks, 6)
            pre = Engine(model, layout, factory, connector=cn, max_tokens=256)
            dec = Engine(model, layout, factory, connector=cn, max_tokens=256, graphs="eager")
            self.assertIsNotNone(dec.graph)
            self.assertIsNone(pre.graph)
            p = pre.run("prefill", toks)
            self.assertTrue(p.tail_saved)
            calls = []
            real = dec.graph.step
            dec.graph.step = lambda *a, **k: calls.append(a[:2]) or real(*a, **k)
            o = dec.run("decode", toks, max_tokens=6, first_token=p.tokens[0])
            self.assertTrue(o.handed_over)
            self.assertFalse(o.first_token_mismatch)
            self.assertEqual(o.tokens, want)
            self.assertEqual([c[1] for c in calls], list(range(150, 155)))
            g = dec.run("generate", toks, max_tokens=4, reuse="none")
            self.assertEqual(g.tokens, want[:4])
            # up to the end of the pages (256 rows here)
            long = prompt(250, 72)
            g = dec.run("generate", long, max_tokens=5, reuse="none")
            self.assertEqual(g.tokens, TestLoadOrRecompute.reference(model, factory, long, 5))
        with self.assertRaises(ValueError):
            Engine(model, layout, factory, connector=None, graphs="on")


def same_kv(a, b, n):
    """The first n positions of every layer's K and V in two engines' staging pages are equal, bit
    for bit (a's computed, b's loaded from what a saved)."""
    for (ka, va), (kb, vb) in zip(a.staging.planes(), b.staging.planes()):
        assert torch.equal(ka[:n], kb[:n]) and torch.equal(va[:n], vb[:n])


class _SaveSpy:
    """A save whose layer reports, cancel and close are logged (and one report made to fail)."""

    def __init__(self, sv, log, fail_at=None):
        self.sv, self.log, self.fail_at = sv, log, fail_at

    def layer_done(self, layer, stream=None):
        self.log.append(("done", layer))
        if layer == self.fail_at:
            from kvfabric.errors import KvfError
            raise KvfError(-5, f"save: layer {layer}", "refused by the test")
        self.sv.layer_done(layer, stream)

    def cancel(self):
        self.log.append(("cancel",))
        self.sv.cancel()

    def close(self):
        self.log.append(("close",))
        self.sv.close()

    def __getattr__(self, name):
        return getattr(self.sv, name)


@unittest.skipIf(torch is None, "torch is not installed")
class TestSaveBeside(unittest.TestCase):
    """A prefill's save runs beside its forward pass: each layer is reported to the save as the
    model finishes it, before the next layer runs; the chunks stored are those a save after the
    pass stores (a decode engine loads the whole prompt, gives the model's tokens, and its pages
    hold the prefill's KV bit for bit). A layer the save refuses sends the whole save after the
    pass; a pass that fails cancels and frees its save (after its last decoder layer, the batch
    may be put: it is what the layers computed), and the engine serves the next request. A pass shorter than save_beside_tokens
    saves after it."""

    def test_save_overlaps_the_pass(self):
        from kvfabric.engine import Engine
        with fast_and_slow(TINY, "tiny-sb", 10 ** 9, 30000) as (model, factory, layout, cn, _):
            pre = Engine(model, layout, factory, connector=cn, max_tokens=512,
                         save_beside_tokens=0)  # beside for every prompt here
            dec = Engine(model, layout, factory, connector=cn, max_tokens=512)
            log = []
            real_save, fail = cn.save, [None]

            def spy(*a, **k):  # the failure asked for, in the next save only
                f, fail[0] = fail[0], None
                return _SaveSpy(real_save(*a, **k), log, f)
            cn.save = spy
            for i, layer in enumerate(pre.layers):
                layer.register_forward_pre_hook(lambda m, a, i=i: log.append(("run", i)))
            # the first pass pauses before its second layer, as a real model's layer takes
            # time: the save's first layer is gathered while the pass runs, so the save is
            # paced and goes in parts (a loaded machine gathered a tiny model's first layer
            # only after every layer was reported, and put the save whole, rightly)
            pause = [0.3]
            pre.layers[1].register_forward_pre_hook(lambda m, a: time.sleep(pause[0]))
            # 1. beside the pass, in order
            toks = prompt(150, 81)
            want = TestLoadOrRecompute.reference(model, factory, toks, 4)
            log.clear()  # (the reference ran the layers too)
            p = pre.run("prefill", toks)
            pause[0] = 0
            self.assertIn("saved beside the forward pass, layer by layer", p.notes)
            self.assertEqual((p.saved_tokens, p.tail_saved), (128, True))
            L = layout.layers
            for i in range(L - 1):
                self.assertLess(log.index(("done", i)), log.index(("run", i + 1)), log)
            self.assertEqual([e for e in log if e[0] == "done"], [("done", i) for i in range(L)])
            o = dec.run("decode", toks, max_tokens=4, first_token=p.tokens[0])
            self.assertTrue(o.handed_over)
            self.assertEqual(o.tokens, want)
            same_kv(pre, dec, 150)
            # over TCP the save went in parts as its layers were reported (docs/connector.md)
            self.assertGreaterEqual(cn.stats()["saves_in_parts"], 1)
            self.assertIn("the save was put in parts as its layers were gathered", p.notes)
            # 1b. a longer prompt over the engine's own prefix (its device cache holds the
            # first 128 positions, the stores the first two chunks): only the pass's new
            # positions are computed, the save beside it starts at the third chunk
            longer = toks + prompt(90, 86)
            log.clear()
            pl = pre.run("prefill", longer)
            self.assertEqual(pl.device_tokens, 128)
            self.assertIn("saved beside the forward pass, layer by layer", pl.notes)
            self.assertEqual((pl.saved_tokens, pl.tail_saved), (64, True))  # 192 of 240 whole
            ol = dec.run("decode", longer, max_tokens=3, first_token=pl.tokens[0])
            self.assertTrue(ol.handed_over)
            self.assertEqual(ol.tokens, TestLoadOrRecompute.reference(model, factory, longer, 3))
            same_kv(pre, dec, 240)
            # 2. a layer refused: the save is cancelled, the whole prompt saved after the pass
            toks2 = prompt(200, 82)
            want2 = TestLoadOrRecompute.reference(model, factory, toks2, 4)
            log.clear()
            fail[0] = 1
            p2 = pre.run("prefill", toks2)
            self.assertNotIn("saved beside the forward pass, layer by layer", p2.notes)
            self.assertEqual((p2.saved_tokens, p2.tail_saved, p2.save_error), (192, True, "KVF_OK"))
            self.assertIn(("cancel",), log)
            self.assertTrue(any("save beside the forward pass stopped (layer 1:" in x
                                for x in p2.notes), p2.notes)
            o2 = dec.run("decode", toks2, max_tokens=4, first_token=p2.tokens[0])
            self.assertTrue(o2.handed_over)
            self.assertEqual(o2.tokens, want2)
            same_kv(pre, dec, 200)
            # 3. the pass fails at its third layer: its save cancelled and freed, nothing kept
            log.clear()

            def boom(m, a):
                raise RuntimeError("the test's failing layer")
            h = pre.layers[2].register_forward_pre_hook(boom)
            toks3 = prompt(180, 83)
            with self.assertRaises(RuntimeError):
                pre.run("prefill", toks3)
            h.remove()
            self.assertEqual(log[-2:], [("cancel",), ("close",)], log)
            self.assertEqual(dec.lookup(toks3), 0)  # no chunk of it stored
            p3 = pre.run("prefill", toks3)
            self.assertIn("saved beside the forward pass, layer by layer", p3.notes)
            o3 = dec.run("decode", toks3, max_tokens=3, first_token=p3.tokens[0])
            self.assertEqual(o3.tokens, TestLoadOrRecompute.reference(model, factory, toks3, 3))
            # 3b. the pass fails after its last decoder layer (in the final norm): every layer
            # was reported, so its batch may be put (it is what the layers computed) or not;
            # nothing hangs, and the engine serves the next request
            h = model.model.norm.register_forward_pre_hook(boom)
            toks3b = prompt(170, 85)
            with self.assertRaises(RuntimeError):
                pre.run("prefill", toks3b)
            h.remove()
            self.assertIn(dec.lookup(toks3b), (0, 128))
            p3b = pre.run("prefill", toks3b)
            o3b = dec.run("decode", toks3b, max_tokens=3, first_token=p3b.tokens[0])
            self.assertEqual(o3b.tokens, TestLoadOrRecompute.reference(model, factory, toks3b, 3))
            # 4. a pass shorter than save_beside_tokens (1,024 by default): saved after it
            short = Engine(model, layout, factory, connector=cn, max_tokens=512)
            log.clear()
            p4 = short.run("prefill", prompt(120, 84))
            self.assertNotIn("saved beside the forward pass, layer by layer", p4.notes)
            self.assertEqual((p4.saved_tokens, p4.tail_saved), (64, True))
            self.assertNotIn(("cancel",), log)


@unittest.skipIf(torch is None or not os.environ.get("KVF_CLI_BIN"), "torch or kvf not here")
class TestClusterWithPythonEngines(unittest.TestCase):
    """kvf cluster up with engine "transformers" (here the plain-torch backend on CPU) starts,
    calibrates and registers the Python engines; kvf-bench e2e replays a trace through them with
    kvfabric and without, with the same tokens; kvf cluster down stops every process."""

    def test_up_replay_down(self):
        root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
        d = tempfile.mkdtemp(prefix="kvf-pycl-")
        cfg_model = os.path.join(d, "tiny-llama.json")
        with open(cfg_model, "w") as f:
            json.dump(TINY, f)
        conf = os.path.join(d, "cluster.json")
        with open(conf, "w") as f:
            json.dump({"name": "pyeng", "model": cfg_model, "engine": "transformers",
                       "engine_args": "--backend torch --device cpu --chunk-tokens 64",
                       "python": sys.executable, "stores": 1, "prefill": 1, "decode": 1,
                       "engine_max_tokens": 2048, "store_memory": "128M",
                       "run_dir": os.path.join(d, "run")}, f)
        cli, bench = os.environ["KVF_CLI_BIN"], os.environ["KVF_BENCH_BIN"]
        env = dict(os.environ, KVF_PYTHONPATH=os.path.join(root, "python"))
        try:
            up = subprocess.run([cli, "cluster", "up", "--config", conf], cwd=root, env=env,
                                capture_output=True, text=True, timeout=300)
            self.assertEqual(up.returncode, 0, up.stdout + up.stderr)
            self.assertIn("python3 -m kvfabric.serve", up.stdout)
            with open(os.path.join(d, "run", "state.json")) as f:
                pids = [p["pid"] for p in json.load(f)["procs"]]
            e2e = subprocess.run([bench, "e2e", "--config", conf, "--max-requests", "12",
                                  "--warmup", "4", "--repetitions", "1", "--max-input", "512",
                                  "--max-output", "4", "--block-tokens", "64", "--out",
                                  os.path.join(d, "e2e")], cwd=root, env=env,
                                 capture_output=True, text=True, timeout=300)
            out = e2e.stdout + e2e.stderr
            self.assertIn("12 done, 0 failed", out)
            self.assertIn("generated tokens identical in every run in 12 of 12", out)
            # every pass says where its time went (kvfabric.passclock), through the router
            with open(os.path.join(d, "e2e", "records.json")) as f:
                recs = json.load(f)
            self.assertEqual(len(recs), 24)
            for r in recs:
                pc = r["engine_pass_clock"]
                self.assertGreater(pc["thread_cpu_s"], 0, r)
                self.assertGreaterEqual(pc["process_cpu_s"], pc["thread_cpu_s"] * 0.9, r)
                self.assertIsNone(pc["gpu_s"])  # the CPU: no span
        finally:
            down = subprocess.run([cli, "cluster", "down", "--config", conf], cwd=root,
                                  capture_output=True, text=True, timeout=120)
            shutil.rmtree(d, ignore_errors=True)
        self.assertEqual(down.returncode, 0, down.stdout + down.stderr)
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}") and
                             b"kvfabric" in open(f"/proc/{pid}/cmdline", "rb").read(), pid)


@unittest.skipIf(torch is None, "torch is not installed")
class TestCheckpoint(unittest.TestCase):
    def test_round_trip_and_load(self):
        from kvfabric.checkpoint import (CheckpointError, load_checkpoint, read_safetensors,
                                         write_safetensors)
        from kvfabric.llama import KVCache, LlamaModel
        d = tempfile.mkdtemp(prefix="kvf-ckpt-")
        try:
            torch.manual_seed(3)
            a = LlamaModel(TINY).eval()
            path = os.path.join(d, "model.safetensors")
            write_safetensors(path, a.state_dict(), {"format": "pt"})
            back = read_safetensors(path)
            for k, v in a.state_dict().items():
                self.assertTrue(torch.equal(back[k], v), k)
            bf = {"x": torch.randn(3, 5).to(torch.bfloat16)}
            write_safetensors(os.path.join(d, "bf.safetensors"), bf)
            self.assertTrue(torch.equal(read_safetensors(os.path.join(d, "bf.safetensors"))["x"],
                                        bf["x"]))
            try:
                import safetensors.torch as st
                self.assertTrue(torch.equal(st.load_file(path)["lm_head.weight"],
                                            a.lm_head.weight))
            except ImportError:
                pass
            torch.manual_seed(4)
            b = LlamaModel(TINY).eval()
            ids = torch.tensor([prompt(40, 5)])
            with torch.no_grad():
                self.assertFalse(torch.equal(a(ids, KVCache()).logits, b(ids, KVCache()).logits))
                load_checkpoint(b, d)  # the folder's model.safetensors
                self.assertTrue(torch.equal(a(ids, KVCache()).logits, b(ids, KVCache()).logits))
            # a checkpoint of another shape, a truncated file, garbage: clear errors
            other = dict(TINY, hidden_size=32, intermediate_size=64)
            write_safetensors(path, LlamaModel(other).state_dict())
            with self.assertRaisesRegex(CheckpointError, "shape"):
                load_checkpoint(b, path)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) - 10)
            with self.assertRaises(CheckpointError):
                read_safetensors(path)
            with open(path, "wb") as f:
                f.write(b"\xff" * 64)
            with self.assertRaisesRegex(CheckpointError, "header"):
                read_safetensors(path)
        finally:
            shutil.rmtree(d, ignore_errors=True)


class TestQueuedSeconds(unittest.TestCase):
    """The load a Python engine reports: its queue in predicted seconds, as kvf-engine's."""

    def test_waiting_and_running_work(self):
        from kvfabric.turnqueue import TurnQueue

        t = TurnQueue()
        self.assertEqual(t.queued_seconds(100.0), 0.0)
        t.queued_work_s = 3.0  # three requests of 1 s each predicted
        t.running_work_s, t.running_since = 1.0, 100.0
        self.assertAlmostEqual(t.queued_seconds(100.25), 2.75)
        self.assertAlmostEqual(t.queued_seconds(105.0), 2.0)  # at most its prediction done
        t.running_work_s = 0.0  # between requests: nothing subtracted
        self.assertAlmostEqual(t.queued_seconds(105.0), 3.0)
        t.queued_work_s = 0.5
        t.running_work_s, t.running_since = 1.0, 100.0
        self.assertEqual(t.queued_seconds(101.0), 0.0)  # never negative


class TestTurnOrder(unittest.TestCase):
    """The Python engine's queue takes waiting requests in kvf-engine's order (--queue)."""

    def test_pick_turn_keys(self):
        from kvfabric.turnqueue import pick_turn

        work, waited = [1.0, 0.1, 0.5], [1.0, 1.0, 1.0]
        self.assertEqual(pick_turn("fifo", work, waited, 0), 0)
        self.assertEqual(pick_turn("work", work, waited, 0), 1)
        self.assertEqual(pick_turn("hrrn", work, waited, 0), 1)  # equal waits: work's order
        # ageing: the long one waited 10 s (ratio 11), the short one 0.5 s (ratio 6)
        self.assertEqual(pick_turn("hrrn", work[:2], [10.0, 0.5], 0), 0)
        self.assertEqual(pick_turn("work", work[:2], [10.0, 0.5], 0), 1)
        # nothing left to compute counts as a millisecond: no division by zero, and it wins
        # once it has waited as long as the others
        self.assertEqual(pick_turn("hrrn", [0.2, 0.0], [0.1, 0.1], 0), 1)
        self.assertEqual(pick_turn("hrrn", [0.2, 0.0], [5.0, -1.0], 0), 0)  # waits clamp at 0
        # every window-th pick is the oldest; only the oldest `window` are looked at
        self.assertEqual(pick_turn("work", work, waited, 3, window=4), 0)
        self.assertEqual(pick_turn("work", work, waited, 4, window=4), 1)
        self.assertEqual(pick_turn("work", [1.0, 0.5, 0.1], waited, 0, window=2), 1)
        self.assertEqual(pick_turn("hrrn", [], [], 0), 0)
        with self.assertRaises(ValueError):
            pick_turn("sjf", work, waited, 0)  # kvf-engine's engines take hrrn, work or fifo

    def _order(self, discipline: str, works) -> list:
        from kvfabric.turnqueue import TurnQueue

        now = [0.0]
        q = TurnQueue(discipline, clock=lambda: now[0])
        got, threads = [], []
        q.acquire()  # the engine busy: everyone below waits

        def one(i: int, w: float) -> None:
            with q.turn(w):
                got.append(i)

        for i, w in enumerate(works):
            th = threading.Thread(target=one, args=(i, w), daemon=True)
            th.start()
            threads.append(th)
            deadline = time.monotonic() + 5
            while q.waiting < i + 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            self.assertEqual(q.waiting, i + 1)
        self.assertTrue(q.busy())
        now[0] = 1.0  # everyone has waited a second
        q.release()
        for th in threads:
            th.join(5)
            self.assertFalse(th.is_alive())
        self.assertFalse(q.busy())
        return got

    def test_queue_orders_by_discipline(self):
        works = [1.0, 0.1, 0.5]
        self.assertEqual(self._order("fifo", works), [0, 1, 2])
        self.assertEqual(self._order("work", works), [1, 2, 0])
        self.assertEqual(self._order("hrrn", works), [1, 2, 0])
        with self.assertRaises(ValueError):
            self._order("lifo", works)


class TestHttpWithoutModel(unittest.TestCase):
    """The engine's HTTP server and handler without a model (a stand-in for the engine's
    requests): a burst of new connections is taken at once; a stream's first line goes out
    before the request ends, its answer after, an error after the first line in its last."""

    class Stub:
        tokens = None

        class a:
            log_level = "warn"

        def job(self, kind, body, gone=None, first=None):
            if body.get("stream"):
                first(5)
                time.sleep(1.0)
            if body.get("fail"):
                return 500, {"error": "boom"}
            return 200, {"tokens": [5, 6]}

    def test_a_burst_of_connections_is_not_dropped(self):
        from kvfabric import httpapi
        httpd = httpapi.HttpServer(("127.0.0.1", 0), httpapi.handler(self.Stub(), print))
        socks = []
        try:  # nothing accepts yet: the kernel completes the handshakes into the backlog
            for _ in range(64):
                socks.append(socket.create_connection(httpd.server_address, timeout=0.5))
        finally:
            for c in socks:
                c.close()
            httpd.server_close()
        self.assertEqual(len(socks), 64)

    def test_bodies_budget(self):
        """Half-sent bodies are bounded all together: with four of the largest held open, the
        fifth is refused with 503 on its headers, and the room comes back as they close."""
        from kvfabric import httpapi
        httpd = httpapi.HttpServer(("127.0.0.1", 0), httpapi.handler(self.Stub(), print))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        head = ("POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                % httpapi.MAX_BODY).encode()
        held = []
        try:
            for _ in range(4):
                c = socket.create_connection(httpd.server_address, timeout=10)
                c.sendall(head + b"{" + b" " * (1 << 16))
                held.append(c)
            for _ in range(100):  # their headers read by the server's threads (bounded)
                if httpd.bodies == 4 * httpapi.MAX_BODY:
                    break
                time.sleep(0.05)
            self.assertEqual(httpd.bodies, 4 * httpapi.MAX_BODY)
            c = socket.create_connection(httpd.server_address, timeout=10)
            c.sendall(head)
            reply = b""
            while True:  # the server closes after its answer (the body was not read)
                b = c.recv(4096)
                if not b:
                    break
                reply += b
            c.close()
            self.assertIn(b" 503 ", reply.split(b"\r\n")[0])
            self.assertIn(b"busy", reply)
            for c in held:
                c.close()
            held = []
            for _ in range(100):
                if httpd.bodies == 0:
                    break
                time.sleep(0.05)
            self.assertEqual(httpd.bodies, 0)
        finally:
            for c in held:
                c.close()
            httpd.shutdown()
            httpd.server_close()

    def test_stream(self):
        import http.client
        from kvfabric import httpapi
        httpd = httpapi.HttpServer(("127.0.0.1", 0), httpapi.handler(self.Stub(), print))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        c = http.client.HTTPConnection(*httpd.server_address, timeout=10)
        try:
            for body, last in (({"tokens": [1], "stream": True}, {"tokens": [5, 6]}),
                               ({"tokens": [1], "stream": True, "fail": 1},
                                {"error": "boom", "status": 500})):
                t0 = time.monotonic()
                c.request("POST", "/v1/generate", json.dumps(body),
                          {"Content-Type": "application/json"})
                r = c.getresponse()
                self.assertEqual(r.status, 200)
                self.assertEqual(json.loads(r.readline()), {"first_token": 5, "label": "real"})
                self.assertLess(time.monotonic() - t0, 0.5, "the first line before the end")
                self.assertEqual(json.loads(r.read()), last)
                self.assertGreaterEqual(time.monotonic() - t0, 1.0)
            c.request("POST", "/v1/generate", json.dumps({"tokens": [1]}),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            self.assertEqual((r.status, r.getheader("Content-Type")), (200, "application/json"))
            self.assertEqual(json.loads(r.read()), {"tokens": [5, 6]})
        finally:
            c.close()
            httpd.shutdown()
            httpd.server_close()


# A model big enough that a 3,000-token pass takes a good part of a second on a CPU.
TURN_MODEL = dict(TINY, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4)


def _turn_engine(cfg_path, turn_path, n, delay_s, ready, go, out):
    """A process with an Engine on the CPU taking turns through turn_path: one warm pass of n
    tokens (its rate learned, its first token noted), then, delay_s after go, the measured one."""
    import torch as t
    from kvfabric import models
    from kvfabric.engine import Engine
    from kvfabric.gputurn import GpuTurn
    t.set_num_threads(2)
    cfg = models.config(cfg_path)
    layout = models.layout_for(cfg, "turns", page_tokens=16, chunk_tokens=64, dtype="f32")
    model, factory, _ = models.build(cfg, "torch", "cpu", "f32", 7)
    with GpuTurn(turn_path) as turn:
        e = Engine(model, layout, factory, connector=None, max_tokens=4096, gpu_turn=turn)
        toks = prompt(n, n)
        warm = e.run("prefill", toks, reuse="none")
        ready.set()
        go.wait(60)
        time.sleep(delay_s)
        a = time.monotonic()
        o = e.run("prefill", toks, reuse="none")
        out.put((n, a, time.monotonic(), o.gpu_turn, o.prefill_s, warm.prefill_s,
                 o.tokens[0] == warm.tokens[0]))


@unittest.skipIf(torch is None, "torch is not installed")
class TestTurnsYield(unittest.TestCase):
    """Two engine processes taking turns (a turn file; CPU): a short pass that comes while a
    long one runs does not wait for it: the long pass yields at a layer boundary, the short one
    runs and ends first, the long one goes on with the same first token."""

    def test_a_long_pass_yields_to_a_short_one(self):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        with tempfile.TemporaryDirectory() as d:
            cfg = os.path.join(d, "model.json")
            with open(cfg, "w") as f:
                json.dump(TURN_MODEL, f)
            turn, out, go = os.path.join(d, "turn"), ctx.Queue(), ctx.Event()
            procs, readies = [], []
            for n, delay in ((3000, 0.0), (48, 0.15)):
                r = ctx.Event()
                p = ctx.Process(target=_turn_engine, args=(cfg, turn, n, delay, r, go, out))
                p.start()
                procs.append(p)
                readies.append(r)
            try:
                self.assertTrue(all(r.wait(120) for r in readies))
                go.set()
                got = {x[0]: x for x in (out.get(timeout=120) for _ in procs)}
            finally:
                for p in procs:
                    p.join(30)
                    if p.is_alive():
                        p.kill()
            long_, short = got[3000], got[48]
            if long_[5] < 0.4:
                self.skipTest(f"the long pass took {long_[5]:.2f} s here: too short to yield")
            self.assertGreaterEqual(long_[3].get("yields", 0), 1, long_[3])
            self.assertLess(short[2], long_[2], "the short pass ended first")
            self.assertLess(short[3]["wait_s"], 0.5 * long_[5], short[3])
            self.assertTrue(long_[6] and short[6], "same first tokens as without the yield")
            self.assertGreater(long_[3]["yielded_s"], 0)


if __name__ == "__main__":
    unittest.main()
