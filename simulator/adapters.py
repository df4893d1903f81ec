"""LoRA adapters in the simulator (issue #16): the catalogue, their load times, each instance's
slot and host tiers, the step-time cost of LoRA in a batch, and a workload's adapter mix.

The model follows the engine (``engine.lora.manager`` / ``engine.lora.slots``):

* every instance serves every adapter of the catalogue (``pdserve up``'s ``lora`` section); all
  are read into host memory at start, keeping the ``max_cpu_loras`` read last (the engine's
  registration order), and no engine slot is filled yet;
* a request pins its adapter's engine slot from admission until it stops running (finished, or
  prefilled on a prefill instance); a pinned slot is never evicted. :meth:`AdapterResidency.acquire`
  reuses the adapter's slot, else takes an empty one, else evicts the least recently used
  unpinned one (the engine's own :class:`engine.lora.slots.SlotTable`); when every slot is pinned
  the request waits outside the scheduler (arrival order) while the batch keeps running;
* a slot load copies the adapter from host memory (``bytes / host_to_device_gb_s``); the copy is
  synchronous on the engine thread, so it lengthens the instance's next step;
* an adapter missing from host memory is first read from disk (``bytes / disk_gb_s``) in the
  background: the request waits for the read, the batch does not; reads run one at a time (the
  engine's one loader thread); the read puts it in host memory (LRU, at most ``max_cpu_loras``);
* a step's forward costs ``1 + step_cost_per_adapter * distinct adapters + step_cost_lora_tokens
  * LoRA share of the step's tokens`` times the base model's (:meth:`AdapterConfig.step_factor`).
  Defaults calibrated on ``bench/lora_step.py`` (SmolLM2-135M, rank 16 on all 7 projections, one
  CPU thread, batch 32): one adapter 1.03x the base model, 8 adapters mixed 1.18x one adapter.

Not modelled: adapters served by only some instances, per-module ranks, live migration of LoRA
requests (refused by :class:`simulator.config.ClusterConfig`), and tensor parallelism splitting
an adapter's copy (the whole adapter is copied at the given bandwidth).
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np

from engine.lora.slots import FullPeriods, SlotTable
from router.policy.adapter_cost import AdapterTiers, adapter_ready_s
from simulator.models import MODELS, ModelSpec
from simulator.workload import Workload

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
"""Projections an adapter may target (PEFT's q/k/v/o_proj, gate/up/down_proj)."""

# bench/lora_step.py, decode batch 32: 1 adapter / base 1.029x, 8 adapters / 1 adapter 1.182x
# => 8 adapters / base 1.216x. Solving 1 + a + t = 1.029 and 1 + 8a + t = 1.216:
CALIBRATED_PER_ADAPTER = 0.027
CALIBRATED_LORA_TOKENS = 0.002


class AdapterPopularity(enum.Enum):
    """How a workload's requests pick adapters: all equally likely, or Zipf (adapter ``i`` of the
    catalogue with weight ``1 / (i + 1) ** zipf_s``: a few hot adapters, a long cold tail)."""

    UNIFORM = "uniform"
    ZIPF = "zipf"


@dataclass(frozen=True)
class AdapterConfig:
    """The cluster's LoRA adapters and what serving them costs (``ClusterConfig.adapters``).

    ``num_adapters`` adapters named ``lora-0`` .. ``lora-{n-1}``; adapter ``i`` has rank
    ``ranks[i % len(ranks)]`` and targets ``targets`` in every layer. ``bytes_per_rank``: one
    rank's bytes over all targets and layers (None: from the model's shape, Llama-style; needed
    for a model the simulator has no shape of, e.g. a profile's). ``max_loras``: engine slots per
    instance; ``max_cpu_loras``: adapters kept in host memory per instance (None: all).
    """

    num_adapters: int = 8
    ranks: tuple[int, ...] = (16,)
    targets: tuple[str, ...] = LORA_TARGETS
    max_loras: int = 8
    max_cpu_loras: int | None = None
    host_to_device_gb_s: float = 25.0  # slot copy (assumed: PCIe 4.0 x16, as swap_gb_s)
    disk_gb_s: float = 3.0  # disk -> host read (assumed: one NVMe SSD, as CacheConfig.disk_gb_s)
    bytes_per_rank: int | None = None
    step_cost_per_adapter: float = CALIBRATED_PER_ADAPTER
    step_cost_lora_tokens: float = CALIBRATED_LORA_TOKENS

    def __post_init__(self) -> None:
        if self.num_adapters < 1:
            raise ValueError(f"adapters: num_adapters must be >= 1, got {self.num_adapters}")
        if not self.ranks or any(r < 1 for r in self.ranks):
            raise ValueError(f"adapters: every rank must be >= 1, got ranks={self.ranks}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(
                f"adapters: targets must be distinct names among {', '.join(LORA_TARGETS)}; got {self.targets}"
            )
        if self.max_loras < 1:
            raise ValueError(f"adapters: max_loras must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError(f"adapters: max_cpu_loras must be >= 1 (or None: all), got {self.max_cpu_loras}")
        for name in ("host_to_device_gb_s", "disk_gb_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"adapters: {name} must be > 0, got {v}")
        if self.bytes_per_rank is not None and self.bytes_per_rank < 1:
            raise ValueError(f"adapters: bytes_per_rank must be >= 1, got {self.bytes_per_rank}")
        for name in ("step_cost_per_adapter", "step_cost_lora_tokens"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"adapters: {name} must be >= 0, got {v}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(adapter_name(i) for i in range(self.num_adapters))

    def rank_of(self, name: str) -> int:
        return self.ranks[adapter_index(name, self.num_adapters) % len(self.ranks)]

    def step_factor(self, distinct: int, lora_tokens: int, tokens: int) -> float:
        """The step-time multiplier of a batch with ``distinct`` adapters and ``lora_tokens`` of
        its ``tokens`` computed with one (1.0 for a base-model batch)."""
        if not distinct:
            return 1.0
        return 1.0 + self.step_cost_per_adapter * distinct + self.step_cost_lora_tokens * lora_tokens / tokens


def adapter_name(i: int) -> str:
    return f"lora-{i}"


def adapter_index(name: str, num_adapters: int) -> int:
    """The catalogue index of ``name``; ValueError naming it when the cluster does not serve it."""
    prefix, _, num = name.partition("-")
    if prefix == "lora" and num.isdigit() and str(int(num)) == num and int(num) < num_adapters:
        return int(num)
    raise ValueError(
        f"LoRA adapter {name!r} is not served by the simulated cluster (it serves lora-0 .. lora-{num_adapters - 1})"
    )


def bytes_per_rank(model: ModelSpec, targets: tuple[str, ...]) -> int:
    """One rank of an adapter over ``targets`` in every layer: ``(in + out) * dtype_bytes`` per
    projection (A is rank x in, B is out x rank), Llama shapes (OPT: no gate projection)."""
    h, q = model.hidden, model.num_heads * model.head_dim
    kv = model.num_kv_heads * model.head_dim
    f = model.ffn_hidden
    dims = {
        "q": (h, q),
        "k": (h, kv),
        "v": (h, kv),
        "o": (q, h),
        "gate": (h, f),
        "up": (h, f),
        "down": (f, h),
    }
    if "gate" in targets and model.name.startswith("opt-"):
        raise ValueError(
            f"adapters: target 'gate': {model.name} has no gate projection (OPT's MLP is fc1/fc2)"
        )
    per_layer = sum(sum(dims[t]) for t in targets)
    return per_layer * model.num_layers * model.dtype_bytes


def resolve_bytes_per_rank(cfg: AdapterConfig, model: str) -> int:
    """``cfg.bytes_per_rank``, else from ``model``'s shape; ValueError naming the model when unknown."""
    if cfg.bytes_per_rank is not None:
        return cfg.bytes_per_rank
    spec = MODELS.get(model.lower())
    if spec is None:
        raise ValueError(
            f"adapters: the simulator has no shape for model {model!r} to size its adapters; "
            "give AdapterConfig.bytes_per_rank (--adapter-bytes-per-rank)"
        )
    return bytes_per_rank(spec, cfg.targets)


class Pin(enum.Enum):
    """What :meth:`AdapterResidency.acquire` did."""

    PINNED = "pinned"  # pinned in a slot (loaded there now if it was not)
    READING = "reading"  # not in host memory: its disk read is under way; try again when it ends
    NO_SLOT = "no_slot"  # every slot is pinned by running requests; try again when one is released


@dataclass
class AdapterStats:
    slot_loads: int = 0  # host -> slot copies
    slot_evictions: int = 0
    disk_loads: int = 0  # disk -> host reads
    host_evictions: int = 0
    copy_s: float = 0.0  # step time spent on slot copies
    wait_s: float = 0.0  # request-seconds spent waiting for a slot or a disk read


class AdapterResidency:
    """One instance's adapter tiers: engine slots (LRU over unpinned ones, pins) and host memory
    (LRU), with disk reads in flight. Pure bookkeeping on a given clock: the caller schedules the
    end of each read (:meth:`read_done`) and charges slot copies to its steps."""

    def __init__(self, cfg: AdapterConfig, model: str) -> None:
        self.cfg = cfg
        self._per_rank = resolve_bytes_per_rank(cfg, model)
        self.slots = SlotTable(cfg.max_loras)
        names = cfg.names
        keep = names if cfg.max_cpu_loras is None else names[max(0, len(names) - cfg.max_cpu_loras) :]
        self.host: OrderedDict[str, None] = OrderedDict.fromkeys(keep)
        self.reading: dict[str, float] = {}  # adapter -> when its disk read ends
        self._disk_free_at = 0.0  # one loader thread (the engine's): reads run one after another
        self.stats = AdapterStats()
        # the mean time a full slot table (every slot pinned) stays full, measured as a worker's
        # engine does (``LoRAManager``; its load report gives the router ``AdapterTiers.slot_free_s``)
        self.full = FullPeriods()

    def nbytes(self, name: str) -> int:
        return self.cfg.rank_of(name) * self._per_rank

    def slot_s(self, name: str) -> float:
        """Seconds to copy ``name`` from host memory into a slot."""
        return self.nbytes(name) / (self.cfg.host_to_device_gb_s * 1e9)

    def disk_s(self, name: str) -> float:
        """Seconds to read ``name`` from disk into host memory."""
        return self.nbytes(name) / (self.cfg.disk_gb_s * 1e9)

    def in_slot(self, name: str) -> bool:
        return self.slots.slot_of(name) is not None

    def load_s(self, name: str, now: float) -> float:
        """The load alone: 0 in a slot, the copy from host memory, else the rest of a read under
        way (or a whole read) + the copy (no queued reads, no slot wait: :meth:`ready_s`)."""
        if not name or self.in_slot(name):
            return 0.0
        if name in self.host:
            return self.slot_s(name)
        end = self.reading.get(name)
        read = self.disk_s(name) if end is None else max(0.0, end - now)
        return read + self.slot_s(name)

    @property
    def slot_free_s(self) -> float:
        """Measured mean time a full slot table stays full (0: none seen yet)."""
        return self.full.mean_s

    def pinned_slots(self) -> int:
        """Slots pinned by running requests now."""
        return self.slots.num_pinned()

    def tiers(self, name: str, now: float, slot_waiters: int = 0) -> AdapterTiers:
        """What this instance's worker reports about its adapter tiers (its heartbeat), with the
        load times of ``name`` (the simulator knows each adapter's size; a worker reports means).
        ``slot_waiters``: requests waiting here for a slot or a read."""
        return AdapterTiers(
            in_slot=frozenset(self.slots.resident()),
            in_host=frozenset(self.host),
            slot_load_s=self.slot_s(name),
            disk_load_s=self.disk_s(name),
            slots=self.slots.num_slots,
            slots_pinned=self.pinned_slots(),
            slot_waiters=slot_waiters,
            slot_free_s=self.slot_free_s,
            reads_queued=len(self.reading),
        )

    def ready_s(self, name: str, now: float, slot_waiters: int = 0) -> float:
        """What the router's policy prices for ``name`` here
        (``router.policy.adapter_cost.adapter_ready_s`` of :meth:`tiers`): the load, the reads
        queued ahead of its read, and the wait for a slot when every slot is pinned."""
        if not name or self.in_slot(name):
            return 0.0
        end = self.reading.get(name)
        left = None if end is None else max(0.0, end - now)
        return adapter_ready_s(name, self.tiers(name, now, slot_waiters), left)

    def acquire(self, name: str, now: float) -> tuple[Pin, float]:
        """Pin ``name`` for one request, as ``LoRAManager.acquire``: ``(PINNED, copy seconds)``
        (0 when it was in a slot), ``(READING, read end)`` when its host copy is being read
        (a read starts now if none is under way), ``(NO_SLOT, 0)`` when every slot is pinned."""
        slots = self.slots
        if not slots.can_acquire(name):
            return Pin.NO_SLOT, 0.0
        if slots.slot_of(name) is None:
            if name not in self.host:
                end = self.reading.get(name)
                if end is None:
                    end = max(now, self._disk_free_at) + self.disk_s(name)
                    self.reading[name] = self._disk_free_at = end
                    self.stats.disk_loads += 1
                return Pin.READING, end
            self.host.move_to_end(name)
        got = slots.acquire(name)
        assert got is not None
        self.full.acquired(slots, now)
        if not got.load:
            return Pin.PINNED, 0.0
        self.stats.slot_loads += 1
        if got.evicted is not None:
            self.stats.slot_evictions += 1
        copy = self.slot_s(name)
        self.stats.copy_s += copy
        return Pin.PINNED, copy

    def read_done(self, name: str) -> None:
        """``name``'s disk read ended: it is in host memory (most recent), the oldest beyond
        ``max_cpu_loras`` dropped."""
        self.reading.pop(name, None)
        self.host[name] = None
        self.host.move_to_end(name)
        cap = self.cfg.max_cpu_loras
        while cap is not None and len(self.host) > cap:
            self.host.popitem(last=False)
            self.stats.host_evictions += 1

    def release(self, name: str, now: float | None = None) -> None:
        """Unpin one request's slot of ``name``; at ``now`` (None: not timed) the end of a full
        period when that frees a slot of a full table (:attr:`slot_free_s`)."""
        self.slots.release(name)
        self.full.released(self.slots, now)


# ----------------------------------------------------------------------------- workloads
def with_adapters(
    workload: Workload,
    num_adapters: int,
    popularity: AdapterPopularity = AdapterPopularity.ZIPF,
    *,
    zipf_s: float = 1.0,
    base_share: float = 0.0,
    seed: int = 0,
) -> Workload:
    """``workload`` with each request naming an adapter of ``lora-0`` .. ``lora-{n-1}`` drawn by
    ``popularity`` (independently per request, seeded), or the base model with probability
    ``base_share``."""
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    if not (0.0 <= base_share < 1.0):
        raise ValueError(f"base_share must be in [0, 1), got {base_share}")
    if popularity is AdapterPopularity.ZIPF:
        if not (zipf_s > 0 and math.isfinite(zipf_s)):
            raise ValueError(f"zipf_s must be > 0, got {zipf_s}")
        w = 1.0 / np.arange(1, num_adapters + 1, dtype=float) ** zipf_s
    else:
        w = np.ones(num_adapters)
    rng = np.random.default_rng(seed)
    n = len(workload.requests)
    picks = rng.choice(num_adapters, size=n, p=w / w.sum())
    base = rng.random(n) < base_share
    reqs = tuple(
        replace(r, adapter="" if b else adapter_name(int(k)))
        for r, k, b in zip(workload.requests, picks, base, strict=True)
    )
    return Workload(workload.name, reqs)
