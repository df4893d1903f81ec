"""The decode worker's per-token path for direct streams (#12), in process, no gRPC:

* the engine loop holds the event loop's inbox while a step hands out its outputs, so a step's
  outputs cost one wake-up of the event loop (``EngineLoop.batchers``, ``_LoopInbox.hold/release``);
* a direct request's outputs go straight into its slot as the inbox hands them over
  (``_LoopQueue.divert`` -> ``decode_worker.direct._Feed``): the router's side
  (:meth:`DirectStreams.serve`) sends the admission message, progress once its interval passed,
  and the finish with every token id, and raises a failure after the client's slot got it.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from engine.outputs import RequestOutput, TokenLogprob
from engine.request import FinishReason
from pdserve.errors import UnavailableError
from pdserve.ticket import TicketClaims, TicketSigner, ticket_key
from pdserve.v1 import common_pb2, direct_pb2, worker_pb2

NOW = 1_000_000.0


class _Clock:
    t = NOW

    def __call__(self) -> float:
        return self.t


class _RecordingLoop:
    def __init__(self) -> None:
        self.scheduled: list = []

    def call_soon_threadsafe(self, fn, *args) -> None:
        self.scheduled.append((fn, args))


def _out(rid: str, tokens: list[int], text: str = "", finished: bool = False, lps=None) -> RequestOutput:
    return RequestOutput(
        rid,
        tokens,
        tokens,
        text,
        "",
        finished,
        FinishReason.LENGTH if finished else None,
        3,
        2,
        logprobs=lps or [],
    )


def test_a_held_inbox_schedules_one_drain_when_released() -> None:
    from decode_worker.service import _LoopInbox

    loop = _RecordingLoop()
    inbox = _LoopInbox(loop)  # type: ignore[arg-type]
    queues = [asyncio.Queue() for _ in range(8)]
    inbox.release()  # nothing waiting: no wake-up
    assert loop.scheduled == []
    inbox.hold()
    for i, q in enumerate(queues):
        inbox.put(q, _out(f"r{i}", [i]))
    assert loop.scheduled == []  # held: the step is still handing out outputs
    inbox.release()
    assert len(loop.scheduled) == 1
    fn, args = loop.scheduled.pop()
    fn(*args)
    assert [q.get_nowait().new_token_ids for q in queues] == [[i] for i in range(8)]
    inbox.put(queues[0], _out("r0", [9]))  # not held (an abort from another thread): at once
    assert len(loop.scheduled) == 1


def test_the_engine_loop_holds_its_batchers_around_each_steps_outputs() -> None:
    from engine.engine_loop import EngineLoop

    events: list[str] = []

    class _Engine:
        steps = 0
        ready = threading.Event()  # set once the test registered its batcher and sinks

        def has_unfinished(self) -> bool:
            return self.ready.is_set() and self.steps < 1

        def step(self):
            self.steps += 1
            return [_out("a", [1]), _out("b", [2])]

    class _Batcher:
        def hold(self) -> None:
            events.append("hold")

        def release(self) -> None:
            events.append("release")

    class _Sink:
        def __init__(self, name: str) -> None:
            self.name = name

        def put(self, item) -> None:
            events.append(self.name)

    engine = _Engine()
    el = EngineLoop(engine, name="test-batchers")  # type: ignore[arg-type]
    try:
        el.batchers.append(_Batcher())
        el._queues.update({"a": _Sink("a"), "b": _Sink("b")})  # as add() registers them
        engine.ready.set()
        el._wake.set()
        for _ in range(500):
            if "release" in events:
                break
            threading.Event().wait(0.01)
    finally:
        el.stop()
    assert events[:4] == ["hold", "a", "b", "release"]


def _direct_req(rid: str, ticket: str, interval: float) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=rid,
        tenant="tenant-a",
        direct=direct_pb2.DirectGrant(ticket=ticket, progress_interval_s=interval),
    )


def _setup(interval: float):
    from decode_worker.direct import DirectStreams
    from decode_worker.service import _LoopInbox, _LoopQueue

    s = TicketSigner(ticket_key("k"))
    ticket = s.mint(TicketClaims("r1", "decode-0", "tenant-a", NOW + 30))
    ds = DirectStreams("decode-0", s, clock=_Clock())
    out = _LoopQueue(_LoopInbox(asyncio.get_running_loop()))
    finished: list[int] = []
    gen = ds.serve(
        "r1",
        _direct_req("r1", ticket, interval),
        out,
        0.25,
        lambda: finished.append(1),
        True,
        lambda t: bytes([96 + t]),
    )
    return ds, out, gen, finished


def test_direct_outputs_go_to_the_slot_and_the_router_gets_progress_and_the_finish() -> None:
    async def scenario():
        ds, out, gen, finished = _setup(interval=3600.0)
        admitted = await gen.__anext__()
        slot = ds._slots["r1"]
        nxt = asyncio.ensure_future(gen.__anext__())
        lp = [TokenLogprob(1, -0.5, [(2, -1.0)])]
        out.put(_out("r1", [1], "a", lps=lp))
        out.put(_out("r1", [2, 3], "bc"))
        out.put(_out("r1", [], ""))  # a step with nothing for this request
        await asyncio.sleep(0.01)
        assert not nxt.done()  # no progress before its interval; tokens wait in the slot
        assert slot.tokens == [1, 2, 3] and "".join(slot.text) == "abc"
        assert [(p.token_id, p.token, p.top_logprobs[0].token) for p in slot.logprobs] == [(1, "a", "b")]
        out.put(_out("r1", [4], "d", finished=True))
        last = await asyncio.wait_for(nxt, 5)
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        return admitted, last, slot, finished

    admitted, last, slot, finished = asyncio.run(scenario())
    assert admitted.kv_pull_s == 0.25 and not admitted.token_ids and not admitted.HasField("finish")
    assert list(last.token_ids) == [1, 2, 3, 4] and len(last.token_offsets_s) == 4
    assert last.finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert slot.done and slot.error is None and slot.tokens == [1, 2, 3, 4]
    d = slot.take()
    assert d.done and list(d.token_ids) == [1, 2, 3, 4] and d.text == "abcd"
    assert finished == [1]


def test_progress_goes_once_its_interval_passed() -> None:
    async def scenario():
        ds, out, gen, _ = _setup(interval=1e-6)
        await gen.__anext__()
        out.put(_out("r1", [1], "a"))
        progress = await asyncio.wait_for(gen.__anext__(), 5)
        out.put(_out("r1", [2], "b"))
        progress2 = await asyncio.wait_for(gen.__anext__(), 5)
        out.put(_out("r1", [3], "c", finished=True))
        last = await asyncio.wait_for(gen.__anext__(), 5)
        return progress, progress2, last

    progress, progress2, last = asyncio.run(scenario())
    assert list(progress.token_ids) == [1] and not progress.HasField("finish")
    assert list(progress2.token_ids) == [2]
    assert list(last.token_ids) == [3] and last.HasField("finish")


def test_a_failure_reaches_the_slot_then_the_router() -> None:
    async def scenario():
        ds, out, gen, _ = _setup(interval=3600.0)
        await gen.__anext__()
        slot = ds._slots["r1"]
        out.put(_out("r1", [1], "a"))
        out.put(UnavailableError("engine step failed"))
        out.put(_out("r1", [2], "b"))  # after the failure: dropped
        with pytest.raises(UnavailableError):
            await asyncio.wait_for(gen.__anext__(), 5)
        return slot

    slot = asyncio.run(scenario())
    assert slot.done and slot.tokens == [1]
    assert slot.error is not None and slot.error[0] == grpc.StatusCode.UNAVAILABLE.value[0]
