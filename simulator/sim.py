"""The discrete-event simulation of a cluster serving a workload.

Request lifecycle (the same as the real cluster's, see DESIGN.md):

1. arrival: the router policy (``router.policy``, unchanged) places the request on a prefill or
   mixed instance, or rejects it; a planned remote-prefix fetch delays submission by its
   transfer time and imports the blocks into the target's prefix cache;
2. the instance's scheduler runs it (prefill-only on a prefill instance); the first token's
   time is TTFT;
3. disaggregated: the policy picks a decode instance; the handoff waits there until blocks are
   free (watermark), reserves them, the KV transfer takes ``transfer_time``, then the prefill
   instance releases its blocks and the request joins the decode batch;
4. finish: the last token's time; TPOT = (finish - first token) / (output_len - 1).

Phase studies: a cluster without decode-capable instances ends requests at their first token
(prefill/TTFT study); one without prefill-capable instances starts requests at the decode side
with their KV in place and TTFT 0 (decode/TPOT study).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from engine.block_hash import BlockHash
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError
from router.policy import (
    STORE_SOURCE,
    ClusterView,
    InstanceRole,
    PlacementPolicy,
    Rejection,
    RequestInfo,
    make_policy,
)
from router.policy import migration as mig_policy
from router.policy.kv_stream import handoff_after_prefill
from router.policy.migration import MigrationDecision, MigrationReason
from simulator.adapters import AdapterResidency, adapter_index
from simulator.config import ClusterConfig, HostPool, SimConfig
from simulator.events import EventLoop
from simulator.instance import DUMMY_TOKEN, SimInstance, StepReport
from simulator.kv_store import SimKVStore
from simulator.latency import LatencyModel
from simulator.metrics import RequestRecord, SimResult
from simulator.migration import MigrationRecord, MigrationResult, decode_load, defrag_decisions
from simulator.prefix_store import PrefixStore
from simulator.tiered_store import TieredPrefixStore
from simulator.workload import Workload, WorkloadRequest

PolicyFactory = Callable[[EventLoop, LatencyModel, ClusterConfig], PlacementPolicy]
LatencyFactory = Callable[[int], LatencyModel]  # TP degree -> model (default: the cluster's LatencySpec)


def trace_block_keys(
    hash_ids: Sequence[int], input_len: int, block_size: int, hash_block: int = 512
) -> list[BlockHash]:
    """KV-block keys of a trace prompt: each ``hash_block``-token id expands to sub-block keys.

    Key of sub-block ``j`` of id ``h`` = 8 bytes of ``h * 1024 + j``: equal for equal prefixes
    (trace ids are prefix hashes) and distinct from the engine's 16-byte chained keys. Only the
    prompt's full blocks get keys; the KV manager extends the chain from there.
    """
    if hash_block % block_size:
        raise ValueError(f"block_size {block_size} must divide the trace's {hash_block}-token blocks")
    per = hash_block // block_size
    n = min(input_len // block_size, len(hash_ids) * per)
    if n <= 0:
        return []
    ints = [h * 1024 + j for h in hash_ids[: -(-n // per)] for j in range(per)][:n]
    raw = struct.pack(f"<{n}Q", *ints)
    return [raw[i : i + 8] for i in range(0, 8 * n, 8)]


def request_block_keys(index: int, start: int, end: int) -> list[BlockHash]:
    """Stand-in KV-block keys for blocks ``[start, end)`` of workload request ``index``.

    Contract: key = 12 little-endian bytes of ``index * 2**32 + block``, so two keys are equal
    iff they name the same block of the same request, and no key equals a trace key (8 bytes,
    :func:`trace_block_keys`) or an engine key (16 bytes, :mod:`engine.block_hash`).

    Why this is exact: the simulator salts every request with its own id (``cache_salt``), so
    the engine's own keys for blocks past the trace keys are unique per (request, block) too;
    keys are only ever compared for equality (dict/set membership), so replacing them by other
    keys with the same equality pattern cannot change any cache hit, eviction or timing, and it
    saves hashing every block with BLAKE2b (the KV manager only hashes blocks that have no key).
    """
    base = index << 32
    return [(base + j).to_bytes(12, "little") for j in range(start, end)]


def default_policy_factory(loop: EventLoop, latency: LatencyModel, cluster: ClusterConfig) -> PlacementPolicy:
    return make_policy(cluster.policy, clock=loop, latency=latency, seed=cluster.seed)


class Simulation:
    """Runs workloads on a cluster; every :meth:`run` starts from an empty cluster."""

    def __init__(
        self,
        cluster: ClusterConfig,
        config: SimConfig | None = None,
        policy_factory: PolicyFactory | None = None,
        latency_factory: LatencyFactory | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config or SimConfig()
        self.policy_factory = policy_factory or default_policy_factory
        self.latency_factory = latency_factory or cluster.latency_model

    def run(self, workload: Workload) -> SimResult:
        t0 = time.perf_counter()
        run = _Run(self.cluster, self.config, self.policy_factory, self.latency_factory, workload)
        complete = run.execute()
        return SimResult(
            records=run.records,
            sim_time_s=run.end_time(),
            wall_time_s=time.perf_counter() - t0,
            complete=complete,
            instance_stats=run.instance_stats(),
            num_gpus=self.cluster.num_gpus,
            num_events=run.loop.num_events,
            migrations=run.migrations,
            store=run.store.stats if run.store is not None else None,
        )


class _Run:
    def __init__(
        self,
        cluster: ClusterConfig,
        cfg: SimConfig,
        policy_factory: PolicyFactory,
        latency_factory: LatencyFactory,
        workload: Workload,
    ) -> None:
        self.cluster = cluster
        self.latency_factory = latency_factory
        self.cfg = cfg
        self.slo = cfg.slo
        self.workload = workload.requests
        self._adapter_salt = self._check_adapters(cluster, self.workload)
        self.loop = EventLoop()
        self.instances = self._build()
        self.by_id = {i.instance_id: i for i in self.instances}
        self.view = ClusterView(self.instances)
        pool = [i for i in self.instances if i.role is not InstanceRole.DECODE]
        self.has_prefill = bool(pool)
        self.has_decode = any(i.role is not InstanceRole.PREFILL for i in self.instances)
        lat = (pool or self.instances)[0].latency
        self.policy = policy_factory(self.loop, lat, cluster)
        self.block_size = cluster.block_size
        # the cluster's KV store (ClusterConfig.kv_store): DRAM + SSD tier, priced by the router
        self.store = (
            SimKVStore(cluster.kv_store, cluster.block_size * lat.kv_bytes_per_token)
            if cluster.kv_store is not None
            else None
        )
        self.use_trace_keys = (
            cluster.cache.enable_prefix_caching or cluster.cache.host_pool is not HostPool.NONE
        )
        self.records: list[RequestRecord] = []
        self.rec: dict[str, RequestRecord] = {}
        self._params: dict[int, SamplingParams] = {}
        self._violated: set[str] = set()
        n = len(self.workload)
        self.budget = math.floor((1 - cfg.attainment_target) * n) if cfg.early_stop else None
        self.stopped_early = False
        self._bar = None
        # live migration (ClusterConfig.migration): decode-capable instances, in-flight moves
        self.migrations: list[MigrationRecord] = []
        self._moving: dict[str, MigrationRecord] = {}
        self._mig_busy: dict[str, int] = {}  # instance -> migrations it takes part in now
        self._mig_pool = [i for i in self.instances if i.role is not InstanceRole.PREFILL]
        self._arrived = 0
        self._last_work_s = 0.0  # the last event that was not a migration-policy tick

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _check_adapters(cluster: ClusterConfig, reqs: Sequence[WorkloadRequest]) -> dict[str, bytes]:
        """Refuse a workload naming an adapter the cluster does not serve (ValueError naming it);
        return each named adapter's block-key salt (``b"L"`` + its index: 13-byte trace keys,
        distinct from the base model's 8-byte ones, so prefix reuse never crosses adapters)."""
        names = {r.adapter for r in reqs if r.adapter}
        if not names:
            return {}
        cfg = cluster.adapters
        if cfg is None:
            raise ValueError(
                f"the workload names LoRA adapter(s) {', '.join(sorted(names)[:5])} but the cluster serves none "
                "(set ClusterConfig.adapters / --adapters)"
            )
        return {n: b"L" + adapter_index(n, cfg.num_adapters).to_bytes(4, "little") for n in sorted(names)}

    def _build(self) -> list[SimInstance]:
        c = self.cluster
        out: list[SimInstance] = []
        counters: dict[InstanceRole, int] = {}
        stride = max(1, c.cache.host_block_tokens // c.block_size)
        for g in c.groups:
            sched = c.scheduler_for(g)
            blocks = c.kv_blocks_for(g)
            if g.count and blocks < 1:
                raise ValueError(
                    f"{c.latency.model} does not fit on {g.tp} x {c.latency.gpu} (no room for KV)"
                )
            lat = self.latency_factory(g.tp)
            plan = c.offload_plan(g) if g.count else None
            for _ in range(g.count):
                k = counters.get(g.role, 0)
                counters[g.role] = k + 1
                host: PrefixStore | TieredPrefixStore | None = None
                if c.cache.host_pool is not HostPool.NONE and g.role is not InstanceRole.DECODE:
                    cap = None
                    if c.cache.host_pool is HostPool.LIMITED:
                        cap = max(1, c.cache.host_pool_tokens // c.cache.host_block_tokens)
                    if c.cache.disk_pool_tokens and cap is not None:
                        disk = None
                        if c.cache.disk_pool_tokens > 0:
                            disk = max(1, c.cache.disk_pool_tokens // c.cache.host_block_tokens)
                        host = TieredPrefixStore(cap, disk, stride)
                    else:
                        host = PrefixStore(stride, cap)
                out.append(
                    SimInstance(
                        f"{g.role.value}{k}",
                        g.role,
                        sched,
                        blocks,
                        c.block_size,
                        lat,
                        self.loop,
                        self._on_step,
                        enable_prefix_caching=c.cache.enable_prefix_caching
                        and g.role is not InstanceRole.DECODE,
                        host_pool=host,
                        tp=g.tp,
                        disk_bytes_per_s=c.cache.disk_gb_s * 1e9,
                        swap_space_bytes=int(c.swap_space_gib * 2**30),
                        swap_bytes_per_s=c.swap_gb_s * 1e9,
                        swap_disk_bytes=int(c.swap_disk_gib * 2**30),
                        adapters=AdapterResidency(c.adapters, c.latency.model) if c.adapters else None,
                        offload=plan,
                    )
                )
                out[-1].on_adapter_read = self._adapter_read
        if not out:
            raise ValueError("the cluster has no instances")
        return out

    def execute(self) -> bool:
        if self.workload:
            self.loop.at(self.workload[0].arrival_s, self._arrive, 0)
        m = self.cluster.migration
        if m is not None and len(self._mig_pool) >= 2:
            self.loop.after(m.interval_s, self._migration_tick)
        if self.cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=len(self.workload), desc="simulate", unit="req", leave=False)
        self.loop.run(until=self.cfg.max_sim_time_s)
        if self._bar is not None:
            self._bar.close()
        done = all(r.finished or r.rejected for r in self.records) and len(self.records) == len(self.workload)
        return done and not self.stopped_early

    def end_time(self) -> float:
        """Simulated end: the loop's clock, or with migration on, the last event that did work
        (a policy tick that found the cluster idle does not extend the run)."""
        if self.cluster.migration is None or self.loop.pending or self.stopped_early:
            return self.loop.now()
        return self._last_work_s

    def instance_stats(self) -> dict[str, dict[str, float]]:
        t = max(self.end_time(), 1e-12)
        return {
            i.instance_id: {
                "role": i.role.value,
                "tp": i.tp,
                "steps": i.stats.steps,
                "busy_s": i.stats.busy_s,
                "utilization": i.stats.busy_s / t,
                "prefill_tokens": i.stats.prefill_tokens,
                "decode_tokens": i.stats.decode_tokens,
                "preemptions": i.sched.num_preemptions,
                "swap_outs": i.sched.num_swap_outs,
                "swap_s": i.stats.swap_s,
                "swap_disk_s": i.stats.swap_disk_s,
                "swap_disk_blocks": i.stats.swap_disk_blocks,
                "imported_blocks": i.stats.imported_blocks,
                "disk_blocks": i.stats.disk_blocks,
                "kv_blocks": i.total_blocks,
                "free_blocks_end": i.kv.num_free_blocks,
                "migrations_out": i.stats.migrations_out,
                "migrations_in": i.stats.migrations_in,
                "migrated_blocks": i.stats.migrated_blocks,
                **self._adapter_stats(i),
                **self._offload_stats(i),
            }
            for i in self.instances
        }

    @staticmethod
    def _offload_stats(i: SimInstance) -> dict[str, float]:
        """Offloading counters of an instance (none without an offloading placement)."""
        if i.offload is None:
            return {}
        return {
            "offload_s": i.stats.offload_s,
            "weight_layers_offloaded": len(i.offload.weights.offloaded),
            "kv_layers_offloaded": len(i.offload.kv.offloaded),
        }

    @staticmethod
    def _adapter_stats(i: SimInstance) -> dict[str, float]:
        """LoRA adapter counters of an instance (none without ``ClusterConfig.adapters``)."""
        if i.adapters is None:
            return {}
        a = i.adapters.stats
        return {
            "adapter_slot_loads": a.slot_loads,
            "adapter_slot_evictions": a.slot_evictions,
            "adapter_disk_loads": a.disk_loads,
            "adapter_host_evictions": a.host_evictions,
            "adapter_copy_s": a.copy_s,
            "adapter_wait_s": a.wait_s,
        }

    # ------------------------------------------------------------------ helpers
    def _sp(self, n: int) -> SamplingParams:
        p = self._params.get(n)
        if p is None:
            p = self._params[n] = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        return p

    def _violation(self, rid: str) -> None:
        if self.budget is None or rid in self._violated:
            return
        self._violated.add(rid)
        if len(self._violated) > self.budget:
            self.stopped_early = True
            self.loop.stop()

    def _keys(self, w: WorkloadRequest) -> list[BlockHash]:
        if w.hash_ids is None or not self.use_trace_keys:
            return []
        keys = trace_block_keys(w.hash_ids, w.input_len, self.block_size, w.hash_block)
        if w.adapter:  # the adapter is part of the block key (engine.block_hash)
            salt = self._adapter_salt[w.adapter]
            keys = [k + salt for k in keys]
        return keys

    def _request_keys(
        self, inst: SimInstance, index: int, prefix: list[BlockHash], num_tokens: int
    ) -> list[BlockHash]:
        """``Request.block_hashes`` for request ``index`` on ``inst``: ``prefix`` (trace keys) then
        :func:`request_block_keys` for every further full block of its ``num_tokens`` (prompt +
        output), so the KV manager never hashes. Without a prefix cache on ``inst`` the engine
        computes no keys, so neither do we (its host pool must see the same keys as before).
        """
        if not inst.kv.enable_prefix_caching:
            return prefix
        n_full = num_tokens // self.block_size
        if len(prefix) >= n_full:
            return prefix
        return prefix + request_block_keys(index, len(prefix), n_full)

    # ------------------------------------------------------------------ arrivals
    def _arrive(self, i: int) -> None:
        wl = self.workload
        w = wl[i]
        self._arrived = i + 1
        self._last_work_s = self.loop.now()
        if i + 1 < len(wl):
            self.loop.at(wl[i + 1].arrival_s, self._arrive, i + 1)
        if self._bar is not None and i % 256 == 0:
            self._bar.n = i
            self._bar.refresh()
        now = self.loop.now()
        rid = str(i)
        rec = RequestRecord(rid, now, w.input_len, w.output_len, adapter=w.adapter)
        self.records.append(rec)
        self.rec[rid] = rec
        if not self.has_prefill:  # decode-phase study: KV already in place
            rec.first_token = now
            self._to_decode(rec, None)
            return
        hashes = self._keys(w)
        info = RequestInfo(rid, w.input_len, hashes, w.output_len, self.slo, now, adapter=w.adapter)
        store = self.store
        if store is not None and hashes:
            hit = store.prefix(hashes)
            if hit.blocks:
                info = replace(
                    info,
                    store_prefix_blocks=hit.blocks,
                    store_prefix_disk_blocks=hit.disk,
                    store_disk_block_s=store.disk_block_s,
                )
        d = self.policy.place(info, self.view)
        if isinstance(d, Rejection):
            rec.rejected = d.reason.value
            self._violation(rid)
            return
        inst = self.by_id[d.instance_id]
        rec.prefill_instance = inst.instance_id
        req = Request(
            rid,
            range(w.input_len),
            self._sp(w.output_len),
            arrival_time=now,
            cache_salt=rid,
            prefill_only=inst.role is InstanceRole.PREFILL,
            block_hashes=self._request_keys(inst, i, hashes, w.input_len + w.output_len),
            adapter_id=w.adapter,
        )
        delay = self.cluster.dispatch_overhead_s
        if d.fetch_from is not None and d.fetch_blocks > 0:
            local = inst.cached_prefix_blocks(hashes)
            extra = d.fetch_blocks - local
            if extra > 0:
                if d.fetch_from == STORE_SOURCE and self.store is not None:  # disk reads first
                    dt = self.store.fetch_s(inst.latency, hashes, local, d.fetch_blocks, self.block_size)
                else:
                    dt = inst.latency.transfer_time(extra * self.block_size * inst.latency.kv_bytes_per_token)
                rec.fetched_blocks = extra
                rec.transfer_s += dt
                self.loop.after(dt + delay, self._submit, inst, req, rec, d.fetch_blocks)
                return
        if delay > 0:
            self.loop.after(delay, self._submit, inst, req, rec, 0)
            return
        self._submit(inst, req, rec, 0)

    def _submit(self, inst: SimInstance, req: Request, rec: RequestRecord, fetched: int) -> None:
        def invalid(e: InvalidRequestError) -> None:
            rec.rejected = f"invalid: {e}"
            self._violation(rec.request_id)

        try:
            inst.submit(req, fetched, on_invalid=invalid)
        except InvalidRequestError as e:
            invalid(e)

    # ------------------------------------------------------------------ step results
    def _on_step(self, rep: StepReport) -> None:
        inst = rep.instance
        t = rep.end
        rec = self.rec
        self._last_work_s = t
        if self.cfg.track_tbt:
            self._track_tbt(rep)
        for r in rep.started:
            x = rec[r.request_id]
            if x.first_scheduled != x.first_scheduled:
                x.first_scheduled = rep.start
        if rep.first_tokens:
            ttft_slo = self.slo.ttft_s
            host = inst.host_pool
            for r in rep.first_tokens:
                x = rec[r.request_id]
                x.first_token = t
                x.cached_tokens = max(r.num_cached_tokens, 0)
                if host is not None:
                    host.add(r.block_hashes[: r.num_prompt_tokens // self.block_size])
                if self.store is not None and inst.role is not InstanceRole.DECODE:
                    self.store.publish(r.block_hashes[: r.num_prompt_tokens // self.block_size])
                if t - x.arrival > ttft_slo:
                    self._violation(x.request_id)
        for r in rep.done:
            x = rec[r.request_id]
            if r.status is RequestStatus.PREFILLED:
                self._handoff(inst, r, x)
            else:
                x.finish = t
                if not x.decode_instance:
                    x.decode_instance = inst.instance_id
                if x.output_len > 1 and (t - x.first_token) / (x.output_len - 1) > self.slo.tpot_s:
                    self._violation(x.request_id)
        if inst.pending:
            self._pump(inst)

    def _track_tbt(self, rep: StepReport) -> None:
        t = rep.end
        for s in rep.out.scheduled:
            if not s.samples:
                continue
            x = self.rec[s.request.request_id]
            last = x.last_token
            if last == last and not (t - last <= x.max_tbt):  # NaN-safe max
                x.max_tbt = t - last
            x.last_token = t

    # ------------------------------------------------------------------ disaggregation
    def _handoff(self, src: SimInstance, r: Request, x: RequestRecord) -> None:
        if x.output_len <= 1 or not self.has_decode:
            src.release_prefilled(r.request_id)
            x.finish = self.loop.now()
            return
        self._to_decode(x, src)

    def _to_decode(self, x: RequestRecord, src: SimInstance | None) -> None:
        info = RequestInfo(
            x.request_id, x.input_len, (), x.output_len, self.slo, x.arrival, adapter=x.adapter
        )
        need = -(-(x.input_len + 1) // self.block_size)
        did = self.policy.choose_decode(info, self.view, need)
        dec = self.by_id[did] if did is not None else None
        if dec is None or need > dec.total_blocks:
            x.rejected = "no decode instance can hold the request's KV"
            if src is not None:
                src.release_prefilled(x.request_id)
            self._violation(x.request_id)
            return
        dec.pending.append((x, src))
        self._pump(dec)

    def _pump(self, dec: SimInstance) -> None:
        keep = int(dec.total_blocks * self.cluster.decode_watermark)
        kv = dec.kv
        max_seqs = dec.sched.config.max_num_seqs
        while dec.pending:
            x, src = dec.pending[0]
            p = x.input_len
            busy = len(dec.sched.running) + dec.in_transfer
            if busy and (busy >= max_seqs or kv.num_free_blocks - kv.blocks_needed(p + 1) < keep):
                break
            # the decode side pins the adapter too (a slot copy, or a disk read to wait for);
            # blocks are checked first so that a pin is never taken for a handoff that waits
            if x.adapter and (
                kv.num_free_blocks < kv.blocks_needed(p + 1) or not dec.try_pin_adapter(x.adapter)
            ):
                break
            req = Request(
                x.request_id,
                range(p),
                self._sp(x.output_len),
                arrival_time=x.arrival,
                cache_salt=x.request_id,
                block_hashes=self._request_keys(dec, int(x.request_id), [], p + x.output_len),
                adapter_id=x.adapter,
            )
            if not dec.adopt(req, p):
                assert not x.adapter, "blocks were checked before the adapter's pin"
                break
            dec.pending.popleft()
            req.num_computed_tokens = p
            req.num_cached_tokens = 0
            req.output_token_ids.append(DUMMY_TOKEN)
            x.decode_instance = dec.instance_id
            dt = self._handoff_s(src, dec, p) if src is not None else 0.0
            x.transfer_s += dt
            dec.in_transfer += 1
            self.loop.after(dt, self._transfer_done, dec, src, req)

    def _handoff_s(self, src: SimInstance, dec: SimInstance, p: int) -> float:
        """The KV handoff of a ``p``-token prompt after its prefill: the whole KV, or with
        ``kv_stream_chunk_tokens`` only what streaming leaves (router.policy.kv_stream)."""
        chunk = self.cluster.kv_stream_chunk_tokens
        if chunk <= 0:
            return dec.latency.kv_transfer_time(p)
        memo: dict[tuple[int, int], float] = self.__dict__.setdefault("_handoff_memo", {})
        key = (id(src.latency), p)
        t = memo.get(key)
        if t is None:
            t = memo[key] = handoff_after_prefill(src.latency, p, 0, chunk).streamed_s
        return t

    def _adapter_read(self, inst: SimInstance) -> None:
        """An adapter's disk read ended on ``inst``: handoffs waiting there may go on."""
        if inst.pending:
            self._pump(inst)

    def _transfer_done(self, dec: SimInstance, src: SimInstance | None, req: Request) -> None:
        if src is not None:
            src.release_prefilled(req.request_id)
        dec.in_transfer -= 1
        dec.start_decoding(req)

    # ------------------------------------------------------------------ live migration
    def _mig_bytes_s(self, inst: SimInstance, blocks: int) -> float:
        m = self.cluster.migration
        assert m is not None
        return blocks * inst.block_nbytes / (m.bandwidth_gb_s * 1e9)

    def _outstanding(self) -> bool:
        if self._arrived < len(self.workload):
            return True
        return any(
            i.busy or i.pending or i.in_transfer or i.sched.has_unfinished() or i.sched.paused
            for i in self.instances
        )

    def _migration_tick(self) -> None:
        """Run the router's migration policies over the decode-capable instances and start the
        moves they decide; again in ``interval_s`` while the cluster has work."""
        m = self.cluster.migration
        assert m is not None
        if self.stopped_early:
            return
        cfg = m.policy
        free = [i for i in self._mig_pool if self._mig_busy.get(i.instance_id, 0) < m.max_concurrent]
        if len(free) >= 2:
            moving = set(self._moving)
            loads = [decode_load(i, moving) for i in free]
            decisions: list[MigrationDecision] = []
            if MigrationReason.PRIORITY in m.reasons:
                decisions += mig_policy.protect_priority(loads, cfg)
            if MigrationReason.DEFRAGMENT in m.reasons and not decisions:
                decisions += defrag_decisions(free, loads, cfg)
            if MigrationReason.LOAD_BALANCE in m.reasons and not decisions:
                decisions += mig_policy.balance(loads, cfg)
            for d in decisions:
                self._start_migration(d)
        if self._outstanding():
            self.loop.after(m.interval_s, self._migration_tick)

    def _start_migration(self, d: MigrationDecision) -> None:
        m = self.cluster.migration
        assert m is not None
        busy = self._mig_busy
        if d.request_id in self._moving or any(
            busy.get(k, 0) >= m.max_concurrent for k in (d.source, d.destination)
        ):
            return  # a decision of this tick already took one of them
        src, dst = self.by_id[d.source], self.by_id[d.destination]
        req = src.sched.requests.get(d.request_id)
        if req is None or req.status is not RequestStatus.RUNNING or not req.is_decoding:
            return
        now = self.loop.now()
        rec = MigrationRecord(d.request_id, d.source, d.destination, d.reason, now)
        self.migrations.append(rec)
        self._moving[d.request_id] = rec
        for k in (d.source, d.destination):
            busy[k] = busy.get(k, 0) + 1
        dst.in_transfer += 1  # a batch slot there from now on
        self._stage(rec, src, dst, 0)

    def _stage(self, rec: MigrationRecord, src: SimInstance, dst: SimInstance, sent_full: int) -> None:
        """Copy, while the request decodes on ``src``, every block from its ``sent_full``-th on
        (the full blocks before it were sent by earlier stages; a partial block is re-sent)."""
        req = src.sched.requests.get(rec.request_id)
        reason = self._abort_reason(req)
        if reason is not None:
            self._end_migration(rec, src, dst, reason)
            return
        assert req is not None
        n = req.num_computed_tokens
        blocks = dst.kv.blocks_needed(n)
        if not self._reserve(dst, rec.request_id, blocks):
            self._end_migration(rec, src, dst, MigrationResult.NO_ROOM)
            return
        send = blocks - sent_full
        rec.stages += 1
        rec.blocks_copied += send
        self.loop.after(self._mig_bytes_s(src, send), self._stage_done, rec, src, dst, n // dst.block_size)

    def _reserve(self, dst: SimInstance, rid: str, blocks: int) -> bool:
        """Grow the destination's table for ``rid`` to ``blocks`` blocks; False when short."""
        extra = blocks - dst.kv.num_held_blocks(rid)
        if extra <= 0:
            return True
        if extra > dst.kv.num_free_blocks:
            return False
        dst.kv.extend_blocks(rid, extra)
        return True

    @staticmethod
    def _abort_reason(req: Request | None) -> MigrationResult | None:
        if req is None or req.status.name.startswith("FINISHED"):
            return MigrationResult.FINISHED
        if req.status is not RequestStatus.RUNNING:
            return MigrationResult.PREEMPTED
        return None

    def _stage_done(self, rec: MigrationRecord, src: SimInstance, dst: SimInstance, sent_full: int) -> None:
        m = self.cluster.migration
        assert m is not None
        self._last_work_s = self.loop.now()
        req = src.sched.requests.get(rec.request_id)
        reason = self._abort_reason(req)
        if reason is not None:
            self._end_migration(rec, src, dst, reason)
            return
        assert req is not None
        left = dst.kv.blocks_needed(req.num_computed_tokens) - sent_full
        if left > m.stop_blocks and rec.stages < m.max_stages:
            self._stage(rec, src, dst, sent_full)
            return
        src.pause_at_boundary(rec.request_id, lambda ok: self._stop_and_copy(rec, src, dst, sent_full, ok))

    def _stop_and_copy(
        self, rec: MigrationRecord, src: SimInstance, dst: SimInstance, sent_full: int, paused: bool
    ) -> None:
        m = self.cluster.migration
        assert m is not None
        req = src.sched.requests.get(rec.request_id)
        if not paused:
            self._end_migration(rec, src, dst, self._abort_reason(req) or MigrationResult.PREEMPTED)
            return
        assert req is not None
        blocks = dst.kv.blocks_needed(req.num_computed_tokens)
        if not self._reserve(dst, rec.request_id, blocks):
            src.resume(rec.request_id)
            self._end_migration(rec, src, dst, MigrationResult.NO_ROOM)
            return
        send = blocks - sent_full
        rec.stages += 1
        rec.blocks_copied += send
        down = m.stop_copy_s + self._mig_bytes_s(src, send)
        rec.downtime_s = down
        self.loop.after(down, self._switch, rec, src, dst, req)

    def _switch(self, rec: MigrationRecord, src: SimInstance, dst: SimInstance, old: Request) -> None:
        """The destination takes over: a new engine request with the source's tokens and state
        (as ``engine.migration`` builds it), the source retires its copy and frees its blocks."""
        self._last_work_s = self.loop.now()
        req = Request(
            old.request_id,
            old.prompt_token_ids,
            old.sampling_params,
            arrival_time=old.arrival_time,
            priority=old.priority,
            cache_salt=old.cache_salt,
            block_hashes=list(old.block_hashes),
        )
        req.output_token_ids.extend(old.output_token_ids)
        req.num_computed_tokens = old.num_computed_tokens
        req.num_cached_tokens = 0
        src.migrated_out(rec.request_id)
        dst.in_transfer -= 1
        dst.sched.add_running(req)
        dst.kv.cache_blocks(req)
        src.stats.migrations_out += 1
        src.stats.migrated_blocks += rec.blocks_copied
        dst.stats.migrations_in += 1
        x = self.rec[rec.request_id]
        x.decode_instance = dst.instance_id
        self._close(rec, src, dst, MigrationResult.DONE)
        dst.kick()
        if src.pending:
            self._pump(src)

    def _end_migration(
        self, rec: MigrationRecord, src: SimInstance, dst: SimInstance, result: MigrationResult
    ) -> None:
        """Abort: the destination frees what it allocated; the request stays (or ended) on the source."""
        self._last_work_s = self.loop.now()
        dst.kv.free(rec.request_id)
        dst.in_transfer -= 1
        self._close(rec, src, dst, result)
        if dst.pending:
            self._pump(dst)
        dst.kick()

    def _close(
        self, rec: MigrationRecord, src: SimInstance, dst: SimInstance, result: MigrationResult
    ) -> None:
        rec.end = self.loop.now()
        rec.result = result
        del self._moving[rec.request_id]
        for k in (src.instance_id, dst.instance_id):
            self._mig_busy[k] -= 1
