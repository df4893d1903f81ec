"""A prefill worker reuses a prefix that another prefill worker published to the store.

In-process: one store node (gRPC on loopback) and two prefill servicers with their own engines.
Worker B never saw the prompt, yet computes only the tail: the prefix comes from the store.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.arena import host_id
from kv_store.client import KVStoreClient
from kv_store.service import serve
from kv_store.store import StoreConfig
from kv_store.transport import AutoTransport
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import worker_pb2
from pdserve.worker_base import Role, WorkerConfig, WorkerState, engine_layout
from prefill_worker.publisher import StorePublisher
from prefill_worker.service import PrefillServicer


class FakeContext:
    """The slice of grpc.ServicerContext the servicer uses."""

    def is_active(self) -> bool:
        return True

    def add_callback(self, fn) -> bool:
        return True

    def time_remaining(self):
        return None


@pytest.fixture
def setup(tiny_models):
    path = tiny_models["llama"]
    ecfg = EngineConfig(num_kv_blocks=64, block_size=16, max_num_batched_tokens=256)
    engines = [LLMEngine.from_pretrained(path, ecfg) for _ in range(2)]
    srv = serve(StoreConfig(node_id="kv0", layout=engine_layout(engines[0]), capacity_blocks=64))
    store = KVStoreClient(srv.address)
    transport = AutoTransport(host_id())
    states, services = [], []
    for i, eng in enumerate(engines):
        st = WorkerState(WorkerConfig(f"p{i}", Role.PREFILL, str(path), srv.address, engine=ecfg), eng)
        states.append(st)
        services.append(PrefillServicer(st, StorePublisher(store), store, transport))
    yield services, states, store
    for st in states:
        st.close()
    transport.close()
    store.close()
    srv.stop(0)


def test_second_worker_pulls_prefix_from_store(setup):
    (a, b), (sa, sb), store = setup
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 320, (130,), generator=g).tolist()
    req = worker_pb2.PrefillRequest(
        request_id="r1", prompt_token_ids=prompt, sampling=sampling_to_proto(SamplingParams(temperature=0.0))
    )
    ra = a.Prefill(req, FakeContext())
    assert ra.num_cached_tokens == 0 and ra.num_computed_tokens == 130
    store.release(ra.kv.lease_id)
    req.request_id = "r2"
    rb = b.Prefill(req, FakeContext())
    store.release(rb.kv.lease_id)
    assert b.store_prefix_tokens_total == 128  # 8 full blocks came from the store
    assert rb.num_cached_tokens == 128 and rb.num_computed_tokens == 2
    assert rb.first_token == ra.first_token
    assert list(rb.kv.block_hashes) == list(ra.kv.block_hashes)
    # both workers end with no blocks held by requests
    assert sa.engine.kv.num_used_blocks == 0 and sb.engine.kv.num_used_blocks == 0
