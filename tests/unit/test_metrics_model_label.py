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


def test_one_model_keeps_the_unlabelled_workers_inflight_redispatch_and_migration_series() -> None:
    reg = CollectorRegistry()
    m = RouterMetrics(reg, ("only",))
    m.track_workers(lambda: {"prefill": 1, "decode": 2})
    m.inflight_of("only").inc()
    m.observe_redispatch("decode", "only")
    m.observe_migration("drain", "migrated", 5, "only")
    m.observe_migration_downtime(0.02, "only")
    assert reg.get_sample_value("pdserve_router_workers", {"role": "decode"}) == 2
    assert reg.get_sample_value("pdserve_router_inflight_requests") == 1
    assert reg.get_sample_value("pdserve_router_redispatches_total", {"phase": "decode"}) == 1
    assert (
        reg.get_sample_value("pdserve_router_migrations_total", {"reason": "drain", "result": "migrated"})
        == 1
    )
    assert reg.get_sample_value("pdserve_router_migration_blocks_copied_total") == 5
    assert reg.get_sample_value("pdserve_router_migration_downtime_seconds_count") == 1
    for fam in (
        "pdserve_router_workers",
        "pdserve_router_inflight_requests",
        "pdserve_router_redispatches",
        "pdserve_router_migrations",
        "pdserve_router_migration_blocks_copied",
        "pdserve_router_migration_downtime_seconds",
    ):
        assert "model" not in _label_names(reg, fam), fam
    with pytest.raises(ValueError, match="track_workers"):
        m.track_model_workers(lambda: {})


def test_several_models_label_workers_inflight_redispatch_and_migration_series() -> None:
    reg = CollectorRegistry()
    m = RouterMetrics(reg, ["A", "B"])
    # every series exists from the start, per model
    for model in ("A", "B"):
        lab = {"model": model}
        assert reg.get_sample_value("pdserve_router_inflight_requests", lab) == 0
        assert reg.get_sample_value("pdserve_router_redispatches_total", {**lab, "phase": "kv"}) == 0
        assert (
            reg.get_sample_value(
                "pdserve_router_migrations_total", {**lab, "reason": "load_balance", "result": "dest_full"}
            )
            == 0
        )
        assert reg.get_sample_value("pdserve_router_migration_blocks_copied_total", lab) == 0
        assert reg.get_sample_value("pdserve_router_migration_downtime_seconds_count", lab) == 0
    m.inflight_of("B").inc()
    m.inflight_of("B").inc()
    m.inflight_of("B").dec()
    m.observe_redispatch("prefill", "A")
    m.observe_migration("drain", "migrated", 7, "B")
    m.observe_migration("drain", "dest_full", 3, "A")  # not moved: no blocks counted
    m.observe_migration_downtime(0.01, "B")
    assert reg.get_sample_value("pdserve_router_inflight_requests", {"model": "B"}) == 1
    assert reg.get_sample_value("pdserve_router_inflight_requests", {"model": "A"}) == 0
    assert reg.get_sample_value("pdserve_router_redispatches_total", {"phase": "prefill", "model": "A"}) == 1
    assert reg.get_sample_value("pdserve_router_redispatches_total", {"phase": "prefill", "model": "B"}) == 0
    mig = {"reason": "drain", "result": "migrated"}
    assert reg.get_sample_value("pdserve_router_migrations_total", {**mig, "model": "B"}) == 1
    assert reg.get_sample_value("pdserve_router_migrations_total", {**mig, "model": "A"}) == 0
    assert reg.get_sample_value("pdserve_router_migration_blocks_copied_total", {"model": "B"}) == 7
    assert reg.get_sample_value("pdserve_router_migration_blocks_copied_total", {"model": "A"}) == 0
    assert reg.get_sample_value("pdserve_router_migration_downtime_seconds_count", {"model": "B"}) == 1
    # bounded: another model, or an unknown phase, is refused
    for bad in (
        lambda: m.inflight_of("C"),
        lambda: m.observe_redispatch("decode", "C"),
        lambda: m.observe_migration("drain", "migrated", 1, "C"),
        lambda: m.observe_migration_downtime(0.1, "C"),
    ):
        with pytest.raises(ValueError, match="'C' is not one of this router's models"):
            bad()
    with pytest.raises(ValueError, match="unknown re-dispatch phase"):
        m.observe_redispatch("queue", "A")
    # workers by role and model, read at scrape time; only the served models are exported
    counts = {"A": {"prefill": 1, "decode": 2}, "B": {"prefill": 0, "decode": 1}, "C": {"decode": 9}}
    with pytest.raises(ValueError, match="track_model_workers"):
        m.track_workers(lambda: {"prefill": 1})
    m.track_model_workers(lambda: counts)
    assert reg.get_sample_value("pdserve_router_workers", {"role": "decode", "model": "A"}) == 2
    assert reg.get_sample_value("pdserve_router_workers", {"role": "decode", "model": "B"}) == 1
    counts["B"]["decode"] = 3
    assert reg.get_sample_value("pdserve_router_workers", {"role": "decode", "model": "B"}) == 3
    assert reg.get_sample_value("pdserve_router_workers", {"role": "decode", "model": "C"}) is None


def test_model_dispatcher_exports_each_models_workers() -> None:
    """router.multi_model.ModelDispatcher.track_gauges: the workers gauge counts each model's
    live workers under its own label (fake servicers: what the dispatcher reads of them)."""
    from types import SimpleNamespace

    from router.multi_model import ModelDispatcher
    from router.registry import Registry, WorkerKind, WorkerLoad

    registry = Registry(heartbeat_timeout_s=1e9)
    load = WorkerLoad(0, 0, 64, 0, block_size=16)
    for wid, kind, model in (
        ("pa", WorkerKind.PREFILL, "A"),
        ("da0", WorkerKind.DECODE, "A"),
        ("da1", WorkerKind.DECODE, "A"),
        ("db", WorkerKind.DECODE, "B"),
    ):
        registry.register(wid, kind, f"addr-{wid}", model, load)
    reg = CollectorRegistry()
    metrics = RouterMetrics(reg, ["A", "B"])
    prober = SimpleNamespace(counts=lambda: {"prefill": 0, "decode": 1})
    svcs = {
        mid: SimpleNamespace(
            config=SimpleNamespace(model_id=mid), prober=prober, registry=registry, edge=None, metrics=metrics
        )
        for mid in ("A", "B")
    }
    ModelDispatcher(svcs).track_gauges()  # type: ignore[arg-type]
    got = {
        (s.labels["model"], s.labels["role"]): s.value
        for fam in reg.collect()
        if fam.name == "pdserve_router_workers"
        for s in fam.samples
    }
    assert got == {("A", "prefill"): 1, ("A", "decode"): 2, ("B", "prefill"): 0, ("B", "decode"): 1}
    assert reg.get_sample_value("pdserve_router_quarantined_workers", {"role": "decode"}) == 1
