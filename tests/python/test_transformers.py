"""kvfabric.transformers with a real transformers model (a small Llama with random weights,
float32): generate with a prefix another request saved loads it layer by layer and produces the
same tokens as generate without kvfabric; the saved KV is what the model computed. Skipped where
transformers is not installed (CI); run on the GPU machine."""

import os
import random
import unittest

try:
    import torch
    import transformers
except ImportError:
    transformers = None

import kvfabric as kvf
from test_binding import Store


@unittest.skipIf(transformers is None, "transformers is not installed")
class TestTransformers(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from kvfabric import models
        cls.store = Store(memory="256M")
        cls.device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                                       num_hidden_layers=4, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=4096)
        torch.manual_seed(0)
        cls.model = transformers.LlamaForCausalLM(cfg).to(cls.device, torch.float32).eval()
        cls.layout = models.layout_for(cfg, "tiny-llama", page_tokens=16, chunk_tokens=64,
                                       dtype="f32")

    @classmethod
    def tearDownClass(cls):
        cls.store.stop()

    def plain(self, tokens, n):
        ids = torch.tensor([tokens], device=self.device)
        with torch.no_grad():
            return self.model.generate(ids, max_new_tokens=n, do_sample=False,
                                       pad_token_id=0)[0].tolist()

    def test_generate_reuses_a_saved_prefix(self):
        from kvfabric.transformers import KVFabricGenerate
        r = random.Random(1)
        a = [r.randrange(1000) for _ in range(200)]
        b = a[:150] + [r.randrange(1000) for _ in range(60)]
        with kvf.Connector(self.layout, nodes=[self.store.addr], salt="hf") as cn:
            gen = KVFabricGenerate(self.model, cn, self.layout, staging_tokens=1024)
            with torch.no_grad():
                out_a, info_a = gen.generate(a, max_new_tokens=8, do_sample=False, pad_token_id=0)
                self.assertEqual(info_a.cached_tokens, 0)
                self.assertEqual(info_a.saved_tokens, 192)
                self.assertEqual(out_a, self.plain(a, 8))
                out_b, info_b = gen.generate(b, max_new_tokens=8, do_sample=False, pad_token_id=0)
            self.assertEqual(info_b.cached_tokens, 128)
            self.assertEqual(info_b.loaded_tokens, 128)
            self.assertFalse(info_b.recomputed)
            self.assertEqual(out_b, self.plain(b, 8))
            st = cn.stats()
            self.assertEqual(st["chunks_loaded"], 2)
            if self.device == "cuda":
                self.assertGreater(st["cuda_bytes"], 0)

    def test_engines_hand_over_and_match_generate(self):
        """A prefill engine and a decode engine (two connectors, one store): 20 requests sharing
        prefixes, each prefilled on one and decoded on the other from the KV it saved, give
        exactly transformers' own greedy tokens."""
        from kvfabric.engine import Engine
        r = random.Random(7)
        system = [r.randrange(1000) for _ in range(150)]
        with kvf.Connector(self.layout, nodes=[self.store.addr], salt="pd") as cp, \
                kvf.Connector(self.layout, nodes=[self.store.addr], salt="pd") as cd:
            pre = Engine(self.model, self.layout, transformers.DynamicCache, connector=cp,
                         max_tokens=1024)
            dec = Engine(self.model, self.layout, transformers.DynamicCache, connector=cd,
                         max_tokens=1024)
            loaded = 0
            for i in range(20):
                toks = system[: r.randrange(64, 150)] + [r.randrange(1000)
                                                          for _ in range(r.randrange(1, 120))]
                p = pre.run("prefill", toks)
                d = dec.run("decode", toks, max_tokens=6, first_token=p.tokens[0])
                self.assertFalse(d.first_token_mismatch, i)
                self.assertEqual(d.tokens, self.plain(toks, 6)[len(toks):], i)
                loaded += d.loaded_tokens
            self.assertGreater(loaded, 0)

    def test_kvfabric_llama_matches_transformers(self):
        """kvfabric.llama with the transformers model's weights (through a safetensors file)
        computes the same logits."""
        import shutil
        import tempfile
        from kvfabric.checkpoint import load_checkpoint, write_safetensors
        from kvfabric.llama import KVCache, LlamaModel
        d = tempfile.mkdtemp(prefix="kvf-hf-")
        try:
            write_safetensors(os.path.join(d, "model.safetensors"), self.model.state_dict())
            ours = LlamaModel(self.model.config.to_dict()).to(self.device).eval()
            load_checkpoint(ours, d)
            ids = torch.tensor([[random.Random(3).randrange(1000) for _ in range(100)]],
                               device=self.device)
            with torch.no_grad():
                want = self.model(input_ids=ids).logits
                got = ours(input_ids=ids, past_key_values=KVCache()).logits
            self.assertTrue(torch.allclose(want, got, atol=2e-4, rtol=1e-3),
                            float((want - got).abs().max()))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def cb_run(self, prompts, n, kv=None):
        """transformers' continuous batching (its real manager): greedy tokens per prompt."""
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        cb = ContinuousBatchingConfig(block_size=16, num_blocks=256, max_batch_tokens=512,
                                      use_cuda_graph=False, use_async_batching=False)
        gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=-1,
                               pad_token_id=0)
        self.model.set_attn_implementation("sdpa")
        m = self.model.init_continuous_batching(generation_config=gen,
                                                continuous_batching_config=cb)
        if kv is not None:
            kv.attach(m)
        ids = m.add_requests(prompts, max_new_tokens=n)
        m.start()
        out = {}
        for _ in range(600):
            r = m.get_result(timeout=0.1)
            if r is not None and r.is_finished():
                self.assertIsNone(r.error)
                out[r.request_id] = r.generated_tokens
            if len(out) == len(ids):
                break
        m.stop(block=True, timeout=30)
        m.destroy()
        if kv is not None:
            self.assertTrue(kv.drain(30))
        return [out[i] for i in ids]

    def test_continuous_batching_loads_what_another_manager_saved(self):
        from kvfabric.continuous import ContinuousKV
        r = random.Random(4)
        docs = [[r.randrange(1000) for _ in range(160)], [r.randrange(1000) for _ in range(300)]]
        reqs = [docs[i % 2] + [r.randrange(1000) for _ in range(r.randint(3, 40))]
                for i in range(6)]
        ref = self.cb_run(reqs, 5)
        with kvf.Connector(self.layout, nodes=[self.store.addr], salt="cb") as cn:
            kv0 = ContinuousKV(cn, self.layout)
            self.cb_run(docs, 1, kv0)
            self.assertEqual(kv0.stats["saved_tokens"], 128 + 256)
            kv0.close()
            kv1 = ContinuousKV(cn, self.layout)
            got = self.cb_run(reqs, 5, kv1)
            kv1.close()
        self.assertEqual(got, ref)
        self.assertGreater(kv1.stats["loaded_tokens"], 0)
        self.assertEqual(kv1.stats["load_failures"], 0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
