"""Paged attention equals dense causal attention, for decodes, fresh prefills and continued chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata, PrefillSlice, paged_attention


def _dense(q, k, v, ctx_q_start):
    """q: [n, H, d] at positions ctx_q_start.., k/v: [L, KVH, d]; causal."""
    h, kvh = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // kvh, dim=1)
    v = v.repeat_interleave(h // kvh, dim=1)
    n, L = q.shape[0], k.shape[0]
    mask = torch.arange(L)[None, :] <= (torch.arange(n)[:, None] + ctx_q_start)
    return F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)


def test_paged_equals_dense_mixed_batch():
    torch.manual_seed(0)
    H, KVH, D, BS, NB = 4, 2, 8, 4, 64
    cache = torch.zeros(2, NB, BS, KVH, D)
    perm = torch.randperm(NB).tolist()  # scattered, non-contiguous blocks
    # sequences: two decodes (ctx 9 and 14 incl. new token), one fresh prefill (7), one continued chunk (5 ctx + 6 new)
    seqs = [(8, 1), (13, 1), (0, 7), (5, 6)]  # (tokens already cached, new tokens)
    full_k, full_v, tables = [], [], []
    for ctx, new in seqs:
        L = ctx + new
        full_k.append(torch.randn(L, KVH, D))
        full_v.append(torch.randn(L, KVH, D))
        nblk = -(-L // BS)
        tables.append([perm.pop() for _ in range(nblk)])
    # place the already-cached tokens
    for (ctx, _), k, v, t in zip(seqs, full_k, full_v, tables, strict=True):
        for p in range(ctx):
            cache[0, t[p // BS], p % BS] = k[p]
            cache[1, t[p // BS], p % BS] = v[p]
    qs, ks, vs, slots = [], [], [], []
    for (ctx, new), k, v, t in zip(seqs, full_k, full_v, tables, strict=True):
        qs.append(torch.randn(new, H, D))
        ks.append(k[ctx:])
        vs.append(v[ctx:])
        slots += [t[p // BS] * BS + p % BS for p in range(ctx, ctx + new)]
    width = max(len(t) for t in tables[:2])
    dec_tab = torch.tensor([t + [0] * (width - len(t)) for t in tables[:2]])
    lens = torch.tensor([9, 14])
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        num_decodes=2,
        decode_block_tables=dec_tab,
        decode_mask=(torch.arange(width * BS)[None] < lens[:, None])[:, None, None, :],
        prefills=[PrefillSlice(2, 7, 0, None), PrefillSlice(9, 6, 5, torch.tensor(tables[3]))],
        block_size=BS,
    )
    out = paged_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cache, md, scale=D**-0.5)
    off = 0
    for (ctx, new), q, k, v in zip(seqs, qs, full_k, full_v, strict=True):
        ref = _dense(q, k, v, ctx)
        torch.testing.assert_close(out[off : off + new], ref, atol=1e-5, rtol=1e-5)
        off += new
