"""Disaggregated serving of a sliding-window model over real processes == the whole engine.

A launched cluster (store, router, 1 prefill, 1 decode worker) serves the tiny random Mistral
whose every layer has a 24-token window (tests/tiny_models.py), with 8-token blocks, so the
prompts (30..150 tokens) and the decoded tails run past the window: the prefill worker ships
the whole prompt's KV through the store, the decode worker keeps only the in-window blocks and
frees the rest as it decodes. Greedy tokens equal the in-process whole engine's; afterwards no
worker holds a block.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, launch
from pdserve.v1 import worker_pb2, worker_pb2_grpc

BLOCK = 8


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, smollm_path):
    from tests.tiny_models import make_tiny_models

    # the router needs a tokenizer: SmolLM2's (ids < 320 decode fine; prompts are sent as ids)
    return make_tiny_models(tmp_path_factory.mktemp("swa"), tokenizer_from=smollm_path)["mistral_swa"]


def _used(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10).kv_blocks_used


def test_disaggregated_sliding_window_equals_whole_engine(model_path) -> None:
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (30, 70, 150)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    whole = LLMEngine.from_pretrained(model_path, EngineConfig(num_kv_blocks=256, block_size=BLOCK))
    assert whole.kv.sliding_window == 24
    ref = whole.generate(prompts, params)
    cl = launch(
        ClusterSpec(
            model_path=str(model_path), worker_kv_blocks=256, store_capacity_blocks=512, block_size=BLOCK
        )
    )
    try:
        with Client(cl.router_address, timeout=120) as c:
            got = [c.complete(p, params) for p in prompts]
        for r, o in zip(ref, got, strict=True):
            assert o.token_ids == r.token_ids
        deadline = time.monotonic() + 10
        while _used(cl.workers["decode-0"]) or _used(cl.workers["prefill-0"]):
            assert time.monotonic() < deadline, "KV blocks still held after the requests finished"
            time.sleep(0.1)
    finally:
        cl.stop()
