"""``pdserve drain WORKER``: empty one worker of a ``pdserve up`` (Ray) deployment, or, with
``--router ADDR[,ADDR...]``, of any cluster (``pdserve serve``, hand-started routers) through every
router's Admin service (internal: the cluster token, ``--cluster-token-file``, or the cluster's
client certificate under mutual TLS; give every router of the cluster: each routes on its own).

Every router stops routing new requests to ``WORKER``; a decode worker's running requests are
moved to other decode workers by live migration while they keep streaming (the routers'
:func:`router.drain.drain_decode_worker`); a request whose migration aborts, and every request
on a prefill worker, finishes where it is. The command waits until no router has a request in
flight on the worker (at most ``--timeout-s``), prints what each router did, and leaves the
worker running but unrouted (remove it with ``pdserve scale``, which drains the same way).
Exit status 0 when drained, 1 when requests remained at the timeout, 2 for an unknown worker.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from pdserve.errors import UnavailableError
from pdserve.ray_cli import _common, _ns

_CALL_TIMEOUT_S = 30.0


def _routers(namespace: str) -> list[Any]:
    """The router actors of the deployment in ``namespace``, in order."""
    import ray

    from pdserve import ray_cluster
    from pdserve.ray_actors import router_actor_name

    ctrl = ray_cluster.controller(namespace)
    if ctrl is None:
        raise UnavailableError(f"pdserve is not up in Ray namespace {namespace!r}: run `pdserve up`")
    n = len(ray_cluster._unwrap(ctrl.addresses.remote(), 120).get("routers", [])) or 1
    return [ray.get_actor(router_actor_name(i), namespace=namespace) for i in range(n)]


def drain(worker_id: str, namespace: str, timeout_s: float, poll_s: float = 0.2) -> dict[str, Any]:
    """Drain ``worker_id`` through every router (see the module doc); what happened, as a dict:
    ``found`` (some router knows the worker), ``drained``, ``inflight`` (left at the end), the
    routers' migration ``reports`` and ``elapsed_s``."""
    import ray

    t0 = time.monotonic()
    routers = _routers(namespace)
    found = ray.get([r.drain.remote(worker_id, timeout_s) for r in routers], timeout=_CALL_TIMEOUT_S)
    if not any(found):
        return {"worker_id": worker_id, "found": False, "drained": False, "inflight": 0, "reports": []}
    reports: list[Any] = [None] * len(routers)
    inflight = 0
    while True:
        inflight = sum(ray.get([r.inflight.remote(worker_id) for r in routers], timeout=_CALL_TIMEOUT_S))
        reports = ray.get([r.drain_report.remote(worker_id) for r in routers], timeout=_CALL_TIMEOUT_S)
        settled = all(rep is not None or not f for rep, f in zip(reports, found, strict=True))
        if (inflight == 0 and settled) or time.monotonic() - t0 >= timeout_s:
            break
        time.sleep(poll_s)
    return {
        "worker_id": worker_id,
        "found": True,
        "drained": inflight == 0,
        "inflight": inflight,
        "reports": [r for r in reports if r is not None],
        "elapsed_s": round(time.monotonic() - t0, 3),
    }


def drain_via_routers(
    routers: list[str], worker_id: str, timeout_s: float, poll_s: float = 0.2, config: Any = None
) -> dict[str, Any]:
    """:func:`drain` through the routers' Admin service (``Drain``, then ``DrainStatus`` until no
    router has a request in flight on the worker and every migration drain ended, or
    ``timeout_s``); the same dict. ``config``: the caller's SecurityConfig (default: this
    process's). Raises the PdserveError of a failed call."""
    import grpc

    from pdserve.security import internal_channel
    from pdserve.status import error_from_rpc_error
    from pdserve.v1 import admin_pb2, admin_pb2_grpc

    t0 = time.monotonic()
    channels = [internal_channel(r, config) for r in routers]
    try:
        stubs = [admin_pb2_grpc.AdminStub(ch) for ch in channels]
        try:
            found = [
                s.Drain(
                    admin_pb2.DrainRequest(worker_id=worker_id, timeout_s=timeout_s), timeout=_CALL_TIMEOUT_S
                ).found
                for s in stubs
            ]
            if not any(found):
                return {
                    "worker_id": worker_id,
                    "found": False,
                    "drained": False,
                    "inflight": 0,
                    "reports": [],
                }
            while True:
                st = [
                    s.DrainStatus(admin_pb2.DrainStatusRequest(worker_id=worker_id), timeout=_CALL_TIMEOUT_S)
                    for s, f in zip(stubs, found, strict=True)
                    if f
                ]
                inflight = sum(x.inflight for x in st)
                if (inflight == 0 and not any(x.migrating for x in st)) or time.monotonic() - t0 >= timeout_s:
                    break
                time.sleep(poll_s)
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from None
    finally:
        for ch in channels:
            ch.close()
    reports = [
        {"migrated": x.migrated, "aborted": x.aborted, **({"error": x.error} if x.error else {})} for x in st
    ]
    return {
        "worker_id": worker_id,
        "found": True,
        "drained": inflight == 0,
        "inflight": inflight,
        "reports": reports,
        "elapsed_s": round(time.monotonic() - t0, 3),
    }


def format_result(out: dict[str, Any]) -> str:
    if not out["found"]:
        return f"pdserve drain: no router knows worker {out['worker_id']!r}"
    moved = sum(r.get("migrated", 0) for r in out["reports"])
    aborted = sum(r.get("aborted", 0) for r in out["reports"])
    state = "drained" if out["drained"] else f"NOT drained ({out['inflight']} requests still in flight)"
    return (
        f"pdserve: {out['worker_id']} {state} in {out['elapsed_s']}s: {moved} requests migrated off it, "
        f"{aborted} migrations aborted (those requests finished in place); it no longer gets requests"
    )


def _cmd_drain(a: argparse.Namespace) -> int:
    from pdserve import ray_cluster

    if not a.timeout_s > 0:
        print(f"pdserve drain: --timeout-s must be > 0, got {a.timeout_s}", file=sys.stderr)
        return 2
    if a.router:
        # the Ray deployment's flags: the Admin path dials the routers named, never Ray
        for flag, given in (("--address", a.address != "auto"), ("--namespace", a.namespace is not None)):
            if given:
                print(
                    f"pdserve drain: {flag} names the Ray deployment, and --router drains through the "
                    f"routers' Admin service instead: drop {flag}, or drop --router",
                    file=sys.stderr,
                )
                return 2
        from pdserve.security import install_from_args

        install_from_args(a._parser, a, None, ())
        routers = [r.strip() for r in a.router.split(",") if r.strip()]
        out = drain_via_routers(routers, a.worker, a.timeout_s)
    else:
        # the security flags configure the Admin channels of --router; the Ray path talks to the
        # deployment's actors through Ray (its own auth) and never reads them
        from pdserve.security import given_security_flags

        for flag in given_security_flags(a._parser, a):
            print(
                f"pdserve drain: {flag} configures the channels to the routers of --router, and without "
                "--router the drain goes through the Ray deployment, which never reads it: drop "
                f"{flag}, or give --router",
                file=sys.stderr,
            )
            return 2
        ns = _ns(a)
        ray_cluster.connect(a.address, ns)
        out = drain(a.worker, ns, a.timeout_s)
    print(json.dumps(out) if a.json else format_result(out))
    if not out["found"]:
        return 2
    return 0 if out["drained"] else 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``drain`` to the ``pdserve`` command line."""
    d = sub.add_parser(
        "drain",
        help="stop routing to a worker of the Ray deployment and move its running requests off it "
        "by live migration (decode workers)",
    )
    d.add_argument("worker", help="worker id (as `pdserve status` lists it)")
    d.add_argument(
        "--timeout-s", type=float, default=120.0, help="longest wait for the worker to empty (default: 120)"
    )
    d.add_argument(
        "--router",
        default="",
        help="HOST:PORT[,HOST:PORT...]: drain through these routers' Admin service (every router of "
        "the cluster; a cluster started without Ray) instead of the Ray deployment (then --address "
        "and --namespace are refused)",
    )
    _common(d)
    from pdserve.security import add_security_args

    add_security_args(d)
    d.set_defaults(func=_cmd_drain, _parser=d)
