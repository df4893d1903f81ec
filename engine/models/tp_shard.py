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
same layout. Mixture-of-experts models (``ModelConfig.moe``) are refused for ``tp > 1``.

Contract: ``h``, ``kvh`` and ``intermediate_size`` must divide by ``tp`` (a clear ValueError
otherwise, naming the model's sizes); a shard's KV cache then holds ``kvh/tp`` heads per layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM


def check_divisible(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError when the model cannot be split ``tp`` ways."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if tp > 1 and cfg.moe is not None:
        raise ValueError(
            f"tensor_parallel_size {tp}: tensor parallelism is not implemented for mixture-of-experts "
            f"models (model_type {cfg.model_type!r}); use tensor_parallel_size 1"
        )
    sizes = {
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
    }
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
    h, kvh, inter = cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp, cfg.intermediate_size // tp
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
            m = layer.mlp
            if m.gate_up is None:
                raise ValueError("shard_model expects a fused model (load_model(..., fuse=True))")
            cols = slice(rank * inter, (rank + 1) * inter)
            gate, up = m.gate_up.weight.chunk(2, dim=0)
            gu_bias = None
            if m.gate_up.bias is not None:  # column parallel: split like the rows
                gb, ub = m.gate_up.bias.chunk(2, dim=0)
                gu_bias = torch.cat([gb[cols], ub[cols]])
            m.gate_up = _linear(torch.cat([gate[cols], up[cols]]), gu_bias)
            down_bias = m.down_proj.bias if rank == 0 else None  # row parallel: added once
            m.down_proj = _linear(m.down_proj.weight[:, cols], down_bias)
            m.all_reduce = all_reduce
    return model
