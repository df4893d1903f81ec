from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

from pdserve.v1 import worker_pb2 as _worker_pb2

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "role", "address", "model", "stats", "profile", "adapters")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _worker_pb2.WorkerRole
    address: str
    model: str
    stats: _worker_pb2.WorkerStats
    profile: StepProfile
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(
        self,
        worker_id: str | None = ...,
        role: _worker_pb2.WorkerRole | str | None = ...,
        address: str | None = ...,
        model: str | None = ...,
        stats: _worker_pb2.WorkerStats | _Mapping | None = ...,
        profile: StepProfile | _Mapping | None = ...,
        adapters: _Iterable[str] | None = ...,
    ) -> None: ...

class StepProfile(_message.Message):
    __slots__ = (
        "prefill_base_s",
        "prefill_per_token_s",
        "prefill_per_token_ctx_s",
        "decode_base_s",
        "decode_per_seq_s",
        "decode_per_ctx_token_s",
        "key",
    )
    PREFILL_BASE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PER_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_PER_TOKEN_CTX_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_BASE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_PER_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_PER_CTX_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    prefill_base_s: float
    prefill_per_token_s: float
    prefill_per_token_ctx_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_ctx_token_s: float
    key: str
    def __init__(
        self,
        prefill_base_s: float | None = ...,
        prefill_per_token_s: float | None = ...,
        prefill_per_token_ctx_s: float | None = ...,
        decode_base_s: float | None = ...,
        decode_per_seq_s: float | None = ...,
        decode_per_ctx_token_s: float | None = ...,
        key: str | None = ...,
    ) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s", "heartbeat_timeout_s", "control_address")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    control_address: str
    def __init__(
        self,
        heartbeat_interval_s: float | None = ...,
        heartbeat_timeout_s: float | None = ...,
        control_address: str | None = ...,
    ) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "stats")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    stats: _worker_pb2.WorkerStats
    def __init__(
        self, worker_id: str | None = ..., stats: _worker_pb2.WorkerStats | _Mapping | None = ...
    ) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: bool | None = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: str | None = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: bool | None = ...) -> None: ...
