"""The sync SDK's merge of a direct stream (pdserve.client_direct.direct_messages_sync) over fakes,
the same scenarios as the asyncio driver's tests (tests/unit/test_client_direct.py): one relayed-
looking sequence, the Finish held for the worker's last delta and its count checked, a lost
worker's request resumed with exactly what the client has, a refused attach raised; plus a relayed
call (no redirect) passed through unchanged and a cancelled call ending with its error."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from pdserve.client_direct import direct_messages_sync
from pdserve.errors import InternalError, PermissionDeniedError
from pdserve.v1 import client_pb2, common_pb2, direct_pb2

RID = "cluster-1"
REDIRECT = direct_pb2.DirectRedirect(address="w:1", worker_id="decode-0", ticket="tk", request_id=RID)


def _finish(n: int) -> client_pb2.GenerateResponse:
    return client_pb2.GenerateResponse(
        request_id="mine", finish=common_pb2.Finish(usage=common_pb2.Usage(completion_tokens=n))
    )


class _Cancelled(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED


class _Call:
    """The router's sync Generate call: ``script`` items are messages, or floats (sleep seconds);
    ``cancel`` ends the iteration with CANCELLED."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.cancelled = threading.Event()

    def __iter__(self):
        for x in self.script:
            if isinstance(x, float):
                if self.cancelled.wait(x):
                    raise _Cancelled()
            else:
                if self.cancelled.is_set():
                    raise _Cancelled()
                yield x

    def cancel(self) -> None:
        self.cancelled.set()


class _Conn:
    def __init__(self, deltas: list[direct_pb2.DirectDelta], delay_s: float | list[float]) -> None:
        self.deltas = deltas
        self.delays = delay_s if isinstance(delay_s, list) else [delay_s] * len(deltas)
        self.attached: list[tuple[str, str]] = []
        self.detached: list[tuple[str, bool]] = []

    def attach(self, rid: str, ticket: str, q) -> None:
        self.attached.append((rid, ticket))

        def feed() -> None:
            for d, wait in zip(self.deltas, self.delays, strict=True):
                time.sleep(wait)
                q.put_nowait(("direct", self, d))

        threading.Thread(target=feed, daemon=True).start()

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


def _run(call: _Call, conn: _Conn, resumes: list | None = None) -> list[client_pb2.GenerateResponse]:
    def resume(r):
        assert resumes is not None, "no resume expected"
        resumes.append(r)

    return list(direct_messages_sync(call, _Mux(conn), resume))


def test_finish_waits_for_the_workers_last_delta() -> None:
    first = client_pb2.GenerateResponse(request_id="mine", token_ids=[1], text="a")
    redirect = client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT)
    call = _Call([first, redirect, _finish(4)])  # the router's finish comes before the deltas
    conn = _Conn([_delta([2, 3], "bc"), _delta([4], "d", done=True)], delay_s=0.01)
    out = _run(call, conn)
    # the worker's last tokens go out with the router's finish, as a relay's last message
    assert [list(m.token_ids) for m in out] == [[1], [2, 3], [4]]
    assert "".join(m.text for m in out) == "abcd"
    assert out[-1].HasField("finish") and all(m.request_id == "mine" for m in out)
    assert conn.attached == [(RID, "tk")] and conn.detached == [(RID, False)]


def test_a_finish_that_counts_other_tokens_is_an_error() -> None:
    call = _Call([client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT), _finish(5)])
    conn = _Conn([_delta([2, 3], "bc", done=True)], delay_s=0.0)
    with pytest.raises(InternalError, match="counts 5 output tokens but 2 arrived"):
        _run(call, conn)


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
    out = _run(call, conn, resumes)
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
        _run(call, _Conn([denied], delay_s=0.0))
    assert call.cancelled.is_set()  # the router's call is let go of too


def test_a_relayed_call_passes_through_unchanged() -> None:
    """A router without direct streams: its messages, as they are, and no worker connection."""
    msgs = [
        client_pb2.GenerateResponse(request_id="mine", token_ids=[1], text="a"),
        client_pb2.GenerateResponse(request_id="mine", token_ids=[2, 3], text="bc"),
        _finish(3),
    ]
    conn = _Conn([], delay_s=0.0)
    assert _run(_Call(list(msgs)), conn) == msgs
    assert conn.attached == []


def test_cancelling_a_redirected_call_ends_it_with_the_calls_error() -> None:
    call = _Call([client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT), 30.0, _finish(1)])
    conn = _Conn([_delta([2], "b")], delay_s=0.0)
    it = direct_messages_sync(call, _Mux(conn), lambda r: None)
    assert list(next(it).token_ids) == [2]
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        next(it)
    assert e.value.code() is grpc.StatusCode.CANCELLED
    assert conn.detached == [(RID, True)]  # the worker aborts the request


def test_the_workers_last_tokens_go_out_with_a_later_finish() -> None:
    """The worker's last delta before the router's finish: one message carries both (as the
    relay's last message does), so a caller sees the stop token in the finish's chunk."""
    first = client_pb2.GenerateResponse(request_id="mine", token_ids=[1], text="a")
    redirect = client_pb2.GenerateResponse(request_id="mine", direct=REDIRECT)
    call = _Call([first, redirect, 0.3, _finish(3)])
    conn = _Conn([_delta([2], "b"), _delta([3], "", done=True)], delay_s=0.01)
    out = _run(call, conn)
    assert [list(m.token_ids) for m in out] == [[1], [2], [3]]
    assert out[-1].HasField("finish") and out[-1].finish.usage.completion_tokens == 3


def test_a_relayed_group_passes_every_choice_through() -> None:
    """An ``n`` > 1 request is relayed (no redirect): every choice's finish is passed on; only the
    call's end ends the sequence."""
    msgs = [
        client_pb2.GenerateResponse(request_id="mine", token_ids=[i], text="x", choice_index=i)
        for i in range(3)
    ]
    for i in range(3):
        fin = _finish(1)
        fin.choice_index = i
        msgs.append(fin)
    conn = _Conn([], delay_s=0.0)
    assert _run(_Call(list(msgs)), conn) == msgs
    assert conn.attached == []
