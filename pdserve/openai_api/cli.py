"""``pdserve openai`` / ``python -m pdserve.openai_api``: run the OpenAI-compatible HTTP front end.

    pdserve serve --tls off &                         # router on 127.0.0.1:50051, plaintext
    pdserve openai --router 127.0.0.1:50051 --port 8000 --tls off
    curl -s localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

HTTPS: ``--tls-cert/--tls-key`` (``pdserve certs``: server.pem/server.key; env
``PDSERVE_TLS_CERT``/``PDSERVE_TLS_KEY``, the cluster's). Plain HTTP must be asked for, ``--tls
off`` (``PDSERVE_TLS=off``), and only on a loopback ``--host``; without a certificate and without
that choice the server refuses to start (:func:`pdserve.security.http_serves_tls`).

Importing this module is cheap (no grpc); the server is imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from pdserve.arg_types import port_number, positive_int, positive_seconds

DEFAULT_ROUTER = "127.0.0.1:50051"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--router",
        default=DEFAULT_ROUTER,
        help="router gRPC address HOST:PORT, or several comma-separated (HOST:PORT,HOST:PORT) that "
        "the client fails over between",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address")
    p.add_argument("--port", type=port_number, default=8000, help="HTTP listen port (0: any free port)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument(
        "--max-header-bytes",
        type=int,
        default=32 << 10,
        help="request line + headers larger than this get 400 and the connection is closed",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=600.0,
        help="deadline per generation in seconds (504 after it)",
    )
    p.add_argument(
        "--chat-max-tokens",
        type=positive_int,
        default=512,
        help="max_tokens of a chat completion that does not set it",
    )
    from pdserve.security import ENV_CERT, ENV_KEY, ENV_TLS, TLSMode, add_client_tls_args

    p.add_argument(
        "--api-keys",
        default=os.environ.get("PDSERVE_API_KEYS") or None,
        help="API key store (YAML/JSON file or redis:// URL; the router's): requests need "
        "'Authorization: Bearer <key>'; default $PDSERVE_API_KEYS; none: dev mode, loopback only",
    )
    p.add_argument(
        "--tls",
        default=os.environ.get(ENV_TLS) or TLSMode.AUTO.value,
        choices=[m.value for m in TLSMode],
        help="HTTPS: on; auto = on when --tls-cert is given, refused without one; off = plain HTTP, "
        f"allowed on a loopback --host only (env {ENV_TLS}, as the gRPC ports) (default: %(default)s)",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get(ENV_CERT) or None,
        metavar="PEM",
        help="serve HTTPS with this certificate chain (e.g. `pdserve certs`: server.pem) "
        f"(env {ENV_CERT}, the cluster's) (default: %(default)s)",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get(ENV_KEY) or None,
        metavar="PEM",
        help=f"private key of --tls-cert (env {ENV_KEY}) (default: %(default)s)",
    )
    p.add_argument(
        "--ready-json",
        action="store_true",
        help='print one JSON line {"address", "url"} on stdout once serving (for launchers)',
    )
    p.add_argument(
        "--direct-streams",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="offer the routers direct streams: a router with direct streams has the decode "
        "workers stream tokens to this server (same TLS settings as the router channel), the "
        "router out of the token path; a router without them relays (default: on; "
        "--no-direct-streams: never offered)",
    )
    add_client_tls_args(p, prefix="router-")  # --router-tls-ca etc.: TLS of the channel to the router


def run(a: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status."""
    from pdserve.openai_api.server import OpenAIServer, ServerConfig
    from pdserve.openai_api.translate import Defaults

    cfg = ServerConfig(
        router=a.router,
        host=a.host,
        port=a.port,
        max_body_bytes=a.max_body_bytes,
        max_header_bytes=a.max_header_bytes,
        request_timeout_s=a.timeout if a.timeout and a.timeout > 0 else None,
        defaults=Defaults(chat_max_tokens=a.chat_max_tokens),
        api_keys=a.api_keys,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls=a.tls,
    )
    from pdserve.security import client_tls_kwargs

    try:
        srv = OpenAIServer(
            cfg, client_options={**client_tls_kwargs(a, "router-"), "direct": a.direct_streams}
        )
    except OSError as e:
        print(f"pdserve openai: cannot listen on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    srv.start()
    if a.ready_json:
        print(json.dumps({"address": f"{srv.host}:{srv.port}", "url": srv.url}), flush=True)
    routers = ", ".join(cfg.routers)
    print(f"pdserve openai: serving {srv.url}/v1 for router {routers} (Ctrl-C to stop)", file=sys.stderr)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        srv.close()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``openai`` subcommand to the ``pdserve`` CLI."""
    p = subparsers.add_parser("openai", help="OpenAI-compatible HTTP front end for a router")
    add_arguments(p)
    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pdserve.openai_api`` command line."""
    from pdserve import cli_help

    ap = argparse.ArgumentParser(
        prog="python -m pdserve.openai_api", description="OpenAI-compatible HTTP front end for pdserve"
    )
    add_arguments(ap)
    return cli_help.apply(ap)


def main(argv: list[str] | None = None) -> int:
    from pdserve.errors import PdserveError

    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except PdserveError as e:
        print(f"pdserve openai: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
