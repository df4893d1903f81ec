"""Chunk-wise KV streaming from a prefill worker to a decode worker (issue #14 part 2).

Today's handoff starts moving a request's KV only once its whole prompt is computed. Here the
prefill worker publishes the blocks of each prefill chunk as soon as the engine step that
computed them ends (chunked prefill, Sarathi: one step computes ``long_prefill_token_threshold``
tokens of the prompt through every layer), and the decode worker pulls and assembles them while
the prefill goes on; after the prompt's last chunk only that chunk's transfer is left.

Why chunks and not layers: the KV wire layout (README "KV wire layout", :mod:`kv_store.layout`)
is per block, every layer of a block together, and every handoff check (block keys, per-block
XXH3 checksums, store leases) is per block. A layer-wise stream would need a per-layer layout,
per-layer checksums and a hook inside the model's forward; a chunk's blocks are final when its
engine step ends, so they go out through the existing per-block publishers unchanged. The
granularity is the prefill chunk (512 tokens by default: 32 blocks of 16), so the residual
transfer after the prompt is at most one chunk's blocks (``bench/layerwise_kv.py`` measures it).

Pieces (the decode side is :mod:`decode_worker.stream_puller`):

* :func:`ready_blocks` (pure): how many leading blocks of a prompt are final after ``n``
  computed tokens.
* :class:`KVStream`: one request's stream, its **manifest** (:meth:`KVStream.manifest`: chunks
  published, blocks covered, finished or failed) and its single consumer
  (:meth:`KVStream.consume`, chunks in index order as they appear, then the final). Contract:
  a chunk handed to the consumer is the consumer's (it pulls it and releases its lease); every
  chunk not handed over when the stream fails, is cancelled or expires is dropped by the
  stream (its store lease released). A chunk published after the stream ended is dropped at
  once and the producer is told (:class:`~pdserve.errors.CancelledError`), so the prefill
  stops.
* :class:`KVStreamRegistry`: the worker's open streams by request id; a consumer may subscribe
  before the prefill opens the stream (bounded wait); a finished stream nobody consumed within
  ``ttl_s`` is dropped (leases released).
* Sinks (where a chunk's blocks go): :class:`InlineChunkSink` (kept in memory, sent in the
  stream's messages: the direct gRPC path), :class:`StoreChunkSink` (put on the worker's
  store node under a lease of its own by the existing :class:`~prefill_worker.publisher.StorePublisher`;
  a same-host decode worker reads it over shared memory) and :class:`DistChunkSink` (kept in the
  worker's direct-transfer outbox, :mod:`prefill_worker.dist_outbox`: the decode worker pulls it
  over the workers' torch.distributed process group, gloo or NCCL, as the direct whole-KV
  handoff does). An outbox entry is this process's memory, so a DIST stream's chunks are also
  taken back when the stream fails or is cancelled before its final was handed over, the ones
  already handed to the consumer included (a consumer that gave up never pulls them; a pull
  racing with it gets NOT_FOUND, and that consumer's assembly has failed anyway).
* :func:`prefill_streamed`: the producer, run on a worker thread next to the engine loop: adds
  the prefill-only request, after each engine step copies the newly final blocks (on the engine
  thread, between two steps, as :mod:`engine.migration` does) and publishes them while the
  engine computes the next chunk; at the end the rest (the last, possibly partial, block
  included) and the first token. Any failure (engine, sink, consumer gone, caller gone) aborts
  the request in the engine and fails the stream: nothing stays allocated.
* gRPC: :func:`stream_kv_handler` serves ``/pdserve.v1.KVStream/StreamKV`` (request
  ``ResumeStreamRequest``: request_id, start_index 0; response stream ``MigrationChunk``:
  ``begin`` (layout, token count), ``blocks`` per chunk (inline bytes, or ``kv``: the store
  handle; ``kv.block_hashes`` / ``kv.block_checksums`` always name the chunk's blocks), then
  ``final`` (num_computed_tokens = prompt tokens, output_token_ids = [first token])). It reuses
  existing messages (no proto change); cancelling the call cancels the stream.
* ``streaming=False`` in :func:`prefill_streamed`: the same path with one chunk published at the
  end (the non-streamed handoff, the benchmark's baseline).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

import grpc
import torch

from engine.block_hash import BlockHash, chain_hashes
from engine.block_manager import NULL_BLOCK
from engine.engine_loop import EngineLoop
from engine.llm_engine import KVExport, LLMEngine
from engine.model_runner import KVShape
from engine.outputs import TokenLogprob
from kv_store.checksum import block_checksum
from kv_store.client import KVStoreClient
from kv_store.convert import handle_to_proto, layout_to_proto
from kv_store.handle import BlockLocation, KVHandle
from kv_store.layout import KVLayout
from kv_store.tensors import tensor_bytes
from pdserve.errors import (
    CancelledError,
    InvalidRequestError,
    PdserveError,
    RequestNotFoundError,
    UnavailableError,
)
from pdserve.limits import MAX_MESSAGE_BYTES
from pdserve.proto_convert import logprob_to_proto
from pdserve.status import abort_with
from pdserve.tracing import log_event
from pdserve.v1 import worker_pb2
from prefill_worker.dist_outbox import DistPublisher
from prefill_worker.publisher import StorePublisher
from prefill_worker.sweeper import Sweeper

log = logging.getLogger(__name__)

STREAM_METHOD = "/pdserve.v1.KVStream/StreamKV"
INLINE_NODE = "kv-stream-inline"
MAX_CHUNK_BYTES = 4 << 20  # KV bytes per chunk at most (one gRPC message, under MAX_MESSAGE_BYTES)
assert (
    MAX_CHUNK_BYTES < MAX_MESSAGE_BYTES
)  # BlockLocation.node_id of a chunk whose bytes travel in the stream


class KVStreamTransport(enum.Enum):
    """How a stream's chunks travel."""

    GRPC = "grpc"  # the bytes in the stream's messages (direct, worker to worker)
    STORE = "store"  # each chunk put on the prefill worker's store node under its own lease
    DIST = "dist"  # each chunk in the prefill worker's outbox, pulled over the process group


class StreamStatus(enum.Enum):
    OPEN = "open"  # the prefill runs; chunks may still come
    FINISHED = "finished"  # every chunk and the final published
    FAILED = "failed"  # the prefill failed (error set)
    CANCELLED = "cancelled"  # the consumer (or the caller) gave up, or nobody consumed it in time


def ready_blocks(num_computed_tokens: int, num_prompt_tokens: int, block_size: int, finished: bool) -> int:
    """Leading blocks of a prompt whose KV is final: every block (the last may be partial) once
    the prefill finished, else the blocks whose every slot holds a computed token."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    total = -(-num_prompt_tokens // block_size)
    if finished:
        return total
    return min(total, max(0, num_computed_tokens) // block_size)


@dataclass(frozen=True)
class StreamChunk:
    """Blocks ``[first_block, first_block + n)`` of a request's KV: ``blocks`` (inline) or
    ``handle`` (in a store under a lease); ``block_hashes`` / ``checksums`` name each block."""

    index: int
    first_block: int
    block_hashes: tuple[BlockHash, ...]
    checksums: tuple[int, ...]
    blocks: torch.Tensor | None = None
    handle: KVHandle | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.block_hashes)


@dataclass(frozen=True)
class StreamFinal:
    """The end of a stream: the prompt's token count, its blocks and chunks, the first token."""

    num_tokens: int
    num_blocks: int
    num_chunks: int
    first_token: int
    first_logprob: TokenLogprob | None = None


@dataclass(frozen=True)
class StreamManifest:
    """What a stream holds now: ``ready_chunks`` published (``ready_blocks`` leading blocks
    covered), its status, and the error of a failed stream."""

    request_id: str
    status: StreamStatus
    ready_chunks: int
    ready_blocks: int
    num_tokens: int
    error: str = ""


class ChunkSink(Protocol):
    """Where a chunk's blocks go. ``reclaims_delivered``: the stream drops (:meth:`drop`) every
    chunk when it fails or is cancelled before its final was handed over, not only the
    undelivered ones (chunks that live in this process, see the module docstring)."""

    reclaims_delivered: ClassVar[bool]

    def put(
        self, request_id: str, index: int, first_block: int, hashes: list[BlockHash], blocks: torch.Tensor
    ) -> StreamChunk: ...

    def drop(self, chunk: StreamChunk) -> None:
        """Release what an undelivered chunk holds (a store lease); never raises."""
        ...


class InlineChunkSink:
    """Chunks kept in memory and sent in the stream's messages (the direct gRPC path)."""

    reclaims_delivered: ClassVar[bool] = False

    def put(
        self, request_id: str, index: int, first_block: int, hashes: list[BlockHash], blocks: torch.Tensor
    ) -> StreamChunk:
        blocks = blocks.detach().cpu().contiguous()
        sums = tuple(block_checksum(tensor_bytes(blocks[i])) for i in range(blocks.shape[0]))
        return StreamChunk(index, first_block, tuple(hashes), sums, blocks=blocks)

    def drop(self, chunk: StreamChunk) -> None:
        return None  # memory only: the chunk object goes with the stream


class StoreChunkSink:
    """Chunks put on the worker's store node, each under a lease of its own, by ``publisher``
    (per-block checksums, write-once conflicts and tenant quotas as for any handoff);
    ``client`` releases the lease of a chunk that is dropped undelivered."""

    reclaims_delivered: ClassVar[bool] = False

    def __init__(
        self,
        publisher: StorePublisher,
        client: KVStoreClient,
        layout: KVLayout,
        model_id: str,
        lease_ttl_s: float,
        tenant: str = "",
    ) -> None:
        self.publisher = publisher
        self.client = client
        self.layout = layout
        self.model_id = model_id
        self.lease_ttl_s = lease_ttl_s
        self.tenant = tenant
        self.released = 0  # leases of dropped chunks released

    def put(
        self, request_id: str, index: int, first_block: int, hashes: list[BlockHash], blocks: torch.Tensor
    ) -> StreamChunk:
        lay = self.layout
        kv = KVExport(
            request_id=f"{request_id}#chunk{index}",
            model_id=self.model_id,
            token_ids=[0] * (len(hashes) * lay.block_size),  # the publisher reads only their count
            first_token=0,
            block_hashes=list(hashes),
            blocks=blocks.detach().cpu().contiguous(),
            shape=KVShape(
                lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size, getattr(torch, lay.dtype)
            ),
        )
        h = self.publisher.publish(kv, self.layout, self.lease_ttl_s, self.tenant)
        return StreamChunk(index, first_block, tuple(hashes), tuple(h.block_checksums), handle=h)

    def drop(self, chunk: StreamChunk) -> None:
        h = chunk.handle
        if h is None or not h.lease_id:
            return
        try:
            self.client.release(h.lease_id)
            self.released += 1
        except Exception as e:  # noqa: BLE001 - the lease expires with its TTL anyway
            log.warning("could not release the lease of stream chunk %s: %s", h.request_id, e)


class DistChunkSink:
    """Chunks kept in the worker's direct-transfer outbox by ``publisher`` (a
    :class:`~prefill_worker.dist_outbox.DistPublisher`), each under a key of its own (short: the
    transfer header carries at most 184 bytes of id), for the decode worker's pull over the
    process group (``KVPeer.PushKV``; a decode worker outside the group has it spilled to the
    store with ``KVPeer.SpillKV``). The chunk's handle is the publisher's direct handle with the
    per-block XXH3 checksums computed here, so the consumer verifies the bytes it received as for
    any other chunk. When the publisher fell back to the store (the group failed to form, a
    chunk larger than the outbox), the chunk is a store chunk and ``client`` releases its lease
    when it is dropped. Dropping a direct chunk takes it out of the outbox (a no-op once pushed)."""

    reclaims_delivered: ClassVar[bool] = True

    def __init__(
        self,
        publisher: DistPublisher,
        layout: KVLayout,
        model_id: str,
        lease_ttl_s: float,
        tenant: str = "",
        client: KVStoreClient | None = None,
    ) -> None:
        self.publisher = publisher
        self.layout = layout
        self.model_id = model_id
        self.lease_ttl_s = lease_ttl_s
        self.tenant = tenant
        self.client = client
        self._key = f"kvstream-{uuid.uuid4().hex}"  # this stream's outbox keys: unique, short
        self.reclaimed = 0  # outbox entries of dropped chunks taken back
        self.released = 0  # store leases of dropped (fallen back) chunks released

    def put(
        self, request_id: str, index: int, first_block: int, hashes: list[BlockHash], blocks: torch.Tensor
    ) -> StreamChunk:
        lay = self.layout
        blocks = blocks.detach().cpu().contiguous()
        sums = tuple(block_checksum(tensor_bytes(blocks[i])) for i in range(blocks.shape[0]))
        kv = KVExport(
            request_id=f"{self._key}-{index}",
            model_id=self.model_id,
            token_ids=[0] * (len(hashes) * lay.block_size),  # the publisher reads only their count
            first_token=0,
            block_hashes=list(hashes),
            blocks=blocks,
            shape=KVShape(
                lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.block_size, getattr(torch, lay.dtype)
            ),
        )
        h = self.publisher.publish(kv, lay, self.lease_ttl_s, self.tenant)
        if h.is_direct:  # the outbox keeps bytes only: the checksums travel in the handle
            h = replace(h, block_checksums=sums)
        return StreamChunk(index, first_block, tuple(hashes), tuple(h.block_checksums), handle=h)

    def drop(self, chunk: StreamChunk) -> None:
        h = chunk.handle
        if h is None:
            return
        if h.is_direct:
            if self.publisher.outbox.take(h.request_id) is not None:
                self.reclaimed += 1
            return
        if not h.lease_id or self.client is None:
            return
        try:
            self.client.release(h.lease_id)
            self.released += 1
        except Exception as e:  # noqa: BLE001 - the lease expires with its TTL anyway
            log.warning("could not release the lease of stream chunk %s: %s", h.request_id, e)


class KVStream:
    """One request's KV stream (see the module docstring for the ownership contract)."""

    def __init__(
        self,
        request_id: str,
        layout: KVLayout,
        num_tokens: int,
        drop: Callable[[StreamChunk], None],
        reclaim_delivered: bool = False,
    ) -> None:
        """``reclaim_delivered``: when the stream fails or is cancelled before its final was
        handed over, ``drop`` every chunk, the delivered ones too (see ``ChunkSink``)."""
        self.request_id = request_id
        self.layout = layout
        self.num_tokens = num_tokens
        self._drop = drop
        self._reclaim_delivered = reclaim_delivered
        self._cond = threading.Condition()
        self._chunks: list[StreamChunk] = []
        self._delivered = 0  # chunks handed to the consumer (they are its own from then on)
        self._final: StreamFinal | None = None
        self._final_taken = False
        self._status = StreamStatus.OPEN
        self._error: PdserveError | None = None
        self._consumer = False
        self.finished_at: float | None = None  # monotonic, once FINISHED

    # ------------------------------------------------------------- producer
    def add(self, chunk: StreamChunk) -> None:
        """Publish ``chunk`` (the next index). A stream that ended drops it and raises
        CancelledError (the producer stops)."""
        with self._cond:
            if self._status is StreamStatus.OPEN and chunk.index == len(self._chunks):
                self._chunks.append(chunk)
                self._cond.notify_all()
                return
            status, n = self._status, len(self._chunks)
        self._drop(chunk)
        if status is StreamStatus.OPEN:
            raise InvalidRequestError(f"stream {self.request_id!r}: chunk {chunk.index} after {n} chunks")
        raise CancelledError(f"the KV stream of {self.request_id!r} ended ({status.value})")

    def finish(self, final: StreamFinal) -> None:
        """Every chunk is published: ``final`` closes the stream (CancelledError if it ended)."""
        with self._cond:
            if self._status is not StreamStatus.OPEN:
                raise CancelledError(f"the KV stream of {self.request_id!r} ended ({self._status.value})")
            if final.num_chunks != len(self._chunks):
                raise InvalidRequestError(
                    f"stream {self.request_id!r}: final names {final.num_chunks} chunks, {len(self._chunks)} published"
                )
            self._final = final
            self._status = StreamStatus.FINISHED
            self.finished_at = time.monotonic()
            self._cond.notify_all()

    def fail(self, error: PdserveError) -> None:
        """The prefill failed: undelivered chunks are dropped; the consumer gets ``error``."""
        self._end(StreamStatus.FAILED, error)

    def cancel(self, why: str) -> None:
        """The consumer or the caller gave up: undelivered chunks are dropped, the producer's next
        :meth:`add` / :meth:`finish` raises CancelledError."""
        self._end(StreamStatus.CANCELLED, CancelledError(why))

    def _end(self, status: StreamStatus, error: PdserveError) -> None:
        with self._cond:
            if self._status in (StreamStatus.FAILED, StreamStatus.CANCELLED) or self._final_taken:
                return  # already ended, or everything was handed over
            self._status, self._error = status, error
            keep = 0 if self._reclaim_delivered else self._delivered
            undelivered, self._chunks = self._chunks[keep:], self._chunks[:keep]
            self._delivered = min(self._delivered, keep)
            self._cond.notify_all()
        for c in undelivered:
            self._drop(c)

    # ------------------------------------------------------------- state
    @property
    def status(self) -> StreamStatus:
        with self._cond:
            return self._status

    @property
    def ended(self) -> bool:
        """Nothing more will happen: failed, cancelled, or its final handed to the consumer."""
        with self._cond:
            return self._final_taken or self._status in (StreamStatus.FAILED, StreamStatus.CANCELLED)

    @property
    def has_consumer(self) -> bool:
        with self._cond:
            return self._consumer

    def manifest(self) -> StreamManifest:
        """How many chunks (and leading blocks) are ready now, and the stream's status."""
        with self._cond:
            return StreamManifest(
                self.request_id,
                self._status,
                len(self._chunks),
                sum(c.num_blocks for c in self._chunks),
                self.num_tokens,
                self._error.message if self._error is not None else "",
            )

    # ------------------------------------------------------------- consumer
    def consume(self, timeout_s: float) -> Iterator[StreamChunk | StreamFinal]:
        """Chunks in index order as they are published, then the final. One consumer per stream
        (a second: InvalidRequestError). Waits at most ``timeout_s`` for each next item (then
        UnavailableError, and the stream is cancelled). A failed stream raises its error;
        closing the iterator before the final cancels the stream."""
        with self._cond:
            if self._consumer:
                raise InvalidRequestError(f"the KV stream of {self.request_id!r} already has a consumer")
            self._consumer = True
        return self._items(timeout_s)

    def _items(self, timeout_s: float) -> Iterator[StreamChunk | StreamFinal]:
        try:
            while True:
                with self._cond:
                    deadline = time.monotonic() + timeout_s
                    while self._status is StreamStatus.OPEN and self._delivered == len(self._chunks):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                    if self._status in (StreamStatus.FAILED, StreamStatus.CANCELLED):
                        assert self._error is not None
                        raise self._error
                    item: StreamChunk | StreamFinal
                    if self._delivered < len(self._chunks):
                        item = self._chunks[self._delivered]
                        self._delivered += 1
                    elif self._final is not None:
                        item = self._final
                        self._final_taken = True
                    else:
                        raise UnavailableError(
                            f"the KV stream of {self.request_id!r} published nothing for {timeout_s} s"
                        )
                yield item
                if isinstance(item, StreamFinal):
                    return
        finally:
            self.cancel(f"the consumer of {self.request_id!r}'s KV stream went away")  # no-op once done


class KVStreamRegistry:
    """A prefill worker's KV streams by request id.

    ``ttl_s``: a stream that finished is dropped (undelivered chunks released) when nobody has
    started consuming it this long after; an ended stream leaves the registry. ``wait_s``: how
    long :meth:`take` waits for a stream that is not opened yet."""

    def __init__(self, ttl_s: float = 60.0, wait_s: float = 30.0) -> None:
        if not ttl_s > 0 or not wait_s >= 0:
            raise ValueError(f"ttl_s must be > 0 and wait_s >= 0, got {ttl_s}, {wait_s}")
        self.ttl_s = ttl_s
        self.wait_s = wait_s
        self._cond = threading.Condition()
        self._streams: dict[str, KVStream] = {}
        self.opened = 0
        self.expired = 0
        self._sweeper = Sweeper(self.sweep, "kv-stream-sweeper")

    def open(
        self,
        request_id: str,
        layout: KVLayout,
        num_tokens: int,
        drop: Callable[[StreamChunk], None],
        reclaim_delivered: bool = False,
    ) -> KVStream:
        """A new stream (``reclaim_delivered``: see :class:`KVStream`); InvalidRequestError when
        one with this id is still live."""
        self.sweep()
        with self._cond:
            old = self._streams.get(request_id)
            if old is not None and not old.ended:
                raise InvalidRequestError(f"a KV stream for request {request_id!r} is already open")
            s = self._streams[request_id] = KVStream(request_id, layout, num_tokens, drop, reclaim_delivered)
            self.opened += 1
            self._cond.notify_all()
        return s

    def get(self, request_id: str) -> KVStream | None:
        with self._cond:
            return self._streams.get(request_id)

    def close(self, stream: KVStream) -> None:
        """Forget ``stream`` if it ended (called by its producer and its consumer when done)."""
        with self._cond:
            if self._streams.get(stream.request_id) is stream and stream.ended:
                del self._streams[stream.request_id]

    def take(self, request_id: str) -> KVStream:
        """The stream of ``request_id``, waiting up to ``wait_s`` for it to be opened (the decode
        side may ask first); RequestNotFoundError after."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while (s := self._streams.get(request_id)) is None or s.ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestNotFoundError(
                        f"no KV stream for request {request_id!r} on this prefill worker (never opened "
                        f"within {self.wait_s} s, already consumed, failed or expired)"
                    )
                self._cond.wait(left)
        return s

    def sweep(self) -> int:
        """Cancel finished streams nobody started consuming within ``ttl_s`` (their chunks'
        leases released) and forget ended ones; returns how many expired."""
        now = time.monotonic()
        with self._cond:
            streams = list(self._streams.values())
        n = 0
        for s in streams:
            t = s.finished_at
            if (
                s.status is StreamStatus.FINISHED
                and not s.has_consumer
                and t is not None
                and now - t >= self.ttl_s
            ):
                s.cancel(f"nobody consumed the KV stream of {s.request_id!r} within {self.ttl_s} s")
                n += 1
            self.close(s)
        self.expired += n
        return n

    def start_sweeper(self, interval_s: float = 1.0) -> None:
        """:meth:`sweep` every ``interval_s`` seconds on a daemon thread until :meth:`stop`."""
        self._sweeper.start(interval_s)

    def cancel(self, request_id: str, why: str) -> bool:
        """Cancel the stream of ``request_id`` now if it is still live (its chunks not handed to
        a consumer dropped, leases released; a consumer gets the cancellation); True if there was
        one. The worker's ``Abort`` of the request calls it: the router aborts a streamed prefill
        whose client left before the decode worker subscribed, so that its KV does not wait
        ``ttl_s`` for a consumer that will never come."""
        with self._cond:
            s = self._streams.get(request_id)
        if s is None or s.ended:
            return False
        s.cancel(why)
        self.close(s)
        return True

    def stop(self) -> None:
        """Stop the sweeper and cancel every live stream (their undelivered chunks dropped)."""
        self._sweeper.stop()
        with self._cond:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s.cancel("the prefill worker is stopping")

    def live(self) -> list[StreamManifest]:
        """Manifests of the streams still registered."""
        with self._cond:
            streams = list(self._streams.values())
        return [s.manifest() for s in streams]


# ------------------------------------------------------------------ producer


@dataclass(frozen=True)
class StreamedPrefill:
    """What :func:`prefill_streamed` returns: the final, the prompt tokens the prefix cache
    served, and when the engine finished the prompt / the last chunk was published (monotonic)."""

    final: StreamFinal
    num_cached_tokens: int
    t_prefill_done: float
    t_published: float


@dataclass(frozen=True)
class _Snapshot:
    blocks: torch.Tensor | None  # copy of the blocks final since the last snapshot
    end: int  # the leading blocks they reach
    finished: bool
    first_token: int = 0
    first_logprob: TokenLogprob | None = None
    num_cached_tokens: int = 0


def _snapshot(e: LLMEngine, rid: str, sent: int, n_tokens: int, copy: bool) -> _Snapshot:
    """On the engine thread, between two steps: the blocks of ``rid`` that became final since
    block ``sent`` (copied when ``copy`` or once finished). A finished request's blocks are
    released here, after the copy (full blocks stay in the local prefix cache)."""
    bs = e.kv.block_size
    tr = e._prefilled.get(rid)
    finished = tr is not None
    if tr is None:
        tr = e._tracked.get(rid)
        if tr is None:
            raise RequestNotFoundError(f"request {rid!r} left the engine during its prefill")
    req = tr.req
    table = e.kv.block_table(rid)
    end = max(sent, min(ready_blocks(req.num_computed_tokens, n_tokens, bs, finished), len(table)))
    blocks = None
    if end > sent and (copy or finished):
        ids = table[sent:end]
        if NULL_BLOCK in ids:
            raise RuntimeError(f"request {rid!r} lost blocks during its prefill")
        blocks = e.runner.export_blocks(ids)
        if blocks.device.type != "cpu":
            blocks = blocks.cpu()
    if not finished:
        return _Snapshot(blocks, end if blocks is not None else sent, False)
    snap = _Snapshot(
        blocks,
        end,
        True,
        req.output_token_ids[0],
        tr.logprobs[0] if tr.logprobs else None,
        max(0, req.num_cached_tokens),
    )
    e.release(rid)
    return snap


def prefill_streamed(
    loop: EngineLoop,
    registry: KVStreamRegistry,
    sink: ChunkSink,
    layout: KVLayout,
    request_id: str,
    prompt: list[int],
    adder: Callable[[LLMEngine], Any],
    *,
    model_id: str,
    adapter_id: str = "",
    cache_salt: str = "",
    streaming: bool = True,
    is_active: Callable[[], bool] = lambda: True,
    poll_s: float = 0.002,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
) -> StreamedPrefill:
    """Run the prefill-only request ``request_id`` (``adder`` adds it to the engine) and stream
    its KV into a new stream of ``registry`` (see the module docstring). ``streaming=False``:
    one chunk at the end (the non-streamed handoff). ``is_active``: False once the caller went
    away (the prefill is aborted). On any failure the request is aborted in the engine (or its
    exported blocks released), the stream failed (its undelivered chunks dropped) and the error
    re-raised."""
    if not prompt:
        raise InvalidRequestError("prompt is empty: send at least one token")
    hashes = chain_hashes(prompt, layout.block_size, model_id, adapter_id, cache_salt, include_partial=True)
    per = max(1, max_chunk_bytes // layout.block_nbytes)
    stream = registry.open(request_id, layout, len(prompt), sink.drop, sink.reclaims_delivered)
    sent = chunks = 0
    added = False
    try:
        q = loop.add(request_id, adder)
        added = True
        while True:
            if not is_active():
                raise CancelledError(f"the caller of {request_id!r}'s prefill went away")
            if stream.status is StreamStatus.CANCELLED:
                raise CancelledError(f"the KV stream of {request_id!r} was cancelled")
            snap = loop.call(lambda e, s=sent: _snapshot(e, request_id, s, len(prompt), streaming))
            if snap.finished:
                t_done = time.monotonic()
            if snap.blocks is not None:
                for a in range(0, snap.blocks.shape[0], per):  # transfer units of <= max_chunk_bytes
                    part = snap.blocks[a : a + per]
                    first = sent + a
                    stream.add(
                        sink.put(request_id, chunks, first, hashes[first : first + part.shape[0]], part)
                    )
                    chunks += 1
                sent = snap.end
            if snap.finished:
                break
            try:  # the engine's only output for a prefill-only request: its end, or its failure
                item = q.get(timeout=poll_s) if snap.blocks is None else q.get_nowait()
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
        final = StreamFinal(len(prompt), sent, chunks, snap.first_token, snap.first_logprob)
        stream.finish(final)
        return StreamedPrefill(final, snap.num_cached_tokens, t_done, time.monotonic())
    except BaseException as e:
        if added:
            loop.abort(request_id)  # frees its blocks if it is still prefilling
            _release_if_prefilled(loop, request_id)
        err = e if isinstance(e, PdserveError) else UnavailableError(f"prefill of {request_id!r} failed: {e}")
        stream.fail(err)
        log_event(
            log, "kv stream failed", logging.WARNING, request_id=request_id, chunks=chunks, error=str(e)
        )
        raise
    finally:
        registry.close(stream)


def _release_if_prefilled(loop: EngineLoop, rid: str) -> None:
    """Free ``rid``'s exported blocks if its prefill had finished (an abort does not)."""

    def rel(e: LLMEngine) -> None:
        if rid in e._prefilled:
            e.release(rid)

    try:
        loop.call(rel)
    except Exception as e:  # noqa: BLE001 - the engine loop is gone: nothing to free
        log.warning("could not release %s after a failed stream: %s", rid, e)


# ------------------------------------------------------------------ gRPC


def chunk_to_proto(c: StreamChunk, layout: KVLayout) -> worker_pb2.MigrationChunk:
    """A chunk as a ``MigrationChunk.blocks`` message (see the module docstring)."""
    if c.handle is not None:
        kv = handle_to_proto(c.handle)
        data = b""
    else:
        assert c.blocks is not None
        kv = handle_to_proto(
            KVHandle(
                request_id="",
                block_hashes=c.block_hashes,
                locations=(BlockLocation(INLINE_NODE),) * c.num_blocks,
                layout=layout,
                num_tokens=c.num_blocks * layout.block_size,
                block_checksums=c.checksums,
            )
        )
        data = bytes(tensor_bytes(c.blocks)) if c.num_blocks else b""
    return worker_pb2.MigrationChunk(
        blocks=worker_pb2.MigrationBlocks(
            first_block=c.first_block, num_blocks=c.num_blocks, data=data, kv=kv, end_of_stage=True
        )
    )


def final_to_proto(f: StreamFinal) -> worker_pb2.MigrationChunk:
    """The final as ``MigrationChunk.final``: num_computed_tokens = the prompt's tokens,
    output_token_ids = [first token], detok_emitted = the chunk count (checked by the consumer)."""
    return worker_pb2.MigrationChunk(
        final=worker_pb2.MigrationFinal(
            num_computed_tokens=f.num_tokens,
            output_token_ids=[f.first_token],
            logprobs=[logprob_to_proto(f.first_logprob)] if f.first_logprob is not None else [],
            detok_emitted=f.num_chunks,
        )
    )


def stream_kv_messages(
    registry: KVStreamRegistry, request_id: str, item_timeout_s: float = 120.0
) -> Iterator[worker_pb2.MigrationChunk]:
    """The messages of ``StreamKV(request_id)``: ``begin`` (the layout), each chunk, the final.
    Closing the iterator early cancels the stream (the prefill stops, undelivered chunks dropped)."""
    if not request_id:
        raise InvalidRequestError("StreamKV: request_id is required")
    s = registry.take(request_id)
    items = s.consume(item_timeout_s)
    try:
        yield worker_pb2.MigrationChunk(
            begin=worker_pb2.MigrationBegin(request_id=request_id, layout=layout_to_proto(s.layout))
        )
        for item in items:
            yield final_to_proto(item) if isinstance(item, StreamFinal) else chunk_to_proto(item, s.layout)
    finally:
        items.close()
        registry.close(s)


def stream_kv_handler(registry: KVStreamRegistry, item_timeout_s: float = 120.0) -> grpc.GenericRpcHandler:
    """``/pdserve.v1.KVStream/StreamKV`` over ``registry`` for a sync ``grpc.server`` (add it with
    ``server.add_generic_rpc_handlers``). Request ``ResumeStreamRequest`` (request_id,
    start_index 0), response stream ``MigrationChunk``; errors become statuses through
    :func:`pdserve.status.abort_with`; a cancelled call cancels the stream."""

    def stream_kv(req: worker_pb2.ResumeStreamRequest, ctx: grpc.ServicerContext) -> Iterator[Any]:
        try:
            if req.start_index != 0:
                raise InvalidRequestError("StreamKV: a KV stream is read from its start (start_index 0)")
            yield from stream_kv_messages(registry, req.request_id, item_timeout_s)
        except PdserveError as e:
            abort_with(ctx, e)

    handler = grpc.unary_stream_rpc_method_handler(
        stream_kv,
        request_deserializer=worker_pb2.ResumeStreamRequest.FromString,
        response_serializer=worker_pb2.MigrationChunk.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(STREAM_METHOD.split("/")[1], {"StreamKV": handler})
