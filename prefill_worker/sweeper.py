"""A periodic sweep on a daemon thread (the direct-transfer outbox's and the KV-stream registry's
expiry: :mod:`prefill_worker.dist_outbox`, :mod:`prefill_worker.kv_stream`)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Sweeper:
    """Calls ``sweep`` every ``interval_s`` seconds on a daemon thread named ``name`` from
    :meth:`start` until :meth:`stop` (which waits up to ``join_s`` for the thread). Starting
    twice is a no-op; a stopped sweeper does not start again."""

    def __init__(self, sweep: Callable[[], object], name: str) -> None:
        self._sweep = sweep
        self._name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval_s: float = 1.0) -> None:
        if not interval_s > 0:
            raise ValueError(f"sweep interval must be > 0 seconds, got {interval_s}")
        if self._thread is not None:
            return

        def run() -> None:
            while not self._stop.wait(interval_s):
                self._sweep()

        self._thread = threading.Thread(target=run, daemon=True, name=self._name)
        self._thread.start()

    def stop(self, join_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=join_s)
