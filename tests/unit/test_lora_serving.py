"""LoRA adapters through the serving layers: worker flags, a worker's NOT_FOUND for an adapter it
does not serve (over gRPC), registration of adapters, the router's adapter catalog and
affinity helper, ListModels, and the OpenAI ``model`` field / ``/v1/models``."""

from __future__ import annotations

import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.errors import ModelNotFoundError
from pdserve.openai_api.errors import FieldError, UnknownModelError
from pdserve.openai_api.translate import models_response, parse_completion, resolve_target
from pdserve.proto_convert import sampling_to_proto
from pdserve.v1 import worker_pb2, worker_pb2_grpc
from pdserve.worker_base import Heartbeater, Role, WorkerConfig, WorkerState, engine_layout
from pdserve.worker_main import parse
from router.adapters import AdapterCatalog, list_models_response, prefer_adapter
from router.registry import Registry, WorkerKind, WorkerLoad
from router.registry_service import REGISTRY_SERVICE, RegistryServicer
from router.service import RouterConfig
from tests.lora_adapters import make_adapter, make_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_serving")
    base = make_tiny_llama(root)
    a1 = make_adapter(base, root / "a1", r=4, alpha=8, targets=["q_proj", "v_proj"], seed=5)
    return base, a1


def test_worker_lora_flags(tiny):
    base, a1 = tiny
    common = ["--worker-id", "w", "--model", str(base), "--store", "127.0.0.1:1"]
    cfg = parse([*common, "--lora", f"sql={a1}", "--lora", f"chat={a1}", "--max-loras", "3"], Role.PREFILL)
    assert cfg.lora == LoRAConfig((AdapterSpec("sql", str(a1)), AdapterSpec("chat", str(a1))), max_loras=3)
    assert parse(common, Role.DECODE).lora is None
    # slots and no adapter: adapters come at run time (WorkerAdmin.LoadAdapter)
    assert parse([*common, "--max-lora-rank", "8"], Role.DECODE).lora == LoRAConfig((), max_lora_rank=8)
    assert parse([*common, "--max-model-len", "4096"], Role.DECODE).engine.max_model_len == 4096
    assert parse(common, Role.DECODE).engine.max_model_len is None
    tp = parse([*common, "--lora", f"a={a1}", "--tp", "2"], Role.DECODE)  # LoRA with tensor parallelism
    assert tp.lora == LoRAConfig((AdapterSpec("a", str(a1)),)) and tp.engine.tensor_parallel_size == 2
    for bad in (
        ["--lora", "nopath"],
        ["--lora", f"a={a1}", "--lora", f"a={a1}"],
        ["--lora", f"a={a1}", "--max-loras", "0"],
        ["--max-cpu-loras", "2"],
        ["--max-model-len", "0"],
    ):
        with pytest.raises(SystemExit):
            parse([*common, *bad], Role.DECODE)


@pytest.fixture(scope="module")
def prefill_worker(tiny):
    """A prefill servicer serving adapter 'a1', on a real gRPC server, with a store node."""
    from kv_store.arena import host_id
    from kv_store.client import KVStoreClient
    from kv_store.service import serve
    from kv_store.store import StoreConfig
    from kv_store.transport import AutoTransport
    from pdserve.worker_main import serve_worker, worker_services
    from prefill_worker.aio_service import AsyncPrefillServicer
    from prefill_worker.publisher import StorePublisher

    base, a1 = tiny
    ecfg = EngineConfig(num_kv_blocks=64)
    lora = LoRAConfig((AdapterSpec("a1", str(a1)),))
    eng = LLMEngine.from_pretrained(base, ecfg, lora=lora)
    srv = serve(StoreConfig(node_id="kv0", layout=engine_layout(eng), capacity_blocks=64))
    store = KVStoreClient(srv.address)
    transport = AutoTransport(host_id())
    st = WorkerState(WorkerConfig("p0", Role.PREFILL, str(base), srv.address, engine=ecfg, lora=lora), eng)
    svc = AsyncPrefillServicer(st, StorePublisher(store), store, transport)
    services, _ = worker_services(svc, Role.PREFILL, None)
    server, port = serve_worker(services, Role.PREFILL, "127.0.0.1", 0, "p0")
    yield f"127.0.0.1:{port}", st, store
    server.stop(0).wait()
    st.close()
    transport.close()
    store.close()
    srv.stop(0)


def test_worker_refuses_unserved_adapter_not_found(prefill_worker, tiny):
    addr, st, store = prefill_worker
    base, a1 = tiny
    prompt = list(range(3, 40))
    sp = sampling_to_proto(SamplingParams(temperature=0.0, max_tokens=4))
    with grpc.insecure_channel(addr) as ch:
        stub = worker_pb2_grpc.WorkerStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            stub.Prefill(
                worker_pb2.PrefillRequest(
                    request_id="x", prompt_token_ids=prompt, sampling=sp, adapter="nope"
                ),
                timeout=30,
            )
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "'nope' is not served" in ei.value.details() and "served: a1" in ei.value.details()
        ok = stub.Prefill(
            worker_pb2.PrefillRequest(request_id="y", prompt_token_ids=prompt, sampling=sp, adapter="a1"),
            timeout=60,
        )
        store.release(ok.kv.lease_id)
    # the first token is the adapter's, not the base model's
    ref = LLMEngine.from_pretrained(
        base, EngineConfig(num_kv_blocks=64), lora=LoRAConfig((AdapterSpec("a1", str(a1)),))
    )
    ref.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=1), adapter_id="a1")
    toks = []
    while ref.has_unfinished():
        toks += [t for o in ref.step() for t in o.new_token_ids]
    assert ok.first_token == toks[0]
    assert st.engine.lora.slots.pins("a1") == 0  # the prefill is done: its adapter slot is free


def test_registration_carries_adapters_and_catalog():
    from pdserve.grpc_server import start_server

    registry = Registry(heartbeat_timeout_s=5.0)
    servicer = RegistryServicer(registry, RouterConfig(model_path="unused", model_id="tiny"))
    server, port, _ = start_server([(REGISTRY_SERVICE, servicer)], "127.0.0.1", 0, name="ctl")

    def state(wid, role, adapters):
        return SimpleNamespace(
            config=SimpleNamespace(worker_id=wid, role=role, heartbeat_interval_s=0.05),
            address=f"127.0.0.1:{len(wid)}",
            engine=SimpleNamespace(model_id="tiny", adapters=lambda: adapters),
            stats=lambda: worker_pb2.WorkerStats(),
        )

    hbs = [
        Heartbeater(state("p0", Role.PREFILL, ["sql", "chat"]), f"127.0.0.1:{port}"),  # type: ignore[arg-type]
        Heartbeater(state("d0", Role.DECODE, ["sql"]), f"127.0.0.1:{port}"),  # type: ignore[arg-type]
        Heartbeater(state("d1", Role.DECODE, []), f"127.0.0.1:{port}"),  # type: ignore[arg-type]
    ]
    for h in hbs:
        h.start()
    try:
        end = time.monotonic() + 10
        while len(registry.alive()) < 3 and time.monotonic() < end:
            time.sleep(0.02)
        assert registry.get("p0").adapters == ("sql", "chat") and registry.get("d1").adapters == ()
        cat = AdapterCatalog.from_registry(registry)
    finally:
        for h in hbs:
            h.stop(deregister=True)
        server.stop(0)
    assert cat.names() == ["chat", "sql"]
    cat.check("sql")
    cat.check("")
    with pytest.raises(ModelNotFoundError, match="'chat' is not served by any live decode worker"):
        cat.check("chat")
    with pytest.raises(ModelNotFoundError, match="'nope' is not served by this cluster.*chat, sql"):
        cat.check("nope")
    assert cat.serving("sql", WorkerKind.DECODE) == {"d0"}
    resp = list_models_response("tiny", 512, cat)
    assert [(m.id, m.max_model_len, list(m.adapters)) for m in resp.models] == [
        ("tiny", 512, ["chat", "sql"])
    ]


def test_prefer_adapter_and_catalog_purity():
    reg = Registry(heartbeat_timeout_s=5.0, clock=lambda: 0.0)
    reg.register("d0", WorkerKind.DECODE, "a:1", "m", WorkerLoad(), adapters=("x",))
    reg.register("d1", WorkerKind.DECODE, "a:2", "m", WorkerLoad())
    reg.register("d2", WorkerKind.DECODE, "a:3", "other", WorkerLoad(), adapters=("y",))
    cat = AdapterCatalog.from_registry(reg, model="m")
    assert cat.names() == ["x"]
    cands = [SimpleNamespace(worker_id=w) for w in ("d1", "d0")]
    wid = lambda c: c.worker_id  # noqa: E731
    assert prefer_adapter(cands, "x", cat.serving("x", WorkerKind.DECODE), wid) == [cands[1]]
    assert prefer_adapter(cands, "", frozenset(), wid) == cands
    with pytest.raises(ModelNotFoundError, match="'y'"):
        prefer_adapter(cands, "y", cat.serving("y", WorkerKind.DECODE), wid)


def test_openai_model_field_names_an_adapter():
    served, adapters = ["smol"], {"smol": ["sql", "chat"]}
    assert resolve_target("sql", served, adapters) == ("smol", "sql")
    assert resolve_target("smol", served, adapters) == ("smol", "")
    assert resolve_target(None, served, adapters) == ("smol", "")
    with pytest.raises(UnknownModelError, match="'nope' does not exist.*smol, sql, chat"):
        resolve_target("nope", served, adapters)
    body = models_response(served, 7, adapters)
    assert [(m["id"], m.get("parent")) for m in body["data"]] == [
        ("smol", None),
        ("sql", "smol"),
        ("chat", "smol"),
    ]


def test_openai_model_field_naming_an_adapter_of_two_base_models_is_refused():
    """An adapter name served under two base models (or an adapter named like another base
    model) is a 400 naming both, never routed to the first model listed."""
    served, adapters = ["a", "b"], {"a": ["sql", "chat"], "b": ["sql", "a"]}
    with pytest.raises(FieldError, match="'sql' is ambiguous.*of each of a, b") as e:
        resolve_target("sql", served, adapters)
    assert e.value.param == "model"
    with pytest.raises(FieldError, match="'a' is ambiguous.*of each of a, b"):
        resolve_target("a", served, adapters)
    assert resolve_target("chat", served, adapters) == ("a", "chat")
    assert resolve_target("b", served, adapters) == ("b", "")
    call = parse_completion({"model": "sql", "prompt": "hi"})
    kw = call.sdk_kwargs("smol", "r1", "sql")
    assert kw["model"] == "smol" and kw["adapter"] == "sql"
    from pdserve.client import build_request

    assert build_request(call.sdk_prompt(), call.params, **kw).adapter == "sql"


def test_engine_refuses_unserved_adapter_before_any_work(tiny):
    base, a1 = tiny
    eng = LLMEngine.from_pretrained(
        base, EngineConfig(num_kv_blocks=16), lora=LoRAConfig((AdapterSpec("a1", str(a1)),))
    )
    blocks = torch.zeros(1, 2, 2, 16, 2, 16)  # one block: [layers, K/V, block_size, kv heads, head_dim]
    with pytest.raises(ModelNotFoundError, match="'b2' is not served"):
        eng.import_kv("r", [1, 2, 3], 4, blocks, SamplingParams(), adapter_id="b2")
    assert eng.stats().kv_blocks_used == 0


def test_decode_admission_waits_for_a_lora_slot(tiny, tmp_path):
    """With one slot, a handoff for a second adapter is not admitted while the first runs
    (the decode worker waits on can_admit instead of failing the import)."""
    base, a1 = tiny
    a2 = make_adapter(base, tmp_path / "a2", r=2, alpha=4, targets=["o_proj"], seed=6)
    lora = LoRAConfig((AdapterSpec("a1", str(a1)), AdapterSpec("a2", str(a2))), max_loras=1)
    eng = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=32), lora=lora)
    assert eng.can_admit(4, "a1") and eng.can_admit(4, "a2") and not eng.can_admit(4, "zz")
    eng.add_request("r1", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), adapter_id="a1")
    eng.add_request("r2", [4, 5, 6], SamplingParams(max_tokens=3, ignore_eos=True), adapter_id="a2")
    assert not eng.can_admit(4, "a2") and eng.can_admit(4, "a1") and eng.can_admit(4)
    assert eng.stats().num_waiting == 2  # r2 waits outside the scheduler for the slot
    done = []
    while eng.has_unfinished():
        done += [o.request_id for o in eng.step() if o.finished]
    assert done == ["r1", "r2"] and eng.can_admit(4, "a1")


def test_adapter_read_from_disk_does_not_stall_other_requests(tiny, tmp_path, monkeypatch):
    """An adapter dropped from host memory is re-read on a background thread; meanwhile the
    base-model request keeps decoding to its end, then the adapter's request runs."""
    import threading

    import engine.lora.manager as manager

    base, a1 = tiny
    a2 = make_adapter(base, tmp_path / "a2", r=2, alpha=4, targets=["o_proj"], seed=7)
    lora = LoRAConfig((AdapterSpec("a1", str(a1)), AdapterSpec("a2", str(a2))), max_cpu_loras=1)
    eng = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=32), lora=lora)
    assert eng.lora.host_resident() == ["a2"]  # a1 was dropped from host memory (cap 1)
    gate = threading.Event()
    real = manager.load_adapter

    def slow_load(*args, **kw):
        gate.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(manager, "load_adapter", slow_load)
    sp = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    eng.add_request("lora", [1, 2, 3], sp, adapter_id="a1")
    eng.add_request("base", [4, 5, 6], sp)
    done = []
    for _ in range(50):
        done += [o.request_id for o in eng.step() if o.finished]
        if "base" in done:
            break
    assert done == ["base"] and eng.has_request("lora")  # the base request did not wait
    gate.set()
    while eng.has_unfinished():
        done += [o.request_id for o in eng.step() if o.finished]
    assert done == ["base", "lora"] and eng.lora.stats.disk_loads == 3


def test_adapter_gone_from_disk_aborts_only_its_request(tiny, tmp_path):
    import shutil

    base, a1 = tiny
    a1_copy = tmp_path / "a1_copy"
    shutil.copytree(a1, a1_copy)
    a2 = make_adapter(base, tmp_path / "a2", r=2, alpha=4, targets=["o_proj"], seed=8)
    lora = LoRAConfig((AdapterSpec("a1", str(a1_copy)), AdapterSpec("a2", str(a2))), max_cpu_loras=1)
    eng = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=32), lora=lora)
    shutil.rmtree(a1_copy)  # a1 is not in host memory (cap 1) and now cannot be re-read
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    eng.add_request("gone", [1, 2, 3], sp, adapter_id="a1")
    eng.add_request("ok", [4, 5, 6], sp, adapter_id="a2")
    fin = {}
    while eng.has_unfinished():
        fin.update({o.request_id: o for o in eng.step() if o.finished})
    assert fin["gone"].finish_reason.value == "abort" and fin["gone"].token_ids == []
    assert fin["ok"].finish_reason.value == "length" and len(fin["ok"].token_ids) == 3


def test_per_adapter_metrics_count_tokens_loads_and_residency(tiny, tmp_path):
    """pdserve_worker_adapter_{tokens,loads,resident}: each adapter's prefill and decode tokens,
    its loads into the engine slot and host memory, and where it is held now (#16)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from pdserve.metrics import WorkerMetrics
    from pdserve.worker_base import adapter_snapshots

    base, a1 = tiny
    a2 = make_adapter(base, tmp_path / "a2", r=2, alpha=4, targets=["o_proj"], seed=6)
    lora = LoRAConfig((AdapterSpec("a1", str(a1)), AdapterSpec("a2", str(a2))), max_loras=1)
    eng = LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=32), lora=lora)
    try:
        sp = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
        eng.add_request("r1", [1, 2, 3, 4, 5], sp, adapter_id="a1")
        eng.add_request("r2", [6, 7], sp, adapter_id="a2")
        eng.add_request("r3", [8, 9, 10], sp)  # base model: counted under no adapter
        while eng.has_unfinished():
            eng.step()
        snaps = {a.name: a for a in adapter_snapshots(eng)}
        # the first token comes from the prefill step: 2 more decode steps of 1 token each
        assert (snaps["a1"].prefill_tokens, snaps["a1"].decode_tokens) == (5, 2)
        assert (snaps["a2"].prefill_tokens, snaps["a2"].decode_tokens) == (2, 2)
        # one slot: a1 then a2 were each written into it once; a2 holds it now
        assert (snaps["a1"].slot_loads, snaps["a2"].slot_loads) == (1, 1)
        assert (snaps["a1"].in_slot, snaps["a2"].in_slot) == (False, True)
        assert snaps["a1"].in_host and snaps["a1"].disk_loads == 1  # read once, at registration

        reg = CollectorRegistry()
        from pdserve.metrics import WorkerSnapshot

        snap = WorkerSnapshot(0, 0, 32, 0, 0, 64, 0, 0, 0, 0, 3, 0, 0, 0, adapters=tuple(snaps.values()))
        WorkerMetrics(reg, "d0", "decode", snapshot=lambda: snap)
        text = generate_latest(reg).decode()
        assert (
            'pdserve_worker_adapter_tokens_total{adapter="a1",phase="prefill",role="decode",worker_id="d0"} 5.0'
            in text
        )
        assert (
            'pdserve_worker_adapter_tokens_total{adapter="a2",phase="decode",role="decode",worker_id="d0"} 2.0'
            in text
        )
        assert (
            'pdserve_worker_adapter_loads_total{adapter="a2",role="decode",tier="slot",worker_id="d0"} 1.0'
            in text
        )
        assert (
            'pdserve_worker_adapter_resident{adapter="a1",role="decode",tier="slot",worker_id="d0"} 0.0'
            in text
        )
        assert (
            'pdserve_worker_adapter_resident{adapter="a2",role="decode",tier="slot",worker_id="d0"} 1.0'
            in text
        )
    finally:
        eng.close()
    assert adapter_snapshots(LLMEngine.from_pretrained(base, EngineConfig(num_kv_blocks=8))) == ()
