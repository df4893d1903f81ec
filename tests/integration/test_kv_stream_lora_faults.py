"""LoRA adapter requests that end abnormally while their KV streams (issues #14 and #16):
in-process routers with ``kv_stream`` = store and grpc in front of two prefill and two decode
workers that all serve two random PEFT adapters ("sql", "chat") on the tiny random Llama
(kv_stream_cluster's :class:`Cluster` with ``lora``; 32-token prefill chunks, a 224-token prompt
streams in 7 chunks). The prefill engines are slowed so that the test acts mid-stream: it waits
until a prefill worker's stream of the request has published a chunk, has its consumer (the
decode worker reads it) and is still open, with the adapter pinned in that prefill engine's slot.

* a client that cancels an adapter request then (store and grpc): the call ends CANCELLED, the
  stream ended (failed by the prefill's abort, or cancelled) without its final, and nothing is
  left behind: no store lease (every one released: none expired on its ttl), no stream, every
  worker's engine back to its idle free blocks with no request tracked, no adapter pinned in any
  engine's LoRA slots (nor a request waiting for one), nothing running or outstanding on the
  router, and the router counted the adapter request cancelled. The next request with the same
  adapter equals the engine run whole with it;
* last (it stops a decode worker for good): the decode worker reading an adapter request's
  stream is killed mid-stream (grpc); the router re-dispatches it to the other decode worker,
  which serves the adapter, the prompt is prefilled again with the adapter (a second stream),
  and the output (seeded) equals the engine run whole with the adapter; nothing is left on the
  live workers or the router.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from engine.llm_engine import LLMEngine
from pdserve.client import Client, build_request
from pdserve.v1 import client_pb2_grpc
from pdserve.worker_base import adapter_snapshots
from prefill_worker.kv_stream import StreamStatus
from router.lifecycle.states import State
from router.lifecycle.stream_mode import KVStreamMode
from tests.integration.kv_stream_cluster import (  # noqa: F401 - the module's fixtures
    BLOCK_SIZE,
    BLOCKS,
    CALL_S,
    GREEDY,
    SEEDED,
    Cluster,
    model_path,
    redispatches,
    seeded_prompt,
    slowed,
    whole,
)
from tests.integration.test_kv_stream_lora import (  # noqa: F401 - its adapters and reference engine
    _run_whole,
    lora,
    whole_lora,  # noqa: F811
)

N_PROMPT = 224  # 7 prefill chunks of 32 tokens
SLOW_S = 0.2  # a slowed prefill step: 7 chunks take over a second, time enough to act mid-stream
ADAPTERS = ("sql", "chat")
PREFILL, DECODE = ("pre-a", "pre-b"), ("dec-a", "dec-b")


def _free_blocks(cluster: Cluster) -> dict[str, int]:
    """Free engine blocks of every live worker (read on its engine loop)."""
    return {
        n: st.loop.call(lambda e: e.kv.num_free_blocks)
        for n, st in cluster.states.items()
        if n not in cluster.stopped
    }


@pytest.fixture(scope="module")
def cluster(model_path, lora):  # noqa: F811
    cl = Cluster(model_path, lora=lora)
    cl.idle_free = _free_blocks(cl)  # type: ignore[attr-defined] - before any request
    yield cl
    cl.stop()


def _adapter_refs(e: LLMEngine) -> tuple[dict[str, str], list[str], dict[str, int]]:
    """``e``'s adapter references (engine thread): the requests pinning an adapter's slot, the
    requests waiting for a slot, and each adapter's pin count in the slot table."""
    assert e.lora is not None
    return dict(e._lora_pins), list(e._lora_waiting), {a: e.lora.slots.pins(a) for a in e.lora.names()}


def _pins(cluster: Cluster, name: str, adapter: str) -> int:
    return cluster.states[name].loop.call(lambda e: e.lora.slots.pins(adapter))


def _decode_tokens(cluster: Cluster, adapter: str) -> dict[str, int]:
    """Per live decode worker: tokens decoded with ``adapter`` so far."""
    return {
        n: next(a.decode_tokens for a in cluster.states[n].loop.call(adapter_snapshots) if a.name == adapter)
        for n in DECODE
        if n not in cluster.stopped
    }


def _prefill_tokens(cluster: Cluster, adapter: str) -> int:
    """Prompt tokens the prefill workers computed with ``adapter`` so far (live ones)."""
    return sum(
        a.prefill_tokens
        for n in PREFILL
        if n not in cluster.stopped
        for a in cluster.states[n].loop.call(adapter_snapshots)
        if a.name == adapter
    )


def _wait_mid_stream(cluster: Cluster, adapter: str, running, mode: KVStreamMode) -> tuple[str, object]:
    """Wait until one prefill worker's stream has published a chunk, has its consumer (the decode
    worker subscribed) and is still open, while that worker's engine has ``adapter`` pinned and
    ``mode``'s router runs one request, STREAMING. Returns (prefill worker, the stream).
    ``running()``: False once the request ended (then it is too late: AssertionError)."""
    svc = cluster.routers[mode][0]
    deadline = time.monotonic() + CALL_S
    while True:
        assert time.monotonic() < deadline and running(), "the adapter request never streamed"
        for n, p in cluster.prefill.items():
            for m in p.streams.live():
                s = p.streams.get(m.request_id)
                if (
                    s is not None
                    and m.ready_chunks >= 1
                    and s.has_consumer
                    and _pins(cluster, n, adapter) >= 1
                    and s.status is StreamStatus.OPEN
                ):
                    drivers = list(svc.running().values())
                    assert len(drivers) == 1 and drivers[0].state is State.STREAMING, drivers
                    return n, s
        time.sleep(0.002)


def _wait_nothing_left(cluster: Cluster, mode: KVStreamMode, timeout_s: float = 30.0) -> None:
    """No store lease or stream, every live worker's engine at its idle free blocks with nothing
    tracked, no adapter pinned (nor waiting for a slot) in any live engine, nothing running or
    outstanding on ``mode``'s router."""
    cluster.wait_clean(timeout_s)
    svc = cluster.routers[mode][0]
    idle = {n: f for n, f in cluster.idle_free.items() if n not in cluster.stopped}
    deadline = time.monotonic() + timeout_s
    while True:
        refs = {
            n: st.loop.call(_adapter_refs) for n, st in cluster.states.items() if n not in cluster.stopped
        }
        pinned = {n: r for n, r in refs.items() if r[0] or r[1] or any(r[2].values())}
        free = _free_blocks(cluster)
        router = (svc.running(), svc.outstanding.copy(), svc.kv_tokens.copy())
        if not pinned and free == idle and router == ({}, {}, {}):
            return
        assert time.monotonic() < deadline, (
            f"left behind: adapter refs {pinned}, free blocks {free} (idle {idle}), "
            f"router running / outstanding / kv tokens {router}"
        )
        time.sleep(0.05)


def _adapter_outcomes(cluster: Cluster, mode: KVStreamMode, adapter: str, outcome: str) -> float:
    return (
        cluster.metrics[mode].get_sample_value(
            "pdserve_router_adapter_requests_total", {"adapter": adapter, "outcome": outcome}
        )
        or 0.0
    )


@pytest.mark.parametrize(
    ("mode", "adapter", "seed"),
    [(KVStreamMode.STORE, "sql", 21), (KVStreamMode.GRPC, "chat", 22)],
    ids=["store", "grpc"],
)
def test_adapter_request_cancelled_mid_stream_leaves_nothing(
    cluster,
    whole,  # noqa: F811
    whole_lora,  # noqa: F811
    mode,
    adapter,
    seed,
) -> None:
    prompt = seeded_prompt(N_PROMPT, seed)
    ref = _run_whole(whole_lora, prompt, GREEDY, adapter)
    assert ref != whole.generate([prompt], [GREEDY])[0].token_ids  # the adapter changes the output
    _wait_nothing_left(cluster, mode)
    cancelled = _adapter_outcomes(cluster, mode, adapter, "cancelled")
    opened = cluster.streams_opened()
    store_before = cluster.store.stats().node

    request = build_request(prompt, GREEDY, adapter=adapter)
    codes: list[grpc.StatusCode] = []
    with slowed(cluster.slow.values(), SLOW_S), grpc.insecure_channel(cluster.address(mode)) as ch:
        call = client_pb2_grpc.GenerateStub(ch).Generate(request, timeout=CALL_S)

        def read() -> None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as e:
                codes.append(e.code())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        _, stream = _wait_mid_stream(cluster, adapter, reader.is_alive, mode)
        call.cancel()
        reader.join(CALL_S)
    assert not reader.is_alive() and codes == [grpc.StatusCode.CANCELLED]
    assert cluster.streams_opened() == opened + 1  # the one stream, never re-dispatched

    _wait_nothing_left(cluster, mode)
    store = cluster.store.stats().node
    # every store lease was released, none left to its ttl (store: the chunks went by the store)
    assert store.expired_leases == store_before.expired_leases
    assert (store.puts > store_before.puts) is (mode is KVStreamMode.STORE)
    # the stream really ended mid-way: failed (the prefill aborted) or cancelled (its consumer
    # left), its final never published
    assert stream.status in (StreamStatus.FAILED, StreamStatus.CANCELLED), stream.status
    assert stream._final is None  # type: ignore[attr-defined]
    assert _adapter_outcomes(cluster, mode, adapter, "cancelled") == cancelled + 1

    # the adapter is served exactly afterwards, through the same handoff
    with Client(cluster.address(mode), timeout=CALL_S) as c:
        got = c.complete(prompt, GREEDY, adapter=adapter)
    assert got.token_ids == ref, f"adapter {adapter!r} after a cancel: output != the engine whole"
    assert got.finish.reason == "length" and got.finish.completion_tokens == 16
    assert cluster.streams_opened() == opened + 2
    _wait_nothing_left(cluster, mode)
    assert cluster.store.stats().node.expired_leases == store_before.expired_leases


def test_adapter_request_whose_decode_worker_dies_mid_stream_is_redispatched(
    cluster,
    whole,  # noqa: F811
    whole_lora,  # noqa: F811
) -> None:
    """Last in the module: it stops a decode worker for good."""
    mode, adapter = KVStreamMode.GRPC, "chat"
    prompt = seeded_prompt(N_PROMPT, 23)
    ref = _run_whole(whole_lora, prompt, SEEDED, adapter)
    assert ref != whole.generate([prompt], [SEEDED])[0].token_ids  # the adapter changes the output
    _wait_nothing_left(cluster, mode)
    before = redispatches(cluster, mode, "decode")
    prefilled, decoded = _prefill_tokens(cluster, adapter), _decode_tokens(cluster, adapter)
    opened, expired = cluster.streams_opened(), cluster.store.stats().node.expired_leases
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(1) as ex:
        with slowed(cluster.slow.values(), SLOW_S):
            fut = ex.submit(c.complete, prompt, SEEDED, adapter=adapter)
            _wait_mid_stream(cluster, adapter, lambda: not fut.done(), mode)
            victim = cluster.routers[mode][0].running().popitem()[1].m.decode_id
            assert victim in DECODE
            cluster.kill(victim)
        got = fut.result(CALL_S)
    (survivor,) = [n for n in DECODE if n != victim]

    assert got.token_ids == ref, "re-dispatched adapter request: output != the engine whole"
    assert got.finish.reason == "length" and got.finish.completion_tokens == 16
    assert redispatches(cluster, mode, "decode") == before + 1
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    # a second stream carried the prompt again, with the adapter. (The first is not judged: the
    # in-process kill stops the victim's server, which fails the router's Decode call, but its
    # handler thread may read the stream on to the end, as a dead process would not.)
    assert cluster.streams_opened() == opened + 2
    again = _prefill_tokens(cluster, adapter) - prefilled
    # part or all of it once, then all of it again (with the first token when the first prefill
    # answered before the decode worker's loss reached the router: the tokens so far go along)
    assert N_PROMPT < again <= 2 * N_PROMPT + 1, again
    # the surviving decode worker decoded it with the adapter (the 16 tokens but the one or two
    # its prefills sampled)
    assert _decode_tokens(cluster, adapter)[survivor] - decoded[survivor] >= 14
    _wait_nothing_left(cluster, mode)
    assert cluster.store.stats().node.expired_leases == expired
