"""kvfabric.transformers with a real transformers model (a small Llama with random weights,
float32): generate with a prefix another request saved loads it layer by layer and produces the
same tokens as generate without kvfabric; the saved KV is what the model computed. Skipped where
transformers is not installed (CI); run on the GPU machine."""

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


if __name__ == "__main__":
    unittest.main(verbosity=2)
