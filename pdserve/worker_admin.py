"""A worker's WorkerAdmin service (``pdserve.v1.WorkerAdmin``, internal): LoRA adapters loaded
into a running worker (issue #16).

``LoadAdapter`` validates and reads the adapter on the calling (gRPC pool) thread, not on the
engine thread, so running requests keep decoding while it is read; it becomes visible to the
engine only once complete (:meth:`engine.lora.LoRAManager.register`). The worker then registers
again with every router (:meth:`pdserve.worker_base.RouterLinks.register_again`), naming the new
adapter, so every router of the cluster routes requests for it to this worker.

An adapter loaded at run time lasts as long as the worker process: a worker that restarts
serves what its flags (or the cluster config's ``lora`` section) name. Errors: INVALID_ARGUMENT
naming the adapter and the field (a bad adapter, a bad name), ALREADY_EXISTS (another adapter
holds the name; the same folder again is a no-op), FAILED_PRECONDITION (the worker has no LoRA slots: start it with ``--lora`` or
``--max-lora-rank``).
"""

from __future__ import annotations

import logging

from engine.lora import AdapterSpec
from pdserve.errors import AlreadyExistsError, FailedPreconditionError, InvalidRequestError
from pdserve.v1 import admin_pb2
from pdserve.worker_base import WorkerState

log = logging.getLogger(__name__)

WORKER_ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["WorkerAdmin"]
REGISTER_TIMEOUT_S = 10.0  # longest wait for the routers to take the new registration


class WorkerAdminServicer:
    """``WorkerAdmin`` over one worker's :class:`~pdserve.worker_base.WorkerState` (sync methods:
    on a grpc.aio server they run on its thread pool, never on the event loop)."""

    def __init__(self, state: WorkerState, register_timeout_s: float = REGISTER_TIMEOUT_S) -> None:
        self.state = state
        self.register_timeout_s = register_timeout_s

    def LoadAdapter(self, req: admin_pb2.LoadAdapterRequest, ctx) -> admin_pb2.LoadAdapterResponse:
        wid = self.state.config.worker_id
        lora = self.state.engine.lora
        if lora is None:
            raise FailedPreconditionError(
                f"worker {wid} serves no LoRA adapters, so it has no adapter slots to load "
                f"{req.name!r} into: start it with --lora NAME=PATH or --max-lora-rank R"
            )
        try:
            spec = AdapterSpec(req.name, req.path)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        if lora.has(spec.name):
            return self._existing(spec, wid)
        try:
            lora.register(spec)
        except InvalidRequestError as e:
            if lora.has(spec.name):  # registered by a concurrent call meanwhile
                return self._existing(spec, wid)
            raise InvalidRequestError(f"worker {wid}: {e}") from None
        log.info("loaded LoRA adapter %s from %s", spec.name, spec.path)
        links = self.state.router_links
        if links is not None:
            late = [a for a, ok in links.register_again(self.register_timeout_s).items() if not ok]
            if late:
                log.warning(
                    "routers %s not told of adapter %s yet (they get it on reconnecting)", late, spec.name
                )
        return admin_pb2.LoadAdapterResponse(workers=[wid])

    def _existing(self, spec: AdapterSpec, wid: str) -> admin_pb2.LoadAdapterResponse:
        """The name is served already: a no-op when from the same folder (a retried call),
        ALREADY_EXISTS when another adapter holds the name."""
        from pathlib import Path

        have = self.state.engine.lora.path_of(spec.name)
        if have is not None and have.resolve() == Path(spec.path).resolve():
            return admin_pb2.LoadAdapterResponse(workers=[wid])
        raise AlreadyExistsError(
            f"LoRA adapter name {spec.name!r} is already served by worker {wid} from {have}, not {spec.path}"
        )
