"""Worker flags that set the engine's swap space, scheduling policy and weight offloading (#15)."""

from __future__ import annotations

import pytest

from engine.scheduler import SchedulingPolicy
from pdserve.worker_base import Role
from pdserve.worker_main import parse
from tests.serve_args import serve_worker_args

BASE = ["--worker-id", "d0", "--model", "/m", "--store", "127.0.0.1:1", "--tls", "off"]


def test_swap_space_and_policy_reach_the_engine_config() -> None:
    cfg = parse([*BASE, "--swap-space", "0.5", "--scheduling-policy", "mlfq"], Role.DECODE)
    assert cfg.engine.swap_space_bytes == 1 << 29
    assert cfg.engine.scheduling_policy is SchedulingPolicy.MLFQ
    default = parse(BASE, Role.DECODE).engine
    assert default.swap_space_bytes == 0 and default.scheduling_policy is SchedulingPolicy.PRIORITY


def test_speculative_flags_reach_the_engine_config() -> None:
    """--speculative-tokens K (prompt lookup, #17): off by default."""
    from engine.spec_decode.config import SpecMethod

    spec = parse(
        [*BASE, "--speculative-tokens", "3", "--speculative-ngram", "2"], Role.DECODE
    ).engine.speculative
    assert spec is not None and spec.method is SpecMethod.NGRAM
    assert (spec.num_speculative_tokens, spec.ngram_min, spec.ngram_max) == (3, 1, 2)
    assert parse(BASE, Role.DECODE).engine.speculative is None


def test_speculative_draft_model_flags_reach_the_engine_config() -> None:
    """--speculative-draft-model PATH (draft-model speculation, #17), coupled by default."""
    from engine.spec_decode.config import DraftAcceptance, SpecMethod

    argv = [*BASE, "--speculative-tokens", "5", "--speculative-draft-model", "/d"]
    spec = parse(argv, Role.DECODE).engine.speculative
    assert spec is not None and spec.method is SpecMethod.DRAFT_MODEL
    assert (spec.num_speculative_tokens, spec.draft_model, spec.acceptance) == (
        5,
        "/d",
        DraftAcceptance.COUPLED,
    )
    spec = parse([*argv, "--speculative-acceptance", "rejection"], Role.DECODE).engine.speculative
    assert spec is not None and spec.acceptance is DraftAcceptance.REJECTION


def test_weight_offload_flags_reach_the_engine_config(tmp_path) -> None:
    cfg = parse(
        [
            *BASE,
            "--weight-budget-gib",
            "0.25",
            "--weight-host-gib",
            "0.5",
            "--weight-offload-dir",
            str(tmp_path),
        ],
        Role.PREFILL,
    ).engine
    assert cfg.weight_memory_budget_bytes == 1 << 28
    assert cfg.weight_host_budget_bytes == 1 << 29
    assert cfg.weight_offload_dir == str(tmp_path)
    default = parse(BASE, Role.PREFILL).engine
    assert default.weight_memory_budget_bytes is None and default.weight_host_budget_bytes is None


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--swap-space", "-1"], "--swap-space must be >= 0 GiB"),
        (["--swap-space", "nan"], "--swap-space must be >= 0 GiB"),
        (["--swap-space", "1", "--tp", "2"], "not supported with tensor_parallel_size > 1"),
        (["--scheduling-policy", "lifo"], "invalid choice: 'lifo'"),
        (["--weight-budget-gib", "-1"], "--weight-budget-gib must be >= 0 GiB"),
        (["--weight-budget-gib", "inf"], "--weight-budget-gib must be >= 0 GiB"),
        (["--weight-budget-gib", "1", "--weight-host-gib", "nan"], "--weight-host-gib must be >= 0 GiB"),
        (["--weight-budget-gib", "1", "--tp", "2"], "not supported with tensor_parallel_size > 1"),
        (["--weight-budget-gib", "1", "--weight-dtype", "int8"], "not supported with weight_dtype 'int8'"),
        (
            ["--weight-host-gib", "1"],
            "--weight-host-gib places offloaded weights: it needs weight offloading",
        ),
        (["--weight-budget-gib", "1", "--lora", "a=/x"], "--lora is not supported with --weight-budget-gib"),
        (["--speculative-tokens", "-1"], "--speculative-tokens must be >= 0"),
        (["--speculative-tokens", "17"], "num_speculative_tokens must be in [1, 16]"),
        (["--speculative-tokens", "4", "--speculative-ngram", "0"], "ngram_min <= ngram_max"),
        (["--speculative-tokens", "4", "--tp", "2"], "tensor"),
        (["--speculative-draft-model", "/d"], "--speculative-draft-model needs --speculative-tokens"),
        (["--speculative-acceptance", "rejection"], "--speculative-acceptance rejection needs"),
        (["--speculative-tokens", "2", "--speculative-draft-model", "/d", "--tp", "2"], "tensor"),
        (
            ["--speculative-tokens", "2", "--speculative-draft-model", "/d", "--lora", "a=/x"],
            "--speculative-tokens is not supported with --lora",
        ),
        (
            ["--speculative-tokens", "4", "--lora", "a=/x"],
            "--speculative-tokens is not supported with --lora",
        ),
    ],
)
def test_bad_values_are_refused_naming_them(extra: list[str], why: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *extra], Role.DECODE)
    assert why in capsys.readouterr().err


def test_ray_pool_weight_budget_reaches_the_engine_config() -> None:
    from pdserve.cluster_config import from_dict

    c = from_dict({"model": "/m", "prefill": {"weight_budget_gib": 0.5}})
    assert c.prefill.engine_config().weight_memory_budget_bytes == 1 << 29
    assert c.decode.engine_config().weight_memory_budget_bytes is None  # 0: all resident


@pytest.mark.parametrize(
    ("pool", "why"),
    [
        ({"weight_budget_gib": -1}, r"prefill.weight_budget_gib: must be >= 0"),
        ({"weight_budget_gib": 1, "tp": 2}, r"prefill.weight_budget_gib: weight offloading .*tensor"),
    ],
)
def test_ray_pool_bad_weight_budget_is_refused(pool: dict, why: str) -> None:
    from pdserve.cluster_config import from_dict
    from pdserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=why):
        from_dict({"model": "/m", "prefill": pool})


def test_serve_passes_swap_policy_and_weight_budget_to_the_workers(monkeypatch) -> None:
    """`pdserve serve --swap-space/--scheduling-policy/--weight-budget-gib` become worker flags."""
    rc, args = serve_worker_args(
        monkeypatch,
        [
            "--swap-space",
            "0.5",
            "--scheduling-policy",
            "mlfq",
            "--weight-budget-gib",
            "0.25",
            "--swap-disk",
            "1",
            "--swap-disk-dir",
            "/tmp",
        ],
    )
    assert rc is None  # the launch was reached
    args = list(args)
    assert args == [
        "--swap-space",
        "0.5",
        "--swap-disk",
        "1.0",
        "--swap-disk-dir",
        "/tmp",
        "--scheduling-policy",
        "mlfq",
        "--weight-budget-gib",
        "0.25",
    ]
    # each is a flag the workers parse into their engine config
    eng = parse([*BASE, *args], Role.DECODE).engine
    assert eng.swap_space_bytes == 1 << 29 and eng.scheduling_policy is SchedulingPolicy.MLFQ
    assert eng.weight_memory_budget_bytes == 1 << 28
    assert eng.swap_disk_bytes == 1 << 30 and eng.swap_disk_dir == "/tmp"
