"""LoRA adapters through a launched cluster (#16): workers started with --lora serve the adapter,
the router checks and lists it, and a disaggregated request naming it (prefill worker -> store ->
decode worker) produces exactly the engine's own output with that adapter; the base model and an
unknown adapter behave as they must. One cluster (SmolLM2, 1 prefill + 1 decode) for the module."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import ModelNotFoundError
from pdserve.launcher import ClusterSpec, launch
from tests.lora_adapters import make_adapter

PROMPT = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def adapter(smollm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "sql"
    return make_adapter(smollm_path, out, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=3)


@pytest.fixture(scope="module")
def cluster(smollm_path, adapter):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=512,
            store_capacity_blocks=1024,
            worker_args=("--lora", f"sql={adapter}"),
        )
    )
    yield cl
    cl.stop()


def _engine_output(smollm_path, adapter, name: str, params: SamplingParams) -> list[int]:
    """The engine whole, in this process, with the same adapter served (``name`` "" = base)."""
    lora = LoRAConfig((AdapterSpec("sql", str(adapter)),))
    eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256), lora=lora)
    rid = eng.add_request(None, eng.tokenizer.encode(PROMPT), params, adapter_id=name)
    toks: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                toks = list(o.token_ids)
    return toks


def test_adapter_is_listed_served_exactly_and_unknown_ones_refused(cluster, smollm_path, adapter) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0)
    with Client(cluster.router_address, timeout=120) as c:
        assert list(c.list_adapters().values()) == [["sql"]]
        with_adapter = c.complete(PROMPT, params, adapter="sql").token_ids
        base = c.complete(PROMPT, params).token_ids
        with pytest.raises(ModelNotFoundError, match="'chat'"):
            c.complete(PROMPT, params, adapter="chat")
    want_adapter = _engine_output(smollm_path, adapter, "sql", params)
    want_base = _engine_output(smollm_path, adapter, "", params)
    assert with_adapter == want_adapter and base == want_base
    assert with_adapter != base  # the adapter changes the output: it was really applied
