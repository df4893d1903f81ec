"""Edge authentication: from a request's credentials to its :class:`Principal` (pure).

One :class:`EdgeAuth` per front end (the router's gRPC Generate service; the OpenAI HTTP server
forwards the caller's key to it). :meth:`EdgeAuth.principal` is the one call a servicer makes:

* with a key store: the request must carry ``authorization: Bearer <key>`` (gRPC metadata; the
  HTTP ``Authorization`` header, forwarded as is). Missing, malformed, unknown, wrong or revoked
  keys are UnauthenticatedError (gRPC UNAUTHENTICATED, HTTP 401). The tenant is the key's; a
  request that names another tenant in its ``tenant`` field is refused (PERMISSION_DENIED)
  rather than silently re-labelled.
* without one (dev mode, loopback only: :func:`check_listen_address`): every request is let in;
  its tenant is the request's own ``tenant`` field (over HTTP: ``user``), so tenants, and
  therefore prefix caches, stay apart by that field even in development. A bearer header is
  ignored in dev mode (OpenAI clients always send one).

:meth:`EdgeAuth.begin` then applies everything else the principal implies, in this order, before
any work is spent: input limits (:mod:`pdserve.auth.validate`), the tenant's quotas
(:mod:`pdserve.auth.quota`), the request-id claim (:mod:`pdserve.auth.idempotency`), and derives
the cache salt (:mod:`pdserve.auth.salt`). It returns an :class:`EdgeRequest` that must be
closed when the request ends (a context manager).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pdserve.auth.idempotency import IdempotencyTable, Ticket
from pdserve.auth.keys import KeyStore, authenticate
from pdserve.auth.quota import Admission, TenantGate
from pdserve.auth.salt import effective_salt
from pdserve.auth.tenants import AuthMode, Principal, TenantPolicy
from pdserve.auth.validate import check_name_field, validate_generate_request
from pdserve.errors import InvalidRequestError, PermissionDeniedError, UnauthenticatedError

AUTH_METADATA = "authorization"  # gRPC metadata keys are lower case
BEARER = "bearer"


def bearer_token(value: str | None) -> str | None:
    """The key in an ``Authorization`` value (``Bearer <key>``, scheme case-insensitive); None
    when ``value`` is None. Raises UnauthenticatedError for any other shape."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != BEARER or not token or " " in token:
        raise UnauthenticatedError("the authorization header must be 'Bearer <API key>'")
    return token


def metadata_value(metadata: Iterable[Any] | None, key: str) -> str | None:
    """The first value of ``key`` in gRPC invocation metadata (pairs or objects with key/value)."""
    for item in metadata or ():
        k, v = (item.key, item.value) if hasattr(item, "key") else (item[0], item[1])
        if k.lower() == key:
            return v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for wildcards."""
    h = host.strip().strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_listen_address(host: str, store: KeyStore | None, what: str = "server") -> None:
    """Refuse to serve without a key store anywhere but loopback (dev mode)."""
    if store is None and not is_loopback(host):
        raise InvalidRequestError(
            f"the {what} would listen on {host!r} without API keys: configure a key store "
            "(--api-keys FILE or redis://...; create keys with `pdserve keys add`) or listen on "
            "127.0.0.1 (development only)"
        )


@dataclass(frozen=True)
class EdgeConfig:
    """``salt_secret``: mixed into every cache salt (the same on all routers of a cluster; may be
    empty). ``dev_policy``: the limits of every tenant in dev mode."""

    salt_secret: bytes = b""
    dev_policy: TenantPolicy = TenantPolicy()


class EdgeRequest:
    """An admitted request: its principal, cluster id, effective cache salt and lease TTL.
    :meth:`close` (idempotent) frees its quota slot and its request-id claim."""

    def __init__(self, principal: Principal, salt: str, admission: Admission, ticket: Ticket) -> None:
        self.principal = principal
        self.cache_salt = salt
        self.cluster_id = ticket.cluster_id
        self.lease_ttl_s = principal.policy.max_lease_ttl_s or 0.0  # 0: the worker's default
        self._admission = admission
        self._ticket = ticket

    def apply_to(self, req: Any) -> str:
        """Rewrite a ``GenerateRequest`` for the cluster, in place: ``tenant`` = the principal's,
        ``cache_salt`` = the derived salt, ``request_id`` = the cluster id. Returns the id the
        client should see in responses (its own when it sent one, else the cluster id)."""
        client_id = req.request_id
        req.tenant = self.principal.tenant
        req.cache_salt = self.cache_salt
        req.request_id = self.cluster_id
        return client_id or self.cluster_id

    def close(self) -> None:
        self._ticket.finish()
        self._admission.release()

    def __enter__(self) -> EdgeRequest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EdgeAuth:
    """Authentication, limits, request ids and salts of one front end (thread-safe)."""

    def __init__(
        self,
        store: KeyStore | None,
        config: EdgeConfig = EdgeConfig(),
        gate: TenantGate | None = None,
        ids: IdempotencyTable | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.gate = gate if gate is not None else TenantGate()
        self.ids = ids if ids is not None else IdempotencyTable()

    @property
    def dev_mode(self) -> bool:
        return self.store is None

    def principal(self, authorization: str | None, claimed_tenant: str = "") -> Principal:
        """Who the caller is (see the module doc). ``authorization``: the raw header/metadata
        value or None; ``claimed_tenant``: the request's ``tenant`` (HTTP: ``user``) field."""
        check_name_field(claimed_tenant, "tenant")
        if self.store is None:
            return Principal(claimed_tenant, self.config.dev_policy, AuthMode.DEV)
        key = bearer_token(authorization)
        if key is None:
            raise UnauthenticatedError(
                "this server requires an API key: send the header 'authorization: Bearer <key>'"
            )
        p = authenticate(self.store, key)
        if claimed_tenant and claimed_tenant != p.tenant:
            raise PermissionDeniedError(
                f"the request names tenant {claimed_tenant!r} but its API key belongs to another "
                "tenant; leave 'tenant' empty or send that tenant's key"
            )
        return p

    def principal_from_metadata(self, metadata: Iterable[Any] | None, claimed_tenant: str = "") -> Principal:
        """:meth:`principal` with the ``authorization`` value read from gRPC metadata."""
        return self.principal(metadata_value(metadata, AUTH_METADATA), claimed_tenant)

    def forward_http(self, authorization: str | None, user: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        """For the HTTP front end: the ``tenant`` to put in the GenerateRequest and the gRPC
        metadata to send with it. With a key store the key is checked here (401 before the router
        is contacted) and the tenant is the key's; in dev mode the tenant is ``user``. The
        caller's ``Authorization`` value is forwarded as is, so a router with keys checks it too."""
        md = ((AUTH_METADATA, authorization),) if authorization is not None else ()
        if self.store is None:
            check_name_field(user, "user")
            return user, md
        return self.principal(authorization).tenant, md

    def begin(self, p: Principal, client_request_id: str, client_salt: str) -> EdgeRequest:
        """Admit one request of ``p`` (quota, then request-id claim) and derive its salt. Raises
        ResourceExhaustedError / AlreadyExistsError; on any refusal nothing stays claimed."""
        admission = self.gate.admit(p)
        try:
            ticket = self.ids.begin(p.tenant, client_request_id)
        except BaseException:
            admission.release()
            raise
        return EdgeRequest(p, effective_salt(p, client_salt, self.config.salt_secret), admission, ticket)

    async def begin_async(self, p: Principal, client_request_id: str, client_salt: str) -> EdgeRequest:
        """:meth:`begin` on an event loop: the request-id claim may wait (without blocking the
        loop) when the id is held by another router that may have died (shared state,
        :mod:`pdserve.auth.shared_state`); on any refusal or cancellation nothing stays claimed."""
        admission = self.gate.admit(p)
        try:
            ticket = await self.ids.begin_async(p.tenant, client_request_id)
        except BaseException:
            admission.release()
            raise
        return EdgeRequest(p, effective_salt(p, client_salt, self.config.salt_secret), admission, ticket)

    async def admit_generate_async(self, req: Any, metadata: Iterable[Any] | None) -> EdgeRequest:
        """:meth:`admit_generate` on an event loop (see :meth:`begin_async`)."""
        p = self.principal_from_metadata(metadata, req.tenant)
        validate_generate_request(req, p.policy)
        return await self.begin_async(p, req.request_id, req.cache_salt)

    def admit_generate(self, req: Any, metadata: Iterable[Any] | None) -> EdgeRequest:
        """Everything for one ``pdserve.v1.GenerateRequest``: principal from ``metadata``, input
        limits, quota, request-id claim, salt. The caller closes the returned request."""
        p = self.principal_from_metadata(metadata, req.tenant)
        validate_generate_request(req, p.policy)
        return self.begin(p, req.request_id, req.cache_salt)


def dev_or_store(
    store_spec: str | None, host: str, what: str, opener: Callable[[str], KeyStore]
) -> KeyStore | None:
    """Open the key store named by ``store_spec`` (None: dev mode, only allowed on loopback)."""
    store = opener(store_spec) if store_spec else None
    check_listen_address(host, store, what)
    return store
