"""The OpenAI HTTP server's transport on uvicorn, against a scripted asyncio router client (no
cluster): bounded bodies and headers (413 / 431, and 400 for a header block still incomplete past the
limit; the server lives on), chunked bodies 411,
a client that disconnects cancels its generation (streamed or whole), ``close()`` cancels
requests still running after the grace period, 200 streams in flight at once on a bounded number
of threads, and several router addresses in the configuration and on the command line."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from typing import Any

import pytest

from bench.openai_http import http_stream
from pdserve.client import Chunk, Finish, ServingStatus
from pdserve.errors import InvalidRequestError
from pdserve.openai_api.server import OpenAIServer, ServerConfig, parse_routers

MAX_BODY = 4096
MAX_HEADER = 8192


def _finish_chunk(text: str) -> Chunk:
    phases = {"queue": 0.0, "prefill": 0.0, "transfer": 0.0, "decode": 0.0}
    return Chunk("rid", [7], text, [], Finish("length", "", 3, 1, 0, 0.01, 0.02, [0.01], phases))


class _Router:
    """A scripted router client. ``mode``: "ok" answers one chunk; "hang" waits forever (until
    cancelled); "gate" waits until ``gate_n`` generations are in flight at once, then answers."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.gate_n = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.started = threading.Event()
        self.cancelled = threading.Event()  # a generation was cancelled or closed before its end
        self._gate: asyncio.Event | None = None

    async def health(self) -> ServingStatus:
        return ServingStatus.SERVING

    async def list_models(self) -> list[str]:
        return ["m"]

    async def close(self) -> None:
        pass

    async def generate(self, prompt: Any, params: Any = None, *, timeout: Any = None, **kw: Any):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.started.set()
        finished = False
        try:
            if self.mode == "hang":
                await asyncio.Event().wait()
            if self.mode == "gate":
                if self._gate is None:
                    self._gate = asyncio.Event()
                if self.in_flight >= self.gate_n:
                    self._gate.set()
                await self._gate.wait()
            yield _finish_chunk("ok")
            finished = True
        finally:
            self.in_flight -= 1
            if not finished:
                self.cancelled.set()


@pytest.fixture(scope="module")
def router() -> _Router:
    return _Router()


@pytest.fixture(scope="module")
def server(router):
    cfg = ServerConfig(router="127.0.0.1:1", port=0, max_body_bytes=MAX_BODY, max_header_bytes=MAX_HEADER)
    srv = OpenAIServer(cfg, router).start()  # type: ignore[arg-type]
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _reset(router):
    router.mode, router.gate_n, router._gate = "ok", 0, None
    router.started.clear()
    router.cancelled.clear()


def _raw(srv: OpenAIServer, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _split(resp: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _alive(srv: OpenAIServer) -> None:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        conn.request("GET", "/v1/models")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == "m"
    finally:
        conn.close()


def _post_head(path: str, n: int, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {n}\r\n{extra}\r\n"
    ).encode()


def test_oversize_body_is_413_and_the_connection_closes(server):
    body = b" " * (MAX_BODY + 1)
    status, headers, raw = _split(_raw(server, _post_head("/v1/completions", len(body)) + body))
    assert status == 413 and headers["connection"] == "close"
    err = json.loads(raw)["error"]
    assert err["code"] == "request_too_large" and f"limit is {MAX_BODY}" in err["message"]
    _alive(server)


def test_oversize_headers_are_431_without_crashing(server):
    # one huge header, and many small ones adding up past the limit, each block sent whole
    for extra in (
        f"X-Big: {'a' * (MAX_HEADER + 10)}\r\n",
        "".join(f"X-H{i}: {'b' * 90}\r\n" for i in range(99)),
    ):
        status, headers, raw = _split(
            _raw(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + extra.encode() + b"\r\n")
        )
        assert status == 431 and headers["connection"] == "close"
        err = json.loads(raw)["error"]
        assert err["code"] == "request_header_fields_too_large" and f"limit is {MAX_HEADER}" in err["message"]
    extra = "".join(f"X-{i}: v\r\n" for i in range(120)).encode()
    status, _, raw = _split(_raw(server, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"))
    assert (
        status == 431 and "121 header fields; the limit is 100"
    )  # with Host in json.loads(raw)["error"]["message"]
    _alive(server)


def test_a_header_block_growing_past_the_limit_is_400_before_it_ends(server):
    """A header block that keeps coming (never finished) is cut off at the limit: memory bounded."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (MAX_HEADER // 2))
        time.sleep(0.3)  # let the server see the first part alone (still under the limit)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed while sending
            s.sendall(b"a" * MAX_HEADER)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    status, headers, raw = _split(out)
    assert status == 400 and headers["connection"] == "close"
    assert f"exceed {MAX_HEADER} bytes" in json.loads(raw)["error"]["message"]
    _alive(server)


def test_chunked_body_is_411(server):
    data = b'{"prompt": "x"}'
    req = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    )
    status, _, raw = _split(_raw(server, req))
    assert status == 411 and json.loads(raw)["error"]["code"] == "length_required"


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(server, router, stream):
    router.mode = "hang"
    body = json.dumps({"prompt": "x", "stream": stream}).encode()
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(_post_head("/v1/completions", len(body)) + body)
        assert router.started.wait(10)
    # the server notices the closed connection and cancels the hanging generation
    assert router.cancelled.wait(10), "generation not cancelled after the client left"
    _alive(server)


def test_close_cancels_requests_still_running(router):
    router.mode = "hang"
    srv = OpenAIServer(ServerConfig(router="127.0.0.1:1", port=0, shutdown_grace_s=1), router).start()  # type: ignore[arg-type]
    body = json.dumps({"prompt": "x", "stream": True}).encode()
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        s.sendall(_post_head("/v1/completions", len(body)) + body)
        assert router.started.wait(10)
        srv.close()
        assert router.cancelled.is_set()
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    status, headers, raw = _split(out)  # the request is answered, not dropped
    assert status == 503 and "shutting down" in json.loads(raw)["error"]["message"]
    assert not any(t.name == f"openai-http-{srv.port}" and t.is_alive() for t in threading.enumerate())


def test_200_streams_in_flight_at_once_on_bounded_threads(server, router):
    """Every request is held until all 200 are in flight together: a server that served them in a
    bounded thread pool would deadlock; one thread per connection would show in the count."""
    n = 200
    router.mode, router.gate_n = "gate", n

    async def wave() -> tuple[list[Any], int]:
        most = threading.active_count()
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal most
            while not done.is_set():
                most = max(most, threading.active_count())
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        outs = await asyncio.gather(
            *(
                http_stream(
                    server.host, server.port, "/v1/completions", {"prompt": "x", "stream": True}, timeout_s=60
                )
                for _ in range(n)
            )
        )
        done.set()
        await sampler
        return outs, most

    before = threading.active_count()
    outs, most = asyncio.run(wave())
    assert router.most_in_flight == n
    assert all(o.ok for o in outs), next(o for o in outs if not o.ok)
    assert most - before < 10, f"{most} threads while {n} streams were open (before: {before})"


def test_several_routers():
    assert ServerConfig(router="a:1, b:2").routers == ("a:1", "b:2")
    assert ServerConfig(router=("a:1", "b:2")).routers == ("a:1", "b:2")
    assert parse_routers("a:1") == ("a:1",)
    for bad in ("", "a:1,,b:2", "a:1,", ()):
        with pytest.raises(InvalidRequestError, match="HOST:PORT"):
            parse_routers(bad)
    from pdserve.openai_api.cli import build_parser

    a = build_parser().parse_args(["--router", "127.0.0.1:1,127.0.0.1:2"])
    assert ServerConfig(router=a.router).routers == ("127.0.0.1:1", "127.0.0.1:2")


def test_a_started_server_listens_and_close_is_idempotent(router):
    srv = OpenAIServer(ServerConfig(router="127.0.0.1:1", port=0), router)  # type: ignore[arg-type]
    port = srv.port
    srv.start()
    _alive(srv)
    srv.close()
    srv.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    never_started = OpenAIServer(ServerConfig(router="127.0.0.1:1", port=0), router)  # type: ignore[arg-type]
    never_started.close()
    time.sleep(0)  # nothing left to collect: the pytest warning filter would flag a leaked socket
