"""The router's global prefix lookup in the shared KV index (``--index``), and its options."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from engine.block_hash import chain_hashes
from engine.sampling_params import SamplingParams
from kv_store.handle import BlockLocation
from kv_store.index import InMemoryIndex, LookupResult
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.metrics import RouterMetrics
from pdserve.v1 import client_pb2, common_pb2
from router.__main__ import main
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig

BS = 16
PROMPT = list(range(100, 100 + 3 * BS + 5))  # 3 full blocks + 5 tokens


class _DownIndex(InMemoryIndex):
    def lookup(self, hashes) -> LookupResult:
        raise UnavailableError("redis is down")


def _servicer(model_path, index, policy=PolicyKind.GLOBAL_CACHE_AWARE) -> GenerateServicer:
    reg = Registry(heartbeat_timeout_s=1e9)
    reg.register(
        "p0", WorkerKind.PREFILL, "p0:1", "m", WorkerLoad(0, 0, 100, 0, block_size=BS), adapters=("lora-x",)
    )
    reg.register(
        "d0", WorkerKind.DECODE, "d0:1", "m", WorkerLoad(0, 0, 100, 0, block_size=BS), adapters=("lora-x",)
    )
    cfg = RouterConfig(model_path=str(model_path), model_id="m", policy=policy)
    return GenerateServicer(reg, cfg, RouterMetrics(CollectorRegistry()), index=index)


def _req(adapter: str = "") -> client_pb2.GenerateRequest:
    return client_pb2.GenerateRequest(
        request_id="r",
        prompt_token_ids=client_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=4),
        adapter=adapter,
    )


def _store_prefix_blocks(svc: GenerateServicer, req: client_pb2.GenerateRequest) -> int:
    info = svc._place("r", PROMPT, SamplingParams(max_tokens=4), req)[3]  # (placement, pw, dw, info)
    svc.policy.release("r")
    return info.store_prefix_blocks


def test_placement_reads_the_longest_single_node_prefix_from_the_index(smollm_path) -> None:
    hashes = chain_hashes(PROMPT, BS, "m")
    idx = InMemoryIndex()
    idx.add_node(BlockLocation("kv0", "127.0.0.1:1"))
    idx.add_node(BlockLocation("kv1", "127.0.0.1:2"))
    idx.register("kv0", hashes[:1])
    idx.register("kv1", hashes[:2])
    svc = _servicer(smollm_path, idx)
    assert svc.index is idx
    assert _store_prefix_blocks(svc, _req()) == 2
    idx.register("kv1", hashes[2:4])  # the block holding the last prompt token never counts
    assert _store_prefix_blocks(svc, _req()) == 3
    assert _store_prefix_blocks(svc, _req(adapter="lora-x")) == 0  # other keys
    # policies that do not use the prefix never ask
    assert _store_prefix_blocks(_servicer(smollm_path, idx, PolicyKind.LEAST_LOADED), _req()) == 0


def test_index_outage_means_no_prefix(smollm_path) -> None:
    assert _store_prefix_blocks(_servicer(smollm_path, _DownIndex()), _req()) == 0


def test_index_url_validation(smollm_path, capsys, monkeypatch) -> None:
    with pytest.raises(ValueError, match="redis://"):
        RouterConfig(model_path="m", model_id="m", index_url="memory")
    cfg = RouterConfig(model_path=str(smollm_path), model_id="m", index_url="ftp://x")
    with pytest.raises(InvalidRequestError, match="redis://"):
        GenerateServicer(Registry(), cfg, RouterMetrics(CollectorRegistry()))
    monkeypatch.setattr("router.__main__.configure_logging", lambda *a, **k: None)
    for bad in (["--index", "memory"], ["--max-redispatches", "-1"]):  # refused before serving
        with pytest.raises(SystemExit):
            main(["--model", str(smollm_path), *bad])
    err = capsys.readouterr().err
    assert "redis://" in err and "max_redispatches" in err
