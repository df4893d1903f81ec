"""Tenants and their limits (pure: no I/O).

A :class:`Principal` is who a request runs as: a tenant name, that tenant's :class:`TenantPolicy`,
and how it was established (:class:`AuthMode`: an API key, or the dev-mode request field). Every
limit lives in the policy, so one key store row says everything the edge needs to admit a request.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from pdserve.errors import InvalidRequestError

# Tenant and salt-group names: what a key file or `pdserve keys add --tenant` may use.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


class AuthMode(enum.Enum):
    """How the edge established a request's tenant."""

    API_KEY = "api_key"  # a key from the key store named the tenant
    DEV = "dev"  # no key store (loopback only): the request's own tenant / ``user`` field


@dataclass(frozen=True)
class TenantPolicy:
    """Limits of one tenant. ``None`` means "no limit" for the optional ones.

    ``max_inflight``: requests of the tenant running at once (more: RESOURCE_EXHAUSTED; default
    none: set one per tenant with ``pdserve keys tenant NAME --max-inflight N``).
    ``rate_per_s`` / ``burst``: a token bucket of requests (``burst`` = bucket size; default:
    ``max(1, ceil(rate_per_s))``). ``max_lease_ttl_s``: the TTL of the KV store lease taken for
    one of the tenant's requests (how long its handoff may pin store memory; None: the prefill
    worker's default). ``max_prompt_bytes``: UTF-8 bytes of prompt text
    (all chat contents together), checked before tokenizing. ``salt_group``: empty = the
    tenant's prefix cache is private; a name = shared with every tenant configured with the same
    group (e.g. a public system prompt), never with others.
    """

    max_inflight: int | None = None
    rate_per_s: float | None = None
    burst: int | None = None
    max_lease_ttl_s: float | None = None
    max_prompt_bytes: int = 1 << 20
    salt_group: str = ""

    def __post_init__(self) -> None:
        if self.max_inflight is not None and self.max_inflight < 1:
            raise InvalidRequestError(f"max_inflight must be >= 1 (or absent), got {self.max_inflight}")
        if self.rate_per_s is not None and not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise InvalidRequestError(f"rate_per_s must be a number > 0 (or absent), got {self.rate_per_s}")
        if self.burst is not None and (self.burst < 1 or self.rate_per_s is None):
            raise InvalidRequestError("burst must be >= 1 and needs rate_per_s")
        if self.max_lease_ttl_s is not None and not (
            math.isfinite(self.max_lease_ttl_s) and self.max_lease_ttl_s > 0
        ):
            raise InvalidRequestError(f"max_lease_ttl_s must be > 0 (or absent), got {self.max_lease_ttl_s}")
        if self.max_prompt_bytes < 1:
            raise InvalidRequestError(f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")
        if self.salt_group and not NAME_RE.match(self.salt_group):
            raise InvalidRequestError(
                f"salt_group {self.salt_group!r} is not a valid name ({NAME_RE.pattern})"
            )

    @property
    def bucket_size(self) -> int:
        """Requests the rate limiter lets through at once (meaningful when ``rate_per_s`` is set)."""
        if self.burst is not None:
            return self.burst
        return max(1, math.ceil(self.rate_per_s or 1))

    def to_dict(self) -> dict[str, Any]:
        """The policy as a key file / Redis stores it (only fields that differ from the default)."""
        d = TenantPolicy()
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(d, f.name)
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "tenant policy") -> TenantPolicy:
        """Parse a policy; unknown keys and wrong types are refused naming ``where``."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise InvalidRequestError(f"{where} must be a mapping, got {type(raw).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise InvalidRequestError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            if k == "salt_group":
                if not isinstance(v, str):
                    raise InvalidRequestError(f"{where}: salt_group must be a string")
            elif k in ("max_inflight", "burst", "max_prompt_bytes"):
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise InvalidRequestError(f"{where}: {k} must be an integer, got {v!r}")
            elif v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                raise InvalidRequestError(f"{where}: {k} must be a number, got {v!r}")
            kw[k] = v
        try:
            return cls(**kw)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"{where}: {e.message}") from None


def check_name(name: str, what: str = "tenant") -> str:
    """``name`` if it is a valid tenant / group name, else InvalidRequestError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidRequestError(
            f"{what} name {name!r} is not valid: 1-128 characters of letters, digits and ._@:- "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class Principal:
    """Who a request runs as. ``key_id`` names the API key used (None in dev mode)."""

    tenant: str
    policy: TenantPolicy
    mode: AuthMode
    key_id: str | None = None
