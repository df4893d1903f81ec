"""The seam for live migration between decode workers (Llumnix): what the router's lifecycle
needs from whoever moves a running request's KV (the decode workers' migration RPCs).

The lifecycle (:mod:`router.lifecycle.machine`) models a migration as DECODING → MIGRATING →
DECODING: while the KV is copied, the source keeps decoding and its tokens keep reaching the
client; at the switch the destination reports the output tokens its KV covers, the router
delivers any the source's stream had not brought yet, drops the ones the destination streams
again (by token index: no gap, no duplicate) and closes the source's stream. An aborted
migration leaves the request decoding on its source.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from router.lifecycle.ports import Chunk


@dataclass(frozen=True)
class MigrationTicket:
    """One migration: request ``request_id`` from decode worker ``source`` to ``destination``;
    ``from_index``: output tokens the client had when it started (the source's KV covers at
    least those)."""

    request_id: str
    source: str
    destination: str
    from_index: int


@dataclass(frozen=True)
class MigrationCommit:
    """The destination took the request over. ``stream``: its stream of chunks, whose first
    chunk starts at output index ``first_index`` (at most the tokens known at the switch; it may
    replay tokens the client already has: they are dropped by index, after a check that they
    are the same). ``outputs``: output tokens ``0..len(outputs)-1`` the destination holds, when
    the migrator knows them (then ``first_index`` may pass what the source's stream brought:
    the missing tokens are delivered from ``outputs``). With the decode workers' RPCs: the
    source's ``MigrateOut`` answers MIGRATED with ``resume_token_index``; ``ResumeStream`` on the
    destination from ``ticket.from_index`` (never past what the client has) gives the stream."""

    first_index: int
    stream: AsyncIterator[Chunk]
    outputs: tuple[int, ...] = ()


@dataclass(frozen=True)
class MigrationAbort:
    """The migration did not happen; the source still runs the request. ``reason`` names why
    (destination out of blocks, destination lost, source trouble)."""

    reason: str


@runtime_checkable
class Migrator(Protocol):
    """Moves a running request's KV from one decode worker to another.

    Contract: :meth:`migrate` copies while the source keeps decoding (staged copies, then a
    short stop-and-copy) and returns :class:`MigrationCommit` once the destination has resumed
    the request, or :class:`MigrationAbort` (having freed what it took on the destination);
    it must not leave the request stopped on both workers. :meth:`abort` stops a migration in
    flight (the request finished, was cancelled, or its source was lost): it frees the
    destination's blocks and leases; calling it after :meth:`migrate` returned is a no-op.
    """

    async def migrate(self, ticket: MigrationTicket) -> MigrationCommit | MigrationAbort: ...

    async def abort(self, ticket: MigrationTicket) -> None: ...
