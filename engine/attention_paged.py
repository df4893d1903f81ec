"""Paged decode attention in plain torch that reads the cache through block tables, tile by tile.

The gather path of :mod:`engine.attention` copies every decode's whole context into a fresh tensor
for every layer and step. This kernel walks the block-table columns instead, ``tile_tokens``
keys at a time, for all decode rows at once: each tile gathers only its ``[rows, tile]`` keys and
values, scores them and folds them into a running (flash-style, online) softmax: a running
maximum ``m``, denominator ``l`` and weighted sum ``acc`` per (row, query head), rescaled by
``exp(m_old - m_new)`` when the maximum grows. Memory per step is one tile per row, whatever the
context length. Scores, softmax and accumulation are float32 whatever the cache's dtype.

It is written for any device: the same code runs on CPU tensors in the unit tests (golden against
the gather path and the native kernel) and on CUDA, where it is also capturable in a CUDA graph
(no host synchronisation; the loop bounds depend only on the tables' width and ``col_lo``).

Contract of :func:`paged_decode` (the same rows as :func:`engine.attention_native.paged_attention_rows`):
``q`` ``[T, H, hd]``, ``k_cache``/``v_cache`` ``[num_blocks, block_size, KVH, hd]`` (one layer),
``tables`` ``[R, W]`` int64, ``row`` ``[T]`` the table of each query, ``lo``/``hi``/``first``
``[T]``: the query attends to key positions ``lo <= p < hi`` of its table, whose first slot is
position ``first`` (``hi > lo``). Index data is trusted (``engine.attention.decode_rows`` checks
it). ``softcap`` (None: none): each scaled score ``s`` becomes ``softcap * tanh(s / softcap)``.
``col_lo``: the first table column any row needs (columns before it are skipped; 0 is always
correct). Slots outside a row's range are read (a tile is whole blocks) but never contribute,
even when they hold NaN or inf.
"""

from __future__ import annotations

import torch

TILE_TOKENS = 256  # keys per tile (rounded to whole blocks)


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    row: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    first: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    col_lo: int = 0,
    tile_tokens: int = TILE_TOKENS,
) -> torch.Tensor:
    """Attention of each query row over its key range (see the module docstring); writes and
    returns ``out`` (``[T, H, hd]``, ``q``'s dtype) when given."""
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")
    t, h, d = q.shape
    _, bs, kvh, d2 = k_cache.shape
    if d2 != d or h % kvh or v_cache.shape != k_cache.shape:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, cache {tuple(k_cache.shape)}")
    if tables.dim() != 2 or any(x.shape != (t,) for x in (row, lo, hi, first)):
        raise ValueError(f"tables must be [R, W] and row/lo/hi/first [{t}]")
    if out is None:
        out = torch.empty_like(q)
    g = h // kvh
    dev = q.device
    tab = tables.index_select(0, row)  # [T, W]
    width = tab.shape[1]
    cols = max(1, tile_tokens // bs)
    qf = (q.float() * scale).view(t, kvh, g, d)
    m = torch.full((t, kvh, g), float("-inf"), device=dev)
    den = torch.zeros((t, kvh, g), device=dev)
    acc = torch.zeros((t, kvh, g, d), device=dev)
    offs = torch.arange(cols * bs, device=dev)
    lo2, hi2, first2 = lo.unsqueeze(1), hi.unsqueeze(1), first.unsqueeze(1)
    for c0 in range(col_lo, width, cols):
        c1 = min(width, c0 + cols)
        n = (c1 - c0) * bs
        blk = tab[:, c0:c1]  # [T, C]
        kk = k_cache[blk].view(t, n, kvh, d).permute(0, 2, 3, 1).float()  # [T, KVH, hd, n]
        pos = first2 + (c0 * bs) + offs[:n]  # [T, n]
        valid = ((pos >= lo2) & (pos < hi2)).view(t, 1, 1, n)
        # slots outside the range (a tile's tail, stale blocks) may hold anything: zero them, as a
        # zero weight times a non-finite value would still be NaN
        vv = v_cache[blk].view(t, n, kvh, d).permute(0, 2, 1, 3).float()  # [T, KVH, n, hd]
        vv = vv.masked_fill(~valid.view(t, 1, n, 1), 0.0)
        s = torch.matmul(qf, kk)  # [T, KVH, g, n]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~valid, float("-inf"))
        m_new = torch.maximum(m, s.amax(dim=-1))
        # -inf only while a row has seen no key yet: subtract 0 there (exp(-inf) = 0, no NaN)
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        corr = torch.exp(m - m_safe)
        den = den * corr + p.sum(dim=-1)
        acc = acc * corr.unsqueeze(-1) + torch.matmul(p, vv)
        m = m_new
    o = acc / den.unsqueeze(-1)
    out.copy_(o.view(t, h, d))
    return out
