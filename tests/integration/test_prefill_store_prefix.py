"""A prefill worker reuses a prefix that another prefill worker published to the store.

In-process: one store node (gRPC on loopback) and two prefill servicers with their own engines.
Worker B never saw the prompt, yet computes only the tail: the prefix comes from the store. When
its fetch-or-recompute policy says recompute (forced here), it computes every token instead, with
identical output.
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
from prefill_worker.prefix_policy import FetchMode, PrefixDecision, PrefixFetchConfig, PrefixFetchPolicy
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


@pytest.fixture(params=[FetchMode.AUTO])
def setup(tiny_models, request):
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
        # worker B's policy is the parametrised one; A never has a store prefix to decide on
        policy = PrefixFetchPolicy(PrefixFetchConfig(mode=request.param)) if i == 1 else None
        services.append(PrefillServicer(st, StorePublisher(store), store, transport, policy))
    yield services, states, store
    for st in states:
        st.close()
    transport.close()
    store.close()
    srv.stop(0)


def _prompt() -> list[int]:
    g = torch.Generator().manual_seed(3)
    return torch.randint(3, 320, (130,), generator=g).tolist()


def test_second_worker_pulls_prefix_from_store(setup):
    (a, b), (sa, sb), store = setup
    prompt = _prompt()
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
    # the seeded policy predicts a pull of 8 blocks on loopback beats recomputing 128 tokens
    assert b.prefix_policy.counts[PrefixDecision.FETCH] == 1
    assert b.prefix_recomputed_tokens_total == 0


@pytest.mark.parametrize("setup", [FetchMode.NEVER], indirect=True)
def test_recompute_branch_gives_identical_output(setup):
    (a, b), (sa, sb), store = setup
    req = worker_pb2.PrefillRequest(
        request_id="r1",
        prompt_token_ids=_prompt(),
        sampling=sampling_to_proto(SamplingParams(temperature=0.0)),
    )
    ra = a.Prefill(req, FakeContext())
    store.release(ra.kv.lease_id)
    req.request_id = "r2"
    rb = b.Prefill(req, FakeContext())
    store.release(rb.kv.lease_id)
    # the store held 8 blocks, but B recomputed them: nothing pulled, every token computed
    assert b.prefix_policy.counts == {PrefixDecision.FETCH: 0, PrefixDecision.RECOMPUTE: 1}
    assert b.store_prefix_tokens_total == 0 and b.prefix_recomputed_tokens_total == 128
    assert rb.num_cached_tokens == 0 and rb.num_computed_tokens == 130
    assert rb.first_token == ra.first_token
    assert list(rb.kv.block_hashes) == list(ra.kv.block_hashes)
    assert sa.engine.kv.num_used_blocks == 0 and sb.engine.kv.num_used_blocks == 0
