"""The router serves the LoRA adapters its live workers registered (#16): a request naming one is
checked against them (NOT_FOUND otherwise), ListModels lists them, and placement is narrowed to
the workers that serve the request's adapter."""

from __future__ import annotations

import pytest

from pdserve.errors import ErrorCode, ModelNotFoundError
from pdserve.v1 import client_pb2
from router.registry import WorkerKind, WorkerLoad

LOAD = WorkerLoad(kv_blocks_total=64, block_size=16, token_budget=256)


@pytest.fixture(scope="module")
def svc(smollm_path):
    from prometheus_client import CollectorRegistry

    from pdserve.metrics import RouterMetrics
    from router.registry import Registry
    from router.service import GenerateServicer, RouterConfig

    reg = Registry(heartbeat_timeout_s=1e9)
    reg.register("p0", WorkerKind.PREFILL, "127.0.0.1:1", "smol", LOAD, adapters=("sql",))
    reg.register("p1", WorkerKind.PREFILL, "127.0.0.1:2", "smol", LOAD)
    reg.register("d0", WorkerKind.DECODE, "127.0.0.1:3", "smol", LOAD, adapters=("sql", "chat"))
    reg.register("d1", WorkerKind.DECODE, "127.0.0.1:4", "smol", LOAD)
    reg.register("x0", WorkerKind.DECODE, "127.0.0.1:5", "other-model", LOAD, adapters=("legal",))
    cfg = RouterConfig(model_path=str(smollm_path), model_id="smol")
    return GenerateServicer(reg, cfg, RouterMetrics(CollectorRegistry()))


def test_an_adapter_is_served_only_when_live_prefill_and_decode_workers_have_it(svc) -> None:
    svc._check_adapter("")  # the base model
    svc._check_adapter("sql")  # p0 and d0
    with pytest.raises(ModelNotFoundError, match="'chat' is not served by any live prefill worker") as e:
        svc._check_adapter("chat")  # decode only: a request would have nowhere to prefill
    assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(ModelNotFoundError, match="'legal' is not served by this cluster"):
        svc._check_adapter("legal")  # another model's worker's adapter


def test_list_models_names_the_served_adapters(svc) -> None:
    resp = svc.ListModels(client_pb2.ListModelsRequest(), None)
    (m,) = resp.models
    assert m.id == "smol" and list(m.adapters) == ["chat", "sql"]


def test_placement_is_narrowed_to_the_workers_serving_the_adapter(svc) -> None:
    view = svc._views.build(svc.registry, "smol", svc.outstanding, svc.kv_tokens)
    assert {i.instance_id for i in view.instances} == {"p0", "p1", "d0", "d1"}
    assert svc.placer.serving(view, "") is view
    assert {i.instance_id for i in svc.placer.serving(view, "sql").instances} == {"p0", "d0"}
    with pytest.raises(ModelNotFoundError, match="'legal' is not served by any candidate"):
        svc.placer.serving(view, "legal")
