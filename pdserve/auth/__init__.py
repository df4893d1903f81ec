"""Edge authentication and tenant isolation (issue #13).

* :mod:`pdserve.auth.keys`: API keys (stored hashed) in a file or Redis, rotatable live;
* :mod:`pdserve.auth.tenants`: tenants and their limits (:class:`TenantPolicy`);
* :mod:`pdserve.auth.quota`: per-tenant in-flight and rate limits (fake-clock testable);
* :mod:`pdserve.auth.idempotency`: cluster request ids; client ids as per-tenant idempotency keys;
* :mod:`pdserve.auth.salt`: the cache salt, derived so prefix reuse never crosses tenants;
* :mod:`pdserve.auth.validate`: input limits checked before any work;
* :mod:`pdserve.auth.edge`: the one object a front end calls (:class:`EdgeAuth`).

All of it is pure policy (no grpc, no sockets); Redis is imported only by the Redis store.
"""

from pdserve.auth.edge import EdgeAuth, EdgeConfig, EdgeRequest, check_listen_address, is_loopback
from pdserve.auth.keys import (
    FileKeyStore,
    KeyStore,
    MemoryKeyStore,
    RedisKeyStore,
    authenticate,
    open_key_store,
)
from pdserve.auth.tenants import AuthMode, Principal, TenantPolicy

__all__ = [
    "AuthMode",
    "EdgeAuth",
    "EdgeConfig",
    "EdgeRequest",
    "FileKeyStore",
    "KeyStore",
    "MemoryKeyStore",
    "Principal",
    "RedisKeyStore",
    "TenantPolicy",
    "authenticate",
    "check_listen_address",
    "is_loopback",
    "open_key_store",
]
