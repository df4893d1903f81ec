"""router.log_buffer: the router's log lines written in batches, whole and in order, warnings at
once, everything flushed within the interval and at exit (#12)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CHILD = textwrap.dedent(
    """
    import logging, sys, time
    from pdserve.tracing import configure_logging, log_event
    from router.log_buffer import BufferedStreamHandler, buffer_log_writes
    configure_logging("router")
    h = buffer_log_writes(interval_s=float(sys.argv[1]))
    assert isinstance(h, BufferedStreamHandler), h
    log = logging.getLogger("router.service")
    for i in range(int(sys.argv[2])):
        log_event(log, "request done", n=i)
    if sys.argv[3] == "warn":
        log_event(log, "a warning", level=logging.WARNING)
    print("logged", flush=True)
    time.sleep(float(sys.argv[4]))
    """
)


def _child(interval: float, n: int, warn: str, sleep: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(interval), str(n), warn, str(sleep)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_refuses_a_non_positive_interval():
    from router.log_buffer import buffer_log_writes

    with pytest.raises(ValueError, match="interval_s"):
        buffer_log_writes(interval_s=0)


def test_lines_are_whole_in_order_and_flushed_at_exit():
    p = _child(60.0, 2000, "no", 0.0)  # the flusher never runs: exit flushes
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    lines = err.splitlines()
    assert len(lines) == 2000
    assert [int(x.split('"n":')[1].rstrip("}")) for x in lines] == list(range(2000))


def test_info_lines_reach_the_pipe_within_the_interval_and_warnings_at_once():
    p = _child(0.2, 3, "warn", 30.0)
    try:
        assert p.stdout.readline().strip() == "logged"
        t0 = time.monotonic()
        got = [p.stderr.readline() for _ in range(4)]  # the warning flushed the 3 lines before it
        assert time.monotonic() - t0 < 5
        assert ['"request done"' in x for x in got] == [True, True, True, False] and "a warning" in got[3]
    finally:
        p.kill()
        p.communicate(timeout=30)


def test_info_lines_alone_are_flushed_by_the_timer():
    p = _child(0.2, 2, "no", 30.0)
    try:
        assert p.stdout.readline().strip() == "logged"
        t0 = time.monotonic()
        got = [p.stderr.readline() for _ in range(2)]
        assert time.monotonic() - t0 < 5  # 0.2 s flushes, not the 30 s exit
        assert all('"request done"' in x for x in got)
    finally:
        p.kill()
        p.communicate(timeout=30)
