"""Weight and KV offloading of a simulated instance (FlexGen, issue #15 part 4), priced by the
engine's own cost model (:mod:`engine.offload_policy`: :func:`place_weights`, :func:`place_kv`,
:func:`split_device_budget`, :func:`kv_step_cost`, :func:`predict_step_s`), imported, not copied.

Memory (one GPU; offloading with tensor parallelism is refused, as in the engine): the device
memory an instance may use for weights and KV is ``gpu_memory * gpu_memory_utilization -
activation_reserve`` (:class:`simulator.config.ClusterConfig`'s sizing).

* **Weights** (``weight_budget_gib``): :func:`place_weights` with that budget (the non-layer
  weights, two layer slots and as many decoder layers as fit stay on the device; the rest in host
  memory up to ``weight_host_gib``, then on disk). The device bytes the placement uses are what
  the weights take; the rest of the GPU goes to KV, so the KV pool grows.
* **KV** (``kv_budget_gib``, ``kv_host_gib``, ``kv_disk_gib``): the KV pool's device budget is
  ``kv_budget_gib`` (default: what the weights leave); the engine's ``kv_memory_budget_bytes``.
  :func:`place_kv` keeps the KV of as many layers as fit on the device, less two staging buffers
  of :func:`staging_bound` blocks (``max_num_seqs`` sequences of ``max_model_len`` tokens, the
  engine's bound, at most the pool); of the offloaded layers as many as ``kv_host_gib`` holds
  (the engine's ``kv_host_budget_bytes``) are in the host pool, the rest in the disk-backed
  pool (the engine's ``kv_offload_dir``), priced at ``disk_gb_s``. Without ``kv_host_gib`` the
  pool is what fits the device budget; with it the pool is the largest whose placement fits the
  device budget and puts at most ``kv_host_gib`` in the host pool and ``kv_disk_gib`` (default
  0) on disk (more layers' KV off the device, more blocks). ``ClusterConfig.kv_blocks`` (an
  override) sets the pool instead; its KV is then offloaded only when ``kv_budget_gib`` is set
  (the override ignores memory, as without offloading), ``kv_host_gib`` is then only the host
  budget (the layers beyond it on disk, unbounded as the engine's folder) and ``kv_disk_gib``
  is refused.
* **Both** (``device_budget_gib``): :func:`split_device_budget` over a pool of
  ``ClusterConfig.kv_blocks`` blocks (required: the engine's pool is given too), with staging
  buffers of :func:`staging_bound` blocks and ``kv_host_gib`` as the host budget, priced as the
  engine's ``apply_device_budget`` prices it (a step using every staged block and decoding
  ``max_num_seqs`` tokens, compute from the latency model's decode step of ``max_num_seqs``
  requests).

Step time: the latency model's step time ``t`` of the batch is split into the decoder layers'
compute (``t * (1 - other_share) / num_layers`` each) and the rest (``t * other_share``, the
LM head's share of the parameters); the step then takes :func:`predict_step_s` of the placement
with that compute, the KV term :func:`kv_step_cost` of the blocks the step's requests use
(:func:`step_blocks`: what the engine's staging reads, not every block the KV manager holds)
and the step's new tokens, the host-pool layers at ``host_gb_s``, the disk-backed ones at
``disk_gb_s``. Nothing offloaded: ``t``. The engine's offline batch is chosen after its KV
placement and so sizes its staging buffers; here they are sized for the scheduler's
``max_num_seqs`` (larger or equal: never fewer device bytes than the engine's).
Every layer of a model is taken as the same size (the simulator's shapes are per model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.block_manager import KVCacheManager
from engine.offload_policy import (
    BatchChoice,
    KVPlacement,
    OffloadCostModel,
    OffloadPolicyError,
    WeightPlacement,
    WeightTier,
    kv_device_bytes,
    kv_placement,
    kv_step_cost,
    pick_offline_batch_size,
    place_kv,
    place_weights,
    predict_step_s,
    split_device_budget,
    staging_bound,
)
from engine.scheduler import ScheduledRequest
from simulator.models import ModelSpec

GIB = 2**30


@dataclass(frozen=True)
class SimOffloadConfig:
    """Per-instance offloading budgets (GiB; None: not set) and copy bandwidths (GB/s, 1e9
    bytes/s: host -> device and disk -> device; the engine measures them at load, defaults
    assume PCIe 4.0 x16 and one NVMe SSD). Mirrors ``EngineConfig``'s
    ``weight_memory_budget_bytes``, ``weight_host_budget_bytes``, ``kv_memory_budget_bytes``,
    ``device_memory_budget_bytes``, ``kv_host_budget_bytes``; ``kv_host_gib`` and ``kv_disk_gib``
    size the pool (see the module docstring).

    Refused (ValueError naming the field): negative or non-finite sizes, bandwidths <= 0,
    ``device_budget_gib`` with ``weight_budget_gib`` or ``kv_budget_gib`` (as the engine),
    ``weight_host_gib`` or ``offline_batch`` without a weight or device budget, ``kv_disk_gib``
    without ``kv_host_gib`` (no host limit: nothing goes to disk) or with ``device_budget_gib``
    (the pool is ``ClusterConfig.kv_blocks``), and a config setting no budget.
    ``offline_batch``: ``EngineConfig.offline_batch``, the instance's ``max_num_seqs`` becomes
    :meth:`OffloadPlan.offline_batch`'s choice."""

    weight_budget_gib: float | None = None
    weight_host_gib: float | None = None
    kv_budget_gib: float | None = None
    kv_host_gib: float | None = None
    kv_disk_gib: float | None = None
    device_budget_gib: float | None = None
    host_gb_s: float = 25.0
    disk_gb_s: float = 3.0
    offline_batch: bool = False

    def __post_init__(self) -> None:
        for name in (
            "weight_budget_gib",
            "weight_host_gib",
            "kv_budget_gib",
            "kv_host_gib",
            "kv_disk_gib",
            "device_budget_gib",
        ):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {v!r}")
        for name in ("host_gb_s", "disk_gb_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if self.device_budget_gib is not None:
            both = [n for n in ("weight_budget_gib", "kv_budget_gib") if getattr(self, n) is not None]
            if both:
                raise ValueError(
                    f"device_budget_gib (weights and KV, split by the cost model) contradicts {', '.join(both)}: "
                    "set one or the other"
                )
            if self.kv_disk_gib is not None:
                raise ValueError(
                    "kv_disk_gib with device_budget_gib: the split places the pool ClusterConfig.kv_blocks "
                    "gives (the layers beyond kv_host_gib go to disk, unbounded); set one or the other"
                )
        if self.kv_disk_gib is not None and self.kv_host_gib is None:
            raise ValueError(
                "kv_disk_gib needs kv_host_gib: without a host budget no offloaded KV layer goes to disk"
            )
        if self.offline_batch and self.weight_budget_gib is None and self.device_budget_gib is None:
            raise ValueError(
                "offline_batch sizes the batch for offloaded weights: set weight_budget_gib (or device_budget_gib)"
            )
        if (
            self.weight_host_gib is not None
            and self.weight_budget_gib is None
            and self.device_budget_gib is None
        ):
            raise ValueError(
                "weight_host_gib needs weight offloading: set weight_budget_gib (or device_budget_gib)"
            )
        if all(
            getattr(self, n) is None
            for n in ("weight_budget_gib", "kv_budget_gib", "kv_host_gib", "device_budget_gib")
        ):
            raise ValueError(
                "SimOffloadConfig sets no budget (weight_budget_gib, kv_budget_gib, kv_host_gib or "
                "device_budget_gib): use offload=None for no offloading"
            )

    @property
    def host_bw(self) -> float:
        return self.host_gb_s * 1e9

    @property
    def disk_bw(self) -> float:
        return self.disk_gb_s * 1e9


def _bytes(gib: float | None) -> int | None:
    return None if gib is None else int(gib * GIB)


def other_share(model: ModelSpec) -> float:
    """The share of a step's compute outside the decoder layers: the LM head's share of the
    parameters (embedding lookups cost no matrix product)."""
    return model.vocab_size * model.hidden / model.num_params


@dataclass(frozen=True)
class OffloadPlan:
    """One instance's placement: the weights' tiers, the KV placement (``kv.offloaded``: layers
    whose KV is off the device, ``kv.disk`` those of them in the disk-backed pool; ``kv.staging``:
    blocks a staging buffer holds), the pool's blocks, and what :meth:`step_s` needs."""

    weights: WeightPlacement
    kv: KVPlacement
    layer_bytes: tuple[int, ...]
    block_size: int
    host_bw: float
    disk_bw: float
    other_share: float

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def offloads(self) -> bool:
        return bool(self.weights.offloaded or self.kv.offloaded)

    @property
    def device_bytes(self) -> int:
        return self.weights.device_bytes + self.kv.device_bytes

    def compute(self, step_s: float) -> tuple[tuple[float, ...], float]:
        """``step_s`` (the latency model's step) as per-layer compute and the rest."""
        n = len(self.layer_bytes)
        other = step_s * self.other_share
        per = (step_s - other) / n
        return (per,) * n, other

    def step_s(self, base_s: float, held_blocks: int, new_tokens: int) -> float:
        """The step's time with this placement: :func:`predict_step_s` of the weights' tiers with
        the compute of :meth:`compute` and, when KV is offloaded, :func:`kv_step_cost` of
        ``held_blocks`` blocks the step uses (:func:`step_blocks`) and ``new_tokens`` new tokens
        (the host-pool layers at ``host_bw``, the disk-backed ones at ``disk_bw``). ``base_s``
        when nothing is offloaded."""
        if not self.offloads:
            return base_s
        comp, other = self.compute(base_s)
        kv = (
            kv_step_cost(self.kv, held_blocks, new_tokens, self.block_size, self.host_bw, self.disk_bw)
            if self.kv.offloaded
            else None
        )
        return predict_step_s(
            self.weights.tiers, self.layer_bytes, comp, self.host_bw, self.disk_bw, other, kv=kv
        )

    def offline_batch(self, max_batch: int, per_seq_step_s: float) -> BatchChoice:
        """``EngineConfig.offline_batch``'s choice for this placement, as ``engine.offload``'s
        ``offline_batch_size`` makes it: :func:`pick_offline_batch_size` with each layer's compute
        proportional to the batch (``per_seq_step_s``: one sequence's share of a decode step, split
        over the layers like :meth:`compute`, no fixed part, nothing outside the layers, as the
        engine prices it), the offloaded layers' bytes, up to ``max_batch``."""
        n = len(self.layer_bytes)
        off = set(self.weights.offloaded)
        lb = [b if i in off else 0 for i, b in enumerate(self.layer_bytes)]
        per = per_seq_step_s * (1 - self.other_share) / n
        return pick_offline_batch_size(
            self.weights.tiers, lb, [0.0] * n, [per] * n, self.host_bw, self.disk_bw, max_batch
        )

    def describe(self) -> str:
        n = len(self.layer_bytes)
        return (
            f"offload: weights {len(self.weights.offloaded)}/{n} layers off the device "
            f"(host {self.weights.host_bytes / GIB:.2f} GiB, disk {self.weights.disk_bytes / GIB:.2f} GiB), "
            f"KV {len(self.kv.offloaded)}/{n} layers off the device (host {self.kv.host_bytes / GIB:.2f} GiB, "
            f"disk {len(self.kv.disk)} layers {self.kv.disk_bytes / GIB:.2f} GiB), "
            f"pool {self.kv.num_blocks} blocks (staging {self.kv.staging}), device {self.device_bytes / GIB:.2f} GiB"
        )


def step_blocks(kv: KVCacheManager, scheduled: Iterable[ScheduledRequest]) -> int:
    """The blocks one step's requests use: what the engine's KV offload copies into an offloaded
    layer's staging buffer (``engine.kv_offload.OffloadedKV._step_ids``: the unique block ids of
    the step's attention metadata). Each scheduled request names its table's blocks from the
    first one in the sliding window up to the block of its last new token; when decodes' tables
    differ in width the shorter ones are padded with block 0, which the engine then copies too.
    Blocks shared by several requests (prefix caching) count once."""
    bs = kv.block_size
    ids: set[int] = set()
    widths: set[int] = set()
    for s in scheduled:
        req = s.request
        end = s.start + s.num_new_tokens
        first = kv.num_skippable_blocks(s.start, req.prefill_only) if kv.sliding_window else 0
        part = kv.block_table(req.request_id)[first : -(-end // bs)]
        ids.update(part)
        if s.start > 0 and (s.num_new_tokens == 1 or s.spec_token_ids):  # decode rows
            widths.add(len(part))
    if len(widths) > 1:
        ids.add(0)
    return len(ids)


def _largest_pool(n: int, bpl: int, dev: int, host: int, disk: int, staging: Callable[[int], int]) -> int:
    """The most blocks a pool of ``n`` layers (``bpl`` bytes a block and layer) can have when
    some count ``k`` of its layers' KV is off the device: the resident layers and ``min(k, 2)``
    staging buffers of ``staging(nb)`` blocks within ``dev`` bytes, ``host // layer`` of the
    offloaded layers in the host pool, the rest within ``disk`` bytes (the constraints of
    :func:`place_kv`, each monotone in the pool's size: a binary search per ``k``). At least the
    pool that fits ``dev`` with nothing offloaded."""
    best = dev // (n * bpl)

    def fits(nb: int, k: int) -> bool:
        lb = nb * bpl
        if kv_device_bytes(n, lb, staging(nb) * bpl, k) > dev:
            return False
        return max(0, k - host // lb) * lb <= disk

    hi = (dev + host + disk) // bpl + 1  # no pool beyond: its layers fit nowhere
    for k in range(1, n + 1):
        lo, top = best, hi  # fits(lo) or lo == best; find the largest nb in [lo, top) that fits
        if not fits(lo + 1, k):
            continue
        lo += 1
        while top - lo > 1:
            mid = (lo + top) // 2
            if fits(mid, k):
                lo = mid
            else:
                top = mid
        best = max(best, lo)
    return best


def plan_offload(
    cfg: SimOffloadConfig,
    model: ModelSpec,
    usable_bytes: float,
    block_size: int,
    kv_blocks: int | None,
    max_num_seqs: int,
    decode_step_s: float,
    max_model_len: int | None = None,
) -> OffloadPlan:
    """The placement of one instance of ``model`` with ``usable_bytes`` of device memory for
    weights and KV (see the module docstring). ``kv_blocks``: the pool's size when given
    (ClusterConfig.kv_blocks). ``decode_step_s``: the latency model's decode step of
    ``max_num_seqs`` requests (the compute :func:`split_device_budget` prices; unused otherwise).
    ``max_num_seqs`` and ``max_model_len`` (the scheduler's; None: the model's; capped by the
    model's, as ``LLMEngine.max_model_len``) bound the KV staging buffers (:func:`staging_bound`).
    ValueError (OffloadPolicyError for the cost model's refusals) naming what does not fit."""
    n = model.num_layers
    fixed = int(model.non_layer_params * model.dtype_bytes)
    lb = int(model.weight_bytes - fixed) // n
    layer_bytes = (lb,) * n
    total = fixed + lb * n
    bpl = block_size * model.kv_bytes_per_token // n  # one block of one layer (K and V)
    share = other_share(model)
    comp = tuple(decode_step_s * (1 - share) / n for _ in range(n))
    # the engine's max_model_len: the configured one capped by the model's positions
    max_len = model.max_model_len if max_model_len is None else min(max_model_len, model.max_model_len)
    host = _bytes(cfg.kv_host_gib)

    def staging(nb: int) -> int:
        return staging_bound(nb, block_size, max_num_seqs, max_len)

    def cost(budget: int) -> OffloadCostModel:
        return OffloadCostModel(
            layer_bytes=layer_bytes,
            compute_s=comp,
            fixed_bytes=fixed,
            device_budget_bytes=budget,
            host_bw=cfg.host_bw,
            disk_bw=cfg.disk_bw,
            other_s=decode_step_s * share,
            host_budget_bytes=_bytes(cfg.weight_host_gib),
        )

    def plan(w: WeightPlacement, kv: KVPlacement) -> OffloadPlan:
        return OffloadPlan(w, kv, layer_bytes, block_size, cfg.host_bw, cfg.disk_bw, share)

    usable = int(usable_bytes)
    if cfg.device_budget_gib is not None:
        budget = _bytes(cfg.device_budget_gib)
        assert budget is not None
        if budget > usable:
            raise ValueError(
                f"device_budget_gib {cfg.device_budget_gib} exceeds the {usable / GIB:.2f} GiB the GPU leaves "
                "for weights and KV"
            )
        if kv_blocks is None:
            raise ValueError("device_budget_gib needs ClusterConfig.kv_blocks: the pool to place")
        # as engine.offload.apply_device_budget: a step using every staged block
        stb = staging(kv_blocks)
        split = split_device_budget(
            cost(budget),
            kv_blocks,
            bpl,
            stb,
            max_num_seqs,
            block_size,
            staging_blocks=stb,
            kv_host_budget_bytes=host,
        )
        return plan(split.weights, split.kv)
    wbudget = _bytes(cfg.weight_budget_gib)
    if wbudget is not None and wbudget > usable:
        raise ValueError(
            f"weight_budget_gib {cfg.weight_budget_gib} exceeds the {usable / GIB:.2f} GiB the GPU leaves for "
            "weights and KV"
        )
    weights = place_weights(cost(total if wbudget is None else wbudget))
    left = usable - weights.device_bytes
    if left <= 0:
        raise ValueError(
            f"{model.name}'s weights on the device ({weights.device_bytes / GIB:.2f} GiB) leave no room for KV in "
            f"{usable / GIB:.2f} GiB: set weight_budget_gib lower"
        )
    kbudget = _bytes(cfg.kv_budget_gib)
    if kbudget is not None and kbudget > left:
        raise ValueError(
            f"kv_budget_gib {cfg.kv_budget_gib} exceeds the {left / GIB:.2f} GiB the GPU leaves after the "
            f"weights ({weights.device_bytes / GIB:.2f} GiB on the device)"
        )
    dev = left if kbudget is None else kbudget
    disk = _bytes(cfg.kv_disk_gib)
    if kv_blocks is not None:
        if disk is not None:
            raise ValueError(
                "kv_disk_gib sizes the KV pool, ClusterConfig.kv_blocks sets it: set one or the other"
            )
        if host is not None and kbudget is None:
            raise ValueError(
                "kv_host_gib with ClusterConfig.kv_blocks needs kv_budget_gib: without a KV device budget "
                "the pool is not offloaded"
            )
        nb = kv_blocks
        if kbudget is None:  # the override sizes the pool regardless of memory, as without offloading
            dev = max(dev, nb * n * bpl)
    elif host is not None:  # the largest pool whose placement fits the device, host and disk budgets
        nb = _largest_pool(n, bpl, dev, host, disk or 0, staging)
    else:
        nb = dev // (n * bpl)
    if nb < 1:
        raise ValueError(f"no room for one KV block ({n * bpl} bytes) in a KV device budget of {dev} bytes")
    kv = (
        place_kv(n, nb, bpl, dev, staging(nb), host)
        if nb * n * bpl > dev
        else kv_placement(n, nb, bpl, (), staging(nb))
    )
    if kv_blocks is None and host is not None:  # pragma: no cover - the sizing above keeps both
        if kv.host_bytes > host:
            raise OffloadPolicyError(
                f"KV host pool {kv.host_bytes} bytes exceeds kv_host_gib {cfg.kv_host_gib}"
            )
        if kv.disk_bytes > (disk or 0):
            raise OffloadPolicyError(
                f"KV disk pool {kv.disk_bytes} bytes exceeds kv_disk_gib {cfg.kv_disk_gib}"
            )
    return plan(weights, kv)


__all__ = [
    "GIB",
    "OffloadPlan",
    "SimOffloadConfig",
    "WeightTier",
    "other_share",
    "plan_offload",
    "staging_bound",
    "step_blocks",
]
