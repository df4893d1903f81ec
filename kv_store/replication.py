"""Replication of KV blocks across store nodes (best effort).

After blocks are put on node A, :meth:`Replicator.replicate` copies them to other nodes until
each block has ``factor`` holders (A included) or no further node can take them. Targets are
ranked by free capacity (:func:`choose_targets`, pure); bytes are read once from A and written
to each target through :class:`~kv_store.client.KVStoreClient`.

Index contract: each target's put is made under a node lease, the replica is registered in the
index while that lease pins it, then the lease is released. So the registration can never land
after the target evicted the block (its eviction unregisters later, in order); if the target
reports to the same index itself, the second registration is an idempotent no-op.

Failures (a target down, full of leased blocks, ...) are reported, not raised; the next ranked
node is tried instead. Only a source that no longer holds the blocks stops the call early.

:class:`ReplicationLoop` runs this inside a store node (``StoreConfig.replication_factor > 1``,
``python -m kv_store --replication-factor N``): every newly stored block is queued and
replicated in the background, in batches, reading the bytes locally. Best effort: a block
evicted before its turn is skipped, a full queue drops work (counted), nothing blocks a put.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.block_hash import BlockHash
from kv_store.client import KVStoreClient
from kv_store.handle import BlockLocation, check_hashes
from kv_store.index import KVIndex
from kv_store.layout import KVLayout
from pdserve.errors import InvalidRequestError, PdserveError

log = logging.getLogger(__name__)


class ClusterIndex(KVIndex, Protocol):
    def nodes(self) -> list[BlockLocation]:
        """Every announced node."""
        ...


@dataclass(frozen=True)
class ReplicationConfig:
    factor: int = 2  # holders per block wanted, the source included
    lease_ttl_s: float = 30.0  # pins a replica on its target until it is registered
    timeout_s: float = 30.0  # per store rpc

    def __post_init__(self) -> None:
        if self.factor < 1:
            raise ValueError(f"replication factor must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    free_blocks: int


def choose_targets(candidates: Sequence[NodeCapacity], exclude: Collection[str]) -> list[str]:
    """Pure: candidate node ids not in ``exclude``, most free blocks first (then by node id)."""
    ok = [c for c in candidates if c.node_id not in exclude]
    return [c.node_id for c in sorted(ok, key=lambda c: (-c.free_blocks, c.node_id))]


@dataclass(frozen=True)
class ReplicationReport:
    copied: dict[str, int] = field(default_factory=dict)  # node id -> blocks written there
    failed: dict[str, str] = field(default_factory=dict)  # node id -> why it was skipped
    holders: tuple[int, ...] = ()  # per block: holders known after the call

    @property
    def min_factor(self) -> int:
        return min(self.holders, default=0)


def _release_quietly(client: KVStoreClient, lease_id: str) -> None:
    """Release a replication lease; if that fails the lease simply expires (ttl)."""
    if not lease_id:
        return
    try:
        client.release(lease_id)
    except PdserveError as e:
        log.info("releasing replication lease %s failed (it will expire): %s", lease_id, e)


class Replicator:
    """Copies blocks to other store nodes. ``client_for(address)`` is the I/O seam (tests may
    pass clients of in-process nodes); clients are cached and closed by :meth:`close`."""

    def __init__(
        self,
        index: ClusterIndex,
        config: ReplicationConfig = ReplicationConfig(),
        *,
        client_for: Callable[[str], KVStoreClient] | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self._client_for = client_for or (lambda a: KVStoreClient(a, timeout_s=config.timeout_s))
        self._clients: dict[str, KVStoreClient] = {}

    def client(self, address: str) -> KVStoreClient:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = self._client_for(address)
        return c

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def _capacities(self, nodes: Sequence[BlockLocation], failed: dict[str, str]) -> list[NodeCapacity]:
        out = []
        for loc in nodes:
            try:
                st = self.client(loc.address).stats().node
            except PdserveError as e:
                failed[loc.node_id] = f"stats: {e}"
                continue
            out.append(NodeCapacity(loc.node_id, st.capacity_blocks - st.num_blocks - st.num_pending))
        return out

    def replicate(
        self,
        source: BlockLocation,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        factor: int | None = None,
        *,
        read: Callable[[Sequence[BlockHash]], list[bytes]] | None = None,
    ) -> ReplicationReport:
        """Copy ``hashes`` (stored on ``source``) until each has ``factor`` holders (default:
        ``config.factor``). Best effort; see the module docstring. ``read``: how to get the
        blocks' bytes (default: a Get from ``source``; a store node replicating its own blocks
        reads them locally)."""
        hs = check_hashes(hashes)
        want = self.config.factor if factor is None else factor
        if want < 1:
            raise InvalidRequestError(f"replication factor must be >= 1, got {want}")
        res = self.index.lookup(hs)
        holders: list[set[str]] = [set() for _ in hs]
        for i, locs in enumerate(res.locations):
            holders[i] = {loc.node_id for loc in locs}
        for h in holders:
            h.add(source.node_id)
        copied: dict[str, int] = {}
        failed: dict[str, str] = {}
        if all(len(h) >= want for h in holders):
            return ReplicationReport(copied, failed, tuple(len(h) for h in holders))

        by_id = {loc.node_id: loc for loc in self.index.nodes() if loc.address}
        others = [loc for nid, loc in by_id.items() if nid != source.node_id]
        ranked = choose_targets(self._capacities(others, failed), exclude=(source.node_id,))
        data: dict[BlockHash, bytes] = {}
        for nid in ranked:
            todo = [i for i, h in enumerate(holders) if len(h) < want and nid not in h]
            if not todo:
                continue
            need = [hs[i] for i in todo]
            try:
                missing = [h for h in need if h not in data]
                if missing:
                    if read is not None:
                        blobs = read(missing)
                    else:
                        blobs = self.client(source.address).get_blocks(layout, missing)
                    data.update(zip(missing, blobs, strict=True))
            except PdserveError as e:
                failed[source.node_id] = f"read from source: {e}"
                break
            target = by_id[nid]
            try:
                tc = self.client(target.address)
                put = tc.put_blocks(
                    layout, need, [data[h] for h in need], lease_ttl_s=self.config.lease_ttl_s
                )
                try:
                    self.index.register(nid, need)
                finally:
                    _release_quietly(tc, put.lease_id)
            except PdserveError as e:
                failed[nid] = f"put: {e}"
                log.info("replication to %s failed: %s", nid, e)
                continue
            copied[nid] = len(need)
            for i in todo:
                holders[i].add(nid)
            if all(len(h) >= want for h in holders):
                break
        return ReplicationReport(copied, failed, tuple(len(h) for h in holders))


@dataclass(frozen=True)
class LoopStats:
    queued: int  # hashes waiting
    batches: int  # replicate() calls made
    copies: int  # block copies written to other nodes
    skipped: int  # hashes no longer stored on the source when their turn came
    dropped: int  # hashes not queued because the queue was full
    failures: int  # per-node failures reported by replicate()


class ReplicationLoop:
    """Background replication of one store node's new blocks (see module docstring).

    ``source()`` is the node's current location (its address is known once it serves; until
    then the loop waits), ``stored(hashes)`` says which are still held, ``read(hashes)`` their
    bytes. Thread-safe :meth:`submit`; :meth:`flush` waits until everything queued was handled.
    """

    def __init__(
        self,
        replicator: Replicator,
        layout: KVLayout,
        source: Callable[[], BlockLocation],
        stored: Callable[[Sequence[BlockHash]], list[bool]],
        read: Callable[[Sequence[BlockHash]], list[bytes]],
        *,
        batch_max: int = 256,
        max_queued: int = 1 << 16,
        idle_wait_s: float = 0.05,
    ) -> None:
        self.replicator = replicator
        self.layout = layout
        self._source = source
        self._stored = stored
        self._read = read
        self.batch_max = batch_max
        self.max_queued = max_queued
        self.idle_wait_s = idle_wait_s
        self._q: deque[BlockHash] = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._stop = False
        self._batches = self._copies = self._skipped = self._dropped = self._failures = 0
        self._thread: threading.Thread | None = None

    def submit(self, hashes: Iterable[BlockHash]) -> None:
        """Queue blocks for replication (never blocks; drops what does not fit, counted)."""
        with self._cv:
            for h in hashes:
                if len(self._q) >= self.max_queued:
                    self._dropped += 1
                else:
                    self._q.append(h)
            self._cv.notify_all()

    def stats(self) -> LoopStats:
        with self._cv:
            return LoopStats(
                len(self._q), self._batches, self._copies, self._skipped, self._dropped, self._failures
            )

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until the queue is empty and no batch is in flight; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: (not self._q and not self._busy) or self._stop, timeout_s)

    def _take(self) -> list[BlockHash] | None:
        with self._cv:
            while True:
                if self._stop:
                    return None
                if self._q and self._source().address:
                    batch = [self._q.popleft() for _ in range(min(self.batch_max, len(self._q)))]
                    self._busy = True
                    return batch
                self._cv.wait(self.idle_wait_s)

    def _done(self, batches: int, copies: int, skipped: int, failures: int) -> None:
        with self._cv:
            self._busy = False
            self._batches += batches
            self._copies += copies
            self._skipped += skipped
            self._failures += failures
            self._cv.notify_all()

    def run_once(self, batch: Sequence[BlockHash]) -> ReplicationReport | None:
        """Replicate one batch now (the loop's step; tests may call it). None if none is held."""
        here = [h for h, ok in zip(batch, self._stored(batch), strict=True) if ok]
        if not here:
            return None
        return self.replicator.replicate(self._source(), self.layout, here, read=self._read)

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            copies = failures = 0
            report = None
            try:
                report = self.run_once(batch)
            except Exception:  # a bug must not kill the loop; the batch is given up
                log.exception("replication batch failed")
                failures = 1
            if report is not None:
                copies, failures = sum(report.copied.values()), failures + len(report.failed)
                skipped = len(batch) - len(report.holders)
            else:
                skipped = len(batch) if failures == 0 else 0
            self._done(1, copies, skipped, failures)

    def start(self) -> ReplicationLoop:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kv-replication", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.replicator.close()
