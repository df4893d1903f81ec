"""The router closes the async generators of a request's legs itself (#12): a decode stream read
up to its finish (direct or relayed) leaves no async generator for the event loop's finalizer
hook, which would close each one later with a thread-safe wake-up of the loop and a task (four
per direct request, two per relayed one before). Outputs are unchanged (the direct bench checks
every response; the relayed request is the reference's)."""

from __future__ import annotations

import asyncio
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _finalized(run) -> list[str]:
    """The qualified names of the async generators the loop's finalizer hook got during ``run()``."""
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def hook(agen) -> None:
            seen.append(agen.__qualname__)
            loop._asyncgen_finalizer_hook(agen)  # type: ignore[attr-defined]

        sys.set_asyncgen_hooks(firstiter=loop._asyncgen_firstiter_hook, finalizer=hook)  # type: ignore[attr-defined]
        await run()
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(main())
    return seen


def test_direct_requests_leave_no_async_generator_to_the_loop(tmp_path) -> None:
    from bench.cluster_load import tiny_model
    from bench.router_python import drive, make_servicer

    svc = make_servicer(str(tiny_model(tmp_path)))
    assert _finalized(lambda: drive(svc, 12, 4, 8)) == []
    assert svc._drivers == {}


def test_relayed_requests_leave_no_async_generator_to_the_loop(smollm_path) -> None:
    from tests.unit.test_router_redispatch import PROMPT, FakeContext, _cluster, _request, reference

    svc, _, store, _ = _cluster(str(smollm_path), {"p0": None}, {"d0": None})
    outs: list[list[int]] = []

    async def run() -> None:
        for i in range(4):
            req = _request()
            req.request_id = f"relayed-{i}"
            ctx = FakeContext()
            await svc.Generate(req, ctx)
            outs.append([t for r in ctx.written for t in r.token_ids])

    assert _finalized(run) == []
    assert outs == [reference(PROMPT, 12)] * 4
    assert store.leases == set() and svc.registry.get("d0").inflight == 0
