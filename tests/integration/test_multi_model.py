"""Two base models in one cluster (#16 part 3): one router serving both
(router.multi_model.ModelDispatcher over one GenerateServicer per model), in-process decode
workers of each model on 127.0.0.1, the SDK and the OpenAI HTTP server in front.

The two tiny random models have different geometries (layers, KV heads, head dim, context);
SmolLM2's tokenizer serves both. Colocated placement: each request runs whole on a decode worker
of its model (the routing under test is the router's; the prefill/decode handoff is covered
elsewhere and, for several models, by the launcher test).

* requests routed by model, concurrently mixed: greedy and seeded outputs (tokens and text) ==
  each model's engine run whole;
* each model's placement sees only its own workers (its policy is its own object and every
  cluster view it was given names only its model's workers), and each model's context bound is
  its own;
* refusals: no model on this multi-model router (INVALID_ARGUMENT naming both; OpenAI 400), an
  unknown model (NOT_FOUND naming both; OpenAI 404), for Generate and Tokenize;
* ListModels and ``/v1/models`` list both; an OpenAI completion naming a model == the SDK's.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from pdserve.client import Client
from pdserve.errors import InvalidRequestError, ModelNotFoundError
from pdserve.metrics import RouterMetrics
from pdserve.v1 import client_pb2, worker_pb2
from pdserve.worker_base import Role, WorkerConfig, WorkerState
from router.multi_model import ModelDispatcher
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig
from tests.polling import wait_for

BLOCKS = 128
BLOCK_SIZE = 16
CALL_S = 120.0
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
# model -> (config overrides, its decode workers); A: 2 layers, 2 KV heads of 16; B: 3 layers,
# 1 KV head of 24, a shorter context
MODELS: dict[str, tuple[dict[str, int], tuple[str, ...]]] = {
    "tiny-a": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512),
        ("a-dec-0", "a-dec-1"),
    ),
    "tiny-b": (
        dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=1, max_position_embeddings=256),
        ("b-dec-0",),
    ),
}  # fmt: skip


def make_model(root: Path, name: str, overrides: dict[str, int], tokenizer_from: Path) -> Path:
    """A tiny random-weight Llama saved as an HF folder named ``name`` with SmolLM2's tokenizer."""
    from transformers import LlamaConfig

    from tests.tiny_models import random_model

    cfg = LlamaConfig(vocab_size=320, rms_norm_eps=1e-5, tie_word_embeddings=False, **overrides)
    model = random_model(cfg, sum(map(ord, name)))
    d = root / name
    model.save_pretrained(d, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, d / f)
    return d


class _Worker:
    """An in-process decode worker (engine + gRPC server)."""

    def __init__(self, path: Path, name: str) -> None:
        from decode_worker.service import AsyncDecodeServicer
        from pdserve.metrics import KVPullMetrics
        from pdserve.worker_main import serve_worker

        eng = LLMEngine.from_pretrained(path, EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE))
        cfg = WorkerConfig(worker_id=name, role=Role.DECODE, model_path=str(path), store_address="")
        self.state = WorkerState(cfg, eng)
        self.svc = AsyncDecodeServicer(
            self.state, None, KVPullMetrics(CollectorRegistry(), name), stream_window_s=0.0
        )
        services = [(worker_pb2.DESCRIPTOR.services_by_name["Worker"], self.svc)]
        self.server, port = serve_worker(services, Role.DECODE, "127.0.0.1", 0, name)
        self.address = self.state.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop(0).wait()
        self.svc.close()
        self.state.close()


class _RecordingPolicy:
    """Wraps a servicer's placement policy: records the worker ids of every view it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: set[str] = set()
        self.decisions = 0

    def place(self, info, view):
        self.seen.update(i.instance_id for i in view.instances)
        self.decisions += 1
        return self.inner.place(info, view)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Cluster:
    def __init__(self, paths: dict[str, Path]) -> None:
        from pdserve.grpc_server import start_aio_server

        self.paths = paths
        self.workers = {w: _Worker(paths[m], w) for m, (_, ws) in MODELS.items() for w in ws}
        self.registry = Registry(heartbeat_timeout_s=1e9)  # no heartbeats here: never expire
        for m, (_, ws) in MODELS.items():
            for w in ws:
                load = WorkerLoad(0, 0, BLOCKS, 0, block_size=BLOCK_SIZE)
                self.registry.register(w, WorkerKind.DECODE, self.workers[w].address, m, load)
        self.prom = CollectorRegistry()
        metrics = RouterMetrics(self.prom, list(MODELS))  # a model label: it serves several
        self.svcs = {
            m: GenerateServicer(
                self.registry,
                RouterConfig(model_path=str(paths[m]), model_id=m, policy=PolicyKind.COLOCATED),
                metrics,
                track_gauges=False,
            )
            for m in MODELS
        }
        self.recorders = {}
        for m, svc in self.svcs.items():
            svc.policy = self.recorders[m] = _RecordingPolicy(svc.policy)  # type: ignore[assignment]
        self.front = ModelDispatcher(self.svcs)
        self.front.track_gauges()
        services = [(client_pb2.DESCRIPTOR.services_by_name["Generate"], self.front)]
        self.server, port, _ = start_aio_server(services, "127.0.0.1", 0, name="router")
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.stop(0)
        for w in self.workers.values():
            w.stop()


@pytest.fixture(scope="module")
def paths(tmp_path_factory, smollm_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multi")
    return {m: make_model(root, m, over, smollm_path) for m, (over, _) in MODELS.items()}


@pytest.fixture(scope="module")
def cluster(paths):
    cl = _Cluster(paths)
    yield cl
    cl.stop()


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout=CALL_S) as c:
        yield c


@pytest.fixture(scope="module")
def reference(paths) -> dict[str, LLMEngine]:
    """Each model's engine, run whole (the outputs the cluster must reproduce)."""
    return {
        m: LLMEngine.from_pretrained(p, EngineConfig(num_kv_blocks=BLOCKS, block_size=BLOCK_SIZE))
        for m, p in paths.items()
    }


def _prompt(i: int) -> list[int]:
    return [(7 * i + 3 * j) % 300 + 5 for j in range(20 + 3 * i)]


def test_requests_routed_by_model_equal_each_engine_whole(cluster, client, reference) -> None:
    jobs = [(m, i, p) for i in range(4) for m in MODELS for p in (GREEDY, SEEDED)]
    refs = {
        (m, i, p.temperature): reference[m].generate([_prompt(i)], p)[0] for m, i, p in jobs
    }  # fmt: skip
    with ThreadPoolExecutor(8) as pool:  # both models' requests interleaved at the router
        futs = {
            (m, i, p.temperature): pool.submit(client.complete, _prompt(i), p, model=m) for m, i, p in jobs
        }
        got = {k: f.result(CALL_S) for k, f in futs.items()}
    for k, ref in refs.items():
        assert got[k].token_ids == ref.token_ids, k
        assert got[k].text == ref.text, k
    # the two models really differ (a request sent to the wrong model would show)
    a, b = (got[(m, 0, 0.0)].token_ids for m in MODELS)
    assert a != b


def test_each_models_placement_sees_only_its_own_workers(cluster, client) -> None:
    for m in MODELS:
        client.complete(_prompt(1), GREEDY, model=m)
    ra, rb = cluster.recorders["tiny-a"], cluster.recorders["tiny-b"]
    assert ra.inner is not rb.inner  # each model has its own policy (and its learnt state)
    assert ra.decisions > 0 and rb.decisions > 0
    assert ra.seen == {"a-dec-0", "a-dec-1"} and rb.seen == {"b-dec-0"}
    sa, sb = cluster.svcs["tiny-a"], cluster.svcs["tiny-b"]
    assert sa.outstanding is not sb.outstanding and sa.kv_tokens is not sb.kv_tokens
    assert sa.prober is sb.prober  # the registry's quarantine: probed by one task
    # every worker of both models is counted once in the router's gauge, under its model
    g = cluster.prom.get_sample_value
    assert g("pdserve_router_workers", {"role": "decode", "model": "tiny-a"}) == 2
    assert g("pdserve_router_workers", {"role": "decode", "model": "tiny-b"}) == 1
    # the in-flight gauge is per model too, and back to 0 once the requests ended: the router
    # lowers it after writing the finish the client returned on (its handler's finally, on the
    # router's loop), so it is waited for, not read at once
    for m in MODELS:
        wait_for(lambda m=m: g("pdserve_router_inflight_requests", {"model": m}) == 0, 10, f"{m} in flight 0")


def test_each_models_context_and_tokenizer_answer_for_it(cluster, client) -> None:
    assert sorted(client.list_models()) == ["tiny-a", "tiny-b"]
    import grpc

    from pdserve.v1 import client_pb2_grpc

    with grpc.insecure_channel(cluster.address) as ch:
        stub = client_pb2_grpc.GenerateStub(ch)
        lens = {
            m.id: m.max_model_len for m in stub.ListModels(client_pb2.ListModelsRequest(), timeout=30).models
        }
        assert lens == {"tiny-a": 512, "tiny-b": 256}
        tok = {
            m: stub.Tokenize(client_pb2.TokenizeRequest(prompt="hello", model=m), timeout=30).max_model_len
            for m in MODELS
        }
        assert tok == lens
    assert client.tokenize("hello world", model="tiny-b") == client.tokenize("hello world", model="tiny-a")
    long = [5] * 200
    with pytest.raises(InvalidRequestError, match="context 256"):  # B's bound, not A's
        client.complete(long, SamplingParams(max_tokens=100, temperature=0.0), model="tiny-b")


def test_no_model_and_unknown_model_are_refused_naming_the_served_ones(client) -> None:
    with pytest.raises(InvalidRequestError, match=r"several models \('tiny-a', 'tiny-b'\)"):
        client.complete(_prompt(0), GREEDY)
    with pytest.raises(
        ModelNotFoundError, match=r"unknown model 'tiny-c'; this cluster serves 'tiny-a', 'tiny-b'"
    ):
        client.complete(_prompt(0), GREEDY, model="tiny-c")
    with pytest.raises(InvalidRequestError, match="several models"):
        client.tokenize("hello")
    with pytest.raises(ModelNotFoundError, match="tiny-c"):
        client.tokenize("hello", model="tiny-c")


def _http(url: str, body: Any = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=CALL_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_openai_lists_both_models_and_routes_by_the_model_field(cluster, client) -> None:
    from pdserve.openai_api.server import OpenAIServer, ServerConfig

    srv = OpenAIServer(ServerConfig(router=cluster.address, port=0, request_timeout_s=CALL_S)).start()
    try:
        status, r = _http(srv.url + "/v1/models")
        assert status == 200 and sorted(m["id"] for m in r["data"]) == ["tiny-a", "tiny-b"]
        body = {"prompt": _prompt(2), "max_tokens": 12, "temperature": 0}
        for m in MODELS:
            status, r = _http(srv.url + "/v1/completions", {**body, "model": m})
            assert status == 200, r
            ref = client.complete(_prompt(2), SamplingParams(max_tokens=12, temperature=0.0), model=m)
            assert r["model"] == m and r["choices"][0]["text"] == ref.text
        status, r = _http(srv.url + "/v1/completions", {**body, "model": "tiny-c"})
        assert status == 404 and r["error"]["code"] == "model_not_found", r
        status, r = _http(srv.url + "/v1/completions", body)  # no model: never a default one
        assert status == 400 and "several models" in r["error"]["message"], r
    finally:
        srv.close()


def test_router_metrics_carry_the_model_label(cluster, client) -> None:
    """Request-level metrics are labelled with the model each request ran on (only the served
    models; a request that reached no model counts under ``model=""``)."""
    prom = cluster.prom

    def val(name: str, **labels: str) -> float:
        return prom.get_sample_value(name, labels) or 0.0

    sent = {"tiny-a": 2, "tiny-b": 1}
    before = {
        m: (
            val("pdserve_router_requests_total", slo_class="default", outcome="ok", model=m),
            val("pdserve_router_generation_tokens_total", model=m),
            val("pdserve_router_ttft_seconds_count", slo_class="default", model=m),
            val("pdserve_router_prompt_tokens_total", model=m),
        )
        for m in MODELS
    }
    unrouted = val("pdserve_router_requests_total", slo_class="default", outcome="invalid", model="")
    for m, n in sent.items():
        for i in range(n):
            client.complete(_prompt(i), GREEDY, model=m)
    with pytest.raises(InvalidRequestError):
        client.complete(_prompt(0), GREEDY)

    def counted(m: str) -> bool:  # its last counter, raised after the finish the client returned on
        return val("pdserve_router_prompt_tokens_total", model=m) >= before[m][3] + sum(
            len(_prompt(i)) for i in range(sent[m])
        )

    # the router records a request after writing its finish (the handler's end, on the router's
    # loop): waited for, not read at once
    for m in sent:
        wait_for(lambda m=m: counted(m), 10, f"{m}'s requests recorded")
    for m, n in sent.items():
        req, gen, ttft, prompt = before[m]
        assert val("pdserve_router_requests_total", slo_class="default", outcome="ok", model=m) == req + n
        assert val("pdserve_router_generation_tokens_total", model=m) == gen + n * GREEDY.max_tokens
        assert val("pdserve_router_ttft_seconds_count", slo_class="default", model=m) == ttft + n
        assert val("pdserve_router_prompt_tokens_total", model=m) == prompt + sum(
            len(_prompt(i)) for i in range(n)
        )
    assert (
        val("pdserve_router_requests_total", slo_class="default", outcome="invalid", model="") == unrouted + 1
    )
    # bounded: only the served models (and "") ever appear as the label's values
    models = {
        s.labels["model"]
        for fam in prom.collect()
        if fam.name.startswith("pdserve_router_")
        for s in fam.samples
        if "model" in s.labels
    }
    assert models == {"tiny-a", "tiny-b", ""}
    with pytest.raises(ValueError, match="not one of this router's models"):
        cluster.svcs["tiny-a"].metrics.observe_failed("default", "error", "tiny-c")
