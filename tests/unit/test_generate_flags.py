"""``pdserve generate``: a flag read only by the other mode (``--embedded`` or a request to a
router) is refused naming it, instead of accepted and dropped."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "argv, why",
    [
        # engine flags without --embedded: the router's model answered, the flag dropped
        (["hi", "--model", "/models/B"], "--model sets up the engine in this process: it needs --embedded"),
        (["hi", "--device", "cuda"], "--device sets up the engine"),
        (["hi", "--dtype", "bfloat16"], "--dtype sets up the engine"),
        (["hi", "--kv-blocks", "64"], "--kv-blocks sets up the engine"),
        (["hi", "--tp", "2"], "--tp sets up the engine"),
        (["hi", "--lora", "sql=/a"], "--lora sets up the engine"),
        # request flags with --embedded: no router is asked
        (["hi", "--embedded", "--model-id", "B"], "--model-id is for a request to a router"),
        (["hi", "--embedded", "--address", "127.0.0.1:6000"], "--address is for a request to a router"),
        (["hi", "--embedded", "--timeout", "5"], "--timeout is for a request to a router"),
    ],
)
def test_generate_refuses_a_flag_of_the_other_mode(argv, why, capsys, monkeypatch) -> None:
    import pdserve.cli as cli

    monkeypatch.setattr("pdserve.model_setup.resolve_model_path", lambda m: Path("/m"))
    assert cli.main(["generate", *argv]) == 2
    assert why in capsys.readouterr().err
