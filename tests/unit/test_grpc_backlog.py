"""A grpc.aio server built with :func:`pdserve.limits.grpc_options` takes a burst of calls well above
gRPC's default pending-call backlog (1,000 soft / 3,000 hard), which cancelled ~2/3 of 10,000
streams opened at once against the router (#12)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from pdserve.limits import grpc_options
from pdserve.v1 import client_pb2, client_pb2_grpc

BURST = 3500  # above gRPC's hard default of 3,000 calls not yet taken by the server's code


class _AllArrive(client_pb2_grpc.GenerateServicer):
    """Answers once every call of the burst has reached the handler (or after ``wait_s``)."""

    def __init__(self, n: int, wait_s: float) -> None:
        self.n, self.wait_s = n, wait_s
        self.arrived = 0
        self.all = asyncio.Event()

    async def Generate(self, req, ctx):
        self.arrived += 1
        if self.arrived == self.n:
            self.all.set()
        with contextlib.suppress(TimeoutError):  # some never came: answer those that did
            await asyncio.wait_for(self.all.wait(), self.wait_s)
        yield client_pb2.GenerateResponse(token_ids=[1])


async def _burst(options: list) -> tuple[int, dict[str, int]]:
    svc = _AllArrive(BURST, wait_s=60.0)
    server = grpc.aio.server(options=options)
    client_pb2_grpc.add_GenerateServicer_to_server(svc, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    failed: dict[str, int] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options()) as ch:
            stub = client_pb2_grpc.GenerateStub(ch)

            async def one() -> None:
                try:
                    async for _ in stub.Generate(client_pb2.GenerateRequest(), timeout=120):
                        pass
                except grpc.aio.AioRpcError as e:
                    failed[e.code().name] = failed.get(e.code().name, 0) + 1

            await asyncio.gather(*(one() for _ in range(BURST)))
    finally:
        await server.stop(0)
    return svc.arrived, failed


def test_a_burst_above_grpcs_default_backlog_is_served_whole() -> None:
    arrived, failed = asyncio.run(_burst(grpc_options()))
    assert failed == {} and arrived == BURST
