"""A worker registers with every router (``--router a,b``): one heartbeater per router, each with
its own token; a router that hangs delays nobody else; one that comes back is registered again."""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace

import grpc
import pytest

from pdserve.auth.worker_token import WORKER_TOKEN_MD, worker_token_from
from pdserve.errors import InvalidRequestError
from pdserve.grpc_server import start_server
from pdserve.router_addresses import parse_router_addresses
from pdserve.v1 import router_pb2, router_pb2_grpc, worker_pb2
from pdserve.worker_base import Role, RouterLinks
from tests.polling import wait_for

REGISTRY = router_pb2.DESCRIPTOR.services_by_name["Registry"]


class FakeRegistry(router_pb2_grpc.RegistryServicer):
    """Issues token ``tok-<name>`` at Register; records the token every Heartbeat carried."""

    def __init__(self, name: str) -> None:
        self.token = f"tok-{name}"
        self.known: set[str] = set()
        self.beats: list[str | None] = []  # token of each heartbeat
        self.lock = threading.Lock()

    def Register(self, req, ctx):
        with self.lock:
            self.known.add(req.worker_id)
        ctx.set_trailing_metadata(((WORKER_TOKEN_MD, self.token),))
        return router_pb2.RegisterResponse()

    def Heartbeat(self, req, ctx):
        with self.lock:
            self.beats.append(worker_token_from(ctx.invocation_metadata()))
            return router_pb2.HeartbeatResponse(known=req.worker_id in self.known)

    def Deregister(self, req, ctx):
        with self.lock:
            found = req.worker_id in self.known
            self.known.discard(req.worker_id)
        return router_pb2.DeregisterResponse(found=found)

    def count(self) -> int:
        with self.lock:
            return len(self.beats)


def _serve(reg: FakeRegistry, port: int = 0) -> tuple[grpc.Server, str]:
    server, bound, _ = start_server([(REGISTRY, reg)], "127.0.0.1", port, name="fake-router")
    return server, f"127.0.0.1:{bound}"


def _state() -> SimpleNamespace:
    return SimpleNamespace(
        config=SimpleNamespace(worker_id="d0", role=Role.DECODE, heartbeat_interval_s=0.05),
        address="127.0.0.1:1",
        engine=SimpleNamespace(model_id="tiny"),
        stats=lambda: worker_pb2.WorkerStats(),
    )


def test_parse_router_addresses_commas_repeats_and_refusals() -> None:
    assert parse_router_addresses("a:1") == ("a:1",)
    assert parse_router_addresses(" a:1, b:2 ") == ("a:1", "b:2")
    assert parse_router_addresses(["a:1,b:2", "c:3", "a:1"]) == ("a:1", "b:2", "c:3")
    for bad, why in (("", "empty entry"), ("a:1,,b:2", "empty entry"), ("a", "not HOST:PORT"),
                     ("a:0", "not HOST:PORT"), ("a:x", "not HOST:PORT"), ([], "no address")):  # fmt: skip
        with pytest.raises(InvalidRequestError, match=why) as e:
            parse_router_addresses(bad, what="--router")
        assert "--router" in str(e.value)


def test_worker_flag_takes_a_list_and_repeats() -> None:
    from pdserve.worker_main import build_parser

    a = build_parser(Role.DECODE).parse_args(
        ["--worker-id", "d", "--model", "m", "--store", "s:1", "--router", "a:1,b:2", "--router", "c:3"]
    )
    assert parse_router_addresses(a.router) == ("a:1", "b:2", "c:3")


def test_registers_with_every_router_with_its_own_token() -> None:
    ra, rb = FakeRegistry("a"), FakeRegistry("b")
    (sa, aa), (sb, ab) = _serve(ra), _serve(rb)
    links = RouterLinks(_state(), (aa, ab))  # type: ignore[arg-type]
    links.start()
    try:
        wait_for(lambda: ra.count() >= 3 and rb.count() >= 3, 10, "heartbeats to both routers")
        assert links.registered() == {aa: True, ab: True}
        assert set(ra.beats) == {"tok-a"} and set(rb.beats) == {"tok-b"}  # each router's own token
    finally:
        links.stop(deregister=True)
        sa.stop(0)
        sb.stop(0)
    assert not ra.known and not rb.known  # deregistered from both


def test_a_hung_router_does_not_delay_heartbeats_to_the_other() -> None:
    # a router that accepts TCP connections and never answers: its Register waits out its timeout
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    ra = FakeRegistry("a")
    sa, aa = _serve(ra)
    links = RouterLinks(_state(), (f"127.0.0.1:{hung.getsockname()[1]}", aa))  # type: ignore[arg-type]
    links.start()
    try:
        # 20 beats at 0.05 s: well inside the hung router's 5 s Register timeout
        wait_for(lambda: ra.count() >= 20, 4, "heartbeats to the live router while the other hangs")
        assert links.registered()[aa] is True
    finally:
        links.stop(deregister=False)
        sa.stop(0)
        hung.close()


def test_router_restarted_on_its_port_gets_the_registration_again() -> None:
    ra, rb = FakeRegistry("a"), FakeRegistry("b")
    (sa, aa), (sb, ab) = _serve(ra), _serve(rb)
    links = RouterLinks(_state(), (aa, ab))  # type: ignore[arg-type]
    links.start()
    try:
        wait_for(lambda: "d0" in ra.known and "d0" in rb.known, 10, "registered with both")
        sa.stop(0).wait()  # router a dies ...
        before = rb.count()
        wait_for(lambda: rb.count() >= before + 5, 10, "heartbeats to b go on while a is down")
        ra2 = FakeRegistry("a2")  # ... and comes back on its port with an empty registry
        sa, _ = _serve(ra2, int(aa.rsplit(":", 1)[1]))
        wait_for(lambda: "d0" in ra2.known, 10, "registration with the restarted router")
        wait_for(lambda: "tok-a2" in ra2.beats, 10, "heartbeats with the restarted router's new token")
        assert set(rb.beats) == {"tok-b"}
    finally:
        links.stop(deregister=True)
        sa.stop(0)
        sb.stop(0)
