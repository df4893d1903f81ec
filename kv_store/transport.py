"""Block transports: how a consumer (decode worker, migration) reads KV blocks from a store node.

:class:`BlockTransport` is the seam; implementations:

* :class:`GrpcTransport` - any host: the node's Get stream (chunks of <= 1 MiB).
* :class:`ShmTransport` - same host: zero-copy views straight into the node's shared-memory arena.
  Protocol: one ``Lease`` rpc pins the blocks (short ttl) and returns their arena slots
  (``LeaseResponse.shm_name/slot_nbytes/slots``); the transport maps the arena once per node
  (cached) and hands out ``memoryview`` slices of the slots. A pinned slot is never reused, so the
  views stay valid until :meth:`FetchedBlocks.release`. No payload crosses gRPC. The release is
  deferred: it rides on the next ``Lease`` to the same node (``LeaseRequest.release_lease_ids``)
  or, if none comes within ``release_delay_s``, goes out as a batch from a background thread;
  so a steady stream of reads costs one round trip each. ``release_delay_s=0`` releases
  synchronously.

  Pre-leased reads (the prefill -> decode handoff): :meth:`ShmTransport.read_leased` takes arena
  slots the consumer already holds a lease on (a Put under a lease returns them:
  ``PutResult.slots``, carried by ``KVHandle.shm_slots``) and returns views with **no rpc** at all;
  the handle's lease owns the pin and its holder releases it after the copy. It refuses (raises
  UnavailableError, so the caller falls back to :meth:`ShmTransport.fetch` or gRPC) when the lease
  has less than ``lease_margin_s`` left, the location has no arena or is on another host, the arena
  cannot be attached, or the slots are not inside it.
* :class:`FakeTransport` - in memory, for tests of callers.

Integrity (:mod:`kv_store.checksum`): every read is verified, and a block that fails is a miss
(:class:`~kv_store.checksum.KVChecksumError`, NOT_FOUND), never served. ``fetch`` and
``read_leased`` take the caller's expected checksums (``checksums``, e.g. the writer's from a
KVHandle); ``fetch`` also checks the node's stored ones (the Get stream's, the Lease's). Over gRPC
blocks are verified as they arrive; over shared memory :class:`FetchedBlocks` verifies the copy
``copy_into`` made (so what was verified is exactly what the caller got, even if the arena were
written meanwhile), or the views themselves before ``views`` is first handed out.
* :class:`AutoTransport` - picks per location with :func:`choose_transport` and falls back from
  shm to gRPC when the arena cannot be attached.

Usage::

    with transport.fetch(location, layout, hashes) as blocks:
        for view, block_id in zip(blocks.views, my_block_ids):
            scatter_block(block_tensor(view, layout), caches, block_id)   # the one copy

    # holding a lease whose slots came with the put (KVHandle.shm_slots):
    with shm.read_leased(location, layout, slots, handle.lease_expires_at_unix_s) as blocks:
        blocks.copy_into(staging)
"""

from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from engine.block_hash import BlockHash
from kv_store.arena import ArenaReader
from kv_store.checksum import (
    KVChecksumError,
    block_checksum,
    check_checksum_list,
    check_expected,
    verify_blocks,
)
from kv_store.client import KVStoreClient
from kv_store.handle import BlockLocation, check_hashes
from kv_store.layout import KVLayout
from pdserve.errors import InvalidRequestError, PdserveError, RequestNotFoundError, UnavailableError

_CHECKSUM_POOL: ThreadPoolExecutor | None = None
# FetchedBlocks.copy_into verifies a read of at most this many bytes on the calling thread
INLINE_CHECKSUM_MAX_BYTES = 256 * 1024
_CHECKSUM_POOL_LOCK = threading.Lock()


def _checksum_pool() -> ThreadPoolExecutor:
    """One process-wide thread that hashes copied blocks while the caller copies the next."""
    global _CHECKSUM_POOL
    with _CHECKSUM_POOL_LOCK:
        if _CHECKSUM_POOL is None:
            _CHECKSUM_POOL = ThreadPoolExecutor(1, thread_name_prefix="kv-checksum")
        return _CHECKSUM_POOL


class ChecksumFailures:
    """A transport's count of reads refused because a block failed its checksum (thread-safe):
    :meth:`add` one, or run a read in :meth:`counted` (a :class:`KVChecksumError` out of it is
    counted, then raised). Every verified read path of this module counts through one of these."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1

    @contextlib.contextmanager
    def counted(self) -> Iterator[None]:
        try:
            yield
        except KVChecksumError:
            self.add()
            raise


class FetchedBlocks:
    """Blocks read by a transport: ``views[i]`` holds ``hashes[i]`` (block_nbytes bytes each).

    Views are valid until :meth:`release` (use as a context manager). For shm they alias the
    node's arena: read them (copy into your KV cache), never write, never keep them.

    ``checksums`` (per block, or empty when already verified): what each block must hash to.
    Then ``copy_into`` verifies its copy, and the first access to ``views`` verifies the views;
    a mismatch raises :class:`KVChecksumError` (a miss) and counts in ``checksum_failures``.
    """

    def __init__(
        self,
        views: list[memoryview],
        on_release: Callable[[], None] | None = None,
        spans: list[tuple[int, memoryview]] | None = None,
        checksums: Sequence[int] = (),
        where: str = "KV read",
        on_mismatch: Callable[[], None] | None = None,
    ) -> None:
        self._views = views
        # (first block index, view of consecutive blocks): blocks adjacent in the source memory
        # merged, so that copy_into does few large copies (large memcpy is much faster)
        self.spans = spans if spans is not None else list(enumerate(views))
        self._on_release = on_release
        self._released = False
        self._checksums = check_checksum_list(checksums, len(views), where)
        self._views_verified = not self._checksums
        self._where = where
        self._on_mismatch = on_mismatch

    def _verify(self, blocks: Sequence[Any]) -> None:
        try:
            verify_blocks(blocks, self._checksums, self._where)
        except KVChecksumError:
            if self._on_mismatch is not None:
                self._on_mismatch()
            raise

    @property
    def views(self) -> list[memoryview]:
        """The blocks' views, verified against ``checksums`` on first access."""
        if not self._views_verified and self._views:
            self._verify(self._views)
            self._views_verified = True
        return self._views

    def __len__(self) -> int:
        return len(self._views)

    def copy_into(self, dst: object) -> None:
        """Copy all blocks, in order, into one writable buffer of ``len(self) * block_nbytes``
        bytes (e.g. a pinned staging buffer), one copy per span of adjacent blocks."""
        out = np.frombuffer(memoryview(dst).cast("B"), dtype=np.uint8)  # type: ignore[arg-type]
        n = len(self._views)
        nb = self._views[0].nbytes if self._views else 0
        if out.nbytes != nb * n or not out.flags.writeable:
            raise InvalidRequestError(f"copy_into needs a writable buffer of {nb * n} bytes")
        if not self._checksums:
            for start, span in self.spans:
                np.copyto(out[start * nb : start * nb + span.nbytes], np.frombuffer(span, dtype=np.uint8))
            return
        if nb * n <= INLINE_CHECKSUM_MAX_BYTES:
            # small reads (a short prompt's handoff): copy, then hash the copy here; a hop to the
            # checksum thread per block costs more than the hashing (#12: per-request cost)
            for start, span in self.spans:
                np.copyto(out[start * nb : start * nb + span.nbytes], np.frombuffer(span, dtype=np.uint8))
            self._verify([memoryview(out)[i * nb : (i + 1) * nb] for i in range(n)])
            return
        # Verify the copy itself (what the caller got is what was verified), pipelined: block i is
        # hashed on the checksum thread (xxhash releases the GIL) while block i+1 is copied, so the
        # check costs ~0.8x of a plain copy instead of ~0.55x for copy-then-hash (bench/kv_transfer.py).
        mv = memoryview(out)
        pending = []
        for start, span in self.spans:
            src = np.frombuffer(span, dtype=np.uint8)
            for j in range(span.nbytes // nb):
                i = start + j
                np.copyto(out[i * nb : (i + 1) * nb], src[j * nb : (j + 1) * nb])
                pending.append(_checksum_pool().submit(block_checksum, mv[i * nb : (i + 1) * nb]))
        if [f.result() for f in pending] != list(self._checksums):  # raises naming the first bad block
            self._verify([mv[i * nb : (i + 1) * nb] for i in range(n)])

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        for _, v in self.spans:
            with contextlib.suppress(BufferError):
                v.release()
        self.spans = []
        for v in self._views:
            # a caller still holding an export (e.g. a tensor) keeps its bytes mapped
            with contextlib.suppress(BufferError):
                v.release()
        self._views = []
        if self._on_release is not None:
            self._on_release()

    def __enter__(self) -> FetchedBlocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BlockTransport(Protocol):
    def fetch(
        self,
        location: BlockLocation,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        """Read blocks held by ``location``, verified (against ``checksums`` when given, else the
        node's). RequestNotFoundError if one is not stored there (KVChecksumError, a subclass, if
        one fails its checksum), LayoutMismatchError if the node serves another layout,
        UnavailableError if unreachable."""
        ...

    def close(self) -> None: ...


class LeasedReader(Protocol):
    """A transport that can read blocks the caller already holds a lease on, with no rpc."""

    def chooses_shm(self, location: BlockLocation) -> bool:
        """True if reads from ``location`` would go through shared memory (worth trying
        :meth:`read_leased`)."""
        ...

    def read_leased(
        self,
        location: BlockLocation,
        layout: KVLayout,
        slots: Sequence[int],
        lease_expires_at_unix_s: float,
        slot_nbytes: int = 0,
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        """Views of the given leased arena slots, verified against ``checksums`` (required);
        UnavailableError when it cannot (fall back)."""
        ...


class TransportKind(enum.Enum):
    GRPC = "grpc"
    SHM = "shm"


def choose_transport(location: BlockLocation, my_host_id: str) -> TransportKind:
    """SHM when the node advertises an arena and shares our shared-memory domain, else GRPC."""
    if location.shm_name and my_host_id and location.host_id == my_host_id:
        return TransportKind.SHM
    return TransportKind.GRPC


class _Clients:
    """One KVStoreClient per address, created on first use."""

    def __init__(self, timeout_s: float | None) -> None:
        self._timeout_s = timeout_s
        self._clients: dict[str, KVStoreClient] = {}
        self._lock = threading.Lock()

    def get(self, location: BlockLocation) -> KVStoreClient:
        if not location.address:
            raise InvalidRequestError(f"store node {location.node_id!r} has no gRPC address")
        return self.by_address(location.address)

    def by_address(self, address: str) -> KVStoreClient:
        with self._lock:
            c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = KVStoreClient(address, timeout_s=self._timeout_s)
            return c

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()


class GrpcTransport:
    """Reads blocks through the node's Get stream; views are of private copies (no lease),
    verified as they arrive (:meth:`KVStoreClient.iter_chunks`)."""

    def __init__(self, timeout_s: float | None = 60.0) -> None:
        self._clients = _Clients(timeout_s)
        self.failures = ChecksumFailures()

    @property
    def checksum_failures(self) -> int:
        """Reads refused because a block failed its checksum."""
        return self.failures.count

    def fetch(
        self,
        location: BlockLocation,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        with self.failures.counted():
            data = self._clients.get(location).get_blocks(layout, hashes, checksums)
        return FetchedBlocks([memoryview(b) for b in data])

    def close(self) -> None:
        self._clients.close()


class _DeferredReleases:
    """Lease ids waiting to be released, per node address (see ShmTransport)."""

    def __init__(self, delay_s: float, clients: _Clients) -> None:
        self._delay_s = delay_s
        self._clients = clients
        self._pending: dict[str, list[tuple[float, str]]] = {}  # address -> [(due, lease_id)]
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    def add(self, address: str, lease_ids: Sequence[str]) -> None:
        due = time.monotonic() + self._delay_s
        with self._cond:
            self._pending.setdefault(address, []).extend((due, lid) for lid in lease_ids)
            if self._thread is None and not self._stop:
                self._thread = threading.Thread(target=self._run, name="kv-shm-release", daemon=True)
                self._thread.start()
            self._cond.notify()

    def take(self, address: str) -> list[str]:
        """Pending ids for ``address``, to send with the next Lease there."""
        with self._cond:
            return [lid for _, lid in self._pending.pop(address, [])]

    def _send(self, batch: dict[str, list[str]]) -> None:
        for address, ids in batch.items():
            with contextlib.suppress(PdserveError):  # node gone or busy: the leases expire on their own
                self._clients.by_address(address).lease([], release_lease_ids=ids)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._pending:
                    self._cond.wait()
                if self._stop:
                    return
                now = time.monotonic()
                due = min(items[0][0] for items in self._pending.values())
                if due > now:
                    self._cond.wait(due - now)
                    continue
                ready = [a for a, items in self._pending.items() if items[0][0] <= now]
                batch = {a: [lid for _, lid in self._pending.pop(a)] for a in ready}
            self._send(batch)

    def flush(self) -> None:
        """Release everything pending now (synchronously)."""
        with self._cond:
            batch = {a: [lid for _, lid in items] for a, items in self._pending.items()}
            self._pending.clear()
        self._send(batch)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._stop = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5)


def _slot_views(
    reader: ArenaReader, slots: Sequence[int], nb: int
) -> tuple[list[memoryview], list[tuple[int, memoryview]]]:
    """Per-slot views, and spans merging runs of consecutive slots (for few large copies)."""
    views = [reader.view(s, nb) for s in slots]
    spans, i = [], 0
    while i < len(slots):
        j = i
        while j + 1 < len(slots) and slots[j + 1] == slots[j] + 1:
            j += 1
        spans.append((i, reader.view(slots[i], nb, j - i + 1)))
        i = j + 1
    return views, spans


class ShmTransport:
    """Zero-copy reads from a same-host node's arena, pinned by a short lease (module docstring).

    ``lease_margin_s``: :meth:`read_leased` refuses a lease with less time than this left (the
    copy must end well before the node may reuse the slots). ``my_host_id``: when set,
    :meth:`read_leased` refuses locations of other hosts. ``wall_clock``: unix time (tests).
    """

    def __init__(
        self,
        lease_ttl_s: float = 30.0,
        timeout_s: float | None = 60.0,
        release_delay_s: float = 0.05,
        *,
        lease_margin_s: float = 2.0,
        my_host_id: str = "",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.lease_ttl_s = lease_ttl_s
        self.release_delay_s = release_delay_s
        self.lease_margin_s = lease_margin_s
        self.my_host_id = my_host_id
        self._wall = wall_clock
        self._clients = _Clients(timeout_s)
        self._readers: dict[str, ArenaReader] = {}
        self._lock = threading.Lock()
        self._deferred = _DeferredReleases(release_delay_s, self._clients)
        self.failures = ChecksumFailures()

    @property
    def checksum_failures(self) -> int:
        """Reads refused because a block failed its checksum."""
        return self.failures.count

    def _reader(self, shm_name: str) -> ArenaReader:
        with self._lock:
            r = self._readers.get(shm_name)
            if r is None:
                try:
                    r = self._readers[shm_name] = ArenaReader(shm_name)
                except FileNotFoundError:
                    raise UnavailableError(
                        f"shared-memory arena {shm_name!r} cannot be attached (not on this host, or "
                        "the node restarted); use the gRPC transport"
                    ) from None
            return r

    def fetch(
        self,
        location: BlockLocation,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        hashes = check_hashes(hashes)
        want = check_checksum_list(checksums, len(hashes), "fetch checksums")
        client = self._clients.get(location)
        address = location.address
        piggyback = self._deferred.take(address)
        try:
            grant = client.lease(hashes, ttl_s=self.lease_ttl_s, layout=layout, release_lease_ids=piggyback)
        except BaseException:
            if piggyback:
                self._deferred.add(address, piggyback)  # maybe not released: retry (idempotent)
            raise
        try:
            if not grant.shm_name:
                raise UnavailableError(f"store node {location.node_id!r} has no shared-memory arena")
            if grant.shm_name != location.shm_name and location.shm_name:
                self._drop_reader(location.shm_name)  # node restarted with a new arena
            if len(grant.checksums) != len(hashes):
                raise UnavailableError(
                    f"store node {location.node_id!r} sent no block checksums with the lease"
                )
            with self.failures.counted():  # other bytes under these keys than expected: a miss
                check_expected(want, grant.checksums, f"store node {location.node_id!r}")
            reader = self._reader(grant.shm_name)
            views, spans = _slot_views(reader, grant.slots, grant.slot_nbytes)
        except BaseException:
            client.release(grant.lease_id)
            raise
        where = f"shm read from store node {location.node_id!r}"
        sums, miss = grant.checksums, self.failures.add
        if self.release_delay_s > 0:
            return FetchedBlocks(
                views, lambda: self._deferred.add(address, [grant.lease_id]), spans, sums, where, miss
            )
        return FetchedBlocks(views, lambda: client.release(grant.lease_id), spans, sums, where, miss)

    def chooses_shm(self, location: BlockLocation) -> bool:
        """Whether :meth:`read_leased` may serve ``location``: it has an arena, on our host (when
        ``my_host_id`` is set)."""
        if not location.shm_name:
            return False
        return not self.my_host_id or location.host_id == self.my_host_id

    def read_leased(
        self,
        location: BlockLocation,
        layout: KVLayout,
        slots: Sequence[int],
        lease_expires_at_unix_s: float,
        slot_nbytes: int = 0,
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        """Zero-rpc read of blocks the caller already holds a lease on.

        ``checksums`` (parallel to ``slots``, required): what each block must hash to, e.g. the
        writer's (``KVHandle.block_checksums``); the returned blocks verify against them
        (:class:`FetchedBlocks`). Without them the read is refused (UnavailableError: use
        :meth:`fetch`, which verifies against the node's checksums), so nothing unverified is
        ever served.

        ``slots`` are the blocks' arena slots in ``location.shm_name`` (``PutResult.slots`` /
        ``KVHandle.shm_slots``), ``lease_expires_at_unix_s`` the lease's expiry, ``slot_nbytes``
        the arena slot size (0: ``layout.block_nbytes``; anything else must equal it). The views
        alias the arena; the returned :class:`FetchedBlocks` releases nothing (the caller's lease
        owns the pin: keep it until the views are released, then release it).

        Raises UnavailableError - nothing read, fall back to :meth:`fetch` (or gRPC) - if the lease
        expiry is unknown or less than ``lease_margin_s`` away, the location has no arena or is on
        another host, the arena cannot be attached, or the slots are not inside it.
        """
        nb = slot_nbytes or layout.block_nbytes
        slots = [int(x) for x in slots]
        where = f"store node {location.node_id!r}"
        if len(checksums) != len(slots):
            raise UnavailableError(
                f"{where}: a leased read needs one checksum per slot ({len(checksums)} for {len(slots)}); "
                "read through fetch, which verifies against the node's checksums"
            )
        sums = check_checksum_list(checksums, len(slots), "read_leased checksums")
        if nb != layout.block_nbytes:
            raise UnavailableError(
                f"{where}: leased slots of {nb} bytes, but the layout's blocks are {layout.block_nbytes}"
            )
        if not self.chooses_shm(location):
            raise UnavailableError(f"{where} has no shared-memory arena on this host ({location.host_id!r})")
        left = lease_expires_at_unix_s - self._wall()
        if lease_expires_at_unix_s <= 0 or left < self.lease_margin_s:
            raise UnavailableError(
                f"{where}: the lease has {left:.3f}s left (expiry {lease_expires_at_unix_s}), under the "
                f"{self.lease_margin_s}s margin; lease the blocks again"
            )
        if not slots:
            return FetchedBlocks([])
        reader = self._reader(location.shm_name)
        if reader.nbytes % nb or min(slots) < 0 or (max(slots) + 1) * nb > reader.nbytes:
            raise UnavailableError(
                f"{where}: leased slots [{min(slots)}, {max(slots)}] of {nb} bytes are not inside arena "
                f"{location.shm_name!r} ({reader.nbytes} bytes)"
            )
        try:
            views, spans = _slot_views(reader, slots, nb)
        except (IndexError, ValueError) as e:  # the reader was closed concurrently
            raise UnavailableError(f"{where}: cannot map leased slots: {e}") from None
        return FetchedBlocks(views, None, spans, sums, f"leased shm read from {where}", self.failures.add)

    def flush(self) -> None:
        """Send every deferred release now."""
        self._deferred.flush()

    def _drop_reader(self, shm_name: str) -> None:
        with self._lock:
            r = self._readers.pop(shm_name, None)
        if r is not None:
            r.close()

    def close(self) -> None:
        """Flush deferred releases, unmap arenas, close channels."""
        self._deferred.close()
        with self._lock:
            readers, self._readers = list(self._readers.values()), {}
        for r in readers:
            r.close()
        self._clients.close()


class AutoTransport:
    """Dispatches each fetch with :func:`choose_transport`; shm failures fall back to gRPC."""

    def __init__(
        self, my_host_id: str, grpc: BlockTransport | None = None, shm: BlockTransport | None = None
    ):
        self.my_host_id = my_host_id
        self.grpc = grpc if grpc is not None else GrpcTransport()
        self.shm = shm if shm is not None else ShmTransport(my_host_id=my_host_id)
        self.fallbacks = 0

    def chooses_shm(self, location: BlockLocation) -> bool:
        """True when :meth:`fetch` would try shm for ``location`` and the shm transport can read
        pre-leased slots (:meth:`read_leased`)."""
        return choose_transport(location, self.my_host_id) is TransportKind.SHM and hasattr(
            self.shm, "read_leased"
        )

    def read_leased(
        self,
        location: BlockLocation,
        layout: KVLayout,
        slots: Sequence[int],
        lease_expires_at_unix_s: float,
        slot_nbytes: int = 0,
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        """:meth:`ShmTransport.read_leased` when the location is ours to read by shm; else (or on
        its refusal) UnavailableError - the caller then uses :meth:`fetch`, which keeps the
        shm -> gRPC fallback."""
        if not self.chooses_shm(location):
            raise UnavailableError(
                f"store node {location.node_id!r} is not readable by shared memory from host {self.my_host_id!r}"
            )
        return self.shm.read_leased(  # type: ignore[attr-defined]
            location, layout, slots, lease_expires_at_unix_s, slot_nbytes, checksums
        )

    def fetch(
        self,
        location: BlockLocation,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        sums = (checksums,) if checksums else ()  # transports that verify nothing take none
        if choose_transport(location, self.my_host_id) is TransportKind.SHM:
            try:
                return self.shm.fetch(location, layout, hashes, *sums)
            except UnavailableError:
                self.fallbacks += 1
        return self.grpc.fetch(location, layout, hashes, *sums)

    def close(self) -> None:
        self.grpc.close()
        self.shm.close()


class FakeTransport:
    """In-memory transport for tests of callers: ``blocks[node_id][hash] = bytes``.

    Records every fetch in ``calls`` and counts outstanding (unreleased) fetches in ``open``.
    """

    def __init__(self) -> None:
        self.blocks: dict[str, dict[BlockHash, bytes]] = {}
        self.calls: list[tuple[str, tuple[BlockHash, ...]]] = []
        self.open = 0

    def put(self, node_id: str, h: BlockHash, data: bytes) -> None:
        self.blocks.setdefault(node_id, {})[bytes(h)] = bytes(data)

    def fetch(
        self,
        location: BlockLocation,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        checksums: Sequence[int] = (),
    ) -> FetchedBlocks:
        hashes = check_hashes(hashes)
        self.calls.append((location.node_id, hashes))
        store = self.blocks.get(location.node_id, {})
        missing = [h for h in hashes if h not in store]
        if missing:
            raise RequestNotFoundError(f"{len(missing)} blocks not stored on {location.node_id}")
        views = []
        for h in hashes:
            if len(store[h]) != layout.block_nbytes:
                raise InvalidRequestError(
                    f"fake block has {len(store[h])} bytes, layout needs {layout.block_nbytes}"
                )
            views.append(memoryview(store[h]))
        self.open += 1

        def done() -> None:
            self.open -= 1

        return FetchedBlocks(views, done, checksums=checksums, where=f"fake read from {location.node_id}")

    def close(self) -> None:
        pass
