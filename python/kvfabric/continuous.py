"""kvfabric under transformers' continuous batching (docs/python.md, "Continuous batching").

`ContinuousKV.attach(manager)` connects a `ContinuousBatchingManager` (transformers >= 5.17,
`transformers.generation.continuous_batching`) to kvfabric. The manager's `PagedAttentionCache`
keeps, per layer, one K and one V tensor of `(num_blocks + 2) * block_size` rows; a block of
`block_size` tokens is one kvfabric page, registered where it lies (no copy, no second cache).

What happens to a request:

- scheduled for the first time: transformers' own prefix sharing runs first
  (`search_prefix_match`: the blocks the GPU already holds). kvfabric is asked for the prompt's
  chunks beyond them; the blocks for what it holds are allocated in the request's block table and
  a load into them starts, layer by layer. The request then prefills only the rest.
- during the forward pass: before a layer reads the cache (`PagedAttentionCache.update`), the
  loads in flight are waited for up to that layer, so the load overlaps the layers before it.
  Where the forward pass runs without those calls (a CUDA graph, torch.compile, the decode path
  with a block table), the loads are waited for whole before it starts.
- a load that fails (a store lost, a chunk evicted): before the forward pass, the request simply
  computes what did not arrive; during it, the request's output of that step is dropped and the
  request is requeued from its prompt with kvfabric off for it: no engine ever samples from a
  block that did not arrive. Loaded blocks join the GPU's prefix sharing only once their load has
  completed.
- its prefill completed: the prompt's full chunks that kvfabric does not hold are saved (stream
  ordered after the forward pass); the blocks stay referenced until the save has read them.
- events (optional): the blocks the GPU holds are published to kvf-sched as vLLM-format KV
  events (BlockStored when a prompt's blocks are complete, BlockRemoved when the block manager
  reuses them), the same stream kvf-engine publishes.

Only the manager's documented objects and their methods are wrapped, on the instances: the
cache's `search_prefix_match`, `update`, `free_blocks` and the block manager's eviction; the
processor's `prepare_batch_update` and `compute_batch`. transformers itself is not modified.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .connector import Connector, Transfer, pages_from_tensors
from .errors import KvfError, Miss
from .events import Events, hash_blocks
from .layout import Layout


@dataclass
class _Load:
    request_id: str
    xfer: Transfer
    blocks: List[int]        # the blocks the load writes (the request's own, newly allocated)
    first_block: int         # index in the request's block table of blocks[0]
    tokens: int              # tokens covered once the load lands (GPU-shared + loaded)
    started: float
    hashes: List[int] = field(default_factory=list)   # transformers' hashes of the blocks
    sharers: set = field(default_factory=set)         # requests sharing the blocks in flight
    waited: int = -1         # the last layer waited for
    bad_layer: Optional[int] = None
    note: str = ""


@dataclass
class RequestRecord:
    """What kvfabric did for one request (ContinuousKV.records)."""

    request_id: str
    prompt_tokens: int
    gpu_shared_tokens: int = 0     # transformers' own prefix sharing
    inflight_shared_tokens: int = 0  # blocks another request was loading, shared
    kvf_cached_tokens: int = 0     # what kvfabric held (lookup)
    loaded_tokens: int = 0         # loaded into the request's blocks
    load_s: float = 0.0
    whole_wait: bool = False       # waited for before the forward pass (no per-layer overlap)
    failed_layer: Optional[int] = None
    requeued: bool = False
    saved_tokens: int = 0
    notes: List[str] = field(default_factory=list)


class ContinuousKV:
    """kvfabric for a transformers `ContinuousBatchingManager`.

    The connector's layout must describe the model's KV as the cache holds it: page_tokens equal
    to the manager's block_size and chunk_tokens a multiple of it; dtype the model's.
    """

    def __init__(self, connector: Connector, layout: Layout, load: bool = True, save: bool = True,
                 events: Optional[Events] = None, event_block_tokens: int = 0) -> None:
        self.cn, self.layout = connector, layout
        self.load_enabled, self.save_enabled = load, save
        self.events = events
        self.event_block_tokens = event_block_tokens or layout.page_tokens
        self.records: Dict[str, RequestRecord] = {}   # the latest max_records requests
        self.max_records = 4096
        self.stats = {"lookups": 0, "loads": 0, "loaded_tokens": 0, "load_failures": 0,
                      "requeued": 0, "saves": 0, "saved_tokens": 0, "save_failures": 0,
                      "gpu_shared_tokens": 0, "inflight_shared_tokens": 0,
                      "whole_waits": 0, "stall_s": 0.0, "rescheduled": 0}
        self._cache: Any = None
        self._proc: Any = None
        self._pending: Dict[str, _Load] = {}
        self._inflight: Dict[int, tuple] = {}     # block hash -> (block, its load)
        self._range: Dict[str, tuple] = {}        # request -> (first, end) blocks from kvfabric
        self._sharing: Dict[str, _Load] = {}      # request -> its load whose blocks are offered
        self._failed: Dict[str, _Load] = {}
        self._no_load: set = set()
        self._fence: Any = None
        self._updating = False
        self._known: Dict[str, int] = {}
        self._held_refs: "queue.Queue[List[int]]" = queue.Queue()
        self._saves: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._saver: Optional[threading.Thread] = None
        self._saving = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._ev_blocks: Dict[int, List[int]] = {}
        self._ev_count: Dict[int, int] = {}

    # ------------------------------------------------------------------ attaching

    def attach(self, manager: Any) -> None:
        """Connects to `manager` (before `start()` or `warmup()`): its batch processor, made when
        the manager starts, is connected as it is made."""
        make = manager._create_batch_processor

        def create() -> Any:
            bp = make()
            self.attach_processor(bp)
            return bp

        manager._create_batch_processor = create
        if getattr(manager, "batch_processor", None) is not None:
            self.attach_processor(manager.batch_processor)

    def attach_processor(self, bp: Any) -> None:
        """Connects a `ContinuousBatchProcessor` (its cache, scheduler, inputs and model runner)."""
        if self._proc is bp:
            return
        cache = bp.cache
        L = self.layout
        if cache.block_size != L.page_tokens:
            raise ValueError(f"layout page_tokens {L.page_tokens} != the cache's block_size "
                             f"{cache.block_size}: one kvfabric page is one block")
        if L.chunk_tokens % cache.block_size:
            raise ValueError(f"layout chunk_tokens {L.chunk_tokens} is not a multiple of the "
                             f"cache's block_size {cache.block_size}")
        if getattr(cache, "num_groups", 1) != 1 or cache.num_sliding_attention_groups:
            raise ValueError("kvfabric's continuous batching needs a model of full attention "
                             "layers only (one layer group), as transformers' prefix sharing does")
        if not cache.use_prefix_sharing:
            raise ValueError("the cache does not share prefixes (allow_block_sharing=False): "
                             "kvfabric's loads enter through transformers' prefix match")
        if self.event_block_tokens and cache.block_size % self.event_block_tokens:
            raise ValueError("the cache's block_size must be a multiple of event_block_tokens")
        nb = cache.key_cache[0].shape[0] // cache.block_size
        shape = (nb, cache.block_size, cache.num_key_value_heads, cache.head_dim)
        by_layer = []
        for layer in range(L.layers):
            _, j = cache.layer_index_to_group_indices[layer]
            by_layer.append((cache.key_cache[j].view(shape), cache.value_cache[j].view(shape)))
        self._regs = pages_from_tensors(L, by_layer)
        self.cn.register(self._regs)
        self._cache, self._proc = cache, bp
        self._wrap(bp)

    def _wrap(self, bp: Any) -> None:
        cache, io, mr = bp.cache, bp.inputs_and_outputs, bp.model_runner
        bm = cache._block_manager
        search, update, free = cache.search_prefix_match, cache.update, cache.free_blocks
        batch_update, compute, apply = io.prepare_batch_update, mr.compute_batch, bp.update_batch
        make_room, dedup = bm.has_enough_free_blocks, bm.uninitialize_unshared_block

        def search_prefix_match(request_id: str, prompt_ids: List[int]) -> int:
            shared = search(request_id, prompt_ids)
            return self._search(request_id, list(prompt_ids), shared)

        def update_(*a: Any, **kw: Any) -> Any:
            if self._pending:
                self._wait_layer(kw["layer_idx"] if "layer_idx" in kw else a[2])
            return update(*a, **kw)

        def free_blocks(request_id: str) -> None:
            load = self._pending.get(request_id)
            if load is not None:  # cancelled with its load in flight: the blocks are written
                self._finish(load, self.layout.layers - 1)
                self._failed.pop(request_id, None)
            if request_id in self._sharing:
                self._forget_inflight(self._sharing[request_id])
            self._range.pop(request_id, None)
            free(request_id)
            self._after_free()

        def prepare_batch_update() -> Any:
            out = batch_update()
            # only on update_batch's path (an error path reads the batch too, to fail it)
            return self._batch_update(*out) if self._updating else out

        def update_batch() -> Any:
            self._updating = True
            try:
                return apply()
            finally:
                self._updating = False

        def compute_batch(model: Any, batch_data: Any) -> Any:
            if self._pending and not self._hooks_run(mr, io):
                self.stats["whole_waits"] += 1
                self._wait_all(whole=True)
            return compute(model, batch_data)

        def has_enough_free_blocks(n_blocks: int) -> bool:
            before = set(bm._init_block_ids) if len(bm._uninit_block_ids) < n_blocks else None
            ok = make_room(n_blocks)
            if before is not None and self._ev_blocks:
                self._drop_events(before - set(bm._init_block_ids))
            return ok

        def uninitialize_unshared_block(block_id: int) -> None:
            b = bm._id_to_block.get(block_id)
            if b is not None and b.ref_count > 1:
                # a loaded block other requests shared while it was in flight, found complete
                # elsewhere already: this request moves to that one (transformers' rule), the
                # others keep this one, incomplete again, until they let it go the same way
                b.hash = None
                b.ref_count -= 1
                return
            dedup(block_id)
            self._drop_events([block_id])

        cache.search_prefix_match, cache.update, cache.free_blocks = (
            search_prefix_match, update_, free_blocks)
        io.prepare_batch_update, mr.compute_batch = prepare_batch_update, compute_batch
        bp.update_batch = update_batch
        bm.has_enough_free_blocks = has_enough_free_blocks
        bm.uninitialize_unshared_block = uninitialize_unshared_block

    # ------------------------------------------------------------------ loads

    def _compute_stream(self) -> Any:
        s = getattr(self._proc.inputs_and_outputs, "compute_stream", None)
        if s is None and self._is_cuda():
            import torch
            s = torch.cuda.current_stream(self._cache.device)
        return s

    def _is_cuda(self) -> bool:
        return str(self._cache.key_cache[0].device).startswith("cuda")

    def _after_free(self) -> None:
        # Blocks freed now may still be written by a forward pass in flight (asynchronous
        # batching); a load into them later must not race it: the next load waits for this.
        if self._is_cuda():
            import torch
            ev = torch.cuda.Event()
            ev.record(self._compute_stream())
            self._fence = ev

    def _hooks_run(self, mr: Any, io: Any) -> bool:
        """Whether the next forward pass calls the cache's update() layer by layer (eager varlen
        path) rather than a CUDA graph, a compiled function or the block-table decode path."""
        use_table = bool(getattr(io, "use_block_table", False))
        if use_table:
            return False
        fn, graph = mr._get_forward_fn(use_block_table=False)
        return not graph and fn == mr._forward_process_and_sample

    def _search(self, rid: str, tokens: List[int], shared: int) -> int:
        """After transformers' own match (`shared` tokens in its complete blocks): blocks other
        requests are loading now (shared, as transformers shares complete ones), then a load of
        what kvfabric holds beyond. Returns the tokens the request does not compute."""
        self._release_refs()
        C, P = self.layout.chunk_tokens, self.layout.page_tokens
        rec = self.records.get(rid)
        if rec is None:
            while len(self.records) >= self.max_records:
                del self.records[next(iter(self.records))]
            rec = self.records[rid] = RequestRecord(rid, len(tokens))
        else:  # matched again: requeued after a failed load, or reset by transformers' offloading
            self.stats["rescheduled"] += 1
            rec.prompt_tokens = len(tokens)
        rec.gpu_shared_tokens = shared
        self.stats["gpu_shared_tokens"] += shared
        full = len(tokens) // C * C
        if full <= shared:      # all in the GPU's blocks: whoever computed them saved them
            self._known[rid] = full
        if not self.load_enabled or rid in self._no_load or full <= shared:
            return shared
        cache, cm = self._cache, self._cache.group_cache_managers[0]
        bm = cache._block_manager
        # transformers' block hashes (chained from the first block), for the blocks in flight
        hashes, h = [], None
        for i in range(len(tokens) // P):
            h = bm.compute_hash(h, tokens[i * P:(i + 1) * P], 0)
            hashes.append(h)
        begin = shared // P
        ext = []
        for i in range(begin, len(hashes)):
            e = self._inflight.get(hashes[i])
            if e is None:
                break
            ext.append(e)
        if ext:
            table = cm.block_table.setdefault(rid, [])
            for b, load in ext:
                bm.increase_ref_count(b)
                table.append(b)
                load.sharers.add(rid)
            shared += len(ext) * P
            rec.inflight_shared_tokens = len(ext) * P
            self.stats["inflight_shared_tokens"] += len(ext) * P
            self._range[rid] = (begin, shared // P, len(tokens))
        if full <= shared:
            self._known[rid] = full
            return shared
        try:
            self.stats["lookups"] += 1
            cached = self.cn.lookup(tokens[:full])
        except KvfError as e:
            rec.notes.append(f"lookup: {e}")
            return shared
        rec.kvf_cached_tokens = self._known[rid] = cached
        first = shared // C                     # chunks wholly in the GPU's own blocks
        if cached <= shared:
            return shared
        keep = first * C // P                   # the GPU's blocks kept (whole chunks)
        table = cm.block_table.get(rid, [])
        new = cached // P - keep
        if cache.get_num_free_blocks() < new + (len(table) - keep):
            rec.notes.append("no free blocks for the load: computed instead")
            return shared
        if len(table) > keep:                   # a chunk partly shared: load it whole instead
            bm.free_blocks(table[keep:], shareable=True)
            del table[keep:]
        if cache.allocate_blocks(new, rid, keep) is None:
            rec.notes.append("allocation failed: computed instead")
            self._trim_range(rid, keep)
            return keep * P
        table = cm.block_table[rid]
        if self._fence is not None:
            self._fence.synchronize()
            self._fence = None
        try:
            self.cn.take(self._regs)  # another user of the connector may have registered since
            x = self.cn.load(tokens[:cached], table[: cached // P], first_chunk=first)
        except KvfError as e:
            self._unload(rid, keep)
            self._known[rid] = first * C
            rec.notes.append(f"load: {e}")
            return keep * P
        load = _Load(rid, x, table[keep: cached // P], keep, cached, time.perf_counter())
        load.hashes = hashes[keep: cached // P]
        self.stats["loads"] += 1
        b0 = self._range.get(rid, (keep,))[0]
        self._range[rid] = (min(b0, keep), cached // P, len(tokens))
        if not self._hooks_run(self._proc.model_runner, self._proc.inputs_and_outputs):
            # no per-layer calls in this forward pass: the load lands before the batch is made
            rec.whole_wait = True
            self._finish(load, self.layout.layers - 1)
            if load.bad_layer is not None:
                self._failed.pop(rid, None)
                self._unload(rid, keep)
                self._trim_range(rid, keep)
                self._known[rid] = first * C
                return keep * P
            return cached
        for hb, b in zip(load.hashes, load.blocks):
            self._inflight[hb] = (b, load)
        self._sharing[rid] = load
        self._pending[rid] = load
        return cached

    def _trim_range(self, rid: str, end: int) -> None:
        r = self._range.get(rid)
        if r is not None:
            if r[0] >= end:
                del self._range[rid]
            else:
                self._range[rid] = (r[0], min(r[1], end), r[2])

    def _forget_inflight(self, load: _Load) -> None:
        if self._sharing.get(load.request_id) is load:
            del self._sharing[load.request_id]
        for hb in load.hashes:
            e = self._inflight.get(hb)
            if e is not None and e[1] is load:
                del self._inflight[hb]

    def _unload(self, rid: str, keep: int) -> None:
        """Gives back the blocks allocated for a load (not yet complete, never shared)."""
        table = self._cache.group_cache_managers[0].block_table[rid]
        self._cache._block_manager.free_blocks(table[keep:], shareable=True)
        del table[keep:]
        if not table:
            del self._cache.group_cache_managers[0].block_table[rid]

    def _finish(self, load: _Load, upto: int) -> None:
        """Waits for layers up to `upto` of a load; the last layer completes it."""
        L = self.layout.layers
        if load.bad_layer is None:
            layer = load.waited + 1
            try:
                for layer in range(load.waited + 1, upto + 1):
                    load.xfer.wait_layer(layer)
                    load.waited = layer
            except Miss as e:
                load.bad_layer, load.note = layer, str(e)
        if upto < L - 1 and load.bad_layer is None:
            return
        self._pending.pop(load.request_id, None)
        rec = self.records.get(load.request_id)
        if load.bad_layer is None:
            try:
                load.xfer.wait()
            except Miss as e:
                load.bad_layer, load.note = L - 1, str(e)
        dt = time.perf_counter() - load.started
        load.xfer.close()
        if load.bad_layer is None:
            n = len(load.blocks) * self.layout.page_tokens
            self.stats["loaded_tokens"] += n
            if rec is not None:
                rec.loaded_tokens, rec.load_s = n, dt
        else:
            self.stats["load_failures"] += 1
            self._forget_inflight(load)
            for r in [load.request_id, *load.sharers]:  # all who read these blocks redo
                self._failed[r] = load
                rr = self.records.get(r)
                if rr is not None:
                    rr.failed_layer = load.bad_layer
                    rr.notes.append(load.note)

    def _wait_layer(self, layer: int) -> None:
        t = time.perf_counter()
        for load in list(self._pending.values()):
            self._finish(load, layer)
        self.stats["stall_s"] += time.perf_counter() - t

    def _wait_all(self, whole: bool = False) -> None:
        t = time.perf_counter()
        for load in list(self._pending.values()):
            rec = self.records.get(load.request_id)
            if whole and rec is not None:
                rec.whole_wait = True
            self._finish(load, self.layout.layers - 1)
        self.stats["stall_s"] += time.perf_counter() - t

    # ------------------------------------------------------------------ after a forward pass

    def _batch_update(self, requests: Any, tokens: Any, logprobs: Any) -> Any:
        """Runs on the generation thread once the outputs of a forward pass are known, before
        transformers applies them: drops the outputs of requests whose load failed during it
        (and requeues them), marks landed loads' blocks complete, saves completed prompts."""
        self._release_refs()
        sched = self._proc.scheduler
        keep_reqs, keep_tokens, keep_lp, requeue = [], [], [], []
        i = 0
        for fs in requests:
            st = fs.state
            rid = st.request_id
            has = fs.has_new_token
            if rid in self._failed:
                requeue.append(st)
                i += 1 if has else 0
                continue
            n = self._joining(rid)
            if n:  # marked now, in the batch's order: the next request's marking sees them
                self._cache.mark_shareable_blocks_as_complete(st, n)
            if has and st.generated_len() == 0:
                self._prompt_done(st)
            keep_reqs.append(fs)
            if has:
                keep_tokens.append(tokens[i])
                if logprobs is not None:
                    keep_lp.append(logprobs[i])
                i += 1
        # a failed load of a request not in this batch (its allocation failed after the match)
        for rid in list(self._failed):
            st = sched.active_requests.get(rid)
            if st is None:               # no longer active (cancelled): nothing to redo
                self._failed.pop(rid)
            elif all(s is not st for s in requeue):
                requeue.append(st)
        for st in requeue:
            self._requeue(st)
        return keep_reqs, keep_tokens, (keep_lp if logprobs is not None else None)

    def _joining(self, rid: str) -> int:
        """The blocks of a request that came from kvfabric (loaded, or shared while loading),
        in by now, to mark complete (hashed for transformers' prefix sharing) before
        transformers marks those its forward pass completed. Its marking takes the incomplete
        blocks after the last complete one, in order: kvfabric's range comes first, and what
        another request marked already is not counted again (so its own count stays its own)."""
        r = self._range.pop(rid, None)
        if rid in self._sharing:
            self._forget_inflight(self._sharing[rid])
        if r is None:
            return 0
        begin, end, n_tokens = r
        if end * self.layout.page_tokens >= n_tokens:
            end -= 1  # the prompt's last block: recomputed from its last token, counted by it
        table = self._cache.group_cache_managers[0].block_table.get(rid, [])
        blocks = self._cache._block_manager._id_to_block
        last = -1
        for i in range(len(table) - 1, -1, -1):
            b = blocks.get(table[i])
            if b is not None and b.hash is not None:
                last = i
                break
        return max(0, end - max(begin, last + 1))

    def _requeue(self, st: Any) -> None:
        """A request whose load failed: its step is dropped; it starts again from its prompt,
        computing everything (its blocks are released, never hashed for sharing)."""
        rid = st.request_id
        self._failed.pop(rid, None)
        self._range.pop(rid, None)
        self._known.pop(rid, None)
        self._no_load.add(rid)
        self.stats["requeued"] += 1
        rec = self.records.get(rid)
        if rec is not None:
            rec.requeued = True
        sched = self._proc.scheduler
        fresh = st.create_equivalent_initial_request()
        fresh.initial_tokens = st.initial_tokens[:]  # nothing generated from the failed step
        fresh.remaining_prefill_tokens = fresh.initial_tokens[:]
        if st.max_new_tokens is not None:
            fresh.max_new_tokens = st.max_new_tokens
            fresh._new_tokens_limit = st.max_new_tokens
        fresh._true_initial_tokens = st._true_initial_tokens
        fresh.created_time = st.created_time
        st._status = type(st._status).FINISHED  # transformers' RequestStatus
        sched.finish_request(rid)
        sched.add_waiting_request(fresh)

    def _prompt_done(self, st: Any) -> None:
        tokens = list(st.initial_tokens)
        rid = st.request_id
        cm = self._cache.group_cache_managers[0]
        table = cm.block_table.get(rid)
        if table is None:
            return
        self._publish_held(tokens, table)
        if not self.save_enabled:
            return
        C, P = self.layout.chunk_tokens, self.layout.page_tokens
        full = len(tokens) // C * C
        rec = self.records.get(rid)
        have = self._known.pop(rid, None)
        if full and have is None:
            try:
                have = self.cn.lookup(tokens[:full])
            except KvfError:
                have = 0
        first = (have or 0) // C
        if full == 0 or first * C >= full:
            return
        pages = table[: full // P]
        try:
            self.cn.take(self._regs)
            sv = self.cn.save(tokens[:full], pages, first_chunk=first)
            stream = self._compute_stream()
            for layer in range(self.layout.layers):
                sv.layer_done(layer, stream)
        except KvfError as e:
            self.stats["save_failures"] += 1
            if rec is not None:
                rec.notes.append(f"save: {e}")
            return
        held = pages[first * C // P:]
        bm = self._cache._block_manager
        for b in held:  # the save reads these: nobody reuses them until it has
            bm.increase_ref_count(b)
        n = full - first * C
        if rec is not None:
            rec.saved_tokens = n
        with self._lock:
            self._saving += 1
        self._saves.put((sv, held, n, rid))
        if self._saver is None:
            self._saver = threading.Thread(target=self._save_loop, name="kvf-cb-save", daemon=True)
            self._saver.start()

    def _save_loop(self) -> None:
        while True:
            item = self._saves.get()
            if item is None:
                return
            sv, held, n, rid = item
            ok = True
            try:
                sv.wait_pages()
            except KvfError:
                ok = False
            self._held_refs.put(held)
            try:
                sv.wait()
            except KvfError:
                ok = False
            sv.close()
            with self._lock:
                if ok:
                    self.stats["saves"] += 1
                    self.stats["saved_tokens"] += n
                else:
                    self.stats["save_failures"] += 1
                self._saving -= 1
                self._idle.notify_all()

    def _release_refs(self) -> None:
        """On the generation thread: drops the references of saves that have read their pages."""
        bm = self._cache._block_manager if self._cache is not None else None
        while True:
            try:
                held = self._held_refs.get_nowait()
            except queue.Empty:
                return
            for b in held:
                bm.decrease_ref_count(b)

    # ------------------------------------------------------------------ KV events

    def _publish_held(self, tokens: List[int], table: List[int]) -> None:
        if self.events is None:
            return
        E, P = self.event_block_tokens, self.layout.page_tokens
        k = P // E
        nb = len(tokens) // P
        if nb == 0:
            return
        hashes = hash_blocks(tokens[: nb * P], E)
        start = None
        for i in range(nb):
            b = table[i]
            if b in self._ev_blocks:
                continue
            mine = hashes[i * k:(i + 1) * k]
            self._ev_blocks[b] = mine
            for h in mine:
                self._ev_count[h] = self._ev_count.get(h, 0) + 1
            if start is None:
                start = i
        if start is None:
            return
        s = start * k
        self.events.publish(stored=hashes[s:], parent=hashes[s - 1] if s else None,
                            tokens=tokens[s * E: len(hashes) * E], block_tokens=E)

    def _drop_events(self, block_ids: Any) -> None:
        removed = []
        for b in block_ids:
            for h in self._ev_blocks.pop(b, ()):
                c = self._ev_count.get(h, 0) - 1
                if c <= 0:
                    self._ev_count.pop(h, None)
                    removed.append(h)
                else:
                    self._ev_count[h] = c
        if removed and self.events is not None:
            self.events.publish(removed=removed, block_tokens=self.event_block_tokens)

    # ------------------------------------------------------------------ end

    def drain(self, timeout: float = 60.0) -> bool:
        """Waits until every save started has been stored (or failed); True if none is left."""
        end = time.monotonic() + timeout
        with self._lock:
            while self._saving:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Waits for the saves in flight and stops the saving thread (after the manager stopped)."""
        self.drain(timeout)
        for load in list(self._pending.values()):
            self._finish(load, self.layout.layers - 1)
        if self._saver is not None:
            self._saves.put(None)
            self._saver.join(timeout)
            self._saver = None
        if self._cache is not None:
            self._release_refs()
