"""Router placement policies on hand-built cluster states (pure, no simulator)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest

from router.policy import (
    SLO,
    ClusterView,
    GlobalCacheAwarePolicy,
    InstanceRole,
    InstanceSnapshot,
    LatencyEstimator,
    LeastLoadedPolicy,
    LocalCacheAwarePolicy,
    ManualClock,
    Placement,
    PolicyKind,
    RandomPolicy,
    Rejection,
    RejectReason,
    RequestInfo,
    RoundRobinPolicy,
    TtftEstimator,
    make_policy,
)

P, D, M = InstanceRole.PREFILL, InstanceRole.DECODE, InstanceRole.MIXED
KEYS = [bytes([i]) * 8 for i in range(64)]


class LinearLatency:
    """1 ms per new token, +0.1 ms per (new x context / 1000); transfer at ``bw`` bytes/s."""

    kv_bytes_per_token = 1000

    def __init__(self, bw: float = 1e9) -> None:
        self.bw = bw

    def prefill_time(self, tokens: Sequence[int], contexts: Sequence[int] | None = None) -> float:
        ctx = contexts or [0] * len(tokens)
        return sum(1e-3 * n + 1e-7 * n * c for n, c in zip(tokens, ctx, strict=True))

    def transfer_time(self, nbytes: float) -> float:
        return nbytes / self.bw


def snap(
    i: str, role: InstanceRole = P, q: int = 0, cached: int = 0, free: int = 1000, running: int = 0
) -> InstanceSnapshot:
    return InstanceSnapshot(
        i,
        role,
        queued_tokens=q,
        running_requests=running,
        free_blocks=free,
        total_blocks=1000,
        block_size=16,
        token_budget=1024,
        cached=frozenset(KEYS[:cached]),
    )


def req(n: int = 1024, blocks: int = 64, slo: SLO | None = None) -> RequestInfo:
    return RequestInfo("r", n, KEYS[:blocks], 10, slo)


def test_latency_protocol_is_structural() -> None:
    assert isinstance(LinearLatency(), LatencyEstimator)


def test_no_instance_is_rejected() -> None:
    d = LeastLoadedPolicy().place(req(), ClusterView([snap("d0", D)]))
    assert isinstance(d, Rejection) and d.reason is RejectReason.NO_INSTANCE


def test_random_is_seeded_and_covers_candidates() -> None:
    view = ClusterView([snap("p0"), snap("p1"), snap("p2"), snap("d0", D)])
    picks = [RandomPolicy(seed=7).place(req(), view).instance_id for _ in range(3)]
    assert picks == [RandomPolicy(seed=7).place(req(), view).instance_id for _ in range(3)]
    pol = RandomPolicy(seed=1)
    c = Counter(pol.place(req(), view).instance_id for _ in range(300))
    assert set(c) == {"p0", "p1", "p2"} and min(c.values()) > 60


def test_round_robin_cycles_prefill_and_decode_separately() -> None:
    view = ClusterView([snap("p0"), snap("p1"), snap("d0", D), snap("d1", D)])
    pol = RoundRobinPolicy()
    assert [pol.place(req(), view).instance_id for _ in range(4)] == ["p0", "p1", "p0", "p1"]
    assert [pol.choose_decode(req(), view, 1) for _ in range(3)] == ["d0", "d1", "d0"]


def test_least_loaded_picks_fewest_queued_tokens_then_requests() -> None:
    view = ClusterView([snap("p0", q=500), snap("p1", q=100), snap("p2", q=100, running=3)])
    assert LeastLoadedPolicy().place(req(), view).instance_id == "p1"


def test_colocated_cluster_uses_mixed_instances() -> None:
    view = ClusterView([snap("m0", M, q=10), snap("m1", M)])
    assert LeastLoadedPolicy().place(req(), view).instance_id == "m1"


def test_local_cache_aware_trades_cache_hit_against_queue() -> None:
    lat = LinearLatency()
    # p0 holds the whole prefix but has a short queue: the hit (63 blocks) beats 200 queued tokens.
    view = ClusterView([snap("p0", q=200, cached=64), snap("p1")])
    d = LocalCacheAwarePolicy(latency=lat).place(req(), view)
    assert d.instance_id == "p0" and d.reused_blocks == 63  # at least one token is always computed
    # With a long queue on p0 the empty instance wins.
    view = ClusterView([snap("p0", q=20000, cached=64), snap("p1")])
    d = LocalCacheAwarePolicy(latency=lat).place(req(), view)
    assert d.instance_id == "p1" and d.reused_blocks == 0
    est = TtftEstimator(lat)
    assert d.estimated_ttft_s == pytest.approx(est.ttft(view.get("p1"), 1024, 0))


def test_local_cache_aware_needs_a_latency_model() -> None:
    with pytest.raises(ValueError):
        LocalCacheAwarePolicy()


def test_global_cache_aware_fetches_remote_prefix_when_cheaper() -> None:
    # p0 has the prefix but a long queue; p1 is idle: pull the prefix from p0 to p1.
    view = ClusterView([snap("p0", q=20000, cached=64), snap("p1")])
    d = GlobalCacheAwarePolicy(latency=LinearLatency(bw=1e10)).place(req(), view)
    assert isinstance(d, Placement)
    assert (d.instance_id, d.fetch_from, d.fetch_blocks, d.reused_blocks) == ("p1", "p0", 63, 63)
    # On a slow link recomputing is cheaper: no fetch.
    d = GlobalCacheAwarePolicy(latency=LinearLatency(bw=1e5)).place(req(), view)
    assert d.fetch_from is None and d.instance_id == "p1"


def test_global_cache_aware_prefers_local_hit_over_fetch() -> None:
    view = ClusterView([snap("p0", cached=64), snap("p1")])
    d = GlobalCacheAwarePolicy(latency=LinearLatency(bw=1e10)).place(req(), view)
    assert d.instance_id == "p0" and d.fetch_from is None


def test_global_cache_aware_fetches_from_the_kv_store_when_it_holds_the_longest_prefix() -> None:
    from dataclasses import replace

    from router.policy import STORE_SOURCE
    from router.policy_factory import uses_prefix_lookup

    # p0 caches 16 blocks, the store 48 (more): idle p1 pulls the store's prefix
    view = ClusterView([snap("p0", q=20000, cached=16), snap("p1")])
    d = GlobalCacheAwarePolicy(latency=LinearLatency(bw=1e10)).place(
        replace(req(), store_prefix_blocks=48), view
    )
    assert isinstance(d, Placement)
    assert (d.instance_id, d.fetch_from, d.fetch_blocks) == ("p1", STORE_SOURCE, 48)
    # an instance holding more than the store wins as the source
    d = GlobalCacheAwarePolicy(latency=LinearLatency(bw=1e10)).place(
        replace(req(), store_prefix_blocks=8), view
    )
    assert (d.fetch_from, d.fetch_blocks) == ("p0", 16)
    # only the policies that read it pay for a store lookup per request
    assert uses_prefix_lookup(PolicyKind.GLOBAL_CACHE_AWARE) and uses_prefix_lookup(PolicyKind.GOODPUT)
    assert not uses_prefix_lookup(PolicyKind.LOCAL_CACHE_AWARE)
    assert not uses_prefix_lookup(PolicyKind.LEAST_LOADED)


def test_admission_hook_rejects_early() -> None:
    def too_slow(r: RequestInfo, p: Placement, v: ClusterView) -> Rejection | None:
        if r.slo is not None and p.estimated_ttft_s is not None and p.estimated_ttft_s > r.slo.ttft_s:
            return Rejection(RejectReason.SLO_UNATTAINABLE, "predicted TTFT over SLO", retry_after_s=1.0)
        return None

    pol = LocalCacheAwarePolicy(latency=LinearLatency(), admission=[too_slow], clock=ManualClock())
    view = ClusterView([snap("p0", q=100000)])
    d = pol.place(req(slo=SLO(ttft_s=0.5)), view)
    assert isinstance(d, Rejection) and d.retry_after_s == 1.0
    assert isinstance(pol.place(req(slo=SLO(ttft_s=500)), view), Placement)


def test_splitwise_overflow_goes_to_mixed_pool() -> None:
    lat = LinearLatency()
    view = ClusterView([snap("p0", q=100000), snap("d0", D), snap("m0", M)])
    d = LeastLoadedPolicy(latency=lat).place(req(slo=SLO(ttft_s=1.0)), view)
    assert d.instance_id == "m0"
    view = ClusterView([snap("p0", q=10), snap("d0", D), snap("m0", M)])
    assert LeastLoadedPolicy(latency=lat).place(req(slo=SLO(ttft_s=1.0)), view).instance_id == "p0"


def test_choose_decode_prefers_room_then_mixed_then_queues() -> None:
    pol = LeastLoadedPolicy()
    view = ClusterView([snap("d0", D, free=10), snap("d1", D, free=50), snap("m0", M, free=500)])
    assert pol.choose_decode(req(), view, 20) == "d1"
    assert pol.choose_decode(req(), view, 100) == "m0"
    assert pol.choose_decode(req(), view, 1000) == "d1"  # nobody has room: queue at the freest decode
    assert pol.choose_decode(req(), ClusterView([snap("p0")]), 1) is None


def test_make_policy_by_kind() -> None:
    for k in PolicyKind:
        pol = make_policy(k.value, latency=LinearLatency(), seed=3)
        assert pol.kind is k
