"""The router's :class:`~router.lifecycle.migrator.Migrator` over the decode workers' migration
RPCs (:mod:`router.migration_client`): one :class:`GrpcLegsMigrator` per request, made by the
servicer's migrator factory from the request's :class:`~router.lifecycle.grpc_legs.GrpcLegs`.

Mapping (contracts in ``proto/pdserve/v1/worker.proto``):

* :meth:`GrpcLegsMigrator.migrate` calls ``MigrateOut`` on the source (the workers copy the KV
  between themselves, staged while the request keeps decoding, then a short stop-and-copy).
* ``MIGRATED``: the destination's ``ResumeStream`` is opened from output index
  ``k = min(resume_token_index, tokens the router relayed so far)`` (never past what the client
  has; tokens the destination replays are dropped by index after the lifecycle checked they are
  the same) and returned as :class:`~router.lifecycle.migrator.MigrationCommit` (``k``, its chunks
  through :meth:`GrpcLegs.stream`: progress deadline, heartbeats, router-rendered text).
* Any other result (destination full, source finished / cancelled / preempted, a peer died, a
  refusal), an unknown source or destination, or a failed call: a
  :class:`~router.lifecycle.migrator.MigrationAbort` naming it; the request keeps decoding on its
  source (the workers guarantee nothing stays allocated on the destination).

While a migration runs, the source's Decode stream ending ABORTED ("migrated to ...") is the
switch, not a failure (``GrpcLegs.migrating_from``). Every migration's end is reported once to a
:class:`MigrationListener` (the servicer's book: metrics by reason and result, blocks copied),
and so is the downtime the router sees: the last token relayed from the source to the first new
token from the destination.

A direct request (:class:`~router.lifecycle.direct_legs.DirectLegs`, tokens streamed by the worker
to the client) migrates the same way; its destination's stream is opened by
:meth:`DirectLegs.moved` (through the opener it is given): the client is told to resume
(``DirectRedirect.lost``), its ``ResumeDirect`` tokens join the output, and the destination's
``ResumeStream`` is opened with a direct grant from the client's index: the client gets a new
redirect and streams from the destination (relayed when the destination cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pdserve.errors import ErrorCode, PdserveError
from pdserve.metrics import MIGRATION_REASONS, RouterMetrics
from pdserve.v1 import worker_pb2
from router.lifecycle.grpc_calls import Guarded
from router.lifecycle.migrator import MigrationAbort, MigrationCommit, MigrationTicket
from router.lifecycle.ports import Chunk
from router.migration_client import MigrationReport, MigrationResult
from router.progress import ProgressWatch
from router.registry import WorkerKind

if TYPE_CHECKING:
    from router.lifecycle.grpc_legs import GrpcLegs

# the metrics' result label of each MigrateOut answer (pdserve.metrics.MIGRATION_RESULTS)
RESULT_LABELS: dict[MigrationResult, str] = {
    MigrationResult.MIGRATED: "migrated",
    MigrationResult.ABORTED_DEST_FULL: "dest_full",
    MigrationResult.ABORTED_SOURCE_FINISHED: "source_finished",
    MigrationResult.ABORTED_CANCELLED: "cancelled",
    MigrationResult.ABORTED_PEER_DIED: "peer_died",
    MigrationResult.ABORTED_SOURCE_PREEMPTED: "source_preempted",
    MigrationResult.ABORTED_REFUSED: "refused",
}
UNKNOWN_WORKER = "unknown_worker"  # the source or destination is not a registered decode worker
CALL_ERROR = "error"  # MigrateOut failed with a status (e.g. INVALID_ARGUMENT: not decoding there)
ABANDONED = "abandoned"  # the request ended, or the router gave the migration up, before an answer


@dataclass(frozen=True)
class MigrationOutcome:
    """How one migration ended. ``result``: a label of :data:`pdserve.metrics.MIGRATION_RESULTS`
    ("migrated" when the destination took the request over); ``blocks_copied``: KV blocks the
    workers copied (0 unless migrated); ``message``: why, for an abort."""

    request_id: str
    source: str
    destination: str
    result: str
    blocks_copied: int = 0
    message: str = ""

    @property
    def migrated(self) -> bool:
        return self.result == "migrated"


class MigrationListener(Protocol):
    """Told about every migration's end (exactly once per ticket) and its downtime."""

    def ended(self, outcome: MigrationOutcome) -> None: ...

    def downtime(self, request_id: str, seconds: float) -> None: ...


class MigrationRpcs(Protocol):
    """The I/O seam (:class:`router.migration_client.GrpcMigrator` is the real one): MigrateOut
    on the source by address, and the destination's ResumeStream call (iterable, ``cancel()``)."""

    async def migrate(self, request_id: str, source_address: str, dest_address: str) -> MigrationReport: ...

    def resume(
        self,
        request_id: str,
        dest_address: str,
        start_index: int,
        direct: worker_pb2.ResumeStreamRequest | None = None,
    ) -> AsyncIterator[worker_pb2.DecodeResponse]: ...


class GrpcLegsMigrator:
    """The :class:`~router.lifecycle.migrator.Migrator` of one request (``legs``), over ``rpcs``;
    ``listener`` hears each ticket's end and the downtime (see the module doc). Use from the
    servicer's event loop."""

    def __init__(
        self,
        legs: GrpcLegs,
        rpcs: MigrationRpcs,
        listener: MigrationListener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.legs = legs
        self.rpcs = rpcs
        self.listener = listener
        self.clock = clock
        self._reported: set[MigrationTicket] = set()
        self._unclaimed: dict[MigrationTicket, object] = {}  # resume calls opened, not yet iterated

    # ------------------------------------------------------------------ protocol
    async def migrate(self, ticket: MigrationTicket) -> MigrationCommit | MigrationAbort:
        legs = self.legs
        reg = legs.svc.registry
        src, dst = reg.get(ticket.source), reg.get(ticket.destination)
        for wid, w in ((ticket.source, src), (ticket.destination, dst)):
            if w is None or w.kind is not WorkerKind.DECODE:
                return self._abort(ticket, UNKNOWN_WORKER, f"{wid} is not a registered decode worker")
        assert src is not None and dst is not None
        legs.migrating_from.add(src.worker_id)
        try:
            report = await self.rpcs.migrate(ticket.request_id, src.address, dst.address)
        except asyncio.CancelledError:
            legs.migrating_from.discard(src.worker_id)
            self._report(ticket, ABANDONED, message="the migration was given up before MigrateOut answered")
            raise
        except PdserveError as e:
            legs.migrating_from.discard(src.worker_id)
            return self._abort(ticket, CALL_ERROR, f"MigrateOut on {src.worker_id}: {e}")
        label = RESULT_LABELS[report.result]
        if not report.result.migrated:
            legs.migrating_from.discard(src.worker_id)
            return self._abort(ticket, label, report.message or label)
        # never past what the client has: the lifecycle drops replayed tokens by index
        start = min(report.resume_token_index, len(legs.run.out_ids))
        legs.run.workers[dst.worker_id] = dst
        self._report(ticket, label, report.blocks_copied)

        def open_dest(
            start_index: int,
            direct: worker_pb2.ResumeStreamRequest | None = None,
            watch: ProgressWatch | None = None,
        ) -> _Resumed:
            if direct is None:
                call = self.rpcs.resume(ticket.request_id, dst.address, start_index)
            else:
                call = self.rpcs.resume(ticket.request_id, dst.address, start_index, direct)
            self._unclaimed[ticket] = call
            return _Resumed(self._stream(ticket, call, dst, start_index, watch), call)

        moved = getattr(legs, "moved", None)  # a direct leg: the client resumes first (DirectLegs)
        if moved is not None:
            stream = moved(dst.worker_id, report.resume_token_index, start, open_dest)
            if ticket not in self._unclaimed:  # opened later (after the client's ResumeDirect)
                self._unclaimed[ticket] = _Unopened(lambda: open_dest(start))
            return MigrationCommit(start, stream)
        return MigrationCommit(start, open_dest(start))

    async def abort(self, ticket: MigrationTicket) -> None:
        """Cancel a resume call the lifecycle never took (the request ended meanwhile: the
        destination aborts it and frees its blocks); record a migration that never answered."""
        call = self._unclaimed.pop(ticket, None)
        if call is not None:
            call.cancel()  # type: ignore[attr-defined]
        self._report(ticket, ABANDONED, message="the request ended before the migration did")

    # ------------------------------------------------------------------ helpers
    def _abort(self, ticket: MigrationTicket, label: str, message: str) -> MigrationAbort:
        self._report(ticket, label, message=message)
        return MigrationAbort(f"{label}: {message}")

    def _report(self, ticket: MigrationTicket, label: str, blocks: int = 0, message: str = "") -> None:
        if ticket in self._reported:
            return
        self._reported.add(ticket)
        if self.listener is not None:
            self.listener.ended(
                MigrationOutcome(ticket.request_id, ticket.source, ticket.destination, label, blocks, message)
            )

    async def _stream(
        self, ticket: MigrationTicket, call, dst, start: int, watch: ProgressWatch | None = None
    ) -> AsyncIterator[Chunk]:
        """The destination's chunks (the lifecycle's new leg); the first chunk that brings a
        token the client lacks measures the downtime. Closing it cancels the call. ``watch``:
        its progress deadline (default: a relayed stream's)."""
        self._unclaimed.pop(ticket, None)
        legs, run, svc = self.legs, self.legs.run, self.legs.svc
        legs.migrating_from.discard(ticket.source)  # its stream is closed: the switch is done
        if watch is None:
            watch = ProgressWatch(svc.config.progress, run.predicted_tpot_s)
        guarded = Guarded(call, dst, watch=watch, streamed=svc._streamed_at)
        measured = False
        chunks = legs.stream(guarded, dst, start, worker_text=False)
        try:
            async with contextlib.aclosing(chunks):
                async for c in chunks:
                    if not measured and c.first_index + len(c.tokens) > len(run.out_ids):
                        measured = True
                        if run.token_times and self.listener is not None:
                            last = run.t0 + run.token_times[-1]  # the source's last relayed token
                            self.listener.downtime(ticket.request_id, max(0.0, self.clock() - last))
                    yield c
        finally:
            call.cancel()


_RELEASES: set[asyncio.Task] = set()  # destinations being let go (referenced until done)


async def _release(chunks) -> None:
    """Open and at once close a destination's stream (``chunks``, a :class:`_Resumed`)."""
    with contextlib.suppress(BaseException):
        async with asyncio.timeout(5.0):
            await anext(chunks, None)
    with contextlib.suppress(BaseException):
        await chunks.aclose()


def release_destination(open_stream: Callable[[], AsyncIterator[Chunk]]) -> None:
    """Let a migration's destination go when the request no longer needs it and its stream was
    never opened (a direct leg opens it only after the client's ResumeDirect): its stream is
    opened, relayed, and closed at once, in the background, so that the destination aborts the
    request and frees its blocks now rather than at its attach timeout."""
    task = asyncio.ensure_future(_release(open_stream()))
    _RELEASES.add(task)
    task.add_done_callback(_RELEASES.discard)


class _Unopened:
    """The unclaimed resume call of a commit whose stream opens its call later: cancelling it
    (the lifecycle never took the stream) lets the destination go (:func:`release_destination`)."""

    def __init__(self, open_stream: Callable[[], AsyncIterator[Chunk]]) -> None:
        self._open = open_stream

    def cancel(self) -> None:
        release_destination(self._open)


class _Resumed:
    """The destination's chunk stream handed to the lifecycle: closing it cancels the resume
    call even when it was never iterated (then the generator's own cleanup never runs)."""

    def __init__(self, gen: AsyncIterator[Chunk], call) -> None:
        self._gen = gen
        self._call = call

    def __aiter__(self) -> _Resumed:
        return self

    async def __anext__(self) -> Chunk:
        return await anext(self._gen)

    def cancel(self) -> None:
        """Cancel the call (the destination aborts the request); the stream ends."""
        self._call.cancel()

    async def aclose(self) -> None:
        self._call.cancel()
        await self._gen.aclose()  # type: ignore[attr-defined]


@dataclass
class _InFlight:
    reason: str
    future: asyncio.Future


class MigrationBook:
    """The migrations a router started, by request id (the servicer's
    :class:`MigrationListener`): at most one per request at a time; each ends once, counted in
    ``metrics`` (``pdserve_router_migrations_total{reason,result}``, blocks copied, downtime) and
    resolving the future :meth:`start` returned with its :class:`MigrationOutcome`. Use from the
    servicer's event loop. ``model``: the servicer's model (the metrics' ``model`` label on a
    router serving several)."""

    def __init__(self, metrics: RouterMetrics | None = None, model: str = "") -> None:
        self.metrics = metrics
        self.model = model
        self._inflight: dict[str, _InFlight] = {}

    def start(self, request_id: str, reason: str) -> asyncio.Future:
        """Record a migration of ``request_id`` for ``reason`` (a label of
        :data:`pdserve.metrics.MIGRATION_REASONS`); its future resolves when it ends. Raises
        MigrationInFlightError when one is already running for the request."""
        if request_id in self._inflight:
            raise MigrationInFlightError(f"request {request_id!r} is already being migrated")
        if self.metrics is not None and reason not in MIGRATION_REASONS:
            raise ValueError(f"unknown migration reason {reason!r}; one of {MIGRATION_REASONS}")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[request_id] = _InFlight(reason, fut)
        return fut

    def discard(self, request_id: str) -> None:
        """Forget a migration that did not start (the lifecycle refused it); its future is
        cancelled."""
        e = self._inflight.pop(request_id, None)
        if e is not None and not e.future.done():
            e.future.cancel()

    def request_ended(self, request_id: str) -> None:
        """The request ended: a migration still recorded (its migrator never reported, e.g. a
        test's fake) ends as abandoned."""
        if request_id in self._inflight:
            self.ended(MigrationOutcome(request_id, "", "", ABANDONED, 0, "the request ended"))

    def in_flight(self) -> frozenset[str]:
        return frozenset(self._inflight)

    # ------------------------------------------------------------------ listener
    def ended(self, outcome: MigrationOutcome) -> None:
        e = self._inflight.pop(outcome.request_id, None)
        reason = e.reason if e is not None else "manual"
        if self.metrics is not None:
            self.metrics.observe_migration(reason, outcome.result, outcome.blocks_copied, self.model)
        if e is not None and not e.future.done():
            e.future.set_result(outcome)

    def downtime(self, request_id: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_migration_downtime(seconds, self.model)


class MigrationInFlightError(PdserveError):
    """A second migration of a request while one runs."""

    code = ErrorCode.FAILED_PRECONDITION
