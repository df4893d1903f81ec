"""Cluster config keys that the launched processes would not read in the config given: refused
naming the key, instead of accepted and dropped (silent wrong behaviour)."""

from __future__ import annotations

import pytest

from pdserve.cluster_config import IndexKind, from_dict
from pdserve.errors import InvalidRequestError
from router.policy.placement import PolicyKind


def test_index_url_without_kind_redis_is_refused() -> None:
    """``index: {url: redis://...}`` without ``kind: redis`` ran every store node on its private
    memory index (and the routers without the shared one): the url was dropped."""
    for index in ({"url": "redis://r:6379/0"}, {"kind": "memory", "url": "redis://r:6379/0"}):
        with pytest.raises(InvalidRequestError, match=r"index\.url: is read with kind: redis only"):
            from_dict({"model": "/m", "index": index})
    c = from_dict({"model": "/m", "index": {"kind": "redis", "url": "redis://r:6379/0"}})
    assert (c.index.kind, c.index.url) == (IndexKind.REDIS, "redis://r:6379/0")
    assert from_dict({"model": "/m", "index": {"kind": "memory"}}).index.url == ""


@pytest.mark.parametrize(
    ("key", "value"),
    [("tenant_max_inflight", 2), ("slo_margin", 0.3), ("local_prefill_max_tokens", 0), ("shared_cores", 4)],
)
def test_goodput_keys_under_another_policy_are_refused(key: str, value: object) -> None:
    """Only the goodput policy reads these (router.policy_factory.build_policy): under another
    ``router.policy`` they were accepted and dropped (e.g. no per-tenant in-flight quota)."""
    for policy in ("least_loaded", "round_robin", "colocated", "global_cache_aware"):
        with pytest.raises(InvalidRequestError, match=rf"router\.{key}: is read by the goodput placement"):
            from_dict({"model": "/m", "router": {"policy": policy, key: value}})
    c = from_dict({"model": "/m", "router": {"policy": "goodput", key: value}})
    assert getattr(c.router, key) == value
    assert (
        from_dict({"model": "/m", "router": {"policy": "least_loaded"}}).router.policy
        is PolicyKind.LEAST_LOADED
    )


@pytest.mark.parametrize(("key", "value"), [("mtls", False), ("server_name", "pdserve.internal.example")])
def test_tls_only_security_keys_with_tls_off_are_refused(key: str, value: object) -> None:
    """``security.mtls`` / ``security.server_name`` shape the TLS handshake only
    (SecurityConfig reads them with TLS on): with ``tls: off`` they were accepted and dropped."""
    from pdserve.cluster_config import check_security

    local = {"model": "/m", "host": "127.0.0.1"}
    with pytest.raises(InvalidRequestError, match=rf"security\.{key}: is read with TLS on only"):
        check_security(from_dict({**local, "security": {"tls": "off", key: value}}))
    off = check_security(from_dict({**local, "security": {"tls": "off"}})).security
    assert not off.security_config("127.0.0.1").tls_on
    files = {"ca": "/t/ca.pem", "cert": "/t/s.pem", "key": "/t/s.key", "cluster_token_file": "/t/tok"}
    c = check_security(from_dict({**local, "security": {"tls": "on", **files, key: value}}))
    assert getattr(c.security, key) == value


def test_api_keys_redis_prefix_without_a_redis_key_store_is_refused() -> None:
    """``router.api_keys_redis_prefix`` names keys in a redis:// key store only
    (pdserve.auth.keys.open_key_store): with a key file, or no key store, it was dropped."""
    for keys in ({"api_keys": "/etc/pdserve/api-keys.yaml"}, {}):
        with pytest.raises(InvalidRequestError, match=r"router\.api_keys_redis_prefix: is read with a redis"):
            from_dict({"model": "/m", "router": {**keys, "api_keys_redis_prefix": "team-a:"}})
    c = from_dict(
        {"model": "/m", "router": {"api_keys": "redis://r:6379/1", "api_keys_redis_prefix": "team-a:"}}
    )
    assert c.router.api_keys_redis_prefix == "team-a:"
    assert from_dict({"model": "/m", "router": {"api_keys": "/etc/k.yaml"}}).router.api_keys == "/etc/k.yaml"
