"""Property-based fuzzing of the edge's input handling (hypothesis; bounded: a few hundred
examples each, no deadline flakiness, no example database written).

Properties: whatever the JSON body, the OpenAI parsers (``parse_completion`` / ``parse_chat``)
after the server's string check (``check_json_strings``) either refuse it with a documented
400 error (InvalidRequestError and subclasses) or produce a call that the SDK turns into a
GenerateRequest without raising (so no 500 later); whatever the GenerateRequest (built or decoded
from arbitrary bytes), the edge checks refuse it only with INVALID_ARGUMENT and never leave a
quota slot or a request id claimed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.auth.edge import EdgeAuth
from pdserve.auth.tenants import TenantPolicy
from pdserve.auth.validate import check_json_strings, validate_generate_request
from pdserve.client import build_request
from pdserve.errors import InvalidRequestError
from pdserve.openai_api.errors import error_response
from pdserve.openai_api.translate import parse_chat, parse_completion
from pdserve.v1 import client_pb2, common_pb2

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# text including lone surrogates (what json.loads yields for "\ud800") and control characters
SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.one_of(
    st.text(max_size=20),
    st.lists(st.one_of(st.text(max_size=5), SURROGATES), max_size=4).map("".join),
    st.sampled_from(["", " ", "user", "system", "assistant", "tool", "developer", "text", "m"]),
)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
KEYS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "seed", "stop", "stream", "stream_options", "n", "best_of", "logprobs",
    "top_logprobs", "user", "priority", "ttft_slo_s", "tpot_slo_s", "logit_bias", "echo", "suffix",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
    "stop_token_ids", "response_format", "tools", "functions",
]  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(
            st.sampled_from(["system", "user", "assistant", "tool", "developer", "wizard"]), JSON
        ),
        "content": st.one_of(
            TEXT,
            st.none(),
            st.lists(
                st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), JSON), max_size=3
            ),
            JSON,
        ),
    },
)
BODY = st.dictionaries(
    st.one_of(st.sampled_from(KEYS), TEXT),
    st.one_of(JSON, st.lists(MESSAGE, max_size=4), st.lists(st.integers(-5, 2**64), max_size=5)),
    max_size=8,
)
# near-valid bodies (most are accepted), so the accept path is fuzzed as much as the refusals
NEAR_VALID = {
    "max_tokens": st.integers(-1, 2**33),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(0, 1.5),
    "top_k": st.integers(-2, 100),
    "seed": st.integers(-1, 2**65),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)),
    "user": TEXT,
    "model": TEXT,
    "stream": st.booleans(),
    "priority": st.integers(-(2**32), 2**32),
    "ttft_slo_s": st.floats(-1, 10),
}
VALID_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]), "content": TEXT}
)
CHAT_BODY = st.one_of(
    st.builds(lambda b, m: {**b, "messages": m}, BODY, st.one_of(st.lists(MESSAGE, max_size=4), JSON)),
    st.fixed_dictionaries({"messages": st.lists(VALID_MESSAGE, min_size=1, max_size=3)}, optional=NEAR_VALID),
)
COMPLETION_BODY = st.one_of(
    st.builds(lambda b, p: {**b, "prompt": p}, BODY, st.one_of(TEXT, JSON)),
    st.fixed_dictionaries(
        {"prompt": st.one_of(TEXT, st.lists(st.integers(-1, 2**64), min_size=1, max_size=5))},
        optional={**NEAR_VALID, "logprobs": st.integers(-1, 30)},
    ),
)


def _no_500(body: Any, parse: Any) -> None:
    try:
        check_json_strings(body)
        call = parse(body)
    except InvalidRequestError as e:  # FieldError is one: HTTP 400
        assert error_response(e).status == 400
        return
    # accepted: it must make a well-formed GenerateRequest (the SDK's) and pass or fail the edge
    # checks with a 400 only
    req = build_request(call.sdk_prompt(), call.params, **call.sdk_kwargs("m", ""))
    req.SerializeToString()
    try:
        validate_generate_request(req, TenantPolicy())
    except InvalidRequestError as e:
        assert error_response(e).status == 400
    assert call.params.max_tokens >= 1
    assert all(math.isfinite(x) for x in (call.params.temperature, call.params.top_p))


@FUZZ
@given(CHAT_BODY)
def test_fuzz_parse_chat(body: dict[str, Any]) -> None:
    _no_500(body, parse_chat)


@FUZZ
@given(COMPLETION_BODY)
def test_fuzz_parse_completion(body: dict[str, Any]) -> None:
    _no_500(body, parse_completion)


@FUZZ
@given(JSON)
def test_fuzz_any_json_document(doc: Any) -> None:
    for parse in (parse_chat, parse_completion):
        try:
            check_json_strings(doc)
            parse(doc)
        except InvalidRequestError:
            pass


PB_TEXT = st.text(max_size=40)  # protobuf strings are valid UTF-8 by construction
GEN_REQUEST = st.builds(
    lambda which, text, ids, msgs, rid, tenant, salt, model, adapter, stops: _gen(
        which, text, ids, msgs, rid, tenant, salt, model, adapter, stops
    ),
    st.sampled_from(["prompt", "ids", "chat", "none"]),
    st.one_of(PB_TEXT, st.text(min_size=200, max_size=400)),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8),
    st.lists(
        st.tuples(st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), PB_TEXT), PB_TEXT),
        max_size=4,
    ),
    st.one_of(PB_TEXT, st.text(min_size=120, max_size=300)),
    PB_TEXT,
    PB_TEXT,
    PB_TEXT,
    PB_TEXT,
    st.lists(PB_TEXT, max_size=3),
)


def _gen(which, text, ids, msgs, rid, tenant, salt, model, adapter, stops) -> client_pb2.GenerateRequest:  # noqa: ANN001
    req = client_pb2.GenerateRequest(
        request_id=rid,
        tenant=tenant,
        cache_salt=salt,
        model=model,
        adapter=adapter,
        sampling=common_pb2.SamplingParams(stop=stops),
    )
    if which == "prompt":
        req.prompt = text
    elif which == "ids":
        req.prompt_token_ids.ids.extend(ids)
    elif which == "chat":
        req.chat.messages.extend(client_pb2.ChatMessage(role=r, content=c) for r, c in msgs)
    return req


_EDGE = EdgeAuth(None)
_POLICY = TenantPolicy(max_prompt_bytes=256)


@FUZZ
@given(GEN_REQUEST)
def test_fuzz_generate_request_validation(req: client_pb2.GenerateRequest) -> None:
    with contextlib.suppress(InvalidRequestError):
        validate_generate_request(req, _POLICY)
    try:
        with _EDGE.admit_generate(req, None):
            pass
    except InvalidRequestError:
        pass
    assert len(_EDGE.ids) == 0 and _EDGE.gate.inflight(req.tenant) == 0


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_generate_request_bytes(data: bytes) -> None:
    try:
        req = client_pb2.GenerateRequest.FromString(data)
    except Exception:  # noqa: BLE001 - pdserve.status answers an undecodable request INVALID_ARGUMENT
        return
    with contextlib.suppress(InvalidRequestError):
        validate_generate_request(req, _POLICY)
