"""Frozen configuration of a simulated cluster and of a simulation run.

A cluster is a tuple of :class:`InstanceGroup`s (role, count, TP). Its :class:`Mode` follows:
only mixed instances = colocated (vLLM / Sarathi, by the scheduler config); prefill + decode =
disaggregated (DistServe); prefill + decode + mixed = Splitwise (the mixed pool absorbs
overflow). KV capacity per instance is derived from GPU memory::

    blocks = floor((tp * gpu_memory * gpu_memory_utilization - weights - tp * activation_reserve)
                   / (kv_bytes_per_token * block_size))
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from engine.offload_policy import BatchChoice
from engine.scheduler import SchedulerConfig, SchedulingPolicy
from router.policy import SLO, InstanceRole, PolicyKind
from simulator.adapters import AdapterConfig
from simulator.hardware import gpu_spec
from simulator.kv_store import SimKVStoreConfig
from simulator.latency import LatencySpec, make_latency_model
from simulator.migration import SimMigrationConfig
from simulator.models import MODELS, model_spec
from simulator.offload import OffloadPlan, SimOffloadConfig, plan_offload


class Mode(enum.Enum):
    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"
    SPLITWISE = "splitwise"


class HostPool(enum.Enum):
    """Per-instance host-memory KV pool (Mooncake): none, LRU-limited, or unlimited."""

    NONE = "none"
    LIMITED = "limited"
    UNLIMITED = "unlimited"


# ----------------------------------------------------------------------- scheduler presets
def vllm_scheduler(max_model_len: int, max_num_seqs: int = 256) -> SchedulerConfig:
    """vLLM-style: whole prompts (no chunking), budget = max(2048, context)."""
    return SchedulerConfig(
        max_num_batched_tokens=max(2048, max_model_len),
        max_num_seqs=max_num_seqs,
        long_prefill_token_threshold=0,
        enable_chunked_prefill=False,
        max_model_len=max_model_len,
    )


def sarathi_scheduler(max_model_len: int, chunk: int = 512, max_num_seqs: int = 256) -> SchedulerConfig:
    """Sarathi-Serve: token budget = chunk (decodes included), prefills chunked to fill it."""
    return SchedulerConfig(
        max_num_batched_tokens=chunk,
        max_num_seqs=max_num_seqs,
        long_prefill_token_threshold=chunk,
        max_model_len=max_model_len,
    )


def prefill_scheduler(max_model_len: int, budget: int = 2048, max_num_seqs: int = 64) -> SchedulerConfig:
    """Prefill instances: batch prompts up to ``budget`` tokens, long prompts chunked by it."""
    return SchedulerConfig(
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        long_prefill_token_threshold=budget,
        max_model_len=max_model_len,
    )


def decode_scheduler(max_model_len: int, max_num_seqs: int = 256) -> SchedulerConfig:
    """Decode instances: large batches; recomputation after preemption is chunked by 2048."""
    return SchedulerConfig(
        max_num_batched_tokens=max(2048, max_num_seqs),
        max_num_seqs=max_num_seqs,
        long_prefill_token_threshold=2048,
        max_model_len=max_model_len,
    )


class SchedulerPreset(enum.Enum):
    VLLM = "vllm"
    SARATHI = "sarathi"


# ----------------------------------------------------------------------- cluster
@dataclass(frozen=True)
class InstanceGroup:
    """``count`` identical instances of ``role``, each on ``tp`` GPUs. ``scheduler`` None = role default."""

    role: InstanceRole
    count: int
    tp: int = 1
    scheduler: SchedulerConfig | None = None

    def __post_init__(self) -> None:
        if self.count < 0 or self.tp < 1:
            raise ValueError("count must be >= 0 and tp >= 1")


@dataclass(frozen=True)
class CacheConfig:
    enable_prefix_caching: bool = True
    host_pool: HostPool = HostPool.NONE
    host_pool_tokens: int = 0  # capacity per instance for LIMITED
    host_block_tokens: int = 512  # host-pool granularity (Mooncake's block)
    # disk tier behind a LIMITED host pool (kv_store's --disk-tier): blocks evicted from the pool
    # are kept on disk; a hit there costs its bytes / disk_gb_s before the request can start, and
    # is used only when that beats recomputing those tokens. 0: no disk tier; -1: unlimited
    disk_pool_tokens: int = 0
    disk_gb_s: float = 3.0  # disk read bandwidth, GB/s (assumed: one NVMe SSD)

    def __post_init__(self) -> None:
        if self.disk_pool_tokens < -1:
            raise ValueError(f"disk_pool_tokens must be >= 0 (or -1: unlimited), got {self.disk_pool_tokens}")
        if self.disk_pool_tokens and self.host_pool is not HostPool.LIMITED:
            raise ValueError("a disk tier (disk_pool_tokens) needs a LIMITED host pool in front of it")
        if not (self.disk_gb_s > 0 and math.isfinite(self.disk_gb_s)):
            raise ValueError(f"disk_gb_s must be > 0, got {self.disk_gb_s}")


@dataclass(frozen=True)
class ClusterConfig:
    latency: LatencySpec
    groups: tuple[InstanceGroup, ...]
    block_size: int = 16
    max_model_len: int | None = None  # None: the model's
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: int = 2 * 2**30  # per GPU
    kv_blocks: int | None = None  # override the derived per-instance capacity
    cache: CacheConfig = field(default_factory=CacheConfig)
    policy: PolicyKind = PolicyKind.LEAST_LOADED
    decode_watermark: float = 0.01  # share of blocks a decode instance keeps free when admitting
    seed: int = 0
    # Fixed delay (s) between a request's arrival and its submission to the placed instance:
    # the serving path the latency model does not cover (client -> router -> worker RPCs, the
    # first token's way back). 0 = none (the default; no extra events are scheduled).
    dispatch_overhead_s: float = 0.0
    # Swap-based preemption (the engine's host KV pool, issue #15): host memory per instance for
    # swapped-out KV (0: preemption recomputes) and the device<->host copy bandwidth; the engine's
    # scheduler picks swap or recompute per request by cost, and each step's copies add
    # blocks * block bytes / bandwidth to the step's time.
    swap_space_gib: float = 0.0
    swap_gb_s: float = 25.0  # one direction (assumed: PCIe 4.0 x16)
    # The engine's disk tier behind the swap pool (EngineConfig.swap_disk_bytes): disk per
    # instance for the coldest swapped-out KV when the swap pool is full (0: off; needs
    # swap_space_gib), at the cache's disk_gb_s.
    swap_disk_gib: float = 0.0
    # Live migration of decoding requests between decode-capable instances (Llumnix, issue #14):
    # the router's migration policies run every SimMigrationConfig.interval_s. None: off.
    migration: SimMigrationConfig | None = None
    # Chunk-wise KV streaming from prefill to decode (issue #14 part 2): the handoff's KV moves
    # chunk by chunk (this many prompt tokens each) while the prefill computes the next ones, so a
    # handoff takes only what router.policy.kv_stream.handoff_after_prefill leaves after the
    # prefill (the last chunk's transfer while the link keeps up). 0: off (the whole KV after
    # the prefill).
    kv_stream_chunk_tokens: int = 0
    # LoRA adapters (issue #16, simulator.adapters): every instance serves the catalogue, with
    # engine slots (LRU, pinned while used), a host tier, load times and LoRA's step cost.
    # Requests name adapters through WorkloadRequest.adapter. None: the base model only (a
    # workload naming an adapter is refused).
    adapters: AdapterConfig | None = None
    # Weight and KV offloading (issue #15 part 4, simulator.offload): each instance's weights
    # and KV placed on device / host / disk by the engine's cost model (engine.offload_policy),
    # the freed device memory going to KV blocks, each step priced by its predict_step_s. None: off.
    offload: SimOffloadConfig | None = None
    # The cluster's KV store with its SSD tier (issue #15 part 3, simulator.kv_store): prefills
    # publish their prompts' blocks; the router sees each prompt's stored prefix and its disk
    # part and prices a fetch with its own TtftTable.store_fetch. None: no store.
    kv_store: SimKVStoreConfig | None = None

    def __post_init__(self) -> None:
        if self.adapters is not None and self.migration is not None:
            raise ValueError(
                "adapters with live migration: moving LoRA requests between instances is not modelled "
                "in the simulator (set migration=None or adapters=None)"
            )
        if self.kv_stream_chunk_tokens < 0:
            raise ValueError(f"kv_stream_chunk_tokens must be >= 0, got {self.kv_stream_chunk_tokens}")
        if not (self.swap_space_gib >= 0 and math.isfinite(self.swap_space_gib)):
            raise ValueError(f"swap_space_gib must be >= 0, got {self.swap_space_gib}")
        if not (self.swap_disk_gib >= 0 and math.isfinite(self.swap_disk_gib)):
            raise ValueError(f"swap_disk_gib must be >= 0, got {self.swap_disk_gib}")
        if self.swap_disk_gib and not self.swap_space_gib:
            raise ValueError("swap_disk_gib needs swap_space_gib (the disk tier sits behind the swap pool)")
        if not (self.swap_gb_s > 0 and math.isfinite(self.swap_gb_s)):
            raise ValueError(f"swap_gb_s must be > 0, got {self.swap_gb_s}")
        if self.kv_store is not None and not self.cache.enable_prefix_caching:
            raise ValueError(
                "kv_store without prefix caching: blocks fetched from the store land in the instances' prefix "
                "caches (set cache.enable_prefix_caching)"
            )
        if self.offload is not None:
            self._check_offload(self.offload)

    def _check_offload(self, o: SimOffloadConfig) -> None:
        """Refuse what the engine refuses with offloading (ValueError naming it)."""
        if self.latency.model.lower() not in MODELS:
            raise ValueError(
                f"offload needs the model's shape; {self.latency.model!r} is not one of {', '.join(sorted(MODELS))}"
            )
        tp = sorted({g.tp for g in self.groups if g.tp > 1})
        if tp:
            raise ValueError(f"offload is not supported with tensor parallelism (tp {tp}), as in the engine")
        if o.offline_batch:
            mlfq = [
                g.role.value
                for g in self.groups
                if g.count and self._scheduler(g).policy is SchedulingPolicy.MLFQ
            ]
            if mlfq:
                raise ValueError(
                    f"offline_batch with the MLFQ scheduling policy ({', '.join(mlfq)} instances): an offline job "
                    "is not interactive, as in the engine"
                )
        weights = o.weight_budget_gib is not None or o.device_budget_gib is not None
        if weights and self.adapters is not None:
            raise ValueError(
                "adapters with weight offloading: the engine refuses LoRA with offloaded weights"
            )
        for g in self.groups:  # budgets that do not fit the GPU are refused here, not mid-run
            if g.count:
                self.offload_plan(g)

    def offload_plan(self, group: InstanceGroup) -> OffloadPlan | None:
        """The offloading placement of one instance of ``group`` (None: no ``offload``)."""
        if self.offload is None:
            return None
        m = model_spec(self.latency.model)
        g = gpu_spec(self.latency.gpu)
        usable = group.tp * (g.memory_bytes * self.gpu_memory_utilization - self.activation_reserve_bytes)
        sched = self._scheduler(group)  # its max_num_seqs and max_model_len bound the KV staging buffers
        seqs = sched.max_num_seqs
        decode = (
            self.latency_model(group.tp).decode_time(seqs, seqs) if self.offload.device_budget_gib else 0.0
        )
        return plan_offload(
            self.offload, m, usable, self.block_size, self.kv_blocks, seqs, decode, sched.max_model_len
        )

    @property
    def mode(self) -> Mode:
        roles = {g.role for g in self.groups if g.count > 0}
        if roles <= {InstanceRole.MIXED}:
            return Mode.COLOCATED
        if InstanceRole.MIXED in roles:
            return Mode.SPLITWISE
        return Mode.DISAGGREGATED

    @property
    def num_gpus(self) -> int:
        return sum(g.count * g.tp for g in self.groups)

    @property
    def model_len(self) -> int:
        if self.max_model_len is not None:
            return self.max_model_len
        if self.latency.model in MODELS:
            return model_spec(self.latency.model).max_model_len
        return 8192

    def scheduler_for(self, group: InstanceGroup) -> SchedulerConfig:
        """The scheduler of ``group``'s instances: its own or the role's default, with
        ``offload.offline_batch`` its ``max_num_seqs`` the cost model's offline batch
        (:meth:`offline_batch_for`)."""
        s = self._scheduler(group)
        if self.offload is not None and self.offload.offline_batch:
            choice = self.offline_batch_for(group)
            if choice is not None:
                return replace(s, max_num_seqs=choice.batch_size)
        return s

    def offline_batch_for(self, group: InstanceGroup) -> BatchChoice | None:
        """``EngineConfig.offline_batch``'s choice for ``group`` (None without it): bounded by the
        scheduler's ``max_num_seqs`` and the pool's blocks, as ``engine.offload.apply_offline_batch``;
        each sequence's compute from the latency model's decode step at that bound."""
        if self.offload is None or not self.offload.offline_batch:
            return None
        plan = self.offload_plan(group)
        assert plan is not None
        bound = max(1, min(self._scheduler(group).max_num_seqs, plan.num_blocks))
        per_seq = self.latency_model(group.tp).decode_time(bound, bound) / bound
        return plan.offline_batch(bound, per_seq)

    def _scheduler(self, group: InstanceGroup) -> SchedulerConfig:
        if group.scheduler is not None:
            return group.scheduler
        n = self.model_len
        if group.role is InstanceRole.PREFILL:
            return prefill_scheduler(n)
        if group.role is InstanceRole.DECODE:
            return decode_scheduler(n)
        return vllm_scheduler(n)

    def kv_blocks_for(self, group: InstanceGroup) -> int:
        """KV blocks of one instance of ``group`` (see the module docstring; with ``offload``,
        the pool :meth:`offload_plan` places)."""
        plan = self.offload_plan(group)
        if plan is not None:
            return plan.num_blocks
        if self.kv_blocks is not None:
            return self.kv_blocks
        m = model_spec(self.latency.model)
        g = gpu_spec(self.latency.gpu)
        free = (
            group.tp * (g.memory_bytes * self.gpu_memory_utilization - self.activation_reserve_bytes)
            - m.weight_bytes
        )
        return max(0, math.floor(free / (m.kv_bytes_per_token * self.block_size)))

    def fits(self, group: InstanceGroup) -> bool:
        """Whether the model fits with room for one max-length request."""
        return self.kv_blocks_for(group) * self.block_size >= self.model_len

    def latency_model(self, tp: int):
        return make_latency_model(self.latency, tp)


def colocated(
    latency: LatencySpec, count: int, tp: int = 1, scheduler: SchedulerConfig | None = None, **kw
) -> ClusterConfig:
    return ClusterConfig(latency, (InstanceGroup(InstanceRole.MIXED, count, tp, scheduler),), **kw)


def disaggregated(
    latency: LatencySpec, prefill: int, decode: int, tp_prefill: int = 1, tp_decode: int = 1, **kw
) -> ClusterConfig:
    groups = (
        InstanceGroup(InstanceRole.PREFILL, prefill, tp_prefill),
        InstanceGroup(InstanceRole.DECODE, decode, tp_decode),
    )
    return ClusterConfig(latency, groups, **kw)


def splitwise(
    latency: LatencySpec,
    prefill: int,
    decode: int,
    mixed: int,
    tp: int = 1,
    mixed_scheduler: SchedulerConfig | None = None,
    **kw,
) -> ClusterConfig:
    groups = (
        InstanceGroup(InstanceRole.PREFILL, prefill, tp),
        InstanceGroup(InstanceRole.DECODE, decode, tp),
        InstanceGroup(InstanceRole.MIXED, mixed, tp, mixed_scheduler),
    )
    return ClusterConfig(latency, groups, **kw)


@dataclass(frozen=True)
class SimConfig:
    """What to measure. ``early_stop``: stop once the attainment target is out of reach (goodput search)."""

    slo: SLO = field(default_factory=SLO)
    attainment_target: float = 0.9
    early_stop: bool = False
    max_sim_time_s: float = math.inf
    progress: bool = False
    track_tbt: bool = False  # record each request's largest time between tokens (costs speed)
