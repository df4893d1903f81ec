"""The placement policy's view of the live cluster, built from the worker registry (no I/O).

Heartbeats lag, so the router adds what it knows better: requests it has in flight on each
worker (``WorkerEntry.inflight``, counted as running), prompt tokens it has sent to a worker
that have not produced their first token yet (``queued``, the prefill queue), and KV tokens of
the requests it has in flight on a worker (``kv``): a worker's used blocks are taken as at least
those, so a burst between two heartbeats does not all land on the same worker.
Instances' local prefix caches are not reported by heartbeats: the view leaves them empty and
the prefix the cluster can reuse comes from the KV store (``RequestInfo.store_prefix_blocks``).

A router builds a view per request under its placement lock: :class:`ViewBuilder` makes that
cost a comparison per worker (its snapshot is reused while nothing it is made from changed)
instead of a new snapshot per worker; :func:`build_view` builds every snapshot afresh.
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

    def copy(self) -> dict[str, int]:
        """Every worker's count at one instant (workers with none are absent)."""
        with self._lock:
            return dict(self._tokens)


def block_size(w: WorkerEntry) -> int:
    """The KV block size ``w`` reported (the default until it has)."""
    return w.load.block_size or DEFAULT_BLOCK_SIZE


def snapshot(
    w: WorkerEntry, queued: OutstandingTokens, kv: OutstandingTokens | None = None
) -> InstanceSnapshot:
    return _snapshot(w, queued.get(w.worker_id), None if kv is None else kv.get(w.worker_id))


def _snapshot(w: WorkerEntry, queued_tokens: int, kv_tokens: int | None) -> InstanceSnapshot:
    """``w``'s snapshot given its outstanding prompt tokens and KV tokens (None: not tracked)."""
    ld = w.load
    bs = block_size(w)
    used = ld.kv_blocks_used
    if kv_tokens is not None:
        used = max(used, -(-kv_tokens // bs))
    return InstanceSnapshot(
        w.worker_id,
        _ROLE[w.kind],
        queued_tokens=queued_tokens,
        queued_requests=ld.num_waiting,
        running_requests=ld.num_running + w.inflight,
        free_blocks=max(0, ld.kv_blocks_total - used),
        total_blocks=ld.kv_blocks_total,
        block_size=bs,
        token_budget=ld.token_budget or DEFAULT_TOKEN_BUDGET,
        latency=w.profile,
        adapters_in_slot=ld.adapters_in_slot,
        adapters_in_host=ld.adapters_in_host,
        adapter_slot_load_s=ld.adapter_slot_load_s,
        adapter_disk_load_s=ld.adapter_disk_load_s,
        adapter_slots=ld.adapter_slots,
        adapter_slots_pinned=ld.adapter_slots_pinned,
        adapter_slot_waiters=ld.adapter_slot_waiters,
        adapter_slot_free_s=ld.adapter_slot_free_s,
        adapter_reads_queued=ld.adapter_reads_queued,
    )


def build_view(
    registry: Registry, model_id: str, queued: OutstandingTokens, kv: OutstandingTokens | None = None
) -> ClusterView:
    """Alive workers serving ``model_id``, prefill ones first, each in registration order."""
    return ClusterView(snapshot(w, queued, kv) for kind in WorkerKind for w in registry.alive(kind, model_id))


class ViewBuilder:
    """:func:`build_view` for a router that builds a view per request: a worker's
    :class:`InstanceSnapshot` is reused while everything it is made from (kind, reported load,
    router in-flight count, outstanding prompt and KV tokens) is unchanged, so a request costs a
    tuple comparison per worker instead of a new snapshot per worker. Departed workers are
    forgotten at the next build. Thread-safe; the views are equal to :func:`build_view`'s."""

    def __init__(self) -> None:
        self._snaps: dict[str, tuple[tuple, InstanceSnapshot]] = {}
        self._lock = threading.Lock()

    def build(
        self,
        registry: Registry,
        model_id: str,
        queued: OutstandingTokens,
        kv: OutstandingTokens | None = None,
    ) -> ClusterView:
        q = queued.copy()
        k = kv.copy() if kv is not None else None
        with self._lock:
            old = self._snaps
            new: dict[str, tuple[tuple, InstanceSnapshot]] = {}
            out: list[InstanceSnapshot] = []
            for kind in WorkerKind:
                for w in registry.alive(kind, model_id):
                    wid = w.worker_id
                    ld = w.load
                    key = (
                        w.kind,
                        ld.num_waiting,
                        ld.num_running,
                        ld.kv_blocks_total,
                        ld.kv_blocks_used,
                        ld.block_size,
                        ld.token_budget,
                        w.inflight,
                        q.get(wid, 0),
                        None if k is None else k.get(wid, 0),
                        w.profile,
                        ld.adapters_in_slot,
                        ld.adapters_in_host,
                        ld.adapter_slot_load_s,
                        ld.adapter_disk_load_s,
                        ld.adapter_slots,
                        ld.adapter_slots_pinned,
                        ld.adapter_slot_waiters,
                        ld.adapter_slot_free_s,
                        ld.adapter_reads_queued,
                    )
                    hit = old.get(wid)
                    if hit is not None and hit[0] == key:
                        s = hit[1]
                    else:
                        s = _snapshot(w, key[8], key[9])
                    new[wid] = (key, s)
                    out.append(s)
            self._snaps = new
        return ClusterView(out)


def first_block_size(registry: Registry, model_id: str) -> int | None:
    """The block size of the first instance :func:`build_view` would list (None: no worker),
    without building the view."""
    for kind in WorkerKind:
        for w in registry.alive(kind, model_id):
            return block_size(w)
    return None
