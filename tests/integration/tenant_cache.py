"""What the tenant-isolation tests share: prompts long enough that a prefix hit is unmistakable,
the OpenAI HTTP call, the bound a tenant's *own* history puts on its prefix hits, and which
worker prefilled a request (from the workers' Stats counters).

The prefix cache is per worker (and the KV store's blocks reach only prefill workers), so how
many prompt tokens a request finds cached depends on where the router places it: with the KV
handoff priced (``python -m router --price-handoff``) a short prompt may be prefilled on the
decode worker itself, and a tenant's next request on the prefill worker finds nothing of it. A
placement-robust isolation check therefore asserts what placement cannot change:

* a tenant that never sent a request finds nothing cached (any hit is another tenant's);
* a tenant finds at most the full blocks its prompt shares with one of its *own* earlier
  prompts (:func:`shared_prefix_tokens`), whichever worker serves it.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pdserve.openai_api.server import OpenAIServer
from tests.workers import worker_stats

# ~12 full blocks of 16 tokens: a prefix hit is unmistakable
LONG = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(16))
# more than 4 blocks: what "the tenant's prefix was reused" means (the chat template alone is 1)
REUSE_TOKENS = 64


def post(srv: OpenAIServer, body: dict[str, Any], key: str | None, **headers: str) -> tuple[int, dict, Any]:
    """POST ``body`` to ``srv``'s /v1/chat/completions with bearer ``key`` (None: no header):
    (status, headers, parsed JSON body), error statuses included."""
    h = {"Content-Type": "application/json", **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        srv.url + "/v1/chat/completions", json.dumps(body).encode(), h, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), json.loads(e.read())


def chat_usage(srv: OpenAIServer, key: str, content: str) -> tuple[int, int]:
    """One 2-token chat completion of a user message ``content`` as ``key``'s tenant (same end
    user ``user`` field for every tenant): (prompt_tokens, cached_tokens)."""
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "user": "same-end-user"}
    status, _, r = post(srv, body, key)
    assert status == 200, r
    return r["usage"]["prompt_tokens"], r["usage"]["prompt_tokens_details"]["cached_tokens"]


def shared_prefix_tokens(a: Sequence[int], b: Sequence[int], block_size: int) -> int:
    """Tokens in the leading *full* blocks of ``a`` and ``b`` that are equal (only full blocks
    are cached, and a block's key chains its parent's: the first differing block ends reuse)."""
    n = 0
    while n + block_size <= min(len(a), len(b)) and list(a[n : n + block_size]) == list(
        b[n : n + block_size]
    ):
        n += block_size
    return n


def own_bound(ids: Sequence[int], own: Sequence[Sequence[int]], block_size: int) -> int:
    """The most prompt tokens of ``ids`` a request can find cached when the only requests of its
    salt scope so far had prompts ``own`` (nothing else may reach it, wherever it runs)."""
    return max((shared_prefix_tokens(ids, o, block_size) for o in own), default=0)


class Placement:
    """Which workers prefilled the requests made in between :meth:`mark` and :meth:`where`: those
    whose ``prefill_tokens_computed_total`` grew (a prefill computes at least the prompt's last
    token, a decode worker taking a handed-off KV none). For requests made one at a time."""

    def __init__(self, workers: Mapping[str, str]) -> None:
        self.workers = dict(workers)  # worker id -> address
        self._before: dict[str, int] = {}

    def _computed(self) -> dict[str, int]:
        return {w: worker_stats(a).prefill_tokens_computed_total for w, a in self.workers.items()}

    def mark(self) -> None:
        self._before = self._computed()

    def where(self) -> set[str]:
        after = self._computed()
        return {w for w, n in after.items() if n > self._before[w]}

    def run(self, call: Callable[[], Any]) -> tuple[Any, set[str]]:
        """``call()``'s result and the workers that prefilled during it."""
        self.mark()
        out = call()
        return out, self.where()
