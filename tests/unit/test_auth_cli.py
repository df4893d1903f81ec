"""``pdserve keys`` (pdserve.keys_cli) on a key file: add prints the key once and stores only its
hash; list never shows keys; revoke applies to a running server's store at once; tenant limits."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.auth.keys import FileKeyStore, authenticate, key_id_of
from pdserve.auth.tenants import TenantPolicy
from pdserve.errors import InvalidRequestError, ModelNotFoundError, UnauthenticatedError
from pdserve.keys_cli import ENV_STORE, register


def run(*argv: str) -> int:
    ap = argparse.ArgumentParser(prog="pdserve")
    register(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(list(argv))
    return a.func(a)


def test_add_list_revoke_tenant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "keys.yaml")
    assert run("keys", "--store", path, "add", "--tenant", "acme") == 0
    out, err = capsys.readouterr()
    key = out.strip()
    kid = key_id_of(key)
    assert kid is not None and "shown only now" in err
    text = Path(path).read_text()
    assert key not in text and kid in text

    server = FileKeyStore(path)
    assert authenticate(server, key).tenant == "acme"

    assert run("keys", "--store", path, "list") == 0
    listing = capsys.readouterr().out
    assert kid in listing and "active" in listing and key not in listing

    assert run("keys", "--store", path, "tenant", "acme", "--max-inflight", "3", "--rate", "2") == 0
    assert run("keys", "--store", path, "tenant", "acme", "--salt-group", "pub") == 0  # keeps the rest
    assert "salt_group='pub'" in capsys.readouterr().out
    assert authenticate(server, key).policy == TenantPolicy(max_inflight=3, rate_per_s=2.0, salt_group="pub")

    assert run("keys", "--store", path, "revoke", kid) == 0
    with pytest.raises(UnauthenticatedError, match="revoked"):
        authenticate(server, key)
    run("keys", "--store", path, "list")
    assert "revoked" in capsys.readouterr().out


def test_errors_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_STORE, raising=False)
    with pytest.raises(InvalidRequestError, match="--store"):
        run("keys", "list")
    monkeypatch.setenv(ENV_STORE, str(tmp_path / "k.json"))
    with pytest.raises(ModelNotFoundError, match="no API key"):
        run("keys", "revoke", "pdsk_000000000000")
    with pytest.raises(InvalidRequestError, match="tenant name"):
        run("keys", "add", "--tenant", "no spaces")
    with pytest.raises(InvalidRequestError, match="max_inflight"):
        run("keys", "tenant", "acme", "--max-inflight", "0")


def test_pdserve_keys_through_the_main_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pdserve.cli import main

    path = str(tmp_path / "k.yaml")
    assert main(["keys", "--store", path, "add", "--tenant", "acme"]) == 0
    key = capsys.readouterr().out.strip()
    assert authenticate(FileKeyStore(path), key).tenant == "acme"
    assert main(["keys", "--store", path, "revoke", "pdsk_000000000000"]) == 2  # named error, exit 2
    assert "no API key" in capsys.readouterr().err


def test_edge_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pdserve.auth.cli_args import add_auth_args, edge_from_args

    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    ap = argparse.ArgumentParser()
    add_auth_args(ap)
    dev = edge_from_args(ap.parse_args([]), "127.0.0.1", "router")
    assert dev.dev_mode
    with pytest.raises(InvalidRequestError, match="without API keys"):
        edge_from_args(ap.parse_args([]), "0.0.0.0", "router")
    keys = tmp_path / "k.yaml"
    run("keys", "--store", str(keys), "add", "--tenant", "acme")
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    e = edge_from_args(
        ap.parse_args(["--api-keys", str(keys), "--salt-secret-file", str(secret)]), "0.0.0.0", "r"
    )
    assert not e.dev_mode and e.config.salt_secret == b"s3cret"
    with pytest.raises(InvalidRequestError, match="--api-keys: .* does not exist"):
        edge_from_args(ap.parse_args(["--api-keys", str(tmp_path / "none.yaml")]), "127.0.0.1", "r")
    with pytest.raises(InvalidRequestError, match="salt-secret-file"):
        edge_from_args(ap.parse_args(["--salt-secret-file", str(tmp_path / "nope")]), "127.0.0.1", "r")


def test_redis_prefix_without_a_redis_key_store_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--api-keys-redis-prefix is read by a redis:// key store only: with a key file, or without
    --api-keys (dev mode), it is refused naming the flag instead of dropped."""
    from pdserve.auth.cli_args import add_auth_args, edge_from_args

    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    ap = argparse.ArgumentParser()
    add_auth_args(ap)
    keys = tmp_path / "k.yaml"
    run("keys", "--store", str(keys), "add", "--tenant", "acme")
    for argv in (
        ["--api-keys-redis-prefix", "mine:"],
        ["--api-keys", str(keys), "--api-keys-redis-prefix", "mine:"],
    ):
        with pytest.raises(
            InvalidRequestError, match="--api-keys-redis-prefix is read with a redis:// key store only"
        ):
            edge_from_args(ap.parse_args(argv), "127.0.0.1", "router")
    # the default prefix, given explicitly, is what every store gets anyway
    assert not edge_from_args(
        ap.parse_args(["--api-keys", str(keys), "--api-keys-redis-prefix", "pdserve:auth:"]), "127.0.0.1", "r"
    ).dev_mode
