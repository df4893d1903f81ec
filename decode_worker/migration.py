"""Live migration between decode workers (Llumnix; the engine side is
:mod:`engine.migration`, the RPC contracts are in ``proto/pdserve/v1/worker.proto``).

Push model: the router calls ``MigrateOut`` on the source; the source opens ``MigrateIn`` on the
destination (a bidirectional stream, worker to worker) and drives the stages:

1. ``begin`` (request, sampling, seed, layout), then stage 1: every full KV block filled so far,
   copied on the source's engine thread between two steps (the request keeps decoding), sent in
   chunks of at most :data:`CHUNK_BYTES`; the destination allocates and writes each chunk and
   acks the stage.
2. Stages 2..n (``max_stages``): the full blocks filled meanwhile, while more than
   ``stop_blocks`` are pending.
3. Stop-and-copy: the source pauses the request (out of its batch, blocks kept), sends the last
   blocks (the partial one included) and the token state (``final``); the destination inserts
   the request as running and acks; the source then retires its copy and ends the request's
   Decode stream with ABORTED "migrated to ..." (:class:`RequestMigratedError`).
4. The router opens the destination's ``ResumeStream(request_id, start_index=k)``: tokens from
   output index ``k`` on (those generated on the source replayed from the migrated state), so the
   client's stream goes on with no gap and no duplicate. Until it is opened the destination
   buffers the request's outputs; a stream not opened within ``attach_timeout_s`` is aborted
   (nothing leaks when the router is gone).

Aborts: the destination full (RESOURCE_EXHAUSTED), refusing (wrong model/layout/id), dying or
timing out, the request finishing / being cancelled / preempted on the source, or the
``MigrateOut`` call being cancelled: the destination frees what it allocated (its MigrateIn ends
with an error or a broken stream), the source resumes the request if it still runs, and
``MigrateOut`` answers the matching :class:`MigrationResult`. If the final ack is lost after the
destination inserted the request, the source keeps its copy (the result says PEER_DIED) and the
destination's copy is aborted when nobody opens its stream (``attach_timeout_s``).

Transports (``MigrateOutRequest.transport``; :mod:`decode_worker.migration_transport`): GRPC
(default), the KV bytes in the MigrateIn messages, direct between the two workers (any hosts);
STORE, each stage put on the source's KV store node under a lease, the MigrateIn message carrying
the handle, the destination pulling it with its KV puller (shared memory on the node's host, gRPC
otherwise) and releasing the lease; DIST, each stage kept in the source's direct-transfer outbox,
the destination pulling it over the workers' torch.distributed process group (gloo on CPU, NCCL
on GPU) through the source's ``KVPeer`` service. What the destination never took is released by
the source on abort (a lease, an outbox entry), else expires with its TTL. A source needs a store
publisher for STORE (``DecodeMigration.publisher``) and a process group for DIST
(``DecodeMigration.dist_publisher``), set by the worker that has them; else the transport is
refused naming it. Every transport moves stages in the whole model's KV layout (a
tensor-parallel source gathers its ranks' heads as it copies a stage, a tensor-parallel
destination splits them as it writes it), so workers of any TP sizes migrate to each other over
any transport, DIST included (2 -> 1, 1 -> 2, 2 -> 2 over real gloo:
tests/integration/test_migration_gloo_tp.py).

Module layout: this module holds the RPC entry points and the destination side;
:mod:`decode_worker.migration_out` the source side (one ``MigrateOut``);
:mod:`decode_worker.migration_transport` how stages travel; :mod:`decode_worker.migration_wire`
the message conversions and results.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc

from decode_worker.messages import decode_message
from decode_worker.migration_out import _OutRun
from decode_worker.migration_wire import (
    CHUNK_BYTES,
    MigrationResult,
    RequestMigratedError,
    StreamTakenError,
    final_from_proto,
    header_from_proto,
    header_to_proto,
    result_for_rpc_error,
    stage_chunks,
    stage_from_proto,
)
from decode_worker.puller import KVPuller
from engine.engine_loop import OutputItem
from engine.llm_engine import LLMEngine
from engine.migration import FinalState, KVStage, MigrationExport, MigrationImport
from engine.model_runner import KVShape
from engine.outputs import TokenLogprob
from kv_store.convert import handle_from_proto
from pdserve.errors import InvalidRequestError, RequestNotFoundError
from pdserve.proto_convert import logprob_to_proto
from pdserve.security import internal_channel
from pdserve.tracing import log_event
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker_base import WorkerState
from prefill_worker.dist_outbox import DistPublisher, PeerLocks
from prefill_worker.publisher import KVPublisher

__all__ = [  # the names callers import from here (the wire format lives in migration_wire)
    "CHUNK_BYTES",
    "DecodeMigration",
    "MigrationResult",
    "RequestMigratedError",
    "StreamTakenError",
    "final_from_proto",
    "header_from_proto",
    "header_to_proto",
    "result_for_rpc_error",
    "stage_chunks",
    "stage_from_proto",
]

log = logging.getLogger(__name__)

_TRANSPORTS = (
    worker_pb2.MIGRATION_TRANSPORT_UNSPECIFIED,
    worker_pb2.MIGRATION_TRANSPORT_GRPC,
    worker_pb2.MIGRATION_TRANSPORT_STORE,
    worker_pb2.MIGRATION_TRANSPORT_DIST,
)


# ------------------------------------------------------------------ destination: buffered stream


@dataclass
class _Migrated:
    """A request migrated here, its outputs buffered until ``ResumeStream`` takes them (the
    engine thread ``put`` s, the event loop reads; a short lock, never held while either works)."""

    request_id: str
    prior_tokens: list[int]
    prior_logprobs: list[TokenLogprob]
    items: list[OutputItem] = field(default_factory=list)
    taken: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
    timer: threading.Timer | None = None

    def put(self, item: OutputItem) -> None:  # engine thread (OutputSink)
        with self.lock:
            self.items.append(item)
            waker = self.waker
        if waker is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody reads
                waker[0].call_soon_threadsafe(waker[1].set)

    def take(self) -> list[OutputItem]:
        with self.lock:
            items, self.items = self.items, []
            if self.waker is not None:
                self.waker[1].clear()
        return items


def _adopt(e: LLMEngine, imp: MigrationImport, final: FinalState) -> None:
    """Insert the migrated request (engine thread). Its ResumeStream carries token ids, no engine
    text (the router, or :meth:`decode_worker.direct.DirectStreams.serve_resumed`, renders the
    text from the client's index), so the engine renders none for a request without stop strings
    (``LLMEngine.take_detokenizer``; #12: the engine thread is the worker's critical path)."""
    imp.finish(final)
    take = getattr(e, "take_detokenizer", None)  # None: a stand-in engine
    if take is not None:
        take(imp.request_id)


class _MigrateInSession:
    """One ``MigrateIn`` stream on the destination: its chunks in order (:meth:`handle`,
    blocking: engine calls and a STORE stage's pull), and :meth:`abort`, which frees what the
    stream allocated unless the request was started. Not thread-safe: one chunk at a time."""

    def __init__(self, mig: DecodeMigration) -> None:
        self.mig = mig
        self.imp: MigrationImport | None = None
        self.started = False  # ``final`` handled: the request runs here

    def handle(self, c: worker_pb2.MigrationChunk) -> worker_pb2.MigrationAck | None:
        """Apply chunk ``c``; the ack to send back (end of a stage, or the request started),
        else None. Raises on a chunk out of order or refused."""
        mig, loop = self.mig, self.mig.state.loop
        kind = c.WhichOneof("kind")
        if kind == "begin":
            if self.imp is not None:
                raise InvalidRequestError("MigrateIn: a second begin")
            header = header_from_proto(c.begin)
            with mig._lock:
                if header.request_id in mig._migrated:
                    raise InvalidRequestError(
                        f"request id {header.request_id!r} is already in use on the destination"
                    )
            self.imp = loop.call(lambda e, h=header: MigrationImport(e, h))
            return None
        imp = self.imp
        if imp is None:
            raise InvalidRequestError(f"MigrateIn: {kind} before begin")
        if kind == "blocks":
            if c.blocks.HasField("kv"):
                stage = mig._pull_stage(c.blocks, imp.header.shape)
            else:
                stage = stage_from_proto(c.blocks, imp.header.shape)
            loop.call(lambda e, s=stage, i=imp: i.add_stage(s))
            return worker_pb2.MigrationAck(blocks_held=imp.blocks_held) if c.blocks.end_of_stage else None
        if kind == "final":
            final = final_from_proto(c.final, imp.blocks_held, imp.header.shape)
            mig._start(imp, final)
            self.started = True
            return worker_pb2.MigrationAck(blocks_held=imp.blocks_held, running=True)
        raise InvalidRequestError("MigrateIn: empty chunk")

    def abort(self) -> None:
        """Free what the stream allocated, unless the request started (idempotent)."""
        imp, self.imp = self.imp, None
        if imp is not None and not self.started:
            self.mig.state.loop.call(lambda e: imp.abort())


class DecodeMigration:
    """The migration RPCs of one decode worker (registered by the decode servicer).

    ``attach_timeout_s``: how long a request migrated here waits for its ``ResumeStream`` before
    it is aborted. ``admission``: the executor blocking engine calls of ``ResumeStream`` run on."""

    def __init__(
        self,
        state: WorkerState,
        admission: Executor,
        attach_timeout_s: float = 30.0,
        *,
        puller: KVPuller | None = None,
        publisher: KVPublisher | None = None,
    ) -> None:
        """``puller``: reads STORE-transport stages (the decode servicer's KV puller);
        ``publisher``: puts this worker's outgoing STORE-transport stages on its store node
        (None: STORE is refused as a source)."""
        if not attach_timeout_s > 0:
            raise ValueError(f"attach_timeout_s must be > 0, got {attach_timeout_s}")
        self.state = state
        self.admission = admission
        self.attach_timeout_s = attach_timeout_s
        self.puller = puller
        self.publisher = publisher
        # MIGRATION_TRANSPORT_DIST: a DistPublisher over this worker's outbox, its KVPeer service
        # serving the destination's pulls (set by a worker in a process group; None: refused)
        self.dist_publisher: DistPublisher | None = None
        self.peer_locks: PeerLocks | None = None  # shared by its KVPeer service and DistPuller
        self._lock = threading.Lock()
        self._migrated: dict[str, _Migrated] = {}
        self._channels: dict[str, grpc.Channel] = {}

    # ------------------------------------------------------------- source
    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        with self._lock:
            ch = self._channels.get(address)
            if ch is None:
                ch = self._channels[address] = internal_channel(address)
        return worker_pb2_grpc.WorkerStub(ch)

    def _check_transport(self, transport: int) -> None:
        """Refuse a transport this source cannot use, naming it (InvalidRequestError)."""
        if transport == worker_pb2.MIGRATION_TRANSPORT_STORE and self.publisher is None:
            raise InvalidRequestError(
                "MIGRATION_TRANSPORT_STORE: this decode worker has no KV store publisher; use MIGRATION_TRANSPORT_GRPC"
            )
        if transport == worker_pb2.MIGRATION_TRANSPORT_DIST and self.dist_publisher is None:
            raise InvalidRequestError(
                "MIGRATION_TRANSPORT_DIST: this decode worker is not in a torch.distributed process group "
                "(start it with --dist-init); use MIGRATION_TRANSPORT_GRPC or MIGRATION_TRANSPORT_STORE"
            )
        if transport not in _TRANSPORTS:
            raise InvalidRequestError(f"MigrateOut: unknown migration transport {transport}")

    def migrate_out(
        self, req: worker_pb2.MigrateOutRequest, ctx: grpc.ServicerContext
    ) -> worker_pb2.MigrateOutResponse:
        """``Worker.MigrateOut`` (blocking; runs on the server's thread pool)."""
        rid = req.request_id
        if not rid or not req.dest_address:
            raise InvalidRequestError("MigrateOut needs request_id and dest_address")
        if req.dest_address == self.state.address:
            raise InvalidRequestError(
                f"dest_address {req.dest_address} is this worker: migrate to another one"
            )
        self._check_transport(req.transport)
        loop = self.state.loop
        try:
            exp: MigrationExport = loop.call(lambda e: MigrationExport(e, rid))
        except RequestNotFoundError as e:
            # the router migrates requests it placed here: one not here any more has ended
            return worker_pb2.MigrateOutResponse(
                result=MigrationResult.ABORTED_SOURCE_FINISHED.value, message=str(e)
            )
        run = _OutRun(self, exp, req, ctx)
        resp = run.run()
        log_event(
            log,
            "migrate out",
            request_id=rid,
            dest=req.dest_address,
            result=MigrationResult(resp.result).name,
            stages=resp.num_stages,
            blocks=resp.blocks_copied,
            downtime_s=round(resp.downtime_s, 6),
        )
        return resp

    # ------------------------------------------------------------- destination
    async def migrate_in_async(
        self, chunks: AsyncIterator[worker_pb2.MigrationChunk], ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.MigrationAck]:
        """``Worker.MigrateIn`` on a ``grpc.aio`` server (#12): the chunks are read on the event
        loop and each is handled (engine calls, a STORE stage's pull) on an ``admission`` thread,
        so no thread waits on the loop (a sync streaming handler's thread blocks for good when
        the server stops mid-stream). A stream that fails or ends before ``final`` frees what it
        allocated before the call ends; a cancelled one frees it once the chunk being handled
        returns."""
        s = _MigrateInSession(self)
        loop = asyncio.get_running_loop()
        pending: asyncio.Future | None = None
        try:
            async for c in chunks:
                pending = loop.run_in_executor(self.admission, s.handle, c)
                ack = await asyncio.shield(pending)  # cancelled: the chunk's handling goes on
                pending = None
                if ack is not None:
                    yield ack
                if s.started:
                    return
            await loop.run_in_executor(self.admission, s.abort)  # the source closed early
        except asyncio.CancelledError:
            if pending is None or pending.done():
                self._abort_later(s)
            else:
                pending.add_done_callback(lambda _f: self._abort_later(s))
            raise
        except BaseException:
            await loop.run_in_executor(self.admission, s.abort)
            raise

    def _abort_later(self, s: _MigrateInSession) -> None:
        with contextlib.suppress(RuntimeError):  # the executor shut down: the worker is stopping
            self.admission.submit(s.abort)

    def _pull_stage(self, m: worker_pb2.MigrationBlocks, shape: KVShape) -> KVStage:
        """A STORE-transport chunk: pull the blocks its handle names, then release the lease."""
        handle = handle_from_proto(m.kv)
        try:
            if self.puller is None:
                raise InvalidRequestError(
                    "this decode worker has no KV puller: migrate with MIGRATION_TRANSPORT_GRPC"
                )
            self.state.layout.check_compatible(handle.layout, what="migration KV handle")
            if len(handle.block_hashes) != m.num_blocks:
                raise InvalidRequestError(
                    f"migration KV handle names {len(handle.block_hashes)} blocks, the chunk {m.num_blocks}"
                )
            blocks = self.puller.pull(handle)
        finally:
            if self.puller is not None:
                with contextlib.suppress(Exception):  # an expired lease: nothing to release
                    self.puller.release(handle)
        return KVStage(m.first_block, blocks.to(shape.dtype))

    def _start(self, imp: MigrationImport, final: FinalState) -> None:
        """Insert the migrated request as running, its outputs buffered for ResumeStream."""
        rid = imp.request_id
        m = _Migrated(rid, list(final.output_token_ids), list(final.logprobs))
        with self._lock:
            self._migrated[rid] = m
        try:
            self.state.loop.add(rid, lambda e: _adopt(e, imp, final), out=m)
        except BaseException:
            with self._lock:
                self._migrated.pop(rid, None)
            raise
        m.timer = threading.Timer(self.attach_timeout_s, self._expire, args=(rid,))
        m.timer.daemon = True
        m.timer.start()

    def _expire(self, rid: str) -> None:
        """Nobody opened the migrated request's stream in time: abort it, forget it."""
        with self._lock:
            m = self._migrated.get(rid)
            if m is None or m.taken:
                return
            del self._migrated[rid]
        self.state.loop.abort(rid)
        log_event(log, "migrated request expired", request_id=rid, attach_timeout_s=self.attach_timeout_s)

    def pending(self) -> list[str]:
        """Ids of migrated requests whose stream was not opened yet."""
        with self._lock:
            return [k for k, m in self._migrated.items() if not m.taken]

    async def resume_stream(
        self, req: worker_pb2.ResumeStreamRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """``Worker.ResumeStream`` (on the event loop)."""
        rid = req.request_id
        with self._lock:
            m = self._migrated.get(rid)
            if m is None:
                raise RequestNotFoundError(
                    f"no request {rid!r} migrated to this worker (never migrated here, already finished, "
                    "or its stream was not opened in time)"
                )
            if m.taken:
                raise StreamTakenError(f"the stream of migrated request {rid!r} is already open")
            if req.start_index > len(m.prior_tokens):
                raise InvalidRequestError(
                    f"start_index {req.start_index} is past the {len(m.prior_tokens)} tokens the request "
                    "had when it migrated"
                )
            m.taken = True
        if m.timer is not None:
            m.timer.cancel()
        aloop = asyncio.get_running_loop()
        event = asyncio.Event()
        with m.lock:
            m.waker = (aloop, event)
            if m.items:
                event.set()
        finished = False
        try:
            k = req.start_index
            replay = m.prior_tokens[k:]
            lps = m.prior_logprobs[k:] if len(m.prior_logprobs) == len(m.prior_tokens) else []
            if replay:
                yield worker_pb2.DecodeResponse(
                    request_id=rid, token_ids=replay, logprobs=[logprob_to_proto(lp) for lp in lps]
                )
            while True:
                await event.wait()
                items = m.take()
                if not items:
                    continue
                msg, failure = decode_message(rid, items, self.state.count_finished)
                if msg is not None:
                    finished = msg.HasField("finish")
                    yield msg
                if failure is not None:
                    finished = True  # the engine already dropped the request
                    raise failure
                if finished:
                    return
        finally:
            with self._lock:
                self._migrated.pop(rid, None)
            if not finished:
                aloop.run_in_executor(self.admission, self.state.loop.abort, rid)

    def close(self) -> None:
        with self._lock:
            chans, self._channels = list(self._channels.values()), {}
            timers = [m.timer for m in self._migrated.values() if m.timer is not None]
        for t in timers:
            t.cancel()
        for ch in chans:
            ch.close()
        if self.dist_publisher is not None:
            self.dist_publisher.outbox.close()
