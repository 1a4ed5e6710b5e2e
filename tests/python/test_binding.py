"""The Python binding (python/kvfabric) against a real kvf-store on loopback: keys against the
golden vectors of docs/keys.md, layouts and errors as exceptions, layerwise save and load of host
pages with every byte checked, a dead store, a wrong registration, the ownership rules, and torch
tensors (CPU, and CUDA where a GPU is there) when torch is installed.

Run by ctest with PYTHONPATH, KVF_LIBRARY and KVF_STORE_BIN set (tests/CMakeLists.txt).
"""

import ctypes
import http.server
import json
import os
import random
import socket
import subprocess
import threading
import time
import unittest

import kvfabric as kvf

STORE_BIN = os.environ.get("KVF_STORE_BIN", "kvf-store")


class Store:
    """A kvf-store on loopback, port 0; stopped by stop()."""

    def __init__(self, memory="64M", extra=(), listen="127.0.0.1:0"):
        self.p = subprocess.Popen([STORE_BIN, "--listen", listen, "--memory", memory,
                                   "--threads", "1", "--log-level", "warn", *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if "ready" in line or not line:
                break
        if "listen=" not in line:
            self.stop()
            raise RuntimeError(f"kvf-store did not start: {line!r}")
        self.addr = line.split("listen=")[1].split()[0]

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        if self.p.stdout:
            self.p.stdout.close()


class HostKV:
    """Every layer's K and V planes in one host buffer, num_pages pages each at page_stride."""

    def __init__(self, layout, num_pages, pad=0, seed=1):
        self.layout, self.num_pages = layout, num_pages
        self.page_bytes = layout.page_bytes
        self.stride = self.page_bytes + pad
        self.plane = self.stride * num_pages
        self.buf = (ctypes.c_ubyte * (self.plane * 2 * layout.layers))()
        rnd = random.Random(seed)
        ctypes.memmove(self.buf, bytes(rnd.getrandbits(8) for _ in range(len(self.buf))),
                       len(self.buf))
        base = ctypes.addressof(self.buf)
        self.pages = [kvf.KVPages(base + (2 * i) * self.plane, base + (2 * i + 1) * self.plane,
                                  self.stride, num_pages, "host", owner=self.buf)
                      for i in range(layout.layers)]

    def page(self, layer, plane, p):
        off = (2 * layer + plane) * self.plane + p * self.stride
        return bytes(self.buf[off:off + self.page_bytes])

    def differing(self, other, pairs):
        """The (layer, plane, my page, other's page) of the pairs whose bytes differ."""
        pairs = list(pairs)
        return [(layer, plane, a, b) for layer in range(self.layout.layers) for plane in range(2)
                for a, b in pairs if self.page(layer, plane, a) != other.page(layer, plane, b)]


def tokens(n, seed):
    r = random.Random(seed)
    return [r.randrange(32000) for _ in range(n)]


class TestClient(unittest.TestCase):
    """The storage client and chunk objects against a real kvf-store: objects encoded and put,
    found, got back and decoded byte for byte (raw and compressed), a corrupted object refused,
    a miss, eviction, pins, stats and clear; a dead store as an error."""

    @classmethod
    def setUpClass(cls):
        cls.store = Store(memory="64M")

    @classmethod
    def tearDownClass(cls):
        cls.store.stop()

    def test_objects_round_trip(self):
        layout = kvf.Layout.preset("ref-tiny")
        ks = kvf.KeySpace(layout, salt="client-test")
        keys = ks.keys(tokens(64 * 3, 5))
        self.assertEqual(len(keys), 3)
        rnd = random.Random(9)
        segs = [[bytes(rnd.getrandbits(8) for _ in range(4096)) for _ in range(layout.layers)]
                for _ in keys]
        segs[2] = [bytes(4096)] * layout.layers  # compresses
        objs = [kvf.Object.encode(k, layout, 64, s, codec="lz4" if i == 2 else "none")
                for i, (k, s) in enumerate(zip(keys, segs))]
        self.assertLess(len(objs[2]), len(objs[0]))
        info, back = kvf.Object.decode(objs[0])
        self.assertEqual((info["key"], info["layers"], info["tokens"]), (keys[0], 4, 64))
        self.assertEqual(back, segs[0])
        bad = bytearray(objs[1])
        bad[-1] ^= 0xFF
        with self.assertRaises(kvf.KvfError) as e:
            kvf.Object.decode(bytes(bad))
        self.assertEqual(e.exception.name, "KVF_ECHECKSUM")
        with kvf.Client([self.store.addr], ks.seed) as c:
            self.assertEqual(c.nodes, 1)
            self.assertIn(c.transport()[0], ("shm", "tcp"))
            # a quarter of the cores, one at least (and at most 8), by default
            self.assertEqual(c.io_threads(), min(8, max(1, len(os.sched_getaffinity(0)) // 4)))
            self.assertEqual(c.put(keys, objs), ["KVF_OK"] * 3)
            self.assertEqual(c.put(keys[:1], objs[:1]), ["KVF_EEXIST"])
            self.assertEqual(c.exists(keys), [True, True, True])
            self.assertEqual(c.lookup_prefix(keys), 3)
            got = c.get(keys, 1 << 20)
            for (st, obj), s in zip(got, segs):
                self.assertEqual(st, "KVF_OK")
                self.assertEqual(kvf.Object.decode(obj)[1], s)
            # the client's own counters: the objects' bytes went out and came back, by the
            # transport it says
            k = c.counters()
            self.assertEqual(len(k), 12)
            self.assertGreater(k["requests"], 0)
            self.assertGreaterEqual(k["bytes_sent"], sum(len(o) for o in objs))
            self.assertGreaterEqual(k["bytes_received"], sum(len(o) for o in objs))
            if c.transport()[0] == "shm":
                self.assertGreaterEqual(k["shm_bytes_received"], sum(len(o) for o in objs))
            else:
                self.assertEqual(k["shm_bytes_received"], 0)
            self.assertEqual(c.get(keys[:1], 100)[0], ("KVF_E2BIG", None))
            other = ks.keys(tokens(64, 77))
            self.assertEqual(c.get(other, 1 << 20), [("KVF_ENOENT", None)])
            self.assertNotEqual(c.put(other, [bytes(bad)])[0], "KVF_OK")  # key and checksum wrong
            self.assertEqual(c.pin(keys[:1], 60000), ["KVF_OK"])
            self.assertEqual(c.unpin(keys[:1]), ["KVF_OK"])
            self.assertEqual(c.evict(keys[1:2]), ["KVF_OK"])
            self.assertEqual(c.exists(keys), [True, False, True])
            self.assertEqual(c.lookup_prefix(keys), 1)
            st = c.stats()
            self.assertIsInstance(st, dict)
            self.assertGreaterEqual(c.clear(), 2)
            self.assertEqual(c.exists(keys), [False, False, False])
            with self.assertRaises(ValueError):
                c.exists(["not-a-key"])
        try:  # a dead node: the open or the operation fails, or every key does
            with kvf.Client(["127.0.0.1:1"], ks.seed, transport="tcp", deadline_ms=300) as dead:
                st = dead.put(keys, objs)
                self.assertTrue(all(x not in ("KVF_OK", "KVF_EEXIST") for x in st), st)
                self.assertEqual(dead.exists(keys), [False] * 3)
        except kvf.KvfError as e:
            self.assertIn(e.name, ("KVF_ECONNREFUSED", "KVF_ETIMEDOUT", "KVF_EIO"))


def free_ports(n):
    """n ports free on loopback now (bound, read and released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for x in socks:
            x.bind(("127.0.0.1", 0))
        return [x.getsockname()[1] for x in socks]
    finally:
        for x in socks:
            x.close()


class TestReplicas(unittest.TestCase):
    """Hot entries copied to the next node of their key (kvf-store --replicate-hits): three nodes
    that name each other as peers; keys read twice get a copy on the node their rendezvous order
    ranks next (checked byte for byte there); with the first node killed, a client that reroutes
    finds every hot key and misses only the cold ones."""

    def wait_stats(self, c, node, pred, what):
        deadline = time.monotonic() + 15
        st = {}
        while time.monotonic() < deadline:
            st = c.stats(node).get("replication", {})
            if pred(st):
                return st
            time.sleep(0.05)
        self.fail(f"{what}: {st}")

    def three_nodes(self, addrs, stores, extra):
        """Starts a kvf-store on each address, each naming the others as --peer."""
        for a in addrs:
            peers = [w for b in addrs if b != a for w in ("--peer", b)]
            stores.append(Store(memory="64M", listen=a,
                                extra=("--replicate-hits", "2", *extra, *peers)))

    @staticmethod
    def objects(layout, keys, seed):
        rnd = random.Random(seed)
        return [kvf.Object.encode(k, layout, 64,
                                  [bytes(rnd.getrandbits(8) for _ in range(512))] * 4)
                for k in keys]

    def test_hot_keys_survive_their_node(self):
        layout = kvf.Layout.preset("ref-tiny")
        ks = kvf.KeySpace(layout, salt="replicas")
        addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
        stores = []
        try:
            self.three_nodes(addrs, stores, ())
            keys = ks.keys(tokens(64 * 60, 21))
            objs = self.objects(layout, keys, 4)
            with kvf.Client(addrs, ks.seed, transport="tcp") as c, \
                    kvf.Client(addrs[:1], ks.seed, transport="tcp") as first:
                self.assertEqual(c.put(keys, objs), ["KVF_OK"] * len(keys))
                # the keys node 0 holds: the first half read twice (hot), the rest once
                mine = [i for i, k in enumerate(keys) if first.exists([k])[0]]
                self.assertGreaterEqual(len(mine), 8, "rendezvous hashing put few keys on node 0")
                hot, cold = mine[: len(mine) // 2], mine[len(mine) // 2:]
                for _ in range(2):
                    got = c.get([keys[i] for i in hot], 1 << 16)
                    self.assertEqual([g[0] for g in got], ["KVF_OK"] * len(hot))
                c.get([keys[i] for i in cold], 1 << 16)
                st = self.wait_stats(c, 0, lambda r: r.get("made", 0) >= len(hot), "replicas")
                self.assertEqual(st["peers"], 2)
                self.assertEqual(st["failed"], 0)
                self.assertEqual(st["hits"], 2)
            # each hot key is on the node ranked next among the other two, the same bytes
            others = addrs[1:]
            with kvf.Client(others, ks.seed, transport="tcp") as rest:
                got = rest.get([keys[i] for i in hot], 1 << 16)
                self.assertEqual([g for g in got], [("KVF_OK", objs[i]) for i in hot])
                self.assertEqual(rest.exists([keys[i] for i in cold]), [False] * len(cold))
            stores[0].p.kill()
            stores[0].p.wait()
            with kvf.Client(addrs, ks.seed, transport="tcp", reroute=True,
                            deadline_ms=2000) as c:
                hot_got = c.get([keys[i] for i in hot], 1 << 16)
                for _ in range(3):  # the first requests find node 0 down; then it is skipped
                    if all(g[0] == "KVF_OK" for g in hot_got):
                        break
                    time.sleep(0.3)
                    hot_got = c.get([keys[i] for i in hot], 1 << 16)
                self.assertEqual(hot_got, [("KVF_OK", objs[i]) for i in hot])
                self.assertEqual([g[0] for g in c.get([keys[i] for i in cold], 1 << 16)],
                                 ["KVF_ENOENT"] * len(cold))
        finally:
            for x in stores:
                x.stop()

    def test_three_holders_survive_two_deaths(self):
        """--replicas 3: a hot key of node 0 is copied to both other nodes; with node 0 and the
        next node of each key killed, a rerouting client still finds every hot key."""
        layout = kvf.Layout.preset("ref-tiny")
        ks = kvf.KeySpace(layout, salt="replicas3")
        addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
        stores = []
        try:
            self.three_nodes(addrs, stores, ("--replicas", "3"))
            keys = ks.keys(tokens(64 * 40, 22))
            objs = self.objects(layout, keys, 5)
            with kvf.Client(addrs, ks.seed, transport="tcp") as c, \
                    kvf.Client(addrs[:1], ks.seed, transport="tcp") as first:
                self.assertEqual(c.put(keys, objs), ["KVF_OK"] * len(keys))
                hot = [i for i, k in enumerate(keys) if first.exists([k])[0]]
                self.assertGreaterEqual(len(hot), 6, "rendezvous hashing put few keys on node 0")
                for _ in range(2):
                    c.get([keys[i] for i in hot], 1 << 16)
                st = self.wait_stats(c, 0, lambda r: r.get("made", 0) >= 2 * len(hot), "replicas")
                self.assertEqual((st["copies"], st["failed"]), (2, 0))
            for node in (1, 2):  # a copy on each of the others
                with kvf.Client([addrs[node]], ks.seed, transport="tcp") as one:
                    self.assertEqual(one.exists([keys[i] for i in hot]), [True] * len(hot))
            # kill node 0 and node 1: every hot key is left on node 2 alone
            for node in (0, 1):
                stores[node].p.kill()
                stores[node].p.wait()
            with kvf.Client(addrs, ks.seed, transport="tcp", reroute=True,
                            deadline_ms=1000) as c:
                hot_got = c.get([keys[i] for i in hot], 1 << 16)
                for _ in range(6):  # the first requests find the dead nodes down
                    if all(g[0] == "KVF_OK" for g in hot_got):
                        break
                    time.sleep(0.3)
                    hot_got = c.get([keys[i] for i in hot], 1 << 16)
                self.assertEqual(hot_got, [("KVF_OK", objs[i]) for i in hot])
        finally:
            for x in stores:
                x.stop()

    def test_a_dead_node_fails_no_request_after_it_is_found(self):
        """With rerouting, once a node is found dead its keys go to the next node, and the probes
        that find it again (each time its backoff passes) are made apart from the requests: no
        request of its keys fails while it stays dead, and once it is back they go home."""
        layout = kvf.Layout.preset("ref-tiny")
        ks = kvf.KeySpace(layout, salt="probes")
        addrs = [f"127.0.0.1:{p}" for p in free_ports(2)]
        stores = [Store(memory="32M", listen=a) for a in addrs]
        try:
            keys = ks.keys(tokens(64 * 24, 23))
            objs = self.objects(layout, keys, 6)
            with kvf.Client(addrs, ks.seed, transport="tcp") as c:
                self.assertEqual(c.put(keys, objs), ["KVF_OK"] * len(keys))
                home0 = [k for k in keys if c.node_of(k) == 0]
            self.assertGreaterEqual(len(home0), 3)
            stores[0].p.kill()
            stores[0].p.wait()
            with kvf.Client(addrs, ks.seed, transport="tcp", reroute=True,
                            deadline_ms=1000) as c:
                c.get(home0, 1 << 16)  # finds node 0 refusing: marked down
                seen = set()
                t_end = time.monotonic() + 2.0  # backoffs of 0.2, 0.4 and 0.8 s pass
                while time.monotonic() < t_end:
                    seen.update(g[0] for g in c.get(home0, 1 << 16))
                    time.sleep(0.02)
                self.assertEqual(seen, {"KVF_ENOENT"})  # misses on node 1, never a failure
                self.assertTrue(all(c.node_of(k) == 1 for k in home0))
                # then something accepts on node 0's port and hangs up at once, while the next
                # probe comes (1.6 s after the last): a probe that fails so must not leave the
                # node "being probed" for good (it never came back before 2026-12-02's mend)
                port = int(addrs[0].rsplit(":", 1)[1])
                lsn = socket.create_server(("127.0.0.1", port))
                lsn.settimeout(0.05)
                t_end = time.monotonic() + 2.5
                while time.monotonic() < t_end:
                    try:
                        lsn.accept()[0].close()
                    except socket.timeout:
                        pass
                    seen = {g[0] for g in c.get(home0, 1 << 16)}
                    self.assertEqual(seen, {"KVF_ENOENT"})
                lsn.close()
                stores[0] = Store(memory="32M", listen=addrs[0])  # back (empty)
                t_end = time.monotonic() + 8  # the backoff is at most 5 s
                while time.monotonic() < t_end and any(c.node_of(k) != 0 for k in home0):
                    time.sleep(0.05)
                self.assertTrue(all(c.node_of(k) == 0 for k in home0), "never found again")
                self.assertEqual(c.put(home0[:1], objs[keys.index(home0[0]):][:1]), ["KVF_OK"])
                with kvf.Client(addrs[:1], ks.seed, transport="tcp") as only0:
                    self.assertEqual(only0.exists(home0[:1]), [True])
        finally:
            for x in stores:
                x.stop()

    def test_refuses_replication_without_peers(self):
        p = subprocess.run([STORE_BIN, "--listen", "127.0.0.1:0", "--memory", "16M",
                            "--replicate-hits", "2"], capture_output=True, text=True, timeout=30)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("--peer", p.stderr)


class TestFeasibility(unittest.TestCase):
    """The classifier through the binding: the same labels, reasons and gap as C."""

    def test_labels_reasons_and_gap(self):
        from kvfabric import feasibility as f
        self.assertIn("pd_handoff_store", f.actions())
        self.assertEqual(set(f.Caps.builtins()),
                         {"mlx-lm", "vllm", "llama.cpp", "reference", "kvf-store"})
        ref, store = kvf.Caps("reference"), kvf.Caps("kvf-store")
        self.assertEqual(kvf.classify("store", ref, store).label, "real")
        v = kvf.classify("rdma_read", ref, store)
        self.assertEqual((v.label, v.reason), ("backend_infeasible", "no_rdma_device"))
        self.assertIn("RDMA", v.why)
        self.assertEqual(kvf.classify("rdma_read", ref, store, allow_simulated=True).label,
                         "simulated")
        cuda = kvf.Caps({"base": "vllm", "name": "vllm-cuda", "xfer_mem_kinds": 7})
        self.assertEqual(cuda.to_dict()["xfer_mem_kinds"], 7)
        self.assertEqual(kvf.classify("pd_handoff_direct", kvf.Caps("vllm"), kvf.Caps("vllm")
                                      ).reason, "memory_kind")
        self.assertEqual(kvf.classify("pd_handoff_direct", cuda, cuda).label, "real")
        g = kvf.optimality_gap(kvf.Caps("vllm"), store, {"prompt_tokens": 8192,
                                                          "cached_tokens": 7936})
        self.assertGreaterEqual(g["gap"], 0)
        self.assertAlmostEqual(g["gap"], g["score_all"] - g["score_feasible"], places=9)
        with self.assertRaises(kvf.KvfError) as e:
            kvf.Caps({"base": "vllm", "bogus": 1})
        self.assertEqual(e.exception.name, "KVF_EINVAL")
        with self.assertRaises(kvf.KvfError):
            kvf.Caps("no-such-engine")
        with self.assertRaises(ValueError):
            kvf.classify("teleport", ref, store)
        with self.assertRaises(ValueError):
            kvf.optimality_gap(ref, store, {"bogus": 1})


class TestKeysAndLayouts(unittest.TestCase):
    def test_golden_vectors(self):
        l = kvf.Layout.preset("ref-tiny")
        self.assertEqual(f"{l.fingerprint:016x}", "2983fb67497fe707")
        ks = kvf.KeySpace(l)
        self.assertEqual(f"{ks.seed:016x}", "0b160b44a187fbc4")
        t = list(range(1000, 1192))
        self.assertEqual(ks.keys(t), ["1793a9698aa36cbbe99cdb687fca03df",
                                      "c3ef6168d92a61b14b0f262c80901433",
                                      "4b01f11cb5efa1a023527988551d4911"])
        a = kvf.KeySpace(l, "tenant-a")
        self.assertEqual(f"{a.seed:016x}", "76c22dd6b52a51e6")
        self.assertEqual(a.keys(t), ["1980a43bdbef9bc323285dd5ffcc9660",
                                     "655a5734515c180be3665e8393f97f72",
                                     "1a19e7ca6b828771fa353aacb2969d02"])
        self.assertEqual(ks.keys(t[:63]), [])

    def test_layouts_and_errors(self):
        l = kvf.Layout("llama-3.1-8b", 32, 8, 128, "bf16", page_tokens=16, chunk_tokens=256)
        self.assertEqual(l.bytes_per_token, 131072)
        self.assertEqual(l.page_bytes, 16 * 8 * 128 * 2)
        self.assertIn("ref-tiny", kvf.Layout.presets())
        with self.assertRaises(kvf.KvfError) as e:
            kvf.Layout("x", 4, 2, 32, "bf17")
        self.assertEqual(e.exception.name, "KVF_EINVAL")
        with self.assertRaises(kvf.KvfError) as e:
            kvf.Layout("x", 4, 2, 32, "f16", page_tokens=16, chunk_tokens=40)
        self.assertIn("multiple of page_tokens", str(e.exception))
        with self.assertRaises(kvf.KvfError):
            kvf.Layout.preset("no-such-model")
        self.assertEqual(kvf.error_name(-7), "KVF_ECHECKSUM")


class TestShardedEvents(unittest.TestCase):
    def test_shards(self):
        # the shard of a sequence: its first block's, spread over the shards, 0 unsharded
        hs = [kvf.hash_blocks(list(range(100 * j, 100 * j + 16)), 16)[0] for j in range(400)]
        self.assertEqual({kvf.shard_of(h, 1) for h in hs}, {0})
        counts = [0] * 4
        for h in hs:
            counts[kvf.shard_of(h, 4)] += 1
        self.assertTrue(all(c > 60 for c in counts), counts)
        ev = kvf.Events("127.0.0.1:0", replay="127.0.0.1:0", shards=4)
        self.addCleanup(ev.close)
        toks = list(range(32))
        h = kvf.hash_blocks(toks, 16)
        ev.publish(stored=h, tokens=toks, block_tokens=16)
        ev.publish(removed=h[1:])  # the same shard's: one more batch
        self.assertEqual(ev.sequence, 2)
        ev.publish(stored=[77], parent=12345, tokens=list(range(16)), block_tokens=16)
        self.assertEqual(ev.unknown_parents, 1)  # a parent it never stored
        # a block stored twice (its GPU copy and its host copy) is remembered until its last
        # removal: a continuation after the first removal still finds its sequence's shard
        ev.publish(stored=h[:1], tokens=toks[:16], block_tokens=16, medium="CPU")
        ev.publish(removed=h[:1])
        ev.publish(stored=[88], parent=h[0], tokens=list(range(16)), block_tokens=16)
        self.assertEqual(ev.unknown_parents, 1)
        ev.publish(removed=h[:1])
        ev.publish(stored=[99], parent=h[0], tokens=list(range(16)), block_tokens=16)
        self.assertEqual(ev.unknown_parents, 2)  # gone with its last copy
        seq = ev.sequence
        ev.clear(forget=False)  # AllBlocksCleared in each of the 4 shards, shards kept
        self.assertEqual(ev.sequence, seq + 4)
        ev.publish(stored=[111], parent=88, tokens=list(range(16)), block_tokens=16)
        self.assertEqual(ev.unknown_parents, 2)
        ev.clear()  # and forgotten
        ev.publish(stored=[112], parent=88, tokens=list(range(16)), block_tokens=16)
        self.assertEqual(ev.unknown_parents, 3)
        # a block stored again (its host copy) after its parent was removed goes where the block
        # is known to be, not where the forgotten parent's hash says: its removals go there too
        a, b = kvf.hash_blocks(list(range(500, 532)), 16)
        ev.publish(stored=[a, b], tokens=list(range(500, 532)), block_tokens=16)
        ev.publish(removed=[a])
        ev.publish(stored=[b], parent=a, tokens=list(range(516, 532)), block_tokens=16,
                   medium="CPU")
        self.assertEqual(ev.unknown_parents, 3)
        with self.assertRaises(kvf.KvfError) as e:
            kvf.Events("127.0.0.1:0", shards=257)
        self.assertIn("at most 256", str(e.exception))


class TestModels(unittest.TestCase):
    def test_published_shapes(self):
        from kvfabric import models
        l8 = models.layout_for(models.config("llama-3.1-8b"), "llama-3.1-8b")
        self.assertEqual(l8.bytes_per_token, 131072)  # 32 layers x 2 x 8 x 128 x 2 bytes
        q7 = models.layout_for(models.config("qwen2.5-7b"), "qwen2.5-7b")
        self.assertEqual((q7.layers, q7.kv_heads, q7.head_dim), (28, 4, 128))
        self.assertEqual(q7.bytes_per_token, 28 * 2 * 4 * 128 * 2)
        l70 = models.layout_for(models.config("llama-3.1-70b"), "llama-3.1-70b", tp_size=4,
                                tp_rank=1)
        self.assertEqual(l70.bytes_per_token, 80 * 2 * 2 * 128 * 2)  # 8 KV heads over 4 ranks

    def test_config_files_and_objects(self):
        import json
        import tempfile
        from kvfabric import models
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64,
                           "torch_dtype": "float16"}, f)
            l = models.layout_for(models.config(d), "tiny", page_tokens=8, chunk_tokens=32)
            self.assertEqual((l.layers, l.kv_heads, l.head_dim, l.dtype), (2, 4, 16, "f16"))

        class Cfg:  # an object with attributes, as a transformers config is
            num_hidden_layers, num_attention_heads, num_key_value_heads = 3, 8, 2
            hidden_size, dtype = 256, "torch.bfloat16"
        self.assertEqual(models.layout_for(Cfg(), "obj").bytes_per_token, 3 * 2 * 2 * 32 * 2)
        with self.assertRaises(ValueError):
            models.config("no-such-model")
        with self.assertRaises(ValueError):
            models.layout_for({"num_hidden_layers": 1, "num_attention_heads": 1,
                               "hidden_size": 8, "torch_dtype": "int4"})


class TestConnector(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.store = Store()
        cls.layout = kvf.Layout.preset("ref-tiny")

    @classmethod
    def tearDownClass(cls):
        cls.store.stop()

    def connector(self, **kw):
        return kvf.Connector(self.layout, nodes=[self.store.addr], deadline_ms=5000, **kw)

    def test_save_then_load_layer_by_layer(self):
        l = self.layout
        src, dst = HostKV(l, 24, pad=48, seed=1), HostKV(l, 24, pad=48, seed=2)
        t = tokens(3 * l.chunk_tokens, 7)
        npg = len(t) // l.page_tokens
        src_ids = random.Random(3).sample(range(24), npg)
        dst_ids = random.Random(4).sample(range(24), npg)
        with self.connector(salt="py-save-load") as cn:
            cn.register(src.pages)
            self.assertEqual(cn.lookup(t), 0)
            with cn.save(t, src_ids) as sv:
                for layer in reversed(range(l.layers)):
                    sv.layer_done(layer)
                sv.wait_pages()
                sv.wait()
            self.assertEqual(cn.lookup(t), len(t))
            cn.register(dst.pages)
            with cn.load(t, dst_ids) as ld:
                for layer in range(l.layers):
                    ld.wait_layer(layer)
                ld.wait()
                self.assertEqual(ld.loaded_tokens, len(t))
            st = cn.stats()
            self.assertEqual(st["chunks_saved"], 3)
            self.assertEqual(st["chunks_loaded"], 3)
            self.assertIn(cn.transport()[0], ("shm", "tcp"))
        self.assertEqual(src.differing(dst, zip(src_ids, dst_ids)), [])

    def test_save_in_parts_over_tcp(self):
        """Over TCP a save is put in parts as its layers are reported (stats' saves_in_parts);
        with save_whole it is put once they all are; over shared memory it is put whole or in parts
        (over the store's Unix socket) as save_parts_shm says, by default in parts where the
        storage client runs two I/O threads or more (8 cores or more); every page comes back as
        saved."""
        l = self.layout
        a, b = Store(extra=("--shm", "off")), Store()
        try:
            many = len(os.sched_getaffinity(0)) >= 8
            cases = [(a, False, None, 1), (a, True, None, 0), (b, False, False, 0),
                     (b, False, True, 1), (b, False, None, int(many))]
            for k, (st_, whole, parts_shm, in_parts) in enumerate(cases):
                src, dst = HostKV(l, 64, seed=31), HostKV(l, 64, seed=32)
                t = tokens(4 * l.chunk_tokens, 33 + k)
                ids = list(range(len(t) // l.page_tokens))
                with kvf.Connector(l, nodes=[st_.addr], deadline_ms=5000, salt=f"py-parts-{k}",
                                   save_whole=whole, save_parts_shm=parts_shm) as cn:
                    self.assertEqual(cn.transport()[0], "tcp" if st_ is a else "shm")
                    time.sleep(0.1)  # the node's HELLO in: a client puts in parts once it is
                    cn.register(src.pages)
                    with cn.save(t, ids) as sv:
                        for layer in range(l.layers):
                            sv.layer_done(layer)
                            # a pass: the next layers come after the first is gathered (a save
                            # whose layers all come before that is put whole)
                            time.sleep(0.1 if layer == 0 else 0.002)
                        sv.wait()
                    cn.register(dst.pages)
                    with cn.load(t, ids) as ld:
                        ld.wait()
                        self.assertEqual(ld.loaded_tokens, len(t))
                    st = cn.stats()
                    self.assertEqual(st["saves_in_parts"], in_parts, (k, st))
                    self.assertEqual(st["chunks_saved"], 4, st)
                self.assertEqual(src.differing(dst, zip(ids, ids)), [])
        finally:
            a.stop()
            b.stop()

    def test_load_takes_the_plans_sources(self):
        """Connector.load(sources=...): over TCP each chunk asked first of the store the plan
        names; those it lacks (here, all whose own node is the other store) come from their own
        node in the same load, every page as saved (kvf_connector_load_planned)."""
        l = self.layout
        a, b = Store(extra=("--shm", "off")), Store(extra=("--shm", "off"))
        try:
            src, dst = HostKV(l, 64, seed=21), HostKV(l, 64, seed=22)
            # a prompt whose 8 chunks have each store as their own node for some of them (the
            # stores' ports, and so the placement, differ from run to run)
            ks = kvf.KeySpace(l, salt="py-planned")
            with kvf.Client([a.addr, b.addr], ks.seed, transport="tcp") as c:
                for seed in range(23, 23 + 64):
                    t = tokens(8 * l.chunk_tokens, seed)
                    own = [c.node_of(k) for k in ks.keys(t)]
                    if 0 < own.count(0) < len(own):
                        break
            self.assertTrue(0 < own.count(0) < len(own), own)
            ids = list(range(len(t) // l.page_tokens))
            with kvf.Connector(l, nodes=[a.addr, b.addr], deadline_ms=5000,
                               salt="py-planned") as cn:
                cn.register(src.pages)
                with cn.save(t, ids) as sv:
                    for layer in range(l.layers):
                        sv.layer_done(layer)
                    sv.wait()
                cn.register(dst.pages)
                self.assertEqual(cn.lookup(t, sources=[(b.addr, 0, len(t))]), len(t))
                with cn.load(t, ids, sources=[(b.addr, 0, len(t))]) as ld:
                    ld.wait()
                    self.assertEqual(ld.loaded_tokens, len(t))
                st = cn.stats()
                self.assertEqual(cn.transport()[0], "tcp")
                # the chunks whose own node is a were asked of b first, then of a
                self.assertEqual(st["load_named"], own.count(0), st)
                self.assertEqual(st["load_named_reasked"], st["load_named"], st)
            self.assertEqual(src.differing(dst, zip(ids, ids)), [])
        finally:
            a.stop()
            b.stop()

    def test_per_layer_timing_into_a_registry(self):
        """The connector's per-layer histograms (docs/operations.md, Metrics): one observation
        a layer for a save and a load, one a transfer; not while a transfer is in flight."""
        from kvfabric.metrics import Registry
        l = self.layout
        src, dst = HostKV(l, 24, seed=11), HostKV(l, 24, seed=12)
        t = tokens(2 * l.chunk_tokens, 13)
        ids = list(range(len(t) // l.page_tokens))
        reg = Registry("kvf_t")
        with self.connector(salt="py-metrics") as cn:
            cn.set_metrics(reg)
            cn.register(src.pages)
            with cn.save(t, ids) as sv:
                with self.assertRaises(kvf.KvfError):  # a transfer in flight
                    cn.set_metrics(None)
                for layer in range(l.layers):
                    sv.layer_done(layer)
                sv.wait()
            cn.register(dst.pages)
            with cn.load(t, ids) as ld:
                for layer in range(l.layers):
                    ld.wait_layer(layer)
                ld.wait()
            text = reg.expose()
            cn.set_metrics(None)
        for op in ("save", "load"):
            self.assertIn('kvf_t_connector_layer_seconds_count{op="%s"} %d' % (op, l.layers),
                          text)
            self.assertIn('kvf_t_connector_transfer_seconds_count{op="%s"} 1' % op, text)
        self.assertIn('kvf_t_connector_wait_seconds_count{op="load"} %d' % (l.layers + 1), text)

    def test_a_save_larger_than_a_request_the_node_takes(self):
        # Over TCP to a node taking at most 256 KiB per request: 12 chunks of 128 KiB are cut
        # into requests it takes (they once went as 4 requests of 384 KiB: a reset connection).
        small = Store(extra=("--shm", "off", "--max-request", "256K"))
        try:
            l = self.layout
            src, dst = HostKV(l, 48, seed=21), HostKV(l, 48, seed=22)
            t = tokens(12 * l.chunk_tokens, 23)
            npg = len(t) // l.page_tokens
            ids = list(range(npg))
            with kvf.Connector(l, nodes=[small.addr], deadline_ms=5000) as cn:
                self.assertEqual(cn.transport()[0], "tcp")
                cn.register(src.pages)
                with cn.save(t, ids) as sv:
                    for layer in range(l.layers):
                        sv.layer_done(layer)
                    sv.wait()
                cn.register(dst.pages)
                with cn.load(t, ids) as ld:
                    ld.wait()
            for layer in range(l.layers):
                for p in ids:
                    self.assertEqual(src.page(layer, 0, p), dst.page(layer, 0, p))
                    self.assertEqual(src.page(layer, 1, p), dst.page(layer, 1, p))
        finally:
            small.stop()

    def test_a_save_of_chunks_already_cached_sends_only_the_rest(self):
        l = self.layout
        kv = HostKV(l, 16)
        t = tokens(2 * l.chunk_tokens, 8)
        ids = list(range(len(t) // l.page_tokens))
        with self.connector(salt="py-first-chunk") as cn:
            cn.register(kv.pages)
            with cn.save(t[:l.chunk_tokens], ids[:l.chunk_tokens // l.page_tokens]) as sv:
                for layer in range(l.layers):
                    sv.layer_done(layer)
                sv.wait()
            with cn.save(t, ids, first_chunk=1) as sv:
                for layer in range(l.layers):
                    sv.layer_done(layer)
                sv.wait()
            self.assertEqual(cn.lookup(t), len(t))
            self.assertEqual(cn.stats()["chunks_saved"], 2)

    def test_bad_arguments_raise(self):
        l = self.layout
        kv = HostKV(l, 8)
        with self.connector() as cn:
            with self.assertRaises(kvf.KvfError) as e:
                cn.register(kv.pages[:-1])
            self.assertEqual(e.exception.name, "KVF_EINVAL")
            self.assertIn("layers given", str(e.exception))
            short = [kvf.KVPages(p.k_ptr, p.v_ptr, l.page_bytes - 1, 8, "host") for p in kv.pages]
            with self.assertRaises(kvf.KvfError) as e:
                cn.register(short)
            self.assertIn("stride", str(e.exception))
            with self.assertRaises(ValueError):
                cn.register([kvf.KVPages(1, 1, 4096, 1, "gpu")] * l.layers)
            cn.register(kv.pages)
            t = tokens(l.chunk_tokens, 9)
            with self.assertRaises(kvf.KvfError) as e:
                cn.load(t[:10], [0])
            self.assertEqual(e.exception.name, "KVF_EINVAL")
            with self.assertRaises(kvf.KvfError) as e:
                cn.load(t, [0, 1, 2, 99])
            self.assertEqual(e.exception.name, "KVF_ERANGE")
            with self.assertRaises(ValueError):
                cn.lookup([-1] * 64)
            with cn.load(t, [0, 1, 2, 3]) as ld:
                with self.assertRaises(kvf.KvfError):
                    ld.layer_done(0)  # a load has no layer_done

    def test_cuda_memory_without_a_runtime_is_infeasible(self):
        if kvf.cuda_probe()["usable"]:
            self.skipTest("a CUDA runtime is usable here: test_torch covers CUDA")
        kv = HostKV(self.layout, 8)
        pages = [kvf.KVPages(p.k_ptr, p.v_ptr, p.page_stride, 8, "cuda") for p in kv.pages]
        with self.connector() as cn:
            with self.assertRaises(kvf.KvfError) as e:
                cn.register(pages)
            self.assertEqual(e.exception.name, "KVF_EINFEASIBLE")
            self.assertIn("memory_kind", str(e.exception))

    def test_a_dead_store_is_a_miss(self):
        dead = Store()
        addr = dead.addr
        dead.stop()
        l = self.layout
        kv = HostKV(l, 8)
        with kvf.Connector(l, nodes=[addr], deadline_ms=1000) as cn:
            cn.register(kv.pages)
            t = tokens(l.chunk_tokens, 10)
            self.assertEqual(cn.lookup(t), 0)
            with cn.load(t, [0, 1, 2, 3]) as ld:
                with self.assertRaises(kvf.Miss) as e:
                    ld.wait_layer(0)
                self.assertIn(e.exception.name, ("KVF_ECONNREFUSED", "KVF_ECONNRESET",
                                                 "KVF_ETIMEDOUT", "KVF_EHOSTUNREACH"))
                with self.assertRaises(kvf.Miss):
                    ld.wait()
                self.assertEqual(ld.loaded_tokens, 0)

    def test_a_transfer_keeps_its_connector_and_memory(self):
        l = self.layout
        kv = HostKV(l, 8, seed=5)
        t = tokens(l.chunk_tokens, 11)
        cn = self.connector(salt="py-own")
        cn.register(kv.pages)
        sv = cn.save(t, [0, 1, 2, 3])
        pages = kv.pages
        del cn, kv  # the transfer holds both
        for layer in range(l.layers):
            sv.layer_done(layer)
        sv.wait()
        sv.close()
        with self.assertRaises(kvf.KvfError):
            sv.wait()
        self.assertIsNotNone(pages[0].owner)


class FakeSched:
    """kvf-sched's GET /v1/stores on loopback, answering the list the test sets in .stores."""

    def __init__(self, stores):
        self.stores = list(stores)
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"stores": list(outer.stores)}).encode()
                self.send_response(200 if self.path == "/v1/stores" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = "127.0.0.1:%d" % self.httpd.server_address[1]
        self.th = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.th.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class TestStoresThatJoin(unittest.TestCase):
    """A connector given only kvf-sched asks it for the stores again (stores_refresh_ms): a store
    that joins takes the keys that rendezvous hashing now ranks on it, one that leaves is
    dropped, a transfer started before the change finishes on the stores it started on, and the
    old client closes once that transfer is freed. Every page loaded is checked byte for byte."""

    def wait_for(self, cn, key, value, seconds=10):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if cn.stats()[key] == value:
                return
            time.sleep(0.05)
        self.fail(f"{key} never became {value}: {cn.stats()}")

    def save(self, cn, t, ids):
        with cn.save(t, ids) as sv:
            for layer in range(cn.layout.layers):
                sv.layer_done(layer)
            sv.wait()

    def check_load(self, cn, t, src, src_ids, dst, dst_ids):
        """Loads t into dst's pages; returns the tokens loaded, after checking their bytes."""
        with cn.load(t, dst_ids) as ld:
            try:
                ld.wait()
            except kvf.Miss:
                pass
            got = ld.loaded_tokens
        l = cn.layout
        for p in range(got // l.page_tokens):
            for layer in range(l.layers):
                for plane in range(2):
                    self.assertEqual(src.page(layer, plane, src_ids[p]),
                                     dst.page(layer, plane, dst_ids[p]))
        return got

    def test_a_store_joins_and_one_leaves(self):
        l = kvf.Layout.preset("ref-tiny")
        salt = "py-stores-join"
        ks = kvf.KeySpace(l, salt)
        a, b = Store(), Store()
        sched = FakeSched([a.addr])
        C = l.chunk_tokens
        per = C // l.page_tokens
        src, dst = HostKV(l, 96, seed=21), HostKV(l, 96, seed=22)
        try:
            with kvf.Connector(l, sched=sched.addr, salt=salt, deadline_ms=3000,
                               stores_refresh_ms=100) as cn, \
                    kvf.Client([a.addr], ks.seed) as ca, kvf.Client([b.addr], ks.seed) as cb:
                cn.register(src.pages)
                t1, t2, t3 = tokens(8 * C, 31), tokens(8 * C, 32), tokens(8 * C, 33)
                ids1, ids2, ids3 = (list(range(k * 8 * per, (k + 1) * 8 * per)) for k in range(3))
                self.save(cn, t1, ids1)
                self.assertEqual(cn.stats()["stores"], 1)
                self.assertTrue(all(ca.exists(ks.keys(t1))))

                # b joins: the next client is on both
                sched.stores = [a.addr, b.addr]
                self.wait_for(cn, "stores", 2)
                self.assertEqual(cn.stats()["store_clients_opened"], 1)
                self.save(cn, t2, ids2)
                k2 = ks.keys(t2)
                on_a, on_b = ca.exists(k2), cb.exists(k2)
                self.assertTrue(any(on_b), "no chunk went to the store that joined")
                self.assertTrue(all(x != y for x, y in zip(on_a, on_b)), (on_a, on_b))
                self.assertFalse(any(cb.exists(ks.keys(t1))))
                # each key is looked for where it is now placed: t2 whole, t1 up to its first
                # chunk that b now ranks first (a miss, never other bytes)
                cn.register(dst.pages)
                self.assertEqual(self.check_load(cn, t2, src, ids2, dst, ids2), len(t2))
                with kvf.Client([a.addr, b.addr], ks.seed) as both:
                    firsts = [both.node_of(k) for k in ks.keys(t1)]
                lead = next((i for i, n in enumerate(firsts) if n == 1), len(firsts))
                self.assertEqual(self.check_load(cn, t1, src, ids1, dst, ids1), lead * C)

                # a save in flight while a leaves finishes on the client it started on
                cn.register(src.pages)
                sv = cn.save(t3, ids3)
                sched.stores = [b.addr]
                self.wait_for(cn, "stores", 1)
                self.assertEqual(cn.stats()["store_clients_closed"], 1)  # the first one only
                for layer in range(l.layers):
                    sv.layer_done(layer)
                sv.wait()
                sv.close()
                self.wait_for(cn, "store_clients_closed", 2)
                k3 = ks.keys(t3)
                self.assertTrue(all(x or y for x, y in zip(ca.exists(k3), cb.exists(k3))))
                # from now on everything goes to b
                a.stop()
                t4 = tokens(4 * C, 34)
                self.save(cn, t4, ids1[:4 * per])
                self.assertTrue(all(cb.exists(ks.keys(t4))))
                self.assertEqual(cn.stats()["store_refresh_failures"], 0)
                # kvf-sched gone: the stores in use stay
                sched.stop()
                sched = None
                time.sleep(0.5)
                self.assertEqual(cn.stats()["stores"], 1)
                self.assertGreater(cn.stats()["store_refresh_failures"], 0)
                self.assertEqual(cn.lookup(t4), len(t4))
        finally:
            if sched:
                sched.stop()
            a.stop()
            b.stop()


class TestTorch(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("torch is not installed")
        cls.store = Store(memory="256M")

    @classmethod
    def tearDownClass(cls):
        cls.store.stop()

    def round_trip(self, device):
        import torch
        l = kvf.Layout("torch-kv", 4, 8, 128, "bf16", page_tokens=16, chunk_tokens=64)
        gen = torch.Generator().manual_seed(0)

        def caches():
            return [torch.randn(2, 32, 16, 8, 128, generator=gen, dtype=torch.float32)
                    .to(torch.bfloat16).to(device) for _ in range(l.layers)]

        src, dst = caches(), caches()
        t = tokens(4 * l.chunk_tokens, 12)
        npg = len(t) // l.page_tokens
        src_ids = random.Random(5).sample(range(32), npg)
        dst_ids = random.Random(6).sample(range(32), npg)
        stream = torch.cuda.current_stream() if device == "cuda" else None
        with kvf.Connector(l, nodes=[self.store.addr], salt=f"torch-{device}",
                           deadline_ms=10000) as cn:
            cn.register(kvf.pages_from_tensors(l, src))
            with cn.save(t, src_ids) as sv:
                for layer in range(l.layers):
                    sv.layer_done(layer, stream)
                sv.wait()
            cn.register(kvf.pages_from_tensors(l, dst))
            with cn.load(t, dst_ids) as ld:
                for layer in range(l.layers):
                    ld.wait_layer(layer)
                ld.wait()
            if device == "cuda":
                self.assertGreater(cn.stats()["cuda_bytes"], 0)
        for layer in range(l.layers):
            a = src[layer][:, src_ids].cpu()
            b = dst[layer][:, dst_ids].cpu()
            self.assertTrue(torch.equal(a, b), f"layer {layer} differs")

    def test_cpu_tensors(self):
        self.round_trip("cpu")

    def test_cuda_tensors(self):
        import torch
        if not torch.cuda.is_available() or not kvf.cuda_probe()["usable"]:
            self.skipTest("no CUDA device")
        self.round_trip("cuda")

    def test_tensor_shapes_are_checked(self):
        import torch
        l = kvf.Layout("torch-kv", 2, 8, 128, "bf16", page_tokens=16, chunk_tokens=64)
        bad = [torch.zeros(2, 4, 16, 8, 64, dtype=torch.bfloat16) for _ in range(2)]
        with self.assertRaises(ValueError):
            kvf.pages_from_tensors(l, bad)
        noncontig = [torch.zeros(2, 4, 8, 16, 128, dtype=torch.bfloat16).transpose(2, 3)
                     for _ in range(2)]
        with self.assertRaises(ValueError):
            kvf.pages_from_tensors(l, noncontig)


class TestMetrics(unittest.TestCase):
    """libkvf's metrics registry through the binding (kvfabric.metrics), as kvfabric.serve uses
    it: typed families, labels, histograms, the exposition; misuse is an error, not a crash."""

    def test_families_and_exposition(self):
        from kvfabric.metrics import Registry

        r = Registry("kvf_t")
        r.counter_add("requests_total", "Requests.", {"kind": "prefill", "result": "ok"})
        r.counter_add("requests_total", "Requests.", {"kind": "prefill", "result": "ok"}, 2)
        r.counter_set("bytes_total", "Bytes.", 4096)
        r.gauge_set("queue", "Queue.", 3.5)
        for s in (0.002, 0.02, 20.0):
            r.observe_seconds("phase_seconds", "Phases.", s, {"phase": "prefill"})
        t = r.expose()
        for want in ('kvf_build_info{component="kvf_t",version="',
                     '# TYPE kvf_t_requests_total counter',
                     'kvf_t_requests_total{kind="prefill",result="ok"} 3',
                     'kvf_t_bytes_total 4096', '# TYPE kvf_t_queue gauge', 'kvf_t_queue 3.5',
                     'kvf_t_phase_seconds_bucket{phase="prefill",le="0.0025"} 1',
                     'kvf_t_phase_seconds_bucket{phase="prefill",le="+Inf"} 3',
                     'kvf_t_phase_seconds_count{phase="prefill"} 3', 'process_open_fds'):
            self.assertIn(want, t)
        with self.assertRaises(kvf.KvfError):  # the same name as another type
            r.gauge_set("requests_total", "Requests.", 1, {"kind": "x", "result": "y"})
        with self.assertRaises(kvf.KvfError):  # other label names
            r.counter_add("requests_total", "Requests.", {"other": "x"})
        with self.assertRaises(kvf.KvfError):
            r.counter_add("bad-name", "X.")
        with self.assertRaises(kvf.KvfError):  # counters only go up
            r.counter_add("requests_total", "Requests.", {"kind": "a", "result": "b"}, -1)
        with self.assertRaises(ValueError):
            Registry("9bad")
        r.close()
        r.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
