from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

from pdserve.v1 import common_pb2 as _common_pb2
from pdserve.v1 import direct_pb2 as _direct_pb2

DESCRIPTOR: _descriptor.FileDescriptor

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: str | None = ..., content: str | None = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Iterable[ChatMessage | _Mapping] | None = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Iterable[int] | None = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = (
        "model",
        "prompt",
        "prompt_token_ids",
        "chat",
        "sampling",
        "request_id",
        "priority",
        "slo",
        "tenant",
        "cache_salt",
        "adapter",
        "predicted_output_tokens",
        "direct_stream",
    )
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DIRECT_STREAM_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    prompt_token_ids: TokenIds
    chat: ChatMessages
    sampling: _common_pb2.SamplingParams
    request_id: str
    priority: int
    slo: _common_pb2.SLO
    tenant: str
    cache_salt: str
    adapter: str
    predicted_output_tokens: int
    direct_stream: bool
    def __init__(
        self,
        model: str | None = ...,
        prompt: str | None = ...,
        prompt_token_ids: TokenIds | _Mapping | None = ...,
        chat: ChatMessages | _Mapping | None = ...,
        sampling: _common_pb2.SamplingParams | _Mapping | None = ...,
        request_id: str | None = ...,
        priority: int | None = ...,
        slo: _common_pb2.SLO | _Mapping | None = ...,
        tenant: str | None = ...,
        cache_salt: str | None = ...,
        adapter: str | None = ...,
        predicted_output_tokens: int | None = ...,
        direct_stream: bool | None = ...,
    ) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "logprobs", "finish", "choice_index", "direct")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    CHOICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DIRECT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprob]
    finish: _common_pb2.Finish
    choice_index: int
    direct: _direct_pb2.DirectRedirect
    def __init__(
        self,
        request_id: str | None = ...,
        token_ids: _Iterable[int] | None = ...,
        text: str | None = ...,
        logprobs: _Iterable[_common_pb2.TokenLogprob | _Mapping] | None = ...,
        finish: _common_pb2.Finish | _Mapping | None = ...,
        choice_index: int | None = ...,
        direct: _direct_pb2.DirectRedirect | _Mapping | None = ...,
    ) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("model", "prompt", "chat", "add_special_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    chat: ChatMessages
    add_special_tokens: bool
    def __init__(
        self,
        model: str | None = ...,
        prompt: str | None = ...,
        chat: ChatMessages | _Mapping | None = ...,
        add_special_tokens: bool | None = ...,
    ) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "max_model_len")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_model_len: int
    def __init__(self, token_ids: _Iterable[int] | None = ..., max_model_len: int | None = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "max_model_len", "kv_layout", "adapters")
    ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    KV_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    max_model_len: int
    kv_layout: _common_pb2.KVLayout
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(
        self,
        id: str | None = ...,
        max_model_len: int | None = ...,
        kv_layout: _common_pb2.KVLayout | _Mapping | None = ...,
        adapters: _Iterable[str] | None = ...,
    ) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Iterable[ModelInfo | _Mapping] | None = ...) -> None: ...
