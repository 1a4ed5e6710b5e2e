"""bench/e2e_runs.py: groups of e2e runs in absolute figures, on records made for the test."""

import json
import os
import subprocess
import sys
import tempfile
import unittest

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench",
                    "e2e_runs.py")


def records(mode, ttfts, rep=1, itl=0.01, steps=31, first=0):
    return [{"mode": mode, "repetition": rep, "request": first + i, "ttft_s": t, "e2e_s": t + 1.0,
             "itl_mean_s": itl, "itl_steps": steps, "error": "", "rejected": False}
            for i, t in enumerate(ttfts)]


class E2eRunsTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.n = 0

    def tearDown(self):
        self.dir.cleanup()

    def write(self, recs):
        self.n += 1
        path = os.path.join(self.dir.name, "r%d.json" % self.n)
        with open(path, "w") as f:
            json.dump(recs, f)
        return path

    def tool(self, *args, ok=True):
        p = subprocess.run([sys.executable, TOOL] + list(args), capture_output=True, text=True,
                           timeout=60)
        if ok:
            self.assertEqual(p.returncode, 0, p.stderr)
        return p

    def test_figures_and_comparison(self):
        base = [i / 100 for i in range(1, 101)]  # 0.01 .. 1.00
        a1 = self.write(records("kvf", base) + records("baseline", [2 * t for t in base]))
        # two repetitions in one file: two runs
        a2 = self.write(records("kvf", [t + 0.001 for t in base], itl=0.02) +
                        records("kvf", [t + 0.002 for t in base], rep=2) +
                        records("baseline", [2 * t for t in base]))
        # the later group: kvfabric slower at the median in every run, the baseline slower still
        b1 = self.write(records("kvf", [t * 1.5 for t in base]) +
                        records("baseline", [t * 4 for t in base]))
        failed = records("kvf", [99.0], first=500)
        failed[0]["error"] = "timeout"  # not a completed request: not counted
        b2 = self.write(records("kvf", [t * 1.2 for t in base]) + failed +
                        records("baseline", [t * 4 for t in base]))
        out = json.loads(self.tool("--group", "before", a1, a2, "--group", "after", b1, b2,
                                   "--json").stdout)
        before = out["groups"]["before"]["kvf"]
        self.assertEqual(before["p50"]["runs"], 3)
        # kvf-bench's rank: round(0.5 * 99) = 50 (0-based) -> 0.51
        self.assertAlmostEqual(before["p50"]["low"], 0.51)
        self.assertAlmostEqual(before["p50"]["high"], 0.512)
        self.assertAlmostEqual(before["p50"]["median"], 0.511)
        self.assertAlmostEqual(before["p99"]["low"], 0.99)  # rank round(0.99 * 99) = 98
        # the ITL mean of a run weights each request by its steps
        self.assertAlmostEqual(before["itl_mean_ms"]["high"], 20.0)
        after = out["groups"]["after"]["kvf"]
        self.assertAlmostEqual(after["p50"]["high"], 0.765)
        self.assertAlmostEqual(after["p99"]["high"], 1.485)  # the failed request left out
        vs = out["vs_first"]["after"]
        self.assertEqual(vs["kvf"]["p50"]["where"], "higher in every run")
        self.assertAlmostEqual(vs["kvf"]["p50"]["ratio"], 0.6885 / 0.511, places=4)
        self.assertEqual(vs["baseline"]["p50"]["where"], "higher in every run")
        self.assertAlmostEqual(vs["baseline"]["p50"]["ratio"], 2.0)
        self.assertEqual(vs["kvf"]["itl_mean_ms"]["where"], "overlap")
        text = self.tool("--group", "before", a1, a2, "--group", "after", b1, b2).stdout
        self.assertIn("after against before, kvf: p1", text)
        self.assertIn("derived from the records, real", text)
        self.assertIn("p50 1.35x (higher in every run)", text)

    def test_lower_in_every_run_and_missing_mode(self):
        a = self.write(records("kvf", [1.0, 2.0, 3.0]))
        b = self.write(records("kvf", [0.1, 0.2, 0.3]))
        out = json.loads(self.tool("--group", "a", a, "--group", "b", b, "--json").stdout)
        self.assertEqual(out["vs_first"]["b"]["kvf"]["p50"]["where"], "lower in every run")
        self.assertEqual(out["groups"]["a"]["baseline"]["sources"], [])
        self.assertIsNone(out["groups"]["a"]["baseline"]["p50"])
        self.assertEqual(out["vs_first"]["b"]["baseline"], {})

    def test_itl_weights_as_kvf_bench(self):
        # records without itl_steps weigh each request by generated - 1, as kvf-bench's
        # summary; a request of one token has no step and no weight
        recs = records("kvf", [0.1, 0.2, 0.3])
        for r, itl, gen in zip(recs, (0.010, 0.040, 0.5), (11, 31, 1)):
            del r["itl_steps"]
            r["itl_mean_s"], r["generated"] = itl, gen
        out = json.loads(self.tool("--group", "a", self.write(recs), "--json").stdout)
        self.assertAlmostEqual(out["groups"]["a"]["kvf"]["itl_mean_ms"]["median"],
                               (0.010 * 10 + 0.040 * 30) / 40 * 1e3)

    def test_bad_input(self):
        bad = os.path.join(self.dir.name, "bad.json")
        with open(bad, "w") as f:
            f.write("{not json")
        p = self.tool("--group", "a", bad, ok=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("bad.json", p.stderr)
        p = self.tool("--group", "a", os.path.join(self.dir.name, "none.json"), ok=False)
        self.assertIn("none.json", p.stderr)
        obj = self.write({"records": []})
        self.assertIn("not a kvf-bench e2e records.json",
                      self.tool("--group", "a", obj, ok=False).stderr)
        self.assertIn("names no records.json", self.tool("--group", "a", ok=False).stderr)
        r = self.write(records("kvf", [1.0]))
        self.assertIn("two groups named a",
                      self.tool("--group", "a", r, "--group", "a", r, ok=False).stderr)


if __name__ == "__main__":
    unittest.main()
