"""kvfabric.passclock: where a pass's time went (the thread's CPU, the process's, the GPU's span),
in an engine's answers, and read over an e2e run's records by bench/e2e_overlap.py."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import unittest

try:
    import torch
except ImportError:
    torch = None

from kvfabric.passclock import PassClock

OVERLAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench",
                       "e2e_overlap.py")


def spin(cpu_s):
    """Burns `cpu_s` of this thread's CPU time (at most 10 s of wall time: a machine that busy
    fails the test's figures, not its bound)."""
    c0, end, x = time.thread_time(), time.perf_counter() + 10, 0
    while time.thread_time() - c0 < cpu_s and time.perf_counter() < end:
        x += 1
    return x


class TestPassClock(unittest.TestCase):

    def test_host_work_and_waits(self):
        c = PassClock()
        spin(0.05)
        r = c.read()
        self.assertIsNone(r["gpu_s"])  # no CUDA here: no span, never a made-up one
        self.assertEqual(r["label"], "real")
        self.assertGreaterEqual(r["thread_cpu_s"], 0.05)
        self.assertLess(r["thread_cpu_s"], 0.5)
        self.assertLessEqual(r["thread_cpu_s"], r["wall_s"] + 0.005)

        c = PassClock()
        time.sleep(0.06)
        r = c.read()
        self.assertGreaterEqual(r["wall_s"], 0.06)
        self.assertLess(r["thread_cpu_s"], 0.03)  # off the CPU: the wall time, not the thread's

    def test_other_threads_count_in_the_process(self):
        stop = threading.Event()
        data = os.urandom(1 << 22)

        def hash_loop():  # hashlib lets the interpreter go: a thread of the process beside
            n = 0
            while not stop.is_set() and n < 2000:
                hashlib.sha256(data).digest()
                n += 1

        t = threading.Thread(target=hash_loop)
        c = PassClock()
        t.start()
        try:
            time.sleep(0.15)
        finally:
            stop.set()
            t.join(10)
        r = c.read()
        self.assertLess(r["thread_cpu_s"], 0.05)
        self.assertGreater(r["process_cpu_s"], r["thread_cpu_s"] + 0.03)


@unittest.skipIf(torch is None, "torch is not installed")
class TestInTheAnswer(unittest.TestCase):

    def test_engine_answer_has_the_clock(self):
        import test_serve as ts
        from kvfabric.engine import Engine, outcome_json
        with ts.fast_and_slow(ts.TINY, "tiny-clock", 10 ** 9, 20000) as (
                model, factory, layout, cn, _):
            e = Engine(model, layout, factory, connector=cn, max_tokens=1024)
            o = e.run("generate", ts.prompt(150, 7), max_tokens=2)
            pc = outcome_json(o)["pass_clock"]
            self.assertEqual(set(pc), {"wall_s", "thread_cpu_s", "process_cpu_s", "gpu_s",
                                       "yield_hooks", "label"})
            self.assertIsNone(pc["gpu_s"])
            self.assertFalse(pc["yield_hooks"])  # no GPU turn on a CPU
            self.assertGreater(pc["thread_cpu_s"], 0)
            self.assertLessEqual(pc["wall_s"], o.prefill_s + 0.01)
            self.assertGreaterEqual(pc["wall_s"], o.prefill_s - 0.01)
            json.dumps(outcome_json(o))  # what the server sends


def record(mode, req, prefill_s, cpu, gpu, tokens=500):
    return {"mode": mode, "repetition": 1, "request": req, "rejected": False, "error": "",
            "arrival_s": req * 10.0, "place_s": 0.0, "engine_queue_s": 0.0,
            "engine_gpu_turn_s": 0.0, "engine_prefill_s": prefill_s,
            "engine_compute_s": prefill_s, "ttft_s": prefill_s + 0.001, "decode_queue_s": 0.0,
            "e2e_s": prefill_s + 0.5, "prompt_tokens": tokens, "store_tokens": 0,
            "device_tokens": 0,
            "engine_pass_clock": {"thread_cpu_s": cpu, "process_cpu_s": cpu * 1.5,
                                  "gpu_s": gpu}}


class TestOverlapReadsTheClocks(unittest.TestCase):

    def run_overlap(self, records):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(records, f)
        try:
            out = subprocess.run([sys.executable, OVERLAP, f.name, "--json"], check=True,
                                 capture_output=True, text=True, timeout=60).stdout
            text = subprocess.run([sys.executable, OVERLAP, f.name], check=True,
                                  capture_output=True, text=True, timeout=60).stdout
        finally:
            os.unlink(f.name)
        return json.loads(out), text

    def test_medians_and_ratios(self):
        recs = []
        for i in range(3):  # kvfabric: the same GPU span, more of the host, off the CPU more
            recs.append(record("kvf", i, 0.040, 0.030, 0.010))
            recs.append(record("baseline", i, 0.032, 0.030 * 0.75, 0.010))
        recs.append(record("kvf", 3, 0.5, 0.05, 0.45, tokens=5000))
        recs.append(record("baseline", 3, 0.4, 0.05, 0.30, tokens=5000))
        out, text = self.run_overlap(recs)
        short, long_ = out["bins"][0], out["bins"][-1]
        c = short["clock"]
        self.assertAlmostEqual(c["kvf"]["thread_cpu_s"], 0.030)
        self.assertAlmostEqual(c["kvf"]["off_cpu_s"], 0.010)
        self.assertAlmostEqual(c["baseline"]["off_cpu_s"], 0.0095)
        self.assertAlmostEqual(c["kvf_vs_baseline"]["thread_cpu_s"], 1.3333, places=3)
        self.assertAlmostEqual(c["kvf_vs_baseline"]["gpu_s"], 1.0)
        self.assertAlmostEqual(c["kvf_vs_baseline"]["wall_s"], 1.25)
        self.assertAlmostEqual(long_["clock"]["kvf_vs_baseline"]["gpu_s"], 1.5)
        self.assertIn("where the passes' time went", text)

    def test_split_by_decodes_beside(self):
        # kvfabric: request 0's pass (5,000 tokens, 0.4 s) runs while requests 1 and 2 decode
        # through all of it; request 3's pass (2,000 tokens) runs alone. The baseline's passes
        # all run alone (its decodes come long after).
        recs = []
        k0 = record("kvf", 0, 0.4, 0.4, 0.4, tokens=5000)
        k0["arrival_s"] = 0.0
        recs.append(k0)
        for q in (1, 2):
            k = record("kvf", q, 0.05, 0.05, 0.05, tokens=300)
            k.update(arrival_s=-1.0, ttft_s=1.0, e2e_s=2.0)  # decodes over [0, 1]
            recs.append(k)
        recs.append(record("kvf", 3, 0.2, 0.2, 0.2, tokens=2000))
        for q, c, n in ((0, 0.3, 5000), (1, 0.05, 300), (2, 0.05, 300), (3, 0.16, 2000)):
            recs.append(record("baseline", q, c, c, c, tokens=n))
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(recs, f)
        try:
            out = json.loads(subprocess.run(
                [sys.executable, OVERLAP, "--by-decodes", "1.5", "--json", f.name, f.name],
                check=True, capture_output=True, text=True, timeout=60).stdout)
            one = subprocess.run([sys.executable, OVERLAP, f.name, f.name],
                                 capture_output=True, text=True, timeout=60)
        finally:
            os.unlink(f.name)
        # the file twice: each pass counted twice (pooled over runs)
        self.assertEqual(out["from"]["passes"], 2)
        self.assertAlmostEqual(out["from"]["compute_vs_baseline_median"], 0.4 / 0.3, places=3)
        self.assertEqual(out["under"]["passes"], 2)
        self.assertAlmostEqual(out["under"]["compute_vs_baseline_median"], 1.25, places=3)
        self.assertNotEqual(one.returncode, 0)  # two runs only with --by-decodes
        self.assertIn("one records.json", one.stderr)

    def test_records_without_clocks(self):
        recs = []
        for i in range(2):
            for m in ("kvf", "baseline"):
                r = record(m, i, 0.04, 0.03, 0.01)
                del r["engine_pass_clock"]
                recs.append(r)
        out, text = self.run_overlap(recs)
        self.assertIsNone(out["bins"][0]["clock"])
        self.assertNotIn("where the passes' time went", text)


if __name__ == "__main__":
    unittest.main()
