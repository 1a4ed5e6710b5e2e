"""python -m kvfabric.serve: a causal LM (transformers', or kvfabric.llama's in plain torch) behind
kvf-engine's HTTP API, with kvfabric: registered with kvf-sched, its load reported, its KV events
published, as a prefill-only, decode-only or colocated instance. The cluster launcher, the trace
driver and `kvf-bench e2e` drive it as they drive kvf-engine (docs/python.md).

    python3 -m kvfabric.serve --id prefill0 --role prefill --model llama-3.1-8b \\
        --sched 127.0.0.1:7300 --events 127.0.0.1:0 --device cuda

Requests (POST, JSON; token ids as arrays of integers), answered as kvf-engine answers them:
    /v1/prefill   {tokens, reuse}                        the first token, the prompt's chunks saved
    /v1/decode    {tokens, first_token, max_tokens, expect_cached}
    /v1/generate  {tokens, max_tokens, reuse}
    GET /v1/health
    GET /metrics (Prometheus text: kvf-engine's series, docs/operations.md "Metrics")
Requests are served one at a time, the waiting ones in kvf-engine's order (--queue: hrrn by
default, the highest response ratio (waited + predicted work) / predicted work first).
A request may carry kvf-sched's plan's "ticket": the load reports list it for a few seconds once
the request counts in the queue or the decodes (kvf-sched then stops adding its work itself).
Weights are random unless --checkpoint names a safetensors checkpoint.
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from . import gputurn, models
from .connector import Connector
from .engine import Engine, outcome_json
from .calibration import calibrate, seed_rates, warm_up
from .errors import KvfError
from .etcd import EtcdError, EtcdMember
from .httpapi import HttpServer, handler
from .metrics import Registry
from .turnqueue import QUEUE_DISCIPLINES, TurnQueue
from .cuda import cuda_probe
from .events import Events
from .feasibility import Caps
from .layout import Layout

REPORT_EVERY_S = 5.0
# The tickets of kvf-sched's placements listed in the load reports (as kvf-engine's): those
# counted in the queue within the last ACK_KEEP_S, the newest ACKS of them.
ACKS = 1024
ACK_KEEP_S = 5.0
MAX_TICKET = 1 << 53
# --save-parts-shm to the connector's save_parts_shm
SHM_PARTS = {"auto": None, "on": True, "off": False}


def _log(level: str, msg: str) -> None:
    sys.stderr.write(f"kvfabric.serve: {level}: {msg}\n")
    sys.stderr.flush()


def _split(addr: str, what: str) -> Tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise SystemExit(f"kvfabric.serve: {what}: expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def parse_size(text: str) -> int:
    """A size as the daemons write them: a number of bytes with an optional K, M, G or T."""
    t = str(text).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    if not digits.isdigit():
        raise ValueError(f"{text!r} is not a size such as 512M or 4G")
    return int(digits) * mult


def _size_arg(text: str) -> str:
    try:
        parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _beside_arg(text: str) -> Optional[int]:
    try:
        n = None if text == "off" else int(text)
    except ValueError:
        n = 0
    if n is not None and n < 1:
        raise argparse.ArgumentTypeError(f"a number of tokens (1 or more) or off, not {text!r}")
    return n


def _release_arg(text: str) -> Optional[int]:
    if text == "off":
        return None
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size (2G, 512M) or off, not {text!r}") from None


def read_tokens(path: str) -> Dict[str, str]:
    """A token file (NAME TOKEN per line, # comments), as kvf-sched and kvf-engine read it."""
    out: Dict[str, str] = {}
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) != 2 or not 16 <= len(parts[1]) <= 512 or parts[0] in out:
                raise SystemExit(f"kvfabric.serve: {path}:{ln}: expected \"NAME TOKEN\" "
                                 "(a token of 16-512 characters, each name once)")
            out[parts[0]] = parts[1]
    if not out:
        raise SystemExit(f"kvfabric.serve: {path}: no token in the file")
    return out


def _zone(text: str) -> str:
    """--zone: 1 to 63 of [A-Za-z0-9._-] (kvf-sched's, kvf-store's and kvf-engine's rule)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", text):
        raise argparse.ArgumentTypeError(f"a zone is 1 to 63 of [A-Za-z0-9._-], got {text!r}")
    return text


MAX_SOURCES = 64


def parse_sources(a: Any) -> Tuple[List[Tuple[str, int, int]], Optional[str]]:
    """A request's "sources" (kvf-sched's plan: where each run of the prompt's cached chunks is
    taken from), as kvf-engine reads them: absent, or up to MAX_SOURCES runs {"store",
    "from", "tokens"} (other fields ignored) or {"more": true}. Returns the runs (those naming
    a store) and None, or [] and the error."""
    if a is None:
        return [], None
    if not isinstance(a, list) or len(a) > MAX_SOURCES:
        return [], f'"sources" must be an array of at most {MAX_SOURCES} runs'
    out = []
    for i, v in enumerate(a):
        if isinstance(v, dict) and v.get("more") is True and "store" not in v:
            continue
        ok = isinstance(v, dict) and isinstance(v.get("store"), str) and \
            len(v["store"]) <= 255 and all(
                isinstance(v.get(k), int) and not isinstance(v.get(k), bool) and
                0 <= v[k] <= 0xFFFFFFFF for k in ("from", "tokens"))
        if not ok:
            return [], (f'sources[{i}] must be {{"store": "host:port", "from": tokens, '
                        '"tokens": tokens}} with token counts 0..4294967295, or {"more": true}')
        if v["store"]:
            out.append((v["store"], v["from"], v["tokens"]))
    return out, None


def _http(method: str, url: str, body: Optional[Dict[str, Any]], timeout: float = 2.0
          ) -> Tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    tok = os.environ.get("KVF_SCHED_TOKEN")
    if tok:
        req.add_header("Authorization", f"Bearer {tok}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            try:
                return r.status, json.loads(raw) if raw else None
            except ValueError:
                return r.status, None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw) if raw else None
        except ValueError:
            return e.code, None


class Server:
    """The engine, its turn queue, kvf-sched registration and load reports."""

    def __init__(self, a: argparse.Namespace, engine: Engine, layout: Layout,
                 events: Optional[Events], backend: str) -> None:
        self.a, self.engine, self.layout, self.events = a, engine, layout, events
        self.backend = backend
        self.turns = TurnQueue(a.queue)
        self.mu = threading.Lock()
        self.requests = self.failures = self.mismatches = self.abandoned = 0
        self.busy_s = 0.0
        self.acks: "collections.deque[Tuple[int, float]]" = collections.deque(maxlen=ACKS)
        self.ticketed = False  # listed from the first ticket on (before, kvf-sched takes the
        # reports' figures whole: this engine's clients pass no tickets on)
        self.endpoint = ""
        self.stop = threading.Event()
        self.dirty = threading.Event()
        self.tokens = read_tokens(a.tokens) if a.tokens else None
        self.vocab = int(getattr(engine, "vocab", 0) or 1 << 32)
        self.closing = threading.Event()  # set at shutdown: new requests get a 503
        self.prefetch_max = parse_size(a.prefetch_memory)
        self.prefetch_held = 0
        self.metrics = Registry("kvf_engine")  # the same series as kvf-engine's /metrics
        self.member: Optional[EtcdMember] = None  # with --etcd: this engine's registration
        self.learnt: List[str] = []  # the replicas registered in etcd (learn_replicas)
        self.learnt_at = 0.0

    def order_work(self, kind: str, toks: List[int], max_tokens: int, reuse: str, expect: int,
                   sources: Any) -> float:
        """A request's predicted seconds for the queue's order, as kvf-engine predicts them: the
        prefill of what no cache holds (a decode's prefix comes by handoff; others ask the
        stores, or with the engine's cache only, look at its pages), then the tokens it
        generates; from this engine's measured rates (0 before it measured any: arrival order)."""
        e, n = self.engine, len(toks)
        cached = expect if kind == "decode" else 0
        if kind != "decode" and reuse != "none":
            cached = e._device_prefix(toks, n)
            if reuse == "all" and e.cn is not None:
                try:
                    cached = max(cached, e.lookup(toks, sources))
                except KvfError:  # the stores unreachable: the order is an estimate anyway
                    pass
            # the last chunk is computed whatever is cached (kvf-engine's held_prefix)
            C = self.layout.chunk_tokens
            cached = min(cached, (n - 1) // C * C) if n else 0
        # nothing to compute (a decode handed its whole prefix): no pass, no fixed cost
        work = (e.rates.compute_s(cached, n) or 0.0) if cached < n else 0.0
        if kind != "prefill" and e.rates.s_per_step is not None:
            work += max_tokens * e.rates.s_per_step
        return work

    # -- /metrics ---------------------------------------------------------------------------
    def note_metrics(self, kind: str, status: int, o: Any, queue_s: float,
                     handoff_s: float) -> None:
        """A finished request into the metrics (kvf-engine's series: docs/operations.md)."""
        m = self.metrics
        m.counter_add("requests_total", "Requests answered, by kind and result.",
                      {"kind": kind, "result": "ok" if status == 200 else "error"})
        if status != 200 or o is None:
            return
        computed = max(0, o.prompt_tokens - o.device_tokens - o.loaded_tokens)
        for src, n in (("engine", o.device_tokens), ("store", o.loaded_tokens),
                       ("computed", computed)):
            m.counter_add("prompt_tokens_total", "Prompt tokens by where their KV came from: "
                          "the engine's pages, the stores, or computed here.", {"source": src},
                          float(n))
        help_ = ("Time of a request's phases: waiting for the engine (queue), for a decode's "
                 "handoff, the prefill (loads included), the decode.")
        phases = [("queue", queue_s), ("prefill", o.prefill_s), ("decode", o.decode_s)]
        if kind == "decode":
            phases.append(("handoff", handoff_s))
        for ph, sec in phases:
            m.observe_seconds("request_phase_seconds", help_, sec, {"phase": ph})

    def metrics_text(self) -> str:
        """The registry with the queue and the connector mirrored now."""
        st = self.engine.cn.stats() if self.engine.cn is not None else {}
        t = self.turns
        with self.mu:
            vals = [("queued_prefill_tokens", "Prompt tokens of the requests waiting or running.",
                     t.queued_prefill_tokens),
                    ("queued_prefill_seconds", "Their predicted prefill work still to do.",
                     t.queued_seconds()),
                    ("waiting_requests", "Requests waiting for the engine.", t.waiting),
                    ("active_decodes", "Requests decoding or waiting to.", t.active_decodes),
                    ("held_blocks", "KV blocks in the engine's pages (published as KV events).",
                     len(self.engine.held.hashes))]
            counts = [("busy_seconds_total", "Time the engine ran requests.", self.busy_s),
                      ("requests_abandoned_total", "Requests whose client went away before "
                       "their answer: not run, or decoding stopped.", self.abandoned),
                      ("first_token_mismatches_total",
                       "Decodes whose first token differed from the prefill's.", self.mismatches),
                      ("oom_retries_total", "Requests run again after running out of device "
                       "memory (the engine's held prefix and free blocks let go first).",
                       self.engine.oom_retries),
                      ("memory_releases_total", "Times the engine gave its allocator's free "
                       "blocks back to a nearly full GPU after a request (--release-below).",
                       self.engine.memory_releases)]
        for name, help_, v in vals:
            self.metrics.gauge_set(name, help_, float(v))
        conn = [("load_bytes_total", "KV bytes loaded from the stores.", "load_bytes"),
                ("save_bytes_total", "KV bytes saved to the stores.", "save_bytes"),
                ("chunks_loaded_total", "Chunks loaded from the stores.", "chunks_loaded"),
                ("chunks_saved_total", "Chunks saved to the stores.", "chunks_saved"),
                ("chunks_missed_total", "Chunks a load found missing or failing their checksums.",
                 "chunks_missed"),
                ("prefetches_total", "Prefixes fetched for requests while they waited.",
                 "prefetches")]
        for name, help_, v in counts + [(n, h, st.get(k, 0)) for n, h, k in conn]:
            self.metrics.counter_set(name, help_, float(v))
        gt = self.engine.gpu_turn
        if gt is not None:  # the GPU's turns (--gpu-turn): this engine's side of them
            for name, help_, v in (
                    ("gpu_turn_passes_total", "Passes run in their turn on the shared GPU.",
                     gt.passes),
                    ("gpu_turn_waited_passes_total", "Of which waited for another engine's pass.",
                     gt.waited_passes),
                    ("gpu_turn_wait_seconds_total", "Time passes waited for their turn.",
                     gt.wait_s),
                    ("gpu_turn_beside_passes_total", "Of which ran beside the pass that held the "
                     "turn (--gpu-turn-share, --gpu-turn-light).", gt.beside_passes),
                    ("gpu_turn_timeouts_total", "Passes that ran without their turn: the wait "
                     "reached --gpu-turn-max-wait, or no waiter's slot was free.", gt.timeouts),
                    ("gpu_turn_decode_yield_seconds_total", "Time decoding steps waited for the "
                     "passes (at most --gpu-turn-decode-wait a step).", gt.decode_yield_s),
                    ("gpu_turn_lock_timeouts_total", "Times the turn page's lock was not had "
                     "within 0.5 s (a process stopped inside it): turns off for 30 s.",
                     gt.lock_timeouts)):
                self.metrics.counter_set(name, help_, float(v))
        return self.metrics.expose()

    # -- kvf-sched ------------------------------------------------------------------------
    def capabilities(self) -> Dict[str, Any]:
        """This engine's capability record for kvf-sched's classifier: the reference engine's
        (paged staging, layerwise hooks, loads while computing, an external connector), with the
        engine's name and version, where its KV lives and what libkvf here can move."""
        cuda = self.engine.device.type == "cuda"
        usable = bool(cuda_probe().get("usable")) if cuda else False
        if self.backend == "transformers":
            import transformers
            version = transformers.__version__
        else:
            import torch
            version = torch.__version__
        rec = {"base": "reference", "name": "kvfabric-serve",
               "engine": "hf-transformers" if self.backend == "transformers" else "torch",
               "engine_version": version[:31], "mem_kinds": 4 if cuda else 1,
               "xfer_mem_kinds": 1 | 2 | (4 if usable else 0)}
        return Caps(rec).to_dict()  # checked by libkvf's parser, as kvf-sched will

    def compute(self) -> Dict[str, Any]:
        """What this engine computes on, as kvf-sched names shared compute: one GPU of this
        host (which other engines on it share), or this host's CPUs (torch's threads of them)."""
        try:
            with open("/etc/machine-id") as f:
                host = f.read().strip()
        except OSError:
            host = ""
        host = host or socket.gethostname()
        dev = self.engine.device
        if dev.type == "cuda":
            return {"compute": f"cuda:{dev.index or 0}@{host}", "compute_slots": 1,
                    "compute_uses": 1}
        import torch
        return {"compute": f"cpu@{host}", "compute_slots": len(os.sched_getaffinity(0)),
                "compute_uses": max(1, torch.get_num_threads())}

    def scheds(self) -> List[str]:
        """kvf-sched's replicas: --sched A[,B...], and with --etcd those registered in the
        cluster (learn_replicas): load reported to each, registered with each that does not know
        this engine."""
        given = [x for x in self.a.sched.split(",") if x]
        return given + [x for x in self.learnt if x not in given]

    def learn_replicas(self) -> None:
        """With --etcd: the replicas registered under /kvfabric/CLUSTER/scheds/ now (asked at
        most every 2 s, by the reporter); etcd not answering keeps what was known."""
        if self.member is None or time.monotonic() - self.learnt_at < 2.0:
            return
        self.learnt_at = time.monotonic()
        try:
            recs = self.member.list(f"/kvfabric/{self.a.cluster}/scheds/")
        except EtcdError as e:
            _log("warn", f"etcd: the kvf-sched replicas: {e}")
            return
        now = []
        for key, value in sorted(recs.items()):
            try:
                addr = json.loads(value).get("addr")
            except (ValueError, AttributeError):
                addr = None
            if isinstance(addr, str) and addr == key.rsplit("/", 1)[-1]:
                now.append(addr)
        for x in set(now) - set(self.learnt):
            _log("info", f"etcd: kvf-sched {x} joined: load reported there too")
        for x in set(self.learnt) - set(now):
            _log("info", f"etcd: kvf-sched {x} left")
        self.learnt = now

    def record(self) -> Dict[str, Any]:
        """This engine's registration record: POST /v1/instances' body, and its record in etcd."""
        body = {"id": self.a.id, "role": self.a.role, "endpoint": self.endpoint,
                "events": self.events.endpoint if self.events else "",
                "replay": self.events.replay_endpoint if self.events else "",
                "block_tokens": self.layout.page_tokens,
                "capacity_blocks": self.a.max_tokens // self.layout.page_tokens,
                "capabilities": self.capabilities()}
        if self.events:
            # the shards its events go out in: a kvf-sched replica split otherwise says so
            body["event_shards"] = max(1, self.a.event_shards or 1)
        if self.a.zone:
            body["zone"] = self.a.zone
        body.update(self.compute())
        return body

    def register(self, only: Optional[str] = None, attempts: int = 50) -> None:
        """Registers with every replica (or `only`): at least one must take it; the others are
        asked again by the reporter, whose reports they answer with 404 until then."""
        body = self.record()
        took, last = 0, "no answer"
        for sched in ([only] if only else self.scheds()):
            url = f"http://{sched}/v1/instances"
            for _ in range(attempts):
                try:
                    st, rep = _http("POST", url, body)
                except OSError as e:
                    last = f"kvf-sched at {sched}: {e}"
                    time.sleep(0.1)
                    continue
                if st in (200, 201):
                    took += 1
                    break
                why = rep.get("error") if isinstance(rep, dict) else None
                raise SystemExit(f"kvfabric.serve: kvf-sched {sched} refused the registration "
                                 f"(HTTP {st}): {why or 'no reason given'}")
            else:
                if not only and len(self.scheds()) > 1:
                    _log("warn", f"registration: {last}")
        if not took:
            raise SystemExit(f"kvfabric.serve: {last}")

    def reporter(self) -> None:
        down = set()
        while not self.stop.is_set():
            self.dirty.wait(REPORT_EVERY_S)
            self.dirty.clear()
            if self.stop.is_set():
                break
            self.learn_replicas()
            t = self.turns
            with self.mu:
                queued_s = t.queued_seconds()
                now = time.monotonic()
                while self.acks and now - self.acks[0][1] > ACK_KEEP_S:
                    self.acks.popleft()
                # the placed requests these figures count (kvf-sched adds the others' work)
                body = {"queued_prefill_tokens": float(t.queued_prefill_tokens),
                        "queued_prefill_s": queued_s, "active_decodes": t.active_decodes,
                        "used_blocks": len(self.engine.held.hashes)}
                if self.ticketed:
                    body["tickets"] = [tk for tk, _ in self.acks]
            for sched in self.scheds():
                url = f"http://{sched}/v1/instances/{self.a.id}/load"
                try:
                    st, _ = _http("POST", url, body)
                    if st == 404:
                        _log("warn", f"kvf-sched {sched} does not know this engine: "
                                     "registering again")
                        self.register(only=sched, attempts=1)
                    elif st != 200:
                        _log("warn", f"load report to kvf-sched {sched}: HTTP {st}")
                    elif sched in down:
                        _log("info", f"kvf-sched {sched} answers again")
                    down.discard(sched)
                except (Exception, SystemExit) as e:  # noqa: BLE001 - the heartbeat goes on
                    if sched not in down:
                        _log("warn", f"load report to kvf-sched {sched}: {e}")
                    down.add(sched)

    # -- requests -------------------------------------------------------------------------
    def health(self) -> Dict[str, Any]:
        st = self.engine.cn.stats() if self.engine.cn is not None else {}
        with self.mu:
            return {"id": self.a.id, "role": self.a.role, "model": self.a.model,
                    "backend": self.backend, "device": str(self.engine.device),
                    "decode_steps": self.engine.graph_note,
                    "requests": self.requests, "failures": self.failures,
                    "first_token_mismatches": self.mismatches,
                    "queued_prefill_tokens": self.turns.queued_prefill_tokens,
                    "queued_prefill_s": round(self.turns.queued_seconds(), 6),
                    "active_decodes": self.turns.active_decodes, "waiting": self.turns.waiting,
                    "busy_s": self.busy_s,
                    "connector": {k: st.get(k, 0) for k in
                                  ("load_bytes", "save_bytes", "chunks_loaded", "chunks_saved",
                                   "chunks_missed", "chunks_existing", "prefetches",
                                   "prefetch_chunks", "prefetch_chunks_loaded", "prefetch_named",
                                   "prefetch_named_missed", "prefetch_sources_unknown",
                                   "load_named", "load_named_reasked", "load_sources_unknown",
                                   "cuda_bytes", "cuda_copy_calls", "cuda_kernels")},
                    "running": self.turns.busy(), "abandoned": self.abandoned,
                    "cache_layer": self.engine.cn is not None}

    def job(self, kind: str, body: Any, gone: Optional[Any] = None,
            first: Optional[Any] = None) -> Tuple[int, Dict[str, Any]]:
        """Runs one request; any failure is an answer (400, 413, 500, 503), never an escape.
        gone: whether its client went away (asked at its turn and before each decoding step);
        then it is not run, or stops, and the answer (499) is for nobody. first: where the body
        asks for a stream ("stream": true) of a prefill or generate, called with the first token
        the moment the forward pass gives it (before the save and the decode); it must not
        raise."""
        if self.closing.is_set():
            return 503, {"error": "the engine is stopping"}
        try:
            return self._job(kind, body, gone, first)
        except Exception as e:  # noqa: BLE001 - the server answers and goes on
            return 500, {"error": f"{kind}: {type(e).__name__}: {e}"}

    def _job(self, kind: str, body: Any, gone: Optional[Any] = None,
             first: Optional[Any] = None) -> Tuple[int, Dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, {"error": "the body must be a JSON object"}
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            return 400, {"error": "stream must be true or false"}
        on_first = first if stream and kind != "decode" else None
        toks = body.get("tokens")
        if not isinstance(toks, list) or not toks or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab
                for t in toks):
            return 400, {"error": "\"tokens\" must be a non-empty array of token ids below "
                                  f"the model's vocabulary of {self.vocab}"}
        ints = {}
        for k in ("max_tokens", "first_token", "expect_cached"):
            v = body.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                return 400, {"error": "max_tokens, first_token and expect_cached are integers, "
                                      "reuse true, false or \"engine\""}
            ints[k] = v
        if ints["first_token"] is not None and not 0 <= ints["first_token"] < self.vocab:
            return 400, {"error": f"first_token must be a token id below {self.vocab}"}
        ru = body.get("reuse")
        if ru is None or ru is True:  # absent or null: reuse everything
            reuse = "all"
        elif ru is False:
            reuse = "none"
        elif ru == "engine":
            reuse = "engine"
        else:
            return 400, {"error": "reuse must be true, false or \"engine\""}
        max_tokens = ints["max_tokens"] if ints["max_tokens"] is not None else 1
        if not 1 <= max_tokens <= 1 << 20:
            return 400, {"error": "max_tokens must be 1..1048576"}
        if kind == "prefill":
            max_tokens = 1
        if len(toks) + max_tokens + 1 > self.a.max_tokens:
            return 413, {"error": f"prompt of {len(toks)} tokens + {max_tokens} to generate "
                                  f"exceed this engine's KV capacity of {self.a.max_tokens} "
                                  "tokens (--max-tokens)"}
        dl = body.get("load_deadline_ms")
        if dl is not None and (isinstance(dl, bool) or not isinstance(dl, (int, float)) or
                               not 0 <= dl <= 3.6e6):
            return 400, {"error": "load_deadline_ms must be a number of milliseconds "
                                  "0..3600000"}
        sources, err = parse_sources(body.get("sources"))
        if err:
            return 400, {"error": err}
        ticket = body.get("ticket")
        if ticket is not None and (isinstance(ticket, bool) or not isinstance(ticket, int) or
                                   not 0 <= ticket <= MAX_TICKET):
            return 400, {"error": "ticket (kvf-sched's plan) is an integer 0..2^53"}
        arrived = time.monotonic()
        handoff_s = 0.0
        expect = ints["expect_cached"] or 0
        if kind == "decode" and expect and self.engine.cn is not None:
            t0 = time.perf_counter()
            for i in range(400):  # the prefill's save may still be landing: bounded wait
                if self.engine.lookup(toks[: len(toks) // self.layout.chunk_tokens *
                                           self.layout.chunk_tokens]) >= expect:
                    break
                time.sleep(0.0005 if i < 20 else 0.005)
            handoff_s = time.perf_counter() - t0
        t = self.turns
        # its prefill's predicted seconds (what this engine measured; 0 before it measured any:
        # kvf-sched then counts the tokens at its own rate)
        work_s = 0.0
        if kind != "decode":
            work_s = self.engine.rates.compute_s(0, len(toks)) or 0.0
        # every request's, as kvf-engine's: one that finds the engine free may still wait (another
        # took it first), and a 0 would put it ahead of everyone
        order_s = self.order_work(kind, toks, max_tokens, reuse, expect, sources) \
            if t.discipline != "fifo" else 0.0
        with self.mu:
            if kind != "decode":
                t.queued_prefill_tokens += len(toks)
                t.queued_work_s += work_s
            if kind != "prefill":
                t.active_decodes += 1
            if ticket:  # counted from now on (prefill or decode): the next load report says so
                self.ticketed = True
                self.acks.append((ticket, time.monotonic()))
        self.dirty.set()
        tq = time.perf_counter()
        cn = self.engine.cn
        st0 = cn.stats() if cn is not None else None
        # Finding the engine busy, a prefill or generate fetches its prefix while it waits and
        # uses what arrived by the plan's deadline (kvf-engine's --prefetch; docs/connector.md).
        pf, pf_bytes = None, 0
        if kind != "decode" and reuse == "all" and self.a.prefetch == "on" and t.busy():
            pf = self.engine.prefetch(toks, sources)
            if pf is not None:  # the waiting requests' prefetches share --prefetch-memory
                pf_bytes = pf.tokens * self.layout.bytes_per_token
                with self.mu:
                    if self.prefetch_held + pf_bytes > self.prefetch_max:
                        pf.close()
                        pf, pf_bytes = None, 0
                    else:
                        self.prefetch_held += pf_bytes
        deadline = arrived + dl / 1e3 if pf is not None and dl else None
        try:
            with t.turn(order_s):
                start = time.perf_counter()
                with self.mu:
                    t.running_work_s, t.running_since = work_s, time.monotonic()
                self.dirty.set()
                try:
                    if gone is not None and gone():  # it left while it waited: nothing to run
                        status, o = 499, None
                        out = {"error": "the client went away before the request's turn"}
                    else:
                        o = self.engine.run(kind, toks, max_tokens, reuse, ints["first_token"],
                                            prefetch=pf, deadline=deadline, sources=sources,
                                            gone=gone, on_first=on_first)
                        status, out = 200, outcome_json(o)
                        if o.abandoned:
                            status = 499
                            out = {"error": f"the client went away: stopped after "
                                            f"{len(o.tokens)} of {max_tokens} tokens"}
                except Exception as e:  # noqa: BLE001 - the server answers and goes on
                    status, out, o = 500, {"error": f"{kind}: {type(e).__name__}: {e}"}, None
                finally:
                    with self.mu:  # before the turn passes to the next request
                        t.running_work_s = 0.0
                busy = time.perf_counter() - start
        finally:
            if pf is not None:
                pf.close()
                with self.mu:
                    self.prefetch_held -= pf_bytes
            with self.mu:
                if kind != "decode":
                    t.queued_prefill_tokens -= len(toks)
                    t.queued_work_s = max(0.0, t.queued_work_s - work_s)
                if kind != "prefill":
                    t.active_decodes -= 1
            self.dirty.set()
        with self.mu:
            self.requests += 1
            self.failures += status not in (200, 499)
            self.abandoned += status == 499
            self.busy_s += busy
            if o is not None and o.first_token_mismatch:
                self.mismatches += 1
        self.note_metrics(kind, status, o, start - tq, handoff_s)
        if status != 200:
            return status, out
        out.update({"engine": self.a.id, "kind": kind, "queue_s": start - tq,
                    "handoff_s": handoff_s, "label": "real", "backend": self.backend})
        if st0 is not None:
            # what the engine's storage client moved meanwhile (others' requests count too)
            st1 = cn.stats()
            # shm, net and reasked are the storage client's counts: one opened on a changed set of
            # stores starts at 0, so a delta that went back is what the new one counted
            out.update({k: st1[k] - st0[k] if st1[k] >= st0[k] else st1[k]
                        for k in ("load_bytes", "shm_bytes", "net_bytes", "load_named",
                                  "load_named_reasked")})
        if cn is not None and reuse == "all":
            tr, why = cn.transport()
            out.update({"transport": tr, "transport_reason": why})
        if o.first_token_mismatch:
            _log("error", f"the decode's first token differs from the prefill's "
                          f"{ints['first_token']}")
        return 200, out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kvfabric.serve",
        description="A causal LM behind kvf-engine's HTTP API, with kvfabric (docs/python.md).")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # kvf-engine's flag
    p.add_argument("--id", default="", help="this instance's name in kvf-sched (required to serve)")
    p.add_argument("--calibrate", metavar="FILE",
                   help="measure the model here, write kvf-sched's cost file and exit")
    p.add_argument("--layout-out", metavar="FILE",
                   help="write the model's KV layout and vocabulary (JSON) and go on")
    p.add_argument("--role", choices=("prefill", "decode", "both"), default="both")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT of the HTTP API")
    p.add_argument("--advertise", help="HOST:PORT others reach the API at (default: --listen's)")
    p.add_argument("--zone", type=_zone,
                   help="this engine's zone (a rack, an availability zone), registered with "
                        "kvf-sched: its loads are planned from a replica on its host, then in "
                        "its zone")
    p.add_argument("--sched", default="",
                   help="kvf-sched's HOST:PORT (several replicas: comma-separated): register "
                        "with each and report load to each")
    p.add_argument("--etcd", help="etcd's members (http://HOST:PORT,...): register under a lease "
                                  "at /kvfabric/CLUSTER/engines/ID, so that every kvf-sched "
                                  "replica following the cluster learns this engine and drops it "
                                  "when it dies (docs/membership.md)")
    p.add_argument("--cluster", default="default",
                   help="the cluster's name in etcd: keys under /kvfabric/NAME/")
    p.add_argument("--etcd-ttl", type=int, default=5, help="the lease in etcd, seconds (2..3600)")
    p.add_argument("--store", default="", help="kvf-store HOST:PORT[,...] (default: kvf-sched's)")
    p.add_argument("--events", help="HOST:PORT to publish KV events on (port 0: any)")
    p.add_argument("--events-credential", help="the events' CURVE credential (with tenants)")
    p.add_argument("--events-tenants", help="who may subscribe to the events")
    p.add_argument("--event-shards", type=int, default=1,
                   help="publish each sequence's events under its shard's topic, for kvf-sched "
                        "replicas run with --shard K/N (docs/scale.md)")
    p.add_argument("--tokens", help="bearer token file: every POST must carry one")
    p.add_argument("--insecure", action="store_true",
                   help="allow --listen/--events on an address that is not loopback")
    p.add_argument("--model", default="llama-3.1-8b",
                   help=f"a configuration ({', '.join(models.CONFIGS)}) or a config.json path")
    p.add_argument("--checkpoint", help="safetensors checkpoint (file or folder); default random")
    p.add_argument("--backend", choices=("auto", "transformers", "torch"), default="auto",
                   help="transformers' model, or kvfabric.llama's (plain torch); auto: "
                        "transformers where installed")
    p.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (auto: cuda if any)")
    p.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="",
                   help="weights and KV (default: bf16 on GPU, f32 on CPU)")
    p.add_argument("--layers", type=int, default=0, help="keep only the first N layers")
    p.add_argument("--seed", type=int, default=1, help="the random weights' seed")
    p.add_argument("--max-tokens", type=int, default=16384, help="KV capacity of one sequence")
    p.add_argument("--page-tokens", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--trust-local-store", action="store_true",
                   help="KV read in place from a kvf-store on this host is not hashed again (the "
                   "store verified it when stored and no client can write its arena): less CPU "
                   "per load; default off (every segment hashed)")
    p.add_argument("--save-whole", action="store_true",
                   help="a prefill's save is put once its last layer is gathered, not in parts "
                   "as its layers are (over TCP; the default puts in parts: docs/connector.md)")
    p.add_argument("--save-parts-shm", nargs="?", const="on", default="auto",
                   choices=["auto", "on", "off"],
                   help="to a store on this host reached over shared memory, a prefill's save in "
                   "parts too, over the store's Unix socket (on), or whole through the staging "
                   "regions (off); auto (the default): in parts where the storage client runs "
                   "two I/O threads or more (8 cores or more; docs/connector.md)")
    p.add_argument("--connector-workers", type=int, default=0,
                   help="the connector's worker threads (0: its default)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="decoding steps replayed from CUDA graphs, one per layer, over the "
                   "staging pages (kvfabric.graphstep): auto where the device, dtype, model and "
                   "torch allow (CUDA, bf16 or f16, a Llama-family model, FlashAttention with "
                   "seqused_k); on: or refuse to start; off: eager steps")
    p.add_argument("--gpu-turn", default="auto", metavar="auto|off|FILE",
                   help="engines on one GPU take turns for their passes, shortest predicted "
                        "first (kvfabric.gputurn; auto: the GPU's file in /dev/shm, off on a CPU)")
    p.add_argument("--gpu-turn-max-wait", type=float, default=10.0, metavar="S",
                   help="the longest a pass holds its turn (after it, the turn is taken from it) "
                        "or waits for it (after it, the pass runs anyway)")
    p.add_argument("--gpu-turn-share", type=float, default=2.0, metavar="X",
                   help="a pass predicted to take at most 1/X of what the pass holding the turn "
                        "has left runs beside it, one at a time (0: never by this rule; two "
                        "light passes: --gpu-turn-light)")
    p.add_argument("--gpu-turn-light", choices=("on", "off"), default="on",
                   help="two light passes (predicted to take mostly their fixed cost: the host "
                        "launching kernels) run beside each other (on)")
    p.add_argument("--gpu-turn-decode-wait", type=float, default=0.05, metavar="S",
                   help="the longest a decoding step waits for the passes on the GPU (0: none)")
    p.add_argument("--save-beside", default=1024, type=_beside_arg, metavar="N|off",
                   help="a prefill's save runs beside its forward pass, layer by layer, where "
                   "the pass computes at least N new tokens (1024); off: every save after the "
                   "pass (the first token is streamed before it either way)")
    p.add_argument("--release-below", default=2 << 30, type=_release_arg, metavar="SIZE|off",
                   help="after a request, where the GPU has less than SIZE free, this engine's "
                   "allocator gives its free blocks back to it, for the other engines on the "
                   "GPU (2G; off: never)")
    p.add_argument("--prefetch", choices=("on", "off"), default="on",
                   help="fetch a waiting request's cached prefix while it waits (kvf-engine's)")
    p.add_argument("--prefetch-memory", default="1G", type=_size_arg,
                   help="what the waiting requests' prefetches may hold (1G)")
    p.add_argument("--queue", choices=QUEUE_DISCIPLINES, default="hrrn",
                   help="the order waiting requests run in, as kvf-engine's: hrrn (the highest "
                   "(waited + work) / work first), work (the least predicted work first) or "
                   "fifo (arrival); work is predicted from this engine's own measurements")
    p.add_argument("--cost", help="kvf-engine's calibration file (kvf-sched's cost model): its "
                   "prefill model is the prior of this engine's measured rates, each length "
                   "class replaced by the engine's own first pass of it")
    p.add_argument("--warmup", choices=("auto", "on", "off"), default="auto",
                   help="before serving, one short generate (not measured: CUDA's lazy set-up) "
                   "and two prefills of 256 and 1,024 tokens (measured) with no store and no "
                   "events; auto: on a GPU")
    p.add_argument("--log-level", choices=("debug", "info", "warn", "error"), default="info")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    a = parser().parse_args(argv)
    if not 256 <= a.max_tokens <= 1 << 20:
        raise SystemExit("kvfabric.serve: --max-tokens must be 256..1048576")
    if bool(a.events_credential) != bool(a.events_tenants):
        raise SystemExit("kvfabric.serve: --events-credential and --events-tenants go together")
    host, port = _split(a.listen, "--listen")
    if not _is_loopback(host) and not a.tokens and not a.insecure:
        raise SystemExit(f"kvfabric.serve: refusing --listen on {host} without --tokens: anyone "
                         "who can reach it could run requests (docs/security.md); add --insecure "
                         "where every host on the network is trusted")
    if a.events:
        eh, _ = _split(a.events, "--events")
        if not _is_loopback(eh) and not a.events_credential and not a.insecure:
            raise SystemExit(f"kvfabric.serve: refusing --events on {eh} without "
                             "--events-credential (docs/security.md)")
    import torch

    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = a.dtype or ("bf16" if device.startswith("cuda") else "f32")
    try:
        cfg = models.config(a.model)
    except ValueError as e:
        raise SystemExit(f"kvfabric.serve: --model: {e}")
    if a.layers:
        cfg["num_hidden_layers"] = min(a.layers, int(cfg["num_hidden_layers"]))
    name = os.path.basename(a.model.rstrip("/"))
    layout = models.layout_for(cfg, model_id=name[:-5] if name.endswith(".json") else name,
                               page_tokens=a.page_tokens, chunk_tokens=a.chunk_tokens, dtype=dtype)
    if device.startswith("cuda"):
        models.serving_attention()
    if a.layout_out:
        with open(a.layout_out, "w") as f:
            json.dump({"layout": json.loads(layout.to_json()),
                       "vocab": int(cfg["vocab_size"]), "model": a.model}, f)
            f.write("\n")
    model, factory, backend = models.build(cfg, a.backend, device, dtype, a.seed, a.checkpoint)
    if a.calibrate:
        calibrate(Engine(model, layout, factory, max_tokens=a.max_tokens,
                         release_below=a.release_below),
                  layout, int(cfg["vocab_size"]), a.calibrate)
        return 0
    if not a.id:
        raise SystemExit("kvfabric.serve: --id is required to serve")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", a.id):  # kvf-sched's rule for an instance id
        raise SystemExit(f"kvfabric.serve: --id: 1 to 63 of [A-Za-z0-9._-], got {a.id!r}")
    cn = None
    stores = [s for s in a.store.split(",") if s]
    if stores or a.sched or a.etcd:
        # the stores given, else those registered in etcd (followed by a watch), else kvf-sched's
        try:
            cn = Connector(layout, nodes=stores or None, sched=a.sched or None,
                           etcd=None if stores else (a.etcd or None), cluster=a.cluster,
                           workers=a.connector_workers, trust_local_store=a.trust_local_store,
                           save_whole=a.save_whole,
                           save_parts_shm=SHM_PARTS[a.save_parts_shm])
        except KvfError as e:
            if stores or a.sched or e.name != "KVF_ECONNREFUSED":
                raise
            _log("warn", f"{e}: serving without stores")  # an etcd cluster with no store yet
    ev = None
    if a.events:  # with a replay socket beside it, as kvf-engine
        eh, _ = _split(a.events, "--events")
        ev = Events(a.events, a.events_credential, a.events_tenants,
                    replay=f"[{eh}]:0" if ":" in eh else f"{eh}:0", shards=a.event_shards)
    if not 0 < a.gpu_turn_max_wait <= 3600:
        raise SystemExit("kvfabric.serve: --gpu-turn-max-wait: more than 0, at most 3600 s")
    if not 0 <= a.gpu_turn_decode_wait <= 10:
        raise SystemExit("kvfabric.serve: --gpu-turn-decode-wait: 0 to 10 s")
    if not 0 <= a.gpu_turn_share <= 1000:
        raise SystemExit("kvfabric.serve: --gpu-turn-share: 0 (never beside by this rule) to 1000")
    p0 = next(model.parameters())
    turn = gputurn.open_for(p0.device, a.gpu_turn, a.gpu_turn_max_wait, _log, a.gpu_turn_share,
                            a.gpu_turn_light == "on")
    try:
        engine = Engine(model, layout, factory, connector=cn, events=ev,
                        max_tokens=a.max_tokens, graphs=a.cuda_graphs, gpu_turn=turn,
                        decode_yield_s=a.gpu_turn_decode_wait, save_beside_tokens=a.save_beside,
                        release_below=a.release_below)
    except ValueError as e:
        raise SystemExit(f"kvfabric.serve: --cuda-graphs: {e}")
    _log("info", f"decoding steps: {engine.graph_note}")
    _log("info", f"passes on the GPU: {'turns in ' + turn.path if turn else 'no turns'}")
    engine.vocab = int(cfg["vocab_size"])
    if a.cost:
        seed_rates(engine, a.cost, _log)
    if a.warmup == "on" or (a.warmup == "auto" and engine.device.type == "cuda"):
        try:
            warm_up(engine, engine.vocab, _log)
        except Exception as e:  # noqa: BLE001 - said as what it is, before serving anything
            raise SystemExit(f"kvfabric.serve: the warm-up failed: {type(e).__name__}: {e} "
                             "(--warmup off to serve without it)") from None
    S = Server(a, engine, layout, ev, backend)
    if cn is not None:  # the connector's per-layer timing on /metrics, as kvf-engine's
        cn.set_metrics(S.metrics)
    httpd = HttpServer((host, port), handler(S, _log))
    bound = httpd.server_address[1]
    S.endpoint = a.advertise or f"{host}:{bound}"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    reporter = None
    if a.sched:
        S.register()
    member = None
    if a.etcd:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", a.cluster):
            raise SystemExit(f"kvfabric.serve: --cluster: 1 to 64 of [A-Za-z0-9._-], got "
                             f"{a.cluster!r}")
        try:
            member = EtcdMember(a.etcd, f"/kvfabric/{a.cluster}/engines/{a.id}",
                                json.dumps(S.record(), sort_keys=True), ttl=a.etcd_ttl,
                                exclusive=True, log=_log)
        except EtcdError as e:
            raise SystemExit(f"kvfabric.serve: --etcd: {e}") from None
        S.member = member
    if a.sched or member is not None:  # the load reports: to --sched's replicas and etcd's
        reporter = threading.Thread(target=S.reporter, daemon=True)
        reporter.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"kvf-engine ready listen={host}:{bound} id={a.id} role={a.role} model={a.model} "
          f"events={ev.endpoint if ev else '-'} cache_layer={'on' if cn else 'off'} "
          f"pid={os.getpid()} backend={backend} device={device} layout={layout.model_id}",
          flush=True)
    while not stop.wait(0.2):
        pass
    if member is not None:  # revoked: the replicas remove this engine now
        member.stop()
    S.stop.set()
    S.dirty.set()
    S.closing.set()  # new requests get a 503 ...
    httpd.shutdown()
    with S.turns:  # ... and the one running (if any) finishes before the handles close
        pass
    if reporter is not None:
        reporter.join(timeout=3)
    if ev is not None:
        ev.close()
    if cn is not None:
        cn.close()
    _log("info", f"stopped after {S.requests} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
