"""Decode attention on CUDA through a real paged kernel: FlashInfer or flash-attn with block tables.

Used only when named explicitly (``attention_backend='flashinfer'`` / ``'flash_attn'``;
:mod:`engine.attention_backends` refuses them off CUDA, for float32, or when the package is not
importable). Each decode row (:class:`engine.attention.DecodeRows`: one per plain decode, several
per speculative decode) is one request of the kernel over its block table: its keys are the
positions ``first <= p < hi`` (``kv_len = hi - first``, the table trimmed to a sliding window
starts at ``first``; relative positions are kept, so a window is the same window), the query is the
last of them. A layer's sliding window ``W`` (keys ``p > i - W``) is ``window_left = W - 1``
(FlashInfer) / ``window_size = (W - 1, 0)`` (flash-attn); soft-capping is the kernels' own
``logits_soft_cap`` / ``softcap``.

A :class:`DecodePlan` is built once per step by the model runner (FlashInfer plans its schedule
then; one plan per distinct window) and run by every layer.

NOT RUN YET: no CUDA device was available when this was written; ``tests/gpu/`` compares both
backends with the torch paged kernel (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.attention_backends import AttentionBackend

WORKSPACE_BYTES = 128 << 20  # FlashInfer's float workspace (its documented recommendation)


class DecodePlan:
    """One step's decode attention over the paged cache for ``backend`` (FlashInfer or
    flash-attn). ``run`` is called per layer with that layer's query rows, cache, window, scale
    and soft-cap; FlashInfer plans once per distinct (window, scale, soft-cap) in the step."""

    def __init__(
        self,
        backend: AttentionBackend,
        tables: torch.Tensor,  # [D, W] int64, one table per decode row
        hi: torch.Tensor,  # [D] int64
        first: torch.Tensor,  # [D] int64
        block_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        workspace: torch.Tensor | None,
    ) -> None:
        if backend not in (AttentionBackend.FLASHINFER, AttentionBackend.FLASH_ATTN):
            raise ValueError(f"DecodePlan runs flashinfer or flash_attn, not {backend.value!r}")
        self.backend = backend
        kv_len = (hi - first).to(torch.int32)
        if backend is AttentionBackend.FLASH_ATTN:
            from flash_attn import flash_attn_with_kvcache

            self._fa = flash_attn_with_kvcache
            self._tables = tables.to(torch.int32).contiguous()
            self._seqlens = kv_len.contiguous()
            return
        import flashinfer

        if workspace is None:
            raise ValueError("FlashInfer needs a workspace buffer")
        self._flashinfer = flashinfer
        self._workspace = workspace
        dev = tables.device
        pages = (kv_len + block_size - 1) // block_size  # [D]
        self._indptr = torch.zeros(len(pages) + 1, dtype=torch.int32, device=dev)
        self._indptr[1:] = torch.cumsum(pages, 0)
        used = torch.arange(tables.shape[1], device=dev).unsqueeze(0) < pages.unsqueeze(1)
        self._indices = tables.to(torch.int32)[used]  # row-major: each row's pages in order
        self._last = (kv_len - (pages - 1) * block_size).to(torch.int32)
        self._shape = (num_heads, num_kv_heads, head_dim, block_size)
        self._dtype = dtype
        self._wrappers: dict[tuple[int | None, float, float | None], Any] = {}

    def _wrapper(self, window: int | None, scale: float, softcap: float | None) -> Any:
        key = (window, scale, softcap)
        wr = self._wrappers.get(key)
        if wr is None:
            h, kvh, hd, bs = self._shape
            wr = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD")
            wr.plan(
                self._indptr,
                self._indices,
                self._last,
                h,
                kvh,
                hd,
                bs,
                pos_encoding_mode="NONE",
                window_left=-1 if window is None else window - 1,
                logits_soft_cap=softcap,
                q_data_type=self._dtype,
                kv_data_type=self._dtype,
                sm_scale=scale,
            )
            self._wrappers[key] = wr
        return wr

    def run(
        self,
        q: torch.Tensor,
        cache: torch.Tensor,
        window: int | None,
        scale: float,
        softcap: float | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of the decode rows ``q`` ``[D, H, hd]`` over one layer's ``cache``
        ``[2, num_blocks, block_size, KVH, hd]`` with sliding ``window`` (None: full); writes
        ``out`` ``[D, H, hd]``."""
        if self.backend is AttentionBackend.FLASH_ATTN:
            o = self._fa(
                q.unsqueeze(1),
                cache[0],
                cache[1],
                cache_seqlens=self._seqlens,
                block_table=self._tables,
                softmax_scale=scale,
                causal=True,
                window_size=(-1, -1) if window is None else (window - 1, 0),
                softcap=softcap or 0.0,
            )
            out.copy_(o.squeeze(1))
            return out
        out.copy_(self._wrapper(window, scale, softcap).run(q.contiguous(), (cache[0], cache[1])))
        return out


def new_workspace(device: torch.device) -> torch.Tensor:
    """FlashInfer's workspace buffer (allocated once per model runner)."""
    return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
