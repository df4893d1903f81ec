"""The cache salt a request's KV block keys are made with (pure).

Block keys (``engine.block_hash``) mix in a salt, so prefix reuse happens only between requests
with the same salt. The client must not choose it: the router derives it from the *scope* the
tenant's policy gives (its own tenant name, or the shared ``salt_group`` configured for it) and
the client's ``cache_salt``, which can therefore only partition further *within* that scope:

    salt = "s1:" + hex(HMAC-SHA256(secret, "pdserve-cache-salt-v1" + field(kind) + field(scope)
                                           + field(client_salt)))[:32]

with ``field(x) = u32_be(len(x.utf8)) + x.utf8`` (length-prefixed, so no two different triples
encode alike) and ``kind`` = ``"tenant"`` or ``"group"`` (a tenant named like a group never
shares its scope). Distinct inputs give distinct salts (up to a 128-bit collision), so no value of
``cache_salt`` reaches another tenant's blocks. ``secret`` (optional, the same on every router of
a cluster) additionally makes salts unguessable outside the cluster; it is not needed for
isolation, which the derivation alone provides.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from pdserve.auth.tenants import Principal

SALT_VERSION = "s1:"
_DOMAIN = b"pdserve-cache-salt-v1"


def _field(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return struct.pack(">I", len(b)) + b


def effective_salt(p: Principal, client_salt: str = "", secret: bytes = b"") -> str:
    """The salt for ``p``'s request carrying ``client_salt`` (see the module doc)."""
    return tenant_salt(p.tenant, client_salt, secret, p.policy.salt_group)


def tenant_salt(tenant: str, client_salt: str = "", secret: bytes = b"", salt_group: str = "") -> str:
    """The salt of ``tenant``'s requests (or of its ``salt_group``) carrying ``client_salt``: what
    tools and tests use to compute a request's block keys as the router does (e.g. a dev-mode
    request with no tenant: ``tenant_salt("")``)."""
    kind, scope = ("group", salt_group) if salt_group else ("tenant", tenant)
    msg = _DOMAIN + _field(kind) + _field(scope) + _field(client_salt)
    return SALT_VERSION + hmac.new(secret, msg, hashlib.sha256).hexdigest()[:32]
