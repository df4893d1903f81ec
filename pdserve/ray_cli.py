"""``pdserve up | down | status | scale``: run pdserve on a Ray cluster (see :mod:`pdserve.ray_cluster`).

Every command joins the Ray cluster at ``--address`` (default ``auto``: the cluster started on this
machine with ``ray start``; or ``HOST:6379``). With Ray token auth on (the default for clusters
started by Ray 2.60), the driver needs the cluster's token: ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (see deploy/ray/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pdserve.arg_types import non_negative_int
from pdserve.errors import InvalidRequestError
from pdserve.ray_cluster import DEFAULT_NAMESPACE


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto", help="Ray cluster address (auto: the local one)")
    p.add_argument(
        "--namespace", default=None, help=f"Ray namespace (default: the config's, or {DEFAULT_NAMESPACE})"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _ns(a: argparse.Namespace, default: str = DEFAULT_NAMESPACE) -> str:
    return a.namespace or default


def _cmd_up(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from pdserve import cluster_config, ray_cluster

    cfg = cluster_config.load(a.config)
    if a.namespace:
        cfg = replace(cfg, namespace=a.namespace)
    if a.prefill is not None or a.decode is not None:
        if cfg.several:
            raise InvalidRequestError(
                f"--prefill / --decode set one model's pools; this config serves several "
                f"({', '.join(cfg.model_ids)}): set the counts in its models entries"
            )
        cfg = cluster_config.validate(cfg.with_counts(a.prefill, a.decode))
    ray_cluster.connect(a.address, cfg.namespace)
    t0 = time.monotonic()
    info = ray_cluster.up(cfg)
    if a.file_sd:
        _write_file_sd(a.file_sd, ray_cluster.status(cfg.namespace))
    if a.json:
        print(json.dumps({**info, "startup_s": round(time.monotonic() - t0, 3)}))
    else:
        routers = ",".join(info.get("routers") or [info["router"]])
        print(f"pdserve: up in {time.monotonic() - t0:.1f} s; router(s) {routers}")
        for wid, addr in info["workers"].items():
            print(f"  {wid:<12} {addr}")
        for node, addr in info["stores"].items():
            print(f"  store@{node[:8]} {addr}")
    return 0


def _cmd_down(a: argparse.Namespace) -> int:
    from pdserve import ray_cluster

    ns = _ns(a)
    ray_cluster.connect(a.address, ns)
    out = ray_cluster.down(ns)
    print(json.dumps(out) if a.json else f"pdserve: stopped {out}")
    return 0


def format_status(st: dict[str, Any]) -> str:
    """A table of the pools, the store nodes and what the router routes to."""
    routed = {w["worker_id"]: w for w in st["routed"]}
    lines = [f"router {st['router']}"]
    for r in st.get("routers", [])[1:]:  # more routers (``routers`` in the config)
        lines.append(f"router {r['address']} ({r['name']}{'' if r.get('alive') else ', not answering'})")
    for role, rows in st["pools"].items():
        lines.append(f"{role} pool: {len(rows)} worker(s)")
        for r in rows:
            if not r.get("alive"):
                lines.append(f"  {r['worker_id']:<12} DEAD ({r.get('error', '')})")
                continue
            rt = routed.get(r["worker_id"])
            state = "routed" if rt and not rt["draining"] else ("draining" if rt else "not routed")
            kt = r.get("kv_transfer") or {}
            direct = ""
            if kt.get("rank", -1) >= 0:
                formed = "ready" if kt["ready"] else ("FAILED" if kt["failed"] else "forming")
                direct = f" dist rank {kt['rank']}/{kt['world_size']} {formed}"
            if r.get("tp", 1) > 1:
                direct += f" tp {r['tp']}"
            lines.append(
                f"  {r['worker_id']:<12} {r['address']:<22} node {r['node_id'][:8]} running {r['num_running']:>3} "
                f"waiting {r['num_waiting']:>3} kv {r['kv_blocks_used']}/{r['kv_blocks_total']} {state}{direct}"
            )
    lines.append(f"kv store nodes: {len(st['stores'])}")
    for s in st["stores"]:
        if not s.get("alive"):
            lines.append(f"  node {s['node_id'][:8]} DEAD")
            continue
        model = f" model {s['model']}" if s.get("several") else ""
        lines.append(
            f"  node {s['node_id'][:8]}{model} {s['address']:<22} kv {s['num_blocks']}/{s['capacity_blocks']} "
            f"({100 * s['kv_usage']:.0f}%) leases {s['num_leases']} out grpc {s['blocks_out_grpc']} "
            f"shm {s['blocks_out_shm']}"
        )
    return "\n".join(lines)


def scrape_targets(st: dict[str, Any]) -> list:
    """Prometheus scrape targets (:class:`pdserve.metrics.ScrapeTarget`) of every live process in a
    :func:`pdserve.ray_cluster.status` result: the router, each worker, each store node."""
    from pdserve.metrics import Component, ScrapeTarget

    out = []
    if st.get("router_metrics"):
        out.append(ScrapeTarget("router", Component.ROUTER, st["router_metrics"]))
    for i, r in enumerate(st.get("routers", [])[1:], 1):  # more routers (``routers`` in the config)
        if r.get("alive") and r.get("metrics"):
            out.append(ScrapeTarget(f"router-{i}", Component.ROUTER, r["metrics"]))
    for role, rows in st["pools"].items():
        for w in rows:
            if w.get("alive") and w.get("metrics"):
                out.append(ScrapeTarget(w["worker_id"], Component(role), w["metrics"]))
    for i, s in enumerate(st["stores"]):
        if s.get("alive") and s.get("metrics"):
            out.append(ScrapeTarget(f"store-{s.get('store_node') or i}", Component.KV_STORE, s["metrics"]))
    return out


def _write_file_sd(path: str, st: dict[str, Any]) -> None:
    from pdserve.metrics import write_file_sd

    targets = scrape_targets(st)
    write_file_sd(path, targets)
    print(f"pdserve: wrote {len(targets)} Prometheus scrape targets to {path}", file=sys.stderr)


def _cmd_status(a: argparse.Namespace) -> int:
    from pdserve import ray_cluster

    ns = _ns(a)
    ray_cluster.connect(a.address, ns)
    st = ray_cluster.status(ns)
    print(json.dumps(st, indent=2) if a.json else format_status(st))
    if a.file_sd:
        _write_file_sd(a.file_sd, st)
    return 0


def _cmd_scale(a: argparse.Namespace) -> int:
    from pdserve import ray_cluster

    if a.prefill is None and a.decode is None:
        print("pdserve scale: give --prefill N and/or --decode M", file=sys.stderr)
        return 2
    ns = _ns(a)
    ray_cluster.connect(a.address, ns)
    out = ray_cluster.scale(a.prefill, a.decode, ns, model=a.model)
    print(
        json.dumps(out)
        if a.json
        else f"pdserve: {out['model']} {out['counts']} (added {out['added']}, removed "
        f"{[r['worker_id'] for r in out['removed']]})"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``up``, ``down``, ``status`` and ``scale`` to the ``pdserve`` command line."""
    u = sub.add_parser("up", help="start pdserve on a Ray cluster (router, pools, one KV store per node)")
    u.add_argument("--config", required=True, help="cluster YAML (see deploy/ray/pdserve.yaml)")
    u.add_argument(
        "--prefill", type=non_negative_int, default=None, help="override the config's prefill pool size"
    )
    u.add_argument(
        "--decode", type=non_negative_int, default=None, help="override the config's decode pool size"
    )
    u.add_argument("--file-sd", default="", help="write a Prometheus file_sd JSON of every /metrics here")
    _common(u)
    u.set_defaults(func=_cmd_up)

    d = sub.add_parser("down", help="stop what `pdserve up` started (and nothing else)")
    _common(d)
    d.set_defaults(func=_cmd_down)

    s = sub.add_parser("status", help="pools, load and KV usage of the Ray deployment")
    s.add_argument("--file-sd", default="", help="write a Prometheus file_sd JSON of every /metrics here")
    _common(s)
    s.set_defaults(func=_cmd_status)

    sc = sub.add_parser("scale", help="resize the prefill / decode pools (drains before removal)")
    sc.add_argument(
        "--model",
        default=None,
        help="the model whose pools to resize (required on a cluster serving several; its id: the folder's name)",
    )
    sc.add_argument(
        "--prefill", type=non_negative_int, default=None, help="new prefill pool size (default: unchanged)"
    )
    sc.add_argument(
        "--decode", type=non_negative_int, default=None, help="new decode pool size (default: unchanged)"
    )
    _common(sc)
    sc.set_defaults(func=_cmd_scale)
