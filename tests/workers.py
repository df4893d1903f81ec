"""Helpers the tests share for talking to decode workers directly: :func:`worker_stats` (a worker
process's Stats) and :class:`InProcDecodeWorker` (an in-process decode worker: engine, gRPC server
and migration service, optionally DirectStream)."""

from __future__ import annotations

from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker_base import Role, WorkerConfig, WorkerState


def worker_stats(address: str, timeout_s: float = 10.0) -> worker_pb2.WorkerStats:
    """One Stats call to the worker at ``address`` (host:port), on a fresh channel."""
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=timeout_s)


IN_PROC_BLOCKS = 256
IN_PROC_BLOCK_SIZE = 16


class InProcDecodeWorker:
    """An in-process decode worker: its engine (``blocks`` KV blocks of ``block_size`` tokens, or
    ``engine_config`` as given, e.g. with ``tensor_parallel_size``), gRPC server and migration
    service; ``direct``: it also serves DirectStream on its port."""

    def __init__(
        self,
        path: str | Path,
        name: str,
        *,
        direct: bool = False,
        blocks: int = IN_PROC_BLOCKS,
        block_size: int = IN_PROC_BLOCK_SIZE,
        engine_config: EngineConfig | None = None,
    ) -> None:
        from decode_worker.service import AsyncDecodeServicer
        from pdserve.metrics import KVPullMetrics
        from pdserve.worker_main import serve_worker

        ecfg = engine_config or EngineConfig(num_kv_blocks=blocks, block_size=block_size)
        eng = LLMEngine.from_pretrained(path, ecfg)
        cfg = WorkerConfig(
            worker_id=name, role=Role.DECODE, model_path=str(path), store_address="", direct_streams=direct
        )
        self.name = name
        self.state = WorkerState(cfg, eng)
        self.svc = AsyncDecodeServicer(
            self.state, None, KVPullMetrics(CollectorRegistry(), name), stream_window_s=0.0
        )
        services = [(worker_pb2.DESCRIPTOR.services_by_name["Worker"], self.svc)]
        if direct:
            from decode_worker.direct import enable_direct_streams

            enable_direct_streams(self.svc, services)
        self.server, port = serve_worker(services, Role.DECODE, "127.0.0.1", 0, name)
        self.address = self.state.address = f"127.0.0.1:{port}"

    def free_blocks(self) -> int:
        """The engine's free KV blocks now (on its loop)."""
        return self.state.loop.call(lambda e: e.kv.num_free_blocks)

    def idle(self) -> bool:
        """No request left, the scheduler not paused and every KV block free."""
        return self.state.loop.call(
            lambda e: (
                not e.has_unfinished() and not e.scheduler.paused and e.kv.num_free_blocks == e.kv.num_blocks
            )
        )

    def stop(self) -> None:
        self.server.stop(0).wait()
        self.svc.close()
        self.state.close()
