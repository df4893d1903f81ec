"""A worker's Heartbeater follows a router that restarted on a new port (Ray actor restart)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from pdserve.grpc_server import start_server
from pdserve.v1 import router_pb2, worker_pb2
from pdserve.worker_base import Heartbeater, Role
from router.registry import Registry
from router.service import RegistryServicer, RouterConfig


def _router() -> tuple[object, str, Registry]:
    registry = Registry(heartbeat_timeout_s=5.0)
    cfg = RouterConfig(model_path="unused", model_id="tiny")
    desc = router_pb2.DESCRIPTOR.services_by_name["Registry"]
    server, port, _ = start_server([(desc, RegistryServicer(registry, cfg))], "127.0.0.1", 0, name="r")
    return server, f"127.0.0.1:{port}", registry


def _fake_state() -> SimpleNamespace:
    """The part of WorkerState a Heartbeater reads."""
    return SimpleNamespace(
        config=SimpleNamespace(worker_id="d0", role=Role.DECODE, heartbeat_interval_s=0.05),
        address="127.0.0.1:1",
        engine=SimpleNamespace(model_id="tiny"),
        stats=lambda: worker_pb2.WorkerStats(),
    )


def _wait(pred, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_heartbeater_registers_with_restarted_router_at_new_address() -> None:
    s1, a1, reg1 = _router()
    current = {"address": a1}
    resolved: list[str] = []

    def resolve() -> str:
        resolved.append(current["address"])
        return current["address"]

    hb = Heartbeater(_fake_state(), a1, resolve=resolve)  # type: ignore[arg-type]
    hb.start()
    try:
        assert _wait(lambda: reg1.get("d0") is not None)
        assert resolved == []  # no lookups while the router answers
        s1.stop(0).wait()  # router dies ...
        s2, a2, reg2 = _router()  # ... and comes back elsewhere
        assert a2 != a1
        current["address"] = a2
        try:
            assert _wait(lambda: reg2.get("d0") is not None), "worker never re-registered at the new address"
            assert hb.router_address == a2
            assert resolved, "resolve was never consulted"
        finally:
            hb.stop(deregister=True)
            assert reg2.get("d0") is None  # deregistered from the router it follows now
            s2.stop(0).wait()
    finally:
        s1.stop(0)


def test_heartbeater_without_resolver_keeps_its_address_and_survives_resolver_errors() -> None:
    s1, a1, _ = _router()

    def broken() -> str:
        raise RuntimeError("router actor restarting")

    hb = Heartbeater(_fake_state(), a1, resolve=broken)  # type: ignore[arg-type]
    hb.start()
    s1.stop(0).wait()
    time.sleep(0.3)  # several failed beats, each consulting the broken resolver
    assert hb._thread.is_alive()
    assert hb.router_address == a1
    hb.stop(deregister=False)
