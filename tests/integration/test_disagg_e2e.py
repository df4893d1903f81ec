"""End to end over real processes on loopback: client -> router -> prefill -> store -> decode.

One cluster (store, router, 1 prefill, 1 decode; the real SmolLM2-135M model) serves the module.
"""

from __future__ import annotations

import time

import grpc
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.client import KVStoreClient
from pdserve.client import Client
from pdserve.errors import DeadlineExceededError, InvalidRequestError
from pdserve.launcher import ClusterSpec, launch
from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2, worker_pb2, worker_pb2_grpc
from tests.prompts import PROMPTS


@pytest.fixture(scope="module")
def cluster(smollm_path):
    # the disaggregated path for every prompt: no local prefill on the decode worker (the goodput
    # policy prefers one for a short prompt on an idle cluster, as it prices the KV handoff)
    spec = ClusterSpec(
        model_path=str(smollm_path),
        worker_kv_blocks=1024,
        store_capacity_blocks=2048,
        router_args=("--local-prefill-max-tokens", "0"),
    )
    cl = launch(spec)
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def whole(smollm_path):
    return LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=1024))


def _worker_stats(address: str) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10)


def _wait_baseline(cluster, timeout=10.0) -> None:
    """Decode blocks back to zero and no store lease outstanding."""
    store = KVStoreClient(cluster.store_address)
    deadline = time.monotonic() + timeout
    try:
        while True:
            dec = _worker_stats(cluster.workers["decode-0"])
            pre = _worker_stats(cluster.workers["prefill-0"])
            leases = store.stats().node.num_leases
            if dec.kv_blocks_used == 0 and pre.kv_blocks_used == 0 and leases == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"block leak: decode used={dec.kv_blocks_used} prefill used={pre.kv_blocks_used} leases={leases}"
                )
            time.sleep(0.1)
    finally:
        store.close()


def test_greedy_disaggregated_equals_whole_engine(client, whole):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = whole.generate(PROMPTS, params)
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda p: client.complete(p, params), PROMPTS))
    for p, r, g in zip(PROMPTS, ref, got, strict=True):
        assert g.token_ids == r.token_ids, p
        assert g.text == r.text
        assert g.finish.reason == "length" and g.finish.completion_tokens == 24


def test_seeded_sampling_disaggregated_equals_whole(client, whole):
    params = [
        SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=100 + i, ignore_eos=True)
        for i in range(8)
    ]
    ref = whole.generate(PROMPTS[:8], params)
    for p, sp, r in zip(PROMPTS[:8], params, ref, strict=True):
        assert client.complete(p, sp).token_ids == r.token_ids


def test_chat_and_eos(client, whole):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    got = client.complete(msgs, max_tokens=64, temperature=0.0)
    ref = whole.generate([whole.tokenizer.encode_chat(msgs)], SamplingParams(max_tokens=64, temperature=0.0))[
        0
    ]
    assert got.token_ids == ref.token_ids and got.text == ref.text
    assert got.finish.reason == "stop" and "Paris" in got.text


def test_repeated_prefix_served_from_cache(client, cluster):
    prefix = "You are a meticulous assistant. " * 12
    before = _worker_stats(cluster.workers["prefill-0"])
    a = client.complete(prefix + "Name a colour.", max_tokens=8, temperature=0.0)
    mid = _worker_stats(cluster.workers["prefill-0"])
    b = client.complete(prefix + "Name a colour.", max_tokens=8, temperature=0.0)
    after = _worker_stats(cluster.workers["prefill-0"])
    assert a.token_ids == b.token_ids
    assert b.finish.cached_prompt_tokens > 0
    computed_first = mid.prefill_tokens_computed_total - before.prefill_tokens_computed_total
    computed_second = after.prefill_tokens_computed_total - mid.prefill_tokens_computed_total
    assert computed_second < computed_first
    assert (
        after.prefill_tokens_reused_total - mid.prefill_tokens_reused_total == b.finish.cached_prompt_tokens
    )


def test_streaming_and_timing(client):
    chunks = list(client.generate("Count: one, two,", max_tokens=10, temperature=0.0, ignore_eos=True))
    assert sum(len(c.token_ids) for c in chunks) == 10
    fin = chunks[-1].finish
    assert fin is not None and len(fin.token_times_s) == 10
    assert 0 < fin.ttft_s <= fin.e2e_s
    assert set(fin.phases) == {"queue", "prefill", "transfer", "decode"}


def test_cancel_mid_stream_frees_blocks(client, cluster):
    _wait_baseline(cluster)
    s = client.generate(
        "Tell me a very long story about dragons.", max_tokens=500, temperature=0.0, ignore_eos=True
    )
    it = iter(s)
    for _ in range(5):
        next(it)
    s.cancel()
    assert list(it) == []
    _wait_baseline(cluster)


def test_client_disconnect_frees_blocks(cluster):
    _wait_baseline(cluster)
    c = Client(cluster.router_address)
    it = iter(c.generate("Write an endless poem.", max_tokens=500, temperature=0.0, ignore_eos=True))
    next(it)
    next(it)
    c.close()  # the channel goes away under a running stream
    _wait_baseline(cluster)


def test_deadline_exceeded_frees_blocks(client, cluster):
    _wait_baseline(cluster)
    with pytest.raises(DeadlineExceededError):
        client.complete("Describe the ocean.", max_tokens=500, temperature=0.0, ignore_eos=True, timeout=1.0)
    _wait_baseline(cluster)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda r: setattr(r, "prompt", "") or r, "empty"),
        (lambda r: r.prompt_token_ids.CopyFrom(client_pb2.TokenIds(ids=[5] * 9000)) or r, "context"),
        (lambda r: r.sampling.CopyFrom(common_pb2.SamplingParams(top_p=1.5)) or r, "top_p"),
        (lambda r: r.sampling.CopyFrom(common_pb2.SamplingParams(max_tokens=0)) or r, "max_tokens"),
        (lambda r: r.sampling.CopyFrom(common_pb2.SamplingParams(temperature=-1)) or r, "temperature"),
        (lambda r: r.prompt_token_ids.CopyFrom(client_pb2.TokenIds(ids=[1, 10**9])) or r, "out of range"),
    ],
)
def test_bad_input_is_invalid_argument(cluster, build, match):
    req = build(client_pb2.GenerateRequest(prompt="hi"))
    with grpc.insecure_channel(cluster.router_address) as ch, pytest.raises(grpc.RpcError) as ei:
        list(client_pb2_grpc.GenerateStub(ch).Generate(req, timeout=30))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in ei.value.details()


def test_sdk_raises_typed_error_before_rpc(client):
    with pytest.raises(InvalidRequestError, match="top_p"):
        client.complete("hi", top_p=0.0)


def test_malformed_and_oversized_refused_server_survives(cluster, client):
    with grpc.insecure_channel(cluster.router_address) as ch:
        raw = ch.unary_stream("/pdserve.v1.Generate/Generate")
        with pytest.raises(grpc.RpcError) as ei:
            list(raw(b"\xff\xff\xff\x0f garbage", timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as ei:
            list(raw(b"\x12" + b"\xff\xff\xff\x07" + b"x" * (17 * 1024 * 1024), timeout=30))
        assert ei.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)
    assert client.complete("Still alive?", max_tokens=3, temperature=0.0).finish is not None
