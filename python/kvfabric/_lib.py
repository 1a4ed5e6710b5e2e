"""libkvf through ctypes: finding the library, and the C types and functions the package uses.

The library is looked up, in order, at $KVF_LIBRARY, beside this package (an install that ships
it), in the build tree of a checkout (build/libkvf.so next to python/), and where the dynamic
linker finds libkvf.so.0. Nothing here is public: kvfabric's modules wrap it.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import os
import threading
from typing import Optional

c_int, c_uint32, c_uint64, c_size_t = ctypes.c_int, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t
c_char_p, c_void_p = ctypes.c_char_p, ctypes.c_void_p

MODEL_ID_MAX = 63


class Layout(ctypes.Structure):
    """struct kvf_layout (include/kvf/layout.h)."""

    _fields_ = [
        ("model_id", ctypes.c_char * (MODEL_ID_MAX + 1)),
        ("layers", c_uint32),
        ("kv_heads", c_uint32),
        ("head_dim", c_uint32),
        ("dtype", c_int),
        ("kind", c_int),
        ("page_tokens", c_uint32),
        ("chunk_tokens", c_uint32),
        ("tp_rank", c_uint32),
        ("tp_size", c_uint32),
    ]


class Key(ctypes.Structure):
    """struct kvf_key: a chunk key (128 bits)."""

    _fields_ = [("lo", c_uint64), ("hi", c_uint64)]


class KeySpace(ctypes.Structure):
    """struct kvf_keyspace."""

    _fields_ = [("seed", c_uint64), ("layout_fp", c_uint64), ("chunk_tokens", c_uint32)]


class KVLayer(ctypes.Structure):
    """struct kvf_kv_layer: one layer's planes in the engine's memory."""

    _fields_ = [
        ("k_base", c_void_p),
        ("v_base", c_void_p),
        ("page_stride", c_size_t),
        ("num_pages", c_uint32),
        ("kind", c_int),
    ]


class ConnectorOpts(ctypes.Structure):
    """struct kvf_connector_opts."""

    _fields_ = [
        ("nodes", ctypes.POINTER(c_char_p)),
        ("n_nodes", c_size_t),
        ("sched", c_char_p),
        ("layout", Layout),
        ("salt", c_char_p),
        ("credential", c_char_p),
        ("staging_bytes", c_size_t),
        ("workers", c_int),
        ("deadline_ms", c_int),
        ("conns_per_node", c_int),
        ("caps", c_void_p),
        ("trust_local_store", c_int),
        ("stores_refresh_ms", c_int),
        ("etcd", c_char_p),
        ("cluster", c_char_p),
        ("save_whole", c_int),
        ("save_parts_shm", c_int),
    ]


STATS_FIELDS = [
    "loads", "saves", "loads_in_place", "load_bytes", "save_bytes", "batches", "chunks_loaded",
    "chunks_saved", "chunks_missed", "chunks_existing", "gather_ns", "scatter_ns", "wait_ns",
    "shm_bytes", "net_bytes", "cuda_bytes", "cuda_copy_calls", "cuda_kernels", "prefetches",
    "prefetch_chunks", "prefetch_chunks_loaded", "in_place_hashed_bytes", "stores",
    "store_clients_opened", "store_clients_closed", "store_refresh_failures", "prefetch_named",
    "prefetch_named_missed", "prefetch_sources_unknown", "load_named", "load_named_reasked",
    "load_sources_unknown", "prefetch_memory_reused", "saves_in_parts",
]


class ConnectorStats(ctypes.Structure):
    """struct kvf_connector_stats."""

    _fields_ = [(name, c_uint64) for name in STATS_FIELDS]


class Source(ctypes.Structure):
    """struct kvf_source (kvf/connector.h): where a plan takes a run of chunks from."""

    _fields_ = [("store", c_char_p), ("from_", c_size_t), ("tokens", c_size_t)]


class CudaInfo(ctypes.Structure):
    """struct kvf_cuda_info (include/kvf/cuda.h)."""

    _fields_ = [
        ("usable", c_int),
        ("runtime_version", c_int),
        ("driver_version", c_int),
        ("devices", c_int),
        ("cc_major", c_int),
        ("cc_minor", c_int),
        ("sm_count", c_int),
        ("batch_copy", c_int),
        ("nvrtc_version", c_int),
        ("library", ctypes.c_char * 160),
        ("why", ctypes.c_char * 240),
    ]


class ClientOpts(ctypes.Structure):
    """kvf_client_opts (kvf/client.h), field for field."""

    _fields_ = [
        ("nodes", ctypes.POINTER(c_char_p)), ("n_nodes", c_size_t), ("ns", c_uint64),
        ("conns_per_node", c_int), ("connect_timeout_ms", c_int), ("deadline_ms", c_int),
        ("stripe_bytes", c_uint64), ("transport", c_char_p), ("io_threads", c_int),
        ("credential", c_char_p), ("shm_lease_ms", c_uint32), ("shm_staging_bytes", c_uint64),
    ]


class ClientCounters(ctypes.Structure):
    """kvf_client_counters (kvf/client.h), field for field."""

    _fields_ = [(name, c_uint64) for name in (
        "bytes_sent", "bytes_received", "requests", "failed_keys", "reconnects",
        "shm_bytes_sent", "shm_bytes_received", "shm_lease_expired", "shm_fallback_keys",
        "near_keys", "near_misses", "named_reasked")]


class Batch(ctypes.Structure):
    """kvf_batch (kvf/client.h), field for field (no callbacks: the synchronous calls)."""

    _fields_ = [
        ("n", c_size_t), ("keys", c_void_p), ("objs", c_void_p), ("lens", c_void_p),
        ("bufs", c_void_p), ("caps", c_void_p), ("out_lens", c_void_p), ("status", c_void_p),
        ("flags", c_uint32), ("deadline_ms", c_int), ("cb", c_void_p), ("layer_cb", c_void_p),
        ("ud", c_void_p), ("nodes", c_void_p),
    ]


class ObjInfo(ctypes.Structure):
    _fields_ = [
        ("codec", c_uint32), ("layers", c_uint32), ("tokens", c_uint32), ("layout_fp", c_uint64),
        ("key", Key), ("raw_bytes", c_uint64), ("stored_bytes", c_uint64),
        ("header_len", c_uint32), ("seg_table", c_void_p),
    ]


class ObjSeg(ctypes.Structure):
    _fields_ = [("raw_len", c_uint32), ("stored_len", c_uint32), ("stored_xxh", c_uint64),
                ("raw_xxh", c_uint64)]


class Caps(ctypes.Structure):
    """kvf_caps (kvf/feasibility.h), field for field."""

    _fields_ = [
        ("name", ctypes.c_char * 64), ("platform", ctypes.c_char * 16), ("apple_silicon", c_int),
        ("transports", c_uint32), ("rdma_devices", c_int), ("rdma_one_sided", c_int),
        ("mem_kinds", c_uint32), ("xfer_mem_kinds", c_uint32), ("engine", ctypes.c_char * 32),
        ("engine_version", ctypes.c_char * 32), ("paged", c_int), ("layerwise_hooks", c_int),
        ("async_load", c_int), ("external_connector", c_int), ("quant_bits", c_uint32),
        ("quant_groups", c_uint32), ("trim", c_int), ("partial_evict", c_int),
        ("trim_can_fail", c_int), ("rotating_cache", c_int), ("rotating_with_quant", c_int),
        ("store_tiers", c_int), ("codecs", c_int),
    ]


class Verdict(ctypes.Structure):
    _fields_ = [("label", c_int), ("reason", c_int), ("why", ctypes.c_char * 200)]


class GapState(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in (
        "prompt_tokens", "cached_tokens", "kv_bytes_per_token", "prefill_tokens_per_s",
        "tcp_bytes_per_s", "rdma_bytes_per_s", "memory_pressure")]


class Gap(ctypes.Structure):
    _fields_ = [("best_all", c_int), ("best_feasible", c_int), ("score_all", ctypes.c_double),
                ("score_feasible", ctypes.c_double), ("gap", ctypes.c_double),
                ("have_feasible", c_int)]


class EventsOpts(ctypes.Structure):
    _fields_ = [
        ("listen", c_char_p),
        ("credential", c_char_p),
        ("tenants", c_char_p),
        ("tenant_credential", c_char_p),
        ("replay", c_char_p),
        ("replay_batches", c_size_t),
        ("replay_bytes", c_size_t),
        ("shards", c_uint32),
        ("shard_roots_max", c_size_t),
    ]


_P = ctypes.POINTER
_SIGNATURES = {
    "kvf_strerror": (c_char_p, [c_int]),
    "kvf_err_name": (c_char_p, [c_int]),
    "kvf_layout_validate": (c_int, [_P(Layout), c_char_p, c_size_t]),
    "kvf_layout_preset": (c_int, [c_char_p, _P(Layout)]),
    "kvf_layout_preset_name": (c_char_p, [c_size_t]),
    "kvf_layout_bytes_per_token": (c_uint64, [_P(Layout)]),
    "kvf_layout_bytes_per_token_layer": (c_uint64, [_P(Layout)]),
    "kvf_layout_segment_bytes": (c_uint64, [_P(Layout)]),
    "kvf_layout_chunk_bytes": (c_uint64, [_P(Layout)]),
    "kvf_layout_fingerprint": (c_int, [_P(Layout), _P(c_uint64)]),
    "kvf_layout_dtype_size": (c_size_t, [c_int]),
    "kvf_layout_to_json": (c_int, [_P(Layout), c_char_p, c_size_t]),
    "kvf_dtype_parse": (c_int, [c_char_p, _P(c_int)]),
    "kvf_dtype_name": (c_char_p, [c_int]),
    "kvf_keyspace_init": (c_int, [_P(KeySpace), _P(Layout), c_void_p, c_size_t]),
    "kvf_keys_compute": (c_int, [_P(KeySpace), _P(c_uint32), c_size_t, _P(Key), c_size_t,
                                 _P(c_size_t), _P(c_size_t)]),
    "kvf_key_to_hex": (c_char_p, [_P(Key), c_char_p]),
    "kvf_key_from_hex": (c_int, [c_char_p, _P(Key)]),
    "kvf_codec_parse": (c_int, [c_char_p, _P(c_int)]),
    "kvf_obj_encode": (c_int, [_P(Key), c_uint64, c_uint32, c_uint32, _P(c_void_p), c_uint64,
                               c_int, c_void_p, c_size_t, _P(c_size_t), c_void_p]),
    "kvf_obj_verify": (c_int, [c_void_p, c_size_t, _P(ObjInfo)]),
    "kvf_obj_seg_at": (ObjSeg, [_P(ObjInfo), c_uint32]),
    "kvf_obj_decode_seg": (c_int, [c_uint32, _P(ObjSeg), c_void_p, c_void_p, c_void_p]),
    "kvf_client_open": (c_int, [_P(c_void_p), _P(ClientOpts), c_char_p, c_size_t]),
    "kvf_client_close": (None, [_P(c_void_p)]),
    "kvf_client_node_count": (c_size_t, [c_void_p]),
    "kvf_client_set_reroute": (None, [c_void_p, c_int]),
    "kvf_client_put": (c_int, [c_void_p, _P(Batch)]),
    "kvf_client_get": (c_int, [c_void_p, _P(Batch)]),
    "kvf_client_exists": (c_int, [c_void_p, c_size_t, _P(Key), _P(ctypes.c_uint8), c_int]),
    "kvf_client_node_of": (c_size_t, [c_void_p, _P(Key)]),
    "kvf_client_exists_tiers": (c_int, [c_void_p, c_size_t, _P(Key), _P(ctypes.c_uint8),
                                        _P(ctypes.c_uint8), c_int]),
    "kvf_client_lookup_prefix": (c_int, [c_void_p, c_size_t, _P(Key), _P(c_size_t), c_int]),
    "kvf_client_evict": (c_int, [c_void_p, c_size_t, _P(Key), _P(c_int), c_int]),
    "kvf_client_copy": (c_int, [c_void_p, c_size_t, c_char_p, c_size_t, _P(Key), _P(c_int),
                                c_int]),
    "kvf_client_pin": (c_int, [c_void_p, c_size_t, _P(Key), c_uint32, _P(c_int), c_int]),
    "kvf_client_unpin": (c_int, [c_void_p, c_size_t, _P(Key), _P(c_int), c_int]),
    "kvf_client_clear": (c_int, [c_void_p, _P(c_uint64), c_int]),
    "kvf_client_stats": (c_int, [c_void_p, c_size_t, _P(c_void_p), c_int]),
    "kvf_client_transport": (c_char_p, [c_void_p, c_char_p, c_size_t]),
    "kvf_client_io_threads": (c_int, [c_void_p]),
    "kvf_client_counters_get": (None, [c_void_p, _P(ClientCounters)]),
    "kvf_connector_open": (c_int, [_P(c_void_p), _P(ConnectorOpts), c_char_p, c_size_t]),
    "kvf_connector_close": (None, [_P(c_void_p)]),
    "kvf_connector_register": (c_int, [c_void_p, _P(KVLayer), c_uint32, c_char_p, c_size_t]),
    "kvf_connector_lookup": (c_int, [c_void_p, _P(c_uint32), c_size_t, _P(c_size_t)]),
    "kvf_connector_lookup_planned": (c_int, [c_void_p, _P(c_uint32), c_size_t, _P(Source),
                                             c_size_t, _P(c_size_t)]),
    "kvf_connector_load": (c_int, [c_void_p, _P(c_uint32), c_size_t, _P(c_uint32), c_size_t,
                                   _P(c_void_p)]),
    "kvf_connector_load_from": (c_int, [c_void_p, _P(c_uint32), c_size_t, c_size_t, _P(c_uint32),
                                        c_size_t, _P(c_void_p)]),
    "kvf_connector_load_planned": (c_int, [c_void_p, _P(c_uint32), c_size_t, c_size_t,
                                           _P(Source), c_size_t, _P(c_uint32), c_size_t,
                                           _P(c_void_p)]),
    "kvf_connector_save": (c_int, [c_void_p, _P(c_uint32), c_size_t, c_size_t, _P(c_uint32),
                                   c_size_t, _P(c_void_p)]),
    "kvf_connector_prefetch": (c_int, [c_void_p, _P(c_uint32), c_size_t, _P(c_void_p)]),
    "kvf_connector_prefetch_from": (c_int, [c_void_p, _P(c_uint32), c_size_t, _P(Source),
                                            c_size_t, _P(c_void_p)]),
    "kvf_prefetch_tokens": (c_size_t, [c_void_p]),
    "kvf_prefetch_ready_tokens": (c_size_t, [c_void_p]),
    "kvf_prefetch_wait": (c_size_t, [c_void_p, c_uint64]),
    "kvf_connector_load_prefetched": (c_int, [c_void_p, c_void_p, _P(c_uint32), c_size_t,
                                              _P(c_uint32), c_size_t, _P(c_void_p)]),
    "kvf_prefetch_free": (None, [_P(c_void_p)]),
    "kvf_connector_stats_get": (None, [c_void_p, _P(ConnectorStats)]),
    "kvf_connector_set_metrics": (c_int, [c_void_p, c_void_p]),
    "kvf_connector_transport": (c_char_p, [c_void_p, c_char_p, c_size_t]),
    "kvf_connector_error": (c_char_p, [c_void_p, c_char_p, c_size_t]),
    "kvf_xfer_wait_layer": (c_int, [c_void_p, c_uint32]),
    "kvf_xfer_layer_done": (c_int, [c_void_p, c_uint32]),
    "kvf_xfer_layer_done_stream": (c_int, [c_void_p, c_uint32, c_void_p]),
    "kvf_xfer_wait_pages": (c_int, [c_void_p]),
    "kvf_xfer_wait": (c_int, [c_void_p]),
    "kvf_xfer_loaded_tokens": (c_size_t, [c_void_p]),
    "kvf_xfer_cancel": (None, [c_void_p]),
    "kvf_xfer_free": (None, [_P(c_void_p)]),
    "kvf_cuda_probe": (c_int, [_P(CudaInfo)]),
    "kvf_action_name": (c_char_p, [c_int]),
    "kvf_action_parse": (c_int, [c_char_p, _P(c_int)]),
    "kvf_feas_label_name": (c_char_p, [c_int]),
    "kvf_feas_reason_name": (c_char_p, [c_int]),
    "kvf_classify": (c_int, [c_int, _P(Caps), _P(Caps), c_int, _P(Verdict)]),
    "kvf_caps_builtin": (c_int, [c_char_p, _P(Caps)]),
    "kvf_caps_builtin_name": (c_char_p, [c_size_t]),
    "kvf_caps_from_json": (c_int, [c_char_p, c_size_t, _P(Caps), c_char_p, c_size_t]),
    "kvf_caps_to_json": (c_void_p, [_P(Caps)]),
    "kvf_gap_state_defaults": (None, [_P(GapState)]),
    "kvf_optimality_gap": (c_int, [_P(Caps), _P(Caps), _P(GapState), _P(Gap)]),
    "kvf_events_open": (c_int, [_P(c_void_p), _P(EventsOpts), c_char_p, c_size_t]),
    "kvf_events_endpoint": (c_char_p, [c_void_p]),
    "kvf_events_topic": (c_char_p, [c_void_p]),
    "kvf_events_replay_endpoint": (c_char_p, [c_void_p]),
    "kvf_events_hash_blocks": (c_int, [_P(c_uint32), c_size_t, c_uint32, c_uint64,
                                       _P(c_uint64)]),
    "kvf_events_publish": (c_int, [c_void_p, _P(c_uint64), c_size_t, _P(c_uint64), c_size_t,
                                   c_int, c_uint64, _P(c_uint32), c_uint32, c_char_p]),
    "kvf_events_sequence": (c_uint64, [c_void_p]),
    "kvf_events_clear": (c_int, [c_void_p, c_int]),
    "kvf_events_unknown_parents": (c_uint64, [c_void_p]),
    "kvf_events_shard_of": (c_uint32, [c_uint64, c_uint32]),
    "kvf_events_close": (None, [_P(c_void_p)]),
    "kvf_metrics_new": (c_void_p, [c_char_p]),
    "kvf_metrics_free": (None, [_P(c_void_p)]),
    "kvf_metrics_counter_add": (c_int, [c_void_p, c_char_p, c_char_p, c_char_p, _P(c_char_p),
                                        ctypes.c_double]),
    "kvf_metrics_counter_set": (c_int, [c_void_p, c_char_p, c_char_p, c_char_p, _P(c_char_p),
                                        ctypes.c_double]),
    "kvf_metrics_gauge_set": (c_int, [c_void_p, c_char_p, c_char_p, c_char_p, _P(c_char_p),
                                      ctypes.c_double]),
    "kvf_metrics_observe_seconds": (c_int, [c_void_p, c_char_p, c_char_p, c_char_p,
                                            _P(c_char_p), ctypes.c_double]),
    "kvf_metrics_expose": (c_int, [c_void_p, _P(c_void_p), _P(c_size_t)]),
    "kvf_metrics_text_free": (None, [c_void_p]),
}

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


def _candidates() -> list:
    here = os.path.dirname(os.path.abspath(__file__))
    out = []
    env = os.environ.get("KVF_LIBRARY")
    if env:
        out.append(env)
    out.append(os.path.join(here, "libkvf.so"))
    out.append(os.path.join(here, "..", "..", "build", "libkvf.so"))
    found = ctypes.util.find_library("kvf")
    if found:
        out.append(found)
    out.append("libkvf.so.0")
    return out


def lib() -> ctypes.CDLL:
    """libkvf, loaded on first use, with every function used given its C signature."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        tried = []
        for path in _candidates():
            try:
                handle = ctypes.CDLL(path)
            except OSError as e:
                tried.append(f"{path} ({e})")
                continue
            for name, (res, args) in _SIGNATURES.items():
                fn = getattr(handle, name)
                fn.restype = res
                fn.argtypes = args
            _lib = handle
            return handle
        raise OSError("kvfabric: cannot load libkvf: tried " + "; ".join(tried) +
                      " (set KVF_LIBRARY to the path of libkvf.so)")


def u32_array(values) -> "ctypes.Array":
    """A C array of uint32 from a sequence of ints (tokens, page ids), built in one call: the
    engine passes every prompt's tokens through it."""
    seq = values if isinstance(values, (list, tuple)) else list(values)
    if seq and not isinstance(seq[0], int):
        seq = [int(v) for v in seq]  # numpy or torch scalars
    if seq and (min(seq) < 0 or max(seq) > 0xFFFFFFFF):
        raise ValueError("a value is not a uint32 (0 to 4294967295)")
    if not seq:
        return (c_uint32 * 1)()
    try:  # array's C loop: a third of the time of ctypes' argument unpacking for 32K tokens
        buf = array.array("I", seq)
    except TypeError:
        buf = array.array("I", [int(v) for v in seq])
    if buf.itemsize != 4:  # "I" is 4 bytes on every platform libkvf builds on; checked anyway
        return (c_uint32 * len(seq))(*buf)
    return (c_uint32 * len(seq)).from_buffer(buf)  # keeps buf alive
