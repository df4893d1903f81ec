"""The edge-auth flags, the same on every front end (``python -m router``, ``pdserve openai``).

--api-keys FILE|redis://...   the key store (default $PDSERVE_API_KEYS; none: dev mode, which
                              is allowed only on a loopback listen address)
--api-keys-redis-prefix P     key prefix in Redis
--salt-secret-file FILE       a secret mixed into every cache salt (the same on all routers)
"""

from __future__ import annotations

import argparse
import os

from pdserve.auth.edge import EdgeAuth, EdgeConfig, check_listen_address
from pdserve.auth.keys import DEFAULT_REDIS_PREFIX, open_key_store
from pdserve.errors import InvalidRequestError, UnavailableError
from pdserve.redis_access import is_redis_url

ENV_API_KEYS = "PDSERVE_API_KEYS"
ENV_SALT_SECRET_FILE = "PDSERVE_SALT_SECRET_FILE"


def add_auth_args(p: argparse.ArgumentParser) -> None:
    """Add the edge-auth flags to ``p``."""
    p.add_argument(
        "--api-keys",
        default=os.environ.get(ENV_API_KEYS) or None,
        help=f"API key store: a YAML/JSON file or redis:// URL (`pdserve keys`); default ${ENV_API_KEYS}; "
        "none: dev mode (no keys; tenant = the request's tenant/user field; loopback only)",
    )
    p.add_argument(
        "--api-keys-redis-prefix",
        default=DEFAULT_REDIS_PREFIX,
        help="key prefix of a redis:// key store (refused with a key file or without --api-keys)",
    )
    p.add_argument(
        "--salt-secret-file",
        default=os.environ.get(ENV_SALT_SECRET_FILE) or None,
        help="file holding a secret mixed into every cache salt (use the same on every router)",
    )


def edge_from_args(a: argparse.Namespace, host: str, what: str) -> EdgeAuth:
    """The :class:`EdgeAuth` the flags describe for a front end listening on ``host``
    (:func:`edge_from_config`). InvalidRequestError for ``--api-keys-redis-prefix`` given without a
    Redis key store (only a Redis store reads it)."""
    if a.api_keys_redis_prefix != DEFAULT_REDIS_PREFIX and not is_redis_url(a.api_keys or ""):
        raise InvalidRequestError(
            f"--api-keys-redis-prefix is read with a redis:// key store only (--api-keys is "
            f"{a.api_keys or 'unset'!r}): drop it, or give --api-keys redis://HOST:PORT/DB"
        )
    return edge_from_config(a.api_keys, a.api_keys_redis_prefix, a.salt_secret_file, host, what)


def edge_from_config(
    api_keys: str | None,
    redis_prefix: str,
    salt_secret_file: str | None,
    host: str,
    what: str,
    names: tuple[str, str] = ("--api-keys", "--salt-secret-file"),
) -> EdgeAuth:
    """The :class:`EdgeAuth` of a front end listening on ``host`` with key store ``api_keys``
    (a file or redis:// URL; None/"": dev mode) and a cache-salt secret file. Raises
    InvalidRequestError (before anything is served) for a non-loopback ``host`` without a key
    store, an unreadable secret file, or a key store that cannot be opened; ``names`` are the
    option names the messages use (flags, or cluster-config keys)."""
    store = None
    if api_keys:
        try:
            store = open_key_store(api_keys, redis_prefix=redis_prefix)
        except UnavailableError as e:  # a missing or broken key file: a configuration error at start
            raise InvalidRequestError(f"{names[0]}: {e.message}") from None
    check_listen_address(host, store, what)
    secret = b""
    if salt_secret_file:
        try:
            with open(salt_secret_file, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise InvalidRequestError(f"cannot read {names[1]} {salt_secret_file!r}: {e.strerror}") from None
        if not secret:
            raise InvalidRequestError(f"{names[1]} {salt_secret_file!r} is empty")
    return EdgeAuth(store, EdgeConfig(salt_secret=secret))
