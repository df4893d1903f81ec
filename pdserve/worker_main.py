"""Process entry of a prefill or decode worker (``python -m prefill_worker`` / ``python -m decode_worker``).

Prints one JSON line ``{"worker_id", "role", "address", "metrics"}`` once serving (``metrics``:
host:port of its Prometheus /metrics), then runs until SIGTERM. Logs are JSON lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

import grpc
from prometheus_client import REGISTRY

from engine.config import EngineConfig
from kv_store.arena import host_id
from kv_store.client import KVStoreClient
from kv_store.transport import AutoTransport
from pdserve.limits import grpc_options
from pdserve.metrics import WorkerMetrics, serve_metrics
from pdserve.tracing import configure_logging, traced_channel
from pdserve.v1 import worker_pb2
from pdserve.worker_base import Heartbeater, Role, WorkerConfig, WorkerState


def parse(argv: list[str] | None, role: Role) -> WorkerConfig:
    ap = argparse.ArgumentParser(prog=f"python -m {role.name.lower()}_worker")
    ap.add_argument("--worker-id", required=True)
    ap.add_argument("--model", required=True, help="HF model folder")
    ap.add_argument("--store", required=True, help="host:port of the local KV store node")
    ap.add_argument("--router", default=None, help="host:port of the router's registry")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--kv-blocks", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=512, help="prefill chunk (Sarathi) in tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--admission-timeout-s", type=float, default=30.0)
    ap.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0: any free)")
    a = ap.parse_args(argv)
    eng = EngineConfig(
        num_kv_blocks=a.kv_blocks,
        block_size=a.block_size,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_batched_tokens,
        long_prefill_token_threshold=a.chunk,
        device=a.device,
        dtype=a.dtype,
    )
    return WorkerConfig(
        worker_id=a.worker_id,
        role=role,
        model_path=a.model,
        store_address=a.store,
        host=a.host,
        port=a.port,
        router_address=a.router,
        engine=eng,
        admission_timeout_s=a.admission_timeout_s,
        metrics_port=a.metrics_port,
    )


def build_service(state: WorkerState, store: KVStoreClient, transport: AutoTransport):
    if state.config.role is Role.PREFILL:
        from prefill_worker.publisher import StorePublisher
        from prefill_worker.service import PrefillServicer

        return PrefillServicer(state, StorePublisher(store), store, transport)
    from decode_worker.puller import StorePuller
    from decode_worker.service import DecodeServicer

    return DecodeServicer(state, StorePuller(transport, {store.address: store}))


def main(role: Role, argv: list[str] | None = None) -> int:
    from pdserve.grpc_server import start_server

    cfg = parse(argv, role)
    configure_logging(cfg.worker_id)
    state = WorkerState.load(cfg)
    # store calls carry the request id as gRPC metadata (pdserve-request-id)
    store_channel = traced_channel(grpc.insecure_channel(cfg.store_address, options=grpc_options()))
    store = KVStoreClient(cfg.store_address, channel=store_channel)
    transport = AutoTransport(host_id())
    svc = build_service(state, store, transport)
    desc = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    server, port, _ = start_server([(desc, svc)], cfg.host, cfg.port, name=cfg.worker_id)
    state.address = f"{cfg.host}:{port}"
    state.attach_metrics(
        WorkerMetrics(REGISTRY, cfg.worker_id, role.name.lower(), snapshot=state.metrics_snapshot)
    )
    metrics_port = serve_metrics(cfg.metrics_port)
    hb = Heartbeater(state, cfg.router_address) if cfg.router_address else None
    if hb:
        hb.start()
    print(
        json.dumps(
            {
                "worker_id": cfg.worker_id,
                "role": role.name.lower(),
                "address": state.address,
                "metrics": f"127.0.0.1:{metrics_port}",
            }
        ),
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    if hb:
        hb.stop()
    server.stop(2).wait()
    state.close()
    transport.close()
    store.close()
    store_channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(Role[sys.argv[1].upper()], sys.argv[2:]))
