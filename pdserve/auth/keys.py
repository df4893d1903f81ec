"""API keys and the stores that hold them (hashed), with live rotation.

Key format: ``pdsk_<key id>_<secret>``: the key id (12 hex digits) is public and names the
stored record; the secret is 32 random bytes (URL-safe base64). A store keeps only
``sha256(full key)`` per key id, never the key: keys are 256-bit random strings, so a fast hash is
enough (nothing to brute-force) and keeps authentication off the request's latency. Comparison is
constant-time (:func:`hmac.compare_digest`), and an unknown key id costs the same work as a known
one.

Stores (one interface, :class:`KeyStore`): :class:`MemoryKeyStore` (tests, embedding),
:class:`FileKeyStore` (a YAML or JSON file, re-read as soon as it changes: its mtime, size or inode),
:class:`RedisKeyStore` (read live on every request, under a key prefix). Adding, revoking or
changing a tenant's limits therefore takes effect on the next request, without a restart; a
revoked key is refused from then on. :func:`authenticate` is the one check every front end calls.

File layout (``pdserve keys`` writes it; hand edits are fine)::

    version: 1
    tenants:                   # optional: limits per tenant (pdserve.auth.tenants.TenantPolicy)
      acme: {max_inflight: 8, rate_per_s: 5, salt_group: public-docs}
    keys:
      pdsk_0123456789ab: {tenant: acme, sha256: <64 hex>, created: 1733356800, revoked: false}

A file that cannot be read or parsed fails closed: every request is refused (UNAVAILABLE naming
the file and the problem) until it is fixed; nothing falls back to an older copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import yaml

from pdserve.auth.tenants import AuthMode, Principal, TenantPolicy, check_name
from pdserve.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)
from pdserve.redis_access import is_redis_url

KEY_PREFIX = "pdsk_"
_KEY_RE = re.compile(r"^pdsk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_ID_RE = re.compile(r"^pdsk_[0-9a-f]{12}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_REDIS_PREFIX = "pdserve:auth:"  # where a Redis key store keeps its keys by default
MAX_KEY_CHARS = 256  # anything longer is refused before hashing
FILE_VERSION = 1
_DUMMY_HASH = hashlib.sha256(b"pdserve: no such key").hexdigest()


def hash_key(api_key: str) -> str:
    """The stored form of a key: SHA-256 of its UTF-8 bytes, as 64 hex digits."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh ``(key id, full key)``."""
    key_id = KEY_PREFIX + secrets.token_hex(6)
    return key_id, f"{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(api_key: str) -> str | None:
    """The key id a well-formed key names; None for anything else."""
    m = _KEY_RE.match(api_key) if len(api_key) <= MAX_KEY_CHARS else None
    return KEY_PREFIX + m.group(1) if m else None


@dataclass(frozen=True)
class KeyRecord:
    """What a store holds for one key (never the key itself)."""

    key_id: str
    tenant: str
    sha256: str
    created_unix_s: float = 0.0
    revoked: bool = False

    def __post_init__(self) -> None:
        if not _ID_RE.match(self.key_id):
            raise InvalidRequestError(f"key id {self.key_id!r} is not of the form pdsk_<12 hex digits>")
        if not _HEX64.match(self.sha256):
            raise InvalidRequestError(f"key {self.key_id}: sha256 must be 64 lowercase hex digits")
        check_name(self.tenant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "sha256": self.sha256,
            "created": self.created_unix_s,
            "revoked": self.revoked,
        }

    @classmethod
    def from_dict(cls, key_id: str, raw: Any) -> KeyRecord:
        if not isinstance(raw, Mapping):
            raise InvalidRequestError(f"key {key_id!r} must be a mapping with tenant and sha256")
        unknown = sorted(set(raw) - {"tenant", "sha256", "created", "revoked"})
        if unknown:
            raise InvalidRequestError(f"key {key_id!r}: unknown field(s) {unknown}")
        revoked = raw.get("revoked", False)
        if not isinstance(revoked, bool):
            raise InvalidRequestError(f"key {key_id!r}: revoked must be true or false")
        created = raw.get("created", 0.0)
        if isinstance(created, bool) or not isinstance(created, int | float):
            raise InvalidRequestError(f"key {key_id!r}: created must be a number (unix seconds)")
        return cls(
            str(key_id), str(raw.get("tenant", "")), str(raw.get("sha256", "")), float(created), revoked
        )


class KeyStore(Protocol):
    """Where API keys and tenant limits live. Reads reflect the latest writes (rotation is live).

    Reads raise UnavailableError when the store cannot be consulted (fail closed)."""

    def record(self, key_id: str) -> KeyRecord | None:
        """The record of ``key_id`` (revoked ones included), or None."""
        ...

    def policy(self, tenant: str) -> TenantPolicy:
        """The tenant's limits (the default policy when it has none configured)."""
        ...

    def records(self) -> list[KeyRecord]:
        """Every key record, sorted by key id."""
        ...

    def put_record(self, rec: KeyRecord) -> None: ...

    def put_policy(self, tenant: str, policy: TenantPolicy) -> None: ...

    def describe(self) -> str:
        """Where the store is (for messages): a path or a URL without credentials."""
        ...


def authenticate(store: KeyStore, api_key: str) -> Principal:
    """THE key check: the principal ``api_key`` stands for.

    Raises UnauthenticatedError for a malformed, unknown, wrong or revoked key (the message names
    the key id when the key was well formed, never the secret), UnavailableError when the store
    cannot be read. The hash comparison is constant-time and done for unknown ids too.
    """
    key_id = key_id_of(api_key)
    if key_id is None:
        raise UnauthenticatedError("the API key is malformed (expected pdsk_<id>_<secret>)")
    rec = store.record(key_id)
    presented = hash_key(api_key)
    ok = hmac.compare_digest(presented, rec.sha256 if rec is not None else _DUMMY_HASH)
    if rec is None or not ok:
        raise UnauthenticatedError(f"API key {key_id} is not valid")
    if rec.revoked:
        raise UnauthenticatedError(f"API key {key_id} has been revoked")
    return Principal(rec.tenant, store.policy(rec.tenant), AuthMode.API_KEY, key_id)


def issue_key(store: KeyStore, tenant: str, clock: float | None = None) -> tuple[str, KeyRecord]:
    """Create a key for ``tenant``: stores its hash, returns ``(full key, record)``. The full key
    exists only in the return value: show it once."""
    check_name(tenant)
    key_id, key = new_key()
    while store.record(key_id) is not None:  # 48-bit ids: a clash is unlikely, not impossible
        key_id, key = new_key()
    rec = KeyRecord(key_id, tenant, hash_key(key), time.time() if clock is None else clock)
    store.put_record(rec)
    return key, rec


def revoke_key(store: KeyStore, key_id: str) -> KeyRecord:
    """Mark ``key_id`` revoked (the record stays, so ``list`` shows it). Raises
    :class:`KeyNotFoundError` (NOT_FOUND) when the store has no such key."""
    rec = store.record(key_id)
    if rec is None:
        raise KeyNotFoundError(f"no API key {key_id!r} in {store.describe()}")
    if not rec.revoked:
        rec = replace(rec, revoked=True)
        store.put_record(rec)
    return rec


class KeyNotFoundError(ModelNotFoundError):
    """An admin operation named a key id the store does not hold (NOT_FOUND)."""


# ------------------------------------------------------------------------------------ memory


class MemoryKeyStore:
    """A :class:`KeyStore` in a dict (tests, embedding)."""

    def __init__(self, default_policy: TenantPolicy = TenantPolicy()) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._policies: dict[str, TenantPolicy] = {}
        self._default = default_policy
        self._lock = threading.Lock()

    def record(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            return self._keys.get(key_id)

    def policy(self, tenant: str) -> TenantPolicy:
        with self._lock:
            return self._policies.get(tenant, self._default)

    def records(self) -> list[KeyRecord]:
        with self._lock:
            return [self._keys[k] for k in sorted(self._keys)]

    def put_record(self, rec: KeyRecord) -> None:
        with self._lock:
            self._keys[rec.key_id] = rec

    def put_policy(self, tenant: str, policy: TenantPolicy) -> None:
        check_name(tenant)
        with self._lock:
            self._policies[tenant] = policy

    def describe(self) -> str:
        return "memory"


# -------------------------------------------------------------------------------------- file


@dataclass(frozen=True)
class _Parsed:
    keys: dict[str, KeyRecord]
    policies: dict[str, TenantPolicy]


def parse_key_file(text: str, where: str) -> _Parsed:
    """Parse the text of a key file (YAML or JSON). Raises InvalidRequestError naming ``where``."""
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise InvalidRequestError(f"{where}: not valid YAML/JSON: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"{where}: the top level must be a mapping")
    unknown = sorted(set(raw) - {"version", "tenants", "keys"})
    if unknown:
        raise InvalidRequestError(f"{where}: unknown top-level field(s) {unknown}")
    version = raw.get("version", FILE_VERSION)
    if version != FILE_VERSION:
        raise InvalidRequestError(f"{where}: version {version!r} is not supported (only {FILE_VERSION})")
    tenants = raw.get("tenants") or {}
    keys = raw.get("keys") or {}
    if not isinstance(tenants, dict) or not isinstance(keys, dict):
        raise InvalidRequestError(f"{where}: 'tenants' and 'keys' must be mappings")
    try:
        policies = {
            check_name(str(t)): TenantPolicy.from_dict(p, f"tenant {t!r}") for t, p in tenants.items()
        }
        records = {str(k): KeyRecord.from_dict(str(k), v) for k, v in keys.items()}
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{where}: {e.message}") from None
    return _Parsed(records, policies)


def render_key_file(parsed: _Parsed, as_json: bool) -> str:
    doc = {
        "version": FILE_VERSION,
        "tenants": {t: p.to_dict() for t, p in sorted(parsed.policies.items())},
        "keys": {k: r.to_dict() for k, r in sorted(parsed.keys.items())},
    }
    if as_json:
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return yaml.safe_dump(doc, sort_keys=True)


class FileKeyStore:
    """A :class:`KeyStore` in one YAML/JSON file (``.json``: written as JSON, else YAML).

    Every read checks the file's (mtime, size, inode) and re-reads it when any changed, so
    rotation needs no restart and a revocation applies from the next request. Writes replace the
    file atomically (temp file + rename, mode 0600) under an exclusive lock file, so concurrent
    ``pdserve keys`` runs do not lose updates and a server never sees half a file.
    ``create``: start an empty store when the file does not exist (the CLI); a server opens an
    existing file only (a missing one is a configuration error, raised at once).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        default_policy: TenantPolicy = TenantPolicy(),
    ) -> None:
        self.path = Path(path)
        self._default = default_policy
        self._lock = threading.Lock()
        self._sig: tuple[int, int, int, int] | None = None
        self._loaded = False
        self._create = create
        self._data = _Parsed({}, {})
        self._error: str | None = None
        if not self.path.exists():
            if not create:
                raise UnavailableError(
                    f"API key file {self.path} does not exist (create it with `pdserve keys add`)"
                )
        else:
            self._load()
            if self._error is not None:
                raise UnavailableError(self._error)

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)

    def _load(self) -> None:
        """Re-read when the file changed; a broken file makes every read fail (fail closed)."""
        sig = self._signature()
        if self._loaded and sig == self._sig:
            return
        self._loaded, self._sig = True, sig
        if sig is None:  # an admin store (create) starts empty; a server's store has gone: fail closed
            missing = None if self._create else f"API key file {self.path} is missing"
            self._data, self._error = _Parsed({}, {}), missing
            return
        try:
            text = self.path.read_text(encoding="utf-8")
            self._data, self._error = parse_key_file(text, str(self.path)), None
        except (OSError, UnicodeDecodeError) as e:
            self._data, self._error = _Parsed({}, {}), f"API key file {self.path} cannot be read: {e}"
        except InvalidRequestError as e:
            self._data, self._error = _Parsed({}, {}), f"API key file is broken: {e.message}"

    def _current(self) -> _Parsed:
        with self._lock:
            self._load()
            if self._error is not None:
                raise UnavailableError(f"{self._error}; every request is refused until it is fixed")
            return self._data

    def record(self, key_id: str) -> KeyRecord | None:
        return self._current().keys.get(key_id)

    def policy(self, tenant: str) -> TenantPolicy:
        return self._current().policies.get(tenant, self._default)

    def records(self) -> list[KeyRecord]:
        d = self._current()
        return [d.keys[k] for k in sorted(d.keys)]

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[_Parsed]:
        """Lock the file for a read-modify-write; yields a mutable copy, written back on exit."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    cur = parse_key_file(self.path.read_text(encoding="utf-8"), str(self.path))
                else:
                    cur = _Parsed({}, {})
                work = _Parsed(dict(cur.keys), dict(cur.policies))
                yield work
                self._write(render_key_file(work, self.path.suffix.lower() == ".json"))
            finally:
                fcntl.flock(lf, fcntl.LOCK_UN)

    def _write(self, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_record(self, rec: KeyRecord) -> None:
        with self._exclusive() as d:
            d.keys[rec.key_id] = rec

    def put_policy(self, tenant: str, policy: TenantPolicy) -> None:
        check_name(tenant)
        with self._exclusive() as d:
            d.policies[tenant] = policy

    def describe(self) -> str:
        return str(self.path)


# ------------------------------------------------------------------------------------- redis


class RedisKeyStore:
    """A :class:`KeyStore` in Redis, read live on every call (no cache: a revocation applies to
    the next request). Keys live under ``prefix``: ``<prefix>key:<key id>`` (a hash: tenant,
    sha256, created, revoked), ``<prefix>tenant:<name>`` (the policy as JSON) and
    ``<prefix>keys`` (the set of key ids). Redis errors are UnavailableError (fail closed)."""

    def __init__(
        self,
        client: Any,
        prefix: str = DEFAULT_REDIS_PREFIX,
        url: str = "redis",
        default_policy: TenantPolicy = TenantPolicy(),
    ) -> None:
        self._r = client
        self.prefix = prefix
        self._url = url
        self._default = default_policy

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_REDIS_PREFIX, **kw: Any) -> RedisKeyStore:
        from pdserve.redis_access import connect, shown

        # password and TLS (rediss://) as pdserve.redis_access says; plaintext off loopback refused
        client = connect(url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True)
        return cls(client, prefix, shown(url), **kw)  # never print a password in messages

    @contextlib.contextmanager
    def _io(self) -> Iterator[None]:
        import redis

        try:
            yield
        except redis.RedisError as e:
            raise UnavailableError(f"API key store {self._url} is unreachable: {e}") from None

    def record(self, key_id: str) -> KeyRecord | None:
        with self._io():
            h = self._r.hgetall(f"{self.prefix}key:{key_id}")
        if not h:
            return None
        try:
            return KeyRecord(
                key_id,
                h.get("tenant", ""),
                h.get("sha256", ""),
                float(h.get("created", 0) or 0),
                h.get("revoked") == "1",
            )
        except (InvalidRequestError, ValueError) as e:
            raise UnavailableError(f"API key store {self._url}: record {key_id} is broken: {e}") from None

    def policy(self, tenant: str) -> TenantPolicy:
        with self._io():
            raw = self._r.get(f"{self.prefix}tenant:{tenant}")
        if raw is None:
            return self._default
        try:
            return TenantPolicy.from_dict(json.loads(raw), f"tenant {tenant!r}")
        except (ValueError, InvalidRequestError) as e:
            raise UnavailableError(
                f"API key store {self._url}: policy of {tenant!r} is broken: {e}"
            ) from None

    def records(self) -> list[KeyRecord]:
        with self._io():
            ids = sorted(self._r.smembers(f"{self.prefix}keys"))
        return [r for r in (self.record(k) for k in ids) if r is not None]

    def put_record(self, rec: KeyRecord) -> None:
        with self._io():
            p = self._r.pipeline(transaction=True)
            p.hset(
                f"{self.prefix}key:{rec.key_id}",
                mapping={
                    "tenant": rec.tenant,
                    "sha256": rec.sha256,
                    "created": repr(rec.created_unix_s),
                    "revoked": "1" if rec.revoked else "0",
                },
            )
            p.sadd(f"{self.prefix}keys", rec.key_id)
            p.execute()

    def put_policy(self, tenant: str, policy: TenantPolicy) -> None:
        check_name(tenant)
        with self._io():
            self._r.set(f"{self.prefix}tenant:{tenant}", json.dumps(policy.to_dict()))

    def describe(self) -> str:
        return f"{self._url} (prefix {self.prefix!r})"


def open_key_store(spec: str, *, create: bool = False, redis_prefix: str = DEFAULT_REDIS_PREFIX) -> KeyStore:
    """A store from a flag value: ``redis://...`` / ``rediss://...`` (Redis) or a file path."""
    if is_redis_url(spec):
        return RedisKeyStore.from_url(spec, prefix=redis_prefix)
    return FileKeyStore(spec, create=create)
