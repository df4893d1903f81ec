"""Decode side of chunk-wise KV streaming from a prefill worker (issue #14 part 2; the producer
and the wire format are in :mod:`prefill_worker.kv_stream`).

:class:`StreamAssembler` (no I/O) places each chunk by its first block into a tensor sized for
the whole prompt, in whatever order chunks complete, and checks it as the non-streamed handoff
does: every block's key must be the prompt's own key at that position (computed here from the
prompt tokens, model, adapter and salt: a chunk of another prompt is refused), every block's
bytes must match the producer's XXH3 checksum (a mismatch is a miss, never used), no block may
come twice, and the final must name the prompt's token count, block count and the number of
chunks received. :meth:`StreamAssembler.result` refuses a partial KV: decoding never starts
before every chunk arrived and was verified.

:class:`StreamPuller` reads a stream's messages (``MigrationChunk``: begin, chunks, final) as
they arrive: an inline chunk (direct gRPC) is checked and placed at once; a store chunk is
pulled on a small thread pool by the worker's :class:`~decode_worker.puller.KVPuller` (shared
memory on the store node's host, gRPC otherwise), its lease released after the pull whatever
happens, so pulls overlap each other, the next chunks' arrival and the rest of the prefill, and
complete in any order. On any failure the stream is cancelled (the prefill worker stops and drops
what it did not hand over), chunks not yet pulled have their leases released, and nothing is
imported into the engine: nothing is left on either side.

:func:`open_stream` opens ``/pdserve.v1.KVStream/StreamKV`` on a prefill worker's channel;
:func:`import_adder` is the engine call that adopts the assembled KV (``LLMEngine.import_kv``,
exactly what the non-streamed handoff runs). A DIST-transport chunk (a direct handle: the prefill
worker's outbox) is pulled by the worker's :class:`~decode_worker.dist_puller.DistPuller` over
the process group, like a store chunk on the pool; its checksums travel in the handle.

A direct token stream (``DecodeRequest.direct`` beside ``kv_stream_address``: the router's
``DirectLegs.start_streamed_decode``) is admitted the same way: the grant is checked before the
stream is read (:meth:`decode_worker.direct.DirectStreams.check`), the KV assembled and imported
here, and only then does :meth:`~decode_worker.direct.DirectStreams.serve` send the router its
admission message (the redirect) and stream the tokens to the client's connection: the client
never attaches to a request whose KV is partial.

Parallel sampling (``n > 1`` / ``best_of > 1``, ``prompt_tail_pending``): the stream carries the
KV of every prompt token but the last; it is assembled and verified the same way and adopted by
``LLMEngine.import_kv_group`` (:mod:`decode_worker.groups`: the choices forked over it), the
stream's first token (the prefill's discarded one) unused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from decode_worker.groups import add_group_when_room, check_group_handoff, num_choices, wait_for_group_blocks
from decode_worker.puller import KVPuller
from engine.block_hash import BlockHash, chain_hashes
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_store.checksum import KVChecksumError, block_checksum
from kv_store.convert import handle_from_proto, layout_from_proto
from kv_store.handle import KVHandle
from kv_store.layout import KVLayout
from kv_store.tensors import tensor_bytes
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.proto_convert import logprob_from_proto
from pdserve.status import error_from_rpc_error
from pdserve.v1 import worker_pb2
from prefill_worker.kv_stream import INLINE_NODE, STREAM_METHOD, StreamFinal


class PartialKVError(UnavailableError):
    """The stream ended before every block of the prompt arrived (never decoded from)."""


@dataclass(frozen=True)
class AssembledKV:
    """A stream's whole KV, verified: ``blocks`` ``[n, *layout.block_shape]`` and the final."""

    blocks: torch.Tensor
    final: StreamFinal


class StreamAssembler:
    """Assembles one request's streamed KV (see the module docstring). Thread-safe ``add``."""

    def __init__(
        self, request_id: str, layout: KVLayout, prompt_hashes: Sequence[BlockHash], num_tokens: int
    ) -> None:
        n = -(-num_tokens // layout.block_size)
        if len(prompt_hashes) != n or num_tokens <= 0:
            raise InvalidRequestError(
                f"{request_id!r}: {len(prompt_hashes)} block keys for {num_tokens} tokens of {layout.block_size}"
            )
        self.request_id = request_id
        self.layout = layout
        self.num_tokens = num_tokens
        self.expected = tuple(prompt_hashes)
        self.out = torch.empty((n, *layout.block_shape), dtype=getattr(torch, layout.dtype))
        self._have = [False] * n
        self._lock = threading.Lock()
        self.chunks = 0
        self.final: StreamFinal | None = None

    @property
    def num_blocks(self) -> int:
        return len(self._have)

    def missing(self) -> list[int]:
        with self._lock:
            return [i for i, h in enumerate(self._have) if not h]

    def add(
        self, first_block: int, blocks: torch.Tensor, hashes: Sequence[BlockHash], checksums: Sequence[int]
    ) -> None:
        """Check and place a chunk of ``len(hashes)`` blocks starting at ``first_block``."""
        k = len(hashes)
        n = self.num_blocks
        if k == 0 or blocks.shape[0] != k or len(checksums) != k:
            raise InvalidRequestError(
                f"stream of {self.request_id!r}: a chunk of {blocks.shape[0]} blocks names {k} keys and "
                f"{len(checksums)} checksums (both required, one per block)"
            )
        if not 0 <= first_block <= n - k:
            raise InvalidRequestError(
                f"stream of {self.request_id!r}: chunk blocks [{first_block}, {first_block + k}) outside the prompt's {n}"
            )
        if tuple(hashes) != self.expected[first_block : first_block + k]:
            raise InvalidRequestError(
                f"stream of {self.request_id!r}: chunk at block {first_block} holds blocks of another prompt "
                "(their keys are not this prompt's)"
            )
        if tuple(blocks.shape[1:]) != tuple(self.layout.block_shape):
            raise InvalidRequestError(
                f"stream of {self.request_id!r}: chunk block shape {tuple(blocks.shape[1:])}"
            )
        blocks = blocks.to(self.out.dtype).contiguous()
        for i in range(k):
            if block_checksum(tensor_bytes(blocks[i])) != checksums[i]:
                raise KVChecksumError(
                    f"stream of {self.request_id!r}: block {first_block + i} does not match the producer's checksum"
                )
        with self._lock:
            if any(self._have[first_block : first_block + k]):
                raise InvalidRequestError(
                    f"stream of {self.request_id!r}: chunk at block {first_block} repeats blocks already received"
                )
            self._have[first_block : first_block + k] = [True] * k
            self.chunks += 1
        self.out[first_block : first_block + k].copy_(blocks)

    def finish(self, final: StreamFinal) -> None:
        """The producer's final: it must name this prompt and the chunks received."""
        if final.num_tokens != self.num_tokens or final.num_blocks != self.num_blocks:
            raise InvalidRequestError(
                f"stream of {self.request_id!r}: final names {final.num_tokens} tokens / {final.num_blocks} blocks, "
                f"the prompt has {self.num_tokens} / {self.num_blocks}"
            )
        self.final = final

    @property
    def complete(self) -> bool:
        with self._lock:
            return self.final is not None and all(self._have) and self.chunks == self.final.num_chunks

    def result(self) -> AssembledKV:
        """The whole verified KV; PartialKVError unless every block and the final arrived."""
        if not self.complete:
            missing = self.missing()
            got = self.chunks
            want = self.final.num_chunks if self.final is not None else "?"
            raise PartialKVError(
                f"KV stream of {self.request_id!r} is incomplete: {len(missing)} of {self.num_blocks} blocks "
                f"missing, {got} of {want} chunks, final {'received' if self.final else 'not received'}"
            )
        assert self.final is not None
        return AssembledKV(self.out, self.final)


def _final_from_proto(m: worker_pb2.MigrationFinal, num_blocks: int) -> StreamFinal:
    if len(m.output_token_ids) != 1:
        raise InvalidRequestError(
            f"a KV stream's final carries {len(m.output_token_ids)} tokens, not the first one"
        )
    return StreamFinal(
        num_tokens=m.num_computed_tokens,
        num_blocks=num_blocks,
        num_chunks=m.detok_emitted,
        first_token=m.output_token_ids[0],
        first_logprob=logprob_from_proto(m.logprobs[0]) if m.logprobs else None,
    )


class StreamPuller:
    """Reads a KV stream into a :class:`StreamAssembler` (see the module docstring).
    ``puller``: pulls store chunks (None: a store chunk is refused, naming it). Counters:
    ``inline_chunks``, ``store_chunks``, ``released`` (leases of chunks never pulled)."""

    def __init__(self, puller: KVPuller | None, pull_threads: int = 2) -> None:
        self.puller = puller
        self.pull_threads = pull_threads
        self.inline_chunks = 0
        self.store_chunks = 0
        self.released = 0

    def _pull_store(self, asm: StreamAssembler, first: int, handle: KVHandle) -> None:
        assert self.puller is not None
        try:
            blocks = self.puller.pull(handle)
        finally:
            self.puller.release(handle)
        asm.add(first, blocks, handle.block_hashes, handle.block_checksums)

    def read(
        self, messages: Iterable[worker_pb2.MigrationChunk], asm: StreamAssembler, cancel: Callable[[], Any]
    ) -> AssembledKV:
        """Read ``messages`` to the end and return the assembled KV. ``cancel`` ends the stream
        early (the gRPC call's ``cancel``); it is called on any failure."""
        pool = ThreadPoolExecutor(self.pull_threads, thread_name_prefix="kv-stream-pull")
        pending: list[tuple[Future, KVHandle]] = []
        ok = False
        try:
            it = iter(messages)
            for m in it:
                kind = m.WhichOneof("kind")
                if kind == "begin":
                    asm.layout.check_compatible(layout_from_proto(m.begin.layout), what="KV stream")
                elif kind == "blocks":
                    self._chunk(m.blocks, asm, pool, pending)
                elif kind == "final":
                    for f, _ in pending:
                        f.result()  # a failed pull fails the stream
                    asm.finish(_final_from_proto(m.final, asm.num_blocks))
                    for _extra in it:  # read to the end: the producer closes the stream
                        raise InvalidRequestError("KV stream: a message after the final")
                    ok = True
                    return asm.result()
                else:
                    raise InvalidRequestError("KV stream: empty message")
            raise PartialKVError(f"the KV stream of {asm.request_id!r} ended before its final")
        except grpc.RpcError as e:
            raise error_from_rpc_error(e) from None
        finally:
            if not ok:
                cancel()
                for f, h in pending:
                    if f.cancel():  # never started: its lease is still ours to release
                        self._release(h)
            pool.shutdown(wait=True)

    def _chunk(
        self,
        b: worker_pb2.MigrationBlocks,
        asm: StreamAssembler,
        pool: ThreadPoolExecutor,
        pending: list[tuple[Future, KVHandle]],
    ) -> None:
        handle = handle_from_proto(b.kv)
        if len(handle.block_hashes) != b.num_blocks:
            raise InvalidRequestError(
                f"KV stream chunk at block {b.first_block}: {b.num_blocks} blocks, its handle names {len(handle.block_hashes)}"
            )
        asm.layout.check_compatible(handle.layout, what="KV stream chunk")
        if b.data or (handle.locations and handle.locations[0].node_id == INLINE_NODE):
            nbytes = b.num_blocks * asm.layout.block_nbytes
            if len(b.data) != nbytes:
                raise InvalidRequestError(
                    f"KV stream chunk holds {len(b.data)} bytes for {b.num_blocks} blocks"
                )
            t = torch.frombuffer(bytearray(b.data), dtype=asm.out.dtype).view(
                b.num_blocks, *asm.layout.block_shape
            )
            asm.add(b.first_block, t, handle.block_hashes, handle.block_checksums)
            self.inline_chunks += 1
            return
        if self.puller is None:
            self._release(handle)
            raise InvalidRequestError("this decode worker has no KV puller for a store-transport KV stream")
        self.store_chunks += 1
        pending.append((pool.submit(self._pull_store, asm, b.first_block, handle), handle))

    def _release(self, handle: KVHandle) -> None:
        if self.puller is None or not handle.lease_id:
            return
        try:
            self.puller.release(handle)
            self.released += 1
        except Exception:  # noqa: BLE001 - the lease expires with its TTL anyway
            pass


def open_stream(channel: grpc.Channel, request_id: str, timeout_s: float | None = None) -> Any:
    """``StreamKV(request_id)`` on a prefill worker (a gRPC call: iterate it, ``cancel()`` it)."""
    call = channel.unary_stream(
        STREAM_METHOD,
        request_serializer=worker_pb2.ResumeStreamRequest.SerializeToString,
        response_deserializer=worker_pb2.MigrationChunk.FromString,
    )
    return call(worker_pb2.ResumeStreamRequest(request_id=request_id), timeout=timeout_s)


_CHANNELS: dict[str, grpc.Channel] = {}  # prefill workers' channels, one per address (process-wide)
_CHANNELS_LOCK = threading.Lock()


def stream_channel(address: str) -> grpc.Channel:
    """The internal channel to the prefill worker at ``address`` (cached)."""
    from pdserve.security import internal_channel

    with _CHANNELS_LOCK:
        ch = _CHANNELS.get(address)
        if ch is None:
            ch = _CHANNELS[address] = internal_channel(address)
        return ch


def check_stream_request(req: worker_pb2.DecodeRequest, params: SamplingParams | None = None) -> None:
    """A streamed handoff's Decode carries the prompt and no KV of its own (worker.proto); a
    group's (``params.num_candidates > 1``) says ``prompt_tail_pending``
    (:func:`decode_worker.groups.check_group_handoff`)."""
    if req.HasField("kv") or req.first_token or req.HasField("first_token_logprob"):
        raise InvalidRequestError(
            "kv_stream_address: the KV and the first token come by the stream; send no kv"
        )
    if req.resume_token_ids or req.local_prefill:
        raise InvalidRequestError(
            "kv_stream_address is for a fresh handoff: no resume_token_ids or local_prefill"
        )
    if not req.request_id or not req.prompt_token_ids:
        raise InvalidRequestError("kv_stream_address: request_id and prompt_token_ids are required")
    if params is not None:
        check_group_handoff(req, params)  # prompt_tail_pending if and only if a group
    elif req.prompt_tail_pending:
        raise InvalidRequestError(
            "prompt_tail_pending is for a parallel-sampling request (n > 1 or best_of > 1)"
        )


def admit_streamed_handoff(
    svc: Any, req: worker_pb2.DecodeRequest, ctx: Any, out: Any
) -> tuple[str, Any, bool, float]:
    """``DecodeServicer._admit_handoff`` of a Decode with ``kv_stream_address``: wait for free
    blocks, read the stream as the prefill computes it, then import the whole verified KV as the
    non-streamed handoff does (waiting for room again when another request took the blocks or
    the adapter's slot during the read). Returns (request id, output queue, done at once, seconds from the
    stream's opening to the KV assembled)."""
    from pdserve.proto_convert import sampling_from_proto

    params = sampling_from_proto(req.sampling)
    check_stream_request(req, params)
    state = svc.state
    rid, ids = req.request_id, list(req.prompt_token_ids)
    group = params.num_candidates > 1
    kv_ids = ids[:-1] if group else ids  # a group's stream holds all but the last prompt token
    if not kv_ids:
        raise InvalidRequestError(
            f"n={params.n} with a 1-token prompt has no prompt KV to stream: send it with local_prefill"
        )
    if group:
        wait_for_group_blocks(svc, ctx, len(kv_ids), params.num_candidates)
    else:
        svc._wait_for_blocks(len(ids), ctx, req.adapter)
    layout = state.layout
    asm = StreamAssembler(
        rid,
        layout,
        chain_hashes(
            kv_ids,
            layout.block_size,
            state.engine.model_id,
            req.adapter,
            req.cache_salt,
            include_partial=True,
        ),
        len(kv_ids),
    )
    remaining = ctx.time_remaining()
    timeout = remaining if remaining is not None and remaining < 1e7 else None
    t0 = time.monotonic()
    call = open_stream(stream_channel(req.kv_stream_address), rid, timeout)
    kv = StreamPuller(svc.puller).read(call, asm, call.cancel)
    pull_s = time.monotonic() - t0
    if group:

        def add_group(e: LLMEngine) -> None:
            e.import_kv_group(rid, ids, kv.blocks, params, priority=req.priority, cache_salt=req.cache_salt)

        # room was there before the read; another request may have taken the blocks since
        q = add_group_when_room(
            svc, rid, add_group, out, ctx, len(kv_ids), params.num_candidates, num_choices(req)
        )
        return rid, q, False, pull_s
    add = import_adder(
        rid, ids, kv, params, priority=req.priority, adapter_id=req.adapter, cache_salt=req.cache_salt
    )
    immediate = {"v": False}

    def adder(e: LLMEngine) -> None:
        add(e)
        immediate["v"] = not e.has_request(rid)  # the first token already ended it

    # room was there before the pull, but another request may have taken the blocks or the
    # adapter's LoRA slot since: the assembled KV waits for room as the non-streamed handoff's
    # pulled blocks do (up to the admission timeout), not fail the request RESOURCE_EXHAUSTED
    q = svc._add_when_room(rid, adder, out, len(ids), ctx, req.adapter)
    return rid, q, immediate["v"], pull_s


def import_adder(
    request_id: str,
    prompt: list[int],
    kv: AssembledKV,
    params: SamplingParams,
    *,
    priority: int = 0,
    adapter_id: str = "",
    cache_salt: str = "",
) -> Callable[[LLMEngine], str]:
    """The engine call adopting an assembled stream (for ``EngineLoop.add``): the very
    ``import_kv`` of the non-streamed handoff."""

    def add(e: LLMEngine) -> str:
        return e.import_kv(
            request_id,
            prompt,
            kv.final.first_token,
            kv.blocks,
            params,
            priority=priority,
            first_logprob=kv.final.first_logprob,
            adapter_id=adapter_id,
            cache_salt=cache_salt,
        )

    return add


__all__ = [
    "AssembledKV",
    "PartialKVError",
    "StreamAssembler",
    "StreamPuller",
    "admit_streamed_handoff",
    "check_stream_request",
    "import_adder",
    "open_stream",
]
