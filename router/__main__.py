"""Router process: ``python -m router --model PATH [--port 0]``.

Prints one JSON line ``{"address"}`` once serving; runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from pdserve.v1 import client_pb2, router_pb2
from router.registry import Registry
from router.service import GenerateServicer, RegistryServicer, RouterConfig


def main(argv: list[str] | None = None) -> int:
    from pdserve.grpc_server import start_server

    ap = argparse.ArgumentParser(prog="python -m router")
    ap.add_argument("--model", required=True, help="HF model folder (tokenizer + config)")
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--heartbeat-timeout-s", type=float, default=3.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = RouterConfig(
        model_path=a.model,
        model_id=a.model_id or Path(a.model).name,
        host=a.host,
        port=a.port,
        heartbeat_timeout_s=a.heartbeat_timeout_s,
    )
    reg = Registry(cfg.heartbeat_timeout_s)
    services = [
        (client_pb2.DESCRIPTOR.services_by_name["Generate"], GenerateServicer(reg, cfg)),
        (router_pb2.DESCRIPTOR.services_by_name["Registry"], RegistryServicer(reg, cfg)),
    ]
    server, port, _ = start_server(services, cfg.host, cfg.port, name="router")
    print(json.dumps({"address": f"{cfg.host}:{port}"}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
