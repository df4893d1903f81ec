"""Placement of a request for the router's servicer: the first placement (the policy's pair or
an early refusal, with the chosen workers' queues reserved), replacements for a re-dispatch,
the KV store's prefix lookup that sharpens the policy's estimate, and the policy's feedback.

Reads the servicer's registry, policy, counters and index at call time (tests replace parts of
them); no gRPC (store lookups go through the servicer's store clients)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from engine.block_hash import chain_hashes
from engine.sampling_params import SamplingParams
from kv_store.index import locate_prefix_tiers
from pdserve.errors import ResourceExhaustedError, UnavailableError
from pdserve.metrics import tpot_of
from pdserve.v1 import client_pb2, common_pb2
from router.adapters import AdapterCatalog, prefer_adapter
from router.cluster_view import first_block_size
from router.failover import Redispatches
from router.feedback_log import FeedbackLog
from router.health import needed_kinds
from router.lifecycle.grpc_calls import gone
from router.policy import (
    SLO,
    ClusterView,
    GoodputAwarePolicy,
    InstanceRole,
    Observation,
    Placement,
    Rejection,
    RejectReason,
    RequestInfo,
)
from router.policy_factory import uses_prefix_lookup
from router.pool_fit import adopts_group
from router.registry import WorkerEntry, WorkerKind
from router.store_disk import StorePrefix

if TYPE_CHECKING:
    from router.lifecycle.grpc_legs import RequestRun
    from router.service import GenerateServicer

log = logging.getLogger("router.service")  # the router's log records keep their logger name

_ROLES = {WorkerKind.DECODE: InstanceRole.DECODE, WorkerKind.PREFILL: InstanceRole.PREFILL}


class Placer:
    def __init__(self, svc: GenerateServicer) -> None:
        self.svc = svc
        self.feedback_log = FeedbackLog()

    def worker(self, worker_id: str | None, kind: WorkerKind) -> WorkerEntry:
        w = self.svc.registry.get(worker_id) if worker_id else None
        if w is None:
            raise UnavailableError(
                f"no {kind.value} worker is registered for {self.svc.config.model_id!r}; retry shortly"
            )
        return w

    def prefix_blocks(self, ids: list[int], req: client_pb2.GenerateRequest) -> StorePrefix:
        """Leading prompt blocks the KV store holds (0 when unknown, not needed by the policy, or
        the lookup fails): from the shared index when the router has one (the longest prefix one
        store node holds, what a prefill worker pulls), else from a store node's Lookup; with
        how many of them that node holds only on its disk tier and what reading one there costs
        (:mod:`router.store_disk`). Runs outside the placement lock (a lookup may take up to
        ``LOOKUP_TIMEOUT_S``)."""
        svc = self.svc
        cfg = svc.config
        none = StorePrefix(0)
        if not uses_prefix_lookup(cfg.policy) or len(ids) < 2:
            return none
        bs = first_block_size(svc.registry, cfg.model_id)
        if bs is None:
            return none
        if svc.index is not None:
            try:
                found = locate_prefix_tiers(svc.index, ids, bs, cfg.model_id, req.adapter, req.cache_salt)
            except Exception as e:  # noqa: BLE001 - the lookup only sharpens an estimate
                log.debug("prefix lookup in the KV index failed: %s", e)
                return none
            if found is None:
                return none
            loc, n, disk = found
            return self._with_disk(n, disk, loc.address)
        addr = svc._store_address
        if not addr:
            return none
        hashes = chain_hashes(ids, bs, cfg.model_id, req.adapter, req.cache_salt)
        hashes = hashes[: (len(ids) - 1) // bs]
        if not hashes:
            return none
        try:
            res = svc.stubs.lookup(addr).lookup(hashes)
        except Exception as e:  # noqa: BLE001 - the lookup only sharpens an estimate
            log.debug("prefix lookup at %s failed: %s", addr, e)
            return none
        n = res.num_prefix_blocks
        node = res.locations[0][0].node_id if n and res.locations and res.locations[0] else ""
        return self._with_disk(n, res.disk_blocks_in_prefix(node, n) if node else 0, addr)

    def _with_disk(self, blocks: int, disk_blocks: int, address: str) -> StorePrefix:
        """The prefix, priced with the node's disk reads when some of it is on disk there."""
        if disk_blocks <= 0 or not address:
            return StorePrefix(blocks)
        return StorePrefix(blocks, disk_blocks, self.svc.disk_rates.block_read_s(address))

    def may_hold_prefix(self, ids: list[int]) -> bool:
        """Whether the KV store could hold a prefix of prompt ``ids``: it has a full block before
        its last token (what :meth:`prefix_blocks` looks up). A shorter prompt skips the lookup
        and its thread hop (a request's router CPU, #12)."""
        bs = first_block_size(self.svc.registry, self.svc.config.model_id)
        return bs is not None and len(ids) - 1 >= bs

    def serving(self, view: ClusterView, adapter: str) -> ClusterView:
        """``view`` narrowed to the workers that serve LoRA ``adapter`` (their ``--lora``; a worker
        refuses any other adapter with NOT_FOUND): adapter affinity. Unchanged for the base model.
        Raises ModelNotFoundError when no worker of the view serves it."""
        if not adapter:
            return view
        catalog = AdapterCatalog.from_registry(self.svc.registry, model=self.svc.config.model_id)
        holders = catalog.serving(adapter, WorkerKind.PREFILL) | catalog.serving(adapter, WorkerKind.DECODE)
        return ClusterView(prefer_adapter(view.instances, adapter, holders, lambda i: i.instance_id))

    def _holding(
        self, view: ClusterView, prompt_tokens: int, max_tokens: int, prefill_tokens: int | None = None
    ) -> ClusterView:
        """``view`` without the decode workers whose KV pools could not hold the request, and the
        prefill workers whose pools could not hold its prompt, when the pools of that kind differ
        (:meth:`router.pool_fit.PoolFit.holders`; prefill workers are narrowed only while one that
        holds the prompt remains); unchanged otherwise. ``prefill_tokens``: what a prefill worker
        would compute (a re-dispatch's resumed context; default ``prompt_tokens``)."""
        prefill_tokens = prompt_tokens if prefill_tokens is None else prefill_tokens
        for role, fit, n in (
            (InstanceRole.DECODE, self.svc.pool_fit, prompt_tokens),
            (InstanceRole.PREFILL, self.svc.prefill_fit, prefill_tokens),
        ):
            holders = fit.holders(n, max_tokens)
            if holders is None:
                continue
            kept = [i for i in view.instances if i.role is not role or i.instance_id in holders]
            if role is InstanceRole.PREFILL and not any(i.role is role for i in kept):
                continue  # none holds the prompt: the chosen one refuses it (at once, no compute)
            view = ClusterView(kept)
        return view

    def place(
        self,
        rid: str,
        ids: list[int],
        params: SamplingParams,
        req: client_pb2.GenerateRequest,
        store_prefix_blocks: StorePrefix | int | None = None,
        candidates: int = 1,
    ) -> tuple[Placement, WorkerEntry, WorkerEntry, RequestInfo]:
        """Ask the policy for (prefill, decode) workers, or refuse before any compute is spent.
        ``store_prefix_blocks``: the prompt's prefix in the KV store (None: looked up here; an
        int: blocks, none of them priced as disk reads). ``candidates`` > 1: a parallel-sampling
        group (``params`` already as :func:`router.groups.placement_args` shows it to the
        policy); placed for a handoff on a decode worker whose pool could never adopt the group
        at once (:func:`router.pool_fit.adopts_group`), it runs there whole instead (a local
        prefill, the policy's estimates for the handoff kept): that worker would refuse the
        handoff after the prefill, and can run the group itself.

        Raises UnavailableError when a needed kind of worker is missing, ResourceExhaustedError
        (with the policy's retry-after) when the policy rejects the request early.
        """
        svc = self.svc
        cfg = svc.config
        view = self.serving(
            svc._views.build(svc.registry, cfg.model_id, svc.outstanding, svc.kv_tokens), req.adapter
        )
        view = self._holding(view, len(ids), params.max_tokens)
        for kind in needed_kinds(cfg.policy):  # the condition the router's health reports
            if not view.with_role(_ROLES[kind]):
                raise UnavailableError(
                    f"no {kind.value} worker is registered for {cfg.model_id!r}; retry shortly"
                )
        stored = self.prefix_blocks(ids, req) if store_prefix_blocks is None else store_prefix_blocks
        if isinstance(stored, int):
            stored = StorePrefix(stored)
        inf = float("inf")
        slo = None
        if req.slo.ttft_s > 0 or req.slo.tpot_s > 0:
            slo = SLO(
                req.slo.ttft_s if req.slo.ttft_s > 0 else inf, req.slo.tpot_s if req.slo.tpot_s > 0 else inf
            )
        info = RequestInfo(
            rid,
            len(ids),
            max_output_tokens=params.max_tokens,
            slo=slo,
            arrival_time=svc.policy.clock.now(),
            priority=req.priority,
            tenant=req.tenant,
            predicted_output_tokens=req.predicted_output_tokens,
            adapter=req.adapter,
            store_prefix_blocks=stored.blocks,
            store_prefix_disk_blocks=stored.disk_blocks,
            store_disk_block_s=stored.disk_block_s,
        )
        d = svc.policy.place(info, view)
        if isinstance(d, Rejection):
            if d.reason is RejectReason.NO_INSTANCE:
                raise UnavailableError(f"{d.message}; retry shortly")
            raise ResourceExhaustedError(f"request refused ({d.reason.value}): {d.message}", d.retry_after_s)
        try:
            dec_id = d.decode_instance_id
            if dec_id is None:
                bs = view.instances[0].block_size
                dec_id = svc.policy.choose_decode(info, view, -(-(len(ids) + 1) // bs))
            dw = self.worker(dec_id, WorkerKind.DECODE)
            if candidates > 1 and not d.local_prefill and not adopts_group(dw, len(ids), candidates):
                d = dataclasses.replace(
                    d, instance_id=dw.worker_id, decode_instance_id=dw.worker_id, local_prefill=True
                )
            pw = dw if d.local_prefill else self.worker(d.instance_id, WorkerKind.PREFILL)
        except BaseException:
            svc.policy.release(rid)  # placed, but the worker vanished meanwhile
            raise
        return d, pw, dw, info

    def replacement(
        self, kind: WorkerKind, info: RequestInfo, n_ctx: int, budget: Redispatches
    ) -> WorkerEntry:
        """A ``kind`` worker for a re-dispatch, chosen by the placement policy among the live
        workers this request has not lost (no admission check: the request is already accepted).
        Raises the budget's UnavailableError when there is none."""
        svc = self.svc
        full = svc._views.build(svc.registry, svc.config.model_id, svc.outstanding, svc.kv_tokens)
        view = ClusterView(i for i in full.instances if i.instance_id not in budget.excluded)
        if info.adapter:
            view = self.serving(view, info.adapter)
        # the whole request's total (the resumed context plus what is left of max_tokens is the same)
        view = self._holding(view, info.num_prompt_tokens, info.max_output_tokens, prefill_tokens=n_ctx)
        info = dataclasses.replace(info, num_prompt_tokens=n_ctx)
        wid: str | None = None
        if kind is WorkerKind.PREFILL:
            pool = view.with_role(InstanceRole.PREFILL)
            if pool:
                wid = svc.policy.choose_prefill(info, pool, view).instance_id
        elif view.with_role(InstanceRole.DECODE):
            bs = view.instances[0].block_size
            wid = svc.policy.choose_decode(info, view, -(-(n_ctx + 1) // bs))
        w = svc.registry.get(wid) if wid else None
        if w is None or w.kind is not kind:
            raise budget.exhausted(f"no other {kind.value} worker is available")
        return w

    async def replacement_or_wait(
        self, kind: WorkerKind, info: RequestInfo, n_ctx: int, budget: Redispatches, ctx: Any
    ) -> WorkerEntry:
        """:meth:`replacement`; when there is none but a quarantined ``kind`` worker is
        registered (it stalled: maybe slow, not hung), wait for the prober to restore it, for at
        most two probe rounds (or until the client is gone), then give up as
        :meth:`replacement` does."""
        registry = self.svc.registry
        qcfg = registry.quarantined.config
        deadline = time.monotonic() + 2 * (qcfg.max_probe_interval_s + qcfg.probe_timeout_s)
        while True:
            try:
                return self.replacement(kind, info, n_ctx, budget)
            except UnavailableError:
                waiting = any(
                    (w := registry.get(wid)) is not None and w.kind is kind
                    for wid in registry.quarantined.ids()
                )
                if not waiting or time.monotonic() >= deadline or gone(ctx):
                    raise
            await asyncio.sleep(qcfg.probe_interval_s)

    def feedback(self, run: RequestRun, finish: common_pb2.Finish) -> None:
        """Measured TTFT/TPOT and output length of a finished request, to the policy."""
        policy = self.svc.policy
        t = finish.timing
        policy.on_finished(
            Observation(
                run.rid,
                ttft_s=t.ttft_s,
                tpot_s=tpot_of(list(t.token_times_s)) or 0.0,
                output_tokens=finish.usage.completion_tokens,
                num_prompt_tokens=len(run.ids),
                max_output_tokens=run.params.max_tokens,
            )
        )
        if isinstance(policy, GoodputAwarePolicy):
            self.feedback_log.offer(policy)  # at most one line per second (router.feedback_log)
