"""The SDK fails over between routers (``Client("a:1,b:2")``), against in-process fake routers.

A fake router streams tokens 100, 101, ... with text ``"t<id> "``, ``per_chunk`` tokens a message;
``die_after`` tokens into a stream it ends the call with UNAVAILABLE, as a router that went away
does. A port nothing listens on stands for a dead router (connection refused)."""

from __future__ import annotations

import asyncio
import socket
import threading

import grpc
import pytest

from pdserve.client import AsyncClient, Chunk, Client, Resume, ServingStatus
from pdserve.errors import InvalidRequestError, StoreUnavailableError, UnavailableError
from pdserve.grpc_server import start_server
from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2

GENERATE = client_pb2.DESCRIPTOR.services_by_name["Generate"]


class FakeRouter(client_pb2_grpc.GenerateServicer):
    def __init__(self, per_chunk: int = 1, die_after: int | None = None, refuse: bool = False) -> None:
        self.per_chunk = per_chunk
        self.die_after = die_after  # tokens sent before the stream fails UNAVAILABLE (once)
        self.refuse = refuse  # answer INVALID_ARGUMENT (a real error of the request, not failover)
        self.requests: list[client_pb2.GenerateRequest] = []
        self.lock = threading.Lock()

    def Generate(self, req, ctx):
        with self.lock:
            self.requests.append(req)
            die, self.die_after = self.die_after, None
        if self.refuse:
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens too large")
        ids = list(range(100, 100 + req.sampling.max_tokens))
        rid = req.request_id or f"cluster-{id(self)}-{len(self.requests)}"
        sent = 0
        for i in range(0, len(ids), self.per_chunk):
            if die is not None and sent >= die:
                ctx.abort(grpc.StatusCode.UNAVAILABLE, "router going away")
            part = ids[i : i + self.per_chunk]
            sent += len(part)
            yield client_pb2.GenerateResponse(
                request_id=rid, token_ids=part, text="".join(f"t{t} " for t in part)
            )
        yield client_pb2.GenerateResponse(
            request_id=rid,
            finish=common_pb2.Finish(usage=common_pb2.Usage(completion_tokens=len(ids))),
        )

    def Tokenize(self, req, ctx):
        return client_pb2.TokenizeResponse(token_ids=[len(req.prompt)])

    def calls(self) -> int:
        with self.lock:
            return len(self.requests)


@pytest.fixture
def routers():
    """start(fake) -> its address; every server stopped at the end."""
    servers: list[grpc.Server] = []

    def start(fake: FakeRouter) -> str:
        server, port, _ = start_server([(GENERATE, fake)], "127.0.0.1", 0, name="fake-router")
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed when returned: connection refused


def _expected(n: int) -> tuple[list[int], str]:
    ids = list(range(100, 100 + n))
    return ids, "".join(f"t{t} " for t in ids)


def _collect(chunks: list[Chunk]) -> tuple[list[int], str, list[str]]:
    ids = [t for c in chunks for t in c.token_ids]
    return ids, "".join(c.text for c in chunks), [c.request_id for c in chunks]


def test_dead_first_router_request_served_by_the_next(routers) -> None:
    b = FakeRouter()
    with Client([_dead_address(), routers(b)], timeout=10) as c:
        for _ in range(3):  # round-robin starts at each router in turn: the dead one is skipped
            done = c.complete("hi", max_tokens=4, temperature=0.7)  # unseeded: nothing delivered yet
            assert (done.token_ids, done.text) == _expected(4)
    assert b.calls() == 3


def test_requests_start_at_the_routers_in_turn(routers) -> None:
    a, b = FakeRouter(), FakeRouter()
    with Client(f"{routers(a)},{routers(b)}", timeout=10) as c:
        for _ in range(4):
            c.complete("hi", max_tokens=2, temperature=0.0)
    assert (a.calls(), b.calls()) == (2, 2)


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "seed": 7}])
def test_cut_off_stream_resumes_on_next_router_without_duplicates(routers, sampling) -> None:
    a, b = FakeRouter(per_chunk=1, die_after=3), FakeRouter(per_chunk=2)  # B's chunks straddle 3
    with Client([routers(a), routers(b)], timeout=10) as c:
        chunks = list(c.generate("hi", max_tokens=7, request_id="req-1", **sampling))
    ids, text, rids = _collect(chunks)
    assert (ids, text) == _expected(7)  # each token once, in order
    assert set(rids) == {"req-1"}
    assert chunks[-1].finish is not None and chunks[-1].finish.completion_tokens == 7
    assert [r.request_id for r in b.requests] == ["req-1"]  # same request id on the next router
    assert b.requests[0].sampling == a.requests[0].sampling


def test_resume_keeps_the_first_request_id_the_caller_saw(routers) -> None:
    a, b = FakeRouter(die_after=2), FakeRouter()
    with Client([routers(a), routers(b)], timeout=10) as c:
        chunks = list(c.generate("hi", max_tokens=4, temperature=0.0))
    ids, _, rids = _collect(chunks)
    assert ids == _expected(4)[0]
    assert len(set(rids)) == 1 and rids[0].startswith(f"cluster-{id(a)}")


def test_unseeded_stream_cut_off_after_tokens_fails_naming_the_router(routers) -> None:
    a, b = FakeRouter(die_after=2), FakeRouter()
    addr_a = routers(a)
    got: list[int] = []
    with Client([addr_a, routers(b)], timeout=10) as c, pytest.raises(UnavailableError) as ei:
        for ch in c.generate("hi", max_tokens=6, temperature=0.8):
            got += ch.token_ids
    assert got == [100, 101]
    assert addr_a in str(ei.value) and "cannot be resumed" in str(ei.value)
    assert b.calls() == 0


def test_an_error_of_the_request_is_not_retried_elsewhere(routers) -> None:
    a, b = FakeRouter(refuse=True), FakeRouter()
    with Client([routers(a), routers(b)], timeout=10) as c, pytest.raises(InvalidRequestError):
        c.complete("hi", max_tokens=2, temperature=0.0)
    assert b.calls() == 0


class FinishThenGoneRouter(FakeRouter):
    """Delivers the whole generation, finish included, then goes away before the call's status
    (a router killed right after its last message)."""

    def Generate(self, req, ctx):
        yield from super().Generate(req, ctx)
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed")


def test_router_gone_after_the_finish_fails_nothing(routers) -> None:
    a, b = FinishThenGoneRouter(), FakeRouter()
    with Client([routers(a), routers(b)], timeout=10) as c:
        done = c.complete("hi", max_tokens=3, temperature=0.7)  # unseeded: not replayable
    assert (done.token_ids, done.text) == _expected(3) and done.finish.completion_tokens == 3
    assert b.calls() == 0  # not re-issued: it was complete

    async def run() -> list[int]:
        async with AsyncClient([routers(FinishThenGoneRouter()), routers(FakeRouter())], timeout=10) as ac:
            return [t async for ch in ac.generate("hi", max_tokens=3, temperature=0.7) for t in ch.token_ids]

    assert asyncio.run(run()) == _expected(3)[0]


class StoreDownRouter(client_pb2_grpc.GenerateServicer):
    """A router whose KV store is down: UNAVAILABLE with the StoreUnavailableError class named."""

    def Generate(self, req, ctx):
        ctx.set_trailing_metadata((("pdserve-error", "StoreUnavailableError"),))
        ctx.abort(grpc.StatusCode.UNAVAILABLE, "KV store 127.0.0.1:1 is unavailable")
        yield  # pragma: no cover - a generator: the call is server-streaming


def test_store_down_behind_every_router_stays_a_store_error(routers) -> None:
    a, b = routers(StoreDownRouter()), routers(StoreDownRouter())
    with Client([a, b], timeout=10) as c, pytest.raises(StoreUnavailableError) as ei:
        c.complete("hi", max_tokens=2, temperature=0.0)
    msg = str(ei.value)
    assert "KV store 127.0.0.1:1" in msg and a in msg and b in msg, msg


def test_every_router_down_names_them_all() -> None:
    d1, d2 = _dead_address(), _dead_address()
    with Client([d1, d2], timeout=10) as c:
        with pytest.raises(UnavailableError) as ei:
            c.complete("hi", max_tokens=2, temperature=0.0)
        assert d1 in str(ei.value) and d2 in str(ei.value)
        with pytest.raises(UnavailableError, match="no router reachable"):
            c.health()
        with pytest.raises(UnavailableError, match="no router reachable"):
            c.tokenize("abc")


def test_health_and_unary_calls_try_each_router(routers) -> None:
    with Client([_dead_address(), routers(FakeRouter())], timeout=10) as c:
        assert c.health() is ServingStatus.SERVING
        assert c.tokenize("abcd") == [4]


def test_async_client_fails_over_and_resumes(routers) -> None:
    a, b = FakeRouter(die_after=3), FakeRouter(per_chunk=3)
    dead = _dead_address()
    addr_a, addr_b = routers(a), routers(b)

    async def run() -> None:
        async with AsyncClient([addr_a, dead, addr_b], timeout=10) as c:
            chunks = [ch async for ch in c.generate("hi", max_tokens=8, seed=3)]
            assert _collect(chunks)[:2] == _expected(8)
            assert await c.health() is ServingStatus.SERVING
        got: list[int] = []
        a.die_after = 1
        async with AsyncClient([dead, addr_a, addr_b], timeout=10) as c:
            with pytest.raises(UnavailableError, match="cannot be resumed") as ei:
                # starts at the dead router, then a, which dies after 1 token of an unseeded stream
                async for ch in c.generate("hi", max_tokens=4, temperature=1.0):
                    got += ch.token_ids
        assert got == [100]
        assert addr_a in str(ei.value) and dead in str(ei.value)  # both routers tried are named

    asyncio.run(run())
    assert b.calls() == 1


def test_bad_target_is_refused_naming_it() -> None:
    with pytest.raises(InvalidRequestError, match="router address"):
        Client("127.0.0.1:1,,127.0.0.1:2")


def _chunk(ids: list[int], text: str, finish: bool = False) -> Chunk:
    from pdserve.client import Finish

    fin = Finish(None, "", 0, len(ids), 0, 0.0, 0.0, [], {}) if finish else None
    return Chunk("r", list(ids), text, [], fin)


def test_resume_trims_tokens_and_text_independently() -> None:
    r = Resume()
    # first stream: text lags tokens (a multi-byte character held back), then the router dies
    assert r.trim(_chunk([1, 2], "ab")) is not None
    assert r.trim(_chunk([3], "")) is not None
    assert (r.tokens, r.chars) == (3, 2)
    r.restart()  # the second stream repeats the first: same tokens, same text, other chunking
    assert r.trim(_chunk([1], "a")) is None
    c = r.trim(_chunk([2, 3, 4], "bcd"))
    assert c is not None and (c.token_ids, c.text) == ([4], "cd")
    c = r.trim(_chunk([], "", finish=True))
    assert c is not None and c.finish is not None and r.finished
