"""Chunk-wise KV streaming in the router's request lifecycle (issue #14 part 2): the STREAMING
state of the pure machine (router.lifecycle.machine) and the driver's streamed leg
(router.lifecycle.stream_legs.run_streamed) over fake ports: the Prefill and the Decode run at
once, the prefill's token is delivered before any decode token, a lost prefill or decode worker
re-dispatches with a new prefill (a streamed handoff is never re-let), the client leaving cancels
both calls, and every resource is released exactly once. No gRPC, no model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from pdserve.errors import CancelledError as RequestCancelledError
from router.failover import LostPhase, LostWorker
from router.lifecycle import actions as A
from router.lifecycle import events as E
from router.lifecycle import stream_legs
from router.lifecycle.driver import LifecycleDriver
from router.lifecycle.machine import RequestLifecycle
from router.lifecycle.ports import Chunk, PrefillAnswer, WorkerLostError
from router.lifecycle.resources import ResourceKind
from router.lifecycle.states import InvalidTransition, Outcome, State
from router.lifecycle.stream_mode import KVStreamMode, stream_eligible
from tests.unit.test_router_lifecycle import Clock, assert_nothing_held, delivered, kinds, released
from tests.unit.test_router_lifecycle_driver import MAX, FakeCluster, FakeLegs, reference

RID = "r1"


def streaming(limit: int = 2) -> RequestLifecycle:
    return RequestLifecycle(
        RID, prefill_id="p0", decode_id="d0", clock=Clock(), max_redispatches=limit, kv_stream=True
    )


# ---------------------------------------------------------------------------- the machine
def test_streamed_handoff_path_holds_no_kv_lease() -> None:
    m = streaming()
    acts = m.handle(E.Placed("p0", "d0"))
    assert m.state is State.STREAMING
    assert kinds(acts) == [A.Acquire, A.Release, A.RunStreamed]
    assert acts[-1] == A.RunStreamed("p0", "d0", 0)
    acts = m.handle(E.Prefilled("p0", 7, None, stop=False))
    assert m.state is State.HANDING_OFF and delivered(acts) == [7]
    assert kinds(acts) == [A.Deliver]  # the Decode already runs: no RunDecode, no lease
    assert delivered(m.handle(E.Streamed("d0", 1, (8, 9)))) == [8, 9]
    assert m.state is State.DECODING
    acts = m.handle(E.Finished("d0"))
    assert m.outcome is Outcome.FINISHED and m.output == [7, 8, 9]
    assert released(acts) == [("worker_slot", "d0"), ("policy_slot", RID)]
    assert not any(r.kind is ResourceKind.KV_LEASE for r in m.ledger.acquired)
    assert_nothing_held(m)
    assert [(t.src, t.dst) for t in m.history][:3] == [
        (State.PLACED, State.STREAMING),
        (State.STREAMING, State.HANDING_OFF),
        (State.HANDING_OFF, State.DECODING),
    ]


def test_decode_tokens_before_the_prefill_answer_are_refused() -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    with pytest.raises(InvalidTransition, match="Streamed is not valid in state streaming"):
        m.handle(E.Streamed("d0", 1, (8,)))
    assert m.state is State.STREAMING and m.output == []


def test_a_kv_handle_from_a_streamed_prefill_is_refused() -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    before = (m.state, m.ledger.held(), len(m.history))
    with pytest.raises(InvalidTransition, match="KV handle from a streamed prefill"):
        m.handle(E.Prefilled("p0", 7, E.KVRef("lease-1"), stop=False))
    assert (m.state, m.ledger.held(), len(m.history)) == before


def test_a_first_token_that_stops_finishes_from_streaming() -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    acts = m.handle(E.Prefilled("p0", 2, None, stop=True))
    assert m.state is State.FINISHED and delivered(acts) == [2]
    assert released(acts) == [("worker_slot", "d0"), ("policy_slot", RID)]
    assert_nothing_held(m)


def test_prefill_worker_lost_mid_stream_prefills_again_on_a_replacement() -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    acts = m.handle(E.Lost(LostWorker("p0", LostPhase.PREFILL, "Socket closed")))
    assert m.state is State.PLACED
    assert A.DropWorker("p0") in acts and released(acts) == [("worker_slot", "d0")]
    (find,) = [a for a in acts if isinstance(a, A.FindReplacement)]
    assert find.prefill and not find.decode and "p0" in find.excluded
    acts = m.handle(E.Placed("p1", "d0"))
    assert m.state is State.STREAMING and acts[-1] == A.RunStreamed("p1", "d0", 0)
    (r,) = [a for a in acts if isinstance(a, A.Redispatched)]
    assert not r.kv_reused and r.prefill_id == "p1"


@pytest.mark.parametrize("phase", [LostPhase.DECODE, LostPhase.KV])
def test_decode_side_lost_while_streaming_is_never_relet(phase: LostPhase) -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    acts = m.handle(E.Lost(LostWorker("d0", phase, "gone")))
    assert m.state is State.PLACED
    assert not any(isinstance(a, A.ReletLease) for a in acts)  # nothing to re-let: re-prefill
    (find,) = [a for a in acts if isinstance(a, A.FindReplacement)]
    assert find.prefill and find.decode is (phase is LostPhase.DECODE)
    assert (A.DropWorker("d0") in acts) is (phase is LostPhase.DECODE)  # a KV loss: d0 is alive
    acts = m.handle(E.Placed("p0", "d1" if phase is LostPhase.DECODE else "d0"))
    assert m.state is State.STREAMING and isinstance(acts[-1], A.RunStreamed)


def test_decode_lost_after_the_streamed_prefill_answered_resumes_from_the_output() -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    m.handle(E.Prefilled("p0", 7, None, stop=False))
    acts = m.handle(E.Lost(LostWorker("d0", LostPhase.DECODE, "Socket closed")))
    assert not any(isinstance(a, A.ReletLease) for a in acts)
    acts = m.handle(E.Placed("p0", "d1"))
    assert acts[-1] == A.RunStreamed("p0", "d1", 1)  # prompt + the token delivered
    assert m.output == [7]


def test_loss_from_a_worker_not_in_the_leg_is_refused() -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    with pytest.raises(InvalidTransition, match="from worker 'd0'"):
        m.handle(E.Lost(LostWorker("d0", LostPhase.PREFILL)))
    with pytest.raises(InvalidTransition, match="from worker 'p0'"):
        m.handle(E.Lost(LostWorker("p0", LostPhase.DECODE)))
    assert m.state is State.STREAMING


def test_cancelled_while_streaming_releases_everything_once() -> None:
    m = streaming()
    m.handle(E.Placed("p0", "d0"))
    acts = m.handle(E.Cancelled())
    assert m.state is State.FAILED and m.outcome is Outcome.CANCELLED
    assert released(acts) == [("worker_slot", "d0"), ("policy_slot", RID)]
    assert_nothing_held(m)


def test_redispatch_bound_applies_to_streamed_legs() -> None:
    m = streaming(limit=0)
    m.handle(E.Placed("p0", "d0"))
    acts = m.handle(E.Lost(LostWorker("p0", LostPhase.PREFILL, "Socket closed")))
    assert m.state is State.FAILED and m.outcome is Outcome.ERROR
    assert any(isinstance(a, A.Fail) for a in acts)
    assert_nothing_held(m)


def test_local_prefill_never_streams() -> None:
    m = RequestLifecycle(
        RID, prefill_id=None, decode_id="d0", clock=Clock(), max_redispatches=1, kv_stream=True
    )
    acts = m.handle(E.Placed(None, "d0"))
    assert m.state is State.DECODING and acts[-1] == A.RunLocalDecode("d0", 0)


def test_mode_and_eligibility() -> None:
    assert (
        KVStreamMode.parse("GRPC") is KVStreamMode.GRPC and KVStreamMode.parse("store") is KVStreamMode.STORE
    )
    with pytest.raises(ValueError, match="expected one of off, grpc, store"):
        KVStreamMode.parse("layers")
    ok = dict(local_prefill=False, num_candidates=1)  # relayed and direct token streams alike
    assert stream_eligible(KVStreamMode.STORE, **ok)
    assert not stream_eligible(KVStreamMode.OFF, **ok)
    assert not stream_eligible(KVStreamMode.GRPC, **{**ok, "local_prefill": True})
    assert not stream_eligible(KVStreamMode.GRPC, **{**ok, "num_candidates": 2})


# ---------------------------------------------------------------------------- the driver's leg
class FakeStreamedDecode:
    """A started streamed Decode: ``fail`` (its failure, settled at once), ``early`` (it sent its
    first message before the prefill answered)."""

    def __init__(self, legs: StreamFakeLegs, worker_id: str, fail: BaseException | None, early: bool):
        self.legs, self.worker_id, self._fail = legs, worker_id, fail
        self.settled: asyncio.Future = asyncio.get_running_loop().create_future()
        if fail is not None or early:
            self.settled.set_result(None)

    def failure(self) -> BaseException | None:
        return self._fail if self.settled.done() else None

    def chunks(self, first_index: int) -> AsyncIterator[Chunk]:
        self.legs.calls.append(("relay", self.worker_id, first_index))
        return self.legs._stream(self.worker_id, first_index)

    def cancel(self) -> None:
        self.legs.cancelled.append(self.worker_id)


class StreamFakeLegs(FakeLegs):
    """FakeLegs with streamed handoffs. ``dead``: decode workers whose Decode fails at once (the
    prefill's stream then has no consumer: that prefill fails CANCELLED, or ``hang``s until
    cancelled); ``slow``: a prefill that waits until cancelled (the client leaves meanwhile)."""

    def __init__(self, die=None, dead=(), early=(), hang=False, slow=()) -> None:
        super().__init__(die)
        self.dead, self.early, self.hang, self.slow = set(dead), set(early), hang, set(slow)
        self.cancelled: list[str] = []
        self.prefill_cancelled: list[str] = []
        self._decode: str | None = None

    def start_streamed_decode(self, worker_id: str, prefill_id: str, num_output: int) -> FakeStreamedDecode:
        self.calls.append(("streamed-decode", worker_id, num_output))
        self._decode = worker_id
        fail = (
            WorkerLostError(LostWorker(worker_id, LostPhase.DECODE, "Socket closed"))
            if worker_id in self.dead
            else None
        )
        return FakeStreamedDecode(self, worker_id, fail, worker_id in self.early)

    async def streamed_prefill(self, worker_id: str, num_output: int) -> PrefillAnswer:
        self.calls.append(("streamed-prefill", worker_id, num_output))
        try:
            await asyncio.sleep(0)
            if self.die.get(worker_id) == 0:
                raise WorkerLostError(LostWorker(worker_id, LostPhase.PREFILL, "Socket closed"))
            if self._decode in self.dead or worker_id in self.slow:
                if self.hang or worker_id in self.slow:
                    await asyncio.sleep(3600)
                raise RequestCancelledError("the KV stream was cancelled")
        except asyncio.CancelledError:
            self.prefill_cancelled.append(worker_id)
            raise
        tok = reference(num_output + 1)[-1]
        return PrefillAnswer(tok, None, num_output + 1 >= MAX, ("resp", (tok,)))


def _drive(legs: StreamFakeLegs, cluster: FakeCluster, limit: int = 2) -> tuple[RequestLifecycle, list[int]]:
    m = streaming(limit)

    async def go() -> list[int]:
        out: list[int] = []
        async for r in LifecycleDriver(m, legs, cluster).run(E.Placed("p0", "d0")):
            out.extend(r[1])
        return out

    return m, asyncio.run(asyncio.wait_for(go(), 30))


def _balanced(m: RequestLifecycle, cluster: FakeCluster) -> None:
    assert_nothing_held(m)
    assert not cluster.leases_released  # a streamed handoff never holds a lease at the router
    slots = [r.key for r in cluster.acquired if r.kind is ResourceKind.WORKER_SLOT]
    freed = [r.resource.key for r in cluster.released if r.resource.kind is ResourceKind.WORKER_SLOT]
    assert sorted(slots) == sorted(freed)


def test_driver_streamed_request_delivers_the_exact_output() -> None:
    legs, cluster = StreamFakeLegs(), FakeCluster()
    m, out = _drive(legs, cluster)
    assert out == reference() and m.outcome is Outcome.FINISHED
    assert legs.calls[:3] == [("streamed-decode", "d0", 0), ("streamed-prefill", "p0", 0), ("relay", "d0", 1)]
    _balanced(m, cluster)


def test_driver_decode_message_before_the_prefill_answer_waits_for_it() -> None:
    legs, cluster = StreamFakeLegs(early={"d0"}), FakeCluster()
    m, out = _drive(legs, cluster)
    assert out == reference() and m.outcome is Outcome.FINISHED
    _balanced(m, cluster)


def test_driver_prefill_lost_mid_stream_cancels_the_decode_and_prefills_again() -> None:
    legs, cluster = StreamFakeLegs(die={"p0": 0}), FakeCluster([("p1", None)])
    m, out = _drive(legs, cluster)
    assert out == reference() and m.outcome is Outcome.FINISHED
    assert legs.cancelled == ["d0"] and cluster.dropped == ["p0"]
    assert ("streamed-prefill", "p1", 0) in legs.calls and ("streamed-decode", "d0", 0) in legs.calls
    assert len(cluster.redispatches) == 1 and not cluster.redispatches[0].kv_reused
    _balanced(m, cluster)


@pytest.mark.parametrize("hang", [False, True], ids=["prefill-cancelled", "prefill-hangs"])
def test_driver_decode_lost_before_the_prefill_answer_redispatches(monkeypatch, hang: bool) -> None:
    monkeypatch.setattr(stream_legs, "PREFILL_GRACE_S", 0.05)
    legs, cluster = StreamFakeLegs(dead={"d0"}, hang=hang), FakeCluster([("p0", "d1")])
    m, out = _drive(legs, cluster)
    assert out == reference() and m.outcome is Outcome.FINISHED
    assert cluster.dropped == ["d0"] and ("streamed-decode", "d1", 0) in legs.calls
    assert legs.prefill_cancelled == (["p0"] if hang else [])
    _balanced(m, cluster)


def test_driver_client_leaving_mid_stream_cancels_both_calls() -> None:
    legs, cluster = StreamFakeLegs(slow={"p0"}), FakeCluster()
    m = streaming()

    async def go() -> None:
        gen = LifecycleDriver(m, legs, cluster).run(E.Placed("p0", "d0"))
        task = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.05)
        assert m.state is State.STREAMING
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await gen.aclose()

    asyncio.run(asyncio.wait_for(go(), 30))
    assert m.state is State.FAILED and m.outcome is Outcome.CANCELLED
    assert legs.prefill_cancelled == ["p0"] and legs.cancelled == ["d0"]
    _balanced(m, cluster)


class RefusingLegs(StreamFakeLegs):
    """The prefill worker refuses the streamed prefill (``prefill_error``), or the decode worker
    refuses its Decode at once (``decode_error``) while the prefill waits for a consumer."""

    def __init__(self, prefill_error=None, decode_error=None) -> None:
        super().__init__(slow={"p0"} if decode_error is not None else ())
        self.prefill_error, self.decode_error = prefill_error, decode_error

    def start_streamed_decode(self, worker_id: str, prefill_id: str, num_output: int) -> FakeStreamedDecode:
        d = super().start_streamed_decode(worker_id, prefill_id, num_output)
        if self.decode_error is not None:
            d._fail = self.decode_error
            d.settled.set_result(None)
        return d

    async def streamed_prefill(self, worker_id: str, num_output: int) -> PrefillAnswer:
        if self.prefill_error is not None:
            await asyncio.sleep(0)
            raise self.prefill_error
        return await super().streamed_prefill(worker_id, num_output)


def _failing(legs: StreamFakeLegs, cluster: FakeCluster) -> tuple[RequestLifecycle, BaseException]:
    m = streaming()

    async def go() -> None:
        async for _ in LifecycleDriver(m, legs, cluster).run(E.Placed("p0", "d0")):
            pass

    with pytest.raises(Exception) as e:
        asyncio.run(asyncio.wait_for(go(), 30))
    return m, e.value


def test_driver_prefill_refusal_fails_the_request_and_cancels_the_decode() -> None:
    from pdserve.errors import InvalidRequestError

    legs, cluster = (
        RefusingLegs(prefill_error=InvalidRequestError("KV_STREAM_TRANSPORT_STORE: no store")),
        FakeCluster(),
    )
    m, err = _failing(legs, cluster)
    assert isinstance(err, InvalidRequestError) and "KV_STREAM_TRANSPORT_STORE" in str(err)
    assert m.outcome is Outcome.ERROR and legs.cancelled == ["d0"] and not cluster.dropped
    _balanced(m, cluster)


def test_driver_decode_refusal_cancels_the_prefill_after_its_grace(monkeypatch) -> None:
    from pdserve.errors import ResourceExhaustedError

    monkeypatch.setattr(stream_legs, "PREFILL_GRACE_S", 0.05)
    legs, cluster = RefusingLegs(decode_error=ResourceExhaustedError("no free KV blocks")), FakeCluster()
    m, err = _failing(legs, cluster)
    assert isinstance(err, ResourceExhaustedError)
    assert m.outcome is Outcome.ERROR and legs.prefill_cancelled == ["p0"] and not cluster.dropped
    _balanced(m, cluster)


def test_driver_prefill_failing_on_its_own_never_drops_the_decode_worker(monkeypatch) -> None:
    """The prefill fails by itself (out of blocks); the decode worker's Decode fails too, with
    UNAVAILABLE (the stream it read ended before its final), mapped to a lost decode worker. The
    prefill's error is the cause: the request fails with it, and the healthy decode worker is
    not dropped (it was, before: the decode side's failure was preferred to any prefill error)."""
    from pdserve.errors import ResourceExhaustedError

    monkeypatch.setattr(stream_legs, "PREFILL_GRACE_S", 0.5)
    lost = WorkerLostError(LostWorker("d0", LostPhase.DECODE, "the KV stream of 'r1' ended before its final"))
    legs = RefusingLegs(
        prefill_error=ResourceExhaustedError("prefill worker out of KV blocks"), decode_error=lost
    )
    cluster = FakeCluster([("p0", "d1")])  # a re-dispatch would find a replacement: none must happen
    m, err = _failing(legs, cluster)
    assert isinstance(err, ResourceExhaustedError) and "prefill worker" in str(err)
    assert m.outcome is Outcome.ERROR and not cluster.dropped and not cluster.redispatches
    assert legs.cancelled == ["d0"]
    _balanced(m, cluster)
