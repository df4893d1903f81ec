"""Direct prefill -> decode KV handoff over torch.distributed (gloo), end to end over real
processes on loopback: client -> router -> prefill (outbox) -> KVPeer.PushKV + gloo -> decode.

One cluster (store, router, 1 prefill + 2 decode workers in one gloo process group; the real
SmolLM2-135M model) serves the module. The store is running but must see no block put: the KV
goes over gloo only.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import grpc
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, KVTransport, launch
from pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.clusters import gloo_spec, logged, store_node_stats
from tests.prompts import PROMPTS
from tests.workers import worker_stats


@pytest.fixture(scope="module")
def cluster(smollm_path):
    cl = launch(gloo_spec(smollm_path))  # every request: prefill -> push over gloo -> decode
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def whole(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=512))


def _push_ranks(cluster) -> list[int]:
    """Destination rank of every "direct push" the prefill worker logged (JSON log lines)."""
    return [int(rec["dst_rank"]) for rec in logged(cluster, "prefill-0", "direct push")]


def test_spec_validates_transport():
    assert ClusterSpec(model_path="m", kv_transport="dist").kv_transport is KVTransport.DIST
    with pytest.raises(ValueError, match="kv_transport"):
        ClusterSpec(model_path="m", kv_transport="carrier-pigeon")


def test_greedy_over_gloo_equals_whole_engine_and_skips_the_store(cluster, client, whole):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = PROMPTS[:8]
    ref = whole.generate(prompts, params)
    before = {
        w: worker_stats(a).decode_tokens_total for w, a in cluster.workers.items() if w.startswith("decode")
    }
    with cf.ThreadPoolExecutor(8) as ex:  # concurrent: transfers to both decode ranks overlap
        got = list(ex.map(lambda p: client.complete(p, params), prompts))
    for p, r, g in zip(prompts, ref, got, strict=True):
        assert g.token_ids == r.token_ids, p
        assert g.text == r.text
        assert g.finish.completion_tokens == 16
    # a few more one at a time (the pair of ranks reused in sequence)
    for p, r in zip(prompts[:3], ref[:3], strict=True):
        assert client.complete(p, params).token_ids == r.token_ids
    node = store_node_stats(cluster)
    assert node.puts == 0 and node.num_blocks == 0 and node.num_leases == 0, node
    after = {
        w: worker_stats(a).decode_tokens_total for w, a in cluster.workers.items() if w.startswith("decode")
    }
    assert sum(after[w] - before[w] for w in after) >= 11 * 15  # every decode went through the workers
    # the prefill's KVPeer service pushed every request, to both decode ranks (1 and 2)
    pushes = _push_ranks(cluster)
    assert len(pushes) >= 11 and set(pushes) == {1, 2}, pushes


def test_seeded_sampling_over_gloo_equals_whole(client, whole):
    params = [
        SamplingParams(max_tokens=8, temperature=0.8, top_p=0.95, seed=200 + i, ignore_eos=True)
        for i in range(4)
    ]
    ref = whole.generate(PROMPTS[8:12], params)
    for p, sp, r in zip(PROMPTS[8:12], params, ref, strict=True):
        assert client.complete(p, sp).token_ids == r.token_ids


def test_expired_outbox_entry_is_a_clear_not_found(cluster, whole):
    """Prefill with a short TTL, decode too late: the outbox dropped the KV, the decode worker
    answers NOT_FOUND saying so (the pair stays usable: the next request works)."""
    ids = whole.tokenizer.encode("The capital of France is")
    sampling = common_pb2.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with grpc.insecure_channel(cluster.workers["prefill-0"]) as pch:
        pre = worker_pb2_grpc.WorkerStub(pch).Prefill(
            worker_pb2.PrefillRequest(
                request_id="expire-me", prompt_token_ids=ids, sampling=sampling, lease_ttl_s=0.3
            ),
            timeout=60,
        )
    assert pre.kv.dist_address == cluster.workers["prefill-0"] and pre.kv.dist_rank == 0
    assert not pre.kv.lease_id and pre.kv.locations[0].node_id == "dist-rank-0"
    time.sleep(1.0)
    req = worker_pb2.DecodeRequest(
        request_id="expire-me",
        prompt_token_ids=ids,
        sampling=sampling,
        kv=pre.kv,
        first_token=pre.first_token,
    )
    with grpc.insecure_channel(cluster.workers["decode-0"]) as dch, pytest.raises(grpc.RpcError) as ei:
        list(worker_pb2_grpc.WorkerStub(dch).Decode(req, timeout=60))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired" in ei.value.details() and "expire-me" in ei.value.details()
    # nothing leaked on the decode side
    deadline = time.monotonic() + 10
    while worker_stats(cluster.workers["decode-0"]).kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.1)
    assert worker_stats(cluster.workers["decode-0"]).kv_blocks_used == 0
