"""Two base models in one launched cluster (#16 part 3): ``ClusterSpec(models=...)`` (what
``pdserve serve --model A --model B`` builds) starts a store node per model (their KV layouts
differ), each model's prefill and decode workers registered with the router, which serves both
(``python -m router --model A --model B``, workers verified against their own model's geometry).

Requests named by model run disaggregated (prefill -> store -> decode) on that model's workers:
greedy and seeded outputs == each engine run whole; ListModels lists both."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, ModelPool, launch
from tests.integration.clusters import check_routed_by_model, tiny_model_paths

CALL_S = 120.0
PARAMS = (
    SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True),
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, smollm_path) -> dict[str, Path]:
    return tiny_model_paths(tmp_path_factory.mktemp("multi-launch"), smollm_path)


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
        check_routed_by_model(c, paths, prompts, PARAMS)
