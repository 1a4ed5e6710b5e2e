"""kvfabric.paged against a real kvf-store with a tiny plain-torch model on a paged cache: a
request whose prefix another request saved loads it and computes only the rest, layer by layer,
and generates the same tokens as one computed whole; what it loads is bitwise what was saved; a
prefix the engine shares itself is not moved; a store gone is a miss and a recompute."""

import random
import unittest

try:
    import torch  # noqa: F401
except ImportError:
    torch = None

import kvfabric as kvf

if torch is not None:
    from kvfabric.paged import BlockPool, KVReuse, PagedKVCache, PoolExhausted
    from tiny_model import TinyModel

from test_binding import Store


def prompt(n, seed):
    r = random.Random(seed)
    return [r.randrange(512) for _ in range(n)]


@unittest.skipIf(torch is None, "torch is not installed")
class TestPaged(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.store = Store(memory="64M")
        cls.layout = kvf.Layout.preset("ref-tiny")  # 4 layers, 2 x 32, f32, page 16, chunk 64
        cls.model = TinyModel(cls.layout)

    @classmethod
    def tearDownClass(cls):
        cls.store.stop()

    def engine(self, salt, pages=64):
        cn = kvf.Connector(self.layout, nodes=[self.store.addr], salt=salt, deadline_ms=5000)
        cache = PagedKVCache(self.layout, pages)
        return cn, cache, KVReuse(cn, cache)

    def reference(self, tokens, steps):
        """The request computed whole, no kvfabric: its tokens and its cache."""
        cache = PagedKVCache(self.layout, 64)
        ids = BlockPool(64).alloc((len(tokens) + 15) // 16 + steps // 16 + 1)
        first = self.model.prefill(tokens, cache, ids)
        return self.model.decode(tokens, first, cache, ids, steps), cache, ids

    def run_request(self, kv, tokens, steps, shared=0, shared_pages=()):
        plan = kv.begin(tokens, shared, shared_pages)
        extra = kv.pool.alloc(steps // 16 + 1)
        ids = plan.page_ids + extra
        first = self.model.prefill(tokens, kv.cache, ids, plan.compute_from,
                                   lambda i: kv.wait_layer(plan, i) or plan.load is None)
        kv.finish_load(plan)
        if first is None or plan.first_bad_layer is not None:  # a miss: recompute
            first = self.model.prefill(tokens, kv.cache, ids, plan.shared)
        out = self.model.decode(tokens, first, kv.cache, ids, steps)
        sv = kv.save(plan, len(tokens))
        if sv is not None:
            sv.wait()
            sv.close()
        return plan, out, ids, extra

    def test_a_saved_prefix_is_loaded_and_the_tokens_match(self):
        cn, cache, kv = self.engine("paged-1")
        with cn:
            a = prompt(3 * 64 + 10, 1)
            plan_a, out_a, ids_a, _ = self.run_request(kv, a, 8)
            self.assertEqual(plan_a.cached, 0)
            self.assertEqual(out_a, self.reference(a, 8)[0])
            saved = [t.clone() for t in cache.tensors]
            b = a[:128] + prompt(100, 2)
            plan_b, out_b, ids_b, _ = self.run_request(kv, b, 8)
            self.assertEqual(plan_b.cached, 128)
            self.assertEqual(plan_b.compute_from, 128)
            self.assertEqual(out_b, self.reference(b, 8)[0])
            # The loaded pages hold bitwise what the first request saved.
            for layer in range(self.layout.layers):
                for j in range(128 // 16):
                    self.assertTrue(torch.equal(cache.tensors[layer][:, ids_b[j]],
                                                saved[layer][:, ids_a[j]]))
            st = cn.stats()
            self.assertEqual(st["chunks_loaded"], 2)
            self.assertEqual(st["chunks_saved"], 3 + 1)  # a's three, then b's third

    def test_two_caches_on_one_connector(self):
        """Two users of one connector (a connector moves the memory registered last): each takes
        its pages back before its transfers, so what one saves from its pages is what the other
        loads into its own, bit for bit."""
        cn, cache_a, kv_a = self.engine("paged-two")
        with cn:
            cache_b = PagedKVCache(self.layout, 64)
            kv_b = KVReuse(cn, cache_b)  # registered last
            a = prompt(2 * 64 + 5, 7)
            plan_a, out_a, ids_a, _ = self.run_request(kv_a, a, 4)  # saves from cache_a's pages
            plan_b, out_b, ids_b, _ = self.run_request(kv_b, a, 4)
            self.assertEqual(plan_b.cached, 128)
            self.assertEqual(out_b, self.reference(a, 4)[0])
            for layer in range(self.layout.layers):
                for j in range(128 // 16):
                    self.assertTrue(torch.equal(cache_b.tensors[layer][:, ids_b[j]],
                                                cache_a.tensors[layer][:, ids_a[j]]))

    def test_a_prefix_shared_by_the_engine_is_not_moved(self):
        cn, cache, kv = self.engine("paged-2")
        with cn:
            a = prompt(3 * 64, 3)
            plan_a, _, ids_a, _ = self.run_request(kv, a, 4)
            b = a[:192] + prompt(40, 4)
            before = cn.stats()["chunks_loaded"]
            plan_b, out_b, _, _ = self.run_request(kv, b, 4, shared=64, shared_pages=ids_a[:4])
            self.assertEqual(plan_b.cached, 192)
            self.assertEqual(cn.stats()["chunks_loaded"] - before, 2)  # chunks 1 and 2, not 0
            self.assertEqual(out_b, self.reference(b, 4)[0])

    def test_a_store_gone_is_a_recompute(self):
        lone = Store(memory="32M")
        cn = kvf.Connector(self.layout, nodes=[lone.addr], salt="paged-3", deadline_ms=1000)
        cache = PagedKVCache(self.layout, 64)
        kv = KVReuse(cn, cache)
        a = prompt(2 * 64 + 5, 5)
        self.run_request(kv, a, 2)
        b = a[:128] + prompt(30, 6)
        plan = kv.begin(b)
        self.assertEqual(plan.cached, 128)
        lone.stop()  # gone between the lookup and the load
        ids = plan.page_ids + kv.pool.alloc(1)
        first = self.model.prefill(b, cache, ids, plan.compute_from,
                                   lambda i: kv.wait_layer(plan, i))
        kv.finish_load(plan)
        if first is None or plan.first_bad_layer is not None:
            first = self.model.prefill(b, cache, ids, plan.shared)
        out = self.model.decode(b, first, cache, ids, 4)
        self.assertEqual(out, self.reference(b, 4)[0])
        cn.close()

    def test_pool(self):
        pool = BlockPool(4)
        ids = pool.alloc(3)
        with self.assertRaises(PoolExhausted):
            pool.alloc(2)
        pool.free(ids)
        self.assertEqual(pool.free_count, 4)


if __name__ == "__main__":
    unittest.main(verbosity=2)
