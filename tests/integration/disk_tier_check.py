#!/usr/bin/env python3
"""kvf-store's disk tier through the daemon (docs/store.md, "The disk tier"), with the Python
binding as the client:

- fill: 4x the arena put; what eviction demoted is found (EXISTS, LOOKUP) and read back byte-exact
  through TCP; a restart serves what was on disk, rebuilt from the log; EVICT and CLEAR remove
  from both tiers, and stay removed across a restart;
- crash: rounds of SIGKILL at random moments of a write-heavy load; after each restart every
  object the store reports is read back byte-exact (none partial, none stale);
- flipped bytes: bytes of the tier's file changed while the store is down are misses (counted as
  verification failures), never wrong bytes;
- a failing device ($KVF_DISK_FAULT, the I/O layer's fault hook): the tier goes down, the store
  keeps serving DRAM, and says so in STATS;
- events name the tier: a kvf-sched subscribed to the store's events counts, per tier, exactly
  the chunks the store holds (DRAM entries, disk entries), through demotion, the log reusing its
  extents on a small disk, EVICT and CLEAR; and the store says which tier holds each key;
- a file system too small for the tier: the store refuses to start, naming ENOSPC and the free
  space, and leaves no file behind (it checks before posix_fallocate, which would fill it);
- several devices: keys spread over two; both fill, a restart serves both; one device failing
  ($KVF_DISK_FAULT=write:N@1) goes down alone while the other goes on demoting and serving;
- promotion when hot (--disk-promote N, 2 by default): an object's first read back from disk is
  served and let go (it stays on disk only); its second stays in DRAM; with 1 every read stays
  (and --disk-nice 7 puts the tier's threads, and only them, at niceness 7);
- COPY (a move's push to a --peer node) of keys only the disk holds: read back first, the peer
  gets them byte-exact, and the request's DRAM hits are not evicted for their room;
- write-through (--disk-write-through pinned,hits:2): pinned and twice-read entries are copied to
  disk while they stay in DRAM, and after kill -9 the restarted store serves them, and only them;
- large objects (5 MiB): demoted straight from the arena's page-aligned blocks (STATS
  written_direct), read back byte-exact, across a restart and after SIGKILL at random moments of
  their writing.

usage: disk_tier_check.py   (environment: KVF_STORE_BIN, KVF_LIBRARY, PYTHONPATH with python/;
                             kvf-sched is taken from KVF_STORE_BIN's folder)
Exit 77 (skipped) where io_uring or O_DIRECT is refused here (the store says which).
"""

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import json
import urllib.request

import kvfabric as kvf

STORE = os.environ["KVF_STORE_BIN"]
failures = []
T_END = time.time() + 420  # every loop below is bounded by this too


def check(cond, what):
    if not cond:
        failures.append(what)
        print("disk_tier_check: FAIL: " + what, flush=True)


class Store:
    def __init__(self, disk, memory="32M", disk_size="512M", env=None, extra=()):
        disks = []
        for d in (disk if isinstance(disk, list) else [disk]):
            disks += ["--disk", "%s:%s" % (d, disk_size)]
        self.p = subprocess.Popen(
            [STORE, "--listen", "127.0.0.1:0", "--memory", memory, "--no-prefault", "--shm", "off",
             "--threads", "2"] + disks + list(extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        line = self.p.stdout.readline()
        if "listen=" not in line:
            err = self.p.stderr.read()
            self.p.wait(timeout=10)
            if "io_uring" in err or "O_DIRECT" in err:
                print("disk_tier_check: skipped: " + err.strip().splitlines()[-1])
                sys.exit(77)
            raise SystemExit("disk_tier_check: FAIL: kvf-store did not start: %r" % err)
        self.addr = line.split("listen=")[1].split()[0]
        self.events = line.split("events=")[1].split()[0] if "events=" in line else None
        self.snapshot = line.split("snapshot=")[1].split()[0] if "snapshot=" in line else None
        # the log is read on its own thread, so a full pipe never stops the store
        self.log = []
        self.reader = threading.Thread(target=lambda: self.log.extend(self.p.stderr), daemon=True)
        self.reader.start()

    def stop(self):
        self.p.terminate()
        rc = self.p.wait(timeout=60)
        self.reader.join(timeout=10)  # the log whole, to its last line
        check(rc == 0, "kvf-store exited %s on SIGTERM" % rc)
        if rc != 0:
            time.sleep(0.2)
            sys.stdout.write("".join(self.log[-80:]))

    def kill(self):
        self.p.kill()
        self.p.wait(timeout=30)


LAYOUT = kvf.Layout.preset("ref-tiny")


def make(ks, salt, n, seg):
    rnd = random.Random(salt)
    keys = ks.keys([rnd.randrange(1 << 30) for _ in range(64 * n)])
    objs = [kvf.Object.encode(k, LAYOUT, 64, [rnd.randbytes(seg) for _ in range(LAYOUT.layers)])
            for k in keys]
    return keys, objs


def settle(c, what):
    """Waits (bounded) until no demotion is queued."""
    d = {}
    for _ in range(200):
        d = c.stats()["disk"]
        if d["pending_bytes"] == 0:
            return d
        time.sleep(0.05)
    check(False, "%s: demotions still queued after 10 s: %r" % (what, d))
    return d


def read_back(c, keys, objs, what, cap=4 << 20):
    """Every key the store reports is read back byte-exact. Returns how many it reports."""
    present = c.exists(keys)
    wrong = 0
    for i in [i for i, p in enumerate(present) if p]:
        (st, data), = c.get([keys[i]], cap)
        if st == "KVF_OK" and data != objs[i]:
            wrong += 1
        # a miss here is allowed only for a key the tier dropped meanwhile; counted below
    check(wrong == 0, "%s: %d object(s) read back wrong" % (what, wrong))
    return sum(present)


def fill_past_arena(c, keys, objs, want_on_disk, what, pause=0.0):
    """Puts keys 4 at a time (2x the arena: eviction demotes the oldest), waits for the
    demotions, then (bounded) until want_on_disk keys are on disk only. Returns each key's
    tier."""
    for i in range(0, len(keys), 4):
        check(c.put(keys[i:i + 4], objs[i:i + 4]) == ["KVF_OK"] * 4, "%s: put" % what)
        if pause:
            time.sleep(pause)
    settle(c, what)
    tiers = []
    for _ in range(100):  # the last demotions' records written out
        tiers = c.tiers(keys)
        if tiers.count("disk") >= want_on_disk:
            break
        time.sleep(0.05)
    return tiers


def phase_fill(tmp):
    disk = os.path.join(tmp, "fill.disk")
    ks = kvf.KeySpace(LAYOUT, salt="disk-fill")
    keys, objs = make(ks, 1, 512, 64 << 10)  # 512 x 256 KiB: 4x the 32 MiB arena
    s = Store(disk)
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        for i in range(0, len(keys), 4):
            st = c.put(keys[i:i + 4], objs[i:i + 4])
            check(st == ["KVF_OK"] * 4, "put %d: %r" % (i, st))
            # a paced writer, so that the demotion queue (8 MiB) keeps up: it waits (bounded)
            # while half the queue is pending (a slow disk or a sanitizer build writes slower
            # than this loop puts, and a full queue drops what eviction would demote, by design)
            for _ in range(100):
                if c.stats()["disk"]["pending_bytes"] <= 4 << 20:
                    break
                time.sleep(0.01)
        d = settle(c, "fill")
        check(d["demoted"] > 250, "fill: only %d entries demoted" % d["demoted"])
        n = read_back(c, keys, objs, "fill")
        check(n >= 0.7 * len(keys), "fill: %d of %d objects kept (DRAM + disk)" % (n, len(keys)))
        lead = c.lookup_prefix(keys)
        check(lead >= 8, "fill: LOOKUP's leading hits %d: the disk's are not counted" % lead)
        d = c.stats()["disk"]
        check(d["promoted"] > 0 and d["verify_failures"] == 0,
              "fill: promotions %d, verification failures %d" % (d["promoted"],
                                                                 d["verify_failures"]))
        on_disk = d["entries"]
        before = c.exists(keys)
    s.stop()
    s = Store(disk)
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        d = c.stats()["disk"]
        check(d["rebuilt_entries"] == on_disk,
              "restart: %d entries rebuilt, %d were on disk" % (d["rebuilt_entries"], on_disk))
        after = c.exists(keys)
        check(sum(after) == on_disk and all(b for a, b in zip(after, before) if a),
              "restart: %d reported, %d on disk before" % (sum(after), on_disk))
        read_back(c, keys, objs, "restart")
        gone = [k for k, a in zip(keys, after) if a][:5]
        check(c.evict(gone) == ["KVF_OK"] * len(gone), "evict of disk entries")
        check(not any(c.exists(gone)), "evicted entries still reported")
        cleared = c.clear()
        check(cleared >= on_disk - len(gone), "clear removed %d of %d" % (cleared, on_disk))
        check(not any(c.exists(keys)), "clear left entries")
    s.stop()
    s = Store(disk)
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        check(not any(c.exists(keys)), "evicted and cleared entries came back after a restart")
    s.stop()


def start_writer(s, ks, keys, objs, step, pause, deadline_ms):
    """A thread putting objs step at a time (pause s between puts) until done, stopped, or the
    store is killed under it. Returns the thread and its stop event."""
    stop = threading.Event()

    def writer():
        try:
            with kvf.Client([s.addr], ks.seed, transport="tcp", deadline_ms=deadline_ms) as c:
                for i in range(0, len(keys), step):
                    if stop.is_set():
                        return
                    c.put(keys[i:i + step], objs[i:i + step])
                    if pause:
                        time.sleep(pause)
        except Exception:
            pass  # the store was killed under it

    w = threading.Thread(target=writer)
    w.start()
    return w, stop


def kill_while_writing(s, w, stop, rnd, lo, hi, join_s):
    """SIGKILL to store s at a random moment lo..hi s into writer w's writing, then w stopped."""
    time.sleep(rnd.uniform(lo, hi))
    s.kill()
    stop.set()
    w.join(timeout=join_s)


def phase_crash(tmp, rounds=6):
    disk = os.path.join(tmp, "crash.disk")
    ks = kvf.KeySpace(LAYOUT, salt="disk-crash")
    rnd = random.Random(7)
    put_keys, put_objs = [], []
    survived = on_disk = 0
    for r in range(rounds):
        if time.time() > T_END:
            break
        # a small arena: demotion starts within the first megabytes, long before the kill
        s = Store(disk, memory="4M", disk_size="256M")
        keys, objs = make(ks, 100 + r, 120, rnd.choice([16 << 10, 64 << 10]))
        kill_while_writing(s, *start_writer(s, ks, keys, objs, 4, 0, 2000), rnd, 0.2, 1.2, 30)
        put_keys += keys
        put_objs += objs
        s = Store(disk, memory="4M", disk_size="256M")
        with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
            n = read_back(c, put_keys, put_objs, "crash round %d" % r)
            print("disk_tier_check: crash round %d: %d of %d objects reported after SIGKILL, all "
                  "read back byte-exact" % (r, n, len(put_keys)), flush=True)
            survived += n
            d = c.stats()["disk"]
            check(d["devices_down"] == 0, "crash round %d: the tier is down" % r)
            on_disk = d["entries"]
        s.stop()
    check(survived > 0, "crash: nothing was reported after any of %d rounds" % rounds)
    return disk, ks, put_keys, put_objs, on_disk


def phase_flip(disk, ks, keys, objs, on_disk):
    """on_disk: the objects the tier held when the store last stopped."""
    size = os.path.getsize(disk)
    rnd = random.Random(3)
    with open(disk, "r+b") as f:
        for off in range(1 << 20, min(size, 64 << 20), 97 << 10):
            f.seek(off + rnd.randrange(4096))
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    s = Store(disk, memory="4M", disk_size="256M")
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        read_back(c, keys, objs, "flipped bytes")
        d = c.stats()["disk"]
        # a flip in a record's data is a verification failure when read; one in a header ends
        # its extent's scan at the rebuild: fewer objects than were there
        check(d["verify_failures"] > 0 or d["rebuilt_entries"] < on_disk,
              "flipped bytes: nothing detected (%d objects before, %r)" % (on_disk, d))
    s.stop()


def phase_fault(tmp):
    disk = os.path.join(tmp, "fault.disk")
    ks = kvf.KeySpace(LAYOUT, salt="disk-fault")
    keys, objs = make(ks, 9, 256, 64 << 10)
    s = Store(disk, env={"KVF_DISK_FAULT": "write:2"})
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        for i in range(0, len(keys), 4):
            st = c.put(keys[i:i + 4], objs[i:i + 4])
            check(st == ["KVF_OK"] * 4, "put with a failing disk: %r" % st)
        d = c.stats()["disk"]
        for _ in range(400):  # bounded: the queued demotions reach the failing writes
            if d["devices_down"] == 1:
                break
            time.sleep(0.05)
            d = c.stats()["disk"]
        check(d["devices_down"] == 1, "a failing device is not marked down: %r" % d)
        tail = keys[-8:]
        got = c.get(tail, 4 << 20)
        check([g[1] for g in got] == objs[-8:], "DRAM gets with the tier down")
        check(s.p.poll() is None, "kvf-store died with its disk")
    s.stop()
    check(any("down" in l for l in s.log), "the tier's failure is not logged")


class Sched:
    """A kvf-sched subscribed to one store's events; its per-tier counts of the store's chunks."""

    def __init__(self, store_addr, events, snapshot=None):
        sched_bin = os.path.join(os.path.dirname(STORE), "kvf-sched")
        snap = ["--store-snapshots", snapshot] if snapshot else []
        self.p = subprocess.Popen([sched_bin, "--listen", "127.0.0.1:0", "--stores", store_addr,
                                   "--store-events", events, "--log-level", "warn"] + snap,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        check("listen=" in line, "kvf-sched did not start: %r" % line)
        self.addr = line.split("listen=")[1].split()[0] if "listen=" in line else None

    def stats(self):
        with urllib.request.urlopen("http://%s/v1/index/stats" % self.addr, timeout=5) as r:
            return json.loads(r.read())

    def agree(self, c, what):
        """Waits (bounded, 20 s) until its per-tier counts are the store's."""
        want = got = None
        for _ in range(200):
            st = c.stats()
            want = (st["entries"], st["disk"]["entries"])
            x = self.stats()
            got = (x["store_dram_chunks"], x["store_disk_chunks"])
            if got == want and st["disk"]["pending_bytes"] == 0:
                return x
            time.sleep(0.1)
        check(False, "%s: kvf-sched counts (dram, disk) %r, the store holds %r" % (what, got, want))
        return None

    def stop(self):
        self.p.terminate()
        self.p.wait(timeout=30)


def phase_events(tmp):
    """A 64 MiB disk under a 32 MiB arena, 4x the arena put: demotions, then extents reused."""
    disk = os.path.join(tmp, "events.disk")
    ks = kvf.KeySpace(LAYOUT, salt="disk-events")
    keys, objs = make(ks, 5, 512, 64 << 10)
    extra = ["--events", "127.0.0.1:0", "--node", "0"]
    s = Store(disk, disk_size="64M", extra=extra)
    check(s.events is not None, "kvf-store did not say its events endpoint")
    sc = Sched(s.addr, s.events)
    try:
        time.sleep(0.5)  # the subscription is made before the first change
        with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
            for i in range(0, len(keys), 4):
                st = c.put(keys[i:i + 4], objs[i:i + 4])
                check(st == ["KVF_OK"] * 4, "put %d: %r" % (i, st))
                time.sleep(0.002)
                # Paced by the writer (a loaded machine, a sanitizer build): evictions while the
                # demotion queue (a quarter of the arena, 8 MiB) is full are not demoted, and the
                # disk would not fill to the point of reusing extents.
                for _ in range(300):
                    if c.stats()["disk"]["pending_bytes"] <= 4 << 20:
                        break
                    time.sleep(0.01)
            settle(c, "events")
            d = c.stats()["disk"]
            check(d["demoted"] > 0, "events: nothing demoted: %r" % d)
            x = sc.agree(c, "after the fill")
            reused = c.stats()["disk"]
            print("disk_tier_check: events: %d in DRAM, %d on disk, %d dropped by extent reuse "
                  "(kvf-sched agrees: %s)" % (c.stats()["entries"], reused["entries"],
                                               reused["dropped"], x is not None), flush=True)
            check(reused["dropped"] > 0, "events: the small disk's log reused no extent: %r"
                  % reused)
            # which tier holds each key, as the store says it (EXISTS with the tiers flag)
            tiers = c.tiers(keys)
            st = c.stats()
            check((tiers.count("dram"), tiers.count("disk")) == (st["entries"],
                                                                 st["disk"]["entries"]),
                  "tiers: %d in DRAM and %d on disk said, the store holds %d and %d"
                  % (tiers.count("dram"), tiers.count("disk"), st["entries"],
                     st["disk"]["entries"]))
            check(all((t is not None) == p for t, p in zip(tiers, c.exists(keys))),
                  "tiers and EXISTS disagree")
            # a kvf-sched that subscribes now, to an idle store, learns both tiers from the
            # store's snapshot socket at first contact
            check(s.snapshot not in (None, "-"), "kvf-store did not say its snapshot endpoint")
            late = Sched(s.addr, s.events, s.snapshot)
            try:
                x = late.agree(c, "a late subscriber, by snapshot")
                # a snapshot is counted at its end marker, which may come just after its last
                # batch was applied (and the counts agreed): bounded, 5 s
                for _ in range(50):
                    if x is None or x["store_snapshots"] >= 1:
                        break
                    time.sleep(0.1)
                    x = late.stats()
                check(x is not None and x["store_snapshots"] >= 1,
                      "the late subscriber took no snapshot: %r" % x)
                # and keeps agreeing as the store changes after it
                c.evict(keys[1::5])
                late.agree(c, "a late subscriber, after EVICT")
                print("disk_tier_check: events: a late kvf-sched learnt %s chunk(s) in DRAM and "
                      "%s on disk by snapshot" % ((x or {}).get("store_dram_chunks"),
                                                   (x or {}).get("store_disk_chunks")), flush=True)
            finally:
                late.stop()
        # a restart: DRAM is lost, the disk's objects are told a second after open, to a kvf-sched
        # subscribed to the node's events address before it came back (as one that outlives a
        # store's restart is; one that subscribes later learns them by snapshot, as above)
        sc.stop()
        old = s.addr
        s.stop()
        with socket.socket() as so:
            so.bind(("127.0.0.1", 0))
            port = so.getsockname()[1]
        sc = Sched(old, "tcp://127.0.0.1:%d" % port)
        s = Store(disk, disk_size="64M", extra=["--events", "127.0.0.1:%d" % port, "--node", "0"])
        with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
            x = sc.agree(c, "after a restart")
            d = c.stats()["disk"]
            check(d["announced"] == d["entries"] and d["entries"] > 0,
                  "events: the restarted store told what its disk held: %r" % d)
            c.evict(keys[::3])
            sc.agree(c, "after EVICT")
            c.clear()
            sc.agree(c, "after CLEAR")
            x = sc.stats()
            check(x["malformed"] == 0, "kvf-sched found malformed events: %r" % x)
    finally:
        sc.stop()
        s.stop()


def phase_full(tmp):
    disk = os.path.join(tmp, "full.disk")
    st = os.statvfs(tmp)
    want = st.f_bavail * st.f_frsize * 2 + (1 << 30)
    p = subprocess.run([STORE, "--listen", "127.0.0.1:0", "--memory", "8M", "--no-prefault",
                        "--disk", "%s:%d" % (disk, want)], capture_output=True, text=True,
                       timeout=60)
    check(p.returncode != 0 and "No space left" in p.stderr and "free" in p.stderr,
          "full: a tier larger than the file system: rc %s, %r" % (p.returncode, p.stderr))
    check(not os.path.exists(disk), "full: the refused tier's file was left behind")


def phase_devices(tmp):
    disks = [os.path.join(tmp, "dev0.disk"), os.path.join(tmp, "dev1.disk")]
    ks = kvf.KeySpace(LAYOUT, salt="disk-devices")
    keys, objs = make(ks, 11, 320, 64 << 10)  # 2.5x the arena
    s = Store(disks, disk_size="256M")
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        for i in range(0, len(keys), 4):
            check(c.put(keys[i:i + 4], objs[i:i + 4]) == ["KVF_OK"] * 4, "devices: put %d" % i)
            time.sleep(0.002)
        d = settle(c, "devices")
        per = [x["entries"] for x in d["device_list"]]
        check(len(per) == 2 and min(per) > 0 and sum(per) == d["entries"],
              "devices: both devices hold objects: %r" % d["device_list"])
        before = read_back(c, keys, objs, "devices", 1 << 20)
    s.stop()
    s = Store(disks, disk_size="256M")
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        after = read_back(c, keys, objs, "devices after a restart", 1 << 20)
        check(after == c.stats()["disk"]["entries"] and after > 0 and after <= before,
              "devices: a restart serves what both devices held (%d, before %d)" % (after, before))
    s.stop()
    # one of the two failing: it goes down alone, the other goes on
    disks = [os.path.join(tmp, "dev2.disk"), os.path.join(tmp, "dev3.disk")]
    s = Store(disks, disk_size="256M", env={"KVF_DISK_FAULT": "write:3@1"})
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        for i in range(0, len(keys), 4):
            check(c.put(keys[i:i + 4], objs[i:i + 4]) == ["KVF_OK"] * 4, "devices: put %d" % i)
            time.sleep(0.002)
        d = settle(c, "one device failing")
        for _ in range(200):
            if d["devices_down"] == 1:
                break
            time.sleep(0.05)
            d = c.stats()["disk"]
        dl = d["device_list"]
        check(d["devices_down"] == 1 and dl[0]["down"] == "" and dl[1]["down"] != "",
              "devices: device 1 alone down: %r" % dl)
        check(dl[0]["entries"] > 0, "devices: device 0 goes on demoting: %r" % dl)
        got = read_back(c, keys, objs, "devices, one down", 1 << 20)
        check(got >= dl[0]["entries"], "devices: device 0's objects served (%d)" % got)
        check(s.p.poll() is None, "kvf-store died with one device")
    s.stop()


def refused(args, what, says):
    """kvf-store with args must exit non-zero at start, its message holding says."""
    try:
        p = subprocess.run([STORE, "--listen", "127.0.0.1:0", "--memory", "8M", "--no-prefault",
                            "--shm", "off"] + args, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:  # it started and served (run() killed it)
        check(False, "%s: it started" % what)
        return
    check(p.returncode != 0 and says in p.stderr,
          "%s: rc %s, %r" % (what, p.returncode, p.stderr.strip()[-300:]))


def phase_exclusive(tmp):
    """One writer per file: a second store on a file in use, or one store naming it twice under
    two spellings (a link, "./"), is refused, and the first store's objects stay exact. An
    existing file opened with another size is formatted anew with a warning, not silently."""
    disk = os.path.join(tmp, "excl.disk")
    ks = kvf.KeySpace(LAYOUT, salt="disk-exclusive")
    keys, objs = make(ks, 13, 96, 64 << 10)
    s = Store(disk, memory="8M", disk_size="128M")
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        for i in range(0, len(keys), 4):  # 3x the arena: the oldest go to disk
            check(c.put(keys[i:i + 4], objs[i:i + 4]) == ["KVF_OK"] * 4, "exclusive: put %d" % i)
        settle(c, "exclusive")
        refused(["--disk", disk + ":128M"], "exclusive: a second store on a file in use",
                "in use")
        link = os.path.join(tmp, "excl.link")
        os.symlink(disk, link)
        refused(["--disk", link + ":128M"], "exclusive: a second store through a link", "in use")
        before = read_back(c, keys, objs, "exclusive, after the refusals")
        check(before > 0, "exclusive: the first store's objects are served")
    s.stop()
    other = os.path.join(tmp, "twice.disk")
    rel = os.path.relpath(other)
    refused(["--disk", other + ":64M", "--disk", "./" + rel + ":64M"],
            "exclusive: one store naming a file twice under two spellings", "in use")
    # another size: formatted anew, said with a warning
    s = Store(disk, memory="8M", disk_size="160M")
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        check(c.stats()["disk"]["entries"] == 0, "exclusive: another layout is read as empty")
    s.stop()
    log = "".join(s.log)
    check("formatted anew" in log and "another --disk SIZE" in log,
          "exclusive: no warning when another size formats the file: %r" % log[-400:])
    s = Store(disk, memory="8M", disk_size="160M")
    s.stop()
    check("formatted anew" not in "".join(s.log), "exclusive: a warning on a plain restart")


def thread_niceness(pid):
    """The niceness of each thread of pid (None without /proc)."""
    try:
        out = []
        for tid in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
                out.append(int(f.read().rsplit(")", 1)[1].split()[16]))
        return out
    except OSError:
        return None


def phase_promote(tmp):
    for promote in (2, 1):
        disk = os.path.join(tmp, "promote%d.disk" % promote)
        ks = kvf.KeySpace(LAYOUT, salt="disk-promote")
        keys, objs = make(ks, 13, 256, 64 << 10)  # 2x the arena
        # with promote 1, the tier's threads run at niceness 7 (--disk-nice): they and only
        # they, and the data the same
        nice = 7 if promote == 1 else 0
        s = Store(disk, extra=["--disk-promote", str(promote), "--disk-nice", str(nice)])
        # each thread sets its own niceness as it starts: wait (5 s at most) for all five
        niced = thread_niceness(s.p.pid)
        for _ in range(100):
            if niced is None or niced.count(7) == (5 if nice else 0):
                break
            time.sleep(0.05)
            niced = thread_niceness(s.p.pid)
        if niced is not None:
            check(niced.count(7) == (5 if nice else 0) and niced.count(0) >= 2,
                  "--disk-nice %d: the threads' niceness %r (the tier's 4 readers and writer at "
                  "it, the loops at 0)" % (nice, niced))
        with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
            tiers = fill_past_arena(c, keys, objs, 8, "promote", pause=0.002)
            cold = [k for k, t in zip(keys, tiers) if t == "disk"][:8]
            want = [objs[keys.index(k)] for k in cold]
            check(len(cold) == 8, "promote: 8 keys on disk only: %r" % tiers.count("disk"))
            got = c.get(cold, 1 << 20)
            check([g[1] for g in got] == want, "promote: first reads from disk byte-exact")
            after = c.tiers(cold)
            d = c.stats()["disk"]
            if promote == 2:
                check(after == ["disk"] * len(cold) and d["served_not_kept"] >= len(cold),
                      "promote 2: a first read is served and let go: %r %r" % (after, d))
                got = c.get(cold, 1 << 20)
                check([g[1] for g in got] == want, "promote: second reads byte-exact")
                after = c.tiers(cold)
            check(after == ["dram"] * len(cold),
                  "promote %d: read %d time(s), the objects stay in DRAM: %r"
                  % (promote, promote, after))
        s.stop()


def phase_copy(tmp):
    """COPY (the admin's push to a --peer node, the first half of a move) of keys that only the
    disk holds: read back from disk first, and the peer gets them byte-exact; with them the
    4 oldest keys in DRAM, which the promotions' room would evict first were they not held."""
    peer = Store([], memory="64M")
    disk = os.path.join(tmp, "copy.disk")
    s = Store(disk, extra=["--peer", peer.addr])
    ks = kvf.KeySpace(LAYOUT, salt="disk-copy")
    keys, objs = make(ks, 17, 256, 64 << 10)  # 2x the arena
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        tiers = fill_past_arena(c, keys, objs, 64, "copy")
        # up to 64 (a demotion the full queue turned down is not on disk: 61 in a run under
        # ThreadSanitizer); 32 promotions' room already evicts far more than the 4 oldest
        cold = [k for k, t in zip(keys, tiers) if t == "disk"][:64]
        check(len(cold) >= 32, "copy: 32 keys or more on disk only: %r" % tiers.count("disk"))
        hot = [k for k, t in zip(keys, tiers) if t == "dram"][:4]
        # to a node that is not a peer: refused, and nothing read back from disk for it
        promoted = c.stats()["disk"]["promoted"]
        st = c.copy(cold[:8], "127.0.0.1:1")
        check(st == ["KVF_EACCES"] * 8, "copy: to a node not a peer: %r" % st)
        check(c.stats()["disk"]["promoted"] == promoted,
              "copy: nothing read back from disk for a copy refused")
        st = c.copy(cold + hot, peer.addr)
        check(st == ["KVF_OK"] * len(cold + hot), "copy: disk-only and DRAM keys pushed: %r" % st)
        check(c.stats()["disk"]["promoted"] >= len(cold), "copy: the disk's keys read back")
    with kvf.Client([peer.addr], ks.seed, transport="tcp") as p:
        got = p.get(cold + hot, 1 << 20)
        want = [objs[keys.index(k)] for k in cold + hot]
        check([g[1] for g in got] == want, "copy: the peer holds them byte-exact")
    s.stop()
    peer.stop()


def phase_write_through(tmp):
    disk = os.path.join(tmp, "wt.disk")
    ks = kvf.KeySpace(LAYOUT, salt="disk-wt")
    keys, objs = make(ks, 7, 64, 64 << 10)  # 64 x 256 KiB: half the arena, nothing evicted
    s = Store(disk, extra=["--disk-write-through", "pinned,hits:2"])
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        for i in range(0, len(keys), 4):
            check(c.put(keys[i:i + 4], objs[i:i + 4]) == ["KVF_OK"] * 4, "wt: put %d" % i)
        check(c.pin(keys[:8], 60000) == ["KVF_OK"] * 8, "wt: pin")
        for _ in range(2):
            got = c.get(keys[8:16], 4 << 20)
            check([g[1] for g in got] == objs[8:16], "wt: reads of the hot keys")
        c.get(keys[16:24], 4 << 20)  # read once: not hot
        d = settle(c, "write-through")
        for _ in range(100):  # the writer writes its buffer out once its queue is dry
            if d["entries"] >= 16:
                break
            time.sleep(0.05)
            d = c.stats()["disk"]
        check(d["written_through"] == 16 and d["entries"] == 16 and d["demoted"] == 0,
              "wt: 16 copies to disk expected: %r" % d)
        check(c.tiers(keys) == ["dram"] * len(keys), "wt: every key still in DRAM")
    s.kill()
    s = Store(disk, extra=["--disk-write-through", "pinned,hits:2"])
    with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
        present = c.exists(keys)
        check(present == [True] * 16 + [False] * (len(keys) - 16),
              "wt: after kill -9, the pinned and hot keys and only them: %r" % present)
        got = c.get(keys[:16], 4 << 20)
        check([g[1] for g in got] == objs[:16], "wt: the written-through objects read back")
    s.stop()


def phase_large(tmp, rounds=3):
    disk = os.path.join(tmp, "large.disk")
    ks = kvf.KeySpace(LAYOUT, salt="disk-large")
    rnd = random.Random(11)
    put_keys, put_objs = [], []
    direct = on_disk = read_direct = 0
    for r in range(rounds):
        if time.time() > T_END:
            break
        s = Store(disk, memory="48M", disk_size="512M")
        # 5 MiB objects (1.25 MiB a layer): 2.5x the arena a round, each demotion a large record
        rk = random.Random(300 + r)
        keys = ks.keys([rk.randrange(1 << 30) for _ in range(64 * 24)])  # 24 chunks
        objs = [kvf.Object.encode(k, LAYOUT, 64, [rk.randbytes(5 << 18)
                                                  for _ in range(LAYOUT.layers)]) for k in keys]
        w, stop = start_writer(s, ks, keys, objs, 1, 0.01, 5000)
        if r == 0:
            w.join(timeout=120)  # the first round whole: then a restart, not a kill
            with kvf.Client([s.addr], ks.seed, transport="tcp") as c:
                d = settle(c, "large")
                direct = d["written_direct"]
                on_disk = d["entries"]  # what a restart keeps (DRAM's do not outlive it)
            s.stop()
        else:
            kill_while_writing(s, w, stop, rnd, 0.3, 1.5, 60)
        put_keys += keys
        put_objs += objs
        s = Store(disk, memory="48M", disk_size="512M")
        with kvf.Client([s.addr], ks.seed, transport="tcp", deadline_ms=10000) as c:
            n = read_back(c, put_keys, put_objs, "large round %d" % r, cap=8 << 20)
            print("disk_tier_check: large round %d: %d of %d objects reported after %s, all read "
                  "back byte-exact" % (r, n, len(put_keys), "a restart" if r == 0 else "SIGKILL"),
                  flush=True)
            if r == 0:
                check(n == on_disk and n >= 8,
                      "large: %d objects reported after a restart, %d were on disk" % (n, on_disk))
            d = c.stats()["disk"]
            read_direct += d["read_direct"]
            check(d["devices_down"] == 0 and d["verify_failures"] == 0,
                  "large round %d: devices down %d, verification failures %d"
                  % (r, d["devices_down"], d["verify_failures"]))
        s.stop()
    check(direct > 0, "large: no object was written straight from the arena (written_direct 0)")
    check(read_direct > 0, "large: no object was read straight into the arena (read_direct 0)")


def main():
    base = os.environ.get("KVF_DISK_TEST_DIR") or os.getcwd()
    only = os.environ.get("KVF_DISK_TEST_ONLY", "")
    with tempfile.TemporaryDirectory(dir=base, prefix="kvf-disk-") as tmp:
        phases = [("fill", phase_fill),
                  ("crash", lambda t: phase_flip(*phase_crash(t))),
                  ("fault", phase_fault), ("events", phase_events),
                  ("write_through", phase_write_through), ("promote", phase_promote),
                  ("copy", phase_copy),
                  ("devices", phase_devices), ("full", phase_full), ("large", phase_large),
                  ("exclusive", phase_exclusive)]
        for name, run in phases:
            if only in ("", name):
                t0 = time.time()
                run(tmp)
                print("disk_tier_check: phase %s took %.1f s" % (name, time.time() - t0),
                      flush=True)
    if failures:
        print("disk_tier_check: %d failure(s)" % len(failures))
        sys.exit(1)
    print("disk_tier_check: ok")


main()
