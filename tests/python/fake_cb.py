"""A miniature of transformers' continuous batching, for the CPU tests of kvfabric.continuous:
the objects and methods it wraps (a PagedAttentionCache with per-layer K and V tensors of
(num_blocks + 2) * block_size rows, its block manager with prefix hashes and reference counts,
search_prefix_match, update; a batch processor whose update_batch reads prepare_batch_update and
whose model runner runs the forward pass), with the same bookkeeping rules, on the tiny model's
weights. CI has no transformers; the real manager is exercised by bench/hf_cb.py on the GPU."""

from enum import IntEnum

import torch


class Status(IntEnum):
    PENDING = 0
    PREFILLING = 1
    DECODING = 3
    FINISHED = 4


class State:
    def __init__(self, rid, tokens, max_new):
        self.request_id, self.initial_tokens, self.max_new_tokens = rid, list(tokens), max_new
        self._new_tokens_limit = max_new
        self.generated_tokens, self.position_offset, self.allocated_blocks = [], 0, 0
        self.remaining_prefill_tokens, self.tokens_to_process = list(tokens), []
        self._status, self._true_initial_tokens, self.created_time = Status.PENDING, 0, 0.0

    def generated_len(self):
        return len(self.generated_tokens)

    def create_equivalent_initial_request(self):
        s = State(self.request_id, self.initial_tokens + self.generated_tokens,
                  self.max_new_tokens - len(self.generated_tokens))
        s._true_initial_tokens = len(self.initial_tokens)
        return s


class Block:
    def __init__(self, i):
        self.id, self.hash, self.ref_count = i, None, 1


class BlockManager:
    def __init__(self, n):
        self._uninit_block_ids, self._init_block_ids = list(range(n)), {}
        self._hash_to_id, self._id_to_block = {}, {}

    @property
    def num_free_blocks(self):
        return len(self._uninit_block_ids) + len(self._init_block_ids)

    def has_enough_free_blocks(self, n):
        while len(self._uninit_block_ids) < n and self._init_block_ids:
            b = self._id_to_block.pop(self._init_block_ids.popitem()[0])
            self._hash_to_id.pop(b.hash)
            self._uninit_block_ids.append(b.id)
        return len(self._uninit_block_ids) >= n

    def get_free_blocks(self, n):
        if not self.has_enough_free_blocks(n):
            return None
        ids = [self._uninit_block_ids.pop(0) for _ in range(n)]
        for i in ids:
            self._id_to_block[i] = Block(i)
        return ids

    def increase_ref_count(self, i):
        b = self._id_to_block[i]
        b.ref_count += 1
        if b.ref_count == 1:
            self._init_block_ids.pop(i)

    def decrease_ref_count(self, i):
        b = self._id_to_block[i]
        b.ref_count -= 1
        if b.ref_count == 0:
            if b.hash is not None:
                self._init_block_ids[i] = None
            else:
                self._id_to_block.pop(i)
                self._uninit_block_ids.append(i)

    def free_blocks(self, ids, shareable):
        for i in ids:
            self.decrease_ref_count(i)

    def uninitialize_unshared_block(self, i):
        if self._id_to_block[i].ref_count > 1:  # as transformers
            raise RuntimeError(f"Block {i} has more than one reference")
        self._id_to_block.pop(i)
        self._uninit_block_ids.append(i)

    @staticmethod
    def compute_hash(parent, tokens, group):
        return hash((parent, tuple(tokens), group))

    def mark_complete(self, n, table, tokens, bs, computed):
        """transformers' rule: the incomplete blocks after the last complete one, in order, the
        first n of them hashed (deduplicated against an equal complete block)."""
        parent, last = None, -1
        for i in range(len(table) - 1, -1, -1):
            if self._id_to_block[table[i]].hash is not None:
                parent, last = self._id_to_block[table[i]].hash, i
                break
        for i in range(last + 1, len(table)):
            if n == 0:
                return
            n -= 1
            # the invariant sharing rests on: a block is hashed once all its KV is computed
            assert (i + 1) * bs <= computed, f"block {i} hashed with {computed} tokens computed"
            bid = table[i]
            b = self._id_to_block[bid]
            b.hash = self.compute_hash(parent, tokens[i * bs:(i + 1) * bs], 0)
            other = self._hash_to_id.get(b.hash)
            if other is not None and other != bid:
                table[i] = other
                self.increase_ref_count(other)
                self.uninitialize_unshared_block(bid)
            else:
                self._hash_to_id[b.hash] = bid
            parent = b.hash


class CM:
    def __init__(self):
        self.block_table, self.uses_block_sharing = {}, True

    def allocate_blocks(self, n, rid, bm):
        ids = bm.get_free_blocks(n)
        if ids is None:
            return None
        self.block_table.setdefault(rid, []).extend(ids)
        return n


class Cache:
    def __init__(self, layout, num_blocks):
        self.block_size, self.num_blocks = layout.page_tokens, num_blocks
        self.num_key_value_heads, self.head_dim = layout.kv_heads, layout.head_dim
        rows = (num_blocks + 2) * self.block_size
        self.key_cache = [torch.zeros(rows, layout.kv_heads, layout.head_dim)
                          for _ in range(layout.layers)]
        self.value_cache = [torch.zeros_like(k) for k in self.key_cache]
        self.layer_index_to_group_indices = {i: (0, i) for i in range(layout.layers)}
        self.num_groups, self.num_sliding_attention_groups = 1, 0
        self.use_prefix_sharing = self.allow_block_sharing = True
        self.group_cache_managers = [CM()]
        self._block_manager = BlockManager(num_blocks)
        self.device = "cpu"

    def get_num_free_blocks(self):
        return self._block_manager.num_free_blocks

    def allocate_blocks(self, n, rid, allocated):
        if n > self.get_num_free_blocks():
            return None
        return self.group_cache_managers[0].allocate_blocks(n, rid, self._block_manager)

    def free_blocks(self, rid):
        self._block_manager.free_blocks(self.group_cache_managers[0].block_table.pop(rid, []), True)

    def search_prefix_match(self, rid, tokens):
        bm, bs, h, ids = self._block_manager, self.block_size, None, []
        for b in range(len(tokens) // bs):
            h = bm.compute_hash(h, tokens[b * bs:(b + 1) * bs], 0)
            i = bm._hash_to_id.get(h)
            if i is None:
                break
            bm.increase_ref_count(i)
            ids.append(i)
        if ids:
            self.group_cache_managers[0].block_table[rid] = ids
        return len(ids) * bs

    def mark_shareable_blocks_as_complete(self, st, n):
        table = self.group_cache_managers[0].block_table.get(st.request_id)
        if n and table is not None and st._status != Status.FINISHED:
            self._block_manager.mark_complete(n, table, st.initial_tokens + st.generated_tokens,
                                              self.block_size, st.position_offset)

    def rows(self, rid, begin, end):
        t, bs = self.group_cache_managers[0].block_table[rid], self.block_size
        return torch.tensor([t[p // bs] * bs + p % bs for p in range(begin, end)])

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        k = key_states.transpose(1, 2).squeeze(0)
        v = value_states.transpose(1, 2).squeeze(0)
        self.key_cache[layer_idx].index_copy_(0, write_index, k)
        self.value_cache[layer_idx].index_copy_(0, write_index, v)
        return (self.key_cache[layer_idx].index_select(0, read_index),
                self.value_cache[layer_idx].index_select(0, read_index))


class Future:
    def __init__(self, st, complete_blocks):
        self.state, self.has_new_token, self.complete_blocks = st, True, complete_blocks


class IO:
    compute_stream, use_block_table = None, False

    def __init__(self):
        self.requests, self.tokens = [], []

    def prepare_batch_update(self):
        return self.requests, self.tokens, None


class Runner:
    def __init__(self, model, cache, io):
        self.model, self.cache, self.io = model, cache, io

    def _forward_process_and_sample(self, model, futures):
        L, out = self.model.layout, []
        batch = [f.state for f in futures]
        xs = [self.model.emb[torch.tensor(st.tokens_to_process)] for st in batch]
        for li in range(L.layers):
            p = self.model.layers[li]
            for j, st in enumerate(batch):
                x, n, past = xs[j], len(st.tokens_to_process), st.position_offset
                q = (x @ p["q"]).view(n, L.kv_heads, L.head_dim)
                k = (x @ p["k"]).view(1, n, L.kv_heads, L.head_dim).transpose(1, 2)
                v = (x @ p["v"]).view(1, n, L.kv_heads, L.head_dim).transpose(1, 2)
                kk, vv = self.cache.update(key_states=k, value_states=v, layer_idx=li,
                                           read_index=self.cache.rows(st.request_id, 0, past + n),
                                           write_index=self.cache.rows(st.request_id, past, past + n))
                att = torch.einsum("qhd,khd->hqk", q, kk) / L.head_dim ** 0.5
                mask = torch.arange(past + n)[None, :] > torch.arange(past, past + n)[:, None]
                att = att.masked_fill(mask, float("-inf")).softmax(-1)
                xs[j] = x + torch.einsum("hqk,khd->qhd", att, vv).reshape(n, -1) @ p["o"]
        for j, st in enumerate(batch):
            st.position_offset += len(st.tokens_to_process)
            if futures[j].has_new_token:
                out.append(int((xs[j][-1] @ self.model.emb.T).argmax()))
        self.io.tokens = out

    def _get_forward_fn(self, use_block_table):
        return self._forward_process_and_sample, False

    def compute_batch(self, model, batch):
        fn, _ = self._get_forward_fn(False)
        fn(model, batch)


class Scheduler:
    def __init__(self):
        self.active_requests, self.waiting_requests, self.order = {}, {}, []

    def add_waiting_request(self, st):
        self.waiting_requests[st.request_id] = st
        self.order.append(st.request_id)


class Processor:
    def __init__(self, model, layout, num_blocks, budget):
        self.budget = budget
        self.cache = Cache(layout, num_blocks)
        self.scheduler = Scheduler()
        self.scheduler.finish_request = self.finish_request
        self.inputs_and_outputs = IO()
        self.model_runner = Runner(model, self.cache, self.inputs_and_outputs)
        self.outputs = {}

    def finish_request(self, rid):
        self.cache.free_blocks(rid)
        self.scheduler.active_requests.pop(rid, None)

    def schedule(self):
        """transformers' order: waiting requests are matched (prefix sharing) and join the
        active ones; each active request takes what it has to process within the token budget
        (a prompt longer than what is left is split: chunked prefill)."""
        sc, c, bs = self.scheduler, self.cache, self.cache.block_size
        for rid in list(sc.order):
            st = sc.waiting_requests.pop(rid)
            sc.order.remove(rid)
            n = c.search_prefix_match(rid, st.remaining_prefill_tokens)
            st.allocated_blocks += n // bs
            n = min(n, len(st.remaining_prefill_tokens) - 1)
            st.remaining_prefill_tokens = st.remaining_prefill_tokens[n:]
            st.position_offset += n
            sc.active_requests[rid] = st
            st._status = Status.PREFILLING
        batch, budget = [], self.budget
        for st in sc.active_requests.values():
            if budget == 0:
                break
            if st._status == Status.PREFILLING:
                take = st.remaining_prefill_tokens[:budget]
                st.remaining_prefill_tokens = st.remaining_prefill_tokens[len(take):]
                st.tokens_to_process = take
                if not st.remaining_prefill_tokens:
                    st._status = Status.DECODING
                has_new = st._status == Status.DECODING
            else:
                has_new = True
            n = len(st.tokens_to_process)
            room = st.allocated_blocks * bs - st.position_offset
            if room < n or st.allocated_blocks == 0:  # transformers' rule: a block ahead
                need = (n - room + 1) // bs + 1
                assert c.allocate_blocks(need, st.request_id, st.allocated_blocks) == need
                st.allocated_blocks += need
            done = (st.position_offset % bs + n) // bs
            f = Future(st, done)
            f.has_new_token = has_new
            batch.append(f)
            budget -= n
        self.inputs_and_outputs.requests = batch
        return batch

    def update_batch(self):
        reqs, tokens, _ = self.inputs_and_outputs.prepare_batch_update()
        i = 0
        for fs in reqs:
            st = fs.state
            if st._status in (Status.FINISHED, Status.PENDING):  # as transformers in sync mode
                raise RuntimeError(f"Tried to update {st._status.name} request {st.request_id}")
            if not fs.has_new_token:  # a prompt split: its blocks computed so far
                self.cache.mark_shareable_blocks_as_complete(st, fs.complete_blocks)
                continue
            tok = tokens[i]
            i += 1
            st.generated_tokens.append(tok)
            st.tokens_to_process = [tok]
            self.cache.mark_shareable_blocks_as_complete(st, fs.complete_blocks)
            if len(st.generated_tokens) >= st._new_tokens_limit:
                st._status = Status.FINISHED
                self.outputs[st.request_id] = st.initial_tokens[st._true_initial_tokens:] \
                    if st._true_initial_tokens else []
                self.outputs[st.request_id] = self.outputs[st.request_id] + st.generated_tokens
                self.scheduler.finish_request(st.request_id)


class Manager:
    """Runs requests to the end, one step at a time (schedule, forward pass, update)."""

    def __init__(self, model, layout, num_blocks=64, budget=96):
        self.model, self.layout, self.num_blocks, self.budget = model, layout, num_blocks, budget
        self.batch_processor = None

    def _create_batch_processor(self):
        if self.batch_processor is None:
            self.batch_processor = Processor(self.model, self.layout, self.num_blocks,
                                             self.budget)
        return self.batch_processor

    def run(self, prompts, max_new, ids=None):
        bp = self._create_batch_processor()
        ids = ids or [f"r{len(bp.outputs) + i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            bp.scheduler.add_waiting_request(State(rid, p, max_new))
        for _ in range(1000):
            if not bp.scheduler.active_requests and not bp.scheduler.waiting_requests:
                break
            batch = bp.schedule()
            bp.model_runner.compute_batch(self.model, batch)
            bp.update_batch()
        return [bp.outputs[i] for i in ids]
