"""Helpers the integration tests share for talking to worker processes directly."""

from __future__ import annotations

import grpc

from pdserve.v1 import worker_pb2, worker_pb2_grpc


def worker_stats(address: str, timeout_s: float = 10.0) -> worker_pb2.WorkerStats:
    """One Stats call to the worker at ``address`` (host:port), on a fresh channel."""
    with grpc.insecure_channel(address) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=timeout_s)
