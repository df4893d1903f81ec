"""A handoff admitted on the decode worker's event loop (decode_worker/loop_admission.py, #12):
when the KV is read with no rpc, the pull, the lease's release (grpc.aio) and the import (handed
to the engine thread) run with no admission thread; errors, the no-room wait and a caller that
leaves behave as on the thread path. In process: fake puller and engine loop, no gRPC."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
import torch

from engine.outputs import RequestOutput
from engine.request import FinishReason
from kv_store.convert import handle_to_proto
from kv_store.handle import BlockLocation, KVHandle
from kv_store.layout import KVLayout
from pdserve.errors import ResourceExhaustedError, StoreUnavailableError
from pdserve.v1 import common_pb2, worker_pb2
from pdserve.worker_base import Role

LAYOUT = KVLayout("m", 2, 1, 4, "float32", 4)


class _Engine:
    model_id = "m"

    def __init__(self, room: list[bool]) -> None:
        self.room = room  # one per import (the last repeats)
        self.imported: list[str] = []

    def check_adapter(self, adapter_id: str) -> None:
        assert adapter_id == ""

    def import_kv(self, rid, ids, first, blocks, params, **kw) -> None:
        ok = self.room.pop(0) if len(self.room) > 1 else self.room[0]
        if not ok:
            raise ResourceExhaustedError("no blocks")
        assert blocks.shape[0] == 2
        self.imported.append(rid)

    def has_request(self, rid: str) -> bool:
        return True


class _Loop:
    """EngineLoop's surface with ``add_submit``: the adder runs on another thread (the engine's)
    after ``delay_s``."""

    def __init__(self, engine: _Engine, delay_s: float = 0.0) -> None:
        self.engine = engine
        self.delay_s = delay_s
        self.outs: dict[str, object] = {}
        self.aborted: list[str] = []
        self.threads: set[str] = set()
        self.running = threading.Event()  # an add_submit's adder has started

    def call(self, fn, timeout_s=None):
        return fn(self.engine)

    def add(self, rid, adder, out=None):
        self.threads.add(threading.current_thread().name)
        adder(self.engine)
        self.outs[rid] = out
        return out

    def add_submit(self, rid, adder, out) -> Future:
        fut: Future = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            self.running.set()
            time.sleep(self.delay_s)  # the engine thread is running the import meanwhile
            try:
                r = adder(self.engine)
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)
                return
            self.outs[rid] = out
            fut.set_result(r)

        threading.Thread(target=run, daemon=True).start()
        return fut

    def abort(self, rid: str) -> bool:
        self.aborted.append(rid)
        return True


class _Puller:
    def __init__(self, on_loop: bool = True, release_error: Exception | None = None) -> None:
        self._on_loop = on_loop
        self.release_error = release_error
        self.events: list[str] = []
        self.transport = None

    def on_loop(self, handle):
        return self if self._on_loop else None

    def pull(self, handle) -> torch.Tensor:
        self.events.append("pull:" + threading.current_thread().name)
        return torch.zeros((len(handle.block_hashes), *LAYOUT.block_shape))

    def release(self, handle) -> None:
        self.events.append("release:" + threading.current_thread().name)

    async def release_async(self, handle) -> None:
        await asyncio.sleep(0)
        self.events.append("release_async")
        if self.release_error is not None:
            raise self.release_error


class _Ctx:
    def time_remaining(self) -> None:
        return None


def _servicer(puller: _Puller, room: list[bool], timeout_s: float = 1.0, delay_s: float = 0.0):
    from prometheus_client import CollectorRegistry

    from decode_worker.service import AsyncDecodeServicer
    from pdserve.metrics import KVPullMetrics

    engine = _Engine(room)
    state = SimpleNamespace(
        config=SimpleNamespace(worker_id="decode-9", role=Role.DECODE, admission_timeout_s=timeout_s),
        engine=engine,
        loop=_Loop(engine, delay_s),
        layout=LAYOUT,
        count_finished=lambda: None,
    )
    svc = AsyncDecodeServicer(state, puller, KVPullMetrics(CollectorRegistry(), "decode-9"))  # type: ignore[arg-type]
    return svc, state.loop, engine


def _req(rid: str = "r1") -> worker_pb2.DecodeRequest:
    loc = BlockLocation("n1", "127.0.0.1:1", "shm-x", "h")
    handle = KVHandle(rid, (b"a" * 16, b"b" * 16), (loc, loc), LAYOUT, 8, lease_id="L1", shm_slots=(3, 4))
    return worker_pb2.DecodeRequest(
        request_id=rid,
        prompt_token_ids=list(range(8)),
        sampling=common_pb2.SamplingParams(max_tokens=2, temperature=0.0),
        kv=handle_to_proto(handle),
        first_token=7,
    )


def _out(rid: str, token: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        rid, [token], [token], "", "", finished, FinishReason.LENGTH if finished else None, 0, 0
    )


async def _first(svc, req):
    gen = svc.Decode(req, _Ctx())
    task = asyncio.ensure_future(gen.__anext__())
    return gen, task


def test_admitted_on_the_loop_with_no_admission_thread() -> None:
    puller = _Puller()
    svc, loop, engine = _servicer(puller, [True])

    async def main() -> list[worker_pb2.DecodeResponse]:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        deadline = time.monotonic() + 10
        while "r1" not in loop.outs:
            assert not task.done() or task.exception() is None
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        out = loop.outs["r1"]
        out.put(_out("r1", 5))  # type: ignore[attr-defined]
        out.put(_out("r1", 6, finished=True))  # type: ignore[attr-defined]
        msgs = [await task]
        async for m in gen:
            msgs.append(m)
        return msgs

    msgs = asyncio.run(asyncio.wait_for(main(), 20))
    assert [t for m in msgs for t in m.token_ids] == [5, 6]
    assert msgs[-1].HasField("finish")
    assert engine.imported == ["r1"]
    main_thread = threading.main_thread().name
    assert puller.events == [f"pull:{main_thread}", "release_async"]  # pulled here, released after
    assert svc._admission._threads == set()  # no admission thread started
    svc.close()


def test_a_pull_that_needs_an_rpc_goes_to_the_admission_threads() -> None:
    puller = _Puller(on_loop=False)
    svc, loop, engine = _servicer(puller, [True])

    async def main() -> None:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        deadline = time.monotonic() + 10
        while "r1" not in loop.outs:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        loop.outs["r1"].put(_out("r1", 5, finished=True))  # type: ignore[attr-defined]
        await task
        await gen.aclose()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert [e.split(":")[0] for e in puller.events] == ["pull", "release"]
    assert all("decode-admit" in e.split(":")[1] for e in puller.events)
    svc.close()


def test_no_room_retries_then_imports() -> None:
    svc, loop, engine = _servicer(_Puller(), [False, False, True])

    async def main() -> None:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        deadline = time.monotonic() + 10
        while "r1" not in loop.outs:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        loop.outs["r1"].put(_out("r1", 5, finished=True))  # type: ignore[attr-defined]
        await task
        await gen.aclose()

    asyncio.run(asyncio.wait_for(main(), 20))
    assert engine.imported == ["r1"]
    svc.close()


def test_no_room_until_the_deadline_fails_as_the_thread_path() -> None:
    svc, loop, engine = _servicer(_Puller(), [False], timeout_s=0.1)

    async def main() -> None:
        async for _ in svc.Decode(_req(), _Ctx()):
            pass

    t0 = time.monotonic()
    with pytest.raises(ResourceExhaustedError) as err:
        asyncio.run(asyncio.wait_for(main(), 20))
    assert time.monotonic() - t0 < 5
    assert str(err.value) == str(svc._no_room(8, ""))
    assert engine.imported == [] and "r1" not in loop.outs
    svc.close()


def test_a_release_that_fails_fails_the_request_naming_the_store() -> None:
    """The release runs beside the import (off the critical path): the import ran, the stream
    fails with the store's error, and the request is aborted (its blocks freed)."""
    puller = _Puller(release_error=StoreUnavailableError("KV store 127.0.0.1:1 is unavailable: down"))
    svc, loop, engine = _servicer(puller, [True])

    async def main() -> None:
        async for _ in svc.Decode(_req(), _Ctx()):
            pass

    with pytest.raises(StoreUnavailableError, match="KV store 127.0.0.1:1"):
        asyncio.run(asyncio.wait_for(main(), 20))
    deadline = time.monotonic() + 10
    while not loop.aborted:  # the abort runs on an admission thread
        assert time.monotonic() < deadline, "the imported request was not aborted"
        time.sleep(0.01)
    assert engine.imported == ["r1"] and loop.aborted == ["r1"]
    svc.close()


def test_a_caller_that_leaves_during_the_import_aborts_it() -> None:
    svc, loop, engine = _servicer(_Puller(), [True], delay_s=0.3)

    async def main() -> None:
        gen = svc.Decode(_req(), _Ctx())
        task = asyncio.ensure_future(gen.__anext__())
        deadline = time.monotonic() + 10
        while not loop.running.is_set():  # the import is running on the engine thread
            assert time.monotonic() < deadline, "the import did not start"
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 10
        while not loop.aborted:
            assert time.monotonic() < deadline, "the import that ran was not aborted"
            await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(main(), 20))
    assert engine.imported == ["r1"] and loop.aborted == ["r1"]
    svc.close()
