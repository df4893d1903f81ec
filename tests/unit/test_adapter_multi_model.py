"""LoRA adapters on a router serving several base models (#16 parts 2 and 3): each model's adapters
are its own workers' (an adapter fits one base model). ListModels lists every model with its own
adapters; a request naming one model and another model's adapter is NOT_FOUND, never served by the
wrong base model; OpenAI's ``model`` naming an adapter resolves to that adapter's base model, and
``/v1/models`` lists each adapter under its own ``parent``."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from pdserve.errors import ModelNotFoundError
from pdserve.metrics import RouterMetrics
from pdserve.openai_api.errors import UnknownModelError
from pdserve.openai_api.translate import models_response, resolve_target
from pdserve.v1 import client_pb2
from router.multi_model import ModelDispatcher
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig

LOAD = WorkerLoad(kv_blocks_total=64, block_size=16, token_budget=256)


@pytest.fixture(scope="module")
def front(smollm_path):
    reg = Registry(heartbeat_timeout_s=1e9)
    for m, adapters in (("a", ("sql",)), ("b", ("chat", "legal"))):
        reg.register(f"p-{m}", WorkerKind.PREFILL, f"127.0.0.1:1{m}", m, LOAD, adapters=adapters)
        reg.register(f"d-{m}", WorkerKind.DECODE, f"127.0.0.1:2{m}", m, LOAD, adapters=adapters)
    metrics = RouterMetrics(CollectorRegistry(), ["a", "b"])
    svcs = {
        m: GenerateServicer(
            reg, RouterConfig(model_path=str(smollm_path), model_id=m), metrics, track_gauges=False
        )
        for m in ("a", "b")
    }
    return ModelDispatcher(svcs), svcs


def test_list_models_gives_each_model_its_own_adapters(front) -> None:
    dispatcher, _ = front
    resp = dispatcher.ListModels(client_pb2.ListModelsRequest(), None)
    assert [(m.id, list(m.adapters)) for m in resp.models] == [("a", ["sql"]), ("b", ["chat", "legal"])]


def test_another_models_adapter_is_not_found(front) -> None:
    _, svcs = front
    svcs["a"]._check_adapter("sql")
    svcs["b"]._check_adapter("chat")
    with pytest.raises(
        ModelNotFoundError, match=r"'chat' is not served by this cluster \(adapters served: sql\)"
    ):
        svcs["a"]._check_adapter("chat")
    with pytest.raises(ModelNotFoundError, match="'sql' is not served by this cluster"):
        svcs["b"]._check_adapter("sql")
    view = svcs["b"]._views.build(svcs["b"].registry, "b", svcs["b"].outstanding, svcs["b"].kv_tokens)
    assert {i.instance_id for i in svcs["b"].placer.serving(view, "legal").instances} == {"p-b", "d-b"}


def test_openai_model_naming_an_adapter_resolves_to_its_base_model(front) -> None:
    dispatcher, _ = front
    resp = dispatcher.ListModels(client_pb2.ListModelsRequest(), None)
    served = [m.id for m in resp.models]
    adapters = {m.id: list(m.adapters) for m in resp.models}  # what the OpenAI server caches
    assert resolve_target("sql", served, adapters) == ("a", "sql")
    assert resolve_target("legal", served, adapters) == ("b", "legal")
    assert resolve_target("b", served, adapters) == ("b", "")
    with pytest.raises(UnknownModelError, match="'nope' does not exist.*a, b, sql, chat, legal"):
        resolve_target("nope", served, adapters)
    body = models_response(served, 7, adapters)
    assert [(m["id"], m.get("parent")) for m in body["data"]] == [
        ("a", None),
        ("b", None),
        ("sql", "a"),
        ("chat", "b"),
        ("legal", "b"),
    ]
