#!/usr/bin/env python3
"""kvf-engine --serve against requests a hostile or careless client sends (docs/security.md): a
body larger than the engine's capacity admits is refused on its headers, before it is read and
parsed (the limit follows --max-tokens), and the handoff's fields are range-checked. Each case
failed before its mend (a 64 MiB limit whatever the capacity; first_token and expect_cached only
checked to be integers).

    engine_input_check.py BIN_DIR
"""

import os
import re
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_util import alive, fail, http  # noqa: E402

BIN = sys.argv[1]


def start(args):
    p = subprocess.Popen([os.path.join(BIN, args[0])] + args[1:], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    fields = dict(re.findall(r"(\w+)=(\S+)", p.stdout.readline()))
    if "listen" not in fields:
        p.kill()
        fail("%s did not start" % args[0])
    return p, fields["listen"]


def raw_post(addr, path, length, send):
    """POST announcing `length` bytes and sending `send` of them; the status line and the body
    received, and the seconds to the answer."""
    host, port = addr.rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   "Content-Length: %d\r\n\r\n" % (path, length)).encode())
        try:
            s.sendall(b"[" * send)
        except OSError:
            pass  # the server answered and closed on the headers
        data = b""
        try:
            while b"\r\n\r\n" not in data or len(data) < 64:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
    return data.decode(errors="replace"), time.monotonic() - t0


procs = []
try:
    store, saddr = start(["kvf-store", "--listen", "127.0.0.1:0", "--memory", "64M"])
    procs.append(store)
    engine, addr = start(["kvf-engine", "--serve", "--id", "e0", "--role", "both", "--listen",
                          "127.0.0.1:0", "--store", saddr, "--max-tokens", "1024",
                          "--log-level", "error"])
    procs.append(engine)
    url = "http://%s/v1/generate" % addr
    # 1,024 tokens admit a body of 1 MiB + 24 KiB: 4 MiB is refused on its headers, unread
    reply, secs = raw_post(addr, "/v1/generate", 4 << 20, 4096)
    if not reply.startswith("HTTP/1.1 413"):
        fail("a 4 MiB body to an engine of 1,024 tokens: %r" % reply[:200])
    if "capacity" in reply:
        fail("the 4 MiB body was read and parsed before it was refused: %r" % reply[-300:])
    # a prompt the capacity admits, written loosely (ten-digit ids, one per line), is read
    loose = ("{\"max_tokens\": 2, \"tokens\": [\n" +
             ",\n".join("    %d" % (4000000000 + i) for i in range(1000)) + "\n]}").encode()
    st, body = http("POST", url, loose, timeout=60)
    if st != 200:
        fail("a 1,000-token prompt written loosely (%d bytes): %d %r" % (len(loose), st, body))
    prompt = list(range(1, 130))
    for field, value in (("first_token", -7), ("first_token", 2 ** 32 + 5),
                         ("expect_cached", -1), ("expect_cached", len(prompt) + 1)):
        st, body = http("POST", url, {"tokens": prompt, "max_tokens": 2, field: value})
        if st != 400 or field not in str(body):
            fail("%s %d: %d %r (400 naming it expected)" % (field, value, st, body))
    st, body = http("POST", url, {"tokens": prompt, "max_tokens": 2, "first_token": 5,
                                  "expect_cached": len(prompt)})
    if st != 200:
        fail("first_token and expect_cached in range: %d %r" % (st, body))
    if not alive(engine.pid):
        fail("kvf-engine died")
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
print("engine_input_check: ok")
