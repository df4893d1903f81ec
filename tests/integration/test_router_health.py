"""A router process started alone reports NOT_SERVING (grpc.health.v1, overall and Generate) and
its OpenAI front end's /health answers 503, until a prefill and a decode worker register; a worker
that leaves (deregisters or goes silent) turns it back. Workers register through the router's
Registry RPC as real ones do (no worker processes: the router's health is about its registry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.errors import UnavailableError
from pdserve.openai_api.server import OpenAIServer, ServerConfig
from pdserve.v1 import client_pb2, client_pb2_grpc, router_pb2, router_pb2_grpc, worker_pb2

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEARTBEAT_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def router(smollm_path):
    """``python -m router`` alone; yields its address and the model id it serves."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router",
            "--model",
            str(smollm_path),
            "--heartbeat-timeout-s",
            str(HEARTBEAT_TIMEOUT_S),
            "--verify-workers",
            "off",  # this test registers fake workers (nothing serves their Stats)
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )
    ready: dict = {}

    def read() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("{") and "address" in line:
                ready.update(json.loads(line))
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(60)
    try:
        if not ready:
            raise UnavailableError("the router did not start within 60 s")
        yield ready["address"], Path(smollm_path).name
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        t.join(5)
        if p.stdout is not None:
            p.stdout.close()


@pytest.fixture(scope="module")
def channel(router):
    with grpc.insecure_channel(router[0]) as ch:
        yield ch


def _status(ch: grpc.Channel, service: str) -> int:
    return (
        health_pb2_grpc.HealthStub(ch)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        .status
    )


def _wait_status(ch: grpc.Channel, want: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while _status(ch, "pdserve.v1.Generate") != want:
        assert time.monotonic() < deadline, f"health did not become {want} within {within_s}s"
        time.sleep(0.05)
    assert _status(ch, "") == want


def _register(ch: grpc.Channel, worker_id: str, role: int, model: str) -> None:
    router_pb2_grpc.RegistryStub(ch).Register(
        router_pb2.RegisterRequest(worker_id=worker_id, role=role, address="127.0.0.1:1", model=model),
        timeout=10,
    )


def _deregister(ch: grpc.Channel, worker_id: str) -> None:
    router_pb2_grpc.RegistryStub(ch).Deregister(router_pb2.DeregisterRequest(worker_id=worker_id), timeout=10)


def _http_health(srv: OpenAIServer) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(srv.url + "/health", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_not_serving_until_workers_register(router, channel):
    address, model = router
    with OpenAIServer(ServerConfig(router=address, port=0)).start() as srv:
        # alone: NOT_SERVING, consistent with Generate failing UNAVAILABLE; the Registry serves
        assert _status(channel, "") == NOT_SERVING
        assert _status(channel, "pdserve.v1.Generate") == NOT_SERVING
        assert _status(channel, "pdserve.v1.Registry") == SERVING
        with pytest.raises(grpc.RpcError) as ei:
            list(
                client_pb2_grpc.GenerateStub(channel).Generate(
                    client_pb2.GenerateRequest(prompt="hi"), timeout=10
                )
            )
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        status, body = _http_health(srv)
        assert status == 503 and body["error"]["code"] == "unavailable"
        assert "NOT_SERVING" in body["error"]["message"]

        _register(channel, "p0", worker_pb2.WORKER_ROLE_PREFILL, model)
        _register(channel, "x0", worker_pb2.WORKER_ROLE_DECODE, "another-model")  # does not count
        assert _status(channel, "") == NOT_SERVING
        _register(channel, "d0", worker_pb2.WORKER_ROLE_DECODE, model)
        _wait_status(channel, SERVING, within_s=1.0)  # set by the registration itself
        assert _http_health(srv) == (200, {"status": "ok", "router": address})

        _deregister(channel, "d0")
        _wait_status(channel, NOT_SERVING, within_s=1.0)
        assert _http_health(srv)[0] == 503


def test_silent_worker_expires_to_not_serving(router, channel):
    _, model = router
    _register(channel, "p1", worker_pb2.WORKER_ROLE_PREFILL, model)
    _register(channel, "d1", worker_pb2.WORKER_ROLE_DECODE, model)
    _wait_status(channel, SERVING, within_s=1.0)
    # no heartbeats: both expire after the timeout, noticed by the router's sweep without a request
    _wait_status(channel, NOT_SERVING, within_s=HEARTBEAT_TIMEOUT_S + 3.0)
