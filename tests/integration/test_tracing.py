"""Request tracing over real processes (embedded cluster, real SmolLM2-135M): one request id in
the JSON logs of router, prefill worker, KV store and decode worker; phase timings returned to the
client in the final message (transfer = the prefill worker's KV publish + the decode worker's
pull), logged by the router and exported as histograms.

Each process logs JSON lines on stderr, which the launcher merges into stdout and keeps in
``LocalCluster.logs[name]``.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.client import Client
from pdserve.errors import ModelNotFoundError
from pdserve.launcher import ClusterSpec, LocalCluster, launch
from tests.integration.clusters import json_records

pytestmark = pytest.mark.slow

PROMPT = "Explain in one sentence why a serving system splits prefill from decode, and what it gains."
PHASES = ("queue", "prefill", "transfer", "decode")


@pytest.fixture(scope="module")
def cluster(smollm_path) -> Iterator[LocalCluster]:
    cl = launch(ClusterSpec(model_path=str(smollm_path), worker_kv_blocks=128, store_capacity_blocks=256))
    try:
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def client(cluster) -> Iterator[Client]:
    with Client(cluster.router_address, timeout=120) as c:
        yield c


def records(cluster: LocalCluster, process: str, request_id: str) -> list[dict]:
    """The JSON log records of ``process`` stamped with ``request_id`` (other lines skipped)."""
    return json_records(cluster, process, request_id=request_id)


def wait_logged(
    cluster: LocalCluster, process: str, request_id: str, msg: str, timeout_s: float = 10.0
) -> dict:
    """The first record of ``process`` with ``msg`` for ``request_id`` (logs are pumped by a thread)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for rec in records(cluster, process, request_id):
            if rec["msg"] == msg:
                return rec
        if time.monotonic() > deadline:
            seen = [r["msg"] for r in records(cluster, process, request_id)]
            raise AssertionError(f"{process} did not log {msg!r} for {request_id}; its records: {seen}")
        time.sleep(0.05)


def phase_counts(cluster: LocalCluster) -> dict[str, float]:
    """``pdserve_request_phase_seconds_count`` per phase (all classes) from the router's /metrics."""
    with urllib.request.urlopen(f"http://{cluster.metrics['router']}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts = dict.fromkeys(PHASES, 0.0)
    for fam in text_string_to_metric_families(text):
        if fam.name == "pdserve_request_phase_seconds":
            for s in fam.samples:
                if s.name.endswith("_count"):
                    counts[s.labels["phase"]] += s.value
    return counts


def test_one_request_id_appears_in_router_prefill_store_and_decode_logs(cluster, client):
    rid = f"trace-{uuid.uuid4().hex}"
    c = client.complete(PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True, request_id=rid)
    assert c.request_id == rid
    routed = wait_logged(cluster, "router", rid, "routed")
    assert (routed["prefill"], routed["decode"]) == ("prefill-0", "decode-0")
    # the client's id is an idempotency key (#13): the cluster runs the request under its own id,
    # which the router's "routed" line names and every other component logs
    cid = routed["cluster_request_id"]
    assert cid and cid != rid
    done = wait_logged(cluster, "router", rid, "request done")
    assert done["component"] == "router" and done["outcome"] == "ok"
    assert done["completion_tokens"] == 6
    pre = wait_logged(cluster, "prefill-0", cid, "prefill done")
    assert pre["component"] == "prefill-0" and pre["blocks"] >= 1
    put = wait_logged(cluster, "store", cid, "kv put")  # metadata pdserve-request-id from prefill
    assert put["component"] == "kv0" and put["blocks"] == pre["blocks"] and put["lease_id"]
    release = wait_logged(cluster, "store", cid, "kv release")  # from decode, after its pull
    assert release["lease_id"] == put["lease_id"] and release["released"] is True
    assert records(cluster, "prefill-0", rid) == records(cluster, "decode-0", rid) == []
    dec = wait_logged(cluster, "decode-0", cid, "decode done")
    assert dec["component"] == "decode-0" and dec["tokens"] == 5  # the first token came from prefill
    assert dec["finish"] == "FINISH_REASON_LENGTH"
    assert dec["kv_pull_s"] > 0  # the decode worker's side of the KV handoff
    for rec in (routed, done, pre, put, release, dec):
        assert rec["level"] == "info" and rec["ts"] > 0


def test_the_router_assigns_an_id_when_the_client_sends_none(cluster, client):
    c = client.complete(PROMPT, max_tokens=2, temperature=0.0, ignore_eos=True)
    assert len(c.request_id) == 32
    wait_logged(cluster, "router", c.request_id, "request done")
    wait_logged(cluster, "prefill-0", c.request_id, "prefill done")
    wait_logged(cluster, "decode-0", c.request_id, "decode done")


def test_a_failed_request_is_logged_with_its_id_and_outcome(cluster, client):
    rid = f"bad-{uuid.uuid4().hex}"
    with pytest.raises(ModelNotFoundError):
        client.complete(PROMPT, max_tokens=2, model="no-such-model", request_id=rid)
    rec = wait_logged(cluster, "router", rid, "request failed")
    assert rec["outcome"] == "invalid" and rec["error"] == "ModelNotFoundError"
    assert records(cluster, "prefill-0", rid) == []  # rejected at the router, never placed


def test_phase_timings_return_to_the_client_and_are_exported(cluster, client):
    before = phase_counts(cluster)
    rid = f"phases-{uuid.uuid4().hex}"
    c = client.complete(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True, request_id=rid)
    f = c.finish
    assert set(f.phases) == set(PHASES)
    assert all(v >= 0 for v in f.phases.values()), f.phases
    assert f.phases["prefill"] > 0 and f.phases["transfer"] > 0 and f.phases["decode"] > 0, f.phases
    # transfer is the whole KV handoff: the prefill worker's publish (before the first token)
    # plus the decode worker's pull (after it, split out as Timing.kv_pull_s and logged by both
    # the decode worker and the router); decode is what follows the pull
    done = wait_logged(cluster, "router", rid, "request done")
    cid = wait_logged(cluster, "router", rid, "routed")["cluster_request_id"]
    pre = wait_logged(cluster, "prefill-0", cid, "prefill done")
    dec = wait_logged(cluster, "decode-0", cid, "decode done")
    pull = dec["kv_pull_s"]
    assert 0 < pull < f.phases["transfer"] and done["kv_pull_s"] == pull, (pull, done, f.phases)
    assert f.kv_pull_s == pytest.approx(pull, abs=1e-6)  # the SDK hands the split to the user
    publish = f.phases["transfer"] - pull
    assert publish == pytest.approx(pre["transfer_s"], abs=1e-5)  # the prefill side, as logged there
    tol = 0.05
    before_first = f.phases["queue"] + f.phases["prefill"] + publish
    assert before_first <= f.ttft_s + tol, (f.phases, pull, f.ttft_s)
    assert f.ttft_s + pull + f.phases["decode"] <= f.e2e_s + tol, (f.phases, pull, f.ttft_s, f.e2e_s)
    assert sum(f.phases.values()) <= f.e2e_s + tol, (f.phases, f.e2e_s)
    assert len(f.token_times_s) == 8 and f.token_times_s[0] == pytest.approx(f.ttft_s)
    # the router logs the same timings with the request id
    for p in PHASES:
        assert done[f"{p}_s"] == pytest.approx(f.phases[p], abs=1e-5)
    assert done["ttft_s"] == pytest.approx(f.ttft_s, abs=1e-5)
    # and exports them as histograms: one more observation per phase
    after = phase_counts(cluster)
    assert {p: after[p] - before[p] for p in PHASES} == dict.fromkeys(PHASES, 1.0)
