"""The router's Admin service (``pdserve.v1.Admin``, internal: the cluster token or a CA-signed
client certificate): LoRA adapters added to a running cluster (issue #16).

``LoadAdapter`` asks every live prefill and decode worker of the router's model, at once, to
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from engine.lora import AdapterSpec
from pdserve.errors import InvalidRequestError, PdserveError, UnavailableError
from pdserve.v1 import admin_pb2
from router.registry import Registry, WorkerKind

log = logging.getLogger(__name__)

ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
WORKER_CALL_TIMEOUT_S = 120.0  # a worker reads and checks the adapter, then re-registers

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
    are asked). Sync methods: on a grpc.aio server they run on its thread pool."""

    def __init__(
        self,
        registry: Registry,
        model: str,
        call: WorkerCall = grpc_worker_call,
        timeout_s: float = WORKER_CALL_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.model = model
        self.call = call
        self.timeout_s = timeout_s

    def LoadAdapter(self, req: admin_pb2.LoadAdapterRequest, ctx) -> admin_pb2.LoadAdapterResponse:
        try:
            AdapterSpec(req.name, req.path)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        workers = [
            w for k in (WorkerKind.PREFILL, WorkerKind.DECODE) for w in self.registry.alive(k, self.model)
        ]
        if not workers:
            raise UnavailableError(
                f"no live worker of model {self.model!r} to load adapter {req.name!r} into"
            )
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
