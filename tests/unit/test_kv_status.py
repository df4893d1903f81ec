"""pdserve/status.py: ErrorCode <-> gRPC status, both directions, and metadata."""

from __future__ import annotations

import grpc
import pytest

from pdserve import errors
from pdserve.errors import ErrorCode
from pdserve.status import (
    MD_ERROR_CLASS,
    MD_RETRY_AFTER,
    error_from_rpc_error,
    from_grpc_code,
    raise_from_rpc_error,
    status_for,
    to_grpc_code,
)


class FakeRpcError(grpc.RpcError, grpc.Call):
    def __init__(self, code: grpc.StatusCode, details: str, md: tuple = ()) -> None:
        self._code, self._details, self._md = code, details, md

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._md

    def initial_metadata(self) -> tuple:  # pragma: no cover - Call interface
        return ()

    def is_active(self) -> bool:  # pragma: no cover
        return False

    def time_remaining(self) -> None:  # pragma: no cover
        return None

    def cancel(self) -> bool:  # pragma: no cover
        return False

    def add_callback(self, cb: object) -> bool:  # pragma: no cover
        return False


@pytest.mark.parametrize("code", list(ErrorCode))
def test_codes_map_one_to_one(code: ErrorCode) -> None:
    assert to_grpc_code(code).name == code.value
    assert from_grpc_code(to_grpc_code(code)) is code


def test_unknown_grpc_codes_become_internal() -> None:
    assert from_grpc_code(grpc.StatusCode.UNIMPLEMENTED) is ErrorCode.INTERNAL
    assert from_grpc_code(None) is ErrorCode.INTERNAL
    assert from_grpc_code(grpc.StatusCode.OUT_OF_RANGE) is ErrorCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "exc",
    [
        errors.InvalidRequestError("bad"),
        errors.LayoutMismatchError("layouts differ"),
        errors.RequestNotFoundError("no such block"),
        errors.ModelNotFoundError("no such model"),
        errors.ResourceExhaustedError("full", retry_after_s=2.5),
        errors.UnavailableError("down"),
        errors.DeadlineExceededError("late"),
        errors.CancelledError("gone"),
    ],
)
def test_round_trip_keeps_class_message_and_retry(exc: errors.PdserveError) -> None:
    st = status_for(exc)
    assert st.code is to_grpc_code(exc.code) and st.details == exc.message
    back = error_from_rpc_error(FakeRpcError(st.code, st.details, st.metadata))
    assert type(back) is type(exc) and back.message == exc.message
    if isinstance(exc, errors.ResourceExhaustedError):
        assert back.retry_after_s == 2.5
    with pytest.raises(type(exc)) as ei:
        raise_from_rpc_error(FakeRpcError(st.code, st.details, st.metadata))
    assert isinstance(ei.value.__cause__, grpc.RpcError)


def test_without_metadata_falls_back_to_code_class() -> None:
    e = error_from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "x"))
    assert isinstance(e, errors.ModelNotFoundError)
    e = error_from_rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connect failed"))
    assert isinstance(e, errors.UnavailableError) and "connect failed" in str(e)


def test_metadata_class_must_match_code() -> None:
    md = ((MD_ERROR_CLASS, "LayoutMismatchError"),)
    e = error_from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "x", md))
    assert type(e) is errors.InvalidRequestError
    md = ((MD_ERROR_CLASS, "os"), (MD_RETRY_AFTER, "1.0"))
    assert type(error_from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "x", md))) is errors.InternalError


def test_unimplemented_keeps_its_name() -> None:
    e = error_from_rpc_error(FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
    assert isinstance(e, errors.InternalError) and str(e).startswith("UNIMPLEMENTED:")


def test_unexpected_exception_is_internal() -> None:
    st = status_for(KeyError("boom"))
    assert st.code is grpc.StatusCode.INTERNAL and "KeyError" in st.details and st.metadata == ()


def test_downstream_rpc_error_propagates_typed() -> None:
    st = status_for(
        FakeRpcError(
            grpc.StatusCode.FAILED_PRECONDITION, "layout", ((MD_ERROR_CLASS, "LayoutMismatchError"),)
        )
    )
    assert (
        st.code is grpc.StatusCode.FAILED_PRECONDITION
        and (MD_ERROR_CLASS, "LayoutMismatchError") in st.metadata
    )
