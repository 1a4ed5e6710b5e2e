"""The HTTP side of `python -m kvfabric.serve` (docs/python.md, "Serving"): kvf-engine's API
(`POST /v1/prefill`, `/v1/decode`, `/v1/generate`, `GET /v1/health`, `/metrics`) over the
standard library's threaded server, the bearer check before a body is read, the first token
streamed where asked, and a client that went away noticed. The requests themselves are the
Server's (serve.py)."""

from __future__ import annotations

import hmac
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

MAX_BODY = 64 << 20
BODIES_MAX = 4 * MAX_BODY  # every connection's body being read, together (as transport/httpd.c)
BODY_DEADLINE_S = 60.0  # a body must arrive within this long of its headers


def _client_gone(sock: socket.socket) -> bool:
    """Whether the client closed its connection (a peek: nothing is read). Bytes waiting (a
    pipelined request) mean it is still there."""
    try:
        # The handler's socket has a timeout, under which recv waits for data first: it is
        # asked only once poll says there is something (bytes, the end, or an error) to read.
        if not select.select([sock], [], [], 0)[0]:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError, TimeoutError, ValueError):
        return False
    except OSError:
        return True


class HttpServer(ThreadingHTTPServer):
    """The engine's HTTP server: the standard library's, listening with a backlog of 1,024 (the
    kernel's somaxconn caps it) where the library's is 5. Past its backlog a new connection's SYN
    is dropped and its client sends it again a second later: a burst of requests from clients
    that open new connections (the e2e's replay sends bursts of 9-11 at one instant, and its
    baseline routed most of a burst to one engine) waited a second more for some of them."""
    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bodies = 0  # bytes of BODIES_MAX reserved by the bodies being read now
        self.bodies_lock = threading.Lock()

    def reserve(self, n: int) -> bool:
        """Takes n bytes of the bodies' budget: False where they would not fit."""
        with self.bodies_lock:
            if self.bodies + n > BODIES_MAX:
                return False
            self.bodies += n
            return True

    def release(self, n: int) -> None:
        with self.bodies_lock:
            self.bodies -= n


def handler(S: Any, log: Callable[[str, str], None]) -> type:
    """The request handler class of the engine's HTTP API over S (kvfabric.serve's Server:
    its job(), health(), metrics_text(), tokens and options a); log(level, message)."""
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # a client that stops sending loses its connection, not a thread forever

        def log_message(self, fmt: str, *args: Any) -> None:
            if S.a.log_level == "debug":
                log("debug", fmt % args)

        def setup(self) -> None:
            super().setup()
            # A reply is written in parts (its headers, then its body; a stream's lines): each
            # part goes out at once, not after the client's delayed acknowledgement of the last.
            try:
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

        def _chunk(self, data: bytes, last: bool = False) -> None:
            """One chunk of a chunked reply (with last, the chunk that ends it too)."""
            out = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
            self.wfile.write(out + (b"0\r\n\r\n" if last else b""))

        def _post_job(self, kind: str, body: Any) -> None:
            """Runs the request; where it streams, its first token is sent the moment its pass
            gives it ({"first_token": T} on a line of its own), and its answer follows as the
            last line (an error there has "status"): application/x-ndjson, chunked."""
            streamed = []  # True once the first line went out; False where the client left

            def first(tok: int) -> None:
                if streamed:
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/x-ndjson")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self._chunk(json.dumps({"first_token": int(tok), "label": "real"}).encode() +
                                b"\n")
                    streamed.append(True)
                except OSError:  # the client left: the request goes on, its answer unsent
                    self.close_connection = True
                    streamed.append(False)

            status, out = S.job(kind, body, gone=lambda: _client_gone(self.connection),
                                first=first)
            if not streamed:
                if status == 499:  # nobody to answer
                    self.close_connection = True
                    return
                self._send(status, out)
                return
            if not streamed[0] or status == 499:
                self.close_connection = True
                return
            if status != 200:
                out = dict(out, status=status)
            try:
                self._chunk(json.dumps(out).encode() + b"\n", last=True)
            except OSError:
                self.close_connection = True

        def _send(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                data = S.metrics_text().encode()
                self.send_response(200)
                self.send_header("Content-Type", METRICS_CONTENT_TYPE)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if self.path != "/v1/health":
                self._send(404, {"error": f"GET {self.path}: not served"})
                return
            self._send(200, S.health())

        def _read_body(self, n: int) -> Optional[bytes]:
            """The body's n bytes, or None where the client stopped or took longer than
            BODY_DEADLINE_S (a byte now and then would keep the socket's timeout from firing)."""
            parts, got, t0 = [], 0, time.monotonic()
            while got < n:
                if time.monotonic() - t0 > BODY_DEADLINE_S:
                    return None
                b = self.rfile.read1(min(n - got, 1 << 20))
                if not b:
                    return None
                parts.append(b)
                got += len(b)
            return b"".join(parts)

        def do_POST(self) -> None:
            try:
                n = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                n = -1
            if S.tokens is not None:  # before the body is read: strangers send nothing big
                got = self.headers.get("Authorization", "")
                if not got.startswith("Bearer ") or not any(
                        hmac.compare_digest(got[7:].encode(), t.encode())
                        for t in S.tokens.values()):
                    self.close_connection = True
                    self._send(401, {"error": "a valid bearer token is required"})
                    return
            if n <= 0 or n > MAX_BODY:
                self.close_connection = True
                self._send(413 if n > MAX_BODY else 400,
                           {"error": f"a JSON body of 1 to {MAX_BODY} bytes is required"})
                return
            if not self.server.reserve(n):  # many half-sent bodies must not take the memory
                self.close_connection = True
                self._send(503, {"error": f"busy: {BODIES_MAX} bytes of request bodies are being "
                                          "received, the most this engine holds; retry later"})
                return
            try:
                raw = self._read_body(n)
            finally:
                self.server.release(n)
            if raw is None:
                self.close_connection = True
                return
            try:
                body = json.loads(raw)
            except ValueError as e:
                self._send(400, {"error": f"the body is not JSON: {e}"})
                return
            if self.path not in ("/v1/prefill", "/v1/decode", "/v1/generate"):
                self._send(404, {"error": f"POST {self.path}: not served (prefill, decode, "
                                          "generate)"})
                return
            self._post_job(self.path[4:], body)

    return H
