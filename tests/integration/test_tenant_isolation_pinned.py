"""The prefix cache does not cross tenants with the KV handoff priced (``python -m router
--price-handoff``) and placement *pinned*, so that no assertion here can pass or fail by where a
request happens to run (the real SmolLM2-135M cluster with API keys, loopback):

* ``remote-only``: one prefill worker and ``--local-prefill-max-tokens 0``: every prompt is
  prefilled on prefill-0 (and its blocks published to the store);
* ``local-only``: ``--policy colocated``: every prompt is prefilled on decode-0 itself (the same
  local-prefill path of the decode worker the goodput policy takes for a short prompt; a router
  needs a prefill worker registered to serve at all, so prefill-0 runs, idle). ``--price-handoff``
  is the goodput policy's and is refused under colocated, so this case runs without it.

Every request's placement is checked (:class:`tests.integration.tenant_cache.Placement`: the
worker whose prefill counter grew is the pinned one), so the tenant whose prefix is shown cached
and the tenant that must not find it were served by the same worker, with the same cache. There
exact values hold: a tenant's own repeat hits (> 4 blocks); another tenant gets 0, or over HTTP
exactly the chat template's block(s) its own earlier request left there; a tenant that never
sent anything gets 0; tenants of one salt group share.

This settles the failures test_tenant_isolation.py showed with ``--price-handoff`` on (bob found
16 tokens after alice's identical prompt, alice's own prefix missed): placement, not a
cross-tenant hit (the spread of requests over prefill-0 and a local prefill on decode-0).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine.tokenizer import Tokenizer
from pdserve.auth.keys import FileKeyStore, issue_key
from pdserve.auth.tenants import TenantPolicy
from pdserve.client import Client
from pdserve.launcher import ClusterSpec, LocalCluster, launch
from pdserve.openai_api.server import OpenAIServer, ServerConfig
from tests.integration.tenant_cache import (
    LONG,
    REUSE_TOKENS,
    Placement,
    chat_usage,
    shared_prefix_tokens,
)

BLOCK = 16  # ClusterSpec.block_size


@dataclass(frozen=True)
class Pinning:
    """A cluster shape whose every prefill runs on one known worker."""

    num_prefill: int
    router_args: tuple[str, ...]
    prefiller: str  # the worker that prefills every request


PINNINGS = {
    "remote-only": Pinning(1, ("--price-handoff", "--local-prefill-max-tokens", "0"), "prefill-0"),
    "local-only": Pinning(1, ("--policy", "colocated"), "decode-0"),
}


@dataclass
class Pinned:
    """The running cluster of one pinning, its OpenAI server, tenants' keys and the tokenizer."""

    cluster: LocalCluster
    http: OpenAIServer
    store: FileKeyStore
    keys: dict[str, str]
    tok: Tokenizer
    prefiller: str
    placement: Placement
    _fresh: Iterator[int] = field(default_factory=itertools.count)

    def fresh(self, what: str) -> str:
        """The key of a new tenant that has never sent a request (any hit it sees is not its own)."""
        return issue_key(self.store, f"fresh-{what}-{next(self._fresh)}")[0]

    def _pinned(self, where: set[str]) -> None:
        assert where == {self.prefiller}, f"prefilled on {sorted(where)}, pinned to {self.prefiller}"

    def grpc(self, key: str, prompt: str, **kw: Any) -> int:
        """Cached prompt tokens of a 2-token gRPC completion of ``prompt`` (placement checked)."""
        with Client(self.cluster.router_address, timeout=60, api_key=key) as c:
            done, where = self.placement.run(lambda: c.complete(prompt, max_tokens=2, **kw).finish)
        self._pinned(where)
        assert done.prompt_tokens == len(self.tok.encode(prompt))
        return done.cached_prompt_tokens

    def chat_ids(self, content: str) -> list[int]:
        return self.tok.encode_chat([{"role": "user", "content": content}])

    def chat(self, key: str, content: str) -> int:
        """Cached prompt tokens of a 2-token HTTP chat completion (placement checked)."""
        (prompt_tokens, hit), where = self.placement.run(lambda: chat_usage(self.http, key, content))
        self._pinned(where)
        assert prompt_tokens == len(self.chat_ids(content))
        return hit


@pytest.fixture(scope="module", params=list(PINNINGS))
def pinned(request, smollm_path: Path, tmp_path_factory) -> Iterator[Pinned]:
    pin = PINNINGS[request.param]
    path = tmp_path_factory.mktemp("auth") / "keys.yaml"
    store = FileKeyStore(path, create=True)
    keys = {t: issue_key(store, t)[0] for t in ("alice", "bob", "pub1", "pub2")}
    for t in ("pub1", "pub2"):
        store.put_policy(t, TenantPolicy(salt_group="public"))
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            num_prefill=pin.num_prefill,
            worker_kv_blocks=512,
            store_capacity_blocks=1024,
            block_size=BLOCK,
            # no progress deadline: on a loaded shared host a step can take seconds, and a
            # stalled-worker verdict would fail a request that placement is not about
            router_args=(
                "--api-keys",
                str(path),
                "--progress-timeout-s",
                "0",
                *pin.router_args,
            ),
            startup_timeout_s=600,  # a loaded shared machine starts workers slowly
        )
    )
    srv = None
    try:
        srv = OpenAIServer(
            ServerConfig(router=cl.router_address, port=0, request_timeout_s=60, api_keys=str(path))
        ).start()
        yield Pinned(cl, srv, store, keys, Tokenizer(smollm_path), pin.prefiller, Placement(cl.workers))
    finally:
        if srv is not None:
            srv.close()
        cl.stop()


def test_grpc_prefix_does_not_cross_tenants(pinned: Pinned) -> None:
    p, k = pinned, pinned.keys
    prompt = "grpc " + LONG
    assert p.grpc(k["bob"], "bob's own " + LONG) == 0  # bob has a history here, none of it shared
    assert p.grpc(k["alice"], prompt) == 0
    assert p.grpc(k["alice"], prompt) > REUSE_TOKENS  # on the same worker: alice's prefix is there
    assert p.grpc(k["bob"], prompt) == 0  # ... and bob, served there too, finds none of it
    assert p.grpc(p.fresh("grpc"), prompt) == 0
    for salt in ("alice", "s1:", "tenant"):  # no client salt reaches alice's partition
        assert p.grpc(k["bob"], prompt, cache_salt=salt) == 0
    assert p.grpc(k["alice"], prompt, cache_salt="session-2") == 0  # a client salt partitions


def test_http_prefix_does_not_cross_tenants(pinned: Pinned) -> None:
    p, k = pinned, pinned.keys
    probe = "http " + LONG
    # what bob's own requests leave that the probe shares: the chat template's first block(s)
    template = shared_prefix_tokens(p.chat_ids("unrelated " + LONG), p.chat_ids(probe), BLOCK)
    assert 0 < template < REUSE_TOKENS
    p.chat(k["bob"], "unrelated " + LONG)
    assert p.chat(k["bob"], "unrelated, too: " + LONG) == template  # bob's own block is found
    assert p.chat(k["alice"], probe) == 0  # alice has no chat history: not even the template
    assert p.chat(k["alice"], probe) > REUSE_TOKENS
    assert p.chat(k["bob"], probe) == template  # his own template block, nothing of alice's
    assert p.chat(p.fresh("http"), probe) == 0  # a tenant with no history: not even the template


def test_shared_salt_group_shares_and_only_it(pinned: Pinned) -> None:
    p, k = pinned, pinned.keys
    prompt = "public system prompt " + LONG
    assert p.grpc(k["pub1"], prompt) == 0
    assert p.grpc(k["pub2"], prompt) > REUSE_TOKENS  # pub2's first request: the group's blocks
    assert p.grpc(k["alice"], prompt) == 0
    assert p.grpc(p.fresh("group"), prompt) == 0
