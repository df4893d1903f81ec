"""FlexGen offload settings (#15 part 4) reach operators: ``kv_memory_budget_bytes``,
``device_memory_budget_bytes`` and ``offline_batch`` are worker flags, ``pdserve serve`` flags,
Ray pool keys and ``pdserve generate --embedded`` flags (pdserve.offload_knobs), sizes in GiB as
the weight budget's; contradictory settings are refused naming the flag / pool key. End to end:
``pdserve generate --embedded --prompts-file`` with a KV budget, a device budget or an offline
batch prints what was chosen and writes output identical to the resident run."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path

import pytest

from engine.config import EngineConfig
from pdserve import offload_knobs
from pdserve.worker_base import Role
from pdserve.worker_main import parse
from tests.serve_args import serve_worker_args

BASE = ["--worker-id", "d0", "--model", "/m", "--store", "127.0.0.1:1", "--tls", "off"]
GIB = 1 << 30


def test_every_engine_offload_field_has_a_front_end() -> None:
    engine = {f.name for f in fields(EngineConfig)}
    for k in offload_knobs.KNOBS:
        assert k.field in engine, k
    new = {
        "offline_batch",
        "kv_memory_budget_bytes",
        "device_memory_budget_bytes",
        "weight_host_budget_bytes",
        "weight_offload_dir",
        "kv_host_budget_bytes",
        "kv_offload_dir",
    }
    assert {k.field for k in offload_knobs.KNOBS} == new
    from pdserve.cluster_config import PoolConfig

    pool = {f.name for f in fields(PoolConfig)}
    assert {k.name for k in offload_knobs.KNOBS} <= pool


# ------------------------------------------------------------------------------- worker flags
@pytest.mark.parametrize(
    "argv, want",
    [
        ([], dict(kv_memory_budget_bytes=None, device_memory_budget_bytes=None, offline_batch=False)),
        (["--kv-budget-gib", "0.5"], dict(kv_memory_budget_bytes=GIB // 2)),
        (
            ["--device-budget-gib", "2"],
            dict(device_memory_budget_bytes=2 * GIB, weight_memory_budget_bytes=None),
        ),
        (
            ["--weight-budget-gib", "1.5", "--offline-batch"],
            dict(weight_memory_budget_bytes=3 * GIB // 2, offline_batch=True),
        ),
        (
            ["--device-budget-gib", "1", "--offline-batch", "--weight-host-gib", "4"],
            dict(device_memory_budget_bytes=GIB, offline_batch=True, weight_host_budget_bytes=4 * GIB),
        ),
        (
            ["--weight-budget-gib", "1", "--kv-budget-gib", "0.25"],
            dict(weight_memory_budget_bytes=GIB, kv_memory_budget_bytes=GIB // 4),
        ),
        (
            ["--device-budget-gib", "1", "--weight-host-gib", "0", "--weight-offload-dir", "/scratch"],
            dict(weight_host_budget_bytes=0, weight_offload_dir="/scratch"),
        ),
        (
            ["--weight-budget-gib", "1", "--weight-host-gib", "inf"],
            dict(weight_host_budget_bytes=None, weight_offload_dir=None),
        ),
        (
            ["--kv-budget-gib", "1", "--kv-host-gib", "0.25", "--kv-offload-dir", "/kv"],
            dict(kv_host_budget_bytes=GIB // 4, kv_offload_dir="/kv"),
        ),
        (["--device-budget-gib", "1", "--kv-host-gib", "0"], dict(kv_host_budget_bytes=0)),
    ],
)
def test_worker_flags_reach_the_engine_config(argv, want) -> None:
    eng = parse([*BASE, *argv], Role.DECODE).engine
    assert {k: getattr(eng, k) for k in want} == want


REFUSED = [
    (["--kv-budget-gib", "-1"], "--kv-budget-gib must be >= 0 GiB, got -1.0"),
    (["--device-budget-gib", "nan"], "--device-budget-gib must be >= 0 GiB"),
    (
        ["--kv-budget-gib", "1", "--device-budget-gib", "2"],
        "--kv-budget-gib contradicts --device-budget-gib",
    ),
    (
        ["--weight-budget-gib", "1", "--device-budget-gib", "2"],
        "--weight-budget-gib contradicts --device-budget-gib",
    ),
    (
        ["--offline-batch"],
        "--offline-batch sizes the batch for offloaded weights: it needs --weight-budget-gib",
    ),
    (["--kv-budget-gib", "1", "--offline-batch"], "--offline-batch sizes the batch"),
    (
        ["--weight-budget-gib", "1", "--offline-batch", "--scheduling-policy", "mlfq"],
        "--offline-batch is an offline throughput job",
    ),
    (["--weight-budget-gib", "1", "--weight-host-gib", "-1"], "--weight-host-gib must be >= 0 GiB"),
    (
        ["--weight-host-gib", "2"],
        "--weight-host-gib places offloaded weights: it needs weight offloading (--weight-budget-gib "
        "or --device-budget-gib)",
    ),
    (["--kv-budget-gib", "1", "--weight-offload-dir", "/s"], "--weight-offload-dir places offloaded"),
    (["--kv-budget-gib", "1", "--kv-host-gib", "nan"], "--kv-host-gib must be >= 0 GiB"),
    (
        ["--weight-budget-gib", "1", "--kv-host-gib", "1"],
        "--kv-host-gib places offloaded KV: it needs KV offloading (--kv-budget-gib or --device-budget-gib)",
    ),
    (["--kv-offload-dir", "/s"], "--kv-offload-dir places offloaded KV"),
]


@pytest.mark.parametrize("argv, why", REFUSED)
def test_worker_flags_refused_naming_the_flag(argv, why, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *argv], Role.DECODE)
    assert why in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--tp", "2", "--kv-budget-gib", "1"], "--kv-budget-gib offloading is not supported with tensor"),
        (["--tp", "2", "--device-budget-gib", "1"], "--device-budget-gib offloading is not supported"),
        (
            ["--weight-budget-gib", "1", "--offline-batch", "--speculative-tokens", "2"],
            "--offline-batch is not supported with --speculative-tokens",
        ),
        (["--device-budget-gib", "1", "--lora", "a=/x"], "--lora is not supported with --device-budget-gib"),
    ],
)
def test_worker_only_refusals(argv, why, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *argv], Role.DECODE)
    assert why in capsys.readouterr().err


# ------------------------------------------------------------------------------- pdserve serve
def test_serve_forwards_the_flags_to_the_workers(monkeypatch) -> None:
    rc, args = serve_worker_args(
        monkeypatch, ["--weight-budget-gib", "1", "--kv-budget-gib", "0.25", "--offline-batch"]
    )
    assert args == ("--weight-budget-gib", "1.0", "--kv-budget-gib", "0.25", "--offline-batch")
    eng = parse([*BASE, *args], Role.DECODE).engine
    assert (eng.weight_memory_budget_bytes, eng.kv_memory_budget_bytes, eng.offline_batch) == (
        GIB,
        GIB // 4,
        True,
    )
    rc, args = serve_worker_args(monkeypatch, ["--device-budget-gib", "3"])
    assert args == ("--device-budget-gib", "3.0")
    assert parse([*BASE, *args], Role.DECODE).engine.device_memory_budget_bytes == 3 * GIB
    rc, args = serve_worker_args(monkeypatch, [])
    assert args == ()
    rc, args = serve_worker_args(
        monkeypatch,
        ["--weight-budget-gib", "1", "--weight-host-gib", "0.5", "--weight-offload-dir", "/scratch"],
    )
    assert args == (
        "--weight-budget-gib",
        "1.0",
        "--weight-host-gib",
        "0.5",
        "--weight-offload-dir",
        "/scratch",
    )
    eng = parse([*BASE, *args], Role.DECODE).engine
    assert (eng.weight_host_budget_bytes, eng.weight_offload_dir) == (GIB // 2, "/scratch")
    rc, args = serve_worker_args(
        monkeypatch, ["--kv-budget-gib", "1", "--kv-host-gib", "inf", "--kv-offload-dir", "/kv"]
    )
    assert args == ("--kv-budget-gib", "1.0", "--kv-host-gib", "inf", "--kv-offload-dir", "/kv")
    eng = parse([*BASE, *args], Role.DECODE).engine
    assert (eng.kv_host_budget_bytes, eng.kv_offload_dir, eng.kv_memory_budget_bytes) == (None, "/kv", GIB)


@pytest.mark.parametrize("argv, why", REFUSED)
def test_serve_refuses_before_launching(monkeypatch, capsys, argv, why) -> None:
    rc, args = serve_worker_args(monkeypatch, argv)
    assert rc == 2 and args is None
    assert f"pdserve serve: {why}" in capsys.readouterr().err


# ------------------------------------------------------------------------------- Ray pool keys
def test_pool_keys_reach_the_engine_config() -> None:
    from pdserve.cluster_config import from_dict

    c = from_dict(
        {
            "model": "/m",
            "decode": {"weight_budget_gib": 1.0, "kv_budget_gib": 0.5, "offline_batch": True},
            "prefill": {"device_budget_gib": 2},
        }
    )
    d = c.decode.engine_config()
    assert (d.weight_memory_budget_bytes, d.kv_memory_budget_bytes, d.offline_batch) == (GIB, GIB // 2, True)
    assert d.device_memory_budget_bytes is None
    p = c.prefill.engine_config()
    assert (p.device_memory_budget_bytes, p.weight_memory_budget_bytes, p.kv_memory_budget_bytes) == (
        2 * GIB,
        None,
        None,
    )
    assert p.offline_batch is False
    plain = from_dict({"model": "/m"}).decode.engine_config()  # 0 / false: off
    assert (plain.kv_memory_budget_bytes, plain.device_memory_budget_bytes, plain.offline_batch) == (
        None,
        None,
        False,
    )
    assert (plain.weight_host_budget_bytes, plain.weight_offload_dir) == (None, None)


def test_weight_tier_pool_keys_reach_the_engine_config() -> None:
    from pdserve.cluster_config import from_dict

    c = from_dict(
        {
            "model": "/m",
            "decode": {"weight_budget_gib": 1, "weight_host_gib": 0, "weight_offload_dir": "/scratch"},
            "prefill": {"device_budget_gib": 2, "weight_host_gib": 0.5},
        }
    )
    d = c.decode.engine_config()
    assert (d.weight_host_budget_bytes, d.weight_offload_dir) == (0, "/scratch")  # 0: all on disk
    p = c.prefill.engine_config()
    assert (p.weight_host_budget_bytes, p.weight_offload_dir) == (GIB // 2, None)
    inf = from_dict({"model": "/m", "decode": {"weight_budget_gib": 1, "weight_host_gib": float("inf")}})
    assert inf.decode.engine_config().weight_host_budget_bytes is None  # .inf: no limit
    kv = from_dict(
        {"model": "/m", "decode": {"kv_budget_gib": 1, "kv_host_gib": 0.5, "kv_offload_dir": "/kv"}}
    ).decode.engine_config()
    assert (kv.kv_host_budget_bytes, kv.kv_offload_dir) == (GIB // 2, "/kv")


@pytest.mark.parametrize(
    "pool, why",
    [
        ({"kv_budget_gib": -1}, r"decode\.kv_budget_gib: must be >= 0 GiB"),
        ({"device_budget_gib": float("inf")}, r"decode\.device_budget_gib: must be >= 0 GiB"),
        (
            {"kv_budget_gib": 1, "device_budget_gib": 2},
            r"decode\.kv_budget_gib: contradicts decode\.device_budget_gib",
        ),
        (
            {"weight_budget_gib": 1, "device_budget_gib": 2},
            r"decode\.weight_budget_gib: contradicts decode\.device_budget_gib",
        ),
        (
            {"offline_batch": True},
            r"decode\.offline_batch: sizes the batch .* needs decode\.weight_budget_gib",
        ),
        (
            {"offline_batch": True, "weight_budget_gib": 1, "scheduling_policy": "mlfq"},
            r"decode\.offline_batch: is an offline throughput job",
        ),
        ({"kv_budget_gib": 1, "tp": 2}, r"decode\.kv_budget_gib: offloading is not supported with tensor"),
        ({"offline_batch": "yes"}, r"decode\.offline_batch"),
        ({"weight_budget_gib": 1, "weight_host_gib": -1}, r"decode\.weight_host_gib: must be >= 0 GiB"),
        (
            {"weight_host_gib": 1},
            r"decode\.weight_host_gib: places offloaded weights: it needs weight offloading "
            r"\(decode\.weight_budget_gib or decode\.device_budget_gib\)",
        ),
        ({"weight_offload_dir": "/s"}, r"decode\.weight_offload_dir: places offloaded weights"),
        ({"weight_budget_gib": 1, "weight_offload_dir": 3}, r"decode\.weight_offload_dir: expected a string"),
        ({"kv_budget_gib": 1, "kv_host_gib": -2}, r"decode\.kv_host_gib: must be >= 0 GiB"),
        ({"kv_host_gib": 1}, r"decode\.kv_host_gib: places offloaded KV: it needs KV offloading"),
        ({"device_budget_gib": 0, "kv_offload_dir": "/kv"}, r"decode\.kv_offload_dir: places offloaded KV"),
    ],
)
def test_pool_keys_refused_naming_the_key(pool, why) -> None:
    from pdserve.cluster_config import from_dict
    from pdserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=why):
        from_dict({"model": "/m", "decode": pool})


# ------------------------------------------------------------------------------- pdserve generate
@pytest.mark.parametrize(
    "argv, why",
    [
        (
            ["hi", "--kv-budget-gib", "1"],
            "--kv-budget-gib sets up the engine in this process: it needs --embedded",
        ),
        (["hi", "--offline-batch"], "--offline-batch sets up the engine"),
        (["--prompts-file", "/nonexistent"], "--prompts-file sets up the engine"),
        (["hi", "--weight-budget-gib", "0"], "--weight-budget-gib sets up the engine"),
        ([], "give a PROMPT or --prompts-file FILE"),
        (["hi", "--embedded", "--no-progress"], "--no-progress needs --prompts-file FILE"),
        (["hi", "--prompts-file", "f", "--embedded"], "give a PROMPT or --prompts-file FILE"),
        (
            ["--embedded", "--prompts-file", "f", "--adapter", "a"],
            "--adapter is not supported with --prompts-file",
        ),
        (["hi", "--embedded", "--offline-batch"], "pdserve generate: --offline-batch sizes the batch"),
        (
            ["hi", "--embedded", "--kv-budget-gib", "1", "--device-budget-gib", "1"],
            "pdserve generate: --kv-budget-gib contradicts --device-budget-gib",
        ),
    ],
)
def test_generate_refuses(argv, why, capsys, monkeypatch) -> None:
    import pdserve.cli as cli

    monkeypatch.setattr("pdserve.model_setup.resolve_model_path", lambda m: Path("/m"))
    assert cli.main(["generate", *argv]) == 2
    assert why in capsys.readouterr().err


def test_generate_refuses_an_empty_prompts_file(tmp_path, capsys, monkeypatch) -> None:
    import pdserve.cli as cli

    monkeypatch.setattr("pdserve.model_setup.resolve_model_path", lambda m: Path("/m"))
    f = tmp_path / "p.txt"
    f.write_text("\n  \n")
    assert cli.main(["generate", "--embedded", "--prompts-file", str(f)]) == 2
    assert "no prompts" in capsys.readouterr().err


# 8 decoder layers (KV offloading keeps at least two layers' KV on the device), SmolLM2's tokenizer
NUM_LAYERS = 8
BLOCKS = 64
LAYER_KV = 2 * BLOCKS * 16 * 2 * 16 * 4  # (K, V) x blocks x block size x KV heads x head dim x fp32


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, smollm_path) -> Path:
    from transformers import LlamaConfig

    from tests.tiny_models import COMMON, random_model

    cfg = LlamaConfig(
        **{**COMMON, "num_hidden_layers": NUM_LAYERS, "vocab_size": 49152}, tie_word_embeddings=False
    )
    model = random_model(cfg, 5)
    d = tmp_path_factory.mktemp("offload-cli") / "llama8"
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm_path / f, d / f)
    return d


def _generate(model: Path, prompts: Path, extra: list[str], capsys) -> tuple[list[dict], str]:
    import pdserve.cli as cli

    argv = ["generate", "--embedded", "--model", str(model), "--prompts-file", str(prompts), "--no-chat"]
    assert cli.main([*argv, "--max-tokens", "8", "--kv-blocks", str(BLOCKS), *extra]) == 0
    out = capsys.readouterr()
    return [json.loads(ln) for ln in out.out.splitlines()], out.err


def test_generate_prompts_file_offloaded_equals_resident(deep_model, tmp_path, capsys) -> None:
    prompts = ["The capital of France is", "Once upon a time", "hello world, said the", "1 2 3 4 5"]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts[:2]) + "\n\n" + "\n".join(prompts[2:]) + "\n")  # a blank line skipped
    want, err = _generate(deep_model, f, [], capsys)
    assert [r["prompt"] for r in want] == prompts and [r["index"] for r in want] == [0, 1, 2, 3]
    assert all(r["completion_tokens"] == 8 and r["finish_reason"] == "length" for r in want)
    assert "4/4" in err and "[llama8: 4 prompts, 32 tokens" in err  # the progress bar and summary
    assert "KV offload" not in err and "offline batch" not in err
    # half the layers' KV off the device: (8 - 4 + 2 staging buffers) layers' KV, in GiB
    kv_gib = (NUM_LAYERS - 4 + 2) * LAYER_KV / (1 << 30)
    got, err = _generate(deep_model, f, ["--kv-budget-gib", repr(kv_gib)], capsys)
    assert "[KV offload: 4 of 8 layers' KV in host memory]" in err
    assert got == want
    # weights offloaded + offline batch: the chosen batch size is printed, output unchanged
    got, err = _generate(
        deep_model, f, ["--weight-budget-gib", "0.0244", "--offline-batch", "--no-progress"], capsys
    )
    assert "[offline batch: " in err and " sequences (predicted step " in err
    assert "4/4" not in err
    assert got == want
    # one device budget for both, split by the cost model
    got, err = _generate(deep_model, f, ["--device-budget-gib", "0.0255", "--offline-batch"], capsys)
    assert "device budget split: weights " in err and "offline batch: " in err
    assert got == want
