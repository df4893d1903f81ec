"""THE mapping from exceptions to OpenAI error responses (pure: no sockets, no grpc).

Every failure of the HTTP front end leaves through :func:`error_response`, which turns any
exception into an :class:`ErrorResponse`: an HTTP status, the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` and extra headers (``Retry-After`` for 429,
``Allow`` for 405). The status of a pdserve error comes from ONE table, :data:`ERROR_TABLE`, keyed by
the :mod:`pdserve.errors` class and looked up along the exception's MRO, so a subclass (e.g.
:class:`UnknownModelError`) inherits its parent's row unless it has its own.

Front-end-only conditions that are not pdserve errors (unknown URL, wrong method, body too large,
missing Content-Length, too many headers) are :class:`HttpError`, which carries its status itself.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pdserve.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    PdserveError,
    PermissionDeniedError,
    RequestNotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)


class ErrorType(enum.Enum):
    """The ``error.type`` strings of the OpenAI error body."""

    INVALID_REQUEST = "invalid_request_error"
    RATE_LIMIT = "rate_limit_error"
    SERVICE_UNAVAILABLE = "service_unavailable_error"
    TIMEOUT = "timeout_error"
    SERVER = "server_error"


class ErrorCodeStr(enum.Enum):
    """The ``error.code`` strings this front end emits (``None`` is also allowed in the body)."""

    INVALID_VALUE = "invalid_value"
    MODEL_NOT_FOUND = "model_not_found"
    NOT_FOUND = "not_found"
    UNKNOWN_URL = "unknown_url"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "request_too_large"
    LENGTH_REQUIRED = "length_required"
    HEADERS_TOO_LARGE = "request_header_fields_too_large"
    RATE_LIMIT = "rate_limit_exceeded"
    UNAVAILABLE = "unavailable"
    DEADLINE = "deadline_exceeded"
    INTERNAL = "internal_error"
    INVALID_API_KEY = "invalid_api_key"
    PERMISSION_DENIED = "permission_denied"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class ErrorRow:
    """One row of :data:`ERROR_TABLE`."""

    status: HTTPStatus
    type: ErrorType
    code: ErrorCodeStr


class FieldError(InvalidRequestError):
    """A request field is missing, of the wrong type or out of range (HTTP 400, ``param`` = field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownModelError(ModelNotFoundError):
    """The body names a model the router does not serve (HTTP 404, ``model_not_found``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.param = "model"


class HttpError(Exception):
    """A condition of the HTTP layer itself; carries its status (404 URL, 405, 411, 413, 431)."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        code: ErrorCodeStr,
        *,
        allow: tuple[str, ...] = (),
        close_connection: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.allow = allow
        self.close_connection = close_connection


# The one table: pdserve error class -> HTTP status, OpenAI error type and code.
# Looked up along the MRO; PdserveError (the base) is the catch-all 500 row.
ERROR_TABLE: dict[type[PdserveError], ErrorRow] = {
    InvalidRequestError: ErrorRow(
        HTTPStatus.BAD_REQUEST, ErrorType.INVALID_REQUEST, ErrorCodeStr.INVALID_VALUE
    ),
    UnknownModelError: ErrorRow(
        HTTPStatus.NOT_FOUND, ErrorType.INVALID_REQUEST, ErrorCodeStr.MODEL_NOT_FOUND
    ),
    ModelNotFoundError: ErrorRow(
        HTTPStatus.NOT_FOUND, ErrorType.INVALID_REQUEST, ErrorCodeStr.MODEL_NOT_FOUND
    ),
    RequestNotFoundError: ErrorRow(HTTPStatus.NOT_FOUND, ErrorType.INVALID_REQUEST, ErrorCodeStr.NOT_FOUND),
    ResourceExhaustedError: ErrorRow(
        HTTPStatus.TOO_MANY_REQUESTS, ErrorType.RATE_LIMIT, ErrorCodeStr.RATE_LIMIT
    ),
    UnavailableError: ErrorRow(
        HTTPStatus.SERVICE_UNAVAILABLE, ErrorType.SERVICE_UNAVAILABLE, ErrorCodeStr.UNAVAILABLE
    ),
    DeadlineExceededError: ErrorRow(HTTPStatus.GATEWAY_TIMEOUT, ErrorType.TIMEOUT, ErrorCodeStr.DEADLINE),
    UnauthenticatedError: ErrorRow(
        HTTPStatus.UNAUTHORIZED, ErrorType.INVALID_REQUEST, ErrorCodeStr.INVALID_API_KEY
    ),
    PermissionDeniedError: ErrorRow(
        HTTPStatus.FORBIDDEN, ErrorType.INVALID_REQUEST, ErrorCodeStr.PERMISSION_DENIED
    ),
    AlreadyExistsError: ErrorRow(HTTPStatus.CONFLICT, ErrorType.INVALID_REQUEST, ErrorCodeStr.CONFLICT),
    PdserveError: ErrorRow(HTTPStatus.INTERNAL_SERVER_ERROR, ErrorType.SERVER, ErrorCodeStr.INTERNAL),
}

_INTERNAL = ERROR_TABLE[PdserveError]


@dataclass(frozen=True)
class ErrorResponse:
    """What the HTTP layer sends for a failure: status, JSON body, extra headers.

    ``close_connection``: the request body was not read, so the connection cannot be reused.
    """

    status: HTTPStatus
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    close_connection: bool = False


def row_for(exc_type: type[BaseException]) -> ErrorRow:
    """The :data:`ERROR_TABLE` row of an exception class (its nearest listed ancestor); classes
    outside pdserve's hierarchy get the 500 row."""
    for cls in exc_type.__mro__:
        row = ERROR_TABLE.get(cls)  # type: ignore[call-overload]
        if row is not None:
            return row
    return _INTERNAL


def error_body(
    message: str, type_: ErrorType, code: ErrorCodeStr | None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object: exactly ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": message,
            "type": type_.value,
            "param": param,
            "code": code.value if code is not None else None,
        }
    }


def retry_after_header(retry_after_s: float | None) -> str | None:
    """``Retry-After`` value (whole seconds, rounded up, at least 1) or None when unknown."""
    if retry_after_s is None or not math.isfinite(retry_after_s) or retry_after_s < 0:
        return None
    return str(max(1, math.ceil(retry_after_s)))


def error_response(exc: BaseException) -> ErrorResponse:
    """THE mapping from any exception to the response a client receives.

    :class:`HttpError` -> its own status; a :class:`PdserveError` -> its :data:`ERROR_TABLE` row,
    its message, ``param`` when it has one, and ``Retry-After`` from ``retry_after_s`` on 429;
    anything else -> 500 naming the exception type (a bug, but never a crashed server).
    """
    if isinstance(exc, HttpError):
        headers = (("Allow", ", ".join(exc.allow)),) if exc.allow else ()
        return ErrorResponse(
            exc.status,
            error_body(exc.message, ErrorType.INVALID_REQUEST, exc.code),
            headers,
            exc.close_connection,
        )
    if isinstance(exc, PdserveError):
        row = row_for(type(exc))
        hdrs: list[tuple[str, str]] = []
        if row.status is HTTPStatus.UNAUTHORIZED:
            hdrs.append(("WWW-Authenticate", "Bearer"))
        if row.status is HTTPStatus.TOO_MANY_REQUESTS:
            ra = retry_after_header(getattr(exc, "retry_after_s", None))
            if ra is not None:
                hdrs.append(("Retry-After", ra))
        param = getattr(exc, "param", None)
        return ErrorResponse(
            row.status,
            error_body(exc.message, row.type, row.code, param if isinstance(param, str) else None),
            tuple(hdrs),
        )
    return ErrorResponse(
        _INTERNAL.status,
        error_body(f"internal error: {type(exc).__name__}: {exc}", _INTERNAL.type, _INTERNAL.code),
    )
