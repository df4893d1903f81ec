"""The one mapping between pdserve errors and gRPC statuses, both directions.

Server side: a servicer raises a :class:`pdserve.errors.PdserveError`; :func:`status_for` turns any
exception into an :class:`RpcStatus` (code, user-facing details, trailing metadata) and
:func:`abort_with` / :func:`abort_with_aio` end the call with it. :func:`add_servicer` registers a
servicer so that this happens for every method without per-method boilerplate, and so that a
request that cannot even be decoded is answered with INVALID_ARGUMENT (gRPC's own default would
be INTERNAL).

Client side: :func:`raise_from_rpc_error` re-raises a failed call as the typed pdserve exception,
so ``except LayoutMismatchError`` works the same in-process and across the network.

Trailing metadata carries what the status code alone cannot: ``pdserve-error`` (the exception
class name, so e.g. RequestNotFoundError and ModelNotFoundError, both NOT_FOUND, stay distinct)
and ``pdserve-retry-after-s`` (ResourceExhaustedError.retry_after_s).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory

from pdserve import errors
from pdserve.errors import ErrorCode, InvalidRequestError, PdserveError, ResourceExhaustedError

MD_ERROR_CLASS = "pdserve-error"
MD_RETRY_AFTER = "pdserve-retry-after-s"

_TO_GRPC: dict[ErrorCode, grpc.StatusCode] = {c: grpc.StatusCode[c.value] for c in ErrorCode}
_FROM_GRPC: dict[grpc.StatusCode, ErrorCode] = {v: k for k, v in _TO_GRPC.items()}
_FROM_GRPC[grpc.StatusCode.OUT_OF_RANGE] = ErrorCode.INVALID_ARGUMENT


def to_grpc_code(code: ErrorCode) -> grpc.StatusCode:
    """gRPC status code of a pdserve error code (1:1, same names)."""
    return _TO_GRPC[code]


def from_grpc_code(code: grpc.StatusCode | None) -> ErrorCode:
    """pdserve error code of a gRPC status; codes pdserve does not use map to INTERNAL."""
    if code is None:
        return ErrorCode.INTERNAL
    return _FROM_GRPC.get(code, ErrorCode.INTERNAL)


@dataclass(frozen=True)
class RpcStatus:
    code: grpc.StatusCode
    details: str
    metadata: tuple[tuple[str, str], ...] = ()


def status_for(exc: BaseException) -> RpcStatus:
    """THE mapping from an exception raised while serving to the status the caller receives.

    PdserveError -> its code and message; a grpc.RpcError from a downstream call -> the typed error
    it stands for (so failures propagate through the router unchanged); anything else -> INTERNAL
    with the exception type named (a bug, but never a crashed server).
    """
    if isinstance(exc, grpc.RpcError) and not isinstance(exc, PdserveError):
        exc = error_from_rpc_error(exc)
    if isinstance(exc, PdserveError):
        md: list[tuple[str, str]] = [(MD_ERROR_CLASS, type(exc).__name__)]
        retry = getattr(exc, "retry_after_s", None)
        if retry is not None:
            md.append((MD_RETRY_AFTER, repr(float(retry))))
        return RpcStatus(to_grpc_code(exc.code), exc.message, tuple(md))
    return RpcStatus(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def abort_with(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End a sync-server call with the status for ``exc`` (raises, as context.abort does)."""
    st = status_for(exc)
    if st.metadata:
        context.set_trailing_metadata(st.metadata)
    context.abort(st.code, st.details)
    raise AssertionError("unreachable: context.abort returned")  # pragma: no cover


async def abort_with_aio(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """:func:`abort_with` for grpc.aio servers."""
    st = status_for(exc)
    if st.metadata:
        context.set_trailing_metadata(st.metadata)
    await context.abort(st.code, st.details)
    raise AssertionError("unreachable: context.abort returned")  # pragma: no cover


def _md_value(md: Any, key: str) -> str | None:
    for item in md or ():
        k, v = item[0], item[1]
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def error_from_rpc_error(e: grpc.RpcError) -> PdserveError:
    """The typed pdserve exception a failed call stands for."""
    code_fn = getattr(e, "code", None)
    details_fn = getattr(e, "details", None)
    md_fn = getattr(e, "trailing_metadata", None)
    grpc_code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or str(e)
    md = md_fn() if callable(md_fn) else None
    code = from_grpc_code(grpc_code)
    cls = errors.error_class_for(code)
    named = getattr(errors, _md_value(md, MD_ERROR_CLASS) or "", None)
    if inspect.isclass(named) and issubclass(named, PdserveError) and named.code is code:
        cls = named
    if grpc_code is not None and from_grpc_code(grpc_code).value != grpc_code.name:
        details = f"{grpc_code.name}: {details}"  # e.g. UNIMPLEMENTED: keep what really happened
    if issubclass(cls, ResourceExhaustedError):
        retry = _md_value(md, MD_RETRY_AFTER)
        return cls(details, retry_after_s=float(retry) if retry else None)
    try:
        return cls(details)
    except TypeError:  # a subclass with another constructor: fall back to the code's class
        return errors.error_class_for(code)(details)


def raise_from_rpc_error(e: grpc.RpcError) -> NoReturn:
    """Client side: ``except grpc.RpcError as e: raise_from_rpc_error(e)``."""
    raise error_from_rpc_error(e) from e


# ---------------------------------------------------------------- servicer registration


class _Malformed:
    """Stands in for a request that failed to decode; the handler answers INVALID_ARGUMENT."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _safe_deserializer(cls: Any, method: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as e:  # DecodeError and anything else the parser throws
            return _Malformed(f"{method}: request is not a valid {cls.DESCRIPTOR.full_name} ({e})")

    return deserialize


def _check(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidRequestError(request.reason)
    return request


def _checked_iter(requests: Iterator[Any]) -> Iterator[Any]:
    for r in requests:
        yield _check(r)


def _aborted(context: grpc.ServicerContext) -> bool:
    code_fn = getattr(context, "code", None)
    try:
        code = code_fn() if callable(code_fn) else None
    except Exception:
        return False
    return code not in (None, grpc.StatusCode.OK)


def _wrap(fn: Callable[..., Any], client_streaming: bool, server_streaming: bool) -> Callable[..., Any]:
    def prepare(request: Any) -> Any:
        return _checked_iter(request) if client_streaming else _check(request)

    if server_streaming:

        def stream_handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(prepare(request), context)
            except Exception as e:
                if _aborted(context):
                    raise
                abort_with(context, e)

        return stream_handler

    def unary_handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(prepare(request), context)
        except Exception as e:
            if _aborted(context):
                raise
            abort_with(context, e)

    return unary_handler


def _serializer(cls: Any) -> Callable[[Any], bytes]:
    def serialize(msg: Any) -> bytes:
        return msg if isinstance(msg, bytes) else cls.SerializeToString(msg)

    return serialize


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(server: grpc.Server, service: _descriptor.ServiceDescriptor, servicer: object) -> None:
    """Register ``servicer`` (an object with one method per rpc) on a sync ``grpc.server``.

    Unlike the generated ``add_XServicer_to_server``, every method is wrapped so that a raised
    exception becomes a status through :func:`status_for`, and an undecodable request (or stream
    message) becomes INVALID_ARGUMENT instead of INTERNAL. Methods the servicer lacks answer
    UNIMPLEMENTED. A method may return/yield already-serialised ``bytes`` of its response type
    (hot paths that encode payloads without protobuf copies); they are sent as they are.
    """
    handlers = {}
    for m in service.methods:
        fn = getattr(servicer, m.name, None)
        if fn is None:
            continue
        req_cls = message_factory.GetMessageClass(m.input_type)
        resp_cls = message_factory.GetMessageClass(m.output_type)
        factory = _FACTORIES[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = factory(
            _wrap(fn, m.client_streaming, m.server_streaming),
            request_deserializer=_safe_deserializer(req_cls, m.full_name),
            response_serializer=_serializer(resp_cls),
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
