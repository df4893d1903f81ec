"""LoRA adapters through a launched cluster (#16): workers started with --lora serve the adapter,
the router checks and lists it, and a disaggregated request naming it (prefill worker -> store ->
decode worker) produces exactly the engine's own output with that adapter; the base model and an
unknown adapter behave as they must. An adapter loaded at run time (`pdserve adapters load`, the
routers' Admin service; the cluster token required) is served the same way through either router.
The OpenAI HTTP server in front lists the adapter in ``/v1/models`` (with its ``parent``) and the
official ``openai`` client naming it as ``model`` gets the adapter's output.
One cluster (SmolLM2, 1 prefill + 1 decode, 2 routers, TLS; the goodput policy without local
prefill, so every request runs disaggregated) for the module."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora import AdapterSpec, LoRAConfig
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import ModelNotFoundError
from pdserve.launcher import ClusterSpec, launch
from tests.lora_adapters import make_adapter

PROMPT = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def adapter(smollm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "sql"
    return make_adapter(smollm_path, out, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], seed=3)


@pytest.fixture(scope="module")
def chat_adapter(smollm_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "chat"
    return make_adapter(smollm_path, out, r=4, alpha=8, targets=["k_proj", "o_proj", "up_proj"], seed=7)


@pytest.fixture(scope="module")
def cluster(smollm_path, adapter):
    cl = launch(
        ClusterSpec(
            model_path=str(smollm_path),
            worker_kv_blocks=512,
            store_capacity_blocks=1024,
            # slots of rank 8: the started adapter, and room for adapters loaded at run time
            worker_args=("--lora", f"sql={adapter}", "--max-lora-rank", "8"),
            tls=True,
            num_routers=2,
            # goodput placement without local prefill: every request is prefilled on the prefill
            # worker and decoded on the decode worker (a short prompt would otherwise run whole on
            # the decode worker, and the handoff with an adapter would go untested here)
            router_args=("--local-prefill-max-tokens", "0"),
        )
    )
    yield cl
    cl.stop()


def _client(cluster, address: str | None = None) -> Client:
    return Client(address or cluster.router_address, timeout=120, ca=str(cluster.pki.ca))


def _engine_output(smollm_path, adapter, name: str, params: SamplingParams, chat=None) -> list[int]:
    """The engine whole, in this process, with the same adapter served (``name`` "" = base)."""
    specs = [AdapterSpec("sql", str(adapter))] + ([AdapterSpec("chat", str(chat))] if chat else [])
    lora = LoRAConfig(tuple(specs))
    eng = LLMEngine.from_pretrained(smollm_path, EngineConfig(num_kv_blocks=256), lora=lora)
    rid = eng.add_request(None, eng.tokenizer.encode(PROMPT), params, adapter_id=name)
    toks: list[int] = []
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid:
                toks = list(o.token_ids)
    return toks


def _prefill_worker_stats(cluster):
    """The prefill worker's Stats (an internal call: TLS client certificate and cluster token)."""
    from pdserve.security import internal_channel
    from pdserve.v1 import worker_pb2, worker_pb2_grpc

    with internal_channel(cluster.workers["prefill-0"], cluster.security) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=30)


def test_adapter_is_listed_served_exactly_and_unknown_ones_refused(cluster, smollm_path, adapter) -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0)
    with _client(cluster) as c:
        assert list(c.list_adapters().values())[0][:1] == ["sql"]
        before = _prefill_worker_stats(cluster)
        with_adapter = c.complete(PROMPT, params, adapter="sql").token_ids
        after = _prefill_worker_stats(cluster)
        # disaggregated: the prefill worker computed the prompt with the adapter in one of its slots
        assert after.prefill_tokens_computed_total > before.prefill_tokens_computed_total
        assert "sql" in after.adapters_in_slot and "sql" not in before.adapters_in_slot
        base = c.complete(PROMPT, params).token_ids
        with pytest.raises(ModelNotFoundError, match="'nope'"):
            c.complete(PROMPT, params, adapter="nope")
    want_adapter = _engine_output(smollm_path, adapter, "sql", params)
    want_base = _engine_output(smollm_path, adapter, "", params)
    assert with_adapter == want_adapter and base == want_base
    assert with_adapter != base  # the adapter changes the output: it was really applied


def test_adapter_loaded_at_run_time_is_served_by_every_router(cluster, smollm_path, adapter, chat_adapter):
    """`pdserve adapters load` (the routers' Admin): refused without the cluster token; with it,
    every worker loads the adapter and registers again with both routers, and a request naming
    it through the other router equals the engine whole with that adapter."""
    from dataclasses import replace

    from pdserve.adapters_cli import load_adapter
    from pdserve.errors import UnauthenticatedError

    sec = cluster.security  # what the cluster's processes run with: TLS, client cert, token
    with pytest.raises(UnauthenticatedError, match="cluster token"):
        load_adapter(
            cluster.router_address,
            "chat",
            str(chat_adapter),
            60,
            replace(sec, cluster_token="", cluster_token_file=""),
        )
    with _client(cluster) as c, pytest.raises(ModelNotFoundError, match="'chat'"):
        c.complete(PROMPT, SamplingParams(max_tokens=4, temperature=0.0), adapter="chat")
    workers = load_adapter(cluster.router_address, "chat", str(chat_adapter), 180, sec)
    assert sorted(workers) == ["decode-0", "prefill-0"]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    for address in cluster.router_addresses:  # the worker re-registered with both routers
        with _client(cluster, address) as c:
            assert sorted(next(iter(c.list_adapters().values()))) == ["chat", "sql"]
    with _client(cluster, cluster.router_addresses[1]) as c:
        got = c.complete(PROMPT, params, adapter="chat").token_ids
    assert got == _engine_output(smollm_path, adapter, "chat", params, chat=chat_adapter)
    assert workers == load_adapter(
        cluster.router_address, "chat", str(chat_adapter), 180, sec
    )  # retry: no-op


def test_openai_client_naming_the_adapter_gets_its_output(cluster, adapter) -> None:
    """The OpenAI HTTP server in front of the cluster: ``/v1/models`` lists the adapter with its
    base model as ``parent``; the official client with ``model`` = the adapter's name gets the
    adapter's output (== the SDK's with ``adapter=``, != the base model's); an unknown name is
    404 ``model_not_found`` with OpenAI's error shape."""
    import json
    import urllib.request

    import openai

    from pdserve.openai_api.server import OpenAIServer, ServerConfig

    params = SamplingParams(max_tokens=16, temperature=0.0)
    with _client(cluster) as c:
        (base,) = c.list_models()
        want = c.complete(PROMPT, params, adapter="sql")
        want_base = c.complete(PROMPT, params)
    assert want.text != want_base.text
    srv = OpenAIServer(
        ServerConfig(router=cluster.router_address, port=0, tls="off", request_timeout_s=120),
        client_options={"ca": str(cluster.pki.ca)},
    ).start()
    oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        with urllib.request.urlopen(srv.url + "/v1/models", timeout=60) as r:
            listed = {m["id"]: m.get("parent") for m in json.loads(r.read())["data"]}
        assert listed.get(base, "absent") is None and listed.get("sql") == base, listed
        with urllib.request.urlopen(srv.url + "/v1/models/sql", timeout=60) as r:
            assert json.loads(r.read())["parent"] == base
        got = oa.completions.create(model="sql", prompt=PROMPT, max_tokens=16, temperature=0)
        assert got.model == "sql" and got.choices[0].text == want.text
        got_base = oa.completions.create(model=base, prompt=PROMPT, max_tokens=16, temperature=0)
        assert got_base.choices[0].text == want_base.text
        with pytest.raises(openai.NotFoundError, match="nope") as ei:
            oa.completions.create(model="nope", prompt=PROMPT, max_tokens=4)
        body = ei.value.body
        assert set(body) == {"message", "type", "param", "code"}, body
        assert body["code"] == "model_not_found" and body["param"] == "model"
    finally:
        oa.close()
        srv.close()
