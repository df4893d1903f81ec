"""LoRA adapters added at run time (#16): the worker's WorkerAdmin.LoadAdapter on a real engine
(loaded off the engine thread, exact output, idempotent retry, name conflicts, bad adapters,
a worker without slots), the router's Admin fan-out over fake workers (partial failure named,
never hidden), and both services' place among the internal services (the cluster token)."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidRequestError,
    ModelNotFoundError,
    UnavailableError,
)
from pdserve.security import INTERNAL_SERVICES, TOKEN_METADATA_KEY, SecurityConfig, TLSMode
from pdserve.v1 import admin_pb2, admin_pb2_grpc
from pdserve.worker_admin import WorkerAdminServicer
from pdserve.worker_base import Role, WorkerConfig, WorkerState
from router.admin_service import ADMIN_SERVICE, AdminServicer
from router.registry import Registry, WorkerKind, WorkerLoad
from tests.lora_adapters import make_adapter, make_tiny_llama

PROMPT = list(range(5, 30))
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_admin")
    base = make_tiny_llama(root)
    a1 = make_adapter(base, root / "a1", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=11)
    a2 = make_adapter(base, root / "a2", r=2, alpha=4, targets=["o_proj"], seed=12)
    return base, a1, a2


def _run(eng: LLMEngine, adapter: str) -> list[int]:
    rid = eng.add_request(None, PROMPT, GREEDY, adapter_id=adapter)
    toks: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                toks = list(o.token_ids)
    return toks


def _state(base, lora: LoRAConfig | None) -> WorkerState:
    ecfg = EngineConfig(num_kv_blocks=32)
    eng = LLMEngine.from_pretrained(base, ecfg, lora=lora)
    return WorkerState(WorkerConfig("w0", Role.DECODE, str(base), "127.0.0.1:1", engine=ecfg, lora=lora), eng)


def test_worker_loads_an_adapter_at_run_time_exactly(tiny):
    """A worker started with slots and no adapter (--max-lora-rank) loads one at run time; its
    output then equals an engine started with the adapter; a retry from the same folder is a
    no-op, another folder under the same name is ALREADY_EXISTS, a bad adapter names the field."""
    base, a1, a2 = tiny
    st = _state(base, LoRAConfig((), max_lora_rank=8))
    try:
        svc = WorkerAdminServicer(st)
        with pytest.raises(ModelNotFoundError):
            st.engine.check_adapter("sql")
        r = svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path=str(a1)), None)
        assert list(r.workers) == ["w0"] and st.engine.lora.names() == ["sql"]
        got = st.loop.call(lambda e: _run(e, "sql"), timeout_s=120)  # on the worker's engine thread
        # heartbeats tell the router where the adapter is and what loading one costs (TTFT)
        from router.registry_service import load_from_proto

        stats = st.stats()
        assert list(stats.adapters_in_slot) == ["sql"] and list(stats.adapters_in_host) == ["sql"]
        assert stats.adapter_disk_load_s > 0 and stats.adapter_slot_load_s > 0
        load = load_from_proto(stats)
        assert (
            load.adapters_in_slot == frozenset({"sql"})
            and load.adapter_disk_load_s == stats.adapter_disk_load_s
        )
        assert svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path=str(a1)), None).workers == ["w0"]
        with pytest.raises(AlreadyExistsError, match="'sql' is already served by worker w0"):
            svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path=str(a2)), None)
        bad = a1.parent / "bad"
        shutil.copytree(a1, bad)
        conf = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
        with pytest.raises(InvalidRequestError, match=r"worker w0: .*'bad'.*use_dora"):
            svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="bad", path=str(bad)), None)
        with pytest.raises(InvalidRequestError, match="not valid"):
            svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="bad name", path=str(a1)), None)
        assert st.engine.lora.names() == ["sql"]  # nothing else registered
        assert st.engine.lora.stats.of("sql").disk_loads == 1
    finally:
        st.close()
    ref = LLMEngine.from_pretrained(
        base, EngineConfig(num_kv_blocks=32), lora=LoRAConfig((AdapterSpec("sql", str(a1)),))
    )
    try:
        want, base_out = _run(ref, "sql"), _run(ref, "")
    finally:
        ref.close()
    assert got == want and got != base_out


def test_a_worker_without_lora_slots_refuses_with_the_fix(tiny):
    base, a1, _ = tiny
    st = _state(base, None)
    try:
        with pytest.raises(FailedPreconditionError, match="--max-lora-rank"):
            WorkerAdminServicer(st).LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path=str(a1)), None)
    finally:
        st.close()


def _registry(*workers: tuple[str, WorkerKind, str]) -> Registry:
    reg = Registry(60.0)
    for wid, kind, model in workers:
        reg.register(wid, kind, f"addr-{wid}", model, WorkerLoad(0, 0, 64, 0, block_size=16))
    return reg


def test_router_admin_fans_out_to_every_live_worker_of_its_model():
    reg = _registry(
        ("p0", WorkerKind.PREFILL, "m"), ("d0", WorkerKind.DECODE, "m"), ("x0", WorkerKind.DECODE, "other")
    )
    calls: list[tuple[str, str, str]] = []

    def call(address, req, timeout_s):
        calls.append((address, req.name, req.path))
        return admin_pb2.LoadAdapterResponse(workers=[address.removeprefix("addr-")])

    r = AdminServicer(reg, "m", call=call).LoadAdapter(
        admin_pb2.LoadAdapterRequest(name="sql", path="/a"), None
    )
    assert sorted(r.workers) == ["d0", "p0"]
    assert sorted(calls) == [("addr-d0", "sql", "/a"), ("addr-p0", "sql", "/a")]  # not the other model's


def test_router_admin_names_partial_failure_and_refuses_bad_input():
    reg = _registry(("p0", WorkerKind.PREFILL, "m"), ("d0", WorkerKind.DECODE, "m"))

    def call(address, req, timeout_s):
        if address == "addr-d0":
            raise InvalidRequestError("worker d0: LoRA adapter 'sql': field 'r' = 64 is larger than ...")
        return admin_pb2.LoadAdapterResponse(workers=["p0"])

    svc = AdminServicer(reg, "m", call=call)
    with pytest.raises(
        InvalidRequestError, match=r"loaded on p0 \(they serve it\); failed on d0: worker d0: .*'r'"
    ):
        svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="sql", path="/a"), None)
    with pytest.raises(InvalidRequestError, match="not valid"):
        svc.LoadAdapter(admin_pb2.LoadAdapterRequest(name="", path="/a"), None)
    with pytest.raises(UnavailableError, match="no live worker of model 'n'"):
        AdminServicer(reg, "n", call=call).LoadAdapter(
            admin_pb2.LoadAdapterRequest(name="sql", path="/a"), None
        )

    def unreachable(address, req, timeout_s):
        raise OSError("connection refused")

    with pytest.raises(UnavailableError, match="loaded on no worker; failed on p0: OSError"):
        AdminServicer(reg, "m", call=unreachable).LoadAdapter(
            admin_pb2.LoadAdapterRequest(name="sql", path="/a"), None
        )


def test_admin_services_are_internal_and_need_the_cluster_token():
    from pdserve.grpc_server import start_server

    assert {"pdserve.v1.Admin", "pdserve.v1.WorkerAdmin"} <= INTERNAL_SERVICES
    reg = _registry(("p0", WorkerKind.PREFILL, "m"))
    svc = AdminServicer(reg, "m", call=lambda a, r, t: admin_pb2.LoadAdapterResponse(workers=["p0"]))
    cfg = SecurityConfig(tls=TLSMode.OFF, cluster_token="s3cret-token")
    server, port, _ = start_server([(ADMIN_SERVICE, svc)], "127.0.0.1", 0, max_workers=2, security=cfg)
    try:
        req = admin_pb2.LoadAdapterRequest(name="sql", path="/a")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = admin_pb2_grpc.AdminStub(ch)
            for md in ((), ((TOKEN_METADATA_KEY, "wrong"),)):
                with pytest.raises(grpc.RpcError) as ei:
                    stub.LoadAdapter(req, timeout=10, metadata=md)
                assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.LoadAdapter(req, timeout=10, metadata=((TOKEN_METADATA_KEY, "s3cret-token"),))
            assert list(ok.workers) == ["p0"]
    finally:
        server.stop(0)


def test_router_admin_drain_checks_its_input_and_needs_drain_support():
    reg = _registry(("d0", WorkerKind.DECODE, "m"))
    with pytest.raises(FailedPreconditionError, match="no drain support"):
        AdminServicer(reg, "m").Drain(admin_pb2.DrainRequest(worker_id="d0"), None)

    class Drains:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float]] = []

        def drain(self, wid, timeout_s):
            self.calls.append((wid, timeout_s))
            return wid == "d0"

    d = Drains()
    svc = AdminServicer(reg, "m", drains=d)
    for bad in (admin_pb2.DrainRequest(), admin_pb2.DrainRequest(worker_id="d0", timeout_s=-1)):
        with pytest.raises(InvalidRequestError):
            svc.Drain(bad, None)
    assert svc.Drain(admin_pb2.DrainRequest(worker_id="d0"), None).found
    assert not svc.Drain(admin_pb2.DrainRequest(worker_id="zz", timeout_s=5), None).found
    assert d.calls == [("d0", 120.0), ("zz", 5.0)]  # 0: the default timeout
    assert not svc.DrainStatus(admin_pb2.DrainStatusRequest(worker_id="zz"), None).found
