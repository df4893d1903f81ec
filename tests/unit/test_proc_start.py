"""pdserve.proc_start: processes started one by one or as chains side by side, with tiny Python
children that print a ready line (no cluster).

Checked: a chain's next process starts only after the one before is ready, two chains overlap,
every ready line comes back by name, a process that exits without a ready line fails at once
naming it and its error line (stopping the cluster, starting nothing more), and one that prints
nothing fails at its own timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pdserve.errors import UnavailableError
from pdserve.proc_start import Starting, _state, await_ready, error_line, ready_info, spawn_chains, start

ROOT = Path(__file__).resolve().parents[2]


class FakeCluster:
    """The cluster fields proc_start records, and stop() as LocalCluster's (kill what runs)."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, list[str]] = {}
        self.logs: dict[str, list[str]] = {}
        self.metrics: dict[str, str] = {}
        self.stopped = 0

    def stop(self) -> None:
        self.stopped += 1
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def _child(name: str, delay_s: float, stamp_dir: Path, ready: bool = True, fail: str = "") -> list[str]:
    """``python -c`` args: record its start time, sleep ``delay_s``, then print a ready line (or
    fail with ``fail`` / print nothing and wait), then wait to be stopped."""
    body = [
        "import json, sys, time",
        f"open({str(stamp_dir / name)!r}, 'w').write(repr(time.time()))",
        f"time.sleep({delay_s})",
    ]
    if fail:
        body += [f"print('child: error: {fail}', flush=True)", "sys.exit(3)"]
    elif ready:
        ready_line = {"address": f"127.0.0.1:{name}", "metrics": f"m-{name}"}
        body += [f"print({json.dumps(ready_line)!r}, flush=True)"]
    body += ["time.sleep(60)"]
    return ["-c", "\n".join(body)]


def _starter(
    cl: FakeCluster, name: str, args: list[str], timeout_s: float, wake: threading.Event
) -> Starting:
    return start(cl, name, args, timeout_s, dict(os.environ), ROOT, wake)


def _started(stamp_dir: Path, name: str) -> float:
    return float((stamp_dir / name).read_text())


def test_chains_start_side_by_side_and_in_order_within_each(tmp_path) -> None:
    cl = FakeCluster()
    chains = [
        [("a0", _child("a0", 0.8, tmp_path)), ("a1", _child("a1", 0.0, tmp_path))],
        [("b0", _child("b0", 0.0, tmp_path))],
    ]
    try:
        ready = spawn_chains(cl, chains, 60.0, _starter)
        assert set(ready) == {"a0", "a1", "b0"}
        assert ready["a1"]["address"] == "127.0.0.1:a1"
        assert cl.metrics == {n: f"m-{n}" for n in ("a0", "a1", "b0")}
        assert list(cl.procs) == ["a0", "b0", "a1"]  # a1 only after a0 was ready
        assert _started(tmp_path, "a1") >= _started(tmp_path, "a0") + 0.8  # waited for a0's ready line
        assert _started(tmp_path, "b0") < _started(tmp_path, "a1")  # b0 did not wait for a0
        assert cl.stopped == 0
    finally:
        cl.stop()


def test_a_process_that_exits_fails_at_once_naming_it_and_starts_nothing_more(tmp_path) -> None:
    cl = FakeCluster()
    chains = [
        [("a0", _child("a0", 30.0, tmp_path)), ("a1", _child("a1", 0.0, tmp_path))],
        [("b0", _child("b0", 0.2, tmp_path, fail="cannot load model x"))],
    ]
    t0 = time.monotonic()
    with pytest.raises(UnavailableError) as ei:
        spawn_chains(cl, chains, 60.0, _starter)
    assert time.monotonic() - t0 < 20  # not a0's 30 s, nor the timeout
    msg = str(ei.value)
    assert "b0 exited with status 3 before it was ready: child: error: cannot load model x" in msg
    assert cl.stopped == 1
    assert "a1" not in cl.procs  # never started
    assert cl.procs["a0"].poll() is not None  # stopped with the cluster


def test_a_process_that_prints_nothing_fails_at_its_timeout(tmp_path) -> None:
    cl = FakeCluster()
    with pytest.raises(UnavailableError, match=r"quiet did not start within 1.5s"):
        spawn_chains(cl, [[("quiet", _child("quiet", 0.0, tmp_path, ready=False))]], 1.5, _starter)
    assert cl.stopped == 1 and cl.procs["quiet"].poll() is not None


def test_await_ready_without_stopping_the_cluster_kills_only_the_process(tmp_path) -> None:
    cl = FakeCluster()
    other = start(cl, "other", _child("other", 0.0, tmp_path), 60.0, dict(os.environ), ROOT)
    try:
        assert await_ready(cl, other)["address"] == "127.0.0.1:other"
        bad = start(cl, "bad", _child("bad", 0.0, tmp_path, ready=False), 1.0, dict(os.environ), ROOT)
        with pytest.raises(UnavailableError, match="bad did not start within 1.0s"):
            await_ready(cl, bad, stop_on_failure=False)
        assert cl.stopped == 0
        assert bad.proc.poll() is not None  # killed
        assert cl.procs["other"].poll() is None  # left running
    finally:
        cl.stop()


def test_ready_and_error_lines() -> None:
    assert ready_info('{"address": "127.0.0.1:5"}') == {"address": "127.0.0.1:5"}
    assert ready_info('{"address": "x", "msg": "a JSON log line"}') is None
    assert ready_info("not json") is None and ready_info("{broken") is None
    assert error_line(["x", "prog: error: bad flag", "Traceback"]) == "prog: error: bad flag"
    assert (
        error_line(["Traceback (most recent call last):", "  File x", "ValueError: no"]) == "ValueError: no"
    )
    assert error_line([]) == "(no output)"


def test_the_launcher_spawn_still_names_a_failed_process(tmp_path) -> None:
    from pdserve.launcher import _spawn

    cl = FakeCluster()
    args = ["-c", "import sys; print('x: error: nope', flush=True); sys.exit(2)"]
    with pytest.raises(
        UnavailableError, match="solo exited with status 2 before it was ready: x: error: nope"
    ):
        _spawn(cl, "solo", args, 30.0)  # type: ignore[arg-type]
    assert cl.stopped == 1


def test_parallel_start_off_runs_one_chain(tmp_path) -> None:
    from pdserve.launcher import ClusterSpec, _side_by_side

    chains = [[("a0", ["x"]), ("a1", ["y"])], [("b0", ["z"])]]
    assert _side_by_side(ClusterSpec(model_path=str(tmp_path)), chains) == chains
    one = _side_by_side(ClusterSpec(model_path=str(tmp_path), parallel_start=False), chains)
    assert one == [[("a0", ["x"]), ("a1", ["y"]), ("b0", ["z"])]]


def test_a_ready_line_arriving_during_the_check_is_ready_not_failed() -> None:
    """The pump fills ``ready`` then sets ``got``; when that happens while the waiter is inside
    its own checks (here: during ``poll``), the process is ready, not "output ended without a
    ready line" (which stopped a healthy cluster)."""
    s = Starting("decode-0", None, 60.0, time.monotonic() + 60.0, [])  # type: ignore[arg-type]

    class _Proc:
        def poll(self):  # the pump runs meanwhile
            s.ready.update({"address": "127.0.0.1:1"})
            s.got.set()
            return None

    s.proc = _Proc()  # type: ignore[assignment]
    assert _state(s) is None  # still starting: the next look finds it ready (before: False)
    assert _state(s) is True
