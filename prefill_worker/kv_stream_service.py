"""The ``KVStream`` gRPC service of a prefill worker on ``grpc.aio`` (#12 §1: no thread per call).

The consumer side of :mod:`prefill_worker.kv_stream` (a decode worker reads a streamed prefill's
KV with ``StreamKV``). :func:`prefill_worker.kv_stream.stream_kv_handler` serves the same method
on a sync ``grpc.server``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from kv_store.convert import layout_to_proto
from pdserve.errors import InvalidRequestError
from pdserve.thread_iter import iterate_on_threads
from pdserve.v1 import worker_pb2
from prefill_worker.kv_stream import (
    KVStreamRegistry,
    StreamFinal,
    chunk_to_proto,
    final_to_proto,
)


class KVStreamServicer:
    """The ``KVStream`` gRPC service of a prefill worker (worker.proto) over its registry, on the
    worker's ``grpc.aio`` server (#12): a ``StreamKV`` is a task of the event loop; its blocking
    waits (for the stream to be opened, for each next chunk: the producer's condition) run on a
    thread of :attr:`executor` (``threads`` of them), which is free again between chunks. A
    caller that goes away cancels the stream (the prefill stops, undelivered chunks dropped), as
    with :func:`stream_kv_handler`."""

    def __init__(self, registry: KVStreamRegistry, item_timeout_s: float = 120.0, threads: int = 32) -> None:
        self.registry = registry
        self.item_timeout_s = item_timeout_s
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kv-stream")

    async def StreamKV(
        self, req: worker_pb2.ResumeStreamRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.MigrationChunk]:
        if req.start_index != 0:
            raise InvalidRequestError("StreamKV: a KV stream is read from its start (start_index 0)")
        if not req.request_id:
            raise InvalidRequestError("StreamKV: request_id is required")
        loop = asyncio.get_running_loop()
        s = await loop.run_in_executor(self.executor, self.registry.take, req.request_id)
        items = s.consume(self.item_timeout_s)

        def messages() -> Iterator[worker_pb2.MigrationChunk]:
            try:
                yield worker_pb2.MigrationChunk(
                    begin=worker_pb2.MigrationBegin(
                        request_id=req.request_id, layout=layout_to_proto(s.layout)
                    )
                )
                for item in items:
                    if isinstance(item, StreamFinal):
                        yield final_to_proto(item)
                        return
                    yield chunk_to_proto(item, s.layout)
            finally:
                items.close()
                self.registry.close(s)

        def abandon() -> None:  # a stream left before its final is cancelled (and forgotten)
            s.cancel(f"the consumer of {req.request_id!r}'s KV stream went away")
            self.registry.close(s)

        async for m in iterate_on_threads(messages(), self.executor, abandon):
            yield m

    def close(self) -> None:
        """Stop the waiting threads (after the server stopped)."""
        self.executor.shutdown(wait=False, cancel_futures=True)
