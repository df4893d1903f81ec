"""The router's control plane: Registry on its own server; workers heartbeat there whichever
router address they were given (router.registry_service, pdserve.worker_base.Heartbeater)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from pdserve.grpc_server import start_server
from pdserve.v1 import worker_pb2
from pdserve.worker_base import Heartbeater, Role
from router.registry import Registry
from router.registry_service import REGISTRY_SERVICE, RegistryServicer, start_control_server
from router.service import RouterConfig


def _fake_state() -> SimpleNamespace:
    """The part of WorkerState a Heartbeater reads."""
    return SimpleNamespace(
        config=SimpleNamespace(worker_id="d0", role=Role.DECODE, heartbeat_interval_s=0.05),
        address="127.0.0.1:1",
        engine=SimpleNamespace(model_id="tiny"),
        stats=lambda: worker_pb2.WorkerStats(num_running=3),
    )


def _wait(pred, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _router(registry: Registry):
    """(control server, control address, data server, data address) of a router's Registry."""
    servicer = RegistryServicer(registry, RouterConfig(model_path="unused", model_id="tiny"))
    control, control_address, _ = start_control_server(servicer, "127.0.0.1", 0)
    data, port, _ = start_server([(REGISTRY_SERVICE, servicer)], "127.0.0.1", 0, name="data")
    return control, control_address, data, f"127.0.0.1:{port}"


def test_worker_given_the_data_address_heartbeats_on_the_control_port() -> None:
    registry = Registry(heartbeat_timeout_s=1.0)
    control, control_address, data, data_address = _router(registry)
    assert control_address != data_address
    hb = Heartbeater(_fake_state(), data_address)  # type: ignore[arg-type]
    hb.start()
    try:
        assert _wait(lambda: registry.get("d0") is not None)
        assert _wait(lambda: hb.control_address == control_address)
        data.stop(0).wait()  # the data plane gone: heartbeats still arrive on the control port
        seen = registry.get("d0").last_seen
        assert _wait(lambda: registry.get("d0") is not None and registry.get("d0").last_seen > seen + 0.5)
        assert registry.get("d0").load.num_running == 3
    finally:
        hb.stop(deregister=True)
        assert registry.get("d0") is None  # deregistered on the control port
        control.stop(0)
        data.stop(0)


def test_worker_given_the_control_address_stays_there() -> None:
    registry = Registry(heartbeat_timeout_s=1.0)
    control, control_address, data, _ = _router(registry)
    hb = Heartbeater(_fake_state(), control_address)  # type: ignore[arg-type]
    hb.start()
    try:
        assert _wait(lambda: registry.get("d0") is not None)
        assert hb.control_address == control_address == hb.router_address
    finally:
        hb.stop(deregister=True)
        control.stop(0)
        data.stop(0)
