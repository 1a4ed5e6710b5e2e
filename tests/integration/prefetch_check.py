#!/usr/bin/env python3
"""kvf-engine's prefetch through its HTTP API, against a real kvf-store on loopback: a request
that finds the engine busy fetches its cached prefix while it waits and loads it at its turn
(the reply's "prefetch": what arrived by the plan's deadline), giving the tokens a full recompute
gives; with a deadline already past at its turn, what had arrived is loaded and the rest
computed, tokens still identical; an idle engine and --prefetch off load at the request's turn
instead; a bad load_deadline_ms is refused with 400. The plan's sources: an engine on two stores
whose prompt's chunks are on the first only fetches them all from it when the plan names it; a
source naming an unknown store is passed over; an idle engine's layerwise load over TCP takes
the chunks from the store the plan names, and those it lacks from their own store in the same
load; bad sources are refused with 400.

usage: prefetch_check.py KVF_STORE KVF_ENGINE
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

PROCS = []


def fail(msg):
    print("prefetch_check: FAIL: " + msg)
    for p in PROCS:
        p.kill()
    for p in PROCS:  # what the daemons said (a sanitizer's report, say)
        p.errlog.seek(0)
        tail = p.errlog.read()[-3000:]
        if tail.strip():
            print("---- stderr of %s:\n%s" % (p.args[0], tail))
    sys.exit(1)


def spawn(args):
    err = tempfile.TemporaryFile(mode="w+")
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    p.errlog = err
    PROCS.append(p)
    for _ in range(50):
        line = p.stdout.readline()
        if not line:
            break
        if "listen=" in line:
            return p, line.split("listen=")[1].split()[0]
    fail("%s did not start" % args[0])


def post(addr, path, body, timeout=300):
    req = urllib.request.Request("http://%s%s" % (addr, path), data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
    except OSError as e:  # the daemon died or hung: say so with its stderr
        fail("%s %s: %s" % (addr, path, e))


def tokens(seed, n):
    out, z = [], seed
    for _ in range(n):
        z = (z * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append((z >> 33) % 512)
    return out


def busy_then(addr, long_body, body):
    """Sends long_body, and body while the engine is on it; returns body's reply."""
    out = {}

    def first():
        out["long"] = post(addr, "/v1/generate", long_body)
    t = threading.Thread(target=first)
    t.start()
    # The long request holds the engine once the health endpoint shows it running.
    for _ in range(3000):
        with urllib.request.urlopen("http://%s/v1/health" % addr, timeout=10) as r:
            h = json.loads(r.read())
        if h.get("running"):
            break
        time.sleep(0.01)
    else:
        fail("the long request never held the engine")
    st, rep = post(addr, "/v1/generate", body)
    t.join(300)
    if out.get("long", (0,))[0] != 200:
        fail("the long request: %r" % (out.get("long"),))
    return st, rep


def main():
    store_bin, engine_bin = sys.argv[1], sys.argv[2]
    try:
        _, store = spawn([store_bin, "--listen", "127.0.0.1:0", "--memory", "256M",
                          "--log-level", "warn"])
        _, eng = spawn([engine_bin, "--serve", "--id", "e1", "--role", "both", "--store", store,
                        "--listen", "127.0.0.1:0", "--max-tokens", "16384", "--log-level",
                        "warn"])
        _, eng_off = spawn([engine_bin, "--serve", "--id", "e2", "--role", "both", "--store",
                            store, "--listen", "127.0.0.1:0", "--max-tokens", "16384",
                            "--prefetch", "off", "--log-level", "warn"])
        # Sizes a sanitizer build still runs in seconds: a 1000-token prompt (15 chunks cached)
        # and a 5000-token one that holds the engine meanwhile.
        prompt = tokens(7, 1000)
        other = tokens(8, 1000)
        longp = tokens(9, 5000)
        # The reference: computed whole, nothing reused.
        st, ref = post(eng, "/v1/generate", {"tokens": prompt, "max_tokens": 4, "reuse": False})
        if st != 200:
            fail("reference: %d %r" % (st, ref))
        # Warm the store with the prompt's chunks (another engine's pages, so not e1's).
        st, _ = post(eng_off, "/v1/generate", {"tokens": prompt, "max_tokens": 1})
        if st != 200:
            fail("warm-up")
        # Its save completes after the reply: wait until the store has the 15 chunks.
        for _ in range(1200):
            with urllib.request.urlopen("http://%s/v1/health" % eng_off, timeout=10) as r:
                c = json.loads(r.read())["connector"]
            if c["chunks_saved"] + c["chunks_existing"] >= 15:
                break
            time.sleep(0.05)
        else:
            fail("the warm-up's save did not complete: %r" % c)
        for bad in ([1, -1], [1, 4294967296], [1, 2.5]):
            st, rep = post(eng, "/v1/prefill", {"tokens": bad})
            if st != 400 or "token id" not in rep.get("error", ""):
                fail("tokens %r: %d %r" % (bad, st, rep))
        st, rep = post(eng, "/v1/generate", {"tokens": prompt[:40], "reuse": None,
                                            "max_tokens": 2})
        if st != 200:
            fail("reuse null (as absent): %d %r" % (st, rep))
        # A client that goes away mid-generation: the engine stops decoding for it (counted as
        # abandoned) instead of generating thousands of tokens nobody reads.
        body = json.dumps({"tokens": prompt[:40], "max_tokens": 16000, "reuse": False}).encode()
        host, port = eng.rsplit(":", 1)
        sk = socket.create_connection((host, int(port)), timeout=10)
        sk.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        for _ in range(1000):
            with urllib.request.urlopen("http://%s/v1/health" % eng, timeout=10) as r:
                if json.loads(r.read()).get("running"):
                    break
            time.sleep(0.01)
        sk.close()
        for _ in range(600):  # 60 s at most (a sanitizer build decodes slowly)
            with urllib.request.urlopen("http://%s/v1/health" % eng, timeout=10) as r:
                h = json.loads(r.read())
            if h.get("abandoned", 0) >= 1 and not h.get("running"):
                break
            time.sleep(0.1)
        else:
            fail("the abandoned generation was not stopped: %r" % h)
        # Bad deadlines: refused.
        for bad in (-1, "soon", 1e9):
            st, rep = post(eng, "/v1/prefill", {"tokens": prompt, "load_deadline_ms": bad})
            if st != 400 or "load_deadline_ms" not in rep.get("error", ""):
                fail("load_deadline_ms %r: %d %r" % (bad, st, rep))
        # Busy engine, generous deadline: the prefix is prefetched whole and loaded.
        st, rep = busy_then(eng, {"tokens": longp, "max_tokens": 1, "reuse": False},
                            {"tokens": prompt, "max_tokens": 4, "load_deadline_ms": 60000})
        pf = rep.get("prefetch")
        if st != 200 or not pf or pf["label"] != "real":
            fail("prefetch not used: %d %r" % (st, rep))
        if pf["tokens"] != 960 or pf["ready_tokens"] != 960 or pf["deadline_missed"]:
            fail("prefetch: %r" % pf)
        if rep["loaded_tokens"] != 960 or rep["tokens"] != ref["tokens"]:
            fail("prefetched load: loaded %d, tokens %r vs %r"
                 % (rep["loaded_tokens"], rep["tokens"], ref["tokens"]))
        # A deadline of 0 ms, counted from arrival: past by the request's turn. What had arrived
        # by then is loaded (possibly all of it on loopback), the rest computed; tokens exact.
        st, rep = busy_then(eng, {"tokens": longp, "max_tokens": 1, "reuse": False},
                            {"tokens": prompt, "max_tokens": 4, "load_deadline_ms": 0.001})
        pf = rep.get("prefetch")
        if st != 200 or not pf or rep["tokens"] != ref["tokens"] or \
                rep["loaded_tokens"] != min(pf["ready_tokens"], 960) or pf["wait_s"] > 1.0:
            fail("past deadline: %d %r" % (st, rep))
        # An idle engine loads layer by layer instead: no prefetch.
        st, rep = post(eng, "/v1/generate", {"tokens": other, "max_tokens": 1})
        if st != 200 or "prefetch" in rep:
            fail("idle engine prefetched: %r" % rep)
        # --prefetch off: never.
        st, rep = busy_then(eng_off, {"tokens": longp, "max_tokens": 1, "reuse": False},
                            {"tokens": prompt, "max_tokens": 4, "load_deadline_ms": 60000})
        if st != 200 or "prefetch" in rep or rep["tokens"] != ref["tokens"]:
            fail("--prefetch off: %r" % rep)
        # Beyond --prefetch-memory (1K here, less than one chunk): loaded at its turn instead.
        _, eng_small = spawn([engine_bin, "--serve", "--id", "e3", "--role", "both", "--store",
                              store, "--listen", "127.0.0.1:0", "--max-tokens", "16384",
                              "--prefetch-memory", "1K", "--log-level", "warn"])
        st, rep = busy_then(eng_small, {"tokens": longp, "max_tokens": 1, "reuse": False},
                            {"tokens": prompt, "max_tokens": 4, "load_deadline_ms": 60000})
        if st != 200 or "prefetch" in rep or rep["tokens"] != ref["tokens"] or \
                rep["loaded_tokens"] != 960:
            fail("--prefetch-memory 1K: %r" % rep)
        # The plan's sources. Bad ones: refused, naming the field.
        for bad in ("here", [{"store": 7, "from": 0, "tokens": 960}],
                    [{"store": store, "from": -1, "tokens": 960}],
                    [{"store": store, "from": 0}], [{"more": True}] * 65):
            st, rep = post(eng, "/v1/prefill", {"tokens": prompt, "sources": bad})
            if st != 400 or "sources" not in rep.get("error", ""):
                fail("sources %r: %d %r" % (str(bad)[:60], st, rep))
        # An engine on two stores, the prompt's chunks on the first only (the warm-up's): its own
        # lookup finds the chunks whose node is the first, up to the first whose node is the
        # second; the plan names the first for all 960 tokens, and the prefetch takes them all
        # from it (those whose node is the second asked of the first), tokens identical.
        _, store2 = spawn([store_bin, "--listen", "127.0.0.1:0", "--memory", "64M",
                           "--log-level", "warn"])
        _, eng2 = spawn([engine_bin, "--serve", "--id", "e5", "--role", "both", "--store",
                         store + "," + store2, "--listen", "127.0.0.1:0", "--max-tokens",
                         "16384", "--log-level", "warn"])
        src = [{"node": 0, "store": store, "near": "host", "tier": "dram", "from": 0,
                "tokens": 960}, {"more": True}]
        st, rep = busy_then(eng2, {"tokens": longp, "max_tokens": 1, "reuse": False},
                            {"tokens": prompt, "max_tokens": 4, "load_deadline_ms": 60000,
                             "sources": src})
        pf = rep.get("prefetch")
        with urllib.request.urlopen("http://%s/v1/health" % eng2, timeout=10) as r:
            c = json.loads(r.read())["connector"]
        if st != 200 or not pf or pf["ready_tokens"] != 960 or rep["loaded_tokens"] != 960 or \
                rep["tokens"] != ref["tokens"]:
            fail("prefetch from the plan's sources: %d %r %r" % (st, rep, c))
        # 15 chunks over two nodes: some have the second as their own (2^-15 odds of none)
        if not 1 <= c["prefetch_named"] < 15 or c["prefetch_named_missed"] != 0:
            fail("named chunks: %r" % c)
        named = c["prefetch_named"]
        # A source naming a store the engine does not use: passed over, counted.
        st, rep = busy_then(eng2, {"tokens": longp, "max_tokens": 1, "reuse": False},
                            {"tokens": prompt, "max_tokens": 4, "load_deadline_ms": 60000,
                             "sources": [{"store": "127.0.0.1:1", "from": 0, "tokens": 960}]})
        with urllib.request.urlopen("http://%s/v1/health" % eng2, timeout=10) as r:
            c = json.loads(r.read())["connector"]
        if st != 200 or rep["tokens"] != ref["tokens"] or c["prefetch_sources_unknown"] != 1 or \
                c["prefetch_named"] != named:
            fail("unknown source: %d %r %r" % (st, rep, c))
        # An idle engine's layerwise load follows the plan too. Two stores that serve TCP only
        # (a remote store's way); the prompt's chunks on their own nodes (e6's warm-up) and all
        # of them on the second as well (e7, an engine on it alone). The plan names the second
        # for all 960 tokens: e6 takes every chunk from it, none asked again; then, with the
        # second's copies evicted, those whose own node is the first are asked of it in the same
        # load. Tokens identical every time.
        _, s3 = spawn([store_bin, "--listen", "127.0.0.1:0", "--memory", "64M", "--shm", "off",
                       "--log-level", "warn"])
        _, s4 = spawn([store_bin, "--listen", "127.0.0.1:0", "--memory", "64M", "--shm", "off",
                       "--log-level", "warn"])
        _, eng6 = spawn([engine_bin, "--serve", "--id", "e6", "--role", "both", "--store",
                         s3 + "," + s4, "--listen", "127.0.0.1:0", "--max-tokens", "16384",
                         "--log-level", "warn"])
        _, eng7 = spawn([engine_bin, "--serve", "--id", "e7", "--role", "both", "--store", s4,
                         "--listen", "127.0.0.1:0", "--max-tokens", "16384", "--log-level",
                         "warn"])

        def saved(addr):
            with urllib.request.urlopen("http://%s/v1/health" % addr, timeout=10) as r:
                c = json.loads(r.read())["connector"]
            return c["chunks_saved"] + c["chunks_existing"]

        for e in (eng6, eng7):
            st, rep = post(e, "/v1/generate", {"tokens": prompt, "max_tokens": 1})
            if st != 200:
                fail("warm-up of %s" % e)
            # what it found stored (the other's chunks on its nodes) is not saved again
            for _ in range(1200):
                if saved(e) >= 15 - rep["loaded_tokens"] // 64:
                    break
                time.sleep(0.05)
            else:
                fail("the warm-up's save on %s did not complete" % e)
        plan = [{"store": s4, "from": 0, "tokens": 960}]

        def idle_planned():
            """The prompt on e6 at rest, its pages holding another prompt: loaded at its turn."""
            st, _ = post(eng6, "/v1/generate", {"tokens": other, "max_tokens": 1,
                                                "reuse": False})
            if st != 200:
                fail("another prompt on e6")
            return post(eng6, "/v1/generate", {"tokens": prompt, "max_tokens": 4,
                                               "sources": plan})

        st, rep = idle_planned()
        if st != 200 or "prefetch" in rep or rep["tokens"] != ref["tokens"] or \
                rep["loaded_tokens"] != 960 or not 1 <= rep.get("load_named", 0) < 15 or \
                rep["load_named_reasked"] != 0:
            fail("idle load from the plan's store: %d %r" % (st, rep))
        idle_named = rep["load_named"]
        # The second store emptied, then e6's chunks saved again (those whose own node is the
        # second: the pages still hold the prompt, whose save starts at chunk 0).
        kvf_bin = os.path.join(os.path.dirname(engine_bin), "kvf")

        def clear_node(node):
            ev = subprocess.run([kvf_bin, "clear", "--node", node], capture_output=True,
                                text=True, timeout=60)
            if ev.returncode != 0:
                fail("kvf clear: %d %r" % (ev.returncode, ev.stderr))

        def save_again(eng, name):
            """The prompt generated on eng again, and its 15 chunks' save waited for (bounded)."""
            before = saved(eng)
            st, rep = post(eng, "/v1/generate", {"tokens": prompt, "max_tokens": 1})
            if st != 200:
                fail("%s's save again: %d %r" % (name, st, rep))
            for _ in range(1200):
                if saved(eng) >= before + 15:
                    return
                time.sleep(0.05)
            fail("%s's second save did not complete" % name)

        clear_node(s4)
        save_again(eng6, "e6")
        st, rep = idle_planned()
        if st != 200 or rep["tokens"] != ref["tokens"] or rep["loaded_tokens"] != 960 or \
                rep["load_named"] != idle_named or rep["load_named_reasked"] != idle_named:
            fail("idle load, the plan's store emptied: %d %r" % (st, rep))
        # The other way round: every chunk on the second again (e7's save starts at chunk 0: its
        # pages hold the prompt), the first emptied. Its own stores lack the chunks whose own
        # node is the first; the plan's store has them: the lookup counts them (named) and the
        # load takes them from it, nothing asked again.
        save_again(eng7, "e7")
        clear_node(s3)
        st, rep = idle_planned()
        if st != 200 or rep["tokens"] != ref["tokens"] or rep["loaded_tokens"] != 960 or \
                rep["load_named"] != idle_named or rep["load_named_reasked"] != 0:
            fail("idle load, the chunks' own store emptied: %d %r" % (st, rep))
        bad = subprocess.run([engine_bin, "--serve", "--id", "e4", "--store", store,
                              "--prefetch-memory", "lots"], capture_output=True, text=True,
                             timeout=60)
        if bad.returncode != 2 or "--prefetch-memory" not in bad.stderr:
            fail("--prefetch-memory lots: exit %d, %r" % (bad.returncode, bad.stderr))
        print("prefetch_check: ok (prefetched 960 tokens while waiting, tokens identical; past "
              "deadline handled; idle, --prefetch off and beyond --prefetch-memory load at "
              "their turn; the plan's sources followed: %d chunks asked of the named store, "
              "all 960 tokens loaded; an idle engine's load took %d chunks from the named "
              "store, with that store emptied the same load asked their own store for them, "
              "and with their own store emptied it found and loaded them from the named one; "
              "bad sources refused)" % (named, idle_named))
    finally:
        for p in PROCS:
            p.terminate()
        for p in PROCS:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
