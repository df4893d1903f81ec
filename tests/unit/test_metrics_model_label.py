"""The router's ``model`` label: present only on a router serving several models, bounded to them."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pdserve.metrics import OUTCOMES, SLO_CLASSES, FinishedRequest, RouterMetrics

REC = FinishedRequest(
    ttft_s=0.2,
    e2e_s=1.0,
    token_times_s=[0.2, 0.3, 0.5],
    phases={"queue": 0.01, "prefill": 0.1, "transfer": 0.02, "decode": 0.8},
    prompt_tokens=10,
    cached_prompt_tokens=4,
    completion_tokens=3,
)


def _label_names(reg: CollectorRegistry, family: str) -> set[str]:
    return {k for fam in reg.collect() if fam.name == family for s in fam.samples for k in s.labels}


def test_one_model_has_no_model_label() -> None:
    for models in ((), ("only",)):
        reg = CollectorRegistry()
        m = RouterMetrics(reg, models)
        assert m.observe_finished("default", 0.0, 0.0, REC, "only")
        m.observe_failed("default", "error", "only")
        assert _label_names(reg, "pdserve_router_requests") == {"slo_class", "outcome"}
        assert reg.get_sample_value("pdserve_router_generation_tokens_total") == 3
        assert (
            reg.get_sample_value("pdserve_router_requests_total", {"slo_class": "default", "outcome": "ok"})
            == 1
        )


def test_several_models_label_every_request_family_and_stay_bounded() -> None:
    reg = CollectorRegistry()
    m = RouterMetrics(reg, ["A", "B"])
    # every series exists from the start, per model (dashboards see zeros, not gaps)
    for model in ("A", "B"):
        for c in SLO_CLASSES:
            for o in OUTCOMES:
                v = reg.get_sample_value(
                    "pdserve_router_requests_total", {"slo_class": c, "outcome": o, "model": model}
                )
                assert v == 0
        assert reg.get_sample_value("pdserve_router_prompt_tokens_total", {"model": model}) == 0
    assert not m.observe_finished("interactive", 0.1, 0.0, REC, "B")  # TTFT 0.2 > 0.1: missed
    m.observe_failed("default", "invalid")  # reached no model
    lab = {"slo_class": "interactive", "model": "B"}
    assert reg.get_sample_value("pdserve_router_requests_total", {**lab, "outcome": "ok"}) == 1
    assert reg.get_sample_value("pdserve_router_slo_requests_total", {**lab, "result": "missed"}) == 1
    assert reg.get_sample_value("pdserve_router_ttft_seconds_count", lab) == 1
    assert reg.get_sample_value("pdserve_router_inter_token_seconds_count", lab) == 2
    assert reg.get_sample_value("pdserve_request_phase_seconds_count", {**lab, "phase": "decode"}) == 1
    assert reg.get_sample_value("pdserve_router_prefix_hit_tokens_total", {"model": "B"}) == 4
    assert reg.get_sample_value("pdserve_router_generation_tokens_total", {"model": "A"}) == 0
    assert (
        reg.get_sample_value(
            "pdserve_router_requests_total", {"slo_class": "default", "outcome": "invalid", "model": ""}
        )
        == 1
    )
    for fam in ("pdserve_router_ttft_seconds", "pdserve_router_e2e_seconds", "pdserve_router_tpot_seconds"):
        assert "model" in _label_names(reg, fam)
    with pytest.raises(ValueError, match="'C' is not one of this router's models"):
        m.observe_finished("default", 0.0, 0.0, REC, "C")
    with pytest.raises(ValueError, match="repeated model ids"):
        RouterMetrics(CollectorRegistry(), ["A", "A"])
