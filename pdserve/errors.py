"""The one error vocabulary of pdserve.

Every component raises a :class:`PdserveError` subclass; each carries an :class:`ErrorCode`.
Service edges map ``ErrorCode`` to a gRPC status (``pdserve.status.to_grpc_code``) and the
client SDK maps statuses back to these classes, so a user sees the same typed exception
whether the failure happened in-process or across the cluster.

This module is pure: it imports nothing beyond the standard library.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """Failure classes, named after (and mapped 1:1 onto) gRPC status codes."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    ABORTED = "ABORTED"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    ALREADY_EXISTS = "ALREADY_EXISTS"


class PdserveError(Exception):
    """Base class. ``message`` must tell the user what to change."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidRequestError(PdserveError, ValueError):
    """The request itself is wrong (empty prompt, bad sampling value, too long...)."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFoundError(PdserveError, FileNotFoundError):
    """The named model, model path or adapter does not exist."""

    code = ErrorCode.NOT_FOUND


class RequestNotFoundError(PdserveError, KeyError):
    """An operation named a request id that is not (or no longer) known."""

    code = ErrorCode.NOT_FOUND


class ResourceExhaustedError(PdserveError):
    """No capacity now; ``retry_after_s`` says when trying again is sensible."""

    code = ErrorCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class FailedPreconditionError(PdserveError):
    """The operation cannot run in the target's present state (e.g. a worker without LoRA slots
    asked to load an adapter); the message says what to change."""

    code = ErrorCode.FAILED_PRECONDITION


class LayoutMismatchError(FailedPreconditionError):
    """KV blocks were produced with a different layout (model, heads, dtype, block size)."""


class UnavailableError(PdserveError):
    """A peer (worker, store node, router) cannot be reached."""

    code = ErrorCode.UNAVAILABLE


class StoreUnavailableError(UnavailableError):
    """A KV store node cannot be reached. Raised by the store's clients (the worker or router
    that called it is healthy): the router fails the request naming the store and keeps the
    worker registered, instead of treating the worker as lost."""


class DeadlineExceededError(PdserveError):
    code = ErrorCode.DEADLINE_EXCEEDED


class CancelledError(PdserveError):
    code = ErrorCode.CANCELLED


class InternalError(PdserveError):
    code = ErrorCode.INTERNAL


class UnauthenticatedError(PdserveError):
    """No credentials, or credentials that are wrong, unknown or revoked (gRPC UNAUTHENTICATED,
    HTTP 401). The message never says which of these it was beyond what the caller sent."""

    code = ErrorCode.UNAUTHENTICATED


class PermissionDeniedError(PdserveError):
    """The caller is known but may not do this (e.g. deregister a worker it is not)."""

    code = ErrorCode.PERMISSION_DENIED


class AlreadyExistsError(PdserveError):
    """The named thing exists already (e.g. a request id still in flight; HTTP 409)."""

    code = ErrorCode.ALREADY_EXISTS


_BY_CODE: dict[ErrorCode, type[PdserveError]] = {
    ErrorCode.INVALID_ARGUMENT: InvalidRequestError,
    ErrorCode.NOT_FOUND: ModelNotFoundError,
    ErrorCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    ErrorCode.FAILED_PRECONDITION: LayoutMismatchError,
    ErrorCode.UNAVAILABLE: UnavailableError,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    ErrorCode.CANCELLED: CancelledError,
    ErrorCode.ABORTED: InternalError,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.UNAUTHENTICATED: UnauthenticatedError,
    ErrorCode.PERMISSION_DENIED: PermissionDeniedError,
    ErrorCode.ALREADY_EXISTS: AlreadyExistsError,
}


def error_class_for(code: ErrorCode) -> type[PdserveError]:
    """The exception class the client raises for a status carrying ``code``."""
    return _BY_CODE[code]
