"""The sync SDK's Stream gives no chunk after ``cancel()``, even chunks that had already arrived
(a direct stream's worker deltas are buffered in the client, unlike a relayed call's, whose
iterator raises CANCELLED at once)."""

from __future__ import annotations

from types import SimpleNamespace

from pdserve.client import Stream
from pdserve.v1 import client_pb2


class _BufferedCall:
    """A call whose messages are all buffered already: cancel() does not stop its iterator."""

    def __init__(self, n: int) -> None:
        self.msgs = [
            client_pb2.GenerateResponse(request_id="r", token_ids=[i], text=str(i)) for i in range(n)
        ]
        self.cancelled = False

    def __iter__(self):
        return iter(self.msgs)

    def cancel(self) -> None:
        self.cancelled = True


def _stream(call: _BufferedCall) -> Stream:
    routers = SimpleNamespace(order=lambda: [0], addresses=["127.0.0.1:1"])
    return Stream(lambda idx: call, routers, replay_ok=True)  # type: ignore[arg-type]


def test_no_chunk_after_cancel() -> None:
    call = _BufferedCall(5)
    s = _stream(call)
    it = iter(s)
    first = next(it)
    assert first.token_ids == [0]
    s.cancel()
    assert call.cancelled
    assert list(it) == []


def test_uncancelled_stream_gives_every_chunk() -> None:
    call = _BufferedCall(4)
    assert [c.token_ids for c in _stream(call)] == [[0], [1], [2], [3]]
