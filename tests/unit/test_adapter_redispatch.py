"""A LoRA request re-dispatched after a worker is lost keeps its adapter (#16: "the adapter travels
with the KV handoff, re-dispatch and migration").

The router runs in-process against the fake workers of ``tests.unit.test_router_redispatch``,
here with an adapter-dependent "model" (the adapter shifts every token, so a leg that dropped the
adapter would change the output) and the refusal a real worker gives an adapter it does not serve
(NOT_FOUND, which the router never retries). Every leg after the loss must carry the adapter and
land on a worker that serves it, and the output must equal the run without a failure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry

from pdserve.metrics import RouterMetrics
from pdserve.v1 import client_pb2, common_pb2, worker_pb2
from router.policy import PolicyKind
from router.registry import Registry, WorkerKind, WorkerLoad
from router.service import GenerateServicer, RouterConfig
from tests.unit.test_router_redispatch import (
    PROMPT,
    FakeContext,
    FakeRpcError,
    FakeStore,
    FakeStubs,
    FakeWorker,
    _dead,
    _redispatches,
    next_token,
)

ADAPTER = "sql"


def token(seq: list[int], adapter: str) -> int:
    """The fake model with LoRA: the adapter shifts every token (base model: ``next_token``)."""
    return next_token(seq) + (1000 if adapter else 0)


def reference(prompt: list[int], n: int, adapter: str) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        t = token(seq, adapter)
        out.append(t)
        seq.append(t)
    return out


@dataclass
class AdapterWorker(FakeWorker):
    """A fake worker serving the adapters in ``serves``; any other adapter is NOT_FOUND, as a
    real worker answers it (engine.lora.manager.LoRAManager.check)."""

    serves: frozenset[str] = frozenset()

    def _refuse(self, req) -> None:  # noqa: ANN001 - a Prefill or Decode request
        if req.adapter and req.adapter not in self.serves:
            raise FakeRpcError(
                grpc.StatusCode.NOT_FOUND, f"LoRA adapter {req.adapter!r} is not served by this engine"
            )

    def _prefill(self, req: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        self.calls.append(req)
        self._refuse(req)
        if self.die_after is not None and len(self.calls) > self.die_after:
            raise _dead()
        ids = list(req.prompt_token_ids)
        return worker_pb2.PrefillResponse(
            request_id=req.request_id,
            first_token=token(ids, req.adapter),
            kv=self.store.put(req.request_id),
            num_cached_tokens=0,
        )

    def _decode(self, req: worker_pb2.DecodeRequest) -> Iterator[worker_pb2.DecodeResponse]:
        self._refuse(req)
        if self.die_after == 0:
            raise _dead()
        if req.local_prefill:
            seq, n_out = list(req.prompt_token_ids), 0
        else:
            self.store.release(req.kv.lease_id)
            seq, n_out = [*req.prompt_token_ids, req.first_token], 1
        sent = 0
        while n_out < req.sampling.max_tokens:
            if self.die_after is not None and sent >= self.die_after:
                raise _dead()
            t = token(seq, req.adapter)
            seq.append(t)
            n_out += 1
            msg = worker_pb2.DecodeResponse(request_id=req.request_id, token_ids=[t])
            if n_out >= req.sampling.max_tokens:
                msg.finish.reason = common_pb2.FINISH_REASON_LENGTH
            sent += 1
            yield msg


@pytest.fixture(scope="module")
def model_path(smollm_path):
    return str(smollm_path)


Spec = dict[str, tuple[int | None, bool]]  # worker id -> (die_after, serves the adapter)


def _cluster(model_path: str, prefill: Spec, decode: Spec, policy: PolicyKind = PolicyKind.LEAST_LOADED):
    store = FakeStore()
    reg = Registry(heartbeat_timeout_s=1e9)
    workers: dict[str, AdapterWorker] = {}
    for kind, spec in ((WorkerKind.PREFILL, prefill), (WorkerKind.DECODE, decode)):
        for wid, (die_after, serves) in spec.items():
            adapters = (ADAPTER,) if serves else ()
            workers[wid] = AdapterWorker(wid, store, die_after, serves=frozenset(adapters))
            reg.register(wid, kind, wid, "m", WorkerLoad(0, 0, 1000, 0, block_size=16), adapters=adapters)
    metrics = CollectorRegistry()
    cfg = RouterConfig(model_path=model_path, model_id="m", max_redispatches=2, policy=policy)
    svc = GenerateServicer(reg, cfg, RouterMetrics(metrics))
    svc.stubs = FakeStubs(workers, store)  # type: ignore[assignment,arg-type]
    return svc, workers, store, metrics


def _request(max_tokens: int = 12) -> client_pb2.GenerateRequest:
    return client_pb2.GenerateRequest(
        request_id="req-1",
        prompt_token_ids=client_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        adapter=ADAPTER,
    )


def _run(svc: GenerateServicer, req: client_pb2.GenerateRequest) -> list[int]:
    import asyncio

    ctx = FakeContext()
    asyncio.run(svc.Generate(req, ctx))
    return [t for r in ctx.written for t in r.token_ids]


def _legs(workers: dict[str, AdapterWorker]) -> list[tuple[str, str]]:
    return [(w.worker_id, c.adapter) for w in workers.values() for c in w.calls]


def test_the_fake_model_depends_on_the_adapter() -> None:
    assert reference(PROMPT, 12, ADAPTER) != reference(PROMPT, 12, "")


@pytest.mark.parametrize("k", [0, 3])
def test_decode_lost_resumes_with_the_adapter_on_a_worker_serving_it(model_path, k) -> None:
    """d0 (serves the adapter) dies after ``k`` tokens; d1 is idle but does not serve it, d2
    does: the resumed leg goes to d2 with the adapter, and the output is the adapter's."""
    svc, w, store, reg = _cluster(
        model_path, {"p0": (None, True)}, {"d0": (k, True), "d1": (None, False), "d2": (None, True)}
    )
    assert _run(svc, _request()) == reference(PROMPT, 12, ADAPTER)
    assert _redispatches(reg, "decode") == 1
    assert not w["d1"].calls  # never placed on a worker without the adapter
    assert w["d2"].calls and all(a == ADAPTER for _, a in _legs(w)), _legs(w)
    assert store.leases == set()


def test_prefill_lost_goes_to_another_prefill_worker_serving_the_adapter(model_path) -> None:
    svc, w, _, reg = _cluster(
        model_path,
        {"p0": (0, True), "p1": (None, False), "p2": (None, True)},
        {"d0": (None, True)},
    )
    assert _run(svc, _request()) == reference(PROMPT, 12, ADAPTER)
    assert _redispatches(reg, "prefill") == 1
    assert not w["p1"].calls and len(w["p2"].calls) == 1
    assert all(a == ADAPTER for _, a in _legs(w)), _legs(w)


def test_colocated_decode_lost_resumes_with_the_adapter(model_path) -> None:
    """Colocated placement on decode workers only (no prefill worker: valid for this policy,
    router.health.needed_kinds): d0 dies after 4 tokens; the resumed whole request goes to d2,
    which serves the adapter, not d1."""
    svc, w, _, reg = _cluster(
        model_path, {}, {"d0": (4, True), "d1": (None, False), "d2": (None, True)}, PolicyKind.COLOCATED
    )
    assert _run(svc, _request(max_tokens=10)) == reference(PROMPT, 10, ADAPTER)
    assert _redispatches(reg, "decode") == 1
    assert not w["d1"].calls
    resumed = w["d2"].calls[0]
    assert resumed.local_prefill and resumed.adapter == ADAPTER


def test_router_metrics_per_adapter(model_path) -> None:
    """The router counts requests, first-token time and output tokens per served adapter; a
    request naming an adapter no worker serves fails NOT_FOUND and gets no series of its own (the
    label stays bounded by what the workers serve); base-model requests are not in the family."""
    import asyncio

    from pdserve.errors import InvalidRequestError, ModelNotFoundError

    svc, _, _, reg = _cluster(model_path, {"p0": (None, True)}, {"d0": (None, True)})
    assert _run(svc, _request(max_tokens=7)) == reference(PROMPT, 7, ADAPTER)
    base = _request(max_tokens=5)
    base.adapter = ""
    base.request_id = "req-base"
    _run(svc, base)
    unknown = _request()
    unknown.adapter = "no-such-adapter"
    unknown.request_id = "req-unknown"
    with pytest.raises(ModelNotFoundError):
        asyncio.run(svc.Generate(unknown, FakeContext()))
    refused = _request()  # refused at the edge (a tenant name over its length limit): counted too
    refused.tenant = "t" * 1000
    refused.request_id = "req-edge"
    with pytest.raises(InvalidRequestError):
        asyncio.run(svc.Generate(refused, FakeContext()))

    def value(name: str, **labels: str) -> float | None:
        return reg.get_sample_value(name, labels)

    assert value("pdserve_router_adapter_requests_total", adapter=ADAPTER, outcome="ok") == 1
    assert value("pdserve_router_adapter_generation_tokens_total", adapter=ADAPTER) == 7
    assert value("pdserve_router_adapter_ttft_seconds_count", adapter=ADAPTER) == 1
    adapters = {
        s.labels["adapter"]
        for mf in reg.collect()
        if mf.name.startswith("pdserve_router_adapter_")
        for s in mf.samples
    }
    assert adapters == {ADAPTER}  # neither "" (the base model) nor the unknown name
    assert value("pdserve_router_adapter_requests_total", adapter=ADAPTER, outcome="invalid") == 1
    assert value("pdserve_router_requests_total", slo_class="default", outcome="invalid") == 2
