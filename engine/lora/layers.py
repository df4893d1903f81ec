"""Batched multi-LoRA application (Punica's BGMV/SGMV semantics in torch).

A :class:`LoRALinear` wraps one engine ``nn.Linear`` (possibly fused: q/k/v, gate/up) and adds,
to each token's base output, the low-rank update of *that token's* adapter:
``y[t] = base(x)[t] + x[t] @ A[s_t]^T @ B[s_t]^T`` where ``s_t`` is the token's adapter slot
(no update for base-model tokens). The adapters' weights live in fixed slots (``lora_a``
``[S, n*R, in]``, ``lora_b`` ``[S, n*R, out]``: ``n`` targets of the fused module, rank padded to
``R`` with zeros; B carries the module's scale and sits in its target's output columns).

One forward serves the whole mixed batch with a fixed number of kernels, whatever the mix:
the ``K`` slots the batch uses are gathered once (``index_select``), the shrink ``x @ A^T``
covers them all, each token keeps only its own slot's columns (``masked_fill``), and one expand
matmul adds the update in place. Base weights are never modified. The batch's slot assignment
is read from a shared :class:`LoRABatchContext` that the engine sets before each forward; an
inactive context (no adapter in the batch) costs nothing beyond one attribute check.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRABatchContext:
    """The adapter slot of every token of the current forward (shared by all LoRALinear).

    ``slots``: the ``K`` slot indices the batch uses ``[K]`` (long); ``drop``: ``[T, K, 1]`` bool,
    False only where token ``t`` uses the batch's ``k``-th slot (a base token drops every slot);
    ``mask_needed``: False when every token uses the single slot (the mask is then skipped).
    ``expected_ids`` (the batch's token ids, in forward order) lets the model's pre-forward hook
    check that the forward it sees is the batch the context was built for."""

    def __init__(self) -> None:
        self.active = False
        self.slots: torch.Tensor | None = None
        self.drop: torch.Tensor | None = None
        self.mask_needed = True
        self.expected_ids: list[int] = []

    def set(self, slot_per_token: list[int], ids: list[int], device: torch.device) -> None:
        """Build the context from each token's slot (-1: base model)."""
        used = sorted({s for s in slot_per_token if s >= 0})
        self.expected_ids = ids
        if not used:
            self.clear()
            self.expected_ids = ids
            return
        col = {s: k for k, s in enumerate(used)}
        t = len(slot_per_token)
        keep = torch.zeros(t, len(used), 1, dtype=torch.bool)
        rows = [i for i, s in enumerate(slot_per_token) if s >= 0]
        keep[rows, [col[slot_per_token[i]] for i in rows], 0] = True
        self.slots = torch.tensor(used, dtype=torch.long, device=device)
        self.drop = (~keep).to(device)
        self.mask_needed = not (len(used) == 1 and len(rows) == t)
        self.active = True

    def clear(self) -> None:
        self.active = False
        self.slots = None
        self.drop = None
        self.mask_needed = True
        self.expected_ids = []


class LoRALinear(nn.Module):
    """``base`` plus the per-token LoRA update of the adapter slots (see module doc).

    ``lora_a``/``lora_b`` are buffers written by the adapter cache (engine.lora.cache)."""

    def __init__(
        self,
        base: nn.Linear,
        ctx: LoRABatchContext,
        num_slots: int,
        num_targets: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.rank = rank
        self.width = num_targets * rank
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, self.width, base.in_features, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_b", torch.zeros(num_slots, self.width, base.out_features, dtype=dtype, device=device)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (unchanged: LoRA is never merged)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ctx = self.ctx
        if not ctx.active:
            return out
        slots = ctx.slots
        k = slots.shape[0]
        a = self.lora_a.index_select(0, slots).reshape(k * self.width, self.in_features)
        h = x @ a.t()  # [T, K*n*R]: shrink for every slot of the batch
        if ctx.mask_needed:
            h = h.view(x.shape[0], k, self.width).masked_fill_(ctx.drop, 0).view(x.shape[0], k * self.width)
        b = self.lora_b.index_select(0, slots).reshape(k * self.width, self.out_features)
        return out.addmm_(h, b)
