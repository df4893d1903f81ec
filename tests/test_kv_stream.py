"""Chunk-wise KV streaming from a prefill engine to a decode engine (prefill_worker/kv_stream.py,
decode_worker/stream_puller.py; tiny random Llama, fp32, CPU): the streamed handoff produces
exactly the tokens of the non-streamed one (greedy and seeded) over the inline (direct gRPC) and
the store transports, the decode side gets chunks while the prefill still runs, and a prefill
that fails, is cancelled or is aborted midway leaves no block, lease or stream on either side or
in the store."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from decode_worker.stream_puller import (
    PartialKVError,
    StreamAssembler,
    StreamPuller,
    import_adder,
    open_stream,
)
from engine.block_hash import chain_hashes
from engine.config import EngineConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.errors import CancelledError, PdserveError, UnavailableError
from pdserve.worker_base import engine_layout
from prefill_worker.kv_stream import (
    InlineChunkSink,
    KVStreamRegistry,
    StoreChunkSink,
    StreamStatus,
    prefill_streamed,
    stream_kv_handler,
    stream_kv_messages,
)

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=5, ignore_eos=True)
BLOCK = 4
CHUNK = 24  # prefill chunk: 6 blocks per engine step
WAIT_S = 30.0  # every bounded wait: a hang fails the test instead of blocking the run


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


class _Engines:
    def __init__(self, path: Path) -> None:
        cfg = EngineConfig(
            num_kv_blocks=160,
            block_size=BLOCK,
            max_num_batched_tokens=256,
            long_prefill_token_threshold=CHUNK,
            enable_prefix_caching=False,
        )
        pe = LLMEngine.from_pretrained(path, cfg)
        step = pe.step

        def device_like_step():  # a step takes a few ms, as on a device: the producer polls between steps
            time.sleep(0.005)
            return step()

        pe.step = device_like_step  # type: ignore[method-assign]
        self.p = EngineLoop(pe, name="test-prefill")
        self.d = EngineLoop(LLMEngine.from_pretrained(path, cfg), name="test-decode")
        self.layout = engine_layout(self.p.engine)
        self.model_id = self.p.engine.model_id
        self.pool = ThreadPoolExecutor(4)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.p.stop()
        self.d.stop()


@pytest.fixture(scope="module")
def eng(tiny_models) -> Iterator[_Engines]:
    e = _Engines(tiny_models["llama"])
    yield e
    e.close()


def _no_leaks(*loops: EngineLoop) -> None:
    for lp in loops:

        def check(e: LLMEngine) -> None:
            assert not e.has_unfinished()
            assert e.kv.num_free_blocks == e.kv.num_blocks, "a KV block is still held"
            assert not e._tracked and not e._prefilled

        lp.call(check)


def _collect(q) -> list[int]:
    out: list[int] = []
    while True:
        item = q.get(timeout=WAIT_S)
        if isinstance(item, BaseException):
            raise item
        out.extend(item.new_token_ids)
        if item.finished:
            return out


def _adder(rid: str, prompt: list[int], params: SamplingParams):
    return lambda e: e.add_request(rid, prompt, params, prefill_only=True)


def _reference(eng: _Engines, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    """The non-streamed handoff: prefill whole, export, import on the decode engine."""
    q = eng.p.add(rid, _adder(rid, prompt, params))
    item = q.get(timeout=WAIT_S)
    assert not isinstance(item, BaseException)
    kv = eng.p.call(lambda e: e.export_kv(rid))
    eng.p.call(lambda e: e.release(rid))
    dq = eng.d.add(
        rid,
        lambda e: e.import_kv(rid, prompt, kv.first_token, kv.blocks, params, first_logprob=kv.first_logprob),
    )
    return [kv.first_token, *_collect(dq)]


def _decode(
    eng: _Engines, rid: str, prompt: list[int], params: SamplingParams, messages, cancel, puller=None
):
    asm = StreamAssembler(
        rid,
        eng.layout,
        chain_hashes(prompt, BLOCK, eng.model_id, include_partial=True),
        len(prompt),
    )
    kv = StreamPuller(puller).read(messages, asm, cancel)
    dq = eng.d.add(rid, import_adder(rid, prompt, kv, params))
    return kv, [kv.final.first_token, *_collect(dq)]


class _GatedSink(InlineChunkSink):
    """Chunk 1 is published only once the consumer holds chunk 0: proves the overlap (the decode
    side receives KV while the prefill still runs) without timing anything."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.first_taken = threading.Event()
        self.puts = 0

    def put(self, request_id, index, first_block, hashes, blocks):
        if index == 1:
            assert self.first_taken.wait(WAIT_S), "the consumer never got chunk 0"
        self.puts += 1
        if self.inner is not None:
            return self.inner.put(request_id, index, first_block, hashes, blocks)
        return super().put(request_id, index, first_block, hashes, blocks)

    def drop(self, chunk):
        if self.inner is not None:
            self.inner.drop(chunk)


def _tap(messages, sink: _GatedSink, registry: KVStreamRegistry, rid: str, seen: list):
    """Pass the stream's messages on; record the stream's status when chunk 0 arrives."""
    for m in messages:
        if m.WhichOneof("kind") == "blocks" and m.blocks.first_block == 0:
            s = registry.get(rid)
            seen.append(s.status if s is not None else None)
            sink.first_taken.set()
        yield m


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_streamed_inline_equals_non_streamed(eng, params):
    prompt = _prompt(150, seed=1)
    ref = _reference(eng, f"ref-{params.temperature}", prompt, params)
    _no_leaks(eng.p, eng.d)
    reg = KVStreamRegistry(wait_s=WAIT_S)
    sink = _GatedSink()
    rid = f"inline-{params.temperature}"
    fut = eng.pool.submit(
        prefill_streamed,
        eng.p,
        reg,
        sink,
        eng.layout,
        rid,
        prompt,
        _adder(rid, prompt, params),
        model_id=eng.model_id,
    )
    seen: list = []
    msgs = stream_kv_messages(reg, rid)
    kv, out = _decode(eng, rid, prompt, params, _tap(msgs, sink, reg, rid, seen), msgs.close)
    res = fut.result(WAIT_S)
    assert out == ref
    assert seen == [StreamStatus.OPEN]  # chunk 0 reached the decode side during the prefill
    # several chunks (one per engine step the producer saw; a busy host may merge steps)
    assert res.final.num_chunks == kv.final.num_chunks >= 2
    assert sink.puts == res.final.num_chunks
    assert reg.live() == []
    _no_leaks(eng.p, eng.d)


@pytest.fixture(scope="module")
def store(eng):
    from decode_worker.puller import StorePuller
    from kv_store.arena import host_id
    from kv_store.client import KVStoreClient
    from kv_store.service import serve
    from kv_store.store import StoreConfig
    from kv_store.transport import AutoTransport
    from prefill_worker.publisher import StorePublisher

    node = serve(StoreConfig("stream-node", eng.layout, capacity_blocks=256))
    pub, pull = KVStoreClient(node.address, timeout_s=20), KVStoreClient(node.address, timeout_s=20)
    puller = StorePuller(AutoTransport(host_id()), {node.address: pull})
    yield pub, StorePublisher(pub), puller
    pub.close() if hasattr(pub, "close") else None
    node.stop(0) if hasattr(node, "stop") else None


def _store_clean(pub) -> None:
    s = pub.stats().node
    assert s.num_leases == 0 and s.num_pinned == 0, "a store lease is still held"


def test_streamed_store_equals_non_streamed(eng, store):
    pub, publisher, puller = store
    prompt = _prompt(130, seed=2)
    params = SEEDED
    ref = _reference(eng, "ref-store", prompt, params)
    reg = KVStreamRegistry(wait_s=WAIT_S)
    sink = _GatedSink(StoreChunkSink(publisher, pub, eng.layout, eng.model_id, lease_ttl_s=30))
    rid = "store-1"
    fut = eng.pool.submit(
        prefill_streamed,
        eng.p,
        reg,
        sink,
        eng.layout,
        rid,
        prompt,
        _adder(rid, prompt, params),
        model_id=eng.model_id,
    )
    seen: list = []
    msgs = stream_kv_messages(reg, rid)
    kv, out = _decode(eng, rid, prompt, params, _tap(msgs, sink, reg, rid, seen), msgs.close, puller)
    res = fut.result(WAIT_S)
    assert out == ref
    assert seen == [StreamStatus.OPEN]
    assert res.final.num_chunks >= 2
    assert puller.leased_reads >= 1  # read from the arena over shared memory
    _store_clean(pub)
    _no_leaks(eng.p, eng.d)


class _FailingSink(InlineChunkSink):
    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at = inner, fail_at

    def put(self, request_id, index, first_block, hashes, blocks):
        if index == self.fail_at:
            raise UnavailableError("store node lost mid-stream")
        return self.inner.put(request_id, index, first_block, hashes, blocks)

    def drop(self, chunk):
        self.inner.drop(chunk)


def test_prefill_failing_midway_leaks_nothing(eng, store):
    """The sink fails at chunk 2 (the consumer reads slowly, so chunks 0-1 are still
    undelivered or in flight): the producer aborts the prefill, the stream fails, the consumer
    gets the error, every lease is released and nothing was imported."""
    pub, publisher, puller = store
    prompt = _prompt(140, seed=3)
    reg = KVStreamRegistry(wait_s=WAIT_S)
    sink = _FailingSink(StoreChunkSink(publisher, pub, eng.layout, eng.model_id, lease_ttl_s=30), fail_at=2)
    rid = "fail-1"
    fut = eng.pool.submit(
        prefill_streamed,
        eng.p,
        reg,
        sink,
        eng.layout,
        rid,
        prompt,
        _adder(rid, prompt, GREEDY),
        model_id=eng.model_id,
    )
    msgs = stream_kv_messages(reg, rid)
    with pytest.raises(UnavailableError, match="lost mid-stream"):
        _decode(eng, rid, prompt, GREEDY, msgs, msgs.close, puller)
    with pytest.raises(UnavailableError):
        fut.result(WAIT_S)
    assert reg.live() == []
    _store_clean(pub)
    _no_leaks(eng.p, eng.d)


def test_consumer_cancelling_midway_stops_the_prefill(eng, store):
    pub, publisher, puller = store
    prompt = _prompt(150, seed=4)
    reg = KVStreamRegistry(wait_s=WAIT_S)
    sink = _GatedSink(StoreChunkSink(publisher, pub, eng.layout, eng.model_id, lease_ttl_s=30))
    rid = "cancel-1"
    fut = eng.pool.submit(
        prefill_streamed,
        eng.p,
        reg,
        sink,
        eng.layout,
        rid,
        prompt,
        _adder(rid, prompt, GREEDY),
        model_id=eng.model_id,
    )
    msgs = stream_kv_messages(reg, rid)

    def cut(ms):
        for m in ms:
            yield m
            if m.WhichOneof("kind") == "blocks":
                sink.first_taken.set()
                raise CancelledError("the decode worker's caller went away")

    with pytest.raises(CancelledError):
        _decode(eng, rid, prompt, GREEDY, cut(msgs), msgs.close, puller)
    with pytest.raises(CancelledError):
        fut.result(WAIT_S)
    assert reg.live() == []
    _store_clean(pub)
    _no_leaks(eng.p, eng.d)


def test_prefill_aborted_midway_fails_the_stream(eng):
    """The request is aborted in the prefill engine (worker told to Abort) after chunk 0: the
    consumer gets the error and imports nothing; a stream nobody reads is also cleaned up."""
    prompt = _prompt(150, seed=5)
    reg = KVStreamRegistry(wait_s=WAIT_S)
    rid = "abort-1"

    class AbortAfterFirst(InlineChunkSink):
        def put(self, request_id, index, first_block, hashes, blocks):
            c = super().put(request_id, index, first_block, hashes, blocks)
            if index == 0:
                threading.Thread(target=eng.p.abort, args=(rid,)).start()
            return c

    fut = eng.pool.submit(
        prefill_streamed,
        eng.p,
        reg,
        AbortAfterFirst(),
        eng.layout,
        rid,
        prompt,
        _adder(rid, prompt, GREEDY),
        model_id=eng.model_id,
    )
    msgs = stream_kv_messages(reg, rid)
    with pytest.raises(PdserveError):
        _decode(eng, rid, prompt, GREEDY, msgs, msgs.close)
    with pytest.raises(PdserveError):
        fut.result(WAIT_S)
    assert reg.live() == []
    _no_leaks(eng.p, eng.d)


def test_unconsumed_stream_expires_and_releases_its_leases(eng, store):
    pub, publisher, _ = store
    prompt = _prompt(60, seed=6)
    reg = KVStreamRegistry(ttl_s=0.01, wait_s=0.0)
    sink = StoreChunkSink(publisher, pub, eng.layout, eng.model_id, lease_ttl_s=30)
    rid = "orphan-1"
    res = prefill_streamed(
        eng.p, reg, sink, eng.layout, rid, prompt, _adder(rid, prompt, GREEDY), model_id=eng.model_id
    )
    assert res.final.num_chunks >= 1
    assert [m.status for m in reg.live()] == [StreamStatus.FINISHED]
    threading.Event().wait(0.05)
    assert reg.sweep() == 1
    assert reg.live() == [] and sink.released == res.final.num_chunks
    _store_clean(pub)
    _no_leaks(eng.p)


def test_grpc_stream_equals_non_streamed_and_a_cancelled_call_leaks_nothing(eng):
    """The direct gRPC path: StreamKV served by a prefill-side gRPC server on 127.0.0.1."""
    reg = KVStreamRegistry(wait_s=WAIT_S)
    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((stream_kv_handler(reg),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        prompt = _prompt(120, seed=7)
        ref = _reference(eng, "ref-grpc", prompt, GREEDY)
        rid = "grpc-1"
        call = open_stream(ch, rid, timeout_s=WAIT_S)  # the decode side asks before the prefill starts
        fut = eng.pool.submit(
            prefill_streamed,
            eng.p,
            reg,
            InlineChunkSink(),
            eng.layout,
            rid,
            prompt,
            _adder(rid, prompt, GREEDY),
            model_id=eng.model_id,
        )
        _, out = _decode(eng, rid, prompt, GREEDY, call, call.cancel)
        fut.result(WAIT_S)
        assert out == ref
        # cancelled after the first chunk: the prefill stops, the stream is gone
        rid = "grpc-2"
        sink = _GatedSink()
        call = open_stream(ch, rid, timeout_s=WAIT_S)
        fut = eng.pool.submit(
            prefill_streamed,
            eng.p,
            reg,
            sink,
            eng.layout,
            rid,
            prompt,
            _adder(rid, prompt, GREEDY),
            model_id=eng.model_id,
        )
        for m in call:
            if m.WhichOneof("kind") == "blocks":
                break
        call.cancel()
        sink.first_taken.set()
        with pytest.raises(CancelledError):
            fut.result(WAIT_S)
        # the server-side generator sees the cancellation asynchronously
        for _ in range(200):
            if not reg.live():
                break
            threading.Event().wait(0.02)
        assert reg.live() == []
        _no_leaks(eng.p, eng.d)
    finally:
        ch.close()
        server.stop(0).wait()


def test_partial_stream_is_never_imported(eng):
    """A stream that ends before its final (the prefill worker died mid-stream) raises
    PartialKVError; nothing reaches the decode engine."""
    prompt = _prompt(60, seed=8)
    reg = KVStreamRegistry(wait_s=WAIT_S)
    rid = "partial-1"
    got: queue.SimpleQueue = queue.SimpleQueue()

    def truncated():
        msgs = stream_kv_messages(reg, rid)
        for m in msgs:
            if m.WhichOneof("kind") == "final":
                got.put(True)
                msgs.close()
                return  # the connection broke before the final reached the decode side
            yield m

    fut = eng.pool.submit(
        prefill_streamed,
        eng.p,
        reg,
        InlineChunkSink(),
        eng.layout,
        rid,
        prompt,
        _adder(rid, prompt, GREEDY),
        model_id=eng.model_id,
    )
    with pytest.raises(PartialKVError, match="ended before its final"):
        _decode(eng, rid, prompt, GREEDY, truncated(), lambda: None)
    fut.result(WAIT_S)
    assert got.get(timeout=WAIT_S)
    _no_leaks(eng.p, eng.d)


def test_a_step_larger_than_max_chunk_bytes_goes_in_several_chunks(eng):
    """Transfer units: a step's blocks split into chunks of at most ``max_chunk_bytes`` (one
    gRPC message each on the direct path); the output is unchanged."""
    prompt = _prompt(90, seed=9)
    ref = _reference(eng, "ref-split", prompt, GREEDY)
    reg = KVStreamRegistry(wait_s=WAIT_S)
    rid = "split-1"
    two_blocks = 2 * eng.layout.block_nbytes
    fut = eng.pool.submit(
        prefill_streamed,
        eng.p,
        reg,
        InlineChunkSink(),
        eng.layout,
        rid,
        prompt,
        _adder(rid, prompt, GREEDY),
        model_id=eng.model_id,
        max_chunk_bytes=two_blocks,
    )
    sizes: list[int] = []

    def tap(ms):
        for m in ms:
            if m.WhichOneof("kind") == "blocks":
                sizes.append(m.blocks.num_blocks)
            yield m

    msgs = stream_kv_messages(reg, rid)
    _, out = _decode(eng, rid, prompt, GREEDY, tap(msgs), msgs.close)
    res = fut.result(WAIT_S)
    assert out == ref
    assert max(sizes) <= 2 and sum(sizes) == -(-90 // BLOCK) == res.final.num_blocks
    _no_leaks(eng.p, eng.d)
