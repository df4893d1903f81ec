"""The KV store's small calls on ``grpc.aio`` (I/O seam): for a caller on an event loop, so a
call costs no thread hop (#12: a decode worker admits a handoff on its event loop and releases
the producer's lease from there).

Same contracts as :class:`kv_store.client.KVStoreClient`'s methods of the same name: the same
metadata (cluster token, lease owner; the bound request id), the same deadline, and a node that
is down or unreachable raised as :class:`pdserve.errors.StoreUnavailableError` naming it. A
client is bound to the event loop it was first used on (a ``grpc.aio`` channel is).

Releases issued close together are sent together (#12: one rpc per handoff was the store's and
the decode worker's per-request cost): :meth:`AsyncKVStoreClient.release` queues its lease, and
the releases queued within ``window_s`` of the first one (or until ``max_batch`` are queued,
whichever comes first) go in one ``ReleaseBatch`` call (one alone as a plain ``Release``), each
caller awaiting its own answer. A window of 0 sends what one turn of the event loop queued.
:meth:`AsyncKVStoreClient.flush` sends what is queued now (a caller that needs its answer at
once). So a release waits at most the window before it is sent; callers that do not wait on it
(the decode worker admits the request meanwhile, :mod:`decode_worker.loop_admission`) pay
nothing for it. Every queued release is sent, also when its caller is cancelled meanwhile
(nothing leaks). A node that does not serve ``ReleaseBatch`` (UNIMPLEMENTED: an older store) gets
one Release per lease from then on.

:meth:`AsyncKVStoreClient.put_blocks` is the sync client's one-message put (``PutBlocks``, blocks
that fit one message: :func:`kv_store.client.put_blocks_fits`) on the event loop: a prefill
worker publishes its handoff from its event loop (#12, :mod:`prefill_worker.aio_service`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import NoReturn

import grpc

from kv_store import convert
from kv_store.auth import LEASE_OWNER_METADATA_KEY, check_owner
from kv_store.checksum import block_checksum
from kv_store.client import checked_put, put_blocks_fits, put_header
from kv_store.layout import KVLayout
from kv_store.store import PutResult
from kv_store.wire import encode_put_blocks
from pdserve.errors import InternalError, InvalidRequestError, StoreUnavailableError
from pdserve.limits import grpc_options
from pdserve.security import TOKEN_METADATA_KEY, current
from pdserve.status import raise_from_rpc_error
from pdserve.tracing import METADATA_KEY, current_request_id
from pdserve.v1 import kv_store_pb2, kv_store_pb2_grpc

MAX_BATCH = 256  # releases per ReleaseBatch call at most (more queued together: several calls)
# releases queued within this long of the first are sent together. Measured (README #12, bench/
# serving_efficiency.py --modes direct --max-tokens 32, 64 streams, ~100 handoffs/s, load ~12):
# releases per rpc 1.16 at 1 ms, 1.7-2.3 at 4 ms, 2.6 at 8 ms, 3.8 at 16 ms. The window costs
# no request time (the decode worker does not wait on it: decode_worker/loop_admission.py), only
# as long again of the producer's pin on its blocks.
RELEASE_WINDOW_S = 0.008
RELEASE_MAX_BATCH = 32  # ... or as soon as this many are queued


def aio_store_channel(address: str) -> grpc.aio.Channel:
    """:func:`pdserve.security.internal_channel` for ``grpc.aio`` (TLS and this process's client
    certificate when TLS is on; the token goes in each call's metadata, not an interceptor)."""
    cfg = current()
    cfg.check_decided(f"refusing to open an internal channel to {address}")
    opts = [*grpc_options(), *cfg.channel_options()]
    if cfg.tls_on:
        return grpc.aio.secure_channel(address, cfg.channel_credentials(), options=opts)
    return grpc.aio.insecure_channel(address, options=opts)


class AsyncKVStoreClient:
    """``grpc.aio`` client of one store node at ``address``. ``metadata``: sent with every call
    (:attr:`kv_store.client.KVStoreClient.call_metadata` of the sync client it stands beside), with
    the security configuration's cluster token added when it names none (as
    :func:`pdserve.security.internal_channel` adds it);
    ``timeout_s``: each call's deadline (None: none); ``window_s`` (>= 0) and ``max_batch``
    (1..:data:`MAX_BATCH`): how long a release waits for others to go with it, and how many
    go at most in one call (module doc)."""

    def __init__(
        self,
        address: str,
        metadata: tuple[tuple[str, str], ...] = (),
        timeout_s: float | None = 60.0,
        window_s: float = RELEASE_WINDOW_S,
        max_batch: int = RELEASE_MAX_BATCH,
    ) -> None:
        if not window_s >= 0:
            raise ValueError(f"window_s must be >= 0 seconds, got {window_s}")
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be in 1..{MAX_BATCH} releases, got {max_batch}")
        self.address = address
        self.timeout_s = timeout_s
        self.window_s = window_s
        self.max_batch = max_batch
        md = tuple(metadata)
        token = current().cluster_token  # the sync channel's interceptor sends it on every call
        if token and not any(k == TOKEN_METADATA_KEY for k, _ in md):
            md = ((TOKEN_METADATA_KEY, token), *md)
        self._md = md
        self._channel = aio_store_channel(address)
        self._stub = kv_store_pb2_grpc.KVStoreStub(self._channel)
        # releases queued in this window, with their callers' futures (module doc)
        self._queued: list[tuple[kv_store_pb2.ReleaseBatchItem, asyncio.Future[bool]]] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None  # sends the window's releases
        self._batches = True  # False once the node answered ReleaseBatch UNIMPLEMENTED
        self._sending: set[asyncio.Task[None]] = set()
        self.release_calls = 0  # Release and ReleaseBatch calls made (tests, benches)
        self._put_unary = self._channel.unary_unary(
            "/pdserve.v1.KVStore/PutBlocks",
            request_serializer=lambda m: m,
            response_deserializer=kv_store_pb2.PutResponse.FromString,
        )
        self._put_headers: dict[tuple[KVLayout, float], bytes] = {}  # per (layout, ttl): put_header

    def _metadata(self, rid: str | None = None) -> tuple[tuple[str, str], ...]:
        rid = current_request_id() if rid is None else rid
        return (*self._md, (METADATA_KEY, rid)) if rid else self._md

    def _raise(self, e: grpc.RpcError) -> NoReturn:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            raise StoreUnavailableError(
                f"KV store {self.address} is unavailable: {e.details() or 'no details'}"
            ) from e
        raise_from_rpc_error(e)

    async def put_blocks(
        self,
        layout: KVLayout,
        hashes: Sequence[bytes],
        blocks: Sequence[object],
        checksums: Sequence[int] = (),
        *,
        lease_ttl_s: float = 0.0,
        owner: str | None = None,
    ) -> PutResult | None:
        """:meth:`kv_store.client.KVStoreClient.put_blocks` in one ``PutBlocks`` message: the same
        result and lease, the same checks of the hashes, sizes and checksums. ``checksums``: each
        block's (computed here when empty); ``owner``: whom the lease is charged to (None: this
        client's metadata's owner). Blocks that do not fit one message
        (:func:`kv_store.client.put_blocks_fits`) are refused with InvalidRequestError (the caller
        streams them with the sync client). None when the node has no ``PutBlocks`` (an older
        node answers UNIMPLEMENTED): the caller streams instead."""
        hashes, views, sums = checked_put(layout, hashes, blocks, checksums)  # type: ignore[arg-type]
        nbytes = layout.block_nbytes
        if not put_blocks_fits(len(hashes), nbytes):
            raise InvalidRequestError(
                f"put_blocks: {len(hashes)} blocks of {nbytes} bytes do not fit one PutBlocks message"
            )
        msg = encode_put_blocks(
            put_header(self._put_headers, layout, lease_ttl_s),
            hashes,
            sums or [block_checksum(v) for v in views],
            views,
        )
        md = self._metadata()
        if owner is not None:  # as the sync client: this owner's key in place of the client's
            md = tuple(kv for kv in md if kv[0] != LEASE_OWNER_METADATA_KEY)
            if owner:
                md = (*md, (LEASE_OWNER_METADATA_KEY, check_owner(owner)))
        try:
            resp = await self._put_unary(msg, timeout=self.timeout_s, metadata=md)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None
            self._raise(e)
        return convert.put_result_from_proto(resp)

    async def release(self, lease_id: str, *, shm_read_blocks: int = 0) -> bool:
        """As :meth:`kv_store.client.KVStoreClient.release`: unpin a lease; False if unknown or
        expired (idempotent); ``shm_read_blocks`` read from the arena with no rpc. Sent with the
        other releases of its window (module doc); sent even when the caller is cancelled
        meanwhile."""
        req = kv_store_pb2.ReleaseRequest(lease_id=lease_id, shm_read_blocks=shm_read_blocks)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._queued.append(
            (kv_store_pb2.ReleaseBatchItem(release=req, request_id=current_request_id()), fut)
        )
        if len(self._queued) >= self.max_batch:
            self.flush()
        elif self._timer is None:
            if self.window_s > 0:
                self._timer = loop.call_later(self.window_s, self.flush)
            else:
                self._timer = loop.call_soon(self.flush)
        return await fut

    def flush(self) -> None:
        """Send the queued releases now (on the client's event loop; a task per call, the callers'
        futures answered when it answers). Nothing queued: nothing happens."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queued = self._queued, []
        for i in range(0, len(queued), self.max_batch):
            t = asyncio.get_running_loop().create_task(self._send(queued[i : i + self.max_batch]))
            self._sending.add(t)
            t.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[kv_store_pb2.ReleaseBatchItem, asyncio.Future[bool]]]) -> None:
        try:
            if len(batch) > 1 and self._batches:
                try:
                    self.release_calls += 1
                    resp = await self._stub.ReleaseBatch(
                        kv_store_pb2.ReleaseBatchRequest(items=[item for item, _ in batch]),
                        timeout=self.timeout_s,
                        metadata=self._md,
                    )
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        for _, fut in batch:
                            self._fail(fut, e)
                        return
                    self._batches = False  # an older node: one Release per lease from now on
                else:
                    if len(resp.released) != len(batch):
                        raise InternalError(
                            f"KV store {self.address} answered {len(resp.released)} of {len(batch)} "
                            "releases in one ReleaseBatch"
                        )
                    for (_, fut), released in zip(batch, resp.released, strict=True):
                        if not fut.done():
                            fut.set_result(released)
                    return
            await asyncio.gather(*(self._send_one(item, fut) for item, fut in batch))
        except BaseException as e:  # the loop is closing, or a broken answer: no caller waits forever
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(
                        e
                        if isinstance(e, Exception)
                        else StoreUnavailableError(
                            f"KV store {self.address}: the release was interrupted ({type(e).__name__})"
                        )
                    )
            if not isinstance(e, Exception):
                raise

    async def _send_one(self, item: kv_store_pb2.ReleaseBatchItem, fut: asyncio.Future[bool]) -> None:
        self.release_calls += 1
        try:
            resp = await self._stub.Release(
                item.release, timeout=self.timeout_s, metadata=self._metadata(item.request_id)
            )
        except grpc.RpcError as e:
            self._fail(fut, e)
        else:
            if not fut.done():
                fut.set_result(resp.released)

    def _fail(self, fut: asyncio.Future[bool], e: grpc.RpcError) -> None:
        """``fut`` fails as the call's error would have raised (one exception object per caller)."""
        if fut.done():
            return
        try:
            self._raise(e)
        except Exception as x:  # noqa: BLE001 - handed to the caller
            fut.set_exception(x)

    async def close(self) -> None:
        """Send what is queued, wait for the releases in flight, then close the channel. On
        another loop than the client's (its own has stopped: nothing there waits any more), the
        channel is closed and what was queued or in flight there is left (its leases expire)."""
        loop = asyncio.get_running_loop()
        if self._queued and self._queued[0][1].get_loop() is loop:
            self.flush()
        mine = [t for t in self._sending if t.get_loop() is loop]
        if mine:
            await asyncio.gather(*mine, return_exceptions=True)
        await self._channel.close()
