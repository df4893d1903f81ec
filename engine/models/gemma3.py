"""Gemma 3 text models (``model_type: gemma3_text``, ``Gemma3ForCausalLM``).

Differences from the Llama skeleton, each as transformers 5.23's ``modeling_gemma3``:

* :class:`GemmaRMSNorm`: weight initialised to 0 and applied as ``(1 + w)``, in float32, cast
  back after the product (Llama casts before it);
* embeddings scaled by ``sqrt(hidden_size)`` (the scale cast to the model dtype);
* GeGLU MLP: ``down(act(gate(x)) * up(x))`` with ``hidden_activation`` (``gelu_pytorch_tanh``);
* four norms per layer: ``x + post_attention_norm(attn(input_norm(x)))``, then
  ``x + post_feedforward_norm(mlp(pre_feedforward_norm(x)))``;
* per-head q/k norms (Gemma style) before RoPE, softmax scale ``query_pre_attn_scalar ** -0.5``;
* local/global layers: sliding layers use their window and their own RoPE (``rope_local``,
  theta ``rope_local_base_freq``), full layers the global RoPE (with its scaling);
* ``final_logit_softcapping``: ``cap * tanh(logits / cap)``; ``attn_logit_softcapping`` (null
  in Gemma 3 configs, implemented for Gemma 2): the attention scores', in engine.attention.

Gemma 2 (engine.models.gemma2) reuses these modules without the q/k norms and with one RoPE.
Tensor parallelism: the norms act within a head (replicated), the projections shard as Llama's.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.models import fused_native
from engine.models.config import ModelConfig
from engine.models.gemm import project
from engine.models.llama import MLP, DecoderLayer, LlamaForCausalLM
from engine.models.qwen3 import QKNormAttention
from engine.models.rope import RotaryEmbedding


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class Gemma3Attention(QKNormAttention):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        self.q_norm = GemmaRMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.hd, cfg.rms_norm_eps)
        if cfg.attn_scale is not None:
            self.scale = cfg.attn_scale


class Gemma3DecoderLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__(cfg, layer_idx)
        eps = cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.sliding = cfg.layer_windows[layer_idx] is not None

    def make_attention(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return Gemma3Attention(cfg, layer_idx)

    def make_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        return MLP(cfg)

    def forward(self, x, cos, sin, cache, md):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, md))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_cls = Gemma3DecoderLayer

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None) -> None:
        super().__init__(cfg, max_positions)
        self.model.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_local = self.make_local_rotary(max_positions)

    def make_local_rotary(self, max_positions: int | None) -> RotaryEmbedding | None:
        """RoPE tables of the sliding layers (the global ones are ``self.rotary``); None when they
        share the global RoPE (``rope_local`` None: Gemma 2)."""
        cfg = self.config
        if cfg.rope_local is None:
            return None
        return RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_local)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        md: AttentionMetadata,
    ) -> torch.Tensor:
        if self.fused and input_ids.shape[0] <= fused_native.FUSED_MAX_ROWS:
            return self._fused_forward(input_ids, positions, kv_caches, md)  # same values (#17)
        x = self.model.embed_tokens(input_ids)
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)
        full = self.rotary(positions, x.dtype)
        local = full if self.rotary_local is None else self.rotary_local(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            cos, sin = local if layer.sliding else full
            x = layer(x, cos, sin, kv_caches[i], md)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = project(self.lm_head, hidden)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
