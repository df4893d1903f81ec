"""KV offloading (FlexGen), the I/O side: the KV of some decoder layers, for every running request,
lives in a host-memory pool; before such a layer runs, the blocks the running requests hold are
copied into a device staging buffer, and after it runs the step's new K/V rows are written back.
The placement and the cost model are :func:`engine.offload_policy.place_kv` and
:func:`engine.offload_policy.kv_step_cost`.

:class:`OffloadedKV` replaces the model runner's KV cache tensor
``[num_layers, 2, num_blocks, block_size, kvh, hd]``; it is what the runner passes to the model
(``kv_caches[i]`` is the layer's KV: a device tensor for a resident layer, the layer's staging
buffer for an offloaded one) and supports what the runner, the swap space and the KV export do
with the tensor (``shape``, ``device``, ``dtype``, ``index_select(2, ids)``,
``index_copy_(2, ids, src)``: a gather / scatter of whole blocks over all layers, straight from /
to the host pool for the offloaded layers). So swap-based preemption, copy-on-write, prefix
caching and KV export/import work unchanged: the host pool holds every block of an offloaded
layer, always current (a staging buffer is a per-step copy).

* Device: the resident layers' KV ``[R, 2, N, ...]`` and ``min(K, 2)`` staging buffers
  ``[2, N, ...]`` (``N`` = the pool's blocks; block ids are unchanged, so the attention's block
  tables need no remapping). The offloaded layer ``k`` (model order) uses buffer ``k % 2``.
* Host: ``[K, 2, N, ...]`` (pinned on CUDA).
* A forward pre-hook on layer 0 starts the step: it waits for the previous step's write-backs,
  takes the held block ids from the KV manager (blocks with a reference: every running
  request's blocks, shared prefix blocks once) and starts the first offloaded layer's read. The
  pre-hook of offloaded layer ``o_k`` waits for its read and starts ``o_{k+1}``'s (into the
  other buffer, which ``o_{k-1}`` used: its write-back was queued first, and copies run in
  order); its forward hook queues the write-back of the step's slots (``slot_mapping``).
* Copies run on one background thread (CPU: the "device" is host memory, the same code path and
  accounting as on a GPU); on CUDA on a side stream, the compute stream waiting on an event per
  read and the side stream on an event per buffer reuse.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from engine.block_manager import KVCacheManager
from engine.offload_policy import NUM_SLOTS, KVPlacement, place_kv

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


class OffloadedKV:
    """The model runner's KV cache with ``placement.offloaded`` layers' KV in a host pool (see the
    module docstring). ``close()`` removes the hooks and stops the I/O thread."""

    def __init__(
        self,
        model: nn.Module,
        kv: KVCacheManager,
        placement: KVPlacement,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
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
        self.host_kv = torch.zeros(len(self.offloaded), *layer, dtype=dtype, pin_memory=self.cuda)
        self.slots = [
            torch.zeros(*layer, dtype=dtype, device=device)
            for _ in range(min(len(self.offloaded), NUM_SLOTS))
        ]
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
    def _held_ids(self) -> list[int]:
        return [b.block_id for b in self.kv.pool.blocks if b.ref_cnt > 0]

    def _step_start(self, _mod: nn.Module, _args: tuple) -> None:
        self.synchronize()  # the previous step's write-backs (and a read left by a failed forward)
        ids = self._held_ids()
        self._ids_cpu = torch.tensor(ids, dtype=torch.long)
        self._ids_dev = self._ids_cpu.to(self.device) if self.cuda else self._ids_cpu
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
        slot = self.slots[k % NUM_SLOTS]
        t0 = time.perf_counter()
        with torch.inference_mode():
            if not self.cuda:
                slot.index_copy_(1, ids, self.host_kv[k].index_select(1, ids))
            else:  # pragma: no cover - needs a CUDA device
                assert self._stream is not None and free is not None
                src = self.host_kv[k].index_select(1, ids).pin_memory()
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(free)
                    slot.index_copy_(1, ids_dev, src.to(self.device, non_blocking=True))
                    done = torch.cuda.Event()
                    done.record(self._stream)
                done.synchronize()  # src is freed on return
                self._events[li] = done
        n = ids.numel() * self.placement.block_bytes
        with self._lock:
            self.stats.reads += 1
            self.stats.read_bytes += n
            self.stats.copy_s += time.perf_counter() - t0

    def _write_back(self, li: int, slots: torch.Tensor, done: torch.cuda.Event | None) -> None:
        k = self._kpos[li]
        nl, two, nb, bs, kvh, hd = self.shape
        t0 = time.perf_counter()
        with torch.inference_mode():
            src = self.slots[k % NUM_SLOTS].view(two, nb * bs, kvh, hd)
            dst = self.host_kv[k].view(two, nb * bs, kvh, hd)
            if not self.cuda:
                dst.index_copy_(1, slots, src.index_select(1, slots))
            else:  # pragma: no cover - needs a CUDA device
                assert self._stream is not None and done is not None
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(done)
                    rows = src.index_select(1, slots).to("cpu", non_blocking=True)
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

        def hook(_mod: nn.Module, _args: tuple) -> None:
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

        return hook

    def _post_hook(self, li: int):
        def hook(_mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            md = args[4]
            done = None
            if self.cuda:  # pragma: no cover - needs a CUDA device
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
            assert self._pool is not None
            self._pending.append(self._pool.submit(self._write_back, li, md.slot_mapping, done))

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


def offload_kv(runner, kv: KVCacheManager, device_budget_bytes: int) -> OffloadedKV:
    """Place the runner's KV pool for ``device_budget_bytes`` (:func:`place_kv`) and replace
    ``runner.kv_cache`` with an :class:`OffloadedKV` (the runner's tensor is freed).
    OffloadPolicyError for a budget below the minimum."""
    cache = runner.kv_cache
    if not isinstance(cache, torch.Tensor):
        raise ValueError(f"offload_kv needs the runner's KV cache tensor, got {type(cache).__name__}")
    nl, _, nb = cache.shape[:3]
    block_bytes = cache[0, :, 0].numel() * cache.element_size()
    placement = place_kv(nl, nb, block_bytes, device_budget_bytes)
    return install(runner, kv, placement)


def install(runner, kv: KVCacheManager, placement: KVPlacement) -> OffloadedKV:
    """Replace ``runner.kv_cache`` (a tensor, still empty) with an :class:`OffloadedKV` of
    ``placement`` (tests give a placement directly)."""
    cache = runner.kv_cache
    model = runner.model
    if getattr(model, "fused", False):  # the fused native forward bypasses the layers' hooks
        model.enable_fused(False)
        runner.fused_reason = "KV offloading (its copies run in the decoder layers' hooks)"
        log.info("fused native small ops off: KV offloading")
    off = OffloadedKV(runner.model, kv, placement, tuple(cache.shape), cache.dtype, cache.device)
    runner.kv_cache = off
    del cache
    if off.cuda:  # pragma: no cover - needs a CUDA device
        torch.cuda.empty_cache()
    log.info(
        "KV offload: %d of %d layers' KV in the host pool (%.1f MiB), device %.1f MiB (%d staging buffers)",
        len(placement.offloaded),
        placement.num_layers,
        placement.host_bytes / 2**20,
        placement.device_bytes / 2**20,
        placement.num_slots,
    )
    return off
