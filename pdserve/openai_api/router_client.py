"""The router client of the HTTP front end: the asyncio SDK (:class:`pdserve.client.AsyncClient`).

:class:`RouterClient` is the surface :mod:`pdserve.openai_api.server` calls (``health``,
``list_models``, ``generate(..., metadata=...)``, ``close``), all coroutines / async iterators on
the server's event loop: a waiting request holds no thread. :func:`open_router_client` builds one
for the configured router address(es); it must be called on the loop that will use it (a
``grpc.aio`` channel belongs to the loop it was made on).

``AsyncClient`` of this tree has no ``list_models`` and no per-call ``metadata`` (the forwarded
``Authorization`` of an HTTP request); :class:`_AsyncRouterClient` adds both with the SDK's own
request builder and error mapping, and is used only while ``AsyncClient`` lacks them.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc

from engine.sampling_params import SamplingParams
from pdserve import client as sdk
from pdserve.client import AsyncClient, Chunk, ServingStatus
from pdserve.status import raise_from_rpc_error
from pdserve.v1 import client_pb2


class RouterClient(Protocol):
    """What the HTTP server needs from the router (test doubles implement just this)."""

    async def health(self) -> ServingStatus: ...

    async def list_models(self) -> list[str]: ...

    def generate(
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **kw: Any,
    ) -> AsyncIterator[Chunk]: ...

    async def close(self) -> None: ...


def _sdk_is_complete() -> bool:
    """Whether ``AsyncClient`` itself has ``list_models`` and ``generate(metadata=...)``."""
    return (
        hasattr(AsyncClient, "list_models")
        and "metadata" in inspect.signature(AsyncClient.generate).parameters
    )


class _AsyncRouterClient(AsyncClient):
    """``AsyncClient`` plus ``list_models`` and a per-call ``metadata`` on ``generate`` (which then
    replaces the client's own ``authorization``, as ``Client.generate(metadata=...)`` does)."""

    async def list_models(self) -> list[str]:
        try:
            resp = await self._stub.ListModels(
                client_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._md
            )
        except grpc.RpcError as e:
            raise_from_rpc_error(e)
        return [m.id for m in resp.models]

    async def generate(  # type: ignore[override]
        self,
        prompt: Any,
        params: SamplingParams | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **kw: Any,
    ) -> AsyncIterator[Chunk]:
        req = sdk.build_request(prompt, params, **kw)
        call = self._stub.Generate(
            req,
            timeout=timeout if timeout is not None else self.timeout,
            metadata=sdk._merge_md(self._md, metadata),
        )
        try:
            async for m in call:
                yield sdk._chunk(m)
        except grpc.RpcError as e:
            raise_from_rpc_error(e)
        finally:
            call.cancel()  # a no-op once the call has ended; frees the request when it has not


def open_router_client(routers: Sequence[str], **options: Any) -> RouterClient:
    """An asyncio client of ``routers`` (one address, or several that the SDK fails over
    between); ``options``: AsyncClient's keywords (``tls``, ``ca``, ``cert``, ``key``,
    ``server_name``, ``api_key``, ``timeout``). Call on the event loop that will use it."""
    if not routers:
        raise ValueError("no router address")
    target: Any = routers[0] if len(routers) == 1 else list(routers)
    cls = AsyncClient if _sdk_is_complete() else _AsyncRouterClient
    return cls(target, **options)  # type: ignore[return-value]
