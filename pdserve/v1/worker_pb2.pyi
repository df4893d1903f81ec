from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

from pdserve.v1 import common_pb2 as _common_pb2
from pdserve.v1 import direct_pb2 as _direct_pb2

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_RESULT_UNSPECIFIED: _ClassVar[MigrationResult]
    MIGRATION_RESULT_MIGRATED: _ClassVar[MigrationResult]
    MIGRATION_RESULT_ABORTED_DEST_FULL: _ClassVar[MigrationResult]
    MIGRATION_RESULT_ABORTED_SOURCE_FINISHED: _ClassVar[MigrationResult]
    MIGRATION_RESULT_ABORTED_CANCELLED: _ClassVar[MigrationResult]
    MIGRATION_RESULT_ABORTED_PEER_DIED: _ClassVar[MigrationResult]
    MIGRATION_RESULT_ABORTED_SOURCE_PREEMPTED: _ClassVar[MigrationResult]
    MIGRATION_RESULT_ABORTED_REFUSED: _ClassVar[MigrationResult]

class MigrationTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_TRANSPORT_UNSPECIFIED: _ClassVar[MigrationTransport]
    MIGRATION_TRANSPORT_GRPC: _ClassVar[MigrationTransport]
    MIGRATION_TRANSPORT_STORE: _ClassVar[MigrationTransport]
    MIGRATION_TRANSPORT_DIST: _ClassVar[MigrationTransport]

class KVStreamTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_STREAM_TRANSPORT_UNSPECIFIED: _ClassVar[KVStreamTransport]
    KV_STREAM_TRANSPORT_GRPC: _ClassVar[KVStreamTransport]
    KV_STREAM_TRANSPORT_STORE: _ClassVar[KVStreamTransport]
    KV_STREAM_TRANSPORT_DIST: _ClassVar[KVStreamTransport]

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PREFILL: _ClassVar[WorkerRole]
    WORKER_ROLE_DECODE: _ClassVar[WorkerRole]
    WORKER_ROLE_MIXED: _ClassVar[WorkerRole]

class PushKVPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_KV_PHASE_UNSPECIFIED: _ClassVar[PushKVPhase]
    PUSH_KV_PHASE_ACCEPTED: _ClassVar[PushKVPhase]
    PUSH_KV_PHASE_DONE: _ClassVar[PushKVPhase]

MIGRATION_RESULT_UNSPECIFIED: MigrationResult
MIGRATION_RESULT_MIGRATED: MigrationResult
MIGRATION_RESULT_ABORTED_DEST_FULL: MigrationResult
MIGRATION_RESULT_ABORTED_SOURCE_FINISHED: MigrationResult
MIGRATION_RESULT_ABORTED_CANCELLED: MigrationResult
MIGRATION_RESULT_ABORTED_PEER_DIED: MigrationResult
MIGRATION_RESULT_ABORTED_SOURCE_PREEMPTED: MigrationResult
MIGRATION_RESULT_ABORTED_REFUSED: MigrationResult
MIGRATION_TRANSPORT_UNSPECIFIED: MigrationTransport
MIGRATION_TRANSPORT_GRPC: MigrationTransport
MIGRATION_TRANSPORT_STORE: MigrationTransport
MIGRATION_TRANSPORT_DIST: MigrationTransport
KV_STREAM_TRANSPORT_UNSPECIFIED: KVStreamTransport
KV_STREAM_TRANSPORT_GRPC: KVStreamTransport
KV_STREAM_TRANSPORT_STORE: KVStreamTransport
KV_STREAM_TRANSPORT_DIST: KVStreamTransport
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PREFILL: WorkerRole
WORKER_ROLE_DECODE: WorkerRole
WORKER_ROLE_MIXED: WorkerRole
PUSH_KV_PHASE_UNSPECIFIED: PushKVPhase
PUSH_KV_PHASE_ACCEPTED: PushKVPhase
PUSH_KV_PHASE_DONE: PushKVPhase

class MigrateOutRequest(_message.Message):
    __slots__ = ("request_id", "dest_address", "max_stages", "stop_blocks", "timeout_s", "transport")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DEST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MAX_STAGES_FIELD_NUMBER: _ClassVar[int]
    STOP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    dest_address: str
    max_stages: int
    stop_blocks: int
    timeout_s: float
    transport: MigrationTransport
    def __init__(
        self,
        request_id: str | None = ...,
        dest_address: str | None = ...,
        max_stages: int | None = ...,
        stop_blocks: int | None = ...,
        timeout_s: float | None = ...,
        transport: MigrationTransport | str | None = ...,
    ) -> None: ...

class MigrateOutResponse(_message.Message):
    __slots__ = (
        "result",
        "resume_token_index",
        "num_stages",
        "blocks_copied",
        "bytes_copied",
        "downtime_s",
        "total_s",
        "message",
    )
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    result: MigrationResult
    resume_token_index: int
    num_stages: int
    blocks_copied: int
    bytes_copied: int
    downtime_s: float
    total_s: float
    message: str
    def __init__(
        self,
        result: MigrationResult | str | None = ...,
        resume_token_index: int | None = ...,
        num_stages: int | None = ...,
        blocks_copied: int | None = ...,
        bytes_copied: int | None = ...,
        downtime_s: float | None = ...,
        total_s: float | None = ...,
        message: str | None = ...,
    ) -> None: ...

class MigrationBegin(_message.Message):
    __slots__ = (
        "request_id",
        "layout",
        "prompt_token_ids",
        "sampling",
        "seed",
        "priority",
        "adapter",
        "cache_salt",
        "source_worker",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_WORKER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: _common_pb2.KVLayout
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    seed: int
    priority: int
    adapter: str
    cache_salt: str
    source_worker: str
    def __init__(
        self,
        request_id: str | None = ...,
        layout: _common_pb2.KVLayout | _Mapping | None = ...,
        prompt_token_ids: _Iterable[int] | None = ...,
        sampling: _common_pb2.SamplingParams | _Mapping | None = ...,
        seed: int | None = ...,
        priority: int | None = ...,
        adapter: str | None = ...,
        cache_salt: str | None = ...,
        source_worker: str | None = ...,
    ) -> None: ...

class MigrationBlocks(_message.Message):
    __slots__ = ("first_block", "num_blocks", "data", "end_of_stage", "kv")
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OF_STAGE_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    first_block: int
    num_blocks: int
    data: bytes
    end_of_stage: bool
    kv: _common_pb2.KVHandle
    def __init__(
        self,
        first_block: int | None = ...,
        num_blocks: int | None = ...,
        data: bytes | None = ...,
        end_of_stage: bool | None = ...,
        kv: _common_pb2.KVHandle | _Mapping | None = ...,
    ) -> None: ...

class MigrationFinal(_message.Message):
    __slots__ = ("num_computed_tokens", "output_token_ids", "detok_text", "detok_emitted", "logprobs")
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DETOK_TEXT_FIELD_NUMBER: _ClassVar[int]
    DETOK_EMITTED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    num_computed_tokens: int
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    detok_text: str
    detok_emitted: int
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    def __init__(
        self,
        num_computed_tokens: int | None = ...,
        output_token_ids: _Iterable[int] | None = ...,
        detok_text: str | None = ...,
        detok_emitted: int | None = ...,
        logprobs: _Iterable[_common_pb2.TokenLogprob | _Mapping] | None = ...,
    ) -> None: ...

class MigrationChunk(_message.Message):
    __slots__ = ("begin", "blocks", "final")
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    begin: MigrationBegin
    blocks: MigrationBlocks
    final: MigrationFinal
    def __init__(
        self,
        begin: MigrationBegin | _Mapping | None = ...,
        blocks: MigrationBlocks | _Mapping | None = ...,
        final: MigrationFinal | _Mapping | None = ...,
    ) -> None: ...

class MigrationAck(_message.Message):
    __slots__ = ("blocks_held", "running")
    BLOCKS_HELD_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    blocks_held: int
    running: bool
    def __init__(self, blocks_held: int | None = ..., running: bool | None = ...) -> None: ...

class ResumeStreamRequest(_message.Message):
    __slots__ = ("request_id", "start_index", "direct", "direct_text_chars", "direct_stop")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    DIRECT_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_STOP_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start_index: int
    direct: _direct_pb2.DirectGrant
    direct_text_chars: int
    direct_stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(
        self,
        request_id: str | None = ...,
        start_index: int | None = ...,
        direct: _direct_pb2.DirectGrant | _Mapping | None = ...,
        direct_text_chars: int | None = ...,
        direct_stop: _Iterable[str] | None = ...,
    ) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = (
        "request_id",
        "model",
        "prompt_token_ids",
        "sampling",
        "adapter",
        "cache_salt",
        "tenant",
        "priority",
        "slo",
        "lease_ttl_s",
        "kv_stream",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    KV_STREAM_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    adapter: str
    cache_salt: str
    tenant: str
    priority: int
    slo: _common_pb2.SLO
    lease_ttl_s: float
    kv_stream: KVStreamTransport
    def __init__(
        self,
        request_id: str | None = ...,
        model: str | None = ...,
        prompt_token_ids: _Iterable[int] | None = ...,
        sampling: _common_pb2.SamplingParams | _Mapping | None = ...,
        adapter: str | None = ...,
        cache_salt: str | None = ...,
        tenant: str | None = ...,
        priority: int | None = ...,
        slo: _common_pb2.SLO | _Mapping | None = ...,
        lease_ttl_s: float | None = ...,
        kv_stream: KVStreamTransport | str | None = ...,
    ) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = (
        "request_id",
        "first_token",
        "first_token_logprob",
        "kv",
        "num_cached_tokens",
        "num_computed_tokens",
        "timing",
        "prompt_tail_pending",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TAIL_PENDING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token: int
    first_token_logprob: _common_pb2.TokenLogprob
    kv: _common_pb2.KVHandle
    num_cached_tokens: int
    num_computed_tokens: int
    timing: _common_pb2.Timing
    prompt_tail_pending: bool
    def __init__(
        self,
        request_id: str | None = ...,
        first_token: int | None = ...,
        first_token_logprob: _common_pb2.TokenLogprob | _Mapping | None = ...,
        kv: _common_pb2.KVHandle | _Mapping | None = ...,
        num_cached_tokens: int | None = ...,
        num_computed_tokens: int | None = ...,
        timing: _common_pb2.Timing | _Mapping | None = ...,
        prompt_tail_pending: bool | None = ...,
    ) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = (
        "request_id",
        "model",
        "prompt_token_ids",
        "sampling",
        "adapter",
        "cache_salt",
        "tenant",
        "priority",
        "slo",
        "kv",
        "first_token",
        "first_token_logprob",
        "resume_token_ids",
        "local_prefill",
        "prompt_tail_pending",
        "direct",
        "kv_stream_address",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TAIL_PENDING_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    KV_STREAM_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    adapter: str
    cache_salt: str
    tenant: str
    priority: int
    slo: _common_pb2.SLO
    kv: _common_pb2.KVHandle
    first_token: int
    first_token_logprob: _common_pb2.TokenLogprob
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    local_prefill: bool
    prompt_tail_pending: bool
    direct: _direct_pb2.DirectGrant
    kv_stream_address: str
    def __init__(
        self,
        request_id: str | None = ...,
        model: str | None = ...,
        prompt_token_ids: _Iterable[int] | None = ...,
        sampling: _common_pb2.SamplingParams | _Mapping | None = ...,
        adapter: str | None = ...,
        cache_salt: str | None = ...,
        tenant: str | None = ...,
        priority: int | None = ...,
        slo: _common_pb2.SLO | _Mapping | None = ...,
        kv: _common_pb2.KVHandle | _Mapping | None = ...,
        first_token: int | None = ...,
        first_token_logprob: _common_pb2.TokenLogprob | _Mapping | None = ...,
        resume_token_ids: _Iterable[int] | None = ...,
        local_prefill: bool | None = ...,
        prompt_tail_pending: bool | None = ...,
        direct: _direct_pb2.DirectGrant | _Mapping | None = ...,
        kv_stream_address: str | None = ...,
    ) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = (
        "request_id",
        "token_ids",
        "logprobs",
        "finish",
        "num_cached_tokens",
        "kv_pull_s",
        "text",
        "has_text",
        "choice_index",
        "token_offsets_s",
        "direct_address",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_PULL_S_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    HAS_TEXT_FIELD_NUMBER: _ClassVar[int]
    CHOICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSETS_S_FIELD_NUMBER: _ClassVar[int]
    DIRECT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    finish: _common_pb2.Finish
    num_cached_tokens: int
    kv_pull_s: float
    text: str
    has_text: bool
    choice_index: int
    token_offsets_s: _containers.RepeatedScalarFieldContainer[float]
    direct_address: str
    def __init__(
        self,
        request_id: str | None = ...,
        token_ids: _Iterable[int] | None = ...,
        logprobs: _Iterable[_common_pb2.TokenLogprob | _Mapping] | None = ...,
        finish: _common_pb2.Finish | _Mapping | None = ...,
        num_cached_tokens: int | None = ...,
        kv_pull_s: float | None = ...,
        text: str | None = ...,
        has_text: bool | None = ...,
        choice_index: int | None = ...,
        token_offsets_s: _Iterable[float] | None = ...,
        direct_address: str | None = ...,
    ) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: str | None = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: bool | None = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = (
        "worker_id",
        "role",
        "model",
        "num_waiting",
        "num_running",
        "num_preempted",
        "kv_blocks_total",
        "kv_blocks_used",
        "kv_blocks_cached",
        "token_budget",
        "prefill_tokens_computed_total",
        "prefill_tokens_reused_total",
        "decode_tokens_total",
        "requests_finished_total",
        "prefix_cache_hit_rate",
        "kv_layout",
        "store",
        "spec_draft_tokens_total",
        "spec_accepted_tokens_total",
        "adapters_in_slot",
        "adapters_in_host",
        "adapter_slot_load_s",
        "adapter_disk_load_s",
        "adapter_slots",
        "adapter_slots_pinned",
        "adapter_slot_waiters",
        "adapter_slot_free_s",
        "adapter_reads_queued",
        "max_model_len",
        "sliding_window",
    )
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_COMPUTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_REUSED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_IN_SLOT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_IN_HOST_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOT_LOAD_S_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_DISK_LOAD_S_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_PINNED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOT_WAITERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOT_FREE_S_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_READS_QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: WorkerRole
    model: str
    num_waiting: int
    num_running: int
    num_preempted: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    token_budget: int
    prefill_tokens_computed_total: int
    prefill_tokens_reused_total: int
    decode_tokens_total: int
    requests_finished_total: int
    prefix_cache_hit_rate: float
    kv_layout: _common_pb2.KVLayout
    store: _common_pb2.BlockLocation
    spec_draft_tokens_total: int
    spec_accepted_tokens_total: int
    adapters_in_slot: _containers.RepeatedScalarFieldContainer[str]
    adapters_in_host: _containers.RepeatedScalarFieldContainer[str]
    adapter_slot_load_s: float
    adapter_disk_load_s: float
    adapter_slots: int
    adapter_slots_pinned: int
    adapter_slot_waiters: int
    adapter_slot_free_s: float
    adapter_reads_queued: int
    max_model_len: int
    sliding_window: int
    def __init__(
        self,
        worker_id: str | None = ...,
        role: WorkerRole | str | None = ...,
        model: str | None = ...,
        num_waiting: int | None = ...,
        num_running: int | None = ...,
        num_preempted: int | None = ...,
        kv_blocks_total: int | None = ...,
        kv_blocks_used: int | None = ...,
        kv_blocks_cached: int | None = ...,
        token_budget: int | None = ...,
        prefill_tokens_computed_total: int | None = ...,
        prefill_tokens_reused_total: int | None = ...,
        decode_tokens_total: int | None = ...,
        requests_finished_total: int | None = ...,
        prefix_cache_hit_rate: float | None = ...,
        kv_layout: _common_pb2.KVLayout | _Mapping | None = ...,
        store: _common_pb2.BlockLocation | _Mapping | None = ...,
        spec_draft_tokens_total: int | None = ...,
        spec_accepted_tokens_total: int | None = ...,
        adapters_in_slot: _Iterable[str] | None = ...,
        adapters_in_host: _Iterable[str] | None = ...,
        adapter_slot_load_s: float | None = ...,
        adapter_disk_load_s: float | None = ...,
        adapter_slots: int | None = ...,
        adapter_slots_pinned: int | None = ...,
        adapter_slot_waiters: int | None = ...,
        adapter_slot_free_s: float | None = ...,
        adapter_reads_queued: int | None = ...,
        max_model_len: int | None = ...,
        sliding_window: int | None = ...,
    ) -> None: ...

class SpillKVRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: str | None = ...) -> None: ...

class SpillKVResponse(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: _common_pb2.KVHandle
    def __init__(self, handle: _common_pb2.KVHandle | _Mapping | None = ...) -> None: ...

class PushKVRequest(_message.Message):
    __slots__ = ("request_id", "dst_rank")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DST_RANK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    dst_rank: int
    def __init__(self, request_id: str | None = ..., dst_rank: int | None = ...) -> None: ...

class PushKVResponse(_message.Message):
    __slots__ = ("phase", "request_id", "src_rank", "num_blocks", "nbytes")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    phase: PushKVPhase
    request_id: str
    src_rank: int
    num_blocks: int
    nbytes: int
    def __init__(
        self,
        phase: PushKVPhase | str | None = ...,
        request_id: str | None = ...,
        src_rank: int | None = ...,
        num_blocks: int | None = ...,
        nbytes: int | None = ...,
    ) -> None: ...
