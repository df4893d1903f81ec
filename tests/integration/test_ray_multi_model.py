"""Two base models in one Ray cluster (#16 part 3): ``pdserve up`` with a config whose ``models``
list gives each model its pools. On a real 2-raylet Ray cluster on 127.0.0.1 (token auth): a store
node per model per Ray node (the models' KV layouts differ), each model's prefill and decode
workers, routers serving both (a policy per model). Requests named by model run disaggregated on
that model's workers and equal each engine run whole; ListModels lists both; a request naming no
model is refused; ``pdserve scale`` without a model, or naming one not served, is refused naming
the models; ``pdserve scale --model`` resizes that model's pools only. One cluster for the module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import InvalidRequestError
from tests.integration.clusters import check_routed_by_model, tiny_model_paths
from tests.integration.test_multi_model import MODELS
from tests.ray_harness import run_cli, two_node_cluster

pytestmark = pytest.mark.slow

NS = "pdserve-multi-model"
CALL_S = 120.0
PARAMS = (
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True),
)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, smollm_path) -> dict[str, Path]:
    return tiny_model_paths(tmp_path_factory.mktemp("ray-multi"), smollm_path)


@pytest.fixture(scope="module")
def deployment(paths, tmp_path_factory):
    pool = {"count": 1, "num_cpus": 0.5, "kv_blocks": 128}
    cfg = {
        "models": [{"model": str(p), "prefill": pool, "decode": pool} for p in paths.values()],
        "host": "127.0.0.1",
        "security": {"tls": "off"},  # plaintext on loopback: asked for explicitly
        "namespace": NS,
        "store": {"capacity_blocks": 256, "host_id_per_node": True},
        # always disaggregated (prefill -> store -> decode); each router keeps its tenant state
        "router": {"policy": "least_loaded", "tenant_state": "local", "heartbeat_interval_s": 0.25},
        "routers": 2,
        "startup_timeout_s": 300,
    }
    f = tmp_path_factory.mktemp("ray-multi-cfg") / "cluster.yaml"
    f.write_text(yaml.safe_dump(cfg))
    with two_node_cluster(NS) as (c, env):
        r = run_cli(["up", "--config", str(f), "--address", c.address, "--json"], env)
        assert r.returncode == 0, r.stderr[-3000:]
        info = json.loads(r.stdout.strip().splitlines()[-1])
        try:
            yield info
        finally:
            from pdserve import ray_cluster

            if ray_cluster.controller(NS) is not None:
                ray_cluster.down(NS)


def test_pools_and_stores_per_model(deployment) -> None:
    from pdserve import ray_cluster

    assert sorted(deployment["workers"]) == [
        "decode-tiny-a-0",
        "decode-tiny-b-0",
        "prefill-tiny-a-0",
        "prefill-tiny-b-0",
    ]
    st = ray_cluster.status(NS)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    stores = [s for s in st["stores"] if s["alive"]]
    assert sorted((s["model"], s["node_id"]) for s in stores) == sorted(
        (m, n) for m in MODELS for n in nodes
    )  # a store node per model per Ray node
    models = {w["worker_id"]: w["model"] for w in st["routed"]}
    assert models == {w: w.split("-", 1)[1].rsplit("-", 1)[0] for w in deployment["workers"]}
    with pytest.raises(InvalidRequestError, match="several models \\('tiny-a', 'tiny-b'\\).*--model"):
        ray_cluster.scale(decode=2, namespace=NS)
    with pytest.raises(
        InvalidRequestError, match="unknown model 'tiny-c': this cluster serves 'tiny-a', 'tiny-b'"
    ):
        ray_cluster.scale(decode=2, namespace=NS, model="tiny-c")


def test_requests_routed_by_model_equal_each_engine_whole(deployment, paths) -> None:
    prompts = [[(3 * i + 11 * j) % 300 + 4 for j in range(30 + 17 * i)] for i in range(2)]
    with Client(deployment["routers"], timeout=CALL_S) as c:
        check_routed_by_model(c, paths, prompts, PARAMS, texts=False)


def test_scale_resizes_one_models_pool_only(deployment, paths, tmp_path) -> None:
    """``pdserve scale --model tiny-b --decode 2`` adds decode-tiny-b-1 (registered for tiny-b,
    routed), tiny-a's pools untouched; tiny-b's requests on either decode worker still equal
    its engine whole; scaling back drains and removes the newest."""
    from pdserve import ray_cluster

    out = ray_cluster.scale(decode=2, namespace=NS, model="tiny-b")
    assert out["added"] == ["decode-tiny-b-1"] and out["removed"] == []
    assert out["counts"] == {"prefill": 1, "decode": 2} and out["model"] == "tiny-b"
    st = ray_cluster.status(NS)
    routed = {w["worker_id"]: w["model"] for w in st["routed"]}
    assert routed == {
        "prefill-tiny-a-0": "tiny-a",
        "decode-tiny-a-0": "tiny-a",
        "prefill-tiny-b-0": "tiny-b",
        "decode-tiny-b-0": "tiny-b",
        "decode-tiny-b-1": "tiny-b",
    }
    prompt = [(7 * j) % 300 + 4 for j in range(40)]
    eng = LLMEngine.from_pretrained(paths["tiny-b"], EngineConfig(num_kv_blocks=128, block_size=16))
    ref = eng.generate([prompt], PARAMS[0])[0]
    with Client(deployment["routers"], timeout=CALL_S) as c:
        for _ in range(4):  # on whichever of tiny-b's decode workers placement picks
            assert c.complete(prompt, PARAMS[0], model="tiny-b").token_ids == ref.token_ids
    back = ray_cluster.scale(decode=1, namespace=NS, model="tiny-b")
    assert back["added"] == [] and [r["worker_id"] for r in back["removed"]] == ["decode-tiny-b-1"]
    assert back["counts"] == {"prefill": 1, "decode": 1}
    left = sorted(w["worker_id"] for w in ray_cluster.status(NS)["routed"])
    assert left == ["decode-tiny-a-0", "decode-tiny-b-0", "prefill-tiny-a-0", "prefill-tiny-b-0"]
