"""Chunk-wise KV streaming between a prefill worker and a decode worker over gRPC on 127.0.0.1
(the real PrefillServicer / AsyncDecodeServicer, an in-process KV store node): a ``Decode`` with
``kv_stream_address`` sent while the ``Prefill`` with ``kv_stream`` runs yields exactly the
tokens of the non-streamed handoff (greedy and seeded, direct gRPC and store transports); a
decode call cancelled mid-stream stops the prefill and leaves nothing on either worker or in the
store; bad combinations are refused with INVALID_ARGUMENT naming them."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker_base import engine_layout
from tests.integration.kv_stream_cluster import StoreNode, blocks_in_use, serve_decode, serve_prefill

BLOCKS = 160
CALL_S = 60.0
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)
GRPC, STORE = worker_pb2.KV_STREAM_TRANSPORT_GRPC, worker_pb2.KV_STREAM_TRANSPORT_STORE


class _Pair:
    """A prefill worker and a decode worker (the real servicers on 127.0.0.1, 4-token blocks,
    24-token prefill chunks) with one in-process store node, and stubs of both."""

    def __init__(self, path) -> None:
        ecfg = EngineConfig(
            num_kv_blocks=BLOCKS, block_size=4, long_prefill_token_threshold=24, enable_prefix_caching=False
        )
        pe, de = LLMEngine.from_pretrained(path, ecfg), LLMEngine.from_pretrained(path, ecfg)
        self.node = StoreNode(engine_layout(pe), capacity_blocks=512)
        self.store, self.transport = self.node.client, self.node.transport
        pw = serve_prefill("prefill-s", path, pe, ecfg, self.node)
        dw = serve_decode("decode-s", path, de, ecfg, self.node)
        self.pst, self.psvc, self.pserver = pw.state, pw.servicer, pw.server
        self.dst, self.dsvc, self.dserver = dw.state, dw.servicer, dw.server
        self.paddr, self.daddr = self.pst.address, self.dst.address
        self.pch, self.dch = grpc.insecure_channel(self.paddr), grpc.insecure_channel(self.daddr)
        self.p = worker_pb2_grpc.WorkerStub(self.pch)
        self.d = worker_pb2_grpc.WorkerStub(self.dch)
        self.pool = ThreadPoolExecutor(2)

    def stop(self) -> None:
        self.pool.shutdown()
        self.pch.close()
        self.dch.close()
        self.pserver.stop(0).wait()
        self.dserver.stop(0).wait()
        self.dsvc.close()
        self.psvc.streams.stop()
        self.pst.close()
        self.dst.close()
        self.node.close()

    def wait_clean(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            used = [blocks_in_use(st) for st in (self.pst, self.dst)]
            leases = self.store.stats().node.num_leases
            streams = self.psvc.streams.live()
            if not any(used) and leases == 0 and not streams:
                return
            assert time.monotonic() < deadline, (
                f"leak: blocks {used}, store leases {leases}, streams {streams}"
            )
            time.sleep(0.05)


@pytest.fixture(scope="module")
def pair(tiny_models):
    p = _Pair(tiny_models["llama"])
    yield p
    p.stop()


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g).tolist()


def _tokens(call) -> list[int]:
    out: list[int] = []
    for m in call:
        out.extend(m.token_ids)
    return out


def _reference(pair: _Pair, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    sp = sampling_to_proto(params)
    pre = pair.p.Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp), timeout=CALL_S
    )
    dec = pair.d.Decode(
        worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sp, kv=pre.kv, first_token=pre.first_token
        ),
        timeout=CALL_S,
    )
    return [pre.first_token, *_tokens(dec)]


def _streamed(pair: _Pair, rid: str, prompt: list[int], params: SamplingParams, transport) -> list[int]:
    """What a router does with streaming: Decode (kv_stream_address) and Prefill (kv_stream) at once."""
    sp = sampling_to_proto(params)
    dec = pair.d.Decode(
        worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sp, kv_stream_address=pair.paddr
        ),
        timeout=CALL_S,
    )
    rest = pair.pool.submit(_tokens, dec)
    pre = pair.p.Prefill(
        worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sp, kv_stream=transport),
        timeout=CALL_S,
    )
    assert not pre.HasField("kv")  # the KV went by the stream
    return [pre.first_token, *rest.result(CALL_S)]


@pytest.mark.parametrize(
    ("params", "transport"),
    [(GREEDY, GRPC), (SEEDED, STORE)],
    ids=["greedy-grpc", "seeded-store"],
)
def test_streamed_handoff_equals_the_whole_kv_handoff(pair, params, transport):
    prompt = _prompt(130, seed=int(transport))
    ref = _reference(pair, f"ref-{transport}", prompt, params)
    pair.wait_clean()
    assert _streamed(pair, f"st-{transport}", prompt, params, transport) == ref
    pair.wait_clean()


def test_decode_cancelled_mid_stream_leaves_nothing(pair):
    prompt = _prompt(150, seed=11)
    sp = sampling_to_proto(GREEDY)
    dec = pair.d.Decode(
        worker_pb2.DecodeRequest(
            request_id="cx", prompt_token_ids=prompt, sampling=sp, kv_stream_address=pair.paddr
        ),
        timeout=CALL_S,
    )
    pre = pair.pool.submit(
        pair.p.Prefill,
        worker_pb2.PrefillRequest(request_id="cx", prompt_token_ids=prompt, sampling=sp, kv_stream=STORE),
        timeout=CALL_S,
    )
    deadline = time.monotonic() + CALL_S
    while not pair.psvc.streams.live() and time.monotonic() < deadline:
        time.sleep(0.005)
    dec.cancel()
    try:
        pre.result(CALL_S)  # the prefill may finish first; either way nothing may stay behind
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), e
    pair.wait_clean()


def test_bad_combinations_are_refused(pair):
    sp = sampling_to_proto(GREEDY)
    with pytest.raises(grpc.RpcError) as e:
        _tokens(
            pair.d.Decode(
                worker_pb2.DecodeRequest(
                    request_id="bad1",
                    prompt_token_ids=[5, 6, 7],
                    sampling=sp,
                    kv_stream_address=pair.paddr,
                    first_token=3,
                ),
                timeout=CALL_S,
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kv_stream_address" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        _tokens(
            pair.d.Decode(
                worker_pb2.DecodeRequest(
                    request_id="bad2",
                    prompt_token_ids=[5, 6, 7],
                    sampling=sp,
                    kv_stream_address=pair.paddr,
                    local_prefill=True,
                ),
                timeout=CALL_S,
            )
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        pair.p.Prefill(
            worker_pb2.PrefillRequest(
                request_id="bad3", prompt_token_ids=[5, 6, 7], sampling=sp, kv_stream=7
            ),
            timeout=CALL_S,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "KVStreamTransport" in e.value.details()
    pair.wait_clean()
