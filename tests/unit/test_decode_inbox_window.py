"""The decode worker's inbox (decode_worker.service._LoopInbox) with a stream window (#12): while
outputs flow, the event loop drains it once per window on a timer, and an engine step wakes the
loop only for an urgent output (the finish, a failure, a stream's first) or when no timer runs;
every output still reaches its stream, in order. Window 0: every step wakes the loop, as before."""

from __future__ import annotations

import asyncio
import threading
import time

from engine.outputs import RequestOutput
from engine.request import FinishReason


def _out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        rid, [token], [token], "", "", finished, FinishReason.LENGTH if finished else None, 0, 0
    )


class _Loop:
    """``call_soon_threadsafe`` (wake-ups) and ``call_later`` (timers) recorded, run by the test."""

    def __init__(self) -> None:
        self.wakeups: list = []
        self.timers: list = []

    def call_soon_threadsafe(self, fn, *args) -> None:
        self.wakeups.append((fn, args))

    def call_later(self, delay, fn, *args) -> None:
        self.timers.append((delay, fn, args))

    def run_wakeup(self) -> None:
        fn, args = self.wakeups.pop(0)
        fn(*args)

    def run_timer(self) -> None:
        _, fn, args = self.timers.pop(0)
        fn(*args)


def _step(inbox, outs) -> None:
    """One engine step's hand-out, as EngineLoop does it (held around the puts)."""
    inbox.hold()
    try:
        for q, o in outs:
            q.put(o)
    finally:
        inbox.release()


def _drained(q) -> list[int]:
    got = []
    while not q._q.empty():
        got.extend(q.get_nowait().new_token_ids)
    return got


def test_without_a_window_every_step_wakes_the_loop() -> None:
    from decode_worker.service import _LoopInbox, _LoopQueue

    loop = _Loop()
    inbox = _LoopInbox(loop)  # type: ignore[arg-type]
    q = _LoopQueue(inbox, first_urgent=False)
    for t in range(3):
        _step(inbox, [(q, _out("a", t))])
        assert len(loop.wakeups) == 1 and loop.timers == []
        loop.run_wakeup()
    assert _drained(q) == [0, 1, 2]


def test_with_a_window_steps_wait_for_the_timer_and_urgent_outputs_do_not() -> None:
    from decode_worker.service import _LoopInbox, _LoopQueue

    loop = _Loop()
    inbox = _LoopInbox(loop, 0.05)  # type: ignore[arg-type]
    a = _LoopQueue(inbox, first_urgent=False)
    b = _LoopQueue(inbox)  # first output urgent (a relayed stream's TTFT)
    _step(inbox, [(a, _out("a", 0))])  # no timer runs yet: the first output wakes the loop
    assert len(loop.wakeups) == 1
    loop.run_wakeup()
    assert [d for d, _, _ in loop.timers] == [0.05]  # the drain started the window's timer
    for t in range(1, 6):  # five more steps: no wake-up, the timer will take them
        _step(inbox, [(a, _out("a", t))])
    assert loop.wakeups == [] and _drained(a) == [0]
    loop.run_timer()
    assert _drained(a) == [1, 2, 3, 4, 5] and len(loop.timers) == 1  # re-armed
    _step(inbox, [(a, _out("a", 6)), (b, _out("b", 100))])  # b's first output: urgent
    assert len(loop.wakeups) == 1
    loop.run_wakeup()
    assert _drained(a) == [6] and _drained(b) == [100] and len(loop.timers) == 1  # one timer
    _step(inbox, [(b, _out("b", 101))])  # not b's first any more: waits
    assert loop.wakeups == []
    _step(inbox, [(a, _out("a", 7, finished=True))])  # a finish: at once, with what waited
    assert len(loop.wakeups) == 1
    loop.run_wakeup()
    assert _drained(b) == [101] and _drained(a) == [7]
    loop.run_timer()  # nothing came: the timer stops
    assert loop.timers == []
    _step(inbox, [(b, _out("b", 102))])  # quiet before: the output wakes the loop itself
    assert len(loop.wakeups) == 1
    loop.run_wakeup()
    assert _drained(b) == [102]


def test_a_failure_is_urgent() -> None:
    from decode_worker.service import _LoopInbox, _LoopQueue

    loop = _Loop()
    inbox = _LoopInbox(loop, 0.05)  # type: ignore[arg-type]
    q = _LoopQueue(inbox, first_urgent=False)
    _step(inbox, [(q, _out("a", 0))])
    loop.run_wakeup()
    err = RuntimeError("engine")
    _step(inbox, [(q, err)])
    assert len(loop.wakeups) == 1
    loop.run_wakeup()
    assert q.get_nowait() is not None and q.get_nowait() is err


def test_on_a_real_loop_outputs_arrive_in_order_about_once_per_window() -> None:
    """An engine thread stepping every 1 ms for 0.3 s against a 50 ms window: every token
    arrives, in order, each within about a window, with far fewer wake-ups than steps."""
    from decode_worker.service import _LoopInbox, _LoopQueue

    window, steps = 0.05, 300
    got: list[tuple[int, float]] = []
    sent: dict[int, float] = {}

    async def main() -> int:
        loop = asyncio.get_running_loop()
        wakeups = 0
        real = loop.call_soon_threadsafe

        def counting(fn, *args):
            nonlocal wakeups
            wakeups += 1
            return real(fn, *args)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        inbox = _LoopInbox(loop, window)
        q = _LoopQueue(inbox, first_urgent=False)
        q.divert(lambda o: got.append((o.new_token_ids[0], time.monotonic())))

        def engine() -> None:
            for t in range(steps):
                sent[t] = time.monotonic()
                _step(inbox, [(q, _out("a", t, finished=t == steps - 1))])
                time.sleep(0.001)

        th = threading.Thread(target=engine)
        th.start()
        while th.is_alive() or len(got) < steps:
            await asyncio.sleep(0.01)
            if time.monotonic() - sent.get(0, time.monotonic()) > 20:
                break
        th.join(10)
        return wakeups

    wakeups = asyncio.run(asyncio.wait_for(main(), 30))
    assert [t for t, _ in got] == list(range(steps))
    late = max(at - sent[t] for t, at in got)
    assert late < window + 0.25, f"a token waited {late:.3f} s"  # a window, plus a loaded host's slack
    assert wakeups <= steps // 5, f"{wakeups} wake-ups for {steps} steps"


def test_a_direct_streams_finish_waits_for_the_timer_but_a_relayed_ones_does_not() -> None:
    from decode_worker.service import _LoopInbox, _LoopQueue

    loop = _Loop()
    inbox = _LoopInbox(loop, 0.05)  # type: ignore[arg-type]
    direct = _LoopQueue(inbox, first_urgent=False, finish_urgent=False)
    relayed = _LoopQueue(inbox)
    _step(inbox, [(direct, _out("d", 0))])
    loop.run_wakeup()  # no timer ran: woken; the drain starts it
    _step(inbox, [(direct, _out("d", 1, finished=True))])
    assert loop.wakeups == []  # the direct finish goes with the next tick
    loop.run_timer()
    assert _drained(direct) == [0, 1]
    _step(inbox, [(relayed, _out("r", 5))])  # its first: urgent
    loop.run_wakeup()
    _step(inbox, [(relayed, _out("r", 6, finished=True))])
    assert len(loop.wakeups) == 1  # a relayed finish: at once
    loop.run_wakeup()
    assert _drained(relayed) == [5, 6]


def test_a_text_rendering_failure_fails_its_own_stream_only() -> None:
    """A request whose text the event loop renders (``_LoopQueue.take_text``) and whose rendering
    raises gets an InternalError naming it as its item; the other streams of the same drain still
    get theirs, in order."""
    from decode_worker.service import _LoopInbox, _LoopQueue
    from pdserve.errors import InternalError

    class _Broken:
        def render(self, out) -> None:
            raise RuntimeError("bad token id")

    loop = _Loop()
    inbox = _LoopInbox(loop, 0.0)  # type: ignore[arg-type]
    broken, fine = _LoopQueue(inbox), _LoopQueue(inbox)
    broken._text = _Broken()  # type: ignore[assignment]
    _step(inbox, [(broken, _out("b", 1)), (fine, _out("f", 2)), (fine, _out("f", 3, finished=True))])
    loop.run_wakeup()
    err = broken.get_nowait()
    assert isinstance(err, InternalError) and "request b" in str(err) and "bad token id" in str(err)
    assert _drained(fine) == [2, 3]
