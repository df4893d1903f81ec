"""Batched multi-LoRA application (Punica's SGMV semantics in torch).

A :class:`LoRALinear` wraps one engine ``nn.Linear`` (possibly fused: q/k/v, gate/up) and adds,
to each token's base output, the low-rank update of *that token's* adapter:
``y[t] = base(x)[t] + x[t] @ A[s_t]^T @ B[s_t]^T`` where ``s_t`` is the token's adapter slot
(no update for base-model tokens). The adapters' weights live in fixed slots (``lora_a``
``[S, n*R, in]``, ``lora_b`` ``[S, n*R, out]``: ``n`` targets of the fused module, rank padded to
``R`` with zeros; B carries the module's scale and sits in its target's output columns).

One forward serves the whole mixed batch: the batch's adapter tokens are grouped by slot once per
step (:class:`LoRABatchContext`: a permutation and one segment per adapter, SGMV's segments), and
each module does, per segment, a shrink ``x_seg @ A[s]^T`` and an expand ``@ B[s]`` on views of
the slot buffers (nothing is copied or merged; each token computes only its own adapter), then
adds the segments' updates back in place. When the adapter tokens are already grouped (e.g. the
whole batch on one adapter) no permutation is made. Base weights are never modified; an inactive
context (no adapter in the batch) costs one attribute check per module.

On the CPU in float32, where :mod:`engine.lora.sgmv_native` builds, each module instead makes one
native call for the whole batch: shrink and expand fused per token, segment by segment, adding
only each target's block of a fused module's ``B`` straight into the base output (no gather, no
scatter, no torch call per segment). The segments and the kernel's index tensors are built once
per step and reused, unchanged, while the batch's slot list stays the same (steady decoding);
the index is checked when it is built.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.lora import sgmv_native


class LoRABatchContext:
    """The adapter slot of every token of the current forward (shared by all LoRALinear).

    ``segments``: ``(slot, lo, hi)`` per adapter of the batch: rows ``lo:hi`` of the grouped
    adapter tokens use ``slot``. ``perm``: the batch rows of the grouped tokens, in segment order
    (None when the segments are already row ranges of the batch: then ``lo:hi`` are batch rows).
    ``expected_ids`` (the batch's token ids, in forward order) lets the model's pre-forward hook
    check that the forward it sees is the batch the context was built for. The layout of the
    last slot list (segments, perm and the native index) is kept and reused when the next step
    has the same slot list."""

    def __init__(self) -> None:
        self.active = False
        self.segments: list[tuple[int, int, int]] = []
        self.perm: torch.Tensor | None = None
        self.whole = False  # one segment covering every row of the batch
        self.expected_ids: list[int] = []
        self.slot_per_token: list[int] = []  # as given to set() (a tensor-parallel rank 0 sends it)
        self._key: list[int] | None = None  # the slot list the layout below was built for
        self._layout: tuple[list[tuple[int, int, int]], torch.Tensor | None, bool] = ([], None, False)
        self._native: tuple[torch.Tensor, torch.Tensor, int] | None = None  # rows, segments, max slot

    def set(self, slot_per_token: list[int], ids: list[int], device: torch.device) -> None:
        """Build the context from each token's slot (-1: base model)."""
        self.clear()
        self.expected_ids = ids
        self.slot_per_token = slot_per_token
        if slot_per_token != self._key:
            self._key = list(slot_per_token)
            self._layout = _layout(slot_per_token, device)
            self._native = None
        self.segments, self.perm, self.whole = self._layout
        self.active = bool(self.segments)

    def native_index(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The native kernel's ``(rows, segments, max slot)`` for this step: CPU int64 rows of
        the adapter tokens in segment order and ``[n, 3]`` ``(slot, lo, hi)`` into them; checked
        (every row a batch row, every slot >= 0) when built, once per slot list."""
        if self._native is None:
            if self.perm is None:
                rows = [i for _, lo, hi in self.segments for i in range(lo, hi)]
            else:
                rows = self.perm.tolist()
            segs, k = [], 0
            for s, lo, hi in self.segments:
                segs.append((s, k, k + hi - lo))
                k += hi - lo
            r = torch.tensor(rows, dtype=torch.int64)
            t = torch.tensor(segs, dtype=torch.int64).reshape(-1, 3)
            top = max(s for s, _, _ in segs)
            sgmv_native.check_index(r, t, len(self.slot_per_token), top + 1)
            self._native = (r, t, top)
        return self._native

    def clear(self) -> None:
        """End the step (the layout is kept for a next step with the same slot list)."""
        self.active = False
        self.segments = []
        self.perm = None
        self.whole = False
        self.expected_ids = []
        self.slot_per_token = []


def _layout(
    slot_per_token: list[int], device: torch.device
) -> tuple[list[tuple[int, int, int]], torch.Tensor | None, bool]:
    """``(segments, perm, whole)`` of a slot list (see :class:`LoRABatchContext`)."""
    runs: list[tuple[int, int, int]] = []  # maximal runs of one slot, in batch order
    for i, s in enumerate(slot_per_token):
        if s < 0:
            continue
        if runs and runs[-1][0] == s and runs[-1][2] == i:
            runs[-1] = (s, runs[-1][1], i + 1)
        else:
            runs.append((s, i, i + 1))
    if not runs:
        return [], None, False
    if len({s for s, _, _ in runs}) == len(runs):  # one run per adapter: rows as they are
        return runs, None, len(runs) == 1 and runs[0][1:] == (0, len(slot_per_token))
    rows: list[int] = []
    segments = []
    for s in sorted({s for s, _, _ in runs}):
        lo = len(rows)
        rows.extend(i for i, t in enumerate(slot_per_token) if t == s)
        segments.append((s, lo, len(rows)))
    return segments, torch.tensor(rows, dtype=torch.long, device=device), False


class LoRALinear(nn.Module):
    """``base`` plus the per-token LoRA update of the adapter slots (see module doc).

    ``lora_a``/``lora_b`` are buffers written by the adapter manager (engine.lora.manager).
    ``cols``: the output columns ``(offset, count)`` of each target (fused modules: the block of
    ``B`` target ``j`` writes); None: every target may write every column. ``native``: use the
    native kernel where it can run (CPU, float32, built); False: torch's matmuls always."""

    def __init__(
        self,
        base: nn.Linear,
        ctx: LoRABatchContext,
        num_slots: int,
        num_targets: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        cols: list[tuple[int, int]] | None = None,
        native: bool = True,
    ) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.rank = rank
        self.num_slots = num_slots
        self.width = num_targets * rank
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, self.width, base.in_features, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_b", torch.zeros(num_slots, self.width, base.out_features, dtype=dtype, device=device)
        )
        if cols is None:
            cols = [(0, base.out_features)] * num_targets
        self._targets = sgmv_native.targets_table(num_targets, rank, cols)
        sgmv_native.check_targets(self._targets, self.width, self.out_features)
        self.native = native
        self._make_views()

    def _make_views(self) -> None:
        """Per-slot views (A^T ``[in, n*R]``, B ``[n*R, out]``), made once: the manager writes
        the slot buffers in place; a ``.to()``/``_apply`` that replaces them remakes the views."""
        self._at = [a.t() for a in self.lora_a]
        self._b = list(self.lora_b)
        a, b = self.lora_a, self.lora_b
        self._kernel = (
            sgmv_native.kernel()
            if a.device.type == "cpu" and a.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
            else None
        )

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's signature
        super()._apply(fn, recurse)
        self._make_views()
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (unchanged: LoRA is never merged)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_update(x, self.base(x))

    def add_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (``self.base(x)``, however computed: :func:`engine.models.gemm.project` computes
        it itself for large batches) plus the low-rank update of each row's adapter slot; may
        update ``out`` in place."""
        ctx = self.ctx
        if not ctx.active:
            return out
        lib = self._kernel
        if (
            lib is not None
            and self.native
            and x.dtype == torch.float32
            and x.dim() == 2
            and x.stride(1) == 1
            and out.stride(1) == 1
            and x.device.type == "cpu"
        ):
            rows, segs, top = ctx.native_index()
            if x.shape[0] != len(ctx.slot_per_token) or top >= self.num_slots:
                raise RuntimeError(
                    f"LoRA context of {len(ctx.slot_per_token)} tokens (slots up to {top}) applied to "
                    f"{x.shape[0]} rows with {self.num_slots} slots"
                )
            return sgmv_native.call(lib, out, x, self.lora_a, self.lora_b, rows, segs, self._targets)
        at, b = self._at, self._b
        if ctx.perm is None:  # each adapter's tokens are one row range of the batch
            if ctx.whole:
                s = ctx.segments[0][0]
                return out.addmm_(x @ at[s], b[s])
            for s, lo, hi in ctx.segments:
                out[lo:hi].addmm_(x[lo:hi] @ at[s], b[s])
            return out
        xs = x.index_select(0, ctx.perm)
        ys = torch.empty(xs.shape[0], self.out_features, dtype=out.dtype, device=out.device)
        for s, lo, hi in ctx.segments:
            torch.mm(xs[lo:hi] @ at[s], b[s], out=ys[lo:hi])
        return out.index_add_(0, ctx.perm, ys)
