"""pdserve.metrics: label derivation, the router/worker/store metric objects, naming, /metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, Metric

from kv_store.disk_metrics import register_disk_metrics
from kv_store.disk_tier import DiskTierStats
from kv_store.handle import BlockLocation
from kv_store.layout import KVLayout
from kv_store.node import NodeStats
from kv_store.store import StoreStats
from pdserve import metrics as M
from pdserve.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    LayoutMismatchError,
    ModelNotFoundError,
    PermissionDeniedError,
    RequestNotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


# ---------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize(
    ("ttft", "tpot", "cls"),
    [
        (0.0, 0.0, "default"),
        (-1.0, 0.0, "default"),
        (float("inf"), float("nan"), "default"),
        (0.5, 0.0, "interactive"),
        (0.0, 0.05, "interactive"),
        (30.0, 0.01, "interactive"),  # the tightest target decides
        (0.51, 0.0, "standard"),
        (5.0, 1.0, "standard"),
        (0.0, 0.2, "standard"),
        (5.01, 0.0, "batch"),
        (60.0, 0.21, "batch"),
    ],
)
def test_slo_class_is_bounded_and_picks_tightest_target(ttft, tpot, cls):
    assert M.slo_class(ttft, tpot) == cls
    assert cls in M.SLO_CLASSES


def test_slo_met_checks_only_the_targets_that_are_set():
    assert M.slo_met(0, 0, 100.0, 100.0)
    assert M.slo_met(1.0, 0, 1.0, 9.0)
    assert not M.slo_met(1.0, 0, 1.01, 0.0)
    assert M.slo_met(0, 0.05, 99.0, 0.05)
    assert not M.slo_met(0, 0.05, 0.1, 0.051)
    assert M.slo_met(0.5, 0.05, 0.4, None)  # one token: no TPOT to miss


def test_tpot_is_mean_gap_after_first_token():
    assert M.tpot_of([]) is None
    assert M.tpot_of([0.3]) is None
    assert M.tpot_of([0.3, 0.4, 0.6]) == pytest.approx(0.15)


class _RpcErr(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "x"

    def trailing_metadata(self):
        return ()


@pytest.mark.parametrize(
    ("exc", "outcome"),
    [
        (None, "ok"),
        (ResourceExhaustedError("full", retry_after_s=1.0), "rejected"),
        (UnavailableError("no worker"), "rejected"),
        (InvalidRequestError("bad"), "invalid"),
        (ModelNotFoundError("no model"), "invalid"),
        (LayoutMismatchError("layout"), "invalid"),
        (UnauthenticatedError("no key"), "invalid"),
        (PermissionDeniedError("not yours"), "invalid"),
        (AlreadyExistsError("id in flight"), "invalid"),
        (CancelledError("gone"), "cancelled"),
        (GeneratorExit(), "cancelled"),
        (DeadlineExceededError("late"), "timeout"),
        (InternalError("bug"), "error"),
        (RuntimeError("bug"), "error"),
        (_RpcErr(grpc.StatusCode.RESOURCE_EXHAUSTED), "rejected"),
        (_RpcErr(grpc.StatusCode.UNIMPLEMENTED), "error"),
    ],
)
def test_outcome_for_maps_statuses_to_bounded_labels(exc, outcome):
    assert M.outcome_for(exc) == outcome
    assert outcome in M.OUTCOMES


# ---------------------------------------------------------------------------- router
def _finished(ttft=0.2, times=(0.2, 0.3, 0.4), prompt=40, cached=32, out=3) -> M.FinishedRequest:
    return M.FinishedRequest(
        ttft_s=ttft,
        e2e_s=times[-1],
        token_times_s=list(times),
        phases={"queue": 0.01, "prefill": 0.15, "transfer": 0.02, "decode": 0.2},
        prompt_tokens=prompt,
        cached_prompt_tokens=cached,
        completion_tokens=out,
    )


def test_router_series_exist_before_any_request():
    reg = CollectorRegistry()
    M.RouterMetrics(reg)
    for cls in M.SLO_CLASSES:
        for o in M.OUTCOMES:
            assert value(reg, "pdserve_router_requests_total", slo_class=cls, outcome=o) == 0
        for res in ("met", "missed"):
            assert value(reg, "pdserve_router_slo_requests_total", slo_class=cls, result=res) == 0
        for p in M.PHASES:
            assert value(reg, "pdserve_request_phase_seconds_count", phase=p, slo_class=cls) == 0


def test_router_observe_finished_records_latencies_phases_tokens_and_slo():
    reg = CollectorRegistry()
    m = M.RouterMetrics(reg)
    assert m.observe_finished("interactive", 0.5, 0.2, _finished())
    assert not m.observe_finished("interactive", 0.1, 0.0, _finished(ttft=0.2))  # TTFT missed
    assert not m.observe_finished("interactive", 0.0, 0.05, _finished())  # TPOT 0.1 > 0.05
    assert value(reg, "pdserve_router_requests_total", slo_class="interactive", outcome="ok") == 3
    assert value(reg, "pdserve_router_slo_requests_total", slo_class="interactive", result="met") == 1
    assert value(reg, "pdserve_router_slo_requests_total", slo_class="interactive", result="missed") == 2
    assert value(reg, "pdserve_router_ttft_seconds_count", slo_class="interactive") == 3
    assert value(reg, "pdserve_router_ttft_seconds_sum", slo_class="interactive") == pytest.approx(0.6)
    assert value(reg, "pdserve_router_ttft_seconds_bucket", slo_class="interactive", le="0.25") == 3
    assert value(reg, "pdserve_router_tpot_seconds_sum", slo_class="interactive") == pytest.approx(0.3)
    assert value(reg, "pdserve_router_e2e_seconds_sum", slo_class="interactive") == pytest.approx(1.2)
    assert value(
        reg, "pdserve_request_phase_seconds_sum", phase="prefill", slo_class="interactive"
    ) == pytest.approx(0.45)
    assert value(reg, "pdserve_router_prompt_tokens_total") == 120
    assert value(reg, "pdserve_router_prefix_hit_tokens_total") == 96
    assert value(reg, "pdserve_router_generation_tokens_total") == 9
    # other classes untouched
    assert value(reg, "pdserve_router_requests_total", slo_class="default", outcome="ok") == 0


def test_inter_token_gaps_are_observed_one_by_one():
    reg = CollectorRegistry()
    m = M.RouterMetrics(reg)
    m.observe_finished("batch", 0, 0, _finished(times=(0.2, 0.21, 0.21, 0.9)))  # a stall, a 2-token message
    assert value(reg, "pdserve_router_inter_token_seconds_count", slo_class="batch") == 3
    assert value(reg, "pdserve_router_inter_token_seconds_sum", slo_class="batch") == pytest.approx(0.7)
    assert value(reg, "pdserve_router_inter_token_seconds_bucket", slo_class="batch", le="0.01") == 2
    assert value(reg, "pdserve_router_inter_token_seconds_bucket", slo_class="batch", le="0.5") == 2
    # the mean hides the stall: TPOT is one sample of 0.7 / 3
    assert value(reg, "pdserve_router_tpot_seconds_sum", slo_class="batch") == pytest.approx(0.7 / 3)


def test_single_token_request_has_no_tpot_sample():
    reg = CollectorRegistry()
    M.RouterMetrics(reg).observe_finished("default", 0, 0, _finished(times=(0.2,), out=1))
    assert value(reg, "pdserve_router_tpot_seconds_count", slo_class="default") == 0
    assert value(reg, "pdserve_router_inter_token_seconds_count", slo_class="default") == 0
    assert value(reg, "pdserve_router_slo_requests_total", slo_class="default", result="met") == 1


@pytest.mark.parametrize(
    ("outcome", "missed"),
    [("rejected", 1), ("timeout", 1), ("error", 1), ("invalid", 0), ("cancelled", 0)],
)
def test_failed_requests_count_against_the_slo_only_when_the_server_failed(outcome, missed):
    reg = CollectorRegistry()
    M.RouterMetrics(reg).observe_failed("standard", outcome)
    assert value(reg, "pdserve_router_requests_total", slo_class="standard", outcome=outcome) == 1
    assert value(reg, "pdserve_router_slo_requests_total", slo_class="standard", result="missed") == missed
    assert value(reg, "pdserve_router_slo_requests_total", slo_class="standard", result="met") == 0


def test_router_workers_gauge_is_read_at_scrape_time():
    reg = CollectorRegistry()
    counts = {"prefill": 1, "decode": 2}
    M.RouterMetrics(reg).track_workers(lambda: counts)
    assert value(reg, "pdserve_router_workers", role="decode") == 2
    counts["decode"] = 0
    assert value(reg, "pdserve_router_workers", role="decode") == 0


def test_components_in_separate_registries_do_not_collide():
    regs = [CollectorRegistry(), CollectorRegistry()]
    a, b = (M.RouterMetrics(r) for r in regs)
    a.observe_failed("default", "rejected")
    assert value(regs[0], "pdserve_router_requests_total", slo_class="default", outcome="rejected") == 1
    assert value(regs[1], "pdserve_router_requests_total", slo_class="default", outcome="rejected") == 0
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        M.RouterMetrics(regs[0])  # one component per registry


# ---------------------------------------------------------------------------- workers
def _snap(**kw: object) -> M.WorkerSnapshot:
    base = dict(
        running=3,
        waiting=2,
        kv_blocks_total=100,
        kv_blocks_used=40,
        kv_blocks_cached=25,
        token_budget=2048,
        prefill_tokens_computed=500,
        prefill_tokens_reused=300,
        decode_tokens=70,
        preemptions=1,
        requests_finished=9,
        prefix_query_tokens=800,
        prefix_hit_tokens=300,
        prefix_evictions=4,
    )
    base.update(kw)
    return M.WorkerSnapshot(**base)


def test_worker_metrics_from_snapshot_and_steps():
    reg = CollectorRegistry()
    m = M.WorkerMetrics(reg, "decode-7", "decode", snapshot=_snap)
    m.observe_step(0.02, 16)
    m.observe_step(0.04, 2048)
    w = {"worker_id": "decode-7", "role": "decode"}
    assert value(reg, "pdserve_worker_running_requests", **w) == 3
    assert value(reg, "pdserve_worker_waiting_requests", **w) == 2
    assert value(reg, "pdserve_worker_kv_blocks", state="used", **w) == 40
    assert value(reg, "pdserve_worker_kv_blocks", state="free", **w) == 60
    assert value(reg, "pdserve_worker_kv_blocks", state="cached", **w) == 25
    assert value(reg, "pdserve_worker_kv_capacity_blocks", **w) == 100
    assert value(reg, "pdserve_worker_token_budget_tokens", **w) == 2048
    assert value(reg, "pdserve_worker_prefill_tokens_total", source="computed", **w) == 500
    assert value(reg, "pdserve_worker_prefill_tokens_total", source="reused", **w) == 300
    assert value(reg, "pdserve_worker_decode_tokens_total", **w) == 70
    assert value(reg, "pdserve_worker_preemptions_total", **w) == 1
    assert value(reg, "pdserve_worker_requests_finished_total", **w) == 9
    assert value(reg, "pdserve_worker_prefix_cache_queries_total", **w) == 800
    assert value(reg, "pdserve_worker_prefix_cache_hits_total", **w) == 300
    assert value(reg, "pdserve_worker_prefix_cache_evictions_total", **w) == 4
    assert value(reg, "pdserve_worker_step_seconds_count", **w) == 2
    assert value(reg, "pdserve_worker_step_seconds_sum", **w) == pytest.approx(0.06)
    assert value(reg, "pdserve_worker_step_tokens_sum", **w) == 2064
    assert value(reg, "pdserve_worker_step_tokens_bucket", le="16.0", **w) == 1


def test_worker_swap_metrics():
    reg = CollectorRegistry()
    swap = dict(swapped_requests=2, swap_outs=5, swap_ins=3, swapped_out_blocks=40, swapped_in_blocks=24)
    M.WorkerMetrics(
        reg, "decode-1", "decode", snapshot=lambda: _snap(**swap, host_blocks_total=64, host_blocks_used=16)
    )
    w = {"worker_id": "decode-1", "role": "decode"}
    assert value(reg, "pdserve_worker_swapped_requests", **w) == 2
    assert value(reg, "pdserve_worker_swaps_total", direction="out", **w) == 5
    assert value(reg, "pdserve_worker_swaps_total", direction="in", **w) == 3
    assert value(reg, "pdserve_worker_swapped_blocks_total", direction="out", **w) == 40
    assert value(reg, "pdserve_worker_swapped_blocks_total", direction="in", **w) == 24
    assert value(reg, "pdserve_worker_host_kv_blocks", state="used", **w) == 16
    assert value(reg, "pdserve_worker_host_kv_blocks", state="free", **w) == 48


def test_worker_snapshot_failure_serves_last_good_values():
    reg = CollectorRegistry()
    calls = {"n": 0}

    def snap() -> M.WorkerSnapshot:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TimeoutError("engine busy")
        if calls["n"] == 2:
            return _snap(running=5)
        raise TimeoutError("engine busy")

    M.WorkerMetrics(reg, "p0", "prefill", snapshot=snap)
    w = {"worker_id": "p0", "role": "prefill"}
    assert value(reg, "pdserve_worker_running_requests", **w) is None  # nothing good yet
    assert value(reg, "pdserve_worker_running_requests", **w) == 5
    assert value(reg, "pdserve_worker_running_requests", **w) == 5  # stale but served


# ---------------------------------------------------------------------------- worker KV pulls
@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (UnavailableError("store node kv0 unreachable"), "unavailable"),
        (RequestNotFoundError("2 blocks not stored on kv0"), "not_found"),
        (DeadlineExceededError("pull took too long"), "timeout"),
        (InvalidRequestError("bad block size"), "error"),
        (RuntimeError("bug"), "error"),
        (_RpcErr(grpc.StatusCode.UNAVAILABLE), "unavailable"),
    ],
)
def test_pull_failure_reason_is_bounded(exc, reason):
    assert M.pull_failure_reason(exc) == reason
    assert reason in M.PULL_FAILURE_REASONS


def test_kv_pull_series_exist_before_any_pull():
    reg = CollectorRegistry()
    M.KVPullMetrics(reg, "decode-3")
    w = {"worker_id": "decode-3", "role": "decode"}
    for t in M.TRANSPORTS:
        assert value(reg, "pdserve_worker_kv_pull_seconds_count", transport=t, **w) == 0
        for r in M.PULL_FAILURE_REASONS:
            want = None if (t, r) == ("grpc", "shm_fallback") else 0  # gRPC has nothing to fall back from
            assert value(reg, "pdserve_worker_kv_pull_failures_total", transport=t, reason=r, **w) == want


def test_kv_pull_times_every_pull_and_counts_failures_and_fallbacks():
    reg = CollectorRegistry()
    m = M.KVPullMetrics(reg, "decode-3")
    with m.pull("shm"):
        pass
    with pytest.raises(UnavailableError), m.pull("grpc"):
        raise UnavailableError("store node unreachable")
    with pytest.raises(GeneratorExit), m.pull("grpc"):
        raise GeneratorExit
    m.count_shm_fallbacks(2)
    m.count_shm_fallbacks(0)
    w = {"worker_id": "decode-3", "role": "decode"}
    assert value(reg, "pdserve_worker_kv_pull_seconds_count", transport="shm", **w) == 1
    assert value(reg, "pdserve_worker_kv_pull_seconds_count", transport="grpc", **w) == 1  # failed one too
    assert (
        value(reg, "pdserve_worker_kv_pull_failures_total", transport="grpc", reason="unavailable", **w) == 1
    )
    assert (
        value(reg, "pdserve_worker_kv_pull_failures_total", transport="shm", reason="shm_fallback", **w) == 2
    )
    assert value(reg, "pdserve_worker_kv_pull_failures_total", transport="grpc", reason="error", **w) == 0


def test_kv_pull_metrics_of_two_workers_share_one_registry():
    reg = CollectorRegistry()
    a, b = M.KVPullMetrics(reg, "decode-0"), M.KVPullMetrics(reg, "decode-1")
    a.count_shm_fallbacks(1)
    with b.pull("grpc"):
        pass
    g = reg.get_sample_value
    fb = {"transport": "shm", "reason": "shm_fallback", "role": "decode"}
    assert g("pdserve_worker_kv_pull_failures_total", {**fb, "worker_id": "decode-0"}) == 1
    assert g("pdserve_worker_kv_pull_failures_total", {**fb, "worker_id": "decode-1"}) == 0
    assert (
        g(
            "pdserve_worker_kv_pull_seconds_count",
            {"worker_id": "decode-1", "role": "decode", "transport": "grpc"},
        )
        == 1
    )
    assert (
        g(
            "pdserve_worker_kv_pull_seconds_count",
            {"worker_id": "decode-0", "role": "decode", "transport": "grpc"},
        )
        == 0
    )


# ---------------------------------------------------------------------------- store
def test_store_transfer_counts_success_failure_and_ignores_generator_exit():
    reg = CollectorRegistry()
    m = M.StoreMetrics(reg, "kv9")
    with m.transfer("grpc", "put", "in") as t:
        t.add(3, 3 * 1024)
    with pytest.raises(RuntimeError), m.transfer("shm", "lease", "out") as t:
        t.add(2, 2048)
        raise RuntimeError("missing block")
    with pytest.raises(GeneratorExit), m.transfer("grpc", "get", "out"):
        raise GeneratorExit
    n = {"node_id": "kv9"}
    assert value(reg, "pdserve_kv_transfer_bytes_total", transport="grpc", direction="in", **n) == 3072
    assert value(reg, "pdserve_kv_transfer_blocks_total", transport="grpc", direction="in", **n) == 3
    assert value(reg, "pdserve_kv_transfer_bytes_total", transport="shm", direction="out", **n) == 0
    assert value(reg, "pdserve_kv_transfer_failures_total", transport="shm", op="lease", **n) == 1
    assert value(reg, "pdserve_kv_transfer_seconds_count", transport="shm", op="lease", **n) == 1
    assert value(reg, "pdserve_kv_transfer_seconds_count", transport="grpc", op="put", **n) == 1
    assert value(reg, "pdserve_kv_transfer_seconds_count", transport="grpc", op="get", **n) == 0
    assert value(reg, "pdserve_kv_transfer_failures_total", transport="grpc", op="get", **n) == 0


def test_store_node_stats_and_lookups():
    reg = CollectorRegistry()
    stats = NodeStats(
        capacity_blocks=64,
        num_blocks=10,
        num_pending=1,
        num_pinned=4,
        bytes_used=10 * 512,
        capacity_bytes=64 * 512,
        num_leases=2,
        evictions=7,
        expired_leases=1,
        hits=30,
        misses=3,
        puts=12,
        put_dedups=2,
    )
    m = M.StoreMetrics(reg, "kv1")
    n = {"node_id": "kv1"}
    assert value(reg, "pdserve_kv_capacity_blocks", **n) is None  # no node yet
    m.set_stats_source(lambda: stats)
    m.observe_lookup(8, 5)
    assert value(reg, "pdserve_kv_capacity_blocks", **n) == 64
    assert value(reg, "pdserve_kv_capacity_bytes", **n) == 64 * 512
    assert value(reg, "pdserve_kv_used_bytes", **n) == 5120
    assert value(reg, "pdserve_kv_blocks", state="stored", **n) == 10
    assert value(reg, "pdserve_kv_blocks", state="pinned", **n) == 4
    assert value(reg, "pdserve_kv_blocks", state="pending", **n) == 1
    assert value(reg, "pdserve_kv_leases", **n) == 2
    assert value(reg, "pdserve_kv_evictions_total", **n) == 7
    assert value(reg, "pdserve_kv_expired_leases_total", **n) == 1
    assert value(reg, "pdserve_kv_puts_total", **n) == 12
    assert value(reg, "pdserve_kv_put_dedups_total", **n) == 2
    assert value(reg, "pdserve_kv_block_reads_total", result="hit", **n) == 30
    assert value(reg, "pdserve_kv_block_reads_total", result="miss", **n) == 3
    assert value(reg, "pdserve_kv_lookup_blocks_total", result="hit", **n) == 5
    assert value(reg, "pdserve_kv_lookup_blocks_total", result="miss", **n) == 3


# ---------------------------------------------------------------------------- conventions
ALLOWED_LABELS = {"slo_class", "outcome", "result", "phase", "role", "worker_id", "state", "source"}
ALLOWED_LABELS |= {"node_id", "transport", "direction", "op", "le", "reason"}
# per LoRA adapter (#16): bounded by the adapters a worker serves (its flags, the cluster config,
# operators' admin loads), never by what a request names (an unserved adapter is refused first)
ALLOWED_LABELS |= {"adapter", "tier"}


def all_families() -> list[Metric]:
    reg = CollectorRegistry()
    rm = M.RouterMetrics(reg)
    rm.track_workers(lambda: {"prefill": 1, "decode": 1})
    rm.observe_adapter("sql", "ok", rec=_finished(times=(0.2,), out=1))  # the router's per-adapter families
    adapter = M.AdapterSnapshot("sql", 10, 5, 1, 1, True, True)  # the per-adapter families have samples
    M.WorkerMetrics(reg, "w", "decode", snapshot=lambda: _snap(adapters=(adapter,)))
    M.KVPullMetrics(reg, "w")
    node = NodeStats(1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0)
    M.StoreMetrics(reg, "kv", stats=lambda: node)
    # a store node's disk tier (kv_store/disk_metrics.py, #15): only on nodes run with --disk-tier
    layout = KVLayout("m", 1, 1, 1, "float32", 1)
    disk = StoreStats(BlockLocation("kv"), layout, node, DiskTierStats.empty(1))
    register_disk_metrics(reg, "kv", lambda: disk)
    return list(reg.collect())


def test_naming_conventions_and_bounded_labels():
    fams = all_families()
    assert len(fams) >= 40
    for f in fams:
        assert f.name.startswith("pdserve_"), f.name
        names = {s.name for s in f.samples}
        if f.type == "counter":
            assert names == {f.name + "_total"}, f.name
        if f.type == "gauge":
            assert not f.name.endswith("_total"), f.name
        if f.type == "histogram":
            assert f.name.endswith(("_seconds", "_tokens")), f.name
        for s in f.samples:
            assert set(s.labels) <= ALLOWED_LABELS, (f.name, s.labels)
            assert not s.name.endswith("_created"), s.name


def test_metric_names_are_unique_across_components():
    names = [f.name for f in all_families()]
    assert len(names) == len(set(names))


def test_serve_metrics_binds_loopback_on_a_free_port():
    reg = CollectorRegistry()
    M.RouterMetrics(reg).observe_failed("batch", "rejected")
    port = M.serve_metrics(0, registry=reg)
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert 'pdserve_router_requests_total{outcome="rejected",slo_class="batch"} 1.0' in body


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_dashboards_and_alerts_reference_only_exported_series():
    """Every ``pdserve_*`` series named in a Grafana dashboard or an alert rule is exported here
    (a renamed metric would otherwise leave a silently empty panel or a dead alert)."""
    fams = all_families()
    exported = {s.name for f in fams for s in f.samples}
    files = [
        *sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")),
        DEPLOY / "prometheus" / "alerts.yml",
    ]
    assert len(files) >= 5
    for path in files:
        referenced = set(re.findall(r"\bpdserve_[a-z0-9_]+", path.read_text()))
        assert referenced, path
        assert referenced <= exported, f"{path.name}: unknown series {sorted(referenced - exported)}"


def test_file_sd_file_lists_one_labelled_group_per_process(tmp_path):
    targets = [
        M.ScrapeTarget("router", M.Component.ROUTER, "127.0.0.1:9100"),
        M.ScrapeTarget("decode-0", M.Component.DECODE, "127.0.0.1:9102"),
        M.ScrapeTarget("store", M.Component.KV_STORE, "127.0.0.1:9103"),
    ]
    path = M.write_file_sd(tmp_path / "pdserve.json", targets)
    assert json.loads(path.read_text()) == [
        {"targets": ["127.0.0.1:9102"], "labels": {"component": "decode", "process": "decode-0"}},
        {"targets": ["127.0.0.1:9100"], "labels": {"component": "router", "process": "router"}},
        {"targets": ["127.0.0.1:9103"], "labels": {"component": "kv_store", "process": "store"}},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["pdserve.json"]  # no temporary file left
    M.write_file_sd(path, targets[:1])  # replaced, not appended
    assert len(json.loads(path.read_text())) == 1
    with pytest.raises(InvalidRequestError, match="duplicate"):
        M.file_sd_groups([targets[0], targets[0]])
