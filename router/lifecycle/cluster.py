"""The :class:`router.lifecycle.ports.Cluster` of one request on the router's servicer: its
bookkeeping (placement reservation, decode workers' in-flight slots, the policy's record, store
leases), worker health (drop, quarantine), KV re-leases and replacement workers for a
re-dispatch, and the re-dispatch metric and log line."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from kv_store.auth import tenant_owner
from pdserve.tracing import log_event
from pdserve.v1 import client_pb2, common_pb2
from router.failover import LostWorker, Redispatches
from router.lifecycle.actions import Redispatched, Release
from router.lifecycle.events import KVRef
from router.lifecycle.grpc_calls import gone
from router.lifecycle.grpc_legs import Handoff, RequestRun, kv_ref
from router.lifecycle.resources import Resource, ResourceKind
from router.lifecycle.states import Outcome
from router.policy import RequestInfo
from router.registry import WorkerKind

if TYPE_CHECKING:
    from router.service import GenerateServicer

log = logging.getLogger("router.service")  # the router's log records keep their logger name


class RouterCluster:
    """``svc``'s registry, policy and stores as request ``run`` needs them (``info``: its
    placement's request, ``budget``: its re-dispatch bound, ``ctx``: the client's call)."""

    def __init__(
        self,
        svc: GenerateServicer,
        req: client_pb2.GenerateRequest,
        run: RequestRun,
        info: RequestInfo,
        budget: Redispatches,
        ctx: Any,
    ) -> None:
        self.svc = svc
        self.req = req
        self.run = run
        self.info = info
        self.budget = budget
        self.ctx = ctx

    # ------------------------------------------------------------------ bookkeeping
    def acquire(self, resource: Resource) -> None:
        if resource.kind is not ResourceKind.WORKER_SLOT:
            raise ValueError(f"cannot acquire {resource.kind.value} here")
        # the request counts on its decode worker (in flight, prompt + first token of KV) for the
        # leg, so a burst does not pile onto one decode worker before heartbeats report it
        self.svc.registry.add_inflight(resource.key, 1)
        self.svc.kv_tokens.add(resource.key, len(self.run.ids) + 1)

    def release(self, rel: Release) -> None:
        svc, run, kind = self.svc, self.run, rel.resource.kind
        if kind is ResourceKind.WORKER_SLOT:
            svc.kv_tokens.add(rel.resource.key, -(len(run.ids) + 1))
            svc.registry.add_inflight(rel.resource.key, -1)
        elif kind is ResourceKind.RESERVATION:
            unreserve(svc, run)
        elif kind is ResourceKind.POLICY_SLOT:
            if rel.outcome is Outcome.FINISHED and run.finish is not None:
                svc.placer.feedback(run, run.finish)  # the policy's record ends with its feedback
            else:
                svc.policy.release(run.rid)
        else:
            raise ValueError(f"{kind.value} is not released here")

    async def release_lease(self, kv: KVRef) -> None:
        """Release the lease of ``kv`` at its store (on a worker thread; failures are logged: the
        lease expires anyway)."""
        h: Handoff = kv.handle  # type: ignore[assignment]
        if h.kv.lease_id and h.kv.locations:
            await asyncio.to_thread(release_lease_now, self.svc, h.kv)

    # ------------------------------------------------------------------ workers
    def drop(self, worker_id: str) -> None:
        self.svc.registry.drop(worker_id)

    def quarantine(self, lost: LostWorker) -> None:
        self.svc.prober.quarantine(lost)

    async def relet(self, kv: KVRef) -> KVRef | None:
        h = await asyncio.to_thread(relet, self.svc, kv.handle, self.req.tenant)
        return kv_ref(h) if h is not None else None

    async def replace(
        self, prefill: bool, decode: bool, num_context_tokens: int, excluded: frozenset[str]
    ) -> tuple[str | None, str | None]:
        placer, out = self.svc.placer, []
        for wanted, kind in ((prefill, WorkerKind.PREFILL), (decode, WorkerKind.DECODE)):
            if not wanted:
                out.append(None)
                continue
            w = await placer.replacement_or_wait(kind, self.info, num_context_tokens, self.budget, self.ctx)
            self.run.workers[w.worker_id] = w
            out.append(w.worker_id)
        return out[0], out[1]

    def redispatched(self, r: Redispatched) -> None:
        lost = r.lost
        self.svc.metrics.observe_redispatch(lost.phase.value, self.svc.config.model_id)
        log_event(
            log,
            "redispatch",
            logging.WARNING,
            cluster_request_id=self.run.rid,  # the record's request_id is the client's (request_scope)
            lost_phase=lost.phase.value,
            lost_worker=lost.worker_id,
            stalled=lost.stalled,
            error=lost.detail,
            redispatch=r.count,
            produced_tokens=r.produced_tokens,
            kv_reused=r.kv_reused,
            prefill=r.prefill_id,
            decode=r.decode_id,
        )

    def client_gone(self) -> bool:
        return gone(self.ctx)


def unreserve(svc: GenerateServicer, run: RequestRun) -> None:
    """Drop the placement-time queue reservation of ``run`` (once; its first call's own
    accounting has taken over, or it never started)."""
    if run.reserved is not None:
        worker_id, n = run.reserved
        run.reserved = None
        svc.outstanding.add(worker_id, -n)
    if run.reserved_decode is not None:
        worker_id, run.reserved_decode = run.reserved_decode, None
        svc.registry.add_inflight(worker_id, -1)


def release_lease_now(svc: GenerateServicer, kv: common_pb2.KVHandle) -> None:
    if kv.lease_id and kv.locations:
        try:
            svc.stubs.store(kv.locations[0].address).release(kv.lease_id)
        except Exception as e:  # noqa: BLE001 - the lease expires anyway
            log.warning("could not release lease %s: %s", kv.lease_id, e)


def relet(svc: GenerateServicer, h: Handoff, tenant: str) -> Handoff | None:
    """``h`` under a fresh store lease: the lost decode worker may have released the old one
    after its pull (the blocks are then unpinned) or never released it (its TTL keeps running).
    The old lease is released. None when the store no longer holds every block (or the handle
    spans several nodes): the caller then prefills again. Blocking (store calls): run it on a
    worker thread. The new lease is charged to the request's ``tenant`` (its quota of leased
    blocks, as the prefill worker's lease was)."""
    kv = h.kv
    if not kv.locations or len({loc.node_id for loc in kv.locations}) != 1:
        return None
    store = svc.stubs.store(kv.locations[0].address)
    try:
        grant = store.lease(list(kv.block_hashes), owner=tenant_owner(tenant))
    except Exception as e:  # noqa: BLE001 - evicted or store trouble: prefill again
        log.info("could not re-lease the KV of %s (%s); prefilling again", kv.request_id, e)
        return None
    new = common_pb2.KVHandle()
    new.CopyFrom(kv)
    new.lease_id = grant.lease_id
    new.lease_expires_at_unix_s = grant.expires_at_unix_s  # the shm slots' validity: the new lease's
    del new.shm_slots[:]
    if len(grant.slots) == len(kv.block_hashes):
        new.shm_slots.extend(grant.slots)
    release_lease_now(svc, kv)
    return dataclasses.replace(h, kv=new)
