"""Decode worker: the engine in decode role behind the Worker gRPC service.

Decode(request, KVHandle, first token): pull the blocks, release the producer's lease, import
them (the import checks for free blocks itself: one engine round trip when there is room; without
room the pulled blocks wait for free ones: backpressure, bounded by the call's deadline and
``admission_timeout_s``), join the continuous batch and stream tokens. Abort, client disconnect
and deadline all abort the request in the engine, which frees every block.

Decode(request, ``local_prefill``) (conditional disaggregation, colocated serving): no handle;
the engine runs the whole request here and every token is streamed, the first one included
(the first message also carries ``num_cached_tokens``). Output equals the engine run whole.

KV pull accounting: the first message of a handoff carries ``kv_pull_s`` (the time spent in the
puller, the decode side of the handoff's ``Timing.transfer_s``), the "decode done" log line of
the request carries it too, and every pull is timed and its failures counted in
:class:`pdserve.metrics.KVPullMetrics` (shared-memory reads that fell back to gRPC included).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import prometheus_client
import torch

from decode_worker.groups import admit_group_handoff, is_group, num_choices, stream_group
from decode_worker.handoff import check_handoff, importer
from decode_worker.loop_admission import admit_on_loop
from decode_worker.messages import decode_message
from decode_worker.migration import DecodeMigration
from decode_worker.puller import KVPuller
from decode_worker.stream_puller import admit_streamed_handoff
from engine.detokenizer import OutputText
from engine.engine_loop import OutputItem, OutputSink
from engine.llm_engine import LLMEngine
from kv_store.handle import KVHandle
from kv_store.transport import choose_transport
from pdserve.errors import InternalError, InvalidRequestError, ResourceExhaustedError
from pdserve.metrics import KVPullMetrics
from pdserve.proto_convert import sampling_from_proto
from pdserve.tracing import log_event, request_scope
from pdserve.v1 import common_pb2, worker_pb2
from pdserve.worker_base import WorkerState

log = logging.getLogger(__name__)
T = TypeVar("T")
DETOK_ENV = "PDSERVE_DECODE_DETOK"  # where a decode stream's text is rendered: loop (default) | engine


def detok_on_loop() -> bool:
    """``PDSERVE_DECODE_DETOK``: ``loop`` (default: the event loop renders the text of requests
    without stop strings, :meth:`_LoopQueue.take_text`) or ``engine`` (the engine thread renders
    every request's text, as before #12's change); any other value is refused naming it."""
    import os

    v = os.environ.get(DETOK_ENV, "").strip().lower() or "loop"
    if v not in ("loop", "engine"):
        raise ValueError(f"{DETOK_ENV} must be 'loop' or 'engine', got {v!r}")
    return v == "loop"


class Outcome(enum.Enum):
    """How a Decode stream ended, as its closing log line tells it."""

    DONE = "done"  # it sent its finish message
    GONE = "gone"  # the caller went away: "decode done" after the finish, else "decode cancelled"
    FAILED = "failed"  # an error ended it


class _StreamAccount:
    """Per-stream accounting of a Decode call (sync and asyncio servicers alike): tokens sent,
    the finish reason and the KV pull time, from the messages as they are sent
    (:meth:`on_message`), and the one closing log line (:meth:`on_end`): "decode done",
    "decode cancelled" or "decode failed" with ``tokens``, ``finish`` / ``error`` and
    ``kv_pull_s`` (0 before/without a pull)."""

    __slots__ = ("finish", "pull_s", "tokens")

    def __init__(self) -> None:
        self.tokens = 0
        self.finish = ""
        self.pull_s = 0.0

    def on_message(self, msg: worker_pb2.DecodeResponse) -> None:
        self.tokens += len(msg.token_ids)
        self.pull_s = self.pull_s or msg.kv_pull_s
        if msg.HasField("finish"):
            self.finish = common_pb2.FinishReason.Name(msg.finish.reason)

    def on_end(self, outcome: Outcome, error: BaseException | None = None) -> None:
        pull = round(self.pull_s, 6)
        if outcome is Outcome.FAILED:
            log_event(log, "decode failed", error=type(error).__name__, tokens=self.tokens, kv_pull_s=pull)
            return
        event = "decode done" if outcome is Outcome.DONE or self.finish else "decode cancelled"
        log_event(log, event, tokens=self.tokens, finish=self.finish, kv_pull_s=pull)


class DecodeServicer:
    def __init__(
        self, state: WorkerState, puller: KVPuller, pull_metrics: KVPullMetrics | None = None
    ) -> None:
        """``pull_metrics`` defaults to one in the process's default Prometheus registry (the one
        the worker serves at /metrics), labelled with this worker's id and role."""
        self.state = state
        self.puller = puller
        if pull_metrics is None:
            c = state.config
            pull_metrics = KVPullMetrics(prometheus_client.REGISTRY, c.worker_id, c.role.name.lower())
        self.pull_metrics = pull_metrics
        # render the text of requests without stop strings on the event loop (AsyncDecodeServicer)
        self.text_on_loop = False
        self._fallbacks_lock = threading.Lock()
        self._fallbacks_seen = self._transport_fallbacks()

    def _transport_fallbacks(self) -> int:
        """Shared-memory reads of the puller's transport that fell back to gRPC so far
        (``AutoTransport.fallbacks``; 0 for transports that never fall back)."""
        return int(getattr(getattr(self.puller, "transport", None), "fallbacks", 0) or 0)

    def _pull_transport(self, handle: KVHandle) -> str:
        """``transport`` label of a pull: the transport chosen for the handle's first block (a
        handle names the one node its prefill worker published to): shm when the puller's
        transport shares that node's host (``my_host_id``), else grpc."""
        if not handle.locations:
            return "grpc"
        host = getattr(getattr(self.puller, "transport", None), "my_host_id", "") or ""
        return choose_transport(handle.locations[0], host).value

    def _pull(self, handle: KVHandle) -> tuple[torch.Tensor, float]:
        """Pull the handle's blocks, then release its lease (also on failure); returns the blocks
        and the seconds the pull took. The pull is timed, a failure counted (and re-raised), and
        shm->gRPC fallbacks of the transport since the last pull are counted (totals are exact;
        with concurrent pulls one may be counted on a neighbour's pull)."""
        transport = self._pull_transport(handle)
        t0 = time.monotonic()
        try:
            with self.pull_metrics.pull(transport):
                blocks = self.puller.pull(handle)
            return blocks, time.monotonic() - t0
        finally:
            with self._fallbacks_lock:
                now = self._transport_fallbacks()
                new, self._fallbacks_seen = now - self._fallbacks_seen, now
            self.pull_metrics.count_shm_fallbacks(new)
            self.puller.release(handle)

    def _admission_deadline(self, ctx: grpc.ServicerContext) -> float:
        """Monotonic time admission gives up: the admission timeout, or the call's deadline when
        sooner. The timeout counts from the call's arrival when ``ctx`` knows it (an
        :class:`_AdmissionContext`: the time the call waited for an admission thread counts), so
        a worker answers within its admission timeout, under the router's first-message deadline
        (``ProgressConfig.first_message_s``). Before, a burst of 1,000 requests queued here for
        up to ~100 s: the router took the healthy worker for a hung one and failed requests
        UNAVAILABLE."""
        limit = self.state.config.admission_timeout_s
        now = time.monotonic()
        start = min(getattr(ctx, "arrived", now), now)
        remaining = ctx.time_remaining()
        if remaining is not None and remaining < 1e7:
            return min(start + limit, now + remaining)
        return start + limit

    def _no_room(self, num_tokens: int, adapter: str) -> ResourceExhaustedError:
        lora = f" or LoRA slot for adapter {adapter!r}" if adapter else ""
        return ResourceExhaustedError(
            f"decode worker {self.state.config.worker_id} has no free KV blocks{lora} for {num_tokens} tokens",
            retry_after_s=1.0,
        )

    def _wait_until(
        self,
        room: Callable[[LLMEngine], bool],
        no_room: Callable[[], ResourceExhaustedError],
        ctx: grpc.ServicerContext,
        deadline: float,
    ) -> None:
        """Poll ``room`` on the engine thread until it says yes; ``no_room()`` is raised once the
        monotonic ``deadline`` has passed or the call has ended."""
        while not self.state.loop.call(room):
            if time.monotonic() >= deadline or not ctx.is_active():
                raise no_room()
            time.sleep(0.01)

    def _wait_for_blocks(
        self, num_tokens: int, ctx: grpc.ServicerContext, adapter: str = "", deadline: float | None = None
    ) -> None:
        """Wait (up to the admission timeout, or ``deadline``: monotonic) until the engine has
        blocks for ``num_tokens`` and, with ``adapter``, a LoRA slot for it; ResourceExhaustedError after,
        InvalidRequestError at once when no amount of waiting could free them
        (``LLMEngine.check_could_admit``)."""

        def room(e: LLMEngine) -> bool:
            if e.can_admit(num_tokens, adapter):
                return True
            e.check_could_admit(num_tokens)  # no room now: is there ever?
            return False

        self._wait_until(
            room,
            lambda: self._no_room(num_tokens, adapter),
            ctx,
            self._admission_deadline(ctx) if deadline is None else deadline,
        )

    def _retry_add(
        self,
        add_once: Callable[[], OutputSink],
        wait: Callable[[float], None],
        no_room: Callable[[], ResourceExhaustedError],
        ctx: grpc.ServicerContext,
    ) -> OutputSink:
        """``add_once()`` (an import that refuses with ResourceExhaustedError, taking nothing, when
        the engine lacks room); after a refusal ``wait(deadline)`` for room and try again, up to
        the admission deadline, then raise ``no_room()``."""
        deadline = self._admission_deadline(ctx)
        while True:
            try:
                return add_once()
            except ResourceExhaustedError:
                if time.monotonic() >= deadline or not ctx.is_active():
                    raise no_room() from None
            wait(deadline)
            time.sleep(0.01)  # the check passed but the import did not: do not spin on it

    def _add_when_room(
        self,
        rid: str,
        adder,
        out: OutputSink | None,
        num_tokens: int,
        ctx: grpc.ServicerContext,
        adapter: str = "",
    ) -> OutputSink:
        """:meth:`_add` of an ``adder`` that refuses with ResourceExhaustedError when the engine
        lacks blocks (or the LoRA slot) for ``num_tokens`` and takes none then
        (``LLMEngine.import_kv``): one engine round trip when there is room (#12: a decode
        worker's cost per request; before, a ``can_admit`` check came first, a second round trip).
        When there is not, it waits as :meth:`_wait_for_blocks` does and tries again, up to the
        same admission deadline, then fails with the same error (:meth:`_retry_add`)."""
        return self._retry_add(
            lambda: self._add(rid, adder, out),
            lambda deadline: self._wait_for_blocks(num_tokens, ctx, adapter, deadline),
            lambda: self._no_room(num_tokens, adapter),
            ctx,
        )

    def Decode(
        self, req: worker_pb2.DecodeRequest, ctx: grpc.ServicerContext
    ) -> Iterator[worker_pb2.DecodeResponse]:
        """Traced entry: the request id is bound for every log line and store call of the decode.
        Its one closing log line ("decode done", "decode cancelled" or "decode failed") carries
        the tokens streamed and ``kv_pull_s`` (0 before/without a pull)."""
        with request_scope(req.request_id or req.kv.request_id):
            account = _StreamAccount()
            try:
                for msg in self._decode(req, ctx):
                    account.on_message(msg)
                    yield msg
            except GeneratorExit:  # the caller went away (after the finish message: it was done)
                account.on_end(Outcome.GONE)
                raise
            except Exception as e:
                account.on_end(Outcome.FAILED, e)
                raise
            account.on_end(Outcome.DONE)

    def _decode(
        self, req: worker_pb2.DecodeRequest, ctx: grpc.ServicerContext
    ) -> Iterator[worker_pb2.DecodeResponse]:
        # an adapter this worker does not serve: NOT_FOUND (the router refuses these first)
        self.state.engine.check_adapter(req.adapter)
        if is_group(req):
            raise InvalidRequestError(
                "n > 1 / best_of is served by the asyncio decode servicer only: send n=1"
            )
        pull_s = 0.0
        if req.local_prefill:
            rid, q, immediate = self._admit_local(req, ctx)
        else:
            rid, q, immediate, pull_s = self._admit_handoff(req, ctx)
        finished = {"v": False}
        ctx.add_callback(lambda: None if finished["v"] else self.state.loop.abort(rid))
        if immediate:
            # finished at once (first token was a stop); nothing will be queued
            finished["v"] = True
            self.state.loop.abort(rid)  # drops the unused output queue
            yield worker_pb2.DecodeResponse(
                request_id=rid,
                finish=common_pb2.Finish(reason=common_pb2.FINISH_REASON_STOP),
                kv_pull_s=pull_s,
            )
            return
        first = True
        while True:
            batch = _ready([q.get()], q.get_nowait, queue.Empty)
            msg, failure = self._message(rid, batch, req.local_prefill, pull_s if first else None)
            if msg is not None:
                first = False
                if msg.HasField("finish"):
                    finished["v"] = True
                yield msg
            if failure is not None:
                raise failure
            if msg is not None and msg.HasField("finish"):
                return

    def _message(
        self, rid: str, batch: list[OutputItem], local_prefill: bool, pull_s: float | None
    ) -> tuple[worker_pb2.DecodeResponse | None, BaseException | None]:
        """:func:`decode_worker.messages.decode_message` for the engine outputs ``batch`` (several
        tokens per message under load, so a slow reader costs fewer messages), with the engine's
        text delta when it has a tokenizer (stop strings honoured, a stop token not rendered).
        ``pull_s``: set on the request's first message (None: not the first)."""
        with_text = getattr(self.state.engine, "tokenizer", None) is not None
        msg, failure = decode_message(rid, batch, self.state.count_finished, with_text=with_text)
        if msg is not None and pull_s is not None:
            if local_prefill:
                first = next(
                    i for i in batch if not isinstance(i, BaseException) and (i.new_token_ids or i.finished)
                )
                msg.num_cached_tokens = max(0, first.num_cached_tokens)
            msg.kv_pull_s = pull_s
        return msg, failure

    def _admit_handoff(
        self, req: worker_pb2.DecodeRequest, ctx: grpc.ServicerContext, out: OutputSink | None = None
    ) -> tuple[str, OutputSink, bool, float]:
        """Pull the KV named by the handle and import it; (request id, output queue, done at once,
        seconds the pull took). ``out``: the output queue to use (default: a new one)."""
        if req.kv_stream_address:  # chunk-wise KV streaming (decode_worker.stream_puller)
            return admit_streamed_handoff(self, req, ctx, out)
        if req.prompt_tail_pending:  # a parallel-sampling group (decode_worker.groups)
            rid, q, pull_s = admit_group_handoff(self, req, ctx, out)
            return rid, q, False, pull_s
        if not req.HasField("kv"):
            raise InvalidRequestError("Decode needs the KVHandle returned by Prefill (or local_prefill)")
        h = check_handoff(req, self.state.layout)
        # the pull comes first and the import checks for room itself (one engine round trip);
        # without room the pulled blocks wait here (the lease is released after the pull)
        blocks, pull_s = self._pull(h.handle)
        run = importer(h, req, blocks)
        immediate = {"v": False}

        def add(e: LLMEngine) -> None:
            immediate["v"] = run(e)

        q = self._add_when_room(h.rid, add, out, len(h.ids), ctx, req.adapter)
        return h.rid, q, immediate["v"], pull_s

    def _admit_local(
        self, req: worker_pb2.DecodeRequest, ctx: grpc.ServicerContext, out: OutputSink | None = None
    ) -> tuple[str, OutputSink, bool]:
        """Conditional disaggregation: the engine runs the whole request (prompt included)."""
        if (
            req.HasField("kv")
            or req.first_token
            or req.HasField("first_token_logprob")
            or req.kv_stream_address
        ):
            raise InvalidRequestError(
                "local_prefill runs the prompt here: send no kv, kv_stream_address or first token"
            )
        if req.resume_token_ids:
            raise InvalidRequestError("local_prefill cannot resume: send resume_token_ids with a KVHandle")
        if req.model and req.model != self.state.engine.model_id:
            raise InvalidRequestError(f"this worker serves {self.state.engine.model_id!r}, not {req.model!r}")
        ids = list(req.prompt_token_ids)
        if not ids:
            raise InvalidRequestError("prompt is empty: send at least one token")
        rid = req.request_id or f"lp-{time.time_ns()}"
        params = sampling_from_proto(req.sampling)
        self._wait_for_blocks(len(ids), ctx)

        def add(e: LLMEngine) -> None:
            e.add_request(
                rid, ids, params, priority=req.priority, adapter_id=req.adapter, cache_salt=req.cache_salt
            )

        return rid, self._add(rid, add, out, num_choices(req)), False

    def _add(self, rid: str, adder, out: OutputSink | None, choices: int = 1) -> OutputSink:
        """``EngineLoop.add`` with the output queue ``out`` (None: the loop's own); ``choices``:
        the request's ``n`` (parallel sampling)."""
        if choices > 1:
            return self.state.loop.add(rid, adder, out, num_choices=choices)
        if out is None:
            return self.state.loop.add(rid, adder)
        return self.state.loop.add(rid, self._text_here(rid, adder, out), out)

    def _text_here(self, rid: str, adder: Callable[[LLMEngine], T], out: Any) -> Callable[[LLMEngine], T]:
        """``adder`` for an ``n == 1`` request whose outputs go to ``out``: when ``out`` is an
        event loop's queue (:class:`_LoopQueue`) and :attr:`text_on_loop` is set, the request's
        text is rendered there from its token ids, not on the engine thread
        (:meth:`_LoopQueue.take_text`); otherwise ``adder`` itself."""
        if not (self.text_on_loop and isinstance(out, _LoopQueue)):
            return adder
        spec = getattr(getattr(self.state.engine, "config", None), "speculative", None) is not None
        return out.take_text(rid, adder, spec)

    def Prefill(self, req, ctx):
        raise InvalidRequestError("this is a decode worker: send Prefill to a prefill worker")

    def Abort(self, req: worker_pb2.AbortRequest, ctx) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=self.state.abort(req.request_id))

    def Stats(self, req, ctx) -> worker_pb2.WorkerStats:
        return self.state.stats()


def _ready(batch: list[OutputItem], get_nowait, empty: type[Exception]) -> list[OutputItem]:
    """``batch`` plus every output already waiting (``get_nowait`` until ``empty`` is raised), up
    to and including one that ends the request (finished, or a failure)."""
    while not _ends(batch[-1]):
        try:
            batch.append(get_nowait())
        except empty:
            break
    return batch


def _ends(item: OutputItem) -> bool:
    return isinstance(item, BaseException) or item.finished


def _num_tokens(batch: list[OutputItem]) -> int:
    """Output tokens in ``batch`` (a failure holds none)."""
    return sum(len(i.new_token_ids) for i in batch if not isinstance(i, BaseException))


class _LoopInbox:
    """Outputs handed from the engine thread to one event loop for many streams: the first
    output of a burst schedules one drain on the loop (``call_soon_threadsafe``, a wake-up of the
    loop), the rest of the burst (the other streams of the same engine step) join it, so a step
    that produced a token for each of N streams costs one wake-up, not N. Registered with the
    engine loop (``EngineLoop.batchers``), it is held while a step hands out its outputs and
    schedules the drain when released: the loop is not woken part-way through a step (the
    wake-up's syscall lets the loop thread take the GIL from the engine thread). ``put`` never
    blocks the engine (a short lock, never held while the loop runs a stream).

    ``window_s`` > 0 (the worker's ``stream_window_s``; #12): while outputs flow, the loop drains
    the inbox itself once per window (a timer), and an engine step wakes the loop only for an
    ``urgent`` output (a failure; a relayed stream's first output and its finish, which its
    window never holds; see :class:`_LoopQueue`) or when no timer is running (the first output
    after a quiet spell). So the loop, and with it the GIL hand-over between the engine thread
    and the loop thread, wakes about once per window instead of once per engine step; a token
    waits at most one window here, which the streams' own coalescing (one message per window)
    waits anyway. 0: every step wakes the loop (as before)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, window_s: float = 0.0) -> None:
        self._loop = loop
        self.window_s = window_s
        self._lock = threading.Lock()
        self._items: list[tuple[_LoopQueue, OutputItem]] = []
        self._scheduled = False  # a drain is scheduled (call_soon_threadsafe)
        self._held = False
        self._urgent = False  # an urgent output waits among _items
        self._ticking = False  # a timer drains the inbox every window (window_s > 0)

    def _wake_now(self) -> bool:  # under the lock
        return bool(self._items) and not self._scheduled and (self._urgent or not self._ticking)

    def hold(self) -> None:  # engine thread, before a step's outputs
        with self._lock:
            self._held = True

    def release(self) -> None:  # engine thread, after a step's outputs
        with self._lock:
            self._held = False
            if not self._wake_now():
                return
            self._scheduled = True
        self._schedule()

    def put(self, q: _LoopQueue, item: OutputItem, urgent: bool = True) -> None:  # any thread
        with self._lock:
            self._items.append((q, item))
            self._urgent = self._urgent or urgent
            if self._held or not self._wake_now():
                return
            self._scheduled = True
        self._schedule()

    def _schedule(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop closed (shutting down): nobody reads
            with self._lock:
                self._scheduled = False

    def _take(self) -> list[tuple[_LoopQueue, OutputItem]]:  # under the lock
        items, self._items = self._items, []
        self._urgent = False
        return items

    def _drain(self) -> None:  # event loop (scheduled by the engine thread)
        with self._lock:
            items = self._take()
            self._scheduled = False
            arm = bool(items) and self.window_s > 0 and not self._ticking
            self._ticking = self._ticking or arm
        if arm:
            self._loop.call_later(self.window_s, self._tick)
        for q, item in items:
            q.put_nowait(item)

    def _tick(self) -> None:  # event loop (timer), every window while outputs come
        with self._lock:
            items = self._take()
            if not items:
                self._ticking = False  # quiet: the next output wakes the loop itself
                return
        self._loop.call_later(self.window_s, self._tick)
        for q, item in items:
            q.put_nowait(item)


class _LoopQueue:
    """A request's output queue read by an asyncio task: the engine thread's ``put`` hands the
    item to the event loop through the loop's :class:`_LoopInbox`, never blocking the engine.
    Holds at most the request's outputs (bounded by its ``max_tokens``)."""

    def __init__(self, inbox: _LoopInbox, first_urgent: bool = True, finish_urgent: bool = True) -> None:
        self._inbox = inbox
        # the inbox wakes the loop at once for a failure, and for the first output and the
        # finish unless told they are not latency-critical (a direct stream: its client's
        # deltas, the last one too, go out at most once per window; a handoff's first engine
        # output is its second token, the router sent the first)
        self._first_urgent = first_urgent
        self._finish_urgent = finish_urgent
        self._put_any = False  # engine thread only
        self._q: asyncio.Queue[OutputItem] = asyncio.Queue()
        self._end: asyncio.Future[None] | None = None  # a waiter for an item that ends the request
        self._sink: Callable[[OutputItem], None] | None = None  # divert: items go here instead
        # the request's text, rendered here (event loop) from the token ids when the engine
        # handed its detokenizer over (:meth:`take_text`); None: the engine renders it
        self._text: OutputText | None = None

    def take_text(
        self, rid: str, adder: Callable[[LLMEngine], T], speculative: bool
    ) -> Callable[[LLMEngine], T]:
        """``adder`` (it adds request ``rid`` to the engine, on the engine thread) followed by
        taking the request's detokenizer from the engine (``LLMEngine.take_detokenizer``: not for
        stop strings or parallel sampling), so that its text is rendered in :meth:`put_nowait`,
        on the event loop, instead of on the engine thread (#12: the engine thread is the decode
        worker's critical path). Set before the engine's first output of the request: every
        output is rendered here, in order. ``speculative``: the engine decodes speculatively."""

        def run(e: LLMEngine) -> T:
            r = adder(e)
            take = getattr(e, "take_detokenizer", None)  # None: a stand-in engine
            d = take(rid) if take is not None else None
            if d is not None:
                self._text = OutputText(d, speculative)
            return r

        return run

    def put(self, item: OutputItem) -> None:  # engine thread
        if isinstance(item, BaseException):
            urgent = True
        elif item.finished:
            urgent = self._finish_urgent
        else:
            urgent = self._first_urgent and not self._put_any
        self._put_any = True
        self._inbox.put(self, item, urgent)

    def divert(self, sink: Callable[[OutputItem], None]) -> None:
        """From now on hand every item to ``sink`` (event loop, in the inbox's drain: no task
        wakes per item) instead of queueing it; the items already queued go to it first, in order."""
        while not self._q.empty():
            sink(self._q.get_nowait())
        self._sink = sink

    def put_nowait(self, item: OutputItem) -> None:  # event loop (the inbox's drain)
        if self._text is not None and not isinstance(item, BaseException):
            try:
                self._text.render(item)
            except Exception as e:  # noqa: BLE001 - fails this request only, never the drain's others
                log.exception("rendering the text of request %s failed", item.request_id)
                err = InternalError(f"rendering the text of request {item.request_id} failed: {e}")
                item = err.with_traceback(e.__traceback__)
        if self._sink is not None:
            self._sink(item)
            return
        self._q.put_nowait(item)
        if self._end is not None and not self._end.done() and _ends(item):
            self._end.set_result(None)

    async def get(self) -> OutputItem:
        return await self._q.get()

    def get_nowait(self) -> OutputItem:
        return self._q.get_nowait()

    async def wait_end(self, timeout_s: float) -> None:
        """Wait until an item that ends the request (finished, or a failure) is queued, or
        ``timeout_s`` passed, whichever is first; other items do not wake the waiter (so a
        stream holding tokens for its window costs one timer, not a wake-up per token)."""
        self._end = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._end
        except TimeoutError:
            pass
        finally:
            self._end = None


class _AdmissionContext:
    """What the blocking admission (:meth:`DecodeServicer._admit_handoff` / ``_admit_local``, on a
    worker thread) reads of the call: its deadline, fixed at the start, when it arrived
    (``arrived``, monotonic: :meth:`DecodeServicer._admission_deadline` counts from it), and
    whether the caller is still there (``gone`` is set by the call's task when it is cancelled)."""

    def __init__(self, ctx: grpc.aio.ServicerContext) -> None:
        self.arrived = time.monotonic()  # the admission timeout counts from here
        r = ctx.time_remaining()
        self._deadline = None if r is None or r > 1e7 else self.arrived + r
        self.gone = threading.Event()

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return not self.gone.is_set() and (self._deadline is None or time.monotonic() < self._deadline)


class AsyncDecodeServicer(DecodeServicer):
    """:class:`DecodeServicer` for a ``grpc.aio`` server (:func:`pdserve.grpc_server.start_aio_server`):
    a Decode stream is a task on the event loop waiting on its output queue (:class:`_LoopQueue`),
    so a worker's streams are not capped by a thread pool; a stream waiting on tokens costs memory.
    Admission (waiting for free blocks, the KV pull, adding to the engine) blocks, so it runs on
    ``admission_threads`` threads; many streams may wait there, each stream's tokens do not.
    Every token ready when the stream is read goes in one message. A reader that does not keep
    up pauses the stream (the write waits; outputs wait in the queue: at most ``max_tokens``);
    cancellation (the router gave up on it) aborts the request in the engine.
    Prefill/Abort/Stats stay synchronous (run on the server's thread pool).

    ``stream_interval`` (>= 1): after a stream's first message, a message waits until it holds
    that many tokens, or the request ended (finished or failed); 1 (default) sends each token as
    soon as it is ready. Every hop (this worker, the router, the client) pays per message, not per
    token, so N tokens per message cost about 1/N as much CPU per token, at the price of
    delivering tokens in bursts of N (a client sees a message every N decode steps). The tokens,
    their order and the finish are the same for every interval.

    ``stream_window_s`` (>= 0; adaptive coalescing): after a stream's first message, a message
    also waits until this long has passed since the previous one was taken (tokens ready
    meanwhile join it), so a stream costs at most one message per window whatever the step time:
    when the engine steps faster than the window (small model, fast device, light batch), tokens
    go several to a message; when a step takes longer than the window, every token goes at once
    as with no window. It adds at most the window to a token's delivery; 0 (default): none.
    The first message (TTFT) and the finish are never held.

    Text (#12): a request without stop strings (``n == 1``) has its text rendered on this event
    loop from its token ids (:meth:`_LoopQueue.take_text`: the engine hands its detokenizer over
    at admission), not on the engine thread, the worker's critical path; byte-identical to the
    engine's. ``PDSERVE_DECODE_DETOK=engine`` keeps every request's text on the engine thread."""

    def __init__(
        self,
        *args,
        admission_threads: int = 16,
        stream_interval: int = 1,
        stream_window_s: float = 0.0,
        **kwargs,
    ) -> None:
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (tokens per message), got {stream_interval}")
        if not stream_window_s >= 0:
            raise ValueError(f"stream_window_s must be >= 0 seconds, got {stream_window_s}")
        super().__init__(*args, **kwargs)
        self.text_on_loop = detok_on_loop()  # PDSERVE_DECODE_DETOK (#12)
        self.stream_interval = stream_interval
        self.stream_window_s = stream_window_s
        self._admission = ThreadPoolExecutor(admission_threads, thread_name_prefix="decode-admit")
        self._inboxes: dict[asyncio.AbstractEventLoop, _LoopInbox] = {}  # one per serving loop
        self.migration = DecodeMigration(self.state, self._admission, puller=self.puller)  # live migration
        # direct token streams to clients (decode_worker.direct.DirectStreams; None: not served)
        self.direct: Any = None

    def _inbox(self, loop: asyncio.AbstractEventLoop) -> _LoopInbox:
        inbox = self._inboxes.get(loop)
        if inbox is None:
            inbox = self._inboxes[loop] = _LoopInbox(loop, self.stream_window_s)
            batchers = getattr(self.state.loop, "batchers", None)  # None: a stand-in engine loop
            if batchers is not None:
                batchers.append(inbox)  # one drain per engine step
        return inbox

    async def Decode(  # type: ignore[override]
        self, req: worker_pb2.DecodeRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        """As :meth:`DecodeServicer.Decode` (the same closing log line), on the event loop."""
        with request_scope(req.request_id or req.kv.request_id):
            account = _StreamAccount()
            try:
                async for msg in self._decode_async(req, ctx):
                    account.on_message(msg)
                    yield msg
            except (GeneratorExit, asyncio.CancelledError):  # the caller went away
                account.on_end(Outcome.GONE)
                raise
            except Exception as e:
                account.on_end(Outcome.FAILED, e)
                raise
            account.on_end(Outcome.DONE)

    def _admit(
        self, req: worker_pb2.DecodeRequest, actx: _AdmissionContext, out: _LoopQueue
    ) -> tuple[str, bool, float]:
        """Blocking admission (worker thread): (request id, done at once, pull seconds)."""
        # an adapter this worker does not serve: NOT_FOUND (the router refuses these first)
        self.state.engine.check_adapter(req.adapter)
        if req.local_prefill:
            rid, _, immediate = self._admit_local(req, actx, out)  # type: ignore[arg-type]
            return rid, immediate, 0.0
        rid, _, immediate, pull_s = self._admit_handoff(req, actx, out)  # type: ignore[arg-type]
        return rid, immediate, pull_s

    async def _decode_async(
        self, req: worker_pb2.DecodeRequest, ctx: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        arrived: float | None = None  # wall clock: when the call came (a direct ticket's window)
        if req.HasField("direct"):
            if self.direct is None:
                raise InvalidRequestError(
                    f"decode worker {self.state.config.worker_id} does not serve direct streams "
                    "(start it with --direct-streams)"
                )
            self.direct.check(req)
            arrived = self.direct.clock()
        loop = asyncio.get_running_loop()
        # a direct stream's deltas go to its client at most once per window (its finish too),
        # and a handoff's first engine output is its second token (the router sent the first):
        # not worth a wake-up of their own (local_prefill's first output is its first token)
        direct = req.HasField("direct")
        out = _LoopQueue(self._inbox(loop), req.local_prefill or not direct, not direct)
        # a handoff whose KV is read with no rpc is admitted here (no thread hop); others on threads
        on_loop = await admit_on_loop(self, req, ctx, out)
        if on_loop is not None:
            rid, immediate, pull_s = on_loop
        else:
            actx = _AdmissionContext(ctx)
            admitted = loop.run_in_executor(
                self._admission, contextvars.copy_context().run, self._admit, req, actx, out
            )
            try:
                rid, immediate, pull_s = await asyncio.shield(admitted)
            except asyncio.CancelledError:
                actx.gone.set()  # a wait for blocks gives up; a request already added is aborted
                admitted.add_done_callback(lambda f: self._abort_admitted(loop, f))
                raise
        finished = False
        try:
            if immediate:
                # finished at once (first token was a stop); nothing will be queued
                finished = True
                await loop.run_in_executor(self._admission, self.state.loop.abort, rid)
                yield worker_pb2.DecodeResponse(
                    request_id=rid,
                    finish=common_pb2.Finish(reason=common_pb2.FINISH_REASON_STOP),
                    kv_pull_s=pull_s,
                )
                return
            if is_group(req):  # parallel sampling: one message per choice (decode_worker.groups)

                def first_message(m: worker_pb2.DecodeResponse, batch: list[OutputItem]) -> None:
                    m.kv_pull_s = pull_s
                    o = next((i for i in batch if not isinstance(i, BaseException)), None)
                    if req.local_prefill and o is not None:
                        m.num_cached_tokens = max(0, o.num_cached_tokens)

                with_text = getattr(self.state.engine, "tokenizer", None) is not None
                group = stream_group(
                    out,
                    rid,
                    num_choices(req),
                    with_text=with_text,
                    count_finished=self.state.count_finished,
                    first_message=first_message,
                )
                async for m in group:
                    yield m
                finished = True
                return
            if req.HasField("direct"):  # tokens to the client's connection, progress to the caller
                tok = getattr(self.state.engine, "tokenizer", None)
                serve = self.direct.serve(
                    rid,
                    req,
                    out,
                    pull_s,
                    self.state.count_finished,
                    tok is not None,
                    tok and tok.token_bytes,
                    arrived=arrived,
                )
                async for msg in serve:
                    finished = msg.HasField("finish")
                    yield msg
                return
            first = True
            sent_at = 0.0  # loop time the last message was taken by the reader
            while True:
                batch = _ready([await out.get()], out.get_nowait, asyncio.QueueEmpty)
                if not first:  # later messages: stream_interval tokens and the window (or the end)
                    batch = await self._coalesce(batch, out, sent_at)
                msg, failure = self._message(rid, batch, req.local_prefill, pull_s if first else None)
                if msg is not None:
                    first = False
                    finished = msg.HasField("finish")
                    yield msg
                    sent_at = loop.time()
                if failure is not None:
                    raise failure
                if finished:
                    return
        finally:
            if not finished:  # cancelled, or the reader went away: free its blocks
                loop.run_in_executor(self._admission, self.state.loop.abort, rid)

    async def _coalesce(self, batch: list[OutputItem], out: _LoopQueue, sent_at: float) -> list[OutputItem]:
        """``batch`` grown with the outputs that come until it may go out: it holds at least
        ``stream_interval`` tokens and ``stream_window_s`` has passed since the previous message
        was taken (``sent_at``, loop time), or it ends the request (finished, or a failure).
        Tokens held for the window wait at most until it closes (a timer), not for the next
        output: a request the engine pauses is not held back."""
        loop = asyncio.get_running_loop()
        while not _ends(batch[-1]):
            if _num_tokens(batch) >= self.stream_interval:
                wait = sent_at + self.stream_window_s - loop.time()
                if wait <= 0:
                    break
                await out.wait_end(wait)  # the window closes, or the request ends
                return _ready(batch, out.get_nowait, asyncio.QueueEmpty)
            batch.append(await out.get())
            batch = _ready(batch, out.get_nowait, asyncio.QueueEmpty)
        return batch

    def _abort_later(self, rid: str) -> None:
        """Abort ``rid`` from the event loop without waiting (the engine call runs on a thread)."""
        asyncio.get_running_loop().run_in_executor(self._admission, self.state.loop.abort, rid)

    def _abort_admitted(self, loop: asyncio.AbstractEventLoop, f: asyncio.Future) -> None:
        """A request whose caller left during admission: abort it if admission added it."""
        if f.cancelled() or f.exception() is not None:
            return
        loop.run_in_executor(self._admission, self.state.loop.abort, f.result()[0])

    # live migration (decode_worker/migration.py; contracts in worker.proto)
    def MigrateOut(self, req, ctx):
        return self.migration.migrate_out(req, ctx)

    async def MigrateIn(self, chunks, ctx):
        """``Worker.MigrateIn``: chunks read on the loop, each handled on an admission thread."""
        acks = self.migration.migrate_in_async(chunks, ctx)
        async with contextlib.aclosing(acks):
            async for ack in acks:
                await ctx.write(ack)

    async def ResumeStream(self, req, ctx):
        """``Worker.ResumeStream``; with ``direct`` (a migrated direct stream) the tokens go to the
        client's DirectStream connection (:meth:`decode_worker.direct.DirectStreams.serve_resumed`),
        refused (INVALID_ARGUMENT, the request left waiting for a relayed ResumeStream) when this
        worker does not serve direct streams or has no tokenizer to render their text."""
        if not req.HasField("direct"):
            async for msg in self.migration.resume_stream(req, ctx):
                yield msg
            return
        tok = getattr(self.state.engine, "tokenizer", None)
        if self.direct is None or tok is None:
            why = (
                "does not serve direct streams (start it with --direct-streams)"
                if self.direct is None
                else "has no tokenizer"
            )
            raise InvalidRequestError(
                f"decode worker {self.state.config.worker_id} {why}: ResumeStream.direct refused; "
                "open the stream without it"
            )
        if not req.direct.ticket:
            raise InvalidRequestError("ResumeStreamRequest.direct has no ticket")
        inner = worker_pb2.ResumeStreamRequest(request_id=req.request_id, start_index=0)
        served = self.direct.serve_resumed(
            req, self.migration.resume_stream(inner, ctx), tok, self.state.count_finished
        )
        async with contextlib.aclosing(served):
            async for msg in served:
                yield msg

    def close(self) -> None:
        """Stop serving: migration, direct streams, the admission threads, and the puller's
        ``grpc.aio`` store channels (:meth:`decode_worker.puller.StorePuller.close`)."""
        self.migration.close()
        if self.direct is not None:
            self.direct.close()
        self._admission.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.puller, "close", None)  # None: a puller that opens no channel
        if close is not None:
            close()
