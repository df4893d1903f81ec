"""Router flow control (router.service, grpc.aio): a client that does not read is paused and,
past ``RouterConfig.stall_timeout_s``, cancelled with RESOURCE_EXHAUSTED naming the stall; the
request is closed downstream. In process: the Generate wrapper over a fake request pipeline."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from pdserve.auth import EdgeAuth
from pdserve.errors import ResourceExhaustedError
from pdserve.metrics import RouterMetrics
from pdserve.v1 import client_pb2
from router.service import GenerateServicer, RouterConfig


class _StuckClient:
    """A client whose window is full after ``room`` responses: later writes never complete."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.written: list[client_pb2.GenerateResponse] = []

    def time_remaining(self) -> None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()

    async def write(self, msg: client_pb2.GenerateResponse) -> None:
        if len(self.written) >= self.room:
            await asyncio.Event().wait()  # never: the client does not read
        self.written.append(msg)


def test_a_client_that_stops_reading_is_cancelled_after_the_stall_timeout() -> None:
    closed: list[bool] = []
    reg = CollectorRegistry()

    async def endless(req, ctx, lease_ttl_s=0.0):
        try:
            while True:
                yield client_pb2.GenerateResponse(request_id=req.request_id, token_ids=[5])
        finally:
            closed.append(True)  # the pipeline (downstream calls) is closed

    svc = GenerateServicer.__new__(GenerateServicer)  # only the Generate wrapper is exercised
    svc.metrics = RouterMetrics(reg)
    svc.config = SimpleNamespace(stall_timeout_s=0.2, model_id="m")  # type: ignore[assignment]
    svc.edge = EdgeAuth(None)  # dev mode: no API keys
    svc._generate = endless  # type: ignore[method-assign]
    ctx = _StuckClient(room=3)
    with pytest.raises(ResourceExhaustedError, match="did not read its stream for 0.2s"):
        req = client_pb2.GenerateRequest(
            request_id="slow-1", prompt_token_ids=client_pb2.TokenIds(ids=[1, 2])
        )
        asyncio.run(svc.Generate(req, ctx))  # type: ignore[arg-type]
    assert len(ctx.written) == 3 and closed == [True]
    assert reg.get_sample_value("pdserve_router_inflight_requests", {}) == 0
    outcome = {"slo_class": "default", "outcome": "rejected"}
    assert reg.get_sample_value("pdserve_router_requests_total", outcome) == 1


def test_stall_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="stall_timeout_s"):
        RouterConfig(model_path="m", model_id="m", stall_timeout_s=0)
