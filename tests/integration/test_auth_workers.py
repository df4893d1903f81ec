"""Attack replays against the router's Registry with worker verification on (issue #13), over
real gRPC on loopback: a rogue registering with a huge capacity is refused (it serves no Worker
API, or its Stats contradict it), a wrong model is refused, Deregister/Heartbeat spam without the
worker's token is refused and leaves the real worker registered; the real worker, holding its
token, heartbeats and deregisters."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.grpc_server import start_server
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2
from router.registry import Registry
from router.registry_service import RegistryServicer, start_control_server, worker_verifier
from router.service import RouterConfig
from router.worker_verify import WORKER_TOKEN_MD, worker_metadata, worker_token_from

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
MODEL = "smol"


def layout(**kw: object) -> common_pb2.KVLayout:
    base: dict[str, object] = dict(
        model_id=MODEL, num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", block_size=16
    )
    base.update(kw)
    return common_pb2.KVLayout(**base)  # type: ignore[arg-type]


def stats(worker_id: str, **kw: object) -> worker_pb2.WorkerStats:
    base: dict[str, object] = dict(
        worker_id=worker_id,
        role=worker_pb2.WORKER_ROLE_DECODE,
        model=MODEL,
        kv_blocks_total=512,
        token_budget=2048,
        kv_layout=layout(),
    )
    base.update(kw)
    return worker_pb2.WorkerStats(**base)  # type: ignore[arg-type]


class FakeWorker:
    """A Worker service that only answers Stats (what the router asks before trusting it)."""

    def __init__(self, s: worker_pb2.WorkerStats) -> None:
        self.s = s

    def Stats(self, req: worker_pb2.StatsRequest, ctx: grpc.ServicerContext) -> worker_pb2.WorkerStats:
        return self.s


@pytest.fixture(scope="module")
def router(smollm_path: Path) -> Iterator[tuple[Registry, router_pb2_grpc.RegistryStub, str]]:
    registry = Registry(heartbeat_timeout_s=30.0)
    cfg = RouterConfig(model_path=str(smollm_path), model_id=MODEL)
    servicer = RegistryServicer(registry, cfg, verifier=worker_verifier(registry, cfg))
    server, address, _ = start_control_server(servicer, "127.0.0.1", 0)
    ch = grpc.insecure_channel(address)
    try:
        yield registry, router_pb2_grpc.RegistryStub(ch), address
    finally:
        ch.close()
        server.stop(0)


@pytest.fixture
def worker() -> Iterator[tuple[str, FakeWorker]]:
    fake = FakeWorker(stats("w"))
    server, port, _ = start_server([(WORKER_SERVICE, fake)], "127.0.0.1", 0, name="fake-worker")
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        server.stop(0)


def reg(worker_id: str, address: str, **kw: object) -> router_pb2.RegisterRequest:
    s = stats(worker_id, **kw)
    return router_pb2.RegisterRequest(
        worker_id=worker_id, role=s.role, address=address, model=s.model, stats=s
    )


def test_honest_worker_gets_a_token_and_only_it_may_heartbeat_or_deregister(router, worker) -> None:
    registry, stub, _ = router
    address, fake = worker
    fake.s = stats("d-honest")
    _, call = stub.Register.with_call(reg("d-honest", address), timeout=10)
    token = worker_token_from(call.trailing_metadata())
    assert token and registry.get("d-honest") is not None

    hb = router_pb2.HeartbeatRequest(worker_id="d-honest", stats=stats("d-honest", num_running=2))
    assert stub.Heartbeat(hb, metadata=worker_metadata(token), timeout=5).known
    assert registry.get("d-honest").load.num_running == 2

    # the replayed attack: Deregister spam from anyone else knocks nobody out
    for md in ((), worker_metadata("guess"), ((WORKER_TOKEN_MD, token[:-1] + "x"),)):
        with pytest.raises(grpc.RpcError) as e:
            stub.Deregister(router_pb2.DeregisterRequest(worker_id="d-honest"), metadata=md, timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:  # nor can anyone else report its load
            stub.Heartbeat(
                router_pb2.HeartbeatRequest(worker_id="d-honest", stats=stats("d-honest")), metadata=md
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert registry.get("d-honest") is not None and registry.get("d-honest").load.num_running == 2

    # the worker cannot inflate its capacity after verification either
    big = router_pb2.HeartbeatRequest(worker_id="d-honest", stats=stats("d-honest", kv_blocks_total=10**6))
    with pytest.raises(grpc.RpcError) as e:
        stub.Heartbeat(big, metadata=worker_metadata(token), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

    r = stub.Deregister(router_pb2.DeregisterRequest(worker_id="d-honest"), metadata=worker_metadata(token))
    assert r.found and registry.get("d-honest") is None


def test_rogue_registrations_are_refused(router, worker) -> None:
    registry, stub, _ = router
    address, fake = worker
    # a process that speaks only the Registry API, claiming a huge capacity
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(reg("rogue", "127.0.0.1:1", kv_blocks_total=10**7), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "verify" in e.value.details()
    # a Worker service whose own Stats contradict the advertised capacity
    fake.s = stats("rogue")
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(reg("rogue", address, kv_blocks_total=10**7), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "kv_blocks_total" in e.value.details()
    # another model, or the router's model with another KV geometry
    fake.s = stats("rogue", model="other", kv_layout=layout(model_id="other"))
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(reg("rogue", address, model="other", kv_layout=layout(model_id="other")), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "serves 'smol'" in e.value.details()
    fake.s = stats("rogue", kv_layout=layout(num_layers=2))
    with pytest.raises(grpc.RpcError) as e:
        stub.Register(reg("rogue", address, kv_layout=layout(num_layers=2)), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert registry.get("rogue") is None


def test_real_heartbeater_registers_heartbeats_and_deregisters_with_its_token(router, worker) -> None:
    from types import SimpleNamespace

    from pdserve.worker_base import Heartbeater, Role
    from tests.polling import wait_for

    registry, _, control = router
    address, fake = worker
    fake.s = stats("d-real")
    state = SimpleNamespace(
        config=SimpleNamespace(worker_id="d-real", role=Role.DECODE, heartbeat_interval_s=0.05),
        address=address,
        engine=SimpleNamespace(model_id=MODEL),
        stats=lambda: fake.s,
    )
    hb = Heartbeater(state, router_address=control)  # type: ignore[arg-type]
    hb.start()
    try:
        wait_for(lambda: registry.get("d-real") is not None, 10, "verified registration")
        seen = registry.get("d-real").last_seen
        wait_for(lambda: registry.get("d-real").last_seen > seen, 10, "an accepted heartbeat")
    finally:
        hb.stop(deregister=True)
    assert registry.get("d-real") is None  # its own Deregister, with its token, is accepted
