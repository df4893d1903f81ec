"""torch views of KV block bytes (zero copy). The only module of kv_store that imports torch.

A block's bytes are one C-contiguous ``[num_layers, 2, block_size, num_kv_heads, head_dim]``
array in ``layout.dtype`` (see :mod:`kv_store.layout`).
"""

from __future__ import annotations

from typing import Any

import torch

from kv_store.layout import KVLayout
from pdserve.errors import InvalidRequestError


def torch_dtype(layout: KVLayout) -> torch.dtype:
    dt = getattr(torch, layout.dtype, None)
    if not isinstance(dt, torch.dtype):
        raise InvalidRequestError(f"dtype {layout.dtype!r} is not a torch dtype in this build")
    return dt


def block_tensor(buf: Any, layout: KVLayout) -> torch.Tensor:
    """Zero-copy tensor of shape ``layout.block_shape`` over a writable buffer of one block
    (a slot memoryview, bytes are copied by torch only if the buffer is read-only: avoid)."""
    mv = memoryview(buf)
    if mv.nbytes != layout.block_nbytes:
        raise InvalidRequestError(
            f"buffer has {mv.nbytes} bytes, a block of this layout has {layout.block_nbytes}"
        )
    return torch.frombuffer(mv, dtype=torch_dtype(layout)).view(layout.block_shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Bytes of a CPU tensor as a memoryview (zero copy when ``t`` is contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def gather_block(caches: list[torch.Tensor], block_id: int, out: Any | None = None) -> torch.Tensor:
    """Engine -> wire: block ``block_id`` of per-layer caches ``[2, num_blocks, bs, H, D]`` as one
    ``[L, 2, bs, H, D]`` tensor, written into ``out`` (a writable buffer of block_nbytes, e.g. an
    arena slot: one copy in total) or into a new tensor."""
    shape = (len(caches), *caches[0][:, block_id].shape)
    dtype = caches[0].dtype
    if out is None:
        dst = torch.empty(shape, dtype=dtype)
    else:
        dst = torch.frombuffer(memoryview(out), dtype=dtype).view(shape)
    for layer, c in enumerate(caches):
        dst[layer].copy_(c[:, block_id])
    return dst


def scatter_block(src: torch.Tensor, caches: list[torch.Tensor], block_id: int) -> None:
    """Wire -> engine: copy a ``[L, 2, bs, H, D]`` block into block ``block_id`` of the caches."""
    if src.shape[0] != len(caches):
        raise InvalidRequestError(f"block has {src.shape[0]} layers, the cache has {len(caches)}")
    for layer, c in enumerate(caches):
        c[:, block_id].copy_(src[layer])
