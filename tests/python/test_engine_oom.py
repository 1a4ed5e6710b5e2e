"""An engine that runs out of device memory (Engine.run): engines sharing one GPU each keep their
allocator's free blocks, so one of them can fail to allocate what the others hold. The request is
run once more after the engine let go of its held prefix and its free blocks; its tokens are the
model's own, its first token told once, and a second failure, or any other error, is the
caller's. After each request an engine gives its free blocks back where the device is nearly
full (its figures faked here: the CPU has none). The failure is injected at a decoder layer (a
CPU model cannot run out of GPU memory) as torch raises it.
"""

import contextlib
import unittest

try:
    import torch
except ImportError:
    torch = None

if torch is not None:
    import test_serve as ts


class FailAt:
    """A forward pre-hook on one decoder layer that raises `error` at its calls numbered in
    `at` (1-based), and counts its calls."""

    def __init__(self, layer, at, error):
        self.calls, self.at, self.error = 0, set(at), error
        self.h = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls in self.at:
            raise self.error

    def remove(self):
        self.h.remove()


@contextlib.contextmanager
def failing(layer, at, error):
    """FailAt for the block's time."""
    f = FailAt(layer, at, error)
    try:
        yield f
    finally:
        f.remove()


def oom():
    return torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 64.00 MiB. GPU 0 has a total capacity of "
        "79.18 GiB of which 35.44 MiB is free.")


@unittest.skipIf(torch is None, "torch is not installed")
class TestOutOfMemory(unittest.TestCase):

    def test_run_again_after_freeing(self):
        from kvfabric.engine import Engine, outcome_json
        with ts.fast_and_slow(ts.TINY, "tiny-oom", 10 ** 9, 20000) as (
                model, factory, layout, cn, _):
            e = Engine(model, layout, factory, connector=cn, max_tokens=1024)
            held = ts.prompt(150, 90)
            e.run("generate", held, max_tokens=2)
            self.assertEqual(e.last_tokens[:150], held)
            self.assertTrue(e.held.hashes)

            # In the prefill: run again from the start; the held prefix let go first.
            p = ts.prompt(200, 91)
            want = ts.TestLoadOrRecompute.reference(model, factory, p, 5)
            told = []
            with failing(e.layers[1], [1], oom()):
                o = e.run("generate", p, max_tokens=5, on_first=told.append)
            self.assertEqual(o.tokens, want)
            self.assertTrue(o.oom_retried)
            self.assertEqual(outcome_json(o)["oom_retried"], True)
            self.assertEqual(e.oom_retries, 1)
            self.assertEqual(told, [want[0]])
            self.assertTrue(any("out of device memory (OutOfMemoryError" in n for n in o.notes),
                            o.notes)
            self.assertEqual(e.last_tokens[:200], p)  # what it holds now is the new sequence

            # In the decode, after the first token was told: told once, the tokens whole.
            q = ts.prompt(180, 92)
            want = ts.TestLoadOrRecompute.reference(model, factory, q, 6)
            told = []
            # the prefill, a decoding step, then this one
            with failing(e.layers[0], [3], oom()) as f:
                o = e.run("generate", q, max_tokens=6, on_first=told.append)
            self.assertTrue(o.oom_retried)
            self.assertGreater(f.calls, 3)  # it failed in a decoding step, then ran again
            # the sequence it held then (the prompt, prefilled) was let go before the second run
            self.assertTrue(any("the cache of the last sequence (180 tokens)" in n
                                for n in o.notes), o.notes)
            self.assertEqual(o.tokens, want)
            self.assertEqual(told, [want[0]])
            self.assertEqual(e.oom_retries, 2)

            # Twice in a row: the second is the caller's (the retry counted), and the engine
            # serves on.
            with failing(e.layers[1], [1, 2], oom()):
                with self.assertRaises(torch.cuda.OutOfMemoryError):
                    e.run("generate", q, max_tokens=2)
            self.assertEqual(e.oom_retries, 3)

            # Any other error is not run again.
            with failing(e.layers[1], [1], ValueError("not memory")) as f:
                with self.assertRaises(ValueError):
                    e.run("generate", p, max_tokens=2)
            self.assertEqual(f.calls, 1)
            self.assertEqual(e.oom_retries, 3)
            o = e.run("generate", p, max_tokens=5)
            self.assertFalse(o.oom_retried)
            self.assertEqual(o.tokens, ts.TestLoadOrRecompute.reference(model, factory, p, 5))

    def test_release_when_the_device_is_nearly_full(self):
        from kvfabric.engine import Engine
        with ts.fast_and_slow(ts.TINY, "tiny-rel", 10 ** 9, 20000) as (
                model, factory, layout, cn, _):
            e = Engine(model, layout, factory, connector=cn, max_tokens=1024,
                       release_below=2 << 30)
            free, gave = [8 << 30], []
            e._device_free = lambda: free[0]  # a CUDA device's figures, on the CPU
            e._give_back = lambda: gave.append(1) or 0
            p = ts.prompt(150, 93)
            e.run("generate", p, max_tokens=2)
            self.assertEqual((gave, e.memory_releases), ([], 0))  # room enough: kept
            free[0] = 1 << 30
            e.run("generate", p, max_tokens=2)
            self.assertEqual((len(gave), e.memory_releases), (1, 1))
            # after a failure too
            with failing(e.layers[1], [1], ValueError("not memory")):
                with self.assertRaises(ValueError):
                    e.run("generate", p, max_tokens=2)
            self.assertEqual(e.memory_releases, 2)
            e.release_below = None  # off
            e.run("generate", p, max_tokens=2)
            self.assertEqual(e.memory_releases, 2)
            # a check that fails is neither the request's answer nor its error
            def broken():
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            e.release_below = 2 << 30
            e._device_free = broken
            o = e.run("generate", p, max_tokens=2)
            self.assertEqual(len(o.tokens), 2)
            self.assertIn("illegal memory access", e.release_error)
            with failing(e.layers[1], [1], ValueError("not memory")):
                with self.assertRaises(ValueError):  # the request's own error, not the check's
                    e.run("generate", p, max_tokens=2)
            # on the CPU itself there is nothing to ask or give back
            c = Engine(model, layout, factory, connector=cn, max_tokens=1024)
            self.assertFalse(c.release_if_low())


if __name__ == "__main__":
    unittest.main()
