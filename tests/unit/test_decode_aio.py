"""The decode worker's asynchronous Decode (decode_worker.service.AsyncDecodeServicer): streams are
tasks of one event loop (no thread each), ready tokens go out in one message, and a stream whose
caller goes away aborts its request in the engine. In process: a fake engine loop, no gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import SimpleNamespace

import pytest

from engine.outputs import RequestOutput
from engine.request import FinishReason
from pdserve.v1 import common_pb2, worker_pb2
from pdserve.worker_base import Role


class _Engine:
    model_id = "m"

    def can_admit(self, num_tokens: int, adapter_id: str = "") -> bool:
        return True

    def check_adapter(self, adapter_id: str) -> None:
        """The base model only (as a worker started without --lora)."""
        assert adapter_id == ""

    def add_request(self, rid, ids, params, **kw) -> None:
        pass


class _Loop:
    """EngineLoop's surface: ``add`` keeps each request's output queue (``out``) so the test can
    play the engine thread; ``abort`` is recorded."""

    def __init__(self) -> None:
        self.engine = _Engine()
        self.outs: dict[str, object] = {}
        self.aborted: list[str] = []
        self.added = threading.Event()

    def call(self, fn, timeout_s=None):
        return fn(self.engine)

    def add(self, rid, adder, out=None):
        adder(self.engine)
        self.outs[rid] = out
        self.added.set()
        return out

    def abort(self, rid: str) -> bool:
        self.aborted.append(rid)
        return True


def _out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        rid, [token], [token], "", "", finished, FinishReason.LENGTH if finished else None, 0, 0
    )


def _servicer(**kw):
    from prometheus_client import CollectorRegistry

    from decode_worker.service import AsyncDecodeServicer
    from pdserve.metrics import KVPullMetrics

    finished: list[int] = []
    state = SimpleNamespace(
        config=SimpleNamespace(worker_id="decode-9", role=Role.DECODE, admission_timeout_s=1.0),
        engine=_Engine(),
        loop=_Loop(),
        count_finished=lambda: finished.append(1),
    )
    svc = AsyncDecodeServicer(state, None, KVPullMetrics(CollectorRegistry(), "decode-9"), **kw)  # type: ignore[arg-type]
    return svc, state.loop, finished


class _Ctx:
    def time_remaining(self) -> None:
        return None


async def _added(loop: _Loop, rid: str, task: asyncio.Future, timeout_s: float = 10.0) -> None:
    """Wait until the servicer added ``rid`` to the engine loop; raise the stream's own error if it
    failed first, and fail after ``timeout_s`` (never hang the suite)."""
    deadline = time.monotonic() + timeout_s
    while rid not in loop.outs:
        if task.done():
            task.result()  # the stream's exception, if any
            raise AssertionError(f"the stream ended before {rid!r} was added")
        assert time.monotonic() < deadline, f"{rid!r} was not added within {timeout_s} s"
        await asyncio.sleep(0.001)


def _req(rid: str) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=rid,
        prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0.0),
        local_prefill=True,
    )


def test_tokens_ready_together_go_in_one_message() -> None:
    svc, loop, finished = _servicer()

    async def run() -> list[worker_pb2.DecodeResponse]:
        stream = svc.Decode(_req("r1"), _Ctx())
        first = asyncio.ensure_future(stream.__anext__())
        await _added(loop, "r1", first)
        q = loop.outs["r1"]
        for i, t in enumerate((11, 12, 13, 14)):  # the engine produced four steps meanwhile
            q.put(_out("r1", t, finished=i == 3))
        return [await first] + [m async for m in stream]

    msgs = asyncio.run(run())
    svc.close()
    assert len(msgs) == 1
    assert list(msgs[0].token_ids) == [11, 12, 13, 14]
    assert msgs[0].finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert finished == [1] and loop.aborted == []


def test_a_stream_interval_groups_tokens_after_the_first_message() -> None:
    svc, loop, finished = _servicer(stream_interval=3)

    async def run() -> list[list[int]]:
        stream = svc.Decode(_req("r3"), _Ctx())
        got: list[list[int]] = []

        async def consume() -> None:
            async for m in stream:
                got.append(list(m.token_ids))

        task = asyncio.ensure_future(consume())
        await _added(loop, "r3", task)
        for i, t in enumerate((11, 12, 13, 14, 15, 16)):  # one engine step at a time
            loop.outs["r3"].put(_out("r3", t, finished=i == 5))
            await asyncio.sleep(0.02)  # a stream that sent whatever is ready would send it now
        await task
        return got

    got = asyncio.run(run())
    svc.close()
    # the first at once; then three per message; the finish goes with what is left
    assert got == [[11], [12, 13, 14], [15, 16]]
    assert finished == [1] and loop.aborted == []


def test_a_stream_interval_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="stream_interval"):
        _servicer(stream_interval=0)


def test_a_stream_whose_caller_leaves_aborts_its_request() -> None:
    svc, loop, _ = _servicer()

    async def run() -> None:
        stream = svc.Decode(_req("r2"), _Ctx())

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await _added(loop, "r2", task)
        loop.outs["r2"].put(_out("r2", 5))
        await asyncio.sleep(0.05)
        task.cancel()  # grpc.aio cancels the handler's task when the caller cancels
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while "r2" not in loop.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    svc.close()
    assert loop.aborted == ["r2"]


def test_many_waiting_streams_hold_no_thread_each() -> None:
    svc, loop, finished = _servicer()
    n = 200

    async def run() -> tuple[int, list[list[int]]]:
        base = threading.active_count()
        streams = [svc.Decode(_req(f"s{i}"), _Ctx()) for i in range(n)]

        async def consume(s) -> list[int]:
            return [t async for m in s for t in m.token_ids]

        tasks = [asyncio.ensure_future(consume(s)) for s in streams]
        while len(loop.outs) < n:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        grown = threading.active_count() - base  # every stream is waiting on its tokens now
        for i in range(n):
            loop.outs[f"s{i}"].put(_out(f"s{i}", i, finished=True))
        return grown, list(await asyncio.gather(*tasks))

    grown, got = asyncio.run(run())
    svc.close()
    assert grown <= 20, f"{grown} threads for {n} waiting streams"  # the admission pool at most
    assert got == [[i] for i in range(n)] and len(finished) == n


class _RecordingLoop:
    """The event loop's ``call_soon_threadsafe`` as :class:`_LoopInbox` uses it: recorded, run later."""

    def __init__(self) -> None:
        self.scheduled: list = []

    def call_soon_threadsafe(self, fn, *args) -> None:
        self.scheduled.append((fn, args))


def test_one_engine_step_for_many_streams_wakes_the_loop_once() -> None:
    from decode_worker.service import _LoopInbox

    loop = _RecordingLoop()
    inbox = _LoopInbox(loop)  # type: ignore[arg-type]
    queues = [asyncio.Queue() for _ in range(64)]
    put = threading.Thread(target=lambda: [inbox.put(q, _out(f"r{i}", i)) for i, q in enumerate(queues)])
    put.start()
    put.join()
    assert len(loop.scheduled) == 1  # 64 outputs of one step: one wake-up of the loop
    fn, args = loop.scheduled.pop()
    fn(*args)  # the loop drains: every stream has its output, in order
    assert [q.get_nowait().new_token_ids for q in queues] == [[i] for i in range(64)]
    inbox.put(queues[0], _out("r0", 99))  # the next step schedules the next drain
    assert len(loop.scheduled) == 1


def test_a_stream_logs_one_closing_line_for_each_way_it_ends(caplog) -> None:
    import logging

    from decode_worker.service import Outcome, _StreamAccount

    caplog.set_level(logging.INFO, logger="decode_worker.service")
    first = worker_pb2.DecodeResponse(token_ids=[1, 2], kv_pull_s=0.25)
    last = worker_pb2.DecodeResponse(
        token_ids=[3], finish=common_pb2.Finish(reason=common_pb2.FINISH_REASON_LENGTH)
    )
    cases = [
        ([first, last], Outcome.DONE, None),
        ([first, last], Outcome.GONE, None),  # left after its finish message: it was done
        ([first], Outcome.GONE, None),
        ([first], Outcome.FAILED, RuntimeError("engine")),
    ]
    for msgs, outcome, error in cases:
        a = _StreamAccount()
        for m in msgs:
            a.on_message(m)
        a.on_end(outcome, error)
    lines = [(r.getMessage(), r.tokens, getattr(r, "finish", None), r.kv_pull_s) for r in caplog.records]
    assert lines == [
        ("decode done", 3, "FINISH_REASON_LENGTH", 0.25),
        ("decode done", 3, "FINISH_REASON_LENGTH", 0.25),
        ("decode cancelled", 2, "", 0.25),
        ("decode failed", 2, None, 0.25),
    ]
    assert caplog.records[-1].error == "RuntimeError"
