"""The Ray test harness's start retry (tests/ray_harness.py), with a fake Cluster class: a start
that times out is retried after every process it left is killed; any other error is raised."""

from __future__ import annotations

import subprocess
import time

import psutil
import pytest

from tests import ray_harness


class _FakeCluster:
    """Fails its first ``fail`` constructions the way Ray does, each after spawning a process that
    would otherwise outlive the failed start (as a hung gcs_server does)."""

    made: list[_FakeCluster] = []
    left: list[subprocess.Popen] = []
    fail = 1
    error = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y"

    def __init__(self, initialize_head: bool, head_node_args: dict) -> None:
        assert initialize_head and head_node_args["include_dashboard"] is False
        if len(_FakeCluster.left) < _FakeCluster.fail:
            _FakeCluster.left.append(subprocess.Popen(["sleep", "60"]))
            raise RuntimeError(_FakeCluster.error)
        self.nodes = [head_node_args]
        _FakeCluster.made.append(self)

    def add_node(self, **node: object) -> None:
        self.nodes.append(node)

    def shutdown(self) -> None:  # pragma: no cover - only a failed add_node calls it
        raise AssertionError("not started")


@pytest.fixture(autouse=True)
def _reset():
    _FakeCluster.made, _FakeCluster.left = [], []
    yield
    for p in _FakeCluster.left:
        p.kill()
        p.wait()


def _gone(p: subprocess.Popen) -> bool:
    deadline = time.monotonic() + 5
    while p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return p.poll() is not None


def test_a_gcs_port_timeout_is_retried_after_killing_what_it_left(capfd):
    _FakeCluster.fail = 2
    c = ray_harness._start_cluster(_FakeCluster, {"num_cpus": 2})
    assert _FakeCluster.made == [c] and c.nodes[1] == {"num_cpus": 2}
    assert len(_FakeCluster.left) == 2 and all(_gone(p) for p in _FakeCluster.left)
    err = capfd.readouterr().err
    assert "attempt 1/3 timed out" in err and "attempt 2/3 timed out" in err
    assert f"{_FakeCluster.left[0].pid} sleep" in err


def test_the_last_timeout_is_raised():
    _FakeCluster.fail = ray_harness.START_ATTEMPTS
    with pytest.raises(RuntimeError, match="gcs_server_port"):
        ray_harness._start_cluster(_FakeCluster, {})
    assert not _FakeCluster.made and all(_gone(p) for p in _FakeCluster.left)


def test_another_error_is_raised_at_once(monkeypatch):
    monkeypatch.setattr(_FakeCluster, "error", "object store memory too small")
    _FakeCluster.fail = 1
    with pytest.raises(RuntimeError, match="object store"):
        ray_harness._start_cluster(_FakeCluster, {})
    assert len(_FakeCluster.left) == 1 and _gone(_FakeCluster.left[0])
    assert not any(p.pid == _FakeCluster.left[0].pid for p in psutil.Process().children())
