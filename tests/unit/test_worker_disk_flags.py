"""Worker flags of the engine's disk KV tier (--swap-disk, --swap-disk-dir; #15)."""

from __future__ import annotations

import pytest

from pdserve.worker_base import Role
from pdserve.worker_main import parse

BASE = ["--worker-id", "d0", "--model", "/m", "--store", "127.0.0.1:1", "--tls", "off"]


def test_swap_disk_flags_reach_the_engine_config(tmp_path) -> None:
    cfg = parse(
        [*BASE, "--swap-space", "0.5", "--swap-disk", "2", "--swap-disk-dir", str(tmp_path)], Role.DECODE
    ).engine
    assert cfg.swap_space_bytes == 1 << 29 and cfg.swap_disk_bytes == 2 << 30
    assert cfg.swap_disk_dir == str(tmp_path)
    default = parse(BASE, Role.DECODE).engine
    assert default.swap_disk_bytes == 0 and default.swap_disk_dir is None


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--swap-space", "1", "--swap-disk", "-1"], "--swap-disk must be >= 0 GiB"),
        (["--swap-space", "1", "--swap-disk", "inf"], "--swap-disk must be >= 0 GiB"),
        (["--swap-disk", "1"], "--swap-disk needs --swap-space"),
        (["--swap-space", "1", "--swap-disk-dir", "/tmp"], "--swap-disk-dir needs --swap-disk"),
    ],
)
def test_bad_swap_disk_flags_are_refused_naming_them(extra: list[str], why: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parse([*BASE, *extra], Role.DECODE)
    assert why in capsys.readouterr().err
