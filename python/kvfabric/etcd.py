"""Registration in etcd for Python processes (docs/membership.md): a key held under a lease that
a thread keeps alive, as kvf-store, kvf-sched and kvf-engine do through the C library's
membership module. etcd's v3 JSON gateway over the standard library only (no etcd package is
needed): keys and values base64, int64s as strings.

    m = EtcdMember("http://10.0.0.2:2379,http://10.0.0.3:2379", "/kvfabric/prod/engines/e0",
                   json.dumps(record), ttl=5, exclusive=True)
    ...
    m.stop()   # revokes the lease: the key goes at once
"""

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

__all__ = ["EtcdError", "EtcdMember", "wait_healthy"]


class EtcdError(RuntimeError):
    """No etcd member answered, or etcd refused what was asked."""


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def wait_healthy(url: str, seconds: float = 10.0) -> bool:
    """Whether the etcd member at url ("http://HOST:PORT") says it is healthy within seconds."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=1) as r:
                if json.loads(r.read()).get("health") == "true":
                    return True
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


class _Client:
    """etcd's members in turn: a call that gets no HTTP answer goes to the next; the member that
    answered is asked first next time. Each call is bounded by timeout seconds."""

    def __init__(self, endpoints: str, timeout: float = 2.0):
        self.members: List[str] = []
        for e in endpoints.split(","):
            e = e.strip()
            if not e:
                continue
            if "://" not in e:
                e = "http://" + e
            if not e.startswith("http://"):
                raise EtcdError(f"etcd: {e!r}: only http:// endpoints are spoken")
            self.members.append(e.rstrip("/"))
        if not self.members:
            raise EtcdError("etcd: no endpoint given")
        self.cur = 0
        self.timeout = timeout

    def call(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        data = json.dumps(body).encode()
        why = "no member tried"
        for t in range(len(self.members)):
            m = (self.cur + t) % len(self.members)
            req = urllib.request.Request(self.members[m] + path, data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    self.cur = m
                    return json.loads(r.read() or b"{}")
            except urllib.error.HTTPError as e:
                self.cur = m
                raise EtcdError(f"etcd {self.members[m]}{path}: HTTP {e.code}: "
                                f"{e.read()[:200]!r}") from None
            except (OSError, ValueError) as e:
                why = f"{self.members[m]}: {e}"
        raise EtcdError(f"etcd: no member answered ({why})")


class EtcdMember:
    """key = value under a lease of ttl seconds, renewed every third of it by a daemon thread. A
    lease lost (the process was cut off from etcd for longer than the TTL) is granted again and
    the key put again. exclusive: take the key only where nobody holds it, waiting up to
    wait seconds (default two TTLs and a second) for a previous holder's lease to lapse."""

    def __init__(self, endpoints: str, key: str, value: str, ttl: int = 5,
                 exclusive: bool = False, wait: Optional[float] = None, log=None):
        if not 2 <= ttl <= 3600:
            raise EtcdError("etcd: a lease of 2 to 3600 s")
        self.c = _Client(endpoints)
        self.key, self.value, self.ttl, self.exclusive = key, value, ttl, exclusive
        self.log = log or (lambda level, msg: None)
        self.lease = 0
        self.registered = False
        self.rejoins = 0
        self._stop = threading.Event()
        self._join(2 * ttl + 1 if wait is None else wait)
        self._renewed = time.monotonic()
        self._th = threading.Thread(target=self._keepalive, name="etcd-lease", daemon=True)
        self._th.start()

    def _join(self, wait: float) -> None:
        lease = self.c.call("/v3/lease/grant", {"TTL": str(self.ttl)}).get("ID")
        if not lease:
            raise EtcdError("etcd: a lease grant without an id")
        put = {"key": _b64(self.key), "value": _b64(self.value), "lease": lease}
        until = time.monotonic() + wait
        try:
            while True:
                if not self.exclusive:
                    self.c.call("/v3/kv/put", put)
                    break
                r = self.c.call("/v3/kv/txn", {
                    "compare": [{"key": _b64(self.key), "target": "CREATE",
                                 "create_revision": "0"}],
                    "success": [{"request_put": put}],
                    "failure": [{"request_range": {"key": _b64(self.key)}}]})
                if r.get("succeeded"):
                    break
                kvs = (r.get("responses") or [{}])[0].get("response_range", {}).get("kvs", [])
                holder = base64.b64decode(kvs[0].get("value", "")).decode() if kvs else ""
                if time.monotonic() >= until or self._stop.is_set():
                    raise EtcdError(f"etcd: {self.key} is held by another process ({holder})")
                time.sleep(0.25)
        except BaseException:
            try:
                self.c.call("/v3/lease/revoke", {"ID": lease})
            except EtcdError:
                pass
            raise
        self.lease = lease
        self.registered = True

    def list(self, prefix: str) -> Dict[str, str]:
        """The keys under prefix now, with their values (one range request)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # the range [prefix, end): all under it
        r = self.c.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return {base64.b64decode(kv.get("key", "")).decode(errors="replace"):
                base64.b64decode(kv.get("value", "")).decode(errors="replace")
                for kv in r.get("kvs", [])}

    def _keepalive(self) -> None:
        period = self.ttl / 3
        warned = False
        while not self._stop.wait(period):
            try:
                if self.registered:
                    r = self.c.call("/v3/lease/keepalive", {"ID": self.lease})
                    if int((r.get("result") or r).get("TTL", 0) or 0) > 0:
                        self._renewed = time.monotonic()
                        warned = False
                        continue
                lapsed = True
            except EtcdError as e:
                lapsed = time.monotonic() - self._renewed >= self.ttl
                if not lapsed:
                    if not warned:
                        self.log("warn", f"etcd: cannot renew {self.key} ({e}); trying again")
                    warned = True
                    continue
            if lapsed:
                if self.registered:
                    self.log("warn", f"etcd: the lease of {self.key} has lapsed; "
                                     "registering again")
                self.registered = False
                try:
                    self._join(0)
                    self._renewed = time.monotonic()
                    self.rejoins += 1
                    self.log("info", f"etcd: {self.key} registered again")
                    warned = False
                except EtcdError as e:
                    if not warned:
                        self.log("warn", f"etcd: cannot register {self.key} again yet: {e}")
                    warned = True

    def stop(self) -> None:
        """Stops renewing and revokes the lease: the key goes at once."""
        self._stop.set()
        self._th.join(timeout=10)
        if self.registered:
            try:
                self.c.call("/v3/lease/revoke", {"ID": self.lease})
            except EtcdError as e:
                self.log("warn", f"etcd: cannot revoke the lease of {self.key} ({e}): it lapses "
                                 f"in {self.ttl} s")
            self.registered = False
