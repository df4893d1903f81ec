"""Input limits checked at the edge before any work is spent (pure; protobuf messages are read
duck-typed, so nothing here imports grpc).

Every check raises :class:`~pdserve.errors.InvalidRequestError` (gRPC INVALID_ARGUMENT, HTTP 400)
naming the field and the limit; nothing is truncated or ignored silently:

* ``request_id``: at most :data:`MAX_REQUEST_ID_CHARS` printable ASCII characters (no spaces or
  control characters);
* ``tenant`` / ``cache_salt`` / ``adapter`` / ``model``: at most :data:`MAX_NAME_CHARS`;
* prompt text: at most the tenant's ``max_prompt_bytes`` UTF-8 bytes (all chat contents together),
  measured before tokenizing, so a huge prompt costs no tokenizer time;
* chat: at least one message, roles only :data:`CHAT_ROLES`, not every content empty;
* every string valid Unicode: a lone surrogate (``"\\ud800"`` in JSON) is refused, wherever it
  is in an HTTP body (:func:`check_json_strings`), instead of failing later as a server error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pdserve.auth.tenants import TenantPolicy
from pdserve.errors import InvalidRequestError

MAX_REQUEST_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_JSON_DEPTH = 64
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


def check_text(value: str, field: str) -> str:
    """``value`` if it is encodable as UTF-8 (no lone surrogates), else InvalidRequestError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{field} contains an invalid character (a lone UTF-16 surrogate \\u{ord(value[e.start]):04x} "
            f"at position {e.start}): send valid Unicode text"
        ) from None
    return value


def utf8_len(value: str, field: str) -> int:
    """UTF-8 byte length of ``value`` (InvalidRequestError for lone surrogates)."""
    return len(check_text(value, field).encode("utf-8"))


def check_request_id(rid: str) -> str:
    """A client request id: empty (none) or 1..128 printable ASCII characters without spaces."""
    if len(rid) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequestError(
            f"request_id has {len(rid)} characters; the limit is {MAX_REQUEST_ID_CHARS}"
        )
    bad = next((c for c in rid if not "\x21" <= c <= "\x7e"), None)
    if bad is not None:
        raise InvalidRequestError(
            f"request_id may only hold printable ASCII characters without spaces; found U+{ord(bad):04X}"
        )
    return rid


def check_name_field(value: str, field: str) -> str:
    """A short identifier-like string field (tenant, cache_salt, adapter, model)."""
    if len(value) > MAX_NAME_CHARS:
        raise InvalidRequestError(f"{field} has {len(value)} characters; the limit is {MAX_NAME_CHARS}")
    return check_text(value, field)


def check_prompt_bytes(n: int, policy: TenantPolicy) -> None:
    if n > policy.max_prompt_bytes:
        raise InvalidRequestError(
            f"the prompt is {n} bytes of text; your limit is {policy.max_prompt_bytes} (max_prompt_bytes): shorten it"
        )


def check_chat(
    messages: Sequence[tuple[str, str]], policy: TenantPolicy, field: str = "chat.messages"
) -> None:
    """``messages`` as (role, content) pairs: non-empty, known roles, some content, within bytes."""
    if not messages:
        raise InvalidRequestError(f"{field} is empty: send at least one message")
    total = 0
    for i, (role, content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"{field}[{i}].role {role[:40]!r} is not supported; use one of {', '.join(sorted(CHAT_ROLES))}"
            )
        total += utf8_len(content, f"{field}[{i}].content")
    if total == 0:
        raise InvalidRequestError(f"every message in {field} is empty: send some text")
    check_prompt_bytes(total, policy)


def validate_generate_request(req: Any, policy: TenantPolicy) -> None:
    """Edge checks of a ``pdserve.v1.GenerateRequest`` (see the module doc). Token-level checks
    (context length, vocabulary) stay with the router, which tokenizes afterwards."""
    check_request_id(req.request_id)
    for f in ("model", "tenant", "cache_salt", "adapter"):
        check_name_field(getattr(req, f), f)
    which = req.WhichOneof("input")
    if which == "prompt":
        n = utf8_len(req.prompt, "prompt")
        if n == 0:
            raise InvalidRequestError("prompt is empty: send at least one character")
        check_prompt_bytes(n, policy)
    elif which == "prompt_token_ids":
        if not req.prompt_token_ids.ids:
            raise InvalidRequestError("prompt_token_ids is empty: send at least one token")
    elif which == "chat":
        check_chat([(m.role, m.content) for m in req.chat.messages], policy)
    else:
        raise InvalidRequestError("set one of prompt, prompt_token_ids or chat")
    for i, s in enumerate(req.sampling.stop):
        check_text(s, f"sampling.stop[{i}]")


def check_json_strings(obj: Any, path: str = "body", depth: int = 0) -> None:
    """Refuse a decoded JSON document holding a lone surrogate in any string or key (HTTP 400
    naming where), or nested deeper than :data:`MAX_JSON_DEPTH`."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequestError(f"{path} is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(obj, str):
        check_text(obj, path)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(k, str):
                check_text(k, f"a key of {path}")
            check_json_strings(v, f"{path}.{k}" if depth else str(k), depth + 1)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            check_json_strings(v, f"{path}[{i}]", depth + 1)


def prompt_text_bytes(prompt: str | Iterable[Any]) -> int:
    """UTF-8 bytes of a text prompt or of the contents of chat messages (dicts with ``content``
    or objects with ``.content``); 0 for token ids."""
    if isinstance(prompt, str):
        return utf8_len(prompt, "prompt")
    total = 0
    for i, m in enumerate(prompt):
        content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
        if isinstance(content, str):
            total += utf8_len(content, f"messages[{i}].content")
    return total
