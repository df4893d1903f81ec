"""bench/router_policy_live.py: the verdict arithmetic on hand-built reports, the capacity estimate
on a hand-built latency model, and (slow) a --quick run end to end for two policies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pdserve import loadgen

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench import router_policy_live as bench  # noqa: E402
from bench.cluster_load import tiny_model  # noqa: E402


def _rep(goodput: float, admitted: float, rejected: int = 0) -> loadgen.Report:
    return loadgen.Report(10, 1.0, 10 - rejected, rejected, 0, admitted, admitted, goodput, 0.0)


def _results(g_over_admitted: float, other_over_admitted: float, g_base: float = 1.0):
    return {
        "least_loaded": {"base": _rep(0.8, 0.9), "overload": _rep(0.3, other_over_admitted)},
        "goodput": {"base": _rep(g_base, 0.95), "overload": _rep(0.9, g_over_admitted, rejected=4)},
    }


def test_checks_pass_and_fail():
    ok = bench.checks(_results(0.95, 0.2), admitted_target=0.9, collapse_below=0.5)
    assert [c.verdict for c in ok] == [bench.Verdict.PASS, bench.Verdict.PASS]
    # goodput lower than least_loaded at base; overload admitted attainment below target
    bad = bench.checks(_results(0.85, 0.2, g_base=0.5), admitted_target=0.9, collapse_below=0.5)
    assert [c.verdict for c in bad] == [bench.Verdict.FAIL, bench.Verdict.FAIL]
    # the others did not collapse
    nc = bench.checks(_results(0.95, 0.7), admitted_target=0.9, collapse_below=0.5)
    assert nc[1].verdict is bench.Verdict.FAIL
    skip = bench.checks({"goodput": _results(1, 0)["goodput"]}, 0.9, 0.5)
    assert {c.verdict for c in skip} == {bench.Verdict.SKIP}


class _Lat:
    """prefill 1 ms/token; decode step 10 ms + 10 ms per sequence."""

    def prefill_time(self, tokens, contexts=None):
        return 1e-3 * sum(tokens)

    def decode_time(self, batch, context):
        return 0.01 + 0.01 * batch


def test_capacity_estimate_on_hand_numbers():
    # two 100-token prompts sharing their first 64 tokens (4 blocks): 100 + 36 new tokens
    shared = tuple(range(64))
    reqs = [
        loadgen.LoadRequest(0.0, shared + tuple(range(1000, 1036)), 10),
        loadgen.LoadRequest(0.0, shared + tuple(range(2000, 2036)), 10),
    ]
    rate, parts = bench.estimate_capacity(_Lat(), reqs, 1, 1, tpot_s=0.1, cores=2)
    assert parts["prefill_s_per_request"] == pytest.approx((0.1 + 0.036) / 2)
    assert parts["decode_batch"] == 8  # 0.09 s <= 0.9 * 0.1; batch 9 would be 0.1 s
    assert parts["decode_rps"] == pytest.approx(8 / (10 * 0.09))
    assert parts["oversubscription"] == 1.0
    assert parts["prefill_rps"] == pytest.approx(1 / 0.068)
    assert rate == pytest.approx(8 / 0.9)  # decode-bound
    # four workers on two cores: half the speed
    rate4, _ = bench.estimate_capacity(_Lat(), reqs, 2, 2, tpot_s=0.1, cores=2)
    assert rate4 == pytest.approx(min(2 / 0.068, 2 * 8 / 0.9) / 2)


@pytest.mark.slow
def test_quick_run_two_policies(tmp_path, smollm_path):
    # the tiny random Llama with SmolLM2's tokenizer: the run's plumbing end to end (clusters,
    # phases, report, chart); the policies' figures on the real model are the bench's own job
    model = tiny_model(tmp_path / "model")
    out = tmp_path / "live.json"
    rc = bench.main(
        [
            "--quick", "--model", str(model), "--policies", "least_loaded,goodput",
            "--prefill", "1", "--decode", "1", "--kv-blocks", "128", "--store-blocks", "256",
            "--rate", "2", "--window-s", "3", "--warmup", "1", "--max-input", "64", "--max-output", "4",
            "--latency-profile", "none", "--out", str(out), "--png", str(tmp_path / "live.png"),
        ]
    )  # fmt: skip
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"least_loaded", "goodput"}
    assert rep["rates"] == {"base": 2.0, "overload": 4.0}
    for pol in rep["results"].values():
        for ph in ("base", "overload"):
            r = pol[ph]
            assert r["n"] == r["ok"] + r["rejected"] + r["errors"] and r["errors"] == 0
            for k in ("goodput_rps", "attainment", "attainment_admitted", "rejection_rate"):
                assert r[k] >= 0
            assert {"p50", "p90"} <= set(r["latency"]["ttft_s"]) and {"p50", "p90"} <= set(
                r["latency"]["tpot_s"]
            )
            assert "goodput_ratio_vs_baseline" in r
    assert [c["name"] for c in rep["checks"]] == ["highest goodput", "overload admitted attainment"]
    assert {c["verdict"] for c in rep["checks"]} <= {"PASS", "FAIL"}
    assert (tmp_path / "live.png").is_file()
