"""``pdserve.grpc_server.add_aio_servicer`` refuses method shapes a grpc.aio server cannot serve
safely, naming the method: a sync streaming method (its thread would block for good when the
server stopped mid-stream), an async bidirectional/client-streaming method that is not a
coroutine, a unary method written as an async generator. The shapes it accepts register."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pdserve.grpc_server import add_aio_servicer
from pdserve.v1 import worker_pb2

WORKER = worker_pb2.DESCRIPTOR.services_by_name["Worker"]


class _SyncServerStreaming:
    def Decode(self, req, ctx):
        yield worker_pb2.DecodeResponse()


class _SyncBidi:
    def MigrateIn(self, chunks, ctx):
        yield worker_pb2.MigrationAck()


class _AsyncGenBidi:
    async def MigrateIn(self, chunks, ctx):
        yield worker_pb2.MigrationAck()


class _AsyncGenUnary:
    async def Stats(self, req, ctx):
        yield worker_pb2.WorkerStats()


class _Fine:
    def Stats(self, req, ctx):  # sync unary: runs on the server's threads
        return worker_pb2.WorkerStats()

    async def Decode(self, req, ctx):
        yield worker_pb2.DecodeResponse()

    async def MigrateIn(self, chunks, ctx):
        async for _ in chunks:
            await ctx.write(worker_pb2.MigrationAck())


@pytest.mark.parametrize(
    "servicer, words",
    [
        (
            _SyncServerStreaming(),
            "pdserve.v1.Worker.Decode: a streaming method on a grpc.aio server must be async",
        ),
        (_SyncBidi(), "pdserve.v1.Worker.MigrateIn: a streaming method on a grpc.aio server must be async"),
        (_AsyncGenBidi(), "pdserve.v1.Worker.MigrateIn: async client-streaming methods are supported only"),
        (_AsyncGenUnary(), "pdserve.v1.Worker.Stats: a unary method cannot be an async generator"),
    ],
    ids=["sync-server-streaming", "sync-bidi", "async-gen-bidi", "async-gen-unary"],
)
def test_unsafe_shapes_are_refused_naming_the_method(servicer, words):
    async def add() -> None:  # a grpc.aio server is made on a running loop
        add_aio_servicer(grpc.aio.server(), WORKER, servicer)

    with pytest.raises(TypeError) as ei:
        asyncio.run(add())
    assert words in str(ei.value)


def test_safe_shapes_register():
    async def add() -> None:
        add_aio_servicer(grpc.aio.server(), WORKER, _Fine())

    asyncio.run(add())
