"""Two base models in one launched cluster (#16 part 3): ``ClusterSpec(models=...)`` (what
``pdserve serve --model A --model B`` builds) starts a store node per model (their KV layouts
differ), each model's prefill and decode workers registered with the router, which serves both
(``python -m router --model A --model B``, workers verified against their own model's geometry).

Requests named by model run disaggregated (prefill -> store -> decode) on that model's workers:
greedy and seeded outputs == each engine run whole; ListModels lists both."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import InvalidRequestError
from pdserve.launcher import ClusterSpec, ModelPool, launch
from tests.integration.test_multi_model import MODELS, make_model

CALL_S = 120.0
PARAMS = (
    SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True),
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, smollm_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi-launch")
    return {m: make_model(root, m, over, smollm_path) for m, (over, _) in MODELS.items()}


@pytest.fixture(scope="module")
def cluster(paths):
    spec = ClusterSpec(
        models=tuple(ModelPool(str(p), num_prefill=1, num_decode=1) for p in paths.values()),
        worker_kv_blocks=128,
        store_capacity_blocks=256,
        router_args=("--policy", "least_loaded"),  # always disaggregated: prefill -> store -> decode
    )
    cl = launch(spec)
    yield cl
    cl.stop()


def test_each_models_requests_run_on_its_workers_equal_to_its_engine(cluster, paths) -> None:
    assert sorted(cluster.workers) == [
        "decode-tiny-a-0",
        "decode-tiny-b-0",
        "prefill-tiny-a-0",
        "prefill-tiny-b-0",
    ]
    assert sorted(cluster.model_stores) == ["tiny-a", "tiny-b"]
    assert len(set(cluster.model_stores.values())) == 2  # a store node per model
    prompts = [[(5 * i + 7 * j) % 300 + 4 for j in range(40 + 9 * i)] for i in range(2)]
    with Client(cluster.router_address, timeout=CALL_S) as c:
        assert sorted(c.list_models()) == ["tiny-a", "tiny-b"]
        for m, p in paths.items():
            eng = LLMEngine.from_pretrained(p, EngineConfig(num_kv_blocks=128, block_size=16))
            for params in PARAMS:
                refs = eng.generate(prompts, params)
                for prompt, ref in zip(prompts, refs, strict=True):
                    got = c.complete(prompt, params, model=m)
                    assert got.token_ids == ref.token_ids, (m, params.temperature)
                    assert got.text == ref.text
        with pytest.raises(InvalidRequestError, match="several models"):
            c.complete(prompts[0], PARAMS[0])
