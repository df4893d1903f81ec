"""``pdserve generate --adapter NAME`` (#16, the README's CLI example): against a cluster the adapter
goes into the request (a fake SDK client records it); with ``--embedded --lora NAME=PATH`` the
printed text is the engine's with that adapter (SmolLM2 and a random adapter), not the base
model's; ``--embedded --adapter`` without ``--lora`` is refused naming the fix."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from tests.lora_adapters import make_adapter

PROMPT = "List three colours."
N = 8


class _FakeClient:
    calls: list[dict] = []

    def __init__(self, address, **kw) -> None:
        self.address = address

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def generate(self, prompt, **kw):
        _FakeClient.calls.append({"prompt": prompt, **kw})
        return iter(())


def test_generate_sends_the_adapter_to_the_router(monkeypatch, capsys) -> None:
    from pdserve import cli

    monkeypatch.setattr("pdserve.client.Client", _FakeClient)
    _FakeClient.calls.clear()
    cli.main(["generate", "--adapter", "sql", "--no-chat", PROMPT])
    cli.main(["generate", "--no-chat", PROMPT])
    assert [(c["prompt"], c["adapter"]) for c in _FakeClient.calls] == [(PROMPT, "sql"), (PROMPT, "")]


@pytest.mark.slow
def test_generate_embedded_with_an_adapter_prints_its_output(smollm_path, tmp_path, capsys) -> None:
    from pdserve import cli

    adapter = make_adapter(
        smollm_path, tmp_path / "sql", r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=3
    )
    eng = LLMEngine.from_pretrained(
        smollm_path, EngineConfig(num_kv_blocks=64), lora=LoRAConfig((AdapterSpec("sql", str(adapter)),))
    )
    params = SamplingParams(max_tokens=N, temperature=0.0)
    want = {}
    try:
        for name in ("sql", ""):
            rid = eng.add_request(None, eng.tokenize(PROMPT), params, adapter_id=name)
            while eng.has_unfinished():
                for o in eng.step():
                    if o.request_id == rid and o.finished:
                        want[name] = o.text
    finally:
        eng.close()
    assert want["sql"] != want[""]  # the adapter acts on this prompt
    common = ["generate", "--embedded", "--model", str(smollm_path), "--no-chat", "--max-tokens", str(N)]
    capsys.readouterr()
    assert cli.main([*common, "--lora", f"sql={adapter}", "--adapter", "sql", PROMPT]) == 0
    assert capsys.readouterr().out == want["sql"] + "\n"
    assert cli.main([*common, PROMPT]) == 0
    assert capsys.readouterr().out == want[""] + "\n"
    assert cli.main([*common, "--adapter", "sql", PROMPT]) == 2
    assert "--adapter NAME needs --lora NAME=PATH" in capsys.readouterr().err
