"""Request ids across hops, and structured (JSON lines) logs that carry them.

* :func:`request_scope` binds a request id to the current thread/task (a ``ContextVar``);
  :func:`current_request_id` reads it.
* :class:`JsonFormatter` renders each log record as one JSON object:
  ``{"ts", "level", "component", "logger", "msg", "request_id"?, ...extra fields}``; the request
  id comes from ``extra={"request_id": ...}`` or else from the bound scope. Extra fields named
  ``_*`` are private and left out.
  :func:`log_event` logs a message with fields: ``log_event(log, "prefill done", cached_tokens=3)``.
* :func:`configure_logging` installs it on the root logger of a process (stderr). Set
  ``PDSERVE_LOG_FORMAT=text`` for the classic one-line text format instead.
* gRPC: the id travels as metadata ``pdserve-request-id``. :class:`RequestIdClientInterceptor`
  adds the bound id to every outgoing call of a channel; :func:`request_id_from_context` reads it
  on the server side.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import grpc

METADATA_KEY = "pdserve-request-id"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("pdserve_request_id", default="")

# attributes every LogRecord has; anything else on a record is an ``extra`` field, except names
# starting with "_": private attributes that libraries' record factories add to every record
# (Ray's ``_ray_timestamp_ns`` once ``ray.init`` ran in the process)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def current_request_id() -> str:
    """The request id bound by the innermost :func:`request_scope`, or ""."""
    return _request_id.get()


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Bind ``request_id`` for the duration of the ``with`` (nestable; restores the outer id).

    In a generator the binding is visible to the thread iterating it between items (Python has
    no per-generator context). A generator finished by another thread (e.g. closed by garbage
    collection) cannot restore the first thread's binding; that is not an error here, and the
    next :func:`request_scope` in that thread rebinds."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):  # ValueError: token made in another thread's context
            _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see module docstring); values that JSON cannot hold are str()."""

    def __init__(self, component: str = "") -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        """Called only for a record a handler emits (a record below the logger's level is never
        made: :func:`log_event`)."""
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        d = record.__dict__
        rid = d.get("request_id") or current_request_id()
        if rid:
            out["request_id"] = rid
        for k in d.keys() - _STANDARD:  # the extra fields (a set difference, not a scan in Python)
            if k not in out and not k.startswith("_"):
                out[k] = d[k]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _dumps(out)


_dumps = json.JSONEncoder(default=str, separators=(",", ":")).encode  # one encoder, made once


def log_event(logger: logging.Logger, msg: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log ``msg`` with ``fields`` as structured keys, stamped with the bound request id (unless
    ``request_id`` is given). Field names must not clash with LogRecord attributes (``name``,
    ``msg``, ...): KeyError. Cheap on the request path (#12): nothing is made when ``level`` is
    not enabled, and an enabled record is handed to the handlers without a look-up of its
    caller's source file and line (``pathname``/``lineno`` are not set; no pdserve format shows
    them; ``logger.log`` walks the stack for them on every record)."""
    if logger.isEnabledFor(level):
        rid = fields.pop("request_id", None) or current_request_id()
        if rid:
            fields["request_id"] = rid
        logger.handle(logger.makeRecord(logger.name, level, "(unknown file)", 0, msg, (), None, extra=fields))


def configure_logging(component: str, level: int = logging.INFO) -> None:
    """Root logger of this process -> stderr, JSON lines (or text if PDSERVE_LOG_FORMAT=text)."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("PDSERVE_LOG_FORMAT", "json").lower() == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


# ---------------------------------------------------------------------------- gRPC
def request_id_from_context(context: grpc.ServicerContext) -> str:
    """The ``pdserve-request-id`` metadata of an incoming call, or ""."""
    for item in context.invocation_metadata() or ():
        if item[0] == METADATA_KEY:
            v = item[1]
            return v.decode() if isinstance(v, bytes) else str(v)
    return ""


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class _Details(_CallDetails, grpc.ClientCallDetails):
    pass


def with_metadata(d: grpc.ClientCallDetails, *items: tuple[str, str]) -> grpc.ClientCallDetails:
    """``d`` with ``items`` appended to its metadata (for client interceptors)."""
    return _Details(
        d.method,
        d.timeout,
        [*(d.metadata or ()), *items],
        d.credentials,
        getattr(d, "wait_for_ready", None),
        getattr(d, "compression", None),
    )


class RequestIdClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``pdserve-request-id: <bound id>`` to each call made while a request id is bound.

    ``grpc.intercept_channel(channel, RequestIdClientInterceptor())``."""

    @staticmethod
    def _details(d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        rid = current_request_id()
        return with_metadata(d, (METADATA_KEY, rid)) if rid else d

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with :class:`RequestIdClientInterceptor` applied."""
    return grpc.intercept_channel(channel, RequestIdClientInterceptor())
