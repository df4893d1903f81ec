"""Start-up benchmark: ``pdserve up`` on Ray to first token vs the process launcher, same run.

Both bring up one KV store, the router, 1 prefill and 1 decode worker (SmolLM2-135M on CPU) and
then stream one greedy request; the time is from the start command to that request's first token:

* baseline  ``pdserve.launcher.launch`` (``pdserve serve``): four subprocesses on 127.0.0.1.
* ray       ``pdserve up --config ...`` run as its own driver process against an already running
            Ray cluster (one raylet on 127.0.0.1, token auth on), then the same request.
            The Ray cluster's own boot time is printed separately (not part of the ratio).

Prints seconds for each and ``ratio = ray / baseline`` (lower is better; no target: Ray adds
actor scheduling and a driver connection on top of the same process start-ups).

Usage: python bench/ray_startup.py [--model PATH] [--reps 1]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from pdserve.client import Client  # noqa: E402
from pdserve.launcher import ClusterSpec, launch  # noqa: E402
from pdserve.model_setup import resolve_model_path  # noqa: E402

PROMPT = "The capital of France is"
NS = "pdserve-bench"


def first_token_s(address: str, t0: float) -> float:
    with Client(address, timeout=300) as c:
        for _ in c.generate(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True):
            return time.monotonic() - t0
    raise RuntimeError("no token came back")


def bench_launcher(model: Path) -> float:
    t0 = time.monotonic()
    cl = launch(ClusterSpec(model_path=str(model), worker_kv_blocks=256, store_capacity_blocks=512))
    try:
        return first_token_s(cl.router_address, t0)
    finally:
        cl.stop()


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep the driver's address on loopback
        RAY_memory_monitor_refresh_ms="0",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


def bench_ray(model: Path, cfg_path: Path, address: str, env: dict[str, str]) -> float:
    t0 = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pdserve.cli",
            "up",
            "--config",
            str(cfg_path),
            "--address",
            address,
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    if r.returncode != 0:
        raise RuntimeError(f"pdserve up failed:\n{r.stderr[-3000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    try:
        return first_token_s(info["router"], t0)
    finally:
        d = subprocess.run(
            [sys.executable, "-m", "pdserve.cli", "down", "--address", address, "--namespace", NS],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        if d.returncode != 0:
            print(f"pdserve down failed:\n{d.stderr[-2000:]}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """This benchmark's command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--reps", type=int, default=1, help="start-ups measured per way")
    return cli_help.apply(ap)


def main() -> int:
    ap = build_parser()
    a = ap.parse_args()
    model = resolve_model_path(a.model)

    base = [bench_launcher(model) for _ in range(a.reps)]

    env = ray_env()
    os.environ.update(
        {
            k: env[k]
            for k in (
                "RAY_AUTH_MODE",
                "RAY_AUTH_TOKEN",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                "RAY_memory_monitor_refresh_ms",
            )
        }
    )
    from ray.cluster_utils import Cluster

    t_boot = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(
            num_cpus=2, node_ip_address="127.0.0.1", include_dashboard=False, object_store_memory=200 << 20
        ),
    )
    boot_s = time.monotonic() - t_boot
    cfg = {
        "model": str(model),
        "host": "127.0.0.1",
        "security": {"tls": "off"},  # plaintext on loopback: asked for explicitly
        "namespace": NS,
        "prefill": {"count": 1, "num_cpus": 1, "kv_blocks": 256},
        "decode": {"count": 1, "num_cpus": 1, "kv_blocks": 256},
        "store": {"capacity_blocks": 512},
    }
    try:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "cluster.yaml"
            p.write_text(yaml.safe_dump(cfg))
            ray_s = [bench_ray(model, p, cluster.address, env) for _ in range(a.reps)]
    finally:
        cluster.shutdown()

    b, r = statistics.median(base), statistics.median(ray_s)
    print(f"ray cluster boot (1 raylet, not in the ratio): {boot_s:.2f} s")
    print(f"baseline  launcher (processes) start -> first token: {b:.2f} s")
    print(f"ray       pdserve up           start -> first token: {r:.2f} s")
    print(f"ratio ray / baseline: {r / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
