"""The router's grpc.health.v1 status follows whether it can place a request (router/health.py):
the pure rule, the registry hook (register, deregister, drop, expiry, drain) and the status as a
gRPC client sees it (Check and Watch) on a server started with ``not_serving``."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.grpc_server import start_server
from pdserve.v1 import client_pb2
from router.health import GENERATE_SERVICE, HEALTH_SERVICES, RouterHealth, missing_kinds, needed_kinds
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
P, D = WorkerKind.PREFILL, WorkerKind.DECODE


class _Recorder:
    """Stands in for grpc_health's HealthServicer: records set() calls."""

    def __init__(self) -> None:
        self.status: dict[str, int] = {}
        self.calls = 0

    def set(self, service: str, status: int) -> None:
        self.status[service] = status
        self.calls += 1


def test_needed_and_missing_kinds():
    assert needed_kinds(PolicyKind.LEAST_LOADED) == (D, P)
    assert needed_kinds(PolicyKind.COLOCATED) == (D,)
    assert missing_kinds(PolicyKind.GOODPUT, {}) == [D, P]
    assert missing_kinds(PolicyKind.GOODPUT, {P: 2}) == [D]
    assert missing_kinds(PolicyKind.GOODPUT, {P: 1, D: 1}) == []
    assert missing_kinds(PolicyKind.COLOCATED, {D: 1}) == []
    assert missing_kinds(PolicyKind.COLOCATED, {P: 3}) == [D]


def _health(policy=PolicyKind.LEAST_LOADED, timeout_s=3.0):
    now = [0.0]
    reg = Registry(heartbeat_timeout_s=timeout_s, clock=lambda: now[0])
    rec = _Recorder()
    h = RouterHealth(reg, "m", policy, rec, sweep_interval_s=60)  # no sweeps unless called
    return reg, rec, h, now


def _is(rec: _Recorder, status: int) -> bool:
    return all(rec.status[s] == status for s in HEALTH_SERVICES)


def test_follows_register_deregister_and_drop():
    reg, rec, h, _ = _health()
    assert _is(rec, NOT_SERVING) and not h.serving  # set at once, with no workers
    reg.register("p0", P, "a:1", "m", WorkerLoad())
    assert _is(rec, NOT_SERVING)
    reg.register("x0", D, "a:2", "other-model", WorkerLoad())  # another model's worker does not count
    assert _is(rec, NOT_SERVING)
    reg.register("d0", D, "a:3", "m", WorkerLoad())
    assert _is(rec, SERVING) and h.serving
    calls = rec.calls
    reg.heartbeat("d0", WorkerLoad())
    reg.register("d0", D, "a:3", "m", WorkerLoad())  # re-registering: no change, nothing set
    assert rec.calls == calls
    assert reg.deregister("d0")
    assert _is(rec, NOT_SERVING)
    reg.register("d0", D, "a:3", "m", WorkerLoad())
    assert _is(rec, SERVING)
    reg.drop("p0")  # a call to it failed UNAVAILABLE
    assert _is(rec, NOT_SERVING)


def test_expiry_and_drain_are_seen_by_the_sweep():
    reg, rec, h, now = _health(timeout_s=3.0)
    reg.register("p0", P, "a:1", "m", WorkerLoad())
    reg.register("d0", D, "a:2", "m", WorkerLoad())
    assert _is(rec, SERVING)
    now[0] = 2.0
    reg.heartbeat("p0", WorkerLoad())
    now[0] = 4.0  # d0 silent for 4 s > 3 s
    assert h.update() is False  # the sweep reads the registry: d0 expires, the listener fires too
    assert _is(rec, NOT_SERVING)
    reg.register("d1", D, "a:3", "m", WorkerLoad())
    assert _is(rec, SERVING)
    reg.get("d1").draining = True  # a draining worker takes no new requests
    assert h.update() is False and _is(rec, NOT_SERVING)


def test_colocated_serves_with_decode_workers_only():
    reg, rec, _, _ = _health(PolicyKind.COLOCATED)
    assert _is(rec, NOT_SERVING)
    reg.register("d0", D, "a:1", "m", WorkerLoad())
    assert _is(rec, SERVING)


def test_bad_sweep_interval():
    with pytest.raises(ValueError, match="sweep_interval_s"):
        RouterHealth(Registry(), "m", PolicyKind.LEAST_LOADED, _Recorder(), sweep_interval_s=0)


def test_grpc_check_and_watch():
    """Over gRPC: NOT_SERVING from the first moment (start_server's not_serving), SERVING once a
    prefill and a decode worker are registered; Watch streams the change; services not named in
    not_serving (here: a stand-in for the Registry) stay SERVING throughout."""
    reg = Registry(heartbeat_timeout_s=60)
    generate = client_pb2.DESCRIPTOR.services_by_name["Generate"]
    server, port, hs = start_server([(generate, object())], not_serving=HEALTH_SERVICES)
    h = RouterHealth(reg, "m", PolicyKind.LEAST_LOADED, hs, sweep_interval_s=0.05).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            def check(service: str) -> int:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

            assert check("") == NOT_SERVING and check(GENERATE_SERVICE) == NOT_SERVING
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=GENERATE_SERVICE), timeout=10)
            assert next(watch).status == NOT_SERVING
            reg.register("p0", P, "a:1", "m", WorkerLoad())
            reg.register("d0", D, "a:2", "m", WorkerLoad())
            assert next(watch).status == SERVING
            assert check("") == SERVING and check(GENERATE_SERVICE) == SERVING
            reg.deregister("p0")
            assert next(watch).status == NOT_SERVING
            watch.cancel()
            assert check("") == NOT_SERVING
    finally:
        h.stop()
        server.stop(0)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_paused_router_does_not_expire_its_workers_for_its_own_pause():
    """SIGSTOP of the router (seen by the chaos test): on waking, the sweep's tick is stale, so
    nothing expires before the sweep has run; the tick then forgives the pause, and workers get
    a whole heartbeat timeout to be heard again. A worker that stays silent still expires."""
    clock = _Clock()
    reg = Registry(heartbeat_timeout_s=3.0, clock=clock)
    for wid in ("p", "d"):
        kind = WorkerKind.PREFILL if wid == "p" else WorkerKind.DECODE
        reg.register(wid, kind, f"{wid}:1", "m", WorkerLoad())
    reg.tick()
    clock.t += 0.75
    reg.tick()
    clock.t += 6.0  # the router was stopped for 6 s: no tick, no heartbeat handled
    assert {w.worker_id for w in reg.alive()} == {"p", "d"}  # a request handler runs first
    assert reg.tick() == pytest.approx(6.0) and reg.pauses_forgiven == 1
    assert {w.worker_id for w in reg.alive()} == {"p", "d"}
    for _ in range(6):  # the sweep runs every 0.75 s again; p heartbeats, d stays silent
        clock.t += 0.75
        reg.tick()
        reg.heartbeat("p", WorkerLoad())
    assert reg.pauses_forgiven == 1
    assert {w.worker_id for w in reg.alive()} == {"p"}


def test_without_a_sweep_expiry_follows_the_clock_alone():
    clock = _Clock()
    reg = Registry(heartbeat_timeout_s=3.0, clock=clock)
    reg.register("d", WorkerKind.DECODE, "d:1", "m", WorkerLoad())
    clock.t += 10.0
    assert reg.alive() == []


def test_a_worker_busy_with_our_calls_is_not_dropped_for_a_late_heartbeat():
    """A prefill worker in a long prefill on a starved host missed heartbeats for 3.4 s against a
    3 s timeout and was dropped (#19 bench, load 14). With calls in flight from this router it gets
    ``busy_timeout_s`` (the calls watch it themselves); idle again, the heartbeat timeout holds,
    and a worker silent past busy_timeout_s is dropped even with calls in flight."""
    clock = _Clock()
    reg = Registry(heartbeat_timeout_s=3.0, clock=clock, busy_timeout_s=30.0)
    reg.register("p", WorkerKind.PREFILL, "p:1", "m", WorkerLoad())
    reg.register("q", WorkerKind.PREFILL, "q:1", "m", WorkerLoad())
    reg.add_inflight("p", 1)
    clock.t += 3.4
    assert {w.worker_id for w in reg.alive()} == {"p"}  # q silent and idle: dropped
    reg.seen("p")  # the prefill answered
    reg.add_inflight("p", -1)
    clock.t += 3.1
    assert reg.alive() == []  # idle and silent past the heartbeat timeout
    reg.register("p", WorkerKind.PREFILL, "p:1", "m", WorkerLoad())
    reg.add_inflight("p", 1)
    clock.t += 30.5
    assert reg.alive() == []  # a call in flight does not keep a silent worker forever
    with pytest.raises(ValueError, match="busy_timeout_s"):
        Registry(heartbeat_timeout_s=3.0, busy_timeout_s=1.0)
