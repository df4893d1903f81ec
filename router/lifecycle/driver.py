"""Executes one request's lifecycle: feeds worker answers, client departures and migration
results to :class:`~router.lifecycle.machine.RequestLifecycle` as events and carries out the
actions it returns, through the ports of :mod:`router.lifecycle.ports` (asyncio; no gRPC).

:meth:`LifecycleDriver.run` is an async generator of client responses. Contract: it ends with the
request terminal and every resource the lifecycle held released once (the ledger's guarantee,
executed here), whether it finishes, fails (the error is raised after the releases), or is
closed early (the client went away: aclose or task cancellation). Bookkeeping actions of one
event run before its deliveries are yielded; worker calls run after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from pdserve.errors import InternalError
from router.lifecycle import actions as A
from router.lifecycle import events as E
from router.lifecycle.machine import RequestLifecycle
from router.lifecycle.migrator import MigrationAbort, MigrationCommit, MigrationTicket, Migrator
from router.lifecycle.ports import Chunk, ClientGoneError, Cluster, Legs, WorkerLostError
from router.lifecycle.resources import ResourceKind
from router.lifecycle.states import LifecycleError, State
from router.lifecycle.stream_legs import run_streamed

_CALLS = (A.RunPrefill, A.RunStreamed, A.RunDecode, A.RunLocalDecode, A.ReletLease, A.FindReplacement)


class _Gap:
    """Responses for tokens a migration's destination held that no message carried."""

    def __init__(self, responses: list[object]) -> None:
        self.responses = responses


class LifecycleDriver:
    def __init__(
        self, machine: RequestLifecycle, legs: Legs, cluster: Cluster, migrator: Migrator | None = None
    ) -> None:
        self.m = machine
        self.legs = legs
        self.cluster = cluster
        self.migrator = migrator
        self._queue: deque[A.Action] = deque()
        self._error: BaseException | None = None
        self._worker: str | None = None  # whose stream is relayed now
        self._it: AsyncIterator[Chunk] | None = None
        self._pending: asyncio.Future | None = None  # the stream's next chunk, while migrating
        self._migration: asyncio.Future | None = None
        self._ticket: MigrationTicket | None = None

    # ------------------------------------------------------------------ api
    async def run(self, placed: E.Placed) -> AsyncIterator[object]:
        """Serve the request from its first placement ``placed`` to its end (see module doc)."""
        try:
            await self._apply(self.m.handle(placed))
            while self._queue:
                a = self._queue.popleft()
                leg: AsyncIterator[object] | None = None
                if isinstance(a, A.RunPrefill):
                    leg = self._prefill(a)
                elif isinstance(a, A.RunStreamed):  # chunk-wise KV streaming
                    leg = run_streamed(self, a)
                elif isinstance(a, A.RunDecode):
                    leg = self._relay(a.worker_id, self.legs.decode(a.worker_id, a.kv, a.first_index))
                elif isinstance(a, A.RunLocalDecode):
                    leg = self._relay(a.worker_id, self.legs.local_decode(a.worker_id, a.first_index))
                if leg is not None:
                    # closed at once when the client leaves: the worker's call is cancelled first
                    async with contextlib.aclosing(leg) as responses:  # type: ignore[type-var]
                        async for r in responses:
                            yield r
                elif isinstance(a, A.ReletLease):
                    kv = await self.cluster.relet(a.kv)
                    await self._apply(self.m.handle(E.Relet(kv)))
                elif isinstance(a, A.FindReplacement):
                    p, d = await self.cluster.replace(a.prefill, a.decode, a.num_context_tokens, a.excluded)
                    if not self.m.local and p is None:
                        p = self.m.prefill_id
                    await self._apply(self.m.handle(E.Placed(p, d if d is not None else self.m.decode_id)))
            if self._error is not None:
                raise self._error
            if not self.m.terminal:
                raise LifecycleError(
                    f"request {self.m.request_id}: nothing left to do in state {self.m.state.value}"
                )
        except (GeneratorExit, asyncio.CancelledError):
            await self._end(E.Cancelled())
            raise
        except BaseException as e:
            await self._end(E.Failed(e))
            raise
        finally:
            await self._stop_migration()

    def migrate(self, destination: str) -> None:
        """Start moving the decoding request to ``destination`` (a migration policy's call, on the
        driver's event loop). Raises InvalidTransition when it is not decoding, LifecycleError
        when no migrator is configured."""
        if self.migrator is None:
            raise LifecycleError("live migration needs a Migrator: none is configured")
        for a in self.m.handle(E.MigrationRequested(destination)):
            assert isinstance(a, A.StartMigration), a
            self._ticket = MigrationTicket(self.m.request_id, a.source, a.destination, a.from_index)
            self._migration = asyncio.ensure_future(self._migrate(self._ticket))

    # ------------------------------------------------------------------ legs
    async def _prefill(self, a: A.RunPrefill) -> AsyncIterator[object]:
        try:
            ans = await self.legs.prefill(a.worker_id, a.num_output)
        except WorkerLostError as e:
            await self._lost(e)
            return
        for _ in await self._apply(self.m.handle(E.Prefilled(a.worker_id, ans.token, ans.kv, ans.stop))):
            yield ans.response

    async def _relay(self, worker_id: str, stream: AsyncIterator[Chunk]) -> AsyncIterator[object]:
        self._worker, self._it = worker_id, aiter(stream)
        lost: WorkerLostError | None = None
        gone = False
        try:
            while True:
                got = await self._next()
                if got is None:
                    break
                if isinstance(got, _Gap):
                    for r in got.responses:
                        yield r
                    continue
                (d,) = await self._apply(self.m.handle(E.Streamed(self._worker, got.first_index, got.tokens)))
                resp, done = self.legs.render(got, d.skip)
                if done:
                    await self._apply(self.m.handle(E.Finished(self._worker)))
                yield resp
                if done:
                    return
        except WorkerLostError as e:
            lost = e
        except ClientGoneError:
            gone = True
        finally:
            await self._close_stream()  # the worker's call is cancelled before anything else
        if lost is not None:
            await self._lost(lost)
            return
        if self.m.terminal:
            return
        if gone or self.cluster.client_gone():
            await self._end(E.Cancelled())
            return
        raise InternalError(
            f"decode worker {self._worker} ended the stream of request {self.m.request_id} without "
            "finishing it"
        )

    async def _next(self) -> Chunk | _Gap | None:
        """The current stream's next chunk (None at its end); while a migration runs, whichever
        comes first: a chunk, or the migration's result (a commit switches streams)."""
        assert self._it is not None
        if self._migration is None and self._pending is None:
            chunk = await anext(self._it, None)
            if chunk is not None or self._migration is None:
                return chunk
            # a migration started while this waited, and the source then ended its stream for
            # the switch (a direct stream's worker sends little: nothing else may come first)
            await asyncio.wait({self._migration})
        else:
            if self._pending is None:
                self._pending = asyncio.ensure_future(anext(self._it, None))
            waiting = {self._pending} if self._migration is None else {self._pending, self._migration}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if self._pending in done:
                p, self._pending = self._pending, None
                chunk = p.result()
                if chunk is not None or self._migration is None:
                    return chunk
                # the source ended its stream mid-migration (it stopped for the switch): the
                # migration's result says where the request goes on
                await asyncio.wait({self._migration})
        assert self._migration is not None and self._ticket is not None
        result, self._migration = self._migration.result(), None
        if isinstance(result, MigrationAbort):
            await self._apply(self.m.handle(E.MigrationAborted(result.reason)))
            return _Gap([])
        acts = self.m.handle(
            E.MigrationCommitted(self._ticket.destination, result.first_index, result.outputs)
        )
        self._ticket = None
        delivers = await self._apply(acts)  # closes the source's stream
        self._worker, self._it = self.m.decode_id, aiter(result.stream)
        return _Gap([self.legs.render_tokens(d.first_index, d.tokens) for d in delivers])

    async def _migrate(self, ticket: MigrationTicket) -> MigrationCommit | MigrationAbort:
        assert self.migrator is not None
        try:
            return await self.migrator.migrate(ticket)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed migration leaves the request on its source
            await asyncio.shield(self.migrator.abort(ticket))
            return MigrationAbort(f"{type(e).__name__}: {e}")

    # ------------------------------------------------------------------ actions
    async def _apply(self, acts: list[A.Action]) -> list[A.Deliver]:
        """Execute bookkeeping now; queue worker calls; return the deliveries."""
        delivers: list[A.Deliver] = []
        for a in acts:
            if isinstance(a, A.Deliver):
                delivers.append(a)
            elif isinstance(a, A.Release):
                if a.resource.kind is ResourceKind.KV_LEASE:
                    assert a.kv is not None
                    await asyncio.shield(self.cluster.release_lease(a.kv))
                else:
                    self.cluster.release(a)
            elif isinstance(a, A.Acquire):
                self.cluster.acquire(a.resource)
            elif isinstance(a, _CALLS):
                self._queue.append(a)
            elif isinstance(a, A.DropWorker):
                self.cluster.drop(a.worker_id)
            elif isinstance(a, A.QuarantineWorker):
                self.cluster.quarantine(a.lost)
            elif isinstance(a, A.Redispatched):
                self.cluster.redispatched(a)
            elif isinstance(a, A.CloseStream):
                await self._close_stream()
            elif isinstance(a, A.AbortMigration):
                await self._stop_migration()
            elif isinstance(a, A.Fail):
                self._error = a.error
            else:  # StartMigration comes only through migrate()
                raise LifecycleError(f"unexpected action {a!r}")
        return delivers

    async def _lost(self, e: WorkerLostError) -> None:
        await self._apply(self.m.handle(E.Lost(e.lost, client_gone=self.cluster.client_gone())))

    async def _end(self, ev: E.Cancelled | E.Failed) -> None:
        """Make the request terminal with ``ev`` (no-op when it is already)."""
        if not self.m.terminal:
            self._queue.clear()
            await self._apply(self.m.handle(ev))

    async def _close_stream(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        it, self._it = self._it, None
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()

    async def _stop_migration(self) -> None:
        mig, self._migration = self._migration, None
        ticket, self._ticket = self._ticket, None
        if mig is not None:
            mig.cancel()
            with contextlib.suppress(BaseException):
                await mig
        if ticket is not None and self.migrator is not None:
            await asyncio.shield(self.migrator.abort(ticket))

    @property
    def state(self) -> State:
        return self.m.state
