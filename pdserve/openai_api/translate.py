"""Pure translation between OpenAI JSON and the pdserve client SDK (no sockets, no grpc).

Requests: :func:`parse_completion` / :func:`parse_chat` validate a decoded JSON body and return a
:class:`GenerateCall` (the SDK prompt, a validated :class:`SamplingParams`, the request's
tenant/priority/SLO and streaming options) or raise :class:`~pdserve.openai_api.errors.FieldError`
(HTTP 400) naming the offending field. :func:`resolve_target` checks the ``model`` field against
the router's models and their LoRA adapters (the field may name an adapter: the request then runs
on its base model with that adapter) and raises
:class:`~pdserve.openai_api.errors.UnknownModelError` (HTTP 404) for any other name.

Responses: :func:`build_response` turns the SDK chunks of a finished generation into a
``text_completion`` / ``chat.completion`` object; :class:`StreamTranslator` turns them one by one
into ``text_completion`` / ``chat.completion.chunk`` objects; :func:`sse_event` frames one as a
Server-Sent Event and :data:`SSE_DONE` ends the stream. :func:`models_response` builds /v1/models.

Chunks are the SDK's :class:`pdserve.client.Chunk` / :class:`pdserve.client.Finish`, imported for
type checking only, so this module never imports grpc.
"""

from __future__ import annotations

import codecs
import enum
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.sampling_params import SamplingParams
from pdserve.errors import InternalError, InvalidRequestError
from pdserve.openai_api.errors import FieldError, UnknownModelError

if TYPE_CHECKING:  # the SDK's types; at run time this module imports no grpc
    from pdserve.client import Chunk, Finish, TokenLogprob

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
MAX_STOP_SEQUENCES = 16
MIN_LOGPROB = -9999.0  # a -inf logprob is sent as this (JSON has no infinity), as vLLM does


# ---------------------------------------------------------------------------------------- enums


class ApiKind(enum.Enum):
    """Which OpenAI endpoint a call came through; fixes object names and id prefixes."""

    COMPLETION = "completion"
    CHAT = "chat"

    @property
    def object_name(self) -> str:
        return "text_completion" if self is ApiKind.COMPLETION else "chat.completion"

    @property
    def chunk_object_name(self) -> str:
        return "text_completion" if self is ApiKind.COMPLETION else "chat.completion.chunk"

    @property
    def id_prefix(self) -> str:
        return "cmpl-" if self is ApiKind.COMPLETION else "chatcmpl-"


class ChatRole(enum.Enum):
    """Message roles accepted in ``messages``; ``developer`` (OpenAI's newer name) maps to system."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"

    @property
    def template_role(self) -> str:
        """The role handed to the model's chat template."""
        return ChatRole.SYSTEM.value if self is ChatRole.DEVELOPER else self.value


class FinishReason(enum.Enum):
    """OpenAI ``finish_reason`` values; ``abort`` is pdserve's (the request was aborted server-side)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"

    @classmethod
    def from_sdk(cls, reason: str | None) -> FinishReason:
        """``Finish.reason`` of the SDK ("stop" | "length" | "abort" | None) -> this enum."""
        if reason is None:
            return cls.STOP
        try:
            return cls(reason)
        except ValueError:
            return cls.STOP


# ------------------------------------------------------------------------------ request side


@dataclass(frozen=True)
class ChatMessage:
    role: ChatRole
    content: str


@dataclass(frozen=True)
class Defaults:
    """Values used when the body leaves a field out.

    ``completion_max_tokens``: OpenAI's documented default for /v1/completions (16).
    ``chat_max_tokens``: /v1/chat/completions has no bound in OpenAI; a finite one is needed here.
    """

    completion_max_tokens: int = 16
    chat_max_tokens: int = 512


@dataclass(frozen=True)
class GenerateCall:
    """One validated request, ready for ``Client.generate(call.sdk_prompt(), call.params, **...)``.

    ``prompt``: text, token ids, or chat messages. ``model``: as requested (None: the router's
    default). ``logprobs``: whether the response carries logprobs. ``tenant`` comes from ``user``.
    ``priority`` (lower = more important), ``ttft_slo_s`` / ``tpot_slo_s`` (0 = none) are pdserve
    extensions mapped to the GenerateRequest fields of the same meaning.
    """

    kind: ApiKind
    prompt: str | tuple[int, ...] | tuple[ChatMessage, ...]
    params: SamplingParams
    model: str | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    tenant: str = ""
    priority: int = 0
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0

    def sdk_prompt(self) -> str | list[int] | list[dict[str, str]]:
        """The prompt in the form :func:`pdserve.client.build_request` takes."""
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and isinstance(self.prompt[0], ChatMessage):
            return [
                {"role": m.role.template_role, "content": m.content}
                for m in self.prompt  # type: ignore[union-attr]
            ]
        return [int(t) for t in self.prompt]  # type: ignore[arg-type]

    def sdk_kwargs(self, model: str, request_id: str, adapter: str = "") -> dict[str, Any]:
        """Keyword arguments of ``Client.generate`` besides prompt and params (``adapter``: the
        LoRA adapter the ``model`` field named, see :func:`resolve_target`)."""
        kw: dict[str, Any] = {"adapter": adapter} if adapter else {}
        return {
            **kw,
            "model": model,
            "request_id": request_id,
            "priority": self.priority,
            "tenant": self.tenant,
            "ttft_s": self.ttft_slo_s,
            "tpot_s": self.tpot_slo_s,
        }


_MISSING = object()


def _show(v: Any, limit: int = 60) -> str:
    """A JSON value for an error message, cut to ``limit`` characters."""
    s = json.dumps(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _get(body: Mapping[str, Any], key: str) -> Any:
    """The value of ``key``; an explicit JSON null counts as absent."""
    v = body.get(key, _MISSING)
    return _MISSING if v is None else v


def _int(body: Mapping[str, Any], key: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
    v = _get(body, key)
    if v is _MISSING:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(f"'{key}' must be an integer, got {_show(v)}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise FieldError(f"'{key}' must be in {rng}, got {v}", key)
    return v


def _number(body: Mapping[str, Any], key: str, *, lo: float | None = None) -> float | None:
    v = _get(body, key)
    if v is _MISSING:
        return None
    try:
        f = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
    except OverflowError:  # an integer beyond float range
        f = math.nan
    if not math.isfinite(f):
        raise FieldError(f"'{key}' must be a finite number, got {_show(v)}", key)
    if lo is not None and f < lo:
        raise FieldError(f"'{key}' must be >= {lo}, got {f}", key)
    return f


def _bool(body: Mapping[str, Any], key: str) -> bool | None:
    v = _get(body, key)
    if v is _MISSING:
        return None
    if not isinstance(v, bool):
        raise FieldError(f"'{key}' must be true or false, got {_show(v)}", key)
    return v


def _str(body: Mapping[str, Any], key: str) -> str | None:
    v = _get(body, key)
    if v is _MISSING:
        return None
    if not isinstance(v, str):
        raise FieldError(f"'{key}' must be a string, got {_show(v)}", key)
    return v


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    v = _get(body, "stop")
    if v is _MISSING:
        return ()
    seq = [v] if isinstance(v, str) else v
    if not isinstance(seq, list) or not all(isinstance(s, str) for s in seq):
        raise FieldError("'stop' must be a string or a list of strings", "stop")
    if len(seq) > MAX_STOP_SEQUENCES:
        raise FieldError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(seq)}", "stop")
    if any(not s for s in seq):
        raise FieldError("'stop' sequences must be non-empty strings", "stop")
    return tuple(seq)


# every body field each endpoint reads (mapped, or refused unless neutral: _refuse_unsupported);
# any other field is refused by name (_refuse_unknown), never dropped
_SHARED_FIELDS = frozenset(
    {
        "model", "stream", "stream_options", "user", "priority", "ttft_slo_s", "tpot_slo_s",
        "max_tokens", "temperature", "top_p", "min_p", "repetition_penalty", "seed", "top_k",
        "min_tokens", "ignore_eos", "stop", "stop_token_ids", "n", "best_of", "logprobs",
        "presence_penalty", "frequency_penalty", "logit_bias",
    }
)  # fmt: skip
_FIELDS = {
    ApiKind.COMPLETION: _SHARED_FIELDS | {"prompt", "echo", "suffix"},
    ApiKind.CHAT: _SHARED_FIELDS
    | {"messages", "max_completion_tokens", "top_logprobs", "tools", "functions", "response_format"},
}
_STREAM_OPTIONS = frozenset({"include_usage"})


def _refuse_unknown(
    body: Mapping[str, Any], known: frozenset[str], where: str = "", absent: tuple[Any, ...] = (None,)
) -> None:
    """FieldError naming the first field of ``body`` not in ``known`` whose value is not one of
    ``absent`` (a JSON null, as everywhere here): an unmapped field would otherwise be silently
    ignored. ``where``: the prefix of the name (``stream_options.``, ``messages[i].``)."""
    unknown = sorted(k for k, v in body.items() if k not in known and v not in absent)
    if unknown:
        name = f"{where}{unknown[0]}"
        raise FieldError(
            f"'{name}' is not supported by pdserve on this endpoint (supported: {', '.join(sorted(known))})",
            name,
        )


def _refuse_unsupported(body: Mapping[str, Any], kind: ApiKind) -> None:
    """Fields pdserve does not implement: refused (400) unless they carry their neutral value.
    (``best_of`` exists on /v1/completions only, as in OpenAI's API: refused on chat unless 1.)"""
    if kind is ApiKind.CHAT:
        best_of = _get(body, "best_of")
        if best_of not in (_MISSING, None, 1):
            raise FieldError(
                f"'best_of' is a /v1/completions field (got {_show(best_of)}); use 'n' on chat", "best_of"
            )
    for key in ("presence_penalty", "frequency_penalty"):
        v = _number(body, key)
        if v:
            raise FieldError(
                f"'{key}' is not supported by pdserve (only 0); use 'repetition_penalty' instead", key
            )
    if _get(body, "logit_bias") not in (_MISSING, {}):
        raise FieldError("'logit_bias' is not supported by pdserve", "logit_bias")
    if kind is ApiKind.COMPLETION:
        if _bool(body, "echo"):
            raise FieldError("'echo' is not supported by pdserve", "echo")
        if _get(body, "suffix") not in (_MISSING, ""):
            raise FieldError("'suffix' is not supported by pdserve", "suffix")
    else:
        for key in ("tools", "functions"):
            if _get(body, key) not in (_MISSING, []):
                raise FieldError(f"'{key}' (tool calling) is not supported by pdserve", key)
        rf = _get(body, "response_format")
        if rf is not _MISSING and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise FieldError(
                '\'response_format\' other than {"type": "text"} is not supported', "response_format"
            )


def _sampling(
    body: Mapping[str, Any], max_tokens: int, logprobs: int | None, kind: ApiKind = ApiKind.COMPLETION
) -> SamplingParams:
    """A validated SamplingParams from the shared sampling fields (OpenAI + pdserve extensions),
    with ``n`` (choices) and, on completions, ``best_of`` (parallel sampling)."""
    kw: dict[str, Any] = {"max_tokens": max_tokens, "stop": _stop(body), "logprobs": logprobs}
    for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
        v = _number(body, key)
        if v is not None:
            kw[key] = v
    for key, lo, hi in (("seed", 0, UINT64_MAX), ("top_k", -1, INT32_MAX), ("min_tokens", 0, UINT32_MAX)):
        v = _int(body, key, lo=lo, hi=hi)
        if v is not None:
            kw[key] = v
    ignore_eos = _bool(body, "ignore_eos")
    if ignore_eos is not None:
        kw["ignore_eos"] = ignore_eos
    ids = _get(body, "stop_token_ids")
    if ids is not _MISSING:
        if not isinstance(ids, list) or any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= INT64_MAX for t in ids
        ):
            raise FieldError("'stop_token_ids' must be a list of integers >= 0", "stop_token_ids")
        kw["stop_token_ids"] = tuple(ids)
    n = _int(body, "n", lo=1, hi=SamplingParams.MAX_N)
    if n is not None:
        kw["n"] = n
    if kind is ApiKind.COMPLETION:
        best_of = _int(body, "best_of", lo=1, hi=SamplingParams.MAX_N)
        if best_of is not None:
            kw["best_of"] = best_of
    try:
        return SamplingParams(**kw)
    except InvalidRequestError as e:  # range checks of SamplingParams: name the field when we can
        param = next((k for k in kw if e.message.startswith(k)), None)
        raise FieldError(e.message, param) from None


def _common(body: Mapping[str, Any], kind: ApiKind) -> dict[str, Any]:
    """Fields shared by both endpoints, except prompt/messages and sampling."""
    if not isinstance(body, Mapping):
        raise FieldError("the request body must be a JSON object")
    _refuse_unknown(body, _FIELDS[kind])
    _refuse_unsupported(body, kind)
    model = _str(body, "model")
    stream = bool(_bool(body, "stream"))
    include_usage = False
    so = _get(body, "stream_options")
    if so is not _MISSING:
        if not stream:
            raise FieldError("'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(so, dict):
            raise FieldError("'stream_options' must be an object", "stream_options")
        _refuse_unknown(so, _STREAM_OPTIONS, "stream_options.")
        include_usage = bool(_bool(so, "include_usage"))
    return {
        "model": model or None,
        "stream": stream,
        "include_usage": include_usage,
        "tenant": _str(body, "user") or "",
        "priority": _int(body, "priority", lo=-INT32_MAX, hi=INT32_MAX) or 0,
        "ttft_slo_s": _number(body, "ttft_slo_s", lo=0.0) or 0.0,
        "tpot_slo_s": _number(body, "tpot_slo_s", lo=0.0) or 0.0,
    }


def _max_tokens(body: Mapping[str, Any], default: int, *, alias: bool) -> int:
    mt = _int(body, "max_tokens", lo=1, hi=UINT32_MAX)
    if alias:
        mct = _int(body, "max_completion_tokens", lo=1, hi=UINT32_MAX)
        if mt is not None and mct is not None and mt != mct:
            raise FieldError(
                f"'max_tokens' ({mt}) and 'max_completion_tokens' ({mct}) disagree: send one",
                "max_completion_tokens",
            )
        mt = mct if mct is not None else mt
    return default if mt is None else mt


def _completion_prompt(body: Mapping[str, Any]) -> str | tuple[int, ...]:
    p = _get(body, "prompt")
    if p is _MISSING:
        raise FieldError("'prompt' is required", "prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str | list):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise FieldError("'prompt' is empty: send at least one character", "prompt")
        return p
    if isinstance(p, list):
        if not p:
            raise FieldError("'prompt' is empty: send at least one token", "prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t <= INT64_MAX for t in p):
                raise FieldError("'prompt' token ids must be integers >= 0", "prompt")
            return tuple(p)
        if all(isinstance(t, str | list) for t in p):
            raise FieldError(
                f"'prompt' holds {len(p)} prompts: batched prompts are not supported, send one per request",
                "prompt",
            )
    raise FieldError("'prompt' must be a string or a list of token ids", "prompt")


def parse_completion(body: Mapping[str, Any], defaults: Defaults = Defaults()) -> GenerateCall:
    """Validate a /v1/completions body. Raises FieldError (400) naming the bad field."""
    common = _common(body, ApiKind.COMPLETION)
    prompt = _completion_prompt(body)
    logprobs = _int(body, "logprobs", lo=0, hi=SamplingParams.MAX_LOGPROBS)
    params = _sampling(body, _max_tokens(body, defaults.completion_max_tokens, alias=False), logprobs)
    return GenerateCall(ApiKind.COMPLETION, prompt, params, logprobs=logprobs is not None, **common)


def _content(v: Any, i: int) -> str:
    """A message's content: a string, null, or a list of text parts (joined by newlines)."""
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        texts: list[str] = []
        for part in v:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise FieldError(
                    f'messages[{i}].content: only text parts ({{"type": "text", "text": ...}}) are supported',
                    f"messages[{i}].content",
                )
        return "\n".join(texts)
    raise FieldError(
        f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content"
    )


def _messages(body: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    msgs = _get(body, "messages")
    if msgs is _MISSING:
        raise FieldError("'messages' is required", "messages")
    if not isinstance(msgs, list) or not msgs:
        raise FieldError('\'messages\' must be a non-empty list of {"role", "content"} objects', "messages")
    out: list[ChatMessage] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
        try:
            role = ChatRole(m.get("role"))
        except ValueError:
            roles = ", ".join(r.value for r in ChatRole)
            raise FieldError(
                f"messages[{i}].role must be one of {roles}, got {_show(m.get('role'))}",
                f"messages[{i}].role",
            ) from None
        _refuse_unknown(m, _MESSAGE_KEYS, f"messages[{i}].", absent=(None, "", []))
        out.append(ChatMessage(role, _content(m.get("content"), i)))
    return tuple(out)


# what a chat message may carry (its chat template renders nothing else); another key with a value
# (not null, "" or []: e.g. a previous assistant message sent back with "refusal": null) is refused
# by name, never dropped
_MESSAGE_KEYS = frozenset({"role", "content"})


def parse_chat(body: Mapping[str, Any], defaults: Defaults = Defaults()) -> GenerateCall:
    """Validate a /v1/chat/completions body. Raises FieldError (400) naming the bad field.

    ``logprobs`` is a boolean here and ``top_logprobs`` (0..20) the number of alternatives asked
    for; ``max_completion_tokens`` is accepted as an alias of ``max_tokens``.
    """
    common = _common(body, ApiKind.CHAT)
    messages = _messages(body)
    want = bool(_bool(body, "logprobs"))
    top = _int(body, "top_logprobs", lo=0, hi=SamplingParams.MAX_LOGPROBS)
    if top is not None and not want:
        raise FieldError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params = _sampling(
        body,
        _max_tokens(body, defaults.chat_max_tokens, alias=True),
        (top or 0) if want else None,
        ApiKind.CHAT,
    )
    return GenerateCall(ApiKind.CHAT, messages, params, logprobs=want, **common)


def resolve_model(requested: str | None, served: Sequence[str]) -> str:
    """The base model id to use: ``requested`` if the router serves it, the first served one when
    the body named none. Raises UnknownModelError (404) for any other name."""
    return resolve_target(requested, served, {})[0]


def resolve_target(
    requested: str | None, served: Sequence[str], adapters: Mapping[str, Sequence[str]]
) -> tuple[str, str]:
    """``(base model, adapter)`` a request runs on. ``requested`` may name a base model the router
    serves (adapter ``""``), or one of the LoRA adapters in ``adapters`` (base model id -> its
    adapters): then its base model and that adapter. None: the served model when there is one;
    with several base models (one router serving them all) a FieldError (400) naming them: a
    request is never routed to some default model. A name that matches more than one (an adapter
    served under two base models, or an adapter named like another base model) is a FieldError
    naming them: it is never routed to the first one. Raises UnknownModelError (404) for any
    other name: a request never falls back to the base model."""
    if not served:
        raise InternalError("the router lists no models")
    if requested is None:
        if len(served) > 1:
            raise FieldError(
                f"'model' is required: this server serves several models ({', '.join(served)})", "model"
            )
        return served[0], ""
    matches = [(requested, "")] if requested in served else []
    matches += [(base, requested) for base in served if requested in adapters.get(base, ())]
    if len(matches) > 1:
        owners = ", ".join(base for base, _ in matches)
        raise FieldError(
            f"'model' {requested!r} is ambiguous: it names a base model or LoRA adapter of each of "
            f"{owners}; give each model's adapters distinct names",
            "model",
        )
    if matches:
        return matches[0]
    names = [*served, *(a for base in served for a in adapters.get(base, ()))]
    raise UnknownModelError(
        f"The model '{requested}' does not exist; this server serves: {', '.join(names)} "
        "(base models and LoRA adapters)"
    )


# ----------------------------------------------------------------------------- response side


@dataclass(frozen=True)
class ResponseMeta:
    """What every response object of one request repeats."""

    kind: ApiKind
    id: str
    created: int
    model: str
    include_usage: bool = False
    logprobs: bool = False
    n: int = 1  # choices (SamplingParams.n)


def usage_dict(fin: Finish, *more: Finish) -> dict[str, Any]:
    """OpenAI ``usage`` (with ``prompt_tokens_details.cached_tokens``) from the SDK's Finish; with
    several choices (``fin``, ``*more``: one finish each) the prompt counts once and the
    completion tokens of every choice add up, as OpenAI counts them."""
    completion = fin.completion_tokens + sum(f.completion_tokens for f in more)
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": fin.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": fin.cached_prompt_tokens},
    }


def pdserve_dict(request_id: str, fin: Finish) -> dict[str, Any]:
    """The ``pdserve`` extension object: router request id, timing and prefix-cache reuse."""
    return {
        "request_id": request_id,
        "ttft_s": fin.ttft_s,
        "e2e_s": fin.e2e_s,
        "phases": dict(fin.phases),
        "kv_pull_s": fin.kv_pull_s,
        "cached_prompt_tokens": fin.cached_prompt_tokens,
        "matched_stop": fin.stop or None,
    }


@dataclass(frozen=True)
class _TokenLp:
    """A sampled token's logprob (the SDK's, with token text and bytes) and the offset of its text
    in the generated text."""

    lp: TokenLogprob
    offset: int


def _finite(v: float) -> float:
    return max(float(v), MIN_LOGPROB)


def _unrendered_stop(c: Chunk) -> bool:
    """Whether ``c``'s last token is the stop token (EOS or a stop token id) that ended the request:
    it has no text in the response, so its logprob is not listed (the listed tokens spell the
    text, as in OpenAI's responses; ``usage.completion_tokens`` still counts it)."""
    f = c.finish
    return (
        f is not None
        and FinishReason.from_sdk(f.reason) is FinishReason.STOP
        and bool(c.token_ids)
        and bool(c.logprobs)
        and f.stop == str(c.token_ids[-1])
        and c.logprobs[-1].token_id == c.token_ids[-1]
    )


class _Offsets:
    """Text offsets of the listed tokens of one generation: a token's text starts where its chunk's
    text does, plus the whole characters the chunk's earlier tokens complete (a character split
    over tokens counts once, when its last byte comes, even from a chunk before), at most the
    chunk's end (text the response leaves out, such as a stop string or a skipped special token,
    cannot push an offset past its chunk). Approximate where the router held text back while it
    could still be a stop string: in the chunk that releases it, offsets can point early by the
    length of the held-back text."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def of_chunk(self, chunk: Chunk, offset: int) -> list[_TokenLp]:
        """Logprobs of ``chunk``'s listed tokens (see :func:`_unrendered_stop`) with their
        offsets; the chunk's text starts at ``offset`` of the generated text."""
        lps = chunk.logprobs[:-1] if _unrendered_stop(chunk) else chunk.logprobs
        end = offset + len(chunk.text)
        out: list[_TokenLp] = []
        within = 0
        for lp in lps:
            out.append(_TokenLp(lp, min(offset + within, end)))
            within += len(self._utf8.decode(lp.token_bytes))
        return out


def _completion_logprobs(lps: Sequence[_TokenLp]) -> dict[str, Any]:
    """Legacy completions ``logprobs`` object: per token its text, logprob, the ``logprobs``
    most likely alternatives as ``{text: logprob}`` and its ``text_offset``."""
    return {
        "tokens": [x.lp.token for x in lps],
        "token_logprobs": [_finite(x.lp.logprob) for x in lps],
        "top_logprobs": [{t.token: _finite(t.logprob) for t in x.lp.top} for x in lps],
        "text_offset": [x.offset for x in lps],
    }


def _chat_logprobs(lps: Sequence[_TokenLp]) -> dict[str, Any]:
    """Chat ``logprobs`` object: ``content`` entries with token text, logprob, UTF-8 ``bytes`` and
    the ``top_logprobs`` alternatives (the same fields)."""
    return {
        "content": [
            {
                "token": x.lp.token,
                "logprob": _finite(x.lp.logprob),
                "bytes": list(x.lp.token_bytes),
                "top_logprobs": [
                    {"token": t.token, "logprob": _finite(t.logprob), "bytes": list(t.token_bytes)}
                    for t in x.lp.top
                ],
            }
            for x in lps
        ]
    }


def _logprobs_obj(kind: ApiKind, lps: Sequence[_TokenLp]) -> dict[str, Any]:
    return _completion_logprobs(lps) if kind is ApiKind.COMPLETION else _chat_logprobs(lps)


def build_response(meta: ResponseMeta, chunks: Iterable[Chunk]) -> dict[str, Any]:
    """The non-streamed response of a finished generation (``text_completion`` or
    ``chat.completion``): ``meta.n`` choices by ``index`` (each chunk's ``choice_index``), usage
    over all of them, the ``pdserve`` object of the choice that finished last. Raises
    InternalError when a choice has no finish."""
    n = meta.n
    text: list[list[str]] = [[] for _ in range(n)]
    lps: list[list[_TokenLp]] = [[] for _ in range(n)]
    fins: list[Finish | None] = [None] * n
    offset = [0] * n
    offsets = [_Offsets() for _ in range(n)]
    rid = ""
    last: Finish | None = None
    for c in chunks:
        i = c.choice_index
        if not 0 <= i < n:
            raise InternalError(f"a chunk of choice {i} in a response of n={n}")
        rid = c.request_id or rid
        lps[i] += offsets[i].of_chunk(c, offset[i])
        text[i].append(c.text)
        offset[i] += len(c.text)
        if c.finish is not None:
            fins[i] = last = c.finish
    missing = [i for i, f in enumerate(fins) if f is None]
    if missing or last is None:
        raise InternalError(f"the generation ended without a finish message (choices {missing})")
    choices = []
    for i in range(n):
        body = "".join(text[i])
        choice: dict[str, Any] = {"index": i}
        if meta.kind is ApiKind.COMPLETION:
            choice["text"] = body
        else:
            choice["message"] = {"role": ChatRole.ASSISTANT.value, "content": body}
        choice["logprobs"] = _logprobs_obj(meta.kind, lps[i]) if meta.logprobs else None
        choice["finish_reason"] = FinishReason.from_sdk(fins[i].reason).value  # type: ignore[union-attr]
        choices.append(choice)
    done = [f for f in fins if f is not None]
    return {
        "id": meta.id,
        "object": meta.kind.object_name,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": usage_dict(*done),
        "pdserve": pdserve_dict(rid, last),
    }


class StreamTranslator:
    """SDK chunks -> streamed OpenAI chunk objects, in order.

    Call :meth:`start` once (chat: the ``{"role": "assistant"}`` chunk), :meth:`chunk` for every SDK
    chunk (a content chunk only when it has text: a token without text of its own, such as the
    end-of-sequence token or part of a UTF-8 character, makes no empty chunk; then, on the SDK's
    finish, a chunk with an empty delta, ``finish_reason`` and the ``pdserve`` timing object), and
    :meth:`end` once (the ``usage`` chunk with ``choices: []`` when ``include_usage``; raises
    InternalError if no finish was seen). With ``include_usage`` every other chunk has
    ``"usage": null``, as OpenAI sends. Logprobs of tokens whose chunk had no text ride on the
    next content chunk (or the finish chunk), so every listed token is sent exactly once.
    """

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        n = meta.n  # choices: each has its own offsets, pending logprobs and finish
        self._offset = [0] * n
        self._offsets = [_Offsets() for _ in range(n)]
        self._finishes: list[Finish | None] = [None] * n
        self._rid = ""
        self._pending: list[list[_TokenLp]] = [[] for _ in range(n)]  # logprobs of tokens not yet sent

    def _obj(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        o: dict[str, Any] = {
            "id": self.meta.id,
            "object": self.meta.kind.chunk_object_name,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        }
        if self.meta.include_usage:
            o["usage"] = None
        return o

    def _choice(
        self,
        text: str | None,
        *,
        role: bool = False,
        logprobs: Any = None,
        finish: str | None = None,
        index: int = 0,
    ) -> dict[str, Any]:
        c: dict[str, Any] = {"index": index}
        if self.meta.kind is ApiKind.COMPLETION:
            c["text"] = text or ""
        else:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = ChatRole.ASSISTANT.value
                delta["content"] = ""
            elif text is not None:
                delta["content"] = text
            c["delta"] = delta
        c["logprobs"] = logprobs
        c["finish_reason"] = finish
        return c

    def start(self) -> list[dict[str, Any]]:
        """Chunks to send before any token (chat: the role chunk of each choice; completions:
        none)."""
        if self.meta.kind is ApiKind.CHAT:
            return [self._obj([self._choice(None, role=True, index=i)]) for i in range(self.meta.n)]
        return []

    def chunk(self, c: Chunk) -> list[dict[str, Any]]:
        """Chunks for one SDK chunk (zero, one or two), for its choice (``choice_index``)."""
        out: list[dict[str, Any]] = []
        i = c.choice_index
        if not 0 <= i < self.meta.n:
            raise InternalError(f"a chunk of choice {i} in a stream of n={self.meta.n}")
        self._rid = c.request_id or self._rid
        if self.meta.logprobs:
            self._pending[i] += self._offsets[i].of_chunk(c, self._offset[i])
        if c.text:
            out.append(self._obj([self._choice(c.text, logprobs=self._take_logprobs(i), index=i)]))
            self._offset[i] += len(c.text)
        if c.finish is not None:
            self._finishes[i] = c.finish
            fr = FinishReason.from_sdk(c.finish.reason).value
            last = self._obj([self._choice(None, logprobs=self._take_logprobs(i), finish=fr, index=i)])
            last["pdserve"] = pdserve_dict(self._rid, c.finish)
            out.append(last)
        return out

    def _take_logprobs(self, i: int = 0) -> dict[str, Any] | None:
        """The logprobs object of choice ``i``'s pending tokens (None when there are none),
        emptying them."""
        if not self._pending[i]:
            return None
        lp = _logprobs_obj(self.meta.kind, self._pending[i])
        self._pending[i] = []
        return lp

    @property
    def finished(self) -> bool:
        """Every choice has its finish."""
        return all(f is not None for f in self._finishes)

    def end(self) -> list[dict[str, Any]]:
        """Chunks after the last SDK chunk (the usage chunk when asked for: all choices)."""
        missing = [i for i, f in enumerate(self._finishes) if f is None]
        if missing:
            raise InternalError(f"the generation stream ended without a finish message (choices {missing})")
        if not self.meta.include_usage:
            return []
        o = self._obj([])
        o["usage"] = usage_dict(*[f for f in self._finishes if f is not None])
        return [o]


def sse_event(obj: Mapping[str, Any]) -> bytes:
    """One Server-Sent Event: ``data: <json>\\n\\n``."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def models_response(
    model_ids: Sequence[str], created: int, adapters: Mapping[str, Sequence[str]] | None = None
) -> dict[str, Any]:
    """/v1/models: ``{"object": "list", "data": [model objects]}``: the base models, then each
    one's LoRA adapters (``adapters``: base id -> adapter names) with ``parent`` = the base id."""
    data = [model_object(m, created) for m in model_ids]
    for m in model_ids:
        data.extend(model_object(a, created, parent=m) for a in (adapters or {}).get(m, ()))
    return {"object": "list", "data": data}


def model_object(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    """One OpenAI model object; ``parent``: the base model of a LoRA adapter (as vLLM lists them)."""
    obj: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": "pdserve"}
    if parent is not None:
        obj["parent"] = parent
        obj["root"] = parent
    return obj
