"""The rebalancer's pure decision (router.rebalancer.plan over router.policy.migration), its pass
over a servicer with the fake workers of test_router_redispatch (loads from the registry and the
running requests, moves started through GenerateServicer.migrate, never one request twice at
once, bounded), and a migration drain (router.drain) that empties a decode worker while the
stream continues, with the fake MigrateOut / ResumeStream of test_router_migrator."""

from __future__ import annotations

import asyncio

import pytest

from router.drain import drain_decode_worker
from router.lifecycle.grpc_migrator import GrpcLegsMigrator
from router.migration_client import MigrationResult
from router.policy.migration import (
    DecodeLoad,
    MigrationConfig,
    MigrationReason,
    RunningRequest,
)
from router.rebalancer import RebalanceConfig, Rebalancer, decode_loads, plan
from router.registry import WorkerLoad
from tests.unit.test_router_migrator import FakeRpcs, N, _SourceStream
from tests.unit.test_router_redispatch import PROMPT, FakeContext, _cluster, _request, reference


def _load(wid: str, total: int, free: int, reqs: tuple[tuple[str, int, int], ...] = ()) -> DecodeLoad:
    return DecodeLoad(wid, total, free, tuple(RunningRequest(r, b, p) for r, b, p in reqs))


def test_plan_balances_past_the_gap_skips_busy_requests_and_respects_slots() -> None:
    cfg = MigrationConfig(balance_threshold=4.0, max_decisions=4)
    hot = _load("a", 100, 10, (("r1", 30, 0), ("r2", 20, 0), ("r3", 40, 0)))
    cold = _load("b", 100, 100)
    (d,) = plan([hot, cold], cfg, busy=(), slots=1)
    assert (d.request_id, d.source, d.destination, d.reason) == ("r2", "a", "b", MigrationReason.LOAD_BALANCE)
    # r2 is being moved already: the next cheapest goes, never r2 a second time
    ds = plan([hot, cold], cfg, busy={"r2"}, slots=4)
    assert ds and all(x.request_id != "r2" for x in ds) and len({x.request_id for x in ds}) == len(ds)
    assert plan([hot, cold], cfg, busy=(), slots=0) == []
    # below the gap: nothing moves
    assert plan([_load("a", 100, 50, (("r", 10, 0),)), _load("b", 100, 52)], cfg, (), 2) == []


def test_plan_keeps_priority_headroom_first() -> None:
    cfg = MigrationConfig(balance_threshold=1e9, high_priority=0, priority_headroom_blocks=30)
    a = _load("a", 100, 10, (("vip", 40, 0), ("low", 20, 5)))
    b = _load("b", 100, 90)
    (d,) = plan([a, b], cfg, busy=(), slots=2)
    assert (d.request_id, d.destination, d.reason) == ("low", "b", MigrationReason.PRIORITY)


def test_rebalance_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        RebalanceConfig(interval_s=-1)
    with pytest.raises(ValueError, match="max_concurrent"):
        RebalanceConfig(max_concurrent=0)


@pytest.fixture(scope="module")
def model_path(smollm_path):
    return str(smollm_path)


def _svc(model_path: str):
    svc, w, store, reg = _cluster(model_path, {"p0": None}, {"d0": None, "d1": None})
    state: dict = {"store": store}
    w["d0"].Decode = lambda req, timeout=None, metadata=None: _SourceStream(req, state)  # type: ignore[method-assign]
    rpcs = FakeRpcs(w, state, MigrationResult.MIGRATED)
    svc.migrator = lambda legs: GrpcLegsMigrator(legs, rpcs, svc.migrations)
    # placement picks d0 (d1 looks busy); :func:`_skew` then makes d0 full and d1 empty
    svc.registry.get("d0").load = WorkerLoad(0, 0, 100, 0, block_size=16)
    svc.registry.get("d1").load = WorkerLoad(5, 0, 100, 0, block_size=16)
    return svc, w, store, reg, rpcs


def _skew(svc) -> None:
    """d0 full, d1 empty, as their heartbeats would say."""
    svc.registry.get("d0").load = WorkerLoad(1, 0, 100, 95, block_size=16)
    svc.registry.get("d1").load = WorkerLoad(0, 0, 100, 0, block_size=16)


class _Ctx(FakeContext):
    """Runs ``action(svc)`` once, when the client got ``at`` responses."""

    def __init__(self, svc, at: int, action) -> None:
        super().__init__()
        self.svc, self.at, self.action, self.result = svc, at, action, None

    async def write(self, msg) -> None:
        await super().write(msg)
        if len(self.written) == self.at:
            self.result = await self.action(self.svc)


def _generate(svc, ctx) -> list[int]:
    async def go():
        req = _request(N)
        req.priority = 3
        await svc.Generate(req, ctx)

    asyncio.run(go())
    return [t for r in ctx.written for t in r.token_ids]


def test_a_rebalancing_pass_moves_a_request_off_the_full_worker_once(model_path) -> None:
    svc, w, store, reg, rpcs = _svc(model_path)

    async def tick(svc):
        _skew(svc)
        (rid,) = svc._drivers
        (load_d0,) = [x for x in decode_loads(svc) if x.instance_id == "d0"]
        assert [(r.request_id, r.priority) for r in load_d0.running] == [(rid, 3)]
        assert load_d0.running[0].num_blocks == -(-(len(PROMPT) + 3) // 16)
        rb = Rebalancer(svc, RebalanceConfig(interval_s=1.0, max_concurrent=1))
        first = rb.tick()
        second = rb.tick()  # the same request is being moved: nothing more
        return first, second

    ctx = _Ctx(svc, 3, tick)
    ids = _generate(svc, ctx)
    first, second = ctx.result
    assert [(d.source, d.destination, d.reason) for d in first] == [
        ("d0", "d1", MigrationReason.LOAD_BALANCE)
    ]
    assert second == []
    assert ids == reference(PROMPT, N) and len(w["d1"].calls) == 1
    assert (
        reg.get_sample_value(
            "pdserve_router_migrations_total", {"reason": "load_balance", "result": "migrated"}
        )
        == 1
    )
    assert store.leases == set() and svc.registry.get("d0").inflight == svc.registry.get("d1").inflight == 0


def test_drain_moves_the_running_request_off_and_the_stream_continues(model_path) -> None:
    svc, w, store, reg, rpcs = _svc(model_path)

    async def start_drain(svc):
        _skew(svc)
        return asyncio.ensure_future(drain_decode_worker(svc, "d0", timeout_s=30, poll_s=0.001))

    ctx = _Ctx(svc, 3, start_drain)

    async def go():
        req = _request(N)
        await svc.Generate(req, ctx)
        return await ctx.result

    report = asyncio.run(go())
    ids = [t for r in ctx.written for t in r.token_ids]
    assert ids == reference(PROMPT, N)
    assert report.drained and report.migrated == 1 and report.aborted == 0 and report.remaining == 0
    assert svc.registry.get("d0").draining and len(w["d1"].calls) == 1
    assert (
        reg.get_sample_value("pdserve_router_migrations_total", {"reason": "drain", "result": "migrated"})
        == 1
    )
    assert store.leases == set() and svc.registry.get("d0").inflight == 0


def test_drain_refuses_unknown_and_prefill_workers(model_path) -> None:
    from pdserve.errors import InvalidRequestError, RequestNotFoundError

    svc, *_ = _svc(model_path)
    with pytest.raises(RequestNotFoundError, match="no worker 'nope'"):
        asyncio.run(drain_decode_worker(svc, "nope"))
    with pytest.raises(InvalidRequestError, match="prefill worker"):
        asyncio.run(drain_decode_worker(svc, "p0"))


def test_pdserve_drain_command_is_registered_and_reports(capsys) -> None:
    from pdserve import cli, drain_cli

    a = cli.build_parser().parse_args(["drain", "decode-3", "--timeout-s", "5", "--namespace", "ns"])
    assert a.func is drain_cli._cmd_drain and a.worker == "decode-3" and a.timeout_s == 5.0
    bad = cli.build_parser().parse_args(["drain", "decode-3", "--timeout-s", "0"])
    assert drain_cli._cmd_drain(bad) == 2  # refused before any connection
    assert "--timeout-s must be > 0" in capsys.readouterr().err
    out = {
        "worker_id": "decode-3",
        "found": True,
        "drained": True,
        "inflight": 0,
        "reports": [{"migrated": 3, "aborted": 1}, {"migrated": 2, "aborted": 0}],
        "elapsed_s": 1.5,
    }
    line = drain_cli.format_result(out)
    assert "decode-3 drained in 1.5s: 5 requests migrated off it, 1 migrations aborted" in line
    assert "NOT drained (2 requests" in drain_cli.format_result({**out, "drained": False, "inflight": 2})
    assert "no router knows worker 'x'" in drain_cli.format_result({"worker_id": "x", "found": False})
