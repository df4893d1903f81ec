"""LoRA adapter requests that end abnormally while their KV streams (issues #14 and #16):
in-process routers with ``kv_stream`` = store and grpc in front of two prefill and two decode
workers that all serve two random PEFT adapters ("sql", "chat") on the tiny random Llama
(kv_stream_cluster's :class:`Cluster` with ``lora``; 32-token prefill chunks, a 224-token prompt
streams in 7 chunks), each decode engine with ONE adapter slot (so a second adapter there evicts
the first, or waits while a running request pins it). The prefill engines are slowed so that
the test acts mid-stream: it waits until a prefill worker's stream of the request has published a
chunk, has its consumer (the decode worker reads it) and is still open, with the adapter pinned
in that prefill engine's slot. A decode worker's slot is "held" by a local-prefill Decode with
the other adapter sent to it directly (its steps slowed so that it outlasts the hold), cancelled
at the end.

* a client that cancels an adapter request then (store and grpc): the call ends CANCELLED, the
  stream ended (failed by the prefill's abort, or cancelled) without its final, and nothing is
  left behind: no store lease (every one released: none expired on its ttl), no stream, every
  worker's engine back to its idle free blocks with no request tracked, no adapter pinned in any
  engine's LoRA slots (nor a request waiting for one), nothing running or outstanding on the
  router, and the router counted the adapter request cancelled. The next request with the same
  adapter equals the engine run whole with it;
* cancelled before the decode side took any chunk (store): every decode worker's slot is held,
  so the request's decode worker waits for a slot before it subscribes while the prefill
  publishes chunks to the store under leases; at the cancel the prefill worker's stream drops
  them and releases their leases itself (at once, none to its ttl), no block stays pinned;
* the decode worker's only slot is taken by another adapter's request while it pulls a stream:
  the assembled KV waits for the slot (it failed RESOURCE_EXHAUSTED before), then evicts the
  other adapter; output == the engine whole, no re-dispatch;
* every decode worker's only slot stays pinned by the other adapter longer than the admission
  timeout (shortened to 1 s): the chosen decode worker refuses RESOURCE_EXHAUSTED naming itself
  and the adapter's LoRA slot, the router hands that to the client (no re-dispatch), and the
  prefill's finished stream nobody consumed is dropped at once (its store leases with it: they
  waited the stream's 60 s ttl before);
* a streamed parallel-sampling group (n=2, no adapter: groups take none) whose first
  ``import_kv_group`` after the pull is refused (its blocks taken meanwhile) waits for room and
  imports again: choices == the engine whole; one for which no decode worker has room past the
  admission timeout is refused RESOURCE_EXHAUSTED, its unconsumed stream dropped at once too;
* last (it stops a decode worker for good): the decode worker reading an adapter request's
  stream is killed mid-stream (grpc) while the other decode worker's only slot is held by the
  other adapter; the router re-dispatches the request there, which waits for a slot before it
  subscribes (no refusal, no second re-dispatch), then evicts the other adapter; the prompt is
  prefilled again with the adapter (a second stream), and the output (seeded) equals the engine
  run whole with the adapter; nothing is left on the live workers or the router.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client, build_request
from pdserve.errors import ResourceExhaustedError
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import client_pb2_grpc, worker_pb2, worker_pb2_grpc
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
    Slow,
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
    # one adapter slot per decode engine: a second adapter there evicts the first, or waits
    # while a running request pins it
    cl = Cluster(model_path, lora=lora, decode_max_loras=1)
    cl.idle_free = _free_blocks(cl)  # type: ignore[attr-defined] - before any request
    cl.decode_slow = {n: Slow(cl.states[n].engine) for n in DECODE}  # type: ignore[attr-defined]
    yield cl
    cl.stop()


HOLD_STEP_S = 0.03  # a slot holder's decode step: its 480 tokens would take 14 s; it is cancelled first
_holders = itertools.count()


@contextlib.contextmanager
def _slot_held(cluster: Cluster, name: str, adapter: str) -> Iterator[str]:
    """A request with ``adapter`` decoding on decode worker ``name`` while the block runs: a
    local-prefill Decode sent to that worker directly (its steps slowed so that it outlasts the
    block), pinning ``adapter``'s slot there (waited for); cancelled at the end (it must still
    have been running). Yields its request id."""
    rid = f"hold-{name}-{next(_holders)}"
    params = SamplingParams(max_tokens=480, temperature=0.0, ignore_eos=True)  # 488 of 512 positions
    req = worker_pb2.DecodeRequest(
        request_id=rid,
        prompt_token_ids=seeded_prompt(8, 99),
        sampling=sampling_to_proto(params),
        adapter=adapter,
        local_prefill=True,
    )
    slow = cluster.decode_slow[name]  # type: ignore[attr-defined]
    slow.delay_s = HOLD_STEP_S
    codes: list[grpc.StatusCode] = []
    with grpc.insecure_channel(cluster.states[name].address) as ch:
        call = worker_pb2_grpc.WorkerStub(ch).Decode(req, timeout=CALL_S)
        reader = _read_in_background(call, codes)
        try:
            deadline = time.monotonic() + CALL_S
            while cluster.states[name].loop.call(lambda e: e._lora_pins.get(rid)) != adapter:
                assert time.monotonic() < deadline and reader.is_alive(), f"{rid} never pinned {adapter!r}"
                time.sleep(0.005)
            yield rid
        finally:
            slow.delay_s = 0.0
            call.cancel()
            reader.join(CALL_S)
    assert codes == [grpc.StatusCode.CANCELLED], f"slot holder {rid} ended early: {codes}"


def _slot_state(cluster: Cluster, name: str) -> tuple[dict[str, str], list[str], list[str], int]:
    """Decode worker ``name``'s engine: the requests pinning a slot (id -> adapter), the
    requests waiting for one, the adapters resident in its slots, and its slot evictions so far."""

    def read(e: LLMEngine) -> tuple[dict[str, str], list[str], list[str], int]:
        assert e.lora is not None
        return dict(e._lora_pins), list(e._lora_waiting), e.lora.slot_resident(), e.lora.stats.slot_evictions

    return cluster.states[name].loop.call(read)


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


def _wait_stream_and_leases_gone(cluster: Cluster, timeout_s: float = 5.0) -> None:
    """Wait until no KV stream and no store lease is left (``cluster.leaks``); AssertionError
    naming what is left after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, leases, streams = cluster.leaks()
        if not leases and not streams:
            return
        assert time.monotonic() < deadline, f"left behind: {leases} store leases, streams {streams}"
        time.sleep(0.02)


def _read_in_background(call, codes: list[grpc.StatusCode]) -> threading.Thread:
    """A started daemon thread reading ``call`` to its end; the status code of an RpcError that
    ends it goes to ``codes``."""

    def read() -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            codes.append(e.code())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


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
        reader = _read_in_background(call, codes)
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


def test_store_stream_cancelled_before_its_chunks_were_taken_releases_their_leases(cluster) -> None:
    """The prefill side's release of chunks published but never taken: every decode worker's one
    slot is pinned by a request with the other adapter, so the adapter request's decode worker
    waits for a slot before it subscribes to the stream, while the (slowed) prefill publishes
    chunks to the store under leases. Cancelled then: the prefill worker's stream drops its
    undelivered chunks and releases their leases itself (before any ttl), and the store is left
    with no lease and no pinned block."""
    mode, adapter, other = KVStreamMode.STORE, "chat", "sql"
    prompt = seeded_prompt(N_PROMPT, 24)
    _wait_nothing_left(cluster, mode)
    store_before = cluster.store.stats().node
    opened = cluster.streams_opened()
    cancelled = _adapter_outcomes(cluster, mode, adapter, "cancelled")
    request = build_request(prompt, GREEDY, adapter=adapter)
    codes: list[grpc.StatusCode] = []
    with contextlib.ExitStack() as held:
        for n in DECODE:
            held.enter_context(_slot_held(cluster, n, other))
        with slowed(cluster.slow.values(), SLOW_S), grpc.insecure_channel(cluster.address(mode)) as ch:
            call = client_pb2_grpc.GenerateStub(ch).Generate(request, timeout=CALL_S)
            reader = _read_in_background(call, codes)
            deadline = time.monotonic() + CALL_S
            while True:  # two chunks published, none taken: no consumer yet
                assert time.monotonic() < deadline and reader.is_alive(), "the stream never published"
                live = [(p, m) for p in cluster.prefill.values() for m in p.streams.live()]
                if live and live[0][1].ready_chunks >= 2:
                    break
                time.sleep(0.002)
            assert len(live) == 1, live
            p, m = live[0]
            stream = p.streams.get(m.request_id)
            assert stream is not None and stream.status is StreamStatus.OPEN
            assert not stream.has_consumer and stream._delivered == 0  # type: ignore[attr-defined]
            sink = stream._drop.__self__  # type: ignore[attr-defined] - the stream's StoreChunkSink
            assert sink.released == 0
            leases = cluster.store.stats().node.num_leases
            assert leases >= m.ready_chunks >= 2  # each published chunk is in the store under a lease
            # the request's decode worker is still waiting for a slot: nothing of it admitted
            for n in DECODE:
                pins, waiting, _, _ = _slot_state(cluster, n)
                assert set(pins.values()) == {other} and not waiting, (n, pins, waiting)
            call.cancel()
            reader.join(CALL_S)
        assert not reader.is_alive() and codes == [grpc.StatusCode.CANCELLED]
        # the prefill worker dropped the chunks nobody took and released their leases itself:
        # at once, not at their ttl, while the slot holders still run
        deadline = time.monotonic() + 5.0
        while cluster.store.stats().node.num_leases:
            assert time.monotonic() < deadline, f"leases left: {cluster.store.stats().node.num_leases}"
            time.sleep(0.01)
        assert stream.status in (StreamStatus.FAILED, StreamStatus.CANCELLED), stream.status
        assert not stream.has_consumer and stream._final is None  # type: ignore[attr-defined]
        assert sink.released >= m.ready_chunks, (sink.released, m.ready_chunks)
    assert cluster.streams_opened() == opened + 1  # the one stream, never re-dispatched
    _wait_nothing_left(cluster, mode)
    node = cluster.store.stats().node
    assert node.num_leases == 0 and node.num_pinned == 0 and node.num_pending == 0
    assert node.expired_leases == store_before.expired_leases  # released, none left to its ttl
    assert node.puts > store_before.puts  # the chunks did go to the store
    assert _adapter_outcomes(cluster, mode, adapter, "cancelled") == cancelled + 1


def test_streamed_adapter_handoff_whose_slot_is_taken_during_the_pull_waits_for_it(
    cluster,
    whole_lora,  # noqa: F811
) -> None:
    """The decode worker admits a streamed adapter request (blocks and a slot for it are there)
    and pulls its stream; meanwhile a request with the other adapter takes that worker's only
    slot. Once the KV is assembled the import finds no slot: the worker waits for one (as the
    non-streamed handoff does), not fail the request with RESOURCE_EXHAUSTED after the whole
    pull; when the holder ends it evicts the other adapter and the output equals the engine run
    whole with the adapter, on the same decode worker (no re-dispatch), nothing left behind."""
    mode, adapter, other = KVStreamMode.STORE, "chat", "sql"
    prompt = seeded_prompt(N_PROMPT, 25)
    ref = _run_whole(whole_lora, prompt, GREEDY, adapter)
    _wait_nothing_left(cluster, mode)
    svc = cluster.routers[mode][0]
    before = redispatches(cluster, mode, "decode")
    opened, expired = cluster.streams_opened(), cluster.store.stats().node.expired_leases
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(1) as ex:
        with slowed(cluster.slow.values(), SLOW_S):
            fut = ex.submit(c.complete, prompt, GREEDY, adapter=adapter)
            _, stream = _wait_mid_stream(cluster, adapter, lambda: not fut.done(), mode)
            dec = svc.running().popitem()[1].m.decode_id
            with _slot_held(cluster, dec, other) as holder:
                _, _, _, evictions = _slot_state(cluster, dec)
                deadline = time.monotonic() + CALL_S
                while not stream.ended:  # the decode worker took the final: the KV is assembled
                    assert time.monotonic() < deadline and not fut.done(), "the stream never ended"
                    time.sleep(0.005)
                assert stream.status is StreamStatus.FINISHED
                time.sleep(0.3)  # its import finds no slot meanwhile
                assert not fut.done(), f"not waited for a slot: {fut.exception()!r}"
                pins, waiting, resident, _ = _slot_state(cluster, dec)
                assert pins == {holder: other} and not waiting and resident == [other], (pins, resident)
        got = fut.result(CALL_S)
    assert got.token_ids == ref, "adapter request that waited for a slot: output != the engine whole"
    assert got.finish.reason == "length" and got.finish.completion_tokens == 16
    assert redispatches(cluster, mode, "decode") == before and cluster.streams_opened() == opened + 1
    _, _, resident, evicted = _slot_state(cluster, dec)
    assert resident == [adapter] and evicted == evictions + 1, (resident, evicted, evictions)
    _wait_nothing_left(cluster, mode)
    assert cluster.store.stats().node.expired_leases == expired


@contextlib.contextmanager
def _admission_timeout(cluster: Cluster, timeout_s: float) -> Iterator[None]:
    """Every live decode worker's ``admission_timeout_s`` set to ``timeout_s`` while the block
    runs (its ``WorkerConfig`` is frozen: replaced, then restored)."""
    saved = {n: cluster.states[n].config for n in DECODE if n not in cluster.stopped}
    for n, c in saved.items():
        cluster.states[n].config = dataclasses.replace(c, admission_timeout_s=timeout_s)
    try:
        yield
    finally:
        for n, c in saved.items():
            cluster.states[n].config = c


ADMISSION_S = 1.0  # the decode workers' admission timeout in the refusal test (30 s by default)


def test_streamed_adapter_handoff_with_no_slot_within_the_admission_timeout_is_refused(cluster) -> None:
    """Every decode worker's only adapter slot stays pinned by a request with the other adapter
    for longer than the admission timeout (shortened to 1 s here): the decode worker the router
    chose waits that long for a slot, then refuses the streamed adapter request
    RESOURCE_EXHAUSTED naming itself and the adapter's LoRA slot (``_no_room``). The router
    hands that refusal to the client as it is (the decode side refused, it is not lost: no
    re-dispatch to the other decode worker, no second stream; counted ``rejected``), within a
    bound of the timeout; the request was never admitted (the holders keep their slots, nobody
    waits for one) and nothing is left behind: no store lease (none left to its ttl), no stream,
    no engine block, no pin, nothing on the router."""
    mode, adapter, other = KVStreamMode.STORE, "chat", "sql"
    prompt = seeded_prompt(N_PROMPT, 26)
    _wait_nothing_left(cluster, mode)
    before = redispatches(cluster, mode, "decode")
    rejected = _adapter_outcomes(cluster, mode, adapter, "rejected")
    opened, expired = cluster.streams_opened(), cluster.store.stats().node.expired_leases
    request = build_request(prompt, GREEDY, adapter=adapter)
    with contextlib.ExitStack() as held:
        holders = {n: held.enter_context(_slot_held(cluster, n, other)) for n in DECODE}
        with _admission_timeout(cluster, ADMISSION_S), grpc.insecure_channel(cluster.address(mode)) as ch:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for _ in client_pb2_grpc.GenerateStub(ch).Generate(request, timeout=CALL_S):
                    pass
            took = time.monotonic() - t0
        # the refusal came after the decode worker waited its admission timeout, and not much later
        assert ADMISSION_S <= took < ADMISSION_S + 5.0, took
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.value.code(), err.value.details())
        details = err.value.details() or ""
        refusers = [n for n in DECODE if f"decode worker {n} has no free KV blocks" in details]
        assert len(refusers) == 1 and f"LoRA slot for adapter {adapter!r}" in details, details
        # never admitted: each holder still has its worker's one slot, nobody waits for one
        for n in DECODE:
            pins, waiting, resident, _ = _slot_state(cluster, n)
            assert pins == {holders[n]: other} and not waiting and resident == [other], (n, pins, waiting)
        # the refusal went to the client: no re-dispatch to the other decode worker, one stream
        assert redispatches(cluster, mode, "decode") == before
        assert cluster.streams_opened() == opened + 1
        assert _adapter_outcomes(cluster, mode, adapter, "rejected") == rejected + 1
        # the prefill's stream, which no decode worker consumed, and its store leases are gone
        # while the holders still run: within seconds, not at the stream's 60 s ttl
        _wait_stream_and_leases_gone(cluster)
    _wait_nothing_left(cluster, mode, timeout_s=5.0)
    assert cluster.store.stats().node.expired_leases == expired  # released, none left to its ttl
    assert all(cluster.states[n].config.admission_timeout_s == 30.0 for n in DECODE)  # restored


GROUP = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=17, ignore_eos=True, n=2)


def test_streamed_group_whose_blocks_were_taken_during_the_pull_waits_for_room(
    cluster,
    whole,  # noqa: F811
    monkeypatch,
) -> None:
    """A parallel-sampling group (n=2, no adapter: a group cannot carry one) through the streamed
    handoff: the decode worker had room before the pull, but its first ``import_kv_group`` after
    the pull is refused ResourceExhaustedError (as if another request took the blocks meanwhile).
    The worker waits for room and imports again (``add_group_when_room``), not fail the group:
    both choices equal the engine run whole, the import was tried twice (once refused), one
    stream, no re-dispatch, nothing left behind."""
    mode = KVStreamMode.STORE
    prompt = seeded_prompt(N_PROMPT, 27)
    ref = {o.choice_index: o.token_ids for o in whole.generate_choices(prompt, GROUP)}
    assert len(ref) == 2 and ref[0] != ref[1]
    _wait_nothing_left(cluster, mode)
    before = redispatches(cluster, mode, "decode")
    opened = cluster.streams_opened()
    tries: list[tuple[str, str]] = []  # (decode worker, request id) of each import_kv_group

    def refusing_once(name: str, real):
        def import_kv_group(rid, *a, **kw):
            tries.append((name, rid))
            if len(tries) == 1:  # nothing taken: the engine's own refusal takes nothing either
                raise ResourceExhaustedError(f"test: {name}'s blocks taken during the stream read")
            return real(rid, *a, **kw)

        return import_kv_group

    for n in DECODE:
        e = cluster.states[n].engine
        monkeypatch.setattr(e, "import_kv_group", refusing_once(n, e.import_kv_group))
    with Client(cluster.address(mode), timeout=CALL_S) as c:
        got = {i: ch.token_ids for i, ch in enumerate(c.complete_choices(prompt, GROUP, direct=False))}
    assert got == ref, "a group whose import was refused once: choices != the engine whole"
    assert len(tries) == 2 and tries[0] == tries[1], tries  # refused, then imported, same worker
    assert redispatches(cluster, mode, "decode") == before and cluster.streams_opened() == opened + 1
    _wait_nothing_left(cluster, mode)


def test_streamed_group_with_no_room_within_the_admission_timeout_is_refused(cluster, monkeypatch) -> None:
    """A streamed parallel-sampling group (n=2) for which no decode worker has room (its
    ``can_admit_group`` says no) for longer than the admission timeout (1 s here): the chosen
    decode worker refuses RESOURCE_EXHAUSTED naming itself and the group's blocks, the router
    hands that to the client (no re-dispatch, one stream) within a bound, and the prefill's
    finished stream nobody consumed is dropped at once with its store leases (not at its 60 s
    ttl); nothing is left behind."""
    mode = KVStreamMode.STORE
    prompt = seeded_prompt(N_PROMPT, 28)
    _wait_nothing_left(cluster, mode)
    before = redispatches(cluster, mode, "decode")
    opened, expired = cluster.streams_opened(), cluster.store.stats().node.expired_leases
    for n in DECODE:
        monkeypatch.setattr(cluster.states[n].engine, "can_admit_group", lambda num_tokens, choices: False)
    with _admission_timeout(cluster, ADMISSION_S), Client(cluster.address(mode), timeout=CALL_S) as c:
        t0 = time.monotonic()
        with pytest.raises(ResourceExhaustedError) as err:
            c.complete_choices(prompt, GROUP, direct=False)
        took = time.monotonic() - t0
    assert ADMISSION_S <= took < ADMISSION_S + 5.0, took
    msg = str(err.value)
    refusers = [n for n in DECODE if f"decode worker {n} has no free KV blocks" in msg]
    assert len(refusers) == 1 and f"{N_PROMPT - 1} prompt tokens and 2 choices" in msg, msg
    assert redispatches(cluster, mode, "decode") == before and cluster.streams_opened() == opened + 1
    # the unconsumed stream and its leases are gone within seconds, not at its 60 s ttl
    _wait_stream_and_leases_gone(cluster)
    monkeypatch.undo()
    _wait_nothing_left(cluster, mode, timeout_s=5.0)
    assert cluster.store.stats().node.expired_leases == expired  # released, none left to its ttl


def test_adapter_request_redispatched_to_a_decode_worker_whose_slot_is_taken(
    cluster,
    whole,  # noqa: F811
    whole_lora,  # noqa: F811
) -> None:
    """Last in the module: it stops a decode worker for good. The decode worker reading an
    adapter request's stream is killed mid-stream (grpc) while the other decode worker's only
    slot is pinned by a running request with the other adapter. The router re-dispatches the
    request there; that worker waits for a slot (no refusal, no re-dispatch again, the adapter
    request not admitted, not run on the base model) until the holder ends, then evicts the
    other adapter from the slot and decodes with this one: the output (seeded) equals the engine
    run whole with the adapter, and nothing is left on the live workers or the router."""
    mode, adapter, other = KVStreamMode.GRPC, "chat", "sql"
    prompt = seeded_prompt(N_PROMPT, 23)
    ref = _run_whole(whole_lora, prompt, SEEDED, adapter)
    assert ref != whole.generate([prompt], [SEEDED])[0].token_ids  # the adapter changes the output
    assert ref != _run_whole(whole_lora, prompt, SEEDED, other)  # and differs from the other's
    _wait_nothing_left(cluster, mode)
    svc = cluster.routers[mode][0]
    before = redispatches(cluster, mode, "decode")
    prefilled, decoded = _prefill_tokens(cluster, adapter), _decode_tokens(cluster, adapter)
    opened, expired = cluster.streams_opened(), cluster.store.stats().node.expired_leases
    with Client(cluster.address(mode), timeout=CALL_S) as c, ThreadPoolExecutor(1) as ex:
        with slowed(cluster.slow.values(), SLOW_S):
            fut = ex.submit(c.complete, prompt, SEEDED, adapter=adapter)
            _, first = _wait_mid_stream(cluster, adapter, lambda: not fut.done(), mode)
            victim = svc.running().popitem()[1].m.decode_id
            assert victim in DECODE
            (survivor,) = [n for n in DECODE if n != victim]
            with _slot_held(cluster, survivor, other) as holder:
                _, _, resident, evictions = _slot_state(cluster, survivor)
                assert resident == [other]  # the survivor's only slot: the other adapter, pinned
                cluster.kill(victim)
                deadline = time.monotonic() + CALL_S
                while not (
                    cluster.streams_opened() == opened + 2
                    and [d.m.decode_id for d in svc.running().values()] == [survivor]
                ):
                    assert time.monotonic() < deadline and not fut.done(), "never re-dispatched"
                    time.sleep(0.005)
                # the prompt is prefilled again, every chunk and the final published, while the
                # survivor waits for a slot before it subscribes to the stream
                while True:
                    assert time.monotonic() < deadline and not fut.done(), "no second stream finished"
                    second = [
                        st
                        for p in cluster.prefill.values()
                        for m in p.streams.live()
                        if (st := p.streams.get(m.request_id)) is not None and st is not first
                    ]
                    if second and second[0].status is StreamStatus.FINISHED:
                        break
                    time.sleep(0.005)
                time.sleep(0.2)
                assert not second[0].has_consumer and not fut.done()
                assert redispatches(cluster, mode, "decode") == before + 1
                pins, waiting, resident, _ = _slot_state(cluster, survivor)
                assert pins == {holder: other} and not waiting and resident == [other], (pins, resident)
                assert _decode_tokens(cluster, adapter)[survivor] == decoded[survivor]
        got = fut.result(CALL_S)

    assert got.token_ids == ref, "re-dispatched adapter request: output != the engine whole"
    assert got.finish.reason == "length" and got.finish.completion_tokens == 16
    assert redispatches(cluster, mode, "decode") == before + 1  # waited, never refused
    assert victim not in {e.worker_id for e in cluster.registry.alive()}
    # the survivor evicted the other adapter (idle once its holder ended) for this one
    _, _, resident, evicted = _slot_state(cluster, survivor)
    assert resident == [adapter] and evicted == evictions + 1, (resident, evicted, evictions)
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
