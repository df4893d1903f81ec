"""Issue #19, rejections at low load: the admission limit and the decision's TTFT terms (pure,
fake clock, exact arithmetic; no timing).

The bench's diagnosis (``--log-placement-terms``): after the warm-up the TTFT limit was
``2 s x 0.9 / spread``, and the spread (an EWMA of squared upward log errors) had been blown up
by the factor's own convergence from 1 and by single outliers (a 2.4x-slow prefill behind a host
stall; a cold first handoff's 7x TPOT): limits fell to 0.81 s (TTFT) and 65 ms (TPOT) while
lone requests took 0.47-1.84 s and 73-96 ms. These tests pin the fixed behaviour.
"""

from __future__ import annotations

import math

import pytest

from router.policy import (
    SLO,
    ClusterView,
    CorrectionConfig,
    GoodputAwarePolicy,
    GoodputConfig,
    InstanceRole,
    InstanceSnapshot,
    LinearLatency,
    ManualClock,
    Observation,
    OnlineCorrectedLatency,
    Phase,
    Placement,
    Rejection,
    RequestInfo,
)
from router.policy.goodput import DecisionTrace

MS = 1e-3
# a worker's start-up profile, as measured for SmolLM2-135M on one CPU thread of this machine
PROFILE = LinearLatency(
    prefill_base_s=0.061,
    prefill_per_token_s=2.77 * MS,
    prefill_per_token_ctx_s=0.0,
    decode_base_s=0.040,
    decode_per_seq_s=13.8 * MS,
    decode_per_ctx_token_s=0.0,
)


def _view(queued: int = 0) -> ClusterView:
    def s(i: str, role: InstanceRole, q: int = 0) -> InstanceSnapshot:
        return InstanceSnapshot(
            i, role, queued_tokens=q, free_blocks=2048, total_blocks=2048, token_budget=2048, latency=PROFILE
        )

    return ClusterView([s("p0", InstanceRole.PREFILL, queued), s("d0", InstanceRole.DECODE)])


def _req(rid: str, n: int, slo: SLO | None, out: int = 30) -> RequestInfo:
    return RequestInfo(rid, n, slo=slo, predicted_output_tokens=out)


def _warm_up(pol: GoodputAwarePolicy, ratios: list[float], n: int = 422) -> None:
    """Place one request at a time without an SLO (the bench's warm-up) and report each finished
    with a measured TTFT of ``ratio`` x the profile's prediction and a TPOT within it."""
    for i, ratio in enumerate(ratios):
        rid = f"w{i}"
        d = pol.place(_req(rid, n, None), _view())
        assert isinstance(d, Placement) and d.estimated_ttft_s is not None
        base = PROFILE.prefill_time([n])
        pol.on_finished(Observation(rid, ratio * base, PROFILE.decode_time(1, n), 30, num_prompt_tokens=n))


def test_one_outlier_after_calibration_widens_the_limit_by_a_bounded_step() -> None:
    c = OnlineCorrectedLatency(PROFILE, CorrectionConfig())
    for _ in range(5):  # calibrate: the cluster is 1.25x the profile
        c.observe(Phase.TTFT, 1.0, 1.25)
    assert c.spread(Phase.TTFT) == 1.0  # the factor's own convergence is not spread
    c.observe(Phase.TTFT, 1.0, 2.4 * c.factor(Phase.TTFT))  # a prefill behind a host stall
    assert c.spread(Phase.TTFT) == pytest.approx(math.exp(0.1 * 0.9))
    for _ in range(20):  # then as predicted again: the spread decays
        c.observe(Phase.TTFT, 1.0, c.factor(Phase.TTFT))
    assert c.spread(Phase.TTFT) < math.exp(0.09)


def test_a_persistent_slow_tail_still_widens_the_spread_to_its_quantile() -> None:
    """Every 5th request takes 2x, the others 1x: the factor settles near their geometric mean
    (2 ** 0.2) and 20% of the errors lie about ln 2 - 0.14 above it, more than the 10% a 90th
    percentile allows, so the spread climbs to about 2 ** 0.8 (the check keeps its promise)."""
    c = OnlineCorrectedLatency(PROFILE, CorrectionConfig())
    for i in range(300):
        c.observe(Phase.TTFT, 1.0, 2.0 if i % 5 == 0 else 1.0)
    assert 1.4 < c.spread(Phase.TTFT) < 2.0


def test_a_servable_lone_request_is_admitted_after_a_noisy_warm_up() -> None:
    """The bench's scene: warm-up samples 1.14-1.37x the profile and one 2.4x stall; then a lone
    300-token request whose true TTFT (1.3x the profile: 1.16 s) is well within a 2 s SLO. The
    old spread (1.64 here) made the limit 1.10 s against a 1.19 s prediction and refused it; now
    it is admitted, and the trace states the terms and the limit they were compared to."""
    traces: list[DecisionTrace] = []
    pol = GoodputAwarePolicy(clock=ManualClock(), config=GoodputConfig(), on_decision=traces.append)
    _warm_up(pol, [1.33, 1.25, 1.37, 1.19, 1.30, 2.4, 1.28, 1.3])
    assert pol.corrected.spread(Phase.TTFT) < 1.1
    slo = SLO(ttft_s=2.0, tpot_s=0.2)
    d = pol.place(_req("a", 300, slo), _view())
    assert isinstance(d, Placement), d
    t = traces[-1]
    assert t.placed and t.request_id == "a" and t.ttft is not None
    assert t.ttft.predicted_s == pytest.approx(d.estimated_ttft_s)
    # the larger of the learned spread and the 10% margin, not both (GoodputConfig.limit)
    assert t.limit_ttft_s == pytest.approx(2.0 * min(1 / t.quantile_ttft, 0.9))
    assert t.ttft.queue_s == 0.0 and t.ttft.prompt_tokens == 300 and t.ttft.cotenant_s == 0.0
    assert t.ttft.prefill_s == pytest.approx(pol.corrected.factor(Phase.TTFT) * PROFILE.prefill_time([300]))
    # a prompt whose lone prefill exceeds the SLO is still refused, before any compute, and
    # the message says why term by term
    r = pol.place(_req("b", 700, slo), _view())
    assert isinstance(r, Rejection)
    assert "predicted TTFT" in r.message and "prefill on p0" in r.message
    assert (
        "700 of 700 tokens uncached" in r.message
        and "limit = SLO 2000 ms x (1 - priority share 0.00) x min(1 / upper-quantile" in r.message
    )
    assert not traces[-1].placed and traces[-1].rejection == r.message
    assert traces[-1].ttft is not None and traces[-1].ttft.predicted_s > traces[-1].limit_ttft_s


def test_the_trace_counts_the_queue_ahead_and_is_off_by_default() -> None:
    traces: list[DecisionTrace] = []
    pol = GoodputAwarePolicy(clock=ManualClock(), on_decision=traces.append)
    slo = SLO(ttft_s=5.0, tpot_s=1.0)
    d = pol.place(_req("q", 300, slo), _view(queued=400))  # > 256: no local prefill
    assert isinstance(d, Placement)
    terms = traces[-1].ttft
    assert terms is not None and not terms.local_prefill
    assert terms.queue_s == pytest.approx(PROFILE.prefill_time([400]))  # one step of 400 queued tokens
    assert terms.handoff_s > 0  # a remote prefill: the whole KV's handoff after it
    assert terms.queue_s + terms.prefill_s + terms.handoff_s == pytest.approx(d.estimated_ttft_s)
    flat = traces[-1].to_dict()
    assert flat["ttft_queue_s"] == terms.queue_s and flat["predicted_ttft_s"] == terms.predicted_s
    quiet = GoodputAwarePolicy(clock=ManualClock())
    assert quiet.on_decision is None
    assert isinstance(quiet.place(_req("q", 300, slo), _view(queued=400)), Placement)


def test_a_correction_no_sample_confirms_fades_and_admission_recovers() -> None:
    """A busy host made the cluster 3.6x its profile during the warm-up; refused requests bring no
    measurement, so without fading every later request with an SLO was refused for good. After
    ``correction_stale_s`` without a sample the factor decays toward the profile (half-life)."""
    clock = ManualClock()
    pol = GoodputAwarePolicy(clock=clock, config=GoodputConfig())
    _warm_up(pol, [3.6] * 8, n=256)
    assert pol.corrected.factor(Phase.TTFT) == pytest.approx(3.6)
    slo = SLO(ttft_s=2.0, tpot_s=10.0)
    assert isinstance(pol.place(_req("a", 256, slo), _view()), Rejection)
    clock.advance(29.0)  # not stale yet: nothing fades
    assert isinstance(pol.place(_req("b", 256, slo), _view()), Rejection)
    assert pol.corrected.factor(Phase.TTFT) == pytest.approx(3.6)
    clock.advance(1.0 + 3 * 60.0)  # 3 half-lives past stale: 3.6 ** (1 / 8)
    d = pol.place(_req("c", 256, slo), _view())
    assert isinstance(d, Placement)
    assert pol.corrected.factor(Phase.TTFT) == pytest.approx(3.6 ** (1 / 8))
    # a new sample corrects from there (and stamps the phase as confirmed again)
    base = d.estimated_ttft_s / pol.corrected.factor(Phase.TTFT)
    pol.on_finished(Observation("c", 3.6 * base, 0.05, 30, num_prompt_tokens=256))
    f = pol.corrected.factor(Phase.TTFT)
    assert 3.6 ** (1 / 8) < f < 3.6
    clock.advance(10.0)
    pol.place(_req("d", 256, slo), _view())
    assert pol.corrected.factor(Phase.TTFT) == pytest.approx(f)
    with pytest.raises(ValueError):
        GoodputConfig(correction_half_life_s=0.0)
    never = GoodputAwarePolicy(clock=clock, config=GoodputConfig(correction_stale_s=None))
    _warm_up(never, [3.6] * 5, n=256)
    clock.advance(1e4)
    assert isinstance(never.place(_req("e", 256, slo), _view()), Rejection)


def test_cached_prompts_far_below_the_slo_do_not_teach_the_ttft_factor() -> None:
    """The quiet bench run: the first requests of the sweep were the warm-up's prompts, cached
    (predicted ~0.1 s, measured ~0.17 s: per-request overhead, not a slower prefill); learning from
    them made the factor 1.74 and the next uncached 256-token prompts (0.81 s in truth) were refused
    at a predicted 1.37 s. Predictions under a quarter of the TTFT SLO no longer teach the factor;
    predictions near the SLO and requests without an SLO do."""
    slo = SLO(ttft_s=2.0, tpot_s=0.2)
    pol = GoodputAwarePolicy(clock=ManualClock(), config=GoodputConfig())
    for i in range(8):  # cached: 16 uncached tokens, 1.7x the profile's (tiny) prediction
        d = pol.place(_req(f"c{i}", 16, slo), _view())
        assert isinstance(d, Placement)
        base = PROFILE.prefill_time([16])
        pol.on_finished(
            Observation(f"c{i}", 1.7 * base, PROFILE.decode_time(1, 16), 30, num_prompt_tokens=16)
        )
    assert pol.corrected.factor(Phase.TTFT) == 1.0 and pol.corrected.samples(Phase.TTFT) == 0
    d = pol.place(_req("long", 256, slo), _view())  # 0.77 s predicted: admitted
    assert isinstance(d, Placement)
    base = PROFILE.prefill_time([256])
    pol.on_finished(Observation("long", 1.1 * base, PROFILE.decode_time(1, 256), 30, num_prompt_tokens=256))
    assert pol.corrected.samples(Phase.TTFT) == 1 and pol.corrected.factor(Phase.TTFT) == pytest.approx(1.1)
    _warm_up(pol, [1.1], n=16)  # no SLO: always teaches
    assert pol.corrected.samples(Phase.TTFT) == 2
    with pytest.raises(ValueError, match="ttft_learn_min_share"):
        GoodputConfig(ttft_learn_min_share=1.0)


def test_short_outputs_do_not_teach_the_tpot_factor() -> None:
    """A request's measured TPOT includes its first decode step, which waits for the KV handoff:
    over a few tokens that one-off cost dominates. Only outputs of ``tpot_learn_min_tokens`` or
    more teach the TPOT correction."""
    pol = GoodputAwarePolicy(clock=ManualClock(), config=GoodputConfig(tpot_learn_min_tokens=8))
    tpot = PROFILE.decode_time(1, 100)
    for i, n_out in enumerate((2, 4, 7)):  # 3x slow: the handoff in one of few intervals
        assert isinstance(pol.place(_req(f"s{i}", 100, None, out=n_out), _view()), Placement)
        pol.on_finished(
            Observation(f"s{i}", PROFILE.prefill_time([100]), 3 * tpot, n_out, num_prompt_tokens=100)
        )
    assert pol.corrected.samples(Phase.TPOT) == 0 and pol.corrected.factor(Phase.TPOT) == 1.0
    assert isinstance(pol.place(_req("long", 100, None, out=30), _view()), Placement)
    pol.on_finished(Observation("long", PROFILE.prefill_time([100]), 1.2 * tpot, 30, num_prompt_tokens=100))
    assert pol.corrected.samples(Phase.TPOT) == 1
    with pytest.raises(ValueError, match="tpot_learn_min_tokens"):
        GoodputConfig(tpot_learn_min_tokens=1)
