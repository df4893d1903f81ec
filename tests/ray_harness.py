"""A 2-raylet Ray cluster on 127.0.0.1 with token auth on, for the Ray integration tests, and the
``pdserve`` CLI run as its own driver process against it."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def ray_env(token: str) -> dict[str, str]:
    """The environment of a driver holding the cluster's ``token``."""
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # keep Ray's driver-side address resolution on loopback (the raylets bind 127.0.0.1 only)
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        # the machine is shared with other test runs: Ray's OOM killer must not pick our actors
        RAY_memory_monitor_refresh_ms="0",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m pdserve.cli ARGS`` as its own process (a separate Ray driver)."""
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


START_ATTEMPTS = 3
# what Ray raises when a starting process misses its fixed start-up window: a raylet's 30 s to
# register with the GCS (``ray._private.node``), or the GCS's 30 s to publish its port file
START_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


def _describe(p: psutil.Process) -> str:
    """``pid name status wchan``: enough to tell a process stuck before its exec from one that ran."""
    try:
        wchan = Path(f"/proc/{p.pid}/wchan").read_text()
    except OSError:
        wchan = "?"
    try:
        return f"{p.pid} {p.name()} {p.status()} wchan={wchan}"
    except psutil.Error as e:
        return f"{p.pid} ({type(e).__name__})"


def _kill_new_children(me: psutil.Process, before: set[int]) -> list[str]:
    """SIGKILL every descendant of ``me`` not in ``before``: the processes a failed start left
    behind (a Node that raised in its constructor is never shut down). Returns their descriptions."""
    left = [p for p in me.children(recursive=True) if p.pid not in before]
    seen = [_describe(p) for p in left]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    return seen


def _start_cluster(cluster_cls: Any, node: dict[str, Any]) -> Any:
    """A head and a second raylet. Ray gives a starting raylet a fixed 30 s to register with the
    GCS, and the GCS 30 s to write its port file; a busy 2-core CI machine has missed each of these
    windows now and then (right after another module's cluster shut down, and twice with the GCS
    having written no log at all). Such a start is torn down, every process it left is killed, a
    line on the real stderr names them, and the start is tried again, up to :data:`START_ATTEMPTS`
    times. Any other error is raised at once."""
    me = psutil.Process()
    for attempt in range(1, START_ATTEMPTS + 1):
        before = {p.pid for p in me.children(recursive=True)}
        c = None
        try:
            c = cluster_cls(initialize_head=True, head_node_args={**node, "include_dashboard": False})
            c.add_node(**node)
            return c
        except Exception as e:
            if c is not None:
                c.shutdown()
            left = _kill_new_children(me, before)
            if not any(t in str(e) for t in START_TIMEOUTS) or attempt == START_ATTEMPTS:
                raise
            # printed past pytest's capture (a warning would fail the run: filterwarnings = error),
            # so the CI log records each retry and what the failed start left
            print(
                f"\nray_harness: Ray start attempt {attempt}/{START_ATTEMPTS} timed out ({e}); "
                f"killed what it left: {left or 'nothing'}; trying again",
                file=sys.__stderr__,
                flush=True,
            )
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def two_node_cluster(namespace: str, cpus_per_node: int = 2) -> Iterator[tuple[Any, dict[str, str]]]:
    """Two raylets on 127.0.0.1 with token auth; this process joins as a driver in ``namespace``.
    Yields ``(cluster, env)``: ``env`` is what another driver process needs to join."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray._private.authentication_test_utils import reset_auth_token_state
    from ray.cluster_utils import Cluster

    env = ray_env(secrets.token_hex(16))
    with pytest.MonkeyPatch.context() as mp:
        for k in (
            "RAY_AUTH_MODE",
            "RAY_AUTH_TOKEN",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
            "RAY_memory_monitor_refresh_ms",
            "OMP_NUM_THREADS",
        ):
            mp.setenv(k, env[k])
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        reset_auth_token_state()  # this process imported ray before token mode was set: re-read it
        node = dict(num_cpus=cpus_per_node, node_ip_address="127.0.0.1", object_store_memory=200 * MB)
        c = _start_cluster(Cluster, node)
        try:
            ray.init(address=c.address, namespace=namespace, log_to_driver=False)
            yield c, env
        finally:
            ray.shutdown()
            c.shutdown()
    reset_auth_token_state()


@contextlib.contextmanager
def only_decode(namespace: str, worker_id: str) -> Iterator[None]:
    """Route decodes to ``worker_id`` alone while inside: every router of ``namespace``
    (pdserve-router, pdserve-router-1, ...: a client round-robins over them) marks the other decode
    workers draining, and routes to them again on exit."""
    import ray

    routers = []
    for i in range(16):
        try:
            routers.append(ray.get_actor("pdserve-router" + (f"-{i}" if i else ""), namespace=namespace))
        except ValueError:
            break
    assert routers, f"no router actor in namespace {namespace!r}"
    routed = ray.get(routers[0].workers.remote(), timeout=30)
    others = [w["worker_id"] for w in routed if w["role"] == "decode" and w["worker_id"] != worker_id]
    for router in routers:
        for o in others:
            assert ray.get(router.drain.remote(o), timeout=30)
    try:
        yield
    finally:
        for router in routers:
            for o in others:
                ray.get(router.resume.remote(o), timeout=30)
