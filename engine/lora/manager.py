"""The engine's LoRA adapters: registry, host tier, device slots and the per-step batch context.

Tiers (S-LoRA): disk (the PEFT folder) -> host memory (:class:`~engine.lora.peft_format.HostAdapter`,
float32, at most ``max_cpu_loras``, LRU) -> engine slots (``max_loras`` fixed slots inside every
wrapped projection, LRU over unpinned slots: :mod:`engine.lora.slots`). An adapter missing from
host memory is read from disk on a background thread; requests that need it wait (they are not
scheduled) while the batch keeps running; the host -> slot copy is a few small tensor copies.

Module surgery and slot writes are :class:`~engine.lora.shard.LoRAShard`'s (the model code is
unchanged). Before each forward the engine calls :meth:`LoRAManager.begin_step` with the step's
scheduled requests; the shard's pre-forward hook checks that the forward it sees is that batch.
Under tensor parallelism this manager lives on rank 0 only; the runner mirrors its slot writes
(:attr:`LoRAManager.on_slot_write`) and each step's slot list to the followers' shards.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.lora.config import AdapterSpec, LoRAConfig
from engine.lora.peft_format import AdapterError, HostAdapter, load_adapter
from engine.lora.shard import AdapterWeights, LoRAShard
from engine.lora.slots import FullPeriods, SlotTable
from engine.lora.targets import TargetMap, target_map, whole_map
from engine.scheduler import ScheduledRequest
from pdserve.errors import ModelNotFoundError


def forward_order(scheduled: Sequence[ScheduledRequest]) -> list[ScheduledRequest]:
    """The order the model runner flattens a step's requests in: decodes first, then prefill
    chunks (engine.model_runner.ModelRunner.execute; checked per forward by the model hook)."""
    return sorted(scheduled, key=lambda s: 0 if (s.num_new_tokens == 1 and s.start > 0) else 1)


@dataclass
class AdapterCounters:
    """Cumulative counts of one adapter (per-adapter metrics)."""

    prefill_tokens: int = 0  # prompt tokens computed with the adapter
    decode_tokens: int = 0  # tokens decoded with the adapter
    slot_loads: int = 0  # host -> engine slot copies
    disk_loads: int = 0  # disk -> host reads (registration included)


@dataclass
class LoRAStats:
    slot_loads: int = 0  # host -> slot copies
    slot_evictions: int = 0
    disk_loads: int = 0  # disk -> host reads (registration included)
    host_evictions: int = 0
    by_adapter: dict[str, AdapterCounters] = field(default_factory=dict)
    slot_load_s: float = 0.0  # running mean of a host -> slot copy (0: none measured yet)
    disk_load_s: float = 0.0  # running mean of a disk -> host read (0: none measured yet)

    def observe_slot_load(self, seconds: float) -> None:
        self.slot_load_s = _mean(self.slot_load_s, seconds)

    def observe_disk_load(self, seconds: float) -> None:
        self.disk_load_s = _mean(self.disk_load_s, seconds)

    def of(self, name: str) -> AdapterCounters:
        """The counters of adapter ``name`` (created at zero; every registered adapter's are
        created when it is registered, so the engine and loader threads never both create one)."""
        c = self.by_adapter.get(name)
        if c is None:
            c = self.by_adapter[name] = AdapterCounters()
        return c


LOAD_TIME_WEIGHT = 0.25  # weight of the newest measurement in the running means of load times


def _mean(old: float, new: float) -> float:
    """Exponentially weighted running mean (the first measurement taken as is)."""
    return new if old <= 0.0 else (1 - LOAD_TIME_WEIGHT) * old + LOAD_TIME_WEIGHT * new


class LoRAManager:
    def __init__(
        self,
        model: nn.Module,
        model_type: str,
        config: LoRAConfig,
        dtype: torch.dtype,
        device: torch.device,
        tp_size: int = 1,
    ) -> None:
        """Validate and load ``config.adapters`` into host memory, then wrap the model's
        projections with ``config.max_loras`` slots. Raises AdapterError / ModelNotFoundError
        (naming the adapter and the field) for any adapter that cannot be served.

        ``tp_size`` > 1: ``model`` is rank 0's shard of a tensor-parallel engine; adapters are
        checked against the whole model's shapes and this shard keeps rank 0's part of each
        (the runner mirrors every slot write to the followers through :attr:`on_slot_write`)."""
        self.config = config
        self.dtype = dtype
        self.device = device
        self.targets: TargetMap = target_map(model, model_type)  # this shard's (local) targets
        self.whole_targets: TargetMap = whole_map(self.targets, tp_size)  # what adapters are checked against
        self.model_type = model_type
        self.stats = LoRAStats()
        self._paths: dict[str, Path] = {}
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._lock = threading.Lock()  # guards _host and _loading (the loader thread writes them)
        self._loading: dict[str, Future] = {}
        self._failed: dict[str, BaseException] = {}
        # called with (slot, the adapter's whole weights) after each slot write (engine thread)
        self.on_slot_write: Callable[[int, AdapterWeights], None] | None = None
        t0 = time.perf_counter()
        loaded = [load_adapter(a.name, a.path, self.whole_targets) for a in config.adapters]
        self.stats.disk_loads += len(loaded)
        if loaded:
            self.stats.observe_disk_load((time.perf_counter() - t0) / len(loaded))
        self.rank = config.max_lora_rank or max(a.config.max_rank for a in loaded)
        for a in loaded:
            self._check_rank(a)
        self.slots = SlotTable(config.max_loras)
        # how long a full slot table stays full (monotonic clock): the router prices the wait for
        # a slot with it (the heartbeat's adapter_slot_free_s; router.policy.adapter_cost)
        self.full = FullPeriods()
        self.shard = LoRAShard(model, self.targets, config.max_loras, self.rank, dtype, device, 0, tp_size)
        self.ctx = self.shard.ctx
        self.modules = self.shard.modules
        for spec, a in zip(config.adapters, loaded, strict=True):
            self._paths[spec.name] = Path(spec.path)
            self._host[spec.name] = a
            self.stats.of(spec.name).disk_loads += 1
        self._evict_host()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")

    # ------------------------------------------------------------------ registry
    def _check_rank(self, a: HostAdapter) -> None:
        if a.config.max_rank > self.rank:
            raise AdapterError(
                f"LoRA adapter {a.name!r}: field 'r'/'rank_pattern' = {a.config.max_rank} is larger than this "
                f"engine's max_lora_rank {self.rank} (raise --max-lora-rank)"
            )

    def register(self, spec: AdapterSpec) -> None:
        """Add an adapter at run time (validated and read into host memory now). Safe to call
        from a thread other than the engine's (a worker's admin RPC does, so running requests
        do not wait for the read): the adapter becomes visible to :meth:`check` and
        :meth:`acquire` only once it is complete. AdapterError for a bad adapter, a rank above
        the slots' ``max_lora_rank``, or a name already registered."""
        if spec.name in self._paths:
            raise AdapterError(f"LoRA adapter {spec.name!r} is already registered")
        t0 = time.perf_counter()
        a = load_adapter(spec.name, spec.path, self.whole_targets)
        self._check_rank(a)
        with self._lock:
            self.stats.observe_disk_load(time.perf_counter() - t0)
            if spec.name in self._paths:
                raise AdapterError(f"LoRA adapter {spec.name!r} is already registered")
            self.stats.disk_loads += 1
            self.stats.of(spec.name).disk_loads += 1
            self._paths[spec.name] = Path(spec.path)
            self._host[spec.name] = a
        self._evict_host()

    def names(self) -> list[str]:
        return sorted(self._paths)

    def has(self, name: str) -> bool:
        return name in self._paths

    def path_of(self, name: str) -> Path | None:
        """The folder adapter ``name`` was registered from (None: not registered)."""
        return self._paths.get(name)

    def check(self, name: str) -> None:
        """Raise ModelNotFoundError unless ``name`` is a registered adapter."""
        if name not in self._paths:
            served = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(f"LoRA adapter {name!r} is not served by this engine (served: {served})")

    def host_resident(self) -> list[str]:
        with self._lock:
            return list(self._host)

    def slot_resident(self) -> list[str]:
        return self.slots.resident()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ host tier
    def _evict_host(self) -> None:
        cap = self.config.max_cpu_loras
        with self._lock:
            while cap is not None and len(self._host) > cap:
                self._host.popitem(last=False)
                self.stats.host_evictions += 1

    def _load_from_disk(self, name: str) -> None:
        t0 = time.perf_counter()
        try:
            a = load_adapter(name, self._paths[name], self.whole_targets)
            self._check_rank(a)
        except BaseException as e:  # noqa: BLE001 - reported to the waiting requests
            with self._lock:
                self._failed[name] = e
                self._loading.pop(name, None)
            return
        with self._lock:
            self._host[name] = a
            self._host.move_to_end(name)
            self._loading.pop(name, None)
            self.stats.disk_loads += 1
            self.stats.of(name).disk_loads += 1
            self.stats.observe_disk_load(time.perf_counter() - t0)
        self._evict_host()

    def _host_copy(self, name: str) -> HostAdapter | None:
        """The host copy, or None after starting (or while waiting for) its background read.
        Raises the read's error (the adapter changed on disk since registration)."""
        with self._lock:
            if name in self._failed:
                raise self._failed.pop(name)
            a = self._host.get(name)
            if a is not None:
                self._host.move_to_end(name)
                return a
            if name not in self._loading:
                self._loading[name] = self._pool.submit(self._load_from_disk, name)
            return None

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block up to ``timeout_s`` for a background disk read (an idle engine's step)."""
        with self._lock:
            futs = list(self._loading.values())
        if futs:
            _wait(futs[0], timeout_s)

    # ------------------------------------------------------------------ slots
    def ready(self, name: str) -> bool:
        """Whether :meth:`acquire` would succeed now (starts reading the adapter from disk when
        it is not in host memory)."""
        if self.slots.slot_of(name) is not None:
            return True
        return self.slots.can_acquire(name) and self._host_copy(name) is not None

    def acquire(self, name: str) -> bool:
        """Pin ``name`` in an engine slot for one request (writing it there if needed); False when
        it cannot run now (every slot pinned, or its host copy is being read): try again later."""
        self.check(name)
        if not self.slots.can_acquire(name):
            return False
        if self.slots.slot_of(name) is None:
            a = self._host_copy(name)
            if a is None:
                return False
        else:
            a = None
        got = self.slots.acquire(name)
        assert got is not None
        if got.load:
            assert a is not None
            t0 = time.perf_counter()
            try:
                self._write_slot(got.slot, a)
            except BaseException:
                self.slots.undo_place(name)
                raise
            self.stats.slot_loads += 1
            self.stats.of(name).slot_loads += 1
            self.stats.observe_slot_load(time.perf_counter() - t0)
            if got.evicted is not None:
                self.stats.slot_evictions += 1
        self.full.acquired(self.slots, time.monotonic())  # (after the write: undo_place unpins)
        return True

    def release(self, name: str) -> None:
        self.slots.release(name)
        self.full.released(self.slots, time.monotonic())

    def reads_queued(self) -> int:
        """Disk reads under way or queued on the loader thread (one at a time)."""
        with self._lock:
            return len(self._loading)

    def _write_slot(self, slot: int, a: HostAdapter) -> None:
        self.shard.write_slot(slot, a.weights)
        if self.on_slot_write is not None:
            self.on_slot_write(slot, a.weights)

    # ------------------------------------------------------------------ per step
    def begin_step(self, scheduled: Sequence[ScheduledRequest]) -> None:
        """Set the batch context for the step's forward: each token's slot (-1 = base model).
        Every adapter named must be pinned (acquired) already."""
        slot_per_token: list[int] = []
        ids: list[int] = []
        for s in forward_order(scheduled):
            req = s.request
            slot = -1
            if req.adapter_id:
                found = self.slots.slot_of(req.adapter_id)
                if found is None or self.slots.pins(req.adapter_id) == 0:
                    raise RuntimeError(f"request {req.request_id}: adapter {req.adapter_id!r} is not pinned")
                slot = found
                c = self.stats.of(req.adapter_id)
                prefill = max(0, min(s.start + s.num_new_tokens, len(req.prompt_token_ids)) - s.start)
                c.prefill_tokens += prefill
                c.decode_tokens += s.num_new_tokens - prefill
            slot_per_token.extend([slot] * s.num_new_tokens)
            ids.extend(req.token_slice(s.start, s.start + s.num_new_tokens))
        self.shard.begin(slot_per_token, ids)

    def end_step(self) -> None:
        self.shard.end()


def _wait(fut: Future, timeout_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        fut.exception(timeout=timeout_s)
