"""router.worker_verify with fakes: a registering worker is checked against its own Stats and the
router's model; only the worker itself (its token) may heartbeat or deregister."""

from __future__ import annotations

import pytest

from pdserve.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    LayoutMismatchError,
    PermissionDeniedError,
    UnavailableError,
)
from pdserve.v1 import common_pb2, router_pb2, worker_pb2
from router.worker_verify import (
    WORKER_TOKEN_MD,
    ExpectedModel,
    WorkerVerifier,
    worker_metadata,
    worker_token_from,
)

EXP = ExpectedModel("m", num_layers=2, num_kv_heads=2, head_dim=4, max_kv_blocks=10_000)


def stats(worker_id: str = "d1", **kw: object) -> worker_pb2.WorkerStats:
    layout = kw.pop("layout", None) or common_pb2.KVLayout(
        model_id="m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32", block_size=4
    )
    base: dict[str, object] = dict(
        worker_id=worker_id,
        role=worker_pb2.WORKER_ROLE_DECODE,
        model="m",
        kv_blocks_total=100,
        token_budget=256,
    )
    base.update(kw)
    return worker_pb2.WorkerStats(kv_layout=layout, **base)  # type: ignore[arg-type]


def register(worker_id: str = "d1", address: str = "127.0.0.1:1", **kw: object) -> router_pb2.RegisterRequest:
    s = stats(worker_id, **kw)
    return router_pb2.RegisterRequest(
        worker_id=worker_id, role=s.role, address=address, model=s.model, stats=s
    )


class World:
    """Fake workers by address; fake registry liveness and peers."""

    def __init__(self) -> None:
        self.at: dict[str, worker_pb2.WorkerStats] = {}
        self.alive: set[str] = set()
        n = iter(range(1000))
        self.v = WorkerVerifier(
            EXP,
            fetch_stats=self.fetch,
            alive=lambda w: w in self.alive,
        )
        self.v.tokens._make = lambda: f"tok{next(n)}"  # deterministic tokens

    def fetch(self, address: str) -> worker_pb2.WorkerStats:
        if address not in self.at:
            raise ConnectionRefusedError(f"nothing at {address}")
        return self.at[address]


def test_honest_worker_registers_and_gets_a_token() -> None:
    w = World()
    w.at["127.0.0.1:1"] = stats()
    tok = w.v.verify_registration(register(), ())
    assert tok == "tok0" and w.v.tokens.holds("d1", "tok0")
    md = worker_metadata(tok)
    assert worker_token_from(md) == tok and md[0][0] == WORKER_TOKEN_MD
    w.v.check_heartbeat(router_pb2.HeartbeatRequest(worker_id="d1", stats=stats(num_running=3)), md)
    w.v.check_identity("d1", md, "deregister")


def test_rogue_registry_only_process_is_refused() -> None:
    w = World()  # nothing serves Stats at the advertised address
    with pytest.raises(UnavailableError, match="could not reach the Worker service"):
        w.v.verify_registration(register(kv_blocks_total=9000), ())
    assert w.v.tokens.facts("d1") is None


@pytest.mark.parametrize(
    ("advertised", "field"),
    [
        ({"kv_blocks_total": 9000}, "kv_blocks_total"),
        ({"token_budget": 1 << 20}, "token_budget"),
        ({"role": worker_pb2.WORKER_ROLE_PREFILL}, "role"),
        # the pool's request bound (router.pool_fit refuses by it): a worker may not understate it
        ({"max_model_len": 64}, "max_model_len"),
        ({"sliding_window": 16}, "sliding_window"),
    ],
)
def test_advertised_capacity_must_match_stats(advertised: dict, field: str) -> None:
    w = World()
    w.at["127.0.0.1:1"] = stats()
    with pytest.raises(PermissionDeniedError, match=field):
        w.v.verify_registration(register(**advertised), ())


def test_stats_must_name_the_same_worker() -> None:
    w = World()
    w.at["127.0.0.1:1"] = stats("someone-else")
    with pytest.raises(PermissionDeniedError, match="worker_id"):
        w.v.verify_registration(register(), ())


def test_model_layout_and_capacity_bounds() -> None:
    w = World()
    other = common_pb2.KVLayout(
        model_id="x", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32", block_size=4
    )
    w.at["a:1"] = stats(model="x", layout=other)
    with pytest.raises(LayoutMismatchError, match="this router serves 'm'"):
        w.v.verify_registration(register(address="a:1", model="x", layout=other), ())
    geo = common_pb2.KVLayout(
        model_id="m", num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32", block_size=4
    )
    with pytest.raises(LayoutMismatchError, match="KV geometry"):
        w.v.verify_registration(register(layout=geo), ())
    # a verified, alive peer fixes dtype and block size for the model
    w.at["p:1"] = stats("p1", role=worker_pb2.WORKER_ROLE_PREFILL)
    w.v.verify_registration(register("p1", "p:1", role=worker_pb2.WORKER_ROLE_PREFILL), ())
    w.alive.add("p1")
    f16 = common_pb2.KVLayout(
        model_id="m", num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", block_size=4
    )
    w.at["127.0.0.1:1"] = stats(layout=f16)
    with pytest.raises(LayoutMismatchError, match="interchangeable"):
        w.v.verify_registration(register(layout=f16), ())
    w.alive.clear()  # once the peer is gone, nothing fixes them any more
    assert w.v.verify_registration(register(layout=f16), ())
    w.at["127.0.0.1:1"] = stats()
    with pytest.raises(PermissionDeniedError, match="max_kv_blocks"):
        w.v.verify_registration(register(kv_blocks_total=10_001), ())
    with pytest.raises(InvalidRequestError, match="no KV blocks"):
        w.v.verify_registration(register(kv_blocks_total=0), ())


def test_deregister_and_heartbeat_only_by_the_worker() -> None:
    w = World()
    w.at["127.0.0.1:1"] = stats()
    tok = w.v.verify_registration(register(), ())
    for md in ((), worker_metadata("guess"), ((WORKER_TOKEN_MD, tok + "x"),)):
        with pytest.raises(PermissionDeniedError, match="only worker 'd1' itself"):
            w.v.check_identity("d1", md, "deregister")
        with pytest.raises(PermissionDeniedError):
            w.v.check_heartbeat(router_pb2.HeartbeatRequest(worker_id="d1", stats=stats()), md)
    with pytest.raises(PermissionDeniedError):  # an unknown id has no token either
        w.v.check_identity("nobody", worker_metadata(tok), "deregister")
    # the real worker may not inflate its capacity through a heartbeat
    with pytest.raises(PermissionDeniedError, match="register again"):
        w.v.check_heartbeat(
            router_pb2.HeartbeatRequest(worker_id="d1", stats=stats(kv_blocks_total=9000)),
            worker_metadata(tok),
        )
    with pytest.raises(PermissionDeniedError, match="register again"):  # nor change its request bound
        w.v.check_heartbeat(
            router_pb2.HeartbeatRequest(worker_id="d1", stats=stats(max_model_len=64)),
            worker_metadata(tok),
        )


def test_live_worker_id_cannot_be_taken_over_from_another_address() -> None:
    w = World()
    w.at["127.0.0.1:1"] = stats()
    w.at["127.0.0.1:2"] = stats()  # a second process answering Stats as d1
    tok = w.v.verify_registration(register(), ())
    w.alive.add("d1")
    with pytest.raises(AlreadyExistsError, match="alive at another address"):
        w.v.verify_registration(register(address="127.0.0.1:2"), ())
    assert w.v.tokens.holds("d1", tok)  # the original is untouched
    # the same worker re-registering at its address (e.g. after a router restart) is fine
    tok2 = w.v.verify_registration(register(), ())
    assert w.v.tokens.holds("d1", tok2) and not w.v.tokens.holds("d1", tok)
    # it may move if it proves it is the worker, or once the old one is gone
    w.v.verify_registration(register(address="127.0.0.1:2"), worker_metadata(tok2))
    w.alive.clear()
    w.v.verify_registration(register(address="127.0.0.1:1"), ())
