"""OpenAI ``n`` (chat and completions) and ``best_of`` (completions) over the real cluster
(SmolLM2-135M, loopback; the fixtures of test_openai_api.py: goodput placement): choices with
their ``index``, streamed chunks per choice, usage counting every choice, and each choice equal
to what the gRPC SDK returns for the same seeded request."""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams
from tests.integration import test_openai_api as base
from tests.integration.test_openai_api import CHAT, PROMPT, _post, _stream

# the module fixtures of test_openai_api.py (a cluster with goodput placement, the HTTP server)
cluster, client, server, oa = base.cluster, base.client, base.server, base.oa

SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 17, "max_tokens": 12, "ignore_eos": True}


def _sdk(client, prompt, **kw) -> list[Any]:
    p = SamplingParams(
        max_tokens=SEEDED["max_tokens"],
        temperature=SEEDED["temperature"],
        top_p=SEEDED["top_p"],
        seed=SEEDED["seed"],
        ignore_eos=True,
        **kw,
    )
    return client.complete_choices(prompt, p)


def _by_index(events: list[dict[str, Any]], key: str) -> dict[int, str]:
    out: dict[int, list[str]] = {}
    for e in events:
        for c in e["choices"]:
            part = c["text"] if key == "text" else c["delta"].get("content", "")
            out.setdefault(c["index"], []).append(part)
    return {i: "".join(v) for i, v in out.items()}


def test_completions_n2_and_best_of(server, client):
    status, _, r = _post(server, "/v1/completions", {"prompt": PROMPT, "n": 2, **SEEDED})
    assert status == 200, r
    ref = _sdk(client, PROMPT, n=2)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert [c["text"] for c in r["choices"]] == [x.text for x in ref]
    assert all(c["finish_reason"] == "length" for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 2 * SEEDED["max_tokens"]
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 2 * SEEDED["max_tokens"]
    # streamed: the same texts, chunk by chunk per index, a finish each, usage over both
    _, events = _stream(
        server,
        "/v1/completions",
        {"prompt": PROMPT, "n": 2, "stream": True, "stream_options": {"include_usage": True}, **SEEDED},
    )
    assert _by_index(events[:-1], "text") == {0: ref[0].text, 1: ref[1].text}
    finishes = [c for e in events for c in e["choices"] if c["finish_reason"] is not None]
    assert sorted(c["index"] for c in finishes) == [0, 1]
    assert (
        events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2 * SEEDED["max_tokens"]
    )
    # best_of: the n most likely of best_of candidates, as the SDK gets them
    status, _, r = _post(server, "/v1/completions", {"prompt": PROMPT, "n": 1, "best_of": 3, **SEEDED})
    assert status == 200, r
    assert [c["text"] for c in r["choices"]] == [x.text for x in _sdk(client, PROMPT, n=1, best_of=3)]


def test_chat_n2_stream_and_not(server, client):
    status, _, r = _post(server, "/v1/chat/completions", {"messages": CHAT, "n": 2, **SEEDED})
    assert status == 200, r
    ref = _sdk(client, CHAT, n=2)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in r["choices"]] == [x.text for x in ref]
    assert r["usage"]["completion_tokens"] == sum(x.finish.completion_tokens for x in ref)
    _, events = _stream(server, "/v1/chat/completions", {"messages": CHAT, "n": 2, "stream": True, **SEEDED})
    roles = [c["index"] for e in events for c in e["choices"] if c["delta"].get("role") == "assistant"]
    assert roles == [0, 1]  # a role chunk per choice first
    assert _by_index(events, "delta") == {0: ref[0].text, 1: ref[1].text}
    fins = sorted(c["index"] for e in events for c in e["choices"] if c["finish_reason"])
    assert fins == [0, 1]


def test_official_client_n2(oa, client):
    model = client.list_models()[0]
    r = oa.chat.completions.create(
        model=model, messages=CHAT, n=2, temperature=0.9, seed=17, max_tokens=12, top_p=0.95
    )
    assert [c.index for c in r.choices] == [0, 1]
    ref = client.complete_choices(
        CHAT, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=17, n=2)
    )
    assert [c.message.content for c in r.choices] == [x.text for x in ref]
    assert r.usage.completion_tokens == sum(x.finish.completion_tokens for x in ref)
