"""OpenAI front end, pure parts: request validation/translation, response building, SSE format and
the exception -> HTTP error mapping, on hand-built inputs (no server, no cluster)."""

from __future__ import annotations

import dataclasses
import json
from http import HTTPStatus

import pytest

from pdserve.client import Chunk, Finish, TokenLogprob, TopLogprob, build_request
from pdserve.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InvalidRequestError,
    LayoutMismatchError,
    ModelNotFoundError,
    PdserveError,
    RequestNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from pdserve.openai_api.errors import (
    ERROR_TABLE,
    ErrorCodeStr,
    FieldError,
    HttpError,
    UnknownModelError,
    error_response,
    retry_after_header,
)
from pdserve.openai_api.translate import (
    SSE_DONE,
    ApiKind,
    ChatMessage,
    ChatRole,
    Defaults,
    ResponseMeta,
    StreamTranslator,
    build_response,
    models_response,
    parse_chat,
    parse_completion,
    resolve_model,
    sse_event,
)

# ------------------------------------------------------------------------------ requests


def test_completion_basic_translation():
    call = parse_completion(
        {
            "model": "m",
            "prompt": "Hello",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.9,
            "seed": 3,
            "stop": "\n",
            "user": "alice",
            "logprobs": 2,
        }
    )
    assert call.kind is ApiKind.COMPLETION and call.model == "m" and call.sdk_prompt() == "Hello"
    p = call.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.logprobs) == (7, 0.0, 0.9, 3, ("\n",), 2)
    assert call.logprobs and not call.stream and not call.include_usage
    kw = call.sdk_kwargs("m", "rid1")
    assert kw == {
        "model": "m",
        "request_id": "rid1",
        "priority": 0,
        "tenant": "alice",
        "ttft_s": 0.0,
        "tpot_s": 0.0,
    }
    req = build_request(call.sdk_prompt(), call.params, **kw)  # the SDK accepts what we produce
    assert req.prompt == "Hello" and req.tenant == "alice" and req.sampling.max_tokens == 7


def test_completion_defaults_and_prompt_forms():
    call = parse_completion({"prompt": "x"})
    assert call.params.max_tokens == 16 and call.params.temperature == 1.0 and call.model is None
    assert call.params.logprobs is None and not call.logprobs
    assert parse_completion({"prompt": [1, 2, 3]}).sdk_prompt() == [1, 2, 3]
    assert parse_completion({"prompt": ["one"]}).sdk_prompt() == "one"
    assert parse_completion({"prompt": [[4, 5]]}).sdk_prompt() == [4, 5]
    assert parse_completion({"prompt": "x"}, Defaults(completion_max_tokens=3)).params.max_tokens == 3
    req = build_request(parse_completion({"prompt": [4, 5]}).sdk_prompt())
    assert list(req.prompt_token_ids.ids) == [4, 5]
    assert parse_completion({"prompt": "x", "stop": ["a", "bc"]}).params.stop == ("a", "bc")
    assert parse_completion({"prompt": "x", "max_tokens": None}).params.max_tokens == 16  # null = absent


def test_extensions_map_to_request_fields():
    call = parse_completion(
        {
            "prompt": "x",
            "ttft_slo_s": 0.5,
            "tpot_slo_s": 0.05,
            "priority": -2,
            "top_k": 5,
            "ignore_eos": True,
            "stop_token_ids": [2],
            "repetition_penalty": 1.1,
        }
    )
    kw = call.sdk_kwargs("m", "r")
    assert (kw["ttft_s"], kw["tpot_s"], kw["priority"]) == (0.5, 0.05, -2)
    assert call.params.top_k == 5 and call.params.ignore_eos and call.params.stop_token_ids == (2,)
    req = build_request(call.sdk_prompt(), call.params, **kw)
    assert req.slo.ttft_s == pytest.approx(0.5) and req.slo.tpot_s == pytest.approx(0.05)
    assert req.priority == -2


def test_stream_options():
    call = parse_completion({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert call.stream and call.include_usage
    with pytest.raises(FieldError) as ei:
        parse_completion({"prompt": "x", "stream_options": {"include_usage": True}})
    assert ei.value.param == "stream_options"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [[1], [2]]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 2, "temperature": 0}, "n"),
        ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": 3}, "stop"),
        ({"prompt": "x", "logprobs": 99}, "logprobs"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "suffix": "s"}, "suffix"),
        ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "ttft_slo_s": -1}, "ttft_slo_s"),
        ({"prompt": "x", "priority": "high"}, "priority"),
        ({"prompt": "x", "user": 5}, "user"),
        ({"prompt": "x", "model": 5}, "model"),
    ],
)
def test_completion_bad_fields_name_the_param(body, param):
    with pytest.raises(FieldError) as ei:
        parse_completion(body)
    assert ei.value.param == param
    err = error_response(ei.value)
    assert err.status is HTTPStatus.BAD_REQUEST and err.body["error"]["param"] == param


def test_neutral_unsupported_values_are_accepted():
    call = parse_completion(
        {
            "prompt": "x",
            "n": 1,
            "best_of": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "echo": False,
            "logit_bias": {},
        }
    )
    assert call.params.max_tokens == 16


def test_chat_translation():
    call = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, "there"]},
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 9,
            "logprobs": True,
            "top_logprobs": 2,
        }
    )
    assert call.kind is ApiKind.CHAT
    assert call.prompt[0] == ChatMessage(ChatRole.DEVELOPER, "Be brief.")
    assert call.sdk_prompt() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": ""},
    ]
    assert call.params.max_tokens == 9 and call.params.logprobs == 2 and call.logprobs
    req = build_request(call.sdk_prompt(), call.params)
    assert req.WhichOneof("input") == "chat" and req.chat.messages[1].content == "Hi\nthere"
    d = parse_chat({"messages": [{"role": "user", "content": "x"}]})
    assert d.params.max_tokens == Defaults().chat_max_tokens and d.params.logprobs is None
    assert parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True}).params.logprobs == 0
    user = [{"role": "user", "content": "x"}]
    assert parse_chat({"messages": user, "max_tokens": 4}).params.max_tokens == 4


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2, "temperature": 0}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "best_of": 2}, "best_of"),
        (
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4},
            "max_completion_tokens",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_chat_bad_fields(body, param):
    with pytest.raises(FieldError) as ei:
        parse_chat(body)
    assert ei.value.param == param


def test_body_must_be_an_object():
    with pytest.raises(FieldError):
        parse_chat([1, 2])  # type: ignore[arg-type]


def test_resolve_model():
    assert resolve_model(None, ["a"]) == "a"  # no model named: the only served one
    with pytest.raises(FieldError, match=r"'model' is required: this server serves several models \(a, b\)"):
        resolve_model(None, ["a", "b"])  # several base models: never a default one (#16 part 3)
    assert resolve_model("b", ["a", "b"]) == "b"
    with pytest.raises(UnknownModelError) as ei:
        resolve_model("gpt-4", ["a"])
    err = error_response(ei.value)
    assert err.status is HTTPStatus.NOT_FOUND
    assert err.body["error"]["code"] == "model_not_found" and err.body["error"]["param"] == "model"
    with pytest.raises(InternalError):
        resolve_model(None, [])


# ------------------------------------------------------------------------------ responses


def _finish(reason="length", completion_tokens=3) -> Finish:
    return Finish(
        reason=reason,
        stop="",
        prompt_tokens=5,
        completion_tokens=completion_tokens,
        cached_prompt_tokens=2,
        ttft_s=0.1,
        e2e_s=0.4,
        token_times_s=[0.1, 0.2, 0.3],
        phases={"queue": 0.01, "prefill": 0.05, "transfer": 0.02, "decode": 0.3},
        kv_pull_s=0.01,
    )


def _lp(token_id: int, logprob: float, raw: bytes, top: tuple[TopLogprob, ...] = ()) -> TokenLogprob:
    """A logprob as the SDK delivers it: the router names each token (text and exact bytes)."""
    return TokenLogprob(token_id, logprob, raw.decode("utf-8", errors="replace"), raw, top)


_TOP = (TopLogprob(10, -0.5, "Hel", b"Hel"), TopLogprob(20, -1.5, "Help", b"Help"))


def _chunks(reason="length") -> list[Chunk]:
    return [
        Chunk("r1", [10], "Hel", [_lp(10, -0.5, b"Hel", _TOP)]),
        # the first two bytes of U+2014: no text of its own yet (held back)
        Chunk("r1", [11], "", [_lp(11, -1.0, b"\xe2\x80")]),
        Chunk("r1", [12, 13], "\u2014!", [_lp(12, -0.25, b"\x94"), _lp(13, -0.125, b"!")], _finish(reason)),
    ]


def _eos_chunks() -> list[Chunk]:
    """Ends with the end-of-sequence token (id 2), which has no text: the router sends it in the
    last message, with finish.stop naming it."""
    fin = dataclasses.replace(_finish("stop", completion_tokens=5), stop="2")
    return [
        *_chunks()[:2],
        Chunk("r1", [12, 13], "\u2014!", [_lp(12, -0.25, b"\x94"), _lp(13, -0.125, b"!")]),
        Chunk("r1", [2], "", [_lp(2, -0.01, b"<|im_end|>")], fin),
    ]


def test_build_completion_response():
    meta = ResponseMeta(ApiKind.COMPLETION, "cmpl-x", 1700, "m", logprobs=True)
    r = build_response(meta, _chunks())
    assert (r["id"], r["object"], r["created"], r["model"]) == ("cmpl-x", "text_completion", 1700, "m")
    (c,) = r["choices"]
    assert c["index"] == 0 and c["text"] == "Hel\u2014!" and c["finish_reason"] == "length"
    assert c["logprobs"] == {
        "tokens": ["Hel", "\ufffd", "\ufffd", "!"],
        "token_logprobs": [-0.5, -1.0, -0.25, -0.125],
        "top_logprobs": [{"Hel": -0.5, "Help": -1.5}, {}, {}, {}],
        "text_offset": [0, 3, 3, 4],  # "!" starts after "Hel" + U+2014
    }
    assert c["text"][c["logprobs"]["text_offset"][3]] == "!"
    assert r["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    px = r["pdserve"]
    assert px["request_id"] == "r1" and px["ttft_s"] == 0.1 and px["cached_prompt_tokens"] == 2
    assert set(px["phases"]) == {"queue", "prefill", "transfer", "decode"}
    json.dumps(r)  # serialisable


def test_build_chat_response():
    meta = ResponseMeta(ApiKind.CHAT, "chatcmpl-x", 1700, "m")
    r = build_response(meta, _chunks("stop"))
    assert r["object"] == "chat.completion"
    (c,) = r["choices"]
    assert c["message"] == {"role": "assistant", "content": "Hel\u2014!"}
    assert c["finish_reason"] == "stop" and c["logprobs"] is None
    with pytest.raises(InternalError):
        build_response(meta, _chunks()[:2])


def test_chat_logprobs_have_token_text_bytes_and_alternatives():
    meta = ResponseMeta(ApiKind.CHAT, "c", 1, "m", logprobs=True)
    lp = build_response(meta, _chunks())["choices"][0]["logprobs"]
    assert [e["token"] for e in lp["content"]] == ["Hel", "\ufffd", "\ufffd", "!"]
    assert lp["content"][0] == {
        "token": "Hel",
        "logprob": -0.5,
        "bytes": [72, 101, 108],
        "top_logprobs": [
            {"token": "Hel", "logprob": -0.5, "bytes": [72, 101, 108]},
            {"token": "Help", "logprob": -1.5, "bytes": [72, 101, 108, 112]},
        ],
    }
    # the bytes of the tokens spell the text exactly, even where a token splits a character
    raw = b"".join(bytes(e["bytes"]) for e in lp["content"])
    assert raw.decode() == "Hel\u2014!"


def test_eos_token_is_not_listed_and_makes_no_empty_chunk():
    meta = ResponseMeta(ApiKind.CHAT, "c", 1, "m", logprobs=True)
    r = build_response(meta, _eos_chunks())
    (c,) = r["choices"]
    assert c["message"]["content"] == "Hel\u2014!" and c["finish_reason"] == "stop"
    assert [e["token"] for e in c["logprobs"]["content"]] == ["Hel", "\ufffd", "\ufffd", "!"]
    assert r["usage"]["completion_tokens"] == 5  # the EOS token is still counted
    tr = StreamTranslator(meta)
    out = tr.start()
    for ch in _eos_chunks():
        out += tr.chunk(ch)
    out += tr.end()
    content = [o["choices"][0] for o in out[1:] if "content" in o["choices"][0]["delta"]]
    assert all(ch["delta"]["content"] for ch in content), "a chunk without text was sent"
    assert [ch["delta"]["content"] for ch in content] == ["Hel", "\u2014!"]
    last = out[-1]["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "stop" and last["logprobs"] is None
    streamed = [e["token"] for ch in content for e in ch["logprobs"]["content"]]
    assert streamed == ["Hel", "\ufffd", "\ufffd", "!"]  # each listed once, the EOS not at all


def test_stream_chat_chunks():
    tr = StreamTranslator(ResponseMeta(ApiKind.CHAT, "chatcmpl-x", 1700, "m", include_usage=True))
    out = tr.start()
    for c in _chunks("stop"):
        out += tr.chunk(c)
    assert tr.finished
    out += tr.end()
    assert all(o["object"] == "chat.completion.chunk" and o["id"] == "chatcmpl-x" for o in out)
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert out[0]["choices"][0]["finish_reason"] is None
    body = [o for o in out[1:] if o["choices"] and "content" in o["choices"][0]["delta"]]
    assert [o["choices"][0]["delta"]["content"] for o in body] == ["Hel", "\u2014!"]  # no empty chunk
    with_choices = [o for o in out if o["choices"]]
    last = with_choices[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["delta"] == {}
    assert last["pdserve"]["ttft_s"] == 0.1
    assert all(o["choices"][0]["finish_reason"] is None for o in with_choices[:-1])
    assert out[-1]["choices"] == [] and out[-1]["usage"]["total_tokens"] == 8
    assert all(o["usage"] is None for o in out[:-1])


def test_stream_completion_chunks_without_usage():
    tr = StreamTranslator(ResponseMeta(ApiKind.COMPLETION, "cmpl-x", 1700, "m", logprobs=True))
    assert tr.start() == []
    out = []
    for c in _chunks():
        out += tr.chunk(c)
    out += tr.end()
    assert all(o["object"] == "text_completion" and "usage" not in o for o in out)
    assert [o["choices"][0]["text"] for o in out] == ["Hel", "\u2014!", ""]  # the last: finish only
    assert out[-1]["choices"][0]["finish_reason"] == "length"
    # the token with no text of its own rides on the next chunk that has text
    assert out[1]["choices"][0]["logprobs"]["tokens"] == ["\ufffd", "\ufffd", "!"]
    assert out[1]["choices"][0]["logprobs"]["text_offset"] == [3, 3, 4]
    assert out[1]["choices"][0]["logprobs"]["top_logprobs"] == [{}, {}, {}]


def test_text_offsets_skip_text_the_response_leaves_out():
    """A special token generated with ignore_eos has bytes ("<|im_end|>") but no text in the
    response: the next token's offset still points at its own text."""
    meta = ResponseMeta(ApiKind.COMPLETION, "x", 1, "m", logprobs=True)
    chunks = [
        Chunk("r", [5], "A", [_lp(5, -0.1, b"A")]),
        Chunk("r", [2], "", [_lp(2, -0.2, b"<|im_end|>")]),
        Chunk("r", [6, 7], "BC", [_lp(6, -0.3, b"B"), _lp(7, -0.4, b"C")], _finish()),
    ]
    r = build_response(meta, chunks)
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == ["A", "<|im_end|>", "B", "C"] and lp["text_offset"] == [0, 1, 1, 2]
    assert [r["choices"][0]["text"][i] for i in (0, 1, 2)] == ["A", "B", "C"]


def test_minus_infinity_logprob_is_finite_json():
    meta = ResponseMeta(ApiKind.COMPLETION, "x", 1, "m", logprobs=True)
    top = (TopLogprob(5, float("-inf"), "a", b"a"),)
    chunks = [Chunk("r", [5], "a", [_lp(5, float("-inf"), b"a", top)], _finish())]
    lp = build_response(meta, chunks)["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-9999.0] and lp["top_logprobs"] == [{"a": -9999.0}]
    json.loads(json.dumps(lp, allow_nan=False))


def test_stream_without_finish_is_an_error():
    tr = StreamTranslator(ResponseMeta(ApiKind.CHAT, "c", 1, "m"))
    tr.chunk(Chunk("r", [1], "a"))
    with pytest.raises(InternalError):
        tr.end()


def test_sse_format():
    ev = sse_event({"a": 1, "b": "é"})
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n") and b"\n" not in ev[:-2]
    assert json.loads(ev[len(b"data: ") :]) == {"a": 1, "b": "é"}
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_models_response():
    r = models_response(["m1"], 5)
    m = {"id": "m1", "object": "model", "created": 5, "owned_by": "pdserve"}
    assert r == {"object": "list", "data": [m]}


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidRequestError("bad"), HTTPStatus.BAD_REQUEST),
        (FieldError("bad", "x"), HTTPStatus.BAD_REQUEST),
        (ModelNotFoundError("nope"), HTTPStatus.NOT_FOUND),
        (UnknownModelError("nope"), HTTPStatus.NOT_FOUND),
        (RequestNotFoundError("nope"), HTTPStatus.NOT_FOUND),
        (ResourceExhaustedError("busy", 2.2), HTTPStatus.TOO_MANY_REQUESTS),
        (UnavailableError("down"), HTTPStatus.SERVICE_UNAVAILABLE),
        (DeadlineExceededError("slow"), HTTPStatus.GATEWAY_TIMEOUT),
        (LayoutMismatchError("x"), HTTPStatus.INTERNAL_SERVER_ERROR),
        (CancelledError("x"), HTTPStatus.INTERNAL_SERVER_ERROR),
        (InternalError("x"), HTTPStatus.INTERNAL_SERVER_ERROR),
        (RuntimeError("boom"), HTTPStatus.INTERNAL_SERVER_ERROR),
    ],
)
def test_error_mapping(exc, status):
    err = error_response(exc)
    assert err.status is status
    assert set(err.body) == {"error"}
    assert set(err.body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(err.body["error"]["message"], str) and err.body["error"]["message"]
    json.dumps(err.body)


def test_every_pdserve_error_class_has_a_row():
    import pdserve.errors as pe

    classes = [c for c in vars(pe).values() if isinstance(c, type) and issubclass(c, PdserveError)]
    assert PdserveError in ERROR_TABLE
    for c in classes:
        assert error_response(c("x") if c is not ResourceExhaustedError else c("x", None)).status >= 400


def test_retry_after():
    err = error_response(ResourceExhaustedError("busy", 2.2))
    assert dict(err.headers) == {"Retry-After": "3"}
    assert err.body["error"]["type"] == "rate_limit_error"
    assert error_response(ResourceExhaustedError("busy")).headers == ()
    assert retry_after_header(0.01) == "1" and retry_after_header(None) is None
    assert retry_after_header(float("inf")) is None


def test_http_errors():
    err = error_response(
        HttpError(HTTPStatus.METHOD_NOT_ALLOWED, "use POST", ErrorCodeStr.METHOD_NOT_ALLOWED, allow=("POST",))
    )
    assert err.status is HTTPStatus.METHOD_NOT_ALLOWED and dict(err.headers) == {"Allow": "POST"}
    err = error_response(
        HttpError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "big", ErrorCodeStr.BODY_TOO_LARGE, close_connection=True
        )
    )
    assert err.status == 413 and err.close_connection and err.body["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------------------ CLI


def test_cli_subcommand_parses():
    from pdserve.cli import build_parser
    from pdserve.openai_api import cli as openai_cli

    argv = ["openai", "--router", "10.0.0.1:50051", "--host", "127.0.0.1", "--port", "0"]
    a = build_parser().parse_args(argv)
    assert a.func is openai_cli.run and (a.router, a.host, a.port) == ("10.0.0.1:50051", "127.0.0.1", 0)
    assert openai_cli.add_arguments  # python -m pdserve.openai_api uses the same arguments


@pytest.mark.parametrize(
    ("parse", "body", "param"),
    [
        # OpenAI fields of the other endpoint: accepted before, then dropped (silently wrong output)
        (parse_completion, {"prompt": "x", "max_completion_tokens": 4}, "max_completion_tokens"),
        (parse_completion, {"prompt": "x", "logprobs": 1, "top_logprobs": 3}, "top_logprobs"),
        (parse_chat, {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
        # fields pdserve does not implement, and typos
        (
            parse_chat,
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            "tool_choice",
        ),
        (parse_completion, {"prompt": "x", "skip_special_tokens": False}, "skip_special_tokens"),
        (parse_completion, {"prompt": "x", "include_stop_str_in_output": True}, "include_stop_str_in_output"),
        (parse_completion, {"prompt": "x", "max_token": 4}, "max_token"),
        (
            parse_completion,
            {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
        ),
    ],
)
def test_unknown_fields_are_refused_by_name(parse, body, param):
    """A body field the translation does not map is refused (400) naming it, never dropped."""
    with pytest.raises(FieldError) as ei:
        parse(body)
    assert ei.value.param == param and param.rsplit(".", 1)[-1] in ei.value.message


def test_unknown_field_with_null_value_counts_as_absent():
    """As every field here: an explicit JSON null is absent (clients that send every field)."""
    assert parse_completion({"prompt": "x", "suffix": None, "tool_choice": None}).params.max_tokens == 16


def test_message_keys_other_than_role_and_content_are_refused_by_name():
    """A chat message's `name` (or any key but role and content) is not rendered by the chat
    template: refused naming it, not dropped; null, "" and [] count as absent (a previous
    assistant message sent back with its null fields)."""
    with pytest.raises(FieldError) as ei:
        parse_chat(
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y", "name": "bob"}]}
        )
    assert ei.value.param == "messages[1].name" and "name" in ei.value.message
    with pytest.raises(FieldError) as ei:
        parse_chat({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]})
    assert ei.value.param == "messages[0].tool_calls"
    call = parse_chat(
        {"messages": [{"role": "assistant", "content": "x", "refusal": None, "tool_calls": [], "name": ""}]}
    )
    assert [m.content for m in call.prompt] == ["x"]
