"""kvfabric.continuous against a real kvf-store, on a miniature of transformers' continuous
batching (fake_cb) with the tiny model's weights: a manager whose cache is empty loads what
another manager saved, into its blocks, layer by layer, and generates the same tokens as one that
computed everything; the loaded blocks are bitwise the saved ones and join prefix sharing; a chunk
partly in the GPU's blocks is loaded whole; a load that fails during a forward pass drops that
step's output and the request is computed again; events name the blocks held."""

import random
import unittest

try:
    import torch  # noqa: F401
except ImportError:
    torch = None

import kvfabric as kvf
from kvfabric.errors import Miss

if torch is not None:
    from kvfabric.continuous import ContinuousKV
    from fake_cb import Manager
    from tiny_model import TinyModel

from test_binding import Store


def toks(n, seed):
    r = random.Random(seed)
    return [r.randrange(512) for _ in range(n)]


class FailingLoads:
    """A connector whose loads fail at a layer (a store lost mid-load: the pages of that layer and
    the next hold garbage); everything else is the real connector's."""

    def __init__(self, cn, layer, manager):
        self.cn, self.layer, self.manager = cn, layer, manager

    def __getattr__(self, name):
        return getattr(self.cn, name)

    def load(self, tokens, pages, first_chunk=0):
        x, layer = self.cn.load(tokens, pages, first_chunk=first_chunk), self.layer
        cache = self.manager.batch_processor.cache
        per = self.cn.layout.chunk_tokens // cache.block_size
        rows = torch.tensor([p * cache.block_size + o for p in pages[first_chunk * per:]
                             for o in range(cache.block_size)])

        class Broken:
            def wait_layer(self, i):
                x.wait_layer(i)
                if i >= layer:
                    cache.key_cache[i].index_fill_(0, rows, float("nan"))
                    raise Miss(-1, f"load: layer {i}", "injected")

            def __getattr__(self, name):
                return getattr(x, name)

        return Broken()


class Events:
    def __init__(self):
        self.batches = []

    def publish(self, **kw):
        self.batches.append(kw)


@unittest.skipIf(torch is None, "torch is not installed")
class TestContinuous(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.store = Store(memory="64M")
        cls.layout = kvf.Layout.preset("ref-tiny")  # 4 layers, 2 x 32, f32, page 16, chunk 64
        cls.model = TinyModel(cls.layout)
        cls.salt = 0

    @classmethod
    def tearDownClass(cls):
        cls.store.stop()

    def kv(self, **kw):
        type(self).salt += 1
        cn = kvf.Connector(self.layout, nodes=[self.store.addr], salt=f"cb{self.salt}",
                           deadline_ms=5000)
        self.addCleanup(cn.close)
        return cn

    def attached(self, cn, **kw):
        m = Manager(self.model, self.layout)
        kv = ContinuousKV(cn, self.layout, **kw)
        kv.attach(m)
        self.addCleanup(kv.close)
        return m, kv

    def saved(self, cn, docs):
        """A manager that computes docs and saves them through cn (done when this returns)."""
        m0, kv0 = self.attached(cn)
        m0.run(docs, 1)
        self.assertTrue(kv0.drain(10))
        return m0, kv0

    def test_load_saved_prefix(self):
        docs = [toks(200, 1), toks(130, 2)]
        reqs = [docs[0] + toks(20, 3), docs[1] + toks(9, 4), docs[0] + toks(33, 5)]
        ref = Manager(self.model, self.layout).run(reqs, 6)
        cn = self.kv()
        m0, kv0 = self.attached(cn)
        m0.run(docs, 2)
        self.assertTrue(kv0.drain(10))
        self.assertEqual(kv0.stats["saved_tokens"], 192 + 128)  # whole chunks of 64
        self.assertEqual(kv0.stats["loads"], 0)
        m1, kv1 = self.attached(cn)
        out = m1.run(reqs, 6)
        self.assertEqual(out, ref)
        r = kv1.records
        # r2 shares the blocks r0 is loading (both scheduled together): loaded once
        self.assertEqual([r[f"r{i}"].loaded_tokens for i in range(3)], [192, 128, 0])
        self.assertEqual(r["r2"].inflight_shared_tokens, 192)
        self.assertFalse(any(x.whole_wait for x in r.values()))
        # the loaded blocks hold what the first manager computed, bit for bit
        c0, c1 = m0.batch_processor.cache, m1.batch_processor.cache
        h0 = self.blocks(c0, docs[0][:192])
        h1 = self.blocks(c1, docs[0][:192])
        self.assertIsNotNone(h0)
        self.assertIsNotNone(h1)
        for li in range(self.layout.layers):
            self.assertTrue(torch.equal(c0.key_cache[li][h0], c1.key_cache[li][h1]))
            self.assertTrue(torch.equal(c0.value_cache[li][h0], c1.value_cache[li][h1]))
        # a later request finds them on the "GPU": transformers' own sharing, nothing loaded
        again = m1.run([docs[0] + toks(5, 6)], 3)
        self.assertEqual(again, Manager(self.model, self.layout).run([docs[0] + toks(5, 6)], 3))
        last = r[sorted(r, key=lambda k: int(k[1:]))[-1]]
        self.assertEqual(last.gpu_shared_tokens, 192)
        self.assertEqual(last.loaded_tokens, 0)
        kv1.close()
        self.assertEqual(self.refs(c1), 0)  # every reference the saves took is given back

    @staticmethod
    def blocks(cache, tokens):
        bm, bs, h, rows = cache._block_manager, cache.block_size, None, []
        for b in range(len(tokens) // bs):
            h = bm.compute_hash(h, tokens[b * bs:(b + 1) * bs], 0)
            i = bm._hash_to_id.get(h)
            if i is None:
                return None
            rows.extend(range(i * bs, (i + 1) * bs))
        return torch.tensor(rows)

    @staticmethod
    def refs(cache):
        return sum(b.ref_count for b in cache._block_manager._id_to_block.values())

    def test_partial_chunk_shared_on_gpu(self):
        doc = toks(256, 7)
        cn = self.kv()
        self.saved(cn, [doc])
        m1, kv1 = self.attached(cn)
        # the GPU computes 40 tokens of the document first: 2 blocks of 16, not a whole chunk
        m1.run([doc[:40]], 1)
        req = doc + toks(11, 8)
        out = m1.run([req], 5)
        self.assertEqual(out, Manager(self.model, self.layout).run([req], 5))
        rec = list(kv1.records.values())[-1]
        self.assertEqual(rec.gpu_shared_tokens, 32)
        self.assertEqual(rec.loaded_tokens, 256)  # chunk 0 loaded whole, its 2 shared blocks let go
        kv1.close()
        self.assertEqual(self.refs(m1.batch_processor.cache), 0)

    def test_load_failing_mid_forward_requeues(self):
        doc = toks(192, 9)
        cn = self.kv()
        self.saved(cn, [doc])
        reqs = [doc + toks(7, 10), toks(50, 11), doc + toks(20, 17)]
        # one token each: an output sampled from the broken step would be the request's answer
        ref = Manager(self.model, self.layout).run(reqs, 1)
        m1 = Manager(self.model, self.layout)
        kv1 = ContinuousKV(FailingLoads(cn, 2, m1), self.layout)
        kv1.attach(m1)
        self.addCleanup(kv1.close)
        out = m1.run(reqs, 1)
        self.assertEqual(out, ref)
        self.assertEqual(kv1.stats["load_failures"], 1)
        self.assertEqual(kv1.stats["requeued"], 2)  # r2 shared r0's blocks in flight
        for rid in ("r0", "r2"):
            rec = kv1.records[rid]
            self.assertEqual((rec.failed_layer, rec.requeued), (2, True))
        # nothing of the failed load was hashed for sharing: a request for the document now
        # computes it or shares the recomputed blocks, and gets the right tokens
        again = doc + toks(3, 12)
        self.assertEqual(m1.run([again], 3), Manager(self.model, self.layout).run([again], 3))

    def test_whole_prompt_cached_and_computed_twice(self):
        doc = toks(192, 18)  # 3 chunks exactly
        cn = self.kv()
        self.saved(cn, [doc])
        m1, kv1 = self.attached(cn)
        kv1._no_load.add("r0")  # r0 computes the document while r1 loads it, r2 shares r1's
        reqs = [doc + toks(9, 19), doc + toks(4, 20), doc + toks(30, 21), doc]
        out = m1.run(reqs, 3)
        self.assertEqual(out, Manager(self.model, self.layout).run(reqs, 3))
        r = kv1.records
        self.assertEqual((r["r1"].loaded_tokens, r["r2"].inflight_shared_tokens), (192, 192))
        self.assertEqual(r["r3"].loaded_tokens + r["r3"].inflight_shared_tokens, 192)
        # blocks complete on the GPU now, each once: the next request shares them
        again = doc + toks(6, 22)
        self.assertEqual(m1.run([again], 2), Manager(self.model, self.layout).run([again], 2))
        self.assertEqual(r["r4"].gpu_shared_tokens, 192)
        kv1.close()
        self.assertEqual(self.refs(m1.batch_processor.cache), 0)

    def test_store_gone_computes(self):
        doc = toks(128, 13)
        st = Store(memory="16M")
        cn = kvf.Connector(self.layout, nodes=[st.addr], salt="gone", deadline_ms=2000)
        self.addCleanup(cn.close)
        self.saved(cn, [doc])
        st.stop()
        req = doc + toks(5, 14)
        m1, kv1 = self.attached(cn)
        self.assertEqual(m1.run([req], 3), Manager(self.model, self.layout).run([req], 3))
        self.assertEqual(kv1.stats["loaded_tokens"], 0)

    def test_events_follow_blocks(self):
        ev = Events()
        cn = self.kv()
        m, kv = self.attached(cn, events=ev, event_block_tokens=8)
        doc = toks(40, 15)
        m.run([doc], 1)
        stored = [h for b in ev.batches for h in b.get("stored", [])]
        self.assertEqual(stored, kvf.hash_blocks(doc[:32], 8))  # 2 blocks of 16 = 4 of 8
        self.assertIsNone(ev.batches[0]["parent"])
        # fill the cache: the block manager reuses the document's blocks; they are removed
        m.run([toks(16 * 63 - 1, 16)], 1)  # all 64 blocks (one ahead)
        removed = [h for b in ev.batches for h in b.get("removed", [])]
        self.assertTrue(set(kvf.hash_blocks(doc[:32], 8)) <= set(removed))

    def test_layout_must_match_blocks(self):
        cn = self.kv()
        m = Manager(self.model, self.layout)
        bad = kvf.Layout("x", self.layout.layers, self.layout.kv_heads, self.layout.head_dim,
                         "f32", page_tokens=32, chunk_tokens=64)
        kv = ContinuousKV(cn, bad)
        with self.assertRaisesRegex(ValueError, "block_size"):
            kv.attach(m)
            m._create_batch_processor()


if __name__ == "__main__":
    unittest.main()
