"""kvfabric.rates: the engine's prefill model (a fixed cost, a per-token cost and the attention's)
fitted to what it measured per length class; the calibration as a prior; the warm-up before
serving (kvfabric.calibration). Plain Python: no torch, no model."""

import json
import os
import tempfile
import unittest

from kvfabric.calibration import seed_rates, warm_up
from kvfabric.rates import OUTLIER, Rates


def truth(begin, end, base=0.012, per=30e-6, attn=2e-9):
    """A pass's seconds on a made-up GPU: a fixed cost, a per-token and an attention term."""
    n = end - begin
    return base + per * n + attn * n * (begin + end) / 2


class TestModel(unittest.TestCase):
    def test_nothing_measured_predicts_nothing(self):
        r = Rates()
        self.assertIsNone(r.compute_s(0, 100))
        self.assertIsNone(r.s_per_token)
        self.assertIsNone(r.model())
        r.note_prefill(0, 1.0)  # nothing computed: not a measurement
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            r.note_prefill(10, bad)
            r.note_load(1e6, bad)
            r.note_decode(3, bad)
        r.note_prefill(10, 0.01, begin=-5)
        r.note_prefill(100, 1e-200)  # below MIN_S: 1 / t^2 would overflow the fit's weights
        self.assertIsNone(r.compute_s(0, 100))
        self.assertIsNone(r.load_bps)
        self.assertIsNone(r.s_per_step)

    def test_one_length_class_is_a_per_token_rate(self):
        r = Rates()
        r.note_prefill(100, 0.05)
        self.assertAlmostEqual(r.compute_s(0, 200), 0.1)
        self.assertAlmostEqual(r.s_per_token, 0.0005)

    def test_short_passes_do_not_inflate_long_predictions(self):
        # The bug this model fixes: 20 tokens over a long context, mostly fixed cost, made a
        # per-token rate that put a 250-token pass at 8x its time. With a second length class
        # measured, the fixed cost is the intercept's.
        r = Rates()
        r.note_prefill(20, truth(2000, 2020), begin=2000)
        self.assertGreater(r.compute_s(0, 250), 5 * truth(0, 250))  # one class: per token only
        r.note_prefill(300, truth(0, 300))
        self.assertLess(abs(r.compute_s(0, 250) / truth(0, 250) - 1), 0.15, r.model())

    def test_recovers_the_three_terms(self):
        r = Rates()
        for n, b in ((16, 3000), (100, 0), (700, 500), (1500, 0), (3000, 0), (6000, 2000)):
            r.note_prefill(n, truth(b, b + n), begin=b)
        m = r.model()
        self.assertAlmostEqual(m["base_s"], 0.012, places=5)
        self.assertAlmostEqual(m["s_per_token"], 30e-6, places=8)
        self.assertAlmostEqual(m["attn_s_per_token2"], 2e-9, places=12)
        for b, e in ((0, 250), (0, 8192), (4000, 4100), (7000, 7010)):
            self.assertAlmostEqual(r.compute_s(b, e), truth(b, e), places=6)

    def test_coefficients_stay_non_negative(self):
        # Times that fall with length (noise, a GPU getting free) fit no positive slope: the
        # model drops terms rather than predict a negative time.
        r = Rates()
        for n, t in ((100, 0.05), (1000, 0.04), (4000, 0.03)):
            r.note_prefill(n, t)
        m = r.model()
        self.assertTrue(all(m[k] >= 0 for k in ("base_s", "s_per_token", "attn_s_per_token2")))
        for n in (1, 100, 10000):
            self.assertGreater(r.compute_s(0, n), 0)

    def test_a_slow_pass_is_an_outlier_a_slow_gpu_is_not(self):
        r = Rates()
        for n in (100, 1000, 4000):
            r.note_prefill(n, truth(0, n))
        before = r.compute_s(0, 250)
        r.note_prefill(250, 50 * truth(0, 250))  # CUDA's lazy set-up, say
        self.assertEqual(r.outliers, 1)
        self.assertLess(r.compute_s(0, 250), 2 * before)
        for _ in range(12):  # the GPU really became 4x slower for every length
            for n in (100, 250, 1000, 4000):
                r.note_prefill(n, 4 * truth(0, n))
        self.assertLess(abs(r.compute_s(0, 2000) / (4 * truth(0, 2000)) - 1), 0.1, r.model())
        self.assertGreater(OUTLIER, 1)

    def test_old_classes_count_less(self):
        r = Rates()
        for _ in range(8):  # 0.1 ms a token, many times, long ago
            r.note_prefill(100, 0.010, now=0.0)
            r.note_prefill(1000, 0.100, now=0.0)
        r.note_prefill(200, 0.004, now=6000.0)  # 0.02 ms a token, now (ten half-lives later)
        r.note_prefill(2000, 0.040, now=6000.0)
        self.assertLess(abs(r.compute_s(0, 1000) / 0.020 - 1), 0.1, r.model())

    def test_light_passes(self):
        r = Rates()
        self.assertFalse(r.light(0, 10))  # no model
        r.note_prefill(100, 0.05)
        self.assertFalse(r.light(0, 10))  # no fixed cost in a per-token rate
        r = Rates()
        for n in (16, 100, 1000, 4000):
            r.note_prefill(n, truth(0, n))
        # 12 ms of fixed cost against 30 us a token (and the attention's): light to ~400 tokens
        self.assertTrue(r.light(0, 250))
        self.assertTrue(r.light(0, 380))
        self.assertFalse(r.light(0, 420))
        self.assertTrue(r.light(0, 350))
        self.assertFalse(r.light(6000, 6350))  # the same tokens after a long context

    def test_load_and_decode_rates(self):
        # what Engine._decide and the queue's order ask (every attribute of the old Rates)
        r = Rates()
        self.assertIsNone(r.load_s(1e9))
        r.note_load(2e9, 1.0)
        r.note_load(0, 1.0)  # nothing moved: not a measurement
        self.assertAlmostEqual(r.load_s(1e9), 0.5)
        r.note_load(1e9, 1.0)
        self.assertAlmostEqual(r.load_bps, 0.7 * 2e9 + 0.3 * 1e9)
        self.assertIsNone(r.s_per_step)
        r.note_decode(10, 0.1)
        self.assertAlmostEqual(r.s_per_step, 0.01)

    def test_setting_a_rate_replaces_the_model(self):
        r = Rates()
        r.note_prefill(100, 0.5)
        r.s_per_token = 1e-3
        self.assertAlmostEqual(r.compute_s(0, 10), 0.01)
        r.s_per_token = None
        self.assertIsNone(r.compute_s(0, 10))


class TestPrior(unittest.TestCase):
    def test_seed_then_own_measurements(self):
        r = Rates()
        r.seed(30000.0, 2e-9)
        for n in (256, 1024, 4096):
            self.assertAlmostEqual(r.compute_s(0, n), n / 30000 + 2e-9 * n * n / 2, places=6)
        # the engine's own pass of a class replaces the prior's, outright (not averaged with it,
        # and not an outlier of it: the prior is the calibration's, not this engine's)
        for n in (256, 512, 1024, 2048, 4096):
            r.note_prefill(n, 3 * truth(0, n))
        self.assertEqual(r.outliers, 0)
        self.assertAlmostEqual(r.compute_s(0, 1024), 3 * truth(0, 1024), places=5)
        # a calibration far faster than this engine (another GPU's): the engine's own passes
        # replace the prior's classes as they are, not clamped at 3x the prior's prediction
        f = Rates()
        f.seed(400000.0)
        f.note_prefill(256, 3 * truth(0, 256))
        f.note_prefill(1024, 3 * truth(0, 1024))
        f.note_prefill(2048, truth(0, 2048) * 3)
        self.assertEqual(f.outliers, 0)
        self.assertAlmostEqual(f._classes[12].y, 3 * truth(0, 2048))
        for bad in ((0.0, 0.0), (float("nan"), 0.0), (float("inf"), 0.0), (1e4, float("nan")),
                    (1e4, -1e-9)):
            with self.assertRaises(ValueError):
                r.seed(*bad)

    def test_cost_file(self):
        with tempfile.TemporaryDirectory() as d:
            good, bad = os.path.join(d, "good.json"), os.path.join(d, "bad.json")
            with open(good, "w") as f:
                json.dump({"prefill_tokens_per_s": 20000.0, "prefill_attn_s_per_tok2": 0.0,
                           "kv_bytes_per_token": 131072}, f)
            with open(bad, "w") as f:
                json.dump({"prefill_tokens_per_s": -1}, f)
            said = []
            e = _FakeEngine()
            seed_rates(e, good, lambda lvl, msg: said.append(msg))
            self.assertAlmostEqual(e.rates.compute_s(0, 2000), 0.1)
            self.assertIn("0.0500 ms per token", said[0])
            sched_only = os.path.join(d, "sched.json")
            with open(sched_only, "w") as f:
                json.dump({"load_bytes_per_s": 1e10}, f)
            said = []
            e = _FakeEngine()
            seed_rates(e, sched_only, lambda lvl, msg: said.append(msg))  # nothing to seed
            self.assertIsNone(e.rates.model())
            self.assertIn("no prior", said[0])
            cases = [(bad, "positive"), (os.path.join(d, "none.json"), "No such file")]
            for name, body, why in (("list", "[1, 2]", "not a JSON object"),
                                    ("text", "{", "JSONDecodeError"),
                                    ("str", '{"prefill_tokens_per_s": "fast"}', "ValueError"),
                                    ("bool", '{"prefill_tokens_per_s": true}', "numbers")):
                path = os.path.join(d, name + ".json")
                with open(path, "w") as f:
                    f.write(body)
                cases.append((path, why))
            for path, why in cases:
                with self.assertRaises(SystemExit) as cm:
                    seed_rates(_FakeEngine(), path, lambda lvl, msg: None)
                self.assertIn(why, str(cm.exception))


class _Layout:
    page_tokens = 16


class _Held:
    def __init__(self):
        self.sets = []

    def set(self, tokens):
        self.sets.append(list(tokens))


class _FakeEngine:
    """What warm_up uses of an Engine; run() notes a pass of 1 ms + 0.01 ms a token, the first
    one 500 ms (CUDA's lazy set-up)."""

    def __init__(self, max_tokens=4096):
        self.rates, self.held, self.layout = Rates(), _Held(), _Layout()
        self.max_tokens, self.calls = max_tokens, []
        self.last_tokens, self.last_cache = [1], object()

    def run(self, kind, tokens, max_tokens=1, reuse="all", **kw):
        self.calls.append((kind, len(tokens), max_tokens, reuse))
        self.held.set(tokens)
        n = len(tokens)
        self.rates.note_prefill(n, 0.5 if len(self.calls) == 1 else 0.001 + 1e-5 * n)
        self.last_tokens, self.last_cache = list(tokens), object()


class TestWarmUp(unittest.TestCase):
    def test_warm_up(self):
        e = _FakeEngine()
        held = e.held
        said = []
        warm_up(e, 500, lambda lvl, msg: said.append(msg))
        self.assertEqual([c[0] for c in e.calls], ["generate", "prefill", "prefill"])
        self.assertTrue(all(c[3] == "none" for c in e.calls))  # no store asked, nothing saved
        self.assertEqual([c[1] for c in e.calls[1:]], [256, 1024])
        self.assertIs(e.held, held)  # the engine's events back, and nothing published to them
        self.assertEqual(held.sets, [])
        self.assertEqual((e.last_tokens, e.last_cache), ([], None))
        # the cold pass is not in the model; the two measured ones are
        self.assertAlmostEqual(e.rates.compute_s(0, 500), 0.001 + 1e-5 * 500, places=6)
        self.assertIn("warmed up", said[0])

    def test_small_engine_skips_what_does_not_fit(self):
        e = _FakeEngine(max_tokens=600)
        warm_up(e, 500, lambda lvl, msg: None)
        self.assertEqual([c[1] for c in e.calls], [64, 256])

    def test_a_failing_pass_leaves_events_and_rates_and_empties_the_cache(self):
        e = _FakeEngine()
        held, rates = e.held, e.rates

        def boom(*a, **k):
            raise RuntimeError("CUDA out of memory")
        e.run = boom
        with self.assertRaises(RuntimeError):
            warm_up(e, 500, lambda lvl, msg: None)
        self.assertIs(e.held, held)
        self.assertIs(e.rates, rates)
        self.assertEqual(e.last_tokens, [])


if __name__ == "__main__":
    unittest.main()
