"""KV offloading (FlexGen), the I/O side: the KV of some decoder layers, for every running request,
lives off the device, in a host-memory pool or, for the layers beyond the host budget, in a
disk-backed pool (a memory-mapped scratch file, unlinked at once); before such a layer runs, the
blocks this step's requests use are copied into a device staging buffer, and after it runs the
step's new K/V rows are written back. The placement and the cost model are
:func:`engine.offload_policy.place_kv` and :func:`engine.offload_policy.kv_step_cost`.

:class:`OffloadedKV` replaces the model runner's KV cache tensor
``[num_layers, 2, num_blocks, block_size, kvh, hd]``; it is what the runner passes to the model
(``kv_caches[i]`` is the layer's KV: a device tensor for a resident layer, the layer's staging
buffer for an offloaded one) and supports what the runner, the swap space and the KV export do
with the tensor (``shape``, ``device``, ``dtype``, ``index_select(2, ids)``,
``index_copy_(2, ids, src)``: a gather / scatter of whole blocks over all layers, straight from /
to the host or disk pool for the offloaded layers). So swap-based preemption, copy-on-write,
prefix caching and KV export/import work unchanged: an offloaded layer's pool holds every block
of the layer, always current (a staging buffer is a per-step copy).

* Device: the resident layers' KV ``[R, 2, N, ...]`` and ``min(K, 2)`` staging buffers
  ``[2, S, ...]``: ``S`` = ``placement.staging`` blocks, the most blocks a step's requests can
  use (:func:`engine.offload_policy.staging_bound`, re-exported here), not the pool's ``N``. A step's blocks (those its attention
  metadata names: block tables and new slots) are packed into the first ``h <= S`` blocks of the
  buffer, and the offloaded layers get the metadata with block ids renumbered to that packing
  (the forward pre-hook replaces the layer's cache and metadata arguments). A step using more
  than ``S`` blocks (a bound that did not hold) grows the buffers, logged and counted
  (``staging_overflows``): output stays right, the device budget is exceeded.
  The offloaded layer ``k`` (model order) uses buffer ``k % 2``.
* Host: ``[Kh, 2, N, ...]`` (pinned on CUDA); disk: ``[Kd, 2, N, ...]`` in one memory-mapped file
  under the configured folder (the OS pages it; reads and writes are the same tensor ops).
* A forward pre-hook on layer 0 starts the step: it waits for the previous step's write-backs,
  takes the step's block ids from the metadata and starts the first offloaded layer's read. The
  pre-hook of offloaded layer ``o_k`` waits for its read and starts ``o_{k+1}``'s (into the
  other buffer, which ``o_{k-1}`` used: its write-back was queued first, and copies run in
  order); its forward hook queues the write-back of the step's slots.
* Copies run on one background thread (CPU: the "device" is host memory, the same code path and
  accounting as on a GPU); on CUDA on a side stream, the compute stream waiting on an event per
  read and the side stream on an event per buffer reuse. Not with the FlashInfer / flash-attn
  decode backends (their plan holds the block tables; refused at install).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
from torch import nn

from engine.block_manager import KVCacheManager
from engine.offload_policy import NUM_SLOTS, KVPlacement, place_kv, staging_bound

log = logging.getLogger(__name__)


@dataclass
class KVOffloadStats:
    """Counters since start (read by metrics and benches)."""

    steps: int = 0
    reads: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    copy_s: float = 0.0  # time the I/O thread spent copying
    stall_s: float = 0.0  # time the forward waited for a read
    staging_overflows: int = 0  # steps that needed bigger staging buffers than placed


STAGING_CHUNK = 16  # blocks a staging buffer grows by when a step overflows it


def _disk_pool(folder: str | None, n: int, layer: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``[n, *layer]`` zeros backed by a shared memory-mapped file under ``folder`` (None: the
    system temp folder), unlinked at once (the mapping keeps it until the tensor is freed)."""
    fd, path = tempfile.mkstemp(prefix="pdserve-kv-offload-", suffix=".bin", dir=folder)
    os.close(fd)
    try:
        t = torch.from_file(path, shared=True, size=n * math.prod(layer), dtype=dtype)
    finally:
        os.unlink(path)
    return t.view(n, *layer)


class OffloadedKV:
    """The model runner's KV cache with ``placement.offloaded`` layers' KV in a host pool, those in
    ``placement.disk`` in a disk-backed pool under ``offload_dir`` (see the module docstring).
    ``close()`` removes the hooks and stops the I/O thread."""

    def __init__(
        self,
        model: nn.Module,
        kv: KVCacheManager,
        placement: KVPlacement,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        offload_dir: str | None = None,
    ) -> None:
        layers = model.model.layers
        nl, two, nb, bs, kvh, hd = shape
        if len(layers) != nl or placement.num_layers != nl or placement.num_blocks != nb:
            raise ValueError(
                f"KV placement for {placement.num_layers} layers x {placement.num_blocks} blocks, "
                f"the cache has {nl} x {nb} (model: {len(layers)} layers)"
            )
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = device
        self.cuda = device.type == "cuda"
        self.placement = placement
        self.kv = kv
        self.block_size = bs
        self.stats = KVOffloadStats()
        self.offloaded: list[int] = list(placement.offloaded)
        self._kpos = {li: k for k, li in enumerate(self.offloaded)}
        resident = [i for i in range(nl) if i not in self._kpos]
        self._rpos = {li: r for r, li in enumerate(resident)}
        layer = (two, nb, bs, kvh, hd)
        self.device_kv = torch.zeros(len(resident), *layer, dtype=dtype, device=device)
        disk = set(placement.disk)
        on_host = [li for li in self.offloaded if li not in disk]
        on_disk = [li for li in self.offloaded if li in disk]
        host = torch.zeros(len(on_host), *layer, dtype=dtype, pin_memory=self.cuda) if on_host else None
        dpool = _disk_pool(offload_dir, len(on_disk), layer, dtype) if on_disk else None
        # the pool of offloaded layer k (model order): a view of the host or the disk tensor
        self.host_kv: list[torch.Tensor] = [
            dpool[on_disk.index(li)] if li in disk else host[on_host.index(li)]  # type: ignore[index]
            for li in self.offloaded
        ]
        self.capacity = placement.staging  # blocks one staging buffer holds
        self.slots = [
            torch.zeros(two, self.capacity, bs, kvh, hd, dtype=dtype, device=device)
            for _ in range(min(len(self.offloaded), NUM_SLOTS))
        ]
        self._md: object | None = None  # this step's metadata, block ids renumbered to the packing
        self._orig_slots: torch.Tensor | None = None  # this step's slot mapping (pool numbering)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: list[Future[None]] = []
        self._reads: dict[int, Future[None]] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._ids_cpu: torch.Tensor | None = None
        self._ids_dev: torch.Tensor | None = None
        if not self.offloaded:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdserve-kv-offload")
        self._hooks.append(layers[0].register_forward_pre_hook(self._step_start))
        for li in self.offloaded:
            self._hooks.append(layers[li].register_forward_pre_hook(self._pre_hook(li)))
            self._hooks.append(layers[li].register_forward_hook(self._post_hook(li)))

    # ------------------------------------------------------------------ tensor-like surface
    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s KV ``[2, N, bs, kvh, hd]`` for the forward pass (an offloaded layer's
        staging buffer: valid for the held blocks once its pre-hook ran)."""
        k = self._kpos.get(layer)
        if k is None:
            return self.device_kv[self._rpos[layer]]
        return self.slots[k % NUM_SLOTS]

    @property
    def nbytes(self) -> int:
        """Device bytes (resident layers and staging buffers)."""
        return sum(t.numel() * t.element_size() for t in [self.device_kv, *self.slots])

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        """Blocks ``index`` of every layer, ``[L, 2, n, bs, kvh, hd]`` on the device."""
        if dim != 2:
            raise ValueError(f"OffloadedKV.index_select supports dim 2 (blocks), got {dim}")
        self.synchronize()
        idx = index.to(self.device)
        out = torch.empty(
            (self.shape[0], 2, len(index), *self.shape[3:]), dtype=self.dtype, device=self.device
        )
        for li in range(self.shape[0]):
            k = self._kpos.get(li)
            if k is None:
                out[li] = self.device_kv[self._rpos[li]].index_select(1, idx)
            else:
                out[li] = self.host_kv[k].index_select(1, index.cpu()).to(self.device)
        return out

    def index_copy_(self, dim: int, index: torch.Tensor, source: torch.Tensor) -> OffloadedKV:
        """Write ``source`` ``[L, 2, n, bs, kvh, hd]`` into blocks ``index`` of every layer (the
        offloaded layers' into the host pool)."""
        if dim != 2:
            raise ValueError(f"OffloadedKV.index_copy_ supports dim 2 (blocks), got {dim}")
        self.synchronize()
        idx = index.to(self.device)
        for li in range(self.shape[0]):
            k = self._kpos.get(li)
            if k is None:
                self.device_kv[self._rpos[li]].index_copy_(1, idx, source[li].to(self.device))
            else:
                self.host_kv[k].index_copy_(1, index.cpu(), source[li].to("cpu", self.dtype))
        return self

    # ------------------------------------------------------------------ prefetch
    def _step_ids(self, md) -> torch.Tensor:
        """The pool block ids this step's metadata names (sorted, unique, on the CPU): the
        decodes' and prefills' block tables and the blocks of the new slots."""
        bs = self.block_size
        parts = [md.slot_mapping.reshape(-1) // bs]
        if md.decode_block_tables is not None:
            parts.append(md.decode_block_tables.reshape(-1))
        if md.decode_rows is not None:
            parts.append(md.decode_rows.tables.reshape(-1))
        parts += [p.block_table.reshape(-1) for p in md.prefills if p.block_table is not None]
        return torch.unique(torch.cat([x.to("cpu", torch.long) for x in parts]))

    def _renumber(self, md, ids: torch.Tensor):
        """``md`` with every block id renumbered to its place in the staging buffer."""
        if md.decode_plan is not None:
            raise RuntimeError("KV offloading cannot renumber a FlashInfer / flash-attn decode plan")
        remap = torch.zeros(self.shape[2], dtype=torch.long)
        remap[ids] = torch.arange(ids.numel(), dtype=torch.long)
        remap = remap.to(md.slot_mapping.device)
        bs = self.block_size
        sm = md.slot_mapping
        return replace(
            md,
            slot_mapping=remap[sm // bs] * bs + sm % bs,
            decode_block_tables=None if md.decode_block_tables is None else remap[md.decode_block_tables],
            decode_rows=None
            if md.decode_rows is None
            else replace(md.decode_rows, tables=remap[md.decode_rows.tables]),
            prefills=[
                p if p.block_table is None else replace(p, block_table=remap[p.block_table])
                for p in md.prefills
            ],
        )

    def _grow(self, need: int) -> None:
        """Staging buffers of at least ``need`` blocks (a step overflowed the placed bound)."""
        nb = self.shape[2]
        cap = min(nb, -(-need // STAGING_CHUNK) * STAGING_CHUNK)
        log.warning(
            "KV offload: a step uses %d blocks, over the %d the staging buffers were placed for; "
            "growing them to %d blocks (over the KV device budget)",
            need,
            self.capacity,
            cap,
        )
        self.capacity = cap
        self.slots = [
            torch.zeros(self.shape[1], cap, *self.shape[3:], dtype=self.dtype, device=self.device)
            for _ in self.slots
        ]
        with self._lock:
            self.stats.staging_overflows += 1

    def _step_start(self, _mod: nn.Module, args: tuple) -> None:
        self.synchronize()  # the previous step's write-backs (and a read left by a failed forward)
        md = args[4]
        ids = self._step_ids(md)
        if ids.numel() > self.capacity:
            self._grow(ids.numel())
        self._md = self._renumber(md, ids)
        self._orig_slots = md.slot_mapping
        self._ids_cpu = ids
        self._ids_dev = ids.to(self.device) if self.cuda else ids
        with self._lock:
            self.stats.steps += 1
        self._submit_read(self.offloaded[0])

    def _submit_read(self, li: int) -> None:
        if li in self._reads:
            return
        free = None
        if self.cuda:  # the buffer's previous user may still be computing on the compute stream
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))
        assert self._pool is not None and self._ids_cpu is not None
        fut = self._pool.submit(self._read, li, self._ids_cpu, self._ids_dev, free)
        self._reads[li] = fut
        self._pending.append(fut)

    def _read(self, li: int, ids: torch.Tensor, ids_dev: torch.Tensor, free: torch.cuda.Event | None) -> None:
        k = self._kpos[li]
        h = ids.numel()
        slot = self.slots[k % NUM_SLOTS][:, :h]  # the step's blocks, packed
        t0 = time.perf_counter()
        with torch.inference_mode():
            if not self.cuda:
                slot.copy_(self.host_kv[k].index_select(1, ids))
            else:  # pragma: no cover - needs a CUDA device
                assert self._stream is not None and free is not None
                src = self.host_kv[k].index_select(1, ids).pin_memory()
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(free)
                    slot.copy_(src.to(self.device, non_blocking=True))
                    done = torch.cuda.Event()
                    done.record(self._stream)
                done.synchronize()  # src is freed on return
                self._events[li] = done
        n = ids.numel() * self.placement.block_bytes
        with self._lock:
            self.stats.reads += 1
            self.stats.read_bytes += n
            self.stats.copy_s += time.perf_counter() - t0

    def _write_back(
        self, li: int, staged: torch.Tensor, slots: torch.Tensor, done: torch.cuda.Event | None
    ) -> None:
        """Copy the step's new rows, at ``staged`` in the staging buffer, to ``slots`` of the
        layer's pool."""
        k = self._kpos[li]
        nl, two, nb, bs, kvh, hd = self.shape
        t0 = time.perf_counter()
        with torch.inference_mode():
            buf = self.slots[k % NUM_SLOTS]
            src = buf.view(two, buf.shape[1] * bs, kvh, hd)
            dst = self.host_kv[k].view(two, nb * bs, kvh, hd)
            if not self.cuda:
                dst.index_copy_(1, slots, src.index_select(1, staged))
            else:  # pragma: no cover - needs a CUDA device
                assert self._stream is not None and done is not None
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(done)
                    rows = src.index_select(1, staged).to("cpu", non_blocking=True)
                    end = torch.cuda.Event()
                    end.record(self._stream)
                end.synchronize()
                dst.index_copy_(1, slots.cpu(), rows)
        n = slots.numel() * self.placement.block_bytes // bs
        with self._lock:
            self.stats.write_bytes += n
            self.stats.copy_s += time.perf_counter() - t0

    def _pre_hook(self, li: int):
        k = self._kpos[li]

        def hook(_mod: nn.Module, args: tuple) -> tuple:
            fut = self._reads.pop(li, None)
            if fut is None:  # e.g. a forward that raised part way through the previous step
                self._submit_read(li)
                fut = self._reads.pop(li)
            t0 = time.perf_counter()
            fut.result()
            if self.cuda:  # pragma: no cover - needs a CUDA device
                torch.cuda.current_stream(self.device).wait_event(self._events.pop(li))
            with self._lock:
                self.stats.stall_s += time.perf_counter() - t0
            if k + 1 < len(self.offloaded):
                self._submit_read(self.offloaded[k + 1])
            # the layer reads its staging buffer with the step's block ids renumbered to the packing
            return (*args[:3], self.slots[k % NUM_SLOTS], self._md, *args[5:])

        return hook

    def _post_hook(self, li: int):
        def hook(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            staged, slots = args[4].slot_mapping, self._orig_slots
            done = None
            if self.cuda:  # pragma: no cover - needs a CUDA device
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
            assert self._pool is not None
            self._pending.append(self._pool.submit(self._write_back, li, staged, slots, done))

        return hook

    def synchronize(self) -> None:
        """Wait for every queued copy (the host pool is then current); re-raises a copy's error."""
        pending, self._pending = self._pending, []
        self._reads.clear()
        self._events.clear()
        err: BaseException | None = None
        for f in pending:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - the first one is re-raised below
                err = err or e
        if err is not None:
            raise err

    def snapshot(self) -> KVOffloadStats:
        with self._lock:
            return KVOffloadStats(**vars(self.stats))

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._pool is not None:
            try:
                self.synchronize()
            finally:
                self._pool.shutdown(wait=True)
                self._pool = None


def offload_kv(
    runner,
    kv: KVCacheManager,
    device_budget_bytes: int,
    config=None,
    max_model_len: int | None = None,
) -> OffloadedKV:
    """Place the runner's KV pool for ``device_budget_bytes`` (:func:`place_kv`) and replace
    ``runner.kv_cache`` with an :class:`OffloadedKV` (the runner's tensor is freed). With the
    engine's ``config`` (an ``EngineConfig``) and ``max_model_len``, the staging buffers hold
    :func:`engine.offload_policy.staging_bound` blocks and the layers beyond ``config.kv_host_budget_bytes`` go to a
    disk-backed pool under ``config.kv_offload_dir``; without, whole-pool buffers and the host
    pool only. OffloadPolicyError for a budget below the minimum."""
    cache = runner.kv_cache
    if not isinstance(cache, torch.Tensor):
        raise ValueError(f"offload_kv needs the runner's KV cache tensor, got {type(cache).__name__}")
    nl, _, nb, bs = cache.shape[:4]
    block_bytes = cache[0, :, 0].numel() * cache.element_size()
    staging = host = folder = None
    if config is not None:
        spec = getattr(config, "speculative", None)
        look = spec.num_speculative_tokens if spec is not None else 0
        staging = staging_bound(nb, bs, config.max_num_seqs, max_model_len or config.max_model_len, look)
        host, folder = config.kv_host_budget_bytes, config.kv_offload_dir
    placement = place_kv(nl, nb, block_bytes, device_budget_bytes, staging, host)
    return install(runner, kv, placement, folder)


def install(
    runner, kv: KVCacheManager, placement: KVPlacement, offload_dir: str | None = None
) -> OffloadedKV:
    """Replace ``runner.kv_cache`` (a tensor, still empty) with an :class:`OffloadedKV` of
    ``placement`` (tests give a placement directly). ValueError with a FlashInfer / flash-attn
    decode backend (its plan holds the block tables the staging buffers renumber)."""
    cache = runner.kv_cache
    model = runner.model
    backend = getattr(getattr(runner, "decode_backend", None), "value", None)
    if placement.offloaded and backend in ("flashinfer", "flash_attn"):
        raise ValueError(f"KV offloading is not supported with the {backend} decode backend: use native")
    if getattr(model, "fused", False):  # the fused native forward bypasses the layers' hooks
        model.enable_fused(False)
        runner.fused_reason = "KV offloading (its copies run in the decoder layers' hooks)"
        log.info("fused native small ops off: KV offloading")
    off = OffloadedKV(runner.model, kv, placement, tuple(cache.shape), cache.dtype, cache.device, offload_dir)
    runner.kv_cache = off
    del cache
    if off.cuda:  # pragma: no cover - needs a CUDA device
        torch.cuda.empty_cache()
    log.info(
        "KV offload: %d of %d layers' KV off the device (host pool %.1f MiB, disk pool %.1f MiB, "
        "%d layers), device %.1f MiB (%d staging buffers of %d of %d blocks)",
        len(placement.offloaded),
        placement.num_layers,
        placement.host_bytes / 2**20,
        placement.disk_bytes / 2**20,
        len(placement.disk),
        placement.device_bytes / 2**20,
        placement.num_slots,
        placement.staging,
        placement.num_blocks,
    )
    return off
