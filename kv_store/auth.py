"""Who may call a store node: the cluster identity check of the ``KVStore`` service.

A store node asks an :class:`Authorizer` about every call (reads included: a block's key is
computable from a guessed prompt, so Exists/Lookup/Get would tell an outsider whether a prompt was
sent, and Put/Delete/Lease let it poison, drop or pin KV). The answer is a :class:`Caller`
(allowed or not, and an identity used as the default lease owner). Refused calls end with
UNAUTHENTICATED and are counted (``KVStoreStats.denied_calls``).

:class:`TokenAuthorizer` (the default, :func:`authorizer_for`): the caller must present the cluster
token in call metadata ``x-pdserve-cluster-token`` (:data:`TOKEN_METADATA_KEY`), compared in
constant time (:func:`hmac.compare_digest`). The token comes from ``--cluster-token-file`` or
the environment (``PDSERVE_CLUSTER_TOKEN_FILE``, else ``PDSERVE_CLUSTER_TOKEN``:
:func:`cluster_token_from_env`); clients send it by themselves
(:class:`kv_store.client.KVStoreClient` reads the same variables). **Development mode:** with no
token configured, a node bound to a loopback address allows every caller (only processes on the
same machine can reach it); a node bound to any other address refuses to start without a token
(:func:`authorizer_for` raises, naming the flag). The metadata key and variables are the ones
:mod:`pdserve.security` uses for every internal service, so one token serves the whole cluster.

:class:`FakeAuthorizer` is the test double: allow or deny by a predicate on the metadata.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pdserve.errors import InvalidRequestError

TOKEN_METADATA_KEY = "x-pdserve-cluster-token"
LEASE_OWNER_METADATA_KEY = "x-pdserve-lease-owner"  # who a lease is charged to (a tenant, a worker)
TENANT_OWNER_PREFIX = "tenant:"  # a lease owner naming a tenant (quota: max_leased_blocks_per_tenant)
MAX_OWNER_CHARS = 192  # "tenant:" + a 128-character tenant name fits
ENV_TOKEN = "PDSERVE_CLUSTER_TOKEN"
ENV_TOKEN_FILE = "PDSERVE_CLUSTER_TOKEN_FILE"


class AuthConfigError(InvalidRequestError):
    """The node's access settings cannot be honoured (no token off loopback, unreadable file)."""


@dataclass(frozen=True)
class Caller:
    """The authorizer's answer for one call: ``allowed``, and ``identity`` (stable name of the
    caller: the default owner of its leases); ``reason`` says why a call is refused."""

    allowed: bool
    identity: str = ""
    reason: str = ""


class Authorizer(Protocol):
    """Decides whether the caller of a store call is a cluster member."""

    def authorize(self, context: Any) -> Caller:
        """``context``: the call's ``grpc.ServicerContext`` (metadata, peer)."""
        ...


def metadata_value(context: Any, key: str) -> str | None:
    """The first value of metadata ``key`` of a call (None when absent)."""
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def peer_host(context: Any) -> str:
    """The caller's host from ``context.peer()`` ("ipv4:127.0.0.1:5555" -> "127.0.0.1")."""
    peer = str(context.peer() or "")
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]") or rest
    return peer


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is loopback only."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TokenAuthorizer:
    """Members present ``token`` in metadata :data:`TOKEN_METADATA_KEY`; ``token=""`` (dev mode,
    loopback only: see :func:`authorizer_for`) allows everyone."""

    token: str = field(default="", repr=False)

    def authorize(self, context: Any) -> Caller:
        who = peer_host(context)
        if not self.token:
            return Caller(True, who)
        presented = metadata_value(context, TOKEN_METADATA_KEY)
        if presented is None:
            return Caller(False, who, f"no cluster token (metadata {TOKEN_METADATA_KEY})")
        if not hmac.compare_digest(presented.encode(), self.token.encode()):
            return Caller(False, who, f"wrong cluster token (metadata {TOKEN_METADATA_KEY})")
        return Caller(True, who)


@dataclass
class FakeAuthorizer:
    """Test double: ``allow(metadata dict) -> bool``; records every decision in ``calls``."""

    allow: Callable[[Mapping[str, str]], bool] = lambda md: True
    calls: list[bool] = field(default_factory=list)

    def authorize(self, context: Any) -> Caller:
        md = {
            k: (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in (context.invocation_metadata() or ())
        }
        ok = bool(self.allow(md))
        self.calls.append(ok)
        return Caller(ok, peer_host(context), "" if ok else "refused by the test authorizer")


def read_token_file(path: str) -> str:
    """The token in ``path`` (surrounding whitespace stripped; missing/empty is an error)."""
    try:
        tok = Path(path).read_text().strip()
    except OSError as e:
        raise AuthConfigError(
            f"cannot read the cluster token file {path!r} (--cluster-token-file): {e}"
        ) from None
    if not tok:
        raise AuthConfigError(f"the cluster token file {path!r} (--cluster-token-file) is empty")
    return tok


def cluster_token_from_env(env: Mapping[str, str] | None = None) -> str:
    """The cluster token from ``PDSERVE_CLUSTER_TOKEN_FILE`` (a file) or ``PDSERVE_CLUSTER_TOKEN``
    (the token itself); "" when neither is set."""
    e = os.environ if env is None else env
    path = e.get(ENV_TOKEN_FILE, "")
    if path:
        return read_token_file(path)
    return e.get(ENV_TOKEN, "").strip()


def resolve_token(token_file: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """``--cluster-token-file`` when given, else the environment (:func:`cluster_token_from_env`)."""
    return read_token_file(token_file) if token_file else cluster_token_from_env(env)


def authorizer_for(host: str, token: str) -> TokenAuthorizer:
    """The default authorizer of a node bound to ``host``: token check when ``token`` is set;
    without one, development mode on loopback, else :class:`AuthConfigError` (refuse to start)."""
    if not token and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to serve the KV store on {host!r} without a cluster token: anyone reaching it "
            f"could read, delete, poison or pin KV. Pass --cluster-token-file FILE (or set {ENV_TOKEN} / "
            f"{ENV_TOKEN_FILE}) on every pdserve process, or bind 127.0.0.1 for local development"
        )
    return TokenAuthorizer(token)


def token_metadata(token: str, lease_owner: str = "") -> tuple[tuple[str, str], ...]:
    """Call metadata a store client sends: the token (when set) and the lease owner (when set)."""
    md: list[tuple[str, str]] = []
    if token:
        md.append((TOKEN_METADATA_KEY, token))
    if lease_owner:
        md.append((LEASE_OWNER_METADATA_KEY, lease_owner))
    return tuple(md)


def check_owner(owner: str) -> str:
    """A lease owner name: printable, at most :data:`MAX_OWNER_CHARS` characters."""
    if len(owner) > MAX_OWNER_CHARS or not owner.isprintable():
        raise InvalidRequestError(
            f"lease owner must be printable and at most {MAX_OWNER_CHARS} characters, got {owner[:40]!r}"
        )
    return owner


def tenant_owner(tenant: str) -> str:
    """The lease owner that charges a lease to ``tenant`` ("" = the anonymous dev-mode tenant):
    ``tenant:<name>``, a namespace of its own, so a tenant never shares a quota with a caller
    identity (a host) of the same spelling. The router sets the tenant from the authenticated
    API key; the prefill worker passes it on with the handoff lease."""
    return check_owner(TENANT_OWNER_PREFIX + tenant)


def owner_tenant(owner: str) -> str | None:
    """The tenant a lease owner names (:func:`tenant_owner`), None for any other owner."""
    return owner[len(TENANT_OWNER_PREFIX) :] if owner.startswith(TENANT_OWNER_PREFIX) else None
