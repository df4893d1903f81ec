"""The source side of a live migration: one ``MigrateOut`` call driving the stages over a
``MigrateIn`` stream to the destination (see :mod:`decode_worker.migration` for the protocol),
with the KV of each stage moved by one of the transports of :mod:`decode_worker.migration_transport`."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from decode_worker.migration_transport import (
    InlineStageSender,
    PublishedStageSender,
    StageSender,
    dist_stage_key,
    release_store_lease,
)
from decode_worker.migration_wire import (
    _BY_REASON,
    MigrationResult,
    RequestMigratedError,
    final_to_proto,
    header_to_proto,
    result_for_rpc_error,
)
from engine.llm_engine import LLMEngine
from engine.migration import AbortReason, KVStage, MigrationAborted, MigrationExport, MigrationHeader
from kv_store.handle import KVHandle
from pdserve.v1 import worker_pb2

if TYPE_CHECKING:
    from decode_worker.migration import DecodeMigration


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
        self.transport = req.transport or worker_pb2.MIGRATION_TRANSPORT_GRPC
        self._sender: StageSender = InlineStageSender()  # replaced once the header is known
        self._gone = threading.Event()  # the MigrateOut call ended (cancelled) before we answered
        ctx.add_callback(self._gone.set)
        self._q: queue.SimpleQueue[worker_pb2.MigrationChunk | None] = queue.SimpleQueue()

    def _chunks(self) -> Iterator[worker_pb2.MigrationChunk]:
        while (c := self._q.get()) is not None:
            yield c

    def _make_sender(self, header: MigrationHeader) -> StageSender:
        """The transport's stage sender (checked by :meth:`DecodeMigration.migrate_out`)."""
        mig = self.mig
        if self.transport == worker_pb2.MIGRATION_TRANSPORT_STORE:
            assert mig.publisher is not None
            client = getattr(mig.publisher, "client", None)
            return PublishedStageSender(
                mig.publisher, mig.state.layout, header, self.timeout_s, release_store_lease(client)
            )
        if self.transport == worker_pb2.MIGRATION_TRANSPORT_DIST:
            pub = mig.dist_publisher
            assert pub is not None
            outbox = pub.outbox

            def release(handle: KVHandle) -> None:
                if handle.is_direct:
                    outbox.take(handle.request_id)  # never pulled: drop it now
                else:  # the group failed: the publisher fell back to the store
                    release_store_lease(getattr(pub.fallback, "client", None))(handle)

            return PublishedStageSender(
                pub, mig.state.layout, header, self.timeout_s, release, key_for=dist_stage_key()
            )
        return InlineStageSender()

    def _send_stage(self, stage: KVStage, end_of_stage: bool) -> None:
        for b in self._sender.chunks(stage, end_of_stage):
            self._q.put(worker_pb2.MigrationChunk(blocks=b))
        self.resp.bytes_copied += stage.blocks.numel() * stage.blocks.element_size()
        self.resp.blocks_copied += stage.num_blocks

    def _acked(self) -> None:
        self._sender.acked()

    def _release_leases(self) -> None:
        self._sender.abort()

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
        self._sender = self._make_sender(header)
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
