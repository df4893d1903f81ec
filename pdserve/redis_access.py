"""How pdserve connects to Redis (the shared KV index, the API key store): password and TLS.

URLs: ``redis://[[USER]:PASSWORD@]HOST:PORT/DB`` (plaintext), ``rediss://...`` (TLS),
``unix:///path`` (a local socket); pdserve's own query parameters (``?prefix=``) stay where they
were, redis-py's (e.g. ``?ssl_check_hostname=false``) pass through.

* **Password.** In the URL, or (kept off command lines) in a file: ``--redis-password-file FILE``
  (env ``PDSERVE_REDIS_PASSWORD_FILE``), or env ``PDSERVE_REDIS_PASSWORD``. The URL's wins.
* **TLS** (``rediss://``): the server's certificate is verified (host name included) against
  ``--redis-tls-ca`` (env ``PDSERVE_REDIS_CA``), else this process's cluster CA (``--tls-ca``, when
  TLS is on), else the system roots. The client presents ``--redis-tls-cert``/``--redis-tls-key``
  (env ``PDSERVE_REDIS_CERT`` / ``PDSERVE_REDIS_KEY``), else this process's cluster certificate
  when TLS is on (Redis's ``tls-auth-clients``). ``pdserve certs`` certificates work for Redis too.
* **Secure default** (:func:`check_url`): off loopback, plaintext ``redis://`` is refused (the
  password, the index and the API key hashes would cross the network in clear), and so is a Redis
  without authentication (neither a password nor a client certificate). Loopback and ``unix://``
  are local: allowed as they are (the dev and test Redis still get a password, see
  :mod:`kv_store.redis_server`).

One :class:`RedisAccess` per process: :func:`install` (the mains, from :func:`add_redis_args`
flags) or, by default, :func:`current` from the environment. :func:`connect` is the one way
pdserve opens a Redis client.
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pdserve.errors import InvalidRequestError

ENV_PASSWORD = "PDSERVE_REDIS_PASSWORD"
ENV_PASSWORD_FILE = "PDSERVE_REDIS_PASSWORD_FILE"
ENV_CA = "PDSERVE_REDIS_CA"
ENV_CERT = "PDSERVE_REDIS_CERT"
ENV_KEY = "PDSERVE_REDIS_KEY"
SCHEMES = ("redis", "rediss", "unix")
_PREFIXES = tuple(f"{s}://" for s in SCHEMES)


def is_redis_url(spec: str) -> bool:
    """Whether ``spec`` names a Redis server (``redis://``, ``rediss://`` or ``unix://``) rather than
    a file or a keyword: what every pdserve option that takes either reads as Redis."""
    return spec.startswith(_PREFIXES)


class RedisAccessError(InvalidRequestError):
    """A Redis URL or access setting that cannot be used; the message names the fix."""


def _loopback(host: str) -> bool:
    from pdserve.security import is_loopback

    return is_loopback(host)


@dataclass(frozen=True)
class RedisAccess:
    """Credentials and TLS files for every Redis this process opens (see module docstring).
    ``password_file`` is read at construction (a missing or empty file names its flag)."""

    password: str = field(default="", repr=False)
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if self.password_file and not self.password:
            try:
                pw = Path(self.password_file).read_text().strip()
            except OSError as e:
                raise RedisAccessError(
                    f"cannot read the Redis password file {self.password_file!r} (--redis-password-file): "
                    f"{e.strerror}"
                ) from None
            if not pw:
                raise RedisAccessError(f"the Redis password file {self.password_file!r} is empty")
            object.__setattr__(self, "password", pw)
        if bool(self.cert_file) != bool(self.key_file):
            raise RedisAccessError("--redis-tls-cert and --redis-tls-key go together: give both or neither")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RedisAccess:
        e = os.environ if env is None else env
        return cls(
            password="" if e.get(ENV_PASSWORD_FILE) else e.get(ENV_PASSWORD, "").strip(),
            password_file=e.get(ENV_PASSWORD_FILE, ""),
            ca_file=e.get(ENV_CA, ""),
            cert_file=e.get(ENV_CERT, ""),
            key_file=e.get(ENV_KEY, ""),
        )

    @classmethod
    def from_args(cls, a: argparse.Namespace, env: Mapping[str, str] | None = None) -> RedisAccess:
        """From :func:`add_redis_args` flags (defaults from the environment)."""
        e = os.environ if env is None else env
        return cls(
            password="" if a.redis_password_file else e.get(ENV_PASSWORD, "").strip(),
            password_file=a.redis_password_file,
            ca_file=a.redis_tls_ca,
            cert_file=a.redis_tls_cert,
            key_file=a.redis_tls_key,
        )

    def tls_files(self, cluster: Any = None) -> tuple[str, str, str]:
        """(CA, client certificate, key) of a ``rediss://`` connection: this access's, else the
        cluster's (``cluster``: a :class:`pdserve.security.SecurityConfig` with TLS on); "" where
        neither has one (the CA then: the system roots)."""
        on = cluster is not None and cluster.tls_on
        ca = self.ca_file or (cluster.ca_file if on else "")
        if self.cert_file:
            return ca, self.cert_file, self.key_file
        if on:
            return ca, cluster.cert_file, cluster.key_file
        return ca, "", ""

    def client_kwargs(self, url: str, cluster: Any = None) -> dict[str, Any]:
        """Keyword arguments of ``redis.Redis.from_url(url, ...)`` besides timeouts: the password
        when the URL has none, and for ``rediss://`` the TLS files (verification required)."""
        parts = urlsplit(url)
        kw: dict[str, Any] = {}
        if self.password and not parts.password:
            kw["password"] = self.password
        if parts.scheme == "rediss":
            ca, cert, key = self.tls_files(cluster)
            kw["ssl_cert_reqs"] = "required"
            if ca:
                kw["ssl_ca_certs"] = ca
            if cert:
                kw["ssl_certfile"], kw["ssl_keyfile"] = cert, key
        return kw


def shown(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return parts._replace(netloc=user + netloc).geturl()


def check_url(url: str, access: RedisAccess, cluster: Any = None) -> None:
    """Pure: refuse (:class:`RedisAccessError`) a URL pdserve must not use: an unknown scheme, a
    plaintext ``redis://`` off loopback, or a Redis off loopback without authentication."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise RedisAccessError(
            f"Redis URL {shown(url)!r}: the scheme must be one of {[s + '://' for s in SCHEMES]}"
        )
    if parts.scheme == "unix":
        return
    host = parts.hostname or ""
    if not host:
        raise RedisAccessError(f"Redis URL {shown(url)!r} names no host")
    if _loopback(host):
        return
    if parts.scheme == "redis":
        raise RedisAccessError(
            f"refusing plaintext Redis at {host!r} ({shown(url)}): off loopback its password, the KV "
            "index and the API key hashes would cross the network in clear. Serve Redis with TLS and "
            f"use rediss://{parts.netloc.rsplit('@', 1)[-1]}{parts.path} (its CA: --redis-tls-ca or the "
            "cluster's --tls-ca; `pdserve certs` certificates work) with a password, or run Redis on "
            "127.0.0.1"
        )
    has_password = bool(parts.password) or bool(access.password)
    if not has_password and not access.tls_files(cluster)[1]:
        raise RedisAccessError(
            f"Redis at {host!r} ({shown(url)}) would be used without authentication: give its password "
            f"(rediss://:PASSWORD@..., --redis-password-file FILE or {ENV_PASSWORD}) or a client "
            "certificate (--redis-tls-cert/--redis-tls-key)"
        )


def connect(url: str, access: RedisAccess | None = None, **redis_kw: Any) -> Any:
    """A ``redis.Redis`` client of ``url`` under ``access`` (default :func:`current`) and this
    process's cluster TLS configuration; ``redis_kw``: more ``from_url`` keywords (timeouts,
    decoding). :class:`RedisAccessError` for a URL :func:`check_url` refuses. No connection is
    made until the first command."""
    import redis

    from pdserve.security import current as cluster_security

    acc = access if access is not None else current()
    cluster = cluster_security()
    check_url(url, acc, cluster)
    return redis.Redis.from_url(url, **acc.client_kwargs(url, cluster), **redis_kw)


def add_redis_args(p: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """The Redis access flags (the KV index's and a redis:// key store's); defaults from the
    environment."""
    e = os.environ if env is None else env
    g = p.add_argument_group(
        "Redis access (--index / --api-keys redis://, rediss://; pdserve/redis_access.py)"
    )
    g.add_argument(
        "--redis-password-file",
        default=e.get(ENV_PASSWORD_FILE, ""),
        metavar="FILE",
        help=f"file holding the Redis password when the URL has none; or env {ENV_PASSWORD} "
        f"(env {ENV_PASSWORD_FILE}) (default: %(default)r)",
    )
    g.add_argument(
        "--redis-tls-ca",
        default=e.get(ENV_CA, ""),
        metavar="PEM",
        help=f"rediss://: CA that signed Redis's certificate (env {ENV_CA}) (default: %(default)r: the "
        "cluster's --tls-ca when TLS is on, else the system roots)",
    )
    g.add_argument(
        "--redis-tls-cert",
        default=e.get(ENV_CERT, ""),
        metavar="PEM",
        help=f"rediss://: client certificate presented to Redis (env {ENV_CERT}) (default: %(default)r: "
        "the cluster's --tls-cert when TLS is on)",
    )
    g.add_argument(
        "--redis-tls-key",
        default=e.get(ENV_KEY, ""),
        metavar="PEM",
        help=f"private key of --redis-tls-cert (env {ENV_KEY}) (default: %(default)r)",
    )


def install_from_args(parser: argparse.ArgumentParser, a: argparse.Namespace) -> RedisAccess:
    """Build and :func:`install` the access of :func:`add_redis_args` flags; a bad setting exits
    through ``parser.error`` naming it."""
    try:
        return install(RedisAccess.from_args(a))
    except RedisAccessError as e:
        parser.error(str(e))


# ---------------------------------------------------------------------------- process default
_lock = threading.Lock()
_current: RedisAccess | None = None


def install(access: RedisAccess) -> RedisAccess:
    """Make ``access`` this process's Redis access (read by :func:`current`)."""
    global _current
    with _lock:
        _current = access
    return access


def current() -> RedisAccess:
    """This process's access: the installed one, else built from the environment once."""
    global _current
    with _lock:
        if _current is None:
            _current = RedisAccess.from_env()
        return _current


def reset() -> None:
    """Forget the installed access (tests)."""
    global _current
    with _lock:
        _current = None
