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
* **KV** (``kv_budget_gib``, ``kv_host_gib``): the KV pool's device budget is ``kv_budget_gib``
  (default: what the weights leave). Without ``kv_host_gib`` the pool is what fits the budget;
  with it the pool is the largest whose :func:`place_kv` placement fits the device budget and
  puts at most ``kv_host_gib`` in the host pool (more layers' KV off the device, more blocks).
  ``ClusterConfig.kv_blocks`` (an override) sets the pool instead; its KV is then offloaded only
  when ``kv_budget_gib`` is set (the override ignores memory, as without offloading).
* **Both** (``device_budget_gib``): :func:`split_device_budget` over a pool of
  ``ClusterConfig.kv_blocks`` blocks (required: the engine's pool is given too), priced as the
  engine prices it (a step holding the whole pool and decoding ``max_num_seqs`` tokens, compute
  from the latency model's decode step of ``max_num_seqs`` requests).

Step time: the latency model's step time ``t`` of the batch is split into the decoder layers'
compute (``t * (1 - other_share) / num_layers`` each) and the rest (``t * other_share``, the
LM head's share of the parameters); the step then takes :func:`predict_step_s` of the placement
with that compute, the KV term :func:`kv_step_cost` of the blocks the KV manager holds at the
step and the step's new tokens, at ``host_gb_s`` / ``disk_gb_s``. Nothing offloaded: ``t``.
Every layer of a model is taken as the same size (the simulator's shapes are per model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.offload_policy import (
    BatchChoice,
    KVPlacement,
    OffloadCostModel,
    OffloadPolicyError,
    WeightPlacement,
    WeightTier,
    kv_placement,
    kv_step_cost,
    pick_offline_batch_size,
    place_kv,
    place_weights,
    predict_step_s,
    split_device_budget,
)
from simulator.models import ModelSpec

GIB = 2**30


@dataclass(frozen=True)
class SimOffloadConfig:
    """Per-instance offloading budgets (GiB; None: not set) and copy bandwidths (GB/s, 1e9
    bytes/s: host -> device and disk -> device; the engine measures them at load, defaults
    assume PCIe 4.0 x16 and one NVMe SSD). Mirrors ``EngineConfig``'s
    ``weight_memory_budget_bytes``, ``weight_host_budget_bytes``, ``kv_memory_budget_bytes``,
    ``device_memory_budget_bytes``; ``kv_host_gib`` sizes the pool (see the module docstring).

    Refused (ValueError naming the field): negative or non-finite sizes, bandwidths <= 0,
    ``device_budget_gib`` with ``weight_budget_gib`` or ``kv_budget_gib`` (as the engine),
    ``weight_host_gib`` or ``offline_batch`` without a weight or device budget, and a config
    setting no budget. ``offline_batch``: ``EngineConfig.offline_batch``, the instance's
    ``max_num_seqs`` becomes :meth:`OffloadPlan.offline_batch`'s choice."""

    weight_budget_gib: float | None = None
    weight_host_gib: float | None = None
    kv_budget_gib: float | None = None
    kv_host_gib: float | None = None
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
            if self.kv_host_gib is not None:
                raise ValueError(
                    "kv_host_gib with device_budget_gib: the split places the pool ClusterConfig.kv_blocks "
                    "gives; set one or the other"
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
    whose KV is in the host pool), the pool's blocks, and what :meth:`step_s` needs."""

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
        ``held_blocks`` held blocks and ``new_tokens`` new tokens. ``base_s`` when nothing is
        offloaded."""
        if not self.offloads:
            return base_s
        comp, other = self.compute(base_s)
        kv = (
            kv_step_cost(self.kv, held_blocks, new_tokens, self.block_size, self.host_bw)
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
            f"KV {len(self.kv.offloaded)}/{n} layers in the host pool ({self.kv.host_bytes / GIB:.2f} GiB), "
            f"pool {self.kv.num_blocks} blocks, device {self.device_bytes / GIB:.2f} GiB"
        )


def plan_offload(
    cfg: SimOffloadConfig,
    model: ModelSpec,
    usable_bytes: float,
    block_size: int,
    kv_blocks: int | None,
    max_num_seqs: int,
    decode_step_s: float,
) -> OffloadPlan:
    """The placement of one instance of ``model`` with ``usable_bytes`` of device memory for
    weights and KV (see the module docstring). ``kv_blocks``: the pool's size when given
    (ClusterConfig.kv_blocks). ``decode_step_s``: the latency model's decode step of
    ``max_num_seqs`` requests (the compute :func:`split_device_budget` prices; unused otherwise).
    ValueError (OffloadPolicyError for the cost model's refusals) naming what does not fit."""
    n = model.num_layers
    fixed = int(model.non_layer_params * model.dtype_bytes)
    lb = int(model.weight_bytes - fixed) // n
    layer_bytes = (lb,) * n
    total = fixed + lb * n
    bpl = block_size * model.kv_bytes_per_token // n  # one block of one layer (K and V)
    share = other_share(model)
    comp = tuple(decode_step_s * (1 - share) / n for _ in range(n))

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
        split = split_device_budget(cost(budget), kv_blocks, bpl, kv_blocks, max_num_seqs, block_size)
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
    host = _bytes(cfg.kv_host_gib)
    if kv_blocks is not None:
        if host is not None:
            raise ValueError(
                "kv_host_gib sizes the KV pool, ClusterConfig.kv_blocks sets it: set one or the other"
            )
        nb = kv_blocks
        if kbudget is None:  # the override sizes the pool regardless of memory, as without offloading
            dev = max(dev, nb * n * bpl)
    elif host:
        # the largest pool whose placement (k layers' KV off, two staging buffers) fits both
        nb = dev // (n * bpl)
        for k in range(3, n + 1):
            nb = max(nb, min(dev // ((n - k + 2) * bpl), host // (k * bpl)))
    else:
        nb = dev // (n * bpl)
    if nb < 1:
        raise ValueError(f"no room for one KV block ({n * bpl} bytes) in a KV device budget of {dev} bytes")
    kv = place_kv(n, nb, bpl, dev) if nb * n * bpl > dev else kv_placement(n, nb, bpl, ())
    if host is not None and kv.host_bytes > host:  # pragma: no cover - the sizing above keeps it
        raise OffloadPolicyError(f"KV host pool {kv.host_bytes} bytes exceeds kv_host_gib {cfg.kv_host_gib}")
    return plan(weights, kv)


__all__ = ["GIB", "OffloadPlan", "SimOffloadConfig", "WeightTier", "other_share", "plan_offload"]
