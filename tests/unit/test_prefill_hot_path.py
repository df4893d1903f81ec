"""A prefill adds its request to the engine loop without waiting for the add (#12: one wait for
the engine thread per prefill, not two): a good request is published as before, and an add that
fails still fails the call with the engine's error, leaving nothing registered in the loop."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.arena import host_id
from kv_store.client import KVStoreClient
from kv_store.service import serve
from kv_store.store import StoreConfig
from kv_store.transport import AutoTransport
from pdserve.errors import InvalidRequestError
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import worker_pb2
from pdserve.worker_base import Role, WorkerConfig, WorkerState, engine_layout
from prefill_worker.publisher import StorePublisher
from prefill_worker.service import PrefillServicer
from tests.lora_adapters import make_tiny_llama


class Ctx:
    """The servicer context a Prefill reads: an active call, its termination callbacks."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def add_callback(self, fn) -> bool:
        self.callbacks.append(fn)
        return True

    def is_active(self) -> bool:
        return True

    def invocation_metadata(self) -> tuple:
        return ()


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Iterator[tuple[PrefillServicer, KVStoreClient]]:
    base = make_tiny_llama(tmp_path_factory.mktemp("prefill_hot"))
    ecfg = EngineConfig(num_kv_blocks=64)
    eng = LLMEngine.from_pretrained(base, ecfg)
    srv = serve(StoreConfig(node_id="kv0", layout=engine_layout(eng), capacity_blocks=64))
    store = KVStoreClient(srv.address, timeout_s=20)
    transport = AutoTransport(host_id())
    st = WorkerState(WorkerConfig("p0", Role.PREFILL, str(base), srv.address, engine=ecfg), eng)
    svc = PrefillServicer(st, StorePublisher(store), store, transport)
    yield svc, store
    st.close()
    transport.close()
    store.close()
    srv.stop(0)


def request(rid: str, ids: list[int]) -> worker_pb2.PrefillRequest:
    sp = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4))
    return worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=ids, sampling=sp, lease_ttl_s=10.0)


def test_a_prefill_is_published_and_leaves_no_queue(worker) -> None:
    svc, store = worker
    for i in range(3):
        resp = svc.Prefill(request(f"ok-{i}", [3 + i, 5, 7, 11, 13]), Ctx())
        assert resp.request_id == f"ok-{i}" and resp.kv.lease_id and len(resp.kv.block_hashes) == 1
        assert resp.first_token >= 0
        assert store.release(resp.kv.lease_id)
    assert "ok-2" not in svc.state.loop._queues


def test_an_add_that_fails_fails_the_call_and_unregisters_its_queue(worker) -> None:
    svc, store = worker
    vocab = svc.state.engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="out of range"):
        svc.Prefill(request("bad", [3, vocab + 5]), Ctx())
    assert "bad" not in svc.state.loop._queues
    resp = svc.Prefill(request("after-bad", [3, 4, 5]), Ctx())  # the worker goes on serving
    assert resp.kv.lease_id
    assert store.release(resp.kv.lease_id)


def test_a_short_prompt_waits_for_the_engine_loop_once(worker, monkeypatch) -> None:
    """No ``EngineLoop.call`` (a blocking round trip to the engine thread) for a prompt without a
    full block: the add is submitted, and the only wait is the finished output's."""
    svc, store = worker
    calls = []
    real = svc.state.loop.call
    monkeypatch.setattr(svc.state.loop, "call", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    resp = svc.Prefill(request("one-wait", [3, 4, 5, 6]), Ctx())
    assert resp.kv.lease_id and calls == []
    assert store.release(resp.kv.lease_id)
