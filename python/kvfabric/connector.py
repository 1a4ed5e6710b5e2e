"""The connector: an engine's KV pages to and from kvfabric, layer by layer (docs/connector.md,
docs/python.md).

Ownership follows the C API: the memory registered stays referenced by the Connector until the
next registration or close, and every Transfer keeps its Connector and that memory alive until it
is freed, so nothing a transfer reads or writes is freed under it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _lib
from .errors import KvfError, Miss, check
from .layout import LATENT, Layout

HOST, UNIFIED, CUDA = 0, 1, 2
_KINDS = {"host": HOST, "unified": UNIFIED, "cuda": CUDA}


@dataclass
class KVPages:
    """One layer's KV planes in the engine's memory: the address of page 0 of the K plane and of
    the V plane (None for a latent layout), the bytes from one page to the next, the number of
    pages, the memory kind ("host", "unified" or "cuda"), and the object that owns the memory
    (kept referenced while the connector may touch it)."""

    k_ptr: int
    v_ptr: Optional[int]
    page_stride: int
    num_pages: int
    kind: str = "host"
    owner: Any = None


def _tensor_plane(t: Any, page_bytes: int, what: str) -> Tuple[int, int, int, str]:
    """(address, page stride, pages, kind) of a torch tensor whose first dimension is the page."""
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{what}: a tensor of pages is [num_pages, ...], got shape {tuple(t.shape)}")
    esize = t.element_size()
    if not t[0].is_contiguous() or t[0].numel() * esize != page_bytes:
        raise ValueError(f"{what}: a page must be {page_bytes} contiguous bytes, got "
                         f"{t[0].numel() * esize} (shape {tuple(t.shape)}, dtype {t.dtype})")
    kind = "cuda" if t.is_cuda else "host"
    return t.data_ptr(), t.stride(0) * esize, int(t.shape[0]), kind


def pages_from_tensors(layout: Layout, kv: Sequence[Any]) -> List[KVPages]:
    """KVPages from torch tensors, one entry per layer: a (K, V) pair of tensors shaped
    [num_pages, page_tokens, heads, head_dim] (or any shape whose first dimension is the page
    and whose pages are contiguous), or one tensor [2, num_pages, ...] with K then V (vLLM's
    layout), or, for a latent layout, one tensor [num_pages, ...]. CPU or CUDA tensors."""
    out = []
    pb = layout.page_bytes
    for i, entry in enumerate(kv):
        if layout.kind == LATENT:
            k, v = entry, None
        elif isinstance(entry, (tuple, list)):
            k, v = entry
        else:
            if entry.dim() < 2 or entry.shape[0] != 2:
                raise ValueError(f"layer {i}: expected (K, V) or a [2, num_pages, ...] tensor")
            k, v = entry[0], entry[1]
        ka, ks, kn, kk = _tensor_plane(k, pb, f"layer {i} K")
        va = None
        if v is not None:
            va, vs, vn, vk = _tensor_plane(v, pb, f"layer {i} V")
            if (vs, vk) != (ks, kk):
                raise ValueError(f"layer {i}: K and V differ in page stride or device")
            kn = min(kn, vn)
        out.append(KVPages(ka, va, ks, kn, kk, owner=(k, v)))
    return out


def _stream_handle(stream: Any) -> Optional[int]:
    """A cudaStream_t from None, an int, or a torch.cuda.Stream."""
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream or None
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise TypeError("stream: a torch.cuda.Stream, a cudaStream_t as int, or None")
    return int(handle) or None


class _Handle:
    """A libkvf handle owned by a Python object: freed once, by close(), a with block's end or
    collection. Subclasses name their handle's kind and its C destructor (which takes a pointer
    to the handle and clears it)."""

    _h: Optional[ctypes.c_void_p] = None
    _kind = "handle"
    _free_fn = ""

    def _handle(self) -> ctypes.c_void_p:
        if not self._h:
            raise KvfError(-15, self._kind, "closed")
        return self._h

    def _released(self) -> None:
        """Called once the handle is freed."""

    def close(self) -> None:
        if self._h:
            h = ctypes.c_void_p(self._h.value)
            self._h = None
            getattr(_lib.lib(), self._free_fn)(ctypes.byref(h))
            self._released()

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Prefetch(_Handle):
    """A prefix's chunks being fetched while its request waits (Connector.prefetch). close()
    never waits: chunks still on their way are dropped when they arrive, and the memory goes
    once no load reads it."""

    _kind, _free_fn = "prefetch", "kvf_prefetch_free"

    def __init__(self, cn: "Connector", handle: ctypes.c_void_p) -> None:
        self._cn = cn
        self._h = handle

    @property
    def tokens(self) -> int:
        """The tokens it fetches for."""
        return int(_lib.lib().kvf_prefetch_tokens(self._handle()))

    @property
    def ready_tokens(self) -> int:
        """The leading tokens whose chunks have all arrived so far."""
        return int(_lib.lib().kvf_prefetch_ready_tokens(self._handle()))

    def wait(self, deadline: Optional[float] = None) -> int:
        """Waits until every chunk arrived or until deadline (time.monotonic() seconds; None:
        the connector's transfer deadline); returns ready_tokens."""
        ns = 0 if deadline is None else max(1, int(deadline * 1e9))
        return int(_lib.lib().kvf_prefetch_wait(self._handle(), ns))


class Transfer(_Handle):
    """A load or a save in flight. Free it with close() (or let it be collected); either waits
    for it to finish. Every method raises KvfError on failure; a load's layer that did not arrive
    raises Miss, and the engine recomputes from that layer."""

    _kind, _free_fn = "transfer", "kvf_xfer_free"

    def __init__(self, cn: "Connector", handle: ctypes.c_void_p, is_save: bool, tokens: int) -> None:
        self._cn = cn
        self._held = cn._held  # the registered memory, alive while this transfer is
        self._h = handle
        self.is_save = is_save
        self.tokens = tokens

    def wait_layer(self, layer: int) -> None:
        """Load: returns once layer `layer` of every chunk is in the engine's pages (for CUDA
        pages: the copies to the device completed). Raises Miss otherwise."""
        rc = _lib.lib().kvf_xfer_wait_layer(self._handle(), int(layer))
        if rc:
            raise Miss(rc, f"load: layer {layer}", self._cn.last_error())

    def layer_done(self, layer: int, stream: Any = None) -> None:
        """Save: the engine finished (for CUDA pages: queued on `stream`) layer `layer`."""
        h = _stream_handle(stream)
        check(_lib.lib().kvf_xfer_layer_done_stream(self._handle(), int(layer), h),
              f"save: layer {layer}", self._cn.last_error())

    def wait_pages(self) -> None:
        """Save: returns once every page of the layers reported done has been read."""
        check(_lib.lib().kvf_xfer_wait_pages(self._handle()), "save: pages")

    def wait(self) -> None:
        """Waits for the whole transfer: a load raises Miss unless every chunk arrived, a save
        raises KvfError unless its batch was stored."""
        rc = _lib.lib().kvf_xfer_wait(self._handle())
        if rc:
            cls = KvfError if self.is_save else Miss
            raise cls(rc, "save" if self.is_save else "load", self._cn.last_error())

    @property
    def loaded_tokens(self) -> int:
        """Load: the leading tokens that arrived whole (a multiple of chunk_tokens)."""
        return int(_lib.lib().kvf_xfer_loaded_tokens(self._handle()))

    def cancel(self) -> None:
        """Stops the transfer; once this returns no page is written for it."""
        _lib.lib().kvf_xfer_cancel(self._handle())

    def close(self) -> None:
        """Frees the transfer, waiting for it to finish first (cancel it to make that quick)."""
        super().close()

    def _released(self) -> None:
        self._held = None


def _sources(sources: Sequence[Tuple[str, int, int]]) -> Any:
    """A plan's runs, (store "host:port", from token, tokens), as struct kvf_source[]."""
    arr = (_lib.Source * len(sources))()
    for i, (store, start, n) in enumerate(sources):
        arr[i] = _lib.Source(store.encode(), int(start), int(n))
    return arr


class Connector(_Handle):
    """A connector to kvfabric's storage nodes (`nodes`, "host:port" each) or to the ones
    kvf-sched lists (`sched`, "host:port"). With `sched`, the list is asked for again every
    `stores_refresh_ms` (0: 2000; negative: never): a store that joins is used from then on, one
    that left is dropped, and transfers in flight finish where they started. With `etcd`
    ("http://host:port,...") the stores are the ones registered in etcd under
    /kvfabric/`cluster`/stores/, followed by a watch: each change is used as etcd tells it.
    A save over TCP is put in parts as its layers are gathered (docs/connector.md); with
    `save_whole` it is put once its last layer is (stats()["saves_in_parts"] counts the former).
    Over shared memory `save_parts_shm` decides: True puts in parts (over the store's Unix
    socket), False whole (through the staging regions), None (the default) in parts where the
    storage client runs two I/O threads or more (hosts of 8 cores or more), else whole.

    >>> cn = Connector(layout, nodes=["127.0.0.1:7400"])
    >>> cn.register(pages_from_tensors(layout, kv_caches))
    >>> cached = cn.lookup(tokens)
    >>> with cn.load(tokens[:cached], page_ids[:cached // layout.page_tokens]) as ld:
    ...     for layer in range(layout.layers):
    ...         ld.wait_layer(layer)          # Miss: recompute from this layer
    ...         forward(layer)
    """

    _kind, _free_fn = "connector", "kvf_connector_close"

    def __init__(self, layout: Layout, nodes: Optional[Sequence[str]] = None,
                 sched: Optional[str] = None, salt: Union[str, bytes, None] = None,
                 credential: Optional[str] = None, workers: int = 0, deadline_ms: int = 0,
                 conns_per_node: int = 0, staging_bytes: int = 0,
                 trust_local_store: bool = False, stores_refresh_ms: int = 0,
                 etcd: Optional[str] = None, cluster: Optional[str] = None,
                 save_whole: bool = False, save_parts_shm: Optional[bool] = None) -> None:
        self.layout = layout
        self._h = None
        self._held: Tuple[Any, ...] = ()
        node_list = [n.encode() for n in (nodes or [])]
        arr = (ctypes.c_char_p * max(len(node_list), 1))(*node_list)
        o = _lib.ConnectorOpts()
        o.nodes = ctypes.cast(arr, ctypes.POINTER(ctypes.c_char_p))
        o.n_nodes = len(node_list)
        o.sched = sched.encode() if sched else None
        o.layout = layout._c
        o.salt = salt.encode() if isinstance(salt, str) else salt
        o.credential = credential.encode() if credential else None
        o.staging_bytes = staging_bytes
        o.workers = workers
        o.deadline_ms = deadline_ms
        o.conns_per_node = conns_per_node
        o.trust_local_store = 1 if trust_local_store else 0
        o.stores_refresh_ms = stores_refresh_ms
        o.etcd = etcd.encode() if etcd else None
        o.cluster = cluster.encode() if cluster else None
        o.save_whole = 1 if save_whole else 0
        o.save_parts_shm = 0 if save_parts_shm is None else 1 if save_parts_shm else -1
        h = ctypes.c_void_p()
        err = ctypes.create_string_buffer(400)
        check(_lib.lib().kvf_connector_open(ctypes.byref(h), ctypes.byref(o), err, len(err)),
              "connector", err.value.decode())
        self._h = h

    def register(self, layers: Sequence[KVPages]) -> None:
        """Registers the engine's KV memory, one KVPages per layer of the layout (see
        pages_from_tensors). Raises KvfError: KVF_EINVAL (shape, counts, memory),
        KVF_EINFEASIBLE (memory this host cannot move, e.g. CUDA without a runtime),
        KVF_EBUSY (transfers in flight)."""
        arr = (_lib.KVLayer * max(len(layers), 1))()
        for i, p in enumerate(layers):
            kind = _KINDS.get(p.kind)
            if kind is None:
                raise ValueError(f"layer {i}: memory kind {p.kind!r} is not host, unified or cuda")
            arr[i] = _lib.KVLayer(p.k_ptr, p.v_ptr, p.page_stride, p.num_pages, kind)
        err = ctypes.create_string_buffer(400)
        check(_lib.lib().kvf_connector_register(self._handle(), arr, len(layers), err, len(err)),
              "register", err.value.decode())
        self._held = tuple(p.owner for p in layers)

    def take(self, layers: Sequence[KVPages]) -> None:
        """Registers `layers` unless they are what is registered (the same tensors): for each of
        several users of one connector (engines, caches) before its transfers, since a connector
        moves the memory registered last. Raises KvfError (KVF_EBUSY) while another user's
        transfers or prefetches are in flight."""
        held = self._held
        if len(held) != len(layers) or any(h is not p.owner for h, p in zip(held, layers)):
            self.register(layers)

    def lookup(self, tokens: Sequence[int],
               sources: Optional[Sequence[Tuple[str, int, int]]] = None) -> int:
        """The leading tokens that are cached, a multiple of chunk_tokens. sources: a plan's
        runs (store, from, tokens): a chunk the store its run names holds counts too
        (kvf_connector_lookup_planned), as a load with those sources can bring it."""
        arr = _lib.u32_array(tokens)
        out = ctypes.c_size_t()
        if sources:
            rc = _lib.lib().kvf_connector_lookup_planned(self._handle(), arr, len(tokens),
                                                         _sources(sources), len(sources),
                                                         ctypes.byref(out))
        else:
            rc = _lib.lib().kvf_connector_lookup(self._handle(), arr, len(tokens),
                                                 ctypes.byref(out))
        check(rc, "lookup")
        return out.value

    def load(self, tokens: Sequence[int], page_ids: Sequence[int], first_chunk: int = 0,
             sources: Optional[Sequence[Tuple[str, int, int]]] = None) -> Transfer:
        """Starts loading the KV of tokens (a multiple of chunk_tokens) into the pages page_ids
        (one per page_tokens tokens, covering all of tokens). With first_chunk, the chunks before
        it are already in the engine's pages (a prefix it shares itself) and are not moved;
        loaded_tokens still counts from the start. sources: a plan's runs as (store "host:port",
        from token, tokens): each chunk is asked first of the store its run names, and of its
        own node in the same load where that one lacks it (kvf_connector_load_planned)."""
        t, p = _lib.u32_array(tokens), _lib.u32_array(page_ids)
        x = ctypes.c_void_p()
        if sources:
            arr = _sources(sources)
            rc = _lib.lib().kvf_connector_load_planned(self._handle(), t, len(tokens),
                                                       int(first_chunk), arr, len(sources), p,
                                                       len(page_ids), ctypes.byref(x))
        else:
            rc = _lib.lib().kvf_connector_load_from(self._handle(), t, len(tokens),
                                                    int(first_chunk), p, len(page_ids),
                                                    ctypes.byref(x))
        check(rc, "load")
        return Transfer(self, x, False, len(tokens))

    def prefetch(self, tokens: Sequence[int],
                 sources: Optional[Sequence[Tuple[str, int, int]]] = None) -> "Prefetch":
        """Starts fetching the chunks of tokens (a multiple of chunk_tokens) into memory of the
        prefetch's own, for a request that waits for its turn; at its turn,
        Prefetch.wait(deadline) then load_prefetched() (docs/connector.md, "Prefetch with
        deadlines"). sources: a plan's runs as (store "host:port", from token, tokens): each
        chunk is asked first of the store its run names, then of its own node where that one
        lacks it (kvf_connector_prefetch_from)."""
        t = _lib.u32_array(tokens)
        h = ctypes.c_void_p()
        if sources:
            arr = _sources(sources)
            rc = _lib.lib().kvf_connector_prefetch_from(self._handle(), t, len(tokens), arr,
                                                        len(sources), ctypes.byref(h))
        else:
            rc = _lib.lib().kvf_connector_prefetch(self._handle(), t, len(tokens),
                                                   ctypes.byref(h))
        check(rc, "prefetch")
        return Prefetch(self, h)

    def load_prefetched(self, pf: "Prefetch", tokens: Sequence[int],
                        page_ids: Sequence[int]) -> Transfer:
        """Starts loading the KV of tokens (a multiple of chunk_tokens, at most what pf has
        ready) into the pages page_ids from pf's memory. tokens must be those pf fetched for:
        another prompt's prefetch raises KvfError (KVF_EINVAL)."""
        t, p = _lib.u32_array(tokens), _lib.u32_array(page_ids)
        x = ctypes.c_void_p()
        check(_lib.lib().kvf_connector_load_prefetched(self._handle(), pf._handle(), t,
                                                       len(tokens), p, len(page_ids),
                                                       ctypes.byref(x)), "load from prefetch")
        return Transfer(self, x, False, len(tokens))

    def save(self, tokens: Sequence[int], page_ids: Sequence[int], first_chunk: int = 0) -> Transfer:
        """Starts saving the chunks first_chunk.. of tokens from the pages page_ids (covering all
        of tokens); report each layer with Transfer.layer_done."""
        t, p = _lib.u32_array(tokens), _lib.u32_array(page_ids)
        x = ctypes.c_void_p()
        check(_lib.lib().kvf_connector_save(self._handle(), t, len(tokens), int(first_chunk), p,
                                            len(page_ids), ctypes.byref(x)), "save")
        return Transfer(self, x, True, len(tokens))

    def set_metrics(self, registry: Any) -> None:
        """Records the connector's per-layer timing into a kvfabric.metrics.Registry (histograms
        connector_layer_seconds, connector_wait_seconds and connector_transfer_seconds by op;
        docs/operations.md); None stops it. With no transfer in flight. The registry is kept
        alive as long as the connector records into it."""
        h = registry._h if registry is not None else None
        check(_lib.lib().kvf_connector_set_metrics(self._handle(), h), "set_metrics")
        self._metrics = registry

    def stats(self) -> Dict[str, int]:
        s = _lib.ConnectorStats()
        _lib.lib().kvf_connector_stats_get(self._handle(), ctypes.byref(s))
        return {name: int(getattr(s, name)) for name in _lib.STATS_FIELDS}

    def transport(self) -> Tuple[str, str]:
        """(transport, why): "shm", "tcp" or "rdma", and the reasons for it."""
        why = ctypes.create_string_buffer(512)
        t = _lib.lib().kvf_connector_transport(self._handle(), why, len(why))
        return t.decode(), why.value.decode()

    def last_error(self) -> str:
        """The last failure of a page copy (a CUDA error by name...), or ""."""
        if not self._h:
            return ""
        buf = ctypes.create_string_buffer(256)
        _lib.lib().kvf_connector_error(self._h, buf, len(buf))
        return buf.value.decode()

    def close(self) -> None:
        """Closes the connector: transfers in flight fail (and must still be closed)."""
        super().close()
