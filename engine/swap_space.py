"""The host block pool's tensors and the device<->host block copies (vLLM's swap space).

:class:`HostKVCache` holds ``num_blocks`` KV blocks in host memory, block-major
``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]`` (each block contiguous). The
accounting of which request owns which slot is pure and lives elsewhere
(:class:`engine.host_pool.HostBlockPool`, ``KVCacheManager.swap_out`` / ``swap_in``); this module
only copies the ``(source, destination)`` pairs it is given.

* CPU device: a separate pre-allocated tensor; copies are synchronous gathers/scatters.
* CUDA device: pinned host memory; copies run on a side stream (``non_blocking``), and the
  compute stream waits on an event before the next forward pass (a released device block may be
  overwritten by it; a swapped-in block is read by it). The host thread does not wait.

:meth:`HostKVCache.swap` does all swap-outs, then all swap-ins, in that order (the scheduler's
contract: a device block released by a swap-out may be the destination of a swap-in of the same
step). :meth:`HostKVCache.take_timings` returns ``(bytes, seconds)`` of completed copies for the
swap rate estimate; ``copied_bytes`` / ``copy_seconds`` add up every timing it has returned (the
engine's start-up bandwidth probe included), for metrics.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch


class HostKVCache:
    """Host copies of KV blocks for one device KV cache ``[L, 2, num_blocks, bs, kvh, hd]``."""

    def __init__(self, num_blocks: int, device_cache: torch.Tensor) -> None:
        if num_blocks < 1:
            raise ValueError(f"a host KV cache needs >= 1 block, got {num_blocks}")
        layers, two, _, bs, kvh, hd = device_cache.shape
        self.device = device_cache.device
        self.cuda = self.device.type == "cuda"
        self.cache = torch.zeros(
            num_blocks, layers, two, bs, kvh, hd, dtype=device_cache.dtype, device="cpu", pin_memory=self.cuda
        )
        self.block_nbytes = self.cache[0].numel() * self.cache.element_size()
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._done: torch.cuda.Event | None = None  # end of the last copies (CUDA)
        self._keep: list[torch.Tensor] = []  # staging tensors alive until the copies end (CUDA)
        self._cuda_timings: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._timings: list[tuple[int, float]] = []
        self.copied_bytes = 0  # cumulative, over the timings take_timings returned
        self.copy_seconds = 0.0

    @property
    def num_blocks(self) -> int:
        return self.cache.shape[0]

    @property
    def nbytes(self) -> int:
        return self.cache.numel() * self.cache.element_size()

    # ------------------------------------------------------------------ copies
    def swap(
        self,
        device_cache: torch.Tensor,
        swap_out: Sequence[tuple[int, int]],
        swap_in: Sequence[tuple[int, int]],
    ) -> None:
        """Copy ``swap_out`` ``(device, host)`` pairs to the host, then ``swap_in`` ``(host,
        device)`` pairs to the device. On CUDA the copies are queued on the side stream and the
        current stream is made to wait for them."""
        if not swap_out and not swap_in:
            return
        for _, h in swap_out:
            self._check(h)
        for h, _ in swap_in:
            self._check(h)
        if self.cuda:
            self._swap_cuda(device_cache, swap_out, swap_in)
            return
        t = time.perf_counter()
        if swap_out:
            src = torch.tensor([d for d, _ in swap_out], dtype=torch.long)
            dst = torch.tensor([h for _, h in swap_out], dtype=torch.long)
            self.cache.index_copy_(0, dst, device_cache.index_select(2, src).permute(2, 0, 1, 3, 4, 5))
        if swap_in:
            src = torch.tensor([h for h, _ in swap_in], dtype=torch.long)
            dst = torch.tensor([d for _, d in swap_in], dtype=torch.long)
            device_cache.index_copy_(2, dst, self.cache.index_select(0, src).permute(1, 2, 0, 3, 4, 5))
        n = (len(swap_out) + len(swap_in)) * self.block_nbytes
        self._timings.append((n, time.perf_counter() - t))

    def _check(self, h: int) -> None:
        if not 0 <= h < self.num_blocks:
            raise IndexError(f"host block {h} out of range [0, {self.num_blocks})")

    def _swap_cuda(
        self,
        device_cache: torch.Tensor,
        swap_out: Sequence[tuple[int, int]],
        swap_in: Sequence[tuple[int, int]],
    ) -> None:  # pragma: no cover - needs a CUDA device (tests/gpu)
        assert self._stream is not None
        compute = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(compute)  # the blocks to read were written by earlier steps
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            start.record()
            if swap_out:
                src = torch.tensor([d for d, _ in swap_out], dtype=torch.long, device=self.device)
                staged = device_cache.index_select(2, src).permute(2, 0, 1, 3, 4, 5).contiguous()
                for i, (_, h) in enumerate(swap_out):
                    self.cache[h].copy_(staged[i], non_blocking=True)
                self._keep.append(staged)
            if swap_in:
                staged = torch.empty(
                    (len(swap_in), *self.cache.shape[1:]), dtype=self.cache.dtype, device=self.device
                )
                for i, (h, _) in enumerate(swap_in):
                    staged[i].copy_(self.cache[h], non_blocking=True)
                dst = torch.tensor([d for _, d in swap_in], dtype=torch.long, device=self.device)
                device_cache.index_copy_(2, dst, staged.permute(1, 2, 0, 3, 4, 5))
                self._keep.append(staged)
            end.record()
        compute.wait_event(end)  # the next forward pass runs after the copies
        self._done = end
        n = (len(swap_out) + len(swap_in)) * self.block_nbytes
        self._cuda_timings.append((n, start, end))

    def synchronize(self) -> None:
        """Wait for queued copies (CUDA) and drop their staging tensors."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        self._keep.clear()

    def take_timings(self) -> list[tuple[int, float]]:
        """``(bytes, seconds)`` of every copy batch finished since the last call."""
        out, self._timings = self._timings, []
        pending = []
        for n, s, e in self._cuda_timings:
            if e.query():
                out.append((n, s.elapsed_time(e) / 1000.0))
            else:
                pending.append((n, s, e))
        self._cuda_timings = pending
        if not pending and self._done is not None and self._done.query():
            self._done = None
            self._keep.clear()
        for n, secs in out:
            self.copied_bytes += n
            self.copy_seconds += secs
        return out
