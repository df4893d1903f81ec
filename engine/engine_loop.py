"""A thread that owns an LLMEngine and serves many concurrent callers (workers wrap this).

The engine is single-threaded by design. ``EngineLoop`` runs it on one background thread:
callers hand it closures with :meth:`call` (executed between steps, result returned through a
Future) and read a request's outputs from a per-request queue with :meth:`outputs`. The loop
steps while there is work and sleeps on a condition otherwise.

Contract: every request added through :meth:`add` gets exactly one terminal item on its queue:
its final ``RequestOutput`` (``finished=True``) or an ``Exception`` (engine failure, abort).
A parallel-sampling request (``add(..., num_choices=n)``, ``SamplingParams.n > 1``) gets one
finished output per choice (each with its ``choice_index``); the queue is closed after the
``n``-th, which is then the terminal item (an exception still ends it at once).

Test pacing: env ``PDSERVE_TEST_MIN_STEP_S`` (seconds, default 0: off) makes each step that has work
last at least that long (commands still run while it waits). Tests on tiny models use it where a
request must still be running when something else happens (a live migration's last stage); a
serving process never sets it. A value that is not a number >= 0 is refused at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from pdserve.errors import CancelledError

log = logging.getLogger(__name__)
MIN_STEP_ENV = "PDSERVE_TEST_MIN_STEP_S"
SHUTTING_DOWN = "engine is shutting down"  # the CancelledError of work the stopped loop will not run


def min_step_s() -> float:
    """``PDSERVE_TEST_MIN_STEP_S`` as seconds (0 when unset); ValueError naming it otherwise."""
    raw = os.environ.get(MIN_STEP_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{MIN_STEP_ENV} must be a number of seconds >= 0, got {raw!r}") from None
    if not (v >= 0.0 and v != float("inf")):
        raise ValueError(f"{MIN_STEP_ENV} must be a number of seconds >= 0, got {raw!r}")
    return v


T = TypeVar("T")

OutputItem = RequestOutput | BaseException


class OutputSink(Protocol):
    """Where a request's outputs go: ``put`` is called on the engine thread, never blocks."""

    def put(self, item: OutputItem) -> None: ...


class OutputBatch(Protocol):
    """Told around each step's hand-out of outputs, on the engine thread: ``hold`` before the
    step's first ``put``, ``release`` after its last (always), so sinks that hand outputs to
    another thread can deliver one step's outputs with one wake-up."""

    def hold(self) -> None: ...

    def release(self) -> None: ...


def _aborter(request_id: str) -> Callable[[LLMEngine], bool]:
    """The engine-thread abort of ``request_id``: whether it was known (idempotent)."""

    def _abort(eng: LLMEngine) -> bool:
        try:
            eng.abort(request_id)
            return True
        except KeyError:
            return False

    return _abort


class EngineLoop:
    def __init__(self, engine: LLMEngine, name: str = "engine-loop") -> None:
        self.engine = engine
        self._cmds: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._queues: dict[str, OutputSink] = {}
        self._choices_left: dict[str, int] = {}  # parallel sampling: choices not finished yet
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._closed = False  # the loop thread has ended: a command would never run (under _lock)
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, tokens) hook for metrics
        self.batchers: list[OutputBatch] = []  # held around each step's hand-out of outputs
        self.min_step_s = min_step_s()  # test pacing (module docstring); 0: off
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API
    def call(self, fn: Callable[[LLMEngine], T], timeout_s: float | None = None) -> T:
        """Run ``fn(engine)`` on the engine thread; re-raise its exception here. With ``timeout_s``,
        raise TimeoutError if it has not run by then (it may still run later)."""
        return self.submit(fn).result(timeout_s)

    def submit(self, fn: Callable[[LLMEngine], T]) -> Future:
        """Run ``fn(engine)`` on the engine thread without waiting: its Future (result or
        exception); an event loop awaits it with ``asyncio.wrap_future`` (one wake-up). Once the
        loop has stopped the Future fails at once with CancelledError (nothing would run it)."""
        fut: Future = Future()
        with self._lock:
            closed = self._closed
            if not closed:
                self._cmds.put((lambda: fn(self.engine), fut))
        if closed:
            fut.set_exception(CancelledError(SHUTTING_DOWN))
            return fut
        self._wake.set()
        return fut

    def add_submit(self, request_id: str, adder: Callable[[LLMEngine], Any], out: OutputSink) -> Future:
        """:meth:`add` (one choice, queue ``out``) without waiting: the Future of ``adder``'s run;
        the queue is unregistered when it fails."""
        with self._lock:
            self._queues[request_id] = out

        def done(f: Future) -> None:
            if f.cancelled() or f.exception() is not None:
                with self._lock:
                    if self._queues.get(request_id) is out:
                        del self._queues[request_id]

        fut = self.submit(adder)
        fut.add_done_callback(done)
        return fut

    def add(
        self,
        request_id: str,
        adder: Callable[[LLMEngine], Any],
        out: OutputSink | None = None,
        num_choices: int = 1,
    ) -> OutputSink:
        """Register an output queue for ``request_id`` and run ``adder`` (which adds it); returns
        the queue. ``out``: the queue to use instead of a new ``queue.SimpleQueue`` (anything
        with ``put(item)``, called on the engine thread: e.g. one that wakes an asyncio task).
        ``num_choices``: the request's ``SamplingParams.n`` (finished outputs before the queue
        closes)."""
        if num_choices < 1:
            raise ValueError(f"num_choices must be >= 1, got {num_choices}")
        q: OutputSink = queue.SimpleQueue() if out is None else out
        with self._lock:
            self._queues[request_id] = q
            if num_choices > 1:
                self._choices_left[request_id] = num_choices
        try:
            self.call(adder)
        except BaseException:
            with self._lock:
                self._queues.pop(request_id, None)
                self._choices_left.pop(request_id, None)
            raise
        return q

    def abort(self, request_id: str) -> bool:
        """Abort a request if it is still known; its queue gets a CancelledError. Idempotent."""
        try:
            found = self.call(_aborter(request_id))
        except CancelledError:
            if not self._closed:
                raise
            found = False  # the loop stopped: it failed every request's queue as it ended
        self._finish_queue(request_id, CancelledError(f"request {request_id} was aborted"))
        return found

    def abort_soon(self, request_id: str) -> Future:
        """:meth:`abort` without waiting (for a caller on an event loop): its Future (whether the
        request was known); the queue gets its CancelledError once the abort ran (or the loop
        stopped)."""

        def done(_f: Future) -> None:
            self._finish_queue(request_id, CancelledError(f"request {request_id} was aborted"))

        fut = self.submit(_aborter(request_id))
        fut.add_done_callback(done)
        return fut

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ loop
    def _finish_queue(self, request_id: str, item: OutputItem) -> None:
        with self._lock:
            q = self._queues.pop(request_id, None)
            self._choices_left.pop(request_id, None)
        if q is not None:
            q.put(item)

    def _last_choice(self, request_id: str) -> bool:
        """A finished output of ``request_id`` arrived: whether it ends the request (its last
        unfinished choice; always for ``n == 1``)."""
        with self._lock:
            left = self._choices_left.get(request_id)
            if left is None:
                return True
            if left <= 1:
                del self._choices_left[request_id]
                return True
            self._choices_left[request_id] = left - 1
            return False

    def _drain_cmds(self) -> None:
        while True:
            try:
                fn, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            # commands no one will run: fail them (a caller blocked in call() would wait forever,
            # e.g. a worker's handler aborting its request after the worker stopped the loop)
            with self._lock:
                self._closed = True
            while True:
                try:
                    _, fut = self._cmds.get_nowait()
                except queue.Empty:
                    break
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(CancelledError(SHUTTING_DOWN))

    def _serve(self) -> None:
        import time

        while not self._stop.is_set():
            self._drain_cmds()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            t = time.perf_counter()
            try:
                outs = self.engine.step()
            except Exception as e:  # an engine failure fails every in-flight request, not the process
                log.exception("engine step failed")
                with self._lock:
                    ids = list(self._queues)
                for rid in ids:
                    with contextlib.suppress(Exception):
                        self.engine.abort(rid)
                    self._finish_queue(rid, e)
                continue
            if self.on_step is not None:
                self.on_step(time.perf_counter() - t, sum(len(o.new_token_ids) for o in outs))
            batchers = list(self.batchers)
            for b in batchers:
                b.hold()
            try:
                for o in outs:
                    if o.finished and self._last_choice(o.request_id):
                        self._finish_queue(o.request_id, o)
                    else:
                        with self._lock:
                            q = self._queues.get(o.request_id)
                        if q is not None:
                            q.put(o)
            finally:
                for b in batchers:
                    b.release()
            if self.min_step_s:
                left = self.min_step_s - (time.perf_counter() - t)
                while left > 0 and not self._stop.is_set():
                    self._drain_cmds()
                    self._wake.wait(timeout=left)
                    self._wake.clear()
                    left = self.min_step_s - (time.perf_counter() - t)
        # shutting down: fail whatever is left
        with self._lock:
            ids = list(self._queues)
        for rid in ids:
            self._finish_queue(rid, CancelledError(SHUTTING_DOWN))
