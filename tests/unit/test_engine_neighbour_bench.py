"""bench/engine_neighbour.py: every mode generates every token with its neighbour running on the
other core, the neighbour is gone after the run, and bad arguments are refused naming them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the bench pins to two cores")
def test_every_mode_generates_every_token_and_stops_its_neighbour(tmp_path) -> None:
    from bench.cluster_load import make_engine, tiny_model, torch_threads
    from bench.engine_neighbour import MODES, neighbour, run_once

    other = sorted(os.sched_getaffinity(0))[1]
    p = neighbour("memory", other, 1 << 20)
    try:
        assert p is not None and p.poll() is None  # running, pinned there
        assert os.sched_getaffinity(p.pid) == {other}
    finally:
        p.kill()
        p.wait()
    assert neighbour("idle", other, 1 << 20) is None
    with torch_threads(1):
        eng = make_engine(str(tiny_model(tmp_path)), 64)
        try:
            runs = [run_once(eng, m, other, 1 << 20, 4, 6, 20, 6, offset=7) for m in MODES]
        finally:
            eng.close()
    assert [r.tokens for r in runs] == [6 * 20] * 3
    assert all(r.cpu_s > 0 and r.tps > 0 for r in runs)


@pytest.mark.parametrize(
    ("argv", "words"),
    [(["--modes", "idle,disk"], "unknown mode(s) ['disk']"), (["--repeats", "0"], "--repeats must be >= 1")],
)
def test_bad_arguments_are_refused_naming_them(argv, words, capsys) -> None:
    from bench.engine_neighbour import main

    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert words in str(ei.value)
