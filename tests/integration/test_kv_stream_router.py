"""Chunk-wise KV streaming through the router (issue #14 part 2; router.lifecycle.stream_legs):
in-process routers with ``kv_stream`` = store and grpc in front of real workers on 127.0.0.1 (the
tiny random Llama with SmolLM2's tokenizer, a KV store node, two prefill workers, two decode
workers). The router sends each request's Prefill (``kv_stream``) and Decode
(``kv_stream_address``) at once:

* outputs (greedy and seeded) equal the engine run whole, and the prefill worker really streamed
  (its registry opened streams; the prompt spans several prefill chunks);
* a client cancelled mid-prefill leaves nothing: no engine block on any worker, no store lease,
  no stream in either prefill worker's registry;
* a decode worker killed mid-prefill (its server stopped while the prefill streams to it) is
  re-dispatched: prefilled again, decoded on the other decode worker, output identical;
* a prefill worker killed mid-prefill (its server stopped while its stream has published chunks)
  is re-dispatched: the request completes identically on the other prefill worker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.client import Client
from router.lifecycle.stream_mode import KVStreamMode
from tests.integration.kv_stream_cluster import (  # noqa: F401 - the module's fixtures
    CALL_S,
    GREEDY,
    SEEDED,
    check_cancel_mid_prefill,
    cluster,
    model_path,
    redispatches,
    seeded_prompt,
    slowed,
    slowly_streaming,
    whole,
)


@pytest.mark.parametrize("mode", [KVStreamMode.STORE, KVStreamMode.GRPC], ids=["store", "grpc"])
def test_streamed_requests_equal_the_engine_run_whole(cluster, whole, mode) -> None:  # noqa: F811
    prompts = [seeded_prompt(200, 1), seeded_prompt(130, 2), seeded_prompt(77, 3)]
    params = [GREEDY, SEEDED, GREEDY]
    refs = whole.generate(prompts, params)
    opened = cluster.streams_opened()
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(3) as ex:
        got = list(ex.map(lambda i: c.complete(prompts[i], params[i]), range(3)))
    for r, g in zip(refs, got, strict=True):
        assert g.token_ids == r.token_ids
        assert g.finish.reason == "length" and g.finish.completion_tokens == 16
    assert cluster.streams_opened() == opened + 3  # every handoff went by a stream
    cluster.wait_clean()


def test_client_cancelled_mid_prefill_leaves_nothing(cluster) -> None:  # noqa: F811
    check_cancel_mid_prefill(cluster, seeded_prompt(300, 4), GREEDY)


def test_decode_worker_killed_mid_prefill_is_redispatched(cluster, whole) -> None:  # noqa: F811
    """Stops a decode worker for good (the next test keeps one of each)."""
    prompt = seeded_prompt(300, 6)
    ref = whole.generate([prompt], [GREEDY])[0]
    mode = KVStreamMode.STORE
    before = redispatches(cluster, mode, "decode")
    with (
        slowed(cluster.slow.values()),
        Client(cluster.address(mode), timeout=CALL_S) as c,
        ThreadPoolExecutor(1) as ex,
    ):
        fut = ex.submit(c.complete, prompt, GREEDY)
        _, victim = slowly_streaming(cluster, fut, mode)
        cluster.kill(victim)
        got = fut.result(CALL_S)
    assert got.token_ids == ref.token_ids
    assert redispatches(cluster, mode, "decode") == before + 1
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    cluster.wait_clean()


def test_prefill_worker_killed_mid_prefill_is_redispatched(cluster, whole) -> None:  # noqa: F811
    """Last in the module: it stops a prefill worker for good."""
    prompt = seeded_prompt(300, 5)
    ref = whole.generate([prompt], [SEEDED])[0]
    mode = KVStreamMode.GRPC
    before = redispatches(cluster, mode, "prefill")
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(1) as ex:
        with slowed(cluster.slow.values()):
            fut = ex.submit(c.complete, prompt, SEEDED)
            victim, _ = slowly_streaming(cluster, fut, mode)
            cluster.kill(victim)
        got = fut.result(CALL_S)
    assert got.token_ids == ref.token_ids
    assert redispatches(cluster, mode, "prefill") == before + 1
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    cluster.wait_clean()
