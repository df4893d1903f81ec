"""Chunk-wise KV streaming of a direct token stream (router.lifecycle.direct_legs
``DirectLegs.start_streamed_decode`` + router.lifecycle.grpc_stream_legs ``DirectGrantLeg``) driven
by the real lifecycle (RequestLifecycle, LifecycleDriver, stream_legs.run_streamed) over fake
worker stubs: no server, no model.

* the streamed Decode carries both ``kv_stream_address`` and the direct grant (a ticket for its
  decode worker that outlives the prefill's progress deadline); the prefill's token reaches the
  client before the redirect, even when the decode worker's admission message comes first;
  progress sends the client nothing, the finish only the Finish;
* the decode worker lost after the redirect: the client is told (``lost``), its ResumeDirect tokens
  join the output and the request is re-dispatched with them: prefilled again (streamed) and
  relayed, the Decode then without a grant; output exact;
* the prefill worker lost mid-stream: the Decode is cancelled, the prompt prefilled on another
  prefill worker, the new Decode direct again with a fresh ticket;
* the client leaving mid-prefill cancels both calls and aborts the request on the prefill worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

import grpc
import pytest

from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer
from pdserve.proto_convert import sampling_to_proto
from pdserve.ticket import TicketSigner, decode_unverified
from pdserve.v1 import client_pb2, common_pb2, direct_pb2, worker_pb2
from router.lifecycle import events as E
from router.lifecycle.direct_legs import DirectBook, DirectConfig, DirectLegs
from router.lifecycle.driver import LifecycleDriver
from router.lifecycle.grpc_legs import RequestRun
from router.lifecycle.machine import RequestLifecycle
from router.lifecycle.states import Outcome
from router.lifecycle.stream_mode import KVStreamMode
from router.progress import ProgressConfig
from router.registry import WorkerEntry, WorkerKind, WorkerLoad
from tests.unit.test_router_lifecycle_driver import FakeCluster

RID = "r1"
PROMPT = [5, 6, 7]
OUT = [ord(c) for c in "abcdef"]  # the model's output: token t renders as chr(t)
PARAMS = SamplingParams(max_tokens=len(OUT), ignore_eos=True)
TTL_S = 30.0


class _Tok:
    def decode(self, ids: list[int]) -> str:
        return "".join(chr(t) for t in ids)


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return ()


class _Prefill:
    """A Prefill call: answers ``OUT[k]`` (k: the output the request had) once ``gate`` is set;
    ``lost``: fails UNAVAILABLE at once instead."""

    def __init__(self, w: _Workers, req: worker_pb2.PrefillRequest, lost: bool) -> None:
        self.w, self.req, self.lost, self.cancelled = w, req, lost, False

    def __await__(self):
        return self._answer().__await__()

    async def _answer(self) -> worker_pb2.PrefillResponse:
        if self.lost:
            raise _RpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        try:
            await self.w.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        k = len(self.req.prompt_token_ids) - len(PROMPT)
        self.w.answered.set()
        return worker_pb2.PrefillResponse(request_id=RID, first_token=OUT[k])

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _Decode:
    """A streamed Decode call: after the prefill answered (or at once: ``early``), a direct one
    sends its admission message, then ``OUT`` from index k + 1 as progress (two tokens a message)
    and the finish, unless it is lost (UNAVAILABLE) after ``lose_after`` progress messages; a
    relayed one sends the tokens with the finish."""

    def __init__(self, w: _Workers, address: str, req: worker_pb2.DecodeRequest) -> None:
        self.w, self.address, self.req, self.cancelled = w, address, req, False
        self._stop = asyncio.get_running_loop().create_future()

    def __aiter__(self):
        return self._messages()

    async def _wait(self, ev: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(ev.wait())
        await asyncio.wait({waiter, self._stop}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._stop.done():
            raise _RpcError(grpc.StatusCode.CANCELLED, "cancelled")

    async def _messages(self):
        if self.address not in self.w.early:
            await self._wait(self.w.answered)
        k = len(self.req.prompt_token_ids) - len(PROMPT)
        rest = OUT[k + 1 :]
        if not self.req.HasField("direct"):
            yield worker_pb2.DecodeResponse(
                request_id=RID,
                token_ids=rest,
                finish=common_pb2.Finish(reason=common_pb2.FINISH_REASON_LENGTH),
            )
            return
        self.w.direct_admitted.set()
        yield worker_pb2.DecodeResponse(
            request_id=RID, kv_pull_s=0.01, direct_address=self.address + "-direct"
        )
        for i in range(0, len(rest), 2):
            if self.w.lose_after.get(self.address) == i // 2:
                raise _RpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
            m = worker_pb2.DecodeResponse(request_id=RID, token_ids=rest[i : i + 2])
            if i + 2 >= len(rest):
                m.finish.reason = common_pb2.FINISH_REASON_LENGTH
            await asyncio.sleep(0)
            yield m

    def cancel(self) -> bool:
        self.cancelled = True
        if not self._stop.done():
            self._stop.set_result(None)
        return True


class _Workers:
    """The fake workers' stubs and what they were asked."""

    def __init__(self, lost_prefill=(), lose_after=None, early=()) -> None:
        self.lost_prefill, self.lose_after, self.early = set(lost_prefill), dict(lose_after or {}), set(early)
        self.gate = asyncio.Event()
        self.gate.set()
        self.answered = asyncio.Event()
        self.direct_admitted = asyncio.Event()
        self.prefills: list[tuple[str, _Prefill]] = []
        self.decodes: list[tuple[str, _Decode]] = []
        self.aborts: list[tuple[str, str]] = []

    def worker(self, address: str) -> SimpleNamespace:
        def prefill(req, timeout=None, metadata=None):
            self.answered.clear()
            call = _Prefill(self, req, address in self.lost_prefill)
            self.prefills.append((address, call))
            return call

        def decode(req, timeout=None, metadata=None):
            call = _Decode(self, address, req)
            self.decodes.append((address, call))
            return call

        async def abort(req, timeout=None, metadata=None):
            self.aborts.append((address, req.request_id))
            return worker_pb2.AbortResponse(found=True)

        return SimpleNamespace(Prefill=prefill, Decode=decode, Abort=abort)


class _Outstanding:
    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def add(self, w: str, n: int) -> None:
        self.n[w] = self.n.get(w, 0) + n

    def get(self, w: str) -> int:
        return self.n.get(w, 0)


class _Ctx:
    def __init__(self) -> None:
        self.gone = False

    def cancelled(self) -> bool:
        return self.gone

    def time_remaining(self) -> None:
        return None


def _setup(workers: _Workers, replacements=()):
    svc = SimpleNamespace(
        stubs=SimpleNamespace(worker=workers.worker),
        config=SimpleNamespace(
            model_id="m", progress=ProgressConfig(), store_address=None, kv_stream=KVStreamMode.GRPC
        ),
        registry=SimpleNamespace(add_inflight=lambda w, n: None, seen=lambda w: None, drop=lambda w: None),
        outstanding=_Outstanding(),
        eos=frozenset(),
        tokenizer=_Tok(),
        _streamed_at={},
    )
    run = RequestRun(RID, list(PROMPT), PARAMS, time.monotonic(), IncrementalDetokenizer(_Tok(), ()))
    for w, kind in (("p0", WorkerKind.PREFILL), ("p1", WorkerKind.PREFILL), ("d0", WorkerKind.DECODE)):
        run.workers[w] = WorkerEntry(w, kind, w, "m", WorkerLoad(0, 0, 64, 0))
    run.workers["d1"] = WorkerEntry("d1", WorkerKind.DECODE, "d1", "m", WorkerLoad(0, 0, 64, 0))
    req = client_pb2.GenerateRequest(request_id=RID, sampling=sampling_to_proto(PARAMS), direct_stream=True)
    ctx = _Ctx()
    book = DirectBook(DirectConfig(ticket_ttl_s=TTL_S), signer=TicketSigner(b"k" * 32))
    legs = DirectLegs(svc, req, run, ctx, book)  # type: ignore[arg-type]
    m = RequestLifecycle(
        RID,
        prefill_id="p0",
        decode_id="d0",
        clock=time.monotonic,
        max_redispatches=2,
        prompt_tokens=len(PROMPT),
        kv_stream=True,
    )
    cluster = FakeCluster(list(replacements))
    return m, legs, cluster, ctx


async def _serve(m, legs, cluster, resume: list[int] | None = None) -> list[client_pb2.GenerateResponse]:
    """The driver's client responses (progress: None, left out); a ``lost`` redirect is answered
    with the client's ResumeDirect of ``resume``."""
    out: list[client_pb2.GenerateResponse] = []
    async for r in LifecycleDriver(m, legs, cluster).run(E.Placed("p0", "d0")):
        if r is None:
            continue
        out.append(r)
        if r.HasField("direct") and r.direct.lost:
            assert resume is not None
            await legs.book.ResumeDirect(
                direct_pb2.ResumeDirectRequest(
                    request_id=RID, ticket=r.direct.ticket, token_ids=resume, text_chars=len(resume)
                ),
                None,
            )
    return out


def _tokens(rs: list[client_pb2.GenerateResponse]) -> list[int]:
    return [t for r in rs for t in r.token_ids]


@pytest.mark.parametrize("early", [False, True], ids=["after-prefill", "admitted-first"])
def test_streamed_decode_carries_the_grant_and_redirects_after_the_prefill_token(early: bool) -> None:
    async def go():
        w = _Workers(early={"d0"} if early else ())
        if early:
            w.gate.clear()  # the prefill answers only once the decode worker was admitted
        m, legs, cluster, _ = _setup(w)
        served = asyncio.ensure_future(_serve(m, legs, cluster))
        if early:
            await asyncio.wait_for(w.direct_admitted.wait(), 10)
            w.gate.set()
        return w, m, legs, cluster, await served

    t_start = time.time()
    w, m, legs, cluster, rs = asyncio.run(asyncio.wait_for(go(), 30))
    ((addr, dec),), ((paddr, pre),) = w.decodes, w.prefills
    assert (addr, paddr) == ("d0", "p0")
    assert dec.req.kv_stream_address == "p0" and dec.req.HasField("direct")
    assert pre.req.kv_stream == worker_pb2.KV_STREAM_TRANSPORT_GRPC
    claims = decode_unverified(dec.req.direct.ticket)
    assert (claims.request_id, claims.worker_id) == (RID, "d0")
    # minted before the prefill: it outlives the prefill's progress deadline
    assert claims.expires_at >= t_start + TTL_S + ProgressConfig().prefill_floor_s
    assert len(rs) == 3
    first, redirect, final = rs
    assert list(first.token_ids) == [OUT[0]] and first.text == "a"  # the prefill's, relayed
    assert redirect.direct.ticket == dec.req.direct.ticket and not redirect.direct.lost
    assert redirect.direct.address == "d0-direct" and redirect.direct.worker_id == "d0"
    assert not final.token_ids and final.finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert final.finish.usage.completion_tokens == len(OUT)
    assert legs.run.out_ids == OUT and m.outcome is Outcome.FINISHED
    assert not w.aborts
    cluster.check_released_once(m)


def test_decode_lost_after_the_redirect_resumes_the_client_and_prefills_again() -> None:
    w = _Workers(lose_after={"d0": 1})  # lost after its first progress message (tokens 1, 2)
    m, legs, cluster, _ = _setup(w, replacements=[("p0", "d1")])
    client_has = OUT[:4]  # the client got token 3 too (a delta the router had no progress for)
    rs = asyncio.run(asyncio.wait_for(_serve(m, legs, cluster, resume=client_has), 30))
    redirects = [r.direct for r in rs if r.HasField("direct")]
    assert [d.lost for d in redirects] == [False, True] and {d.worker_id for d in redirects} == {"d0"}
    # the client's tokens (from the decode worker) are not sent back; the rest is relayed
    assert _tokens(rs) == [OUT[0], OUT[4], OUT[5]] and rs[-1].finish.usage.completion_tokens == len(OUT)
    assert legs.run.out_ids == OUT and m.outcome is Outcome.FINISHED
    assert [a for a, _ in w.decodes] == ["d0", "d1"] and [a for a, _ in w.prefills] == ["p0", "p0"]
    again = w.decodes[1][1].req
    assert not again.HasField("direct") and again.kv_stream_address == "p0"  # resumed: relayed
    assert list(w.prefills[1][1].req.prompt_token_ids) == PROMPT + client_has
    assert cluster.dropped == ["d0"] and len(cluster.redispatches) == 1
    cluster.check_released_once(m)


def test_prefill_lost_mid_stream_cancels_the_decode_and_streams_again_direct() -> None:
    w = _Workers(lost_prefill={"p0"})
    m, legs, cluster, _ = _setup(w, replacements=[("p1", None)])
    rs = asyncio.run(asyncio.wait_for(_serve(m, legs, cluster), 30))
    (d0, first), (d0_again, second) = w.decodes
    assert d0 == d0_again == "d0" and first.cancelled
    assert first.req.kv_stream_address == "p0" and second.req.kv_stream_address == "p1"
    assert first.req.direct.ticket != second.req.direct.ticket  # a fresh grant
    assert [r.direct.ticket for r in rs if r.HasField("direct")] == [second.req.direct.ticket]
    assert _tokens(rs) == [OUT[0]] and legs.run.out_ids == OUT and m.outcome is Outcome.FINISHED
    assert cluster.dropped == ["p0"]
    cluster.check_released_once(m)


def test_client_leaving_mid_prefill_cancels_both_calls_and_drops_the_stream() -> None:
    async def go():
        w = _Workers()
        w.gate.clear()  # the prefill runs until the client leaves
        m, legs, cluster, ctx = _setup(w)
        gen = LifecycleDriver(m, legs, cluster).run(E.Placed("p0", "d0"))
        task = asyncio.ensure_future(anext(gen))
        while not (w.prefills and w.decodes):
            await asyncio.sleep(0.001)
        ctx.gone = True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await gen.aclose()
        for _ in range(10):  # the prefill worker's Abort is fire and forget
            await asyncio.sleep(0)
        return w, m, cluster

    w, m, cluster = asyncio.run(asyncio.wait_for(go(), 30))
    assert m.outcome is Outcome.CANCELLED
    assert w.prefills[0][1].cancelled and w.decodes[0][1].cancelled
    assert w.aborts == [("p0", RID)]
    cluster.check_released_once(m)
