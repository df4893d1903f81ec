"""Weight offloading (FlexGen), the I/O side: keeps offloaded decoder layers in a host buffer or a
disk file and copies each into a device slot before it runs, the next one in the background while
the current one computes. The placement and the timing model are :mod:`engine.offload_policy`.

* Host tier: one pre-allocated buffer (pinned on CUDA) holding every host layer's bytes.
* Disk tier: one scratch file in ``offload_dir`` holding every disk layer's bytes at aligned
  offsets, written once at start-up and unlinked at once (it disappears with the process);
  a copy is one ``preadv`` per layer (into the slot on CPU, into a pinned staging buffer then an
  asynchronous copy on CUDA).
* Device: two slots (``uint8`` buffers of the largest offloaded layer); the offloaded layer ``k``
  (in model order) always uses slot ``k % 2``: its parameters and buffers are *views* of that slot,
  rebound once here, so the model's code is unchanged and reads the bytes a resident model would
  (outputs are bit-identical). Forward pre-hooks on the offloaded layers wait for the layer's copy
  and start the next one (a forward hook when the next needs the slot still in use).

On CPU the "device" is the engine's resident working set: the same code path and accounting
(``device_bytes`` = non-layer weights + resident layers + slots) as on a GPU. On CUDA the copies
run on a side stream; the compute stream waits on an event per copy.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.offload_policy import (
    NUM_SLOTS,
    BatchChoice,
    MemorySplit,
    OffloadCostModel,
    WeightPlacement,
    WeightTier,
    pick_offline_batch_size,
    place_weights,
    split_device_budget,
)

if TYPE_CHECKING:
    from engine.config import EngineConfig

log = logging.getLogger(__name__)

ALIGN = 64  # byte alignment of every tensor inside a layer's block (any dtype's view is valid)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class _TensorRef:
    module: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _layer_tensors(layer: nn.Module) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """Every parameter and buffer of ``layer`` (module, name, is_param, tensor), in a fixed order."""
    out: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    seen: set[int] = set()
    for mod in layer.modules():
        for name, t in list(mod._parameters.items()):
            if t is not None:
                if id(t) in seen:
                    raise ValueError(f"offload: tensor {name!r} is shared inside a decoder layer")
                seen.add(id(t))
                out.append((mod, name, True, t))
        for name, t in list(mod._buffers.items()):
            if t is not None and name not in getattr(mod, "_non_persistent_buffers_set", set()):
                out.append((mod, name, False, t))
    return out


def layer_nbytes(layer: nn.Module) -> int:
    """Bytes a decoder layer's block takes (its tensors at :data:`ALIGN`-aligned offsets)."""
    return sum(_aligned(t.numel() * t.element_size()) for *_, t in _layer_tensors(layer))


def fixed_nbytes(model: nn.Module) -> int:
    """Bytes of the model's weights outside ``model.model.layers`` (tied tensors counted once)."""
    in_layers = {t.data_ptr() for layer in model.model.layers for *_, t in _layer_tensors(layer)}
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        p = t.data_ptr()
        if p in in_layers or p in seen:
            continue
        seen.add(p)
        total += t.numel() * t.element_size()
    return total


@dataclass(frozen=True)
class Bandwidths:
    """Measured copy rates into the device, bytes/s, and compute per layer per step (a decode
    step of ``tokens`` tokens), seconds."""

    host_bw: float
    disk_bw: float
    compute_s: tuple[float, ...]
    tokens: int


def _drop_page_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def measure_rates(model: nn.Module, offload_dir: str | None, tokens: int = 16, reps: int = 5) -> Bandwidths:
    """Measure host -> device and disk -> device bandwidth with one layer's bytes (the disk read
    after ``fsync`` and a page-cache drop, so a cold read where the OS allows) and each layer's
    compute for a ``tokens``-row batch (its matrix products: ``2 * params * tokens`` FLOPs at the
    rate of a measured product of the first layer's largest weight)."""
    layers = model.model.layers
    dev = next(model.parameters()).device
    nb = max(layer_nbytes(layers[0]), 1 << 20)
    src = torch.empty(nb, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    src.fill_(1)
    dst = torch.empty(nb, dtype=torch.uint8, device=dev)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    host_bw = nb / max(best, 1e-9)
    buf = bytearray(nb)
    with tempfile.TemporaryFile(dir=offload_dir) as f:
        f.write(bytes(nb))
        f.flush()
        os.fsync(f.fileno())
        _drop_page_cache(f.fileno())
        t0 = time.perf_counter()
        os.preadv(f.fileno(), [memoryview(buf)], 0)
        disk_bw = nb / max(time.perf_counter() - t0, 1e-9)
    ws = [t for *_, t in _layer_tensors(layers[0]) if t.dim() == 2 and t.is_floating_point()]
    w = max(ws, key=lambda t: t.numel()) if ws else None
    if w is None:
        return Bandwidths(host_bw, disk_bw, tuple(0.0 for _ in layers), tokens)
    x = torch.randn(tokens, w.shape[1], dtype=w.dtype, device=dev)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
    flops_s = 2 * w.numel() * tokens / max(best, 1e-9)
    compute = tuple(
        2 * sum(t.numel() for *_, t in _layer_tensors(layer) if t.dim() >= 2) * tokens / flops_s
        for layer in layers
    )
    return Bandwidths(host_bw, disk_bw, compute, tokens)


@dataclass
class OffloadStats:
    """Counters since start (read by metrics and benches)."""

    copies: int = 0
    bytes_copied: int = 0
    copy_s: float = 0.0  # time the I/O thread spent copying
    stall_s: float = 0.0  # time the forward waited for a copy


class OffloadedWeights:
    """Moves the offloaded layers of ``model`` (``placement.tiers``) to the host buffer / disk file
    and rebinds them onto the device slots; installs the prefetch hooks. ``close()`` removes the
    hooks, stops the I/O thread and closes the file (the layers' weights are gone from the model
    then: close only with the engine)."""

    def __init__(
        self,
        model: nn.Module,
        placement: WeightPlacement,
        offload_dir: str | None = None,
        rates: Bandwidths | None = None,
    ) -> None:
        layers = model.model.layers
        self.rates = rates  # what the placement was made with (None: a placement given as is)
        if len(placement.tiers) != len(layers):
            raise ValueError(f"placement has {len(placement.tiers)} layers, the model {len(layers)}")
        self.placement = placement
        self.device = next(model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.stats = OffloadStats()
        self.offloaded: list[int] = list(placement.offloaded)  # model layer indices, in order
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._fd: int | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        m = len(self.offloaded)
        if m == 0:
            self.slots: list[torch.Tensor] = []
            return
        refs: dict[int, list[_TensorRef]] = {}
        sizes: dict[int, int] = {}
        for li in self.offloaded:
            off = 0
            rs: list[_TensorRef] = []
            for mod, name, is_param, t in _layer_tensors(layers[li]):
                nb = t.numel() * t.element_size()
                rs.append(_TensorRef(mod, name, is_param, off, nb, t.dtype, tuple(t.shape)))
                off += _aligned(nb)
            refs[li] = rs
            sizes[li] = off
        slot_bytes = max(sizes.values())
        nslots = min(m, NUM_SLOTS)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(nslots)]
        # where each offloaded layer's bytes live: (tier, offset in the host buffer / disk file)
        host_total = sum(sizes[li] for li in self.offloaded if placement.tiers[li] is WeightTier.HOST)
        self.host = torch.empty(host_total, dtype=torch.uint8, pin_memory=self.cuda) if host_total else None
        self._where: dict[int, tuple[WeightTier, int, int]] = {}
        disk_layers = [li for li in self.offloaded if placement.tiers[li] is WeightTier.DISK]
        if disk_layers:
            fd, path = tempfile.mkstemp(prefix="pdserve-weights-", suffix=".bin", dir=offload_dir)
            os.unlink(path)  # the file lives as long as the descriptor
            self._fd = fd
            self.disk_path = path
        self._staging = (
            [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(nslots)]
            if self.cuda and disk_layers
            else []
        )
        hoff = doff = 0
        with torch.no_grad():
            for li in self.offloaded:
                tier = placement.tiers[li]
                block = torch.zeros(sizes[li], dtype=torch.uint8)
                for r, (*_, t) in zip(refs[li], _layer_tensors(layers[li]), strict=True):
                    block[r.offset : r.offset + r.nbytes].copy_(
                        t.detach().reshape(-1).view(torch.uint8).cpu()
                    )
                if tier is WeightTier.HOST:
                    assert self.host is not None
                    self.host[hoff : hoff + sizes[li]].copy_(block)
                    self._where[li] = (tier, hoff, sizes[li])
                    hoff += sizes[li]
                else:
                    assert self._fd is not None
                    os.pwrite(self._fd, block.numpy().tobytes(), doff)
                    self._where[li] = (tier, doff, sizes[li])
                    doff += sizes[li]
        # rebind each offloaded layer's tensors onto its slot (the original tensors are freed)
        for k, li in enumerate(self.offloaded):
            slot = self.slots[k % NUM_SLOTS]
            for r in refs[li]:
                view = slot[r.offset : r.offset + r.nbytes].view(r.dtype).view(r.shape)
                if r.is_param:
                    r.module._parameters[r.name] = nn.Parameter(view, requires_grad=False)
                else:
                    r.module._buffers[r.name] = view
        self.device_bytes = placement.device_bytes
        self._slot_holds: list[int | None] = [None] * nslots  # model layer whose bytes a slot holds
        self._pending: dict[int, Future[None]] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-weight-prefetch")
        self._pos = {li: k for k, li in enumerate(self.offloaded)}
        for li in self.offloaded:
            self._hooks.append(layers[li].register_forward_pre_hook(self._pre_hook(li)))
            if self._next_shares_slot(li):
                self._hooks.append(layers[li].register_forward_hook(self._post_hook(li)))
        self._submit(self.offloaded[0])

    # ------------------------------------------------------------------ prefetch
    def _slot_of(self, li: int) -> int:
        return self._pos[li] % NUM_SLOTS

    def _next(self, li: int) -> int:
        return self.offloaded[(self._pos[li] + 1) % len(self.offloaded)]

    def _next_shares_slot(self, li: int) -> bool:
        return self._slot_of(self._next(li)) == self._slot_of(li)

    def _submit(self, li: int) -> None:
        """Start the copy of layer ``li`` into its slot (nothing when the slot holds it already)."""
        s = self._slot_of(li)
        if self._slot_holds[s] == li or li in self._pending:
            return
        self._slot_holds[s] = None
        free = None
        if self.cuda:  # the side stream must not overwrite a slot the compute stream still reads
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))
        assert self._pool is not None
        self._pending[li] = self._pool.submit(self._copy, li, s, free)

    def _copy(self, li: int, s: int, free: torch.cuda.Event | None) -> None:
        tier, off, n = self._where[li]
        slot = self.slots[s]
        t0 = time.perf_counter()
        with torch.no_grad():
            if not self.cuda:
                if tier is WeightTier.HOST:
                    assert self.host is not None
                    slot[:n].copy_(self.host[off : off + n])
                else:
                    self._pread(slot[:n], off, n)
            else:
                assert self._stream is not None and free is not None
                if tier is WeightTier.HOST:
                    assert self.host is not None
                    src = self.host[off : off + n]
                else:
                    src = self._staging[s][:n]
                    self._pread(src, off, n)
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(free)
                    slot[:n].copy_(src, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self._stream)
                done.synchronize()  # the staging buffer is reused by the next copy into this slot
                self._events[li] = done
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.copies += 1
            self.stats.bytes_copied += n
            self.stats.copy_s += dt

    def _pread(self, dst: torch.Tensor, off: int, n: int) -> None:
        assert self._fd is not None
        mv = memoryview(dst.numpy())
        got = 0
        while got < n:
            r = os.preadv(self._fd, [mv[got:n]], off + got)
            if r <= 0:
                raise OSError(f"weight offload file: short read at offset {off + got} ({got} of {n} bytes)")
            got += r

    def _wait(self, li: int) -> None:
        fut = self._pending.pop(li, None)
        if fut is None and self._slot_holds[self._slot_of(li)] != li:
            self._submit(li)  # e.g. after a forward that raised part way: fetch now
            fut = self._pending.pop(li)
        if fut is not None:
            t0 = time.perf_counter()
            fut.result()  # re-raises an I/O error here, in the forward
            self.stats.stall_s += time.perf_counter() - t0
            self._slot_holds[self._slot_of(li)] = li
        ev = self._events.pop(li, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def _pre_hook(self, li: int):
        def hook(_module: nn.Module, _args: tuple) -> None:
            self._wait(li)
            if not self._next_shares_slot(li):
                self._submit(self._next(li))

        return hook

    def _post_hook(self, li: int):
        def hook(_module: nn.Module, _args: tuple, _out: object) -> None:
            self._submit(self._next(li))

        return hook

    def tier_bytes(self) -> dict[str, int]:
        """Weight bytes by tier (``WeightTier`` values: device, host, disk) of the placement;
        device counts the non-layer weights, the resident layers and the copy slots."""
        p = self.placement
        return {"device": p.device_bytes, "host": p.host_bytes, "disk": p.disk_bytes}

    def snapshot(self) -> OffloadStats:
        with self._lock:
            return OffloadStats(
                self.stats.copies, self.stats.bytes_copied, self.stats.copy_s, self.stats.stall_s
            )

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def offload_model(
    model: nn.Module,
    device_budget_bytes: int,
    host_budget_bytes: int | None = None,
    offload_dir: str | None = None,
    rates: Bandwidths | None = None,
) -> OffloadedWeights:
    """Place ``model``'s layers for ``device_budget_bytes`` (:func:`engine.offload_policy.place_weights`
    with measured or given ``rates``) and offload them. OffloadPolicyError for a budget too small."""
    layers = model.model.layers
    rates = rates or measure_rates(model, offload_dir)
    cost = OffloadCostModel(
        layer_bytes=tuple(layer_nbytes(layer) for layer in layers),
        compute_s=rates.compute_s,
        fixed_bytes=fixed_nbytes(model),
        device_budget_bytes=device_budget_bytes,
        host_bw=rates.host_bw,
        disk_bw=rates.disk_bw,
        host_budget_bytes=host_budget_bytes,
    )
    return OffloadedWeights(model, place_weights(cost), offload_dir, rates)


def offline_batch_size(weights: OffloadedWeights, max_batch: int, efficiency: float = 0.9) -> BatchChoice:
    """Decode batch size for an offline throughput job on this placement
    (:func:`engine.offload_policy.pick_offline_batch_size`): each layer's compute taken as
    proportional to the batch (the measured ``compute_s`` of a ``rates.tokens``-row batch, per
    row), copies at the measured bandwidths; ``max_batch`` is the caller's bound (``max_num_seqs``
    and what the KV pool holds at the job's context length). ValueError without measured rates."""
    r = weights.rates
    if r is None:
        raise ValueError(
            "offline_batch_size needs measured rates (an OffloadedWeights built by offload_model)"
        )
    lb = [0] * len(weights.placement.tiers)
    for li in weights.offloaded:
        lb[li] = weights._where[li][2]
    return pick_offline_batch_size(
        weights.placement.tiers,
        lb,
        [0.0] * len(lb),
        [c / r.tokens for c in r.compute_s],
        r.host_bw,
        r.disk_bw,
        max_batch,
        efficiency=efficiency,
    )


def apply_offline_batch(
    config: EngineConfig, weights: OffloadedWeights, num_kv_blocks: int
) -> tuple[EngineConfig, BatchChoice]:
    """``config`` with ``max_num_seqs`` set to :func:`offline_batch_size`'s choice for this
    placement (``EngineConfig.offline_batch``), and the choice. The bound is the given
    ``max_num_seqs`` and ``num_kv_blocks`` (a running sequence holds at least one block). The
    choice and its predicted step time are logged."""
    if not config.offline_batch:
        raise ValueError("apply_offline_batch needs EngineConfig.offline_batch=True")
    bound = max(1, min(config.max_num_seqs, num_kv_blocks))
    choice = offline_batch_size(weights, max_batch=bound)
    log.info(
        "offline batch over offloaded weights (%d of %d layers off the device): max_num_seqs %d "
        "(bound %d), predicted decode step %.2f ms, %.1f seq/s (%.1f seq/s at the bound)",
        len(weights.offloaded),
        len(weights.placement.tiers),
        choice.batch_size,
        bound,
        choice.step_s * 1e3,
        choice.seqs_per_s,
        choice.max_seqs_per_s,
    )
    return replace(config, max_num_seqs=choice.batch_size), choice


def apply_device_budget(
    config: EngineConfig, model: nn.Module, kv_num_blocks: int, kv_block_bytes: int
) -> tuple[EngineConfig, MemorySplit, Bandwidths]:
    """``config`` with ``device_memory_budget_bytes`` split into ``weight_memory_budget_bytes`` and
    ``kv_memory_budget_bytes`` by :func:`engine.offload_policy.split_device_budget` (rates measured
    now; ``kv_num_blocks`` blocks of ``kv_block_bytes`` per layer, staging buffers of
    :func:`engine.kv_offload.staging_bound` blocks, the layers beyond ``kv_host_budget_bytes`` on
    disk; the KV priced for a step using every staged block and decoding ``max_num_seqs``
    tokens), the split and the rates.
    The split is logged. OffloadPolicyError for a budget below the minimum."""
    budget = config.device_memory_budget_bytes
    if budget is None:
        raise ValueError("apply_device_budget needs EngineConfig.device_memory_budget_bytes")
    layers = model.model.layers
    rates = measure_rates(model, config.weight_offload_dir)
    cost = OffloadCostModel(
        layer_bytes=tuple(layer_nbytes(layer) for layer in layers),
        compute_s=tuple(c * config.max_num_seqs / rates.tokens for c in rates.compute_s),
        fixed_bytes=fixed_nbytes(model),
        device_budget_bytes=budget,
        host_bw=rates.host_bw,
        disk_bw=rates.disk_bw,
        host_budget_bytes=config.weight_host_budget_bytes,
    )
    from engine.kv_offload import staging_bound

    mcfg = getattr(model, "config", None)
    pos = getattr(mcfg, "max_position_embeddings", None)
    max_len = min(config.max_model_len or pos, pos) if pos else config.max_model_len
    staging = None
    if max_len:  # the engine's bound (LLMEngine's max_model_len): offload_kv places the same
        look = config.speculative.num_speculative_tokens if config.speculative is not None else 0
        staging = staging_bound(kv_num_blocks, config.block_size, config.max_num_seqs, max_len, look)
    held = kv_num_blocks if staging is None else staging  # a step uses at most the staging's blocks
    split = split_device_budget(
        cost,
        kv_num_blocks,
        kv_block_bytes,
        held,
        config.max_num_seqs,
        config.block_size,
        staging_blocks=staging,
        kv_host_budget_bytes=config.kv_host_budget_bytes,
    )
    log.info(
        "device memory budget %d bytes: weights %d bytes (%d of %d layers offloaded), KV %d bytes "
        "(%d of %d layers' KV in the host pool); predicted decode step %.2f ms",
        budget,
        split.weight_budget_bytes,
        len(split.weights.offloaded),
        len(layers),
        split.kv_budget_bytes,
        len(split.kv.offloaded),
        len(layers),
        split.predicted_step_s * 1e3,
    )
    out = replace(
        config,
        device_memory_budget_bytes=None,
        weight_memory_budget_bytes=split.weight_budget_bytes,
        kv_memory_budget_bytes=split.kv_budget_bytes,
    )
    return out, split, rates
