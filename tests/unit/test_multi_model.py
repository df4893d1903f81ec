"""Several base models behind one router (#16 part 3), the pure and fake-backed parts: which
model a request goes to (router.multi_model.choose_model), the worker verifier over several
models' geometries, the Admin service's LoadAdapter naming a model, drains per model, health
over several models, and the router's command line."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from pdserve.errors import InvalidRequestError, LayoutMismatchError, ModelNotFoundError
from pdserve.v1 import admin_pb2, common_pb2, router_pb2, worker_pb2
from router.admin_service import AdminServicer
from router.health import RouterHealth
from router.multi_model import ModelDrains, choose_model
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad
from router.worker_verify import ExpectedModel, WorkerVerifier

A = ExpectedModel("a", num_layers=2, num_kv_heads=2, head_dim=16)
B = ExpectedModel("b", num_layers=3, num_kv_heads=1, head_dim=32)


def test_choose_model_routes_by_name_and_refuses_ambiguity_and_unknown() -> None:
    assert choose_model("", ["a"]) == "a"  # a single-model router keeps accepting an empty model
    assert choose_model("a", ["a"]) == "a"
    assert choose_model("b", ["a", "b"]) == "b"
    with pytest.raises(InvalidRequestError, match=r"several models \('a', 'b'\).*model field"):
        choose_model("", ["a", "b"])
    with pytest.raises(ModelNotFoundError, match=r"unknown model 'c'; this cluster serves 'a', 'b'"):
        choose_model("c", ["a", "b"])
    with pytest.raises(ModelNotFoundError, match="'a'"):
        choose_model("b", ["a"])


def _stats(
    wid: str, model: str, layers: int, heads: int, dim: int, block: int = 16
) -> worker_pb2.WorkerStats:
    lay = common_pb2.KVLayout(
        model_id=model, num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype="float32", block_size=block
    )
    return worker_pb2.WorkerStats(
        worker_id=wid,
        role=worker_pb2.WORKER_ROLE_DECODE,
        model=model,
        kv_blocks_total=64,
        token_budget=256,
        kv_layout=lay,
    )


def _register(s: worker_pb2.WorkerStats, address: str) -> router_pb2.RegisterRequest:
    return router_pb2.RegisterRequest(
        worker_id=s.worker_id, role=s.role, address=address, model=s.model, stats=s
    )


def test_verifier_checks_each_worker_against_its_own_models_geometry() -> None:
    at: dict[str, worker_pb2.WorkerStats] = {}
    alive: set[str] = set()
    v = WorkerVerifier([A, B], fetch_stats=lambda addr: at[addr], alive=lambda w: w in alive)
    ok_a = _stats("da", "a", 2, 2, 16, block=16)
    ok_b = _stats("db", "b", 3, 1, 32, block=8)  # another block size than model a's workers: fine
    for i, s in enumerate((ok_a, ok_b)):
        at[f"h:{i}"] = s
        assert v.verify_registration(_register(s, f"h:{i}"), ())
        alive.add(s.worker_id)
    # model b's name with model a's geometry: refused, naming b's
    bad = _stats("db2", "b", 2, 2, 16)
    at["h:9"] = bad
    with pytest.raises(LayoutMismatchError, match=r"\(2, 2, 16\); the router's model has \(3, 1, 32\)"):
        v.verify_registration(_register(bad, "h:9"), ())
    # a model nobody serves: refused naming the served ones
    other = _stats("dx", "x", 2, 2, 16)
    at["h:8"] = other
    with pytest.raises(LayoutMismatchError, match=r"serves model 'x'.*this router serves 'a', 'b'"):
        v.verify_registration(_register(other, "h:8"), ())
    # the peers whose block size must match are the same model's only
    b_other_block = _stats("db3", "b", 3, 1, 32, block=16)
    at["h:7"] = b_other_block
    with pytest.raises(LayoutMismatchError, match="block size 16, the registered workers float32 and 8"):
        v.verify_registration(_register(b_other_block, "h:7"), ())
    with pytest.raises(ValueError, match="distinct"):
        WorkerVerifier([A, A], fetch_stats=lambda a: None, alive=lambda w: False)


def _registry(*workers: tuple[str, WorkerKind, str]) -> Registry:
    reg = Registry(heartbeat_timeout_s=1e9)
    for wid, kind, model in workers:
        reg.register(wid, kind, f"addr-{wid}", model, WorkerLoad(0, 0, 64, 0, block_size=16))
    return reg


def test_admin_load_adapter_names_the_model_on_a_multi_model_router() -> None:
    reg = _registry(
        ("pa", WorkerKind.PREFILL, "a"), ("da", WorkerKind.DECODE, "a"), ("db", WorkerKind.DECODE, "b")
    )
    called: list[str] = []

    def call(address, req, timeout_s):
        called.append(address)
        return admin_pb2.LoadAdapterResponse(workers=[address])

    svc = AdminServicer(reg, ["a", "b"], call=call)
    with pytest.raises(InvalidRequestError, match=r"several models \('a', 'b'\)"):
        svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path="/x"), None)
    with pytest.raises(ModelNotFoundError, match="unknown model 'c'"):
        svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path="/x", model="c"), None)
    assert not called
    r = svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path="/x", model="b"), None)
    assert list(r.workers) == ["db"] and called == ["addr-db"]
    called.clear()
    r = svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path="/x", model="a"), None)
    assert sorted(r.workers) == ["da", "pa"] and sorted(called) == ["addr-da", "addr-pa"]
    # a single-model router still takes an empty model (its own)
    called.clear()
    r = AdminServicer(reg, "b", call=call).LoadAdapter(
        admin_pb2.LoadAdapterRequest(name="s", path="/x"), None
    )
    assert list(r.workers) == ["db"]


class _FakeDrains:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str]] = []

    def drain(self, worker_id: str, timeout_s: float = 120.0) -> bool:
        self.calls.append(("drain", worker_id))
        return True

    def migrating(self, worker_id: str) -> bool:
        self.calls.append(("migrating", worker_id))
        return False

    def report(self, worker_id: str):
        self.calls.append(("report", worker_id))
        return None

    def resume(self, worker_id: str) -> bool:
        self.calls.append(("resume", worker_id))
        return True

    def inflight(self, worker_id: str) -> int:
        self.calls.append(("inflight", worker_id))
        return 0


def test_drains_go_to_the_drained_workers_model() -> None:
    reg = _registry(("da", WorkerKind.DECODE, "a"), ("db", WorkerKind.DECODE, "b"))
    da, db = _FakeDrains("a"), _FakeDrains("b")
    d = ModelDrains(reg, {"a": da, "b": db})  # type: ignore[dict-item]
    d.drain("db")
    d.inflight("db")
    d.resume("da")
    d.report("nobody")  # unknown worker: the first model's drains (which answer not found)
    assert db.calls == [("drain", "db"), ("inflight", "db")]
    assert da.calls == [("resume", "da"), ("report", "nobody")]


class _Recorder:
    def __init__(self) -> None:
        self.status: dict[str, int] = {}

    def set(self, service: str, status: int) -> None:
        self.status[service] = status


def test_health_serves_while_any_model_can_place() -> None:
    reg = Registry(heartbeat_timeout_s=1e9)
    rec = _Recorder()
    h = RouterHealth(reg, ("a", "b"), PolicyKind.LEAST_LOADED, rec, sweep_interval_s=60)  # type: ignore[arg-type]
    serving = health_pb2.HealthCheckResponse.SERVING
    load = WorkerLoad(0, 0, 64, 0, block_size=16)
    reg.register("pa", WorkerKind.PREFILL, "x:1", "a", load)
    reg.register("db", WorkerKind.DECODE, "x:2", "b", load)
    assert not h.update()  # a prefill of a and a decode of b place nothing
    assert rec.status[""] != serving
    reg.register("pb", WorkerKind.PREFILL, "x:3", "b", load)
    assert h.update() and rec.status[""] == serving


def test_router_cli_builds_one_config_per_model_and_refuses_what_it_cannot_split(tmp_path) -> None:
    from router.__main__ import _configs, build_parser
    from router.policy import GoodputConfig

    ap = build_parser()
    a = ap.parse_args(["--model", "/m/one", "--model", "/m/two", "--policy", "least_loaded"])
    cfgs = _configs(a, GoodputConfig())
    assert [(c.model_path, c.model_id) for c in cfgs] == [("/m/one", "one"), ("/m/two", "two")]
    assert {c.policy for c in cfgs} == {PolicyKind.LEAST_LOADED}
    a = ap.parse_args(["--model", "/m/one", "--model", "/m/two", "--model-id", "x", "--model-id", "y"])
    assert [c.model_id for c in _configs(a, GoodputConfig())] == ["x", "y"]
    single = _configs(
        ap.parse_args(["--model", "/m/one", "--model-id", "z", "--store", "h:1"]), GoodputConfig()
    )
    assert [(c.model_id, c.store_address) for c in single] == [("z", "h:1")]
    for argv, msg in (
        (["--model", "/m/one", "--model", "/m/two", "--model-id", "x"], "one --model-id per --model"),
        (["--model", "/a/m", "--model", "/b/m"], "distinct"),
        (["--model", "/m/one", "--model", "/m/two", "--store", "h:1"], "--store is not supported"),
        (["--model", "/m/one", "--model", "/m/two", "--direct-streams"], "--direct-streams is not supported"),
        (["--model", "/m/one", "--model", "/m/two", "--latency-profile", "p.json"], "--latency-profile"),
    ):
        with pytest.raises(ValueError, match=msg):
            _configs(ap.parse_args(argv), GoodputConfig())


def test_cluster_spec_takes_model_pools_and_refuses_what_they_cannot_run() -> None:
    from pdserve.launcher import ClusterSpec, ModelPool

    spec = ClusterSpec(models=[ModelPool("/m/a", 1, 2), ModelPool("/m/b", 0, 1)])  # type: ignore[arg-type]
    assert [(p.model_id, p.num_prefill, p.num_decode) for p in spec.pools()] == [("a", 1, 2), ("b", 0, 1)]
    assert [p.model_id for p in ClusterSpec("/m/one", num_prefill=2).pools()] == ["one"]
    for kw, msg in (
        ({}, "either model_path"),
        ({"model_path": "/m/a", "models": (ModelPool("/m/b"),)}, "not both"),
        ({"models": (ModelPool("/x/a"), ModelPool("/y/a"))}, "distinct"),
        ({"models": (ModelPool("/m/a"), ModelPool("/m/b")), "kv_transport": "dist"}, "kv_transport"),
        (
            {"models": (ModelPool("/m/a"), ModelPool("/m/b")), "num_stores": 2, "index_url": "redis://h:1/0"},
            "num_stores",
        ),
    ):
        with pytest.raises(ValueError, match=msg):
            ClusterSpec(**kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_decode >= 1"):
        ModelPool("/m/a", 1, 0)


def test_pdserve_serve_several_models_with_per_model_counts(monkeypatch) -> None:
    import pdserve.launcher as launcher
    from pdserve import cli

    seen = {}

    def fake_launch(spec):
        seen["spec"] = spec
        raise SystemExit(0)  # stop before anything starts

    monkeypatch.setattr(launcher, "launch", fake_launch)
    monkeypatch.setattr("pdserve.model_setup.resolve_model_path", lambda m: f"/models/{m or 'default'}")
    argv = ["serve", "--tls", "off", "--model", "a", "--model", "b", "--prefill", "1", "--decode", "1,2"]
    with pytest.raises(SystemExit):
        cli.main(argv)
    spec = seen.pop("spec")
    assert spec.model_path == ""
    assert [(p.model_path, p.num_prefill, p.num_decode) for p in spec.models] == [
        ("/models/a", 1, 1),
        ("/models/b", 1, 2),
    ]
    with pytest.raises(SystemExit):  # one model: the single-model spec as before
        cli.main(["serve", "--tls", "off", "--decode", "2"])
    spec = seen.pop("spec")
    assert (spec.model_path, spec.models, spec.num_decode) == ("/models/default", (), 2)
    assert cli.main(["serve", "--tls", "off", "--model", "a", "--model", "b", "--decode", "1,2,3"]) == 2
    assert cli.main(["serve", "--tls", "off", "--model", "a", "--model", "b", "--lora", "x=/ad/x"]) == 2
    assert "spec" not in seen  # refused before launching


@pytest.mark.parametrize(
    "flags",
    [
        ["--tenant-max-inflight", "2"],
        ["--slo-margin", "0.3"],
        ["--priority-margin-step", "0.2"],
        ["--local-prefill-max-tokens", "0"],
        ["--price-handoff"],
        ["--shared-cores", "2"],
    ],
)
def test_router_cli_refuses_goodput_flags_under_another_policy(flags) -> None:
    """Only the goodput policy reads these (GoodputConfig): under another --policy they were
    accepted and dropped (a --tenant-max-inflight quota never enforced); now refused by name."""
    from router.__main__ import _configs, build_parser
    from router.policy import GoodputConfig

    ap = build_parser()
    for policy in ("least_loaded", "round_robin", "cache_aware", "colocated"):
        with pytest.raises(ValueError, match=f"{flags[0]} is read by the goodput placement policy only"):
            _configs(ap.parse_args(["--model", "/m/one", "--policy", policy, *flags]), GoodputConfig())
    (cfg,) = _configs(ap.parse_args(["--model", "/m/one", "--policy", "goodput", *flags]), GoodputConfig())
    assert cfg.policy is PolicyKind.GOODPUT
    (cfg,) = _configs(ap.parse_args(["--model", "/m/one", "--policy", "least_loaded"]), GoodputConfig())
    assert cfg.policy is PolicyKind.LEAST_LOADED  # the defaults are not "given"


@pytest.mark.parametrize(
    ("flags", "why"),
    [
        (["--rebalance-gap", "2"], "--rebalance-gap is read only with --rebalance-interval-s > 0"),
        (
            ["--rebalance-defrag-wait-s", "-1"],
            "--rebalance-defrag-wait-s is read only with --rebalance-interval-s",
        ),
        (
            ["--rebalance-max-concurrent", "4"],
            "--rebalance-max-concurrent is read only with --rebalance-interval",
        ),
        (
            ["--priority-headroom-blocks", "8"],
            "--priority-headroom-blocks is read only with --rebalance-interval",
        ),
        (["--high-priority", "-2"], "--high-priority is read only with --rebalance-interval-s"),
        (
            ["--migration", "off", "--migration-transport", "store"],
            "--migration-transport is read only with --migration on",
        ),
        (["--kv-stream-chunk-tokens", "128"], "--kv-stream-chunk-tokens is read only with --kv-stream"),
    ],
)
def test_router_cli_refuses_a_flag_whose_feature_is_off(flags, why) -> None:
    """These were accepted and dropped when the feature they tune was off (rebalancing, live
    migration, chunk-wise KV streaming); refused by name now, kept when it is on."""
    from router.__main__ import _needs_another_flag, build_parser

    ap = build_parser()
    with pytest.raises(ValueError, match=why):
        _needs_another_flag(ap, ap.parse_args(["--model", "/m/one", *flags]))
    _needs_another_flag(ap, ap.parse_args(["--model", "/m/one"]))  # the defaults are not "given"
    on = ["--rebalance-interval-s", "1", "--kv-stream", "grpc", "--price-handoff"]
    if "--migration" not in flags:
        _needs_another_flag(ap, ap.parse_args(["--model", "/m/one", *on, *flags]))


def test_router_cli_refuses_kv_stream_chunk_tokens_where_no_handoff_is_priced() -> None:
    """--kv-stream-chunk-tokens feeds GoodputConfig.handoff_chunk_tokens only, which the goodput
    policy reads only with --price-handoff: under another --policy, or without --price-handoff,
    it was accepted with --kv-stream on and dropped; refused by name now."""
    from router.__main__ import _configs, _needs_another_flag, build_parser
    from router.policy import GoodputConfig

    ap = build_parser()
    chunk = ["--kv-stream", "grpc", "--kv-stream-chunk-tokens", "128"]
    for policy in ("least_loaded", "round_robin", "cache_aware", "colocated"):
        a = ap.parse_args(["--model", "/m/one", "--policy", policy, *chunk])
        with pytest.raises(
            ValueError, match="--kv-stream-chunk-tokens is read by the goodput placement policy"
        ):
            _configs(a, GoodputConfig())
        _configs(
            ap.parse_args(["--model", "/m/one", "--policy", policy, "--kv-stream", "grpc"]), GoodputConfig()
        )
    with pytest.raises(ValueError, match="--kv-stream-chunk-tokens is read only with --price-handoff"):
        _needs_another_flag(ap, ap.parse_args(["--model", "/m/one", *chunk]))
    a = ap.parse_args(["--model", "/m/one", "--price-handoff", *chunk])
    _needs_another_flag(ap, a)
    (cfg,) = _configs(a, GoodputConfig())
    assert cfg.kv_stream_chunk_tokens == 128
