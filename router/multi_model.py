"""Several base models behind one router (issue #16 part 3).

A router serving several base models runs one :class:`router.service.GenerateServicer` per
model: each has its own tokenizer and model config, its own placement policy and its state (the
goodput policy's learnt latencies, the outstanding prompt tokens and KV tokens per worker, the
placement lock), its own cluster views and prefix lookups, and sees only its model's workers
(``Registry.alive(kind, model_id)``), so placing one model's requests never counts another
model's load. They share the router's worker registry, edge (API keys, quotas, request ids),
metrics and the prober of quarantined workers (the quarantine is the registry's).

:class:`ModelDispatcher` is the ``pdserve.v1.Generate`` service in front of them: Generate and
Tokenize go to the servicer of the request's ``model``; ListModels lists every model with its
adapters. The choice (:meth:`ModelDispatcher.servicer_for`) is pure:

* a single-model router accepts an empty ``model`` (the served one), as it always did;
* a router serving several models refuses an empty ``model`` with INVALID_ARGUMENT naming the
  served models: a request is never silently routed to some default model;
* an unknown model is NOT_FOUND naming the served models (HTTP 404 through the OpenAI server).

:class:`ModelDrains` dispatches the Admin service's drains to the drains of the drained
worker's model (each model's requests run on its own servicer).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pdserve.errors import InvalidRequestError, ModelNotFoundError, PdserveError
from pdserve.metrics import outcome_for, slo_class
from router.registry import Registry, WorkerKind

if TYPE_CHECKING:
    import grpc

    from pdserve.v1 import client_pb2
    from router.drainer import WorkerDrains
    from router.service import GenerateServicer


def choose_model(model: str, served: Sequence[str]) -> str:
    """The served model a request naming ``model`` goes to (pure). ``served``: the router's
    model ids, in order. Empty ``model``: the only served model, else INVALID_ARGUMENT naming
    them; a model not served: NOT_FOUND naming them."""
    if not served:
        raise ValueError("a router serves at least one model")
    names = ", ".join(repr(m) for m in served)
    if not model:
        if len(served) == 1:
            return served[0]
        raise InvalidRequestError(
            f"this router serves several models ({names}): name one in the request's model field"
        )
    if model not in served:
        raise ModelNotFoundError(f"unknown model {model!r}; this cluster serves {names}")
    return model


class ModelDispatcher:
    """The ``Generate`` service of a router: routes each request to the servicer of its model
    (see the module doc). ``servicers``: model id -> its servicer, in the order ListModels lists
    them; they must share one registry, edge and metrics. With one servicer it behaves exactly
    as that servicer (an empty model is the served one)."""

    def __init__(self, servicers: Mapping[str, GenerateServicer]) -> None:
        if not servicers:
            raise ValueError("ModelDispatcher needs at least one model's servicer")
        for mid, svc in servicers.items():
            if svc.config.model_id != mid:
                raise ValueError(f"servicer of model {svc.config.model_id!r} listed under {mid!r}")
        self.servicers = dict(servicers)
        self.models = tuple(self.servicers)
        first = next(iter(self.servicers.values()))
        # the quarantine is the shared registry's: one prober task probes it for every model
        for svc in self.servicers.values():
            svc.prober = first.prober
        self.registry: Registry = first.registry
        self.edge = first.edge
        self.metrics = first.metrics

    def servicer_for(self, model: str) -> GenerateServicer:
        """The servicer of the model a request names (:func:`choose_model`'s refusals)."""
        return self.servicers[choose_model(model, self.models)]

    def track_gauges(self) -> None:
        """Export ``pdserve_router_workers{role,model}`` (each model's live workers) and
        ``pdserve_router_quarantined_workers{role}`` (over every served model: a quarantined
        worker may no longer be registered, its model unknown); the per-model servicers are
        built with ``track_gauges=False``."""
        reg = self.registry

        def workers() -> dict[str, dict[str, int]]:
            return {m: {k.value: len(reg.alive(k, m)) for k in WorkerKind} for m in self.models}

        self.metrics.track_model_workers(workers)
        # the quarantine is the registry's (shared): any servicer's prober counts it all
        self.metrics.track_quarantined(next(iter(self.servicers.values())).prober.counts)

    # ----------------------------------------------------------------- rpcs
    def Tokenize(self, req: client_pb2.TokenizeRequest, ctx: Any) -> client_pb2.TokenizeResponse:
        try:
            svc = self.servicer_for(req.model)
        except PdserveError:
            self.edge.principal_from_metadata(ctx.invocation_metadata())  # what is served: for keys only
            raise
        return svc.Tokenize(req, ctx)

    def ListModels(self, req: client_pb2.ListModelsRequest, ctx: Any) -> client_pb2.ListModelsResponse:
        """Every served model, each with the adapters its live workers serve."""
        from pdserve.v1 import client_pb2

        out = client_pb2.ListModelsResponse()
        for svc in self.servicers.values():
            out.models.extend(svc.ListModels(req, ctx).models)
        return out

    async def Generate(self, req: client_pb2.GenerateRequest, ctx: grpc.aio.ServicerContext) -> None:
        try:
            svc = self.servicer_for(req.model)
        except PdserveError as e:
            # the caller must hold a key before it learns what is served (the key store may do I/O)
            await asyncio.to_thread(self.edge.principal_from_metadata, ctx.invocation_metadata())
            self.metrics.observe_failed(slo_class(req.slo.ttft_s, req.slo.tpot_s), outcome_for(e))
            raise
        await svc.Generate(req, ctx)


class ModelDrains:
    """The Admin service's drains (:class:`router.drainer.WorkerDrains`' interface) over the
    per-model drains of a router serving several models: a call about a worker goes to the drains
    of the model that worker registered for (an unknown worker: the first model's, which
    answers not found)."""

    def __init__(self, registry: Registry, drains: Mapping[str, WorkerDrains]) -> None:
        if not drains:
            raise ValueError("ModelDrains needs at least one model's drains")
        self.registry = registry
        self.drains = dict(drains)
        self._default = next(iter(self.drains.values()))

    def _of(self, worker_id: str) -> WorkerDrains:
        w = self.registry.get(worker_id)
        return self.drains.get(w.model, self._default) if w is not None else self._default

    def drain(self, worker_id: str, timeout_s: float = 120.0) -> bool:
        return self._of(worker_id).drain(worker_id, timeout_s)

    def migrating(self, worker_id: str) -> bool:
        return self._of(worker_id).migrating(worker_id)

    def report(self, worker_id: str) -> dict[str, Any] | None:
        return self._of(worker_id).report(worker_id)

    def resume(self, worker_id: str) -> bool:
        return self._of(worker_id).resume(worker_id)

    def inflight(self, worker_id: str) -> int:
        return self._of(worker_id).inflight(worker_id)
