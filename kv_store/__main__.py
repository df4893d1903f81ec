"""Run one store node as its own process.

    python -m kv_store --node-id kv0 --capacity-blocks 4096 --model-id smollm2-135m \
        --num-layers 30 --num-kv-heads 3 --head-dim 64 --dtype float32 --block-size 16 --port 0 \
        [--index memory | --index redis://127.0.0.1:6379/0?prefix=pdserve:kv:]

``--disk-tier PATH --disk-tier-gib N``: a local-disk tier behind the DRAM arena
(:mod:`kv_store.disk_tier`): evicted blocks go to append-only segment files in PATH (created if
missing), at most N GiB; a restarted node re-registers the blocks found there. Both flags go
together; a bad value is refused naming the flag.

``--index``: where the node registers its blocks (``memory``: a private in-process index, the
embedded default; a ``redis://`` URL: the cluster index shared with other store nodes and
routers, see :mod:`kv_store.redis_index`; the node re-registers its blocks when Redis lost them).

Prints one JSON line ``{"node_id", "address", "port", "shm_name", "host_id", "metrics"}`` on stdout
once it accepts calls (``metrics``: host:port of its Prometheus /metrics, ``--metrics-port``, 0 =
any free port), then serves until SIGTERM/SIGINT (it then unlinks its shared memory). Logs are JSON
lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from prometheus_client import REGISTRY

from kv_store.disk_metrics import register_disk_metrics
from kv_store.disk_tier import GIB, DiskTierConfig, DiskTierOpenError, DiskTierSizeError
from kv_store.layout import KVLayout
from kv_store.redis_index import make_index
from kv_store.segment import ForeignSegmentError
from kv_store.service import StoreServer, run_store_node
from kv_store.store import StoreConfig
from pdserve import cli_help
from pdserve.arg_types import fraction, port_number, positive_int, positive_seconds
from pdserve.errors import InvalidRequestError
from pdserve.gc_tuning import settle_heap
from pdserve.metrics import StoreMetrics, serve_metrics
from pdserve.security import add_process_security_args, install_process_security
from pdserve.tracing import configure_logging


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m kv_store`` command line."""
    ap = argparse.ArgumentParser(prog="python -m kv_store", description="pdserve KV store node")
    ap.add_argument("--node-id", required=True, help="this node's id (unique in the cluster)")
    ap.add_argument(
        "--capacity-blocks", type=positive_int, required=True, help="KV blocks the node holds at most"
    )
    ap.add_argument("--model-id", required=True, help="model whose KV blocks the node stores")
    ap.add_argument(
        "--num-layers", type=positive_int, required=True, help="the model's layer count (KV layout)"
    )
    ap.add_argument(
        "--num-kv-heads", type=positive_int, required=True, help="the model's KV heads (KV layout)"
    )
    ap.add_argument(
        "--head-dim", type=positive_int, required=True, help="the model's head dimension (KV layout)"
    )
    ap.add_argument("--dtype", default="float32", help="KV dtype (KV layout)")
    ap.add_argument("--block-size", type=positive_int, default=16, help="tokens per KV block (KV layout)")
    ap.add_argument("--host", default="127.0.0.1", help="gRPC listen address")
    ap.add_argument("--port", type=port_number, default=0, help="gRPC listen port (0: any free port)")
    ap.add_argument("--no-shm", action="store_true", help="private memory: no same-host zero-copy reads")
    ap.add_argument(
        "--no-prefault", action="store_true", help="do not touch every page of the arena at start-up"
    )
    ap.add_argument(
        "--default-lease-ttl-s",
        type=positive_seconds,
        default=30.0,
        help="lease time of pinned blocks whose reader asked for none",
    )
    ap.add_argument(
        "--max-lease-ttl-s",
        type=positive_seconds,
        default=60.0,
        help="longest a lease may pin blocks; longer asks are clamped to it (and say so)",
    )
    ap.add_argument(
        "--max-leased-blocks-per-owner",
        type=positive_int,
        default=None,
        help="leased blocks one owner other than a tenant (a client identity) may hold at once "
        "(default: half the capacity)",
    )
    ap.add_argument(
        "--max-leased-blocks-per-tenant",
        type=positive_int,
        default=None,
        help="leased blocks one tenant's requests may hold at once (handoff leases, charged to the "
        "tenant of the router's API key); more is RESOURCE_EXHAUSTED for that tenant only "
        "(default: the --max-leased-blocks-per-owner value)",
    )
    ap.add_argument("--max-workers", type=positive_int, default=8, help="gRPC server threads")
    ap.add_argument(
        "--metrics-port", type=port_number, default=0, help="Prometheus /metrics port (0: any free)"
    )
    ap.add_argument("--index", default="memory", help="'memory' or redis://host:port/db[?prefix=p]")
    ap.add_argument("--high-water", type=fraction, default=1.0, help="evict above this fraction of capacity")
    ap.add_argument("--low-water", type=fraction, default=1.0, help="... down to this fraction")
    ap.add_argument(
        "--index-sync-interval-s", type=positive_seconds, default=1.0, help="re-registration probe period"
    )
    ap.add_argument(
        "--replication-factor",
        type=positive_int,
        default=1,
        help="copies per block across store nodes (best effort)",
    )
    ap.add_argument(
        "--disk-tier",
        metavar="PATH",
        default=None,
        help="directory of a local-disk tier for blocks evicted from DRAM (append-only segment "
        "files; survives restarts); needs --disk-tier-gib",
    )
    ap.add_argument(
        "--disk-tier-gib",
        type=float,
        default=None,
        metavar="N",
        help="size budget of --disk-tier in GiB (> 0)",
    )
    ap.add_argument(
        "--disk-tier-segment-mib",
        type=float,
        default=0.0,
        metavar="N",
        help="segment file size in MiB (0: min(256, budget / 2)); at most half the budget",
    )
    add_process_security_args(ap, redis=True)
    return cli_help.apply(ap)


def disk_tier_config(path: str | None, gib: float | None, segment_mib: float = 0.0) -> DiskTierConfig | None:
    """The disk tier of ``--disk-tier PATH --disk-tier-gib N`` (None without both); ValueError
    naming the flag on a bad value."""
    if path is None and gib is None:
        if segment_mib:
            raise ValueError("--disk-tier-segment-mib needs --disk-tier PATH and --disk-tier-gib N")
        return None
    if path is None:
        raise ValueError("--disk-tier-gib needs --disk-tier PATH (the directory of the disk tier)")
    if gib is None:
        raise ValueError("--disk-tier needs --disk-tier-gib N (the tier's size budget in GiB)")
    if not path.strip():
        raise ValueError("--disk-tier: the path is empty")
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"--disk-tier-gib must be a number > 0, got {gib}")
    if not (math.isfinite(segment_mib) and segment_mib >= 0):
        raise ValueError(f"--disk-tier-segment-mib must be a number >= 0, got {segment_mib}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--disk-tier {path}: exists and is not a directory")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == probe:
            break
        probe = parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--disk-tier {path}: {probe} is not writable by this process")
    if segment_mib * (1 << 20) > gib * GIB / 2:
        raise ValueError(
            f"--disk-tier-segment-mib {segment_mib:g} must be at most half of --disk-tier-gib {gib:g} "
            "(whole segments are evicted, the one being written never)"
        )
    return DiskTierConfig(path, int(gib * GIB), segment_bytes=int(segment_mib * (1 << 20)))


def parse_config(argv: list[str] | None = None) -> StoreConfig:
    """The node's StoreConfig from ``argv`` (exits with usage on a bad flag)."""
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        disk = disk_tier_config(a.disk_tier, a.disk_tier_gib, a.disk_tier_segment_mib)
    except ValueError as e:
        ap.error(str(e))
    if a.index == "memory":  # a private index: no other node to copy to, nothing to lose state
        if a.replication_factor > 1:
            ap.error(
                f"--replication-factor {a.replication_factor} finds the other store nodes through a "
                "shared index: it needs --index redis://... (the memory index knows this node only)"
            )
        if a.index_sync_interval_s != ap.get_default("index_sync_interval_s"):
            ap.error(
                "--index-sync-interval-s probes a Redis index for lost state: it needs --index redis://..."
            )
    try:
        return _store_config(a, disk)
    except (ValueError, InvalidRequestError) as e:  # a dtype, a lease TTL cap below the default ...
        ap.error(str(e))


def _store_config(a: argparse.Namespace, disk: DiskTierConfig | None) -> StoreConfig:
    layout = KVLayout(a.model_id, a.num_layers, a.num_kv_heads, a.head_dim, a.dtype, a.block_size)
    return StoreConfig(
        node_id=a.node_id,
        layout=layout,
        capacity_blocks=a.capacity_blocks,
        host=a.host,
        port=a.port,
        use_shm=not a.no_shm,
        prefault=not a.no_prefault,
        default_lease_ttl_s=a.default_lease_ttl_s,
        max_lease_ttl_s=a.max_lease_ttl_s,
        max_leased_blocks_per_owner=a.max_leased_blocks_per_owner,
        max_leased_blocks_per_tenant=a.max_leased_blocks_per_tenant,
        max_workers=a.max_workers,
        high_water=a.high_water,
        low_water=a.low_water,
        index_sync_interval_s=a.index_sync_interval_s,
        replication_factor=a.replication_factor,
        disk_tier=disk,
    )


def _extra_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--metrics-port", type=port_number, default=0)
    ap.add_argument("--index", default="memory")
    return ap.parse_known_args(argv)[0]


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    extra = _extra_args(argv)
    sp = argparse.ArgumentParser(prog="python -m kv_store", add_help=False)
    add_process_security_args(sp, redis=True)
    install_process_security(
        sp, sp.parse_known_args(argv)[0], config.host, ("pdserve.v1.KVStore",), redis=True
    )
    configure_logging(config.node_id)
    try:
        index = make_index(extra.index)  # a bad spec, or a Redis pdserve must not use (redis_access)
    except InvalidRequestError as e:
        sp.error(f"--index: {e}")
    metrics = StoreMetrics(REGISTRY, config.node_id)
    metrics_port = serve_metrics(extra.metrics_port)

    def ready(srv: StoreServer) -> None:
        if srv.store.disk is not None:
            register_disk_metrics(REGISTRY, config.node_id, srv.store.stats)
        loc = srv.store.location
        info = {"node_id": loc.node_id, "address": loc.address, "port": srv.port}
        info |= {"shm_name": loc.shm_name, "host_id": loc.host_id, "metrics": f"127.0.0.1:{metrics_port}"}
        print(json.dumps(info), flush=True)
        settle_heap()  # start-up is over: full collections walk only what is made from now on (#12)

    try:
        run_store_node(config, index, on_ready=ready, metrics=metrics)
    except (ForeignSegmentError, DiskTierOpenError, DiskTierSizeError) as e:
        sp.error(f"--disk-tier: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
