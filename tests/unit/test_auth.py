"""pdserve.auth: keys (memory/file stores, rotation, fail-closed), tenants, quotas with a fake
clock, idempotency table, salt derivation, input limits and the EdgeAuth front-end object."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from pdserve.auth.edge import (
    EdgeAuth,
    EdgeConfig,
    bearer_token,
    check_listen_address,
    is_loopback,
    metadata_value,
)
from pdserve.auth.idempotency import IdempotencyTable
from pdserve.auth.keys import (
    FileKeyStore,
    KeyNotFoundError,
    KeyRecord,
    MemoryKeyStore,
    authenticate,
    hash_key,
    issue_key,
    key_id_of,
    open_key_store,
    parse_key_file,
    revoke_key,
)
from pdserve.auth.quota import TenantGate, TokenBucket
from pdserve.auth.salt import effective_salt
from pdserve.auth.tenants import AuthMode, Principal, TenantPolicy, check_name
from pdserve.auth.validate import (
    check_chat,
    check_json_strings,
    check_request_id,
    check_text,
    prompt_text_bytes,
    validate_generate_request,
)
from pdserve.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from pdserve.v1 import client_pb2


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def principal(tenant: str = "a", **policy: object) -> Principal:
    return Principal(tenant, TenantPolicy(**policy), AuthMode.API_KEY, None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- keys


def test_issued_key_authenticates_and_only_its_hash_is_stored() -> None:
    store = MemoryKeyStore()
    key, rec = issue_key(store, "acme", clock=5.0)
    assert key_id_of(key) == rec.key_id and rec.tenant == "acme" and rec.created_unix_s == 5.0
    assert rec.sha256 == hashlib.sha256(key.encode()).hexdigest() and key not in repr(store.records())
    p = authenticate(store, key)
    assert (p.tenant, p.mode, p.key_id) == ("acme", AuthMode.API_KEY, rec.key_id)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "nope",
        "pdsk_",
        "Bearer x",
        "pdsk_0123456789ab_" + "A" * 42,
        "pdsk_0123456789AB_" + "A" * 43,
        "x" * 10_000,
    ],
)
def test_malformed_keys_are_refused(bad: str) -> None:
    with pytest.raises(UnauthenticatedError, match="malformed"):
        authenticate(MemoryKeyStore(), bad)


def test_unknown_wrong_and_revoked_keys_are_refused() -> None:
    store = MemoryKeyStore()
    key, rec = issue_key(store, "acme")
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")  # same id, wrong secret
    with pytest.raises(UnauthenticatedError, match="not valid") as e:
        authenticate(store, forged)
    assert key.split("_")[2] not in str(e.value)  # never echoes the secret
    _, other_key = "x", issue_key(MemoryKeyStore(), "acme")[0]  # a key of another store
    with pytest.raises(UnauthenticatedError, match="not valid"):
        authenticate(store, other_key)
    revoke_key(store, rec.key_id)
    with pytest.raises(UnauthenticatedError, match="revoked"):
        authenticate(store, key)
    with pytest.raises(KeyNotFoundError):
        revoke_key(store, "pdsk_000000000000")


def test_key_record_validation() -> None:
    with pytest.raises(InvalidRequestError, match="key id"):
        KeyRecord("k1", "a", "0" * 64)
    with pytest.raises(InvalidRequestError, match="sha256"):
        KeyRecord("pdsk_000000000000", "a", "xyz")
    with pytest.raises(InvalidRequestError, match="tenant name"):
        KeyRecord("pdsk_000000000000", "a b", "0" * 64)


def test_tenant_policy_parse_and_validation() -> None:
    p = TenantPolicy.from_dict({"max_inflight": 2, "rate_per_s": 0.5, "salt_group": "pub"})
    assert p.max_inflight == 2 and p.bucket_size == 1 and p.salt_group == "pub"
    assert TenantPolicy.from_dict(p.to_dict()) == p and TenantPolicy().to_dict() == {}
    assert (
        TenantPolicy(rate_per_s=3.2).bucket_size == 4
        and TenantPolicy(rate_per_s=3, burst=10).bucket_size == 10
    )
    for bad, msg in (
        ({"max_inflight": 0}, "max_inflight"),
        ({"max_inflight": "3"}, "integer"),
        ({"rate_per_s": -1}, "rate_per_s"),
        ({"rate_per_s": float("inf")}, "rate_per_s"),
        ({"burst": 3}, "burst"),
        ({"max_lease_ttl_s": 0}, "max_lease_ttl_s"),
        ({"max_prompt_bytes": 0}, "max_prompt_bytes"),
        ({"salt_group": "a b"}, "salt_group"),
        ({"colour": 1}, "unknown setting"),
        ({"max_inflight": True}, "integer"),
    ):
        with pytest.raises(InvalidRequestError, match=msg):
            TenantPolicy.from_dict(bad)
    with pytest.raises(InvalidRequestError):
        check_name("")


# ---------------------------------------------------------------------------- file store


def test_file_store_rotation_is_live_and_revocation_immediate(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    admin = FileKeyStore(path, create=True)
    k1, r1 = issue_key(admin, "acme")
    server = FileKeyStore(path)  # a second process's view of the same file
    assert authenticate(server, k1).tenant == "acme"
    k2, _ = issue_key(admin, "beta")  # added while the server runs: no restart
    assert authenticate(server, k2).tenant == "beta"
    revoke_key(admin, r1.key_id)
    with pytest.raises(UnauthenticatedError, match="revoked"):
        authenticate(server, k1)
    admin.put_policy("beta", TenantPolicy(max_inflight=3))
    assert authenticate(server, k2).policy.max_inflight == 3
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert k1 not in path.read_text() and k2 not in path.read_text()


def test_file_store_json_and_hand_written_yaml(tmp_path: Path) -> None:
    key = "pdsk_0123456789ab_" + "Q" * 43
    y = tmp_path / "k.yaml"
    y.write_text(
        "version: 1\ntenants:\n  acme: {max_inflight: 4, salt_group: docs}\nkeys:\n"
        f"  pdsk_0123456789ab: {{tenant: acme, sha256: {hash_key(key)}}}\n"
    )
    p = authenticate(FileKeyStore(y), key)
    assert p.policy == TenantPolicy(max_inflight=4, salt_group="docs")
    j = tmp_path / "k.json"
    s = FileKeyStore(j, create=True)
    issue_key(s, "zed")
    doc = json.loads(j.read_text())  # written as JSON for a .json path
    assert doc["version"] == 1 and [r["tenant"] for r in doc["keys"].values()] == ["zed"]
    assert isinstance(open_key_store(str(j)), FileKeyStore)


def test_file_store_fails_closed_on_a_broken_or_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    with pytest.raises(UnavailableError, match="does not exist"):
        FileKeyStore(path)
    admin = FileKeyStore(path, create=True)
    key, _ = issue_key(admin, "acme")
    server = FileKeyStore(path)
    path.write_text("keys: [this is: not, a mapping")
    with pytest.raises(UnavailableError, match="broken"):
        authenticate(server, key)
    path.write_text("version: 1\nkeys:\n  pdsk_0123456789ab: {tenant: acme, sha256: short}\n")
    with pytest.raises(UnavailableError, match="sha256"):
        authenticate(server, key)
    path.unlink()
    with pytest.raises(UnavailableError, match="missing"):
        authenticate(server, key)
    with pytest.raises(InvalidRequestError, match="version"):
        parse_key_file("version: 2\n", "x")
    with pytest.raises(InvalidRequestError, match="unknown top-level"):
        parse_key_file("tenant: {}\n", "x")


def test_file_store_concurrent_adds_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    stores = [FileKeyStore(path, create=True) for _ in range(4)]
    keys: list[str] = []
    lock = threading.Lock()

    def add(s: FileKeyStore) -> None:
        for _ in range(5):
            k, _ = issue_key(s, "t")
            with lock:
                keys.append(k)

    threads = [threading.Thread(target=add, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader = FileKeyStore(path)
    assert len(reader.records()) == 20
    assert all(authenticate(reader, k).tenant == "t" for k in keys)


# --------------------------------------------------------------------------------- quotas


def test_token_bucket() -> None:
    b = TokenBucket(rate=2.0, capacity=2, now=0.0)
    assert b.take(0.0) == 0.0 and b.take(0.0) == 0.0
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.25) == pytest.approx(0.25)
    assert b.take(0.5) == 0.0
    assert not b.full(0.5) and b.full(100.0) and b.tokens == 2


def test_gate_inflight_limit_and_release() -> None:
    gate = TenantGate(FakeClock())
    p = principal(max_inflight=2)
    a1, a2 = gate.admit(p), gate.admit(p)
    with pytest.raises(ResourceExhaustedError, match="max_inflight 2") as e:
        gate.admit(p)
    assert e.value.retry_after_s is None
    gate.admit(principal("b", max_inflight=2)).release()  # another tenant is unaffected
    a1.release()
    a1.release()  # idempotent
    assert gate.inflight("a") == 1
    with gate.admit(p):
        assert gate.inflight("a") == 2
    a2.release()
    assert gate.inflight("a") == 0


def test_gate_rate_limit_with_fake_clock() -> None:
    clock = FakeClock()
    gate = TenantGate(clock)
    p = principal(max_inflight=None, rate_per_s=1.0, burst=2)
    gate.admit(p).release()
    gate.admit(p).release()
    with pytest.raises(ResourceExhaustedError, match="request rate") as e:
        gate.admit(p)
    assert e.value.retry_after_s == pytest.approx(1.0)
    assert gate.inflight("a") == 0  # a refusal holds nothing
    clock.t += 1.0
    gate.admit(p).release()
    # a changed policy gets a fresh bucket of its own size
    gate.admit(principal(max_inflight=None, rate_per_s=5.0)).release()


def test_gate_prunes_idle_tenants() -> None:
    clock = FakeClock()
    gate = TenantGate(clock)
    gate.PRUNE_AT = 10
    held = gate.admit(principal("busy"))
    for i in range(50):
        gate.admit(principal(f"t{i}", rate_per_s=1.0)).release()
        clock.t += 10
    assert gate.tracked() <= 11 and gate.inflight("busy") == 1
    held.release()


# ---------------------------------------------------------------------------- idempotency


def test_idempotency_refuses_in_flight_collision_and_accepts_after_finish() -> None:
    ids = iter(f"c{i}" for i in range(100))
    table = IdempotencyTable(lambda: next(ids))
    t1 = table.begin("a", "r1")
    assert t1.cluster_id == "c0"
    with pytest.raises(AlreadyExistsError) as e:
        table.begin("a", "r1")
    assert "c0" not in str(e.value)  # nothing about the running request leaks
    assert table.begin("b", "r1").cluster_id != t1.cluster_id  # scoped by tenant
    anon1, anon2 = table.begin("a", ""), table.begin("a", "")  # no client id: never refused
    assert anon1.cluster_id != anon2.cluster_id
    t1.finish()
    t1.finish()
    with table.begin("a", "r1") as t2:
        assert t2.cluster_id not in ("c0", "")
    assert table.begin("a", "r1").cluster_id  # free again after the with block


# ------------------------------------------------------------------------------------ salt


def test_salt_isolates_tenants_and_client_salt_only_partitions_within() -> None:
    a, b = principal("a"), principal("b")
    sa = effective_salt(a)
    assert sa.startswith("s1:") and sa != effective_salt(b)
    assert effective_salt(a, "x") not in (sa, effective_salt(b, "x"))
    assert effective_salt(a, "x") == effective_salt(principal("a"), "x")  # stable
    # no client salt lets tenant b reach tenant a's salt, whatever the encoding tricks
    for guess in ("", "a", sa, "tenant\x00a", "\x00\x00\x00\x01a", "group"):
        assert effective_salt(b, guess) != sa
    # a shared group shares, and only with the same group
    g1, g2 = principal("a", salt_group="pub"), principal("b", salt_group="pub")
    assert effective_salt(g1) == effective_salt(g2) != effective_salt(principal("c", salt_group="other"))
    assert effective_salt(principal("pub")) != effective_salt(g1)  # tenant named like a group
    assert effective_salt(a, secret=b"k") != sa


# ------------------------------------------------------------------------------ validation


def test_text_and_request_id_checks() -> None:
    assert check_text("héllo ✓", "prompt") == "héllo ✓"
    with pytest.raises(InvalidRequestError, match="surrogate"):
        check_text("ok\ud800", "prompt")
    assert check_request_id("") == "" and check_request_id("req-1:a.b") == "req-1:a.b"
    with pytest.raises(InvalidRequestError, match="limit is 128"):
        check_request_id("x" * 129)
    for bad in ("a b", "a\nb", "é"):
        with pytest.raises(InvalidRequestError, match="printable ASCII"):
            check_request_id(bad)


def test_chat_checks() -> None:
    pol = TenantPolicy(max_prompt_bytes=10)
    check_chat([("system", "sys"), ("user", "hi")], pol)
    with pytest.raises(InvalidRequestError, match="empty"):
        check_chat([], pol)
    with pytest.raises(InvalidRequestError, match="role 'wizard'"):
        check_chat([("wizard", "x")], pol)
    with pytest.raises(InvalidRequestError, match="every message"):
        check_chat([("user", ""), ("assistant", "")], pol)
    with pytest.raises(InvalidRequestError, match="11 bytes"):
        check_chat([("user", "0123456789"), ("user", "x")], pol)
    with pytest.raises(InvalidRequestError, match=r"chat.messages\[1\].content"):
        check_chat([("user", "a"), ("user", "\udfff")], pol)


def gen(**kw: object) -> client_pb2.GenerateRequest:
    return client_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]


def test_validate_generate_request() -> None:
    pol = TenantPolicy(max_prompt_bytes=8)
    validate_generate_request(gen(prompt="hello"), pol)
    validate_generate_request(gen(prompt_token_ids=client_pb2.TokenIds(ids=[1, 2])), pol)
    validate_generate_request(
        gen(chat=client_pb2.ChatMessages(messages=[client_pb2.ChatMessage(role="user", content="hi")])), pol
    )
    cases = [
        (gen(), "set one of"),
        (gen(prompt=""), "prompt is empty"),
        (gen(prompt="ééééé"), "10 bytes"),  # 5 characters, 10 bytes: bytes are what count
        (gen(prompt_token_ids=client_pb2.TokenIds()), "prompt_token_ids is empty"),
        (gen(chat=client_pb2.ChatMessages()), "empty"),
        (gen(prompt="x", request_id="x" * 200), "request_id"),
        (gen(prompt="x", tenant="t" * 300), "tenant"),
        (gen(prompt="x", cache_salt="s" * 300), "cache_salt"),
        (
            gen(chat=client_pb2.ChatMessages(messages=[client_pb2.ChatMessage(role="root", content="x")])),
            "role",
        ),
    ]
    for req, msg in cases:
        with pytest.raises(InvalidRequestError, match=msg):
            validate_generate_request(req, pol)


def test_json_string_walk() -> None:
    check_json_strings({"messages": [{"role": "user", "content": "ok"}], "n": 1, "x": None})
    with pytest.raises(InvalidRequestError, match=r"messages\[0\].content"):
        check_json_strings({"messages": [{"role": "user", "content": "\ud83d"}]})
    with pytest.raises(InvalidRequestError, match="a key of"):
        check_json_strings({"a": {"\udc00": 1}})
    deep: object = "x"
    for _ in range(100):
        deep = [deep]
    with pytest.raises(InvalidRequestError, match="nested"):
        check_json_strings({"a": deep})
    assert prompt_text_bytes("é") == 2 and prompt_text_bytes([{"role": "user", "content": "ab"}]) == 2


# ----------------------------------------------------------------------------------- edge


def test_bearer_and_metadata_parsing() -> None:
    assert (
        bearer_token(None) is None and bearer_token("Bearer k") == "k" and bearer_token("bearer  k ") == "k"
    )
    for bad in ("", "Basic abc", "Bearer", "Bearer a b", "k"):
        with pytest.raises(UnauthenticatedError):
            bearer_token(bad)
    md = (("x-other", "1"), ("Authorization", "Bearer k"))
    assert metadata_value(md, "authorization") == "Bearer k" and metadata_value(None, "authorization") is None


def test_loopback_rule() -> None:
    for h in ("127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"):
        assert is_loopback(h)
    for h in ("0.0.0.0", "", "::", "10.0.0.1", "example.com"):
        assert not is_loopback(h)
    check_listen_address("127.0.0.1", None)
    check_listen_address("0.0.0.0", MemoryKeyStore())
    with pytest.raises(InvalidRequestError, match="without API keys"):
        check_listen_address("0.0.0.0", None, "router")


def test_edge_with_keys() -> None:
    store = MemoryKeyStore()
    ka, _ = issue_key(store, "a")
    store.put_policy("a", TenantPolicy(max_inflight=1))
    edge = EdgeAuth(store, EdgeConfig(salt_secret=b"s"))
    with pytest.raises(UnauthenticatedError, match="requires an API key"):
        edge.principal(None)
    with pytest.raises(UnauthenticatedError):
        edge.principal("Bearer pdsk_0123456789ab_" + "A" * 43)
    p = edge.principal_from_metadata((("authorization", f"Bearer {ka}"),))
    assert p.tenant == "a" and p.mode is AuthMode.API_KEY
    assert edge.principal(f"Bearer {ka}", "a").tenant == "a"
    with pytest.raises(PermissionDeniedError, match="another tenant"):
        edge.principal(f"Bearer {ka}", "b")

    md = (("authorization", f"Bearer {ka}"),)
    r = edge.admit_generate(gen(prompt="hi", request_id="r1", cache_salt="u1"), md)
    assert r.cache_salt == effective_salt(p, "u1", b"s") and r.cluster_id and r.lease_ttl_s == 0.0
    with pytest.raises(ResourceExhaustedError):  # max_inflight 1
        edge.admit_generate(gen(prompt="hi", request_id="r2"), md)
    r.close()
    r.close()
    with edge.admit_generate(gen(prompt="hi", request_id="r1"), md):
        pass
    with pytest.raises(InvalidRequestError):  # limits checked before any quota is taken
        edge.admit_generate(gen(prompt=""), md)
    assert edge.gate.inflight("a") == 0 and len(edge.ids) == 0


def test_edge_collision_releases_its_quota_slot() -> None:
    edge = EdgeAuth(None, EdgeConfig(dev_policy=TenantPolicy(max_inflight=5)))
    held = edge.admit_generate(gen(prompt="hi", request_id="dup", tenant="u"), None)
    for _ in range(10):
        with pytest.raises(AlreadyExistsError):
            edge.admit_generate(gen(prompt="hi", request_id="dup", tenant="u"), None)
    assert edge.gate.inflight("u") == 1
    held.close()
    assert edge.gate.inflight("u") == 0


def test_edge_dev_mode_tenant_is_the_request_field() -> None:
    edge = EdgeAuth(None)
    assert edge.dev_mode
    pa = edge.principal("Bearer whatever", "alice")  # a bearer header is ignored in dev mode
    pb = edge.principal(None, "bob")
    assert (pa.tenant, pa.mode, pb.tenant) == ("alice", AuthMode.DEV, "bob")
    ra = edge.begin(pa, "", "")
    rb = edge.begin(pb, "", "")
    assert ra.cache_salt != rb.cache_salt  # dev mode does not cross users either
    ra.close()
    rb.close()


def test_apply_to_rewrites_tenant_salt_and_id() -> None:
    store = MemoryKeyStore()
    key, _ = issue_key(store, "acme")
    edge = EdgeAuth(store)
    req = gen(prompt="hi", request_id="mine", cache_salt="c")
    with edge.admit_generate(req, (("authorization", f"Bearer {key}"),)) as er:
        shown = er.apply_to(req)
        assert (shown, req.request_id, req.tenant, req.cache_salt) == (
            "mine",
            er.cluster_id,
            "acme",
            er.cache_salt,
        )
        assert req.cache_salt != "c"
    req2 = gen(prompt="hi")
    with edge.admit_generate(req2, (("authorization", f"Bearer {key}"),)) as er2:
        assert er2.apply_to(req2) == er2.cluster_id == req2.request_id


def test_forward_http() -> None:
    store = MemoryKeyStore()
    key, _ = issue_key(store, "acme")
    hdr = f"Bearer {key}"
    assert EdgeAuth(store).forward_http(hdr, "end-user-7") == ("acme", (("authorization", hdr),))
    with pytest.raises(UnauthenticatedError):
        EdgeAuth(store).forward_http(None, "u")
    assert EdgeAuth(None).forward_http(None, "u") == ("u", ())
    assert EdgeAuth(None).forward_http("Bearer sk-x", "u") == ("u", (("authorization", "Bearer sk-x"),))
    with pytest.raises(InvalidRequestError):
        EdgeAuth(None).forward_http(None, "\ud800")


def test_openai_error_shapes_for_auth_errors() -> None:
    from http import HTTPStatus

    from pdserve.openai_api.errors import error_response

    r = error_response(UnauthenticatedError("API key pdsk_x is not valid"))
    assert r.status is HTTPStatus.UNAUTHORIZED and ("WWW-Authenticate", "Bearer") in r.headers
    assert r.body == {
        "error": {
            "message": "API key pdsk_x is not valid",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert error_response(AlreadyExistsError("in use")).status is HTTPStatus.CONFLICT
    assert error_response(PermissionDeniedError("no")).status is HTTPStatus.FORBIDDEN
