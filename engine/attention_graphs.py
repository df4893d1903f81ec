"""Decode steps replayed from CUDA graphs, one per (batch-size bucket, table-width bucket).

A step whose every request is a plain decode (one new token, no drafts, no prefill) and whose
batch fits the largest bucket runs through static input buffers: the batch is padded to the
smallest batch bucket ``>= n`` (:func:`batch_buckets`: 1, 2, 4, then multiples of 8, as vLLM's
capture sizes) and its block tables to a power-of-two width (:func:`width_bucket`), the buffers
are overwritten in place and the bucket's graph (the model's forward up to the final norm, decode
attention by the ``torch_paged`` backend, whose loop bounds depend only on the static width) is
replayed; logits and sampling stay eager on the real rows. Other steps run eagerly.

Padding rows are inert: token 0 at position 0, its K/V written to a scratch block that the model
runner adds to its cache and the KV manager never hands out; its table is that block alone, its
key range ``[0, 1)``; its output row is dropped. Real rows' tables are padded with the scratch
block too (beyond their key range: never read).

:func:`batch_buckets`, :func:`bucket_for`, :func:`width_bucket` and :func:`pad_decode` are pure;
:class:`DecodeGraphs` owns the buffers and graphs. ``GraphMode.EAGER`` runs the very same padded
static buffers without capturing (no CUDA needed): the CPU unit tests use it to prove the padding
exact; ``GraphMode.CUDA`` captures and replays (tests/gpu/test_attention_cuda.py compares replay
with eager decoding).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.attention import AttentionMetadata, DecodeRows
from engine.attention_backends import AttentionBackend


class GraphMode(enum.Enum):
    CUDA = "cuda"  # capture each bucket's forward once, replay it
    EAGER = "eager"  # the same padded static buffers, run eagerly (the CPU test of the padding)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: 1, 2, 4, then every multiple of 8, up to and
    including ``max_batch`` (which is always the last bucket)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return (*out, max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding ``n`` rows (None: more rows than the largest bucket)."""
    if n < 1:
        raise ValueError(f"a decode batch has at least one row, got {n}")
    return next((b for b in buckets if b >= n), None)


def width_bucket(width: int, max_width: int) -> int:
    """The table width a batch whose longest table has ``width`` blocks is padded to: the next
    power of two, capped at ``max_width`` (the blocks of the longest sequence the engine admits)."""
    if not 1 <= width <= max_width:
        raise ValueError(f"table width {width} outside [1, {max_width}]")
    return min(1 << (width - 1).bit_length(), max_width)


@dataclass(frozen=True)
class DecodeBatch:
    """A plain-decode step's inputs, one entry per request (host lists)."""

    ids: list[int]
    pos: list[int]
    slots: list[int]
    tables: list[list[int]]  # each request's block table, starting at position ``starts[i]``
    lens: list[int]  # tokens in cache after this step's write (the new one included)
    starts: list[int]


@dataclass(frozen=True)
class PaddedDecode:
    """A :class:`DecodeBatch` padded to ``bucket`` rows and tables of ``width`` blocks, with each
    sliding window's lower key bound (None: full attention)."""

    n: int  # real rows (the first n)
    ids: list[int]
    pos: list[int]
    slots: list[int]
    tables: list[list[int]]
    lens: list[int]
    starts: list[int]
    lo: dict[int | None, list[int]] = field(default_factory=dict)


def pad_decode(
    batch: DecodeBatch, bucket: int, width: int, windows: list[int], scratch_block: int, block_size: int
) -> PaddedDecode:
    """``batch`` padded with inert rows (see the module docstring) to ``bucket`` rows, every table
    padded with ``scratch_block`` to ``width`` blocks. Raises ValueError when it does not fit."""
    n = len(batch.ids)
    if n > bucket:
        raise ValueError(f"{n} rows do not fit a bucket of {bucket}")
    if any(len(t) > width for t in batch.tables):
        raise ValueError(f"a block table is wider than {width} blocks")
    pad = bucket - n
    lens = batch.lens + [1] * pad
    starts = batch.starts + [0] * pad
    lo: dict[int | None, list[int]] = {None: list(starts)}
    for w in windows:
        lo[w] = [max(f, ln - w) for f, ln in zip(starts, lens, strict=True)]
    return PaddedDecode(
        n,
        batch.ids + [0] * pad,
        batch.pos + [0] * pad,
        batch.slots + [scratch_block * block_size] * pad,
        [t + [scratch_block] * (width - len(t)) for t in batch.tables] + [[scratch_block] * width] * pad,
        lens,
        starts,
        lo,
    )


class _Entry:
    """One (batch bucket, width bucket)'s static buffers, metadata and (CUDA) graph."""

    def __init__(
        self, bucket: int, width: int, windows: list[int], block_size: int, trimmed: bool, dev: torch.device
    ) -> None:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=dev)

        self.ids, self.pos, self.slots = z(bucket), z(bucket), z(bucket)
        self.tables, self.hi, self.first = z(bucket, width), z(bucket), z(bucket)
        self.lo = {w: z(bucket) for w in [None, *windows]}
        rows = DecodeRows(self.tables, torch.arange(bucket, device=dev), self.hi, self.first, self.lo)
        self.md = AttentionMetadata(
            slot_mapping=self.slots,
            num_decodes=bucket,
            decode_block_tables=None,
            decode_mask=None,
            prefills=[],
            block_size=block_size,
            trimmed=trimmed,
            decode_rows=rows,
            decode_backend=AttentionBackend.TORCH_PAGED,
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def fill(self, p: PaddedDecode) -> None:
        def put(dst: torch.Tensor, src: list) -> None:
            dst.copy_(torch.tensor(src, dtype=torch.long))  # in place: the graph reads these

        put(self.ids, p.ids)
        put(self.pos, p.pos)
        put(self.slots, p.slots)
        put(self.tables, p.tables)
        put(self.hi, p.lens)
        put(self.first, p.starts)
        for w, x in self.lo.items():
            put(x, p.lo[w])


class DecodeGraphs:
    """Padded, bucketed decode forwards of ``model`` over ``kv_cache`` (whose block
    ``scratch_block`` is reserved for padding). Buckets are captured lazily, on first use."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        block_size: int,
        windows: list[int],
        max_batch: int,
        max_width: int,
        scratch_block: int,
        trimmed: bool,
        mode: GraphMode,
    ) -> None:
        if mode is GraphMode.CUDA and kv_cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the KV cache on a CUDA device, not {kv_cache.device}")
        if scratch_block >= kv_cache.shape[2]:
            raise ValueError(f"scratch block {scratch_block} is outside the cache")
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.windows = list(windows)
        self.buckets = batch_buckets(max_batch)
        self.max_width = max_width
        self.scratch_block = scratch_block
        self.trimmed = trimmed
        self.mode = mode
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._pool: object | None = None
        self.replays = 0  # steps served by this object (tests and stats)

    def forward(self, batch: DecodeBatch) -> torch.Tensor | None:
        """Hidden states ``[n, hidden]`` of the batch's rows, or None when the batch is larger
        than the largest bucket (the caller runs it eagerly)."""
        n = len(batch.ids)
        b = bucket_for(n, self.buckets)
        if b is None:
            return None
        w = width_bucket(max(len(t) for t in batch.tables), self.max_width)
        e = self._entries.get((b, w))
        if e is None:
            e = self._entries[(b, w)] = self._build(b, w)
        e.fill(pad_decode(batch, b, w, self.windows, self.scratch_block, self.block_size))
        self.replays += 1
        if e.graph is None:  # GraphMode.EAGER
            return self.model(e.ids, e.pos, self.kv_cache, e.md)[:n]
        e.graph.replay()
        assert e.out is not None
        return e.out[:n]

    def _build(self, bucket: int, width: int) -> _Entry:
        e = _Entry(bucket, width, self.windows, self.block_size, self.trimmed, self.kv_cache.device)
        empty = DecodeBatch([], [], [], [], [], [])
        e.fill(pad_decode(empty, bucket, width, self.windows, self.scratch_block, self.block_size))
        if self.mode is GraphMode.CUDA:
            self._capture(e)
        return e

    def _capture(self, e: _Entry) -> None:
        """Warm up on a side stream, then capture (the buffers hold padding rows only: warm-up
        and capture write K/V to the scratch block alone)."""
        dev = self.kv_cache.device
        torch.cuda.synchronize(dev)
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model(e.ids, e.pos, self.kv_cache, e.md)
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g, pool=self._pool):
                e.out = self.model(e.ids, e.pos, self.kv_cache, e.md)
        except RuntimeError as err:
            raise RuntimeError(
                f"capturing the decode CUDA graph for batch {e.ids.shape[0]} failed ({err}); "
                "run with cuda_graph=False"
            ) from err
        if self._pool is None:
            self._pool = g.pool()
        e.graph = g
