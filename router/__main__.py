"""Router process: ``python -m router --model PATH [--port 0]``.

Prints one JSON line ``{"address", "metrics"}`` once serving (``metrics``: host:port of its
Prometheus /metrics); runs until SIGTERM. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from prometheus_client import REGISTRY

from pdserve.metrics import RouterMetrics, serve_metrics
from pdserve.tracing import configure_logging
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
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: any free)")
    a = ap.parse_args(argv)
    configure_logging("router")
    cfg = RouterConfig(
        model_path=a.model,
        model_id=a.model_id or Path(a.model).name,
        host=a.host,
        port=a.port,
        heartbeat_timeout_s=a.heartbeat_timeout_s,
    )
    reg = Registry(cfg.heartbeat_timeout_s)
    services = [
        (
            client_pb2.DESCRIPTOR.services_by_name["Generate"],
            GenerateServicer(reg, cfg, RouterMetrics(REGISTRY)),
        ),
        (router_pb2.DESCRIPTOR.services_by_name["Registry"], RegistryServicer(reg, cfg)),
    ]
    server, port, _ = start_server(services, cfg.host, cfg.port, name="router")
    metrics_port = serve_metrics(a.metrics_port)
    print(json.dumps({"address": f"{cfg.host}:{port}", "metrics": f"127.0.0.1:{metrics_port}"}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(2).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
