"""The worker token on the wire (shared by the router, which issues it, and the workers, which
present it; pure, no grpc).

A router that verifies workers (:mod:`router.worker_verify`) returns a random token in the
trailing metadata :data:`WORKER_TOKEN_MD` of a successful Register; the worker sends it back in
the same metadata key with every Heartbeat, Deregister and re-Register, proving it is the worker
that registered. A router that does not verify issues none, and the worker sends none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

WORKER_TOKEN_MD = "x-pdserve-worker-token"


def worker_token_from(metadata: Iterable[Any] | None) -> str | None:
    """The worker token in gRPC metadata (invocation or trailing; pairs or objects with
    key/value), or None."""
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else (item[0], item[1])
        if k == WORKER_TOKEN_MD:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def worker_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata a worker sends with Heartbeat / Deregister (empty before it got a token)."""
    return ((WORKER_TOKEN_MD, token),) if token else ()
