"""Ray starts its head and raylets from the test process with ``Popen(preexec_fn=...)``, which
forks (a preexec_fn rules out vfork), and so runs every ``pthread_atfork`` handler. grpcio's fork
support, on by default in this build, runs gRPC's own post-fork handler in the child, and that
handler aborts (``ev_epoll1_linux.cc: Check failed: next_worker->state == KICKED``) in about one
fork in ten while a gRPC aio channel is live in another thread. A gcs_server or raylet killed so,
before its exec, writes no log, and Ray reports only "Timed out waiting for file
.../gcs_server_port_..." 30 s later: the CI flake of 2026-12-07. tests/conftest.py turns the fork
support off for every test process (pdserve never uses gRPC in a forked child: each child it starts
execs, and Python starts those with vfork, which runs no fork handlers). These tests pin the
mechanism, the setting, and that pdserve's own way of starting processes is not exposed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# a live aio channel in a thread, and forks with a preexec_fn (as Ray's start_ray_process) of
# /bin/true until FORKS have run or one child died before its exec (killed by a signal)
_STRESS = r"""
import asyncio, json, subprocess, sys, threading, time
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

def traffic():
    async def main():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                await asyncio.gather(*[stub.Check(health_pb2.HealthCheckRequest()) for _ in range(8)])
                await asyncio.sleep(0.02)
    asyncio.run(main())

threading.Thread(target=traffic, daemon=True).start()
time.sleep(0.5)

def pre():
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

forks, died = int(sys.argv[1]), 0
# without a preexec_fn (how pdserve starts every child) Python spawns with vfork: no fork handlers
extra = {"preexec_fn": pre} if sys.argv[2] == "preexec" else {}
for i in range(forks):
    p = subprocess.Popen(["true"], stderr=subprocess.DEVNULL, **extra)
    if p.wait(timeout=30) < 0:
        died = 1
        break
print(json.dumps({"forks": i + 1, "died": died}), flush=True)
"""


def _stress(forks: int, fork_support: str, preexec: bool = True) -> dict:
    env = {**os.environ, "GRPC_ENABLE_FORK_SUPPORT": fork_support}
    r = subprocess.run(
        [sys.executable, "-c", _STRESS, str(forks), "preexec" if preexec else "plain"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # the interpreter may abort at exit with the daemon aio thread still running: only the line counts
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert line, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return json.loads(line[-1])


def test_the_test_processes_run_with_grpc_fork_support_off():
    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "false"


def test_no_forked_child_dies_before_its_exec_with_fork_support_off():
    assert _stress(400, os.environ["GRPC_ENABLE_FORK_SUPPORT"]) == {"forks": 400, "died": 0}


def test_with_fork_support_on_a_forked_child_dies_before_its_exec():
    """The control: without the setting, the same forks lose a child (typically within the first
    few dozen; 1500 bounds the run at ~30 s on the 2-core CI machine)."""
    got = _stress(1500, "true")
    assert got["died"] == 1, got


def test_without_a_preexec_fn_no_child_dies_even_with_fork_support_on():
    """pdserve's launcher and Redis start their children with plain Popen: vfork, no fork
    handlers, safe whatever the setting."""
    assert _stress(400, "true", preexec=False) == {"forks": 400, "died": 0}
