"""Direct-stream tickets (issue #12, proto/pdserve/v1/direct.proto): the capability a router gives a
client to take one request's tokens straight from one decode worker.

A ticket is ``<payload>.<mac>``, both URL-safe base64 without padding: the payload is the JSON of
:class:`TicketClaims` (request id, worker id, tenant, expiry in wall-clock seconds), the mac its
HMAC-SHA256 under the cluster's ticket key (:func:`ticket_key`: derived from the cluster token when
one is configured, so every router and worker of a cluster agrees; otherwise a key of this router
process). The router also hands the ticket to the decode worker over its authenticated internal
channel (``DirectGrant.ticket``), so a worker checks a presented ticket against the one it was
given (constant time) and, holding the key, its signature; then its claims (:meth:`TicketSigner.verify`).

Pure code: no I/O, the clock is a parameter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from pdserve.errors import PermissionDeniedError

_KEY_LABEL = b"pdserve direct-stream ticket v1"


@dataclass(frozen=True)
class TicketClaims:
    """What a ticket binds: the request (cluster id), the decode worker, the tenant, and the
    wall-clock time (``time.time()`` seconds) after which it may not be used to attach."""

    request_id: str
    worker_id: str
    tenant: str
    expires_at: float


def ticket_key(cluster_token: str) -> bytes:
    """The cluster's ticket key: HMAC-SHA256 of a fixed label under the cluster token (every
    process holding the token derives the same key, and the key reveals nothing of the token);
    with no token, a random key (valid within this process only)."""
    if cluster_token:
        return hmac.new(cluster_token.encode(), _KEY_LABEL, hashlib.sha256).digest()
    return os.urandom(32)


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


class TicketSigner:
    """Mints and verifies tickets under ``key`` (32 bytes or more)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError(f"a ticket key needs at least 32 bytes, got {len(key)}")
        self._key = key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def mint(self, claims: TicketClaims) -> str:
        """The ticket of ``claims``."""
        payload = json.dumps(
            [claims.request_id, claims.worker_id, claims.tenant, claims.expires_at], separators=(",", ":")
        ).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(
        self, ticket: str, *, request_id: str, worker_id: str, tenant: str, now: float
    ) -> TicketClaims:
        """The claims of ``ticket`` when its signature is this key's and it binds ``request_id``,
        ``worker_id`` and ``tenant`` and has not expired at ``now``; else
        :class:`PermissionDeniedError` naming what failed."""
        claims = decode_unverified(ticket)
        payload = _unb64(ticket.split(".", 1)[0])
        mac = _unb64(ticket.split(".", 1)[1])
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise PermissionDeniedError("direct-stream ticket refused: bad signature")
        check_claims(claims, request_id=request_id, worker_id=worker_id, tenant=tenant, now=now)
        return claims


def decode_unverified(ticket: str) -> TicketClaims:
    """The claims ``ticket`` states, its signature NOT checked; PermissionDeniedError when it is
    malformed."""
    try:
        payload_s, mac_s = ticket.split(".", 1)
        _unb64(mac_s)
        rid, worker, tenant, exp = json.loads(_unb64(payload_s))
        if not (isinstance(rid, str) and isinstance(worker, str) and isinstance(tenant, str)):
            raise ValueError("claims are not strings")
        return TicketClaims(rid, worker, tenant, float(exp))
    except (ValueError, TypeError) as e:
        raise PermissionDeniedError(f"direct-stream ticket refused: malformed ({e})") from None


def check_claims(claims: TicketClaims, *, request_id: str, worker_id: str, tenant: str, now: float) -> None:
    """PermissionDeniedError naming the first claim of ``claims`` that does not hold."""
    if claims.request_id != request_id:
        raise PermissionDeniedError(
            f"direct-stream ticket refused: it is for request {claims.request_id!r}, not {request_id!r}"
        )
    if claims.worker_id != worker_id:
        raise PermissionDeniedError(
            f"direct-stream ticket refused: it is for decode worker {claims.worker_id!r}, not {worker_id!r}"
        )
    if claims.tenant != tenant:
        raise PermissionDeniedError("direct-stream ticket refused: it is for another tenant")
    if now > claims.expires_at:
        raise PermissionDeniedError(
            f"direct-stream ticket refused: expired {now - claims.expires_at:.1f}s ago"
        )
