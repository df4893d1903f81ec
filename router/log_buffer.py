"""Buffered log writes for the router process (#12: the router's per-request CPU).

The router logs a few structured lines per request ("routed", "policy feedback", "request done").
On stderr (line-buffered when not a terminal, since Python 3.9) each line is a ``write`` system
call: at 32 tokens per request, 5.5% of the router's CPU in ``bench/serving_efficiency.py``'s
profile went to ``StreamHandler.emit`` itself. :func:`buffer_log_writes` makes the root logger's
stderr handler write into a 64 KiB buffer instead, flushed:

* at once for a record at ``flush_level`` (default WARNING) or above, so warnings and errors
  leave as they are logged;
* otherwise at most ``interval_s`` (default 0.1 s) after it was written, by a daemon thread;
* at exit (``logging.shutdown`` flushes every handler; a SIGKILL loses at most ``interval_s`` of
  INFO lines).

Lines are whole and in order: the handler's lock covers each write and each flush. The lines and
their format are unchanged; only when they reach the file descriptor changes.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from typing import TextIO

BUFFER_BYTES = 1 << 16


class BufferedStreamHandler(logging.StreamHandler):
    """A :class:`logging.StreamHandler` that flushes its stream only for records at
    ``flush_level`` or above, on :meth:`flush` (called by the flusher thread and by
    ``logging.shutdown``), and when :meth:`close`\\ d."""

    def __init__(self, stream: TextIO, flush_level: int = logging.WARNING) -> None:
        super().__init__(stream)
        self.flush_level = flush_level
        self._dirty = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record) + self.terminator
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(msg)
                if record.levelno >= self.flush_level:
                    self.stream.flush()
                    self._dirty = False
                else:
                    self._dirty = True
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()
            self._dirty = False

    def flush_if_dirty(self) -> None:
        """Flush when something was written since the last flush (the flusher thread's call)."""
        if self._dirty:
            self.flush()


def _stderr_stream() -> TextIO:
    """A block-buffered text stream on stderr's file descriptor (not closing it)."""
    fd = sys.stderr.fileno()
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        io.BufferedWriter(raw, BUFFER_BYTES),
        encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
        errors="backslashreplace",
        line_buffering=False,
        write_through=False,
    )


def buffer_log_writes(
    interval_s: float = 0.1, flush_level: int = logging.WARNING
) -> BufferedStreamHandler | None:
    """Replace the root logger's stderr :class:`logging.StreamHandler` (as
    :func:`pdserve.tracing.configure_logging` installs it) by a :class:`BufferedStreamHandler`
    with the same formatter and level, flushed every ``interval_s`` by a daemon thread. Returns the
    new handler; None (nothing changed) when the root logger has no stderr handler or stderr has
    no file descriptor. Raises ValueError when ``interval_s`` is not > 0."""
    if not interval_s > 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    root = logging.getLogger()
    old = next(
        (
            h
            for h in root.handlers
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) is sys.stderr
        ),
        None,
    )
    if old is None:
        return None
    try:
        stream = _stderr_stream()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None
    new = BufferedStreamHandler(stream, flush_level)
    new.setFormatter(old.formatter)
    new.setLevel(old.level)
    for f in old.filters:
        new.addFilter(f)
    old.flush()
    root.removeHandler(old)
    root.addHandler(new)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.wait(interval_s):
            try:
                new.flush_if_dirty()
            except (OSError, ValueError):  # stderr closed under us: nothing more to flush
                return

    threading.Thread(target=flusher, name=f"log-flush-{os.getpid()}", daemon=True).start()
    return new
