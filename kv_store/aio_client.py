"""The KV store's small calls on ``grpc.aio`` (I/O seam): for a caller on an event loop, so a
call costs no thread hop (#12: a decode worker admits a handoff on its event loop and releases
the producer's lease from there).

Same contracts as :class:`kv_store.client.KVStoreClient`'s methods of the same name: the same
metadata (cluster token, lease owner; the bound request id), the same deadline, and a node that
is down or unreachable raised as :class:`pdserve.errors.StoreUnavailableError` naming it. A
client is bound to the event loop it was first used on (a ``grpc.aio`` channel is).
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from pdserve.errors import StoreUnavailableError
from pdserve.limits import grpc_options
from pdserve.security import TOKEN_METADATA_KEY, current
from pdserve.status import raise_from_rpc_error
from pdserve.tracing import METADATA_KEY, current_request_id
from pdserve.v1 import kv_store_pb2, kv_store_pb2_grpc


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
    ``timeout_s``: each call's deadline (None: none)."""

    def __init__(
        self, address: str, metadata: tuple[tuple[str, str], ...] = (), timeout_s: float | None = 60.0
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        md = tuple(metadata)
        token = current().cluster_token  # the sync channel's interceptor sends it on every call
        if token and not any(k == TOKEN_METADATA_KEY for k, _ in md):
            md = ((TOKEN_METADATA_KEY, token), *md)
        self._md = md
        self._channel = aio_store_channel(address)
        self._stub = kv_store_pb2_grpc.KVStoreStub(self._channel)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        rid = current_request_id()
        return (*self._md, (METADATA_KEY, rid)) if rid else self._md

    def _raise(self, e: grpc.RpcError) -> NoReturn:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            raise StoreUnavailableError(
                f"KV store {self.address} is unavailable: {e.details() or 'no details'}"
            ) from e
        raise_from_rpc_error(e)

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout_s, metadata=self._metadata())
        except grpc.RpcError as e:
            self._raise(e)

    async def release(self, lease_id: str, *, shm_read_blocks: int = 0) -> bool:
        """As :meth:`kv_store.client.KVStoreClient.release`: unpin a lease; False if unknown or
        expired (idempotent); ``shm_read_blocks`` read from the arena with no rpc."""
        req = kv_store_pb2.ReleaseRequest(lease_id=lease_id, shm_read_blocks=shm_read_blocks)
        return (await self._call(self._stub.Release, req)).released

    async def close(self) -> None:
        await self._channel.close()
