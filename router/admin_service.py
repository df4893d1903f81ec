"""The router's Admin service (``pdserve.v1.Admin``, internal: the cluster token or a CA-signed
client certificate): LoRA adapters added to a running cluster (issue #16), and drains of one
worker (``Drain`` / ``DrainStatus`` / ``ResumeWorker`` over :class:`router.drainer.WorkerDrains`,
issue #14: ``pdserve drain WORKER --router ADDR`` on clusters started without Ray).

``LoadAdapter`` asks every live prefill and decode worker of the router's model (of the request's
``model`` on a router serving several base models), at once, to
load the adapter (their ``WorkerAdmin.LoadAdapter``, :mod:`pdserve.worker_admin`). Each worker
that loads it registers again with every router, naming it, before it answers, so when this
call returns every router that could be reached routes requests for the adapter to those
workers (placement already narrows a request to the workers serving its adapter). Loading an
adapter a worker already serves from the same path is a no-op there (the call can be retried).

Partial failure is reported, never hidden: when some workers load the adapter and others fail,
the call fails with the first failure's status and a message naming the workers on each side
(the ones that loaded it serve it). The worker fan-out is I/O behind :data:`WorkerCall`, so the
fan-out rules are tested with fakes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from engine.lora import AdapterSpec
from pdserve.errors import FailedPreconditionError, InvalidRequestError, PdserveError, UnavailableError
from pdserve.v1 import admin_pb2
from router.registry import Registry, WorkerKind

if TYPE_CHECKING:
    from router.drainer import WorkerDrains

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
WORKER_CALL_TIMEOUT_S = 120.0  # a worker reads and checks the adapter, then re-registers
DEFAULT_DRAIN_TIMEOUT_S = 120.0

# (worker address, request, timeout) -> the worker's answer; raises a PdserveError on failure
WorkerCall = Callable[[str, admin_pb2.LoadAdapterRequest, float], admin_pb2.LoadAdapterResponse]


def grpc_worker_call(address: str, req: admin_pb2.LoadAdapterRequest, timeout_s: float):
    """``WorkerAdmin.LoadAdapter`` at ``address`` over an internal channel (TLS / cluster token
    as configured by :mod:`pdserve.security`); an RpcError becomes the PdserveError of its status."""
    import grpc

    from pdserve.security import internal_channel
    from pdserve.status import error_from_rpc_error
    from pdserve.v1 import admin_pb2_grpc

    ch = internal_channel(address)
    try:
        return admin_pb2_grpc.WorkerAdminStub(ch).LoadAdapter(req, timeout=timeout_s)
    except grpc.RpcError as e:
        raise error_from_rpc_error(e) from None
    finally:
        ch.close()


class AdminServicer:
    """``Admin`` over the router's registry. ``model``: the router's model id (only its workers
    are asked), or the ids of a router serving several base models (``LoadAdapterRequest.model``
    names one of them; missing: INVALID_ARGUMENT naming them, unknown: NOT_FOUND). ``drains``: the router's :class:`router.drainer.WorkerDrains` (None: Drain and
    its companions answer FAILED_PRECONDITION). Sync methods: on a grpc.aio server they run on
    its thread pool."""

    def __init__(
        self,
        registry: Registry,
        model: str | Sequence[str],
        call: WorkerCall = grpc_worker_call,
        timeout_s: float = WORKER_CALL_TIMEOUT_S,
        drains: WorkerDrains | None = None,
    ) -> None:
        self.registry = registry
        # the served models: one, or several (a router serving several base models)
        self.models: tuple[str, ...] = (model,) if isinstance(model, str) else tuple(model)
        if not self.models:
            raise ValueError("AdminServicer needs at least one model id")
        self.model = self.models[0]
        self.call = call
        self.timeout_s = timeout_s
        self.drains = drains

    def _drains(self) -> WorkerDrains:
        if self.drains is None:
            raise FailedPreconditionError("this router has no drain support wired (an embedded test router)")
        return self.drains

    def Drain(self, req: admin_pb2.DrainRequest, ctx) -> admin_pb2.DrainResponse:
        if not req.worker_id:
            raise InvalidRequestError("worker_id is required")
        if req.timeout_s < 0 or not math.isfinite(req.timeout_s):
            raise InvalidRequestError(f"timeout_s must be >= 0 (0: 120 s), got {req.timeout_s}")
        found = self._drains().drain(req.worker_id, req.timeout_s or DEFAULT_DRAIN_TIMEOUT_S)
        if found:
            log.info("draining worker %s", req.worker_id)
        return admin_pb2.DrainResponse(found=found)

    def DrainStatus(self, req: admin_pb2.DrainStatusRequest, ctx) -> admin_pb2.DrainStatusResponse:
        d = self._drains()
        if self.registry.get(req.worker_id) is None:
            return admin_pb2.DrainStatusResponse(found=False)
        rep = d.report(req.worker_id) or {}
        return admin_pb2.DrainStatusResponse(
            found=True,
            inflight=d.inflight(req.worker_id),
            migrating=d.migrating(req.worker_id),
            migrated=int(rep.get("migrated", 0)),
            aborted=int(rep.get("aborted", 0)),
            error=str(rep.get("error", "")),
        )

    def ResumeWorker(self, req: admin_pb2.ResumeWorkerRequest, ctx) -> admin_pb2.ResumeWorkerResponse:
        return admin_pb2.ResumeWorkerResponse(found=self._drains().resume(req.worker_id))

    def LoadAdapter(self, req: admin_pb2.LoadAdapterRequest, ctx) -> admin_pb2.LoadAdapterResponse:
        try:
            AdapterSpec(req.name, req.path)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        from router.multi_model import choose_model

        model = choose_model(req.model, self.models)  # several models: the request names one
        workers = [w for k in (WorkerKind.PREFILL, WorkerKind.DECODE) for w in self.registry.alive(k, model)]
        if not workers:
            raise UnavailableError(f"no live worker of model {model!r} to load adapter {req.name!r} into")
        loaded: list[str] = []
        failed: dict[str, PdserveError] = {}
        with ThreadPoolExecutor(max_workers=min(16, len(workers)), thread_name_prefix="admin") as pool:
            futs = {w.worker_id: pool.submit(self.call, w.address, req, self.timeout_s) for w in workers}
            for wid, f in futs.items():
                try:
                    f.result()
                    loaded.append(wid)
                except PdserveError as e:
                    failed[wid] = e
                except Exception as e:  # noqa: BLE001 - a worker unreachable in an unexpected way
                    failed[wid] = UnavailableError(f"{type(e).__name__}: {e}")
        if failed:
            first_id, first = next(iter(failed.items()))
            detail = "; ".join(f"{wid}: {e}" for wid, e in failed.items())
            ok = f"loaded on {', '.join(loaded)} (they serve it)" if loaded else "loaded on no worker"
            log.warning("adapter %s: %s; failed on %s", req.name, ok, detail)
            raise type(first)(f"LoRA adapter {req.name!r} {ok}; failed on {detail}")
        log.info("adapter %s loaded on %s", req.name, ", ".join(loaded))
        return admin_pb2.LoadAdapterResponse(workers=loaded)
