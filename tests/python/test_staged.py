"""The KV cache kept in staging pages (kvfabric.staged) and the bottom-right causal attention
(kvfabric.attention), on CPU with kvfabric.llama: the same logits as the dynamic cache, views
over the pages rather than copies, and the fallbacks (a batch, a sequence beyond the pages)."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))

try:
    import torch
except ImportError:  # the binding's other tests run without torch
    torch = None

CFG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
       "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "vocab_size": 97, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


class _FakeConnector:
    """Staging registers its pages with a connector; these tests need none."""

    def register(self, layers):
        self.layers = layers


@unittest.skipIf(torch is None, "torch is not installed")
class TestAttention(unittest.TestCase):
    def reference(self, q, k, v):
        n, T = q.shape[-2], k.shape[-2]
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        mask = torch.arange(T)[None, :] <= torch.arange(T - n, T)[:, None]
        return att.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    def test_every_shape_matches_the_masked_reference(self):
        from kvfabric.attention import causal_attention

        g = torch.Generator().manual_seed(3)
        for n, T, hq, hk in ((5, 5, 4, 4), (1, 9, 4, 2), (3, 11, 4, 2), (7, 8, 6, 3),
                             (16, 40, 8, 1)):
            q = torch.randn(1, hq, n, 16, generator=g, dtype=torch.float64)
            k = torch.randn(1, hk, T, 16, generator=g, dtype=torch.float64)
            v = torch.randn(1, hk, T, 16, generator=g, dtype=torch.float64)
            got = causal_attention(q, k, v)
            self.assertEqual(tuple(got.shape), (1, hq, n, 16))
            self.assertTrue(torch.allclose(got, self.reference(q, k, v), atol=1e-10),
                            f"n={n} T={T} heads {hq}/{hk}")

    def test_strided_keys_as_staging_pages_hold_them(self):
        from kvfabric.attention import causal_attention

        g = torch.Generator().manual_seed(4)
        flat_k = torch.randn(12, 2, 16, generator=g, dtype=torch.float64)  # [tokens, heads, dim]
        flat_v = torch.randn(12, 2, 16, generator=g, dtype=torch.float64)
        k = flat_k[:10].transpose(0, 1).unsqueeze(0)  # [1, heads, 10, dim], a view
        v = flat_v[:10].transpose(0, 1).unsqueeze(0)
        q = torch.randn(1, 4, 3, 16, generator=g, dtype=torch.float64)
        ref = self.reference(q, k.contiguous(), v.contiguous())
        self.assertTrue(torch.allclose(causal_attention(q, k, v), ref, atol=1e-10))

    def test_only_the_plain_causal_mask_takes_the_bottom_right_path(self):
        from kvfabric.attention import _MaskCheck

        chk, n, T = _MaskCheck(), 3, 7
        plain = (torch.arange(T)[None, :] <= torch.arange(T - n, T)[:, None])[None, None]
        self.assertTrue(chk.plain_causal(plain, n, T))
        self.assertTrue(chk.plain_causal(plain, n, T))  # the same tensor: the kept verdict
        padded = plain.clone()
        padded[..., 0] = False  # a padding position no query may see
        self.assertFalse(chk.plain_causal(padded, n, T))
        additive = torch.zeros(1, 1, n, T).masked_fill(~plain, float("-inf"))
        self.assertTrue(chk.plain_causal(additive, n, T))
        self.assertFalse(chk.plain_causal(plain.expand(2, 1, n, T), n, T))  # a batch
        self.assertFalse(chk.plain_causal(plain, n, T + 1))  # another shape

    def test_more_queries_than_keys_is_an_error(self):
        from kvfabric.attention import causal_attention

        with self.assertRaises(ValueError):
            causal_attention(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 3, 8),
                             torch.zeros(1, 2, 3, 8))


class _TinyStaged(unittest.TestCase):
    """A tiny kvfabric.llama model in float32 on CPU and a staging area of 64 tokens."""

    def setUp(self):
        from kvfabric import models
        from kvfabric.engine import Staging
        from kvfabric.llama import KVCache

        torch.manual_seed(0)
        self.model, self.factory, _ = models.build(CFG, "torch", "cpu", "f32", seed=0)
        self.layout = models.layout_for(CFG, "tiny", page_tokens=4, chunk_tokens=8, dtype="f32")
        self.stage = Staging(_FakeConnector(), self.layout, 64, torch.device("cpu"),
                             torch.float32)
        self.assertIs(self.factory, KVCache)


@unittest.skipIf(torch is None, "torch is not installed")
class TestStagedCache(_TinyStaged):

    def logits(self, ids, cache):
        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids]), past_key_values=cache).logits[0]

    def test_same_logits_as_the_dynamic_cache_through_prefill_and_decode(self):
        from kvfabric.llama import KVCache
        from kvfabric.staged import StagedKVCache

        ids = [int(x) for x in torch.randint(0, 97, (21,))]
        staged = self.stage.cache(self.factory)
        self.assertIsInstance(staged, StagedKVCache)
        dyn = KVCache()
        self.assertTrue(torch.allclose(self.logits(ids[:13], staged), self.logits(ids[:13], dyn),
                                       atol=1e-5))
        for t in ids[13:]:  # decoding steps, one position each
            self.assertTrue(torch.allclose(self.logits([t], staged), self.logits([t], dyn),
                                           atol=1e-5))
        self.assertEqual(staged.get_seq_length(), 21)
        self.assertTrue(staged.staged)
        # the cache's keys are views of the pages, which hold what the model computed
        k_plane = self.stage.planes()[1][0]
        self.assertEqual(staged.layers[1].keys.data_ptr(), k_plane.data_ptr())
        self.assertTrue(torch.equal(k_plane[:21], dyn.layers[1].keys[0].transpose(0, 1)))

    def test_a_prefix_attached_in_place_continues_as_if_computed(self):
        ids = [int(x) for x in torch.randint(0, 97, (20,))]
        first = self.stage.cache(self.factory)
        self.logits(ids[:16], first)  # the prefix's KV is now in the pages
        whole = self.logits(ids, self.factory())
        second = self.stage.cache(self.factory)  # a new sequence over the same pages
        for layer in range(self.layout.layers):
            self.stage.attach(second, layer, 0, 16)
        self.assertEqual(second.get_seq_length(), 16)
        self.assertTrue(torch.allclose(self.logits(ids[16:], second), whole[16:], atol=1e-5))
        with self.assertRaises(RuntimeError):  # attach must continue where the layer ends
            self.stage.attach(second, 0, 8, 30)

    def test_crop_then_compute_again(self):
        ids = [int(x) for x in torch.randint(0, 97, (18,))]
        c = self.stage.cache(self.factory)
        self.logits(ids[:10] + [5, 6, 7], c)
        c.crop(-3)  # the last three removed
        self.assertEqual(c.get_seq_length(), 10)
        c.crop(8)  # the first eight kept
        self.assertEqual(c.get_seq_length(), 8)
        got = self.logits(ids[8:], c)
        self.assertTrue(torch.allclose(got, self.logits(ids, self.factory())[8:], atol=1e-5))

    def test_beyond_the_pages_leaves_them_and_stays_exact(self):
        ids = [int(x) for x in torch.randint(0, 97, (70,))]  # the staging holds 64
        c = self.stage.cache(self.factory)
        self.logits(ids[:60], c)
        self.assertTrue(c.staged)
        got = self.logits(ids[60:], c)
        self.assertFalse(c.staged)
        self.assertEqual(c.get_seq_length(), 70)
        self.assertTrue(torch.allclose(got, self.logits(ids, self.factory())[60:], atol=1e-5))
        with self.assertRaises(RuntimeError):
            c.layers[0].attach(4)

    def test_save_reads_the_pages_and_zeroes_only_the_padding(self):
        ids = [int(x) for x in torch.randint(0, 97, (13,))]
        c = self.stage.cache(self.factory)
        self.logits(ids, c)
        k_plane = self.stage.planes()[0][0]
        before = k_plane[:13].clone()
        k_plane[13:16].fill_(7.0)  # stale positions in the last chunk's padding
        self.stage.from_cache(c, 0, 16)
        self.assertTrue(torch.equal(k_plane[:13], before))
        self.assertTrue(bool((k_plane[13:16] == 0).all()))

    def test_a_batch_leaves_the_pages(self):
        c = self.stage.cache(self.factory)
        k = torch.randn(2, 2, 3, 16)
        keys, _ = c.update(k, k, 0)
        self.assertTrue(torch.equal(keys, k))
        self.assertFalse(c.staged)


@unittest.skipIf(torch is None, "torch is not installed")
class TestGraphStep(_TinyStaged):
    """kvfabric.graphstep's step (run eagerly: CUDA graphs need a GPU; the H200 runs them, see
    docs/python.md) against the model's own forward pass over the staged cache."""

    def test_steps_give_the_forward_pass_tokens_and_pages(self):
        from kvfabric.graphstep import GraphStep

        ids = [int(x) for x in torch.randint(0, 97, (19,))]
        ref = self.stage.cache(self.factory)
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=ref)
            tok = int(out.logits[0, -1].argmax())
            want = []
            for _ in range(6):
                want.append(tok)
                tok = int(self.model(input_ids=torch.tensor([[tok]]),
                                     past_key_values=ref).logits[0, -1].argmax())
        want_pages = [p[0][:25].clone() for p in self.stage.planes()]
        # the same prompt again, then the steps through the graph step's code
        c = self.stage.cache(self.factory)
        with torch.no_grad():
            tok = int(self.model(input_ids=torch.tensor([ids]), past_key_values=c)
                      .logits[0, -1].argmax())
        g = GraphStep(self.model, self.stage.planes(), capture=False)
        self.assertEqual(g.attention, "eager")
        got, seen = [], []
        for i in range(6):
            got.append(tok)
            tok = g.step(tok, 19 + i, before=seen.append)
        self.assertEqual(got, want)
        self.assertEqual(seen, list(range(self.layout.layers)) * 6)
        for layer, p in enumerate(self.stage.planes()):
            self.assertTrue(torch.equal(p[0][:25], want_pages[layer]), f"layer {layer}")

    def test_masked_attention_equals_the_slice(self):
        from kvfabric import graphstep

        g = torch.Generator().manual_seed(5)
        q = torch.randn(1, 4, 1, 16, generator=g, dtype=torch.float64)
        k = torch.randn(30, 2, 16, generator=g, dtype=torch.float64)
        v = torch.randn(30, 2, 16, generator=g, dtype=torch.float64)
        mask = (torch.arange(30) < 11).view(1, 1, 1, 30)
        graphstep._TLS.ctx = graphstep._Ctx(None, None, None, 11, "masked", mask)
        try:
            masked = graphstep.decode_attention(q, k, v)
            graphstep._TLS.ctx.mode = "eager"
            sliced = graphstep.decode_attention(q, k, v)
        finally:
            graphstep._TLS.ctx = None
        self.assertTrue(torch.allclose(masked, sliced, atol=1e-10))

    def test_refuses_what_it_cannot_run(self):
        from kvfabric.graphstep import GraphStep, unsupported

        self.assertIsNone(unsupported(self.model, self.stage.planes()))
        self.assertIn("layers", unsupported(self.model, self.stage.planes()[:2]))
        with self.assertRaises(ValueError):
            GraphStep(self.model, self.stage.planes(), capture=True)  # pages on the CPU
        g = GraphStep(self.model, self.stage.planes(), capture=False)
        with self.assertRaises(ValueError):
            g.step(1, 64)  # beyond the pages


if __name__ == "__main__":
    unittest.main()
