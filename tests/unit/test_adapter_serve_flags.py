"""``pdserve serve --lora NAME=PATH`` (#16): every adapter reaches every worker's command line as
``--lora NAME=ABSOLUTE_PATH`` (workers run in other directories), a malformed one is refused before
anything starts, and with several ``--model`` it is refused (an adapter fits one base model).
The launcher is replaced by a fake that records the ClusterSpec and stops there; the workers'
own parsing of the flag is tests/unit/test_lora_serving.py::test_worker_lora_flags, and a launched
cluster serving it tests/integration/test_lora_cluster.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.lora import AdapterSpec, LoRAConfig
from pdserve.worker_base import Role
from pdserve.worker_main import parse


def _lora_pairs(worker_args: tuple[str, ...]) -> list[str]:
    return [worker_args[i + 1] for i, a in enumerate(worker_args) if a == "--lora"]


def test_serve_lora_reaches_every_worker_with_absolute_paths(captured, tmp_path, monkeypatch) -> None:
    from pdserve import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    (tmp_path / "chat").mkdir()
    argv = ["serve", "--tls", "off", "--lora", "sql=adapters/sql", "--lora", f"chat={tmp_path / 'chat'}"]
    with pytest.raises(SystemExit):
        cli.main(argv)
    spec = captured.pop("spec")
    want = [f"sql={tmp_path / 'adapters' / 'sql'}", f"chat={tmp_path / 'chat'}"]
    assert _lora_pairs(spec.worker_args) == want
    assert all(Path(p.partition("=")[2]).is_absolute() for p in want)
    # what a worker makes of those flags (the launcher passes worker_args to every worker)
    common = ["--worker-id", "w", "--model", "/models/default", "--store", "127.0.0.1:1"]
    for role in (Role.PREFILL, Role.DECODE):
        cfg = parse([*common, *spec.worker_args], role)
        assert cfg.lora == LoRAConfig(
            (
                AdapterSpec("sql", str(tmp_path / "adapters" / "sql")),
                AdapterSpec("chat", str(tmp_path / "chat")),
            )
        )


def test_serve_without_lora_passes_none(captured) -> None:
    from pdserve import cli

    with pytest.raises(SystemExit):
        cli.main(["serve", "--tls", "off"])
    assert _lora_pairs(captured.pop("spec").worker_args) == []


@pytest.mark.parametrize("bad", ["sql", "=x", "sql=", "bad name=/x"])
def test_serve_refuses_a_malformed_lora_before_launching(captured, capsys, bad) -> None:
    from pdserve import cli

    assert cli.main(["serve", "--tls", "off", "--lora", bad]) == 2
    assert "spec" not in captured
    err = capsys.readouterr().err
    assert "pdserve serve:" in err and ("NAME=PATH" in err or "not valid" in err), err


def test_serve_refuses_a_lora_folder_that_is_not_there_before_launching(captured, capsys, tmp_path) -> None:
    """`pdserve serve --lora foo=/nonexistent` started the store and router; the decode worker then
    died ("LoRA adapter 'foo': folder '/nonexistent' does not exist")."""
    from pdserve import cli

    assert cli.main(["serve", "--tls", "off", "--lora", f"foo={tmp_path / 'nope'}"]) == 2
    assert "spec" not in captured
    assert f"--lora foo={tmp_path / 'nope'}: no adapter folder at" in capsys.readouterr().err
