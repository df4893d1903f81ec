"""What happens to a request: the inputs of :class:`router.lifecycle.machine.RequestLifecycle`
(frozen data; built by the driver from worker answers, the client and the migrator)."""

from __future__ import annotations

from dataclasses import dataclass, field

from router.failover import LostWorker


@dataclass(frozen=True)
class KVRef:
    """A handed-off KV cache as the lifecycle sees it: the store lease pinning it (``lease_id``
    empty: none to release) and the driver's own handle (opaque here; a ``KVHandle`` proto)."""

    lease_id: str
    handle: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Placed:
    """The request's workers for its next leg: the first placement, or a re-dispatch's
    replacements (``prefill_id`` None: a local-prefill leg, or no prefill needed)."""

    prefill_id: str | None
    decode_id: str


@dataclass(frozen=True)
class Prefilled:
    """The prefill worker answered: the ``token`` it sampled (the next output token), the KV it
    published (None: nothing to hand off) and whether that token ended the request."""

    worker_id: str
    token: int
    kv: KVRef | None
    stop: bool


@dataclass(frozen=True)
class Streamed:
    """A decode worker's message: ``tokens`` are output tokens ``first_index``, ``first_index``
    + 1, ... (the index counts from the request's first output token)."""

    worker_id: str
    first_index: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The streaming decode worker ended the request (its last tokens were :class:`Streamed`)."""

    worker_id: str


@dataclass(frozen=True)
class Lost:
    """A worker of the current leg is lost (dead, stalled, or its KV was gone); ``client_gone``:
    the client is not waiting any more (nothing is re-dispatched then)."""

    lost: LostWorker
    client_gone: bool = False


@dataclass(frozen=True)
class Relet:
    """The result of a :class:`~router.lifecycle.actions.ReletLease`: the same KV under a fresh
    lease (its old lease released by whoever re-let it), or None (the store lost it)."""

    kv: KVRef | None


@dataclass(frozen=True)
class Cancelled:
    """The client went away or its deadline passed."""

    reason: str = "client"


@dataclass(frozen=True)
class Failed:
    """A failure no re-dispatch can cure (a refused request, a store failure, no replacement)."""

    error: BaseException


@dataclass(frozen=True)
class MigrationRequested:
    """Move the decoding request to decode worker ``destination`` (a migration policy's call)."""

    destination: str


@dataclass(frozen=True)
class MigrationCommitted:
    """The destination resumed the request: its stream's first token has output index
    ``first_index`` (it may replay tokens the client has: they are dropped by index);
    ``outputs``, when given, are output tokens ``0..len(outputs)-1`` the destination holds (any
    the source's stream had not brought yet are delivered from them). ``first_index`` must not
    pass the tokens known then (else tokens would be lost)."""

    destination: str
    first_index: int
    outputs: tuple[int, ...] = ()


@dataclass(frozen=True)
class MigrationAborted:
    """The migration stopped before its switch (destination out of blocks or lost, source
    trouble): the request keeps decoding on its source."""

    reason: str


Event = (
    Placed
    | Prefilled
    | Streamed
    | Finished
    | Lost
    | Relet
    | Cancelled
    | Failed
    | MigrationRequested
    | MigrationCommitted
    | MigrationAborted
)
