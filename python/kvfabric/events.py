"""An engine's KV events (kvf/events.h): what its own KV pages hold, published as vLLM's engines
publish them (ZeroMQ PUB, BlockStored / BlockRemoved), so that kvf-sched places requests where
their prefix already is. The socket, the encoding and the CURVE security are libkvf's."""

from __future__ import annotations

import ctypes
from typing import List, Optional, Sequence

from . import _lib
from .connector import _Handle
from .errors import check


def hash_blocks(tokens: Sequence[int], block_tokens: int, parent: int = 0) -> List[int]:
    """The chain of block hashes of the whole blocks of tokens (kvf-sched's prefix hash), from
    parent (0: the sequence's start)."""
    n = len(tokens) // block_tokens
    if n == 0:
        return []
    out = (ctypes.c_uint64 * n)()
    check(_lib.lib().kvf_events_hash_blocks(_lib.u32_array(tokens[: n * block_tokens]), n,
                                            block_tokens, parent, out), "hash_blocks")
    return list(out)


def _u64(values: Sequence[int]) -> "ctypes.Array":
    return (ctypes.c_uint64 * max(len(values), 1))(*values)


class Events(_Handle):
    """A KV events publisher bound on `listen` ("host:port"; port 0: a free one). With
    `credential` and `tenants` it is secured by CURVE (docs/security.md, "KV events"). With
    `replay` ("host:port") it keeps the last `replay_batches` batches and answers replay
    requests for them there (a subscriber that joined late or saw a gap). With `shards` N > 1
    each sequence's events go under its shard's topic, for kvf-sched replicas run with
    --shard K/N (docs/scale.md), and the publisher remembers at most `shard_roots_max` blocks
    (0: 16M; past it every shard is told AllBlocksCleared, docs/security.md)."""

    _kind, _free_fn = "events publisher", "kvf_events_close"

    def __init__(self, listen: str, credential: Optional[str] = None,
                 tenants: Optional[str] = None, tenant_credential: Optional[str] = None,
                 replay: Optional[str] = None, replay_batches: int = 0,
                 shards: int = 1, shard_roots_max: int = 0) -> None:
        self._h = None
        o = _lib.EventsOpts()
        o.listen = listen.encode()
        o.credential = credential.encode() if credential else None
        o.tenants = tenants.encode() if tenants else None
        o.tenant_credential = tenant_credential.encode() if tenant_credential else None
        o.replay = replay.encode() if replay else None
        o.replay_batches = replay_batches
        o.shards = shards
        o.shard_roots_max = shard_roots_max
        h = ctypes.c_void_p()
        err = ctypes.create_string_buffer(400)
        check(_lib.lib().kvf_events_open(ctypes.byref(h), ctypes.byref(o), err, len(err)),
              "events", err.value.decode())
        self._h = h

    @property
    def endpoint(self) -> str:
        """The bound endpoint, "tcp://host:port": what the engine registers with kvf-sched."""
        return _lib.lib().kvf_events_endpoint(self._handle()).decode()

    @property
    def replay_endpoint(self) -> str:
        """The replay socket's endpoint ("" without one): registered with kvf-sched."""
        return _lib.lib().kvf_events_replay_endpoint(self._handle()).decode()

    @property
    def topic(self) -> str:
        return _lib.lib().kvf_events_topic(self._handle()).decode()

    @property
    def sequence(self) -> int:
        """Batches published so far."""
        return int(_lib.lib().kvf_events_sequence(self._handle()))

    @property
    def unknown_parents(self) -> int:
        """Continuations a sharded publisher was given whose parent it never stored."""
        return int(_lib.lib().kvf_events_unknown_parents(self._handle()))

    def clear(self, forget: bool = True) -> None:
        """Publishes AllBlocksCleared (in every shard when sharded): subscribers drop this
        engine's blocks. forget: the engine holds nothing any more (its blocks' shards are
        forgotten too); False: events were lost on the way and the engine still holds blocks."""
        check(_lib.lib().kvf_events_clear(self._handle(), 1 if forget else 0), "events clear")

    def publish(self, removed: Sequence[int] = (), stored: Sequence[int] = (),
                parent: Optional[int] = None, tokens: Sequence[int] = (), block_tokens: int = 16,
                medium: str = "GPU") -> None:
        """One batch: BlockRemoved for `removed`, then BlockStored for `stored` (whose tokens are
        len(stored) * block_tokens ids, following the block hashed `parent`, None: a sequence's
        start)."""
        if len(tokens) != len(stored) * block_tokens:
            raise ValueError("tokens must be len(stored) * block_tokens ids")
        check(_lib.lib().kvf_events_publish(
            self._handle(), _u64(removed), len(removed), _u64(stored), len(stored),
            parent is not None, parent or 0, _lib.u32_array(tokens), block_tokens,
            medium.encode()), "events publish")


def shard_of(first_block_hash: int, shards: int) -> int:
    """The shard (0..shards-1) of the sequences whose first block hashes to first_block_hash:
    where their events go with Events(shards=...), and which kvf-sched --shard K/N replica places
    them (0 where shards < 2)."""
    return int(_lib.lib().kvf_events_shard_of(first_block_hash, shards))


class HeldBlocks:
    """What an engine's pages hold, as published: set() the tokens a sequence now holds and the
    blocks that changed are published (removed, then stored), as kvf-engine does."""

    def __init__(self, events: Optional[Events], block_tokens: int) -> None:
        self.events, self.block_tokens = events, block_tokens
        self.hashes: List[int] = []

    def set(self, tokens: Sequence[int]) -> None:
        P = self.block_tokens
        new = hash_blocks(tokens, P)
        common = 0
        while common < len(new) and common < len(self.hashes) and new[common] == self.hashes[common]:
            common += 1
        if self.events is not None and (common < len(self.hashes) or common < len(new)):
            self.events.publish(removed=self.hashes[common:], stored=new[common:],
                                parent=new[common - 1] if common else None,
                                tokens=list(tokens[common * P: len(new) * P]), block_tokens=P)
        self.hashes = new
