"""bench/concurrency.py's model and pool options: a model folder that does not exist and a pool of
no blocks are refused naming the option, before any process starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "/no/such/model"], "--model: model path '/no/such/model' does not exist"),
        (["--kv-blocks", "0"], "--kv-blocks must be >= 1, got 0"),
    ],
)
def test_bad_model_or_pool_is_refused_naming_the_option(argv, words, capsys) -> None:
    from bench.concurrency import main

    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    assert words in capsys.readouterr().err


def test_model_help_names_the_choices() -> None:
    from bench.concurrency import build_parser

    text = build_parser().format_help()
    assert "--model" in text and "SmolLM2-135M-Instruct" in text and "--kv-blocks" in text
