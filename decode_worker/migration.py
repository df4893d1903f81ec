"""Live migration between decode workers over direct gRPC (Llumnix; the engine side is
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

Transports (``MigrateOutRequest.transport``): GRPC (default), the KV bytes in the MigrateIn
messages, direct between the two workers (any hosts); STORE, each stage put on the source's KV
store node under a lease with keys salted per migration (write-once keys never clash with
another request's), the MigrateIn message carrying the handle, and the destination pulling it
with its KV puller (shared memory on the store node's host, gRPC otherwise) and releasing the
lease (a lease of a stage the destination never took is released by the source on abort, else
expires with its TTL). A source needs a store publisher for STORE (``DecodeMigration.publisher``,
set by the worker that has a store); torch.distributed is not used for migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import torch

from decode_worker.messages import decode_message
from decode_worker.puller import KVPuller
from engine.block_hash import BlockHash, chain_hashes
from engine.engine_loop import OutputItem
from engine.llm_engine import KVExport, LLMEngine
from engine.migration import (
    AbortReason,
    FinalState,
    KVStage,
    MigrationAborted,
    MigrationExport,
    MigrationHeader,
    MigrationImport,
)
from engine.model_runner import KVShape
from engine.outputs import TokenLogprob
from kv_store.convert import handle_from_proto, handle_to_proto
from kv_store.handle import KVHandle
from kv_store.tensors import tensor_bytes
from pdserve.errors import ErrorCode, InvalidRequestError, PdserveError, RequestNotFoundError
from pdserve.limits import MAX_BLOCKS_PER_CALL, MAX_MESSAGE_BYTES
from pdserve.proto_convert import (
    logprob_from_proto,
    logprob_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from pdserve.security import internal_channel
from pdserve.tracing import log_event
from pdserve.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from pdserve.worker_base import WorkerState
from prefill_worker.publisher import KVPublisher

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # KV bytes per MigrationBlocks message (under the 8 MiB message limit)
assert CHUNK_BYTES < MAX_MESSAGE_BYTES


class RequestMigratedError(PdserveError):
    """Ends the source's Decode stream of a request that now runs on another worker."""

    code = ErrorCode.ABORTED


class StreamTakenError(PdserveError):
    """A second ResumeStream for the same migrated request."""

    code = ErrorCode.FAILED_PRECONDITION


class MigrationResult(enum.Enum):
    """``MigrateOutResponse.result`` (worker.proto ``MigrationResult``)."""

    MIGRATED = worker_pb2.MIGRATION_RESULT_MIGRATED
    ABORTED_DEST_FULL = worker_pb2.MIGRATION_RESULT_ABORTED_DEST_FULL
    ABORTED_SOURCE_FINISHED = worker_pb2.MIGRATION_RESULT_ABORTED_SOURCE_FINISHED
    ABORTED_CANCELLED = worker_pb2.MIGRATION_RESULT_ABORTED_CANCELLED
    ABORTED_PEER_DIED = worker_pb2.MIGRATION_RESULT_ABORTED_PEER_DIED
    ABORTED_SOURCE_PREEMPTED = worker_pb2.MIGRATION_RESULT_ABORTED_SOURCE_PREEMPTED
    ABORTED_REFUSED = worker_pb2.MIGRATION_RESULT_ABORTED_REFUSED


_BY_REASON = {
    AbortReason.SOURCE_FINISHED: MigrationResult.ABORTED_SOURCE_FINISHED,
    AbortReason.CANCELLED: MigrationResult.ABORTED_CANCELLED,
    AbortReason.SOURCE_PREEMPTED: MigrationResult.ABORTED_SOURCE_PREEMPTED,
    AbortReason.DEST_FULL: MigrationResult.ABORTED_DEST_FULL,
    AbortReason.PEER_DIED: MigrationResult.ABORTED_PEER_DIED,
}


def result_for_rpc_error(code: grpc.StatusCode | None) -> MigrationResult:
    """The result of a migration whose ``MigrateIn`` call failed with ``code``."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return MigrationResult.ABORTED_DEST_FULL
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
    ):
        return MigrationResult.ABORTED_REFUSED
    return MigrationResult.ABORTED_PEER_DIED


# ------------------------------------------------------------------ wire conversion


def _layout_proto(shape: KVShape, model_id: str) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        model_id=model_id,
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=str(shape.dtype).removeprefix("torch."),
        block_size=shape.block_size,
    )


def _shape_from_proto(m: common_pb2.KVLayout) -> KVShape:
    dt = getattr(torch, m.dtype, None)
    if not isinstance(dt, torch.dtype):
        raise InvalidRequestError(f"KV dtype {m.dtype!r} is not a torch dtype in this build")
    return KVShape(m.num_layers, m.num_kv_heads, m.head_dim, m.block_size, dt)


def header_to_proto(h: MigrationHeader, source: str = "") -> worker_pb2.MigrationBegin:
    return worker_pb2.MigrationBegin(
        request_id=h.request_id,
        layout=_layout_proto(h.shape, h.model_id),
        prompt_token_ids=list(h.prompt_token_ids),
        sampling=sampling_to_proto(h.params),
        seed=h.seed,
        priority=h.priority,
        adapter=h.adapter_id,
        cache_salt=h.cache_salt,
        source_worker=source,
    )


def header_from_proto(m: worker_pb2.MigrationBegin) -> MigrationHeader:
    if not m.request_id:
        raise InvalidRequestError("MigrationBegin needs a request_id")
    return MigrationHeader(
        request_id=m.request_id,
        model_id=m.layout.model_id,
        shape=_shape_from_proto(m.layout),
        prompt_token_ids=tuple(m.prompt_token_ids),
        params=sampling_from_proto(m.sampling),
        seed=m.seed,
        priority=m.priority,
        adapter_id=m.adapter,
        cache_salt=m.cache_salt,
    )


def stage_chunks(
    stage: KVStage, end_of_stage: bool, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[worker_pb2.MigrationBlocks]:
    """The stage's blocks as MigrationBlocks messages of at most ``chunk_bytes`` of KV each (at
    least one block each; one empty message for an empty stage); the last one carries
    ``end_of_stage``."""
    n = stage.num_blocks
    per = max(1, chunk_bytes // max(1, stage.blocks[0].numel() * stage.blocks.element_size())) if n else 1
    starts = list(range(0, n, per)) or [0]
    for i, s in enumerate(starts):
        part = stage.blocks[s : s + per]
        yield worker_pb2.MigrationBlocks(
            first_block=stage.first_block + s,
            num_blocks=int(part.shape[0]),
            data=bytes(tensor_bytes(part)) if part.shape[0] else b"",
            end_of_stage=end_of_stage and i == len(starts) - 1,
        )


def stage_from_proto(m: worker_pb2.MigrationBlocks, shape: KVShape) -> KVStage:
    block = (shape.num_layers, 2, shape.block_size, shape.num_kv_heads, shape.head_dim)
    if len(m.data) != m.num_blocks * shape.block_nbytes:
        raise InvalidRequestError(
            f"MigrationBlocks holds {len(m.data)} bytes for {m.num_blocks} blocks of {shape.block_nbytes}"
        )
    if m.num_blocks == 0:
        return KVStage(m.first_block, torch.empty((0, *block), dtype=shape.dtype))
    t = torch.frombuffer(bytearray(m.data), dtype=shape.dtype).view(m.num_blocks, *block)
    return KVStage(m.first_block, t)


def final_to_proto(f: FinalState) -> worker_pb2.MigrationFinal:
    return worker_pb2.MigrationFinal(
        num_computed_tokens=f.num_computed_tokens,
        output_token_ids=f.output_token_ids,
        detok_text=f.detok_text,
        detok_emitted=f.detok_emitted,
        logprobs=[logprob_to_proto(lp) for lp in f.logprobs],
    )


def final_from_proto(m: worker_pb2.MigrationFinal, first_block: int, shape: KVShape) -> FinalState:
    """The final state; its KV came in the stages before it (an empty last stage at ``first_block``)."""
    block = (shape.num_layers, 2, shape.block_size, shape.num_kv_heads, shape.head_dim)
    return FinalState(
        stage=KVStage(first_block, torch.empty((0, *block), dtype=shape.dtype)),
        num_computed_tokens=m.num_computed_tokens,
        output_token_ids=list(m.output_token_ids),
        detok_text=m.detok_text,
        detok_emitted=m.detok_emitted,
        logprobs=[logprob_from_proto(lp) for lp in m.logprobs],
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
        if req.transport == worker_pb2.MIGRATION_TRANSPORT_STORE and self.publisher is None:
            raise InvalidRequestError(
                "MIGRATION_TRANSPORT_STORE: this decode worker has no KV store publisher; use MIGRATION_TRANSPORT_GRPC"
            )
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
    def migrate_in(
        self, chunks: Iterator[worker_pb2.MigrationChunk], ctx: grpc.ServicerContext
    ) -> Iterator[worker_pb2.MigrationAck]:
        """``Worker.MigrateIn`` (blocking generator; runs on the server's thread pool)."""
        loop = self.state.loop
        imp: MigrationImport | None = None
        done = False
        try:
            for c in chunks:
                kind = c.WhichOneof("kind")
                if kind == "begin":
                    if imp is not None:
                        raise InvalidRequestError("MigrateIn: a second begin")
                    header = header_from_proto(c.begin)
                    with self._lock:
                        if header.request_id in self._migrated:
                            raise InvalidRequestError(
                                f"request id {header.request_id!r} is already in use on the destination"
                            )
                    imp = loop.call(lambda e, h=header: MigrationImport(e, h))
                    continue
                if imp is None:
                    raise InvalidRequestError(f"MigrateIn: {kind} before begin")
                if kind == "blocks":
                    if c.blocks.HasField("kv"):
                        stage = self._pull_stage(c.blocks, imp.header.shape)
                    else:
                        stage = stage_from_proto(c.blocks, imp.header.shape)
                    loop.call(lambda e, s=stage, i=imp: i.add_stage(s))
                    if c.blocks.end_of_stage:
                        yield worker_pb2.MigrationAck(blocks_held=imp.blocks_held)
                elif kind == "final":
                    final = final_from_proto(c.final, imp.blocks_held, imp.header.shape)
                    self._start(imp, final)
                    done = True
                    yield worker_pb2.MigrationAck(blocks_held=imp.blocks_held, running=True)
                    return
                else:
                    raise InvalidRequestError("MigrateIn: empty chunk")
        finally:
            if not done and imp is not None:
                loop.call(lambda e: imp.abort())

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
            self.state.loop.add(rid, lambda e: imp.finish(final), out=m)
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


class _OutRun:
    """One MigrateOut: drives the stages over a MigrateIn stream to the destination."""

    def __init__(
        self,
        mig: DecodeMigration,
        exp: MigrationExport,
        req: worker_pb2.MigrateOutRequest,
        ctx: grpc.ServicerContext,
    ) -> None:
        self.mig = mig
        self.loop = mig.state.loop
        self.exp = exp
        self.req = req
        self.ctx = ctx
        self.max_stages = req.max_stages or 4
        self.timeout_s = req.timeout_s or 30.0
        self.resp = worker_pb2.MigrateOutResponse()
        self.store = req.transport == worker_pb2.MIGRATION_TRANSPORT_STORE
        self._salt = f"migration/{exp.request_id}/{uuid.uuid4().hex}"  # keys unique to this migration
        self._parent: BlockHash | None = None
        self._leases: list[KVHandle] = []  # published stages the destination has not acked
        self._header: MigrationHeader | None = None
        self._gone = threading.Event()  # the MigrateOut call ended (cancelled) before we answered
        ctx.add_callback(self._gone.set)
        self._q: queue.SimpleQueue[worker_pb2.MigrationChunk | None] = queue.SimpleQueue()

    def _chunks(self) -> Iterator[worker_pb2.MigrationChunk]:
        while (c := self._q.get()) is not None:
            yield c

    def _send_stage(self, stage: KVStage, end_of_stage: bool) -> None:
        if self.store and stage.num_blocks:
            # one store Put per chunk: a call names at most MAX_BLOCKS_PER_CALL blocks
            assert self._header is not None
            bs = self._header.shape.block_size
            n = stage.num_blocks
            for s in range(0, n, MAX_BLOCKS_PER_CALL):
                e = min(n, s + MAX_BLOCKS_PER_CALL)
                part = KVStage(stage.first_block + s, stage.blocks[s:e], stage.token_ids[s * bs : e * bs])
                self._publish_stage(part, end_of_stage and e == n)
            return
        for b in stage_chunks(stage, end_of_stage):
            self.resp.bytes_copied += len(b.data)
            self._q.put(worker_pb2.MigrationChunk(blocks=b))
        self.resp.blocks_copied += stage.num_blocks

    def _publish_stage(self, stage: KVStage, end_of_stage: bool) -> None:
        """STORE transport: put the stage on this worker's store node, send its handle."""
        h = self._header
        pub = self.mig.publisher
        assert h is not None and pub is not None
        keys = chain_hashes(
            stage.token_ids,
            h.shape.block_size,
            h.model_id,
            h.adapter_id,
            self._salt,
            include_partial=True,
            parent=self._parent,
        )
        if len(keys) != stage.num_blocks:
            raise RuntimeError(
                f"{len(keys)} keys for {stage.num_blocks} blocks of {len(stage.token_ids)} tokens"
            )
        self._parent = keys[-1]
        kv = KVExport(self.exp.request_id, h.model_id, stage.token_ids, 0, keys, stage.blocks, h.shape)
        handle = pub.publish(kv, self.mig.state.layout, lease_ttl_s=self.timeout_s)
        self._leases.append(handle)
        self.resp.bytes_copied += stage.blocks.numel() * stage.blocks.element_size()
        self.resp.blocks_copied += stage.num_blocks
        self._q.put(
            worker_pb2.MigrationChunk(
                blocks=worker_pb2.MigrationBlocks(
                    first_block=stage.first_block,
                    num_blocks=stage.num_blocks,
                    kv=handle_to_proto(handle),
                    end_of_stage=end_of_stage,
                )
            )
        )

    def _acked(self) -> None:
        self._leases.clear()  # the destination pulled and released them

    def _release_leases(self) -> None:
        client = getattr(self.mig.publisher, "client", None)
        for handle in self._leases:
            if client is not None and handle.lease_id:
                with contextlib.suppress(Exception):
                    client.release(handle.lease_id)
        self._leases.clear()

    def _check_caller(self) -> None:
        remaining = self.ctx.time_remaining()
        if self._gone.is_set() or (remaining is not None and remaining <= 0):
            raise MigrationAborted(AbortReason.CANCELLED, "the MigrateOut call was cancelled")

    def _abort(self, result: MigrationResult, why: str) -> worker_pb2.MigrateOutResponse:
        self._release_leases()
        with contextlib.suppress(Exception):
            self.loop.call(lambda e: self.exp.resume())
        self.resp.result = result.value
        self.resp.message = why
        return self.resp

    def run(self) -> worker_pb2.MigrateOutResponse:
        t0 = time.monotonic()
        exp = self.exp
        rid = exp.request_id
        stub = self.mig._stub(self.req.dest_address)
        header = self.loop.call(lambda e: exp.header())
        self._header = header
        self._q.put(worker_pb2.MigrationChunk(begin=header_to_proto(header, self.mig.state.config.worker_id)))
        call = stub.MigrateIn(self._chunks(), timeout=self.timeout_s)
        try:
            stage = self.loop.call(lambda e: exp.next_stage())
            self._send_stage(stage, True)
            next(call)
            self._acked()
            stages = 1
            while stages < self.max_stages:
                self._check_caller()
                if self.loop.call(lambda e: exp.pending_blocks()) <= self.req.stop_blocks:
                    break
                self._send_stage(self.loop.call(lambda e: exp.next_stage()), True)
                next(call)
                self._acked()
                stages += 1
            self._check_caller()
            self.resp.num_stages = stages
            final = self.loop.call(lambda e: exp.stop_and_copy())
            t_pause = exp.paused_at if exp.paused_at is not None else time.monotonic()
            self._send_stage(final.stage, False)
            self._q.put(worker_pb2.MigrationChunk(final=final_to_proto(final)))
            ack = next(call)
            t_running = time.monotonic()
            self._acked()
            if not ack.running:
                raise MigrationAborted(
                    AbortReason.PEER_DIED, "the destination did not confirm the request runs"
                )
        except MigrationAborted as e:
            self._q.put(None)
            call.cancel()
            return self._abort(_BY_REASON[e.reason], str(e))
        except grpc.RpcError as e:
            self._q.put(None)
            call.cancel()
            return self._abort(
                result_for_rpc_error(e.code()), f"MigrateIn at {self.req.dest_address}: {e.details()}"
            )
        except StopIteration:
            self._q.put(None)
            return self._abort(
                MigrationResult.ABORTED_PEER_DIED, "the destination ended the migration stream"
            )
        except BaseException:
            self._q.put(None)
            call.cancel()
            self._release_leases()
            with contextlib.suppress(Exception):
                self.loop.call(lambda e: exp.resume())
            raise
        self._q.put(None)
        with contextlib.suppress(StopIteration, grpc.RpcError):
            next(call)  # the destination closes the stream after the final ack

        def commit(e: LLMEngine) -> bool:
            gone = exp.req.status.finished  # aborted (cancelled) while paused
            exp.commit()
            return not gone

        still_here = self.loop.call(commit)
        self.resp.downtime_s = t_running - t_pause
        k = len(final.output_token_ids)
        if not still_here:
            # the caller cancelled it during the stop-and-copy: the destination's copy goes too
            with contextlib.suppress(grpc.RpcError):
                stub.Abort(worker_pb2.AbortRequest(request_id=rid), timeout=5.0)
            self.resp.result = MigrationResult.ABORTED_CANCELLED.value
            self.resp.message = f"request {rid!r} was cancelled during the stop-and-copy"
        else:
            self.loop._finish_queue(  # noqa: SLF001 - ends the source's Decode stream of the request
                rid,
                RequestMigratedError(
                    f"request {rid!r} migrated to {self.req.dest_address} at output token {k}: "
                    "open its stream there with ResumeStream"
                ),
            )
            self.resp.result = MigrationResult.MIGRATED.value
            self.resp.resume_token_index = k
        self.resp.total_s = time.monotonic() - t0
        return self.resp
