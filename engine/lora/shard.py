"""The adapter slots inside one model, or inside one tensor-parallel shard of it.

:class:`LoRAShard` does the module surgery (every projection a target lives in becomes a
:class:`~engine.lora.layers.LoRALinear` around the original ``nn.Linear``), owns the per-step
:class:`~engine.lora.layers.LoRABatchContext` and writes an adapter's weights into a slot. The
engine's :class:`~engine.lora.manager.LoRAManager` (registry, tiers, slot policy) drives one on
rank 0; each follower rank of a tensor-parallel engine (engine.tp_runner) builds its own from
rank 0's ``lora_init`` command and mirrors rank 0's slot writes and per-step slot lists, each rank
keeping its part of every adapter (:func:`engine.lora.targets.shard_weights`).

A pre-forward hook on the model checks that the forward it sees is the batch the context was
built for (same token ids in the same order) and raises otherwise, so a change of the runner's
batch order can never apply an adapter to the wrong tokens silently.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from engine.lora.layers import LoRABatchContext, LoRALinear
from engine.lora.targets import TargetMap, shard_weights

AdapterWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # hf target name -> (A [r, in], B [out, r])


class LoRAShard:
    def __init__(
        self,
        model: nn.Module,
        targets: TargetMap,
        num_slots: int,
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        """Wrap ``model``'s target projections (``targets``: this shard's local targets, made by
        :func:`~engine.lora.targets.target_map` before any wrapping) with ``num_slots`` slots of
        rank ``rank``."""
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tensor-parallel rank {tp_rank} not in [0, {tp_size})")
        self.targets = targets
        self.rank = rank
        self.device = device
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.ctx = LoRABatchContext()
        self.modules: dict[str, LoRALinear] = {}
        for path, group in targets.modules.items():
            parent_path, leaf = path.rsplit(".", 1)
            parent = model.get_submodule(parent_path)
            cols = [(t.out_offset, t.out_features) for t in group]  # the block of B each target writes
            wrapped = LoRALinear(
                getattr(parent, leaf), self.ctx, num_slots, len(group), rank, dtype, device, cols
            )
            setattr(parent, leaf, wrapped)
            self.modules[path] = wrapped
        model.register_forward_pre_hook(self._check_forward)

    @torch.inference_mode()
    def write_slot(self, slot: int, weights: AdapterWeights) -> None:
        """Put one adapter (the *whole* model's ``A``/``B`` per target, scale folded into B; a
        target absent from ``weights`` is not adapted) into ``slot``, this shard's part of it."""
        r_cap = self.rank
        for path, group in self.targets.modules.items():
            m = self.modules[path]
            m.lora_a[slot].zero_()
            m.lora_b[slot].zero_()
            for j, t in enumerate(group):
                w = weights.get(t.hf_name)
                if w is None:
                    continue
                wa, wb = shard_weights(t, w[0], w[1], self.tp_rank, self.tp_size)
                r = wa.shape[0]
                if r > r_cap:
                    raise ValueError(f"{t.hf_name}: rank {r} exceeds the slots' rank {r_cap}")
                lo = j * r_cap
                m.lora_a[slot, lo : lo + r].copy_(wa)
                m.lora_b[slot, lo : lo + r, t.out_offset : t.out_offset + t.out_features].copy_(wb.t())

    def begin(self, slot_per_token: list[int], ids: list[int]) -> None:
        """Set the context of the next forward (each token's slot, -1: base model)."""
        self.ctx.set(slot_per_token, ids, self.device)

    def end(self) -> None:
        self.ctx.clear()

    def _check_forward(self, _module: nn.Module, args: tuple) -> None:
        if not self.ctx.active:
            return
        ids = args[0]
        exp = self.ctx.expected_ids
        if ids.shape[0] != len(exp) or not torch.equal(
            ids, torch.tensor(exp, dtype=ids.dtype, device=ids.device)
        ):
            raise RuntimeError(
                "LoRA batch context does not match the forward's tokens: the model runner's batch order "
                "changed (engine.lora.manager.forward_order must follow it)"
            )
