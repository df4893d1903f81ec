"""Attack replays of issue #13 against the real embedded cluster with API keys (SmolLM2-135M,
loopback): the router runs with ``--api-keys FILE`` and an OpenAI HTTP server with the same
store serves next to it.

* keys: missing / wrong / revoked / rotated, over gRPC (UNAUTHENTICATED) and HTTP (401, OpenAI's
  error shape); a key added or revoked while the cluster runs applies to the next request;
* the prefix cache does not cross tenants: tenant B gets ``cached_prompt_tokens`` 0 on tenant A's
  prompt (gRPC and HTTP), whatever ``tenant``/``cache_salt`` it sends; tenants configured with a
  shared salt group do share;

The prefix checks hold wherever the router places a request (``--price-handoff`` prefills short
prompts on the decode worker itself, so a tenant's repeat may land on a worker that has not seen
its prompt): a tenant that never sent a request must find nothing; another tenant at most what
its *own* earlier prompts share with the probe (over HTTP the chat template's block), computed
from the tokens (:mod:`tests.integration.tenant_cache`); a tenant's own prefix (and a salt group's)
must be reused within one repeat per worker that can prefill it. The same checks with placement
pinned, and so exact: test_tenant_isolation_pinned.py.
* request-id collision: a second request with an id in flight is refused (ALREADY_EXISTS / 409)
  without touching the first (its output equals a reference run) and without leaking anything;
* per-tenant in-flight quota.
"""

from __future__ import annotations

import http.client as http_client
import json
from pathlib import Path
from typing import Any

import pytest

from engine.tokenizer import Tokenizer
from pdserve.auth.keys import FileKeyStore, issue_key, revoke_key
from pdserve.auth.tenants import TenantPolicy
from pdserve.client import Client
from pdserve.errors import (
    AlreadyExistsError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from pdserve.launcher import ClusterSpec, launch
from pdserve.openai_api.server import OpenAIServer, ServerConfig
from tests.integration.tenant_cache import LONG, REUSE_TOKENS, chat_usage, own_bound, post

BLOCK = 16  # ClusterSpec.block_size
# repeats of a prompt until it must be found cached: one per worker that can prefill it (prefill-0,
# and decode-0 prefilling locally), the last then lands where an earlier one ran
REUSE_TRIES = 3


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("auth") / "keys.yaml"
    store = FileKeyStore(path, create=True)
    out: dict[str, Any] = {"path": str(path), "store": store}
    for tenant in ("alice", "bob", "pub1", "pub2", "pub3", "pub4", "lim"):
        out[tenant] = issue_key(store, tenant)[0]
    for member in ("pub1", "pub2", "pub3", "pub4"):
        store.put_policy(member, TenantPolicy(salt_group="public"))
    store.put_policy("lim", TenantPolicy(max_inflight=1))
    return out


@pytest.fixture(scope="module")
def cluster(smollm_path: Path, keys: dict[str, Any]):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=512,
            store_capacity_blocks=1024,
            router_args=("--api-keys", keys["path"]),
            startup_timeout_s=600,  # a loaded shared machine starts workers slowly
        )
    )
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def http(cluster, keys: dict[str, Any]):
    srv = OpenAIServer(
        ServerConfig(router=cluster.router_address, port=0, request_timeout_s=60, api_keys=keys["path"])
    ).start()
    yield srv
    srv.close()


def client(cluster, key: str | None) -> Client:
    return Client(cluster.router_address, timeout=60, api_key=key)


def cached(cluster, key: str, prompt: str, **kw: Any) -> int:
    with client(cluster, key) as c:
        return c.complete(prompt, max_tokens=2, **kw).finish.cached_prompt_tokens


def reused(hit) -> list[int]:
    """``hit()`` (one request of a prompt already sent) repeated until it finds more than
    ``REUSE_TOKENS`` cached, at most ``REUSE_TRIES`` times: the hits."""
    hits = [hit()]
    while hits[-1] <= REUSE_TOKENS and len(hits) < REUSE_TRIES:
        hits.append(hit())
    return hits


def fresh_key(keys: dict[str, Any], what: str) -> str:
    """The key of a new tenant that never sent a request: any prefix it finds is not its own."""
    n = keys.setdefault("_fresh", 0)
    keys["_fresh"] = n + 1
    return issue_key(keys["store"], f"fresh-{what}-{n}")[0]


@pytest.fixture(scope="module")
def tok(smollm_path: Path) -> Tokenizer:
    return Tokenizer(smollm_path)


def test_grpc_keys_missing_wrong_revoked_rotated(cluster, keys) -> None:
    for key in (None, "pdsk_0123456789ab_" + "A" * 43, "not-a-key", keys["alice"][:-2] + "zz"):
        with client(cluster, key) as c, pytest.raises(UnauthenticatedError):
            c.complete("Hi", max_tokens=1)
    assert cached(cluster, keys["alice"], "Hi") >= 0  # a valid key works
    new_key, rec = issue_key(keys["store"], "carol")  # rotation: no restart
    with client(cluster, new_key) as c:
        assert c.complete("Hi", max_tokens=1).finish.completion_tokens == 1
        revoke_key(keys["store"], rec.key_id)
        with pytest.raises(UnauthenticatedError, match="revoked"):
            c.complete("Hi", max_tokens=1)


def test_http_keys_missing_wrong_revoked(http, keys) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    for key in (None, "nope", "pdsk_0123456789ab_" + "A" * 43):
        status, headers, err = post(http, body, key)
        assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
        assert set(err["error"]) == {"message", "type", "param", "code"}
        assert err["error"]["code"] == "invalid_api_key"
    status, _, ok = post(http, body, keys["bob"])
    assert status == 200 and ok["choices"][0]["message"]["role"] == "assistant"
    k, rec = issue_key(keys["store"], "dave")
    assert post(http, body, k)[0] == 200
    revoke_key(keys["store"], rec.key_id)
    assert post(http, body, k)[0] == 401


def test_prefix_cache_does_not_cross_tenants_grpc(cluster, keys) -> None:
    prompt = "grpc " + LONG
    assert cached(cluster, keys["alice"], prompt) == 0
    hits = reused(lambda: cached(cluster, keys["alice"], prompt))
    assert hits[-1] > REUSE_TOKENS, hits  # alice's own prefix is reused
    # bob learns nothing about alice's prompt (none of his prompts shares its first block)
    assert cached(cluster, keys["bob"], prompt) == 0
    assert cached(cluster, fresh_key(keys, "grpc"), prompt) == 0
    for salt in ("alice", "s1:", "tenant"):  # no client salt reaches alice's partition (first uses)
        assert cached(cluster, keys["bob"], prompt, cache_salt=salt) == 0
    with client(cluster, keys["bob"]) as c, pytest.raises(PermissionDeniedError):
        c.complete(prompt, max_tokens=1, tenant="alice")  # nor does naming her tenant
    # a client salt partitions within the tenant
    assert cached(cluster, keys["alice"], prompt, cache_salt="session-2") == 0


def test_prefix_cache_does_not_cross_tenants_http(http, keys, tok) -> None:
    def hit(key: str, content: str) -> int:
        prompt_tokens, n = chat_usage(http, key, content)
        assert prompt_tokens == len(ids(content))
        return n

    def ids(content: str) -> list[int]:
        return tok.encode_chat([{"role": "user", "content": content}])

    probe = "http " + LONG
    # what bob's own chats (here and test_http_keys_missing_wrong_revoked's) share with the probe:
    # the chat template's first block, on whichever worker served them
    template = own_bound(ids(probe), [ids("Hi"), ids("unrelated " + LONG)], BLOCK)
    assert 0 < template < REUSE_TOKENS
    assert hit(keys["bob"], "unrelated " + LONG) <= template
    assert hit(keys["alice"], probe) == 0  # her first chat: not even bob's template block
    hits = reused(lambda: hit(keys["alice"], probe))
    assert hits[-1] > REUSE_TOKENS, hits
    assert hit(keys["bob"], probe) <= template  # at most his own template block: nothing of alice's
    assert hit(fresh_key(keys, "http"), probe) == 0  # no history: not even the template


def test_shared_salt_group_shares(cluster, keys) -> None:
    prompt = "public system prompt " + LONG
    assert cached(cluster, keys["pub1"], prompt) == 0
    # each member's *first* request of the prompt: a hit can only be another member's blocks, and
    # one of them lands where an earlier member's request ran
    hits = [cached(cluster, keys[m], prompt) for m in ("pub2", "pub3", "pub4")]
    assert max(hits) > REUSE_TOKENS, hits  # the configured group shares
    assert cached(cluster, keys["alice"], prompt) == 0  # and only the group
    assert cached(cluster, fresh_key(keys, "group"), prompt) == 0


def test_request_id_collision_refused_original_unaffected(cluster, keys) -> None:
    prompt = "Count slowly: one, two, three"
    with client(cluster, keys["alice"]) as c:
        ref = c.complete(prompt, max_tokens=24, ignore_eos=True, temperature=0.0, request_id="reference")
        stream = c.generate(prompt, max_tokens=24, ignore_eos=True, temperature=0.0, request_id="dup")
        it = iter(stream)
        first = next(it)  # in flight now
        for _ in range(3):
            with pytest.raises(AlreadyExistsError) as e:
                c.complete("other", max_tokens=1, request_id="dup")
            assert "dup" in str(e.value) and ref.text not in str(e.value)
        with client(cluster, keys["bob"]) as cb:  # ids are scoped by tenant
            assert cb.complete("x", max_tokens=1, request_id="dup").finish.completion_tokens == 1
        rest = list(it)
        ids = list(first.token_ids) + [t for ch in rest for t in ch.token_ids]
        assert ids == ref.token_ids and rest[-1].finish is not None
        assert first.request_id == "dup"  # the client sees its own id
        # finished: the id may be used again
        assert c.complete(prompt, max_tokens=1, request_id="dup").finish.completion_tokens == 1


def test_http_request_id_collision_is_409(http, keys) -> None:
    body = {
        "messages": [{"role": "user", "content": "Tell a long story"}],
        "max_tokens": 32,
        "ignore_eos": True,
        "stream": True,
    }
    hdrs = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {keys['alice']}",
        "X-Request-Id": "h1",
    }
    conn = http_client.HTTPConnection(http.host, http.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), hdrs)
        resp = conn.getresponse()  # headers come after the router's first message: in flight
        assert resp.status == 200
        status, _, err = post(
            http, {**body, "stream": False, "max_tokens": 1}, keys["alice"], **{"X-Request-Id": "h1"}
        )
        assert status == 409 and err["error"]["code"] == "conflict"
        assert (
            post(http, {**body, "stream": False, "max_tokens": 1}, keys["bob"], **{"X-Request-Id": "h1"})[0]
            == 200
        )
        events = resp.read().decode()
        assert events.rstrip().endswith("data: [DONE]") and '"finish_reason":"length"' in events
    finally:
        conn.close()
    assert (
        post(http, {**body, "stream": False, "max_tokens": 1}, keys["alice"], **{"X-Request-Id": "h1"})[0]
        == 200
    )


def test_tenant_inflight_quota(cluster, keys) -> None:
    with client(cluster, keys["lim"]) as c:
        it = iter(c.generate("Hello there", max_tokens=24, ignore_eos=True))
        next(it)
        with pytest.raises(ResourceExhaustedError, match="max_inflight 1"):
            c.complete("Hi", max_tokens=1)
        list(it)
        assert c.complete("Hi", max_tokens=1).finish.completion_tokens == 1
