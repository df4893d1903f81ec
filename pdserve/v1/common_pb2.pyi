from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]

FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class SamplingParams(_message.Message):
    __slots__ = (
        "max_tokens",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop_token_ids",
        "stop",
        "ignore_eos",
        "logprobs",
        "min_tokens",
        "seed_position_offset",
        "n",
        "best_of",
    )
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_POSITION_OFFSET_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    BEST_OF_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    logprobs: int
    min_tokens: int
    seed_position_offset: int
    n: int
    best_of: int
    def __init__(
        self,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        seed: int | None = ...,
        stop_token_ids: _Iterable[int] | None = ...,
        stop: _Iterable[str] | None = ...,
        ignore_eos: bool | None = ...,
        logprobs: int | None = ...,
        min_tokens: int | None = ...,
        seed_position_offset: int | None = ...,
        n: int | None = ...,
        best_of: int | None = ...,
    ) -> None: ...

class KVLayout(_message.Message):
    __slots__ = ("model_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "block_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int
    def __init__(
        self,
        model_id: str | None = ...,
        num_layers: int | None = ...,
        num_kv_heads: int | None = ...,
        head_dim: int | None = ...,
        dtype: str | None = ...,
        block_size: int | None = ...,
    ) -> None: ...

class BlockLocation(_message.Message):
    __slots__ = ("node_id", "address", "shm_name", "host_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHM_NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    shm_name: str
    host_id: str
    def __init__(
        self,
        node_id: str | None = ...,
        address: str | None = ...,
        shm_name: str | None = ...,
        host_id: str | None = ...,
    ) -> None: ...

class KVHandle(_message.Message):
    __slots__ = (
        "request_id",
        "block_hashes",
        "locations",
        "layout",
        "num_tokens",
        "lease_id",
        "shm_slots",
        "lease_expires_at_unix_s",
        "dist_address",
        "dist_rank",
        "block_checksums",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DIST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DIST_RANK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    locations: _containers.RepeatedCompositeFieldContainer[BlockLocation]
    layout: KVLayout
    num_tokens: int
    lease_id: str
    shm_slots: _containers.RepeatedScalarFieldContainer[int]
    lease_expires_at_unix_s: float
    dist_address: str
    dist_rank: int
    block_checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self,
        request_id: str | None = ...,
        block_hashes: _Iterable[bytes] | None = ...,
        locations: _Iterable[BlockLocation | _Mapping] | None = ...,
        layout: KVLayout | _Mapping | None = ...,
        num_tokens: int | None = ...,
        lease_id: str | None = ...,
        shm_slots: _Iterable[int] | None = ...,
        lease_expires_at_unix_s: float | None = ...,
        dist_address: str | None = ...,
        dist_rank: int | None = ...,
        block_checksums: _Iterable[int] | None = ...,
    ) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "token", "token_bytes")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    token: str
    token_bytes: bytes
    def __init__(
        self,
        token_id: int | None = ...,
        logprob: float | None = ...,
        token: str | None = ...,
        token_bytes: bytes | None = ...,
    ) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "token", "top_logprobs", "token_bytes")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    token: str
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    token_bytes: bytes
    def __init__(
        self,
        token_id: int | None = ...,
        logprob: float | None = ...,
        token: str | None = ...,
        top_logprobs: _Iterable[TopLogprob | _Mapping] | None = ...,
        token_bytes: bytes | None = ...,
    ) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens", "total_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    total_tokens: int
    def __init__(
        self,
        prompt_tokens: int | None = ...,
        completion_tokens: int | None = ...,
        cached_prompt_tokens: int | None = ...,
        total_tokens: int | None = ...,
    ) -> None: ...

class Timing(_message.Message):
    __slots__ = (
        "ttft_s",
        "e2e_s",
        "token_times_s",
        "queue_s",
        "prefill_s",
        "transfer_s",
        "decode_s",
        "kv_pull_s",
    )
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    E2E_S_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TIMES_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    KV_PULL_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    e2e_s: float
    token_times_s: _containers.RepeatedScalarFieldContainer[float]
    queue_s: float
    prefill_s: float
    transfer_s: float
    decode_s: float
    kv_pull_s: float
    def __init__(
        self,
        ttft_s: float | None = ...,
        e2e_s: float | None = ...,
        token_times_s: _Iterable[float] | None = ...,
        queue_s: float | None = ...,
        prefill_s: float | None = ...,
        transfer_s: float | None = ...,
        decode_s: float | None = ...,
        kv_pull_s: float | None = ...,
    ) -> None: ...

class Finish(_message.Message):
    __slots__ = ("reason", "stop", "usage", "timing")
    REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    stop: str
    usage: Usage
    timing: Timing
    def __init__(
        self,
        reason: FinishReason | str | None = ...,
        stop: str | None = ...,
        usage: Usage | _Mapping | None = ...,
        timing: Timing | _Mapping | None = ...,
    ) -> None: ...

class SLO(_message.Message):
    __slots__ = ("ttft_s", "tpot_s")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    TPOT_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    tpot_s: float
    def __init__(self, ttft_s: float | None = ..., tpot_s: float | None = ...) -> None: ...
