"""Goodput placement with each worker's own start-up profile (issue #19): reported at
registration, adopted as the model from the first request, a slow worker predicts slower and gets
fewer requests; the default ``python -m router`` policy is goodput and still refuses an impossible
SLO before placing anything."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pdserve.errors import InvalidRequestError
from pdserve.v1 import router_pb2, worker_pb2
from router.__main__ import build_parser
from router.cluster_view import build_view
from router.policy import (
    SLO,
    GoodputAwarePolicy,
    InstanceRole,
    InstanceSnapshot,
    LinearLatency,
    Placement,
    PolicyKind,
    Rejection,
    RejectReason,
    RequestInfo,
)
from router.policy.view import ClusterView
from router.policy_factory import build_policy, parse_policy
from router.registry import Registry, WorkerKind
from router.registry_service import RegistryServicer

FAST = dict(
    prefill_base_s=0.01,
    prefill_per_token_s=1e-4,
    decode_base_s=0.01,
    decode_per_seq_s=1e-3,
    decode_per_ctx_token_s=1e-6,
)
SLOW = {k: 4 * v for k, v in FAST.items()}  # a worker four times slower everywhere


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


def _req(i: int, slo: SLO | None = None, tokens: int = 64) -> RequestInfo:
    return RequestInfo(f"r{i}", tokens, max_output_tokens=16, slo=slo, predicted_output_tokens=16)


def _stats(running: int = 0) -> worker_pb2.WorkerStats:
    return worker_pb2.WorkerStats(kv_blocks_total=512, num_running=running, token_budget=2048)


def _register(svc: RegistryServicer, wid: str, role: int, prof: dict | None) -> None:
    req = router_pb2.RegisterRequest(
        worker_id=wid, role=role, address=f"127.0.0.1:{len(wid)}", model="m", stats=_stats()
    )
    if prof is not None:
        req.profile.CopyFrom(router_pb2.StepProfile(key=wid, **prof))
    svc.Register(req, SimpleNamespace())


def _cluster() -> tuple[Registry, RegistryServicer]:
    reg = Registry(heartbeat_timeout_s=1e9, clock=lambda: 0.0)
    cfg = SimpleNamespace(heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0)
    return reg, RegistryServicer(reg, cfg)  # type: ignore[arg-type]


def test_first_reported_profile_is_the_model_from_the_first_request() -> None:
    pol = GoodputAwarePolicy(clock=_Clock())
    prof = LinearLatency(**FAST)
    view = ClusterView(
        [
            InstanceSnapshot("p0", InstanceRole.PREFILL, free_blocks=512, total_blocks=512, latency=prof),
            InstanceSnapshot("d0", InstanceRole.DECODE, free_blocks=512, total_blocks=512, latency=prof),
        ]
    )
    d = pol.place(_req(0, tokens=300), view)  # over local_prefill_max_tokens: prefilled on p0
    assert isinstance(d, Placement) and d.instance_id == "p0"
    # not the seed's defaults (the whole KV's handoff after the remote prefill included)
    handoff = prof.transfer_time(300 * prof.kv_bytes_per_token)
    assert d.estimated_ttft_s == pytest.approx(prof.prefill_time([300]) + handoff)
    assert d.estimated_tpot_s == pytest.approx(prof.decode_time(1, 300 + 8))


def test_slow_worker_predicts_slower() -> None:
    pol = GoodputAwarePolicy(clock=_Clock())
    fast, slow = LinearLatency(**FAST), LinearLatency(**SLOW)
    snaps = [
        InstanceSnapshot("p-fast", InstanceRole.PREFILL, free_blocks=512, total_blocks=512, latency=fast),
        InstanceSnapshot("d-slow", InstanceRole.DECODE, free_blocks=512, total_blocks=512, latency=slow),
    ]
    d = pol.place(_req(0, tokens=300), ClusterView(snaps))
    assert isinstance(d, Placement) and d.decode_instance_id == "d-slow"
    assert d.estimated_tpot_s == pytest.approx(slow.decode_time(1, 308))  # its own, 4x the model's
    # an SLO only the fast worker's speed would meet is refused on the slow one's prediction
    tight = SLO(ttft_s=10.0, tpot_s=fast.decode_time(1, 308) * 2)
    r = pol.place(_req(1, tight, tokens=300), ClusterView(snaps))
    assert isinstance(r, Rejection) and r.reason is RejectReason.SLO_UNATTAINABLE and "TPOT" in r.message


def test_registered_slow_worker_gets_fewer_requests() -> None:
    """Through the registry: profiles reported in RegisterRequest reach placement; the slow
    decode and prefill workers each get fewer requests than their fast peers."""
    reg, svc = _cluster()
    _register(svc, "p-fast", worker_pb2.WORKER_ROLE_PREFILL, FAST)
    _register(svc, "p-slow", worker_pb2.WORKER_ROLE_PREFILL, SLOW)
    _register(svc, "d-fast", worker_pb2.WORKER_ROLE_DECODE, FAST)
    _register(svc, "d-slow", worker_pb2.WORKER_ROLE_DECODE, SLOW)
    assert reg.get("d-slow").profile == LinearLatency(**SLOW, prefill_per_token_ctx_s=0.0)
    pol = build_policy(parse_policy(build_parser().parse_args(["--model", "x"]).policy))
    queued = SimpleNamespace(get=lambda wid: queued_tokens.get(wid, 0), copy=lambda: queued)
    queued_tokens: dict[str, int] = {}
    count: dict[str, int] = {}
    for i in range(40):
        view = build_view(reg, "m", queued)  # type: ignore[arg-type]
        d = pol.place(_req(i, SLO(ttft_s=30.0, tpot_s=5.0), tokens=300), view)
        assert isinstance(d, Placement)
        count[d.decode_instance_id] = count.get(d.decode_instance_id, 0) + 1  # type: ignore[index]
        count[d.instance_id] = count.get(d.instance_id, 0) + 1
        reg.add_inflight(d.decode_instance_id, 1)  # type: ignore[arg-type]
        queued_tokens[d.instance_id] = queued_tokens.get(d.instance_id, 0) + 300
    assert 0 < count.get("d-slow", 0) < count["d-fast"], count
    assert count.get("p-slow", 0) < count["p-fast"], count


def test_register_refuses_a_bad_profile() -> None:
    reg, svc = _cluster()
    with pytest.raises(InvalidRequestError, match="decode_base_s"):
        _register(svc, "d0", worker_pb2.WORKER_ROLE_DECODE, dict(FAST, decode_base_s=-1.0))
    assert reg.get("d0") is None
    _register(svc, "d1", worker_pb2.WORKER_ROLE_DECODE, None)  # no profile: registered, predicted by the seed
    assert reg.get("d1").profile is None and reg.get("d1").kind is WorkerKind.DECODE


def test_default_policy_is_goodput_and_refuses_an_impossible_slo_before_placing() -> None:
    a = build_parser().parse_args(["--model", "x"])
    assert parse_policy(a.policy) is PolicyKind.GOODPUT
    reg, svc = _cluster()
    _register(svc, "p0", worker_pb2.WORKER_ROLE_PREFILL, FAST)
    _register(svc, "d0", worker_pb2.WORKER_ROLE_DECODE, FAST)
    pol = build_policy(parse_policy(a.policy))
    queued = SimpleNamespace(get=lambda wid: 0, copy=lambda: queued)
    r = pol.place(_req(0, SLO(ttft_s=1e-4, tpot_s=1.0)), build_view(reg, "m", queued))  # type: ignore[arg-type]
    assert isinstance(r, Rejection) and r.reason is RejectReason.SLO_UNATTAINABLE
    assert r.retry_after_s > 0 and "TTFT" in r.message
    assert pol.inflight() == 0  # nothing placed, nothing booked
    # without an SLO the default policy places best effort (it never refuses such a request)
    assert isinstance(pol.place(_req(1), build_view(reg, "m", queued)), Placement)  # type: ignore[arg-type]


def test_over_prediction_does_not_widen_the_admission_quantile() -> None:
    """Requests faster than predicted (e.g. short prompts under a linear model) must not make every
    later admission stricter; slower-than-predicted ones do."""
    from router.policy.latency import CorrectionConfig, OnlineCorrectedLatency, Phase

    c = OnlineCorrectedLatency(LinearLatency(**FAST), CorrectionConfig(min_spread_samples=5))
    for i in range(40):  # measured 0.25x .. 1x the prediction: never slower
        c.observe(Phase.TTFT, 1.0, 0.25 if i % 2 else 1.0 * c.factor(Phase.TTFT))
    assert c.spread(Phase.TTFT) == pytest.approx(1.0, abs=0.05)
    for i in range(40):  # now alternately 2x slower than the corrected prediction
        c.observe(Phase.TTFT, 1.0, 2.0 * c.factor(Phase.TTFT) if i % 2 else c.factor(Phase.TTFT))
    assert c.spread(Phase.TTFT) > 1.5
