"""A request whose finish the router has written counts as served (outcome ok) even when its call
is cancelled before the status: the SDK's direct streams end their router call as soon as they
hold the finish and the worker's last delta, while the router may still be closing the request's
legs. In process: the Generate wrapper (router.service) over a fake request pipeline."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from pdserve.v1 import client_pb2, common_pb2
from router.service import GenerateServicer
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


async def _cancel_after(svc: GenerateServicer, req, ctx: _Client, ready: asyncio.Event) -> None:
    task = asyncio.ensure_future(svc.Generate(req, ctx))  # type: ignore[arg-type]
    await asyncio.wait_for(ready.wait(), 5)
    await asyncio.sleep(0.01)  # the pipeline is now closing its legs (or waiting for the next token)
    task.cancel()  # the client lets go of the call
    with pytest.raises(asyncio.CancelledError):
        await task


def _request(n: int = 0) -> client_pb2.GenerateRequest:
    req = client_pb2.GenerateRequest(request_id="r-1", prompt_token_ids=client_pb2.TokenIds(ids=[1, 2]))
    req.sampling.n = n
    return req


def test_cancelled_after_the_finish_was_written_counts_as_served() -> None:
    async def finished_then_closing(req, ctx, lease_ttl_s=0.0):
        yield client_pb2.GenerateResponse(token_ids=[5])
        yield _finish(2)
        await asyncio.Event().wait()  # closing the legs when the client's cancel arrives

    svc, reg = _servicer(finished_then_closing)

    async def main() -> None:
        ctx = _Client()
        await _cancel_after(svc, _request(), ctx, ctx.finishes)

    asyncio.run(main())
    assert _outcomes(reg) == {"ok": 1.0}
    assert reg.get_sample_value("pdserve_router_generation_tokens_total", {}) == 2
    assert reg.get_sample_value("pdserve_router_inflight_requests", {}) == 0


def test_cancelled_before_the_finish_counts_as_cancelled() -> None:
    async def streaming(req, ctx, lease_ttl_s=0.0):
        yield client_pb2.GenerateResponse(token_ids=[5])
        await asyncio.Event().wait()  # the next token never comes before the cancel

    svc, reg = _servicer(streaming)

    async def main() -> None:
        ctx = _Client()
        await _cancel_after(svc, _request(), ctx, ctx.first)

    asyncio.run(main())
    assert _outcomes(reg) == {"cancelled": 1.0}


def test_a_group_with_a_choice_not_finished_counts_as_cancelled() -> None:
    async def one_of_two_choices(req, ctx, lease_ttl_s=0.0):
        yield _finish(2)  # choice 0 ended; choice 1 still runs when the client lets go
        await asyncio.Event().wait()

    svc, reg = _servicer(one_of_two_choices)

    async def main() -> None:
        ctx = _Client()
        await _cancel_after(svc, _request(n=2), ctx, ctx.finishes)

    asyncio.run(main())
    assert _outcomes(reg) == {"cancelled": 1.0}
