"""Worker flags that set the engine's swap space and scheduling policy (#15)."""

from __future__ import annotations

import pytest

from engine.scheduler import SchedulingPolicy
from pdserve.worker_base import Role
from pdserve.worker_main import parse

BASE = ["--worker-id", "d0", "--model", "/m", "--store", "127.0.0.1:1", "--tls", "off"]


def test_swap_space_and_policy_reach_the_engine_config() -> None:
    cfg = parse([*BASE, "--swap-space", "0.5", "--scheduling-policy", "mlfq"], Role.DECODE)
    assert cfg.engine.swap_space_bytes == 1 << 29
    assert cfg.engine.scheduling_policy is SchedulingPolicy.MLFQ
    default = parse(BASE, Role.DECODE).engine
    assert default.swap_space_bytes == 0 and default.scheduling_policy is SchedulingPolicy.PRIORITY


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--swap-space", "-1"], "--swap-space must be >= 0 GiB"),
        (["--swap-space", "nan"], "--swap-space must be >= 0 GiB"),
        (["--swap-space", "1", "--tp", "2"], "not supported with tensor_parallel_size > 1"),
        (["--scheduling-policy", "lifo"], "invalid choice: 'lifo'"),
    ],
)
def test_bad_values_are_refused_naming_them(extra: list[str], why: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *extra], Role.DECODE)
    assert why in capsys.readouterr().err
