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

Soft-capping (``softcap`` = c, Gemma's ``attn_logit_softcapping``): every scaled score ``s``
becomes ``c * tanh(s / c)`` before the mask and the softmax (transformers' eager attention);
every path applies it (SDPA cannot, so capped prefills take the explicit-score path below, and
the native decode kernel caps in C).

Sliding window (``window`` = W, per layer): a query at position ``i`` attends to keys ``j`` with
``j <= i`` and ``i - j < W`` (transformers' ``sliding_window_overlay``: ``kv_idx > q_idx - W``).
When every layer is windowed the KV manager frees blocks no query can reach any more; the model
runner then passes block tables that start at the first block still needed
(``PrefillSlice.table_start`` > 0; decode masks are built from each table's start;
``AttentionMetadata.trimmed``), so a freed block is never gathered.
A full-attention layer refuses trimmed tables (it would silently lose context). Every query
sees at least its own key, so no softmax row is fully masked.

Decode backends (:mod:`engine.attention_backends`, chosen explicitly by the model runner). When
the metadata carries the decodes' key ranges (``decode_rows``), decodes read K/V in place through
their block tables with ``decode_backend``: the native C kernel (fp32 CPU,
:mod:`engine.attention_native`), the torch tile kernel (any device, :mod:`engine.attention_paged`)
or FlashInfer / flash-attn (CUDA, :mod:`engine.attention_cuda`, through the step's
``decode_plan``): no copy of the whole context, no mask. Otherwise (the ``gather`` backend) they
gather their blocks and attend with a length mask (``decode_mask``). All compute the same
attention (tests/unit/test_attention_native.py, test_attention_paged.py compare them). Prefill chunks that continue a
sequence always use the gather path: they are compute-bound, and the gather is amortised over
the chunk's queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine import attention_native, attention_paged
from engine.attention_backends import AttentionBackend


@dataclass
class PrefillSlice:
    start: int  # offset in the flattened batch
    length: int  # query tokens
    context: int  # tokens already in cache before this chunk
    block_table: torch.Tensor | None  # [n_blocks] long; None when context == 0
    table_start: int = 0  # absolute position of block_table's first slot (> 0: trimmed to a window)


@dataclass(frozen=True)
class DecodeRows:
    """The decodes' key ranges for the in-place kernel: decode ``i`` attends to key positions
    ``lo[window][i] <= p < hi[i]`` of block table ``tables[i]``, whose first slot is position
    ``first[i]``. ``lo`` has an entry per sliding window of the model and ``None`` (full
    attention, = ``first``). Validated when built (:func:`decode_rows`)."""

    tables: torch.Tensor  # [D, W] int64
    row: torch.Tensor  # [D] int64: arange(D)
    hi: torch.Tensor  # [D] int64
    first: torch.Tensor  # [D] int64
    lo: dict[int | None, torch.Tensor]  # window (None: full) -> [D] int64
    # window -> the first table column any decode needs (host ints; a missing window: 0)
    col_lo: dict[int | None, int] = field(default_factory=dict)

    def to(self, device: torch.device) -> DecodeRows:
        return DecodeRows(
            self.tables.to(device),
            self.row.to(device),
            self.hi.to(device),
            self.first.to(device),
            {w: x.to(device) for w, x in self.lo.items()},
            dict(self.col_lo),
        )


def decode_rows(
    tables: list[list[int]],
    lens: list[int],
    starts: list[int],
    windows: list[int],
    block_size: int,
    num_blocks: int,
    device: torch.device,
) -> DecodeRows:
    """:class:`DecodeRows` of decodes with block tables ``tables`` (each starting at position
    ``starts[i]``) and ``lens[i]`` tokens (the new one included). Raises ValueError for a range the
    kernel would read outside the tables or the pool with."""
    width = max(len(t) for t in tables)
    los: dict[int | None, list[int]] = {None: list(starts)}
    for w in windows:
        los[w] = [max(f, n - w) for f, n in zip(starts, lens, strict=True)]
    row = list(range(len(tables)))
    for lo in los.values():
        attention_native.check_rows(tables, row, lo, lens, starts, block_size, num_blocks)

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return DecodeRows(
        t([tb + [0] * (width - len(tb)) for tb in tables]),
        t(row),
        t(lens),
        t(starts),
        {w: t(lo) for w, lo in los.items()},
        {w: min((a - f) // block_size for a, f in zip(lo, starts, strict=True)) for w, lo in los.items()},
    )


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] long
    decode_mask: torch.Tensor | None  # [D, 1, 1, max_blocks * block_size] bool (True = attend)
    prefills: list[PrefillSlice]
    block_size: int
    # window -> decode mask of the layers with that sliding window (same shape as decode_mask)
    decode_window_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    trimmed: bool = False  # some table starts past position 0 (out-of-window blocks were freed)
    # the decodes' key ranges for the in-place kernels (None: decodes use the gather path)
    decode_rows: DecodeRows | None = None
    # the runner's decode backend (engine.attention_backends); dispatched on only with decode_rows
    decode_backend: AttentionBackend = AttentionBackend.NATIVE
    # FlashInfer / flash-attn: the step's engine.attention_cuda.DecodePlan (None otherwise)
    decode_plan: object | None = None


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    nb, bs = cache.shape[1], cache.shape[2]
    cache[0].view(nb * bs, *k.shape[1:]).index_copy_(0, slots, k)
    cache[1].view(nb * bs, *v.shape[1:]).index_copy_(0, slots, v)


def _gather(cache: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V for the given block table(s): [..., n_blocks * block_size, kvh, hd]."""
    k = cache[0][table]
    v = cache[1][table]
    return k.flatten(-4, -3), v.flatten(-4, -3)


def _grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """GQA attention with the query heads of each KV group stacked as extra query rows.

    q ``[B, n, H, hd]``, k/v ``[B, L, KVH, hd]``, mask ``[B, n, L]`` (True = attend). Avoids both
    expanding K/V per query head and SDPA's slow masked-GQA path on CPU (measured ~6x faster for
    decode). Returns ``[B, n, H, hd]``. ``softcap``: scores are soft-capped (explicit scores,
    softmax in float32, as transformers' eager attention).
    """
    b, n, h, hd = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qq = q.view(b, n, kvh, g, hd).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * n, hd)
    m = mask.unsqueeze(1).repeat(1, 1, g, 1) if g > 1 else mask.unsqueeze(1)  # [B, 1, g*n, L]
    if softcap is not None:
        s = torch.matmul(qq, k.permute(0, 2, 3, 1)) * scale  # [B, KVH, g*n, L]
        s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~m, float("-inf"))
        pr = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(pr, v.transpose(1, 2))
        return o.view(b, kvh, g, n, hd).permute(0, 3, 1, 2, 4).reshape(b, n, h, hd)
    o = F.scaled_dot_product_attention(qq, k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, scale=scale)
    return o.view(b, kvh, g, n, hd).permute(0, 3, 1, 2, 4).reshape(b, n, h, hd)


def _decode_rows(
    q: torch.Tensor,
    cache: torch.Tensor,
    md: AttentionMetadata,
    window: int | None,
    scale: float,
    softcap: float | None,
    out: torch.Tensor,
) -> None:
    """The decodes' attention through ``md.decode_rows`` with ``md.decode_backend``; raises for a
    backend that cannot serve these tensors (never falls back to another)."""
    r = md.decode_rows
    assert r is not None
    b = md.decode_backend
    if b is AttentionBackend.NATIVE:
        if not attention_native.supports(q, cache):
            raise RuntimeError(
                f"the native decode kernel cannot serve {q.dtype} tensors on {q.device} "
                f"({attention_native.unavailable_reason() or 'it needs float32 CPU tensors'})"
            )
        qd = q if q.is_contiguous() else q.contiguous()
        attention_native.paged_attention_rows(
            qd, cache[0], cache[1], r.tables, r.row, r.lo[window], r.hi, r.first, scale, out=out,
            softcap=softcap,
        )  # fmt: skip
    elif b is AttentionBackend.TORCH_PAGED:
        attention_paged.paged_decode(
            q, cache[0], cache[1], r.tables, r.row, r.lo[window], r.hi, r.first, scale, softcap, out,
            col_lo=r.col_lo.get(window, 0),
        )  # fmt: skip
    elif b in (AttentionBackend.FLASHINFER, AttentionBackend.FLASH_ATTN):
        if md.decode_plan is None:
            raise RuntimeError(f"the {b.value} decode backend needs the step's decode_plan")
        md.decode_plan.run(q, cache, window, scale, softcap, out)  # type: ignore[attr-defined]
    else:
        raise RuntimeError(f"decode_rows cannot be read by the {b.value!r} backend")


def paged_attention(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, KVH, hd]
    v: torch.Tensor,
    cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of the batch's queries over the paged cache; ``window`` is the layer's sliding
    window (None: full causal attention), ``softcap`` its scores' soft-cap (None: none)."""
    if window is None and md.trimmed:
        raise RuntimeError(
            "a full-attention layer was given block tables trimmed to a sliding window: "
            "blocks are freed only when every layer is windowed"
        )
    write_kv(cache, k, v, md.slot_mapping)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    d = md.num_decodes
    if d and md.decode_rows is not None:
        _decode_rows(q[:d], cache, md, window, scale, softcap, out[:d])
    elif d:
        if md.decode_block_tables is None or md.decode_mask is None:
            raise RuntimeError("decodes need block tables and masks for the gather path")
        kk, vv = _gather(cache, md.decode_block_tables)  # [D, L, KVH, hd]
        m = md.decode_mask if window is None else md.decode_window_masks[window]
        out[:d] = _grouped(q[:d].unsqueeze(1), kk, vv, m.view(d, 1, -1), scale, softcap).squeeze(1)
    for p in md.prefills:
        sl = slice(p.start, p.start + p.length)
        if p.context == 0 and (window is None or p.length <= window) and softcap is None:
            # every key of the chunk is inside the window: plain causal attention
            qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            ks = k[sl].transpose(0, 1).unsqueeze(0)
            vs = v[sl].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            out[sl] = o.squeeze(0).transpose(0, 1)
            continue
        total = p.context + p.length
        if p.context == 0:
            kk, vv, first = k[sl], v[sl], 0
        else:
            kk, vv = _gather(cache, p.block_table)
            first = p.table_start
            kk, vv = kk[: total - first], vv[: total - first]
        qpos = torch.arange(p.context, total, device=q.device).unsqueeze(1)
        kpos = torch.arange(first, total, device=q.device).unsqueeze(0)
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        out[sl] = _grouped(
            q[sl].unsqueeze(0), kk.unsqueeze(0), vv.unsqueeze(0), mask.unsqueeze(0), scale, softcap
        ).squeeze(0)
    return out
