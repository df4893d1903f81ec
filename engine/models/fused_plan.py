"""Which decoder structures the fused native forward covers (issue #17): pure inspection of a
loaded model, no I/O.

:func:`fused_plan` recognises a model whose every module the fused forward
(:meth:`engine.models.llama.LlamaForCausalLM._fused_forward`) reproduces exactly (up to fp32
rounding), and otherwise names the first thing it does not cover. Covered:

* the causal LM's forward: Llama's (embeddings, layers, final norm; Llama 2/3, Mistral, Qwen2,
  SmolLM2, Qwen3, Phi-3) or Gemma 3's (embeddings times ``sqrt(hidden_size)``, sliding layers on
  the local RoPE tables; Gemma 2 inherits it with one table);
* layers: :class:`~engine.models.llama.DecoderLayer`'s pre-norm block (two norms) or
  :class:`~engine.models.gemma3.Gemma3DecoderLayer`'s sandwich (four norms);
* attention: :class:`~engine.models.llama.Attention`'s with the fused ``qkv`` (Phi-3's is built
  fused; biases are the projection's), or :class:`~engine.models.qwen3.QKNormAttention`'s per-head
  q/k norms before RoPE (Qwen3, Gemma 3); the softmax scale, the score soft-cap and the sliding
  window are attributes the attention kernels take;
* MLP: :class:`~engine.models.llama.MLP`'s gated form with the fused ``gate_up`` and the
  activation SiLU or GELU-tanh (``gelu_pytorch_tanh``, ``gelu_new``);
* norms: all :class:`~engine.models.llama.RMSNorm` (``w``) or all
  :class:`~engine.models.gemma3.GemmaRMSNorm` (``1 + w``), q/k norms of one eps;
* RoPE tables of an even width up to ``head_dim`` (partial rotary: Phi-3; LongRoPE's fixed
  short-factor tables);
* float32 parameters on the CPU, no tensor-parallel shard, and the kernels built.

Projections may be any module with the ``nn.Linear`` call contract (native fp32, int8); the final
logit soft-cap is in ``compute_logits``, which the fused forward does not replace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models import fused_native
from engine.models.fused_native import Act
from engine.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, GemmaRMSNorm
from engine.models.llama import (
    MLP,
    Attention,
    DecoderLayer,
    LlamaForCausalLM,
    RMSNorm,
    _gelu_new,
    _gelu_tanh,
)
from engine.models.qwen3 import QKNormAttention
from engine.models.rope import RotaryEmbedding

# the activation functions the act_mul kernel computes (the same objects llama.ACTIVATIONS holds)
FUSED_ACTS: dict[Callable[[torch.Tensor], torch.Tensor], Act] = {
    F.silu: Act.SILU,
    _gelu_tanh: Act.GELU_TANH,
    _gelu_new: Act.GELU_TANH,
}


@dataclass(frozen=True)
class FusedLayerPlan:
    """One layer's structure: ``sandwich`` (Gemma's four norms), ``qk_norm`` (per-head q/k norms
    before RoPE), ``table`` (index into :attr:`FusedPlan.rotaries`), ``act`` (gate activation)."""

    sandwich: bool
    qk_norm: bool
    table: int
    act: Act


@dataclass(frozen=True)
class FusedPlan:
    """The model's structure: ``plus_one`` (every norm weight acts as ``1 + w``),
    ``embed_scale`` (embeddings times ``sqrt(hidden_size)``), the RoPE modules the layers use
    and each layer's plan."""

    plus_one: bool
    embed_scale: bool
    rotaries: tuple[RotaryEmbedding, ...]
    layers: tuple[FusedLayerPlan, ...]


def owner(obj: object, name: str = "forward") -> type:
    """The class in ``type(obj)``'s MRO that defines ``name`` (whose code the call runs)."""
    return next(c for c in type(obj).__mro__ if name in vars(c))


def fused_plan(model: LlamaForCausalLM) -> tuple[FusedPlan | None, str | None]:
    """``(plan, None)`` when the fused forward covers ``model`` (see the module docstring),
    else ``(None, why)`` naming the first thing it does not cover."""
    cfg = model.config
    fwd = owner(model)
    if fwd not in (LlamaForCausalLM, Gemma3ForCausalLM):
        return None, f"{type(model).__name__} has its own forward ({fwd.__name__}'s)"
    gemma = fwd is Gemma3ForCausalLM
    rotaries: list[RotaryEmbedding] = [model.rotary]
    local = getattr(model, "rotary_local", None) if gemma else None
    if local is not None:
        rotaries.append(local)
    for rot in rotaries:
        rd = rot.cos.shape[1]
        if rd % 2 or not 0 < rd <= cfg.head_dim:
            return None, f"RoPE tables {rd} wide for head_dim {cfg.head_dim}"
    tensors = [*model.named_parameters()] + [(f"rotary{j}.cos", r.cos) for j, r in enumerate(rotaries)]
    for name, t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return None, f"{name} is {t.dtype} on {t.device.type} (it needs float32 on the CPU)"
    norms: list[tuple[str, nn.Module]] = [("final norm", model.model.norm)]
    layers = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        lo, ao, mo = owner(layer), owner(a), owner(m)
        if (
            lo not in (DecoderLayer, Gemma3DecoderLayer)
            or ao not in (Attention, QKNormAttention)
            or mo is not MLP
        ):
            return None, (
                f"layer {i} is {type(layer).__name__}({type(a).__name__}, {type(m).__name__}), "
                f"forwards of {lo.__name__}/{ao.__name__}/{mo.__name__}"
            )
        if a.qkv is None or m.gate_up is None:
            return None, f"layer {i}'s projections are not fused (load_model(fuse=True))"
        if a.all_reduce is not None or m.all_reduce is not None:
            return None, "tensor-parallel shard"
        act = FUSED_ACTS.get(m.act)
        if act is None:
            name = getattr(m.act, "__name__", repr(m.act))
            return None, f"layer {i}'s activation {name} has no fused kernel (SiLU, GELU-tanh)"
        sandwich = lo is Gemma3DecoderLayer
        names = ["input_layernorm", "post_attention_layernorm"]
        if sandwich:
            names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        norms += [(f"layer {i}'s {n}", getattr(layer, n)) for n in names]
        qk = ao is QKNormAttention
        if qk:
            norms += [(f"layer {i}'s q_norm", a.q_norm), (f"layer {i}'s k_norm", a.k_norm)]
            if a.q_norm.eps != a.k_norm.eps:
                return None, f"layer {i}'s q_norm and k_norm have different eps"
        table = 1 if local is not None and getattr(layer, "sliding", False) else 0
        layers.append(FusedLayerPlan(sandwich, qk, table, act))
    kinds = {type(n) for _, n in norms}
    bad = next(((name, n) for name, n in norms if type(n) not in (RMSNorm, GemmaRMSNorm)), None)
    if bad is not None:
        return None, f"{bad[0]} is {type(bad[1]).__name__} (RMSNorm or GemmaRMSNorm only)"
    if len(kinds) > 1:
        return None, "a mixture of RMSNorm and GemmaRMSNorm norms"
    if not fused_native.available():
        return None, f"the kernels cannot be built ({fused_native.unavailable_reason()})"
    plan = FusedPlan(GemmaRMSNorm in kinds, gemma, tuple(rotaries), tuple(layers))
    return plan, None
