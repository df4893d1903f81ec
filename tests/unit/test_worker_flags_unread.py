"""Worker flags read only together with another flag: given alone they are refused naming it,
instead of accepted and dropped (the worker then ran without them)."""

from __future__ import annotations

import pytest

from pdserve.worker_base import Role
from pdserve.worker_main import parse, parse_dist_args

BASE = ["--worker-id", "d0", "--model", "/m", "--store", "127.0.0.1:1", "--tls", "off"]


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--max-loras", "2"], "--max-loras needs --lora NAME=PATH or --max-lora-rank R"),
        (["--speculative-ngram", "2"], "--speculative-ngram sizes prompt-lookup drafting"),
        (
            ["--speculative-tokens", "3", "--speculative-draft-model", "/d", "--speculative-ngram", "2"],
            "--speculative-ngram sizes prompt-lookup drafting",
        ),
    ],
)
def test_worker_flag_without_the_flag_it_needs_is_refused(flags, why, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *flags], Role.DECODE)
    assert why in capsys.readouterr().err


def test_max_loras_with_adapter_slots_is_kept() -> None:
    cfg = parse([*BASE, "--max-lora-rank", "8", "--max-loras", "2"], Role.DECODE)
    assert cfg.lora is not None and cfg.lora.max_loras == 2


@pytest.mark.parametrize(
    "flags",
    [
        ["--dist-rank", "1"],
        ["--dist-world", "3"],
        ["--dist-backend", "nccl"],
        ["--dist-timeout-s", "5"],
        ["--dist-outbox-bytes", "1024"],
    ],
)
def test_dist_flags_without_dist_init_are_refused(flags, capsys) -> None:
    """Without --dist-init the worker joins no process group: KV moved through the store and the
    --dist-* value was dropped."""
    with pytest.raises(SystemExit):
        parse_dist_args(["--model", "m", *flags])
    assert f"{flags[0]} needs --dist-init" in capsys.readouterr().err
