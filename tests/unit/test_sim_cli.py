"""``pdserve simulate | plan | profile`` end to end through the real argument parser (tiny inputs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pdserve.cli import main
from simulator.latency import ProfiledLatencyModel
from simulator.profile import PointKind, load

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_simulate_writes_csv_summary_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "one"
    base = ["simulate", "--model", "llama-2-7b", "--workload", "sharegpt", "--num-requests", "40", "--quiet"]
    assert main([*base, "--mode", "disaggregated", "--rate", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cluster: disaggregated, 2 GPUs, llama-2-7b on a100 (vidur)" in text
    rows = _rows(out / "requests.csv")
    assert len(rows) == 40
    assert all(float(r["ttft"]) > 0 and float(r["tpot"]) > 0 for r in rows)
    assert {r["prefill_instance"] for r in rows} == {"prefill0"}
    assert {r["decode_instance"] for r in rows} == {"decode0"}
    s = json.loads((out / "summary.json").read_text())
    assert s["summary"]["requests"] == 40 and s["summary"]["finished"] == 40
    assert set(s["instances"]) == {"prefill0", "decode0"}
    assert (out / "latency_cdf.png").read_bytes()[:8] == PNG

    sweep = tmp_path / "sweep"
    argv = [*base, "--mode", "colocated", "--instances", "2", "--scheduler", "sarathi", "--rates", "1,50"]
    assert main([*argv, "--out", str(sweep)]) == 0
    curve = json.loads((sweep / "attainment.json").read_text())
    assert [r for r, _ in curve] == [1.0, 50.0]
    assert curve[0][1] >= curve[1][1]  # more load, no better attainment
    for name in ("attainment.png", "latency_cdf.png"):
        assert (sweep / name).read_bytes()[:8] == PNG
    assert len(_rows(sweep / "requests_rate50.csv")) == 40
    assert set(json.loads((sweep / "summary.json").read_text())["by_rate"]) == {"1", "50"}


def test_plan_prints_and_writes_ranked_configs(tmp_path, capsys) -> None:
    argv = ["plan", "--model", "opt-13b", "--gpu", "a100", "--gpus", "2", "--tp", "1"]
    argv += ["--workload", "sharegpt", "--ttft", "0.25", "--tpot", "0.1", "--duration", "5"]
    assert main([*argv, "--verify", "1", "--quiet", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "-- disaggregated" in text and "-- colocated" in text
    assert "1xP(TP1) + 1xD(TP1)" in text and "2xM(TP1)" in text
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["disaggregated"][0]["config"] == "1xP(TP1) + 1xD(TP1)"
    assert plan["colocated"][0]["config"] == "2xM(TP1)"
    for e in (plan["disaggregated"][0], plan["colocated"][0]):
        assert e["verified"] and e["goodput"] > 0 and e["per_gpu"] == pytest.approx(e["goodput"] / 2)
    adv = plan["disaggregated"][0]["per_gpu"] / plan["colocated"][0]["per_gpu"]
    assert plan["advantage"] == pytest.approx(adv)


def test_profile_writes_a_file_the_simulator_loads(tmp_path, smollm_path, capsys) -> None:
    from tests.tiny_models import make_tiny_models

    model = make_tiny_models(tmp_path / "m", tokenizer_from=smollm_path)["llama"]
    prof_file = tmp_path / "p.json"
    argv = ["profile", "--model", str(model), "--quick", "--quiet", "--threads", "1", "--out", str(prof_file)]
    assert main(argv) == 0
    assert "held-out relative error" in capsys.readouterr().out
    prof = load(prof_file)
    assert prof.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K+V x layers x kv heads x head dim x fp32
    assert {p.kind for p in prof.points} == {PointKind.PREFILL, PointKind.DECODE}
    assert all(p.seconds > 0 for p in prof.points)
    lat = ProfiledLatencyModel(prof_file)
    assert lat.decode_time(4, 400) > 0 and lat.prefill_time([64]) > 0

    out = tmp_path / "sim"
    argv = ["simulate", "--model", prof.model, "--profile-file", str(prof_file), "--kv-blocks", "256"]
    argv += ["--max-model-len", "512", "--workload", "sharegpt", "--num-requests", "10", "--rate", "1"]
    assert main([*argv, "--quiet", "--out", str(out)]) == 0
    assert "(profile)" in capsys.readouterr().out
    assert len(_rows(out / "requests.csv")) == 10


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["simulate", "--model", "llama-7b"], "unknown model 'llama-7b'; known: "),
        (["simulate", "--model", "llama-2-7b", "--workload", "bogus"], "unknown workload 'bogus'"),
        (
            ["simulate", "--model", "llama-2-7b", "--ttft", "-1"],
            "argument --ttft: must be a finite number of seconds > 0",
        ),
        # each ran before: --num-requests 0 and --chunk 0 reported slo_attainment 1 (of nothing, or
        # of a budget the scheduler ignored), --max-model-len 0 attainment 0, --target 1.5 no goodput
        (
            ["simulate", "--model", "llama-2-7b", "--num-requests", "0"],
            "argument --num-requests: must be >= 1",
        ),
        (["simulate", "--model", "llama-2-7b", "--chunk", "0"], "argument --chunk: must be >= 1"),
        (
            ["simulate", "--model", "llama-2-7b", "--max-model-len", "0"],
            "argument --max-model-len: must be >= 1",
        ),
        (
            ["simulate", "--model", "llama-2-7b", "--rate", "0"],
            "argument --rate: must be a finite number > 0",
        ),
        (["simulate", "--model", "llama-2-7b", "--target", "1.5"], "argument --target: must be in (0, 1]"),
        (["plan", "--model", "llama-2-7b", "--gpus", "0"], "argument --gpus: must be >= 1"),
        (["simulate", "--model", "llama-2-7b", "--tp", "3"], "TP3 does not divide llama-2-7b's heads"),
        (["simulate", "--model", "llama-2-7b", "--workload", "/nonexistent/trace.jsonl"], "No such file"),
        # the simulator would count prefill as free (TTFT 0) or never decode: refused, naming the flag
        (
            ["simulate", "--model", "llama-2-7b", "--mode", "disaggregated", "--prefill", "0"],
            "--mode disaggregated with --prefill 0: no instance prefills a prompt",
        ),
        (
            ["simulate", "--model", "llama-2-7b", "--mode", "disaggregated", "--decode", "0"],
            "--mode disaggregated with --decode 0: no instance decodes",
        ),
        (
            ["simulate", "--model", "llama-2-7b", "--mode", "splitwise", "--prefill", "0", "--mixed", "0"],
            "no instance prefills a prompt (or --mixed)",
        ),
        (["simulate", "--model", "llama-2-7b", "--instances", "0"], "--instances must be >= 1"),
        (["plan", "--model", "nope", "--gpus", "4"], "unknown model 'nope'"),
        (["plan-mix", "--model", "nope:1.0", "--gpus", "4"], "unknown model 'nope'"),
        (["simulate-mix", "--model", "nope:1P1D:2.0"], "unknown model 'nope'"),
    ],
)
def test_bad_input_is_one_error_line_not_a_traceback(argv, says, capsys) -> None:
    try:
        code = main([*argv, "--quiet"] if argv[0] != "simulate-mix" else argv)
    except SystemExit as e:  # refused by the argument parser (a flag's type)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    # pdserve's own errors (InvalidRequestError: a workload) by pdserve's handler, the rest by the command's
    assert (f"pdserve {argv[0]}: error: " in err or "pdserve: error: " in err) and says in err, err
    assert "Traceback" not in err


def test_splitwise_mixed_pool_alone_serves(capsys) -> None:
    argv = ["simulate", "--model", "llama-2-7b", "--mode", "splitwise", "--prefill", "0", "--decode", "0"]
    assert main([*argv, "--mixed", "1", "--num-requests", "10", "--quiet"]) == 0
    assert "finished: 10" in capsys.readouterr().out


def test_profile_names_the_flag_its_grid_outgrows(tmp_path, smollm_path, capsys) -> None:
    """`pdserve profile --kv-blocks 4 --quick` said only 'prompt of 64 tokens needs more KV blocks
    than this engine has'; `--threads 0` was taken as "torch's default"."""
    from tests.tiny_models import make_tiny_models

    model = make_tiny_models(tmp_path / "m", tokenizer_from=smollm_path)["llama"]
    argv = ["profile", "--model", str(model), "--quick", "--quiet", "--out", str(tmp_path / "p.json")]
    assert main([*argv, "--kv-blocks", "4"]) != 0
    err = capsys.readouterr().err
    assert (
        "the profile's grid does not fit --kv-blocks 4: prompt of 64 tokens" in err and "Traceback" not in err
    )
    for flag in ("--threads", "--kv-blocks"):
        with pytest.raises(SystemExit):
            main([*argv, flag, "0"])
        assert f"argument {flag}: must be >= 1" in capsys.readouterr().err
