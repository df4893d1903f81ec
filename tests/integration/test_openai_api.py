"""The OpenAI-compatible HTTP front end over the real embedded cluster (SmolLM2-135M, loopback).

One cluster (store, router, 1 prefill, 1 decode) and one HTTP server on 127.0.0.1:0 serve the
module; requests go over urllib / http.client (standard library) and the official ``openai``
client (a dev dependency). Greedy output through HTTP is compared with ``Client.complete`` of the
same prompt, token strings and bytes with the model's tokenizer.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from email.message import Message
from typing import Any

import grpc
import pytest

from kv_store.client import KVStoreClient
from pdserve.client import Client
from pdserve.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from pdserve.launcher import ClusterSpec, launch
from pdserve.openai_api.server import OpenAIServer, ServerConfig
from pdserve.v1 import worker_pb2, worker_pb2_grpc

MAX_BODY = 64 << 10
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def cluster(smollm_path):
    # the goodput policy: requests without an SLO are served best effort as with the default
    # policy, and an impossible SLO is refused early (RESOURCE_EXHAUSTED -> HTTP 429)
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=512,
            store_capacity_blocks=1024,
            router_args=("--policy", "goodput"),
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.router_address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(smollm_path):
    from engine.tokenizer import Tokenizer

    return Tokenizer(smollm_path)


@pytest.fixture(scope="module")
def server(cluster):
    srv = OpenAIServer(
        ServerConfig(router=cluster.router_address, port=0, max_body_bytes=MAX_BODY, request_timeout_s=60)
    ).start()
    yield srv
    srv.close()


def _request(
    method: str, url: str, body: Any = None, *, raw: bytes | None = None
) -> tuple[int, Message, bytes]:
    """(status, headers, body bytes) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def _post(server: OpenAIServer, path: str, body: Any) -> tuple[int, Message, Any]:
    status, headers, data = _request("POST", server.url + path, body)
    return status, headers, json.loads(data)


def _events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON events of an SSE body, checking the framing and the final ``[DONE]``."""
    parts = raw.split(b"\n\n")
    assert parts[-1] == b"", "the stream must end with a blank line"
    assert parts[-2] == b"data: [DONE]"
    out = []
    for p in parts[:-2]:
        assert p.startswith(b"data: "), p
        out.append(json.loads(p[len(b"data: ") :]))
    return out


def _stream(server: OpenAIServer, path: str, body: dict[str, Any]) -> tuple[Message, list[dict[str, Any]]]:
    status, headers, data = _request("POST", server.url + path, body)
    assert status == 200, data
    assert headers["Content-Type"].startswith("text/event-stream")
    return headers, _events(data)


def _assert_error(status: int, body: Any, want_status: int) -> dict[str, Any]:
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------------------ models, health


def test_models_and_health(server, client):
    status, _, body = _request("GET", server.url + "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = _request("GET", server.url + "/v1/models")
    models = json.loads(body)
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == client.list_models()
    assert all(m["object"] == "model" and m["owned_by"] == "pdserve" for m in models["data"])
    mid = models["data"][0]["id"]
    status, _, body = _request("GET", f"{server.url}/v1/models/{mid}")
    assert status == 200 and json.loads(body)["id"] == mid
    status, _, body = _request("GET", server.url + "/v1/models/no-such-model")
    _assert_error(status, json.loads(body), 404)


# ------------------------------------------------------------------------------ completions


def test_greedy_completion_equals_sdk(server, client):
    ref = client.complete(PROMPT, max_tokens=12, temperature=0.0)
    model = client.list_models()[0]
    status, headers, r = _post(
        server,
        "/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "user": "t1", "priority": 1},
    )
    assert status == 200, r
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == model
    (choice,) = r["choices"]
    assert choice["text"] == ref.text and choice["index"] == 0
    assert choice["finish_reason"] == ref.finish.reason and choice["logprobs"] is None
    u = r["usage"]
    assert u["completion_tokens"] == len(ref.token_ids) and u["prompt_tokens"] == ref.finish.prompt_tokens
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    px = r["pdserve"]
    assert px["ttft_s"] > 0 and set(px["phases"]) == {"queue", "prefill", "transfer", "decode"}
    assert px["cached_prompt_tokens"] == u["prompt_tokens_details"]["cached_tokens"] >= 0
    assert headers["X-Request-Id"] == px["request_id"] == r["id"][len("cmpl-") :]


def _sdk_logprobs(client, prompt, **kw) -> tuple[list[Any], Any]:
    """(logprobs of every token, finish) of one generation through the SDK."""
    lps, fin = [], None
    for c in client.generate(prompt, **kw):
        assert len(c.logprobs) == len(c.token_ids)
        lps += c.logprobs
        fin = c.finish or fin
    return lps, fin


def test_token_id_prompt_and_logprobs(server, client, tokenizer):
    ids = client.tokenize(PROMPT)
    ref = client.complete(ids, max_tokens=6, temperature=0.0, logprobs=1)
    sdk, _ = _sdk_logprobs(client, ids, max_tokens=6, temperature=0.0, logprobs=1)
    status, _, r = _post(
        server, "/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 1}
    )
    assert status == 200, r
    (choice,) = r["choices"]
    assert choice["text"] == ref.text
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.token_text(t) for t in ref.token_ids]  # real token strings
    assert lp["token_logprobs"] == [x.logprob for x in sdk] and all(x <= 0 for x in lp["token_logprobs"])
    assert lp["top_logprobs"] == [{x.top[0].token: x.top[0].logprob} for x in sdk]


def test_streamed_completion_equals_sdk(server, client):
    ref = client.complete(PROMPT, max_tokens=12, temperature=0.0)
    headers, evs = _stream(
        server,
        "/v1/completions",
        {
            "prompt": PROMPT,
            "max_tokens": 12,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert headers["Transfer-Encoding"] == "chunked"
    assert all(e["object"] == "text_completion" and e["id"] == evs[0]["id"] for e in evs)
    with_choices = [e for e in evs if e["choices"]]
    assert "".join(e["choices"][0]["text"] for e in with_choices) == ref.text
    assert with_choices[-1]["choices"][0]["finish_reason"] == ref.finish.reason
    assert all(e["choices"][0]["finish_reason"] is None for e in with_choices[:-1])
    assert "pdserve" in with_choices[-1]
    usage = evs[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ref.token_ids)
    assert all(e["usage"] is None for e in evs[:-1])


# ------------------------------------------------------------------------------ chat


def test_chat_completion_equals_sdk(server, client):
    ref = client.complete(CHAT, max_tokens=24, temperature=0.0)
    status, _, r = _post(
        server, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 24, "temperature": 0}
    )
    assert status == 200, r
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    (choice,) = r["choices"]
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert choice["finish_reason"] == ref.finish.reason
    assert r["usage"]["completion_tokens"] == len(ref.token_ids)


def test_streamed_chat_equals_sdk(server, client):
    ref = client.complete(CHAT, max_tokens=24, temperature=0.0)
    _, evs = _stream(
        server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 24, "temperature": 0, "stream": True}
    )
    assert all(e["object"] == "chat.completion.chunk" for e in evs)
    assert evs[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs)
    assert text == ref.text
    assert evs[-1]["choices"][0]["finish_reason"] == ref.finish.reason
    assert "usage" not in evs[-1]


# ------------------------------------------------------------------------------ errors


def test_bad_requests_get_openai_errors(server):
    status, _, r = _post(server, "/v1/completions", {"prompt": PROMPT, "temperature": "hot"})
    err = _assert_error(status, r, 400)
    assert err["type"] == "invalid_request_error" and err["param"] == "temperature"

    status, _, r = _post(server, "/v1/completions", {"prompt": PROMPT, "n": 2, "temperature": 0})
    assert _assert_error(status, r, 400)["param"] == "n"

    status, _, r = _post(server, "/v1/chat/completions", {"messages": CHAT, "model": "gpt-4o"})
    assert _assert_error(status, r, 404)["code"] == "model_not_found"

    status, _, r = _post(server, "/v1/completions", {"prompt": ["a", "b"]})
    assert _assert_error(status, r, 400)["param"] == "prompt"

    status, _, raw = _request("POST", server.url + "/v1/completions", raw=b"{not json")
    assert "not valid JSON" in _assert_error(status, json.loads(raw), 400)["message"]

    status, _, raw = _request("POST", server.url + "/v1/completions", raw=b"[1, 2]")
    _assert_error(status, json.loads(raw), 400)

    # the router's own validation (an out-of-vocabulary token id) comes back as 400 too
    status, _, r = _post(server, "/v1/completions", {"prompt": [10**9], "max_tokens": 2})
    assert "out of range" in _assert_error(status, r, 400)["message"]

    status, _, raw = _request("POST", server.url + "/v1/nothing", {"a": 1})
    assert _assert_error(status, json.loads(raw), 404)["code"] == "unknown_url"

    status, headers, raw = _request("GET", server.url + "/v1/completions")
    _assert_error(status, json.loads(raw), 405)
    assert headers["Allow"] == "POST"

    status, _, raw = _request("POST", server.url + "/v1/completions", raw=b" " * (MAX_BODY + 1))
    _assert_error(status, json.loads(raw), 413)

    status, _, _ = _request("GET", server.url + "/health")  # still serving
    assert status == 200


def test_impossible_slo_is_429_with_retry_after(server):
    """The cluster's goodput policy refuses an SLO it cannot meet before any compute is spent."""
    status, headers, r = _post(
        server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "ttft_slo_s": 1e-6, "tpot_slo_s": 1e-6}
    )
    err = _assert_error(status, r, 429)
    assert err["type"] == "rate_limit_error"
    assert int(headers["Retry-After"]) >= 1


# ------------------------------------------------------------------------------ disconnect


def _kv_in_use(cluster) -> tuple[int, int, int]:
    """(decode blocks used, prefill blocks used, store leases)."""
    used = []
    for name in ("decode-0", "prefill-0"):
        with grpc.insecure_channel(cluster.workers[name]) as ch:
            stats = worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=10)
            used.append(stats.kv_blocks_used)
    store = KVStoreClient(cluster.store_address)
    try:
        leases = store.stats().node.num_leases
    finally:
        store.close()
    return used[0], used[1], leases


def test_client_disconnect_cancels_the_generation(server, cluster):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = {
        "prompt": "Count to ten thousand:",
        "max_tokens": 2000,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    buf = b""
    while buf.count(b"\n\n") < 4:
        got = resp.read1(4096)
        assert got, "stream ended early"
        buf += got
    assert _kv_in_use(cluster)[0] > 0  # decoding now
    t0 = time.monotonic()
    resp.close()
    conn.close()
    while _kv_in_use(cluster) != (0, 0, 0):
        assert time.monotonic() - t0 < 10, f"generation not cancelled: {_kv_in_use(cluster)}"
        time.sleep(0.1)
    status, _, _ = _request("GET", server.url + "/health")
    assert status == 200


# ------------------------------------------------------------------------------ openai SDK


@pytest.fixture(scope="module")
def oa(server):
    import openai

    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def test_official_client_chat_and_stream(oa, client):
    ref = client.complete(CHAT, max_tokens=16, temperature=0.0)
    model = oa.models.list().data[0].id
    r = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == ref.text
    parts = oa.chat.completions.create(model=model, messages=CHAT, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == ref.text


def test_official_client_chat_logprobs_with_alternatives(oa, client, tokenizer):
    """Chat logprobs: each token's real text and bytes (as the tokenizer spells it), 3 alternatives
    most likely first, the greedy pick the first of them; the bytes spell the content exactly."""
    sdk, fin = _sdk_logprobs(client, CHAT, max_tokens=48, temperature=0.0, logprobs=3)
    assert fin.reason == "stop" and fin.stop == str(tokenizer.eos_token_id)  # ended by EOS
    r = oa.chat.completions.create(
        model=client.list_models()[0],
        messages=CHAT,
        max_tokens=48,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    (choice,) = r.choices
    content = choice.logprobs.content
    shown = sdk[:-1]  # the EOS token that ended it has no text and is not listed
    assert [e.token for e in content] == [tokenizer.token_text(x.token_id) for x in shown]
    assert [bytes(e.bytes) for e in content] == [tokenizer.token_bytes(x.token_id) for x in shown]
    assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content
    for e, x in zip(content, shown, strict=True):
        assert len(e.top_logprobs) == 3
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob  # greedy
        assert [t.token for t in e.top_logprobs] == [tokenizer.token_text(t.token_id) for t in x.top]
        assert [bytes(t.bytes) for t in e.top_logprobs] == [tokenizer.token_bytes(t.token_id) for t in x.top]
    assert r.usage.completion_tokens == len(sdk)  # the EOS token is counted


def test_official_client_completion_logprobs(oa, client, tokenizer):
    sdk, _ = _sdk_logprobs(client, PROMPT, max_tokens=6, temperature=0.0, logprobs=2)
    r = oa.completions.create(
        model=client.list_models()[0], prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp.tokens == [tokenizer.token_text(x.token_id) for x in sdk]
    assert lp.top_logprobs == [{tokenizer.token_text(t.token_id): t.logprob for t in x.top} for x in sdk]
    assert all(len(x.top) == 2 for x in sdk)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_streamed_chat_has_no_empty_content_chunk(oa, client):
    """The EOS token that ends the answer makes no chunk of its own: every chunk after the role
    chunk carries text, then one chunk carries finish_reason (and no content)."""
    ref = client.complete(CHAT, max_tokens=48, temperature=0.0)
    assert ref.finish.reason == "stop"
    chunks = [
        c
        for c in oa.chat.completions.create(
            model=client.list_models()[0], messages=CHAT, max_tokens=48, temperature=0, stream=True
        )
        if c.choices
    ]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    body, last = chunks[1:-1], chunks[-1]
    assert body and all(c.choices[0].delta.content for c in body), "a chunk without text was sent"
    assert all(c.choices[0].finish_reason is None for c in body)
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    assert "".join(c.choices[0].delta.content for c in body) == ref.text


def test_official_client_refusals(oa, client):
    import openai

    model = client.list_models()[0]
    with pytest.raises(openai.BadRequestError, match="temperature 0"):
        oa.completions.create(model=model, prompt=PROMPT, n=2, temperature=0)
    with pytest.raises(openai.BadRequestError, match="'n' must be in"):
        oa.chat.completions.create(model=model, messages=CHAT, n=65)
    with pytest.raises(openai.BadRequestError, match="best_of must be"):
        oa.completions.create(model=model, prompt=PROMPT, n=3, best_of=2)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="nope", messages=CHAT)
    # a LoRA adapter's name as the model: 404 naming it, never the base model's answer
    with pytest.raises(openai.NotFoundError, match="my-lora") as ei:
        oa.chat.completions.create(model="my-lora", messages=CHAT)
    assert ei.value.body["code"] == "model_not_found" and ei.value.body["param"] == "model"


def test_context_overflow_is_400_and_invalid_argument(oa, client, cluster):
    import openai

    from pdserve.v1 import client_pb2, client_pb2_grpc

    with grpc.insecure_channel(cluster.router_address) as ch:
        tok = client_pb2_grpc.GenerateStub(ch).Tokenize(client_pb2.TokenizeRequest(prompt=PROMPT), timeout=30)
    ctx, n = tok.max_model_len, len(tok.token_ids)
    want = f"prompt has {n} tokens + max_tokens {ctx} > context {ctx}"
    with pytest.raises(InvalidRequestError) as ei:
        client.complete(PROMPT, max_tokens=ctx, temperature=0.0)
    assert ei.value.message.startswith(want)
    with pytest.raises(openai.BadRequestError) as hi:
        oa.completions.create(model=client.list_models()[0], prompt=PROMPT, max_tokens=ctx)
    assert hi.value.status_code == 400 and want in hi.value.message


def test_unknown_model_and_adapter_are_not_found_over_grpc(client, cluster):
    with pytest.raises(ModelNotFoundError, match="gpt-17"):
        client.complete(PROMPT, model="gpt-17", max_tokens=2)
    with pytest.raises(ModelNotFoundError, match="LoRA adapter 'my-lora'"):
        client.complete(PROMPT, adapter="my-lora", max_tokens=2)
    from pdserve.client import build_request
    from pdserve.v1 import client_pb2_grpc

    with grpc.insecure_channel(cluster.router_address) as ch:
        stub = client_pb2_grpc.GenerateStub(ch)
        for kw in ({"model": "gpt-17"}, {"adapter": "my-lora"}):
            with pytest.raises(grpc.RpcError) as ei:
                list(stub.Generate(build_request(PROMPT, max_tokens=2, **kw), timeout=30))
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_workers_refuse_adapters(cluster, client):
    """Defence in depth: a Prefill or Decode call naming an adapter, sent straight to a worker, is
    refused NOT_FOUND too."""
    from pdserve.v1 import common_pb2

    ids = client.tokenize(PROMPT)
    sampling = common_pb2.SamplingParams(max_tokens=2, temperature=0.0)
    calls = [
        (
            "prefill-0",
            lambda s: s.Prefill(
                worker_pb2.PrefillRequest(prompt_token_ids=ids, sampling=sampling, adapter="my-lora"),
                timeout=30,
            ),
        ),
        (
            "decode-0",
            lambda s: list(
                s.Decode(
                    worker_pb2.DecodeRequest(
                        prompt_token_ids=ids, sampling=sampling, adapter="my-lora", local_prefill=True
                    ),
                    timeout=30,
                )
            ),
        ),
    ]
    for name, call in calls:
        with grpc.insecure_channel(cluster.workers[name]) as ch, pytest.raises(grpc.RpcError) as ei:
            call(worker_pb2_grpc.WorkerStub(ch))
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND, name
        assert "my-lora" in ei.value.details()
    assert _kv_in_use(cluster)[:2] == (0, 0)


# ------------------------------------------------------------------------------ HTTP layer, scripted SDK
# The HTTP I/O around SDK failures the live cluster cannot be made to produce on demand: a scripted
# stand-in for the asyncio router client (same generate()/list_models() surface) feeds the real server.


class _ScriptedStream:
    """An async iterator over a script of chunks and exceptions (AsyncClient.generate's shape)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.closed = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Any:
        if not self.script:
            raise StopAsyncIteration
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed = True


class _ScriptedClient:
    def __init__(self) -> None:
        self.script: list[Any] = []
        self.calls: list[dict[str, Any]] = []
        self.streams: list[_ScriptedStream] = []

    async def list_models(self) -> list[str]:
        return ["fake-model"]

    def generate(self, prompt, params=None, *, timeout=None, **kw) -> _ScriptedStream:
        self.calls.append({"prompt": prompt, "params": params, "timeout": timeout, **kw})
        self.streams.append(_ScriptedStream(self.script))
        return self.streams[-1]

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def scripted():
    c = _ScriptedClient()
    srv = OpenAIServer(ServerConfig(router="unused:1", port=0), client=c).start()  # type: ignore[arg-type]
    yield srv, c
    srv.close()


def _finish_chunk(text: str) -> Any:
    from pdserve.client import Chunk, Finish

    phases = {"queue": 0.0, "prefill": 0.0, "transfer": 0.0, "decode": 0.0}
    fin = Finish("stop", "", 3, 1, 0, 0.01, 0.02, [0.01], phases)
    return Chunk("rid", [7], text, [], fin)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ResourceExhaustedError("request refused (slo): busy", 1.5), 429),
        (UnavailableError("no decode worker"), 503),
        (DeadlineExceededError("deadline exceeded"), 504),
        (InvalidRequestError("prompt is empty"), 400),
    ],
)
def test_sdk_errors_map_to_http_statuses(scripted, exc, status, stream):
    srv, c = scripted
    c.script = [exc]
    st, headers, raw = _request(
        "POST", srv.url + "/v1/chat/completions", {"messages": CHAT, "stream": stream, "ttft_slo_s": 0.2}
    )
    err = _assert_error(st, json.loads(raw), status)
    assert err["message"] == exc.message
    if status == 429:
        assert headers["Retry-After"] == "2" and err["type"] == "rate_limit_error"
    assert c.calls[-1]["ttft_s"] == 0.2 and c.calls[-1]["model"] == "fake-model"
    assert c.streams[-1].closed  # the server closes the generation it opened (its gRPC call)


def test_error_after_first_token_is_an_sse_error_event(scripted):
    srv, c = scripted
    from pdserve.client import Chunk

    c.script = [Chunk("rid", [5], "Hi", []), UnavailableError("decode worker lost")]
    _, evs = _stream(srv, "/v1/completions", {"prompt": "x", "stream": True})
    assert evs[0]["choices"][0]["text"] == "Hi"
    assert evs[-1]["error"]["message"] == "decode worker lost" and evs[-1]["error"]["code"] == "unavailable"


def test_scripted_success_and_keepalive(scripted):
    srv, c = scripted
    c.script = [_finish_chunk("ok")]
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=10)
    try:
        for stream in (False, True, False):  # one connection: chunked streams keep it reusable
            conn.request(
                "POST",
                "/v1/completions",
                json.dumps({"prompt": "x", "stream": stream}),
                {"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200
            if stream:
                assert _events(data)[0]["choices"][0]["text"] == "ok"
            else:
                assert json.loads(data)["choices"][0]["text"] == "ok"
        assert all(s.closed for s in c.streams)
    finally:
        conn.close()


def test_router_down_is_503():
    from pdserve.launcher import free_port

    with OpenAIServer(ServerConfig(router=f"127.0.0.1:{free_port()}", port=0)).start() as srv:
        st, _, raw = _request("GET", srv.url + "/health")
        _assert_error(st, json.loads(raw), 503)
        st, _, raw = _request("POST", srv.url + "/v1/completions", {"prompt": "x"})
        _assert_error(st, json.loads(raw), 503)
