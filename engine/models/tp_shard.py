"""Megatron-style tensor-parallel sharding of a loaded (fused) Llama-family model, in place.

Rank ``r`` of ``tp`` keeps query heads ``[r*h/tp, (r+1)*h/tp)``, KV heads ``[r*kvh/tp, ...)``
(column-parallel ``qkv``, with its bias), the matching input columns of ``o_proj`` (row
parallel), intermediate columns ``[r*I/tp, ...)`` of ``gate_up`` (column parallel) and the
matching input columns of ``down_proj`` (row parallel). Column-parallel biases (q/k/v, and
gate/up with ``mlp_bias``) are split like their output rows. A row-parallel bias (``o_proj``
with Llama's ``attention_bias``, ``down_proj`` with ``mlp_bias``) is kept on rank 0 only, so
the ranks' outputs are partial sums that ``all_reduce`` adds up (set on every attention and MLP
module) with the bias counted once. Embeddings, norms and ``lm_head`` stay whole (replicated).

Qwen3's q/k norms act within a head and stay replicated; Phi-3's modules are built fused in this
same layout; Gemma's caps act per score and per logit. Mixture-of-experts blocks
(``ModelConfig.moe``) keep every expert on every rank with ``1/tp`` of each expert's intermediate
columns (and of Qwen2-MoE's shared expert), the router replicated, one all-reduce per block
(:meth:`engine.models.moe.SparseMoE.shard`).

Contract: ``h``, ``kvh``, the dense MLP's ``intermediate_size`` (when some layer is dense) and the
experts' intermediate sizes must divide by ``tp`` (a clear ValueError otherwise, naming the
model's sizes); a shard's KV cache then holds ``kvh/tp`` heads per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.models.config import ModelConfig
from engine.models.llama import MLP, LlamaForCausalLM
from engine.models.moe import SparseMoE


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError when the model cannot be split ``tp`` ways."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    sizes = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    moe = cfg.moe
    if moe is None or not all(moe.sparse_layers):  # some layer has the dense MLP
        sizes["intermediate_size"] = cfg.intermediate_size
    if moe is not None:
        sizes["moe_intermediate_size"] = moe.intermediate_size
        if moe.shared_expert_intermediate_size:
            sizes["shared_expert_intermediate_size"] = moe.shared_expert_intermediate_size
    bad = {k: v for k, v in sizes.items() if v % tp}
    if bad:
        raise ValueError(
            f"tensor_parallel_size {tp} does not divide the model's {bad}: choose a size that divides "
            f"{sorted(sizes.values())}"
        )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return lin


def shard_model(
    model: LlamaForCausalLM, rank: int, tp: int, all_reduce: Callable[[torch.Tensor], None]
) -> LlamaForCausalLM:
    """Keep rank ``rank``'s shard of every layer of ``model`` (fused: see ``fuse_weights``)."""
    cfg = model.config
    check_divisible(cfg, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} not in [0, {tp})")
    if tp == 1:
        return model
    hd = cfg.head_dim
    h, kvh = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            if a.qkv is None:
                raise ValueError("shard_model expects a fused model (load_model(..., fuse=True))")
            nq, nkv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
            q = slice(rank * h * hd, (rank + 1) * h * hd)
            k = slice(nq + rank * kvh * hd, nq + (rank + 1) * kvh * hd)
            v = slice(nq + nkv + rank * kvh * hd, nq + nkv + (rank + 1) * kvh * hd)
            w = torch.cat([a.qkv.weight[q], a.qkv.weight[k], a.qkv.weight[v]])
            b = None if a.qkv.bias is None else torch.cat([a.qkv.bias[q], a.qkv.bias[k], a.qkv.bias[v]])
            a.qkv = _linear(w, b)
            o_bias = a.o_proj.bias if rank == 0 else None  # row parallel: added once
            a.o_proj = _linear(a.o_proj.weight[:, q], o_bias)
            a.h, a.kvh = h, kvh
            a.all_reduce = all_reduce
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.shard(rank, tp, all_reduce)
            else:
                shard_mlp(layer.mlp, rank, tp, all_reduce)
    return model


def shard_mlp(m: MLP, rank: int, tp: int, all_reduce: Callable[[torch.Tensor], None] | None) -> None:
    """Keep rank ``rank``'s ``1/tp`` of a fused gated MLP's intermediate columns (``gate_up``
    column parallel, ``down_proj`` row parallel, its bias on rank 0); ``all_reduce``: the hook
    that sums the partial outputs (None: the caller sums them)."""
    if m.gate_up is None:
        raise ValueError("shard_model expects a fused model (load_model(..., fuse=True))")
    inter = m.down_proj.weight.shape[1]
    if inter % tp:
        raise ValueError(f"intermediate size {inter} does not divide by tensor_parallel_size {tp}")
    i = inter // tp
    cols = slice(rank * i, (rank + 1) * i)
    with torch.no_grad():
        gate, up = m.gate_up.weight.chunk(2, dim=0)
        gu_bias = None
        if m.gate_up.bias is not None:  # column parallel: split like the rows
            gb, ub = m.gate_up.bias.chunk(2, dim=0)
            gu_bias = torch.cat([gb[cols], ub[cols]])
        m.gate_up = _linear(torch.cat([gate[cols], up[cols]]), gu_bias)
        down_bias = m.down_proj.bias if rank == 0 else None  # row parallel: added once
        m.down_proj = _linear(m.down_proj.weight[:, cols], down_bias)
    m.all_reduce = all_reduce
