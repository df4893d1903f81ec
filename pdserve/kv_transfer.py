"""The names of the ways a cluster moves KV from prefill to decode workers (pure enums, shared by
the process launcher, the Ray cluster config and the worker entry point)."""

from __future__ import annotations

import enum


class KVTransport(enum.Enum):
    """How a cluster's KV moves from prefill to decode workers."""

    STORE = "store"  # published to the store node, pulled from it (shm same host, else gRPC)
    DIST = "dist"  # directly between worker processes over torch.distributed (gloo | nccl)


class DistBackend(enum.Enum):
    """torch.distributed backend of the direct handoff."""

    GLOO = "gloo"  # CPU tensors over TCP (tested in CI)
    NCCL = "nccl"  # CUDA tensors, GPU to GPU (same code path; needs GPUs)


DEFAULT_DIST_TIMEOUT_S = 180.0  # forming the workers' process group, and each transfer
DEFAULT_OUTBOX_BYTES = 1 << 30  # a prefill worker's direct-transfer outbox, at most
