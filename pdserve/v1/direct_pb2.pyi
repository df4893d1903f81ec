from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

from pdserve.v1 import common_pb2 as _common_pb2

DESCRIPTOR: _descriptor.FileDescriptor

class DirectGrant(_message.Message):
    __slots__ = ("ticket", "progress_interval_s")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    ticket: str
    progress_interval_s: float
    def __init__(self, ticket: str | None = ..., progress_interval_s: float | None = ...) -> None: ...

class DirectRedirect(_message.Message):
    __slots__ = ("address", "worker_id", "ticket", "request_id", "lost")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    address: str
    worker_id: str
    ticket: str
    request_id: str
    lost: bool
    def __init__(
        self,
        address: str | None = ...,
        worker_id: str | None = ...,
        ticket: str | None = ...,
        request_id: str | None = ...,
        lost: bool | None = ...,
    ) -> None: ...

class DirectAttach(_message.Message):
    __slots__ = ("request_id", "ticket")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ticket: str
    def __init__(self, request_id: str | None = ..., ticket: str | None = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("attach", "detach")
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    DETACH_FIELD_NUMBER: _ClassVar[int]
    attach: DirectAttach
    detach: str
    def __init__(self, attach: DirectAttach | _Mapping | None = ..., detach: str | None = ...) -> None: ...

class DirectDelta(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "done", "error_code", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    done: bool
    error_code: int
    error: str
    def __init__(
        self,
        request_id: str | None = ...,
        token_ids: _Iterable[int] | None = ...,
        text: str | None = ...,
        logprobs: _Iterable[_common_pb2.TokenLogprob | _Mapping] | None = ...,
        done: bool | None = ...,
        error_code: int | None = ...,
        error: str | None = ...,
    ) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("deltas",)
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    deltas: _containers.RepeatedCompositeFieldContainer[DirectDelta]
    def __init__(self, deltas: _Iterable[DirectDelta | _Mapping] | None = ...) -> None: ...

class ResumeDirectRequest(_message.Message):
    __slots__ = ("request_id", "ticket", "token_ids", "text_chars")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ticket: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text_chars: int
    def __init__(
        self,
        request_id: str | None = ...,
        ticket: str | None = ...,
        token_ids: _Iterable[int] | None = ...,
        text_chars: int | None = ...,
    ) -> None: ...

class ResumeDirectResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
