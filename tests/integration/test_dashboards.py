"""Dashboards and alert rules against live data: the embedded cluster (real SmolLM2-135M) scraped
by a real Prometheus (Debian package) on 127.0.0.1.

The module starts the cluster, writes its file_sd target file, runs ``prometheus`` with the
shipped deploy/prometheus/prometheus.yml (intervals shortened to 1 s, paths made absolute, the
shipped alerts.yml loaded), drives a few dozen requests (four SLO classes, a shared prompt
prefix, invalid requests), and then evaluates every PromQL expression of the Grafana dashboards
and alert rules through Prometheus's HTTP API: each must parse and return at least one finite
sample. Alert conditions are empty in a healthy cluster by design; for them the whole expression
must parse and each operand (the expression without its threshold comparison) must return data.
The last test stops the decode worker and checks that Prometheus and the alerts see it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pdserve.client import Client
from pdserve.errors import InvalidRequestError, ModelNotFoundError, ResourceExhaustedError, UnavailableError
from pdserve.launcher import ClusterSpec, LocalCluster, launch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"

SCRAPE_S = 1
# Grafana's built-in interval variables. The window covers the whole test run (Prometheus starts
# after the cluster and the traffic takes well under a minute), as a dashboard viewed over the
# run's time range would; a window of a few scrapes would see zero rates once traffic stops.
BUILTINS = {"__rate_interval": "5m", "__interval": "5m", "__range": "5m"}

# a shared prefix longer than several 16-token blocks: repeats hit the prefix caches
SYSTEM = (
    "You are a concise assistant for a cluster operations team. Answer in one short sentence, "
    "avoid lists, never apologise, and prefer concrete numbers over vague words. Question: "
)
QUESTIONS = [
    "What is a KV cache?",
    "Why split prefill from decode?",
    "What does TTFT measure?",
    "What is continuous batching?",
    "Why page the KV cache in blocks?",
    "What is goodput?",
]
# (ttft_s, tpot_s) per SLO class label of pdserve.metrics.slo_class
SLOS = {"default": (0.0, 0.0), "interactive": (0.5, 0.05), "standard": (5.0, 0.2), "batch": (60.0, 0.0)}


# ---------------------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Expr:
    where: str  # dashboard:panel:refId or alerts:AlertName
    promql: str


def _template_values(dashboard: dict) -> dict[str, str]:
    """Template variable -> the value its "All" option stands for (``allValue``)."""
    out = dict(BUILTINS)
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            assert v.get("includeAll") and v.get("allValue"), f"variable {v['name']} has no All value"
            out[v["name"]] = v["allValue"]
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$name`` and ``${name}`` (longest names first); an unknown variable fails."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in values, f"unknown template variable ${name} in {expr!r}"
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, expr)


def _panels(panels: list[dict]) -> Iterator[dict]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))  # panels nested in rows


def dashboard_exprs() -> list[Expr]:
    out = []
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        values = _template_values(d)
        for p in _panels(d["panels"]):
            for t in p.get("targets", []):
                if t.get("expr"):
                    where = f"{path.stem}:{p['title']}:{t.get('refId', '')}"
                    out.append(Expr(where, substitute(t["expr"], values)))
    return out


def dashboard_variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, metric, label) of every ``label_values(metric, label)`` variable."""
    out = []
    for path in DASHBOARDS:
        for v in json.loads(path.read_text()).get("templating", {}).get("list", []):
            if v.get("type") == "query":
                m = re.fullmatch(r"label_values\(\s*(\w+)\s*,\s*(\w+)\s*\)", v["definition"])
                assert m, f"{path.name}: unsupported variable query {v['definition']!r}"
                out.append((path.stem, m.group(1), m.group(2)))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[()\[\]{}]|\b(?:and|or|unless)\b')
_THRESHOLD = re.compile(r"(?s)\s*(.*?)\s*(?:==|!=|>=|<=|>|<)\s*[-+]?[0-9.]+(?:e[-+]?[0-9]+)?\s*")


def condition_operands(expr: str) -> list[str]:
    """The operands of an alert condition: split at top-level ``and``/``or``/``unless``, each
    stripped of its trailing ``<op> <number>`` threshold (which every operand must have)."""
    parts, depth, start = [], 0, 0
    for m in _TOKEN.finditer(expr):
        tok = m.group(0)
        if tok in "([{":
            depth += 1
        elif tok in ")]}":
            depth -= 1
        elif tok[0] != '"' and depth == 0:
            parts.append(expr[start : m.start()])
            start = m.end()
    parts.append(expr[start:])
    out = []
    for p in parts:
        m = _THRESHOLD.fullmatch(p)
        assert m, f"alert operand without a threshold comparison: {p!r}"
        out.append(m.group(1))
    return out


DASH_EXPRS = dashboard_exprs()
ALERTS = alert_rules()


def test_expression_helpers():
    assert substitute(
        'rate(x{a=~"$node"}[$__rate_interval]) ${node}', {"node": ".*", "__rate_interval": "5m"}
    ) == ('rate(x{a=~".*"}[5m]) .*')
    with pytest.raises(AssertionError):
        substitute("x{a=~'$nope'}", {})
    ops = condition_operands('(sum(a{x="and"}) / sum(b)) > 0.1\nand\n(sum(c) or d) >= 1e-3')
    assert ops == ['(sum(a{x="and"}) / sum(b))', "(sum(c) or d)"]
    assert condition_operands('up{job="pdserve"} == 0') == ['up{job="pdserve"}']
    assert len(DASH_EXPRS) >= 40 and len(ALERTS) >= 5


# ---------------------------------------------------------------------------- Prometheus
class Prom:
    """A Prometheus server process and a tiny client of its HTTP API."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def get(self, path: str, **params: str | list[str]) -> dict[str, Any]:
        q = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 4xx carry a JSON error body (bad_data: parse error)
            return json.loads(e.read())

    def query(self, promql: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=promql)

    def samples(self, promql: str) -> list[float]:
        """Values of an instant query; fails on an error status."""
        r = self.query(promql)
        assert r["status"] == "success", f"{promql}: {r.get('errorType')}: {r.get('error')}"
        data = r["data"]
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(s["value"][1]) for s in data["result"]]

    def value(self, promql: str) -> float:
        v = self.samples(promql)
        assert len(v) == 1, f"{promql}: expected one sample, got {v}"
        return v[0]

    def wait_for(self, promql: str, ok, timeout_s: float = 30.0) -> list[float]:
        """Poll ``promql`` until ``ok(samples)``; returns the samples (fails on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = self.samples(promql)
            if ok(v):
                return v
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} = {v} after {timeout_s}s")
            time.sleep(0.5)

    def wait_rules_evaluated_after(self, t: float, timeout_s: float = 30.0) -> None:
        """Poll until every rule group's last evaluation started at or after ``t`` (Unix time)."""
        deadline = time.monotonic() + timeout_s
        while True:
            groups = self.get("/api/v1/rules")["data"]["groups"]
            last = [datetime.fromisoformat(g["lastEvaluation"]).timestamp() for g in groups]
            if last and min(last) >= t:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"rule groups last evaluated {last}, want >= {t} after {timeout_s}s")
            time.sleep(0.2)

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(targets_glob: Path) -> dict[str, Any]:
    """The shipped config with 1 s intervals, the test's file_sd glob and absolute rule paths."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(
        scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s"
    )
    cfg["rule_files"] = [str(PROM_CONFIG.parent / f) for f in cfg["rule_files"]]
    (job,) = cfg["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    sd.update(files=[str(targets_glob)], refresh_interval=f"{SCRAPE_S}s")
    return cfg


@pytest.fixture(scope="module")
def cluster(smollm_path, tmp_path_factory) -> Iterator[LocalCluster]:
    # the store with a disk tier, so that its families (and the disk-full alert's operand) exist
    disk = tmp_path_factory.mktemp("disk-tier")
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=256,
            store_capacity_blocks=512,
            store_args=("--disk-tier", str(disk), "--disk-tier-gib", "1"),
        )
    )
    try:
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def prom(cluster, tmp_path_factory) -> Iterator[Prom]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "prometheus is not on PATH: install the Debian package `prometheus` (`./dev test` does when run as root)"
        )
    d = tmp_path_factory.mktemp("prometheus")
    (d / "targets").mkdir()
    cluster.write_file_sd(d / "targets" / "pdserve.json")
    (d / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(d / "targets" / "*.json")))
    port = _free_port()
    log = d / "prometheus.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={d / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=d,
        )
    p = Prom(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{p.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not become ready:\n{p.log_tail()}")
            time.sleep(0.2)
        # every process scraped successfully once before any traffic
        p.wait_for('sum(up{job="pdserve"})', lambda v: v == [float(len(cluster.metrics))])
        yield p
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Traffic:
    ok: dict[str, int]  # SLO class -> completed requests
    rejected: dict[str, int]  # SLO class -> requests rejected early (RESOURCE_EXHAUSTED)
    invalid: int
    before: dict[str, float]  # outcome -> router's request count before the traffic


def _one(client: Client, i: int) -> tuple[str, bool]:
    """Request ``i`` of the traffic: (its SLO class, whether it completed)."""
    cls = list(SLOS)[i % len(SLOS)]
    ttft, tpot = SLOS[cls]
    n = 3 + i % 4
    try:
        c = client.complete(
            SYSTEM + QUESTIONS[i % len(QUESTIONS)],
            max_tokens=n,
            temperature=0.0,
            ignore_eos=True,
            ttft_s=ttft,
            tpot_s=tpot,
        )
    except ResourceExhaustedError:
        # a goodput-aware router may turn away a request whose SLO it cannot meet; never one
        # without a target or with a loose one
        assert cls in ("interactive", "standard"), f"{cls} request rejected"
        return cls, False
    assert c.finish.completion_tokens == n
    return cls, True


@pytest.fixture(scope="module")
def traffic(cluster, prom) -> Traffic:
    before = {
        o: prom.value(f'sum(pdserve_router_requests_total{{outcome="{o}"}})')
        for o in ("ok", "rejected", "invalid")
    }
    n = 28
    with Client(cluster.router_address, timeout=120) as client:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: _one(client, i), range(n)))
        invalid = 0
        for bad, error in (
            (dict(prompt=SYSTEM, model="no-such-model"), ModelNotFoundError),  # NOT_FOUND
            (dict(prompt=[10**9]), InvalidRequestError),  # token id out of the vocabulary
            (dict(prompt=""), InvalidRequestError),
            (dict(prompt=SYSTEM * 200), InvalidRequestError),  # longer than the model's context
        ):
            prompt = bad.pop("prompt")
            with pytest.raises(error):
                client.complete(prompt, max_tokens=2, **bad)
            invalid += 1  # NOT_FOUND counts as outcome "invalid" too (pdserve.metrics.outcome_for)
    ok = {c: results.count((c, True)) for c in SLOS}
    rejected = {c: results.count((c, False)) for c in SLOS}
    # the traffic is over once Prometheus has scraped the router's final counts
    total = before["ok"] + before["rejected"] + before["invalid"] + n + invalid
    prom.wait_for("sum(pdserve_router_requests_total)", lambda v: v == [total])
    # and the workers' and the store's: every target scraped 2 intervals after that (was a fixed
    # 3 s sleep, which a Prometheus or a process stalled on a loaded host could outlast)
    settled = time.time() + 2 * SCRAPE_S
    prom.wait_for("min(timestamp(up))", lambda v: len(v) == 1 and v[0] >= settled)
    return Traffic(ok, rejected, invalid, before)


# ---------------------------------------------------------------------------- tests
def test_every_process_serves_metrics_and_is_scraped(cluster, prom):
    targets = prom.get("/api/v1/targets")["data"]["activeTargets"]
    seen = {t["labels"]["process"]: t for t in targets}
    assert set(seen) == set(cluster.metrics) == {"router", "store", "prefill-0", "decode-0"}
    for name, t in seen.items():
        assert t["health"] == "up", f"{name}: {t.get('lastError')}"
        assert t["labels"]["component"] in {"router", "kv_store", "prefill", "decode"}


SLO_ALERTS = {"PdserveSLOBudgetFastBurn", "PdserveSLOBudgetSlowBurn"}


def test_alert_rules_load_and_evaluate_without_errors(prom, traffic):
    groups = prom.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(a["alert"] for a in ALERTS)
    for r in rules:
        assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"


def test_only_the_slo_burn_alerts_of_classes_that_miss_go_active(prom, traffic):
    """The cluster is healthy, but a CPU misses tight SLOs: a class whose requests mostly missed
    burns its error budget (alerts pending, their ``for`` is longer than the run); a class with no
    miss does not. Nothing else is active (bar the rejection alert, see below)."""
    count = 'sum(pdserve_router_requests_total{{outcome="{}"}})'.format
    rejected = prom.value(count("rejected")) - traffic.before["rejected"]
    # the ratio the alerts compute: rates over the run (the start-up probes of launch(), some
    # rejected while the workers registered, predate Prometheus and are not in it)
    missed = {
        cls: prom.value(
            f'sum(rate(pdserve_router_slo_requests_total{{slo_class="{cls}",result="missed"}}[5m]))'
            f' / sum(rate(pdserve_router_slo_requests_total{{slo_class="{cls}"}}[5m]))'
        )
        for cls in SLOS
    }
    assert missed["default"] == 0 and missed["batch"] == 0, missed
    # a rule evaluation after the last scrape (was a fixed 2 s sleep, which a Prometheus stalled
    # on a loaded host could outlast)
    prom.wait_rules_evaluated_after(time.time() + SCRAPE_S)
    alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
    # early rejections of infeasible SLOs (a goodput-aware router) are not a failure of the cluster
    # but they do trip the rejection alert; with none, it stays silent
    allowed = SLO_ALERTS | ({"PdserveRejectionSpike"} if rejected else set())
    other = [a for a in alerts if a["labels"]["alertname"] not in allowed]
    assert other == [], f"alerts active in a healthy cluster: {other}"
    for name in SLO_ALERTS:
        active = {a["labels"]["slo_class"] for a in alerts if a["labels"]["alertname"] == name}
        assert {c for c, m in missed.items() if m > 0.5} <= active, (name, missed, active)
        assert not active & {c for c, m in missed.items() if m == 0}, (name, missed, active)


def test_metrics_count_the_traffic(prom, traffic):
    done = sum(traffic.ok.values())
    count = 'sum(pdserve_router_requests_total{{outcome="{}"}})'.format
    assert prom.value(count("ok")) == traffic.before["ok"] + done
    assert prom.value(count("rejected")) == traffic.before["rejected"] + sum(traffic.rejected.values())
    assert prom.value(count("invalid")) == traffic.before["invalid"] + traffic.invalid
    for cls in SLOS:
        # every completed or rejected request counted once as met or missed (the start-up probe
        # requests of launch() are class default); invalid ones not at all
        n = traffic.ok[cls] + traffic.rejected[cls]
        got = prom.value(f'sum(pdserve_router_slo_requests_total{{slo_class="{cls}"}})')
        assert got >= n and (cls == "default" or got == n), (cls, got, n)
    assert traffic.ok["default"] == traffic.ok["batch"] == 7
    assert prom.value('sum(pdserve_router_ttft_seconds_count{slo_class="batch"})') == traffic.ok["batch"]
    assert prom.value("sum(pdserve_router_prefix_hit_tokens_total)") > 0
    assert prom.value('sum(pdserve_worker_prefill_tokens_total{source="reused"})') > 0
    assert prom.value('sum(pdserve_kv_transfer_bytes_total{transport="grpc",direction="in"})') > 0
    assert prom.value('sum(pdserve_kv_transfer_blocks_total{transport="shm",direction="out"})') > 0
    assert prom.value("sum(pdserve_kv_transfer_failures_total)") == 0
    assert prom.value("sum(pdserve_kv_leases)") == 0
    for phase in ("queue", "prefill", "transfer", "decode"):
        assert prom.value(f'sum(pdserve_request_phase_seconds_count{{phase="{phase}"}})') >= done
    assert prom.value('sum(pdserve_request_phase_seconds_sum{phase="prefill"})') > 0


@pytest.mark.parametrize(("dashboard", "metric", "label"), dashboard_variable_queries())
def test_dashboard_variables_have_values(prom, traffic, dashboard, metric, label):
    r = prom.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
    assert r["status"] == "success" and r["data"], f"{dashboard}: label_values({metric}, {label}) is empty"


@pytest.mark.parametrize("expr", DASH_EXPRS, ids=[e.where for e in DASH_EXPRS])
def test_dashboard_expression_returns_data(prom, traffic, expr):
    values = prom.samples(expr.promql)
    assert values, f"{expr.where}: no series for {expr.promql}"
    assert any(math.isfinite(v) for v in values), f"{expr.where}: only NaN/Inf {values} for {expr.promql}"


@pytest.mark.parametrize("rule", ALERTS, ids=[a["alert"] for a in ALERTS])
def test_alert_expression_parses_and_its_operands_return_data(prom, traffic, rule):
    r = prom.query(rule["expr"])
    assert r["status"] == "success", f"{rule['alert']}: {r.get('error')}"
    for operand in condition_operands(rule["expr"]):
        values = prom.samples(operand)
        assert any(math.isfinite(v) for v in values), f"{rule['alert']}: {operand} -> {values}"


def test_a_dead_decode_worker_is_seen_by_metrics_and_alerts(cluster, prom, traffic):
    """Runs last: kills decode-0. Its target goes down, the router's worker gauge drops, requests
    are rejected, and the worker-down alerts go pending (their ``for`` is longer than we wait)."""
    cluster.kill("decode-0")
    rejected_before = prom.value('sum(pdserve_router_requests_total{outcome="rejected"})')
    with Client(cluster.router_address, timeout=60) as client:
        for _ in range(2):
            with pytest.raises((UnavailableError, ResourceExhaustedError)):  # outcome "rejected"
                client.complete(SYSTEM + "Still there?", max_tokens=4)
    prom.wait_for('up{process="decode-0"}', lambda v: v == [0.0])
    prom.wait_for('pdserve_router_workers{role="decode"}', lambda v: v == [0.0])
    prom.wait_for(
        'sum(pdserve_router_requests_total{outcome="rejected"})', lambda v: v == [rejected_before + 2]
    )
    deadline = time.monotonic() + 30
    want = {("PdserveTargetDown", "decode-0"), ("PdserveNoWorkersRegistered", "decode")}
    while True:
        alerts = prom.get("/api/v1/alerts")["data"]["alerts"]
        got = {
            (a["labels"]["alertname"], a["labels"].get("process") or a["labels"].get("role")) for a in alerts
        }
        if want <= got:
            break
        assert time.monotonic() < deadline, f"alerts {got}, want {want}"
        time.sleep(0.5)
