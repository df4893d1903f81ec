"""Start the embedded default cluster as processes on 127.0.0.1: store, router, prefill, decode.

``launch(model_path)`` returns a :class:`LocalCluster` once every process is serving (each prints
a JSON line with its address and its Prometheus /metrics address) and every worker has registered
with the router. ``stop()`` ends them all (SIGTERM, then SIGKILL after a grace period).
``write_file_sd(path)`` writes a Prometheus file_sd target list of their /metrics endpoints.

``ClusterSpec.index_url``: where the store node registers its blocks. ``"memory"`` (default) is
the store's private in-process index; a ``redis://host:port/db[?prefix=p]`` URL runs the cluster
over a Redis index (:mod:`kv_store.redis_index`) that routers and other tools can open with the
same URL (:func:`kv_store.redis_index.make_index`) for a global Lookup; the launched router gets
it (``--index URL``) and finds cached prefixes there itself. ``store_args`` are extra
``python -m kv_store`` options (e.g. ``--index-sync-interval-s 0.2``, ``--high-water 0.9``).
``num_stores`` > 1 (Redis index only) starts store nodes kv0..kvN-1; workers use kv0, which with
``replication_factor`` > 1 copies new blocks to the others in the background (best effort).

``ClusterSpec.kv_transport``: how KV moves from prefill to decode. ``store`` (default): through
the store node. ``dist``: directly, over one torch.distributed process group that every worker
joins (``dist_backend`` gloo | nccl; a free loopback port is allocated for its TCP store;
prefill-i is rank i, decode-i rank ``num_prefill + i``; see :mod:`pdserve.worker_main`).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from engine.models.config import ModelConfig
from pdserve.errors import UnavailableError
from pdserve.kv_transfer import DistBackend, KVTransport

ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (another process may still take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ClusterSpec:
    model_path: str
    num_prefill: int = 1
    num_decode: int = 1
    store_capacity_blocks: int = 4096
    worker_kv_blocks: int = 2048
    block_size: int = 16
    router_port: int = 0
    worker_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()  # extra ``python -m router`` flags, e.g. ("--policy", "goodput")
    startup_timeout_s: float = 180.0
    index_url: str = "memory"  # the store's KV index: "memory" | "redis://host:port/db[?prefix=p]"
    store_args: tuple[str, ...] = ()
    num_stores: int = 1  # store nodes kv0..kvN-1; workers put to and pull through kv0
    replication_factor: int = 1  # copies per block across the store nodes (needs a shared index)
    kv_transport: KVTransport = KVTransport.STORE  # "store" | "dist" (strings are accepted)
    dist_backend: DistBackend = DistBackend.GLOO  # kv_transport "dist": "gloo" (CPU) | "nccl" (GPU)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kv_transport", KVTransport(self.kv_transport))
            object.__setattr__(self, "dist_backend", DistBackend(self.dist_backend))
        except ValueError as e:
            raise ValueError(
                f"{e}: kv_transport is one of {[t.value for t in KVTransport]}, "
                f"dist_backend one of {[b.value for b in DistBackend]}"
            ) from None
        if self.num_stores < 1:
            raise ValueError(f"num_stores must be >= 1, got {self.num_stores}")
        if self.num_stores > 1 and self.index_url == "memory":
            raise ValueError("several store nodes need a shared index: set index_url to a redis:// URL")


@dataclass
class LocalCluster:
    spec: ClusterSpec
    router_address: str = ""
    store_address: str = ""  # kv0: the node the workers use
    store_node_id: str = ""
    store_addresses: dict[str, str] = field(default_factory=dict)  # node id -> address, every store
    workers: dict[str, str] = field(default_factory=dict)  # worker_id -> address
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # process name -> /metrics host:port

    def write_file_sd(self, path: str | Path) -> Path:
        """Write (atomically replace) a Prometheus ``file_sd_configs`` JSON file: one target group
        per process, labelled ``component`` (router | prefill | decode | kv_store) and ``process``
        (its name here: router, store, prefill-0, ...). Returns the path."""
        from pdserve.metrics import Component, ScrapeTarget, write_file_sd

        return write_file_sd(
            path,
            (
                ScrapeTarget(name, Component(_COMPONENT[name.split("-")[0]]), addr)
                for name, addr in self.metrics.items()
            ),
        )

    def stop(self, grace_s: float = 5.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def kill(self, name: str) -> None:
        p = self.procs[name]
        p.kill()
        p.wait()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_COMPONENT = {"store": "kv_store", "router": "router", "prefill": "prefill", "decode": "decode"}


def _ready_info(line: str) -> dict | None:
    """The ready line's JSON object (it has "address"); None for anything else, JSON logs included."""
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and "address" in obj and "msg" not in obj else None


def _spawn(cluster: LocalCluster, name: str, args: list[str], timeout_s: float) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    cluster.procs[name] = p
    lines: list[str] = []
    cluster.logs[name] = lines
    ready: dict = {}
    got = threading.Event()

    def pump() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line.rstrip())
            info = None if got.is_set() else _ready_info(line)
            if info is not None:
                ready.update(info)
                got.set()
        p.stdout.close()
        got.set()

    threading.Thread(target=pump, daemon=True, name=f"log-{name}").start()
    if not got.wait(timeout_s) or not ready:
        cluster.stop()
        tail = "\n".join(lines[-20:])
        raise UnavailableError(f"{name} did not start within {timeout_s}s:\n{tail}")
    if "metrics" in ready:
        cluster.metrics[name] = ready["metrics"]
    return ready


def router_index_args(index_url: str) -> list[str]:
    """The ``python -m router`` options that make it read the cluster's KV index: ``--index URL``
    for a shared index (any URL but ``"memory"``, e.g. ``redis://host:port/db?prefix=p``), none for
    ``"memory"`` (the store's private in-process index, which only a store Lookup can read)."""
    return [] if index_url == "memory" else ["--index", index_url]


def launch(spec: ClusterSpec) -> LocalCluster:
    from pdserve.v1 import router_pb2  # noqa: F401 - fail early if protos are missing

    cl = LocalCluster(spec)
    mc = ModelConfig.from_path(spec.model_path)
    model_id = Path(spec.model_path).name
    t = spec.startup_timeout_s
    for i in range(spec.num_stores):
        store = _spawn(
            cl,
            "store" if i == 0 else f"store-{i}",
            [
                "-m",
                "kv_store",
                "--node-id",
                f"kv{i}",
                "--capacity-blocks",
                str(spec.store_capacity_blocks),
                "--model-id",
                model_id,
                "--num-layers",
                str(mc.num_hidden_layers),
                "--num-kv-heads",
                str(mc.num_key_value_heads),
                "--head-dim",
                str(mc.head_dim),
                "--dtype",
                "float32",
                "--block-size",
                str(spec.block_size),
                "--index",
                spec.index_url,
                "--replication-factor",
                str(spec.replication_factor),
                *spec.store_args,
            ],
            t,
        )
        cl.store_addresses[store["node_id"]] = store["address"]
    cl.store_node_id, cl.store_address = next(iter(cl.store_addresses.items()))
    # direct handoff: KV handles name prefill workers, not the store; tell the router where the
    # store is for its prefix lookups (it would otherwise learn it from the handles)
    store_flag = ["--store", cl.store_address] if spec.kv_transport is KVTransport.DIST else []
    # a shared (redis) index: the router finds cached prefixes there itself, as the store nodes see
    # them; the "memory" index is private to the store process, so the router asks the store
    index_flag = router_index_args(spec.index_url)
    router = _spawn(
        cl,
        "router",
        [
            "-m",
            "router",
            "--model",
            spec.model_path,
            "--port",
            str(spec.router_port),
            *store_flag,
            *index_flag,
            *spec.router_args,
        ],
        t,
    )
    cl.router_address = router["address"]
    common = [
        "--model",
        spec.model_path,
        "--store",
        cl.store_address,
        "--router",
        cl.router_address,
        "--kv-blocks",
        str(spec.worker_kv_blocks),
        "--block-size",
        str(spec.block_size),
        *spec.worker_args,
    ]
    world = spec.num_prefill + spec.num_decode
    dist_init = f"tcp://127.0.0.1:{free_port()}" if spec.kv_transport is KVTransport.DIST else ""
    rank = 0  # prefill ranks 0..P-1, decode ranks P..P+D-1
    for role, n in (("prefill", spec.num_prefill), ("decode", spec.num_decode)):
        for i in range(n):
            wid = f"{role}-{i}"
            dist: list[str] = []
            if dist_init:
                dist = [
                    "--dist-init",
                    dist_init,
                    "--dist-rank",
                    str(rank),
                    "--dist-world",
                    str(world),
                    "--dist-backend",
                    spec.dist_backend.value,
                ]
            # the workers join the group in the background: spawning them one by one is fine
            info = _spawn(cl, wid, ["-m", f"{role}_worker", "--worker-id", wid, *common, *dist], t)
            cl.workers[wid] = info["address"]
            rank += 1
    wait_registered(cl, t)
    return cl


def wait_registered(cl: LocalCluster, timeout_s: float) -> None:
    """Block until the router can place a request (one prefill and one decode registered)."""
    import grpc

    from pdserve.v1 import client_pb2, client_pb2_grpc, common_pb2

    ch = grpc.insecure_channel(cl.router_address)
    stub = client_pb2_grpc.GenerateStub(ch)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                list(
                    stub.Generate(
                        client_pb2.GenerateRequest(
                            prompt_token_ids=client_pb2.TokenIds(ids=[1, 2]),
                            sampling=common_pb2.SamplingParams(
                                max_tokens=2, temperature=0.0, ignore_eos=True
                            ),
                        ),
                        timeout=30,
                    )
                )
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.2)
        raise UnavailableError("workers did not register with the router in time")
    finally:
        ch.close()
