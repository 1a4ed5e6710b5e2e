"""kvfabric.gputurn: the turns of engine processes sharing one GPU, between real processes
(no GPU needed: a "pass" here is a sleep). One pass at a time; the earliest key (arrival plus
predicted time) goes next; a holder that dies frees the turn, a hung one loses it after
max_wait_s; a stopped waiter is passed over; a short pass runs beside a long one, one at a time,
or the long one yields to it at a layer boundary; one stopped inside the page's lock holds the others
up once; a decoding step yields to a pass for at most its bound; a page that is not a turn
page is started afresh."""

import contextlib
import fcntl
import multiprocessing as mp
import os
import signal
import tempfile
import time
import unittest

from kvfabric.gputurn import GpuTurn

CTX = mp.get_context("fork")


def _passes(path, n, hold_s, out):
    t = GpuTurn(path, max_wait_s=20)
    for _ in range(n):
        ticket, _ = t.acquire(hold_s)
        a = time.monotonic()
        time.sleep(hold_s)
        b = time.monotonic()
        t.release(ticket)
        out.put((os.getpid(), a, b, ticket is not None))
    t.close()


def _one(path, name, predicted_s, out):
    t = GpuTurn(path, max_wait_s=20)
    ticket, waited = t.acquire(predicted_s)
    out.put((name, ticket is not None, waited))
    time.sleep(0.05)
    t.release(ticket)
    t.close()


def _hold(path, seconds, ready, release, predicted_s=0.0, light=False):
    t = GpuTurn(path, max_wait_s=20)
    ticket, _ = t.acquire(predicted_s, light=light)
    ready.set()
    time.sleep(seconds)
    if release:
        t.release(ticket)
    os._exit(0)  # without closing: as a process killed holding it


class GpuTurnTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "turn")

    def tearDown(self):
        self.dir.cleanup()

    @contextlib.contextmanager
    def _page_locked(self):
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _waiter(self, t, name, predicted_s, out, waiting):
        """Starts a process that waits for the turn (_one), and waits until `waiting` do."""
        p = CTX.Process(target=_one, args=(self.path, name, predicted_s, out))
        p.start()
        self.assertTrue(self._until(lambda: t.waiting() == waiting))
        return p

    def _until(self, cond, limit=10.0):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if cond():
                return True
            time.sleep(0.01)
        return False

    def test_uncontended_turn_does_not_wait(self):
        with GpuTurn(self.path) as t:
            for _ in range(3):
                ticket, waited = t.acquire(0.01)
                self.assertIsNotNone(ticket)
                self.assertEqual(waited, 0.0)
                self.assertEqual(t.holder(), os.getpid())
                t.release(ticket)
                self.assertEqual(t.holder(), 0)
            self.assertEqual(t.stats()["passes"], 3)
            self.assertEqual(t.stats()["waited_passes"], 0)

    def test_one_pass_at_a_time_across_processes(self):
        out = CTX.Queue()
        procs = [CTX.Process(target=_passes, args=(self.path, 6, 0.02, out)) for _ in range(3)]
        for p in procs:
            p.start()
        rows = [out.get(timeout=30) for _ in range(18)]
        for p in procs:
            p.join(10)
            self.assertEqual(p.exitcode, 0)
        self.assertTrue(all(r[3] for r in rows), "every pass held the turn")
        rows.sort(key=lambda r: r[1])
        for prev, cur in zip(rows, rows[1:]):
            self.assertLessEqual(prev[2], cur[1] + 1e-4,
                                 f"passes of {prev[0]} and {cur[0]} overlapped")
        self.assertGreater(len({r[0] for r in rows}), 1)

    def test_earliest_key_goes_first(self):
        out = CTX.Queue()
        with GpuTurn(self.path) as t:
            ticket, _ = t.acquire(0)
            long_ = self._waiter(t, "long", 5.0, out, 1)
            short = self._waiter(t, "short", 0.01, out, 2)
            time.sleep(0.3)  # later than the long pass's arrival, earlier than its key
            late = self._waiter(t, "late", 6.0, out, 3)
            t.release(ticket)
            order = [out.get(timeout=30) for _ in range(3)]
            for p in (long_, short, late):
                p.join(10)
                self.assertEqual(p.exitcode, 0)
        self.assertEqual([o[0] for o in order], ["short", "long", "late"])
        self.assertTrue(all(o[1] for o in order))

    def test_a_short_pass_runs_beside_a_long_one(self):
        """Beside a holder predicted to take 3 s: a pass predicted 0.05 s goes at once (share 2:
        the holder has more than 0.1 s left), a second short one waits for that place, one
        predicted 1.5 s waits for the holder; with share 0 none goes beside."""
        ready, out = CTX.Event(), CTX.Queue()
        holder = CTX.Process(target=_hold, args=(self.path, 3.0, ready, True, 3.0))
        holder.start()
        try:
            self.assertTrue(ready.wait(10))
            with GpuTurn(self.path, share=0) as never:
                ticket, waited = never.acquire(0.05)  # waits for the holder: none beside
                self.assertGreater(waited, 1.0)
                self.assertFalse(never.last_beside)
                never.release(ticket)
        finally:
            holder.join(10)
        self.assertEqual(holder.exitcode, 0)
        ready = CTX.Event()
        holder = CTX.Process(target=_hold, args=(self.path, 3.0, ready, True, 3.0))
        holder.start()
        try:
            self.assertTrue(ready.wait(10))
            with GpuTurn(self.path) as t:
                ticket, waited = t.acquire(0.05)
                self.assertIsNotNone(ticket)
                self.assertLess(waited, 0.2)
                self.assertTrue(t.last_beside)
                self.assertEqual(t.stats()["beside_passes"], 1)
                second = self._waiter(t, "second", 0.05, out, 1)
                long_ = self._waiter(t, "long", 1.5, out, 2)
                time.sleep(0.3)
                t.release(ticket)  # the place beside is free: the short one, not the long one
                got = out.get(timeout=10)
                self.assertEqual(got[0], "second")
                self.assertGreater(got[2], 0.25)
                self.assertLess(got[2], 2.0)  # before the holder gave the turn back
                got = out.get(timeout=10)
                self.assertEqual(got[0], "long")
                self.assertGreater(got[2], 2.0)  # after it
                for p in (second, long_):
                    p.join(10)
                    self.assertEqual(p.exitcode, 0)
        finally:
            holder.join(10)
        self.assertEqual(holder.exitcode, 0)

    def test_two_light_passes_run_beside_each_other(self):
        """Beside a light holder with 0.6 s to go: a light pass predicted 0.5 s goes at once
        (the share rule alone would not let it: 2 x 0.5 s > 0.6 s); a pass of the same
        prediction that is not light waits, as does a light one where the holder is not light
        or the turn's light rule is off."""
        def held(light):
            ready = CTX.Event()
            h = CTX.Process(target=_hold, args=(self.path, 0.6, ready, True, 0.6, light))
            h.start()
            self.assertTrue(ready.wait(10))
            return h

        for holder_light, mine_light, rule, beside in ((True, True, True, True),
                                                       (True, False, True, False),
                                                       (False, True, True, False),
                                                       (True, True, False, False)):
            h = held(holder_light)
            try:
                with GpuTurn(self.path, light=rule) as t:
                    ticket, waited = t.acquire(0.5, light=mine_light)
                    self.assertIsNotNone(ticket)
                    case = (holder_light, mine_light, rule)
                    self.assertEqual(t.last_beside, beside, case)
                    if beside:
                        self.assertLess(waited, 0.2, case)
                        self.assertEqual(t.stats()["beside_passes"], 1)
                    else:
                        self.assertGreater(waited, 0.3, case)
                    t.release(ticket)
            finally:
                h.join(10)
            self.assertEqual(h.exitcode, 0)

    def test_light_rule_off_marks_no_pass_light(self):
        """An engine with the light rule off marks its passes as not light: another process's
        light pass does not go beside them; and a light pass does not take a place beside that
        another pass already has."""
        with GpuTurn(self.path, light=False) as off:
            ticket, _ = off.acquire(0.6, light=True)  # held, but not as light
            with GpuTurn(self.path, max_wait_s=0.5) as on:
                got, waited = on.acquire(0.5, light=True)
                self.assertFalse(on.last_beside)  # waited, then deposed the holder (0.5 s)
                self.assertGreater(waited, 0.3)
                on.release(got)
            off.release(ticket)
        ready = CTX.Event()
        h = CTX.Process(target=_hold, args=(self.path, 0.8, ready, True, 0.8, True))
        h.start()
        try:
            self.assertTrue(ready.wait(10))
            with GpuTurn(self.path) as a, GpuTurn(self.path) as b:
                t1, w1 = a.acquire(0.5, light=True)
                self.assertTrue(a.last_beside)  # the place beside: taken
                t2, w2 = b.acquire(0.5, light=True)
                self.assertFalse(b.last_beside)
                self.assertGreater(w2, 0.3)  # waited for a place
                a.release(t1)
                b.release(t2)
        finally:
            h.join(10)
        self.assertEqual(h.exitcode, 0)

    def test_a_long_pass_yields_to_an_earlier_key(self):
        """A holder whose pass yields (predicted 2 s): a later waiter of an earlier key (0.05 s)
        preempts it, gets the turn once the holder yields (not beside it), and the holder has
        it back under its own key after, before a waiter of a later key (5 s); that one never
        preempts it."""
        out = CTX.Queue()
        with GpuTurn(self.path) as t:
            ticket, _ = t.acquire(2.0, yields=True)
            self.assertFalse(t.preempted(ticket))
            late = self._waiter(t, "late", 5.0, out, 1)
            time.sleep(0.1)
            self.assertFalse(t.preempted(ticket), "a later key does not preempt")
            short = self._waiter(t, "short", 0.05, out, 2)
            self.assertTrue(self._until(lambda: t.preempted(ticket), 5))
            time.sleep(0.1)
            self.assertTrue(out.empty(), "the short pass waits for the yield, not beside")
            ticket, waited = t.yield_turn(ticket)
            self.assertIsNotNone(ticket)
            self.assertGreaterEqual(waited, 0.04)  # the short pass held it 0.05 s
            self.assertEqual(out.get(timeout=10)[0], "short")
            self.assertEqual(t.holder(), os.getpid())
            self.assertTrue(out.empty(), "the later key waits for the holder")
            self.assertFalse(t.preempted(ticket))
            t.release(ticket)
            self.assertEqual(out.get(timeout=10)[0], "late")
            for p in (late, short):
                p.join(10)
                self.assertEqual(p.exitcode, 0)
            st = t.stats()
            self.assertEqual((st["yields"], st["passes"], st["beside_passes"]), (1, 1, 0))
            # nobody waiting: given up and taken straight back, under the same lock
            ticket, _ = t.acquire(2.0, yields=True)
            again, waited = t.yield_turn(ticket)
            self.assertIsNotNone(again)
            self.assertEqual(waited, 0.0)
            self.assertEqual(t.holder(), os.getpid())
            t.release(again)
            # a ticket that no longer holds the turn: nothing given up, no turn to go on with
            self.assertEqual(t.yield_turn(again), (None, 0.0))
            self.assertFalse(t.last_yielded)

    def test_a_dead_holder_frees_the_turn(self):
        ready = CTX.Event()
        p = CTX.Process(target=_hold, args=(self.path, 0.2, ready, False))
        p.start()
        self.assertTrue(ready.wait(10))
        with GpuTurn(self.path, max_wait_s=20) as t:
            ticket, waited = t.acquire(0)
            p.join(10)
            self.assertIsNotNone(ticket)
            self.assertLess(waited, 5.0)
            self.assertEqual(t.stats()["timeouts"], 0)
            t.release(ticket)

    def test_a_hung_holder_is_deposed_after_max_wait(self):
        ready = CTX.Event()
        p = CTX.Process(target=_hold, args=(self.path, 3.0, ready, True))
        p.start()
        try:
            self.assertTrue(ready.wait(10))
            with GpuTurn(self.path, max_wait_s=0.3) as t:
                t0 = time.monotonic()
                ticket, waited = t.acquire(0)
                took = time.monotonic() - t0
                self.assertIsNotNone(ticket, "the turn is taken from the hung holder")
                self.assertEqual(t.holder(), os.getpid())
                self.assertLess(took, 2.5)
                t.release(ticket)
                self.assertEqual(t.waiting(), 0)
        finally:
            p.join(10)

    def test_a_stopped_waiter_is_passed_over(self):
        out = CTX.Queue()
        with GpuTurn(self.path) as t:
            ticket, _ = t.acquire(0)
            first = self._waiter(t, "stopped", 0.0, out, 1)
            with self._page_locked():  # not stopped inside the page's lock (the next test)
                os.kill(first.pid, signal.SIGSTOP)
            try:
                later = self._waiter(t, "later", 5.0, out, 2)
                t.release(ticket)
                name, held, waited = out.get(timeout=5)  # not behind the stopped one's key
                self.assertEqual(name, "later")
                self.assertTrue(held)
            finally:
                os.kill(first.pid, signal.SIGCONT)
            name, held, _ = out.get(timeout=10)
            self.assertEqual((name, held), ("stopped", True))
            for p in (first, later):
                p.join(10)
                self.assertEqual(p.exitcode, 0)

    def test_a_process_stopped_inside_the_lock_holds_the_others_up_once(self):
        with GpuTurn(self.path) as t:
            with self._page_locked():  # as a process stopped inside the page's lock
                t0 = time.monotonic()
                ticket, waited = t.acquire(0)
                self.assertIsNone(ticket)
                self.assertLess(time.monotonic() - t0, 3.0)
                self.assertEqual(t.stats()["lock_timeouts"], 1)
                t0 = time.monotonic()
                ticket, _ = t.acquire(0)  # the turns are off for a while: at once
                self.assertIsNone(ticket)
                self.assertLess(time.monotonic() - t0, 0.1)
                self.assertFalse(t.passes_pending())
                self.assertEqual(t.stats()["lock_timeouts"], 1)
            t._off_until = 0.0  # the off period over
            ticket, waited = t.acquire(0)
            self.assertIsNotNone(ticket)
            t.release(ticket)

    def test_a_decoding_step_yields_to_a_pass_for_at_most_its_bound(self):
        with GpuTurn(self.path) as t:
            self.assertEqual(t.yield_to_passes(1.0), 0.0, "nothing to yield to")
            ready = CTX.Event()
            p = CTX.Process(target=_hold, args=(self.path, 0.4, ready, True))
            p.start()
            self.assertTrue(ready.wait(10))
            waited = t.yield_to_passes(5.0)  # until the pass gives the turn back
            p.join(10)
            self.assertGreater(waited, 0.1)
            self.assertLess(waited, 4.0)
            self.assertFalse(t.passes_pending())
            ready = CTX.Event()
            p = CTX.Process(target=_hold, args=(self.path, 3.0, ready, True))
            p.start()
            try:
                self.assertTrue(ready.wait(10))
                waited = t.yield_to_passes(0.2)  # a long pass: the bound
                self.assertGreaterEqual(waited, 0.2)
                self.assertLess(waited, 1.5)
                self.assertTrue(t.passes_pending())
            finally:
                p.join(10)
            self.assertEqual(t.stats()["decode_yields"], 2)

    def test_a_foreign_page_is_started_afresh(self):
        with open(self.path, "wb") as f:
            f.write(os.urandom(4096))
        with GpuTurn(self.path) as t:
            self.assertEqual(t.waiting(), 0)
            ticket, waited = t.acquire(0)
            self.assertIsNotNone(ticket)
            self.assertEqual(waited, 0.0)
            t.release(ticket)

    def test_bad_settings_are_refused(self):
        with self.assertRaises(ValueError):
            GpuTurn(self.path, max_wait_s=0)
        with self.assertRaises(ValueError):
            GpuTurn(self.path, share=-1)
        with self.assertRaises(OSError):
            GpuTurn(os.path.join(self.dir.name, "no", "such", "dir"))


class EngineYieldHooksTest(unittest.TestCase):
    """kvfabric.engine's yield hooks without torch (a CPU device, layers that keep their hooks, a
    turn that says when it is preempted): a boundary asked about yields while preempted, counts
    only the yields that gave the turn up, tries at most MAX_YIELDS times a pass, and a pass
    whose turn was lost stops asking."""

    class Layer:
        def __init__(self):
            self.hooks = []

        def register_forward_pre_hook(self, fn):
            layer = self

            class Handle:
                def remove(self):
                    layer.hooks.remove(fn)
            self.hooks.append(fn)
            return Handle()

    class Turn:
        def __init__(self, answers):
            self.answers = list(answers)  # per yield_turn: (ticket, seconds, gave it up)
            self.asked = self.yields = 0
            self.last_yielded = False

        def preempted(self, ticket):
            self.asked += 1
            return bool(self.answers)

        def yield_turn(self, ticket):
            self.yields += 1
            t, sec, gave = self.answers.pop(0)
            self.last_yielded = gave
            return t, sec

    def engine(self, answers, layers=12):
        import types
        from kvfabric.engine import Engine
        e = Engine.__new__(Engine)  # the hooks' attributes only: no model here
        e._torch, e.device = None, types.SimpleNamespace(type="cpu")
        e.layers = [self.Layer() for _ in range(layers)]
        e.gpu_turn, e._turn = self.Turn(answers), 7
        return e

    def run_pass(self, e, yielded):
        hs = e._yield_hooks(yielded)
        self.assertEqual(len(hs), len(e.layers) - 1)  # not before the first layer
        for layer in e.layers:
            for fn in list(layer.hooks):
                fn(layer, ())
        for h in hs:
            h.remove()
        self.assertTrue(all(not layer.hooks for layer in e.layers))

    def test_yields_while_preempted_and_counts_the_real_ones(self):
        from kvfabric.engine import MAX_YIELDS
        e = self.engine([(8, 0.02, True), (8, 0.0, False), (9, 0.03, True)])
        yielded = [0, 0.0]
        self.run_pass(e, yielded)
        self.assertEqual(e.gpu_turn.yields, 3)
        self.assertEqual(yielded[0], 2)
        self.assertAlmostEqual(yielded[1], 0.05)
        self.assertEqual(e._turn, 9)
        # preempted at every boundary, the turn never given up: at most MAX_YIELDS tries
        e = self.engine([(7, 0.0, False)] * 40, layers=32)
        self.run_pass(e, [0, 0.0])
        self.assertEqual(e.gpu_turn.yields, MAX_YIELDS)
        # the turn lost in a yield (None): no more asking
        e = self.engine([(None, 0.0, False), (7, 0.0, True)])
        self.run_pass(e, [0, 0.0])
        self.assertEqual((e.gpu_turn.yields, e.gpu_turn.asked, e._turn), (1, 1, None))


if __name__ == "__main__":
    unittest.main()
