"""Qwen3 (``model_type: qwen3``): the Llama decoder with a per-head RMSNorm of q and k.

HF ``Qwen3Attention``: ``q_norm`` and ``k_norm`` (weights ``[head_dim]``, shared by every head,
eps ``rms_norm_eps``) normalise each head of q and k after the projections and **before** RoPE;
v is not normalised. ``attention_bias`` puts a bias on q/k/v and o_proj (parsed in
engine.models.config). Sliding windows follow Qwen2's rule. Everything else is the Llama skeleton.

Tensor parallelism: the norms act within a head, so a shard of whole heads keeps them unchanged
(they stay replicated; engine.models.tp_shard shards the fused qkv as for Llama).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionMetadata, paged_attention
from engine.models.config import ModelConfig
from engine.models.gemm import project
from engine.models.llama import Attention, DecoderLayer, LlamaForCausalLM, RMSNorm
from engine.models.rope import apply_rotary


class QKNormAttention(Attention):
    """Llama attention plus HF's ``q_norm``/``k_norm`` over each head's ``head_dim`` values."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, md: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        if self.qkv is not None:
            q, k, v = project(self.qkv, x).split(
                [self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1
            )
        else:
            q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        q = apply_rotary(self.q_norm(q.view(t, self.h, self.hd)), cos, sin)
        k = apply_rotary(self.k_norm(k.view(t, self.kvh, self.hd)), cos, sin)
        v = v.view(t, self.kvh, self.hd)
        o = paged_attention(q, k, v, cache, md, self.scale, self.window, self.softcap)
        out = project(self.o_proj, o.reshape(t, self.h * self.hd))
        if self.all_reduce is not None:
            self.all_reduce(out)
        return out


def make_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The attention module ``cfg`` asks for: with q/k norms when ``cfg.qk_norm``."""
    return QKNormAttention(cfg, layer_idx) if cfg.qk_norm else Attention(cfg, layer_idx)


class Qwen3DecoderLayer(DecoderLayer):
    def make_attention(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return make_attention(cfg, layer_idx)


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
