"""Two base models in one Ray cluster with the direct KV handoff (#16 part 3,
``kv_transfer: {kind: dist, backend: gloo}``): on a real 2-raylet Ray cluster on 127.0.0.1, each
model's workers (1 prefill + 1 decode) form their own gloo process group (ranks 0 and 1 of a
world of 2, twice); requests named by model equal each engine run whole and their KV moves over
their own model's group (a push per request on that model's prefill worker, a direct pull on its
decode worker, nothing through a store). One cluster for the module."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.cluster_config import from_dict
from tests.integration.clusters import tiny_model_paths
from tests.ray_harness import two_node_cluster

pytestmark = pytest.mark.slow

NS = "pdserve-multi-model-dist"
CALL_S = 120.0
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, smollm_path) -> dict[str, Path]:
    return tiny_model_paths(tmp_path_factory.mktemp("ray-multi-dist"), smollm_path)


@pytest.fixture(scope="module")
def deployment(paths):
    from pdserve import ray_cluster

    pool = {"count": 1, "num_cpus": 0.5, "kv_blocks": 128}
    config = from_dict(
        {
            "models": [{"model": str(p), "prefill": pool, "decode": pool} for p in paths.values()],
            "host": "127.0.0.1",
            "security": {"tls": "off"},  # plaintext on loopback: asked for explicitly
            "namespace": NS,
            "store": {"capacity_blocks": 256, "host_id_per_node": True},
            # always disaggregated: every request makes one handoff
            "router": {"policy": "least_loaded", "heartbeat_interval_s": 0.25},
            "kv_transfer": {"kind": "dist", "backend": "gloo", "timeout_s": 120},
            "startup_timeout_s": 300,
        }
    )
    with two_node_cluster(NS):
        info = ray_cluster.up(config)
        try:
            yield info
        finally:
            if ray_cluster.controller(NS) is not None:
                ray_cluster.down(NS)


def _status() -> dict[str, Any]:
    from pdserve import ray_cluster

    return ray_cluster.status(NS)


def _workers() -> dict[str, dict[str, Any]]:
    st = _status()
    return {w["worker_id"]: w for w in st["pools"]["prefill"] + st["pools"]["decode"] if w["alive"]}


def test_each_model_forms_its_own_process_group(deployment) -> None:
    deadline = time.monotonic() + 300
    while not all(w["kv_transfer"]["ready"] for w in _workers().values()):
        assert time.monotonic() < deadline, [w["kv_transfer"] for w in _workers().values()]
        time.sleep(0.25)
    ws = _workers()
    assert {wid: (w["kv_transfer"]["rank"], w["kv_transfer"]["world_size"]) for wid, w in ws.items()} == {
        "prefill-tiny-a-0": (0, 2),
        "decode-tiny-a-0": (1, 2),
        "prefill-tiny-b-0": (0, 2),
        "decode-tiny-b-0": (1, 2),
    }


def test_requests_by_model_equal_each_engine_whole_over_their_own_group(deployment, paths) -> None:
    stores_in = sum(s["blocks_in"] for s in _status()["stores"] if s["alive"])
    prompts = [[(3 * i + 11 * j) % 300 + 4 for j in range(30 + 17 * i)] for i in range(3)]
    with Client(deployment["router"], timeout=CALL_S) as c:
        for m, p in paths.items():
            ref = LLMEngine.from_pretrained(p, EngineConfig(num_kv_blocks=128, block_size=16)).generate(
                prompts, GREEDY
            )
            for prompt, r in zip(prompts, ref, strict=True):
                assert c.complete(prompt, GREEDY, model=m).token_ids == r.token_ids, m
    ws = _workers()
    for m in paths:
        pre, dec = ws[f"prefill-{m}-0"]["kv_transfer"], ws[f"decode-{m}-0"]["kv_transfer"]
        assert pre["pushes"] == dec["direct_pulls"] == len(prompts), (m, pre, dec)
        assert pre["store_fallbacks"] == 0
    assert sum(s["blocks_in"] for s in _status()["stores"] if s["alive"]) == stores_in  # no store path
