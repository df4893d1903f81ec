"""Paged attention in plain torch (PagedAttention semantics, CPU and CUDA).

The KV cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(index 0 = K, 1 = V). A token at absolute position ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

A batch is flattened: all decode tokens first (one per sequence), then each prefill chunk's
tokens contiguously. Each layer first writes the batch's new K/V into their slots, then:

* decodes attend, batched, to the gathered blocks of their sequences with a length mask;
* a prefill chunk with no earlier context attends causally to its own fresh K/V;
* a prefill chunk that continues a sequence (chunked prefill, prefix-cache hit) attends to the
  gathered blocks with a causal mask offset by the context length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSlice:
    start: int  # offset in the flattened batch
    length: int  # query tokens
    context: int  # tokens already in cache before this chunk
    block_table: torch.Tensor | None  # [n_blocks] long; None when context == 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] long
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_blocks * block_size] bool (True = attend)
    prefills: list[PrefillSlice]
    block_size: int


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    nb, bs = cache.shape[1], cache.shape[2]
    cache[0].view(nb * bs, *k.shape[1:]).index_copy_(0, slots, k)
    cache[1].view(nb * bs, *v.shape[1:]).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V for the given block table(s): [..., n_blocks * block_size, kvh, hd]."""
    k = cache[0][table]
    v = cache[1][table]
    return k.flatten(-4, -3), v.flatten(-4, -3)


def paged_attention(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, KVH, hd]
    v: torch.Tensor,
    cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    write_kv(cache, k, v, md.slot_mapping)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    d = md.num_decodes
    if d:
        kk, vv = _gather(cache, md.decode_block_tables)  # [D, L, KVH, hd]
        o = F.scaled_dot_product_attention(
            q[:d].unsqueeze(2),  # [D, H, 1, hd]
            kk.transpose(1, 2),
            vv.transpose(1, 2),
            attn_mask=md.decode_mask,
            scale=scale,
            enable_gqa=gqa,
        )
        out[:d] = o.squeeze(2)
    for p in md.prefills:
        qs = q[p.start : p.start + p.length].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
        if p.context == 0:
            ks = k[p.start : p.start + p.length].transpose(0, 1).unsqueeze(0)
            vs = v[p.start : p.start + p.length].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            total = p.context + p.length
            kk, vv = _gather(cache, p.block_table)
            ks = kk[:total].transpose(0, 1).unsqueeze(0)
            vs = vv[:total].transpose(0, 1).unsqueeze(0)
            qpos = torch.arange(p.context, total, device=q.device).unsqueeze(1)
            kpos = torch.arange(total, device=q.device).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=(kpos <= qpos), scale=scale, enable_gqa=gqa
            )
        out[p.start : p.start + p.length] = o.squeeze(0).transpose(0, 1)
    return out
