"""The storage client (kvf/client.h) and chunk objects (kvf/object.h): put, get, exists, lookup,
evict, pin, clear and stats on kvf-store nodes, for tools and operators (engines use the
Connector, which builds and moves objects itself). Keys are 32 hex digits (KeySpace.keys) or
kvfabric._lib.Key; objects are bytes in kvfabric's object format (Object.encode)."""

from __future__ import annotations

import ctypes
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _lib
from .connector import _Handle
from .errors import KvfError, check, error_name
from .layout import Layout

_libc = ctypes.CDLL(None)
_libc.free.argtypes = [ctypes.c_void_p]
_libc.free.restype = None
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
_libc.calloc.restype = ctypes.c_void_p

KeyLike = Union[str, "_lib.Key"]


def _keys(keys: Sequence[KeyLike]) -> "ctypes.Array":
    arr = (_lib.Key * max(len(keys), 1))()
    for i, k in enumerate(keys):
        if isinstance(k, _lib.Key):
            arr[i] = k
        elif _lib.lib().kvf_key_from_hex(str(k).encode(), ctypes.byref(arr[i])) != 0:
            raise ValueError(f"key {k!r} is not 32 hex digits")
    return arr


def _codec(name: str) -> int:
    c = ctypes.c_int()
    if _lib.lib().kvf_codec_parse(name.encode(), ctypes.byref(c)) != 0:
        raise ValueError(f"unknown codec {name!r} (none, lz4, shuffle-lz4)")
    return c.value


class Object:
    """Chunk objects: a header (layout fingerprint, key, per layer sizes and XXH3-64 checksums)
    and one stored segment per layer (docs/protocol.md, "Objects")."""

    @staticmethod
    def encode(key: KeyLike, layout: Layout, tokens: int, segments: Sequence[bytes],
               codec: str = "none") -> bytes:
        """An object of `segments` (one bytes-like per layer, all the same size)."""
        if not segments or len({len(s) for s in segments}) != 1:
            raise ValueError("one segment per layer, all of the same size")
        seg = len(segments[0])
        bufs = [ctypes.create_string_buffer(bytes(s), seg) for s in segments]
        ptrs = (ctypes.c_void_p * len(bufs))(*[ctypes.addressof(b) for b in bufs])
        cap = ((72 + 24 * len(segments) + 63) & ~63) + len(segments) * seg
        dst = ctypes.create_string_buffer(cap)
        scratch = ctypes.create_string_buffer(max(seg, 1))
        out = ctypes.c_size_t()
        check(_lib.lib().kvf_obj_encode(ctypes.byref(_keys([key])[0]), layout.fingerprint,
                                        tokens, len(segments), ptrs, seg, _codec(codec), dst,
                                        cap, ctypes.byref(out), scratch), "object encode")
        return dst.raw[: out.value]

    @staticmethod
    def decode(obj: bytes, max_raw_bytes: int = 1 << 30) -> Tuple[Dict[str, Any], List[bytes]]:
        """Verifies an object (header and every segment's checksums) and returns its header's
        fields and the decoded segments. KvfError KVF_EPROTO or KVF_ECHECKSUM where it is not
        intact; ValueError where it would decode to more than max_raw_bytes."""
        buf = ctypes.create_string_buffer(bytes(obj), len(obj))
        info = _lib.ObjInfo()
        L = _lib.lib()
        check(L.kvf_obj_verify(buf, len(obj), ctypes.byref(info)), "object verify")
        if info.raw_bytes > max_raw_bytes:
            raise ValueError(f"the object decodes to {info.raw_bytes} bytes, more than "
                             f"max_raw_bytes={max_raw_bytes}")
        seg_at = [L.kvf_obj_seg_at(ctypes.byref(info), layer) for layer in range(info.layers)]
        # the codec's scratch holds the largest segment: layers need not be the same size
        scratch = ctypes.create_string_buffer(max([s.raw_len for s in seg_at] + [1]))
        segs, off = [], info.header_len
        for layer in range(info.layers):
            s = seg_at[layer]
            dst = ctypes.create_string_buffer(max(s.raw_len, 1))
            check(L.kvf_obj_decode_seg(info.codec, ctypes.byref(s),
                                       ctypes.addressof(buf) + off, dst, scratch),
                  "object decode", f"layer {layer}")
            segs.append(dst.raw[: s.raw_len])
            off += s.stored_len
        hexkey = ctypes.create_string_buffer(33)
        L.kvf_key_to_hex(ctypes.byref(info.key), hexkey)
        return ({"key": hexkey.value.decode(), "layers": info.layers, "tokens": info.tokens,
                 "layout_fingerprint": info.layout_fp, "codec": info.codec,
                 "raw_bytes": info.raw_bytes, "stored_bytes": info.stored_bytes}, segs)


class Client(_Handle):
    """A client of kvf-store nodes ("host:port" each; a key lives on one node by rendezvous
    hashing). `namespace`: the key space seed (KeySpace.seed); `transport`: "auto", "tcp",
    "shm", "shm+tcp" or "rdma"; `credential`: a credential file (None: $KVF_CREDENTIAL);
    `reroute`: while a node is down, its keys go to the next node in their rendezvous order
    (kvf_client_set_reroute: where a replica of a hot chunk is)."""

    _kind, _free_fn = "client", "kvf_client_close"

    def __init__(self, nodes: Sequence[str], namespace: int, transport: Optional[str] = None,
                 credential: Optional[str] = None, deadline_ms: int = 0, io_threads: int = 0,
                 conns_per_node: int = 0, reroute: bool = False) -> None:
        self._h = None
        if not nodes:
            raise ValueError("at least one node")
        if not namespace:
            raise ValueError("namespace (KeySpace.seed) must be nonzero")
        self.deadline_ms = deadline_ms
        nl = [n.encode() for n in nodes]
        self._nodes = (ctypes.c_char_p * len(nl))(*nl)
        o = _lib.ClientOpts()
        o.nodes = ctypes.cast(self._nodes, ctypes.POINTER(ctypes.c_char_p))
        o.n_nodes = len(nl)
        o.ns = namespace
        o.transport = transport.encode() if transport else None
        o.credential = credential.encode() if credential is not None else None
        o.deadline_ms, o.io_threads, o.conns_per_node = deadline_ms, io_threads, conns_per_node
        h = ctypes.c_void_p()
        err = ctypes.create_string_buffer(400)
        check(_lib.lib().kvf_client_open(ctypes.byref(h), ctypes.byref(o), err, len(err)),
              "client", err.value.decode())
        self._h = h
        if reroute:
            _lib.lib().kvf_client_set_reroute(h, 1)

    @property
    def nodes(self) -> int:
        return int(_lib.lib().kvf_client_node_count(self._handle()))

    def transport(self) -> Tuple[str, str]:
        """The data path chosen ("shm", "rdma" or "tcp") and why."""
        why = ctypes.create_string_buffer(300)
        name = _lib.lib().kvf_client_transport(self._handle(), why, len(why))
        return name.decode(), why.value.decode()

    def put(self, keys: Sequence[KeyLike], objects: Sequence[bytes]) -> List[str]:
        """Puts objects under keys; each key's status name ("KVF_OK", "KVF_EEXIST",
        "KVF_ENOSPC", "KVF_ECHECKSUM" ...). KvfError where the operation failed as a whole."""
        if len(keys) != len(objects):
            raise ValueError("one object per key")
        n = len(keys)
        k = _keys(keys)
        # the objects' own bytes, not copies (kept alive by `held` until the put returns)
        held = [o if isinstance(o, bytes) else bytes(o) for o in objects]
        objs = (ctypes.c_void_p * max(n, 1))(
            *[ctypes.cast(ctypes.c_char_p(o), ctypes.c_void_p).value for o in held])
        lens = (ctypes.c_uint64 * max(n, 1))(*[len(o) for o in objects])
        st = (ctypes.c_int * max(n, 1))()
        b = _lib.Batch(n=n, keys=ctypes.addressof(k), objs=ctypes.addressof(objs),
                       lens=ctypes.addressof(lens), status=ctypes.addressof(st),
                       deadline_ms=self.deadline_ms)
        check(_lib.lib().kvf_client_put(self._handle(), ctypes.byref(b)), "put")
        return [error_name(st[i]) for i in range(n)]

    def get(self, keys: Sequence[KeyLike], max_bytes: int) -> List[Tuple[str, Optional[bytes]]]:
        """Gets objects (each at most max_bytes), verified: (status name, object or None) per
        key; "KVF_ENOENT" is a miss."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        n = len(keys)
        k = _keys(keys)
        # calloc: a large max_bytes is address space until the reply lands (its pages come
        # zeroed on first touch), and only the bytes received are copied out. A buffer made and
        # returned whole in Python (create_string_buffer, .raw) zeroed and copied all of it: a
        # 4 KiB object asked with a 4 MiB cap took 23 ms where its get took 0.07 ms.
        bufs = [_libc.calloc(1, max_bytes) for _ in range(n)]
        try:
            if not all(bufs):
                raise MemoryError(f"get: {n} buffer(s) of {max_bytes} bytes")
            bp = (ctypes.c_void_p * max(n, 1))(*bufs)
            caps = (ctypes.c_uint64 * max(n, 1))(*([max_bytes] * n))
            lens = (ctypes.c_uint64 * max(n, 1))()
            st = (ctypes.c_int * max(n, 1))()
            b = _lib.Batch(n=n, keys=ctypes.addressof(k), bufs=ctypes.addressof(bp),
                           caps=ctypes.addressof(caps), out_lens=ctypes.addressof(lens),
                           status=ctypes.addressof(st), deadline_ms=self.deadline_ms)
            check(_lib.lib().kvf_client_get(self._handle(), ctypes.byref(b)), "get")
            return [(error_name(st[i]),
                     ctypes.string_at(bufs[i], min(lens[i], max_bytes)) if st[i] == 0 else None)
                    for i in range(n)]
        finally:
            for p in bufs:
                _libc.free(p)

    def exists(self, keys: Sequence[KeyLike]) -> List[bool]:
        k = _keys(keys)
        present = (ctypes.c_uint8 * max(len(keys), 1))()
        check(_lib.lib().kvf_client_exists(self._handle(), len(keys), k, present,
                                           self.deadline_ms), "exists")
        return [bool(present[i]) for i in range(len(keys))]

    def io_threads(self) -> int:
        """The I/O threads the client runs its connections on (a large enough get, put or save
        in parts is split across them)."""
        return int(_lib.lib().kvf_client_io_threads(self._handle()))

    def node_of(self, key: KeyLike) -> int:
        """The index (in `nodes`) of the node `key` is placed on now (rendezvous hashing; with
        rerouting on, a node marked down passes its keys to the next)."""
        return int(_lib.lib().kvf_client_node_of(self._handle(), _keys([key])))

    def tiers(self, keys: Sequence[KeyLike]) -> List[Optional[str]]:
        """Which tier of its node holds each key: "dram", "disk" (only the node's disk tier: it
        loads at the disk's rate) or None (not stored)."""
        k = _keys(keys)
        n = max(len(keys), 1)
        present, on_disk = (ctypes.c_uint8 * n)(), (ctypes.c_uint8 * n)()
        check(_lib.lib().kvf_client_exists_tiers(self._handle(), len(keys), k, present, on_disk,
                                                 self.deadline_ms), "tiers")
        return [("disk" if on_disk[i] else "dram") if present[i] else None
                for i in range(len(keys))]

    def lookup_prefix(self, keys: Sequence[KeyLike]) -> int:
        """How many leading keys of a prefix chain are stored."""
        hits = ctypes.c_size_t()
        check(_lib.lib().kvf_client_lookup_prefix(self._handle(), len(keys), _keys(keys),
                                                  ctypes.byref(hits), self.deadline_ms),
              "lookup_prefix")
        return hits.value

    def _per_key(self, fn: str, keys: Sequence[KeyLike], *extra: Any) -> List[str]:
        st = (ctypes.c_int * max(len(keys), 1))()
        check(getattr(_lib.lib(), fn)(self._handle(), len(keys), _keys(keys), *extra, st,
                                      self.deadline_ms), fn[len("kvf_client_"):])
        return [error_name(st[i]) for i in range(len(keys))]

    def evict(self, keys: Sequence[KeyLike]) -> List[str]:
        return self._per_key("kvf_client_evict", keys)

    def copy(self, keys: Sequence[KeyLike], to: str, node: int = 0) -> List[str]:
        """Has node `node` push keys to the node at `to` ("host:port", one of its --peer nodes;
        the admin's): per key, once the target answered. Keys held on the node's disk tier only
        are read back first."""
        st = (ctypes.c_int * max(len(keys), 1))()
        check(_lib.lib().kvf_client_copy(self._handle(), node, to.encode(), len(keys),
                                         _keys(keys), st, self.deadline_ms), "copy")
        return [error_name(st[i]) for i in range(len(keys))]

    def pin(self, keys: Sequence[KeyLike], lease_ms: int) -> List[str]:
        """Pins keys (not evicted) for lease_ms: a pin whose lease ran out counts no more."""
        return self._per_key("kvf_client_pin", keys, ctypes.c_uint32(lease_ms))

    def unpin(self, keys: Sequence[KeyLike]) -> List[str]:
        return self._per_key("kvf_client_unpin", keys)

    def clear(self) -> int:
        """Removes this tenant's objects from every node (the admin: all); how many."""
        removed = ctypes.c_uint64()
        check(_lib.lib().kvf_client_clear(self._handle(), ctypes.byref(removed),
                                          self.deadline_ms), "clear")
        return removed.value

    def counters(self) -> Dict[str, int]:
        """This client's own counters (kvf_client_counters, kvf/client.h), as a dict: bytes sent
        and received, requests, failed keys, reconnects; of the bytes, those moved over shared
        memory, keys whose shared-memory lease ended mid-copy (asked again over TCP) and keys
        sent over TCP because a node's socket was gone; hot keys read from a nearer holder and
        its misses; streamed keys asked again of their own node."""
        c = _lib.ClientCounters()
        _lib.lib().kvf_client_counters_get(self._handle(), ctypes.byref(c))
        return {name: int(getattr(c, name)) for name, _ in c._fields_}

    def stats(self, node: int = 0) -> Dict[str, Any]:
        """Node `node`'s counters (STATS), as a dict."""
        p = ctypes.c_void_p()
        check(_lib.lib().kvf_client_stats(self._handle(), node, ctypes.byref(p),
                                          self.deadline_ms), "stats")
        try:
            return json.loads(ctypes.string_at(p).decode())
        finally:
            _libc.free(p)


__all__ = ["Client", "Object", "KvfError"]
