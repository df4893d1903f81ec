"""The router client of the HTTP front end: the asyncio SDK (:class:`pdserve.client.AsyncClient`).

:class:`RouterClient` is the surface :mod:`pdserve.openai_api.server` calls (``health``,
``list_models``, ``generate(..., metadata=...)``, ``close``), all coroutines / async iterators on
the server's event loop: a waiting request holds no thread. :func:`open_router_client` builds one
for the configured router address(es), which the SDK fails over between; it must be called on the
loop that will use it (a ``grpc.aio`` channel belongs to the loop it was made on).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from engine.sampling_params import SamplingParams
from pdserve.client import AsyncClient, Chunk, ServingStatus


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


def open_router_client(routers: Sequence[str], **options: Any) -> RouterClient:
    """An :class:`AsyncClient` of ``routers`` (one address, or several it fails over between);
    ``options``: its keywords (``tls``, ``ca``, ``cert``, ``key``, ``server_name``, ``api_key``,
    ``timeout``). Call on the event loop that will use it."""
    if not routers:
        raise ValueError("no router address")
    return AsyncClient(list(routers), **options)
