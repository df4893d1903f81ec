"""bench/engine_contention.py: the consumer (the decode worker's event-loop work, in a thread or
in a child process) renders exactly the text the engine renders alone, for every request, and
each mode generates every token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def test_every_mode_generates_every_token_and_renders_the_engines_text(tmp_path) -> None:
    from bench.cluster_load import make_engine, tiny_model, torch_threads
    from bench.engine_contention import MODES, check_same_text, run_once

    a = argparse.Namespace(prompt_len=6, tokens_per_message=3)
    with torch_threads(1):
        model = str(tiny_model(tmp_path))
        eng = make_engine(model, 64)
        try:
            runs = [run_once(eng, model, m, 4, 6, 20, a, offset=7) for m in MODES]
        finally:
            eng.close()
    assert [r.tokens for r in runs] == [6 * 20] * 3
    assert all(len(r.texts) == 6 and all(r.texts.values()) for r in runs)
    check_same_text(runs)  # raises when a mode's text differs
    assert runs[0].consumer_cpu_s == 0 and runs[1].consumer_cpu_s > 0 and runs[2].consumer_cpu_s > 0
    broken = runs[2].texts | {0: runs[2].texts[0] + "x"}
    with pytest.raises(RuntimeError, match="request 0"):
        check_same_text([runs[0], type(runs[2])(**{**runs[2].__dict__, "texts": broken})])
