"""Chunk-wise KV streaming, the parts without an engine: the stream's ordering, manifest and
ownership rules (prefill_worker/kv_stream.py), the decode side's assembly with out-of-order
chunks and every check it makes (decode_worker/stream_puller.py), and the handoff-overlap
prediction shared by the router and the simulator (router/policy/kv_stream.py)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from decode_worker.stream_puller import PartialKVError, StreamAssembler, StreamPuller
from engine.block_hash import chain_hashes
from kv_store.checksum import KVChecksumError, block_checksum
from kv_store.convert import layout_to_proto
from kv_store.handle import BlockLocation, KVHandle
from kv_store.layout import KVLayout
from kv_store.tensors import tensor_bytes
from pdserve.errors import CancelledError, InvalidRequestError, UnavailableError
from pdserve.v1 import worker_pb2
from prefill_worker.kv_stream import (
    KVStreamRegistry,
    StreamChunk,
    StreamFinal,
    StreamStatus,
    chunk_to_proto,
    final_to_proto,
    ready_blocks,
)
from router.policy.estimate import TtftEstimator
from router.policy.kv_stream import chunk_sizes, handoff_after_prefill, pipeline_residual

LAYOUT = KVLayout(num_layers=2, block_size=4, num_kv_heads=2, head_dim=4, dtype="float32", model_id="m")
N_TOKENS = 37  # 10 blocks, the last one partial


def _hashes(n_tokens: int = N_TOKENS):
    return chain_hashes(list(range(3, 3 + n_tokens)), LAYOUT.block_size, "m", include_partial=True)


def _kv(n_blocks: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn((n_blocks, *LAYOUT.block_shape), generator=g)


def _chunk(kv, hashes, index: int, first: int, end: int) -> StreamChunk:
    b = kv[first:end].clone()
    sums = tuple(block_checksum(tensor_bytes(b[i])) for i in range(b.shape[0]))
    return StreamChunk(index, first, tuple(hashes[first:end]), sums, blocks=b)


# ------------------------------------------------------------------ producer side


def test_ready_blocks_counts_full_blocks_until_the_end():
    assert ready_blocks(0, 37, 4, False) == 0
    assert ready_blocks(7, 37, 4, False) == 1
    assert ready_blocks(36, 37, 4, False) == 9
    assert ready_blocks(37, 37, 4, False) == 9  # the partial last block waits for the end
    assert ready_blocks(37, 37, 4, True) == 10
    with pytest.raises(ValueError):
        ready_blocks(1, 1, 0, False)


def _stream(drops: list):
    reg = KVStreamRegistry(ttl_s=60, wait_s=0.0)
    return reg, reg.open("r", LAYOUT, N_TOKENS, drops.append)


def test_stream_hands_chunks_over_in_order_with_a_manifest():
    kv, h = _kv(10), _hashes()
    drops: list = []
    reg, s = _stream(drops)
    s.add(_chunk(kv, h, 0, 0, 4))
    m = s.manifest()
    assert (m.status, m.ready_chunks, m.ready_blocks) == (StreamStatus.OPEN, 1, 4)
    items = reg.take("r").consume(timeout_s=5)
    assert next(items).index == 0
    s.add(_chunk(kv, h, 1, 4, 10))
    assert next(items).first_block == 4
    s.finish(StreamFinal(N_TOKENS, 10, 2, first_token=9))
    assert isinstance(next(items), StreamFinal)
    with pytest.raises(StopIteration):
        next(items)
    assert s.ended and drops == []
    reg.close(s)
    assert reg.live() == []


def test_chunk_out_of_index_order_is_refused_and_dropped():
    kv, h = _kv(10), _hashes()
    drops: list = []
    _, s = _stream(drops)
    with pytest.raises(InvalidRequestError, match="chunk 1 after 0"):
        s.add(_chunk(kv, h, 1, 4, 10))
    assert len(drops) == 1


def test_failure_drops_only_undelivered_chunks_and_reaches_the_consumer():
    kv, h = _kv(10), _hashes()
    drops: list = []
    reg, s = _stream(drops)
    items = reg.take("r").consume(timeout_s=5)
    s.add(_chunk(kv, h, 0, 0, 4))
    assert next(items).index == 0  # delivered: the consumer's to release
    s.add(_chunk(kv, h, 1, 4, 8))
    s.fail(UnavailableError("prefill worker lost"))
    assert [c.index for c in drops] == [1]
    with pytest.raises(UnavailableError, match="prefill worker lost"):
        next(items)
    with pytest.raises(CancelledError):  # the producer learns at its next chunk, which is dropped
        s.add(_chunk(kv, h, 2, 8, 10))
    assert [c.index for c in drops] == [1, 2]


def test_consumer_leaving_cancels_the_stream():
    kv, h = _kv(10), _hashes()
    drops: list = []
    reg, s = _stream(drops)
    s.add(_chunk(kv, h, 0, 0, 4))
    s.add(_chunk(kv, h, 1, 4, 8))
    items = reg.take("r").consume(timeout_s=5)
    next(items)
    items.close()
    assert s.status is StreamStatus.CANCELLED and [c.index for c in drops] == [1]
    with pytest.raises(CancelledError):
        s.finish(StreamFinal(N_TOKENS, 10, 2, 9))
    with pytest.raises(InvalidRequestError, match="already has a consumer"):
        s.consume(1)


def test_an_aborted_request_drops_its_finished_stream_at_once():
    """The router aborts a streamed prefill whose client left between the prefill's end and the
    decode worker's subscription: the finished stream is cancelled now (its chunks dropped,
    their leases released), not after the registry's TTL; the sweeper helper also runs it."""
    kv, h = _kv(10), _hashes()
    drops: list = []
    reg, s = _stream(drops)
    s.add(_chunk(kv, h, 0, 0, 4))
    s.add(_chunk(kv, h, 1, 4, 10))
    s.finish(StreamFinal(N_TOKENS, 10, 2, first_token=9))
    assert reg.sweep() == 0 and reg.live()  # within its TTL, nobody subscribed: kept
    assert reg.cancel("r", "request 'r' was aborted") is True
    assert s.status is StreamStatus.CANCELLED and [c.index for c in drops] == [0, 1]
    assert reg.live() == [] and reg.cancel("r", "again") is False and reg.cancel("nope", "x") is False


def test_the_sweeper_helper_sweeps_until_stopped():
    from prefill_worker.sweeper import Sweeper

    ticks: list[int] = []
    done = threading.Event()

    def sweep() -> None:
        ticks.append(1)
        if len(ticks) >= 3:
            done.set()

    sw = Sweeper(sweep, "test-sweeper")
    sw.start(0.01)
    sw.start(0.01)  # a second start is a no-op
    assert done.wait(10)
    sw.stop()
    n = len(ticks)
    time.sleep(0.05)
    assert len(ticks) == n  # stopped
    with pytest.raises(ValueError, match="interval"):
        Sweeper(sweep, "x").start(0)


def test_take_waits_for_a_stream_opened_later_and_refuses_unknown_ones():
    reg = KVStreamRegistry(wait_s=5.0)
    got: list = []
    t = threading.Thread(target=lambda: got.append(reg.take("late")))
    t.start()
    s = reg.open("late", LAYOUT, N_TOKENS, lambda c: None)
    t.join(5)
    assert got == [s]
    with pytest.raises(InvalidRequestError, match="already open"):
        reg.open("late", LAYOUT, N_TOKENS, lambda c: None)
    reg.wait_s = 0.0
    with pytest.raises(Exception, match="no KV stream for request 'nope'"):
        reg.take("nope")


def test_item_timeout_cancels_a_silent_stream():
    drops: list = []
    reg, s = _stream(drops)
    items = reg.take("r").consume(timeout_s=0.01)
    with pytest.raises(UnavailableError, match="published nothing"):
        next(items)
    assert s.status is StreamStatus.CANCELLED


# ------------------------------------------------------------------ decode side


def _asm() -> StreamAssembler:
    return StreamAssembler("r", LAYOUT, _hashes(), N_TOKENS)


def test_assembler_places_chunks_arriving_in_any_order():
    kv, h = _kv(10), _hashes()
    bounds = [(0, 3), (3, 4), (4, 8), (8, 10)]
    for seed in range(4):
        order = list(range(len(bounds)))
        random.Random(seed).shuffle(order)
        asm = _asm()
        for i in order:
            c = _chunk(kv, h, i, *bounds[i])
            assert not asm.complete
            asm.add(c.first_block, c.blocks, c.block_hashes, c.checksums)
        asm.finish(StreamFinal(N_TOKENS, 10, 4, 5))
        assert torch.equal(asm.result().blocks, kv)


def test_assembler_refuses_wrong_duplicate_corrupt_and_partial_kv():
    kv, h = _kv(10), _hashes()
    asm = _asm()
    c = _chunk(kv, h, 0, 0, 4)
    asm.add(c.first_block, c.blocks, c.block_hashes, c.checksums)
    with pytest.raises(InvalidRequestError, match="repeats blocks"):
        asm.add(2, kv[2:5], h[2:5], [block_checksum(tensor_bytes(kv[i])) for i in range(2, 5)])
    other = chain_hashes(list(range(50, 50 + N_TOKENS)), 4, "m", include_partial=True)
    with pytest.raises(InvalidRequestError, match="another prompt"):
        asm.add(4, kv[4:6], other[4:6], [block_checksum(tensor_bytes(kv[i])) for i in (4, 5)])
    bad = kv[4:6].clone()
    sums = [block_checksum(tensor_bytes(bad[i])) for i in range(2)]
    bad[1, 0, 0, 0, 0, 0] += 1.0  # a flipped value after the producer's checksum
    with pytest.raises(KVChecksumError):
        asm.add(4, bad, h[4:6], sums)
    with pytest.raises(InvalidRequestError, match="outside"):
        asm.add(9, kv[8:10], h[9:11] if len(h) > 10 else h[8:10], [0, 0])
    asm.finish(StreamFinal(N_TOKENS, 10, 1, 5))
    with pytest.raises(PartialKVError, match="6 of 10 blocks missing"):
        asm.result()
    with pytest.raises(InvalidRequestError, match="final names"):
        asm.finish(StreamFinal(N_TOKENS + 4, 11, 1, 5))


class _SlowPuller:
    """A store puller whose pulls finish in reverse order of submission (out-of-order arrival)."""

    def __init__(self, kv: torch.Tensor, fail_first: int | None = None) -> None:
        self.kv = kv
        self.released: list[str] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def pull(self, handle: KVHandle) -> torch.Tensor:
        first = int(handle.request_id.split(":")[1])
        if first == self.fail_first:
            raise UnavailableError("store node lost")
        time.sleep(0.05 if first == 0 else 0.0)
        return self.kv[first : first + len(handle.block_hashes)].clone()

    def release(self, handle: KVHandle) -> None:
        with self.lock:
            self.released.append(handle.lease_id)


def _store_messages(kv, h, bounds):
    yield worker_pb2.MigrationChunk(
        begin=worker_pb2.MigrationBegin(request_id="r", layout=layout_to_proto(LAYOUT))
    )
    for i, (a, b) in enumerate(bounds):
        c = _chunk(kv, h, i, a, b)
        handle = KVHandle(
            request_id=f"r:{a}",
            block_hashes=c.block_hashes,
            locations=(BlockLocation("node", "127.0.0.1:1"),) * c.num_blocks,
            layout=LAYOUT,
            num_tokens=c.num_blocks * 4,
            lease_id=f"lease-{i}",
            block_checksums=c.checksums,
        )
        yield chunk_to_proto(StreamChunk(i, a, c.block_hashes, c.checksums, handle=handle), LAYOUT)
    yield final_to_proto(StreamFinal(N_TOKENS, 10, len(bounds), first_token=5))


def test_store_chunks_pulled_concurrently_complete_out_of_order():
    kv, h = _kv(10), _hashes()
    bounds = [(0, 4), (4, 8), (8, 10)]
    fake = _SlowPuller(kv)
    sp = StreamPuller(fake, pull_threads=3)
    out = sp.read(_store_messages(kv, h, bounds), _asm(), cancel=lambda: None)
    assert torch.equal(out.blocks, kv) and out.final.first_token == 5
    assert sorted(fake.released) == ["lease-0", "lease-1", "lease-2"]  # every lease released once


def test_a_failed_pull_cancels_the_stream_and_releases_every_lease():
    kv, h = _kv(10), _hashes()
    fake = _SlowPuller(kv, fail_first=4)
    cancelled = threading.Event()
    with pytest.raises(UnavailableError, match="store node lost"):
        StreamPuller(fake, pull_threads=1).read(
            _store_messages(kv, h, [(0, 4), (4, 8), (8, 10)]), _asm(), cancelled.set
        )
    assert cancelled.is_set()
    assert sorted(fake.released) == ["lease-0", "lease-1", "lease-2"]


def test_inline_chunks_round_trip_through_the_wire_messages():
    kv, h = _kv(10), _hashes()

    def msgs():
        yield worker_pb2.MigrationChunk(
            begin=worker_pb2.MigrationBegin(request_id="r", layout=layout_to_proto(LAYOUT))
        )
        yield chunk_to_proto(_chunk(kv, h, 0, 0, 6), LAYOUT)
        yield chunk_to_proto(_chunk(kv, h, 1, 6, 10), LAYOUT)
        yield final_to_proto(StreamFinal(N_TOKENS, 10, 2, first_token=7))

    out = StreamPuller(None).read(msgs(), _asm(), cancel=lambda: None)
    assert torch.equal(out.blocks, kv) and out.final.num_chunks == 2


# ------------------------------------------------------------------ prediction


class _Linear:
    """Prefill: 1 ms per token; transfer: 1 ms fixed + 1 ms per 1000 bytes; 100 bytes per token."""

    kv_bytes_per_token = 100

    def prefill_time(self, tokens, contexts=None) -> float:
        return sum(tokens) * 1e-3

    def transfer_time(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else 1e-3 + nbytes / 1e6


def test_pipeline_residual_is_the_last_chunk_when_the_link_keeps_up_else_the_backlog():
    assert pipeline_residual([1, 1, 1], [0.5, 0.5, 0.25]) == pytest.approx(0.25)
    # the link is slower than compute: the backlog adds up (3 x 2 s transfers after 1 s computes)
    assert pipeline_residual([1, 1, 1], [2, 2, 2]) == pytest.approx(4.0)
    assert pipeline_residual([], []) == 0.0
    with pytest.raises(ValueError):
        pipeline_residual([1], [])


def test_chunk_sizes_put_reused_tokens_in_the_first_chunk():
    assert chunk_sizes(1000, 0, 512) == [(512, 0, 512), (488, 512, 488)]
    assert chunk_sizes(1000, 600, 512) == [(400, 600, 1000)]
    assert chunk_sizes(10, 10, 4) == [(1, 9, 10)]  # at least one token is computed


def test_handoff_prediction_leaves_the_last_chunk_only():
    lat = _Linear()
    est = handoff_after_prefill(lat, 2048, 0, 512)
    assert est.num_chunks == 4
    assert est.whole_s == pytest.approx(lat.transfer_time(2048 * 100))
    assert est.streamed_s == pytest.approx(lat.transfer_time(512 * 100))  # 512 ms compute >> 52 ms transfer
    assert est.ratio < 0.3
    t = TtftEstimator(lat)
    assert t.handoff_time(2048) == pytest.approx(est.whole_s)
    assert t.handoff_time(2048, chunk_tokens=512) == pytest.approx(est.streamed_s)


def test_simulator_handoff_with_streaming_is_the_last_chunk():
    """The simulator prices a streamed handoff with the same function as the router."""
    from simulator.config import disaggregated
    from simulator.workload import WorkloadRequest
    from tests.unit.test_sim_cluster import KW, SPEC, TokenLatency, run

    reqs = [WorkloadRequest(0.0, 2000, 4)]
    lat = TokenLatency(per_token=1e-3, bw=1e8)  # 2 s prefill, 20 ms whole transfer
    whole = run(disaggregated(SPEC, 1, 1, **KW), reqs, lat).records[0]
    streamed = run(disaggregated(SPEC, 1, 1, kv_stream_chunk_tokens=500, **KW), reqs, lat).records[0]
    assert whole.transfer_s == pytest.approx(2000 * 1000 / 1e8)
    assert streamed.transfer_s == pytest.approx(500 * 1000 / 1e8)  # the last 500-token chunk only
    assert streamed.transfer_s == pytest.approx(handoff_after_prefill(lat, 2000, 0, 500).streamed_s)
    assert streamed.finish == pytest.approx(whole.finish - (whole.transfer_s - streamed.transfer_s))
