"""The placement policy's view of the live cluster, built from the worker registry (no I/O).

Heartbeats lag, so the router adds what it knows better: requests it has in flight on each
worker (``WorkerEntry.inflight``, counted as running), prompt tokens it has sent to a worker
that have not produced their first token yet (``queued``, the prefill queue), and KV tokens of
the requests it has in flight on a worker (``kv``): a worker's used blocks are taken as at least
those, so a burst between two heartbeats does not all land on the same worker.
Instances' local prefix caches are not reported by heartbeats: the view leaves them empty and
the prefix the cluster can reuse comes from the KV store (``RequestInfo.store_prefix_blocks``).
"""

from __future__ import annotations

import threading

from router.policy import ClusterView, InstanceRole, InstanceSnapshot
from router.registry import Registry, WorkerEntry, WorkerKind

DEFAULT_BLOCK_SIZE = 16
DEFAULT_TOKEN_BUDGET = 2048

_ROLE = {WorkerKind.PREFILL: InstanceRole.PREFILL, WorkerKind.DECODE: InstanceRole.DECODE}


class OutstandingTokens:
    """Prompt tokens sent to each worker and not yet prefilled there (thread-safe counter)."""

    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, worker_id: str, tokens: int) -> None:
        with self._lock:
            n = self._tokens.get(worker_id, 0) + tokens
            if n > 0:
                self._tokens[worker_id] = n
            else:
                self._tokens.pop(worker_id, None)

    def get(self, worker_id: str) -> int:
        with self._lock:
            return self._tokens.get(worker_id, 0)


def block_size(w: WorkerEntry) -> int:
    """The KV block size ``w`` reported (the default until it has)."""
    return w.load.block_size or DEFAULT_BLOCK_SIZE


def snapshot(
    w: WorkerEntry, queued: OutstandingTokens, kv: OutstandingTokens | None = None
) -> InstanceSnapshot:
    ld = w.load
    bs = block_size(w)
    used = ld.kv_blocks_used
    if kv is not None:
        used = max(used, -(-kv.get(w.worker_id) // bs))
    return InstanceSnapshot(
        w.worker_id,
        _ROLE[w.kind],
        queued_tokens=queued.get(w.worker_id),
        queued_requests=ld.num_waiting,
        running_requests=ld.num_running + w.inflight,
        free_blocks=max(0, ld.kv_blocks_total - used),
        total_blocks=ld.kv_blocks_total,
        block_size=bs,
        token_budget=ld.token_budget or DEFAULT_TOKEN_BUDGET,
    )


def build_view(
    registry: Registry, model_id: str, queued: OutstandingTokens, kv: OutstandingTokens | None = None
) -> ClusterView:
    """Alive workers serving ``model_id``, prefill ones first, each in registration order."""
    return ClusterView(snapshot(w, queued, kv) for kind in WorkerKind for w in registry.alive(kind, model_id))


def first_block_size(registry: Registry, model_id: str) -> int | None:
    """The block size of the first instance :func:`build_view` would list (None: no worker),
    without building the view."""
    for kind in WorkerKind:
        for w in registry.alive(kind, model_id):
            return block_size(w)
    return None
