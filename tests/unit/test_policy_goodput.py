"""Goodput-aware placement on hand-built cluster states with a fake clock (pure, no simulator).

The latency model is exact arithmetic (tests.policy_fakes): prefill 1 ms per new token, decode
step 10 ms + 1 ms per request in the batch, transfer 1000 bytes/token at ``bw`` bytes/s; token
budget 2048 (InstanceSnapshot's default).
"""

from __future__ import annotations

import math

import pytest

from router.policy import (
    SLO,
    STORE_SOURCE,
    ClusterView,
    ColocatedPolicy,
    GoodputAwarePolicy,
    GoodputConfig,
    InstanceSnapshot,
    LinearLatency,
    ManualClock,
    Observation,
    Phase,
    Placement,
    PolicyKind,
    Rejection,
    RejectReason,
    RequestInfo,
    make_policy,
)
from tests.policy_fakes import KEYS, MS, D, M, P, lat, placed, rejected, snap


def req(
    rid: str = "r",
    n: int = 100,
    slo: SLO | None = None,
    priority: int = 0,
    tenant: str = "",
    out: int = 10,
    store: int = 0,
    max_tokens: int = 0,
) -> RequestInfo:
    return RequestInfo(
        rid,
        n,
        KEYS[: n // 16],
        max_output_tokens=max_tokens,
        slo=slo,
        priority=priority,
        tenant=tenant,
        predicted_output_tokens=out,
        store_prefix_blocks=store,
    )


def policy(clock: ManualClock | None = None, bw: float = 1e9, **cfg) -> GoodputAwarePolicy:
    # these tests price queue, fetch and prefill exactly: the KV handoff term (on by default) is
    # left out unless a test asks for it (test_handoff_* below)
    cfg.setdefault("price_handoff", False)
    return GoodputAwarePolicy(clock=clock or ManualClock(), latency=lat(bw), config=GoodputConfig(**cfg))


# ---------------------------------------------------------------- prefill choice (Conductor)
def test_prefill_minimises_queue_plus_uncached_prefill() -> None:
    view = ClusterView([snap("p0", P, q=300), snap("p1", P, q=100, cached=0), snap("d0", D)])
    # p0: 300 ms queue + 640 ms; p1: 100 ms + 640 ms -> p1 wins
    d = placed(policy(local_prefill=False).place(req(n=640), view))
    assert (d.instance_id, d.decode_instance_id, d.local_prefill) == ("p1", "d0", False)
    assert d.estimated_ttft_s == pytest.approx(0.740)
    # a local cache on p0 (32 of 39 usable blocks) outweighs its longer queue
    view = ClusterView([snap("p0", P, q=300, cached=32), snap("p1", P, q=100), snap("d0", D)])
    d = placed(policy(local_prefill=False, bw=1e3).place(req(n=640), view))
    assert d.instance_id == "p0" and d.reused_blocks == 32 and d.fetch_from is None
    assert d.estimated_ttft_s == pytest.approx(0.300 + (640 - 512) * MS)


def test_remote_prefix_fetched_only_when_it_beats_recompute() -> None:
    view = ClusterView([snap("p0", P), snap("p1", P, q=5000, cached=32), snap("d0", D)])
    fast = placed(policy(local_prefill=False, bw=1e9).place(req(n=640), view))
    # fetching 512 tokens of KV (0.5 ms at 1 GB/s) beats recomputing them (512 ms)
    assert (fast.instance_id, fast.fetch_from, fast.fetch_blocks) == ("p0", "p1", 32)
    assert fast.estimated_ttft_s == pytest.approx(512_000 / 1e9 + 128 * MS)
    slow = placed(policy(local_prefill=False, bw=1e5).place(req(n=640), view))
    # at 100 kB/s the fetch takes 5.1 s: recompute on p0 instead
    assert (slow.instance_id, slow.fetch_from, slow.reused_blocks) == ("p0", None, 0)


def test_kv_store_prefix_is_a_fetch_source() -> None:
    view = ClusterView([snap("p0", P), snap("d0", D)])
    d = placed(policy(local_prefill=False).place(req(n=640, store=20), view))
    assert (d.fetch_from, d.fetch_blocks, d.reused_blocks) == (STORE_SOURCE, 20, 20)


# ---------------------------------------------------------------- decode choice
def test_decode_picks_lowest_predicted_tpot_with_room() -> None:
    view = ClusterView([snap("p0", P), snap("d0", D, running=20), snap("d1", D, running=2)])
    d = placed(policy().place(req(n=400), view))
    assert d.decode_instance_id == "d1"
    assert d.estimated_tpot_s == pytest.approx(10 * MS + 3 * MS)
    # d1 has no room for the prompt's 26 blocks (Llumnix freeness < 0): d0 although slower
    view = ClusterView([snap("p0", P), snap("d0", D, running=20), snap("d1", D, running=2, free=10)])
    assert placed(policy().place(req(n=400), view)).decode_instance_id == "d0"


def test_long_outputs_are_spread_over_decode_instances() -> None:
    pol = policy(long_output_tokens=256)
    view = ClusterView([snap("p0", P), snap("d0", D), snap("d1", D), snap("d2", D)])
    longs = [placed(pol.place(req(f"L{i}", n=400, out=1000), view)).decode_instance_id for i in range(3)]
    assert sorted(longs) == ["d0", "d1", "d2"]  # one long request per instance
    # short requests are not spread by length: they go to the best TPOT (ties: first)
    shorts = {placed(pol.place(req(f"S{i}", n=400, out=8), view)).decode_instance_id for i in range(3)}
    assert shorts == {"d0"}
    # a finished long request frees its instance for the next long one
    pol.on_finished(Observation("L1", 0.5, 0.02, 1000))
    assert placed(pol.place(req("L3", n=400, out=1000), view)).decode_instance_id == longs[1]


def test_length_predictor_supplies_missing_output_length() -> None:
    pol = policy()
    view = ClusterView([snap("p0", P), snap("d0", D)])
    d = placed(pol.place(req("a", n=400, out=0, max_tokens=5), view))
    assert d.predicted_output_tokens == 5  # the prior (128) clamped to max_tokens


# ---------------------------------------------------------------- early rejection
def test_impossible_slo_rejected_with_reason_and_retry_after() -> None:
    pol = policy()
    view = ClusterView([snap("p0", P), snap("d0", D)])
    r = rejected(pol.place(req(n=400, slo=SLO(ttft_s=1e-3)), view))
    assert r.reason is RejectReason.SLO_UNATTAINABLE
    assert "TTFT" in r.message and r.retry_after_s is not None and r.retry_after_s > 0
    r = rejected(pol.place(req(n=400, slo=SLO(tpot_s=5e-3)), view))
    assert r.reason is RejectReason.SLO_UNATTAINABLE and "TPOT" in r.message
    assert pol.inflight() == 0  # nothing reserved for a rejected request
    assert pol.stats.rejected[RejectReason.SLO_UNATTAINABLE] == 2


def test_retry_after_is_the_predicted_excess() -> None:
    pol = policy(local_prefill=False, slo_margin=0.0)
    view = ClusterView([snap("p0", P, q=3000), snap("d0", D)])
    # TTFT = 3.0 s queue + 0.4 s prefill; SLO 1 s -> retry in ~2.4 s
    r = rejected(pol.place(req(n=400, slo=SLO(ttft_s=1.0)), view))
    assert r.retry_after_s == pytest.approx(2.4)
    huge = ClusterView([snap("p0", P, q=10**6), snap("d0", D)])
    assert rejected(pol.place(req(n=400, slo=SLO(ttft_s=1.0)), huge)).retry_after_s == 30.0


def test_margin_applies_and_generous_slo_passes() -> None:
    view = ClusterView([snap("p0", P), snap("d0", D)])
    # predicted TTFT 0.4 s: within a 0.5 s SLO, but not within 0.5 * (1 - 0.25)
    assert isinstance(policy(local_prefill=False).place(req(n=400, slo=SLO(0.5, 1.0)), view), Placement)
    tight = policy(local_prefill=False, slo_margin=0.25)
    assert isinstance(tight.place(req(n=400, slo=SLO(0.5, 1.0)), view), Rejection)


def test_lower_priority_is_shed_first_under_pressure() -> None:
    pol = policy(local_prefill=False, slo_margin=0.1, priority_margin_step=0.1)
    slo = SLO(ttft_s=1.0)
    shed_at: dict[int, int] = {}
    for q in range(0, 1000, 50):  # growing prefill queue: TTFT = q ms + 100 ms
        view = ClusterView([snap("p0", P, q=q), snap("d0", D)])
        for prio in (0, 1, 3):
            d = pol.place(req(f"{q}-{prio}", n=100, slo=slo, priority=prio), view)
            if isinstance(d, Rejection) and prio not in shed_at:
                shed_at[prio] = q
    # priority 3 (least important) is shed first, then 1, then 0
    assert shed_at[3] < shed_at[1] < shed_at[0]
    assert (shed_at[3], shed_at[1], shed_at[0]) == (550, 750, 850)


def test_tenant_quota_and_release() -> None:
    clock = ManualClock()
    pol = policy(clock, tenant_max_inflight=2, tenant_quotas=(("vip", 3),), ledger_grace_s=5.0)
    view = ClusterView([snap("p0", P), snap("d0", D)])
    for i in range(2):
        placed(pol.place(req(f"a{i}", tenant="acme"), view))
    r = rejected(pol.place(req("a2", tenant="acme"), view))
    assert r.reason is RejectReason.QUOTA_EXCEEDED and "acme" in r.message
    assert r.retry_after_s is not None and r.retry_after_s > 0
    # other tenants are not affected; "vip" has its own quota of 3
    placed(pol.place(req("b0", tenant="other"), view))
    for i in range(3):
        placed(pol.place(req(f"v{i}", tenant="vip"), view))
    assert isinstance(pol.place(req("v3", tenant="vip"), view), Rejection)
    # a finished request frees a slot
    pol.on_finished(Observation("a0", 0.1, 0.01, 10, num_prompt_tokens=100))
    placed(pol.place(req("a3", tenant="acme"), view))
    # a release (failure) frees one too; and unreported requests expire after finish + grace
    pol.release("a1")
    placed(pol.place(req("a4", tenant="acme"), view))
    assert pol.inflight("acme") == 2
    clock.advance(60.0)
    assert pol.inflight("acme") == 0


# ---------------------------------------------------------------- conditional disaggregation
def test_short_uncached_prompt_prefilled_locally_when_faster() -> None:
    pol = policy(local_prefill_max_tokens=256)
    busy = ClusterView([snap("p0", P, q=2000), snap("d0", D)])
    d = placed(pol.place(req("a", n=100), busy))
    assert (d.instance_id, d.decode_instance_id, d.local_prefill) == ("d0", "d0", True)
    assert d.estimated_ttft_s == pytest.approx(0.100)
    # a long prompt is never prefilled on the decode worker
    d = placed(pol.place(req("b", n=640), busy))
    assert (d.instance_id, d.local_prefill) == ("p0", False)
    # an idle prefill worker vs a decode worker busy with 10 requests: disaggregate
    idle = ClusterView([snap("p0", P), snap("d0", D, running=10)])
    d = placed(pol.place(req("c", n=100), idle))
    assert (d.instance_id, d.local_prefill) == ("p0", False)
    # the feature can be switched off
    d = placed(policy(local_prefill=False).place(req("e", n=100), busy))
    assert d.instance_id == "p0"


def test_without_prefill_instances_everything_runs_locally() -> None:
    d = placed(policy().place(req(n=1000), ClusterView([snap("m0", M)])))
    assert d.local_prefill and d.instance_id == "m0"
    r = rejected(policy().place(req(), ClusterView([snap("p0", P)])))
    assert r.reason is RejectReason.NO_INSTANCE


# ---------------------------------------------------------------- online correction
def test_online_correction_learns_measured_latency() -> None:
    pol = policy(local_prefill=False)
    view = ClusterView([snap("p0", P), snap("d0", D)])
    slo = SLO(ttft_s=0.6, tpot_s=1.0)  # 0.4 s predicted by the seed: within 0.6 * 0.9
    first = placed(pol.place(req("r0", n=400, slo=slo), view))
    assert first.estimated_ttft_s == pytest.approx(0.4)
    for i in range(40):  # the cluster is 2x slower on prefill, 3x on decode than the seed says
        # a TTFT SLO the 0.4 s prediction is a quarter of: it teaches the factor (ttft_learn_min_share)
        d = placed(pol.place(req(f"r{i}", n=400, slo=SLO(1.6, 10.0)), view))
        base_ttft = 0.4
        base_tpot = 10 * MS + 1 * MS
        pol.on_finished(Observation(f"r{i}", 2 * base_ttft, 3 * base_tpot, 10, num_prompt_tokens=400))
        assert d.estimated_ttft_s is not None
    assert pol.corrected.samples(Phase.TTFT) == 40 and pol.corrected.samples(Phase.TPOT) == 40
    assert pol.corrected.factor(Phase.TTFT) == pytest.approx(2.0, rel=1e-3)
    assert pol.corrected.factor(Phase.TPOT) == pytest.approx(3.0, rel=1e-3)
    # the corrected prediction now rejects what the seed accepted
    assert isinstance(pol.place(req("x", n=400, slo=slo), view), Rejection)
    assert placed(pol.place(req("y", n=400, slo=SLO(2.0, 1.0)), view)).estimated_ttft_s == pytest.approx(
        0.8, rel=1e-3
    )
    # the length predictor learnt from the same observations
    assert pol.lengths.num_samples == 40


def test_correction_is_a_geometric_ewma_robust_to_a_burst_of_outliers() -> None:
    from router.policy.latency import CorrectionConfig, OnlineCorrectedLatency

    pol = policy(local_prefill=False)
    c = OnlineCorrectedLatency(pol.corrected.base, CorrectionConfig(alpha=0.2, min_spread_samples=5))
    for _ in range(5):  # calibration: the cluster answers as predicted
        assert c.observe(Phase.TTFT, 0.1, 0.1)
    assert c.factor(Phase.TTFT) == pytest.approx(1.0)
    for _ in range(3):  # three requests caught in a burst: 10x slower than predicted
        assert c.observe(Phase.TTFT, 0.1, 1.0)
    # log-space EWMA: 10 ** (1 - 0.8 ** 3) = 3.4x, not the 5.9x a linear EWMA of ratios gives
    assert c.factor(Phase.TTFT) == pytest.approx(10 ** (1 - 0.8**3), rel=1e-9)
    for _ in range(8):  # then the cluster answers as predicted: back within 30% of 1
        c.observe(Phase.TTFT, 0.1, 0.1)
    assert c.factor(Phase.TTFT) < 1.3
    assert not c.observe(Phase.TTFT, 0.0, 1.0) and not c.observe(Phase.TTFT, 0.1, math.nan)
    assert c.samples(Phase.TTFT) == 16 and c.factor(Phase.TPOT) == 1.0


def test_calibration_is_the_median_of_the_first_samples() -> None:
    """A profile measured 2.3x pessimistic is corrected by the warm-up's first samples (their
    median), one outlier among them ignored; an EWMA from 1 was still 1.2x off after 8."""
    from router.policy.latency import CorrectionConfig, OnlineCorrectedLatency

    c = OnlineCorrectedLatency(policy().corrected.base, CorrectionConfig(min_spread_samples=5))
    for ratio in (0.44, 0.41, 3.5, 0.43, 0.45):
        c.observe(Phase.TTFT, 1.0, ratio)
    assert c.factor(Phase.TTFT) == pytest.approx(0.44)
    assert c.spread(Phase.TTFT) == 1.0


def test_one_token_requests_do_not_correct_tpot() -> None:
    pol = policy()
    view = ClusterView([snap("p0", P), snap("d0", D)])
    placed(pol.place(req("a"), view))
    pol.on_finished(Observation("a", 0.2, 0.0, 1, num_prompt_tokens=100))
    assert pol.corrected.samples(Phase.TTFT) == 1 and pol.corrected.samples(Phase.TPOT) == 0


# ---------------------------------------------------------------- colocated + factory
def test_colocated_policy_runs_every_request_on_least_loaded_decode() -> None:
    pol = make_policy(PolicyKind.COLOCATED)
    assert isinstance(pol, ColocatedPolicy)
    view = ClusterView([snap("p0", P), snap("d0", D, running=3), snap("d1", D, running=1)])
    d = placed(pol.place(req(n=2000), view))
    assert (d.instance_id, d.decode_instance_id, d.local_prefill) == ("d1", "d1", True)
    assert rejected(pol.place(req(), ClusterView([snap("p0", P)]))).reason is RejectReason.NO_INSTANCE


def test_make_goodput_with_prefill_only_estimator_and_best_effort() -> None:
    class PrefillOnly:
        kv_bytes_per_token = 1000

        def prefill_time(self, tokens, contexts=None) -> float:
            return 1e-3 * sum(tokens)

        def transfer_time(self, nbytes: float) -> float:
            return nbytes / 1e9

    pol = make_policy("goodput", latency=PrefillOnly(), clock=ManualClock(), seed=1)
    assert isinstance(pol, GoodputAwarePolicy)
    # best effort (no SLO): accepted even when the decode instance has no room (it queues)
    view = ClusterView([snap("p0", P, q=10**6), snap("d0", D, free=0)])
    d = placed(pol.place(req(n=400), view))
    assert d.decode_instance_id == "d0" and not math.isinf(d.estimated_ttft_s or 0.0)


def test_linear_latency_from_model_recovers_coefficients() -> None:
    src = LinearLatency(
        kv_bytes_per_token=2048,
        prefill_base_s=3e-3,
        prefill_per_token_s=2e-4,
        prefill_per_token_ctx_s=1e-8,
        decode_base_s=8e-3,
        decode_per_seq_s=5e-4,
        decode_per_ctx_token_s=1e-7,
        transfer_latency_s=1e-3,
        transfer_bandwidth=2e9,
    )
    got = LinearLatency.from_model(src)
    for n, ctx in ((1, 0), (512, 0), (100, 1000)):
        assert got.prefill_time([n], [ctx]) == pytest.approx(src.prefill_time([n], [ctx]), rel=1e-6)
    for b, c in ((1, 0), (16, 4096)):
        assert got.decode_time(b, c) == pytest.approx(src.decode_time(b, c), rel=1e-6)
    assert got.transfer_time(1e6) == pytest.approx(src.transfer_time(1e6), rel=1e-6)


def test_shared_cores_scale_predictions_by_busy_instances_per_core() -> None:
    """Four instances on two cores: with three busy, a new request's steps run 2x slower."""
    busy = dict(running=1)
    quiet = ClusterView([snap("p0", P), snap("p1", P), snap("d0", D), snap("d1", D)])
    loaded = ClusterView([snap("p0", P), snap("p1", P, **busy), snap("d0", D, **busy), snap("d1", D, **busy)])
    cfg = GoodputConfig(local_prefill=False, shared_cores=2)
    assert cfg.contention(quiet) == 1.0 and cfg.contention(loaded) == 2.0
    assert GoodputConfig().contention(loaded) == 1.0  # own devices: no contention term
    alone = placed(policy(local_prefill=False).place(req("a", n=400), loaded))
    shared = placed(policy(local_prefill=False, shared_cores=2).place(req("b", n=400), loaded))
    assert shared.estimated_ttft_s == pytest.approx(2 * alone.estimated_ttft_s)
    assert shared.estimated_tpot_s == pytest.approx(2 * alone.estimated_tpot_s)
    # an SLO the uncontended prediction meets is refused once the cores are oversubscribed
    slo = SLO(ttft_s=alone.estimated_ttft_s * 1.5, tpot_s=10.0)
    assert placed(policy(local_prefill=False, shared_cores=2).place(req("c", n=400, slo=slo), quiet))
    assert isinstance(
        policy(local_prefill=False, shared_cores=2).place(req("d", n=400, slo=slo), loaded), Rejection
    )
    with pytest.raises(ValueError):
        GoodputConfig(shared_cores=0)


def test_admission_uses_the_upper_quantile_of_the_prediction_error() -> None:
    from router.policy.latency import CorrectionConfig, OnlineCorrectedLatency

    pol = policy(local_prefill=False)
    c = OnlineCorrectedLatency(pol.corrected.base, CorrectionConfig(alpha=0.2, min_spread_samples=5))
    for _ in range(4):
        c.observe(Phase.TTFT, 0.1, 0.1)
    assert c.spread(Phase.TTFT) == 1.0  # too few samples
    for i in range(40):  # measured alternates 0.5x / 2x the prediction: mean right, spread wide
        c.observe(Phase.TTFT, 0.1, 0.05 if i % 2 else 0.2)
    assert 0.6 < c.factor(Phase.TTFT) < 1.6
    assert c.spread(Phase.TTFT) > 2.0  # exp(1.28 * ~0.69)
    assert c.spread(Phase.TPOT) == 1.0
    # the policy: an SLO its mean prediction meets is refused while the error spread is that wide
    view = ClusterView([snap("p0", P), snap("d0", D)])
    slo = SLO(ttft_s=0.6, tpot_s=10.0)  # the seed predicts 0.4 s: within 0.6 * 0.9
    assert placed(pol.place(req("a", n=400, slo=slo), view))
    for i in range(40):
        placed(pol.place(req(f"r{i}", n=400, slo=None), view))
        pol.on_finished(Observation(f"r{i}", 0.2 if i % 2 else 0.8, 0.011, 10, num_prompt_tokens=400))
    assert pol.corrected.spread(Phase.TTFT) > 2.0
    assert isinstance(pol.place(req("b", n=400, slo=slo), view), Rejection)


# ---------------------------------------------------------------- LoRA adapter loads (#16)
def test_adapter_load_time_is_part_of_the_predicted_ttft() -> None:
    """A request's LoRA adapter must be loaded on the instance before its prefill: nothing when it
    is in an engine slot, a host -> slot copy when in host memory, a disk read too otherwise.
    Placement prefers the instance that holds it, prices the load into the TTFT (and the TTFT
    SLO), and the base model never pays it."""
    from dataclasses import replace

    from router.policy.estimate import TtftTable
    from router.policy.view import adapter_load_time

    assert adapter_load_time("", frozenset(), frozenset(), 1.0, 2.0) == 0.0
    assert adapter_load_time("a", frozenset({"a"}), frozenset({"a"}), 1.0, 2.0) == 0.0
    assert adapter_load_time("a", frozenset(), frozenset({"a"}), 1.0, 2.0) == 1.0
    assert adapter_load_time("a", frozenset(), frozenset(), 1.0, 2.0) == 3.0

    def adapted(s: InstanceSnapshot, slot=(), host=()) -> InstanceSnapshot:
        return replace(
            s,
            adapters_in_slot=frozenset(slot),
            adapters_in_host=frozenset(host),
            adapter_slot_load_s=0.010,
            adapter_disk_load_s=0.200,
        )

    # p0 queues 100 ms but holds the adapter in a slot; p1 is idle but must read it from disk
    view = ClusterView([adapted(snap("p0", P, q=100), slot=["sql"]), adapted(snap("p1", P)), snap("d0", D)])
    r = replace(req(n=320), adapter="sql")
    d = placed(policy(local_prefill=False).place(r, view))
    assert d.instance_id == "p0" and d.estimated_ttft_s == pytest.approx(0.100 + 0.320)
    # in host memory on p1: a 10 ms copy beats p0's 100 ms queue
    view = ClusterView(
        [adapted(snap("p0", P, q=100), slot=["sql"]), adapted(snap("p1", P), host=["sql"]), snap("d0", D)]
    )
    d = placed(policy(local_prefill=False).place(r, view))
    assert d.instance_id == "p1" and d.estimated_ttft_s == pytest.approx(0.010 + 0.320)
    # the base model ignores adapter residency: p1 (idle) wins
    assert placed(policy(local_prefill=False).place(req(n=320), view)).instance_id == "p1"
    # the load counts against the TTFT SLO: 200 + 10 ms of loading + 320 ms > 400 ms
    only_disk = ClusterView([adapted(snap("p1", P)), snap("d0", D)])
    slo = SLO(ttft_s=0.4, tpot_s=1.0)
    rej = rejected(policy(local_prefill=False, slo_margin=0.0).place(replace(r, slo=slo), only_disk))
    assert rej.reason is RejectReason.SLO_UNATTAINABLE and "adapter load 210" in rej.message, rej.message
    assert isinstance(policy(local_prefill=False).place(replace(req(n=320), slo=slo), only_disk), Placement)
    # the columnar queue path prices base-model requests only
    with pytest.raises(ValueError, match="base-model requests only"):
        TtftTable(policy().estimator, 10, "sql").pool_queues(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the KV handoff in TTFT
def test_handoff_whole_kv_is_added_to_a_remote_prefill_ttft() -> None:
    view = ClusterView([snap("p0", P), snap("d0", D)])
    # 640 tokens x 1000 bytes at 1 MB/s: a 0.64 s handoff after the 0.64 s prefill
    d = placed(policy(local_prefill=False, bw=1e6, price_handoff=True).place(req(n=640), view))
    assert d.estimated_ttft_s == pytest.approx(0.640 + 0.640)
    off = placed(policy(local_prefill=False, bw=1e6).place(req(n=640), view))
    assert off.estimated_ttft_s == pytest.approx(0.640)
    # the trace states it as its own term, and predicted_s is the placement's estimate
    traces: list = []
    pol = GoodputAwarePolicy(
        clock=ManualClock(),
        latency=lat(1e6),
        config=GoodputConfig(local_prefill=False),
        on_decision=traces.append,
    )
    d = placed(pol.place(req(n=640), view))
    t = traces[-1].ttft
    assert t.handoff_s == pytest.approx(0.640) and t.predicted_s == pytest.approx(d.estimated_ttft_s)
    assert "KV handoff 640 ms" in t.describe()


def test_handoff_streamed_leaves_only_the_last_chunk() -> None:
    from router.policy.kv_stream import handoff_after_prefill

    view = ClusterView([snap("p0", P), snap("d0", D)])
    whole = placed(policy(local_prefill=False, bw=1e7, price_handoff=True).place(req(n=2048), view))
    streamed = placed(
        policy(local_prefill=False, bw=1e7, price_handoff=True, handoff_chunk_tokens=256).place(
            req(n=2048), view
        )
    )
    left = handoff_after_prefill(lat(1e7), 2048, 0, 256).streamed_s
    assert whole.estimated_ttft_s == pytest.approx(2.048 + 2048 * 1000 / 1e7)
    assert streamed.estimated_ttft_s == pytest.approx(2.048 + left)
    assert left < 2048 * 1000 / 1e7  # the overlap hides all but the last chunk's transfer


def test_handoff_makes_a_local_prefill_win_over_a_slow_link() -> None:
    # 200 uncached tokens: remote = prefill 0.2 s + handoff 2 s at 100 kB/s; local = its queue
    # (none) + a co-scheduled decode step + 0.2 s, no handoff
    view = ClusterView([snap("p0", P), snap("d0", D, running=1)])
    assert not placed(policy(bw=1e5).place(req(n=200), view)).local_prefill  # unpriced: remote
    assert placed(policy(bw=1e5, price_handoff=True).place(req(n=200), view)).local_prefill
    with pytest.raises(ValueError, match="handoff_chunk_tokens"):
        GoodputConfig(handoff_chunk_tokens=-1)
