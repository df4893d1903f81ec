"""Chunk-wise KV streaming of parallel-sampling groups (n > 1 / best_of) through the router
(router.groups: ``--kv-stream`` store / grpc): the in-process cluster of
tests/integration/test_kv_stream_router.py (a tiny Llama with SmolLM2's tokenizer, a store
node, two prefill and two decode workers with the real servicers, a router per mode).

* Every choice equals the engine run whole, and the group went by a stream (the prefill worker
  opened one; the prompt spans several prefill chunks).
* A client cancelled mid-prefill leaves nothing: no engine block, no store lease, no stream.
* A prefill worker killed mid-stream is re-dispatched: the group is prefilled again on the other
  prefill worker and every choice is still the engine's (last: it stops a prefill worker).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import client_pb2, client_pb2_grpc
from router.lifecycle.stream_mode import KVStreamMode
from tests.integration.test_kv_stream_router import (  # noqa: F401 - the module's fixtures
    CALL_S,
    _prompt,
    _redispatches,
    cluster,
    model_path,
    whole,
)

N3 = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=17, ignore_eos=True, n=3)
BEST_OF = SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True, n=2, best_of=3)


def _engine_choices(engine, prompt: list[int], params: SamplingParams) -> dict[int, list[int]]:
    return {o.choice_index: o.token_ids for o in engine.generate_choices(prompt, params)}


def _client_choices(address: str, prompt: list[int], params: SamplingParams) -> dict[int, list[int]]:
    with Client(address, timeout=CALL_S) as c:
        return {i: ch.token_ids for i, ch in enumerate(c.complete_choices(prompt, params, direct=False))}


@pytest.mark.parametrize(
    ("mode", "params"),
    [(KVStreamMode.STORE, N3), (KVStreamMode.GRPC, N3), (KVStreamMode.STORE, BEST_OF)],
    ids=["store-n3", "grpc-n3", "store-best_of"],
)
def test_streamed_groups_equal_the_engine_run_whole(cluster, whole, mode, params) -> None:  # noqa: F811
    prompt = _prompt(200, 11)
    ref = _engine_choices(whole, prompt, params)
    opened = cluster.streams_opened()
    assert _client_choices(cluster.address(mode), prompt, params) == ref
    assert cluster.streams_opened() == opened + 1  # the group's KV went by a stream
    cluster.wait_clean()


def test_client_cancelled_mid_group_prefill_leaves_nothing(cluster) -> None:  # noqa: F811
    for s in cluster.slow.values():
        s.delay_s = 0.05
    try:
        with grpc.insecure_channel(cluster.address(KVStreamMode.STORE)) as ch:
            call = client_pb2_grpc.GenerateStub(ch).Generate(
                client_pb2.GenerateRequest(
                    prompt_token_ids=client_pb2.TokenIds(ids=_prompt(300, 12)),
                    sampling=sampling_to_proto(N3),
                ),
                timeout=CALL_S,
            )
            codes: list[grpc.StatusCode] = []

            def read() -> None:
                try:
                    next(call, None)
                except grpc.RpcError as e:
                    codes.append(e.code())

            first = threading.Thread(target=read, daemon=True)
            first.start()
            deadline = time.monotonic() + CALL_S
            while not any(m.ready_chunks for p in cluster.prefill.values() for m in p.streams.live()):
                assert time.monotonic() < deadline, "no stream published a chunk"
                time.sleep(0.005)
            call.cancel()
            first.join(CALL_S)
            assert codes == [grpc.StatusCode.CANCELLED]
    finally:
        for s in cluster.slow.values():
            s.delay_s = 0.0
    cluster.wait_clean()


def test_prefill_worker_killed_mid_group_stream_is_redispatched(cluster, whole) -> None:  # noqa: F811
    """Last in the module: it stops a prefill worker for good."""
    prompt = _prompt(300, 13)
    ref = _engine_choices(whole, prompt, N3)
    mode = KVStreamMode.GRPC
    before = _redispatches(cluster, mode, "prefill")
    for s in cluster.slow.values():
        s.delay_s = 0.05
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(_client_choices, cluster.address(mode), prompt, N3)
        deadline = time.monotonic() + CALL_S
        while True:
            assert time.monotonic() < deadline and not fut.done(), "the prefill never streamed a chunk"
            victim = next(
                (n for n, p in cluster.prefill.items() if any(m.ready_chunks for m in p.streams.live())), None
            )
            if victim is not None:
                break
            time.sleep(0.002)
        cluster.kill(victim)
        for s in cluster.slow.values():
            s.delay_s = 0.0
        got = fut.result(CALL_S)
    assert got == ref
    assert _redispatches(cluster, mode, "prefill") == before + 1
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    cluster.wait_clean()
