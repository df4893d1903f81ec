"""Which projections of a loaded model a LoRA adapter may target, under their HF names.

PEFT names a target by its module path in the HF model (``model.layers.3.self_attn.q_proj``).
The engine fuses q/k/v into one ``qkv`` Linear and gate/up into one ``gate_up`` Linear at load
time (engine.models.llama), so one engine module may hold several HF targets, each an output
column range of it. :func:`target_map` lists them for the families LoRA is implemented for.

Tensor parallelism (engine.models.tp_shard): on a shard, :func:`target_map` gives the *local*
targets (the shard's output rows of a column-parallel module, its input columns of a
row-parallel one). :func:`whole_map` gives the whole model's targets (what a PEFT adapter's
shapes are checked against) and :func:`shard_weights` cuts one adapter target's ``(A, B)`` to a
rank: column-parallel targets (q/k/v/gate/up, Phi-3's fused qkv/gate_up) keep B's rows of the
rank's output columns with A whole; row-parallel targets (o/down) keep A's columns of the
rank's input columns with B whole, so their per-rank updates are partial sums that the layer's
existing all-reduce adds up with the base output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from pdserve.errors import InvalidRequestError

# families whose HF modules are q/k/v/o_proj + gate/up/down_proj (phi3: qkv_proj + gate_up_proj)
_SPLIT = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text"})
_FUSED = frozenset({"phi3"})
SUPPORTED_MODEL_TYPES = _SPLIT | _FUSED
# targets whose engine module is row parallel under tensor parallelism (input columns sharded)
ROW_PARALLEL = frozenset({"o_proj", "down_proj"})


@dataclass(frozen=True)
class Target:
    """One HF projection a LoRA may target.

    ``module`` is the engine module that computes it, ``out_offset`` the first of its
    ``out_features`` output columns inside that module's output."""

    hf_name: str
    kind: str  # the HF leaf name: q_proj, ..., down_proj (qkv_proj/gate_up_proj for phi3)
    layer: int
    module: str
    in_features: int
    out_features: int
    out_offset: int
    # widths of the consecutive blocks a tensor-parallel shard cuts separately (Phi-3's fused
    # qkv_proj: q, k, v; gate_up_proj: gate, up); () means one block (the whole output)
    parts: tuple[int, ...] = ()

    @property
    def row_parallel(self) -> bool:
        return self.kind in ROW_PARALLEL


@dataclass(frozen=True)
class TargetMap:
    """Every target of a model: ``targets`` by HF name; ``modules`` (engine module path ->
    its targets in output order)."""

    model_type: str
    targets: dict[str, Target]
    modules: dict[str, tuple[Target, ...]]

    @property
    def kinds(self) -> list[str]:
        return sorted({t.kind for t in self.targets.values()})


def _linear(parent: nn.Module, name: str) -> nn.Linear | None:
    m = getattr(parent, name, None)
    return m if isinstance(m, nn.Linear) else None


def target_map(model: nn.Module, model_type: str) -> TargetMap:
    """The LoRA targets of ``model`` (an engine model of ``model_type``). Raises
    InvalidRequestError for a family LoRA is not implemented for (MoE experts: refused)."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidRequestError(
            f"LoRA adapters are not supported for model type {model_type!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    targets: dict[str, Target] = {}
    modules: dict[str, tuple[Target, ...]] = {}

    def add(
        layer: int,
        prefix: str,
        mod_name: str,
        parts: list[tuple[str, int] | tuple[str, int, tuple[int, ...]]],
    ) -> None:
        lin = getattr(prefix_mod[prefix], mod_name)
        path = f"model.layers.{layer}.{prefix}.{mod_name}"
        off = 0
        group = []
        for kind, width, *blocks in parts:
            t = Target(
                hf_name=f"model.layers.{layer}.{prefix}.{kind}",
                kind=kind,
                layer=layer,
                module=path,
                in_features=lin.in_features,
                out_features=width,
                out_offset=off,
                parts=tuple(blocks[0]) if blocks else (),
            )
            off += width
            targets[t.hf_name] = t
            group.append(t)
        if off != lin.out_features:
            raise RuntimeError(f"{path}: targets cover {off} of {lin.out_features} output columns")
        modules[path] = tuple(group)

    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix_mod = {"self_attn": attn, "mlp": mlp}
        q, kv = attn.h * attn.hd, attn.kvh * attn.hd
        if _linear(attn, "qkv") is not None:
            if model_type in _FUSED:
                add(i, "self_attn", "qkv", [("qkv_proj", q + 2 * kv, (q, kv, kv))])
            else:
                add(i, "self_attn", "qkv", [("q_proj", q), ("k_proj", kv), ("v_proj", kv)])
        else:
            for kind in ("q_proj", "k_proj", "v_proj"):
                add(i, "self_attn", kind, [(kind, getattr(attn, kind).out_features)])
        add(i, "self_attn", "o_proj", [("o_proj", attn.o_proj.out_features)])
        if _linear(mlp, "gate_up") is not None:
            inter = mlp.gate_up.out_features // 2
            if model_type in _FUSED:
                add(i, "mlp", "gate_up", [("gate_up_proj", 2 * inter, (inter, inter))])
            else:
                add(i, "mlp", "gate_up", [("gate_proj", inter), ("up_proj", inter)])
        else:
            for kind in ("gate_proj", "up_proj"):
                add(i, "mlp", kind, [(kind, getattr(mlp, kind).out_features)])
        add(i, "mlp", "down_proj", [("down_proj", mlp.down_proj.out_features)])
    return TargetMap(model_type, targets, modules)


def whole_map(local: TargetMap, tp: int) -> TargetMap:
    """The whole model's targets from a ``tp``-way shard's (``local``; itself when ``tp == 1``)."""
    if tp == 1:
        return local

    def whole(t: Target) -> Target:
        if t.row_parallel:
            return replace(t, in_features=t.in_features * tp)
        return replace(
            t,
            out_features=t.out_features * tp,
            out_offset=t.out_offset * tp,
            parts=tuple(w * tp for w in t.parts),
        )

    targets = {n: whole(t) for n, t in local.targets.items()}
    modules = {m: tuple(targets[t.hf_name] for t in g) for m, g in local.modules.items()}
    return TargetMap(local.model_type, targets, modules)


def shard_weights(
    local: Target, a: torch.Tensor, b: torch.Tensor, rank: int, tp: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s part of one target's whole ``A [r, in]``, ``B [out, r]`` (``local``: the
    target on that rank's shard; see module doc). Views where possible (no copy)."""
    if tp == 1:
        return a, b
    if local.row_parallel:
        n = local.in_features
        if a.shape[1] != n * tp:
            raise ValueError(f"{local.hf_name}: A has {a.shape[1]} input columns, expected {n * tp}")
        return a[:, rank * n : (rank + 1) * n], b
    widths = local.parts or (local.out_features,)
    if b.shape[0] != sum(widths) * tp:
        raise ValueError(f"{local.hf_name}: B has {b.shape[0]} output rows, expected {sum(widths) * tp}")
    rows, start = [], 0
    for w in widths:  # each block of the whole output is cut into tp consecutive pieces
        rows.append(b[start + rank * w : start + (rank + 1) * w])
        start += w * tp
    return a, rows[0] if len(rows) == 1 else torch.cat(rows)
