"""The gRPC streamed Decode (router/lifecycle/grpc_stream_legs.py) of a request whose client left
between the prefill's answer and the decode worker's first message aborts the request on the
prefill worker, so that its finished KV stream (which the decode worker may never subscribe to)
is dropped at once instead of waiting the stream registry's TTL; so does a Decode that fails before
its first message with any status that ends the request (a lost worker or KV is re-dispatched and
leaves the prefill alone). Fakes for the stubs; no server."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc

from pdserve.v1 import client_pb2, worker_pb2
from router.lifecycle.grpc_stream_legs import GrpcStreamedDecode


class _Call:
    """A Decode call that never sends (the decode worker has not subscribed yet), or fails with
    ``fails`` (a status code) before its first message."""

    def __init__(self, fails: grpc.StatusCode | None = None) -> None:
        self.cancelled = False
        self._never: asyncio.Future = asyncio.get_running_loop().create_future()
        if fails is not None:
            self._never.set_exception(
                grpc.aio.AioRpcError(
                    fails, grpc.aio.Metadata(), grpc.aio.Metadata(), "decode worker d0 said no"
                )
            )

    def __aiter__(self):
        return self

    async def __anext__(self):
        await self._never
        raise StopAsyncIteration

    def cancel(self) -> bool:
        self.cancelled = True
        if not self._never.done():
            self._never.cancel()
        return True


class _Stub:
    def __init__(self, address: str, log: list, fails: grpc.StatusCode | None = None) -> None:
        self.address, self.log, self.fails = address, log, fails

    def Decode(self, req, timeout=None, metadata=None):  # noqa: N802 - gRPC's name
        self.log.append(("Decode", self.address, req.kv_stream_address))
        self.call = _Call(self.fails)
        return self.call

    async def Abort(self, req, timeout=None, metadata=None):  # noqa: N802 - gRPC's name
        self.log.append(("Abort", self.address, req.request_id))
        return worker_pb2.AbortResponse(found=True)


class _Ctx:
    def __init__(self) -> None:
        self.gone = False

    def cancelled(self) -> bool:
        return self.gone

    def time_remaining(self):
        return None


def _legs(log: list, ctx: _Ctx, fails: grpc.StatusCode | None = None):
    stubs: dict[str, _Stub] = {}

    def worker(address: str) -> _Stub:
        return stubs.setdefault(address, _Stub(address, log, fails))

    entries = {
        "p0": SimpleNamespace(worker_id="p0", address="p0:1"),
        "d0": SimpleNamespace(worker_id="d0", address="d0:1"),
    }
    return SimpleNamespace(
        svc=SimpleNamespace(stubs=SimpleNamespace(worker=worker)),
        req=client_pb2.GenerateRequest(request_id="r1"),
        ctx=ctx,
        _entry=entries.__getitem__,
        _leg_request=lambda n: {"request_id": "r1", "prompt_token_ids": [1, 2, 3]},
    ), stubs


def _run(client_left: bool) -> list:
    log: list = []
    ctx = _Ctx()

    async def go() -> None:
        legs, stubs = _legs(log, ctx)
        dec = GrpcStreamedDecode(legs, "d0", "p0", 0)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        ctx.gone = client_left
        dec.cancel()
        dec.cancel()  # once only
        await asyncio.sleep(0.05)
        assert stubs["d0:1"].call.cancelled

    asyncio.run(asyncio.wait_for(go(), 10))
    return log


def test_client_leaving_before_the_first_decode_message_aborts_the_prefill_stream() -> None:
    log = _run(client_left=True)
    assert log == [("Decode", "d0:1", "p0:1"), ("Abort", "p0:1", "r1")]


def test_a_cancel_while_the_client_stays_leaves_the_prefill_alone() -> None:
    # (a re-dispatch may prefill the same request id on that prefill worker again)
    assert _run(client_left=False) == [("Decode", "d0:1", "p0:1")]


def _run_failed(code: grpc.StatusCode) -> list:
    """The Decode fails with ``code`` before its first message, the client still there; the
    relay ends (its ``cancel``)."""
    log: list = []

    async def go() -> None:
        legs, _ = _legs(log, _Ctx(), fails=code)
        dec = GrpcStreamedDecode(legs, "d0", "p0", 0)  # type: ignore[arg-type]
        await asyncio.wait({dec.settled})
        dec.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(asyncio.wait_for(go(), 10))
    return log


def test_a_decode_worker_refusing_for_room_aborts_the_prefill_stream() -> None:
    # RESOURCE_EXHAUSTED (no blocks or LoRA slot within its admission timeout): the request
    # fails with it, never re-dispatched, so the stream will never be consumed
    log = _run_failed(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert log == [("Decode", "d0:1", "p0:1"), ("Abort", "p0:1", "r1")]


def test_a_lost_decode_worker_leaves_the_prefill_alone() -> None:
    # UNAVAILABLE: the request is re-dispatched, maybe to the same prefill worker with the same id
    assert _run_failed(grpc.StatusCode.UNAVAILABLE) == [("Decode", "d0:1", "p0:1")]


def test_a_decode_worker_rejecting_the_request_aborts_the_prefill_stream() -> None:
    # INVALID_ARGUMENT (any status that is not a loss): the client gets it, nothing re-dispatches,
    # so the stream would wait its 60 s TTL with its store chunks leased
    log = _run_failed(grpc.StatusCode.INVALID_ARGUMENT)
    assert log == [("Decode", "d0:1", "p0:1"), ("Abort", "p0:1", "r1")]


def test_a_decode_worker_failing_internally_aborts_the_prefill_stream() -> None:
    log = _run_failed(grpc.StatusCode.INTERNAL)
    assert log == [("Decode", "d0:1", "p0:1"), ("Abort", "p0:1", "r1")]


def test_a_lost_kv_stream_leaves_the_prefill_alone() -> None:
    # NOT_FOUND (the stream it was to read was gone): a lost KV, re-dispatched like a lost worker
    assert _run_failed(grpc.StatusCode.NOT_FOUND) == [("Decode", "d0:1", "p0:1")]
