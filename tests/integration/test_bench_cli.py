"""`pdserve bench`: open-loop replay against the embedded cluster writes a JSON + CSV + PNG report;
the report arithmetic (attainment, goodput sweep) on hand-built results."""

from __future__ import annotations

import json
import math
import socket
import time

import pytest

from pdserve import loadgen
from pdserve.bench_cli import at_rate
from pdserve.cli import main
from simulator.workload import Workload, WorkloadRequest


def test_at_rate_spreads_a_zero_spread_slice_and_rescales_a_trace() -> None:
    flat = Workload("flat", tuple(WorkloadRequest(0.0, 10, 2) for _ in range(200)))
    w = at_rate(flat, 4.0, seed=1)
    assert w.requests[0].arrival_s == 0.0
    assert 3.0 < w.rate < 5.5
    spread = Workload("s", tuple(WorkloadRequest(float(i), 10, 2) for i in range(11)))
    assert math.isclose(at_rate(spread, 2.0).rate, 2.0)


def _res(outcome: str, ttft: float, tpot: float, arrival: float = 0.0) -> loadgen.LoadResult:
    r = loadgen.LoadResult(arrival, 10, 4, outcome=outcome, ttft_s=ttft, tpot_s=tpot, e2e_s=1.0)
    r.output_tokens = 4 if outcome == "ok" else 0
    return r


def test_summary_counts_and_goodput_sweep() -> None:
    slo = loadgen.SLO(ttft_s=0.5, tpot_s=0.1)
    res = [
        _res("ok", 0.1, 0.05, 0.0),
        _res("ok", 0.9, 0.05, 1.0),  # misses TTFT
        _res("rejected", math.nan, math.nan, 2.0),
        _res("ok", 0.2, 0.05, 3.0),
    ]
    rep = loadgen.summarize(res, slo, rate=1.0)
    assert (rep.n, rep.ok, rep.rejected, rep.errors) == (4, 3, 1, 0)
    assert rep.attainment == pytest.approx(2 / 4)
    assert rep.attainment_admitted == pytest.approx(2 / 3)
    assert rep.goodput_rps == pytest.approx(2 / 4.0)  # 2 met over a 4 s span
    mk = lambda rate, att: loadgen.Report(4, rate, 4, 0, 0, att, att, 0.0, 0.0)  # noqa: E731
    # crossing of 0.9 between rate 2 (1.0) and rate 4 (0.8): linear interpolation -> 3.0
    assert loadgen.goodput_from_sweep([mk(1, 1.0), mk(2, 1.0), mk(4, 0.8)], 0.9) == pytest.approx(3.0)
    assert loadgen.goodput_from_sweep([mk(1, 0.5)], 0.9) == 0.0


def test_summary_of_one_token_outputs_has_no_tpot_and_no_warning() -> None:
    """Every output one token long (the Azure code trace at a large --length-scale): TPOT is
    undefined, its mean NaN, and no numpy "Mean of empty slice" warning reaches the user."""
    import warnings

    slo = loadgen.SLO(ttft_s=0.5, tpot_s=0.1)
    res = [_res("ok", 0.1, math.nan), _res("ok", 0.3, math.nan)]
    for r in res:
        r.output_tokens = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = loadgen.summarize(res, slo, rate=1.0)
    assert math.isnan(rep.latency["tpot_s"]["mean"]) and math.isnan(rep.latency["tpot_s"]["p50"])
    assert rep.latency["ttft_s"]["mean"] == pytest.approx(0.2)
    assert rep.attainment == 1.0  # a one-token output has no TPOT to miss


def test_summary_explains_rejections() -> None:
    slo = loadgen.SLO(ttft_s=0.5, tpot_s=0.1)
    res = [_res("ok", 0.1, 0.05, 0.0)]
    msgs = [
        ("predicted TTFT 900.0 ms exceeds 450.0 ms (SLO with 10% margin at priority 0)", 0.45),
        ("predicted TTFT 700.0 ms exceeds 450.0 ms (SLO with 10% margin at priority 0)", 0.25),
        ("predicted TPOT 300.0 ms exceeds 90.0 ms (SLO with 10% margin at priority 0)", 2.0),
        ("tenant 'a' already has 4 requests in flight (quota 4); retry when one finishes", None),
    ]
    for i, (m, ra) in enumerate(msgs):
        r = _res("rejected", math.nan, math.nan, float(i + 1))
        r.error, r.reject_reason = m, loadgen.classify_rejection(m).value
        r.retry_after_s = math.nan if ra is None else ra
        res.append(r)
    rep = loadgen.summarize(res, slo, rate=1.0)
    assert rep.reject_reasons == {
        loadgen.RejectKind.TTFT.value: 2,
        loadgen.RejectKind.TPOT.value: 1,
        loadgen.RejectKind.QUOTA.value: 1,
    }
    assert rep.retry_after_s == {"p50": pytest.approx(0.45), "max": pytest.approx(2.0)}
    text = loadgen.format_report(rep)
    assert "rejected 4/5 before any compute (2 predicted TTFT over SLO" in text
    assert "retry-after p50 0.45 s, max 2.00 s" in text
    assert "20.0% of all requests (a rejected one counts as a miss), 100.0% of the 1 admitted" in text
    assert loadgen.classify_rejection("something new") is loadgen.RejectKind.OTHER


@pytest.mark.slow
def test_bench_embedded_writes_report(tmp_path, smollm_path) -> None:
    out = tmp_path / "bench"
    rc = main(
        [
            "bench", "--embedded", "--model", str(smollm_path), "--workload", "mooncake",
            "-n", "6", "--rates", "1,4", "--max-input", "128", "--max-output", "6",
            "--ttft", "30", "--tpot", "5", "--out", str(out), "--no-progress", "--warmup", "2",
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["rate"] for s in report["sweep"]] == [1.0, 4.0]
    for s in report["sweep"]:
        assert (s["n"], s["ok"], s["errors"]) == (6, 6, 0)
        assert s["attainment"] == 1.0  # generous SLO: every request meets it
        assert s["latency"]["ttft_s"]["p50"] > 0
    # Mooncake hash_ids become shared prefixes: the second sweep point re-sends the same prompts
    assert report["sweep"][1]["prefix_hit_rate"] > 0.3
    assert report["goodput_rps"] == 4.0
    assert report["warmup"]["n"] == 2 and report["warmup"]["errors"] == 0  # reported apart
    for name in ("bench_attainment.png", "bench_cdf.png", "requests_rate1.csv", "requests_rate4.csv"):
        assert (out / name).stat().st_size > 0


def test_a_failed_sweep_says_why() -> None:
    """Requests that failed (not rejected) are counted and their commonest errors printed."""
    slo = loadgen.SLO(ttft_s=0.5, tpot_s=0.1)
    res = [_res("ok", 0.1, 0.05)]
    for msg in ["UnavailableError: store kv0 down"] * 3 + ["InternalError: boom", "x" * 1000]:
        r = _res("error", math.nan, math.nan)
        r.error = msg
        res.append(r)
    rep = loadgen.summarize(res, slo, rate=1.0)
    assert rep.errors == 5 and rep.error_messages["UnavailableError: store kv0 down"] == 3
    assert max(len(m) for m in rep.error_messages) == loadgen.ERROR_CHARS
    text = loadgen.format_report(rep)
    assert "failed 5/6:" in text and "3 x UnavailableError: store kv0 down" in text
    assert "1 x InternalError: boom" in text
    assert "other errors" not in text  # three kinds, all shown
    assert "failed" not in loadgen.format_report(loadgen.summarize(res[:1], slo, rate=1.0))


def test_bench_against_no_router_fails_at_once_naming_the_address(tmp_path, capsys) -> None:

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    rc = main(["bench", "--address", f"127.0.0.1:{port}", "-n", "2", "--warmup", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and time.monotonic() - t0 < 30
    assert f"no router answers at 127.0.0.1:{port}" in err and "pdserve serve" in err, err
    assert not (tmp_path / "report.json").exists()  # nothing replayed, no empty report


def test_generate_against_no_router_says_how_to_start_one(capsys) -> None:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["generate", "hi", "--address", f"127.0.0.1:{port}", "--timeout", "10"]) == 2
    err = capsys.readouterr().err
    assert f"router 127.0.0.1:{port} unavailable" in err
    assert f"is a cluster running at 127.0.0.1:{port}? start one with `pdserve serve`" in err, err
    assert "pdserve generate --embedded PROMPT" in err
