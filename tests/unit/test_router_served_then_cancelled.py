"""A request whose finish the router has written counts as served (outcome ok) even when its call
is cancelled before the status: the SDK's direct streams end their router call as soon as they
hold the finish and the worker's last delta, while the router may still be closing the request's
legs. In process: the Generate wrapper (router.service) over a fake request pipeline."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from pdserve.v1 import client_pb2, common_pb2
from tests.unit.test_metrics_tracing import _GenCtx, _servicer


class _Client(_GenCtx):
    """A client that reads everything; ``first`` / ``finishes``: set once a message / a finish
    was written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.finishes = asyncio.Event()
        self.first = asyncio.Event()

    async def write(self, msg: client_pb2.GenerateResponse) -> None:
        await super().write(msg)
        self.first.set()
        if msg.HasField("finish"):
            self.finishes.set()


def _finish(tokens: int) -> client_pb2.GenerateResponse:
    f = common_pb2.Finish(
        reason=common_pb2.FINISH_REASON_LENGTH,
        usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=tokens, total_tokens=2 + tokens),
        timing=common_pb2.Timing(ttft_s=0.01, e2e_s=0.05, token_times_s=[0.01, 0.03]),
    )
    return client_pb2.GenerateResponse(token_ids=[6], finish=f)


def _outcomes(reg: CollectorRegistry) -> dict[str, float]:
    out = {}
    for o in ("ok", "cancelled", "timeout", "error"):
        v = reg.get_sample_value("pdserve_router_requests_total", {"slo_class": "default", "outcome": o})
        if v:
            out[o] = v
    return out


def _cancel_after(pipeline, req: client_pb2.GenerateRequest, after: str) -> CollectorRegistry:
    """Run Generate over ``pipeline``, cancel the call once the client was written its first
    message (``after="first"``) or a finish (``"finishes"``), as a client letting go; the
    router's metrics registry."""
    svc, reg = _servicer(pipeline)

    async def main() -> None:
        ctx = _Client()
        task = asyncio.ensure_future(svc.Generate(req, ctx))  # type: ignore[arg-type]
        await asyncio.wait_for(getattr(ctx, after).wait(), 5)
        await asyncio.sleep(0.01)  # the pipeline is now closing its legs (or waiting for a token)
        task.cancel()  # the client lets go of the call
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return reg


def _request(n: int = 0) -> client_pb2.GenerateRequest:
    req = client_pb2.GenerateRequest(request_id="r-1", prompt_token_ids=client_pb2.TokenIds(ids=[1, 2]))
    req.sampling.n = n
    return req


def test_cancelled_after_the_finish_was_written_counts_as_served() -> None:
    async def finished_then_closing(req, ctx, lease_ttl_s=0.0):
        yield client_pb2.GenerateResponse(token_ids=[5])
        yield _finish(2)
        await asyncio.Event().wait()  # closing the legs when the client's cancel arrives

    reg = _cancel_after(finished_then_closing, _request(), "finishes")
    assert _outcomes(reg) == {"ok": 1.0}
    assert reg.get_sample_value("pdserve_router_generation_tokens_total", {}) == 2
    assert reg.get_sample_value("pdserve_router_inflight_requests", {}) == 0


def test_cancelled_before_the_finish_counts_as_cancelled() -> None:
    async def streaming(req, ctx, lease_ttl_s=0.0):
        yield client_pb2.GenerateResponse(token_ids=[5])
        await asyncio.Event().wait()  # the next token never comes before the cancel

    reg = _cancel_after(streaming, _request(), "first")
    assert _outcomes(reg) == {"cancelled": 1.0}


def test_a_group_with_a_choice_not_finished_counts_as_cancelled() -> None:
    async def one_of_two_choices(req, ctx, lease_ttl_s=0.0):
        yield _finish(2)  # choice 0 ended; choice 1 still runs when the client lets go
        await asyncio.Event().wait()

    reg = _cancel_after(one_of_two_choices, _request(n=2), "finishes")
    assert _outcomes(reg) == {"cancelled": 1.0}
