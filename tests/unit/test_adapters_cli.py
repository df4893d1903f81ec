"""``pdserve adapters load NAME=PATH`` / ``pdserve adapters list`` (#16, the admin path at run time),
the command line itself: what it sends and prints, with the router call replaced by a fake (the
call against a launched cluster is tests/integration/test_lora_cluster.py)."""

from __future__ import annotations

import json

import pytest

from pdserve.errors import AlreadyExistsError


@pytest.fixture
def sent(monkeypatch):
    import pdserve.adapters_cli as adapters_cli
    import pdserve.security as security

    calls: list[tuple] = []

    def fake_load(router, name, path, timeout_s, config=None, model=""):
        calls.append((router, name, path, timeout_s, model))
        if name == "taken":
            raise AlreadyExistsError("LoRA adapter 'taken' is already served by worker d0 from /elsewhere")
        return ["decode-0", "prefill-0"]

    monkeypatch.setattr(adapters_cli, "load_adapter", fake_load)
    yield calls
    security.reset()  # `load` installs this process's security config from its flags


def test_load_sends_an_absolute_path_and_the_model(sent, tmp_path, monkeypatch, capsys) -> None:
    from pdserve import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["adapters", "load", "sql=ad/sql", "--router", "h:1", "--tls", "off"]) == 0
    assert sent.pop() == ("h:1", "sql", str(tmp_path / "ad" / "sql"), 180.0, "")
    assert "adapter 'sql' served by decode-0, prefill-0" in capsys.readouterr().out
    argv = [
        "adapters",
        "load",
        "chat=/a/chat",
        "--router",
        "h:1",
        "--tls",
        "off",
        "--model-id",
        "B",
        "--json",
    ]
    assert cli.main(argv) == 0
    assert sent.pop() == ("h:1", "chat", "/a/chat", 180.0, "B")
    out = json.loads(capsys.readouterr().out)
    assert out == {"adapter": "chat", "path": "/a/chat", "workers": ["decode-0", "prefill-0"]}


@pytest.mark.parametrize("spec", ["sql", "=x", "sql="])
def test_load_refuses_a_malformed_spec_before_calling(sent, spec, capsys) -> None:
    from pdserve import cli

    assert cli.main(["adapters", "load", spec, "--router", "h:1", "--tls", "off"]) == 2
    assert not sent and "expects NAME=PATH" in capsys.readouterr().err


def test_load_refused_by_the_router_exits_2_naming_why(sent, capsys) -> None:
    from pdserve import cli

    assert cli.main(["adapters", "load", "taken=/x", "--router", "h:1", "--tls", "off"]) == 2
    assert "'taken' is already served by worker d0" in capsys.readouterr().err


def test_list_prints_each_models_adapters(monkeypatch, capsys) -> None:
    from pdserve import cli

    class FakeClient:
        def __init__(self, address, **kw) -> None:
            assert address == "h:1"

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def list_adapters(self) -> dict[str, list[str]]:
            return {"A": ["chat", "sql"], "B": []}

    monkeypatch.setattr("pdserve.client.Client", FakeClient)
    assert cli.main(["adapters", "list", "--router", "h:1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["A: chat, sql", "B: (no adapters)"]
    assert cli.main(["adapters", "list", "--router", "h:1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"A": ["chat", "sql"], "B": []}
