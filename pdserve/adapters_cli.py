"""``pdserve adapters``: the LoRA adapters of a running cluster (issue #16).

* ``pdserve adapters load NAME=PATH --router HOST:PORT``: every live prefill and decode worker of
  the router's model loads the PEFT adapter in folder PATH (a path on the workers' nodes) under
  NAME, and the cluster's routers route requests naming it from then on (the router's ``Admin``
  service, :mod:`router.admin_service`). An operator command: the router's Admin is internal, so
  the caller presents the cluster token (``--cluster-token-file`` or ``PDSERVE_CLUSTER_TOKEN``)
  or, under mutual TLS, the cluster's client certificate (``--tls on --tls-ca ... --tls-cert ...
  --tls-key ...``, the flags every pdserve process takes).
* ``pdserve adapters list --router HOST:PORT``: the adapters the cluster serves (ListModels; a
  client call: ``--api-key`` or ``PDSERVE_API_KEY`` where the router requires keys).

Exit status 0 on success, 2 on an error (its message names what to fix).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from pdserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from pdserve.security import SecurityConfig


def load_adapter(
    router: str,
    name: str,
    path: str,
    timeout_s: float,
    config: SecurityConfig | None = None,
    model: str = "",
) -> list[str]:
    """Ask the router at ``router`` to load the adapter on every worker (of ``model``: a router
    serving several base models needs it; empty: its only model); the worker ids that serve it
    now. ``config``: the caller's TLS / cluster token (default: this process's,
    :func:`pdserve.security.current`). Raises the PdserveError of the call's status."""
    import grpc

    from pdserve.security import internal_channel
    from pdserve.status import error_from_rpc_error
    from pdserve.v1 import admin_pb2, admin_pb2_grpc

    ch = internal_channel(router, config)
    try:
        r = admin_pb2_grpc.AdminStub(ch).LoadAdapter(
            admin_pb2.LoadAdapterRequest(name=name, path=path, model=model), timeout=timeout_s
        )
    except grpc.RpcError as e:
        raise error_from_rpc_error(e) from None
    finally:
        ch.close()
    return list(r.workers)


def _cmd_load(a: argparse.Namespace) -> int:
    from pathlib import Path

    from pdserve.security import install_from_args

    name, sep, path = a.spec.partition("=")
    if not sep or not name or not path:
        raise InvalidRequestError(f"pdserve adapters load expects NAME=PATH, got {a.spec!r}")
    install_from_args(a._parser, a, None, ())
    p = Path(path)
    path = str(p if p.is_absolute() else p.resolve())  # workers run in other directories
    workers = load_adapter(a.router, name, path, a.timeout_s, model=a.model_id)
    out = {"adapter": name, "path": path, "workers": workers}
    print(json.dumps(out) if a.json else f"pdserve: adapter {name!r} served by {', '.join(workers)}")
    return 0


def _cmd_list(a: argparse.Namespace) -> int:
    from pdserve.client import Client
    from pdserve.security import client_tls_kwargs

    with Client(a.router, timeout=a.timeout_s, api_key=a.api_key or None, **client_tls_kwargs(a)) as c:
        adapters = c.list_adapters()
    if a.json:
        print(json.dumps(adapters))
    else:
        for model, names in adapters.items():
            print(f"{model}: {', '.join(names) if names else '(no adapters)'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``adapters`` to the ``pdserve`` command line."""
    import os

    from pdserve.security import add_client_tls_args, add_security_args

    ad = sub.add_parser(
        "adapters", help="LoRA adapters of a running cluster: load one at run time, list them"
    )
    asub = ad.add_subparsers(dest="adapters_cmd", required=True)
    ld = asub.add_parser(
        "load",
        help="load a PEFT LoRA adapter into every worker of a running cluster (operator: cluster token)",
    )
    ld.add_argument("spec", metavar="NAME=PATH", help="adapter name and its folder on the workers' nodes")
    ld.add_argument("--router", required=True, help="a router's HOST:PORT")
    ld.add_argument(
        "--model-id",
        default="",
        help="the base model whose workers load it (a router serving several models needs it) "
        "(default: the router's only model)",
    )
    ld.add_argument("--timeout-s", type=float, default=180.0, help="longest wait (default: %(default)s)")
    ld.add_argument("--json", action="store_true", help="print the result as JSON")
    add_security_args(ld)
    ld.set_defaults(func=_cmd_load, _parser=ld)
    ls = asub.add_parser("list", help="the adapters the cluster serves (ListModels)")
    ls.add_argument("--router", required=True, help="a router's HOST:PORT")
    ls.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY", ""),
        help="API key where the router requires keys (default: $PDSERVE_API_KEY, else none)",
    )
    ls.add_argument("--timeout-s", type=float, default=30.0, help="longest wait (default: %(default)s)")
    ls.add_argument("--json", action="store_true", help="print the result as JSON")
    add_client_tls_args(ls)
    ls.set_defaults(func=_cmd_list)
