"""Prefill worker: the engine in prefill role behind the Worker gRPC service.

Prefill(request): pull any longer cached prefix from the store into the local prefix cache when
that is predicted faster than recomputing it (:mod:`prefill_worker.prefix_policy`), run (chunked)
prefill, sample the first token, publish the request's blocks to the store under a
lease, free them locally (full blocks stay in the local prefix cache) and return the KVHandle.

Parallel sampling (sampling ``n > 1`` or ``best_of > 1``): the prompt is prefilled once, all but
its last token (:func:`prefill_worker.groups.group_prefix`), nothing is sampled, and the response
says ``prompt_tail_pending``: the decode worker forks the choices over these blocks and each
computes the last prompt token itself (``LLMEngine.import_kv_group``). With ``kv_stream`` the
group's blocks (all but the last prompt token) are streamed as a single request's are, and the
response says ``prompt_tail_pending`` with no handle.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import grpc
import torch

from engine.llm_engine import KVExport, LLMEngine
from kv_store.client import KVStoreClient
from kv_store.convert import handle_to_proto
from kv_store.handle import KVHandle
from kv_store.tensors import block_tensor
from kv_store.transport import BlockTransport
from pdserve.errors import CancelledError, InternalError, InvalidRequestError
from pdserve.proto_convert import logprob_to_proto, sampling_from_proto
from pdserve.tracing import log_event, request_scope
from pdserve.v1 import common_pb2, worker_pb2
from pdserve.worker_base import WorkerState
from prefill_worker.dist_outbox import DistPublisher
from prefill_worker.groups import group_prefix
from prefill_worker.kv_stream import (
    ChunkSink,
    DistChunkSink,
    InlineChunkSink,
    KVStreamRegistry,
    StoreChunkSink,
    prefill_streamed,
)
from prefill_worker.prefix_policy import PrefixDecision, PrefixFetchPolicy
from prefill_worker.publisher import KVPublisher, StorePublisher

log = logging.getLogger(__name__)


class _ExportOnFinish:
    """The output queue of one prefill (``EngineLoop.add``'s ``out``): when the request's finished
    output comes (on the engine thread, between steps) its KV is exported (a copy) and its blocks
    released right there, so :meth:`get` returns ``(output, KVExport)`` and the request costs one
    wait for the engine loop, not two (#12: a worker's cost per request). A failure (an engine
    error, an abort) comes as ``(exception, None)``; an export that fails comes as its exception.
    The export's copy is now inside the prefill's wait, so ``Timing.prefill_s`` includes it (before,
    ``transfer_s`` did)."""

    def __init__(self, engine: LLMEngine, rid: str) -> None:
        self._engine, self._rid = engine, rid
        self._q: queue.SimpleQueue[tuple[object, KVExport | None]] = queue.SimpleQueue()

    def _hand(self, value: tuple[object, KVExport | None]) -> None:  # engine thread
        """Deliver ``value`` to the waiting call (here: :meth:`get`)."""
        self._q.put(value)

    def put(self, item: object) -> None:  # engine thread
        if isinstance(item, BaseException) or not getattr(item, "finished", False):
            self._hand((item, None))
            return
        try:
            kv = self._engine.export_kv(self._rid)
            self._engine.release(self._rid)
        except Exception as e:  # noqa: BLE001 - handed to the Prefill call, which raises it
            self._hand((e, None))
            return
        self._hand((item, kv))

    def add_failed(self, fut: Future) -> None:
        """Done-callback of the request's add (``EngineLoop.add_submit``): an add that failed
        (or never ran) comes to the waiting call as its exception, as an engine error would."""
        if fut.cancelled():
            self._hand((CancelledError(f"prefill of {self._rid!r} was not added: cancelled"), None))
        elif (e := fut.exception()) is not None:
            self._hand((e, None))

    def get(self) -> tuple[object, KVExport | None]:
        return self._q.get()


def log_done(req: worker_pb2.PrefillRequest, resp: worker_pb2.PrefillResponse) -> None:
    """The "prefill done" log line of a Prefill call."""
    t = resp.timing
    log_event(
        log,
        "prefill done",
        request_id=resp.request_id,
        prompt_tokens=len(req.prompt_token_ids),
        cached_tokens=resp.num_cached_tokens,
        blocks=len(resp.kv.block_hashes),
        queue_s=round(t.queue_s, 6),
        prefill_s=round(t.prefill_s, 6),
        transfer_s=round(t.transfer_s, 6),
    )


def prefill_response(
    rid: str,
    item: Any,
    kv: KVExport,
    handle: KVHandle,
    num_run_tokens: int,
    group: bool,
    t_arrive: float,
    t_prefilled: float,
) -> worker_pb2.PrefillResponse:
    """The response of a (not streamed) prefill: ``item`` its finished engine output, ``kv`` its
    export, ``handle`` where it was published, ``num_run_tokens`` the tokens it prefilled;
    timing: queued, prefilled (``t_arrive`` .. ``t_prefilled``), published (until now)."""
    m = item.metrics
    queue_s = (m.first_scheduled_time - m.arrival_time) if m and m.first_scheduled_time else 0.0
    resp = worker_pb2.PrefillResponse(
        request_id=rid,
        first_token=0 if group else kv.first_token,  # a group's token is discarded
        kv=handle_to_proto(handle),
        num_cached_tokens=item.num_cached_tokens,
        num_computed_tokens=num_run_tokens - item.num_cached_tokens,
        prompt_tail_pending=group,
        timing=common_pb2.Timing(
            queue_s=queue_s,
            prefill_s=(t_prefilled - t_arrive) - queue_s,
            transfer_s=time.monotonic() - t_prefilled,
        ),
    )
    if kv.first_logprob is not None and not group:
        resp.first_token_logprob.CopyFrom(logprob_to_proto(kv.first_logprob))
    return resp


class PrefillServicer:
    """The Worker service in prefill role.

    ``prefix_policy`` decides, per request, whether a prefix found in the store is pulled or
    recomputed (default: one with :class:`~prefill_worker.prefix_policy.PrefixFetchConfig` defaults);
    it learns from this servicer's store round trips, pulls and engine throughput. Counters:
    ``store_prefix_tokens_total`` (tokens pulled from the store), ``prefix_recomputed_tokens_total``
    (store-held tokens recomputed instead), and ``prefix_policy.counts`` (decisions).
    """

    def __init__(
        self,
        state: WorkerState,
        publisher: KVPublisher,
        store: KVStoreClient | None,
        transport: BlockTransport | None,
        prefix_policy: PrefixFetchPolicy | None = None,
    ) -> None:
        self.state = state
        self.publisher = publisher
        self.store = store
        self.transport = transport
        self.prefix_policy = prefix_policy or PrefixFetchPolicy()
        self.store_prefix_tokens_total = 0
        self.streams = KVStreamRegistry()  # streamed prefills' KV (KVStream.StreamKV reads them)
        self.prefix_recomputed_tokens_total = 0

    def _pull_prefix_from_store(self, ids: list[int], adapter: str, salt: str) -> int:
        """Fetch prefix blocks that the store has and the local cache lacks; returns tokens added."""
        if not self._wants_store_prefix(ids):
            return 0  # no store, or no full block before the last token: nothing to serve

        hashes, local = self.state.loop.call(self._prefix_probe(ids, adapter, salt))
        return self._pull_missing_prefix(hashes, local)

    def _wants_store_prefix(self, ids: list[int]) -> bool:
        """Whether a prompt could have a prefix worth looking up in the store (a store, and a
        full block before its last token)."""
        if self.store is None or self.transport is None:
            return False
        return len(ids) - 1 >= self.state.layout.block_size

    @staticmethod
    def _prefix_probe(ids: list[int], adapter: str, salt: str) -> Callable[[LLMEngine], tuple[list, int]]:
        """The engine-thread probe of a prefix pull: (the prompt's block hashes, how many of them
        the local prefix cache holds), one wait for the engine loop (#12)."""

        def probe(e: LLMEngine) -> tuple[list, int]:
            hashes = e.prefix_hashes(ids, adapter, salt)
            return hashes, e.num_local_prefix_blocks(hashes)

        return probe

    def _pull_missing_prefix(self, hashes: list, local: int) -> int:
        """The rest of :meth:`_pull_prefix_from_store` after its probe (blocking store calls)."""
        if local == len(hashes):
            return 0
        t0 = time.monotonic()
        found = self.store.lookup(hashes)
        self.prefix_policy.observe_call(time.monotonic() - t0)
        if found.num_prefix_blocks <= local:
            return 0
        # pull from one node: the longest run of wanted blocks that the first one's node holds
        loc = found.locations[local][0]
        end = local
        while end < found.num_prefix_blocks and any(x.node_id == loc.node_id for x in found.locations[end]):
            end += 1
        want = hashes[local:end]
        layout = self.state.layout
        nbytes = len(want) * layout.block_nbytes
        est = self.prefix_policy.decide(len(want) * layout.block_size, nbytes)
        log_event(
            log,
            "store prefix decision",
            decision=est.decision.value,
            blocks=len(want),
            fetch_s=round(est.fetch_s, 6),
            recompute_s=round(est.recompute_s, 6),
            bandwidth_bytes_per_s=round(self.prefix_policy.bandwidth_bytes_per_s),
            call_latency_s=round(self.prefix_policy.call_latency_s, 6),
            prefill_tokens_per_s=round(self.prefix_policy.prefill_tokens_per_s, 1),
        )
        if est.decision is PrefixDecision.RECOMPUTE:
            self.prefix_recomputed_tokens_total += len(want) * layout.block_size
            return 0
        t0 = time.monotonic()
        with self.transport.fetch(loc, layout, want) as fetched:
            t = torch.stack([block_tensor(v, layout) for v in fetched.views]).clone()
        # the bytes' cost only: inserting waits for the engine loop, as a recompute would
        self.prefix_policy.observe_fetch(nbytes, time.monotonic() - t0)
        n = self.state.loop.call(lambda e: e.insert_prefix_blocks(want, t))
        return n * layout.block_size

    def Prefill(
        self, req: worker_pb2.PrefillRequest, ctx: grpc.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        """Traced entry: the request id is bound for every log line and store call of the prefill."""
        with request_scope(req.request_id):
            try:
                resp = self._prefill(req, ctx)
            except Exception as e:
                log_event(log, "prefill failed", error=type(e).__name__)
                raise
            log_done(req, resp)
            return resp

    def _prefill(
        self, req: worker_pb2.PrefillRequest, ctx: grpc.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        t_arrive = time.monotonic()
        rid, ids, run_ids, group, add = self._accept(req)
        try:
            store_tokens = self._pull_prefix_from_store(ids, req.adapter, req.cache_salt) if ids else 0
        except Exception as e:  # the store is an optimisation: recompute on any failure
            log.warning("prefix pull from store failed (%s); recomputing", e)
            store_tokens = 0
        self.store_prefix_tokens_total += store_tokens
        if req.kv_stream:  # chunk-wise KV streaming (prefill_worker/kv_stream.py)
            # a group streams the blocks of every prompt token but the last (group_prefix)
            return self._prefill_streamed(req, ctx, rid, run_ids, add, t_arrive, group)
        # engine throughput while this request is in it: the engine is busy throughout (ours or others')
        c0, t_added = self.state.engine.prefill_tokens_computed, time.monotonic()
        q = _ExportOnFinish(self.state.engine, rid)
        # the add is not waited for (#12: one wait for the engine loop per prefill, not two); an
        # add that fails (an invalid request) comes through the queue as its exception
        self.state.loop.add_submit(rid, add, q).add_done_callback(q.add_failed)
        done = {"v": False}
        ctx.add_callback(lambda: None if done["v"] else self.state.loop.abort(rid))
        item, kv = q.get()
        if isinstance(item, BaseException):
            raise item
        if kv is None:  # an output that did not finish the prefill: none is expected
            raise InternalError(f"prefill of {rid!r}: the engine's first output did not finish it")
        self.prefix_policy.observe_prefill(
            self.state.engine.prefill_tokens_computed - c0, time.monotonic() - t_added
        )
        if not ctx.is_active():
            raise CancelledError("client went away during prefill")
        t_prefilled = time.monotonic()
        done["v"] = True
        handle = self.publisher.publish(  # the lease is charged to the request's tenant
            kv, self.state.layout, req.lease_ttl_s or self.state.config.lease_ttl_s, req.tenant
        )
        if not ctx.is_active():
            # the caller went away while the blocks were published: no one will ever learn this
            # handle, so its lease is released now instead of pinning the blocks until its TTL
            self._release_orphan(handle, rid)
            raise CancelledError("client went away while the KV was published")
        self.state.count_finished()
        return prefill_response(rid, item, kv, handle, len(run_ids), group, t_arrive, t_prefilled)

    def _release_orphan(self, handle: KVHandle, rid: str) -> None:
        """Release the lease of ``handle``, published for a caller that went away (blocking;
        a failure is logged: the lease expires anyway)."""
        if not handle.lease_id or self.store is None:
            return
        try:
            self.store.release(handle.lease_id)
        except Exception as e:  # noqa: BLE001 - the lease expires anyway
            log.warning("could not release the lease of cancelled %s: %s", rid, e)

    def _accept(
        self, req: worker_pb2.PrefillRequest
    ) -> tuple[str, list[int], list[int], bool, Callable[[LLMEngine], None]]:
        """The checks of a Prefill before any work (model, adapter, sampling); returns (request
        id, prompt, the tokens to prefill, whether it is a parallel-sampling group, the engine
        add of the prefill-only request)."""
        rid = req.request_id or f"pf-{time.time_ns()}"
        if req.model and req.model != self.state.engine.model_id:
            raise InvalidRequestError(f"this worker serves {self.state.engine.model_id!r}, not {req.model!r}")
        # an adapter this worker does not serve: NOT_FOUND (the router refuses these first)
        self.state.engine.check_adapter(req.adapter)
        params = sampling_from_proto(req.sampling)
        ids = list(req.prompt_token_ids)
        group = params.num_candidates > 1
        run_ids, params = group_prefix(ids, params, req.adapter) if group else (ids, params)

        def add(e: LLMEngine) -> None:
            e.add_request(
                rid,
                run_ids,
                params,
                priority=req.priority,
                adapter_id=req.adapter,
                cache_salt=req.cache_salt,
                prefill_only=True,
            )

        return rid, ids, run_ids, group, add

    def _sink(self, req: worker_pb2.PrefillRequest) -> ChunkSink:
        """Where a streamed prefill's chunks go (``req.kv_stream``)."""
        if req.kv_stream == worker_pb2.KV_STREAM_TRANSPORT_GRPC:
            return InlineChunkSink()
        ttl = req.lease_ttl_s or self.state.config.lease_ttl_s
        if req.kv_stream == worker_pb2.KV_STREAM_TRANSPORT_DIST:
            if not isinstance(self.publisher, DistPublisher):
                raise InvalidRequestError(
                    "KV_STREAM_TRANSPORT_DIST: this prefill worker is not in a torch.distributed process group "
                    "(start it with --dist-init); use KV_STREAM_TRANSPORT_GRPC or KV_STREAM_TRANSPORT_STORE"
                )
            return DistChunkSink(
                self.publisher,
                self.state.layout,
                self.state.engine.model_id,
                ttl,
                req.tenant,
                client=self.store,
            )
        if req.kv_stream != worker_pb2.KV_STREAM_TRANSPORT_STORE:
            raise InvalidRequestError(f"kv_stream {req.kv_stream} is not a KVStreamTransport")
        pub = (
            self.publisher
            if isinstance(self.publisher, StorePublisher)
            else getattr(self.publisher, "fallback", None)
        )
        if not isinstance(pub, StorePublisher) or self.store is None:
            raise InvalidRequestError(
                "KV_STREAM_TRANSPORT_STORE: this prefill worker has no KV store node; use KV_STREAM_TRANSPORT_GRPC"
            )
        return StoreChunkSink(pub, self.store, self.state.layout, self.state.engine.model_id, ttl, req.tenant)

    def _prefill_streamed(
        self,
        req: worker_pb2.PrefillRequest,
        ctx: grpc.ServicerContext,
        rid: str,
        ids: list[int],
        add: Callable[[LLMEngine], None],
        t_arrive: float,
        group: bool = False,
    ) -> worker_pb2.PrefillResponse:
        """A Prefill with ``kv_stream``: its KV goes chunk by chunk into this worker's stream of
        ``rid`` (read by a decode worker with ``KVStream.StreamKV``); the response carries the
        first token and no handle. ``group``: a parallel-sampling request, ``ids`` all but its
        last prompt token; the response says ``prompt_tail_pending`` and carries no token (the
        stream's final still names the discarded one). Timing: ``prefill_s`` until the prompt
        was done, ``transfer_s`` the publish of what was left after it."""
        sink = self._sink(req)
        self.streams.start_sweeper()
        res = prefill_streamed(
            self.state.loop,
            self.streams,
            sink,
            self.state.layout,
            rid,
            ids,
            add,
            model_id=self.state.engine.model_id,
            adapter_id=req.adapter,
            cache_salt=req.cache_salt,
            is_active=ctx.is_active,
        )
        self.state.count_finished()
        f = res.final
        resp = worker_pb2.PrefillResponse(
            request_id=rid,
            first_token=0 if group else f.first_token,  # a group's token is discarded
            num_cached_tokens=res.num_cached_tokens,
            num_computed_tokens=len(ids) - res.num_cached_tokens,
            prompt_tail_pending=group,
            timing=common_pb2.Timing(
                prefill_s=res.t_prefill_done - t_arrive, transfer_s=res.t_published - res.t_prefill_done
            ),
        )
        if f.first_logprob is not None and not group:
            resp.first_token_logprob.CopyFrom(logprob_to_proto(f.first_logprob))
        return resp

    def Decode(self, req, ctx):
        raise InvalidRequestError("this is a prefill worker: send Decode to a decode worker")

    def Abort(self, req: worker_pb2.AbortRequest, ctx) -> worker_pb2.AbortResponse:
        # a streamed prefill's KV waiting for a decode worker that will not come goes too
        streamed = self.streams.cancel(req.request_id, f"request {req.request_id!r} was aborted")
        return worker_pb2.AbortResponse(found=self.state.abort(req.request_id) or streamed)

    def Stats(self, req, ctx) -> worker_pb2.WorkerStats:
        return self.state.stats()
