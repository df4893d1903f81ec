"""The router's policy setup: CLI names, latency seeding from a profile, the registry's view."""

from __future__ import annotations

import pytest

from router.cluster_view import OutstandingTokens, build_view
from router.policy import (
    ColocatedPolicy,
    GlobalCacheAwarePolicy,
    GoodputAwarePolicy,
    GoodputConfig,
    InstanceRole,
    LeastLoadedPolicy,
    LinearLatency,
    PolicyKind,
)
from router.policy_factory import build_policy, parse_policy, policy_choices, seed_latency
from router.registry import Registry, WorkerKind, WorkerLoad
from simulator.latency import ProfiledLatencyModel
from simulator.profile import PointKind, Profile, ProfileGrid, ProfilePoint, save


def test_cli_names() -> None:
    assert parse_policy("goodput") is PolicyKind.GOODPUT
    assert parse_policy("cache_aware") is PolicyKind.GLOBAL_CACHE_AWARE
    assert parse_policy("colocated") is PolicyKind.COLOCATED
    assert {"goodput", "least_loaded", "random", "round_robin", "cache_aware", "colocated"} <= set(
        policy_choices()
    )
    with pytest.raises(ValueError, match="choose one of"):
        parse_policy("fastest")


def test_build_policy_per_kind() -> None:
    assert isinstance(build_policy(PolicyKind.LEAST_LOADED), LeastLoadedPolicy)
    assert isinstance(build_policy(PolicyKind.COLOCATED), ColocatedPolicy)
    assert isinstance(build_policy(PolicyKind.GLOBAL_CACHE_AWARE), GlobalCacheAwarePolicy)
    g = build_policy(PolicyKind.GOODPUT, goodput=GoodputConfig(tenant_max_inflight=3))
    assert isinstance(g, GoodputAwarePolicy) and g.config.tenant_max_inflight == 3
    assert isinstance(g.corrected.base, LinearLatency)


def _profile() -> Profile:
    pts = []
    for kind, b, t, c in ProfileGrid().points():
        if kind is PointKind.PREFILL:
            s = 2e-3 + 1e-4 * b * t + 2e-8 * b * ((c + t) ** 2 - c * c)
        else:
            s = 5e-3 + 1e-6 * b * c + 3e-4 * b
        pts.append(ProfilePoint(kind, b, t, c, s))
    return Profile("fake", "cpu", tuple(pts), kv_bytes_per_token=1024)


def test_latency_seeded_from_a_measured_profile(tmp_path) -> None:
    path = tmp_path / "profile.json"
    save(_profile(), path)
    prof = ProfiledLatencyModel(path)
    seed = seed_latency(str(path), token_budget=2048)
    assert seed.kv_bytes_per_token == 1024
    for n in (1, 2048):  # exact at the ends of the linearised range
        assert seed.prefill_time([n]) == pytest.approx(prof.prefill_time([n]), rel=1e-6)
    assert seed.decode_time(1, 0) == pytest.approx(prof.decode_time(1, 0), rel=1e-6)
    assert seed.decode_time(33, 0) == pytest.approx(prof.decode_time(33, 0), rel=1e-6)
    pol = build_policy(PolicyKind.GOODPUT, profile_path=str(path))
    assert isinstance(pol, GoodputAwarePolicy) and pol.corrected.base == seed


def test_view_from_registry_adds_router_side_load() -> None:
    now = [0.0]
    reg = Registry(heartbeat_timeout_s=3.0, clock=lambda: now[0])
    reg.register(
        "d0", WorkerKind.DECODE, "a:1", "m", WorkerLoad(1, 2, 100, 40, block_size=32, token_budget=512)
    )
    reg.register("p0", WorkerKind.PREFILL, "a:2", "m", WorkerLoad(0, 1, 50, 0))
    reg.register("x0", WorkerKind.PREFILL, "a:3", "other-model", WorkerLoad())
    reg.add_inflight("d0", 3)
    out = OutstandingTokens()
    out.add("p0", 700)
    out.add("p0", -200)
    view = build_view(reg, "m", out)
    assert [i.instance_id for i in view.instances] == ["p0", "d0"]
    p0, d0 = view.get("p0"), view.get("d0")
    assert (p0.role, p0.queued_tokens, p0.running_requests, p0.free_blocks) == (
        InstanceRole.PREFILL,
        500,
        1,
        50,
    )
    assert (p0.block_size, p0.token_budget) == (16, 2048)  # not reported: defaults
    assert (d0.role, d0.queued_requests, d0.running_requests, d0.free_blocks, d0.total_blocks) == (
        InstanceRole.DECODE,
        1,
        5,
        60,
        100,
    )
    assert (d0.block_size, d0.token_budget) == (32, 512)
    out.add("p0", -500)
    assert out.get("p0") == 0
    # KV of requests the router has in flight counts as used before a heartbeat reports it
    kv = OutstandingTokens()
    kv.add("d0", 32 * 50)
    assert build_view(reg, "m", out, kv).get("d0").free_blocks == 50
    kv.add("d0", -32 * 50 + 32 * 10)
    assert build_view(reg, "m", out, kv).get("d0").free_blocks == 60  # the report is larger
    now[0] = 10.0  # silent workers expire; one with the router's calls in flight only after busy_timeout_s
    assert [i.instance_id for i in build_view(reg, "m", out).instances] == ["d0"]
    now[0] = 40.0
    assert len(build_view(reg, "m", out)) == 0
