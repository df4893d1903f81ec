"""Redis access policy without a server (pdserve.redis_access): which URLs are refused, where the
password and the TLS files come from, and that no message shows a password."""

from __future__ import annotations

import argparse

import pytest

from pdserve.redis_access import (
    RedisAccess,
    RedisAccessError,
    add_redis_args,
    check_url,
    connect,
    shown,
)
from pdserve.security import SecurityConfig, TLSMode


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost:6379/0?prefix=p:",
        "redis://[::1]:6379/0",
        "unix:///run/redis.sock",
        "rediss://:pw@10.0.0.5:6380/0",
        "rediss://user:pw@redis.internal:6380/1?prefix=p:",
    ],
)
def test_local_or_tls_with_password_is_allowed(url: str) -> None:
    check_url(url, RedisAccess())


def test_plaintext_off_loopback_is_refused_even_with_a_password() -> None:
    for url in ("redis://10.0.0.5:6379/0", "redis://:s3cret@10.0.0.5:6379/0", "redis://redis:6379/0"):
        with pytest.raises(RedisAccessError, match="refusing plaintext Redis.*rediss://") as ei:
            check_url(url, RedisAccess(password="x"))
        assert "s3cret" not in str(ei.value)


def test_tls_off_loopback_needs_a_password_or_a_client_certificate(tmp_path) -> None:
    with pytest.raises(RedisAccessError, match="without authentication.*--redis-password-file"):
        check_url("rediss://10.0.0.5:6380/0", RedisAccess())
    check_url("rediss://10.0.0.5:6380/0", RedisAccess(password="pw"))
    check_url("rediss://10.0.0.5:6380/0", RedisAccess(cert_file="c.pem", key_file="k.pem"))
    with pytest.raises(RedisAccessError, match="scheme must be one of"):
        check_url("mongodb://x:1/0", RedisAccess())


def test_password_and_tls_files_reach_the_client() -> None:
    acc = RedisAccess(password="pw", ca_file="ca.pem")
    assert acc.client_kwargs("redis://127.0.0.1:1/0") == {"password": "pw"}
    assert acc.client_kwargs("redis://:url-pw@127.0.0.1:1/0") == {}  # the URL's password wins
    kw = acc.client_kwargs("rediss://127.0.0.1:1/0")
    assert kw == {"password": "pw", "ssl_cert_reqs": "required", "ssl_ca_certs": "ca.pem"}
    with pytest.raises(RedisAccessError, match="go together"):
        RedisAccess(cert_file="c.pem")


def test_rediss_defaults_to_the_cluster_ca_and_certificate(tmp_path) -> None:
    from pdserve.certs import write_dev_pki

    pki = write_dev_pki(tmp_path / "pki")
    cluster = SecurityConfig(
        tls=TLSMode.ON, ca_file=str(pki.ca), cert_file=str(pki.server_cert), key_file=str(pki.server_key)
    )
    kw = RedisAccess().client_kwargs("rediss://127.0.0.1:1/0", cluster)
    assert (kw["ssl_ca_certs"], kw["ssl_certfile"], kw["ssl_keyfile"]) == (
        str(pki.ca),
        str(pki.server_cert),
        str(pki.server_key),
    )
    own = RedisAccess(ca_file="r.pem").client_kwargs("rediss://127.0.0.1:1/0", cluster)
    assert own["ssl_ca_certs"] == "r.pem"
    # no cluster TLS, no files: the system roots, no client certificate
    assert RedisAccess().client_kwargs("rediss://127.0.0.1:1/0", SecurityConfig(tls=TLSMode.OFF)) == {
        "ssl_cert_reqs": "required"
    }


def test_flags_environment_and_files(tmp_path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    ap = argparse.ArgumentParser()
    add_redis_args(ap, env={"PDSERVE_REDIS_PASSWORD_FILE": str(pw), "PDSERVE_REDIS_CA": "ca.pem"})
    a = ap.parse_args([])
    acc = RedisAccess.from_args(a, env={})
    assert (acc.password, acc.ca_file) == ("from-file", "ca.pem")
    assert "from-file" not in repr(acc)
    assert RedisAccess.from_env({"PDSERVE_REDIS_PASSWORD": " envpw "}).password == "envpw"
    (tmp_path / "empty").write_text("")
    with pytest.raises(RedisAccessError, match="is empty"):
        RedisAccess(password_file=str(tmp_path / "empty"))
    with pytest.raises(RedisAccessError, match="cannot read the Redis password file"):
        RedisAccess(password_file=str(tmp_path / "nope"))


def test_messages_and_connect_never_show_the_password() -> None:
    assert shown("rediss://:s3cret@h:1/0") == "rediss://:***@h:1/0"
    assert shown("redis://u:s3cret@h:1/0?prefix=p") == "redis://u:***@h:1/0?prefix=p"
    assert shown("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(RedisAccessError) as ei:
        connect("redis://:s3cret@10.1.1.1:6379/0", RedisAccess())  # refused before any connection
    assert "s3cret" not in str(ei.value)
