"""Live migration's wire format and results (the worker-to-worker ``MigrateIn`` messages of
``proto/pdserve/v1/worker.proto``): the begin header, KV stages cut into ``MigrationBlocks``
messages, the final token state, and ``MigrateOut``'s :class:`MigrationResult` (pure conversion,
no I/O; used by both sides, :mod:`decode_worker.migration` and :mod:`decode_worker.migration_out`)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import torch

from engine.migration import AbortReason, FinalState, KVStage, MigrationHeader
from engine.model_runner import KVShape
from kv_store.tensors import tensor_bytes
from pdserve.errors import ErrorCode, InvalidRequestError, PdserveError
from pdserve.limits import MAX_MESSAGE_BYTES
from pdserve.migration_result import MigrationResult
from pdserve.proto_convert import (
    logprob_from_proto,
    logprob_to_proto,
    sampling_from_proto,
    sampling_to_proto,
)
from pdserve.v1 import common_pb2, worker_pb2

CHUNK_BYTES = 4 << 20  # KV bytes per MigrationBlocks message (under the 8 MiB message limit)
assert CHUNK_BYTES < MAX_MESSAGE_BYTES


class RequestMigratedError(PdserveError):
    """Ends the source's Decode stream of a request that now runs on another worker."""

    code = ErrorCode.ABORTED


class StreamTakenError(PdserveError):
    """A second ResumeStream for the same migrated request."""

    code = ErrorCode.FAILED_PRECONDITION


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
