"""KVStoreClient: typed, chunked client of one store node's ``pdserve.v1.KVStore`` service.

Every failure surfaces as a :mod:`pdserve.errors` exception (via
:func:`pdserve.status.raise_from_rpc_error`): LayoutMismatchError, RequestNotFoundError (block not
stored), ResourceExhaustedError (node full, with ``retry_after_s``), UnavailableError (node down),
InvalidRequestError, DeadlineExceededError. Block payloads stream in chunks of at most
``MAX_CHUNK_BYTES``; a Put whose blocks fit one message (:data:`PUT_BLOCKS_MAX_BYTES`) goes as one
unary ``PutBlocks`` call instead (the same checks and effects; a sync gRPC client-streaming call
starts a thread per call to feed its request iterator, a unary one does not: #12, a prefill
worker's CPU per handoff).

Cluster identity (:mod:`kv_store.auth`): every call carries the cluster token in metadata
``x-pdserve-cluster-token`` when one is configured (``cluster_token=``, default: the
``PDSERVE_CLUSTER_TOKEN_FILE`` / ``PDSERVE_CLUSTER_TOKEN`` environment), and the lease owner
(``x-pdserve-lease-owner``) when given. Integrity (:mod:`kv_store.checksum`): Put sends each
block's checksum; Get verifies every block it receives against the node's checksum (and the
caller's, when given) and raises :class:`~kv_store.checksum.KVChecksumError` on a mismatch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import grpc

from engine.block_hash import BlockHash
from kv_store import convert
from kv_store.auth import check_owner, cluster_token_from_env, token_metadata
from kv_store.checksum import KVChecksumError, StreamingChecksum, block_checksum, check_checksum_list
from kv_store.handle import check_hashes
from kv_store.index import LookupResult
from kv_store.layout import KVLayout
from kv_store.store import DeleteCounts, LeaseGrant, PutResult, StoreStats
from kv_store.wire import PUT_BLOCK_OVERHEAD, decode_get_chunk, encode_chunk, encode_put_blocks
from pdserve.errors import InternalError, InvalidRequestError, StoreUnavailableError, UnavailableError
from pdserve.limits import MAX_CHUNK_BYTES, MAX_MESSAGE_BYTES
from pdserve.security import internal_channel
from pdserve.status import raise_from_rpc_error
from pdserve.v1 import kv_store_pb2, kv_store_pb2_grpc

log = logging.getLogger(__name__)

BlockData = Any  # bytes | bytearray | memoryview | numpy.ndarray | torch.Tensor (CPU)

# Largest PutBlocks message a client sends (estimated from the blocks' sizes before encoding):
# the transport limit less a margin for the layout and metadata. Larger Puts stream (Put).
PUT_BLOCKS_MAX_BYTES = MAX_MESSAGE_BYTES - (64 << 10)
MAX_PUT_HEADERS = 64  # serialised PutBlocks headers a client keeps (one per layout and lease ttl)


def put_blocks_fits(num_blocks: int, block_nbytes: int, max_bytes: int = PUT_BLOCKS_MAX_BYTES) -> bool:
    """Whether ``num_blocks`` blocks of ``block_nbytes`` go as one PutBlocks message (pure)."""
    return num_blocks > 0 and num_blocks * (block_nbytes + PUT_BLOCK_OVERHEAD) <= max_bytes


def as_block_bytes(block: BlockData) -> memoryview:
    """A flat byte view of one block's data (zero copy for contiguous buffers and tensors)."""
    if type(block).__module__.startswith("torch"):
        from kv_store.tensors import tensor_bytes

        return tensor_bytes(block)
    mv = memoryview(block)
    if not mv.c_contiguous:
        mv = memoryview(bytes(mv))
    return mv.cast("B") if (mv.format != "B" or mv.ndim != 1) else mv


def checked_put(
    layout: KVLayout, hashes: Sequence[BlockHash], blocks: Sequence[BlockData], checksums: Sequence[int]
) -> tuple[tuple[BlockHash, ...], list[memoryview], list[int]]:
    """A put's (hashes, each block's bytes, the given checksums or []), checked: InvalidRequestError
    naming a bad hash, a block count that is not the hashes', a block whose size is not the
    layout's, or a bad checksum list."""
    hashes = check_hashes(hashes)
    if len(blocks) != len(hashes):
        raise InvalidRequestError(f"put_blocks: {len(blocks)} blocks for {len(hashes)} hashes")
    nbytes = layout.block_nbytes
    views = [as_block_bytes(b) for b in blocks]
    for i, v in enumerate(views):
        if v.nbytes != nbytes:
            raise InvalidRequestError(
                f"put_blocks: block {i} has {v.nbytes} bytes, the layout needs {nbytes}"
            )
    return hashes, views, check_checksum_list(checksums, len(hashes), "put_blocks checksums")


def put_header(cache: dict[tuple[KVLayout, float], bytes], layout: KVLayout, lease_ttl_s: float) -> bytes:
    """The serialised PutBlocksRequest header (layout, lease ttl) of a put, made once per (layout,
    ttl) a client puts with and kept in its ``cache`` (#12: not rebuilt per handoff; at most
    :data:`MAX_PUT_HEADERS`)."""
    key = (layout, lease_ttl_s)
    header = cache.get(key)
    if header is None:
        header = kv_store_pb2.PutBlocksRequest(
            layout=convert.layout_to_proto(layout), lease_ttl_s=lease_ttl_s
        ).SerializeToString()
        if len(cache) >= MAX_PUT_HEADERS:  # many ttls: keep the cache bounded
            cache.clear()
        cache[key] = header
    return header


class KVStoreClient:
    """Client of one store node at ``address`` ("host:port"). Thread-safe; reuse it.

    ``timeout_s`` is the deadline of each call (None: no deadline).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float | None = 60.0,
        channel: grpc.Channel | None = None,
        own_channel: bool | None = None,
        cluster_token: str | None = None,
        lease_owner: str = "",
    ):
        """``channel``: use this channel (e.g. a traced one); :meth:`close` closes it only when
        ``own_channel`` is True (default: only a channel the client made itself).
        ``cluster_token``: sent with every call (None: from the environment; "": none).
        ``lease_owner``: whom this client's leases are charged to (default: the node decides,
        by the caller's identity); ``put_blocks``/``lease`` may name another per call."""
        self.address = address
        self.timeout_s = timeout_s
        self._token = cluster_token_from_env() if cluster_token is None else cluster_token
        self.lease_owner = check_owner(lease_owner)
        self._md = token_metadata(self._token, self.lease_owner)
        self._own_channel = channel is None if own_channel is None else own_channel
        self._channel = channel if channel is not None else internal_channel(address)
        self._stub = kv_store_pb2_grpc.KVStoreStub(self._channel)
        # bulk paths: hand-encoded / zero-copy-decoded chunks (kv_store/wire.py), same wire format
        self._put = self._channel.stream_unary(
            "/pdserve.v1.KVStore/Put",
            request_serializer=lambda m: m,
            response_deserializer=kv_store_pb2.PutResponse.FromString,
        )
        self._put_unary = self._channel.unary_unary(
            "/pdserve.v1.KVStore/PutBlocks",
            request_serializer=lambda m: m,
            response_deserializer=kv_store_pb2.PutResponse.FromString,
        )
        self._put_headers: dict[tuple[KVLayout, float], bytes] = {}  # see _put_header
        # False once the node answered PutBlocks with UNIMPLEMENTED (a node of an older
        # version): every Put streams from then on
        self.unary_put = True
        self._get = self._channel.unary_stream(
            "/pdserve.v1.KVStore/Get",
            request_serializer=kv_store_pb2.GetRequest.SerializeToString,
            response_deserializer=decode_get_chunk,
        )

    @property
    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata sent with each small call (cluster token, lease owner), for a
        :class:`kv_store.aio_client.AsyncKVStoreClient` that stands beside this client."""
        return self._md

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel is connected (StoreUnavailableError after ``timeout_s``)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise StoreUnavailableError(
                f"KV store at {self.address} not reachable within {timeout_s}s"
            ) from None

    # ----------------------------------------------------------------- blocks
    def put_blocks(
        self,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        blocks: Sequence[BlockData],
        *,
        lease_ttl_s: float = 0.0,
        owner: str | None = None,
        checksums: Sequence[int] = (),
    ) -> PutResult:
        """Store blocks (idempotent per hash). ``lease_ttl_s > 0`` leases them all in the same call
        (``PutResult.lease_id``), so none can be evicted before the consumer reads them; then, on a
        node with a shared-memory arena, ``PutResult.slots`` (parallel to ``hashes``),
        ``slot_nbytes`` and ``shm_name`` say where the leased blocks are, for zero-rpc same-host
        reads (:meth:`kv_store.transport.ShmTransport.read_leased`) until
        ``lease_expires_at_unix_s``. Each block goes with its checksum (:mod:`kv_store.checksum`);
        ``PutResult.conflicts`` lists blocks whose key the node already held with other bytes
        (write-once: kept). ``owner``: whom the lease is charged to (default: ``lease_owner``).
        ``checksums``: the blocks' checksums when the caller computed them already (the node
        verifies them against the bytes); default: computed here."""
        hashes, views, sums = checked_put(layout, hashes, blocks, checksums)
        nbytes = layout.block_nbytes
        md = self._metadata(owner)
        if self.unary_put and put_blocks_fits(len(hashes), nbytes):
            header = self._put_header(layout, lease_ttl_s)
            msg = encode_put_blocks(header, hashes, sums or [block_checksum(v) for v in views], views)
            try:
                return convert.put_result_from_proto(
                    self._put_unary(msg, timeout=self.timeout_s, metadata=md)
                )
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    self._raise(e)
                log.warning("KV store %s has no PutBlocks (an older node): Puts stream", self.address)
                self.unary_put = False

        def chunks() -> Iterator[bytes]:
            layout_msg = convert.layout_to_proto(layout)
            first = True
            for i, (h, v) in enumerate(zip(hashes, views, strict=True)):
                for off in range(0, nbytes, MAX_CHUNK_BYTES):
                    header = kv_store_pb2.PutChunk()
                    if off == 0:
                        header.block_hash = h
                        header.total_bytes = nbytes
                        header.checksum = sums[i] if sums else block_checksum(v)
                    if first:
                        header.layout.CopyFrom(layout_msg)
                        header.lease_ttl_s = lease_ttl_s
                        first = False
                    yield encode_chunk(header, v[off : off + MAX_CHUNK_BYTES])
            if first:  # no blocks: still send the layout so the node validates it
                yield kv_store_pb2.PutChunk(layout=layout_msg, lease_ttl_s=lease_ttl_s).SerializeToString()

        try:
            resp = self._put(chunks(), timeout=self.timeout_s, metadata=md)
        except grpc.RpcError as e:
            self._raise(e)
        return convert.put_result_from_proto(resp)

    def _put_header(self, layout: KVLayout, lease_ttl_s: float) -> bytes:
        return put_header(self._put_headers, layout, lease_ttl_s)

    def _metadata(self, owner: str | None = None) -> tuple[tuple[str, str], ...]:
        if owner is None or owner == self.lease_owner:
            return self._md
        return token_metadata(self._token, check_owner(owner))

    def iter_chunks(
        self, layout: KVLayout, hashes: Sequence[BlockHash], checksums: Sequence[int] = ()
    ) -> Iterator[tuple[int, int, memoryview]]:
        """Raw Get stream: ``(block_index, offset, data)`` per chunk, in order. ``data`` is a view
        of the received message (valid as long as you keep it).

        Every block is verified once its last chunk was yielded: against the node's stored
        checksum and, when given, ``checksums[i]`` (e.g. the writer's, from a KVHandle). A
        mismatch raises :class:`KVChecksumError` (NOT_FOUND: a miss): discard what the stream
        gave for the call."""
        hashes = check_hashes(hashes)
        want = check_checksum_list(checksums, len(hashes), "Get checksums")
        req = kv_store_pb2.GetRequest(block_hashes=list(hashes), layout=convert.layout_to_proto(layout))
        nbytes = layout.block_nbytes
        offset = expected = 0
        summer: StreamingChecksum | None = None
        stored = 0

        def check(i: int) -> None:
            got = summer.value()  # type: ignore[union-attr]
            for what, c in (
                ("the node's checksum", stored),
                ("the expected checksum", want[i] if want else got),
            ):
                if got != c:
                    raise KVChecksumError(
                        f"KV store {self.address}: block {i} of a Get does not match {what} "
                        f"({got:016x} != {c:016x}); not served"
                    )

        try:
            for chunk in self._get(req, timeout=self.timeout_s, metadata=self._md):
                if chunk.block_hash:
                    if offset not in (0, nbytes) or chunk.block_index != expected:
                        raise InternalError(f"KV store {self.address} sent a malformed Get stream")
                    if chunk.total_bytes != nbytes or chunk.block_hash != hashes[chunk.block_index]:
                        raise InternalError(f"KV store {self.address} sent an unexpected block in Get")
                    if summer is not None:
                        check(expected - 1)
                    summer, stored = StreamingChecksum(), chunk.checksum
                    offset = 0
                    expected += 1
                elif chunk.block_index != expected - 1:
                    raise InternalError(f"KV store {self.address} sent a malformed Get stream")
                if offset + len(chunk.data) > nbytes:
                    raise InternalError(
                        f"KV store {self.address} sent too many bytes for block {chunk.block_index}"
                    )
                summer.update(chunk.data)  # type: ignore[union-attr]
                yield chunk.block_index, offset, chunk.data
                offset += len(chunk.data)
        except grpc.RpcError as e:
            self._raise(e)
        if expected != len(hashes) or (hashes and offset != nbytes):
            raise InternalError(f"KV store {self.address} ended the Get stream early")
        if summer is not None:
            check(expected - 1)

    def get_blocks(
        self, layout: KVLayout, hashes: Sequence[BlockHash], checksums: Sequence[int] = ()
    ) -> list[bytes]:
        """Bytes of each block, in order (RequestNotFoundError if any is not stored,
        KVChecksumError if one fails its checksum: see :meth:`iter_chunks`)."""
        nbytes = layout.block_nbytes
        out: list[bytes] = []
        parts: list[memoryview] = []
        for _, off, data in self.iter_chunks(layout, hashes, checksums):
            parts.append(data)
            if off + len(data) == nbytes:
                out.append(b"".join(parts))  # the one copy out of the received messages
                parts = []
        return out

    def get_blocks_into(
        self,
        layout: KVLayout,
        hashes: Sequence[BlockHash],
        outs: Sequence[Any],
        checksums: Sequence[int] = (),
    ) -> None:
        """Copy each block into the writable buffer ``outs[i]`` (block_nbytes each; one copy).
        On KVChecksumError (see :meth:`iter_chunks`) the buffers' contents are undefined."""
        if len(outs) != len(hashes):
            raise InvalidRequestError(f"get_blocks_into: {len(outs)} buffers for {len(hashes)} hashes")
        dst = [as_block_bytes(o) for o in outs]
        for i, d in enumerate(dst):
            if d.nbytes != layout.block_nbytes or d.readonly:
                raise InvalidRequestError(
                    f"get_blocks_into: buffer {i} must be writable with {layout.block_nbytes} bytes"
                )
        for i, off, data in self.iter_chunks(layout, hashes, checksums):
            dst[i][off : off + len(data)] = data

    def _raise(self, e: grpc.RpcError) -> NoReturn:
        """A failed call as its pdserve error; UNAVAILABLE (the node is down or unreachable) as
        :class:`StoreUnavailableError` naming this node, so that callers up the chain (a worker,
        then the router) blame the store, not the worker that called it."""
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            raise StoreUnavailableError(
                f"KV store {self.address} is unavailable: {e.details() or 'no details'}"
            ) from e
        raise_from_rpc_error(e)

    # ----------------------------------------------------------------- small rpcs
    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._md)
        except grpc.RpcError as e:
            self._raise(e)

    def exists(self, hashes: Sequence[BlockHash]) -> list[bool]:
        resp = self._call(
            self._stub.Exists, kv_store_pb2.ExistsRequest(block_hashes=list(check_hashes(hashes)))
        )
        return list(resp.exists)

    def delete(self, hashes: Sequence[BlockHash]) -> DeleteCounts:
        resp = self._call(
            self._stub.Delete, kv_store_pb2.DeleteRequest(block_hashes=list(check_hashes(hashes)))
        )
        return convert.delete_from_proto(resp)

    def lookup(self, hashes: Sequence[BlockHash]) -> LookupResult:
        resp = self._call(
            self._stub.Lookup, kv_store_pb2.LookupRequest(block_hashes=list(check_hashes(hashes)))
        )
        return convert.lookup_from_proto(resp)

    def lease(
        self,
        hashes: Sequence[BlockHash],
        ttl_s: float = 0.0,
        layout: KVLayout | None = None,
        release_lease_ids: Sequence[str] = (),
        owner: str | None = None,
    ) -> LeaseGrant:
        """Pin stored blocks (all or nothing) and learn their arena slots; ``ttl_s=0``: node default.

        ``release_lease_ids`` are released first, in the same round trip (batched releases).
        ``owner``: whom the lease is charged to (default: ``lease_owner``).
        """
        req = kv_store_pb2.LeaseRequest(
            block_hashes=list(check_hashes(hashes)), ttl_s=ttl_s, release_lease_ids=list(release_lease_ids)
        )
        if layout is not None:
            req.layout.CopyFrom(convert.layout_to_proto(layout))
        if owner is None or owner == self.lease_owner:
            return convert.lease_from_proto(self._call(self._stub.Lease, req))
        try:
            resp = self._stub.Lease(req, timeout=self.timeout_s, metadata=self._metadata(owner))
        except grpc.RpcError as e:
            self._raise(e)
        return convert.lease_from_proto(resp)

    def release(self, lease_id: str, *, shm_read_blocks: int = 0) -> bool:
        """Unpin a lease; False if unknown or expired (idempotent). ``shm_read_blocks``: how many of
        its blocks the caller read from the arena with no rpc (``ShmTransport.read_leased``), so
        the node counts them as shared-memory transfers out."""
        req = kv_store_pb2.ReleaseRequest(lease_id=lease_id, shm_read_blocks=shm_read_blocks)
        return self._call(self._stub.Release, req).released

    def stats(self) -> StoreStats:
        return convert.stats_from_proto(self._call(self._stub.Stats, kv_store_pb2.KVStoreStatsRequest()))


class FollowingStoreClient:
    """A :class:`KVStoreClient` that follows its store node when it moves to a new address.

    A restarted store actor (Ray ``max_restarts``) binds a new port. When a call fails with
    UnavailableError, ``resolve()`` is asked where the node is now; if the address changed, a
    client for it is made with ``connect(address)``, the old one is closed, and the call is retried
    once there (every unary call here is idempotent; a Put of the same blocks is deduplicated).
    Generators (``iter_chunks``) are not retried: a stream broken mid-way raises, the caller
    retries. The restarted node starts empty: blocks it held before are gone (callers see
    RequestNotFoundError and recompute). Thread-safe.
    """

    def __init__(self, resolve: Callable[[], str], connect: Callable[[str], KVStoreClient], address: str):
        self._resolve = resolve
        self._connect = connect
        self._client = connect(address)
        self._lock = threading.Lock()
        self.moves = 0  # how often the node was followed to a new address

    @property
    def address(self) -> str:
        return self._client.address

    def _follow(self, failed: KVStoreClient) -> bool:
        """Point at the node's current address; True when the retry should go to a new client."""
        with self._lock:
            if self._client is not failed:  # another thread already followed it
                return True
            try:
                address = self._resolve()
            except Exception as e:  # the node is still restarting: the caller sees the first error
                log.debug("store address not resolvable: %s", e)
                return False
            if not address or address == failed.address:
                return False
            self._client = self._connect(address)
            self.moves += 1
        log.info("store node moved", extra={"old": failed.address, "new": address})
        failed.close()
        return True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name in ("close", "iter_chunks", "wait_ready"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            client = self._client
            try:
                return getattr(client, name)(*args, **kwargs)
            except UnavailableError:
                if not self._follow(client):
                    raise
            return getattr(self._client, name)(*args, **kwargs)

        return call

    def close(self) -> None:
        self._client.close()
