"""Admission costs one engine round trip when there is room (#12): the decode worker's import
checks for room itself (``LLMEngine.import_kv`` refuses with ResourceExhaustedError, taking
nothing), and only when it refuses does the worker wait (``can_admit``) and try again, until the
same admission deadline and with the same error as before. The prefill worker's output queue
exports the KV and releases the blocks when the finished output comes (one wait, not two)."""

from __future__ import annotations

import queue
import time
from types import SimpleNamespace

import pytest

from pdserve.errors import ResourceExhaustedError


class _Loop:
    """EngineLoop's surface, counting round trips; ``room`` says whether the engine has room."""

    def __init__(self, room: list[bool]) -> None:
        self.room = room  # consumed one per can_admit / import (last value repeats)
        self.calls = 0
        self.adds = 0
        self.engine = SimpleNamespace(
            can_admit=self._can_admit,
            check_could_admit=lambda n: None,  # the pool could hold it (waiting may find room)
            check_group_fits=lambda n, choices: None,
        )

    def _next(self) -> bool:
        return self.room.pop(0) if len(self.room) > 1 else self.room[0]

    def _can_admit(self, n: int, adapter: str = "") -> bool:
        return self._next()

    def call(self, fn, timeout_s=None):
        self.calls += 1
        return fn(self.engine)

    def add(self, rid, adder, out=None):
        self.calls += 1
        self.adds += 1
        adder(self.engine)
        return out


class _Ctx:
    def time_remaining(self):
        return None

    def is_active(self) -> bool:
        return True


def _servicer(loop: _Loop, timeout_s: float = 1.0):
    from prometheus_client import CollectorRegistry

    from decode_worker.service import DecodeServicer
    from pdserve.metrics import KVPullMetrics
    from pdserve.worker_base import Role

    state = SimpleNamespace(
        config=SimpleNamespace(worker_id="decode-7", role=Role.DECODE, admission_timeout_s=timeout_s),
        loop=loop,
    )
    return DecodeServicer(state, None, KVPullMetrics(CollectorRegistry(), "decode-7"))  # type: ignore[arg-type]


def _importer(loop: _Loop, imported: list[str]):
    def add(e) -> None:
        if not loop._next():
            raise ResourceExhaustedError("decode engine has 0 free KV blocks, needs 1", retry_after_s=0.05)
        imported.append("r")

    return add


def test_room_costs_one_round_trip() -> None:
    loop = _Loop([True])
    imported: list[str] = []
    out = object()
    got = _servicer(loop)._add_when_room("r", _importer(loop, imported), out, 8, _Ctx())
    assert got is out and imported == ["r"]
    assert loop.calls == 1  # the import alone: no can_admit round trip before it


def test_no_room_waits_then_imports() -> None:
    # the import refuses, can_admit says no twice then yes, the second import succeeds
    loop = _Loop([False, False, False, True, True])
    imported: list[str] = []
    _servicer(loop)._add_when_room("r", _importer(loop, imported), None, 8, _Ctx())
    assert imported == ["r"] and loop.adds == 2


def test_no_room_until_the_deadline_fails_as_before() -> None:
    loop = _Loop([False])
    t0 = time.monotonic()
    with pytest.raises(
        ResourceExhaustedError, match="decode worker decode-7 has no free KV blocks for 8 tokens"
    ):
        _servicer(loop, timeout_s=0.2)._add_when_room("r", _importer(loop, []), None, 8, _Ctx())
    assert 0.15 < time.monotonic() - t0 < 5.0


def test_the_admission_timeout_counts_from_the_calls_arrival() -> None:
    """A Decode call that waited for an admission thread (a burst: 16 threads, 1,000 calls) has
    only what is left of its admission timeout once a thread takes it: without room it fails
    RESOURCE_EXHAUSTED at the timeout counted from its arrival, under the router's first-message
    deadline, instead of waiting a whole timeout more (before: up to ~100 s, and the router took
    the healthy worker for a hung one). With room it is admitted however long it queued."""
    from decode_worker.service import _AdmissionContext

    class _AioCtx:
        def time_remaining(self):
            return None

    actx = _AdmissionContext(_AioCtx())  # type: ignore[arg-type]
    actx.arrived -= 0.5  # it arrived 0.5 s ago and queued since
    loop = _Loop([False])
    svc = _servicer(loop, timeout_s=0.6)
    assert svc._admission_deadline(actx) == pytest.approx(actx.arrived + 0.6)
    t0 = time.monotonic()
    with pytest.raises(ResourceExhaustedError, match="no free KV blocks for 8 tokens"):
        svc._add_when_room("r", _importer(loop, []), None, 8, actx)
    assert time.monotonic() - t0 < 0.4  # the 0.1 s left, not another 0.6 s
    imported: list[str] = []
    late = _AdmissionContext(_AioCtx())  # type: ignore[arg-type]
    late.arrived -= 10.0  # long past its timeout, but there is room: admitted
    room = _Loop([True])
    _servicer(room, timeout_s=0.6)._add_when_room("r", _importer(room, imported), None, 8, late)
    assert imported == ["r"]
    # a plain gRPC context (the thread-pool server's) counts from now, as before
    assert svc._admission_deadline(_Ctx()) == pytest.approx(time.monotonic() + 0.6, abs=0.05)


def test_import_refused_while_can_admit_says_yes_is_bounded() -> None:
    # can_admit and the import disagree (e.g. a LoRA slot): retried with a pause, up to the deadline
    loop = _Loop([False])
    svc = _servicer(loop, timeout_s=0.2)
    svc.state.loop.engine.can_admit = lambda n, a="": True

    def refuse(e) -> None:
        raise ResourceExhaustedError("no LoRA slot is free for adapter 'a'", retry_after_s=0.05)

    with pytest.raises(ResourceExhaustedError, match="LoRA slot for adapter 'a'"):
        svc._add_when_room("r", refuse, None, 8, _Ctx(), "a")
    assert loop.adds < 100  # paused between tries, not spinning


class _PrefillEngine:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.released: list[str] = []

    def export_kv(self, rid: str) -> str:
        if self.fail:
            raise KeyError(rid)
        return f"kv-{rid}"

    def release(self, rid: str) -> None:
        self.released.append(rid)


def test_prefill_output_queue_exports_and_releases_on_finish() -> None:
    from prefill_worker.service import _ExportOnFinish

    eng = _PrefillEngine()
    q = _ExportOnFinish(eng, "p1")  # type: ignore[arg-type]
    done = SimpleNamespace(finished=True)
    q.put(done)
    assert q.get() == (done, "kv-p1") and eng.released == ["p1"]

    err = RuntimeError("aborted")
    q.put(err)
    assert q.get() == (err, None)

    failing = _ExportOnFinish(_PrefillEngine(fail=True), "p2")  # type: ignore[arg-type]
    failing.put(done)
    item, kv = failing.get()
    assert isinstance(item, KeyError) and kv is None

    partial = SimpleNamespace(finished=False)
    q.put(partial)
    assert q.get() == (partial, None)
    with pytest.raises(queue.Empty):
        q._q.get_nowait()


class _GroupSvc:
    """The servicer surface add_group_when_room uses: ``_add`` refuses while ``room`` says no
    (consumed one per import or can_admit_group; the last value repeats)."""

    def __init__(self, room: list[bool], timeout_s: float = 1.0) -> None:
        self.loop = _Loop(room)
        self.loop.engine.can_admit_group = lambda n, choices: self.loop._next()
        self.state = SimpleNamespace(
            config=SimpleNamespace(worker_id="decode-7", admission_timeout_s=timeout_s), loop=self.loop
        )
        self.added: list[tuple[str, int]] = []

    # the servicer's own admission deadline, wait and retry (what the group functions call)
    from decode_worker.service import DecodeServicer

    _admission_deadline = DecodeServicer._admission_deadline
    _wait_until = DecodeServicer._wait_until
    _retry_add = DecodeServicer._retry_add
    del DecodeServicer

    def _add(self, rid, adder, out, choices=1):
        self.loop.adds += 1
        adder(self.loop.engine)
        self.added.append((rid, choices))
        return out


def _group_import(svc: _GroupSvc):
    def add(e) -> None:
        if not svc.loop._next():
            raise ResourceExhaustedError("decode engine cannot adopt the group now", retry_after_s=0.05)

    return add


def test_group_import_refused_after_the_pull_waits_for_room_then_imports() -> None:
    # another request took the blocks between the wait and the pull: the import refuses, the
    # group waits (can_admit_group no, then yes) and the second import succeeds
    from decode_worker.groups import add_group_when_room

    svc = _GroupSvc([False, False, True, True])
    out = object()
    got = add_group_when_room(svc, "g", _group_import(svc), out, _Ctx(), 15, 3, 2)
    assert got is out and svc.added == [("g", 2)] and svc.loop.adds == 2


def test_group_import_without_room_until_the_deadline_fails_naming_the_group() -> None:
    from decode_worker.groups import add_group_when_room

    svc = _GroupSvc([False], timeout_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(
        ResourceExhaustedError,
        match="decode worker decode-7 has no free KV blocks for 15 prompt tokens and 3 choices",
    ):
        add_group_when_room(svc, "g", _group_import(svc), None, _Ctx(), 15, 3, 2)
    assert 0.15 < time.monotonic() - t0 < 5.0
    assert svc.added == []


def test_what_no_pool_could_hold_is_refused_at_once_not_after_the_admission_timeout(tiny_models) -> None:
    """A handoff the whole KV pool could never hold (a prompt beyond it; a group of n choices whose
    shared prompt plus one block per choice is beyond it) waited the admission timeout (30 s by
    default) and failed RESOURCE_EXHAUSTED "no free KV blocks" with a retry hint, as if the worker
    were busy. It is refused at once (INVALID_ARGUMENT), naming the pool."""
    from decode_worker.groups import wait_for_group_blocks
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from pdserve.errors import InvalidRequestError

    eng = LLMEngine.from_pretrained(
        tiny_models["llama"], EngineConfig(num_kv_blocks=4, block_size=16, enable_prefix_caching=False)
    )
    loop = _Loop([False])
    loop.engine = eng
    svc = _servicer(loop, timeout_s=30.0)
    t0 = time.monotonic()
    with pytest.raises(
        InvalidRequestError, match=r"prompt of 100 tokens needs 7 KV blocks.*\(4 x 16 tokens\)"
    ):
        svc._wait_for_blocks(100, _Ctx())
    with pytest.raises(
        InvalidRequestError, match=r"4 choices over a 39-token shared prompt need 7 KV blocks"
    ):
        wait_for_group_blocks(svc, _Ctx(), 39, 4)
    assert time.monotonic() - t0 < 5.0
    svc._wait_for_blocks(40, _Ctx())  # what fits now returns at once
    wait_for_group_blocks(svc, _Ctx(), 31, 2)
