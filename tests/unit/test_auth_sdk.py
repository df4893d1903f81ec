"""The SDK sends its API key (``Client(api_key=...)``) as ``authorization: Bearer`` metadata on
every call; a per-call ``metadata`` authorization (the HTTP front end forwarding its caller's)
replaces it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from pdserve.client import AsyncClient, Client
from pdserve.grpc_server import start_server
from pdserve.v1 import client_pb2, common_pb2

GENERATE = client_pb2.DESCRIPTOR.services_by_name["Generate"]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def _auth(self, ctx: grpc.ServicerContext) -> None:
        self.seen.append(dict(ctx.invocation_metadata()).get("authorization"))

    def Generate(self, req, ctx) -> Iterator[client_pb2.GenerateResponse]:
        self._auth(ctx)
        yield client_pb2.GenerateResponse(request_id="r", token_ids=[1], text="x", finish=common_pb2.Finish())

    def Tokenize(self, req, ctx) -> client_pb2.TokenizeResponse:
        self._auth(ctx)
        return client_pb2.TokenizeResponse(token_ids=[1])

    def ListModels(self, req, ctx) -> client_pb2.ListModelsResponse:
        self._auth(ctx)
        return client_pb2.ListModelsResponse(models=[client_pb2.ModelInfo(id="m")])


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()
    srv, port, _ = start_server([(GENERATE, rec)], "127.0.0.1", 0, name="fake-router")
    yield f"127.0.0.1:{port}", rec
    srv.stop(0)


def test_sync_client_sends_its_key(server) -> None:
    address, rec = server
    rec.seen.clear()
    with Client(address, api_key="pdsk_k", timeout=10) as c:
        c.complete("hi")
        c.tokenize("hi")
        c.list_models()
        list(c.generate("hi", metadata=(("authorization", "Bearer forwarded"),)))
    with Client(address, timeout=10) as c:
        c.complete("hi")
    assert rec.seen == ["Bearer pdsk_k"] * 3 + ["Bearer forwarded", None]


def test_async_client_sends_its_key(server) -> None:
    address, rec = server
    rec.seen.clear()

    async def go() -> None:
        async with AsyncClient(address, api_key="pdsk_a", timeout=10) as c:
            await c.complete("hi")

    asyncio.run(go())
    assert rec.seen == ["Bearer pdsk_a"]
