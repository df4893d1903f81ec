"""How a live migration's KV stages travel from the source to the destination (the source side;
the destination reads them in :meth:`decode_worker.migration.DecodeMigration.migrate_in`).

A :class:`StageSender` turns one stage (:class:`~engine.migration.KVStage`) into the
``MigrationBlocks`` messages of the ``MigrateIn`` stream, and releases what the destination never
took when the migration aborts:

* :class:`InlineStageSender` (``MIGRATION_TRANSPORT_GRPC``): the KV bytes in the messages
  (:func:`decode_worker.migration_wire.stage_chunks`), direct between the two workers.
* :class:`PublishedStageSender` with a :class:`~prefill_worker.publisher.StorePublisher`
  (``MIGRATION_TRANSPORT_STORE``): each chunk put on the source's store node under a lease, keys
  salted per migration (write-once keys never clash with another request's); the message
  carries the handle, the destination pulls it (shm on the node's host, else gRPC) and releases
  the lease. On abort the source releases the leases of chunks not acked.
* :class:`PublishedStageSender` with a :class:`~prefill_worker.dist_outbox.DistPublisher`
  (``MIGRATION_TRANSPORT_DIST``): each chunk kept in the source's direct-transfer outbox under a
  key unique to this migration and chunk; the message carries a direct handle (this worker's
  rank in the workers' torch.distributed process group and the address of its ``KVPeer``
  service); the destination's :class:`~decode_worker.dist_puller.DistPuller` calls
  ``KVPeer.PushKV`` on the source and receives the blocks over the group (gloo on CPU, NCCL on
  GPU: the same path as the prefill -> decode direct handoff). On abort the source drops the
  outbox entries not acked (one the destination never pulled would otherwise expire with its TTL).

Every publishing transport names a chunk by chained block hashes salted with the migration
(``chain_hashes(..., include_partial=True)``), so a handle always names exactly its blocks.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

from decode_worker.migration_wire import stage_chunks
from engine.block_hash import BlockHash, chain_hashes
from engine.llm_engine import KVExport
from engine.migration import KVStage, MigrationHeader
from kv_store.convert import handle_to_proto
from kv_store.handle import KVHandle
from kv_store.layout import KVLayout
from pdserve.limits import MAX_BLOCKS_PER_CALL
from pdserve.v1 import worker_pb2
from prefill_worker.publisher import KVPublisher


class StageSender(Protocol):
    """One migration's way of moving its stages (see module docstring)."""

    def chunks(self, stage: KVStage, end_of_stage: bool) -> Iterator[worker_pb2.MigrationBlocks]:
        """The messages that move ``stage`` (the last one carries ``end_of_stage``); blocking
        work (a store Put, an outbox put) is done as each message is produced."""
        ...

    def acked(self) -> None:
        """The destination acked every chunk sent so far (it took and released them)."""
        ...

    def abort(self) -> None:
        """The migration is given up: release whatever the destination has not acked."""
        ...


class InlineStageSender:
    """``MIGRATION_TRANSPORT_GRPC``: the KV bytes travel in the messages (nothing to release)."""

    def chunks(self, stage: KVStage, end_of_stage: bool) -> Iterator[worker_pb2.MigrationBlocks]:
        yield from stage_chunks(stage, end_of_stage)

    def acked(self) -> None:
        return None

    def abort(self) -> None:
        return None


class PublishedStageSender:
    """``MIGRATION_TRANSPORT_STORE`` / ``MIGRATION_TRANSPORT_DIST``: each chunk of at most
    ``MAX_BLOCKS_PER_CALL`` blocks is published with ``publisher`` and the message carries its
    handle. ``key_for(i)`` names chunk ``i``'s export (the store's lease owner, or the outbox
    key of a direct handle: unique per migration and chunk); ``release(handle)`` frees a
    published chunk the destination never acked (a store lease, an outbox entry)."""

    def __init__(
        self,
        publisher: KVPublisher,
        layout: KVLayout,
        header: MigrationHeader,
        lease_ttl_s: float,
        release: Callable[[KVHandle], None],
        key_for: Callable[[int], str] | None = None,
    ) -> None:
        self.publisher = publisher
        self.layout = layout
        self.header = header
        self.lease_ttl_s = lease_ttl_s
        self._release = release
        self._key_for = key_for or (lambda i: header.request_id)
        self._salt = f"migration/{header.request_id}/{uuid.uuid4().hex}"  # keys unique to this migration
        self._parent: BlockHash | None = None
        self._published = 0
        self.unacked: list[KVHandle] = []  # published chunks the destination has not acked

    def chunks(self, stage: KVStage, end_of_stage: bool) -> Iterator[worker_pb2.MigrationBlocks]:
        if not stage.num_blocks:  # the empty last stage: nothing to publish
            yield from stage_chunks(stage, end_of_stage)
            return
        bs = self.header.shape.block_size
        n = stage.num_blocks
        for s in range(0, n, MAX_BLOCKS_PER_CALL):
            e = min(n, s + MAX_BLOCKS_PER_CALL)
            part = KVStage(stage.first_block + s, stage.blocks[s:e], stage.token_ids[s * bs : e * bs])
            yield self._publish(part, end_of_stage and e == n)

    def _publish(self, stage: KVStage, end_of_stage: bool) -> worker_pb2.MigrationBlocks:
        h = self.header
        keys = chain_hashes(
            stage.token_ids,
            h.shape.block_size,
            h.model_id,
            h.adapter_id,
            self._salt,
            include_partial=True,
            parent=self._parent,
        )
        if len(keys) != stage.num_blocks:
            raise RuntimeError(
                f"{len(keys)} keys for {stage.num_blocks} blocks of {len(stage.token_ids)} tokens"
            )
        self._parent = keys[-1]
        key = self._key_for(self._published)
        self._published += 1
        kv = KVExport(key, h.model_id, stage.token_ids, 0, keys, stage.blocks, h.shape)
        handle = self.publisher.publish(kv, self.layout, lease_ttl_s=self.lease_ttl_s)
        self.unacked.append(handle)
        return worker_pb2.MigrationBlocks(
            first_block=stage.first_block,
            num_blocks=stage.num_blocks,
            kv=handle_to_proto(handle),
            end_of_stage=end_of_stage,
        )

    def acked(self) -> None:
        self.unacked.clear()  # the destination pulled and released them

    def abort(self) -> None:
        for handle in self.unacked:
            with contextlib.suppress(Exception):  # expired already: nothing to release
                self._release(handle)
        self.unacked.clear()


def release_store_lease(client: object) -> Callable[[KVHandle], None]:
    """``release`` for the STORE transport: the lease of the handle on the source's store node
    (``client``: the publisher's :class:`~kv_store.client.KVStoreClient`; None: leases expire)."""

    def release(handle: KVHandle) -> None:
        if client is not None and handle.lease_id:
            client.release(handle.lease_id)  # type: ignore[attr-defined]

    return release


def dist_stage_key() -> Callable[[int], str]:
    """Outbox keys of one DIST migration's chunks: short (the transfer header carries at most 184
    bytes of id) and unique, whatever the request id's length."""
    mig = uuid.uuid4().hex
    return lambda i: f"migration-{mig}-{i}"
