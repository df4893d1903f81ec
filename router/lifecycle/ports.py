"""The small interfaces through which :class:`router.lifecycle.driver.LifecycleDriver` does I/O.
The router's servicer implements them with its gRPC stubs, registry and policy; unit tests with
fakes. No gRPC here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from router.failover import LostWorker
from router.lifecycle.actions import Redispatched, Release
from router.lifecycle.events import KVRef
from router.lifecycle.resources import Resource


class WorkerLostError(Exception):
    """A worker of the current leg is lost (unreachable, stalled, or the KV it was handed is
    gone); raised by a leg, turned into a :class:`~router.lifecycle.events.Lost` event."""

    def __init__(self, lost: LostWorker) -> None:
        super().__init__(lost.describe())
        self.lost = lost


class ClientGoneError(Exception):
    """A leg ended because the client is gone (its call was cancelled under it): the request is
    cancelled, not failed."""


@dataclass(frozen=True)
class PrefillAnswer:
    """A prefill leg's result: the sampled ``token``, its ``kv`` (None when ``stop``), whether the
    token ended the request, and the client ``response`` relaying it (opaque here)."""

    token: int
    kv: KVRef | None
    stop: bool
    response: object


@dataclass(frozen=True)
class Chunk:
    """One decode message: output ``tokens`` from index ``first_index``; ``message`` is the
    worker's message (opaque here)."""

    first_index: int
    tokens: tuple[int, ...]
    message: object = None


class Legs(Protocol):
    """The worker calls of one request and the rendering of its client responses."""

    async def prefill(self, worker_id: str, num_output: int) -> PrefillAnswer:
        """Prefill prompt + the first ``num_output`` output tokens on ``worker_id``. Raises
        :class:`WorkerLostError`, or the request's error."""
        ...

    def decode(self, worker_id: str, kv: KVRef, first_index: int) -> AsyncIterator[Chunk]:
        """Hand ``kv`` to ``worker_id`` and stream. Raises :class:`WorkerLostError` (before or
        during the stream), :class:`ClientGoneError`, or the request's error; the stream is
        cancelled at the worker when the iterator is closed early."""
        ...

    def local_decode(self, worker_id: str, first_index: int) -> AsyncIterator[Chunk]:
        """Run prompt + the first ``first_index`` output tokens on ``worker_id`` and stream."""
        ...

    def render(self, chunk: Chunk, skip: int) -> tuple[object, bool]:
        """The client response for ``chunk`` without its first ``skip`` tokens (already
        delivered), and whether it ends the request (a finish, or a stop string matched)."""
        ...

    def render_tokens(self, first_index: int, tokens: tuple[int, ...]) -> object:
        """A client response for output tokens the router has but no worker message carries
        (a migration's destination held them)."""
        ...


class Cluster(Protocol):
    """The router's view of the workers and its bookkeeping."""

    def acquire(self, resource: Resource) -> None:
        """Account ``resource`` as held (a decode worker's in-flight slot)."""
        ...

    def release(self, release: Release) -> None:
        """Release what ``release`` names (a worker slot, the policy's record, the placement
        reservation): synchronous, so that a leg's own accounting follows with no gap."""
        ...

    async def release_lease(self, kv: KVRef) -> None:
        """Release the store lease of ``kv``; failures are the implementation's to log (a lease
        expires anyway)."""
        ...

    def drop(self, worker_id: str) -> None: ...

    def quarantine(self, lost: LostWorker) -> None: ...

    async def relet(self, kv: KVRef) -> KVRef | None:
        """``kv`` under a fresh lease (its old one released), or None."""
        ...

    async def replace(
        self, prefill: bool, decode: bool, num_context_tokens: int, excluded: frozenset[str]
    ) -> tuple[str | None, str | None]:
        """Replacement (prefill, decode) worker ids for the kinds asked (None for a kind not
        asked). Raises (UnavailableError) when there is none."""
        ...

    def redispatched(self, r: Redispatched) -> None:
        """Count and log a re-dispatch."""
        ...

    def client_gone(self) -> bool:
        """The client is not waiting any more (cancelled, or past its deadline)."""
        ...
