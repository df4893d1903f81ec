"""The SDK's merge of a direct stream (pdserve.client_direct.direct_messages) over fakes: the
router's messages and the worker's deltas become one relayed-looking sequence; the Finish waits for
the worker's last delta and its count is checked; a lost worker's request is resumed with exactly
what the client has; a refused attach raises."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.client_direct import direct_messages
from pdserve.errors import InternalError, PermissionDeniedError
from pdserve.v1 import client_pb2, common_pb2, direct_pb2

RID = "cluster-1"
REDIRECT = direct_pb2.DirectRedirect(address="w:1", worker_id="decode-0", ticket="tk", request_id=RID)


def _finish(n: int) -> client_pb2.GenerateResponse:
    return client_pb2.GenerateResponse(
        request_id="mine", finish=common_pb2.Finish(usage=common_pb2.Usage(completion_tokens=n))
    )


class _Call:
    """The router's Generate call: ``script`` items are messages, or floats (sleep seconds)."""

    def __init__(self, script: list) -> None:
        self.script = script

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for x in self.script:
            if isinstance(x, float):
                await asyncio.sleep(x)
            else:
                yield x


class _Conn:
    def __init__(self, deltas: list[direct_pb2.DirectDelta], delay_s: float | list[float]) -> None:
        self.deltas = deltas
        self.delays = delay_s if isinstance(delay_s, list) else [delay_s] * len(deltas)
        self.attached: list[tuple[str, str]] = []
        self.detached: list[tuple[str, bool]] = []

    def attach(self, rid: str, ticket: str, q: asyncio.Queue) -> None:
        self.attached.append((rid, ticket))

        async def feed() -> None:
            for d, wait in zip(self.deltas, self.delays, strict=True):
                await asyncio.sleep(wait)
                q.put_nowait(("direct", self, d))

        asyncio.ensure_future(feed())

    def detach(self, rid: str, tell_worker: bool) -> None:
        self.detached.append((rid, tell_worker))


class _Mux:
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    def get(self, address: str) -> _Conn:
        assert address == REDIRECT.address
        return self.conn


def _delta(tokens: list[int], text: str, done: bool = False, **kw) -> direct_pb2.DirectDelta:
    return direct_pb2.DirectDelta(request_id=RID, token_ids=tokens, text=text, done=done, **kw)


async def _run(call: _Call, conn: _Conn, resumes: list | None = None) -> list[client_pb2.GenerateResponse]:
    async def resume(r):
        assert resumes is not None, "no resume expected"
        resumes.append(r)

    return [m async for m in direct_messages(call, _Mux(conn), resume)]


def test_finish_waits_for_the_workers_last_delta() -> None:
    first = client_pb2.GenerateResponse(request_id="mine", token_ids=[1], text="a")
    redirect = client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT)
    call = _Call([first, redirect, _finish(4)])  # the router's finish comes before the deltas
    conn = _Conn([_delta([2, 3], "bc"), _delta([4], "d", done=True)], delay_s=0.01)
    out = asyncio.run(_run(call, conn))
    # the worker's last tokens go out with the router's finish, as a relay's last message
    assert [list(m.token_ids) for m in out] == [[1], [2, 3], [4]]
    assert "".join(m.text for m in out) == "abcd"
    assert out[-1].HasField("finish") and all(m.request_id == "mine" for m in out)
    assert conn.attached == [(RID, "tk")] and conn.detached == [(RID, False)]


def test_a_finish_that_counts_other_tokens_is_an_error() -> None:
    call = _Call([client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT), _finish(5)])
    conn = _Conn([_delta([2, 3], "bc", done=True)], delay_s=0.0)
    with pytest.raises(InternalError, match="counts 5 output tokens but 2 arrived"):
        asyncio.run(_run(call, conn))


def test_a_lost_worker_is_resumed_with_what_the_client_has() -> None:
    lost = direct_pb2.DirectRedirect()
    lost.CopyFrom(REDIRECT)
    lost.lost = True
    first = client_pb2.GenerateResponse(request_id="mine", token_ids=[1], text="a")
    call = _Call(
        [
            first,
            client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT),
            0.3,  # the worker streams meanwhile
            client_pb2.GenerateResponse(request_id="mine", direct=lost),
            0.6,  # a late delta from the lost worker is not taken
            client_pb2.GenerateResponse(request_id="mine", token_ids=[9], text="z"),  # relayed after
            _finish(4),
        ]
    )
    conn = _Conn([_delta([2], "b"), _delta([3], "c"), _delta([7], "LATE")], delay_s=[0.01, 0.01, 0.5])
    resumes: list[direct_pb2.ResumeDirectRequest] = []
    out = asyncio.run(_run(call, conn, resumes))
    assert [t for m in out for t in m.token_ids] == [1, 2, 3, 9]
    assert "".join(m.text for m in out) == "abcz"
    (r,) = resumes
    assert (r.request_id, r.ticket, list(r.token_ids), r.text_chars) == (RID, "tk", [1, 2, 3], 3)
    assert conn.detached[0] == (RID, True)


def test_a_refused_attach_raises_its_error() -> None:
    call = _Call([client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT), 1.0, _finish(0)])
    denied = _delta(
        [], "", done=True, error_code=grpc.StatusCode.PERMISSION_DENIED.value[0], error="ticket refused"
    )
    with pytest.raises(PermissionDeniedError, match="ticket refused"):
        asyncio.run(_run(call, _Conn([denied], delay_s=0.0)))


def test_a_relayed_group_passes_every_choice_through() -> None:
    """A router relays an ``n`` > 1 request (no redirect): each choice's finish is passed on and
    only the call's end ends the sequence (the first finish had ended it: choices 1..n-1 lost)."""
    msgs = []
    for i in range(3):
        msgs.append(client_pb2.GenerateResponse(request_id="mine", token_ids=[i], text="x", choice_index=i))
    for i in range(3):
        fin = _finish(1)
        fin.choice_index = i
        msgs.append(fin)
    out = asyncio.run(_run(_Call(msgs), _Conn([], delay_s=0.0)))
    assert out == msgs
    assert [m.choice_index for m in out if m.HasField("finish")] == [0, 1, 2]


class _Muxes:
    """Connections by worker address (a request that moves between workers)."""

    def __init__(self, conns: dict[str, _Conn]) -> None:
        self.conns = conns

    def get(self, address: str) -> _Conn:
        return self.conns[address]


def test_a_migrated_request_resumes_then_streams_from_its_destination() -> None:
    """A live migration (router.lifecycle.direct_legs ``DirectLegs.moved``): the source ends the
    request's deltas (ABORTED), the router says ``lost``, the client resumes with what it has,
    then the router redirects it to the destination (a new ticket), whose deltas continue: no
    gap, no duplicate, one count check at the finish."""
    lost = direct_pb2.DirectRedirect()
    lost.CopyFrom(REDIRECT)
    lost.lost = True
    dest = direct_pb2.DirectRedirect(address="w:2", worker_id="decode-1", ticket="tk2", request_id=RID)
    call = _Call(
        [
            client_pb2.GenerateResponse(request_id="mine", token_ids=[1], text="a"),
            client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT),
            0.2,
            client_pb2.GenerateResponse(request_id="mine", direct=lost),
            0.1,
            client_pb2.GenerateResponse(request_id="mine", direct=dest),
            _finish(5),  # before the destination's last delta: held for it
        ]
    )
    aborted = _delta([], "", done=True, error_code=grpc.StatusCode.ABORTED.value[0], error="migrated")
    src = _Conn([_delta([2], "b"), _delta([3], "c"), aborted], delay_s=0.01)
    dst = _Conn([_delta([4], "d"), _delta([5], "e", done=True)], delay_s=0.05)
    resumes: list[direct_pb2.ResumeDirectRequest] = []

    async def resume(r):
        resumes.append(r)

    async def run():
        return [m async for m in direct_messages(call, _Muxes({"w:1": src, "w:2": dst}), resume)]

    out = asyncio.run(run())
    assert [t for m in out for t in m.token_ids] == [1, 2, 3, 4, 5]
    assert "".join(m.text for m in out) == "abcde" and out[-1].HasField("finish")
    (r,) = resumes
    assert (r.ticket, list(r.token_ids), r.text_chars) == ("tk", [1, 2, 3], 3)
    assert src.attached == [(RID, "tk")] and dst.attached == [(RID, "tk2")]
    assert dst.detached == [(RID, False)]  # done: the destination is not told to abort
