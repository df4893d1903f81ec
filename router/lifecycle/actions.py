"""What the lifecycle asks its driver to do (frozen data; the outputs of
:meth:`router.lifecycle.machine.RequestLifecycle.handle`, executed in order)."""

from __future__ import annotations

from dataclasses import dataclass

from router.failover import LostWorker
from router.lifecycle.events import KVRef
from router.lifecycle.resources import Resource
from router.lifecycle.states import Outcome


@dataclass(frozen=True)
class Acquire:
    """Account ``resource`` as held now (a decode worker's in-flight slot for a leg)."""

    resource: Resource


@dataclass(frozen=True)
class Release:
    """Release ``resource`` (exactly once: the ledger guarantees it). ``outcome``: set when the
    request is terminal (the policy slot is fed back on FINISHED, released otherwise)."""

    resource: Resource
    kv: KVRef | None = None  # the KV of a ``KV_LEASE``
    outcome: Outcome | None = None


@dataclass(frozen=True)
class RunPrefill:
    """Prefill the prompt + ``num_output`` output tokens on ``worker_id``; report
    :class:`~router.lifecycle.events.Prefilled` (or a loss)."""

    worker_id: str
    num_output: int


@dataclass(frozen=True)
class RunStreamed:
    """Chunk-wise KV streaming (:mod:`router.lifecycle.stream_legs`): prefill prompt +
    ``num_output`` output tokens on ``prefill_id`` with its KV streamed, and start the Decode on
    ``decode_id`` at once (it assembles the KV from the prefill worker's stream); report
    :class:`~router.lifecycle.events.Prefilled` (no KV: it went by the stream), then relay the
    decode worker's stream from output index ``num_output + 1``; or a loss of either worker."""

    prefill_id: str
    decode_id: str
    num_output: int


@dataclass(frozen=True)
class RunDecode:
    """Hand ``kv`` to decode worker ``worker_id`` and stream it from output index ``first_index``."""

    worker_id: str
    kv: KVRef
    first_index: int


@dataclass(frozen=True)
class RunLocalDecode:
    """Run prompt + ``first_index`` output tokens on decode worker ``worker_id`` (local prefill)
    and stream from output index ``first_index``."""

    worker_id: str
    first_index: int


@dataclass(frozen=True)
class Deliver:
    """Send output tokens ``first_index``... to the client. ``skip``: leading tokens of the
    worker's message that were already delivered (dropped, not re-sent)."""

    first_index: int
    tokens: tuple[int, ...]
    skip: int = 0


@dataclass(frozen=True)
class DropWorker:
    """The worker is dead: drop it from the registry."""

    worker_id: str


@dataclass(frozen=True)
class QuarantineWorker:
    """The worker stalled (hung, not dead): quarantine it until it answers a probe."""

    lost: LostWorker


@dataclass(frozen=True)
class ReletLease:
    """Put ``kv`` under a fresh lease (the old one released on success); report
    :class:`~router.lifecycle.events.Relet`."""

    kv: KVRef


@dataclass(frozen=True)
class FindReplacement:
    """Choose replacement workers (``prefill``/``decode``: which kinds) for a re-dispatch with
    ``num_context_tokens`` of context, excluding ``excluded``; report
    :class:`~router.lifecycle.events.Placed` (or :class:`~router.lifecycle.events.Failed`)."""

    prefill: bool
    decode: bool
    num_context_tokens: int
    excluded: frozenset[str]


@dataclass(frozen=True)
class Redispatched:
    """A re-dispatch is under way (metric, log line)."""

    lost: LostWorker
    count: int
    produced_tokens: int
    kv_reused: bool
    prefill_id: str | None
    decode_id: str


@dataclass(frozen=True)
class StartMigration:
    """Ask the migrator to move the request from ``source`` to ``destination`` (its KV covers
    ``from_index`` output tokens now; the source keeps decoding meanwhile)."""

    source: str
    destination: str
    from_index: int


@dataclass(frozen=True)
class AbortMigration:
    """Stop the migration to ``destination`` and free what it holds there."""

    source: str
    destination: str


@dataclass(frozen=True)
class CloseStream:
    """Stop reading (cancel) ``worker_id``'s stream: the request moved away from it."""

    worker_id: str


@dataclass(frozen=True)
class Fail:
    """End the request with ``error`` (raised to the client once the releases ran)."""

    error: BaseException


Action = (
    Acquire
    | Release
    | RunPrefill
    | RunStreamed
    | RunDecode
    | RunLocalDecode
    | Deliver
    | DropWorker
    | QuarantineWorker
    | ReletLease
    | FindReplacement
    | Redispatched
    | StartMigration
    | AbortMigration
    | CloseStream
    | Fail
)
