"""pdserve.client_direct.direct_messages reads the router's call in the caller's task until the
redirect (#12: no task switch, no queue hop for those messages): a relayed call runs no pump task
at all, a direct one starts it only after the redirect; the call's message iterator is closed in
the caller's task however the sequence ends."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.client_direct import direct_messages
from pdserve.v1 import client_pb2, common_pb2, direct_pb2

RID = "cluster-1"
REDIRECT = direct_pb2.DirectRedirect(address="w:1", worker_id="decode-0", ticket="tk", request_id=RID)


class _Call:
    """The router's Generate call: each message records the task that read it; ``error``: raised
    after the messages; ``closed``: its iterator was closed (aclose or ended)."""

    def __init__(self, messages: list, error: BaseException | None = None) -> None:
        self.messages = messages
        self.error = error
        self.readers: list[asyncio.Task | None] = []
        self.closed = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        try:
            for m in self.messages:
                await asyncio.sleep(0)
                self.readers.append(asyncio.current_task())
                yield m
            if self.error is not None:
                raise self.error
        finally:
            self.closed = True


class _Conn:
    def __init__(self, deltas: list[direct_pb2.DirectDelta]) -> None:
        self.deltas = deltas

    def attach(self, rid: str, ticket: str, q: asyncio.Queue) -> None:
        for d in self.deltas:
            q.put_nowait(("direct", self, d))

    def detach(self, rid: str, tell_worker: bool) -> None:
        pass


class _Mux:
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    def get(self, address: str) -> _Conn:
        return self.conn


def _finish(n: int) -> client_pb2.GenerateResponse:
    return client_pb2.GenerateResponse(
        request_id="mine", finish=common_pb2.Finish(usage=common_pb2.Usage(completion_tokens=n))
    )


async def _consume(call: _Call, mux: _Mux, stop_after: int | None = None) -> tuple[list, asyncio.Task]:
    got = []
    agen = direct_messages(call, mux, lambda r: None)
    try:
        async for m in agen:
            got.append(m)
            if stop_after is not None and len(got) >= stop_after:
                break
    finally:
        await agen.aclose()
    me = asyncio.current_task()
    assert me is not None
    return got, me


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_relayed_call_is_read_in_the_callers_task_only() -> None:
    msgs = [
        client_pb2.GenerateResponse(request_id="mine", token_ids=[5], text="a"),
        client_pb2.GenerateResponse(request_id="mine", token_ids=[6], text="b"),
        _finish(2),
    ]
    call = _Call(msgs)
    got, me = _run(_consume(call, _Mux(_Conn([]))))
    assert [list(m.token_ids) for m in got] == [[5], [6], []]
    assert got[-1].HasField("finish")
    assert call.readers == [me, me, me]  # no pump task
    assert call.closed


def test_a_direct_call_is_pumped_only_after_its_redirect() -> None:
    first = client_pb2.GenerateResponse(request_id="mine", token_ids=[5], text="a")
    redirect = client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT)
    deltas = [
        direct_pb2.DirectDelta(request_id=RID, token_ids=[6, 7], text="bc"),
        direct_pb2.DirectDelta(request_id=RID, token_ids=[8], text="d", done=True),
    ]
    call = _Call([first, redirect, _finish(4)])
    got, me = _run(_consume(call, _Mux(_Conn(deltas))))
    assert [list(m.token_ids) for m in got] == [[5], [6, 7], [8]]
    assert got[-1].HasField("finish") and got[-1].text == "d"
    assert call.readers[:2] == [me, me]  # the first token and the redirect: read here
    assert call.readers[2] is not me  # the Finish: by the pump, beside the worker's deltas
    assert call.closed


def test_a_consumer_that_stops_early_closes_the_calls_iterator_in_its_task() -> None:
    msgs = [client_pb2.GenerateResponse(request_id="mine", token_ids=[i]) for i in range(5)]
    call = _Call(msgs)
    got, _ = _run(_consume(call, _Mux(_Conn([])), stop_after=2))
    assert len(got) == 2
    assert call.closed  # closed by aclose, not left to the loop's finalizer


class _RpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT


def test_the_routers_error_before_the_redirect_is_raised() -> None:
    call = _Call([client_pb2.GenerateResponse(request_id="mine", token_ids=[5])], error=_RpcError())
    with pytest.raises(_RpcError):
        _run(_consume(call, _Mux(_Conn([]))))
    assert call.closed
