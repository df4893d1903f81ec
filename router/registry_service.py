"""The router's control plane: the worker Registry service and its own gRPC server.

Workers register and heartbeat here (:class:`RegistryServicer` over :class:`router.registry.Registry`).
The control plane is isolated from the Generate data plane (DESIGN, issue #12): it has its own
server, port and thread pool (:func:`start_control_server`), so no number of client streams, nor
clients that stop reading, delays a heartbeat past its timeout and makes the router drop healthy
workers.

Addresses: the router serves Registry on the control port and, for compatibility, on the data
port too. ``RegisterResponse.control_address`` names the control port, so a worker that was only
given the router's (data) address registers there once and then heartbeats on the control port
(:class:`pdserve.worker_base.Heartbeater`); a worker given the control address uses it throughout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health

from pdserve.errors import InvalidRequestError, PdserveError, PermissionDeniedError
from pdserve.v1 import router_pb2, worker_pb2
from router.policy.latency import LinearLatency
from router.registry import Registry, WorkerKind, WorkerLoad
from router.worker_verify import WORKER_TOKEN_MD, WorkerVerifier

if TYPE_CHECKING:
    from router.service import RouterConfig

log = logging.getLogger(__name__)

CONTROL_THREADS = 4  # the control server's own pool: Register / Heartbeat / Deregister are short

_KINDS = {
    worker_pb2.WORKER_ROLE_PREFILL: WorkerKind.PREFILL,
    worker_pb2.WORKER_ROLE_DECODE: WorkerKind.DECODE,
}


def profile_from_proto(p: router_pb2.StepProfile) -> LinearLatency:
    """A worker's reported start-up step-time model as the goodput policy uses it; coefficients
    that are negative or not finite are refused (``InvalidRequestError`` naming them)."""
    import math

    vals = {
        "prefill_base_s": p.prefill_base_s,
        "prefill_per_token_s": p.prefill_per_token_s,
        "prefill_per_token_ctx_s": p.prefill_per_token_ctx_s,
        "decode_base_s": p.decode_base_s,
        "decode_per_seq_s": p.decode_per_seq_s,
        "decode_per_ctx_token_s": p.decode_per_ctx_token_s,
    }
    bad = {k: v for k, v in vals.items() if not (math.isfinite(v) and v >= 0)}
    if bad:
        raise InvalidRequestError(f"step profile coefficients must be finite and >= 0: {bad}")
    if p.prefill_base_s + p.prefill_per_token_s <= 0 or p.decode_base_s + p.decode_per_seq_s <= 0:
        raise InvalidRequestError("step profile predicts zero-time steps (prefill and decode must cost time)")
    return LinearLatency(**vals)


def load_from_proto(s: worker_pb2.WorkerStats) -> WorkerLoad:
    """A heartbeat's stats as the registry keeps them."""
    return WorkerLoad(
        s.num_waiting,
        s.num_running,
        s.kv_blocks_total,
        s.kv_blocks_used,
        block_size=s.kv_layout.block_size,
        token_budget=s.token_budget,
        adapters_in_slot=frozenset(s.adapters_in_slot),
        adapters_in_host=frozenset(s.adapters_in_host),
        adapter_slot_load_s=max(0.0, s.adapter_slot_load_s) if math.isfinite(s.adapter_slot_load_s) else 0.0,
        adapter_disk_load_s=max(0.0, s.adapter_disk_load_s) if math.isfinite(s.adapter_disk_load_s) else 0.0,
        adapter_slots=s.adapter_slots,
        adapter_slots_pinned=s.adapter_slots_pinned,
        adapter_slot_waiters=s.adapter_slot_waiters,
        adapter_slot_free_s=max(0.0, s.adapter_slot_free_s) if math.isfinite(s.adapter_slot_free_s) else 0.0,
        adapter_reads_queued=s.adapter_reads_queued,
        max_model_len=s.max_model_len,
        sliding_window=s.sliding_window,
    )


class RegistryServicer:
    """The Registry service. Every method is short and non-blocking (a dict update under the
    registry's lock), so the same instance may serve on a thread pool or an asyncio loop.

    ``config``: the router's (its heartbeat interval and timeout are told to every worker).
    ``control_address``: answered in every RegisterResponse (set it once the control server has
    bound its port); empty means "heartbeat where you registered".
    ``verifier`` (:mod:`router.worker_verify`, issue #13): when set, a registration is verified
    against the worker's own Stats and the router's model before the worker gets traffic (one
    blocking Stats call: on an asyncio server run Register in an executor), the worker gets a
    token in the trailing metadata ``x-pdserve-worker-token``, and Heartbeat/Deregister without
    that token are refused (PERMISSION_DENIED). None: workers are trusted as they register.
    """

    def __init__(
        self,
        registry: Registry,
        config: RouterConfig,
        control_address: str = "",
        verifier: WorkerVerifier | None = None,
    ) -> None:
        self.registry = registry
        self.config = config
        self.control_address = control_address
        self.verifier = verifier

    def Register(self, req: router_pb2.RegisterRequest, ctx) -> router_pb2.RegisterResponse:
        if req.role not in _KINDS:
            raise InvalidRequestError("role must be PREFILL or DECODE")
        if not req.worker_id or not req.address:
            raise InvalidRequestError("worker_id and address are required")
        kind = _KINDS[req.role]
        if self.verifier is not None:
            try:
                token = self.verifier.verify_registration(req, ctx.invocation_metadata())
            except PdserveError as e:
                log.warning("registration of %s at %s refused: %s", req.worker_id, req.address, e)
                raise
            ctx.set_trailing_metadata(((WORKER_TOKEN_MD, token),))
        self.registry.register(
            req.worker_id,
            kind,
            req.address,
            req.model,
            load_from_proto(req.stats),
            profile=profile_from_proto(req.profile) if req.HasField("profile") else None,
            adapters=tuple(req.adapters),
        )
        log.info("registered %s worker %s at %s", kind.value, req.worker_id, req.address)
        return router_pb2.RegisterResponse(
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            heartbeat_timeout_s=self.config.heartbeat_timeout_s,
            control_address=self.control_address,
        )

    def Heartbeat(self, req: router_pb2.HeartbeatRequest, ctx) -> router_pb2.HeartbeatResponse:
        if self.verifier is not None and self.registry.get(req.worker_id) is not None:
            try:
                self.verifier.check_heartbeat(req, ctx.invocation_metadata())
            except PermissionDeniedError as e:
                log.warning("heartbeat refused: %s", e)
                raise
        return router_pb2.HeartbeatResponse(
            known=self.registry.heartbeat(req.worker_id, load_from_proto(req.stats))
        )

    def Deregister(self, req: router_pb2.DeregisterRequest, ctx) -> router_pb2.DeregisterResponse:
        if self.verifier is not None:
            try:
                self.verifier.check_identity(req.worker_id, ctx.invocation_metadata(), "deregister")
            except PermissionDeniedError as e:
                log.warning("deregister refused: %s", e)
                raise
            self.verifier.tokens.forget(req.worker_id)
        return router_pb2.DeregisterResponse(found=self.registry.deregister(req.worker_id))


def worker_verifier(
    registry: Registry,
    config: RouterConfig | Sequence[RouterConfig],
    timeout_s: float = 4.0,
    **bounds: int,
) -> WorkerVerifier:
    """The verifier a router uses: its model's id and KV geometry (from ``config.model_path``;
    a router serving several base models passes each model's config: a worker is checked against
    the model it registers for), the workers' Stats fetched over an internal channel (TLS /
    cluster token as configured by :mod:`pdserve.security`), liveness and peer layouts from
    ``registry``. ``bounds``: ``max_kv_blocks`` / ``max_token_budget`` (optional capacity caps)."""
    from pathlib import Path

    from engine.models.config import ModelConfig
    from pdserve.security import internal_channel
    from pdserve.v1 import worker_pb2_grpc
    from router.worker_verify import ExpectedModel

    configs = [config] if not isinstance(config, Sequence) else list(config)
    expected = []
    for c in configs:
        mc = ModelConfig.from_path(Path(c.model_path))
        expected.append(
            ExpectedModel(c.model_id, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, **bounds)
        )

    def fetch_stats(address: str) -> worker_pb2.WorkerStats:
        ch = internal_channel(address)
        try:
            return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=timeout_s)
        finally:
            ch.close()

    return WorkerVerifier(expected, fetch_stats, alive=lambda wid: registry.get(wid) is not None)


REGISTRY_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Registry"]


def start_control_server(
    servicer: RegistryServicer, host: str, port: int = 0
) -> tuple[grpc.Server, str, health.HealthServicer]:
    """Serve ``servicer`` on its own server and thread pool at host:port (0: any free port);
    returns (server, "host:port", health). Sets ``servicer.control_address`` to that address."""
    from pdserve.grpc_server import start_server

    server, bound, hs = start_server(
        [(REGISTRY_SERVICE, servicer)], host, port, max_workers=CONTROL_THREADS, name="router-control"
    )
    servicer.control_address = f"{host}:{bound}"
    return server, servicer.control_address, hs
