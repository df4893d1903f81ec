"""Chunk-wise KV streaming for parallel-sampling groups (n > 1 / best_of) and over the direct
handoff transport (KV_STREAM_TRANSPORT_DIST: the prefill worker's outbox, pulled over the workers'
process group), between the real PrefillServicer and AsyncDecodeServicer over gRPC on 127.0.0.1.

The pair of tests/integration/test_kv_stream_workers.py (an in-process store node, a tiny Llama,
4-token blocks, 24-token prefill chunks), made a pair of ranks of a process group as in
tests/test_migration_dist.py: the prefill worker publishes to a DistPublisher (its outbox, the
store as fallback) and serves KVPeer; the decode worker pulls with a DistPuller. Only the group
itself is the in-process pipe of tests/test_migration_dist.py (the real gloo path between worker
processes: tests/integration/test_kv_stream_dist_gloo.py).

* A group streamed over grpc, store and dist equals the same group handed off whole (every
  choice), which equals the engine run whole; a dist stream puts nothing on the store.
* A single request streamed over dist equals the whole-KV handoff.
* A prefill that fails mid-stream (aborted on the prefill worker while the decode worker is
  pulling its chunks) fails the Decode (never decoded from a partial KV) and leaves nothing: no
  engine block, no store lease, no outbox entry (chunks already handed to the decode worker
  included), no stream.
* Refused, naming the field: DIST on a prefill worker outside a process group; a group's streamed
  Decode without prompt_tail_pending, and prompt_tail_pending on a single request.
"""

from __future__ import annotations

import time
from dataclasses import replace

import grpc
import pytest

from decode_worker.dist_puller import DistPuller
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import worker_pb2
from prefill_worker.dist_outbox import DistOutbox, DistPublisher, KVPeerServicer, PeerLocks
from tests.integration.kv_stream_cluster import Slow
from tests.integration.test_kv_stream_workers import (
    BLOCKS,
    CALL_S,
    GRPC,
    STORE,
    _Pair,
    _prompt,
    _reference,
    _streamed,
    _tokens,
)
from tests.test_migration_dist import _Group, _Pipes, _Receiver, _Sender

DIST = worker_pb2.KV_STREAM_TRANSPORT_DIST
GROUP = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=21, ignore_eos=True, n=3)
BEST_OF = SamplingParams(max_tokens=10, temperature=0.8, seed=4, ignore_eos=True, n=2, best_of=3)
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


class _DistPair(_Pair):
    """The pair as ranks 0 (prefill) and 1 (decode) of a (piped) process group."""

    def __init__(self, path) -> None:
        super().__init__(path)
        from pdserve.worker_base import Role
        from pdserve.worker_main import serve_worker

        pipes = _Pipes()
        self.store_publisher = self.psvc.publisher
        self.outbox = DistOutbox(64 << 20)
        self.peer = KVPeerServicer(self.outbox, _Group(0, 2), sender=_Sender(pipes, 0))
        services = [(worker_pb2.DESCRIPTOR.services_by_name["KVPeer"], self.peer)]
        self.peer_server, port = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, "prefill-s-peer")
        peer_address = f"127.0.0.1:{port}"
        self.dist_publisher = DistPublisher(
            self.outbox, _Group(0, 2), lambda: peer_address, fallback=self.store_publisher
        )
        self.psvc.publisher = self.dist_publisher
        self.puller = DistPuller(
            _Group(1, 2), self.dsvc.puller, receiver=_Receiver(pipes, 1), timeout_s=CALL_S, locks=PeerLocks()
        )
        self.dsvc.puller = self.puller
        self.slow = Slow(self.pst.engine)

    def wait_clean(self, timeout_s: float = 20.0) -> None:
        super().wait_clean(timeout_s)
        assert self.outbox.stats().entries == 0, "an outbox entry left behind"

    def stop(self) -> None:
        self.peer_server.stop(0).wait()
        super().stop()
        self.puller.close()
        self.outbox.close()


@pytest.fixture(scope="module")
def pair(tiny_models):
    p = _DistPair(tiny_models["llama"])
    yield p
    p.stop()


@pytest.fixture(scope="module")
def whole(tiny_models):
    e = LLMEngine.from_pretrained(tiny_models["llama"], EngineConfig(num_kv_blocks=BLOCKS, block_size=4))
    yield e
    e.close()


def _group_reference(
    pair: _Pair, rid: str, prompt: list[int], params: SamplingParams
) -> dict[int, list[int]]:
    """The group handed off whole (Prefill -> handle -> Decode with prompt_tail_pending)."""
    sp = sampling_to_proto(params)
    pre = pair.p.Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp), timeout=CALL_S
    )
    assert pre.prompt_tail_pending and pre.HasField("kv")
    dec = pair.d.Decode(
        worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sp, kv=pre.kv, prompt_tail_pending=True
        ),
        timeout=CALL_S,
    )
    return _choices(dec)


def _choices(call) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for m in call:
        out.setdefault(m.choice_index, []).extend(m.token_ids)
    return out


def _group_streamed(
    pair: _Pair, rid: str, prompt: list[int], params: SamplingParams, transport: int
) -> dict[int, list[int]]:
    """What the router's group relay does with streaming: Decode (kv_stream_address,
    prompt_tail_pending) and Prefill (kv_stream) at once."""
    sp = sampling_to_proto(params)
    dec = pair.d.Decode(
        worker_pb2.DecodeRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=sp,
            kv_stream_address=pair.paddr,
            prompt_tail_pending=True,
        ),
        timeout=CALL_S,
    )
    rest = pair.pool.submit(_choices, dec)
    pre = pair.p.Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp, kv_stream=transport),
        timeout=CALL_S,
    )
    assert not pre.HasField("kv") and pre.prompt_tail_pending and pre.first_token == 0
    return rest.result(CALL_S)


def _puts(pair: _Pair) -> int:
    return pair.store.stats().node.puts


@pytest.mark.parametrize(
    ("params", "transport"),
    [(GROUP, GRPC), (GROUP, STORE), (GROUP, DIST), (BEST_OF, DIST)],
    ids=["n3-grpc", "n3-store", "n3-dist", "best_of-dist"],
)
def test_streamed_group_equals_the_whole_kv_group_handoff(pair, whole, params, transport):
    prompt = _prompt(130, seed=30 + int(transport))
    ref = _group_reference(pair, f"gref-{transport}-{params.n}", prompt, params)
    engine = {o.choice_index: o.token_ids for o in whole.generate_choices(prompt, params)}
    assert ref == engine and len(ref) == params.n
    pair.wait_clean()
    opened, puts, pushes = pair.psvc.streams.opened, _puts(pair), pair.peer.pushes
    got = _group_streamed(pair, f"gst-{transport}-{params.n}", prompt, params, transport)
    assert got == ref
    assert pair.psvc.streams.opened == opened + 1  # it went by a stream
    if transport == DIST:  # chunks from the outbox over the group, nothing through the store
        assert pair.peer.pushes - pushes >= 2 and _puts(pair) == puts
    pair.wait_clean()


def test_single_request_streamed_over_dist_equals_the_whole_kv_handoff(pair):
    prompt = _prompt(130, seed=41)
    ref = _reference(pair, "dref", prompt, GREEDY)
    pair.wait_clean()
    puts, pushes = _puts(pair), pair.peer.pushes
    assert _streamed(pair, "dst", prompt, GREEDY, DIST) == ref
    assert pair.peer.pushes - pushes >= 2 and _puts(pair) == puts
    pair.wait_clean()


@pytest.mark.parametrize("params", [GREEDY, GROUP], ids=["single", "group"])
def test_prefill_failing_mid_dist_stream_leaves_nothing(pair, params):
    """The prefill is aborted on its worker after chunks were handed to the decode worker: the
    Decode fails (nothing decoded from a partial KV) and every chunk goes: the outbox entries of
    chunks delivered but not pulled too."""
    prompt = _prompt(150, seed=7)
    rid = f"dfail-{params.n}"
    sp = sampling_to_proto(params)
    pair.slow.delay_s = 0.15
    receiver = pair.puller._receiver
    receiver.before = lambda n: time.sleep(1.0)  # chunks wait, handed over but not pulled yet
    try:
        dec = pair.d.Decode(
            worker_pb2.DecodeRequest(
                request_id=rid,
                prompt_token_ids=prompt,
                sampling=sp,
                kv_stream_address=pair.paddr,
                prompt_tail_pending=params.n > 1,
            ),
            timeout=CALL_S,
        )
        out = pair.pool.submit(_tokens, dec)
        pre = pair.pool.submit(
            pair.p.Prefill,
            worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp, kv_stream=DIST),
            timeout=CALL_S,
        )
        deadline = time.monotonic() + CALL_S
        while not any(m.ready_chunks >= 5 for m in pair.psvc.streams.live()):
            assert time.monotonic() < deadline and not pre.done(), "the prefill streamed no chunk"
            time.sleep(0.005)
        pair.p.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=CALL_S)
    finally:
        pair.slow.delay_s = 0.0
        receiver.before = lambda n: None
    with pytest.raises(grpc.RpcError) as failed:
        pre.result(CALL_S)
    assert failed.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND), failed.value
    with pytest.raises(grpc.RpcError):
        out.result(CALL_S)  # the decode side never decodes from a partial KV
    # no outbox entry is left (well within their TTL): the stream took back the chunks it had
    # handed over that the decode worker never pulled
    pair.wait_clean(timeout_s=10.0)


def test_dist_stream_needs_a_process_group(pair):
    prompt = _prompt(20, seed=3)
    sp = sampling_to_proto(GREEDY)
    pair.psvc.publisher = pair.store_publisher  # a prefill worker started without --dist-init
    try:
        with pytest.raises(grpc.RpcError) as e:
            pair.p.Prefill(
                worker_pb2.PrefillRequest(
                    request_id="nog", prompt_token_ids=prompt, sampling=sp, kv_stream=DIST
                ),
                timeout=CALL_S,
            )
    finally:
        pair.psvc.publisher = pair.dist_publisher
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "KV_STREAM_TRANSPORT_DIST" in e.value.details() and "--dist-init" in e.value.details()
    pair.wait_clean()


@pytest.mark.parametrize(
    ("params", "tail", "field"),
    [(GROUP, False, "prompt_tail_pending"), (GREEDY, True, "prompt_tail_pending")],
    ids=["group-without-tail", "tail-on-a-single-request"],
)
def test_bad_streamed_group_decodes_are_refused(pair, params, tail, field):
    sp = sampling_to_proto(replace(params))
    with pytest.raises(grpc.RpcError) as e:
        _tokens(
            pair.d.Decode(
                worker_pb2.DecodeRequest(
                    request_id=f"bad-{tail}",
                    prompt_token_ids=[5, 6, 7, 8],
                    sampling=sp,
                    kv_stream_address=pair.paddr,
                    prompt_tail_pending=tail,
                ),
                timeout=CALL_S,
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
    pair.wait_clean()


def test_router_kv_stream_modes():
    """``python -m router --kv-stream dist`` maps to KV_STREAM_TRANSPORT_DIST; a group streams
    whenever streaming is on and it is prefilled on a prefill worker."""
    import router.__main__ as router_main
    from router.lifecycle.grpc_stream_legs import TRANSPORTS
    from router.lifecycle.stream_mode import KVStreamMode, group_streams

    assert KVStreamMode.parse(" DIST ") is KVStreamMode.DIST and TRANSPORTS[KVStreamMode.DIST] == DIST
    assert set(TRANSPORTS) == set(KVStreamMode) - {KVStreamMode.OFF}
    a = router_main.build_parser().parse_args(["--model", "m", "--kv-stream", "dist"])
    assert KVStreamMode.parse(a.kv_stream) is KVStreamMode.DIST
    assert group_streams(KVStreamMode.DIST, local_prefill=False)
    assert not group_streams(KVStreamMode.OFF, local_prefill=False)
    assert not group_streams(KVStreamMode.STORE, local_prefill=True)
