"""Chunk-wise KV streaming of parallel-sampling groups (n > 1 / best_of) through the router
(router.groups: ``--kv-stream`` store / grpc): the in-process cluster of
tests/integration/kv_stream_cluster.py (a tiny Llama with SmolLM2's tokenizer, a store
node, two prefill and two decode workers with the real servicers, a router per mode).

* Every choice equals the engine run whole, and the group went by a stream (the prefill worker
  opened one; the prompt spans several prefill chunks).
* A client cancelled mid-prefill leaves nothing: no engine block, no store lease, no stream.
* A prefill worker killed mid-stream is re-dispatched: the group is prefilled again on the other
  prefill worker and every choice is still the engine's (last: it stops a prefill worker).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.sampling_params import SamplingParams
from pdserve.client import Client
from router.lifecycle.stream_mode import KVStreamMode
from tests.integration.kv_stream_cluster import (  # noqa: F401 - the module's fixtures
    CALL_S,
    check_cancel_mid_prefill,
    cluster,
    model_path,
    redispatches,
    seeded_prompt,
    slowed,
    wait_streaming_prefill,
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
    prompt = seeded_prompt(200, 11)
    ref = _engine_choices(whole, prompt, params)
    opened = cluster.streams_opened()
    assert _client_choices(cluster.address(mode), prompt, params) == ref
    assert cluster.streams_opened() == opened + 1  # the group's KV went by a stream
    cluster.wait_clean()


def test_client_cancelled_mid_group_prefill_leaves_nothing(cluster) -> None:  # noqa: F811
    check_cancel_mid_prefill(cluster, seeded_prompt(300, 12), N3)


def test_prefill_worker_killed_mid_group_stream_is_redispatched(cluster, whole) -> None:  # noqa: F811
    """Last in the module: it stops a prefill worker for good."""
    prompt = seeded_prompt(300, 13)
    ref = _engine_choices(whole, prompt, N3)
    mode = KVStreamMode.GRPC
    before = redispatches(cluster, mode, "prefill")
    with ThreadPoolExecutor(1) as ex:
        with slowed(cluster.slow.values()):
            fut = ex.submit(_client_choices, cluster.address(mode), prompt, N3)
            victim = wait_streaming_prefill(cluster, fut)
            cluster.kill(victim)
        got = fut.result(CALL_S)
    assert got == ref
    assert redispatches(cluster, mode, "prefill") == before + 1
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    cluster.wait_clean()
