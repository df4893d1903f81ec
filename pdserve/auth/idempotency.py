"""Client request ids as idempotency keys, scoped by tenant (pure).

The cluster names every request with an id of its own (:meth:`IdempotencyTable.begin` returns
it); workers, logs and the KV store only ever see that id, so two clients, or two tenants,
sending the same ``request_id`` can never be confused downstream. The client's id is a key in
this table under its tenant: while a request with that (tenant, id) is in flight, another one is
refused with ALREADY_EXISTS, without touching the running request and without saying anything
about it (no output, no cluster id). Once it finished (:meth:`Ticket.finish`, however it ended)
the id may be used again, as a new request. Requests without a client id are never refused.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Hashable

from pdserve.errors import AlreadyExistsError


def new_cluster_id() -> str:
    """A cluster request id (random, 32 hex digits)."""
    return uuid.uuid4().hex


def id_in_use(client_id: str) -> AlreadyExistsError:
    """The refusal of a client id its tenant has in flight (says nothing about that request)."""
    return AlreadyExistsError(
        f"request_id {client_id!r} is already in use by a request of yours that is still running; "
        "use a new id, or retry once that request has finished"
    )


class Ticket:
    """A running request's claim on its (tenant, client id); :meth:`finish` releases it once."""

    def __init__(self, table: IdempotencyTable | None, key: Hashable | None, cluster_id: str) -> None:
        self._table = table
        self._key = key
        self.cluster_id = cluster_id

    def finish(self) -> None:
        if self._table is not None and self._key is not None:
            table, self._table = self._table, None
            table._finish(self._key, self.cluster_id)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class IdempotencyTable:
    """In-flight (tenant, client id) -> cluster id, in this process's memory (one router; several
    routers share claims through Redis: :class:`pdserve.auth.shared_state.SharedIdempotency`).
    Thread-safe."""

    def __init__(self, make_id: Callable[[], str] = new_cluster_id) -> None:
        self._make_id = make_id
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, str] = {}

    def begin(self, tenant: str, client_id: str) -> Ticket:
        """Claim ``client_id`` for ``tenant`` and name the request. Raises AlreadyExistsError when
        the same tenant has a request with that id in flight."""
        cid = self._make_id()
        if not client_id:
            return Ticket(None, None, cid)
        key = (tenant, client_id)
        with self._lock:
            if key in self._inflight:
                raise id_in_use(client_id)
            self._inflight[key] = cid
        return Ticket(self, key, cid)

    async def begin_async(self, tenant: str, client_id: str) -> Ticket:
        """:meth:`begin` for an event loop. In memory it never waits; a shared table
        (:class:`pdserve.auth.shared_state.SharedIdempotency`) may wait, without blocking the
        loop, for a claim held by another router that may have died."""
        return self.begin(tenant, client_id)

    def _finish(self, key: Hashable, cluster_id: str) -> None:
        with self._lock:
            if self._inflight.get(key) == cluster_id:
                del self._inflight[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._inflight)
